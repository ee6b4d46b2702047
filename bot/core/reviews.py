"""Post-incident reviews (contract section 7.1): the pure rules.

Every grant that ends (expired or revoked) needs a review signed off by a
member of the reviewer groups other than the grant's requester, with a
non-empty summary. A review not signed off within ``due_after`` of the end is
overdue. Drills need none.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from bot.core.domain import Request, State
from bot.core.errors import Refusal

MAX_SUMMARY_LENGTH = 3000  # one Slack section block holds 3,000 characters


def needs_review(req: Request) -> bool:
    """A grant that ended after a token was issued, unless it was a drill."""
    ended = req.state in (State.EXPIRED, State.REVOKED)
    return ended and req.issued_at is not None and not is_drill(req)


def is_drill(req: Request) -> bool:
    """Drills (contract section 7.4) carry a ``drill`` flag; they need no review."""
    return req.drill


@dataclass(frozen=True)
class ReviewState:
    """One row of the reviews table, as the rules need it."""

    request_id: str
    requester: str
    scope: str
    ended_at: datetime
    due_at: datetime
    reviewed_at: datetime | None = None
    reviewed_by: str | None = None
    summary: str | None = None
    reminded_at: datetime | None = None
    alerted_at: datetime | None = None

    @property
    def reviewed(self) -> bool:
        return self.reviewed_at is not None


def due_at(ended_at: datetime, due_after: timedelta) -> datetime:
    return ended_at + due_after


def is_overdue(review: ReviewState, now: datetime) -> bool:
    return not review.reviewed and review.due_at <= now


def reminder_due(review: ReviewState, now: datetime, remind_every: timedelta | None) -> bool:
    """An overdue review is reminded about when it becomes overdue, then every
    ``remind_every`` (never again when that is unset)."""
    if not is_overdue(review, now):
        return False
    if review.reminded_at is None:
        return True
    return remind_every is not None and now - review.reminded_at >= remind_every


def clean_summary(text: str) -> str:
    """The summary as stored: stripped; inner line breaks kept."""
    return text.strip()


def judge_sign_off(review: ReviewState | None, req: Request, user: str,
                   reviewers: Collection[str], reviewer_label: str, summary: str) -> None:
    """Raise the Refusal that says why ``user`` may not sign off this review now."""
    if review is None:
        if req.state in (State.ISSUED, State.REVEALED):
            raise Refusal("grant_live", f"The grant {req.id} is still live: a review is for a "
                          "grant that has ended. Revoke it first, or wait until it expires.")
        if is_drill(req):
            raise Refusal("drill_no_review", f"{req.id} was a drill: drills need no review.")
        raise Refusal("no_review", f"{req.id} is {req.state.value} and never issued a token: "
                      "there is nothing to review.")
    if review.reviewed:
        raise Refusal("already_reviewed", f"The review of {req.id} was already signed off by "
                      f"<@{review.reviewed_by}>.")
    if user == review.requester:
        raise Refusal("requester_cannot_review", f"You requested {req.id}, so someone else "
                      f"must review it: a member of {reviewer_label}.")
    if user not in reviewers:
        raise Refusal("not_a_reviewer", f"Only a member of {reviewer_label} may sign off the "
                      f"review of {req.id}.")
    text = clean_summary(summary)
    if not text:
        raise Refusal("missing_summary", "A review needs a summary: what happened, what the "
                      f"access was used for, what follows. `/breakglass review {req.id} "
                      "SUMMARY…`")
    if len(text) > MAX_SUMMARY_LENGTH:
        raise Refusal("summary_too_long", f"The summary is {len(text)} characters long; keep "
                      f"it to {MAX_SUMMARY_LENGTH} or fewer and link to the full write-up.")


@dataclass(frozen=True)
class Timeline:
    """What happened to one grant, each with its time (for the review thread)."""

    request_id: str
    scope: str
    requester: str
    incident: str | None
    requested_at: datetime
    decisions: tuple[tuple[str, str, datetime], ...]  # (user, approve|deny, at)
    issued_at: datetime | None
    revealed_at: datetime | None
    first_use_at: datetime | None
    uses: int
    ended: str  # expired | revoked
    ended_at: datetime | None
    ended_by: str | None

    def entries(self) -> list[tuple[datetime, str, str | None]]:
        """(time, what, who) in the order they happened; who is a user ID or None."""
        out: list[tuple[datetime, str, str | None]] = [
            (self.requested_at, "requested", self.requester)]
        for user, decision, at in self.decisions:
            out.append((at, "approved" if decision == "approve" else "denied", user))
        if self.issued_at is not None:
            out.append((self.issued_at, "issued", None))
        if self.revealed_at is not None:
            out.append((self.revealed_at, "revealed", self.requester))
        if self.first_use_at is not None:
            out.append((self.first_use_at, "first use", None))
        if self.ended_at is not None:
            out.append((self.ended_at, self.ended, self.ended_by))
        return sorted(out, key=lambda e: e[0])
