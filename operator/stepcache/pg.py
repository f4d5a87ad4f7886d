"""Bounded Postgres calls: the one way `store.Store` and `blobs.BlobStore` open, use and close their pools.

The webhook sits in the path of every pod creation, so each call is bounded (`asyncio.timeout` around acquiring a
connection *and* running the statements) and every failure — a server that is down, frozen, or answering with an
error — surfaces as one exception, `errors.StoreUnavailable`, chained from the driver's, so callers can fail open.
Both stores must fail the same way; keeping that in one place keeps them so. What the request path only notes (hit
counts, artifact locations) each store writes later from the database's flusher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar

import asyncpg
import asyncpg.pool

from stepcache import errors

__all__ = ["Connection", "ConnectionHook", "Database", "affected", "describe"]

_T = TypeVar("_T")
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"  # generic only in the stubs
ConnectionHook: TypeAlias = "Callable[[asyncpg.Connection[asyncpg.Record]], Awaitable[None]]"

# What a failing database looks like from here; each becomes StoreUnavailable.
_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_CONNECT_FAILURES: tuple[type[BaseException], ...] = (*_FAILURES, ValueError)  # ValueError: a malformed URL

_CONNECT_TIMEOUT = 5.0
"""Seconds; a new connection may take longer than one query (TLS, auth), and the pool's background refill uses it."""


class Database:
    """A pool of connections to the cache database, every call bounded; build it with `await Database.connect(...)`."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._closed = False
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        timeout: float,  # noqa: ASYNC109  # not this call's bound: the one every later call gets
        max_size: int,
        init: ConnectionHook,
        reset: ConnectionHook | None = None,
        prefix: str = "",
    ) -> Database:
        """Open the pool with one connection up front, so a bad URL or a dead server shows now.

        `reset` None keeps asyncpg's own reset-on-release; `prefix` starts the StoreUnavailable message (which pool).
        """
        connect_timeout = max(timeout, _CONNECT_TIMEOUT)
        try:
            async with asyncio.timeout(connect_timeout + timeout):
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=1,
                    max_size=max_size,
                    timeout=connect_timeout,
                    init=init,
                    reset=reset,
                )
        except _CONNECT_FAILURES as exc:
            raise errors.StoreUnavailable(f"{prefix}cannot connect to the database: {describe(exc)}") from exc
        return cls(pool, timeout=timeout)

    async def call(
        self, operation: str, run: Callable[[Connection], Awaitable[_T]], *, bound: float | None = None
    ) -> _T:
        """Run `run` on a pooled connection, all within `bound` (None: the timeout it was connected with).

        Every failure becomes StoreUnavailable (`operation` starts its message), chained from the driver's error.
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
            raise errors.StoreUnavailable(f"{operation}: {describe(exc)}") from exc

    def flush_every(self, interval: float, flush: Callable[[], Awaitable[None]], *, name: str) -> None:
        """Call `flush` every `interval` seconds in a task, and a last time on `close`.

        `flush` handles its own failures (logs them, keeps what it could not write for the next round): one that
        escapes ends the task.
        """
        self._flusher = asyncio.create_task(self._flush_forever(interval, flush), name=name)

    async def close(self, *, bound: float) -> BaseException | None:
        """Flush a last time, then close the pool within `bound` seconds, terminating it if that fails.

        Closing is best effort: a database failure is returned (for the caller to log or not), anything else raised.
        Closing again does nothing.
        """
        if self._closed:
            return None
        self._closed = True
        self._stopping.set()
        if self._flusher is not None:
            await self._flusher
        try:
            async with asyncio.timeout(bound):
                await self._pool.close()
        except BaseException as exc:
            self._pool.terminate()
            if not isinstance(exc, _FAILURES):
                raise
            return exc
        return None

    async def _flush_forever(self, interval: float, flush: Callable[[], Awaitable[None]]) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._stopping.wait()
            await flush()
            if self._stopping.is_set():
                return


def affected(status: str) -> int:
    """Rows touched, from a command tag such as `DELETE 3`."""
    return int(status.rsplit(" ", 1)[-1])


def describe(exc: BaseException) -> str:
    """The exception's type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
