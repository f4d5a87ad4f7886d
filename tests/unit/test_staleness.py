"""Staleness: ISO 8601 durations, our annotation over KFP's, the cap, and no "forever" for bad input."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepcache import errors, staleness

DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("P7D", 7 * DAY),
        ("PT12H", datetime.timedelta(hours=12)),
        ("PT90M", datetime.timedelta(minutes=90)),
        ("P0D", datetime.timedelta(0)),
        ("P1W", 7 * DAY),
        ("P1Y", 366 * DAY),  # resolved against 2000-01-01, a leap year, the same way every time
        ("P1M", 31 * DAY),
        ("P100Y", 36525 * DAY),  # the longest accepted
        ("P36525D", 36525 * DAY),
    ],
)
def test_durations_parse(text: str, expected: datetime.timedelta) -> None:
    assert staleness.parse(text) == expected


@pytest.mark.parametrize("text", ["", "7d", "forever", "-P1D", "P", "PT"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        staleness.parse(text)


def test_stepcache_annotation_wins_over_kfp() -> None:
    decision = staleness.decide({staleness.OURS: "P1D", staleness.KFP: "P9D"}, default=None, cap=None)
    assert decision.max_age == DAY
    assert decision.source == staleness.OURS


def test_kfp_annotation_is_honoured() -> None:
    decision = staleness.decide({staleness.KFP: "P2D"}, default=None, cap=None)
    assert decision.max_age == 2 * DAY
    assert decision.source == staleness.KFP


def test_default_applies_without_annotation_and_cap_bounds_everything() -> None:
    assert staleness.decide({}, default=3 * DAY, cap=None).max_age == 3 * DAY
    assert staleness.decide({}, default=None, cap=30 * DAY).max_age == 30 * DAY
    assert staleness.decide({staleness.OURS: "P90D"}, default=None, cap=30 * DAY).max_age == 30 * DAY
    assert staleness.decide({}, default=None, cap=None).max_age is None


def test_p0d_never_reuses() -> None:
    decision = staleness.decide({staleness.OURS: "P0D"}, default=None, cap=None)
    assert decision.max_age == datetime.timedelta(0)
    assert not decision.may_reuse
    assert staleness.decide({}, default=None, cap=None).may_reuse


def test_an_unparsable_annotation_is_an_error_naming_it_never_forever() -> None:
    with pytest.raises(errors.InvalidAnnotation) as caught:
        staleness.decide({staleness.KFP: "one week"}, default=None, cap=None)
    assert caught.value.name == staleness.KFP
    assert caught.value.value == "one week"


@pytest.mark.parametrize(
    "text",
    ["P99999999999D", "P8000Y", "P9999Y", "P36526D", "P101Y", "P999999999D", "PT99999999999999999999H", "P1.5Y"],
)
def test_out_of_range_durations_are_rejected_with_a_reason_never_an_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="duration") as caught:
        staleness.parse(text)
    assert type(caught.value) is ValueError


@pytest.mark.parametrize("name", staleness.ANNOTATIONS)
@pytest.mark.parametrize("text", ["P99999999999D", "P8000Y"])
def test_an_out_of_range_annotation_is_an_invalid_annotation_naming_it(name: str, text: str) -> None:
    with pytest.raises(errors.InvalidAnnotation) as caught:
        staleness.decide({name: text}, default=None, cap=datetime.timedelta(days=30))
    assert caught.value.name == name
    assert caught.value.value == text


@settings(max_examples=500, deadline=None, database=None)
@given(
    st.text()
    | st.from_regex(r"\AP(\d{1,14}[YMWD]){0,3}(T(\d{1,14}(\.\d{1,3})?[HMS]){1,3})?\Z")
    | st.builds("P{}D".format, st.integers(min_value=-(10**15), max_value=10**15))
)
def test_any_text_parses_to_a_duration_in_range_or_is_rejected_with_a_value_error(text: str) -> None:
    try:
        parsed = staleness.parse(text)
    except ValueError:
        return
    assert datetime.timedelta(0) <= parsed <= staleness.LONGEST
