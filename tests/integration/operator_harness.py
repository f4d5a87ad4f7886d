"""stepcache's production kopf wiring, run in-process against kmock's Kubernetes emulator and a real PostgreSQL.

The operator under test is exactly what `stepcache run` starts — `main.build_registry` under `kopf.operator` — with
only the outside world replaced: the Kubernetes API is kmock's in-memory emulator (reached through a kubeconfig, the
way both kopf's login and `kube.connect()` find a cluster outside a pod), and the webhook serves TLS on loopback with
a certificate from `stepcache.tls`. Tests talk to it the way the API server would: AdmissionReviews over HTTPS, pods
created, listed and watched through the API.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import gzip
import importlib.resources
import json
import pathlib
import ssl
import threading
import unittest.mock
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar, cast

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
import kopf
import kubernetes_asyncio.config.kube_config
import pytest
import yaml
from hack.cluster import ports
from kmock._internal import aiobus
from kmock._internal import parsing as kmock_parsing

from stepcache import config, keys, main, runtime, tls
from tests.integration import polling

__all__ = [
    "DEADLINE",
    "PODS",
    "SIGNING_KEY",
    "Emulator",
    "Launcher",
    "Operator",
    "WebhookTLS",
    "admission_request",
    "create",
    "delete",
    "emulated_cluster",
    "eventually",
    "label_namespace",
    "merge_patch",
    "namespace",
    "object_path",
    "patched",
    "review",
    "running_operator",
    "settings_for",
    "webhook_tls",
    "write_kubeconfig",
]

_T = TypeVar("_T")

DEADLINE = polling.DEADLINE
eventually = polling.eventually
SIGNING_KEY = b"stepcache-integration-signing-key-0123456789"
PODS = kmock.resource("", "v1", "pods")


class _Clock:
    """The emulated cluster's revision: one tick per change of any object."""

    def __init__(self) -> None:
        self.now = 0

    def tick(self) -> int:
        self.now += 1
        return self.now


class _RevisionedBus(aiobus.Bus[Any]):
    """One resource's event bus, noting the cluster-wide revision at which each object last changed.

    kmock puts every change on its resource's bus while it holds the emulator's lock, so revisions are ordered as
    the changes were made.
    """

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock
        self.changed: dict[tuple[str | None, str | None], int] = {}

    async def put(self, *items: Any) -> None:
        for item in items:
            metadata = (item.get("object") or {}).get("metadata") or {}
            self.changed[metadata.get("namespace"), metadata.get("name")] = self.clock.tick()
        await super().put(*items)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with two things a real API server does that the operator relies on.

    - JSON Patch (RFC 6902), which the recorder's uid-guarded label write uses: kmock merges every PATCH body as a
      merge patch and cannot merge a list. The operations are applied as an API server would, `test` included: a
      failed test answers 422 and changes nothing.
    - Resource versions for list-then-watch: kmock's watch starts by replaying every object, so each object a LIST
      just returned is delivered a second time. Here a LIST returns the current revision and a WATCH from it replays
      only the objects changed since, then streams; without this, a restarted operator would see each pod twice.

    And one thing a network does: a connection cut in the middle of a request (`cut_next`).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        clock = _Clock()
        self._clock = clock
        self._buses = collections.defaultdict(lambda: _RevisionedBus(clock))
        self._cuts: list[tuple[str, str]] = []

    def cut_next(self, *, method: str, path: str) -> None:
        """Close the connection of the next `method` request to `path` unanswered, before it changes anything.

        The client sees the server disconnect (aiohttp's ServerDisconnectedError), not an API error: what a dropped
        connection or a killed API server does to a request in flight. The request is still in kmock's log.
        """
        self._cuts.append((method, path))

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        cut = (request.method.value, request.url.path)
        if cut in self._cuts:
            self._cuts.remove(cut)
            transport = request._raw_request.transport if request._raw_request is not None else None
            assert transport is not None, "the request came over no connection"
            transport.close()
            return aiohttp.web.Response(status=500)  # never sent: the connection is closed
        if request.action != kmock.action.UPDATE or not isinstance(request.data, list):
            return await super()._handle(request)
        # An UPDATE names its object.
        assert request.resource is not None
        assert request.name is not None
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return _status(404, "NotFound", f"{request.name} not found")
            stored = self.objects[key]
            try:
                changed = jsonpatch.apply_patch(stored.raw, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return _status(422, "Invalid", str(exc))
            stored.create(changed)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": stored.raw})
            return aiohttp.web.json_response(stored.raw)

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [obj.raw for _, obj in self._selected(request)]
            version = self._clock.now
        return {"metadata": {"resourceVersion": str(version)}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion", "")
        if not since.isdigit():
            async for event in super()._serve_watch(request):
                yield event
            return
        yield b""  # send the headers now, as kmock does: a watch may stay silent for long
        assert request.resource is not None  # a WATCH is of a resource
        bus = cast(_RevisionedBus, self._buses[request.resource])
        async with self._lock:  # no change can slip between the replay and the stream
            marker = await bus.mark()
            replay = [
                {"type": "MODIFIED", "object": obj.raw}
                for (_, namespace, name), obj in self._selected(request)
                if bus.changed.get((namespace, name), 0) > int(since)
            ]
        try:
            for event in replay:
                yield event
            async for event in bus.stream(since=marker):
                metadata = (event.get("object") or {}).get("metadata") or {}
                namespace, name = metadata.get("namespace"), metadata.get("name")
                if request.namespace in (None, namespace) and request.name in (None, name):
                    yield event
        finally:
            await bus.unmark(marker)

    def _selected(self, request: kmock.Request) -> list[tuple[tuple[Any, str | None, str], Any]]:
        return [
            (key, obj)
            for key, obj in self.objects.items()
            if key[0] == request.resource
            and request.namespace in (None, key[1])
            and request.name in (None, key[2])
            and not obj.deleted
        ]


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason}
    body["message"] = message
    return aiohttp.web.json_response(body, status=code)


def _parse_path(path: str) -> kmock_parsing.ParsedPath:
    """kmock 0.8 reads `/api/v1/namespaces[/NAME]` as a namespace prefix with no resource (and fails on the bare
    list URL), so Namespace objects cannot be listed, watched or created; these two forms are the Namespace resource.
    """
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return kmock_parsing.ParsedPath(group="", version="v1", plural="namespaces", namespace=None, name=name)
    return _KMOCK_PARSE_PATH(path)


_KMOCK_PARSE_PATH = kmock_parsing.parse_path


@contextlib.asynccontextmanager
async def emulated_cluster() -> AsyncIterator[Emulator]:
    """An empty cluster (built-in resources only) on a loopback port."""
    with unittest.mock.patch.object(kmock_parsing, "parse_path", _parse_path):
        async with _serve() as cluster:
            yield cluster


@contextlib.asynccontextmanager
async def _serve() -> AsyncIterator[Emulator]:
    async with Emulator() as cluster, kmock.Server(cluster):
        # What `resources.load_bundled()` reads, without its deprecated importlib.resources call (warnings are errors).
        bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
        cluster.resources.load_data(gzip.decompress(bundled))
        yield cluster


def write_kubeconfig(path: pathlib.Path, *, server: str) -> pathlib.Path:
    """A kubeconfig whose current context is the emulator (plain HTTP, no credentials)."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "unused"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(kubeconfig), encoding="utf-8")
    return path


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebhookTLS:
    """A test CA and the webhook's serving certificate for 127.0.0.1, as files."""

    ca_pem: bytes
    cert_file: pathlib.Path
    key_file: pathlib.Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks the server's address."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))


def webhook_tls(directory: pathlib.Path) -> WebhookTLS:
    ca = tls.make_ca("stepcache test CA")
    serving = tls.issue(ca, common_name="stepcache-webhook", ip_addresses=["127.0.0.1"], server=True)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    tls.write_pair(serving, cert_file=cert_file, key_file=key_file)
    return WebhookTLS(ca_pem=ca.cert_pem, cert_file=cert_file, key_file=key_file)


def settings_for(database_url: str, *, certs: WebhookTLS, port: int, **environ: str) -> config.Settings:
    """Settings as the operator reads them from its environment: loopback webhook, no metrics, health or blob
    ports."""
    return config.Settings.from_env(
        {
            "STEPCACHE_DATABASE_URL": database_url,
            "STEPCACHE_WEBHOOK_HOST": "127.0.0.1",
            "STEPCACHE_WEBHOOK_PORT": str(port),
            "STEPCACHE_WEBHOOK_CERT_FILE": str(certs.cert_file),
            "STEPCACHE_WEBHOOK_KEY_FILE": str(certs.key_file),
            "STEPCACHE_METRICS_PORT": "0",
            "STEPCACHE_HEALTH_PORT": "0",
            "STEPCACHE_BLOB_PORT": "0",
            **environ,
        }
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Operator:
    """One running operator: its event loop (in a thread of its own) and the memo its startup handler filled."""

    memo: kopf.Memo
    settings: config.Settings
    loop: asyncio.AbstractEventLoop

    @property
    def runtime(self) -> runtime.Runtime:
        rt: runtime.Runtime = self.memo["runtime"]
        return rt

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.settings.webhook_port}/{main.WEBHOOK_ID}"

    async def inspect(self, read: Callable[[], _T]) -> _T:
        """Run `read` on the operator's loop, so it sees the operator's state between two of its steps."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(read())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return await asyncio.wrap_future(future)


@contextlib.asynccontextmanager
async def running_operator(
    settings: config.Settings, *, kubeconfig: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Operator]:
    """Run the production registry until the block ends, then stop it as SIGTERM would (cleanup handlers run).

    kopf runs in a thread with its own event loop, as kopf's documentation advises for embedding: when it stops,
    kopf waits for, then cancels, every task its loop gained after it started — in a shared loop, that would be the
    test's own fixture teardown.
    """
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # kubernetes-asyncio reads $KUBECONFIG once, at import; a process started with the variable set sees this.
    monkeypatch.setattr(kubernetes_asyncio.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    registry = main.build_registry(settings, signing_key=SIGNING_KEY)
    memo = kopf.Memo()
    ready, stop = threading.Event(), threading.Event()
    loops: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()
    exited: concurrent.futures.Future[None] = concurrent.futures.Future()

    def serve() -> None:
        async def operate() -> None:
            loops.set_result(asyncio.get_running_loop())
            await kopf.operator(
                registry=registry, memo=memo, clusterwide=True, standalone=True, ready_flag=ready, stop_flag=stop
            )

        try:
            asyncio.run(operate())
        except BaseException as exc:
            exited.set_exception(exc)
        else:
            exited.set_result(None)

    thread = threading.Thread(target=serve, name="stepcache-operator-under-test", daemon=True)
    thread.start()
    try:
        await _until_ready(exited, ready)
        operator = Operator(memo=memo, settings=settings, loop=loops.result())
        # kopf starts its webhook server once it has scanned the cluster's resources, a moment after "ready".
        await eventually(lambda: _accepts_connections(settings.webhook_port))
        yield operator
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await asyncio.wrap_future(exited)
        thread.join()


async def _until_ready(exited: concurrent.futures.Future[None], ready: threading.Event) -> None:
    async def started() -> bool:
        if exited.done():
            exited.result()  # re-raises why the operator exited
            raise AssertionError("the operator exited before it was ready")
        return ready.is_set()

    await eventually(started)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launcher:
    """Starts operators on one emulated cluster; tests differ in the database and a few settings."""

    cluster: Emulator
    certs: WebhookTLS
    tmp_path: pathlib.Path
    monkeypatch: pytest.MonkeyPatch

    @contextlib.asynccontextmanager
    async def run(self, database_url: str, *, opted_in: str, **environ: str) -> AsyncIterator[Operator]:
        """An operator with loopback settings, once its namespace watch has delivered `opted_in`."""
        settings = settings_for(database_url, certs=self.certs, port=ports.free_port(), **environ)
        kubeconfig = write_kubeconfig(self.tmp_path / "kubeconfig", server=str(self.cluster.url))
        async with running_operator(settings, kubeconfig=kubeconfig, monkeypatch=self.monkeypatch) as operator:

            async def watched() -> bool:
                return await operator.inspect(lambda: opted_in in operator.runtime.namespaces)

            await eventually(watched)
            yield operator


async def _accepts_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def _collection(obj: Mapping[str, Any]) -> str:
    """The API path of the collection `obj` belongs to (its kind's plural is its lowercased kind plus "s")."""
    metadata = obj.get("metadata") or {}
    kind, api_version = obj["kind"], obj["apiVersion"]
    if kind == "Namespace":
        return "/api/v1/namespaces"  # served with _parse_path
    if kind in ("Pod", "ConfigMap", "Secret"):
        return f"/api/v1/namespaces/{metadata['namespace']}/{kind.lower()}s"
    if "/" in api_version:  # a custom resource (Argo's WorkflowTaskResult): kmock serves any group and plural
        return f"/apis/{api_version}/namespaces/{metadata['namespace']}/{kind.lower()}s"
    raise ValueError(f"no path for kind {kind}")


def object_path(obj: Mapping[str, Any]) -> str:
    """The API path of one object."""
    return f"{_collection(obj)}/{obj['metadata']['name']}"


async def create(cluster: Emulator, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Create an object through the API (so watchers see ADDED), as kubectl would."""
    headers = {"Content-Type": "application/json"}
    async with cluster.post(_collection(obj), data=json.dumps(obj), headers=headers) as response:
        assert response.status < 300, await response.text()
        created: dict[str, Any] = await response.json()
        return created


async def merge_patch(cluster: Emulator, obj: Mapping[str, Any], body: Mapping[str, Any]) -> None:
    """Merge-patch an object through the API (so watchers see MODIFIED), as `kubectl patch --type=merge` would."""
    headers = {"Content-Type": "application/merge-patch+json"}
    async with cluster.patch(object_path(obj), data=json.dumps(body), headers=headers) as response:
        assert response.status < 300, await response.text()


async def delete(cluster: Emulator, obj: Mapping[str, Any]) -> None:
    """Delete an object through the API (so watchers see DELETED), as kubectl would (no finalizers here)."""
    async with cluster.delete(object_path(obj)) as response:
        assert response.status < 300, await response.text()


async def label_namespace(cluster: Emulator, name: str, labels: Mapping[str, str]) -> None:
    """Merge-patch a namespace's labels through the API, as `kubectl label` would."""
    body = {"metadata": {"labels": dict(labels)}}
    headers = {"Content-Type": "application/merge-patch+json"}
    async with cluster.patch(f"/api/v1/namespaces/{name}", data=json.dumps(body), headers=headers) as response:
        assert response.status < 300, await response.text()


def configmap(namespace: str, name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}, "data": data}


TRAIN_CONFIG = {"epochs": "10"}
"""What ConfigMap `train-config` holds in the fixtures' namespace: the Job fixture pod reads it (env and a volume)."""


async def create_opted_in(cluster: Emulator, name: str) -> None:
    """An opted-in namespace holding the ConfigMap the fixture pods read, so the operator can key them."""
    await create(cluster, namespace(name, opted_in=True))
    await create(cluster, configmap(name, "train-config", TRAIN_CONFIG))


def namespace(name: str, *, opted_in: bool) -> dict[str, Any]:
    labels = {keys.ENABLED_LABEL: "true"} if opted_in else {"team": name}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def admission_request(pod: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """The `request` of an AdmissionReview v1 for a pod CREATE, as kube-apiserver sends it."""
    pods = {"group": "", "version": "v1", "resource": "pods"}
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    return {
        "uid": str(uuid.uuid4()),
        "kind": kind,
        "resource": pods,
        "requestKind": kind,
        "requestResource": pods,
        "namespace": pod["metadata"]["namespace"],
        "operation": "CREATE",
        "userInfo": {
            "username": "system:serviceaccount:kube-system:job-controller",
            "uid": "8c2e9c6a-0d0e-4f57-b0d5-1d4b8f6e7a10",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
        },
        "object": pod,
        "oldObject": None,
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }


async def review(session: aiohttp.ClientSession, operator: Operator, request: Mapping[str, Any]) -> dict[str, Any]:
    """POST an AdmissionReview v1 with this `request`; return the review's `response` after checking the envelope."""
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    async with session.post(operator.webhook_url, json=body) as answer:
        assert answer.status == 200, await answer.text()
        payload: dict[str, Any] = await answer.json()
    assert payload["apiVersion"] == "admission.k8s.io/v1"
    assert payload["kind"] == "AdmissionReview"
    response: dict[str, Any] = payload["response"]
    assert response["uid"] == request["uid"]
    return response


def patched(pod: Mapping[str, Any], response: Mapping[str, Any]) -> dict[str, Any]:
    """The pod the API server would store: the response's base64 JSON patch applied to the reviewed pod."""
    if "patch" not in response:
        return copy.deepcopy(dict(pod))
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(pod, operations)
    return result
