"""Reading the Argo Workflows template a pod was created from.

Argo puts the resolved template (input parameters already substituted) on the pod: as env `ARGO_TEMPLATE` on a
container or init container (Argo >= 3.6 sets it on `init` only) or, on older Argo, as the annotation
`workflows.argoproj.io/template`. Keys, replays and output extraction all read it from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from stepcache import errors

__all__ = [
    "MAIN_CONTAINER",
    "declares_artifacts",
    "is_argo",
    "output_parameter_paths",
    "template",
]

TEMPLATE_ENV = "ARGO_TEMPLATE"
OFFLOADED_ENV = "ARGO_TEMPLATE_OFFLOADED"
TEMPLATE_ANNOTATION = "workflows.argoproj.io/template"
NODE_ID_ANNOTATION = "workflows.argoproj.io/node-id"
OUTPUTS_ANNOTATION = "workflows.argoproj.io/outputs"
MAIN_CONTAINER = "main"


def _all_env(pod: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        yield from container.get("env") or []


def is_argo(pod: Mapping[str, Any]) -> bool:
    """True for a pod created by Argo Workflows for a template step."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if TEMPLATE_ANNOTATION in annotations:
        return True
    return any(var.get("name") in (TEMPLATE_ENV, OFFLOADED_ENV) for var in _all_env(pod))


def template(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod's Argo template, or None for a non-Argo pod.

    Raises `Uncacheable` when the template is offloaded to a ConfigMap or is not valid JSON: such a step runs
    uncached rather than being keyed from partial information.
    """
    raw: str | None = None
    for var in _all_env(pod):
        if var.get("name") == OFFLOADED_ENV:
            raise errors.Uncacheable("the Argo template is offloaded to a ConfigMap")
        if var.get("name") == TEMPLATE_ENV and isinstance(var.get("value"), str):
            raw = var["value"]
            break
    if raw is None:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        raw = annotations.get(TEMPLATE_ANNOTATION)
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise errors.Uncacheable(f"the Argo template is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise errors.Uncacheable("the Argo template is not a JSON object")
    return parsed


def output_parameter_paths(tmpl: Mapping[str, Any]) -> dict[str, str]:
    """Output parameter name → the file path the step writes it to (`valueFrom.path`)."""
    paths: dict[str, str] = {}
    for param in (tmpl.get("outputs") or {}).get("parameters") or []:
        path = (param.get("valueFrom") or {}).get("path")
        if param.get("name") and path:
            paths[param["name"]] = path
    return paths


def declares_artifacts(tmpl: Mapping[str, Any]) -> bool:
    """Output artifacts' bytes are not stored, so a step declaring any cannot be replayed."""
    return bool((tmpl.get("outputs") or {}).get("artifacts"))
