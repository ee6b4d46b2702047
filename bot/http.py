"""HTTP endpoints on one port: Slack's requests, health, and what relying services call."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.request.async_request import AsyncBoltRequest

from . import metrics
from .core.policy import Client
from .slack.signature import SignatureError, verify_signature

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_SLACK_BODY = 1024 * 1024
MAX_FORM_BODY = 64 * 1024


def build_web_app(rt: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_SLACK_BODY + 1)
    app["rt"] = rt
    app.router.add_post("/slack/events", slack_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_post("/oauth2/introspect", introspect)
    app.router.add_post("/oauth2/revoke", revoke)
    app.router.add_get("/metrics", metrics_view)
    return app


def _problem(status: int, error: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status, headers=headers)


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    if request.content_length is not None and request.content_length > limit:
        return None
    body = await request.content.read(limit + 1)
    return None if len(body) > limit else body


async def slack_events(request: web.Request) -> web.StreamResponse:
    rt: Runtime = request.app["rt"]
    started = time.perf_counter()
    body = await _read_limited(request, MAX_SLACK_BODY)
    if body is None:
        return _problem(413, "too_large", "Slack request bodies are at most 1 MiB.")
    try:
        verify_signature(rt.settings.signing_secret or "", request.headers.get("X-Slack-Request-Timestamp"),
                         request.headers.get("X-Slack-Signature"), body, time.time())
    except SignatureError as exc:
        return _problem(401, "invalid_signature", str(exc))
    if request.headers.get("X-Slack-Retry-Num"):
        # Slack retries only when an answer was late; the first delivery is being handled.
        return web.Response(status=200, headers={"X-Slack-No-Retry": "1"})
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _problem(400, "bad_body", "The body is not UTF-8.")
    problem = _check_slack_body(text, request.content_type)
    if problem:
        return _problem(400, "bad_body", problem)
    if not await rt.replay_guard.first_time(request.headers["X-Slack-Signature"]):
        log.warning("replayed Slack request ignored")
        return web.Response(status=200)
    bolt_req = AsyncBoltRequest(body=text, query=request.query_string,
                                headers=dict(request.headers))
    bolt_resp = await rt.bolt.async_dispatch(bolt_req)
    metrics.SLACK_ACK_SECONDS.observe(time.perf_counter() - started)
    return await to_aiohttp_response(bolt_resp)


def _check_slack_body(text: str, content_type: str) -> str | None:
    if content_type != "application/x-www-form-urlencoded":
        return "Expected a form-encoded body, as Slack sends slash commands and interactions."
    form = parse_qs(text, keep_blank_values=True)
    if "payload" in form:
        try:
            payload = json.loads(form["payload"][0])
        except ValueError:
            return "The payload field is not valid JSON."
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            return "The payload field is not a Slack interaction payload."
        return None
    if "command" in form:
        return None
    return "Neither a slash command nor an interaction payload."


async def healthz(request: web.Request) -> web.Response:
    rt: Runtime = request.app["rt"]
    db_ok = await rt.db.ping()
    body = {"status": "ok" if db_ok else "unavailable", "database": db_ok,
            "mode": "socket" if rt.settings.socket_mode else "http"}
    return web.json_response(body, status=200 if db_ok else 503)


async def jwks(request: web.Request) -> web.Response:
    rt: Runtime = request.app["rt"]
    keys = await rt.jwks()
    return web.json_response(keys, headers={"Cache-Control": "public, max-age=60"})


async def metrics_view(request: web.Request) -> web.Response:
    rt: Runtime = request.app["rt"]
    metrics.OUTBOX_PENDING.set(await rt.dispatcher.pending_count())
    return web.Response(body=generate_latest(metrics.REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def _authenticate(request: web.Request, clients: dict[str, Client]) -> tuple[str, Client] | None:
    """HTTP Basic client authentication (RFC 6749 §2.3.1), constant-time on the secret."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    from urllib.parse import unquote

    client_id, secret = unquote(client_id), unquote(secret)
    client = clients.get(client_id)
    digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()
    expected = client.secret_sha256 if client else "0" * 64
    if not sep or not hmac.compare_digest(digest, expected) or client is None:
        return None
    return client_id, client


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "invalid_client", "error_description": "client authentication failed"},
        status=401, headers={"WWW-Authenticate": 'Basic realm="breakglass"',
                             "Cache-Control": "no-store"})


async def _token_form(request: web.Request) -> str | None:
    body = await _read_limited(request, MAX_FORM_BODY)
    if body is None:
        return None
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return ""
    values = form.get("token") or [""]
    return values[0]


def _no_store(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def introspect(request: web.Request) -> web.Response:
    rt: Runtime = request.app["rt"]
    auth = _authenticate(request, rt.policy.clients)
    if auth is None:
        return _unauthorized()
    token = await _token_form(request)
    if token is None:
        return _no_store({"active": False})
    answer = await rt.introspector.introspect(token, *auth)
    metrics.INTROSPECTIONS.labels(active=str(answer.get("active", False)).lower()).inc()
    return _no_store(answer)


async def revoke(request: web.Request) -> web.Response:
    rt: Runtime = request.app["rt"]
    auth = _authenticate(request, rt.policy.clients)
    if auth is None:
        return _unauthorized()
    token = await _token_form(request)
    if token:
        await rt.introspector.revoke(token, *auth)
    return web.Response(status=200, headers={"Cache-Control": "no-store"})
