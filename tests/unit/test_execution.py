"""Whether a Succeeded pod ran what its key covers: container statuses against the keyed spec."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from stepcache import execution

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("acme/tool:2", "docker.io/acme/tool:2"),
        ("ghcr.io/acme/tool:2", "ghcr.io/acme/tool:2"),
        ("localhost:5000/tool", "localhost:5000/tool:latest"),
        ("registry:5000/team/tool:v1", "registry:5000/team/tool:v1"),
        (f"busybox:1.36@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"ghcr.io/acme/tool@{DIGEST}", f"ghcr.io/acme/tool@{DIGEST}"),
    ],
)
def test_image_references_are_compared_in_their_fully_qualified_form(reference: str, expected: str) -> None:
    assert execution.normalized_image(reference) == expected


def pod(*, spec_image: str = "busybox:1.36", restart_policy: str = "Never", **status: Any) -> dict[str, Any]:
    reported = {"name": "main", "image": "docker.io/library/busybox:1.36", "imageID": "", "restartCount": 0}
    reported.update(status)
    return {
        "spec": {
            "restartPolicy": restart_policy,
            "initContainers": [{"name": "fetch", "image": "alpine:3.20"}],
            "containers": [{"name": "main", "image": spec_image}],
        },
        "status": {
            "initContainerStatuses": [{"name": "fetch", "image": "docker.io/library/alpine:3.20", "restartCount": 0}],
            "containerStatuses": [reported],
        },
    }


def test_a_pod_that_ran_its_keyed_images_passes() -> None:
    assert execution.why_not_as_keyed(pod(), ["fetch", "main"]) is None


def test_an_image_swapped_and_restored_after_admission_is_caught_by_the_status() -> None:
    # The spec names busybox again, but the container's run used another image.
    swapped = pod(image="docker.io/library/python:3.12")
    assert execution.why_not_as_keyed(swapped, ["fetch", "main"]) == "image-mismatch"


def test_an_init_containers_image_is_checked_too() -> None:
    swapped = pod()
    swapped["status"]["initContainerStatuses"][0]["image"] = "docker.io/library/alpine:3.21"
    assert execution.why_not_as_keyed(swapped, ["fetch", "main"]) == "image-mismatch"


def test_containers_outside_the_key_are_not_checked() -> None:
    injected = pod()
    injected["spec"]["containers"].append({"name": "mesh-proxy", "image": "envoy:1"})
    injected["status"]["containerStatuses"].append({"name": "mesh-proxy", "image": "other:2", "restartCount": 3})
    assert execution.why_not_as_keyed(injected, ["fetch", "main"]) is None


def test_a_keyed_container_without_status_is_not_trusted() -> None:
    missing = pod()
    missing["status"]["containerStatuses"] = []
    assert execution.why_not_as_keyed(missing, ["fetch", "main"]) == "no-container-status"


def test_a_container_restarted_in_a_never_restart_pod_ran_under_another_spec() -> None:
    assert execution.why_not_as_keyed(pod(restartCount=1), ["main"]) == "restarted"


def test_restarts_are_normal_under_on_failure() -> None:
    assert execution.why_not_as_keyed(pod(restart_policy="OnFailure", restartCount=2), ["main"]) is None


def test_a_native_sidecar_may_restart() -> None:
    sidecar = pod()
    sidecar["spec"]["initContainers"][0]["restartPolicy"] = "Always"
    sidecar["status"]["initContainerStatuses"][0]["restartCount"] = 4
    assert execution.why_not_as_keyed(sidecar, ["fetch", "main"]) is None


def test_a_digest_pinned_image_is_matched_by_the_image_id() -> None:
    pinned = pod(
        spec_image=f"busybox@{DIGEST}", image="sha256:" + "cd" * 32, imageID=f"docker.io/library/busybox@{DIGEST}"
    )
    assert execution.why_not_as_keyed(pinned, ["main"]) is None


def test_a_digest_pinned_image_whose_run_had_another_digest_is_caught() -> None:
    other = "sha256:" + "ef" * 32
    pinned = pod(spec_image=f"busybox@{DIGEST}", image=f"docker.io/library/busybox@{other}", imageID=other)
    assert execution.why_not_as_keyed(pinned, ["main"]) == "image-mismatch"


def test_a_bare_image_id_cannot_vouch_for_a_tag() -> None:
    bare = pod(image="sha256:" + "cd" * 32)
    assert execution.why_not_as_keyed(bare, ["main"]) == "image-mismatch"


def test_the_check_does_not_change_the_pod() -> None:
    before = pod()
    after = copy.deepcopy(before)
    execution.why_not_as_keyed(after, ["fetch", "main"])
    assert after == before
