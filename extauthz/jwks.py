"""End-user issuers' JSON Web Key Sets: loaded from a file or fetched over HTTPS, cached, refreshed.

A fetched key set is refreshed every `jwks_refresh_interval` by a background thread, and on a token
whose `kid` is unknown, at most once per `jwks_min_refresh_interval`. A failed refresh keeps the last
good key set. The request path only reads a dict, except for that rate-limited refresh on an unknown
`kid`, which is bounded by `jwks_timeout`.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
from jwt.api_jwk import PyJWK

from extauthz.errors import JWKSError

if TYPE_CHECKING:
    # Only for type hints: extauthz.verify reuses this module in backends that lack the server's packages.
    from extauthz.config import IssuerConfig

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1 << 20
_KEY_TYPES = {"EC", "RSA", "OKP"}


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: dict[str, PyJWK]
    # Keys without a `kid`, usable only by tokens without one.
    anonymous: tuple[PyJWK, ...]
    generation: int


def parse_jwks(data: bytes, source: str, algorithms: tuple[str, ...], generation: int = 0) -> KeySet:
    """Parse a JWKS document, keeping the signature keys whose type fits one of `algorithms`."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JWKSError(f"{source}: invalid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JWKSError(f"{source}: expected an object with a 'keys' list")

    keys: dict[str, PyJWK] = {}
    anonymous: list[PyJWK] = []
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict) or entry.get("kty") not in _KEY_TYPES:
            log.warning("skipping JWKS key", extra={"source": source, "index": index, "why": "unsupported kty"})
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            log.warning("skipping JWKS key", extra={"source": source, "index": index,
                                                    "why": "not a public signature key"})
            continue
        algorithm = entry.get("alg")
        if algorithm is not None and algorithm not in algorithms:
            continue
        try:
            key = PyJWK(entry, algorithm=algorithm or _default_algorithm(entry, algorithms))
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.warning("skipping JWKS key", extra={"source": source, "index": index, "why": str(exc)})
            continue
        if key.algorithm_name not in algorithms:
            # A key without `alg` gets pyjwt's default for its type, such as RS256 for any RSA key.
            log.warning("skipping JWKS key", extra={"source": source, "index": index,
                                                    "why": f"{key.algorithm_name} is not an allowed algorithm"})
            continue
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            keys[kid] = key
        else:
            anonymous.append(key)
    if not keys and not anonymous:
        raise JWKSError(f"{source}: no usable signature key for algorithms {', '.join(algorithms)}")
    return KeySet(keys, tuple(anonymous), generation)


def _default_algorithm(entry: dict, algorithms: tuple[str, ...]) -> str | None:
    curve_algorithms = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}
    kty = entry.get("kty")
    if kty in ("EC", "OKP"):
        return curve_algorithms.get(entry.get("crv", ""))
    rsa = [alg for alg in algorithms if alg[:2] in ("RS", "PS")]
    return rsa[0] if rsa else None


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https:// URLs, so that a redirect cannot downgrade the fetch to plain HTTP."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not newurl.lower().startswith("https://"):
            raise urllib.error.URLError(f"redirect to a URL that is not https://: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_jwks(uri: str, timeout: float, ca_file: Path | None = None) -> bytes:
    """GET a JWKS document over HTTPS, following only https:// redirects; raise JWKSError."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    request = urllib.request.Request(uri, headers={"Accept": "application/json"})
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects())
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(MAX_JWKS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise JWKSError(f"{uri}: fetch failed: {exc}") from exc
    if len(data) > MAX_JWKS_BYTES:
        raise JWKSError(f"{uri}: larger than {MAX_JWKS_BYTES} bytes")
    return data


class IssuerKeys:
    """The current key set of one issuer, thread-safe to read."""

    def __init__(self, config: IssuerConfig, on_fetch: Callable[[str], None] | None = None):
        self.config = config
        # Called with "success" or "failure" after every fetch over HTTPS (for metrics).
        self.on_fetch = on_fetch or (lambda result: None)
        self._keys: KeySet | None = None
        self._lock = threading.Lock()
        self._last_fetch = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    def load(self) -> None:
        """Load the key set once at start-up. A file must parse; a URI may fail and retry later."""
        if self.config.jwks_file is not None:
            source = str(self.config.jwks_file)
            try:
                data = self.config.jwks_file.read_bytes()
            except OSError as exc:
                raise JWKSError(f"{source}: cannot read: {exc.strerror}") from exc
            self._keys = parse_jwks(data, source, self.config.algorithms, generation=1)
            log.info("JWKS loaded", extra={"issuer": self.config.issuer, "keys": len(self._keys.keys)})
            return
        self.refresh()

    def start(self) -> None:
        if self.config.jwks_uri is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._refresh_loop, name="jwks-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _refresh_loop(self) -> None:
        while True:
            # Retry sooner while nothing has loaded yet.
            interval = self.config.jwks_refresh_interval if self.loaded else self.config.jwks_min_refresh_interval
            if self._stop.wait(max(interval, 1.0)):
                return
            self.refresh()

    def refresh(self) -> bool:
        """Fetch the key set now; keep the last good one on failure. Return True on success."""
        uri = self.config.jwks_uri
        if uri is None:
            return False
        with self._lock:
            self._last_fetch = time.monotonic()
            generation = (self._keys.generation if self._keys else 0) + 1
            try:
                data = self._fetch(uri)
                keys = parse_jwks(data, uri, self.config.algorithms, generation)
            except JWKSError as exc:
                log.error("JWKS refresh failed; keeping the last good key set",
                          extra={"issuer": self.config.issuer, "error": str(exc)})
                self.on_fetch("failure")
                return False
            self._keys = keys
        self.on_fetch("success")
        log.info("JWKS fetched", extra={"issuer": self.config.issuer, "keys": len(keys.keys)})
        return True

    def _fetch(self, uri: str) -> bytes:
        return fetch_jwks(uri, self.config.jwks_timeout, self.config.jwks_ca_file)

    def key_set(self) -> KeySet | None:
        return self._keys

    def find(self, kid: str | None) -> tuple[PyJWK, int] | None:
        """Return the key for `kid` and the key set's generation, refreshing once on a miss."""
        found = self._lookup(kid)
        if found is not None or self.config.jwks_uri is None:
            return found
        if time.monotonic() - self._last_fetch < self.config.jwks_min_refresh_interval:
            return None
        if self._lock.locked():
            # Another thread is refreshing: do not queue every request behind it.
            return None
        self.refresh()
        return self._lookup(kid)

    def _lookup(self, kid: str | None) -> tuple[PyJWK, int] | None:
        keys = self._keys
        if keys is None:
            return None
        if kid is None:
            return (keys.anonymous[0], keys.generation) if len(keys.anonymous) == 1 else None
        key = keys.keys.get(kid)
        return (key, keys.generation) if key is not None else None
