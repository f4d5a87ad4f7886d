"""Many pods through the real API, fast: creation via the webhook, Succeeded by a status PATCH, a watch.

No kubelet takes part: pods are created (stepcache's real webhook signs them as misses), a scheduling gate keeps
them off any node, and the benchmark itself PATCHes their status subresource to Succeeded with terminated
containerStatuses — exactly what the recorder reads from a kubelet's report.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from bench import payloads, stage

__all__ = ["Api", "job_pod", "run_all", "succeeded_status"]


@functools.cache
def _template() -> dict[str, Any]:
    template: dict[str, Any] = payloads.job_manifest("unused")["spec"]["template"]
    return template


def job_pod(number: int) -> dict[str, Any]:
    """The fixture's Job-shaped pod (never scheduled), made distinct — its own key — by an env value."""
    template = _template()
    spec = copy.deepcopy(template["spec"])
    train = next(c for c in spec["containers"] if c["name"] == "train")
    next(e for e in train["env"] if e["name"] == "EPOCHS")["value"] = str(number)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "train-", "annotations": dict(template["metadata"]["annotations"])},
        "spec": spec,
    }


def succeeded_status(pod: dict[str, Any]) -> dict[str, Any]:
    """A merge patch for the status subresource: Succeeded, every container terminated with exit code 0."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    started = (now - datetime.timedelta(minutes=3)).isoformat().replace("+00:00", "Z")
    finished = now.isoformat().replace("+00:00", "Z")

    def status(container: dict[str, Any], message: str) -> dict[str, Any]:
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
            "state": {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "message": message,
                    "startedAt": started,
                    "finishedAt": finished,
                }
            },
        }

    spec = pod["spec"]
    return {
        "status": {
            "phase": "Succeeded",
            "startTime": started,
            "initContainerStatuses": [status(c, "") for c in spec.get("initContainers") or []],
            "containerStatuses": [status(c, f"{c['name']} done") for c in spec["containers"]],
        }
    }


class Api:
    """kube-apiserver as admin (client certificate), one keep-alive session."""

    def __init__(self, st: stage.Stage, *, limit: int = 32) -> None:
        context = ssl.create_default_context(cafile=str(st.cp.ca_file))
        context.load_cert_chain(st.cp.pki_dir / "admin.crt", st.cp.pki_dir / "admin.key")
        self.server = st.cp.server
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, ssl=context),
            timeout=aiohttp.ClientTimeout(total=60, sock_read=None),
        )

    async def close(self) -> None:
        await self.session.close()

    async def create_pod(self, namespace: str, body: bytes, *, dry_run: bool = False) -> tuple[int, dict[str, Any]]:
        url = f"{self.server}/api/v1/namespaces/{namespace}/pods" + ("?dryRun=All" if dry_run else "")
        async with self.session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            return response.status, json.loads(await response.read())

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> int:
        url = f"{self.server}/api/v1/namespaces/{namespace}/pods/{name}/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(url, data=json.dumps(patch), headers=headers) as response:
            await response.read()
            return response.status

    async def list_pods(self, namespace: str, *, selector: str = "") -> dict[str, Any]:
        params = {"labelSelector": selector} if selector else {}
        async with self.session.get(f"{self.server}/api/v1/namespaces/{namespace}/pods", params=params) as response:
            result: dict[str, Any] = json.loads(await response.read())
            return result

    async def watch_pods(
        self, namespace: str, *, resource_version: str, selector: str = ""
    ) -> AsyncIterator[tuple[float, dict[str, Any]]]:
        """(receipt time.time(), event) for every pod event from `resource_version` on."""
        params = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": "3600"}
        if selector:
            params["labelSelector"] = selector
        async with self.session.get(
            f"{self.server}/api/v1/namespaces/{namespace}/pods",
            params=params,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as response:
            async for line in response.content:
                if line.strip():
                    yield time.time(), json.loads(line)


async def run_all(items: Sequence[Any], work: Callable[[Any], Awaitable[Any]], *, workers: int) -> list[Any]:
    """`work(item)` for every item, at most `workers` at a time; the results in order."""
    results: list[Any] = [None] * len(items)
    cursor = [0]

    async def worker() -> None:
        while cursor[0] < len(items):
            index = cursor[0]
            cursor[0] += 1
            results[index] = await work(items[index])

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results
