"""`patches.json_patch`: the JSON patch the API server receives, built from a merge patch's own paths.

The ops are applied in order with jsonpatch, as kube-apiserver applies them, and the object they give must be the
one RFC 7386 describes (`mutation.apply_merge_patch`, checked on the RFC's own examples in test_mutation.py) —
compared as JSON text, since Python finds `1 == True`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import mutation, patches

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
