"""Inventory and operator revocation (contract section 7.2), through the Slack emulator
over HTTP and the real command line: `/breakglass tokens`, `breakglass tokens list`,
`breakglass tokens revoke`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sqlalchemy import select
from test_reviews import (
    REASON,
    MakeBox,
    buttons,
    cli,
    click,
    command,
    content,
    events,
    introspect,
    jti_of,
    seen,
    thread,
    token_of,
    wait_thread,
)

from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, MALLORY, Sandbox
from bot.store.schema import audit_log, requests

AUDITOR = "U0AUDITOR"
AUDITORS = f'[reviews]\nreviewers = ["auditors"]\n\n[groups.auditors]\nmembers = ["{AUDITOR}"]\n'
OPERATOR = {"LOGNAME": "opsperson", "USER": "opsperson"}
# Token-shaped (header.payload.signature), made up here: no key signed it.
FAKE_JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJVMEFMSUNFIn0.c2lnbmF0dXJlLW1hZGUtdXA"


async def issue(box: Sandbox, user: str, scope: str = "payments-write") -> str:
    """A live grant of `scope` for `user` (approved by two approvers who are not `user`)."""
    await command(box, user, f"{scope} 30m {REASON}")
    rid = box.latest_request_id()
    approvers = [a for a in (BOB, CAROL, DAVE) if a != user]
    for approver in approvers[: 2 if scope == "payments-write" else 1]:
        await click(box, approver, "bg_approve", rid, on=box.card(rid))
    return rid


async def states(box: Sandbox) -> dict[str, str]:
    async with box.bot.db.read() as conn:
        return {r.id: r.state for r in await conn.execute(select(requests.c.id, requests.c.state))}


async def world(make_box: MakeBox) -> tuple[Sandbox, str, str, str]:
    box = await make_box(extra_policy=AUDITORS)
    box.probes.status["db"] = 503  # db-admin's trigger holds
    a = await issue(box, ALICE)
    b = await issue(box, BOB)
    c = await issue(box, ALICE, "db-admin")
    assert set((await states(box)).values()) == {"issued"}
    return box, a, b, c


def dm_of(box: Sandbox, user: str, rid: str) -> Any:
    return [m for m in box.emulator.messages(user) if rid in content(m)][-1]


async def test_tokens_in_slack_for_approvers_and_reviewers_only(make_box: MakeBox) -> None:
    box, a, b, c = await world(make_box)
    for user in (BOB, AUDITOR):
        shown = seen(box, await command(box, user, "tokens"))
        for rid in (a, b, c):
            assert rid in shown, (user, shown)
        assert "payments-write" in shown and "db-admin" in shown and "INC-4521" in shown
        assert f"<@{ALICE}>" in shown and f"<@{CAROL}>" in shown
        assert "expires in 29m" in shown or "expires in 30m" in shown
        assert "0 use(s)" in shown
    for user in (ALICE, MALLORY):
        resp = await command(box, user, "tokens")
        shown = seen(box, resp)
        assert "Only members of an approver or reviewer group" in shown
        assert a not in shown
    # every reply is ephemeral (a response_url reply, never a channel post)
    assert all(r.body.get("response_type") == "ephemeral" for r in box.emulator.responses)
    assert not any("Live grants" in m.text for ch in (INCIDENT,) for m in box.emulator.messages(ch))


async def test_tokens_list_for_operators(make_box: MakeBox) -> None:
    box, a, b, c = await world(make_box)
    await command(box, ALICE, f"revoke {c}")
    code, out, err = await cli(box, "tokens", "list")
    assert code == 0, err
    assert a in out and b in out and c not in out and "2 live grant(s)" in out
    code, out, err = await cli(box, "tokens", "list", "--json")
    assert code == 0, err
    rows = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {a, b}
    assert rows[a]["requester"] == ALICE and rows[a]["scope"] == "payments-write"
    assert rows[a]["incident"] == "INC-4521" and rows[a]["approvers"] == [BOB, CAROL]
    assert rows[a]["uses"] == 0 and 0 < rows[a]["expires_in_s"] <= 1800
    assert rows[a]["jti"] == await jti_of(box, a)


async def test_revoke_refuses_without_a_reason_or_with_an_unknown_id(make_box: MakeBox) -> None:
    box, a, b, c = await world(make_box)
    before = await states(box)
    # (the bot's own audit checkpoints may be written meanwhile: not a change by the CLI)
    n_events = [e for e in await events(box) if e != "checkpoint"]
    for args, says in [
        (("tokens", "revoke", a), "--reason is required"),
        (("tokens", "revoke", a, "--reason", "   "), "--reason is required"),
        (("tokens", "revoke", a, "RNOSUCH1", "--reason", "lost laptop"),
         "there is no request or token `RNOSUCH1`"),
        (("tokens", "revoke", "--reason", "lost laptop"), "name what to revoke"),
        (("tokens", "revoke", a, "--all", "--reason", "lost laptop"), "name what to revoke"),
        # Token-shaped text (the audit log refuses it): refused up front, no traceback.
        (("tokens", "revoke", "--all", "--reason", f"leaked {FAKE_JWT}"),
         "remove the token text"),
        (("tokens", "revoke", a, "--reason", "leaked xoxb-123456789012-abcdefgh"),
         "remove the token text"),
    ]:
        code, out, err = await cli(box, *args, **OPERATOR)
        assert code == 2, (args, out, err)
        assert says in err and "Nothing was revoked" in err, err
        assert "Traceback" not in err, err
    await box.settle()
    assert await states(box) == before
    assert [e for e in await events(box) if e != "checkpoint"] == n_events


async def test_operator_revokes_by_id_and_jti_announced_and_dm_edited(make_box: MakeBox) -> None:
    box, a, b, c = await world(make_box)
    await click(box, ALICE, "bg_reveal", a, on=dm_of(box, ALICE, a))
    token = token_of(box)
    assert (await introspect(box, token))["active"] is True
    jti = await jti_of(box, b)
    code, out, err = await cli(box, "tokens", "revoke", a, jti, "--reason", "lost laptop",
                               **OPERATOR)
    assert code == 0, err
    assert f"revoked {a}" in out and f"revoked {b}" in out and "os:opsperson" in out
    assert (await states(box)) == {a: "revoked", b: "revoked", c: "issued"}
    # The running bot (another process) stops accepting the token within a second or so
    # (its cache hears of closures by polling; a loaded machine gets some slack).
    deadline = time.monotonic() + 5
    while (await introspect(box, token))["active"]:
        assert time.monotonic() < deadline, "the CLI's revocation did not reach the bot"
        await asyncio.sleep(0.1)

    # A running bot delivers what the command line queued: announced, DM edited, thread.
    for rid, user in ((a, ALICE), (b, BOB)):
        # (A's DM was edited once already, by the reveal: wait for the revocation's edit.)
        await box.emulator.wait_for(lambda rid=rid, user=user: "revoked" in content(
            dm_of(box, user, rid)), timeout=20)
        dm = dm_of(box, user, rid)
        assert "revoked" in content(dm) and "opsperson" in content(dm)
        assert buttons(dm) == {}
        await box.emulator.wait_for(lambda rid=rid: any(
            "*revoked*" in m.text and rid in m.text for m in box.emulator.messages(INCIDENT)),
            timeout=20)
        said = next(m.text for m in box.emulator.messages(INCIDENT)
                    if "*revoked*" in m.text and rid in m.text)
        assert "operator `opsperson`" in said and "lost laptop" in said
        await wait_thread(box, rid, timeout=20)
        assert "opsperson" in content(thread(box, rid)[0])
    async with box.bot.db.read() as conn:
        rows = (await conn.execute(select(audit_log.c.actor, audit_log.c.details).where(
            audit_log.c.event == "revoked"))).all()
    assert [r.actor for r in rows] == ["os:opsperson", "os:opsperson"]
    assert all(json.loads(r.details)["reason"] == "lost laptop" for r in rows)

    # A grant already revoked: a clear refusal, exit 2, nothing changes.
    code, _, err = await cli(box, "tokens", "revoke", a, "--reason", "again", **OPERATOR)
    assert code == 2 and f"{a} is already revoked" in err


async def test_operator_revokes_by_user_scope_and_all(make_box: MakeBox) -> None:
    box, a, b, c = await world(make_box)
    code, out, err = await cli(box, "tokens", "revoke", "--user", ALICE, "--scope", "db-admin",
                               "--reason", "leaked key", **OPERATOR)
    assert code == 0, err
    assert await states(box) == {a: "issued", b: "issued", c: "revoked"}
    code, out, err = await cli(box, "tokens", "revoke", "--user", ALICE, "--reason", "lost laptop",
                               **OPERATOR)
    assert code == 0, err
    assert await states(box) == {a: "revoked", b: "issued", c: "revoked"}
    code, out, err = await cli(box, "tokens", "revoke", "--scope", "payments-write",
                               "--reason", "rotation", **OPERATOR)
    assert code == 0 and f"revoked {b}" in out, err
    d = await issue(box, BOB)
    code, out, err = await cli(box, "tokens", "revoke", "--all", "--reason", "incident over",
                               **OPERATOR)
    assert code == 0 and f"revoked {d}" in out and "1 grant(s) revoked" in out, err
    assert set((await states(box)).values()) == {"revoked"}
    code, out, err = await cli(box, "tokens", "revoke", "--all", "--reason", "again", **OPERATOR)
    assert code == 0 and "nothing was revoked" in out


def test_one_operator_actor_for_the_cli_and_the_inventory(monkeypatch: Any) -> None:
    """Who ran an operator command is named one way, wherever it is asked."""
    import getpass
    import os
    import re
    from pathlib import Path

    import bot.cli
    from bot.operator import operator_actor

    root = Path(__file__).resolve().parent.parent / "bot"
    defined = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if re.search(r"^def operator_actor\b", p.read_text("utf-8"), re.M)]
    assert defined == ["operator.py"], defined
    assert bot.cli.operator_actor is operator_actor
    monkeypatch.setenv("LOGNAME", "opsperson")
    assert operator_actor() == "os:opsperson"

    def no_name() -> str:
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(getpass, "getuser", no_name)
    assert operator_actor() == f"os:uid-{os.getuid()}"
