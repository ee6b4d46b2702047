"""No field is cut by one backend and kept by the other (contract §8): a long client
name, scope name, Slack user ID, incident reference and reason go through the whole
flow on SQLite and on PostgreSQL: request, approval, reveal, introspection and an
RFC 7009 revocation by that client, and an intact audit chain that holds them whole."""

from __future__ import annotations

import hashlib
import json
import re
import secrets

from helpers import query
from sqlalchemy import select
from test_relying_services import basic, introspect, post

from bot import audit
from bot.core.commands import MAX_REASON_LENGTH
from bot.local.sandbox import BOB, REVIEWS, Sandbox
from bot.store.schema import audit_log

LONG_USER = "U0" + "L" * 60
LONG_CLIENT = "payments-api-" + "c" * 140
LONG_SCOPE = "payments-" + "s" * 90
INCIDENT = "INC" + "A" * 200 + "-4521"


def _policy(secret: str) -> str:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return f"""
[groups.long-names]
members = ["{LONG_USER}"]

[scopes.{LONG_SCOPE}]
description = "A scope with a long name"
audience = "payments-api"
permissions = ["payments:read"]
requesters = ["long-names"]
approvers = ["sre-leads"]
quorum = 1
max_ttl = "30m"
triggers = []

[clients.{LONG_CLIENT}]
secret_sha256 = "{digest}"
audiences = ["payments-api"]
"""


async def test_long_fields_survive_the_whole_flow(tmp_path, database_url: str) -> None:
    secret = secrets.token_urlsafe(24)
    reason = " ".join(["refunds stuck"] * 200)[: MAX_REASON_LENGTH - len(INCIDENT) - 1]
    async with Sandbox(directory=tmp_path, database_url=database_url, algorithm="ES256",
                       extra_policy=_policy(secret)) as box:
        box.emulator.set_user(LONG_USER, name="longname")
        ack = await box.slack.command(LONG_USER, f"{LONG_SCOPE} 10m {INCIDENT} {reason}")
        assert ack.status == 200
        await box.settle()
        rid = box.latest_request_id()
        card = box.card(rid)
        assert INCIDENT in json.dumps(card.blocks) or INCIDENT in (card.text or "")
        await box.slack.click(BOB, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
        views = len(box.emulator.views)
        await box.slack.click(LONG_USER, "bg_reveal", rid, channel_id=box.emulator.dm_channel_for(LONG_USER))
        await box.settle()
        [opened] = box.emulator.views[views:]
        token = re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", json.dumps(opened.view)).group(0)  # type: ignore[union-attr]

        status, _, answer = await introspect(box, token, client=LONG_CLIENT, secret=secret)
        assert status == 200 and answer["active"] is True
        assert answer["breakglass"]["incident"] == INCIDENT
        status, _, _ = await post(f"{box.url}/oauth2/revoke", {"token": token},
                                  basic(LONG_CLIENT, secret))
        assert status == 200
        status, _, answer = await introspect(box, token, client=LONG_CLIENT, secret=secret)
        assert answer == {"active": False}
        await box.settle()

        [(scope, requester, incident, stored_reason, closed_by)] = await query(
            database_url, "SELECT scope, requester, incident, reason, closed_by FROM requests")
        assert (scope, requester, incident) == (LONG_SCOPE, LONG_USER, INCIDENT)
        assert stored_reason.endswith(reason[-20:])  # type: ignore[union-attr]
        assert LONG_CLIENT in str(closed_by)
        async with box.bot.db.read() as conn:
            actors = set((await conn.execute(select(audit_log.c.actor))).scalars())
        assert any(LONG_CLIENT in a for a in actors) and LONG_USER in actors
        assert (await audit.verify(box.bot.db, box.bot.audit_key)).ok
