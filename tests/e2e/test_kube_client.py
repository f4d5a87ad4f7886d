"""The operator's API client against the real kube-apiserver: what it costs the API server per request.

A label PATCH whose answer is left unread makes aiohttp close the connection, so the next request pays a new TLS
handshake on both sides; on a busy API server that CPU is taken from every pod's recording.
"""

from __future__ import annotations

import json

import aiohttp
from hack.cluster import controlplane
from kubernetes_asyncio import client, config

from stepcache import kube, mutation

PATCHES = 50


def unscheduled_pods(count: int) -> dict[str, object]:
    """Pods no scheduler takes (so no kubelet runs them), labelled as the webhook labels a miss, and as large as a real
    step's pod once it ran (its status and managedFields make 4–8 KB): an answer that size comes in several reads."""
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"step-{index}",
                    "labels": {mutation.CACHE_ID: ""},
                    "annotations": {"example.com/notes": "x" * 6000},
                },
                "spec": {
                    "schedulerName": "nobody",
                    "containers": [{"name": "main", "image": "busybox:1.36.1", "command": ["true"]}],
                },
            }
            for index in range(count)
        ],
    }


async def test_label_patches_reuse_the_api_client_s_connections(
    control_plane: controlplane.ControlPlane, plain_namespace: str
) -> None:
    control_plane.kubectl(
        "create", "--namespace", plain_namespace, "-f", "-", input=json.dumps(unscheduled_pods(PATCHES))
    )
    pods = json.loads(control_plane.kubectl("get", "pods", "--namespace", plain_namespace, "-o", "json").stdout)[
        "items"
    ]
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=configuration)
    api = kube.Kube(client.ApiClient(configuration))
    opened = 0

    async def count(session: object, context: object, params: object) -> None:
        nonlocal opened
        opened += 1

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(count)
    tracing.freeze()
    try:
        for index, pod in enumerate(pods):
            if index == 1:
                # The first PATCH opened the connection; from here on every new one is a handshake too many.
                api.api_client.rest_client.pool_manager._trace_configs.append(tracing)
            metadata = pod["metadata"]
            labelled = await api.label_cache_id(
                namespace=plain_namespace, name=metadata["name"], uid=metadata["uid"], entry_id=index + 1
            )
            assert labelled
    finally:
        await api.close()

    assert opened == 0
    listed = control_plane.kubectl(
        "get",
        "pods",
        "--namespace",
        plain_namespace,
        "-o",
        "jsonpath={.items[*].metadata.labels.stepcache\\.dev/cache-id}",
    )
    assert sorted(int(value) for value in listed.stdout.split()) == list(range(1, PATCHES + 1))
