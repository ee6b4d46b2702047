"""Keys derived from BREAKGLASS_MASTER_KEY, one per purpose (HKDF-SHA256).

The master key itself is never used directly, so a key for one purpose
(encrypting signing keys, chaining the audit log) says nothing about another.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_MASTER_KEY_LENGTH = 32


class MasterKeyError(ValueError):
    pass


def check_master_key(master: str) -> None:
    if len(master) < MIN_MASTER_KEY_LENGTH:
        raise MasterKeyError(
            f"BREAKGLASS_MASTER_KEY must be at least {MIN_MASTER_KEY_LENGTH} characters; "
            "generate one with `breakglass keys new-master`"
        )


def derive_key(master: str, purpose: str) -> bytes:
    check_master_key(master)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"breakglass/v1", info=purpose.encode())
    return hkdf.derive(master.encode("utf-8"))


def new_master_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
