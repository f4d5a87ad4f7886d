"""The exclusion list is the only place that decides what the key leaves out.

For realistic pods (a Job's, Argo 3.5, 3.6 and 4.0 steps, a KFP v1 step, and a pod reading through the downward API),
changing any one leaf of the pod spec (a string, a number, a bool), or adding a field nobody has heard of anywhere in
it, must change the key - or make the pod uncacheable - unless the changed path is covered by `keys.EXCLUSIONS`. The
list is matched here by this file's own reading of its documented path syntax and conditions, not by the code's.

Deterministic: every leaf is tried in document order, and hypothesis runs derandomized; so a run under any
PYTHONHASHSEED tries the same changes (the key must not depend on the seed either).
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepcache import argo, errors, keys, references

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"
UNKNOWN = "zzUnknownField"

Path = tuple[str | int, ...]


def load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((FIXTURES / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def reading_pod() -> dict[str, Any]:
    """tests/fixtures/keys/pod.yaml, also reading a label and a resource through the downward API, declaring a volume
    nobody mounts, and setting what the other pods leave to defaults (pod-level resources, overhead, pull secrets,
    a resize policy)."""
    pod = load("keys/pod.yaml")
    spec = pod["spec"]
    main = spec["containers"][0]
    main["env"].append({"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}})
    main["env"].append({"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}})
    main["resizePolicy"] = [{"resourceName": "memory", "restartPolicy": "RestartContainer"}]
    spec["volumes"].append({"name": "unused", "configMap": {"name": "something-else", "defaultMode": 420}})
    spec["resources"] = {"limits": {"cpu": "2", "memory": "2Gi"}}
    spec["overhead"] = {"cpu": "250m"}
    spec["imagePullSecrets"] = [{"name": "registry-creds"}]
    return pod


PODS: dict[str, Callable[[], dict[str, Any]]] = {
    "job": lambda: load("pods/job-pod.yaml"),
    "argo-3.5": lambda: load("keys/argo-3.5-pod.yaml"),
    "argo-3.6": lambda: load("pods/argo-3.6-pod.yaml"),
    "argo-4.0": lambda: load("keys/argo-4.0-pod.yaml"),
    "kfp-v1": lambda: load("pods/kfp-v1-pod.yaml"),
    "downward": reading_pod,
}


def view() -> references.ReferenceView:
    known = references.ReferenceView()
    for namespace in ("team-a", "pipelines", "kubeflow-user", "ml"):
        known.put_configmap(namespace, "kube-root-ca.crt", data={"ca.crt": "---CA---"}, binary_data=None)
    known.put_configmap("team-a", "train-config", data={"epochs": "10"}, binary_data=None)
    known.put_configmap("ml", "train-env", data={"LOG_LEVEL": "info"}, binary_data=None)
    known.put_configmap("ml", "train-settings", data={"fast.yaml": "epochs: 3\n"}, binary_data=None)
    known.put_secret("ml", "creds", data={"token": base64.b64encode(b"t").decode()}, hmac_key=b"k" * 32)
    return known


VIEW = view()


def key_or_none(pod: Mapping[str, Any]) -> str | None:
    """The key, or None when the pod cannot be cached (which shares no key with anything)."""
    try:
        return keys.compute(
            pod, namespace=pod["metadata"]["namespace"], options=keys.KeyOptions(), references=VIEW
        ).value
    except errors.Uncacheable:
        return None


# --- this file's reading of the exclusion list -----------------------------------------------------------------------


def pattern_steps(pattern: str) -> list[tuple[list[str], int]]:
    """`a.{b,c}[*].d` → [(["a"], 0), (["b", "c"], 1), (["d"], 0)], per `keys.Exclusion.path`'s documentation."""
    steps = []
    for segment in pattern.split("."):
        lists = 0
        while segment.endswith("[*]"):
            segment, lists = segment[:-3], lists + 1
        names = segment[1:-1].split(",") if segment.startswith("{") else [segment]
        steps.append((names, lists))
    return steps


def under(pattern: str, path: Path) -> bool:
    """The path is the pattern's, or below it."""
    position = 0
    for names, lists in pattern_steps(pattern):
        if position >= len(path) or not isinstance(path[position], str):
            return False
        if not any(fnmatch.fnmatchcase(str(path[position]), name) for name in names):
            return False
        position += 1
        for _ in range(lists):
            if position >= len(path) or not isinstance(path[position], int):
                return False
            position += 1
    return True


def is_argo_pod(pod: Mapping[str, Any]) -> bool:
    annotations = pod["metadata"].get("annotations") or {}
    return "workflows.argoproj.io/template" in annotations or any(
        var.get("name") == "ARGO_TEMPLATE" for c in containers(pod) for var in c.get("env") or []
    )


def containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = pod["spec"]
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def env_entry(pod: Mapping[str, Any], path: Path) -> Mapping[str, Any] | None:
    if len(path) < 5 or path[3] != "env":
        return None
    try:
        entry = pod["spec"][path[1]][path[2]]["env"][path[4]]
    except (KeyError, IndexError, TypeError):
        return None
    return entry if isinstance(entry, Mapping) else None


def ignored_names(pod: Mapping[str, Any]) -> set[str]:
    raw = (pod["metadata"].get("annotations") or {}).get("stepcache.dev/ignore-env") or ""
    return {name.strip() for name in raw.split(",") if name.strip()}


def mounted(pod: Mapping[str, Any]) -> set[Any]:
    spec = pod["spec"]
    every = [*containers(pod), *(spec.get("ephemeralContainers") or [])]
    return {m.get("name") for c in every for m in [*(c.get("volumeMounts") or []), *(c.get("volumeDevices") or [])]}


def token_shaped(volume: Any) -> bool:
    """The token volume as CONDITIONS["token-volume"] describes it."""
    if not isinstance(volume, Mapping) or set(volume) != {"name", "projected"}:
        return False
    projected = volume["projected"]
    if not isinstance(projected, Mapping) or not set(projected) <= {"sources", "defaultMode"}:
        return False
    sources = projected.get("sources") or []
    kinds = []
    for source in sources:
        if not isinstance(source, Mapping) or len(source) != 1:
            return False
        [(kind, body)] = source.items()
        kinds.append(kind)
        if kind == "configMap":
            items = body.get("items") or []
            if not set(body) <= {"name", "items", "optional"} or body.get("name") != "kube-root-ca.crt" or not items:
                return False
            if not all(set(i) <= {"key", "path", "mode"} and i.get("key") == "ca.crt" for i in items):
                return False
        elif kind == "downwardAPI":
            items = body.get("items") or []
            if not set(body) <= {"items"} or not items:
                return False
            for item in items:
                ref = item.get("fieldRef")
                if not set(item) <= {"path", "fieldRef", "mode"} or not isinstance(ref, Mapping):
                    return False
                if not set(ref) <= {"fieldPath", "apiVersion"} or ref.get("fieldPath") != "metadata.namespace":
                    return False
                if ref.get("apiVersion", "v1") != "v1":
                    return False
        elif kind != "serviceAccountToken":
            return False
    return "serviceAccountToken" in kinds


def volume_at(pod: Mapping[str, Any], path: Path) -> Any:
    if len(path) < 3 or path[:2] != ("spec", "volumes"):
        return None
    volumes = pod["spec"].get("volumes") or []
    index = path[2]
    return volumes[index] if isinstance(index, int) and index < len(volumes) else None


def mount_of_token(pod: Mapping[str, Any], path: Path) -> bool:
    if len(path) < 5 or path[3] != "volumeMounts":
        return False
    mount = pod["spec"][path[1]][path[2]]["volumeMounts"][path[4]]
    if not isinstance(mount, Mapping):
        return False
    return any(token_shaped(v) and v.get("name") == mount.get("name") for v in pod["spec"].get("volumes") or [])


def token_mounts(pod: Mapping[str, Any]) -> set[Path]:
    spec = pod["spec"]
    return {
        ("spec", kind, i, "volumeMounts", m)
        for kind in ("initContainers", "containers")
        for i, c in enumerate(spec.get(kind) or [])
        for m in range(len(c.get("volumeMounts") or []))
        if mount_of_token(pod, ("spec", kind, i, "volumeMounts", m))
    }


def read_through_downward_api(pod: Mapping[str, Any], path: Path) -> bool:
    """A container resource some container reads with `resourceFieldRef` (keyed where it is read)."""
    if len(path) < 6 or path[3] != "resources" or path[4] not in ("limits", "requests"):
        return False
    owner = pod["spec"][path[1]][path[2]].get("name")
    wanted = f"{path[4]}.{path[5]}"
    for c in containers(pod):
        for var in c.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("resourceFieldRef") or {}
            if ref.get("resource") == wanted and (ref.get("containerName") or c.get("name")) == owner:
                return True
    return False


def condition_holds(when: str, path: Path, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether a conditional exclusion applies to a change at `path`, before and after it."""
    if when == "always":
        return not read_through_downward_api(before, path)
    if when == "unless-key-service-account":
        return True  # the default KeyOptions
    if when == "ignored-env":
        names = [(env_entry(pod, path) or {}).get("name") for pod in (before, after)]
        return all(name in ignored_names(before) for name in names)
    if when == "argo-per-run-env":
        names = [(env_entry(pod, path) or {}).get("name") for pod in (before, after)]
        per_run = argo.PER_RUN_ENV | {argo.TEMPLATE_ENV}
        if names[0] == argo.TEMPLATE_ENV and path[5:6] == ("value",):
            return False  # the template is read: its inputs, outputs and source are keyed as `argo`
        return is_argo_pod(before) and is_argo_pod(after) and all(name in per_run for name in names)
    if when == "unmounted-volume":
        for pod in (before, after):
            volume = volume_at(pod, path)
            if not isinstance(volume, Mapping) or volume.get("name") in mounted(pod):
                return False
        return True
    if when in ("token-volume", "token-volume-mount"):
        # Renaming the volume would also change which mounts are its own, and those are keyed once they are not.
        if token_mounts(before) != token_mounts(after):
            return False
        if when == "token-volume":
            return all(token_shaped(volume_at(pod, path)) for pod in (before, after))
        return all(mount_of_token(pod, path) for pod in (before, after))
    raise AssertionError(f"this test does not know condition {when!r}: teach it")


def excluded(path: Path, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    return any(
        under(exclusion.path, path) and condition_holds(exclusion.when, path, before, after)
        for exclusion in keys.EXCLUSIONS
    )


# --- changes ---------------------------------------------------------------------------------------------------------


def leaves(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    if isinstance(value, dict):
        for field, item in value.items():
            yield from leaves(item, (*path, field))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))
    elif value is not None:
        yield path, value


def objects(value: Any, path: Path = ()) -> Iterator[Path]:
    if isinstance(value, dict):
        yield path
        for field, item in value.items():
            yield from objects(item, (*path, field))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from objects(item, (*path, index))


def changed(value: Any, *, suffix: str, step: int) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + step
    return f"{value}{suffix}"


def with_value(pod: Mapping[str, Any], path: Path, value: Any) -> dict[str, Any]:
    copied = copy.deepcopy(dict(pod))
    target: Any = copied
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copied


def spec_leaves(pod: Mapping[str, Any]) -> list[tuple[Path, Any]]:
    return list(leaves(pod["spec"], ("spec",)))


def spec_objects(pod: Mapping[str, Any]) -> list[Path]:
    return list(objects(pod["spec"], ("spec",)))


def violation(before: Mapping[str, Any], after: Mapping[str, Any], path: Path, key: str | None) -> str | None:
    """Why this change breaks the rule, or None when it keeps it."""
    changed_key = key_or_none(after)
    if excluded(path, before, after):
        return None if changed_key == key else f"{path}: excluded, but the key changed"
    return f"{path}: not excluded, but the key stayed" if changed_key == key else None


# --- tests -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PODS)
def test_the_pods_are_cacheable_to_begin_with(name: str) -> None:
    assert key_or_none(PODS[name]()) is not None


@pytest.mark.parametrize("name", PODS)
def test_every_leaf_changes_the_key_unless_the_exclusion_list_covers_it(name: str) -> None:
    pod = PODS[name]()
    key = key_or_none(pod)
    problems = []
    for path, value in spec_leaves(pod):
        after = with_value(pod, path, changed(value, suffix="-x", step=1))
        if (problem := violation(pod, after, path, key)) is not None:
            problems.append(problem)
    assert problems == []


@pytest.mark.parametrize("name", PODS)
def test_a_field_added_anywhere_changes_the_key_unless_the_exclusion_list_covers_it(name: str) -> None:
    pod = PODS[name]()
    key = key_or_none(pod)
    problems = []
    for path in spec_objects(pod):
        after = copy.deepcopy(pod)
        target: Any = after
        for step in path:
            target = target[step]
        target[UNKNOWN] = "x"
        if (problem := violation(pod, after, (*path, UNKNOWN), key)) is not None:
            problems.append(problem)
    assert problems == []


def test_the_exclusion_list_is_exercised_by_these_pods() -> None:
    """Each entry of the list about the spec covers a leaf of these pods that it leaves out, so that none of them is
    tested vacuously."""
    unused = []
    for exclusion in keys.EXCLUSIONS:
        if not exclusion.path.startswith("spec"):
            continue  # metadata, status, apiVersion and kind: the material never reads them
        covers = (
            under(exclusion.path, path) and condition_holds(exclusion.when, path, pod, pod)
            for pod in (make() for make in PODS.values())
            for path, _ in spec_leaves(pod)
        )
        if not any(covers):
            unused.append(f"{exclusion.path} ({exclusion.when})")
    assert unused == []


@settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_change_to_any_leaf_keeps_the_rule(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(PODS)))
    pod = PODS[name]()
    path, value = data.draw(st.sampled_from(spec_leaves(pod)))
    suffix = data.draw(st.text(min_size=1, max_size=12))
    step = data.draw(st.integers(min_value=1, max_value=10**6))
    after = with_value(pod, path, changed(value, suffix=suffix, step=step))
    assert violation(pod, after, path, key_or_none(pod)) is None


@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(data=st.data())
def test_any_unknown_field_anywhere_keeps_the_rule(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(PODS)))
    pod = PODS[name]()
    path = data.draw(st.sampled_from(spec_objects(pod)))
    field = "zz" + data.draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyzXYZ", min_size=3, max_size=16))
    value = data.draw(
        st.one_of(
            st.text(min_size=1, max_size=10),
            st.integers(min_value=1),
            st.just(True),
            st.dictionaries(st.text(min_size=1, max_size=5), st.text(min_size=1, max_size=5), min_size=1, max_size=3),
        )
    )
    after = copy.deepcopy(pod)
    target: Any = after
    for step in path:
        target = target[step]
    target[field] = value
    assert violation(pod, after, (*path, field), key_or_none(pod)) is None
