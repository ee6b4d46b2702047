"""Datetimes read back from the database, made timezone-aware.

SQLite (and a PostgreSQL `timestamp without time zone`) hands back naive
datetimes, and raw SQL may hand back ISO text; the bot writes UTC, so a naive
value is UTC. One helper for every reader, so no module keeps its own copy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def aware(value: None) -> None: ...
@overload
def aware(value: datetime | str) -> datetime: ...
@overload
def aware(value: datetime | str | None) -> datetime | None: ...


def aware(value: datetime | str | None) -> datetime | None:
    """``value`` as an aware datetime: ISO text parsed, naive taken as UTC, None kept."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
