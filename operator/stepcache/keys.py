"""Which pods are caching candidates, and the key that says two pods would compute the same result.

The key is the sha256 of an allowlisted *shape* of the pod (scheme `stepcache/v1`, see DESIGN.md "The key"): only
what can change a step's result goes in — images, commands, args, env, mounts and what the mounted volumes hold — and
everything that varies between two runs of the same step without changing its result is left out: generated names,
uids, the per-pod service-account token volume, resources, probes, placement, labels and other annotations.
Absent and empty/default values are written the same way, so `args: []` and no `args`, or `readOnly: false` and no
`readOnly`, give one key. Anything not understood is kept as written: an unknown field can only cost a hit, never
serve a wrong result.

Argo pods are keyed from the template Argo resolved for the step rather than from the pod, because the pod carries
per-run values everywhere (workflow and node names in env, the archive location, deadlines). See `_argo_material`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from stepcache import argo, artifacts, errors

__all__ = [
    "ENABLED_LABEL",
    "IGNORE_ENV_ANNOTATION",
    "KFP_CACHE_ENABLED",
    "KFP_ENABLE_CACHING",
    "KFP_V2_COMPONENT",
    "SCHEME",
    "VERSION_ANNOTATION",
    "Key",
    "KeyOptions",
    "canonical_json",
    "compute",
    "differences",
    "digest",
    "ignored_env",
    "is_kfp",
    "key_containers",
    "skip_reason",
    "tag_only_images",
    "tag_warning",
]

SCHEME = "stepcache/v1"
ENABLED_LABEL = "stepcache.dev/enabled"
VERSION_ANNOTATION = "stepcache.dev/version"
IGNORE_ENV_ANNOTATION = "stepcache.dev/ignore-env"

KFP_CACHE_ENABLED = "pipelines.kubeflow.org/cache_enabled"
KFP_ENABLE_CACHING = "pipelines.kubeflow.org/enable_caching"
KFP_V2_COMPONENT = "pipelines.kubeflow.org/v2_component"

_TOKEN_VOLUME_PREFIX = "kube-api-access-"

# An OCI digest suffix (`@sha256:<hex>`, or any other registered algorithm): the image cannot move under it.
_DIGEST = re.compile(r"@[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyOptions:
    """The operator-wide settings that go into every key."""

    scope: Literal["namespace", "cluster"] = "namespace"
    """`cluster` writes `"*"` instead of the namespace, so equal pods of different namespaces share a key."""
    salt: str = ""
    key_service_account: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Key:
    """A pod's key, the containers it covers, and the material it was hashed from."""

    value: str
    """64 lowercase hex digits."""
    containers: tuple[str, ...]
    """Names of the pod's containers that went into the key: init containers first, then containers, pod order."""
    material: dict[str, Any]
    """The canonical material (for `stepcache explain` and storage)."""


# --- eligibility -----------------------------------------------------------------------------------------------------


def _labels(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("labels") or {}


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def _kfp_value(pod: Mapping[str, Any], name: str) -> str | None:
    """A KFP marker from the labels or, failing that, the annotations: KFP has written both places over time."""
    for where in (_labels(pod), _annotations(pod)):
        value = where.get(name)
        if isinstance(value, str):
            return value.strip().lower()
    return None


def skip_reason(pod: Mapping[str, Any]) -> str | None:
    """Why the pod is not a caching candidate, or None when it is.

    `"opted-out"`: label `stepcache.dev/enabled: "false"`; `"kfp-caching-disabled"`: KFP v1's
    `enable_caching`/`cache_enabled` is `"false"`; `"kfp-v2"`: a KFP v2 component (its driver caches).
    """
    if str(_labels(pod).get(ENABLED_LABEL, "")).strip().lower() == "false":
        return "opted-out"
    if "false" in (_kfp_value(pod, KFP_ENABLE_CACHING), _kfp_value(pod, KFP_CACHE_ENABLED)):
        return "kfp-caching-disabled"
    if _kfp_value(pod, KFP_V2_COMPONENT) == "true":
        return "kfp-v2"
    return None


def is_kfp(pod: Mapping[str, Any]) -> bool:
    """A KFP v1 pod: it carries `cache_enabled` or `enable_caching` as a label (or annotation), whatever the value."""
    return any(_kfp_value(pod, name) is not None for name in (KFP_CACHE_ENABLED, KFP_ENABLE_CACHING))


def ignored_env(pod: Mapping[str, Any]) -> frozenset[str]:
    """Env names left out of the key, from the comma-separated `stepcache.dev/ignore-env` annotation."""
    raw = _annotations(pod).get(IGNORE_ENV_ANNOTATION)
    if not isinstance(raw, str):
        return frozenset()
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


# --- tags and digests ------------------------------------------------------------------------------------------------


def _pod_containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = pod.get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def tag_only_images(pod: Mapping[str, Any], containers: Sequence[str]) -> list[str]:
    """Images of the named containers that are referenced without a digest, deduplicated, in order.

    For an Argo pod these are the images of the template (the ones in its key) and `containers` is not consulted:
    Argo's own `init`/`wait` image is not in the key, so its tag cannot make a cached result wrong. Raises
    `Uncacheable` as `compute` does for an Argo template that cannot be read.
    """
    tmpl = argo.template(pod)
    if tmpl is not None:
        images = [str(c.get("image") or "") for c in _argo_containers(tmpl)]
    else:
        by_name = {c.get("name"): c for c in _pod_containers(pod)}
        images = [str(by_name[name].get("image") or "") for name in containers if name in by_name]
    found: list[str] = []
    for image in images:
        if image and not _DIGEST.search(image) and image not in found:
            found.append(image)
    return found


def tag_warning(image: str) -> str:
    """The admission warning for an image referenced by tag."""
    name, slash, last = image.rpartition("/")
    repository = f"{name}{slash}{last.partition('@')[0].partition(':')[0]}"
    return (
        f'image "{image}" is referenced by tag; a cached result assumes the tag does not move — '
        f"pin a digest ({repository}@sha256:...) to be exact"
    )


# --- material --------------------------------------------------------------------------------------------------------


def key_containers(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """Every init container and container name, init containers first, in pod order: what a full key covers."""
    return tuple(str(c.get("name") or "") for c in _pod_containers(pod))


def compute(
    pod: Mapping[str, Any],
    *,
    namespace: str,
    options: KeyOptions,
    containers: Sequence[str] | None = None,
    provenance: artifacts.Provenance = artifacts.UNKNOWN,
) -> Key:
    """The pod's key over `containers` (default: all of them, see `key_containers`).

    The recorder passes the names from the `stepcache.dev/key-containers` annotation, so containers injected later
    by other webhooks do not change the key. A named container missing from the pod, a name given twice or an empty
    selection raise `Uncacheable`; so does an Argo template that cannot be read (offloaded) or has no container.
    `provenance` tells what the locations of Argo input artifacts hold (`artifacts.keyed_inputs`).
    """
    spec = pod.get("spec") or {}
    init_by_name = {c.get("name"): c for c in spec.get("initContainers") or []}
    main_by_name = {c.get("name"): c for c in spec.get("containers") or []}
    names = key_containers(pod) if containers is None else tuple(containers)
    if not names:
        raise errors.Uncacheable("no containers to key")
    if len(set(names)) != len(names):
        raise errors.Uncacheable(f"a container is named twice in {','.join(names)!r}")
    for name in names:
        if name not in init_by_name and name not in main_by_name:
            raise errors.Uncacheable(f"container {name!r} is not in the pod")

    material: dict[str, Any] = {
        "scheme": SCHEME,
        "scope": namespace if options.scope == "namespace" else "*",
        "salt": options.salt,
        "version": str(_annotations(pod).get(VERSION_ANNOTATION, "")),
    }
    if options.key_service_account:
        material["serviceAccount"] = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"

    tmpl = argo.template(pod)
    declared = {v.get("name"): v for v in spec.get("volumes") or []}
    if tmpl is not None:
        # Argo copies the template's volumes into the pod; read them from the template, the source of truth.
        declared.update({v.get("name"): v for v in tmpl.get("volumes") or []})
    shaper = _Shaper(ignored_env=ignored_env(pod), declared=declared)
    if tmpl is not None:
        material.update(_argo_material(tmpl, shaper=shaper, provenance=provenance))
    else:
        init = [init_by_name[name] for name in names if name in init_by_name]
        main = [main_by_name[name] for name in names if name in main_by_name]
        material["initContainers"] = [shaper.container(c) for c in init]
        material["containers"] = [shaper.container(c) for c in main]
        material["volumes"] = shaper.volumes(mounted_by=[*init, *main])
    return Key(value=digest(material), containers=names, material=material)


def _argo_material(tmpl: Mapping[str, Any], *, shaper: _Shaper, provenance: artifacts.Provenance) -> dict[str, Any]:
    """The Argo part of the material: allowlisted template fields, and what the volumes they mount hold.

    Kept from the template: `container`/`script` (shaped like a pod's container, plus the script's `source`),
    `initContainers`, `sidecars`, `inputs` and `outputs` as written (input parameter values are already substituted
    into them), and `podSpecPatch` when set, since it can change the main container. Left out: `name` and
    `metadata` (they do not change what the step computes, and template metadata may carry per-run values),
    `archiveLocation` (its key names the workflow and the pod, so it differs on every run), and scheduling,
    retries and deadlines. An input artifact whose location `provenance` knows is keyed by the content stored there
    (each run uploads under new keys, so a location never repeats); any other stays as written, location included,
    as another location may hold other bytes.

    `volumes` covers what the template's containers mount, from the template's own volumes or, for workflow-level
    volumes the template does not declare, from the pod: so another ConfigMap or claim gives another key. A claim
    from `volumeClaimTemplates` is named per run, so steps that mount one do not share a key across runs — what they
    write to it would not be replayed.
    """
    has_container = isinstance(tmpl.get("container"), Mapping)
    has_script = isinstance(tmpl.get("script"), Mapping)
    if not has_container and not has_script:
        # Resource, data and containerSet steps: the first acts on the cluster, none is replayed by `main` alone.
        raise errors.Uncacheable("the Argo template has neither a container nor a script")
    shaped: dict[str, Any] = {}
    if has_container:
        shaped["container"] = shaper.container(tmpl["container"])
    if has_script:
        script = tmpl["script"]
        shaped["script"] = {**shaper.container(script), "source": str(script.get("source") or "")}
    shaped["initContainers"] = [shaper.container(c) for c in tmpl.get("initContainers") or []]
    shaped["sidecars"] = [shaper.container(c) for c in tmpl.get("sidecars") or []]
    inputs = tmpl.get("inputs")
    shaped["inputs"] = (
        artifacts.keyed_inputs(tmpl, provenance=provenance)
        if isinstance(inputs, Mapping)
        else _as_written(inputs or {})
    )
    shaped["outputs"] = _as_written(tmpl.get("outputs") or {})
    if tmpl.get("podSpecPatch"):
        shaped["podSpecPatch"] = _as_written(tmpl["podSpecPatch"])
    return {"argo": shaped, "volumes": shaper.volumes(mounted_by=_argo_containers(tmpl))}


def _argo_containers(tmpl: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = [tmpl[field] for field in ("container", "script") if isinstance(tmpl.get(field), Mapping)]
    return [*found, *(tmpl.get("initContainers") or []), *(tmpl.get("sidecars") or [])]


def _as_written(value: Any) -> Any:
    """A deep copy, so that the material never shares objects with the pod its caller goes on to patch."""
    return copy.deepcopy(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Shaper:
    """Shapes containers and volumes of one pod: what it needs to know is the pod's ignore-env and its volumes."""

    ignored_env: frozenset[str]
    declared: Mapping[Any, Mapping[str, Any]]
    """Volume name → declaration."""

    def container(self, container: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": str(container.get("name") or ""),
            "image": str(container.get("image") or ""),
            "command": _as_written(list(container.get("command") or [])),
            "args": _as_written(list(container.get("args") or [])),
            # Order is kept: `$(VAR)` in a later value expands from an earlier one, so order can change the result.
            "env": [_env(var) for var in container.get("env") or [] if var.get("name") not in self.ignored_env],
            "envFrom": _as_written(list(container.get("envFrom") or [])),
            "workingDir": str(container.get("workingDir") or ""),
            "volumeMounts": [
                _mount(mount) for mount in container.get("volumeMounts") or [] if not self.is_token(mount.get("name"))
            ],
        }

    def is_token(self, name: Any) -> bool:
        """A service-account token volume: a per-pod credential (under a generated name), never part of a key."""
        if isinstance(name, str) and name.startswith(_TOKEN_VOLUME_PREFIX):
            return True
        sources = ((self.declared.get(name) or {}).get("projected") or {}).get("sources") or []
        return any(isinstance(source, Mapping) and "serviceAccountToken" in source for source in sources)

    def volumes(self, *, mounted_by: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Volume name → source identity, for the volumes the given containers mount, token volumes left out."""
        mounted = {mount.get("name") for c in mounted_by for mount in c.get("volumeMounts") or []}
        return {
            str(name): _volume_identity(volume)
            for name, volume in self.declared.items()
            if name in mounted and not self.is_token(name)
        }


def _env(var: Mapping[str, Any]) -> dict[str, Any]:
    if var.get("valueFrom") is not None:
        return {"name": str(var.get("name") or ""), "valueFrom": _with_field_ref_default(var["valueFrom"])}
    return {"name": str(var.get("name") or ""), "value": str(var.get("value") or "")}


def _with_field_ref_default(source: Any) -> Any:
    """As written, but with the `fieldRef.apiVersion: v1` the API server fills in, so a manifest keys as admitted."""
    shaped = _as_written(source)
    if isinstance(shaped, dict) and isinstance(shaped.get("fieldRef"), dict):
        shaped["fieldRef"].setdefault("apiVersion", "v1")
    return shaped


def _mount(mount: Mapping[str, Any]) -> dict[str, Any]:
    shaped: dict[str, Any] = {
        "name": str(mount.get("name") or ""),
        "mountPath": str(mount.get("mountPath") or ""),
        "subPath": str(mount.get("subPath") or ""),
        "readOnly": bool(mount.get("readOnly") or False),
    }
    # Not in DESIGN's list, but it selects what the container sees; present only when used, so every other key
    # is exactly as DESIGN writes it.
    if mount.get("subPathExpr"):
        shaped["subPathExpr"] = str(mount["subPathExpr"])
    return shaped


def _volume_identity(volume: Mapping[str, Any]) -> dict[str, Any]:
    """What a volume holds, without the modes and flags that do not change its content."""
    if "configMap" in volume:
        return {"configMap": _named_items(volume["configMap"], name="name")}
    if "secret" in volume:
        return {"secret": _named_items(volume["secret"], name="secretName")}
    if "persistentVolumeClaim" in volume:
        return {"persistentVolumeClaim": {"claimName": _field(volume["persistentVolumeClaim"], "claimName")}}
    if "hostPath" in volume:
        return {"hostPath": {"path": _field(volume["hostPath"], "path")}}
    if "emptyDir" in volume:
        return {"emptyDir": {"medium": _field(volume["emptyDir"], "medium")}}
    if "downwardAPI" in volume:
        return {"downwardAPI": _downward_items(volume["downwardAPI"])}
    if "projected" in volume:
        sources = (volume["projected"] or {}).get("sources") or []
        return {"projected": {"sources": [_projection(source) for source in sources]}}
    return {field: _as_written(value) for field, value in volume.items() if field != "name"}


def _projection(source: Mapping[str, Any]) -> dict[str, Any]:
    if "configMap" in source:
        return {"configMap": _named_items(source["configMap"], name="name")}
    if "secret" in source:
        return {"secret": _named_items(source["secret"], name="name")}
    if "downwardAPI" in source:
        return {"downwardAPI": _downward_items(source["downwardAPI"])}
    return {field: _as_written(value) for field, value in source.items()}


def _downward_items(source: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"items": [_with_field_ref_default(item) for item in (source or {}).get("items") or []]}


def _field(source: Mapping[str, Any] | None, name: str) -> str:
    return str((source or {}).get(name) or "")


def _named_items(source: Mapping[str, Any] | None, *, name: str) -> dict[str, Any]:
    return {name: _field(source, name), "items": _as_written(list((source or {}).get("items") or []))}


# --- hashing and comparing -------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8 (not \\u-escaped): one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest(material: Mapping[str, Any]) -> str:
    """The key: sha256 hex of the canonical JSON of the material."""
    return hashlib.sha256(canonical_json(material)).hexdigest()


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Paths where two materials differ, e.g. `containers[0].image` or `volumes.data.configMap.name`; sorted.

    An element or field present on one side only is named by its own path (`initContainers[1]`).
    """
    return sorted(set(_walk(a, b, "")))


def _walk(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for field in set(a) | set(b):
            where = f"{path}.{field}" if path else str(field)
            if field not in a or field not in b:
                yield where
            else:
                yield from _walk(a[field], b[field], where)
    elif isinstance(a, list) and isinstance(b, list):
        for index in range(max(len(a), len(b))):
            where = f"{path}[{index}]"
            if index >= len(a) or index >= len(b):
                yield where
            else:
                yield from _walk(a[index], b[index], where)
    elif type(a) is not type(b) or a != b:
        yield path
