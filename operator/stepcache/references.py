"""What a pod's ConfigMap and Secret references hold, as digests, for the key.

A step that reads a ConfigMap computes with its data: two pods that mount the same name while the ConfigMap changed
in between must not share a key. The webhook has no time to ask the API server, so the operator keeps a view of the
ConfigMaps and Secrets of opted-in namespaces, fed by watches, and the key reads it (`keys.compute`'s
`references`). The view holds digests only, never a value: sha256 of each ConfigMap value, and HMAC-SHA256 under a
key of the operator's of each Secret value, since a plain hash of a short secret could be guessed back from the key
material stored with every entry.

`Unresolved` is for callers that have no view (the `stepcache key` command): ConfigMaps and Secrets are then keyed by
name and items only, and the material says so, so such a key is never mistaken for the operator's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
from collections.abc import Mapping
from typing import Protocol

__all__ = [
    "BINARY_PREFIX",
    "ReferenceView",
    "References",
    "Unresolved",
    "configmap_digests",
    "secret_digests",
]

BINARY_PREFIX = "binary:"
"""Prefix of the digest of a `binaryData` value, so it never equals the digest of a `data` value."""


class References(Protocol):
    """Where the key finds the content behind a pod's references, by namespace and name."""

    def configmap(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """Key → sha256 hex of its value (`binaryData` keys: `BINARY_PREFIX` + hex); None when not known."""

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """Key → HMAC-SHA256 hex of its decoded value; None when not known."""


def configmap_digests(*, data: Mapping[str, str] | None, binary_data: Mapping[str, str] | None) -> dict[str, str]:
    """A ConfigMap's digests as `References.configmap` returns them; `binary_data` is base64, as the API sends it.

    Raises ValueError when a `binary_data` value is not base64.
    """
    return {key: _hex(digest, binary=binary) for key, (digest, binary) in _configmap_entry(data, binary_data)}


def secret_digests(*, data: Mapping[str, str] | None, hmac_key: bytes) -> dict[str, str]:
    """A Secret's digests as `References.secret` returns them; `data` is base64, as the API sends it.

    Raises ValueError when a value is not base64.
    """
    return {key: digest.hex() for key, digest in _secret_entry(data, hmac_key).items()}


_Digests = dict[str, bytes]
"""Key → raw 32-byte digest: half the memory of a hex string."""


class ReferenceView:
    """ConfigMap and Secret digests of the namespaces the operator watches, by namespace and name.

    Each `put_*` replaces an object's entry whole, so a reader never sees half of an update. Nothing else is kept:
    no value, no metadata.
    """

    def __init__(self) -> None:
        self._configmaps: dict[str, dict[str, tuple[_Digests, frozenset[str]]]] = {}
        self._secrets: dict[str, dict[str, _Digests]] = {}

    def put_configmap(
        self,
        namespace: str,
        name: str,
        *,
        data: Mapping[str, str] | None,
        binary_data: Mapping[str, str] | None,
    ) -> None:
        """Remember a ConfigMap (as added or modified). Raises ValueError, keeping nothing, on bad base64."""
        digests: _Digests = {}
        binary: set[str] = set()
        for key, (digest, is_binary) in _configmap_entry(data, binary_data):
            digests[key] = digest
            if is_binary:
                binary.add(key)
        entry = (digests, frozenset(binary) if binary else _NO_KEYS)
        self._configmaps.setdefault(sys.intern(namespace), {})[name] = entry

    def forget_configmap(self, namespace: str, name: str) -> None:
        """The ConfigMap was deleted: pods that reference it are not keyed until it is known again."""
        self._configmaps.get(namespace, {}).pop(name, None)

    def put_secret(self, namespace: str, name: str, *, data: Mapping[str, str] | None, hmac_key: bytes) -> None:
        """Remember a Secret's HMACs. `hmac_key` must be the same in every replica and across restarts, or keys
        differ between them. Raises ValueError, keeping nothing, when a value is not base64."""
        entry = _secret_entry(data, hmac_key)
        self._secrets.setdefault(sys.intern(namespace), {})[name] = entry

    def forget_secret(self, namespace: str, name: str) -> None:
        """The Secret was deleted."""
        self._secrets.get(namespace, {}).pop(name, None)

    def forget_namespace(self, namespace: str) -> None:
        """The namespace was deleted or opted out: everything known about it goes."""
        self._configmaps.pop(namespace, None)
        self._secrets.pop(namespace, None)

    def configmap(self, namespace: str, name: str) -> Mapping[str, str] | None:
        found = self._configmaps.get(namespace, {}).get(name)
        if found is None:
            return None
        digests, binary = found
        return {key: _hex(digest, binary=key in binary) for key, digest in digests.items()}

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        found = self._secrets.get(namespace, {}).get(name)
        if found is None:
            return None
        return {key: digest.hex() for key, digest in found.items()}

    def counts(self) -> tuple[int, int]:
        """How many ConfigMaps and Secrets are known (for metrics and tests)."""
        return (
            sum(len(names) for names in self._configmaps.values()),
            sum(len(names) for names in self._secrets.values()),
        )


class Unresolved:
    """No view: `keys.compute` keys ConfigMaps and Secrets by name and items only and marks the material
    `"configMapContent": "unresolved"` (and `"secretContent"` when Secret content is keyed). Never consulted."""

    def configmap(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return None

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return None


_NO_KEYS: frozenset[str] = frozenset()


def _configmap_entry(
    data: Mapping[str, str] | None, binary_data: Mapping[str, str] | None
) -> list[tuple[str, tuple[bytes, bool]]]:
    entry = [(key, (hashlib.sha256(str(value).encode("utf-8")).digest(), False)) for key, value in (data or {}).items()]
    entry.extend(
        (key, (hashlib.sha256(_decode(value, what=f"binaryData[{key!r}]")).digest(), True))
        for key, value in (binary_data or {}).items()
    )
    return entry


def _secret_entry(data: Mapping[str, str] | None, hmac_key: bytes) -> _Digests:
    return {
        key: hmac.new(hmac_key, _decode(value, what=f"data[{key!r}]"), hashlib.sha256).digest()
        for key, value in (data or {}).items()
    }


def _decode(value: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ValueError(f"{what} is not base64") from exc


def _hex(digest: bytes, *, binary: bool) -> str:
    return f"{BINARY_PREFIX}{digest.hex()}" if binary else digest.hex()
