"""The admission webhook as the API server meets it: AdmissionReview v1 over HTTPS to the production kopf wiring.

The operator runs in-process (`main.build_registry` under `kopf.operator`) with kmock as its Kubernetes API and a
real PostgreSQL as its store. Each test POSTs reviews to `https://127.0.0.1:PORT/mutate-pods` with a client that
trusts only the test CA, applies the returned JSON patch to the reviewed pod and asserts the pod the API server
would store, the warnings, and what the database saw.
"""

from __future__ import annotations

import copy
import io
import json
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeAlias

import aiohttp
import asyncpg
import pytest
import yaml
from hack.cluster import postgres as cluster_postgres
from kopf._core.engines import admission as kopf_admission

from stepcache import keys, model, mutation, references, signing, store, webhook
from tests.integration import operator_harness as harness
from tests.integration import recorded

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"  # generic only in the stubs

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pods"
NAMESPACE = "team-a"
"""Opted in (labelled `stepcache.dev/enabled=true`) before the operator starts."""
OTHER_NAMESPACE = "team-b"
"""Exists, not opted in."""
DB_TIMEOUT_MS = 300
MARGIN = 1.0
"""Seconds of scheduling slack on a shared machine for "answers within the DB timeout"; far below a hang."""
MESSAGE = '{"accuracy": 0.93, "model": "s3://models/train/42"}\n'
TAG_WARNING = (
    'stepcache: image "busybox:1.36" is referenced by tag; a cached result assumes the tag does not move — '
    "pin a digest (busybox@sha256:...) to be exact"
)
"""DESIGN.md's wording ("Tag-only images"), behind the prefix every stepcache warning carries."""


def load_pod(name: str = "job-pod") -> dict[str, Any]:
    with (FIXTURES / f"{name}.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


REFERENCES = references.ReferenceView()
REFERENCES.put_configmap(NAMESPACE, "train-config", data=harness.TRAIN_CONFIG, binary_data=None)
REFERENCES.put_configmap(OTHER_NAMESPACE, "train-config", data=harness.TRAIN_CONFIG, binary_data=None)
"""What the operator's view must know of the ConfigMap job-pod.yaml reads, for these keys to be the operator's."""


def key_of(pod: Mapping[str, Any]) -> keys.Key:
    """The key admission computes under the default settings (scope namespace, no salt)."""
    return keys.compute(pod, namespace=pod["metadata"]["namespace"], options=keys.KeyOptions(), references=REFERENCES)


def signature_of(key: keys.Key, *, namespace: str = NAMESPACE) -> str:
    return signing.signature(
        harness.SIGNING_KEY, namespace=namespace, key=key.value, key_containers=",".join(key.containers)
    )


def entry_for(pod: Mapping[str, Any]) -> model.NewEntry:
    """A stored result for this pod's key, as the recorder would have written it a minute ago."""
    return recorded.entry(key_of(pod), namespace=NAMESPACE, termination_messages={"train": MESSAGE})


def without_stepcache_names(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod with every stepcache-owned label and annotation taken out (and empty maps dropped)."""
    result = copy.deepcopy(dict(pod))
    metadata = result["metadata"]
    for field, owned in (("labels", mutation.OWNED_LABELS), ("annotations", mutation.OWNED_ANNOTATIONS)):
        kept = {name: value for name, value in (metadata.get(field) or {}).items() if name not in owned}
        if kept:
            metadata[field] = kept
        else:
            metadata.pop(field, None)
    return result


def assert_signed_miss(pod: Mapping[str, Any], admitted: Mapping[str, Any]) -> None:
    """Admitted as a miss: signed key annotations and an empty cache-id label added, nothing else changed."""
    key = key_of(pod)
    assert admitted["metadata"]["annotations"][mutation.KEY] == key.value
    assert admitted["metadata"]["annotations"][mutation.KEY_CONTAINERS] == ",".join(key.containers)
    assert admitted["metadata"]["annotations"][mutation.KEY_SIGNATURE] == signature_of(key)
    assert admitted["metadata"]["labels"][mutation.CACHE_ID] == ""
    assert mutation.HIT not in admitted["metadata"]["labels"]
    assert without_stepcache_names(admitted) == without_stepcache_names(pod)


# --- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: pathlib.Path) -> harness.WebhookTLS:
    return harness.webhook_tls(tmp_path)


@pytest.fixture
async def cluster() -> AsyncIterator[harness.Emulator]:
    async with harness.emulated_cluster() as emulated:
        await harness.create_opted_in(emulated, NAMESPACE)
        await harness.create(emulated, harness.namespace(OTHER_NAMESPACE, opted_in=False))
        await harness.create(emulated, harness.configmap(OTHER_NAMESPACE, "train-config", harness.TRAIN_CONFIG))
        yield emulated


@pytest.fixture
def launcher(
    cluster: harness.Emulator, certs: harness.WebhookTLS, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> harness.Launcher:
    return harness.Launcher(cluster=cluster, certs=certs, tmp_path=tmp_path, monkeypatch=monkeypatch)


@pytest.fixture
async def operator(launcher: harness.Launcher, cache_url: str) -> AsyncIterator[harness.Operator]:
    async with launcher.run(cache_url, opted_in=NAMESPACE, STEPCACHE_DB_TIMEOUT_MS="5000") as op:
        yield op


@pytest.fixture
async def client(certs: harness.WebhookTLS) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTPS client that trusts only the test CA (and so checks the webhook's certificate for 127.0.0.1)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certs.client_context())) as session:
        yield session


@pytest.fixture(scope="module")
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster_postgres.TempPostgres]:
    """A server of this module's own, which its tests stop and freeze."""
    with cluster_postgres.TempPostgres(tmp_path_factory.mktemp("outage-postgres")) as server:
        yield server


@pytest.fixture
def outage_url(outage_server: cluster_postgres.TempPostgres) -> Iterator[str]:
    outage_server.start()
    yield outage_server.url
    outage_server.thaw()
    outage_server.start()


# --- miss, hit, dry run ----------------------------------------------------------------------------------------------


async def test_a_pod_with_no_stored_result_is_admitted_as_a_signed_miss(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    request = harness.admission_request(pod)

    response = await harness.review(client, operator, request)

    assert response["allowed"] is True
    assert "status" not in response
    assert_signed_miss(pod, harness.patched(pod, response))


async def test_a_stored_result_turns_the_pod_into_replay_containers_and_counts_a_hit(
    operator: harness.Operator, client: aiohttp.ClientSession, cache: store.Store, db: Connection
) -> None:
    pod = load_pod()
    entry_id = await cache.record(entry_for(pod))

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    admitted = harness.patched(pod, response)
    key = key_of(pod)
    assert admitted["metadata"]["labels"][mutation.CACHE_ID] == str(entry_id)
    assert admitted["metadata"]["labels"][mutation.HIT] == "true"
    assert admitted["metadata"]["annotations"][mutation.KEY] == key.value
    assert admitted["metadata"]["annotations"][mutation.KEY_SIGNATURE] == signature_of(key)
    spec = admitted["spec"]
    assert [c["name"] for c in spec["containers"]] == ["train", "report"]
    assert {c["image"] for c in spec["containers"]} == {operator.settings.cache_image}
    train = spec["containers"][0]
    assert {"name": mutation.MESSAGE_ENV, "value": MESSAGE} in train["env"]
    assert {"name": mutation.ENTRY_ID_ENV, "value": str(entry_id)} in train["env"]
    assert train["securityContext"]["runAsNonRoot"] is True
    tiny = {"cpu": "10m", "memory": "16Mi"}
    assert train["resources"] == {"requests": tiny, "limits": tiny}
    assert "initContainers" not in spec
    assert "nodeSelector" not in spec
    assert "affinity" not in spec
    assert [v["name"] for v in spec["volumes"]] == ["scratch", "config", "kube-api-access-7rq2x"]  # the PVC is gone

    async def hit_count() -> int:
        count: int = await db.fetchval("SELECT hit_count FROM cache_entries WHERE id = $1", entry_id)
        return count

    assert await harness.eventually(hit_count, until=lambda count: count >= 1) == 1  # written off the request path


async def test_a_dry_run_gets_the_same_hit_patch_but_counts_no_hit(
    operator: harness.Operator, client: aiohttp.ClientSession, cache: store.Store, db: Connection
) -> None:
    pod = load_pod()
    entry_id = await cache.record(entry_for(pod))
    hits = operator.runtime.store

    async def pending() -> int:
        return await operator.inspect(lambda: hits.pending_hits)

    dry = await harness.review(client, operator, harness.admission_request(pod, dry_run=True))

    assert dry["allowed"] is True
    assert await pending() == 0, "a dry run noted a hit"
    real = await harness.review(client, operator, harness.admission_request(pod))
    assert harness.patched(pod, dry) == harness.patched(pod, real)
    assert harness.patched(pod, dry)["metadata"]["labels"][mutation.HIT] == "true"

    async def counted() -> tuple[int, int]:
        stored: int = await db.fetchval("SELECT hit_count FROM cache_entries WHERE id = $1", entry_id)
        return stored, await pending()

    # Once the real hit is flushed and nothing waits, the count holds that one hit and nothing from the dry run.
    assert await harness.eventually(counted, until=lambda c: c[0] >= 1 and c[1] == 0) == (1, 0)


# --- pods that are not cached ----------------------------------------------------------------------------------------


async def test_a_pod_that_opts_out_is_admitted_unchanged(
    operator: harness.Operator, client: aiohttp.ClientSession, cache: store.Store
) -> None:
    pod = load_pod()
    await cache.record(entry_for(pod))  # a hit, were the pod not opted out
    pod["metadata"]["labels"][keys.ENABLED_LABEL] = "false"

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert "patch" not in response
    assert harness.patched(pod, response) == pod


async def test_an_opted_out_pod_loses_the_stepcache_names_its_author_wrote_and_nothing_else(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    pod["metadata"]["labels"].update({keys.ENABLED_LABEL: "false", mutation.CACHE_ID: "7", mutation.HIT: "true"})
    pod["metadata"]["annotations"].update({mutation.KEY: "f" * 64, mutation.KEY_SIGNATURE: "0" * 64})

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert harness.patched(pod, response) == without_stepcache_names(pod)


async def test_a_pod_in_a_namespace_that_is_not_opted_in_is_admitted_unchanged(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    for namespace in (OTHER_NAMESPACE, "never-created"):
        pod = load_pod()
        pod["metadata"]["namespace"] = namespace

        response = await harness.review(client, operator, harness.admission_request(pod))

        assert response["allowed"] is True
        assert "patch" not in response
        assert "warnings" not in response


async def test_a_namespace_labelled_while_the_operator_runs_is_opted_in_without_a_restart(
    operator: harness.Operator, client: aiohttp.ClientSession, cluster: harness.Emulator
) -> None:
    pod = load_pod()
    pod["metadata"]["namespace"] = OTHER_NAMESPACE

    await harness.label_namespace(cluster, OTHER_NAMESPACE, {keys.ENABLED_LABEL: "true"})

    async def admitted() -> dict[str, Any]:
        return harness.patched(pod, await harness.review(client, operator, harness.admission_request(pod)))

    signed = await harness.eventually(admitted, until=lambda p: mutation.KEY in p["metadata"].get("annotations", {}))
    assert signed["metadata"]["annotations"][mutation.KEY] == key_of(pod).value
    assert signed["metadata"]["labels"][mutation.CACHE_ID] == ""


# --- warnings --------------------------------------------------------------------------------------------------------


async def test_an_unparsable_staleness_runs_the_pod_uncached_with_a_warning_naming_the_annotation(
    operator: harness.Operator, client: aiohttp.ClientSession, cache: store.Store
) -> None:
    pod = load_pod()
    await cache.record(entry_for(pod))  # never served: an unparsable staleness is not "forever"
    pod["metadata"]["annotations"]["stepcache.dev/max-staleness"] = "a week or so"

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert_signed_miss(pod, harness.patched(pod, response))
    assert [w for w in response["warnings"] if "stepcache.dev/max-staleness" in w], response["warnings"]


async def test_an_image_given_by_tag_only_is_cached_with_the_tag_warning(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    pod["spec"]["initContainers"][0]["image"] = "busybox:1.36"
    pod["spec"]["containers"][1]["image"] = "busybox:1.36"  # the same tag twice: one warning

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert response["warnings"] == [TAG_WARNING]
    assert_signed_miss(pod, harness.patched(pod, response))


# --- failures --------------------------------------------------------------------------------------------------------


async def test_a_stopped_database_admits_the_pod_as_a_miss_within_the_timeout(
    launcher: harness.Launcher,
    client: aiohttp.ClientSession,
    outage_server: cluster_postgres.TempPostgres,
    outage_url: str,
) -> None:
    async with launcher.run(outage_url, opted_in=NAMESPACE, STEPCACHE_DB_TIMEOUT_MS=str(DB_TIMEOUT_MS)) as operator:
        pod = load_pod()
        outage_server.stop()

        started = time.monotonic()
        response = await harness.review(client, operator, harness.admission_request(pod))
        elapsed = time.monotonic() - started

    assert elapsed < DB_TIMEOUT_MS / 1000 + MARGIN
    assert response["allowed"] is True
    assert_signed_miss(pod, harness.patched(pod, response))
    assert [w for w in response["warnings"] if "cache unavailable" in w], response["warnings"]


async def test_a_database_that_hangs_admits_the_pod_as_a_miss_within_the_timeout(
    launcher: harness.Launcher,
    client: aiohttp.ClientSession,
    outage_server: cluster_postgres.TempPostgres,
    outage_url: str,
) -> None:
    async with launcher.run(outage_url, opted_in=NAMESPACE, STEPCACHE_DB_TIMEOUT_MS=str(DB_TIMEOUT_MS)) as operator:
        pod = load_pod()
        outage_server.freeze()
        try:
            started = time.monotonic()
            response = await harness.review(client, operator, harness.admission_request(pod))
            elapsed = time.monotonic() - started
        finally:
            outage_server.thaw()  # before the operator closes its pool

    assert elapsed < DB_TIMEOUT_MS / 1000 + MARGIN
    assert response["allowed"] is True
    assert_signed_miss(pod, harness.patched(pod, response))
    assert [w for w in response["warnings"] if "cache unavailable" in w], response["warnings"]


async def test_a_body_that_is_not_json_is_a_bad_request(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    headers = {"Content-Type": "application/json"}
    async with client.post(operator.webhook_url, data=b"{not json", headers=headers) as answer:
        assert answer.status == 400


async def test_a_review_without_an_object_is_refused_without_a_server_error_and_serving_goes_on(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    request = harness.admission_request(load_pod())
    del request["object"]
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}

    async with client.post(operator.webhook_url, json=body) as answer:
        assert answer.status == 400

    pod = load_pod()
    response = await harness.review(client, operator, harness.admission_request(pod))
    assert_signed_miss(pod, harness.patched(pod, response))


async def test_a_pod_of_a_shape_no_api_server_sends_is_admitted_unchanged_with_a_warning_naming_the_field(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    pod["spec"]["containers"] = {"train": pod["spec"]["containers"][0]}  # not a list: no API server sends this

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == ["stepcache: spec.containers must be a list of objects; the pod runs uncached"]


# --- bodies that are not what the API server sends -------------------------------------------------------------------


def envelope(request: Any) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def edited_request(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    request = harness.admission_request(load_pod())
    edit(request)
    return envelope(request)


def json_body(value: Any) -> bytes:
    return json.dumps(value).encode()


MALFORMED: dict[str, bytes] = {
    "a list": b"[1]",
    "a string": b'"review"',
    "no request": json_body({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
    "another kind": json_body({**envelope(harness.admission_request(load_pod())), "kind": "Pod"}),
    "a request that is a string": json_body(envelope("x")),
    "no resource": json_body(edited_request(lambda r: r.pop("resource"))),
    "a resource that is a string": json_body(edited_request(lambda r: r.update(resource="pods"))),
    "a uid that is a number": json_body(edited_request(lambda r: r.update(uid=5))),
    "no user info": json_body(edited_request(lambda r: r.pop("userInfo"))),
    "an operation that is a list": json_body(edited_request(lambda r: r.update(operation=["CREATE"]))),
    "an object that is a list": json_body(edited_request(lambda r: r.update(object=[1]))),
    "neither object nor old object": json_body(edited_request(lambda r: r.update(object=None))),
    "dryRun that is a string": json_body(edited_request(lambda r: r.update(dryRun="yes"))),
    "nesting deeper than Python's recursion": b"[" * 100_000 + b"]" * 100_000,
    "NaN": json_body(envelope(harness.admission_request(load_pod()))).replace(b'"CREATE"', b"NaN"),
    "not UTF-8": b'{"apiVersion": "\xff"}',
    "a lone surrogate": json_body(edited_request(lambda r: r["object"]["metadata"].update(name="\ud800"))),
    "a number too long for Python's int": b'{"a": ' + b"1" * 5000 + b"}",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=list(MALFORMED))
async def test_a_body_that_is_not_an_admission_review_is_a_bad_request_and_serving_goes_on(
    operator: harness.Operator, client: aiohttp.ClientSession, body: bytes
) -> None:
    headers = {"Content-Type": "application/json"}
    async with client.post(operator.webhook_url, data=body, headers=headers) as answer:
        assert answer.status == 400, await answer.text()
        assert (await answer.text()).startswith(("not an AdmissionReview: ", "the body is not"))

    pod = load_pod()
    response = await harness.review(client, operator, harness.admission_request(pod))
    assert_signed_miss(pod, harness.patched(pod, response))


def update(request: dict[str, Any]) -> None:
    request.update(operation="UPDATE", oldObject=copy.deepcopy(request["object"]))


def delete(request: dict[str, Any]) -> None:
    request.update(operation="DELETE", oldObject=request["object"], object=None)


def configmap(request: dict[str, Any]) -> None:
    request.update(resource={"group": "", "version": "v1", "resource": "configmaps"})


def binding(request: dict[str, Any]) -> None:
    request.update(subResource="binding")


@pytest.mark.parametrize(
    ("edit", "warning"),
    [
        (update, "only pod CREATE is handled, not UPDATE"),
        (delete, "only pod CREATE is handled, not DELETE"),
        (configmap, "only pods are handled, not configmaps"),
        (binding, "only pods are handled, not pods/binding"),
    ],
    ids=["update", "delete", "configmap", "subresource"],
)
async def test_a_review_that_is_not_a_pod_create_is_allowed_unchanged_with_a_warning(
    operator: harness.Operator, client: aiohttp.ClientSession, edit: Callable[[dict[str, Any]], None], warning: str
) -> None:
    pod = load_pod()
    pod["metadata"]["labels"][mutation.HIT] = "true"  # not even this is touched: stepcache does not act here
    request = harness.admission_request(pod)
    edit(request)

    response = await harness.review(client, operator, request)

    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == [f"stepcache: {warning}; admitted unchanged"]


@pytest.mark.parametrize(
    ("metadata", "warning"),
    [
        ("x", "metadata must be an object"),
        (["a"], "metadata must be an object"),
        (None, "metadata must be an object"),
        ({"name": "a", "uid": [None]}, "metadata.uid must be a string"),
        ({"name": {"a": 1}}, "metadata.name must be a string"),
    ],
)
async def test_a_pod_whose_metadata_kopf_cannot_read_is_allowed_with_a_warning_naming_the_field(
    operator: harness.Operator, client: aiohttp.ClientSession, metadata: Any, warning: str
) -> None:
    request = harness.admission_request(load_pod())
    request["object"]["metadata"] = metadata

    response = await harness.review(client, operator, request)

    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == [f"stepcache: {warning}; the pod runs uncached"]


async def test_a_pod_of_the_wrong_shape_still_loses_the_stepcache_names_its_author_wrote(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    pod["metadata"]["uid"] = ["not", "a", "string"]
    pod["metadata"]["labels"][mutation.HIT] = "true"

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert harness.patched(pod, response) == without_stepcache_names(pod)
    assert response["warnings"] == ["stepcache: metadata.uid must be a string; the pod runs uncached"]


async def test_a_pod_over_aiohttps_default_1_mib_is_keyed(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    pod["metadata"]["annotations"]["example.com/notes"] = "n" * (3 * 1024 * 1024 - 100_000)
    request = harness.admission_request(pod)
    headers = {"Content-Type": "application/json"}

    # A file-like body: aiohttp warns (an error here) about sending megabytes of raw bytes at once.
    body = io.BytesIO(json_body(envelope(request)))
    async with client.post(operator.webhook_url, data=body, headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        response = (await answer.json())["response"]

    assert response["allowed"] is True
    assert_signed_miss(pod, harness.patched(pod, response))


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
    operator: harness.Operator, client: aiohttp.ClientSession
) -> None:
    pod = load_pod()
    pod["metadata"]["annotations"]["example.com/notes"] = "n" * webhook.MAX_REVIEW_BYTES
    headers = {"Content-Type": "application/json"}

    body = io.BytesIO(json_body(envelope(harness.admission_request(pod))))
    async with client.post(operator.webhook_url, data=body, headers=headers) as answer:
        assert answer.status == 413


async def test_when_kopf_itself_fails_the_pod_is_allowed_without_the_stepcache_names_its_author_wrote(
    operator: harness.Operator, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> Any:
        raise RuntimeError("a bug in kopf")

    monkeypatch.setattr(kopf_admission, "build_response", broken)
    pod = load_pod()
    pod["metadata"]["labels"][mutation.HIT] = "true"

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert harness.patched(pod, response) == without_stepcache_names(pod)
    assert response["warnings"] == ["stepcache: internal error (RuntimeError); the pod runs uncached"]


async def test_a_denial_from_kopf_itself_is_turned_into_an_allowed_pod(
    operator: harness.Operator, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_response = kopf_admission.build_response

    def denying(**kwargs: Any) -> Any:
        response = build_response(**kwargs)
        response["response"].update(allowed=False, status={"message": "kopf says no", "code": 500})
        return response

    monkeypatch.setattr(kopf_admission, "build_response", denying)
    pod = load_pod()

    response = await harness.review(client, operator, harness.admission_request(pod))

    assert response["allowed"] is True
    assert "status" not in response
    assert harness.patched(pod, response) == without_stepcache_names(pod)
