"""Argo Workflows on the local control plane: its CRDs, a real workflow-controller, and an S3 artifact repository.

stepcache's Argo claims are about what Argo itself does with a pod — `init` downloading inputs, `wait` reporting
outputs in a WorkflowTaskResult and uploading artifacts, the controller turning those into node outputs — so the
e2e tests run the real workflow-controller and argoexec, built from the pinned Go module by
`hack/cluster/build-argo.sh`. The controller runs as a process against the harness's kube-apiserver; its pods run
under the process kubelet, which needs `argoexec` on the containers' PATH (`KubeletProcess(image_bins=[bin_dir()])`).

The artifact repository is moto's S3 server, in-process on 127.0.0.1 (argoexec's minio-go client speaks to it
path-style over plain HTTP). A namespace runs workflows once `ArgoCluster.prepare_namespace` gave it the repository's
credentials and the RBAC argoexec's `wait` needs.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pathlib
import subprocess
import tarfile
import urllib.parse
from collections.abc import Mapping
from typing import Any

import yaml

from hack.cluster import controlplane, ports
from hack.cluster.controlplane import wait_for

__all__ = [
    "ARTIFACTS_SECRET",
    "CONTROLLER_NAMESPACE",
    "ArgoCluster",
    "S3Server",
    "WorkflowController",
    "bin_dir",
    "build_dir",
    "extract_tgz",
    "install_crds",
]

BUILD_SCRIPT = controlplane.REPO / "hack" / "cluster" / "build-argo.sh"
BINARIES = ("workflow-controller", "argoexec")
CONTROLLER_NAMESPACE = "argo"
CONFIG_MAP = "workflow-controller-configmap"
ARTIFACTS_SECRET = "argo-artifacts"
EXECUTOR_ROLE = "argo-executor"
TERMINAL_PHASES = ("Succeeded", "Failed", "Error")
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
NODE_ID_ANNOTATION = "workflows.argoproj.io/node-id"


@functools.cache
def build_dir() -> pathlib.Path:
    """The directory holding Argo's `bin/` and `crds/`, built by hack/cluster/build-argo.sh if need be.

    The script returns at once when the pinned build is cached; otherwise it builds (about a quarter of an hour cold
    on two cores, progress on stderr). STEPCACHE_ARGO_DIR points at a prebuilt directory of the same layout instead.
    """
    path = controlplane.built(BUILD_SCRIPT, override="STEPCACHE_ARGO_DIR")
    missing = [name for name in BINARIES if not os.access(path / "bin" / name, os.X_OK)]
    if missing or not (path / "crds").is_dir():
        raise RuntimeError(f"Argo build incomplete in {path}: missing {', '.join(missing) or 'crds/'}")
    return path


def bin_dir() -> pathlib.Path:
    """workflow-controller and argoexec (the directory a process kubelet puts on its containers' PATH)."""
    return build_dir() / "bin"


def install_crds(plane: controlplane.ControlPlane) -> list[str]:
    """Install Argo's CRDs (the module's minimal set) and wait until they are served; return their names.

    Server-side apply: the WorkflowTaskSet CRD is larger than client-side apply's last-applied annotation allows.
    """
    files = sorted((build_dir() / "crds").glob("argoproj.io_*.yaml"))
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in files]
    args = [arg for path in files for arg in ("-f", str(path))]
    plane.kubectl("apply", "--server-side", "--force-conflicts", *args)
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in names))
    return names


def extract_tgz(data: bytes) -> dict[str, bytes]:
    """The regular files of a gzipped tarball (how argoexec archives an artifact by default), by member name."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            extracted = archive.extractfile(member) if member.isfile() else None
            if extracted is not None:
                files[member.name] = extracted.read()
    return files


class S3Server:
    """moto's S3 server in this process, on 127.0.0.1 and a free port, with one bucket: the artifact repository."""

    access_key = "stepcache-test-access"
    secret_key = "stepcache-test-secret"
    region = "us-east-1"

    def __init__(self, *, bucket: str = "argo-artifacts") -> None:
        self.bucket = bucket
        self._server: Any = None
        self._port: int | None = None

    @property
    def endpoint(self) -> str:
        """host:port, as Argo's `s3.endpoint` takes it."""
        if self._port is None:
            raise RuntimeError("the S3 server is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        # The server would log every request to this process's stderr.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._port = ports.free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self._port, verbose=False)
        self._server.start()
        self.client().create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for the server (what tests use to look at, add or remove objects)."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def object_keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        body: bytes = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def delete(self, key: str) -> None:
        self.client().delete_object(Bucket=self.bucket, Key=key)

    def repository(self) -> dict[str, Any]:
        """This bucket as an Argo `artifactRepository` (credentials from the Secret `prepare_namespace` creates)."""
        return {
            "archiveLogs": False,
            "s3": {
                "bucket": self.bucket,
                "endpoint": self.endpoint,
                "insecure": True,
                "region": self.region,
                "accessKeySecret": {"name": ARTIFACTS_SECRET, "key": "accesskey"},
                "secretKeySecret": {"name": ARTIFACTS_SECRET, "key": "secretkey"},
            },
        }


class WorkflowController:
    """Argo's workflow-controller as a process watching every namespace, configured by its ConfigMap in `argo`."""

    def __init__(
        self,
        plane: controlplane.ControlPlane,
        *,
        artifact_repository: Mapping[str, Any],
        log_file: pathlib.Path,
        executor_image: str = "quay.io/argoproj/argoexec:v4.0.5",
    ) -> None:
        self.plane = plane
        self.artifact_repository = dict(artifact_repository)
        self.log_file = log_file
        self.executor_image = executor_image
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        """The controller's configuration: the artifact repository, and no metrics server (its port is fixed)."""
        return {"metricsConfig": {"enabled": False}, "artifactRepository": self.artifact_repository}

    def start(self) -> None:
        self.plane.create_namespace(CONTROLLER_NAMESPACE)
        self.plane.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": CONFIG_MAP, "namespace": CONTROLLER_NAMESPACE},
                "data": {"config": yaml.safe_dump(self.config(), sort_keys=False)},
            }
        )
        argv = [
            str(bin_dir() / "workflow-controller"),
            f"--kubeconfig={self.plane.kubeconfig}",
            f"--namespace={CONTROLLER_NAMESPACE}",
            f"--executor-image={self.executor_image}",
            "--workflow-workers=4",
            "--pod-cleanup-workers=2",
        ]
        env = {key: value for key, value in os.environ.items() if key not in ("KUBECONFIG",)}
        # One controller, no election (without this it needs LEADER_ELECTION_IDENTITY and a Lease).
        env["LEADER_ELECTION_DISABLE"] = "true"
        self._process = controlplane.spawn(argv, log_file=self.log_file, env=env)

    def check_running(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"workflow-controller exited with {self._process.returncode}; see {self.log_file}")

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, *, timeout: float = 3.0) -> None:
        # It keeps running for seconds after SIGTERM, and holds nothing (no leader Lease) worth a graceful stop.
        if self._process is not None:
            controlplane.terminate([self._process], timeout=timeout)
            self._process = None

    def __enter__(self) -> WorkflowController:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ArgoCluster:
    """What an Argo e2e test drives: the control plane with Argo's CRDs, a workflow-controller and the S3 bucket."""

    def __init__(self, plane: controlplane.ControlPlane, controller: WorkflowController, s3: S3Server) -> None:
        self.plane = plane
        self.controller = controller
        self.s3 = s3

    def prepare_namespace(self, namespace: str, *, service_account: str = "default") -> None:
        """Let workflows run in `namespace`: the repository's credentials, and RBAC for argoexec's `wait`.

        `wait` reports a step's outputs by creating and patching a WorkflowTaskResult as the pod's ServiceAccount.
        """
        self.plane.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": ARTIFACTS_SECRET, "namespace": namespace},
                "stringData": {"accesskey": self.s3.access_key, "secretkey": self.s3.secret_key},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": EXECUTOR_ROLE, "namespace": namespace},
                "rules": [
                    {
                        "apiGroups": ["argoproj.io"],
                        "resources": ["workflowtaskresults"],
                        "verbs": ["create", "patch"],
                    }
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": EXECUTOR_ROLE, "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": EXECUTOR_ROLE},
                "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
            },
        )

    def submit(self, namespace: str, workflow: Mapping[str, Any]) -> str:
        """Create a Workflow; return its name (workflows usually have a generateName)."""
        result = self.plane.kubectl(
            "create", "--namespace", namespace, "-o", "json", "-f", "-", input=json.dumps(workflow)
        )
        name: str = json.loads(result.stdout)["metadata"]["name"]
        return name

    def workflow(self, namespace: str, name: str) -> Any:
        return self.plane.api(f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/workflows/{name}")

    def wait_workflow(self, namespace: str, name: str, *, timeout: float = 120.0) -> Any:
        """Poll the Workflow until it is Succeeded, Failed or Error; return it (the timeout error shows its status)."""
        last: dict[str, Any] = {}

        def finished() -> Any:
            self.plane.check_running()
            self.controller.check_running()
            workflow = self.workflow(namespace, name)
            last["status"] = workflow.get("status", {})
            return workflow if last["status"].get("phase") in TERMINAL_PHASES else None

        try:
            return wait_for(finished, timeout, f"workflow {namespace}/{name} to finish", interval=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its status: {json.dumps(last.get('status'), indent=1)[:4000]}") from None

    def run(self, namespace: str, workflow: Mapping[str, Any], *, timeout: float = 120.0) -> Any:
        """Submit a Workflow and wait for it to finish; return it."""
        return self.wait_workflow(namespace, self.submit(namespace, workflow), timeout=timeout)

    @staticmethod
    def node(workflow: Mapping[str, Any], display_name: str) -> dict[str, Any]:
        """The workflow's status node with this display name (a DAG task's or step's name)."""
        nodes = [
            n for n in (workflow.get("status", {}).get("nodes") or {}).values() if n.get("displayName") == display_name
        ]
        if len(nodes) != 1:
            raise AssertionError(f"expected one node named {display_name!r}, found {len(nodes)}")
        found: dict[str, Any] = nodes[0]
        return found

    def pod_of(self, workflow: Mapping[str, Any], display_name: str) -> Any:
        """The pod that ran a node (found by the node-id annotation Argo puts on it)."""
        node = self.node(workflow, display_name)
        namespace = workflow["metadata"]["namespace"]
        selector = urllib.parse.quote(f"{WORKFLOW_LABEL}={workflow['metadata']['name']}")
        pods = self.plane.api(f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")["items"]
        found = [p for p in pods if p["metadata"].get("annotations", {}).get(NODE_ID_ANNOTATION) == node["id"]]
        if len(found) != 1:
            raise AssertionError(f"expected one pod for node {display_name!r}, found {len(found)}")
        return found[0]
