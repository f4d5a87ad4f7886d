"""Where the process kubelet mounts a pod's volumes inside a container (hack/cluster/kubelet.py).

The paths come from pod specs (mountPath, subPath), so they are checked on a fake host tree: symlinks of the host
are followed as a container would follow them, and no subPath reaches outside its volume.
"""

from __future__ import annotations

import os
import pathlib

import pytest
from hack.cluster import kubelet as process_kubelet
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture
def host(tmp_path: pathlib.Path) -> pathlib.Path:
    """A host root like Debian's: /var/run → /run (absolute), /lib → usr/lib (relative), real /usr and /var."""
    (tmp_path / "var").mkdir()
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    os.symlink("/run", tmp_path / "var" / "run")
    os.symlink("usr/lib", tmp_path / "lib")
    return tmp_path


def test_a_mount_path_through_a_host_symlink_lands_where_the_symlink_points(host: pathlib.Path) -> None:
    assert process_kubelet.sandbox_path("/var/run/argo", host=host) == "/run/argo"
    assert process_kubelet.sandbox_path("/lib/thing", host=host) == "/usr/lib/thing"
    assert (
        process_kubelet.sandbox_path("/var/run/secrets/kubernetes.io/serviceaccount", host=host)
        == "/run/secrets/kubernetes.io/serviceaccount"
    )


def test_below_a_private_directory_or_a_missing_one_the_path_is_kept_as_written(host: pathlib.Path) -> None:
    os.symlink("/elsewhere", host / "run" / "argo")  # the host's /run is not the container's
    assert process_kubelet.sandbox_path("/run/argo/x", host=host) == "/run/argo/x"
    assert process_kubelet.sandbox_path("/tmp/in/data.txt", host=host) == "/tmp/in/data.txt"
    assert process_kubelet.sandbox_path("/argo/secret/s3/accesskey", host=host) == "/argo/secret/s3/accesskey"


def test_mounts_are_ordered_parents_first_with_sub_paths_created_in_the_volume(
    host: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    volume = tmp_path_factory.mktemp("volume")
    container = {
        "volumeMounts": [
            {"name": "v", "mountPath": "/mainctrfs/tmp/in/data", "subPath": "data", "readOnly": True},
            {"name": "v", "mountPath": "/var/run/argo"},
            {"name": "v", "mountPath": "/tmp", "subPathExpr": "$(INDEX)"},
        ]
    }

    mounts = process_kubelet.container_mounts(container, {"v": volume}, {"INDEX": "0"}, host=host)

    assert [(m.target, m.source, m.read_only) for m in mounts] == [
        ("/tmp", volume / "0", False),
        ("/run/argo", volume, False),
        ("/mainctrfs/tmp/in/data", volume / "data", True),
    ]
    assert (volume / "0").is_dir()
    assert (volume / "data").is_dir()


def test_a_mount_of_a_volume_the_pod_does_not_have_is_a_config_error(host: pathlib.Path) -> None:
    container = {"volumeMounts": [{"name": "missing", "mountPath": "/data"}]}
    with pytest.raises(process_kubelet.ContainerConfigError, match="missing"):
        process_kubelet.container_mounts(container, {}, {}, host=host)


segment = st.text(alphabet=st.characters(codec="ascii", exclude_characters="/\0"), min_size=1, max_size=8)


@given(parts=st.lists(st.one_of(segment, st.just(".."), st.just(".")), min_size=1, max_size=5))
def test_a_sub_path_is_inside_its_volume_or_refused(parts: list[str]) -> None:
    sub_path = "/".join(parts)
    volume = pathlib.Path("/volumes/v")
    try:
        relative = process_kubelet.relative_path(sub_path, what="subPath")
    except process_kubelet.ContainerConfigError:
        assert ".." in parts or all(part == "." for part in parts)
        return
    resolved = pathlib.Path(os.path.normpath(volume / relative))
    assert volume in resolved.parents
