"""The store against a real PostgreSQL: migrations, staleness in SQL, upsert races, hit counting, outages."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import inspect
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeAlias

import asyncpg
import pytest
from hack.cluster import postgres as cluster

from stepcache import errors, model, store
from tests.integration import conftest, polling

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"  # generic only in the stubs

SMALL_TIMEOUT = 0.5
MARGIN = 0.3
"""Scheduling slack on a shared machine; far below what a hang would take."""
RECORD_TIMEOUT = 5.0
"""store.record's own bound (seconds), whatever the store's timeout below it."""


def key(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def new_entry(**changes: Any) -> model.NewEntry:
    """A recordable result; each test changes only what it is about."""
    finished = datetime.datetime.now(datetime.UTC)
    entry = model.NewEntry(
        namespace="team-a",
        cache_key=key("step"),
        termination_messages={"main": '{"rows": 42}'},
        argo_outputs=None,
        key_material={"scheme": "stepcache/v1", "scope": "team-a", "containers": [{"name": "main"}]},
        source_namespace="team-a",
        source_pod="train-abc12",
        source_uid=str(uuid.uuid4()),
        started_at=finished - datetime.timedelta(seconds=90),
        finished_at=finished,
        duration_seconds=90.0,
    )
    return dataclasses.replace(entry, **changes)


def ago(**delta: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(**delta)


async def timed(call: Awaitable[object]) -> tuple[Exception | None, float]:
    """The exception a call raised (None if it returned) and how long it took."""
    started = time.monotonic()
    try:
        await call
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


async def recovered(cache: store.Store, cache_key: str) -> model.CachedEntry | None:
    try:
        return await cache.lookup(namespace="team-a", cache_key=cache_key, max_age=None)
    except errors.StoreUnavailable:
        return None


# Migrations


async def test_migrations_apply_once_and_a_second_run_applies_nothing(database_url: str) -> None:
    cache = await store.Store.connect(database_url, timeout=conftest.TIMEOUT)
    try:
        first = await cache.migrate()
        second = await cache.migrate()
    finally:
        await cache.close()
    assert first == [migration.name for migration in store.migrations()]
    assert "0001_cache_entries" in first
    assert second == []


async def test_a_failing_migration_is_rolled_back_and_leaves_the_lock_free(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = store.migrations()
    broken = store.Migration(version=9999, name="9999_broken", sql="CREATE TABLE half_done (id int); SELECT 1/0;")
    cache = await store.Store.connect(database_url, timeout=conftest.TIMEOUT)
    try:
        monkeypatch.setattr(store, "migrations", lambda: [*good, broken])
        with pytest.raises(errors.StoreUnavailable) as caught:
            await cache.migrate()
        assert isinstance(caught.value.__cause__, asyncpg.DivisionByZeroError)
        locks = await _fetch(database_url, "SELECT pid FROM pg_locks WHERE locktype = 'advisory'")

        monkeypatch.setattr(store, "migrations", lambda: good)
        again = await cache.migrate()
        tables = {row["tablename"] for row in await _fetch(database_url, "SELECT tablename FROM pg_tables")}
    finally:
        await cache.close()

    assert locks == []
    assert again == []  # the good ones were committed before the broken one failed
    assert "half_done" not in tables
    assert {"cache_entries", "schema_migrations"} <= tables


async def _fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


_MIGRATE_IN_A_PROCESS = """
import asyncio, json, sys
from stepcache import store

async def main() -> None:
    cache = await store.Store.connect(sys.argv[1], timeout=60)
    try:
        print("ready", flush=True)
        sys.stdin.readline()  # the barrier: both processes are connected before either migrates
        print("applied", json.dumps(await cache.migrate()), flush=True)
    finally:
        await cache.close()

asyncio.run(main())
"""


def test_two_processes_migrating_at_once_both_succeed_and_apply_each_migration_once(
    database_url: str, postgres: cluster.TempPostgres
) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_IN_A_PROCESS, database_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready", process.stderr
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert [process.returncode for process in processes] == [0, 0], outputs
    applied = sorted((json.loads(_line_after("applied ", out)) for out, _ in outputs), key=len)
    names = [migration.name for migration in store.migrations()]
    assert applied == [[], names]
    database = database_url.rsplit("/", 1)[1]
    recorded = postgres.run_sql(
        "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY version", database=database
    )
    assert recorded.split() == [f"{migration.version}|1" for migration in store.migrations()]
    tables = postgres.run_sql("SELECT count(*) FROM pg_tables WHERE tablename = 'cache_entries'", database=database)
    assert tables.strip() == "1"


def _line_after(prefix: str, output: str) -> str:
    """The rest of the line that starts with `prefix` (unconfigured logs share the process's stdout)."""
    lines = [line.removeprefix(prefix) for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output
    return lines[0]


# Reading


async def test_an_entry_is_served_only_while_it_is_younger_than_the_max_age(cache: store.Store) -> None:
    entry_id = await cache.record(new_entry(finished_at=ago(hours=2)))

    def lookup(max_age: datetime.timedelta | None) -> Awaitable[model.CachedEntry | None]:
        return cache.lookup(namespace="team-a", cache_key=key("step"), max_age=max_age)

    within = await lookup(datetime.timedelta(hours=3))
    assert within is not None
    assert within.id == entry_id
    assert await lookup(datetime.timedelta(hours=1)) is None
    unlimited = await lookup(None)
    assert unlimited is not None
    assert unlimited.id == entry_id


async def test_a_lookup_returns_what_was_recorded(cache: store.Store) -> None:
    recorded = new_entry(
        argo_outputs={"parameters": {"accuracy": "0.93"}, "result": "done"},
        termination_messages={"main": "ok", "sidecar": "ünïcode ✓"},
    )
    entry_id = await cache.record(recorded)

    found = await cache.lookup(namespace="team-a", cache_key=recorded.cache_key, max_age=None)

    assert found == model.CachedEntry(
        id=entry_id,
        namespace="team-a",
        cache_key=recorded.cache_key,
        termination_messages={"main": "ok", "sidecar": "ünïcode ✓"},
        argo_outputs={"parameters": {"accuracy": "0.93"}, "result": "done"},
        source_pod="train-abc12",
        finished_at=recorded.finished_at,
        duration_seconds=90.0,
    )


async def test_json_columns_are_stored_as_json_objects_not_strings(cache: store.Store, db: Connection) -> None:
    entry_id = await cache.record(new_entry())

    row = await db.fetchrow(
        "SELECT jsonb_typeof(termination_messages) AS messages, jsonb_typeof(key_material) AS material,"
        " argo_outputs IS NULL AS no_outputs, key_material->>'scheme' AS scheme FROM cache_entries WHERE id = $1",
        entry_id,
    )

    assert row is not None
    assert dict(row) == {"messages": "object", "material": "object", "no_outputs": True, "scheme": "stepcache/v1"}


async def test_a_lookup_finds_nothing_in_another_namespace(cache: store.Store) -> None:
    await cache.record(new_entry(namespace="team-a"))

    assert await cache.lookup(namespace="team-b", cache_key=key("step"), max_age=None) is None


async def test_a_lookup_changes_nothing_in_the_row(cache: store.Store, db: Connection) -> None:
    entry_id = await cache.record(new_entry())
    columns = "xmin::text AS version, hit_count, last_hit_at, updated_at"
    before = await db.fetchrow(f"SELECT {columns} FROM cache_entries WHERE id = $1", entry_id)

    for _ in range(3):
        assert await cache.lookup(namespace="team-a", cache_key=key("step"), max_age=None) is not None
        assert await cache.lookup(namespace="team-a", cache_key=key("step"), max_age=datetime.timedelta(0)) is None

    after = await db.fetchrow(f"SELECT {columns} FROM cache_entries WHERE id = $1", entry_id)
    assert before is not None
    assert after is not None
    assert dict(after) == dict(before)


# Writing


async def test_fifty_concurrent_records_of_one_key_leave_one_row_and_all_return_its_id(
    cache_url: str, db: Connection
) -> None:
    cache = await store.Store.connect(cache_url, timeout=conftest.TIMEOUT, pool_size=10)
    try:
        base = ago(minutes=5)
        entries = [
            new_entry(finished_at=base + datetime.timedelta(seconds=i % 7), termination_messages={"main": f"run {i}"})
            for i in range(50)
        ]

        ids = await asyncio.gather(*(cache.record(entry) for entry in entries))
    finally:
        await cache.close()

    assert len(set(ids)) == 1
    rows = await db.fetch("SELECT id, finished_at FROM cache_entries")
    assert [(row["id"], row["finished_at"]) for row in rows] == [(ids[0], base + datetime.timedelta(seconds=6))]


async def test_a_newer_result_replaces_the_stored_one_and_keeps_its_id(cache: store.Store) -> None:
    first = await cache.record(new_entry(finished_at=ago(hours=1), termination_messages={"main": "old"}))

    second = await cache.record(new_entry(finished_at=ago(minutes=1), termination_messages={"main": "new"}))

    assert second == first
    stored = await cache.get(first)
    assert stored is not None
    assert stored.termination_messages == {"main": "new"}
    assert await cache.count() == 1


async def test_an_older_or_equally_old_result_does_not_replace_the_stored_one(cache: store.Store) -> None:
    finished = ago(minutes=1)
    stored_id = await cache.record(new_entry(finished_at=finished, termination_messages={"main": "kept"}))

    older = await cache.record(new_entry(finished_at=ago(hours=1), termination_messages={"main": "older"}))
    same = await cache.record(new_entry(finished_at=finished, termination_messages={"main": "same time"}))

    assert older == stored_id
    assert same == stored_id
    stored = await cache.get(stored_id)
    assert stored is not None
    assert stored.termination_messages == {"main": "kept"}


async def test_a_key_that_is_not_64_hex_is_refused_by_the_table(cache: store.Store) -> None:
    with pytest.raises(errors.StoreUnavailable) as caught:
        await cache.record(new_entry(cache_key="not-a-key"))

    assert isinstance(caught.value.__cause__, asyncpg.CheckViolationError)


async def test_get_delete_and_count_see_the_same_rows(cache: store.Store) -> None:
    entry_id = await cache.record(new_entry())
    other_id = await cache.record(new_entry(cache_key=key("other")))

    assert await cache.count() == 2
    found = await cache.get(entry_id)
    assert found is not None
    assert found.cache_key == key("step")
    assert await cache.delete(entry_id) is True
    assert await cache.delete(entry_id) is False
    assert await cache.get(entry_id) is None
    assert await cache.count() == 1
    assert await cache.get(other_id) is not None


async def test_expiry_deletes_only_entries_older_than_the_limit(cache: store.Store) -> None:
    await cache.record(new_entry(cache_key=key("ancient"), finished_at=ago(days=40)))
    await cache.record(new_entry(cache_key=key("old"), finished_at=ago(days=3)))
    recent_id = await cache.record(new_entry(cache_key=key("recent"), finished_at=ago(hours=1)))

    deleted = await cache.expire(older_than=datetime.timedelta(days=1))

    assert deleted == 2
    assert await cache.count() == 1
    assert await cache.get(recent_id) is not None
    assert await cache.expire(older_than=datetime.timedelta(days=1)) == 0


# Hit counting


def test_note_hit_is_a_plain_function_so_the_webhook_never_waits_on_it() -> None:
    assert not inspect.iscoroutinefunction(store.Store.note_hit)
    assert inspect.signature(store.Store.note_hit).return_annotation in (None, "None")


async def test_noted_hits_are_written_in_the_background(cache: store.Store, db: Connection) -> None:
    popular = await cache.record(new_entry(cache_key=key("popular")))
    rare = await cache.record(new_entry(cache_key=key("rare")))

    for _ in range(3):
        cache.note_hit(popular)
    cache.note_hit(rare)

    async def counts() -> dict[int, int]:
        rows = await db.fetch("SELECT id, hit_count FROM cache_entries WHERE last_hit_at IS NOT NULL")
        return {row["id"]: row["hit_count"] for row in rows}

    assert await polling.eventually(counts, until=lambda found: len(found) == 2) == {popular: 3, rare: 1}
    assert cache.pending_hits == 0


async def test_hits_beyond_the_pending_bound_are_dropped_and_the_rest_written_at_close(
    cache_url: str, db: Connection
) -> None:
    cache = await store.Store.connect(cache_url, timeout=conftest.TIMEOUT, hit_flush_interval=3600, max_pending_hits=2)
    try:
        first, second, third = [await cache.record(new_entry(cache_key=key(name))) for name in ("a", "b", "c")]

        cache.note_hit(first)
        cache.note_hit(second)
        cache.note_hit(third)  # a third distinct id does not fit
        cache.note_hit(first)  # an id already waiting still counts

        assert cache.dropped_hits == 1
        assert cache.pending_hits == 3
    finally:
        await cache.close()

    rows = await db.fetch("SELECT id, hit_count FROM cache_entries")
    assert {row["id"]: row["hit_count"] for row in rows} == {first: 2, second: 1, third: 0}


# Outages


async def test_a_stopped_server_fails_calls_within_the_timeout_and_the_store_recovers_when_it_is_back(
    own_postgres: cluster.TempPostgres,
) -> None:
    cache = await store.Store.connect(own_postgres.url, timeout=SMALL_TIMEOUT)
    try:
        await cache.migrate()
        entry_id = await cache.record(new_entry())

        own_postgres.stop()
        failed_lookup, lookup_took = await timed(cache.lookup(namespace="team-a", cache_key=key("step"), max_age=None))
        failed_record, record_took = await timed(cache.record(new_entry(finished_at=ago(seconds=0))))
        own_postgres.start()

        assert isinstance(failed_lookup, errors.StoreUnavailable)
        assert failed_lookup.__cause__ is not None
        assert lookup_took < SMALL_TIMEOUT + MARGIN
        assert isinstance(failed_record, errors.StoreUnavailable)
        assert record_took < SMALL_TIMEOUT + MARGIN

        found = await polling.eventually(lambda: recovered(cache, key("step")), until=lambda entry: entry is not None)
        assert found is not None
        assert found.id == entry_id
        assert await cache.record(new_entry(finished_at=ago(seconds=0))) == entry_id
    finally:
        await cache.close()


async def test_a_server_that_stops_answering_fails_calls_within_the_timeout(
    own_postgres: cluster.TempPostgres,
) -> None:
    cache = await store.Store.connect(own_postgres.url, timeout=SMALL_TIMEOUT)
    try:
        await cache.migrate()
        entry_id = await cache.record(new_entry())

        own_postgres.freeze()
        try:
            failed_lookup, lookup_took = await timed(
                cache.lookup(namespace="team-a", cache_key=key("step"), max_age=None)
            )
            failed_record, record_took = await timed(cache.record(new_entry(finished_at=ago(seconds=0))))
        finally:
            own_postgres.thaw()

        assert isinstance(failed_lookup, errors.StoreUnavailable)
        assert isinstance(failed_lookup.__cause__, TimeoutError)
        assert lookup_took < SMALL_TIMEOUT + MARGIN
        assert isinstance(failed_record, errors.StoreUnavailable)
        # A row write is off the request path and has a bound of its own (5 s): not the webhook's tight one, which
        # under load made writes time out, retry and reconnect.
        assert SMALL_TIMEOUT < record_took < RECORD_TIMEOUT + MARGIN

        found = await polling.eventually(lambda: recovered(cache, key("step")), until=lambda entry: entry is not None)
        assert found is not None
        assert found.id == entry_id
    finally:
        await cache.close()


async def test_connecting_to_a_server_that_is_down_raises_store_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.

    url = f"postgresql://stepcache@127.0.0.1:{port}/x"

    failure, took = await timed(store.Store.connect(url, timeout=SMALL_TIMEOUT))

    assert isinstance(failure, errors.StoreUnavailable)
    assert isinstance(failure.__cause__, OSError)
    assert took < SMALL_TIMEOUT + MARGIN
