"""The cache path on a real kube-apiserver: admission, recording, hits, opt-outs, staleness, fail-open, RBAC."""

from __future__ import annotations

import json
from typing import Any

from hack.cluster.controlplane import ControlPlane, wait_for

from tests.e2e.stepcache_fixtures import Cluster, seconds_between, step_job, step_pod

CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"
KEY = "stepcache.dev/key"
STEP = "sleep 2; printf 'answer=42' > /dev/termination-log"


def message(pod: dict[str, Any], container: str = "main") -> str:
    for status in pod["status"]["containerStatuses"]:
        if status["name"] == container:
            return str(status["state"]["terminated"].get("message", ""))
    raise AssertionError(f"no status for container {container}")


def duration(pod: dict[str, Any]) -> float:
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return seconds_between(terminated["startedAt"], terminated["finishedAt"])


def test_a_pod_in_a_namespace_without_the_label_is_not_touched(control_plane: ControlPlane, stepcache: object) -> None:
    control_plane.create_namespace("e2e-not-opted-in")
    result = control_plane.kubectl(
        "create",
        "--namespace",
        "e2e-not-opted-in",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(step_pod("plain", "true", labels={CACHE_ID: "7"})),
    )
    pod = json.loads(result.stdout)
    assert KEY not in pod["metadata"].get("annotations", {})
    assert pod["metadata"]["labels"] == {CACHE_ID: "7"}  # not even stepcache's own names: the webhook never ran
    assert pod["spec"]["containers"][0]["command"] == ["sh", "-c", "true"]


def test_a_job_is_recorded_and_the_next_identical_job_is_served_from_cache(cluster: Cluster) -> None:
    first = cluster.run_job(step_job("step", STEP))
    assert first["metadata"]["labels"][CACHE_ID] == "" or first["metadata"]["labels"][CACHE_ID].isdigit()
    first = cluster.wait_recorded(first["metadata"]["name"])
    entry_id = first["metadata"]["labels"][CACHE_ID]
    rows = cluster.rows()
    assert [row["id"] for row in rows] == [int(entry_id)]
    assert rows[0]["termination_messages"] == {"main": "answer=42"}
    assert rows[0]["cache_key"] == first["metadata"]["annotations"][KEY]
    assert message(first) == "answer=42"

    second = cluster.run_job(step_job("step", STEP))
    labels = second["metadata"]["labels"]
    assert labels[HIT] == "true"
    assert labels[CACHE_ID] == entry_id
    assert [c["name"] for c in second["spec"]["containers"]] == ["main"]
    assert second["spec"]["containers"][0]["image"] == "busybox:1.36.1"
    assert second["spec"]["containers"][0]["command"] != first["spec"]["containers"][0]["command"]
    assert message(second) == message(first)
    assert duration(second) < duration(first)
    assert duration(first) >= 2
    assert len(cluster.rows()) == 1  # a hit writes no row


def test_a_pod_labelled_enabled_false_runs_normally(cluster: Cluster) -> None:
    cluster.run_job(step_job("step", STEP))  # an entry exists for this step
    pod, _ = cluster.create(step_pod("optout", STEP, labels={"stepcache.dev/enabled": "false"}))
    assert KEY not in pod["metadata"].get("annotations", {})
    assert CACHE_ID not in pod["metadata"].get("labels", {})
    done = cluster.wait_pod_phase(pod["metadata"]["name"], "Succeeded")
    assert done["spec"]["containers"][0]["command"] == ["sh", "-c", STEP]
    assert message(done) == "answer=42"


def test_p0d_runs_although_an_entry_exists_and_re_records(cluster: Cluster) -> None:
    first = cluster.run_job(step_job("step", STEP))
    cluster.wait_recorded(first["metadata"]["name"])
    [before] = cluster.rows()

    fresh = cluster.run_job(step_job("step", STEP, annotations={"stepcache.dev/max-staleness": "P0D"}))
    assert HIT not in fresh["metadata"]["labels"]
    assert fresh["spec"]["containers"][0]["command"] == ["sh", "-c", STEP]
    recorded = cluster.wait_recorded(fresh["metadata"]["name"])
    [after] = cluster.rows()
    assert recorded["metadata"]["labels"][CACHE_ID] == str(before["id"])  # the row is replaced, its id kept
    assert after["finished_at"] > before["finished_at"]
    assert after["source_pod"] == fresh["metadata"]["name"]


def test_an_unparsable_staleness_runs_uncached_with_a_warning_and_is_recorded(cluster: Cluster) -> None:
    pod, warnings = cluster.create(step_pod("bad", STEP, annotations={"stepcache.dev/max-staleness": "a week"}))
    assert "stepcache.dev/max-staleness" in warnings
    assert pod["metadata"]["labels"][CACHE_ID] == ""
    cluster.wait_recorded(pod["metadata"]["name"])
    assert len(cluster.rows()) == 1


def test_a_restricted_namespace_accepts_hit_pods(cluster: Cluster) -> None:
    cluster.kubectl("label", "namespace", cluster.namespace, "pod-security.kubernetes.io/enforce=restricted")
    restricted = step_job("step", STEP)
    pod_spec = restricted["spec"]["template"]["spec"]
    pod_spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod_spec["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    first = cluster.run_job(restricted)
    cluster.wait_recorded(first["metadata"]["name"])

    hit, warnings = cluster.create({**restricted, "kind": "Job"})
    pods = wait_for(lambda: cluster.pods_of_job(hit["metadata"]["name"]), 30, "the hit job's pod")
    assert "violate" not in warnings
    assert pods[0]["metadata"]["labels"][HIT] == "true"
    cluster.wait_pod_phase(pods[0]["metadata"]["name"], "Succeeded")


def test_with_postgres_stopped_pods_run_uncached_and_are_recorded_when_it_is_back(cluster: Cluster) -> None:
    cluster.db.stop()
    try:
        pod, warnings = cluster.create(step_pod("outage", STEP))
        assert "cache unavailable" in warnings
        assert pod["metadata"]["labels"][CACHE_ID] == ""
        assert pod["metadata"]["annotations"]["stepcache.dev/key-signature"]
        name = pod["metadata"]["name"]
        cluster.wait_pod_phase(name, "Succeeded")
        cluster.wait_log_event("record_retry_scheduled", name)
        assert cluster.pod(name)["metadata"]["labels"][CACHE_ID] == ""
    finally:
        cluster.db.start()
    recorded = cluster.wait_recorded(name, timeout=90)
    again, _ = cluster.create(step_pod("outage", STEP))
    assert again["metadata"]["labels"][HIT] == "true"
    assert again["metadata"]["labels"][CACHE_ID] == recorded["metadata"]["labels"][CACHE_ID]


def test_the_operator_needs_no_permission_beyond_the_manifests(cluster: Cluster) -> None:
    first = cluster.run_job(step_job("step", STEP))
    cluster.wait_recorded(first["metadata"]["name"])
    forbidden = [line for line in cluster.operator.logs().splitlines() if "forbidden" in line.lower()]
    assert forbidden == []
    who = cluster.cp.kubectl(
        "auth", "can-i", "get", "secrets", "--as=system:serviceaccount:stepcache-system:stepcache", "-A", check=False
    )
    assert who.stdout.strip() == "no"  # the operator cannot read Secrets beyond its signing key


def test_a_pod_that_succeeded_during_an_outage_is_recorded_after_an_operator_restart(cluster: Cluster) -> None:
    cluster.db.stop()
    try:
        pod, warnings = cluster.create(step_pod("restart", STEP))
        assert "cache unavailable" in warnings
        name = pod["metadata"]["name"]
        cluster.wait_pod_phase(name, "Succeeded")
        cluster.wait_log_event("record_retry_scheduled", name)
        cluster.operator.stop()  # the in-process retry queue is gone with it
    finally:
        cluster.db.start()
    cluster.operator.start()
    recorded = cluster.wait_recorded(name, timeout=90)  # re-delivered by the LIST at start: its cache-id is empty
    assert [row["id"] for row in cluster.rows()] == [int(recorded["metadata"]["labels"][CACHE_ID])]
