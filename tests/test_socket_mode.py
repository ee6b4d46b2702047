"""`breakglass serve` in Socket Mode (contract §1: Socket Mode when SLACK_APP_TOKEN is set).

The real bot runs as a subprocess (`python -m bot serve`); the Slack emulator plays
Slack's Web API and its Socket Mode websocket; a probe target plays the auth
provider. Nothing is mocked. The last tests are `serve`'s start-up checks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.core.kdf import new_master_key
from bot.local.emulator import SlackEmulator, SlackSender, click_payload, command_fields
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, PEOPLE, REVIEWS, ProbeTarget, sandbox_policy
from bot.slack import blocks

ACK_LIMIT = 3.0  # Slack's limit for acknowledging a command or a click
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
REQUEST_RE = re.compile(r"request (R[0-9A-Z]{7})")
REASON = "INC-4521 auth provider down, refunds stuck"
STARTUP = 30.0  # seconds for a cold `python -m bot serve` to answer /healthz
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without any Slack or breakglass setting."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLACK_", "BREAKGLASS_"))}


# --------------------------------------------------------------------------- fixtures


@dataclass
class World:
    emulator: SlackEmulator
    probes: ProbeTarget
    directory: Path
    bot_token: str = field(default_factory=lambda: "xoxb-" + secrets.token_hex(12))
    app_token: str = field(default_factory=lambda: "xapp-1-A0EMU-" + secrets.token_hex(16))
    master_key: str = field(default_factory=new_master_key)
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = field(default_factory=free_port)

    @property
    def policy_path(self) -> Path:
        return self.directory / "breakglass.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides: str | None) -> dict[str, str]:
        """The environment for `serve` in Socket Mode; an override of None unsets it."""
        env = clean_env() | {
            "SLACK_BOT_TOKEN": self.bot_token,
            "SLACK_APP_TOKEN": self.app_token,
            "SLACK_API_URL": self.emulator.api_url,
            "BREAKGLASS_POLICY": str(self.policy_path),
            "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{self.directory / 'bg.db'}",
            "BREAKGLASS_MASTER_KEY": self.master_key,
            "BREAKGLASS_HOST": "127.0.0.1",
            "BREAKGLASS_PORT": str(self.port),
            "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0",
        }
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def secrets(self) -> list[str]:
        return [self.bot_token, self.app_token, self.master_key, self.client_secret]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    probes = ProbeTarget()
    await probes.start()  # auth answers 503: the primary-auth-down trigger holds
    emulator = SlackEmulator()
    await emulator.start()
    w = World(emulator, probes, tmp_path)
    emulator.bot_token, emulator.app_token = w.bot_token, w.app_token
    for user, name in PEOPLE.items():
        emulator.set_user(user, name=name.split()[0], real_name=name)
    emulator.channel_names.update({REVIEWS: "break-glass-reviews", INCIDENT: "incident-live"})
    w.policy_path.write_text(sandbox_policy(probes.url, w.client_secret))
    try:
        yield w
    finally:
        await emulator.stop()
        await probes.stop()


class BotProcess:
    """`python -m bot serve` as a child process; its log goes to a file."""

    def __init__(self, world: World, env: dict[str, str]) -> None:
        self.world = world
        self.env = env
        self.log_path = world.directory / f"serve-{secrets.token_hex(3)}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> BotProcess:
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "serve", env=self.env, cwd=self.world.directory,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def health(self, timeout: float = STARTUP) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
                try:
                    async with session.get(self.world.url + "/healthz") as resp:
                        if resp.status == 200:
                            return dict(await resp.json())
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"/healthz not up after {timeout}s:\n{self.log()}")
                await asyncio.sleep(0.1)

    async def terminate(self, timeout: float = 12.0) -> tuple[int | None, float]:
        """SIGTERM; the exit status (None if it did not exit in time) and the seconds taken."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            rc = None
        return rc, time.monotonic() - started

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def bot(world: World) -> AsyncIterator[BotProcess]:
    """The bot in Socket Mode, healthy and connected to the emulator's websocket."""
    proc = await BotProcess(world, world.env()).start()
    try:
        await proc.health()
        try:
            await world.emulator.wait_socket(timeout=STARTUP)
        except TimeoutError as exc:
            raise AssertionError(f"the bot never opened a socket: {exc}\n{proc.log()}") from None
        yield proc
    finally:
        await proc.terminate(timeout=12.0)
        await proc.kill()


def assert_no_secrets(text: str, *values: str) -> None:
    for value in values:
        assert value not in text, "a secret appears in the bot's log"
    assert not JWT_RE.search(text), "a JWT appears in the bot's log"


async def timed(call: Any) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    ack = await call
    return ack, time.perf_counter() - started


# --------------------------------------------------------------------------- the flow


async def test_serve_in_socket_mode_runs_the_whole_flow(world: World, bot: BotProcess) -> None:
    emu = world.emulator
    health = await bot.health()
    assert health["mode"] == "socket" and health["database"] is True

    # The bot asked for the websocket URL with its app-level token, not the bot token.
    opens = emu.calls_to("apps.connections.open")
    assert opens and all(call.token == world.app_token for call in opens)
    assert emu.socket_connected() and emu.socket_acks == []

    # ALICE asks; the ack comes back over the socket at once, with the ephemeral text.
    ack, seconds = await timed(emu.socket_command(ALICE, f"payments-write 30m {REASON}"))
    assert seconds < ACK_LIMIT
    envelope = emu.socket_envelopes[-1]
    assert envelope.type == "slash_commands" and envelope.accepts_response_payload
    assert ack["envelope_id"] == envelope.envelope_id and envelope.ack == ack
    assert ack["payload"]["response_type"] == "ephemeral"
    assert "payments-write" in ack["payload"]["text"]
    response_url = envelope.payload["response_url"]

    # The card lands in the reviewers' channel; ALICE hears back on her response_url.
    await emu.wait_for(lambda: any(REQUEST_RE.search(m.text) for m in emu.messages(REVIEWS)),
                       timeout=10)
    card = next(m for m in emu.messages(REVIEWS) if REQUEST_RE.search(m.text))
    match = REQUEST_RE.search(card.text)
    assert match is not None
    request_id = match.group(1)
    actions = {e["action_id"] for b in card.blocks if b["type"] == "actions"
               for e in b["elements"]}
    assert {blocks.APPROVE, blocks.DENY} <= actions
    await emu.wait_for(lambda: any(r.url == response_url for r in emu.responses), timeout=10)
    reply = next(r for r in emu.responses if r.url == response_url)
    assert request_id in reply.body["text"] and reply.body["response_type"] == "ephemeral"

    # BOB and CAROL approve over the socket; each click is acked at once, without a payload.
    for approver in (BOB, CAROL):
        ack, seconds = await timed(emu.socket_click(approver, blocks.APPROVE, request_id,
                                                    channel_id=REVIEWS, message_ts=card.ts))
        assert seconds < ACK_LIMIT
        assert ack == {"envelope_id": emu.socket_envelopes[-1].envelope_id}
        assert emu.socket_envelopes[-1].type == "interactive"

    # At quorum: a DM to ALICE with the Reveal button, and no token in its text.
    def reveal_dm() -> Any:
        for m in emu.messages(ALICE):
            for b in m.blocks:
                if b.get("type") == "actions" and any(
                        e.get("action_id") == blocks.REVEAL for e in b.get("elements", [])):
                    return m
        return None

    await emu.wait_for(lambda: reveal_dm() is not None, timeout=10)
    dm = reveal_dm()
    assert not JWT_RE.search(dm.text + str(dm.blocks))
    await emu.wait_for(lambda: not any(b["type"] == "actions"
                                       for b in (emu.message(REVIEWS, card.ts) or card).blocks),
                       timeout=10)

    # ALICE reveals: the token comes in a views.open modal, on the click's trigger_id.
    ack, seconds = await timed(emu.socket_click(ALICE, blocks.REVEAL, request_id,
                                                channel_id=ALICE, message_ts=dm.ts))
    assert seconds < ACK_LIMIT
    trigger_id = emu.socket_envelopes[-1].payload["trigger_id"]
    await emu.wait_for(lambda: bool(emu.calls_to("views.open")), timeout=10)
    opened = emu.views[-1]
    assert opened.trigger_id == trigger_id
    found = JWT_RE.search(str(opened.view["blocks"]))
    assert found, "the reveal modal carries no token"
    token = found.group(0)

    # The HTTP side runs in Socket Mode too: the token introspects as active.
    basic = base64.b64encode(f"payments-api:{world.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as session:
        async with session.post(world.url + "/oauth2/introspect", data={"token": token},
                                headers={"Authorization": f"Basic {basic}"}) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["active"] is True and answer["sub"] == ALICE
    assert answer["aud"] in ("payments-api", ["payments-api"])

    # A second reveal is refused (over the response_url), and no second modal opens.
    views_before = len(emu.calls_to("views.open"))
    await emu.socket_click(ALICE, blocks.REVEAL, request_id, channel_id=ALICE, message_ts=dm.ts)
    second_url = emu.socket_envelopes[-1].payload["response_url"]
    await emu.wait_for(lambda: any(r.url == second_url for r in emu.responses), timeout=10)
    assert len(emu.calls_to("views.open")) == views_before

    # Every envelope got exactly one ack; shutting down is clean and quick.
    assert all(e.ack is not None for e in emu.socket_envelopes)
    rc, seconds = await bot.terminate(timeout=12.0)
    assert rc == 0, bot.log()
    assert seconds < 12.0
    assert_no_secrets(bot.log(), *world.secrets(), token)


async def test_request_modal_over_the_socket(world: World, bot: BotProcess) -> None:
    """`/breakglass` with no text opens the form; its submission's errors come back in
    the ack payload (response_action), as Socket Mode carries them."""
    emu = world.emulator
    ack = await emu.socket_command(ALICE, "")
    assert ack.get("payload") in (None, {})
    await emu.wait_for(lambda: emu.find_view(blocks.REQUEST_MODAL) is not None, timeout=10)
    assert emu.views[-1].trigger_id == emu.socket_envelopes[-1].payload["trigger_id"]

    bad = {"scope": {"value": {"type": "static_select",
                               "selected_option": {"value": "payments-write"}}},
           "duration": {"value": {"type": "plain_text_input", "value": "soon"}},
           "reason": {"value": {"type": "plain_text_input", "value": ""}}}
    ack, seconds = await timed(emu.socket_submit_view(ALICE, blocks.REQUEST_MODAL, bad))
    assert seconds < ACK_LIMIT
    assert ack["payload"]["response_action"] == "errors"
    assert {"duration", "reason"} <= set(ack["payload"]["errors"])

    good = {**bad, "duration": {"value": {"type": "plain_text_input", "value": "20m"}},
            "reason": {"value": {"type": "plain_text_input", "value": REASON}}}
    ack = await emu.socket_submit_view(ALICE, blocks.REQUEST_MODAL, good)
    assert not ack.get("payload")  # accepted: the modal closes
    await emu.wait_for(lambda: any(REQUEST_RE.search(m.text) for m in emu.messages(REVIEWS)),
                       timeout=10)


async def test_a_foreign_workspace_is_refused_over_the_socket(world: World, bot: BotProcess) -> None:
    """Issue 13, item 10: the team the bot token belongs to (auth.test) is the only one
    whose commands and clicks count, over the socket as over HTTP."""
    emu = world.emulator
    await emu.socket_command(ALICE, f"payments-write 30m {REASON}")
    await emu.wait_for(lambda: any(REQUEST_RE.search(m.text) for m in emu.messages(REVIEWS)),
                       timeout=10)
    card = next(m for m in emu.messages(REVIEWS) if REQUEST_RE.search(m.text))
    match = REQUEST_RE.search(card.text)
    assert match is not None
    fields = command_fields(emu, ALICE, f"payments-write 30m {REASON}", team_id="T0OTHER")
    ack = await emu.socket_send("slash_commands", dict(fields))
    assert "another Slack workspace" in ack["payload"]["text"]
    for user in (BOB, CAROL):
        payload = click_payload(emu, user, blocks.APPROVE, match.group(1), channel_id=REVIEWS,
                                message_ts=card.ts, team_id="T0OTHER")
        await emu.socket_send("interactive", payload, accepts_response_payload=False)
    await asyncio.sleep(1.0)
    assert card.history == [] and not [m for m in emu.messages(INCIDENT) if "*issued*" in m.text]
    assert sum(bool(REQUEST_RE.search(m.text)) for m in emu.messages(REVIEWS)) == 1


async def test_reconnects_when_slack_asks(world: World, bot: BotProcess) -> None:
    """Slack sends `disconnect` (refresh_requested) every few hours; the bot fetches a new
    URL, opens a new socket and keeps answering."""
    emu = world.emulator
    first = emu.open_sockets()[-1]
    assert await emu.socket_disconnect() == 1

    def replaced() -> bool:
        return any(c.open and c is not first for c in emu.socket_connections)

    await emu.wait_for(replaced, timeout=15)
    assert len(emu.calls_to("apps.connections.open")) >= 2
    await emu.wait_for(lambda: not first.open, timeout=15)  # the bot closed the old one
    ack = await emu.socket_command(ALICE, "help")
    assert emu.socket_envelopes[-1].connection != first.id
    assert "payments" in ack["payload"]["text"] or "/breakglass" in ack["payload"]["text"]


async def test_slack_events_is_not_an_open_door_in_socket_mode(
    world: World, bot: BotProcess
) -> None:
    """With no SLACK_SIGNING_SECRET, POST /slack/events must not accept requests signed
    with an empty secret (anyone can compute that HMAC)."""
    emu = world.emulator
    async with SlackSender(world.url + "/slack/events", "", emu) as forger:
        sent = await forger.command(ALICE, f"payments-write 30m {REASON}")
    assert sent.status in (401, 403, 404), (sent.status, sent.body)
    await asyncio.sleep(1.0)
    assert not any(REQUEST_RE.search(m.text) for m in emu.messages(REVIEWS))
    assert not emu.responses


async def test_sigterm_exits_0_within_12s_and_closes_the_socket(
    world: World, bot: BotProcess
) -> None:
    emu = world.emulator
    conn = emu.open_sockets()[-1]
    rc, seconds = await bot.terminate(timeout=12.0)
    assert rc == 0, bot.log()
    assert seconds < 12.0
    await emu.wait_for(lambda: not conn.open, timeout=2)
    assert "Traceback" not in bot.log()
    assert_no_secrets(bot.log(), *world.secrets())


async def test_refused_app_token_is_reported_or_sigterm_still_exits_0(world: World) -> None:
    """Slack refuses the app token (revoked, or from another app). Either `serve` says so and
    exits 2 naming SLACK_APP_TOKEN, or it keeps running and SIGTERM stops it cleanly (0).
    Being killed by the signal (the handler not installed yet) is neither."""
    emu = world.emulator
    emu.app_token = "xapp-" + secrets.token_hex(16)  # Slack knows another token
    proc = await BotProcess(world, world.env()).start()
    try:
        await emu.wait_for(lambda: bool(emu.calls_to("apps.connections.open")), timeout=STARTUP)
        assert proc.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.proc.wait(), 3.0)
        if proc.proc.returncode is not None:
            assert proc.proc.returncode == 2, proc.log()
            assert "SLACK_APP_TOKEN" in proc.log().strip().splitlines()[-1]
        else:
            rc, seconds = await proc.terminate(timeout=12.0)
            assert rc == 0, f"serve exited {rc} on SIGTERM:\n{proc.log()}"
            assert seconds < 12.0
        assert_no_secrets(proc.log(), *world.secrets())
    finally:
        await proc.kill()


# --------------------------------------------------------------------------- start-up checks


def run_serve(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", "serve"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[World]:
    """A World whose emulator is never started: these runs must stop before any Slack call."""
    w = World(SlackEmulator(), ProbeTarget(), tmp_path)
    w.policy_path.write_text(sandbox_policy("http://127.0.0.1:9", w.client_secret))
    yield w


def offline_env(w: World, **overrides: str | None) -> dict[str, str]:
    env = clean_env() | {
        "SLACK_BOT_TOKEN": w.bot_token, "SLACK_SIGNING_SECRET": secrets.token_hex(16),
        "SLACK_API_URL": "http://127.0.0.1:9/api/",
        "BREAKGLASS_POLICY": str(w.policy_path),
        "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{w.directory / 'bg.db'}",
        "BREAKGLASS_MASTER_KEY": w.master_key,
        "BREAKGLASS_HOST": "127.0.0.1", "BREAKGLASS_PORT": str(w.port),
        "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def test_http_mode_needs_the_signing_secret(offline: World) -> None:
    line = one_line(run_serve(offline_env(offline, SLACK_SIGNING_SECRET=None), offline.directory))
    assert "SLACK_SIGNING_SECRET" in line
    assert not (offline.directory / "bg.db").exists()


def test_blank_signing_secret_is_missing(offline: World) -> None:
    line = one_line(run_serve(offline_env(offline, SLACK_SIGNING_SECRET="  "), offline.directory))
    assert "SLACK_SIGNING_SECRET" in line


@pytest.mark.parametrize("mode", ["http", "socket"])
def test_missing_bot_token(offline: World, mode: str) -> None:
    extra = {"SLACK_APP_TOKEN": offline.app_token, "SLACK_SIGNING_SECRET": None} \
        if mode == "socket" else {}
    line = one_line(run_serve(offline_env(offline, SLACK_BOT_TOKEN=None, **extra),
                              offline.directory))
    assert "SLACK_BOT_TOKEN" in line


@pytest.mark.parametrize("mode", ["http", "socket"])
def test_missing_master_key(offline: World, mode: str) -> None:
    extra = {"SLACK_APP_TOKEN": offline.app_token, "SLACK_SIGNING_SECRET": None} \
        if mode == "socket" else {}
    line = one_line(run_serve(offline_env(offline, BREAKGLASS_MASTER_KEY=None, **extra),
                              offline.directory))
    assert "BREAKGLASS_MASTER_KEY" in line


def test_app_token_must_be_an_app_token(offline: World) -> None:
    line = one_line(run_serve(offline_env(offline, SLACK_APP_TOKEN=offline.bot_token,
                                          SLACK_SIGNING_SECRET=None), offline.directory))
    assert "SLACK_APP_TOKEN" in line
    assert offline.bot_token not in line


@pytest.mark.parametrize(("old", "new", "key_path"), [
    ("quorum = 2", "quorum = 5", "scopes.payments-write.quorum"),
    ('max_ttl = "30m"', 'max_ttl = "30q"', "scopes.payments-write.max_ttl"),
    ('delivery = "reveal"', 'delivery = "carrier-pigeon"', "tokens.delivery"),
])
def test_invalid_policy_names_the_key_path(offline: World, old: str, new: str,
                                           key_path: str) -> None:
    text = offline.policy_path.read_text()
    assert old in text
    offline.policy_path.write_text(text.replace(old, new, 1))
    for extra in ({}, {"SLACK_APP_TOKEN": offline.app_token, "SLACK_SIGNING_SECRET": None}):
        line = one_line(run_serve(offline_env(offline, **extra), offline.directory))
        assert key_path in line


def test_missing_policy_file_is_named(offline: World) -> None:
    missing = str(offline.directory / "nope.toml")
    line = one_line(run_serve(offline_env(offline, BREAKGLASS_POLICY=missing), offline.directory))
    assert "nope.toml" in line


# --------------------------------------------------------------------------- the emulator's side


async def test_emulator_connections_open_takes_only_the_app_token() -> None:
    bot_token, app_token = "xoxb-" + secrets.token_hex(8), "xapp-" + secrets.token_hex(8)
    async with SlackEmulator(bot_token=bot_token, app_token=app_token) as emu:
        client = AsyncWebClient(token=bot_token, base_url=emu.api_url)
        url = (await client.apps_connections_open(app_token=app_token))["url"]
        assert url.startswith(f"ws://127.0.0.1:{emu.base_url.rsplit(':', 1)[1]}/socket?ticket=")
        assert emu.calls_to("apps.connections.open")[0].token == app_token
        for wrong, error in ((bot_token, "not_allowed_token_type"),
                             ("xapp-" + secrets.token_hex(8), "invalid_auth")):
            with pytest.raises(SlackApiError) as err:
                await client.apps_connections_open(app_token=wrong)
            assert err.value.response["error"] == error
        with pytest.raises(SlackApiError) as err:  # an app token is no bot token
            await AsyncWebClient(token=app_token, base_url=emu.api_url).auth_test()
        assert err.value.response["error"] == "not_allowed_token_type"

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, autoping=False) as ws:  # as slack_sdk does
                hello = await ws.receive_json(timeout=2)
                assert hello["type"] == "hello" and hello["connection_info"]["app_id"]
                await emu.wait_socket(timeout=2)
                await ws.ping(b"sdk-ping-pong:1")
                pong = await ws.receive(timeout=2)
                assert pong.type == aiohttp.WSMsgType.PONG and pong.data == b"sdk-ping-pong:1"
            with pytest.raises(aiohttp.WSServerHandshakeError):  # a ticket is good once
                await session.ws_connect(url)
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(emu.base_url + "/socket?ticket=forged")
        await emu.wait_for(lambda: not emu.socket_connected(), timeout=2)
        with pytest.raises(ConnectionError):
            await emu.socket_command("U1", "help")


async def test_emulator_socket_envelopes_with_a_bolt_app() -> None:
    """A minimal Bolt app in this process, over slack_sdk's own Socket Mode client."""
    emu = SlackEmulator()
    await emu.start()
    app = AsyncApp(client=AsyncWebClient(token="xoxb-x", base_url=emu.api_url),
                   signing_secret="unused", request_verification_enabled=False,
                   process_before_response=True)
    seen: list[dict[str, Any]] = []

    @app.command("/echo")
    async def echo(ack: Any, body: dict[str, Any]) -> None:
        seen.append(body)
        await ack(response_type="ephemeral", text=f"echo {body['text']}")

    @app.action("press")
    async def press(ack: Any, body: dict[str, Any]) -> None:
        seen.append(body)
        await ack()

    @app.action("slow")
    async def slow(ack: Any) -> None:
        await asyncio.sleep(0.5)
        await ack()

    handler = AsyncSocketModeHandler(app, "xapp-" + secrets.token_hex(8))
    try:
        await handler.connect_async()
        await emu.wait_socket(timeout=5)
        ack = await emu.socket_command("U1", "hi there", command="/echo")
        assert ack["payload"] == {"response_type": "ephemeral", "text": "echo hi there"}
        assert seen[0]["user_id"] == "U1" and seen[0]["response_url"].startswith(emu.base_url)
        assert seen[0]["token"] == emu.verification_token

        posted = await app.client.chat_postMessage(channel="C1", text="press me")
        ack = await emu.socket_click("U2", "press", "v1", channel_id="C1")
        assert ack == {"envelope_id": emu.socket_envelopes[-1].envelope_id}
        assert seen[1]["container"]["message_ts"] == posted["ts"]
        assert seen[1]["actions"][0]["value"] == "v1" and seen[1]["user"]["id"] == "U2"

        with pytest.raises(TimeoutError, match="no ack"):
            await emu.socket_click("U2", "slow", "v", channel_id="C1", timeout=0.1)
        await emu.wait_for(lambda: emu.socket_envelopes[-1].ack is not None, timeout=2)
        assert [e.type for e in emu.socket_envelopes] == [
            "slash_commands", "interactive", "interactive"]
        assert all(e.ack_seconds is not None and e.ack_seconds >= 0
                   for e in emu.socket_envelopes)
        assert len(emu.socket_acks) == 3
    finally:
        await handler.close_async()
        await emu.stop()
