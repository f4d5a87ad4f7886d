"""A real single-node Kubernetes control plane on loopback, for the end-to-end tests and `make demo`.

stepcache's claims are about Kubernetes itself — admission, RBAC, ServiceAccount tokens, what kubectl prints — so the
tests run against the real etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from pinned Go
modules by `hack/cluster/build.sh`. Only the kubelet is simulated (see `hack/cluster/kubelet.py`).

Everything listens on 127.0.0.1 on free ports and lives in one temporary work directory (PKI, etcd data,
kubeconfigs, logs), so several control planes can run side by side and nothing outside the directory changes.
Each component runs in its own process group and dies with the Python process that started it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from hack.cluster import ports
from stepcache import tls

__all__ = [
    "BINARIES",
    "REPO",
    "ControlPlane",
    "KubectlError",
    "bin_dir",
    "built",
    "pinned_versions",
    "spawn",
    "terminate",
    "wait_for",
    "write_kubeconfig",
]

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "cluster" / "build.sh"
VERSIONS_FILE = REPO / "hack" / "cluster" / "versions.env"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Names the API server is reachable by, from the host and (in a real cluster) from pods.
_APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
_APISERVER_IPS = ("127.0.0.1", "10.0.0.1")

_T = TypeVar("_T")


def wait_for(predicate: Callable[[], _T | None], timeout: float, message: str, *, interval: float = 0.2) -> _T:
    """Poll `predicate` until it returns something truthy, and return that; fail with `message` at the deadline.

    Exceptions from the predicate propagate: a predicate that expects transient errors catches them itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} (not within {timeout:g} s; last value: {value!r})")
        time.sleep(interval)


def pinned_versions() -> dict[str, str]:
    """The versions hack/cluster/versions.env pins (KUBERNETES_VERSION, ETCD_VERSION)."""
    pins: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            pins[name.strip()] = value.strip().strip("'\"")
    return pins


@functools.cache
def bin_dir() -> pathlib.Path:
    """The directory holding the control plane's binaries, built by hack/cluster/build.sh if need be.

    The script returns at once when the pinned binaries are cached; otherwise it builds them (minutes, with
    progress on stderr). STEPCACHE_CONTROL_PLANE_BIN points at a directory of prebuilt binaries instead.
    """
    path = built(BUILD_SCRIPT, override="STEPCACHE_CONTROL_PLANE_BIN")
    missing = [name for name in BINARIES if not os.access(path / name, os.X_OK)]
    if missing:
        raise RuntimeError(f"control plane binaries missing from {path}: {', '.join(missing)}")
    return path


def built(script: pathlib.Path, *, override: str) -> pathlib.Path:
    """The directory a build script prints on its last line, or the one environment variable `override` names.

    The script's progress goes to stderr as it runs; a failed build raises, pointing at that output.
    """
    named = os.environ.get(override)
    if named:
        return pathlib.Path(named)
    result = subprocess.run([str(script)], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed with exit code {result.returncode} (its output is above)")
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; the message carries its stderr, which is what one needs to read."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {(self.stderr or '').strip()}"


# --- processes ------------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies (even by SIGKILL), so does the component.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    log_file: pathlib.Path,
    cwd: pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own process group, output appended to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def terminate(processes: Iterable[subprocess.Popen[bytes]], *, timeout: float = 15.0) -> None:
    """SIGTERM each process group, wait up to `timeout`, then SIGKILL what is left; reap every process."""
    processes = list(processes)
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        # Also kills anything the leader left behind in its group.
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


# --- kubeconfigs ----------------------------------------------------------------------------------------------------


def write_kubeconfig(
    path: pathlib.Path,
    *,
    server: str,
    ca_pem: bytes,
    user: str,
    client: tls.Issued | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> pathlib.Path:
    """Write a self-contained kubeconfig (everything embedded) authenticating with a client certificate or token."""
    if (client is None) == (token is None):
        raise ValueError("a kubeconfig needs exactly one of a client certificate or a token")
    credentials: dict[str, str] = {}
    if client is not None:
        credentials["client-certificate-data"] = _b64(client.cert_pem)
        credentials["client-key-data"] = _b64(client.key_pem)
    if token is not None:
        credentials["token"] = token
    context: dict[str, str] = {"cluster": "stepcache", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stepcache", "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "stepcache", "context": context}],
        "current-context": "stepcache",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- the control plane ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback, in a temporary directory.

    Use as a context manager, or call `start()` and `stop()`. The work directory (and its `logs/`) is removed on
    a clean stop and kept — its path printed — when asked to, or when the `with` block raised.
    """

    def __init__(
        self,
        *,
        binaries: pathlib.Path | None = None,
        workdir: pathlib.Path | None = None,
        startup_timeout: float = 90.0,
    ) -> None:
        self._binaries = binaries
        self._given_workdir = workdir
        self._workdir: pathlib.Path | None = None
        self._startup_timeout = startup_timeout
        self._ports: _Ports | None = None
        self._ca: tls.Issued | None = None
        self._admin: tls.Issued | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._admin_ssl: ssl.SSLContext | None = None

    # -- properties --

    @property
    def bin_dir(self) -> pathlib.Path:
        if self._binaries is None:
            self._binaries = bin_dir()
        return self._binaries

    @property
    def workdir(self) -> pathlib.Path:
        if self._workdir is None:
            raise RuntimeError("the control plane is not started")
        return self._workdir

    @property
    def logs_dir(self) -> pathlib.Path:
        return self.workdir / "logs"

    @property
    def pki_dir(self) -> pathlib.Path:
        return self.workdir / "pki"

    @property
    def kubeconfig(self) -> pathlib.Path:
        """The admin kubeconfig (CN=admin, O=system:masters)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        if self._ports is None:
            raise RuntimeError("the control plane is not started")
        return f"https://127.0.0.1:{self._ports.apiserver}"

    @property
    def ca(self) -> tls.Issued:
        """The cluster CA, key included: tests may issue certificates the API server trusts (e.g. for webhooks)."""
        if self._ca is None:
            raise RuntimeError("the control plane is not started")
        return self._ca

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    @property
    def ca_file(self) -> pathlib.Path:
        return self.pki_dir / "ca.crt"

    # -- lifecycle --

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        self.stop(keep_workdir=exc is not None)

    def start(self) -> None:
        """Start every component and return once the API server is ready and controllers have done their work."""
        if self._processes:
            raise RuntimeError("the control plane is already started")
        binaries = self.bin_dir
        self._workdir = self._given_workdir or pathlib.Path(tempfile.mkdtemp(prefix="stepcache-cp-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        etcd_client, etcd_peer, apiserver = ports.free_ports(3)
        self._ports = _Ports(etcd_client=etcd_client, etcd_peer=etcd_peer, apiserver=apiserver)
        try:
            self._write_pki()
            self._start_etcd(binaries)
            self._start_apiserver(binaries)
            self._start_controllers(binaries)
            # The controller manager is working once it has created the default ServiceAccount; until then a pod
            # in the default namespace would be rejected by ServiceAccount admission.
            self.wait_for_service_account("default", timeout=self._startup_timeout)
        except BaseException as exc:
            self.stop(keep_workdir=True)
            if isinstance(exc, Exception):
                raise RuntimeError(f"the control plane did not start; logs in {self.logs_dir}") from exc
            raise

    def stop(self, *, keep_workdir: bool = False, timeout: float = 15.0) -> None:
        """Stop the components (API server before etcd), then remove the work directory unless it is kept."""
        if self._processes:
            # Clients of the API server first, then the API server: with etcd gone first it can hang in shutdown.
            order = ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
            terminate(
                [self._processes[name] for name in order[:2] if name in self._processes],
                timeout=timeout,
            )
            for name in order[2:]:
                if name in self._processes:
                    terminate([self._processes[name]], timeout=timeout)
            self._processes.clear()
        if self._workdir is None:
            return
        if keep_workdir:
            print(f"control plane: work directory and logs kept in {self._workdir}", file=sys.stderr)
        elif self._given_workdir is None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def check_running(self) -> None:
        """Raise if a component has exited (a crashed component otherwise shows up only as a timeout)."""
        for name, process in self._processes.items():
            code = process.poll()
            if code is not None:
                raise RuntimeError(f"{name} exited with code {code}; see {self.logs_dir / (name + '.log')}")

    # -- client helpers --

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        kubeconfig: pathlib.Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl (as admin unless another kubeconfig is given) and return its completed process."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def get(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, decoded."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, *objects: Mapping[str, Any]) -> None:
        """`kubectl apply` the given objects (as a v1 List)."""
        manifest = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def api(self, path: str) -> Any:
        """An admin GET on the API, decoded; cheaper than kubectl for polling. Raises `urllib.error.HTTPError`."""
        with urllib.request.urlopen(self.server + path, timeout=10, context=self._ssl_context()) as response:
            return json.load(response)

    def wait_for_pod(
        self,
        namespace: str,
        name: str,
        *,
        phases: Sequence[str] = ("Succeeded", "Failed"),
        timeout: float = 60.0,
    ) -> Any:
        """Poll the pod until its phase is one of `phases`; return it. The timeout error shows its last status."""
        last: dict[str, Any] = {}

        def reached() -> Any:
            self.check_running()
            try:
                pod = self.api(f"/api/v1/namespaces/{namespace}/pods/{name}")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                raise
            last["status"] = pod.get("status")
            return pod if pod.get("status", {}).get("phase") in phases else None

        try:
            return wait_for(reached, timeout, f"pod {namespace}/{name} to reach {'/'.join(phases)}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its last status: {json.dumps(last.get('status'), indent=1)}") from None

    def create_namespace(self, name: str, *, labels: Mapping[str, str] | None = None) -> None:
        """Create (or update) a namespace and wait until pods can be created in it (its default ServiceAccount)."""
        metadata: dict[str, Any] = {"name": name}
        if labels:
            metadata["labels"] = dict(labels)
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
        self.wait_for_service_account(name)

    def wait_for_service_account(self, namespace: str, name: str = "default", *, timeout: float = 30.0) -> None:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}"

        def exists() -> bool:
            self.check_running()
            return self._api_status(path) == 200

        wait_for(exists, timeout, f"ServiceAccount {namespace}/{name} to exist")

    def create_token(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount from the TokenRequest API (the API server's minimum is 600 s)."""
        result = self.kubectl("create", "token", service_account, "--namespace", namespace, f"--duration={seconds}s")
        return result.stdout.strip()

    def token_kubeconfig(
        self,
        token: str,
        *,
        path: pathlib.Path | None = None,
        user: str = "token",
        namespace: str | None = None,
        server: str | None = None,
    ) -> pathlib.Path:
        """Write a kubeconfig that authenticates with a bearer token (e.g. from `create_token`); `server` replaces
        the API server's URL (e.g. a proxy in front of it)."""
        return write_kubeconfig(
            path or self.workdir / f"{user}.kubeconfig",
            server=server or self.server,
            ca_pem=self.ca_pem,
            user=user,
            token=token,
            namespace=namespace,
        )

    def client_kubeconfig(
        self,
        user: str,
        *,
        groups: Sequence[str] = (),
        path: pathlib.Path | None = None,
    ) -> pathlib.Path:
        """Write a kubeconfig with a client certificate for `user` in `groups`, signed by the cluster CA."""
        client = tls.issue(self.ca, common_name=user, organizations=groups, client=True)
        return write_kubeconfig(
            path or self.workdir / f"{user.replace(':', '-')}.kubeconfig",
            server=self.server,
            ca_pem=self.ca_pem,
            user=user,
            client=client,
        )

    # -- internals --

    def _write_pki(self) -> None:
        pki = self.pki_dir
        pki.mkdir(exist_ok=True)
        self._admin_ssl = None
        self._ca = tls.make_ca("stepcache-e2e-ca")
        tls.write_pair(self._ca, cert_file=pki / "ca.crt", key_file=pki / "ca.key")
        serving = tls.issue(
            self._ca,
            common_name="kube-apiserver",
            dns_names=_APISERVER_DNS_NAMES,
            ip_addresses=_APISERVER_IPS,
            server=True,
        )
        tls.write_pair(serving, cert_file=pki / "apiserver.crt", key_file=pki / "apiserver.key")
        private, public = tls.make_rsa_key_pem()
        # Service-account tokens are signed with an RSA key; the public half is what the API server verifies with.
        tls.write_pair(tls.Issued(cert_pem=public, key_pem=private), cert_file=pki / "sa.pub", key_file=pki / "sa.key")
        self._admin = tls.issue(self._ca, common_name="admin", organizations=["system:masters"], client=True)
        tls.write_pair(self._admin, cert_file=pki / "admin.crt", key_file=pki / "admin.key")
        write_kubeconfig(
            self.kubeconfig, server=self.server, ca_pem=self._ca.cert_pem, user="admin", client=self._admin
        )
        for component in ("kube-controller-manager", "kube-scheduler"):
            client = tls.issue(self._ca, common_name=f"system:{component}", client=True)
            write_kubeconfig(
                self.workdir / f"{component}.kubeconfig",
                server=self.server,
                ca_pem=self._ca.cert_pem,
                user=f"system:{component}",
                client=client,
            )

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        self._processes[name] = spawn(argv, log_file=self.logs_dir / f"{name}.log", cwd=self.workdir)

    def _start_etcd(self, binaries: pathlib.Path) -> None:
        assert self._ports is not None
        client = f"http://127.0.0.1:{self._ports.etcd_client}"
        peer = f"http://127.0.0.1:{self._ports.etcd_peer}"
        self._spawn(
            "etcd",
            [
                str(binaries / "etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            self.check_running()
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=2) as response:
                    return bool(json.load(response).get("health") == "true")
            except (OSError, ValueError):
                return False

        wait_for(healthy, self._startup_timeout, "etcd to be healthy")

    def _start_apiserver(self, binaries: pathlib.Path) -> None:
        assert self._ports is not None
        pki = self.pki_dir
        self._spawn(
            "kube-apiserver",
            [
                str(binaries / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self._ports.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self._ports.apiserver}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # A loopback address is not a valid Endpoints address: without this the API server logs an error
                # every 10 s trying to publish itself in the `kubernetes` Service's endpoints.
                "--endpoint-reconciler-type=none",
            ],
        )

        def ready() -> bool:
            self.check_running()
            return self._api_status("/readyz") == 200

        wait_for(ready, self._startup_timeout, "kube-apiserver to be ready (/readyz)")

    def _start_controllers(self, binaries: pathlib.Path) -> None:
        pki = self.pki_dir
        self._spawn(
            "kube-controller-manager",
            [
                str(binaries / "kube-controller-manager"),
                f"--kubeconfig={self.workdir / 'kube-controller-manager.kubeconfig'}",
                "--use-service-account-credentials=true",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                # No HTTPS endpoint (health, metrics): nothing here reads it, and a fixed port would collide.
                "--secure-port=0",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(binaries / "kube-scheduler"),
                f"--kubeconfig={self.workdir / 'kube-scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )

    def _ssl_context(self) -> ssl.SSLContext:
        if self._admin_ssl is None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
            self._admin_ssl = context
        return self._admin_ssl

    def _api_status(self, path: str) -> int | None:
        """The HTTP status of an admin GET, or None when the API server does not answer."""
        request = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(request, timeout=5, context=self._ssl_context()) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None
