"""JSON from outside, read safely: its nesting bounded before it is parsed, its types checked before they are read.

stepcache's readers (keys, mutation, argo, outputs) take the JSON types Kubernetes' schemas promise — a container is
an object, its `env` a list of objects, a name a string — and would fail on anything else with a TypeError or an
AttributeError that says nothing to the user. So where untrusted JSON comes in, its shape is checked once against
the schemas below, and a mismatch becomes one sentence naming the field (`spec.containers[0].env[2] must be an
object`); the readers behind the check stay simple.

The schemas list only the fields stepcache reads, with the types the Kubernetes (or Argo) schema gives them; every
other field may hold anything. A JSON null counts as absent for an object's field, as it does for the API server; a
null list item or map value is of the wrong type.

What reaches the webhook through a real API server always fits `POD` (the API server decodes a Pod into its typed
struct); only a direct POST or the command line can break it. An Argo template is different: it is JSON inside a
string (env `ARGO_TEMPLATE`, or an annotation), which nobody validates, so its nesting and shape are checked here
whatever sent it. Nesting matters because Python's parser recurses: thousands of `[` exhaust the stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "ARGO_OUTPUTS",
    "ARGO_TEMPLATE",
    "POD",
    "Shape",
    "TooDeep",
    "loads",
    "nesting_exceeds",
    "problems",
]


class Shape:
    """A JSON type a reader relies on; `what` completes "must be …" in the message."""

    what = "anything"

    def accepts(self, value: Any) -> bool:
        return True

    def inner(self, value: Any, at: str) -> Iterator[tuple[str, str]]:
        """The problems below an accepted value."""
        return iter(())


class _Scalar(Shape):
    def __init__(self, what: str, *types: type) -> None:
        self.what = what
        self._types = types

    def accepts(self, value: Any) -> bool:
        # bool is an int in Python, never in JSON
        return isinstance(value, self._types) and (bool in self._types or not isinstance(value, bool))


STRING = _Scalar("a string", str)
BOOLEAN = _Scalar("a boolean", bool)
INTEGER = _Scalar("an integer", int)
QUANTITY = _Scalar("a quantity (a string or a number)", str, int, float)


class Object(Shape):
    """A JSON object whose listed fields have the given shapes (when present: `required` ones must be); other fields
    are not checked."""

    what = "an object"

    def __init__(self, fields: Mapping[str, Shape] | None = None, *, required: tuple[str, ...] = ()) -> None:
        self.fields = dict(fields or {})
        self.required = required

    def accepts(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def inner(self, value: Any, at: str) -> Iterator[tuple[str, str]]:
        for name, shape in self.fields.items():
            where = f"{at}.{name}" if at else name
            if name in self.required and value.get(name) is None:
                yield where, "is required"
            else:
                yield from _check(value.get(name), shape, where)


class MapOf(Shape):
    """A JSON object used as a map: every value has one shape (labels, annotations, requests)."""

    what = "an object"

    def __init__(self, values: Shape) -> None:
        self.values = values

    def accepts(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def inner(self, value: Any, at: str) -> Iterator[tuple[str, str]]:
        for name, item in value.items():
            yield from _check(item, self.values, f"{at}[{name!r}]", absent=False)


class ListOf(Shape):
    """A JSON array whose every item has one shape (and, with `at_least`, that many items)."""

    def __init__(self, items: Shape, *, at_least: int = 0) -> None:
        self.items = items
        self.at_least = at_least
        self.what = f"a list of {_PLURALS.get(items.what, 'values')}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def inner(self, value: Any, at: str) -> Iterator[tuple[str, str]]:
        if len(value) < self.at_least:
            yield at, f"must hold at least {self.at_least}"
        for index, item in enumerate(value):
            yield from _check(item, self.items, f"{at}[{index}]", absent=False)


_PLURALS = {
    "a string": "strings",
    "a boolean": "booleans",
    "an integer": "integers",
    "a quantity (a string or a number)": "quantities",
    "an object": "objects",
}


def problems(value: Any, shape: Shape, *, at: str = "") -> Iterator[tuple[str, str]]:
    """(field, reason) for each place where `value` does not have `shape`; nothing below a misfit is looked at.

    `at` names `value` itself; a document's root is "" and its fields are named without a leading dot.
    """
    return _check(value, shape, at)


def _check(value: Any, shape: Shape, at: str, *, absent: bool = True) -> Iterator[tuple[str, str]]:
    """`absent`: a null here means the field is not there (an object's field), not a value of the wrong type (a list
    item, a map's value)."""
    if value is None and absent:
        return
    if not shape.accepts(value):
        yield at, f"must be {shape.what}"
        return
    yield from shape.inner(value, at)


# --- the schemas ---------------------------------------------------------------------------------------------------

_NAMES = {"name": STRING}
_KEY_TO_PATH = Object({"key": STRING, "path": STRING, "mode": INTEGER})
_FIELD_REF = Object({"fieldPath": STRING, "apiVersion": STRING})
_RESOURCE_REF = Object({"containerName": STRING, "resource": STRING, "divisor": QUANTITY})
_KEY_REF = Object({"name": STRING, "key": STRING, "optional": BOOLEAN})
_DOWNWARD_ITEMS = ListOf(Object({"path": STRING, "fieldRef": _FIELD_REF, "resourceFieldRef": _RESOURCE_REF}))
_REFERENCED = {"name": STRING, "items": ListOf(_KEY_TO_PATH), "optional": BOOLEAN}
_PROFILE = Object({"type": STRING})
_SECURITY = {
    "runAsNonRoot": BOOLEAN,
    "runAsUser": INTEGER,
    "runAsGroup": INTEGER,
    "seccompProfile": _PROFILE,
    "appArmorProfile": _PROFILE,
    "seLinuxOptions": Object({"type": STRING, "user": STRING, "role": STRING, "level": STRING}),
}
_RESOURCES = Object({"requests": MapOf(QUANTITY), "limits": MapOf(QUANTITY), "claims": ListOf(Object(_NAMES))})

_CONTAINER = Object(
    {
        "name": STRING,
        "image": STRING,
        "command": ListOf(STRING),
        "args": ListOf(STRING),
        "workingDir": STRING,
        "env": ListOf(
            Object(
                {
                    "name": STRING,
                    "value": STRING,
                    "valueFrom": Object(
                        {
                            "fieldRef": _FIELD_REF,
                            "resourceFieldRef": _RESOURCE_REF,
                            "configMapKeyRef": _KEY_REF,
                            "secretKeyRef": _KEY_REF,
                        }
                    ),
                }
            )
        ),
        "envFrom": ListOf(
            Object(
                {
                    "prefix": STRING,
                    "configMapRef": Object({"name": STRING, "optional": BOOLEAN}),
                    "secretRef": Object({"name": STRING, "optional": BOOLEAN}),
                }
            )
        ),
        "volumeMounts": ListOf(Object({"name": STRING, "mountPath": STRING, "subPath": STRING, "readOnly": BOOLEAN})),
        "volumeDevices": ListOf(Object({"name": STRING, "devicePath": STRING})),
        "resources": _RESOURCES,
        "restartPolicy": STRING,
        "terminationMessagePath": STRING,
        "terminationMessagePolicy": STRING,
        "securityContext": Object({**_SECURITY, "privileged": BOOLEAN, "readOnlyRootFilesystem": BOOLEAN}),
    }
)

_VOLUME = Object(
    {
        "name": STRING,
        "configMap": Object({**_REFERENCED, "defaultMode": INTEGER}),
        "secret": Object({"secretName": STRING, "items": ListOf(_KEY_TO_PATH), "optional": BOOLEAN}),
        "downwardAPI": Object({"items": _DOWNWARD_ITEMS, "defaultMode": INTEGER}),
        "projected": Object(
            {
                "defaultMode": INTEGER,
                "sources": ListOf(
                    Object(
                        {
                            "configMap": Object(_REFERENCED),
                            "secret": Object(_REFERENCED),
                            "downwardAPI": Object({"items": _DOWNWARD_ITEMS}),
                            "serviceAccountToken": Object({"path": STRING, "audience": STRING}),
                        }
                    )
                ),
            }
        ),
        "emptyDir": Object({"medium": STRING, "sizeLimit": QUANTITY}),
        "persistentVolumeClaim": Object({"claimName": STRING, "readOnly": BOOLEAN}),
        "hostPath": Object({"path": STRING, "type": STRING}),
    }
)


POD = Object(
    {
        "metadata": Object(
            {
                "name": STRING,
                "generateName": STRING,
                "namespace": STRING,
                "uid": STRING,
                "labels": MapOf(STRING),
                "annotations": MapOf(STRING),
                "ownerReferences": ListOf(Object({"kind": STRING, "name": STRING, "uid": STRING})),
            }
        ),
        "spec": Object(
            {
                "restartPolicy": STRING,
                "serviceAccountName": STRING,
                "serviceAccount": STRING,
                "nodeSelector": MapOf(STRING),
                "resources": _RESOURCES,
                "securityContext": Object({**_SECURITY, "sysctls": ListOf(Object({"name": STRING, "value": STRING}))}),
                "initContainers": ListOf(_CONTAINER),
                "containers": ListOf(_CONTAINER, at_least=1),
                "ephemeralContainers": ListOf(_CONTAINER),
                "volumes": ListOf(_VOLUME),
            },
            required=("containers",),
        ),
    }
)
"""The Pod fields stepcache reads, with the types of the Kubernetes Pod schema (which requires a container)."""

ARGO_OUTPUTS = Object({"parameters": ListOf(Object({"name": STRING, "valueFrom": Object({"path": STRING})}))})
"""An Argo template's (or a WorkflowTaskResult's) `outputs`, as Argo's schema types them."""

ARGO_TEMPLATE = Object({"outputs": ARGO_OUTPUTS, "container": Object({}), "script": Object({"source": STRING})})
"""The Argo template fields stepcache reads, with the types of Argo's Template schema."""


# --- parsing -------------------------------------------------------------------------------------------------------


class TooDeep(ValueError):
    """JSON text nested deeper than the reader allows."""


# A JSON string: the brackets inside one do not nest anything (an unrolled loop: no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON text opens more than `limit` arrays or objects inside each other; never recurses.

    Text that is not JSON gets an answer too (its brackets outside what look like strings are counted); the parser
    refuses it afterwards anyway.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str, *, max_depth: int) -> Any:
    """`json.loads`, refusing nesting deeper than `max_depth` (`TooDeep`) before the parser could recurse into it.

    Every refusal is a ValueError: not JSON, `NaN`/`Infinity` (which Python's parser takes and JSON does not), a
    number too long for Python's int conversion, or too deep.
    """
    if nesting_exceeds(text, max_depth):
        raise TooDeep(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # not reached within the bound; kept so no input can end in one
        raise TooDeep(f"nested more than {max_depth} levels deep") from None
