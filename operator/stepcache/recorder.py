"""Recording a Succeeded pod's outputs under its key, then labelling the pod with the entry's id.

kopf's own retries cannot fire here (its storages write nothing to pods, so nothing wakes a failed handler), so a
pod that cannot be recorded yet — database down, Argo outputs not reported yet — waits on a bounded in-process
queue with exponential backoff. A restart re-examines every Succeeded pod whose cache-id label is still empty.

A pod is recorded only when everything about it can be trusted: its key annotations carry a valid signature, the key
recomputed from the pod as it is now equals the signed one, and its container statuses show that every keyed
container ran the keyed image. A pod that fails any of these is rejected for good: its cache-id label is removed, so
it leaves the recorder's watch and is never re-examined into a record later.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import time
from collections.abc import Mapping
from typing import Any

from stepcache import (
    argo,
    artifacts,
    blobs,
    errors,
    execution,
    harvest,
    keys,
    logs,
    metrics,
    mutation,
    outputs,
    runtime,
    signing,
)

__all__ = ["Recorder"]

log = logs.get(__name__)

_ARGO_OUTPUT_ATTEMPTS = 10
"""How many times to wait for Argo's WorkflowTaskResult before giving up on a pod (outputs never guessed)."""
_REMEMBERED_DONE = 10_000
"""Uids of pods recorded or rejected lately, kept so that a redelivery is skipped (≈ 1 MB)."""
_ARTIFACT_ATTEMPTS = 10
"""How many times to try reading an unreachable artifact repository before recording the step as not replayable."""


class _RetryLater(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _GiveUp(Exception):
    """Not recordable now and not worth more retries; the pod keeps its empty cache-id (a restart looks again)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Recorded:
    entry_id: int
    row_seconds: float
    label_seconds: float
    labelled_at: float
    """When the label PATCH was answered (epoch seconds): from then on the pod shows its entry."""


@dataclasses.dataclass(slots=True, kw_only=True)
class _Pending:
    """A pod waiting for a retry: where to read it again, not a copy of it (a few hundred bytes, not kilobytes)."""

    namespace: str
    name: str
    uid: str
    attempts: int
    """Attempts made so far; the next one is number `attempts` (from 0)."""
    due: float


class Recorder:
    """Turns Succeeded, signed, unmodified pods into rows; idempotent for any number of deliveries of a pod.

    Every failure is one of three kinds: retry (database down, API errors, anything unexpected — with backoff, the
    pod re-read from the API each time), reject for good (the pod cannot be trusted: its cache-id label is removed),
    or give up (retries ran out: counted, and the pod is looked at again by the next resync).

    Memory stays bounded whatever arrives: at most `concurrency` pods are recorded at once and `max_waiting` more
    wait for a turn (kopf holds each delivered pod until its handler returns); beyond that, and for as long as the
    database is known to be down, a delivered pod is kept as a reference on the retry queue and read again when its
    turn comes. While the database is down one attempt per `probe_interval` finds out whether it is back; the others
    do not even read their pod. When it is back, every queued pod is due at once.
    """

    def __init__(
        self,
        rt: runtime.Runtime,
        *,
        max_pending: int = 10_000,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        max_unexpected_attempts: int = 5,
        concurrency: int = 16,
        max_waiting: int = 256,
        probe_interval: float = 1.0,
    ) -> None:
        self._rt = rt
        self._max_pending = max_pending
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._max_unexpected_attempts = max_unexpected_attempts
        self._max_waiting = max_waiting
        self._probe_interval = probe_interval
        self._pending: dict[str, _Pending] = {}
        self._due: list[tuple[float, str]] = []
        """A heap of (due, uid); entries whose uid is no longer pending at that time are skipped."""
        self._slots = asyncio.Semaphore(concurrency)
        self._connections = asyncio.Semaphore(max(1, rt.settings.db_pool_size // 2))
        """Row writes at once: at most half the pool, so the webhook's lookups always find a free connection."""
        self._waiting = 0
        self._wakeup = asyncio.Event()
        self._store_down = False
        self._next_probe = 0.0
        self._in_flight: set[str] = set()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()
        """Uids this process recorded or rejected lately: a later delivery of the same pod (an event that crossed the
        label, the resync) costs nothing. Bounded; a pod it forgot is simply checked again."""
        self._harvester = (
            None
            if rt.blobs is None
            else harvest.Harvester(
                blob_store=rt.blobs,
                reader=blobs.S3Reader(),
                secrets=rt.kube,
                max_bytes=rt.settings.artifact_max_bytes,
            )
        )

    @property
    def pending(self) -> int:
        """Pods waiting for a retry."""
        return len(self._pending)

    @property
    def quiet(self) -> asyncio.Event:
        """Set while no pod is being recorded or waits for a slot: other API writes hold back until then."""
        return self._quiet

    def _note_activity(self) -> None:
        if self._in_flight or self._waiting:
            self._quiet.clear()
        else:
            self._quiet.set()

    async def handle(self, pod: Mapping[str, Any]) -> None:
        """Record one delivered pod, or queue it for a retry; never raises.

        At most `concurrency` pods are recorded at once, the others wait in arrival order: with every delivered pod
        in flight at once, their requests would interleave and all of them would finish late together.
        """
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        if not _unrecorded(pod) or uid in self._done or uid in self._in_flight:
            return  # recorded already (or a hit, or not Succeeded, or being recorded): nothing to wait for
        previous = self._pending.pop(uid, None)
        attempts = previous.attempts if previous else 0
        if self._store_known_down():
            self._defer(pod, attempts=attempts, reason="store-unavailable", delay=self._delay(attempts))
            return
        if self._waiting >= self._max_waiting:
            self._defer(pod, attempts=attempts, reason="busy", delay=self._first_delay)
            return
        received = time.time()
        self._in_flight.add(uid)
        self._note_activity()
        try:
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                await self._attempt(pod, attempt=attempts, received=received)
            finally:
                self._slots.release()
        finally:
            self._in_flight.discard(uid)
            self._note_activity()

    async def resync(self) -> int:
        """One pass over every Succeeded, still unrecorded pod of the opted-in namespaces; returns how many.

        kopf re-lists only at a start or after a 410, so a pod whose retries ran out, or that a full queue turned
        away, would wait for the next restart — and be lost if the pod is deleted first. This pass catches them
        whatever went wrong, with one server-side-selected LIST (paginated). It is skipped while the database is
        known to be down and pods wait on the queue: nothing could be recorded, and their retries find out when it
        is back. With the queue empty (its pods deleted meanwhile), nothing else would: the pass goes on, and its
        first pod finds out.
        """
        if self._store_down and self._pending:
            return 0
        seen = 0
        async for pod in self._rt.kube.unrecorded_succeeded_pods():
            metadata = pod.get("metadata") or {}
            uid = metadata.get("uid")
            if metadata.get("namespace") not in self._rt.namespaces or uid in self._pending or uid in self._done:
                continue
            seen += 1
            await self.handle(pod)
        return seen

    async def run(self) -> None:
        """Retry queued pods when they are due, several at a time; runs until cancelled."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    due, uid = heapq.heappop(self._due)
                    pending = self._pending.get(uid)
                    if pending is None or pending.due != due:
                        continue  # recorded meanwhile, or rescheduled
                    del self._pending[uid]
                    await self._slots.acquire()
                    task = asyncio.create_task(self._retry(pending))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _: self._slots.release())
                timeout = None if not self._due else max(0.0, self._due[0][0] - time.monotonic())
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            for task in tasks:
                task.cancel()

    async def _retry(self, pending: _Pending) -> None:
        """Read the pod again (it may have changed, been recorded or deleted) and try once more."""
        if pending.uid in self._in_flight or pending.uid in self._done:
            return  # delivered again meanwhile: that delivery is the retry
        self._in_flight.add(pending.uid)
        self._note_activity()
        try:
            await self._retry_now(pending)
        finally:
            self._in_flight.discard(pending.uid)
            self._note_activity()

    async def _retry_now(self, pending: _Pending) -> None:
        ref = f"{pending.namespace}/{pending.name}"
        if self._store_known_down():
            # No read, no attempt: the pod waits its next turn (with backoff), as it is.
            pending.attempts += 1
            self._requeue(pending, delay=self._delay(pending.attempts))
            return
        received = time.time()
        try:
            pod = await self._rt.kube.read_pod(namespace=pending.namespace, name=pending.name)
        except Exception as exc:
            pending.attempts += 1  # backs off like any retry; the resync looks again if this one runs out
            if pending.attempts >= self._max_unexpected_attempts:
                metrics.RECORD_GIVEN_UP.labels(reason="pod-unreadable").inc()
                log.warning("record_given_up", pod=ref, reason="pod-unreadable", error=_describe(exc))
                return
            self._schedule_ref(pending, reason="pod-unreadable", delay=self._delay(pending.attempts), error=exc)
            return
        if pod is None or (pod.get("metadata") or {}).get("uid") != pending.uid:
            log.info("record_abandoned_pod_gone", pod=ref)
            return
        await self._attempt(pod, attempt=pending.attempts, received=received)

    async def _attempt(self, pod: Mapping[str, Any], *, attempt: int, received: float) -> None:
        metadata = pod.get("metadata") or {}
        ref = f"{metadata.get('namespace')}/{metadata.get('name')}"
        started_at = time.time()
        try:
            recorded = await self._record(pod, attempt=attempt)
        except _RetryLater as exc:
            self._defer(pod, attempts=attempt + 1, reason=exc.reason, delay=self._delay(attempt + 1))
            return
        except _GiveUp as exc:
            metrics.RECORD_GIVEN_UP.labels(reason=exc.reason).inc()
            log.warning("record_given_up", pod=ref, reason=exc.reason, attempt=attempt)
            return
        except Exception as exc:
            # Whatever it is (a dropped connection raises neither ApiException nor OSError), it is retried a few
            # times, then left to the resync: never silently dropped.
            log.exception("record_failed", pod=ref, error=_describe(exc), attempt=attempt)
            if attempt + 1 >= self._max_unexpected_attempts:
                metrics.RECORD_GIVEN_UP.labels(reason="unexpected-error").inc()
                return
            self._defer(pod, attempts=attempt + 1, reason="unexpected-error", delay=self._delay(attempt + 1))
            return
        self._remember_done(str(metadata.get("uid", "")))
        if recorded is not None:
            # The stages, so a slow recording can be told apart: delivery (until `received_at`), waiting for a
            # recording slot, the row, the label.
            metrics.RECORD_STAGE_SECONDS.labels(stage="wait").observe(started_at - received)
            log.info(
                "recorded",
                pod=ref,
                entry_id=recorded.entry_id,
                attempt=attempt,
                received_at=round(received, 4),
                wait_ms=round((started_at - received) * 1000, 2),
                row_ms=round(recorded.row_seconds * 1000, 2),
                label_ms=round(recorded.label_seconds * 1000, 2),
                labelled_at=round(recorded.labelled_at, 4),
            )

    def _remember_done(self, uid: str) -> None:
        self._done[uid] = None
        while len(self._done) > _REMEMBERED_DONE:
            self._done.popitem(last=False)

    def _delay(self, attempts: int) -> float:
        """Seconds before the next attempt, after `attempts` failed ones: 0.5 s doubling up to 30 s."""
        return min(self._max_delay, self._first_delay * 2.0 ** max(0, attempts - 1))

    def _store_known_down(self) -> bool:
        """True while the database is known to be down and it is not this caller's turn to find out whether it is
        back (one probe per `probe_interval`)."""
        if not self._store_down:
            return False
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + self._probe_interval
            return False
        return True

    def _store_is_down(self) -> None:
        if not self._store_down:
            log.warning("record_waiting_for_store")
        self._store_down = True
        self._next_probe = time.monotonic() + self._probe_interval

    def _store_is_up(self) -> None:
        if not self._store_down:
            return
        self._store_down = False
        # Everything that waited for the database is due now, not at the end of its backoff.
        log.info("record_store_back", pending=len(self._pending))
        now = time.monotonic()
        for pending in self._pending.values():
            pending.due = now
            heapq.heappush(self._due, (now, pending.uid))
        self._wakeup.set()

    def _defer(self, pod: Mapping[str, Any], *, attempts: int, reason: str, delay: float) -> None:
        metadata = pod.get("metadata") or {}
        pending = _Pending(
            namespace=str(metadata.get("namespace", "")),
            name=str(metadata.get("name", "")),
            uid=str(metadata.get("uid", "")),
            attempts=attempts,
            due=0.0,
        )
        self._schedule_ref(pending, reason=reason, delay=delay)

    def _schedule_ref(
        self, pending: _Pending, *, reason: str, delay: float, error: BaseException | None = None
    ) -> None:
        ref = f"{pending.namespace}/{pending.name}"
        metrics.RECORD_RETRIES.labels(reason=reason).inc()
        if not self._requeue(pending, delay=delay):
            # Turned away, not lost: the pod keeps its empty cache-id, so the next resync delivers it again.
            metrics.RECORD_GIVEN_UP.labels(reason="retry-queue-full").inc()
            log.warning("retry_queue_full", pod=ref)
            return
        log.info(
            "record_retry_scheduled",
            pod=ref,
            reason=reason,
            attempt=pending.attempts,
            delay=delay,
            error=None if error is None else _describe(error),
        )

    def _requeue(self, pending: _Pending, *, delay: float) -> bool:
        """Put the reference on the retry queue; False when the queue is full."""
        if len(self._pending) >= self._max_pending and pending.uid not in self._pending:
            return False
        pending.due = time.monotonic() + delay
        self._pending[pending.uid] = pending
        heapq.heappush(self._due, (pending.due, pending.uid))
        self._wakeup.set()
        return True

    async def _record(self, pod: Mapping[str, Any], *, attempt: int) -> _Recorded | None:
        rt = self._rt
        metadata = pod.get("metadata") or {}
        if not _unrecorded(pod):
            return None  # already recorded (or a hit, or not ours): nothing to do, nothing to report
        namespace = metadata.get("namespace", "")
        annotations = metadata.get("annotations") or {}
        key_value = annotations.get(mutation.KEY, "")
        key_containers = annotations.get(mutation.KEY_CONTAINERS, "")
        try:
            provenance = await self._provenance(pod, namespace=namespace)
        except errors.StoreUnavailable as exc:
            self._store_is_down()
            raise _RetryLater("store-unavailable") from exc
        key = _verified_key(
            rt, pod, namespace=namespace, key_value=key_value, key_containers=key_containers, provenance=provenance
        )
        if isinstance(key, str):
            await self._reject(pod, reason=key)
            return None
        not_as_keyed = execution.why_not_as_keyed(pod, key.containers)
        if not_as_keyed is not None:
            await self._reject(pod, reason=not_as_keyed)
            return None
        try:
            task_result = await self._argo_task_result(pod, attempt=attempt)
            entry = outputs.new_entry(pod, cache_key=key.value, key_material=key.material, task_result=task_result)
            harvested = None
            if self._harvester is not None:
                harvested = await self._harvester.collect(
                    pod, task_result=task_result, last_attempt=attempt + 1 >= _ARTIFACT_ATTEMPTS
                )
                entry = harvested.apply(entry) if harvested is not None else entry
            before_row = time.perf_counter()
            async with self._connections:
                entry_id = await rt.store.record(entry)
            row_seconds = time.perf_counter() - before_row
            if harvested is not None and rt.blobs is not None:
                await rt.blobs.store_locations(scope=entry.namespace, located=harvested.located(entry_id=entry_id))
        except harvest.Unavailable as exc:
            log.warning("artifacts_unavailable", pod=f"{namespace}/{metadata.get('name')}", error=str(exc))
            raise _RetryLater(exc.reason) from exc
        except errors.StoreUnavailable as exc:
            log.warning("record_store_unavailable", pod=f"{namespace}/{metadata.get('name')}", error=str(exc))
            self._store_is_down()
            raise _RetryLater("store-unavailable") from exc
        except errors.Uncacheable as exc:
            await self._reject(pod, reason="uncacheable", detail=exc.reason)
            return None
        self._store_is_up()
        metrics.RECORDED.inc()
        metrics.RECORD_STAGE_SECONDS.labels(stage="row").observe(row_seconds)
        before_label = time.perf_counter()
        try:
            await rt.kube.label_cache_id(
                namespace=namespace, name=metadata.get("name", ""), uid=metadata.get("uid", ""), entry_id=entry_id
            )
        except Exception as exc:
            # The row exists; the label is retried so the pod stops being delivered as unrecorded.
            log.warning("label_failed", pod=f"{namespace}/{metadata.get('name')}", error=_describe(exc))
            raise _RetryLater("label-failed") from exc
        label_seconds = time.perf_counter() - before_label
        metrics.RECORD_STAGE_SECONDS.labels(stage="label").observe(label_seconds)
        if rt.mirror is not None:
            # After the label, in the background: the object is a view, and its three API writes would otherwise
            # hold up the label of every pod behind this one. A crash before it runs is repaired by the reconcile.
            rt.mirror.recorded_later(pod, entry_id=entry_id)
        return _Recorded(
            entry_id=entry_id, row_seconds=row_seconds, label_seconds=label_seconds, labelled_at=time.time()
        )

    async def _reject(self, pod: Mapping[str, Any], *, reason: str, detail: str | None = None) -> None:
        """Reject the pod for good: count it, say why, and take it out of the watch by removing its cache-id label."""
        metadata = pod.get("metadata") or {}
        namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
        metrics.RECORD_REJECTED.labels(reason=reason).inc()
        log.warning("record_rejected", pod=f"{namespace}/{name}", reason=reason, detail=detail)
        try:
            await self._rt.kube.clear_cache_id(namespace=namespace, name=name, uid=metadata.get("uid", ""))
        except Exception as exc:
            # Still labelled: rejected again on the next delivery, which costs a check and writes nothing.
            log.warning("unlabel_failed", pod=f"{namespace}/{name}", error=_describe(exc))
            raise _RetryLater("unlabel-failed") from exc

    async def _provenance(self, pod: Mapping[str, Any], *, namespace: str) -> artifacts.Resolved:
        """What the pod's Argo input artifacts' locations hold, as known now (the webhook may have known less)."""
        rt = self._rt
        try:
            tmpl = argo.template(pod) if rt.blobs is not None and argo.is_argo(pod) else None
        except errors.Uncacheable:
            return artifacts.UNKNOWN  # the key check says why
        locations = artifacts.input_locations(tmpl) if tmpl is not None else []
        if not locations or rt.blobs is None:
            return artifacts.UNKNOWN
        scope = namespace if rt.key_options.scope == "namespace" else "*"
        return artifacts.Resolved(await rt.blobs.resolve(scope=scope, locations=locations))

    async def _argo_task_result(self, pod: Mapping[str, Any], *, attempt: int) -> dict[str, Any] | None:
        """Argo >= 3.6 reports outputs only in a WorkflowTaskResult; wait for it to be complete."""
        if not argo.is_argo(pod):
            return None
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        name = outputs.task_result_name(pod)
        result = None
        if name:
            try:
                result = await self._rt.kube.workflow_task_result(
                    namespace=(pod.get("metadata") or {}).get("namespace", ""), name=name
                )
            except Exception as exc:
                raise _RetryLater("argo-task-result-unreadable") from exc
        if result is not None and outputs.task_result_complete(result):
            if not outputs.task_result_of(result, pod):
                raise errors.Uncacheable("the WorkflowTaskResult belongs to another workflow than the pod")
            return result
        if argo.OUTPUTS_ANNOTATION in annotations:
            # Older Argo: outputs on the pod itself. The webhook removes this annotation at CREATE, so one that is
            # present now was written after admission, by Argo's `wait`.
            return None
        if attempt + 1 >= _ARGO_OUTPUT_ATTEMPTS:
            raise _GiveUp("argo-outputs-never-completed")
        raise _RetryLater("argo-outputs-pending")


def _unrecorded(pod: Mapping[str, Any]) -> bool:
    """A Succeeded pod admitted as a miss and not labelled with an entry yet: what the recorder is for."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(mutation.CACHE_ID) == "" and (pod.get("status") or {}).get("phase") == "Succeeded"


def _describe(exc: BaseException) -> str:
    """An error for a log line: its type and message (`repr` of an ApiException says neither its status nor why)."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _verified_key(
    rt: runtime.Runtime,
    pod: Mapping[str, Any],
    *,
    namespace: str,
    key_value: str,
    key_containers: str,
    provenance: artifacts.Resolved = artifacts.UNKNOWN,
) -> keys.Key | str:
    """The pod's key if its signature and the key recomputed from the pod as it is now both hold, else why not.

    A consumer of Argo artifacts admitted before its inputs' content was known was keyed by their locations: when
    that is the signed key, the key returned is the one by content (`provenance`), which later runs look up.
    """
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    signature = annotations.get(mutation.KEY_SIGNATURE)
    if not key_value or not key_containers or not signature:
        return "unsigned"
    if not signing.verify(
        rt.signing_key, namespace=namespace, key=key_value, key_containers=key_containers, signature=signature
    ):
        return "bad-signature"
    try:
        recomputed = keys.compute(
            pod,
            namespace=namespace,
            options=rt.key_options,
            containers=key_containers.split(","),
            references=rt.references,
            provenance=provenance,
        )
        if recomputed.value != key_value and provenance.known:
            by_location = keys.compute(
                pod,
                namespace=namespace,
                options=rt.key_options,
                containers=key_containers.split(","),
                references=rt.references,
            )
            if by_location.value == key_value:
                return recomputed
    except errors.Uncacheable:
        return "not-keyable"  # a key container is gone, or a referenced ConfigMap is unknown now
    if recomputed.value != key_value:
        return "key-mismatch"
    return recomputed
