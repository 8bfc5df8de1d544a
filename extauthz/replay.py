"""One-time end-user tokens: a route annotated `extauthz.io/one-time-token: "true"` accepts each
token once, across every replica.

The token's `iss` and `jti` are claimed atomically in the store until the token expires. A second
use is denied with 401 `token_replayed`, with one exception: Envoy may retry a Check whose response it
did not get (a gRPC retry policy on the ext_authz cluster, or a timeout). A second Check counts as
that retry, and is allowed again, only when it comes within RETRY_WINDOW seconds of the first and
carries the same `x-request-id`, source principal, source address, method, host and path. Any other
second use, from any caller, is a replay. A token without a `jti` cannot be claimed and is denied.
"""

from __future__ import annotations

import hashlib

from extauthz.errors import TokenError
from extauthz.identity import EndUser
from extauthz.request import HttpRequest
from extauthz.store import CLAIMED, RETRY, KeyNames, Store

RETRY_WINDOW = 10.0


def request_fingerprint(request: HttpRequest) -> str:
    """Return a digest of the facts that a retry of the same request repeats exactly."""
    parts = (request.request_id, request.source_principal, request.source_address,
             request.method, request.host, request.path)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class ReplayGuard:
    def __init__(self, store: Store, keys: KeyNames):
        self.store = store
        self.keys = keys

    def claim(self, user: EndUser, request: HttpRequest, now: float, leeway: float) -> bool:
        """Claim the token for this request; return True for a recognised retry, raise on a replay.

        Raises TokenError(token_replayed), TokenError(invalid_token) for a token without `jti`, and
        StoreError when the store does not reply.
        """
        if not user.token_id:
            raise TokenError("invalid_token", "one-time token route needs a jti claim")
        digest = hashlib.sha256(f"{user.issuer}\0{user.token_id}".encode()).hexdigest()
        # A request id is what tells a retry apart; without one every second use is a replay.
        fingerprint = request_fingerprint(request) if request.request_id else f"no-request-id:{now}"
        ttl = max(1.0, user.expires_at + leeway - now)
        result = self.store.claim_once(self.keys.one_time(digest), fingerprint, ttl, now, RETRY_WINDOW)
        if result == CLAIMED:
            return False
        if result == RETRY:
            return True
        raise TokenError("token_replayed", "one-time token already used")
