"""What stepcache trusts, on a real kube-apiserver: owned names, signatures, pods changed after admission."""

from __future__ import annotations

import asyncio
import base64
import json

from hack.cluster.controlplane import ControlPlane
from kubernetes_asyncio import client, config

from stepcache import kube
from tests.e2e.stepcache_fixtures import Cluster, step_pod

CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"
# Long enough to change the pod between its admission and its success.
STEP = "sleep 3; printf 'trusted' > /dev/termination-log"


def assert_not_recorded(cluster: Cluster, name: str, reason: str) -> None:
    cluster.wait_pod_phase(name, "Succeeded")
    event = cluster.wait_log_event("record_rejected", name)
    assert event["reason"] == reason
    assert cluster.rows() == []
    # Rejected for good: the cache-id label is gone, so the recorder never looks at the pod again.
    cluster.wait_label(name, CACHE_ID, lambda value: value is None)


def test_a_pod_whose_key_containers_annotation_is_edited_is_not_recorded(cluster: Cluster) -> None:
    pod, _ = cluster.create(step_pod("edited", STEP))
    name = pod["metadata"]["name"]
    cluster.kubectl("annotate", "--overwrite", "pod", name, "stepcache.dev/key-containers=other")
    assert_not_recorded(cluster, name, "bad-signature")


def test_a_pod_whose_key_annotation_is_edited_is_not_recorded(cluster: Cluster) -> None:
    pod, _ = cluster.create(step_pod("edited", STEP))
    name = pod["metadata"]["name"]
    cluster.kubectl("annotate", "--overwrite", "pod", name, f"stepcache.dev/key={'0' * 64}")
    assert_not_recorded(cluster, name, "bad-signature")


def test_a_pod_whose_image_is_patched_after_admission_is_not_recorded(cluster: Cluster) -> None:
    pod, _ = cluster.create(step_pod("patched", STEP))
    name = pod["metadata"]["name"]
    cluster.kubectl("set", "image", f"pod/{name}", "main=busybox:1.37.0")
    assert_not_recorded(cluster, name, "key-mismatch")


def test_user_written_cache_id_and_hit_labels_are_replaced(cluster: Cluster) -> None:
    forged = step_pod("forged", STEP, labels={CACHE_ID: "123", HIT: "true"})
    forged["metadata"]["annotations"] = {"stepcache.dev/key-signature": "00" * 32}
    pod, _ = cluster.create(forged)
    labels = pod["metadata"]["labels"]
    assert labels[CACHE_ID] == ""
    assert HIT not in labels
    assert pod["metadata"]["annotations"]["stepcache.dev/key-signature"] != "00" * 32
    assert pod["spec"]["containers"][0]["command"] == ["sh", "-c", STEP]
    recorded = cluster.wait_recorded(pod["metadata"]["name"])
    assert [row["id"] for row in cluster.rows()] == [int(recorded["metadata"]["labels"][CACHE_ID])]


def test_owned_names_are_removed_from_skipped_pods(cluster: Cluster) -> None:
    forged = step_pod("skipped", "true", labels={"stepcache.dev/enabled": "false", CACHE_ID: "", HIT: "true"})
    forged["metadata"]["annotations"] = {"stepcache.dev/key": "f" * 64, "keep": "me"}
    pod, _ = cluster.create(forged)
    assert pod["metadata"]["labels"] == {"stepcache.dev/enabled": "false"}
    assert pod["metadata"]["annotations"] == {"keep": "me"}


def test_the_signing_key_secret_is_created_once_by_racing_replicas(
    control_plane: ControlPlane, stepcache: object
) -> None:
    control_plane.create_namespace("e2e-signing-race")

    async def bootstrap() -> bytes:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=configuration)
        api = kube.Kube(client.ApiClient(configuration))
        try:
            return await api.signing_key(namespace="e2e-signing-race")
        finally:
            await api.close()

    async def race() -> list[bytes]:
        return list(await asyncio.gather(*(bootstrap() for _ in range(4))))

    keys = asyncio.run(race())
    assert len(set(keys)) == 1
    assert len(keys[0]) == 32
    secret = json.loads(
        control_plane.kubectl("get", "secret", kube.SIGNING_SECRET, "-n", "e2e-signing-race", "-o", "json").stdout
    )
    assert base64.b64decode(secret["data"]["key"]) == keys[0]


def test_the_operator_created_its_signing_key_in_its_namespace(control_plane: ControlPlane, stepcache: object) -> None:
    secret = json.loads(
        control_plane.kubectl("get", "secret", kube.SIGNING_SECRET, "-n", "stepcache-system", "-o", "json").stdout
    )
    assert len(base64.b64decode(secret["data"]["key"])) == 32


def test_an_image_swapped_while_running_and_restored_after_success_is_not_recorded(cluster: Cluster) -> None:
    # Stopped so that the recorder first sees the pod once its spec looks untouched again.
    pod, _ = cluster.create(step_pod("swapped", "sleep 4; printf 'swapped' > /dev/termination-log"))
    name = pod["metadata"]["name"]
    cluster.wait_pod_phase(name, "Running")
    cluster.operator.stop()
    try:
        cluster.kubectl("set", "image", f"pod/{name}", "main=busybox:1.37.0")  # the kubelet restarts main with it
        succeeded = cluster.wait_pod_phase(name, "Succeeded")
        status = succeeded["status"]["containerStatuses"][0]
        assert (status["image"], status["restartCount"]) == ("busybox:1.37.0", 1)
        cluster.kubectl("set", "image", f"pod/{name}", "main=busybox:1.36.1")  # the spec looks as admitted again
    finally:
        cluster.operator.start()
    assert_not_recorded(cluster, name, "image-mismatch")
