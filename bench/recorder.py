"""Benchmark 3: Succeeded → row and label. How long after a pod succeeds is its result reusable?

N pods are created through kube-apiserver (stepcache's webhook signs them as misses; each has its own key), then
their status is PATCHed to Succeeded at a steady rate (open loop: one PATCH every 1/rate s, whatever the
operator does) or all at once (a burst, for the recorder's capacity). For each pod: the time the PATCH was sent,
the row's `created_at` in Postgres, and the moment a watch sees its `stepcache.dev/cache-id` label set. Lags are
measured from the PATCH being sent, so they include the API server, the operator's watch and kopf's queueing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import uvloop

from bench import common, pods, stage

__all__ = ["create_pods", "one_run", "run"]

_TIMEOUT = 300.0


async def create_pods(
    api: pods.Api, namespace: str, count: int, *, first: int = 0, workers: int = 16
) -> list[dict[str, Any]]:
    """Create `count` distinct Job-shaped pods; return them as created (admitted by the webhook)."""
    bodies = [json.dumps(pods.job_pod(first + i), separators=(",", ":")).encode() for i in range(count)]

    async def create(body: bytes) -> dict[str, Any]:
        status, pod = await api.create_pod(namespace, body)
        if status != 201:
            raise RuntimeError(f"pod CREATE failed: HTTP {status}: {pod.get('message')}")
        return pod

    created: list[dict[str, Any]] = await pods.run_all(bodies, create, workers=workers)
    return created


async def one_run(
    st: stage.Stage,
    *,
    name: str,
    count: int,
    rate: float | None,
    first: int,
    on_created: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Create `count` pods, then PATCH them to Succeeded (`rate` per second, or a burst) and time the recordings.

    `on_created` runs between the two (the profile starts sampling there)."""
    namespace = f"bench-rec-{name}"
    st.cp.create_namespace(namespace, labels={"stepcache.dev/enabled": "true"})
    api = pods.Api(st, limit=64)
    try:
        await _wait_keyed(api, namespace)
        created = await create_pods(api, namespace, count, first=first)
        by_uid = {pod["metadata"]["uid"]: pod for pod in created}
        if any((pod["metadata"].get("labels") or {}).get("stepcache.dev/cache-id") != "" for pod in created):
            raise RuntimeError("a pod was not admitted as a miss (no empty cache-id label)")
        listed = await api.list_pods(namespace)
        labelled: dict[str, float] = {}
        done = asyncio.Event()

        async def watch() -> None:
            async for seen, event in api.watch_pods(namespace, resource_version=listed["metadata"]["resourceVersion"]):
                pod = event.get("object") or {}
                uid = str((pod.get("metadata") or {}).get("uid"))
                value = ((pod.get("metadata") or {}).get("labels") or {}).get("stepcache.dev/cache-id", "")
                if uid in by_uid and value.isdigit() and uid not in labelled:
                    labelled[uid] = seen
                    if len(labelled) == count:
                        done.set()
                        return

        watcher = asyncio.create_task(watch())
        if on_created is not None:
            on_created()
        sent: dict[str, float] = {}
        errors: list[str] = []

        async def succeed(pod: dict[str, Any]) -> None:
            sent[pod["metadata"]["uid"]] = time.time()
            status = await api.patch_status(namespace, pod["metadata"]["name"], pods.succeeded_status(pod))
            if status != 200:
                errors.append(f"status PATCH: HTTP {status}")

        common.say(
            f"recorder: {name}: {count} pods to Succeeded "
            f"{'at ' + format(rate, 'g') + '/s' if rate else 'as fast as 16 workers go'}"
        )
        started = time.time()
        if rate:
            tasks = []
            for index, pod in enumerate(created):
                due = started + index / rate
                await asyncio.sleep(max(0.0, due - time.time()))
                tasks.append(asyncio.create_task(succeed(pod)))
            await asyncio.gather(*tasks)
        else:
            await pods.run_all(created, succeed, workers=16)
        offered = count / (max(sent.values()) - started) if count > 1 else 0.0
        try:
            await asyncio.wait_for(done.wait(), _TIMEOUT)
        except TimeoutError:
            errors.append(f"{count - len(labelled)} pods not labelled within {_TIMEOUT:g} s")
        watcher.cancel()
        rows = await _rows(st.db.url, namespace)
    finally:
        await api.close()
    row_lags = [(rows[uid] - sent[uid]) * 1000 for uid in sent if uid in rows]
    label_lags = [(labelled[uid] - sent[uid]) * 1000 for uid in sent if uid in labelled]
    stages = _stages(st, namespace=namespace, by_uid=by_uid, sent=sent, labelled=labelled)
    last = max(labelled.values()) if labelled else time.time()
    return {
        "name": name,
        "pods": count,
        "offered_rate": offered,
        "rows": len(rows),
        "labelled": len(labelled),
        "rows_per_s": len(rows) / (last - started),
        "all_recorded_s": last - started,
        "row_lag_ms": common.summarize(row_lags),
        "label_lag_ms": common.summarize(label_lags),
        "stages_ms": stages,
        "errors": len(errors) + (count - len(rows)),
        "error_samples": errors[:5],
    }


def _stages(
    st: stage.Stage,
    *,
    namespace: str,
    by_uid: dict[str, dict[str, Any]],
    sent: dict[str, float],
    labelled: dict[str, float],
) -> dict[str, Any]:
    """Where each pod's lag went, from the operator's `recorded` log lines: PATCH sent → handler started (API
    server, watch, kopf), the row, the CacheEntry object and Event, the label PATCH, and label written → seen by
    this client's watch."""
    assert st.operator is not None
    uid_by_ref = {f"{namespace}/{pod['metadata']['name']}": uid for uid, pod in by_uid.items()}
    delivery, row, mirrored, label, seen = [], [], [], [], []
    for line in st.operator.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        uid = uid_by_ref.get(str(record.get("pod", "")))
        if record.get("event") != "recorded" or uid is None or uid not in sent:
            continue
        started = float(record["handler_started_at"])
        delivery.append((started - sent[uid]) * 1000)
        spent = float(record["row_ms"]) + float(record["mirror_ms"]) + float(record["label_ms"])
        row.append(float(record["row_ms"]))
        mirrored.append(float(record["mirror_ms"]))
        label.append(float(record["label_ms"]))
        if uid in labelled:
            seen.append((labelled[uid] - started) * 1000 - spent)
    return {
        "sent_to_handler": common.summarize(delivery),
        "row": common.summarize(row),
        "mirror": common.summarize(mirrored),
        "label": common.summarize(label),
        "label_to_seen": common.summarize(seen),
    }


async def _wait_keyed(api: pods.Api, namespace: str) -> None:
    """The operator learns opted-in namespaces from a watch: dry-run a pod until the webhook keys it."""
    body = json.dumps(pods.job_pod(0)).encode()
    deadline = time.monotonic() + 60
    while True:
        _, pod = await api.create_pod(namespace, body, dry_run=True)
        if "stepcache.dev/key" in (pod.get("metadata", {}).get("annotations") or {}):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the operator never keyed pods in {namespace}")
        await asyncio.sleep(0.2)


async def _rows(dsn: str, namespace: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch(
            "SELECT source_uid, extract(epoch FROM created_at)::float8 AS at FROM cache_entries "
            "WHERE source_namespace = $1",
            namespace,
        )
    finally:
        await conn.close()
    return {record["source_uid"]: record["at"] for record in records}


def run(st: stage.Stage, *, results: common.Results, pods: int, rate: float) -> dict[str, Any]:
    assert st.operator is not None
    st.cp.apply(st.operator.webhook_configuration())
    runs = []
    original_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {common.GENERATOR_CORE})  # the client stays off the operator's core
    try:
        runs.append(uvloop.run(one_run(st, name="steady", count=pods, rate=rate, first=1_000_000)))
        results["recorder"] = {"runs": runs}
        runs.append(uvloop.run(one_run(st, name="burst", count=pods, rate=None, first=2_000_000)))
    finally:
        os.sched_setaffinity(0, original_affinity)
        st.cp.kubectl("delete", "mutatingwebhookconfiguration", "stepcache", "--ignore-not-found", check=False)
        for name in ("steady", "burst"):
            st.cp.kubectl("delete", "namespace", f"bench-rec-{name}", "--wait=false", "--ignore-not-found", check=False)
    report = {"runs": runs}
    results["recorder"] = report
    return report
