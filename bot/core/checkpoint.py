"""Audit checkpoints: the audit log's head, signed, in a form anyone can check.

Pure code (no I/O). A checkpoint says "at time `at` the audit log's last row
was `seq`, with MAC `mac`", exactly as the database stores that row. Two
things vouch for it:

* it is posted by the bot itself, in the incident channel (a message from the
  bot's own Slack user, which no member can impersonate), and
* it is signed with the bot's token-signing key, whose public half is in
  ``/.well-known/jwks.json``: anyone can check it without a secret.

The signed form
---------------

``payload`` is the canonical JSON of ``{"at", "mac", "seq"}``: sorted keys, no
spaces, ASCII (Python: ``json.dumps(obj, sort_keys=True, separators=(",", ":"))``),
``at`` in UTC with microseconds, e.g.
``{"at":"2026-11-30T21:00:00.000000+00:00","mac":"3f…","seq":1234}``.

The signature is a compact JWS (RFC 7515) over those exact bytes, with the
protected header ``{"alg": <the signing algorithm>, "kid": <key id>, "typ":
"bg-checkpoint+jws"}``. In Slack the payload is printed as it is, and the JWS is
given with its payload segment left out ("detached content", RFC 7515
appendix F): ``<header>..<signature>``. To check it, put
``base64url(payload)`` back between the two dots and verify the result with
the JWKS key named by ``kid``. (Leaving the payload out also means no
JWT-shaped string ever stands in Slack: scanners that flag tokens stay quiet.)

The message
-----------

The message text starts with ``:ledger: Audit checkpoint`` (no other bot
message does, and none starts with text a user wrote), and carries one
machine-readable line::

    `breakglass-checkpoint v1 {"at":"…","mac":"…","seq":1234} eyJhbGciOi…..mZ3x…`

:func:`parse_message` reads it back; it also reads the unsigned messages
of earlier versions (``… head is sequence N with MAC `…` ``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt

from .tokens import SigningKey, VerificationKey

TYPE = "bg-checkpoint+jws"
MARKER = "breakglass-checkpoint v1"
PREFIX = ":ledger: Audit checkpoint"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64U = r"[A-Za-z0-9_-]+"
_LINE = re.compile(
    rf"`{re.escape(MARKER)} (\{{[^`\s]*\}}) ({_B64U})\.\.({_B64U})`")
_LEGACY = re.compile(r"head is sequence (\d+) with MAC `([0-9a-f]{64})`")


class BadCheckpoint(Exception):
    """A checkpoint that must not be trusted; the message says why (safe to print)."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    mac: str
    at: datetime

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            raise ValueError("a checkpoint's seq is a positive integer")
        if not _HEX64.fullmatch(self.mac):
            raise ValueError("a checkpoint's mac is 64 lower-case hex digits")
        if self.at.tzinfo is None:
            raise ValueError("a checkpoint's time must be timezone-aware")

    @property
    def at_text(self) -> str:
        return self.at.astimezone(UTC).isoformat(timespec="microseconds")

    def payload(self) -> bytes:
        """The signed bytes: canonical JSON of {at, mac, seq}."""
        body = {"at": self.at_text, "mac": self.mac, "seq": self.seq}
        return json.dumps(body, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class Signed:
    """A checkpoint and its detached JWS (``<header>..<signature>``)."""

    checkpoint: Checkpoint
    jws: str
    kid: str

    @property
    def seq(self) -> int:
        return self.checkpoint.seq

    @property
    def mac(self) -> str:
        return self.checkpoint.mac

    @property
    def payload_text(self) -> str:
        return self.checkpoint.payload().decode("ascii")

    def compact(self) -> str:
        """The JWS with its payload in place (what a JOSE library verifies)."""
        return attach(self.jws, self.checkpoint.payload())

    def details(self) -> dict[str, object]:
        """What the audit row and the webhook event `checkpoint` carry (no secret)."""
        return {"seq": self.checkpoint.seq, "mac": self.checkpoint.mac,
                "at": self.checkpoint.at_text, "kid": self.kid,
                "payload": self.payload_text, "jws": self.jws}


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def attach(detached: str, payload: bytes) -> str:
    header, sep, signature = detached.partition("..")
    if not sep or not header or not signature:
        raise BadCheckpoint("the signature is not a detached JWS (header..signature)")
    return f"{header}.{_b64u(payload)}.{signature}"


def sign(checkpoint: Checkpoint, key: SigningKey) -> Signed:
    headers = {"kid": key.kid, "typ": TYPE}
    compact = jwt.api_jws.encode(checkpoint.payload(), key.private_key, algorithm=key.alg,
                                 headers=headers)
    header, _, signature = compact.split(".")
    return Signed(checkpoint, f"{header}..{signature}", key.kid)


def verify(signed: Signed, keys: Mapping[str, VerificationKey]) -> None:
    """Raise BadCheckpoint unless `signed` carries a valid signature by one of `keys`.

    As for tokens, the header's `kid` picks one of *our* keys and that key's
    algorithm is the only one tried."""
    try:
        compact = attach(signed.jws, signed.checkpoint.payload())
        header = jwt.get_unverified_header(compact)
    except BadCheckpoint:
        raise
    except Exception:  # noqa: BLE001 - garbage in any form is just a bad signature
        raise BadCheckpoint("the signature is malformed") from None
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise BadCheckpoint(f"signed with key {str(kid)[:40]!r}, which the bot does not hold")
    if header.get("alg") != key.alg or header.get("typ") != TYPE:
        raise BadCheckpoint("the signature's header is not a checkpoint's")
    try:
        jwt.api_jws.decode_complete(compact, key.public_key, algorithms=[key.alg])
    except Exception:  # noqa: BLE001
        raise BadCheckpoint(f"the signature does not verify with key {key.kid}") from None


def message(signed: Signed) -> str:
    """The incident-channel message for a signed checkpoint."""
    cp = signed.checkpoint
    where = f"the key `{signed.kid}` of the bot's `/.well-known/jwks.json`"
    return (f"{PREFIX}: the audit log's head is sequence {cp.seq} with MAC `{cp.mac}` "
            f"({cp.at_text}).\n"
            f"`{MARKER} {signed.payload_text} {signed.jws}`\n"
            f"Anyone can check the signature with {where}; an operator compares every "
            "checkpoint with the database: `breakglass audit verify --slack`.")


@dataclass(frozen=True)
class Found:
    """A checkpoint read from a message: signed (current form) or not (older form)."""

    checkpoint: Checkpoint | None  # None: the older, unsigned form (no time)
    seq: int
    mac: str
    signed: Signed | None


def parse_message(text: str) -> Found | None:
    """The checkpoint in a bot message, or None when the message is not one.

    Only a message that *starts* with the checkpoint prefix counts: the bot echoes
    people's words (a request's reason) in its other posts, never at their start.
    Raises BadCheckpoint for a message that starts like a checkpoint but whose
    machine-readable line is damaged."""
    if not text.startswith(PREFIX):
        return None
    line = _LINE.search(text)
    if line is None:
        legacy = _LEGACY.search(text)
        if legacy is None or MARKER in text:
            raise BadCheckpoint("a checkpoint message without a readable checkpoint line")
        return Found(None, int(legacy.group(1)), legacy.group(2), None)
    try:
        body = json.loads(line.group(1))
        if not isinstance(body, dict) or set(body) != {"at", "mac", "seq"}:
            raise ValueError("fields")
        at = datetime.fromisoformat(body["at"])
        cp = Checkpoint(body["seq"], body["mac"], at)
    except (ValueError, TypeError) as exc:
        raise BadCheckpoint(f"the checkpoint's payload is malformed ({exc})") from None
    if cp.payload().decode("ascii") != line.group(1):
        raise BadCheckpoint("the checkpoint's payload is not in canonical form")
    header = line.group(2)
    kid = ""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
        kid = str(decoded.get("kid", "")) if isinstance(decoded, dict) else ""
    except ValueError:
        pass  # verify() says the signature is malformed
    signed = Signed(cp, f"{header}..{line.group(3)}", kid)
    return Found(cp, cp.seq, cp.mac, signed)


__all__ = ["MARKER", "PREFIX", "TYPE", "BadCheckpoint", "Checkpoint", "Found", "Signed",
           "attach", "message", "parse_message", "sign", "verify"]
