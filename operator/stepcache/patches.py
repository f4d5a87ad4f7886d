"""The JSON patch (RFC 6902) the API server receives, built from a merge patch (RFC 7386) path by path.

Admission builds its changes as merge patches (`mutation`), but kube-apiserver takes a JSON patch. kopf's own
conversion diffs the whole object against a patched deep copy, and a diff decides nothing about *how* the object
gets there: jsonpatch 1.33's diff emits `move` ops that, applied in order, corrupt some pods (a label taking a
command's value, a replay command shifted), and whether it happens depends on the process's string hashing. Here
the ops follow the merge patch's own paths instead, so they are right by construction:

- a key set to null is removed, and only if it is there (an op on a missing path fails the whole patch);
- a map merged into a map descends into it; any other value is added where absent and replaced where present,
  a map landing where there was none (or a non-map) arriving whole, with its nulls dropped as RFC 7386 drops them;
- every op targets a distinct path and none lies below another op's path or below a path an op creates, so the
  order of the ops does not matter and applying them in order gives exactly the merged object.

The cost is proportional to the patch, not to the object: no copy of the pod, no diff.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

__all__ = ["Operation", "json_patch", "pointer"]


class Operation(TypedDict):
    """One RFC 6902 operation; `value` is absent for `remove`."""

    op: Literal["add", "replace", "remove"]
    path: str
    value: NotRequired[Any]


def pointer(*keys: str) -> str:
    """The JSON pointer (RFC 6901) of a path of object keys: `~` and `/` inside a key escaped as `~0` and `~1`."""
    return "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in keys)


def json_patch(obj: Mapping[str, Any], merge: Mapping[str, Any]) -> list[Operation]:
    """The ops that turn `obj` into `obj` merged with `merge` (RFC 7386), when applied in order.

    Neither input is changed. Values in the ops may be shared with `merge` (the caller serialises them at once).
    """
    ops: list[Operation] = []
    _walk(obj, merge, "", ops)
    return ops


def _walk(target: Mapping[str, Any], merge: Mapping[str, Any], prefix: str, ops: list[Operation]) -> None:
    for key, value in merge.items():
        path = prefix + pointer(key)
        present = key in target
        if value is None:
            if present:
                ops.append({"op": "remove", "path": path})
        elif isinstance(value, Mapping) and present and isinstance(target[key], Mapping):
            _walk(target[key], value, path, ops)
        else:
            ops.append({"op": "replace" if present else "add", "path": path, "value": _created(value)})


def _created(value: Any) -> Any:
    """A merge-patch value as it lands where no map was: RFC 7386 merges a map into `{}`, which drops its nulls."""
    if not isinstance(value, Mapping):
        return value
    return {key: _created(item) for key, item in value.items() if item is not None}
