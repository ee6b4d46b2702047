"""`breakglass audit verify --slack`: the checkpoints in the incident channel, read
back and compared with the database.

A checkpoint (`bot.delivery.audit_publish`, `bot.core.checkpoint`) says which row was the
audit log's head, with which MAC. This module

1. asks Slack who the bot is (`auth.test`): only messages from the bot's own
   user count, so a member who pastes a checkpoint-looking message forges
   nothing, and only a message that *starts* like a checkpoint counts, so the
   bot echoing a person's words (a request's reason) forges nothing either;
2. pages through the channel's history (`conversations.history`, cursor
   pagination, scope `channels:history` or `groups:history`);
3. checks each checkpoint's signature against the bot's signing keys in the
   database (each authenticated with the master key), and that the database
   still holds row `seq` with that MAC.

A checkpoint whose row is missing means rows were cut from the log's tail or
the database was replaced by an older copy; a different MAC means the log was
rewritten. Either, or a bad signature, is a failure naming the checkpoint's
`seq`. The caller (`bot.cli`) prints it, raises the alert and exits 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select

from .. import audit
from ..core import alerts, checkpoint
from ..core.events import ALERT
from ..core.policy import Webhook
from ..core.tokens import VerificationKey
from ..store.db import Database
from ..store.schema import audit_log

PAGE = 200  # messages per conversations.history call (Slack's recommended maximum)
_SCOPES = "channels:history (public channel) or groups:history (private channel)"


class SlackUnusable(Exception):
    """Slack could not be asked (a refused token, a missing scope, the bot not in the
    channel, Slack unreachable). The message names the cause and what to do."""


@dataclass(frozen=True)
class Posted:
    """A checkpoint message the bot posted."""

    ts: str
    found: checkpoint.Found


@dataclass
class Report:
    channel: str
    checked: int = 0
    signed: int = 0
    unsigned: int = 0
    latest: Posted | None = None
    head: int = 0  # the database's last seq
    problems: list[tuple[int | None, str]] = field(default_factory=list)  # (seq, what)
    pages: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [s for s, _ in self.problems if s is not None]
        return min(seqs) if seqs else None


def make_client(token: str, api_url: str, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """A Web API client that waits out rate limits (Slack paces conversations.history)."""
    import logging

    sdk_log = logging.getLogger("bot.slack.sdk")
    sdk_log.setLevel(logging.INFO)  # slack_sdk dumps bodies (with the token header) at DEBUG
    return AsyncWebClient(token=token, base_url=api_url, timeout=30, logger=sdk_log,
                          session=session,
                          retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=20)])


def _refused(method: str, channel: str, exc: Exception) -> SlackUnusable:
    if isinstance(exc, SlackApiError):
        error = str(exc.response.get("error") if exc.response is not None else "") or "an error"
        if error in ("invalid_auth", "not_authed", "token_revoked", "token_expired",
                     "account_inactive", "not_allowed_token_type"):
            return SlackUnusable(f"SLACK_BOT_TOKEN was refused by Slack ({error}): use the bot "
                                 "token (xoxb-…) of the breakglass app")
        if error == "missing_scope":
            return SlackUnusable(f"the Slack app lacks the scope to read the incident channel "
                                 f"{channel} ({method} needs {_SCOPES}): add both scopes as in "
                                 "manifest.yml and reinstall the app")
        if error == "not_in_channel":
            return SlackUnusable(f"the bot is not a member of the incident channel {channel}: "
                                 "invite it (/invite @breakglass) and run this again")
        if error == "channel_not_found":
            return SlackUnusable(f"Slack does not show the bot the incident channel {channel} "
                                 "([slack] incident_channel in BREAKGLASS_POLICY): check the ID, "
                                 "and invite the bot to a private channel")
        return SlackUnusable(f"Slack answered {error} to {method}")
    return SlackUnusable(f"Slack could not be reached at SLACK_API_URL for {method} "
                         f"({type(exc).__name__}): check the address and the network")


async def bot_user(client: AsyncWebClient) -> str:
    try:
        answer = await client.auth_test()
    except (TimeoutError, SlackApiError, aiohttp.ClientError) as exc:
        raise _refused("auth.test", "", exc) from None
    user = answer.get("user_id")
    if not isinstance(user, str) or not user:
        raise SlackUnusable("Slack's auth.test did not name the bot's user")
    return user


async def read_checkpoints(client: AsyncWebClient, channel: str, bot: str,
                           oldest: datetime | None = None) -> tuple[list[Posted], list[str], int]:
    """The bot's checkpoint messages in `channel` (newest first), what could not be read
    of the bot's own checkpoint messages, and the number of pages read."""
    found: list[Posted] = []
    damaged: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        kwargs: dict[str, Any] = {"channel": channel, "limit": PAGE}
        if cursor:
            kwargs["cursor"] = cursor
        if oldest is not None:
            kwargs["oldest"] = f"{oldest.timestamp():.6f}"
        try:
            page = await client.conversations_history(**kwargs)
        except (TimeoutError, SlackApiError, aiohttp.ClientError) as exc:
            raise _refused("conversations.history", channel, exc) from None
        pages += 1
        for message in page.get("messages") or []:
            if not isinstance(message, dict) or message.get("user") != bot:
                continue  # a person's message (or another app's) is never a checkpoint
            text = message.get("text")
            if not isinstance(text, str):
                continue
            ts = str(message.get("ts") or "?")
            try:
                parsed = checkpoint.parse_message(text)
            except checkpoint.BadCheckpoint as exc:
                damaged.append(f"the bot's checkpoint message of ts {ts} is damaged: {exc}")
                continue
            if parsed is not None:
                found.append(Posted(ts, parsed))
        meta = page.get("response_metadata") or {}
        cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
        if not cursor:
            return found, damaged, pages


async def compare(db: Database, keys: dict[str, VerificationKey], channel: str,
                  posted: Sequence[Posted]) -> Report:
    """Every checkpoint against the database: the row is there, with that MAC, and the
    signature verifies with one of the bot's keys."""
    report = Report(channel)
    seqs = sorted({p.found.seq for p in posted})
    stored: dict[int, str] = {}
    async with db.read() as conn:
        report.head, _ = await audit.head(conn)
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            rows = await conn.execute(
                select(audit_log.c.seq, audit_log.c.mac).where(audit_log.c.seq.in_(chunk)))
            stored.update({int(s): str(m) for s, m in rows})
    for p in sorted(posted, key=lambda p: (p.found.seq, p.ts)):
        f = p.found
        report.checked += 1
        if report.latest is None or f.seq >= report.latest.found.seq:
            report.latest = p
        if f.signed is not None:
            report.signed += 1
            try:
                checkpoint.verify(f.signed, keys)
            except checkpoint.BadCheckpoint as exc:
                report.problems.append((f.seq, f"the checkpoint of sequence {f.seq} (ts {p.ts}) "
                                                f"is not the bot's: {exc}"))
                continue
        else:
            report.unsigned += 1
        mac = stored.get(f.seq)
        if mac is None:
            report.problems.append((f.seq, (
                f"the checkpoint of sequence {f.seq} (ts {p.ts}) names a row the database "
                f"lacks: its log ends at {report.head}. Rows were cut from the tail, or the "
                "database was replaced by an older copy")))
        elif mac != f.mac:
            report.problems.append((f.seq, (
                f"the checkpoint of sequence {f.seq} (ts {p.ts}) says MAC {f.mac}, the "
                f"database holds {mac}: the log was rewritten or replaced")))
    return report


def alert_text(lines: Sequence[str], most: int = 5) -> str:
    shown = [f"• {line}" for line in lines[:most]]
    if len(lines) > most:
        shown.append(f"• … and {len(lines) - most} more")
    """The alert's text (bot.core.alerts.post_text adds the `:rotating_light:` prefix)."""
    return ("*Audit checkpoint comparison failed*: `breakglass audit verify "
            "--slack` found the audit log no longer matching what the bot published:\n"
            + "\n".join(shown)
            + "\nTreat the database as tampered with until you know why: keep a copy, compare "
            "`breakglass audit export` with the checkpoints, and see docs/security-teams.md.")


async def post_alert(client: AsyncWebClient, channel: str, lines: Sequence[str]) -> str | None:
    """Post the alert to the incident channel from here (cron has no running bot to ask);
    None when posted, else why not."""
    try:
        await client.chat_postMessage(channel=channel, text=alerts.post_text(alert_text(lines)))
    except (TimeoutError, SlackApiError, aiohttp.ClientError) as exc:
        return str(_refused("chat.postMessage", channel, exc))
    return None


@dataclass(frozen=True)
class Target:
    """Where the checkpoints are (SLACK_BOT_TOKEN, SLACK_API_URL, the incident channel),
    and where else an alert goes (the policy's webhooks, their secrets in `env`)."""

    token: str
    api_url: str
    channel: str
    webhooks: tuple[Webhook, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


async def check(db: Database, master_key: str, audit_key: bytes, target: Target, *,
                chain_problem: str | None, oldest: datetime | None = None,
                alert: bool = True, now: datetime | None = None) -> tuple[list[str], list[str]]:
    """Read the checkpoints back and compare; return (lines to print, problems).

    Any problem, or a broken chain (`chain_problem`), raises the alert unless `alert`
    is False: posted to the incident channel from here, and audited (`alert`, kind
    `checkpoint_mismatch`), which queues the webhook event `alert` for the running
    bot to deliver. Raises SlackUnusable when Slack cannot be asked,
    keys.WrongMasterKey when the master key does not open the keys."""
    from ..keys import verification_keys

    keys = await verification_keys(db, master_key)
    async with aiohttp.ClientSession() as session:
        client = make_client(target.token, target.api_url, session)
        bot = await bot_user(client)
        posted, damaged, pages = await read_checkpoints(client, target.channel, bot, oldest)
        report = await compare(db, keys, target.channel, posted)
        report.pages = pages
        problems = [what for _, what in report.problems] + damaged
        lines = [summary(report)] if report.checked or not problems else []
        if alert and (problems or chain_problem):
            failed = ([f"the MAC chain: {chain_problem}"] if chain_problem else []) + problems
            not_posted = await post_alert(client, target.channel, failed)
            lines.append(f"alert not posted to {target.channel}: {not_posted}" if not_posted
                         else f"alert posted to the incident channel {target.channel}")
            lines.append(await record_alert(db, audit_key, target, failed,
                                            report.first_bad_seq, now or datetime.now(UTC)))
    return lines, problems


async def record_alert(db: Database, audit_key: bytes, target: Target, failed: Sequence[str],
                       first_bad_seq: int | None, now: datetime) -> str:
    """The alert as an audit row `alert`; with the policy's webhooks attached, the same
    transaction queues the webhook event `alert` (a running bot sends it). Returns a
    line saying what happened."""
    from .webhooks import Webhooks

    hooks = None
    note = ""
    if target.webhooks:
        # Queued with the audit row; a running bot signs and sends it (no secret needed here).
        hooks = Webhooks.enqueue_only(target.webhooks)
        hooks.attach(db)
        note = f"; the webhook event alert is queued for {len(target.webhooks)} webhook(s)"
    details = {"kind": alerts.CHECKPOINT_MISMATCH, "text": alert_text(failed),
               "channel": target.channel, "first_bad_seq": first_bad_seq,
               "problems": list(failed[:20])}
    try:
        async with db.transaction() as conn:
            seq = await audit.append(conn, audit_key, at=now, actor=alerts.ACTOR,
                                     event=ALERT, details=details)
    except Exception as exc:  # noqa: BLE001 - a damaged database must not hide the finding
        return f"alert not recorded in the audit log ({type(exc).__name__}){note}"
    finally:
        if hooks is not None:
            audit.listen(db.engine, None)
    return f"alert recorded in the audit log as sequence {seq}{note}"


def summary(report: Report) -> str:
    where = f"in {report.channel} ({report.pages} page(s) of history)"
    if report.latest is None:
        return (f"no audit checkpoint from the bot {where}: nothing to compare yet (the bot "
                "posts one within a minute of a token event and hourly while it logs)")
    latest = report.latest.found
    after = report.head - latest.seq
    at = f" at {latest.checkpoint.at_text}" if latest.checkpoint is not None else ""
    kinds = f"{report.signed} signed" + (f", {report.unsigned} unsigned (older form)"
                                         if report.unsigned else "")
    verdict = "match the database" if report.ok else "checked"
    since = (f"{after} row(s) logged since" if after >= 0
             else f"but the log ends {-after} row(s) before it")
    return (f"{report.checked} audit checkpoint(s) {where} {verdict} ({kinds}); the latest is "
            f"sequence {latest.seq}{at}, {since}")


__all__ = ["PAGE", "Posted", "Report", "SlackUnusable", "Target", "alert_text",
           "bot_user", "check", "compare", "make_client", "post_alert", "read_checkpoints", "summary"]
