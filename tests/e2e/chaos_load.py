"""The chaos test's load and its accounting: a paced stream of step pods with faults at set points, then figures.

Every pod runs one step; half of them repeat one of a few steps (so later ones are hits once the first is
recorded), the other half are each a step of their own. What a step prints is known here, independently of
stepcache, so a hit can be checked against what the step would really have printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from hack.cluster import controlplane

__all__ = ["Fault", "Figures", "Stream", "expected_output", "figures", "pod_manifest", "run_stream", "step_of"]

STEP_LABEL = "chaos.stepcache.dev/step"
CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"
KEY = "stepcache.dev/key"
REPEATED_STEPS = 8
IMAGE = "busybox:1.36.1"


def step_of(index: int) -> str:
    """Even pods repeat one of a few steps, odd pods are a step of their own."""
    return f"r{index // 2 % REPEATED_STEPS}" if index % 2 == 0 else f"d{index}"


def expected_output(step: str) -> str:
    """What the step writes as its termination message: known to the test, not read from stepcache."""
    return f"out-{step}"


def pod_manifest(index: int) -> dict[str, Any]:
    step = step_of(index)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"chaos-{index:05d}", "labels": {STEP_LABEL: step}},
        "spec": {
            "restartPolicy": "Never",
            # No token volume: one TokenRequest less per pod for the process kubelet.
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": IMAGE,
                    "command": ["sh", "-c", f"printf %s {expected_output(step)} > /dev/termination-log"],
                }
            ],
        },
    }


@dataclasses.dataclass(kw_only=True)
class Fault:
    """One fault, run (blocking, in a thread) once the stream has created `at` pods; faults run in order."""

    name: str
    at: int
    action: Callable[[], object]
    started: float | None = None
    """Seconds since the stream began."""
    ended: float | None = None
    result: object = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Created:
    name: str
    step: str
    status: int
    pod: Mapping[str, Any]
    warnings: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stream:
    created: list[Created]
    seconds: float
    """From the first CREATE sent to the last one answered."""
    faults: list[Fault]

    @property
    def rate(self) -> float:
        return len(self.created) / self.seconds if self.seconds else 0.0


async def run_stream(
    cp: controlplane.ControlPlane,
    namespace: str,
    *,
    count: int,
    rate: float,
    faults: Sequence[Fault],
    in_flight: int = 64,
) -> Stream:
    """Create `count` pods at `rate` per second (a paced, open loop) while the faults run at their points."""
    context = ssl.create_default_context(cafile=str(cp.ca_file))
    context.load_cert_chain(cp.pki_dir / "admin.crt", cp.pki_dir / "admin.key")
    loop = asyncio.get_running_loop()
    reached = {fault.name: asyncio.Event() for fault in faults}
    created: list[Created | None] = [None] * count
    slots = asyncio.Semaphore(in_flight)
    began = loop.time()

    async def inject() -> None:
        for fault in faults:
            await reached[fault.name].wait()
            fault.started = loop.time() - began
            fault.result = await asyncio.to_thread(fault.action)
            fault.ended = loop.time() - began

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=in_flight, ssl=context), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def create(index: int) -> None:
            manifest = pod_manifest(index)
            url = f"{cp.server}/api/v1/namespaces/{namespace}/pods"
            try:
                async with session.post(url, json=manifest) as response:
                    body = json.loads(await response.read())
                    warnings = tuple(response.headers.getall("Warning", ()))
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                body, warnings, status = {"message": repr(exc)}, (), 0
            finally:
                slots.release()
            created[index] = Created(
                name=manifest["metadata"]["name"], step=step_of(index), status=status, pod=body, warnings=warnings
            )

        injector = asyncio.create_task(inject())
        tasks = []
        for index in range(count):
            # Pacing of an open loop (the stream's rate), not synchronisation: nothing waits for a state here.
            await asyncio.sleep(max(0.0, began + index / rate - loop.time()))
            for fault in faults:
                if fault.at == index:
                    reached[fault.name].set()
            await slots.acquire()
            tasks.append(asyncio.create_task(create(index)))
        await asyncio.gather(*tasks)
        seconds = loop.time() - began
        await injector
    return Stream(created=[c for c in created if c is not None], seconds=seconds, faults=list(faults))


# --- the accounting -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Figures:
    """What the chaos run is judged by; each a count, with a few examples of what was counted."""

    created: int
    denied: int
    """CREATEs the API server did not answer 201 (the webhook never denies; failurePolicy is Ignore)."""
    uncached: int
    """Admitted without a key: the webhook was not reached (failurePolicy Ignore) or failed open."""
    stuck: int
    """Not Succeeded at the end (still pending or running, failed, or gone)."""
    unrecorded: int
    """Succeeded misses whose cache-id is still empty."""
    wrong_label: int
    """Succeeded misses labelled with an id that names no row, or a row under another key."""
    hits: int
    wrong_hits: int
    """Hits whose entry is under another key, holds another output than the step prints, or replayed another one."""
    duplicate_rows: int
    """Rows beyond one per key, and beyond one per repeated step."""
    wrong_rows: int
    """Rows holding an output that the step of their key does not print."""
    examples: dict[str, list[str]]

    def lines(self) -> list[str]:
        return [f"{name:>15}: {value}" for name, value in dataclasses.asdict(self).items() if name != "examples"] + [
            f"{name:>15}: e.g. {', '.join(found[:5])}" for name, found in self.examples.items() if found
        ]


def figures(
    created: Sequence[Created], pods: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> Figures:
    """Count what went wrong, from the CREATE answers, the pods as they are now and the table's rows."""
    examples: dict[str, list[str]] = {}

    def note(kind: str, what: str) -> None:
        examples.setdefault(kind, []).append(what)

    by_name = {pod["metadata"]["name"]: pod for pod in pods}
    rows_by_id = {int(row["id"]): row for row in rows}
    step_by_key: dict[str, str] = {}
    denied = uncached = stuck = unrecorded = wrong_label = hits = wrong_hits = 0
    for entry in created:
        if entry.status != 201:
            denied += 1
            note("denied", f"{entry.name} ({entry.status}: {entry.pod.get('message')})")
            continue
        pod = by_name.get(entry.name)
        if pod is None or (pod.get("status") or {}).get("phase") != "Succeeded":
            stuck += 1
            note("stuck", f"{entry.name} ({'gone' if pod is None else (pod.get('status') or {}).get('phase')})")
            continue
        labels = pod["metadata"].get("labels") or {}
        key = (pod["metadata"].get("annotations") or {}).get(KEY)
        if key is None:
            uncached += 1
            note("uncached", f"{entry.name} ({'; '.join(entry.warnings) or 'no warning: webhook not reached'})")
            continue
        step_by_key.setdefault(key, entry.step)
        value = labels.get(CACHE_ID, "")
        if labels.get(HIT) == "true":
            hits += 1
            row = rows_by_id.get(int(value)) if value.isdigit() else None
            expected = expected_output(entry.step)
            # The entry must be the pod's own key's and hold the step's output, and the replay must print it.
            if row is None or row["cache_key"] != key or row["messages"] != {"main": expected}:
                wrong_hits += 1
                note("wrong hit", f"{entry.name} served from {value!r}")
            elif _message(pod) != expected:
                wrong_hits += 1
                note("wrong hit", f"{entry.name} replayed {_message(pod)!r}")
            continue
        if value == "":
            unrecorded += 1
            note("unrecorded", entry.name)
            continue
        row = rows_by_id.get(int(value)) if value.isdigit() else None
        if row is None or row["cache_key"] != key:
            wrong_label += 1
            note("wrong label", f"{entry.name} labelled {value!r}")
    keys = [row["cache_key"] for row in rows]
    per_step: dict[str, int] = {}
    wrong_rows = 0
    for row in rows:
        step = step_by_key.get(row["cache_key"])
        if step is None or row["messages"] != {"main": expected_output(step)}:
            wrong_rows += 1
            note("wrong row", f"{row['id']} ({row['messages']})")
        if step is not None:
            per_step[step] = per_step.get(step, 0) + 1
    duplicates = (len(keys) - len(set(keys))) + sum(count - 1 for count in per_step.values() if count > 1)
    return Figures(
        created=len(created),
        denied=denied,
        uncached=uncached,
        stuck=stuck,
        unrecorded=unrecorded,
        wrong_label=wrong_label,
        hits=hits,
        wrong_hits=wrong_hits,
        duplicate_rows=duplicates,
        wrong_rows=wrong_rows,
        examples=examples,
    )


def _message(pod: Mapping[str, Any]) -> str | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == "main":
            return ((status.get("state") or {}).get("terminated") or {}).get("message")
    return None
