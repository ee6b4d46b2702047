"""Contract §5 promises of the HTTP endpoints that no other test pinned down: `/healthz`
is not 200 while the database does not answer (and is again once it does), and an
RFC 7662 / RFC 7009 `token_type_hint`, whatever it names, changes no answer (RFC 7009
§2.1: a server that cannot find the token under the hint searches everything). Real
bot over loopback HTTP, tokens from the real flow."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from test_token_attacks import get_token

from bot.local.sandbox import Sandbox


async def get_json(url: str) -> tuple[int, str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, r.content_type, await r.json()


async def form(box: Sandbox, path: str, data: dict[str, str]) -> tuple[int, str]:
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as s, s.post(
            f"{box.url}{path}", data=data, headers={"Authorization": f"Basic {auth}"}) as r:
        return r.status, await r.text()


async def test_healthz_is_503_when_the_database_does_not_answer(sandbox: Sandbox) -> None:
    url = f"{sandbox.url}/healthz"
    assert (await get_json(url))[0] == 200
    engine = sandbox.bot.db.engine.sync_engine

    def unreachable(*_: Any) -> None:  # every statement fails as with a lost server
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database down"))

    event.listen(engine, "before_cursor_execute", unreachable)
    try:
        status, content_type, body = await get_json(url)
    finally:
        event.remove(engine, "before_cursor_execute", unreachable)
    assert status == 503 and content_type == "application/json"
    assert body["database"] is False and body["status"] != "ok"
    status, _, body = await get_json(url)
    assert status == 200 and body["status"] == "ok" and body["database"] is True


async def test_a_token_type_hint_changes_nothing(sandbox: Sandbox) -> None:
    box = sandbox
    live = await get_token(box, "payments-write 10m INC-1 hinted")
    for hint in ("access_token", "refresh_token", "no_such_type"):
        status, text = await form(box, "/oauth2/introspect",
                                  {"token": live, "token_type_hint": hint})
        assert status == 200 and json.loads(text)["active"] is True, (hint, text)
    status, _ = await form(box, "/oauth2/revoke",
                           {"token": live, "token_type_hint": "refresh_token"})
    assert status == 200
    status, text = await form(box, "/oauth2/introspect",
                              {"token": live, "token_type_hint": "access_token"})
    assert status == 200 and json.loads(text) == {"active": False}
    for hint in ("access_token", "refresh_token"):
        status, _ = await form(box, "/oauth2/revoke", {"token": "not-a-token",
                                                       "token_type_hint": hint})
        assert status == 200  # RFC 7009 §2.2: an invalid token is no error
