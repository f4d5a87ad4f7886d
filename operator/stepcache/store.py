"""The Postgres store: one indexed read per admission, one upsert per recorded pod, counters off the hot path.

The webhook sits in the path of every pod creation, so each call here is bounded (`pg.Database.call`: `asyncio.timeout`
around acquiring a connection *and* running the statement) and every failure — a server that is down, frozen, or
answering with an error — surfaces as one exception, `errors.StoreUnavailable`, chained from the driver's, so callers
can fail open.

Reads have no side effects (the webhook declares `sideEffects: None`): hit counters are collected in memory by
`note_hit` and written by a background task. Writes are a single `INSERT ... ON CONFLICT` on `UNIQUE (namespace,
cache_key)`, so concurrent completions of one step leave one row, and a newer result replaces an older one.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import json
import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from stepcache import cacheentry, errors, model, pg

__all__ = ["Migration", "NamespaceStats", "Removed", "Selection", "Store", "migrations"]

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

_MAINTENANCE_TIMEOUT = 30.0
"""Seconds; bounds work off the request path (migrations, expiry, hit flushes, close), which may take longer."""
_RECORD_TIMEOUT = 5.0
"""Seconds; bounds one recording's row write. Off the request path, so not the webhook's tight bound: under load a
write that waits a little for the server must not time out, be retried and cost a new connection."""
_MIGRATION_LOCK = 0x5354455043414348
"""pg_advisory_lock key ("STEPCACH"): one migrator per database at a time."""
_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")
_RECORD_ATTEMPTS = 3
_UNSTORABLE_TEXT: tuple[type[BaseException], ...] = (
    asyncpg.UntranslatableCharacterError,  # \u0000 in JSONB
    asyncpg.CharacterNotInRepertoireError,  # NUL in text
    UnicodeEncodeError,  # a lone surrogate: not even sent (the driver's DataError wraps it)
)
"""What Postgres (or the driver) says of text it cannot store: the same entry fails the same way every time."""

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
    source_namespace, source_pod, source_uid, started_at, finished_at, duration_seconds, step, images
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
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
    step = EXCLUDED.step,
    images = EXCLUDED.images,
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

# What a CacheEntry object shows, per row: sizes of the outputs (never their values) and the key material's main
# fields (never env values or Secret content). Computed here so the outputs themselves never leave the database.
_SUMMARY = """
SELECT e.id, e.namespace, e.cache_key, e.step, e.images, e.source_namespace, e.source_pod, e.source_uid,
       e.finished_at, e.duration_seconds, e.hit_count, e.last_hit_at, sizes.outputs,
       jsonb_strip_nulls(jsonb_build_object(
           'scheme', e.key_material->'scheme',
           'scope', e.key_material->'scope',
           'version', e.key_material->'version',
           'serviceAccount', e.key_material->'serviceAccount',
           'salted', coalesce(e.key_material->>'salt', '') <> '',
           'containers', jsonb_path_query_array(e.key_material, 'lax $.initContainers[*].name')
                         || jsonb_path_query_array(e.key_material, 'lax $.containers[*].name')
                         || jsonb_path_query_array(e.key_material, 'lax $.argo.container.name')
                         || jsonb_path_query_array(e.key_material, 'lax $.argo.script.name')
       )) AS key_fields
FROM cache_entries AS e
CROSS JOIN LATERAL (
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', name, 'kind', kind, 'bytes', bytes) ORDER BY ord, name),
                    '[]'::jsonb) AS outputs
    FROM (
        SELECT 0 AS ord, m.k AS name, 'terminationMessage' AS kind, octet_length(m.v) AS bytes
        FROM jsonb_each_text(e.termination_messages) AS m(k, v)
        UNION ALL
        SELECT 1, p.k, 'parameter', octet_length(p.v)
        FROM jsonb_each_text(CASE WHEN jsonb_typeof(e.argo_outputs->'parameters') = 'object'
                                  THEN e.argo_outputs->'parameters' ELSE '{}'::jsonb END) AS p(k, v)
        UNION ALL
        SELECT 2, 'result', 'result', octet_length(e.argo_outputs->>'result')
        WHERE jsonb_typeof(e.argo_outputs->'result') = 'string'
    ) AS each_output
) AS sizes
"""

# Keyset pagination: each page is one short indexed read, however many rows there are.
_SUMMARIES_PAGE = _SUMMARY + "WHERE e.id > $1 ORDER BY e.id LIMIT $2"
_SUMMARY_BY_ID = _SUMMARY + "WHERE e.id = $1"
# The index on coalesce(last_hit_at, finished_at) serves this: last_hit_at > x implies the coalesce is > x.
_RECENTLY_HIT = (
    _SUMMARY + "WHERE coalesce(e.last_hit_at, e.finished_at) > now() - $1::interval "
    "AND e.last_hit_at > now() - $1::interval"
)

# A purge selection: one namespace or all; entries too old OR unused too long, or every entry ($4).
_SELECTION = """
($1::text IS NULL OR namespace = $1)
AND ($4::boolean
     OR ($2::interval IS NOT NULL AND finished_at < now() - $2::interval)
     OR ($3::interval IS NOT NULL AND coalesce(last_hit_at, finished_at) < now() - $3::interval))
"""
# SKIP LOCKED: two replicas expiring at once take different rows instead of waiting on each other.
_PURGE_BATCH = f"""
DELETE FROM cache_entries WHERE id IN (
    SELECT id FROM cache_entries WHERE {_SELECTION} LIMIT $5 FOR UPDATE SKIP LOCKED
)
RETURNING id, namespace, cache_key, step
"""
_PURGE_COUNT = f"SELECT count(*) FROM cache_entries WHERE {_SELECTION}"

# Locked, so a replacement cannot change the row's step (and so its object's name) between the check and the delete.
_INVALIDATE_CANDIDATE = """
SELECT step FROM cache_entries WHERE namespace = ANY($1::text[]) AND cache_key = $2 AND id = $3 FOR UPDATE
"""

_STATS = """
SELECT e.namespace, count(*) AS entries, coalesce(sum(e.hit_count), 0)::bigint AS hits,
       coalesce(sum(e.hit_count * coalesce(e.duration_seconds, 0)), 0)::double precision AS seconds_saved,
       coalesce(sum(sizes.bytes), 0)::bigint AS bytes
FROM cache_entries AS e
CROSS JOIN LATERAL (
    SELECT (SELECT coalesce(sum(octet_length(m.v)), 0) FROM jsonb_each_text(e.termination_messages) AS m(k, v))
         + (SELECT coalesce(sum(octet_length(p.v)), 0)
            FROM jsonb_each_text(CASE WHEN jsonb_typeof(e.argo_outputs->'parameters') = 'object'
                                      THEN e.argo_outputs->'parameters' ELSE '{}'::jsonb END) AS p(k, v))
         + coalesce(CASE WHEN jsonb_typeof(e.argo_outputs->'result') = 'string'
                         THEN octet_length(e.argo_outputs->>'result') END, 0) AS bytes
) AS sizes
WHERE ($1::text IS NULL OR e.namespace = $1)
GROUP BY e.namespace
ORDER BY e.namespace
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    """Which entries a purge deletes: in `namespace` (None: all), finished more than `older_than` ago OR not used
    (hit, or recorded when never hit) for `unused_for`; `everything` ignores both ages."""

    namespace: str | None = None
    older_than: datetime.timedelta | None = None
    unused_for: datetime.timedelta | None = None
    everything: bool = False

    @property
    def empty(self) -> bool:
        """Selects nothing: no age given and not `everything`."""
        return not self.everything and self.older_than is None and self.unused_for is None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Removed:
    """A deleted row: enough to find its CacheEntry object."""

    id: int
    namespace: str
    cache_key: str
    step: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class NamespaceStats:
    """One namespace's cache (`*` for cluster-wide entries)."""

    namespace: str
    entries: int
    hits: int
    seconds_saved: float
    bytes: int


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
        db: pg.Database,
        *,
        timeout: float,
        max_pending_hits: int,
    ) -> None:
        self._db = db
        self._timeout = timeout
        self._maintenance_timeout = max(timeout, _MAINTENANCE_TIMEOUT)
        self._max_pending_hits = max_pending_hits
        self._pending_hits: dict[int, int] = {}
        self._dropped_hits = 0
        self._closed = False

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
        db = await pg.Database.connect(
            dsn, timeout=timeout, max_size=pool_size, init=_init_connection, reset=_keep_session
        )
        store = cls(db, timeout=timeout, max_pending_hits=max_pending_hits)
        db.flush_every(hit_flush_interval, store._flush_round, name="stepcache-hit-flusher")
        return store

    async def close(self) -> None:
        """Let the flusher write the hits it holds (best effort), then close the pool."""
        self._closed = True  # before the last flush: no hit noted from here on is kept
        failure = await self._db.close(bound=self._maintenance_timeout)
        if failure is not None:
            log.warning("pool_close_failed", error=pg.describe(failure))

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

        async def run(conn: pg.Connection) -> list[str]:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                applied = await _apply_migrations(conn, migrations())
            except asyncpg.PostgresError:
                # A migration failed (its transaction rolled back). Ending the session releases the lock; on any
                # other error `pg.Database.call` ends it.
                conn.terminate()
                raise
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
            return applied

        applied = await self._db.call("migrate", run, bound=self._maintenance_timeout)
        if applied:
            log.info("migrations_applied", names=applied)
        return applied

    async def lookup(
        self, *, namespace: str, cache_key: str, max_age: datetime.timedelta | None
    ) -> model.CachedEntry | None:
        """The entry for this key, if it finished at most `max_age` ago (None: any age); changes nothing."""

        async def run(conn: pg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_LOOKUP, namespace, cache_key, max_age)

        row = await self._db.call("lookup", run)
        return None if row is None else _entry(row)

    async def record(self, entry: model.NewEntry) -> int:
        """Store a pod's result unless a result that finished no earlier is stored; return the row's id either way.

        The id is stable: a replacement updates the row in place. Text the database refuses (a NUL character, see
        `outputs.unstorable`, which callers check first) raises `Uncacheable`: retrying would fail the same way.
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
            entry.step,
            list(entry.images),
        )

        async def run(conn: pg.Connection) -> int:
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

        try:
            return await self._db.call("record", run, bound=max(self._timeout, _RECORD_TIMEOUT))
        except errors.StoreUnavailable as exc:
            refused = _unstorable_text(exc)
            if refused is not None:
                raise errors.Uncacheable(f"unstorable-output: {pg.describe(refused)}") from exc
            raise

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

        async def run(conn: pg.Connection) -> str:
            status: str = await conn.execute(
                "DELETE FROM cache_entries WHERE finished_at < now() - $1::interval", older_than
            )
            return status

        return pg.affected(await self._db.call("expire", run, bound=self._maintenance_timeout))

    async def get(self, entry_id: int) -> model.CachedEntry | None:
        """The entry with this id, whatever its age."""

        async def run(conn: pg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_GET, entry_id)

        row = await self._db.call("get", run)
        return None if row is None else _entry(row)

    async def delete(self, entry_id: int) -> bool:
        """Delete one entry; False when there was none."""

        async def run(conn: pg.Connection) -> str:
            status: str = await conn.execute("DELETE FROM cache_entries WHERE id = $1", entry_id)
            return status

        return pg.affected(await self._db.call("delete", run)) > 0

    async def count(self) -> int:
        """How many entries are stored."""

        async def run(conn: pg.Connection) -> int:
            value: int = await conn.fetchval("SELECT count(*) FROM cache_entries")
            return value

        return await self._db.call("count", run)

    async def summary(self, entry_id: int) -> model.EntrySummary | None:
        """The entry with this id as its CacheEntry shows it (sizes, not outputs)."""

        async def run(conn: pg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_SUMMARY_BY_ID, entry_id)

        row = await self._db.call("summary", run, bound=self._maintenance_timeout)
        return None if row is None else _summary(row)

    async def summaries(self, *, after_id: int = 0, limit: int = 500) -> list[model.EntrySummary]:
        """One page of entries in id order, starting after `after_id`; an empty page ends the listing."""

        async def run(conn: pg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(_SUMMARIES_PAGE, after_id, limit)
            return rows

        return [_summary(row) for row in await self._db.call("summaries", run, bound=self._maintenance_timeout)]

    async def recently_hit(self, *, within: datetime.timedelta) -> list[model.EntrySummary]:
        """Entries hit within the last `within` (by the database's clock), for the CacheEntry status writer."""

        async def run(conn: pg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(_RECENTLY_HIT, within)
            return rows

        return [_summary(row) for row in await self._db.call("recently_hit", run, bound=self._maintenance_timeout)]

    async def invalidate(self, *, namespaces: Sequence[str], cache_key: str, entry_id: int, object_name: str) -> bool:
        """Delete the entry a CacheEntry object named `object_name` stands for; False when it stands for none.

        The row must have this id and key, one of these namespaces, and be the row that object's name is derived
        from: a row replaced by another step's result has another object by now, and deleting the old one (an
        orphan) must not delete the row.
        """

        async def run(conn: pg.Connection) -> bool:
            async with conn.transaction():
                step = await conn.fetchval(_INVALIDATE_CANDIDATE, list(namespaces), cache_key, entry_id)
                if step is None or cacheentry.object_name(step, cache_key) != object_name:
                    return False
                await conn.execute("DELETE FROM cache_entries WHERE id = $1", entry_id)
                return True

        return await self._db.call("invalidate", run, bound=self._maintenance_timeout)

    async def purge_batch(self, selection: Selection, *, limit: int) -> list[Removed]:
        """Delete at most `limit` selected entries in one statement; return them (fewer than `limit`: none left).

        Callers loop: each statement is bounded, so a backlog of any size finishes batch by batch.
        """
        if selection.empty:
            return []

        async def run(conn: pg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(_PURGE_BATCH, *_selection_args(selection), limit)
            return rows

        rows = await self._db.call("purge", run, bound=self._maintenance_timeout)
        return [Removed(id=r["id"], namespace=r["namespace"], cache_key=r["cache_key"], step=r["step"]) for r in rows]

    async def count_selected(self, selection: Selection) -> int:
        """How many entries `purge_batch` would delete in all (a dry run)."""
        if selection.empty:
            return 0

        async def run(conn: pg.Connection) -> int:
            value: int = await conn.fetchval(_PURGE_COUNT, *_selection_args(selection))
            return value

        return await self._db.call("count_selected", run, bound=self._maintenance_timeout)

    async def stats(self, *, namespace: str | None = None) -> list[NamespaceStats]:
        """Entries, hits, compute saved and output bytes per namespace."""

        async def run(conn: pg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(_STATS, namespace)
            return rows

        rows = await self._db.call("stats", run, bound=self._maintenance_timeout)
        return [
            NamespaceStats(
                namespace=r["namespace"],
                entries=r["entries"],
                hits=r["hits"],
                seconds_saved=r["seconds_saved"],
                bytes=r["bytes"],
            )
            for r in rows
        ]

    async def _flush_round(self) -> None:
        """The flusher's round: every interval, and a last time when the store closes."""
        try:
            await self._flush_hits()
        except errors.StoreUnavailable as exc:
            log.warning("hit_flush_failed", hits=self.pending_hits, error=str(exc))
        except Exception:
            log.exception("hit_flush_crashed")

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

        async def run(conn: pg.Connection) -> str:
            status: str = await conn.execute(_FLUSH_HITS, ids, counts)
            return status

        try:
            await self._db.call("flush_hits", run, bound=self._maintenance_timeout)
        except errors.StoreUnavailable:
            for entry_id, n in batch.items():
                if entry_id in self._pending_hits or len(self._pending_hits) < self._max_pending_hits:
                    self._pending_hits[entry_id] = self._pending_hits.get(entry_id, 0) + n
                else:
                    self._dropped_hits += n
            raise


async def _apply_migrations(conn: pg.Connection, available: list[Migration]) -> list[str]:
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


def _summary(row: asyncpg.Record) -> model.EntrySummary:
    return model.EntrySummary(
        id=row["id"],
        namespace=row["namespace"],
        cache_key=row["cache_key"],
        step=row["step"],
        images=tuple(row["images"]),
        source_namespace=row["source_namespace"],
        source_pod=row["source_pod"],
        source_uid=row["source_uid"],
        finished_at=row["finished_at"],
        duration_seconds=row["duration_seconds"],
        hit_count=row["hit_count"],
        last_hit_at=row["last_hit_at"],
        outputs=tuple(model.OutputSize(name=o["name"], kind=o["kind"], bytes=o["bytes"]) for o in row["outputs"]),
        key_fields=row["key_fields"],
    )


def _selection_args(selection: Selection) -> tuple[Any, ...]:
    return (selection.namespace, selection.older_than, selection.unused_for, selection.everything)


def _unstorable_text(exc: BaseException) -> BaseException | None:
    """The database's (or the driver's) refusal of the text itself, if that is what caused `exc`."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, _UNSTORABLE_TEXT):
            return cause
        cause = cause.__cause__
    return None
