"""The operator process: kopf handlers wired to stepcache's logic, one `Runtime` per process.

Handlers are registered on a registry built by `build_registry`, never on kopf's global one, so tests can run an
operator in-process and the handlers stay free of module state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import kopf
from kubernetes_asyncio.client.exceptions import ApiException

from stepcache import (
    admission,
    artifacts,
    blobs,
    blobserver,
    cacheentry,
    config,
    entries,
    errors,
    heap,
    keys,
    kube,
    logs,
    metrics,
    mirror,
    mutation,
    patches,
    recorder,
    references,
    runtime,
    signing,
    store,
    webhook,
)

__all__ = ["FINALIZER", "WEBHOOK_ID", "answer_with_own_json_patch", "build_registry", "run"]

log = logs.get(__name__)

WEBHOOK_ID = "mutate-pods"
"""kopf's WebhookServer routes POST /<handler id>: the MutatingWebhookConfiguration's path is /mutate-pods."""
FINALIZER = cacheentry.FINALIZER
_POD_SELECTOR = ("v1", "pods")
_NAMESPACE_SELECTOR = ("v1", "namespaces")
_CONFIGMAP_SELECTOR = ("v1", "configmaps")
_SECRET_SELECTOR = ("v1", "secrets")


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf writes nothing on users' pods: no last-handled-configuration annotation.

    And it builds no essence either: kopf 1.45.2 builds one for every event of every watched resource (a deep copy
    of the whole object; 14 % of the operator's CPU while recording pods), although only change handlers compare
    them, and stepcache's only change handler (CacheEntry deletion) is chosen by the deletion timestamp, never by a
    diff. With no stored essence to compare against, every object looks new either way.
    """

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class _NoProgress(kopf.ProgressStorage):
    """kopf writes nothing on users' pods: no per-handler progress annotations (so no kopf retries either)."""

    def fetch(self, *, key: kopf.HandlerId, body: kopf.Body) -> kopf.ProgressRecord | None:
        return None

    def store(self, *, key: kopf.HandlerId, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


class _OwnJsonPatch(kopf.Patch):
    """kopf's per-request Patch, answering with the JSON patch built from its own paths (`patches.json_patch`).

    kopf 1.45.2 makes one Patch per admission request, hands that object to the handler as `patch`, and builds the
    AdmissionReview's JSON patch from `as_json_patch()` on the same object (kopf/_core/engines/admission.py). Its
    own `as_json_patch` diffs the whole pod, and a diff may reach the merged pod by a wrong route (`move` ops that
    corrupt it when applied in order); this one emits exactly the merge patch's paths, at a cost proportional to
    the patch. tests/integration/test_admission_json_patch.py fails if kopf stops answering with it.
    """

    reference: Mapping[str, Any]
    """The object under review, as the API server will apply the ops to it."""

    def as_json_patch(self, body: kopf.Body | kopf.RawBody | None = None) -> list[Any]:
        if self.fns:  # callables can only be diffed; stepcache adds none, so this is kopf's own case
            return super().as_json_patch(body)
        return list(patches.json_patch(self.reference if body is None else body, self))


def answer_with_own_json_patch(patch: kopf.Patch, *, body: Mapping[str, Any]) -> None:
    """Make kopf answer this request with the ops of `patch`'s own paths instead of a diff of the whole pod.

    The instance's class is swapped, nothing of kopf's is changed: other requests and other handlers keep kopf's
    behaviour. The one place stepcache reaches into kopf's admission machinery.
    """
    patch.__class__ = _OwnJsonPatch
    cast(_OwnJsonPatch, patch).reference = body


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: config.Settings) -> None:
    """kopf settings that make it write nothing but the cache-id label and watch only what the recorder needs."""
    kopf_settings.persistence.diffbase_storage = _NoDiffBase()
    kopf_settings.persistence.progress_storage = _NoProgress()
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.posting.enabled = False  # kopf's own per-handler Events would be writes on users' pods
    kopf_settings.peering.standalone = True
    # kopf's worker for an object keeps the object's last event until it has idled this long (5 s by default): with
    # thousands of pods delivered during a database outage, that was thousands of decoded pods held for nothing.
    kopf_settings.queueing.idle_timeout = 0.5
    # The documented `['v1/pods']` key form silently matches nothing; this form works.
    kopf_settings.watching.label_selectors[_POD_SELECTOR] = f"{mutation.CACHE_ID}="
    kopf_settings.watching.field_selectors[_POD_SELECTOR] = "status.phase=Succeeded"
    kopf_settings.watching.label_selectors[_NAMESPACE_SELECTOR] = f"{keys.ENABLED_LABEL}=true"
    kopf_settings.admission.managed = None  # we ship our own MutatingWebhookConfiguration (manifests/)
    # kopf's server with a body limit big enough for any pod the API server stores, and an answer for every body.
    kopf_settings.admission.server = webhook.WebhookServer(
        addr=settings.webhook_host,
        port=settings.webhook_port,
        certfile=str(settings.webhook_cert_file),
        pkeyfile=str(settings.webhook_key_file),
    )


async def build_runtime(
    settings: config.Settings, *, kube_api: kube.Kube, signing_key: bytes | None
) -> runtime.Runtime:
    """Connect and migrate the store (waiting for the database if it is not up yet) and load the signing key.

    Without a key file, the key is the shared Secret in the operator's namespace (created by the first replica).
    """
    if signing_key is None:
        signing_key = await kube_api.signing_key(namespace=settings.namespace)
        _check_signing_key(signing_key, source=f"Secret {settings.namespace}/{kube.SIGNING_SECRET}")
    delay = 0.5
    while True:
        try:
            cache = await store.Store.connect(
                settings.database_url, timeout=settings.db_timeout, pool_size=settings.db_pool_size
            )
            try:
                applied = await cache.migrate()
            except BaseException:
                await cache.close()
                raise
            break
        except errors.StoreUnavailable as exc:
            # The webhook is not served until this succeeds; its failurePolicy Ignore admits pods meanwhile.
            log.warning("database_unavailable_at_start", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    log.info("database_ready", migrations_applied=applied)
    try:
        blob_store = await blobs.BlobStore.connect(
            settings.database_url, timeout=settings.db_timeout, pool_size=settings.blob_pool_size
        )
    except BaseException:
        await cache.close()
        raise
    cacheentries = mirror.Mirror(settings, store=cache, entries=entries.Entries(kube_api.api_client))
    # Primed here so the webhook, which kopf serves only after startup, never sees an empty set at first;
    # the namespace watch keeps it current from then on.
    namespaces = runtime.OptedInNamespaces()
    view = references.ReferenceView()
    secret_key = signing.secret_content_key(signing_key)
    for name in await kube_api.opted_in_namespaces():
        namespaces.add(name)
        await load_references(kube_api, view, namespace=name, settings=settings, secret_key=secret_key)
    return runtime.Runtime(
        settings=settings,
        store=cache,
        kube=kube_api,
        signing_key=signing_key,
        namespaces=namespaces,
        key_options=keys.KeyOptions(
            scope=settings.scope,
            salt=settings.salt,
            key_service_account=settings.key_service_account,
            key_secret_content=settings.key_secret_content,
        ),
        replay_options=mutation.ReplayOptions(
            cache_image=settings.cache_image, keep_node_constraints=settings.keep_node_constraints
        ),
        blobs=blob_store,
        url_key=artifacts.url_key(signing_key),
        references=view,
        mirror=cacheentries,
    )


async def load_references(
    kube_api: kube.Kube,
    view: references.ReferenceView,
    *,
    namespace: str,
    settings: config.Settings,
    secret_key: bytes,
) -> None:
    """Fill the key's view of one opted-in namespace with a LIST, so no pod waits for the watch to catch up.

    Until this is done, a pod reading a ConfigMap of the namespace is uncacheable (never a stale hit).
    """
    for name, data, binary_data in await kube_api.configmaps(namespace=namespace):
        view.put_configmap(namespace, name, data=data, binary_data=binary_data)
    if settings.key_secret_content:
        for name, secret_data in await kube_api.secrets(namespace=namespace):
            view.put_secret(namespace, name, data=secret_data, hmac_key=secret_key)


def read_signing_key_file(settings: config.Settings) -> bytes | None:
    """The signing key from STEPCACHE_SIGNING_KEY_FILE, checked before kopf starts; None when the setting is unset."""
    if settings.signing_key_file is None:
        return None
    try:
        key = settings.signing_key_file.read_bytes()
    except OSError as exc:
        raise errors.InvalidSetting("STEPCACHE_SIGNING_KEY_FILE", f"cannot be read: {exc.strerror}") from None
    _check_signing_key(key, source=str(settings.signing_key_file))
    return key


def _check_signing_key(key: bytes, *, source: str) -> None:
    if len(key) < 32:
        raise errors.InvalidSetting(
            "STEPCACHE_SIGNING_KEY_FILE", f"the signing key in {source} has {len(key)} bytes; at least 32 are needed"
        )


def build_registry(settings: config.Settings, *, signing_key: bytes | None = None) -> kopf.OperatorRegistry:
    """All of stepcache's handlers on a fresh registry."""
    registry = kopf.OperatorRegistry()
    # kopf passes its own settings to handlers as the keyword `settings`; ours go by another name.
    stepcache_settings = settings

    # A fresh registry has none of kopf's default login handlers; log in as kubectl would (in-cluster or kubeconfig).
    kopf.on.login(registry=registry)(kopf.login_via_async_client)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_kopf(settings, stepcache_settings)
        kube_api = await kube.connect()
        rt = await build_runtime(stepcache_settings, kube_api=kube_api, signing_key=signing_key)
        rec = recorder.Recorder(rt)
        memo["runtime"] = rt
        memo["recorder"] = rec
        view: mirror.Mirror = rt.mirror  # type: ignore[assignment]  # build_runtime always sets it
        view.yield_to(rec.quiet)
        memo["tasks"] = [
            asyncio.create_task(rec.run(), name="stepcache-record-retries"),
            asyncio.create_task(view.expire_forever(), name="stepcache-expiry"),
            asyncio.create_task(view.reconcile_forever(), name="stepcache-cacheentry-reconcile"),
            asyncio.create_task(view.statuses_forever(), name="stepcache-cacheentry-status"),
            asyncio.create_task(view.hit_events_forever(), name="stepcache-hit-events"),
            asyncio.create_task(view.recorded_forever(), name="stepcache-cacheentry-recorded"),
            asyncio.create_task(_resync_forever(rt, rec), name="stepcache-resync"),
            asyncio.create_task(_collect_blobs_forever(rt), name="stepcache-blob-collector"),
            asyncio.create_task(_trim_heap_forever(), name="stepcache-heap-trim"),
        ]
        if stepcache_settings.blob_port and rt.blobs is not None:
            server = blobserver.BlobServer(
                blob_store=rt.blobs,
                url_key=rt.url_key,
                host=stepcache_settings.webhook_host,
                port=stepcache_settings.blob_port,
            )
            await server.start()
            memo["blob_server"] = server
        metrics.start_server(stepcache_settings.metrics_port)
        log.info("operator_started", webhook_port=stepcache_settings.webhook_port, scope=stepcache_settings.scope)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        for task in memo.get("tasks", []):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server: blobserver.BlobServer | None = memo.get("blob_server")
        if server is not None:
            await server.stop()
        rt: runtime.Runtime | None = memo.get("runtime")
        if rt is not None:
            if rt.blobs is not None:
                await rt.blobs.close()
            await rt.store.close()
            await rt.kube.close()

    @kopf.on.mutate(
        *_POD_SELECTOR,
        id=WEBHOOK_ID,
        operations=["CREATE"],
        persistent=True,
        side_effects=False,
        ignore_failures=True,
        registry=registry,
    )
    async def mutate_pod(
        body: kopf.Body, patch: kopf.Patch, warnings: list[str], dryrun: bool, memo: kopf.Memo, **_: Any
    ) -> None:
        answer_with_own_json_patch(patch, body=body)
        rt: runtime.Runtime = memo["runtime"]
        verdict = await admission.decide(rt, body, dryrun=dryrun)
        patch.update(verdict.patch)
        warnings.extend(verdict.warnings)

    # An event handler, not a change handler: the watch's server-side selectors deliver only Succeeded pods with an
    # empty cache-id already, and a change handler would make kopf build a diff base of every delivered pod (10 %
    # of the recorder's CPU in a profile) only to compare it with a diff base that is never stored.
    @kopf.on.event(*_POD_SELECTOR, labels={mutation.CACHE_ID: ""}, id="record-succeeded", registry=registry)
    async def record_succeeded(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        rec: recorder.Recorder = memo["recorder"]
        await rec.handle(body)

    # The finalizer (settings.persistence.finalizer, stepcache's own name) holds a CacheEntry until this returns;
    # it returns once the row is gone, waiting out database outages itself: kopf's own retries would need progress
    # storage, which writes nothing here.
    @kopf.on.delete(cacheentry.GROUP, cacheentry.VERSION, cacheentry.PLURAL, id="invalidate-entry", registry=registry)
    async def invalidate_entry(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        view: mirror.Mirror = memo["runtime"].mirror
        await view.invalidate(body)

    @kopf.on.event(*_NAMESPACE_SELECTOR, id="opted-in-namespaces", registry=registry)
    async def namespace_event(
        type: str | None, name: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any
    ) -> None:
        rt: runtime.Runtime = memo["runtime"]
        if type != "DELETED" and labels.get(keys.ENABLED_LABEL) == "true":
            if name not in rt.namespaces:
                # Newly opted in: learn what its ConfigMaps hold before its pods are keyed.
                try:
                    await load_references(
                        rt.kube,
                        rt.references,
                        namespace=name,
                        settings=stepcache_settings,
                        secret_key=signing.secret_content_key(rt.signing_key),
                    )
                except ApiException as exc:
                    log.warning("references_not_loaded", namespace=name, error=str(exc))
            rt.namespaces.add(name)
        else:
            rt.namespaces.discard(name)
            rt.references.forget_namespace(name)

    _follow_references(
        registry,
        _CONFIGMAP_SELECTOR,
        id="referenced-configmaps",
        put=_put_configmap,
        forget=references.ReferenceView.forget_configmap,
    )
    if settings.key_secret_content:
        _follow_references(
            registry,
            _SECRET_SELECTOR,
            id="referenced-secrets",
            put=_put_secret,
            forget=references.ReferenceView.forget_secret,
        )

    return registry


def _follow_references(
    registry: kopf.OperatorRegistry,
    selector: tuple[str, str],
    *,
    id: str,
    put: Callable[[runtime.Runtime, str, str, kopf.Body], None],
    forget: Callable[[references.ReferenceView, str, str], None],
) -> None:
    """Register the event handler that keeps the key's view of one kind (ConfigMaps, Secrets) in step with the
    cluster, in opted-in namespaces only: what the kind's `put` reads off an object, and its `forget` on deletion."""

    @kopf.on.event(*selector, id=id, registry=registry)
    async def reference_event(
        type: str | None, namespace: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
    ) -> None:
        rt: runtime.Runtime = memo["runtime"]
        if namespace is None or namespace not in rt.namespaces:
            return
        if type == "DELETED":
            forget(rt.references, namespace, name)
        else:
            put(rt, namespace, name, body)


def _put_configmap(rt: runtime.Runtime, namespace: str, name: str, body: kopf.Body) -> None:
    rt.references.put_configmap(
        namespace, name, data=dict(body.get("data") or {}), binary_data=dict(body.get("binaryData") or {})
    )


def _put_secret(rt: runtime.Runtime, namespace: str, name: str, body: kopf.Body) -> None:
    rt.references.put_secret(
        namespace, name, data=dict(body.get("data") or {}), hmac_key=signing.secret_content_key(rt.signing_key)
    )


_BLOB_GRACE = datetime.timedelta(hours=1)
"""A blob no entry refers to is kept this long: a recording stores its blobs before its row."""
_LOCATIONS_KEPT = datetime.timedelta(days=30)
"""Artifact locations are forgotten after the staleness cap, or this long without one."""


async def _collect_blobs_forever(rt: runtime.Runtime) -> None:
    """Delete blobs no entry refers to (expired, replaced or deleted entries' artifacts), and old locations."""
    if rt.blobs is None:
        return
    while True:
        await asyncio.sleep(rt.settings.expiry_interval)
        try:
            collected = await rt.blobs.collect(older_than=_BLOB_GRACE)
            forgotten = await rt.blobs.forget_locations(older_than=rt.settings.max_staleness or _LOCATIONS_KEPT)
        except errors.StoreUnavailable as exc:
            log.warning("blob_collection_failed", error=str(exc))
        else:
            if collected or forgotten:
                metrics.BLOBS_COLLECTED.inc(collected)
                log.info("blobs_collected", blobs=collected, locations=forgotten)


async def _resync_forever(rt: runtime.Runtime, rec: recorder.Recorder) -> None:
    """Look for Succeeded pods still unrecorded every STEPCACHE_RESYNC_INTERVAL_SECONDS, whatever dropped them."""
    while True:
        await asyncio.sleep(rt.settings.resync_interval)
        try:
            found = await rec.resync()
        except Exception as exc:
            log.warning("resync_failed", error=repr(exc))
        else:
            if found:
                log.info("resync_found_unrecorded", pods=found)


_TRIM_INTERVAL = 10.0
"""Seconds between two returns of freed memory to the system (each costs about 0.1 ms)."""


async def _trim_heap_forever() -> None:
    """Give memory freed after a burst (watch lines, answers, decoded pods) back to the system, so RSS follows what
    the operator holds rather than its highest point."""
    if not heap.trim():
        return  # not glibc: nothing to trim with
    while True:
        await asyncio.sleep(_TRIM_INTERVAL)
        heap.trim()


def run(settings: config.Settings) -> None:
    """Run the operator until it is told to stop (SIGTERM/SIGINT)."""
    import uvloop

    registry = build_registry(settings, signing_key=read_signing_key_file(settings))
    heap.settle()
    memo = kopf.Memo()
    uvloop.run(
        kopf.operator(
            registry=registry,
            memo=memo,
            clusterwide=True,
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        )
    )
