"""Admission patches on real pod shapes: what skip, miss and hit make of a pod, checked on the JSON patch it becomes.

Every patch is applied twice — as a merge patch, and as the JSON patch the webhook answers with
(`patches.json_patch`), applied in order to the original pod — and the two pods must agree before anything is
asserted about them. Replay scripts
are run with the host's `sh` after the kubelet's `$(VAR)` expansion, as a kubelet would run them.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import pathlib
import subprocess
from collections.abc import Mapping
from typing import Any

import jsonpatch
import pytest
import yaml
from hack.cluster import kubelet as process_kubelet

from stepcache import argo, errors, model, mutation, patches

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pods"
PODS = ("job-pod", "argo-3.6-pod", "kfp-v1-pod")
REPLAY_IMAGE = "registry.example.com/stepcache/replay:1.0"
OPTIONS = mutation.ReplayOptions(cache_image=REPLAY_IMAGE)
SIGNED = mutation.Signed(key="ab" * 32, key_containers=("fetch", "train", "report"), signature="cd" * 32)
NASTY = 'it\'s "quoted" $(rm -rf /) `id` $$ $HOME ${X} \\n %s %%\n\nünïcødé ✓\n'
"""A termination message a shell or the kubelet would mangle if it were ever interpolated: quotes, substitutions,
`$$`, backslashes, printf directives, newlines and a trailing newline."""

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}
TINY = {"cpu": "10m", "memory": "16Mi"}


def load(name: str) -> dict[str, Any]:
    with (FIXTURES / f"{name}.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


def entry(**overrides: Any) -> model.CachedEntry:
    fields: dict[str, Any] = {
        "id": 42,
        "namespace": "team-a",
        "cache_key": "ab" * 32,
        "termination_messages": {"train": NASTY},
        "argo_outputs": None,
        "source_pod": "train-29sl4-x7k2m",
        "finished_at": datetime.datetime(2024, 5, 1, 12, 41, 30, tzinfo=datetime.UTC),
        "duration_seconds": 2490.0,
    }
    fields.update(overrides)
    return model.CachedEntry(**fields)


ARGO_ENTRY = entry(
    termination_messages={},
    argo_outputs={"parameters": {"length": "9", "upper": 'STEP"CACHE $(x)\n'}, "result": "9"},
    source_pod="count-wf-4kz9q-count-1000000001",
)


def patched(pod: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """The pod the API server stores, after checking that merge patch and derived JSON patch agree on it."""
    before = copy.deepcopy(pod)
    merged = mutation.apply_merge_patch(pod, patch)
    ops = patches.json_patch(pod, patch)
    via_json_patch = jsonpatch.apply_patch(pod, ops)
    assert via_json_patch == merged
    assert pod == before, "building or applying a patch changed the original pod"
    return merged


def with_forged_names(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as a user might write it, claiming stepcache's own labels and annotations."""
    forged = copy.deepcopy(dict(pod))
    forged["metadata"].setdefault("labels", {}).update({mutation.CACHE_ID: "999", mutation.HIT: "true"})
    forged["metadata"].setdefault("annotations", {}).update(
        {mutation.KEY: "f" * 64, mutation.KEY_CONTAINERS: "nope", mutation.KEY_SIGNATURE: "0" * 64}
    )
    return forged


def containers(pod: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def set_template(pod: dict[str, Any], tmpl: Mapping[str, Any]) -> None:
    """Replace the Argo template wherever the pod carries it (env on any container, or the annotation)."""
    for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
        for var in container.get("env") or []:
            if var["name"] == "ARGO_TEMPLATE":
                var["value"] = json.dumps(tmpl)
    annotations = pod["metadata"].get("annotations") or {}
    if argo.TEMPLATE_ANNOTATION in annotations:
        annotations[argo.TEMPLATE_ANNOTATION] = json.dumps(tmpl)


# The kubelet's expansion of `$(VAR)` in env values and commands: the process kubelet's, which the e2e tests run.
kubelet_expand = process_kubelet.expand


def container_environment(container: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = kubelet_expand(var["value"], env)
    return env


def run(argv: list[str], env: Mapping[str, str], cwd: pathlib.Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, env={**env, "PATH": os.environ["PATH"]}, cwd=cwd, capture_output=True, timeout=30, check=False
    )


# --- skip -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PODS)
def test_skip_patch_is_empty_for_a_pod_without_stepcache_names(name: str) -> None:
    assert mutation.skip_patch(load(name)) == {}


@pytest.mark.parametrize("name", PODS)
def test_skip_removes_user_written_stepcache_names_and_nothing_else(name: str) -> None:
    original = load(name)
    forged = with_forged_names(original)

    result = patched(forged, mutation.skip_patch(forged))

    assert result == original


def test_skip_deletes_a_label_map_that_held_only_stepcache_names() -> None:
    pod = load("job-pod")
    pod["metadata"]["labels"] = {mutation.HIT: "true", mutation.CACHE_ID: "7"}

    result = patched(pod, mutation.skip_patch(pod))

    assert "labels" not in result["metadata"]
    assert result["metadata"]["annotations"] == pod["metadata"]["annotations"]


# --- miss -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PODS)
def test_miss_signs_the_pod_and_marks_it_for_recording(name: str) -> None:
    pod = load(name)

    result = patched(pod, mutation.miss_patch(pod, signed=SIGNED))

    assert result["metadata"]["annotations"] == {
        **pod["metadata"]["annotations"],
        mutation.KEY: SIGNED.key,
        mutation.KEY_CONTAINERS: "fetch,train,report",
        mutation.KEY_SIGNATURE: SIGNED.signature,
    }
    assert result["metadata"]["labels"] == {**pod["metadata"]["labels"], mutation.CACHE_ID: ""}
    assert result["spec"] == pod["spec"]


@pytest.mark.parametrize("name", PODS)
def test_miss_replaces_user_written_stepcache_names(name: str) -> None:
    forged = with_forged_names(load(name))

    result = patched(forged, mutation.miss_patch(forged, signed=SIGNED))

    labels, annotations = result["metadata"]["labels"], result["metadata"]["annotations"]
    assert labels[mutation.CACHE_ID] == ""
    assert mutation.HIT not in labels
    assert annotations[mutation.KEY] == SIGNED.key
    assert annotations[mutation.KEY_CONTAINERS] == "fetch,train,report"
    assert annotations[mutation.KEY_SIGNATURE] == SIGNED.signature


def test_miss_patch_touches_only_metadata_it_owns() -> None:
    pod = load("job-pod")

    assert mutation.miss_patch(pod, signed=SIGNED) == {
        "metadata": {
            "labels": {mutation.CACHE_ID: ""},
            "annotations": {
                mutation.KEY: SIGNED.key,
                mutation.KEY_CONTAINERS: "fetch,train,report",
                mutation.KEY_SIGNATURE: SIGNED.signature,
            },
        }
    }


# --- hit: plain pods --------------------------------------------------------------------------------------------


def hit(pod: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"signed": SIGNED, "entry": entry(), "options": OPTIONS, "kfp": False}
    arguments.update(kwargs)
    return patched(pod, mutation.hit_patch(pod, **arguments))


def test_hit_replaces_each_container_by_a_replay_container_of_the_same_name() -> None:
    result = hit(load("job-pod"))

    assert [c["name"] for c in result["spec"]["containers"]] == ["train", "report"]
    assert all(c["image"] == REPLAY_IMAGE for c in result["spec"]["containers"])


def test_hit_replay_container_is_tiny_restricted_and_carries_the_message_in_env() -> None:
    result = hit(load("job-pod"))

    assert containers(result)["train"] == {
        "name": "train",
        "image": REPLAY_IMAGE,
        "command": ["sh", "-c", mutation.REPLAY_SCRIPT],
        "env": [
            {"name": "STEPCACHE_MESSAGE", "value": NASTY.replace("$", "$$")},
            {"name": "STEPCACHE_MESSAGE_PATH", "value": "/dev/termination-log"},
            {"name": "STEPCACHE_ENTRY_ID", "value": "42"},
            {"name": "STEPCACHE_SOURCE_POD", "value": "train-29sl4-x7k2m"},
        ],
        "resources": {"requests": TINY, "limits": TINY},
        "securityContext": RESTRICTED_CONTAINER,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def test_hit_keeps_each_containers_termination_message_path_and_policy() -> None:
    report = containers(hit(load("job-pod")))["report"]

    assert report["terminationMessagePath"] == "/tmp/summary"
    assert report["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "STEPCACHE_MESSAGE_PATH", "value": "/tmp/summary"} in report["env"]
    assert {"name": "STEPCACHE_MESSAGE", "value": ""} in report["env"]  # recorded without a message
    assert not {"volumeMounts", "ports", "readinessProbe", "lifecycle", "args", "envFrom"} & set(report)


def test_hit_removes_init_containers_node_constraints_and_claimed_volumes() -> None:
    pod = load("job-pod")
    pod["spec"]["volumes"].append({"name": "cache", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}})

    spec = hit(pod)["spec"]

    assert not {"initContainers", "affinity", "nodeSelector"} & set(spec)
    assert [v["name"] for v in spec["volumes"]] == ["scratch", "config", "kube-api-access-7rq2x"]
    assert spec["tolerations"] == pod["spec"]["tolerations"]


def test_hit_keeps_node_constraints_when_configured_to() -> None:
    pod = load("job-pod")

    spec = hit(pod, options=mutation.ReplayOptions(cache_image=REPLAY_IMAGE, keep_node_constraints=True))["spec"]

    assert spec["nodeSelector"] == pod["spec"]["nodeSelector"]
    assert spec["affinity"] == pod["spec"]["affinity"]
    assert "initContainers" not in spec


def test_hit_labels_and_annotations_name_the_entry_served() -> None:
    pod = load("job-pod")

    metadata = hit(pod)["metadata"]

    assert metadata["labels"] == {**pod["metadata"]["labels"], mutation.CACHE_ID: "42", mutation.HIT: "true"}
    assert metadata["annotations"] == {
        **pod["metadata"]["annotations"],
        mutation.KEY: SIGNED.key,
        mutation.KEY_CONTAINERS: "fetch,train,report",
        mutation.KEY_SIGNATURE: SIGNED.signature,
    }


@pytest.mark.parametrize("name", PODS)
def test_hit_replaces_user_written_stepcache_names(name: str) -> None:
    forged = with_forged_names(load(name))

    metadata = hit(forged, entry=ARGO_ENTRY if name != "job-pod" else entry())["metadata"]

    assert metadata["labels"][mutation.CACHE_ID] == "42"
    assert metadata["labels"][mutation.HIT] == "true"
    assert metadata["annotations"][mutation.KEY] == SIGNED.key
    assert metadata["annotations"][mutation.KEY_CONTAINERS] == "fetch,train,report"
    assert metadata["annotations"][mutation.KEY_SIGNATURE] == SIGNED.signature


def test_replay_script_writes_the_cached_message_byte_for_byte(tmp_path: pathlib.Path) -> None:
    train = containers(hit(load("job-pod")))["train"]
    env = container_environment(train)
    env["STEPCACHE_MESSAGE_PATH"] = str(tmp_path / "termination-log")
    argv = [kubelet_expand(part, env) for part in train["command"]]

    done = run(argv, env, tmp_path)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "termination-log").read_bytes() == NASTY.encode()
    assert done.stdout == b"stepcache: replayed cache entry 42 recorded by pod train-29sl4-x7k2m\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["termination-log"]  # nothing the message could create


def test_replay_scripts_are_left_alone_by_the_kubelets_expansion() -> None:
    argo_main = containers(hit(load("argo-3.6-pod"), entry=ARGO_ENTRY))["main"]

    for script in (mutation.REPLAY_SCRIPT, argo_main["command"][-1]):
        assert kubelet_expand(script, {"STEPCACHE_MESSAGE": "x", "STEPCACHE_RESULT": "y"}) == script


# --- hit: the restricted Pod Security Standard ------------------------------------------------------------------

_SAFE_TYPES = {"RuntimeDefault", "Localhost"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim"} | {
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
}


def _bad_selinux(options: Mapping[str, Any] | None) -> bool:
    if options is None:
        return False
    safe_type = options.get("type", "") in {"", "container_t", "container_init_t", "container_kvm_t"}
    return not safe_type or bool(options.get("user")) or bool(options.get("role"))


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """The `restricted` profile's checks (k8s.io/pod-security-admission/policy), as far as these pods reach."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    found = [field for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]
    found += [f"volume {v['name']}" for v in spec.get("volumes") or [] if not set(v) - {"name"} <= _RESTRICTED_VOLUMES]
    if pod_sc.get("runAsNonRoot") is False:
        found.append("pod runAsNonRoot=false")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser=0")
    found += [
        f"pod {f}"
        for f in ("seccompProfile", "appArmorProfile")
        if f in pod_sc and pod_sc[f]["type"] not in _SAFE_TYPES
    ]
    if _bad_selinux(pod_sc.get("seLinuxOptions")):
        found.append("pod seLinuxOptions")
    found += [f"sysctl {s['name']}" for s in pod_sc.get("sysctls") or [] if s["name"] not in _SAFE_SYSCTLS]
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("pod hostProcess")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc, name = c.get("securityContext") or {}, c["name"]
        caps = sc.get("capabilities") or {}
        if sc.get("privileged"):
            found.append(f"{name} privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name} allowPrivilegeEscalation")
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name} capabilities")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{name} runAsNonRoot")
        if sc.get("runAsUser") == 0:
            found.append(f"{name} runAsUser=0")
        if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") not in _SAFE_TYPES:
            found.append(f"{name} seccompProfile")
        if "appArmorProfile" in sc and sc["appArmorProfile"]["type"] not in _SAFE_TYPES:
            found.append(f"{name} appArmorProfile")
        if _bad_selinux(sc.get("seLinuxOptions")) or sc.get("procMount", "Default") != "Default":
            found.append(f"{name} seLinuxOptions/procMount")
        if any(port.get("hostPort") for port in c.get("ports") or []):
            found.append(f"{name} hostPort")
    return found


ROOTISH_POD_SECURITY = [
    pytest.param({}, id="api-server-default"),
    pytest.param({"runAsUser": 0, "runAsGroup": 0, "fsGroup": 0}, id="root"),
    pytest.param({"runAsNonRoot": False}, id="run-as-root-allowed"),
    pytest.param(
        {"seccompProfile": {"type": "Unconfined"}, "appArmorProfile": {"type": "Unconfined"}}, id="unconfined"
    ),
    pytest.param(
        {
            "seLinuxOptions": {"type": "spc_t", "level": "s0:c1,c2"},
            "sysctls": [{"name": "net.core.somaxconn", "value": "1024"}],
        },
        id="selinux-and-unsafe-sysctl",
    ),
]


@pytest.mark.parametrize("pod_security", ROOTISH_POD_SECURITY)
def test_hit_pod_passes_the_restricted_pod_security_standard(pod_security: dict[str, Any]) -> None:
    pod = load("job-pod")
    pod["spec"]["securityContext"] = pod_security
    assert restricted_violations(pod), "the original pod should fail restricted, or this test proves nothing"

    assert restricted_violations(hit(pod)) == []


def test_hit_removes_only_the_pod_security_fields_that_fail_restricted() -> None:
    pod = load("job-pod")
    pod["spec"]["securityContext"] = {
        "runAsUser": 0,
        "runAsGroup": 3000,
        "fsGroup": 2000,
        "supplementalGroups": [4000],
        "seccompProfile": {"type": "Unconfined"},
        "sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}, {"name": "kernel.msgmax", "value": "65536"}],
    }

    assert hit(pod)["spec"]["securityContext"] == {
        "runAsGroup": 3000,
        "fsGroup": 2000,
        "supplementalGroups": [4000],
        "sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}],
    }


def test_hit_leaves_an_already_restricted_pod_security_context_untouched() -> None:
    pod = load("job-pod")
    pod["spec"]["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"},
    }

    assert (
        "securityContext"
        not in mutation.hit_patch(pod, signed=SIGNED, entry=entry(), options=OPTIONS, kfp=False)["spec"]
    )


def test_hit_deletes_a_pod_security_context_left_empty() -> None:
    pod = load("job-pod")
    pod["spec"]["securityContext"] = {"runAsUser": 0}

    assert "securityContext" not in hit(pod)["spec"]


# --- hit: Argo and KFP v1 ---------------------------------------------------------------------------------------


def test_argo_hit_turns_main_into_a_restricted_replay_and_keeps_init_and_wait() -> None:
    pod = load("argo-3.6-pod")

    result = hit(pod, entry=ARGO_ENTRY)

    changed = {"containers", "volumes", "nodeSelector"}
    assert {k: v for k, v in result["spec"].items() if k not in changed} == {
        k: v for k, v in pod["spec"].items() if k not in changed
    }
    assert result["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}  # a platform, not a node constraint
    assert [c["name"] for c in result["spec"]["containers"]] == ["wait", "main"]
    assert containers(result)["wait"] == containers(pod)["wait"]
    assert result["spec"]["initContainers"] == pod["spec"]["initContainers"]
    main, original = containers(result)["main"], containers(pod)["main"]
    assert main["image"] == REPLAY_IMAGE
    assert "args" not in main
    assert main["command"][:-2] == [
        "/var/run/argo/argoexec",
        "emissary",
        "--loglevel",
        "info",
        "--log-format",
        "text",
        "--",
        "sh",
    ]
    assert main["command"][-2] == "-c"
    assert main["env"][: len(original["env"])] == original["env"]
    assert main["securityContext"] == RESTRICTED_CONTAINER
    assert main["resources"] == {"requests": TINY, "limits": TINY}
    assert {k: main[k] for k in ("terminationMessagePath", "imagePullPolicy")} == {
        k: original[k] for k in ("terminationMessagePath", "imagePullPolicy")
    }
    assert result["metadata"]["labels"][mutation.CACHE_ID] == "42"
    assert mutation.KFP_REUSED not in result["metadata"]["labels"]


def test_argo_replay_gets_a_writable_empty_dir_at_the_outermost_directory_of_its_outputs() -> None:
    pod = load("argo-3.6-pod")  # outputs at /tmp/outputs/length and /tmp/upper.txt; main mounts nothing at /tmp

    result = hit(pod, entry=ARGO_ENTRY)

    assert result["spec"]["volumes"] == [*pod["spec"]["volumes"], {"name": "stepcache-outputs-0", "emptyDir": {}}]
    assert containers(result)["main"]["volumeMounts"] == [
        *containers(pod)["main"]["volumeMounts"],
        {"name": "stepcache-outputs-0", "mountPath": "/tmp"},
    ]
    assert "stepcache-outputs-0" not in str(containers(result)["wait"])


def argo_pod_with_outputs(*paths: str) -> dict[str, Any]:
    pod = load("argo-3.6-pod")
    tmpl = argo.template(pod)
    assert tmpl is not None
    tmpl["outputs"] = {"parameters": [{"name": f"p{i}", "valueFrom": {"path": p}} for i, p in enumerate(paths)]}
    set_template(pod, tmpl)
    return pod


def outputs_entry(count: int) -> model.CachedEntry:
    return entry(
        termination_messages={}, argo_outputs={"parameters": {f"p{i}": "v" for i in range(count)}, "result": "r"}
    )


def test_argo_replay_writes_under_a_writable_volume_without_a_new_one_and_skips_taken_names() -> None:
    pod = argo_pod_with_outputs("/var/run/argo/out/a", "/data/b/c", "/data/d")
    pod["spec"]["volumes"].append({"name": "stepcache-outputs-0", "emptyDir": {}})

    result = hit(pod, entry=outputs_entry(3))

    assert result["spec"]["volumes"][-1] == {"name": "stepcache-outputs-1", "emptyDir": {}}
    assert containers(result)["main"]["volumeMounts"][-1] == {"name": "stepcache-outputs-1", "mountPath": "/data"}
    assert [m["mountPath"] for m in containers(result)["main"]["volumeMounts"]].count("/data") == 1


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("out/a", "not absolute"),
        ("/a", "in /"),
        ("/var/run/secrets/kubernetes.io/serviceaccount/x", "cannot write"),  # a read-only projected volume
    ],
)
def test_argo_output_the_replay_cannot_write_is_uncacheable(path: str, reason: str) -> None:
    pod = argo_pod_with_outputs(path)

    with pytest.raises(errors.Uncacheable, match=reason):
        mutation.hit_patch(pod, signed=SIGNED, entry=outputs_entry(1), options=OPTIONS, kfp=False)


GPU = {"nvidia.com/gpu": "1"}


def greedy_pod(name: str) -> dict[str, Any]:
    """A pod that asks for every kind of thing a replay must not wait for."""
    pod = load(name)
    spec = pod["spec"]
    spec.update(
        hostNetwork=True,
        hostPID=True,
        hostIPC=True,
        nodeName="gpu-node-7",
        runtimeClassName="nvidia",
        overhead={"cpu": "250m"},
        topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
        resourceClaims=[{"name": "gpu", "resourceClaimName": "a100"}],
        resources={"requests": {"cpu": "4"}, "limits": {"cpu": "4"}},
        nodeSelector={"kubernetes.io/arch": "amd64", "pool": "gpu"},
    )
    spec["volumes"] += [
        {"name": "host", "hostPath": {"path": "/opt/models"}},
        {"name": "claim", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "nfs", "nfs": {"server": "nfs.internal", "path": "/x"}},
        {"name": "inline", "csi": {"driver": "secrets-store.csi.k8s.io"}},
    ]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        resources = container.setdefault("resources", {})
        resources.setdefault("requests", {}).update(GPU)
        resources.setdefault("limits", {}).update(GPU)
        resources["claims"] = [{"name": "gpu"}]
        container["livenessProbe"] = {"exec": {"command": ["true"]}}
        container["lifecycle"] = {"preStop": {"exec": {"command": ["true"]}}}
        container["ports"] = [{"containerPort": 80, "hostPort": 80}]
        prefix = "" if container["name"] in ("main", "train", "report", "fetch") else "/mainctrfs"
        container.setdefault("volumeMounts", []).extend(
            [{"name": "host", "mountPath": f"{prefix}/models"}, {"name": "claim", "mountPath": f"{prefix}/data"}]
        )
        container["volumeDevices"] = [{"name": "claim", "devicePath": "/dev/xvda"}]
    return pod


def assert_waits_for_nothing(result: Mapping[str, Any]) -> None:
    spec = result["spec"]
    assert not {
        "hostNetwork",
        "hostPID",
        "hostIPC",
        "nodeName",
        "runtimeClassName",
        "overhead",
        "topologySpreadConstraints",
        "resourceClaims",
        "resources",
        "affinity",
    } & set(spec)
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "amd64"}  # greedy_pod's platform entry, kept
    kinds = {kind for volume in spec["volumes"] for kind in volume if kind != "name"}
    assert kinds <= {"emptyDir", "configMap", "secret", "downwardAPI", "projected"}
    names = {volume["name"] for volume in spec["volumes"]}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        resources = container.get("resources") or {}
        asked = {name for field in ("requests", "limits") for name in resources.get(field) or {}}
        assert asked <= {"cpu", "memory", "ephemeral-storage"}, container["name"]
        assert "claims" not in resources
        assert not {"livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "ports", "volumeDevices"} & set(
            container
        ), container["name"]
        assert {mount["name"] for mount in container.get("volumeMounts") or []} <= names, container["name"]


@pytest.mark.parametrize("name", PODS)
def test_a_hit_pod_waits_for_no_device_volume_host_or_node(name: str) -> None:
    pod = greedy_pod(name)
    served = entry() if name == "job-pod" else ARGO_ENTRY if name.startswith("argo") else entry(argo_outputs={})

    result = hit(pod, entry=served, kfp=name.startswith("kfp"))

    assert_waits_for_nothing(result)


def test_an_argo_hit_keeps_init_and_wait_apart_from_what_they_would_wait_for() -> None:
    pod = greedy_pod("argo-3.6-pod")
    pod["spec"]["initContainers"].append({"name": "fetch", "image": "busybox", "command": ["true"]})

    result = hit(pod, entry=ARGO_ENTRY)

    assert [c["name"] for c in result["spec"]["initContainers"]] == ["init"]
    original = load("argo-3.6-pod")
    for name, kept in (("init", result["spec"]["initContainers"][0]), ("wait", containers(result)["wait"])):
        before = next(
            c for c in [*original["spec"]["initContainers"], *original["spec"]["containers"]] if c["name"] == name
        )
        assert kept == {**before, "resources": {"requests": before["resources"]["requests"], "limits": {}}}, name


def test_keep_node_constraints_keeps_them_and_nothing_else() -> None:
    pod = greedy_pod("job-pod")
    keep = mutation.ReplayOptions(cache_image=REPLAY_IMAGE, keep_node_constraints=True)

    spec = hit(pod, options=keep)["spec"]

    for field in ("affinity", "nodeSelector", "nodeName", "topologySpreadConstraints", "runtimeClassName", "overhead"):
        assert spec[field] == pod["spec"][field], field
    assert not {"hostNetwork", "hostPID", "hostIPC", "resourceClaims", "resources"} & set(spec)


# --- Argo's outputs annotation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["miss", "hit"])
def test_a_user_set_argo_outputs_annotation_is_removed_from_an_argo_pod(outcome: str) -> None:
    pod = load("argo-3.6-pod")
    pod["metadata"]["annotations"][argo.OUTPUTS_ANNOTATION] = '{"parameters":[{"name":"length","value":"forged"}]}'

    result = hit(pod, entry=ARGO_ENTRY) if outcome == "hit" else patched(pod, mutation.miss_patch(pod, signed=SIGNED))

    assert argo.OUTPUTS_ANNOTATION not in result["metadata"]["annotations"]


def test_the_argo_outputs_annotation_is_neither_removed_by_a_skip_nor_from_a_plain_pod() -> None:
    argo_pod, plain = load("argo-3.6-pod"), load("job-pod")
    for pod in (argo_pod, plain):
        pod["metadata"]["annotations"][argo.OUTPUTS_ANNOTATION] = "{}"

    assert mutation.skip_patch(argo_pod) == {}
    assert (
        patched(plain, mutation.miss_patch(plain, signed=SIGNED))["metadata"]["annotations"][argo.OUTPUTS_ANNOTATION]
        == "{}"
    )


def test_argo_replay_writes_each_parameter_and_prints_the_result(tmp_path: pathlib.Path) -> None:
    main = containers(hit(load("argo-3.6-pod"), entry=ARGO_ENTRY))["main"]
    env = container_environment(main)
    for name, value in list(env.items()):
        if name.startswith("STEPCACHE_PARAM_PATH_"):
            env[name] = str(tmp_path / value.lstrip("/"))
    command = [kubelet_expand(part, env) for part in main["command"]]

    done = run(command[command.index("--") + 1 :], env, tmp_path)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tmp/outputs/length").read_bytes() == b"9\n"
    assert (tmp_path / "tmp/upper.txt").read_bytes() == b'STEP"CACHE $(x)\n\n'
    assert done.stdout == b"9\n"  # argoexec trims one trailing newline: the result is exactly "9"
    assert done.stderr == b"stepcache: replayed cache entry 42 recorded by pod count-wf-4kz9q-count-1000000001\n"


def test_argo_replay_without_a_result_prints_nothing(tmp_path: pathlib.Path) -> None:
    pod = load("argo-3.6-pod")
    for container in pod["spec"]["containers"]:
        for var in container["env"]:
            if var["name"] == "ARGO_INCLUDE_SCRIPT_OUTPUT":
                var["value"] = "false"
    served = entry(argo_outputs={"parameters": {"length": "9", "upper": "X"}, "result": None})
    main = containers(hit(pod, entry=served))["main"]
    env = container_environment(main)
    env.update(
        {k: str(tmp_path / pathlib.Path(v).name) for k, v in env.items() if k.startswith("STEPCACHE_PARAM_PATH_")}
    )
    command = main["command"]

    done = run(command[command.index("--") + 1 :], env, tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    assert (tmp_path / "upper.txt").read_bytes() == b"X\n"


def test_argo_hit_of_an_entry_that_lacks_a_declared_output_artifact_is_uncacheable() -> None:
    pod = load("argo-3.6-pod")
    tmpl = argo.template(pod)
    assert tmpl is not None
    tmpl["outputs"]["artifacts"] = [{"name": "model", "path": "/tmp/model"}]
    set_template(pod, tmpl)

    with pytest.raises(errors.Uncacheable, match="lacks output artifact 'model'"):
        mutation.hit_patch(pod, signed=SIGNED, entry=ARGO_ENTRY, options=OPTIONS, kfp=False)


def test_argo_hit_asking_for_a_result_the_entry_lacks_is_uncacheable() -> None:
    served = entry(argo_outputs={"parameters": {"length": "9", "upper": "X"}, "result": None})

    with pytest.raises(errors.Uncacheable, match="result"):
        mutation.hit_patch(load("argo-3.6-pod"), signed=SIGNED, entry=served, options=OPTIONS, kfp=False)


def test_argo_hit_missing_an_output_parameter_is_uncacheable() -> None:
    served = entry(argo_outputs={"parameters": {"length": "9"}, "result": "9"})

    with pytest.raises(errors.Uncacheable, match="upper"):
        mutation.hit_patch(load("argo-3.6-pod"), signed=SIGNED, entry=served, options=OPTIONS, kfp=False)


def test_argo_hit_without_main_or_emissary_prefix_is_uncacheable() -> None:
    no_main = load("argo-3.6-pod")
    no_main["spec"]["containers"] = [c for c in no_main["spec"]["containers"] if c["name"] != "main"]
    no_separator = load("argo-3.6-pod")
    containers(no_separator)["main"]["command"] = ["python"]

    with pytest.raises(errors.Uncacheable, match="no main"):
        mutation.hit_patch(no_main, signed=SIGNED, entry=ARGO_ENTRY, options=OPTIONS, kfp=False)
    with pytest.raises(errors.Uncacheable, match="--"):
        mutation.hit_patch(no_separator, signed=SIGNED, entry=ARGO_ENTRY, options=OPTIONS, kfp=False)


def test_kfp_v1_hit_is_labelled_reused_from_cache_and_keeps_the_short_emissary_prefix() -> None:
    pod = load("kfp-v1-pod")
    served = entry(argo_outputs={"parameters": {}, "result": None})

    result = hit(pod, entry=served, kfp=True)

    assert result["metadata"]["labels"][mutation.KFP_REUSED] == "true"
    assert result["metadata"]["labels"][mutation.HIT] == "true"
    main = containers(result)["main"]
    assert main["command"][:4] == ["/var/run/argo/argoexec", "emissary", "--", "sh"]
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["init"]
    assert result["spec"]["volumes"] == pod["spec"]["volumes"]


def test_kfp_v1_step_with_file_outputs_is_uncacheable_from_an_entry_without_their_bytes() -> None:
    """KFP v1 compiles each file output into an Argo output parameter and an artifact of the same path; an entry
    recorded without the artifact (before artifacts were stored) cannot serve it."""
    pod = load("kfp-v1-pod")
    tmpl = argo.template(pod)
    assert tmpl is not None
    output = {"name": "print-Output", "path": "/tmp/outputs/Output/data"}
    tmpl["outputs"] = {
        "parameters": [{"name": "print-Output", "valueFrom": {"path": output["path"]}}],
        "artifacts": [output],
    }
    set_template(pod, tmpl)

    with pytest.raises(errors.Uncacheable, match="lacks output artifact 'print-Output'"):
        mutation.hit_patch(pod, signed=SIGNED, entry=entry(), options=OPTIONS, kfp=True)


# --- apply_merge_patch ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [  # RFC 7386, appendix A (the object cases)
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_apply_merge_patch_follows_rfc_7386(target: dict[str, Any], patch: dict[str, Any], expected: Any) -> None:
    assert mutation.apply_merge_patch(target, patch) == expected


def test_apply_merge_patch_changes_and_shares_nothing() -> None:
    target = {"a": {"b": [1]}, "c": 1}
    patch = {"a": {"d": [2]}, "c": None}

    result = mutation.apply_merge_patch(target, patch)
    result["a"]["b"].append(3)
    result["a"]["d"].append(4)

    assert target == {"a": {"b": [1]}, "c": 1}
    assert patch == {"a": {"d": [2]}, "c": None}


def test_a_greedy_plain_hit_pod_passes_the_restricted_pod_security_standard() -> None:
    pod = greedy_pod("job-pod")
    pod["spec"]["securityContext"] = {"runAsUser": 0, "seccompProfile": {"type": "Unconfined"}}

    assert restricted_violations(hit(pod)) == []


def test_the_argo_replay_container_passes_the_restricted_checks_of_a_container() -> None:
    pod = greedy_pod("argo-3.6-pod")
    result = hit(pod, entry=ARGO_ENTRY)
    main_only = {**result, "spec": {**result["spec"], "initContainers": [], "containers": [containers(result)["main"]]}}

    assert restricted_violations(main_only) == []
