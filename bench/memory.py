"""Benchmark 4: the operator's memory (RSS) with many cache-managed pods.

The recorder watches pods with `stepcache.dev/cache-id=` (empty: admitted as a miss, not recorded yet) and
`status.phase=Succeeded`, so a recorded pod (its label set to the entry id) leaves the watch and kopf forgets it.
The worst case is therefore N Succeeded pods that cannot be recorded — the database is down — each held by kopf's
watch *and* by stepcache's retry queue. Measured states, RSS of `stepcache run`:
1. at rest; 2. N pods created (Pending: outside the watch); 3. N Succeeded with Postgres frozen (SIGSTOP): all
watched and queued; 4. Postgres back, all recorded: the steady state; 5. after a restart with the N recorded pods
still present (a fresh LIST finds none of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import uvloop

from bench import common, recorder, stage

__all__ = ["run"]

_SETTLE_SECONDS = 12.0
"""Longer than the operator's interval between two returns of freed memory to the system."""
_NAMESPACE = "bench-mem"


def _first_retries(log_file: pathlib.Path, offset: int) -> int:
    """Distinct pods put on the retry queue since `offset` (the operator logs each pod's first scheduling)."""
    with log_file.open("rb") as log:
        log.seek(offset)
        pods: set[str] = set()
        for line in log:
            if b"record_retry_scheduled" in line:
                with contextlib.suppress(ValueError):
                    pods.add(str(json.loads(line).get("pod")))
        return len(pods)


def run(st: stage.Stage, *, results: common.Results, pods: int) -> dict[str, Any]:

    assert st.operator is not None
    operator = st.operator
    states: list[dict[str, Any]] = []
    report: dict[str, Any] = {"pods": pods, "states": states}

    def note(name: str, **extra: Any) -> None:
        rss = common.rss_mib(stage.pid_of(operator))
        peak = common.peak_rss_mib(stage.pid_of(operator))
        states.append({"name": name, "rss_mib": rss, "peak_rss_mib": peak, **extra})
        results["memory"] = report
        common.say(f"memory: {name}: RSS {rss:.1f} MiB (peak so far {peak:.1f} MiB)")

    st.cp.apply(operator.webhook_configuration())
    recorder.prepare_namespace(st, _NAMESPACE)
    original_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {common.GENERATOR_CORE})  # the client stays off the operator's core
    try:
        return _run(st, results=results, pods=pods, report=report, note=note)
    finally:
        os.sched_setaffinity(0, original_affinity)


def _run(
    st: stage.Stage,
    *,
    results: common.Results,
    pods: int,
    report: dict[str, Any],
    note: Callable[..., None],
) -> dict[str, Any]:
    from bench import pods as pods_module

    assert st.operator is not None
    operator = st.operator
    note("at rest (after the other benchmarks)", watched=0, queued=0)

    async def create() -> list[dict[str, Any]]:
        api = pods_module.Api(st, limit=32)
        try:
            await recorder._wait_keyed(api, _NAMESPACE)
            common.say(f"memory: creating {pods:,} pods")
            return await recorder.create_pods(api, _NAMESPACE, pods, first=3_000_000)
        finally:
            await api.close()

    created = uvloop.run(create())
    note(f"{pods:,} pods created (Pending: outside the watch)", watched=0, queued=0)

    log_offset = operator.log_file.stat().st_size
    st.db.freeze()
    try:

        async def succeed_all() -> None:
            api = pods_module.Api(st, limit=32)
            try:
                common.say(f"memory: {pods:,} pods to Succeeded with Postgres frozen")

                async def succeed(pod: dict[str, Any]) -> None:
                    status = await api.patch_status(
                        _NAMESPACE, pod["metadata"]["name"], pods_module.succeeded_status(pod)
                    )
                    if status != 200:
                        raise RuntimeError(f"status PATCH failed: HTTP {status}")

                await pods_module.run_all(created, succeed, workers=16)
            finally:
                await api.close()

        uvloop.run(succeed_all())

        def all_queued() -> bool:
            return _first_retries(operator.log_file, log_offset) >= pods

        started = time.monotonic()
        common.wait_until(all_queued, 600, "the recorder to queue every pod for a retry", interval=1.0)
        report["seconds_until_all_queued"] = round(time.monotonic() - started, 1)
        note(
            f"{pods:,} Succeeded, unrecorded (Postgres frozen): watched and on the retry queue",
            watched=pods,
            queued=pods,
        )
        # The operator returns freed memory to the system every 10 s: read again once that has happened, still
        # with every pod waiting (the database stays frozen).
        time.sleep(_SETTLE_SECONDS)
        note(
            f"… the same, {_SETTLE_SECONDS:g} s later",
            watched=pods,
            queued=pods,
        )
    finally:
        st.db.thaw()

    async def unrecorded() -> int:
        api = pods_module.Api(st)
        try:
            listed = await api.list_pods(_NAMESPACE, selector="stepcache.dev/cache-id=")
            return len(listed["items"])
        finally:
            await api.close()

    started = time.monotonic()
    common.wait_until(lambda: asyncio.run(unrecorded()) == 0, 900, "every pod to be recorded", interval=2.0)
    report["seconds_to_record_after_thaw"] = round(time.monotonic() - started, 1)
    note(f"Postgres back, all {pods:,} recorded (steady state: none watched)", watched=0, queued=0)

    operator.stop()
    operator.start()
    common.pin(stage.pid_of(operator), [common.SERVER_CORE])
    note(f"after a restart, {pods:,} recorded pods present (none listed)", watched=0, queued=0)
    st.cp.kubectl("delete", "mutatingwebhookconfiguration", "stepcache", "--ignore-not-found", check=False)
    st.cp.kubectl("delete", "namespace", _NAMESPACE, "--wait=false", check=False)
    results["memory"] = report
    return report
