"""Reading untrusted JSON: nesting measured without parsing, shapes named field by field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepcache import shapes
from tests import fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=40,
)


@given(value=JSON, limit=st.integers(min_value=0, max_value=8), ensure_ascii=st.booleans())
def test_nesting_is_measured_as_the_parser_would_see_it(value: Any, limit: int, ensure_ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert shapes.nesting_exceeds(text, limit) == (fuzzing.depth(value) > limit)


@pytest.mark.parametrize(
    "text",
    ['"[[[[[["', '{"a": "\\"[[[[[[\\\\"}', '["\\\\", "{{{{{{"]', '{"[[[[[[": 1}'],
)
def test_brackets_inside_strings_nest_nothing(text: str) -> None:
    assert not shapes.nesting_exceeds(text, 2)
    assert shapes.loads(text, max_depth=2) == json.loads(text)


def test_deep_nesting_is_refused_before_parsing_however_deep() -> None:
    for text in ("[" * 1_000_000, "[" * 100 + "]" * 100, '{"a":' * 100 + "1" + "}" * 100):
        with pytest.raises(shapes.TooDeep, match="nested more than 64 levels deep"):
            shapes.loads(text, max_depth=64)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "1" * 5000, "{", ""])
def test_what_is_not_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # every refusal is one, whatever the reason
        shapes.loads(text, max_depth=64)


def test_problems_name_each_misfit_field_by_its_path() -> None:
    pod = {
        "metadata": {"labels": {"a": 1}, "annotations": []},
        "spec": {
            "containers": [{"name": "a", "env": [{"name": "X"}, "Y=1"]}, {"name": 2, "command": "echo hi"}],
            "volumes": [{"name": "v", "projected": {"sources": [{"configMap": {"items": {}}}]}}],
            "unknownField": {"anything": ["goes"]},
        },
    }
    assert list(shapes.problems(pod, shapes.POD)) == [
        ("metadata.labels['a']", "must be a string"),
        ("metadata.annotations", "must be an object"),
        ("spec.containers[0].env[1]", "must be an object"),
        ("spec.containers[1].name", "must be a string"),
        ("spec.containers[1].command", "must be a list of strings"),
        ("spec.volumes[0].projected.sources[0].configMap.items", "must be a list of objects"),
    ]


def test_a_null_field_is_absent_but_a_null_item_or_value_is_of_the_wrong_type() -> None:
    assert list(shapes.problems({"spec": None, "metadata": {"labels": None}}, shapes.POD)) == []
    assert list(shapes.problems({"spec": {"initContainers": [None], "containers": [{}]}}, shapes.POD)) == [
        ("spec.initContainers[0]", "must be an object")
    ]
    assert list(shapes.problems({"metadata": {"annotations": {"a": None}}}, shapes.POD)) == [
        ("metadata.annotations['a']", "must be a string")
    ]


def test_a_boolean_is_not_a_number() -> None:
    assert list(
        shapes.problems({"spec": {"securityContext": {"runAsUser": True}, "containers": [{}]}}, shapes.POD)
    ) == [("spec.securityContext.runAsUser", "must be an integer")]


def test_a_pod_spec_holds_a_container() -> None:
    assert list(shapes.problems({"spec": {"restartPolicy": "Never"}}, shapes.POD)) == [
        ("spec.containers", "is required")
    ]
    assert list(shapes.problems({"spec": {"containers": []}}, shapes.POD)) == [
        ("spec.containers", "must hold at least 1")
    ]
