"""Benchmark 1: the webhook alone — stepcache's reviews per second and latency against three floors, same run.

Servers (each pinned to core 0 with Postgres; the load generator on core 1; HTTPS keep-alive on loopback):
- (a) aiohttp + uvloop returning a constant response: TLS + HTTP + loop, and the load generator's ceiling;
- (b) the same plus one indexed asyncpg SELECT (stepcache's lookup statement);
- (c) kopf's `WebhookServer` with an `on.mutate` handler setting one annotation, with the versions we ship, and
  (c') the same script in a separate virtualenv holding what a plain `pip install kopf` resolves;
- stepcache itself (`python -m stepcache run`), Job- and Argo-shaped reviews, hit and miss, at 10k rows and,
  with `--rows-large`, at 1M rows (a second operator on a second database, up at the same time).
All servers are up together and measured in interleaved rounds, so a burst of noise from another tenant of the
machine lands on every server alike; latencies are pooled over the rounds.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import pathlib
import ssl
import subprocess
import sys
import time
import urllib.request
from typing import Any

from hack.cluster import operator as operator_harness

from bench import common, payloads, stage

__all__ = ["Prepared", "Server", "finish", "plain_kopf_python", "prepare", "run"]

_HANDLER_PATH = "/mutate-pods"
_SETS = 64
"""Distinct reviews per set (each its own key and uid), sent round-robin."""
_MISS_BASE = 100_000


@dataclasses.dataclass(kw_only=True)
class Server:
    """One endpoint under test and the bodies it is sent."""

    name: str
    label: str
    group: str
    url: str
    cafile: pathlib.Path
    bodies: pathlib.Path
    cpu_pids: list[int]
    cpu_trees: list[int] = dataclasses.field(default_factory=list)
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def plain_kopf_python(cache: pathlib.Path) -> tuple[str | None, dict[str, str]]:
    """A virtualenv with `pip install kopf` (then uvloop, so the loop is not what differs), created once.

    Returns its python and the versions pip resolved, or (None, {"error": ...}) without a package index.
    """
    venv = cache / "kopf-plain-venv"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if not marker.exists():
        common.say(f"(c') creating {venv}: pip install kopf; pip install uvloop")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        for package in ("kopf", "uvloop"):
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", package], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                return None, {"error": f"pip install {package} failed: {result.stderr.strip()[-300:]}"}
        marker.touch()
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    versions = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return str(python), versions


@dataclasses.dataclass(kw_only=True)
class Prepared:
    """Everything the admission benchmark (and the profile) send reviews to."""

    work: pathlib.Path
    sets: dict[tuple[str, str], list[payloads.Variant]]
    sizes: dict[str, int]
    tables: dict[str, Any]
    servers: list[Server]
    large_operators: list[operator_harness.OperatorProcess]
    certs: common.Certs

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)


def prepare(
    st: stage.Stage,
    *,
    results: common.Results,
    rows: int,
    rows_large: int | None,
    plain_kopf: bool,
    experiments: bool,
    cache_dir: pathlib.Path,
) -> Prepared:
    """Capture reviews, load the tables, start every server (all pinned to the server core); cached on the stage."""
    cached: Prepared | None = st.cache.get("admission")
    if cached is not None:
        return cached
    work = st.work / "admission"
    work.mkdir(parents=True, exist_ok=True)
    certs = common.make_certs(work / "tls", name="floors")
    assert st.operator is not None

    common.say("admission: capturing real AdmissionReviews from kube-apiserver (a Job's pod, an Argo step pod)")
    captured = payloads.capture(st.cp, namespace=stage.NAMESPACE, work=work)
    sets = {
        (kind, outcome): payloads.variants(
            captured, kind=kind, first=0 if outcome == "hit" else _MISS_BASE, count=_SETS
        )
        for kind in ("job", "argo")
        for outcome in ("hit", "miss")
    }
    sizes = {kind: len(json.dumps(sets[kind, "hit"][0].body, separators=(",", ":"))) for kind in ("job", "argo")}
    common.say(f"admission: review sizes {sizes} bytes")
    hits = sets["job", "hit"] + sets["argo", "hit"]

    databases: dict[int, str] = {rows: st.db.url}
    if rows_large:
        databases[rows_large] = st.create_database("stepcache_large")
    ids: dict[int, dict[str, int]] = {}
    loads: dict[str, Any] = {}
    for size, url in databases.items():
        common.say(f"admission: loading {size:,} rows with COPY")
        loaded = asyncio.run(payloads.load_table(url, filler=size - len(hits), hits=hits, namespace=stage.NAMESPACE))
        st.pin_postgres()
        ids[size] = loaded["ids"]
        loads[str(size)] = {"rows": loaded["rows"], "load_seconds": round(loaded["load_seconds"], 2)}
        common.say(f"admission: {loaded['rows']:,} rows loaded in {loaded['load_seconds']:.1f} s")

    servers: list[Server] = []

    def bodies(name: str, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> pathlib.Path:
        return payloads.encode_bodies(work / f"bodies-{name}.json", items)

    job_hits = sets["job", "hit"]
    # (a) and (b)
    keys_file = work / "lookup-keys.json"
    keys_file.write_text(json.dumps([[v.key.material["scope"], v.key.value] for v in job_hits]))
    constant_bodies = bodies("constant", [(v.body, {"uid": False}) for v in job_hits])
    for mode, label in (("constant", "(a) aiohttp+uvloop, constant"), ("select", "(b) aiohttp+uvloop + 1 SELECT")):
        port = common.free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.floor_aiohttp",
            "--mode",
            mode,
            "--port",
            str(port),
            "--cert",
            str(certs.cert_file),
            "--key",
            str(certs.key_file),
        ]
        if mode == "select":
            argv += ["--dsn", st.db.url, "--keys", str(keys_file)]
        process = st.spawn(argv, name=f"floor-{mode}")
        common.wait_tls(port, certs.ca_pem, process=process)
        servers.append(
            Server(
                name=f"floor-{mode}",
                label=label,
                group="floor",
                url=f"https://127.0.0.1:{port}/review",
                cafile=certs.ca_file,
                bodies=constant_bodies,
                cpu_pids=[process.pid],
                cpu_trees=[st.postmaster_pid] if mode == "select" else [],
            )
        )

    # (c) and (c')
    annotate = {"annotations": {"bench.stepcache.dev/touched": "true"}}
    kopf_bodies = {
        kind: bodies(f"kopf-{kind}", [(v.body, annotate) for v in sets[kind, "hit"]]) for kind in ("job", "argo")
    }
    pythons: list[tuple[str, str, str]] = [(sys.executable, "kopf", "(c) kopf floor, our pins")]
    if plain_kopf:
        plain, versions = plain_kopf_python(cache_dir)
        results["plain_kopf_versions"] = versions
        if plain is None:
            common.say(f"(c') skipped: {versions.get('error')}")
        else:
            common.say(f"(c') plain venv: kopf {versions.get('kopf')}, jsonpatch {versions.get('jsonpatch')}")
            pythons.append((plain, "kopf-plain", "(c') kopf floor, plain pip install kopf"))
            (st.work / "kopf-plain-python").write_text(plain)
    for python, name, label in pythons:
        port = common.free_port()
        process = st.spawn(
            [
                python,
                str(common.REPO / "bench" / "floor_kopf.py"),
                "--port",
                str(port),
                "--cert",
                str(certs.cert_file),
                "--key",
                str(certs.key_file),
            ],
            name=f"floor-{name}",
            env={"KUBECONFIG": str(st.cp.kubeconfig)},
        )
        common.wait_tls(port, certs.ca_pem, process=process, timeout=90)
        kinds = ("job", "argo") if name == "kopf" else ("job",)
        for kind in kinds:
            servers.append(
                Server(
                    name=f"{name}-{kind}",
                    label=f"{label}, {kind}",
                    group="floor",
                    url=f"https://127.0.0.1:{port}{_HANDLER_PATH}",
                    cafile=certs.ca_file,
                    bodies=kopf_bodies[kind],
                    cpu_pids=[process.pid],
                )
            )

    # stepcache, at each table size; and the experiments (10k rows, Job and Argo hits)
    operators: list[tuple[str, str, int, operator_harness.OperatorProcess, tuple[tuple[str, str], ...]]] = []
    every = tuple((kind, outcome) for kind in ("job", "argo") for outcome in ("hit", "miss"))
    operators.append(("stepcache", "stepcache", rows, st.operator, every))
    large: list[operator_harness.OperatorProcess] = []
    if rows_large:
        large.append(st.start_operator(databases[rows_large], name="operator-large"))
        operators.append(("stepcache", "stepcache", rows_large, large[-1], every))
    if experiments:
        for env, name, label, which_sets in _EXPERIMENTS:
            large.append(st.start_operator(st.db.url, name=f"operator-{name}", env=env))
            operators.append((name, label, rows, large[-1], which_sets))
    for name, label, size, operator, which in operators:
        ca_file = work / f"{name}-{size}-ca.crt"
        ca_file.write_bytes(operator.ca_pem)
        url = f"https://127.0.0.1:{operator.webhook_port}{_HANDLER_PATH}"
        for kind, outcome in which:
            items = [
                (v.body, payloads.expectation(v, outcome=outcome, entry_id=ids[size].get(v.key.value)))
                for v in sets[kind, outcome]
            ]
            servers.append(
                Server(
                    name=f"{name}-{kind}-{outcome}-{size}",
                    label=f"{label} {kind} {outcome}, {size:,} rows",
                    group="stepcache" if name == "stepcache" else "experiment",
                    url=url,
                    cafile=ca_file,
                    bodies=bodies(f"{name}-{kind}-{outcome}-{size}", items),
                    cpu_pids=[stage.pid_of(operator)],
                    cpu_trees=[st.postmaster_pid],
                )
            )
        _wait_opted_in(url, ca_file, sets["job", "miss"][0])

    prepared = Prepared(
        work=work, sets=sets, sizes=sizes, tables=loads, servers=servers, large_operators=large, certs=certs
    )
    st.cache["admission"] = prepared
    return prepared


_EXPERIMENTS: tuple[tuple[dict[str, str], str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        {
            "PYTHONPATH": f"{common.REPO / 'bench' / '_kopf_paths'}:{common.REPO}",
            "BENCH_KOPF_PATHS_PATCH": "1",
        },
        "exp-paths",
        "experiment: kopf paths-only JSON patch,",
        (("job", "hit"), ("job", "miss"), ("argo", "hit")),
    ),
    (
        {"STEPCACHE_DB_POOL_SIZE": "16"},
        "exp-pool16",
        "experiment: STEPCACHE_DB_POOL_SIZE=16,",
        (("job", "hit"),),
    ),
)
"""Operators run with one change each, to measure what it would gain end to end (not stepcache's defaults)."""


def run(
    st: stage.Stage,
    *,
    results: common.Results,
    rounds: int,
    requests: int,
    seconds: float,
    concurrency: int,
    rows: int,
    rows_large: int | None,
    plain_kopf: bool,
    experiments: bool,
    cache_dir: pathlib.Path,
) -> dict[str, Any]:
    prepared = prepare(
        st,
        results=results,
        rows=rows,
        rows_large=rows_large,
        plain_kopf=plain_kopf,
        experiments=experiments,
        cache_dir=cache_dir,
    )
    servers = prepared.servers
    for round_number in range(rounds):
        order = servers[round_number % len(servers) :] + servers[: round_number % len(servers)]
        for server in order:
            common.say(f"admission round {round_number + 1}/{rounds}: {server.label}")
            server.rounds.append(
                loadgen(
                    server,
                    prepared.work,
                    requests=requests // rounds,
                    seconds=seconds / rounds,
                    concurrency=concurrency,
                )
            )
    report = {
        "review_bytes": prepared.sizes,
        "tables": prepared.tables,
        "rounds": rounds,
        "concurrency": concurrency,
        "servers": {s.name: _merge(s) for s in servers},
    }
    results["admission"] = report
    return report


def finish(st: stage.Stage) -> None:
    """Stop the extra operators (large table, experiments): the later benchmarks want one recorder."""
    prepared: Prepared | None = st.cache.get("admission")
    if prepared is not None:
        for operator in prepared.large_operators:
            st.stop_operator(operator)
        prepared.large_operators.clear()


def _wait_opted_in(url: str, ca_file: pathlib.Path, variant: payloads.Variant) -> None:
    """The operator learns opted-in namespaces from a watch: send a review until it keys the pod."""
    context = ssl.create_default_context(cafile=str(ca_file))
    body = json.dumps(variant.body).encode()

    def keyed() -> bool:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            answer = json.load(response)["response"]
        patch = base64.b64decode(answer.get("patch") or "").decode()
        return "stepcache.dev~1key" in patch or "stepcache.dev/key" in patch

    common.wait_until(keyed, 60, "the operator to see the bench namespace as opted in", interval=0.3)


def loadgen(server: Server, work: pathlib.Path, *, requests: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """Run the load generator (pinned to the generator core) against one server; its JSON result."""
    out = work / f"result-{server.name}-{time.monotonic_ns()}.json"
    argv = [
        "taskset",
        "-c",
        str(common.GENERATOR_CORE),
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        server.url,
        "--cafile",
        str(server.cafile),
        "--bodies",
        str(server.bodies),
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
        "--cpu-pids",
        ",".join(map(str, server.cpu_pids)),
        "--cpu-trees",
        ",".join(map(str, server.cpu_trees)),
        "--out",
        str(out),
    ]
    result = subprocess.run(
        argv,
        cwd=common.REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120 + seconds + requests / 50,
        env={**os.environ},
    )
    if result.returncode != 0:
        raise RuntimeError(f"load generator for {server.label} failed: {result.stderr.strip()[-2000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return data


def _merge(server: Server) -> dict[str, Any]:
    """Pool the rounds: all c=1 latencies together; c=N as total reviews over total seconds."""
    merged: dict[str, Any] = {"label": server.label, "group": server.group}
    for phase in ("c1", "cN"):
        parts = [r[phase] for r in server.rounds if phase in r]
        if not parts:
            continue
        latencies = [value for part in parts for value in part["latencies_ms"]]
        count = sum(part["count"] for part in parts)
        seconds = sum(part["seconds"] for part in parts)
        cpu = sum(part["server_cpu_s"] for part in parts)
        merged[phase] = {
            "count": count,
            "seconds": round(seconds, 3),
            "rps": count / seconds if seconds else 0.0,
            "errors": sum(part["errors"] for part in parts),
            "error_samples": [s for part in parts for s in part["error_samples"]][:5],
            "server_cpu_us_per_review": cpu / count * 1e6 if count else None,
            "rps_per_round": [round(part["rps"], 1) for part in parts],
            "latency_ms": common.summarize(latencies),
        }
        if phase == "c1":
            merged[phase]["latencies_ms"] = latencies
    return merged
