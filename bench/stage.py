"""The stage every benchmark runs on: the harness's control plane, a temporary Postgres, the real operator.

Everything is the project's own test harness (hack/cluster), started once per invocation: a real kube-apiserver
with etcd and the controllers, PostgreSQL from the distribution's binaries, and `python -m stepcache run` as a
subprocess authenticated as its ServiceAccount — stepcache exactly as installed, minus the container image.
The operator and Postgres are pinned to the server core; the control plane may use both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import subprocess
import types
from collections.abc import Mapping, Sequence
from typing import Any

from hack.cluster import controlplane, postgres
from hack.cluster import operator as operator_harness

from bench import common
from stepcache import store

__all__ = ["NAMESPACE", "Stage"]

NAMESPACE = "bench"
"""The opted-in namespace the admission reviews come from."""


class Stage:
    """Control plane + Postgres + operator; a context manager. `work` keeps every log."""

    def __init__(self, work: pathlib.Path) -> None:
        self.work = work
        self.cp = controlplane.ControlPlane(workdir=work / "control-plane")
        self.db = postgres.TempPostgres(work / "postgres")
        self.operator: operator_harness.OperatorProcess | None = None
        self._extra: list[subprocess.Popen[bytes]] = []
        self._extra_operators: list[operator_harness.OperatorProcess] = []
        self.cache: dict[str, Any] = {}
        """What one benchmark prepared and another reuses (captured reviews, loaded tables, servers)."""

    # -- lifecycle --

    def __enter__(self) -> Stage:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        common.say("control plane: starting (built once by hack/cluster/build.sh, then cached)")
        self.cp.start()
        common.say(f"control plane: up at {self.cp.server}")
        self.db.start()
        self.pin_postgres()
        asyncio.run(_migrate(self.db.url))
        common.say(f"postgres: up at {self.db.url}, pinned to core {common.SERVER_CORE}")
        operator_harness.install_manifests(self.cp)
        self.cp.create_namespace(NAMESPACE, labels={"stepcache.dev/enabled": "true"})
        self.operator = self.start_operator(self.db.url, name="operator")
        common.say(f"stepcache: operator running (pid {self.operator_pid}), pinned to core {common.SERVER_CORE}")

    def stop(self) -> None:
        for operator in [*self._extra_operators, *([self.operator] if self.operator else [])]:
            with contextlib.suppress(Exception):
                operator.stop()
        self._extra_operators.clear()
        self.operator = None
        controlplane.terminate(self._extra)
        self._extra.clear()
        with contextlib.suppress(Exception):
            self.db.__exit__(None, None, None)  # stops the server, removes a private data directory
        self.cp.stop(keep_workdir=True)
        # Logs and results stay in the work directory; the bulky data (a 1M-row table is 1 GB) does not.
        for data in (self.work / "postgres" / "pg", self.work / "control-plane" / "etcd"):
            if data.is_dir() and not data.is_symlink():
                shutil.rmtree(data, ignore_errors=True)

    # -- pieces --

    def start_operator(
        self, database_url: str, *, name: str, env: Mapping[str, str] | None = None
    ) -> operator_harness.OperatorProcess:
        """One more `stepcache run`, pinned to the server core once it serves its webhook."""
        operator = operator_harness.OperatorProcess(
            self.cp, database_url=database_url, workdir=self.work / name, env=env
        )
        operator.start()
        common.pin(pid_of(operator), [common.SERVER_CORE])
        if self.operator is not None:
            self._extra_operators.append(operator)
        return operator

    def stop_operator(self, operator: operator_harness.OperatorProcess) -> None:
        operator.stop()
        if operator in self._extra_operators:
            self._extra_operators.remove(operator)

    @property
    def operator_pid(self) -> int:
        assert self.operator is not None
        return pid_of(self.operator)

    @property
    def postmaster_pid(self) -> int:
        return int((self.db.data_dir / "postmaster.pid").read_text().splitlines()[0])

    def pin_postgres(self) -> None:
        common.pin(self.postmaster_pid, [common.SERVER_CORE])

    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        core: int | None = common.SERVER_CORE,
    ) -> subprocess.Popen[bytes]:
        """A helper process (a floor server), pinned to `core`; stopped with the stage."""
        prefix = ["taskset", "-c", str(core)] if core is not None else []
        process = controlplane.spawn(
            [*prefix, *argv],
            log_file=self.work / "logs" / f"{name}.log",
            cwd=common.REPO,
            env={**os.environ, **(env or {})},
        )
        self._extra.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        controlplane.terminate([process])
        if process in self._extra:
            self._extra.remove(process)

    def create_database(self, name: str) -> str:
        """A second database on the same server (migrated), e.g. for a table of another size."""
        self.db.run_sql(f"CREATE DATABASE {name}", database="postgres")
        url = self.db.url_for(name)
        asyncio.run(_migrate(url))
        return url


def pid_of(operator: operator_harness.OperatorProcess) -> int:
    """The operator's pid (the benchmarks read /proc for its CPU time and memory)."""
    if operator.pid is None:
        raise RuntimeError("the operator is not running")
    return operator.pid


async def _migrate(url: str) -> None:
    cache = await store.Store.connect(url, timeout=5.0)
    try:
        await cache.migrate()
    finally:
        await cache.close()
