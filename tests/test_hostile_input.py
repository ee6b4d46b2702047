"""Hostile input, generated: the command grammar, durations, the policy loader, and
Slack payloads of every shape sent over real HTTP to a running bot.

Over HTTP the rules are: never a 5xx, never a traceback in an answer (HTTP body or
response_url post), and never a change of state unless the input was a valid
request or decision (a small model below says which). The per-user request rate
limit is tested at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from bot.core.clock import OffsetClock
from bot.core.commands import (
    MAX_REASON_LENGTH,
    CommandError,
    Help,
    ListScopes,
    OpenModal,
    RequestAccess,
    Revoke,
    Status,
    parse_command,
)
from bot.core.durations import MAX_DURATION, DurationError, format_duration, parse_duration
from bot.core.policy import Policy, PolicyError, parse_policy, validate_policy
from bot.local.emulator import SLACK_USER_AGENT, SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, DAVE, INCIDENT, MALLORY, REVIEWS, Sandbox, sandbox_policy

T = TypeVar("T")
PEOPLE = [ALICE, BOB, CAROL, DAVE, MALLORY]
REQUESTERS = {ALICE, BOB}  # the sandbox's oncall group
APPROVERS = {BOB, CAROL, DAVE}  # its sre-leads
ACTIONS = ["bg_approve", "bg_deny", "bg_reveal", "bg_revoke"]
# HOSTILE_EXAMPLES=1000 explores further; the default keeps the suite quick.
HTTP = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text that exercises escapes, mentions, Unicode and control characters.
nasty_text = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs",)),
                       st.sampled_from(list("<>&@#!|*_`~\\\"'%+=\n\t\r\x00 "))),
    max_size=300)
words = st.sampled_from(["payments-write", "db-admin", "PAYMENTS-WRITE", "help", "scopes", "status",
                         "revoke", "nope", "30m", "1h", "90s", "0s", "8d", "1h30m", "INC-4521",
                         "INC-1", "R2345678", "<@U0BOB>", "&lt;", "💥", ""])
valid_request_text = st.builds(
    lambda d, inc, r: f"payments-write {d} {inc}{r}",
    st.sampled_from(["30m", "1h", "90s", "1h30m", "5m"]),
    st.sampled_from(["", "INC-7 ", "SEC-12: "]), st.text(min_size=1, max_size=60).filter(str.strip))
command_text = st.one_of(
    nasty_text, valid_request_text,
    st.lists(st.one_of(words, nasty_text.map(lambda t: t[:12])), max_size=8).map(" ".join),
    st.builds(lambda s, d, r: f"{s} {d} {r}", words, words, nasty_text))


# --------------------------------------------------------------------------- pure parsers


@given(command_text)
@settings(max_examples=400, deadline=None)
def test_parse_command_only_ever_returns_a_command_or_a_command_error(text: str) -> None:
    try:
        cmd = parse_command(text)
    except CommandError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
        return
    assert isinstance(cmd, Help | ListScopes | Status | OpenModal | Revoke | RequestAccess)
    if isinstance(cmd, OpenModal):
        assert not text.split()
    if isinstance(cmd, RequestAccess):
        assert cmd.scope == text.split()[0].lower()
        assert timedelta(0) < cmd.duration <= MAX_DURATION
        assert cmd.reason and len(cmd.reason) <= MAX_REASON_LENGTH
        assert cmd.reason == " ".join(cmd.reason.split())
        assert cmd.incident is None or cmd.reason.startswith(cmd.incident)
    if isinstance(cmd, Revoke):
        assert cmd.target and not any(c.isspace() for c in cmd.target)


@given(st.one_of(st.text(max_size=40), st.from_regex(r"[0-9]{0,12}h?[0-9]{0,12}m?[0-9]{0,12}s?",
                                                     fullmatch=True)))
@settings(max_examples=400, deadline=None)
def test_parse_duration_is_total(text: str) -> None:
    try:
        d = parse_duration(text)
    except DurationError as exc:
        assert str(exc)
        return
    assert timedelta(0) < d <= MAX_DURATION
    assert parse_duration(format_duration(d)) == d


@given(st.integers(min_value=1, max_value=int(MAX_DURATION.total_seconds())))
def test_every_valid_duration_round_trips(seconds: int) -> None:
    d = timedelta(seconds=seconds)
    assert parse_duration(format_duration(d)) == d


@given(st.integers(), st.integers(), st.integers())
def test_durations_out_of_range_are_refused_not_crashing(h: int, m: int, s: int) -> None:
    text = f"{h}h{m}m{s}s"
    try:
        d = parse_duration(text)
    except DurationError:
        return
    assert d.total_seconds() == h * 3600 + m * 60 + s


# --------------------------------------------------------------------------- policy loader

BASE_POLICY = sandbox_policy("http://127.0.0.1:9", "client-secret")
toml_scalars = st.one_of(
    st.text(max_size=20).map(json.dumps), st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", "[]", "{}", '"15m"', '"0s"', '"99999h"', '["U0X"]',
                     '"http://x"', '"ftp://x"', "[1, 2]", '"-"', "1979-05-27T07:32:00Z",
                     '{ a = 1 }', '"U0ALICE"', '"S0GROUP"']))


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_policy_loader_on_any_text_returns_a_policy_or_policy_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        return
    assert isinstance(policy, Policy)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_policy_loader_on_mutated_policies(data: st.DataObject) -> None:
    lines = BASE_POLICY.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        how = data.draw(st.sampled_from(["drop", "dup", "value", "key", "table"]))
        line = lines[i]
        if how == "drop":
            lines.pop(i)
        elif how == "dup":
            lines.insert(i, line)
        elif how == "value" and "=" in line:
            lines[i] = line.split("=", 1)[0] + "= " + data.draw(toml_scalars)
        elif how == "key" and "=" in line:
            lines[i] = data.draw(st.from_regex(r"[a-z_-]{1,12}", fullmatch=True)) + " =" + \
                line.split("=", 1)[1]
        elif how == "table":
            lines.insert(i, "[" + data.draw(st.sampled_from(
                ["slack", "tokens", "scopes.x", "groups.y", "triggers.z", "clients.c", "weird"])) + "]")
    try:
        parse_policy("\n".join(lines))
    except PolicyError as exc:
        assert exc.errors and all(e and "Traceback" not in e for e in exc.errors)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20)


@given(st.dictionaries(st.sampled_from(["slack", "tokens", "requests", "groups", "triggers",
                                        "scopes", "clients", "other"]), json_values, max_size=7))
@settings(max_examples=300, deadline=None)
def test_validate_policy_on_any_structure(data: dict[str, Any]) -> None:
    try:
        validate_policy(data)
    except PolicyError as exc:
        assert exc.errors


# --------------------------------------------------------------------------- a live bot


_TRIGGERS = itertools.count(1)


def trigger_id() -> str:
    """Unique per request: two identical bodies signed in the same second are a replay,
    which the bot rightly ignores; the model here would not expect that."""
    return f"{next(_TRIGGERS)}.42.{os.getpid()}"


class LoopThread:
    """An event loop in a thread, so that sync hypothesis tests can drive async code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Live:
    lt: LoopThread
    box: Sandbox

    def snapshot(self) -> tuple[tuple[Any, ...], ...]:
        """Requests with their state, decisions and token columns: what must not move."""
        assert self.box.directory is not None
        with contextlib.closing(sqlite3.connect(self.box.directory / "breakglass.db",
                                                timeout=10)) as db:
            return tuple(db.execute(
                "SELECT r.id, r.state, r.requester, r.jti, r.token_hash, "
                "(SELECT group_concat(d.user_id || ':' || d.decision, ',') FROM "
                "(SELECT * FROM decisions ORDER BY user_id) d WHERE d.request_id = r.id) "
                "FROM requests r ORDER BY r.id").fetchall())

    def send(self, fields: dict[str, str]) -> tuple[SentRequest, list[str]]:
        """Sign and post a form as Slack would; wait for the work it started; return the
        HTTP answer and the response_url posts it produced."""
        async def go() -> tuple[SentRequest, list[str]]:
            seen = len(self.box.emulator.responses)
            body = urlencode(fields).encode()
            headers = {**self.box.slack.sign(body), "User-Agent": SLACK_USER_AGENT,
                       "Content-Type": "application/x-www-form-urlencoded"}
            sent = await self.box.slack.raw(body, headers)
            await self.box.settle(10)
            return sent, [json.dumps(r.body) for r in self.box.emulator.responses[seen:]]
        return self.lt.run(go())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    lt = LoopThread()
    # A high rate limit, so that valid requests stay valid however many hypothesis sends.
    box = Sandbox(directory=tmp_path_factory.mktemp("hostile"), algorithm="ES256", rate_limit=100000)
    lt.run(box.start())
    assert box.bot.policy.requests.rate_limit == 100000
    try:
        # Something to click on: a pending request and an issued one.
        lt.run(box.slack.command(ALICE, "payments-write 30m INC-1 pending one"))
        lt.run(box.slack.command(BOB, "payments-write 30m INC-2 to be issued"))
        lt.run(box.settle())
        issued = box.latest_request_id()
        for who in (CAROL, DAVE):
            lt.run(box.slack.click(who, "bg_approve", issued, channel_id=REVIEWS))
            lt.run(box.settle())
        yield Live(lt, box)
    finally:
        lt.run(box.stop())
        lt.close()


def check_answer(sent: SentRequest, posts: list[str]) -> None:
    assert sent.status < 500, (sent.status, sent.body[:500])
    assert "Traceback" not in sent.body and "Error:" not in sent.body[:200], sent.body[:500]
    for p in posts:
        assert "Traceback" not in p, p[:500]


def row(snapshot: tuple[tuple[Any, ...], ...], rid: str) -> tuple[Any, ...] | None:
    return next((r for r in snapshot if r[0] == rid), None)


def decided(r: tuple[Any, ...]) -> set[str]:
    return {d.split(":")[0] for d in (r[5] or "").split(",") if d}


def valid_command(user: str, text: str, before: tuple[tuple[Any, ...], ...]) -> bool:
    """May this slash command change state? (A model of the use cases, kept small.)"""
    try:
        cmd = parse_command(text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    except CommandError:
        return False
    if isinstance(cmd, RequestAccess):
        return cmd.scope == "payments-write" and user in REQUESTERS
    if isinstance(cmd, Revoke):
        r = row(before, cmd.target.upper())
        return (r is not None and r[1] in ("pending", "issued", "revealed")
                and (user == r[2] or user in APPROVERS))
    return False


def valid_click(user: str, action: str, value: str, before: tuple[tuple[Any, ...], ...]) -> bool:
    r = row(before, value)
    if r is None:
        return False
    if action in ("bg_approve", "bg_deny"):
        return r[1] == "pending" and user in APPROVERS and user != r[2] and user not in decided(r)
    if action == "bg_reveal":
        return r[1] == "issued" and user == r[2]
    if action == "bg_revoke":
        return r[1] in ("pending", "issued", "revealed") and (user == r[2] or user in APPROVERS)
    return False


mostly_people = st.one_of(st.sampled_from(PEOPLE), st.sampled_from(PEOPLE), st.sampled_from(PEOPLE),
                          st.text(max_size=12))


@given(data=st.data(), user=mostly_people, text=command_text,
       command=st.sampled_from(["/breakglass", "/breakglass", "/breakglass", "/other", ""]))
@HTTP
def test_random_slash_commands_over_http(live: Live, data: st.DataObject, user: str, text: str,
                                         command: str) -> None:
    before = live.snapshot()
    if data.draw(st.booleans()) and before:  # aim some at real request ids
        ids = [r[0] for r in before]
        text = f"revoke {ids[data.draw(st.integers(0, 10_000)) % len(ids)]}"  # replayable draw
    response_url = live.box.emulator.new_response_url()
    fields = {"token": "x", "team_id": "T0EMU", "team_domain": "emulated", "channel_id": "C0GENERAL",
              "channel_name": "general", "user_id": user, "user_name": user[:20], "command": command,
              "text": text, "api_app_id": "A0EMU", "response_url": response_url,
              "trigger_id": trigger_id()}
    if data.draw(st.integers(0, 4)) == 0:  # Slack always sends these; a forger may not
        for key in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
            if key != "command":
                fields.pop(key, None)
    sent, posts = live.send(fields)
    check_answer(sent, posts)
    after = live.snapshot()
    event(f"state changed: {after != before}")
    valid = command == "/breakglass" and {"user_id", "text"} <= set(fields) and valid_command(
        user, text, before)
    # Two-sided: a refusal changes nothing, a valid request or revoke changes something.
    assert (after != before) == valid, (user, text, fields.keys())
    if valid:
        assert len(after) - len(before) in (0, 1)


def block_actions(user: Any, action_id: Any, value: Any, extra: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "block_actions", "user": {"id": user, "username": "x", "team_id": "T0EMU"},
        "api_app_id": "A0EMU", "token": "x", "trigger_id": trigger_id(),
        "team": {"id": "T0EMU", "domain": "emulated"},
        "container": {"type": "message", "message_ts": "1.000100", "channel_id": REVIEWS},
        "channel": {"id": REVIEWS, "name": "reviews"},
        "actions": [{"action_id": action_id, "block_id": "bg", "value": value, "type": "button",
                     "action_ts": "1.0"}],
    }
    payload.update(extra)
    return payload


@given(data=st.data(), user=mostly_people,
       action=st.one_of(st.sampled_from(ACTIONS), st.sampled_from(ACTIONS[:2]),
                        st.sampled_from(ACTIONS[:2]), st.text(max_size=15)),
       value=st.one_of(st.text(max_size=20), st.sampled_from(["", "R2345678", "r2345678"])))
@HTTP
def test_random_button_clicks_over_http(live: Live, data: st.DataObject, user: str, action: str,
                                        value: str) -> None:
    before = live.snapshot()
    if data.draw(st.integers(0, 9)) < 7 and before:  # mostly real ids, pending ones first
        pending = [r[0] for r in before if r[1] == "pending"]
        ids = pending or [r[0] for r in before]
        # An index drawn independently of the live state, so hypothesis can replay it.
        value = ids[data.draw(st.integers(0, 10_000)) % len(ids)]
    extra = data.draw(st.dictionaries(
        st.sampled_from(["user", "actions", "team", "container", "channel", "message", "view",
                         "response_url", "state"]),
        json_values, max_size=2)) if data.draw(st.integers(0, 3)) == 0 else {}
    payload = block_actions(user, action, value, extra)
    if extra.get("response_url") is None and "response_url" not in extra:
        payload["response_url"] = live.box.emulator.new_response_url()
    sent, posts = live.send({"payload": json.dumps(payload)})
    check_answer(sent, posts)
    after = live.snapshot()
    event(f"state changed: {after != before}")
    if after != before:
        assert valid_click(user, action, value, before), (user, action, value, extra)
    elif not extra:
        assert not valid_click(user, action, value, before), (user, action, value)


@given(data=st.data(), user=mostly_people,
       scope=st.one_of(st.sampled_from(["payments-write", "payments-write", "db-admin", ""]),
                       st.text(max_size=20)),
       duration=st.one_of(st.sampled_from(["30m", "1h", "0s", "", "2h", "90s"]),
                          st.text(max_size=10)),
       reason=st.one_of(nasty_text, st.sampled_from(["INC-9 db down", "  x  "]),
                        st.text(min_size=490, max_size=700)))
@HTTP
def test_random_modal_submissions_over_http(live: Live, data: st.DataObject, user: str, scope: str,
                                            duration: str, reason: str) -> None:
    before = live.snapshot()
    if data.draw(st.integers(0, 3)) == 0:  # a well-formed one, now and then
        user, scope, duration, reason = (data.draw(st.sampled_from([ALICE, BOB, CAROL])),
                                         "payments-write", "30m", "INC-9 db down")
    values: Any = {"scope": {"value": {"type": "static_select",
                                       "selected_option": {"value": scope}}},
                   "duration": {"value": {"type": "plain_text_input", "value": duration}},
                   "reason": {"value": {"type": "plain_text_input", "value": reason}}}
    shape = data.draw(st.integers(0, 7))
    if shape == 0:
        values = data.draw(json_values)
    elif shape == 1:
        values[data.draw(st.sampled_from(["scope", "duration", "reason"]))] = data.draw(json_values)
    view: Any = {"id": "V0X", "type": "modal", "callback_id": data.draw(
        st.sampled_from(["bg_request_modal", "bg_request_modal", "other", ""])),
        "state": {"values": values}, "private_metadata": "", "blocks": []}
    if data.draw(st.integers(0, 19)) == 0:
        view = data.draw(json_values)
    payload = {"type": "view_submission", "team": {"id": "T0EMU", "domain": "emulated"},
               "user": {"id": user, "name": "x", "team_id": "T0EMU"}, "api_app_id": "A0EMU",
               "token": "x", "trigger_id": trigger_id(), "view": view, "response_urls": []}
    sent, posts = live.send({"payload": json.dumps(payload)})
    check_answer(sent, posts)
    after = live.snapshot()
    event(f"state changed: {after != before}")
    clean = shape > 1 and isinstance(view, dict) and view.get("callback_id") == "bg_request_modal"
    valid = (user in REQUESTERS and scope.strip() == "payments-write" and bool(reason.strip())
             and len(" ".join(reason.split())) <= MAX_REASON_LENGTH and _parses(duration.strip()))
    if after != before:
        assert valid, (user, scope, duration, reason)
        assert len(after) == len(before) + 1
    elif clean:
        assert not valid, (user, scope, duration, reason)


def _parses(duration: str) -> bool:
    try:
        parse_duration(duration)
    except DurationError:
        return False
    return True


@pytest.mark.parametrize("team", [True, 5, "T0EMU", ["T0EMU"]])
def test_a_signed_payload_whose_team_is_not_an_object_is_not_a_500(live: Live, team: Any) -> None:
    """Found by the test above. slack_bolt's AsyncBoltRequest() raises TypeError on
    `"id" in team` (extract_team_id) and bot/http.py builds it outside any try: 500."""
    before = live.snapshot()
    payload = block_actions(BOB, "bg_approve", "R2345678", {"team": team})
    sent, posts = live.send({"payload": json.dumps(payload)})
    assert live.snapshot() == before
    check_answer(sent, posts)


@given(payload=json_values, extra=st.dictionaries(st.text(max_size=10), st.text(max_size=30),
                                                  max_size=3))
@HTTP
def test_random_interaction_payloads_over_http(live: Live, payload: Any,
                                               extra: dict[str, str]) -> None:
    assume("payload" not in extra)
    before = live.snapshot()
    if isinstance(payload, dict) and payload:
        payload.setdefault("type", "block_actions")
    sent, posts = live.send({"payload": json.dumps(payload), **extra})
    check_answer(sent, posts)
    assert live.snapshot() == before


@given(body=st.binary(max_size=300),
       headers=st.dictionaries(st.sampled_from(["X-Slack-Request-Timestamp", "X-Slack-Signature",
                                                "Content-Type", "X-Slack-Retry-Num"]),
                               st.text(alphabet=st.characters(codec="latin-1"), max_size=80),
                               max_size=4))
@HTTP
def test_unsigned_or_badly_signed_bodies_get_401_or_400_never_500(live: Live, body: bytes,
                                                                  headers: dict[str, str]) -> None:
    before = live.snapshot()

    async def go() -> SentRequest:
        return await live.box.slack.raw(body, headers)
    with contextlib.suppress(ValueError):  # a header value aiohttp itself refuses to send
        sent = live.lt.run(go())
        assert sent.status in (400, 401, 413), (sent.status, sent.body[:200])
        assert "Traceback" not in sent.body
    assert live.snapshot() == before


@given(body=st.binary(min_size=1, max_size=400))
@settings(max_examples=40, deadline=None)
def test_signed_garbage_bodies_are_400_not_500(live: Live, body: bytes) -> None:
    before = live.snapshot()

    async def go() -> SentRequest:
        headers = {**live.box.slack.sign(body),
                   "Content-Type": "application/x-www-form-urlencoded"}
        return await live.box.slack.raw(body, headers)
    sent = live.lt.run(go())
    assert sent.status < 500 and "Traceback" not in sent.body
    assert live.snapshot() == before


# --------------------------------------------------------------------------- rate limit


async def test_per_user_request_rate_limit(tmp_path: Any, database_url: str) -> None:
    clock = OffsetClock()
    async with Sandbox(directory=tmp_path, algorithm="ES256", clock=clock,
                       database_url=database_url) as box:
        limits = box.bot.policy.requests
        assert (limits.rate_limit, limits.rate_window) == (5, timedelta(minutes=10))
        emu = box.emulator

        async def ask(user: str, n: int) -> str:
            await box.slack.command(user, f"payments-write 30m INC-{n} attempt {n}")
            await box.settle()
            return str(emu.responses[-1].body.get("text", ""))

        for n in range(5):
            assert "waiting for" in await ask(ALICE, n)
        assert await box.bot.service.count_requests() == 5
        alerts_before = [m.text for m in emu.messages(INCIDENT) if "rate limit" in m.text]
        assert alerts_before == []

        sixth = await ask(ALICE, 6)
        assert "limit is 5" in sixth and "5 requests in the last 10m" in sixth
        assert await box.bot.service.count_requests() == 5
        alerts = [m.text for m in emu.messages(INCIDENT) if "rate limit" in m.text]
        assert len(alerts) == 1 and ALICE in alerts[0]

        assert "limit is 5" in await ask(ALICE, 7)  # refused again, but alerted only once
        assert len([m for m in emu.messages(INCIDENT) if "rate limit" in m.text]) == 1

        assert "waiting for" in await ask(BOB, 8)  # the limit is per user
        assert await box.bot.service.count_requests() == 6

        refused = [r async for r in _audit(box) if r["event"] == "refused"
                   and r["details"].get("code") == "rate_limited"]
        assert len(refused) == 2 and all(r["actor"] == ALICE for r in refused)

        clock.advance(timedelta(minutes=10, seconds=5))  # the window slides past them
        assert "waiting for" in await ask(ALICE, 9)
        assert await box.bot.service.count_requests() == 7
        for n in range(4):
            await ask(ALICE, 10 + n)
        assert "limit is 5" in await ask(ALICE, 20)
        # A breach in a new window is alerted again.
        assert len([m for m in emu.messages(INCIDENT) if "rate limit" in m.text]) == 2


async def _audit(box: Sandbox) -> Any:
    from bot import audit

    async for r in audit.export(box.bot.db):
        yield r
