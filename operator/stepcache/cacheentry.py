"""CacheEntry objects and stepcache's Events as plain data: names, bodies, and what a reconcile has to change.

Postgres holds the cache; a CacheEntry object is its view (`kubectl get ce`) and its handle (`kubectl delete ce`).
Everything here is pure, so the shape users see — object names, printer-column fields, Event names and messages — is
decided in one place and tested without a cluster; `entries` sends it and `mirror` decides when.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from stepcache import argo, model

__all__ = [
    "API_VERSION",
    "CACHE_ID_LABEL",
    "CLUSTER_SCOPE",
    "FINALIZER",
    "GROUP",
    "HIT_LABEL",
    "HIT_REASON",
    "KIND",
    "MANAGED_BY",
    "PLURAL",
    "RECORDED_REASON",
    "VERSION",
    "ObjectRef",
    "Plan",
    "PodRef",
    "SpecUpdate",
    "StatusUpdate",
    "body",
    "event",
    "event_name",
    "hit_message",
    "human_seconds",
    "images_of",
    "object_name",
    "object_namespace",
    "plan",
    "recorded_message",
    "rfc3339",
    "row_namespaces",
    "served_pod",
    "spec",
    "status",
    "step_of",
]

GROUP = "stepcache.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CacheEntry"
PLURAL = "cacheentries"
FINALIZER = "stepcache.dev/finalizer"
"""Holds a CacheEntry until its row is deleted; stepcache's own name, so kopf never confuses it with another's."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "stepcache"}

HIT_REASON = "CacheHit"
RECORDED_REASON = "Recorded"

CLUSTER_SCOPE = "*"
"""The entry namespace of rows keyed with STEPCACHE_SCOPE=cluster."""
NODE_NAME_ANNOTATION = "workflows.argoproj.io/node-name"
_ARGO_EXECUTOR_CONTAINERS = frozenset({"init", "wait"})

_SHORT_KEY = 12
_NAME_STEM = 50
"""Characters of the step kept in an object name: with `-` and 12 hex the name stays a 63-character DNS label."""
_EVENT_NAME_MAX = 253
_EVENT_SUFFIX = 16
_NOT_NAME = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")


# -- provenance: read off the pod when it is recorded (ownerReferences are not part of the key) --


def step_of(pod: Mapping[str, Any]) -> str:
    """What ran, for people: the Argo node name, else the controlling owner as `Kind/name`, else `Pod/<name>`."""
    metadata = pod.get("metadata") or {}
    node = (metadata.get("annotations") or {}).get(NODE_NAME_ANNOTATION)
    if isinstance(node, str) and node:
        return node
    owners = [o for o in metadata.get("ownerReferences") or [] if isinstance(o, Mapping)]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if owner is not None and owner.get("kind") and owner.get("name"):
        return f"{owner['kind']}/{owner['name']}"
    # A bare pod is its own step; a generated suffix would make every run look like another step.
    name = str(metadata.get("generateName") or "").rstrip("-.") or str(metadata.get("name") or "")
    return f"Pod/{name}" if name else ""


def images_of(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """The step's images, each once: containers first (the IMAGE column shows the first), then init containers.

    Argo's executor containers (`init`, `wait`) are Argo's, not the step's, and are left out.
    """
    spec = pod.get("spec") or {}
    skip = _ARGO_EXECUTOR_CONTAINERS if argo.is_argo(pod) else frozenset()
    images: list[str] = []
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        image = container.get("image")
        if container.get("name") not in skip and isinstance(image, str) and image and image not in images:
            images.append(image)
    return tuple(images)


# -- names and namespaces --


def object_name(step: str, cache_key: str) -> str:
    """A valid, deterministic object name: the step's name, sanitised and truncated, then the key's first 12 hex.

    `Job/train-x7k2p` and key `3f2a9c…` give `train-x7k2p-3f2a9c1b4d5e`; a step that sanitises to nothing gives
    `entry-3f2a9c1b4d5e`. At most 63 characters: a DNS label, so it is also a valid DNS subdomain.
    """
    stem = _sanitise(step.split("/", 1)[-1])[:_NAME_STEM].strip("-") or "entry"
    short = _sanitise(cache_key)[:_SHORT_KEY] or "0"
    return f"{stem}-{short}"


def object_namespace(entry_namespace: str, *, operator_namespace: str) -> str:
    """Where an entry's object lives: beside the pods it serves, or the operator's namespace for cluster-wide keys."""
    return operator_namespace if entry_namespace == CLUSTER_SCOPE else entry_namespace


def row_namespaces(object_namespace: str, *, operator_namespace: str) -> tuple[str, ...]:
    """The entry namespaces an object in `object_namespace` may stand for: its own, plus `*` in the operator's.

    Deleting an object deletes rows of these namespaces only, so an object in namespace A, whatever its spec says,
    never touches a row of B.
    """
    if object_namespace == operator_namespace:
        return (object_namespace, CLUSTER_SCOPE)
    return (object_namespace,)


def _sanitise(text: str) -> str:
    return _DASHES.sub("-", _NOT_NAME.sub("-", text.lower())).strip("-")


# -- the object --


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectRef:
    """One CacheEntry object, as a reconcile addresses it."""

    namespace: str
    name: str
    resource_version: str | None = None


def spec(entry: model.EntrySummary) -> dict[str, Any]:
    """The object's spec: what was recorded, by what, and how large its outputs are (never their values)."""
    result: dict[str, Any] = {
        "entryId": entry.id,
        "key": entry.cache_key,
        "shortKey": entry.cache_key[:_SHORT_KEY],
        "keyScheme": str(entry.key_fields.get("scheme") or ""),
        "step": entry.step,
        "images": list(entry.images),
        "sourcePod": {"namespace": entry.source_namespace, "name": entry.source_pod, "uid": entry.source_uid},
        "recordedAt": rfc3339(entry.finished_at),
        "outputs": [{"name": o.name, "kind": o.kind, "bytes": o.bytes} for o in entry.outputs],
        "outputBytes": sum(o.bytes for o in entry.outputs),
        "keyMaterial": _key_material(entry.key_fields),
    }
    if entry.duration_seconds is not None:
        result["durationSeconds"] = round(entry.duration_seconds, 3)
    return result


def status(
    entry: model.EntrySummary,
    *,
    max_staleness: datetime.timedelta | None,
    unused_after: datetime.timedelta | None,
) -> dict[str, Any]:
    """Counters and expiry; every field present (None where unknown), so a merge patch also clears stale ones."""
    saved = entry.hit_count * (entry.duration_seconds or 0.0)
    expires = _expires_at(entry, max_staleness=max_staleness, unused_after=unused_after)
    return {
        "hits": entry.hit_count,
        "lastHitAt": None if entry.last_hit_at is None else rfc3339(entry.last_hit_at),
        "secondsSaved": round(saved, 3),
        "saved": human_seconds(saved),
        "expiresAt": None if expires is None else rfc3339(expires),
    }


def body(entry: model.EntrySummary, *, operator_namespace: str) -> dict[str, Any]:
    """The object to create, finalizer included (so nothing has to add it later); the status is written apart."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": object_name(entry.step, entry.cache_key),
            "namespace": object_namespace(entry.namespace, operator_namespace=operator_namespace),
            "labels": dict(MANAGED_BY),
            "finalizers": [FINALIZER],
        },
        "spec": spec(entry),
    }


def _expires_at(
    entry: model.EntrySummary,
    *,
    max_staleness: datetime.timedelta | None,
    unused_after: datetime.timedelta | None,
) -> datetime.datetime | None:
    """When the expiry timer deletes the entry if nothing changes: too old, or unused for too long."""
    candidates = []
    if max_staleness is not None:
        candidates.append(entry.finished_at + max_staleness)
    if unused_after is not None:
        candidates.append((entry.last_hit_at or entry.finished_at) + unused_after)
    return min(candidates, default=None)


def _key_material(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Only scalar fields and lists of names: a summary of the key, never the values that went into it."""
    shown: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, bool | str | int) and not isinstance(value, float):
            shown[name] = value
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            shown[name] = list(value)
    return shown


def rfc3339(moment: datetime.datetime) -> str:
    """A time as the API server writes one: UTC, whole seconds, `Z`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_seconds(seconds: float) -> str:
    """A duration the way kubectl prints ages: `45s`, `3m12s`, `2h5m`, `3d4h`."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    if total < 86400:
        hours, rest = divmod(total, 3600)
        minutes = rest // 60
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, rest = divmod(total, 86400)
    hours = rest // 3600
    return f"{days}d{hours}h" if hours else f"{days}d"


# -- reconcile --


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecUpdate:
    target: ObjectRef
    spec: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatusUpdate:
    target: ObjectRef
    status: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What brings the objects in line with the rows; Postgres wins."""

    create: tuple[model.EntrySummary, ...] = ()
    update_spec: tuple[SpecUpdate, ...] = ()
    update_status: tuple[StatusUpdate, ...] = ()
    delete: tuple[ObjectRef, ...] = ()
    unmirrored: tuple[model.EntrySummary, ...] = ()
    """Rows whose object name another row of the same namespace already takes (a 48-bit key-prefix collision)."""


def plan(
    rows: Iterable[model.EntrySummary],
    objects: Iterable[Mapping[str, Any]],
    *,
    operator_namespace: str,
    max_staleness: datetime.timedelta | None,
    unused_after: datetime.timedelta | None,
) -> Plan:
    """Compare rows (listed after the objects) with objects: create the missing, fix the stale, drop the orphans.

    Objects being deleted are left alone: their finalizer handler owns them. An object is an orphan when no row
    maps to its namespace and name; updates and deletions carry the listed resourceVersion, so an object changed
    since the listing (say, by the recorder) is not overwritten or removed on stale information.
    """
    expected: dict[tuple[str, str], model.EntrySummary] = {}
    unmirrored: list[model.EntrySummary] = []
    for row in sorted(rows, key=lambda r: r.id):
        where = (
            object_namespace(row.namespace, operator_namespace=operator_namespace),
            object_name(row.step, row.cache_key),
        )
        if where in expected:
            unmirrored.append(row)
        else:
            expected[where] = row

    seen: set[tuple[str, str]] = set()
    update_spec: list[SpecUpdate] = []
    update_status: list[StatusUpdate] = []
    delete: list[ObjectRef] = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        where = (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))
        seen.add(where)
        if metadata.get("deletionTimestamp"):
            continue
        ref = ObjectRef(namespace=where[0], name=where[1], resource_version=metadata.get("resourceVersion"))
        mirrored = expected.get(where)
        if mirrored is None:
            delete.append(ref)
            continue
        wanted_spec = spec(mirrored)
        if obj.get("spec") != wanted_spec:
            update_spec.append(SpecUpdate(target=ref, spec=wanted_spec))
        wanted_status = status(mirrored, max_staleness=max_staleness, unused_after=unused_after)
        if not _same_status(obj.get("status") or {}, wanted_status):
            update_status.append(StatusUpdate(target=ref, status=wanted_status))
    create = tuple(row for where, row in expected.items() if where not in seen)
    return Plan(
        create=create,
        update_spec=tuple(update_spec),
        update_status=tuple(update_status),
        delete=tuple(delete),
        unmirrored=tuple(unmirrored),
    )


def _same_status(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Equal field by field, an absent field counting as None (a merge patch with None removes it)."""
    return all(current.get(name) == value for name, value in wanted.items())


# -- Events --


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodRef:
    """The pod an Event is about."""

    namespace: str
    name: str
    uid: str


HIT_LABEL = "stepcache.dev/hit"
CACHE_ID_LABEL = "stepcache.dev/cache-id"


def served_pod(
    pod: Mapping[str, Any], *, now: datetime.datetime, window: datetime.timedelta
) -> tuple[PodRef, int] | None:
    """A pod to post `CacheHit` on, and the id of the entry that served it; None for any other pod.

    Only pods labelled as hits with a numeric cache-id, not being deleted, created within `window` of `now`.
    """
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    entry_id = str(labels.get(CACHE_ID_LABEL) or "")
    if labels.get(HIT_LABEL) != "true" or not entry_id.isdigit() or not metadata.get("uid"):
        return None
    if metadata.get("deletionTimestamp"):
        return None
    created = _parse_time(metadata.get("creationTimestamp"))
    if created is not None and now - created > window:
        return None
    ref = PodRef(
        namespace=str(metadata.get("namespace") or ""), name=str(metadata.get("name") or ""), uid=str(metadata["uid"])
    )
    return ref, int(entry_id)


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def event_name(pod: PodRef, *, reason: str) -> str:
    """One name per (pod, reason): every replica and every restart computes the same, so a second create is a 409.

    The pod's name (cut so the whole stays a valid DNS subdomain of at most 253 characters), a dot, and 16 hex of a
    hash of the pod's uid and the reason — a pod that reuses a name gets its own Event.
    """
    digest = hashlib.sha256(f"{pod.uid}\n{reason}".encode()).hexdigest()[:_EVENT_SUFFIX]
    stem = pod.name[: _EVENT_NAME_MAX - _EVENT_SUFFIX - 1].rstrip("-.")
    return f"{stem}.{digest}" if stem else digest


def hit_message(entry: model.EntrySummary, *, object_name: str, now: datetime.datetime) -> str:
    """What a user reads on a served pod: which entry, how old it is, and the compute it saved."""
    age = human_seconds((now - entry.finished_at).total_seconds())
    saved = "an unknown time" if entry.duration_seconds is None else human_seconds(entry.duration_seconds)
    return (
        f"served from cache entry {object_name} (id {entry.id}, key {entry.cache_key[:_SHORT_KEY]}), recorded {age} "
        f"ago from pod {entry.source_namespace}/{entry.source_pod}; saved {saved} of compute"
    )


def recorded_message(entry: model.EntrySummary, *, object_name: str) -> str:
    """What a user reads on a recorded pod: where its result went and what later identical pods will get."""
    count = len(entry.outputs)
    size = sum(o.bytes for o in entry.outputs)
    return (
        f"result stored as cache entry {object_name} (id {entry.id}, key {entry.cache_key[:_SHORT_KEY]}): "
        f"{count} output{'' if count == 1 else 's'}, {size} bytes; identical pods will be served from it"
    )


def event(
    pod: PodRef,
    *,
    reason: str,
    message: str,
    related: ObjectRef | None,
    now: datetime.datetime,
    instance: str,
) -> dict[str, Any]:
    """A core/v1 Event on the pod (what `kubectl describe pod` and `kubectl get events` show)."""
    stamp = rfc3339(now)
    result: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(pod, reason=reason), "namespace": pod.namespace, "labels": dict(MANAGED_BY)},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace, "name": pod.name},
        "reason": reason,
        "message": message,
        "type": "Normal",
        "source": {"component": "stepcache"},
        "reportingComponent": "stepcache.dev/operator",
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    if pod.uid:
        result["involvedObject"]["uid"] = pod.uid
    if related is not None:
        result["related"] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "namespace": related.namespace,
            "name": related.name,
        }
    return result
