"""`patches.json_patch`: the JSON patch the API server receives, built from a merge patch's own paths.

The ops are applied in order with jsonpatch, as kube-apiserver applies them, and the object they give must be the
one RFC 7386 describes (`mutation.apply_merge_patch`, checked on the RFC's own examples in test_mutation.py) —
compared as JSON text, since Python finds `1 == True`.
"""

from __future__ import annotations

import copy
import datetime
import json
import pathlib
from typing import Any

import jsonpatch
import kopf
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import errors, main, model, mutation, patches

PROPERTY = settings(max_examples=400, deadline=None, database=None)
"""No deadline on a shared machine; no example database written into the work tree."""


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def applied(obj: dict[str, Any], merge: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(obj, patches.json_patch(obj, merge))
    return result


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ((), ""),
        (("metadata", "labels"), "/metadata/labels"),
        (("metadata", "labels", "stepcache.dev/hit"), "/metadata/labels/stepcache.dev~1hit"),
        (("a~b",), "/a~0b"),
        (("~1",), "/~01"),  # `~` first: "~1" must not come back as "/"
        (("",), "/"),
    ],
)
def test_pointers_escape_tilde_and_slash(keys: tuple[str, ...], expected: str) -> None:
    assert patches.pointer(*keys) == expected


def test_a_removal_of_an_absent_key_is_left_out() -> None:
    assert patches.json_patch({"a": {"b": 1}}, {"a": {"c": None}, "d": None}) == []


def test_nested_maps_are_walked_and_values_added_or_replaced() -> None:
    obj = {"metadata": {"labels": {"stepcache.dev/hit": "true", "app": "x"}}}
    merge = {"metadata": {"labels": {"stepcache.dev/hit": None, "stepcache.dev/cache-id": "", "app": "y"}}}

    assert patches.json_patch(obj, merge) == [
        {"op": "remove", "path": "/metadata/labels/stepcache.dev~1hit"},
        {"op": "add", "path": "/metadata/labels/stepcache.dev~1cache-id", "value": ""},
        {"op": "replace", "path": "/metadata/labels/app", "value": "y"},
    ]


def test_a_list_is_replaced_whole_by_one_op() -> None:
    obj = {"spec": {"containers": [{"name": "main", "command": ["true"]}]}}
    merge = {"spec": {"containers": [{"name": "main", "command": ["sh", "-c", "x"]}]}}

    assert patches.json_patch(obj, merge) == [
        {"op": "replace", "path": "/spec/containers", "value": [{"name": "main", "command": ["sh", "-c", "x"]}]}
    ]


def test_a_map_where_there_was_none_arrives_whole_without_its_nulls() -> None:
    obj = {"metadata": {"name": "p"}, "spec": "not a map"}
    merge = {"metadata": {"labels": {"a": "1", "b": None, "c": {"d": None}}}, "spec": {"x": {}}}

    assert patches.json_patch(obj, merge) == [
        {"op": "add", "path": "/metadata/labels", "value": {"a": "1", "c": {}}},
        {"op": "replace", "path": "/spec", "value": {"x": {}}},
    ]


def test_neither_input_is_changed() -> None:
    obj = {"a": {"b": 1, "c": 2}, "l": [1]}
    merge = {"a": {"b": None, "d": {"e": None}}, "l": [2]}
    before = copy.deepcopy((obj, merge))

    patches.json_patch(obj, merge)

    assert (obj, merge) == before


# --- any object, any merge patch ------------------------------------------------------------------------------------

# Few, clashing keys (escapes included) so that patches meet what the object holds.
KEYS = st.sampled_from(["a", "b", "a/b", "~", "~1", "~0/", "", "stepcache.dev/hit"])
SCALARS = st.none() | st.booleans() | st.integers(-2, 2) | st.sampled_from(["", "x", "true", "sh"])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
OBJECTS = st.dictionaries(KEYS, JSON, max_size=5)
MERGES = st.dictionaries(KEYS, JSON, max_size=5)


@PROPERTY
@given(obj=OBJECTS, merge=MERGES)
def test_the_ops_applied_in_order_give_the_merged_object(obj: dict[str, Any], merge: dict[str, Any]) -> None:
    assert as_json(applied(obj, merge)) == as_json(mutation.apply_merge_patch(obj, merge))


@PROPERTY
@given(obj=OBJECTS, merge=MERGES)
def test_the_ops_follow_the_merge_patchs_paths_only(obj: dict[str, Any], merge: dict[str, Any]) -> None:
    ops = patches.json_patch(obj, merge)

    paths = [op["path"] for op in ops]
    assert len(paths) == len(set(paths))
    assert not [(a, b) for a in paths for b in paths if b.startswith(a + "/")], "an op below another op"
    assert {op["op"] for op in ops} <= {"add", "replace", "remove"}
    for op in ops:
        *parents, _ = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        node: Any = merge
        for part in parents:
            node = node[part]
            assert isinstance(node, dict), "an op below a value the merge patch sets"


# --- any pod, any verdict ----------------------------------------------------------------------------------------

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pods"
BASES = {
    name: yaml.safe_load((FIXTURES / f"{name}.yaml").read_text()) for name in ("job-pod", "argo-3.6-pod", "kfp-v1-pod")
}
SIGNED = mutation.Signed(key="ab" * 32, key_containers=("init", "wait", "main"), signature="cd" * 32)
ENTRY = model.CachedEntry(
    id=7,
    namespace="team-a",
    cache_key="ab" * 32,
    termination_messages={"train": "done\n", "report": "ok", "main": "$(x) sh"},
    argo_outputs={"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"},
    source_pod="earlier-pod",
    finished_at=datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
    duration_seconds=12.5,
)
OPTIONS = mutation.ReplayOptions(cache_image="replay:1")
OWNED = st.sampled_from([*mutation.OWNED_LABELS, *mutation.OWNED_ANNOTATIONS, mutation.KFP_REUSED])
NAMES = st.sampled_from(["app", "a/b", "x~y", "workflows.argoproj.io/outputs", "stepcache.dev/max-staleness"]) | OWNED
VALUES = st.sampled_from(["", "true", "sh", "1", "-c"])
COMMANDS = st.sampled_from([["true"], ["sh", "-c", "true"], ["python", "-m", "train"], []])
VOLUMES = st.sampled_from(
    [
        {"name": "host", "hostPath": {"path": "/opt"}},
        {"name": "claim", "persistentVolumeClaim": {"claimName": "c"}},
        {"name": "eph", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
        {"name": "empty", "emptyDir": {}},
        {"name": "cm", "configMap": {"name": "c"}},
    ]
)
POD_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "hostNetwork": st.booleans(),
        "hostPID": st.booleans(),
        "nodeName": st.just("n1"),
        "runtimeClassName": st.just("nvidia"),
        "overhead": st.just({"cpu": "1"}),
        "resourceClaims": st.just([{"name": "g", "resourceClaimName": "g"}]),
        "resources": st.just({"requests": {"cpu": "2"}}),
        "securityContext": st.sampled_from([{}, {"runAsUser": 0}, {"runAsNonRoot": False, "fsGroup": 1}]),
        "nodeSelector": st.dictionaries(st.sampled_from(["kubernetes.io/os", "pool", "a/b"]), VALUES, max_size=2),
        "affinity": st.just({"nodeAffinity": {}}),
    },
)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    pod = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    metadata = pod["metadata"]
    for field in ("labels", "annotations"):
        extra = draw(st.dictionaries(NAMES, VALUES, max_size=4))
        if draw(st.booleans()):
            metadata[field] = {**metadata.get(field, {}), **extra}
        elif extra:
            metadata[field] = extra
        else:
            metadata.pop(field, None)
    spec = pod["spec"]
    spec.update(draw(POD_FIELDS))
    volumes = draw(st.lists(VOLUMES, max_size=3, unique_by=lambda v: v["name"]))
    spec["volumes"] = [*spec.get("volumes", []), *volumes]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if container["name"] not in ("main", "wait", "init"):
            container["command"] = draw(COMMANDS)
        if draw(st.booleans()):
            container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "1"
        for volume in (
            draw(st.lists(st.sampled_from(volumes), max_size=2, unique_by=lambda v: v["name"])) if volumes else []
        ):
            container.setdefault("volumeMounts", []).append(
                {"name": volume["name"], "mountPath": f"/mnt/{volume['name']}"}
            )
    return pod


@st.composite
def verdicts(draw: st.DrawFn, pod: dict[str, Any]) -> dict[str, Any]:
    outcome = draw(st.sampled_from(["skip", "miss", "hit"]))
    if outcome == "skip":
        return mutation.skip_patch(pod)
    if outcome == "hit":
        options = mutation.ReplayOptions(cache_image="replay:1", keep_node_constraints=draw(st.booleans()))
        try:
            return mutation.hit_patch(pod, signed=SIGNED, entry=ENTRY, options=options, kfp=draw(st.booleans()))
        except errors.Uncacheable:
            pass  # admission then answers with the miss patch
    return mutation.miss_patch(pod, signed=SIGNED)


@PROPERTY
@given(data=st.data(), pod=pods())
def test_for_any_pod_and_verdict_the_ops_applied_in_order_give_the_merged_pod(
    data: st.DataObject, pod: dict[str, Any]
) -> None:
    merge = data.draw(verdicts(pod))
    before = copy.deepcopy(pod)

    admitted = applied(pod, merge)

    assert as_json(admitted) == as_json(mutation.apply_merge_patch(pod, merge))
    assert pod == before
    spec = admitted["spec"]
    volumes = {volume["name"] for volume in spec.get("volumes") or []}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        assert {mount["name"] for mount in container.get("volumeMounts") or []} <= volumes, "a mount without a volume"


# --- the handler's kopf Patch --------------------------------------------------------------------------------------


def test_the_handlers_kopf_patch_answers_with_these_ops_and_keeps_behaving_as_a_merge_patch() -> None:
    pod = copy.deepcopy(BASES["job-pod"])
    body = kopf.Body(pod)
    patch = kopf.Patch(body=body)

    main.answer_with_own_json_patch(patch, body=body)
    patch.update(mutation.hit_patch(pod, signed=SIGNED, entry=ENTRY, options=OPTIONS, kfp=False))
    patch.metadata.labels["team"] = "a"  # kopf's own views of the patch still write into it

    merge = dict(patch)
    assert merge["metadata"]["labels"]["team"] == "a"
    assert patch.as_json_patch() == patches.json_patch(pod, merge)
    assert isinstance(patch, kopf.Patch)
