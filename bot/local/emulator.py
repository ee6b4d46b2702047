"""A local Slack, for the `breakglass demo` command and for the test suite.

It plays both sides of the wire, over real HTTP on 127.0.0.1:

* `SlackEmulator` is the Slack Web API the bot calls (give the bot
  `emu.api_url` as SLACK_API_URL). It answers the methods the bot uses with
  realistic payloads, records every call, keeps a model of the channels
  (messages with their edit history, ephemerals, opened modals) so a
  transcript can be shown, can inject faults (HTTP errors, 429s, `ok: false`,
  hangs), and is a sink for `response_url` posts.
* It is also Slack's Socket Mode server: `apps.connections.open` (with an
  app-level `xapp-` token) hands out a one-time `ws://` URL, the `/socket`
  websocket greets the app with `hello`, and `socket_command`, `socket_click`
  and `socket_submit_view` push envelopes and wait for the app's ack.
* `SlackSender` is Slack's servers calling the app over HTTP: signed slash
  commands, button clicks and modal submissions, shaped as Slack sends them.

Both transports build their payloads with the same functions
(`command_fields`, `click_payload`, `view_submission_payload`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from bot.slack.signature import compute_signature

JSON = dict[str, Any]

BOT_USER_ID = "UBOT"
BOT_ID = "B0EMU"
TEAM_ID = "T0EMU"
TEAM_DOMAIN = "emulated"
APP_ID = "A0EMU"
SLACK_USER_AGENT = "Slackbot 1.0 (+https://api.slack.com/robots)"
_JSON_FIELDS = ("blocks", "view", "attachments", "metadata")
_FIRST_TS = 1_700_000_000_000_000  # microseconds; ts strings are "<seconds>.<micros>"


@dataclass
class ApiCall:
    method: str
    params: JSON
    token: str | None
    at: float
    fault: str | None = None  # what was injected into this call, if anything


@dataclass
class MessageVersion:
    text: str
    blocks: list[JSON]
    at: float


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[JSON]
    user: str = BOT_USER_ID
    thread_ts: str | None = None
    history: list[MessageVersion] = field(default_factory=list)
    deleted: bool = False

    def as_slack(self) -> JSON:
        """The message object as Slack returns it in API answers and payloads."""
        by_bot = {"bot_id": BOT_ID} if self.user == BOT_USER_ID else {}
        return {"type": "message", "user": self.user, **by_bot, "team": TEAM_ID,
                "ts": self.ts, "text": self.text, "blocks": self.blocks,
                **({"thread_ts": self.thread_ts} if self.thread_ts else {})}


@dataclass
class Ephemeral:
    channel: str
    user: str
    text: str
    blocks: list[JSON]
    message_ts: str


@dataclass
class OpenedView:
    id: str
    trigger_id: str | None
    view: JSON  # the view as the app last sent it (views.open, then views.update)
    history: list[JSON] = field(default_factory=list)


@dataclass
class ResponsePost:
    url: str
    body: JSON
    at: float


@dataclass
class Fault:
    kind: str  # "http", "rate_limit", "error" or "hang"
    status: int = 500
    retry_after: int = 1
    error: str = ""
    seconds: float | None = None

    @property
    def label(self) -> str:
        return {"http": f"http_{self.status}", "rate_limit": "rate_limited",
                "error": f"error:{self.error}", "hang": "hang"}[self.kind]

    def response(self) -> web.Response:
        if self.kind == "rate_limit":
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                     headers={"Retry-After": str(self.retry_after)})
        if self.kind == "error":
            return web.json_response({"ok": False, "error": self.error})
        html = f"<html><body><h1>{self.status}</h1>emulated failure</body></html>"
        return web.Response(status=self.status, text=html, content_type="text/html")


@dataclass
class SocketConnection:
    """One websocket the app opened with a ticket from apps.connections.open."""

    id: str
    ws: web.WebSocketResponse
    opened_at: float
    closed_at: float | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None and not self.ws.closed


@dataclass
class SocketEnvelope:
    """An envelope pushed to the app, and the app's ack once it came."""

    envelope_id: str
    type: str  # "slash_commands" or "interactive"
    payload: JSON
    accepts_response_payload: bool
    connection: str
    sent_at: float
    ack: JSON | None = None
    acked_at: float | None = None

    @property
    def ack_seconds(self) -> float | None:
        return None if self.acked_at is None else self.acked_at - self.sent_at

    def as_slack(self) -> JSON:
        return {"envelope_id": self.envelope_id, "type": self.type, "payload": self.payload,
                "accepts_response_payload": self.accepts_response_payload}


class ApiError(Exception):
    """Raised by a method handler to answer `{"ok": false, "error": ...}`."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class SlackEmulator:
    """The Slack Web API on loopback; see the module docstring."""

    def __init__(self, bot_token: str | None = None, host: str = "127.0.0.1", *,
                 app_token: str | None = None) -> None:
        self.bot_token = bot_token  # None: any xoxb- token is accepted
        self.app_token = app_token  # None: any xapp- token is accepted
        self.host = host
        # The deprecated verification token Slack puts in Socket Mode payloads too.
        self.verification_token = secrets.token_urlsafe(18)
        self.socket_connections: list[SocketConnection] = []
        self.socket_envelopes: list[SocketEnvelope] = []
        self.socket_acks: list[JSON] = []  # every message the app sent over a socket, parsed
        self._tickets: set[str] = set()
        self._ack_waiters: dict[str, asyncio.Future[JSON]] = {}
        self._next_socket = 0
        self.calls: list[ApiCall] = []
        self.ephemerals: list[Ephemeral] = []
        self.views: list[OpenedView] = []
        self.responses: list[ResponsePost] = []
        # Client (host, port) of every HTTP request: how many connections callers opened.
        self.connections: collections.Counter[tuple[str, int]] = collections.Counter()
        self.channel_names: dict[str, str] = {"C0GENERAL": "general"}
        self._messages: dict[str, list[Message]] = {}
        self._usergroups: dict[str, list[str]] = {}
        self._users: dict[str, JSON] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._response_keys: set[str] = set()
        self._last_ts = _FIRST_TS
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._methods: dict[str, Callable[[JSON], JSON]] = {
            "auth.test": self._auth_test, "chat.postMessage": self._post_message,
            "chat.update": self._update, "chat.postEphemeral": self._post_ephemeral,
            "chat.delete": self._delete, "views.open": self._views_open,
            "views.update": self._views_update, "conversations.open": self._conversations_open,
            "users.info": self._users_info, "usergroups.users.list": self._usergroup_members,
            "chat.getPermalink": self._get_permalink,
            "conversations.history": self._conversations_history,
            "conversations.info": self._conversations_info,
        }
        # Channels the bot is not a member of (every other one, it is): posting there is
        # `not_in_channel`, and conversations.info says is_member false.
        self.outside_channels: set[str] = set()
        # Methods that take an app-level token (xapp-) instead of the bot token.
        self._app_methods: dict[str, Callable[[JSON], JSON]] = {
            "apps.connections.open": self._connections_open,
        }

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(middlewares=[self._count_connection])
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_post("/response/{key}", self._handle_response)
        app.router.add_get("/socket", self._handle_socket)
        self._stopping.clear()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0).start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self._stopping.set()  # releases hung calls
        for waiter in self._ack_waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the Slack emulator stopped"))
        for conn in self.socket_connections:
            if conn.open:
                with contextlib.suppress(Exception):
                    await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"emulator stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SlackEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("SlackEmulator is not started")
        return f"http://{self.host}:{self._port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    # -- configuration and inspection ---------------------------------------
    def set_usergroup(self, usergroup_id: str, user_ids: list[str]) -> None:
        self._usergroups[usergroup_id] = list(user_ids)

    def set_user(self, user_id: str, **fields: Any) -> None:
        """Override fields of the user users.info returns (e.g. real_name, deleted)."""
        self._users.setdefault(user_id, {}).update(fields)

    def user(self, user_id: str) -> JSON:
        name = user_id.lower()
        real_name = f"User {user_id}"
        user: JSON = {"id": user_id, "team_id": TEAM_ID, "name": name, "deleted": False,
                      "real_name": real_name, "is_bot": user_id == BOT_USER_ID, "tz": "UTC",
                      "profile": {"display_name": name, "real_name": real_name}}
        return {**user, **self._users.get(user_id, {})}

    def dm_channel_for(self, user_id: str) -> str:
        return "D" + user_id[1:]

    def resolve_channel(self, channel: str) -> str:
        """Slack accepts a user id wherever a channel goes, meaning the DM with them."""
        return self.dm_channel_for(channel) if channel.startswith(("U", "W")) else channel

    def channel_name(self, channel: str) -> str:
        if channel.startswith("D"):
            return "directmessage"
        return self.channel_names.get(channel, channel.lower())

    def messages(self, channel: str) -> list[Message]:
        """Every message posted in channel (or DM with a user id), deleted ones included."""
        return list(self._messages.get(self.resolve_channel(channel), []))

    def message(self, channel: str, ts: str) -> Message | None:
        return next((m for m in self.messages(channel) if m.ts == ts), None)

    def post_as(self, user_id: str, channel: str, text: str,
                thread_ts: str | None = None) -> Message:
        """A person (not the bot) writes in a channel, as in Slack's own client."""
        msg = Message(self.resolve_channel(channel), self._next_ts(), text, [], user=user_id,
                      thread_ts=thread_ts)
        self._messages.setdefault(msg.channel, []).append(msg)
        self._changed.set()
        return msg

    def calls_to(self, method: str) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method]

    def find_view(self, callback_id: str) -> OpenedView | None:
        """The most recently opened view with this callback_id."""
        return next((v for v in reversed(self.views) if v.view.get("callback_id") == callback_id),
                    None)

    def new_response_url(self) -> str:
        key = uuid.uuid4().hex
        self._response_keys.add(key)
        return f"{self.base_url}/response/{key}"

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once predicate() is true; raise TimeoutError after timeout seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                name = getattr(predicate, "__qualname__", repr(predicate))
                recent = ", ".join(c.method + (f"[{c.fault}]" if c.fault else "")
                                   for c in self.calls[-10:]) or "none"
                raise TimeoutError(f"{name} still false after {timeout}s; "
                                   f"last API calls: {recent}; response_url posts: "
                                   f"{len(self.responses)}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(0.01, remaining))

    # -- fault injection (per method, first in first out) -------------------
    def fail(self, method: str, status: int = 500, times: int = 1) -> None:
        self._add_fault(method, Fault("http", status=status), times)

    def rate_limit(self, method: str, retry_after: int = 1, times: int = 1) -> None:
        self._add_fault(method, Fault("rate_limit", status=429, retry_after=retry_after), times)

    def error(self, method: str, error: str = "channel_not_found", times: int = 1) -> None:
        self._add_fault(method, Fault("error", error=error), times)

    def hang(self, method: str, seconds: float | None, times: int = 1) -> None:
        """Delay the answer by seconds, or until stop() if seconds is None."""
        self._add_fault(method, Fault("hang", seconds=seconds), times)

    def _add_fault(self, method: str, fault: Fault, times: int) -> None:
        self._faults.setdefault(method, deque()).extend([fault] * times)

    def _next_fault(self, method: str) -> Fault | None:
        queue = self._faults.get(method)
        return queue.popleft() if queue else None

    # -- Socket Mode (Slack -> app over a websocket) ---------------------------
    def socket_connected(self) -> bool:
        """True while at least one app websocket is open (and was sent `hello`)."""
        return any(conn.open for conn in self.socket_connections)

    def open_sockets(self) -> list[SocketConnection]:
        return [conn for conn in self.socket_connections if conn.open]

    async def wait_socket(self, timeout: float = 10.0, count: int = 1) -> SocketConnection:
        """Wait until count websockets are open; return the newest."""
        def socket_open() -> bool:
            return len(self.open_sockets()) >= count

        await self.wait_for(socket_open, timeout)
        return self.open_sockets()[-1]

    async def socket_command(self, user_id: str, text: str, command: str = "/breakglass", *,
                             channel_id: str = "C0GENERAL", timeout: float = 3.0) -> JSON:
        """Send a slash command envelope; return the app's ack (`{"envelope_id", "payload"?}`).

        timeout defaults to Slack's 3 s: a later ack is an error the user would see.
        """
        fields = command_fields(self, user_id, text, command=command, channel_id=channel_id,
                                verification_token=self.verification_token)
        return await self.socket_send("slash_commands", dict(fields), timeout=timeout)

    async def socket_click(self, user_id: str, action_id: str, value: str, *, channel_id: str,
                           message_ts: str | None = None, block_id: str = "bg",
                           timeout: float = 3.0) -> JSON:
        """Click a button over the socket (default: on the latest live message in the channel)."""
        payload = click_payload(self, user_id, action_id, value, channel_id=channel_id,
                                message_ts=message_ts, block_id=block_id,
                                verification_token=self.verification_token)
        # Slack marks block_actions envelopes as not taking a response payload.
        return await self.socket_send("interactive", payload, accepts_response_payload=False,
                                      timeout=timeout)

    async def socket_submit_view(self, user_id: str, callback_id: str, values: JSON,
                                 private_metadata: str | None = None, *,
                                 timeout: float = 3.0) -> JSON:
        """Submit a modal over the socket; a `response_action` comes back in the ack payload."""
        payload = view_submission_payload(self, user_id, callback_id, values, private_metadata,
                                          verification_token=self.verification_token)
        return await self.socket_send("interactive", payload, timeout=timeout)

    async def socket_send(self, envelope_type: str, payload: JSON, *,
                          accepts_response_payload: bool = True, timeout: float = 3.0) -> JSON:
        """Push one envelope to one open connection (Slack picks one when an app has
        several; here they take turns) and wait for the ack with its envelope_id."""
        conns = self.open_sockets()
        if not conns:
            raise ConnectionError("no app is connected to the Socket Mode endpoint")
        conn = conns[self._next_socket % len(conns)]
        self._next_socket += 1
        envelope = SocketEnvelope(str(uuid.uuid4()), envelope_type, payload,
                                  accepts_response_payload, conn.id, time.time())
        waiter: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._ack_waiters[envelope.envelope_id] = waiter
        self.socket_envelopes.append(envelope)
        self._changed.set()
        try:
            await conn.ws.send_json(envelope.as_slack())
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise TimeoutError(f"no ack for {envelope_type} envelope {envelope.envelope_id} "
                               f"within {timeout}s; socket messages received: "
                               f"{len(self.socket_acks)}") from None
        finally:
            self._ack_waiters.pop(envelope.envelope_id, None)

    async def socket_disconnect(self, reason: str = "refresh_requested") -> int:
        """Tell every connected app to reconnect, as Slack does every few hours.
        The old websockets stay open (Slack closes them about 10 s later) until the
        app closes them. Returns how many connections were told."""
        told = 0
        for conn in self.open_sockets():
            with contextlib.suppress(ConnectionError):
                await conn.ws.send_json({"type": "disconnect", "reason": reason,
                                         "debug_info": {"host": "emulated-applink"}})
                told += 1
        return told

    async def socket_close(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Drop every app websocket without warning (a network cut or a Slack restart)."""
        for conn in self.open_sockets():
            with contextlib.suppress(Exception):
                await conn.ws.close(code=code, message=b"closed by the emulator")

    def socket_envelope(self, envelope_id: str) -> SocketEnvelope | None:
        return next((e for e in self.socket_envelopes if e.envelope_id == envelope_id), None)

    def _connections_open(self, params: JSON) -> JSON:
        ticket = secrets.token_urlsafe(24)
        self._tickets.add(ticket)
        ws_base = "ws" + self.base_url.removeprefix("http")
        return {"url": f"{ws_base}/socket?ticket={ticket}&app_id={APP_ID}"}

    async def _handle_socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:  # each URL is good for one connection
            return web.Response(status=401, text="invalid_ticket")
        self._tickets.discard(ticket)
        ws = web.WebSocketResponse(autoping=True)  # answers the app's pings with pongs
        await ws.prepare(request)
        conn = SocketConnection(f"s{len(self.socket_connections) + 1}", ws, time.time())
        await ws.send_json({"type": "hello", "num_connections": len(self.open_sockets()) + 1,
                            "debug_info": {"host": "emulated-applink", "build_number": 1,
                                           "approximate_connection_time": 18060},
                            "connection_info": {"app_id": APP_ID}})
        self.socket_connections.append(conn)
        self._changed.set()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._socket_message(str(msg.data))
        finally:
            conn.closed_at = time.time()
            self._changed.set()
        return ws

    def _socket_message(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            message = {"unparsed": data}
        if not isinstance(message, dict):
            message = {"unparsed": data}
        self.socket_acks.append(message)
        self._changed.set()
        envelope = self.socket_envelope(str(message.get("envelope_id", "")))
        if envelope is None or envelope.ack is not None:
            return  # unknown or duplicate: recorded in socket_acks only
        envelope.ack, envelope.acked_at = message, time.time()
        waiter = self._ack_waiters.get(envelope.envelope_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    # -- HTTP handlers ------------------------------------------------------
    @web.middleware
    async def _count_connection(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.connections[(str(peer[0]), int(peer[1]))] += 1
        return await handler(request)

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _read_params(request)
        body_token = params.pop("token", None)  # legacy clients send it as a field
        token = _bearer_token(request) or body_token
        fault = self._next_fault(method)
        self._record(ApiCall(method, params, token, time.time(), fault.label if fault else None))
        if fault is not None and fault.kind != "hang":
            return fault.response()
        if fault is not None and not await self._hang(fault.seconds):
            return web.json_response({"ok": False, "error": "emulator_stopped"}, status=503)
        return web.json_response(self._dispatch(method, params, token))

    async def _hang(self, seconds: float | None) -> bool:
        """Wait seconds (forever if None); False if the emulator was stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    def _dispatch(self, method: str, params: JSON, token: str | None) -> JSON:
        handler = self._methods.get(method)
        app_handler = self._app_methods.get(method)
        if app_handler is not None:
            # Slack: apps.connections.open takes only an app-level token.
            if token is not None and token.startswith(("xoxb-", "xoxp-")):
                return {"ok": False, "error": "not_allowed_token_type"}
            if not self._app_token_ok(token):
                return {"ok": False, "error": "invalid_auth"}
            handler = app_handler
        elif handler is None:
            return {"ok": False, "error": "unknown_method"}
        elif token is not None and token.startswith("xapp-"):
            return {"ok": False, "error": "not_allowed_token_type"}
        elif not self._token_ok(token):
            return {"ok": False, "error": "invalid_auth"}
        try:
            answer = handler(params)
        except ApiError as exc:
            return {"ok": False, "error": exc.error}
        self._changed.set()
        return {"ok": True, **answer}

    def _token_ok(self, token: str | None) -> bool:
        if self.bot_token is None:
            return token is not None and token.startswith("xoxb-")
        return token == self.bot_token

    def _app_token_ok(self, token: str | None) -> bool:
        if self.app_token is None:
            return token is not None and token.startswith("xapp-")
        return token == self.app_token

    async def _handle_response(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self._response_keys:
            return web.Response(status=404, text="no_active_hooks")
        try:
            body = json.loads(await request.text())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.Response(status=400, text="invalid_payload")
        self.responses.append(ResponsePost(f"{self.base_url}/response/{key}", body, time.time()))
        self._changed.set()
        return web.Response(text="ok")

    def _record(self, call: ApiCall) -> None:
        self.calls.append(call)
        self._changed.set()

    # -- Web API methods ----------------------------------------------------
    def _auth_test(self, params: JSON) -> JSON:
        return {"url": f"https://{TEAM_DOMAIN}.slack.com/", "team": "Emulated",
                "user": "breakglass", "team_id": TEAM_ID, "user_id": BOT_USER_ID,
                "bot_id": BOT_ID, "app_id": APP_ID, "app_name": "breakglass",
                "is_enterprise_install": False}

    def _post_message(self, params: JSON) -> JSON:
        channel = self._channel(params)
        if channel in self.outside_channels:
            raise ApiError("not_in_channel")
        text, blocks = _content(params)
        msg = Message(channel, self._next_ts(), text, blocks, thread_ts=params.get("thread_ts"))
        self._messages.setdefault(channel, []).append(msg)
        return {"channel": channel, "ts": msg.ts, "message": msg.as_slack()}

    def _update(self, params: JSON) -> JSON:
        msg = self._find_message(params)
        text, blocks = _content(params)
        msg.history.append(MessageVersion(msg.text, msg.blocks, time.time()))
        msg.text, msg.blocks = text, blocks
        return {"channel": msg.channel, "ts": msg.ts, "text": text, "message": msg.as_slack()}

    def permalink(self, channel: str, ts: str) -> str:
        """The permalink Slack gives for a message (chat.getPermalink)."""
        return (f"https://{TEAM_DOMAIN}.slack.com/archives/{self.resolve_channel(channel)}"
                f"/p{ts.replace('.', '')}")

    def _get_permalink(self, params: JSON) -> JSON:
        channel, ts = str(params.get("channel") or ""), str(params.get("message_ts") or "")
        if not channel:
            raise ApiError("channel_not_found")
        msg = self.message(channel, ts)
        if msg is None or msg.deleted:
            raise ApiError("message_not_found")
        return {"channel": msg.channel, "permalink": self.permalink(msg.channel, msg.ts)}

    def _delete(self, params: JSON) -> JSON:
        msg = self._find_message(params)
        msg.deleted = True
        return {"channel": msg.channel, "ts": msg.ts}

    def _post_ephemeral(self, params: JSON) -> JSON:
        channel = self._channel(params)
        user = str(params.get("user") or "")
        if not user:
            raise ApiError("user_not_found")
        text, blocks = _content(params)
        self.ephemerals.append(Ephemeral(channel, user, text, blocks, self._next_ts()))
        return {"message_ts": self.ephemerals[-1].message_ts}

    def _views_open(self, params: JSON) -> JSON:
        view = params.get("view")
        if not params.get("trigger_id") or not isinstance(view, dict):
            raise ApiError("invalid_arguments")
        opened = OpenedView(f"V{uuid.uuid4().hex[:10].upper()}", str(params["trigger_id"]), view)
        self.views.append(opened)
        return {"view": _view_answer(opened)}

    def _views_update(self, params: JSON) -> JSON:
        view = params.get("view")
        if not isinstance(view, dict):
            raise ApiError("invalid_arguments")
        view_id, external_id = params.get("view_id"), params.get("external_id")
        opened = next((v for v in self.views if (view_id and v.id == view_id) or
                       (external_id and v.view.get("external_id") == external_id)), None)
        if opened is None:
            raise ApiError("not_found")
        opened.history.append(opened.view)
        opened.view = view
        return {"view": _view_answer(opened)}

    def _conversations_open(self, params: JSON) -> JSON:
        users = [u for u in str(params.get("users") or "").split(",") if u]
        if len(users) != 1:
            raise ApiError("users_list_not_supplied" if not users else "not_supported")
        return {"no_op": False, "already_open": False,
                "channel": {"id": self.dm_channel_for(users[0])}}

    def _users_info(self, params: JSON) -> JSON:
        user_id = str(params.get("user") or "")
        if not user_id.startswith(("U", "W")):
            raise ApiError("user_not_found")
        return {"user": self.user(user_id)}

    def _usergroup_members(self, params: JSON) -> JSON:
        members = self._usergroups.get(str(params.get("usergroup") or ""))
        if members is None:
            raise ApiError("no_such_subteam")
        return {"users": list(members)}

    def _conversations_history(self, params: JSON) -> JSON:
        """Newest first, top-level messages only (thread replies are not history), with
        Slack's cursor pagination: `limit` (default 100, at most 999) per page, and
        `response_metadata.next_cursor` until the last page. The bot reads only channels
        it is a member of."""
        channel = self._channel(params)
        if channel in self.outside_channels:
            raise ApiError("not_in_channel")
        try:
            limit = int(params.get("limit") or 100)
        except (TypeError, ValueError):
            raise ApiError("invalid_limit") from None
        limit = max(1, min(limit, 999))
        oldest, latest = _ts_bound(params.get("oldest"), 0), _ts_bound(params.get("latest"), None)
        inclusive = str(params.get("inclusive") or "").lower() in ("1", "true")
        below: int | None = None  # from the cursor: the ts of the newest message to return
        cursor = str(params.get("cursor") or "")
        if cursor:
            try:
                kind, _, value = base64.b64decode(cursor, validate=True).decode().partition(":")
                if kind != "next_ts":
                    raise ValueError(kind)
                below = _ts_micros(value)
            except ValueError:
                raise ApiError("invalid_cursor") from None
        chosen: list[Message] = []
        for m in reversed(self._messages.get(channel, [])):
            t = _ts_micros(m.ts)
            if m.deleted or (m.thread_ts and m.thread_ts != m.ts):
                continue
            if (t < oldest or (t == oldest and not inclusive and oldest)
                    or (latest is not None and (t > latest or (t == latest and not inclusive)))
                    or (below is not None and t > below)):
                continue
            chosen.append(m)
            if len(chosen) > limit:
                break
        page, rest = chosen[:limit], chosen[limit:]
        next_cursor = (base64.b64encode(f"next_ts:{rest[0].ts}".encode()).decode()
                       if rest else "")
        return {"messages": [m.as_slack() for m in page], "has_more": bool(rest),
                "pin_count": 0, "response_metadata": {"next_cursor": next_cursor}}

    def _conversations_info(self, params: JSON) -> JSON:
        """A channel ID (C…, G…, D…) is known; anything else (a name such as
        #break-glass-reviews) is channel_not_found, as Slack answers."""
        channel = str(params.get("channel") or "")
        if not re.fullmatch(r"[CGD][A-Z0-9]+", channel):
            raise ApiError("channel_not_found")
        return {"channel": {"id": channel, "name": self.channel_name(channel),
                            "is_channel": channel.startswith("C"), "is_private": False,
                            "is_im": channel.startswith("D"), "is_archived": False,
                            "is_member": channel not in self.outside_channels}}

    def _channel(self, params: JSON) -> str:
        channel = str(params.get("channel") or "")
        if not channel:
            raise ApiError("channel_not_found")
        return self.resolve_channel(channel)

    def _find_message(self, params: JSON) -> Message:
        msg = self.message(str(params.get("channel") or ""), str(params.get("ts") or ""))
        if msg is None or msg.deleted:
            raise ApiError("message_not_found")
        return msg

    def _next_ts(self) -> str:
        self._last_ts += 100
        seconds, micros = divmod(self._last_ts, 1_000_000)
        return f"{seconds}.{micros:06d}"


def _ts_micros(ts: str) -> int:
    seconds, _, micros = ts.partition(".")
    if not seconds.isdigit() or not (micros.isdigit() or micros == "") or len(micros) > 6:
        raise ValueError(ts)
    return int(seconds) * 1_000_000 + int(micros.ljust(6, "0") or 0)


def _ts_bound(value: Any, default: int | None) -> int | None:
    if value in (None, ""):
        return default
    try:
        return _ts_micros(str(value))
    except ValueError:
        raise ApiError("invalid_ts_oldest") from None


def _content(params: JSON) -> tuple[str, list[JSON]]:
    text, blocks = str(params.get("text") or ""), params.get("blocks") or []
    if not isinstance(blocks, list):
        raise ApiError("invalid_blocks")
    if not text and not blocks:
        raise ApiError("no_text")
    return text, blocks


def _view_answer(opened: OpenedView) -> JSON:
    view = opened.view
    return {**view, "id": opened.id, "team_id": TEAM_ID, "app_id": APP_ID, "bot_id": BOT_ID,
            "callback_id": view.get("callback_id", ""),
            "private_metadata": view.get("private_metadata", ""),
            "external_id": view.get("external_id", ""), "state": {"values": {}},
            "hash": f"{int(time.time())}.{uuid.uuid4().hex[:8]}",
            "root_view_id": opened.id, "previous_view_id": None}


async def _read_params(request: web.Request) -> JSON:
    """Query string plus body, JSON or form; JSON-in-form fields are decoded."""
    params: JSON = dict(request.query)
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.text() or "{}")
        except ValueError:
            body = None
        params.update(body if isinstance(body, dict) else {})
        return params
    params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    for key in _JSON_FIELDS:
        if isinstance(params.get(key), str):
            with contextlib.suppress(ValueError):
                params[key] = json.loads(params[key])
    return params


def _bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# ---------------------------------------------------------------------------
# Slack -> app
# ---------------------------------------------------------------------------
@dataclass
class SentRequest:
    status: int
    body: str
    json: Any  # the parsed body, or None when it is not JSON
    headers: Mapping[str, str]
    response_url: str | None = None


class SlackSender:
    """Sends the app signed requests shaped as Slack's servers send them."""

    def __init__(self, app_url: str, signing_secret: str, emulator: SlackEmulator,
                 team_id: str = TEAM_ID, *, verification_token: str | None = None,
                 timeout: float = 10.0) -> None:
        self.app_url = app_url
        self.emulator = emulator
        self.team_id = team_id
        # The deprecated verification token Slack still includes; random unless given.
        self.verification_token = verification_token or secrets.token_urlsafe(18)
        self._secret = signing_secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SlackSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def sign(self, body: bytes, timestamp: str | int | None = None) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        return {"X-Slack-Request-Timestamp": ts,
                "X-Slack-Signature": compute_signature(self._secret, ts, body)}

    async def raw(self, body: bytes, headers: Mapping[str, str]) -> SentRequest:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.post(self.app_url, data=body, headers=dict(headers)) as resp:
            text = await resp.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return SentRequest(resp.status, text, parsed, resp.headers)

    async def command(self, user_id: str, text: str, command: str = "/breakglass",
                      channel_id: str = "C0GENERAL") -> SentRequest:
        fields = command_fields(self.emulator, user_id, text, command=command,
                                channel_id=channel_id, team_id=self.team_id,
                                verification_token=self.verification_token)
        return await self._post_form(fields, fields["response_url"])

    async def click(self, user_id: str, action_id: str, value: str, *, channel_id: str,
                    message_ts: str | None = None, block_id: str = "bg") -> SentRequest:
        """Click a button on message_ts (default: the latest live message in the channel)."""
        payload = click_payload(self.emulator, user_id, action_id, value, channel_id=channel_id,
                                message_ts=message_ts, block_id=block_id, team_id=self.team_id,
                                verification_token=self.verification_token)
        return await self._post_form({"payload": json.dumps(payload)}, payload["response_url"])

    async def submit_view(self, user_id: str, callback_id: str, values: JSON,
                          private_metadata: str | None = None) -> SentRequest:
        """Submit the modal with callback_id; values is view.state.values as Slack shapes it.

        The latest view the app opened with that callback_id supplies the id, title,
        blocks and (unless given) private_metadata.
        """
        payload = view_submission_payload(self.emulator, user_id, callback_id, values,
                                          private_metadata, team_id=self.team_id,
                                          verification_token=self.verification_token)
        return await self._post_form({"payload": json.dumps(payload)}, None)

    async def _post_form(self, fields: dict[str, str], response_url: str | None) -> SentRequest:
        body = urlencode(fields).encode("ascii")
        headers = {**self.sign(body), "User-Agent": SLACK_USER_AGENT,
                   "Content-Type": "application/x-www-form-urlencoded"}
        sent = await self.raw(body, headers)
        sent.response_url = response_url
        return sent

    def _user(self, user_id: str) -> JSON:
        return _user(self.emulator, user_id, self.team_id)

    def _team(self) -> JSON:
        return _team(self.team_id)


# -- payloads, the same over HTTP (SlackSender) and Socket Mode (SlackEmulator) --
def command_fields(emulator: SlackEmulator, user_id: str, text: str, *,
                   command: str = "/breakglass", channel_id: str = "C0GENERAL",
                   team_id: str = TEAM_ID, verification_token: str = "") -> dict[str, str]:
    """A slash command as Slack sends it: the form fields over HTTP, the payload object
    in Socket Mode. Each call gets a fresh response_url on emulator."""
    return {"token": verification_token, "team_id": team_id, "team_domain": TEAM_DOMAIN,
            "channel_id": channel_id, "channel_name": emulator.channel_name(channel_id),
            "user_id": user_id, "user_name": emulator.user(user_id)["name"],
            "command": command, "text": text, "api_app_id": APP_ID,
            "is_enterprise_install": "false", "response_url": emulator.new_response_url(),
            "trigger_id": _trigger_id()}


def click_payload(emulator: SlackEmulator, user_id: str, action_id: str, value: str, *,
                  channel_id: str, message_ts: str | None = None, block_id: str = "bg",
                  team_id: str = TEAM_ID, verification_token: str = "") -> JSON:
    """A block_actions payload for a button on message_ts (default: the latest live
    message in the channel), with a fresh response_url."""
    channel = emulator.resolve_channel(channel_id)
    if message_ts is None:
        live = [m for m in emulator.messages(channel) if not m.deleted]
        message = live[-1] if live else None
    else:
        message = emulator.message(channel, message_ts)
    ts = message.ts if message else message_ts
    payload: JSON = {
        "type": "block_actions", "user": _user(emulator, user_id, team_id), "api_app_id": APP_ID,
        "token": verification_token,
        "container": {"type": "message", "message_ts": ts, "channel_id": channel,
                      "is_ephemeral": False},
        "trigger_id": _trigger_id(), "team": _team(team_id), "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel, "name": emulator.channel_name(channel)},
        "state": {"values": {}}, "response_url": emulator.new_response_url(),
        "actions": [{"action_id": action_id, "block_id": block_id, "value": value,
                     "type": "button", "action_ts": f"{time.time():.6f}"}],
    }
    if message is not None:
        payload["message"] = message.as_slack()
    return payload


def view_submission_payload(emulator: SlackEmulator, user_id: str, callback_id: str,
                            values: JSON, private_metadata: str | None = None, *,
                            team_id: str = TEAM_ID, verification_token: str = "") -> JSON:
    """A view_submission payload for the latest view opened with callback_id."""
    opened = emulator.find_view(callback_id)
    base = _view_answer(opened) if opened else {
        "id": f"V{uuid.uuid4().hex[:10].upper()}", "team_id": team_id, "type": "modal",
        "app_id": APP_ID, "bot_id": BOT_ID, "blocks": [], "private_metadata": ""}
    view = {**base, "callback_id": callback_id, "state": {"values": values}}
    if private_metadata is not None:
        view["private_metadata"] = private_metadata
    return {
        "type": "view_submission", "team": _team(team_id),
        "user": _user(emulator, user_id, team_id), "api_app_id": APP_ID,
        "token": verification_token, "trigger_id": _trigger_id(), "view": view,
        "response_urls": [], "enterprise": None, "is_enterprise_install": False,
    }


def _user(emulator: SlackEmulator, user_id: str, team_id: str = TEAM_ID) -> JSON:
    name = emulator.user(user_id)["name"]
    return {"id": user_id, "username": name, "name": name, "team_id": team_id}


def _team(team_id: str = TEAM_ID) -> JSON:
    return {"id": team_id, "domain": TEAM_DOMAIN}


def _trigger_id() -> str:
    """A fresh trigger id shaped like Slack's, e.g. "1337.42.5f0c…"."""
    return f"{secrets.randbelow(10**11)}.{secrets.randbelow(10**12)}.{secrets.token_hex(16)}"
