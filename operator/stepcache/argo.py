"""Reading the Argo Workflows template a pod was created from, and Argo's names on the pod.

Argo puts the resolved template (input parameters already substituted) on the pod: as env `ARGO_TEMPLATE` on every
container (Argo 3.3–3.5) or on `init` only (Argo >= 3.6, which also drops `inputs.parameters` from it), or, on older
Argo, as the annotation `workflows.argoproj.io/template`. Keys, replays and output extraction all read it from here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from stepcache import errors, shapes

__all__ = [
    "ARGS_FILE_ENV",
    "MAIN_CONTAINER",
    "MAX_TEMPLATE_DEPTH",
    "MAX_TEMPLATE_LENGTH",
    "PER_RUN_ANNOTATIONS",
    "PER_RUN_ENV",
    "PER_RUN_LABELS",
    "TEMPLATE_ENV",
    "args_offloaded",
    "declares_artifacts",
    "is_argo",
    "output_parameter_paths",
    "template",
]

TEMPLATE_ENV = "ARGO_TEMPLATE"
OFFLOADED_ENV = "ARGO_TEMPLATE_OFFLOADED"
OFFLOADED_VALUE = "offloaded"
"""What Argo >= 3.6 writes into `ARGO_TEMPLATE` when the template lives in a ConfigMap instead (> 128 KiB)."""
ARGS_FILE_ENV = "ARGO_CONTAINER_ARGS_FILE"
"""Set by Argo >= 4.0 on a container whose args it moved into a ConfigMap named after the pod."""
TEMPLATE_ANNOTATION = "workflows.argoproj.io/template"
NODE_ID_ANNOTATION = "workflows.argoproj.io/node-id"
OUTPUTS_ANNOTATION = "workflows.argoproj.io/outputs"
MAIN_CONTAINER = "main"
MAX_TEMPLATE_LENGTH = 1024 * 1024
"""Characters; a pod the API server stores holds less (Argo >= 3.6 moves a template over 128 KiB into a ConfigMap)."""
MAX_TEMPLATE_DEPTH = 64
"""Arrays and objects inside each other; Argo's own templates stay within about a dozen."""

PER_RUN_ENV = frozenset(
    {
        "ARGO_POD_NAME",
        "ARGO_POD_UID",
        "ARGO_NODE_ID",
        "ARGO_WORKFLOW_NAME",
        "ARGO_WORKFLOW_UID",
        "ARGO_DEADLINE",
        "ARGO_INCLUDE_SCRIPT_OUTPUT",
        "ARGO_TERMINATION_GRACE_PERIOD_SECONDS",
    }
)
"""Env Argo's controller sets from the run rather than from the step: the pod's and workflow's names and ids, the
node id, the workflow deadline, whether a later step reads this one's `result`, and a copy of the pod's
terminationGracePeriodSeconds (the workflow-controller, `workflowpod.go`, 3.4–4.0)."""
PER_RUN_LABELS = frozenset({"workflows.argoproj.io/workflow", "workflows.argoproj.io/completed", "pipeline/runid"})
"""Labels naming the run (and KFP v1's run id), or flipped by the controller when the pod completes."""
PER_RUN_ANNOTATIONS = frozenset(
    {TEMPLATE_ANNOTATION, NODE_ID_ANNOTATION, "workflows.argoproj.io/node-name", OUTPUTS_ANNOTATION}
)
"""Annotations naming the node, holding the template (with its per-run archive location) or the outputs."""


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

    Raises `Uncacheable` when the template is offloaded to a ConfigMap, is not valid JSON (or too large, too deeply
    nested, or of another shape than Argo's schema gives the fields stepcache reads), comes from anything but a
    literal env value, or when the pod carries two templates that differ (each argoexec reads its own copy, so
    one step would run under a template the key did not see): such a step runs uncached rather than being keyed
    from partial information.
    """
    raws: list[str] = []
    for var in _all_env(pod):
        name = var.get("name")
        if name == OFFLOADED_ENV:
            raise errors.Uncacheable("the Argo template is offloaded to a ConfigMap")
        if name != TEMPLATE_ENV:
            continue
        value = var.get("value")
        if value == OFFLOADED_VALUE:
            raise errors.Uncacheable("the Argo template is offloaded to a ConfigMap")
        if var.get("valueFrom") is not None or not isinstance(value, str):
            raise errors.Uncacheable(f"env {TEMPLATE_ENV} is not a literal value")
        raws.append(value)
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if isinstance(annotations.get(TEMPLATE_ANNOTATION), str):
        raws.append(annotations[TEMPLATE_ANNOTATION])
    if not raws:
        return None
    first, *others = [_parse(raw) for raw in dict.fromkeys(raws)]
    if any(other != first for other in others):
        raise errors.Uncacheable("the pod carries Argo templates that differ")
    return first


def _parse(raw: str) -> dict[str, Any]:
    """The template, bounded in size and nesting before it is parsed, and of the shape its readers take."""
    if len(raw) > MAX_TEMPLATE_LENGTH:
        raise errors.Uncacheable(f"the Argo template is larger than {MAX_TEMPLATE_LENGTH} characters")
    try:
        parsed = shapes.loads(raw, max_depth=MAX_TEMPLATE_DEPTH)
    except shapes.TooDeep as exc:
        raise errors.Uncacheable(f"the Argo template is {exc}") from None
    except ValueError as exc:
        raise errors.Uncacheable(f"the Argo template is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise errors.Uncacheable("the Argo template is not a JSON object")
    for field, reason in shapes.problems(parsed, shapes.ARGO_TEMPLATE):
        raise errors.Uncacheable(f"the Argo template's {field} {reason}")
    return parsed


def args_offloaded(pod: Mapping[str, Any]) -> bool:
    """Argo moved a container's args into a ConfigMap named after the pod: what runs is not on the pod."""
    return any(var.get("name") == ARGS_FILE_ENV for var in _all_env(pod))


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
