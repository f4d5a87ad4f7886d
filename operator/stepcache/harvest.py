"""Reading a recorded Argo step's output artifacts from its artifact repository into stepcache's blob store.

When the recorder stores a Succeeded Argo pod whose template declares output artifacts, each artifact's bytes are
read from where `wait` uploaded them (the S3 object its WorkflowTaskResult names, in the pod's template's archive
location), with the credentials the template names — Secrets of the pod's own namespace — and stored by sha256.
The entry then records name, path, archive form, sha256 and size of each, so a hit no longer depends on the first
workflow's objects or its artifact GC.

A step whose artifacts cannot be kept (over `STEPCACHE_ARTIFACT_MAX_BYTES` in all, zip archives, a repository
other than S3, credentials other than a Secret, an object or Secret gone or forbidden) is still recorded, flagged
`unreplayable` with the reason: a lookup finds it and never serves it (`artifacts.stored` refuses), and the reason
is counted in `stepcache_artifacts_unreplayable` and logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from kubernetes_asyncio.client.exceptions import ApiException

from stepcache import argo, artifacts, blobs, errors, logs, metrics, model

__all__ = ["Harvest", "Harvester", "SecretSource", "Unavailable"]

log = logs.get(__name__)

_UNPACKED_RATIO = 16
"""A tarball may unpack to at most this many times the size cap (a gzip bomb is refused, not unpacked)."""


class Unavailable(errors.StepcacheError):
    """The repository or a Secret could not be read just now: the recorder tries again later."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SecretSource(Protocol):
    async def secret_value(self, *, namespace: str, name: str, key: str) -> bytes | None: ...


class Reader(Protocol):
    async def read(
        self, location: artifacts.S3Location, *, credentials: blobs.S3Credentials, max_bytes: int
    ) -> bytes: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Harvest:
    """What one step's output artifacts came to: stored (with where each was), or a reason they cannot be."""

    stored: tuple[tuple[artifacts.Stored, str], ...] = ()
    """Each stored artifact with the identity of the object it was read from."""
    unreplayable: str | None = None

    def apply(self, entry: model.NewEntry) -> model.NewEntry:
        """The entry with its artifacts (or its unreplayable reason) in `argo_outputs`."""
        outputs: dict[str, Any] = dict(entry.argo_outputs or {})
        if self.unreplayable is not None:
            outputs["unreplayable"] = self.unreplayable
        else:
            outputs["artifacts"] = [art.as_json() for art, _ in self.stored]
        return dataclasses.replace(entry, argo_outputs=outputs)

    def located(self, *, entry_id: int) -> list[blobs.Located]:
        return [
            blobs.Located(location=location, sha256=art.sha256, entry_id=entry_id, artifact=art.name)
            for art, location in self.stored
        ]


class Harvester:
    """Reads artifacts one pod at a time per slot: each holds at most `max_bytes` in memory while it is stored."""

    def __init__(
        self,
        *,
        blob_store: blobs.BlobStore,
        reader: Reader,
        secrets: SecretSource,
        max_bytes: int,
        concurrency: int = 2,
    ) -> None:
        self._blobs = blob_store
        self._reader = reader
        self._secrets = secrets
        self._max_bytes = max_bytes
        self._slots = asyncio.Semaphore(concurrency)

    async def collect(
        self, pod: Mapping[str, Any], *, task_result: Mapping[str, Any] | None, last_attempt: bool = False
    ) -> Harvest | None:
        """None for a pod without output artifacts; else what became of them.

        Raises Unavailable when it is worth trying again (repository or Secret unreadable just now) unless this is
        the `last_attempt`, StoreUnavailable when the blob store is down; a reason that will not change is returned
        as `unreplayable`."""
        tmpl = argo.template(pod)
        if tmpl is None or not artifacts.declared_outputs(tmpl):
            return None
        metadata = pod.get("metadata") or {}
        ref = f"{metadata.get('namespace')}/{metadata.get('name')}"
        try:
            if task_result is None:
                raise artifacts.NotReplayable("no-task-result", "Argo reported no WorkflowTaskResult for the pod")
            try:
                harvest = await self._collect(tmpl, task_result=task_result, namespace=str(metadata.get("namespace")))
            except Unavailable as exc:
                if not last_attempt:
                    raise
                raise artifacts.NotReplayable(exc.reason, str(exc)) from exc
        except artifacts.NotReplayable as exc:
            metrics.ARTIFACTS_UNREPLAYABLE.labels(reason=exc.reason).inc()
            log.warning("artifacts_not_replayable", pod=ref, reason=exc.reason, detail=exc.detail)
            return Harvest(unreplayable=exc.reason)
        log.info("artifacts_stored", pod=ref, artifacts={art.name: art.sha256 for art, _ in harvest.stored})
        return harvest

    async def _collect(self, tmpl: Mapping[str, Any], *, task_result: Mapping[str, Any], namespace: str) -> Harvest:
        plan = artifacts.record_plan(tmpl, task_result=task_result)
        budget = self._max_bytes
        stored: list[tuple[artifacts.Stored, str]] = []
        async with self._slots:
            for declared, location in plan:
                credentials = await self._credentials(location, namespace=namespace)
                try:
                    data = await self._reader.read(location, credentials=credentials, max_bytes=budget)
                except blobs.RepositoryUnavailable as exc:
                    raise Unavailable("repository-unavailable", str(exc)) from exc
                if declared.archive == artifacts.ARCHIVE_TAR:
                    await asyncio.to_thread(
                        artifacts.check_tarball,
                        data,
                        path=declared.path,
                        max_unpacked=self._max_bytes * _UNPACKED_RATIO,
                    )
                budget -= len(data)
                sha256 = await self._blobs.put(data)
                metrics.ARTIFACTS_STORED.inc()
                stored.append(
                    (
                        artifacts.Stored(
                            name=declared.name,
                            path=declared.path,
                            archive=declared.archive,
                            sha256=sha256,
                            size=len(data),
                        ),
                        location.identity,
                    )
                )
        return Harvest(stored=tuple(stored))

    async def _credentials(self, location: artifacts.S3Location, *, namespace: str) -> blobs.S3Credentials:
        values: dict[str, str] = {}
        for field, ref in (
            ("access_key", location.access_key),
            ("secret_key", location.secret_key),
            ("session_token", location.session_token),
        ):
            if ref is None:
                continue
            try:
                value = await self._secrets.secret_value(namespace=namespace, name=ref.name, key=ref.key)
            except ApiException as exc:
                if exc.status == 403:
                    raise artifacts.NotReplayable(
                        "secret-forbidden", f"the operator may not read Secret {namespace}/{ref.name}"
                    ) from None
                raise Unavailable("secret-unreadable", f"Secret {namespace}/{ref.name}: {exc.status}") from exc
            except OSError as exc:
                raise Unavailable("secret-unreadable", f"Secret {namespace}/{ref.name}: {exc}") from exc
            if value is None:
                raise artifacts.NotReplayable("secret-missing", f"Secret {namespace}/{ref.name} has no {ref.key!r}")
            values[field] = value.decode("utf-8", errors="replace").strip()
        return blobs.S3Credentials(
            access_key=values.get("access_key", ""),
            secret_key=values.get("secret_key", ""),
            session_token=values.get("session_token"),
        )
