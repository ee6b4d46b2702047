"""Slack listeners: parse, acknowledge at once, then call one use case.

Bolt runs with `process_before_response=True`, so each listener must return
quickly: it acks, and anything that may wait (trigger probes, Slack calls,
the database under load) runs in a background task that replies through
`respond` (the response_url) or a DM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.web.async_client import AsyncWebClient

from .. import audit
from ..core import commands
from ..core.commands import CommandError
from ..core.durations import DurationError, format_duration, parse_duration
from ..core.errors import Refusal
from ..service import SECRET_IN_REASON, Service
from . import acks, blocks, review_blocks

if TYPE_CHECKING:
    from ..governance.inventory import Inventory
    from ..governance.reviews import Reviews

log = logging.getLogger(__name__)


Spawn = Callable[[Coroutine[Any, Any, None]], None]
PREPARE_TIMEOUT = 2.0  # inside Slack's 3 s for a modal submission
# What a person sees when something they could not cause failed: never silence.
UNEXPECTED = (":warning: breakglass hit an unexpected error and could not finish that. "
              "Check `/breakglass status` before trying again; if it keeps failing, tell the "
              "bot's operators (the error is in its log).")


async def _text_or_refusal(text: Awaitable[str], what: str) -> str:
    """The reply for `text`: its refusal's message, or UNEXPECTED if it failed otherwise."""
    try:
        return await text
    except Refusal as exc:
        return f":no_entry_sign: {exc.message}"
    except Exception:  # noqa: BLE001 - the person is told; the log has the details
        log.exception("%s failed", what)
        return UNEXPECTED


class Handlers:
    def __init__(self, service: Service, client: AsyncWebClient, spawn: Spawn,
                 reviews: Reviews, inventory: Inventory,
                 respond_at: Callable[[str], AsyncRespond] | None = None) -> None:
        self.service = service
        # respond() for a response_url kept by a form (the runtime's: on its shared pool)
        self.respond_at = respond_at or (lambda url: AsyncRespond(response_url=url))
        self.client = client
        self.spawn = spawn
        self.reviews = reviews
        self.inventory = inventory

    @property
    def pattern(self) -> str:
        return self.service.policy.requests.incident_pattern

    # -- /breakglass ---------------------------------------------------------

    async def on_command(self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond) -> None:
        command_at = self.service.clock.now()  # the start of a drill's (and the histogram's) clock
        user = str(body.get("user_id", ""))
        cmd = acks.parse(str(body.get("text", "")), self.pattern, self.service.policy.scopes)
        await ack(**acks.command_ack(cmd))
        if isinstance(cmd, CommandError | commands.Help):
            return
        if isinstance(cmd, commands.OpenModal):
            self.spawn(self._open_modal(user, str(body.get("trigger_id", "")), respond,
                                        str(body.get("response_url") or "")))
        elif isinstance(cmd, commands.ListScopes):
            self.spawn(self._reply(respond, self._scopes_text(user)))
        elif isinstance(cmd, commands.Status):
            self.spawn(self._reply(respond, self._status_text(user)))
        elif isinstance(cmd, commands.Revoke):
            self.spawn(self._reply(respond, self._revoke_text(cmd.target, user)))
        elif isinstance(cmd, commands.Drill):
            self.spawn(self._reply(respond, self._request_text(
                user, cmd.scope, None, cmd.reason, cmd.incident, command_at, drill=True)))
        elif isinstance(cmd, commands.Review):
            self.spawn(self._reply(respond, self._review_text(cmd.target, user, cmd.summary)))
        elif isinstance(cmd, commands.Tokens):
            self.spawn(self._reply(respond, self._tokens_text(user)))
        else:
            self.spawn(self._reply(respond, self._request_text(
                user, cmd.scope, cmd.duration, cmd.reason, cmd.incident, command_at)))

    async def _reply(self, respond: AsyncRespond, text: Awaitable[str]) -> None:
        message = await _text_or_refusal(text, "command")
        await respond(text=message, response_type="ephemeral", replace_original=True)

    async def _request_text(self, user: str, scope: str, duration: Any, reason: str,
                            incident: str | None, command_at: Any = None, *,
                            drill: bool = False) -> str:
        draft = await self.service.prepare(user, scope, duration, reason, incident,
                                           drill=drill, command_at=command_at)
        req = await self.service.submit(draft)
        return self._opened_text(req, draft)

    def _opened_text(self, req: Any, draft: Any) -> str:
        note = ""
        if draft.clamped:
            note = (f"\nNote: you asked for {format_duration(draft.requested_ttl)}; the ceiling "
                    f"for `{req.scope}` is {format_duration(draft.ttl)}, so that is what you get.")
        if req.drill:
            failing = [r.name for r in req.triggers if not r.holds]
            if failing:
                note += (f"\nIn a real request these triggers would not hold now: "
                         f"{', '.join(failing)}; a drill goes on.")
            return blocks.tag(req, (
                f":performing_arts: Drill *{req.id}* for `{req.scope}` "
                f"({format_duration(req.ttl)}) is waiting for {draft.scope.quorum} approval(s) "
                f"from {self.service.approver_label(draft.scope)} in "
                f"<#{self.service.reviewer_channel}>, as a real request would. It closes "
                f"{blocks.when(req.expires_at)}. Its token will work for no service; when you "
                f"reveal it, the incident channel gets the drill's times.{note}"))
        return (f":hourglass: Request *{req.id}* for `{req.scope}` ({format_duration(req.ttl)}) is "
                f"waiting for {draft.scope.quorum} approval(s) from "
                f"{self.service.approver_label(draft.scope)} in "
                f"<#{self.service.reviewer_channel}>. It closes {blocks.when(req.expires_at)}. "
                f"You will get the token by DM.{note}")

    async def _scopes_text(self, user: str) -> str:
        found = await self.service.scopes_for(user)
        if not found:
            return "You may not request any scope. Ask an admin to add you to a requester group."
        lines = ["*Scopes you may request*"]
        for name, scope, results in found:
            ready = all(r.holds for r in results)
            state = "ready" if ready else "refused right now"
            ceiling = scope.max_ttl or self.service.policy.tokens.max_ttl
            lines.append(f"• `{name}`: {scope.description} ({state}; {scope.quorum} approval(s), "
                         f"up to {format_duration(ceiling)})")
            lines.extend(f"    {line}" for line in blocks.trigger_lines(results).splitlines())
        return "\n".join(lines)

    async def _status_text(self, user: str) -> str:
        found = await self.service.status(user)
        if not found:
            return "You have no pending requests and no active tokens."
        lines = ["*Your requests and tokens*"]
        for req in found:
            if req.is_pending:
                lines.append("• " + blocks.tag(req, f"*{req.id}* `{req.scope}`: pending, "
                             f"{len(req.approvals)} approval(s) so far, closes "
                             f"{blocks.when(req.expires_at)}"))
            else:
                assert req.token_expires_at is not None
                lines.append("• " + blocks.tag(req, f"*{req.id}* `{req.scope}`: token "
                             f"{req.state.value}, valid until {blocks.when(req.token_expires_at)}"))
        return "\n".join(lines)

    async def _revoke_text(self, target: str, user: str) -> str:
        req = await self.service.revoke(target, user)  # a jti keeps its case
        done = "cancelled" if req.issued_at is None else "revoked"
        return f":octagonal_sign: {req.id} (`{req.scope}`) {done}."

    async def _review_text(self, target: str, user: str, summary: str) -> str:
        req, _ = await self.reviews.sign_off(target, user, summary)
        return (f":memo: Review of {req.id} (`{req.scope}`) signed off; it is in the card's "
                "thread and the incident channel.")

    async def _tokens_text(self, user: str) -> str:
        grants = await self.inventory.for_slack(user)
        return review_blocks.inventory([g.request for g in grants],
                                       {g.request.id: g.uses for g in grants},
                                       self.service.clock.now())

    # -- the review modal ---------------------------------------------------------

    async def _open_review(self, respond: AsyncRespond, request_id: str, user: str,
                           trigger_id: str) -> None:
        try:
            req = await self.reviews.check_modal(request_id, user)
        except Refusal as exc:
            await respond(text=f":no_entry_sign: {exc.message}", response_type="ephemeral",
                          replace_original=False)
            return
        await self.client.views_open(trigger_id=trigger_id, view=review_blocks.review_modal(req))

    async def on_review_modal(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        user = str(body.get("user", {}).get("id", ""))
        view = body.get("view", {})
        request_id = str(view.get("private_metadata", ""))
        values = view.get("state", {}).get("values", {})
        summary = str(values.get(review_blocks.SUMMARY_BLOCK, {}).get("value", {}).get("value")
                      or "")
        if not summary.strip():
            await ack(response_action="errors", errors={
                review_blocks.SUMMARY_BLOCK: "A review needs a summary: what happened, what the "
                "access was used for, what follows."})
            return
        if audit.looks_like_token(summary):
            await ack(response_action="errors", errors={
                review_blocks.SUMMARY_BLOCK: "This looks like it contains a token (a JWT or a "
                "Slack token): remove the token text. Nothing was recorded."})
            return
        try:
            await asyncio.wait_for(self.reviews.check_modal(request_id, user), PREPARE_TIMEOUT)
        except Refusal as exc:
            await ack(response_action="errors",
                      errors={review_blocks.SUMMARY_BLOCK: exc.message[:150]})
            return
        except TimeoutError:
            await ack(response_action="errors",
                      errors={review_blocks.SUMMARY_BLOCK: "Busy right now; try again."})
            return
        await ack()
        self.spawn(self._sign_off_from_modal(request_id, user, summary))

    async def _sign_off_from_modal(self, request_id: str, user: str, summary: str) -> None:
        try:
            await self.reviews.sign_off(request_id, user, summary)
        except Refusal as exc:  # e.g. someone signed it off while the modal was open
            await self.client.chat_postMessage(channel=user,
                                               text=f":no_entry_sign: {exc.message}")

    # -- the form -------------------------------------------------------------

    async def _open_modal(self, user: str, trigger_id: str, respond: AsyncRespond,
                          response_url: str) -> None:
        try:
            refused = await self._open_modal_now(user, trigger_id, response_url)
        except Exception:  # noqa: BLE001 - the person is told
            log.exception("could not open the request form")
            refused = (":warning: Slack could not open the request form. Type the request "
                       "instead: `/breakglass SCOPE DURATION REASON…`")
        if refused:  # a refusal is ephemeral (contract §3), not a message in the DM
            await respond(text=refused, response_type="ephemeral", replace_original=False)

    async def _open_modal_now(self, user: str, trigger_id: str, response_url: str) -> str | None:
        """Open the form; or the refusal, when there is no scope `user` may request. The
        form keeps the command's response_url: a refusal after it is submitted goes there."""
        allowed = [(n, s.description) for n, s, _ in await self._requestable(user)]
        if not allowed:
            return (":no_entry_sign: You may not request any scope, so there is no form to "
                    "fill. Ask an admin to add you to a requester group.")
        view = blocks.request_modal(allowed, format_duration(self.service.policy.tokens.default_ttl),
                                    response_url=response_url)
        await self.client.views_open(trigger_id=trigger_id, view=view)
        return None

    async def _requestable(self, user: str) -> list[Any]:
        out = []
        for name, scope in sorted(self.service.policy.scopes.items()):
            if user in await self.service.directory.members(scope.requesters):
                out.append((name, scope, ()))
        return out

    async def on_modal(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        command_at = self.service.clock.now()
        user = str(body.get("user", {}).get("id", ""))
        values = body.get("view", {}).get("state", {}).get("values", {})

        def field(block: str) -> str:
            v = values.get(block, {}).get("value", {})
            return str((v.get("selected_option") or {}).get("value") or v.get("value") or "").strip()

        scope, duration_text, reason = field("scope"), field("duration"), field("reason")
        errors: dict[str, str] = {}
        duration = None
        if not duration_text:
            errors["duration"] = "Enter a duration, like 90s, 15m, 1h or 1h30m."
        else:
            try:  # as the command takes it: `30M` is 30m (phones capitalise)
                duration = parse_duration(duration_text.lower())
            except DurationError as exc:
                errors["duration"] = str(exc).replace(f"'{duration_text.lower()}'",
                                                      f"'{duration_text}'", 1)
        if not scope:
            errors["scope"] = "Pick a scope."
        if not reason:
            errors["reason"] = "A reason is required; start it with the incident, e.g. INC-4521."
        reason = commands.normalize_reason(reason)
        if len(reason) > commands.MAX_REASON_LENGTH:
            errors["reason"] = f"Keep the reason under {commands.MAX_REASON_LENGTH} characters."
        if errors:
            await ack(response_action="errors", errors=errors)
            return
        incident = commands.extract_incident(reason, self.pattern)
        try:
            draft = await asyncio.wait_for(
                self.service.prepare(user, scope, duration, reason, incident,
                                     command_at=command_at), PREPARE_TIMEOUT)
        except Refusal as exc:
            where = "reason" if exc.code == SECRET_IN_REASON else "scope"
            await ack(response_action="errors", errors={where: exc.message[:150]})
            return
        except TimeoutError:
            await ack(response_action="errors", errors={"scope": "Busy right now; try again."})
            return
        await ack()
        self.spawn(self._submit_from_modal(
            draft, str(body.get("view", {}).get("private_metadata") or "")))

    async def _submit_from_modal(self, draft: Any, response_url: str) -> None:
        """The opened request is confirmed by DM (the form has no channel of its own); a
        refusal (the probes, the rate limit…) is ephemeral, a reply to the command that
        opened the form (contract §3), and a DM only when that reply cannot be made."""
        try:
            text = self._opened_text(await self.service.submit(draft), draft)
        except Exception as exc:  # noqa: BLE001 - the person is told
            if isinstance(exc, Refusal):
                text = f":no_entry_sign: {exc.message}"
            else:
                log.exception("request from the form failed")
                text = UNEXPECTED
            if response_url.startswith(("https://", "http://")):
                try:
                    await self.respond_at(response_url)(
                        text=text, response_type="ephemeral", replace_original=False)
                    return
                except Exception:  # noqa: BLE001 - e.g. the response_url's 30 minutes passed
                    log.warning("the form's refusal could not be sent to its response_url; "
                                "sent by DM")
        await self.client.chat_postMessage(channel=draft.requester, text=text)

    # -- buttons --------------------------------------------------------------

    async def on_button(self, ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond) -> None:
        await ack()
        action = (body.get("actions") or [{}])[0]
        request_id = str(action.get("value", ""))
        user = str(body.get("user", {}).get("id", ""))
        action_id = action.get("action_id")
        if action_id == blocks.APPROVE:
            self.spawn(self._click(respond, self.service.decide(request_id, user, True)))
        elif action_id == blocks.DENY:
            self.spawn(self._click(respond, self.service.decide(request_id, user, False)))
        elif action_id == blocks.REVOKE:
            self.spawn(self._reply_ephemeral(respond, self._revoke_text(request_id, user)))
        elif action_id == blocks.REVEAL:
            self.spawn(self._reveal(respond, request_id, user, str(body.get("trigger_id", ""))))
        elif action_id == review_blocks.REVIEW:
            self.spawn(self._open_review(respond, request_id, user,
                                         str(body.get("trigger_id", ""))))

    async def on_unknown_action(self, ack: AsyncAck, respond: AsyncRespond) -> None:
        await ack()
        self.spawn(respond(text="That button is not one breakglass knows; it may be from an old "
                           "version of a message. Nothing was changed.",
                           response_type="ephemeral", replace_original=False))

    async def _click(self, respond: AsyncRespond, decided: Awaitable[Any]) -> None:
        async def done() -> str:
            await decided
            return ""

        message = await _text_or_refusal(done(), "click")
        if message:
            await respond(text=message, response_type="ephemeral", replace_original=False)

    async def _reply_ephemeral(self, respond: AsyncRespond, text: Awaitable[str]) -> None:
        message = await _text_or_refusal(text, "click")
        await respond(text=message, response_type="ephemeral", replace_original=False)

    async def _reveal(self, respond: AsyncRespond, request_id: str, user: str,
                      trigger_id: str) -> None:
        try:
            req, token = await self.service.reveal(request_id, user)
        except Refusal as exc:
            await respond(text=f":no_entry_sign: {exc.message}", response_type="ephemeral",
                          replace_original=False)
            return
        except Exception:  # noqa: BLE001 - the person is told; nothing was revealed
            log.exception("reveal failed")
            await respond(text=UNEXPECTED, response_type="ephemeral", replace_original=False)
            return
        try:
            await self.client.views_open(trigger_id=trigger_id, view=blocks.token_modal(req, token))
        except Exception as exc:  # noqa: BLE001 - any failure: the token never left
            log.warning("could not open the token modal for %s: %s", request_id, type(exc).__name__)
            await self.service.unreveal(request_id, token)
            await respond(text="Slack could not open the token window. Nothing was shown; "
                          "click *Reveal token* again.", response_type="ephemeral",
                          replace_original=False)
        finally:
            del token
