"""Verify the transaction tokens that extauthz mints, in a Python backend.

extauthz injects one token per allowed request, in the `txn-token` header. A backend calls
`TokenVerifier.verify()` with that header's value and with the method, host and path of the request
it received. The call returns the token's claims, or raises a subclass of `VerificationError` whose
`code` names the check that failed:

    missing_token            no token (None or empty)
    malformed_token          not a compact JWS, or a required header field or claim missing or mistyped
    wrong_token_type         the header's `typ` is not `txntoken+jwt`
    algorithm_not_allowed    `alg` is not one of `algorithms` (ES256 and EdDSA), or differs from the key's
    unknown_key              no key with the token's `kid`, even after one rate-limited JWKS refresh
    bad_signature            the signature does not verify with the key that `kid` names
    wrong_issuer             `iss` is not `issuer`
    wrong_audience           no `aud` value is one of `audience`
    token_expired            `exp` is more than `leeway` seconds in the past
    token_not_yet_valid      `nbf` is more than `leeway` seconds in the future
    token_issued_in_future   `iat` is more than `leeway` seconds in the future
    context_mismatch         `tctx` names another method, host or path than the request received
    token_replayed           the token's `txn` was already used (only with a `replay_store`)
    jwks_unavailable         no key set could be loaded yet (HTTP 503, not the token's fault)
    replay_store_unavailable the replay store failed (HTTP 503, not the token's fault)

The checks run in that order: the header first, then the key and the signature, then the claims (a
missing or mistyped claim is found at that point). The replay claim comes last, so a token that
fails any other check never uses up its `txn`.

Keys come from a JWKS dict, or from `jwks_uri` over HTTPS (plain HTTP only on 127.0.0.1, ::1 and
localhost, where extauthz serves it). A fetched key set follows the refresh rules of the server's
issuer keys (extauthz.jwks): refreshed on a token whose `kid` is unknown, at most once per
`min_refresh_interval`, and once it is older than `refresh_interval`. A failed refresh keeps the last
good key set. There is no background thread: the request that finds the key set due for a refresh
fetches it, bounded by `timeout`, while concurrent requests keep using the current set.

This module imports only the standard library, pyjwt, extauthz.jwks and extauthz.errors, never the
server's packages (grpc, envoy, yaml), and `redis` only when a `replay_store` is given.
extauthz.verify_middleware wraps a WSGI or ASGI application around a TokenVerifier.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from jwt.api_jwk import PyJWK

from extauthz.errors import ExtauthzError, JWKSError
from extauthz.jwks import KeySet, fetch_jwks, parse_jwks

__all__ = [
    "AlgorithmNotAllowed",
    "BadSignature",
    "ContextMismatch",
    "KeySetUnavailable",
    "MalformedToken",
    "MissingToken",
    "ReplayStoreUnavailable",
    "TokenExpired",
    "TokenIssuedInFuture",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenVerifier",
    "UnknownKey",
    "VerificationError",
    "WrongAudience",
    "WrongIssuer",
    "WrongTokenType",
    "normalise_host",
    "normalise_path",
]

log = logging.getLogger(__name__)

TOKEN_TYPE = "txntoken+jwt"
ALLOWED_ALGORITHMS = ("ES256", "EdDSA")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
DEFAULT_PORTS = frozenset({80, 443})

# Three base64url parts: pyjwt's decoder skips characters outside the alphabet, so check them first.
# The signature may be empty, so that `alg: none` is reported as algorithm_not_allowed.
_COMPACT_JWS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


# --- exceptions ------------------------------------------------------------------------------------


class VerificationError(ExtauthzError):
    """A token that a backend must reject.

    `code` is a stable snake_case identifier. `description` is a fixed sentence that is safe to send
    to the client. `detail` names the failing value for logs. None of them contains token text.
    `status` is the HTTP status a backend should respond with.
    """

    code = "invalid_token"
    description = "The transaction token is invalid."
    status = 401

    def __init__(self, detail: str = ""):
        self.detail = detail
        super().__init__(f"{self.code}: {detail}" if detail else self.code)


class MissingToken(VerificationError):
    code = "missing_token"
    description = "A transaction token is required."


class MalformedToken(VerificationError):
    code = "malformed_token"
    description = "The transaction token is not a well-formed JWT."


class WrongTokenType(VerificationError):
    code = "wrong_token_type"
    description = "The token is not a transaction token."


class AlgorithmNotAllowed(VerificationError):
    code = "algorithm_not_allowed"
    description = "The transaction token is signed with an algorithm that is not allowed."


class UnknownKey(VerificationError):
    code = "unknown_key"
    description = "The transaction token is signed by an unknown key."


class BadSignature(VerificationError):
    code = "bad_signature"
    description = "The transaction token signature is invalid."


class WrongIssuer(VerificationError):
    code = "wrong_issuer"
    description = "The transaction token is from another issuer."


class WrongAudience(VerificationError):
    code = "wrong_audience"
    description = "The transaction token is for another audience."


class TokenExpired(VerificationError):
    code = "token_expired"
    description = "The transaction token has expired."


class TokenNotYetValid(VerificationError):
    code = "token_not_yet_valid"
    description = "The transaction token is not valid yet."


class TokenIssuedInFuture(VerificationError):
    code = "token_issued_in_future"
    description = "The transaction token is issued in the future."


class ContextMismatch(VerificationError):
    code = "context_mismatch"
    description = "The transaction token was issued for another request."


class TokenReplayed(VerificationError):
    code = "token_replayed"
    description = "The transaction token has already been used."


class KeySetUnavailable(VerificationError):
    code = "jwks_unavailable"
    description = "The keys that verify transaction tokens are unavailable."
    status = 503


class ReplayStoreUnavailable(VerificationError):
    code = "replay_store_unavailable"
    description = "The transaction token replay check is unavailable."
    status = 503


# --- the request as extauthz normalised it ---------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_FORBIDDEN_ESCAPES = frozenset(("2F", "5C", "00", "25"))
_HEX = frozenset("0123456789abcdefABCDEF")
_PATH_CHARS = re.compile(r"^[\x21-\x7e]*\Z")
_PORT = re.compile(r"^[0-9]{1,5}\Z")


def normalise_path(raw: str) -> str:
    """Return the path of a request target as extauthz normalises it, without the query.

    Follows docs/request-normalisation.md, as extauthz.request.normalise_path does (tests compare
    the two): unreserved percent-escapes decoded once, other escapes in upper case, slashes merged,
    dot segments removed. Raise ValueError for a path that extauthz rejects as ambiguous, because
    extauthz never mints a token for one. Unlike extauthz, no length limit applies.
    """
    if not _PATH_CHARS.match(raw):
        raise ValueError("control, space or non-ASCII character in the path")
    if "#" in raw:
        raise ValueError("fragment in the path")
    path = raw.partition("?")[0]
    if not path.startswith("/"):
        raise ValueError("path does not start with /")
    if "\\" in path:
        raise ValueError("backslash in the path")

    decoded = _decode_unreserved(path)
    segments: list[str] = []
    for segment in decoded.split("/")[1:]:
        if ";" in segment:
            raise ValueError("path parameter on a dot segment")
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)

    normalised = "/" + "/".join(segments)
    # A trailing slash or trailing dot segment names a directory: keep the slash.
    if len(normalised) > 1 and decoded.endswith(("/", "/.", "/..")):
        normalised += "/"
    return normalised


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    index = 0
    while index < len(path):
        char = path[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        hex_digits = path[index + 1:index + 3]
        if len(hex_digits) != 2 or not set(hex_digits) <= _HEX:
            raise ValueError("invalid percent-escape in the path")
        hex_digits = hex_digits.upper()
        if hex_digits in _FORBIDDEN_ESCAPES:
            raise ValueError(f"encoded %{hex_digits} in the path")
        decoded = chr(int(hex_digits, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + hex_digits)
        index += 3
    return "".join(out)


def normalise_host(authority: str) -> tuple[str, int | None]:
    """Split a Host header value into the lower-case host and its port.

    One trailing dot is removed. Port 80 and port 443 become None, because the backend cannot tell
    which scheme the caller used in front of Envoy. Raise ValueError for a malformed authority.
    """
    text = authority.strip().lower()
    if not text or "@" in text:
        raise ValueError("empty host or userinfo in the authority")
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        host += "]"
        if not bracket:
            raise ValueError("unclosed IPv6 literal in the authority")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ValueError("invalid IPv6 literal in the authority") from exc
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError("text after the IPv6 literal in the authority")
    else:
        host, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
        host = host[:-1] if host.endswith(".") else host
        if not host:
            raise ValueError("empty host in the authority")

    port: int | None = None
    if port_text is not None:
        if not _PORT.match(port_text) or not 0 < int(port_text) <= 65535:
            raise ValueError("invalid port in the authority")
        port = int(port_text)
    if port in DEFAULT_PORTS:
        port = None
    return host, port


def check_context(tctx: Any, method: str, host: str, path: str) -> None:
    """Raise ContextMismatch unless `tctx` names this method, host and path.

    The method must be equal. The host is compared without case and without port 80 or 443. When
    tctx.host has no port, the received port is not compared: extauthz mints tctx.host without one.
    The received path is normalised as extauthz normalises it and must equal tctx.path.
    """
    if not isinstance(tctx, dict) or not all(isinstance(tctx.get(name), str) for name in ("method", "host", "path")):
        raise MalformedToken("the tctx claim is not an object with string method, host and path")

    if tctx["method"] != method:
        raise ContextMismatch(f"tctx.method {tctx['method']!r} is not the request method {method!r}")

    try:
        received_host, received_port = normalise_host(host)
    except ValueError as exc:
        raise ContextMismatch(f"the request host is invalid: {exc}") from exc
    try:
        token_host, token_port = normalise_host(tctx["host"])
    except ValueError as exc:
        raise ContextMismatch(f"tctx.host is invalid: {exc}") from exc
    if token_host != received_host or (token_port is not None and token_port != received_port):
        raise ContextMismatch(f"tctx.host {tctx['host']!r} is not the request host {host!r}")

    try:
        received_path = normalise_path(path)
    except ValueError as exc:
        raise ContextMismatch(f"the request path is ambiguous: {exc}") from exc
    if tctx["path"] != received_path:
        raise ContextMismatch(f"tctx.path {tctx['path']!r} is not the normalised request path {received_path!r}")


# --- keys ------------------------------------------------------------------------------------------


def validate_jwks_uri(uri: str, allow_http: bool = False) -> None:
    """Raise ValueError unless `uri` is https://, or http:// on 127.0.0.1, ::1 or localhost.

    `allow_http` accepts http:// on any host, for a service mesh whose sidecars encrypt the hop.
    """
    try:
        parts = urllib.parse.urlsplit(uri)
        hostname = parts.hostname
    except ValueError as exc:
        raise ValueError(f"jwks_uri {uri!r} is not a valid URL: {exc}") from exc
    if not hostname:
        raise ValueError(f"jwks_uri {uri!r} has no host")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and (allow_http or hostname in LOOPBACK_HOSTS):
        return
    raise ValueError(f"jwks_uri {uri!r} must be https://, or http:// on 127.0.0.1, ::1 or localhost; "
                     "inside an Istio mesh with mTLS, pass allow_http=True")


class _RemoteKeys:
    """A JWKS fetched from a URI, cached and refreshed, safe to use from several threads."""

    def __init__(self, uri: str, algorithms: tuple[str, ...], ca_file: Path | None, refresh_interval: float,
                 min_refresh_interval: float, timeout: float):
        self.uri = uri
        self.algorithms = algorithms
        self.ca_file = ca_file
        self.refresh_interval = refresh_interval
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self._keys: KeySet | None = None
        self._lock = threading.Lock()
        self._fetched_at = 0.0
        self._attempted_at: float | None = None
        self._generation = 0

    def find(self, kid: str) -> PyJWK:
        """Return the key for `kid`. Raise UnknownKey, or KeySetUnavailable when no key set has loaded."""
        keys = self._keys
        if keys is None:
            keys = self._refresh(seen=None, wait=True)
        elif time.monotonic() - self._fetched_at >= self.refresh_interval:
            # Due for the periodic refresh: one request fetches, the others keep the current set.
            keys = self._refresh(seen=keys, wait=False)
        if keys is None:
            raise KeySetUnavailable(f"no key set from {self.uri} has loaded yet")

        key = keys.keys.get(kid)
        if key is None:
            keys = self._refresh(seen=keys, wait=True) or keys
            key = keys.keys.get(kid)
        if key is None:
            raise UnknownKey(f"no key with kid {kid!r} in the key set from {self.uri}")
        return key

    def refresh(self) -> bool:
        """Fetch the key set now, ignoring the rate limit, and return True on success."""
        with self._lock:
            return self._fetch()

    def _refresh(self, seen: KeySet | None, wait: bool) -> KeySet | None:
        """Fetch the key set unless another thread replaced `seen` or the last attempt is too recent.

        With `wait`, wait up to `timeout` seconds for another thread's fetch, else skip the refresh
        while one is running. Return the key set current afterwards.
        """
        acquired = self._lock.acquire(timeout=self.timeout) if wait else self._lock.acquire(blocking=False)
        if not acquired:
            return self._keys
        try:
            if self._keys is not seen:
                return self._keys
            if self._attempted_at is not None and time.monotonic() - self._attempted_at < self.min_refresh_interval:
                return self._keys
            self._fetch()
            return self._keys
        finally:
            self._lock.release()

    def _fetch(self) -> bool:
        """Fetch and parse the key set, keeping the last good set on failure. The caller holds the lock."""
        self._attempted_at = time.monotonic()
        try:
            data = fetch_jwks(self.uri, self.timeout, self.ca_file)
            keys = parse_jwks(data, self.uri, self.algorithms, self._generation + 1)
        except JWKSError as exc:
            log.error("JWKS refresh failed; keeping the last good key set",
                      extra={"jwks_uri": self.uri, "error": str(exc)})
            return False
        self._generation += 1
        self._keys = keys
        self._fetched_at = time.monotonic()
        log.info("JWKS fetched", extra={"jwks_uri": self.uri, "keys": len(keys.keys)})
        return True


class _StaticKeys:
    """A JWKS given as a dict, never refreshed."""

    def __init__(self, jwks: Mapping[str, Any], algorithms: tuple[str, ...]):
        self.keys = parse_jwks(json.dumps(jwks).encode(), "jwks", algorithms, generation=1)

    def find(self, kid: str) -> PyJWK:
        key = self.keys.keys.get(kid)
        if key is None:
            raise UnknownKey(f"no key with kid {kid!r} in the configured key set")
        return key

    def refresh(self) -> bool:
        return False


# --- the verifier ----------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TokenVerifier:
    """Verify extauthz transaction tokens for one backend, from any number of threads.

    issuer: extauthz's `token.issuer`.
    audience: the audience, or audiences, this backend accepts (the policy's
        `extauthz.io/token-audience`, else the request's host).
    jwks: a JWKS document as a dict, or jwks_uri: where extauthz serves it
        (`http://EXTAUTHZ:PORT/.well-known/jwks.json`); exactly one of the two.
    leeway: seconds of clock skew allowed on exp, nbf and iat.
    replay_store: a redis.Redis client. When given, each token's `txn` is accepted once, across every
        process that shares the store, and its claim expires `leeway` seconds after the token.
    key_prefix: the prefix of the replay store's keys (`PREFIX txn:TXN`).
    jwks_ca_file: a PEM CA bundle that verifies the JWKS server, instead of the system's.
    refresh_interval, min_refresh_interval, timeout: seconds between periodic JWKS refreshes, minimum
        seconds between fetches for unknown `kid`s, and the fetch timeout.
    algorithms: the allowed signature algorithms, a subset of ES256 and EdDSA.
    allow_http: accept an http:// jwks_uri on any host. Only for a mesh whose sidecars encrypt and
        authenticate the connection (Istio with mTLS): plain HTTP elsewhere lets anyone on the path
        replace the keys.

    Raise ValueError for an invalid argument, and extauthz.errors.JWKSError for a `jwks` dict without
    a usable key.
    """

    def __init__(self, *, issuer: str, audience: str | Sequence[str], jwks_uri: str | None = None,
                 jwks: Mapping[str, Any] | None = None, leeway: float = 30.0, replay_store: Any = None,
                 key_prefix: str = "extauthz:backend:", jwks_ca_file: str | Path | None = None,
                 refresh_interval: float = 300.0, min_refresh_interval: float = 30.0, timeout: float = 2.0,
                 algorithms: Sequence[str] = ALLOWED_ALGORITHMS, allow_http: bool = False):
        if not isinstance(issuer, str) or not issuer:
            raise ValueError("issuer must be a non-empty string: extauthz's token.issuer")
        audiences = (audience,) if isinstance(audience, str) else tuple(audience)
        if not audiences or not all(isinstance(value, str) and value for value in audiences):
            raise ValueError("audience must be a non-empty string or a non-empty list of them")
        algorithms = tuple(algorithms)
        if not algorithms or not set(algorithms) <= set(ALLOWED_ALGORITHMS):
            raise ValueError(f"algorithms must be a non-empty subset of {', '.join(ALLOWED_ALGORITHMS)}, "
                             f"got {list(algorithms)}")
        if not _is_number(leeway) or leeway < 0:
            raise ValueError(f"leeway must be a number of seconds of at least 0, got {leeway!r}")
        for name, value in (("refresh_interval", refresh_interval), ("min_refresh_interval", min_refresh_interval),
                            ("timeout", timeout)):
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if (jwks is None) == (jwks_uri is None):
            raise ValueError("pass exactly one of jwks (a JWKS dict) and jwks_uri")

        self.issuer = issuer
        self.audiences = frozenset(audiences)
        self.algorithms = algorithms
        self.leeway = float(leeway)
        self.key_prefix = key_prefix
        self.jwks_uri = jwks_uri
        self._keys: _RemoteKeys | _StaticKeys
        if jwks_uri is not None:
            validate_jwks_uri(jwks_uri, allow_http)
            self._keys = _RemoteKeys(jwks_uri, algorithms, Path(jwks_ca_file) if jwks_ca_file else None,
                                     float(refresh_interval), float(min_refresh_interval), float(timeout))
        else:
            assert jwks is not None
            self._keys = _StaticKeys(jwks, algorithms)

        self.replay_store = replay_store
        self._redis_error: type[Exception] = Exception
        if replay_store is not None:
            import redis

            self._redis_error = redis.RedisError

    def refresh_keys(self) -> bool:
        """Fetch the JWKS from jwks_uri now, for example at start-up, and return True on success.

        A failure keeps the last good key set. With a `jwks` dict there is nothing to fetch, and this
        returns False.
        """
        return self._keys.refresh()

    def verify(self, token: str | None, *, method: str, host: str, path: str) -> dict[str, Any]:
        """Verify a token for the request this backend received and return its claims.

        method: the request method. host: the Host header (or :authority). path: the request target
        as received, such as `/orders/7?page=2`. The query is ignored. The path is normalised as
        extauthz normalises it, and then compared with tctx.path.

        Raise a VerificationError subclass for the first check that fails.
        """
        header = self._read_header(token)
        key = self._keys.find(header["kid"])
        if key.algorithm_name != header["alg"]:
            raise AlgorithmNotAllowed(f"the token's alg {header['alg']} does not match the key's "
                                      f"{key.algorithm_name} (kid {header['kid']!r})")
        claims = self._decode(token, key)
        self._check_claims(claims)
        check_context(claims["tctx"], method, host, path)
        if self.replay_store is not None:
            self._claim(claims)
        return claims

    def _read_header(self, token: str | None) -> dict[str, Any]:
        if token is None or token == "":
            raise MissingToken("the token is missing")
        if not isinstance(token, str) or not _COMPACT_JWS.match(token):
            raise MalformedToken("the token is not three base64url parts separated by dots")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise MalformedToken(f"invalid header: {exc}") from exc

        token_type = header.get("typ")
        # RFC 7515 section 4.1.9: media types compare without case, and "application/" may be omitted.
        if not isinstance(token_type, str) or token_type.lower().removeprefix("application/") != TOKEN_TYPE:
            raise WrongTokenType(f"typ is {token_type!r}, expected {TOKEN_TYPE!r}")
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise AlgorithmNotAllowed(f"alg is {algorithm!r}, expected one of {', '.join(self.algorithms)}")
        if "crit" in header:
            raise MalformedToken("the header has a crit parameter, which this verifier does not support")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise MalformedToken("the header has no kid")
        return header

    def _decode(self, token: str, key: PyJWK) -> dict[str, Any]:
        # pyjwt verifies the signature only: the claims are checked below, each with its own error.
        options = {"verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                   "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False}
        try:
            return jwt.decode(token, key.key, algorithms=[key.algorithm_name], options=options)
        except jwt.InvalidSignatureError as exc:
            raise BadSignature("the signature does not verify with the key that kid names") from exc
        except jwt.PyJWTError as exc:
            raise MalformedToken(f"invalid token: {exc}") from exc

    def _check_claims(self, claims: dict[str, Any]) -> None:
        for name in ("iss", "sub", "txn"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise MalformedToken(f"the {name} claim is missing or not a non-empty string")
        for name in ("exp", "iat"):
            if not _is_number(claims.get(name)):
                raise MalformedToken(f"the {name} claim is missing or not a number")
        if "nbf" in claims and not _is_number(claims["nbf"]):
            raise MalformedToken("the nbf claim is not a number")
        audience = claims.get("aud")
        token_audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(token_audiences, list) or not all(isinstance(value, str) for value in token_audiences):
            raise MalformedToken("the aud claim is missing or not a string or a list of strings")
        if "tctx" not in claims:
            raise MalformedToken("the tctx claim is missing")

        if claims["iss"] != self.issuer:
            raise WrongIssuer(f"iss is {claims['iss']!r}, expected {self.issuer!r}")
        if not self.audiences.intersection(token_audiences):
            raise WrongAudience(f"aud is {audience!r}, expected one of {sorted(self.audiences)}")

        now = time.time()
        if now >= claims["exp"] + self.leeway:
            raise TokenExpired(f"exp {claims['exp']} is more than {self.leeway:g}s before now ({int(now)})")
        if "nbf" in claims and claims["nbf"] > now + self.leeway:
            raise TokenNotYetValid(f"nbf {claims['nbf']} is more than {self.leeway:g}s after now ({int(now)})")
        if claims["iat"] > now + self.leeway:
            raise TokenIssuedInFuture(f"iat {claims['iat']} is more than {self.leeway:g}s after now ({int(now)})")

    def _claim(self, claims: dict[str, Any]) -> None:
        """Claim the token's txn with SET NX PX until exp + leeway. Raise TokenReplayed if it was taken."""
        ttl_ms = max(1, math.ceil((claims["exp"] + self.leeway - time.time()) * 1000))
        key = f"{self.key_prefix}txn:{claims['txn']}"
        try:
            claimed = self.replay_store.set(key, b"1", nx=True, px=ttl_ms)
        except self._redis_error as exc:
            raise ReplayStoreUnavailable(f"SET NX on the replay store failed: {exc}") from exc
        if not claimed:
            raise TokenReplayed(f"txn {claims['txn']!r} was already used")
