"""Fuzzing the webhook's HTTPS endpoint, as the API server (or anyone who can reach it) calls it.

The operator runs in-process (`main.build_registry` under `kopf.operator`, kmock as its API, a real PostgreSQL), and
each example POSTs one body: an AdmissionReview of a mutated realistic pod (tests/fuzzing.py), sometimes with its
envelope broken or made odd, sometimes bytes that are no review at all. The properties: the status is 400 exactly
for what is not an AdmissionReview (or nested too deep), 413 exactly for bodies over the limit, 200 otherwise, never
500; a 200 answers the review's uid, allows the pod, and its JSON patch applied to the pod gives a valid pod with
stepcache's names as stepcache writes them; no internal error is reported; each answer comes within the examples'
deadline.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import pathlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import jsonpatch
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from stepcache import argo, artifacts, blobs, errors, keys, mutation, store, webhook
from tests import fuzzing
from tests.integration import conftest, recorded
from tests.integration import operator_harness as harness

MAX_DEPTH = 100
"""The nesting the webhook accepts (its documented bound, restated: the expectation is not read from the code)."""
MAX_BYTES = 4 * 1024 * 1024


@pytest.fixture
async def cluster() -> AsyncIterator[harness.Emulator]:
    async with harness.emulated_cluster() as emulated:
        for namespace in fuzzing.NAMESPACES:
            await harness.create(emulated, harness.namespace(namespace, opted_in=True))
            await harness.create(emulated, harness.configmap(namespace, "kube-root-ca.crt", {"ca.crt": "---CA---"}))
        await harness.create(emulated, harness.configmap("team-a", "train-config", {"epochs": "10"}))
        await harness.create(emulated, harness.configmap("ml", "train-env", {"LOG_LEVEL": "info"}))
        await harness.create(emulated, harness.configmap("ml", "train-settings", {"fast.yaml": "epochs: 3\n"}))
        yield emulated


BLOB = b"payload written by the step\n"


@pytest.fixture
async def stored(cache_url: str) -> list[int]:
    """A result for each fixture pod as it is (outputs for all it declares), so unkeyed changes give hits."""
    cache = await store.Store.connect(cache_url, timeout=conftest.TIMEOUT)
    blob_store = await blobs.BlobStore.connect(cache_url, timeout=conftest.TIMEOUT)
    ids = []
    try:
        sha256 = await blob_store.put(BLOB)
        for pod in fuzzing.PODS.values():
            namespace = pod["metadata"]["namespace"]
            try:
                key = keys.compute(
                    pod, namespace=namespace, options=keys.KeyOptions(), references=fuzzing.reference_view()
                )
            except errors.Uncacheable:
                continue
            tmpl = argo.template(pod)
            outputs = None
            if tmpl is not None:
                outputs = {
                    "parameters": {name: f"value of {name}" for name in argo.output_parameter_paths(tmpl)},
                    "result": "9",
                    "artifacts": [
                        artifacts.Stored(
                            name=d.name, path=d.path, archive=d.archive, sha256=sha256, size=len(BLOB)
                        ).as_json()
                        for d in artifacts.declared_outputs(tmpl)
                    ],
                }
            messages = {c["name"]: "done\n" for c in pod["spec"]["containers"]}
            entry = recorded.entry(key, namespace=namespace, termination_messages=messages, argo_outputs=outputs)
            ids.append(await cache.record(entry))
    finally:
        await blob_store.close()
        await cache.close()
    return ids


@pytest.fixture
def certs(tmp_path: pathlib.Path) -> harness.WebhookTLS:
    return harness.webhook_tls(tmp_path)


@pytest.fixture
async def operator(
    cluster: harness.Emulator,
    certs: harness.WebhookTLS,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    cache_url: str,
    stored: list[int],
) -> AsyncIterator[harness.Operator]:
    launcher = harness.Launcher(cluster=cluster, certs=certs, tmp_path=tmp_path, monkeypatch=monkeypatch)
    async with launcher.run(cache_url, opted_in=fuzzing.NAMESPACES[-1], STEPCACHE_DB_TIMEOUT_MS="5000") as op:

        async def all_opted_in() -> bool:
            return await op.inspect(lambda: all(name in op.runtime.namespaces for name in fuzzing.NAMESPACES))

        await harness.eventually(all_opted_in)
        yield op


@pytest.fixture
async def client(certs: harness.WebhookTLS) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certs.client_context())) as session:
        yield session


# --- envelopes: each edit with what the answer must be ---------------------------------------------------------------

Edit = Callable[[dict[str, Any]], None]


def _request(edit: Callable[[dict[str, Any]], Any]) -> Edit:
    return lambda review: edit(review["request"])


def _set(**fields: Any) -> Edit:
    return _request(lambda request: request.update(copy.deepcopy(fields)))


def _drop(field: str) -> Edit:
    return _request(lambda request: request.pop(field, None))


def _update(request: dict[str, Any]) -> None:
    request.update(operation="UPDATE", oldObject=copy.deepcopy(request["object"]))


def _delete(request: dict[str, Any]) -> None:
    request.update(operation="DELETE", oldObject=request["object"], object=None)


MALFORMED: dict[str, Edit] = {
    "no uid": _drop("uid"),
    "uid a number": _set(uid=5),
    "empty uid": _set(uid=""),
    "no request": lambda review: review.pop("request"),
    "request a list": lambda review: review.update(request=[review["request"]]),
    "resource a string": _set(resource="pods"),
    "resource without a version": _request(lambda request: request["resource"].pop("version")),
    "kind a list": _set(kind=["Pod"]),
    "no user info": _drop("userInfo"),
    "user info a string": _set(userInfo="admin"),
    "an unknown operation": _set(operation="PATCH"),
    "operation a number": _set(operation=1),
    "object a list": _set(object=[1]),
    "object a string": _set(object="pod"),
    "no object at all": _set(object=None),
    "dryRun a string": _set(dryRun="true"),
    "namespace a number": _set(namespace=5),
    "another apiVersion": lambda review: review.update(apiVersion="v1"),
    "another kind": lambda review: review.update(kind="Pod"),
}
"""Not an AdmissionReview as kube-apiserver writes it: 400."""

NOT_FOR_STEPCACHE: dict[str, Edit] = {
    "update": _request(_update),
    "delete": _request(_delete),
    "connect": _set(operation="CONNECT"),
    "configmaps": _set(resource={"group": "", "version": "v1", "resource": "configmaps"}),
    "apps": _set(resource={"group": "apps", "version": "v1", "resource": "deployments"}),
    "status subresource": _set(subResource="status"),
    "binding subresource": _set(subResource="binding"),
}
"""Well-formed, but not a pod CREATE: allowed unchanged, with a warning."""


def _unknown_fields(review: dict[str, Any]) -> None:
    review["extra"] = {"a": [1]}
    review["request"]["zz"] = None


ORDINARY: dict[str, Edit] = {
    "as sent": lambda review: None,
    "dry run": _set(dryRun=True),
    "another request namespace": _set(namespace="elsewhere"),
    "unknown fields": _unknown_fields,
    "v1beta1": lambda review: review.update(apiVersion="admission.k8s.io/v1beta1"),
}
"""What the API server may send for a pod CREATE: the pod goes through admission."""


KINDS = ["review"] * 40 + ["malformed"] * 4 + ["not-for-stepcache"] * 4 + ["bytes"] * 2 + ["near the limit"]
"""Mostly reviews of pods; now and then a body of about 4 MiB (each costs as much as a hundred small ones)."""


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str, dict[str, Any] | None]:
    """(body, what the answer must be, the review when it is one)."""
    kind = draw(st.sampled_from(KINDS))
    if kind in ("bytes", "near the limit"):
        event(kind)
    if kind == "bytes":
        raw = draw(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
        return raw, "400", None
    pod = draw(fuzzing.pods(max_depth=MAX_DEPTH + 10, max_size=20_000))
    if kind == "near the limit":  # bodies just under and just over it: keyed, or refused with 413
        size = draw(st.integers(min_value=MAX_BYTES - 65_536, max_value=MAX_BYTES + 65_536))
        pod = fuzzing.clone(fuzzing.PODS["job"])
        pod["metadata"]["annotations"]["example.com/notes"] = "n" * size
        kind = "review"
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": harness.admission_request({"metadata": {"namespace": "team-a"}}),
    }
    review["request"]["object"] = pod
    metadata = pod.get("metadata") if isinstance(pod, Mapping) else None
    namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    review["request"]["namespace"] = namespace if isinstance(namespace, str) else ""
    catalogue = {"review": ORDINARY, "malformed": MALFORMED, "not-for-stepcache": NOT_FOR_STEPCACHE}[kind]
    name = draw(st.sampled_from(sorted(catalogue)))
    catalogue[name](review)
    event(f"{kind}: {name}")
    body = json.dumps(review).encode()
    if len(body) > MAX_BYTES:
        return body, "413", None
    if fuzzing.depth(review) > MAX_DEPTH:
        return body, "400", None
    if kind == "malformed":
        return body, "400", None
    if kind == "not-for-stepcache":
        return body, "unchanged", review
    return body, "admitted", review


def inferred_outcome(after: Mapping[str, Any]) -> str:
    """What the answer did, read off the pod it gives: signed with a cache-id label, or left alone."""
    metadata = after.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    if not isinstance(labels, Mapping) or mutation.CACHE_ID not in labels:
        return "skip"
    return "hit" if labels.get(mutation.HIT) == "true" else "miss"


# The operator under test runs in a thread of this process, and kopf (its credentials vault picks one with
# random.choice per API call) and aiohttp (its connector shuffles its queues) use the global `random` while
# examples are drawn; hypothesis cannot tell that from a strategy using it, and warns.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@fuzzing.fuzz_settings(0.1, deadline_seconds=10.0)
@fuzzing.timeout(0.1)
@given(case=bodies())
async def test_any_body_gets_an_answer_that_never_fails_or_denies_and_a_patch_that_gives_a_valid_pod(
    operator: harness.Operator, client: aiohttp.ClientSession, case: tuple[bytes, str, dict[str, Any] | None]
) -> None:
    body, expected, review = case
    headers = {"Content-Type": "application/json"}

    async with client.post(operator.webhook_url, data=io.BytesIO(body), headers=headers) as answer:
        status, text = answer.status, await answer.text()

    if expected in ("400", "413"):
        assert status == int(expected), (status, text[:500])
        return
    assert status == 200, (status, text[:500])
    assert review is not None
    payload = json.loads(text)
    assert (payload["apiVersion"], payload["kind"]) == (review["apiVersion"], "AdmissionReview")
    response = payload["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True, response
    fuzzing.check_warnings(response.get("warnings", []))
    pod = review["request"]["object"] if review["request"]["object"] is not None else review["request"]["oldObject"]
    if expected == "unchanged":
        assert "patch" not in response
        assert response["warnings"], response
        return
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        after = jsonpatch.apply_patch(fuzzing.clone(pod), ops, in_place=True)
    else:
        after = pod
    outcome = inferred_outcome(after)
    event(f"outcome: {outcome}")
    labels = after.get("metadata", {}).get("labels") if isinstance(after.get("metadata"), Mapping) else None
    entry_id = int(labels[mutation.CACHE_ID]) if outcome == "hit" and isinstance(labels, Mapping) else None
    fuzzing.check_admitted(pod, after, outcome=outcome, signing_key=harness.SIGNING_KEY, entry_id=entry_id)


def test_the_bounds_restated_here_are_the_webhooks() -> None:
    assert (webhook.MAX_REVIEW_DEPTH, webhook.MAX_REVIEW_BYTES) == (MAX_DEPTH, MAX_BYTES)
