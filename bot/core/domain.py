"""A break-glass request and the states it moves through.

    pending ──quorum──▶ issued ──reveal/DM──▶ revealed
       │                  │                      │
       ├─deny─▶ denied     ├─revoke─▶ revoked ◀───┤
       ├─timeout─▶ expired └─ttl────▶ expired ◀───┘
       └─cancel─▶ cancelled
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum


class State(StrEnum):
    PENDING = "pending"
    ISSUED = "issued"  # approved, token claims fixed; the token text is not yet out
    REVEALED = "revealed"  # the token text went to the requester (once)
    DENIED = "denied"
    EXPIRED = "expired"
    REVOKED = "revoked"
    CANCELLED = "cancelled"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.ISSUED, State.DENIED, State.EXPIRED, State.CANCELLED}),
    State.ISSUED: frozenset({State.REVEALED, State.EXPIRED, State.REVOKED}),
    State.REVEALED: frozenset({State.EXPIRED, State.REVOKED}),
}

TOKEN_STATES = frozenset({State.ISSUED, State.REVEALED})
FINAL_STATES = frozenset({State.DENIED, State.EXPIRED, State.REVOKED, State.CANCELLED})


def can_move(src: State, dst: State) -> bool:
    return dst in TRANSITIONS.get(src, frozenset())


@dataclass(frozen=True)
class TriggerResult:
    name: str
    description: str
    holds: bool
    detail: str  # "HTTP 503", "connection refused", "timed out after 2s"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "holds": self.holds,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TriggerResult:
        return cls(str(d["name"]), str(d["description"]), bool(d["holds"]), str(d["detail"]))


@dataclass(frozen=True)
class Request:
    id: str
    scope: str
    requester: str
    reason: str
    incident: str | None
    requested_ttl: timedelta
    ttl: timedelta
    state: State
    created_at: datetime
    expires_at: datetime
    triggers: tuple[TriggerResult, ...] = ()
    approvals: tuple[str, ...] = ()
    denied_by: str | None = None
    closed_at: datetime | None = None
    closed_by: str | None = None
    jti: str | None = None
    kid: str | None = None
    issued_at: datetime | None = None
    token_expires_at: datetime | None = None
    revealed_at: datetime | None = None
    drill: bool = False  # a rehearsal: its token is for no relying service
    command_at: datetime | None = None  # when the command reached the bot (None: not known)
    escalated_at: datetime | None = None  # the escalation reminder went out
    warned_at: datetime | None = None  # the expiry warning went out
    # The requester's overdue post-incident reviews when this request was made (the card
    # warns about them; section 7.1).
    overdue_reviews: tuple[str, ...] = ()
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def is_pending(self) -> bool:
        return self.state is State.PENDING

    @property
    def has_token(self) -> bool:
        return self.state in TOKEN_STATES

    @property
    def ends_at(self) -> datetime:
        """When this stops mattering: the token's end, or the request's deadline."""
        if self.token_expires_at is not None:
            return self.token_expires_at
        return self.expires_at
