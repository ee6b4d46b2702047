"""Relying services' client secrets as the policy stores them: a slow, salted hash.

`[clients.NAME] secret_hash` holds

    scrypt$ln=15,r=8,p=1$<salt>$<hash>

(salt and hash in unpadded base64: the salt 16 random bytes, the hash 32 bytes of
scrypt(secret, salt, N=2**ln, r, p)), made by `breakglass hash-secret`. Checking one
guess costs about 32 MiB and tens of milliseconds, so a leaked policy file does not
give the secrets away to a GPU. The older `secret_sha256` (a bare SHA-256) is still
accepted; `check-policy` warns about it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

SCHEME = "scrypt"
DEFAULT_LN, DEFAULT_R, DEFAULT_P = 15, 8, 1
MIN_LN, MAX_LN = 12, 22
SALT_BYTES, HASH_BYTES = 16, 32
_FORMAT = re.compile(r"scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


class SecretHashError(ValueError):
    """Not a secret_hash this version can check; the text says what is expected."""


@dataclass(frozen=True)
class ScryptHash:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        return (f"{SCHEME}$ln={self.ln},r={self.r},p={self.p}${_b64(self.salt)}$"
                f"{_b64(self.digest)}")


def parse(text: str) -> ScryptHash:
    found = _FORMAT.fullmatch(text)
    if found is None:
        raise SecretHashError("must be a hash from `breakglass hash-secret`, like "
                              "scrypt$ln=15,r=8,p=1$SALT$HASH")
    ln, r, p = (int(found.group(i)) for i in (1, 2, 3))
    if not MIN_LN <= ln <= MAX_LN or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise SecretHashError(f"scrypt parameters out of range: ln {MIN_LN}-{MAX_LN}, r 1-32, "
                              "p 1-16 (make a new hash with `breakglass hash-secret`)")
    try:
        salt, digest = _unb64(found.group(4)), _unb64(found.group(5))
    except (binascii.Error, ValueError):
        raise SecretHashError("the salt or hash is not base64") from None
    if len(salt) < SALT_BYTES or len(digest) < HASH_BYTES:
        raise SecretHashError(f"the salt must be at least {SALT_BYTES} bytes and the hash at "
                              f"least {HASH_BYTES}")
    return ScryptHash(ln, r, p, salt, digest)


def hash_secret(secret: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P,
                salt: bytes | None = None) -> str:
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return str(ScryptHash(ln, r, p, salt, _scrypt(secret, salt, ln, r, p, HASH_BYTES)))


def verify(secret: str, stored: ScryptHash) -> bool:
    """Whether `secret` is the one `stored` was made from (slow, by design)."""
    got = _scrypt(secret, stored.salt, stored.ln, stored.r, stored.p, len(stored.digest))
    return hmac.compare_digest(got, stored.digest)


def _scrypt(secret: str, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(secret.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * (n + p + 2) + (1 << 20), dklen=length)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
