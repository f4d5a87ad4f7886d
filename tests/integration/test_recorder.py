"""The recorder through kopf: Succeeded pods delivered by list/watch from kmock, rows in a real PostgreSQL.

What matters here is what the operator does to users' pods: the only write it may ever make is the cache-id label
(no `kopf.zalando.org/*` annotation, no finalizer, no status, no Event), once per pod, across restarts. Every
request the operator sent is in kmock's log; the tests' own requests carry kmock's User-Agent and are told apart.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import operator
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeAlias, cast

import asyncpg
import kmock
import prometheus_client
import pytest
import yaml

from stepcache import config, keys, kube, mutation, outputs, recorder, references, runtime, signing, store
from tests.integration import operator_harness as harness

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"  # generic only in the stubs

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pods"
NAMESPACE = "team-a"
MESSAGE = '{"accuracy": 0.93, "model": "s3://models/train/42"}\n'
LABEL_PATH = "/metadata/labels/stepcache.dev~1cache-id"
REFERENCES = references.ReferenceView()
REFERENCES.put_configmap(NAMESPACE, "train-config", data=harness.TRAIN_CONFIG, binary_data=None)
"""What the operator's view must know of the ConfigMap job-pod.yaml reads, for these keys to be the operator's."""


def succeeded_pod(name: str, *, version: str = "") -> dict[str, Any]:
    """A Job pod as the API server holds it once it Succeeded: admitted as a miss, signed exactly as admission signs.

    The times are recent, so the operator's expiry timer (which starts with it) leaves the row alone.
    """
    pod = _load("job-pod")
    pod["metadata"].update(name=name, uid=str(uuid.uuid4()))
    if version:
        pod["metadata"]["annotations"][keys.VERSION_ANNOTATION] = version
    key = keys.compute(pod, namespace=NAMESPACE, options=keys.KeyOptions(), references=REFERENCES)
    containers = ",".join(key.containers)
    signed = mutation.Signed(
        key=key.value,
        key_containers=key.containers,
        signature=signing.signature(harness.SIGNING_KEY, namespace=NAMESPACE, key=key.value, key_containers=containers),
    )
    pod = mutation.apply_merge_patch(pod, mutation.miss_patch(pod, signed=signed))
    pod["status"] = _succeeded_status(pod, finished=datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    return pod


def _load(name: str) -> dict[str, Any]:
    with (FIXTURES / f"{name}.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


def _succeeded_status(pod: Mapping[str, Any], *, finished: datetime.datetime) -> dict[str, Any]:
    images = {c["name"]: c["image"] for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]}

    def at(seconds_before: int) -> str:
        return (finished - datetime.timedelta(seconds=seconds_before)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def terminated(name: str, *, started: int, ended: int, message: str | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {"exitCode": 0, "reason": "Completed"}
        state.update(startedAt=at(started), finishedAt=at(ended))
        if message is not None:
            state["message"] = message
        return {
            "name": name,
            "image": images[name],
            "imageID": f"{images[name].split('@')[0].split(':')[0]}@sha256:{'5e' * 32}",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": state},
        }

    return {
        "phase": "Succeeded",
        "startTime": at(2490),
        "initContainerStatuses": [terminated("fetch", started=2488, ended=2481)],
        "containerStatuses": [
            terminated("train", started=2480, ended=0, message=MESSAGE),
            terminated("report", started=2480, ended=2479, message=""),
        ],
    }


def expected_key(pod: Mapping[str, Any]) -> str:
    return str(pod["metadata"]["annotations"][mutation.KEY])


def with_cache_id(pod: Mapping[str, Any], entry_id: int) -> dict[str, Any]:
    labelled = copy.deepcopy(dict(pod))
    labelled["metadata"]["labels"][mutation.CACHE_ID] = str(entry_id)
    return labelled


def label_patch(pod: Mapping[str, Any], entry_id: int) -> list[dict[str, Any]]:
    """The one write the recorder may make: the cache-id label, guarded by the pod's uid."""
    return [
        {"op": "test", "path": "/metadata/uid", "value": pod["metadata"]["uid"]},
        {"op": "add", "path": LABEL_PATH, "value": str(entry_id)},
    ]


def operator_writes(cluster: harness.Emulator) -> list[tuple[str, str, Any]]:
    """Every non-reading request the operator sent to pods (method, path, body); the tests' own requests are left
    out, and so are the CacheEntry objects and Events that recording also writes (not on the pod)."""
    writes = []
    for request in list(cluster):
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        to_pods = "/pods" in request.url.path
        if request.method != kmock.method.GET and to_pods and not agent.startswith("kmock/"):
            writes.append((request.method.value, request.url.path, request.data))
    return writes


def stored_pod(cluster: harness.Emulator, pod: Mapping[str, Any]) -> dict[str, Any]:
    stored: dict[str, Any] = cluster.objects[harness.PODS, NAMESPACE, pod["metadata"]["name"]].raw
    return stored


def rejected(reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value("stepcache_record_rejected_total", {"reason": reason})
    return value or 0.0


# --- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[harness.Emulator]:
    async with harness.emulated_cluster() as emulated:
        await harness.create_opted_in(emulated, NAMESPACE)
        yield emulated


@pytest.fixture
def launcher(cluster: harness.Emulator, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> harness.Launcher:
    certs = harness.webhook_tls(tmp_path)
    return harness.Launcher(cluster=cluster, certs=certs, tmp_path=tmp_path, monkeypatch=monkeypatch)


def running(launcher: harness.Launcher, cache_url: str) -> Any:
    return launcher.run(cache_url, opted_in=NAMESPACE, STEPCACHE_DB_TIMEOUT_MS="5000")


async def rows(db: Connection) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM cache_entries ORDER BY id"))


async def recorded_id(cluster: harness.Emulator, pod: Mapping[str, Any]) -> int:
    """The entry id the pod gets labelled with, once it is."""

    async def label() -> str:
        return str(stored_pod(cluster, pod)["metadata"]["labels"].get(mutation.CACHE_ID) or "")

    return int(await harness.eventually(label))


def label_write(pod: Mapping[str, Any], entry_id: int) -> tuple[str, str, Any]:
    path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}"
    return ("PATCH", path, label_patch(pod, entry_id))


# --- recording -------------------------------------------------------------------------------------------------------


async def test_a_succeeded_miss_becomes_one_row_and_the_cache_id_label_is_the_only_write(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str, db: Connection
) -> None:
    pod = succeeded_pod("train-29sl4-x7k2m")

    async with running(launcher, cache_url):
        await harness.create(cluster, pod)
        entry_id = await recorded_id(cluster, pod)
    # The operator has stopped: whatever it was going to write, it has written.

    [row] = await rows(db)
    assert row["id"] == entry_id
    assert (row["namespace"], row["cache_key"]) == (NAMESPACE, expected_key(pod))
    assert json.loads(row["termination_messages"]) == {"train": MESSAGE}
    assert (row["source_namespace"], row["source_pod"], row["source_uid"]) == (
        NAMESPACE,
        "train-29sl4-x7k2m",
        pod["metadata"]["uid"],
    )
    assert row["duration_seconds"] == 2490.0
    assert operator_writes(cluster) == [label_write(pod, entry_id)]
    assert stored_pod(cluster, pod) == with_cache_id(pod, entry_id)  # no kopf annotation, finalizer or status


async def test_a_recorded_pod_seen_again_after_a_restart_is_neither_recorded_nor_written_again(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str, db: Connection
) -> None:
    pod = succeeded_pod("train-29sl4-x7k2m")
    async with running(launcher, cache_url):
        await harness.create(cluster, pod)
        entry_id = await recorded_id(cluster, pod)
    first_writes = operator_writes(cluster)

    later = succeeded_pod("train-8fk2p-a9d3c", version="2")  # another step, so another row
    async with running(launcher, cache_url):
        await harness.create(cluster, later)
        # The restarted operator listed both pods; by the time the new one is recorded, the old one was passed over.
        later_id = await recorded_id(cluster, later)

    assert [row["id"] for row in await rows(db)] == [entry_id, later_id]
    assert operator_writes(cluster) == [
        *first_writes,
        label_write(later, later_id),
    ]
    assert stored_pod(cluster, pod) == with_cache_id(pod, entry_id)


async def test_a_pod_whose_row_was_written_but_never_labelled_gets_that_row_s_id_and_no_second_row(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str, cache: store.Store, db: Connection
) -> None:
    pod = succeeded_pod("train-29sl4-x7k2m")
    # An operator that wrote the row and stopped before the label: the pod is still delivered as unrecorded.
    key = keys.compute(
        pod, namespace=NAMESPACE, options=keys.KeyOptions(), references=REFERENCES, containers=keys.key_containers(pod)
    )
    entry = outputs.new_entry(pod, cache_key=key.value, key_material=key.material, task_result=None)
    entry_id = await cache.record(entry)

    await harness.create(cluster, pod)

    async with running(launcher, cache_url):  # its first LIST delivers the pod
        assert await recorded_id(cluster, pod) == entry_id

    assert [row["id"] for row in await rows(db)] == [entry_id]
    assert operator_writes(cluster) == [label_write(pod, entry_id)]


def retries(reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value("stepcache_record_retries_total", {"reason": reason})
    return value or 0.0


def reads(cluster: harness.Emulator, pod: Mapping[str, Any]) -> int:
    """How often the operator read this one pod (GET), as a retry does before trying again."""
    path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}"
    return sum(
        1
        for request in list(cluster)
        if request.method == kmock.method.GET
        and request.url.path == path
        and not next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "").startswith("kmock/")
    )


async def test_pods_that_succeed_while_the_table_is_unreachable_are_read_again_and_recorded_once_it_is_back(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str, db: Connection
) -> None:
    first = succeeded_pod("train-29sl4-x7k2m")
    second = succeeded_pod("train-8fk2p-a9d3c", version="2")
    before = retries("store-unavailable")
    # Every statement on the table fails at once, as when the database is down (but faster than a timeout).
    await db.execute("ALTER TABLE cache_entries RENAME TO cache_entries_away")
    away = True
    try:
        async with running(launcher, cache_url):
            await harness.create(cluster, first)

            async def deferred() -> float:
                return retries("store-unavailable") - before

            await harness.eventually(deferred, until=lambda n: n >= 1)
            # Known to be down now: the next pod waits on the queue without a statement of its own.
            await harness.create(cluster, second)
            await harness.eventually(deferred, until=lambda n: n >= 2)
            await db.execute("ALTER TABLE cache_entries_away RENAME TO cache_entries")
            away = False
            first_id = await recorded_id(cluster, first)
            second_id = await recorded_id(cluster, second)
    finally:
        if away:
            await db.execute("ALTER TABLE cache_entries_away RENAME TO cache_entries")

    assert [(row["id"], row["source_pod"]) for row in await rows(db)] == sorted(
        [(first_id, "train-29sl4-x7k2m"), (second_id, "train-8fk2p-a9d3c")]
    )
    # Waiting pods were kept as references: each was read again from the API before it was recorded.
    assert reads(cluster, first) >= 1
    assert reads(cluster, second) >= 1
    by_path = operator.itemgetter(1)
    expected = [label_write(first, first_id), label_write(second, second_id)]
    assert sorted(operator_writes(cluster), key=by_path) == sorted(expected, key=by_path)


# --- refusals --------------------------------------------------------------------------------------------------------


def forge_signature(pod: dict[str, Any]) -> None:
    annotations = pod["metadata"]["annotations"]
    annotations[mutation.KEY_SIGNATURE] = signing.signature(
        b"not-the-operator-s-signing-key-at-all",
        namespace=NAMESPACE,
        key=annotations[mutation.KEY],
        key_containers=annotations[mutation.KEY_CONTAINERS],
    )


def change_image_after_admission(pod: dict[str, Any]) -> None:
    pod["spec"]["containers"][0]["image"] = "registry.example.com/ml/train:latest"


def run_another_image_then_restore_the_spec(pod: dict[str, Any]) -> None:
    # The spec is as admitted again, but the kubelet reports that the container's run used another image.
    pod["status"]["containerStatuses"][0]["image"] = "registry.example.com/ml/other:1"


def restart_a_never_restarting_container(pod: dict[str, Any]) -> None:
    pod["status"]["containerStatuses"][0]["restartCount"] = 1


def unlabel_write(pod: Mapping[str, Any]) -> tuple[str, str, Any]:
    path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}"
    body = [
        {"op": "test", "path": "/metadata/uid", "value": pod["metadata"]["uid"]},
        {"op": "remove", "path": "/metadata/labels/stepcache.dev~1cache-id"},
    ]
    return ("PATCH", path, body)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (forge_signature, "bad-signature"),
        (change_image_after_admission, "key-mismatch"),
        (run_another_image_then_restore_the_spec, "image-mismatch"),
        (restart_a_never_restarting_container, "restarted"),
    ],
    ids=["bad-signature", "recomputed-key-differs", "image-swapped-and-restored", "restarted"],
)
async def test_a_pod_that_fails_a_check_is_rejected_for_good_and_nothing_is_recorded(
    launcher: harness.Launcher,
    cluster: harness.Emulator,
    cache_url: str,
    db: Connection,
    tamper: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    pod = succeeded_pod("train-29sl4-x7k2m")
    tamper(pod)
    before = rejected(reason)

    async with running(launcher, cache_url):
        await harness.create(cluster, pod)

        async def rejections() -> float:
            return rejected(reason) - before

        assert await harness.eventually(rejections) == 1

    assert await rows(db) == []
    # The only write takes the pod out of the recorder's watch, so it is never re-examined into a record.
    assert operator_writes(cluster) == [unlabel_write(pod)]


# --- the resync ------------------------------------------------------------------------------------------------------


class _ListingKube:
    """The two API calls a resync makes: the server-side-selected LIST, and the label PATCH it leads to."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.labelled: list[tuple[str, int]] = []

    async def unrecorded_succeeded_pods(self) -> AsyncIterator[dict[str, Any]]:
        for pod in self.pods:
            yield pod

    async def label_cache_id(self, *, namespace: str, name: str, uid: str, entry_id: int) -> bool:
        self.labelled.append((name, entry_id))
        return True


async def test_the_resync_records_a_succeeded_pod_no_watch_event_delivered(cache: store.Store, db: Connection) -> None:
    # Whatever dropped it (a full retry queue, retries run out, an error of any class), the LIST finds it again.
    pod = succeeded_pod("train-29sl4-x7k2m")
    elsewhere = succeeded_pod("train-29sl4-other")
    elsewhere["metadata"]["namespace"] = "not-opted-in"
    listing = _ListingKube([pod, elsewhere])
    namespaces = runtime.OptedInNamespaces()
    namespaces.add(NAMESPACE)
    rt = runtime.Runtime(
        settings=config.Settings(database_url="postgresql://unused"),
        store=cache,
        kube=cast(kube.Kube, listing),
        signing_key=harness.SIGNING_KEY,
        namespaces=namespaces,
        key_options=keys.KeyOptions(),
        replay_options=mutation.ReplayOptions(cache_image="busybox:1.36.1"),
        references=REFERENCES,
    )

    assert await recorder.Recorder(rt).resync() == 1

    [row] = await rows(db)
    assert (row["source_pod"], row["cache_key"]) == ("train-29sl4-x7k2m", expected_key(pod))
    assert listing.labelled == [("train-29sl4-x7k2m", row["id"])]


class _GatedKube(_ListingKube):
    """Holds every label PATCH until `gate` is set, so a recording can be watched while it is in flight."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        super().__init__(pods)
        self.gate = asyncio.Event()
        self.patching = asyncio.Event()

    async def label_cache_id(self, *, namespace: str, name: str, uid: str, entry_id: int) -> bool:
        self.patching.set()
        await self.gate.wait()
        return await super().label_cache_id(namespace=namespace, name=name, uid=uid, entry_id=entry_id)


async def test_the_recorder_is_quiet_only_while_no_pod_is_being_recorded(cache: store.Store) -> None:
    # The CacheEntry writes wait for `quiet`, so that they never compete with a label on a busy API server.
    pod = succeeded_pod("train-29sl4-q1w2e")
    gated = _GatedKube([pod])
    rt = runtime.Runtime(
        settings=config.Settings(database_url="postgresql://unused"),
        store=cache,
        kube=cast(kube.Kube, gated),
        signing_key=harness.SIGNING_KEY,
        namespaces=runtime.OptedInNamespaces(),
        key_options=keys.KeyOptions(),
        replay_options=mutation.ReplayOptions(cache_image="busybox:1.36.1"),
        references=REFERENCES,
    )
    rec = recorder.Recorder(rt)
    assert rec.quiet.is_set()

    recording = asyncio.create_task(rec.handle(pod))
    await asyncio.wait_for(gated.patching.wait(), timeout=15)
    assert not rec.quiet.is_set()

    gated.gate.set()
    await asyncio.wait_for(recording, timeout=15)
    assert rec.quiet.is_set()
    assert [name for name, _ in gated.labelled] == ["train-29sl4-q1w2e"]
