"""The Kubernetes side of the cache's view: CacheEntry objects, Events on pods, and the watch of hit pods.

A thin kubernetes-asyncio adapter: each method is one request (a listing, one page at a time), the bodies are built by
`cacheentry`, and the answers that are part of normal operation — "not found", "already exists", "changed since you
read it" — are return values, not errors. Everything else is an `ApiError`, chained from the client's.
Responses are read as plain JSON (`_preload_content=False`): the client's model classes would add validation that
can fail on objects the API server accepted, and a cost per object that a listing of thousands does not need.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from stepcache import cacheentry, errors

__all__ = ["ApiError", "Entries"]

_TIMEOUT = 30.0
"""Seconds for one request (a page of a listing included); watches set their own, longer bound."""
_PAGE = 500
_WATCH_SECONDS = 300
"""The API server ends each watch after this long; the loop then resumes from the last resourceVersion."""
_MERGE = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
_FAILURES = (aiohttp.ClientError, OSError, TimeoutError)


class ApiError(errors.StepcacheError):
    """The API server could not be reached, or answered with an unexpected status."""

    def __init__(self, operation: str, *, status: int, reason: str) -> None:
        super().__init__(f"{operation}: {status or 'no answer'} {reason}".strip())
        self.status = status


class Gone(Exception):
    """A watch's resourceVersion is too old (410): list again."""


class Entries:
    """CacheEntry objects and Events through one API client (shared with `kube`)."""

    def __init__(self, api: client.ApiClient) -> None:
        # Any: with `_preload_content=False` these return raw responses, not the types the client declares.
        self._custom: Any = client.CustomObjectsApi(api)
        self._core: Any = client.CoreV1Api(api)

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a CacheEntry; False when one of that name exists already."""
        metadata = obj["metadata"]
        status, answer = await self._send(
            "create cacheentry",
            self._custom.create_namespaced_custom_object(
                cacheentry.GROUP,
                cacheentry.VERSION,
                metadata["namespace"],
                cacheentry.PLURAL,
                dict(obj),
                _preload_content=False,
                _request_timeout=_TIMEOUT,
            ),
        )
        if status == 409:
            return False
        _expect(status, answer, "create cacheentry")
        return True

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A CacheEntry, or None when there is none of that name."""
        status, answer = await self._send(
            "get cacheentry",
            self._custom.get_namespaced_custom_object(
                cacheentry.GROUP,
                cacheentry.VERSION,
                namespace,
                cacheentry.PLURAL,
                name,
                _preload_content=False,
                _request_timeout=_TIMEOUT,
            ),
        )
        if status == 404:
            return None
        _expect(status, answer, "get cacheentry")
        result: dict[str, Any] = answer
        return result

    async def replace_spec(self, target: cacheentry.ObjectRef, spec: Mapping[str, Any]) -> bool:
        """Replace the spec, only if the object still has `target.resource_version` (when given).

        False when the object is gone or changed since it was read: the caller's information is stale.
        """
        operations: list[dict[str, Any]] = []
        if target.resource_version is not None:
            operations.append({"op": "test", "path": "/metadata/resourceVersion", "value": target.resource_version})
        operations.append({"op": "replace", "path": "/spec", "value": dict(spec)})
        status, answer = await self._send(
            "patch cacheentry",
            self._custom.patch_namespaced_custom_object(
                cacheentry.GROUP,
                cacheentry.VERSION,
                target.namespace,
                cacheentry.PLURAL,
                target.name,
                operations,
                _content_type=_JSON_PATCH,
                _preload_content=False,
                _request_timeout=_TIMEOUT,
            ),
        )
        if status in (404, 409, 422):  # gone; or the test of the resourceVersion failed
            return False
        _expect(status, answer, "patch cacheentry")
        return True

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        """Merge `status` into the object's status subresource (None removes a field); False when it is gone."""
        code, answer = await self._send(
            "patch cacheentry status",
            self._custom.patch_namespaced_custom_object_status(
                cacheentry.GROUP,
                cacheentry.VERSION,
                namespace,
                cacheentry.PLURAL,
                name,
                {"status": dict(status)},
                _content_type=_MERGE,
                _preload_content=False,
                _request_timeout=_TIMEOUT,
            ),
        )
        if code == 404:
            return False
        _expect(code, answer, "patch cacheentry status")
        return True

    async def delete(self, target: cacheentry.ObjectRef) -> bool:
        """Ask for deletion (the finalizer then holds the object until its row is gone).

        With `target.resource_version`, only if the object is unchanged since it was read. False when it is gone
        or has changed.
        """
        options: dict[str, Any] = {}
        if target.resource_version is not None:
            options["preconditions"] = {"resourceVersion": target.resource_version}
        status, answer = await self._send(
            "delete cacheentry",
            self._custom.delete_namespaced_custom_object(
                cacheentry.GROUP,
                cacheentry.VERSION,
                target.namespace,
                cacheentry.PLURAL,
                target.name,
                body=options,
                _preload_content=False,
                _request_timeout=_TIMEOUT,
            ),
        )
        if status in (404, 409):
            return False
        _expect(status, answer, "delete cacheentry")
        return True

    async def list_all(self) -> list[dict[str, Any]]:
        """Every CacheEntry in the cluster, page by page, each cut down to what a reconcile compares.

        The reconcile holds every object at once; whole objects (managedFields, labels, finalizers) cost ≈ 10 KB of
        Python each, so 10,000 entries took the operator past 200 MiB once a minute.
        """
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": _PAGE}
            if token:
                kwargs["_continue"] = token
            status, answer = await self._send(
                "list cacheentries",
                self._custom.list_cluster_custom_object(
                    cacheentry.GROUP,
                    cacheentry.VERSION,
                    cacheentry.PLURAL,
                    _preload_content=False,
                    _request_timeout=_TIMEOUT,
                    **kwargs,
                ),
            )
            _expect(status, answer, "list cacheentries")
            items.extend(_compared(item) for item in answer.get("items") or [])
            token = (answer.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def create_event(self, event: Mapping[str, Any]) -> bool:
        """Post an Event; False when an Event of that name exists (this one was posted already)."""
        status, answer = await self._send(
            "create event",
            self._core.create_namespaced_event(
                event["metadata"]["namespace"], dict(event), _preload_content=False, _request_timeout=_TIMEOUT
            ),
        )
        if status == 409:
            return False
        _expect(status, answer, "create event")
        return True

    async def watch_pods(self, *, label_selector: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Every pod matching the selector, listed, then its changes as `(type, pod)` for as long as it is iterated.

        Listed pods come as `LISTED`. After a 410 (the watch fell too far behind) the pods are listed again, so a
        consumer must tolerate seeing a pod twice. Connection failures end the iteration with `ApiError`.
        """
        while True:
            version = ""
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"label_selector": label_selector, "limit": _PAGE}
                if token:
                    kwargs["_continue"] = token
                status, answer = await self._send(
                    "list pods",
                    self._core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=_TIMEOUT, **kwargs),
                )
                _expect(status, answer, "list pods")
                for pod in answer.get("items") or []:
                    yield "LISTED", pod
                token = (answer.get("metadata") or {}).get("continue")
                version = (answer.get("metadata") or {}).get("resourceVersion") or version
                if not token:
                    break
            try:
                while True:
                    async for kind, obj in self._watch_once(label_selector=label_selector, version=version):
                        if kind == "BOOKMARK":
                            version = (obj.get("metadata") or {}).get("resourceVersion") or version
                            continue
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        yield kind, obj
            except Gone:
                continue

    async def _watch_once(self, *, label_selector: str, version: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            response = await self._core.list_pod_for_all_namespaces(
                label_selector=label_selector,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=_WATCH_SECONDS,
                _preload_content=False,
                _request_timeout=_WATCH_SECONDS + _TIMEOUT,
            )
        except _FAILURES as exc:
            raise ApiError("watch pods", status=0, reason=_describe(exc)) from exc
        try:
            if response.status == 410:
                raise Gone()
            if not 200 <= response.status <= 299:
                raise ApiError("watch pods", status=response.status, reason=(await response.text())[:500])
            buffer = b""
            try:
                # Lines are split here: aiohttp's readline() refuses lines longer than 128 KiB, and pods can be.
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield _watch_event(line)
            except _FAILURES as exc:
                raise ApiError("watch pods", status=0, reason=_describe(exc)) from exc
        finally:
            response.release()

    async def _send(self, operation: str, call: Awaitable[Any]) -> tuple[int, Any]:
        """Make the request; return its status and decoded JSON body (None when empty)."""
        try:
            response = await call
            try:
                text = await response.text()
            finally:
                response.release()
        except _FAILURES as exc:
            raise ApiError(operation, status=0, reason=_describe(exc)) from exc
        try:
            decoded = json.loads(text) if text else None
        except ValueError:
            decoded = {"message": text[:500]}
        return response.status, decoded


def _watch_event(line: bytes) -> tuple[str, dict[str, Any]]:
    event = json.loads(line)
    kind = str(event.get("type") or "")
    obj = event.get("object") or {}
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise Gone()
        raise ApiError("watch pods", status=int(obj.get("code") or 0), reason=str(obj.get("message") or ""))
    return kind, obj


def _compared(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What `cacheentry.plan` reads of a listed object: its identity, version, deletion, spec and status."""
    metadata = obj.get("metadata") or {}
    kept = {
        name: metadata[name]
        for name in ("namespace", "name", "resourceVersion", "deletionTimestamp")
        if name in metadata
    }
    return {"metadata": kept, "spec": obj.get("spec"), "status": obj.get("status")}


def _expect(status: int, answer: Any, operation: str) -> None:
    if not 200 <= status <= 299:
        message = answer.get("message") if isinstance(answer, Mapping) else None
        raise ApiError(operation, status=status, reason=str(message or ""))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
