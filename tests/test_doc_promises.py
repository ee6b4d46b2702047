"""Promises of docs/reliability.md and docs/operations.md that no other test held the bot
to (see the checklist in the report of the `promises` branch); each test quotes its
promise. The real bot over loopback HTTP with the Slack emulator, real webhook receivers,
both database backends (the failover test: PostgreSQL only, it is about PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import command, free_port, timed
from sqlalchemy import select
from test_flow import approve

from bot.core.clock import OffsetClock
from bot.delivery.webhooks import lane_of
from bot.local.emulator import Message
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, REVIEWS, Sandbox
from bot.store.schema import metadata, outbox, requests

MakeBox = Callable[..., Awaitable[Sandbox]]
REASON = "INC-4521 auth provider down"


def content(m: Message) -> str:
    return m.text + json.dumps(m.blocks, ensure_ascii=False)


def buttons(m: Message) -> set[str]:
    return {e["action_id"] for b in m.blocks if b.get("type") == "actions"
            for e in b["elements"] if e.get("type") == "button"}


async def state(box: Sandbox, rid: str) -> str:
    async with box.bot.db.read() as conn:
        return str(await conn.scalar(select(requests.c.state).where(requests.c.id == rid)))


async def until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def incident_posts(box: Sandbox, word: str, rid: str) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if f"*{word}*" in m.text and rid in m.text]


# --------------------------------------------------------------------- reliability.md


async def test_deadlines_that_passed_while_the_bot_was_down_close_at_the_next_start(
        make_box: MakeBox) -> None:
    """reliability.md, A crash loses nothing: "A request whose deadline passed while the
    bot was down expires at the next sweep, with its card, DM and incident post." And a
    token whose lifetime ended meanwhile: expired, its DM edited, announced."""
    clock = OffsetClock()
    box = await make_box(clock=clock)
    await command(box, ALICE, f"payments-write 30m {REASON}")
    pending = box.latest_request_id()
    await command(box, BOB, "payments-write 10m INC-4521 second pair of hands")
    issued = box.latest_request_id()
    await approve(box, issued, CAROL, DAVE)
    assert (await state(box, pending), await state(box, issued)) == ("pending", "issued")

    await box.stop_bot()
    clock.advance(timedelta(minutes=31))  # past the request's 30m and the token's 10m
    await box.start_bot()
    await until(lambda: state(box, pending), 1, "no state")
    for rid in (pending, issued):
        async def closed(rid: str = rid) -> bool:
            return await state(box, rid) == "expired"
        await until(closed, 10, f"{rid} not expired after the restart")
    await box.settle()
    card = box.card(pending)
    assert buttons(card) == set() and "Expired" in content(card)
    alice_dm = [m for m in box.emulator.messages(ALICE) if pending in content(m)]
    assert alice_dm and "expired" in content(alice_dm[-1]).lower()
    bob_dm = [m for m in box.emulator.messages(BOB) if issued in content(m)]
    assert bob_dm and "expired" in content(bob_dm[-1]).lower()
    assert "bg_reveal" not in buttons(bob_dm[-1])
    assert len(incident_posts(box, "expired", pending)) == 1
    assert len(incident_posts(box, "expired", issued)) == 1


async def test_a_failing_webhook_holds_back_only_its_own_events(hooked_box, receivers) -> None:
    """reliability.md, Webhooks: "a failing webhook holds back only its own events,
    never Slack's or another webhook's"."""
    down = await receivers(script=[503] * 1000)
    up = await receivers()
    box = await hooked_box((down, ["requested", "approved"]), (up, ["requested", "approved"]))
    box.bot.dispatcher.base_delay = 0.5
    started = time.monotonic()
    await timed(box.slack.command(ALICE, f"payments-write 30m {REASON}"))
    await until(lambda: box.card(box.latest_request_id()) if box.emulator.messages(
        REVIEWS) else None, 5, "no card while a webhook fails")
    rid = box.latest_request_id()
    card = box.card(rid)
    await timed(box.slack.click(BOB, "bg_approve", rid, channel_id=card.channel,
                                message_ts=card.ts))
    await until(lambda: up.events() == ["requested", "approved"], 5,
                "the working webhook waited for the failing one")
    assert time.monotonic() - started < 5
    assert down.received and down.delivered() == []
    assert all(r.json["event"] == "requested" for r in down.received)  # its own lane waits
    rows = [r for r in await _outbox(box) if r["lane"] == lane_of(down.url)]
    assert [r["status"] for r in rows] == ["pending", "pending"]


async def test_a_webhook_redirect_is_dead_lettered_at_once_and_408_425_are_retried(
        hooked_box, receivers) -> None:
    """reliability.md, Webhooks: "A 5xx, 408, 425, a connection error or no answer … is
    retried …; A 3xx or another 4xx (a wrong URL or secret) is dead-lettered at once."
    A redirect is not followed: the signed body goes to the configured URL only."""
    elsewhere = await receivers()
    moved = await receivers(script=[(307, {"Location": elsewhere.url})])
    slow = await receivers(script=[408, 425])
    box = await hooked_box((moved, ["requested"]), (slow, ["requested"]))
    box.bot.dispatcher.base_delay = 0.05
    before = await webhook_counts(box)
    await command(box, ALICE, f"payments-write 30m {REASON}")
    await until(lambda: len(slow.delivered()) == 1, 10, "408/425 not retried to a delivery")
    await box.settle()
    assert [r.status for r in slow.received] == [408, 425, 200]
    assert len({r.json["id"] for r in slow.received}) == 1
    assert len(moved.received) == 1 and elsewhere.received == []
    [row] = [r for r in await _outbox(box) if r["lane"] == lane_of(moved.url)]
    assert row["status"] == "dead" and row["attempts"] == 1 and "307" in row["last_error"]
    # operations.md: "Webhook deliveries are counted under `kind="webhook"` in the outbox
    # metrics": one sent, two retries, one dead letter (the counters are per process).
    after = await webhook_counts(box)
    assert {k: after[k] - before[k] for k in after} == {"sent": 1, "retries": 2, "dead": 1}


async def webhook_counts(box: Sandbox) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(box.metrics_url) as resp:
            metrics = await resp.text()

    def value(name: str) -> float:
        prefix = f'breakglass_outbox_{name}_total{{kind="webhook"}} '
        found = [line for line in metrics.splitlines() if line.startswith(prefix)]
        return float(found[0][len(prefix):]) if found else 0.0

    return {"sent": value("sent"), "retries": value("retries"), "dead": value("dead_letters")}


async def test_no_webhook_secret_is_stored_anywhere_in_the_database(hooked_box, receivers
                                                                   ) -> None:
    """reliability.md, Webhooks: "No secret is stored. Rows hold the event and the URL;
    the signing secret … read from the environment at start"."""
    receiver = await receivers()
    assert receiver.secret is not None
    box = await hooked_box((receiver, ["requested", "approved", "issued", "alert"]))
    await command(box, ALICE, f"payments-write 30m {REASON}")
    await approve(box, box.latest_request_id(), BOB, CAROL)
    assert receiver.events() == ["requested", "approved", "approved", "issued"]
    secret = receiver.secret.decode()
    seen = 0
    async with box.bot.db.read() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                for value in row:
                    seen += 1
                    text = value.hex() if isinstance(value, bytes | bytearray) else str(value)
                    assert secret not in text, f"the webhook secret is in {table.name}"
                    if isinstance(value, bytes | bytearray):
                        assert secret.encode() not in value, f"the secret is in {table.name}"
    assert seen > 100  # the flow's rows were read


async def _outbox(box: Sandbox) -> list[dict[str, Any]]:
    async with box.bot.db.read() as conn:
        return [dict(r) for r in (await conn.execute(select(outbox).order_by(outbox.c.id))).mappings()]


# --------------------------------------------------------------------- operations.md


async def test_after_postgresql_drops_every_connection_the_bot_carries_on(
        postgres: Any, tmp_path: Path) -> None:
    """operations.md, Failover: "When the database fails over …, the bot's connections
    fail for that moment: requests answered meanwhile tell the person to try again, the
    outbox keeps its rows and retries, and the connection pool reconnects by itself"."""
    name = postgres.create()
    try:
        box = await Sandbox(directory=tmp_path, database_url=postgres.url(name)).start()
        try:
            await command(box, ALICE, f"payments-write 30m {REASON}")
            first = box.latest_request_id()
            # Every connection of the bot's pools is killed, as a failover does.
            import asyncpg

            admin = await asyncpg.connect(postgres._dsn())  # noqa: SLF001
            try:
                killed = await admin.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            finally:
                await admin.close()
            assert killed and all(r[0] for r in killed)  # the bot's pooled connections
            # Each answer still comes within Slack's 3 s, and within a few tries a request
            # is opened again; its card reaches Slack through the outbox.
            def new_cards() -> list[Message]:
                return [m for m in box.emulator.messages(REVIEWS) if first not in m.text]

            for _ in range(5):
                await timed(box.slack.command(BOB, "payments-write 10m INC-9 failover"))
                await box.bot.idle()
                await asyncio.sleep(0.5)
                if new_cards():
                    break
            await until(new_cards, 10, "no request opened and announced after the failover")
            async with aiohttp.ClientSession() as session:
                async with session.get(box.url + "/healthz") as health:
                    assert health.status == 200 and (await health.json())["database"] is True
            await approve(box, first, BOB, CAROL)
            assert await state(box, first) == "issued"
        finally:
            await box.stop()
    finally:
        postgres.drop(name)


# --------------------------------------------------------------------- reliability.md, more


async def test_the_running_outbox_retries_and_leases_as_documented(sandbox: Sandbox) -> None:
    """reliability.md: "retried with exponential backoff and jitter (1 s doubling up to
    5 min)", "still fails after 8 attempts, is dead-lettered", "leased … for the Slack
    client's timeout plus 5 s (15 s by default)". The bot as `serve` builds it."""
    d = sandbox.bot.dispatcher
    assert (d.base_delay, d.max_delay, d.max_attempts) == (1.0, 300.0, 8)
    assert d.lease == timedelta(seconds=15)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (4, 8.0), (9, 256.0), (10, 300.0), (30, 300.0)):
        draws = [d._backoff(attempt) for _ in range(50)]  # noqa: SLF001
        assert all(ceiling / 2 <= x <= ceiling for x in draws), (attempt, draws)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_a_retried_message_dm_leaves_only_one_token_text_valid(
        make_box: MakeBox, algorithm: str) -> None:
    """reliability.md, The one window no outbox can close: "with `delivery = "message"` a
    re-sent DM carries a freshly minted text whose hash replaces the first one, so at
    most one token text of a request is ever valid". RS256 and EdDSA sign the same claims
    to the same text; ES256 signatures are randomised, so there the texts differ."""
    import re

    box = await make_box(delivery="message", algorithm=algorithm)
    await command(box, ALICE, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    await approve(box, rid, BOB, CAROL)
    jwt_re = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
    [first] = {t for m in box.emulator.messages(ALICE) for t in jwt_re.findall(content(m))}
    assert (await introspect(box, first))["active"] is True
    # The outbox sends the DM again (its answer was lost): the text is minted afresh.
    again = await box.bot.service.materialise_dm(
        {"request_id": rid, "user": ALICE, "key": f"dm:{rid}"})
    assert again is not None
    [second] = set(jwt_re.findall(again.text + json.dumps(again.blocks or [])))
    assert (await introspect(box, second))["active"] is True
    if algorithm == "ES256":
        assert second != first
        # The replaced text is closed like a revoked one: within the 100 ms a revocation
        # takes to reach every process, not whenever a cached answer is next re-read.
        async def first_inactive() -> bool:
            return (await introspect(box, first))["active"] is False
        await until(first_inactive, 0.3, "the replaced token text still introspects active")
        assert (await introspect(box, second))["active"] is True
    else:
        assert second == first
        assert (await introspect(box, first))["active"] is True


async def introspect(box: Sandbox, token: str) -> dict[str, Any]:
    import base64

    basic = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as session:
        async with session.post(box.url + "/oauth2/introspect", data={"token": token},
                                headers={"Authorization": f"Basic {basic}"}) as resp:
            assert resp.status == 200
            return dict(await resp.json())


async def test_a_rolled_back_change_sends_no_webhook_and_a_refused_port_is_retried(
        hooked_box, receivers) -> None:
    """reliability.md, Webhooks: "Sent if and only if audited … nothing is sent for a
    change that was rolled back", and "a connection error … is retried"."""
    from bot import audit
    receiver = await receivers()
    closed_url = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens there
    box = await hooked_box((receiver, ["alert"]), (_PlainReceiver(closed_url), ["alert"]))
    box.bot.dispatcher.base_delay = 0.05
    now = box.bot.clock.now()
    try:
        async with box.bot.db.transaction() as conn:
            await audit.append(conn, box.bot.audit_key, at=now, actor="breakglass",
                               event="alert", details={"kind": "test", "text": "rolled back"})
            raise _Abort
    except _Abort:
        pass
    async with box.bot.db.transaction() as conn:
        await audit.append(conn, box.bot.audit_key, at=now, actor="breakglass",
                           event="alert", details={"kind": "test", "text": "kept"})
    box.bot.dispatcher.wake()
    await until(lambda: len(receiver.delivered()) == 1, 5, "the committed alert not sent")
    assert [r.json["details"]["text"] for r in receiver.received] == ["kept"]
    rows = [r for r in await _outbox(box) if r["lane"] == lane_of(closed_url)]
    assert len(rows) == 1 and "rolled back" not in json.dumps(rows[0]["payload"])

    async def retried() -> bool:
        [row] = [r for r in await _outbox(box) if r["lane"] == lane_of(closed_url)]
        return bool(row["attempts"] >= 2 and row["status"] == "pending")

    await until(retried, 10, "a refused connection was not retried")


class _Abort(Exception):
    pass


class _PlainReceiver:
    """A webhook entry for a URL nobody answers (webhooks_policy needs a url and secret)."""

    def __init__(self, url: str) -> None:
        import secrets

        self.url = url
        self.secret: bytes | None = secrets.token_hex(16).encode()


async def test_healthz_names_the_sha256_of_the_running_policy(sandbox: Sandbox) -> None:
    """operations.md, Health: "`policy_sha256` is the SHA-256 of the policy text this
    process runs (compare it across replicas after a reload)"."""
    import hashlib

    async def health() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(sandbox.url + "/healthz") as resp:
                assert resp.status == 200
                return dict(await resp.json())

    got = await health()
    assert got["policy_sha256"] == hashlib.sha256(sandbox.policy_text.encode()).hexdigest()
    assert (got["status"], got["database"], got["mode"], got["signing_keys"]) == (
        "ok", True, "http", "ok")
    changed = sandbox.policy_text + "\n# reviewed 2026-12-01\n"
    assert (await sandbox.bot.reload_policy(changed)).outcome == "reloaded"
    assert (await health())["policy_sha256"] == hashlib.sha256(changed.encode()).hexdigest()


# --------------------------------------------------------------------- policy.md


async def test_a_quorum_a_usergroup_cannot_reach_is_refused_at_request_time(
        make_box: MakeBox) -> None:
    """policy.md, Quorum: "With a `usergroup` the pool is only known live, so the check
    happens at request time instead: when fewer people than `quorum`, not counting the
    requester, could approve, the request is refused (*needs 2 approvals from people
    other than you, but its approver groups have only 1 such member(s)*)"."""
    extra = ('\n[groups.tiny]\nusergroup = "S0TINY"\n\n[scopes.tiny-write]\n'
             'description = "A scope with a small live approver pool"\naudience = "tiny-api"\n'
             'permissions = ["tiny:write"]\nrequesters = ["oncall"]\napprovers = ["tiny"]\n'
             "quorum = 2\n")
    box = await make_box(extra_policy=extra)
    box.emulator.set_usergroup("S0TINY", [ALICE, BOB])
    resp = await command(box, ALICE, f"tiny-write 10m {REASON}")
    said = json.dumps(resp.json) + json.dumps(
        [r.body for r in box.emulator.responses if r.url == resp.response_url])
    assert ("needs 2 approvals from people other than you, but its approver groups have "
            "only 1 such member(s)") in said
    assert not any("tiny-write" in m.text for m in box.emulator.messages(REVIEWS))
    box.emulator.set_usergroup("S0TINY", [ALICE, BOB, CAROL])
    box.bot.directory._cache.clear()  # noqa: SLF001 - Slack's answer is cached for a minute
    await command(box, ALICE, f"tiny-write 10m {REASON}")
    assert any("tiny-write" in m.text for m in box.emulator.messages(REVIEWS))


async def test_all_of_a_scopes_triggers_are_probed_at_once(make_box: MakeBox) -> None:
    """policy.md, Triggers: "All of a scope's triggers are probed at once, so a request
    waits at most for the longest `timeout`". Two triggers that never answer, 2 s each:
    the card comes after about 2 s, not 4 s."""
    extra = ("\n[triggers.slow-a]\ndescription = \"A\"\n"
             'http = "{url}/auth/health"\nholds_when = "down"\ntimeout = "2s"\n'
             "\n[triggers.slow-b]\ndescription = \"B\"\n"
             'http = "{url}/db/health"\nholds_when = "down"\ntimeout = "2s"\n'
             '\n[scopes.both-slow]\ndescription = "Two slow triggers"\naudience = "slow-api"\n'
             'permissions = ["slow:write"]\nrequesters = ["oncall"]\napprovers = ["sre-leads"]\n'
             'triggers = ["slow-a", "slow-b"]\n')
    box = await make_box()
    await box.stop_bot()
    box.policy_text = box.policy_text + extra.format(url=box.probes.url)
    (Path(box.settings.policy_path)).write_text(box.policy_text)  # the file watcher agrees
    await box.start_bot()
    box.probes.status.update(auth=None, db=None)  # both hang: each probe times out (holds)
    started = time.monotonic()
    await timed(box.slack.command(ALICE, f"both-slow 10m {REASON}"))
    await until(lambda: any("both-slow" in m.text for m in box.emulator.messages(REVIEWS)),
                6, "no card")
    took = time.monotonic() - started
    assert 1.8 <= took < 3.5, f"the card came {took:.1f}s after the command"


async def test_hash_secret_takes_ln_within_its_range(tmp_path: Path) -> None:
    """policy.md, clients: "`breakglass hash-secret` … takes `--ln` (log2 of scrypt's N,
    12 to 22, default 15)"."""
    import subprocess
    import sys

    from bot.core import client_secrets

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot", "hash-secret", *args],  # noqa: S603
                              input="a-long-random-client-secret\n", capture_output=True,
                              text=True, timeout=60, check=False)

    made = await asyncio.to_thread(run, "--ln", "12")
    assert made.returncode == 0, made.stderr
    value = made.stdout.strip().removeprefix('secret_hash = "').removesuffix('"')
    assert value.startswith("scrypt$ln=12,r=8,p=1$")
    assert client_secrets.verify("a-long-random-client-secret", client_secrets.parse(value))
    for bad in ("11", "23"):
        refused = await asyncio.to_thread(run, "--ln", bad)
        assert refused.returncode == 2 and refused.stdout == ""
        assert f"--ln must be from 12 to 22, not {bad}" in refused.stderr


async def test_rotate_master_without_a_readable_policy_still_rotates_and_audits(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """operations.md, keys rotate-master: "if `BREAKGLASS_POLICY` cannot be read it still
    rotates and audits, and says on stderr that no alert was posted"."""
    import os
    import subprocess
    import sys

    from bot.core.kdf import new_master_key
    from bot.store.schema import audit_log

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    env.update({"BREAKGLASS_DATABASE_URL": sandbox.database_url or "",
                "BREAKGLASS_OLD_MASTER_KEY": sandbox.master_key,
                "BREAKGLASS_MASTER_KEY": new_master_key(),
                "BREAKGLASS_POLICY": str(tmp_path / "no-such-policy.toml")})
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot", "keys", "rotate-master"], env=env,
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 1 signing key(s)" in done.stdout
    assert "warning: no alert posted" in done.stderr and "the rotation is audited" in done.stderr
    async with sandbox.bot.db.read() as conn:
        events = [e for (e,) in await conn.execute(select(audit_log.c.event))]
    assert events.count("master_key_rotated") == 1 and "alert" not in events


async def test_a_webhook_429_uses_up_no_attempt(hooked_box, receivers) -> None:
    """reliability.md, Webhooks: "`Retry-After` … is waited for, and a 429 uses up no
    attempt": with one attempt allowed, two 429s still end in a delivery."""
    receiver = await receivers(script=[(429, {"Retry-After": "1"}), (429, {"Retry-After": "1"})])
    box = await hooked_box((receiver, ["requested"]))
    box.bot.dispatcher.max_attempts = 1
    await command(box, ALICE, f"payments-write 30m {REASON}")
    await until(lambda: len(receiver.delivered()) == 1, 10, "a 429 used up the only attempt")
    assert [r.status for r in receiver.received] == [429, 429, 200]
    [row] = [r for r in await _outbox(box) if r["lane"] == lane_of(receiver.url)]
    assert row["status"] == "sent"


async def test_keys_rotate_after_an_algorithm_change_names_the_key_that_signed_before(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """operations.md, keys rotate: "Makes a new signing key current and retires the
    others … audited (`key_rotated`, … the new and previous kid)", also when the policy's
    `tokens.algorithm` changed since the bot made its key: the previous kid is the key
    that signed until then, every other key is retired, the new key has the new algorithm."""
    import os
    import subprocess
    import sys

    from bot.store.schema import audit_log, signing_keys

    before = sandbox.bot.keyring.current.kid
    await sandbox.stop_bot()  # the bot is down while its policy changes (else it would
    # remake an RS256 key of its own policy's algorithm right after the rotation)
    policy = tmp_path / "es256.toml"
    policy.write_text(sandbox.policy_text.replace('algorithm = "RS256"', 'algorithm = "ES256"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    env.update({"BREAKGLASS_DATABASE_URL": sandbox.database_url or "",
                "BREAKGLASS_MASTER_KEY": sandbox.master_key, "BREAKGLASS_POLICY": str(policy)})
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot", "keys", "rotate"], env=env,
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    async with sandbox.bot.db.read() as conn:
        keys = {r.kid: r for r in await conn.execute(select(signing_keys))}
        rotated = [json.loads(d) for (d,) in await conn.execute(
            select(audit_log.c.details).where(audit_log.c.event == "key_rotated"))]
    [live] = [k for k in keys.values() if k.retired_at is None]
    assert live.alg == "ES256" and live.kid in done.stdout
    assert len(rotated) == 1
    assert (rotated[0]["kid"], rotated[0]["previous"], rotated[0]["alg"]) == (
        live.kid, before, "ES256")
