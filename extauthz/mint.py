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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt

from extauthz.config import TokenConfig
from extauthz.identity import EndUser
from extauthz.keys import KeyRing
from extauthz.policy import Requirements
from extauthz.request import HttpRequest

TOKEN_TYPE = "txntoken+jwt"


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str = field(repr=False)
    jti: str
    audience: str
    expires_at: int
    kid: str


class TokenMinter:
    def __init__(self, config: TokenConfig, keys: KeyRing, clock: Callable[[], float]):
        self.config = config
        self.keys = keys
        self.clock = clock

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
        token = jwt.encode(claims, key.private_key, algorithm=key.algorithm,
                           headers={"kid": key.kid, "typ": TOKEN_TYPE})
        return MintedToken(token=token, jti=txn, audience=audience, expires_at=expires_at, kid=key.kid)
