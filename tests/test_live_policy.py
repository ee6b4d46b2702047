"""Live policy and live membership (contract §7.3), in one process: the real bot over
loopback HTTP and the Slack emulator, the policy swapped with `Runtime.reload_policy`.
What a real `serve` does on SIGHUP and on a file change is in test_live_serve.py.

- a reload that removes a scope revokes its live grants (DM edited, incident post,
  introspection inactive) and cancels its pending requests; narrowed permissions,
  a changed audience and a lowered ceiling revoke with their reasons;
- a policy that does not validate is refused: the running one keeps working, the
  refusal is an incident-channel alert and an audit row;
- every component reads the new policy (no stale copy);
- two Runtimes on one database reloading at once revoke each grant once;
- the membership re-check revokes a grant whose holder left the Slack user group,
  and does not when Slack fails;
- an approval whose membership Slack cannot confirm within 10 minutes is refused
  with "could not confirm your membership of sre-leads; try again";
- a reload that changes `[tokens] algorithm` signs new tokens with it, old ones verify;
- after `rotate-master` (and a `rotate` under the new master key) a process still on
  the old master key keeps signing with the key it holds and says it needs the new one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import timedelta
from typing import Any

import aiohttp
import jwt
from helpers import timed
from sqlalchemy import func, select
from test_flow import JWT_RE, approve, click, content, dm, incident, request, reveal, row

from bot.core.clock import ManualClock, OffsetClock
from bot.core.kdf import new_master_key
from bot.foreground import PASS_FIRST
from bot.governance import reconcile
from bot.keys import KeyRing
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, REVIEWS, Sandbox
from bot.runtime import Runtime
from bot.store.schema import audit_log, outbox, reviews, token_closures
from bot.store.schema import requests as requests_table

SCOPE_BLOCK_START = "[scopes.payments-write]"


def without_payments(text: str) -> str:
    """The policy with the payments-write scope (and the client that needs it) removed."""
    start = text.index(SCOPE_BLOCK_START)
    end = text.index("[scopes.db-admin]")
    text = text[:start] + text[end:]
    start = text.index("[clients.payments-api]")
    end = text.index("\n\n", text.index("audiences", start))
    return text[:start] + text[end:]


async def introspect(box: Sandbox, token: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{box.url}/oauth2/introspect", data={"token": token},
                          headers=basic(box)) as r:
            return dict(await r.json())


def basic(box: Sandbox) -> dict[str, str]:
    raw = f"payments-api:{box.client_secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def audited(box: Sandbox, event: str, rid: str | None = None) -> list[Any]:
    async with box.bot.db.read() as conn:
        q = select(audit_log).where(audit_log.c.event == event)
        if rid is not None:
            q = q.where(audit_log.c.request_id == rid)
        return list((await conn.execute(q.order_by(audit_log.c.seq))).all())


async def live_grant(box: Sandbox) -> tuple[str, str]:
    """ALICE's payments-write grant, approved by BOB and CAROL and revealed."""
    _, rid = await request(box)
    await approve(box, rid, BOB, CAROL)
    return rid, await reveal(box, rid)


async def test_reload_that_removes_a_scope_revokes_and_cancels(sandbox: Sandbox) -> None:
    box = sandbox
    rid, token = await live_grant(box)
    assert (await introspect(box, token))["active"] is True
    _, pending = await request(box, BOB, "payments-write 20m INC-7 second pair of hands")

    result = await box.bot.reload_policy(without_payments(box.policy_text))
    await box.settle()

    assert (result.outcome, result.revoked, result.cancelled) == ("reloaded", 1, 1)
    assert (await row(box, rid)).state == "revoked"
    assert (await row(box, pending)).state == "cancelled"
    # The DM that carried the token says why, and no token text stays in Slack.
    text = content(dm(box, rid))
    assert "revoked by a policy change" in text and "payments-write was removed" in text
    assert not any(JWT_RE.search(v.text) for v in dm(box, rid).history)
    posts = incident(box, "revoked", rid)
    assert posts and "scope payments-write was removed from the policy" in posts[0]
    assert incident(box, "cancelled", pending)
    assert any(pending in m.text and "cancelled" in m.text for m in box.emulator.messages(BOB))
    why = json.loads((await audited(box, "revoked", rid))[0].details)
    assert why["why"] == "scope payments-write was removed from the policy"
    assert (await audited(box, "revoked", rid))[0].actor == "policy"
    # The grant ended, so its review is opened like any other's (contract §7.1).
    async with box.bot.db.read() as conn:
        assert (await conn.execute(select(reviews.c.request_id)
                                   .where(reviews.c.request_id == rid))).first() is not None
    assert (await audited(box, "review_opened", rid))
    reloaded = await audited(box, "policy_reloaded")
    assert json.loads(reloaded[-1].details)["removed"] == ["payments-write"]
    # Every component reads the new policy: a request for the removed scope is refused
    # as unknown (service), the modal lists only db-admin (handlers), the HTTP layer
    # no longer knows the removed client.
    resp = await timed(box.slack.command(ALICE, "payments-write 10m INC-9 again"))
    await box.settle()
    assert "There is no scope `payments-write`" in json.dumps(resp.json) + json.dumps(
        [r.body for r in box.emulator.responses if r.url == resp.response_url])
    assert box.bot.service.policy is box.bot.policy is box.bot.directory.policy
    assert box.bot.introspector.policy is box.bot.policy
    assert box.bot.handlers.service.policy is box.bot.policy
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{box.url}/oauth2/introspect", data={"token": token},
                          headers=basic(box)) as r:
            assert r.status == 401  # the client went with its scope


async def test_narrowed_grants_are_revoked_with_their_reason(sandbox: Sandbox) -> None:
    box = sandbox
    narrowed, token = await live_grant(box)
    assert (await introspect(box, token))["active"] is True
    text = box.policy_text.replace('permissions = ["payments:read", "payments:write"]',
                                   'permissions = ["payments:read"]')
    result = await box.bot.reload_policy(text)
    await box.settle()
    assert result.revoked == 1
    assert "the permissions of payments-write were narrowed" in incident(box, "revoked", narrowed)[0]
    assert (await introspect(box, token)) == {"active": False}

    # Lower the ceiling under what a fresh 30m grant has left: revoked; a grant with
    # less left than the new ceiling would stay.
    lowered, _ = await live_grant(box)
    text2 = text.replace('max_ttl = "30m"', 'max_ttl = "10m"')
    result = await box.bot.reload_policy(text2)
    await box.settle()
    assert result.revoked == 1 and (await row(box, lowered)).state == "revoked"
    assert "maximum lifetime of payments-write was lowered to 10m" in incident(
        box, "revoked", lowered)[0]

    # A reload that changes nothing a grant relies on revokes nothing.
    kept, _ = await live_grant(box)
    result = await box.bot.reload_policy(text2.replace("Write access", "Write access (v2)"))
    assert (result.outcome, result.revoked) == ("reloaded", 0)
    assert (await row(box, kept)).state == "revealed"


async def test_a_reload_revoking_several_batches_opens_every_review_with_its_timeline(
        make_box: Any, monkeypatch: Any) -> None:
    """A reload's revocation pass works a batch at a time (`reconcile.BATCH`, 2 here),
    and leaves the rest to follow-up rows (`reconcile.FOLLOW_UP` grants each, 1 and 3
    here), which open the reviews of their grants together, their timeline posts
    rendered when the outbox sends them: every grant still gets its own thread under
    its card with its own timeline (who approved, revealed or not, its uses), one
    `revoked` and one `review_opened` audit row, its token closure, its DM edited and
    its announcement."""
    box = await make_box(rate_limit=20)
    monkeypatch.setattr(reconcile, "BATCH", 2)
    monkeypatch.setattr(reconcile, "FOLLOW_UP", 1)
    used, used_token = await live_grant(box)
    assert (await introspect(box, used_token))["active"] is True  # one use
    revealed = [(await live_grant(box))[0] for _ in range(2)]
    _, issued = await request(box)
    await approve(box, issued, BOB, CAROL)  # issued, never revealed
    await box.bot.introspector.flush()
    _, pending = await request(box)  # stays: its scope is still there
    grants = [used, *revealed, issued]

    result = await box.bot.reload_policy(box.policy_text.replace(
        'permissions = ["payments:read", "payments:write"]', 'permissions = ["payments:read"]'))
    await box.settle()

    assert (result.outcome, result.revoked, result.cancelled) == ("reloaded", 4, 0)
    assert box.bot.service.passes.running == 0  # the outbox is not held any more
    assert (await row(box, pending)).state == "pending"
    async with box.bot.db.read() as conn:
        closed = set((await conn.execute(select(token_closures.c.token_hash))).scalars())
        opened = set((await conn.execute(select(reviews.c.request_id))).scalars())
    assert opened == set(grants)
    # every revealed token's closure is recorded (every process's introspection hears of it)
    assert {(await row(box, rid)).token_hash for rid in grants if rid != issued} <= closed
    for rid in grants:
        assert (await row(box, rid)).state == "revoked"
        assert len(await audited(box, "revoked", rid)) == 1
        assert len(await audited(box, "review_opened", rid)) == 1
        card = box.card(rid)
        thread = [m for m in box.emulator.messages(REVIEWS) if m.thread_ts == card.ts]
        assert len(thread) == 1, [m.text for m in thread]
        shown = content(thread[0])
        assert rid in shown and "revoked by a policy change" in shown
        assert f"<@{BOB}>" in shown and f"<@{CAROL}>" in shown and "Review" in shown
        assert (":eyes: revealed" in shown) == (rid != issued)
        assert ("1 use(s) in all" in shown) == (rid == used)
        assert ("_never used_" in shown) == (rid != used)
        assert not any(JWT_RE.search(v.text) for v in dm(box, rid).history)
        assert "revoked by a policy change" in content(dm(box, rid))
        posts = incident(box, "revoked", rid)
        assert len(posts) == 1 and "narrowed" in posts[0]


async def test_invalid_policy_is_refused_and_the_running_one_stays(sandbox: Sandbox) -> None:
    box = sandbox
    before = box.bot.policy
    bad = box.policy_text.replace("quorum = 2", "quorum = 9").replace(
        'audience = "db-api"', 'audience = "<!channel>"')
    result = await box.bot.reload_policy(bad)
    await box.settle()
    assert result.outcome == "refused"
    assert any("quorum: 9 exceeds" in e for e in result.errors)
    assert box.bot.policy is before
    alerts = [m.text for m in box.emulator.messages(INCIDENT) if m.text.startswith(":rotating_light:")]
    assert len(alerts) == 1 and "policy reload refused" in alerts[0]
    assert "scopes.payments-write.quorum" in alerts[0]
    assert "<!channel>" not in alerts[0]  # escaped: the refusal never pings anyone
    refused = await audited(box, "policy_refused")
    assert json.loads(refused[0].details)["sha256"] == result.sha256
    alert = json.loads((await audited(box, "alert"))[0].details)
    assert alert["kind"] == "reload_refused" and "quorum" in alert["text"]
    # The same bad policy again: refused again, but alerted once.
    assert (await box.bot.reload_policy(bad)).outcome == "refused"
    await box.settle()
    assert len([m for m in box.emulator.messages(INCIDENT)
                if m.text.startswith(":rotating_light:")]) == 1
    # The running policy still works end to end.
    rid, token = await live_grant(box)
    assert (await introspect(box, token))["active"] is True
    assert (await row(box, rid)).state == "revealed"
    # Not TOML at all: refused too.
    assert (await box.bot.reload_policy("[slack\nnot toml")).outcome == "refused"


async def test_a_file_every_replica_refuses_alerts_once(tmp_path: Any,
                                                        new_database: Any) -> None:
    """§8 "each alert done once": two replicas refuse the same bad file; one
    `policy_refused` row, one `alert` row, one incident post and one webhook `alert`
    (PagerDuty gets one incident, not one per replica)."""
    import secrets

    from webhook_receiver import Receiver

    receiver = await Receiver(secret=secrets.token_hex(32).encode()).start()
    assert receiver.secret is not None
    extra = (f'\n[[webhooks]]\nurl = "{receiver.url}"\nsecret_env = "RELOAD_HOOK_SECRET"\n'
             'events = ["alert", "policy_refused"]\n')
    env = {"RELOAD_HOOK_SECRET": receiver.secret.decode()}
    box = Sandbox(directory=tmp_path, database_url=new_database(), extra_policy=extra, env=env)
    await box.start()
    second = Runtime(box.settings, box.bot.policy, policy_text=box.policy_text,
                     sweep_interval=0.2, env=env)
    await second.start()
    try:
        bad = box.policy_text.replace("quorum = 2", "quorum = 9")
        results = await asyncio.gather(box.bot.reload_policy(bad), second.reload_policy(bad))
        assert [r.outcome for r in results] == ["refused", "refused"]
        # And once more each (a SIGHUP to both, say): still once.
        assert (await second.reload_policy(bad, force=True)).outcome == "refused"
        await second.dispatcher.drain(5)
        await box.settle()
        assert len(await audited(box, "policy_refused")) == 1
        assert [json.loads(r.details)["kind"] for r in await audited(box, "alert")] == [
            "reload_refused"]
        posts = [m for m in box.emulator.messages(INCIDENT)
                 if m.text.startswith(":rotating_light:")]
        assert len(posts) == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(
                [b for b in receiver.delivered() if b["event"] == "alert"]) < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # time for a second one, were there one
        delivered = receiver.delivered()
        assert [b["event"] for b in delivered].count("alert") == 1, delivered
        assert [b["event"] for b in delivered].count("policy_refused") == 1
    finally:
        await second.stop(drain_seconds=2)
        await box.stop()
        await receiver.stop()


async def test_two_processes_reloading_revoke_each_grant_once(sandbox: Sandbox) -> None:
    box = sandbox
    grants = [(await live_grant(box))[0] for _ in range(3)]
    second = Runtime(box.settings, box.bot.policy, policy_text=box.policy_text,
                     sweep_interval=0.2)
    await second.start()
    try:
        new = without_payments(box.policy_text)
        first_result, second_result = await asyncio.gather(
            box.bot.reload_policy(new), second.reload_policy(new))
        assert first_result.revoked + second_result.revoked == 3
        await second.dispatcher.drain(5)
        await box.settle()
    finally:
        await second.stop(drain_seconds=2)
    for rid in grants:
        assert len(await audited(box, "revoked", rid)) == 1
        assert len(await audited(box, "review_opened", rid)) == 1
        assert len(incident(box, "revoked", rid)) == 1
        assert "revoked by a policy change" in content(dm(box, rid))
    assert len(await audited(box, "policy_reloaded")) == 2  # each process reloaded
    reloaded_posts = [m for m in box.emulator.messages(INCIDENT) if "*policy reloaded*" in m.text]
    assert len(reloaded_posts) == 1  # announced once


async def test_a_follow_up_runs_once_however_often_it_is_delivered(sandbox: Sandbox) -> None:
    """A follow-up row delivered again (its lease ran out while the first delivery was
    committing, or a second process took it) finds its row done and does nothing."""
    box = sandbox
    rid, _ = await live_grant(box)
    await box.bot.reload_policy(without_payments(box.policy_text))
    await box.settle()
    async with box.bot.db.read() as conn:
        jobs = (await conn.execute(select(outbox.c.id, outbox.c.payload, outbox.c.status)
                                   .where(outbox.c.kind == reconcile.JOB))).all()
    assert [(json.loads(p)["reasons"].keys(), s) for _, p, s in jobs] == [({rid}, "sent")]
    await reconcile.follow_up(box.bot.service, json.loads(jobs[0].payload), jobs[0].id)
    await box.settle()
    assert len(await audited(box, "review_opened", rid)) == 1
    assert len(incident(box, "revoked", rid)) == 1
    async with box.bot.db.read() as conn:
        assert await conn.scalar(select(func.count()).select_from(reviews)) == 1


async def test_many_grants_are_announced_in_one_post_per_batch(sandbox: Sandbox) -> None:
    box = sandbox
    grants = [(await live_grant(box))[0] for _ in range(5)]
    await box.bot.reload_policy(without_payments(box.policy_text))
    await box.settle()
    bulk = [m.text for m in box.emulator.messages(INCIDENT) if "*revoked* 5 tokens" in m.text]
    assert len(bulk) == 1 and all(rid in bulk[0] for rid in grants)
    for rid in grants:  # each holder's DM is still edited
        assert "revoked by a policy change" in content(dm(box, rid))


# ----------------------------------------------------------------- live membership


def with_usergroups(text: str, recheck: str = "1s") -> str:
    """oncall and sre-leads also resolved live from Slack user groups."""
    text = text.replace('[groups.oncall]\nmembers = ["U0ALICE", "U0BOB"]',
                        '[groups.oncall]\nmembers = ["U0BOB"]\nusergroup = "S0ONCALL"')
    text = text.replace('[groups.sre-leads]\nmembers = ["U0BOB", "U0CAROL", "U0DAVE"]',
                        '[groups.sre-leads]\nmembers = ["U0DAVE"]\nusergroup = "S0LEADS"')
    assert "S0ONCALL" in text and "S0LEADS" in text
    return text + f'\n[alerts]\nmembership_recheck = "{recheck}"\n'


async def test_membership_recheck_revokes_when_the_holder_left(sandbox: Sandbox) -> None:
    box = sandbox
    box.emulator.set_usergroup("S0ONCALL", [ALICE])
    box.emulator.set_usergroup("S0LEADS", [BOB, CAROL])
    assert (await box.bot.reload_policy(with_usergroups(box.policy_text))).outcome == "reloaded"
    rid, token = await live_grant(box)
    rounds = box.bot.membership.rounds

    # Slack fails for a while: nothing is revoked on a failure.
    box.emulator.fail("usergroups.users.list", status=500, times=1000)
    deadline = time.monotonic() + 10
    while box.bot.membership.rounds < rounds + 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert (await row(box, rid)).state == "revealed"

    # Slack answers again, and ALICE is no longer in the user group: revoked.
    box.emulator._faults.clear()  # noqa: SLF001 - the emulator's fault queue
    box.emulator.set_usergroup("S0ONCALL", [])
    deadline = time.monotonic() + 10
    while (await row(box, rid)).state != "revoked":
        assert time.monotonic() < deadline, "not revoked by the membership re-check"
        await asyncio.sleep(0.1)
    await box.settle()
    post = incident(box, "revoked", rid)[0]
    assert "no longer in any requester group of payments-write (oncall)" in post
    assert "the group membership check" in post
    assert "no longer in any requester group" in content(dm(box, rid))
    assert (await introspect(box, token)) == {"active": False}
    assert (await audited(box, "revoked", rid))[0].actor == "membership"


async def test_static_member_removed_by_reload_is_revoked(sandbox: Sandbox) -> None:
    box = sandbox
    rid, _ = await live_grant(box)
    text = box.policy_text.replace('members = ["U0ALICE", "U0BOB"]', 'members = ["U0BOB"]')
    result = await box.bot.reload_policy(text)
    assert result.revoked == 1 and (await row(box, rid)).state == "revoked"


async def test_approval_refused_when_slack_cannot_confirm_membership(tmp_path: Any) -> None:
    clock = ManualClock()
    box = Sandbox(directory=tmp_path, clock=clock)
    await box.start()
    try:
        box.emulator.set_usergroup("S0ONCALL", [ALICE])
        box.emulator.set_usergroup("S0LEADS", [BOB, CAROL])
        await box.bot.reload_policy(with_usergroups(box.policy_text, recheck="1h"))
        _, rid = await request(box)  # the approver groups were read from Slack just now
        box.emulator.fail("usergroups.users.list", status=500, times=1000)

        # Slack failing, its last answer 2 minutes old: that answer is still used.
        clock.advance(timedelta(minutes=2))
        await click(box, BOB, "bg_approve", rid, on=box.card(rid))
        async with box.bot.db.read() as conn:
            n = await conn.scalar(select(func.count()).select_from(audit_log).where(
                audit_log.c.event == "approved"))
        assert n == 1

        # 11 minutes after Slack last answered: CAROL's membership is not assumed.
        clock.advance(timedelta(minutes=9))
        resp = await click(box, CAROL, "bg_approve", rid, on=box.card(rid))
        said = json.dumps(resp.json) + json.dumps(
            [r.body for r in box.emulator.responses if r.url == resp.response_url])
        said += json.dumps([e.text for e in box.emulator.ephemerals if e.user == CAROL])
        assert "could not confirm your membership of sre-leads; try again" in said
        assert (await row(box, rid)).state == "pending"
        # A static member still counts: DAVE is listed in the policy itself.
        await click(box, DAVE, "bg_approve", rid, on=box.card(rid))
        assert (await row(box, rid)).state == "issued"
        # And a request from someone only Slack could vouch for is refused the same way.
        box.emulator.set_usergroup("S0ONCALL", [ALICE, CAROL])
        resp = await timed(box.slack.command(CAROL, "payments-write 10m INC-3 help"))
        await box.settle()
        said = json.dumps([r.body for r in box.emulator.responses if r.url == resp.response_url])
        assert "could not confirm your membership of oncall; try again" in said
    finally:
        await box.stop()


async def click_during_reload(box: Sandbox, clock: OffsetClock, new_policy: str) -> str:
    """CAROL's click that reaches quorum, with Slack slow to say who is in sre-leads;
    the reload of `new_policy` lands while the click waits for Slack. Returns the id."""
    box.emulator.set_usergroup("S0ONCALL", [ALICE])
    box.emulator.set_usergroup("S0LEADS", [BOB, CAROL])
    assert (await box.bot.reload_policy(with_usergroups(box.policy_text, recheck="1h"))
            ).outcome == "reloaded"
    _, rid = await request(box)
    await approve(box, rid, BOB)
    clock.advance(timedelta(minutes=2))  # the cached membership is old: the click asks Slack
    before = len(box.emulator.calls_to("usergroups.users.list"))
    box.emulator.hang("usergroups.users.list", 1.5)
    card = box.card(rid)
    clicking = asyncio.create_task(box.slack.click(CAROL, "bg_approve", rid,
                                                   channel_id=card.channel, message_ts=card.ts))
    deadline = time.monotonic() + 5
    while len(box.emulator.calls_to("usergroups.users.list")) == before:
        assert time.monotonic() < deadline, "the click never asked Slack"
        await asyncio.sleep(0.01)
    assert (await box.bot.reload_policy(with_usergroups(new_policy, recheck="1h"))
            ).outcome == "reloaded"
    await clicking
    await box.settle()
    await asyncio.sleep(2)  # the hung lookup answered and the click finished
    await box.settle()
    return rid


async def test_a_click_during_a_reload_that_narrows_the_scope_issues_the_new_grant(
        tmp_path: Any, new_database: Any) -> None:
    """§7.3: a reload while a click waits for Slack found no grant to revoke; the token
    issued after it follows the new policy (permissions, lifetime), not the old one."""
    clock = OffsetClock()
    box = Sandbox(directory=tmp_path, clock=clock, database_url=new_database())
    await box.start()
    try:
        narrowed = box.policy_text.replace(
            'permissions = ["payments:read", "payments:write"]',
            'permissions = ["payments:read"]').replace('max_ttl = "30m"', 'max_ttl = "10m"', 1)
        assert narrowed.count('max_ttl = "10m"') >= 1 and narrowed != box.policy_text
        rid = await click_during_reload(box, clock, narrowed)
        req = await row(box, rid)
        assert req.state == "issued"
        assert json.loads(req.grant)["permissions"] == ["payments:read"]
        assert req.token_expires_at - req.issued_at <= timedelta(minutes=10)
        token = await reveal(box, rid)
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["scope"] == "payments:read"
        assert claims["exp"] - claims["iat"] <= 600
        assert (await introspect(box, token))["active"] is True  # it stands: not revoked
    finally:
        await box.stop()


async def test_a_click_during_a_reload_that_removes_the_scope_issues_nothing(
        tmp_path: Any, new_database: Any) -> None:
    clock = OffsetClock()
    box = Sandbox(directory=tmp_path, clock=clock, database_url=new_database())
    await box.start()
    try:
        rid = await click_during_reload(box, clock, without_payments(box.policy_text))
        assert (await row(box, rid)).state == "cancelled"
        assert await audited(box, "issued", rid) == []
        assert not any(JWT_RE.search(content(m)) for m in box.emulator.messages(ALICE))
    finally:
        await box.stop()


async def command_during_reload(box: Sandbox, new_policy: str) -> list[Any]:
    """ALICE's command whose trigger probe hangs (until its 2 s timeout: down, so it
    holds) while `new_policy` is reloaded. Returns the requests table afterwards."""
    from bot.store.schema import requests as requests_table

    box.probes.status["auth"] = None
    commanding = asyncio.create_task(
        box.slack.command(ALICE, "payments-write 30m INC-7 auth down"))
    await asyncio.sleep(0.7)  # the probe is under way
    assert (await box.bot.reload_policy(new_policy)).outcome == "reloaded"
    await commanding
    await asyncio.sleep(2.5)  # the probe timed out and the command finished
    await box.settle()
    async with box.bot.db.read() as conn:
        return list((await conn.execute(select(requests_table))).all())


async def test_a_command_during_a_reload_follows_the_new_policy(sandbox: Sandbox) -> None:
    box = sandbox
    narrowed = box.policy_text.replace('max_ttl = "30m"', 'max_ttl = "10m"', 1)
    [req] = await command_during_reload(box, narrowed)
    assert req.ttl_s == 600  # the new ceiling, not the 30 minutes the old policy allowed
    await approve(box, req.id, BOB, CAROL)
    token = await reveal(box, req.id)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600


async def test_a_command_during_a_reload_that_removes_the_scope_opens_nothing(
        sandbox: Sandbox) -> None:
    box = sandbox
    assert await command_during_reload(box, without_payments(box.policy_text)) == []
    said = json.dumps([r.body for r in box.emulator.responses])
    assert "was removed from the policy while your request was being checked" in said


async def test_policy_file_watcher_and_sandbox_policy_helpers(tmp_path: Any) -> None:
    """The sandbox's policy file and the running policy agree at start: the watcher
    does not reload on its own, and a text given to reload_policy is not undone by a
    file that did not change."""
    box = Sandbox(directory=tmp_path)
    await box.start()
    try:
        text = box.policy_text.replace("Write access", "Write access (api)")
        assert (await box.bot.reload_policy(text)).outcome == "reloaded"
        result = await box.bot.reloader.reload_file(trigger="file", force=False)
        assert result.outcome == "unchanged"
        assert box.bot.live.text == text
    finally:
        await box.stop()


# ------------------------------------------------------------------- keys, in process


async def test_algorithm_change_by_reload_signs_with_the_new_algorithm(sandbox: Sandbox) -> None:
    box = sandbox
    _, old_token = await live_grant(box)
    assert jwt.get_unverified_header(old_token)["alg"] == "RS256"
    text = box.policy_text.replace('algorithm = "RS256"', 'algorithm = "ES256"')
    assert (await box.bot.reload_policy(text)).outcome == "reloaded"
    _, new_token = await live_grant(box)
    assert jwt.get_unverified_header(new_token)["alg"] == "ES256"
    assert (await introspect(box, old_token))["active"] is True  # signed before: still valid
    assert (await introspect(box, new_token))["active"] is True


async def test_a_new_key_made_by_an_algorithm_reload_is_a_rotation_audited_once(
        sandbox: Sandbox) -> None:
    """§7.5/§7.7: the key that a switch of `tokens.algorithm` makes is audited
    `key_rotated` and alerted as `breakglass keys rotate` does, once across replicas."""
    from bot.core.policy import parse_policy

    box = sandbox
    previous = box.bot.keyring.current.kid
    other = Runtime(box.settings, parse_policy(box.policy_text), clock=box.clock,
                    policy_text=box.policy_text)
    await other.start()
    try:
        text = box.policy_text.replace('algorithm = "RS256"', 'algorithm = "ES256"')
        assert (await box.bot.reload_policy(text)).outcome == "reloaded"
        assert (await other.reload_policy(text)).outcome == "reloaded"
        await box.settle()
        kid = box.bot.keyring.current.kid
        assert kid != previous and other.keyring.current.kid == kid
        [rotated] = await audited(box, "key_rotated")
        details = json.loads(rotated.details)
        assert (details["kid"], details["previous"], details["alg"]) == (kid, previous, "ES256")
        assert rotated.actor == "breakglass"
        alerts = [json.loads(r.details) for r in await audited(box, "alert")]
        assert [a["kind"] for a in alerts] == ["key_rotated"] and alerts[0]["kid"] == kid
        posts = [m.text for m in box.emulator.messages(INCIDENT)
                 if m.text.startswith(":rotating_light:")]
        assert len(posts) == 1 and kid in posts[0] and previous in posts[0]
        # Back to RS256: its key exists, nothing is made, so nothing is rotated.
        assert (await box.bot.reload_policy(box.policy_text)).outcome == "reloaded"
        assert box.bot.keyring.current.kid == previous
        assert len(await audited(box, "key_rotated")) == 1
    finally:
        await other.stop(drain_seconds=2.0)


async def test_a_running_process_after_rotate_master_keeps_its_keys(sandbox: Sandbox) -> None:
    """keys rotate-master, then keys rotate, while this process still has the old master
    key: it keeps signing with the key it holds, says it needs the new master key, and
    every token it signed keeps verifying (docs/operations.md)."""
    box = sandbox
    _, before = await live_grant(box)
    kid = box.bot.keyring.current.kid
    new_master = new_master_key()
    await KeyRing.rotate_master(box.bot.db, box.master_key, new_master)
    assert await box.bot.key_watch.check() is True
    assert box.bot.keyring.master_outdated and box.bot.key_watch.status != "ok"
    assert box.bot.keyring.current.kid == kid
    # A new signing key made under the new master key (another process, or the CLI).
    other = await KeyRing.open(box.bot.db, new_master, "RS256", box.bot.clock.now())
    new_kid = await other.rotate(box.bot.db, box.bot.clock.now())
    await box.bot.key_watch.check()
    assert box.bot.keyring.current.kid == kid  # cannot open the new one: keeps its own
    assert new_kid in box.bot.keyring.unreadable
    _, after = await live_grant(box)
    assert jwt.get_unverified_header(after)["kid"] == kid
    for token in (before, after):
        assert (await introspect(box, token))["active"] is True


async def test_a_command_during_a_revocation_pass_waits_for_it_at_most_a_second(
        sandbox: Sandbox) -> None:
    """While a revocation pass runs, the work behind an answered command waits for it
    (`foreground.PASS_FIRST`): the tokens stop first. Never longer than a second, so a
    click's modal still opens within Slack's 3 s."""
    box = sandbox
    passes = box.bot.service.passes
    before = len(box.emulator.messages(REVIEWS))
    with passes.running_pass():  # a pass that ends when the test says
        await timed(box.slack.command(ALICE, "payments-write 30m INC-9 pass first"))
        await asyncio.sleep(0.4)
        assert len(box.emulator.messages(REVIEWS)) == before  # held: no card yet
    await box.settle()
    assert len(box.emulator.messages(REVIEWS)) == before + 1  # the pass ended: it went on

    async def opened() -> int:  # the request is written (its card waits: the outbox holds)
        async with box.bot.db.read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(requests_table)
                                         .where(requests_table.c.incident == "INC-10")) or 0)

    with passes.running_pass():  # a pass longer than PASS_FIRST
        started = time.monotonic()
        await timed(box.slack.command(ALICE, "payments-write 30m INC-10 pass first"))
        while not await opened():
            assert time.monotonic() - started < 3.0, "held for longer than PASS_FIRST"
            await asyncio.sleep(0.02)
        waited = time.monotonic() - started
    assert waited >= PASS_FIRST - 0.05
