"""The per-request token: a Transaction Token (draft-ietf-oauth-transaction-tokens) for one backend.

Header: `typ: txntoken+jwt`, `alg`, `kid`. Claims:

    iss      token.issuer from the configuration
    iat/exp  now and now + the route's TTL (at most token.ttl)
    aud      extauthz.io/token-audience, else the request's host
    sub      the end user's `sub`; the workload principal when there is no end user;
             `anonymous` when there is neither
    txn, jti the decision id, unique per Check
    scope    extauthz.io/token-scope (space-separated), when set
    req_wl   the calling workload's principal, when known
    tctx     {method, host, path}: the normalised request this token is good for
    rctx     {req_ip, and the login's acr, amr and auth_time when there is an end user}
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from extauthz.config import TokenConfig
from extauthz.identity import EndUser
from extauthz.keys import KeyRing, SigningKey
from extauthz.policy import Requirements
from extauthz.request import HttpRequest

TOKEN_TYPE = "txntoken+jwt"
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# An ES256 signature is r || s, each a 32-byte big-endian integer (RFC 7518 section 3.4).
_P256_INTEGER_BYTES = 32


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str = field(repr=False)
    jti: str
    audience: str
    expires_at: int
    kid: str


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def header_segment(key: SigningKey) -> bytes:
    """Return the encoded JWS header for tokens that `key` signs, with the trailing dot."""
    header = {"alg": key.algorithm, "kid": key.kid, "typ": TOKEN_TYPE}
    return _b64url(orjson.dumps(header, option=orjson.OPT_SORT_KEYS)) + b"."


def sign(key: SigningKey, signing_input: bytes) -> bytes:
    """Return the JWS signature of `signing_input`: raw r || s for ES256, the Ed25519 signature for EdDSA."""
    if key.algorithm == "ES256":
        r, s = decode_dss_signature(key.private_key.sign(signing_input, _ECDSA_SHA256))  # type: ignore[call-arg]
        return r.to_bytes(_P256_INTEGER_BYTES, "big") + s.to_bytes(_P256_INTEGER_BYTES, "big")
    return key.private_key.sign(signing_input)  # type: ignore[call-arg]


class TokenMinter:
    def __init__(self, config: TokenConfig, keys: KeyRing, clock: Callable[[], float]):
        self.config = config
        self.keys = keys
        self.clock = clock
        # The current key and its encoded header, replaced together when the key ring rotates.
        self._header: tuple[SigningKey | None, bytes] = (None, b"")

    def mint(self, txn: str, request: HttpRequest, user: EndUser | None, requirements: Requirements) -> MintedToken:
        issued_at = int(self.clock())
        ttl = self.config.ttl if requirements.token_ttl is None else min(requirements.token_ttl, self.config.ttl)
        expires_at = issued_at + max(1, math.floor(ttl))
        audience = requirements.token_audience or request.host

        if user is not None:
            subject = user.subject
        else:
            subject = request.source_principal or "anonymous"

        requester: dict[str, Any] = {"req_ip": request.source_address}
        if user is not None:
            if user.acr is not None:
                requester["acr"] = user.acr
            if user.amr:
                requester["amr"] = list(user.amr)
            if user.auth_time is not None:
                requester["auth_time"] = int(user.auth_time)

        claims: dict[str, Any] = {
            "iss": self.config.issuer,
            "iat": issued_at,
            "exp": expires_at,
            "aud": audience,
            "sub": subject,
            "txn": txn,
            "jti": txn,
            "tctx": {"method": request.method, "host": request.host, "path": request.path},
            "rctx": requester,
        }
        if requirements.token_scope is not None:
            claims["scope"] = " ".join(sorted(requirements.token_scope))
        if request.source_principal:
            claims["req_wl"] = request.source_principal

        key = self.keys.current()
        cached_key, header = self._header
        if cached_key is not key:
            header = header_segment(key)
            self._header = (key, header)
        signing_input = header + _b64url(orjson.dumps(claims))
        token = signing_input + b"." + _b64url(sign(key, signing_input))
        return MintedToken(token=token.decode("ascii"), jti=txn, audience=audience, expires_at=expires_at,
                           kid=key.kid)
