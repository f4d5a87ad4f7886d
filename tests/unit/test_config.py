"""Settings are validated once at start; every bad value names its variable and says why."""

from __future__ import annotations

import datetime
import pathlib

import pytest

from stepcache import config, errors

URL = "postgresql://stepcache@127.0.0.1:5432/stepcache"


def settings(**env: str) -> config.Settings:
    return config.Settings.from_env({"STEPCACHE_DATABASE_URL": URL, **env})


def test_defaults_are_the_production_ones() -> None:
    s = settings()
    assert s.database_url == URL
    assert s.db_timeout == pytest.approx(0.2)
    assert s.scope == "namespace"
    assert s.default_max_staleness is None
    assert s.max_staleness == datetime.timedelta(days=30)
    assert s.require_digest is False
    assert s.key_secret_content is False
    assert s.signing_key_file is None
    assert s.webhook_port == 9443


def test_every_setting_is_read() -> None:
    s = settings(
        STEPCACHE_DB_TIMEOUT_MS="350",
        STEPCACHE_SCOPE="cluster",
        STEPCACHE_SALT="s1",
        STEPCACHE_DEFAULT_MAX_STALENESS="P7D",
        STEPCACHE_MAX_STALENESS="none",
        STEPCACHE_CACHE_IMAGE="registry.local/replay:1",
        STEPCACHE_KEEP_NODE_CONSTRAINTS="yes",
        STEPCACHE_KEY_SERVICE_ACCOUNT="1",
        STEPCACHE_KEY_SECRET_CONTENT="on",
        STEPCACHE_REQUIRE_DIGEST="true",
        STEPCACHE_SIGNING_KEY_FILE="/keys/k",
        STEPCACHE_WEBHOOK_PORT="8443",
        STEPCACHE_LOG_FORMAT="console",
        STEPCACHE_LOG_LEVEL="DEBUG",
    )
    assert s.db_timeout == pytest.approx(0.35)
    assert s.scope == "cluster"
    assert s.salt == "s1"
    assert s.default_max_staleness == datetime.timedelta(days=7)
    assert s.max_staleness is None
    assert s.cache_image == "registry.local/replay:1"
    assert s.keep_node_constraints
    assert s.key_service_account
    assert s.key_secret_content
    assert s.require_digest
    assert s.signing_key_file == pathlib.Path("/keys/k")
    assert s.webhook_port == 8443
    assert s.log_format == "console"
    assert s.log_level == "debug"


@pytest.mark.parametrize(
    ("env", "name", "reason"),
    [
        ({"STEPCACHE_DATABASE_URL": ""}, "STEPCACHE_DATABASE_URL", "is required"),
        ({"STEPCACHE_DATABASE_URL": "mysql://x"}, "STEPCACHE_DATABASE_URL", "must start with postgresql://"),
        ({"STEPCACHE_DB_TIMEOUT_MS": "fast"}, "STEPCACHE_DB_TIMEOUT_MS", "'fast' is not an integer"),
        ({"STEPCACHE_DB_TIMEOUT_MS": "0"}, "STEPCACHE_DB_TIMEOUT_MS", "0 is outside 1..60000"),
        ({"STEPCACHE_SCOPE": "global"}, "STEPCACHE_SCOPE", "'global' is not one of namespace, cluster"),
        ({"STEPCACHE_MAX_STALENESS": "7 days"}, "STEPCACHE_MAX_STALENESS", "is not an ISO 8601 duration"),
        ({"STEPCACHE_DEFAULT_MAX_STALENESS": "-P1D"}, "STEPCACHE_DEFAULT_MAX_STALENESS", "is not an ISO 8601"),
        ({"STEPCACHE_REQUIRE_DIGEST": "maybe"}, "STEPCACHE_REQUIRE_DIGEST", "'maybe' is not a boolean"),
        ({"STEPCACHE_WEBHOOK_PORT": "70000"}, "STEPCACHE_WEBHOOK_PORT", "70000 is outside 0..65535"),
        ({"STEPCACHE_LOG_FORMAT": "xml"}, "STEPCACHE_LOG_FORMAT", "'xml' is not one of json, console"),
        ({"STEPCACHE_CACHE_IMAGE": "  "}, "STEPCACHE_CACHE_IMAGE", "must not be empty"),
        ({"STEPCACHE_GC_UNUSED_AFTER": "a week"}, "STEPCACHE_GC_UNUSED_AFTER", "is not an ISO 8601 duration"),
        ({"STEPCACHE_GC_UNUSED_AFTER": "P0D"}, "STEPCACHE_GC_UNUSED_AFTER", "must be longer than zero"),
        ({"STEPCACHE_STATUS_INTERVAL_SECONDS": "0"}, "STEPCACHE_STATUS_INTERVAL_SECONDS", "0 is outside 1..3600"),
        ({"STEPCACHE_RECONCILE_INTERVAL_SECONDS": "x"}, "STEPCACHE_RECONCILE_INTERVAL_SECONDS", "not an integer"),
    ],
)
def test_a_bad_value_names_the_setting_and_the_reason(env: dict[str, str], name: str, reason: str) -> None:
    with pytest.raises(errors.InvalidSetting) as caught:
        config.Settings.from_env({"STEPCACHE_DATABASE_URL": URL, **env})
    assert caught.value.name == name
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{name}: ")


def test_cacheentry_settings_default_to_no_disuse_limit_and_read_iso_durations() -> None:
    assert settings().gc_unused_after is None
    assert settings().status_interval == 5.0
    assert settings().reconcile_interval == 60.0
    s = settings(
        STEPCACHE_GC_UNUSED_AFTER="P14D",
        STEPCACHE_STATUS_INTERVAL_SECONDS="2",
        STEPCACHE_RECONCILE_INTERVAL_SECONDS="30",
    )
    assert s.gc_unused_after == datetime.timedelta(days=14)
    assert (s.status_interval, s.reconcile_interval) == (2.0, 30.0)
