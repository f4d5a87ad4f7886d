"""Argo Workflows on the real control plane: the real workflow-controller and argoexec, pods under the process kubelet.

The first test proves the harness without stepcache: a DAG whose steps pass an output parameter, a `result` and an
output artifact (uploaded to the S3 bucket by `wait`, downloaded by the consumer's `init`) Succeeds with its outputs
in the Workflow's status. The second runs a parameters-only DAG twice in a namespace opted in to stepcache: the
second run is served from the cache, and Argo takes the replayed outputs as the step's own.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hack.cluster import argo as argo_harness

from tests.e2e.stepcache_fixtures import Cluster

HIT = "stepcache.dev/hit"
IMAGE = "busybox:1.36.1"
MESSAGE = "hello from produce"
PAYLOAD = b"payload written by produce\n"
PRODUCE = (
    f"printf '{MESSAGE}' > /tmp/message.txt && mkdir -p /tmp/out && "
    f"printf 'payload written by produce\\n' > /tmp/out/data.txt && echo 42"
)
CONSUME = (
    "sha256sum /tmp/in/data.txt | cut -d' ' -f1 | tr -d '\\n' > /tmp/digest && "
    "printf '%s/%s' '{{inputs.parameters.message}}' '{{inputs.parameters.result}}' > /tmp/received"
)


def container(script: str) -> dict[str, Any]:
    # Templates set `command`: without one the controller asks an image registry for the entrypoint.
    return {"image": IMAGE, "command": ["sh", "-c"], "args": [script]}


def dag(prefix: str, produce: dict[str, Any], consume: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": f"{prefix}-"},
        "spec": {
            "entrypoint": "main",
            "templates": [
                {
                    "name": "main",
                    "dag": {
                        "tasks": [
                            {"name": "produce", "template": "produce"},
                            {
                                "name": "consume",
                                "template": "consume",
                                "dependencies": ["produce"],
                                "arguments": arguments,
                            },
                        ]
                    },
                },
                {"name": "produce", **produce},
                {"name": "consume", **consume},
            ],
        },
    }


PASSED_PARAMETERS = [
    {"name": "message", "value": "{{tasks.produce.outputs.parameters.message}}"},
    {"name": "result", "value": "{{tasks.produce.outputs.result}}"},
]


def produce_consume_with_artifact() -> dict[str, Any]:
    """produce → consume: an output parameter, the `result` (stdout) and an output artifact that consume digests."""
    produce = {
        "container": container(PRODUCE),
        "outputs": {
            "parameters": [{"name": "message", "valueFrom": {"path": "/tmp/message.txt"}}],
            "artifacts": [{"name": "data", "path": "/tmp/out/data.txt"}],
        },
    }
    consume = {
        "inputs": {
            "parameters": [{"name": "message"}, {"name": "result"}],
            "artifacts": [{"name": "data", "path": "/tmp/in/data.txt"}],
        },
        "container": container(CONSUME),
        "outputs": {
            "parameters": [
                {"name": "digest", "valueFrom": {"path": "/tmp/digest"}},
                {"name": "received", "valueFrom": {"path": "/tmp/received"}},
            ]
        },
    }
    arguments = {
        "parameters": PASSED_PARAMETERS,
        "artifacts": [{"name": "data", "from": "{{tasks.produce.outputs.artifacts.data}}"}],
    }
    return dag("produce-consume", produce, consume, arguments)


def produce_consume_parameters_only() -> dict[str, Any]:
    """produce → consume passing an output parameter and the `result`; no artifacts anywhere."""
    produce = {
        "container": container(f"sleep 2 && printf '{MESSAGE}' > /tmp/message.txt && echo 42"),
        "outputs": {"parameters": [{"name": "message", "valueFrom": {"path": "/tmp/message.txt"}}]},
    }
    consume = {
        "inputs": {"parameters": [{"name": "message"}, {"name": "result"}]},
        "container": container(
            "printf '%s/%s' '{{inputs.parameters.message}}' '{{inputs.parameters.result}}' > /tmp/received"
        ),
        "outputs": {"parameters": [{"name": "received", "valueFrom": {"path": "/tmp/received"}}]},
    }
    return dag("parameters", produce, consume, {"parameters": PASSED_PARAMETERS})


def parameters(node: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in node.get("outputs", {}).get("parameters", [])}


def test_a_dag_passing_a_parameter_a_result_and_an_artifact_succeeds_under_argo(
    argo: argo_harness.ArgoCluster, argo_namespace: str
) -> None:
    workflow = argo.run(argo_namespace, produce_consume_with_artifact())

    assert workflow["status"]["phase"] == "Succeeded", workflow["status"].get("message")
    produce = argo.node(workflow, "produce")
    consume = argo.node(workflow, "consume")
    assert parameters(produce) == {"message": MESSAGE}
    assert produce["outputs"]["result"] == "42"
    (artifact,) = produce["outputs"]["artifacts"]
    assert artifact["name"] == "data"
    key = artifact["s3"]["key"]
    assert key.endswith("/data.tgz")
    assert key in argo.s3.object_keys()
    assert argo_harness.extract_tgz(argo.s3.get(key)) == {"data.txt": PAYLOAD}
    assert parameters(consume) == {
        "digest": hashlib.sha256(PAYLOAD).hexdigest(),
        "received": f"{MESSAGE}/42",
    }
    # The real executor ran: init and wait around main, in every step's pod.
    pod = argo.pod_of(workflow, "consume")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["init"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["wait", "main"]
    assert pod["status"]["phase"] == "Succeeded"


def test_a_parameters_only_dag_run_twice_is_served_from_cache_the_second_time(
    argo: argo_harness.ArgoCluster, cluster: Cluster
) -> None:
    argo.prepare_namespace(cluster.namespace)
    first = argo.run(cluster.namespace, produce_consume_parameters_only())
    assert first["status"]["phase"] == "Succeeded", first["status"].get("message")
    for step in ("produce", "consume"):
        cluster.wait_recorded(argo.pod_of(first, step)["metadata"]["name"])

    second = argo.run(cluster.namespace, produce_consume_parameters_only())

    assert second["status"]["phase"] == "Succeeded", second["status"].get("message")
    for step in ("produce", "consume"):
        pod = argo.pod_of(second, step)
        assert pod["metadata"]["labels"].get(HIT) == "true", (step, pod["metadata"].get("labels"))
    assert parameters(argo.node(second, "produce")) == {"message": MESSAGE}
    assert argo.node(second, "produce")["outputs"]["result"] == "42"
    assert parameters(argo.node(second, "consume")) == {"received": f"{MESSAGE}/42"}
    assert len(cluster.rows()) == 2  # one entry per step, written by the first run; hits write none
