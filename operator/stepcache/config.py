"""Settings, read from the environment once at start and validated, so handlers never read the environment.

A bad value raises `InvalidSetting` naming the variable and the reason; the operator then refuses to start.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
from collections.abc import Mapping
from typing import Literal

from stepcache import errors, staleness

__all__ = ["Settings"]

Scope = Literal["namespace", "cluster"]
LogFormat = Literal["json", "console"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_MAX_INLINE = 64 * 1024
"""Inline artifacts make the pod object larger; the API server stores objects of at most 1.5 MiB."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the operator can be told; defaults are the production ones."""

    database_url: str
    db_timeout: float = 0.2
    """Seconds; bounds every database call (STEPCACHE_DB_TIMEOUT_MS)."""
    scope: Scope = "namespace"
    salt: str = ""
    default_max_staleness: datetime.timedelta | None = None
    """Applies to pods without a staleness annotation; None means "up to the cap"."""
    max_staleness: datetime.timedelta | None = datetime.timedelta(days=30)
    """Cap on every pod's staleness, and the age at which the background timer deletes entries; None: no cap."""
    cache_image: str = "busybox:1.36.1"
    keep_node_constraints: bool = False
    key_service_account: bool = False
    key_secret_content: bool = False
    """Key referenced Secrets by HMACs of their values, not only by name and items (needs list/watch on Secrets)."""
    require_digest: bool = False
    signing_key_file: pathlib.Path | None = None
    namespace: str = "stepcache-system"
    """The operator's own namespace (where the signing-key Secret lives)."""
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 9443
    webhook_cert_file: pathlib.Path = pathlib.Path("/etc/stepcache/tls/tls.crt")
    webhook_key_file: pathlib.Path = pathlib.Path("/etc/stepcache/tls/tls.key")
    metrics_port: int = 8080
    """0 disables the Prometheus endpoint."""
    health_port: int = 8081
    """kopf's liveness endpoint (/healthz); 0 disables it."""
    log_format: LogFormat = "json"
    log_level: str = "info"
    db_pool_size: int = 16
    """Connections shared by the webhook and the recorder; at 4, 16 concurrent reviews queued for a connection
    until lookups hit their bound (docs/benchmarks.md)."""
    resync_interval: float = 60.0
    """Seconds between passes over Succeeded pods still unrecorded (STEPCACHE_RESYNC_INTERVAL_SECONDS)."""
    expiry_interval: float = 300.0
    """Seconds between background deletions of expired entries (older than the cap, or unused too long)."""
    gc_unused_after: datetime.timedelta | None = None
    """Entries neither hit nor recorded for this long are deleted by the expiry timer; None: kept until the cap."""
    reconcile_interval: float = 60.0
    """Seconds between full comparisons of CacheEntry objects with the rows (Postgres wins)."""
    status_interval: float = 5.0
    """Seconds between CacheEntry status writes: a hot entry's object is written at most once per interval."""
    artifact_max_bytes: int = 64 * 1024 * 1024
    """Cap on the output artifacts one entry stores, in all; above it the step is recorded as not replayable."""
    artifact_inline_bytes: int = 16 * 1024
    """Artifacts up to this size travel to a replay inline in its pod spec; larger ones are fetched."""
    blob_port: int = 8082
    """The blob endpoint replays fetch artifacts from; 0 disables it."""
    blob_endpoint: str = ""
    """The blob endpoint's URL as pods reach it (a Service); empty: only inline artifacts can be replayed."""
    blob_url_ttl: float = 3600.0
    """Seconds a signed blob URL stays good after admission."""
    blob_pool_size: int = 4
    """Database connections for blob transfers, apart from the webhook's pool."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from `STEPCACHE_*` variables; raise `InvalidSetting` on the first bad one."""
        env = _Env(environ)
        defaults = cls(database_url="")
        database_url = env.text("STEPCACHE_DATABASE_URL", "")
        if not database_url:
            raise errors.InvalidSetting("STEPCACHE_DATABASE_URL", "is required (a postgresql:// URL)")
        if not database_url.startswith(("postgres://", "postgresql://")):
            raise errors.InvalidSetting("STEPCACHE_DATABASE_URL", "must start with postgresql:// or postgres://")
        timeout_ms = env.integer("STEPCACHE_DB_TIMEOUT_MS", 200, minimum=1, maximum=60_000)
        scope = env.choice("STEPCACHE_SCOPE", defaults.scope, ("namespace", "cluster"))
        default_staleness = env.duration("STEPCACHE_DEFAULT_MAX_STALENESS", defaults.default_max_staleness)
        cap = env.duration("STEPCACHE_MAX_STALENESS", defaults.max_staleness, allow_none_word=True)
        signing_key_file = env.text("STEPCACHE_SIGNING_KEY_FILE", "")
        unused_after = env.duration("STEPCACHE_GC_UNUSED_AFTER", defaults.gc_unused_after)
        if unused_after is not None and unused_after <= datetime.timedelta(0):
            # Zero would delete every entry at each expiry run: surely not what was meant.
            raise errors.InvalidSetting("STEPCACHE_GC_UNUSED_AFTER", "must be longer than zero (or unset)")
        return cls(
            database_url=database_url,
            db_timeout=timeout_ms / 1000,
            scope=scope,  # type: ignore[arg-type]  # choice() checked it
            salt=env.text("STEPCACHE_SALT", defaults.salt),
            default_max_staleness=default_staleness,
            max_staleness=cap,
            cache_image=env.nonempty("STEPCACHE_CACHE_IMAGE", defaults.cache_image),
            keep_node_constraints=env.flag("STEPCACHE_KEEP_NODE_CONSTRAINTS", defaults.keep_node_constraints),
            key_service_account=env.flag("STEPCACHE_KEY_SERVICE_ACCOUNT", defaults.key_service_account),
            key_secret_content=env.flag("STEPCACHE_KEY_SECRET_CONTENT", defaults.key_secret_content),
            require_digest=env.flag("STEPCACHE_REQUIRE_DIGEST", defaults.require_digest),
            signing_key_file=pathlib.Path(signing_key_file) if signing_key_file else None,
            namespace=env.nonempty("STEPCACHE_NAMESPACE", defaults.namespace),
            webhook_host=env.nonempty("STEPCACHE_WEBHOOK_HOST", defaults.webhook_host),
            webhook_port=env.integer("STEPCACHE_WEBHOOK_PORT", defaults.webhook_port, minimum=0, maximum=65535),
            webhook_cert_file=pathlib.Path(
                env.nonempty("STEPCACHE_WEBHOOK_CERT_FILE", str(defaults.webhook_cert_file))
            ),
            webhook_key_file=pathlib.Path(env.nonempty("STEPCACHE_WEBHOOK_KEY_FILE", str(defaults.webhook_key_file))),
            metrics_port=env.integer("STEPCACHE_METRICS_PORT", defaults.metrics_port, minimum=0, maximum=65535),
            health_port=env.integer("STEPCACHE_HEALTH_PORT", defaults.health_port, minimum=0, maximum=65535),
            log_format=env.choice("STEPCACHE_LOG_FORMAT", defaults.log_format, ("json", "console")),  # type: ignore[arg-type]
            log_level=env.choice("STEPCACHE_LOG_LEVEL", defaults.log_level, _LOG_LEVELS),
            db_pool_size=env.integer("STEPCACHE_DB_POOL_SIZE", defaults.db_pool_size, minimum=1, maximum=100),
            resync_interval=float(env.integer("STEPCACHE_RESYNC_INTERVAL_SECONDS", 60, minimum=1, maximum=86_400)),
            expiry_interval=float(env.integer("STEPCACHE_EXPIRY_INTERVAL_SECONDS", 300, minimum=1, maximum=86_400)),
            artifact_max_bytes=env.integer(
                "STEPCACHE_ARTIFACT_MAX_BYTES", defaults.artifact_max_bytes, minimum=0, maximum=1024**3
            ),
            artifact_inline_bytes=env.integer(
                "STEPCACHE_ARTIFACT_INLINE_BYTES", defaults.artifact_inline_bytes, minimum=0, maximum=_MAX_INLINE
            ),
            blob_port=env.integer("STEPCACHE_BLOB_PORT", defaults.blob_port, minimum=0, maximum=65535),
            blob_endpoint=env.url("STEPCACHE_BLOB_ENDPOINT", defaults.blob_endpoint),
            blob_url_ttl=float(env.integer("STEPCACHE_BLOB_URL_TTL_SECONDS", 3600, minimum=60, maximum=7 * 86_400)),
            blob_pool_size=env.integer("STEPCACHE_BLOB_POOL_SIZE", defaults.blob_pool_size, minimum=2, maximum=64),
            gc_unused_after=unused_after,
            reconcile_interval=float(
                env.integer("STEPCACHE_RECONCILE_INTERVAL_SECONDS", 60, minimum=1, maximum=86_400)
            ),
            status_interval=float(env.integer("STEPCACHE_STATUS_INTERVAL_SECONDS", 5, minimum=1, maximum=3_600)),
        )


@dataclasses.dataclass(frozen=True)
class _Env:
    """Typed readers over the environment; each names the variable in its error."""

    environ: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        return self.environ.get(name, default)

    def nonempty(self, name: str, default: str) -> str:
        value = self.environ.get(name, default).strip()
        if not value:
            raise errors.InvalidSetting(name, "must not be empty")
        return value

    def url(self, name: str, default: str) -> str:
        value = self.environ.get(name, default).strip()
        if value and not value.startswith(("http://", "https://")):
            raise errors.InvalidSetting(name, f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    def flag(self, name: str, default: bool) -> bool:
        raw = self.environ.get(name)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise errors.InvalidSetting(name, f"{raw!r} is not a boolean (use true or false)")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        raw = self.environ.get(name)
        if raw is None or not raw.strip():
            return default
        try:
            value = int(raw.strip())
        except ValueError:
            raise errors.InvalidSetting(name, f"{raw!r} is not an integer") from None
        if not minimum <= value <= maximum:
            raise errors.InvalidSetting(name, f"{value} is outside {minimum}..{maximum}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.environ.get(name)
        if raw is None or not raw.strip():
            return default
        value = raw.strip().lower()
        if value not in choices:
            raise errors.InvalidSetting(name, f"{raw!r} is not one of {', '.join(choices)}")
        return value

    def duration(
        self, name: str, default: datetime.timedelta | None, *, allow_none_word: bool = False
    ) -> datetime.timedelta | None:
        raw = self.environ.get(name)
        if raw is None or not raw.strip():
            return default
        if allow_none_word and raw.strip().lower() == "none":
            return None
        try:
            return staleness.parse(raw.strip())
        except ValueError as exc:
            raise errors.InvalidSetting(
                name, f"{raw!r} is not an ISO 8601 duration such as P7D or PT12H ({exc})"
            ) from None
