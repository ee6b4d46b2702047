"""A webhook receiver on loopback for the tests: records every POST, checks its
signature independently of the bot's code, and answers as a test scripts it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    status: int  # what the receiver answered (0: it hung)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """`script`: answers for the next requests, in order: an HTTP status, a
    (status, headers) pair, or "hang". When it is empty every request gets 200."""

    secret: bytes | None = None
    path: str = "/hook"
    script: list[Any] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    url: str = ""

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}{self.path}"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = self.script.pop(0) if self.script else 200
        got = Received(dict(request.headers), body, time.monotonic(), 0)
        self.received.append(got)
        if answer == "hang":
            await asyncio.sleep(3600)
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        got.status = status
        return web.Response(status=status, headers=headers, text="ok")

    # -- what the tests look at -------------------------------------------------

    def signature_ok(self, r: Received) -> bool:
        assert self.secret is not None
        ts = r.headers.get("X-Breakglass-Timestamp", "")
        sig = r.headers.get("X-Breakglass-Signature", "")
        want = "v1=" + hmac.new(self.secret, ts.encode() + b"." + r.body,
                                hashlib.sha256).hexdigest()
        return hmac.compare_digest(sig, want) and abs(time.time() - int(ts)) < 300

    def delivered(self) -> list[dict[str, Any]]:
        """Bodies answered 2xx, in arrival order."""
        return [r.json for r in self.received if 200 <= r.status < 300]

    def events(self) -> list[str]:
        return [b["event"] for b in self.delivered()]
