"""Alert rules (contract §7.5), as pure functions of counts and times.

The use cases count (requests today, uses this minute, refusals this hour) and ask
these rules whether the count calls for an alert; `bot/governance/alerts.py` raises
it (incident post starting with `ALERT_PREFIX`, audit row `alert`, and through the
audit log a webhook `alert` event).

Drills count for no threshold: a caller passes `drill=True` (or leaves drills out of
its counts) and no rule fires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

ALERT_PREFIX = ":rotating_light:"
ACTOR = "breakglass"  # the audit actor of an alert

# The kinds of alert, as written in the `alert` audit row's details ("kind").
REQUESTS_PER_DAY = "max_requests_per_day"
QUIET_HOURS = "quiet_hours"
USES_PER_MINUTE = "max_uses_per_minute"
REFUSALS_PER_HOUR = "refusals_per_hour"
KEY_ROTATED = "key_rotated"
MASTER_KEY_ROTATED = "master_key_rotated"
RELOAD_REFUSED = "reload_refused"
REVIEW_OVERDUE = "review_overdue"
CHECKPOINT_MISMATCH = "checkpoint_mismatch"

KINDS = frozenset({REQUESTS_PER_DAY, QUIET_HOURS, USES_PER_MINUTE, REFUSALS_PER_HOUR,
                   KEY_ROTATED, MASTER_KEY_ROTATED, RELOAD_REFUSED, REVIEW_OVERDUE,
                   CHECKPOINT_MISMATCH})

DAY = timedelta(hours=24)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
# Refusals beyond the hourly threshold are summarised at most this often.
SUMMARY_EVERY = timedelta(minutes=1)
# Without `[alerts] refusals_per_hour`, refusals past this many an hour are still
# summarised rather than posted one by one (a flood must not delay real events), but
# no alert is raised.
DEFAULT_REFUSALS_PER_HOUR = 5

_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


class QuietHoursError(ValueError):
    pass


@dataclass(frozen=True)
class QuietHours:
    """A daily window in UTC, `start` inclusive, `end` exclusive; may wrap midnight."""

    start: time
    end: time

    def contains(self, at: datetime) -> bool:
        if at.tzinfo is None:
            raise ValueError("quiet hours need a timezone-aware time")
        t = at.astimezone(UTC).time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_quiet_hours(text: str) -> QuietHours:
    """"22:00-06:00" (UTC, 24-hour clock) -> QuietHours."""
    parts = text.split("-")
    if len(parts) != 2:
        raise QuietHoursError(f"'{text}' is not a time range: write it like \"22:00-06:00\" (UTC)")
    times = []
    for part in parts:
        m = _HHMM.fullmatch(part.strip())
        if m is None:
            raise QuietHoursError(f"'{part.strip()}' is not a time: write HH:MM on a 24-hour "
                                  "clock, like \"22:00-06:00\" (UTC)")
        times.append(time(int(m.group(1)), int(m.group(2))))
    if times[0] == times[1]:
        raise QuietHoursError(f"'{text}' starts and ends at the same time: the window is empty")
    return QuietHours(times[0], times[1])


# --------------------------------------------------------------------------- the rules


def over_requests_per_day(requests_today: int, limit: int | None, *, drill: bool = False) -> bool:
    """`requests_today` counts this request. Each request past the limit alerts."""
    return limit is not None and not drill and requests_today > limit


def in_quiet_hours(at: datetime, window: QuietHours | None, *, drill: bool = False) -> bool:
    return window is not None and not drill and window.contains(at)


def over_uses_per_minute(before: int, after: int, limit: int | None) -> bool:
    """A token's uses in one minute went from `before` to `after`: alert once, when the
    count first passes the limit in that minute."""
    return limit is not None and before <= limit < after


@dataclass(frozen=True)
class RefusalVerdict:
    """What to do with one refusal, given the person's refusals in the last hour.

    `individually`: audit it and post it as before (within the threshold, or the one
    that crosses it); `alert`: this is the refusal that crosses the threshold;
    otherwise it is counted and summarised (at most once a `SUMMARY_EVERY`).
    """

    individually: bool
    alert: bool


def judge_refusal(in_last_hour: int, threshold: int | None, *, drill: bool = False
                  ) -> RefusalVerdict:
    """`in_last_hour` counts this refusal. `threshold` is `[alerts] refusals_per_hour`
    (None: not set; refusals are still summarised past DEFAULT_REFUSALS_PER_HOUR)."""
    limit = threshold if threshold is not None else DEFAULT_REFUSALS_PER_HOUR
    if in_last_hour <= limit:
        return RefusalVerdict(individually=True, alert=False)
    if in_last_hour == limit + 1:
        return RefusalVerdict(individually=True, alert=threshold is not None and not drill)
    return RefusalVerdict(individually=False, alert=False)


def post_text(text: str) -> str:
    """An alert's incident-channel post: `text` (mrkdwn, escaped by the caller) after the prefix."""
    return f"{ALERT_PREFIX} *Alert:* {text}"


def summary_due(last_summary: datetime | None, now: datetime) -> bool:
    return last_summary is None or now - last_summary >= SUMMARY_EVERY


__all__ = [
    "ACTOR", "ALERT_PREFIX", "DEFAULT_REFUSALS_PER_HOUR", "KINDS", "QuietHours", "QuietHoursError",
    "RefusalVerdict", "in_quiet_hours", "judge_refusal", "over_requests_per_day",
    "over_uses_per_minute", "parse_quiet_hours", "post_text", "summary_due",
]
