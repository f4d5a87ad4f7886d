"""The blob endpoint: replays of hit pods fetch their artifacts' bytes here, with URLs the webhook signed.

`GET /blobs/<sha256>?namespace=NS&expires=T&signature=HMAC` is answered only when the signature (HMAC-SHA256 under
a key derived from the operator's signing key, over namespace, sha256 and expiry) holds, the URL has not expired,
and an entry that pods of NS may be served (NS's own, or cluster-wide ones) records the blob: a pod of another
namespace holding no URL for it gets 403, and so does anyone with a changed or expired URL. It is plain HTTP (the
replay image's busybox wget verifies no certificate): the replay checks every blob's sha256, carried in its pod
spec, before writing it, so a changed transfer fails the step instead of feeding it wrong bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from stepcache import artifacts, blobs, errors, logs, metrics

__all__ = ["BlobServer"]

log = logs.get(__name__)


class BlobServer:
    """An aiohttp server answering signed blob URLs; `start` binds it, `stop` closes it."""

    def __init__(
        self,
        *,
        blob_store: blobs.BlobStore,
        url_key: bytes,
        host: str,
        port: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._blobs = blob_store
        self._url_key = url_key
        self._host = host
        self._port = port
        self._clock = clock
        app = web.Application()
        app.router.add_get("/blobs/{sha256}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen by the system when asked for 0)."""
        server = self._site._server if self._site is not None else None  # aiohttp exposes no other way
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port)
        await self._site.start()
        log.info("blob_endpoint_started", port=self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        namespace = request.query.get("namespace", "")
        refusal = artifacts.verify_url(
            self._url_key,
            namespace=namespace,
            sha256=sha256,
            expires=request.query.get("expires", ""),
            signature=request.query.get("signature", ""),
            now=self._clock(),
        )
        if refusal is not None:
            return self._refuse(request, outcome=refusal, namespace=namespace, sha256=sha256)
        response: web.StreamResponse | None = None
        try:
            if not await self._blobs.referenced(namespace=namespace, sha256=sha256):
                return self._refuse(request, outcome="not-in-namespace", namespace=namespace, sha256=sha256)
            size = await self._blobs.size(sha256)
            if size is None:
                metrics.BLOB_REQUESTS.labels(outcome="missing").inc()
                log.warning("blob_missing", namespace=namespace, sha256=sha256)
                return web.Response(status=404, text="blob not stored\n")
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = size
            await response.prepare(request)
            async for chunk in self._blobs.chunks(sha256):
                await response.write(chunk)
        except errors.StoreUnavailable as exc:
            metrics.BLOB_REQUESTS.labels(outcome="store-unavailable").inc()
            log.warning("blob_store_unavailable", namespace=namespace, sha256=sha256, error=str(exc))
            if response is not None and response.prepared:
                raise  # the status line is gone: dropping the connection leaves the client short of bytes
            return web.Response(status=503, text="blob store unavailable\n")
        await response.write_eof()
        metrics.BLOB_REQUESTS.labels(outcome="served").inc()
        return response

    def _refuse(self, request: web.Request, *, outcome: str, namespace: str, sha256: str) -> web.Response:
        metrics.BLOB_REQUESTS.labels(outcome=outcome).inc()
        log.warning("blob_request_refused", outcome=outcome, namespace=namespace, sha256=sha256, peer=request.remote)
        return web.Response(status=403, text=f"{outcome}\n")
