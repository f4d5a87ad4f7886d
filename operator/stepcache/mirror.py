"""Keeping CacheEntry objects in step with the rows, deleting rows through them, and posting stepcache's Events.

Postgres is the source of truth; objects are its view. Every write here happens off the webhook path, in background
tasks or after a recording, and every one is safe to repeat or to lose:

- a recording creates its object and posts `Recorded` on the pod after the pod is labelled, from a small
  background queue that waits while the recorder is busy (at most `_MAX_HOLD` seconds), so it never competes with
  the labels; hits are counted in memory by the webhook,
  written to the rows by the store's flusher, and copied from the rows to the objects' status every
  `status_interval` seconds — so a hot entry costs one status write per interval, never one per hit;
- a periodic reconcile lists objects, then rows, and creates what is missing, fixes what is stale and deletes
  orphans (Postgres wins), whatever fault came in between;
- deleting an object deletes its row first (the finalizer holds the object until then, retrying through database
  outages), and only rows of the object's own namespace;
- the expiry timer deletes expired rows in bounded batches, then their objects;
- `CacheHit` Events come from a watch of pods labelled `stepcache.dev/hit=true` (at admission a pod may have no name
  yet), with names derived from the pod, so two replicas or a restart post each Event once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from stepcache import cacheentry, config, entries, errors, logs, metrics, model, store

__all__ = ["Mirror"]

log = logs.get(__name__)

_CONCURRENCY = 8
"""API requests in flight at once for one pass (a reconcile after a long outage may create thousands of objects)."""
_EXPIRY_BATCH = 500
_PAGE = 500
_HIT_EVENT_WINDOW = datetime.timedelta(hours=1)
"""Hit pods older than this get no CacheHit Event: the API server keeps Events for an hour by default, so a restart
does not re-post, for every old hit pod still around, Events that were already posted and expired."""
_REMEMBERED_PODS = 50_000
_EVENT_ATTEMPTS = 8
_FIRST_DELAY = 0.5
_MAX_DELAY = 30.0
_FAILURES = (errors.StoreUnavailable, entries.ApiError, TimeoutError)
_TIMEOUT = 10.0
"""Seconds one entry may spend being shown (its object and the Recorded Event)."""
_RECORDED_BACKLOG = 10_000
"""Just-recorded entries waiting to be shown; beyond this the reconcile creates their objects (no Recorded Event)."""
_RECORDED_WORKERS = 2
"""Entries shown at once: few, so that showing them never crowds out the recorder's own label writes on a busy API
server."""
_MAX_HOLD = 30.0
"""Seconds a just-recorded entry may wait for the recorder to fall quiet before it is shown anyway."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconcileReport:
    """What one reconcile pass changed."""

    created: int = 0
    updated: int = 0
    deleted: int = 0


class Mirror:
    """One per process; its background loops run until cancelled and never raise."""

    def __init__(
        self,
        settings: config.Settings,
        *,
        store: store.Store,
        entries: entries.Entries,
        instance: str | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._entries = entries
        self._instance = instance or socket.gethostname()
        self._written: dict[int, tuple[int, datetime.datetime | None]] = {}
        self._hit_pods: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._recorded: asyncio.Queue[tuple[cacheentry.PodRef, int, float]] = asyncio.Queue(maxsize=_RECORDED_BACKLOG)
        self._recorder_quiet: asyncio.Event | None = None

    def yield_to(self, recorder_quiet: asyncio.Event) -> None:
        """Hold just-recorded entries back until `recorder_quiet` is set (no pod being recorded).

        Showing an entry costs three API writes, and two watch events back; on an API server short of CPU they
        would delay the next pods' labels, which are what makes results reusable at once. The objects are a view:
        they may come a little later (at most `_MAX_HOLD` seconds) without anyone waiting on them.
        """
        self._recorder_quiet = recorder_quiet

    # -- after a recording --

    def recorded_later(self, pod: Mapping[str, Any], *, entry_id: int) -> None:
        """Queue showing a just-recorded entry (`recorded`) for the background workers; never blocks, never raises.

        The recorder calls this once the pod is labelled, so showing the entry (three API writes) never delays the
        label. What is lost if the process stops first, or the queue is full, is the `Recorded` Event: the object
        itself is created by the next reconcile, which finds a row without one.
        """
        ref = _pod_ref(pod)
        try:
            self._recorded.put_nowait((ref, entry_id, time.monotonic()))
        except asyncio.QueueFull:
            metrics.CACHEENTRY_DEFERRED.inc()
            log.warning("cacheentry_left_to_reconcile", pod=f"{ref.namespace}/{ref.name}", entry_id=entry_id)

    async def recorded_forever(self) -> None:
        """Show queued entries, a few at a time, until cancelled."""

        async def work() -> None:
            while True:
                ref, entry_id, queued_at = await self._recorded.get()
                await self._hold(queued_at)
                await self._show_recorded(ref, entry_id=entry_id)

        workers = [asyncio.create_task(work()) for _ in range(_RECORDED_WORKERS)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _hold(self, queued_at: float) -> None:
        """Wait until the recorder is quiet, or the entry has waited `_MAX_HOLD` seconds."""
        quiet = self._recorder_quiet
        remaining = _MAX_HOLD - (time.monotonic() - queued_at)
        if quiet is None or quiet.is_set() or remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await quiet.wait()

    async def recorded(self, pod: Mapping[str, Any], *, entry_id: int) -> None:
        """Show a just-recorded entry as its object and post `Recorded` on the pod; never raises.

        Safe to repeat (the object and the Event are then found to exist). Anything that fails here is left to the
        reconcile.
        """
        await self._show_recorded(_pod_ref(pod), entry_id=entry_id)

    async def _show_recorded(self, pod: cacheentry.PodRef, *, entry_id: int) -> None:
        ref = f"{pod.namespace}/{pod.name}"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(_TIMEOUT):
                summary = await self._store.summary(entry_id)
                if summary is None:
                    return  # deleted (or replaced) in between: nothing to show
                target = await self._apply(summary)
                await self._post(
                    pod,
                    reason=cacheentry.RECORDED_REASON,
                    message=cacheentry.recorded_message(summary, object_name=target.name),
                    related=target,
                )
        except _FAILURES as exc:
            log.warning("cacheentry_not_written", pod=ref, entry_id=entry_id, error=str(exc) or type(exc).__name__)
        except Exception:
            log.exception("cacheentry_write_crashed", pod=ref, entry_id=entry_id)
        finally:
            metrics.RECORD_STAGE_SECONDS.labels(stage="mirror").observe(time.perf_counter() - started)

    async def _apply(self, summary: model.EntrySummary) -> cacheentry.ObjectRef:
        """Create the entry's object, or bring an existing one's spec up to date; then write its status."""
        obj = cacheentry.body(summary, operator_namespace=self._settings.namespace)
        target = cacheentry.ObjectRef(namespace=obj["metadata"]["namespace"], name=obj["metadata"]["name"])
        if await self._entries.create(obj):
            metrics.CACHEENTRY_WRITES.labels(operation="create").inc()
        else:
            current = await self._entries.get(target.namespace, target.name)
            if current is None or (current.get("metadata") or {}).get("deletionTimestamp"):
                return target  # gone or going: the reconcile decides from the rows
            if current.get("spec") != obj["spec"]:
                version = (current.get("metadata") or {}).get("resourceVersion")
                stale = dataclasses.replace(target, resource_version=version)
                if await self._entries.replace_spec(stale, obj["spec"]):
                    metrics.CACHEENTRY_WRITES.labels(operation="spec").inc()
        if await self._entries.patch_status(target.namespace, target.name, self._status(summary)):
            metrics.CACHEENTRY_WRITES.labels(operation="status").inc()
        return target

    # -- deletion through the object --

    async def invalidate(self, body: Mapping[str, Any]) -> None:
        """Delete the row a CacheEntry being deleted stands for; return once it is gone (or was never there).

        Waits out database outages (with backoff) instead of failing: the finalizer keeps the object until this
        returns, so a deletion is delayed, never lost. Only rows of the object's own namespace (and `*` for objects in
        the operator's namespace) are considered, and only the row with the object's key and id whose object has
        this name (so removing a stale or hand-made object never deletes a row shown by another).
        """
        metadata = body.get("metadata") or {}
        spec = body.get("spec") or {}
        namespace, name = str(metadata.get("namespace") or ""), str(metadata.get("name") or "")
        cache_key, entry_id = spec.get("key"), spec.get("entryId")
        if not isinstance(cache_key, str) or not isinstance(entry_id, int) or isinstance(entry_id, bool):
            log.warning("invalidate_without_entry", cacheentry=f"{namespace}/{name}")
            return
        namespaces = cacheentry.row_namespaces(namespace, operator_namespace=self._settings.namespace)
        delay = _FIRST_DELAY
        while True:
            try:
                deleted = await self._store.invalidate(
                    namespaces=namespaces, cache_key=cache_key, entry_id=entry_id, object_name=name
                )
            except errors.StoreUnavailable as exc:
                log.warning("invalidate_waiting", cacheentry=f"{namespace}/{name}", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)
                continue
            if deleted:
                metrics.INVALIDATED.inc()
            log.info("invalidated", cacheentry=f"{namespace}/{name}", entry_id=entry_id, row_deleted=deleted)
            return

    # -- reconcile --

    async def reconcile(self) -> ReconcileReport:
        """One pass: objects are listed first, then rows, so an object created meanwhile is never taken for an orphan
        and a row deleted meanwhile is at worst shown once more, until the next pass."""
        objects = await self._entries.list_all()
        rows = await self._all_rows()
        todo = cacheentry.plan(
            rows,
            objects,
            operator_namespace=self._settings.namespace,
            max_staleness=self._settings.max_staleness,
            unused_after=self._settings.gc_unused_after,
        )
        for row in todo.unmirrored:
            log.warning("cacheentry_name_taken", entry_id=row.id, name=cacheentry.object_name(row.step, row.cache_key))

        async def create(row: model.EntrySummary) -> bool:
            await self._apply(row)
            return True

        async def update_spec(change: cacheentry.SpecUpdate) -> bool:
            return await self._entries.replace_spec(change.target, change.spec)

        async def update_status(change: cacheentry.StatusUpdate) -> bool:
            return await self._entries.patch_status(change.target.namespace, change.target.name, change.status)

        async def delete(target: cacheentry.ObjectRef) -> bool:
            return await self._entries.delete(target)

        created = await _bounded(create(row) for row in todo.create)
        specs = await _bounded(update_spec(change) for change in todo.update_spec)
        statuses = await _bounded(update_status(change) for change in todo.update_status)
        deleted = await _bounded(delete(target) for target in todo.delete)
        metrics.CACHEENTRY_WRITES.labels(operation="create").inc(created)
        metrics.CACHEENTRY_WRITES.labels(operation="spec").inc(specs)
        metrics.CACHEENTRY_WRITES.labels(operation="status").inc(statuses)
        metrics.CACHEENTRY_WRITES.labels(operation="delete").inc(deleted)
        report = ReconcileReport(created=created, updated=specs + statuses, deleted=deleted)
        if report != ReconcileReport():
            log.info("reconciled", created=report.created, updated=report.updated, deleted=report.deleted)
        return report

    async def _all_rows(self) -> list[model.EntrySummary]:
        rows: list[model.EntrySummary] = []
        while True:
            page = await self._store.summaries(after_id=rows[-1].id if rows else 0, limit=_PAGE)
            rows.extend(page)
            if len(page) < _PAGE:
                return rows

    async def reconcile_forever(self) -> None:
        await _every(self._settings.reconcile_interval, self.reconcile, event="reconcile_failed")

    # -- hit counters → status --

    async def write_statuses(self) -> int:
        """Copy the counters of recently hit rows to their objects; each object at most once per call."""
        window = datetime.timedelta(seconds=3 * self._settings.status_interval + 5)
        rows = await self._store.recently_hit(within=window)
        written: dict[int, tuple[int, datetime.datetime | None]] = {}
        todo: list[model.EntrySummary] = []
        for row in rows:
            seen = (row.hit_count, row.last_hit_at)
            if self._written.get(row.id) == seen:
                written[row.id] = seen
            else:
                todo.append(row)

        async def write(row: model.EntrySummary) -> bool:
            name = cacheentry.object_name(row.step, row.cache_key)
            where = cacheentry.object_namespace(row.namespace, operator_namespace=self._settings.namespace)
            done = await self._entries.patch_status(where, name, self._status(row))
            if done:
                written[row.id] = (row.hit_count, row.last_hit_at)
            return done

        count = await _bounded(write(row) for row in todo)
        metrics.CACHEENTRY_WRITES.labels(operation="status").inc(count)
        # Only the window's rows are remembered: the map stays as small as the set of hot entries.
        self._written = written
        return count

    async def statuses_forever(self) -> None:
        await _every(self._settings.status_interval, self.write_statuses, event="status_write_failed")

    # -- expiry --

    async def expire(self) -> int:
        """Delete expired rows batch by batch until none is left, and each batch's objects after it."""
        selection = store.Selection(older_than=self._settings.max_staleness, unused_for=self._settings.gc_unused_after)
        total = 0
        while True:
            removed = await self._store.purge_batch(selection, limit=_EXPIRY_BATCH)
            total += len(removed)
            if removed:
                metrics.EXPIRED.inc(len(removed))
                log.info("expired", deleted=len(removed))
                await self.remove_objects(removed)
            if len(removed) < _EXPIRY_BATCH:
                return total

    async def remove_objects(self, removed: Iterable[store.Removed]) -> int:
        """Delete the objects of deleted rows; one that shows another row by now (re-recorded) is kept."""

        async def remove(row: store.Removed) -> bool:
            where = cacheentry.object_namespace(row.namespace, operator_namespace=self._settings.namespace)
            name = cacheentry.object_name(row.step, row.cache_key)
            current = await self._entries.get(where, name)
            if current is None or (current.get("spec") or {}).get("entryId") != row.id:
                return False
            version = (current.get("metadata") or {}).get("resourceVersion")
            return await self._entries.delete(
                cacheentry.ObjectRef(namespace=where, name=name, resource_version=version)
            )

        try:
            count = await _bounded(remove(row) for row in removed)
        except _FAILURES as exc:
            # The rows are gone already; the reconcile removes the objects left behind.
            log.warning("expired_objects_left", error=str(exc) or type(exc).__name__)
            return 0
        metrics.CACHEENTRY_WRITES.labels(operation="delete").inc(count)
        return count

    async def expire_forever(self) -> None:
        if self._settings.max_staleness is None and self._settings.gc_unused_after is None:
            return
        await _every(self._settings.expiry_interval, self.expire, event="expiry_failed")

    # -- CacheHit Events --

    async def hit_events_forever(self) -> None:
        """Post `CacheHit` on every served pod, from a watch of pods labelled `stepcache.dev/hit=true`."""
        queue: asyncio.Queue[tuple[cacheentry.PodRef, int, int]] = asyncio.Queue()
        workers = [asyncio.create_task(self._hit_worker(queue)) for _ in range(_CONCURRENCY)]
        delay = _FIRST_DELAY
        try:
            while True:
                try:
                    async for kind, pod in self._entries.watch_pods(label_selector=f"{cacheentry.HIT_LABEL}=true"):
                        delay = _FIRST_DELAY
                        if kind == "DELETED":
                            self._hit_pods.pop(str((pod.get("metadata") or {}).get("uid") or ""), None)
                            continue
                        found = self._new_hit(pod)
                        if found is not None:
                            queue.put_nowait((*found, 0))
                except entries.ApiError as exc:
                    log.warning("hit_watch_failed", error=str(exc), retry_in=delay)
                except Exception:
                    log.exception("hit_watch_crashed", retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _new_hit(self, pod: Mapping[str, Any]) -> tuple[cacheentry.PodRef, int] | None:
        """The pod and its entry id, the first time this process sees a recent hit pod; None otherwise."""
        found = cacheentry.served_pod(pod, now=datetime.datetime.now(datetime.UTC), window=_HIT_EVENT_WINDOW)
        if found is None or found[0].uid in self._hit_pods:
            return None
        self._remember(found[0].uid)
        return found

    def _remember(self, uid: str) -> None:
        self._hit_pods[uid] = None
        while len(self._hit_pods) > _REMEMBERED_PODS:
            self._hit_pods.popitem(last=False)

    async def _hit_worker(self, queue: asyncio.Queue[tuple[cacheentry.PodRef, int, int]]) -> None:
        while True:
            pod, entry_id, attempt = await queue.get()
            try:
                await self.post_hit(pod, entry_id=entry_id)
            except _FAILURES as exc:
                if attempt + 1 >= _EVENT_ATTEMPTS:
                    log.warning("hit_event_dropped", pod=f"{pod.namespace}/{pod.name}", error=str(exc))
                    continue
                delay = min(_MAX_DELAY, _FIRST_DELAY * 2**attempt)
                asyncio.get_running_loop().call_later(delay, queue.put_nowait, (pod, entry_id, attempt + 1))
            except Exception:
                log.exception("hit_event_crashed", pod=f"{pod.namespace}/{pod.name}")

    async def post_hit(self, pod: cacheentry.PodRef, *, entry_id: int) -> bool:
        """Post `CacheHit` on a served pod; False when it was posted already or the entry is not its namespace's."""
        summary = await self._store.summary(entry_id)
        if summary is None or summary.namespace not in (pod.namespace, cacheentry.CLUSTER_SCOPE):
            log.info("hit_event_skipped", pod=f"{pod.namespace}/{pod.name}", entry_id=entry_id)
            return False
        target = cacheentry.ObjectRef(
            namespace=cacheentry.object_namespace(summary.namespace, operator_namespace=self._settings.namespace),
            name=cacheentry.object_name(summary.step, summary.cache_key),
        )
        message = cacheentry.hit_message(summary, object_name=target.name, now=datetime.datetime.now(datetime.UTC))
        return await self._post(pod, reason=cacheentry.HIT_REASON, message=message, related=target)

    async def _post(self, pod: cacheentry.PodRef, *, reason: str, message: str, related: cacheentry.ObjectRef) -> bool:
        event = cacheentry.event(
            pod,
            reason=reason,
            message=message,
            related=related,
            now=datetime.datetime.now(datetime.UTC),
            instance=self._instance,
        )
        posted = await self._entries.create_event(event)
        if posted:
            metrics.EVENTS.labels(reason=reason).inc()
        return posted

    def _status(self, summary: model.EntrySummary) -> dict[str, Any]:
        return cacheentry.status(
            summary, max_staleness=self._settings.max_staleness, unused_after=self._settings.gc_unused_after
        )


def _pod_ref(pod: Mapping[str, Any]) -> cacheentry.PodRef:
    metadata = pod.get("metadata") or {}
    return cacheentry.PodRef(
        namespace=str(metadata.get("namespace") or ""),
        name=str(metadata.get("name") or ""),
        uid=str(metadata.get("uid") or ""),
    )


async def _bounded(calls: Iterable[Awaitable[bool]]) -> int:
    """Run the calls, at most `_CONCURRENCY` at a time; return how many returned True. The first error propagates
    once the calls in flight have finished."""
    semaphore = asyncio.Semaphore(_CONCURRENCY)

    async def one(call: Awaitable[bool]) -> bool:
        async with semaphore:
            return await call

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return sum(1 for result in results if result is True)


async def _every(interval: float, step: Callable[[], Awaitable[object]], *, event: str) -> None:
    """Run `step` now and then every `interval` seconds, logging (never raising) its failures."""
    while True:
        started = time.monotonic()
        try:
            await step()
        except _FAILURES as exc:
            log.warning(event, error=str(exc) or type(exc).__name__)
        except Exception:
            log.exception(event)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
