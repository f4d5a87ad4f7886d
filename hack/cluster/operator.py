"""stepcache wired into the local control plane as it is installed for real, minus the container image.

The operator runs as a subprocess (`python -m stepcache run`), authenticated as its ServiceAccount with a token from
the TokenRequest API — never as admin — so the RBAC in manifests/ is what the tests prove. Its webhook is registered
from manifests/30-webhook.yaml with only the clientConfig changed to a loopback URL and the test CA.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import socket
import ssl
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from hack.cluster import controlplane, ports
from stepcache import tls

__all__ = ["CRDS", "FAST_MIRROR", "MANIFESTS", "OperatorProcess", "install_manifests"]

MANIFESTS = controlplane.REPO / "manifests"
CRDS = controlplane.REPO / "crds"
NAMESPACE = "stepcache-system"
SERVICE_ACCOUNT = "stepcache"
WEBHOOK_PATH = "/mutate-pods"
FAST_MIRROR = {
    "STEPCACHE_STATUS_INTERVAL_SECONDS": "1",
    "STEPCACHE_RECONCILE_INTERVAL_SECONDS": "2",
    "STEPCACHE_EXPIRY_INTERVAL_SECONDS": "2",
}
"""Settings for tests and the demo: CacheEntry status, reconciles and expiry within seconds (benchmarks keep the
production defaults)."""


def install_manifests(cp: controlplane.ControlPlane) -> None:
    """Apply the CRD, namespace and RBAC exactly as shipped, with the optional read access to Argo's artifact
    repository Secret (the Deployment and Service need an image; not here)."""
    cp.kubectl("apply", "-f", str(CRDS / "cacheentry.yaml"))
    for name in ("00-namespace.yaml", "10-rbac.yaml", "optional/argo-artifacts-rbac.yaml"):
        cp.kubectl("apply", "-f", str(MANIFESTS / name))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/cacheentries.stepcache.dev")
    cp.wait_for_service_account(NAMESPACE, SERVICE_ACCOUNT)


class OperatorProcess:
    """One `stepcache run` process against a control plane and a database; restartable.

    Several can run side by side, as the replicas of one Deployment: each has its own ports, and `replica_of` gives
    a second one the first one's webhook certificate (one caBundle, one Service). `api_server` points the
    process at another URL for kube-apiserver (a proxy in front of it).
    """

    def __init__(
        self,
        cp: controlplane.ControlPlane,
        *,
        database_url: str,
        workdir: pathlib.Path,
        env: Mapping[str, str] | None = None,
        replica_of: OperatorProcess | None = None,
        api_server: str | None = None,
    ) -> None:
        self._cp = cp
        self._database_url = database_url
        self._workdir = workdir
        self._extra_env = dict(env or {})
        self._api_server = api_server
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file = workdir / "operator.log"
        self.webhook_port, self.metrics_port, self.health_port, self.blob_port = ports.free_ports(4)
        workdir.mkdir(parents=True, exist_ok=True)
        if replica_of is not None:
            self.ca_pem = replica_of.ca_pem
            self.cert_file, self.key_file = replica_of.cert_file, replica_of.key_file
            return
        ca = tls.make_ca("stepcache-webhook-ca")
        serving = tls.issue(
            ca, common_name="127.0.0.1", ip_addresses=["127.0.0.1"], dns_names=["localhost"], server=True
        )
        self.ca_pem = ca.cert_pem
        self.cert_file = workdir / "tls.crt"
        self.key_file = workdir / "tls.key"
        tls.write_pair(serving, cert_file=self.cert_file, key_file=self.key_file)

    @property
    def pid(self) -> int | None:
        """The operator process's pid while it runs (benchmarks read its CPU time and memory)."""
        return None if self._process is None else self._process.pid

    @property
    def log_file(self) -> pathlib.Path:
        return self._log_file

    def logs(self) -> str:
        return self._log_file.read_text(errors="replace") if self._log_file.exists() else ""

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the operator as its ServiceAccount and wait until its webhook answers TLS."""
        token = self._cp.create_token(NAMESPACE, SERVICE_ACCOUNT, seconds=3600 * 6)
        kubeconfig = self._cp.token_kubeconfig(
            token, path=self._workdir / "operator.kubeconfig", user="stepcache", server=self._api_server
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STEPCACHE_")},
            "KUBECONFIG": str(kubeconfig),
            "STEPCACHE_DATABASE_URL": self._database_url,
            "STEPCACHE_NAMESPACE": NAMESPACE,
            "STEPCACHE_WEBHOOK_HOST": "127.0.0.1",
            "STEPCACHE_WEBHOOK_PORT": str(self.webhook_port),
            "STEPCACHE_WEBHOOK_CERT_FILE": str(self.cert_file),
            "STEPCACHE_WEBHOOK_KEY_FILE": str(self.key_file),
            "STEPCACHE_METRICS_PORT": str(self.metrics_port),
            "STEPCACHE_HEALTH_PORT": str(self.health_port),
            # Pods of the process kubelet run on this host: they reach the blob endpoint on loopback.
            "STEPCACHE_BLOB_PORT": str(self.blob_port),
            "STEPCACHE_BLOB_ENDPOINT": f"http://127.0.0.1:{self.blob_port}",
            "STEPCACHE_LOG_FORMAT": "json",
            "STEPCACHE_CACHE_IMAGE": "busybox:1.36.1",
            **self._extra_env,
        }
        self._process = controlplane.spawn([sys.executable, "-m", "stepcache", "run"], env=env, log_file=self._log_file)
        controlplane.wait_for(self._webhook_ready, timeout, f"the stepcache webhook on port {self.webhook_port}")

    def stop(self) -> None:
        if self._process is not None:
            controlplane.terminate([self._process])
            self._process = None

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a node failure would end it: no cleanup handler runs. `start()` restarts it."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _webhook_ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"stepcache exited with {self._process.returncode}; log:\n{self.logs()[-4000:]}")
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.webhook_port), timeout=1) as sock,
                context.wrap_socket(sock, server_hostname="127.0.0.1"),
            ):
                return True
        except OSError:
            return False

    def webhook_configuration(self, *, port: int | None = None) -> dict[str, Any]:
        """The shipped MutatingWebhookConfiguration, pointed at this process (or at `port`: a proxy in front of
        several replicas sharing this one's certificate)."""
        config: dict[str, Any] = yaml.safe_load((MANIFESTS / "30-webhook.yaml").read_text())
        for webhook in config["webhooks"]:
            webhook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port or self.webhook_port}{WEBHOOK_PATH}",
                "caBundle": base64.b64encode(self.ca_pem).decode("ascii"),
            }
        return config

    def register_webhook(self, *, port: int | None = None) -> None:
        self._cp.kubectl("apply", "-f", "-", input=json.dumps(self.webhook_configuration(port=port)))
