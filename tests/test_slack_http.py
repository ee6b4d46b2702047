"""POST /slack/events as an attacker or a broken proxy would call it, plus /healthz and
/metrics. Every bad request gets a 4xx with a reason, never a 500, and acts on nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest
from sqlalchemy import func, select

from bot.local.emulator import SentRequest
from bot.local.sandbox import ALICE, Sandbox
from bot.slack.signature import compute_signature
from bot.store.schema import requests

REQUEST = "payments-write 30m INC-4521 auth provider down"
FORM = "application/x-www-form-urlencoded"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def box(tmp_path: Path, database_url: str) -> AsyncIterator[Sandbox]:
    """The conftest sandbox, with ES256 keys: generated in a millisecond where an RSA key
    takes half a second, and these tests do not look at the signing algorithm."""
    async with Sandbox(directory=tmp_path, algorithm="ES256", database_url=database_url) as started:
        yield started


def command_body(box: Sandbox, text: str = REQUEST, user: str = ALICE) -> bytes:
    """A slash command body shaped as Slack sends it."""
    fields = {"token": "x", "team_id": "T0EMU", "team_domain": "emulated",
              "channel_id": "C0GENERAL", "channel_name": "general", "user_id": user,
              "user_name": user.lower(), "command": "/breakglass", "text": text,
              "api_app_id": "A0EMU", "response_url": box.emulator.new_response_url(),
              "trigger_id": "1.2.3"}
    return urlencode(fields).encode()


def signed(box: Sandbox, body: bytes, *, timestamp: int | str | None = None,
           content_type: str = FORM, **extra: str) -> dict[str, str]:
    return {**box.slack.sign(body, timestamp), "Content-Type": content_type, **extra}


async def post(box: Sandbox, body: bytes | Any, headers: dict[str, str]) -> SentRequest:
    return await box.slack.raw(body, headers)


async def request_count(box: Sandbox) -> int:
    async with box.bot.db.read() as conn:
        return int(await conn.scalar(select(func.count()).select_from(requests)) or 0)


async def assert_refused(box: Sandbox, resp: SentRequest, status: int) -> None:
    """A clear JSON problem with this status, and nothing acted on."""
    assert resp.status == status, (resp.status, resp.body)
    assert isinstance(resp.json, dict) and resp.json.get("message"), resp.body
    await box.settle()
    assert await request_count(box) == 0
    assert box.emulator.responses == []


async def raw_http(url: str, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte; returns (status, body)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(b"POST " + parts.path.encode() + b" HTTP/1.1\r\nHost: "
                 + parts.netloc.encode() + b"\r\nConnection: close\r\n" + head
                 + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# ------------------------------------------------------------------------ signatures


async def test_valid_signed_command_is_acted_on(box: Sandbox) -> None:
    """The control case for everything below: the same helpers, correctly signed."""
    body = command_body(box)
    resp = await post(box, body, signed(box, body))
    assert resp.status == 200 and resp.json["response_type"] == "ephemeral"
    await box.settle()
    assert await request_count(box) == 1


async def test_bad_signature(box: Sandbox) -> None:
    body = command_body(box)
    ts = str(int(time.time()))
    headers = {"X-Slack-Request-Timestamp": ts, "Content-Type": FORM,
               "X-Slack-Signature": compute_signature("not-the-secret", ts, body)}
    await assert_refused(box, await post(box, body, headers), 401)
    # Signed for another body.
    headers = signed(box, command_body(box, "help"))
    await assert_refused(box, await post(box, body, headers), 401)


async def test_missing_signature_headers(box: Sandbox) -> None:
    body = command_body(box)
    full = signed(box, body)
    for drop in ("X-Slack-Signature", "X-Slack-Request-Timestamp"):
        headers = {k: v for k, v in full.items() if k != drop}
        await assert_refused(box, await post(box, body, headers), 401)
    await assert_refused(box, await post(box, body, {"Content-Type": FORM}), 401)


async def test_stale_timestamp(box: Sandbox) -> None:
    body = command_body(box)
    for ts in (int(time.time()) - 301, int(time.time()) - 3600, int(time.time()) + 3600):
        await assert_refused(box, await post(box, body, signed(box, body,
                                                                       timestamp=ts)), 401)


async def test_timestamp_not_a_number(box: Sandbox) -> None:
    body = command_body(box)
    for ts in ("abc", "", "1e9", "-5", " 1700000000", "9" * 40):
        headers = signed(box, body)
        headers["X-Slack-Request-Timestamp"] = ts
        await assert_refused(box, await post(box, body, headers), 401)


async def test_non_ascii_signature_header(box: Sandbox) -> None:
    body = command_body(box)
    ts = str(int(time.time()))
    # Through aiohttp, as a client library would send it.
    headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": "v0=é",
               "Content-Type": FORM}
    await assert_refused(box, await post(box, body, headers), 401)
    # Byte for byte: UTF-8 and a lone Latin-1 byte in the header value.
    for value in ("v0=é".encode(), b"v0=\xe9\xff", "v0=☃".encode() * 30):
        head = (b"X-Slack-Request-Timestamp: " + ts.encode() + b"\r\nX-Slack-Signature: "
                + value + b"\r\nContent-Type: " + FORM.encode() + b"\r\n")
        status, answer = await raw_http(box.slack.app_url, head, body)
        assert status == 401, (status, answer)
        assert json.loads(answer)["message"]
    await box.settle()
    assert await request_count(box) == 0


# ------------------------------------------------------------------ replay and retry


async def test_byte_identical_replay_is_not_acted_on_twice(box: Sandbox) -> None:
    body = command_body(box)
    headers = signed(box, body)
    first = await post(box, body, headers)
    assert first.status == 200 and first.json["response_type"] == "ephemeral"
    await box.settle()
    second = await post(box, body, headers)
    assert second.status == 200
    await box.settle()
    assert await request_count(box) == 1
    assert len(box.emulator.responses) == 1  # one reply, to the first delivery only


async def test_slack_retry_is_answered_but_not_acted_on(box: Sandbox) -> None:
    body = command_body(box)
    headers = signed(box, body, **{"X-Slack-Retry-Num": "1",
                                       "X-Slack-Retry-Reason": "http_timeout"})
    resp = await post(box, body, headers)
    assert resp.status == 200
    await box.settle()
    assert await request_count(box) == 0
    assert box.emulator.responses == []


# ---------------------------------------------------------------------------- bodies


async def test_body_over_one_mebibyte(box: Sandbox) -> None:
    body = command_body(box) + b"&pad=" + b"a" * (1024 * 1024)
    await assert_refused(box, await post(box, body, signed(box, body)), 413)


async def test_large_body_under_the_limit_is_read_whole(box: Sandbox) -> None:
    """A signed body of 500 KiB (with Content-Length) is within the 1 MiB limit."""
    body = command_body(box, "help") + b"&pad=" + b"a" * (500 * 1024)
    resp = await post(box, body, signed(box, body))
    assert resp.status == 200, resp.body
    assert "Usage" in resp.json["text"]


async def streamed(body: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    """The body sent chunked (no Content-Length), one piece at a time, as a proxy may."""
    for start in range(0, len(body), size):
        yield body[start:start + size]
        await asyncio.sleep(0.01)


async def test_streamed_body_over_one_mebibyte(box: Sandbox) -> None:
    body = command_body(box) + b"&pad=" + b"a" * (1024 * 1024)
    resp = await post(box, streamed(body), signed(box, body))
    await assert_refused(box, resp, 413)


async def test_streamed_signed_command_is_read_whole(box: Sandbox) -> None:
    body = command_body(box)
    resp = await post(box, streamed(body, size=40), signed(box, body))
    assert resp.status == 200, resp.body
    await box.settle()
    assert await request_count(box) == 1


async def test_empty_body(box: Sandbox) -> None:
    await assert_refused(box, await post(box, b"", signed(box, b"")), 400)


async def test_json_body(box: Sandbox) -> None:
    body = json.dumps({"command": "/breakglass", "text": REQUEST, "user_id": ALICE}).encode()
    headers = signed(box, body, content_type="application/json")
    await assert_refused(box, await post(box, body, headers), 400)


async def test_form_that_is_neither_command_nor_payload(box: Sandbox) -> None:
    body = b"hello=world"
    await assert_refused(box, await post(box, body, signed(box, body)), 400)


async def test_invalid_json_in_payload(box: Sandbox) -> None:
    for raw in ("{not json", "", "{\"type\": \"block_actions\"", "\udcff"):
        body = urlencode({"payload": raw}, errors="surrogateescape").encode()
        await assert_refused(box, await post(box, body, signed(box, body)), 400)


async def test_payload_json_not_an_object(box: Sandbox) -> None:
    for raw in ("[1, 2]", "42", "\"block_actions\"", "null", "{}", "{\"type\": 7}"):
        body = urlencode({"payload": raw}).encode()
        await assert_refused(box, await post(box, body, signed(box, body)), 400)


async def test_body_not_utf8(box: Sandbox) -> None:
    body = b"command=%2Fbreakglass&text=\xff\xfe"
    await assert_refused(box, await post(box, body, signed(box, body)), 400)


async def test_interaction_payload_of_unexpected_shape_is_not_a_500(box: Sandbox) -> None:
    """Signed, valid JSON object, but not the shape Slack sends: never a 500."""
    shapes: list[dict[str, Any]] = [
        {"type": "block_actions"},
        {"type": "something_new"},
        {"type": "block_actions", "actions": [], "user": {"id": ALICE}},
        {"type": "block_actions", "actions": ["x"], "user": {"id": ALICE}},
        {"type": "block_actions", "actions": [{"action_id": 5}], "user": {"id": ALICE}},
        {"type": "block_actions", "actions": [{"action_id": "bg_approve"}], "user": "x"},
        {"type": "view_submission", "view": "nope", "user": {"id": ALICE}},
        {"type": "view_submission", "user": {"id": ALICE},
         "view": {"callback_id": "bg_request_modal", "state": "x"}},
    ]
    answers = []
    for shape in shapes:
        body = urlencode({"payload": json.dumps(shape)}).encode()
        resp = await post(box, body, signed(box, body))
        answers.append((resp.status, shape))
    assert [a for a in answers if a[0] >= 500] == []
    await box.settle()
    assert await request_count(box) == 0


# ---------------------------------------------------------------- health and metrics


async def test_healthz(box: Sandbox) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{box.url}/healthz") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            body = await resp.json()
    assert body["status"] == "ok" and body["database"] is True


async def test_metrics(box: Sandbox) -> None:
    body = command_body(box)
    await post(box, body, signed(box, body))
    await box.settle()
    async with aiohttp.ClientSession() as session:
        async with session.get(box.metrics_url) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()
    for name in ("breakglass_requests_total", "breakglass_outbox_pending",
                 "breakglass_slack_ack_seconds"):
        assert name in text
    assert 'breakglass_requests_total{outcome="opened"}' in text


async def test_calls_to_slack_reuse_connections(box: Sandbox) -> None:
    """Web API calls and response_url posts share one connection pool: a new TCP (and,
    against Slack, TLS) connection per message would cost more than the message."""
    from bot.local.sandbox import BOB, CAROL, REVIEWS

    box.emulator.connections.clear()
    for n in range(3):
        await box.slack.command(ALICE, f"payments-write 30m INC-{n} auth provider down")
        await box.settle()
        rid = box.latest_request_id()
        for approver in (BOB, CAROL):
            await box.slack.click(approver, "bg_approve", rid, channel_id=REVIEWS)
            await box.settle()
    requests_seen = sum(box.emulator.connections.values())
    assert len(box.emulator.responses) >= 3 and requests_seen >= 20
    assert len(box.emulator.connections) <= 4, (
        f"{len(box.emulator.connections)} connections for {requests_seen} requests")
