"""Benchmark 5: where the hit path's CPU goes (py-spy), and the local experiment on kopf's patch building.

py-spy samples the operator (`record --native --format raw`) while the load generator sends Job-shaped hits.
Each sample of the event loop's thread is attributed to one bucket by its stack:
- kopf's `Patch.as_json_patch` (deep copy + merge + full jsonpatch diff) whenever it is on the stack;
- otherwise the innermost frame that belongs to a known owner: stepcache's own code, asyncpg (and the pool),
  prometheus_client, logging, kopf's engine (request parsing, causes, handler invocation, response building),
  aiohttp (HTTP parsing and writing), TLS (ssl.py, OpenSSL), the event loop (uvloop, asyncio);
- garbage collection wherever it interrupts.
Samples whose leaf is the loop's wait for I/O (`epoll_wait`) are idle and left out; so are other threads.
Standard-library frames (json, copy) count for whoever called them.
"""

from __future__ import annotations

import collections
import datetime
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import uvloop

from bench import admission, common, kopf_patch, stage
from stepcache import model, mutation

__all__ = ["classify", "run"]

_FILE = re.compile(r"\(([^()]*?)(?::\d+)?\)$")

# (bucket, substrings of a frame's file) — checked from the innermost frame outwards.
_OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stepcache (key, signature, patch, decision)", ("stepcache/",)),
    ("kubernetes_asyncio (the label PATCH client)", ("kubernetes_asyncio/", "urllib3/", "dateutil/")),
    ("asyncpg (query, pool, connection set-up)", ("asyncpg/",)),
    ("prometheus_client (metrics)", ("prometheus_client/",)),
    ("logging", ("structlog/", "logging/")),
    ("kopf engine (parse, causes, invocation, response)", ("kopf/",)),
    ("aiohttp (HTTP parse/write, routing)", ("aiohttp/", "multidict/", "yarl/")),
    ("TLS (ssl.py, OpenSSL)", ("ssl.py", "_ssl.c", "libssl", "libcrypto", "sslproto")),
    ("event loop (uvloop, asyncio)", ("uvloop/", "loop.c", "asyncio/", "_asynciomodule", "libuv", "core.c")),
)
_PATCH = "kopf: Patch.as_json_patch (deepcopy + merge + jsonpatch diff of the whole pod)"
_GC = "garbage collection"
_IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "uv__io_poll")


def classify(raw: str, *, main_marker: str = "stepcache/main.py") -> tuple[int, int, list[tuple[str, float]]]:
    """(busy samples, idle samples, [(bucket, share)]) from py-spy's raw (collapsed) output."""
    buckets: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if not any(main_marker in frame for frame in frames):
            continue  # another thread (thread pool, metrics server)
        if any(leaf in frames[-1] for leaf in _IDLE_LEAVES):
            idle += count
            continue
        busy += count
        buckets[_bucket(frames)] += count
    shares = [(name, n / busy) for name, n in buckets.most_common()] if busy else []
    return busy, idle, shares


def _bucket(frames: list[str]) -> str:
    if any("gc_collect" in frame for frame in frames[-6:]):
        return _GC
    if any("as_json_patch" in frame for frame in frames):
        return _PATCH
    for frame in reversed(frames):
        match = _FILE.search(frame)
        where = match.group(1) if match else frame
        for name, needles in _OWNERS:
            if any(needle in where or needle in frame for needle in needles):
                return name
    return "other"


def _py_spy() -> str | None:
    candidate = pathlib.Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def record(pid: int, out: pathlib.Path, *, seconds: float, rate: int) -> None:
    spy = _py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy (into the venv that runs the bench)")
    subprocess.run(
        [
            spy,
            "record",
            "--native",
            "--rate",
            str(rate),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(out),
            "--pid",
            str(pid),
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 60,
    )


def run(
    st: stage.Stage, *, results: common.Results, concurrency: int = 1, seconds: float = 15.0, rate: int = 100
) -> dict[str, Any]:
    prepared: admission.Prepared | None = st.cache.get("admission")
    if prepared is None:
        raise RuntimeError("the profile reuses the admission benchmark's servers: run it with --only admission too")
    profiles: dict[str, Any] = {}
    for name, server_name, marker in (
        ("stepcache job hit", "stepcache-job-hit-10000", "stepcache/main.py"),
        ("kopf floor job", "kopf-job", "floor_kopf.py"),
    ):
        server = prepared.server(server_name)
        out = prepared.work / f"profile-{server_name}.txt"
        common.say(f"profile: py-spy on {server.label} at c={concurrency} for {seconds:g} s")
        load: dict[str, Any] = {}

        def drive(server: admission.Server = server, load: dict[str, Any] = load) -> None:
            load.update(
                admission.loadgen(server, prepared.work, requests=0, seconds=seconds + 4, concurrency=concurrency)
            )

        thread = threading.Thread(target=drive, name="profile-load")
        thread.start()
        time.sleep(3)  # the load generator's warm-up
        record(server.cpu_pids[0], out, seconds=seconds, rate=rate)
        thread.join()
        busy, idle, shares = classify(out.read_text(), main_marker=marker)
        profiles[name] = {
            "samples": busy,
            "idle_samples": idle,
            "shares": shares,
            "raw": str(out),
            "rps_while_sampled": load.get("cN", {}).get("rps"),
            "errors": load.get("cN", {}).get("errors"),
        }
    report: dict[str, Any] = {"concurrency": concurrency, "rate_hz": rate, "profiles": profiles}
    cases = _patch_cases(prepared)
    rows = kopf_patch.compare(cases)
    plain = prepared.work.parent / "kopf-plain-python"
    if plain.exists():
        # kopf's way again with what a plain `pip install kopf` resolves (jsonpatch 1.48).
        cases_file = prepared.work / "patch-cases.json"
        cases_file.write_text(json.dumps(cases))
        result = subprocess.run(
            [plain.read_text().strip(), str(common.REPO / "bench" / "kopf_patch.py"), str(cases_file)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if result.returncode == 0:
            for row, other in zip(rows, json.loads(result.stdout), strict=True):
                row["kopf_us_plain"] = other["kopf_us"]
                row["kopf_ops_plain"] = other["kopf_ops"]
                row["equal_plain"] = other["equal"]
    report["patch_experiment"] = rows
    results["profile"] = report
    return report


def run_recorder(st: stage.Stage, *, results: common.Results, pods: int = 600, rate: int = 100) -> dict[str, Any]:
    """py-spy on the operator while `pods` pods reach Succeeded at once: where a recording's CPU goes."""
    from bench import recorder

    assert st.operator is not None
    st.cp.apply(st.operator.webhook_configuration())
    out = st.work / "profile-recorder.txt"
    spy = _py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy (into the venv that runs the bench)")
    common.say(f"profile: py-spy on the operator while {pods} pods are recorded")
    started: list[subprocess.Popen[bytes]] = []

    def start_sampling() -> None:
        started.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--native",
                    "--rate",
                    str(rate),
                    "--duration",
                    "600",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--pid",
                    str(stage.pid_of(operator)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    operator = st.operator
    try:
        run = uvloop.run(
            recorder.one_run(st, name="profiled", count=pods, rate=None, first=4_000_000, on_created=start_sampling)
        )
    finally:
        for process in started:
            process.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            process.wait(timeout=60)
        st.cp.kubectl("delete", "mutatingwebhookconfiguration", "stepcache", "--ignore-not-found", check=False)
        st.cache.setdefault("recorder-namespaces", []).append("bench-rec-profiled")
    busy, idle, shares = classify(out.read_text(), main_marker="stepcache/main.py")
    report = {
        "pods": pods,
        "rate_hz": rate,
        "samples": busy,
        "idle_samples": idle,
        "shares": shares,
        "rows_per_s": run["rows_per_s"],
        "raw": str(out),
    }
    results["profile_recorder"] = report
    return report


def _patch_cases(prepared: admission.Prepared) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """stepcache's real hit and miss patches, and kopf-floor's one annotation, on the captured pods."""
    cases = []
    options = mutation.ReplayOptions(cache_image="busybox:1.36.1")
    for kind in ("job", "argo"):
        variant = prepared.sets[kind, "hit"][0]
        pod = variant.pod
        signed = mutation.Signed(key=variant.key.value, key_containers=variant.key.containers, signature="ab" * 32)
        entry = model.CachedEntry(
            id=7,
            namespace=variant.namespace,
            cache_key=variant.key.value,
            termination_messages={"train": "accuracy=0.93\n", "report": "summary: ok"},
            argo_outputs={"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"},
            source_pod="source",
            finished_at=datetime.datetime.now(datetime.UTC),
            duration_seconds=300.0,
        )
        cases += [
            (kind, "hit", pod, mutation.hit_patch(pod, signed=signed, entry=entry, options=options, kfp=False)),
            (kind, "miss", pod, mutation.miss_patch(pod, signed=signed)),
            (kind, "one annotation (kopf floor)", pod, {"metadata": {"annotations": {"bench.stepcache.dev/t": "1"}}}),
        ]
    return cases


def main() -> None:
    """`python -m bench.profile RAW [MARKER]`: classify a py-spy raw file recorded earlier."""
    raw = pathlib.Path(sys.argv[1]).read_text()
    busy, idle, shares = classify(raw, main_marker=sys.argv[2] if len(sys.argv) > 2 else "stepcache/main.py")
    print(json.dumps({"busy": busy, "idle": idle, "shares": [(n, round(s * 100, 1)) for n, s in shares]}, indent=1))


if __name__ == "__main__":
    main()
