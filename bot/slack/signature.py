"""Slack request signatures (v0 HMAC-SHA256) and the checks Slack asks apps to make.

https://api.slack.com/authentication/verifying-requests-from-slack
"""

from __future__ import annotations

import hashlib
import hmac

MAX_AGE_SECONDS = 60 * 5


class SignatureError(Exception):
    """The request was not signed by Slack with our secret, or is too old."""


def compute_signature(secret: str, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    digest = hmac.new(secret.encode("utf-8"), base, hashlib.sha256).hexdigest()
    return f"v0={digest}"


def check_headers(secret: str, timestamp: str | None, signature: str | None, now: float) -> None:
    """Every check that needs no body: raise SignatureError unless the headers could be
    Slack's for a recent request. Done before the body is read, so a stale, missing or
    malformed stamp costs the bot no memory and no time."""
    if not secret:
        raise SignatureError("no signing secret is configured")
    if not timestamp or not signature:
        raise SignatureError("missing X-Slack-Request-Timestamp or X-Slack-Signature")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("X-Slack-Request-Timestamp is not a number")
    if abs(now - int(timestamp)) > MAX_AGE_SECONDS:
        raise SignatureError("request timestamp is outside the 5-minute window")
    if not signature.isascii():
        raise SignatureError("X-Slack-Signature is not ASCII")
    if len(signature) != 67 or not signature.startswith("v0=") or not _is_hex(signature[3:]):
        raise SignatureError("X-Slack-Signature is not a v0 signature")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def verify_signature(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> None:
    """Raise SignatureError unless the headers prove Slack sent this body recently.

    Every malformed input (missing header, a timestamp that is not a number,
    non-ASCII bytes in the signature) is a SignatureError, never another exception.
    """
    check_headers(secret, timestamp, signature, now)
    assert timestamp is not None and signature is not None
    expected = compute_signature(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
        raise SignatureError("signature mismatch")
