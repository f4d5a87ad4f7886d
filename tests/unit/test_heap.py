"""Returning freed memory to the system: what RSS the process shows after a burst is over."""

from __future__ import annotations

import gc
import os

from stepcache import heap


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_trim_gives_the_pages_freed_in_the_middle_of_the_heap_back() -> None:
    # Buffers below glibc's mmap threshold come from its heap; keeping every tenth leaves the freed ones as holes
    # that glibc itself never returns (only the heap's top is trimmed by itself).
    buffers = [bytearray(64 * 1024) for _ in range(2_000)]  # 128 MiB, each page touched
    kept = buffers[::10]
    del buffers
    gc.collect()
    before = rss_bytes()

    assert heap.trim()

    assert before - rss_bytes() > 64 * 1024 * 1024
    assert len(kept) == 200
