"""stepcache's blob store (artifact bytes by sha256, in Postgres) and the reader of Argo's S3 artifact repository.

Postgres holds the blobs, so nothing more needs running: `blobs` has one row per distinct sha256, `blob_chunks` its
bytes in 1 MiB bytea chunks (stored without compression: artifacts are mostly gzip already). Chunked bytea rather
than large objects: it was as fast or faster here (docs/argo-and-kfp.md), a blob goes with a plain DELETE (large
objects need `lo_unlink` or `vacuumlo`), and it needs no privileges beyond the tables'. A blob is referenced by the
entries whose `argo_outputs->'artifacts'` name its sha256 (a GIN index answers that); `collect` deletes the blobs no
entry references, after a grace period that covers a recording between storing its blobs and its row.

Like `store.Store`, every call is bounded and every database failure is `errors.StoreUnavailable`. Transfers use
their own pool, apart from the webhook's: a large artifact in flight never holds a connection a lookup waits for.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import hashlib
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import asyncpg
import botocore.config
import botocore.exceptions
import botocore.session
import structlog

from stepcache import artifacts, errors, pg

__all__ = ["CHUNK_BYTES", "BlobInfo", "BlobStore", "Located", "RepositoryUnavailable", "S3Credentials", "S3Reader"]

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

CHUNK_BYTES = 1024 * 1024
_TRANSFER_TIMEOUT = 300.0
"""Seconds for storing or streaming one blob (at most STEPCACHE_ARTIFACT_MAX_BYTES)."""
_MAINTENANCE_TIMEOUT = 60.0
_RESERVED_CONNECTIONS = 1
"""Connections transfers leave free, so admission checks and the endpoint's index reads never queue behind them."""
_MAX_PENDING_LOCATIONS = 10_000

_PRESENCE = """
SELECT b.sha256, b.size, CASE WHEN b.size <= $2 THEN c.data END AS data
FROM blobs AS b
LEFT JOIN blob_chunks AS c ON c.blob_id = b.id AND c.seq = 0
WHERE b.sha256 = ANY($1::text[])
"""

_REFERENCED = """
SELECT EXISTS (
    SELECT 1 FROM cache_entries
    WHERE namespace = ANY($1::text[])
    AND argo_outputs -> 'artifacts' @> jsonb_build_array(jsonb_build_object('sha256', $2::text))
)
"""

_COLLECT = """
DELETE FROM blobs AS b
WHERE b.created_at < now() - $1::interval
AND NOT EXISTS (
    SELECT 1 FROM cache_entries AS e
    WHERE e.argo_outputs -> 'artifacts' @> jsonb_build_array(jsonb_build_object('sha256', b.sha256))
)
"""

_NOTE_LOCATIONS = """
INSERT INTO artifact_locations (scope, location, sha256, entry_id, artifact)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])
ON CONFLICT (scope, location) DO UPDATE SET
    sha256 = EXCLUDED.sha256, entry_id = EXCLUDED.entry_id, artifact = EXCLUDED.artifact, noted_at = now()
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlobInfo:
    """A stored blob: its size, and its bytes when it is small enough to travel inline."""

    size: int
    data: bytes | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Located:
    """An artifact stored at a location: what `artifact_locations` holds for it."""

    location: str
    sha256: str
    entry_id: int | None
    artifact: str


class BlobStore:
    """Blobs and artifact locations in the cache database; build it with `await BlobStore.connect(...)`."""

    def __init__(self, db: pg.Database, *, pool_size: int) -> None:
        self._db = db
        self._transfers = asyncio.Semaphore(max(1, pool_size - _RESERVED_CONNECTIONS))
        self._pending: collections.OrderedDict[tuple[str, str], Located] = collections.OrderedDict()

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        timeout: float,  # noqa: ASYNC109  # the bound every later call gets
        pool_size: int = 4,
        flush_interval: float = 1.0,
    ) -> BlobStore:
        db = await pg.Database.connect(
            dsn, timeout=timeout, max_size=max(2, pool_size), init=_init_connection, prefix="blobs: "
        )
        blob_store = cls(db, pool_size=max(2, pool_size))
        db.flush_every(flush_interval, blob_store._flush_round, name="stepcache-location-flusher")
        return blob_store

    async def close(self) -> None:
        """Write the locations noted so far (best effort), then close the pool."""
        await self._db.close(bound=_MAINTENANCE_TIMEOUT)  # a database failure: nothing more to do

    # --- blobs -----------------------------------------------------------------------------------------------

    async def put(self, data: bytes) -> str:
        """Store `data` unless a blob with its sha256 is stored already; return the sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        offsets = range(0, len(data), CHUNK_BYTES)

        async def run(conn: pg.Connection) -> None:
            async with conn.transaction():
                # A concurrent writer of the same content makes this wait for its commit, then do nothing.
                blob_id = await conn.fetchval(
                    "INSERT INTO blobs (sha256, size) VALUES ($1, $2) ON CONFLICT (sha256) DO NOTHING RETURNING id",
                    sha256,
                    len(data),
                )
                if blob_id is None:
                    return
                await conn.copy_records_to_table(
                    "blob_chunks",
                    records=[(blob_id, seq, data[offset : offset + CHUNK_BYTES]) for seq, offset in enumerate(offsets)],
                    columns=["blob_id", "seq", "data"],
                )

        async with self._transfers:
            await self._db.call("put", run, bound=_TRANSFER_TIMEOUT)
        return sha256

    async def presence(self, shas: Iterable[str], *, inline_max: int) -> dict[str, BlobInfo]:
        """The stored blobs among `shas` (absent ones are left out), with the bytes of those of at most
        `inline_max` bytes (one chunk). One statement, bounded by the caller: the webhook calls it."""
        wanted = sorted(set(shas))

        async def run(conn: pg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(_PRESENCE, wanted, inline_max)
            return rows

        rows = await self._db.call("presence", run, bound=None)
        return {row["sha256"]: BlobInfo(size=row["size"], data=row["data"]) for row in rows}

    async def size(self, sha256: str) -> int | None:
        """The blob's size, or None when it is not stored."""

        async def run(conn: pg.Connection) -> int | None:
            value: int | None = await conn.fetchval("SELECT size FROM blobs WHERE sha256 = $1", sha256)
            return value

        return await self._db.call("size", run, bound=None)

    async def chunks(self, sha256: str) -> AsyncIterator[bytes]:
        """The blob's bytes chunk by chunk, each read on its own (a slow client holds no transaction open).

        Raises StoreUnavailable (also when the blob goes away midway)."""

        async def blob_id(conn: pg.Connection) -> int | None:
            value: int | None = await conn.fetchval("SELECT id FROM blobs WHERE sha256 = $1", sha256)
            return value

        async with self._transfers:
            found = await self._db.call("chunks", blob_id, bound=None)
            if found is None:
                raise errors.StoreUnavailable(f"chunks: blob {sha256} is not stored")
            seq = 0
            while True:

                async def chunk(conn: pg.Connection, seq: int = seq) -> bytes | None:
                    data: bytes | None = await conn.fetchval(
                        "SELECT data FROM blob_chunks WHERE blob_id = $1 AND seq = $2", found, seq
                    )
                    return data

                data = await self._db.call("chunks", chunk, bound=_TRANSFER_TIMEOUT)
                if data is None:
                    return
                yield bytes(data)
                seq += 1

    async def read(self, sha256: str) -> bytes | None:
        """The whole blob, or None when it is not stored (tests and small tools; the endpoint streams)."""
        if await self.size(sha256) is None:
            return None
        return b"".join([chunk async for chunk in self.chunks(sha256)])

    async def delete(self, sha256: str) -> bool:
        """Delete one blob whatever refers to it (an administrator's tool: entries naming it stop being served)."""

        async def run(conn: pg.Connection) -> str:
            status: str = await conn.execute("DELETE FROM blobs WHERE sha256 = $1", sha256)
            return status

        return pg.affected(await self._db.call("delete", run, bound=_MAINTENANCE_TIMEOUT)) > 0

    async def referenced(self, *, namespace: str, sha256: str) -> bool:
        """True when an entry that pods of `namespace` may be served (its own, or cluster-wide ones) records it."""

        async def run(conn: pg.Connection) -> bool:
            value: bool = await conn.fetchval(_REFERENCED, [namespace, "*"], sha256)
            return value

        return await self._db.call("referenced", run, bound=None)

    async def collect(self, *, older_than: datetime.timedelta) -> int:
        """Delete the blobs created more than `older_than` ago that no entry refers to; return how many."""

        async def run(conn: pg.Connection) -> str:
            status: str = await conn.execute(_COLLECT, older_than)
            return status

        return pg.affected(await self._db.call("collect", run, bound=_MAINTENANCE_TIMEOUT))

    # --- artifact locations ------------------------------------------------------------------------------------

    async def resolve(self, *, scope: str, locations: Iterable[str]) -> dict[str, str]:
        """Location → sha256 for the locations known under `scope`: noted in memory or stored. One statement."""
        wanted = sorted(set(locations))
        found = {
            location: self._pending[(scope, location)].sha256
            for location in wanted
            if (scope, location) in self._pending
        }
        rest = [location for location in wanted if location not in found]
        if not rest:
            return found

        async def run(conn: pg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(
                "SELECT location, sha256 FROM artifact_locations WHERE scope = $1 AND location = ANY($2::text[])",
                scope,
                rest,
            )
            return rows

        for row in await self._db.call("resolve", run, bound=None):
            found[row["location"]] = row["sha256"]
        return found

    def note_locations(self, *, scope: str, located: Iterable[Located]) -> None:
        """Remember locations without touching the database (the webhook's call); a background task writes them.

        `resolve` answers from these at once, so a consumer admitted by this replica right after sees them."""
        for item in located:
            key = (scope, item.location)
            self._pending.pop(key, None)
            if len(self._pending) >= _MAX_PENDING_LOCATIONS:
                self._pending.popitem(last=False)
            self._pending[key] = item

    async def store_locations(self, *, scope: str, located: Iterable[Located]) -> None:
        """Write locations now (the recorder's call: it may wait, and retries on failure)."""
        items = list(located)
        if items:
            await self._write_locations([(scope, item) for item in items])

    async def forget_locations(self, *, older_than: datetime.timedelta) -> int:
        """Delete locations noted more than `older_than` ago (their entries have expired by then)."""

        async def run(conn: pg.Connection) -> str:
            status: str = await conn.execute(
                "DELETE FROM artifact_locations WHERE noted_at < now() - $1::interval", older_than
            )
            return status

        return pg.affected(await self._db.call("forget_locations", run, bound=_MAINTENANCE_TIMEOUT))

    async def _write_locations(self, items: list[tuple[str, Located]]) -> None:
        columns = (
            [scope for scope, _ in items],
            [item.location for _, item in items],
            [item.sha256 for _, item in items],
            [item.entry_id for _, item in items],
            [item.artifact for _, item in items],
        )

        async def run(conn: pg.Connection) -> None:
            await conn.execute(_NOTE_LOCATIONS, *columns)

        await self._db.call("store_locations", run, bound=_MAINTENANCE_TIMEOUT)

    async def _flush_round(self) -> None:
        """The flusher's round: write the noted locations; drop those written, unless noted again meanwhile."""
        if not self._pending:
            return
        batch = list(self._pending.items())
        try:
            await self._write_locations([(scope, item) for (scope, _), item in batch])
        except errors.StoreUnavailable as exc:
            log.warning("location_flush_failed", locations=len(batch), error=str(exc))
        except Exception:
            log.exception("location_flush_crashed")
        else:
            for key, item in batch:
                if self._pending.get(key) is item:
                    del self._pending[key]


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Nothing to set: blobs are bytea and text; the hook keeps the pool's setup explicit."""


# --- Argo's artifact repository ------------------------------------------------------------------------------


class RepositoryUnavailable(errors.StepcacheError):
    """The artifact repository could not be reached or answered with an error worth retrying."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3Credentials:
    """What Argo's executor authenticated with, read from the Secrets its template names."""

    access_key: str
    secret_key: str
    session_token: str | None = None


class S3Reader:
    """Reads objects with botocore, in worker threads; one client per endpoint and credentials, kept while used."""

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 30.0, max_clients: int = 16) -> None:
        self._session = botocore.session.get_session()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_clients = max_clients
        self._clients: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    async def read(self, location: artifacts.S3Location, *, credentials: S3Credentials, max_bytes: int) -> bytes:
        """The object's bytes. Raises NotReplayable (`artifact-too-large`, `artifact-object-missing`,
        `repository-forbidden`) or RepositoryUnavailable (worth retrying)."""
        return await asyncio.to_thread(self._read, location, credentials, max_bytes)

    def _read(self, location: artifacts.S3Location, credentials: S3Credentials, max_bytes: int) -> bytes:
        client = self._client(location, credentials)
        try:
            response = client.get_object(Bucket=location.bucket, Key=location.key)
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if isinstance(length, int) and length > max_bytes:
                    raise artifacts.NotReplayable(
                        "artifact-too-large", f"{location.identity} has {length} bytes, over the cap of {max_bytes}"
                    )
                data = bytearray()
                while chunk := body.read(CHUNK_BYTES):
                    data += chunk
                    if len(data) > max_bytes:
                        raise artifacts.NotReplayable(
                            "artifact-too-large", f"{location.identity} is over the cap of {max_bytes} bytes"
                        )
                return bytes(data)
            finally:
                body.close()
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise artifacts.NotReplayable("artifact-object-missing", f"{location.identity}: {code}") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise artifacts.NotReplayable("repository-forbidden", f"{location.identity}: {code}") from None
            raise RepositoryUnavailable(f"{location.identity}: {code or exc}") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise RepositoryUnavailable(f"{location.identity}: {_describe(exc)}") from exc

    def _client(self, location: artifacts.S3Location, credentials: S3Credentials) -> Any:
        cache_key = (location.url, location.region, credentials)
        with self._lock:
            client = self._clients.pop(cache_key, None)
            if client is None:
                aws = location.endpoint.endswith(".amazonaws.com")
                client = self._session.create_client(
                    "s3",
                    endpoint_url=location.url,
                    region_name=location.region or "us-east-1",
                    aws_access_key_id=credentials.access_key,
                    aws_secret_access_key=credentials.secret_key,
                    aws_session_token=credentials.session_token,
                    config=botocore.config.Config(
                        s3={"addressing_style": "auto" if aws else "path"},
                        signature_version="s3v4",
                        connect_timeout=self._connect_timeout,
                        read_timeout=self._read_timeout,
                        retries={"max_attempts": 2, "mode": "standard"},
                    ),
                )
            self._clients[cache_key] = client
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
            return client


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
