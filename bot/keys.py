"""Signing keys in the database.

The private half of every key is stored AES-256-GCM encrypted under a key
derived from BREAKGLASS_MASTER_KEY (`derive_key(master, "signing-keys")`):
blob = 12-byte nonce || ciphertext+tag, with the row's kid as associated
data, so a blob copied into another row does not decrypt. Decrypted private
keys live only in memory, in the `KeyRing`, and only the current one is kept.

The public half (`public_pem`) is not encrypted, but it is not trusted on
its own either: on load every row's private key is decrypted and its public
key must equal `public_pem`. Someone who can write to the database but does
not know the master key therefore cannot slip in a verification key of
their own.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import and_, insert, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from .core.kdf import check_master_key, derive_key
from .core.tokens import (
    ALGORITHMS,
    SigningKey,
    VerificationKey,
    generate_private_key,
    load_private_key_der,
    load_public_pem,
    private_key_der,
    public_jwk,
    public_key_bytes,
    public_pem,
)
from .store.db import Database
from .store.schema import requests, sealed_secrets, signing_keys

KDF_PURPOSE = "signing-keys"
NONCE_SIZE = 12
KID_PREFIX = "bg-"
DEFAULT_JWKS_LEEWAY = timedelta(seconds=60)

# Called inside a rotation's transaction with its connection and the new kid (or the
# number of keys re-encrypted): the caller's audit row and alert commit with the rotation.
Record = Callable[[AsyncConnection, str], Awaitable[None]]
# Called like `Record`, with the kid that was current before (another algorithm's key):
# a key made at start because `tokens.algorithm` changed while the bot was down.
SwitchRecord = Callable[[AsyncConnection, str, str], Awaitable[None]]

# Serialises key creation/rotation between processes on PostgreSQL. SQLite
# needs nothing extra: every transaction there starts with BEGIN IMMEDIATE.
_PG_LOCK_ID = 0x6267_6B65_7973  # "bgkeys"


class WrongMasterKey(Exception):
    def __init__(self) -> None:
        super().__init__(
            "BREAKGLASS_MASTER_KEY does not decrypt the signing keys in the database "
            "(was it changed? use `breakglass keys rotate-master`)"
        )


class KeyIntegrityError(Exception):
    """A signing_keys row whose decrypted private key does not match its public key,
    or whose key does not fit its algorithm."""


# ----------------------------------------------------------------- encryption


def _aead(master_key: str) -> AESGCM:
    return AESGCM(derive_key(master_key, KDF_PURPOSE))


def _encrypt(aead: AESGCM, kid: str, der: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_SIZE)
    return nonce + aead.encrypt(nonce, der, kid.encode("utf-8"))


def _decrypt(aead: AESGCM, kid: str, blob: bytes) -> bytes:
    if len(blob) <= NONCE_SIZE + 16:
        raise WrongMasterKey()
    try:
        return aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], kid.encode("utf-8"))
    except InvalidTag:
        raise WrongMasterKey() from None


def new_kid() -> str:
    """'bg-' + 12 base32 characters (60 random bits)."""
    return KID_PREFIX + base64.b32encode(secrets.token_bytes(8)).decode("ascii")[:12].lower()


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    return at.astimezone(UTC)


# ------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class _Row:
    kid: str
    alg: str
    public_pem: str
    private_enc: bytes
    created_at: datetime
    retired_at: datetime | None

    @classmethod
    def of(cls, row: Row[Any]) -> _Row:
        return cls(
            kid=row.kid,
            alg=row.alg,
            public_pem=row.public_pem,
            private_enc=bytes(row.private_enc),
            created_at=row.created_at,
            retired_at=row.retired_at,
        )


async def _rows(conn: AsyncConnection) -> list[_Row]:
    result = await conn.execute(select(signing_keys).order_by(signing_keys.c.kid))
    return [_Row.of(r) for r in result]


def _newest_current(rows: Sequence[_Row], alg: str) -> _Row | None:
    live = [r for r in rows if r.alg == alg and r.retired_at is None]
    if not live:
        return None
    # Deterministic: every process looking at the same rows picks the same key.
    return max(live, key=lambda r: (_naive_utc(r.created_at), r.kid))


def _previous_current(rows: Sequence[_Row]) -> _Row | None:
    """The key that signed before a new one was made: the newest unretired key of any
    algorithm (the newest key at all if every one is retired); None for an empty table."""
    pool = [r for r in rows if r.retired_at is None] or list(rows)
    if not pool:
        return None
    return max(pool, key=lambda r: (_naive_utc(r.created_at), r.kid))


def _naive_utc(at: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones.
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


async def _lock(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})


async def _insert_new(conn: AsyncConnection, aead: AESGCM, alg: str, now: datetime) -> str:
    private_key = generate_private_key(alg)
    kid = new_kid()
    der = private_key_der(private_key)
    await conn.execute(
        signing_keys.insert().values(
            kid=kid,
            alg=alg,
            public_pem=public_pem(private_key.public_key()),
            private_enc=_encrypt(aead, kid, der),
            created_at=_utc(now),
            retired_at=None,
        )
    )
    return kid


def _open_row(aead: AESGCM, row: _Row) -> SigningKey:
    """Decrypt a row and check it is whole. Raises WrongMasterKey / KeyIntegrityError."""
    der = _decrypt(aead, row.kid, row.private_enc)
    try:
        private_key = load_private_key_der(der)
        public_key = load_public_pem(row.public_pem)
        key = SigningKey(kid=row.kid, alg=row.alg, private_key=private_key, public_key=public_key)
    except ValueError as e:
        raise KeyIntegrityError(f"signing key {row.kid} in the database is unusable: {e}") from None
    return key


def _verification_key(aead: AESGCM, row: _Row) -> VerificationKey:
    key = _open_row(aead, row)  # authenticates public_pem; the private half is dropped
    return key.verification_key


# ----------------------------------------------------------------- key ring


class KeyRing:
    """The current signing key for one algorithm, and every key that verifies.

    Create with `await KeyRing.open(db, master_key, alg, now)`.
    """

    def __init__(self, *, alg: str, aead: AESGCM) -> None:
        self.alg = alg
        self._aead = aead
        self._current: SigningKey | None = None
        self._verification: dict[str, VerificationKey] = {}
        # Keys in the database this process cannot decrypt: they were re-encrypted
        # (`keys rotate-master`) or made under a master key it was not started with.
        self.unreadable: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        kid = self._current.kid if self._current else None
        return f"KeyRing(alg={self.alg!r}, current={kid!r}, keys={sorted(self._verification)})"

    # -- public state

    @property
    def current(self) -> SigningKey:
        if self._current is None:  # pragma: no cover - open() always sets it
            raise RuntimeError("KeyRing not loaded; use `await KeyRing.open(...)`")
        return self._current

    @property
    def verification_keys(self) -> dict[str, VerificationKey]:
        """Every key in the database, retired ones included (their tokens may live on)."""
        return dict(self._verification)

    # -- lifecycle

    @classmethod
    async def open(cls, db: Database, master_key: str, alg: str, now: datetime,
                   on_switch: SwitchRecord | None = None) -> KeyRing:
        """`on_switch(conn, kid, previous)` runs in the transaction that makes `alg`'s
        first key when the table already held another algorithm's key (the policy's
        `tokens.algorithm` changed while no process ran): a rotation, recorded once
        across processes starting together. A new database's very first key is not."""
        if alg not in ALGORITHMS:
            raise ValueError(
                f"unsupported signing algorithm {alg!r}; use one of {', '.join(ALGORITHMS)}"
            )
        check_master_key(master_key)
        ring = cls(alg=alg, aead=_aead(master_key))
        await ring._load(db, now, switch=on_switch)
        return ring

    async def reload(self, db: Database, now: datetime | None = None) -> None:
        """Pick up keys another process created or rotated. A key this process cannot
        decrypt (the master key was rotated since it started) is left out and named in
        `unreadable`; the keys it holds in memory keep working (docs/operations.md)."""
        await self._load(db, now or datetime.now(UTC), tolerant=True)

    @property
    def master_outdated(self) -> bool:
        """Some key in the database does not decrypt under this process's master key."""
        return bool(self.unreadable)

    async def use_algorithm(self, db: Database, alg: str, now: datetime,
                            record: Record | None = None) -> None:
        """Sign with `alg` from now on (the policy's `tokens.algorithm` changed): its
        newest key becomes current, made first if there is none. `record(conn, kid)` runs
        in the transaction that makes it (the `key_rotated` audit row and the alert), so
        of several processes switching at once, only the one that made the key records."""
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported signing algorithm {alg!r}")
        previous = self.alg
        self.alg = alg
        try:
            await self._load(db, now, tolerant=False, record=record)
        except BaseException:
            self.alg = previous
            raise

    async def _load(self, db: Database, now: datetime, tolerant: bool = False,
                    record: Record | None = None, switch: SwitchRecord | None = None) -> None:
        async with db.read() as conn:
            rows = await _rows(conn)
        if _newest_current(rows, self.alg) is None:
            async with db.transaction() as conn:
                await _lock(conn)
                rows = await _rows(conn)  # under the lock: maybe someone else just made one
                if _newest_current(rows, self.alg) is None:
                    self._check_master(rows)  # never add a key under a different master
                    kid = await _insert_new(conn, self._aead, self.alg, now)
                    if record is not None:
                        await record(conn, kid)
                    if switch is not None and (previous := _previous_current(rows)) is not None:
                        await switch(conn, kid, previous.kid)
                    rows = await _rows(conn)
        self._install(rows, tolerant=tolerant)

    def _check_master(self, rows: Sequence[_Row]) -> None:
        """Before adding a key: every row must decrypt under our master key, so that
        the table never holds keys under two masters (say `rotate-master` ran while
        this process was up with the old one). AES-GCM only; cheap."""
        for row in rows:
            _decrypt(self._aead, row.kid, row.private_enc)

    def _install(self, rows: Sequence[_Row], tolerant: bool = False) -> None:
        """Make `rows` the key ring. `tolerant`: a row that does not decrypt under this
        process's master key is skipped (and named in `unreadable`) instead of failing
        the whole load; the current key stays the one in memory if the new one is such
        a row."""
        chosen = _newest_current(rows, self.alg)
        if chosen is None:  # pragma: no cover - _load/rotate always leave one
            raise RuntimeError(f"no current {self.alg} signing key in the database")
        verification: dict[str, VerificationKey] = {}
        current: SigningKey | None = None
        unreadable: set[str] = set()
        for row in rows:
            known = self._verification.get(row.kid)
            if tolerant:
                try:
                    _decrypt(self._aead, row.kid, row.private_enc)
                except WrongMasterKey:
                    unreadable.add(row.kid)
            if row.kid == chosen.kid:
                if self._current is not None and self._current.kid == row.kid:
                    current = self._current
                elif row.kid in unreadable:
                    continue
                else:
                    current = _open_row(self._aead, row)
                verification[row.kid] = current.verification_key
            elif known is not None and public_key_bytes(known.public_key) == public_key_bytes(
                load_public_pem(row.public_pem)
            ):
                verification[row.kid] = known
            elif row.kid not in unreadable:
                verification[row.kid] = _verification_key(self._aead, row)
        if current is None:
            # The new current key is one this process cannot open: keep signing with
            # the key it holds (still valid everywhere: retired keys verify while their
            # tokens live) until it is restarted with the new master key.
            current = self.current
            verification.setdefault(current.kid, current.verification_key)
        self._current = current
        self._verification = verification
        self.unreadable = frozenset(unreadable)

    async def rotate(self, db: Database, now: datetime, record: Record | None = None) -> str:
        """Make a new current key; every key in use so far is retired (it still
        verifies, and stays in the JWKS while tokens it signed live). `record(conn, kid)`
        runs in the same transaction (the audit row and the alert)."""
        at = _utc(now)
        async with db.transaction() as conn:
            await _lock(conn)
            self._check_master(await _rows(conn))
            await conn.execute(
                update(signing_keys)
                .where(signing_keys.c.retired_at.is_(None))
                .values(retired_at=at)
            )
            kid = await _insert_new(conn, self._aead, self.alg, at)
            if record is not None:
                await record(conn, kid)
            rows = await _rows(conn)
        self._install(rows)
        return kid

    async def jwks(
        self, db: Database, now: datetime, leeway: timedelta = DEFAULT_JWKS_LEEWAY
    ) -> dict[str, list[dict[str, str]]]:
        """RFC 7517 key set: the current key, plus every other key that signed a
        token which has not expired (give or take `leeway`)."""
        cutoff = _utc(now) - leeway
        async with db.read() as conn:
            result = await conn.execute(
                select(requests.c.kid)
                .where(
                    and_(
                        requests.c.kid.is_not(None),
                        requests.c.token_expires_at.is_not(None),
                        requests.c.token_expires_at > cutoff,
                    )
                )
                .distinct()
            )
            live = {r.kid for r in result}
            rows = await _rows(conn) if live - self._verification.keys() else []
        if rows:
            # Keys another process created since we loaded: authenticate, then publish.
            for row in rows:
                if row.kid in live and row.kid not in self._verification:
                    self._verification[row.kid] = _verification_key(self._aead, row)
        current = self.current
        keys = [public_jwk(current.verification_key)]
        for kid in sorted(live):
            if kid != current.kid and kid in self._verification:
                keys.append(public_jwk(self._verification[kid]))
        return {"keys": keys}

    @classmethod
    async def rotate_master(cls, db: Database, old_master: str, new_master: str,
                            record: Record | None = None) -> int:
        """Re-encrypt every private key under `new_master`, in one transaction: all
        rows or none. Raises WrongMasterKey when `old_master` does not decrypt them.
        `record(conn, n)` runs in the same transaction (the audit row and the alert)."""
        check_master_key(new_master)
        old, new = _aead(old_master), _aead(new_master)
        async with db.transaction() as conn:
            await _lock(conn)
            rows = await _rows(conn)
            for row in rows:
                der = _decrypt(old, row.kid, row.private_enc)
                await conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.kid == row.kid)
                    .values(private_enc=_encrypt(new, row.kid, der))
                )
            sealed = (await conn.execute(select(sealed_secrets))).all()
            for name, blob in sealed:
                value = _decrypt(old, _SEALED_AAD + name, blob)
                await conn.execute(
                    update(sealed_secrets)
                    .where(sealed_secrets.c.name == name)
                    .values(blob=_encrypt(new, _SEALED_AAD + name, value))
                )
            if record is not None:
                await record(conn, str(len(rows)))
        return len(rows)


async def fingerprint(db: Database) -> str:
    """Changes whenever a key is added, retired or re-encrypted (`keys rotate`,
    `keys rotate-master`): what a running process polls to notice either."""
    digest = hashlib.sha256()
    async with db.read() as conn:
        result = await conn.execute(
            select(signing_keys.c.kid, signing_keys.c.retired_at, signing_keys.c.private_enc)
            .order_by(signing_keys.c.kid))
        for kid, retired_at, blob in result:
            digest.update(f"{kid}|{retired_at}|".encode())
            digest.update(bytes(blob))
    return digest.hexdigest()


_SEALED_AAD = "sealed:"
AUDIT_KEY_NAME = "audit-mac"


async def sealed_secret(db: Database, master_key: str, name: str) -> bytes:
    """A random 32-byte secret kept in the database under the master key; made on first use.

    The audit log's MAC key lives here rather than being derived from the master key,
    so `rotate-master` re-encrypts it and the chain stays verifiable."""
    found = await _sealed_secret(db, master_key, name, create=True)
    assert found is not None
    return found


async def existing_sealed_secret(db: Database, master_key: str, name: str) -> bytes | None:
    """Like `sealed_secret`, but None instead of making one (for read-only commands)."""
    return await _sealed_secret(db, master_key, name, create=False)


async def verification_keys(db: Database, master_key: str) -> dict[str, VerificationKey]:
    """Every signing key's public half, retired ones included, each authenticated by
    decrypting its private half (so a key slipped into the table is not trusted).
    Read-only: creates nothing. Raises WrongMasterKey."""
    aead = _aead(master_key)
    async with db.read() as conn:
        rows = await _rows(conn)
    return {row.kid: _verification_key(aead, row) for row in rows}


async def _sealed_secret(db: Database, master_key: str, name: str, *, create: bool) -> bytes | None:
    aead = _aead(master_key)
    async with db.read() as conn:
        blob = await conn.scalar(select(sealed_secrets.c.blob).where(sealed_secrets.c.name == name))
    if blob is None and not create:
        return None
    if blob is None:
        async with db.transaction() as conn:
            await _lock(conn)
            blob = await conn.scalar(
                select(sealed_secrets.c.blob).where(sealed_secrets.c.name == name))
            if blob is None:
                blob = _encrypt(aead, _SEALED_AAD + name, secrets.token_bytes(32))
                await conn.execute(insert(sealed_secrets).values(name=name, blob=blob))
    return _decrypt(aead, _SEALED_AAD + name, blob)


__all__ = ["KeyIntegrityError", "KeyRing", "SwitchRecord", "WrongMasterKey",
           "existing_sealed_secret", "fingerprint", "new_kid", "sealed_secret", "verification_keys"]
