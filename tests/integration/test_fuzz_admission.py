"""Fuzzing `admission.decide` with a real PostgreSQL store (and blob store) behind it.

Every example is a realistic pod put through random mutations (tests/fuzzing.py). Often its result is stored first
(under the key computed here, with outputs for its containers, parameters and artifacts), so the hit path runs as
much as the miss path. The properties: decide never raises and never ends in its "error" outcome; every warning is
stepcache's and none is an internal error; the patch, applied as kube-apiserver applies a JSON patch, gives a valid
pod whose containers keep their names and whose stepcache names are exactly what stepcache writes; a second
decision on that pod (the API server's reinvocation) changes nothing; each decision is bounded in time (the
examples' deadline).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import jsonpatch
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from stepcache import (
    admission,
    argo,
    artifacts,
    blobs,
    config,
    errors,
    keys,
    kube,
    mutation,
    patches,
    runtime,
    shapes,
)
from stepcache import store as store_module
from tests import fuzzing
from tests.integration import conftest, recorded

SIGNING_KEY = b"fuzz-signing-key-0123456789abcdef0123"
BLOB = b"payload written by the step\n"
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
MAX_POD_DEPTH = 98
"""What the webhook lets through: a review nested at most 100 deep holds a pod at most 98 deep."""
HANG = 30.0
"""Seconds after which a call is a hang, not a slow example (the examples' deadline is the bound tested)."""


@pytest.fixture
async def rt(cache_url: str) -> AsyncIterator[runtime.Runtime]:
    cache = await store_module.Store.connect(cache_url, timeout=conftest.TIMEOUT, hit_flush_interval=0.05)
    blob_store = await blobs.BlobStore.connect(cache_url, timeout=conftest.TIMEOUT)
    await blob_store.put(BLOB)
    namespaces = runtime.OptedInNamespaces()
    for namespace in fuzzing.NAMESPACES:
        namespaces.add(namespace)
    try:
        yield runtime.Runtime(
            settings=config.Settings(database_url=cache_url, db_timeout=conftest.TIMEOUT),
            store=cache,
            kube=cast(kube.Kube, None),  # admission never calls the API
            signing_key=SIGNING_KEY,
            namespaces=namespaces,
            key_options=keys.KeyOptions(),
            replay_options=mutation.ReplayOptions(cache_image="busybox:1.36.1"),
            references=fuzzing.reference_view(),
            blobs=blob_store,
            url_key=artifacts.url_key(SIGNING_KEY),
        )
    finally:
        await blob_store.close()
        await cache.close()


OUTPUT_TEXT = fuzzing.TEXT.filter(lambda text: "\x00" not in text)
"""What a step can have produced (a NUL is never stored: tests/integration/test_unstorable.py)."""


def stored_outputs(pod: Mapping[str, Any], draw: st.DataObject) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Termination messages for the pod's containers, and Argo outputs for what its template declares (some left
    out at random, so replays that lack one are tried too)."""
    spec = pod.get("spec") or {}
    names = [c.get("name") for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    messages = {name: draw.draw(OUTPUT_TEXT) for name in names if isinstance(name, str) and draw.draw(st.booleans())}
    try:
        tmpl = argo.template(pod)
    except errors.Uncacheable:
        tmpl = None
    if tmpl is None:
        return messages, None
    parameters = {
        name: draw.draw(OUTPUT_TEXT)
        for name in argo.output_parameter_paths(tmpl)
        if draw.draw(st.integers(min_value=0, max_value=9))
    }
    stored_artifacts = [
        artifacts.Stored(name=d.name, path=d.path, archive=d.archive, sha256=BLOB_SHA, size=len(BLOB)).as_json()
        for d in artifacts.declared_outputs(tmpl)
        if draw.draw(st.integers(min_value=0, max_value=9))
    ]
    outputs: dict[str, Any] = {"parameters": parameters, "result": draw.draw(st.none() | OUTPUT_TEXT)}
    if stored_artifacts:
        outputs["artifacts"] = stored_artifacts
    return messages, outputs


async def store_result(rt: runtime.Runtime, pod: Mapping[str, Any], draw: st.DataObject) -> int | None:
    """Record a result under the key this pod has (computed here as admission computes it), if it has one."""
    if next(shapes.problems(pod, shapes.POD), None) is not None:
        return None  # admission keys no such pod
    try:
        namespace = pod["metadata"]["namespace"]
        assert isinstance(namespace, str)
        key = keys.compute(pod, namespace=namespace, options=rt.key_options, references=rt.references)
        messages, outputs = stored_outputs(pod, draw)
    except Exception:  # a pod of any shape may not be keyable: nothing to store, decide is tried all the same
        return None
    entry = recorded.entry(key, namespace=namespace, termination_messages=messages, argo_outputs=outputs)
    try:
        return await rt.store.record(entry)
    except errors.Uncacheable:  # its key material holds a NUL: a pod that is never recorded
        return None


def applied(pod: Mapping[str, Any], merge: Mapping[str, Any]) -> dict[str, Any]:
    """The pod after the review's JSON patch, applied op by op as kube-apiserver applies it."""
    ops = patches.json_patch(pod, merge)
    result: dict[str, Any] = jsonpatch.apply_patch(fuzzing.clone(pod), ops, in_place=True)
    return result


@fuzzing.fuzz_settings(0.77, deadline_seconds=5.0)
@fuzzing.timeout(0.77)
@given(
    pod=fuzzing.pods(max_depth=90, max_size=200_000),
    store_first=st.booleans(),
    dryrun=st.booleans(),
    again=st.booleans(),
    data=st.data(),
)
async def test_decide_on_any_pod_admits_it_as_a_valid_pod_with_stepcaches_names_as_stepcache_writes_them(
    rt: runtime.Runtime, pod: dict[str, Any], store_first: bool, dryrun: bool, again: bool, data: st.DataObject
) -> None:
    assume(fuzzing.depth(pod) <= MAX_POD_DEPTH)
    if store_first:
        await store_result(rt, pod, data)
    before = fuzzing.clone(pod)

    verdict = await asyncio.wait_for(admission.decide(rt, pod, dryrun=dryrun), timeout=HANG)

    assert pod == before, "decide changed the pod it was given"
    assert verdict.outcome in ("skip", "uncacheable", "miss", "hit"), verdict
    event(verdict.outcome)
    fuzzing.check_warnings(verdict.warnings)
    after = applied(pod, verdict.patch)
    assert after == mutation.apply_merge_patch(pod, verdict.patch)
    fuzzing.check_admitted(pod, after, outcome=verdict.outcome, signing_key=SIGNING_KEY, entry_id=verdict.entry_id)

    # The API server may call the webhook again on the pod it produced: nothing more changes. (Not after an
    # uncacheable pod: its patch may remove the very field that made it so, a forged stepcache name of a wrong type.)
    if again and verdict.outcome != "uncacheable":
        second = await asyncio.wait_for(admission.decide(rt, after, dryrun=dryrun), timeout=HANG)
        assert second.outcome != "error", second
        assert applied(after, second.patch) == after, (verdict.outcome, second)
