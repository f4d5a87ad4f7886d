"""Values passed between stepcache's modules: what is stored, what is replayed."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

__all__ = ["CachedEntry", "JSONObject", "NewEntry"]

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
