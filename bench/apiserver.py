"""Benchmark 2: pod CREATEs through the real kube-apiserver — what each webhook adds to a user's request.

Phases, each in a fresh namespace (deleted, and waited for, before the next): no webhook; kopf's no-op webhook
(the cost of calling any webhook); kopf setting one annotation (the cost of any patch); stepcache miss and hit,
registered from manifests/30-webhook.yaml as shipped. Each phase makes N CREATEs one after another (latency) and N
with W concurrent workers (throughput), over one aiohttp keep-alive client with the admin client certificate.

Pods are Job-shaped (the fixture's), never scheduled: a scheduling gate keeps the scheduler off them and there is
no node, so nothing but admission and storage runs. Webhook servers and Postgres stay pinned to the server core;
the client runs on the generator core; kube-apiserver and etcd use both (their CPU per CREATE is read from /proc).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import json
import os
import pathlib
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import uvloop

from bench import admission, common, payloads, pods, stage
from stepcache import keys, mutation

__all__ = ["run"]

_KOPF_LABEL = "bench.stepcache.dev/webhook"
_KOPF_CONFIG = "bench-kopf"
_WARMUP = 20
_WEBHOOK_METRIC = "apiserver_admission_webhook_admission_duration_seconds_count{"


def _kopf_webhook(port: int, ca_pem: bytes, *, phase: str) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": _KOPF_CONFIG},
        "webhooks": [
            {
                "name": "pods.bench.stepcache.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 2,
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/mutate-pods",
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {_KOPF_LABEL: phase}},
            }
        ],
    }


def _webhook_calls(st: stage.Stage, name: str) -> float:
    """How many admission calls kube-apiserver has made to webhook `name` (from its /metrics)."""
    import urllib.request

    request = urllib.request.Request(st.cp.server + "/metrics")
    context = ssl.create_default_context(cafile=str(st.cp.ca_file))
    context.load_cert_chain(st.cp.pki_dir / "admin.crt", st.cp.pki_dir / "admin.key")
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(_WEBHOOK_METRIC) and f'name="{name}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _control_plane_pids() -> list[int]:
    found = []
    for pid in common.descendants(os.getpid()):
        try:
            name = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("kube-apiserver", "etcd"):
            found.append(pid)
    return found


async def _insert_entry(dsn: str, *, namespace: str, key: keys.Key) -> int:
    now = datetime.datetime.now(datetime.UTC)
    conn = await asyncpg.connect(dsn)
    try:
        entry_id: int = await conn.fetchval(
            """INSERT INTO cache_entries (namespace, cache_key, termination_messages, key_material, source_namespace,
                   source_pod, source_uid, started_at, finished_at, duration_seconds)
               VALUES ($1, $2, $3, $4, $1, 'source', $5, $6, $7, 300) RETURNING id""",
            namespace,
            key.value,
            json.dumps({"train": "accuracy=0.93\n", "report": "ok"}),
            json.dumps(key.material),
            str(uuid.uuid4()),
            now - datetime.timedelta(minutes=65),
            now - datetime.timedelta(hours=1),
        )
        return entry_id
    finally:
        await conn.close()


async def _measure(
    client: pods.Api,
    namespace: str,
    body: bytes,
    check: Callable[[dict[str, Any]], str | None],
    *,
    count: int,
    workers: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    remaining = [count]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            try:
                status, pod = await client.create_pod(namespace, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            problem = f"HTTP {status}: {pod.get('message')}" if status != 201 else check(pod)
            if problem:
                errors.append(problem)

    cpu_pids = _control_plane_pids()
    cpu_before = common.cpu_seconds(cpu_pids)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    cpu = common.cpu_seconds(cpu_pids) - cpu_before
    return {
        "count": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "errors": len(errors),
        "error_samples": errors[:5],
        "apiserver_etcd_cpu_ms_per_create": cpu / max(1, len(latencies)) * 1000,
        "latency_ms": common.summarize(v * 1000 for v in latencies),
    }


def _expect_labels(**labels: str | None) -> Callable[[dict[str, Any]], str | None]:
    def check(pod: dict[str, Any]) -> str | None:
        have = pod["metadata"].get("labels") or {}
        for name, value in labels.items():
            if have.get(name) != value:
                return f"label {name}={have.get(name)!r}, expected {value!r}"
        return None

    return check


def _expect_annotation(name: str) -> Callable[[dict[str, Any]], str | None]:
    def check(pod: dict[str, Any]) -> str | None:
        return None if name in (pod["metadata"].get("annotations") or {}) else f"annotation {name} missing"

    return check


def _none(pod: dict[str, Any]) -> str | None:
    return None


@dataclasses.dataclass(kw_only=True)
class _Phase:
    name: str
    label: str
    namespace: str
    check: Callable[[dict[str, Any]], str | None] = _none
    webhook: str | None = None
    sequential: list[float] = dataclasses.field(default_factory=list)
    concurrent: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


def _webhook_for(config: dict[str, Any], *, name: str, webhook: str, selector: dict[str, Any]) -> dict[str, Any]:
    """A copy of a MutatingWebhookConfiguration under another name, for namespaces matching `selector`."""
    config = copy.deepcopy(config)
    config["metadata"]["name"] = name
    config["webhooks"][0]["name"] = webhook
    config["webhooks"][0]["namespaceSelector"] = selector
    return config


def run(
    st: stage.Stage, *, results: common.Results, creates: int, workers: int, experiments: bool = True
) -> dict[str, Any]:
    """Every phase's webhook registered at once, each selecting its own namespace, and the CREATEs interleaved:
    sequential ones one phase after the other pod by pod, concurrent ones in rounds — so noise from the machine's
    other tenants falls on every phase alike."""
    assert st.operator is not None
    certs = common.make_certs(st.work / "apiserver" / "tls", name="kopf-webhook")
    configs: list[dict[str, Any]] = []
    phases = [_Phase(name="none", label="no webhook", namespace="bench-api-none")]
    for mode, label in (("noop", "kopf no-op webhook"), ("annotate", "kopf webhook, one annotation")):
        port = common.free_port()
        process = st.spawn(
            [
                sys.executable,
                str(common.REPO / "bench" / "floor_kopf.py"),
                "--port",
                str(port),
                "--mode",
                mode,
                "--cert",
                str(certs.cert_file),
                "--key",
                str(certs.key_file),
            ],
            name=f"apiserver-kopf-{mode}",
            env={"KUBECONFIG": str(st.cp.kubeconfig)},
        )
        common.wait_tls(port, certs.ca_pem, process=process, timeout=90)
        webhook = f"{mode}.kopf.bench.stepcache.dev"
        configs.append(
            _webhook_for(
                _kopf_webhook(port, certs.ca_pem, phase=f"kopf-{mode}"),
                name=f"bench-kopf-{mode}",
                webhook=webhook,
                selector={"matchLabels": {_KOPF_LABEL: f"kopf-{mode}"}},
            )
        )
        phases.append(
            _Phase(
                name=f"kopf-{mode}",
                label=label,
                namespace=f"bench-api-kopf-{mode}",
                webhook=webhook,
                check=_expect_annotation("bench.stepcache.dev/touched") if mode == "annotate" else _none,
            )
        )
    # stepcache as shipped (namespaceSelector stepcache.dev/enabled=true), minus the experiment's namespaces.
    shipped = st.operator.webhook_configuration()
    selector = copy.deepcopy(shipped["webhooks"][0]["namespaceSelector"])
    selector["matchExpressions"] = [{"key": _KOPF_LABEL, "operator": "DoesNotExist"}]
    shipped["webhooks"][0]["namespaceSelector"] = selector
    configs.append(shipped)
    operators = [("stepcache", "stepcache", shipped["webhooks"][0]["name"])]
    experiment = None
    if experiments:
        # The same operator with kopf's JSON patch built from the patched paths (bench/kopf_patch.py).
        env, _, _, _ = admission._EXPERIMENTS[0]
        experiment = st.start_operator(st.db.url, name="operator-apiserver-exp-paths", env=env)
        webhook = "exp-paths.bench.stepcache.dev"
        configs.append(
            _webhook_for(
                experiment.webhook_configuration(),
                name="bench-exp-paths",
                webhook=webhook,
                selector={"matchLabels": {"stepcache.dev/enabled": "true", _KOPF_LABEL: "exp-paths"}},
            )
        )
        operators.append(("exp-paths", "experiment: kopf paths-only patch, stepcache", webhook))
    for name, label, webhook in operators:
        for outcome in ("miss", "hit"):
            phases.append(
                _Phase(
                    name=f"{name}-{outcome}",
                    label=f"{label} {outcome}",
                    namespace=f"bench-api-{name}-{outcome}",
                    webhook=webhook,
                )
            )
    for config in configs:
        st.cp.apply(config)
    for phase in phases:
        labels: dict[str, str] = {}
        if phase.name.startswith("kopf"):
            labels[_KOPF_LABEL] = phase.name
        elif phase.name != "none":
            labels["stepcache.dev/enabled"] = "true"
            if phase.name.startswith("exp-paths"):
                labels[_KOPF_LABEL] = "exp-paths"
        st.cp.create_namespace(phase.namespace, labels=labels)

    body = json.dumps(pods.job_pod(10), separators=(",", ":")).encode()
    original_affinity = os.sched_getaffinity(0)

    async def prepare(client: pods.Api, phase: _Phase) -> None:
        if phase.webhook is not None:
            before = _webhook_calls(st, phase.webhook)
            keyed_needed = not phase.name.startswith("kopf")

            async def called_now() -> bool:
                _, pod = await client.create_pod(phase.namespace, body, dry_run=True)
                keyed = mutation.KEY in (pod["metadata"].get("annotations") or {})
                return _webhook_calls(st, phase.webhook or "") > before and (keyed or not keyed_needed)

            await _poll(called_now, 60, f"kube-apiserver to call the webhook of {phase.label}")
        if phase.name.endswith("-hit"):
            _, pod = await client.create_pod(phase.namespace, body, dry_run=True)
            annotations = pod["metadata"]["annotations"]
            key = keys.compute(
                pod,
                namespace=phase.namespace,
                options=keys.KeyOptions(),
                references=payloads.references_view(phase.namespace),
                containers=annotations[mutation.KEY_CONTAINERS].split(","),
            )
            if key.value != annotations[mutation.KEY]:
                raise RuntimeError("the key recomputed from the admitted pod differs from its annotation")
            entry_id = await _insert_entry(st.db.url, namespace=phase.namespace, key=key)
            phase.check = _expect_labels(**{mutation.HIT: "true", mutation.CACHE_ID: str(entry_id)})
        elif phase.name.endswith("-miss"):
            phase.check = _expect_labels(**{mutation.CACHE_ID: "", mutation.HIT: None})

    async def one(client: pods.Api, phase: _Phase) -> None:
        started = time.perf_counter()
        try:
            status, pod = await client.create_pod(phase.namespace, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            phase.errors.append(f"{type(exc).__name__}: {exc}")
            return
        phase.sequential.append(time.perf_counter() - started)
        problem = f"HTTP {status}: {pod.get('message')}" if status != 201 else phase.check(pod)
        if problem:
            phase.errors.append(problem)

    async def measure() -> None:
        client = pods.Api(st, limit=workers)
        try:
            for phase in phases:
                await prepare(client, phase)
                await _measure(client, phase.namespace, body, phase.check, count=_WARMUP, workers=1)
            common.say(f"apiserver: {creates} sequential CREATEs per phase, interleaved pod by pod")
            for _ in range(creates):
                for phase in phases:
                    await one(client, phase)
            rounds = 5
            common.say(f"apiserver: {creates} CREATEs per phase by {workers} workers, in {rounds} interleaved rounds")
            for _ in range(rounds):
                for phase in phases:
                    phase.concurrent.append(
                        await _measure(
                            client, phase.namespace, body, phase.check, count=creates // rounds, workers=workers
                        )
                    )
        finally:
            await client.close()

    try:
        os.sched_setaffinity(0, {common.GENERATOR_CORE})
        uvloop.run(measure())
    finally:
        os.sched_setaffinity(0, original_affinity)
        for config in configs:
            st.cp.kubectl(
                "delete", "mutatingwebhookconfiguration", config["metadata"]["name"], "--ignore-not-found", check=False
            )
        if experiment is not None:
            st.stop_operator(experiment)
        for phase in phases:
            st.cp.kubectl("delete", "namespace", phase.namespace, "--wait=false", "--ignore-not-found", check=False)
    report: dict[str, Any] = {"creates": creates, "workers": workers, "phases": {}}
    for phase in phases:
        rounds = phase.concurrent
        count = sum(r["count"] for r in rounds)
        seconds = sum(r["seconds"] for r in rounds)
        report["phases"][phase.name] = {
            "label": phase.label,
            "sequential": {
                "count": len(phase.sequential),
                "errors": len(phase.errors),
                "error_samples": phase.errors[:5],
                "latency_ms": common.summarize(v * 1000 for v in phase.sequential),
            },
            "concurrent": {
                "count": count,
                "rps": count / seconds if seconds else 0.0,
                "errors": sum(r["errors"] for r in rounds),
                "error_samples": [e for r in rounds for e in r["error_samples"]][:5],
                "apiserver_etcd_cpu_ms_per_create": sum(
                    r["apiserver_etcd_cpu_ms_per_create"] * r["count"] for r in rounds
                )
                / max(1, count),
                "latency_ms": common.summarize([]),  # per-round summaries below; pooled p50 is not meaningful
                "rounds_p50_ms": [round(r["latency_ms"]["p50"], 2) for r in rounds],
            },
        }
    results["apiserver"] = report
    return report


async def _poll(predicate: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)
