"""Block Kit for what happens after the token: the review thread, its modal and
reminders (section 7.1), and the inventory of live grants (section 7.2).
Pure functions of core objects, like blocks.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..core.domain import Request
from ..core.durations import format_duration
from ..core.reviews import MAX_SUMMARY_LENGTH, ReviewState, Timeline
from .blocks import Blocks, _button, _context, _escape, _section, when, who

REVIEW = "bg_review"
REVIEW_MODAL = "bg_review_modal"
SUMMARY_BLOCK = "summary"

_WHAT = {"requested": ":large_yellow_circle: requested", "approved": ":white_check_mark: approved",
         "denied": ":no_entry: denied", "issued": ":key: issued", "revealed": ":eyes: revealed",
         "first use": ":zap: first use", "expired": ":hourglass_flowing_sand: expired",
         "revoked": ":octagonal_sign: revoked"}


def _ref(request_id: str, incident: str | None) -> str:
    return f"{request_id} ({_escape(incident)})" if incident else request_id


def _actor(actor: str | None) -> str:
    if actor is None:
        return ""
    if actor.startswith("os:"):
        return f" by operator `{_escape(actor.removeprefix('os:'))}`"
    if actor.startswith("client:"):
        return f" by relying service `{_escape(actor.removeprefix('client:'))}`"
    if actor == "membership":
        return " by the group membership check"
    if actor.startswith("policy") or actor == "breakglass":
        return " by breakglass" if actor == "breakglass" else " by a policy change"
    return f" by <@{actor}>"


def timeline(tl: Timeline, review: ReviewState | None, reviewer_label: str) -> tuple[str, Blocks]:
    """The message in the approval card's thread when a grant ends; edited when signed off."""
    lines = []
    for at, what, actor in tl.entries():
        label = _WHAT.get(what, what)
        extra = ""
        if what == "first use":
            extra = f" ({tl.uses} use(s) in all)"
        lines.append(f"{when(at)}  {label}{_actor(actor)}{extra}")
    if tl.first_use_at is None:
        lines.append("_never used_")
    text = (f"Grant {_ref(tl.request_id, tl.incident)} ended ({tl.ended}): "
            f"post-incident review {'signed off' if review and review.reviewed else 'needed'}")
    blocks: Blocks = [
        _section(f":clipboard: *Post-incident review: {_ref(tl.request_id, tl.incident)}* · "
                 f"`{tl.scope}` for <@{tl.requester}>"),
        _section("*Timeline*\n" + "\n".join(lines)),
    ]
    if review is not None and review.reviewed:
        assert review.reviewed_at is not None
        blocks.append(_section(f":memo: *Reviewed* by <@{review.reviewed_by}> "
                               f"{when(review.reviewed_at)}\n{_escape(review.summary or '')}"))
    else:
        due = f" by {when(review.due_at)}" if review is not None else ""
        blocks.append(_context(f"A member of {reviewer_label} (not <@{tl.requester}>) signs off "
                               f"the review{due}: the button, or `/breakglass review "
                               f"{tl.request_id} SUMMARY…`"))
        blocks.append({"type": "actions", "block_id": f"review:{tl.request_id}",
                       "elements": [_button("Review", REVIEW, tl.request_id, "primary")]})
    return text, blocks


def review_modal(req: Request) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": REVIEW_MODAL,
        "private_metadata": req.id,
        "title": {"type": "plain_text", "text": "Post-incident review"},
        "submit": {"type": "plain_text", "text": "Sign off"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section(f"Grant {_ref(req.id, req.incident)}: `{req.scope}` for "
                     f"<@{req.requester}>, {req.state.value}."),
            {"type": "input", "block_id": SUMMARY_BLOCK,
             "label": {"type": "plain_text", "text": "Summary"},
             "element": {"type": "plain_text_input", "action_id": "value", "multiline": True,
                         "max_length": MAX_SUMMARY_LENGTH,
                         "placeholder": {"type": "plain_text", "text":
                                         "What happened, what the access was used for, "
                                         "what follows"}}},
        ],
    }


def incident_reviewed(tl: Timeline, review: ReviewState) -> str:
    return (f":memo: *reviewed* {_ref(tl.request_id, tl.incident)}: grant of `{tl.scope}` to "
            f"<@{tl.requester}> ({tl.ended}), signed off by <@{review.reviewed_by}>: "
            f"{_escape(review.summary or '')}")


def overdue_reminder(review: ReviewState, reviewer_label: str) -> str:
    return (f":alarm_clock: The post-incident review of {review.request_id} (`{review.scope}` "
            f"for <@{review.requester}>) is overdue since {when(review.due_at)}. A member of "
            f"{reviewer_label} signs it off with the *Review* button in the card's thread or "
            f"`/breakglass review {review.request_id} SUMMARY…`")


def overdue_alert(review: ReviewState) -> str:
    """The alert's text (governance.alerts.raise_alert adds the `:rotating_light:`)."""
    return (f"post-incident review overdue: {review.request_id} (`{review.scope}` "
            f"for <@{review.requester}>) ended {when(review.ended_at)} and was due "
            f"{when(review.due_at)}")


def held(overdue_id: str, count: int) -> str:
    more = f" (and {count - 1} more)" if count > 1 else ""
    return (f"You have an overdue post-incident review: {overdue_id}{more}. New break-glass "
            "requests are held until it is signed off: ask a reviewer to sign it off "
            f"(`/breakglass review {overdue_id} SUMMARY…`).")


def inventory(grants: Sequence[Request], uses: dict[str, int], now: datetime) -> str:
    """`/breakglass tokens`: every live grant, one line each."""
    if not grants:
        return "No live grants: no break-glass token is valid right now."
    lines = [f"*Live grants* ({len(grants)})"]
    for req in grants:
        assert req.token_expires_at is not None
        left = max(req.token_expires_at - now, now - now)
        incident = f" · {_escape(req.incident)}" if req.incident else ""
        lines.append(f"• *{req.id}* `{req.scope}`{incident} · <@{req.requester}> · expires in "
                     f"{format_duration(left) if left.total_seconds() >= 1 else 'under 1s'} · "
                     f"approved by {who(req.approvals)} · {uses.get(req.id, 0)} use(s)"
                     f" · {req.state.value}")
    return "\n".join(lines)
