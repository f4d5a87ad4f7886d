"""Values passed between stepcache's modules: what is stored, what is replayed."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

__all__ = ["CachedEntry", "EntrySummary", "JSONObject", "NewEntry", "OutputSize"]

JSONObject = dict[str, Any]
"""A decoded JSON object as the Kubernetes API sends it (pods, admission reviews)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewEntry:
    """A Succeeded pod's result, ready to be stored under its key."""

    namespace: str
    cache_key: str
    termination_messages: dict[str, str]
    argo_outputs: JSONObject | None
    key_material: JSONObject
    source_namespace: str
    source_pod: str
    source_uid: str
    started_at: datetime.datetime | None
    finished_at: datetime.datetime
    duration_seconds: float | None
    step: str = ""
    """What ran: the source pod's owner as `Kind/name`, or the Argo node name (ownerReferences are not keyed)."""
    images: tuple[str, ...] = ()
    """The images of the keyed containers, in key order, each once."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachedEntry:
    """A stored result, as a hit replays it."""

    id: int
    namespace: str
    cache_key: str
    termination_messages: dict[str, str]
    argo_outputs: JSONObject | None
    source_pod: str
    finished_at: datetime.datetime
    duration_seconds: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputSize:
    """One stored output and its size: what `kubectl describe ce` shows instead of the value."""

    name: str
    kind: str
    """`terminationMessage`, `parameter` or `result`."""
    bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntrySummary:
    """A stored entry as its CacheEntry object shows it: provenance, sizes and counters, never the outputs."""

    id: int
    namespace: str
    cache_key: str
    step: str
    images: tuple[str, ...]
    source_namespace: str
    source_pod: str
    source_uid: str
    finished_at: datetime.datetime
    duration_seconds: float | None
    hit_count: int
    last_hit_at: datetime.datetime | None
    outputs: tuple[OutputSize, ...]
    key_fields: JSONObject
    """The key material's main fields (scheme, scope, version, …): never an env value or a Secret's content."""
