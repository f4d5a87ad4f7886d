"""Reading a Pod or AdmissionReview that a user hands to the command line, whatever the file holds.

The webhook only ever sees pods the API server has validated; the command line reads anything: other encodings,
YAML features Kubernetes objects never use (dates, binary, anchors expanded a billion times), nesting deep enough to
exhaust the parser's recursion, and fields of the wrong type (`command: "echo hi"` is not a list). Each of these must
end in one line naming the file, the field and the reason, within bounded memory — never a traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from stepcache import errors, shapes

__all__ = ["MAX_BYTES", "Loaded", "load_pod", "pod_shape_problems"]

MAX_BYTES = 8 * 1024 * 1024
"""Larger than any object the API server stores (its request limit is 3 MiB), small enough to parse safely."""
_MAX_ALIASES = 64
_MAX_NODES = 1_000_000
_MAX_DEPTH = 64


class _Loader(yaml.SafeLoader):
    """SafeLoader with plain strings for dates (as Kubernetes' own YAML decoding yields) and a bound on aliases."""

    aliases_seen = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > _MAX_ALIASES:
                raise yaml.YAMLError(f"more than {_MAX_ALIASES} YAML aliases")
        return super().compose_node(parent, index)


# Kubernetes objects carry times as strings; YAML 1.1's implicit timestamps would turn them into datetimes.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _refuse_binary(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(None, None, "binary values have no place in a Pod", node.start_mark)


_Loader.add_constructor("tag:yaml.org,2002:binary", _refuse_binary)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loaded:
    """The pod read from a document, and the namespace an AdmissionReview's request names (if any)."""

    pod: dict[str, Any]
    request_namespace: str | None


def load_pod(data: bytes, *, source: str) -> Loaded:
    """A Pod from a Pod document or an AdmissionReview (its request.object), YAML or JSON; raises InvalidDocument."""
    if len(data) > MAX_BYTES:
        raise errors.InvalidDocument(source, None, f"larger than {MAX_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidDocument(source, None, f"not UTF-8 text (byte {exc.start})") from None
    try:
        document = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except RecursionError:
        raise errors.InvalidDocument(source, None, "nested too deeply") from None
    except yaml.YAMLError as exc:
        raise errors.InvalidDocument(source, None, f"not YAML or JSON: {_first_line(exc)}") from None
    _check_size(document, source=source)
    if not isinstance(document, Mapping):
        raise errors.InvalidDocument(source, None, "does not hold an object")
    request_namespace: str | None = None
    if document.get("kind") == "AdmissionReview":
        request = document.get("request")
        if not isinstance(request, Mapping) or not isinstance(request.get("object"), Mapping):
            raise errors.InvalidDocument(source, "request.object", "the AdmissionReview holds no object")
        namespace = request.get("namespace")
        request_namespace = namespace if isinstance(namespace, str) and namespace else None
        document = request["object"]
    kind = document.get("kind", "Pod")
    if kind != "Pod":
        raise errors.InvalidDocument(source, "kind", f"holds a {kind!r}, not a Pod or an AdmissionReview")
    for field, reason in pod_shape_problems(document):
        raise errors.InvalidDocument(source, field, reason)
    return Loaded(pod=dict(document), request_namespace=request_namespace)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _check_size(document: Any, *, source: str) -> None:
    """Bound what later code walks (aliases share nodes, so a small file can stand for a huge tree), and refuse
    what JSON cannot hold, which YAML can: keys that are not strings, and text that is not Unicode (a `\\ud800`
    escape stands for half a UTF-16 surrogate pair)."""
    count = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise errors.InvalidDocument(source, None, f"more than {_MAX_NODES} values")
        if depth > _MAX_DEPTH:
            raise errors.InvalidDocument(source, None, f"nested more than {_MAX_DEPTH} levels deep")
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str):
                    raise errors.InvalidDocument(source, None, f"holds a key that is not a string: {key!r}")
                _check_text(key, source=source)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_text(value, source=source)


def _check_text(text: str, *, source: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidDocument(source, None, "holds text that is not Unicode (a lone surrogate)") from None


# --- shape -----------------------------------------------------------------------------------------------------------


def pod_shape_problems(pod: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, reason) for every field the key reads whose type is not the one the API server would accept.

    The same check the webhook makes (`shapes.POD`): what passes it, the key can be computed from.
    """
    return shapes.problems(pod, shapes.POD)
