"""`make demo`: stepcache on a local control plane, an example pipeline run twice, the second from cache.

Builds (or reuses) the control plane, starts a local Postgres, the operator and the process kubelet, runs
examples/pipeline.yaml twice in an opted-in namespace and prints, per step, how long each run took, whether the second
was served from cache and whether both produced the same output; then the cache as kubectl shows it (`kubectl get ce`)
and the CacheHit Events on the served pods. Then it shuts everything down, or with --keep leaves it running and prints
the KUBECONFIG to use.

With --argo (`make demo DEMO=argo`) the same story runs with Argo Workflows v4.0.5 (built from Go modules on first
use) and an S3 artifact repository: examples/argo-workflow.yaml, whose steps pass an output parameter, a `result` and
an output artifact, run twice; the table compares every output, the artifact's bytes included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import signal
import sys
import tempfile
import time
from typing import Any

import yaml

from hack.cluster import argo as argo_harness
from hack.cluster import controlplane, postgres
from hack.cluster import kubelet as process_kubelet
from hack.cluster import operator as operator_harness

NAMESPACE = "pipelines"
NODE = "demo-node"
IMAGE = "busybox:1.36.1"
PIPELINE = controlplane.REPO / "examples" / "pipeline.yaml"
WORKFLOW = controlplane.REPO / "examples" / "argo-workflow.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave everything running; print the KUBECONFIG")
    parser.add_argument("--argo", action="store_true", help="run the Argo Workflows story (builds Argo on first use)")
    args = parser.parse_args(argv)
    # SIGTERM (a supervisor, `kill`) stops everything the way Ctrl-C does: through the `finally` below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    work = pathlib.Path(tempfile.mkdtemp(prefix="stepcache-demo-"))
    say(f"work directory: {work}")
    say("control plane: building or reusing (the first build takes several minutes)")
    cp = controlplane.ControlPlane(workdir=work / "control-plane")
    db = postgres.TempPostgres(work / "postgres")
    kubelet: process_kubelet.KubeletProcess | None = None
    operator: operator_harness.OperatorProcess | None = None
    stack = contextlib.ExitStack()
    try:
        image_bins = []
        if args.argo:
            say("argo: building or reusing workflow-controller and argoexec v4.0.5")
            image_bins.append(argo_harness.bin_dir())
        cp.start()
        say(f"control plane: up at {cp.server}")
        db.start()
        say(f"postgres: up at {db.url}")
        kubelet = process_kubelet.KubeletProcess(
            kubeconfig=cp.kubeconfig,
            node=NODE,
            logs_dir=work / "pods",
            log_file=work / "kubelet.log",
            image_bins=image_bins,
        )
        kubelet.start()
        wait_schedulable(cp, kubelet, NODE)
        say("process kubelet: node demo-node is Ready")
        operator_harness.install_manifests(cp)
        operator = operator_harness.OperatorProcess(
            cp, database_url=db.url, workdir=work / "operator", env=operator_harness.FAST_MIRROR
        )
        operator.start()
        operator.register_webhook()
        say("stepcache: operator running as its ServiceAccount, webhook registered")
        cp.create_namespace(NAMESPACE, labels={"stepcache.dev/enabled": "true"})
        wait_opted_in(cp)

        if args.argo:
            first, second = argo_story(cp, stack, work)
        else:
            steps = yaml.safe_load(PIPELINE.read_text())["steps"]
            say("run 1 (nothing cached yet)")
            first = run_pipeline(cp, steps, run=1)
            for step in first:
                wait_recorded(cp, step["pod"])
            say("run 2 (same pipeline, new Jobs)")
            second = run_pipeline(cp, steps, run=2)

        print()
        print_table(first, second)
        print()
        print(cp.kubectl("get", "pods", "-n", NAMESPACE, "-L", "stepcache.dev/cache-id,stepcache.dev/hit").stdout)
        wait_cache_view(cp, hit_pods=[s["pod"] for s in second if s["hit"]])
        for command in (
            ["get", "ce", "-n", NAMESPACE],
            ["get", "events", "-n", NAMESPACE, "--field-selector", "reason=CacheHit"],
        ):
            print(f"$ kubectl {' '.join(command)}")
            print(cp.kubectl(*command).stdout)
        if args.keep:
            print(
                f"everything keeps running. Use:\n  export KUBECONFIG={cp.kubeconfig}\n"
                f"  {cp.bin_dir / 'kubectl'} get pods -n {NAMESPACE}\nPress Ctrl-C to stop."
            )
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    signal.pause()
        return 0 if all(s["hit"] and s["equal"] for s in compare(first, second)) else 1
    finally:
        stack.close()
        if operator is not None:
            operator.stop()
        if kubelet is not None:
            kubelet.stop()
        db.stop()
        cp.stop(keep_workdir=True)
        say(f"stopped; logs kept in {work}")


def say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def wait_schedulable(cp: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, node: str) -> None:
    def schedulable() -> bool:
        kubelet.check_running()
        nodes = cp.api("/api/v1/nodes")["items"]
        return any(n["metadata"]["name"] == node and process_kubelet.schedulable(n) for n in nodes)

    controlplane.wait_for(schedulable, 60, f"node {node} to be Ready and untainted")


def wait_opted_in(cp: controlplane.ControlPlane) -> None:
    """The operator learns opted-in namespaces from a watch: probe with a dry-run pod until it keys pods here."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "probe-"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": IMAGE, "command": ["true"]}]},
    }

    def pod_keyed() -> bool:
        out = cp.kubectl("create", "-n", NAMESPACE, "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
        return "stepcache.dev/key" in json.loads(out.stdout)["metadata"].get("annotations", {})

    controlplane.wait_for(pod_keyed, 30, "the operator to see the namespace as opted in")


def job(step: str, script: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": f"{step}-", "labels": {"demo/step": step}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"demo/step": step}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": IMAGE,
                            "command": ["sh", "-c", script],
                            "env": [{"name": "INPUT", "value": value}],
                        }
                    ],
                },
            },
        },
    }


def run_pipeline(cp: controlplane.ControlPlane, steps: list[dict[str, Any]], *, run: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    value = ""
    for step in steps:
        started = time.monotonic()
        created = json.loads(
            cp.kubectl(
                "create",
                "-n",
                NAMESPACE,
                "-o",
                "json",
                "-f",
                "-",
                input=json.dumps(job(step["name"], step["script"], value)),
            ).stdout
        )
        name = created["metadata"]["name"]

        def complete(name: str = name) -> bool:
            status = json.loads(cp.kubectl("get", "job", name, "-n", NAMESPACE, "-o", "json").stdout).get("status", {})
            if status.get("failed"):
                raise RuntimeError(f"job {name} failed")
            return bool(status.get("succeeded"))

        controlplane.wait_for(complete, 120, f"job {name}")
        seconds = time.monotonic() - started
        pods = json.loads(cp.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"job-name={name}", "-o", "json").stdout)
        pod = pods["items"][0]
        value = pod["status"]["containerStatuses"][0]["state"]["terminated"].get("message", "")
        hit = pod["metadata"].get("labels", {}).get("stepcache.dev/hit") == "true"
        say(f"  {step['name']}: {seconds:.1f} s{' (from cache)' if hit else ''} -> {value!r}")
        results.append(
            {"step": step["name"], "seconds": seconds, "output": value, "hit": hit, "pod": pod["metadata"]["name"]}
        )
    return results


def argo_story(
    cp: controlplane.ControlPlane, stack: contextlib.ExitStack, work: pathlib.Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Argo's CRDs, an S3 bucket and the workflow-controller; then the example Workflow twice."""
    argo_harness.install_crds(cp)
    s3 = stack.enter_context(argo_harness.S3Server())
    controller = stack.enter_context(
        argo_harness.WorkflowController(
            cp, artifact_repository=s3.repository(), log_file=work / "workflow-controller.log"
        )
    )
    argo = argo_harness.ArgoCluster(cp, controller, s3)
    argo.prepare_namespace(NAMESPACE)
    say(f"argo: workflow-controller running, artifacts in {s3.url}")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    runs = []
    for run in (1, 2):
        say(f"run {run}" + (" (nothing cached yet)" if run == 1 else " (same Workflow, submitted again)"))
        done = argo.run(NAMESPACE, workflow, timeout=180)
        if done["status"]["phase"] != "Succeeded":
            raise RuntimeError(f"workflow {done['metadata']['name']}: {done['status'].get('message')}")
        steps = [argo_step(argo, done, name) for name in ("produce", "consume")]
        for step in steps:
            say(f"  {step['step']}: {step['seconds']:.1f} s{' (from cache)' if step['hit'] else ''} -> {step['shown']}")
            if run == 1:
                wait_recorded(cp, step["pod"])
        runs.append(steps)
    return runs[0], runs[1]


def argo_step(argo: argo_harness.ArgoCluster, workflow: dict[str, Any], name: str) -> dict[str, Any]:
    """One step's time, whether it was served, and its outputs: parameters, `result`, and artifacts' file contents."""
    node = argo.node(workflow, name)
    pod = argo.pod_of(workflow, name)
    outputs = node.get("outputs", {})
    artifacts = {
        artifact["name"]: argo_harness.extract_tgz(argo.s3.get(artifact["s3"]["key"]))
        for artifact in outputs.get("artifacts", [])
        if "s3" in artifact
    }
    parameters = {p["name"]: p["value"] for p in outputs.get("parameters", [])}
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    seconds = time.mktime(time.strptime(node["finishedAt"], fmt)) - time.mktime(time.strptime(node["startedAt"], fmt))
    shown = ", ".join(f"{k}={v!r}" for k, v in parameters.items())
    if artifacts:
        sizes = [f"{n} ({sum(len(b) for b in files.values())} bytes)" for n, files in artifacts.items()]
        shown += ", artifact " + ", ".join(sizes)
    return {
        "step": name,
        "seconds": seconds,
        "hit": pod["metadata"].get("labels", {}).get("stepcache.dev/hit") == "true",
        "output": {"parameters": parameters, "result": outputs.get("result"), "artifacts": artifacts},
        "shown": shown,
        "pod": pod["metadata"]["name"],
    }


def wait_recorded(cp: controlplane.ControlPlane, pod: str) -> None:
    def recorded() -> bool:
        got = json.loads(cp.kubectl("get", "pod", pod, "-n", NAMESPACE, "-o", "json").stdout)
        return str(got["metadata"].get("labels", {}).get("stepcache.dev/cache-id", "")).isdigit()

    controlplane.wait_for(recorded, 60, f"pod {pod} to be recorded")


def wait_cache_view(cp: controlplane.ControlPlane, *, hit_pods: list[str]) -> None:
    """Hits reach CacheEntry status and Events a moment after the pods ran (off the webhook path): wait for them."""

    def shown() -> bool:
        entries = json.loads(cp.kubectl("get", "ce", "-n", NAMESPACE, "-o", "json").stdout)["items"]
        hits = sum(int(e.get("status", {}).get("hits") or 0) for e in entries)
        listed = cp.kubectl(
            "get", "events", "-n", NAMESPACE, "--field-selector", "reason=CacheHit", "-o", "json"
        ).stdout
        posted = {e["involvedObject"]["name"] for e in json.loads(listed)["items"]}
        return hits >= len(hit_pods) and set(hit_pods) <= posted

    controlplane.wait_for(shown, 60, "hits on the CacheEntries and a CacheHit Event on each served pod")


def compare(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "step": a["step"],
            "run1": a["seconds"],
            "run2": b["seconds"],
            "hit": b["hit"],
            "equal": a["output"] == b["output"],
        }
        for a, b in zip(first, second, strict=True)
    ]


def print_table(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> None:
    rows = compare(first, second)
    print(f"{'step':<10} {'run 1 (s)':>10} {'run 2 (s)':>10}  {'served from cache?':<19} {'outputs equal?':<14}")
    for row in rows:
        print(
            f"{row['step']:<10} {row['run1']:>10.1f} {row['run2']:>10.1f}  {'yes' if row['hit'] else 'no':<19} "
            f"{'yes' if row['equal'] else 'no':<14}"
        )
    total1 = sum(r["run1"] for r in rows)
    total2 = sum(r["run2"] for r in rows)
    print(f"{'total':<10} {total1:>10.1f} {total2:>10.1f}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # SIGINT or SIGTERM mid-run: everything was stopped on the way out
        sys.exit(130)
