"""Output artifacts against real services: the blob store on PostgreSQL, the blob endpoint over HTTP, the S3
repository (moto's server, which argoexec's own S3 driver works with), and a replay fetching from the endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
import pathlib
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from hack.cluster import argo as argo_harness
from hack.cluster import postgres as cluster

from stepcache import artifacts, blobs, blobserver, harvest, store
from tests.integration.conftest import TIMEOUT
from tests.integration.test_store import new_entry
from tests.tarballs import argo_tgz
from tests.unit import test_artifact_replay as replay_tests

SIGNING_KEY = b"s" * 32
URL_KEY = artifacts.url_key(SIGNING_KEY)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def blob_store(cache_url: str, postgres: cluster.TempPostgres) -> AsyncIterator[blobs.BlobStore]:
    postgres.run_sql("TRUNCATE blobs, blob_chunks, artifact_locations RESTART IDENTITY", database="store_tests")
    connected = await blobs.BlobStore.connect(cache_url, timeout=TIMEOUT, pool_size=3, flush_interval=0.05)
    try:
        yield connected
    finally:
        await connected.close()


def with_artifacts(namespace: str, *blobs_: bytes, label: str = "step") -> Any:
    return new_entry(
        namespace=namespace,
        cache_key=hashlib.sha256(f"{namespace}/{label}".encode()).hexdigest(),
        argo_outputs={
            "parameters": {},
            "result": None,
            "artifacts": [
                {"name": f"a{i}", "path": f"/tmp/a{i}", "archive": "none", "sha256": sha(b), "size": len(b)}
                for i, b in enumerate(blobs_)
            ],
        },
    )


async def backdate_blobs(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("UPDATE blobs SET created_at = now() - interval '2 hours'")
    finally:
        await conn.close()


# --- the blob store -----------------------------------------------------------------------------------------------


async def test_a_blob_is_stored_once_by_content_and_read_back_in_chunks(blob_store: blobs.BlobStore, db: Any) -> None:
    data = os.urandom(int(2.5 * blobs.CHUNK_BYTES))

    first = await blob_store.put(data)
    second = await blob_store.put(data)

    assert first == second == sha(data)
    assert await db.fetchval("SELECT count(*) FROM blobs") == 1
    assert await db.fetchval("SELECT count(*) FROM blob_chunks") == 3
    assert [len(chunk) async for chunk in blob_store.chunks(first)] == [
        blobs.CHUNK_BYTES,
        blobs.CHUNK_BYTES,
        blobs.CHUNK_BYTES // 2,
    ]
    assert await blob_store.read(first) == data
    assert await blob_store.size(first) == len(data)


async def test_concurrent_writers_of_one_content_leave_one_blob(blob_store: blobs.BlobStore, db: Any) -> None:
    data = os.urandom(300_000)

    shas = await asyncio.gather(*(blob_store.put(data) for _ in range(4)))

    assert set(shas) == {sha(data)}
    assert await db.fetchval("SELECT count(*) FROM blob_chunks") == 1
    assert await blob_store.read(sha(data)) == data


async def test_presence_names_stored_blobs_and_carries_only_small_ones(blob_store: blobs.BlobStore) -> None:
    small, large, absent = b"tiny", os.urandom(40_000), b"never stored"
    await blob_store.put(small)
    await blob_store.put(large)

    found = await blob_store.presence([sha(small), sha(large), sha(absent)], inline_max=16_384)

    assert found == {
        sha(small): blobs.BlobInfo(size=4, data=small),
        sha(large): blobs.BlobInfo(size=40_000, data=None),
    }


async def test_blobs_no_entry_refers_to_are_collected_after_the_grace_period(
    blob_store: blobs.BlobStore, cache: store.Store, cache_url: str
) -> None:
    kept, orphan, young = b"kept by an entry", b"nobody's", b"just stored"
    for data in (kept, orphan):
        await blob_store.put(data)
    entry_id = await cache.record(with_artifacts("team-a", kept))
    await backdate_blobs(cache_url)
    await blob_store.put(young)

    assert await blob_store.collect(older_than=datetime.timedelta(hours=1)) == 1
    assert await blob_store.size(sha(orphan)) is None
    assert await blob_store.size(sha(kept)) == len(kept)
    assert await blob_store.size(sha(young)) == len(young)

    await cache.delete(entry_id)
    assert await blob_store.collect(older_than=datetime.timedelta(hours=1)) == 1
    assert await blob_store.size(sha(kept)) is None


async def test_a_blob_is_referenced_for_its_entrys_namespace_and_for_all_with_cluster_scope(
    blob_store: blobs.BlobStore, cache: store.Store
) -> None:
    ours, shared = b"team-a's", b"everyone's"
    await cache.record(with_artifacts("team-a", ours))
    await cache.record(with_artifacts("*", shared))

    assert await blob_store.referenced(namespace="team-a", sha256=sha(ours))
    assert not await blob_store.referenced(namespace="team-b", sha256=sha(ours))
    assert await blob_store.referenced(namespace="team-b", sha256=sha(shared))


async def test_locations_resolve_per_scope_from_memory_at_once_and_from_the_database_after_a_flush(
    blob_store: blobs.BlobStore, db: Any
) -> None:
    noted = blobs.Located(location="s3://e/b/wf-2/p/data.tgz", sha256="ab" * 32, entry_id=7, artifact="data")
    stored = blobs.Located(location="s3://e/b/wf-1/p/data.tgz", sha256="cd" * 32, entry_id=3, artifact="data")

    await blob_store.store_locations(scope="team-a", located=[stored])
    blob_store.note_locations(scope="team-a", located=[noted])

    wanted = [noted.location, stored.location, "s3://e/b/unknown"]
    assert await blob_store.resolve(scope="team-a", locations=wanted) == {
        noted.location: "ab" * 32,
        stored.location: "cd" * 32,
    }
    assert await blob_store.resolve(scope="team-b", locations=wanted) == {}

    async def flushed() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM artifact_locations") == 2)

    deadline = time.monotonic() + 10
    while not await flushed():
        assert time.monotonic() < deadline, "the noted location was never written"
        await asyncio.sleep(0.05)
    row = await db.fetchrow("SELECT * FROM artifact_locations WHERE location = $1", noted.location)
    assert (row["scope"], row["sha256"], row["entry_id"], row["artifact"]) == ("team-a", "ab" * 32, 7, "data")


# --- the blob endpoint --------------------------------------------------------------------------------------------


@pytest.fixture
async def endpoint(blob_store: blobs.BlobStore) -> AsyncIterator[str]:
    server = blobserver.BlobServer(blob_store=blob_store, url_key=URL_KEY, host="127.0.0.1", port=0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sign(base: str, *, namespace: str, data: bytes, expires: float | None = None) -> str:
    when = int(time.time() + 60) if expires is None else int(expires)
    return artifacts.signed_url(base, key=URL_KEY, namespace=namespace, sha256=sha(data), expires=when)


async def test_the_endpoint_serves_a_blob_to_a_url_signed_for_its_namespace(
    endpoint: str, blob_store: blobs.BlobStore, cache: store.Store
) -> None:
    data = os.urandom(int(1.5 * blobs.CHUNK_BYTES))
    await blob_store.put(data)
    await cache.record(with_artifacts("team-a", data))

    status, body = await asyncio.to_thread(fetch, sign(endpoint, namespace="team-a", data=data))

    assert status == 200
    assert body == data


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda url: url.replace("namespace=team-a", "namespace=team-b"), b"bad-signature"),
        (lambda url: url[:-1] + ("0" if url[-1] != "0" else "1"), b"bad-signature"),
        (lambda url: url.replace("expires=", "expires=9"), b"bad-signature"),
    ],
)
async def test_a_changed_url_is_refused(
    endpoint: str, blob_store: blobs.BlobStore, cache: store.Store, tamper: Any, reason: bytes
) -> None:
    data = b"team-a's model"
    await blob_store.put(data)
    await cache.record(with_artifacts("team-a", data))
    await cache.record(with_artifacts("team-b", b"team-b's own"))

    status, body = await asyncio.to_thread(fetch, tamper(sign(endpoint, namespace="team-a", data=data)))

    assert (status, body.strip()) == (403, reason)


async def test_an_expired_url_is_refused(endpoint: str, blob_store: blobs.BlobStore, cache: store.Store) -> None:
    data = b"old news"
    await blob_store.put(data)
    await cache.record(with_artifacts("team-a", data))

    status, body = await asyncio.to_thread(
        fetch, sign(endpoint, namespace="team-a", data=data, expires=time.time() - 1)
    )

    assert (status, body.strip()) == (403, b"expired")


async def test_a_pod_of_another_namespace_cannot_fetch_a_blob_even_with_a_valid_signature(
    endpoint: str, blob_store: blobs.BlobStore, cache: store.Store
) -> None:
    """Only entries pods of the URL's namespace may be served count: team-b's URL does not open team-a's blob."""
    data = b"team-a's secret model"
    await blob_store.put(data)
    await cache.record(with_artifacts("team-a", data))

    status, body = await asyncio.to_thread(fetch, sign(endpoint, namespace="team-b", data=data))

    assert (status, body.strip()) == (403, b"not-in-namespace")


async def test_a_referenced_blob_that_was_deleted_is_not_found(
    endpoint: str, blob_store: blobs.BlobStore, cache: store.Store
) -> None:
    data = b"gone"
    await blob_store.put(data)
    await cache.record(with_artifacts("team-a", data))
    assert await blob_store.delete(sha(data))

    status, _ = await asyncio.to_thread(fetch, sign(endpoint, namespace="team-a", data=data))

    assert status == 404


# --- a replay fetching from the endpoint --------------------------------------------------------------------------


async def test_a_replay_fetches_its_artifacts_from_the_endpoint_and_refuses_a_corrupted_blob(
    endpoint: str, blob_store: blobs.BlobStore, cache: store.Store, db: Any, tmp_path: pathlib.Path
) -> None:
    for blob in replay_tests.BLOBS.values():
        await blob_store.put(blob)
    await cache.record(with_artifacts("team-a", *replay_tests.BLOBS.values()))
    sources = {
        sha(blob): artifacts.Source(url=sign(endpoint, namespace="team-a", data=blob))
        for blob in replay_tests.BLOBS.values()
    }
    main = replay_tests.containers(replay_tests.hit(replay_tests.artifact_pod(), sources=sources))["main"]

    good = tmp_path / "good"
    good.mkdir()
    done = await asyncio.to_thread(replay_tests.replay, main, good)
    assert done.returncode == 0, done.stderr
    assert (good / "tmp/out/data.txt").read_bytes() == replay_tests.DATA
    assert (good / "tmp/raw.bin").read_bytes() == replay_tests.RAW
    assert (good / "tmp/tree/sub/b.txt").read_bytes() == replay_tests.TREE["sub/b.txt"]

    # The bytes change in the store (as they would on the wire): the replay must notice and write nothing.
    await db.execute(
        "UPDATE blob_chunks SET data = overlay(data placing '\\x00'::bytea from 10) "
        "WHERE blob_id = (SELECT id FROM blobs WHERE sha256 = $1)",
        sha(replay_tests.RAW),
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    done = await asyncio.to_thread(replay_tests.replay, main, bad)
    assert done.returncode == 1
    assert b"has sha256" in done.stderr
    assert not (bad / "tmp/raw.bin").exists()


# --- reading the step's artifacts from S3 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[argo_harness.S3Server]:
    with argo_harness.S3Server(bucket="artifacts") as server:
        yield server


@dataclasses.dataclass
class Secrets:
    """The Secrets of a namespace as the operator would read them."""

    values: dict[tuple[str, str, str], bytes]
    forbidden: bool = False

    async def secret_value(self, *, namespace: str, name: str, key: str) -> bytes | None:
        if self.forbidden:
            from kubernetes_asyncio.client.exceptions import ApiException

            raise ApiException(status=403, reason="Forbidden")
        return self.values.get((namespace, name, key))


def s3_secrets(s3: argo_harness.S3Server) -> Secrets:
    return Secrets(
        {
            ("team-a", "argo-artifacts", "accesskey"): s3.access_key.encode(),
            ("team-a", "argo-artifacts", "secretkey"): s3.secret_key.encode(),
        }
    )


def step_pod(s3: argo_harness.S3Server, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Succeeded producer pod whose template archives to the moto bucket, and its task result."""
    pod = replay_tests.artifact_pod()
    pod["metadata"]["namespace"] = "team-a"
    tmpl = replay_tests.argo.template(pod)
    assert tmpl is not None
    tmpl["archiveLocation"] = {
        "archiveLogs": False,
        "s3": {
            "endpoint": s3.endpoint,
            "bucket": "artifacts",
            "insecure": True,
            "accessKeySecret": {"name": "argo-artifacts", "key": "accesskey"},
            "secretKeySecret": {"name": "argo-artifacts", "key": "secretkey"},
            "key": prefix,
        },
    }
    replay_tests.set_template(pod, tmpl)
    keys = {"data": f"{prefix}/data.tgz", "raw": f"{prefix}/raw.bin", "tree": f"{prefix}/tree.tgz"}
    for name, key in keys.items():
        s3.client().put_object(Bucket="artifacts", Key=key, Body=replay_tests.BLOBS[name])
    result = {
        "outputs": {
            "artifacts": [
                {"name": name, "path": replay_tests.PATHS[name], "s3": {"key": key}} for name, key in keys.items()
            ]
        }
    }
    return pod, result


def harvester(blob_store: blobs.BlobStore, secrets: Secrets, *, max_bytes: int = 1 << 20) -> harvest.Harvester:
    return harvest.Harvester(blob_store=blob_store, reader=blobs.S3Reader(), secrets=secrets, max_bytes=max_bytes)


async def test_a_recorded_steps_artifacts_are_read_from_s3_into_the_blob_store(
    s3: argo_harness.S3Server, blob_store: blobs.BlobStore
) -> None:
    pod, result = step_pod(s3, "wf-1/wf-1-produce-1")

    harvested = await harvester(blob_store, s3_secrets(s3)).collect(pod, task_result=result)

    assert harvested is not None
    assert harvested.unreplayable is None
    assert {art.name: (art.sha256, art.size, location) for art, location in harvested.stored} == {
        name: (
            sha(replay_tests.BLOBS[name]),
            len(replay_tests.BLOBS[name]),
            f"s3://{s3.endpoint}/artifacts/wf-1/wf-1-produce-1/{file}",
        )
        for name, file in (("data", "data.tgz"), ("raw", "raw.bin"), ("tree", "tree.tgz"))
    }
    for blob in replay_tests.BLOBS.values():
        assert await blob_store.read(sha(blob)) == blob


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("cap", "artifact-too-large"),
        ("gone", "artifact-object-missing"),
        ("forbidden", "secret-forbidden"),
        ("no-secret", "secret-missing"),
        ("unsafe", "unsafe-archive"),
    ],
)
async def test_a_step_whose_artifacts_cannot_be_kept_is_recorded_as_not_replayable_with_the_reason(
    s3: argo_harness.S3Server, blob_store: blobs.BlobStore, setup: str, reason: str
) -> None:
    prefix = f"wf-{setup}/wf-{setup}-produce-1"
    pod, result = step_pod(s3, prefix)
    secrets = s3_secrets(s3)
    max_bytes = 1 << 20
    if setup == "cap":
        max_bytes = sum(len(b) for b in replay_tests.BLOBS.values()) - 1
    elif setup == "gone":
        s3.client().delete_object(Bucket="artifacts", Key=f"{prefix}/raw.bin")
    elif setup == "forbidden":
        secrets.forbidden = True
    elif setup == "no-secret":
        secrets.values.clear()
    elif setup == "unsafe":
        s3.client().put_object(Bucket="artifacts", Key=f"{prefix}/data.tgz", Body=argo_tgz("/elsewhere", b"x"))

    harvested = await harvester(blob_store, secrets, max_bytes=max_bytes).collect(pod, task_result=result)

    assert harvested is not None
    assert harvested.unreplayable == reason
    assert harvested.apply(new_entry()).argo_outputs == {"unreplayable": reason}


async def test_an_unreachable_repository_is_retried_then_given_up_as_not_replayable(
    blob_store: blobs.BlobStore,
) -> None:
    from hack.cluster import ports

    s3 = argo_harness.S3Server(bucket="artifacts")
    s3._port = ports.free_port()  # nothing listens there
    pod, result = (
        replay_tests.artifact_pod(),
        {"outputs": {"artifacts": [{"name": "data", "s3": {"key": "wf/p/data.tgz"}}]}},
    )
    pod["metadata"]["namespace"] = "team-a"
    tmpl = replay_tests.argo.template(pod)
    assert tmpl is not None
    tmpl["outputs"]["artifacts"] = [{"name": "data", "path": "/tmp/out/data.txt"}]
    tmpl["archiveLocation"] = {
        "s3": {
            "endpoint": s3.endpoint,
            "bucket": "artifacts",
            "insecure": True,
            "accessKeySecret": {"name": "argo-artifacts", "key": "accesskey"},
            "secretKeySecret": {"name": "argo-artifacts", "key": "secretkey"},
            "key": "wf/p",
        }
    }
    replay_tests.set_template(pod, tmpl)
    reader = harvest.Harvester(
        blob_store=blob_store,
        reader=blobs.S3Reader(connect_timeout=1, read_timeout=1),
        secrets=s3_secrets(s3),
        max_bytes=1 << 20,
    )

    with pytest.raises(harvest.Unavailable):
        await reader.collect(pod, task_result=result)
    given_up = await reader.collect(pod, task_result=result, last_attempt=True)

    assert given_up is not None
    assert given_up.unreplayable == "repository-unavailable"
