"""bot.keys: signing keys encrypted at rest, rotation, JWKS, master-key rotation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update

from bot.core.kdf import new_master_key
from bot.core.tokens import (
    InvalidToken,
    build_claims,
    generate_private_key,
    mint,
    new_jti,
    public_pem,
    verify,
)
from bot.keys import KeyIntegrityError, KeyRing, WrongMasterKey
from bot.store.db import Database
from bot.store.schema import metadata, requests, signing_keys

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ISSUER = "https://breakglass.example.internal"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}
WRONG_MASTER_MESSAGE = (
    "BREAKGLASS_MASTER_KEY does not decrypt the signing keys in the database "
    "(was it changed? use `breakglass keys rotate-master`)"
)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/k.db")
    # Plain tables: these tests need none of the audit triggers.
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


@pytest.fixture
def master() -> str:
    return new_master_key()


async def key_rows(db: Database) -> list[Any]:
    async with db.read() as conn:
        return list(await conn.execute(select(signing_keys).order_by(signing_keys.c.created_at)))


async def add_request(db: Database, rid: str, kid: str | None, token_expires_at: datetime) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            requests.insert().values(
                id=rid,
                scope="payments-write",
                requester="U01ONCALL1",
                reason="test",
                requested_ttl_s=900,
                ttl_s=900,
                state="issued",
                triggers="[]",
                created_at=T0,
                expires_at=T0 + timedelta(minutes=30),
                kid=kid,
                jti=new_jti(),
                issued_at=token_expires_at - timedelta(minutes=15),
                token_expires_at=token_expires_at,
            )
        )


def token_for(ring: KeyRing, issued_at: datetime = T0) -> str:
    claims = build_claims(
        issuer=ISSUER,
        subject="U01ONCALL1",
        audience="payments-api",
        permissions=["payments:read"],
        client_id="breakglass",
        request_id="R1",
        incident=None,
        approvers=["U01LEAD1"],
        issued_at=issued_at,
        lifetime=timedelta(minutes=15),
        jti=new_jti(),
    )
    return mint(claims, ring.current)


def kids(jwks: dict[str, Any]) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


# ------------------------------------------------------------------ opening


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_first_open_creates_a_key_and_second_reuses_it(
    db: Database, master: str, alg: str
) -> None:
    ring = await KeyRing.open(db, master, alg, T0)
    assert ring.current.alg == alg
    assert ring.current.kid.startswith("bg-") and len(ring.current.kid) == 15
    rows = await key_rows(db)
    assert [(r.kid, r.alg, r.retired_at) for r in rows] == [(ring.current.kid, alg, None)]
    assert rows[0].public_pem == public_pem(ring.current.public_key)

    again = await KeyRing.open(db, master, alg, T0 + timedelta(hours=1))
    assert again.current.kid == ring.current.kid
    assert len(await key_rows(db)) == 1
    # the reopened private key is the same key: its signatures verify with the first ring
    token = token_for(again)
    verify(token, ring.verification_keys, issuer=ISSUER, now=T0)


async def test_stored_blob_holds_no_plaintext_key(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "ES256", T0)
    private = ring.current.private_key
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    scalar = private.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    (row,) = await key_rows(db)
    blob = bytes(row.private_enc)
    assert len(blob) == 12 + len(der) + 16  # nonce + ciphertext + GCM tag
    for secret in (der, pem, scalar, der[-32:]):
        assert secret not in blob
    assert b"PRIVATE" not in row.public_pem.encode()
    assert "private" not in repr(ring).lower() and "private" not in repr(ring.current).lower()


async def test_wrong_master_key(db: Database, master: str) -> None:
    await KeyRing.open(db, master, "ES256", T0)
    with pytest.raises(WrongMasterKey) as info:
        await KeyRing.open(db, new_master_key(), "ES256", T0)
    assert str(info.value) == WRONG_MASTER_MESSAGE
    # ... including when it would otherwise create a key for another algorithm
    with pytest.raises(WrongMasterKey):
        await KeyRing.open(db, new_master_key(), "EdDSA", T0)
    assert len(await key_rows(db)) == 1


async def test_blob_bound_to_its_row(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "ES256", T0)
    await ring.rotate(db, T0 + timedelta(minutes=1))
    a, b = await key_rows(db)
    async with db.transaction() as conn:
        await conn.execute(
            update(signing_keys)
            .where(signing_keys.c.kid == b.kid)
            .values(private_enc=a.private_enc, public_pem=a.public_pem)
        )
    with pytest.raises(WrongMasterKey):
        await KeyRing.open(db, master, "ES256", T0)


async def test_public_key_cannot_be_swapped(db: Database, master: str) -> None:
    """DB write access without the master key must not let anyone add a verification key."""
    await KeyRing.open(db, master, "ES256", T0)
    attacker = generate_private_key("ES256")
    async with db.transaction() as conn:
        await conn.execute(
            update(signing_keys).values(public_pem=public_pem(attacker.public_key()))
        )
    with pytest.raises(KeyIntegrityError):
        await KeyRing.open(db, master, "ES256", T0)


async def test_concurrent_first_opens_agree(db: Database, master: str) -> None:
    rings = await asyncio.gather(*(KeyRing.open(db, master, "EdDSA", T0) for _ in range(5)))
    assert len({r.current.kid for r in rings}) == 1
    assert len(await key_rows(db)) == 1


async def test_other_algorithm_gets_its_own_key(db: Database, master: str) -> None:
    es = await KeyRing.open(db, master, "ES256", T0)
    ed = await KeyRing.open(db, master, "EdDSA", T0)
    assert es.current.kid != ed.current.kid
    assert set(ed.verification_keys) == {es.current.kid, ed.current.kid}
    verify(token_for(es), ed.verification_keys, issuer=ISSUER, now=T0)


async def test_rejects_bad_arguments(db: Database, master: str) -> None:
    with pytest.raises(ValueError):
        await KeyRing.open(db, master, "HS256", T0)
    with pytest.raises(ValueError):
        await KeyRing.open(db, "short", "ES256", T0)


# ----------------------------------------------------------------- rotation


async def test_rotate_and_jwks(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "ES256", T0)
    old = ring.current.kid
    old_token = token_for(ring)
    assert kids(await ring.jwks(db, T0)) == [old]

    t1 = T0 + timedelta(minutes=1)
    new = await ring.rotate(db, t1)
    assert new != old and ring.current.kid == new
    rows = {r.kid: r for r in await key_rows(db)}
    assert rows[old].retired_at is not None and rows[new].retired_at is None
    # the old key still verifies the tokens it signed
    assert set(ring.verification_keys) == {old, new}
    verify(old_token, ring.verification_keys, issuer=ISSUER, now=t1)
    verify(token_for(ring, t1), ring.verification_keys, issuer=ISSUER, now=t1)

    # no live token signed by the old key: only the current key is published
    assert kids(await ring.jwks(db, t1)) == [new]

    token_expires = T0 + timedelta(minutes=15)
    await add_request(db, "R1", old, token_expires)
    await add_request(db, "R0", None, token_expires)  # a request that never got a token
    assert kids(await ring.jwks(db, t1)) == [new, old]
    leeway = timedelta(seconds=60)
    assert kids(await ring.jwks(db, token_expires + leeway - timedelta(seconds=1))) == [new, old]
    assert kids(await ring.jwks(db, token_expires + leeway)) == [new]
    assert kids(await ring.jwks(db, token_expires, leeway=timedelta(0))) == [new]
    # the old key is still known for verification after it leaves the JWKS
    assert old in ring.verification_keys

    # the same, seen from a fresh process
    fresh = await KeyRing.open(db, master, "ES256", t1)
    assert fresh.current.kid == new
    assert set(fresh.verification_keys) == {old, new}
    assert kids(await fresh.jwks(db, t1)) == [new, old]


async def test_jwks_has_no_private_members(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "RS256", T0)
    old = ring.current.kid
    await ring.rotate(db, T0)
    await add_request(db, "R1", old, T0 + timedelta(minutes=15))
    jwks = await ring.jwks(db, T0)
    assert len(jwks["keys"]) == 2
    for jwk in jwks["keys"]:
        assert not PRIVATE_MEMBERS & jwk.keys()
        assert set(jwk) == {"kty", "kid", "alg", "use", "n", "e"}


async def test_reload_sees_rotation_by_another_process(db: Database, master: str) -> None:
    a = await KeyRing.open(db, master, "EdDSA", T0)
    b = await KeyRing.open(db, master, "EdDSA", T0)
    new = await b.rotate(db, T0 + timedelta(minutes=1))
    token = token_for(b)
    with pytest.raises(InvalidToken):
        verify(token, a.verification_keys, issuer=ISSUER, now=T0)
    await a.reload(db)
    assert a.current.kid == new
    verify(token, a.verification_keys, issuer=ISSUER, now=T0)


async def test_jwks_publishes_keys_other_processes_sign_with(db: Database, master: str) -> None:
    a = await KeyRing.open(db, master, "EdDSA", T0)
    b = await KeyRing.open(db, master, "EdDSA", T0)
    new = await b.rotate(db, T0)
    await add_request(db, "R1", new, T0 + timedelta(minutes=15))
    assert new in kids(await a.jwks(db, T0))


# ----------------------------------------------------------- master rotation


async def test_rotate_master(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "ES256", T0)
    await ring.rotate(db, T0)
    before = {r.kid: bytes(r.private_enc) for r in await key_rows(db)}
    new_master = new_master_key()

    assert await KeyRing.rotate_master(db, master, new_master) == 2
    after = {r.kid: bytes(r.private_enc) for r in await key_rows(db)}
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in before)

    with pytest.raises(WrongMasterKey):
        await KeyRing.open(db, master, "ES256", T0)
    reopened = await KeyRing.open(db, new_master, "ES256", T0)
    assert reopened.current.kid == ring.current.kid
    verify(token_for(reopened), ring.verification_keys, issuer=ISSUER, now=T0)


async def test_rotate_master_is_all_or_nothing(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "ES256", T0)
    await ring.rotate(db, T0)
    before = {r.kid: bytes(r.private_enc) for r in await key_rows(db)}

    with pytest.raises(WrongMasterKey):
        await KeyRing.rotate_master(db, new_master_key(), new_master_key())

    # The second row (in kid order, the order rotate_master walks them) is damaged:
    # the first row is re-encrypted, the second fails, and the transaction must
    # roll the first back.
    first, second = sorted(before)
    async with db.transaction() as conn:
        await conn.execute(
            update(signing_keys).where(signing_keys.c.kid == second).values(private_enc=b"x" * 64)
        )
    with pytest.raises(WrongMasterKey):
        await KeyRing.rotate_master(db, master, new_master_key())
    rows = {r.kid: bytes(r.private_enc) for r in await key_rows(db)}
    assert rows[first] == before[first]
    async with db.transaction() as conn:
        await conn.execute(
            update(signing_keys)
            .where(signing_keys.c.kid == second)
            .values(private_enc=before[second])
        )
    assert (await KeyRing.open(db, master, "ES256", T0)).current.kid == ring.current.kid


async def test_running_ring_with_old_master_cannot_add_keys(db: Database, master: str) -> None:
    ring = await KeyRing.open(db, master, "ES256", T0)
    new_master = new_master_key()
    await KeyRing.rotate_master(db, master, new_master)
    with pytest.raises(WrongMasterKey):
        await ring.rotate(db, T0)
    assert len(await key_rows(db)) == 1
    # it keeps signing with the key it holds, and a restart with the new master works
    verify(token_for(ring), ring.verification_keys, issuer=ISSUER, now=T0)
    assert (await KeyRing.open(db, new_master, "ES256", T0)).current.kid == ring.current.kid
