"""How old a cached result may be to serve a pod: ISO 8601 durations from annotations, defaults and a cap.

`None` always means "no limit", never a sentinel number. A value that cannot be parsed is an error for the caller
to turn into an uncached run with a warning; it never means "forever".
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Mapping

import isodate

from stepcache import errors

__all__ = ["ANNOTATIONS", "Decision", "decide", "parse"]

OURS = "stepcache.dev/max-staleness"
KFP = "pipelines.kubeflow.org/max_cache_staleness"
ANNOTATIONS = (OURS, KFP)
"""Read in this order: stepcache's own annotation wins over KFP's."""

# Years and months have no fixed length; isodate resolves them against a date, and so do we, the same way each time.
_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


@functools.lru_cache(maxsize=256)
def parse(text: str) -> datetime.timedelta:
    """Parse an ISO 8601 duration (`P7D`, `PT12H`, `P1Y2M`) into a non-negative timedelta; raise ValueError.

    Cached: pods of one pipeline repeat a handful of values, and isodate's parser showed up on the webhook's profile.
    """
    if not any(ch.isdigit() for ch in text):
        raise ValueError("not an ISO 8601 duration: no number in it")
    try:
        duration = isodate.parse_duration(text.strip())
    except (isodate.ISO8601Error, ValueError, TypeError) as exc:
        raise ValueError(f"not an ISO 8601 duration: {exc}") from None
    if isinstance(duration, isodate.Duration):
        duration = (_EPOCH + duration) - _EPOCH
    if not isinstance(duration, datetime.timedelta):
        raise ValueError("not an ISO 8601 duration")
    if duration < datetime.timedelta(0):
        raise ValueError("a duration must not be negative")
    return duration


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision:
    """The effective staleness for one pod."""

    max_age: datetime.timedelta | None
    """The oldest entry that may serve the pod; None: no limit."""
    source: str | None
    """The annotation it came from, or None for the defaults."""

    @property
    def may_reuse(self) -> bool:
        """`P0D` (or a zero cap) means: always run, still record."""
        return self.max_age is None or self.max_age > datetime.timedelta(0)


def decide(
    annotations: Mapping[str, str],
    *,
    default: datetime.timedelta | None,
    cap: datetime.timedelta | None,
) -> Decision:
    """Pick the pod's max age from its annotations, else the default, then apply the cap.

    Raises `InvalidAnnotation` naming the annotation when its value is not a duration.
    """
    for name in ANNOTATIONS:
        raw = annotations.get(name)
        if raw is None:
            continue
        try:
            wanted: datetime.timedelta | None = parse(raw)
        except ValueError as exc:
            raise errors.InvalidAnnotation(name, raw, str(exc)) from None
        return Decision(max_age=_capped(wanted, cap), source=name)
    return Decision(max_age=_capped(default, cap), source=None)


def _capped(wanted: datetime.timedelta | None, cap: datetime.timedelta | None) -> datetime.timedelta | None:
    if cap is None:
        return wanted
    if wanted is None:
        return cap
    return min(wanted, cap)
