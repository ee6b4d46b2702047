"""RFC 8725 attacks through POST /oauth2/introspect.

Every forged or broken token answers 200 {"active": false} (never a 500), and
each test checks, through `Introspector.rejections`, that exactly the check it
aims at refused it: tokens are forged with the bot's real private key wherever
that is needed for every other check to pass.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bot.core.clock import OffsetClock
from bot.core.tokens import public_jwk, public_pem
from bot.introspection import (
    EMPTY,
    KEY_OUT_OF_WINDOW,
    NOT_ACTIVE,
    UNKNOWN_TOKEN,
    WRONG_AUDIENCE,
)
from bot.local.sandbox import ALICE, BOB, CAROL, REVIEWS, Sandbox

_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
OTHER_SECRET = secrets.token_urlsafe(16)
OTHER_CLIENT = (
    "[clients.other]\n"
    f'secret_sha256 = "{hashlib.sha256(OTHER_SECRET.encode()).hexdigest()}"\n'
    'audiences = ["db-api"]\n'
)

ALG_MISMATCH = "token algorithm does not match its key"
UNKNOWN_KID = "unknown key id"
BAD_SIGNATURE = "bad signature"
MALFORMED = "malformed token"
MALFORMED_HEADER = "malformed token header"


# --------------------------------------------------------------------------- helpers


async def get_token(box: Sandbox, text: str = "payments-write 10m INC-8725 attacks") -> str:
    await box.slack.command(ALICE, text)
    await box.settle()
    rid = box.latest_request_id()
    for approver in (BOB, CAROL):
        await box.slack.click(approver, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
    await box.slack.click(ALICE, "bg_reveal", rid, channel_id=box.emulator.dm_channel_for(ALICE))
    await box.settle()
    for block in box.emulator.views[-1].view.get("blocks", []):
        found = _JWT.search(block.get("text", {}).get("text", ""))
        if found:
            return found.group(0)
    raise AssertionError("the reveal modal held no token")


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_jws(header: dict[str, Any], claims: dict[str, Any],
            signer: Callable[[bytes], bytes] | None = None) -> str:
    signing_input = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(claims).encode())}"
    signature = signer(signing_input.encode()) if signer else b""
    return f"{signing_input}.{b64u(signature)}"


def fresh_claims(box: Sandbox, **changes: Any) -> dict[str, Any]:
    """Claims that pass every check: as the bot makes them, for a token it never issued."""
    now = int(box.bot.clock.now().timestamp())
    claims = {"iss": box.bot.policy.tokens.issuer, "sub": ALICE, "aud": "payments-api",
              "exp": now + 600, "iat": now, "nbf": now, "jti": secrets.token_urlsafe(16),
              "client_id": "breakglass", "scope": "payments:read payments:write",
              "breakglass": {"request_id": "RFORGED1", "approvers": [BOB, CAROL]}}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def sign(box: Sandbox, claims: dict[str, Any], key: Any = None, **header: Any) -> str:
    """Signed with the bot's real current key (or `key`), typ at+jwt and its kid."""
    key = key or box.bot.keyring.current
    headers = {"typ": "at+jwt", "kid": key.kid, **header}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)


async def introspect_raw(box: Sandbox, token: str, client: str = "payments-api",
                         secret: str | None = None) -> tuple[int, bytes]:
    auth = base64.b64encode(f"{client}:{secret or box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as s, s.post(
            f"{box.url}/oauth2/introspect", data={"token": token},
            headers={"Authorization": f"Basic {auth}"}) as r:
        assert r.headers.get("Cache-Control") == "no-store"
        return r.status, await r.read()


async def refused(box: Sandbox, token: str, reason: str | set[str], client: str = "payments-api",
                  secret: str | None = None) -> None:
    """Inactive, 200, exactly the shape of any inactive answer, and refused by `reason`."""
    before = Counter(box.bot.introspector.rejections)
    status, body = await introspect_raw(box, token, client, secret)
    assert status == 200
    assert json.loads(body) == {"active": False}
    delta = Counter(box.bot.introspector.rejections)
    delta.subtract(before)
    refused_by = {r for r, n in delta.items() if n}
    assert sum(delta.values()) == 1, delta
    if isinstance(reason, set):
        assert refused_by <= reason, refused_by
    else:
        assert refused_by == {reason}


@pytest.fixture
async def box(tmp_path: Path, database_url: str):
    sandbox = Sandbox(directory=tmp_path, clock=OffsetClock(), extra_policy=OTHER_CLIENT,
                      database_url=database_url)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.stop()


# --------------------------------------------------------------------------- attacks


async def test_a_perfect_forgery_with_the_real_key_is_still_unknown(box: Sandbox) -> None:
    """The bot's own key, every claim right, but never revealed: only issued tokens live."""
    await refused(box, sign(box, fresh_claims(box)), UNKNOWN_TOKEN)


async def test_alg_none(box: Sandbox) -> None:
    kid = box.bot.keyring.current.kid
    claims = fresh_claims(box)
    for alg in ("none", "None", "NONE"):
        await refused(box, raw_jws({"alg": alg, "typ": "at+jwt", "kid": kid}, claims),
                      ALG_MISMATCH)
    await refused(box, raw_jws({"alg": "none", "typ": "at+jwt"}, claims), "token has no key id")


async def test_hs256_signed_with_the_public_key_as_secret(box: Sandbox) -> None:
    key = box.bot.keyring.current
    claims = fresh_claims(box)
    pem = public_pem(key.public_key).encode()
    jwk_text = json.dumps(public_jwk(key.verification_key)).encode()
    for secret in (pem, pem.strip(), jwk_text):
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            token = raw_jws({"alg": alg, "typ": "at+jwt", "kid": key.kid}, claims,
                            lambda m, s=secret, d=digest: hmac.new(s, m, d).digest())
            await refused(box, token, ALG_MISMATCH)


async def test_another_asymmetric_algorithm_under_our_kid(box: Sandbox) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(fresh_claims(box), attacker, algorithm="ES256",
                       headers={"typ": "at+jwt", "kid": box.bot.keyring.current.kid})
    await refused(box, token, ALG_MISMATCH)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+JWT+x", "id_token", "", None])
async def test_typ_other_than_at_jwt(box: Sandbox, typ: str | None) -> None:
    await refused(box, sign(box, fresh_claims(box), typ=typ), "token type is not at+jwt")


async def test_unknown_or_injected_kid(box: Sandbox) -> None:
    claims = fresh_claims(box)
    kids = ["bg-doesnotexist", "../../../../dev/null", "' OR '1'='1", "bg-x\x00", "x" * 1000,
            "https://attacker.example/jwks.json"]
    for kid in kids:
        await refused(box, sign(box, claims, kid=kid), UNKNOWN_KID)
    assert box.bot.introspector.reloads <= 1  # made-up kids do not hammer the database
    # kid of the wrong type
    token = raw_jws({"alg": "RS256", "typ": "at+jwt", "kid": 7}, claims,
                    lambda m: b"\0" * 256)
    await refused(box, token, MALFORMED_HEADER)


async def test_embedded_jwk_jku_x5u_are_ignored(box: Sandbox) -> None:
    """An attacker's key offered in the header itself, under our kid: never used."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = attacker.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(b"\x01\x00\x01")}
    kid = box.bot.keyring.current.kid
    for extra in ({"jwk": jwk}, {"jku": "https://attacker.example/jwks.json"},
                  {"x5u": "https://attacker.example/cert.pem"}):
        token = jwt.encode(fresh_claims(box), attacker, algorithm="RS256",
                           headers={"typ": "at+jwt", "kid": kid, **extra})
        await refused(box, token, BAD_SIGNATURE)


async def test_crit_header(box: Sandbox) -> None:
    # PyJWT already refuses a crit it does not implement while reading the header
    await refused(box, sign(box, fresh_claims(box), crit=["exp"]), MALFORMED_HEADER)
    await refused(box, sign(box, fresh_claims(box), crit=["x-custom"], **{"x-custom": 1}),
                  MALFORMED_HEADER)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat", "iss", "aud", "sub", "jti"])
async def test_missing_required_claim(box: Sandbox, claim: str) -> None:
    claims = fresh_claims(box)
    del claims[claim]
    await refused(box, sign(box, claims), f"token lacks required claim {claim}")


async def test_nbf_in_the_future(box: Sandbox) -> None:
    now = int(box.bot.clock.now().timestamp())
    await refused(box, sign(box, fresh_claims(box, nbf=now + 120)), "token not yet valid (nbf)")


async def test_exp_in_the_past_or_not_a_number(box: Sandbox) -> None:
    now = int(box.bot.clock.now().timestamp())
    await refused(box, sign(box, fresh_claims(box, exp=now - 1)), "token expired")
    await refused(box, sign(box, fresh_claims(box, exp="never")), "claim exp is not a number")


async def test_wrong_issuer(box: Sandbox) -> None:
    for iss in ("https://attacker.example", "https://breakglass.example.internal/", ""):
        await refused(box, sign(box, fresh_claims(box, iss=iss)), "wrong issuer")


async def test_wrong_audience_for_the_calling_client(box: Sandbox) -> None:
    """A real, live payments-api token, introspected by a client that may only see db-api."""
    token = await get_token(box)
    await refused(box, token, WRONG_AUDIENCE, client="other", secret=OTHER_SECRET)
    await refused(box, token, WRONG_AUDIENCE, client="other", secret=OTHER_SECRET)  # cached too
    status, body = await introspect_raw(box, token)
    assert json.loads(body)["active"] is True
    await box.settle()  # one use (payments-api's); the refused ones are none
    used = [m for m in box.emulator.messages("C0INCIDENT") if "*used*" in (m.text or "")]
    assert len(used) == 1 and "`payments-api`" in used[0].text


async def test_real_tokens_expired_or_revoked(box: Sandbox) -> None:
    expired = await get_token(box, "payments-write 5m INC-1 expires")
    revoked = await get_token(box, "payments-write 10m INC-2 revoked")
    for token in (expired, revoked):
        assert json.loads((await introspect_raw(box, token))[1])["active"] is True
    await box.slack.command(BOB, f"revoke {box.latest_request_id()}")
    await box.settle()
    await refused(box, revoked, NOT_ACTIVE)
    box.clock.advance(timedelta(minutes=5, seconds=1))  # type: ignore[union-attr]
    await refused(box, expired, "token expired")


async def test_a_rotated_out_key_after_its_window(box: Sandbox) -> None:
    """The old key's last token expired (and the leeway passed): the key is out of the
    JWKS, and a token freshly signed with it (say its private half leaked) is refused
    by that check alone, before its signature is even looked at."""
    token = await get_token(box, "payments-write 5m INC-3 old key")
    old = box.bot.keyring.current
    new_kid = await box.bot.keyring.rotate(box.bot.db, box.bot.clock.now())
    forged_early = sign(box, fresh_claims(box), key=old)
    await refused(box, forged_early, UNKNOWN_TOKEN)  # the key is still published: it verifies
    box.clock.advance(timedelta(minutes=7))  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s, s.get(f"{box.url}/.well-known/jwks.json") as r:
        assert [k["kid"] for k in (await r.json())["keys"]] == [new_kid]
    await refused(box, sign(box, fresh_claims(box), key=old), KEY_OUT_OF_WINDOW)
    await refused(box, token, KEY_OUT_OF_WINDOW)
    await refused(box, sign(box, fresh_claims(box)), UNKNOWN_TOKEN)  # the new key verifies


async def test_truncated_and_garbled(box: Sandbox) -> None:
    token = await get_token(box)
    head, payload, signature = token.split(".")
    await refused(box, f"{head}.{payload}.", BAD_SIGNATURE)
    await refused(box, f"{head}.{payload}.{signature[:-2]}", BAD_SIGNATURE)
    await refused(box, f"{head}.{payload}.{signature[:-1]}", MALFORMED_HEADER)  # bad base64
    await refused(box, f"{head}.{payload}", MALFORMED)
    await refused(box, token[: len(token) // 2], MALFORMED)
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    await refused(box, f"{head}.{flipped}.{signature}", {BAD_SIGNATURE, MALFORMED})
    await refused(box, f"{head[:-3]}.{payload}.{signature}", {MALFORMED, "malformed token header",
                                                               "token type is not at+jwt"})
    deep = b64u(b"[" * 1500)  # nested past any JSON parser's recursion limit
    for junk in ("a.b.c", "...", "eyJ.eyJ.eyJ", "\u00e9.\u00e9.\u00e9", "\x00\x01\x02", " ",
                 f"{deep}.{payload}.{signature}", f"{head}.{deep}.{signature}"):
        await refused(box, junk, {MALFORMED, "malformed token header", BAD_SIGNATURE})
    assert json.loads((await introspect_raw(box, token))[1])["active"] is True


async def test_huge_tokens(box: Sandbox) -> None:
    token = await get_token(box)
    await refused(box, token + "A" * 9000, "token longer than 8192 characters")
    await refused(box, "x" * 8193, "token longer than 8192 characters")
    # a body past the form limit reads as no token at all
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    before = Counter(box.bot.introspector.rejections)
    async with aiohttp.ClientSession() as s, s.post(
            f"{box.url}/oauth2/introspect", data={"token": "y" * 200_000},
            headers={"Authorization": f"Basic {auth}"}) as r:
        assert r.status == 200 and await r.json() == {"active": False}
    assert Counter(box.bot.introspector.rejections) - before == Counter({EMPTY: 1})


async def test_a_flood_of_garbage_never_errors(box: Sandbox) -> None:
    token = await get_token(box)
    kid = box.bot.keyring.current.kid
    junk = [token[:i] for i in range(0, len(token), 37)]
    junk += [raw_jws({"alg": "RS256", "typ": "at+jwt", "kid": kid}, {"n": i}) for i in range(20)]
    junk += [secrets.token_urlsafe(n) for n in (1, 10, 100, 1000, 8000)]
    started = time.monotonic()
    results = await asyncio.gather(*(introspect_raw(box, t) for t in junk))
    assert all(status == 200 and json.loads(body) == {"active": False}
               for status, body in results)
    assert time.monotonic() - started < 30
    auth = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as s:
        for t in junk[:10]:
            async with s.post(f"{box.url}/oauth2/revoke", data={"token": t},
                              headers={"Authorization": f"Basic {auth}"}) as r:
                assert r.status == 200
