"""The local experiment behind the proposal for kopf: a JSON patch built from the patched paths only.

kopf answers every admission review by `Patch.as_json_patch()`: a deep copy of the whole object, the merge patch
applied to the copy, then `jsonpatch.JsonPatch.from_diff(original, copy)` over the whole object. Its cost grows
with the pod (a 7 KB pod with managedFields) rather than with the patch, and for list fields — which a merge patch
replaces whole — the diff emits element-by-element `replace`/`move` ops that kube-apiserver must then apply.

`paths_json_patch` walks the merge patch instead and emits one op per changed path (`add`, `replace`, `remove`),
with kopf's two merge quirks kept (a map emptied by deletions goes; an empty map in the patch is ignored), so the
object it produces is the same. `compare` measures both on real reviews and checks that applying either patch
yields the same pod. `install()` swaps it into kopf for an end-to-end run (bench/_kopf_paths/sitecustomize.py
does that in the operator process when BENCH_KOPF_PATHS_PATCH=1) — an experiment, never stepcache's own code.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

__all__ = ["compare", "install", "paths_json_patch"]


def _pointer(prefix: str, key: str) -> str:
    return f"{prefix}/{key.replace('~', '~0').replace('/', '~1')}"


def _clean(value: Any) -> Any:
    """A merge-patch value as kopf would write it into a place that did not exist: no None, no empty maps.

    Values are not copied: kopf serialises the ops at once (`build_response`), as it does its diff's.
    """
    if not isinstance(value, Mapping):
        return value
    cleaned = {k: _clean(v) for k, v in value.items() if v is not None}
    return {k: v for k, v in cleaned.items() if not (isinstance(v, dict) and not v)}


def _walk(current: Mapping[str, Any], patch: Mapping[str, Any], prefix: str) -> tuple[list[dict[str, Any]], bool]:
    """Ops turning `current` into `current` merged with `patch`, and whether deletions left it empty."""
    ops: list[dict[str, Any]] = []
    remaining = set(current)
    removed = False
    for key, value in patch.items():
        path = _pointer(prefix, key)
        if value is None:
            if key in current:
                ops.append({"op": "remove", "path": path})
                remaining.discard(key)
                removed = True
        elif isinstance(value, Mapping):
            existing = current.get(key)
            if isinstance(existing, Mapping):
                child_ops, emptied = _walk(existing, value, path)
                if emptied:
                    ops.append({"op": "remove", "path": path})
                    remaining.discard(key)
                    removed = True
                else:
                    ops.extend(child_ops)
            else:
                new = _clean(value)
                if new:
                    ops.append({"op": "replace" if key in current else "add", "path": path, "value": new})
                    remaining.add(key)
        elif key not in current:
            ops.append({"op": "add", "path": path, "value": value})
            remaining.add(key)
        elif current[key] != value:
            ops.append({"op": "replace", "path": path, "value": value})
    return ops, removed and not remaining


def paths_json_patch(body: Mapping[str, Any], patch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) for kopf's merge `patch` on `body`, built from the patched paths only."""
    ops, _ = _walk(body, patch, "")
    return ops


def install() -> None:
    """Make kopf's `Patch.as_json_patch` use `paths_json_patch` when the patch holds no callables."""
    from kopf._cogs.structs import patches

    original: Callable[..., Any] = patches.Patch.as_json_patch

    def as_json_patch(self: Any, body: Any = None) -> Any:
        base = body if body is not None else self._original
        if self.fns or base is None or not self:
            return original(self, body)
        return paths_json_patch(base, self)

    patches.Patch.as_json_patch = as_json_patch  # type: ignore[method-assign]


def _time(fn: Callable[[], Any], *, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6


def compare(cases: list[tuple[str, str, dict[str, Any], dict[str, Any]]], *, repeat: int = 200) -> list[dict[str, Any]]:
    """For each (kind, outcome, pod, merge patch): µs per call of kopf's way and of the paths-only way (best of 5),
    op counts and sizes, and whether both JSON patches produce the same pod."""
    import jsonpatch
    import kopf

    rows = []
    for kind, outcome, pod, merge in cases:
        body = kopf.Body(cast(kopf.RawBody, pod))

        def kopf_way(merge: dict[str, Any] = merge, body: kopf.Body = body) -> Any:
            patch = kopf.Patch(body=body)
            patch.update(merge)
            return patch.as_json_patch()

        def paths_way(merge: dict[str, Any] = merge, pod: dict[str, Any] = pod) -> Any:
            return paths_json_patch(pod, merge)

        def copy_pod(pod: dict[str, Any] = pod) -> Any:
            return copy.deepcopy(pod)

        theirs, ours = kopf_way(), paths_way()
        rows.append(
            {
                "kind": kind,
                "outcome": outcome,
                "pod_bytes": len(json.dumps(pod, separators=(",", ":"))),
                "kopf_us": _time(kopf_way, repeat=repeat),
                "paths_us": _time(paths_way, repeat=repeat),
                "deepcopy_us": _time(copy_pod, repeat=repeat),
                "kopf_ops": len(theirs),
                "paths_ops": len(ours),
                "kopf_patch_bytes": len(json.dumps(theirs, separators=(",", ":"))),
                "paths_patch_bytes": len(json.dumps(ours, separators=(",", ":"))),
                "equal": jsonpatch.apply_patch(pod, theirs) == jsonpatch.apply_patch(pod, ours),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python bench/kopf_patch.py CASES.json`: run `compare` on cases saved as JSON, print the rows as JSON.

    Runs in any virtualenv holding kopf (and jsonpatch), so kopf's way can be timed with another jsonpatch.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as file:
        cases = [tuple(case) for case in json.load(file)]
    print(json.dumps(compare(cases)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
