"""The operator's view of ConfigMaps and Secrets follows the cluster's watch events, in opted-in namespaces only.

The operator runs in-process (`main.build_registry` under `kopf.operator`) with kmock as its Kubernetes API. Each
test creates, changes and deletes objects through the API after the operator started, and reads the operator's view
(what the key is computed from): a ConfigMap value as its sha256, a Secret value as an HMAC (only with
`STEPCACHE_KEY_SECRET_CONTENT=true`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from tests.integration import operator_harness as harness

NAMESPACE = "team-a"
"""Opted in before the operator starts."""
OTHER_NAMESPACE = "team-b"
"""Exists, not opted in."""


@pytest.fixture
async def cluster() -> AsyncIterator[harness.Emulator]:
    async with harness.emulated_cluster() as emulated:
        await harness.create_opted_in(emulated, NAMESPACE)
        await harness.create(emulated, harness.namespace(OTHER_NAMESPACE, opted_in=False))
        yield emulated


@pytest.fixture
def launcher(cluster: harness.Emulator, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> harness.Launcher:
    certs = harness.webhook_tls(tmp_path)
    return harness.Launcher(cluster=cluster, certs=certs, tmp_path=tmp_path, monkeypatch=monkeypatch)


def secret(namespace: str, name: str, data: Mapping[str, bytes]) -> dict[str, Any]:
    encoded = {key: base64.b64encode(value).decode() for key, value in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": encoded}


def path(kind: str, namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/{kind}/{name}"


async def merge_patch(cluster: harness.Emulator, url: str, body: Mapping[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with cluster.patch(url, data=json.dumps(body), headers=headers) as response:
        assert response.status < 300, await response.text()


async def delete(cluster: harness.Emulator, url: str) -> None:
    async with cluster.delete(url) as response:
        assert response.status < 300, await response.text()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_a_configmap_is_followed_through_creation_change_and_deletion_in_an_opted_in_namespace_only(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str
) -> None:
    async with launcher.run(cache_url, opted_in=NAMESPACE) as op:
        view = op.runtime.references

        async def known(namespace: str, name: str) -> Mapping[str, str] | None:
            return await op.inspect(lambda: view.configmap(namespace, name))

        # The same watch delivers both, in order: once the second is known, the first was passed over.
        await harness.create(cluster, harness.configmap(OTHER_NAMESPACE, "settings", {"greeting": "hello"}))
        await harness.create(cluster, harness.configmap(NAMESPACE, "settings", {"greeting": "hello"}))
        assert await harness.eventually(lambda: known(NAMESPACE, "settings")) == {"greeting": sha256("hello")}
        assert await known(OTHER_NAMESPACE, "settings") is None

        await merge_patch(cluster, path("configmaps", NAMESPACE, "settings"), {"data": {"greeting": "bonjour"}})
        changed = await harness.eventually(
            lambda: known(NAMESPACE, "settings"), until=lambda found: found != {"greeting": sha256("hello")}
        )
        assert changed == {"greeting": sha256("bonjour")}

        await delete(cluster, path("configmaps", NAMESPACE, "settings"))
        await harness.eventually(lambda: known(NAMESPACE, "settings"), until=lambda found: found is None)


async def test_with_secret_content_keyed_a_secret_is_followed_through_creation_change_and_deletion(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str
) -> None:
    async with launcher.run(cache_url, opted_in=NAMESPACE, STEPCACHE_KEY_SECRET_CONTENT="true") as op:
        view = op.runtime.references

        async def known() -> Mapping[str, str] | None:
            return await op.inspect(lambda: view.secret(NAMESPACE, "token"))

        await harness.create(cluster, secret(NAMESPACE, "token", {"token": b"first"}))
        first = await harness.eventually(known)
        assert set(first) == {"token"}
        assert first["token"] != sha256("first")  # an HMAC, not a plain digest anyone could recompute

        await merge_patch(
            cluster, path("secrets", NAMESPACE, "token"), {"data": {"token": base64.b64encode(b"second").decode()}}
        )
        second = await harness.eventually(known, until=lambda found: found != first)
        assert second is not None
        assert set(second) == {"token"}

        await delete(cluster, path("secrets", NAMESPACE, "token"))
        await harness.eventually(known, until=lambda found: found is None)


async def test_without_secret_content_keyed_no_secret_is_followed(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str
) -> None:
    async with launcher.run(cache_url, opted_in=NAMESPACE) as op:
        view = op.runtime.references
        await harness.create(cluster, secret(NAMESPACE, "token", {"token": b"first"}))
        await harness.create(cluster, harness.configmap(NAMESPACE, "after-the-secret", {"k": "v"}))

        await harness.eventually(lambda: op.inspect(lambda: view.configmap(NAMESPACE, "after-the-secret")))
        assert await op.inspect(lambda: view.secret(NAMESPACE, "token")) is None
        assert await op.inspect(view.counts) == (2, 0)  # train-config and after-the-secret
