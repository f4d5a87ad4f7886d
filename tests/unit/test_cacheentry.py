"""CacheEntry objects and Events as users see them: names, printer-column fields, reconcile decisions, Event names."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from stepcache import cacheentry, model, outputs

KEY = "3f2a9c1b4d5e" + "0" * 52
OTHER_KEY = "aa" * 32
RECORDED = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
CRD = pathlib.Path(__file__).resolve().parents[2] / "crds" / "cacheentry.yaml"
PODS = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "pods"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def summary(**changes: Any) -> model.EntrySummary:
    entry = model.EntrySummary(
        id=7,
        namespace="pipelines",
        cache_key=KEY,
        step="Job/train-x7k2p",
        images=("python:3.12", "busybox:1.36.1"),
        source_namespace="pipelines",
        source_pod="train-x7k2p-abcde",
        source_uid="0b0e6c1e-1111-2222-3333-444455556666",
        finished_at=RECORDED,
        duration_seconds=90.0,
        hit_count=0,
        last_hit_at=None,
        outputs=(
            model.OutputSize(name="main", kind="terminationMessage", bytes=9),
            model.OutputSize(name="rows", kind="parameter", bytes=4),
        ),
        key_fields={"scheme": "stepcache/v2", "scope": "pipelines", "version": "", "salted": False},
    )
    return dataclasses.replace(entry, **changes)


def obj(entry: model.EntrySummary, **metadata: Any) -> dict[str, Any]:
    """An object as the API server returns it: the builder's body plus status and server-set metadata."""
    body = cacheentry.body(entry, operator_namespace="stepcache-system")
    body["metadata"] = {**body["metadata"], "resourceVersion": "41", **metadata}
    body["status"] = {
        k: v
        for k, v in cacheentry.status(entry, max_staleness=datetime.timedelta(days=30), unused_after=None).items()
        if v is not None
    }
    return body


# -- names --


def test_an_object_is_named_after_the_owner_and_the_first_12_hex_of_the_key() -> None:
    assert cacheentry.object_name("Job/train-x7k2p", KEY) == "train-x7k2p-3f2a9c1b4d5e"


def test_an_argo_node_name_is_sanitised_into_the_object_name() -> None:
    assert cacheentry.object_name("My-WF-abc12.train(0)", KEY) == "my-wf-abc12-train-0-3f2a9c1b4d5e"


def test_a_long_step_name_is_truncated_to_a_63_character_label_that_keeps_the_key() -> None:
    name = cacheentry.object_name("Job/" + "a" * 49 + "-" + "b" * 200, KEY)
    assert name == "a" * 49 + "-3f2a9c1b4d5e"  # the cut falls on a dash, which is dropped
    assert len(name) <= 63
    assert DNS_LABEL.match(name)


def test_a_step_with_nothing_usable_is_named_entry() -> None:
    assert cacheentry.object_name("Pod/???", KEY) == "entry-3f2a9c1b4d5e"
    assert cacheentry.object_name("", KEY) == "entry-3f2a9c1b4d5e"


@given(step=st.text(max_size=300))
def test_any_step_gives_a_valid_dns_label_ending_in_the_key_prefix(step: str) -> None:
    name = cacheentry.object_name(step, KEY)
    assert len(name) <= 63
    assert DNS_LABEL.match(name), name
    assert name.endswith("-3f2a9c1b4d5e")
    assert cacheentry.object_name(step, KEY) == name


def test_cluster_wide_entries_live_in_the_operators_namespace() -> None:
    assert cacheentry.object_namespace("*", operator_namespace="stepcache-system") == "stepcache-system"
    assert cacheentry.object_namespace("team-a", operator_namespace="stepcache-system") == "team-a"


def test_an_object_in_namespace_a_stands_only_for_rows_of_a() -> None:
    assert cacheentry.row_namespaces("team-a", operator_namespace="stepcache-system") == ("team-a",)
    assert cacheentry.row_namespaces("stepcache-system", operator_namespace="stepcache-system") == (
        "stepcache-system",
        "*",
    )


# -- provenance --


def test_the_step_is_the_argo_node_name_when_there_is_one() -> None:
    pod = {
        "metadata": {
            "name": "wf-abc-train-123",
            "annotations": {"workflows.argoproj.io/node-name": "wf-abc.train"},
            "ownerReferences": [{"kind": "Workflow", "name": "wf-abc", "controller": True}],
        }
    }
    assert cacheentry.step_of(pod) == "wf-abc.train"


def test_the_step_is_the_controlling_owner_as_kind_and_name() -> None:
    pod = {
        "metadata": {
            "name": "train-x7k2p-abcde",
            "ownerReferences": [
                {"kind": "ConfigMap", "name": "unrelated"},
                {"kind": "Job", "name": "train-x7k2p", "controller": True},
            ],
        }
    }
    assert cacheentry.step_of(pod) == "Job/train-x7k2p"


def test_a_bare_pod_is_its_own_step_without_the_generated_suffix() -> None:
    assert cacheentry.step_of({"metadata": {"name": "probe-x1y2z", "generateName": "probe-"}}) == "Pod/probe"
    assert cacheentry.step_of({"metadata": {"name": "fixed"}}) == "Pod/fixed"


def test_images_are_the_containers_first_each_once_without_argos_executor() -> None:
    pod = {
        "spec": {
            "initContainers": [
                {"name": "init", "image": "argoexec:v3.6", "env": [{"name": "ARGO_TEMPLATE", "value": "{}"}]},
                {"name": "fetch", "image": "curl:8"},
            ],
            "containers": [
                {"name": "wait", "image": "argoexec:v3.6"},
                {"name": "main", "image": "python:3.12"},
                {"name": "side", "image": "python:3.12"},
            ],
        },
    }
    assert cacheentry.images_of(pod) == ("python:3.12", "curl:8")


def test_a_plain_pods_containers_named_wait_are_its_own() -> None:
    pod = {"spec": {"containers": [{"name": "wait", "image": "busybox:1.36.1"}]}}
    assert cacheentry.images_of(pod) == ("busybox:1.36.1",)


def test_a_recorded_argo_pods_entry_carries_its_node_name_and_step_image() -> None:
    pod = yaml.safe_load((PODS / "argo-3.6-pod-succeeded.yaml").read_text())
    entry = outputs.new_entry(pod, cache_key=KEY, key_material={"scope": "argo"}, task_result=None)
    assert entry.step == "count-wf-4kz9q.count"
    assert entry.images == ("python:3.12-alpine",)


def test_a_recorded_job_pods_entry_carries_the_job_and_every_image() -> None:
    pod = yaml.safe_load((PODS / "job-pod-succeeded.yaml").read_text())
    pod["metadata"]["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "train", "controller": True}
    ]
    entry = outputs.new_entry(pod, cache_key=KEY, key_material={"scope": "team-a"}, task_result=None)
    assert entry.step == "Job/train"
    assert entry.images == ("registry.example.com/ml/train:2.1", "registry.example.com/ml/report:1.4", "busybox:1.36")


# -- the object and its printer columns --


def crd_version() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    [version] = crd["spec"]["versions"]
    return version  # type: ignore[no-any-return]


def column(obj: dict[str, Any], path: str) -> Any:
    """A printer column's value: the simple JSON paths the CRD uses (fields and one [0])."""
    value: Any = obj
    for part in path.lstrip(".").split("."):
        index = None
        if part.endswith("]"):
            part, index = part[:-3], int(part[-2])
        value = value.get(part) if isinstance(value, dict) else None
        if index is not None:
            value = value[index] if isinstance(value, list) and len(value) > index else None
    return value


def test_the_printer_columns_read_the_fields_the_builder_writes() -> None:
    entry = summary(hit_count=3, last_hit_at=RECORDED + datetime.timedelta(hours=1))
    built = obj(entry)
    columns = {c["name"]: column(built, c["jsonPath"]) for c in crd_version()["additionalPrinterColumns"]}
    assert columns == {
        "Key": "3f2a9c1b4d5e",
        "Step": "Job/train-x7k2p",
        "Image": "python:3.12",
        "Hits": 3,
        "Saved": "4m30s",
        "Age": "2025-03-01T12:00:00Z",
        "Expires": "2025-03-31T12:00:00Z",
        "Source Pod": "train-x7k2p-abcde",
        "Entry": 7,
    }


def test_wide_output_adds_the_source_pod_and_the_entry_id_only() -> None:
    wide = [c["name"] for c in crd_version()["additionalPrinterColumns"] if c.get("priority", 0) > 0]
    assert wide == ["Source Pod", "Entry"]


def declared(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Paths in `value` that the structural schema does not declare (the API server would prune them)."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is None:
            return []
        missing = []
        for name, item in value.items():
            if name not in properties:
                missing.append(f"{path}.{name}")
            else:
                missing += declared(properties[name], item, f"{path}.{name}")
        return missing
    if isinstance(value, list):
        return [m for item in value for m in declared(schema.get("items") or {}, item, f"{path}[]")]
    return []


def test_every_field_the_builder_writes_is_in_the_crd_schema() -> None:
    schema = crd_version()["schema"]["openAPIV3Schema"]
    entry = summary(
        hit_count=1,
        last_hit_at=RECORDED,
        key_fields={
            "scheme": "s",
            "scope": "*",
            "version": "2",
            "serviceAccount": "sa",
            "salted": True,
            "containers": ["main"],
        },
    )
    built = obj(entry)
    built["status"] = cacheentry.status(entry, max_staleness=None, unused_after=datetime.timedelta(days=1))
    assert declared(schema, {"spec": built["spec"], "status": built["status"]}) == []


_OPENAPI_KEYWORDS = {"type", "format", "description", "pattern", "items", "properties", "required"}


def keywords(schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of schema nodes that are not OpenAPI keywords (a YAML slip such as an unquoted comma makes one)."""
    wrong = [f"{path}:{name}" for name in schema if name not in _OPENAPI_KEYWORDS]
    for name, sub in (schema.get("properties") or {}).items():
        wrong += keywords(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        wrong += keywords(schema["items"], f"{path}[]")
    return wrong


def test_the_crd_schema_holds_only_openapi_keywords() -> None:
    assert keywords(crd_version()["schema"]["openAPIV3Schema"]) == []


def test_the_spec_shows_output_sizes_and_key_fields_but_no_values() -> None:
    entry = summary(key_fields={"scheme": "stepcache/v2", "env": [{"name": "TOKEN", "value": "s3cret"}], "n": 1.5})
    spec = cacheentry.spec(entry)
    assert spec["outputs"] == [
        {"name": "main", "kind": "terminationMessage", "bytes": 9},
        {"name": "rows", "kind": "parameter", "bytes": 4},
    ]
    assert spec["outputBytes"] == 13
    assert spec["keyMaterial"] == {"scheme": "stepcache/v2"}
    assert "s3cret" not in repr(spec)


def test_the_object_carries_stepcaches_finalizer_and_lives_beside_the_pods() -> None:
    built = cacheentry.body(summary(), operator_namespace="stepcache-system")
    assert built["apiVersion"] == "stepcache.dev/v1alpha1"
    assert built["kind"] == "CacheEntry"
    assert built["metadata"]["namespace"] == "pipelines"
    assert built["metadata"]["finalizers"] == ["stepcache.dev/finalizer"]
    assert "status" not in built  # the status subresource ignores it on create


def test_an_entry_without_duration_has_no_duration_and_saves_nothing_measurable() -> None:
    entry = summary(duration_seconds=None, hit_count=4)
    assert "durationSeconds" not in cacheentry.spec(entry)
    assert cacheentry.status(entry, max_staleness=None, unused_after=None)["secondsSaved"] == 0


def test_saved_is_hits_times_the_source_pods_duration() -> None:
    status = cacheentry.status(summary(hit_count=2, duration_seconds=3.5), max_staleness=None, unused_after=None)
    assert status["secondsSaved"] == 7.0
    assert status["saved"] == "7s"


def test_expiry_is_the_earlier_of_the_cap_and_disuse() -> None:
    last_hit = RECORDED + datetime.timedelta(days=2)
    entry = summary(hit_count=1, last_hit_at=last_hit)
    assert (
        cacheentry.status(entry, max_staleness=datetime.timedelta(days=30), unused_after=datetime.timedelta(days=7))[
            "expiresAt"
        ]
        == "2025-03-10T12:00:00Z"
    )
    assert (
        cacheentry.status(summary(), max_staleness=datetime.timedelta(days=3), unused_after=datetime.timedelta(days=7))[
            "expiresAt"
        ]
        == "2025-03-04T12:00:00Z"
    )
    assert cacheentry.status(summary(), max_staleness=None, unused_after=None)["expiresAt"] is None


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (0.4, "0s"),
        (59.6, "1m"),
        (192, "3m12s"),
        (3600, "1h"),
        (7500, "2h5m"),
        (86400, "1d"),
        (273600, "3d4h"),
        (-5, "0s"),
    ],
)
def test_saved_reads_like_a_kubectl_age(seconds: float, shown: str) -> None:
    assert cacheentry.human_seconds(seconds) == shown


# -- reconcile --


def plan(rows: list[model.EntrySummary], objects: list[dict[str, Any]]) -> cacheentry.Plan:
    return cacheentry.plan(
        rows,
        objects,
        operator_namespace="stepcache-system",
        max_staleness=datetime.timedelta(days=30),
        unused_after=None,
    )


def test_objects_matching_their_rows_need_nothing() -> None:
    assert plan([summary()], [obj(summary())]) == cacheentry.Plan()


def test_a_row_without_an_object_gets_one() -> None:
    assert plan([summary()], []).create == (summary(),)


def test_an_object_without_a_row_is_deleted_only_as_it_was_listed() -> None:
    orphan = obj(summary(cache_key=OTHER_KEY))
    assert plan([], [orphan]).delete == (
        cacheentry.ObjectRef(namespace="pipelines", name="train-x7k2p-aaaaaaaaaaaa", resource_version="41"),
    )


def test_an_object_being_deleted_is_left_to_its_finalizer() -> None:
    going = obj(summary(), deletionTimestamp="2025-03-02T00:00:00Z")
    assert plan([], [going]) == cacheentry.Plan()
    assert plan([summary()], [going]) == cacheentry.Plan()  # and not created again while it goes


def test_a_replaced_row_updates_the_spec_guarded_by_the_resource_version() -> None:
    newer = summary(source_pod="train-x7k2p-fghij", finished_at=RECORDED + datetime.timedelta(hours=3))
    todo = plan([newer], [obj(summary())])
    [change] = todo.update_spec
    assert change.target.resource_version == "41"
    assert change.spec["sourcePod"]["name"] == "train-x7k2p-fghij"
    assert change.spec["recordedAt"] == "2025-03-01T15:00:00Z"


def test_new_hits_update_only_the_status() -> None:
    hit = summary(hit_count=5, last_hit_at=RECORDED + datetime.timedelta(minutes=1))
    todo = plan([hit], [obj(summary())])
    assert todo.update_spec == ()
    [change] = todo.update_status
    assert change.status["hits"] == 5
    assert change.status["saved"] == "7m30s"


def test_two_rows_that_would_share_a_name_mirror_the_older_one() -> None:
    first = summary(id=3, cache_key="3f2a9c1b4d5e" + "1" * 52)
    second = summary(id=9)
    todo = plan([second, first], [])
    assert todo.create == (first,)
    assert todo.unmirrored == (second,)


def test_cluster_wide_rows_are_planned_in_the_operators_namespace() -> None:
    todo = plan([summary(namespace="*")], [])
    assert cacheentry.body(todo.create[0], operator_namespace="stepcache-system")["metadata"]["namespace"] == (
        "stepcache-system"
    )


# -- Events --

POD = cacheentry.PodRef(namespace="pipelines", name="train-x7k2p-fghij", uid="9d6e-uid")


def test_an_event_name_is_the_same_for_every_replica_and_restart() -> None:
    name = cacheentry.event_name(POD, reason="CacheHit")
    assert name == cacheentry.event_name(POD, reason="CacheHit")
    assert name.startswith("train-x7k2p-fghij.")
    assert name != cacheentry.event_name(POD, reason="Recorded")
    assert name != cacheentry.event_name(dataclasses.replace(POD, uid="another-uid"), reason="CacheHit")


@given(
    name=st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", fullmatch=True).filter(
        lambda n: DNS_SUBDOMAIN.match(n) is not None
    ),
    uid=st.uuids().map(str),
)
def test_any_pod_name_gives_a_valid_event_name(name: str, uid: str) -> None:
    event_name = cacheentry.event_name(cacheentry.PodRef(namespace="ns", name=name, uid=uid), reason="CacheHit")
    assert len(event_name) <= 253
    assert DNS_SUBDOMAIN.match(event_name), event_name


def test_a_cache_hit_event_names_the_entry_its_age_and_the_time_saved() -> None:
    now = RECORDED + datetime.timedelta(hours=2, minutes=5)
    message = cacheentry.hit_message(summary(), object_name="train-x7k2p-3f2a9c1b4d5e", now=now)
    assert message == (
        "served from cache entry train-x7k2p-3f2a9c1b4d5e (id 7, key 3f2a9c1b4d5e), recorded 2h5m ago from pod "
        "pipelines/train-x7k2p-abcde; saved 1m30s of compute"
    )
    event = cacheentry.event(
        POD,
        reason="CacheHit",
        message=message,
        related=cacheentry.ObjectRef(namespace="pipelines", name="train-x7k2p-3f2a9c1b4d5e"),
        now=now,
        instance="stepcache-0",
    )
    assert event["metadata"] == {
        "name": cacheentry.event_name(POD, reason="CacheHit"),
        "namespace": "pipelines",
        "labels": {"app.kubernetes.io/managed-by": "stepcache"},
    }
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "pipelines",
        "name": "train-x7k2p-fghij",
        "uid": "9d6e-uid",
    }
    assert event["related"]["kind"] == "CacheEntry"
    assert (event["reason"], event["type"], event["count"]) == ("CacheHit", "Normal", 1)
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2025-03-01T14:05:00Z"


def test_a_recorded_event_says_where_the_result_went() -> None:
    assert cacheentry.recorded_message(summary(), object_name="train-x7k2p-3f2a9c1b4d5e") == (
        "result stored as cache entry train-x7k2p-3f2a9c1b4d5e (id 7, key 3f2a9c1b4d5e): 2 outputs, 13 bytes; "
        "identical pods will be served from it"
    )


NOW = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def served(**metadata: Any) -> dict[str, Any]:
    base = {
        "namespace": "pipelines",
        "name": "train-hit",
        "uid": "uid-1",
        "creationTimestamp": "2025-03-01T11:59:30Z",
        "labels": {"stepcache.dev/hit": "true", "stepcache.dev/cache-id": "7"},
    }
    return {"metadata": {**base, **metadata}}


def test_a_recent_hit_pod_is_announced_with_the_entry_that_served_it() -> None:
    assert cacheentry.served_pod(served(), now=NOW, window=HOUR) == (
        cacheentry.PodRef(namespace="pipelines", name="train-hit", uid="uid-1"),
        7,
    )


@pytest.mark.parametrize(
    "metadata",
    [
        {"creationTimestamp": "2025-03-01T10:59:59Z"},  # older than the window: its Event would have expired
        {"deletionTimestamp": "2025-03-01T12:00:00Z"},
        {"labels": {"stepcache.dev/hit": "false", "stepcache.dev/cache-id": "7"}},
        {"labels": {"stepcache.dev/hit": "true", "stepcache.dev/cache-id": ""}},
        {"labels": {"stepcache.dev/hit": "true", "stepcache.dev/cache-id": "7; drop"}},
        {"uid": ""},
    ],
)
def test_other_pods_are_not_announced(metadata: dict[str, Any]) -> None:
    assert cacheentry.served_pod(served(**metadata), now=NOW, window=HOUR) is None
