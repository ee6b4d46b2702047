"""Audit checkpoints (contract §6): the head of the audit log, signed, posted to the
incident channel within a minute of a token event and hourly, once across processes;
and `breakglass audit verify --slack` reading them back through conversations.history
to catch a cut of the log's tail or a rewritten log, and raising the alert.

The real bot over loopback HTTP and the Slack emulator; the attacker drops the audit
log's triggers and edits the database as someone with write access could."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import select, text

from bot import audit
from bot.core import checkpoint
from bot.core.clock import ManualClock
from bot.core.tokens import SigningKey, generate_private_key
from bot.delivery.audit_publish import EVENT, GATHER, publish_head
from bot.local.emulator import BOT_USER_ID, Message
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, MALLORY, REVIEWS, Sandbox
from bot.runtime import Runtime
from bot.store.db import Database
from bot.store.schema import audit_log

ROOT = Path(__file__).resolve().parent.parent
STEP = GATHER + timedelta(seconds=1)  # past the time a security event waits for company


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def box(tmp_path: Path, database_url: str) -> AsyncIterator[Sandbox]:
    """The bot on a clock that moves only when told to (on SQLite, then PostgreSQL)."""
    sandbox = Sandbox(directory=tmp_path, database_url=database_url,
                      clock=ManualClock(datetime.now(UTC)), sweep_interval=0.05)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.stop()


def clock(box: Sandbox) -> ManualClock:
    assert isinstance(box.clock, ManualClock)
    return box.clock


def posted(box: Sandbox) -> list[Message]:
    """The bot's checkpoint messages in the incident channel, oldest first."""
    return [m for m in box.emulator.messages(INCIDENT)
            if m.user == BOT_USER_ID and m.text.startswith(checkpoint.PREFIX)]


def parsed(message: Message) -> checkpoint.Found:
    found = checkpoint.parse_message(message.text)
    assert found is not None and found.signed is not None
    return found


async def wait_checkpoints(box: Sandbox, n: int, timeout: float = 5.0) -> list[Message]:
    await box.emulator.wait_for(lambda: len(posted(box)) >= n, timeout)
    await box.settle()
    return posted(box)


async def rows(db: Database) -> list[dict[str, Any]]:
    return [r async for r in audit.export(db)]


async def last_event(db: Database, event: str) -> dict[str, Any]:
    return [r for r in await rows(db) if r["event"] == event][-1]


async def flow_to_issued(box: Sandbox, reason: str = "INC-7 auth down") -> str:
    await box.slack.command(ALICE, f"payments-write 30m {reason}")
    await box.settle()
    rid = box.latest_request_id()
    for who in (BOB, CAROL):
        await box.slack.click(who, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
    return rid


async def sweeps(box: Sandbox, n: int = 4) -> None:
    """Let the sweeper run a few times (it runs every 50 ms here)."""
    await asyncio.sleep(box.sweep_interval * n)
    await box.settle()


async def jwks(box: Sandbox) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{box.url}/.well-known/jwks.json") as resp:
        return await resp.json()  # type: ignore[no-any-return]


def cli_env(box: Sandbox, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    assert box.directory is not None
    env.update(BREAKGLASS_DATABASE_URL=box.database_url, BREAKGLASS_MASTER_KEY=box.master_key,
               BREAKGLASS_POLICY=str(box.directory / "breakglass.toml"),
               SLACK_BOT_TOKEN=box.bot_token, SLACK_API_URL=box.emulator.api_url)
    env.update(extra)
    return env


@dataclass
class Run:
    code: int
    out: str
    err: str


async def verify_slack(box: Sandbox, *args: str, **env: str) -> Run:
    """`python -m bot audit verify --slack` as cron would run it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "audit", "verify", "--slack", *args, env=cli_env(box, **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def alerts(box: Sandbox) -> list[Message]:
    return [m for m in box.emulator.messages(INCIDENT) if m.text.startswith(":rotating_light:")]


@contextlib.asynccontextmanager
async def attacker(box: Sandbox) -> AsyncIterator[Any]:
    """A connection of someone with write access to the database, the audit log's
    triggers dropped."""
    db = Database(box.database_url)
    try:
        async with db.transaction() as conn:
            if db.is_sqlite:
                for name in ("audit_log_no_update", "audit_log_no_delete", "audit_log_next_seq"):
                    await conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
            else:
                for name in ("audit_log_no_update_delete", "audit_log_next_seq"):
                    await conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON audit_log")
            yield conn
    finally:
        await db.dispose()


async def rechain_without(box: Sandbox, drop: int) -> None:
    """An insider with the MAC key removes row `drop` and re-chains everything after it."""
    db = Database(box.database_url)
    try:
        kept = [r for r in await rows(db) if r["seq"] != drop]
    finally:
        await db.dispose()
    key = box.bot.audit_key
    async with attacker(box) as conn:
        await conn.execute(text("DELETE FROM audit_log"))
        prev = audit.GENESIS_MAC
        for seq, r in enumerate(kept, start=1):
            details = audit.canonical_details(r["details"])
            prev = audit.compute_mac(key, prev, seq, r["at"], r["actor"], r["event"],
                                     r["request_id"], details)
            await conn.execute(audit_log.insert().values(
                seq=seq, at=datetime.fromisoformat(r["at"]), actor=r["actor"], event=r["event"],
                request_id=r["request_id"], details=details, mac=prev))


async def head_of(box: Sandbox) -> tuple[int, str]:
    db = Database(box.database_url)
    try:
        async with db.read() as conn:
            return await audit.head(conn)
    finally:
        await db.dispose()


# --------------------------------------------------------------------------- publishing


async def test_a_checkpoint_follows_issued_revealed_revoked_and_reviewed_within_a_minute(
        box: Sandbox) -> None:
    rid = await flow_to_issued(box)
    await sweeps(box)
    assert posted(box) == []  # a security event waits briefly for others to share its checkpoint
    seen = 0
    for step in ("issued", "revealed", "revoked", "reviewed"):
        if step == "revealed":
            await box.slack.click(ALICE, "bg_reveal", rid, channel_id=box.emulator.dm_channel_for(ALICE))
            await box.settle()
        elif step == "revoked":
            await box.slack.command(BOB, f"revoke {rid}")
            await box.settle()
        elif step == "reviewed":
            await box.slack.command(CAROL, f"review {rid} Refunds replayed by hand; runbook updated")
            await box.settle()
        event = await last_event(box.bot.db, step)
        clock(box).advance(STEP)
        messages = await wait_checkpoints(box, seen + 1)
        assert len(messages) == seen + 1, "one checkpoint per burst"
        seen += 1
        found = parsed(messages[-1])
        assert found.checkpoint is not None
        assert found.seq >= event["seq"], f"the checkpoint after {step} does not cover it"
        delay = found.checkpoint.at - datetime.fromisoformat(event["at"])
        assert timedelta(0) <= delay <= timedelta(seconds=60), (step, delay)
        # Exactly what the database stores for that row, and recorded in the log itself.
        async with box.bot.db.read() as conn:
            stored = await conn.scalar(select(audit_log.c.mac).where(audit_log.c.seq == found.seq))
        assert stored == found.mac
        record = await last_event(box.bot.db, EVENT)
        assert record["seq"] == found.seq + 1 and record["details"]["seq"] == found.seq
        assert record["details"]["jws"] == found.signed.jws  # type: ignore[union-attr]
        checkpoint.verify(found.signed, box.bot.keyring.verification_keys)  # type: ignore[arg-type]
    await sweeps(box)
    assert len(posted(box)) == seen  # nothing new happened: no new checkpoint
    assert (await audit.verify(box.bot.db, box.bot.audit_key)).ok


async def test_hourly_while_anything_is_written_and_not_when_idle(box: Sandbox) -> None:
    await sweeps(box)
    assert posted(box) == []  # the first rows (the start) wait for the hour
    clock(box).advance(timedelta(minutes=61))
    [first] = await wait_checkpoints(box, 1)
    clock(box).advance(timedelta(hours=3))  # nothing written since: nothing to publish
    await sweeps(box)
    assert len(posted(box)) == 1
    await box.slack.command(MALLORY, "payments-write 30m let me in")  # refused: not a token event
    await box.settle()
    [_, after_idle] = await wait_checkpoints(box, 2)  # the first row after an idle hour: at once
    assert parsed(after_idle).seq > parsed(first).seq
    await box.slack.command(MALLORY, "payments-write 30m again")
    await box.settle()
    clock(box).advance(timedelta(minutes=59))
    await sweeps(box)
    assert len(posted(box)) == 2
    clock(box).advance(timedelta(minutes=2))
    [*_, hourly] = await wait_checkpoints(box, 3)
    refused = await last_event(box.bot.db, "refused")
    assert parsed(hourly).seq >= refused["seq"]


async def test_two_runtimes_on_one_database_post_each_checkpoint_once(box: Sandbox) -> None:
    from bot.core.policy import parse_policy

    other = Runtime(box.settings, parse_policy(box.policy_text), clock=box.clock,
                    sweep_interval=0.01, policy_text=box.policy_text)
    await other.start()
    try:
        for i in range(4):
            rid = await flow_to_issued(box, f"INC-{i} race")
            clock(box).advance(STEP)
            await wait_checkpoints(box, 2 * i + 1)
            await asyncio.sleep(0.3)  # both sweepers had many turns
            await other.dispatcher.drain(5)
            await box.settle()
            await box.slack.command(BOB, f"revoke {rid}")
            await box.settle()
            clock(box).advance(STEP)
            await wait_checkpoints(box, 2 * i + 2)
            await asyncio.sleep(0.3)
            await other.dispatcher.drain(5)
            await box.settle()
        messages = posted(box)
        seqs = [parsed(m).seq for m in messages]
        assert len(seqs) == len(set(seqs)) == 8, seqs
        records = [r for r in await rows(box.bot.db) if r["event"] == EVENT]
        assert [r["details"]["seq"] for r in records] == seqs
    finally:
        await other.stop(drain_seconds=2.0)


@pytest.mark.parametrize("event", ["reviewed", "delivered"])
async def test_a_reviewed_or_delivered_event_is_a_token_event_too(database_url: str,
                                                                  event: str) -> None:
    """`delivered` is what delivery = "message" writes instead of `revealed`: the token
    reached its holder, so the checkpoint follows within the minute, not the hour."""
    db = Database(database_url)
    await db.create_schema()
    key = os.urandom(32)
    private = generate_private_key("ES256")
    signer = SigningKey("bg-es", "ES256", private, private.public_key())
    at = ManualClock(datetime.now(UTC))
    try:
        async with db.transaction() as conn:
            await audit.append(conn, key, at=at.now(), actor="breakglass", event="started",
                               details={})
        at.advance(timedelta(minutes=5))
        assert await publish_head(db, key, at, INCIDENT, signer) is None  # not an hour yet
        async with db.transaction() as conn:
            await audit.append(conn, key, at=at.now(), actor=BOB, event=event,
                               details={"summary": "fine"}, request_id="R2345678")
        at.advance(GATHER - timedelta(seconds=1))
        assert await publish_head(db, key, at, INCIDENT, signer) is None  # still gathering
        at.advance(timedelta(seconds=1))
        signed = await publish_head(db, key, at, INCIDENT, signer)
        assert signed is not None and signed.seq == 2
        checkpoint.verify(signed, {"bg-es": signer.verification_key})
    finally:
        await db.dispose()


async def test_a_checkpoint_reaches_every_webhook_whatever_it_lists(tmp_path: Path,
                                                                    database_url: str) -> None:
    """Delivered by the outbox to a real receiver on loopback that checks the webhook
    signature itself; the checkpoint inside checks with the JWKS key."""
    from webhook_receiver import Receiver

    receiver = await Receiver(secret=os.urandom(16).hex().encode()).start()
    hook = (f'\n[[webhooks]]\nurl = "{receiver.url}"\nsecret_env = "CHECKPOINT_HOOK_SECRET"\n'
            'events = ["requested"]\n')
    assert receiver.secret is not None
    sandbox = Sandbox(directory=tmp_path, database_url=database_url,
                      clock=ManualClock(datetime.now(UTC)), sweep_interval=0.05, extra_policy=hook,
                      env={"CHECKPOINT_HOOK_SECRET": receiver.secret.decode()})
    await sandbox.start()
    try:
        await flow_to_issued(sandbox)
        clock(sandbox).advance(STEP)
        [message] = await wait_checkpoints(sandbox, 1)
        await sandbox.emulator.wait_for(lambda: "checkpoint" in receiver.events(), 10)
        assert receiver.events() == ["requested", "checkpoint"]  # listed, and always sent
        assert all(receiver.signature_ok(r) for r in receiver.received)
        body = receiver.delivered()[-1]
        found = parsed(message)
        details = body["details"]
        assert (details["seq"], details["mac"]) == (found.seq, found.mac)
        assert body["seq"] == found.seq + 1  # the checkpoint's own audit row
        keys = {k["kid"]: k for k in (await jwks(sandbox))["keys"]}
        jwk = keys[details["kid"]]
        compact = checkpoint.attach(details["jws"], details["payload"].encode())
        signed = jwt.api_jws.decode(compact, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]])
        assert json.loads(signed) == {"seq": found.seq, "mac": found.mac,
                                      "at": found.checkpoint.at_text}  # type: ignore[union-attr]
    finally:
        await sandbox.stop()
        await receiver.stop()


# --------------------------------------------------------------------------- the signature


def docs_snippet() -> str:
    doc = (ROOT / "docs" / "security-teams.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n(# check_checkpoint\.py.*?)```", doc, re.S)
    assert found, "docs/security-teams.md lost its checkpoint-checking snippet"
    return found.group(1)


async def test_anyone_checks_a_checkpoint_with_the_jwks_key_as_the_docs_show(box: Sandbox) -> None:
    await flow_to_issued(box)
    clock(box).advance(STEP)
    [message] = await wait_checkpoints(box, 1)
    namespace: dict[str, Any] = {}
    exec(compile(docs_snippet(), "docs/security-teams.md", "exec"), namespace)  # noqa: S102
    url = f"{box.url}/.well-known/jwks.json"
    claims = await asyncio.to_thread(namespace["check_checkpoint"], message.text, url)
    found = parsed(message)
    assert claims == {"seq": found.seq, "mac": found.mac, "at": found.checkpoint.at_text}  # type: ignore[union-attr]
    assert found.signed is not None and found.signed.kid in {k["kid"] for k in (await jwks(box))["keys"]}
    # Any change to what the message says breaks the signature.
    wrong = message.text.replace(found.mac, "0" * 64)
    with pytest.raises(jwt.InvalidSignatureError):
        await asyncio.to_thread(namespace["check_checkpoint"], wrong, url)
    # No JWT-shaped text stands in Slack: the payload is printed, not base64-encoded.
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", message.text)


def test_signatures_of_every_algorithm_and_what_they_refuse() -> None:
    cp = checkpoint.Checkpoint(42, "ab" * 32, datetime(2026, 11, 30, 21, 0, tzinfo=UTC))
    keys: dict[str, Any] = {}
    for alg in ("RS256", "ES256", "EdDSA"):
        private = generate_private_key(alg)
        sk = SigningKey(f"bg-{alg.lower()}", alg, private, private.public_key())
        keys[sk.kid] = sk.verification_key
        signed = checkpoint.sign(cp, sk)
        checkpoint.verify(signed, keys)
        again = checkpoint.parse_message(checkpoint.message(signed))
        assert again is not None and again.signed == signed
        for bad in (checkpoint.Checkpoint(43, cp.mac, cp.at),
                    checkpoint.Checkpoint(42, "cd" * 32, cp.at),
                    checkpoint.Checkpoint(42, cp.mac, cp.at + timedelta(microseconds=1))):
            with pytest.raises(checkpoint.BadCheckpoint, match="does not verify"):
                checkpoint.verify(checkpoint.Signed(bad, signed.jws, signed.kid), keys)
    # A key the bot does not hold, and HS256 with a public key as the secret.
    private = generate_private_key("EdDSA")
    stranger = SigningKey("bg-stranger", "EdDSA", private, private.public_key())
    with pytest.raises(checkpoint.BadCheckpoint, match="does not hold"):
        checkpoint.verify(checkpoint.sign(cp, stranger), keys)
    rsa_kid = "bg-rs256"
    hs = jwt.api_jws.encode(cp.payload(), b"public key bytes as an HMAC secret", algorithm="HS256",
                            headers={"kid": rsa_kid, "typ": checkpoint.TYPE})
    header, _, sig = hs.split(".")
    with pytest.raises(checkpoint.BadCheckpoint, match="header"):
        checkpoint.verify(checkpoint.Signed(cp, f"{header}..{sig}", rsa_kid), keys)
    for junk in ("", "..", "a..", "..b", "not a jws", "eyJ..x"):
        with pytest.raises(checkpoint.BadCheckpoint):
            checkpoint.verify(checkpoint.Signed(cp, junk, "x"), keys)


def test_only_a_message_that_starts_as_a_checkpoint_is_one() -> None:
    assert checkpoint.parse_message("hello") is None
    assert checkpoint.parse_message(
        ':large_yellow_circle: *requested* R1: reason `breakglass-checkpoint v1 {"at":"x"} a..b`'
    ) is None
    legacy = checkpoint.parse_message(
        ":ledger: Audit checkpoint: the audit log's head is sequence 17 with MAC "
        f"`{'ab' * 32}`. Keep this message.")
    assert legacy is not None and (legacy.seq, legacy.mac, legacy.signed) == (17, "ab" * 32, None)
    for damaged in (f"{checkpoint.PREFIX}: nothing readable",
                    f'{checkpoint.PREFIX}: `{checkpoint.MARKER} {{"at":"x","mac":"y","seq":1}} a..b`',
                    f'{checkpoint.PREFIX}: `{checkpoint.MARKER} {{"seq": 1}} a..b`'):
        with pytest.raises(checkpoint.BadCheckpoint):
            checkpoint.parse_message(damaged)


# --------------------------------------------------------------------------- verify --slack


async def published_flow(box: Sandbox) -> checkpoint.Found:
    """A flow with a checkpoint in the channel; the bot stopped (the attacker's turn)."""
    rid = await flow_to_issued(box)
    await box.slack.command(BOB, f"revoke {rid}")
    await box.settle()
    clock(box).advance(STEP)
    [message] = await wait_checkpoints(box, 1)
    await box.stop_bot()
    return parsed(message)


async def test_verify_slack_passes_when_the_log_matches(box: Sandbox) -> None:
    found = await published_flow(box)
    run = await verify_slack(box)
    assert run.code == 0, run.out + run.err
    assert "audit log intact" in run.out
    assert f"1 audit checkpoint(s) in {INCIDENT}" in run.out and "match the database" in run.out
    assert f"sequence {found.seq}" in run.out
    assert alerts(box) == []
    assert box.bot_token not in run.out + run.err
    later = (found.checkpoint.at + timedelta(days=1)).isoformat()  # type: ignore[union-attr]
    run = await verify_slack(box, "--since", later)
    assert run.code == 0 and "no audit checkpoint from the bot" in run.out, run.out + run.err
    assert box.emulator.calls_to("conversations.history")[-1].params.get("oldest")
    bad = await verify_slack(box, "--since", "last tuesday")
    assert bad.code == 2 and "--since" in bad.err and "Traceback" not in bad.err


async def test_verify_slack_catches_a_cut_of_the_tail_and_alerts(box: Sandbox) -> None:
    found = await published_flow(box)
    async with attacker(box) as conn:
        await conn.execute(text(f"DELETE FROM audit_log WHERE seq >= {found.seq - 1}"))
    run = await verify_slack(box)
    assert run.code == 1, run.out + run.err
    assert "audit log intact" in run.out  # the chain alone cannot tell
    assert f"audit checkpoint mismatch: the checkpoint of sequence {found.seq}" in run.out
    assert f"its log ends at {found.seq - 2}" in run.out
    [alert] = alerts(box)
    assert "Audit checkpoint comparison failed" in alert.text and f"sequence {found.seq}" in alert.text
    assert "alert posted to the incident channel" in run.out
    quiet = await verify_slack(box, "--no-alert")
    assert quiet.code == 1 and len(alerts(box)) == 1


async def test_a_failed_comparison_alerts_slack_and_every_webhook_listing_alert(
        tmp_path: Path, database_url: str) -> None:
    """From cron, with no bot running: the Slack alert is posted by the command itself;
    the webhook event `alert` is queued with the audit row and leaves with the bot."""
    from webhook_receiver import Receiver

    receiver = await Receiver(secret=os.urandom(16).hex().encode()).start()
    assert receiver.secret is not None
    secret = {"CHECKPOINT_ALERT_SECRET": receiver.secret.decode()}
    hook = (f'\n[[webhooks]]\nurl = "{receiver.url}"\nsecret_env = "CHECKPOINT_ALERT_SECRET"\n'
            'events = ["alert"]\n')
    sandbox = Sandbox(directory=tmp_path, database_url=database_url,
                      clock=ManualClock(datetime.now(UTC)), sweep_interval=0.05, extra_policy=hook,
                      env=secret)
    await sandbox.start()
    try:
        found = await published_flow(sandbox)
        async with attacker(sandbox) as conn:
            await conn.execute(text(f"DELETE FROM audit_log WHERE seq >= {found.seq}"))
        run = await verify_slack(sandbox, **secret)
        assert run.code == 1, run.out + run.err
        [alert] = alerts(sandbox)
        assert f"sequence {found.seq}" in alert.text
        assert "the webhook event alert is queued for 1 webhook(s)" in run.out
        await sandbox.start_bot()
        await sandbox.emulator.wait_for(lambda: "alert" in receiver.events(), 10)
        body = next(b for b in receiver.delivered() if b["event"] == "alert")
        assert body["details"]["kind"] == "checkpoint_mismatch"
        assert body["details"]["first_bad_seq"] == found.seq
        assert any(f"sequence {found.seq}" in p for p in body["details"]["problems"])
        assert all(receiver.signature_ok(r) for r in receiver.received)
        assert len(alerts(sandbox)) == 1  # the bot does not post the CLI's alert again
    finally:
        await sandbox.stop()
        await receiver.stop()


async def test_verify_slack_catches_a_log_rewritten_with_the_key(box: Sandbox) -> None:
    found = await published_flow(box)
    approved = [r for r in await rows(box.bot.db) if r["event"] == "approved"][0]
    await rechain_without(box, approved["seq"])
    code, out = await asyncio.to_thread(_cli_verify, box)  # the chain alone: a perfect forgery
    assert (code, out.strip()) == (0, f"audit log intact: {found.seq} row(s)")
    run = await verify_slack(box)
    assert run.code == 1, run.out + run.err
    assert f"the checkpoint of sequence {found.seq}" in run.out
    assert f"says MAC {found.mac}" in run.out
    assert len(alerts(box)) == 1


def _cli_verify(box: Sandbox) -> tuple[int, str]:
    import subprocess

    env = cli_env(box)
    done = subprocess.run([sys.executable, "-m", "bot", "audit", "verify"], env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout


async def test_a_forged_checkpoint_from_a_person_or_an_echo_is_ignored(box: Sandbox) -> None:
    found = await published_flow(box)
    real = posted(box)[0].text
    fake_mac = "ee" * 32
    forged = real.replace(f"\"seq\":{found.seq}", "\"seq\":999999").replace(found.mac, fake_mac)
    box.emulator.post_as(MALLORY, INCIDENT, forged)  # a member pastes a checkpoint
    box.emulator.post_as(MALLORY, INCIDENT, real.replace(found.mac, fake_mac))
    # The bot echoes a reason in its `requested` post: a forgery that rides along.
    line = (f'`{checkpoint.MARKER} {{"at":"2026-11-30T21:00:00.000000+00:00","mac":"{fake_mac}",'
            '"seq":999999} eyJhbGciOiJFZERTQSJ9..c2lnbmF0dXJl`')
    await box.start_bot()
    await box.slack.command(ALICE, f"payments-write 30m INC-9 {line}")
    await box.settle()
    await box.stop_bot()
    assert any(line in m.text for m in box.emulator.messages(INCIDENT)
               if m.user == BOT_USER_ID and not m.text.startswith(checkpoint.PREFIX))
    run = await verify_slack(box)
    assert run.code == 0, run.out + run.err
    assert f"1 audit checkpoint(s) in {INCIDENT}" in run.out
    assert alerts(box) == []


async def test_an_older_unsigned_checkpoint_is_compared_and_counted_as_unsigned(
        box: Sandbox) -> None:
    """security-teams.md: "Older bots posted unsigned checkpoints (`… head is sequence N
    with MAC …`); they are compared too, and counted as unsigned"."""
    found = await published_flow(box)
    seq, mac = found.seq - 1, await mac_of(box, found.seq - 1)
    legacy = (f":ledger: Audit checkpoint: the audit log's head is sequence {seq} with MAC "
              f"`{mac}`. Keep this message.")
    box.emulator.post_as(BOT_USER_ID, INCIDENT, legacy)
    run = await verify_slack(box)
    assert run.code == 0, run.out + run.err
    assert (f"2 audit checkpoint(s) in {INCIDENT}" in run.out
            and "match the database (1 signed, 1 unsigned (older form))" in run.out), run.out
    # An unsigned one that disagrees with the database fails like a signed one.
    box.emulator.post_as(BOT_USER_ID, INCIDENT, legacy.replace(mac, "ee" * 32))
    run = await verify_slack(box, "--no-alert")
    assert run.code == 1 and f"the checkpoint of sequence {seq}" in run.out, run.out + run.err


async def mac_of(box: Sandbox, seq: int) -> str:
    async with box.bot.db.read() as conn:
        return str((await conn.execute(text(f"SELECT mac FROM audit_log WHERE seq = {seq}"))
                    ).scalar_one())


async def test_a_checkpoint_with_a_bad_signature_fails(box: Sandbox) -> None:
    """Someone holding the bot token posts a checkpoint: without the signing key it fails."""
    import aiohttp

    found = await published_flow(box)
    real = posted(box)[0].text
    async with attacker(box) as conn:  # and cut the tail to match their story
        await conn.execute(text(f"DELETE FROM audit_log WHERE seq > {found.seq - 2}"))
    seq, mac = await head_of(box)
    at = datetime.fromisoformat(json.loads(re.search(r"v1 (\{.*?\})", real).group(1))["at"])  # type: ignore[union-attr]
    private = generate_private_key("RS256")
    own = SigningKey(found.signed.kid, "RS256", private, private.public_key())  # type: ignore[union-attr]
    fake = checkpoint.message(checkpoint.sign(checkpoint.Checkpoint(seq, mac, at), own))
    async with aiohttp.ClientSession() as s:
        await s.post(f"{box.emulator.api_url}chat.postMessage",
                     json={"channel": INCIDENT, "text": fake},
                     headers={"Authorization": f"Bearer {box.bot_token}"})
    run = await verify_slack(box)
    assert run.code == 1, run.out + run.err
    assert f"the checkpoint of sequence {seq}" in run.out and "does not verify" in run.out
    assert f"the checkpoint of sequence {found.seq}" in run.out  # the cut is caught as well


async def test_verify_slack_reads_every_page_of_history(box: Sandbox) -> None:
    from bot.delivery.audit_slack import PAGE

    found = await published_flow(box)
    for i in range(2 * PAGE + 50):
        box.emulator.post_as(CAROL if i % 2 else MALLORY, INCIDENT, f"chatter {i}")
    async with attacker(box) as conn:  # the one checkpoint is the oldest message: last page
        await conn.execute(text(f"DELETE FROM audit_log WHERE seq >= {found.seq}"))
    run = await verify_slack(box)
    assert run.code == 1 and f"sequence {found.seq}" in run.out, run.out + run.err
    pages = box.emulator.calls_to("conversations.history")
    assert len(pages) == 3
    assert [bool(c.params.get("cursor")) for c in pages] == [False, True, True]
    assert all(int(c.params["limit"]) == PAGE for c in pages)
    assert "(3 page(s) of history)" in run.out


async def test_verify_slack_says_what_to_do_when_slack_cannot_answer(box: Sandbox) -> None:
    await published_flow(box)
    for error, words in (("missing_scope", "channels:history"),
                         ("channel_not_found", "incident_channel")):
        box.emulator.error("conversations.history", error)
        run = await verify_slack(box)
        assert run.code == 2 and words in run.err and "Traceback" not in run.err, (error, run.err)
    box.emulator.outside_channels.add(INCIDENT)  # the bot was removed from the channel
    run = await verify_slack(box)
    assert run.code == 2 and "/invite" in run.err and INCIDENT in run.err, run.err
    box.emulator.outside_channels.discard(INCIDENT)
    run = await verify_slack(box, SLACK_BOT_TOKEN="")
    assert run.code == 2 and "SLACK_BOT_TOKEN" in run.err
    run = await verify_slack(box, SLACK_BOT_TOKEN="xoxb-" + "0" * 24)
    assert run.code == 2 and "SLACK_BOT_TOKEN was refused" in run.err
    assert "0" * 24 not in run.err
    box.emulator.rate_limit("conversations.history", retry_after=1)  # waited out, not a failure
    run = await verify_slack(box)
    assert run.code == 0, run.out + run.err
    assert alerts(box) == []


async def test_racing_publishers_publish_each_head_once(database_url: str) -> None:
    """Four processes' worth of connections, writers appending while they race: each
    round exactly one of them publishes (the claim is taken under the appenders' lock)."""
    dbs = [Database(database_url) for _ in range(4)]
    try:
        await dbs[0].create_schema()
        key = os.urandom(32)
        private = generate_private_key("EdDSA")
        signer = SigningKey("bg-race", "EdDSA", private, private.public_key())
        at = ManualClock(datetime.now(UTC))

        async def write(db: Database, n: int) -> None:
            for i in range(n):
                async with db.transaction() as conn:
                    await audit.append(conn, key, at=at.now(), actor=ALICE, event="issued",
                                       details={"i": i})

        published = []
        for _ in range(10):
            await asyncio.gather(*(write(d, 2) for d in dbs))
            at.advance(STEP)
            results = await asyncio.gather(
                *(publish_head(d, key, at, INCIDENT, signer) for d in dbs),
                *(write(d, 1) for d in dbs[:2]))
            winners = [r for r in results[:4] if r is not None]
            assert len(winners) == 1, winners
            published.append(winners[0])
        records = [r for r in await rows(dbs[0]) if r["event"] == EVENT]
        assert [(r["details"]["seq"], r["details"]["mac"]) for r in records] == [
            (p.seq, p.mac) for p in published]
        async with dbs[0].read() as conn:
            macs = dict((await conn.execute(select(audit_log.c.seq, audit_log.c.mac))).all())
        assert all(macs[p.seq] == p.mac for p in published)
        assert (await audit.verify(dbs[0], key)).ok
    finally:
        for d in dbs:
            await d.dispose()
