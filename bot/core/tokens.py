"""Access tokens: JWTs in the RFC 9068 profile, hardened per RFC 8725.

Pure code: no I/O, no database, no Slack. Keys come in as objects; where
they are stored (and how they are protected at rest) is `bot.keys`' job.

Verification never trusts the token's header to choose how it is checked:
the `kid` picks one of *our* keys, and that key's algorithm is the only one
tried. The header's `alg` must merely agree with it, so `alg: none`, an
HMAC signed with our public key as the secret, or any other algorithm
confusion fails before a signature is even looked at.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
DEFAULT_ALGORITHM = "RS256"

TOKEN_TYPE = "at+jwt"
_ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})
MAX_TOKEN_LENGTH = 8192
REQUIRED_CLAIMS: tuple[str, ...] = ("exp", "iat", "nbf", "iss", "sub", "aud", "jti")
DEFAULT_LEEWAY = timedelta(seconds=30)

RSA_KEY_SIZE = 2048
RSA_PUBLIC_EXPONENT = 65537

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class InvalidToken(Exception):
    """A token that must not be accepted. The message is safe to log: it never
    contains the token or any part of it."""


# --------------------------------------------------------------------------- keys


def _check_key_alg(alg: str, key: PrivateKey | PublicKey) -> None:
    """Raise ValueError unless `key` is the right kind of key for `alg`."""
    if alg == "RS256":
        ok = isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) and key.key_size >= 2048
    elif alg == "ES256":
        ok = isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and (
            isinstance(key.curve, ec.SECP256R1)
        )
    elif alg == "EdDSA":
        ok = isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey)
    else:
        raise ValueError(
            f"unsupported signing algorithm {alg!r}; use one of {', '.join(ALGORITHMS)}"
        )
    if not ok:
        raise ValueError(f"key of type {type(key).__name__} cannot be used with {alg}")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    alg: str
    public_key: PublicKey

    def __post_init__(self) -> None:
        _check_key_alg(self.alg, self.public_key)


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey
    public_key: PublicKey

    def __post_init__(self) -> None:
        _check_key_alg(self.alg, self.private_key)
        _check_key_alg(self.alg, self.public_key)
        if public_key_bytes(self.private_key.public_key()) != public_key_bytes(self.public_key):
            raise ValueError(f"signing key {self.kid}: public key does not match the private key")

    def __repr__(self) -> str:  # never let a private key reach a log via repr()
        return f"SigningKey(kid={self.kid!r}, alg={self.alg!r})"

    @property
    def verification_key(self) -> VerificationKey:
        return VerificationKey(kid=self.kid, alg=self.alg, public_key=self.public_key)


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_SIZE)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {alg!r}; use one of {', '.join(ALGORITHMS)}")


def public_key_bytes(key: PublicKey) -> bytes:
    """Canonical encoding of a public key (SubjectPublicKeyInfo DER), for comparisons."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_pem(key: PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_pem(pem: str) -> PublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"unsupported public key type {type(key).__name__}")
    return key


def private_key_der(key: PrivateKey) -> bytes:
    """PKCS#8 DER, unencrypted: the caller encrypts it before it goes anywhere."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_der(der: bytes) -> PrivateKey:
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_uint(value: int, length: int | None = None) -> str:
    if length is None:
        length = max(1, (value.bit_length() + 7) // 8)
    return _b64u(value.to_bytes(length, "big"))


def public_jwk(key: VerificationKey) -> dict[str, str]:
    """The public half of `key` as an RFC 7517 JWK (no private members, ever)."""
    pub = key.public_key
    jwk: dict[str, str]
    if isinstance(pub, rsa.RSAPublicKey):
        numbers = pub.public_numbers()
        jwk = {"kty": "RSA", "n": _b64u_uint(numbers.n), "e": _b64u_uint(numbers.e)}
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        point = pub.public_numbers()
        size = (pub.curve.key_size + 7) // 8
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64u_uint(point.x, size),
            "y": _b64u_uint(point.y, size),
        }
    else:
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64u(raw)}
    return {**jwk, "kid": key.kid, "alg": key.alg, "use": "sig"}


# ------------------------------------------------------------------------- tokens


def new_jti() -> str:
    """128 random bits, base64url without padding (22 characters)."""
    return _b64u(secrets.token_bytes(16))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _epoch(at: datetime) -> int:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("a timezone-aware datetime is required")
    return math.floor(at.timestamp())


#: The audience of every drill token (contract section 7.4): no relying service accepts it.
DRILL_AUDIENCE = "breakglass-drill"


def is_drill(claims: Mapping[str, Any]) -> bool:
    """True for a drill token's claims (its audience or its ``breakglass.drill``)."""
    bg = claims.get("breakglass")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else list(aud or []) if isinstance(aud, list) else []
    return DRILL_AUDIENCE in auds or (isinstance(bg, dict) and bg.get("drill") is True)


def build_claims(
    *,
    issuer: str,
    subject: str,
    audience: str,
    permissions: Sequence[str],
    client_id: str,
    request_id: str,
    incident: str | None,
    approvers: Sequence[str],
    issued_at: datetime,
    lifetime: timedelta,
    jti: str,
    drill: bool = False,
) -> dict[str, Any]:
    """RFC 9068 access-token claims. The request's free-text reason is deliberately
    not a parameter: it never goes into a token."""
    if isinstance(permissions, str):
        raise TypeError("permissions must be a sequence of strings, not a string")
    if isinstance(approvers, str):
        raise TypeError("approvers must be a sequence of strings, not a string")
    for permission in permissions:
        if not permission or any(c.isspace() for c in permission):
            raise ValueError(f"invalid permission {permission!r}: must be non-empty, no spaces")
    seconds = math.floor(lifetime.total_seconds())
    if seconds <= 0:
        raise ValueError("token lifetime must be at least one second")
    iat = _epoch(issued_at)
    breakglass: dict[str, Any] = {"request_id": request_id}
    if incident is not None:
        breakglass["incident"] = incident
    breakglass["approvers"] = sorted(set(approvers))
    if drill:
        if audience != DRILL_AUDIENCE:
            raise ValueError(f"a drill token's audience must be {DRILL_AUDIENCE!r}")
        breakglass["drill"] = True
    return {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": iat + seconds,
        "iat": iat,
        "nbf": iat,
        "jti": jti,
        "client_id": client_id,
        "scope": " ".join(permissions),
        "breakglass": breakglass,
    }


def mint(claims: Mapping[str, Any], key: SigningKey) -> str:
    headers = {"typ": TOKEN_TYPE, "kid": key.kid, "alg": key.alg}
    return jwt.encode(dict(claims), key.private_key, algorithm=key.alg, headers=headers)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"claim {name} is not a number")
    if not math.isfinite(value):
        raise InvalidToken(f"claim {name} is not a number")
    return float(value)


def _decode(token: str, key: VerificationKey, issuer: str) -> dict[str, Any]:
    """PyJWT does the signature, `iss` and presence checks; times are checked by
    the caller against its own clock. PyJWT's messages are not passed on."""
    try:
        return jwt.decode(
            token,
            key.public_key,
            algorithms=[key.alg],
            issuer=issuer,
            options={
                "verify_signature": True,
                "require": list(REQUIRED_CLAIMS),
                "verify_iss": True,
                "verify_aud": False,  # the caller checks aud against the client's audiences
                "verify_exp": False,  # checked below against the caller's `now`
                "verify_nbf": False,
                "verify_iat": False,
                "verify_sub": True,
                "verify_jti": True,
            },
        )
    except jwt.MissingRequiredClaimError as e:
        claim = e.claim if e.claim in REQUIRED_CLAIMS else "?"
        raise InvalidToken(f"token lacks required claim {claim}") from None
    except jwt.InvalidSignatureError:
        raise InvalidToken("bad signature") from None
    except jwt.InvalidIssuerError:
        raise InvalidToken("wrong issuer") from None
    except jwt.InvalidAlgorithmError:
        raise InvalidToken("algorithm not allowed") from None
    except Exception:  # noqa: BLE001 - garbage in any form is just an invalid token
        raise InvalidToken("malformed token") from None


def verify(
    token: str,
    keys: Mapping[str, VerificationKey],
    *,
    issuer: str,
    now: datetime,
    leeway: timedelta = DEFAULT_LEEWAY,
) -> dict[str, Any]:
    """Check `token` and return its claims, or raise InvalidToken.

    Checks signature (with the algorithm of the key named by `kid`), `typ`,
    presence of exp/iat/nbf/iss/sub/aud/jti, `iss`, `exp`, `nbf` and `iat`
    (with `leeway`). The audience is NOT checked: the caller compares `aud`
    with the audiences of the client that presented the token.
    """
    if not isinstance(token, str):
        raise InvalidToken("token is not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken(f"token longer than {MAX_TOKEN_LENGTH} characters")
    if token.count(".") != 2:
        raise InvalidToken("malformed token")
    try:
        header = jwt.get_unverified_header(token)
    except Exception:  # noqa: BLE001
        raise InvalidToken("malformed token header") from None

    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
        raise InvalidToken("token type is not at+jwt")
    if "crit" in header or "b64" in header:
        raise InvalidToken("unsupported critical header parameter")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no key id")
    key = keys.get(kid)
    if key is None or key.kid != kid:
        raise InvalidToken("unknown key id")  # the kid itself is attacker text: not echoed
    if header.get("alg") != key.alg:
        raise InvalidToken("token algorithm does not match its key")

    claims = _decode(token, key, issuer)

    for name in ("sub", "jti"):
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidToken(f"claim {name} is not a non-empty string")
    aud = claims.get("aud")
    if not (
        (isinstance(aud, str) and aud)
        or (isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud))
    ):
        raise InvalidToken("claim aud is not a string or a list of strings")

    t = _epoch(now)
    slack = leeway.total_seconds()
    exp = _numeric_date(claims, "exp")
    nbf = _numeric_date(claims, "nbf")
    iat = _numeric_date(claims, "iat")
    if exp <= t - slack:
        raise InvalidToken("token expired")
    if nbf > t + slack:
        raise InvalidToken("token not yet valid (nbf)")
    if iat > t + slack:
        raise InvalidToken("token issued in the future (iat)")
    return claims


__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "MAX_TOKEN_LENGTH",
    "InvalidToken",
    "PrivateKey",
    "PublicKey",
    "SigningKey",
    "VerificationKey",
    "build_claims",
    "generate_private_key",
    "load_private_key_der",
    "load_public_pem",
    "mint",
    "new_jti",
    "private_key_der",
    "public_jwk",
    "public_key_bytes",
    "public_pem",
    "token_hash",
    "verify",
]
