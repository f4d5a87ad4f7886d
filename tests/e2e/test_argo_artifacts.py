"""Argo steps with output artifacts served from cache, on the real workflow-controller and argoexec (v4.0.5).

A hit's replay `main` writes the artifact back from stepcache's blob store and the kept `wait` uploads it under the
hit workflow's own keys; the consumer, keyed by the content of its input artifact rather than its per-run location,
hits too. What the first run left in the bucket does not matter; what stepcache's blob store holds does.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from typing import Any

from hack.cluster import argo as argo_harness

from tests.e2e.stepcache_fixtures import Cluster
from tests.e2e.test_argo import MESSAGE, PAYLOAD, container, parameters, produce_consume_with_artifact

HIT = "stepcache.dev/hit"


def artifact_keys(node: dict[str, Any]) -> list[str]:
    reported = node.get("outputs", {}).get("artifacts") or []
    return [art["s3"]["key"] for art in reported if art.get("name") != "main-logs"]


def run_and_record(argo: argo_harness.ArgoCluster, cluster: Cluster, workflow: dict[str, Any], steps: list[str]) -> Any:
    """Run a workflow that must Succeed and wait until stepcache recorded each named step."""
    done = argo.run(cluster.namespace, workflow)
    assert done["status"]["phase"] == "Succeeded", done["status"].get("message")
    for step in steps:
        cluster.wait_recorded(argo.pod_of(done, step)["metadata"]["name"])
    return done


def operator_metrics(cluster: Cluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.operator.metrics_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def entry_artifacts(cluster: Cluster, source_pod: str) -> list[dict[str, Any]]:
    out = cluster.db.run_sql(
        "SELECT coalesce(argo_outputs->'artifacts', '[]') FROM cache_entries"
        f" WHERE namespace = '{cluster.namespace}' AND source_pod = '{source_pod}'"
    )
    return json.loads(out)  # type: ignore[no-any-return]


def test_a_chain_with_an_artifact_run_twice_is_served_whole_without_the_first_runs_objects(
    argo: argo_harness.ArgoCluster, cluster: Cluster
) -> None:
    argo.prepare_namespace(cluster.namespace)
    first = run_and_record(argo, cluster, produce_consume_with_artifact(), ["produce", "consume"])
    first_keys = artifact_keys(argo.node(first, "produce"))
    stored = entry_artifacts(cluster, argo.pod_of(first, "produce")["metadata"]["name"])
    assert [(a["name"], a["path"], a["archive"]) for a in stored] == [("data", "/tmp/out/data.txt", "tar")]
    assert stored[0]["sha256"] == hashlib.sha256(argo.s3.get(first_keys[0])).hexdigest()
    for key in argo.s3.object_keys(first["metadata"]["name"]):
        argo.s3.delete(key)  # the blobs are stepcache's: run 1's objects are not needed

    second = argo.run(cluster.namespace, produce_consume_with_artifact())

    assert second["status"]["phase"] == "Succeeded", second["status"].get("message")
    for step in ("produce", "consume"):
        pod = argo.pod_of(second, step)
        assert pod["metadata"]["labels"].get(HIT) == "true", (step, pod["metadata"].get("labels"))
    produce = argo.node(second, "produce")
    (key,) = artifact_keys(produce)
    assert key.startswith(f"{second['metadata']['name']}/")  # uploaded by run 2's own wait, under its own key
    assert argo_harness.extract_tgz(argo.s3.get(key)) == {"data.txt": PAYLOAD}
    assert parameters(produce) == {"message": MESSAGE}
    assert produce["outputs"]["result"] == "42"
    assert parameters(argo.node(second, "consume")) == {
        "digest": hashlib.sha256(PAYLOAD).hexdigest(),
        "received": f"{MESSAGE}/42",
    }
    assert len(cluster.rows()) == 2


def test_a_step_whose_blob_was_removed_runs_again_and_is_recorded_again(
    argo: argo_harness.ArgoCluster, cluster: Cluster
) -> None:
    argo.prepare_namespace(cluster.namespace)
    first = run_and_record(argo, cluster, produce_consume_with_artifact(), ["produce"])
    (stored,) = entry_artifacts(cluster, argo.pod_of(first, "produce")["metadata"]["name"])
    cluster.db.run_sql(f"DELETE FROM blobs WHERE sha256 = '{stored['sha256']}'")

    second = argo.run(cluster.namespace, produce_consume_with_artifact())

    assert second["status"]["phase"] == "Succeeded", second["status"].get("message")
    pod = argo.pod_of(second, "produce")
    assert HIT not in pod["metadata"]["labels"]
    cluster.wait_recorded(pod["metadata"]["name"])
    (again,) = entry_artifacts(cluster, pod["metadata"]["name"])
    assert again["name"] == "data"
    present = cluster.db.run_sql(f"SELECT count(*) FROM blobs WHERE sha256 = '{again['sha256']}'")
    assert present.strip() == "1"


def test_a_step_with_a_zip_artifact_runs_every_time_and_says_why(
    argo: argo_harness.ArgoCluster, cluster: Cluster
) -> None:
    argo.prepare_namespace(cluster.namespace)
    workflow = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": "zipped-"},
        "spec": {
            "entrypoint": "main",
            "templates": [
                {"name": "main", "dag": {"tasks": [{"name": "zip", "template": "zip"}]}},
                {
                    "name": "zip",
                    "container": container("mkdir -p /tmp/out && echo zipped > /tmp/out/a.txt"),
                    "outputs": {"artifacts": [{"name": "out", "path": "/tmp/out", "archive": {"zip": {}}}]},
                },
            ],
        },
    }
    first = run_and_record(argo, cluster, workflow, ["zip"])
    first_pod = argo.pod_of(first, "zip")["metadata"]["name"]
    record = cluster.wait_log_event("artifacts_not_replayable", first_pod)
    assert record["reason"] == "zip-archive"

    second = argo.run(cluster.namespace, workflow)

    assert second["status"]["phase"] == "Succeeded", second["status"].get("message")
    assert HIT not in argo.pod_of(second, "zip")["metadata"]["labels"]
    assert 'stepcache_artifacts_unreplayable_total{reason="zip-archive"}' in operator_metrics(cluster)
