"""Issue 13, "attack surface": each attack as an outsider, a workspace member or a
relying service would make it, over real HTTP against the running bot and the Slack
emulator, and what the bot must answer (odd payload shapes, the deadline of a
decision, the rate limit under concurrency, replay of future-stamped signatures,
stalled bodies, foreign workspaces, escaping, client-secret guessing, /metrics)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from helpers import command, timed
from sqlalchemy import func, select

from bot.core.clock import OffsetClock
from bot.core.kdf import new_master_key
from bot.local.emulator import (
    APP_ID,
    TEAM_ID,
    Message,
    SentRequest,
    SlackSender,
    click_payload,
    command_fields,
)
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, REVIEWS, Sandbox
from bot.store.replay import MAX_RECENT, ReplayGuard
from bot.store.schema import audit_log, requests

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def box(tmp_path: Path, database_url: str) -> AsyncIterator[Sandbox]:
    """A running bot on the test's database backend (SQLite, then PostgreSQL)."""
    async with Sandbox(directory=tmp_path, algorithm="ES256",
                       database_url=database_url) as started:
        yield started


def signed(box: Sandbox, body: bytes, **extra: str) -> dict[str, str]:
    return {**box.slack.sign(body), "Content-Type": FORM, **extra}


async def request_count(box: Sandbox) -> int:
    async with box.bot.db.read() as conn:
        return int(await conn.scalar(select(func.count()).select_from(requests)) or 0)


def seen(box: Sandbox, resp: SentRequest) -> str:
    """Everything the person saw for one command or click: the ack, then the replies."""
    ack = str((resp.json or {}).get("text", ""))
    return "\n".join([ack, *(str(r.body.get("text", "")) for r in box.emulator.responses
                              if r.url == resp.response_url)])


async def click(box: Sandbox, user: str, action: str, rid: str, on: Message) -> SentRequest:
    resp = await timed(box.slack.click(user, action, rid, channel_id=on.channel,
                                       message_ts=on.ts))
    await box.settle()
    return resp


async def row(box: Sandbox, rid: str) -> Any:
    async with box.bot.db.read() as conn:
        return (await conn.execute(select(requests).where(requests.c.id == rid))).one()


async def events(box: Sandbox, rid: str) -> list[str]:
    async with box.bot.db.read() as conn:
        rows = await conn.execute(select(audit_log.c.event).where(audit_log.c.request_id == rid)
                                  .order_by(audit_log.c.seq))
        return [r[0] for r in rows]


def incident(box: Sandbox, word: str) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if f"*{word}*" in m.text]


# ------------------------------------------------------ 2. deadlines against the clock


@pytest.fixture
async def frozen_sweeper(tmp_path: Path, database_url: str
                         ) -> AsyncIterator[tuple[Sandbox, OffsetClock]]:
    """A bot whose clock the test moves and whose sweeper has not run since the start:
    what a click, a reveal or a revocation sees just after a deadline, before the sweep."""
    clock = OffsetClock()
    async with Sandbox(directory=tmp_path, algorithm="ES256", clock=clock,
                       sweep_interval=3600, database_url=database_url) as started:
        yield started, clock


async def test_an_approval_after_the_deadline_issues_nothing(frozen_sweeper: Any) -> None:
    box, clock = frozen_sweeper
    await command(box, ALICE, "payments-write 30m INC-4521 auth down")
    rid = box.latest_request_id()
    await click(box, BOB, "bg_approve", rid, box.card(rid))
    clock.advance(timedelta(minutes=30, milliseconds=10))  # expire_after is 30m
    resp = await click(box, CAROL, "bg_approve", rid, box.card(rid))
    assert "expired" in seen(box, resp)
    r = await row(box, rid)
    assert r.state == "pending" and r.jti is None and r.issued_at is None
    assert "issued" not in await events(box, rid) and incident(box, "issued") == []


async def test_a_reveal_or_revocation_after_the_token_expired(frozen_sweeper: Any) -> None:
    box, clock = frozen_sweeper
    await command(box, ALICE, "payments-write 10m INC-4521 auth down")
    rid = box.latest_request_id()
    await click(box, BOB, "bg_approve", rid, box.card(rid))
    await click(box, CAROL, "bg_approve", rid, box.card(rid))
    dm = box.emulator.messages(ALICE)[-1]
    clock.advance(timedelta(minutes=10, milliseconds=10))
    views = len(box.emulator.views)
    resp = await click(box, ALICE, "bg_reveal", rid, dm)
    assert "expired" in seen(box, resp) and len(box.emulator.views) == views
    resp = await command(box, ALICE, f"revoke {rid}")
    assert "expired" in seen(box, resp)
    assert (await row(box, rid)).state == "issued"  # the sweeper, not the revocation, closes it
    assert incident(box, "revoked") == [] and "revoked" not in await events(box, rid)


async def test_a_cancellation_after_the_request_expired(frozen_sweeper: Any) -> None:
    box, clock = frozen_sweeper
    await command(box, ALICE, "payments-write 30m INC-4521 auth down")
    rid = box.latest_request_id()
    clock.advance(timedelta(minutes=31))
    resp = await command(box, ALICE, f"revoke {rid}")
    assert "expired" in seen(box, resp)
    assert (await row(box, rid)).state == "pending" and incident(box, "cancelled") == []


# ------------------------------------------------------------------ 12. odd shapes


async def test_a_payload_nested_100000_levels_deep_is_400_not_500(box: Sandbox) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    raw = '{"type": "block_actions", "user": {"id": "' + ALICE + '"}, "x": ' + deep + "}"
    body = urlencode({"payload": raw}).encode()
    resp: SentRequest = await box.slack.raw(body, signed(box, body))
    assert resp.status == 400, resp.body
    assert "nested" in resp.json["message"]
    await box.settle()
    assert await request_count(box) == 0


async def test_a_signed_ssl_check_is_200(box: Sandbox) -> None:
    body = urlencode({"ssl_check": "1", "token": "x"}).encode()
    resp = await box.slack.raw(body, signed(box, body))
    assert resp.status == 200, resp.body
    unsigned = await box.slack.raw(body, {"Content-Type": FORM})
    assert unsigned.status == 401
    await box.settle()
    assert await request_count(box) == 0 and box.emulator.responses == []


# --------------------------------------------------------- 3. rate limit, concurrently


async def test_twenty_concurrent_commands_with_rate_limit_5_open_exactly_5(
        tmp_path: Path, database_url: str) -> None:
    async with Sandbox(directory=tmp_path, algorithm="ES256", rate_limit=5,
                       database_url=database_url) as box:
        sent = await asyncio.gather(*(timed(box.slack.command(
            ALICE, f"payments-write 30m INC-{n} attempt {n}")) for n in range(20)))
        await box.settle()
        assert await request_count(box) == 5
        said = [seen(box, resp) for resp in sent]
        assert sum("waiting for" in s for s in said) == 5
        assert sum("the limit is 5" in s for s in said) == 15


# -------------------------------------------------- 5. every failure says what to do


def slack_shaped_token() -> str:
    return "xoxb-" + secrets.token_hex(6) + "-" + secrets.token_hex(12)


def jwt_shaped_token() -> str:
    return "eyJ" + secrets.token_urlsafe(12) + "." + secrets.token_urlsafe(24) + "." + (
        secrets.token_urlsafe(16))


@pytest.mark.parametrize("make_secret", [slack_shaped_token, jwt_shaped_token])
async def test_a_reason_that_looks_like_a_secret_is_refused_with_a_message(
        box: Sandbox, make_secret: Any) -> None:
    secret = make_secret()
    resp = await command(box, ALICE, f"payments-write 30m INC-1 token is {secret}")
    said = seen(box, resp)
    assert "looks like it contains a secret" in said and "Remove it" in said, said
    assert secret not in said  # not echoed back
    assert await request_count(box) == 0


async def test_a_form_whose_reason_looks_like_a_secret_says_so_on_the_reason(box: Sandbox) -> None:
    values = {"scope": {"value": {"type": "static_select",
                                  "selected_option": {"value": "payments-write"}}},
              "duration": {"value": {"type": "plain_text_input", "value": "30m"}},
              "reason": {"value": {"type": "plain_text_input",
                                   "value": f"INC-1 {slack_shaped_token()}"}}}
    resp = await timed(box.slack.submit_view(ALICE, "bg_request_modal", values))
    assert resp.json["response_action"] == "errors"
    assert "secret" in resp.json["errors"]["reason"]
    await box.settle()
    assert await request_count(box) == 0


async def test_an_unexpected_failure_is_told_not_silent(box: Sandbox) -> None:
    await command(box, ALICE, "payments-write 30m INC-1 auth down")
    async with box.bot.db.transaction() as conn:  # the database breaks under the bot
        await conn.exec_driver_sql("ALTER TABLE requests RENAME TO requests_gone")
    for text in ("status", "payments-write 30m INC-2 auth down"):
        resp = await command(box, ALICE, text)
        assert "unexpected error" in seen(box, resp), seen(box, resp)
    resp = await click(box, BOB, "bg_approve", box.latest_request_id(),
                       box.emulator.messages(REVIEWS)[-1])
    assert "unexpected error" in seen(box, resp)


# ------------------------------------------------------- 11. escaping on every output

PINGS = ("<!channel>", "<!here>", "<!everyone>", "<@U0MALLORY>", "<https://evil.example|x>")


def assert_inert(text: str, where: str) -> None:
    for ping in PINGS:
        assert ping.lower() not in text.lower(), f"{where}: {ping} unescaped in {text!r}"


def everything_posted(box: Sandbox) -> list[tuple[str, str]]:
    """(where, text) for every Web API call the bot made (posts, edits, DMs, views) and
    every response_url reply."""
    out = [(f"{c.method} {c.params.get('channel', '')}", json.dumps(c.params))
           for c in box.emulator.calls]
    out += [("response_url reply", json.dumps(r.body)) for r in box.emulator.responses]
    return out


async def test_user_text_is_escaped_in_every_message(tmp_path: Path, database_url: str) -> None:
    """A permissive incident_pattern takes `INC-1<!channel>` as the incident; the reason,
    the scope and the ID as typed carry pings too. Slack sends &, < and > escaped in
    command text, as here. None of it pings anyone, wherever it is shown."""
    async with Sandbox(directory=tmp_path, algorithm="ES256", incident_pattern=r"[^ ]+",
                       database_url=database_url) as box:
        def slack_escaped(text: str) -> str:
            return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

        reason = "INC-1<!channel> auth down <!here> <@U0MALLORY> <https://evil.example|x>"
        acks = [await command(box, ALICE, slack_escaped(f"payments-write 30m {reason}"))]
        rid = box.latest_request_id()
        card = box.card(rid)
        assert "*INC-1&lt;!channel&gt;*" in json.dumps(card.blocks)  # the incident, on the card
        await click(box, BOB, "bg_approve", rid, card)
        await click(box, CAROL, "bg_approve", rid, box.card(rid))
        acks.append(await click(box, ALICE, "bg_reveal", rid, box.emulator.messages(ALICE)[-1]))
        acks.append(await command(box, ALICE, f"revoke {rid}"))
        box.probes.status["auth"] = 200  # the trigger no longer holds: a refusal post
        acks.append(await command(box, ALICE, slack_escaped(f"payments-write 30m {reason}")))
        for typed in ("<!here> 30m INC-2 x", "revoke <!channel>", "payments-write <!here> x",
                      "<!here>"):
            acks.append(await command(box, ALICE, slack_escaped(typed)))
        for ack in acks:
            assert_inert(json.dumps(ack.json), "ack")
        posted = everything_posted(box)
        for where, text in posted:
            assert_inert(text, where)
        incident_posts = [t for w, t in posted if INCIDENT in w]
        for word in ("requested", "issued", "revoked", "refused"):
            assert any(f"*{word}*" in t and "INC-1&lt;!channel&gt;" in t
                       for t in incident_posts), word
        assert any("There is no scope `&lt;!here&gt;`" in t for _, t in posted)
        assert any("&lt;!channel&gt;" in t.lower() and "no request or token" in t for _, t in posted)


# --------------------------------------- 6. a future-stamped signature stays remembered


async def test_a_future_stamped_signature_is_kept_until_its_own_window_ends(
        tmp_path: Path, database_url: str) -> None:
    clock = OffsetClock()
    async with Sandbox(directory=tmp_path, algorithm="ES256", clock=clock,
                       database_url=database_url) as box:
        stamp = int(time.time()) + 290  # Slack's clock 4m50s ahead: still accepted
        fields = command_fields(box.emulator, ALICE, "status")
        body = urlencode(fields).encode()
        headers = {**box.slack.sign(body, stamp), "Content-Type": FORM}
        first = await box.slack.raw(body, headers)
        assert first.status == 200 and first.json["response_type"] == "ephemeral"
        await box.settle()
        signature = headers["X-Slack-Signature"]

        # 5m31s after it was first seen, the database prune runs (a sweep would).
        clock.advance(timedelta(minutes=5, seconds=31))
        await box.bot.replay_guard.prune()
        # A second process, fresh memory, gets the same request: its stamp is 41 s old
        # by then, inside Slack's 5 minutes, so only the database can refuse it.
        other = ReplayGuard(box.bot.db, clock)
        assert await other.first_time(signature) is False

        # This process's memory keeps it just as long, even when it prunes itself.
        guard = box.bot.replay_guard
        for n in range(MAX_RECENT + 1):
            guard.first_time_here(f"v0=filler{n}", stamp - 400, now=stamp - 100)
        assert not guard.first_time_here(signature, stamp, now=stamp + 41)
        assert guard.first_time_here(signature, stamp, now=stamp + 331)  # its window ended

        clock.advance(timedelta(minutes=5))  # now past the stamp's window: pruned
        assert await box.bot.replay_guard.prune() >= 1


# ------------------------------------------- 1. bodies that pin memory on /slack/events


async def stalled(box: Sandbox, headers: dict[str, str], declared: int, sent: bytes
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends its headers (declaring `declared` body bytes), then
    `sent`, then nothing more."""
    port = int(box.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                 f"Content-Type: {FORM}\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)
    await writer.drain()
    return reader, writer


async def answer_and_close(reader: asyncio.StreamReader, within: float) -> tuple[int, bytes]:
    """The status and headers the bot sent, and that it then closed the connection
    (EOF), both within `within` seconds."""
    raw = await asyncio.wait_for(reader.read(), within)  # read() returns at EOF
    assert raw, "closed without an answer"
    return int(raw.split(b" ", 2)[1]), raw


def fresh_headers(box: Sandbox, stamp: int | None = None) -> dict[str, str]:
    """Headers as Slack's, for a body that will never come (the signature cannot be
    checked without it, but nothing in the headers gives that away)."""
    return {"X-Slack-Request-Timestamp": str(stamp or int(time.time())),
            "X-Slack-Signature": "v0=" + secrets.token_hex(32)}


async def test_200_stalled_connections_with_a_stale_stamp_are_refused_and_closed(
        box: Sandbox) -> None:
    stale = fresh_headers(box, int(time.time()) - 3600)
    conns = await asyncio.gather(*(stalled(box, stale, 1024 * 1024, b"") for _ in range(200)))
    started = time.monotonic()
    answers = await asyncio.gather(*(answer_and_close(r, within=5.0) for r, _ in conns))
    assert {status for status, _ in answers} == {401}
    assert all(b"outside the 5-minute window" in raw for _, raw in answers)
    assert time.monotonic() - started < 5.0
    missing = fresh_headers(box)
    del missing["X-Slack-Request-Timestamp"]
    reader, _ = await stalled(box, missing, 1024 * 1024, b"")
    assert (await answer_and_close(reader, within=5.0))[0] == 401
    for _, writer in conns:
        writer.close()


async def test_a_body_that_stalls_is_cut_off_by_the_read_timeout(box: Sandbox) -> None:
    box.bot.slack_body_timeout = 0.5
    conns = await asyncio.gather(*(stalled(box, fresh_headers(box), 1024 * 1024,
                                           b"command=%2Fbreakglass&" + b"a" * 10_000)
                                   for _ in range(50)))
    answers = await asyncio.gather(*(answer_and_close(r, within=5.0) for r, _ in conns))
    assert {status for status, _ in answers} == {408}
    assert box.bot.slack_body_budget.held == 0
    for _, writer in conns:
        writer.close()


async def test_unverified_bodies_in_flight_are_bounded_by_a_budget(box: Sandbox) -> None:
    from bot.slack.intake import BodyBudget

    box.bot.slack_body_timeout = 4.0
    budget = box.bot.slack_body_budget = BodyBudget(limit=256 * 1024)
    piece = b"command=%2Fbreakglass&pad=" + b"a" * (100 * 1024)
    conns = []
    for _ in range(6):  # 6 x 100 KiB held against 256 KiB: some must be turned away
        conns.append(await stalled(box, fresh_headers(box), 512 * 1024, piece))
    started = time.monotonic()

    async def turned_away(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
        with contextlib.suppress(TimeoutError):
            return await answer_and_close(reader, within=2.0)
        return None  # still being read: its bytes are held against the budget

    answers = await asyncio.gather(*(turned_away(r) for r, _ in conns))
    busy = [a for a in answers if a]
    assert busy and len(busy) < len(conns), busy
    assert {status for status, _ in busy} == {503}, busy
    assert all(b"Retry-After: 1" in raw for _, raw in busy)
    assert time.monotonic() - started < 3.5  # turned away at once, not at the 4 s timeout
    assert budget.held <= budget.limit
    # The held ones are cut off by the timeout, their bytes given back; Slack gets through.
    deadline = time.monotonic() + 10
    while budget.held and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert budget.held == 0
    resp = await command(box, ALICE, "status")
    assert resp.status == 200
    for _, writer in conns:
        writer.close()


# ---------------------------------------------- 10. payloads from another workspace/app


async def test_the_bot_learns_its_team_and_app_from_auth_test(box: Sandbox) -> None:
    assert box.bot.identity is not None
    assert (box.bot.identity.team_id, box.bot.identity.app_id) == (TEAM_ID, APP_ID)
    assert box.emulator.calls_to("auth.test")


async def test_an_approval_claiming_another_team_is_not_counted(box: Sandbox) -> None:
    await command(box, ALICE, "payments-write 30m INC-1 auth down")
    rid = box.latest_request_id()
    card = box.card(rid)
    foreign = SlackSender(box.slack.app_url, box.signing_secret, box.emulator, team_id="T0OTHER")
    try:
        for user in (BOB, CAROL):  # a quorum, if they counted
            resp = await timed(foreign.click(user, "bg_approve", rid, channel_id=card.channel,
                                             message_ts=card.ts))
            assert resp.status == 200
        await box.settle()
        opened = await timed(foreign.command(ALICE, "payments-write 30m INC-2 auth down"))
        assert "another Slack workspace" in opened.json["text"]
        await box.settle()
    finally:
        await foreign.close()
    r = await row(box, rid)
    assert r.state == "pending" and r.jti is None
    assert await events(box, rid) == ["requested"]
    assert await request_count(box) == 1
    assert box.card(rid).history == []  # the card was never updated


async def test_a_payload_from_another_app_is_not_acted_on(box: Sandbox) -> None:
    await command(box, ALICE, "payments-write 30m INC-1 auth down")
    rid = box.latest_request_id()
    card = box.card(rid)
    payload = click_payload(box.emulator, BOB, "bg_approve", rid, channel_id=card.channel,
                            message_ts=card.ts)
    payload["api_app_id"] = "A0OTHERAPP"
    body = urlencode({"payload": json.dumps(payload)}).encode()
    assert (await box.slack.raw(body, signed(box, body))).status == 200
    fields = command_fields(box.emulator, ALICE, "payments-write 30m INC-2 x")
    fields["api_app_id"] = "A0OTHERAPP"
    body = urlencode(fields).encode()
    resp = await box.slack.raw(body, signed(box, body))
    assert "another Slack workspace or app" in resp.json["text"]
    await box.settle()
    assert await events(box, rid) == ["requested"] and await request_count(box) == 1


# ------------------------------------------------- 9. /metrics off the public port


async def get(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_metrics_are_on_their_own_listener_not_the_public_port(box: Sandbox) -> None:
    await command(box, ALICE, "payments-write 30m INC-1 auth down")
    status, text = await get(box.metrics_url)
    assert status == 200 and 'breakglass_requests_total{outcome="opened"}' in text
    assert box.bot.metrics_port not in (None, 9464, box.bot.port)
    assert (await get(f"{box.url}/metrics"))[0] == 404
    assert (await get(f"{box.url}/metrics", Authorization="Bearer anything"))[0] == 404
    # The metrics listener serves nothing else.
    assert (await get(box.metrics_url.replace("/metrics", "/healthz")))[0] == 404


async def test_metrics_on_the_public_port_need_the_bearer_token(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    async with Sandbox(directory=tmp_path, algorithm="ES256", metrics_token=token) as box:
        status, text = await get(f"{box.url}/metrics", Authorization=f"Bearer {token}")
        assert status == 200 and "breakglass_requests_total" in text
        for wrong in ("", f"Bearer {token}x", f"bearer {token[:-1]}", f"Basic {token}"):
            assert (await get(f"{box.url}/metrics", Authorization=wrong))[0] == 404, wrong
        assert (await get(f"{box.url}/metrics"))[0] == 404


def test_metrics_settings_from_the_environment() -> None:
    from bot.config import ConfigError, Settings

    base = {"SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
            "SLACK_SIGNING_SECRET": secrets.token_hex(16),
            "BREAKGLASS_MASTER_KEY": new_master_key()}
    assert Settings.from_env(base).metrics_addr == "127.0.0.1:9464"
    assert Settings.from_env(base).metrics_token is None
    assert Settings.from_env({**base, "BREAKGLASS_METRICS_ADDR": "off"}).metrics_addr is None
    assert Settings.from_env({**base, "BREAKGLASS_METRICS_ADDR": "[::1]:9100"}).metrics_addr
    for bad in ("9464", "localhost", "0.0.0.0:http", "http://x:1", "1.2.3.4:70000"):
        with pytest.raises(ConfigError, match="BREAKGLASS_METRICS_ADDR"):
            Settings.from_env({**base, "BREAKGLASS_METRICS_ADDR": bad})
    with pytest.raises(ConfigError, match="BREAKGLASS_METRICS_TOKEN"):
        Settings.from_env({**base, "BREAKGLASS_METRICS_TOKEN": "short"})


async def test_serve_says_when_the_metrics_address_is_taken(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from bot.local.emulator import SlackEmulator
    from bot.local.sandbox import sandbox_policy

    async with SlackEmulator() as slack:
        policy = tmp_path / "policy.toml"
        policy.write_text(sandbox_policy("http://127.0.0.1:9", secrets.token_hex(16)))
        with socket.socket() as taken, socket.socket() as free:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
            free.close()
            env = {"PATH": "/usr/bin:/bin", "SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
                   "SLACK_SIGNING_SECRET": secrets.token_hex(16), "SLACK_API_URL": slack.api_url,
                   "BREAKGLASS_POLICY": str(policy), "BREAKGLASS_MASTER_KEY": new_master_key(),
                   "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bg.db'}",
                   "BREAKGLASS_HOST": "127.0.0.1", "BREAKGLASS_PORT": str(port),
                   "BREAKGLASS_METRICS_ADDR": f"127.0.0.1:{taken.getsockname()[1]}"}
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "bot", "serve"], env=env,
                capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "BREAKGLASS_METRICS_ADDR" in lines[-1] and "Traceback" not in done.stderr


# ------------------------------------------------- 8. guessing relying services' secrets


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def post_form(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.post(url, data={"token": "x"},
                                                    headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


def failures(text: str, reason: str) -> float:
    found = re.search(rf'breakglass_client_auth_failures_total{{reason="{reason}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("path", ["/oauth2/introspect", "/oauth2/revoke"])
async def test_wrong_client_secrets_are_throttled_logged_and_counted(
        box: Sandbox, path: str, caplog: pytest.LogCaptureFixture) -> None:
    url = f"{box.url}{path}"
    before = (await get(box.metrics_url))[1]
    assert (await post_form(url, basic("payments-api", box.client_secret)))[0] == 200
    answers = [await post_form(url, basic("payments-api", secrets.token_urlsafe(12)))
               for _ in range(30)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses
    retry = [int(headers["Retry-After"]) for status, headers, _ in answers if status == 429]
    assert all(0 < r <= 60 for r in retry)
    after = (await get(box.metrics_url))[1]
    assert failures(after, "bad_secret") - failures(before, "bad_secret") == 10
    assert failures(after, "throttled") - failures(before, "throttled") == 20
    logged = [r.getMessage() for r in caplog.records if "client authentication failed" in
              r.getMessage()]
    assert len(logged) >= 10 and all("payments-api" in m for m in logged)
    assert box.client_secret not in caplog.text
    # The client that proved its secret before is not locked out by someone guessing.
    assert (await post_form(url, basic("payments-api", box.client_secret)))[0] == 200


async def test_guessing_client_names_from_one_address_is_throttled(box: Sandbox) -> None:
    url = f"{box.url}/oauth2/introspect"
    statuses = [(await post_form(url, basic(f"guess-{n}", "x" * 20)))[0] for n in range(14)]
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses


@pytest.mark.parametrize("guess", ["secret", "name"])
async def test_guessing_never_locks_out_a_service_with_the_right_secret(
        box: Sandbox, guess: str) -> None:
    """Behind the shipped nginx every request has the proxy's address, and client names
    can be guessed: after a stranger's failures, the relying service's first request
    since the bot started (its secret not yet verified by this process) still gets its
    answer; the stranger still gets 429."""
    url = f"{box.url}/oauth2/introspect"

    def stranger(n: int) -> dict[str, str]:
        return basic("payments-api" if guess == "secret" else f"guess-{n}",
                     secrets.token_urlsafe(12))

    statuses = [(await post_form(url, stranger(n)))[0] for n in range(12)]
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses
    status, _, body = await post_form(url, basic("payments-api", box.client_secret))
    assert status == 200, (status, body)
    assert json.loads(body) == {"active": False}
    # The stranger is still throttled, and a wrong secret for the real name too.
    for headers in (stranger(99), basic("payments-api", box.client_secret + "x")):
        status, answer_headers, _ = await post_form(url, headers)
        assert status == 429 and 0 < int(answer_headers["Retry-After"]) <= 60
    assert (await post_form(f"{box.url}/oauth2/revoke",
                            basic("payments-api", box.client_secret)))[0] == 200


async def test_behind_a_trusted_proxy_failures_count_per_forwarded_address(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """With BREAKGLASS_TRUSTED_PROXIES naming the proxy (here: loopback, where the test
    connects from), the address is the one the proxy appended to X-Forwarded-For: one
    guesser is throttled, another address is not; what a client wrote itself to the left
    is not believed. Without it the header is ignored (tests above)."""
    async with Sandbox(directory=tmp_path, database_url=database_url,
                       trusted_proxies="127.0.0.1, ::1") as box:
        url = f"{box.url}/oauth2/introspect"

        async def guess(n: int, forwarded: str) -> int:
            return (await post_form(url, {**basic(f"guess-{n}", "x" * 20),
                                          "X-Forwarded-For": forwarded}))[0]

        # The guesser writes a different address of its own each time; the proxy
        # appends the one it saw (203.0.113.5), which is the one counted.
        statuses = [await guess(n, f"198.51.100.{n}, 203.0.113.5") for n in range(12)]
        assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses
        assert "from 203.0.113.5" in caplog.text and "198.51.100." not in caplog.text
        assert await guess(99, "203.0.113.6") == 401  # another address: not throttled
        assert await guess(98, "198.51.100.7, 203.0.113.5") == 429


def test_client_address_reads_x_forwarded_for_only_from_trusted_proxies() -> None:
    from bot.client_auth import client_address
    from bot.config import ConfigError, Settings, parse_trusted_proxies

    nets, _ = parse_trusted_proxies("10.0.0.5, 172.16.0.0/12 ::1")
    assert client_address("192.0.2.1", ["203.0.113.5"], nets) == "192.0.2.1"  # not a proxy
    assert client_address("10.0.0.5", ["203.0.113.5"], nets) == "203.0.113.5"
    assert client_address("10.0.0.5", ["1.2.3.4, 203.0.113.5, 172.17.0.3"], nets) == \
        "203.0.113.5"  # two proxies: the address the outer one saw
    assert client_address("10.0.0.5", ["bogus, 203.0.113.5"], nets) == "203.0.113.5"
    assert client_address("10.0.0.5", ["bogus"], nets) == "10.0.0.5"
    assert client_address("10.0.0.5", [], nets) == "10.0.0.5"
    assert client_address("10.0.0.5", ["203.0.113.5"], ()) == "10.0.0.5"
    base = {"SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
            "SLACK_SIGNING_SECRET": secrets.token_hex(16),
            "BREAKGLASS_MASTER_KEY": new_master_key()}
    assert Settings.from_env(base).trusted_proxies == ()
    assert len(Settings.from_env({**base, "BREAKGLASS_TRUSTED_PROXIES": "10.0.0.5"})
               .trusted_proxies) == 1
    with pytest.raises(ConfigError, match="BREAKGLASS_TRUSTED_PROXIES: 'proxy' is not an IP"):
        Settings.from_env({**base, "BREAKGLASS_TRUSTED_PROXIES": "proxy"})


OLD_SECRET = "ledger-" + secrets.token_hex(12)
OLD_CLIENT = (f'\n[clients.ledger-sync]\nsecret_sha256 = '
              f'"{hashlib.sha256(OLD_SECRET.encode()).hexdigest()}"\n'
              'audiences = ["payments-api"]\n')
SLOW_SECRET = "slow-" + secrets.token_hex(12)


async def test_secret_hash_and_the_older_secret_sha256_are_both_accepted(
        tmp_path: Path, database_url: str) -> None:
    from bot.core.client_secrets import hash_secret

    slow = (f'\n[clients.reports]\nsecret_hash = "{hash_secret(SLOW_SECRET)}"\n'
            'audiences = ["payments-api"]\n')
    async with Sandbox(directory=tmp_path, algorithm="ES256", database_url=database_url,
                       extra_policy=OLD_CLIENT + slow) as box:
        url = f"{box.url}/oauth2/introspect"
        assert (await post_form(url, basic("ledger-sync", OLD_SECRET)))[0] == 200
        assert (await post_form(url, basic("ledger-sync", OLD_SECRET + "x")))[0] == 401
        # A secret verified once (scrypt, N = 2**15) is remembered: a hundred more
        # introspections take far less than a hundred scrypt checks would.
        assert (await post_form(url, basic("reports", SLOW_SECRET)))[0] == 200
        started = time.perf_counter()
        for _ in range(100):
            assert (await post_form(url, basic("reports", SLOW_SECRET)))[0] == 200
        assert time.perf_counter() - started < 5.0


async def test_check_policy_warns_about_secret_sha256_and_hash_secret_makes_the_new_key(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    from bot.core.policy import parse_policy
    from bot.local.sandbox import sandbox_policy

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot", *args], input=stdin,
                              capture_output=True, text=True, timeout=60, check=False)

    made = await asyncio.to_thread(cli, "hash-secret", stdin=SLOW_SECRET + "\n")
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    assert line.startswith('secret_hash = "scrypt$ln=15,r=8,p=1$') and SLOW_SECRET not in line
    text = sandbox_policy("http://127.0.0.1:9", "s" * 20) + OLD_CLIENT.replace(
        "[clients.ledger-sync]", "[clients.ledger-sync]") + (
        f'\n[clients.reports]\n{line}\naudiences = ["payments-api"]\n')
    policy = parse_policy(text)
    from bot.core import client_secrets

    stored = client_secrets.parse(policy.clients["reports"].secret_hash or "")
    assert client_secrets.verify(SLOW_SECRET, stored)
    assert not client_secrets.verify(SLOW_SECRET + "x", stored)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    checked = await asyncio.to_thread(cli, "check-policy", str(path))
    assert checked.returncode == 0, checked.stderr
    warned = [w for w in checked.stderr.splitlines() if "secret_sha256" in w]
    assert len(warned) == 1 and warned[0].startswith(
        "warning: clients.ledger-sync.secret_sha256: a fast hash") and "hash-secret" in warned[0]
    assert "clients.reports" not in checked.stderr
    empty = await asyncio.to_thread(cli, "hash-secret", stdin="")
    assert empty.returncode == 2 and "no client secret" in empty.stderr


@pytest.mark.parametrize(("client", "says"), [
    ('audiences = ["payments-api"]', "exactly one of secret_hash"),
    ('secret_hash = "sha256$abc"\naudiences = ["payments-api"]', "breakglass hash-secret"),
    ('secret_hash = "scrypt$ln=4,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$'
     'jIvb9x8CX7i0GmIZT5H34co/HeVboXVrouKoBj1vmeo"\naudiences = ["payments-api"]',
     "out of range"),
    (f'secret_sha256 = "{"ab" * 32}"\nsecret_hash = "x"\naudiences = ["payments-api"]',
     "secret_hash"),
])
def test_a_client_needs_exactly_one_valid_secret_key(client: str, says: str) -> None:
    from bot.core.policy import PolicyError, parse_policy
    from bot.local.sandbox import sandbox_policy

    text = sandbox_policy("http://127.0.0.1:9", "s" * 20)
    head, _, _ = text.partition("[clients.payments-api]")
    with pytest.raises(PolicyError) as caught:
        parse_policy(head + "[clients.payments-api]\n" + client + "\n")
    assert any("clients.payments-api" in e and says in e for e in caught.value.errors), (
        caught.value.errors)
