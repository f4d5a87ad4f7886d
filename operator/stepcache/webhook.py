"""kopf's HTTPS webhook server, with a body limit the API server's objects fit in and an answer for every body.

kopf 1.45.2's `WebhookServer` reads bodies through aiohttp's default limit (1 MiB: a bigger pod got 413 and was
admitted by failurePolicy alone, unkeyed and with user-written stepcache names left on it), and answers 500 for any
body its own code cannot take (not an object, no `request`, `metadata` not an object, nesting past Python's
recursion limit). Here one method, `_serve` (what kopf's server calls per request), reads and checks the body
first; what passes goes to kopf's admission handler path exactly as before:

- A body is read up to `MAX_REVIEW_BYTES`, then parsed with its nesting bounded: past either bound, or not JSON,
  the answer is 413 or 400 with the reason.
- An envelope that is not an AdmissionReview as kube-apiserver writes it (`envelope_problem`) is answered 400.
- A well-formed review stepcache has nothing to do with (not a pod CREATE) is allowed unchanged, with a warning.
  A pod of a shape no API server sends (`shapes.POD`) is answered here as admission answers it (uncached, with its
  author's stepcache names removed): kopf reads parts of it before any handler runs and fails on some.
- Whatever kopf then does, the answer allows the pod: an exception, or a denial (stepcache's handler never raises,
  so only kopf's own code could deny), becomes `allowed: true` with the user-written stepcache names removed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import kopf

from stepcache import logs, metrics, mutation, patches, shapes

__all__ = ["MAX_REVIEW_BYTES", "MAX_REVIEW_DEPTH", "WebhookServer", "envelope_problem"]

log = logs.get(__name__)

MAX_REVIEW_BYTES = 4 * 1024 * 1024
"""kube-apiserver takes requests up to 3 MiB and stores objects up to etcd's 1.5 MiB; the review that carries a pod
adds its envelope and JSON escapes. Bigger bodies are refused with 413 before they are read."""
MAX_REVIEW_DEPTH = 100
"""Arrays and objects inside each other; a Pod's schema nests about 15 deep inside its review."""
_CHUNK = 64 * 1024
_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
_OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
_PODS = {"group": "", "version": "v1", "resource": "pods"}
_PREFIX = "stepcache: "


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class WebhookServer(kopf.WebhookServer):
    """kopf's server (TLS, certificate reloads, routing by handler id) with stepcache's reading of each request."""

    @staticmethod
    async def _serve(fn: kopf.WebhookFn, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            review = _parse(await _read(request))
            problem = envelope_problem(review)
            if problem is not None:
                raise _Refused(400, f"not an AdmissionReview: {problem}")
        except _Refused as exc:
            metrics.ADMISSION_FAILURES.labels(reason=f"http-{exc.status}").inc()
            log.warning("review_refused", status=exc.status, reason=exc.reason)
            return aiohttp.web.Response(status=exc.status, text=exc.reason)
        try:
            answer = await _answer(fn, request, review)
        except Exception as exc:
            answer = _failed_open(review, error=exc)
        return aiohttp.web.json_response(answer)


async def _answer(fn: kopf.WebhookFn, request: aiohttp.web.Request, review: Any) -> dict[str, Any]:
    """The answer to a review `envelope_problem` accepted: stepcache's own for what kopf need not (or cannot) see,
    else kopf's."""
    unhandled = _not_for_stepcache(review["request"])
    if unhandled is not None:
        return _allowed(review, warnings=[f"{_PREFIX}{unhandled}; admitted unchanged"])
    pod = review["request"]["object"]
    malformed = _malformed(pod)
    if malformed is not None:
        # What admission answers for any pod of the wrong shape: uncached, user-written stepcache names removed.
        metrics.ADMISSION_FAILURES.labels(reason="malformed-pod").inc()
        metrics.ADMISSIONS.labels(outcome="uncacheable").inc()
        warning = f"{_PREFIX}{malformed}; the pod runs uncached"
        return _allowed(review, warnings=[warning], ops=patches.json_patch(pod, mutation.skip_patch(pod)))
    sslpeer = request.transport.get_extra_info("peercert") if request.transport else None
    response: dict[str, Any] = dict(
        await fn(review, webhook=request.match_info.get("id"), sslpeer=sslpeer, headers=dict(request.headers))
    )
    if response.get("response", {}).get("allowed") is not True:
        # stepcache's handler never raises, so only kopf's own code can have denied the pod.
        raise RuntimeError(f"denied by kopf: {response.get('response', {}).get('status')}")
    return response


async def _read(request: aiohttp.web.Request) -> bytes:
    """The body, up to `MAX_REVIEW_BYTES` (decompressed, when it came compressed)."""
    if request.content_length is not None and request.content_length > MAX_REVIEW_BYTES:
        raise _Refused(413, f"the body is larger than {MAX_REVIEW_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > MAX_REVIEW_BYTES:
            raise _Refused(413, f"the body is larger than {MAX_REVIEW_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(400, f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        review = shapes.loads(text, max_depth=MAX_REVIEW_DEPTH)
    except ValueError as exc:
        raise _Refused(400, f"the body is not JSON: {_one_line(exc)}") from None
    if "\\u" in text and _has_lone_surrogate(review):
        # I-JSON (RFC 7493) forbids them: they are not Unicode text, and no API server writes one.
        raise _Refused(400, "the body is not JSON: a \\u escape stands for half a UTF-16 surrogate pair")
    return review


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def envelope_problem(review: Any) -> str | None:
    """Why a parsed body is not an AdmissionReview as kube-apiserver writes it, or None when it is one.

    Only the envelope: the object under review may hold anything (the handler copes with any pod).
    """
    if not isinstance(review, Mapping):
        return "the body is not a JSON object"
    if review.get("apiVersion") not in _API_VERSIONS:
        return f"apiVersion must be one of {', '.join(_API_VERSIONS)}"
    if review.get("kind") != "AdmissionReview":
        return "kind must be AdmissionReview"
    request = review.get("request")
    if not isinstance(request, Mapping):
        return "request must be an object"
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return "request.uid must be a non-empty string"
    for field, names in (("kind", ("group", "version", "kind")), ("resource", ("group", "version", "resource"))):
        value = request.get(field)
        if not isinstance(value, Mapping) or not all(isinstance(value.get(name), str) for name in names):
            return f"request.{field} must be an object with string fields {', '.join(names)}"
    if request.get("operation") not in _OPERATIONS:
        return f"request.operation must be one of {', '.join(_OPERATIONS)}"
    if not isinstance(request.get("userInfo"), Mapping):
        return "request.userInfo must be an object"
    for field in ("object", "oldObject"):
        if request.get(field) is not None and not isinstance(request.get(field), Mapping):
            return f"request.{field} must be an object or null"
    if request.get("object") is None and request.get("oldObject") is None:
        return "request.object or request.oldObject must be an object"
    for field in ("namespace", "name", "subResource"):
        if request.get(field) is not None and not isinstance(request.get(field), str):
            return f"request.{field} must be a string"
    if request.get("dryRun") is not None and not isinstance(request.get("dryRun"), bool):
        return "request.dryRun must be a boolean"
    return None


def _not_for_stepcache(request: Mapping[str, Any]) -> str | None:
    """Why a well-formed review is none of stepcache's business (not a pod CREATE), or None when it is."""
    resource = request["resource"]
    if any(resource.get(name) != value for name, value in _PODS.items()) or request.get("subResource"):
        return "only pods are handled, not " + "/".join(
            part for part in (resource.get("group"), resource.get("resource"), request.get("subResource")) if part
        )
    if request.get("operation") != "CREATE" or not isinstance(request.get("object"), Mapping):
        return f"only pod CREATE is handled, not {request.get('operation')}"
    return None


def _malformed(pod: Mapping[str, Any]) -> str | None:
    """The first field of the pod whose JSON type is not the Pod schema's (`shapes.POD`), with why; None if none.

    kopf reads parts of the object (metadata, uid, name) before any handler runs, and fails on some shapes no API
    server sends (`metadata: null`, a uid that is a list); admission would answer any misfit the same way.
    """
    if "metadata" in pod and pod["metadata"] is None:  # absent to the Pod schema, but kopf reads it as an object
        return "metadata must be an object"
    for field, reason in shapes.problems(pod, shapes.POD):
        return f"{field} {reason}"
    return None


def _allowed(
    review: Mapping[str, Any], *, warnings: list[str], ops: list[patches.Operation] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": True}
    if warnings:
        response["warnings"] = warnings
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode("utf-8")).decode("ascii")
    return {"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": response}


def _failed_open(review: Mapping[str, Any], *, error: Exception) -> dict[str, Any]:
    """Allow the pod as a bug in stepcache would: without the stepcache names its author wrote, with a warning."""
    metrics.ADMISSION_FAILURES.labels(reason="webhook-error").inc()
    metrics.ADMISSIONS.labels(outcome="error").inc()
    log.error("webhook_failed_open", uid=review["request"]["uid"], error=repr(error))
    warnings = [f"{_PREFIX}internal error ({type(error).__name__}); the pod runs uncached"]
    pod = review["request"].get("object")
    try:
        ops = patches.json_patch(pod, mutation.skip_patch(pod)) if isinstance(pod, Mapping) else []
    except Exception as exc:
        log.exception("skip_patch_failed", uid=review["request"]["uid"], error=repr(exc))
        ops = []
        warnings.append(f"{_PREFIX}its stepcache labels and annotations could not be checked ({type(exc).__name__})")
    return _allowed(review, warnings=warnings, ops=ops)
