"""Text the database refuses (a NUL character) is a permanent outcome, never "database unavailable".

Postgres refuses `\\u0000` in JSONB and text. Before, that refusal looked like any database error: the recorder
retried the pod as if the database were down, for ever (its resync finds the pod again after every give-up). And
the bytes could not be replayed anyway: a replay hands values to its script through environment variables, which
cannot hold a NUL. So such a result is not stored, the pod is rejected for good, and the database stays usable.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import asyncpg
import prometheus_client
import pytest

from stepcache import errors, store
from tests.integration import operator_harness as harness
from tests.integration import test_recorder as recorder_tests
from tests.integration import test_store as store_tests

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"  # generic only in the stubs


@pytest.mark.parametrize(
    "changes",
    [
        {"termination_messages": {"main": "rows\x0042"}},
        {"argo_outputs": {"parameters": {"p": "\x00"}, "result": None}},
        {"key_material": {"scheme": "stepcache/v2", "version": "a\x00b"}},
        {"step": "Job/a\x00b"},
        {"termination_messages": {"main": "half a pair: \ud83d"}},
    ],
    ids=["termination-message", "argo-parameter", "key-material", "step", "lone-surrogate"],
)
async def test_recording_a_nul_is_refused_for_good_and_the_store_stays_usable(
    cache: store.Store, db: Connection, changes: dict[str, Any]
) -> None:
    entry = dataclasses.replace(store_tests.new_entry(), **changes)

    with pytest.raises(errors.Uncacheable, match=r"^unstorable-output: "):
        await cache.record(entry)

    assert await db.fetchval("SELECT count(*) FROM cache_entries") == 0
    stored = await cache.record(store_tests.new_entry())
    assert (await cache.get(stored)) is not None


@pytest.fixture
async def cluster() -> AsyncIterator[harness.Emulator]:
    async with harness.emulated_cluster() as emulated:
        await harness.create_opted_in(emulated, recorder_tests.NAMESPACE)
        yield emulated


@pytest.fixture
def launcher(cluster: harness.Emulator, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> harness.Launcher:
    certs = harness.webhook_tls(tmp_path)
    return harness.Launcher(cluster=cluster, certs=certs, tmp_path=tmp_path, monkeypatch=monkeypatch)


def retried_as_unavailable() -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "stepcache_record_retries_total", {"reason": "store-unavailable"}
    )
    return value or 0.0


async def test_a_pod_whose_termination_message_holds_a_nul_is_rejected_for_good_and_nothing_is_recorded(
    launcher: harness.Launcher, cluster: harness.Emulator, cache_url: str, db: Connection
) -> None:
    pod = recorder_tests.succeeded_pod("train-29sl4-x7k2m")
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "rows\x0042"
    rejected_before, retried_before = recorder_tests.rejected("uncacheable"), retried_as_unavailable()

    async with recorder_tests.running(launcher, cache_url):
        await harness.create(cluster, pod)

        async def rejections() -> float:
            return recorder_tests.rejected("uncacheable") - rejected_before

        assert await harness.eventually(rejections) == 1

    assert await db.fetchval("SELECT count(*) FROM cache_entries") == 0
    assert retried_as_unavailable() == retried_before
    # Out of the recorder's watch for good: the cache-id label is removed, nothing else is written.
    assert recorder_tests.operator_writes(cluster) == [recorder_tests.unlabel_write(pod)]
