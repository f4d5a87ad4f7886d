"""What every benchmark shares: core pinning, CPU and memory readings from /proc, percentiles, certificates.

Pinning is how a 2-core machine gives stable, comparable figures: the server under test (and its Postgres) share
core 0, the load generator runs alone on core 1, so the generator never steals the server's cycles and a server's
CPU time per review can be read from /proc as a second, noise-robust measure next to the latency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from hack.cluster import controlplane, ports

from stepcache import tls

__all__ = [
    "GENERATOR_CORE",
    "REPO",
    "SERVER_CORE",
    "Certs",
    "Results",
    "cpu_seconds",
    "descendants",
    "free_port",
    "machine",
    "make_certs",
    "peak_rss_mib",
    "percentile",
    "pin",
    "rss_mib",
    "say",
    "summarize",
    "wait_tls",
    "wait_until",
]

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVER_CORE = 0
GENERATOR_CORE = 1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

_T = TypeVar("_T")


def say(text: str) -> None:
    """Progress on stderr; stdout carries the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], _T | None], timeout: float, what: str, *, interval: float = 0.1) -> _T:
    """The harness's poll with a deadline (`controlplane.wait_for`), polling a little faster."""
    return controlplane.wait_for(predicate, timeout, what, interval=interval)


free_port = ports.free_port


# --- processes ------------------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def pin(pid: int, cores: Iterable[int]) -> None:
    """Pin every thread of `pid` and of its descendants to `cores`; threads and processes they start inherit it."""
    cpus = set(cores)
    for process in descendants(pid):
        with contextlib.suppress(OSError):
            for task in pathlib.Path(f"/proc/{process}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds; exited ones count 0."""
    total = 0
    for pid in pids:
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / _CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """Resident set size of one process, in MiB."""
    pages = int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * _PAGE / 2**20


def peak_rss_mib(pid: int) -> float:
    """The highest resident set size the process has had so far (VmHWM), in MiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


# --- statistics -----------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank (no interpolation: p99.9 of 5,000
    samples is the 5th worst, a latency some request really had)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "p99.9": percentile(ordered, 99.9),
        "max": ordered[-1] if ordered else math.nan,
        "mean": sum(ordered) / len(ordered) if ordered else math.nan,
    }


# --- TLS ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Certs:
    """A CA and a serving certificate for 127.0.0.1, written to files."""

    ca_pem: bytes
    ca_file: pathlib.Path
    cert_file: pathlib.Path
    key_file: pathlib.Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))


def make_certs(directory: pathlib.Path, *, name: str = "bench") -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca = tls.make_ca(f"{name}-ca")
    serving = tls.issue(ca, common_name="127.0.0.1", ip_addresses=["127.0.0.1"], dns_names=["localhost"], server=True)
    cert_file, key_file, ca_file = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}-ca.crt"
    tls.write_pair(serving, cert_file=cert_file, key_file=key_file)
    ca_file.write_bytes(ca.cert_pem)
    return Certs(ca_pem=ca.cert_pem, ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def wait_tls(
    port: int, ca_pem: bytes, *, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until a TLS server on 127.0.0.1:`port` completes a handshake (and `process`, if given, still runs)."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))

    def handshake() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {process.returncode}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=1) as sock,
                context.wrap_socket(sock, server_hostname="127.0.0.1"),
            ):
                return True
        except OSError:
            return False

    wait_until(handshake, timeout, f"a TLS server on port {port}", interval=0.2)


# --- the run's record -----------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    meminfo = pathlib.Path("/proc/meminfo").read_text().split()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(meminfo[1]) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "packages": {
            name: _version(name)
            for name in ("kopf", "jsonpatch", "aiohttp", "uvloop", "asyncpg", "structlog", "kubernetes_asyncio")
        },
    }


class Results:
    """Everything measured in one invocation, saved as JSON after every step (so a crash keeps what was done)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def __setitem__(self, name: str, value: Any) -> None:
        self.data[name] = value
        self.save()

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)
