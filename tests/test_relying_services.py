"""What relying services use: JWKS, RFC 7662 introspection, RFC 7009 revocation,
use events, and tokens checked by other JOSE libraries. Everything over real HTTP
against a running Sandbox; tokens come from the real flow (command, two approvals,
reveal)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from sqlalchemy import select

from bot import audit
from bot.core.clock import OffsetClock
from bot.core.policy import parse_policy
from bot.introspection import REVALIDATE_AFTER
from bot.local.emulator import SlackSender
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, REVIEWS, Sandbox
from bot.runtime import Runtime
from bot.store.schema import token_uses

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://breakglass.example.internal"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
OTHER_SECRET = "other-client-secret-for-tests"
OTHER_CLIENT = (
    "[clients.other]\n"
    f'secret_sha256 = "{__import__("hashlib").sha256(OTHER_SECRET.encode()).hexdigest()}"\n'
    'audiences = ["db-api"]\n'
)


# --------------------------------------------------------------------------- helpers


async def get_token(box: Sandbox, text: str = "payments-write 30m INC-4521 refunds stuck",
                    approvers: tuple[str, ...] = (BOB, CAROL),
                    sender: SlackSender | None = None) -> tuple[str, str]:
    """(request id, token) through the real flow; `sender` (default: the sandbox's) reveals."""
    await box.slack.command(ALICE, text)
    await box.settle()
    rid = box.latest_request_id()
    for approver in approvers:
        await box.slack.click(approver, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
    views = len(box.emulator.views)
    await (sender or box.slack).click(ALICE, "bg_reveal", rid,
                                      channel_id=box.emulator.dm_channel_for(ALICE))
    await box.settle()
    # (another process's reveal is not among this sandbox's background work: wait for it)
    await box.emulator.wait_for(lambda: len(box.emulator.views) > views, timeout=10)
    for block in box.emulator.views[-1].view.get("blocks", []):
        found = _JWT.search(block.get("text", {}).get("text", ""))
        if found:
            return rid, found.group(0)
    raise AssertionError("the reveal modal held no token")


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def post(url: str, data: Any = None, headers: dict[str, str] | None = None,
               ) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.text()


async def introspect(box: Sandbox, token: str, client: str = "payments-api",
                     secret: str | None = None, url: str | None = None
                     ) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, text = await post(
        f"{url or box.url}/oauth2/introspect", {"token": token},
        basic(client, box.client_secret if secret is None else secret))
    return status, headers, json.loads(text)


async def revoke(box: Sandbox, token: str, client: str = "payments-api",
                 secret: str | None = None) -> tuple[int, dict[str, str], str]:
    return await post(f"{box.url}/oauth2/revoke", {"token": token},
                      basic(client, box.client_secret if secret is None else secret))


async def get_jwks(box: Sandbox) -> tuple[dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{box.url}/.well-known/jwks.json") as r:
        assert r.status == 200
        return dict(r.headers), await r.json()


def incident_texts(box: Sandbox, word: str) -> list[str]:
    return [m.text for m in box.emulator.messages(INCIDENT) if f"*{word}*" in (m.text or "")]


async def audit_rows(box: Sandbox, event: str) -> list[dict[str, Any]]:
    return [row async for row in audit.export(box.bot.db) if row["event"] == event]


async def uses_row(box: Sandbox) -> Any:
    async with box.bot.db.read() as conn:
        return (await conn.execute(select(token_uses))).one()


@pytest.fixture
async def clocked(tmp_path: Path, database_url: str):
    box = Sandbox(directory=tmp_path, clock=OffsetClock(), extra_policy=OTHER_CLIENT,
                  database_url=database_url)
    await box.start()
    try:
        yield box
    finally:
        await box.stop()


# --------------------------------------------------------------------------- JWKS


async def test_jwks_is_public_keys_only_and_short_lived(sandbox: Sandbox) -> None:
    headers, body = await get_jwks(sandbox)
    assert headers["Content-Type"].startswith("application/json")
    max_age = int(re.search(r"max-age=(\d+)", headers["Cache-Control"]).group(1))
    assert 0 < max_age <= 60
    [key] = body["keys"]
    assert key["kid"] == sandbox.bot.keyring.current.kid
    assert key["alg"] == "RS256" and key["use"] == "sig" and key["kty"] == "RSA"
    assert not PRIVATE_MEMBERS & set(key)


async def test_rotation_keeps_the_old_key_while_its_tokens_live(clocked: Sandbox) -> None:
    box = clocked
    _, token = await get_token(box, "payments-write 5m INC-1 rotate")
    old = jwt.get_unverified_header(token)["kid"]
    new = await box.bot.keyring.rotate(box.bot.db, box.bot.clock.now())
    _, body = await get_jwks(box)
    assert [k["kid"] for k in body["keys"]] == [new, old]  # served at once: the current key changed
    assert (await introspect(box, token))[2]["active"] is True  # the old key still verifies
    box.clock.advance(timedelta(minutes=5, seconds=30))  # type: ignore[union-attr]
    _, body = await get_jwks(box)
    assert [k["kid"] for k in body["keys"]] == [new, old]  # expired, but within the leeway
    box.clock.advance(timedelta(seconds=45))  # type: ignore[union-attr]
    _, body = await get_jwks(box)
    assert [k["kid"] for k in body["keys"]] == [new]


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # joserfc, citing RFC 9864
async def test_tokens_verify_with_other_jose_libraries(tmp_path: Path, algorithm: str) -> None:
    from joserfc import jwt as jr_jwt
    from joserfc.jwk import KeySet
    from jwcrypto import jwk as jc_jwk
    from jwcrypto import jwt as jc_jwt

    async with Sandbox(directory=tmp_path, algorithm=algorithm) as box:
        _, token = await get_token(box)
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt" and header["alg"] == algorithm
        jwks_url = f"{box.url}/.well-known/jwks.json"

        # PyJWT, fetching the key set itself (urllib: in a thread).
        def pyjwt() -> dict[str, Any]:
            client = jwt.PyJWKClient(jwks_url)
            key = client.get_signing_key_from_jwt(token)
            return jwt.decode(token, key.key, algorithms=[algorithm], audience="payments-api",
                              issuer=ISSUER, options={"require": ["exp", "iat", "nbf", "jti"]})

        claims = await asyncio.to_thread(pyjwt)
        assert claims["sub"] == ALICE and claims["scope"] == "payments:read payments:write"
        assert "reason" not in claims and "refunds" not in json.dumps(claims)

        _, keyset = await get_jwks(box)
        # jwcrypto
        jc = jc_jwt.JWT(jwt=token, key=jc_jwk.JWKSet.from_json(json.dumps(keyset)),
                        algs=[algorithm], check_claims={"iss": ISSUER, "aud": "payments-api",
                                                        "exp": None})
        assert json.loads(jc.claims)["jti"] == claims["jti"]
        # joserfc (authlib's JOSE implementation)
        decoded = jr_jwt.decode(token, KeySet.import_key_set(keyset), algorithms=[algorithm])
        assert decoded.header["kid"] == header["kid"]
        jr_jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISSUER},
                                 aud={"essential": True, "value": "payments-api"},
                                 exp={"essential": True}).validate(decoded.claims)
        # the documented offline verifier
        verifier = _example("verify_offline").Verifier(ISSUER, "payments-api", jwks_url=jwks_url)
        assert (await asyncio.to_thread(verifier.verify, token))["jti"] == claims["jti"]


# --------------------------------------------------------------------------- introspection


async def test_introspection_answers_an_active_token(sandbox: Sandbox) -> None:
    rid, token = await get_token(sandbox)
    status, headers, answer = await introspect(sandbox, token)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    claims = jwt.decode(token, options={"verify_signature": False})
    for name in ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "nbf", "jti"):
        assert answer[name] == claims[name], name
    assert answer["active"] is True and answer["token_type"] == "Bearer"
    assert answer["breakglass"]["request_id"] == rid
    assert answer["breakglass"]["incident"] == "INC-4521"


@pytest.mark.parametrize("path", ["/oauth2/introspect", "/oauth2/revoke"])
async def test_client_authentication(sandbox: Sandbox, path: str) -> None:
    url = f"{sandbox.url}{path}"
    secret = sandbox.client_secret
    bad = [
        {},
        basic("payments-api", secret + "x"),
        basic("payments-api", ""),
        basic("nobody", secret),
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Basic " + base64.b64encode(b"payments-api").decode()},
        {"Authorization": f"Bearer {secret}"},
    ]
    for headers in bad:
        status, got, text = await post(url, {"token": "x"}, headers)
        assert status == 401, headers
        assert got["WWW-Authenticate"].startswith("Basic ")
        assert json.loads(text)["error"] == "invalid_client"
    status, _, _ = await post(url, {"token": "x"}, {"Authorization": "basic " + base64.b64encode(
        f"payments-api:{secret}".encode()).decode()})
    assert status == 200  # the scheme name is case-insensitive


async def test_everything_inactive_looks_the_same(clocked: Sandbox) -> None:
    box = clocked
    _, expired = await get_token(box, "payments-write 5m INC-1 soon expired")
    _, revoked = await get_token(box, "payments-write 10m INC-2 soon revoked")
    _, other_aud = await get_token(box, "payments-write 10m INC-3 wrong client")
    _, live = await get_token(box, "payments-write 10m INC-3 live")
    assert (await introspect(box, revoked))[2]["active"] is True
    assert (await revoke(box, revoked))[0] == 200
    box.clock.advance(timedelta(minutes=6))  # type: ignore[union-attr]
    cases = {
        "expired": (expired, "payments-api", None),
        "revoked": (revoked, "payments-api", None),
        "unknown": (jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256"), "payments-api", None),
        "malformed": ("not a token", "payments-api", None),
        "empty": ("", "payments-api", None),
        "other audience": (other_aud, "other", OTHER_SECRET),
    }
    raw = set()
    for name, (token, client, secret) in cases.items():
        async with aiohttp.ClientSession() as s, s.post(
                f"{box.url}/oauth2/introspect", data={"token": token},
                headers=basic(client, secret or box.client_secret)) as r:
            assert r.status == 200, name
            assert r.headers["Cache-Control"] == "no-store", name
            raw.add(await r.read())
    assert len(raw) == 1 and json.loads(raw.pop()) == {"active": False}
    assert (await introspect(box, live))[2]["active"] is True


async def test_a_request_without_a_token_field_is_invalid(sandbox: Sandbox) -> None:
    for path in ("/oauth2/introspect", "/oauth2/revoke"):
        status, headers, text = await post(f"{sandbox.url}{path}", {"tok": "x"},
                                           basic("payments-api", sandbox.client_secret))
        assert status == 400 and json.loads(text)["error"] == "invalid_request"
        status, _, _ = await post(f"{sandbox.url}{path}", json.dumps({"token": "x"}),
                                  {**basic("payments-api", sandbox.client_secret),
                                   "Content-Type": "application/json"})
        assert status == 400


async def test_a_large_form_arriving_in_pieces_is_read_whole(sandbox: Sandbox) -> None:
    """The token field after 60 KB of padding, sent in small chunks."""
    _, token = await get_token(sandbox)
    body = ("pad=" + "x" * 60_000 + "&token=" + token).encode()

    async def pieces():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]
            await asyncio.sleep(0)

    async with aiohttp.ClientSession() as s, s.post(
            f"{sandbox.url}/oauth2/introspect", data=pieces(),
            headers={**basic("payments-api", sandbox.client_secret),
                     "Content-Type": "application/x-www-form-urlencoded"}) as r:
        assert r.status == 200
        assert (await r.json())["active"] is True


async def test_a_database_failure_is_503_not_500(sandbox: Sandbox, monkeypatch: Any) -> None:
    _, token = await get_token(sandbox)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(sandbox.bot.introspector, "_row", broken)
    status, headers, text = await post(f"{sandbox.url}/oauth2/introspect", {"token": token},
                                       basic("payments-api", sandbox.client_secret))
    assert status == 503 and headers["Cache-Control"] == "no-store"
    assert json.loads(text)["error"] == "temporarily_unavailable"
    monkeypatch.undo()
    assert (await introspect(sandbox, token))[2]["active"] is True


# --------------------------------------------------------------------------- revocation


async def test_revocation_kills_the_token_everywhere_at_once(sandbox: Sandbox) -> None:
    box = sandbox
    rid, token = await get_token(box)
    assert (await introspect(box, token))[2]["active"] is True  # now cached in the bot
    for unknown in ("whatever", "", "a.b.c", "x" * 10_000):
        assert (await revoke(box, unknown))[0] == 200
    status, headers, _ = await revoke(box, token)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert (await introspect(box, token))[2] == {"active": False}
    await box.settle()
    dm = box.emulator.messages(box.emulator.dm_channel_for(ALICE))
    assert all(token not in json.dumps(m.as_slack()) for m in dm)
    [posted] = incident_texts(box, "revoked")
    assert rid in posted and "payments-api" in posted
    [row] = await audit_rows(box, "revoked")
    assert row["actor"] == "client:payments-api" and row["details"]["via"] == "oauth2"
    assert (await revoke(box, token))[0] == 200  # again: still 200, nothing more happens
    await box.settle()
    assert len(incident_texts(box, "revoked")) == 1


async def test_a_client_cannot_revoke_another_audience(clocked: Sandbox) -> None:
    _, token = await get_token(clocked)
    assert (await revoke(clocked, token, "other", OTHER_SECRET))[0] == 200
    assert (await introspect(clocked, token))[2]["active"] is True


async def test_slack_revocation_is_seen_by_a_warm_cache_at_once(sandbox: Sandbox) -> None:
    rid, token = await get_token(sandbox)
    for _ in range(3):
        assert (await introspect(sandbox, token))[2]["active"] is True
    await sandbox.slack.command(BOB, f"revoke {rid}")
    await sandbox.settle()
    assert (await introspect(sandbox, token))[2] == {"active": False}


# --------------------------------------------------------------------------- use events


async def test_first_use_is_posted_at_once_later_uses_summarised(clocked: Sandbox) -> None:
    box = clocked
    rid, token = await get_token(box)
    assert incident_texts(box, "used") == []
    # Many concurrent first requests: still one first use.
    answers = await asyncio.gather(*(introspect(box, token) for _ in range(8)))
    assert all(a[2]["active"] for a in answers)
    await box.settle()
    [first] = incident_texts(box, "used")
    assert rid in first and "first used by `payments-api`" in first and "payments-write" in first
    for _ in range(4):
        await introspect(box, token)
    await box.bot.introspector.flush()
    row = await uses_row(box)
    assert (row.count, row.reported) == (12, 1)
    used = await audit_rows(box, "used")
    assert sum(r["details"]["uses"] for r in used) == 12  # every use, some rows stand for several
    assert {r["actor"] for r in used} == {"client:payments-api"}
    assert all(r["request_id"] == rid and r["details"]["jti"] == row.jti for r in used)
    assert used[0]["details"] == {"jti": row.jti, "uses": 1, "first": True}
    assert all(r["details"]["first_at"] <= r["details"]["last_at"] for r in used[1:])
    assert len(incident_texts(box, "used")) == 1  # the rest wait for the summary

    box.clock.advance(timedelta(seconds=61))  # type: ignore[union-attr]
    await _until(lambda: len(incident_texts(box, "used")) == 2)
    assert "used 11 more time(s), last by `payments-api`" in incident_texts(box, "used")[1]
    await introspect(box, token)  # within the minute: counted, not posted
    await asyncio.sleep(0.6)  # three sweeps
    await box.settle()
    assert len(incident_texts(box, "used")) == 2
    box.clock.advance(timedelta(seconds=61))  # type: ignore[union-attr]
    await _until(lambda: len(incident_texts(box, "used")) == 3)
    assert "used 1 more time(s)" in incident_texts(box, "used")[2]
    assert (await uses_row(box)).count == 13


async def test_summaries_of_several_tokens_share_one_message(clocked: Sandbox) -> None:
    box = clocked
    rid1, token1 = await get_token(box, "payments-write 20m INC-1 first")
    rid2, token2 = await get_token(box, "payments-write 20m INC-2 second")
    for token in (token1, token2, token1, token2, token2):
        assert (await introspect(box, token))[2]["active"] is True
    await box.bot.introspector.flush()
    await box.settle()
    assert len(incident_texts(box, "used")) == 2  # the two first uses
    box.clock.advance(timedelta(seconds=61))  # type: ignore[union-attr]
    await _until(lambda: len(incident_texts(box, "used")) == 3)
    [summary] = incident_texts(box, "used")[2:]
    lines = summary.splitlines()
    assert len(lines) == 2
    assert any(rid1 in ln and "used 1 more time(s)" in ln for ln in lines)
    assert any(rid2 in ln and "used 2 more time(s)" in ln for ln in lines)


async def test_buffered_uses_are_written_within_a_fraction_of_a_second(sandbox: Sandbox) -> None:
    _, token = await get_token(sandbox)
    for _ in range(5):
        await introspect(sandbox, token)
    await _until(lambda: sandbox.bot.introspector.buffered == 0, timeout=2)
    assert (await uses_row(sandbox)).count == 5


async def test_uses_survive_a_failed_write(sandbox: Sandbox, monkeypatch: Any) -> None:
    monkeypatch.setattr("bot.introspection.FLUSH_EVERY", 30.0)
    _, token = await get_token(sandbox)
    intro = sandbox.bot.introspector
    for _ in range(5):
        await introspect(sandbox, token)  # the first is written at once, 4 are counted
    real = audit.append_many

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the database went away")

    monkeypatch.setattr("bot.introspection.audit.append_many", broken)
    assert await intro.flush() == 0
    assert intro.buffered == 4
    for _ in range(3):
        await introspect(sandbox, token)
    monkeypatch.setattr("bot.introspection.audit.append_many", real)
    assert await intro.flush() == 7
    assert (await uses_row(sandbox)).count == 8
    assert sum(r["details"]["uses"] for r in await audit_rows(sandbox, "used")) == 8


async def test_no_use_is_lost_on_clean_shutdown(tmp_path: Path, monkeypatch: Any, database_url: str) -> None:
    """Runtime.stop must call `await self.introspector.flush()` once the HTTP server
    stopped: the background writer (slowed down here) must not be what saves them."""
    monkeypatch.setattr("bot.introspection.FLUSH_EVERY", 30.0)
    box = Sandbox(directory=tmp_path, database_url=database_url)
    await box.start()
    try:
        _, token = await get_token(box)
        for _ in range(20):
            await introspect(box, token)
        assert box.bot.introspector.buffered > 0  # the last ones are still in memory
        await box.stop_bot()
        await box.start_bot()  # same database
        assert (await uses_row(box)).count == 20
        assert sum(r["details"]["uses"] for r in await audit_rows(box, "used")) == 20
    finally:
        await box.stop()


# --------------------------------------------------------------------------- two processes


async def test_second_process_rotation_and_revocation(tmp_path: Path, database_url: str) -> None:
    """Two bot processes on one database: keys rotated with the CLI, a token revealed
    by the second, introspected by the first (which has reloaded its keys), revoked by
    the second (the first's cache sees it within REVALIDATE_AFTER)."""
    async with Sandbox(directory=tmp_path, database_url=database_url) as box:
        _, old_token = await get_token(box)
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        env = {**os.environ, "BREAKGLASS_DATABASE_URL": box.database_url,
               "BREAKGLASS_MASTER_KEY": box.master_key,
               "BREAKGLASS_POLICY": str(tmp_path / "breakglass.toml")}
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bot", "keys", "rotate"],
                                       env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        new_kid = re.search(r"(bg-[a-z2-7]+)", done.stdout).group(1)

        other = Runtime(box.settings, parse_policy(box.policy_text), policy_text=box.policy_text,
                        sweep_interval=0.2)
        await other.start()
        try:
            port = await other.serve_http("127.0.0.1", 0)
            async with SlackSender(f"http://127.0.0.1:{port}/slack/events", box.signing_secret,
                                   box.emulator) as sender:
                rid, token = await get_token(box, "payments-write 20m INC-9 second replica",
                                             sender=sender)
                assert jwt.get_unverified_header(token)["kid"] == new_kid
                # The first process has the new key from its key watcher (every 2 s), or
                # reloads on the unknown kid: either way the token verifies at once.
                assert (await introspect(box, token))[2]["active"] is True
                reloads = box.bot.introspector.reloads
                assert reloads <= 1
                assert box.bot.keyring.current.kid == new_kid
                _, keyset = await get_jwks(box)
                assert [k["kid"] for k in keyset["keys"]] == [new_kid, old_kid]
                # unknown kids do not reload the keys again and again
                forged = jwt.encode({"x": 1}, "k" * 32, algorithm="HS256",
                                    headers={"kid": "bg-nosuchkey0000", "typ": "at+jwt"})
                for _ in range(5):
                    assert (await introspect(box, forged))[2] == {"active": False}
                assert box.bot.introspector.reloads <= reloads + 1

                await sender.command(ALICE, f"revoke {rid}")
                await other.idle()
                started = time.monotonic()
                while (await introspect(box, token))[2]["active"]:
                    assert time.monotonic() - started < REVALIDATE_AFTER + 1.0
                    await asyncio.sleep(0.05)
                assert time.monotonic() - started <= REVALIDATE_AFTER + 0.5
                assert (await introspect(box, old_token))[2]["active"] is True
        finally:
            await other.stop(drain_seconds=2.0)


# --------------------------------------------------------------------------- example, docs


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_aiohttp_middleware_example(sandbox: Sandbox) -> None:
    example = _example("aiohttp_middleware")
    app = web.Application()
    checker = example.breakglass_auth(app, introspect_url=f"{sandbox.url}/oauth2/introspect",
                                      client_id="payments-api",
                                      client_secret=sandbox.client_secret, cache_seconds=0.5,
                                      required_scopes={"payments:write"})
    app.router.add_get("/", example.whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # noqa: SLF001
    rid, token = await get_token(sandbox)

    async def call(headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
            return r.status, dict(r.headers), await r.text()

    try:
        status, headers, _ = await call({})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer realm=")
        status, headers, _ = await call({"Authorization": "Bearer not-a-token"})
        assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        for _ in range(3):
            status, _, text = await call({"Authorization": f"Bearer {token}"})
            assert status == 200
            assert json.loads(text) == {"sub": ALICE, "scope": "payments:read payments:write",
                                        "request": rid}
        assert checker.introspections == 2  # one per token: the rest came from the cache
        await sandbox.slack.command(BOB, f"revoke {rid}")
        await sandbox.settle()
        await asyncio.sleep(0.6)  # the middleware's cache_seconds
        status, _, _ = await call({"Authorization": f"Bearer {token}"})
        assert status == 401
    finally:
        await runner.cleanup()


async def test_docs_curl_line_works(sandbox: Sandbox) -> None:
    docs = (ROOT / "docs" / "verifying-tokens.md").read_text()
    assert "examples/aiohttp_middleware.py" in docs
    line = next(ln for ln in docs.splitlines() if ln.startswith("curl ") and "introspect" in ln)
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    _, token = await get_token(sandbox)
    env = {**os.environ, "BREAKGLASS_CLIENT_SECRET": sandbox.client_secret, "TOKEN": token}
    command = line.replace("https://breakglass.example.internal", sandbox.url)
    done = await asyncio.to_thread(subprocess.run, ["sh", "-c", command], env=env,
                                   capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["active"] is True


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
