"""CacheEntries on a real PostgreSQL: what a row shows, purge and expiry in batches, invalidation, batched status.

The mirror's Kubernetes side is an in-memory stand-in for `entries.Entries` that records each request, so these tests
can count writes (one status write per pass however many hits) and look at the objects it would hold; the real API
server is the e2e tests' business.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeAlias

import asyncpg
import pytest
import structlog
from hack.cluster import postgres as cluster

from stepcache import cacheentry, config, entries, mirror, model, store
from tests.integration import conftest, polling

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
OPERATOR_NAMESPACE = "stepcache-system"


def key(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def ago(**delta: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(**delta)


def new_entry(**changes: Any) -> model.NewEntry:
    finished = datetime.datetime.now(datetime.UTC)
    entry = model.NewEntry(
        namespace="team-a",
        cache_key=key("step"),
        termination_messages={"main": "rows=42"},
        argo_outputs=None,
        key_material={
            "scheme": "stepcache/v2",
            "scope": "team-a",
            "salt": "",
            "version": "",
            "containers": [{"name": "main", "image": "busybox:1.36.1"}],
        },
        source_namespace="team-a",
        source_pod="train-abc12",
        source_uid=str(uuid.uuid4()),
        started_at=finished - datetime.timedelta(seconds=90),
        finished_at=finished,
        duration_seconds=90.0,
        step="Job/train",
        images=("busybox:1.36.1",),
    )
    return dataclasses.replace(entry, **changes)


async def drain(cache: store.Store, selection: store.Selection, *, limit: int) -> list[int]:
    """Purge batch by batch until a batch comes back short; return the batch sizes."""
    sizes = []
    while True:
        removed = await cache.purge_batch(selection, limit=limit)
        sizes.append(len(removed))
        if len(removed) < limit:
            return sizes


# What a row shows


async def test_a_recorded_entry_keeps_its_step_and_images_and_a_newer_result_replaces_them(cache: store.Store) -> None:
    entry_id = await cache.record(new_entry(finished_at=ago(hours=1)))
    again = await cache.record(new_entry(step="Job/train-2", images=("python:3.12",)))

    summary = await cache.summary(entry_id)
    assert again == entry_id
    assert summary is not None
    assert (summary.step, summary.images) == ("Job/train-2", ("python:3.12",))


async def test_a_summary_shows_output_sizes_and_key_fields_never_values(cache: store.Store) -> None:
    entry_id = await cache.record(
        new_entry(
            termination_messages={"main": "größe", "side": "ok"},
            argo_outputs={"parameters": {"rows": "1000", "model": "m-1"}, "result": "done!"},
            key_material={
                "scheme": "stepcache/v2",
                "scope": "team-a",
                "salt": "pepper",
                "version": "3",
                "initContainers": [{"name": "fetch", "env": [{"name": "TOKEN", "value": "s3cret"}]}],
                "containers": [{"name": "main", "env": [{"name": "PASSWORD", "value": "hunter2"}]}],
            },
        )
    )
    summary = await cache.summary(entry_id)
    assert summary is not None
    assert summary.outputs == (
        model.OutputSize(name="main", kind="terminationMessage", bytes=7),  # UTF-8 bytes, not characters
        model.OutputSize(name="side", kind="terminationMessage", bytes=2),
        model.OutputSize(name="model", kind="parameter", bytes=3),
        model.OutputSize(name="rows", kind="parameter", bytes=4),
        model.OutputSize(name="result", kind="result", bytes=5),
    )
    assert summary.key_fields == {
        "scheme": "stepcache/v2",
        "scope": "team-a",
        "version": "3",
        "salted": True,
        "containers": ["fetch", "main"],
    }
    shown = repr(cacheentry.body(summary, operator_namespace=OPERATOR_NAMESPACE))
    for secret in ("s3cret", "hunter2", "pepper", "größe", "m-1"):
        assert secret not in shown


async def test_summaries_page_through_every_row_in_id_order(cache: store.Store) -> None:
    ids = [await cache.record(new_entry(cache_key=key(f"step-{n}"))) for n in range(7)]
    first = await cache.summaries(limit=3)
    second = await cache.summaries(after_id=first[-1].id, limit=3)
    third = await cache.summaries(after_id=second[-1].id, limit=3)
    assert [s.id for s in first + second + third] == ids
    assert await cache.summaries(after_id=ids[-1], limit=3) == []


async def test_migration_0002_keeps_existing_rows_with_an_empty_step(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    [initial, *_] = store.migrations()
    cache = await store.Store.connect(database_url, timeout=conftest.TIMEOUT)
    try:
        monkeypatch.setattr(store, "migrations", lambda: [initial])
        await cache.migrate()
        conn = await asyncpg.connect(database_url)
        try:
            entry_id = await conn.fetchval(
                "INSERT INTO cache_entries (namespace, cache_key, key_material, source_namespace, source_pod,"
                " source_uid, finished_at) VALUES ('team-a', $1, '{}', 'team-a', 'p', 'u', now()) RETURNING id",
                key("before"),
            )
        finally:
            await conn.close()
        monkeypatch.undo()
        assert await cache.migrate() == [m.name for m in store.migrations()[1:]]
        summary = await cache.summary(entry_id)
    finally:
        await cache.close()
    assert summary is not None
    assert (summary.step, summary.images, summary.outputs) == ("", (), ())
    assert cacheentry.object_name(summary.step, summary.cache_key) == f"entry-{key('before')[:12]}"


# Invalidation


NAME = f"train-{key('step')[:12]}"
"""The object name of `new_entry()`'s row (step Job/train)."""


async def test_invalidate_deletes_only_the_row_with_that_key_and_id_in_the_objects_namespaces(
    cache: store.Store,
) -> None:
    mine = await cache.record(new_entry(namespace="team-a"))
    theirs = await cache.record(new_entry(namespace="team-b", source_namespace="team-b"))

    async def invalidate(cache_key: str, entry_id: int, object_name: str = NAME) -> bool:
        return await cache.invalidate(
            namespaces=("team-a",), cache_key=cache_key, entry_id=entry_id, object_name=object_name
        )

    # An object in team-a whose spec names team-b's row (a hand-made CacheEntry) deletes nothing.
    assert await invalidate(key("step"), theirs) is False
    assert await invalidate(key("other"), mine) is False
    assert await invalidate(key("step"), mine, object_name="forged") is False
    assert await invalidate(key("step"), mine) is True
    assert await invalidate(key("step"), mine) is False

    assert await cache.summary(mine) is None
    assert await cache.summary(theirs) is not None


async def test_removing_the_old_object_of_a_row_replaced_by_another_step_keeps_the_row(cache: store.Store) -> None:
    entry_id = await cache.record(new_entry(step="Job/train-a", finished_at=ago(hours=1)))
    await cache.record(new_entry(step="Job/train-b"))  # P0D or a newer result: same row, another step

    def invalidate(object_name: str) -> Awaitable[bool]:
        return cache.invalidate(
            namespaces=("team-a",), cache_key=key("step"), entry_id=entry_id, object_name=object_name
        )

    assert await invalidate(f"train-a-{key('step')[:12]}") is False
    assert await cache.summary(entry_id) is not None
    assert await invalidate(f"train-b-{key('step')[:12]}") is True


# Purge and expiry


async def test_purge_by_age_works_through_a_backlog_in_bounded_batches(cache: store.Store, db: Connection) -> None:
    for n in range(23):
        await cache.record(new_entry(cache_key=key(f"old-{n}"), finished_at=ago(days=40)))
    fresh = await cache.record(new_entry(cache_key=key("fresh")))

    selection = store.Selection(older_than=datetime.timedelta(days=30))
    assert await cache.count_selected(selection) == 23
    assert await drain(cache, selection, limit=10) == [10, 10, 3]

    assert [row["id"] for row in await db.fetch("SELECT id FROM cache_entries")] == [fresh]


async def test_purge_by_disuse_keeps_entries_hit_recently(cache: store.Store, db: Connection) -> None:
    unused = await cache.record(new_entry(cache_key=key("unused"), finished_at=ago(days=10)))
    used = await cache.record(new_entry(cache_key=key("used"), finished_at=ago(days=10)))
    recent = await cache.record(new_entry(cache_key=key("recent"), finished_at=ago(days=1)))
    await db.execute(
        "UPDATE cache_entries SET hit_count = 4, last_hit_at = now() - interval '1 day' WHERE id = $1", used
    )

    removed = await cache.purge_batch(store.Selection(unused_for=datetime.timedelta(days=7)), limit=100)

    assert [r.id for r in removed] == [unused]
    assert removed[0] == store.Removed(id=unused, namespace="team-a", cache_key=key("unused"), step="Job/train")
    assert sorted(row["id"] for row in await db.fetch("SELECT id FROM cache_entries")) == [used, recent]


async def test_purge_of_one_namespace_or_everything(cache: store.Store, db: Connection) -> None:
    await cache.record(new_entry(namespace="team-a"))
    await cache.record(new_entry(namespace="team-a", cache_key=key("two")))
    kept = await cache.record(new_entry(namespace="team-b"))

    assert await cache.purge_batch(store.Selection(), limit=100) == []  # no age and not everything: nothing
    assert await cache.count_selected(store.Selection(namespace="team-a", everything=True)) == 2
    assert len(await cache.purge_batch(store.Selection(namespace="team-a", everything=True), limit=100)) == 2
    assert [row["id"] for row in await db.fetch("SELECT id FROM cache_entries")] == [kept]


async def test_two_replicas_expiring_at_once_delete_each_row_once(cache_url: str, cache: store.Store) -> None:
    for n in range(60):
        await cache.record(new_entry(cache_key=key(f"old-{n}"), finished_at=ago(days=40)))
    other = await store.Store.connect(cache_url, timeout=conftest.TIMEOUT)
    selection = store.Selection(older_than=datetime.timedelta(days=30))

    async def expire(replica: store.Store) -> list[int]:
        ids: list[int] = []
        while True:
            removed = await replica.purge_batch(selection, limit=7)
            ids += [r.id for r in removed]
            if len(removed) < 7:
                return ids

    try:
        first, second = await asyncio.gather(expire(cache), expire(other))
    finally:
        await other.close()
    assert len(first) + len(second) == 60
    assert set(first).isdisjoint(second)


async def test_stats_count_entries_hits_compute_saved_and_bytes_per_namespace(
    cache: store.Store, db: Connection
) -> None:
    a1 = await cache.record(new_entry(duration_seconds=90.0, termination_messages={"main": "12345"}))
    await cache.record(new_entry(cache_key=key("a2"), duration_seconds=None, termination_messages={}))
    await cache.record(
        new_entry(
            namespace="team-b", argo_outputs={"parameters": {"p": "xy"}, "result": "abc"}, termination_messages={}
        )
    )
    await db.execute("UPDATE cache_entries SET hit_count = 3 WHERE id = $1", a1)

    assert await cache.stats() == [
        store.NamespaceStats(namespace="team-a", entries=2, hits=3, seconds_saved=270.0, bytes=5),
        store.NamespaceStats(namespace="team-b", entries=1, hits=0, seconds_saved=0.0, bytes=5),
    ]
    assert [s.namespace for s in await cache.stats(namespace="team-b")] == ["team-b"]


# The mirror, with the Kubernetes side in memory


class FakeEntries:
    """What `entries.Entries` does, on a dict of objects; `calls` lists each request as (operation, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.version = 0
        self.pod_events = []

    def _bump(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    async def create(self, obj: Mapping[str, Any]) -> bool:
        where = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.calls.append(("create", where[1]))
        if where in self.objects:
            return False
        stored = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": dict(obj["metadata"])}
        stored["spec"] = dict(obj["spec"])
        self._bump(stored)
        self.objects[where] = stored
        return True

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        return self.objects.get((namespace, name))

    async def replace_spec(self, target: cacheentry.ObjectRef, spec: Mapping[str, Any]) -> bool:
        self.calls.append(("spec", target.name))
        obj = self.objects.get((target.namespace, target.name))
        if obj is None or target.resource_version not in (None, obj["metadata"]["resourceVersion"]):
            return False
        obj["spec"] = dict(spec)
        self._bump(obj)
        return True

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        self.calls.append(("status", name))
        obj = self.objects.get((namespace, name))
        if obj is None:
            return False
        merged = {**obj.get("status", {}), **status}
        obj["status"] = {k: v for k, v in merged.items() if v is not None}
        self._bump(obj)
        return True

    async def delete(self, target: cacheentry.ObjectRef) -> bool:
        self.calls.append(("delete", target.name))
        obj = self.objects.get((target.namespace, target.name))
        if obj is None or target.resource_version not in (None, obj["metadata"]["resourceVersion"]):
            return False
        del self.objects[(target.namespace, target.name)]  # as if the finalizer had run at once
        return True

    async def list_all(self) -> list[dict[str, Any]]:
        self.calls.append(("list", ""))
        return [dict(obj) for obj in self.objects.values()]

    async def create_event(self, event: Mapping[str, Any]) -> bool:
        where = (event["metadata"]["namespace"], event["metadata"]["name"])
        self.calls.append(("event", where[1]))
        if where in self.events:
            return False
        self.events[where] = dict(event)
        return True

    def writes(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)

    pod_events: list[tuple[str, dict[str, Any]]]

    async def watch_pods(self, *, label_selector: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Deliver `pod_events`, then stay silent as a quiet watch does."""
        self.calls.append(("watch", label_selector))
        for event in self.pod_events:
            yield event
        await asyncio.Event().wait()


@dataclasses.dataclass
class MirrorUnderTest:
    mirror: mirror.Mirror
    fake: FakeEntries
    cache: store.Store


def make_settings(**changes: Any) -> config.Settings:
    base = config.Settings(database_url="postgresql://unused", namespace=OPERATOR_NAMESPACE, status_interval=1.0)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def mirrored(cache: store.Store) -> MirrorUnderTest:
    fake = FakeEntries()
    return MirrorUnderTest(
        mirror=mirror.Mirror(make_settings(), store=cache, entries=fake, instance="test"),  # type: ignore[arg-type]
        fake=fake,
        cache=cache,
    )


def pod_of(entry: model.NewEntry, *, name: str = "train-abc12", uid: str = "uid-1") -> dict[str, Any]:
    return {"metadata": {"namespace": entry.source_namespace, "name": name, "uid": uid}}


async def test_a_recording_creates_its_object_with_status_and_posts_one_recorded_event(
    mirrored: MirrorUnderTest,
) -> None:
    entry = new_entry()
    entry_id = await mirrored.cache.record(entry)

    await mirrored.mirror.recorded(pod_of(entry), entry_id=entry_id)
    await mirrored.mirror.recorded(pod_of(entry), entry_id=entry_id)  # a redelivery of the same pod

    name = f"train-{key('step')[:12]}"
    obj = mirrored.fake.objects[("team-a", name)]
    assert obj["spec"]["entryId"] == entry_id
    assert obj["status"]["hits"] == 0
    assert mirrored.fake.writes("create") == 2  # the second found it there
    assert [e["reason"] for e in mirrored.fake.events.values()] == ["Recorded"]


def created_at(fake: FakeEntries) -> dict[str, float]:
    """Wrap the fake's `create` to note when each object was created (monotonic seconds, by name)."""
    times: dict[str, float] = {}
    create = fake.create

    async def noting(obj: Mapping[str, Any]) -> bool:
        times.setdefault(obj["metadata"]["name"], time.monotonic())
        return await create(obj)

    fake.create = noting  # type: ignore[method-assign]
    return times


@contextlib.asynccontextmanager
async def showing(view: mirror.Mirror) -> AsyncIterator[None]:
    """The mirror's workers for just-recorded entries, running for the block."""
    workers = asyncio.create_task(view.recorded_forever())
    try:
        yield
    finally:
        workers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await workers


async def test_while_the_recorder_stays_busy_a_recorded_entry_is_shown_only_after_the_hold(
    mirrored: MirrorUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "_MAX_HOLD", 1.0)
    times = created_at(mirrored.fake)
    entry = new_entry()
    entry_id = await mirrored.cache.record(entry)
    mirrored.mirror.yield_to(asyncio.Event())  # never set: pods are being recorded all along
    async with showing(mirrored.mirror):
        queued = time.monotonic()
        mirrored.mirror.recorded_later(pod_of(entry), entry_id=entry_id)
        name = f"train-{key('step')[:12]}"
        await polling.eventually(lambda: asyncio.sleep(0, times), until=lambda t: name in t)
    assert times[name] - queued >= 1.0
    assert [e["reason"] for e in mirrored.fake.events.values()] == ["Recorded"]


async def test_a_held_entry_is_shown_as_soon_as_the_recorder_falls_quiet(mirrored: MirrorUnderTest) -> None:
    times = created_at(mirrored.fake)
    entry = new_entry()
    entry_id = await mirrored.cache.record(entry)
    quiet = asyncio.Event()
    mirrored.mirror.yield_to(quiet)
    async with showing(mirrored.mirror):
        mirrored.mirror.recorded_later(pod_of(entry), entry_id=entry_id)
        for _ in range(20):  # round trips to the database: time a worker that did not hold would use to show it
            await mirrored.cache.summary(entry_id)
        assert times == {}
        quiet.set()
        name = f"train-{key('step')[:12]}"
        # Well within the 30 s hold: shown because the recorder fell quiet.
        await polling.eventually(lambda: asyncio.sleep(0, times), until=lambda t: name in t)
    assert mirrored.fake.objects[("team-a", name)]["status"]["hits"] == 0


async def test_many_hits_cost_one_status_write_per_pass(mirrored: MirrorUnderTest, db: Connection) -> None:
    entry_id = await mirrored.cache.record(new_entry())
    await mirrored.mirror.reconcile()
    name = f"train-{key('step')[:12]}"
    before = mirrored.fake.writes("status")

    for _ in range(50):
        mirrored.cache.note_hit(entry_id)
    await polling.eventually(lambda: db.fetchval("SELECT hit_count FROM cache_entries"), until=lambda n: n == 50)
    assert await mirrored.mirror.write_statuses() == 1
    assert await mirrored.mirror.write_statuses() == 0  # nothing new: nothing written

    mirrored.cache.note_hit(entry_id)
    await polling.eventually(lambda: db.fetchval("SELECT hit_count FROM cache_entries"), until=lambda n: n == 51)
    assert await mirrored.mirror.write_statuses() == 1

    assert mirrored.fake.writes("status") - before == 2
    status = mirrored.fake.objects[("team-a", name)]["status"]
    assert (status["hits"], status["secondsSaved"], status["saved"]) == (51, 4590.0, "1h16m")


async def test_a_reconcile_recreates_missing_objects_fixes_stale_ones_and_removes_orphans(
    mirrored: MirrorUnderTest, db: Connection
) -> None:
    kept = await mirrored.cache.record(new_entry(cache_key=key("kept")))
    lost = await mirrored.cache.record(new_entry(cache_key=key("lost"), step="Job/lost"))
    gone = await mirrored.cache.record(new_entry(cache_key=key("gone"), step="Job/gone"))
    assert (await mirrored.mirror.reconcile()).created == 3

    del mirrored.fake.objects[("team-a", f"lost-{key('lost')[:12]}")]  # deleted behind the operator's back
    await db.execute("DELETE FROM cache_entries WHERE id = $1", gone)  # e.g. stepcache purge
    await db.execute("UPDATE cache_entries SET hit_count = 9 WHERE id = $1", kept)  # a status lagging behind

    report = await mirrored.mirror.reconcile()

    assert (report.created, report.updated, report.deleted) == (1, 1, 1)
    assert sorted(obj["spec"]["entryId"] for obj in mirrored.fake.objects.values()) == [kept, lost]
    assert mirrored.fake.objects[("team-a", f"train-{key('kept')[:12]}")]["status"]["hits"] == 9
    assert (await mirrored.mirror.reconcile()) == type(report)()


async def test_expiry_removes_expired_rows_and_then_their_objects(mirrored: MirrorUnderTest) -> None:
    old = await mirrored.cache.record(new_entry(cache_key=key("old"), step="Job/old", finished_at=ago(days=31)))
    young = await mirrored.cache.record(new_entry(cache_key=key("young")))
    await mirrored.mirror.reconcile()

    assert await mirrored.mirror.expire() == 1

    assert await mirrored.cache.summary(old) is None
    assert [obj["spec"]["entryId"] for obj in mirrored.fake.objects.values()] == [young]


async def test_a_hit_event_names_the_entry_and_is_posted_once(mirrored: MirrorUnderTest) -> None:
    entry_id = await mirrored.cache.record(new_entry())
    pod = cacheentry.PodRef(namespace="team-a", name="train-hit-1", uid="uid-hit")

    assert await mirrored.mirror.post_hit(pod, entry_id=entry_id) is True
    assert await mirrored.mirror.post_hit(pod, entry_id=entry_id) is False  # another replica, or a restart

    [event] = mirrored.fake.events.values()
    assert event["reason"] == "CacheHit"
    assert event["involvedObject"]["name"] == "train-hit-1"
    assert f"cache entry train-{key('step')[:12]} (id {entry_id}" in event["message"]


async def test_a_hit_pod_of_another_namespace_gets_no_event_from_this_entry(mirrored: MirrorUnderTest) -> None:
    entry_id = await mirrored.cache.record(new_entry(namespace="team-a"))
    pod = cacheentry.PodRef(namespace="team-b", name="mislabelled", uid="uid-b")
    assert await mirrored.mirror.post_hit(pod, entry_id=entry_id) is False
    assert mirrored.fake.events == {}


async def test_invalidation_waits_out_a_database_outage_and_then_deletes_the_row(
    own_postgres: cluster.TempPostgres,
) -> None:
    cache = await store.Store.connect(own_postgres.url, timeout=0.5)
    try:
        await cache.migrate()
        entry_id = await cache.record(new_entry())
        view = mirror.Mirror(make_settings(), store=cache, entries=FakeEntries(), instance="t")  # type: ignore[arg-type]
        body = {"metadata": {"namespace": "team-a", "name": NAME}, "spec": {"key": key("step"), "entryId": entry_id}}

        own_postgres.stop()
        with structlog.testing.capture_logs() as logged:
            waiting = asyncio.create_task(view.invalidate(body))

            async def attempts() -> int:
                return sum(1 for line in logged if line["event"] == "invalidate_waiting")

            await polling.eventually(attempts, until=lambda n: n >= 2)
            assert not waiting.done()  # still holding the object's finalizer
        own_postgres.start()
        async with asyncio.timeout(polling.DEADLINE + 30):
            await waiting
        assert await cache.summary(entry_id) is None
    finally:
        await cache.close()


def hit_pod(name: str, *, entry_id: int, created: datetime.datetime, hit: str = "true") -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "team-a",
            "name": name,
            "uid": f"uid-{name}",
            "creationTimestamp": cacheentry.rfc3339(created),
            "labels": {"stepcache.dev/hit": hit, "stepcache.dev/cache-id": str(entry_id)},
        }
    }


async def test_the_hit_watch_posts_cachehit_once_per_served_pod(mirrored: MirrorUnderTest) -> None:
    entry_id = await mirrored.cache.record(new_entry())
    now = datetime.datetime.now(datetime.UTC)
    mirrored.fake.pod_events = [
        ("LISTED", hit_pod("served", entry_id=entry_id, created=now)),
        ("MODIFIED", hit_pod("served", entry_id=entry_id, created=now)),  # its status changed: not posted again
        ("LISTED", hit_pod("long-ago", entry_id=entry_id, created=now - datetime.timedelta(hours=2))),
        ("ADDED", hit_pod("later", entry_id=entry_id, created=now)),
    ]
    watching = asyncio.create_task(mirrored.mirror.hit_events_forever())
    try:

        async def posted() -> set[str]:
            return {e["involvedObject"]["name"] for e in mirrored.fake.events.values()}

        assert await polling.eventually(posted, until=lambda names: {"served", "later"} <= names) == {"served", "later"}
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert ("watch", "stepcache.dev/hit=true") in mirrored.fake.calls
    assert mirrored.fake.writes("event") == 2  # one attempt per pod: the MODIFIED copy was never queued


def test_the_fake_has_every_method_the_mirror_calls() -> None:
    for name in ("create", "get", "replace_spec", "patch_status", "delete", "list_all", "create_event", "watch_pods"):
        assert callable(getattr(entries.Entries, name)), name
        assert callable(getattr(FakeEntries, name)), name


# The command line


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPCACHE_")}
    return subprocess.run(
        [sys.executable, "-m", "stepcache", *args],
        env={**env, "STEPCACHE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_stepcache_purge_dry_run_counts_then_purge_deletes_old_entries_of_one_namespace(
    cache: store.Store, cache_url: str, db: Connection
) -> None:
    await cache.record(new_entry(cache_key=key("old-a"), finished_at=ago(days=40)))
    kept_b = await cache.record(new_entry(namespace="team-b", cache_key=key("old-b"), finished_at=ago(days=40)))
    kept_young = await cache.record(new_entry(cache_key=key("young")))

    dry = cli("purge", "--namespace", "team-a", "--older-than", "P30D", "--dry-run", url=cache_url)
    assert (dry.returncode, dry.stdout) == (0, "would purge 1 entry in namespace team-a (dry run)\n"), dry.stderr
    assert await db.fetchval("SELECT count(*) FROM cache_entries") == 3

    done = cli("purge", "--namespace", "team-a", "--older-than", "P30D", url=cache_url)
    assert (done.returncode, done.stdout) == (0, "purged 1 entry in namespace team-a\n"), done.stderr
    assert sorted(row["id"] for row in await db.fetch("SELECT id FROM cache_entries")) == [kept_b, kept_young]


async def test_stepcache_stats_prints_one_line_per_namespace_and_a_total(
    cache: store.Store, cache_url: str, db: Connection
) -> None:
    a = await cache.record(new_entry(termination_messages={"main": "123456"}))
    await cache.record(new_entry(namespace="team-b", termination_messages={"main": "12"}))
    await db.execute("UPDATE cache_entries SET hit_count = 2 WHERE id = $1", a)

    result = cli("stats", url=cache_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "NAMESPACE   ENTRIES   HITS   SAVED   BYTES",
        "team-a      1         2      3m      6",
        "team-b      1         0      0s      2",
        "TOTAL       2         2      3m      8",
    ]
    as_json = cli("stats", "--namespace", "team-b", "-o", "json", url=cache_url)
    assert json.loads(as_json.stdout) == [
        {"namespace": "team-b", "entries": 1, "hits": 0, "seconds_saved": 0.0, "bytes": 2}
    ]
