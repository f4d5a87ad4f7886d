"""What a hit pod is, on a real kube-apiserver and scheduler: it waits for no device, volume or host, and the JSON
patch it was admitted with does not garble it.

The process kubelet runs commands on the host and mounts no volumes, so the first run's GPU and volumes are made
real where the control plane checks them: the Node advertises `nvidia.com/gpu` (the scheduler counts it), and the
PersistentVolumeClaim is bound to a PersistentVolume by the controller manager (the scheduler waits for that).
Before the replay both are taken away again, so a hit that still asked for either would never be scheduled.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hack.cluster import controlplane
from hack.cluster.controlplane import wait_for

from tests.e2e.conftest import NODE
from tests.e2e.stepcache_fixtures import STEP_IMAGE, Cluster

CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"
GPU = "nvidia.com/gpu"


def advertise_gpus(cp: controlplane.ControlPlane, count: int | None) -> None:
    """Set (or, with None, remove) the node's GPU capacity; the kubelet's heartbeat merges its own keys only."""
    value = None if count is None else str(count)
    patch = {"status": {"capacity": {GPU: value}, "allocatable": {GPU: value}}}
    cp.kubectl("patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(patch))


@pytest.fixture
def gpu_node(cluster: Cluster) -> Iterator[None]:
    advertise_gpus(cluster.cp, 1)
    try:
        yield
    finally:
        advertise_gpus(cluster.cp, None)


def bound_claim(cluster: Cluster) -> str:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume of its own; returns the PV's name."""
    pv = f"e2e-{uuid.uuid4().hex[:8]}"
    spec = {"accessModes": ["ReadWriteOnce"], "storageClassName": ""}
    cluster.cp.kubectl(
        "create",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    **spec,
                    "capacity": {"storage": "1Mi"},
                    "hostPath": {"path": f"/tmp/{pv}"},
                    "claimRef": {"namespace": cluster.namespace, "name": "data"},
                },
            }
        ),
    )
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {**spec, "volumeName": pv, "resources": {"requests": {"storage": "1Mi"}}},
    }
    cluster.create(claim)

    def bound() -> bool:
        got = json.loads(cluster.kubectl("get", "pvc", "data", "-o", "json").stdout)
        return bool(got.get("status", {}).get("phase") == "Bound")

    wait_for(bound, 60, "the claim to be bound")
    return pv


def greedy_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "greedy-"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": STEP_IMAGE,
                    "command": ["sh", "-c", "printf 'trained' > /dev/termination-log"],
                    "resources": {"requests": {GPU: "1"}, "limits": {GPU: "1"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "host", "mountPath": "/host"}],
                }
            ],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "host", "hostPath": {"path": "/opt"}},
                {"name": "scratch", "emptyDir": {}},
            ],
        },
    }


def test_a_hit_of_a_step_with_a_gpu_a_claim_and_a_host_path_runs_without_them(cluster: Cluster, gpu_node: None) -> None:
    pv = bound_claim(cluster)
    first, _ = cluster.create(greedy_pod())
    assert first["spec"]["containers"][0]["resources"]["limits"] == {GPU: "1"}  # admitted as a miss, as written
    cluster.wait_pod_phase(first["metadata"]["name"], "Succeeded")
    recorded = cluster.wait_recorded(first["metadata"]["name"])
    # Nothing the first run needed is left: no GPU on the node, no claim, no volume.
    advertise_gpus(cluster.cp, None)
    cluster.kubectl("delete", "pvc", "data", "--wait=false")
    cluster.cp.kubectl("delete", "pv", pv, "--wait=false")

    hit, _ = cluster.create(greedy_pod())

    assert hit["metadata"]["labels"][HIT] == "true"
    assert hit["metadata"]["labels"][CACHE_ID] == recorded["metadata"]["labels"][CACHE_ID]
    [main] = hit["spec"]["containers"]
    assert main["resources"] == {
        "requests": {"cpu": "10m", "memory": "16Mi"},
        "limits": {"cpu": "10m", "memory": "16Mi"},
    }
    assert [m["name"] for m in main.get("volumeMounts", []) if m["name"] in ("data", "host")] == []
    assert "data" not in {v["name"] for v in hit["spec"]["volumes"]}
    assert "host" not in {v["name"] for v in hit["spec"]["volumes"]}
    assert "scratch" in {v["name"] for v in hit["spec"]["volumes"]}
    done = cluster.wait_pod_phase(hit["metadata"]["name"], "Succeeded")
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "trained"


def true_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "true-", "labels": {"app": "true"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": STEP_IMAGE, "command": ["true"]}]},
    }


def test_a_pod_whose_command_is_true_is_served_twice_with_the_right_labels(cluster: Cluster) -> None:
    first, _ = cluster.create(true_pod())
    entry_id = cluster.wait_recorded(first["metadata"]["name"])["metadata"]["labels"][CACHE_ID]

    for _ in range(2):
        hit, _ = cluster.create(true_pod())

        assert hit["metadata"]["labels"] == {"app": "true", CACHE_ID: entry_id, HIT: "true"}
        [main] = hit["spec"]["containers"]
        assert main["command"][:2] == ["sh", "-c"]
        assert "true" not in main["command"]
        cluster.wait_pod_phase(hit["metadata"]["name"], "Succeeded")
