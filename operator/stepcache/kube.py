"""The Kubernetes API calls stepcache makes itself (kopf makes the watches): a thin kubernetes-asyncio adapter.

The only write to a user's pod is the cache-id label, and it is guarded by the pod's uid so a label never lands on
a different pod that reused the name.
"""

from __future__ import annotations

import base64
import json
import os
import secrets as pysecrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from stepcache import keys, mutation

__all__ = ["SIGNING_SECRET", "Kube", "connect"]

SIGNING_SECRET = "stepcache-signing-key"
_SIGNING_FIELD = "key"
_WORKFLOW_GROUP = "argoproj.io"
_WORKFLOW_VERSION = "v1alpha1"
_T = TypeVar("_T")


async def connect() -> Kube:
    """Log in the way kubectl would: in-cluster when running in a pod, else $KUBECONFIG or ~/.kube/config."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(client_configuration=configuration)
    # One connection per request in flight, so none waits for a free connection or a TLS handshake: the recorder's
    # 16 recording slots, the mirror's 2 workers and 8 for its reconcile passes and CacheHit Events, and the
    # watch of hit pods.
    configuration.connection_pool_maxsize = 32
    return Kube(client.ApiClient(configuration))


class Kube:
    """The calls, each one request; errors other than "not found" / "conflict" propagate as ApiException."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    @property
    def api_client(self) -> client.ApiClient:
        """The one API client of the process, for the other adapters (`entries`) to share its connections."""
        return self._api

    async def close(self) -> None:
        await self._api.close()

    async def label_cache_id(self, *, namespace: str, name: str, uid: str, entry_id: int) -> bool:
        """Set the pod's cache-id label; False when the pod is gone (or is another pod by now)."""
        escaped = mutation.CACHE_ID.replace("~", "~0").replace("/", "~1")
        body = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": f"/metadata/labels/{escaped}", "value": str(entry_id)},
        ]
        return await self._json_patch_pod(namespace=namespace, name=name, body=body)

    async def clear_cache_id(self, *, namespace: str, name: str, uid: str) -> bool:
        """Remove the pod's cache-id label (a rejected pod leaves the recorder's watch); False when already gone."""
        escaped = mutation.CACHE_ID.replace("~", "~0").replace("/", "~1")
        body = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "remove", "path": f"/metadata/labels/{escaped}"},
        ]
        return await self._json_patch_pod(namespace=namespace, name=name, body=body)

    async def _json_patch_pod(self, *, namespace: str, name: str, body: list[dict[str, Any]]) -> bool:
        # The response is not turned into a V1Pod: that would add client-side validation that can fail on a pod the
        # API server accepted, leaving a recorded pod unlabelled.
        response: Any = await self._core.patch_namespaced_pod(name, namespace, body, _preload_content=False)
        try:
            # Read whole even when unused: aiohttp closes a connection whose answer was left unread, and the next
            # request pays a new TLS handshake (137 of 200 label PATCHes did, on both sides' CPU).
            answer: bytes = await response.read()
        finally:
            response.release()
        if response.status in (404, 422):  # gone, the uid test failed, or nothing to remove: not ours to change
            return False
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=answer.decode(errors="replace"))
        return True

    async def read_pod(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod as raw JSON (no client-side model), or None when it is gone."""
        response: Any = await self._core.read_namespaced_pod(name, namespace, _preload_content=False)
        try:
            if response.status == 404:
                return None
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=await response.text())
            pod: dict[str, Any] = json.loads(await response.read())
        finally:
            response.release()
        return pod

    async def unrecorded_succeeded_pods(self, *, page_size: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every Succeeded pod whose cache-id label is still empty, selected by the API server, page by page."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "label_selector": f"{mutation.CACHE_ID}=",
                "field_selector": "status.phase=Succeeded",
                "limit": page_size,
            }
            if token:
                kwargs["_continue"] = token
            response: Any = await self._core.list_pod_for_all_namespaces(**kwargs, _preload_content=False)
            try:
                if not 200 <= response.status <= 299:
                    raise ApiException(status=response.status, reason=await response.text())
                page = json.loads(await response.read())
            finally:
                response.release()
            for pod in page.get("items") or []:
                yield pod
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    async def opted_in_namespaces(self) -> list[str]:
        """Names of the namespaces labelled `stepcache.dev/enabled=true` right now (one LIST, at start)."""
        listed = await self._core.list_namespace(label_selector=f"{keys.ENABLED_LABEL}=true")
        return [ns.metadata.name for ns in listed.items]

    async def configmaps(self, *, namespace: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
        """The namespace's ConfigMaps as (name, data, binaryData), for the key's view of what they hold."""
        listed = await self._core.list_namespaced_config_map(namespace)
        return [(cm.metadata.name, dict(cm.data or {}), dict(cm.binary_data or {})) for cm in listed.items]

    async def secrets(self, *, namespace: str) -> list[tuple[str, dict[str, str]]]:
        """The namespace's Secrets as (name, base64 data); only with STEPCACHE_KEY_SECRET_CONTENT."""
        listed = await self._core.list_namespaced_secret(namespace)
        return [(secret.metadata.name, dict(secret.data or {})) for secret in listed.items]

    async def workflow_task_result(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        """Argo's WorkflowTaskResult for a node, or None when it (or its CRD) does not exist."""
        result: dict[str, Any] | None = await _unless_missing(
            self._custom.get_namespaced_custom_object(
                _WORKFLOW_GROUP, _WORKFLOW_VERSION, namespace, "workflowtaskresults", name
            )
        )
        return result

    async def secret_value(self, *, namespace: str, name: str, key: str) -> bytes | None:
        """One decoded value of a Secret (Argo's artifact repository credentials), or None when the Secret or the key
        does not exist; a 403 (the operator may read only the Secret names its RBAC lists) propagates."""
        secret = await _unless_missing(self._core.read_namespaced_secret(name, namespace))
        if secret is None:
            return None
        encoded = (secret.data or {}).get(key)
        return None if encoded is None else base64.b64decode(encoded)

    async def signing_key(self, *, namespace: str) -> bytes:
        """Read the shared signing key, creating it if missing; replicas racing to create end up with one key."""
        existing = await self._read_signing_secret(namespace)
        if existing is not None:
            return existing
        fresh = pysecrets.token_bytes(32)
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=SIGNING_SECRET,
                labels={"app.kubernetes.io/name": "stepcache", "app.kubernetes.io/component": "signing-key"},
            ),
            type="Opaque",
            data={_SIGNING_FIELD: base64.b64encode(fresh).decode("ascii")},
        )
        try:
            await self._core.create_namespaced_secret(namespace, secret)
        except ApiException as exc:
            if exc.status != 409:
                raise
            raced = await self._read_signing_secret(namespace)
            if raced is None:
                raise RuntimeError(
                    f"Secret {namespace}/{SIGNING_SECRET} vanished right after a create conflict"
                ) from exc
            return raced
        return fresh

    async def _read_signing_secret(self, namespace: str) -> bytes | None:
        secret = await _unless_missing(self._core.read_namespaced_secret(SIGNING_SECRET, namespace))
        if secret is None:
            return None
        encoded = (secret.data or {}).get(_SIGNING_FIELD)
        if not encoded:
            raise ValueError(f"Secret {namespace}/{SIGNING_SECRET} has no data field {_SIGNING_FIELD!r}")
        return base64.b64decode(encoded)


async def _unless_missing(request: Awaitable[_T]) -> _T | None:
    """The API's answer, or None when it answers 404 (the object, or its CRD, does not exist)."""
    try:
        return await request
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
