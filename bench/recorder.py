"""Benchmark 3: Succeeded → row and label. How long after a pod succeeds is its result reusable?

N pods are created through kube-apiserver (stepcache's webhook signs them as misses; each has its own key), then
their status is PATCHed to Succeeded at a steady rate (open loop: one PATCH every 1/rate s, whatever the
operator does) or all at once (a burst, for the recorder's capacity). For each pod: the time the PATCH was sent,
the row's `created_at` in Postgres, and the moment a watch sees its `stepcache.dev/cache-id` label set. Lags are
measured from the PATCH being sent, so they include the API server, the operator's watch and kopf's queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import uvloop
from hack.cluster import operator as operator_harness

from bench import common, pods, stage

__all__ = ["cleanup", "create_pods", "one_run", "prepare_namespace", "run"]

_TIMEOUT = 300.0


def prepare_namespace(st: stage.Stage, namespace: str) -> None:
    """An opted-in namespace holding the ConfigMap the Job pods read (`train-config`, empty).

    Keys v2 cover what a pod reads from ConfigMaps: a pod reading one the operator does not know is uncacheable,
    so without it the pods would be admitted unkeyed and never recorded. `_wait_keyed` then waits until the
    operator's view holds it."""
    st.cp.create_namespace(namespace, labels={"stepcache.dev/enabled": "true"})
    st.cp.kubectl("create", "configmap", "train-config", "--namespace", namespace)


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
    prepare_namespace(st, namespace)
    api = pods.Api(st, limit=64)
    try:
        await _wait_keyed(api, namespace)
        created = await create_pods(api, namespace, count, first=first)
        by_uid = {pod["metadata"]["uid"]: pod for pod in created}
        if any((pod["metadata"].get("labels") or {}).get("stepcache.dev/cache-id") != "" for pod in created):
            raise RuntimeError("a pod was not admitted as a miss (no empty cache-id label)")
        labelled: dict[str, float] = {}
        done = asyncio.Event()
        # Only labelled pods (`!=` with an empty value: every pod here has the label): a watch of every status
        # change of the namespace is closed by kube-apiserver as too slow under this load, losing the rest.
        labelled_selector = "stepcache.dev/cache-id!="
        listed = await api.list_pods(namespace, selector=labelled_selector)

        def saw(pod: dict[str, Any], at: float) -> None:
            uid = str((pod.get("metadata") or {}).get("uid"))
            value = ((pod.get("metadata") or {}).get("labels") or {}).get("stepcache.dev/cache-id", "")
            if uid in by_uid and value.isdigit() and uid not in labelled:
                labelled[uid] = at
                if len(labelled) == count:
                    done.set()

        async def watch() -> None:
            version = listed["metadata"]["resourceVersion"]
            while not done.is_set():
                try:
                    async for seen, event in api.watch_pods(
                        namespace, resource_version=version, selector=labelled_selector
                    ):
                        pod = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            break  # too old: list again below
                        version = (pod.get("metadata") or {}).get("resourceVersion") or version
                        saw(pod, seen)
                        if done.is_set():
                            return
                    else:
                        continue  # the server ended the watch: resume where it stopped
                except aiohttp.ClientError:
                    pass
                relisted = await api.list_pods(namespace, selector=labelled_selector)
                version = relisted["metadata"]["resourceVersion"]
                watch_restarts.append(time.time())
                for pod in relisted["items"]:
                    saw(pod, time.time())

        watch_restarts: list[float] = []

        watcher = asyncio.create_task(watch())
        if on_created is not None:
            on_created()
        sent: dict[str, float] = {}
        answered: dict[str, float] = {}
        errors: list[str] = []

        async def succeed(pod: dict[str, Any]) -> None:
            uid = pod["metadata"]["uid"]
            sent[uid] = time.time()
            status = await api.patch_status(namespace, pod["metadata"]["name"], pods.succeeded_status(pod))
            answered[uid] = time.time()
            if status != 200:
                errors.append(f"status PATCH: HTTP {status}")

        common.say(
            f"recorder: {name}: {count} pods to Succeeded "
            f"{'at ' + format(rate, 'g') + '/s' if rate else 'as fast as 16 workers go'}"
        )
        flow_before = await flow_control(api)
        cpu_pids = _cpu_pids(st)
        cpu_before = {name: common.cpu_seconds(pids) for name, pids in cpu_pids.items()}
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
        # The CacheEntry objects are written after the labels now: their CPU counts too.
        mirrored = await _wait_mirrored(api, namespace, count)
        mirrored_after = time.time() - started
        cpu = {name: common.cpu_seconds(pids) - cpu_before[name] for name, pids in cpu_pids.items()}
        flow = flow_control_since(flow_before, await flow_control(api))
        rows = await _rows(st.db.url, namespace)
    finally:
        await api.close()
    row_lags = [(rows[uid] - sent[uid]) * 1000 for uid in sent if uid in rows]
    label_lags = [(labelled[uid] - sent[uid]) * 1000 for uid in sent if uid in labelled]
    stages = _stages(st, namespace=namespace, by_uid=by_uid, sent=sent, answered=answered, labelled=labelled)
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
        "flow_control": flow,
        "cacheentries": mirrored,
        "cacheentries_after_s": round(mirrored_after, 1),
        "cpu_ms_per_pod": {name: round(seconds / count * 1000, 2) for name, seconds in cpu.items()},
        "watch_relists": len(watch_restarts),
        "errors": len(errors) + (count - len(rows)),
        "error_samples": errors[:5],
    }


def _stages(
    st: stage.Stage,
    *,
    namespace: str,
    by_uid: dict[str, dict[str, Any]],
    sent: dict[str, float],
    answered: dict[str, float],
    labelled: dict[str, float],
) -> dict[str, Any]:
    """Where each pod's lag went, from the operator's `recorded` log lines.

    Stages: the status PATCH answered (kube-apiserver); PATCH sent → the recorder received the pod (the API server,
    the operator's watch, kopf); waiting for a recording slot; the row; the CacheEntry object and Event when they
    were written before the label (operators before they moved off the pod's path); the label PATCH; and label
    written → seen by this client's watch. Both log formats are read, so a baseline operator can be compared.
    """
    assert st.operator is not None
    uid_by_ref = {f"{namespace}/{pod['metadata']['name']}": uid for uid, pod in by_uid.items()}
    stages: dict[str, list[float]] = {
        name: []
        for name in (
            "patch_answered",
            "sent_to_handler",
            "wait",
            "row",
            "mirror",
            "label",
            "label_to_seen",
            "succeeded_to_labelled",
        )
    }
    for line in st.operator.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        uid = uid_by_ref.get(str(record.get("pod", "")))
        if record.get("event") != "recorded" or uid is None or uid not in sent:
            continue
        received = float(record.get("received_at", record.get("handler_started_at", 0.0)))
        spent = sum(float(record.get(field, 0.0)) for field in ("wait_ms", "row_ms", "mirror_ms", "label_ms"))
        if uid in answered:
            stages["patch_answered"].append((answered[uid] - sent[uid]) * 1000)
        stages["sent_to_handler"].append((received - sent[uid]) * 1000)
        stages["wait"].append(float(record.get("wait_ms", 0.0)))
        stages["row"].append(float(record["row_ms"]))
        if "mirror_ms" in record:
            stages["mirror"].append(float(record["mirror_ms"]))
        stages["label"].append(float(record["label_ms"]))
        if uid in labelled:
            stages["label_to_seen"].append((labelled[uid] - received) * 1000 - spent)
        if uid in answered and "labelled_at" in record:
            # The recorder's lag proper: from the moment the API server holds the pod as Succeeded (its status
            # PATCH answered) to the moment the operator's label PATCH is answered.
            stages["succeeded_to_labelled"].append((float(record["labelled_at"]) - answered[uid]) * 1000)
    return {name: common.summarize(values) for name, values in stages.items() if values}


def _cpu_pids(st: stage.Stage) -> dict[str, list[int]]:
    """The processes whose CPU time a recording costs: the operator, Postgres (every backend), kube-apiserver and
    etcd; and, on the same cores, the controllers and scheduler reacting to the same pods, and this load generator."""
    assert st.operator is not None
    control_plane, controllers = [], []
    for pid in common.descendants(os.getpid()):
        with contextlib.suppress(OSError):
            name = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
            if name in ("kube-apiserver", "etcd"):
                control_plane.append(pid)
            elif name in ("kube-controller", "kube-scheduler"):  # comm is cut at 15 characters
                controllers.append(pid)
    return {
        "operator": common.descendants(stage.pid_of(st.operator)),
        "postgres": common.descendants(st.postmaster_pid),
        "apiserver+etcd": control_plane,
        "controllers+scheduler": controllers,
        "load generator": [os.getpid()],
    }


async def _wait_mirrored(api: pods.Api, namespace: str, count: int, *, within: float = 120.0) -> int:
    """Wait until the namespace holds a CacheEntry per pod (for `within` seconds at most); return how many."""
    url = f"{api.server}/apis/stepcache.dev/v1alpha1/namespaces/{namespace}/cacheentries"
    deadline = time.monotonic() + within
    while True:
        async with api.session.get(url) as response:
            found = len(json.loads(await response.read()).get("items") or [])
        if found >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def flow_control(api: pods.Api) -> dict[str, dict[str, float]]:
    """kube-apiserver's API Priority and Fairness counters, per priority level: requests that waited in its queues
    (count, total seconds) and requests it rejected (429)."""
    async with api.session.get(f"{api.server}/metrics") as response:
        text = await response.text()
    levels: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or "priority_level=" not in line:
            continue
        name, _, value = line.rpartition(" ")
        level = name.split('priority_level="', 1)[1].split('"', 1)[0]
        entry = levels.setdefault(level, {"waited": 0.0, "wait_seconds": 0.0, "rejected": 0.0})
        if name.startswith("apiserver_flowcontrol_request_wait_duration_seconds_count") and 'execute="true"' in name:
            entry["waited"] += float(value)
        elif name.startswith("apiserver_flowcontrol_request_wait_duration_seconds_sum") and 'execute="true"' in name:
            entry["wait_seconds"] += float(value)
        elif name.startswith("apiserver_flowcontrol_rejected_requests_total"):
            entry["rejected"] += float(value)
    return levels


def flow_control_since(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per priority level that served requests meanwhile: requests, mean and total queueing wait, rejections."""
    result: dict[str, Any] = {}
    for level, now in after.items():
        then = before.get(level, {})
        waited = now["waited"] - then.get("waited", 0.0)
        if waited <= 0:
            continue
        seconds = now["wait_seconds"] - then.get("wait_seconds", 0.0)
        result[level] = {
            "requests": int(waited),
            "mean_wait_ms": round(seconds / waited * 1000, 3),
            "total_wait_s": round(seconds, 3),
            "rejected": int(now["rejected"] - then.get("rejected", 0.0)),
        }
    return result


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


def run(
    st: stage.Stage, *, results: common.Results, pods: int, rate: float, baseline: pathlib.Path | None = None
) -> dict[str, Any]:
    """The steady run, then the burst; with `baseline` (a directory holding another version's `stepcache`
    package) each run is made by that operator first and then by this one, interleaved in the same invocation."""
    assert st.operator is not None
    variants: list[tuple[str, pathlib.Path | None]] = (
        [("", None)]
        if baseline is None
        else [
            ("baseline-", baseline),
            ("", None),
        ]
    )
    runs: list[dict[str, Any]] = []
    names: list[str] = []
    original_affinity = os.sched_getaffinity(0)
    try:
        for number, (kind, kind_rate) in enumerate((("steady", rate), ("burst", None))):
            for index, (prefix, source) in enumerate(variants):
                name = f"{prefix}{kind}"
                names.append(name)
                with _operator(st, source):
                    st.cp.apply(st.operator.webhook_configuration())
                    os.sched_setaffinity(0, {common.GENERATOR_CORE})  # the client stays off the operator's core
                    try:
                        first = 1_000_000 * (number + 1) + 100_000 * index
                        measured = uvloop.run(one_run(st, name=name, count=pods, rate=kind_rate, first=first))
                    finally:
                        os.sched_setaffinity(0, original_affinity)
                measured["operator"] = "baseline" if source is not None else "this tree"
                runs.append(measured)
                results["recorder"] = {"runs": runs, "baseline": str(baseline) if baseline else None}
    finally:
        st.cp.kubectl("delete", "mutatingwebhookconfiguration", "stepcache", "--ignore-not-found", check=False)
        st.cache.setdefault("recorder-namespaces", []).extend(f"bench-rec-{name}" for name in names)
    report = {"runs": runs, "baseline": str(baseline) if baseline else None}
    results["recorder"] = report
    return report


def cleanup(st: stage.Stage) -> None:
    """Delete the recorder's namespaces and wait until they are gone.

    Deleting a namespace deletes its CacheEntries, and the operator then deletes each one's row (its finalizer):
    thousands of deletions that must not overlap what is measured next (the profile, the memory benchmark)."""
    names = st.cache.pop("recorder-namespaces", [])
    for name in names:
        st.cp.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
    if names:
        common.say(f"recorder: waiting for {len(names)} namespaces (and their CacheEntries) to be deleted")
        st.cp.kubectl(
            "wait", "--for=delete", "--timeout=600s", *(f"namespace/{name}" for name in names), check=False, timeout=660
        )


@contextlib.contextmanager
def _operator(st: stage.Stage, source: pathlib.Path | None) -> Iterator[None]:
    """Make `st.operator` an operator running the `stepcache` package in `source` (None: this tree's) for a while;
    the stage's own operator is stopped meanwhile, so one recorder runs at a time."""
    if source is None:
        yield
        return
    own = st.operator
    assert own is not None
    own.stop()
    other = operator_harness.OperatorProcess(
        st.cp, database_url=st.db.url, workdir=st.work / "baseline-operator", env={"PYTHONPATH": str(source)}
    )
    try:
        other.start()
        common.pin(stage.pid_of(other), [common.SERVER_CORE])
        st.operator = other
        yield
    finally:
        st.operator = own
        other.stop()
        own.start()
        common.pin(stage.pid_of(own), [common.SERVER_CORE])
