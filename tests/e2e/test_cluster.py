"""The harness itself: a real control plane whose pods the process kubelet runs and reports like a kubelet.

Every other end-to-end test builds on these behaviours, so they are proved here first, against the real API.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import pathlib
import re
from typing import Any

import yaml
from hack.cluster import controlplane
from hack.cluster import kubelet as process_kubelet
from hack.cluster.controlplane import wait_for

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "cluster"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def load(name: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all((FIXTURES / name).read_text()) if document]


def create(plane: controlplane.ControlPlane, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Create one object; return it as created (with its generated name)."""
    result = plane.kubectl("create", "--namespace", namespace, "-f", "-", "-o", "json", input=json.dumps(obj))
    created: dict[str, Any] = json.loads(result.stdout)
    return created


def create_all(plane: controlplane.ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    """Create every object of a fixture file; return the last one (the pod or Job under test)."""
    return [create(plane, namespace, obj) for obj in load(name)][-1]


def with_env(pod: dict[str, Any], name: str, value: str) -> dict[str, Any]:
    for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        for variable in container.get("env", []):
            if variable["name"] == name:
                variable["value"] = value
    return pod


def with_host_dir(pod: dict[str, Any], directory: pathlib.Path) -> dict[str, Any]:
    """Mount a host directory at the same path in every container (hostPath): how a pod shares files with the host.

    A container's /tmp is its own, so a test's tmp_path is only seen inside the pod through such a mount.
    """
    pod["spec"].setdefault("volumes", []).append({"name": "host", "hostPath": {"path": str(directory)}})
    for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        container.setdefault("volumeMounts", []).append({"name": "host", "mountPath": str(directory)})
    return pod


def parse_time(text: str) -> datetime.datetime:
    assert RFC3339_UTC.match(text), text
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def conditions(pod: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in pod["status"]["conditions"]}


def processes_with_args(*args: str) -> list[int]:
    wanted = ("\0".join(args) + "\0").encode()
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_kubectl_reports_the_pinned_server_version(control_plane: controlplane.ControlPlane) -> None:
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    pinned = controlplane.pinned_versions()["KUBERNETES_VERSION"]
    assert pinned == "v1.36.3"
    assert version["serverVersion"]["gitVersion"] == pinned
    assert version["clientVersion"]["gitVersion"] == pinned


def test_a_pod_that_writes_its_termination_message_succeeds_with_it(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "termination-message-pod.yaml")["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"] == "stepcache-node"
    assert pod["status"]["podIP"] == "127.0.0.1"
    parse_time(pod["status"]["startTime"])
    (status,) = pod["status"]["containerStatuses"]
    assert status["name"] == "main"
    assert status["image"] == "busybox:1.36"
    assert status["ready"] is False
    assert status["restartCount"] == 0
    terminated = status["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "hello"
    assert parse_time(terminated["finishedAt"]) - parse_time(terminated["startedAt"]) >= datetime.timedelta(seconds=1)
    assert conditions(pod) == {
        "PodScheduled": "True",
        "PodReadyToStartContainers": "False",
        "Initialized": "True",
        "ContainersReady": "False",
        "Ready": "False",
    }


def test_a_failing_container_fails_the_pod_with_its_exit_code(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "failing-pod.yaml")["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    # FallbackToLogsOnError: no termination message, so the log's tail stands in for it.
    assert terminated["message"] == "about to fail"


def test_a_job_completes(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "job.yaml")["metadata"]["name"]

    def complete() -> Any:
        job = control_plane.api(f"/apis/batch/v1/namespaces/{plain_namespace}/jobs/{name}")
        done = any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"].get("conditions", []))
        return job if done else None

    job = wait_for(complete, 60, f"job {plain_namespace}/{name} to complete")

    assert job["status"]["succeeded"] == 1
    (pod,) = control_plane.get("pods", "--namespace", plain_namespace, "--selector", f"job-name={name}")["items"]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "done"


def test_the_container_environment_is_resolved_and_expanded_like_a_kubelets(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "env-pod.yaml")["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == "hello, world from env (blue, blue); $(NAME) $(UNDEFINED)|world|s3cret|unset|/tmp"
    assert pod["status"]["phase"] == "Succeeded"


def test_an_init_container_runs_to_completion_before_the_main_container(
    control_plane: controlplane.ControlPlane,
    kubelet: process_kubelet.KubeletProcess,
    plain_namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    pod = with_host_dir(with_env(load("init-pod.yaml")[0], "MARKER", str(tmp_path / "marker")), tmp_path)
    name = create(control_plane, plain_namespace, pod)["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Succeeded"
    (init,) = pod["status"]["initContainerStatuses"]
    (main,) = pod["status"]["containerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    assert main["state"]["terminated"]["message"] == "prepared"
    finished_init = parse_time(init["state"]["terminated"]["finishedAt"])
    assert finished_init <= parse_time(main["state"]["terminated"]["startedAt"])


def test_restart_policy_on_failure_reruns_a_failed_container(
    control_plane: controlplane.ControlPlane,
    kubelet: process_kubelet.KubeletProcess,
    plain_namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    pod = with_host_dir(
        with_env(load("restart-on-failure-pod.yaml")[0], "MARKER", str(tmp_path / "first-run")), tmp_path
    )
    name = create(control_plane, plain_namespace, pod)["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Succeeded"
    (status,) = pod["status"]["containerStatuses"]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert status["state"]["terminated"]["message"] == "second"


def test_volumes_are_mounted_at_their_paths_and_tmp_is_private_to_each_container(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "volumes-pod.yaml")["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == "hello|blue|s3cret|read-only|private|colour "


def test_the_service_account_volume_holds_a_token_bound_to_the_pod(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "service-account-pod.yaml")["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    message = pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    server, namespace, ca_sha256, token = message.split("\n")
    assert f"https://{server}" == control_plane.server
    assert namespace == plain_namespace
    assert ca_sha256 == hashlib.sha256(control_plane.ca_file.read_bytes()).hexdigest()
    kubeconfig = control_plane.token_kubeconfig(token, user=f"pod-{name}")
    whoami = json.loads(control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    user = whoami["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{plain_namespace}:default"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == [name]


def test_a_container_without_a_command_fails_as_no_command(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "no-command-pod.yaml")["metadata"]["name"]

    pod = control_plane.wait_for_pod(plain_namespace, name)

    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "NoCommand"


def test_deleting_a_running_pod_stops_its_process_and_removes_it(
    control_plane: controlplane.ControlPlane, kubelet: process_kubelet.KubeletProcess, plain_namespace: str
) -> None:
    name = create_all(control_plane, plain_namespace, "sleeping-pod.yaml")["metadata"]["name"]
    pod = control_plane.wait_for_pod(plain_namespace, name, phases=("Running",))
    assert conditions(pod)["Ready"] == "True"
    assert "running" in pod["status"]["containerStatuses"][0]["state"]
    assert processes_with_args("sleep", "987654")

    control_plane.kubectl("delete", "pod", name, "--namespace", plain_namespace, "--wait=false")

    def gone() -> bool:
        pods = control_plane.api(f"/api/v1/namespaces/{plain_namespace}/pods")["items"]
        return not any(p["metadata"]["name"] == name for p in pods)

    wait_for(gone, 30, f"pod {plain_namespace}/{name} to be removed")
    assert not processes_with_args("sleep", "987654")


def test_service_account_admission_gives_pods_the_token_volume(
    control_plane: controlplane.ControlPlane, plain_namespace: str
) -> None:
    pod = create_all(control_plane, plain_namespace, "termination-message-pod.yaml")

    assert pod["spec"]["serviceAccountName"] == "default"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-")]
    sources = volume["projected"]["sources"]
    assert any("serviceAccountToken" in source for source in sources)
    assert any(source.get("configMap", {}).get("name") == "kube-root-ca.crt" for source in sources)
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[volume["name"]] == "/var/run/secrets/kubernetes.io/serviceaccount"


def test_a_service_account_token_authenticates_as_that_account(
    control_plane: controlplane.ControlPlane, plain_namespace: str
) -> None:
    token = control_plane.create_token(plain_namespace, "default", 600)
    kubeconfig = control_plane.token_kubeconfig(token, user=f"default-{plain_namespace}")

    whoami = json.loads(control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    denied = control_plane.kubectl("get", "pods", "--namespace", plain_namespace, kubeconfig=kubeconfig, check=False)

    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{plain_namespace}:default"
    # RBAC is real: a ServiceAccount has no permissions it was not granted.
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_a_restarted_kubelet_does_not_rerun_finished_pods(
    control_plane: controlplane.ControlPlane,
    kubelet: process_kubelet.KubeletProcess,
    plain_namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    runs = tmp_path / "runs"
    pod = with_host_dir(with_env(load("counting-pod.yaml")[0], "RUNS", str(runs)), tmp_path)
    name = create(control_plane, plain_namespace, pod)["metadata"]["name"]
    finished = control_plane.wait_for_pod(plain_namespace, name)

    kubelet.stop()
    kubelet.start()
    # Once the new kubelet runs a new pod, it has listed (and passed over) the finished one.
    probe = create_all(control_plane, plain_namespace, "termination-message-pod.yaml")["metadata"]["name"]
    assert control_plane.wait_for_pod(plain_namespace, probe)["status"]["phase"] == "Succeeded"

    after = control_plane.api(f"/api/v1/namespaces/{plain_namespace}/pods/{name}")
    assert runs.read_text() == "ran\n"
    assert after["status"]["phase"] == "Succeeded"
    assert after["status"]["containerStatuses"] == finished["status"]["containerStatuses"]
