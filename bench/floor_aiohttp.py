"""Floors (a) and (b): the least an HTTPS admission endpoint in Python can cost, on the stack stepcache uses.

(a) `constant`: aiohttp on uvloop reads the AdmissionReview and returns a constant response — TLS, HTTP and the
event loop, nothing else; it also tells the load generator's ceiling (one Python process on the other core).
(b) `select`: the same plus one indexed asyncpg SELECT per review — stepcache's own lookup statement, on a pool,
against the same table — so the gap (b)−(a) is the database round trip that no Python webhook can avoid.

    python -m bench.floor_aiohttp --mode constant|select --port P --cert F --key F [--dsn URL --keys FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import pathlib
import ssl
from collections.abc import Iterator, Sequence

import asyncpg
import uvloop
from aiohttp import web

from stepcache import store

__all__ = ["main"]

CONSTANT = json.dumps(
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": "", "allowed": True}},
    separators=(",", ":"),
).encode()


async def serve(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    app = web.Application()
    pool: asyncpg.Pool[asyncpg.Record] | None = None
    if args.mode == "select":
        pool = await asyncpg.create_pool(args.dsn, min_size=4, max_size=4)
        lookups = _lookups(json.loads(pathlib.Path(args.keys).read_bytes()))  # noqa: ASYNC240  # once, at start

        async def select(request: web.Request) -> web.Response:
            await request.read()
            namespace, key = next(lookups)
            assert pool is not None
            async with pool.acquire() as conn:
                await conn.fetchrow(store._LOOKUP, namespace, key, None)
            return web.Response(body=CONSTANT, content_type="application/json")

        app.router.add_post("/{id:.*}", select)
    else:

        async def constant(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=CONSTANT, content_type="application/json")

        app.router.add_post("/{id:.*}", constant)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=context).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        if pool is not None:
            await pool.close()


def _lookups(keys: Sequence[Sequence[str]]) -> Iterator[tuple[str, str]]:
    return itertools.cycle([(namespace, key) for namespace, key in keys])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_aiohttp", description=__doc__)
    parser.add_argument("--mode", choices=("constant", "select"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--dsn", help="the database (select mode)")
    parser.add_argument("--keys", help="a JSON file of [namespace, key] pairs to look up in turn (select mode)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
