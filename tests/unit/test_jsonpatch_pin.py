"""The jsonpatch pin is correct on stepcache's own patches.

kopf turns a handler's merge patch into the JSON patch the API server receives by diffing the whole pod
(`kopf.Patch.as_json_patch`), and jsonpatch 1.33 makes that diff ~6x cheaper than 1.48 (shared/KOPF.md). A diff
library earns its pin only by producing the right pod: for every fixture pod and every patch admission can build
(skip, miss, hit, with user-forged names and pod-level fields to drop), the ops kopf produces, applied with the
installed jsonpatch to the original pod, must give exactly the pod `mutation.apply_merge_patch` describes.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import pathlib
import tomllib
from collections.abc import Iterator
from typing import Any, cast

import jsonpatch
import kopf
import pytest
import yaml

from stepcache import model, mutation

ROOT = pathlib.Path(__file__).parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "pods"
SIGNED = mutation.Signed(key="ab" * 32, key_containers=("init", "wait", "main"), signature="cd" * 32)
ENTRY = model.CachedEntry(
    id=7,
    namespace="team-a",
    cache_key="ab" * 32,
    termination_messages={"train": "done\n", "report": "ok"},
    argo_outputs={"parameters": {"length": "9", "upper": "STEPCACHE"}, "result": "9"},
    source_pod="earlier-pod",
    finished_at=datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
    duration_seconds=12.5,
)


def load(name: str) -> dict[str, Any]:
    with (FIXTURES / f"{name}.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


def variants() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in ("job-pod", "argo-3.6-pod", "kfp-v1-pod"):
        pod = load(name)
        yield name, pod
        forged = copy.deepcopy(pod)
        forged["metadata"]["labels"].update({mutation.CACHE_ID: "1", mutation.HIT: "true"})
        forged["metadata"]["annotations"].update({mutation.KEY: "x", mutation.KEY_SIGNATURE: "y"})
        yield f"{name}-forged", forged
    only_ours = load("job-pod")
    only_ours["metadata"]["labels"] = {mutation.CACHE_ID: "1"}
    only_ours["metadata"]["annotations"] = {
        mutation.KEY: "x",
        mutation.KEY_CONTAINERS: "a",
        mutation.KEY_SIGNATURE: "y",
    }
    yield "job-pod-only-stepcache-metadata", only_ours
    rootish = load("job-pod")
    rootish["spec"]["securityContext"] = {
        "runAsUser": 0,
        "fsGroup": 0,
        "seccompProfile": {"type": "Unconfined"},
        "sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}, {"name": "kernel.msgmax", "value": "1"}],
    }
    yield "job-pod-root", rootish
    emptied = load("job-pod")
    emptied["spec"]["securityContext"] = {"runAsNonRoot": False}
    emptied["spec"]["volumes"] = [v for v in emptied["spec"]["volumes"] if "persistentVolumeClaim" in v]
    yield "job-pod-security-and-volumes-emptied", emptied


def cases() -> Iterator[Any]:
    keep = mutation.ReplayOptions(cache_image="replay:1", keep_node_constraints=True)
    drop = mutation.ReplayOptions(cache_image="replay:1")
    for label, pod in variants():
        yield pytest.param(pod, mutation.skip_patch(pod), id=f"{label}-skip")
        yield pytest.param(pod, mutation.miss_patch(pod, signed=SIGNED), id=f"{label}-miss")
        for options in (drop, keep):
            patch = mutation.hit_patch(pod, signed=SIGNED, entry=ENTRY, options=options, kfp=label.startswith("kfp"))
            suffix = "-keep-node-constraints" if options.keep_node_constraints else ""
            yield pytest.param(pod, patch, id=f"{label}-hit{suffix}")


def test_the_installed_jsonpatch_is_the_pinned_one() -> None:
    with (ROOT / "pyproject.toml").open("rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    pins = [dep.split("==", 1)[1] for dep in dependencies if dep.startswith("jsonpatch==")]

    assert pins == [importlib.metadata.version("jsonpatch")]


@pytest.mark.parametrize(("pod", "patch"), list(cases()))
def test_kopfs_json_patch_gives_the_merged_pod(pod: dict[str, Any], patch: dict[str, Any]) -> None:
    before = copy.deepcopy(pod)

    ops = kopf.Patch(copy.deepcopy(patch)).as_json_patch(cast(kopf.RawBody, pod))
    applied = jsonpatch.apply_patch(pod, ops)

    assert applied == mutation.apply_merge_patch(pod, patch)
    assert pod == before
