"""Fixtures that add Argo Workflows to the shared control plane: its CRDs, a workflow-controller, an S3 bucket.

A session that collects a test using `argo` builds Argo first (hack/cluster/build-argo.sh, outside any test's
timeout: see conftest.py) and starts the process kubelet with `argoexec` on its containers' PATH.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hack.cluster import argo as argo_harness
from hack.cluster import controlplane

__all__ = ["argo", "argo_namespace", "s3"]


@pytest.fixture(scope="session")
def s3() -> Iterator[argo_harness.S3Server]:
    """moto's S3 server with one bucket, the workflows' artifact repository."""
    with argo_harness.S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def argo(
    control_plane: controlplane.ControlPlane, kubelet: Any, s3: argo_harness.S3Server
) -> Iterator[argo_harness.ArgoCluster]:
    """Argo's CRDs installed and a workflow-controller running; workflows run in a prepared namespace."""
    argo_harness.install_crds(control_plane)
    controller = argo_harness.WorkflowController(
        control_plane,
        artifact_repository=s3.repository(),
        log_file=control_plane.logs_dir / "workflow-controller.log",
    )
    controller.start()
    try:
        yield argo_harness.ArgoCluster(control_plane, controller, s3)
    finally:
        controller.stop()


@pytest.fixture
def argo_namespace(control_plane: controlplane.ControlPlane, argo: argo_harness.ArgoCluster) -> Iterator[str]:
    """A fresh namespace prepared for workflows and not opted in to stepcache; deleted afterwards."""
    name = f"e2e-argo-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    argo.prepare_namespace(name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
