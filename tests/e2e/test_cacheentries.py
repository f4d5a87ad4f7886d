"""The cache seen and handled with kubectl on a real kube-apiserver: CacheEntry objects, Events, invalidation, expiry.

The operator runs as its ServiceAccount with only the RBAC in manifests/, so every write asserted here is one the
shipped permissions allow.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import yaml
from hack.cluster import operator as operator_harness
from hack.cluster.controlplane import ControlPlane, wait_for

from tests.e2e.stepcache_fixtures import Cluster, _wait_namespace_known, step_job

CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"
KEY = "stepcache.dev/key"
STEP = "sleep 2; printf 'answer=42' > /dev/termination-log"
SA = "system:serviceaccount:stepcache-system:stepcache"
COLUMNS = ["NAME", "KEY", "STEP", "IMAGE", "HITS", "SAVED", "AGE", "EXPIRES"]


def table(output: str) -> list[dict[str, str]]:
    """kubectl's table output as rows of column → cell (cells never hold two spaces; headers may hold one)."""
    lines = [line for line in output.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[1:]]


def entries(cluster: Cluster) -> list[dict[str, Any]]:
    return json.loads(cluster.kubectl("get", "cacheentries", "-o", "json").stdout)["items"]  # type: ignore[no-any-return]


def wait_entry(cluster: Cluster, predicate: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((item for item in entries(cluster) if predicate(item)), None)

    return wait_for(found, timeout, f"a CacheEntry in {cluster.namespace} that {what}")


def events(cluster: Cluster, reason: str, pod: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "--field-selector", f"reason={reason},involvedObject.name={pod}", "-o", "json"
    ).stdout
    return json.loads(out)["items"]  # type: ignore[no-any-return]


def invalidated(cluster: Cluster, ref: str) -> dict[str, Any] | None:
    """The operator's log event for the deletion of CacheEntry `namespace/name`, once it has happened."""
    for line in cluster.operator.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "invalidated" and record.get("cacheentry") == ref:
            return record  # type: ignore[no-any-return]
    return None


def recorded_entry(cluster: Cluster) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the step once; return its recorded pod and the CacheEntry that appears for it."""
    pod = cluster.wait_recorded(cluster.run_job(step_job("step", STEP))["metadata"]["name"])
    entry_id = int(pod["metadata"]["labels"][CACHE_ID])
    entry = wait_entry(cluster, lambda e: e["spec"]["entryId"] == entry_id, f"shows entry {entry_id}")
    return pod, entry


def test_kubectl_shows_the_entry_a_hit_counts_and_posts_cachehit_and_delete_invalidates(cluster: Cluster) -> None:
    first, entry = recorded_entry(cluster)
    name = entry["metadata"]["name"]
    key = first["metadata"]["annotations"][KEY]
    job = first["metadata"]["labels"]["job-name"]
    assert name == f"{job}-{key[:12]}"

    [row] = table(cluster.kubectl("get", "ce").stdout)
    assert list(row) == COLUMNS
    assert (row["NAME"], row["KEY"], row["STEP"], row["IMAGE"], row["HITS"], row["SAVED"]) == (
        name,
        key[:12],
        f"Job/{job}",
        "busybox:1.36.1",
        "0",
        "0s",
    )
    assert re.fullmatch(r"\d+s", row["AGE"])
    assert entry["status"]["expiresAt"] == row["EXPIRES"]  # recorded + STEPCACHE_MAX_STALENESS (P30D)

    [wide] = table(cluster.kubectl("get", "ce", "-o", "wide").stdout)
    assert (wide["SOURCE POD"], wide["ENTRY"]) == (first["metadata"]["name"], first["metadata"]["labels"][CACHE_ID])
    assert [r["NAME"] for r in table(cluster.kubectl("get", "stepcache").stdout)] == [name]  # the category

    described = cluster.kubectl("describe", "ce", name).stdout
    assert re.search(r"Outputs:\s+Bytes:\s+9\s+Kind:\s+terminationMessage\s+Name:\s+main", described), described
    assert re.search(r"Key Material:.*Scheme:\s+stepcache/v\d", described, re.DOTALL), described
    assert "answer=42" not in described  # sizes, never values

    [recorded_event] = events(cluster, "Recorded", first["metadata"]["name"])
    assert name in recorded_event["message"]

    hit = cluster.run_job(step_job("step", STEP))
    assert hit["metadata"]["labels"][HIT] == "true"
    counted = wait_entry(cluster, lambda e: e.get("status", {}).get("hits") == 1, "counted the hit")
    assert counted["status"]["secondsSaved"] >= 2
    [row] = table(cluster.kubectl("get", "ce").stdout)
    assert row["HITS"] == "1"
    assert re.fullmatch(r"[2-9]s|\d\ds", row["SAVED"]), row["SAVED"]

    hit_name = hit["metadata"]["name"]
    [hit_event] = wait_for(lambda: events(cluster, "CacheHit", hit_name), 30, f"a CacheHit Event on {hit_name}")
    assert hit_event["type"] == "Normal"
    assert hit_event["involvedObject"]["uid"] == hit["metadata"]["uid"]
    assert f"served from cache entry {name} (id {entry['spec']['entryId']}" in hit_event["message"]
    listed = cluster.kubectl("get", "events", "--field-selector", "reason=CacheHit").stdout
    assert f"pod/{hit_name}" in listed

    cluster.kubectl("delete", "ce", name, "--timeout=60s")
    assert cluster.rows() == []  # the row went first; the object only after it

    again = cluster.run_job(step_job("step", STEP))
    assert HIT not in again["metadata"]["labels"]
    rerecorded = cluster.wait_recorded(again["metadata"]["name"])
    new_id = int(rerecorded["metadata"]["labels"][CACHE_ID])
    assert new_id != entry["spec"]["entryId"]
    fresh = wait_entry(cluster, lambda e: e["spec"]["entryId"] == new_id, f"shows the new entry {new_id}")
    assert fresh["metadata"]["name"] == f"{again['metadata']['labels']['job-name']}-{key[:12]}"  # another Job
    assert [e["metadata"]["name"] for e in entries(cluster)] == [fresh["metadata"]["name"]]

    assert [line for line in cluster.operator.logs().splitlines() if "forbidden" in line.lower()] == []


def test_the_reconcile_recreates_an_object_deleted_behind_its_back_and_removes_an_orphan(cluster: Cluster) -> None:
    _, entry = recorded_entry(cluster)
    name, entry_id = entry["metadata"]["name"], entry["spec"]["entryId"]

    cluster.operator.stop()  # behind its back: no finalizer handler runs
    try:
        cluster.kubectl("patch", "ce", name, "--type=json", "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')
        cluster.kubectl("delete", "ce", name, "--timeout=30s")
        assert entries(cluster) == []
        assert [row["id"] for row in cluster.rows()] == [entry_id]
    finally:
        cluster.operator.start()
    back = wait_entry(cluster, lambda e: e["metadata"]["name"] == name, "is recreated from its row")
    assert back["spec"]["entryId"] == entry_id
    assert back["metadata"]["finalizers"] == ["stepcache.dev/finalizer"]
    assert wait_entry(cluster, lambda e: e.get("status", {}).get("hits") == 0, "has its status again")

    cluster.db.run_sql(f"DELETE FROM cache_entries WHERE id = {entry_id}")  # e.g. `stepcache purge`
    wait_for(lambda: entries(cluster) == [], 60, "the orphaned CacheEntry to be removed")


def test_expiry_removes_an_old_entry_and_its_object(cluster: Cluster) -> None:
    _, entry = recorded_entry(cluster)
    # As if recorded 31 days ago: past STEPCACHE_MAX_STALENESS (P30D), so the next expiry run deletes it.
    cluster.db.run_sql(
        f"UPDATE cache_entries SET finished_at = now() - interval '31 days' WHERE id = {entry['spec']['entryId']}"
    )
    wait_for(lambda: entries(cluster) == [], 60, "the expired entry's CacheEntry to be removed")
    assert cluster.rows() == []


def test_a_deletion_during_a_database_outage_completes_once_it_is_back(cluster: Cluster) -> None:
    _, entry = recorded_entry(cluster)
    name = entry["metadata"]["name"]
    cluster.db.stop()
    try:
        cluster.kubectl("delete", "ce", name, "--wait=false")
        held = wait_entry(cluster, lambda e: bool(e["metadata"].get("deletionTimestamp")), "is being deleted")
        assert held["metadata"]["finalizers"] == ["stepcache.dev/finalizer"]
    finally:
        cluster.db.start()
    wait_for(lambda: entries(cluster) == [], 90, f"CacheEntry {name} to be deleted")
    assert cluster.rows() == []


def test_deleting_a_cacheentry_in_one_namespace_never_touches_another(
    cluster: Cluster, control_plane: ControlPlane
) -> None:
    other = Cluster(cluster.cp, cluster.db, cluster.operator, f"e2e-{uuid.uuid4().hex[:8]}")
    control_plane.create_namespace(other.namespace, labels={"stepcache.dev/enabled": "true"})
    _wait_namespace_known(other)
    _, theirs = recorded_entry(other)

    # A user of this namespace copies the other namespace's entry (key and id) into a CacheEntry here, then deletes it.
    forged = {
        "apiVersion": "stepcache.dev/v1alpha1",
        "kind": "CacheEntry",
        "metadata": {"name": "forged", "namespace": cluster.namespace, "finalizers": ["stepcache.dev/finalizer"]},
        "spec": theirs["spec"],
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(forged))
    cluster.kubectl("delete", "ce", "forged", "--timeout=60s")
    handled = wait_for(
        lambda: invalidated(cluster, f"{cluster.namespace}/forged"), 30, "the finalizer handler of the forged entry"
    )
    assert handled["row_deleted"] is False

    assert [row["id"] for row in other.rows()] == [theirs["spec"]["entryId"]]
    assert [e["metadata"]["name"] for e in entries(other)] == [theirs["metadata"]["name"]]
    control_plane.kubectl("delete", "namespace", other.namespace, "--wait=false")


def test_the_manifests_grant_the_operator_and_users_what_cacheentries_need(
    cluster: Cluster, control_plane: ControlPlane
) -> None:
    def can(verb: str, resource: str, who: str, *flags: str) -> bool:
        result = control_plane.kubectl(
            "auth", "can-i", verb, resource, f"--as={who}", "-n", cluster.namespace, *flags, check=False
        )
        return result.stdout.strip() == "yes"

    assert can("create", "cacheentries.stepcache.dev", SA)
    assert can("delete", "cacheentries.stepcache.dev", SA)
    assert can("patch", "cacheentries.stepcache.dev", SA, "--subresource=status")
    assert can("create", "events", SA)
    assert not can("update", "cacheentries.stepcache.dev", SA, "--subresource=status")  # patching is all it needs

    cluster.kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice")
    cluster.kubectl("create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob")

    def aggregated() -> bool:
        return can("delete", "cacheentries.stepcache.dev", "alice") and can("list", "cacheentries.stepcache.dev", "bob")

    wait_for(aggregated, 30, "the built-in roles to aggregate CacheEntry permissions")
    assert not can("delete", "cacheentries.stepcache.dev", "bob")
    assert not can("create", "cacheentries.stepcache.dev", "alice")


def test_kustomize_installs_the_crd_with_the_manifests_and_apply_f_still_reads_them(
    control_plane: ControlPlane, stepcache: operator_harness.OperatorProcess
) -> None:
    manifests, crds = str(operator_harness.MANIFESTS), str(operator_harness.CRDS)
    built = list(yaml.safe_load_all(control_plane.kubectl("kustomize", manifests).stdout))
    kinds = {doc["kind"] for doc in built}
    assert {
        "CustomResourceDefinition",
        "Namespace",
        "ClusterRole",
        "Deployment",
        "MutatingWebhookConfiguration",
    } <= kinds
    server = control_plane.kubectl("apply", "-k", manifests, "--dry-run=server").stdout
    assert "customresourcedefinition.apiextensions.k8s.io/cacheentries.stepcache.dev" in server
    by_file = control_plane.kubectl("apply", "-f", crds, "-f", manifests, "--dry-run=server").stdout
    assert "customresourcedefinition.apiextensions.k8s.io/cacheentries.stepcache.dev" in by_file
    assert "deployment.apps/stepcache" in by_file
