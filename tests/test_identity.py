"""Unit tests for the Authorization header parser and the end-user token verifier.

Every token here is signed with real keys and verified with the real pyjwt and cryptography code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from helpers import AUDIENCE, ISSUER, MFA, TestIdP, b64url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from extauthz.config import IssuerConfig
from extauthz.errors import TokenError
from extauthz.identity import EndUser, TokenVerifier, extract_bearer
from extauthz.jwks import IssuerKeys
from extauthz.keys import public_jwk

MAX_TOKEN = 8192
OTHER_ISSUER = "https://other-idp.test"


class FakeClock:
    """A settable wall clock in seconds, passed to TokenVerifier as `clock`."""

    def __init__(self, now: float | None = None):
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def issuer_config(jwks_file: Path, **overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER, "audiences": (AUDIENCE,), "algorithms": ("ES256",), "jwks_file": jwks_file,
        "jwks_uri": None, "jwks_ca_file": None, "max_token_lifetime": 3600.0, "leeway": 30.0,
        "jwks_refresh_interval": 300.0, "jwks_min_refresh_interval": 30.0, "jwks_timeout": 2.0,
    }
    values.update(overrides)
    return IssuerConfig(**values)


def load_issuer(folder: Path, jwks: dict[str, Any], **overrides: Any) -> IssuerKeys:
    """Write `jwks` to a file in `folder` and return the loaded IssuerKeys of an issuer using it."""
    name = hashlib.sha256(repr(overrides).encode()).hexdigest()[:12]
    path = folder / f"jwks-{name}.json"
    path.write_text(json.dumps(jwks), encoding="utf-8")
    keys = IssuerKeys(issuer_config(path, **overrides))
    keys.load()
    return keys


def make_verifier(folder: Path, idp: TestIdP, *, cache_size: int = 100, clock: FakeClock | None = None,
                  **overrides: Any) -> TokenVerifier:
    keys = load_issuer(folder, idp.jwks(), issuer=idp.issuer, **overrides)
    return TokenVerifier({idp.issuer: keys}, cache_size, clock or FakeClock())


def segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{segment(header)}.{segment(claims)}.{signature}"


def hs256_token(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def public_pem(idp: TestIdP) -> bytes:
    return idp.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)


def claims_json(idp: TestIdP, name: str, raw_value: str) -> str:
    """Return the IdP's default claims as JSON text with `name` set to the literal JSON `raw_value`."""
    text = json.dumps(idp.claims(**{name: ...}))
    return f'{text[:-1]}, "{name}": {raw_value}}}'


def duplicate_claim_json(idp: TestIdP, name: str, raw_value: str) -> str:
    """Return the IdP's default claims as JSON text with a second `name` member set to `raw_value`."""
    text = json.dumps(idp.claims())
    return f'{text[:-1]}, "{name}": {raw_value}}}'


def raw_signed(idp: TestIdP, payload: str | bytes, **header: Any) -> str:
    return idp.raw_token({"alg": "ES256", "typ": "JWT", "kid": idp.kid, **header}, payload)


def rsa_token(idp: TestIdP) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(idp.claims(), key, algorithm="RS256", headers={"kid": idp.kid})


def other_key_token(idp: TestIdP) -> str:
    return jwt.encode(idp.claims(), TestIdP().private_key, algorithm="ES256", headers={"kid": idp.kid})


def non_canonical(segment: str) -> str:
    """Return `segment` with its unused trailing bits set: it decodes to the same bytes but is not canonical."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3), "a segment without unused bits has no other spelling"
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) | 1]


def sign_input(idp: TestIdP, signing_input: str) -> str:
    """Return a token with an ES256 signature of `signing_input` exactly as given."""
    der = idp.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def non_canonical_signature_token(idp: TestIdP) -> str:
    header, payload, signature = idp.token().split(".")
    return f"{header}.{payload}.{non_canonical(signature)}"


def non_canonical_payload_token(idp: TestIdP) -> str:
    header, payload, _ = idp.token(jti="pad").split(".")
    if len(payload) % 4 not in (2, 3):
        header, payload, _ = idp.token(jti="padding").split(".")
    return sign_input(idp, f"{header}.{non_canonical(payload)}")


def tampered_token(idp: TestIdP) -> str:
    header, _, signature = idp.token().split(".")
    return f"{header}.{segment(idp.claims(sub='admin'))}.{signature}"


# --- extract_bearer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (None, None),
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("BEARER abc.def.ghi", "abc.def.ghi"),
        ("BeArEr abc.def.ghi", "abc.def.ghi"),
        ("Bearer\tabc.def.ghi", "abc.def.ghi"),
        ("Bearer \t  abc.def.ghi", "abc.def.ghi"),
        ("  Bearer abc.def.ghi  ", "abc.def.ghi"),
        ("\tBearer abc.def.ghi\t", "abc.def.ghi"),
        ("Bearer " + "a" * MAX_TOKEN, "a" * MAX_TOKEN),
    ],
)
def test_bearer_extracted(value, token):
    assert extract_bearer(value, MAX_TOKEN) == token


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "\t",
        "Basic dXNlcjpwYXNz",
        "Token abc.def.ghi",
        "Bearerabc.def.ghi",
        "Bearer",
        "bearer   ",
        "Bearer a,Bearer b",
        "Bearer a, Bearer b",
        "Bearer a,b",
        "Bearer a b",
        "Bearer a\tb",
        "Bearer a, b",
        "Bearer ,",
    ],
)
def test_bearer_invalid_header(value):
    with pytest.raises(TokenError) as caught:
        extract_bearer(value, MAX_TOKEN)
    assert caught.value.code == "invalid_authorization_header"


def test_bearer_oversized_token():
    with pytest.raises(TokenError) as caught:
        extract_bearer("Bearer " + "a" * (MAX_TOKEN + 1), MAX_TOKEN)
    assert caught.value.code == "invalid_token"


# --- TokenVerifier: accepted tokens -----------------------------------------------------------


def test_verify_valid_token(tmp_path, idp):
    verifier = make_verifier(tmp_path, idp)
    now = int(verifier.clock())
    user = verifier.verify(idp.token(iat=now, exp=now + 600, auth_time=now - 30, azp="web", sid="s-1",
                                      jti="j-1"))
    assert isinstance(user, EndUser)
    assert user.issuer == ISSUER
    assert user.subject == "alice"
    assert user.principal == f"{ISSUER}/alice"
    assert user.audiences == (AUDIENCE,)
    assert user.presenter == "web"
    assert user.expires_at == now + 600
    assert user.issued_at == now
    assert user.auth_time == now - 30
    assert user.not_before is None
    assert user.acr == MFA
    assert user.amr == ("pwd", "otp")
    assert user.session_id == "s-1"
    assert user.token_id == "j-1"
    assert user.kid == idp.kid


def test_verify_audience_list(tmp_path, idp):
    verifier = make_verifier(tmp_path, idp)
    user = verifier.verify(idp.token(aud=["other", AUDIENCE]))
    assert user.audiences == ("other", AUDIENCE)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat", "auth_time"])
def test_verify_float_dates(tmp_path, idp, claim):
    verifier = make_verifier(tmp_path, idp)
    now = int(verifier.clock())
    values = {"exp": now + 600.5, "nbf": now - 0.5, "iat": now - 0.25, "auth_time": now - 30.75}
    user = verifier.verify(idp.token(**{claim: values[claim]}))
    fields = {"exp": user.expires_at, "nbf": user.not_before, "iat": user.issued_at, "auth_time": user.auth_time}
    assert fields[claim] == values[claim]


def test_verify_within_leeway(tmp_path, idp):
    clock = FakeClock()
    verifier = make_verifier(tmp_path, idp, clock=clock)
    now = int(clock.now)
    user = verifier.verify(idp.token(iat=now - 600, exp=now - 10, nbf=now + 10))
    assert user.subject == "alice"


def test_verify_without_iat_when_no_lifetime(tmp_path, idp):
    verifier = make_verifier(tmp_path, idp, max_token_lifetime=None)
    user = verifier.verify(idp.token(iat=...))
    assert user.issued_at is None


def test_verify_second_issuer(tmp_path, idp):
    other = TestIdP(OTHER_ISSUER)
    verifier = TokenVerifier({
        idp.issuer: load_issuer(tmp_path, idp.jwks()),
        other.issuer: load_issuer(tmp_path, other.jwks(), issuer=OTHER_ISSUER),
    }, 100, FakeClock())
    assert verifier.verify(other.token()).issuer == OTHER_ISSUER
    assert verifier.verify(idp.token()).issuer == ISSUER


# --- TokenVerifier: hostile tokens ------------------------------------------------------------

HOSTILE_TOKENS = [
    pytest.param(lambda idp, now: unsigned_token({"alg": "none", "typ": "JWT"}, idp.claims()),
                 "invalid_token", id="alg-none"),
    pytest.param(lambda idp, now: unsigned_token({"alg": "none", "kid": idp.kid}, idp.claims(), "e30"),
                 "invalid_token", id="alg-none-signature"),
    pytest.param(lambda idp, now: unsigned_token({"alg": "None", "kid": idp.kid}, idp.claims(), "e30"),
                 "invalid_token", id="alg-None"),
    pytest.param(lambda idp, now: hs256_token(idp.claims(), public_pem(idp), idp.kid),
                 "invalid_token", id="hs256-public-pem"),
    pytest.param(lambda idp, now: hs256_token(idp.claims(), json.dumps(idp.jwk).encode(), idp.kid),
                 "invalid_token", id="hs256-public-jwk"),
    pytest.param(lambda idp, now: idp.token(headers={"kid": "unknown-kid"}), "invalid_token", id="unknown-kid"),
    pytest.param(lambda idp, now: jwt.encode(idp.claims(), idp.private_key, algorithm="ES256"),
                 "invalid_token", id="missing-kid"),
    pytest.param(lambda idp, now: raw_signed(idp, json.dumps(idp.claims()), kid=7), "invalid_token",
                 id="kid-not-string"),
    pytest.param(lambda idp, now: idp.token(iss="https://idp.test/"), "invalid_token", id="wrong-iss"),
    pytest.param(lambda idp, now: idp.token(iss="https://evil.test"), "invalid_token", id="unknown-issuer"),
    pytest.param(lambda idp, now: idp.token(iss=...), "invalid_token", id="missing-iss"),
    pytest.param(lambda idp, now: raw_signed(idp, claims_json(idp, "iss", '["https://idp.test"]')),
                 "invalid_token", id="iss-list"),
    pytest.param(lambda idp, now: idp.token(aud="other"), "invalid_token", id="wrong-aud"),
    pytest.param(lambda idp, now: idp.token(aud=["other", "mesh2"]), "invalid_token", id="wrong-aud-list"),
    pytest.param(lambda idp, now: idp.token(aud=[]), "invalid_token", id="empty-aud-list"),
    pytest.param(lambda idp, now: idp.token(aud=...), "invalid_token", id="missing-aud"),
    pytest.param(lambda idp, now: idp.token(aud=7), "invalid_token", id="aud-number"),
    pytest.param(lambda idp, now: idp.token(aud=[AUDIENCE, 7]), "invalid_token", id="aud-list-number"),
    pytest.param(lambda idp, now: idp.token(aud="MESH"), "invalid_token", id="aud-case"),
    pytest.param(lambda idp, now: idp.token(iat=now - 4000, exp=now - 3600), "token_expired", id="expired"),
    pytest.param(lambda idp, now: idp.token(iat=now - 600, exp=now - 31), "token_expired",
                 id="expired-past-leeway"),
    pytest.param(lambda idp, now: idp.token(nbf=now + 3600), "invalid_token", id="nbf-future"),
    pytest.param(lambda idp, now: idp.token(iat=now + 600, exp=now + 1200), "invalid_token", id="iat-future"),
    pytest.param(lambda idp, now: idp.token(auth_time=now + 600), "invalid_token", id="auth-time-future"),
    pytest.param(lambda idp, now: idp.token(iat=now, exp=now + 7200), "invalid_token", id="lifetime-too-long"),
    pytest.param(lambda idp, now: idp.token(iat=now + 20, exp=now + 10), "invalid_token", id="exp-before-iat"),
    pytest.param(lambda idp, now: idp.token(iat=...), "invalid_token", id="missing-iat-with-lifetime"),
    pytest.param(lambda idp, now: idp.token(exp=...), "invalid_token", id="missing-exp"),
    pytest.param(lambda idp, now: idp.token(headers={"crit": ["exp"]}), "invalid_token", id="crit-header"),
    pytest.param(lambda idp, now: idp.token(headers={"crit": []}), "invalid_token", id="crit-empty"),
    pytest.param(lambda idp, now: raw_signed(idp, duplicate_claim_json(idp, "sub", '"admin"')), "invalid_token",
                 id="duplicate-sub"),
    pytest.param(lambda idp, now: raw_signed(idp, duplicate_claim_json(idp, "exp", str(now + 99999))), "invalid_token",
                 id="duplicate-exp"),
    pytest.param(lambda idp, now: raw_signed(idp, duplicate_claim_json(idp, "aud", '"mesh"')), "invalid_token",
                 id="duplicate-aud"),
    pytest.param(lambda idp, now: raw_signed(idp, "[1, 2]"), "invalid_token", id="payload-list"),
    pytest.param(lambda idp, now: raw_signed(idp, '"alice"'), "invalid_token", id="payload-string"),
    pytest.param(lambda idp, now: raw_signed(idp, "42"), "invalid_token", id="payload-number"),
    pytest.param(lambda idp, now: raw_signed(idp, "null"), "invalid_token", id="payload-null"),
    pytest.param(lambda idp, now: raw_signed(idp, "not json"), "invalid_token", id="payload-not-json"),
    pytest.param(lambda idp, now: raw_signed(idp, b"\xff\xfe\x00{"), "invalid_token", id="payload-not-utf8"),
    pytest.param(lambda idp, now: raw_signed(idp, ""), "invalid_token", id="payload-empty"),
    pytest.param(lambda idp, now: raw_signed(idp, json.dumps(idp.claims()).encode("utf-16")), "invalid_token",
                 id="payload-utf16"),
    pytest.param(lambda idp, now: raw_signed(idp, json.dumps(idp.claims()).encode("utf-8-sig")), "invalid_token",
                 id="payload-utf8-bom"),
    pytest.param(lambda idp, now: f"{b64url(b'[]')}.{segment(idp.claims())}.AAAA", "invalid_token",
                 id="header-list"),
    pytest.param(lambda idp, now: f"{b64url(b'{')}.{segment(idp.claims())}.AAAA", "invalid_token",
                 id="header-not-json"),
    pytest.param(lambda idp, now: "a.b.c", "invalid_token", id="garbage-base64"),
    pytest.param(lambda idp, now: "!!!.???.***", "invalid_token", id="garbage-characters"),
    pytest.param(lambda idp, now: "e30.e30.e30", "invalid_token", id="empty-objects"),
    pytest.param(lambda idp, now: "", "invalid_token", id="empty"),
    pytest.param(lambda idp, now: "..", "invalid_token", id="dots-only"),
    pytest.param(lambda idp, now: ".".join(idp.token().split(".")[:2]), "invalid_token", id="two-parts"),
    pytest.param(lambda idp, now: idp.token() + ".AAAA", "invalid_token", id="four-parts"),
    pytest.param(lambda idp, now: idp.token() + ".AAAA.AAAA", "invalid_token", id="five-parts"),
    pytest.param(lambda idp, now: idp.token().rsplit(".", 1)[0] + ".", "invalid_token", id="signature-empty"),
    pytest.param(lambda idp, now: idp.token() + "=", "invalid_token", id="base64-padding"),
    pytest.param(lambda idp, now: idp.token() + "\n", "invalid_token", id="trailing-newline"),
    pytest.param(lambda idp, now: " " + idp.token(), "invalid_token", id="leading-space"),
    pytest.param(lambda idp, now: idp.token()[:-4] + "AAAA", "invalid_token", id="signature-altered"),
    pytest.param(lambda idp, now: idp.token().rsplit(".", 1)[0] + "." + b64url(b"\x00" * 64), "invalid_token",
                 id="signature-zero"),
    pytest.param(lambda idp, now: idp.token().rsplit(".", 1)[0] + "." + b64url(b"\x01" * 63), "invalid_token",
                 id="signature-short"),
    pytest.param(lambda idp, now: idp.token().rsplit(".", 1)[0] + "." + b64url(b"\x01" * 65), "invalid_token",
                 id="signature-long"),
    pytest.param(lambda idp, now: non_canonical_signature_token(idp), "invalid_token", id="signature-non-canonical"),
    pytest.param(lambda idp, now: non_canonical_payload_token(idp), "invalid_token", id="payload-non-canonical"),
    pytest.param(lambda idp, now: raw_signed(idp, json.dumps(idp.claims()), b64=False), "invalid_token",
                 id="b64-false"),
    pytest.param(lambda idp, now: tampered_token(idp), "invalid_token", id="payload-tampered"),
    pytest.param(lambda idp, now: other_key_token(idp), "invalid_token", id="other-key-same-kid"),
    pytest.param(lambda idp, now: rsa_token(idp), "invalid_token", id="rs256-not-allowed"),
    pytest.param(lambda idp, now: TestIdP(OTHER_ISSUER).token(), "invalid_token", id="other-issuer"),
    pytest.param(lambda idp, now: TestIdP().token(), "invalid_token", id="other-idp-same-iss"),
    pytest.param(lambda idp, now: idp.token(sub=...), "invalid_token", id="missing-sub"),
    pytest.param(lambda idp, now: idp.token(sub=""), "invalid_token", id="empty-sub"),
    pytest.param(lambda idp, now: idp.token(sub=7), "invalid_token", id="sub-number"),
    pytest.param(lambda idp, now: idp.token(sub=None), "invalid_token", id="sub-null"),
    pytest.param(lambda idp, now: idp.token(acr=["urn:test:mfa"]), "invalid_token", id="acr-list"),
    pytest.param(lambda idp, now: idp.token(amr="pwd otp".split(" ") + [1]), "invalid_token", id="amr-number"),
    pytest.param(lambda idp, now: idp.token(amr={"pwd": True}), "invalid_token", id="amr-object"),
    pytest.param(lambda idp, now: idp.token(azp=7), "invalid_token", id="azp-number"),
    pytest.param(lambda idp, now: idp.token(sid=["s"]), "invalid_token", id="sid-list"),
]


@pytest.mark.parametrize(("build", "code"), HOSTILE_TOKENS)
def test_verify_hostile_token(tmp_path, idp, build, code):
    verifier = make_verifier(tmp_path, idp)
    token = build(idp, int(verifier.clock()))
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    assert caught.value.code == code


_BAD_DATES = [
    pytest.param('"1700000000"', id="string"),
    pytest.param("[1700000000]", id="list"),
    pytest.param("{}", id="object"),
    pytest.param("null", id="null"),
    pytest.param("true", id="true"),
    pytest.param("false", id="false"),
    pytest.param("-1", id="negative"),
    pytest.param("1e300", id="1e300"),
    pytest.param(str(10**30), id="10e30"),
    pytest.param("1" + "0" * 400, id="10e400"),
    pytest.param("1e400", id="1e400-overflow"),
    pytest.param("NaN", id="nan"),
    pytest.param("Infinity", id="infinity"),
    pytest.param("-Infinity", id="minus-infinity"),
]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat", "auth_time"])
@pytest.mark.parametrize("raw_value", _BAD_DATES)
def test_verify_bad_date(tmp_path, idp, claim, raw_value):
    verifier = make_verifier(tmp_path, idp)
    token = raw_signed(idp, claims_json(idp, claim, raw_value))
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    assert caught.value.code == "invalid_token"


def test_verify_kid_of_other_algorithm(tmp_path, idp):
    # The issuer allows ES384 too, but the key named by `kid` is an ES256 key.
    verifier = make_verifier(tmp_path, idp, algorithms=("ES256", "ES384"))
    key = ec.generate_private_key(ec.SECP384R1())
    token = jwt.encode(idp.claims(), key, algorithm="ES384", headers={"kid": idp.kid})
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    assert caught.value.code == "invalid_token"


def test_verify_trailing_newline_es384(tmp_path, idp):
    # A 128-character ES384 signature plus a newline still has a valid base64 length: only the exact
    # token pattern, or the alphabet check of recent pyjwt releases, rejects the newline.
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "p384", "alg": "ES384", "use": "sig"}
    keys = load_issuer(tmp_path, {"keys": [jwk]}, algorithms=("ES384",))
    verifier = TokenVerifier({ISSUER: keys}, 100, FakeClock())
    token = jwt.encode(idp.claims(), key, algorithm="ES384", headers={"kid": "p384"})
    assert verifier.verify(token).subject == "alice"

    with pytest.raises(TokenError) as caught:
        verifier.verify(token + "\n")
    assert caught.value.code == "invalid_token"


def test_verify_eddsa_issuer(tmp_path, idp):
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = {**public_jwk(key, "EdDSA"), "kid": "ed"}
    keys = load_issuer(tmp_path, {"keys": [jwk]}, algorithms=("EdDSA",))
    verifier = TokenVerifier({ISSUER: keys}, 100, FakeClock())
    token = jwt.encode(idp.claims(), key, algorithm="EdDSA", headers={"kid": "ed"})
    assert verifier.verify(token).subject == "alice"

    header, payload, signature = token.split(".")
    for forged in (f"{header}.{segment(idp.claims(sub='admin'))}.{signature}",
                   f"{header}.{payload}.{b64url(bytes(64))}",
                   f"{header}.{payload}.{b64url(bytes(63))}",
                   jwt.encode(idp.claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA",
                              headers={"kid": "ed"})):
        with pytest.raises(TokenError) as caught:
            verifier.verify(forged)
        assert caught.value.code == "invalid_token"


def test_verify_cross_issuer_key(tmp_path, idp):
    # A token claiming the second issuer but signed with the first issuer's key and kid.
    other = TestIdP(OTHER_ISSUER)
    verifier = TokenVerifier({
        idp.issuer: load_issuer(tmp_path, idp.jwks()),
        other.issuer: load_issuer(tmp_path, other.jwks(), issuer=OTHER_ISSUER),
    }, 100, FakeClock())
    token = idp.token(iss=OTHER_ISSUER)
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    assert caught.value.code == "invalid_token"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from([10**30, 10**400, -(10**400), 1e300, 95_617_584_001]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)
_CLAIM_NAMES = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "auth_time", "acr", "amr", "azp", "sid",
                                "jti"])
_HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=st.dictionaries(_CLAIM_NAMES, _JSON_VALUES, max_size=4),
       header=st.dictionaries(_HEADER_NAMES, _JSON_VALUES, max_size=2))
def test_verify_property_only_token_error(tmp_path, idp, claims, header):
    verifier = make_verifier(tmp_path, idp)
    payload = json.dumps({**idp.claims(), **claims}, allow_nan=False)
    token = raw_signed(idp, payload, **header)
    try:
        user = verifier.verify(token)
    except TokenError as exc:
        assert exc.code in ("invalid_token", "token_expired")
        return
    assert user.issuer == ISSUER
    assert AUDIENCE in user.audiences


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=40), st.binary(max_size=40), st.binary(max_size=40))
def test_verify_property_random_segments(tmp_path, idp, header, payload, signature):
    verifier = make_verifier(tmp_path, idp)
    with pytest.raises(TokenError) as caught:
        verifier.verify(f"{b64url(header)}.{b64url(payload)}.{b64url(signature)}")
    assert caught.value.code == "invalid_token"


# --- TokenVerifier: the verified-token cache --------------------------------------------------


def test_cache_returns_same_user(tmp_path, idp):
    verifier = make_verifier(tmp_path, idp)
    token = idp.token()
    first = verifier.verify(token)
    second = verifier.verify(token)
    assert second is first


def test_cache_disabled_verifies_again(tmp_path, idp):
    verifier = make_verifier(tmp_path, idp, cache_size=0)
    token = idp.token()
    first = verifier.verify(token)
    second = verifier.verify(token)
    assert second is not first
    assert second == first


def test_cache_expired_token_rejected(tmp_path, idp):
    clock = FakeClock()
    verifier = make_verifier(tmp_path, idp, clock=clock)
    now = int(clock.now)
    token = idp.token(iat=now, exp=now + 60)
    assert verifier.verify(token).subject == "alice"

    clock.now = now + 60 + 29
    assert verifier.verify(token).subject == "alice"

    clock.now = now + 60 + 31
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    assert caught.value.code == "token_expired"


def test_cache_rejects_before_nbf(tmp_path, idp):
    # A token verified once must still be checked against nbf when the clock runs backwards.
    clock = FakeClock()
    verifier = make_verifier(tmp_path, idp, clock=clock)
    now = int(clock.now)
    token = idp.token(iat=now, nbf=now, exp=now + 600)
    assert verifier.verify(token).subject == "alice"

    clock.now = now - 3600
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    assert caught.value.code == "invalid_token"


def test_cache_failures_not_cached(tmp_path, idp):
    verifier = make_verifier(tmp_path, idp)
    token = idp.token(aud="other")
    for _ in range(2):
        with pytest.raises(TokenError) as caught:
            verifier.verify(token)
        assert caught.value.code == "invalid_token"


def test_cache_bounded(tmp_path, idp):
    cache_size = 4
    verifier = make_verifier(tmp_path, idp, cache_size=cache_size)
    tokens = [idp.token(jti=f"jti-{index}") for index in range(cache_size * 5)]
    for token in tokens:
        verifier.verify(token)
        # White-box check: nothing outside the verifier reports the cache's size.
        assert len(verifier._cache) <= cache_size

    assert verifier.verify(tokens[-1]) is verifier.verify(tokens[-1])


def test_cache_eviction_frees_quarter(tmp_path, idp):
    # Each eviction pass frees a quarter of the cache, so the next quarter of new tokens is stored
    # without walking the cache again.
    cache_size = 8
    verifier = make_verifier(tmp_path, idp, cache_size=cache_size)
    for index in range(cache_size):
        verifier.verify(idp.token(jti=f"fill-{index}"))
    assert len(verifier._cache) == cache_size

    verifier.verify(idp.token(jti="one-more"))
    assert len(verifier._cache) == cache_size - cache_size // 4 + 1


def test_cache_evicts_expired_first(tmp_path, idp):
    clock = FakeClock()
    verifier = make_verifier(tmp_path, idp, cache_size=4, clock=clock)
    now = int(clock.now)
    short = idp.token(iat=now, exp=now + 10, jti="short")
    long_lived = [idp.token(iat=now, exp=now + 3000, jti=f"long-{index}") for index in range(3)]
    verifier.verify(short)
    users = [verifier.verify(token) for token in long_lived]

    clock.now = now + 20
    verifier.verify(idp.token(iat=now + 20, exp=now + 3000, jti="new"))

    for token, user in zip(long_lived, users, strict=True):
        assert verifier.verify(token) is user
