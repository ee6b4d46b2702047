"""Webhooks (contract §7.6): every audited event a `[[webhooks]]` entry lists, POSTed
through the outbox as a second delivery channel beside Slack.

Enqueueing
----------

`Webhooks.attach(db)` registers `fan_out` as the audit log's listener
(`bot.audit.listen`): whenever a transaction appends audit rows, one outbox row per
event and interested webhook is inserted in that same transaction, after the audit
rows. So an event is sent if and only if it was audited, whichever code audited it
(a use case, introspection, a CLI command that attached the webhooks), and a crash
can delay it but not lose it. `checkpoint` events go to every webhook
(`bot.core.events.ALWAYS_SENT`).

A row's lane is `webhook:<first 16 hex of sha256(url)>`, so each webhook's events
go out in audit order, independently of Slack and of the other webhooks, with the
outbox's retries, backoff, `Retry-After`, leases, dead letters and `breakglass
outbox retry`. The row holds the event body and the webhook's URL, never a secret:
the signing secret and a PagerDuty routing key are read from the environment
variables the policy names, at start and on each reload.

The body (format "breakglass")::

    {"id": "…", "seq": 17, "event": "issued", "time": "2026-…+00:00",
     "actor": "U0BOB", "request_id": "R…", "scope": "payments-write", "details": {…}}

`id` is drawn once per event, when it is audited: the same for every webhook and
every retry, so a receiver drops a repeat by `id`. `details` is the audit row's
details (no secret: the audit log refuses them).

Sending
-------

Headers `X-Breakglass-Timestamp: <unix seconds, at send time>` and
`X-Breakglass-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
2xx is delivered. 429, 408, 425 and 5xx, connection errors and a timeout (the
entry's `timeout`) are retried with the outbox's backoff; `Retry-After` (seconds
or an HTTP date) is honoured, and a 429 does not use up an attempt. Any other
answer (a 3xx: redirects are not followed; a 4xx) is dead-lettered at once: it
means a wrong URL or secret, which `breakglass outbox retry` re-queues once fixed.

`format = "pagerduty"` sends a PagerDuty Events API v2 `trigger` event instead, with
`dedup_key` = the event's `id` and the breakglass body as `custom_details`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from .. import audit
from ..core import events as event_names
from ..core.policy import Webhook
from ..store.db import Database
from . import outbox

log = logging.getLogger(__name__)

KIND = "webhook"
LANE_PREFIX = "webhook:"
USER_AGENT = "breakglass-webhooks/1"
_RETRIED_STATUSES = frozenset({408, 425, 429})
_SEVERITY = {"alert": "critical", "issued": "warning", "revealed": "warning", "used": "warning",
             "revoked": "warning", "review_overdue": "warning", "refused": "warning"}


class WebhookConfigError(Exception):
    """An environment variable a `[[webhooks]]` entry names is missing; the message
    names it and says what to do."""


def lane_of(url: str) -> str:
    return LANE_PREFIX + hashlib.sha256(url.encode()).hexdigest()[:16]


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def event_body(seq: int, ev: audit.AuditEvent, event_id: str) -> dict[str, Any]:
    """The breakglass-format body of one audited event."""
    details = json.loads(audit.canonical_details(ev.details))
    scope = details.get("scope")
    return {
        "id": event_id,
        "seq": seq,
        "event": ev.event,
        "time": audit.canonical_time(ev.at),
        "actor": ev.actor,
        "request_id": ev.request_id,
        "scope": scope if isinstance(scope, str) else None,
        "details": details,
    }


def pagerduty_body(event: Mapping[str, Any], routing_key: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 `trigger` event for a breakglass event body."""
    name = str(event.get("event"))
    details = event.get("details") or {}
    what = [f"breakglass {name}"]
    if event.get("scope"):
        what.append(str(event["scope"]))
    if event.get("request_id"):
        what.append(str(event["request_id"]))
    summary = " ".join(what) + f" (by {event.get('actor')})"
    if name == event_names.ALERT and isinstance(details.get("text"), str):
        summary = f"breakglass alert: {details['text']}"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": event["id"],
        "payload": {
            "summary": summary[:1024],
            "source": "breakglass",
            "severity": _SEVERITY.get(name, "info"),
            "timestamp": event.get("time"),
            "component": event.get("scope") or "breakglass",
            "group": event.get("request_id") or "breakglass",
            "class": name,
            "custom_details": dict(event),
        },
    }


@dataclass(frozen=True)
class Target:
    """One `[[webhooks]]` entry with its secrets resolved."""

    lane: str
    url: str
    format: str
    events: frozenset[str]
    secret: bytes | None
    routing_key: str | None
    timeout: float


def resolve(hooks: Sequence[Webhook], env: Mapping[str, str]) -> list[Target]:
    """The entries with their secrets read from `env`; WebhookConfigError naming every
    variable that is missing or empty."""
    targets, missing = [], []
    for i, hook in enumerate(hooks):
        values: dict[str, str | None] = {}
        for key in ("secret_env", "routing_key_env"):
            name = getattr(hook, key)
            if name is None:
                values[key] = None
                continue
            value = env.get(name, "").strip()
            if not value:
                missing.append(f"{name} (webhooks[{i}].{key})")
            values[key] = value
        secret = values["secret_env"]
        targets.append(Target(lane_of(hook.url), hook.url, hook.format, frozenset(hook.events),
                              secret.encode() if secret else None, values["routing_key_env"],
                              hook.timeout.total_seconds()))
    if missing:
        raise WebhookConfigError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: each "
            "[[webhooks]] entry names the environment variable holding its signing secret "
            "(or PagerDuty routing key); set it in the bot's environment, or remove the entry")
    return targets


class Webhooks:
    """The policy's webhooks: the audit listener that enqueues, and the outbox sender."""

    def __init__(self, hooks: Sequence[Webhook], env: Mapping[str, str]) -> None:
        self.targets: list[Target] = []
        self._by_lane: dict[str, Target] = {}
        self.configure(hooks, env)

    @classmethod
    def enqueue_only(cls, hooks: Sequence[Webhook]) -> Webhooks:
        """For a CLI command that audits (and never sends): the entries without their
        secrets, which it does not need; the serving bot signs each event as it sends it.
        `attach` it to the command's database so its audit rows reach the webhooks."""
        self = cls([], {})
        self.targets = [Target(lane_of(h.url), h.url, h.format, frozenset(h.events), None, None,
                               h.timeout.total_seconds()) for h in hooks]
        self._by_lane = {}  # nothing to send with
        return self

    def configure(self, hooks: Sequence[Webhook], env: Mapping[str, str]) -> None:
        """Take a (reloaded) policy's entries; on WebhookConfigError nothing changes."""
        targets = resolve(hooks, env)
        self.targets = targets
        self._by_lane = {t.lane: t for t in targets}

    def attach(self, db: Database) -> None:
        """Every audit row appended through `db` from now on reaches the webhooks."""
        audit.listen(db.engine, self.fan_out)

    def fan_out(self, batch: Sequence[tuple[int, audit.AuditEvent]]) -> list[dict[str, Any]]:
        """Outbox rows for a batch of audited events (the audit listener)."""
        targets = self.targets
        if not targets:
            return []
        rows: list[dict[str, Any]] = []
        for seq, ev in batch:
            wanting = [t for t in targets if event_names.wanted(ev.event, t.events)]
            if not wanting:
                continue
            body = event_body(seq, ev, uuid.uuid4().hex)
            for t in wanting:
                rows.append(outbox.row(ev.at, lane=t.lane, kind=KIND,
                                       payload={"url": t.url, "format": t.format, "event": body}))
        return rows

    def sender(self, session: aiohttp.ClientSession) -> outbox.Sender:
        async def send(payload: dict[str, Any]) -> None:
            await self.send(session, payload)

        return send

    async def send(self, session: aiohttp.ClientSession, payload: dict[str, Any]) -> None:
        """POST one outbox row's event; raises outbox.Retry / outbox.Dead on failure."""
        url = payload.get("url")
        event = payload.get("event")
        if not isinstance(url, str) or not isinstance(event, dict):
            raise outbox.Dead("not a webhook event")
        target = self._by_lane.get(lane_of(url))
        if target is None:
            raise outbox.Dead(f"webhook {url} is no longer in the policy")
        if target.format == "pagerduty":
            if target.routing_key is None:
                raise outbox.Retry("no routing key in this process")
            data: Mapping[str, Any] = pagerduty_body(event, target.routing_key)
        else:
            data = event
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if target.secret is None and target.format == "breakglass":
            raise outbox.Retry("no signing secret in this process")  # never sent unsigned
        if target.secret is not None:
            timestamp = str(int(time.time()))
            headers["X-Breakglass-Timestamp"] = timestamp
            headers["X-Breakglass-Signature"] = sign(target.secret, timestamp, body)
        try:
            async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=target.timeout)) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                await resp.read()
        except TimeoutError:
            raise outbox.Retry(f"no answer within {target.timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise outbox.Retry(f"{type(exc).__name__}") from None
        if 200 <= status < 300:
            return
        if status == 429:
            raise outbox.Retry("HTTP 429 (rate limited)", retry_after, paced=True)
        if status in _RETRIED_STATUSES or status >= 500:
            raise outbox.Retry(f"HTTP {status}", retry_after)
        raise outbox.Dead(f"HTTP {status} from {url}: fix the receiver, URL or secret, then "
                          "`breakglass outbox retry`")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (at - datetime.now(UTC)).total_seconds())


__all__ = ["KIND", "LANE_PREFIX", "Target", "WebhookConfigError", "Webhooks",
           "event_body", "lane_of", "pagerduty_body", "resolve", "sign"]
