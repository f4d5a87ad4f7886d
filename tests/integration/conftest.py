"""Integration fixtures: one real PostgreSQL server per session, a fresh database per test."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from hack.cluster import postgres as cluster

from stepcache import store

# Generous: the machine is shared; the tests that measure the bound build their own store with a small one.
TIMEOUT = 10.0
FLUSH_INTERVAL = 0.05


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.TempPostgres]:
    with cluster.TempPostgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def database_url(postgres: cluster.TempPostgres) -> Iterator[str]:
    """A new, empty database (no tables) for one test: for tests of the migrations themselves."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    postgres.run_sql(f"CREATE DATABASE {name}", database="postgres")
    yield postgres.url_for(name)
    postgres.run_sql(f"DROP DATABASE {name} WITH (FORCE)", database="postgres")


@pytest.fixture(scope="session")
def migrated_database(postgres: cluster.TempPostgres) -> str:
    """One migrated database for the session; each test empties its table (creating a database takes ~1 s)."""
    postgres.run_sql("CREATE DATABASE store_tests", database="postgres")
    url = postgres.url_for("store_tests")

    async def migrate() -> None:
        migrator = await store.Store.connect(url, timeout=TIMEOUT)
        try:
            await migrator.migrate()
        finally:
            await migrator.close()

    asyncio.run(migrate())
    return url


@pytest.fixture
def cache_url(postgres: cluster.TempPostgres, migrated_database: str) -> str:
    """The migrated database with an empty table and ids starting at 1."""
    postgres.run_sql("TRUNCATE cache_entries RESTART IDENTITY", database="store_tests")
    return migrated_database


@pytest.fixture
async def cache(cache_url: str) -> AsyncIterator[store.Store]:
    """A store on the migrated, empty database."""
    connected = await store.Store.connect(cache_url, timeout=TIMEOUT, hit_flush_interval=FLUSH_INTERVAL)
    try:
        yield connected
    finally:
        await connected.close()


@pytest.fixture
async def db(cache_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection to the same database, for looking behind the store's back."""
    conn = await asyncpg.connect(cache_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def own_postgres(tmp_path: pathlib.Path) -> Iterator[cluster.TempPostgres]:
    """A server of the test's own, which it may stop or freeze without disturbing the other tests."""
    with cluster.TempPostgres(tmp_path / "postgres") as server:
        yield server
