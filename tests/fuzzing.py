"""What the fuzz tests share: realistic pods, the mutations they undergo, the properties every answer keeps.

The pods are the fixtures a real cluster produces (a Job's pod, Argo 3.5, 3.6 and 4.0 steps, an Argo step with
output artifacts, a KFP v1 step, pods reading through the downward API), each put through a few random mutations:
a value replaced by one of another type, a field deleted or added (known names too, so wrong types land where the
code reads), a list element duplicated, stepcache's own names forged, the Argo template (JSON inside a string, which
nobody validates) mutated the same way or replaced by garbage, huge and deeply nested values, any Unicode.

The example budget: `FUZZ_EXAMPLES` (default 10,000, shared by the fuzz tests in CI) and `make fuzz` (1,000,000).
A CI run is derandomized, so it tries the same examples every time and never fails for a reason the last run did
not have; a longer run is random, so every run explores further.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from stepcache import argo, keys, mutation, references, signing

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CI_EXAMPLES = 10_000
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", str(CI_EXAMPLES)))
"""Examples shared by all fuzz tests in this run."""
NAMESPACES = ("team-a", "pipelines", "kubeflow-user", "ml")
PREFIX = "stepcache: "
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def fuzz_settings(share: float, *, deadline_seconds: float) -> settings:
    """Settings for a fuzz test that runs `share` of the budget, each example within `deadline_seconds`.

    The deadline is the per-call time bound: generous (a shared machine pauses now and then), far below a hang.
    """
    return settings(
        max_examples=max(1, round(FUZZ_EXAMPLES * share)),
        deadline=datetime.timedelta(seconds=deadline_seconds),
        derandomize=FUZZ_EXAMPLES <= CI_EXAMPLES,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
            HealthCheck.large_base_example,
        ],
    )


def clone(value: Any) -> Any:
    """A deep copy of a JSON value; several times faster than `copy.deepcopy`, which dominated the examples' time."""
    return json.loads(json.dumps(value))


def depth(value: Any) -> int:
    """Arrays and objects inside each other, the outermost counted (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def timeout(share: float) -> pytest.MarkDecorator:
    """The pytest timeout (a hang guard) for a fuzz test running `share` of the budget: 50 ms an example at least."""
    return pytest.mark.timeout(max(300, round(FUZZ_EXAMPLES * share * 0.05)))


# --- realistic pods --------------------------------------------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((FIXTURES / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def set_template(pod: dict[str, Any], raw: str) -> None:
    """Put `raw` wherever the pod carries its Argo template (env `ARGO_TEMPLATE` of any container, the annotation)."""
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for var in container.get("env") or []:
            if var.get("name") == argo.TEMPLATE_ENV:
                var["value"] = raw
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if argo.TEMPLATE_ANNOTATION in annotations:
        annotations[argo.TEMPLATE_ANNOTATION] = raw


def _artifact_pod() -> dict[str, Any]:
    """The Argo 3.6 step declaring output artifacts too (tar, none, and an optional one)."""
    pod = load("pods/argo-3.6-pod.yaml")
    tmpl = argo.template(pod)
    assert tmpl is not None
    tmpl["outputs"]["artifacts"] = [
        {"name": "data", "path": "/tmp/out/data.txt"},
        {"name": "raw", "path": "/tmp/raw.bin", "archive": {"none": {}}},
        {"name": "never", "path": "/tmp/never", "optional": True},
    ]
    set_template(pod, json.dumps(tmpl))
    return pod


def _downward_pod() -> dict[str, Any]:
    """tests/fixtures/keys/pod.yaml, also reading a label and a resource through the downward API."""
    pod = load("keys/pod.yaml")
    main = pod["spec"]["containers"][0]
    main["env"].append({"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}})
    main["env"].append({"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}})
    return pod


PODS: dict[str, dict[str, Any]] = {
    "job": load("pods/job-pod.yaml"),
    "argo-3.5": load("keys/argo-3.5-pod.yaml"),
    "argo-3.6": load("pods/argo-3.6-pod.yaml"),
    "argo-3.6-artifacts": _artifact_pod(),
    "argo-4.0": load("keys/argo-4.0-pod.yaml"),
    "argo-offloaded": load("keys/argo-offloaded-4.0.yaml"),
    "argo-tags": load("keys/argo-tags.yaml"),
    "kfp-v1": load("pods/kfp-v1-pod.yaml"),
    "downward": _downward_pod(),
    "tags": load("keys/tags.yaml"),
}


def reference_view() -> references.ReferenceView:
    """What the operator's view knows of the ConfigMaps and Secrets the fixture pods read."""
    known = references.ReferenceView()
    for namespace in NAMESPACES:
        known.put_configmap(namespace, "kube-root-ca.crt", data={"ca.crt": "---CA---"}, binary_data=None)
    known.put_configmap("team-a", "train-config", data={"epochs": "10"}, binary_data=None)
    known.put_configmap("ml", "train-env", data={"LOG_LEVEL": "info"}, binary_data=None)
    known.put_configmap("ml", "train-settings", data={"fast.yaml": "epochs: 3\n"}, binary_data=None)
    return known


def _field_names(value: Any, into: set[str]) -> set[str]:
    if isinstance(value, Mapping):
        for name, item in value.items():
            into.add(name)
            _field_names(item, into)
    elif isinstance(value, list):
        for item in value:
            _field_names(item, into)
    return into


def _template_field_names() -> set[str]:
    names: set[str] = set()
    for pod in PODS.values():
        try:
            tmpl = argo.template(pod)
        except Exception:
            continue
        _field_names(tmpl, names)
    return names


# fmt: off
_MORE_FIELDS = [
    "valueFrom", "fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef", "envFrom", "configMapRef",
    "secretRef", "projected", "sources", "downwardAPI", "items", "serviceAccountToken", "emptyDir", "hostPath",
    "persistentVolumeClaim", "securityContext", "sysctls", "seccompProfile", "appArmorProfile", "seLinuxOptions",
    "nodeSelector", "volumeDevices", "ephemeralContainers", "resourceClaims", "claims", "lifecycle", "livenessProbe",
    "restartPolicy", "runAsUser", "runAsNonRoot", "artifacts", "parameters", "outputs", "inputs", "script",
    "container", "archive", "archiveLocation", "s3", "key", "bucket", "endpoint", "path", "optional", "none", "tar",
    "zip", "result", "source", "containerName", "resource", "divisor", "fieldPath", "ownerReferences", "generateName",
    "namespace", "labels", "annotations", "metadata", "spec", "status",
]
# fmt: on
FIELD_NAMES = sorted(_field_names(list(PODS.values()), set()) | _template_field_names() | set(_MORE_FIELDS))
"""Names that exist somewhere in a pod or a template: an added field lands where code reads, not only beside it."""

# fmt: off
INTERESTING = [
    "", " ", "\x00", "a\x00b", "true", "false", "True", "Always", "Never", "OnFailure", "--", "-", "/", "//", "/tmp",
    "/tmp/outputs/length", "relative/path", "main", "init", "wait", "train", "P0D", "PT0S", "P7D", "P1Y2M", "-P1D",
    "P99999999999D", "P8000Y", "P1.5Y", "PT1e10S", "$(VAR)", "$$(VAR)", "$", "a\nb", "\r\n", "🙂", "\u2028", "é",
    "漢字", "\ufeff", "\t", "\\", '"', "'", "`id`", "; rm -rf /", "{{inputs.parameters.x}}", "metadata.name",
    "metadata.labels['team']", "metadata.annotations['x']", "metadata.labels", "requests.cpu", "limits.memory",
    "kube-root-ca.crt", "ca.crt", "offloaded", "ARGO_TEMPLATE", "ARGO_TEMPLATE_OFFLOADED", "ARGO_CONTAINER_ARGS_FILE",
    "ARGO_INCLUDE_SCRIPT_OUTPUT", "RuntimeDefault", "Unconfined", "busybox:1.36", "busybox@sha256:" + "a" * 64,
    "0" * 64, "x" * 300, "{}", "[]", '{"a": 1}', "null", "1e999", "-0", "0x10", "1_000",
]
# fmt: on
"""Strings that steer code: durations, paths, container names Argo uses, downward-API paths, shell metacharacters."""

TEXT = st.text(max_size=20) | st.sampled_from(INTERESTING)
"""Any Unicode (hypothesis leaves out lone surrogates, which no API server sends and the webhook refuses)."""
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
KEYS = st.sampled_from(FIELD_NAMES) | TEXT
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=8,
)


def nested(depth: int, *, leaf: Any = "x") -> Any:
    value: Any = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


@functools.cache
def values(*, max_depth: int, max_size: int) -> st.SearchStrategy[Any]:
    """A value to put anywhere: any JSON, or a huge string, or deep nesting, within the given bounds."""
    return (
        JSON
        | st.integers(min_value=0, max_value=max_size).map(lambda n: "h" * n)
        | st.integers(min_value=0, max_value=max_depth).map(nested)
    )


# --- mutations -------------------------------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def nodes(value: Any) -> list[tuple[Path, Any]]:
    """Every (path, value) inside a JSON value, the root's own included; one walk, no recursion."""
    found: list[tuple[Path, Any]] = []
    stack: list[tuple[Path, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        found.append((path, item))
        if isinstance(item, dict):
            stack.extend(((*path, name), child) for name, child in item.items())
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in enumerate(item))
    return found


def at(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated(draw: st.DrawFn, value: Any, *, max_depth: int, max_size: int, rounds: int = 4) -> Any:
    """`value` after up to `rounds` structural mutations (in place where it can: pass a copy)."""
    for _ in range(draw(st.integers(min_value=0, max_value=rounds))):
        kind = draw(st.sampled_from(["replace", "delete", "insert", "append"]))
        found = nodes(value)
        if kind == "replace":
            path = draw(st.sampled_from(found))[0]
            replacement = draw(values(max_depth=max_depth, max_size=max_size))
            if not path:
                return replacement
            at(value, path[:-1])[path[-1]] = replacement
        elif kind == "delete":
            if len(found) > 1:
                path = draw(st.sampled_from(found[1:]))[0]
                del at(value, path[:-1])[path[-1]]
        elif kind == "insert":
            objects = [node for _, node in found if isinstance(node, dict)]
            if objects:
                draw(st.sampled_from(objects))[draw(KEYS)] = draw(values(max_depth=max_depth, max_size=max_size))
        else:
            lists = [node for _, node in found if isinstance(node, list)]
            if lists:
                target = draw(st.sampled_from(lists))
                copied = st.sampled_from(target).map(clone) if target else st.nothing()
                target.append(draw(copied | values(max_depth=max_depth, max_size=max_size)))
    return value


OWN_LABEL_VALUES = st.sampled_from(["", "true", "false", "1", "42", "x"]) | TEXT
DURATIONS = st.sampled_from(["P0D", "PT0S", "P7D", "P1Y2M", "-P1D", "P99999999999D", "P8000Y", "P1.5Y", "xyz", ""]) | (
    st.integers(min_value=0, max_value=10**30).map(lambda n: f"P{n}D")
)


@st.composite
def forged_names(draw: st.DrawFn, pod: dict[str, Any]) -> dict[str, Any]:
    """The pod with some of stepcache's (and KFP's) labels and annotations set as a user might, or an attacker."""
    metadata = pod.setdefault("metadata", {}) if isinstance(pod, dict) else {}
    if not isinstance(metadata, dict):
        return pod
    labels = metadata.setdefault("labels", {})
    annotations = metadata.setdefault("annotations", {})
    if not isinstance(labels, dict) or not isinstance(annotations, dict):
        return pod
    for name in draw(st.sets(st.sampled_from([*mutation.OWNED_LABELS, mutation.KFP_REUSED, keys.ENABLED_LABEL]))):
        labels[name] = draw(OWN_LABEL_VALUES)
    for name in draw(st.sets(st.sampled_from([mutation.KEY, mutation.KEY_CONTAINERS, mutation.KEY_SIGNATURE]))):
        annotations[name] = draw(st.sampled_from(["0" * 64, "main", "train,report"]) | TEXT)
    for name in draw(
        st.sets(st.sampled_from(["stepcache.dev/max-staleness", "pipelines.kubeflow.org/max_cache_staleness"]))
    ):
        annotations[name] = draw(DURATIONS)
    if draw(st.booleans()):
        annotations[keys.IGNORE_ENV_ANNOTATION] = draw(st.sampled_from(["RUN_ID", "A,B", ",", " "]) | TEXT)
    if draw(st.booleans()):
        annotations[keys.VERSION_ANNOTATION] = draw(TEXT)
    for name in draw(
        st.sets(st.sampled_from([keys.KFP_CACHE_ENABLED, keys.KFP_ENABLE_CACHING, keys.KFP_V2_COMPONENT]))
    ):
        labels[name] = draw(st.sampled_from(["true", "false", "TRUE", " False "]))
    return pod


@st.composite
def template_mutated(draw: st.DrawFn, pod: dict[str, Any], *, max_depth: int, max_size: int) -> dict[str, Any]:
    """The pod with its Argo template (if it has one) mutated as JSON, or replaced by text that is not one."""
    try:
        tmpl = argo.template(pod)
    except Exception:
        tmpl = None
    if tmpl is None:
        return pod
    raw = draw(
        mutated(clone(tmpl), max_depth=max_depth, max_size=max_size).map(json.dumps)
        | st.integers(min_value=0, max_value=3 * argo.MAX_TEMPLATE_DEPTH).map(
            lambda n: json.dumps({"inputs": nested(n), "container": {}})
        )
        | st.sampled_from(
            ["", "{", "[]", "null", "1", "NaN", '{"outputs": NaN}', "offloaded", '{"a": ' + "1" * 5000 + "}"]
        )
        | st.integers(min_value=1, max_value=100_000).map(lambda n: "[" * n)
        | TEXT
    )
    if draw(st.booleans()):
        set_template(pod, raw)
    else:  # one copy only: the copies then differ
        spec = pod.get("spec") or {}
        for container in spec.get("containers") or []:
            for var in container.get("env") or []:
                if var.get("name") == argo.TEMPLATE_ENV:
                    var["value"] = raw
                    return pod
        set_template(pod, raw)
    return pod


def pods(*, max_depth: int, max_size: int) -> st.SearchStrategy[dict[str, Any]]:
    """Realistic pods, mutated: most changes small, some anywhere; values within the given depth and size."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        pod = clone(PODS[draw(st.sampled_from(sorted(PODS)))])
        if draw(st.booleans()):
            pod = draw(template_mutated(pod, max_depth=max_depth, max_size=max_size))
        if draw(st.booleans()):
            pod = draw(forged_names(pod))
        if draw(st.integers(min_value=0, max_value=3)):
            pod = draw(mutated(pod, max_depth=max_depth, max_size=max_size))
        if not isinstance(pod, dict):
            pod = {"metadata": pod}
        return pod

    return build()


# --- properties ------------------------------------------------------------------------------------------------------


def check_warnings(warnings: Any) -> None:
    assert isinstance(warnings, list | tuple)
    for warning in warnings:
        assert isinstance(warning, str), warning
        assert warning.startswith(PREFIX), warning
        assert "internal error" not in warning, warning


def container_names(pod: Mapping[str, Any]) -> list[Any] | None:
    """The containers' names, when the pod has a list of containers (else None: nothing to keep)."""
    spec = pod.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("containers"), list):
        return None
    return [c.get("name") if isinstance(c, Mapping) else c for c in spec["containers"]]


def without_stepcache_names(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod without stepcache's own labels and annotations (nor Argo's outputs annotation, which a miss removes
    from an Argo pod), and without the maps that leaves empty."""
    result = clone(pod)
    metadata = result.get("metadata")
    if not isinstance(metadata, dict):
        return result
    owned = {"labels": mutation.OWNED_LABELS, "annotations": (*mutation.OWNED_ANNOTATIONS, argo.OUTPUTS_ANNOTATION)}
    for field, names in owned.items():
        values = metadata.get(field)
        if isinstance(values, dict):
            for name in names:
                values.pop(name, None)
        if field in metadata and not values:  # empty, or null (which is absent too)
            del metadata[field]
    return result


def check_admitted(
    before: Mapping[str, Any], after: Any, *, outcome: str, signing_key: bytes, entry_id: int | None = None
) -> None:
    """The pod the API server would store (`after`, the patch applied to `before`) is a valid pod, and stepcache's
    names on it are exactly what stepcache writes for this outcome."""
    json.dumps(after, allow_nan=False)  # JSON the API server can take
    assert isinstance(after, dict)
    assert container_names(after) == container_names(before)
    metadata = after.get("metadata") if isinstance(after.get("metadata"), Mapping) else {}
    labels = metadata.get("labels") if isinstance(metadata.get("labels"), Mapping) else {}
    annotations = metadata.get("annotations") if isinstance(metadata.get("annotations"), Mapping) else {}
    if outcome != "hit":
        # Only stepcache's names change (and a hit's containers): everything else stays as the user wrote it.
        assert without_stepcache_names(after) == without_stepcache_names(before)
    if outcome in ("skip", "uncacheable"):
        assert not set(labels) & set(mutation.OWNED_LABELS), labels
        assert not set(annotations) & set(mutation.OWNED_ANNOTATIONS), annotations
        return
    assert outcome in ("miss", "hit"), outcome
    spec = before["spec"]
    keyed = [c["name"] for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]]
    assert HEX64.match(annotations[mutation.KEY])
    assert annotations[mutation.KEY_CONTAINERS] == ",".join(keyed)
    assert signing.verify(
        signing_key,
        namespace=metadata["namespace"],
        key=annotations[mutation.KEY],
        key_containers=annotations[mutation.KEY_CONTAINERS],
        signature=annotations[mutation.KEY_SIGNATURE],
    )
    if outcome == "miss":
        assert labels[mutation.CACHE_ID] == ""
        assert mutation.HIT not in labels
    else:
        assert entry_id is not None
        assert labels[mutation.CACHE_ID] == str(entry_id)
        assert labels[mutation.HIT] == "true"


def expect(condition: bool, describe: Callable[[], str]) -> None:
    """`assert condition, describe()` without building the message when it holds."""
    if not condition:
        raise AssertionError(describe())
