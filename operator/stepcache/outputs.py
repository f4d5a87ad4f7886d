"""What a Succeeded pod produced, read into the entry that a later hit replays.

A hit can only give back what was recorded: the containers' termination messages, and for Argo steps the output
parameters and `result` that Argo hands to downstream steps. Argo >= 3.4 reports those in a WorkflowTaskResult named
after the pod's node id (the only place Argo >= 3.6 puts them); older Argo wrote them to a pod annotation. Provenance
(source pod, times, duration) says where a result came from and how much compute a hit saves.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Mapping
from typing import Any

from stepcache import argo, cacheentry, errors, model

__all__ = [
    "REPORT_OUTPUTS_COMPLETED",
    "argo_outputs",
    "new_entry",
    "task_result_complete",
    "task_result_name",
    "task_result_of",
    "termination_messages",
    "unstorable",
]

REPORT_OUTPUTS_COMPLETED = "workflows.argoproj.io/report-outputs-completed"
"""Label Argo sets to "true" on a WorkflowTaskResult once `wait` has reported everything."""


def termination_messages(pod: Mapping[str, Any]) -> dict[str, str]:
    """Container name → the message of its terminated state; empty messages are left out."""
    messages: dict[str, str] = {}
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        message = _terminated(status).get("message")
        if isinstance(message, str) and message:
            messages[status["name"]] = message
    return messages


def argo_outputs(pod: Mapping[str, Any], *, task_result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An Argo step's outputs as `{"parameters": {name: value}, "result": str | None}`; None for a non-Argo pod.

    Read from `task_result` (a WorkflowTaskResult) when given, else from the `workflows.argoproj.io/outputs`
    annotation that Argo < 3.4 writes; a pod with neither produced no outputs.
    """
    if not argo.is_argo(pod):
        return None
    if task_result is not None:
        outputs = task_result.get("outputs") or {}
    else:
        raw = _annotations(pod).get(argo.OUTPUTS_ANNOTATION)
        outputs = _decode_outputs(raw) if raw is not None else {}
    parameters: dict[str, str] = {}
    for param in outputs.get("parameters") or []:
        name, value = param.get("name"), param.get("value")
        if isinstance(name, str) and isinstance(value, str):
            parameters[name] = value
    result = outputs.get("result")
    return {"parameters": parameters, "result": result if isinstance(result, str) else None}


def task_result_name(pod: Mapping[str, Any]) -> str | None:
    """The name of the pod's WorkflowTaskResult (its Argo node id), or None for a pod outside Argo."""
    name = _annotations(pod).get(argo.NODE_ID_ANNOTATION)
    return name if isinstance(name, str) and name else None


def task_result_complete(task_result: Mapping[str, Any]) -> bool:
    """True once Argo's `wait` container has finished reporting into this WorkflowTaskResult."""
    labels = (task_result.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(REPORT_OUTPUTS_COMPLETED) == "true")


WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
"""Label Argo puts on a step's pods and WorkflowTaskResults: the workflow's name."""


def task_result_of(task_result: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    """Whether a WorkflowTaskResult was reported for the pod's own workflow.

    Its name is the pod's node id, which the pod's creator chose; so the workflow label must agree too, a result
    owned by a pod (Argo 3.5–3.6) must be owned by this one, and a result owned by a Workflow (Argo ≥ 3.7) by the
    pod's own Workflow. A result reported for another pod or workflow is never taken as this pod's.
    """
    pod_metadata = pod.get("metadata") or {}
    result_metadata = task_result.get("metadata") or {}
    if (pod_metadata.get("labels") or {}).get(WORKFLOW_LABEL) != (result_metadata.get("labels") or {}).get(
        WORKFLOW_LABEL
    ):
        return False
    owning_pods = _owners(result_metadata, kind="Pod")
    if owning_pods and pod_metadata.get("uid") not in owning_pods:
        return False
    pod_workflows = _owners(pod_metadata, kind="Workflow")
    result_workflows = _owners(result_metadata, kind="Workflow")
    return not (pod_workflows and result_workflows) or bool(pod_workflows & result_workflows)


def _owners(metadata: Mapping[str, Any], *, kind: str) -> set[str]:
    return {
        str(owner.get("uid"))
        for owner in metadata.get("ownerReferences") or []
        if isinstance(owner, Mapping) and owner.get("kind") == kind and owner.get("uid")
    }


def new_entry(
    pod: Mapping[str, Any],
    *,
    cache_key: str,
    key_material: dict[str, Any],
    task_result: Mapping[str, Any] | None,
) -> model.NewEntry:
    """The entry to store for a Succeeded pod.

    The entry's namespace is the key's scope (the material's `scope`: the pod's namespace, or `*` when keys are
    cluster-wide), so entries are shared exactly as far as keys are. Raises `errors.Uncacheable` when the pod carries
    no finish time: a guessed "now" would make a late-recorded result look fresher than it is.
    """
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    source_namespace = str(metadata.get("namespace") or "")
    scope = key_material.get("scope")

    finishes = [_time(t, field="finishedAt") for t in _state_times(status, "finishedAt", init=False)]
    if not finishes:
        raise errors.Uncacheable("the pod has no container with a finish time")
    finished_at = max(finishes)
    if status.get("startTime") is not None:
        started_at: datetime.datetime | None = _time(status["startTime"], field="status.startTime")
    else:
        starts = [_time(t, field="startedAt") for t in _state_times(status, "startedAt", init=True)]
        started_at = min(starts, default=None)
    duration = None if started_at is None else max(0.0, (finished_at - started_at).total_seconds())

    entry = model.NewEntry(
        namespace=scope if isinstance(scope, str) and scope else source_namespace,
        cache_key=cache_key,
        termination_messages=termination_messages(pod),
        argo_outputs=argo_outputs(pod, task_result=task_result),
        key_material=key_material,
        source_namespace=source_namespace,
        source_pod=str(metadata.get("name") or ""),
        source_uid=str(metadata.get("uid") or ""),
        started_at=started_at,
        finished_at=finished_at,
        duration_seconds=duration,
        step=cacheentry.step_of(pod),
        images=cacheentry.images_of(pod),
    )
    flaw = unstorable(entry)
    if flaw is not None:
        raise errors.Uncacheable(flaw)
    return entry


def unstorable(entry: model.NewEntry) -> str | None:
    """Why the database cannot store the entry, naming where; None when it can.

    Postgres refuses a NUL character (`\\u0000`) in JSONB and in text, and text that is not Unicode (a lone UTF-16
    surrogate) cannot even be sent. Refusing it here makes that a permanent outcome with a reason, where the
    database's error would look like an outage and be retried for ever. Storing an escaped form instead would not
    help: a replay hands each value to its script in an environment variable, which cannot hold a NUL, so it could
    not give back the bytes the step produced.
    """
    places: list[tuple[str, Any]] = [
        *((f"the termination message of container {name!r}", m) for name, m in entry.termination_messages.items()),
    ]
    if entry.argo_outputs is not None:
        parameters = entry.argo_outputs.get("parameters") or {}
        places += [(f"output parameter {name!r}", value) for name, value in parameters.items()]
        places.append(("the Argo result", entry.argo_outputs.get("result")))
    places += [
        ("the key material", entry.key_material),
        ("the step name", entry.step),
        ("the image list", list(entry.images)),
        ("the source pod", [entry.namespace, entry.source_namespace, entry.source_pod, entry.source_uid]),
    ]
    for where, value in places:
        for path, flaw in _text_flaws(value):
            at = f"{where} at {path}" if path else where
            return f"unstorable-output: {at} {flaw}, which the database cannot store"
    return None


def _text_flaws(value: Any) -> Iterator[tuple[str, str]]:
    """(path, flaw) of every string in a JSON value (object keys too) that the database refuses; never recurses."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            flaw = _flaw(item)
            if flaw is not None:
                yield path, flaw
        elif isinstance(item, Mapping):
            for name, child in item.items():
                flaw = _flaw(str(name))
                if flaw is not None:
                    yield f"{path}.{name!r}" if path else repr(name), flaw
                stack.append((f"{path}.{name}" if path else str(name), child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(item))


def _flaw(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate (text that is not Unicode)"
    return None


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def _terminated(status: Mapping[str, Any]) -> Mapping[str, Any]:
    return (status.get("state") or {}).get("terminated") or {}


def _decode_outputs(raw: Any) -> Mapping[str, Any]:
    try:
        outputs = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise errors.Uncacheable(f"annotation {argo.OUTPUTS_ANNOTATION} is not valid JSON") from exc
    if not isinstance(outputs, dict):
        raise errors.Uncacheable(f"annotation {argo.OUTPUTS_ANNOTATION} is not a JSON object")
    return outputs


def _state_times(status: Mapping[str, Any], field: str, *, init: bool) -> Iterator[Any]:
    """The `field` times of the containers' current states (init containers' too when `init`)."""
    statuses = list(status.get("containerStatuses") or [])
    if init:
        statuses += status.get("initContainerStatuses") or []
    for container in statuses:
        for state in (container.get("state") or {}).values():
            if isinstance(state, Mapping) and state.get(field) is not None:
                yield state[field]


def _time(value: Any, *, field: str) -> datetime.datetime:
    """An RFC 3339 time as the API server writes it (`2024-05-01T12:00:00Z`), always timezone-aware."""
    if not isinstance(value, str):
        raise errors.Uncacheable(f"{field} is not a time: {value!r}")
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise errors.Uncacheable(f"{field} is not an RFC 3339 time: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)
