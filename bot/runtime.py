"""Everything the bot runs, wired together: used by `serve`, `demo` and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.ext.asyncio import AsyncConnection

from . import audit
from .client_auth import ClientAuthenticator
from .config import Settings, split_listen_addr
from .core.clock import Clock, SystemClock
from .core.policy import Policy
from .delivery.audit_publish import GATHER, publish_head
from .delivery.outbox import Dispatcher
from .delivery.webhooks import KIND as WEBHOOK_KIND
from .delivery.webhooks import Webhooks
from .directory import Directory
from .foreground import PASS_FIRST, Foreground
from .governance import alerts, reconcile
from .governance.inventory import Inventory
from .governance.key_watch import KeyWatch
from .governance.live_policy import LivePolicy
from .governance.membership import MembershipRecheck
from .governance.policy_reload import PolicyReloader, ReloadResult
from .governance.reviews import Reviews
from .http import SLACK_SIGNATURE, build_metrics_app, build_web_app
from .introspection import Introspector
from .keys import AUDIT_KEY_NAME, KeyRing, sealed_secret
from .service import Service
from .slack import channels, identity, intake
from .slack.app import PooledRespond, build_app
from .slack.handlers import Handlers
from .store import closures
from .store.closures import ClosureFeed
from .store.db import Database
from .store.replay import ReplayGuard
from .triggers import Prober

log = logging.getLogger(__name__)
LINGER = 1.0  # seconds
IDENTITY_RETRY = 10.0  # seconds between auth.test attempts while it has not answered
_WAITED: ContextVar[bool] = ContextVar("waited_for_foreground", default=False)

APP_TOKEN_REFUSED = {"invalid_auth", "not_authed", "not_allowed_token_type", "token_revoked",
                     "token_expired", "account_inactive"}


class MetricsAddrUnusable(Exception):
    """BREAKGLASS_METRICS_ADDR could not be listened on; the message says what to do."""


class AppTokenRefused(Exception):
    """Slack refused SLACK_APP_TOKEN; the message names it and says what to do."""


BOT_TOKEN_REFUSED = APP_TOKEN_REFUSED | {"invalid_auth", "not_authed", "token_revoked"}


class BotTokenRefused(Exception):
    """Slack refused SLACK_BOT_TOKEN at start (auth.test); the message says what to do."""


def slack_client(settings: Settings, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    # No built-in retries: the outbox owns retrying. A logger pinned at INFO keeps
    # slack_sdk's DEBUG request dumps (which would include token text) out of every log.
    sdk_log = logging.getLogger("bot.slack.sdk")
    sdk_log.setLevel(logging.INFO)
    return AsyncWebClient(token=settings.bot_token, base_url=settings.api_url, timeout=10,
                          retry_handlers=[], logger=sdk_log, session=session)


class Runtime:
    def __init__(self, settings: Settings, policy: Policy, *, clock: Clock | None = None,
                 sweep_interval: float = 1.0, policy_text: str = "",
                 env: Mapping[str, str] | None = None,
                 checkpoint_gather: timedelta = GATHER) -> None:
        self.settings = settings
        self.env = os.environ if env is None else env  # where [[webhooks]] secrets are read
        # The one holder of the running policy: every component reads it from here.
        self.live = LivePolicy(policy, policy_text)
        self.clock = clock or SystemClock()
        self.sweep_interval = sweep_interval
        self.checkpoint_gather = checkpoint_gather  # a security event's checkpoint waits this long
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._socket: Any = None
        self._connecting: asyncio.Task[Any] | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.foreground = Foreground()
        self.identity: identity.Identity | None = None
        self.client_auth = ClientAuthenticator()
        # Unverified Slack request bodies: how long one may take, and how many bytes of
        # them every request together may hold (slack/intake.py).
        self.slack_body_timeout = intake.BODY_TIMEOUT
        self.slack_body_budget = intake.BodyBudget()

    @property
    def policy(self) -> Policy:
        return self.live.policy

    @property
    def policy_hash(self) -> str:
        return self.live.sha256

    async def reload_policy(self, text: str, *, force: bool = False) -> ReloadResult:
        """Apply a new policy (contract §7.3); refused, and nothing changes, if it does
        not validate. The file watcher and SIGHUP come through the same reloader."""
        return await self.reloader.reload_text(text, source="<reload_policy>", trigger="api",
                                               force=force)

    async def _follow_up(self, payload: dict[str, Any], row_id: int) -> None:
        """An outbox follow-up row of a revocation pass (`reconcile.follow_up`)."""
        await reconcile.follow_up(self.service, payload, row_id)

    def on_sighup(self) -> None:
        """SIGHUP: reload the policy file and the signing keys now."""
        self._start(self._sighup())

    async def _sighup(self) -> None:
        log.info("SIGHUP: reloading the policy file and the signing keys")
        try:
            await self.key_watch.check(force=True)
        except Exception:  # noqa: BLE001 - the policy reload still runs
            log.exception("could not reload the signing keys")
        await self.reloader.reload_file(trigger="sighup", force=True)

    async def start(self) -> None:
        s = self.settings
        # First: a missing webhook secret is a configuration error (WebhookConfigError).
        self.webhooks = Webhooks(self.policy.webhooks, self.env)
        self.db = Database(s.database_url)
        try:
            await self.db.create_schema()
        except BaseException:
            await self.db.dispose()
            raise
        self.webhooks.attach(self.db)  # from here on, every audited event reaches them
        now = self.clock.now()
        self.audit_key = await sealed_secret(self.db, s.master_key, AUDIT_KEY_NAME)
        self.keyring = await KeyRing.open(self.db, s.master_key, self.policy.tokens.algorithm, now,
                                          on_switch=self._key_switched_at_start)
        # One connection pool for every call to Slack (Web API and response_url): without
        # it, slack_sdk and Bolt open a new connection (and TLS session) per call.
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.client = slack_client(s, self.http)
        self.prober = Prober()
        self.directory = Directory(self.live, self.client, clock=self.clock)
        self.dispatcher: Dispatcher
        self.service = Service(self.db, self.live, self.keyring, self.directory, self.prober,
                               self.clock, self.audit_key, wake_outbox=lambda: self.dispatcher.wake())
        self.dispatcher = Dispatcher(self.db, self.client, self.clock, self.service.materialise_dm,
                                     yield_to=self.foreground.wait,
                                     hold=self.service.passes.hold,
                                     senders={WEBHOOK_KIND: self.webhooks.sender(self.http)},
                                     jobs={reconcile.JOB: self._follow_up})
        self.introspector = Introspector(self.service, self.keyring, self.live, self.clock)
        self.membership = MembershipRecheck(self.service, self.directory, self.foreground.wait)
        self.reloader = PolicyReloader(self)
        self.key_watch = KeyWatch(self.db, self.keyring, self.clock)
        await self.key_watch.start()
        self.replay_guard = ReplayGuard(self.db, self.clock)
        self.reviews = Reviews(self.service)
        self.inventory = Inventory(self.service)
        self.handlers = Handlers(self.service, self.client, self.spawn, self.reviews,
                                 self.inventory, respond_at=lambda url: PooledRespond(
                                     response_url=url, session=self.http))
        self.bolt = build_app(self.handlers, self.client, s.signing_secret, self.http)
        self.bolt.middleware(self._only_our_workspace)  # Socket Mode's check (HTTP: http.py)
        self.web = build_web_app(self)
        try:
            await self._learn_identity(first=True)
        except BotTokenRefused:
            await self.http.close()
            await self.prober.close()
            await self.db.dispose()
            raise
        if self.identity is not None:  # Slack answered: are we where the policy posts?
            slack = self.policy.slack
            for problem in await channels.problems(self.client, {
                    "reviewer_channel": slack.reviewer_channel,
                    "incident_channel": slack.incident_channel}):
                log.warning("%s", problem)
        async with self.db.transaction() as conn:
            await audit.append(conn, self.audit_key, at=now, actor="breakglass", event="started",
                               details={"policy_sha256": self.policy_hash,
                                        "scopes": sorted(self.policy.scopes),
                                        "kid": self.keyring.current.kid})
        await self.service.reconcile_policy()
        self.closures = ClosureFeed(self.db, self.introspector.closed)
        await self.closures.start()
        self._loops = [asyncio.create_task(self.dispatcher.run(self._stop)),
                       asyncio.create_task(self._sweep_loop()),
                       asyncio.create_task(self.closures.run(self._stop)),
                       asyncio.create_task(self.membership.run(self._stop)),
                       asyncio.create_task(self.reloader.watch(self._stop)),
                       asyncio.create_task(self.key_watch.run(self._stop))]
        if self.identity is None:
            self._loops.append(asyncio.create_task(self._identity_loop()))

    async def _key_switched_at_start(self, conn: AsyncConnection, kid: str, previous: str) -> None:
        """`tokens.algorithm` changed while the bot was down, so this start made the new
        algorithm's first key: a rotation, audited `key_rotated` and alerted as a reload
        that switches algorithm (policy_reload.py) and `keys rotate` do; in the key's own
        transaction, so once across replicas starting together."""
        now = self.clock.now()
        alg = self.policy.tokens.algorithm
        details = {"kid": kid, "previous": previous, "alg": alg, "trigger": "start"}
        await audit.append(conn, self.audit_key, at=now, actor="breakglass", event="key_rotated",
                           details=details)
        await alerts.raise_alert_in(
            conn, self.audit_key, now, self.policy.slack.incident_channel, alerts.KEY_ROTATED,
            f"signing key rotated at start (`tokens.algorithm = \"{alg}\"` has no key yet): "
            f"`{kid}` signs new tokens; tokens signed by `{previous}` keep verifying until "
            "they expire.", {**details, "by": "start"})

    async def _learn_identity(self, *, first: bool = False) -> None:
        """Which team and app the bot token belongs to (slack/identity.py)."""
        try:
            self.identity = await identity.learn(self.client)
        except SlackApiError as exc:
            error = exc.response.get("error") if exc.response is not None else None
            if first and error in BOT_TOKEN_REFUSED:
                raise BotTokenRefused(
                    f"SLACK_BOT_TOKEN was refused by Slack ({error}): copy the Bot User OAuth "
                    "Token (xoxb-…) from your Slack app's OAuth & Permissions page, and "
                    "reinstall the app if it was revoked") from None
            if first:
                log.warning("auth.test failed (%s): Slack requests are refused until breakglass "
                            "knows its own workspace; retrying", error)
            return
        except Exception as exc:  # noqa: BLE001 - Slack unreachable: retried in the background
            if first:
                log.warning("auth.test failed (%s): Slack requests are refused until breakglass "
                            "knows its own workspace; retrying", type(exc).__name__)
            return
        log.debug("serving Slack team %s (app %s)", self.identity.team_id,
                 self.identity.app_id or "not named by auth.test")

    async def _identity_loop(self) -> None:
        while self.identity is None and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), IDENTITY_RETRY)
            if not self._stop.is_set():
                await self._learn_identity()

    async def _only_our_workspace(self, req: AsyncBoltRequest, resp: BoltResponse,
                                  next: Callable[[], Awaitable[BoltResponse]]) -> BoltResponse:
        body = req.body if isinstance(req.body, dict) else {}
        if self.identity is not None and self.identity.accepts(identity.sender_of_bolt_body(body)):
            return await next()
        text = identity.NOT_YET if self.identity is None else identity.NOT_OURS
        log.warning("Slack payload refused: %s", "workspace not confirmed yet"
                    if self.identity is None else "from another workspace or app")
        if "command" in body and "type" not in body:
            return BoltResponse(status=200, body=json.dumps(
                {"text": text, "response_type": "ephemeral"}),
                headers={"content-type": ["application/json;charset=utf-8"]})
        return BoltResponse(status=200, body="")

    async def serve_http(self, host: str | None = None, port: int | None = None) -> int:
        # A request answered before its body was read (a stale stamp, a body too slow) is
        # drained for at most LINGER seconds, then its connection is closed.
        self._runner = web.AppRunner(self.web, access_log=None, handle_signals=False,
                                     lingering_time=LINGER)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or self.settings.host,
                           self.settings.port if port is None else port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001
        self.port = sockets[0].getsockname()[1] if sockets else port
        await self._serve_metrics()
        return int(self.port or 0)

    async def _serve_metrics(self) -> None:
        """GET /metrics on its own listener, BREAKGLASS_METRICS_ADDR (contract §5): not on
        the public port, where it would show when tokens are issued and used."""
        addr = self.settings.metrics_addr
        if not addr:
            return
        host, port = split_listen_addr(addr)
        self._metrics_runner = web.AppRunner(build_metrics_app(self), access_log=None,
                                             handle_signals=False)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise MetricsAddrUnusable(
                f"BREAKGLASS_METRICS_ADDR {addr} cannot be listened on "
                f"({exc.strerror or exc}): set it to a free host:port, or off") from None
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001
        self.metrics_port = int(sockets[0].getsockname()[1]) if sockets else port

    async def start_socket_mode(self) -> None:
        """Check the app-level token once, then connect in the background (the SDK
        retries and reconnects by itself). AppTokenRefused if Slack refuses the token."""
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
        from slack_sdk.errors import SlackApiError

        url = None
        try:
            opened = await asyncio.wait_for(
                self.client.apps_connections_open(app_token=self.settings.app_token), 5)
            url = opened["url"]
        except SlackApiError as exc:
            error = exc.response.get("error") if exc.response is not None else None
            if error in APP_TOKEN_REFUSED:
                raise AppTokenRefused(
                    f"SLACK_APP_TOKEN was refused by Slack ({error}): use an app-level token "
                    "with the connections:write scope from your Slack app's Basic Information "
                    "page") from None
            log.warning("apps.connections.open failed (%s); Socket Mode keeps retrying", error)
        except Exception as exc:  # noqa: BLE001 - network trouble: the SDK keeps retrying
            log.warning("Slack unreachable (%s); Socket Mode keeps retrying", type(exc).__name__)
        self._socket = AsyncSocketModeHandler(self.bolt, self.settings.app_token)
        self._socket.client.wss_uri = url  # the SDK uses this URL first, then asks for new ones
        self._connecting = asyncio.create_task(self._socket.connect_async())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a listener's slow part after the ack. A Slack request's work runs only if
        no process has acted on the same signature (one spawn per Slack request)."""
        signature = SLACK_SIGNATURE.get()
        self._start(self._once(signature, coro))

    def dispatch_later(self, body: str, query: str, headers: dict[str, str], signature: str) -> None:
        """Run Bolt's listeners for a Slack request already answered (slack/acks.py)."""
        self._start(self._dispatch(body, query, headers, signature))

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _dispatch(self, body: str, query: str, headers: dict[str, str], signature: str) -> None:
        await self.service.passes.hold(PASS_FIRST)  # a revocation pass first, briefly
        await self.foreground.wait()
        SLACK_SIGNATURE.set(signature)  # this task's own context: its spawns check it
        _WAITED.set(True)  # its spawns have waited for the foreground already
        request = AsyncBoltRequest(body=body, query=query, headers=headers)
        response = await self.bolt.async_dispatch(request)
        ack = request.context.get("ack")
        if response.status == 200 and getattr(ack, "response", None) is not None:
            return  # a listener ran and acknowledged
        # The person was answered already ("Checking…"), so a failure here must reach them.
        log.error("Slack request answered but not handled: Bolt said %s", response.status)
        url = request.context.response_url
        if url:
            with contextlib.suppress(Exception):
                await PooledRespond(response_url=url, session=self.http)(
                    text=":warning: breakglass could not handle that just now; nothing was "
                    "changed. Try again in a minute.", response_type="ephemeral",
                    replace_original=False)

    async def _once(self, signature: str | None, coro: Coroutine[Any, Any, None]) -> None:
        if not _WAITED.get():
            await self.service.passes.hold(PASS_FIRST)
            await self.foreground.wait()
        if signature is None:
            await coro
            return
        if not await self.replay_guard.first_time(signature):
            coro.close()
            log.warning("Slack request already handled by another process; not acting twice")
            return
        await coro

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task failed: %s: %s", type(exc).__name__, exc)

    async def idle(self) -> None:
        """Wait until every background task started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _sweep_loop(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            try:
                await self.service.sweep()
                await self.reviews.sweep()
                await self.introspector.summarise_uses()
                await publish_head(self.db, self.audit_key, self.clock,
                                   self.policy.slack.incident_channel, self.keyring.current,
                                   gather=self.checkpoint_gather, wake=self.dispatcher.wake)
                rounds += 1
                if rounds % 60 == 0:
                    await self.replay_guard.prune()
                    await closures.prune(self.db, self.clock.now())
                    await alerts.prune_use_counters(self.db, self.clock.now())
            except Exception:  # noqa: BLE001 - keep sweeping
                log.exception("sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.sweep_interval)

    async def jwks(self) -> dict[str, Any]:
        return await self.keyring.jwks(self.db, self.clock.now())

    async def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop taking requests, finish what is in flight, flush the outbox, close."""
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close_async()
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # stop listening now; in-flight handlers finish
            await self._runner.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_seconds
        # Answered requests start their work later (dispatch, then spawn): wait for
        # those too, until none is left or the deadline passes.
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(0.1, deadline - loop.time()))
        await self.introspector.flush()  # uses counted in memory: written before the database closes
        self._stop.set()
        for t in self._loops:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, max(0.1, deadline - loop.time()))
        left = await self.dispatcher.drain(max(0.1, deadline - loop.time()))
        if left:
            log.warning("%d event(s) left in the outbox; they go out on next start", left)
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.prober.close()
        await self.http.close()
        await self.db.dispose()
