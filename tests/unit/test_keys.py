"""The cache key: which pods share one, which do not, and the eligibility and tag rules around it.

Pairs of pods live under tests/fixtures/keys/{same,different}/, one YAML document each:

- `why`: what the pair shows.
- `a`, `b`: the two pods, written out in full; or, with `base` (a fixture file, relative to tests/fixtures/keys),
  edits of that pod: `set` (path → value), then `append` (path of a list → element), then `remove` (list of paths).
  A side that is left out is the base as it is. Paths are dotted, with `[0]` for a list index and `['a.b/c']` for a
  field whose name holds dots.
- `options` (optional): `KeyOptions` fields per side, e.g. `{b: {salt: s1}}`.
- `references` (optional): per side, ConfigMaps and Secrets that side's view knows instead of (or besides) those in
  tests/fixtures/keys/references.yaml, under `configmaps`/`secrets` as `namespace/name` → `{data, binaryData}` /
  `{stringData}` (plain values, encoded here as the API would send them).
- `paths` (`different` only): exactly where `keys.differences` finds the two materials apart.

The namespace of each side is its pod's `metadata.namespace`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from stepcache import errors, keys, mutation, references

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "keys"
HMAC_KEY = b"unit-test-hmac-key-0123456789abcdef"

# A fixed pod's key, written down: when a change to the material or its encoding moves it, this test fails and the
# change needs a new scheme name (old entries would silently stop matching). The pod's key covers the ConfigMaps of
# tests/fixtures/keys/references.yaml.
GOLDEN_POD_KEY = "bbaae284bc4a2ff5f63295352fbdadd0f68eec22eb59658e7bc6d2bdac2b3bfa"
GOLDEN_ARGO_KEY = "d32faa6fede18d447880c76ade3734caea83a3bb5fdaf6ff621564b323cba49a"


def load(name: str) -> Any:
    return yaml.safe_load((FIXTURES / name).read_text())


# --- the fixture format ----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\[(\d+)\]|\['([^']*)'\]|([^.\[\]]+)")


def parse_path(path: str) -> list[str | int]:
    """`spec.containers[0].env` → ["spec", "containers", 0, "env"]; `metadata.annotations['a.b/c']` keeps the dots."""
    steps: list[str | int] = []
    position = 0
    while position < len(path):
        if path[position] == ".":
            position += 1
            continue
        match = _TOKEN.match(path, position)
        assert match is not None, f"bad path {path!r} at {position}"
        index, quoted, name = match.groups()
        steps.append(int(index) if index is not None else quoted if quoted is not None else name)
        position = match.end()
    return steps


def _parent(obj: Any, steps: list[str | int], *, create: bool) -> Any:
    for step, following in itertools.pairwise(steps):
        if isinstance(step, str) and create and step not in obj:
            obj[step] = [] if isinstance(following, int) else {}
        obj = obj[step]
    return obj


def edited(base: Mapping[str, Any], edits: Mapping[str, Any] | None) -> dict[str, Any]:
    pod = copy.deepcopy(dict(base))
    for path, value in ((edits or {}).get("set") or {}).items():
        steps = parse_path(path)
        _parent(pod, steps, create=True)[steps[-1]] = copy.deepcopy(value)
    for path, value in ((edits or {}).get("append") or {}).items():
        steps = parse_path(path)
        parent = _parent(pod, steps, create=True)
        parent.setdefault(steps[-1], []).append(copy.deepcopy(value))
    for path in (edits or {}).get("remove") or []:
        steps = parse_path(path)
        del _parent(pod, steps, create=False)[steps[-1]]
    return pod


def side(case: Mapping[str, Any], name: str) -> dict[str, Any]:
    if "base" in case:
        return edited(load(case["base"]), case.get(name))
    pod = case[name]
    assert isinstance(pod, dict)
    return pod


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def view_for(extra: Mapping[str, Any] | None = None) -> references.ReferenceView:
    """A view knowing tests/fixtures/keys/references.yaml, with `extra` (same format) added or replacing."""
    known = load("references.yaml")
    view = references.ReferenceView()
    for kind in ("configmaps", "secrets"):
        for where, body in {**known.get(kind, {}), **((extra or {}).get(kind) or {})}.items():
            namespace, _, name = where.partition("/")
            if kind == "configmaps":
                view.put_configmap(
                    namespace,
                    name,
                    data=body.get("data"),
                    binary_data={k: b64(v) for k, v in (body.get("binaryData") or {}).items()},
                )
            else:
                encoded = {k: b64(str(v)) for k, v in (body.get("stringData") or {}).items()}
                view.put_secret(namespace, name, data=encoded, hmac_key=HMAC_KEY)
    return view


def key_of(case: Mapping[str, Any], name: str) -> keys.Key:
    pod = side(case, name)
    options = keys.KeyOptions(**(case.get("options") or {}).get(name, {}))
    view = view_for((case.get("references") or {}).get(name))
    return keys.compute(pod, namespace=pod["metadata"].get("namespace", "default"), options=options, references=view)


def pairs(kind: str) -> list[Any]:
    files = sorted((FIXTURES / kind).glob("*.yaml"))
    return [pytest.param(yaml.safe_load(path.read_text()), id=path.stem) for path in files]


def compute(pod: Mapping[str, Any], namespace: str, **options: Any) -> keys.Key:
    return keys.compute(pod, namespace=namespace, options=keys.KeyOptions(**options), references=view_for())


def test_the_fixture_edits_do_what_they_say() -> None:
    pod = {"metadata": {"annotations": {}}, "spec": {"containers": [{"name": "a", "env": [{"name": "X"}]}]}}
    result = edited(
        pod,
        {
            "set": {"metadata.annotations['stepcache.dev/version']": "2", "spec.containers[0].tty": True},
            "append": {"spec.containers[0].env": {"name": "Y"}, "spec.volumes": {"name": "v"}},
            "remove": ["spec.containers[0].env[0]"],
        },
    )
    assert result == {
        "metadata": {"annotations": {"stepcache.dev/version": "2"}},
        "spec": {"containers": [{"name": "a", "env": [{"name": "Y"}], "tty": True}], "volumes": [{"name": "v"}]},
    }
    assert pod["spec"]["containers"][0]["env"] == [{"name": "X"}]


# --- pairs -----------------------------------------------------------------------------------------------------------


def test_there_are_enough_pairs_to_pin_the_key_down() -> None:
    assert len(pairs("same")) >= 30
    assert len(pairs("different")) >= 45


@pytest.mark.parametrize("case", pairs("same"))
def test_pods_that_compute_the_same_thing_share_a_key(case: dict[str, Any]) -> None:
    sides = [(side(case, n), (case.get("options") or {}).get(n), (case.get("references") or {}).get(n)) for n in "ab"]
    assert sides[0] != sides[1], "a pair of identical sides shows nothing"
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
    assert compute(load("pod.yaml"), "ml").value == GOLDEN_POD_KEY


def test_a_fixed_argo_pod_gives_a_fixed_key() -> None:
    assert compute(load("argo-pod.yaml"), "pipelines").value == GOLDEN_ARGO_KEY


def test_the_key_is_the_sha256_of_the_canonical_material() -> None:
    key = compute(load("pod.yaml"), "ml")
    assert re.fullmatch(r"[0-9a-f]{64}", key.value)
    assert key.value == hashlib.sha256(keys.canonical_json(key.material)).hexdigest()
    assert key.value == keys.digest(key.material)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_material_holds_the_pod_minus_the_exclusions() -> None:
    key = compute(load("pod.yaml"), "ml", salt="s1")
    assert key.material == {
        "scheme": "stepcache/v2",
        "scope": "ml",
        "salt": "s1",
        "version": "",
        "ignoreEnv": ["RUN_ID", "STARTED_AT"],
        "pod": {"restartPolicy": "Never"},
        "initContainers": [],
        "containers": [
            {
                "name": "main",
                "image": "registry.example.com/ml/train@sha256:" + "3f" * 32,
                "command": ["python", "-m", "train"],
                "args": ["--epochs", "3"],
                "env": [
                    {"name": "MODE", "value": "fast"},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                ],
                "envFrom": [{"configMapRef": {"name": "train-env"}}],
                "workingDir": "/work",
                "volumeMounts": [
                    {"name": "data", "mountPath": "/data", "readOnly": True},
                    {"name": "settings", "mountPath": "/etc/train"},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            }
        ],
        "volumes": {
            "data": {"persistentVolumeClaim": {"claimName": "dataset-v1"}},
            "settings": {"configMap": {"name": "train-settings"}},
            "scratch": {"emptyDir": {}},
        },
        "configMaps": {
            "train-env": {"BATCH": sha256_hex("32"), "LOG_LEVEL": sha256_hex("info")},
            "train-settings": {"fast.yaml": sha256_hex("epochs: 3\n"), "slow.yaml": sha256_hex("epochs: 30\n")},
        },
    }


def test_the_service_account_is_keyed_only_when_asked() -> None:
    pod = load("pod.yaml")
    assert "serviceAccount" not in compute(pod, "ml").material
    pod["spec"]["automountServiceAccountToken"] = False
    keyed = compute(pod, "ml", key_service_account=True)
    assert keyed.material["serviceAccount"] == "trainer"
    assert keyed.material["pod"] == {"restartPolicy": "Never", "automountServiceAccountToken": False}


def test_cluster_scope_ignores_the_namespace() -> None:
    pod = load("pod.yaml")
    one = keys.compute(pod, namespace="ml", options=keys.KeyOptions(scope="cluster"), references=view_for())
    two = keys.compute(pod, namespace="ml-staging", options=keys.KeyOptions(scope="cluster"), references=view_for())
    assert one.value == two.value
    assert one.material["scope"] == "*"


def test_namespace_scope_keys_the_namespace_given_not_the_pods_metadata() -> None:
    pod = load("pod.yaml")
    one = compute(pod, "ml")
    two = compute(pod, "ml-staging")
    assert one.value != two.value
    assert keys.differences(one.material, two.material) == ["scope"]


def test_computing_leaves_the_pod_alone_and_the_material_apart_from_it() -> None:
    pod = load("pod.yaml")
    before = copy.deepcopy(pod)
    key = compute(pod, "ml")
    assert pod == before
    pod["spec"]["containers"][0]["command"].append("--changed")
    pod["spec"]["containers"][0]["env"][2]["valueFrom"]["secretKeyRef"]["name"] = "changed"
    pod["spec"]["volumes"][1]["configMap"]["name"] = "changed"
    assert keys.digest(key.material) == key.value


def test_a_field_the_code_has_never_heard_of_is_keyed() -> None:
    pod = load("pod.yaml")
    pod["spec"]["containers"][0]["futureSandboxing"] = {"mode": "strict"}
    pod["spec"]["futurePodFeature"] = True
    pod["spec"]["volumes"][0]["persistentVolumeClaim"]["futureOption"] = "x"
    key = compute(pod, "ml")
    assert keys.differences(compute(load("pod.yaml"), "ml").material, key.material) == [
        "containers[0].futureSandboxing",
        "pod.futurePodFeature",
        "volumes.data.persistentVolumeClaim.futureOption",
    ]


# --- references ------------------------------------------------------------------------------------------------------


def test_a_configmap_the_view_does_not_know_makes_the_pod_uncacheable_optional_or_not() -> None:
    pod = load("pod.yaml")
    pod["spec"]["volumes"][1]["configMap"] = {"name": "not-there-yet", "optional": True}
    with pytest.raises(errors.Uncacheable, match=r"^ConfigMap ml/not-there-yet is not known yet$"):
        compute(pod, "ml")


def test_only_the_keys_a_reference_uses_are_keyed() -> None:
    pod = load("pod.yaml")
    pod["spec"]["containers"][0]["env"].append(
        {"name": "FLAG", "valueFrom": {"configMapKeyRef": {"name": "flags", "key": "fast", "optional": True}}}
    )
    pod["spec"]["containers"][0]["env"].append(
        {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "flags", "key": "absent", "optional": True}}}
    )
    pod["spec"]["volumes"][1]["configMap"]["items"] = [{"key": "slow.yaml", "path": "config.yaml"}]
    view = view_for({"configmaps": {"ml/flags": {"data": {"fast": "yes", "other": "no"}}}})
    key = keys.compute(pod, namespace="ml", options=keys.KeyOptions(), references=view)
    assert key.material["configMaps"] == {
        "flags": {"fast": sha256_hex("yes"), "absent": None},
        "train-env": {"BATCH": sha256_hex("32"), "LOG_LEVEL": sha256_hex("info")},
        "train-settings": {"slow.yaml": sha256_hex("epochs: 30\n")},
    }


def test_the_token_volumes_root_ca_is_not_looked_up() -> None:
    view = references.ReferenceView()
    view.put_configmap("ml", "train-env", data={}, binary_data=None)
    view.put_configmap("ml", "train-settings", data={}, binary_data=None)
    key = keys.compute(load("pod.yaml"), namespace="ml", options=keys.KeyOptions(), references=view)
    assert set(key.material["configMaps"]) == {"train-env", "train-settings"}


def test_secrets_are_keyed_by_name_and_items_unless_their_content_is_asked_for() -> None:
    pod = load("pod.yaml")
    plain = compute(pod, "ml")
    assert "secrets" not in plain.material
    with_content = compute(pod, "ml", key_secret_content=True)
    digest = with_content.material["secrets"]["creds"]["token"]
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != sha256_hex("s3cr3t")
    empty = references.ReferenceView()
    empty.put_configmap("ml", "train-env", data={}, binary_data=None)
    empty.put_configmap("ml", "train-settings", data={}, binary_data=None)
    with pytest.raises(errors.Uncacheable, match=r"^Secret ml/creds is not known yet$"):
        keys.compute(pod, namespace="ml", options=keys.KeyOptions(key_secret_content=True), references=empty)


def test_without_a_view_configmaps_are_keyed_by_name_and_the_material_says_so() -> None:
    pod = load("pod.yaml")
    key = keys.compute(pod, namespace="ml", options=keys.KeyOptions(), references=references.Unresolved())
    assert key.material["configMapContent"] == "unresolved"
    assert "configMaps" not in key.material
    assert key.value != compute(pod, "ml").value
    secrets = keys.compute(
        pod, namespace="ml", options=keys.KeyOptions(key_secret_content=True), references=references.Unresolved()
    )
    assert secrets.material["secretContent"] == "unresolved"


# --- the downward API ------------------------------------------------------------------------------------------------


def with_downward(pod: dict[str, Any], *env: dict[str, Any]) -> dict[str, Any]:
    pod["spec"]["containers"][0]["env"].extend(env)
    return pod


def field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def test_labels_and_annotations_read_through_the_downward_api_are_keyed_by_value() -> None:
    pod = with_downward(
        load("pod.yaml"),
        field_env("TEAM", "metadata.labels['team']"),
        field_env("OWNER", "metadata.annotations['owner']"),
        field_env("NOPE", "metadata.labels['absent']"),
        field_env("NAME", "metadata.name"),
        field_env("NODE", "spec.nodeName"),
    )
    env = compute(pod, "ml").material["containers"][0]["env"]
    assert env[2:] == [
        {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']", "value": "vision"}}},
        {"name": "OWNER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['owner']", "value": "alice"}}},
        {"name": "NOPE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['absent']", "value": ""}}},
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]


def test_whole_label_and_annotation_maps_are_keyed_without_stepcaches_own_names() -> None:
    pod = load("pod.yaml")
    pod["spec"]["volumes"].append(
        {
            "name": "podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                    {"path": "key", "fieldRef": {"fieldPath": "metadata.annotations['stepcache.dev/key']"}},
                ]
            },
        }
    )
    pod["spec"]["containers"][0]["volumeMounts"].append({"name": "podinfo", "mountPath": "/etc/podinfo"})
    before = compute(pod, "ml")
    admitted = mutation.apply_merge_patch(
        pod,
        mutation.miss_patch(pod, signed=mutation.Signed(key="ab" * 32, key_containers=("main",), signature="cd" * 32)),
    )
    after = compute(admitted, "ml")
    assert after.value == before.value
    items = after.material["volumes"]["podinfo"]["downwardAPI"]["items"]
    assert items[0]["fieldRef"]["value"] == {"app": "train", "team": "vision"}
    assert items[1]["fieldRef"]["value"] == {"stepcache.dev/ignore-env": "RUN_ID, STARTED_AT", "owner": "alice"}
    assert items[2]["fieldRef"] == {"fieldPath": "metadata.annotations['stepcache.dev/key']"}


def test_stepcaches_own_names_are_the_ones_admission_writes() -> None:
    assert set(mutation.OWNED_LABELS) | {mutation.KFP_REUSED} == keys.OWN_LABELS
    assert set(mutation.OWNED_ANNOTATIONS) == keys.OWN_ANNOTATIONS


def test_a_resource_read_through_the_downward_api_is_keyed_by_value() -> None:
    pod = with_downward(
        load("pod.yaml"),
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
    )
    env = compute(pod, "ml").material["containers"][0]["env"]
    assert env[2:] == [
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "value": "500m"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "value": None}}},
    ]


# --- containers ------------------------------------------------------------------------------------------------------


def test_key_containers_lists_init_containers_first_in_pod_order() -> None:
    pod = load("sidecar-injected.yaml")["running"]
    assert keys.key_containers(pod) == ("istio-init", "main", "istio-proxy")
    assert compute(pod, "ml").containers == ("istio-init", "main", "istio-proxy")


def test_a_key_over_the_admitted_containers_ignores_sidecars_injected_later() -> None:
    doc = load("sidecar-injected.yaml")
    admitted = compute(doc["admitted"], "ml")
    assert admitted.containers == ("main",)
    recomputed = keys.compute(
        doc["running"],
        namespace="ml",
        options=keys.KeyOptions(),
        references=view_for(),
        containers=admitted.containers,
    )
    assert recomputed == admitted
    everything = compute(doc["running"], "ml")
    assert everything.value != admitted.value


def test_the_named_containers_are_keyed_in_the_order_given() -> None:
    pod = load("tags.yaml")
    key = keys.compute(
        pod,
        namespace="ml",
        options=keys.KeyOptions(),
        references=view_for(),
        containers=["fetch", "pinned", "main"],
    )
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
        keys.compute(
            load("pod.yaml"), namespace="ml", options=keys.KeyOptions(), references=view_for(), containers=containers
        )


# --- Argo ------------------------------------------------------------------------------------------------------------


def test_an_argo_pod_is_keyed_from_its_own_containers_plus_what_only_the_template_shows() -> None:
    key = compute(load("argo-pod.yaml"), "pipelines")
    assert key.containers == ("init", "wait", "main")
    assert key.material["argo"] == {
        "inputs": {"parameters": [{"name": "epochs", "value": "3"}]},
        "outputs": {"parameters": [{"name": "accuracy", "valueFrom": {"path": "/tmp/accuracy"}}]},
    }
    main = key.material["containers"][1]
    assert main["command"] == ["/var/run/argo/argoexec", "emissary", "--", "python", "-m", "train"]
    assert main["args"] == ["--epochs", "3"]
    assert [var["name"] for var in main["env"]] == ["ARGO_CONTAINER_NAME"]
    init_env = [var["name"] for var in key.material["initContainers"][0]["env"]]
    assert init_env == ["ARGO_CONTAINER_NAME", "ARGO_PROGRESS_FILE"]
    assert key.material["volumes"] == {"var-run-argo": {"emptyDir": {}}}


def test_a_script_templates_source_is_keyed() -> None:
    key = compute(load("../pods/argo-3.6-pod.yaml"), "pipelines")
    assert key.material["argo"]["script"]["source"].startswith("import os\n")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("argo-offloaded.yaml", "the Argo template is offloaded to a ConfigMap", id="offloaded-env-name"),
        pytest.param("argo-offloaded-4.0.yaml", "the Argo template is offloaded to a ConfigMap", id="offloaded-4.0"),
        pytest.param("argo-args-offloaded.yaml", "the Argo container args are offloaded to a ConfigMap", id="args"),
        pytest.param("argo-resource.yaml", "the Argo template has neither a container nor a script", id="resource"),
    ],
)
def test_argo_steps_that_cannot_be_keyed_from_the_pod_are_uncacheable(name: str, reason: str) -> None:
    with pytest.raises(errors.Uncacheable, match=f"^{re.escape(reason)}$"):
        compute(load(name), "pipelines")


def test_an_argo_pod_whose_containers_carry_different_templates_is_uncacheable() -> None:
    pod = load("argo-pod.yaml")
    [template] = [var for var in pod["spec"]["initContainers"][0]["env"] if var["name"] == "ARGO_TEMPLATE"]
    forged = template["value"].replace('"path":"/tmp/accuracy"', '"path":"/tmp/other"')
    pod["spec"]["containers"][1]["env"].append({"name": "ARGO_TEMPLATE", "value": forged})
    with pytest.raises(errors.Uncacheable, match=r"^the pod carries Argo templates that differ$"):
        compute(pod, "pipelines")


def test_an_argo_template_read_from_a_configmap_is_uncacheable() -> None:
    pod = load("argo-pod.yaml")
    env = pod["spec"]["initContainers"][0]["env"]
    [index] = [i for i, var in enumerate(env) if var["name"] == "ARGO_TEMPLATE"]
    env[index] = {"name": "ARGO_TEMPLATE", "valueFrom": {"configMapKeyRef": {"name": "evil", "key": "t"}}}
    pod["metadata"]["annotations"]["workflows.argoproj.io/template"] = '{"container": {"image": "x"}}'
    with pytest.raises(errors.Uncacheable, match=r"^env ARGO_TEMPLATE is not a literal value$"):
        compute(pod, "pipelines")


def test_argos_per_run_env_counts_in_pods_that_are_not_argos() -> None:
    pod = with_downward(load("pod.yaml"), {"name": "ARGO_NODE_ID", "value": "n1"})
    assert compute(pod, "ml").material["containers"][0]["env"][-1] == {"name": "ARGO_NODE_ID", "value": "n1"}


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


def pod_with(
    *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, restart: str | None = "Never"
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": []}
    if restart is not None:
        spec["restartPolicy"] = restart
    return {"metadata": {"labels": labels or {}, "annotations": annotations or {}}, "spec": spec}


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        pytest.param(pod_with(), None, id="plain"),
        pytest.param(pod_with(restart="OnFailure"), None, id="on-failure"),
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
        pytest.param(pod_with(restart="Always"), "restart-always", id="restart-always"),
        pytest.param(pod_with(restart=None), "restart-always", id="restart-policy-absent-is-always"),
        pytest.param({}, "restart-always", id="no-metadata-no-spec"),
    ],
)
def test_skip_reason_names_why_a_pod_is_not_a_candidate(pod: dict[str, Any], reason: str | None) -> None:
    assert keys.skip_reason(pod) == reason


def test_a_native_sidecar_does_not_make_a_pod_a_service() -> None:
    pod = load("pod.yaml")
    pod["spec"]["initContainers"] = [{"name": "proxy", "image": "proxy:1", "restartPolicy": "Always"}]
    assert keys.skip_reason(pod) is None
    assert compute(pod, "ml").material["initContainers"][0]["restartPolicy"] == "Always"


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
    assert compute(pod, "ml").material["version"] == "2024-06"


# --- tags ------------------------------------------------------------------------------------------------------------


def test_tag_only_images_lists_the_keyed_images_without_a_digest_once_each() -> None:
    pod = load("tags.yaml")
    assert keys.tag_only_images(pod, keys.key_containers(pod)) == [
        "busybox:1.36",
        "registry.example.com:5000/tools/helper",
    ]
    assert keys.tag_only_images(pod, ["main", "pinned"]) == []
    assert keys.tag_only_images(pod, ["helper"]) == ["registry.example.com:5000/tools/helper"]


def test_tag_only_images_of_an_argo_pod_are_those_of_its_keyed_containers() -> None:
    pod = load("argo-tags.yaml")
    assert keys.tag_only_images(pod, keys.key_containers(pod)) == ["quay.io/argoproj/argoexec:v3.6.2", "python:3.12"]
    assert keys.tag_only_images(pod, ["main"]) == ["python:3.12"]
    assert keys.tag_only_images(load("argo-pod.yaml"), ("main",)) == []


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
