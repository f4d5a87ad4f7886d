"""Bad input at admission: every class the fuzzer found ends in a clear outcome, never in an internal error.

Some of these reach the webhook through a real API server (Argo's template is JSON inside a string, which nobody
validates), others only through a direct POST (a `metadata` that is not an object). Either way the pod is admitted,
runs uncached, and the warning names the field and says why. A store that would serve a hit is behind every case,
so the hit path (which reads the most of the template) is exercised too.
"""

from __future__ import annotations

import copy
import datetime
import json
import pathlib
from collections.abc import Callable
from typing import Any, cast

import pytest
import yaml

from stepcache import admission, argo, config, errors, keys, kube, model, mutation, references, runtime, store

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"
SIGNING_KEY = b"unit-test-signing-key-0123456789abcdef"
NAMESPACES = ("team-a", "pipelines", "kubeflow-user")


def view() -> references.ReferenceView:
    known = references.ReferenceView()
    for namespace in NAMESPACES:
        known.put_configmap(namespace, "kube-root-ca.crt", data={"ca.crt": "---CA---"}, binary_data=None)
    known.put_configmap("team-a", "train-config", data={"epochs": "10"}, binary_data=None)
    return known


class ServingStore:
    """A store that has an entry for every key: the hit path runs for every keyable pod."""

    def __init__(self) -> None:
        self.lookups = 0

    async def lookup(self, *, namespace: str, cache_key: str, max_age: datetime.timedelta | None) -> model.CachedEntry:
        self.lookups += 1
        return model.CachedEntry(
            id=7,
            namespace=namespace,
            cache_key=cache_key,
            termination_messages={"train": "done\n", "main": "ok"},
            argo_outputs={"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"},
            source_pod="source-pod",
            finished_at=datetime.datetime.now(datetime.UTC),
            duration_seconds=1.0,
        )

    def note_hit(self, entry_id: int) -> None:
        pass


def make_runtime() -> runtime.Runtime:
    namespaces = runtime.OptedInNamespaces()
    for namespace in NAMESPACES:
        namespaces.add(namespace)
    return runtime.Runtime(
        settings=config.Settings(database_url="postgresql://unused", db_timeout=1.0),
        store=cast(store.Store, ServingStore()),
        kube=cast(kube.Kube, None),
        signing_key=SIGNING_KEY,
        namespaces=namespaces,
        key_options=keys.KeyOptions(),
        replay_options=mutation.ReplayOptions(cache_image="busybox:1.36.1"),
        references=view(),
    )


def load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((FIXTURES / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def job() -> dict[str, Any]:
    return load("pods/job-pod.yaml")


def argo_pod() -> dict[str, Any]:
    return load("pods/argo-3.6-pod.yaml")


def with_template(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The Argo 3.6 pod with its template (ARGO_TEMPLATE of `init`) changed by `edit`."""
    pod = argo_pod()
    tmpl = argo.template(pod)
    assert tmpl is not None
    edit(tmpl)
    return with_raw_template(json.dumps(tmpl), pod=pod)


def with_raw_template(raw: str, *, pod: dict[str, Any] | None = None) -> dict[str, Any]:
    pod = argo_pod() if pod is None else pod
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        for var in container.get("env") or []:
            if var["name"] == argo.TEMPLATE_ENV:
                var["value"] = raw
    return pod


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def decide(pod: dict[str, Any]) -> admission.Verdict:
    return await admission.decide(make_runtime(), pod, dryrun=False)


def set_in(pod: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`pod` with `value` at a dotted path (list indexes as numbers)."""
    target: Any = pod
    *steps, last = [int(step) if step.isdigit() else step for step in path.split(".")]
    for step in steps:
        target = target[step]
    target[last] = value
    return pod


def annotated(pod: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    pod["metadata"]["annotations"][name] = value
    return pod


def set_param(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(tmpl: dict[str, Any]) -> None:
        tmpl["outputs"]["parameters"][0][field] = value

    return edit


def replace(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(tmpl: dict[str, Any]) -> None:
        tmpl[field] = value

    return edit


def outputs_parameters(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(tmpl: dict[str, Any]) -> None:
        tmpl["outputs"]["parameters"] = value

    return edit


# --- the Argo template: JSON inside a string, reachable through a real API server --------------------------------

TEMPLATE_CASES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "nested 200 deep": (lambda: with_template(replace("inputs", json.loads(nested(200)))), "nested more than"),
    "nested 100000 deep": (lambda: with_raw_template('{"inputs":' + nested(100_000) + "}"), "nested more than"),
    "larger than the bound": (
        lambda: with_template(replace("zzPadding", "x" * (argo.MAX_TEMPLATE_LENGTH + 1))),
        "larger than",
    ),
    "outputs a string": (lambda: with_template(replace("outputs", "x")), "outputs must be an object"),
    "outputs.parameters a string": (
        lambda: with_template(outputs_parameters("abc")),
        "outputs.parameters must be a list of objects",
    ),
    "an output parameter a number": (
        lambda: with_template(outputs_parameters([5])),
        "outputs.parameters[0] must be an object",
    ),
    "an output parameter's name a list": (
        lambda: with_template(set_param("name", ["length"])),
        "outputs.parameters[0].name must be a string",
    ),
    "an output parameter's valueFrom a string": (
        lambda: with_template(set_param("valueFrom", "/tmp/x")),
        "outputs.parameters[0].valueFrom must be an object",
    ),
    "an output parameter's path a number": (
        lambda: with_template(set_param("valueFrom", {"path": 5})),
        "outputs.parameters[0].valueFrom.path must be a string",
    ),
    "script a string": (lambda: with_template(replace("script", "print(1)")), "script must be an object"),
    "a number too long for Python's int": (lambda: with_raw_template('{"x":' + "1" * 5000 + "}"), "not valid JSON"),
}


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=list(TEMPLATE_CASES))
async def test_a_malformed_argo_template_runs_the_pod_uncached_with_a_warning_naming_the_field(case: str) -> None:
    build, reason = TEMPLATE_CASES[case]
    pod = build()

    verdict = await decide(pod)

    assert verdict.outcome == "uncacheable", verdict
    assert verdict.patch == mutation.skip_patch(pod)
    [warning] = verdict.warnings
    assert warning.startswith("stepcache: the Argo template"), warning
    assert reason in warning, warning
    assert warning.endswith("; the pod runs uncached")


def test_a_template_nested_deeper_than_the_recursion_limit_is_refused_by_the_parser_too() -> None:
    pod = with_raw_template('{"inputs":' + nested(100_000) + "}")
    with pytest.raises(errors.Uncacheable, match="nested more than 64 levels"):
        argo.template(pod)


def test_a_template_of_ordinary_depth_is_read() -> None:
    pod = with_template(replace("inputs", {"parameters": [{"name": "p", "value": json.dumps(json.loads(nested(60)))}]}))
    tmpl = argo.template(pod)
    assert tmpl is not None
    assert tmpl["inputs"]["parameters"][0]["name"] == "p"


# --- the pod itself: only a direct POST sends these (the API server checks a Pod's types) ------------------------

POD_CASES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "metadata a string": (lambda: set_in(job(), "metadata", "x"), "metadata must be an object"),
    "metadata a list": (lambda: set_in(job(), "metadata", ["a"]), "metadata must be an object"),
    "labels a list": (lambda: set_in(job(), "metadata.labels", ["x"]), "metadata.labels must be an object"),
    "an annotation a number": (
        lambda: annotated(job(), "stepcache.dev/max-staleness", 5),
        "metadata.annotations['stepcache.dev/max-staleness'] must be a string",
    ),
    "spec a string": (lambda: set_in(job(), "spec", "x"), "spec must be an object"),
    "containers an object": (
        lambda: set_in(job(), "spec.containers", {"train": {}}),
        "spec.containers must be a list of objects",
    ),
    "an env item a string": (
        lambda: set_in(job(), "spec.containers.0.env", ["A=1"]),
        "spec.containers[0].env[0] must be an object",
    ),
    "an env name a list": (
        lambda: set_in(job(), "spec.containers.0.env", [{"name": ["A"], "value": "1"}]),
        "spec.containers[0].env[0].name must be a string",
    ),
    "a volume mount a number": (
        lambda: set_in(job(), "spec.containers.0.volumeMounts", [1]),
        "spec.containers[0].volumeMounts[0] must be an object",
    ),
    "a volume mount's name an object": (
        lambda: set_in(job(), "spec.containers.0.volumeMounts", [{"name": {}, "mountPath": "/x"}]),
        "spec.containers[0].volumeMounts[0].name must be a string",
    ),
    "a volume a string": (lambda: set_in(job(), "spec.volumes", ["data"]), "spec.volumes[0] must be an object"),
    "a projected volume's sources a number": (
        lambda: set_in(job(), "spec.volumes", [{"name": "p", "projected": {"sources": 3}}]),
        "spec.volumes[0].projected.sources must be a list of objects",
    ),
    "a container's resources a list": (
        lambda: set_in(job(), "spec.containers.0.resources", ["cpu"]),
        "spec.containers[0].resources must be an object",
    ),
    "a command a string": (
        lambda: set_in(job(), "spec.containers.0.command", "echo hi"),
        "spec.containers[0].command must be a list of strings",
    ),
    "a pod security context a string": (
        lambda: set_in(job(), "spec.securityContext", "restricted"),
        "spec.securityContext must be an object",
    ),
    "a sysctl a string": (
        lambda: set_in(job(), "spec.securityContext", {"sysctls": ["net.ipv4.ip_forward=1"]}),
        "spec.securityContext.sysctls[0] must be an object",
    ),
    "an init container null (found by the fuzzer)": (
        lambda: set_in(job(), "spec.initContainers", [None, *job()["spec"]["initContainers"]]),
        "spec.initContainers[0] must be an object",
    ),
    "an annotation null": (
        lambda: annotated(job(), "stepcache.dev/key", None),
        "metadata.annotations['stepcache.dev/key'] must be a string",
    ),
    "no containers, only init containers (found by the fuzzer)": (
        lambda: set_in(job(), "spec", {k: v for k, v in job()["spec"].items() if k != "containers"}),
        "spec.containers is required",
    ),
    "an empty list of containers": (
        lambda: set_in(job(), "spec.containers", []),
        "spec.containers must hold at least 1",
    ),
    "a node selector a list": (
        lambda: set_in(job(), "spec.nodeSelector", ["gpu"]),
        "spec.nodeSelector must be an object",
    ),
}


@pytest.mark.parametrize("case", POD_CASES, ids=list(POD_CASES))
async def test_a_pod_of_the_wrong_shape_runs_uncached_with_a_warning_naming_the_field(case: str) -> None:
    build, reason = POD_CASES[case]
    pod = build()

    verdict = await decide(pod)

    assert verdict.outcome == "uncacheable", verdict
    assert verdict.patch == mutation.skip_patch(pod)
    assert verdict.warnings == (f"stepcache: {reason}; the pod runs uncached",)


async def test_a_pod_of_the_wrong_shape_still_loses_the_stepcache_names_its_author_wrote() -> None:
    pod = job()
    pod["metadata"]["labels"][mutation.HIT] = "true"
    pod["spec"]["containers"][0]["env"] = "A=1"

    verdict = await decide(pod)

    assert verdict.outcome == "uncacheable"
    assert mutation.apply_merge_patch(pod, verdict.patch)["metadata"]["labels"].get(mutation.HIT) is None


async def test_a_namespace_that_is_not_a_string_is_named_too() -> None:
    pod = set_in(job(), "metadata.namespace", ["team-a"])

    verdict = await decide(pod)

    assert verdict.outcome == "uncacheable"
    assert verdict.warnings == ("stepcache: metadata.namespace must be a string; the pod runs uncached",)


async def test_a_well_formed_pod_is_still_served_from_the_cache() -> None:
    for pod in (job(), argo_pod(), load("pods/kfp-v1-pod.yaml")):
        verdict = await decide(copy.deepcopy(pod))
        assert verdict.outcome == "hit", verdict
