"""What the command line reads: every malformed input is one clear error naming the file, field and reason."""

from __future__ import annotations

import json
import pathlib
import resource
from typing import Any

import hypothesis
import pytest
import yaml
from hypothesis import strategies as st

from stepcache import documents, errors

POD = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "keys" / "pod.yaml"


def load(text: str | bytes) -> documents.Loaded:
    return documents.load_pod(text.encode() if isinstance(text, str) else text, source="pod.yaml")


def refusal(text: str | bytes) -> errors.InvalidDocument:
    with pytest.raises(errors.InvalidDocument) as caught:
        load(text)
    return caught.value


def test_a_pod_file_is_read_as_written() -> None:
    loaded = load(POD.read_bytes())
    assert loaded.pod == yaml.safe_load(POD.read_text())
    assert loaded.request_namespace is None


def test_an_admission_review_gives_its_object_and_the_requests_namespace() -> None:
    review = {
        "kind": "AdmissionReview",
        "request": {"namespace": "team-a", "object": {"kind": "Pod", "metadata": {"generateName": "x-"}}},
    }
    loaded = load(json.dumps(review))
    assert loaded.pod == {"kind": "Pod", "metadata": {"generateName": "x-"}}
    assert loaded.request_namespace == "team-a"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (b"\xff\xfe kind: Pod", None, "not UTF-8 text (byte 0)"),
        ("[1, 2]", None, "does not hold an object"),
        ("kind: Deployment", "kind", "holds a 'Deployment', not a Pod or an AdmissionReview"),
        ("kind: AdmissionReview\nrequest: {}", "request.object", "the AdmissionReview holds no object"),
        ("metadata: []", "metadata", "must be an object"),
        ("metadata: {labels: {a: 1}}", "metadata.labels['a']", "must be a string"),
        ("spec: {containers: {}}", "spec.containers", "must be a list of objects"),
        (
            "spec: {containers: [{name: a, command: echo hi}]}",
            "spec.containers[0].command",
            "must be a list of strings",
        ),
        ("spec: {containers: [{name: a, args: [1]}]}", "spec.containers[0].args[0]", "must be a string"),
        ("spec: {containers: [{name: a, env: [x]}]}", "spec.containers[0].env[0]", "must be an object"),
        ("spec: {initContainers: [{name: 7}]}", "spec.initContainers[0].name", "must be a string"),
        ("spec: {containers: [{name: a, image: [x]}]}", "spec.containers[0].image", "must be a string"),
        ("v: !!binary aGVsbG8=", None, "not YAML or JSON: binary values have no place in a Pod"),
        ('metadata: {name: "\\ud800"}', None, "holds text that is not Unicode (a lone surrogate)"),
        ("metadata: {labels: {1: a}}", None, "holds a key that is not a string: 1"),
        (
            "spec: {containers: [{name: a, env: [{name: X, valueFrom: {fieldRef: {2: b}}}]}]}",
            None,
            "holds a key that is not a string: 2",
        ),
    ],
)
def test_malformed_input_names_the_field_and_the_reason(text: str | bytes, field: str | None, reason: str) -> None:
    refused = refusal(text)
    assert (refused.source, refused.field, refused.reason) == ("pod.yaml", field, reason)


def test_a_date_stays_the_string_it_was_written_as() -> None:
    loaded = load("metadata: {annotations: {when: 2024-05-01}}")
    assert loaded.pod["metadata"]["annotations"] == {"when": "2024-05-01"}


def test_deep_nesting_is_refused_without_a_recursion_error() -> None:
    assert refusal("a: " + "[" * 5000 + "]" * 5000).reason in ("nested too deeply", "nested more than 64 levels deep")


def test_a_billion_laughs_is_refused_in_bounded_memory() -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert refusal("\n".join(lines)).reason == "not YAML or JSON: more than 64 YAML aliases"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: under 100 MiB more


def test_a_few_aliases_expanding_into_a_huge_tree_are_refused() -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 10)]
    assert refusal("\n".join(lines)).reason == "more than 1000000 values"


def test_a_file_larger_than_the_bound_is_refused_before_parsing() -> None:
    assert refusal(b" " * (documents.MAX_BYTES + 1)).reason == "larger than 8 MiB"


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=40,
)
_pod_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["Pod", "AdmissionReview", "Job"]) | st.text(max_size=5)},
    optional={
        "metadata": _json,
        "spec": st.fixed_dictionaries({}, optional={"containers": _json, "initContainers": _json, "volumes": _json})
        | _json,
        "request": _json,
    },
)


def outcome(data: bytes) -> str:
    """ "read" when the document is a pod (then its shape is sound), else the reason it was refused."""
    try:
        loaded = load(data)
    except errors.InvalidDocument as exc:
        return exc.reason
    assert list(documents.pod_shape_problems(loaded.pod)) == []
    return "read"


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(document=_pod_like | _json)
def test_any_json_document_is_read_or_refused_with_a_reason(document: Any) -> None:
    assert outcome(json.dumps(document).encode())


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_read_or_refused_with_a_reason(data: bytes) -> None:
    assert outcome(data)
