"""The admission decision for one pod CREATE: skip, miss or hit, always failing open.

`decide` returns a merge patch and warnings; the kopf handler in `main` copies them into kopf's `patch` and
`warnings`. Nothing here may raise out: kopf turns an exception into `allowed: false`, which would deny the pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from stepcache import (
    argo,
    artifacts,
    blobs,
    errors,
    keys,
    logs,
    metrics,
    model,
    mutation,
    runtime,
    shapes,
    signing,
    staleness,
)

__all__ = ["Verdict", "decide"]

log = logs.get(__name__)

_PREFIX = "stepcache: "
_INLINE_TOTAL = 64 * 1024
"""Bytes of artifacts one hit pod carries inline at most; the rest are fetched (the pod object stays small)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
    """What to do with the pod: the merge patch to apply and the warnings to return to the client."""

    outcome: str
    patch: dict[str, Any]
    warnings: tuple[str, ...] = ()
    entry_id: int | None = None


async def decide(rt: runtime.Runtime, pod: Mapping[str, Any], *, dryrun: bool) -> Verdict:
    """Decide one admission; never raises.

    A bug admits the pod uncached, with a warning, but still without trusting it: the skip patch removes the
    stepcache names its author wrote, so a forged `hit` label or signature never survives a failure of ours.
    """
    try:
        verdict = await _decide(rt, pod, dryrun=dryrun)
    except Exception as exc:
        metrics.ADMISSION_FAILURES.labels(reason="internal-error").inc()
        log.exception("admission_failed_open", pod=_pod_ref(pod), error=repr(exc))
        warning = f"{_PREFIX}internal error ({type(exc).__name__}); the pod runs uncached"
        verdict = _failed_open(pod, warning=warning)
    metrics.ADMISSIONS.labels(outcome=verdict.outcome).inc()
    return verdict


def _failed_open(pod: Mapping[str, Any], *, warning: str) -> Verdict:
    """The error verdict: the skip patch if it can be built at all, else no patch and a second warning."""
    try:
        return Verdict(outcome="error", patch=mutation.skip_patch(pod), warnings=(warning,))
    except Exception as exc:
        log.exception("skip_patch_failed", pod=_pod_ref(pod), error=repr(exc))
        unchanged = f"{_PREFIX}its stepcache labels and annotations could not be checked ({type(exc).__name__})"
        return Verdict(outcome="error", patch={}, warnings=(warning, unchanged))


async def _decide(rt: runtime.Runtime, pod: Mapping[str, Any], *, dryrun: bool) -> Verdict:
    # The readers below take the Pod schema's types; only a direct POST can break them (the API server decodes a
    # Pod into its typed struct), and then the pod runs uncached with the field named, like any unkeyable pod.
    for field, reason in shapes.problems(pod, shapes.POD):
        metrics.ADMISSION_FAILURES.labels(reason="malformed-pod").inc()
        log.info("malformed_pod", pod=_pod_ref(pod), field=field, reason=reason)
        return Verdict(
            outcome="uncacheable",
            patch=mutation.skip_patch(pod),
            warnings=(f"{_PREFIX}{field} {reason}; the pod runs uncached",),
        )
    metadata = pod.get("metadata") or {}
    namespace = metadata.get("namespace") or ""
    if namespace not in rt.namespaces:
        return Verdict(outcome="skip", patch=mutation.skip_patch(pod))
    if keys.skip_reason(pod) is not None:
        return Verdict(outcome="skip", patch=mutation.skip_patch(pod))
    if _is_signed_hit(rt, pod, namespace=namespace):
        # Re-invocation (or a copy) of a pod stepcache already turned into a replay: leave it as it is.
        return Verdict(outcome="skip", patch={})

    # One budget for every database call of this review: input artifacts' locations, the lookup, the blobs.
    deadline = asyncio.get_running_loop().time() + rt.settings.db_timeout
    scope = namespace if rt.key_options.scope == "namespace" else "*"
    provenance = await _provenance(rt, pod, scope=scope, deadline=deadline)
    try:
        key = keys.compute(
            pod, namespace=namespace, options=rt.key_options, references=rt.references, provenance=provenance
        )
    except errors.Uncacheable as exc:
        metrics.ADMISSION_FAILURES.labels(reason="uncacheable").inc()
        log.info("uncacheable", pod=_pod_ref(pod), reason=exc.reason)
        return Verdict(
            outcome="uncacheable",
            patch=mutation.skip_patch(pod),
            warnings=(f"{_PREFIX}{exc.reason}; the pod runs uncached",),
        )

    warnings: list[str] = []
    tagged = keys.tag_only_images(pod, key.containers)
    if tagged and rt.settings.require_digest:
        return Verdict(
            outcome="uncacheable",
            patch=mutation.skip_patch(pod),
            warnings=tuple(
                f"{_PREFIX}image {image!r} has no digest and STEPCACHE_REQUIRE_DIGEST=true; the pod runs uncached"
                for image in tagged
            ),
        )
    warnings.extend(f"{_PREFIX}{keys.tag_warning(image)}" for image in tagged)

    key_containers = ",".join(key.containers)
    signed = mutation.Signed(
        key=key.value,
        key_containers=key.containers,
        signature=signing.signature(rt.signing_key, namespace=namespace, key=key.value, key_containers=key_containers),
    )

    def miss() -> Verdict:
        # Built only when it is the answer: a hit builds the hit patch instead.
        return Verdict(outcome="miss", patch=mutation.miss_patch(pod, signed=signed), warnings=tuple(warnings))

    try:
        decision = staleness.decide(
            metadata.get("annotations") or {},
            default=rt.settings.default_max_staleness,
            cap=rt.settings.max_staleness,
        )
    except errors.InvalidAnnotation as exc:
        metrics.ADMISSION_FAILURES.labels(reason="invalid-annotation").inc()
        warnings.append(f"{_PREFIX}annotation {exc.name}: {exc.reason}; the pod runs uncached (its result is recorded)")
        return miss()
    if not decision.may_reuse:
        return miss()

    sources: dict[str, artifacts.Source] = {}
    try:
        async with asyncio.timeout_at(deadline):
            # Rows live under the key's scope: the namespace, or "*" when STEPCACHE_SCOPE=cluster.
            entry = await rt.store.lookup(
                namespace=key.material["scope"], cache_key=key.value, max_age=decision.max_age
            )
            if entry is not None and (entry.argo_outputs or {}).get("artifacts"):
                sources = await _artifact_sources(rt, pod, entry=entry, namespace=namespace)
    except errors.Uncacheable as exc:
        metrics.ADMISSION_FAILURES.labels(reason="not-replayable").inc()
        log.info("not_replayable", pod=_pod_ref(pod), key=key.value, reason=exc.reason)
        return miss()
    except (errors.StoreUnavailable, TimeoutError) as exc:
        metrics.ADMISSION_FAILURES.labels(reason="store-unavailable").inc()
        log.warning("lookup_failed_open", pod=_pod_ref(pod), key=key.value, error=str(exc) or type(exc).__name__)
        warnings.append(
            f"{_PREFIX}cache unavailable ({type(exc).__name__}); the pod runs uncached and is recorded later"
        )
        return miss()
    if entry is None:
        return miss()

    try:
        hit = mutation.hit_patch(
            pod, signed=signed, entry=entry, options=rt.replay_options, kfp=keys.is_kfp(pod), sources=sources
        )
    except errors.Uncacheable as exc:
        metrics.ADMISSION_FAILURES.labels(reason="not-replayable").inc()
        log.info("not_replayable", pod=_pod_ref(pod), key=key.value, entry_id=entry.id, reason=exc.reason)
        return miss()
    if not dryrun:
        rt.store.note_hit(entry.id)
        if sources:
            _note_uploads(rt, pod, entry=entry, scope=key.material["scope"])
    return Verdict(outcome="hit", patch=hit, warnings=tuple(warnings), entry_id=entry.id)


async def _provenance(
    rt: runtime.Runtime, pod: Mapping[str, Any], *, scope: str, deadline: float
) -> artifacts.Resolved:
    """What the locations of the pod's Argo input artifacts hold, as far as stepcache knows; unknown on any failure
    (the pod is then keyed by location, and recorded by content once its inputs are known)."""
    if rt.blobs is None:
        return artifacts.UNKNOWN
    try:
        tmpl = argo.template(pod)
    except errors.Uncacheable:
        return artifacts.UNKNOWN
    locations = artifacts.input_locations(tmpl) if tmpl is not None else []
    if not locations:
        return artifacts.UNKNOWN
    try:
        async with asyncio.timeout_at(deadline):
            return artifacts.Resolved(await rt.blobs.resolve(scope=scope, locations=locations))
    except (errors.StoreUnavailable, TimeoutError) as exc:
        log.warning("artifact_locations_unresolved", pod=_pod_ref(pod), error=str(exc) or type(exc).__name__)
        return artifacts.UNKNOWN


async def _artifact_sources(
    rt: runtime.Runtime, pod: Mapping[str, Any], *, entry: model.CachedEntry, namespace: str
) -> dict[str, artifacts.Source]:
    """sha256 → where the replay gets it, for each output artifact the hit writes back: inline when small, else a
    signed URL of the blob endpoint. Raises Uncacheable when a blob is missing or cannot reach the pod."""
    tmpl = argo.template(pod)
    pairs = artifacts.served(tmpl, entry.argo_outputs) if tmpl is not None else []
    if not pairs:
        return {}
    if rt.blobs is None:
        raise errors.Uncacheable("output artifacts are not handled by this operator")
    shas = {stored.sha256 for _, stored in pairs}
    found = await rt.blobs.presence(shas, inline_max=rt.settings.artifact_inline_bytes)
    missing = sorted(shas - set(found))
    if missing:
        metrics.ADMISSION_FAILURES.labels(reason="blob-missing").inc()
        raise errors.Uncacheable(f"the blob store lacks {', '.join(missing)}")
    return _sources(rt, found, namespace=namespace)


def _sources(
    rt: runtime.Runtime, found: Mapping[str, blobs.BlobInfo], *, namespace: str
) -> dict[str, artifacts.Source]:
    sources: dict[str, artifacts.Source] = {}
    inline_left = _INLINE_TOTAL
    expires = int(time.time() + rt.settings.blob_url_ttl)
    for sha256, info in sorted(found.items(), key=lambda item: item[1].size):
        if info.data is not None and info.size <= inline_left:
            sources[sha256] = artifacts.Source(inline=bytes(info.data))
            inline_left -= info.size
        elif rt.settings.blob_endpoint:
            url = artifacts.signed_url(
                rt.settings.blob_endpoint, key=rt.url_key, namespace=namespace, sha256=sha256, expires=expires
            )
            sources[sha256] = artifacts.Source(url=url)
        else:
            raise errors.Uncacheable("an artifact is too large to inline and STEPCACHE_BLOB_ENDPOINT is not set")
    return sources


def _note_uploads(rt: runtime.Runtime, pod: Mapping[str, Any], *, entry: model.CachedEntry, scope: str) -> None:
    """The hit's `wait` will upload the artifacts the replay writes back under this workflow's keys: note what
    those locations will hold, so the steps that consume them are keyed by content and hit too. In memory only."""
    tmpl = argo.template(pod)
    if tmpl is None or rt.blobs is None:
        return
    uploads = artifacts.upload_locations(tmpl)
    located = [
        blobs.Located(location=uploads[declared.name], sha256=stored.sha256, entry_id=entry.id, artifact=declared.name)
        for declared, stored in artifacts.served(tmpl, entry.argo_outputs)
        if declared.name in uploads
    ]
    rt.blobs.note_locations(scope=scope, located=located)


def _is_signed_hit(rt: runtime.Runtime, pod: Mapping[str, Any], *, namespace: str) -> bool:
    """A hit label is believed only on a pod whose key annotations carry a valid signature."""
    metadata = pod.get("metadata") or {}
    if (metadata.get("labels") or {}).get(mutation.HIT) != "true":
        return False
    annotations = metadata.get("annotations") or {}
    return signing.verify(
        rt.signing_key,
        namespace=namespace,
        key=annotations.get(mutation.KEY, ""),
        key_containers=annotations.get(mutation.KEY_CONTAINERS, ""),
        signature=annotations.get(mutation.KEY_SIGNATURE, ""),
    )


def _pod_ref(pod: Mapping[str, Any]) -> str:
    """namespace/name for logs; called on the error path too, so it takes any shape without raising."""
    try:
        metadata = pod.get("metadata") or {}
        return f"{metadata.get('namespace', '')}/{metadata.get('name') or str(metadata.get('generateName', '')) + '*'}"
    except Exception:
        return "?"
