"""A KFP v1 pipeline, compiled by the real kfp 1.8.22 SDK (hack/kfp/compile_pipeline.py), run twice through the real
workflow-controller: the second run is served from cache, its P0D step runs again against the artifact a hit wrote
back, and every step downstream sees the same bytes."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import yaml
from hack.cluster import argo as argo_harness

from tests.e2e.stepcache_fixtures import Cluster
from tests.e2e.test_argo_artifacts import HIT, artifact_keys, run_and_record

PIPELINE = pathlib.Path(__file__).parent.parent / "fixtures" / "kfp" / "produce-consume.yaml"
PAYLOAD = b"payload written by produce\n"
REUSED = "pipelines.kubeflow.org/reused_from_cache"
KFP_SERVICE_ACCOUNT = "pipeline-runner"


def pipeline() -> dict[str, Any]:
    loaded = yaml.safe_load(PIPELINE.read_text())
    assert isinstance(loaded, dict)
    assert loaded["spec"]["serviceAccountName"] == KFP_SERVICE_ACCOUNT
    return loaded


def artifact_files(argo: argo_harness.ArgoCluster, workflow: Any, step: str, name: str) -> dict[str, bytes]:
    reported = argo.node(workflow, step)["outputs"]["artifacts"]
    (key,) = [art["s3"]["key"] for art in reported if art["name"] == name]
    assert key.startswith(f"{workflow['metadata']['name']}/"), key
    return argo_harness.extract_tgz(argo.s3.get(key))


def test_a_kfp_v1_pipeline_run_twice_is_served_from_cache_and_its_p0d_step_runs_again(
    argo: argo_harness.ArgoCluster, cluster: Cluster
) -> None:
    # KFP runs its pipelines as the ServiceAccount its install creates in the namespace.
    cluster.kubectl("create", "serviceaccount", KFP_SERVICE_ACCOUNT)
    argo.prepare_namespace(cluster.namespace, service_account=KFP_SERVICE_ACCOUNT)
    first = run_and_record(argo, cluster, pipeline(), ["produce", "consume", "stamp"])
    first_stamp = artifact_files(argo, first, "stamp", "stamp-stamped")["data"]

    second = argo.run(cluster.namespace, pipeline())

    assert second["status"]["phase"] == "Succeeded", second["status"].get("message")
    for step in ("produce", "consume"):
        labels = argo.pod_of(second, step)["metadata"]["labels"]
        assert (labels.get(HIT), labels.get(REUSED)) == ("true", "true"), (step, labels)
    stamp_pod = argo.pod_of(second, "stamp")
    assert HIT not in stamp_pod["metadata"]["labels"]  # max_cache_staleness: P0D always runs
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert artifact_files(argo, second, "produce", "produce-data") == {"data": PAYLOAD}
    assert artifact_files(argo, second, "consume", "consume-digest") == {"data": digest.encode()}
    second_stamp = artifact_files(argo, second, "stamp", "stamp-stamped")["data"]
    assert second_stamp.startswith(f"{digest} at ".encode())  # read the bytes the produce hit wrote back
    assert second_stamp != first_stamp
    assert artifact_keys(argo.node(second, "produce")) != artifact_keys(argo.node(first, "produce"))
    # ... and recorded again: the step's row now names the second run's pod.
    cluster.wait_recorded(stamp_pod["metadata"]["name"])
    assert stamp_pod["metadata"]["name"] in {row["source_pod"] for row in cluster.rows()}
    assert argo.pod_of(first, "stamp")["metadata"]["name"] not in {row["source_pod"] for row in cluster.rows()}
