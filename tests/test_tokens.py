"""bot.core.tokens: claims, mint/verify, JWKs, and the attacks of RFC 8725."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import re
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bot.core.tokens import (
    ALGORITHMS,
    MAX_TOKEN_LENGTH,
    InvalidToken,
    SigningKey,
    VerificationKey,
    build_claims,
    generate_private_key,
    mint,
    new_jti,
    public_jwk,
    token_hash,
    verify,
)

ISSUER = "https://breakglass.example.internal"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}


def make_key(alg: str, kid: str | None = None) -> SigningKey:
    private = generate_private_key(alg)
    return SigningKey(
        kid=kid or f"test-{alg.lower()}",
        alg=alg,
        private_key=private,
        public_key=private.public_key(),
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: make_key(alg) for alg in ALGORITHMS}


@pytest.fixture(scope="module")
def rsa_key(keys: dict[str, SigningKey]) -> SigningKey:
    return keys["RS256"]


def ring(*ks: SigningKey) -> dict[str, VerificationKey]:
    return {k.kid: k.verification_key for k in ks}


def claims(issued_at: datetime = T0, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        issuer=ISSUER,
        subject="U01ONCALL1",
        audience="payments-api",
        permissions=["payments:read", "payments:write"],
        client_id="breakglass",
        request_id="R7K2QX9",
        incident="INC-4521",
        approvers=["U01LEAD2", "U01LEAD1"],
        issued_at=issued_at,
        lifetime=timedelta(minutes=15),
        jti="jti-fixed",
    )
    args.update(over)
    return build_claims(**args)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_json(obj: Any) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64u_json(header)}.{b64u_json(payload)}.{b64u(signature)}"


def forge_rs256(key: SigningKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A token really signed with RS256 by `key`, whatever the header and payload say."""
    assert isinstance(key.private_key, rsa.RSAPrivateKey)
    signing_input = f"{b64u_json(header)}.{b64u_json(payload)}"
    sig = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64u(sig)}"


def assert_invalid(token: str, keyset: dict[str, VerificationKey], now: datetime = T0, **kw: Any):
    with pytest.raises(InvalidToken) as info:
        verify(token, keyset, issuer=ISSUER, now=now, **kw)
    # safe to log: no piece of the token in the message
    message = str(info.value)
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in message
    assert info.value.__cause__ is None
    return info.value


# ------------------------------------------------------------------ helpers


def test_new_jti_is_128_bits_base64url() -> None:
    jtis = {new_jti() for _ in range(200)}
    assert len(jtis) == 200
    for jti in jtis:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", jti)
        assert len(base64.urlsafe_b64decode(jti + "==")) == 16


def test_token_hash_is_sha256_hex() -> None:
    assert token_hash("abc") == hashlib.sha256(b"abc").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", token_hash("x.y.z"))


# ------------------------------------------------------------------- claims


def test_claims_exact_shape() -> None:
    assert claims() == {
        "iss": ISSUER,
        "sub": "U01ONCALL1",
        "aud": "payments-api",
        "exp": int(T0.timestamp()) + 900,
        "iat": int(T0.timestamp()),
        "nbf": int(T0.timestamp()),
        "jti": "jti-fixed",
        "client_id": "breakglass",
        "scope": "payments:read payments:write",
        "breakglass": {
            "request_id": "R7K2QX9",
            "incident": "INC-4521",
            "approvers": ["U01LEAD1", "U01LEAD2"],
        },
    }


def test_claims_times_are_integers_and_lifetime_applies() -> None:
    c = claims(issued_at=T0 + timedelta(microseconds=999_999), lifetime=timedelta(minutes=7))
    for name in ("exp", "iat", "nbf"):
        assert type(c[name]) is int
    assert c["iat"] == c["nbf"] == int(T0.timestamp())
    assert c["exp"] - c["iat"] == 7 * 60


def test_claims_incident_omitted_when_none() -> None:
    c = claims(incident=None)
    assert c["breakglass"] == {"request_id": "R7K2QX9", "approvers": ["U01LEAD1", "U01LEAD2"]}


def test_claims_carry_no_reason() -> None:
    with pytest.raises(TypeError):
        claims(reason="prod is on fire")
    assert "reason" not in json.dumps(claims())


@pytest.mark.parametrize(
    "over",
    [
        {"issued_at": datetime(2025, 3, 1, 12)},  # naive
        {"lifetime": timedelta(0)},
        {"lifetime": timedelta(seconds=-5)},
        {"permissions": ["payments read"]},
        {"permissions": [""]},
    ],
)
def test_claims_reject_bad_input(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        claims(**over)


def test_claims_reject_string_as_sequence() -> None:
    with pytest.raises(TypeError):
        claims(permissions="payments:read")
    with pytest.raises(TypeError):
        claims(approvers="U01LEAD1")


# ---------------------------------------------------------- mint and verify


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_round_trip(keys: dict[str, SigningKey], alg: str) -> None:
    key = keys[alg]
    token = mint(claims(), key)
    header = pyjwt.get_unverified_header(token)
    assert header == {"typ": "at+jwt", "kid": key.kid, "alg": alg}
    got = verify(token, ring(*keys.values()), issuer=ISSUER, now=T0 + timedelta(minutes=1))
    assert got == claims()


def test_verify_does_not_check_audience(rsa_key: SigningKey) -> None:
    token = mint(claims(audience="some-other-api"), rsa_key)
    assert verify(token, ring(rsa_key), issuer=ISSUER, now=T0)["aud"] == "some-other-api"


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
def test_typ_accepted_forms(rsa_key: SigningKey, typ: str) -> None:
    token = pyjwt.encode(
        claims(), rsa_key.private_key, algorithm="RS256", headers={"typ": typ, "kid": rsa_key.kid}
    )
    verify(token, ring(rsa_key), issuer=ISSUER, now=T0)


def test_leeway(rsa_key: SigningKey) -> None:
    token = mint(claims(lifetime=timedelta(minutes=1)), rsa_key)
    exp = T0 + timedelta(minutes=1)
    keyset = ring(rsa_key)
    verify(token, keyset, issuer=ISSUER, now=exp + timedelta(seconds=29))
    assert "expired" in str(assert_invalid(token, keyset, now=exp + timedelta(seconds=30)))
    assert_invalid(token, keyset, now=exp, leeway=timedelta(0))
    verify(token, keyset, issuer=ISSUER, now=T0 - timedelta(seconds=30))
    assert_invalid(token, keyset, now=T0 - timedelta(seconds=31))


def test_verify_requires_aware_now(rsa_key: SigningKey) -> None:
    with pytest.raises(ValueError):
        verify(mint(claims(), rsa_key), ring(rsa_key), issuer=ISSUER, now=datetime(2025, 3, 1))


def test_key_must_fit_algorithm(keys: dict[str, SigningKey]) -> None:
    es = keys["ES256"]
    with pytest.raises(ValueError):
        VerificationKey(kid="x", alg="RS256", public_key=es.public_key)
    with pytest.raises(ValueError):
        SigningKey(
            kid="x",
            alg="ES256",
            private_key=es.private_key,
            public_key=keys["EdDSA"].public_key,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError):
        SigningKey(
            kid="x",
            alg="ES256",
            private_key=es.private_key,
            public_key=generate_private_key("ES256").public_key(),
        )
    with pytest.raises(ValueError):
        generate_private_key("HS256")
    assert "PRIVATE" not in repr(es) and "private_key" not in repr(es)


# ------------------------------------------------------------------ attacks


def test_alg_none(rsa_key: SigningKey) -> None:
    header = {"typ": "at+jwt", "kid": rsa_key.kid, "alg": "none"}
    for sig in (b"", b"x"):
        assert_invalid(forge(header, claims(), sig), ring(rsa_key))
    token = pyjwt.encode(claims(), None, algorithm="none", headers=header)
    assert_invalid(token, ring(rsa_key))
    for variant in ("None", "NONE", "nOnE"):
        assert_invalid(forge({**header, "alg": variant}, claims()), ring(rsa_key))


def test_hs256_with_public_pem_as_secret(rsa_key: SigningKey) -> None:
    pem = rsa_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"typ": "at+jwt", "kid": rsa_key.kid, "alg": "HS256"}
    signing_input = f"{b64u_json(header)}.{b64u_json(claims())}"
    for secret in (pem, pem.strip()):
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert_invalid(f"{signing_input}.{b64u(sig)}", ring(rsa_key))


def test_header_alg_must_equal_key_alg(keys: dict[str, SigningKey]) -> None:
    rs = keys["RS256"]
    good = forge_rs256(rs, {"typ": "at+jwt", "kid": rs.kid, "alg": "RS256"}, claims())
    verify(good, ring(rs), issuer=ISSUER, now=T0)  # the forging helper itself is sound
    for alg in ("RS512", "PS256", "ES256", "EdDSA", "rs256", "", None):
        token = forge_rs256(rs, {"typ": "at+jwt", "kid": rs.kid, "alg": alg}, claims())
        assert_invalid(token, ring(rs))
    token = forge_rs256(rs, {"typ": "at+jwt", "kid": rs.kid}, claims())
    assert_invalid(token, ring(rs))
    # a key of one type presented under another key's kid
    ed = keys["EdDSA"]
    token = pyjwt.encode(
        claims(), ed.private_key, algorithm="EdDSA", headers={"typ": "at+jwt", "kid": rs.kid}
    )
    assert_invalid(token, ring(rs, ed))


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt2", "application/jwt", "", 7])
def test_typ_must_be_at_jwt(rsa_key: SigningKey, typ: Any) -> None:
    headers: dict[str, Any] = {"kid": rsa_key.kid, "typ": typ}
    token = pyjwt.encode(claims(), rsa_key.private_key, algorithm="RS256", headers=headers)
    if typ is None:
        assert "typ" not in pyjwt.get_unverified_header(token)
    assert_invalid(token, ring(rsa_key))


def test_unknown_and_injected_kid(keys: dict[str, SigningKey]) -> None:
    rs = keys["RS256"]
    for kid in ("other", "../../etc/passwd", "' OR 1=1 --", "", "\x00"):
        token = pyjwt.encode(
            claims(), rs.private_key, algorithm="RS256", headers={"typ": "at+jwt", "kid": kid}
        )
        err = assert_invalid(token, ring(rs))
        if kid:
            assert kid not in str(err)


@pytest.mark.parametrize("kid", [None, 5, ["a"], {"a": 1}])
def test_kid_must_be_a_string(rsa_key: SigningKey, kid: Any) -> None:
    header = {"typ": "at+jwt", "alg": "RS256"}
    if kid is not None:
        header["kid"] = kid
    assert_invalid(forge(header, claims(), b"sig"), ring(rsa_key))


def test_signature_by_other_key_with_same_kid(rsa_key: SigningKey) -> None:
    impostor = make_key("RS256", kid=rsa_key.kid)
    assert "signature" in str(assert_invalid(mint(claims(), impostor), ring(rsa_key)))


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "iss", "sub", "aud", "jti"])
def test_missing_required_claim(rsa_key: SigningKey, claim: str) -> None:
    c = claims()
    del c[claim]
    err = assert_invalid(mint(c, rsa_key), ring(rsa_key))
    assert claim in str(err) or claim == "iss"


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", "tomorrow"),
        ("exp", True),
        ("nbf", [1]),
        ("iat", "x"),
        ("sub", 5),
        ("sub", ""),
        ("jti", 5),
        ("aud", 5),
        ("aud", []),
        ("iss", ["https://breakglass.example.internal"]),
    ],
)
def test_claim_of_wrong_type(rsa_key: SigningKey, claim: str, value: Any) -> None:
    header = {"typ": "at+jwt", "kid": rsa_key.kid, "alg": "RS256"}
    assert_invalid(forge_rs256(rsa_key, header, {**claims(), claim: value}), ring(rsa_key))


def test_nbf_and_iat_in_future(rsa_key: SigningKey) -> None:
    keyset = ring(rsa_key)
    future = int((T0 + timedelta(minutes=5)).timestamp())
    assert "nbf" in str(assert_invalid(mint({**claims(), "nbf": future}, rsa_key), keyset))
    assert "iat" in str(assert_invalid(mint({**claims(), "iat": future}, rsa_key), keyset))
    # the whole token from the future
    assert_invalid(mint(claims(issued_at=T0 + timedelta(minutes=5)), rsa_key), keyset)


def test_wrong_issuer(rsa_key: SigningKey) -> None:
    token = mint(claims(issuer="https://evil.example"), rsa_key)
    assert "issuer" in str(assert_invalid(token, ring(rsa_key)))
    token = mint(claims(), rsa_key)
    with pytest.raises(InvalidToken):
        verify(token, ring(rsa_key), issuer="https://other.example", now=T0)


def test_expired(rsa_key: SigningKey) -> None:
    token = mint(claims(), rsa_key)
    assert_invalid(token, ring(rsa_key), now=T0 + timedelta(minutes=16))
    assert_invalid(token, ring(rsa_key), now=T0 + timedelta(days=365))


def test_truncated_and_garbled(keys: dict[str, SigningKey]) -> None:
    keyset = ring(*keys.values())
    for key in keys.values():
        token = mint(claims(), key)
        head, body, sig = token.split(".")
        candidates = [
            token[:-1],
            token[:-4],
            token[: len(token) // 2],
            f"{head}.{body}",
            f"{head}.{body}.",
            f"{head}..{sig}",
            f".{body}.{sig}",
            f"{head}.{body}.{sig}.{sig}",
            token + "A",
            token.replace(".", "", 1),
            f"{head}.{body[:-3]}!!!.{sig}",
            f"{head}.{b64u(b'not json')}.{sig}",
            f"{head}.{b64u(bytes([0xFF, 0xFE, 0x00]))}.{sig}",
            f"{head}.{b64u_json([1, 2, 3])}.{sig}",
            f"{b64u(b'{}')}.{body}.{sig}",
            f"{b64u(bytes([0xC3, 0x28]))}.{body}.{sig}",
            f"{b64u_json([])}.{body}.{sig}",
            f"{b64u(b'{' * 5000)}.{body}.{sig}",
            f"{head}.{b64u_json({**claims(), 'sub': 'U0ADMIN'})}.{sig}",
            "",
            ".",
            "..",
            "a.b.c",
            "é.é.é",
            "\x00.\x00.\x00",
            "e30.e30.e30",
        ]
        # flip every character of the signature's last block
        for i in range(1, 5):
            flipped = sig[:-i] + ("A" if sig[-i] != "A" else "B") + sig[len(sig) - i + 1 :]
            candidates.append(f"{head}.{body}.{flipped}")
        for bad in candidates:
            with pytest.raises(InvalidToken):
                verify(bad, keyset, issuer=ISSUER, now=T0)


def test_not_a_string(rsa_key: SigningKey) -> None:
    for bad in (None, b"a.b.c", 5):
        with pytest.raises(InvalidToken):
            verify(bad, ring(rsa_key), issuer=ISSUER, now=T0)  # type: ignore[arg-type]


def test_oversized(rsa_key: SigningKey) -> None:
    padded = mint({**claims(), "pad": "x" * MAX_TOKEN_LENGTH}, rsa_key)
    assert len(padded) > MAX_TOKEN_LENGTH
    assert "longer" in str(assert_invalid(padded, ring(rsa_key)))
    assert_invalid("a" * (MAX_TOKEN_LENGTH + 1), ring(rsa_key))
    # just under the limit is fine
    fits = mint({**claims(), "pad": "x" * 5000}, rsa_key)
    assert len(fits) <= MAX_TOKEN_LENGTH
    verify(fits, ring(rsa_key), issuer=ISSUER, now=T0)


def test_crit_header_rejected(rsa_key: SigningKey) -> None:
    token = pyjwt.encode(
        claims(),
        rsa_key.private_key,
        algorithm="RS256",
        headers={"typ": "at+jwt", "kid": rsa_key.kid, "crit": ["exp"], "exp": 1},
    )
    assert_invalid(token, ring(rsa_key))


def test_embedded_jwk_and_jku_are_ignored(rsa_key: SigningKey) -> None:
    attacker = make_key("RS256", kid=rsa_key.kid)
    headers = {
        "typ": "at+jwt",
        "kid": rsa_key.kid,
        "jwk": public_jwk(attacker.verification_key),
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
    }
    token = pyjwt.encode(claims(), attacker.private_key, algorithm="RS256", headers=headers)
    assert_invalid(token, ring(rsa_key))


def test_empty_keyset(rsa_key: SigningKey) -> None:
    assert_invalid(mint(claims(), rsa_key), {})


# --------------------------------------------------------------------- JWKs


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_public_jwk_shape(keys: dict[str, SigningKey], alg: str) -> None:
    jwk = public_jwk(keys[alg].verification_key)
    assert jwk["kid"] == keys[alg].kid and jwk["alg"] == alg and jwk["use"] == "sig"
    assert not PRIVATE_MEMBERS & jwk.keys()
    for value in jwk.values():
        assert "=" not in value
    expected = {
        "RS256": {"kty", "n", "e"},
        "ES256": {"kty", "crv", "x", "y"},
        "EdDSA": {"kty", "crv", "x"},
    }[alg]
    assert set(jwk) == expected | {"kid", "alg", "use"}
    if alg == "RS256":
        assert jwk["kty"] == "RSA" and jwk["e"] == "AQAB"
        assert len(base64.urlsafe_b64decode(jwk["n"] + "==")) == 256
    elif alg == "ES256":
        assert jwk["kty"] == "EC" and jwk["crv"] == "P-256"
        assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == 32
        assert len(base64.urlsafe_b64decode(jwk["y"] + "==")) == 32
    else:
        assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
        assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == 32


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_pyjwt_reads_public_jwk(keys: dict[str, SigningKey], alg: str) -> None:
    key = keys[alg]
    jwk = pyjwt.PyJWK(public_jwk(key.verification_key))
    token = mint(claims(issued_at=datetime.now(UTC)), key)
    pyjwt.decode(token, jwk, algorithms=[alg], audience="payments-api", issuer=ISSUER)


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_jwcrypto_verifies_with_public_jwk(keys: dict[str, SigningKey], alg: str) -> None:
    from jwcrypto import jwk as jwc_jwk
    from jwcrypto import jwt as jwc_jwt

    key = keys[alg]
    keyset = jwc_jwk.JWKSet()
    keyset.add(jwc_jwk.JWK(**public_jwk(key.verification_key)))
    token = mint(claims(issued_at=datetime.now(UTC)), key)
    checked = jwc_jwt.JWT(
        jwt=token,
        key=keyset,
        algs=[alg],
        expected_type="JWS",
        check_claims={"iss": ISSUER, "aud": "payments-api", "exp": None},
    )
    assert json.loads(checked.claims)["sub"] == "U01ONCALL1"
    assert json.loads(checked.header)["typ"] == "at+jwt"
    assert not keyset.get_key(key.kid).has_private


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_authlib_verifies_with_public_jwk(keys: dict[str, SigningKey], alg: str) -> None:
    # authlib.jose is deprecated in favour of joserfc, and forces its warning to
    # "always"; record it to keep it out of the report.
    with warnings.catch_warnings(record=True):
        jose = importlib.import_module("authlib.jose")
    JsonWebKey, JsonWebToken = jose.JsonWebKey, jose.JsonWebToken

    key = keys[alg]
    keyset = JsonWebKey.import_key_set({"keys": [public_jwk(key.verification_key)]})
    token = mint(claims(issued_at=datetime.now(UTC)), key)
    decoded = JsonWebToken([alg]).decode(
        token, keyset, claims_options={"iss": {"essential": True, "value": ISSUER}}
    )
    decoded.validate()
    assert decoded["breakglass"]["request_id"] == "R7K2QX9"
    assert decoded.header["kid"] == key.kid
