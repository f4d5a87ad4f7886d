"""Recording a Succeeded pod's outputs under its key, then labelling the pod with the entry's id.

kopf's own retries cannot fire here (its storages write nothing to pods, so nothing wakes a failed handler), so a
pod that cannot be recorded yet — database down, Argo outputs not reported yet — waits on a bounded in-process
queue with exponential backoff. A restart loses nothing: the re-LIST delivers every Succeeded pod whose cache-id
label is still empty.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from stepcache import argo, artifacts, blobs, errors, harvest, keys, logs, metrics, mutation, outputs, runtime, signing

__all__ = ["Recorder"]

log = logs.get(__name__)

_ARGO_OUTPUT_ATTEMPTS = 10
"""How many times to wait for Argo's WorkflowTaskResult before giving up on a pod (outputs never guessed)."""
_ARTIFACT_ATTEMPTS = 10
"""How many times to try reading an unreachable artifact repository before recording the step as not replayable."""


class _RetryLater(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(kw_only=True)
class _Pending:
    pod: dict[str, Any]
    attempt: int
    due: float


class Recorder:
    """Turns Succeeded, signed, unmodified pods into rows; idempotent for any number of deliveries of a pod."""

    def __init__(
        self,
        rt: runtime.Runtime,
        *,
        max_pending: int = 10_000,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self._rt = rt
        self._max_pending = max_pending
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._pending: dict[str, _Pending] = {}
        self._wakeup = asyncio.Event()
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

    async def handle(self, pod: Mapping[str, Any]) -> None:
        """Record one delivered pod, or queue it for a retry; never raises."""
        uid = (pod.get("metadata") or {}).get("uid", "")
        previous = self._pending.pop(uid, None)
        await self._attempt(pod, attempt=previous.attempt + 1 if previous else 0)

    async def run(self) -> None:
        """Retry queued pods when they are due; runs until cancelled."""
        while True:
            now = time.monotonic()
            due = [uid for uid, p in self._pending.items() if p.due <= now]
            for uid in due:
                pending = self._pending.pop(uid, None)
                if pending is not None:
                    await self._attempt(pending.pod, attempt=pending.attempt + 1)
            next_due = min((p.due for p in self._pending.values()), default=None)
            timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
            self._wakeup.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _attempt(self, pod: Mapping[str, Any], *, attempt: int) -> None:
        metadata = pod.get("metadata") or {}
        ref = f"{metadata.get('namespace')}/{metadata.get('name')}"
        try:
            entry_id = await self._record(pod, attempt=attempt)
        except _RetryLater as exc:
            self._schedule(pod, attempt=attempt, reason=exc.reason)
            return
        except Exception as exc:
            metrics.RECORD_REJECTED.labels(reason="internal-error").inc()
            log.exception("record_failed", pod=ref, error=repr(exc))
            return
        if entry_id is not None:
            log.info("recorded", pod=ref, entry_id=entry_id, attempt=attempt)

    def _schedule(self, pod: Mapping[str, Any], *, attempt: int, reason: str) -> None:
        metadata = pod.get("metadata") or {}
        metrics.RECORD_RETRIES.labels(reason=reason).inc()
        if len(self._pending) >= self._max_pending:
            # Dropped here, not lost: the pod keeps its empty cache-id, so the next re-LIST delivers it again.
            metrics.RECORD_REJECTED.labels(reason="retry-queue-full").inc()
            log.warning("retry_queue_full", pod=f"{metadata.get('namespace')}/{metadata.get('name')}")
            return
        delay = min(self._max_delay, self._first_delay * 2**attempt)
        # Copied only here: kopf may reuse the delivered body, and most pods never wait (7 % of the recorder's CPU
        # went to copying every delivered pod; docs/benchmarks.md).
        self._pending[metadata.get("uid", "")] = _Pending(
            pod=_slim_copy(pod), attempt=attempt, due=time.monotonic() + delay
        )
        self._wakeup.set()
        log.info(
            "record_retry_scheduled",
            pod=f"{metadata.get('namespace')}/{metadata.get('name')}",
            reason=reason,
            attempt=attempt,
            delay=delay,
        )

    async def _record(self, pod: Mapping[str, Any], *, attempt: int) -> int | None:
        rt = self._rt
        metadata = pod.get("metadata") or {}
        labels = metadata.get("labels") or {}
        if labels.get(mutation.CACHE_ID) != "" or (pod.get("status") or {}).get("phase") != "Succeeded":
            return None  # already recorded (or a hit, or not ours): nothing to do, nothing to report
        namespace = metadata.get("namespace", "")
        annotations = metadata.get("annotations") or {}
        key_value = annotations.get(mutation.KEY, "")
        key_containers = annotations.get(mutation.KEY_CONTAINERS, "")
        try:
            provenance = await self._provenance(pod, namespace=namespace)
        except errors.StoreUnavailable as exc:
            raise _RetryLater("store-unavailable") from exc
        key = _verified_key(
            rt, pod, namespace=namespace, key_value=key_value, key_containers=key_containers, provenance=provenance
        )
        if isinstance(key, str):
            metrics.RECORD_REJECTED.labels(reason=key).inc()
            log.warning("record_rejected", pod=f"{namespace}/{metadata.get('name')}", reason=key)
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
            entry_id = await rt.store.record(entry)
            if harvested is not None and rt.blobs is not None:
                await rt.blobs.store_locations(scope=entry.namespace, located=harvested.located(entry_id=entry_id))
        except harvest.Unavailable as exc:
            log.warning("artifacts_unavailable", pod=f"{namespace}/{metadata.get('name')}", error=str(exc))
            raise _RetryLater(exc.reason) from exc
        except errors.StoreUnavailable as exc:
            log.warning("record_store_unavailable", pod=f"{namespace}/{metadata.get('name')}", error=str(exc))
            raise _RetryLater("store-unavailable") from exc
        except errors.Uncacheable as exc:
            metrics.RECORD_REJECTED.labels(reason="uncacheable").inc()
            log.warning("record_rejected", pod=f"{namespace}/{metadata.get('name')}", reason=exc.reason)
            return None
        metrics.RECORDED.inc()
        if rt.mirror is not None:
            # Before the label: a crash in between replays it on the next delivery (it never raises).
            await rt.mirror.recorded(pod, entry_id=entry_id)
        try:
            await rt.kube.label_cache_id(
                namespace=namespace, name=metadata.get("name", ""), uid=metadata.get("uid", ""), entry_id=entry_id
            )
        except (ApiException, OSError) as exc:
            # The row exists; the label is retried so the pod stops being delivered as unrecorded.
            log.warning("label_failed", pod=f"{namespace}/{metadata.get('name')}", error=str(exc))
            raise _RetryLater("label-failed") from exc
        return entry_id

    async def _provenance(self, pod: Mapping[str, Any], *, namespace: str) -> artifacts.Resolved:
        """What the pod's Argo input artifacts' locations hold, as known now (the webhook may have known less)."""
        rt = self._rt
        tmpl = argo.template(pod) if rt.blobs is not None and argo.is_argo(pod) else None
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
            except (ApiException, OSError) as exc:
                raise _RetryLater("argo-task-result-unreadable") from exc
        if result is not None and outputs.task_result_complete(result):
            return result
        if argo.OUTPUTS_ANNOTATION in annotations:
            return None  # older Argo: outputs are on the pod itself
        if attempt + 1 >= _ARGO_OUTPUT_ATTEMPTS:
            raise errors.Uncacheable("Argo outputs were never reported complete")
        raise _RetryLater("argo-outputs-pending")


def _slim_copy(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What recording a pod needs, copied: everything but managedFields, often two thirds of a pod's size."""
    metadata = {k: v for k, v in (pod.get("metadata") or {}).items() if k != "managedFields"}
    return copy.deepcopy({"metadata": metadata, "spec": pod.get("spec") or {}, "status": pod.get("status") or {}})


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
    that is the signed key, the key returned is the one by content (`provenance`), which later runs will look up.
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
            provenance=provenance,
        )
        if recomputed.value != key_value and provenance.known:
            by_location = keys.compute(
                pod, namespace=namespace, options=rt.key_options, containers=key_containers.split(",")
            )
            if by_location.value == key_value:
                return recomputed
    except errors.Uncacheable:
        return "key-containers-missing"
    if recomputed.value != key_value:
        return "key-mismatch"
    return recomputed
