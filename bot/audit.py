"""Append-only, hash-chained audit log.

Every event is one row of ``audit_log``: ``seq`` (1, 2, 3, ... without gaps),
``at``, ``actor``, ``event``, ``request_id``, ``details`` (JSON text) and
``mac``. Two independent defences keep it honest:

* The database refuses changes (triggers made by the migration
  ``store/migrations/versions/0002_…``): UPDATE and DELETE
  abort, and an INSERT aborts unless its ``seq`` is exactly the current
  maximum + 1. The last rule also defeats SQLite's ``INSERT OR REPLACE``
  (which would otherwise delete a row without firing delete triggers).
  PostgreSQL also refuses TRUNCATE.
* Each row carries a MAC chained over the previous row's MAC, so someone who
  bypasses the triggers (drops them, edits the file) is caught by
  :func:`verify` unless they hold the MAC key.

The MAC, precisely (so an auditor can re-implement it)
------------------------------------------------------

``key`` = HKDF-SHA256(master key, salt ``b"breakglass/v1"``, info
``b"audit-log"``, 32 bytes), see :func:`mac_key` and ``bot.core.kdf``.

For row ``seq`` (``prev`` is the previous row's ``mac``, or 64 ASCII zeros
for ``seq`` 1)::

    mac = lower-case hex of HMAC-SHA256(key, message)
    message = ascii(prev)                       # 64 hex characters
              || field(decimal(seq))            # "17", no sign, no leading zeros
              || field(at)                      # "2024-05-01T12:34:56.789012+00:00"
              || field(actor)
              || field(event)
              || field(request_id or "")        # NULL and "" are the same
              || field(details)
    field(s) = ascii(decimal(len(utf8(s)))) || ":" || utf8(s) || ","   # a netstring

* ``at`` is the time converted to UTC and written as ISO 8601 with exactly
  six fractional digits and the offset ``+00:00``
  (Python: ``at.astimezone(UTC).isoformat(timespec="microseconds")``).
  SQLite stores it as ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC (SQLAlchemy's
  format); PostgreSQL as ``timestamptz``.
* ``details`` is the exact text stored in the ``details`` column, which
  :func:`append` writes as canonical JSON: Python's
  ``json.dumps(details, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)`` (datetimes in details are first
  written like ``at``). Verification MACs the stored bytes, not a
  re-serialisation, so any change to the text is detected; re-encoding the
  parsed JSON of :func:`export` the same way gives back the same text.

Verification
------------

:func:`verify` walks the rows in seq order (streamed in chunks of 10,000)
and recomputes every MAC from the previous row's *stored* MAC. It reports
the first problem:

* ``sequence 1 is missing`` / ``sequence 17 is missing (deleted?)`` /
  ``sequences 17 to 19 are missing (deleted?)``: a gap in the numbering;
* ``row 17 does not match its MAC (edited?)``: the row's content (or MAC)
  changed; confirmed when row 18 still chains from row 17's stored MAC;
* ``row 17 is not part of the chain (inserted?)``: row 18's MAC is right for
  seq 17 after row 16, i.e. a row was slipped in and the rest renumbered.

On SQLite it reads through the sqlite3 driver directly: in its own WAL
snapshot, without the BEGIN IMMEDIATE (write lock) that a SQLAlchemy
transaction here takes, and without SQLAlchemy's per-row cost (about 20%
more CPU when measured). The MAC loop itself is most of the time.

What the chain cannot show
--------------------------

Removing rows *from the end* leaves a valid, shorter chain: truncation of
the tail is not detectable from the table alone. Compare the head
(:func:`head`: last seq and MAC), which is published elsewhere (Slack), with
what was published. Likewise, dropping the whole table (or replacing the file
with an older copy) is only visible against a published head.

Listeners (a second way out)
----------------------------

:func:`listen` registers, per database engine, a function called with every batch
of events :func:`append_many` (or :func:`append`) writes, with their sequence
numbers. It returns outbox rows, which are inserted in the same transaction, after
the audit rows: this is how every audited event reaches the webhooks
(``bot/delivery/webhooks.py``) without a use case having to remember it.

Secrets
-------

The log must never hold a token. :func:`append` refuses (``ValueError``)
details with a key named like a secret at any depth (the key's last word is
``token``, ``secret``, ``password`` ..., or it ends in ``private key``;
``access_token``, ``clientSecret`` and ``PRIVATE_KEY`` are refused,
``token_hash`` and ``token_expires_at`` are fine) and any string, anywhere in
the row, that contains a JWT (``eyJ...`` three base64url segments) or a Slack
token (``xoxb-...``, ``xapp-...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import re
import sqlite3
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .core.kdf import derive_key
from .store.schema import audit_log, outbox

if TYPE_CHECKING:
    from .store.db import Database

__all__ = [
    "GENESIS_MAC",
    "AuditEvent",
    "VerifyResult",
    "append",
    "append_many",
    "canonical_details",
    "canonical_time",
    "compute_mac",
    "export",
    "head",
    "listen",
    "mac_key",
    "verify",
]

GENESIS_MAC = "0" * 64
# pg_advisory_xact_lock key that serialises appenders on PostgreSQL (b"bg-audit").
ADVISORY_LOCK_ID = 0x62672D6175646974
_CHUNK = 10_000

def mac_key(master: str) -> bytes:
    """The audit-log MAC key, derived from BREAKGLASS_MASTER_KEY."""
    return derive_key(master, "audit-log")


# --------------------------------------------------------------------------- canonical forms


def canonical_time(at: datetime) -> str:
    """``at`` in UTC, ISO 8601 with microseconds: ``2024-05-01T12:34:56.000000+00:00``."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("audit time must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return canonical_time(obj)
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"audit details: {type(obj).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=True,
    allow_nan=False,
    default=_json_default,
)


def canonical_details(details: Mapping[str, Any]) -> str:
    """Canonical JSON text of ``details`` (sorted keys, compact, ASCII, no NaN)."""
    return _ENCODER.encode(details if isinstance(details, dict) else dict(details))


def _message(prev: str, seq: int, at: str, actor: str, event: str, request_id: str, details: str) -> bytes:
    """The MAC input (see the module docstring); ``at`` and ``details`` are canonical text."""
    s = str(seq)
    if (
        prev.isascii()  # str.isascii is O(1) in CPython, and then len() counts bytes
        and at.isascii()
        and actor.isascii()
        and event.isascii()
        and request_id.isascii()
        and details.isascii()
    ):
        return (
            f"{prev}{len(s)}:{s},{len(at)}:{at},{len(actor)}:{actor},{len(event)}:{event},"
            f"{len(request_id)}:{request_id},{len(details)}:{details},"
        ).encode()
    parts = [prev.encode("utf-8", "surrogatepass")]
    for f in (s, at, actor, event, request_id, details):
        b = f.encode("utf-8", "surrogatepass")
        parts.append(b"%d:%b," % (len(b), b))
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after absorbing key^ipad and key^opad (RFC 2104).

    hmac.digest() builds a fresh OpenSSL HMAC context per call, which costs
    more than the hashing of a short row; copying two prepared states is
    about 2.5x faster and gives the same HMAC-SHA256.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


def _hmac_hex(key: bytes, msg: bytes) -> str:
    inner, outer = _pads(key)
    h = inner.copy()
    h.update(msg)
    o = outer.copy()
    o.update(h.digest())
    return str(o.hexdigest())


def compute_mac(
    key: bytes,
    prev_mac: str,
    seq: int,
    at: str,
    actor: str,
    event: str,
    request_id: str | None,
    details: str,
) -> str:
    """The row MAC (see the module docstring); ``at`` and ``details`` are canonical text."""
    return _hmac_hex(key, _message(prev_mac, seq, at, actor, event, request_id or "", details))


# --------------------------------------------------------------------------- secrets

_TOKEN_RE = re.compile(
    r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"  # JWS / JWE compact
    r"|xox[a-z]-[A-Za-z0-9-]{8,}"  # Slack bot/user tokens
    r"|xapp-\d-[A-Za-z0-9-]{8,}",  # Slack app-level tokens
    re.ASCII,
)
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SECRET_WORDS = frozenset(
    {"token", "tokens", "secret", "secrets", "password", "passwords", "passwd", "passphrase"}
)
_SECRET_SQUASHED = _SECRET_WORDS | {"privatekey", "privkey"}


def looks_like_token(text_: str) -> bool:
    """True when `text_` holds something shaped like a token (a JWT, a Slack token):
    the audit log refuses it, so a use case checks its free text with this first."""
    return _TOKEN_RE.search(text_) is not None


@functools.lru_cache(maxsize=4096)
@functools.lru_cache(maxsize=1024)  # a handful of key names, met on every event
def _secret_key(name: str) -> bool:
    words = [w.lower() for w in _WORD_RE.findall(name)]
    if not words:
        return False
    if words[-1] in _SECRET_WORDS or words[-2:] == ["private", "key"]:
        return True
    return "".join(words) in _SECRET_SQUASHED


def _refuse_token(where: str) -> ValueError:
    # Never echo the value: it is the secret.
    return ValueError(f"audit {where} looks like it holds a token; the audit log must not")


def _check_keys(obj: Any, path: str) -> None:
    """Refuse keys named like a secret, at any depth."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            ks = k if isinstance(k, str) else str(k)
            if _secret_key(ks):
                raise ValueError(
                    f"audit details{path}: key {ks!r} is named like a secret; "
                    "the audit log must not hold secrets"
                )
            if not isinstance(v, str | int | float | bool | None):
                _check_keys(v, f"{path}.{ks}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            if not isinstance(v, str | int | float | bool | None):
                _check_keys(v, f"{path}[{i}]")


def _token_path(obj: Any, path: str) -> str | None:
    """Where in ``obj`` a token-like string is (only called once one was seen)."""
    if isinstance(obj, str):
        return path if _TOKEN_RE.search(obj) else None
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if _TOKEN_RE.search(str(k)):
                return f"{path} key"
            found = _token_path(v, f"{path}.{k}")
            if found is not None:
                return found
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found = _token_path(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------- append


@dataclass(frozen=True)
class AuditEvent:
    at: datetime
    actor: str
    event: str
    details: Mapping[str, Any]
    request_id: str | None = None


_Prepared = tuple[datetime, str, str, str, str | None, str]


def _prepare(ev: AuditEvent) -> _Prepared:
    """Validate one event; return (at in UTC, canonical at, actor, event, request_id, details)."""
    at = ev.at
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("audit time must be a timezone-aware datetime")
    at = at.astimezone(UTC)
    at_iso = at.isoformat(timespec="microseconds")
    for name, value in (("actor", ev.actor), ("event", ev.event), ("request_id", ev.request_id)):
        if value is None and name == "request_id":
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"audit {name} must be a non-empty string")
        if _TOKEN_RE.search(value):
            raise _refuse_token(name)
    details = ev.details
    if not isinstance(details, Mapping):
        raise ValueError("audit details must be a mapping")
    _check_keys(details, "")
    text_ = canonical_details(details)
    # Token characters are never escaped in JSON, so one search of the text
    # covers every string and key at any depth.
    if _TOKEN_RE.search(text_):
        raise _refuse_token(f"details{_token_path(details, '') or ''}")
    return at, at_iso, ev.actor, ev.event, ev.request_id, text_


_HEAD_SQL = "SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1"
_INSERT_SQLITE = (
    "INSERT INTO audit_log (seq, at, actor, event, request_id, details, mac) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


async def head(conn: AsyncConnection) -> tuple[int, str]:
    """(last seq, its MAC); ``(0, GENESIS_MAC)`` for an empty log."""
    # Plain SQL: about half the per-call cost of a Core select on aiosqlite.
    row: Any = (await conn.exec_driver_sql(_HEAD_SQL)).first()
    if row is None:
        return 0, GENESIS_MAC
    return int(row[0]), str(row[1])


async def append_many(conn: AsyncConnection, key: bytes, events: Sequence[AuditEvent]) -> list[int]:
    """Append ``events`` in order inside the caller's transaction; return their seqs.

    Everything is validated before the database is touched, so a refused event
    appends nothing (``ValueError``; ``TypeError`` for details JSON cannot hold).
    One read of the head (none for a second append in the same transaction: the
    head the first one left is remembered), one executemany insert. Concurrent appenders queue:
    SQLite's BEGIN IMMEDIATE (``Database.transaction``), or on PostgreSQL a
    transaction-scoped advisory lock taken here, before the head is read (use
    READ COMMITTED, the default: a snapshot older than the lock would see a
    stale head, and the insert would then fail rather than fork the chain).
    """
    prepared = [_prepare(ev) for ev in events]
    if not prepared:
        return []
    sqlite = conn.dialect.name == "sqlite"
    known = _known_head(conn)
    if known is not None:
        # A second append in this transaction: the lock is held and the head is
        # the one the first append left (no other writer can have moved it).
        seq, prev = known
    else:
        if conn.dialect.name == "postgresql":
            # Serialise appenders until this transaction ends (SQLite: BEGIN IMMEDIATE does it).
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_ID})
        seq, prev = await head(conn)
    first = seq + 1
    tuples: list[tuple[Any, ...]] = []
    dicts: list[dict[str, Any]] = []
    for at, at_iso, actor, event, request_id, details in prepared:
        seq += 1
        prev = _hmac_hex(key, _message(prev, seq, at_iso, actor, event, request_id or "", details))
        if sqlite:
            # SQLAlchemy's SQLite storage format for a (UTC) datetime, written
            # directly: skips the per-row bind processing.
            stored = at_iso[:10] + " " + at_iso[11:26]
            tuples.append((seq, stored, actor, event, request_id, details, prev))
        else:
            dicts.append(
                {
                    "seq": seq,
                    "at": at,
                    "actor": actor,
                    "event": event,
                    "request_id": request_id,
                    "details": details,
                    "mac": prev,
                }
            )
    _forget_head(conn)  # if the insert fails, the next append reads the head again
    if sqlite:
        await conn.exec_driver_sql(_INSERT_SQLITE, tuples if len(tuples) > 1 else tuples[0])
    else:
        await conn.execute(audit_log.insert(), dicts)
    _remember_head(conn, seq, prev)
    seqs = list(range(first, seq + 1))
    listener = _listeners.get(_engine_of(conn))
    if listener is not None:
        rows = listener(list(zip(seqs, events, strict=True)))
        if rows:
            await conn.execute(outbox.insert(), rows if len(rows) > 1 else rows[0])
    return seqs


# --------------------------------------------------------------------------- listeners

Listener = Callable[[Sequence[tuple[int, AuditEvent]]], list[dict[str, Any]]]
_listeners: weakref.WeakKeyDictionary[Any, Listener] = weakref.WeakKeyDictionary()


def _engine_of(conn: AsyncConnection) -> Any:
    return getattr(conn, "sync_engine", None)


def listen(engine: Any, listener: Listener | None) -> None:
    """Call ``listener(batch)`` for every batch of events appended through ``engine``
    (an AsyncEngine; ``None`` removes it). ``batch`` is [(seq, event), ...] in order;
    the listener returns outbox rows (``bot.delivery.outbox.row``), written in the same
    transaction. It must not raise for an event it does not want: it returns []."""
    sync = getattr(engine, "sync_engine", engine)
    if listener is None:
        _listeners.pop(sync, None)
    else:
        _listeners[sync] = listener


# The head an append left, remembered for the rest of *its* transaction only: the
# entry names the transaction object (weakly), so a later transaction on the same pooled
# connection (another process may have appended in between) never sees it. A wrong
# guess could not fork the chain anyway: the trigger refuses any seq but max + 1.
_HEAD_INFO = "breakglass.audit_head"


def _current_transaction(conn: AsyncConnection) -> Any:
    sync = getattr(conn, "sync_connection", None) or conn
    with contextlib.suppress(Exception):
        if sync.in_nested_transaction():
            return None  # a savepoint may roll back the append: do not trust a remembered head
        return sync.get_transaction()
    return None


def _known_head(conn: AsyncConnection) -> tuple[int, str] | None:
    tx = _current_transaction(conn)
    if tx is None:
        return None
    entry = conn.info.get(_HEAD_INFO)
    if entry is None or entry[0]() is not tx or not tx.is_active:
        return None
    return entry[1], entry[2]


def _remember_head(conn: AsyncConnection, seq: int, mac: str) -> None:
    tx = _current_transaction(conn)
    if tx is not None:
        conn.info[_HEAD_INFO] = (weakref.ref(tx), seq, mac)


def _forget_head(conn: AsyncConnection) -> None:
    conn.info.pop(_HEAD_INFO, None)


async def append(
    conn: AsyncConnection,
    key: bytes,
    *,
    at: datetime,
    actor: str,
    event: str,
    details: Mapping[str, Any],
    request_id: str | None = None,
) -> int:
    """Append one event inside the caller's transaction; return its seq.

    ``at`` must be timezone-aware. See :func:`append_many`.
    """
    ev = AuditEvent(at=at, actor=actor, event=event, details=details, request_id=request_id)
    return (await append_many(conn, key, [ev]))[0]


# --------------------------------------------------------------------------- reading

_COLUMNS = "seq, at, actor, event, request_id, details, mac"
_Row = tuple[Any, Any, Any, Any, Any, Any, Any]


def _sqlite_time(at: datetime) -> str:
    """How SQLAlchemy stores a datetime in SQLite (UTC): ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _iso(value: Any) -> str:
    """Canonical text of a stored ``at`` (SQLite text, naive = UTC, or a datetime)."""
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " " and value[19] == ".":
            return value[:10] + "T" + value[11:] + "+00:00"
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(f"not a time: {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return canonical_time(value)


_BLOB_SQL = (
    "SELECT seq, CAST(at AS BLOB), CAST(actor AS BLOB), CAST(event AS BLOB),"
    " CAST(request_id AS BLOB), CAST(details AS BLOB), CAST(mac AS BLOB)"
    " FROM audit_log WHERE {where} ORDER BY seq"
)


def _lenient(value: Any) -> Any:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


async def _chunks(
    conn: AsyncConnection, since: datetime | None = None
) -> AsyncGenerator[Sequence[_Row], None]:
    """Rows in seq order, in chunks, without loading the table into memory.

    SQLite: a plain sqlite3 cursor. It bypasses SQLAlchemy's per-row work and,
    as nothing runs through SQLAlchemy, no BEGIN IMMEDIATE: a long read does
    not hold the write lock (WAL gives the statement its own snapshot).
    Others: a server-side cursor through SQLAlchemy.
    """
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    if conn.dialect.name == "sqlite":
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        params: list[Any] = []
        where = "1 = 1"
        if since is not None:
            where, params = "at >= ?", [_sqlite_time(since)]
        sql = f"SELECT {_COLUMNS} FROM audit_log WHERE {where} ORDER BY seq"  # noqa: S608
        cursor = sqlite3.Connection.cursor(driver)  # the stdlib cursor, straight on the file
        cursor.execute(sql, params)
        last: int | None = None
        try:
            while True:
                try:
                    chunk = cursor.fetchmany(_CHUNK)
                except sqlite3.OperationalError as e:
                    if "decode" not in str(e):
                        raise
                    break  # text that is not UTF-8 (written behind our back): slow path below
                if not chunk:
                    return
                last = chunk[-1][0]
                yield chunk
                await asyncio.sleep(0)  # let the loop breathe between chunks
        finally:
            cursor.close()
        if last is not None:
            where, params = f"{where} AND seq > ?", [*params, last]
        # Read the rest as bytes and decode leniently; the MAC will not match
        # such a row, and verify reports it instead of crashing.
        cursor = sqlite3.Connection.cursor(driver)
        cursor.execute(_BLOB_SQL.format(where=where), params)
        try:
            while chunk := cursor.fetchmany(_CHUNK):
                yield [(r[0], *(_lenient(v) for v in r[1:])) for r in chunk]
        finally:
            cursor.close()
        return
    c = audit_log.c
    stmt = select(c.seq, c.at, c.actor, c.event, c.request_id, c.details, c.mac)
    if since is not None:
        stmt = stmt.where(c.at >= since)
    result = await conn.stream(stmt.order_by(c.seq).execution_options(yield_per=_CHUNK))
    async for part in result.partitions(_CHUNK):
        yield [tuple(r) for r in part]


@dataclass
class VerifyResult:
    ok: bool
    rows: int  # rows checked and found good
    first_bad_seq: int | None
    problem: str | None


def _scan(key: bytes, rows: Sequence[_Row], expected: int, prev: str) -> tuple[int, str, int]:
    """Check rows while they chain; return (next expected seq, last good MAC, bad index or -1).

    The hot loop of verify: _message and _hmac_hex inlined.
    """
    inner, outer = _pads(key)
    icopy, ocopy, same = inner.copy, outer.copy, hmac.compare_digest
    i = -1
    for seq, at, actor, event, request_id, details, mac in rows:
        i += 1
        if seq != expected:
            return expected, prev, i
        try:
            if request_id is None:
                request_id = ""
            s = str(seq)
            if at.__class__ is str and len(at) == 26 and at[10] == " " and at[19] == ".":
                # SQLite storage "YYYY-MM-DD HH:MM:SS.ffffff" (UTC) -> canonical (32 chars)
                m = (
                    f"{prev}{len(s)}:{s},32:{at[:10]}T{at[11:]}+00:00,{len(actor)}:{actor},"
                    f"{len(event)}:{event},{len(request_id)}:{request_id},"
                    f"{len(details)}:{details},"
                )
                # All ASCII: len() counted bytes. Otherwise take the general path.
                msg = m.encode() if m.isascii() else None
            else:
                msg = None
            if msg is None:
                msg = _message(prev, seq, _iso(at), actor, event, request_id, details)
            h = icopy()
            h.update(msg)
            o = ocopy()
            o.update(h.digest())
            good = same(o.hexdigest(), mac)
        except (TypeError, ValueError, AttributeError):
            good = False  # a value of the wrong type or format: tampered
        if not good:
            return expected, prev, i
        prev = mac
        expected += 1
    return expected, prev, -1


def _row_mac_ok(key: bytes, row: _Row, seq: int, prev: str) -> bool:
    try:
        _, at, actor, event, request_id, details, mac = row
        want = compute_mac(key, prev, seq, _iso(at), actor, event, request_id, details)
        return hmac.compare_digest(want, mac)
    except (TypeError, ValueError, AttributeError):
        return False


def _diagnose(key: bytes, bad: _Row, nxt: _Row | None, expected: int, prev: str) -> tuple[int, str]:
    seq = bad[0]
    if not isinstance(seq, int):
        return expected, f"row after sequence {expected - 1} has a bad sequence number"
    if seq > expected:
        if expected == 1:
            return 1, "sequence 1 is missing"
        if seq == expected + 1:
            return expected, f"sequence {expected} is missing (deleted?)"
        return expected, f"sequences {expected} to {seq - 1} are missing (deleted?)"
    if seq < expected:
        return seq, f"sequence {seq} appears twice or out of order"
    # seq == expected, MAC does not match. Tell an edit from an insertion with
    # renumbering by looking at the next row.
    if nxt is not None and nxt[0] == seq + 1:
        if _row_mac_ok(key, nxt, seq + 1, str(bad[6])):
            return seq, f"row {seq} does not match its MAC (edited?)"
        if _row_mac_ok(key, nxt, seq, prev):
            return seq, f"row {seq} is not part of the chain (inserted?)"
    return seq, f"row {seq} does not match its MAC (edited?)"


async def verify(db: Database, key: bytes) -> VerifyResult:
    """Walk the whole log in seq order and recompute the chain (see the module docstring).

    Reports the first problem only; ``rows`` counts the rows found good before
    it. Truncation of the tail is not detectable here: compare :func:`head`
    with the published head.
    """
    expected, prev, count = 1, GENESIS_MAC, 0
    async with db.read() as conn:
        chunks = _chunks(conn)
        try:
            async for chunk in chunks:
                expected, prev, bad = _scan(key, chunk, expected, prev)
                if bad < 0:
                    count += len(chunk)
                    continue
                count += bad
                nxt: _Row | None = None
                if bad + 1 < len(chunk):
                    nxt = chunk[bad + 1]
                else:
                    following = await anext(chunks, None)
                    nxt = following[0] if following else None
                first_bad, problem = _diagnose(key, chunk[bad], nxt, expected, prev)
                return VerifyResult(False, count, first_bad, problem)
        finally:
            await chunks.aclose()
    return VerifyResult(True, count, None, None)


def _export_row(row: _Row) -> dict[str, Any]:
    seq, at, actor, event, request_id, details, mac = row
    try:
        at = _iso(at)
    except (TypeError, ValueError):
        at = str(at)
    try:
        details = json.loads(details)
    except (TypeError, ValueError):
        pass  # tampered text: exported as stored, verify reports the row
    return {
        "seq": seq,
        "at": at,
        "actor": actor,
        "event": event,
        "request_id": request_id,
        "details": details,
        "mac": mac,
    }


async def export(db: Database, since: datetime | None = None) -> AsyncIterator[dict[str, Any]]:
    """Rows in seq order (those with ``at`` >= ``since``; naive = UTC) as dicts for JSON Lines.

    ``at`` is the canonical ISO string, ``details`` the parsed JSON. A row whose
    text was damaged so that it no longer parses is exported as stored.
    """
    async with db.read() as conn:
        chunks = _chunks(conn, since)
        try:
            async for chunk in chunks:
                for row in chunk:
                    yield _export_row(row)
        finally:
            await chunks.aclose()
