"""Waiting for what happens in the background (a flush, a watch event, a retry): polled with a deadline, never slept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["DEADLINE", "eventually"]

_T = TypeVar("_T")

DEADLINE = 15.0
"""Seconds to wait for something that normally takes milliseconds; generous for a machine shared with builds."""
_POLL_INTERVAL = 0.02


async def eventually(
    probe: Callable[[], Awaitable[_T]], *, until: Callable[[_T], bool] = bool, within: float = DEADLINE
) -> _T:
    """Poll `probe` until `until(result)` holds, and return that result; fail with the last one after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if until(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still {result!r} after {within}s")
        await asyncio.sleep(_POLL_INTERVAL)
