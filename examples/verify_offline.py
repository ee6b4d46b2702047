"""Verify a breakglass token offline, against the bot's published keys (JWKS).

    python examples/verify_offline.py https://breakglass.example.internal payments-api "$TOKEN"

Offline verification proves the token was signed by the bot for your audience and
has not expired. It cannot see a revocation: use introspection
(examples/aiohttp_middleware.py) when that matters, as it does for break-glass
access.
"""

from __future__ import annotations

import sys
from typing import Any

import jwt  # PyJWT[crypto]

ALGORITHMS = ["RS256", "ES256", "EdDSA"]  # what breakglass signs with; never "none" or HS*
TOKEN_TYPES = {"at+jwt", "application/at+jwt"}  # RFC 9068


class Verifier:
    """Keeps the key set (PyJWKClient caches it, and fetches it again when a token
    names a kid it does not have: that is how a key rotation reaches you)."""

    def __init__(self, issuer: str, audience: str, *, jwks_url: str | None = None,
                 leeway: float = 30.0) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.leeway = leeway
        url = jwks_url or f"{self.issuer}/.well-known/jwks.json"
        self.keys = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=60, timeout=5)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or raise jwt.InvalidTokenError. Blocking (urllib):
        from async code, call it through asyncio.to_thread."""
        header = jwt.get_unverified_header(token)
        if str(header.get("typ", "")).lower() not in TOKEN_TYPES:
            raise jwt.InvalidTokenError("not an access token (typ must be at+jwt)")
        key = self.keys.get_signing_key_from_jwt(token)  # unknown kid: refetch once
        return jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm_name] if key.algorithm_name in ALGORITHMS else ALGORITHMS,
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway,
            options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
        )


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    _, issuer, audience, token = argv
    try:
        claims = Verifier(issuer, audience).verify(token)
    except jwt.InvalidTokenError as exc:
        print(f"invalid token: {exc}", file=sys.stderr)
        return 1
    print(f"valid: sub={claims['sub']} scope={claims.get('scope')!r} exp={claims['exp']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
