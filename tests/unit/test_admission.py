"""`admission.decide` with a store that misbehaves on purpose: it always answers, in time, and never denies a pod."""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import time
from typing import Any, cast

import pytest
import yaml

from stepcache import admission, config, errors, keys, kube, model, mutation, references, runtime, signing, store

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pods"
NAMESPACE = "team-a"
SIGNING_KEY = b"unit-test-signing-key-0123456789abcdef"
DB_TIMEOUT = 0.05
MARGIN = 0.5
"""Seconds of scheduling slack; far below the hang the slow store simulates."""
REFERENCES = references.ReferenceView()
REFERENCES.put_configmap(NAMESPACE, "train-config", data={"epochs": "10"}, binary_data=None)
"""What the operator's view knows of the ConfigMap job-pod.yaml reads."""


class FakeStore:
    """The two calls admission makes, with a `lookup` each test scripts."""

    def __init__(self, lookup: Any) -> None:
        self._lookup = lookup
        self.lookups = 0
        self.hits: list[int] = []

    async def lookup(self, *, namespace: str, cache_key: str, max_age: datetime.timedelta | None) -> Any:
        self.lookups += 1
        return await self._lookup()

    def note_hit(self, entry_id: int) -> None:
        self.hits.append(entry_id)


def make_runtime(fake: FakeStore) -> runtime.Runtime:
    namespaces = runtime.OptedInNamespaces()
    namespaces.add(NAMESPACE)
    return runtime.Runtime(
        settings=config.Settings(database_url="postgresql://unused", db_timeout=DB_TIMEOUT),
        store=cast(store.Store, fake),
        kube=cast(kube.Kube, None),  # admission never calls the API
        signing_key=SIGNING_KEY,
        namespaces=namespaces,
        key_options=keys.KeyOptions(),
        replay_options=mutation.ReplayOptions(cache_image="busybox:1.36.1"),
        references=REFERENCES,
    )


def load_pod() -> dict[str, Any]:
    with (FIXTURES / "job-pod.yaml").open() as file:
        loaded = yaml.safe_load(file)
    assert isinstance(loaded, dict)
    return loaded


def miss_patch(pod: dict[str, Any]) -> dict[str, Any]:
    key = keys.compute(pod, namespace=NAMESPACE, options=keys.KeyOptions(), references=REFERENCES)
    containers = ",".join(key.containers)
    signature = signing.signature(SIGNING_KEY, namespace=NAMESPACE, key=key.value, key_containers=containers)
    signed = mutation.Signed(key=key.value, key_containers=key.containers, signature=signature)
    return mutation.miss_patch(pod, signed=signed)


def stored_entry() -> model.CachedEntry:
    return model.CachedEntry(
        id=42,
        namespace=NAMESPACE,
        cache_key="ab" * 32,
        termination_messages={"train": "done\n"},
        argo_outputs=None,
        source_pod="train-29sl4-x7k2m",
        finished_at=datetime.datetime.now(datetime.UTC),
        duration_seconds=60.0,
    )


async def hang() -> None:
    await asyncio.Event().wait()


async def test_a_lookup_that_hangs_is_given_up_after_the_db_timeout_and_the_pod_runs_as_a_miss() -> None:
    fake = FakeStore(hang)
    pod = load_pod()

    started = time.monotonic()
    verdict = await admission.decide(make_runtime(fake), pod, dryrun=False)
    elapsed = time.monotonic() - started

    assert DB_TIMEOUT <= elapsed < DB_TIMEOUT + MARGIN
    assert verdict.outcome == "miss"
    assert verdict.patch == miss_patch(pod)
    assert any("cache unavailable (TimeoutError)" in warning for warning in verdict.warnings), verdict.warnings


async def test_a_store_that_is_unavailable_gives_a_miss_with_a_warning() -> None:
    async def unavailable() -> None:
        raise errors.StoreUnavailable("lookup: ConnectionRefusedError")

    pod = load_pod()

    verdict = await admission.decide(make_runtime(FakeStore(unavailable)), pod, dryrun=False)

    assert verdict.outcome == "miss"
    assert verdict.patch == miss_patch(pod)
    assert any("cache unavailable (StoreUnavailable)" in warning for warning in verdict.warnings), verdict.warnings


async def broken() -> None:
    raise KeyError("a bug")


async def test_any_other_error_admits_the_pod_unchanged_with_a_warning() -> None:
    verdict = await admission.decide(make_runtime(FakeStore(broken)), load_pod(), dryrun=False)

    assert verdict.outcome == "error"
    assert verdict.patch == {}
    assert verdict.warnings == ("stepcache: internal error (KeyError); the pod runs uncached",)


async def test_an_internal_error_still_removes_the_stepcache_names_the_user_wrote() -> None:
    pod = load_pod()
    pod["metadata"]["labels"].update({mutation.HIT: "true", mutation.CACHE_ID: "7"})
    pod["metadata"]["annotations"][mutation.KEY_SIGNATURE] = "0" * 64

    verdict = await admission.decide(make_runtime(FakeStore(broken)), pod, dryrun=False)

    assert verdict.outcome == "error"
    assert verdict.patch == {
        "metadata": {
            "labels": {mutation.CACHE_ID: None, mutation.HIT: None},
            "annotations": {mutation.KEY_SIGNATURE: None},
        }
    }


@pytest.mark.parametrize(
    ("metadata", "field"),
    [("not a map", "metadata"), (["a"], "metadata"), ({"labels": "x", "annotations": 3}, "metadata.labels")],
)
async def test_a_pod_of_any_shape_is_admitted_uncached_with_a_warning_naming_the_field(
    metadata: Any, field: str
) -> None:
    pod = load_pod()
    pod["metadata"] = metadata

    verdict = await admission.decide(make_runtime(FakeStore(broken)), pod, dryrun=False)

    assert verdict.outcome == "uncacheable"
    assert verdict.patch == {}
    assert [w for w in verdict.warnings if w.startswith(f"stepcache: {field} must be an object")], verdict.warnings


async def test_when_even_the_skip_patch_fails_the_pod_is_admitted_unchanged_with_two_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def skip_patch(pod: Any) -> dict[str, Any]:
        raise RuntimeError("a second bug")

    monkeypatch.setattr(mutation, "skip_patch", skip_patch)

    verdict = await admission.decide(make_runtime(FakeStore(broken)), load_pod(), dryrun=False)

    assert verdict.outcome == "error"
    assert verdict.patch == {}
    assert verdict.warnings == (
        "stepcache: internal error (KeyError); the pod runs uncached",
        "stepcache: its stepcache labels and annotations could not be checked (RuntimeError)",
    )


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("stepcache.dev/max-staleness", "P99999999999D"),
        ("stepcache.dev/max-staleness", "P8000Y"),
        ("pipelines.kubeflow.org/max_cache_staleness", "P99999999999D"),
        ("pipelines.kubeflow.org/max_cache_staleness", "P8000Y"),
    ],
)
async def test_an_out_of_range_staleness_runs_the_pod_uncached_and_recorded_with_a_warning_naming_it(
    annotation: str, value: str
) -> None:
    async def found() -> model.CachedEntry:
        return stored_entry()

    fake = FakeStore(found)
    pod = load_pod()
    pod["metadata"]["annotations"].pop("stepcache.dev/max-staleness")
    pod["metadata"]["annotations"][annotation] = value

    verdict = await admission.decide(make_runtime(fake), pod, dryrun=False)

    assert verdict.outcome == "miss"
    assert verdict.patch == miss_patch(pod)
    assert fake.lookups == 0
    assert [w for w in verdict.warnings if f"annotation {annotation}:" in w and "runs uncached" in w], verdict.warnings


@pytest.mark.parametrize(("dryrun", "noted"), [(True, []), (False, [42])])
async def test_a_hit_is_counted_unless_the_request_is_a_dry_run(dryrun: bool, noted: list[int]) -> None:
    async def found() -> model.CachedEntry:
        return stored_entry()

    fake = FakeStore(found)

    verdict = await admission.decide(make_runtime(fake), load_pod(), dryrun=dryrun)

    assert verdict.outcome == "hit"
    assert verdict.entry_id == 42
    assert verdict.patch["metadata"]["labels"][mutation.HIT] == "true"
    assert fake.hits == noted
