"""An aiohttp middleware that lets a request through only with a live breakglass token.

Every request must carry `Authorization: Bearer <token>`. The token is checked
with the bot's RFC 7662 introspection endpoint (HTTP Basic auth with this
service's client id and secret from the bot's policy, `[clients.<id>]`), and
the answer is cached for a few seconds, never past the token's `exp`. Anything
else is answered 401 (RFC 6750); if the bot cannot be reached, 503: this
middleware fails closed.

The cache is what bounds how late a revocation reaches this service: a token
revoked in Slack is refused here at most `cache_seconds` later (5 s by default;
0 turns the cache off and introspects every request).

Use:

    app = web.Application()
    breakglass_auth(app, introspect_url="https://breakglass.example.internal/oauth2/introspect",
                    client_id="payments-api", client_secret=os.environ["BREAKGLASS_CLIENT_SECRET"],
                    required_scopes={"payments:write"})

and read the token's claims in a handler from `request[BREAKGLASS]` (the
introspection answer: sub, scope, aud, exp, jti, breakglass.request_id, ...).

Run it as a demo server:

    BREAKGLASS_INTROSPECT_URL=http://127.0.0.1:3000/oauth2/introspect \\
    BREAKGLASS_CLIENT_ID=payments-api BREAKGLASS_CLIENT_SECRET=... \\
    python examples/aiohttp_middleware.py     # then: curl -H "Authorization: Bearer $TOKEN" :8080/
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_CACHED = 1024
MAX_TOKEN_LENGTH = 8192
# Where handlers find the introspection answer: request[BREAKGLASS].
BREAKGLASS: Any = web.RequestKey("breakglass", dict) if hasattr(web, "RequestKey") else "breakglass"


class TokenChecker:
    def __init__(self, introspect_url: str, client_id: str, client_secret: str, *,
                 cache_seconds: float = 5.0, required_scopes: Iterable[str] = (),
                 timeout: float = 3.0) -> None:
        self.introspect_url = introspect_url
        # RFC 6749 §2.3.1: both form-urlencoded, then Basic.
        pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
        self.authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self.cache_seconds = cache_seconds
        self.required_scopes = frozenset(required_scopes)
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.introspections = 0  # how many times the bot was asked (for tests and metrics)
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def close(self, _app: web.Application | None = None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def answer(self, token: str) -> dict[str, Any] | None:
        """The introspection answer of an active token, else None. Cached (by the
        token's SHA-256, so the cache holds no token) for at most cache_seconds."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        answer = await self._introspect(token)
        active = answer if answer.get("active") is True else None
        ttl = self.cache_seconds
        if active is not None and isinstance(active.get("exp"), int | float):
            ttl = min(ttl, active["exp"] - time.time())
        if ttl > 0:
            if len(self._cache) >= MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (now + ttl, active)
        return active

    async def _introspect(self, token: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        self.introspections += 1
        async with self._session.post(self.introspect_url, data={"token": token},
                                      headers={"Authorization": self.authorization}) as resp:
            if resp.status != 200:
                raise web.HTTPServiceUnavailable(text="token introspection failed\n")
            answer: dict[str, Any] = await resp.json()
            return answer

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _challenge(None, "a break-glass bearer token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            return _challenge("invalid_token", "the token is not valid")
        try:
            answer = await self.answer(token)
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=503, text="token introspection unavailable\n")
        if answer is None:
            return _challenge("invalid_token", "the token is expired, revoked or not for this service")
        if not self.required_scopes <= set(str(answer.get("scope", "")).split()):
            return _challenge("insufficient_scope", "the token lacks a required scope", status=403)
        request[BREAKGLASS] = answer
        return await handler(request)


def _challenge(error: str | None, description: str, status: int = 401) -> web.Response:
    params = 'realm="breakglass"'
    if error:
        params += f', error="{error}", error_description="{description}"'
    return web.json_response({"error": error or "unauthorized", "error_description": description},
                             status=status, headers={"WWW-Authenticate": f"Bearer {params}"})


def breakglass_auth(app: web.Application, *, introspect_url: str, client_id: str,
                    client_secret: str, cache_seconds: float = 5.0,
                    required_scopes: Iterable[str] = ()) -> TokenChecker:
    """Require a live breakglass token on every route of `app`."""
    checker = TokenChecker(introspect_url, client_id, client_secret,
                           cache_seconds=cache_seconds, required_scopes=required_scopes)
    app.middlewares.append(checker.middleware)
    app.on_cleanup.append(checker.close)
    return checker


async def whoami(request: web.Request) -> web.Response:
    claims = request[BREAKGLASS]
    return web.json_response({"sub": claims["sub"], "scope": claims["scope"],
                              "request": claims.get("breakglass", {}).get("request_id")})


def demo_app() -> web.Application:
    app = web.Application()
    breakglass_auth(app, introspect_url=os.environ["BREAKGLASS_INTROSPECT_URL"],
                    client_id=os.environ["BREAKGLASS_CLIENT_ID"],
                    client_secret=os.environ["BREAKGLASS_CLIENT_SECRET"])
    app.router.add_get("/", whoami)
    return app


if __name__ == "__main__":
    web.run_app(demo_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
