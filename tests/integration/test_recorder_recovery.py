"""Nothing lost: every way the recorder can put a pod aside ends with the pod recorded, or, if it is gone, forgotten.

A pod the recorder cannot record yet waits on its retry queue; one it gave up on, or that a full queue turned away, is
found again by the resync (a LIST of Succeeded pods whose cache-id is still empty). These tests drive those paths to
their end: Argo outputs reported long after the recorder gave up, a pod deleted while it waits, a full queue, a label
write whose connection drops. Kubernetes is kmock's emulator, the database a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import asyncpg
import kubernetes_asyncio.client
import prometheus_client
import pytest
import structlog
import yaml

from stepcache import config, keys, kube, mutation, recorder, runtime, signing, store
from tests.integration import operator_harness as harness
from tests.integration import test_recorder as recorder_tests

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"  # generic only in the stubs

NAMESPACE = recorder_tests.NAMESPACE


def given_up(reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value("stepcache_record_given_up_total", {"reason": reason})
    return value or 0.0


def _load(name: str) -> dict[str, Any]:
    with (recorder_tests.FIXTURES / f"{name}.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


def succeeded_argo_pod() -> dict[str, Any]:
    """The Argo 3.6 step of argo-3.6-pod.yaml once Succeeded in the test namespace, signed exactly as admission signs.

    Its outputs are not on the pod: Argo's `wait` reports them in the WorkflowTaskResult named after the node id.
    """
    pod = _load("argo-3.6-pod")
    pod["metadata"].update(namespace=NAMESPACE, uid=str(uuid.uuid4()))
    key = keys.compute(pod, namespace=NAMESPACE, options=keys.KeyOptions(), references=recorder_tests.REFERENCES)
    containers = ",".join(key.containers)
    signed = mutation.Signed(
        key=key.value,
        key_containers=key.containers,
        signature=signing.signature(harness.SIGNING_KEY, namespace=NAMESPACE, key=key.value, key_containers=containers),
    )
    pod = mutation.apply_merge_patch(pod, mutation.miss_patch(pod, signed=signed))
    finished = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

    def at(seconds_before: int) -> str:
        return (finished - datetime.timedelta(seconds=seconds_before)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def terminated(container: Mapping[str, Any], *, started: int, ended: int) -> dict[str, Any]:
        image = container["image"]
        return {
            "name": container["name"],
            "image": image,
            "imageID": f"{image.split(':')[0]}@sha256:{'5e' * 32}",
            "ready": False,
            "restartCount": 0,
            "state": {
                "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": at(started), "finishedAt": at(ended)}
            },
        }

    pod["status"] = {
        "phase": "Succeeded",
        "startTime": at(6),
        "initContainerStatuses": [terminated(c, started=6, ended=5) for c in pod["spec"]["initContainers"]],
        "containerStatuses": [terminated(c, started=4, ended=0) for c in pod["spec"]["containers"]],
    }
    return pod


def task_result(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod's WorkflowTaskResult as Argo's `wait` first creates it: outputs written, not reported complete yet."""
    result = _load("argo-3.6-taskresult")
    result["metadata"]["namespace"] = NAMESPACE
    result["metadata"]["ownerReferences"][0]["uid"] = pod["metadata"]["uid"]
    result["metadata"]["labels"]["workflows.argoproj.io/report-outputs-completed"] = "false"
    return result


# --- fixtures ---------------------------------------------------------------------------------------------------------

cluster = recorder_tests.cluster
"""The recorder tests' emulated cluster, its namespace opted in."""
launcher = recorder_tests.launcher


@contextlib.asynccontextmanager
async def table_away(db: Connection) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Every statement on the table fails at once, as when the database is down (but faster than a timeout), until
    the block ends or `back()` is awaited."""
    away = True

    async def back() -> None:
        nonlocal away
        if away:
            await db.execute("ALTER TABLE cache_entries_away RENAME TO cache_entries")
            away = False

    await db.execute("ALTER TABLE cache_entries RENAME TO cache_entries_away")
    try:
        yield back
    finally:
        await back()


async def pending(operator: harness.Operator) -> int:
    """Pods on the running operator's retry queue."""
    rec: recorder.Recorder = operator.memo["recorder"]
    return await operator.inspect(lambda: rec.pending)


# --- Argo outputs reported late ---------------------------------------------------------------------------------------


async def test_an_argo_pod_whose_task_result_completes_after_the_recorder_gave_up_is_recorded_by_the_resync(
    launcher: harness.Launcher,
    cluster: harness.Emulator,
    cache_url: str,
    db: Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The recorder gives up after this many looks at an incomplete WorkflowTaskResult: 3 take 1.5 s of backoff, the
    # production 10 take 2 minutes. Nothing else about the path changes.
    monkeypatch.setattr(recorder, "_ARGO_OUTPUT_ATTEMPTS", 3)
    pod = succeeded_argo_pod()
    result = await harness.create(cluster, task_result(pod))
    before = given_up("argo-outputs-never-completed")

    async with launcher.run(
        cache_url, opted_in=NAMESPACE, STEPCACHE_DB_TIMEOUT_MS="5000", STEPCACHE_RESYNC_INTERVAL_SECONDS="1"
    ):
        await harness.create(cluster, pod)

        async def given_up_on_it() -> float:
            return given_up("argo-outputs-never-completed") - before

        # Given up twice: once after the watch delivered it, once more after a resync delivered it again.
        await harness.eventually(given_up_on_it, until=lambda n: n >= 2)
        assert recorder_tests.stored_pod(cluster, pod)["metadata"]["labels"][mutation.CACHE_ID] == ""
        assert await recorder_tests.rows(db) == []

        # Argo's `wait` finally reports its outputs complete; the pod itself does not change (no watch event).
        await harness.merge_patch(
            cluster, result, {"metadata": {"labels": {"workflows.argoproj.io/report-outputs-completed": "true"}}}
        )
        entry_id = await recorder_tests.recorded_id(cluster, pod)

    [row] = await recorder_tests.rows(db)
    assert row["id"] == entry_id
    assert (row["namespace"], row["cache_key"], row["source_pod"]) == (
        NAMESPACE,
        recorder_tests.expected_key(pod),
        "count-wf-4kz9q-count-2216093447",
    )
    assert json.loads(row["argo_outputs"]) == {"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"}
    assert recorder_tests.operator_writes(cluster) == [recorder_tests.label_write(pod, entry_id)]


# --- a pod deleted while it waits -------------------------------------------------------------------------------------


async def test_a_pod_deleted_while_it_waits_for_a_retry_is_abandoned_without_an_error_and_leaves_the_queue(
    launcher: harness.Launcher,
    cluster: harness.Emulator,
    cache_url: str,
    db: Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pod = recorder_tests.succeeded_pod("train-29sl4-x7k2m")
    later = recorder_tests.succeeded_pod("train-8fk2p-a9d3c", version="2")
    gave_up_before = {reason: given_up(reason) for reason in ("pod-unreadable", "unexpected-error")}

    with structlog.testing.capture_logs() as logged:
        async with recorder_tests.running(launcher, cache_url) as operator, table_away(db) as back:
            await harness.create(cluster, pod)
            await harness.eventually(lambda: pending(operator), until=lambda n: n == 1)  # its row write failed

            await harness.delete(cluster, pod)
            assert await harness.eventually(lambda: pending(operator), until=lambda n: n == 0) == 0

            # The database is back: a later pod is recorded, the deleted one is not.
            await back()
            await harness.create(cluster, later)
            later_id = await recorder_tests.recorded_id(cluster, later)

    assert [(row["id"], row["source_pod"]) for row in await recorder_tests.rows(db)] == [
        (later_id, "train-8fk2p-a9d3c")
    ]
    assert recorder_tests.operator_writes(cluster) == [recorder_tests.label_write(later, later_id)]
    ref = f"{NAMESPACE}/train-29sl4-x7k2m"
    assert {"event": "record_abandoned_pod_gone", "pod": ref, "log_level": "info"} in logged
    assert [line for line in logged if line["log_level"] in ("error", "critical") or line.get("exc_info")] == []
    # kopf logs a handler's exception through the standard library.
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert [line for line in logged if line["event"] in ("record_failed", "record_given_up")] == []
    assert {reason: given_up(reason) for reason in gave_up_before} == gave_up_before


# --- a full retry queue -----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def recorder_on(
    cluster: harness.Emulator, cache: store.Store, *, max_pending: int
) -> AsyncIterator[recorder.Recorder]:
    """A recorder as the operator runs one (retries running, the API client of `stepcache.kube`), with a small queue."""
    configuration = kubernetes_asyncio.client.Configuration(host=str(cluster.url))
    kube_api = kube.Kube(kubernetes_asyncio.client.ApiClient(configuration))
    namespaces = runtime.OptedInNamespaces()
    namespaces.add(NAMESPACE)
    rt = runtime.Runtime(
        settings=config.Settings(database_url="postgresql://unused"),
        store=cache,
        kube=kube_api,
        signing_key=harness.SIGNING_KEY,
        namespaces=namespaces,
        key_options=keys.KeyOptions(),
        replay_options=mutation.ReplayOptions(cache_image="busybox:1.36.1"),
        references=recorder_tests.REFERENCES,
    )
    rec = recorder.Recorder(rt, max_pending=max_pending)
    retrying = asyncio.create_task(rec.run())
    try:
        yield rec
    finally:
        retrying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retrying
        await kube_api.close()


async def test_a_pod_a_full_retry_queue_turned_away_is_recorded_by_the_resync(
    cluster: harness.Emulator, cache: store.Store, db: Connection
) -> None:
    first = await harness.create(cluster, recorder_tests.succeeded_pod("train-29sl4-x7k2m"))
    second = await harness.create(cluster, recorder_tests.succeeded_pod("train-8fk2p-a9d3c", version="2"))
    turned_away = given_up("retry-queue-full")

    async with recorder_on(cluster, cache, max_pending=1) as rec:
        async with table_away(db):
            await rec.handle(first)  # as the watch delivers it: waits on the queue
            await rec.handle(second)  # the queue is full
            assert rec.pending == 1
            assert given_up("retry-queue-full") - turned_away == 1
        first_id = await recorder_tests.recorded_id(cluster, first)  # its retry, the database back
        assert recorder_tests.stored_pod(cluster, second)["metadata"]["labels"][mutation.CACHE_ID] == ""

        assert await rec.resync() == 1
        second_id = await recorder_tests.recorded_id(cluster, second)

    assert [(row["id"], row["source_pod"]) for row in await recorder_tests.rows(db)] == [
        (first_id, "train-29sl4-x7k2m"),
        (second_id, "train-8fk2p-a9d3c"),
    ]


async def test_a_pod_a_full_queue_turned_away_is_recorded_by_the_resync_even_if_every_queued_pod_was_deleted(
    cluster: harness.Emulator, cache: store.Store, db: Connection
) -> None:
    # Nothing is left on the queue to find out that the database is back: the resync must not wait for it.
    first = await harness.create(cluster, recorder_tests.succeeded_pod("train-29sl4-x7k2m"))
    second = await harness.create(cluster, recorder_tests.succeeded_pod("train-8fk2p-a9d3c", version="2"))

    async with recorder_on(cluster, cache, max_pending=1) as rec:
        async with table_away(db):
            await rec.handle(first)
            await rec.handle(second)  # turned away
            await harness.delete(cluster, first)

            async def queued() -> int:
                return rec.pending

            await harness.eventually(queued, until=lambda n: n == 0)  # its retry found it gone

        assert await rec.resync() == 1
        second_id = await recorder_tests.recorded_id(cluster, second)

    assert [(row["id"], row["source_pod"]) for row in await recorder_tests.rows(db)] == [
        (second_id, "train-8fk2p-a9d3c")
    ]


# --- a label write cut off --------------------------------------------------------------------------------------------


async def test_a_label_write_whose_connection_drops_is_retried_and_the_pod_gets_its_one_row_s_id(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str, db: Connection
) -> None:
    pod = recorder_tests.succeeded_pod("train-29sl4-x7k2m")
    cluster.cut_next(method="PATCH", path=harness.object_path(pod))
    before = recorder_tests.retries("label-failed")

    async with recorder_tests.running(launcher, cache_url):
        await harness.create(cluster, pod)
        entry_id = await recorder_tests.recorded_id(cluster, pod)

    assert recorder_tests.retries("label-failed") - before == 1
    [row] = await recorder_tests.rows(db)
    assert row["id"] == entry_id
    # The same write twice: the first one cut off unapplied, then the retry, with the id of the one row.
    assert recorder_tests.operator_writes(cluster) == [recorder_tests.label_write(pod, entry_id)] * 2
    assert recorder_tests.stored_pod(cluster, pod) == recorder_tests.with_cache_id(pod, entry_id)
