"""Which pods are caching candidates, and the key that says two pods would compute the same result.

The key (scheme `stepcache/v2`) follows Bazel's action key: everything that can change what a step computes or sees
goes in, and only what is known not to is left out, on one reviewed list, `EXCLUSIONS`, which docs/trust.md shows as
a table. A field this code has never heard of is kept: it can cost a hit, never serve a wrong result. Scheme
`stepcache/v1` worked the other way round (an allow-list of container fields) and so let through fields that change
a result — a container's securityContext, lifecycle hooks, host namespaces, DNS, GPUs, native sidecars.

The material is the pod spec and its keyed containers, minus `EXCLUSIONS`, with absent and API-server-default values
written the same way (`_DEFAULTS`; an empty string, list or object equals an absent one), so a manifest keys like the
pod the API server hands the webhook. What references point at is keyed too: labels and annotations read through the
downward API by value, a container's resources read through it by value, ConfigMaps by the digests of the keys used
(from `references`), Secrets by name and items, and by HMACs with `KeyOptions.key_secret_content`.

Argo pods are keyed from their own containers like any pod — what runs is what is keyed — minus the env Argo fills
per run, plus what only the template shows: `inputs`, `outputs` and a script's `source`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal

from stepcache import argo, artifacts, errors, references

__all__ = [
    "CONDITIONS",
    "ENABLED_LABEL",
    "EXCLUSIONS",
    "IGNORE_ENV_ANNOTATION",
    "KFP_CACHE_ENABLED",
    "KFP_ENABLE_CACHING",
    "KFP_V2_COMPONENT",
    "OWN_ANNOTATIONS",
    "OWN_LABELS",
    "SCHEME",
    "VERSION_ANNOTATION",
    "Condition",
    "Exclusion",
    "Key",
    "KeyOptions",
    "canonical_json",
    "compute",
    "differences",
    "digest",
    "exclusions_markdown",
    "ignored_env",
    "is_kfp",
    "key_containers",
    "skip_reason",
    "tag_only_images",
    "tag_warning",
]

SCHEME = "stepcache/v2"
ENABLED_LABEL = "stepcache.dev/enabled"
VERSION_ANNOTATION = "stepcache.dev/version"
IGNORE_ENV_ANNOTATION = "stepcache.dev/ignore-env"

KFP_CACHE_ENABLED = "pipelines.kubeflow.org/cache_enabled"
KFP_ENABLE_CACHING = "pipelines.kubeflow.org/enable_caching"
KFP_V2_COMPONENT = "pipelines.kubeflow.org/v2_component"

OWN_LABELS = frozenset({"stepcache.dev/cache-id", "stepcache.dev/hit", "pipelines.kubeflow.org/reused_from_cache"})
OWN_ANNOTATIONS = frozenset({"stepcache.dev/key", "stepcache.dev/key-containers", "stepcache.dev/key-signature"})
"""Names stepcache writes on a pod at admission: the recorder recomputes the key on a pod that carries them, so
they never count, even where the downward API shows a pod all its labels or annotations."""

# An OCI digest suffix (`@sha256:<hex>`, or any other registered algorithm): the image cannot move under it.
_DIGEST = re.compile(r"@[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")


# --- what is left out --------------------------------------------------------------------------------------------

Condition = Literal[
    "always",
    "unless-key-service-account",
    "ignored-env",
    "argo-per-run-env",
    "unmounted-volume",
    "token-volume",
    "token-volume-mount",
]

CONDITIONS: Mapping[Condition, str] = {
    "always": "always",
    "unless-key-service-account": (
        "unless `STEPCACHE_KEY_SERVICE_ACCOUNT=true` (then the account is keyed as `serviceAccount`, "
        "`automountServiceAccountToken` as written)"
    ),
    "ignored-env": "its name is listed in the pod's `stepcache.dev/ignore-env` annotation",
    "argo-per-run-env": (
        "the pod is an Argo pod and its name is one of "
        + ", ".join(f"`{name}`" for name in sorted(argo.PER_RUN_ENV | {argo.TEMPLATE_ENV}))
    ),
    "unmounted-volume": "no keyed container mounts it (`volumeMounts` or `volumeDevices`)",
    "token-volume": (
        "it is a ServiceAccount token volume, whatever its name: a `projected` volume whose sources are a "
        "`serviceAccountToken`, and at most key `ca.crt` of ConfigMap `kube-root-ca.crt` and the downward API's "
        "`metadata.namespace` (and nothing else but a `defaultMode`)"
    ),
    "token-volume-mount": "it mounts a ServiceAccount token volume (as in the row above)",
}
"""When a conditional exclusion applies, in the words docs/trust.md shows."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Exclusion:
    """One entry of the reviewed list of what the key leaves out."""

    path: str
    """Where, in the Pod object: dotted fields, `[*]` any element of a list, `{a,b}` either field, `*` within a
    field name. Everything under the path goes."""
    reason: str
    """Why leaving it out cannot change what the step computes."""
    when: Condition = "always"


_CONTAINERS = "spec.{initContainers,containers}[*]"
_SIZING = "{cpu,memory,ephemeral-storage,hugepages-*}"

EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        path="{apiVersion,kind}",
        reason="the object's type: every keyed object is a v1 Pod",
    ),
    Exclusion(
        path="metadata",
        reason=(
            "identity and bookkeeping: names and their generated parts, uid, ownerReferences, managedFields, labels "
            "and annotations. A label or annotation read through the downward API is keyed by value where it is "
            "read; `stepcache.dev/version` and `stepcache.dev/ignore-env` are keyed as `version` and `ignoreEnv`"
        ),
    ),
    Exclusion(path="status", reason="what happened to the pod, reported after it was keyed"),
    Exclusion(
        path="spec.{nodeName,nodeSelector,affinity,tolerations,topologySpreadConstraints,schedulerName,schedulingGates}",
        reason="placement: which node runs the step and when, not what it runs",
    ),
    Exclusion(
        path="spec.{priority,priorityClassName,preemptionPolicy}",
        reason="placement: who waits for whom",
    ),
    Exclusion(
        path="spec.overhead",
        reason="bookkeeping the RuntimeClass admission fills in (the `runtimeClassName` itself is keyed)",
    ),
    Exclusion(
        path="spec.{terminationGracePeriodSeconds,activeDeadlineSeconds}",
        reason="how long a pod may run or take to stop: a step that is stopped does not succeed, so is not recorded",
    ),
    Exclusion(
        path="spec.imagePullSecrets",
        reason="credentials to pull an image; the image reference itself is keyed",
    ),
    Exclusion(
        path="spec.{serviceAccountName,serviceAccount,automountServiceAccountToken}",
        reason="who the pod is to the API server, not what it computes (its token volume, below, is per pod)",
        when="unless-key-service-account",
    ),
    Exclusion(
        path=f"spec.resources.{{requests,limits}}.{_SIZING}",
        reason="pod-level sizing, as for containers",
    ),
    Exclusion(
        path=f"{_CONTAINERS}.resources.{{requests,limits}}.{_SIZING}",
        reason=(
            "sizing: how fast a step runs, or whether it runs out of memory and then does not succeed. Extended "
            "resources (GPUs and other devices) and resource claims are keyed; a value read through the downward "
            "API (`resourceFieldRef`) is keyed by value where it is read"
        ),
    ),
    Exclusion(path=f"{_CONTAINERS}.resizePolicy", reason="sizing: what an in-place resize restarts"),
    Exclusion(
        path=f"{_CONTAINERS}.{{livenessProbe,readinessProbe,startupProbe}}",
        reason="probes watch a container; one that fails stops it, and a stopped step is not recorded",
    ),
    Exclusion(
        path=f"{_CONTAINERS}.ports",
        reason="declared ports are informational: what a container listens on is up to its program",
    ),
    Exclusion(path=f"{_CONTAINERS}.imagePullPolicy", reason="when an image is pulled, not which one"),
    Exclusion(
        path=f"{_CONTAINERS}.env[*]",
        reason="the user says these values differ between runs of the same step (the list itself is keyed)",
        when="ignored-env",
    ),
    Exclusion(
        path=f"{_CONTAINERS}.env[*]",
        reason=(
            "Argo fills these per run: pod, workflow and node names and ids, the workflow deadline, whether a later "
            "step reads `result`, a copy of terminationGracePeriodSeconds; `ARGO_TEMPLATE` carries the per-run "
            "archive location, and its `inputs`, `outputs` and script `source` are keyed as `argo`"
        ),
        when="argo-per-run-env",
    ),
    Exclusion(
        path="spec.volumes[*]",
        reason="a volume no keyed container mounts cannot reach the step",
        when="unmounted-volume",
    ),
    Exclusion(
        path="spec.volumes[*]",
        reason=(
            "a per-pod credential that expires; the CA and the namespace it also shows are the same for every pod "
            "of the scope"
        ),
        when="token-volume",
    ),
    Exclusion(
        path=f"{_CONTAINERS}.volumeMounts[*]",
        reason="the token volume goes with its mounts, wherever they are",
        when="token-volume-mount",
    ),
)
"""Everything the key leaves out. Nothing else decides: a field not covered here is keyed."""

_DEFAULTS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("spec.dnsPolicy", ("ClusterFirst",)),
    ("spec.enableServiceLinks", (True,)),
    ("spec.hostUsers", (True,)),
    ("spec.{hostNetwork,hostPID,hostIPC,shareProcessNamespace,setHostnameAsFQDN}", (False,)),
    ("spec.automountServiceAccountToken", (True,)),
    ("spec.securityContext.runAsNonRoot", (False,)),
    (f"{_CONTAINERS}.terminationMessagePath", ("/dev/termination-log",)),
    (f"{_CONTAINERS}.terminationMessagePolicy", ("File",)),
    (f"{_CONTAINERS}.{{stdin,stdinOnce,tty}}", (False,)),
    (f"{_CONTAINERS}.securityContext.{{privileged,runAsNonRoot,readOnlyRootFilesystem}}", (False,)),
    (f"{_CONTAINERS}.securityContext.procMount", ("Default",)),
    (f"{_CONTAINERS}.volumeMounts[*].readOnly", (False,)),
    (f"{_CONTAINERS}.volumeMounts[*].mountPropagation", ("None",)),
    (f"{_CONTAINERS}.volumeMounts[*].recursiveReadOnly", ("Disabled",)),
    (f"{_CONTAINERS}.env[*].valueFrom.fieldRef.apiVersion", ("v1",)),
    (f"{_CONTAINERS}.env[*].valueFrom.resourceFieldRef.divisor", ("1", 1)),
    (f"{_CONTAINERS}.env[*].valueFrom.{{configMapKeyRef,secretKeyRef}}.optional", (False,)),
    (f"{_CONTAINERS}.envFrom[*].{{configMapRef,secretRef}}.optional", (False,)),
    ("spec.volumes[*].{configMap,secret,downwardAPI,projected}.defaultMode", (420,)),
    ("spec.volumes[*].{configMap,secret}.optional", (False,)),
    ("spec.volumes[*].persistentVolumeClaim.readOnly", (False,)),
    ("spec.volumes[*].downwardAPI.items[*].fieldRef.apiVersion", ("v1",)),
    ("spec.volumes[*].downwardAPI.items[*].resourceFieldRef.divisor", ("1", 1)),
    ("spec.volumes[*].projected.sources[*].{configMap,secret}.optional", (False,)),
    ("spec.volumes[*].projected.sources[*].downwardAPI.items[*].fieldRef.apiVersion", ("v1",)),
    ("spec.volumes[*].projected.sources[*].downwardAPI.items[*].resourceFieldRef.divisor", ("1", 1)),
)
"""Values the API server fills in, or that mean the same as leaving the field out: written as absent."""


def exclusions_markdown() -> str:
    """`EXCLUSIONS` as the Markdown table docs/trust.md carries (a test keeps the two equal)."""
    lines = ["| path | left out | why |", "|---|---|---|"]
    for exclusion in EXCLUSIONS:
        cells = (f"`{exclusion.path}`", CONDITIONS[exclusion.when], exclusion.reason)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyOptions:
    """The operator-wide settings that go into every key."""

    scope: Literal["namespace", "cluster"] = "namespace"
    """`cluster` writes `"*"` instead of the namespace, so equal pods of different namespaces share a key."""
    salt: str = ""
    key_service_account: bool = False
    key_secret_content: bool = False
    """Key referenced Secrets by the HMACs of the values used, not only by name and items."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Key:
    """A pod's key, the containers it covers, and the material it was hashed from."""

    value: str
    """64 lowercase hex digits."""
    containers: tuple[str, ...]
    """Names of the pod's containers that went into the key: init containers first, then containers, pod order."""
    material: dict[str, Any]
    """The canonical material (for `stepcache explain` and storage)."""


# --- eligibility -------------------------------------------------------------------------------------------------


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
    `enable_caching`/`cache_enabled` is `"false"`; `"kfp-v2"`: a KFP v2 component (its driver caches);
    `"restart-always"`: `restartPolicy` Always (the API server's default), a service rather than a step — a Job's pod
    says Never or OnFailure. Native sidecars (init containers with `restartPolicy: Always`) are fine.
    """
    if str(_labels(pod).get(ENABLED_LABEL, "")).strip().lower() == "false":
        return "opted-out"
    if "false" in (_kfp_value(pod, KFP_ENABLE_CACHING), _kfp_value(pod, KFP_CACHE_ENABLED)):
        return "kfp-caching-disabled"
    if _kfp_value(pod, KFP_V2_COMPONENT) == "true":
        return "kfp-v2"
    if (pod.get("spec") or {}).get("restartPolicy") in (None, "", "Always"):
        return "restart-always"
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


# --- tags and digests --------------------------------------------------------------------------------------------


def _pod_containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = pod.get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def tag_only_images(pod: Mapping[str, Any], containers: Sequence[str]) -> list[str]:
    """Images of the named containers (the keyed ones) referenced without a digest, deduplicated, in order.

    Argo pods are no exception: their `init` and `wait` images are keyed like `main`'s, so a moving tag there
    matters as much.
    """
    by_name = {c.get("name"): c for c in _pod_containers(pod)}
    found: list[str] = []
    for name in containers:
        image = str((by_name.get(name) or {}).get("image") or "")
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


# --- material ----------------------------------------------------------------------------------------------------


def key_containers(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """Every init container and container name, init containers first, in pod order: what a full key covers."""
    return tuple(str(c.get("name") or "") for c in _pod_containers(pod))


def compute(
    pod: Mapping[str, Any],
    *,
    namespace: str,
    options: KeyOptions,
    references: references.References,
    containers: Sequence[str] | None = None,
    provenance: artifacts.Provenance = artifacts.UNKNOWN,
) -> Key:
    """The pod's key over `containers` (default: all of them, see `key_containers`).

    `namespace` is the namespace keyed and the one ConfigMaps and Secrets are looked up in; `references` is where
    (the operator's `references.ReferenceView`, or `references.Unresolved` where there is none).

    The recorder passes the names from the `stepcache.dev/key-containers` annotation, so containers injected later
    by other webhooks do not change the key. Raises `Uncacheable` for a named container missing from the pod, a name
    given twice or an empty selection; a referenced ConfigMap (or, with `key_secret_content`, Secret) the view does
    not know, optional or not; an Argo template that cannot be read (offloaded, or differing between containers) or
    that has neither a container nor a script; Argo args offloaded to a ConfigMap.

    `provenance` tells what the locations of Argo input artifacts hold: a known one is keyed by that content
    (`artifacts.keyed_inputs`), since every run uploads under new keys.
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

    tmpl = argo.template(pod)
    if tmpl is not None and argo.args_offloaded(pod):
        raise errors.Uncacheable("the Argo container args are offloaded to a ConfigMap")
    ignored = ignored_env(pod)
    material: dict[str, Any] = {
        "scheme": SCHEME,
        "scope": namespace if options.scope == "namespace" else "*",
        "salt": options.salt,
        "version": str(_annotations(pod).get(VERSION_ANNOTATION) or ""),
        "ignoreEnv": sorted(ignored),
    }
    if options.key_service_account:
        material["serviceAccount"] = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")

    keyer = _Keyer(pod, ignored=ignored, argo_pod=tmpl is not None)
    material["pod"] = _walk_mapping(spec, _SPEC, skip=_POD_SKIP_SA if options.key_service_account else _POD_SKIP)
    init = [init_by_name[name] for name in names if name in init_by_name]
    main = [main_by_name[name] for name in names if name in main_by_name]
    material["initContainers"] = [keyer.container(c, node=_INIT_CONTAINER) for c in init]
    material["containers"] = [keyer.container(c, node=_CONTAINER) for c in main]
    material["volumes"] = keyer.volumes(mounted_by=[*init, *main, *(spec.get("ephemeralContainers") or [])])
    if tmpl is not None:
        material["argo"] = _argo_material(tmpl, provenance=provenance)

    unresolved = isinstance(references, _UNRESOLVED)
    if unresolved:
        material["configMapContent"] = "unresolved"
    else:
        material["configMaps"] = keyer.content(
            keyer.configmaps, lookup=references.configmap, kind="ConfigMap", namespace=namespace
        )
    if options.key_secret_content and unresolved:
        material["secretContent"] = "unresolved"
    elif options.key_secret_content:
        material["secrets"] = keyer.content(keyer.secrets, lookup=references.secret, kind="Secret", namespace=namespace)
    return Key(value=digest(material), containers=names, material=material)


_POD_SKIP_SA = frozenset({"containers", "initContainers", "volumes", "serviceAccountName", "serviceAccount"})
"""Keyed on their own (containers, volumes) or as `serviceAccount`."""
_POD_SKIP = _POD_SKIP_SA | {"automountServiceAccountToken"}
_UNRESOLVED = references.Unresolved
"""The module under another name: inside `compute`, `references` is the parameter."""


def _argo_material(tmpl: Mapping[str, Any], *, provenance: artifacts.Provenance) -> dict[str, Any]:
    """What only the template shows: `inputs` (parameters on Argo < 3.6; input artifacts by the content their
    location is known to hold, else as written, location included, since another location may hold other bytes),
    `outputs` (they decide what an entry holds), and a script's `source` (argoexec stages it from the template)."""
    has_container = isinstance(tmpl.get("container"), Mapping)
    script = tmpl.get("script")
    if not has_container and not isinstance(script, Mapping):
        # Resource, data and containerSet steps: the first acts on the cluster, none is replayed by `main` alone.
        raise errors.Uncacheable("the Argo template has neither a container nor a script")
    shaped: dict[str, Any] = {
        "inputs": _or_empty(_walk(_keyed_inputs(tmpl, provenance=provenance), None), {}),
        "outputs": _or_empty(_walk(tmpl.get("outputs"), None), {}),
    }
    if isinstance(script, Mapping):
        shaped["script"] = {"source": str(script.get("source") or "")}
    return shaped


def _keyed_inputs(tmpl: Mapping[str, Any], *, provenance: artifacts.Provenance) -> Any:
    inputs = tmpl.get("inputs")
    return artifacts.keyed_inputs(tmpl, provenance=provenance) if isinstance(inputs, Mapping) else inputs


# --- the per-pod keyer -------------------------------------------------------------------------------------------

_LABEL_OR_ANNOTATION = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")
_BY_PATH: Final = object()
"""A downward-API field keyed by its path: the pod's own name, uid, IPs, node, service account, namespace."""


@dataclasses.dataclass(frozen=True)
class _Use:
    """Which keys of one ConfigMap or Secret the keyed part of the pod reads."""

    everything: bool = False
    keys: frozenset[str] = frozenset()

    def __or__(self, other: _Use) -> _Use:
        return _Use(everything=self.everything or other.everything, keys=self.keys | other.keys)


_ALL = _Use(everything=True)


class _Keyer:
    """Shapes one pod's containers and volumes, and notes the ConfigMaps and Secrets they read."""

    def __init__(self, pod: Mapping[str, Any], *, ignored: frozenset[str], argo_pod: bool) -> None:
        spec = pod.get("spec") or {}
        metadata = pod.get("metadata") or {}
        self._ignored = ignored
        self._argo_env = (argo.PER_RUN_ENV | {argo.TEMPLATE_ENV}) if argo_pod else frozenset()
        self._maps: dict[str, Mapping[str, Any]] = {
            "labels": metadata.get("labels") or {},
            "annotations": metadata.get("annotations") or {},
        }
        self._unkeyed: dict[str, frozenset[str]] = {
            "labels": OWN_LABELS | (argo.PER_RUN_LABELS if argo_pod else frozenset()),
            "annotations": OWN_ANNOTATIONS | (argo.PER_RUN_ANNOTATIONS if argo_pod else frozenset()),
        }
        self._by_container = {
            c.get("name"): c for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        }
        self._declared: dict[Any, Mapping[str, Any]] = {v.get("name"): v for v in spec.get("volumes") or []}
        self._tokens = {name for name, volume in self._declared.items() if _is_token_volume(volume)}
        self.configmaps: dict[str, _Use] = {}
        self.secrets: dict[str, _Use] = {}

    # containers

    def container(self, container: Mapping[str, Any], *, node: _Node) -> dict[str, Any]:
        shaped = _walk_mapping(container, node, skip=("env", "volumeMounts"))
        env = [self._env(var, container=container) for var in container.get("env") or []]
        if kept := [var for var in env if var is not None]:
            shaped["env"] = kept
        mounts = [
            _walk_mapping(mount, _MOUNT)
            for mount in container.get("volumeMounts") or []
            if mount.get("name") not in self._tokens
        ]
        if mounts:
            shaped["volumeMounts"] = mounts
        for source in container.get("envFrom") or []:
            if isinstance(ref := source.get("configMapRef"), Mapping):
                self._use(self.configmaps, ref.get("name"), _ALL)
            if isinstance(ref := source.get("secretRef"), Mapping):
                self._use(self.secrets, ref.get("name"), _ALL)
        return shaped

    def _env(self, var: Mapping[str, Any], *, container: Mapping[str, Any]) -> dict[str, Any] | None:
        name = var.get("name")
        if name in self._ignored or name in self._argo_env:
            return None
        shaped = _walk_mapping(var, _ENV)
        source = var.get("valueFrom")
        if not isinstance(source, Mapping):
            return shaped
        into = shaped.setdefault("valueFrom", {})
        if isinstance(ref := source.get("configMapKeyRef"), Mapping):
            self._use(self.configmaps, ref.get("name"), _Use(keys=frozenset({str(ref.get("key") or "")})))
        if isinstance(ref := source.get("secretKeyRef"), Mapping):
            self._use(self.secrets, ref.get("name"), _Use(keys=frozenset({str(ref.get("key") or "")})))
        self._downward(source, into=into, container_name=container.get("name"))
        return shaped

    def _downward(self, source: Mapping[str, Any], *, into: dict[str, Any], container_name: Any) -> None:
        """Add the value a downward-API reference resolves to, where it is keyed by value."""
        if isinstance(ref := source.get("fieldRef"), Mapping):
            value = self._field_value(str(ref.get("fieldPath") or ""))
            if value is not _BY_PATH:
                into.setdefault("fieldRef", {})["value"] = value
        if isinstance(ref := source.get("resourceFieldRef"), Mapping):
            target = ref.get("containerName") or container_name
            into.setdefault("resourceFieldRef", {})["value"] = self._resource_value(target, ref.get("resource"))

    def _field_value(self, field_path: str) -> Any:
        if field_path in ("metadata.labels", "metadata.annotations"):
            kind = field_path.partition(".")[2]
            unkeyed = self._unkeyed[kind]
            return {str(k): str(v) for k, v in self._maps[kind].items() if k not in unkeyed}
        if match := _LABEL_OR_ANNOTATION.match(field_path):
            kind, name = match.group(1), match.group(2)
            if name in self._unkeyed[kind]:
                return _BY_PATH
            # The kubelet gives an absent label or annotation as "".
            return str(self._maps[kind].get(name) or "")
        return _BY_PATH

    def _resource_value(self, container_name: Any, resource: Any) -> str | None:
        kind, _, name = str(resource or "").partition(".")
        resources = (self._by_container.get(container_name) or {}).get("resources") or {}
        value = (resources.get(kind) or {}).get(name) if kind in ("limits", "requests") else None
        return None if value is None else str(value)

    # volumes

    def volumes(self, *, mounted_by: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Volume name → what it holds, for the volumes the given containers mount, token volumes left out."""
        mounted = {
            mount.get("name")
            for c in mounted_by
            for mount in [*(c.get("volumeMounts") or []), *(c.get("volumeDevices") or [])]
        }
        return {
            str(name): self._volume(volume)
            for name, volume in self._declared.items()
            if name in mounted and name not in self._tokens
        }

    def _volume(self, volume: Mapping[str, Any]) -> dict[str, Any]:
        shaped = _walk_mapping(volume, _VOLUME, skip=("name",))
        _keep_present(volume, shaped, skip=("name",))
        if isinstance(source := volume.get("configMap"), Mapping):
            self._use(self.configmaps, source.get("name"), _items_use(source))
        if isinstance(source := volume.get("secret"), Mapping):
            self._use(self.secrets, source.get("secretName"), _items_use(source))
        if isinstance(source := volume.get("downwardAPI"), Mapping):
            self._downward_items(source, into=shaped.get("downwardAPI"))
        if isinstance(projected := volume.get("projected"), Mapping):
            shaped_sources = (shaped.get("projected") or {}).get("sources") or []
            for source, shaped_source in zip(projected.get("sources") or [], shaped_sources, strict=False):
                if not isinstance(source, Mapping):
                    continue
                _keep_present(source, shaped_source, skip=())
                if isinstance(ref := source.get("configMap"), Mapping):
                    self._use(self.configmaps, ref.get("name"), _items_use(ref))
                if isinstance(ref := source.get("secret"), Mapping):
                    self._use(self.secrets, ref.get("name"), _items_use(ref))
                if isinstance(ref := source.get("downwardAPI"), Mapping):
                    self._downward_items(ref, into=shaped_source.get("downwardAPI"))
        return shaped

    def _downward_items(self, source: Mapping[str, Any], *, into: Any) -> None:
        shaped_items = (into or {}).get("items") or []
        for item, shaped_item in zip(source.get("items") or [], shaped_items, strict=False):
            if isinstance(item, Mapping) and isinstance(shaped_item, dict):
                self._downward(item, into=shaped_item, container_name=None)

    # references

    def _use(self, uses: dict[str, _Use], name: Any, use: _Use) -> None:
        key = str(name or "")
        uses[key] = uses[key] | use if key in uses else use

    def content(
        self,
        uses: Mapping[str, _Use],
        *,
        lookup: Callable[[str, str], Mapping[str, str] | None],
        kind: str,
        namespace: str,
    ) -> dict[str, dict[str, str | None]]:
        """Name → key → digest of what the keyed part of the pod reads; a reference the view does not know is
        `Uncacheable` (never keyed as absent: the view may only lag behind the API server)."""
        found: dict[str, dict[str, str | None]] = {}
        for name, use in sorted(uses.items()):
            digests = lookup(namespace, name)
            if digests is None:
                raise errors.Uncacheable(f"{kind} {namespace}/{name} is not known yet")
            chosen: dict[str, str | None] = dict(digests) if use.everything else {}
            chosen.update({key: digests.get(key) for key in use.keys})
            found[name] = chosen
        return found


def _items_use(source: Mapping[str, Any]) -> _Use:
    items = source.get("items") or []
    if not items:
        return _ALL
    return _Use(keys=frozenset(str(item.get("key") or "") for item in items if isinstance(item, Mapping)))


def _is_token_volume(volume: Mapping[str, Any]) -> bool:
    """The ServiceAccount token volume the API server adds (`kube-api-access-*`), under any name: see
    `CONDITIONS["token-volume"]`. Anything more it projects makes it an ordinary, keyed volume."""
    projected = volume.get("projected")
    if set(volume) != {"name", "projected"} or not isinstance(projected, Mapping):
        return False
    if not set(projected) <= {"sources", "defaultMode"}:
        return False
    sources = projected.get("sources")
    if not isinstance(sources, list) or not sources:
        return False
    has_token = False
    for source in sources:
        if not isinstance(source, Mapping) or len(source) != 1:
            return False
        [(kind, body)] = source.items()
        if kind == "serviceAccountToken":
            has_token = True
        elif kind == "configMap":
            if not _is_root_ca(body):
                return False
        elif kind == "downwardAPI":
            if not _is_namespace_only(body):
                return False
        else:
            return False
    return has_token


def _is_root_ca(body: Any) -> bool:
    if not isinstance(body, Mapping) or not set(body) <= {"name", "items", "optional"}:
        return False
    items = body.get("items")
    return (
        body.get("name") == "kube-root-ca.crt"
        and isinstance(items, list)
        and bool(items)
        and all(
            isinstance(i, Mapping) and set(i) <= {"key", "path", "mode"} and i.get("key") == "ca.crt" for i in items
        )
    )


def _is_item(item: Any, *, key: str) -> bool:
    return isinstance(item, Mapping) and set(item) <= {"key", "path", "mode"} and item.get("key") == key


def _is_namespace_only(body: Any) -> bool:
    if not isinstance(body, Mapping) or not set(body) <= {"items"}:
        return False
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return False
    for item in items:
        if not isinstance(item, Mapping) or not set(item) <= {"path", "fieldRef", "mode"}:
            return False
        ref = item.get("fieldRef")
        if not isinstance(ref, Mapping) or not set(ref) <= {"fieldPath", "apiVersion"}:
            return False
        if ref.get("fieldPath") != "metadata.namespace" or ref.get("apiVersion", "v1") != "v1":
            return False
    return True


# --- walking the pod ---------------------------------------------------------------------------------------------


class _Node:
    """One step of a path through the pod: which fields are left out below it, and which values are defaults."""

    __slots__ = ("defaults", "excluded", "fields", "globs", "items")

    def __init__(self) -> None:
        self.fields: dict[str, _Node] = {}
        self.globs: list[tuple[str, _Node]] = []
        self.items: _Node | None = None
        self.excluded = False
        self.defaults: tuple[Any, ...] = ()

    def child(self, name: str) -> _Node | None:
        found = self.fields.get(name)
        if found is None:
            for pattern, node in self.globs:
                if fnmatch.fnmatchcase(name, pattern):
                    return node
        return found


_SEGMENT = re.compile(r"^(?P<name>\{[^}]*\}|[^\[\]{}]+)(?P<lists>(?:\[\*\])*)$")


def _segments(path: str) -> list[tuple[tuple[str, ...], int]]:
    """`a.{b,c}[*].d` → [(("a",), 0), (("b", "c"), 1), (("d",), 0)]."""
    parsed: list[tuple[tuple[str, ...], int]] = []
    for segment in path.split("."):
        match = _SEGMENT.match(segment)
        if match is None:
            raise ValueError(f"bad path segment {segment!r} in {path!r}")
        name = match.group("name")
        names = tuple(name[1:-1].split(",")) if name.startswith("{") else (name,)
        parsed.append((names, match.group("lists").count("[*]")))
    return parsed


def _insert(root: _Node, path: str) -> list[_Node]:
    """The nodes a path leads to (several, through `{a,b}`), created as needed."""
    nodes = [root]
    for names, lists in _segments(path):
        following: list[_Node] = []
        for node in nodes:
            for name in names:
                if "*" in name:
                    child = next((n for p, n in node.globs if p == name), None)
                    if child is None:
                        child = _Node()
                        node.globs.append((name, child))
                else:
                    child = node.fields.setdefault(name, _Node())
                for _ in range(lists):
                    if child.items is None:
                        child.items = _Node()
                    child = child.items
                following.append(child)
        nodes = following
    return nodes


def _build() -> _Node:
    root = _Node()
    for exclusion in EXCLUSIONS:
        if exclusion.when == "always":
            for node in _insert(root, exclusion.path):
                node.excluded = True
    for path, values in _DEFAULTS:
        for node in _insert(root, path):
            node.defaults = values
    return root


def _descend(node: _Node | None, path: str) -> _Node:
    for names, lists in _segments(path):
        assert node is not None
        assert len(names) == 1
        node = node.child(names[0])
        for _ in range(lists):
            node = node.items if node is not None else None
    assert node is not None
    return node


_ROOT = _build()
_SPEC = _descend(_ROOT, "spec")
_INIT_CONTAINER = _descend(_ROOT, "spec.initContainers[*]")
_CONTAINER = _descend(_ROOT, "spec.containers[*]")
_ENV = _descend(_ROOT, "spec.containers[*].env[*]")
_MOUNT = _descend(_ROOT, "spec.containers[*].volumeMounts[*]")
_VOLUME = _descend(_ROOT, "spec.volumes[*]")

_DROP: Final = object()
"""What `_walk` returns for a value written as absent (empty, or a default)."""


def _walk(value: Any, node: _Node | None) -> Any:
    """A copy of `value` without what is left out under `node`, and without empty or default values (`_DROP` when
    nothing is left). The copy shares nothing with the pod, which the caller may go on to patch.

    Type checks go from the commonest to the rarest, concrete types first: this runs for every field of every pod.
    """
    if isinstance(value, str):
        if not value or (node is not None and node.defaults and value in node.defaults):
            return _DROP
        return value
    if isinstance(value, dict) or (not isinstance(value, list) and isinstance(value, Mapping)):
        shaped = _walk_mapping(value, node)
        return shaped if shaped else _DROP
    if isinstance(value, list):
        items = node.items if node is not None else None
        # Elements are never dropped: their positions matter (`args: ["", "x"]`).
        shaped_list = [_or_empty(_walk(item, items), _empty_like(item)) for item in value]
        return shaped_list if shaped_list else _DROP
    if value is None:
        return _DROP
    if node is not None and any(type(value) is type(d) and value == d for d in node.defaults):
        return _DROP
    return value


def _walk_mapping(value: Mapping[str, Any], node: _Node | None, *, skip: Collection[str] = ()) -> dict[str, Any]:
    shaped: dict[str, Any] = {}
    for field, item in value.items():
        if skip and field in skip:
            continue
        child = node.child(field) if node is not None else None
        if child is not None and child.excluded:
            continue
        walked = _walk(item, child)
        if walked is not _DROP:
            shaped[str(field)] = walked
    return shaped


def _keep_present(original: Mapping[str, Any], shaped: Any, *, skip: Iterable[str]) -> None:
    """A volume's (or projection's) type is its field's presence: `emptyDir: {}` stays, unlike other empty objects."""
    if not isinstance(shaped, dict):
        return
    for field, item in original.items():
        if field not in skip and field not in shaped and isinstance(item, Mapping):
            shaped[str(field)] = {}


def _empty_like(value: Any) -> Any:
    if isinstance(value, dict | Mapping):
        return {}
    if isinstance(value, list):
        return []
    return value


def _or_empty(walked: Any, empty: Any) -> Any:
    return empty if walked is _DROP else walked


# --- hashing and comparing ---------------------------------------------------------------------------------------


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
    return sorted(set(_diff(a, b, "")))


def _diff(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for field in set(a) | set(b):
            where = f"{path}.{field}" if path else str(field)
            if field not in a or field not in b:
                yield where
            else:
                yield from _diff(a[field], b[field], where)
    elif isinstance(a, list) and isinstance(b, list):
        for index in range(max(len(a), len(b))):
            where = f"{path}[{index}]"
            if index >= len(a) or index >= len(b):
                yield where
            else:
                yield from _diff(a[index], b[index], where)
    elif type(a) is not type(b) or a != b:
        yield path
