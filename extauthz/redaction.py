"""What a decision record may contain from a request and a token: the one place that decides it.

- Credential headers (CREDENTIAL_HEADERS) are never recorded, neither in clear nor hashed. The
  configuration rejects them in decision_log.headers and decision_log.clear_headers.
- A value that contains a JWT is never recorded: not as a header, not in a claim, not as a context
  extension. A JWT here is three base64url segments separated by dots whose first segment decodes to a
  JSON object (a JWS; the first three segments of a JWE match too). The payload and signature
  segments may be empty, as in unsecured and detached-payload tokens.
- The request id, method and path are always recorded, because a record needs them. JWT_MARKER
  replaces a request id or method that contains a JWT, and each path segment that contains one (the
  token of a magic link such as /verify/eyJ...).
- Headers named in decision_log.headers are recorded as "sha256:" + the hex SHA-256 of the value's
  UTF-8 bytes, those in decision_log.clear_headers as received.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

CREDENTIAL_HEADERS = frozenset({
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-amz-security-token",
})

# Neither a request id nor a method can contain "[", so the marker is never mistaken for a real value.
JWT_MARKER = "[jwt]"

# End-user claims that have a record field of their own, so decision_log.claims must not repeat them.
RECORDED_CLAIMS = {
    "iss": "user_iss",
    "sub": "user_sub",
    "aud": "user_aud",
    "acr": "user_acr",
    "amr": "user_amr",
    "auth_time": "user_auth_time",
}

# A JSON object starts with "{", whose base64 encoding starts with "e". The second character is "y"
# when "{" is followed by '"' or a space, and "w" when it is followed by a tab, CR or LF. The lookahead
# finds overlapping candidates, so "x.eyJ..." is still found when a dotted word comes first.
_JWT_CANDIDATE = re.compile(r"(?=(e[yw][A-Za-z0-9_-]*)\.[A-Za-z0-9_-]*\.)")
# A value with more candidate header segments than this counts as containing a JWT: this bounds the
# work an attacker-chosen header value can cause, and fails closed.
_MAX_CANDIDATES = 8


def contains_jwt(text: str) -> bool:
    """Return True when `text` contains a JWT-shaped string anywhere."""
    if text.count(".") < 2:
        return False
    for count, match in enumerate(_JWT_CANDIDATE.finditer(text)):
        if count >= _MAX_CANDIDATES or _is_json_object(match.group(1)):
            return True
    return False


def _is_json_object(segment: str) -> bool:
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return isinstance(orjson.loads(decoded), dict)
    except (binascii.Error, ValueError):
        return False


def _json_contains_jwt(value: Any) -> bool:
    if isinstance(value, str):
        return contains_jwt(value)
    if isinstance(value, dict):
        return any(contains_jwt(name) or _json_contains_jwt(item) for name, item in value.items())
    if isinstance(value, list):
        return any(_json_contains_jwt(item) for item in value)
    return False


def without_jwt(text: str) -> str:
    """Return `text`, or JWT_MARKER when it contains a JWT."""
    return JWT_MARKER if contains_jwt(text) else text


def path_without_jwt(path: str) -> str:
    """Return `path` with JWT_MARKER in place of every segment that contains a JWT."""
    # A JWT cannot span segments, because "/" is not a base64url character.
    if not contains_jwt(path):
        return path
    return "/".join(without_jwt(segment) for segment in path.split("/"))


def header_refusal(name: str) -> str | None:
    """Return why header `name` (lower case) may never be recorded, or None when it may be."""
    if name in CREDENTIAL_HEADERS:
        return f"{name} carries credentials and is never recorded"
    return None


def hash_value(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def recorded_headers(headers: Mapping[str, str], hashed: Iterable[str], clear: Iterable[str]) -> dict[str, str]:
    """Return the allowlisted request headers as the record writes them: hashed, in clear, or left out."""
    recorded: dict[str, str] = {}
    for names, transform in ((hashed, hash_value), (clear, None)):
        for name in names:
            value = headers.get(name)
            # The configuration already rejects credential headers, so this second check only guards
            # callers that build the lists themselves.
            if value is None or name in CREDENTIAL_HEADERS or contains_jwt(value):
                continue
            recorded[name] = transform(value) if transform else value
    return recorded


def recorded_claims(claims: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """Return the named claims that the token has and that contain no JWT, with their JSON values."""
    recorded: dict[str, Any] = {}
    for name in names:
        if name in claims and name not in RECORDED_CLAIMS and not _json_contains_jwt(claims[name]):
            recorded[name] = claims[name]
    return recorded


def recorded_context_extensions(extensions: Mapping[str, str]) -> dict[str, str]:
    """Return the context extensions whose name and value contain no JWT."""
    return {name: value for name, value in extensions.items() if not contains_jwt(name) and not contains_jwt(value)}
