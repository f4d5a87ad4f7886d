"""Fixtures that install stepcache into the shared control plane: Postgres, manifests, the operator, its webhook."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hack.cluster import controlplane, postgres
from hack.cluster import operator as operator_harness
from hack.cluster.controlplane import wait_for

__all__ = ["Cluster", "cluster", "database", "namespace", "stepcache"]

STEP_IMAGE = "busybox:1.36.1"


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[postgres.TempPostgres]:
    with postgres.TempPostgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def stepcache(
    control_plane: controlplane.ControlPlane,
    kubelet: Any,
    database: postgres.TempPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[operator_harness.OperatorProcess]:
    operator_harness.install_manifests(control_plane)
    process = operator_harness.OperatorProcess(
        control_plane,
        database_url=database.url,
        workdir=tmp_path_factory.mktemp("operator"),
        env=operator_harness.FAST_MIRROR,
    )
    process.start()
    process.register_webhook()
    try:
        yield process
    finally:
        process.stop()
        print(f"\nstepcache operator log: {process.log_file}")


class Cluster:
    """What an e2e test drives: kubectl against one fresh namespace, the rows in Postgres, the operator's log."""

    def __init__(
        self,
        cp: controlplane.ControlPlane,
        db: postgres.TempPostgres,
        operator: operator_harness.OperatorProcess,
        namespace: str,
    ) -> None:
        self.cp = cp
        self.db = db
        self.operator = operator
        self.namespace = namespace

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cp.kubectl("--namespace", self.namespace, *args, input=input, check=check)

    def create(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """Create an object; return it as the API server stored it, and kubectl's stderr (admission warnings)."""
        result = self.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(obj))
        return json.loads(result.stdout), result.stderr

    def create_dry_run(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """What the API server would store (admission included), without storing it."""
        result = self.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(obj))
        return json.loads(result.stdout), result.stderr

    def pod(self, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "pod", name, "-o", "json").stdout)  # type: ignore[no-any-return]

    def pods_of_job(self, job: str) -> list[dict[str, Any]]:
        listed = json.loads(self.kubectl("get", "pods", "-l", f"job-name={job}", "-o", "json").stdout)
        return listed["items"]  # type: ignore[no-any-return]

    def wait_pod_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            pod = self.pod(name)
            current = pod.get("status", {}).get("phase")
            if current in ("Failed",) and phase != "Failed":
                raise AssertionError(f"pod {name} failed: {json.dumps(pod.get('status'), indent=1)}")
            return pod if current == phase else None

        return wait_for(reached, timeout, f"pod {self.namespace}/{name} to be {phase}")

    def wait_label(self, name: str, label: str, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
        def labelled() -> dict[str, Any] | None:
            pod = self.pod(name)
            value = pod["metadata"].get("labels", {}).get(label)
            return pod if predicate(value) else None

        return wait_for(labelled, timeout, f"pod {self.namespace}/{name} label {label} to satisfy the predicate")

    def wait_recorded(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_label(name, "stepcache.dev/cache-id", lambda v: bool(v) and v.isdigit(), timeout)

    def run_job(self, job: Mapping[str, Any], timeout: float = 90.0) -> dict[str, Any]:
        """Create a Job and wait for it to complete; return its single pod."""
        created, _ = self.create(job)
        name = created["metadata"]["name"]

        def complete() -> bool:
            status = json.loads(self.kubectl("get", "job", name, "-o", "json").stdout).get("status", {})
            if status.get("failed"):
                raise AssertionError(f"job {name} failed: {status}")
            return bool(status.get("succeeded"))

        wait_for(complete, timeout, f"job {self.namespace}/{name} to complete")
        pods = self.pods_of_job(name)
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return pods[0]

    def rows(self) -> list[dict[str, Any]]:
        """This namespace's cache entries, as JSON objects."""
        out = self.db.run_sql(
            "SELECT coalesce(json_agg(json_build_object("
            "'id', id, 'cache_key', cache_key, 'finished_at', extract(epoch from finished_at),"
            "'termination_messages', termination_messages, 'source_pod', source_pod) ORDER BY id), '[]')"
            f" FROM cache_entries WHERE namespace = '{self.namespace}'"
        )
        return json.loads(out)  # type: ignore[no-any-return]

    def wait_log_event(self, event: str, pod: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for a structured log event of the operator about one pod."""

        def found() -> dict[str, Any] | None:
            for line in self.operator.logs().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event and str(record.get("pod", "")).endswith(f"/{pod}"):
                    return record  # type: ignore[no-any-return]
            return None

        return wait_for(found, timeout, f"operator log event {event} for pod {pod}")


@pytest.fixture
def namespace(control_plane: controlplane.ControlPlane) -> str:
    """A fresh namespace opted in to stepcache (keys are namespace-scoped, so tests never share entries)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name, labels={"stepcache.dev/enabled": "true"})
    return name


@pytest.fixture
def cluster(
    control_plane: controlplane.ControlPlane,
    database: postgres.TempPostgres,
    stepcache: operator_harness.OperatorProcess,
    namespace: str,
) -> Cluster:
    # The operator learns opted-in namespaces from a watch; wait until it has seen this one.
    c = Cluster(control_plane, database, stepcache, namespace)
    _wait_namespace_known(c)
    return c


def _wait_namespace_known(c: Cluster, timeout: float = 30.0) -> None:
    """Probe with a dry-run pod until the webhook treats the namespace as opted in (it then adds a key)."""
    probe = step_pod("probe", "true")

    def known() -> bool:
        result = c.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(probe))
        return "stepcache.dev/key" in json.loads(result.stdout)["metadata"].get("annotations", {})

    wait_for(known, timeout, f"the operator to see namespace {c.namespace} as opted in")


def step_container(script: str, *, name: str = "main", image: str = STEP_IMAGE) -> dict[str, Any]:
    return {"name": name, "image": image, "command": ["sh", "-c", script]}


def step_pod(prefix: str, script: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": f"{prefix}-", **metadata},
        "spec": {"restartPolicy": "Never", "containers": [step_container(script)]},
    }


def step_job(prefix: str, script: str, *, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    template_meta: dict[str, Any] = {}
    if annotations:
        template_meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": f"{prefix}-"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": template_meta,
                "spec": {"restartPolicy": "Never", "containers": [step_container(script)]},
            },
        },
    }


def seconds_between(start: str, end: str) -> float:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return time.mktime(time.strptime(end, fmt)) - time.mktime(time.strptime(start, fmt))
