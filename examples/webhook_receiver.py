"""A minimal receiver for breakglass webhooks (format "breakglass").

It does what every receiver should:

1. check `X-Breakglass-Signature` (HMAC-SHA256 over `timestamp + "." + body`,
   compared in constant time) before looking at the body;
2. refuse a timestamp more than 5 minutes away from its own clock (a replay of an
   old request);
3. drop a repeat by the event's `id` (the bot sends an event again when it could
   not tell whether the first POST arrived) and answer it 200 all the same, so the
   bot stops retrying.

Run it (aiohttp is a dependency of breakglass):

    BREAKGLASS_WEBHOOK_SECRET=… python examples/webhook_receiver.py --port 8090

and point a `[[webhooks]]` entry at `http://127.0.0.1:8090/breakglass`. Each new
event is printed as one JSON line on stdout. A real receiver keeps the ids it has
seen in its own store (a database with a unique index), for longer than the bot
retries (a dead letter can be re-queued days later), instead of in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

TOLERANCE = 300  # seconds
SEEN_MAX = 100_000


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, now: float | None = None
           ) -> str | None:
    """None when the request is authentic and fresh; else why not."""
    if not timestamp.isdigit():
        return "missing or malformed X-Breakglass-Timestamp"
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > TOLERANCE:
        return "timestamp too far from now (a replay, or a clock off by minutes)"
    expected = "v1=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "bad signature"
    return None


class Receiver:
    def __init__(self, secret: bytes, out: Any = sys.stdout) -> None:
        self.secret = secret
        self.out = out
        self.seen: OrderedDict[str, None] = OrderedDict()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        problem = verify(self.secret, request.headers.get("X-Breakglass-Timestamp", ""), body,
                         request.headers.get("X-Breakglass-Signature", ""))
        if problem is not None:
            return web.json_response({"error": problem}, status=401)
        try:
            event = json.loads(body)
            event_id = str(event["id"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "not a breakglass event"}, status=400)
        if event_id in self.seen:
            return web.json_response({"ok": True, "repeat": True})
        self.seen[event_id] = None
        if len(self.seen) > SEEN_MAX:
            self.seen.popitem(last=False)
        self.out.write(json.dumps(event, sort_keys=True) + "\n")
        self.out.flush()
        return web.json_response({"ok": True})

    def app(self, path: str = "/breakglass") -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post(path, self.handle)
        return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--path", default="/breakglass")
    parser.add_argument("--secret-env", default="BREAKGLASS_WEBHOOK_SECRET",
                        help="the environment variable holding the shared secret")
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"{args.secret_env} is not set: set it to the secret the bot's webhook entry "
              "names in secret_env", file=sys.stderr)
        return 2
    print(f"listening on http://{args.host}:{args.port}{args.path}", file=sys.stderr, flush=True)
    web.run_app(Receiver(secret.encode()).app(args.path), host=args.host, port=args.port,
                print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
