"""A hit of an Argo step with output artifacts: the replay `main` writes each artifact back where the step wrote it.

The replay scripts run under the host's `sh` after the kubelet's `$(VAR)` expansion, with the artifact paths moved
under a temporary directory; the files they leave are compared with what the step originally wrote. Blobs reach the
replay inline here; fetching from the blob endpoint is tested against the real endpoint in
tests/integration/test_artifacts.py.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
from typing import Any

import pytest

from stepcache import argo, artifacts, errors, mutation
from tests.tarballs import argo_tgz
from tests.unit.test_mutation import (
    OPTIONS,
    SIGNED,
    container_environment,
    containers,
    entry,
    kubelet_expand,
    load,
    patched,
    run,
    set_template,
)

DATA = b"payload written by produce\n"
RAW = bytes(range(256)) * 4
TREE = {"a.txt": b"alpha\n", "sub/b.txt": b"beta $(x) `id`\n"}
BLOBS = {
    "data": argo_tgz("/tmp/out/data.txt", DATA),
    "raw": RAW,
    "tree": argo_tgz("/tmp/tree", TREE),
}
PATHS = {"data": "/tmp/out/data.txt", "raw": "/tmp/raw.bin", "tree": "/tmp/tree"}
ARCHIVES = {"data": "tar", "raw": "none", "tree": "tar"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_pod() -> dict[str, Any]:
    pod = load("argo-3.6-pod")
    tmpl = argo.template(pod)
    assert tmpl is not None
    tmpl["outputs"]["artifacts"] = [
        {"name": "data", "path": PATHS["data"]},
        {"name": "raw", "path": PATHS["raw"], "archive": {"none": {}}},
        {"name": "tree", "path": PATHS["tree"]},
        {"name": "never", "path": "/tmp/never", "optional": True},
    ]
    set_template(pod, tmpl)
    return pod


ARTIFACT_ENTRY = entry(
    termination_messages={},
    argo_outputs={
        "parameters": {"length": "9", "upper": "STEPCACHE"},
        "result": "9",
        "artifacts": [
            {"name": name, "path": PATHS[name], "archive": ARCHIVES[name], "sha256": sha(blob), "size": len(blob)}
            for name, blob in BLOBS.items()
        ],
    },
)


def inline_sources(blobs: dict[str, bytes] = BLOBS) -> dict[str, artifacts.Source]:
    return {sha(BLOBS[name]): artifacts.Source(inline=blob) for name, blob in blobs.items()}


def hit(pod: dict[str, Any], *, sources: dict[str, artifacts.Source]) -> dict[str, Any]:
    patch = mutation.hit_patch(pod, signed=SIGNED, entry=ARTIFACT_ENTRY, options=OPTIONS, kfp=False, sources=sources)
    return patched(pod, patch)


def replay(main: dict[str, Any], root: pathlib.Path) -> Any:
    """Run the replay with every output path moved under `root`."""
    env = container_environment(main)
    for name, value in list(env.items()):
        if name.startswith(("STEPCACHE_PARAM_PATH_", "STEPCACHE_ARTIFACT_PATH_")):
            env[name] = str(root / value.lstrip("/"))
    command = [kubelet_expand(part, env) for part in main["command"]]
    return run(command[command.index("--") + 1 :], env, root)


def test_the_replay_writes_each_artifact_back_as_the_step_wrote_it(tmp_path: pathlib.Path) -> None:
    main = containers(hit(artifact_pod(), sources=inline_sources()))["main"]

    done = replay(main, tmp_path)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tmp/out/data.txt").read_bytes() == DATA
    assert (tmp_path / "tmp/raw.bin").read_bytes() == RAW
    assert (tmp_path / "tmp/tree/a.txt").read_bytes() == TREE["a.txt"]
    assert (tmp_path / "tmp/tree/sub/b.txt").read_bytes() == TREE["sub/b.txt"]
    assert not (tmp_path / "tmp/never").exists()
    leftovers = [path.name for path in tmp_path.rglob(".stepcache-*")]
    assert leftovers == []
    assert (tmp_path / "tmp/outputs/length").read_bytes() == b"9\n"
    assert done.stdout == b"9\n"


def test_a_blob_whose_sha256_does_not_match_fails_the_replay_and_writes_nothing(tmp_path: pathlib.Path) -> None:
    corrupted = dict(BLOBS, raw=RAW[:-1] + b"\x00")
    main = containers(hit(artifact_pod(), sources=inline_sources(corrupted)))["main"]

    done = replay(main, tmp_path)

    assert done.returncode == 1
    assert not (tmp_path / "tmp/raw.bin").exists()
    assert f"has sha256 {sha(corrupted['raw'])}, not {sha(RAW)}".encode() in done.stderr
    assert list(tmp_path.rglob(".stepcache-*")) == []


def test_the_replay_writes_on_an_empty_dir_and_carries_values_only_in_env() -> None:
    url = "http://blobs.stepcache-system:8082/blobs/x?namespace=team-a&expires=1&signature=s"
    sources = {**inline_sources(), sha(BLOBS["tree"]): artifacts.Source(url=url)}
    pod = hit(artifact_pod(), sources=sources)
    main = containers(pod)["main"]

    mounts = {mount["mountPath"]: mount["name"] for mount in main["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}
    env = {var["name"]: var["value"] for var in main["env"]}
    assert env["STEPCACHE_ARTIFACT_URL_2"] == url
    assert env["STEPCACHE_ARTIFACT_SHA256_2"] == sha(BLOBS["tree"])
    assert "STEPCACHE_ARTIFACT_DATA_2" not in env
    script = main["command"][-1]
    assert url not in script
    assert "/tmp/out/data.txt" not in script
    assert kubelet_expand(script, env) == script


def test_a_hit_without_a_way_to_deliver_a_blob_is_uncacheable() -> None:
    sources = inline_sources()
    del sources[sha(BLOBS["raw"])]

    with pytest.raises(errors.Uncacheable, match="'raw'"):
        mutation.hit_patch(
            artifact_pod(), signed=SIGNED, entry=ARTIFACT_ENTRY, options=OPTIONS, kfp=False, sources=sources
        )


def test_an_entry_recorded_as_not_replayable_is_never_served() -> None:
    flagged = entry(argo_outputs={"parameters": {"length": "9", "upper": "X"}, "result": "9", "unreplayable": "zip"})

    with pytest.raises(errors.Uncacheable, match="not replayable"):
        mutation.hit_patch(
            artifact_pod(), signed=SIGNED, entry=flagged, options=OPTIONS, kfp=False, sources=inline_sources()
        )


def test_a_kfp_v1_output_declared_as_parameter_and_artifact_gets_the_artifacts_bytes(tmp_path: pathlib.Path) -> None:
    """KFP v1 declares one file as both; argoexec reads the parameter back from the file the artifact restored."""
    pod = load("kfp-v1-pod")
    tmpl = argo.template(pod)
    assert tmpl is not None
    path = "/tmp/outputs/Output/data"
    tmpl["outputs"] = {
        "parameters": [{"name": "print-Output", "valueFrom": {"path": path}}],
        "artifacts": [{"name": "print-Output", "path": path}],
    }
    set_template(pod, tmpl)
    blob = argo_tgz(path, b"hello")
    served = entry(
        termination_messages={},
        argo_outputs={
            "parameters": {"print-Output": "hello"},
            "result": None,
            "artifacts": [{"name": "print-Output", "path": path, "archive": "tar", "sha256": sha(blob), "size": 5}],
        },
    )
    patch = mutation.hit_patch(
        pod, signed=SIGNED, entry=served, options=OPTIONS, kfp=True, sources={sha(blob): artifacts.Source(inline=blob)}
    )
    main = containers(patched(pod, patch))["main"]

    done = replay(main, tmp_path)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tmp/outputs/Output/data").read_bytes() == b"hello"


def busybox_bin(directory: pathlib.Path) -> pathlib.Path:
    """A PATH holding busybox's applets and nothing else: the replay image's tools (hack/install-system-deps.sh)."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox is not installed (hack/install-system-deps.sh installs it)"
    directory.mkdir()
    for applet in ("sh", "wget", "sha256sum", "cut", "base64", "tar", "mkdir", "mv", "rm", "printf", "cat"):
        (directory / applet).symlink_to(busybox)
    return directory


@pytest.mark.parametrize("corrupt", [False, True])
def test_the_replay_runs_on_busybox_alone(tmp_path: pathlib.Path, corrupt: bool) -> None:
    blobs = dict(BLOBS, data=argo_tgz("/tmp/out/data.txt", b"tampered")) if corrupt else BLOBS
    main = containers(hit(artifact_pod(), sources=inline_sources(blobs)))["main"]
    root = tmp_path / "root"
    root.mkdir()
    env = container_environment(main)
    for name, value in list(env.items()):
        if name.startswith(("STEPCACHE_PARAM_PATH_", "STEPCACHE_ARTIFACT_PATH_")):
            env[name] = str(root / value.lstrip("/"))
    command = [kubelet_expand(part, env) for part in main["command"]]

    done = subprocess.run(
        command[command.index("--") + 1 :],
        env={**env, "PATH": str(busybox_bin(tmp_path / "bin"))},
        cwd=root,
        capture_output=True,
        timeout=30,
        check=False,
    )

    if corrupt:
        assert done.returncode == 1
        assert not (root / "tmp/out/data.txt").exists()
    else:
        assert done.returncode == 0, done.stderr
        assert (root / "tmp/out/data.txt").read_bytes() == DATA
        assert (root / "tmp/raw.bin").read_bytes() == RAW
        assert (root / "tmp/tree/sub/b.txt").read_bytes() == TREE["sub/b.txt"]


def test_the_replay_function_is_plain_posix_sh_without_kubelet_expansions() -> None:
    assert "$(" not in artifacts.REPLAY_FUNCTION
    assert "$$" not in artifacts.REPLAY_FUNCTION
    assert json.dumps(artifacts.REPLAY_FUNCTION).isascii()
