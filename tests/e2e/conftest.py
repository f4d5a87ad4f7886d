"""End-to-end fixtures: one real control plane and one process kubelet for the whole session.

Starting the control plane takes seconds, so every test shares it and isolates itself in a namespace of its own.
Nothing here skips: missing binaries are built (hack/cluster/build.sh, and hack/cluster/build-argo.sh when a
collected test uses the `argo` fixture) before the first test runs, outside any test's timeout. When a test
fails, the control plane's work directory — logs of every component, the kubelet and each container — is kept and
its path printed.
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from hack.cluster import argo as argo_harness
from hack.cluster import controlplane
from hack.cluster import kubelet as process_kubelet
from hack.cluster.controlplane import wait_for

# Argo Workflows in the shared control plane (CRDs, workflow-controller, S3), for the Argo tests.
from tests.e2e.argo_fixtures import argo, argo_namespace, s3  # noqa: F401

# stepcache installed into the shared control plane (operator, webhook, Postgres), for the tests of stepcache itself.
from tests.e2e.stepcache_fixtures import cluster, database, namespace, stepcache  # noqa: F401

__all__ = ["NODE", "wait_for"]

NODE = "stepcache-node"
_HERE = pathlib.Path(__file__).resolve().parent
_KEPT = pytest.StashKey[pathlib.Path]()
_NEEDS_ARGO = pytest.StashKey[bool]()


def _is_e2e(item: pytest.Item) -> bool:
    return _HERE in item.path.resolve().parents


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the marks must be on the items before `-m` deselects by them.
    for item in items:
        if _is_e2e(item):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A cold build takes minutes: do it here, before any test (and its timeout) starts.
    if session.config.option.collectonly:
        return
    if any(_is_e2e(item) for item in session.items):
        controlplane.bin_dir()
    needs_argo = any("argo" in getattr(item, "fixturenames", ()) for item in session.items)
    session.config.stash[_NEEDS_ARGO] = needs_argo
    if needs_argo:
        argo_harness.build_dir()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    plane = getattr(item, "funcargs", {}).get("control_plane")
    if report.failed and isinstance(plane, controlplane.ControlPlane):
        report.sections.append(("control plane", f"logs (kept after the session): {plane.logs_dir}"))
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    kept = config.stash.get(_KEPT, None)
    if kept is not None:
        terminalreporter.write_sep("-", "control plane")
        terminalreporter.write_line(f"a test failed: the control plane's work directory and logs are kept in {kept}")


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[controlplane.ControlPlane]:
    plane = controlplane.ControlPlane()
    plane.start()
    try:
        yield plane
    finally:
        keep = request.session.testsfailed > 0
        plane.stop(keep_workdir=keep)
        if keep:
            request.config.stash[_KEPT] = plane.workdir


@pytest.fixture(scope="session")
def kubelet(
    control_plane: controlplane.ControlPlane, request: pytest.FixtureRequest
) -> Iterator[process_kubelet.KubeletProcess]:
    """The process kubelet, running as a subprocess; yielded once its node is Ready and schedulable.

    In a session with Argo tests, `argoexec` is on its containers' PATH, as it is in Argo's executor image.
    """
    needs_argo = request.config.stash.get(_NEEDS_ARGO, False)
    process = process_kubelet.KubeletProcess(
        kubeconfig=control_plane.kubeconfig,
        node=NODE,
        logs_dir=control_plane.logs_dir / "pods",
        log_file=control_plane.logs_dir / "kubelet.log",
        image_bins=[argo_harness.bin_dir()] if needs_argo else [],
    )
    process.start()
    try:

        def schedulable() -> bool:
            process.check_running()
            nodes = control_plane.api("/api/v1/nodes")["items"]
            return any(node["metadata"]["name"] == NODE and process_kubelet.schedulable(node) for node in nodes)

        # The node lifecycle controller lifts the not-ready taint a few seconds after the node reports Ready.
        wait_for(schedulable, 60, f"node {NODE} to be Ready and untainted")
        yield process
    finally:
        process.stop()


@pytest.fixture
def plain_namespace(control_plane: controlplane.ControlPlane) -> Iterator[str]:
    """A fresh namespace not opted in to stepcache (its default ServiceAccount exists); deleted afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
