"""What a Succeeded pod produced: termination messages, Argo outputs (task result or annotation), provenance."""

from __future__ import annotations

import copy
import datetime
import pathlib
from typing import Any

import pytest
import yaml

from stepcache import errors, outputs

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pods"
MATERIAL = {"scheme": "stepcache/v1", "scope": "team-a", "containers": []}


def load(name: str) -> dict[str, Any]:
    with (FIXTURES / f"{name}.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


def utc(hour: int, minute: int, second: float) -> datetime.datetime:
    whole = int(second)
    return datetime.datetime(2024, 5, 1, hour, minute, whole, round((second - whole) * 1e6), tzinfo=datetime.UTC)


def test_termination_messages_keep_non_empty_messages_of_containers() -> None:
    assert outputs.termination_messages(load("job-pod-succeeded")) == {
        "train": '{"accuracy": 0.93, "model": "s3://models/train/42"}\n'
    }


def test_a_pod_without_status_has_no_termination_messages() -> None:
    assert outputs.termination_messages(load("job-pod")) == {}


def test_argo_outputs_are_none_for_a_pod_outside_argo() -> None:
    assert outputs.argo_outputs(load("job-pod-succeeded"), task_result=None) is None


def test_argo_outputs_come_from_the_workflow_task_result() -> None:
    pod, task_result = load("argo-3.6-pod-succeeded"), load("argo-3.6-taskresult")

    assert outputs.argo_outputs(pod, task_result=task_result) == {
        "parameters": {"length": "9", "upper": "STEPCACHE"},
        "result": "9",
    }


def test_argo_outputs_come_from_the_pod_annotation_on_argo_before_task_results() -> None:
    assert outputs.argo_outputs(load("argo-3.3-pod-succeeded"), task_result=None) == {
        "parameters": {"greeting": "hello\nworld"},
        "result": "done",
    }


def test_a_given_task_result_wins_over_the_annotation() -> None:
    task_result = {"outputs": {"parameters": [{"name": "greeting", "value": "hi"}]}}

    assert outputs.argo_outputs(load("argo-3.3-pod-succeeded"), task_result=task_result) == {
        "parameters": {"greeting": "hi"},
        "result": None,
    }


def test_an_argo_pod_that_reported_nothing_has_empty_outputs() -> None:
    assert outputs.argo_outputs(load("argo-3.6-pod-succeeded"), task_result=None) == {
        "parameters": {},
        "result": None,
    }


def test_a_malformed_outputs_annotation_is_uncacheable() -> None:
    pod = load("argo-3.3-pod-succeeded")
    pod["metadata"]["annotations"]["workflows.argoproj.io/outputs"] = "{not json"

    with pytest.raises(errors.Uncacheable, match=r"workflows\.argoproj\.io/outputs"):
        outputs.argo_outputs(pod, task_result=None)


def test_the_task_result_is_named_after_the_node_id() -> None:
    assert outputs.task_result_name(load("argo-3.6-pod-succeeded")) == "count-wf-4kz9q-2216093447"
    assert outputs.task_result_name(load("job-pod-succeeded")) is None


def test_a_task_result_is_complete_only_when_labelled_so() -> None:
    task_result = load("argo-3.6-taskresult")
    assert outputs.task_result_complete(task_result)

    task_result["metadata"]["labels"][outputs.REPORT_OUTPUTS_COMPLETED] = "false"
    assert not outputs.task_result_complete(task_result)
    del task_result["metadata"]["labels"]
    assert not outputs.task_result_complete(task_result)


def test_new_entry_records_result_provenance_and_duration() -> None:
    pod = load("job-pod-succeeded")

    entry = outputs.new_entry(pod, cache_key="3b" * 32, key_material=MATERIAL, task_result=None)

    assert entry.namespace == "team-a"
    assert entry.cache_key == "3b" * 32
    assert entry.key_material == MATERIAL
    assert entry.termination_messages == outputs.termination_messages(pod)
    assert entry.argo_outputs is None
    assert (entry.source_namespace, entry.source_pod, entry.source_uid) == (
        "team-a",
        "train-29sl4-x7k2m",
        "9f0e1d2c-3b4a-4596-8776-a5b4c3d2e1f0",
    )
    assert entry.started_at == utc(12, 0, 0)  # status.startTime
    assert entry.finished_at == utc(12, 41, 30)  # the container that finished last
    assert entry.duration_seconds == 41 * 60 + 30


def test_new_entry_falls_back_to_the_earliest_container_start() -> None:
    pod, task_result = load("argo-3.6-pod-succeeded"), load("argo-3.6-taskresult")

    entry = outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=task_result)

    assert entry.started_at == utc(8, 59, 58)  # the init container
    assert entry.finished_at == utc(9, 0, 4)
    assert entry.duration_seconds == 6.0
    assert entry.argo_outputs == {"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"}


def test_new_entry_reads_times_with_numeric_offsets() -> None:
    entry = outputs.new_entry(load("argo-3.3-pod-succeeded"), cache_key="k", key_material=MATERIAL, task_result=None)

    assert entry.started_at == datetime.datetime(2024, 5, 1, 7, 0, tzinfo=datetime.UTC)
    assert entry.duration_seconds == 5.0


def test_new_entry_without_a_finish_time_is_uncacheable() -> None:
    pod = load("job-pod-succeeded")
    for status in pod["status"]["containerStatuses"]:
        status["state"] = {"running": {"startedAt": "2024-05-01T12:00:10Z"}}

    with pytest.raises(errors.Uncacheable, match="finish"):
        outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=None)


def test_new_entry_without_any_start_time_has_no_duration() -> None:
    pod = load("job-pod-succeeded")
    del pod["status"]["startTime"]
    del pod["status"]["initContainerStatuses"]
    for status in pod["status"]["containerStatuses"]:
        del status["state"]["terminated"]["startedAt"]

    entry = outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=None)

    assert entry.started_at is None
    assert entry.duration_seconds is None
    assert entry.finished_at == utc(12, 41, 30)


def test_a_malformed_time_is_uncacheable() -> None:
    pod = load("job-pod-succeeded")
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "yesterday"

    with pytest.raises(errors.Uncacheable, match="RFC 3339"):
        outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=None)


def test_an_entry_lives_in_the_keys_scope() -> None:
    pod = load("job-pod-succeeded")
    cluster_wide = {**MATERIAL, "scope": "*"}
    unscoped = {k: v for k, v in MATERIAL.items() if k != "scope"}

    shared = outputs.new_entry(pod, cache_key="k", key_material=cluster_wide, task_result=None)
    fallback = outputs.new_entry(pod, cache_key="k", key_material=unscoped, task_result=None)

    assert (shared.namespace, shared.source_namespace) == ("*", "team-a")
    assert fallback.namespace == "team-a"


def test_reading_outputs_changes_nothing() -> None:
    pod, task_result = load("argo-3.6-pod-succeeded"), load("argo-3.6-taskresult")
    before = copy.deepcopy((pod, task_result))

    outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=task_result)

    assert (pod, task_result) == before


# --- whose WorkflowTaskResult -----------------------------------------------------------------------------------------


def test_the_task_result_written_for_the_pod_is_its_own() -> None:
    assert outputs.task_result_of(load("argo-3.6-taskresult"), load("argo-3.6-pod-succeeded"))


def test_a_task_result_owned_by_another_pod_is_not_the_pods() -> None:
    # A hand-made pod naming the real step's node id finds the real step's result under that name.
    impostor = load("argo-3.6-pod-succeeded")
    impostor["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    assert not outputs.task_result_of(load("argo-3.6-taskresult"), impostor)


def test_a_task_result_of_another_workflow_is_not_the_pods() -> None:
    other = load("argo-3.6-taskresult")
    other["metadata"]["labels"]["workflows.argoproj.io/workflow"] = "someone-elses-wf"
    assert not outputs.task_result_of(other, load("argo-3.6-pod-succeeded"))


def test_a_task_result_owned_by_another_workflow_is_not_the_pods() -> None:
    pod = load("argo-3.6-pod-succeeded")
    pod["metadata"]["ownerReferences"] = [{"kind": "Workflow", "name": "count-wf-4kz9q", "uid": "wf-1"}]
    result = load("argo-3.6-taskresult")
    result["metadata"]["ownerReferences"] = [{"kind": "Workflow", "name": "count-wf-4kz9q", "uid": "wf-2"}]
    assert not outputs.task_result_of(result, pod)
    result["metadata"]["ownerReferences"][0]["uid"] = "wf-1"
    assert outputs.task_result_of(result, pod)


# --- what the database cannot store -----------------------------------------------------------------------------------


def test_a_nul_in_a_termination_message_is_unstorable_for_good_naming_the_container() -> None:
    pod = load("job-pod-succeeded")
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "rows\x0042"

    with pytest.raises(errors.Uncacheable) as caught:
        outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=None)

    assert caught.value.reason == (
        "unstorable-output: the termination message of container 'train' holds a NUL character (\\u0000), "
        "which the database cannot store"
    )


@pytest.mark.parametrize(
    ("outputs_", "where"),
    [
        ({"parameters": [{"name": "length", "value": "9\x00"}]}, "output parameter 'length'"),
        ({"parameters": [{"name": "length", "value": "9"}], "result": "\x00"}, "the Argo result"),
    ],
)
def test_a_nul_in_an_argo_output_is_unstorable_naming_it(outputs_: dict[str, Any], where: str) -> None:
    pod = load("argo-3.6-pod-succeeded")
    task_result = load("argo-3.6-taskresult")
    task_result["outputs"] = outputs_

    with pytest.raises(errors.Uncacheable, match=f"^unstorable-output: {where} holds a NUL"):
        outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=task_result)


def test_a_nul_in_the_key_material_is_unstorable_naming_its_path() -> None:
    material = {**MATERIAL, "containers": [{"name": "train", "args": ["a", "b\x00"]}]}

    with pytest.raises(errors.Uncacheable, match=r"^unstorable-output: the key material at containers\[0\]\.args\[1\]"):
        outputs.new_entry(load("job-pod-succeeded"), cache_key="k", key_material=material, task_result=None)


def test_text_that_is_not_unicode_is_unstorable_too() -> None:
    pod = load("job-pod-succeeded")
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "half a pair: \ud83d"

    with pytest.raises(errors.Uncacheable, match="lone surrogate"):
        outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=None)


def test_other_control_characters_and_any_unicode_are_stored_as_they_are() -> None:
    message = "\x01\x1f\x7f tab\t nl\n é 漢字 🙂 \u2028"
    pod = load("job-pod-succeeded")
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = message

    entry = outputs.new_entry(pod, cache_key="k", key_material=MATERIAL, task_result=None)

    assert entry.termination_messages["train"] == message
