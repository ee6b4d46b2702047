"""Block Kit builders: what each person sees. Pure functions of domain objects."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from ..core.domain import Request, State, TriggerResult
from ..core.durations import format_duration
from ..core.quorum import Tally

Blocks = list[dict[str, Any]]

APPROVE, DENY, REVEAL, REVOKE = "bg_approve", "bg_deny", "bg_reveal", "bg_revoke"
REQUEST_MODAL = "bg_request_modal"


def when(at: datetime) -> str:
    """A time Slack shows in each reader's time zone, with a UTC fallback."""
    fallback = at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<!date^{int(at.timestamp())}^{{date_short_pretty}} {{time_secs}}|{fallback}>"


def who(users: Sequence[str]) -> str:
    return ", ".join(f"<@{u}>" for u in users) or "nobody"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def _button(text: str, action_id: str, value: str, style: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": text},
                         "action_id": action_id, "value": value}
    if style:
        b["style"] = style
    return b


def escape(text: str) -> str:
    """User-supplied text (a reason, an incident reference, a scope or ID as typed) made
    inert in mrkdwn: `<!channel>`, `<@U…>` and links show as typed, pinging nobody."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_escape = escape


def trigger_lines(results: Sequence[TriggerResult]) -> str:
    if not results:
        return "_no trigger conditions_"
    return "\n".join(
        f"{'✅' if r.holds else '❌'} *{r.name}*: {_escape(r.description)} ({_escape(r.detail)})"
        for r in results
    )


DRILL = "DRILL"
_DRILL_NOTE = ("*DRILL*: a rehearsal. Decide as you would for real; its token is for "
               "the audience `breakglass-drill`, which no service accepts.")


def tag(req: Request, text: str) -> str:
    """`text`, marked as a drill's when `req` is one (every message about a drill is)."""
    return f"{DRILL} {text}" if req.drill else text


def card(req: Request, permissions: Sequence[str], tally: Tally, approver_label: str) -> Blocks:
    """The approval card in the reviewer channel."""
    incident = f" · *{_escape(req.incident)}*" if req.incident else ""
    title = f"Break-glass request {req.id}"
    blocks: Blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": tag(req, title)}},
        *([_context(f":performing_arts: {_DRILL_NOTE}")] if req.drill else []),
        _section(
            f"*Requester:* <@{req.requester}>\n*Scope:* `{req.scope}`{incident}\n"
            f"*Permissions:* {', '.join(f'`{p}`' for p in permissions)}\n"
            f"*Duration:* {format_duration(req.ttl)}\n*Reason:* {_escape(req.reason)}"
        ),
        _section(f"*Trigger conditions*\n{trigger_lines(req.triggers)}"),
        _context(card_status(req, tally, approver_label)),
    ]
    if req.overdue_reviews:
        blocks.insert(3, _context(
            f":warning: <@{req.requester}> has {len(req.overdue_reviews)} overdue "
            f"post-incident review(s): {', '.join(req.overdue_reviews)}"))
    if req.state is State.PENDING:
        blocks.append({
            "type": "actions", "block_id": f"decide:{req.id}",
            "elements": [_button("Approve", APPROVE, req.id, "primary"),
                         _button("Deny", DENY, req.id, "danger")],
        })
    return blocks


def card_status(req: Request, tally: Tally, approver_label: str) -> str:
    s = req.state
    if s is State.PENDING:
        got = f"approved by {who(tally.approvals)}; " if tally.approvals else ""
        escalated = (f" (escalated {when(req.escalated_at)})"
                     if req.escalated_at is not None else "")
        return (f":hourglass: {got}needs {tally.missing} more approval(s) from {approver_label} "
                f"by {when(req.expires_at)}{escalated}")
    if s in (State.ISSUED, State.REVEALED):
        assert req.token_expires_at is not None
        return (f":white_check_mark: Approved by {who(req.approvals)}. Token issued to "
                f"<@{req.requester}>, valid until {when(req.token_expires_at)}")
    if s is State.DENIED:
        return f":no_entry: Denied by <@{req.denied_by or req.closed_by}>"
    if s is State.CANCELLED:
        return f":leftwards_arrow_with_hook: Cancelled by <@{req.closed_by}>"
    if s is State.REVOKED:
        return (f":octagonal_sign: Approved by {who(req.approvals)}; token revoked by "
                f"{_actor(req.closed_by)} at {when(req.closed_at or req.created_at)}")
    if req.issued_at is not None:
        return f":hourglass_flowing_sand: Approved by {who(req.approvals)}; token expired"
    return ":hourglass_flowing_sand: Expired without enough approvals"


def card_text(req: Request) -> str:
    return tag(req, f"Break-glass request {req.id}: <@{req.requester}> asks for {req.scope} "
                    f"({req.state})")


def _drill_dm_note(req: Request) -> Blocks:
    return [_context(":performing_arts: *DRILL*: this token is for the audience "
                     "`breakglass-drill`; no service accepts it.")] if req.drill else []


def ask_again(req: Request) -> str:
    """How to ask again for the same access: there is no extension without approval."""
    if req.drill:
        return f"`/breakglass drill {req.scope}`"
    return (f"`/breakglass {req.scope} DURATION {_escape(req.incident or 'INC-…')} "
            "what is still broken`")


def expiry_warning(req: Request) -> str:
    assert req.token_expires_at is not None
    return (f":alarm_clock: This token expires {when(req.token_expires_at)}. It cannot be "
            f"extended: if you still need access, ask again with {ask_again(req)} "
            "(approvers decide again).")


def _warning(req: Request) -> Blocks:
    return [_section(expiry_warning(req))] if req.warned_at is not None else []


def dm_reveal(req: Request) -> Blocks:
    assert req.token_expires_at is not None
    return [
        _section(tag(req,
            f":key: Your break-glass access to `{req.scope}` ({req.id}) was approved by "
            f"{who(req.approvals)}. It is valid until {when(req.token_expires_at)}.\n"
            "The token can be shown *once*: reveal it when you are ready to use it."
        )),
        *_drill_dm_note(req),
        *_warning(req),
        {"type": "actions", "block_id": f"token:{req.id}",
         "elements": [_button("Reveal token", REVEAL, req.id, "primary"),
                      _button("Revoke", REVOKE, req.id, "danger")]},
    ]


def dm_revealed(req: Request) -> Blocks:
    assert req.token_expires_at is not None
    return [
        _section(tag(req, f":key: Token for `{req.scope}` ({req.id}) was revealed; it is valid "
                 f"until {when(req.token_expires_at)}. It cannot be shown again.")),
        *_drill_dm_note(req),
        *_warning(req),
        {"type": "actions", "block_id": f"token:{req.id}",
         "elements": [_button("Revoke", REVOKE, req.id, "danger")]},
    ]


def dm_warning_text(req: Request) -> str:
    """The notification text of a DM edited (or sent) to warn of the expiry."""
    assert req.token_expires_at is not None
    return tag(req, f"Your break-glass token for {req.scope} ({req.id}) expires at "
                    f"{req.token_expires_at:%H:%M:%S UTC}; it cannot be extended.")


def dm_warning_message(req: Request) -> Blocks:
    """`delivery = "message"`: the warning is a new DM (editing the old one would take the
    token text away while it is still valid)."""
    return [_section(tag(req, f":alarm_clock: Break-glass token for `{req.scope}` ({req.id}): "
                              + expiry_warning(req).removeprefix(":alarm_clock: ")))]


def dm_denied(req: Request, user: str) -> str:
    return tag(req, f"Your break-glass request {req.id} for {req.scope} was denied by <@{user}>.")


def dm_request_expired(req: Request) -> str:
    return tag(req, f"Your break-glass request {req.id} for {req.scope} expired without enough "
                    f"approvals. To try again: {ask_again(req)}.")


def dm_token_message(req: Request, token: str) -> tuple[str, Blocks]:
    """`delivery = "message"`: the token in the DM itself, edited away when it dies."""
    assert req.token_expires_at is not None
    text = tag(req, f"Break-glass token for {req.scope} ({req.id}), valid until "
                    f"{req.token_expires_at:%H:%M:%S UTC}:\n{token}")
    blocks: Blocks = [
        _section(tag(req, f":key: Break-glass token for `{req.scope}` ({req.id}), approved by "
                 f"{who(req.approvals)}, valid until {when(req.token_expires_at)}:")),
        *_drill_dm_note(req),
        _section(f"```{token}```"),
        _context("This message is edited to remove the token when it expires or is revoked."),
        {"type": "actions", "block_id": f"token:{req.id}",
         "elements": [_button("Revoke", REVOKE, req.id, "danger")]},
    ]
    return text, blocks


def dm_closed(req: Request, why: str | None = None) -> tuple[str, Blocks]:
    what = "revoked" if req.state is State.REVOKED else "expired"
    by = f" by {_actor(req.closed_by)}" if req.state is State.REVOKED and req.closed_by else ""
    because = f" ({_escape(why)})" if why else ""
    text = tag(req, f"Your break-glass token for {req.scope} ({req.id}) {what}{by}{because}. "
                    "The token was removed.")
    return text, [_section(f":lock: {text}")]


def token_modal(req: Request, token: str) -> dict[str, Any]:
    assert req.token_expires_at is not None
    return {
        "type": "modal",
        "title": {"type": "plain_text", "text": "Break-glass token"},
        "close": {"type": "plain_text", "text": "Done"},
        "blocks": [
            _section(tag(req, f"Token for `{req.scope}` ({req.id}), valid until "
                     f"{when(req.token_expires_at)}:")),
            *_drill_dm_note(req),
            _section(f"```{token}```"),
            _context("Copy it now. Closing this window removes it and it cannot be shown again."),
        ],
    }


def request_modal(scopes: Sequence[tuple[str, str]], default_duration: str, *,
                  response_url: str = "") -> dict[str, Any]:
    """The request form; `response_url` (the command's) comes back with the submission."""
    options = [{"text": {"type": "plain_text", "text": name[:75]},
                "description": {"type": "plain_text", "text": desc[:75] or name[:75]},
                "value": name} for name, desc in scopes]
    return {
        "type": "modal",
        "callback_id": REQUEST_MODAL,
        "private_metadata": response_url[:3000],
        "title": {"type": "plain_text", "text": "Break-glass access"},
        "submit": {"type": "plain_text", "text": "Request"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {"type": "input", "block_id": "scope", "label": {"type": "plain_text", "text": "Scope"},
             "element": {"type": "static_select", "action_id": "value", "options": options}},
            {"type": "input", "block_id": "duration",
             "label": {"type": "plain_text", "text": "Duration (e.g. 30m, 1h)"},
             "element": {"type": "plain_text_input", "action_id": "value",
                         "initial_value": default_duration}},
            {"type": "input", "block_id": "reason",
             "label": {"type": "plain_text", "text": "Reason (start with the incident, e.g. INC-4521)"},
             "element": {"type": "plain_text_input", "action_id": "value", "multiline": True}},
        ],
    }


# Incident channel lines. Each says who, what scope, which request, when it ends.

def incident_requested(req: Request, tally: Tally) -> str:
    return tag(req, f":large_yellow_circle: *requested* {_ref(req)}: <@{req.requester}> asks for "
            f"`{req.scope}` for {format_duration(req.ttl)}; needs {tally.quorum} approval(s) "
            f"by {when(req.expires_at)}. Reason: {_escape(req.reason)}")


def incident_refused(requester: str, scope: str, incident: str | None, why: str) -> str:
    inc = f" ({_escape(incident)})" if incident else ""
    return f":no_entry_sign: *refused*{inc}: <@{requester}> asked for `{scope}`: {why}"


def incident_issued(req: Request) -> str:
    assert req.token_expires_at is not None
    return tag(req, f":key: *issued* {_ref(req)}: token for `{req.scope}` to <@{req.requester}>, "
            f"approved by {who(req.approvals)}; ends {when(req.token_expires_at)}")


def incident_denied(req: Request) -> str:
    return tag(req, f":no_entry: *denied* {_ref(req)}: `{req.scope}` for <@{req.requester}> by "
                    f"<@{req.denied_by}>")


def incident_cancelled(req: Request) -> str:
    return tag(req, f":leftwards_arrow_with_hook: *cancelled* {_ref(req)}: `{req.scope}` "
            f"by {_actor(req.closed_by)}")


def incident_revoked(req: Request) -> str:
    return tag(req, f":octagonal_sign: *revoked* {_ref(req)}: token for `{req.scope}` of "
            f"<@{req.requester}> by {_actor(req.closed_by)}; "
            f"it ended {when(req.closed_at or req.created_at)}")


def incident_expired(req: Request) -> str:
    if req.issued_at is None:
        return tag(req, f":hourglass_flowing_sand: *expired* {_ref(req)}: `{req.scope}` for "
                f"<@{req.requester}> got {len(req.approvals)} approval(s), not enough, "
                f"by {when(req.expires_at)}")
    assert req.token_expires_at is not None
    return tag(req, f":hourglass_flowing_sand: *expired* {_ref(req)}: token for `{req.scope}` of "
            f"<@{req.requester}> ended {when(req.token_expires_at)}")


def incident_used(req: Request, client_id: str, count: int, first: bool) -> str:
    assert req.token_expires_at is not None
    if first:
        return tag(req, f":eyes: *used* {_ref(req)}: token for `{req.scope}` of <@{req.requester}> "
                f"first used by `{client_id}`; ends {when(req.token_expires_at)}")
    return tag(req, f":eyes: *used* {_ref(req)}: token for `{req.scope}` of <@{req.requester}> used "
            f"{count} more time(s), last by `{client_id}`; ends {when(req.token_expires_at)}")


def reminder(req: Request, tally: Tally, mentions: str, fallback: str = "") -> str:
    """The escalation reminder, in the card's thread. `mentions` names the approver groups
    (`<!subteam^ID>` for Slack user groups); `fallback` the fallback groups, if any."""
    more = (f" From now on {fallback} count too." if fallback else "")
    return tag(req, f":rotating_light: {req.id} from <@{req.requester}> for `{req.scope}` still "
                    f"needs {tally.missing} approval(s) from {mentions}; it closes "
                    f"{when(req.expires_at)}.{more}")


def fallback_dm(req: Request, tally: Tally, fallback: str) -> str:
    """To each fallback approver at escalation; the outbox appends the card's permalink."""
    return tag(req, f":rotating_light: Break-glass request {req.id} from <@{req.requester}> "
                    f"for `{req.scope}` still needs {tally.missing} approval(s) and was "
                    f"escalated: as a member of {fallback} your Approve or Deny now counts. "
                    f"It closes {when(req.expires_at)}. Reason: {_escape(req.reason)}")


def requester_escalated(req: Request, tally: Tally, groups: str, fallback: str) -> str:
    asked = f"; {fallback} were asked too" if fallback else ""
    return tag(req, f":rotating_light: Your request {req.id} for `{req.scope}` still needs "
                    f"{tally.missing} approval(s): {groups} were reminded{asked}. It closes "
                    f"{when(req.expires_at)}.")


def seconds(td: timedelta) -> str:
    """A short span for people: 850ms, 4.2s, 3m05s, 1h02m."""
    total = td.total_seconds()
    if total < 1:
        return f"{max(0, round(total * 1000))}ms"
    if total < 60:
        return f"{total:.1f}s"
    minutes, secs = divmod(int(total), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def incident_drill_times(req: Request, command_at: datetime, card_at: datetime,
                         quorum_at: datetime, reveal_at: datetime) -> str:
    """A drill's figures, posted when its token is revealed: each step since the command."""
    return tag(req, f":stopwatch: *drill times* {_ref(req)} `{req.scope}`: command → card "
                    f"{seconds(card_at - command_at)}, → quorum {seconds(quorum_at - command_at)}, "
                    f"→ reveal {seconds(reveal_at - command_at)} (approved by "
                    f"{who(req.approvals)})")


def _ref(req: Request) -> str:
    return f"{req.id} ({_escape(req.incident)})" if req.incident else req.id


def _actor(actor: str | None) -> str:
    if actor is None:
        return "someone"
    if actor.startswith("client:"):
        return f"relying service `{actor.removeprefix('client:')}`"
    if actor.startswith("policy"):
        return "a policy change"
    if actor == "membership":
        return "the group membership check"
    if actor.startswith("os:"):
        return f"operator `{_escape(actor.removeprefix('os:'))}`"
    return f"<@{actor}>"


def incident_bulk_revoked(reqs: Sequence[Request], actor: str, why: str) -> str:
    """One incident post for many grants revoked at once for one reason (a reload
    that ends thousands of grants must not flood the channel post by post)."""
    ids = ", ".join(_ref(r) for r in reqs)
    return (f":octagonal_sign: *revoked* {len(reqs)} tokens by {_actor(actor)} "
            f"({_escape(why)}): {ids}")
