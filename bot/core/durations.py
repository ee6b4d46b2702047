"""Durations as people write them in the policy file and the slash command.

The grammar is deliberately small: hours, minutes and seconds, in that order,
each at most once, lowercase, no spaces (``90s``, ``15m``, ``1h``, ``1h30m``,
``2h5m10s``). Anything else is a :class:`DurationError` whose text tells the
user how to write it instead.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = [
    "MAX_DURATION",
    "MAX_PERIOD",
    "DurationError",
    "format_duration",
    "format_period",
    "parse_duration",
    "parse_period",
]

#: The longest duration anything in breakglass may be given.
MAX_DURATION = timedelta(days=7)

#: The longest period (how often something recurs, e.g. ``[drills] every``).
MAX_PERIOD = timedelta(days=366)

_MAX_SECONDS = int(MAX_DURATION.total_seconds())
_PERIOD_HINT = "write it like 30d, 7d, 24h or 1d12h"
_DAYS = re.compile(r"([0-9]{1,4})d(.*)", re.DOTALL)
_HINT = "write it like 90s, 15m, 1h or 1h30m"
# [0-9], not \d: \d also matches other scripts' digits. At most 9 digits per
# part keeps int() cheap; anything that long is over the limit anyway.
_DURATION = re.compile(r"(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})s)?")
_LONG_DIGITS = re.compile(r"(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+s)?")
_SHOWN_CHARS = 40


class DurationError(ValueError):
    """A duration that cannot be used; ``str()`` is a message for the user."""


def _shown(text: str) -> str:
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 1] + "…"
    return f"'{text}'"


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``15m``, ``1h``, ``1h30m``, ``2h5m10s`` into a timedelta.

    The result is always more than zero and at most :data:`MAX_DURATION`.
    """
    if not isinstance(text, str):
        raise DurationError(f"{text!r} is not a duration: {_HINT}")
    match = _DURATION.fullmatch(text)
    if match is None or not text:
        if text and _LONG_DIGITS.fullmatch(text):
            raise DurationError(
                f"{_shown(text)} is too long: a duration can be at most "
                f"{format_duration(MAX_DURATION)} (7 days)"
            )
        raise DurationError(f"{_shown(text)} is not a duration: {_HINT}")
    hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise DurationError("duration must be longer than 0s: write it like 90s, 15m, 1h or 1h30m")
    if total > _MAX_SECONDS:
        raise DurationError(
            f"{_shown(text)} is too long: a duration can be at most "
            f"{format_duration(MAX_DURATION)} (7 days)"
        )
    return timedelta(seconds=total)


def format_duration(duration: timedelta) -> str:
    """The canonical spelling of ``duration``: ``1h30m``, ``45s``, ``2h``.

    Whole seconds only (a fraction of a second is dropped); zero is ``0s``.
    For any duration that :func:`parse_duration` accepts,
    ``parse_duration(format_duration(d)) == d``.
    """
    if duration < timedelta(0):
        raise ValueError(f"cannot format a negative duration ({duration})")
    total = duration.days * 86400 + duration.seconds
    if total == 0:
        return "0s"
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if seconds:
        parts.append(f"{seconds}s")
    return "".join(parts)


def parse_period(text: str) -> timedelta:
    """How often something recurs: an optional number of days, then a duration
    (``30d``, ``7d``, ``1d12h``, ``24h``). More than zero, at most :data:`MAX_PERIOD`."""
    if not isinstance(text, str):
        raise DurationError(f"{text!r} is not a period: {_PERIOD_HINT}")
    match = _DAYS.fullmatch(text)
    days, rest = (int(match.group(1)), match.group(2)) if match else (0, text)
    if match is None and not _DURATION.fullmatch(text) or not text:
        raise DurationError(f"{_shown(text)} is not a period: {_PERIOD_HINT}")
    extra = timedelta(0)
    if rest:
        hours = _DURATION.fullmatch(rest)
        if hours is None:
            raise DurationError(f"{_shown(text)} is not a period: {_PERIOD_HINT}")
        h, m, s = (int(part) if part else 0 for part in hours.groups())
        extra = timedelta(hours=h, minutes=m, seconds=s)
    total = timedelta(days=days) + extra
    if total <= timedelta(0):
        raise DurationError(f"a period must be longer than 0s: {_PERIOD_HINT}")
    if total > MAX_PERIOD:
        raise DurationError(f"{_shown(text)} is too long: a period can be at most "
                            f"{format_period(MAX_PERIOD)}")
    return total


def format_period(period: timedelta) -> str:
    """``30d``, ``1d12h``, ``4h``: days first, then :func:`format_duration` of the rest."""
    days = period.days
    rest = period - timedelta(days=days)
    if not days:
        return format_duration(rest)
    return f"{days}d" + (format_duration(rest) if rest else "")
