"""What an Argo step's entry can be made of, on the real control plane with the real workflow-controller.

A hand-made pod can carry a real step's template (its node id, its workflow's labels, even a made-up outputs
annotation) while running something else. Its key comes from what it runs, so it never shares the real step's key;
the webhook drops an outputs annotation written at CREATE; and the real step's next run is served its own result.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hack.cluster import argo as argo_harness
from hack.cluster.controlplane import wait_for

from tests.e2e.stepcache_fixtures import Cluster
from tests.e2e.test_argo import MESSAGE, parameters, produce_consume_parameters_only

KEY = "stepcache.dev/key"
OUTPUTS = "workflows.argoproj.io/outputs"
FORGED = {"parameters": [{"name": "message", "value": "forged"}], "result": "666"}


def forged_copy(real: dict[str, Any]) -> dict[str, Any]:
    """The real produce pod as its creator could write it: same template and node, `main` runs `true` instead."""
    metadata = real["metadata"]
    kept_annotations = {k: v for k, v in metadata.get("annotations", {}).items() if not k.startswith("stepcache.dev/")}
    kept_labels = {k: v for k, v in metadata.get("labels", {}).items() if not k.startswith("stepcache.dev/")}
    spec = copy.deepcopy(real["spec"])
    for field in ("nodeName", "priority"):  # set by the scheduler and by admission: not the creator's to write
        spec.pop(field, None)
    main = next(c for c in spec["containers"] if c["name"] == "main")
    main["args"] = ["true"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{metadata['name']}-forged",
            "labels": kept_labels,
            "annotations": {**kept_annotations, OUTPUTS: json.dumps(FORGED)},
        },
        "spec": spec,
    }


def test_a_hand_made_pod_with_a_real_steps_template_gets_another_key_and_cannot_poison_the_step(
    argo: argo_harness.ArgoCluster, cluster: Cluster
) -> None:
    argo.prepare_namespace(cluster.namespace)
    first = argo.run(cluster.namespace, produce_consume_parameters_only())
    assert first["status"]["phase"] == "Succeeded", first["status"].get("message")
    real = argo.pod_of(first, "produce")
    cluster.wait_recorded(real["metadata"]["name"])

    forged, _ = cluster.create(forged_copy(real))
    assert forged["metadata"]["annotations"][KEY] != real["metadata"]["annotations"][KEY]
    assert OUTPUTS not in forged["metadata"]["annotations"]  # written at CREATE: never trusted, so removed
    # Its `main` wrote no outputs, so Argo's executor may fail it; either way it finishes.
    wait_for(
        lambda: cluster.pod(forged["metadata"]["name"])["status"].get("phase") in ("Succeeded", "Failed"),
        90,
        "the forged pod to finish",
    )

    second = argo.run(cluster.namespace, produce_consume_parameters_only())
    assert second["status"]["phase"] == "Succeeded", second["status"].get("message")
    assert argo.pod_of(second, "produce")["metadata"]["labels"].get("stepcache.dev/hit") == "true"
    assert parameters(argo.node(second, "produce")) == {"message": MESSAGE}
    assert argo.node(second, "produce")["outputs"]["result"] == "42"
    for row in cluster.rows():
        assert "forged" not in json.dumps(row)
