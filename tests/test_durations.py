"""Durations as the policy and commands write them (bot/core/durations.py): 90s, 15m,
1h, 1h30m parse and format back (round trips, hypothesis); empty, zero, more than seven
days, a missing or unknown unit and garbage are refused with a DurationError (and only
that, whatever the text) whose message shows the accepted forms."""

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.durations import MAX_DURATION, DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2h5m10s", timedelta(hours=2, minutes=5, seconds=10)),
        ("1h10s", timedelta(hours=1, seconds=10)),
        ("90m", timedelta(minutes=90)),
        ("0h30m", timedelta(minutes=30)),
        ("168h", timedelta(days=7)),
        ("167h59m60s", timedelta(days=7)),
    ],
)
def test_parse_accepts(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "30",
        "1x",
        "-5m",
        "1d",
        "1H",
        "15M",
        " 15m",
        "15m ",
        "1 h",
        "30m1h",
        "1h1h",
        "1s1m",
        "h",
        "m30",
        "1.5h",
        "+5m",
        "15m\n",
        "١٥m",
        "1h 30m",
        "5mins",
    ],
)
def test_parse_rejects_with_a_hint(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert str(info.value) == f"'{text}' is not a duration: write it like 90s, 15m, 1h or 1h30m"


def test_exact_message_for_missing_unit() -> None:
    with pytest.raises(
        DurationError, match=r"^'30' is not a duration: write it like 90s, 15m, 1h or 1h30m$"
    ):
        parse_duration("30")


def test_empty_is_rejected() -> None:
    with pytest.raises(DurationError, match="is not a duration: write it like"):
        parse_duration("")


@pytest.mark.parametrize("text", ["0m", "0s", "0h", "0h0m0s", "00m"])
def test_zero_is_rejected(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert str(info.value) == "duration must be longer than 0s: write it like 90s, 15m, 1h or 1h30m"


@pytest.mark.parametrize("text", ["168h1s", "169h", "10081m", "999999999h", "1" * 40 + "h"])
def test_over_seven_days_is_rejected(text: str) -> None:
    with pytest.raises(DurationError, match="is too long: a duration can be at most 168h"):
        parse_duration(text)


def test_duration_error_is_a_value_error() -> None:
    assert issubclass(DurationError, ValueError)


def test_long_input_is_shortened_in_the_message() -> None:
    with pytest.raises(DurationError) as info:
        parse_duration("x" * 10_000)
    assert len(str(info.value)) < 120


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(seconds=45), "45s"),
        (timedelta(hours=2), "2h"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(seconds=3601), "1h1s"),
        (timedelta(days=7), "168h"),
        (timedelta(0), "0s"),
        (timedelta(seconds=59, microseconds=999_999), "59s"),
    ],
)
def test_format(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


def test_format_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_duration(timedelta(seconds=-1))


@given(st.integers(min_value=1, max_value=int(MAX_DURATION.total_seconds())))
def test_round_trip_from_timedelta(seconds: int) -> None:
    duration = timedelta(seconds=seconds)
    assert parse_duration(format_duration(duration)) == duration


@given(
    st.one_of(st.none(), st.integers(0, 200)),
    st.one_of(st.none(), st.integers(0, 200)),
    st.one_of(st.none(), st.integers(0, 200)),
)
def test_round_trip_from_text(h: int | None, m: int | None, s: int | None) -> None:
    text = "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v is not None)
    total = sum(v * k for v, k in ((h, 3600), (m, 60), (s, 1)) if v is not None)
    if not text or total == 0 or total > MAX_DURATION.total_seconds():
        with pytest.raises(DurationError):
            parse_duration(text)
        return
    parsed = parse_duration(text)
    assert parsed == timedelta(seconds=total)
    canonical = format_duration(parsed)
    assert parse_duration(canonical) == parsed
    assert format_duration(parse_duration(canonical)) == canonical


@given(st.text())
def test_arbitrary_text_raises_only_duration_error(text: str) -> None:
    try:
        result = parse_duration(text)
    except DurationError as exc:
        assert str(exc)
    else:
        assert timedelta(0) < result <= MAX_DURATION
