"""KeyRing: RFC 7638 key ids, the published JWKS, rotation with overlap, and PEM key files."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extauthz.config import SigningConfig
from extauthz.errors import ConfigError
from extauthz.keys import KeyRing, generate_private_key, public_jwk

START = 1_900_000_000.0
ROTATE_EVERY = 3600.0
MAX_TTL = 30.0
# Retired keys stay published for the longest token TTL plus this allowance for clock skew.
CLOCK_SKEW = 60.0


class FakeClock:
    """A clock that moves only when a test sets or advances it."""

    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """Compute the RFC 7638 thumbprint from the key's raw numbers, without pyjwt."""
    public_key = private_key.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        x = b64url(numbers.x.to_bytes(32, "big"))
        y = b64url(numbers.y.to_bytes(32, "big"))
        canonical = f'{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}'
    else:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{b64url(raw)}"}}'
    return b64url(hashlib.sha256(canonical.encode()).digest())


def make_ring(algorithm: str = "ES256", key_file: Path | None = None,
              clock: FakeClock | None = None) -> tuple[KeyRing, FakeClock]:
    clock = clock or FakeClock()
    config = SigningConfig(algorithm=algorithm, rotate_every=ROTATE_EVERY, key_file=key_file)
    return KeyRing(config, MAX_TTL, clock=clock), clock


def published_kids(ring: KeyRing) -> list[str]:
    return [key["kid"] for key in json.loads(ring.jwks())["keys"]]


def sign(ring: KeyRing, claims: dict[str, Any] | None = None) -> str:
    key = ring.current()
    return jwt.encode(claims or {"sub": "test"}, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})


def verify_with_jwks(token: str, jwks: bytes) -> dict[str, Any]:
    """Verify a token the way a backend does: pick the key by kid from the published JWKS."""
    kid = jwt.get_unverified_header(token)["kid"]
    key_set = jwt.PyJWKSet.from_json(jwks.decode())
    key = key_set[kid]
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name])


def write_pem(path: Path, private_key: Any, password: bytes | None = None) -> Path:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    path.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               encryption))
    return path


# --- key ids and the JWK -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_kid_is_thumbprint(algorithm):
    private_key = generate_private_key(algorithm)
    assert public_jwk(private_key, algorithm)["kid"] == thumbprint(private_key)


@pytest.mark.parametrize("secret", [379, 43])
def test_kid_with_short_coordinate(secret):
    # These small secrets give P-256 public keys whose x (379) or y (43) has a leading zero byte,
    # which RFC 7518 requires the JWK to keep.
    private_key = ec.derive_private_key(secret, ec.SECP256R1())
    jwk = public_jwk(private_key, "ES256")
    assert len(base64.urlsafe_b64decode(jwk["x"] + "=")) == 32
    assert len(base64.urlsafe_b64decode(jwk["y"] + "=")) == 32
    assert jwk["kid"] == thumbprint(private_key)


def test_kid_rfc8037_example():
    # The Ed25519 key of RFC 8037 appendix A.1 and its thumbprint from appendix A.3.
    seed = base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    private_key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    jwk = public_jwk(private_key, "EdDSA")
    assert jwk["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert jwk["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("ES256", {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig"}),
        ("EdDSA", {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig"}),
    ],
)
def test_jwk_fields(algorithm, expected):
    jwk = public_jwk(generate_private_key(algorithm), algorithm)
    assert {name: jwk[name] for name in expected} == expected
    assert "d" not in jwk


def test_ring_kid_is_thumbprint():
    ring, _ = make_ring()
    key = ring.current()
    assert key.kid == thumbprint(key.private_key)


# --- the published JWKS and rotation -----------------------------------------------------------------


def test_jwks_has_current_and_next():
    ring, _ = make_ring()
    kids = published_kids(ring)
    assert len(kids) == 2
    assert kids[0] == ring.current().kid
    assert kids[1] != kids[0]


def test_jwks_keys_are_public():
    ring, _ = make_ring()
    for jwk in json.loads(ring.jwks())["keys"]:
        assert "d" not in jwk


def test_no_rotation_before_period():
    ring, clock = make_ring()
    kid = ring.current().kid
    clock.now = START + ROTATE_EVERY - 1
    assert ring.current().kid == kid
    assert len(published_kids(ring)) == 2


def test_rotation_makes_next_current():
    ring, clock = make_ring()
    first, upcoming = published_kids(ring)
    clock.now = START + ROTATE_EVERY
    assert ring.current().kid == upcoming

    kids = published_kids(ring)
    assert kids[0] == upcoming
    assert first in kids
    assert len(kids) == 3


def test_rotation_publishes_new_next():
    ring, clock = make_ring()
    before = set(published_kids(ring))
    clock.now = START + ROTATE_EVERY
    ring.current()
    after = published_kids(ring)
    assert len(set(after) - before) == 1
    assert after[1] not in before


def test_jwks_rotates_without_signing():
    ring, clock = make_ring()
    upcoming = published_kids(ring)[1]
    clock.now = START + ROTATE_EVERY
    assert published_kids(ring)[0] == upcoming


def test_retired_key_published_until_expiry():
    ring, clock = make_ring()
    first = ring.current().kid
    rotated_at = START + ROTATE_EVERY + 10
    clock.now = rotated_at
    ring.current()
    until = rotated_at + MAX_TTL + CLOCK_SKEW

    clock.now = until - 1
    assert first in published_kids(ring)

    clock.now = until
    assert first not in published_kids(ring)


def test_two_rotations_keep_both_retired():
    config = SigningConfig(algorithm="ES256", rotate_every=60.0, key_file=None)
    clock = FakeClock()
    ring = KeyRing(config, 120.0, clock=clock)
    first = ring.current().kid
    clock.now = START + 60
    second = ring.current().kid
    clock.now = START + 120
    third = ring.current().kid

    kids = published_kids(ring)
    assert kids[0] == third
    assert first in kids
    assert second in kids

    # The first key retired at START + 60 and is dropped after its TTL and the clock skew.
    clock.now = START + 60 + 120 + CLOCK_SKEW
    kids = published_kids(ring)
    assert first not in kids
    assert second in kids


def test_token_before_rotation_verifies():
    ring, clock = make_ring()
    token = sign(ring, {"sub": "before"})
    clock.now = START + ROTATE_EVERY
    assert ring.current().kid != jwt.get_unverified_header(token)["kid"]
    assert verify_with_jwks(token, ring.jwks())["sub"] == "before"


def test_cached_jwks_verifies_next_key():
    ring, clock = make_ring()
    cached_jwks = ring.jwks()
    clock.now = START + ROTATE_EVERY
    token = sign(ring, {"sub": "after"})
    assert verify_with_jwks(token, cached_jwks)["sub"] == "after"


def test_token_after_retirement_fails():
    ring, clock = make_ring()
    token = sign(ring)
    clock.now = START + ROTATE_EVERY
    ring.current()
    clock.now = START + ROTATE_EVERY + MAX_TTL + CLOCK_SKEW
    with pytest.raises(KeyError):
        verify_with_jwks(token, ring.jwks())


def test_eddsa_ring_signs_and_verifies():
    ring, _ = make_ring("EdDSA")
    jwks = json.loads(ring.jwks())
    assert [jwk["kty"] for jwk in jwks["keys"]] == ["OKP", "OKP"]
    token = sign(ring, {"sub": "ed"})
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert verify_with_jwks(token, ring.jwks())["sub"] == "ed"


def test_es256_ring_signs_and_verifies():
    ring, _ = make_ring("ES256")
    token = sign(ring, {"sub": "ec"})
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert verify_with_jwks(token, ring.jwks())["sub"] == "ec"


# --- key files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "private_key"),
    [("ES256", ec.generate_private_key(ec.SECP256R1())), ("EdDSA", ed25519.Ed25519PrivateKey.generate())],
)
def test_key_file_used(tmp_path, algorithm, private_key):
    path = write_pem(tmp_path / "signing.pem", private_key)
    ring, _ = make_ring(algorithm, key_file=path)
    assert ring.current().kid == thumbprint(private_key)
    assert published_kids(ring) == [thumbprint(private_key)]
    assert verify_with_jwks(sign(ring, {"sub": "file"}), ring.jwks())["sub"] == "file"


def test_key_file_never_rotated(tmp_path):
    private_key = ec.generate_private_key(ec.SECP256R1())
    ring, clock = make_ring(key_file=write_pem(tmp_path / "signing.pem", private_key))
    clock.now = START + 100 * ROTATE_EVERY
    assert ring.current().kid == thumbprint(private_key)
    assert published_kids(ring) == [thumbprint(private_key)]


@pytest.mark.parametrize(
    ("algorithm", "private_key"),
    [
        ("ES256", ed25519.Ed25519PrivateKey.generate()),
        ("ES256", ec.generate_private_key(ec.SECP384R1())),
        ("ES256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("EdDSA", ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_wrong_key_type_rejected(tmp_path, algorithm, private_key):
    path = write_pem(tmp_path / "signing.pem", private_key)
    with pytest.raises(ConfigError) as caught:
        make_ring(algorithm, key_file=path)
    assert caught.value.key == "token.signing.key_file"
    assert caught.value.message == f"the key does not fit {algorithm}"


def test_unreadable_key_file_rejected(tmp_path):
    path = tmp_path / "signing.pem"
    path.write_text("not a key\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        make_ring(key_file=path)
    assert caught.value.source == str(path)
    assert caught.value.fix == "write an unencrypted PKCS#8 PEM key"


def test_encrypted_key_file_rejected(tmp_path):
    path = write_pem(tmp_path / "signing.pem", ec.generate_private_key(ec.SECP256R1()), password=b"secret")
    with pytest.raises(ConfigError) as caught:
        make_ring(key_file=path)
    assert caught.value.key == "token.signing.key_file"


def test_unsupported_generated_algorithm():
    with pytest.raises(ValueError, match="RS256"):
        generate_private_key("RS256")
