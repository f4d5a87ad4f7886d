"""What admission does to a pod: the skip, miss and hit changes, as JSON merge patches (RFC 7386).

kopf's mutating handlers express changes through the `patch` kwarg, a merge patch; the JSON patch the API server
receives is built from it path by path (`patches.json_patch`), so what these builders return is exactly what happens
to the pod, and `apply_merge_patch` shows the pod they produce. They touch only the paths that change; two habits
from the time kopf diffed its own merge of them are kept because they keep patches tidy, not because anything relies
on them any more: a map whose every key goes is deleted whole, and no patch carries an empty object.

A hit replays the cached result with a tiny container per original container. Values (termination messages, output
parameters, ids) reach the replay script through environment variables, never through the script text, so no value
can inject shell code; each `$` in them is doubled because the kubelet expands `$(VAR)` and `$$` in env values.

A hit pod must not wait for a device, a volume or a node, and must pass the `restricted` Pod Security Standard
wherever stepcache writes the containers: the replay containers carry the restricted profile and 10m/16Mi; no
container keeps an extended resource (GPUs), a DRA claim, a probe, a lifecycle hook or a port; the pod loses host
namespaces, pod-level resources and claims, and every volume that attaches storage or a host path (only emptyDir,
configMap, secret, downwardAPI and projected volumes stay), and, unless `keep_node_constraints`, its node
constraints (affinity, nodeSelector other than OS and architecture, nodeName, topologySpreadConstraints, and
runtimeClassName with the overhead it set).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from stepcache import argo, artifacts, errors, model

__all__ = [
    "CACHE_ID",
    "HIT",
    "KEY",
    "KEY_CONTAINERS",
    "KEY_SIGNATURE",
    "KFP_REUSED",
    "OWNED_ANNOTATIONS",
    "OWNED_LABELS",
    "REPLAY_SCRIPT",
    "ReplayOptions",
    "Signed",
    "apply_merge_patch",
    "hit_patch",
    "miss_patch",
    "skip_patch",
]

KEY = "stepcache.dev/key"
KEY_CONTAINERS = "stepcache.dev/key-containers"
KEY_SIGNATURE = "stepcache.dev/key-signature"
CACHE_ID = "stepcache.dev/cache-id"
HIT = "stepcache.dev/hit"
KFP_REUSED = "pipelines.kubeflow.org/reused_from_cache"
OWNED_ANNOTATIONS = (KEY, KEY_CONTAINERS, KEY_SIGNATURE)
OWNED_LABELS = (CACHE_ID, HIT)

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# Environment of the replay scripts. Plain pods: one message per container; Argo `main`: parameters by position.
MESSAGE_ENV = "STEPCACHE_MESSAGE"
MESSAGE_PATH_ENV = "STEPCACHE_MESSAGE_PATH"
ENTRY_ID_ENV = "STEPCACHE_ENTRY_ID"
SOURCE_POD_ENV = "STEPCACHE_SOURCE_POD"
RESULT_ENV = "STEPCACHE_RESULT"
PARAM_PATH_ENV = "STEPCACHE_PARAM_PATH_{}"
PARAM_VALUE_ENV = "STEPCACHE_PARAM_VALUE_{}"

# The scripts contain neither `$(` nor `$$`, so the kubelet's expansion of `command` leaves them as written.
REPLAY_SCRIPT = (
    "set -e\n"
    f'printf \'%s\' "${MESSAGE_ENV}" > "${MESSAGE_PATH_ENV}"\n'
    f'printf \'stepcache: replayed cache entry %s recorded by pod %s\\n\' "${ENTRY_ID_ENV}" "${SOURCE_POD_ENV}"\n'
)
"""A plain pod's replay: the cached termination message, byte for byte, then one line naming entry and source."""

# Argo `main`: stdout is the step's `result` (argoexec trims one trailing newline), so the naming line goes to stderr.
_ARGO_SCRIPT_HEAD = (
    "set -e\n"
    # Write $2 plus a newline at path $1, creating its directory (argoexec trims one trailing newline).
    'w() { case $1 in ?*/*) mkdir -p "${1%/*}" ;; esac; printf \'%s\\n\' "$2" > "$1"; }\n'
)
_ARGO_SCRIPT_RESULT = f"printf '%s\\n' \"${RESULT_ENV}\"\n"
_ARGO_SCRIPT_TAIL = (
    f'printf \'stepcache: replayed cache entry %s recorded by pod %s\\n\' "${ENTRY_ID_ENV}" "${SOURCE_POD_ENV}" >&2\n'
    "exit 0\n"
)

_REPLAY_RESOURCES = {"cpu": "10m", "memory": "16Mi"}

# Resources a kept container (Argo's `init` and `wait`, sidecars) may still ask for: none waits for a device.
_NATIVE_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})
# Container fields no replayed step needs, each of which can hold a pod up or make it fail: a probe against a
# process that is not there, a hook, a hostPort that binds it to a node.
_DROPPED_CONTAINER_FIELDS = ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "ports")
# Volume sources that attach nothing: no claim, no host path, no network storage, no CSI driver to wait for.
_DETACHED_VOLUME_SOURCES = frozenset({"emptyDir", "configMap", "secret", "downwardAPI", "projected"})
_HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")
# Node constraints, removed unless ReplayOptions.keep_node_constraints. `overhead` is set from the RuntimeClass at
# admission and is refused without one. nodeSelector is handled apart: its OS and architecture entries stay.
_NODE_CONSTRAINTS = ("affinity", "nodeName", "topologySpreadConstraints", "runtimeClassName", "overhead")
_PLATFORM_SELECTORS = frozenset({"kubernetes.io/os", "kubernetes.io/arch"})
"""A replay image runs on a platform like any other: a selector naming one is kept, it waits for no device."""
_OUTPUT_VOLUME = "stepcache-outputs-{}"
_ARGO_INIT = "init"
"""Argo's own init container (argoexec init), kept on a hit; a template's own init containers are not."""

# The `restricted` Pod Security checks that read pod-level securityContext fields, with the values they accept.
# The sets are those of the oldest policy version, so a namespace pinned to an old enforce-version accepts them too.
_SAFE_PROFILE_TYPES = frozenset({"RuntimeDefault", "Localhost"})
_SAFE_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_unprivileged_port_start",
    }
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplayOptions:
    """How hits are replayed (settings `STEPCACHE_CACHE_IMAGE`, `STEPCACHE_KEEP_NODE_CONSTRAINTS`)."""

    cache_image: str
    keep_node_constraints: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Signed:
    """The key annotations every admitted (non-skipped) pod carries."""

    key: str
    key_containers: tuple[str, ...]
    """Written comma-joined."""
    signature: str


def skip_patch(pod: Mapping[str, Any]) -> dict[str, Any]:
    """Remove user-written stepcache-owned labels and annotations, and nothing else; `{}` when there are none."""
    return _metadata_patch(
        pod,
        labels=dict.fromkeys(OWNED_LABELS),
        annotations=dict.fromkeys(OWNED_ANNOTATIONS),
    )


def miss_patch(pod: Mapping[str, Any], *, signed: Signed) -> dict[str, Any]:
    """Sign the pod and mark it for recording: key annotations and an empty `cache-id` label; no `hit` label.

    On an Argo pod a user-set `workflows.argoproj.io/outputs` annotation goes too: the recorder reads that annotation
    (Argo < 3.6) only when nobody but Argo's `wait` can have written it, that is when it was absent at admission.
    """
    return _metadata_patch(pod, labels={CACHE_ID: "", HIT: None}, annotations=_admitted_annotations(pod, signed))


def hit_patch(
    pod: Mapping[str, Any],
    *,
    signed: Signed,
    entry: model.CachedEntry,
    options: ReplayOptions,
    kfp: bool,
    sources: Mapping[str, artifacts.Source] | None = None,
) -> dict[str, Any]:
    """Serve the pod from `entry`: replay containers in place of the real ones (see the module's docstring).

    `sources` says where the replay of an Argo step gets each output artifact's blob, by sha256
    (`artifacts.served` tells which the pod needs). Raises `errors.Uncacheable` when the pod cannot be replayed from
    this entry — a blob without a source included; the caller then admits it as a miss.
    """
    tmpl = argo.template(pod)
    spec: Mapping[str, Any] = pod.get("spec") or {}
    kept_volumes = [
        volume for volume in spec.get("volumes") or [] if set(volume) - {"name"} <= _DETACHED_VOLUME_SOURCES
    ]
    removed = {volume.get("name") for volume in spec.get("volumes") or []} - {v.get("name") for v in kept_volumes}
    if tmpl is not None:
        changes = _argo_spec_patch(
            pod, tmpl, entry=entry, options=options, volumes=kept_volumes, removed=removed, sources=sources or {}
        )
    else:
        changes = _plain_spec_patch(pod, entry=entry, options=options, volumes=kept_volumes)
    labels: dict[str, str | None] = {CACHE_ID: str(entry.id), HIT: "true"}
    if kfp:
        labels[KFP_REUSED] = "true"
    patch = _metadata_patch(pod, labels=labels, annotations=_admitted_annotations(pod, signed))
    patch["spec"] = {**_pod_level_patch(spec, options=options), **changes}
    return patch


def apply_merge_patch(obj: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """The object `patch` (RFC 7386) turns `obj` into; neither input is changed, nothing is shared with them."""
    return _merge_object(copy.deepcopy(dict(obj)), patch)


def _merge_object(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    for name, value in patch.items():
        if value is None:
            target.pop(name, None)
        elif isinstance(value, Mapping):
            current = target.get(name)
            target[name] = _merge_object(current if isinstance(current, dict) else {}, value)
        else:
            target[name] = copy.deepcopy(value)
    return target


def _admitted_annotations(pod: Mapping[str, Any], signed: Signed) -> dict[str, str | None]:
    annotations: dict[str, str | None] = {
        KEY: signed.key,
        KEY_CONTAINERS: ",".join(signed.key_containers),
        KEY_SIGNATURE: signed.signature,
    }
    if argo.is_argo(pod):
        annotations[argo.OUTPUTS_ANNOTATION] = None
    return annotations


def _metadata_patch(
    pod: Mapping[str, Any],
    *,
    labels: Mapping[str, str | None],
    annotations: Mapping[str, str | None],
) -> dict[str, Any]:
    metadata = pod.get("metadata")
    if not isinstance(metadata, Mapping):  # the skip patch is built on the error path too: take any shape
        metadata = {}
    changes: dict[str, Any] = {}
    for field, wanted in (("labels", labels), ("annotations", annotations)):
        current = metadata.get(field)
        change = _map_patch(current if isinstance(current, Mapping) else None, wanted)
        if change is not _UNCHANGED:
            changes[field] = change
    return {"metadata": changes} if changes else {}


class _Unchanged:
    """Marks "leave this field out of the patch", as opposed to None, "delete it"."""


_UNCHANGED = _Unchanged()


def _map_patch(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> Any:
    """The merge patch turning map `current` into `current` updated by `wanted` (None values delete).

    Deleting absent keys is left out; deleting every key deletes the map (no empty map is left behind).
    """
    current = current or {}
    changes = {name: value for name, value in wanted.items() if value is not None or name in current}
    if not changes:
        return _UNCHANGED
    if all(value is None for value in changes.values()) and set(changes) >= set(current):
        return None
    return changes


def _env(name: str, value: str) -> dict[str, str]:
    # The kubelet expands `$(VAR)` and turns `$$` into `$` in env values; doubling every `$` makes both inert.
    return {"name": name, "value": value.replace("$", "$$")}


def _replay_env(entry: model.CachedEntry) -> list[dict[str, str]]:
    return [_env(ENTRY_ID_ENV, str(entry.id)), _env(SOURCE_POD_ENV, entry.source_pod)]


def _pod_level_patch(spec: Mapping[str, Any], *, options: ReplayOptions) -> dict[str, Any]:
    """What goes at pod level on every hit: host namespaces, pod-level resources and DRA claims, node constraints."""
    dropped = [*_HOST_NAMESPACES, "resources", "resourceClaims"]
    if not options.keep_node_constraints:
        dropped += _NODE_CONSTRAINTS
    patch: dict[str, Any] = {field: None for field in dropped if field in spec}
    selector = spec.get("nodeSelector")
    if selector and not options.keep_node_constraints:
        kept = {name: value for name, value in selector.items() if name in _PLATFORM_SELECTORS}
        if kept != selector:
            patch["nodeSelector"] = _map_patch(selector, {name: None for name in selector if name not in kept})
    return patch


def _volumes_patch(spec: Mapping[str, Any], volumes: list[Mapping[str, Any]]) -> dict[str, Any]:
    if volumes == list(spec.get("volumes") or []):
        return {}
    return {"volumes": volumes or None}


def _plain_spec_patch(
    pod: Mapping[str, Any], *, entry: model.CachedEntry, options: ReplayOptions, volumes: list[Mapping[str, Any]]
) -> dict[str, Any]:
    spec = pod.get("spec") or {}
    patch: dict[str, Any] = {
        "containers": [
            _replay_container(container, entry=entry, cache_image=options.cache_image)
            for container in spec.get("containers") or []
        ]
    }
    if "initContainers" in spec:
        patch["initContainers"] = None
    patch.update(_volumes_patch(spec, volumes))
    security = _pod_security_patch(spec.get("securityContext"))
    if security is not _UNCHANGED:
        patch["securityContext"] = security
    return patch


def _kept_container(container: Mapping[str, Any], *, removed: set[Any]) -> dict[str, Any]:
    """A container that still runs on a hit (Argo's `init`, `wait`, sidecars): what it needs from the node goes."""
    kept = {field: value for field, value in container.items() if field not in _DROPPED_CONTAINER_FIELDS}
    for field in ("volumeMounts", "volumeDevices"):
        if field in kept:
            mounts = [mount for mount in kept[field] or [] if mount.get("name") not in removed]
            if mounts:
                kept[field] = mounts
            else:
                del kept[field]
    resources = kept.get("resources")
    if isinstance(resources, Mapping):
        kept["resources"] = {
            field: {name: value for name, value in (resources.get(field) or {}).items() if name in _NATIVE_RESOURCES}
            for field in ("requests", "limits")
            if field in resources
        }
    return kept


def _replay_container(container: Mapping[str, Any], *, entry: model.CachedEntry, cache_image: str) -> dict[str, Any]:
    name = container["name"]
    replay: dict[str, Any] = {
        "name": name,
        "image": cache_image,
        "command": ["sh", "-c", REPLAY_SCRIPT],
        "env": [
            _env(MESSAGE_ENV, entry.termination_messages.get(name, "")),
            _env(MESSAGE_PATH_ENV, container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH),
            *_replay_env(entry),
        ],
        "resources": {"requests": dict(_REPLAY_RESOURCES), "limits": dict(_REPLAY_RESOURCES)},
        "securityContext": _restricted_security_context(),
    }
    for field in ("terminationMessagePath", "terminationMessagePolicy"):
        if field in container:
            replay[field] = container[field]
    return replay


def _restricted_security_context() -> dict[str, Any]:
    # An explicit non-root user: the replay image's default user may be root (busybox), which runAsNonRoot refuses.
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": True,
    }


def _pod_security_patch(security: Mapping[str, Any] | None) -> Any:
    """Drop the pod-level fields that alone fail `restricted`, whatever the containers set.

    The replay containers set user, group and seccomp themselves and mount nothing, so they need none of these, and
    everything else at pod level (fsGroup, supplementalGroups, safe sysctls, ...) is left as the user wrote it.
    `restricted` rejects, at pod level: runAsNonRoot false, runAsUser 0, a seccomp or AppArmor profile other than
    RuntimeDefault/Localhost, SELinux options with a user, a role or an unlisted type, and unsafe sysctls.
    """
    if not security:
        return _UNCHANGED
    changes: dict[str, Any] = {}
    if security.get("runAsNonRoot") is False:
        changes["runAsNonRoot"] = None
    if security.get("runAsUser") == 0:
        changes["runAsUser"] = None
    for field in ("seccompProfile", "appArmorProfile"):
        if field in security and (security[field] or {}).get("type") not in _SAFE_PROFILE_TYPES:
            changes[field] = None
    selinux = security.get("seLinuxOptions")
    if "seLinuxOptions" in security and not _safe_selinux(selinux or {}):
        changes["seLinuxOptions"] = None
    sysctls = security.get("sysctls") or []
    safe = [sysctl for sysctl in sysctls if sysctl.get("name") in _SAFE_SYSCTLS]
    if len(safe) != len(sysctls):
        changes["sysctls"] = safe or None
    return _map_patch(security, changes)


def _safe_selinux(options: Mapping[str, Any]) -> bool:
    return options.get("type", "") in _SAFE_SELINUX_TYPES and not options.get("user") and not options.get("role")


def _argo_spec_patch(
    pod: Mapping[str, Any],
    tmpl: Mapping[str, Any],
    *,
    entry: model.CachedEntry,
    options: ReplayOptions,
    volumes: list[Mapping[str, Any]],
    removed: set[Any],
    sources: Mapping[str, artifacts.Source],
) -> dict[str, Any]:
    """`main` becomes the replay; Argo's `init` and `wait` (argoexec) still run, since `wait` reports the outputs
    and uploads the artifacts the replay writes back, under this workflow's own keys.

    They and any sidecar only lose what the module docstring lists, plus their mounts of removed volumes (`wait` and
    `init` mirror user volumes under /mainctrfs); user init containers go, as on a plain pod.
    """
    deliveries = []
    for declared, stored in artifacts.served(tmpl, entry.argo_outputs):
        source = sources.get(stored.sha256)
        if source is None:
            raise errors.Uncacheable(f"no way to deliver the blob of output artifact {declared.name!r}")
        deliveries.append(
            artifacts.Delivery(path=declared.path, archive=stored.archive, sha256=stored.sha256, source=source)
        )
    spec: Mapping[str, Any] = pod.get("spec") or {}
    containers: list[Mapping[str, Any]] = list(spec.get("containers") or [])
    index = next((i for i, c in enumerate(containers) if c.get("name") == argo.MAIN_CONTAINER), None)
    if index is None:
        raise errors.Uncacheable("the Argo pod has no main container")
    main = containers[index]
    command = list(main.get("command") or [])
    if "--" not in command:
        raise errors.Uncacheable("the Argo main container's command has no `--` (not an emissary pod)")
    prefix = command[: command.index("--") + 1]

    outputs = entry.argo_outputs or {}
    parameters: Mapping[str, Any] = outputs.get("parameters") or {}
    result = outputs.get("result")
    if result is None and _wants_result(main):
        raise errors.Uncacheable("the Argo node asks for `result`, but the cache entry has none")
    paths = argo.output_parameter_paths(tmpl)
    missing = sorted(name for name in paths if not isinstance(parameters.get(name), str))
    if missing:
        raise errors.Uncacheable(f"the cache entry lacks output parameters {', '.join(missing)}")

    env = [*(main.get("env") or [])]
    script = [_ARGO_SCRIPT_HEAD]
    for position, (name, path) in enumerate(paths.items()):
        env += [_env(PARAM_PATH_ENV.format(position), path), _env(PARAM_VALUE_ENV.format(position), parameters[name])]
        script.append(f'w "${PARAM_PATH_ENV.format(position)}" "${PARAM_VALUE_ENV.format(position)}"\n')
    # After the parameters: KFP v1 declares a parameter and an artifact at one path, and the artifact's bytes are
    # the step's own (the parameter read back from them is the same value).
    artifact_script, artifact_env = artifacts.replay_lines(deliveries)
    script.append(artifact_script)
    env += [_env(name, value) for name, value in artifact_env]
    if isinstance(result, str):
        env.append(_env(RESULT_ENV, result))
        script.append(_ARGO_SCRIPT_RESULT)
    env += _replay_env(entry)
    script.append(_ARGO_SCRIPT_TAIL)

    # The replay writes what the step wrote, where it wrote it, as a non-root user on a read-only root: each
    # parameter's directory must be on a writable volume, so directories on the root get emptyDirs of their own.
    replay = _kept_container(main, removed=removed)
    for field in ("args", "workingDir", "volumeDevices"):
        replay.pop(field, None)
    mounts = list(replay.get("volumeMounts") or [])
    added = _output_volumes([*paths.values(), *(d.path for d in deliveries)], mounts=mounts, volumes=volumes)
    mounts += [{"name": volume["name"], "mountPath": path} for path, volume in added]
    replay.update(
        image=options.cache_image,
        command=[*prefix, "sh", "-c", "".join(script)],
        env=env,
        resources={"requests": dict(_REPLAY_RESOURCES), "limits": dict(_REPLAY_RESOURCES)},
        securityContext=_restricted_security_context(),
    )
    if mounts:
        replay["volumeMounts"] = mounts

    patch: dict[str, Any] = {
        "containers": [
            replay if i == index else _kept_container(container, removed=removed)
            for i, container in enumerate(containers)
        ]
    }
    if "initContainers" in spec:
        init = [
            _kept_container(container, removed=removed)
            for container in spec.get("initContainers") or []
            if container.get("name") == _ARGO_INIT
        ]
        if init != spec["initContainers"]:
            patch["initContainers"] = init or None
    patch.update(_volumes_patch(spec, [*volumes, *(volume for _, volume in added)]))
    return patch


def _output_volumes(
    paths: Iterable[str], *, mounts: list[Mapping[str, Any]], volumes: list[Mapping[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """(mount path, emptyDir volume) for each directory the replay must write in and no volume covers yet.

    A directory under a writable emptyDir mount is covered; one under any other mount (read-only, a configMap...)
    cannot be written, so the pod is not replayable. The rest get one emptyDir each at the outermost such
    directory (the script creates the ones below it), never at `/`.
    """
    writable = {volume.get("name") for volume in volumes if "emptyDir" in volume}
    needed: set[str] = set()
    for path in paths:
        if not path.startswith("/"):
            raise errors.Uncacheable(f"output path {path!r} is not absolute")
        directory = posixpath.dirname(posixpath.normpath(path))
        mount = _covering_mount(directory, mounts)
        if mount is None:
            if directory == "/":
                raise errors.Uncacheable(f"output path {path!r} is in /, which a replay cannot write")
            needed.add(directory)
        elif mount.get("name") not in writable or mount.get("readOnly"):
            raise errors.Uncacheable(f"output path {path!r} is on a volume the replay cannot write")
    outermost: list[str] = []
    for directory in sorted(needed, key=lambda d: (d.count("/"), d)):
        if not any(_is_within(directory, chosen) for chosen in outermost):
            outermost.append(directory)
    taken = {volume.get("name") for volume in volumes}
    names = (name for name in map(_OUTPUT_VOLUME.format, itertools.count()) if name not in taken)
    return [(directory, {"name": next(names), "emptyDir": {}}) for directory in outermost]


def _covering_mount(directory: str, mounts: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The mount whose path is the longest prefix of `directory`, if any."""
    covering = [m for m in mounts if _is_within(directory, posixpath.normpath(str(m.get("mountPath") or "")))]
    return max(covering, key=lambda m: len(posixpath.normpath(str(m.get("mountPath")))), default=None)


def _is_within(path: str, directory: str) -> bool:
    return directory.startswith("/") and (path == directory or path.startswith(directory.rstrip("/") + "/"))


def _wants_result(main: Mapping[str, Any]) -> bool:
    """Argo sets ARGO_INCLUDE_SCRIPT_OUTPUT=true when something downstream reads this node's `result`."""
    return any(
        var.get("name") == "ARGO_INCLUDE_SCRIPT_OUTPUT" and var.get("value") == "true" for var in main.get("env") or []
    )
