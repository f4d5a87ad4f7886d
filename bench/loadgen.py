"""The load generator: a closed loop of AdmissionReview POSTs over HTTPS keep-alive, every response checked.

It runs as its own process pinned to the other core than the server, with a fixed set of pre-encoded bodies sent
round-robin. During warm-up each body's response is checked in full — the returned JSON patch is applied to the
pod and the result compared with what the body expects (labels, annotations, images) — and its patch remembered;
during the measured phase every response is checked for status, uid, `allowed` and that exact patch, cheaply
enough not to cap the rate (warnings included: a hit that fell back to a miss says so in a warning). Anything
else counts as an error, with the first few kept for the report.

A Python client on one core has a ceiling of its own: the constant-response floor measures it, and a server whose
c=16 rate sits at that ceiling is not the bottleneck (its CPU per review, read from /proc, still compares).

    python -m bench.loadgen --url URL --cafile F --bodies F --requests N --concurrency C --seconds S \
        --out F

First N sequential requests (c=1, for latency percentiles), then C workers for S seconds (for reviews/s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import pathlib
import ssl
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import jsonpatch
import uvloop

from bench import common

__all__ = ["check_full", "main"]

_MAX_ERROR_SAMPLES = 5


def check_full(review: dict[str, Any], response: dict[str, Any], expect: dict[str, Any]) -> str | None:
    """Why `response` is not the right answer to `review`, or None when it is."""
    answer = response.get("response") or {}
    if answer.get("allowed") is not True:
        return f"not allowed: {answer.get('status')}"
    if not expect.get("uid", True):
        return None
    if answer.get("uid") != review["request"]["uid"]:
        return f"uid {answer.get('uid')!r} != {review['request']['uid']!r}"
    if not expect.get("patch", True):
        return None if "patch" not in answer else "an unexpected patch"
    if answer.get("patchType") != "JSONPatch" or not answer.get("patch"):
        return "no JSON patch"
    ops = json.loads(base64.b64decode(answer["patch"]))
    pod = jsonpatch.apply_patch(review["request"]["object"], ops)
    metadata = pod.get("metadata") or {}
    for field in ("labels", "annotations"):
        have = metadata.get(field) or {}
        for name, value in (expect.get(field) or {}).items():
            if value is None and name in have:
                return f"{field[:-1]} {name} present"
            if value is not None and have.get(name) != value:
                return f"{field[:-1]} {name}={have.get(name)!r}, expected {value!r}"
    images = {c["name"]: c.get("image") for c in (pod.get("spec") or {}).get("containers") or []}
    for name, image in (expect.get("images") or {}).items():
        if images.get(name) != image:
            return f"container {name} image {images.get(name)!r}, expected {image!r}"
    return None


class _Run:
    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.encoded = [item["body"].encode() for item in bodies]
        self.reviews = [json.loads(item["body"]) for item in bodies]
        self.expects = [item["expect"] for item in bodies]
        self.uids = [review["request"]["uid"] for review in self.reviews]
        self.answers: list[tuple[Any, Any] | None] = [None] * len(bodies)
        self.checked = [False] * len(bodies)
        self.next = 0
        self.errors = 0
        self.error_samples: list[str] = []

    def pick(self) -> int:
        index = self.next
        self.next = (index + 1) % len(self.encoded)
        return index

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES:
            self.error_samples.append(text)

    def check(self, index: int, status: int, raw: bytes) -> None:
        if status != 200:
            self.error(f"HTTP {status}: {raw[:200]!r}")
            return
        try:
            response = json.loads(raw)
        except ValueError:
            self.error(f"not JSON: {raw[:200]!r}")
            return
        expect = self.expects[index]
        if not self.checked[index]:
            problem = check_full(self.reviews[index], response, expect)
            if problem is not None:
                self.error(problem)
                return
            self.checked[index] = True
            self.answers[index] = (response["response"].get("patch"), response["response"].get("warnings"))
            return
        answer = response.get("response") or {}
        if answer.get("allowed") is not True:
            self.error(f"not allowed: {answer.get('status')}")
        elif expect.get("uid", True) and answer.get("uid") != self.uids[index]:
            self.error("wrong uid")
        elif expect.get("uid", True) and (answer.get("patch"), answer.get("warnings")) != self.answers[index]:
            self.error(f"a different answer than in warm-up (warnings: {answer.get('warnings')})")


async def _run(args: argparse.Namespace, run: _Run) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=args.cafile)
    connector = aiohttp.TCPConnector(limit=max(1, args.concurrency), ssl=context, ttl_dns_cache=None)
    headers = {"Content-Type": "application/json"}
    pids = [int(p) for p in args.cpu_pids.split(",") if p]
    trees = [int(p) for p in args.cpu_trees.split(",") if p]

    def server_pids() -> list[int]:
        return pids + [child for root in trees for child in common.descendants(root)]

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(latencies: list[float] | None) -> None:
            index = run.pick()
            started = time.perf_counter()
            try:
                async with session.post(args.url, data=run.encoded[index], headers=headers) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.error(f"{type(exc).__name__}: {exc}")
                return
            if latencies is not None:
                latencies.append(time.perf_counter() - started)
            run.check(index, status, raw)

        async def measure(concurrency: int, *, requests: int | None, seconds: float | None) -> dict[str, Any]:
            latencies: list[float] = []
            run.errors, run.error_samples = 0, []
            cpu_before = common.cpu_seconds(server_pids())
            started = time.perf_counter()
            deadline = started + seconds if seconds is not None else None
            remaining = [requests or 0]

            async def worker() -> None:
                while True:
                    if deadline is not None:
                        if time.perf_counter() >= deadline:
                            return
                    elif remaining[0] <= 0:
                        return
                    else:
                        remaining[0] -= 1
                    await one(latencies)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            cpu = common.cpu_seconds(server_pids()) - cpu_before
            count = len(latencies)
            return {
                "concurrency": concurrency,
                "count": count,
                "seconds": elapsed,
                "rps": count / elapsed if elapsed else 0.0,
                "errors": run.errors,
                "error_samples": run.error_samples,
                "server_cpu_s": cpu,
                "server_cpu_us_per_review": cpu / count * 1e6 if count else None,
                "latencies_ms": [round(value * 1000, 4) for value in latencies],
            }

        # Warm-up: every body checked in full once, connections open, the server's caches and pools hot.
        for _ in range(max(args.warmup, 2 * len(run.encoded))):
            await one(None)
        if not all(run.checked):
            raise SystemExit(f"warm-up failed: {run.errors} errors, e.g. {run.error_samples}")
        await asyncio.gather(*(one(None) for _ in range(args.concurrency)))
        result: dict[str, Any] = {}
        if args.requests:
            result["c1"] = await measure(1, requests=args.requests, seconds=None)
        if args.seconds:
            result["cN"] = await measure(args.concurrency, requests=None, seconds=args.seconds)
        return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--bodies", required=True, type=pathlib.Path, help="JSON list of {body, expect}")
    parser.add_argument("--requests", type=int, default=0, help="requests measured at concurrency 1 (0: none)")
    parser.add_argument("--concurrency", type=int, default=16, help="of the second, timed phase")
    parser.add_argument("--seconds", type=float, default=0.0, help="length of the concurrent phase (0: none)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--cpu-pids", default="", help="server pids whose CPU time is read around the phase")
    parser.add_argument("--cpu-trees", default="", help="pids whose whole process trees count (Postgres)")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    run = _Run(json.loads(args.bodies.read_text()))
    result = uvloop.run(_run(args, run))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
