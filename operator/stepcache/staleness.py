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

__all__ = ["ANNOTATIONS", "LONGEST", "Decision", "decide", "parse"]

OURS = "stepcache.dev/max-staleness"
KFP = "pipelines.kubeflow.org/max_cache_staleness"
ANNOTATIONS = (OURS, KFP)
"""Read in this order: stepcache's own annotation wins over KFP's."""

# Years and months have no fixed length; isodate resolves them against a date, and so do we, the same way each time.
_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


LONGEST = datetime.timedelta(days=36525)
"""The longest staleness accepted: 100 years (`P100Y`, `P36525D`).

A longer value is not a real bound but a spelling of "forever", and "forever" is said by leaving the annotation out;
rejecting it (the pod runs uncached, with a warning) keeps huge numbers from ever reaching date arithmetic, where
they overflow Python's timedelta or the database's timestamps."""


@functools.lru_cache(maxsize=256)
def parse(text: str) -> datetime.timedelta:
    """Parse an ISO 8601 duration (`P7D`, `PT12H`, `P1Y2M`) into a timedelta from zero to `LONGEST`; raise ValueError.

    Every rejection is a ValueError saying why, whatever the text: out-of-range numbers included.
    Cached: pods of one pipeline repeat a handful of values, and isodate's parser showed up on the webhook's profile.
    """
    if not any(ch.isdigit() for ch in text):
        raise ValueError("not an ISO 8601 duration: no number in it")
    try:
        duration = isodate.parse_duration(text.strip())
        if isinstance(duration, isodate.Duration):
            duration = (_EPOCH + duration) - _EPOCH
    except (isodate.ISO8601Error, ValueError, TypeError, ArithmeticError) as exc:
        # isodate raises ValueError for fractional years, OverflowError for numbers past timedelta's range, and
        # adding years to a date past year 9999 is a ValueError or an OverflowError: all mean "not a staleness".
        raise ValueError(f"not an ISO 8601 duration within range: {exc}") from None
    if not isinstance(duration, datetime.timedelta):
        raise ValueError("not an ISO 8601 duration")
    if duration < datetime.timedelta(0):
        raise ValueError("a duration must not be negative")
    if duration > LONGEST:
        raise ValueError("a duration longer than 100 years (P36525D) is not a staleness; omit it for no limit")
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
