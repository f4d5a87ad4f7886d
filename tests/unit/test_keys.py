"""The cache key: which pods share one, which do not, and the eligibility and tag rules around it.

Pairs of pods live under tests/fixtures/keys/{same,different}/ as YAML documents with `why`, `a` and `b` (and, for
`different`, the `paths` where `differences` must find the materials apart; `options` per side when the pair is
about settings). The namespace of each side is its pod's `metadata.namespace`.
"""

from __future__ import annotations

import copy
import hashlib
import pathlib
import re
from typing import Any

import pytest
import yaml

from stepcache import errors, keys

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "keys"

# A fixed pod's key, written down: when a change to the material or its encoding moves it, this test fails and the
# change needs a new scheme name (old entries would silently stop matching).
GOLDEN_POD_KEY = "81e6c78ee10f84e32b7c5d40c153b524e27b4420de25f385fed5485c5fa54277"
GOLDEN_ARGO_KEY = "2364666f215ae4a38e60045a88c5b724412757e8b385c795e259828e4e79a8d9"


def load(name: str) -> Any:
    return yaml.safe_load((FIXTURES / name).read_text())


def pairs(kind: str) -> list[Any]:
    files = sorted((FIXTURES / kind).glob("*.yaml"))
    return [pytest.param(yaml.safe_load(path.read_text()), id=path.stem) for path in files]


def key_of(case: dict[str, Any], side: str) -> keys.Key:
    pod = case[side]
    options = keys.KeyOptions(**(case.get("options") or {}).get(side, {}))
    return keys.compute(pod, namespace=pod["metadata"].get("namespace", "default"), options=options)


# --- pairs -----------------------------------------------------------------------------------------------------------


def test_there_are_enough_pairs_to_pin_the_key_down() -> None:
    assert len(pairs("same")) + len(pairs("different")) >= 24
    assert len(pairs("same")) >= 12
    assert len(pairs("different")) >= 12


@pytest.mark.parametrize("case", pairs("same"))
def test_pods_that_compute_the_same_thing_share_a_key(case: dict[str, Any]) -> None:
    assert (case["a"], case.get("options", {}).get("a")) != (case["b"], case.get("options", {}).get("b"))
    a, b = key_of(case, "a"), key_of(case, "b")
    assert keys.differences(a.material, b.material) == [], case["why"]
    assert a.value == b.value, case["why"]


@pytest.mark.parametrize("case", pairs("different"))
def test_pods_that_may_compute_different_things_have_different_keys(case: dict[str, Any]) -> None:
    a, b = key_of(case, "a"), key_of(case, "b")
    assert a.value != b.value, case["why"]
    assert keys.differences(a.material, b.material) == case["paths"], case["why"]


# --- the key itself --------------------------------------------------------------------------------------------------


def test_a_fixed_pod_gives_a_fixed_key() -> None:
    key = keys.compute(load("pod.yaml"), namespace="ml", options=keys.KeyOptions())
    assert key.value == GOLDEN_POD_KEY


def test_a_fixed_argo_pod_gives_a_fixed_key() -> None:
    key = keys.compute(load("argo-pod.yaml"), namespace="pipelines", options=keys.KeyOptions())
    assert key.value == GOLDEN_ARGO_KEY


def test_the_key_is_the_sha256_of_the_canonical_material() -> None:
    key = keys.compute(load("pod.yaml"), namespace="ml", options=keys.KeyOptions())
    assert re.fullmatch(r"[0-9a-f]{64}", key.value)
    assert key.value == hashlib.sha256(keys.canonical_json(key.material)).hexdigest()
    assert key.value == keys.digest(key.material)


def test_the_material_holds_exactly_the_designed_fields() -> None:
    key = keys.compute(load("pod.yaml"), namespace="ml", options=keys.KeyOptions(salt="s1"))
    assert set(key.material) == {"scheme", "scope", "salt", "version", "initContainers", "containers", "volumes"}
    assert key.material["scheme"] == "stepcache/v1"
    assert key.material["scope"] == "ml"
    assert key.material["salt"] == "s1"
    assert key.material["version"] == ""
    assert key.material["initContainers"] == []
    [main] = key.material["containers"]
    assert set(main) == {"name", "image", "command", "args", "env", "envFrom", "workingDir", "volumeMounts"}
    assert [var["name"] for var in main["env"]] == ["MODE", "TOKEN"]  # RUN_ID is in stepcache.dev/ignore-env
    assert [mount["name"] for mount in main["volumeMounts"]] == ["data", "settings", "scratch"]
    assert key.material["volumes"] == {
        "data": {"persistentVolumeClaim": {"claimName": "dataset-v1"}},
        "settings": {"configMap": {"name": "train-settings", "items": []}},
        "scratch": {"emptyDir": {"medium": ""}},
    }


def test_the_service_account_is_keyed_only_when_asked() -> None:
    pod = load("pod.yaml")
    assert "serviceAccount" not in keys.compute(pod, namespace="ml", options=keys.KeyOptions()).material
    keyed = keys.compute(pod, namespace="ml", options=keys.KeyOptions(key_service_account=True))
    assert keyed.material["serviceAccount"] == "trainer"


def test_cluster_scope_ignores_the_namespace() -> None:
    pod = load("pod.yaml")
    options = keys.KeyOptions(scope="cluster")
    one = keys.compute(pod, namespace="team-a", options=options)
    two = keys.compute(pod, namespace="team-b", options=options)
    assert one.value == two.value
    assert one.material["scope"] == "*"


def test_namespace_scope_keys_the_namespace_given_not_the_pods_metadata() -> None:
    pod = load("pod.yaml")
    one = keys.compute(pod, namespace="team-a", options=keys.KeyOptions())
    two = keys.compute(pod, namespace="team-b", options=keys.KeyOptions())
    assert one.value != two.value
    assert keys.differences(one.material, two.material) == ["scope"]


def test_computing_leaves_the_pod_alone_and_the_material_apart_from_it() -> None:
    pod = load("pod.yaml")
    before = copy.deepcopy(pod)
    key = keys.compute(pod, namespace="ml", options=keys.KeyOptions())
    assert pod == before
    pod["spec"]["containers"][0]["command"].append("--changed")
    pod["spec"]["containers"][0]["env"][2]["valueFrom"]["secretKeyRef"]["name"] = "changed"
    assert keys.digest(key.material) == key.value


# --- containers ------------------------------------------------------------------------------------------------------


def test_key_containers_lists_init_containers_first_in_pod_order() -> None:
    pod = load("sidecar-injected.yaml")["running"]
    assert keys.key_containers(pod) == ("istio-init", "main", "istio-proxy")
    assert keys.compute(pod, namespace="ml", options=keys.KeyOptions()).containers == (
        "istio-init",
        "main",
        "istio-proxy",
    )


def test_a_key_over_the_admitted_containers_ignores_sidecars_injected_later() -> None:
    doc = load("sidecar-injected.yaml")
    admitted = keys.compute(doc["admitted"], namespace="ml", options=keys.KeyOptions())
    assert admitted.containers == ("main",)
    recomputed = keys.compute(doc["running"], namespace="ml", options=keys.KeyOptions(), containers=admitted.containers)
    assert recomputed == admitted
    everything = keys.compute(doc["running"], namespace="ml", options=keys.KeyOptions())
    assert everything.value != admitted.value


def test_the_named_containers_are_keyed_in_the_order_given() -> None:
    pod = load("tags.yaml")
    key = keys.compute(pod, namespace="ml", options=keys.KeyOptions(), containers=["fetch", "pinned", "main"])
    assert key.containers == ("fetch", "pinned", "main")
    assert [c["name"] for c in key.material["initContainers"]] == ["fetch"]
    assert [c["name"] for c in key.material["containers"]] == ["pinned", "main"]


@pytest.mark.parametrize(
    "containers",
    [
        pytest.param(["main", "istio-proxy"], id="missing"),
        pytest.param(["main", "main"], id="twice"),
        pytest.param([], id="none"),
        pytest.param([""], id="empty-name"),
    ],
)
def test_naming_containers_the_pod_does_not_have_is_uncacheable(containers: list[str]) -> None:
    with pytest.raises(errors.Uncacheable):
        keys.compute(load("pod.yaml"), namespace="ml", options=keys.KeyOptions(), containers=containers)


# --- Argo ------------------------------------------------------------------------------------------------------------


def test_an_argo_pod_is_keyed_from_its_template() -> None:
    key = keys.compute(load("argo-pod.yaml"), namespace="pipelines", options=keys.KeyOptions())
    assert set(key.material) == {"scheme", "scope", "salt", "version", "argo", "volumes"}
    assert set(key.material["argo"]) == {"container", "initContainers", "sidecars", "inputs", "outputs"}
    assert key.material["argo"]["container"]["args"] == ["--epochs", "3"]
    assert key.material["argo"]["inputs"] == {"parameters": [{"name": "epochs", "value": "3"}]}
    assert key.material["volumes"] == {}


def test_an_argo_pods_key_containers_are_still_the_pods() -> None:
    key = keys.compute(load("argo-pod.yaml"), namespace="pipelines", options=keys.KeyOptions())
    assert key.containers == ("init", "wait", "main")
    with pytest.raises(errors.Uncacheable):
        keys.compute(load("argo-pod.yaml"), namespace="pipelines", options=keys.KeyOptions(), containers=["other"])


def test_an_offloaded_argo_template_is_uncacheable() -> None:
    with pytest.raises(errors.Uncacheable, match="offloaded"):
        keys.compute(load("argo-offloaded.yaml"), namespace="pipelines", options=keys.KeyOptions())


def test_an_argo_step_without_a_container_or_script_is_uncacheable() -> None:
    with pytest.raises(errors.Uncacheable, match="neither a container nor a script"):
        keys.compute(load("argo-resource.yaml"), namespace="pipelines", options=keys.KeyOptions())


def test_an_argo_templates_volumes_and_the_workflows_volumes_it_mounts_are_keyed() -> None:
    pod = load("argo-pod.yaml")
    pod["spec"]["volumes"].append({"name": "workdir", "persistentVolumeClaim": {"claimName": "train-wf-7xk2p-workdir"}})
    init_env = pod["spec"]["initContainers"][0]["env"]
    [template_var] = [var for var in init_env if var["name"] == "ARGO_TEMPLATE"]
    template = yaml.safe_load(template_var["value"])
    template["container"]["volumeMounts"] = [
        {"name": "workdir", "mountPath": "/work"},
        {"name": "settings", "mountPath": "/etc/train"},
    ]
    template["volumes"] = [{"name": "settings", "configMap": {"name": "train-settings"}}]
    template_var["value"] = keys.canonical_json(template).decode()
    key = keys.compute(pod, namespace="pipelines", options=keys.KeyOptions())
    assert key.material["volumes"] == {
        "workdir": {"persistentVolumeClaim": {"claimName": "train-wf-7xk2p-workdir"}},
        "settings": {"configMap": {"name": "train-settings", "items": []}},
    }


# --- canonical JSON and differences ----------------------------------------------------------------------------------


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_utf8() -> None:
    assert keys.canonical_json({"b": [1, {"d": None, "c": True}], "a": "é✓"}) == (
        '{"a":"é✓","b":[1,{"c":true,"d":null}]}'.encode()
    )


def test_differences_names_indexed_and_dotted_paths_sorted() -> None:
    a = {"containers": [{"image": "x", "args": ["1"]}], "volumes": {"data": {"configMap": {"name": "a"}}}, "salt": ""}
    b = {"containers": [{"image": "y", "args": ["1", "2"]}], "volumes": {"data": {"configMap": {"name": "b"}}}}
    assert keys.differences(a, b) == [
        "containers[0].args[1]",
        "containers[0].image",
        "salt",
        "volumes.data.configMap.name",
    ]
    assert keys.differences(a, copy.deepcopy(a)) == []


def test_differences_tells_a_number_from_its_string() -> None:
    assert keys.differences({"args": ["1"]}, {"args": [1]}) == ["args[0]"]
    assert keys.differences({"readOnly": True}, {"readOnly": 1}) == ["readOnly"]


# --- eligibility -----------------------------------------------------------------------------------------------------


def pod_with(*, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"labels": labels or {}, "annotations": annotations or {}}, "spec": {"containers": []}}


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        pytest.param(pod_with(), None, id="plain"),
        pytest.param(pod_with(labels={"stepcache.dev/enabled": "true"}), None, id="enabled"),
        pytest.param(pod_with(labels={"stepcache.dev/enabled": "false"}), "opted-out", id="opted-out"),
        pytest.param(
            pod_with(labels={"pipelines.kubeflow.org/enable_caching": "false"}),
            "kfp-caching-disabled",
            id="kfp-enable-caching-label",
        ),
        pytest.param(
            pod_with(labels={"pipelines.kubeflow.org/cache_enabled": "false"}),
            "kfp-caching-disabled",
            id="kfp-cache-enabled-label",
        ),
        pytest.param(
            pod_with(annotations={"pipelines.kubeflow.org/enable_caching": "false"}),
            "kfp-caching-disabled",
            id="kfp-enable-caching-annotation",
        ),
        pytest.param(
            pod_with(annotations={"pipelines.kubeflow.org/cache_enabled": "false"}),
            "kfp-caching-disabled",
            id="kfp-cache-enabled-annotation",
        ),
        pytest.param(pod_with(labels={"pipelines.kubeflow.org/cache_enabled": "true"}), None, id="kfp-enabled"),
        pytest.param(
            pod_with(annotations={"pipelines.kubeflow.org/v2_component": "true"}), "kfp-v2", id="kfp-v2-annotation"
        ),
        pytest.param(pod_with(labels={"pipelines.kubeflow.org/v2_component": "true"}), "kfp-v2", id="kfp-v2-label"),
        pytest.param(pod_with(annotations={"pipelines.kubeflow.org/v2_component": "false"}), None, id="kfp-v2-false"),
        pytest.param(
            pod_with(
                labels={"stepcache.dev/enabled": "false"},
                annotations={"pipelines.kubeflow.org/v2_component": "true"},
            ),
            "opted-out",
            id="opted-out-wins",
        ),
        pytest.param({}, None, id="no-metadata"),
    ],
)
def test_skip_reason_names_why_a_pod_is_not_a_candidate(pod: dict[str, Any], reason: str | None) -> None:
    assert keys.skip_reason(pod) == reason


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        pytest.param(pod_with(labels={"pipelines.kubeflow.org/cache_enabled": "true"}), True, id="cache-enabled"),
        pytest.param(pod_with(labels={"pipelines.kubeflow.org/enable_caching": "false"}), True, id="enable-caching"),
        pytest.param(pod_with(annotations={"pipelines.kubeflow.org/cache_enabled": "true"}), True, id="as-annotation"),
        pytest.param(pod_with(labels={"pipelines.kubeflow.org/v2_component": "true"}), False, id="kfp-v2-only"),
        pytest.param(pod_with(labels={"app": "train"}), False, id="other"),
    ],
)
def test_is_kfp_recognises_kfp_v1_pods_by_their_caching_marker(pod: dict[str, Any], expected: bool) -> None:
    assert keys.is_kfp(pod) is expected


def test_ignored_env_is_read_comma_separated_and_trimmed() -> None:
    pod = pod_with(annotations={"stepcache.dev/ignore-env": " RUN_ID,STARTED_AT , ,TRACE "})
    assert keys.ignored_env(pod) == frozenset({"RUN_ID", "STARTED_AT", "TRACE"})
    assert keys.ignored_env(pod_with()) == frozenset()


def test_the_version_annotation_goes_into_the_key() -> None:
    pod = load("pod.yaml")
    pod["metadata"]["annotations"]["stepcache.dev/version"] = "2024-06"
    assert keys.compute(pod, namespace="ml", options=keys.KeyOptions()).material["version"] == "2024-06"


# --- tags ------------------------------------------------------------------------------------------------------------


def test_tag_only_images_lists_the_keyed_images_without_a_digest_once_each() -> None:
    pod = load("tags.yaml")
    assert keys.tag_only_images(pod, keys.key_containers(pod)) == [
        "busybox:1.36",
        "registry.example.com:5000/tools/helper",
    ]
    assert keys.tag_only_images(pod, ["main", "pinned"]) == []
    assert keys.tag_only_images(pod, ["helper"]) == ["registry.example.com:5000/tools/helper"]


def test_tag_only_images_of_an_argo_pod_are_the_templates_not_argoexec() -> None:
    pod = load("argo-tags.yaml")
    assert keys.tag_only_images(pod, keys.key_containers(pod)) == ["python:3.12"]
    assert keys.tag_only_images(load("argo-pod.yaml"), ("init", "wait", "main")) == []


def test_tag_warning_reads_exactly_as_designed() -> None:
    assert keys.tag_warning("busybox:1.36") == (
        'image "busybox:1.36" is referenced by tag; a cached result assumes the tag does not move — '
        "pin a digest (busybox@sha256:...) to be exact"
    )


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        pytest.param("registry.example.com:5000/tools/helper", "registry.example.com:5000/tools/helper", id="port"),
        pytest.param("registry.example.com:5000/tools/helper:2.1", "registry.example.com:5000/tools/helper", id="tag"),
        pytest.param("ghcr.io/org/app:v1", "ghcr.io/org/app", id="path"),
    ],
)
def test_tag_warning_suggests_the_repository_with_a_digest(image: str, repository: str) -> None:
    assert f"pin a digest ({repository}@sha256:...)" in keys.tag_warning(image)
