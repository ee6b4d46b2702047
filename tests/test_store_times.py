"""bot/store/times.aware: the one reader of naive database datetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from bot.store.times import aware


def test_a_naive_datetime_is_taken_as_utc():
    assert aware(datetime(2026, 12, 1, 1, 2, 3, 456789)) == datetime(2026, 12, 1, 1, 2, 3, 456789, tzinfo=UTC)
    assert aware(datetime(2026, 12, 1, 1, 2, 3)).tzinfo is UTC


def test_an_aware_datetime_is_kept_as_it_is():
    plus_two = datetime(2026, 12, 1, 3, 0, tzinfo=timezone(timedelta(hours=2)))
    assert aware(plus_two) is plus_two
    assert aware(plus_two) == datetime(2026, 12, 1, 1, 0, tzinfo=UTC)


def test_iso_text_from_raw_sql_is_parsed():
    # SQLite's DateTime text, as stored by the dialect (space separator, microseconds).
    assert aware("2026-12-01 01:02:03.000004") == datetime(2026, 12, 1, 1, 2, 3, 4, tzinfo=UTC)
    assert aware("2026-12-01T01:02:03+01:00") == datetime(2026, 12, 1, 0, 2, 3, tzinfo=UTC)


def test_none_stays_none():
    assert aware(None) is None
