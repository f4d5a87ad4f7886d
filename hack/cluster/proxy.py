"""A TCP proxy on loopback for fault injection: spread connections over backends, cut every connection at once.

Two uses in the chaos test: in front of two operator replicas, so the one URL a MutatingWebhookConfiguration can
name reaches both — each new connection goes to the next backend in turn and skips one that refuses, as a Service
skips an endpoint that is not ready; and between the operators and kube-apiserver, so their connections (kopf's
watches, the recorder's requests) can be cut all at once, as a network blip or an API server restart would.

The proxy relays bytes and never looks at them, so TLS stays end to end (the certificates name 127.0.0.1, which the
proxy listens on too). It runs its own event loop in a daemon thread, so it dies with the process that started it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import types
from collections.abc import Sequence

from hack.cluster import ports

__all__ = ["TcpProxy"]

_CHUNK = 65536


class TcpProxy:
    """Listens on 127.0.0.1:`port`; a context manager, or `start()` / `stop()`."""

    def __init__(self, backends: Sequence[int], *, port: int | None = None, name: str = "proxy") -> None:
        if not backends:
            raise ValueError("a proxy needs at least one backend port")
        self.backends = list(backends)
        self.port = port or ports.free_port()
        self.name = name
        self.connections: collections.Counter[int] = collections.Counter()
        """Connections relayed so far, per backend port."""
        self.refused = 0
        """Client connections closed because no backend accepted them."""
        self._next = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start listening; returns once the port accepts connections."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=f"tcp-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def cut(self) -> int:
        """Abort every open connection, both sides (new ones are relayed as before); return how many were cut."""
        if self._loop is None:
            return 0
        return asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(timeout=10)

    async def _cut(self) -> int:
        writers = list(self._open)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            await self._relay_once(client_reader, client_writer)
        except asyncio.CancelledError:
            # Only at shutdown (nothing else cancels a relay): asyncio's server would log a cancelled handler as an
            # error. The loop is closing, so there is nobody to hand the cancellation to.
            client_writer.transport.abort()

    async def _relay_once(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            self.refused += 1
            client_writer.transport.abort()
            return
        backend, (backend_reader, backend_writer) = upstream
        self.connections[backend] += 1
        self._open.update((client_writer, backend_writer))
        try:
            await asyncio.gather(
                _pipe(client_reader, backend_writer),
                _pipe(backend_reader, client_writer),
            )
        finally:
            for writer in (client_writer, backend_writer):
                self._open.discard(writer)
                writer.transport.abort()

    async def _connect(self) -> tuple[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None:
        """The next backend in turn that accepts a connection, or None when none does."""
        for _ in range(len(self.backends)):
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                return backend, await asyncio.open_connection("127.0.0.1", backend)
            except OSError:
                continue
        return None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        # Aborted connections end their relays normally; only a relay still connecting is cancelled.
        await self._cut()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        _, late = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side closes; then close the other side's writing half, as the peer did."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        # A reset or an aborted transport (cut) ends both directions.
        writer.transport.abort()
