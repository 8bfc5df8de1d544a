"""Exceptions and the stable reason codes that every deny carries.

A reason code is snake_case and never changes meaning: it appears in the HTTP body, the decision log
and metric labels. REASONS maps each code to the HTTP status Envoy sends and to the RFC 6750 / RFC 9470
error that goes into the `WWW-Authenticate` challenge (None means no challenge).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    status: int
    oauth_error: str | None
    description: str


_REASON_LIST = [
    Reason("allowed", 200, None, "The request is allowed."),
    Reason("invalid_request", 400, None, "The request is malformed."),
    Reason("invalid_path", 400, None, "The request path is ambiguous or malformed."),
    Reason("invalid_host", 400, None, "The request host is malformed."),
    Reason("invalid_authorization_header", 400, "invalid_request",
           "The Authorization header is not a single Bearer token."),
    Reason("missing_token", 401, None, "An end-user bearer token is required."),
    Reason("invalid_token", 401, "invalid_token", "The bearer token is invalid."),
    Reason("token_expired", 401, "invalid_token", "The bearer token has expired."),
    Reason("token_revoked", 401, "invalid_token", "The bearer token has been revoked."),
    Reason("token_replayed", 401, "invalid_token", "The one-time bearer token has already been used."),
    Reason("insufficient_user_authentication", 401, "insufficient_user_authentication",
           "A more recent or stronger login is required."),
    Reason("no_matching_policy", 403, None, "No policy allows this request."),
    Reason("policy_conflict", 403, None, "The policies that match this request conflict."),
    Reason("non_http_request", 403, None, "Only HTTP requests can be authorized."),
    Reason("internal_error", 500, None, "The authorization server failed."),
    Reason("state_unavailable", 503, None, "The authorization state store is unavailable."),
    Reason("secret_unavailable", 503, None, "A credential for the upstream is unavailable."),
    Reason("audit_unavailable", 503, None, "The decision could not be recorded."),
]

REASONS: dict[str, Reason] = {reason.code: reason for reason in _REASON_LIST}


class ExtauthzError(Exception):
    """Root of every exception that extauthz raises on purpose."""


class ConfigError(ExtauthzError):
    """Invalid configuration or policy: names the file, the key and the fix."""

    def __init__(self, source: str, key: str, message: str, fix: str | None = None):
        self.source = source
        self.key = key
        self.message = message
        self.fix = fix
        text = f"{source}: {key}: {message}" if key else f"{source}: {message}"
        if fix:
            text = f"{text} ({fix})"
        super().__init__(text)


class DecisionLogError(ExtauthzError):
    """A decision log that cannot be set up: names the `decision_log` key and the fix."""

    def __init__(self, key: str, message: str, fix: str | None = None):
        self.key = key
        self.message = message
        self.fix = fix
        super().__init__(f"{key}: {message}" + (f" ({fix})" if fix else ""))


class DenyError(ExtauthzError):
    """A request that must be denied, with its reason code and a description safe to return.

    `detail` goes to the decision log only; it never contains token text or header values.
    """

    def __init__(self, code: str, detail: str = "", *, description: str | None = None):
        if code not in REASONS:
            raise ValueError(f"unknown reason code {code!r}")
        self.code = code
        self.detail = detail
        self.description = description or REASONS[code].description
        super().__init__(f"{code}: {detail}" if detail else code)


class RequestError(DenyError):
    """A malformed CheckRequest (HTTP 400)."""


class TokenError(DenyError):
    """A bearer token that is missing, malformed or fails verification (HTTP 401 or 400)."""


class JWKSError(ExtauthzError):
    """A JSON Web Key Set that could not be fetched or parsed."""
