"""The JSON patch in kopf's AdmissionReview response is stepcache's own (`patches.json_patch`), not kopf's diff.

kopf 1.45.2 would diff the whole pod (`Patch.as_json_patch`); the mutate handler swaps in ops built from the merge
patch's own paths (`main.answer_with_own_json_patch`). These reviews go through kopf's real admission path — the
production registry under `kopf.operator`, HTTPS on loopback, kmock as the API, a real PostgreSQL — and compare
the `patch` of the response, op for op, with stepcache's. If a kopf upgrade stops building the response from the
handler's Patch object, the ops become a diff's (one op per changed list element, in hash order) and this fails.
"""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonpatch
import pytest

from stepcache import keys, model, mutation, patches, references, signing, store
from tests.integration import operator_harness as harness
from tests.integration import recorded

NAMESPACE = "team-a"
IMAGE = "busybox@sha256:9ae97d36d26566ff84e8893c64a6dc4fe8ca6d1144bf5b87b2b85a32def253c7"
NO_REFERENCES = references.ReferenceView()
"""The pod below reads no ConfigMap: any view keys it the same."""


def true_pod() -> dict[str, Any]:
    """The pod whose hit jsonpatch 1.33's diff corrupted under some PYTHONHASHSEEDs (`hit: "sh"`)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "true-1",
            "namespace": NAMESPACE,
            "labels": {"app": "true"},
            "annotations": {"note": "a/b"},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE, "command": ["true"]}],
        },
    }


def ops_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def signed_for(pod: dict[str, Any]) -> mutation.Signed:
    key = keys.compute(pod, namespace=NAMESPACE, options=keys.KeyOptions(), references=NO_REFERENCES)
    containers = ",".join(key.containers)
    signature = signing.signature(harness.SIGNING_KEY, namespace=NAMESPACE, key=key.value, key_containers=containers)
    return mutation.Signed(key=key.value, key_containers=key.containers, signature=signature)


async def stored_entry(cache: store.Store, pod: dict[str, Any]) -> model.CachedEntry:
    key = keys.compute(pod, namespace=NAMESPACE, options=keys.KeyOptions(), references=NO_REFERENCES)
    await cache.record(recorded.entry(key, namespace=NAMESPACE, termination_messages={}))
    entry = await cache.lookup(namespace=NAMESPACE, cache_key=key.value, max_age=None)
    assert entry is not None
    return entry


@pytest.fixture
async def operator(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, cache_url: str
) -> AsyncIterator[tuple[harness.Operator, aiohttp.ClientSession]]:
    certs = harness.webhook_tls(tmp_path)
    async with harness.emulated_cluster() as cluster:
        await harness.create_opted_in(cluster, NAMESPACE)
        launcher = harness.Launcher(cluster=cluster, certs=certs, tmp_path=tmp_path, monkeypatch=monkeypatch)
        async with (
            launcher.run(cache_url, opted_in=NAMESPACE, STEPCACHE_DB_TIMEOUT_MS="5000") as op,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certs.client_context())) as client,
        ):
            yield op, client


async def test_a_hit_is_answered_with_the_ops_of_the_hit_patchs_own_paths(
    operator: tuple[harness.Operator, aiohttp.ClientSession], cache: store.Store
) -> None:
    op, client = operator
    pod = true_pod()
    entry = await stored_entry(cache, pod)
    hit = mutation.hit_patch(pod, signed=signed_for(pod), entry=entry, options=op.runtime.replay_options, kfp=False)

    ops = ops_of(await harness.review(client, op, harness.admission_request(pod)))

    assert ops == patches.json_patch(pod, hit)
    assert [(o["op"], o["path"]) for o in ops] == [
        ("add", "/metadata/labels/stepcache.dev~1cache-id"),
        ("add", "/metadata/labels/stepcache.dev~1hit"),
        ("add", "/metadata/annotations/stepcache.dev~1key"),
        ("add", "/metadata/annotations/stepcache.dev~1key-containers"),
        ("add", "/metadata/annotations/stepcache.dev~1key-signature"),
        ("replace", "/spec/containers"),
    ]
    admitted = jsonpatch.apply_patch(pod, ops)
    assert admitted["metadata"]["labels"] == {"app": "true", mutation.CACHE_ID: str(entry.id), mutation.HIT: "true"}
    assert [c["command"][:2] for c in admitted["spec"]["containers"]] == [["sh", "-c"]]


async def test_a_skip_is_answered_with_one_remove_per_forged_name(
    operator: tuple[harness.Operator, aiohttp.ClientSession],
) -> None:
    op, client = operator
    pod = true_pod()
    pod["metadata"]["labels"].update({keys.ENABLED_LABEL: "false", mutation.HIT: "true", mutation.CACHE_ID: "7"})
    pod["metadata"]["annotations"][mutation.KEY_SIGNATURE] = "0" * 64

    ops = ops_of(await harness.review(client, op, harness.admission_request(pod)))

    assert ops == [
        {"op": "remove", "path": "/metadata/labels/stepcache.dev~1cache-id"},
        {"op": "remove", "path": "/metadata/labels/stepcache.dev~1hit"},
        {"op": "remove", "path": "/metadata/annotations/stepcache.dev~1key-signature"},
    ]
