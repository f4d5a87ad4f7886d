"""What a ConfigMap holds is part of the key, on a real kube-apiserver: an edit makes the next run a miss."""

from __future__ import annotations

from typing import Any

from hack.cluster.controlplane import wait_for

from tests.e2e.stepcache_fixtures import Cluster, step_pod

CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"


def configmap(name: str, greeting: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"greeting": greeting}}


def reading_pod(configmap_name: str) -> dict[str, Any]:
    pod = step_pod("reader", "printf '%s' \"$GREETING\" > /dev/termination-log")
    pod["spec"]["containers"][0]["env"] = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": configmap_name, "key": "greeting"}}}
    ]
    return pod


def run(cluster: Cluster, pod: dict[str, Any]) -> dict[str, Any]:
    created, _ = cluster.create(pod)
    return cluster.wait_pod_phase(created["metadata"]["name"], "Succeeded")


def message(pod: dict[str, Any]) -> str:
    return str(pod["status"]["containerStatuses"][0]["state"]["terminated"].get("message", ""))


def dry_run_key(cluster: Cluster) -> str | None:
    probe, _ = cluster.create_dry_run(reading_pod("settings"))
    return probe["metadata"].get("annotations", {}).get("stepcache.dev/key")  # type: ignore[no-any-return]


def wait_until_keyed(cluster: Cluster, *, other_than: str | None = None) -> None:
    """The operator learns ConfigMaps from a watch: poll with dry-run pods until its view holds the latest data."""

    def keyed() -> bool:
        key = dry_run_key(cluster)
        return key is not None and key != other_than

    wait_for(keyed, 30, "the operator to see the ConfigMap as it is now")


def test_editing_a_configmap_a_step_reads_makes_the_next_run_a_miss_and_editing_it_back_hits(
    cluster: Cluster,
) -> None:
    cluster.create(configmap("settings", "hello"))
    wait_until_keyed(cluster)
    first = run(cluster, reading_pod("settings"))
    first_id = cluster.wait_recorded(first["metadata"]["name"])["metadata"]["labels"][CACHE_ID]
    assert message(first) == "hello"
    first_key = first["metadata"]["annotations"]["stepcache.dev/key"]

    cluster.kubectl("patch", "configmap", "settings", "--type=merge", "-p", '{"data": {"greeting": "bonjour"}}')
    wait_until_keyed(cluster, other_than=first_key)
    second = run(cluster, reading_pod("settings"))
    assert HIT not in second["metadata"]["labels"]
    assert message(second) == "bonjour"
    second_id = cluster.wait_recorded(second["metadata"]["name"])["metadata"]["labels"][CACHE_ID]
    assert second_id != first_id

    cluster.kubectl("patch", "configmap", "settings", "--type=merge", "-p", '{"data": {"greeting": "hello"}}')
    wait_until_keyed(cluster, other_than=second["metadata"]["annotations"]["stepcache.dev/key"])
    third = run(cluster, reading_pod("settings"))
    assert third["metadata"]["labels"][HIT] == "true"
    assert third["metadata"]["labels"][CACHE_ID] == first_id
    assert message(third) == "hello"


def test_a_pod_reading_a_configmap_that_does_not_exist_yet_runs_uncached(cluster: Cluster) -> None:
    created, warnings = cluster.create(reading_pod("not-there-yet"))
    assert "ConfigMap" in warnings
    assert "not-there-yet" in warnings
    assert "stepcache.dev/key" not in created["metadata"].get("annotations", {})
    assert CACHE_ID not in created["metadata"].get("labels", {})
