"""The Postgres store: one indexed read per admission, one upsert per recorded pod, counters off the hot path.

The webhook sits in the path of every pod creation, so each call here is bounded (`asyncio.timeout` around acquiring
a connection *and* running the statement) and every failure — a server that is down, frozen, or answering with an
error — surfaces as one exception, `errors.StoreUnavailable`, chained from the driver's, so callers can fail open.

Reads have no side effects (the webhook declares `sideEffects: None`): hit counters are collected in memory by
`note_hit` and written by a background task. Writes are a single `INSERT ... ON CONFLICT` on `UNIQUE (namespace,
cache_key)`, so concurrent completions of one step leave one row, and a newer result replaces an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import importlib.resources
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import asyncpg
import asyncpg.pool
import structlog

from stepcache import errors, model

__all__ = ["Migration", "Store", "migrations"]

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

_T = TypeVar("_T")
_Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"  # generic only in the stubs

# What a failing database looks like from here; each becomes StoreUnavailable.
_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_CONNECT_FAILURES: tuple[type[BaseException], ...] = (*_FAILURES, ValueError)  # ValueError: a malformed URL

_MAINTENANCE_TIMEOUT = 30.0
"""Seconds; bounds work off the request path (migrations, expiry, hit flushes, close), which may take longer."""
_CONNECT_TIMEOUT = 5.0
"""Seconds; a new connection may take longer than one query (TLS, auth), and the pool's background refill uses it."""
_MIGRATION_LOCK = 0x5354455043414348
"""pg_advisory_lock key ("STEPCACH"): one migrator per database at a time."""
_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")
_RECORD_ATTEMPTS = 3

_ENTRY_COLUMNS = (
    "id, namespace, cache_key, termination_messages, argo_outputs, source_pod, finished_at, duration_seconds"
)

# The staleness filter is part of the one indexed read: an entry older than the pod allows is never returned.
_LOOKUP = f"""
SELECT {_ENTRY_COLUMNS}
FROM cache_entries
WHERE namespace = $1 AND cache_key = $2 AND ($3::interval IS NULL OR finished_at >= now() - $3::interval)
"""

_GET = f"SELECT {_ENTRY_COLUMNS} FROM cache_entries WHERE id = $1"

# The WHERE keeps a stored row that finished at the same time or later; then nothing is RETURNed.
_UPSERT = """
INSERT INTO cache_entries (
    namespace, cache_key, termination_messages, argo_outputs, key_material,
    source_namespace, source_pod, source_uid, started_at, finished_at, duration_seconds
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (namespace, cache_key) DO UPDATE SET
    termination_messages = EXCLUDED.termination_messages,
    argo_outputs = EXCLUDED.argo_outputs,
    key_material = EXCLUDED.key_material,
    source_namespace = EXCLUDED.source_namespace,
    source_pod = EXCLUDED.source_pod,
    source_uid = EXCLUDED.source_uid,
    started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at,
    duration_seconds = EXCLUDED.duration_seconds,
    updated_at = now()
WHERE cache_entries.finished_at < EXCLUDED.finished_at
RETURNING id
"""

_STORED_ID = "SELECT id FROM cache_entries WHERE namespace = $1 AND cache_key = $2"

_FLUSH_HITS = """
UPDATE cache_entries AS e
SET hit_count = e.hit_count + h.n, last_hit_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS h(id, n)
WHERE e.id = h.id
"""

_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Migration:
    """One versioned SQL file shipped in `stepcache/migrations/`."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The package's migrations in version order; a duplicate version is a packaging bug and raises."""
    folder = importlib.resources.files("stepcache").joinpath("migrations")
    found: dict[int, Migration] = {}
    for item in folder.iterdir():
        match = _MIGRATION_NAME.match(item.name)
        if match is None:
            continue
        version = int(match["version"])
        name = item.name.removesuffix(".sql")
        if version in found:
            raise errors.StepcacheError(f"migrations {found[version].name} and {name} share version {version}")
        found[version] = Migration(version=version, name=name, sql=item.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


class Store:
    """A pool of connections to the cache database; build it with `await Store.connect(...)`."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        timeout: float,
        hit_flush_interval: float,
        max_pending_hits: int,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._maintenance_timeout = max(timeout, _MAINTENANCE_TIMEOUT)
        self._hit_flush_interval = hit_flush_interval
        self._max_pending_hits = max_pending_hits
        self._pending_hits: dict[int, int] = {}
        self._dropped_hits = 0
        self._closed = False
        self._closing = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        timeout: float,  # noqa: ASYNC109  # not this call's bound: the one every later call gets
        pool_size: int = 4,
        hit_flush_interval: float = 1.0,
        max_pending_hits: int = 10_000,
    ) -> Store:
        """Open the pool (one connection up front, so a bad URL or a dead server shows now) and start the flusher."""
        connect_timeout = max(timeout, _CONNECT_TIMEOUT)
        try:
            async with asyncio.timeout(connect_timeout + timeout):
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=1,
                    max_size=pool_size,
                    timeout=connect_timeout,
                    init=_init_connection,
                    reset=_keep_session,
                )
        except _CONNECT_FAILURES as exc:
            raise errors.StoreUnavailable(f"cannot connect to the database: {_describe(exc)}") from exc
        store = cls(pool, timeout=timeout, hit_flush_interval=hit_flush_interval, max_pending_hits=max_pending_hits)
        store._flusher = asyncio.create_task(store._flush_forever(), name="stepcache-hit-flusher")
        return store

    async def close(self) -> None:
        """Let the flusher write the hits it holds (best effort), then close the pool."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._flusher is not None:
            await self._flusher
        try:
            async with asyncio.timeout(self._maintenance_timeout):
                await self._pool.close()
        except BaseException as exc:
            self._pool.terminate()
            if not isinstance(exc, _FAILURES):
                raise
            log.warning("pool_close_failed", error=_describe(exc))

    @property
    def pending_hits(self) -> int:
        """Hits noted but not yet written."""
        return sum(self._pending_hits.values())

    @property
    def dropped_hits(self) -> int:
        """Hits not counted because too many distinct entries were waiting for a flush."""
        return self._dropped_hits

    async def migrate(self) -> list[str]:
        """Apply the pending migrations, each in its own transaction; return their names (empty when up to date).

        Several replicas may start at once: a session advisory lock lets one migrate while the others wait, then
        find nothing left to do.
        """

        async def run(conn: _Connection) -> list[str]:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                applied = await _apply_migrations(conn, migrations())
            except asyncpg.PostgresError:
                # A migration failed (its transaction rolled back). Ending the session releases the lock; on any
                # other error `_call` ends it.
                conn.terminate()
                raise
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
            return applied

        applied = await self._call("migrate", run, bound=self._maintenance_timeout)
        if applied:
            log.info("migrations_applied", names=applied)
        return applied

    async def lookup(
        self, *, namespace: str, cache_key: str, max_age: datetime.timedelta | None
    ) -> model.CachedEntry | None:
        """The entry for this key, if it finished at most `max_age` ago (None: any age); changes nothing."""

        async def run(conn: _Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_LOOKUP, namespace, cache_key, max_age)

        row = await self._call("lookup", run)
        return None if row is None else _entry(row)

    async def record(self, entry: model.NewEntry) -> int:
        """Store a pod's result unless a result that finished no earlier is stored; return the row's id either way.

        The id is stable: a replacement updates the row in place.
        """
        args = (
            entry.namespace,
            entry.cache_key,
            entry.termination_messages,
            entry.argo_outputs,
            entry.key_material,
            entry.source_namespace,
            entry.source_pod,
            entry.source_uid,
            entry.started_at,
            entry.finished_at,
            entry.duration_seconds,
        )

        async def run(conn: _Connection) -> int:
            for _ in range(_RECORD_ATTEMPTS):
                entry_id: int | None = await conn.fetchval(_UPSERT, *args)
                if entry_id is not None:
                    return entry_id
                # The stored row won. It is read by a second statement, not a CTE branch: a row committed by a
                # concurrent writer after this statement's snapshot is invisible to the same statement.
                entry_id = await conn.fetchval(_STORED_ID, entry.namespace, entry.cache_key)
                if entry_id is not None:
                    return entry_id
                # Expired or deleted in between: insert again.
            raise errors.StoreUnavailable(f"record: the row for {entry.cache_key} kept disappearing")

        return await self._call("record", run)

    def note_hit(self, entry_id: int) -> None:
        """Count a hit without touching the database; a background task writes the counts about once a second."""
        pending = self._pending_hits
        if entry_id in pending:
            pending[entry_id] += 1
        elif len(pending) < self._max_pending_hits and not self._closed:
            pending[entry_id] = 1
        else:
            self._dropped_hits += 1

    async def expire(self, *, older_than: datetime.timedelta) -> int:
        """Delete the entries that finished more than `older_than` ago; return how many."""

        async def run(conn: _Connection) -> str:
            status: str = await conn.execute(
                "DELETE FROM cache_entries WHERE finished_at < now() - $1::interval", older_than
            )
            return status

        return _affected(await self._call("expire", run, bound=self._maintenance_timeout))

    async def get(self, entry_id: int) -> model.CachedEntry | None:
        """The entry with this id, whatever its age."""

        async def run(conn: _Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_GET, entry_id)

        row = await self._call("get", run)
        return None if row is None else _entry(row)

    async def delete(self, entry_id: int) -> bool:
        """Delete one entry; False when there was none."""

        async def run(conn: _Connection) -> str:
            status: str = await conn.execute("DELETE FROM cache_entries WHERE id = $1", entry_id)
            return status

        return _affected(await self._call("delete", run)) > 0

    async def count(self) -> int:
        """How many entries are stored."""

        async def run(conn: _Connection) -> int:
            value: int = await conn.fetchval("SELECT count(*) FROM cache_entries")
            return value

        return await self._call("count", run)

    async def _call(
        self, operation: str, run: Callable[[_Connection], Awaitable[_T]], *, bound: float | None = None
    ) -> _T:
        """Run `run` on a pooled connection, all within `bound` (default: the store's timeout).

        Every failure becomes StoreUnavailable, chained from the driver's error.
        """
        try:
            async with asyncio.timeout(self._timeout if bound is None else bound):
                conn = await self._pool.acquire()
                try:
                    return await run(conn)
                except BaseException as exc:
                    if not isinstance(exc, asyncpg.PostgresError):
                        # Cancelled mid-statement or broken: releasing it normally would wait for the server to
                        # acknowledge, which is exactly what a hung server never does.
                        conn.terminate()
                    raise
                finally:
                    await self._pool.release(conn)
        except _FAILURES as exc:
            raise errors.StoreUnavailable(f"{operation}: {_describe(exc)}") from exc

    async def _flush_forever(self) -> None:
        """Write the noted hits every interval, and a last time when the store closes."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._hit_flush_interval):
                    await self._closing.wait()
            try:
                await self._flush_hits()
            except errors.StoreUnavailable as exc:
                log.warning("hit_flush_failed", hits=self.pending_hits, error=str(exc))
            except Exception:
                log.exception("hit_flush_crashed")
            if self._closing.is_set():
                return

    async def _flush_hits(self) -> None:
        """Write the noted hits in one statement; on failure keep them (within the bound) for the next flush.

        A flush that times out after the server committed is counted twice: hit counts are statistics, and
        losing every hit of an outage would be the worse error.
        """
        if not self._pending_hits:
            return
        batch, self._pending_hits = self._pending_hits, {}
        ids = list(batch)
        counts = [batch[entry_id] for entry_id in ids]

        async def run(conn: _Connection) -> str:
            status: str = await conn.execute(_FLUSH_HITS, ids, counts)
            return status

        try:
            await self._call("flush_hits", run, bound=self._maintenance_timeout)
        except errors.StoreUnavailable:
            for entry_id, n in batch.items():
                if entry_id in self._pending_hits or len(self._pending_hits) < self._max_pending_hits:
                    self._pending_hits[entry_id] = self._pending_hits.get(entry_id, 0) + n
                else:
                    self._dropped_hits += n
            raise


async def _apply_migrations(conn: _Connection, available: list[Migration]) -> list[str]:
    await conn.execute(_SCHEMA_MIGRATIONS)
    done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    applied: list[str] = []
    for migration in available:
        if migration.version in done:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name
            )
        applied.append(migration.name)
    return applied


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Decode JSON columns to Python values (and encode them back) in the driver, once per connection."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, schema="pg_catalog", encoder=_dumps, decoder=json.loads, format="text")


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Replace asyncpg's reset-on-release query (a round trip per call): these statements leave no session state.

    asyncpg still rolls back an open transaction before calling this; migrate's advisory lock is released by it.
    """


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _entry(row: asyncpg.Record) -> model.CachedEntry:
    return model.CachedEntry(
        id=row["id"],
        namespace=row["namespace"],
        cache_key=row["cache_key"],
        termination_messages=row["termination_messages"],
        argo_outputs=row["argo_outputs"],
        source_pod=row["source_pod"],
        finished_at=row["finished_at"],
        duration_seconds=row["duration_seconds"],
    )


def _affected(status: str) -> int:
    """Rows touched, from a command tag such as `DELETE 3`."""
    return int(status.rsplit(" ", 1)[-1])


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
