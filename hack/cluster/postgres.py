"""A real, throwaway PostgreSQL server for integration tests, e2e tests and `make demo`.

The store is tested against the database it runs on in production, never a look-alike (KFP's cache server tested on
SQLite and shipped on MySQL). The server is started from the distribution's binaries on a free port with its data,
socket and logs under one directory; `stop()` and `start()` again keep the port and data, so tests can stage an
outage. `initdb` refuses to run as root, which is how CI and this machine run: then the server runs as `postgres`.

    python -m hack.cluster.postgres --dir DIR      # prints the URL, runs until SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import types

from hack.cluster import ports

__all__ = ["PostgresError", "TempPostgres", "find_binaries", "main"]

USER = "stepcache"
DATABASE = "stepcache"
_SYSTEM_USER = "postgres"
_START_ATTEMPTS = 3
_CONF = """
# Added by hack/cluster/postgres.py: a disposable server, fast rather than durable.
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 32MB
log_min_messages = warning
log_connections = off
"""


class PostgresError(RuntimeError):
    """The test server could not be set up, started, stopped or queried; the message says where its logs are."""


def find_binaries() -> pathlib.Path:
    """The directory holding initdb, pg_ctl and postgres: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    candidates: list[pathlib.Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(pathlib.Path(on_path).resolve().parent)
    installed = [pathlib.Path(path) for path in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates.extend(sorted(installed, key=_major_version, reverse=True))
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise PostgresError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; "
        "install them: apt-get install postgresql"
    )


class TempPostgres:
    """One disposable server. Use as a context manager, or call `start()` / `stop()` (again and again)."""

    def __init__(self, base_dir: pathlib.Path, *, port: int | None = None, crash_safe: bool = False) -> None:
        """`crash_safe`: commits are acknowledged only once written (`synchronous_commit = on`), so a `crash()`
        loses none — what a production server promises; the default acknowledges first, and a crash loses the last
        fraction of a second of commits."""
        self.base_dir = base_dir.resolve()
        self._crash_safe = crash_safe
        self.log_path = self.base_dir / "postgres.log"
        """The server's own output (appended across restarts)."""
        self._fixed_port = port is not None
        self._port = port
        self._bin = find_binaries()
        self._as_root = os.geteuid() == 0
        self._home: pathlib.Path | None = None
        """Holds `data/` and `socket/`; `base_dir/pg` or, when the server's user cannot reach base_dir, a /tmp dir."""
        self._private_home = False
        self._frozen = False

    def __enter__(self) -> TempPostgres:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self._remove_private_home()
            atexit.unregister(self._at_exit)

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        """The URL of another database on this server (create it first, e.g. with `run_sql`)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @property
    def data_dir(self) -> pathlib.Path:
        return self._prepare_home() / "data"

    @property
    def running(self) -> bool:
        """Whether the server's postmaster is alive (a stale pid file after a crash does not count)."""
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start(self) -> None:
        """Initialise on first use, then start and wait until it accepts connections; a no-op when running."""
        self._prepare_home()
        if self.running:
            return
        # A test run that ends without stopping us (a failed fixture, a script using start() only) must not leave a
        # server behind on a shared machine.
        atexit.register(self._at_exit)
        created = self._initdb()
        for attempt in range(1, _START_ATTEMPTS + 1):
            if self._port is None:
                self._port = ports.free_port()
            try:
                options = f"-p {self._port}" + (" -c synchronous_commit=on" if self._crash_safe else "")
                self._pg_ctl("start", "-w", "-t", "60", "-o", options)
                break
            except PostgresError:
                # Another process may have taken the port between our probe and the server's bind.
                if self._fixed_port or attempt == _START_ATTEMPTS:
                    raise
                self._port = None
        if created:
            self.run_sql(f"CREATE DATABASE {DATABASE}", database="postgres")

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended); keeps the data and the port. Idempotent."""
        if not self.running:
            return
        self.thaw()
        self._pg_ctl("stop", "-w", "-t", "60", "-m", "fast")

    def crash(self) -> None:
        """Stop the server as a crash would: every server process quits at once, open sessions are cut and nothing
        is checkpointed (`pg_ctl stop -m immediate`). `start()` recovers from the log, with the same data and port;
        only a `crash_safe` server keeps every commit it acknowledged."""
        if not self.running:
            return
        self.thaw()
        self._pg_ctl("stop", "-w", "-t", "60", "-m", "immediate")

    def freeze(self) -> None:
        """SIGSTOP every server process: connections stay open but nothing answers (a hung or partitioned server)."""
        self._signal_server(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Undo `freeze()`."""
        if self._frozen:
            self._signal_server(signal.SIGCONT)
            self._frozen = False

    def run_sql(self, sql: str, *, database: str = DATABASE) -> str:
        """Run SQL through psql and return its unaligned output; raise PostgresError with psql's stderr."""
        psql = self._bin / "psql"
        if not psql.exists():
            psql = pathlib.Path(shutil.which("psql") or "psql")
        result = subprocess.run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url_for(database), "-c", sql],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise PostgresError(f"psql failed ({result.returncode}) running {sql!r}: {result.stderr.strip()}")
        return result.stdout

    def _initdb(self) -> bool:
        """Create the cluster unless it exists; True when created now."""
        data = self.data_dir
        if (data / "PG_VERSION").exists():
            return False
        data.mkdir(mode=0o700, exist_ok=True)
        socket_dir = data.parent / "socket"
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._as_root:
            _chown_to_server_user(data, socket_dir)
        self._run(
            "initdb",
            "-D",
            str(data),
            f"--username={USER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
            log=self.base_dir / "initdb.log",
        )
        # Appending keeps the file's owner (the server's user) when we are root.
        with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(_CONF.format(socket_dir=socket_dir))
        return True

    def _pg_ctl(self, *args: str) -> None:
        # Without -l, pg_ctl hands the server its own stdout: our log file, opened here so that the server's user
        # needs no access to base_dir.
        self._run("pg_ctl", "-D", str(self.data_dir), *args, log=self.log_path)

    def _run(self, tool: str, *args: str, log: pathlib.Path) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", _SYSTEM_USER, "--", *command]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        with log.open("ab") as out:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,
                env=env,
                check=False,
                timeout=180,
            )
        if result.returncode != 0:
            raise PostgresError(f"{tool} {' '.join(args)} failed ({result.returncode}); see {log}")

    def _prepare_home(self) -> pathlib.Path:
        if self._home is not None:
            return self._home
        self.base_dir.mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "pg"
        if link.is_symlink() and not link.exists():
            link.unlink()  # a private home removed earlier
        if link.exists():
            self._home = link.resolve()
        elif not self._as_root or _server_user_can_reach(self.base_dir):
            link.mkdir(parents=True)
            self._home = link
        else:
            # pytest's basetemp (/tmp/pytest-of-root) is 0700 and pytest resets it at every session start, so the
            # server's user could not reach data kept there. A symlink keeps it findable from base_dir.
            self._home = pathlib.Path(tempfile.mkdtemp(prefix="stepcache-pg-"))
            self._private_home = True
            link.symlink_to(self._home, target_is_directory=True)
        if self._as_root:
            _chown_to_server_user(self._home)
        return self._home

    def _at_exit(self) -> None:
        try:
            self.stop()
        except PostgresError as exc:
            print(f"hack.cluster.postgres: {exc}", file=sys.stderr)
        self._remove_private_home()

    def _remove_private_home(self) -> None:
        if self._private_home and self._home is not None and not self.running:
            shutil.rmtree(self._home, ignore_errors=True)
            (self.base_dir / "pg").unlink(missing_ok=True)
            self._home = None
            self._private_home = False

    def _postmaster_pid(self) -> int | None:
        if self._home is None:
            return None  # never started by this object
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _signal_server(self, signum: signal.Signals) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            raise PostgresError(f"the server is not running (no pid in {self.data_dir / 'postmaster.pid'})")
        # Every server process sits in a session of its own (PostgreSQL calls setsid in each child), so they are
        # found by parent pid rather than by process group. The postmaster goes first: it then forks no new ones.
        os.kill(pid, signum)
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)


def _major_version(bin_dir: pathlib.Path) -> int:
    name = bin_dir.parent.name
    return int(name) if name.isdigit() else 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which is parenthesised and may contain spaces: state, ppid, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _server_user_can_reach(directory: pathlib.Path) -> bool:
    _ensure_server_user()
    probe = subprocess.run(
        ["runuser", "-u", _SYSTEM_USER, "--", "test", "-x", str(directory)],
        check=False,
        capture_output=True,
    )
    return probe.returncode == 0


def _ensure_server_user() -> None:
    try:
        pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", _SYSTEM_USER], check=True, capture_output=True)


def _chown_to_server_user(*paths: pathlib.Path) -> None:
    _ensure_server_user()
    entry = pwd.getpwnam(_SYSTEM_USER)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def main(argv: list[str] | None = None) -> int:
    """Run one server until SIGTERM or SIGINT; print its URL on the first line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m hack.cluster.postgres", description=main.__doc__)
    parser.add_argument("--dir", required=True, type=pathlib.Path, help="where the data and logs live")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def request_stop(signum: int, frame: types.FrameType | None) -> None:
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    with TempPostgres(args.dir, port=args.port) as server:
        print(server.url, flush=True)
        while not stopping.wait(timeout=1.0):
            pass
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
