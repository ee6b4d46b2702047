"""Webhooks (contract §7.6) end to end: the real bot over loopback HTTP, driven by
signed Slack requests, POSTing to a real receiver on loopback that checks each
signature itself. Covers order per webhook, retries (500, 429 with Retry-After, a
hang), dead letters and `breakglass outbox retry`, a restart with events pending,
the PagerDuty format, checkpoints to every webhook, and the policy's checks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import command, timed
from helpers import webhook_entry as hook
from sqlalchemy import select

from bot import audit
from bot.core.policy import PolicyError, parse_policy
from bot.delivery.webhooks import WebhookConfigError, lane_of
from bot.local.sandbox import ALICE, BOB, CAROL, Sandbox, sandbox_policy
from bot.store.schema import audit_log, outbox

JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
REASON = "INC-4521 auth provider down"
ALL = ["requested", "approved", "issued", "revealed", "used", "revoked", "expired", "refused",
       "alert", "cancelled"]


async def approve(box: Sandbox, rid: str, *users: str) -> None:
    for user in users:
        card = box.card(rid)
        await timed(box.slack.click(user, "bg_approve", rid, channel_id=card.channel,
                                    message_ts=card.ts))
        await box.settle()


async def issued(box: Sandbox) -> str:
    await command(box, ALICE, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    await approve(box, rid, BOB, CAROL)
    return rid


async def audited(box: Sandbox) -> list[tuple[int, str]]:
    async with box.bot.db.read() as conn:
        rows = await conn.execute(select(audit_log.c.seq, audit_log.c.event).order_by(audit_log.c.seq))
        return [(int(s), str(e)) for s, e in rows]


async def outbox_rows(box: Sandbox, lane: str) -> list[Any]:
    async with box.bot.db.read() as conn:
        return list((await conn.execute(
            select(outbox).where(outbox.c.lane == lane).order_by(outbox.c.id))).mappings())


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- delivery


async def test_every_listed_event_is_signed_and_sent_in_audit_order(hooked_box, receivers):
    first, second = await receivers(), await receivers()
    box = await hooked_box((first, ALL), (second, ["issued", "revoked"]))
    rid = await issued(box)
    await command(box, ALICE, f"revoke {rid}")

    rows = await audited(box)
    wanted = [(s, e) for s, e in rows if e in ALL]
    got = first.delivered()
    assert [(b["seq"], b["event"]) for b in got] == wanted
    assert [b["event"] for b in got] == ["requested", "approved", "approved", "issued", "revoked"]
    assert second.events() == ["issued", "revoked"]
    for r in (*first.received, *second.received):
        assert first.signature_ok(r) if r in first.received else second.signature_ok(r)
        assert r.headers["Content-Type"] == "application/json"
    body = got[3]
    assert set(body) == {"id", "seq", "event", "time", "actor", "request_id", "scope", "details"}
    assert body["request_id"] == rid and body["scope"] == "payments-write"
    assert body["actor"] == "breakglass" and body["time"].endswith("+00:00")
    assert got[2]["actor"] == CAROL
    assert isinstance(body["details"], dict)
    # One id per event: unique, and the same event carries the same id to both webhooks.
    ids = [b["id"] for b in got]
    assert len(set(ids)) == len(ids)
    assert {b["seq"]: b["id"] for b in second.delivered()}.items() <= {
        b["seq"]: b["id"] for b in got}.items()
    # Nothing secret leaves: no JWT anywhere in what was sent.
    assert not any(JWT_RE.search(r.body.decode()) for r in first.received)


SCHEME = 'X-Breakglass-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>'


def documented_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The contract's §7.6 scheme, written out here (not the bot's code, not the receiver's)."""
    return "v1=" + hmac.new(secret, timestamp.encode("ascii") + b"." + body,
                            hashlib.sha256).hexdigest()


async def test_a_delivery_carries_the_documented_signature_and_tampering_breaks_it(
        hooked_box, receivers):
    # The scheme as docs/policy.md (and the contract) write it: a change there fails here.
    policy_doc = (Path(__file__).parents[1] / "docs/policy.md").read_text()
    assert SCHEME in " ".join(policy_doc.split())
    receiver = await receivers()
    assert receiver.secret is not None
    secret = receiver.secret
    box = await hooked_box((receiver, ["requested", "approved"]))
    await command(box, ALICE, f"payments-write 30m {REASON}")
    await approve(box, box.latest_request_id(), BOB)
    await wait_until(lambda: len(receiver.received) == 2)
    for r in receiver.received:  # the raw bytes and headers as they came over HTTP
        ts, sig = r.headers["X-Breakglass-Timestamp"], r.headers["X-Breakglass-Signature"]
        assert re.fullmatch(r"[0-9]+", ts) and abs(time.time() - int(ts)) < 60
        assert re.fullmatch(r"v1=[0-9a-f]{64}", sig)
        assert hmac.compare_digest(sig, documented_signature(secret, ts, r.body))
        # Tampering with anything signed, or signing with anything else, does not verify.
        flipped = bytes([r.body[0] ^ 1]) + r.body[1:]
        forged = r.body.replace(b'"event": "', b'"event": "x').replace(b'"event":"', b'"event":"x')
        assert forged != r.body
        for wrong in (documented_signature(secret, ts, flipped),
                      documented_signature(secret, ts, forged),
                      documented_signature(secret, str(int(ts) + 1), r.body),
                      documented_signature(secret, ts, r.body + b" "),
                      documented_signature(b"not the secret", ts, r.body),
                      "v1=" + hmac.new(secret, r.body, hashlib.sha256).hexdigest(),
                      "v0=" + sig[3:]):
            assert not hmac.compare_digest(sig, wrong)
        # And a receiver that checks the scheme refuses the tampered copies.
        assert receiver.signature_ok(r)
        for body in (flipped, forged):
            assert not receiver.signature_ok(replace(r, body=body))
        assert not receiver.signature_ok(replace(r, headers={
            **r.headers, "X-Breakglass-Timestamp": str(int(ts) - 1)}))
    # Two deliveries, two signatures (different bodies; each with its own stamp).
    assert len({r.headers["X-Breakglass-Signature"] for r in receiver.received}) == 2


async def test_a_500_is_retried_with_backoff_and_order_is_kept(hooked_box, receivers):
    receiver = await receivers(script=[500, 502])
    box = await hooked_box((receiver, ["requested", "approved"]))
    box.bot.dispatcher.base_delay = 0.2
    await command(box, ALICE, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    await approve(box, rid, BOB)
    await box.settle(10)
    assert [r.status for r in receiver.received] == [500, 502, 200, 200]
    assert receiver.events() == ["requested", "approved"]
    # Each retry is the same event: same id and body, freshly signed.
    assert len({r.json["id"] for r in receiver.received[:3]}) == 1
    assert receiver.received[1].at - receiver.received[0].at >= 0.1  # backoff, not a loop
    assert all(receiver.signature_ok(r) for r in receiver.received)


async def test_a_429_waits_for_its_retry_after(hooked_box, receivers):
    receiver = await receivers(script=[(429, {"Retry-After": "2"})])
    box = await hooked_box((receiver, ["requested"]))
    box.bot.dispatcher.base_delay = 0.05
    await command(box, ALICE, f"payments-write 30m {REASON}")
    await wait_until(lambda: len(receiver.delivered()) == 1)
    first, second = receiver.received
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 1.9


async def test_a_hanging_receiver_times_out_and_the_event_is_retried(hooked_box, receivers):
    receiver = await receivers(script=["hang"])
    box = await hooked_box(
        f'\n[[webhooks]]\nurl = "{receiver.url}"\nsecret_env = "HANG_SECRET"\n'
        'events = ["requested"]\ntimeout = "1s"\n',
        env={"HANG_SECRET": receiver.secret.decode()})  # type: ignore[union-attr]
    box.bot.dispatcher.base_delay = 0.05
    started = time.monotonic()
    await command(box, ALICE, f"payments-write 30m {REASON}")  # the ack does not wait for it
    await wait_until(lambda: len(receiver.delivered()) == 1)
    assert len(receiver.received) == 2
    assert receiver.received[1].at - receiver.received[0].at >= 0.9
    assert time.monotonic() - started < 8


async def test_a_4xx_is_dead_lettered_at_once_and_outbox_retry_sends_it(hooked_box, receivers,
                                                                        monkeypatch):
    receiver = await receivers(script=[410])
    box = await hooked_box((receiver, ["requested", "approved"]))
    await command(box, ALICE, f"payments-write 30m {REASON}")
    rid = box.latest_request_id()
    await approve(box, rid, BOB)  # a dead row does not hold up its lane
    assert receiver.events() == ["approved"]
    lane = lane_of(receiver.url)
    rows = await outbox_rows(box, lane)
    assert [r["status"] for r in rows] == ["dead", "sent"]
    assert "HTTP 410" in rows[0]["last_error"]

    monkeypatch.setenv("BREAKGLASS_DATABASE_URL", box.database_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "outbox", "retry", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().startswith("1 dead-lettered event(s)")
    box.bot.dispatcher.wake()
    await box.settle()
    assert receiver.events() == ["approved", "requested"]
    assert [r["status"] for r in await outbox_rows(box, lane)] == ["sent", "sent"]


async def test_after_max_attempts_an_event_is_dead_lettered(hooked_box, receivers):
    receiver = await receivers(script=[503, 503, 503])
    box = await hooked_box((receiver, ["requested"]))
    box.bot.dispatcher.base_delay = 0.05
    box.bot.dispatcher.max_attempts = 3
    await command(box, ALICE, f"payments-write 30m {REASON}")
    await box.settle(10)
    [row] = await outbox_rows(box, lane_of(receiver.url))
    assert row["status"] == "dead" and "503" in row["last_error"]
    assert len(receiver.received) == 3


async def test_events_pending_at_a_restart_are_delivered_once_after_it(hooked_box, receivers):
    receiver = await receivers(script=[503] * 1000)
    box = await hooked_box((receiver, ["requested", "approved", "issued"]))
    rid = await _issue_without_settling(box)
    await box.stop_bot()  # the receiver still fails: everything is pending
    lane = lane_of(receiver.url)
    assert receiver.delivered() == []
    receiver.script.clear()
    await box.start_bot()
    await box.settle(10)
    got = receiver.delivered()
    assert [b["event"] for b in got] == ["requested", "approved", "approved", "issued"]
    assert len({b["id"] for b in got}) == 4
    assert all(b["request_id"] == rid for b in got)
    assert {r["status"] for r in await outbox_rows(box, lane)} == {"sent"}


async def _issue_without_settling(box: Sandbox) -> str:
    """A request approved to quorum while the webhook fails (Slack still gets its part)."""
    resp = await timed(box.slack.command(ALICE, f"payments-write 30m {REASON}"))
    assert resp.status == 200
    await box.bot.idle()
    await box.emulator.wait_for(lambda: bool(box.emulator.messages("C0REVIEWS")))
    rid = box.latest_request_id()
    for user in (BOB, CAROL):
        await box.emulator.wait_for(lambda: box.card(rid) is not None)
        card = box.card(rid)
        await timed(box.slack.click(user, "bg_approve", rid, channel_id=card.channel,
                                    message_ts=card.ts))
        await box.bot.idle()
    return rid


async def test_pagerduty_gets_events_api_v2_trigger_events(hooked_box, receivers):
    pd = await receivers(path="/v2/enqueue")
    routing_key = secrets.token_hex(16)
    box = await hooked_box(
        f'\n[[webhooks]]\nurl = "{pd.url}"\nformat = "pagerduty"\n'
        'routing_key_env = "TEST_PD_KEY"\nevents = ["issued"]\n',
        env={"TEST_PD_KEY": routing_key})
    rid = await issued(box)
    [event] = pd.delivered()
    assert event["routing_key"] == routing_key
    assert event["event_action"] == "trigger"
    payload = event["payload"]
    assert {"summary", "source", "severity", "timestamp", "custom_details"} <= set(payload)
    assert payload["severity"] in {"critical", "error", "warning", "info"}
    assert rid in payload["summary"] and "issued" in payload["summary"]
    details = payload["custom_details"]
    assert details["event"] == "issued" and details["request_id"] == rid
    assert event["dedup_key"] == details["id"]
    # The routing key is a secret of the bot's environment: never in the database.
    async with box.bot.db.read() as conn:
        stored = " ".join(r[0] for r in await conn.execute(select(outbox.c.payload)))
    assert routing_key not in stored


async def test_a_checkpoint_goes_to_every_webhook_whatever_its_list(hooked_box, receivers):
    receiver = await receivers()
    box = await hooked_box((receiver, ["issued"]))
    async with box.bot.db.transaction() as conn:
        await audit.append(conn, box.bot.audit_key, at=box.bot.clock.now(), actor="breakglass",
                           event="checkpoint", details={"seq": 1, "mac": "0" * 64})
    box.bot.dispatcher.wake()
    await box.settle()
    assert receiver.events() == ["checkpoint"]
    assert receiver.delivered()[0]["details"] == {"seq": 1, "mac": "0" * 64}


async def test_webhooks_do_not_hold_up_slack(hooked_box, receivers):
    receiver = await receivers(script=["hang"] * 3)
    box = await hooked_box(
        f'\n[[webhooks]]\nurl = "{receiver.url}"\nsecret_env = "S"\nevents = ["requested"]\n'
        'timeout = "3s"\n', env={"S": "x"})
    resp = await timed(box.slack.command(ALICE, f"payments-write 30m {REASON}"))
    assert resp.status == 200
    await box.emulator.wait_for(lambda: bool(box.emulator.messages("C0REVIEWS")), timeout=2)
    assert receiver.delivered() == []


# --------------------------------------------------------------------------- configuration


def _policy(extra: str) -> str:
    return sandbox_policy("http://127.0.0.1:9", "secret", extra=extra)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/x", "http://127.1.2.3/x",
                                 "http://[::1]:9/x", "http://localhost:9/x",
                                 "https://hooks.example.internal/breakglass"])
def test_https_or_loopback_urls_are_accepted(url):
    policy = parse_policy(_policy(hook(url, "WH", ["issued"])))
    assert policy.webhooks[0].url == url


@pytest.mark.parametrize("url", ["http://hooks.example.internal/x", "http://10.0.0.1/x",
                                 "http://127.0.0.1.example.com/x", "ftp://127.0.0.1/x"])
def test_a_plain_http_url_off_loopback_is_refused(url):
    with pytest.raises(PolicyError) as err:
        parse_policy(_policy(hook(url, "WH", ["issued"])))
    assert any(e.startswith("webhooks[0].url:") for e in err.value.errors), err.value.errors


def test_webhook_policy_errors_name_the_key_and_what_to_do():
    cases = {
        hook("https://a.example/x", "WH", ["issued", "exploded"]):
            "webhooks[0].events: unknown event 'exploded'",
        '\n[[webhooks]]\nurl = "https://a.example/x"\nevents = ["issued"]\n':
            "webhooks[0]: a webhook needs secret_env",
        hook("https://a.example/x", "not a name", ["issued"]):
            "webhooks[0].secret_env: 'not a name' is not an environment variable name",
        '\n[[webhooks]]\nurl = "https://a.example/x"\nformat = "pagerduty"\nevents = ["alert"]\n':
            'webhooks[0]: format = "pagerduty" needs routing_key_env',
        hook("https://a.example/x", "WH", []): "webhooks[0].events: must not be empty",
        hook("https://a.example/x", "WH", ["issued"]) + hook("https://a.example/x", "WH", ["used"]):
            "webhooks[1].url: 'https://a.example/x' is already webhooks[0]",
        hook("https://a.example/x", "WH", ["issued"], timeout="30s"):
            "webhooks[0].timeout: at most 10s",
        hook("https://a.example/x", "WH", ["issued"], format="slack"):
            "webhooks[0].format: must be one of",
    }
    for extra, message in cases.items():
        with pytest.raises(PolicyError) as err:
            parse_policy(_policy(extra))
        assert any(e.startswith(message) for e in err.value.errors), (message, err.value.errors)


async def test_a_missing_secret_variable_stops_the_bot_before_it_starts(tmp_path):
    box = Sandbox(directory=tmp_path, env={},
                  extra_policy=hook("http://127.0.0.1:9/x", "WH_SECRET_NOT_SET", ["issued"]))
    with pytest.raises(WebhookConfigError, match=r"WH_SECRET_NOT_SET \(webhooks\[0\]\.secret_env\)"):
        await box.start()
    await box.probes.stop()
    await box.emulator.stop()
    assert not (tmp_path / "breakglass.db").exists()


async def test_serve_exits_2_naming_the_missing_secret_variable(tmp_path):
    policy = tmp_path / "breakglass.toml"
    policy.write_text(_policy(hook("https://hooks.example.internal/x", "WH_UNSET_SECRET",
                                   ["issued"])))
    from bot.core.kdf import new_master_key

    env = {k: v for k, v in os.environ.items() if k != "WH_UNSET_SECRET"} | {
        "SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
        "SLACK_SIGNING_SECRET": secrets.token_hex(16),
        "BREAKGLASS_MASTER_KEY": new_master_key(),
        "BREAKGLASS_POLICY": str(policy),
        "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bg.db'}",
        "BREAKGLASS_PORT": "39999",
        "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "serve", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, err
    errors = [line for line in err.decode().splitlines() if line.startswith("breakglass:")]
    assert len(errors) == 1 and "WH_UNSET_SECRET (webhooks[0].secret_env)" in errors[0]
    assert "Traceback" not in err.decode()


# --------------------------------------------------------------------------- the example receiver


async def test_the_example_receiver_checks_signatures_and_drops_repeats(hooked_box, tmp_path):
    import socket

    import aiohttp

    from bot.delivery.webhooks import sign

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = secrets.token_hex(32)
    root = Path(__file__).resolve().parent.parent
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(root / "examples" / "webhook_receiver.py"), "--port", str(port),
        env=dict(os.environ, BREAKGLASS_WEBHOOK_SECRET=secret),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert b"listening" in await asyncio.wait_for(proc.stderr.readline(), 20)
        url = f"http://127.0.0.1:{port}/breakglass"
        box = await hooked_box(hook(url, "EXAMPLE_SECRET", ["requested"]),
                             env={"EXAMPLE_SECRET": secret})
        await command(box, ALICE, f"payments-write 30m {REASON}")
        line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert line["event"] == "requested" and line["request_id"] == box.latest_request_id()

        body = json.dumps(line).encode()
        now = str(int(time.time()))
        async with aiohttp.ClientSession() as http:
            async def post(ts: str, signature: str) -> tuple[int, Any]:
                async with http.post(url, data=body, headers={
                        "X-Breakglass-Timestamp": ts, "X-Breakglass-Signature": signature}) as r:
                    return r.status, await r.json()

            # The bot's repeat of an event (same id, fresh signature): accepted, not printed.
            assert await post(now, sign(secret.encode(), now, body)) == (
                200, {"ok": True, "repeat": True})
            assert (await post(now, sign(b"wrong", now, body)))[0] == 401
            stale = str(int(time.time()) - 600)
            status, answer = await post(stale, sign(secret.encode(), stale, body))
            assert status == 401 and "timestamp" in answer["error"]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(proc.stdout.readline(), 0.5)  # nothing more was printed
    finally:
        proc.terminate()
        await proc.wait()


async def test_an_event_audited_by_another_process_is_sent_by_the_bot(hooked_box, receivers):
    """A CLI command attaches the webhooks without their secrets (Webhooks.enqueue_only);
    what it audits is sent, signed, by the running bot."""
    from bot.delivery.webhooks import Webhooks
    from bot.store.db import Database

    receiver = await receivers()
    box = await hooked_box((receiver, ["revoked"]))
    other = Database(box.database_url)  # another process's connection pool
    try:
        Webhooks.enqueue_only(box.bot.policy.webhooks).attach(other)
        async with other.transaction() as conn:
            await audit.append(conn, box.bot.audit_key, at=box.bot.clock.now(), actor="operator",
                               event="revoked", details={"scope": "payments-write", "via": "cli"})
    finally:
        await other.dispose()
    box.bot.dispatcher.wake()
    await box.settle()
    [event] = receiver.delivered()
    assert event["actor"] == "operator" and event["details"]["via"] == "cli"
    assert receiver.signature_ok(receiver.received[0])


def test_retry_after_takes_seconds_or_an_http_date():
    from email.utils import format_datetime

    from bot.delivery.webhooks import _retry_after

    assert _retry_after("7") == 7.0 and _retry_after(None) is None and _retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (_retry_after(later) or 0) <= 30
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert _retry_after(earlier) == 0.0
