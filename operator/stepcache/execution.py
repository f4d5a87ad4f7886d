"""Did a Succeeded pod run what its key says? Compares the pod's container statuses with its keyed spec.

The key is computed from the spec at admission, and the recorder recomputes it from the spec it sees at the end. Both
can agree while something else ran: a container's image can be patched while it runs (the kubelet restarts the
container with the new image) and patched back once the pod has finished, so the spec looks untouched. The kubelet's
status says what really ran — the image of the container's current run, and how often it was restarted — so a pod is
recorded only when, for every keyed container, that agrees with the keyed spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["normalized_image", "why_not_as_keyed"]

_DEFAULT_REGISTRY = "docker.io"
_DIGEST = re.compile(r"@([a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,})$")
_BARE_IMAGE_ID = re.compile(r"^(?:sha256:)?[0-9a-f]{64}$")


def normalized_image(reference: str) -> str:
    """The fully qualified form of an image reference, as container runtimes report it.

    `busybox:1.36` → `docker.io/library/busybox:1.36`; `busybox` → `docker.io/library/busybox:latest`; a reference
    with a digest keeps the digest and drops the tag (the runtime ran the digest).
    """
    reference = reference.strip()
    digest_match = _DIGEST.search(reference)
    digest = digest_match.group(1) if digest_match else None
    name = reference[: digest_match.start()] if digest_match else reference
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        registry, path = _DEFAULT_REGISTRY, name
    else:
        registry, path = first, rest
    repository, colon, tag = path.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = path, ""
    if registry == _DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if digest is not None:
        return f"{registry}/{repository}@{digest}"
    return f"{registry}/{repository}:{tag or 'latest'}"


def _digest_of(reference: str) -> str | None:
    match = _DIGEST.search(reference.strip())
    return match.group(1) if match else None


def _ran_image(spec_image: str, status: Mapping[str, Any]) -> bool:
    """Whether the container's current run used the spec's image (by name and tag, or by digest when pinned)."""
    reported = str(status.get("image") or "")
    wanted_digest = _digest_of(spec_image)
    if wanted_digest is not None and _digest_of(str(status.get("imageID") or "")) == wanted_digest:
        return True
    if not reported or _BARE_IMAGE_ID.match(reported):
        return False  # an image id alone cannot show which tag ran
    return normalized_image(reported) == normalized_image(spec_image)


def why_not_as_keyed(pod: Mapping[str, Any], containers: Sequence[str]) -> str | None:
    """Why the pod's statuses disagree with its keyed containers' spec, or None when every one ran as keyed.

    Reasons: `no-container-status` (the kubelet reported nothing for a keyed container), `image-mismatch` (its last
    run used another image than the spec names now), `restarted` (a container of a `restartPolicy: Never` pod ran
    more than once: only a spec change restarts it, so part of its work ran under another spec).
    """
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    specs = {c.get("name"): c for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]}
    statuses = {
        s.get("name"): s
        for s in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
        if isinstance(s, Mapping)
    }
    never = (spec.get("restartPolicy") or "Always") == "Never"
    for name in containers:
        container, reported = specs.get(name), statuses.get(name)
        if container is None or reported is None:
            return "no-container-status"
        if not _ran_image(str(container.get("image") or ""), reported):
            return "image-mismatch"
        sidecar = container.get("restartPolicy") == "Always"
        if never and not sidecar and int(reported.get("restartCount") or 0) > 0:
            return "restarted"
    return None
