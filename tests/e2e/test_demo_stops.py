"""`make demo --keep` stopped by SIGTERM (a supervisor, `kill`) stops everything it started, as Ctrl-C does."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

import pytest
from hack.cluster.controlplane import wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments mention `text` (the demo's work directory)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_demo_kept_running_stops_every_process_it_started(signum: signal.Signals) -> None:
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "hack.demo", "--keep"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as demo:
        assert demo.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            wait_for(lambda: any("Press Ctrl-C to stop" in line for line in lines), 240, "the demo to keep running")
            work = next(m.group(1) for line in lines if (m := re.search(r"work directory: (\S+)", line)))
            assert processes_mentioning(work), "the demo's processes should be running before the signal"
            demo.send_signal(signum)
            assert demo.wait(timeout=60) in (0, 130)
            reader.join(timeout=10)  # the pipe is at its end once the demo has exited
        finally:
            if demo.poll() is None:
                demo.kill()
    wait_for(lambda: not processes_mentioning(work), 30, f"every process under {work} to stop")
