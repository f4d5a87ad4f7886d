"""A process kubelet: the one simulated part of the local control plane.

A real kubelet needs a container runtime, images and cgroups; stepcache's claims need none of that. They need pods
that are admitted, scheduled, run and reported exactly as a kubelet reports them: phases, conditions, container
states with exit codes and termination messages. So this kubelet registers a Ready Node, keeps its Lease fresh,
and runs each container's command+args as a host process, with the container's environment resolved the way the
kubelet resolves it (`$(VAR)` expansion, ConfigMap/Secret/field references, envFrom).

Each container runs under bubblewrap in a root of its own: the host's top-level directories bound back (so the
host's programs stand in for the image's), but a private `/tmp`, `/run` and `/root` per container, as an image's
writable layer would be — nothing written there leaks between containers or pods, and no kubeconfig of the host is
visible. The pod's volumes are directories under the pod's logs directory, bind-mounted at each container's
mountPaths with `subPath` and `readOnly`: emptyDir, hostPath (also through a claim bound to a hostPath
PersistentVolume), secret and configMap (with `items`), downwardAPI, and projected ones, including the
ServiceAccount token volume (a TokenRequest token bound to the pod, `ca.crt`, `namespace`). With
`KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` in the environment, in-cluster clients reach the API server as
from a real pod. `--image-bin DIR` puts a directory of programs first on every container's PATH (e.g. Argo's
`argoexec`, which its pods run by name). Each container has its own termination-message file at its
terminationMessagePath.

Not simulated: images (the host's `sh`/`python3` run the commands), updates to volumes after the pod started
(token rotation, changed Secrets), cgroups and resource limits, networking (every pod has IP 127.0.0.1), probes,
securityContext, `kubectl logs/exec` (logs are files under the logs directory instead). A mountPath below a host
directory that does not exist there is created on the host (mountPaths under `/tmp`, `/run`, `/root`, or a new
top-level directory, as Argo's are, leave the host alone).

Run it as `python -m hack.cluster.kubelet --kubeconfig F --node NAME --logs DIR [--image-bin DIR]`, in-process with
`run_kubelet(...)`, or as a managed subprocess with `KubeletProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import aiohttp
import yaml

from hack.cluster import controlplane

__all__ = [
    "Api",
    "ApiError",
    "Credentials",
    "Kubelet",
    "KubeletProcess",
    "Mount",
    "container_mounts",
    "expand",
    "load_kubeconfig",
    "main",
    "relative_path",
    "run_kubelet",
    "sandbox_path",
    "schedulable",
]

Json = dict[str, Any]

log = logging.getLogger("stepcache.kubelet")

KUBELET_VERSION = "v1.36.3"
POD_IP = "127.0.0.1"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Private to each container (fresh and empty, like an image's writable layer), not the host's.
PRIVATE_DIRS = ("/tmp", "/run", "/root")
# Where the --image-bin directories appear in a container: a new top-level directory, so the host is not touched.
IMAGE_BIN = "/stepcache-image"
# What ServiceAccount admission asks for; the kubelet requests the same when a projection does not say.
TOKEN_SECONDS = 3607
HOST_ROOT = pathlib.Path("/")
HEARTBEAT_SECONDS = 5.0
LEASE_SECONDS = 40
# A real kubelet backs off from 10 s to 5 min between restarts; tests cannot wait that long.
RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0)
MAX_GRACE_SECONDS = 30.0
# What a kubelet reads of a termination message, and of the log when falling back to it.
MESSAGE_LIMIT = 4096
LOG_FALLBACK_BYTES = 2048
LOG_FALLBACK_LINES = 80
# Enough room that the scheduler never turns a test pod away for resources.
CAPACITY = {"cpu": "32", "memory": "64Gi", "pods": "250", "ephemeral-storage": "100Gi"}


def now() -> str:
    """RFC 3339, UTC, whole seconds: the form of a kubelet's timestamps."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    """The MicroTime form (a Lease's renewTime)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- API access -----------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: str, *, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclasses.dataclass(frozen=True, kw_only=True)
class Credentials:
    server: str
    ssl_context: ssl.SSLContext
    token: str | None


def load_kubeconfig(path: pathlib.Path) -> Credentials:
    """Read the current context of a kubeconfig: the server, its CA, and a client certificate or token."""
    config = yaml.safe_load(path.read_text())

    def named(section: str, name: str) -> Json:
        for entry in config.get(section) or []:
            if entry.get("name") == name:
                found: Json = entry
                return found
        raise ValueError(f"{path}: no {section} entry named {name!r}")

    context = named("contexts", config["current-context"])["context"]
    cluster = named("clusters", context["cluster"])["cluster"]
    user = named("users", context["user"])["user"]
    base = path.parent
    if "certificate-authority-data" in cluster:
        ssl_context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
    elif "certificate-authority" in cluster:
        ssl_context = ssl.create_default_context(cafile=str(base / cluster["certificate-authority"]))
    else:
        ssl_context = ssl.create_default_context()
    if "client-certificate-data" in user:
        # The ssl module loads client certificates from files only; they live just long enough to be read.
        with tempfile.TemporaryDirectory(prefix="kubelet-client-") as tmp:
            cert, key = pathlib.Path(tmp, "client.crt"), pathlib.Path(tmp, "client.key")
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.touch(mode=0o600)
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            ssl_context.load_cert_chain(cert, key)
    elif "client-certificate" in user:
        ssl_context.load_cert_chain(base / user["client-certificate"], base / user["client-key"])
    token = user.get("token")
    if token is None and "tokenFile" in user:
        token = (base / user["tokenFile"]).read_text().strip()
    return Credentials(server=cluster["server"].rstrip("/"), ssl_context=ssl_context, token=token)


class Api:
    """The few REST calls a kubelet makes, on one aiohttp session."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        headers = {"Accept": "application/json", "User-Agent": f"stepcache-process-kubelet/{KUBELET_VERSION}"}
        if self._credentials.token:
            headers["Authorization"] = f"Bearer {self._credentials.token}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=self._credentials.ssl_context),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def server(self) -> str:
        return self._credentials.server

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the API client is not open")
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Json:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method,
            self._credentials.server + path,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise ApiError(response.status, text, method=method, path=path)
            result: Json = json.loads(text) if text else {}
            return result

    async def watch(self, path: str, *, params: Mapping[str, str]) -> AsyncIterator[Json]:
        """Yield watch events until the server ends the stream."""
        async with self.session.get(
            self._credentials.server + path,
            params={**params, "watch": "true"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        ) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text(), method="WATCH", path=path)
            async for line in response.content:
                if line.strip():
                    event: Json = json.loads(line)
                    yield event


# --- environment ----------------------------------------------------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, undefined ones kept, `$$` escapes a `$`."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 >= len(text):
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


class ContainerConfigError(Exception):
    """The container's environment cannot be built yet (a missing ConfigMap, Secret or key): retried."""


_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}  # fmt: skip


def _quantity(text: str) -> float:
    match = _QUANTITY.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ContainerConfigError(f"cannot parse quantity {text!r}")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def field_value(pod: Json, path: str) -> str:
    """The value of a downward-API fieldRef, as the kubelet gives it."""
    metadata = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(path.split(".")[1]) or {}
        return "\n".join(f"{key}={json.dumps(value)}" for key, value in sorted(values.items()))
    match = _FIELD_INDEX.match(path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ContainerConfigError(f"unsupported fieldRef {path!r}")


def resource_value(container: Json, reference: Json) -> str:
    """The value of a resourceFieldRef: the container's limit (else the node's capacity) or request."""
    resource = reference["resource"]
    kind, _, name = resource.partition(".")
    resources = container.get("resources", {})
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = "0"
    if value is None:
        value = CAPACITY.get(name, "0")
    divisor = _quantity(reference.get("divisor", "1"))
    return str(math.ceil(_quantity(value) / divisor))


def schedulable(node: Json) -> bool:
    """Whether a Node is Ready and carries no taint or flag that keeps pods off it."""
    conditions = {c["type"]: c["status"] for c in (node.get("status") or {}).get("conditions") or []}
    spec = node.get("spec") or {}
    blocking = [t for t in spec.get("taints") or [] if t.get("effect") in ("NoSchedule", "NoExecute")]
    return conditions.get("Ready") == "True" and not blocking and not spec.get("unschedulable")


# --- the container's file system ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mount:
    """One volumeMount as bubblewrap binds it: a host path at a path inside the container."""

    source: pathlib.Path
    target: str
    read_only: bool


def _within(path: pathlib.PurePosixPath, roots: Sequence[str]) -> bool:
    return any(path == pathlib.PurePosixPath(root) or pathlib.PurePosixPath(root) in path.parents for root in roots)


def sandbox_path(path: str, *, private: Sequence[str] = PRIVATE_DIRS, host: pathlib.Path = HOST_ROOT) -> str:
    """Where `path` is inside a container: symlinks of the host's directories resolved (`/var/run` → `/run`).

    A container sees the host's directories, so a symlink there is followed as the container would follow it; a
    mount point must be given as the real path (bubblewrap does not create mount points through symlinks). Below a
    private directory or another mount the host has no say, and the rest of the path is kept as written.
    """
    parts = list(pathlib.PurePosixPath(path).parts[1:])
    resolved = pathlib.PurePosixPath("/")
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / part
        if _within(candidate, private):
            return str(candidate.joinpath(*parts))
        on_host = host / candidate.relative_to("/")
        if not on_host.is_symlink():
            if not on_host.exists():
                return str(candidate.joinpath(*parts))
            resolved = candidate
            continue
        hops += 1
        if hops > 40:
            raise ContainerConfigError(f"too many symbolic links resolving mountPath {path}")
        target = pathlib.PurePosixPath(os.readlink(on_host))
        if target.is_absolute():
            resolved = pathlib.PurePosixPath("/")
            parts = list(target.parts[1:]) + parts
        else:
            parts = list(target.parts) + parts
    return str(resolved)


def relative_path(path: str, *, what: str) -> pathlib.PurePosixPath:
    """A path inside a volume, refused when it could leave the volume (as the API server and kubelet refuse it)."""
    relative = pathlib.PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ContainerConfigError(f"{what} {path!r} must be a relative path without '..'")
    return relative


def container_mounts(
    container: Json, volumes: Mapping[str, pathlib.Path], env: Mapping[str, str], *, host: pathlib.Path = HOST_ROOT
) -> list[Mount]:
    """The container's volumeMounts as binds, parents before children; a missing subPath is created (a directory)."""
    mounts: list[Mount] = []
    specs = container.get("volumeMounts") or []
    for spec in specs:
        name = spec["name"]
        if name not in volumes:
            raise ContainerConfigError(f"volume {name!r} of mount {spec.get('mountPath')} is not a volume of the pod")
        source = volumes[name]
        sub_path = spec.get("subPath") or expand(spec.get("subPathExpr") or "", env)
        if sub_path:
            source = source / relative_path(sub_path, what="subPath")
            if not source.exists() and not source.is_symlink():
                source.mkdir(parents=True)
        others = [str(other["mountPath"]) for other in specs if other is not spec]
        target = sandbox_path(spec["mountPath"], private=(*PRIVATE_DIRS, IMAGE_BIN, *others), host=host)
        mounts.append(Mount(source=source, target=target, read_only=bool(spec.get("readOnly"))))
    return sorted(mounts, key=lambda mount: len(pathlib.PurePosixPath(mount.target).parts))


def sandbox_args(
    *,
    mounts: Sequence[Mount],
    image_bins: Sequence[pathlib.Path],
    message_file: pathlib.Path,
    message_path: str,
    working_dir: str,
    host: pathlib.Path = HOST_ROOT,
) -> list[str]:
    """bubblewrap's arguments for one container: its root, private directories, image programs, volumes, message."""
    args: list[str] = []
    skipped = {*PRIVATE_DIRS, "/dev", "/proc", IMAGE_BIN}
    for entry in sorted(host.iterdir()):
        inside = f"/{entry.name}"
        if inside in skipped:
            continue
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), inside]
        elif entry.is_dir():
            args += ["--dev-bind", str(entry), inside]
        else:
            args += ["--bind", str(entry), inside]
    # A private /dev and /proc: the PID namespace takes every process down with the container.
    args += ["--dev", "/dev", "--proc", "/proc"]
    for private in PRIVATE_DIRS:
        args += ["--tmpfs", private]
    for index, directory in enumerate(image_bins):
        args += ["--ro-bind", str(directory), f"{IMAGE_BIN}/bin{index}"]
    for mount in mounts:
        args += ["--ro-bind" if mount.read_only else "--bind", str(mount.source), mount.target]
    target = sandbox_path(message_path, private=(*PRIVATE_DIRS, "/dev", *(m.target for m in mounts)), host=host)
    args += ["--bind", str(message_file), target, "--chdir", working_dir]
    return args


def _write_files(directory: pathlib.Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """Write a Secret/ConfigMap/projected volume's files (each with its mode) under its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (data, mode) in files.items():
        path = directory / relative_path(name, what="volume item path")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)


# --- pods -----------------------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]


@dataclasses.dataclass
class _Container:
    """What the kubelet knows of one container: the status it reports, and the process behind it."""

    spec: Json
    init: bool
    state: Json
    restart_count: int = 0
    last_state: Json = dataclasses.field(default_factory=dict)
    container_id: str = ""
    process: asyncio.subprocess.Process | None = None
    respecified: bool = False
    """Its image was changed while it ran: it is stopped and started again with the new spec, as a kubelet does."""

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def sidecar(self) -> bool:
        return self.init and self.spec.get("restartPolicy") == "Always"

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated")
        return None if terminated is None else int(terminated["exitCode"])

    def status(self) -> Json:
        result: Json = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            # A finished init container counts as ready; any other container is ready while it runs (no probes).
            "ready": self.exit_code == 0 if self.init and not self.sidecar else self.running,
            "restartCount": self.restart_count,
            "started": self.running,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            result["containerID"] = self.container_id
        return result


class _StopPodError(Exception):
    """The pod stops early: an init container failed for good, it was deleted, or its deadline passed."""


class _PodWorker:
    """Runs one pod to completion (or deletion) and reports its status."""

    def __init__(self, kubelet: Kubelet, pod: Json) -> None:
        self.kubelet = kubelet
        self.pod = pod
        metadata = pod["metadata"]
        self.uid: str = metadata["uid"]
        self.namespace: str = metadata["namespace"]
        self.name: str = metadata["name"]
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.dir = kubelet.logs_dir / f"{self.namespace}_{self.name}_{self.uid}"
        previous = pod.get("status") or {}
        self.start_time: str = previous.get("startTime") or now()
        self.init_containers = [
            self._restore(c, init=True, statuses=previous.get("initContainerStatuses"))
            for c in spec.get("initContainers") or []
        ]
        self.containers = [
            self._restore(c, init=False, statuses=previous.get("containerStatuses")) for c in spec["containers"]
        ]
        self.phase: Phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.initialized = False
        self.transitions: dict[str, tuple[str, str]] = {}
        self.stopping = asyncio.Event()
        """Set when every container must stop (and none restart): on completion, deletion or deadline."""
        self.stop_reason: Literal["Deleted", "DeadlineExceeded"] | None = None
        self.abandoned = False
        """The pod is gone from the API, or the kubelet is shutting down: stop, and report nothing more."""
        self.task: asyncio.Task[None] | None = None
        self.volumes: dict[str, pathlib.Path] = {}
        """Each volume's host path (a directory under the pod's, or a hostPath), filled before any container runs."""
        self._sidecars: list[asyncio.Task[None]] = []
        self._publish_lock = asyncio.Lock()

    def _restore(self, spec: Json, *, init: bool, statuses: list[Json] | None) -> _Container:
        """Carry over what a previous kubelet process reported: a restart neither reruns finished work nor forgets."""
        container = _Container(spec=spec, init=init, state={"waiting": {"reason": "PodInitializing"}})
        for status in statuses or []:
            if status.get("name") != spec["name"]:
                continue
            state = status.get("state") or {}
            container.restart_count = int(status.get("restartCount", 0))
            container.container_id = status.get("containerID", "")
            container.last_state = status.get("lastState") or {}
            if "terminated" in state:
                container.state = state
            elif "running" in state:
                # Its process died with the previous kubelet; a real kubelet reports the same when a container
                # vanishes. With restartPolicy Never it stays that way; otherwise it is restarted.
                lost = {"terminated": {**_lost(), "startedAt": state["running"].get("startedAt")}}
                if self.restart_policy == "Never" and not container.sidecar:
                    container.state = lost
                else:
                    container.last_state = lost
                    container.restart_count += 1
        return container

    # -- events from the watch --

    def update(self, pod: Json) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp") and self.stop_reason != "Deleted":
            self.stop_reason = "Deleted"
            self.stopping.set()
        # A kubelet restarts a running container whose image was changed (its spec hash changed), whatever the
        # pod's restartPolicy; a finished container is left as it is.
        specs = {c["name"]: c for c in pod["spec"].get("containers") or []}
        for container in self.containers:
            new = specs.get(container.name)
            if new is not None and container.running and new.get("image") != container.spec.get("image"):
                container.spec = new
                container.respecified = True
                _signal(container, signal.SIGKILL)

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"pod {self.namespace}/{self.name}")

    async def abandon(self) -> None:
        """Kill every process at once and report nothing more (the pod is gone, or the kubelet stops)."""
        self.abandoned = True
        self.stopping.set()
        for container in self.init_containers + self.containers:
            _signal(container, signal.SIGKILL)
        if self.task is not None:
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), timeout=10)

    # -- the pod's life --

    async def run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        timer = asyncio.create_task(self._deadline(float(deadline))) if deadline else None
        try:
            await self.publish()
            await self._prepare_volumes()
            await self._run_init_containers()
            self.initialized = True
            for container in self.containers:
                if "waiting" in container.state:
                    container.state = {"waiting": {"reason": "ContainerCreating"}}
            await self.publish()
            await self._run_containers()
        except _StopPodError:
            pass
        finally:
            if timer is not None:
                timer.cancel()
            await self._stop_all()
        if self.abandoned:
            return
        if self.stop_reason == "Deleted":
            await self.kubelet.delete_pod(self.pod)
            return
        await self.publish()
        log.info("pod_finished pod=%s/%s phase=%s", self.namespace, self.name, self.phase)

    async def _deadline(self, seconds: float) -> None:
        started = datetime.datetime.strptime(self.start_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        remaining = seconds - (datetime.datetime.now(datetime.UTC) - started).total_seconds()
        await asyncio.sleep(max(0.0, remaining))
        if self.stop_reason is None:
            self.stop_reason = "DeadlineExceeded"
            self.phase, self.reason = "Failed", "DeadlineExceeded"
            self.message = "Pod was active on the node longer than the specified deadline."
            self.stopping.set()

    async def _prepare_volumes(self) -> None:
        """Fill every volume before the first container starts; while one cannot be (a Secret is missing), wait."""
        while not self.stopping.is_set():
            try:
                self.volumes = {
                    volume["name"]: await self.kubelet.prepare_volume(
                        self.pod, volume, self.dir / "volumes" / volume["name"]
                    )
                    for volume in self.pod["spec"].get("volumes") or []
                }
                return
            except (ContainerConfigError, ApiError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("volumes_not_ready pod=%s/%s error=%s", self.namespace, self.name, exc)
                for container in self.init_containers + self.containers:
                    if "waiting" in container.state:
                        container.state = {"waiting": {"reason": "ContainerCreating", "message": str(exc)}}
                await self.publish()
                await self._pause(1.0)
        raise _StopPodError

    async def _run_init_containers(self) -> None:
        for container in self.init_containers:
            if container.exit_code == 0:
                continue
            if container.sidecar:
                # A sidecar (restartPolicy Always) only has to start before the next init container runs.
                started = asyncio.Event()
                self._sidecars.append(asyncio.create_task(self._keep_running(container, started=started)))
                await self._until_stopping(started.wait())
                continue
            await self._keep_running(container)
            if self.stopping.is_set():
                raise _StopPodError
            if container.exit_code != 0:
                self.phase = "Failed"
                raise _StopPodError

    async def _run_containers(self) -> None:
        await asyncio.gather(*(self._keep_running(c) for c in self.containers))
        if not self.stopping.is_set():
            codes = [c.exit_code for c in self.containers]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"

    async def _until_stopping(self, awaitable: Any) -> None:
        waiter = asyncio.ensure_future(awaitable)
        stopper = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not waiter.done():
            waiter.cancel()
            raise _StopPodError

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up when the pod stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _keep_running(self, container: _Container, *, started: asyncio.Event | None = None) -> None:
        """Run a container, restarting it as its restart policy says, until it is done for good or the pod stops."""
        if container.sidecar:
            policy = "Always"
        elif container.init:
            # A failed init container is retried, unless the pod never restarts anything.
            policy = "Never" if self.restart_policy == "Never" else "OnFailure"
        else:
            policy = self.restart_policy
        attempt = 0
        try:
            while not self.stopping.is_set():
                if container.respecified and container.exit_code is not None:
                    container.respecified = False
                    container.last_state = {"terminated": container.state["terminated"]}
                    container.restart_count += 1
                elif container.exit_code is not None:
                    if policy == "Never" or (policy == "OnFailure" and container.exit_code == 0):
                        return
                    container.last_state = {"terminated": container.state["terminated"]}
                    container.restart_count += 1
                    container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting"}}
                    await self.publish()
                    await self._pause(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)])
                    attempt += 1
                    if self.stopping.is_set():
                        return
                await self._run_once(container, started=started)
        finally:
            if started is not None:
                started.set()

    async def _config(self, container: _Container) -> tuple[dict[str, str], list[Mount]] | None:
        """The container's environment and mounts, waiting (as CreateContainerConfigError) while one cannot be made."""
        while not self.stopping.is_set():
            try:
                env = await self.kubelet.environment(self.pod, container.spec)
                return env, container_mounts(container.spec, self.volumes, env)
            except (ContainerConfigError, ApiError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                await self.publish()
                await self._pause(2.0)
        return None

    async def _run_once(self, container: _Container, *, started: asyncio.Event | None) -> None:
        spec = container.spec
        config = await self._config(container)
        if config is None:
            return
        env, mounts = config
        command = [expand(part, env) for part in spec.get("command") or []]
        args = [expand(part, env) for part in spec.get("args") or []]
        stamp = now()
        if not command:
            # Without the image there is no entrypoint to fall back on.
            message = "the process kubelet runs a container's command (images are not pulled); this one has none"
            container.state = {
                "terminated": {
                    "exitCode": 127,
                    "reason": "NoCommand",
                    "message": message,
                    "startedAt": stamp,
                    "finishedAt": stamp,
                }
            }
            await self.publish()
            return
        base = f"{container.name}.{container.restart_count}"
        log_file = self.dir / f"{base}.log"
        message_file = self.dir / f"{base}.termination-log"
        message_file.write_bytes(b"")
        process_env = {
            "PATH": self.kubelet.path,
            "HOSTNAME": self.name,
            "HOME": "/root",
            **self.kubelet.service_env,
            **env,
        }
        sandbox = sandbox_args(
            mounts=mounts,
            image_bins=self.kubelet.image_bins,
            message_file=message_file,
            message_path=spec.get("terminationMessagePath") or "/dev/termination-log",
            working_dir=spec.get("workingDir") or "/",
        )
        argv = [self.kubelet.bwrap, "--unshare-pid", "--die-with-parent", *sandbox, "--", *command, *args]
        with log_file.open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=process_env,
                start_new_session=True,
            )
        container.process = process
        container.container_id = f"process://{self.uid[:8]}-{container.name}-{container.restart_count}"
        container.state = {"running": {"startedAt": stamp}}
        log.info(
            "container_started pod=%s/%s container=%s pid=%d", self.namespace, self.name, container.name, process.pid
        )
        if started is not None:
            started.set()
        await self.publish()
        waiter = asyncio.create_task(process.wait())
        stopper = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not waiter.done():
            await self._terminate(container)
        code = await waiter
        container.process = None
        exit_code = 128 - code if code < 0 else code
        terminated: Json = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": stamp,
            "finishedAt": now(),
            "containerID": container.container_id,
        }
        message = _read_message(message_file, log_file, spec, exit_code)
        if message:
            terminated["message"] = message
        container.state = {"terminated": terminated}
        log.info(
            "container_exited pod=%s/%s container=%s exit_code=%d", self.namespace, self.name, container.name, exit_code
        )
        await self.publish()

    async def _terminate(self, container: _Container) -> None:
        """SIGTERM, then SIGKILL after the grace period (the deletion's, else the pod's; capped)."""
        process = container.process
        if process is None or process.returncode is not None:
            return
        metadata, spec = self.pod["metadata"], self.pod["spec"]
        grace = metadata.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
        _signal(container, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=min(float(grace), MAX_GRACE_SECONDS))
        except TimeoutError:
            _signal(container, signal.SIGKILL)

    async def _stop_all(self) -> None:
        """Stop what still runs: sidecars once the main containers are done, everything on deletion or deadline."""
        self.stopping.set()
        await asyncio.gather(
            *(self._terminate(c) for c in self.init_containers + self.containers), return_exceptions=True
        )
        await asyncio.gather(*self._sidecars, return_exceptions=True)

    # -- status --

    def _conditions(self) -> list[Json]:
        terminal = self.phase in ("Succeeded", "Failed")
        main_ready = all(c.running for c in self.containers)
        sidecars_ready = all(c.running for c in self.init_containers if c.sidecar)
        ready = not terminal and self.initialized and main_ready and sidecars_ready
        not_ready = "PodCompleted" if terminal else "ContainersNotReady"
        wanted: list[tuple[str, bool, str | None]] = [
            ("PodReadyToStartContainers", not terminal, None),
            ("Initialized", self.initialized, None if self.initialized else "ContainersNotInitialized"),
            ("ContainersReady", ready, None if ready else not_ready),
            ("Ready", ready, None if ready else not_ready),
        ]
        conditions = []
        for kind, value, reason in wanted:
            status = "True" if value else "False"
            previous = self.transitions.get(kind)
            if previous is None or previous[0] != status:
                self.transitions[kind] = (status, now())
            condition: Json = {
                "type": kind,
                "status": status,
                "lastProbeTime": None,
                "lastTransitionTime": self.transitions[kind][1],
            }
            if reason:
                condition["reason"] = reason
            conditions.append(condition)
        return conditions

    def _current_phase(self) -> Phase:
        if self.phase in ("Succeeded", "Failed"):
            return self.phase
        if self.initialized and any(c.running or c.restart_count or c.exit_code is not None for c in self.containers):
            return "Running"
        return "Pending"

    def status(self, previous: Json) -> Json:
        """The pod's status: what we own replaces what was there; others' conditions (PodScheduled, ...) stay."""
        ours = self._conditions()
        owned = {c["type"] for c in ours}
        status: Json = {
            **previous,
            "phase": self._current_phase(),
            "conditions": [c for c in previous.get("conditions") or [] if c.get("type") not in owned] + ours,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        for key, value in (("reason", self.reason), ("message", self.message)):
            if value:
                status[key] = value
            else:
                status.pop(key, None)
        return status

    async def publish(self) -> None:
        """Write the pod's status with the status subresource: read, replace, write; on a conflict, again.

        A pod that is gone marks the worker abandoned; other failures are retried a while, then logged — a status
        that cannot be written must not take the pod's processes down with it.
        """
        async with self._publish_lock:
            path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
            for attempt in range(30):
                if self.abandoned:
                    return
                try:
                    current = await self.kubelet.api.request("GET", path)
                    if current["metadata"]["uid"] != self.uid:
                        raise ApiError(404, "pod replaced by another of the same name", method="GET", path=path)
                    current["status"] = self.status(current.get("status") or {})
                    await self.kubelet.api.request("PUT", f"{path}/status", body=current)
                    return
                except ApiError as exc:
                    if exc.status == 404:
                        self.abandoned = True
                        self.stopping.set()
                        return
                    if exc.status == 409:
                        continue
                    log.warning("status_failed pod=%s/%s error=%s", self.namespace, self.name, exc)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("status_failed pod=%s/%s error=%s", self.namespace, self.name, exc)
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            log.error("status_given_up pod=%s/%s", self.namespace, self.name)


def _local_volume(volume: Json, directory: pathlib.Path) -> pathlib.Path | None:
    """An emptyDir's or hostPath's directory (nothing to fetch for them); None for the other kinds."""
    if "hostPath" in volume:
        source = volume["hostPath"]
        path = pathlib.Path(source["path"])
        # A missing path with no type (or DirectoryOrCreate) becomes a directory, as container runtimes make it.
        if source.get("type", "") in ("", "DirectoryOrCreate") and not path.exists():
            path.mkdir(parents=True, exist_ok=True)
        return path
    if "emptyDir" in volume:
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    return None


def _mode(source: Json) -> int:
    """A volume's defaultMode (0644 unless it says)."""
    return int(source.get("defaultMode", 0o644))


def _lost() -> Json:
    # What a kubelet reports for a container that vanished with the previous kubelet process.
    return {
        "exitCode": 137,
        "reason": "ContainerStatusUnknown",
        "message": "The container could not be located when the pod was terminated",
        "finishedAt": now(),
    }


def _signal(container: _Container, signum: int) -> None:
    process = container.process
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)


def _read_message(message_file: pathlib.Path, log_file: pathlib.Path, spec: Json, exit_code: int) -> str:
    message = message_file.read_bytes()[:MESSAGE_LIMIT]
    fallback = spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
    if not message and fallback and exit_code != 0:
        tail = log_file.read_bytes()[-LOG_FALLBACK_BYTES:]
        message = b"\n".join(tail.splitlines()[-LOG_FALLBACK_LINES:])
    return message.decode("utf-8", errors="replace")


# --- the kubelet ----------------------------------------------------------------------------------------------------


class Kubelet:
    """Registers the node, heartbeats, and runs the pods bound to it until cancelled."""

    def __init__(
        self,
        api: Api,
        *,
        node: str,
        logs_dir: pathlib.Path,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        bwrap: str | None = None,
        image_bins: Sequence[pathlib.Path] = (),
    ) -> None:
        self.api = api
        self.node = node
        self.logs_dir = logs_dir
        self.heartbeat_seconds = heartbeat_seconds
        self.image_bins = [path.resolve() for path in image_bins]
        self.path = ":".join([*(f"{IMAGE_BIN}/bin{i}" for i in range(len(self.image_bins))), DEFAULT_PATH])
        """Every container's PATH unless its spec sets one: the image programs first."""
        server = urllib.parse.urlsplit(api.server)
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": server.hostname or POD_IP,
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(server.port or 443),
        }
        """What a kubelet gives every container so in-cluster clients find the API server."""
        found = bwrap or shutil.which("bwrap")
        if not found:
            raise RuntimeError("bubblewrap (bwrap) is needed for termination-message paths: apt-get install bubblewrap")
        self.bwrap = found
        self._workers: dict[str, _PodWorker] = {}
        self._finished: set[str] = set()
        self._deleting: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._registered_at = now()

    async def run(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        node_uid = await self._register()
        await self._heartbeat_once(node_uid)
        heartbeat = asyncio.create_task(self._heartbeat(node_uid))
        try:
            await self._watch_pods()
        finally:
            heartbeat.cancel()
            # Stopping the kubelet stops its containers too (they are its children): no status is reported for them.
            workers = list(self._workers.values())
            await asyncio.gather(*(worker.abandon() for worker in workers), return_exceptions=True)
            for task in self._background:
                task.cancel()

    # -- node --

    async def _register(self) -> str:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {
                    "kubernetes.io/hostname": self.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": arch,
                    "stepcache.dev/process-kubelet": "true",
                },
            },
            "spec": {},
        }
        try:
            created = await self.api.request("POST", "/api/v1/nodes", body=node)
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = await self.api.request("GET", f"/api/v1/nodes/{self.node}")
        log.info("node_registered node=%s", self.node)
        uid: str = created["metadata"]["uid"]
        return uid

    def _node_status(self) -> Json:
        stamp = now()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

        def condition(kind: str, status: str, reason: str, message: str) -> Json:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": self._registered_at,
            }

        return {
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.node}],
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "stepcache",
                "systemUUID": "stepcache",
                "bootID": "stepcache",
                "kernelVersion": platform.release(),
                "osImage": "stepcache process kubelet",
                "containerRuntimeVersion": "process://0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch,
            },
        }

    async def _heartbeat_once(self, node_uid: str) -> None:
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{self.node}/status",
            body={"status": self._node_status()},
            content_type="application/merge-patch+json",
        )
        leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            await self.api.request(
                "PATCH", f"{leases}/{self.node}", body={"spec": spec}, content_type="application/merge-patch+json"
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node_uid}
            lease = {"metadata": {"name": self.node, "ownerReferences": [owner]}, "spec": spec}
            await self.api.request(
                "POST", leases, body={"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **lease}
            )

    async def _heartbeat(self, node_uid: str) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self._heartbeat_once(node_uid)
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("heartbeat_failed error=%s", exc)

    # -- pods --

    async def _watch_pods(self) -> None:
        params = {"fieldSelector": f"spec.nodeName={self.node}"}
        while True:
            try:
                listing = await self.api.request("GET", "/api/v1/pods", params=params)
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("list_failed error=%s", exc)
                await asyncio.sleep(1)
                continue
            version = listing["metadata"]["resourceVersion"]
            present = set()
            for pod in listing["items"]:
                present.add(pod["metadata"]["uid"])
                await self._sync(pod)
            for uid in [uid for uid in self._workers if uid not in present]:
                await self._forget(uid)
            while True:
                watch_params = {
                    **params,
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                relist = False
                try:
                    async for event in self.api.watch("/api/v1/pods", params=watch_params):
                        kind, pod = event["type"], event["object"]
                        if kind == "ERROR":
                            relist = True
                            break
                        version = pod["metadata"]["resourceVersion"]
                        if kind == "BOOKMARK":
                            continue
                        if kind == "DELETED":
                            await self._forget(pod["metadata"]["uid"])
                        else:
                            await self._sync(pod)
                except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.warning("watch_failed error=%s", exc)
                    relist = True
                if relist:
                    break

    async def _sync(self, pod: Json) -> None:
        uid = pod["metadata"]["uid"]
        worker = self._workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if deleting:
            # Nothing runs for it here (any more): confirm the deletion, as a kubelet does.
            if uid not in self._deleting:
                self._deleting.add(uid)
                self._spawn_background(self.delete_pod(pod))
            return
        phase = (pod.get("status") or {}).get("phase")
        if uid in self._finished or phase in ("Succeeded", "Failed"):
            self._finished.add(uid)
            return
        worker = _PodWorker(self, pod)
        self._workers[uid] = worker
        log.info("pod_started pod=%s/%s", worker.namespace, worker.name)
        worker.start()
        assert worker.task is not None
        worker.task.add_done_callback(lambda task: self._done(uid, task))

    def _done(self, uid: str, task: asyncio.Task[None]) -> None:
        self._workers.pop(uid, None)
        self._finished.add(uid)
        if not task.cancelled() and task.exception() is not None:
            log.error("pod_worker_failed uid=%s error=%r", uid, task.exception())

    async def _forget(self, uid: str) -> None:
        worker = self._workers.pop(uid, None)
        self._finished.discard(uid)
        self._deleting.discard(uid)
        if worker is not None:
            self._spawn_background(worker.abandon())

    def _spawn_background(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def delete_pod(self, pod: Json) -> None:
        """Delete the pod for good (grace 0), as the kubelet does once its containers are stopped."""
        metadata = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": metadata["uid"]},
        }
        try:
            await self.api.request(
                "DELETE", f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}", body=body
            )
            log.info("pod_deleted pod=%s/%s", metadata["namespace"], metadata["name"])
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("delete_failed pod=%s/%s error=%s", metadata["namespace"], metadata["name"], exc)

    # -- environment --

    async def environment(self, pod: Json, container: Json) -> dict[str, str]:
        """The container's environment: envFrom first, then env in order, each value `$(VAR)`-expanded."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = await self._data(namespace, "configmaps", source["configMapRef"])
            else:
                data = await self._data(namespace, "secrets", source["secretRef"])
            for key, value in (data or {}).items():
                env[prefix + key] = value
        for variable in container.get("env") or []:
            name = variable["name"]
            source = variable.get("valueFrom")
            if source is None:
                env[name] = expand(variable.get("value", ""), env)
                continue
            resolved = await self._value_from(pod, container, source)
            if resolved is not None:
                env[name] = resolved
        return env

    async def _value_from(self, pod: Json, container: Json, source: Json) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return resource_value(container, source["resourceFieldRef"])
        kind, reference = (
            ("configmaps", source["configMapKeyRef"])
            if "configMapKeyRef" in source
            else ("secrets", source["secretKeyRef"])
        )
        data = await self._data(namespace, kind, reference)
        if data is None:
            return None
        key = reference["key"]
        if key not in data:
            if reference.get("optional"):
                return None
            label = "ConfigMap" if kind == "configmaps" else "Secret"
            raise ContainerConfigError(f"couldn't find key {key} in {label} {namespace}/{reference['name']}")
        return data[key]

    async def _data(self, namespace: str, kind: str, reference: Json) -> dict[str, str] | None:
        """A ConfigMap's or Secret's data as text; None when it is missing but optional."""
        data = await self._bytes(namespace, kind, reference["name"], optional=bool(reference.get("optional")))
        if data is None:
            return None
        return {key: value.decode("utf-8", errors="replace") for key, value in data.items()}

    async def _bytes(self, namespace: str, kind: str, name: str, *, optional: bool) -> dict[str, bytes] | None:
        """A ConfigMap's or Secret's data as bytes; None when it is missing but optional."""
        try:
            found = await self.api.request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            if optional:
                return None
            label = "configmap" if kind == "configmaps" else "secret"
            raise ContainerConfigError(f'{label} "{name}" not found') from exc
        if kind == "secrets":
            return {key: base64.b64decode(value) for key, value in (found.get("data") or {}).items()}
        data = {key: str(value).encode() for key, value in (found.get("data") or {}).items()}
        for key, value in (found.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value)
        return data

    # -- volumes --

    async def prepare_volume(self, pod: Json, volume: Json, directory: pathlib.Path) -> pathlib.Path:
        """Fill one volume's directory as a kubelet would before the containers start; return the path to mount."""
        if "persistentVolumeClaim" in volume:
            volume = {"name": volume["name"], **await self._claimed_volume(pod, volume["persistentVolumeClaim"])}
        local = _local_volume(volume, directory)
        if local is not None:
            return local
        if "secret" in volume:
            source = volume["secret"]
            files = await self._key_files(pod, "secrets", source.get("secretName", ""), source, mode=_mode(source))
        elif "configMap" in volume:
            source = volume["configMap"]
            files = await self._key_files(pod, "configmaps", source.get("name", ""), source, mode=_mode(source))
        elif "downwardAPI" in volume:
            source = volume["downwardAPI"]
            files = self._downward_files(pod, source, mode=_mode(source))
        elif "projected" in volume:
            files = {}
            mode = _mode(volume["projected"])
            for source in volume["projected"].get("sources") or []:
                files.update(await self._projected_files(pod, source, mode=mode))
        else:
            kinds = sorted(set(volume) - {"name"})
            raise ContainerConfigError(
                f"volume {volume['name']}: {', '.join(kinds)} is not supported by the process kubelet (it supports"
                " emptyDir, hostPath, secret, configMap, downwardAPI, projected, and claims bound to hostPath"
                " PersistentVolumes)"
            )
        _write_files(directory, files)
        return directory

    async def _claimed_volume(self, pod: Json, claim: Json) -> Json:
        """The source of the PersistentVolume a claim is bound to (waiting while it is unbound)."""
        namespace = pod["metadata"]["namespace"]
        found = await self.api.request(
            "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim['claimName']}"
        )
        name = (found.get("spec") or {}).get("volumeName")
        if not name or (found.get("status") or {}).get("phase") != "Bound":
            raise ContainerConfigError(f"persistentvolumeclaim {claim['claimName']!r} is not bound")
        volume = await self.api.request("GET", f"/api/v1/persistentvolumes/{name}")
        source = {key: value for key, value in volume["spec"].items() if key == "hostPath"}
        if not source:
            raise ContainerConfigError(f"persistentvolume {name!r} is not a hostPath volume")
        return source

    async def _key_files(
        self, pod: Json, kind: str, name: str, source: Json, *, mode: int
    ) -> dict[str, tuple[bytes, int]]:
        """A Secret's or ConfigMap's keys as files: every key, or only the listed `items` at their paths."""
        optional = bool(source.get("optional"))
        data = await self._bytes(pod["metadata"]["namespace"], kind, name, optional=optional)
        if data is None:
            return {}
        items = source.get("items")
        if not items:
            return {key: (value, mode) for key, value in data.items()}
        files = {}
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                label = "configmap" if kind == "configmaps" else "secret"
                raise ContainerConfigError(f'{label} "{name}" has no key {item["key"]!r}')
            files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
        return files

    def _downward_files(self, pod: Json, source: Json, *, mode: int) -> dict[str, tuple[bytes, int]]:
        files = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = field_value(pod, item["fieldRef"]["fieldPath"])
            else:
                reference = item["resourceFieldRef"]
                containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
                named = [c for c in containers if c["name"] == reference.get("containerName")]
                value = resource_value(named[0] if named else {}, reference)
            files[item["path"]] = (value.encode(), int(item.get("mode", mode)))
        return files

    async def _projected_files(self, pod: Json, source: Json, *, mode: int) -> dict[str, tuple[bytes, int]]:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            return {token["path"]: (await self._token(pod, token), mode)}
        if "secret" in source:
            return await self._key_files(pod, "secrets", source["secret"].get("name", ""), source["secret"], mode=mode)
        if "configMap" in source:
            config_map = source["configMap"]
            return await self._key_files(pod, "configmaps", config_map.get("name", ""), config_map, mode=mode)
        if "downwardAPI" in source:
            return self._downward_files(pod, source["downwardAPI"], mode=mode)
        raise ContainerConfigError(f"projected source {sorted(source)} is not supported by the process kubelet")

    async def _token(self, pod: Json, projection: Json) -> bytes:
        """A ServiceAccount token bound to the pod (it stops working when the pod is deleted), as a kubelet gets it."""
        metadata = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        spec: Json = {
            "expirationSeconds": int(projection.get("expirationSeconds", TOKEN_SECONDS)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": metadata["name"], "uid": metadata["uid"]},
        }
        if projection.get("audience"):
            spec["audiences"] = [projection["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{metadata['namespace']}/serviceaccounts/{account}/token"
        issued = await self.api.request("POST", path, body=body)
        return str(issued["status"]["token"]).encode()


async def run_kubelet(
    *, kubeconfig: pathlib.Path, node: str, logs_dir: pathlib.Path, image_bins: Sequence[pathlib.Path] = ()
) -> None:
    """Run a process kubelet in this event loop until cancelled."""
    async with Api(load_kubeconfig(kubeconfig)) as api:
        await Kubelet(api, node=node, logs_dir=logs_dir, image_bins=image_bins).run()


# --- as a subprocess ------------------------------------------------------------------------------------------------


class KubeletProcess:
    """The process kubelet as a managed subprocess (what the e2e tests and the demo use)."""

    def __init__(
        self,
        *,
        kubeconfig: pathlib.Path,
        node: str,
        logs_dir: pathlib.Path,
        log_file: pathlib.Path,
        image_bins: Sequence[pathlib.Path] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.node = node
        self.logs_dir = logs_dir
        self.log_file = log_file
        self.image_bins = list(image_bins)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "hack.cluster.kubelet",
            "--kubeconfig", str(self.kubeconfig), "--node", self.node, "--logs", str(self.logs_dir),
            *(arg for path in self.image_bins for arg in ("--image-bin", str(path))),
        ]  # fmt: skip
        self._process = controlplane.spawn(argv, log_file=self.log_file, cwd=controlplane.REPO)

    def check_running(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"the process kubelet exited with {self._process.returncode}; see {self.log_file}")

    def stop(self, *, timeout: float = 15.0) -> None:
        if self._process is not None:
            controlplane.terminate([self._process], timeout=timeout)
            self._process = None

    def __enter__(self) -> KubeletProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hack.cluster.kubelet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=pathlib.Path, required=True)
    parser.add_argument("--node", default="stepcache-node")
    parser.add_argument("--logs", type=pathlib.Path, required=True, help="where container logs are kept")
    parser.add_argument(
        "--image-bin",
        type=pathlib.Path,
        action="append",
        default=[],
        help="a directory of programs the pods' images would carry, first on every container's PATH (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.Formatter.converter = time.gmtime

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run_kubelet(kubeconfig=args.kubeconfig, node=args.node, logs_dir=args.logs, image_bins=args.image_bin)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
