"""HTTP endpoints on one port: Slack's requests, health, and what relying services call."""

from __future__ import annotations

import hmac
import json
import logging
import time
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.request.async_request import AsyncBoltRequest

from . import client_auth, metrics
from .core.policy import Client
from .introspection import INACTIVE_BODY
from .slack import acks, identity, intake
from .slack.signature import SignatureError, check_headers, verify_signature

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_SLACK_BODY = 1024 * 1024
# The signature of the Slack request being handled: Runtime.spawn checks it against the
# database before background work acts, so a replay to another process is not acted on.
SLACK_SIGNATURE: ContextVar[str | None] = ContextVar("slack_signature", default=None)
MAX_FORM_BODY = 64 * 1024
JWKS_MAX_AGE = 60  # seconds relying services may cache the key set (they refetch on an unknown kid)
JWKS_CACHE_SECONDS = 5.0  # seconds this process reuses the key set it built
_JWKS_CACHE: weakref.WeakKeyDictionary[Runtime, tuple[float, float, str, bytes]] = (
    weakref.WeakKeyDictionary())
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_ACTIVE = metrics.INTROSPECTIONS.labels(active="true")
_INACTIVE = metrics.INTROSPECTIONS.labels(active="false")


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


def build_web_app(rt: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_SLACK_BODY + 1)
    app[RUNTIME] = rt
    app.router.add_post("/slack/events", slack_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_post("/oauth2/introspect", introspect)
    app.router.add_post("/oauth2/revoke", revoke)
    app.router.add_get("/metrics", metrics_view)
    return app


def _problem(status: int, error: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status, headers=headers)


async def slack_events(request: web.Request) -> web.StreamResponse:
    rt: Runtime = request.app[RUNTIME]
    started = time.perf_counter()
    answered = await _answer(rt, request, started)
    if isinstance(answered, web.StreamResponse):
        return answered
    # A modal submission: its listener decides the answer (it may run the probes).
    return await _answer_through_bolt(rt, *answered, started=started)


async def _answer(rt: Runtime, request: web.Request, started: float
                  ) -> web.StreamResponse | tuple[str, str, dict[str, str], str]:
    """The answer, when it can be given at once; else what Bolt needs to give it."""
    if not rt.settings.signing_secret:
        # Socket Mode without a signing secret: nothing here can prove Slack sent it.
        return _problem(401, "invalid_signature", "this bot takes Slack requests over Socket Mode")
    timestamp = request.headers.get("X-Slack-Request-Timestamp")
    signature = request.headers.get("X-Slack-Signature")
    try:  # before a byte of the body is read (slack/intake.py)
        check_headers(rt.settings.signing_secret, timestamp, signature, time.time())
    except SignatureError as exc:
        return _problem(401, "invalid_signature", str(exc))
    reservation = intake.Reservation(rt.slack_body_budget)
    try:
        body = await intake.read_body(request, MAX_SLACK_BODY, reservation,
                                      rt.slack_body_timeout)
        verify_signature(rt.settings.signing_secret, timestamp, signature, body, time.time())
    except intake.BodyRefused as exc:
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        return _problem(exc.status, exc.error, exc.message, **headers)
    except SignatureError as exc:
        return _problem(401, "invalid_signature", str(exc))
    finally:
        reservation.release()
    if request.headers.get("X-Slack-Retry-Num"):
        # Slack retries only when an answer was late; the first delivery is being handled.
        return web.Response(status=200, headers={"X-Slack-No-Retry": "1"})
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _problem(400, "bad_body", "The body is not UTF-8.")
    problem, form, payload = _parse_slack_body(text, request.content_type)
    if problem:
        return _problem(400, "bad_body", problem)
    if "ssl_check" in form and payload is None and "command" not in form:
        return web.Response(status=200)  # Slack checking the certificate: nothing to do
    assert signature is not None and timestamp is not None
    foreign = _not_ours(rt, form, payload)
    if foreign is not None:
        return foreign
    if not rt.replay_guard.first_time_here(signature, int(timestamp)):
        log.warning("replayed Slack request ignored")
        return web.Response(status=200)
    headers = dict(request.headers)
    answer = acks.immediate(form, payload, rt.policy.requests.incident_pattern,
                            rt.policy.scopes)
    # Only a request Slack signed counts as one being answered (a slow unsigned body
    # must not hold back background work); from here to the answer nothing awaits.
    rt.foreground.answered()
    if answer is not None:
        # Answered now; the listener runs after Slack has its answer (see slack/acks.py).
        rt.dispatch_later(text, request.query_string, headers, signature)
        metrics.SLACK_ACK_SECONDS.observe(time.perf_counter() - started)
        if not answer:
            return web.Response(status=200)
        return web.Response(body=json.dumps(answer, ensure_ascii=False).encode("utf-8"),
                            content_type="application/json", charset="utf-8")
    return text, request.query_string, headers, signature


def _not_ours(rt: Runtime, form: dict[str, list[str]], payload: dict[str, Any] | None
              ) -> web.Response | None:
    """The answer to a payload from another workspace or app (slack/identity.py): it is
    acted on nowhere and counts for nothing. None for the bot's own."""
    if rt.identity is not None and rt.identity.accepts(identity.sender_of(form, payload)):
        return None
    known = rt.identity is not None
    log.warning("Slack payload refused: %s", "from another workspace or app" if known
                else "workspace not confirmed yet")
    if payload is None and "command" in form:
        text = identity.NOT_OURS if known else identity.NOT_YET
        return web.json_response({"text": text, "response_type": "ephemeral"})
    return web.Response(status=200)


async def _answer_through_bolt(rt: Runtime, text: str, query: str, headers: dict[str, str],
                               signature: str, *, started: float) -> web.StreamResponse:
    try:
        bolt_req = AsyncBoltRequest(body=text, query=query, headers=headers)
    except (TypeError, ValueError, KeyError, AttributeError):
        return _problem(400, "bad_body", "The payload is not a Slack request this app understands.")
    token = SLACK_SIGNATURE.set(signature)  # background work checks it across processes
    try:
        bolt_resp = await rt.bolt.async_dispatch(bolt_req)
    finally:
        SLACK_SIGNATURE.reset(token)
    metrics.SLACK_ACK_SECONDS.observe(time.perf_counter() - started)
    if bolt_resp.status >= 500:
        # A listener failed on this input; Slack shows a generic error either way, and a
        # 5xx would invite retries of something that cannot succeed.
        log.error("Slack request could not be handled (listener failed)")
        return _problem(400, "unhandled", "This request could not be handled; nothing was changed.")
    return await to_aiohttp_response(bolt_resp)


def _parse_slack_body(text: str, content_type: str
                      ) -> tuple[str | None, dict[str, list[str]], dict[str, Any] | None]:
    """(problem, form, payload): the form-encoded body and its interaction payload, if any."""
    if content_type != "application/x-www-form-urlencoded":
        return "Expected a form-encoded body, as Slack sends slash commands and interactions.", {}, None
    form = parse_qs(text, keep_blank_values=True)
    if "payload" in form:
        try:
            payload = json.loads(form["payload"][0])
        except ValueError:
            return "The payload field is not valid JSON.", form, None
        except RecursionError:
            return "The payload field is nested too deeply to be a Slack payload.", form, None
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            return "The payload field is not a Slack interaction payload.", form, None
        return _check_payload_shape(payload), form, payload
    if "command" in form:
        if not form.get("user_id", [""])[0]:
            return "A slash command needs a user_id.", form, None
        return None, form, None
    if form.get("ssl_check", [""])[0] == "1":
        return None, form, None
    return "Neither a slash command nor an interaction payload.", form, None


def _check_payload_shape(payload: dict[str, Any]) -> str | None:
    """The fields our listeners and Bolt read must have the types Slack gives them."""
    for name in ("team", "enterprise", "channel", "container", "message", "view"):
        if payload.get(name) is not None and not isinstance(payload[name], dict):
            return f"payload.{name} must be an object."
    if not isinstance(payload.get("response_url", ""), str):
        return "payload.response_url must be a string."
    user = payload.get("user")
    if not (isinstance(user, dict) and isinstance(user.get("id"), str) and user["id"]):
        return "payload.user must be an object with a non-empty string id."
    if payload["type"] == "block_actions":
        actions = payload.get("actions")
        if not isinstance(actions, list) or not actions or not all(
            isinstance(a, dict) and isinstance(a.get("action_id"), str)
            and isinstance(a.get("value", ""), str) for a in actions
        ):
            return "payload.actions must be a non-empty list of actions with string action_id."
    if payload["type"] in ("view_submission", "view_closed"):
        view = payload.get("view")
        if not isinstance(view, dict) or not isinstance(view.get("state", {}), dict):
            return "payload.view must be an object with a state object."
        values = view.get("state", {}).get("values", {})
        if not isinstance(values, dict) or not all(
            isinstance(b, dict) and all(isinstance(v, dict) for v in b.values())
            for b in values.values()
        ):
            return "payload.view.state.values has an unexpected shape."
    return None


async def healthz(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RUNTIME]
    db_ok = await rt.db.ping()
    body = {"status": "ok" if db_ok else "unavailable", "database": db_ok,
            "mode": "socket" if rt.settings.socket_mode else "http",
            "signing_keys": rt.key_watch.status, "policy_sha256": rt.live.sha256}
    return web.json_response(body, status=200 if db_ok else 503)


async def jwks(request: web.Request) -> web.Response:
    """RFC 7517 key set. Served from a copy at most JWKS_CACHE_SECONDS old (it costs a
    query), remade at once when this process's current key changes."""
    rt: Runtime = request.app[RUNTIME]
    now = rt.clock.now().timestamp()
    mono = time.monotonic()
    kid = rt.keyring.current.kid
    cached = _JWKS_CACHE.get(rt)
    if (cached is None or cached[2] != kid or mono - cached[0] >= JWKS_CACHE_SECONDS
            or abs(now - cached[1]) >= JWKS_CACHE_SECONDS):
        body = json.dumps(await rt.jwks()).encode("utf-8")
        cached = (mono, now, kid, body)
        _JWKS_CACHE[rt] = cached
    return web.Response(body=cached[3], content_type="application/json",
                        headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


def build_metrics_app(rt: Runtime) -> web.Application:
    """The metrics listener's app (BREAKGLASS_METRICS_ADDR): GET /metrics, nothing else."""
    app = web.Application()
    app[RUNTIME] = rt
    app.router.add_get("/metrics", _metrics)
    return app


async def metrics_view(request: web.Request) -> web.Response:
    """/metrics on the main (public) port: only with `Authorization: Bearer` equal to
    BREAKGLASS_METRICS_TOKEN, when that is set; 404 otherwise, as if it were not there."""
    rt: Runtime = request.app[RUNTIME]
    expected = rt.settings.metrics_token
    given = request.headers.get("Authorization", "")
    if not expected or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                               f"Bearer {expected}".encode()):
        raise web.HTTPNotFound()
    return await _metrics(request)


async def _metrics(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RUNTIME]
    metrics.OUTBOX_PENDING.set(await rt.dispatcher.pending_count())
    return web.Response(body=generate_latest(metrics.REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _authenticate(request: web.Request, rt: Runtime
                        ) -> tuple[str, Client] | web.Response:
    """HTTP Basic client authentication (RFC 6749 §2.3.1), throttled and cached
    (client_auth.py): the client, or the 401 or 429 to answer."""
    remote = client_auth.client_address(request.remote,
                                        request.headers.getall("X-Forwarded-For", []),
                                        rt.settings.trusted_proxies)
    result = await rt.client_auth.authenticate(request.headers.get("Authorization", ""),
                                               remote, rt.policy.clients)
    if isinstance(result, client_auth.Refused):
        if result.status == 429:
            return _no_store({"error": "slow_down", "error_description":
                              "too many failed client authentications; retry later"},
                             status=429, headers={"Retry-After": str(result.retry_after)})
        return _unauthorized()
    return result


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "invalid_client", "error_description": "client authentication failed"},
        status=401, headers={"WWW-Authenticate": 'Basic realm="breakglass", charset="UTF-8"',
                             "Cache-Control": "no-store", "Pragma": "no-cache"})


def _invalid_request(description: str) -> web.Response:
    return _no_store({"error": "invalid_request", "error_description": description}, status=400)


async def _token_form(request: web.Request) -> str | None:
    """The `token` field of a form-encoded body: None when the body is not a form or has
    no such field; "" when the body is too large (so it reads as no valid token)."""
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    if request.content_length is not None:
        if request.content_length > MAX_FORM_BODY:
            return ""
        return _token_field(await request.read())
    chunks: list[bytes] = []
    size = 0
    while True:  # StreamReader.read(n) may return less than n: read until EOF
        chunk = await request.content.read(MAX_FORM_BODY + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_FORM_BODY:
            return ""
    return _token_field(b"".join(chunks))


def _token_field(body: bytes) -> str | None:
    if body.startswith(b"token=") and body.isascii() and not (
            b"&" in body or b"%" in body or b"+" in body):
        return body[6:].decode("ascii")  # the usual body, nothing escaped: as parse_qs would
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return ""
    values = form.get("token")
    return values[0] if values else None


def _no_store(data: dict[str, Any], status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers={**_NO_STORE, **(headers or {})})


async def introspect(request: web.Request) -> web.Response:
    """RFC 7662. Every token that is not active for this client: 200 {"active": false}."""
    rt: Runtime = request.app[RUNTIME]
    auth = await _authenticate(request, rt)
    if isinstance(auth, web.Response):
        return auth
    token = await _token_form(request)
    if token is None:
        return _invalid_request("a form-encoded body with a token field is required")
    try:
        body = await rt.introspector.introspect_json(token, *auth)
    except Exception as exc:  # noqa: BLE001 - the database is unreachable, say: not a 500
        log.error("introspection failed: %s: %s", type(exc).__name__, exc)
        return _unavailable()
    (_ACTIVE if body is not INACTIVE_BODY else _INACTIVE).inc()
    return web.Response(body=body, content_type="application/json", headers=_NO_STORE)


async def revoke(request: web.Request) -> web.Response:
    """RFC 7009: 200 for any token string, known or not, live or not."""
    rt: Runtime = request.app[RUNTIME]
    auth = await _authenticate(request, rt)
    if isinstance(auth, web.Response):
        return auth
    token = await _token_form(request)
    if token is None:
        return _invalid_request("a form-encoded body with a token field is required")
    if token:
        try:
            await rt.introspector.revoke(token, *auth)
        except Exception as exc:  # noqa: BLE001 - the database is unreachable: say so, not a 500
            log.error("revocation failed: %s: %s", type(exc).__name__, exc)
            return _unavailable()
    return web.Response(status=200, headers=_NO_STORE)


def _unavailable() -> web.Response:
    return _no_store({"error": "temporarily_unavailable",
                      "error_description": "token state cannot be read or changed now; retry"},
                     status=503)
