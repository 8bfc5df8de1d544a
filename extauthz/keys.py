"""Signing keys for minted tokens: generation, rotation with overlap, and the published JWKS.

Keys are generated in memory unless `token.signing.key_file` names a PEM private key (which then is
never rotated). The key ring contains three kinds of key:

- current: signs every new token;
- next: generated one rotation period ahead and already published, so a backend that fetched
  the JWKS within the last period knows a key before it signs anything;
- retired: earlier keys, published until every token they signed has expired
  (retired time + the longest token TTL + one minute of clock skew).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from extauthz.config import SigningConfig
from extauthz.errors import ConfigError

log = logging.getLogger(__name__)

CLOCK_SKEW = 60.0
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: PrivateKey
    public_jwk: dict[str, Any]


def generate_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {algorithm!r}")


def public_jwk(private_key: PrivateKey, algorithm: str) -> dict[str, Any]:
    """Return the public half as a JWK with `kid` set to its RFC 7638 thumbprint."""
    public_key = private_key.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        required = ("crv", "kty", "x", "y")
    else:
        jwk = OKPAlgorithm.to_jwk(public_key, as_dict=True)
        required = ("crv", "kty", "x")
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    return {**{name: jwk[name] for name in required}, "kid": thumbprint, "alg": algorithm, "use": "sig"}


def make_signing_key(private_key: PrivateKey, algorithm: str) -> SigningKey:
    jwk = public_jwk(private_key, algorithm)
    return SigningKey(jwk["kid"], algorithm, private_key, jwk)


def load_key_file(path: Path, algorithm: str) -> SigningKey:
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(str(path), "token.signing.key_file", f"cannot load a PEM private key: {exc}",
                          "write an unencrypted PKCS#8 PEM key") from exc
    expected = ec.EllipticCurvePrivateKey if algorithm == "ES256" else ed25519.Ed25519PrivateKey
    if not isinstance(private_key, expected) or (
            algorithm == "ES256" and private_key.curve.name != "secp256r1"):  # type: ignore[union-attr]
        raise ConfigError(str(path), "token.signing.key_file", f"the key does not fit {algorithm}",
                          "use a P-256 key for ES256 or an Ed25519 key for EdDSA")
    return make_signing_key(private_key, algorithm)


class KeyRing:
    """The signing keys and their JWKS, rotated on first use after each `rotate_every`."""

    def __init__(self, config: SigningConfig, max_token_ttl: float, clock: Callable[[], float] = time.time):
        self.config = config
        self.max_token_ttl = max_token_ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._retired: list[tuple[SigningKey, float]] = []
        self._next: SigningKey | None = None

        now = clock()
        if config.key_file is not None:
            self._current = load_key_file(config.key_file, config.algorithm)
            self._rotate_at = float("inf")
        else:
            self._current = self._generate()
            self._next = self._generate()
            self._rotate_at = now + config.rotate_every
        self._jwks = self._render()
        log.info("signing key ready", extra={"kid": self._current.kid, "algorithm": config.algorithm})

    def _generate(self) -> SigningKey:
        return make_signing_key(generate_private_key(self.config.algorithm), self.config.algorithm)

    def current(self) -> SigningKey:
        if self.clock() >= self._rotate_at:
            self._rotate()
        return self._current

    def _rotate(self) -> None:
        with self._lock:
            now = self.clock()
            if now < self._rotate_at:
                return
            assert self._next is not None
            self._retired.append((self._current, now + self.max_token_ttl + CLOCK_SKEW))
            self._current = self._next
            self._next = self._generate()
            self._rotate_at = now + self.config.rotate_every
            self._jwks = self._render()
        log.info("signing key rotated", extra={"kid": self._current.kid})

    def _render(self) -> bytes:
        now = self.clock()
        self._retired = [(key, until) for key, until in self._retired if until > now]
        keys = [self._current] + ([self._next] if self._next else []) + [key for key, _ in self._retired]
        self._public_keys = [key.public_jwk for key in keys]
        return json.dumps({"keys": self._public_keys}, separators=(",", ":")).encode()

    def public_keys(self) -> list[dict[str, Any]]:
        """Return the public JWKs this replica publishes: current, next and still-valid retired keys."""
        self.jwks()
        return list(self._public_keys)

    def jwks(self) -> bytes:
        """Return the JWKS document: current, next and still-valid retired keys."""
        self.current()
        if self._retired and self._retired[0][1] <= self.clock():
            with self._lock:
                self._jwks = self._render()
        return self._jwks
