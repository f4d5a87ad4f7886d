"""What the handlers share for the life of one operator process, built once at start and kept in kopf's memo."""

from __future__ import annotations

import dataclasses

from stepcache import blobs, config, keys, kube, mirror, mutation, references, store

__all__ = ["OptedInNamespaces", "Runtime"]


class OptedInNamespaces:
    """The namespaces labelled `stepcache.dev/enabled=true`, kept current by a namespace watch.

    The webhook's namespaceSelector already filters, but the handler checks too: a misconfigured (or hand-edited)
    MutatingWebhookConfiguration must not turn caching on where nobody asked for it.
    """

    def __init__(self) -> None:
        self._names: set[str] = set()

    def add(self, name: str) -> None:
        self._names.add(name)

    def discard(self, name: str) -> None:
        self._names.discard(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names


@dataclasses.dataclass(kw_only=True)
class Runtime:
    """One per process; never module-global, so tests can run several side by side."""

    settings: config.Settings
    store: store.Store
    kube: kube.Kube
    signing_key: bytes
    namespaces: OptedInNamespaces
    key_options: keys.KeyOptions
    replay_options: mutation.ReplayOptions
    references: references.ReferenceView
    """Digests of the ConfigMaps (and, with STEPCACHE_KEY_SECRET_CONTENT, Secrets) of opted-in namespaces."""
    mirror: mirror.Mirror | None = None
    """CacheEntry objects and Events; None where no cluster-side view is wanted (unit tests)."""
    blobs: blobs.BlobStore | None = None
    """Output artifacts' bytes and locations; None where artifacts are not handled (then never served)."""
    url_key: bytes = b""
    """Signs blob URLs (`artifacts.url_key` of the signing key)."""
