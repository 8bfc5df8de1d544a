"""Shared state: one interface, an in-process implementation and a factory for the configured one.

The state that replicas share is small: one-time token claims, revocations and the public halves of
every replica's signing keys. `memory://` keeps it in this process, for a single instance. The Redis
implementation is in extauthz.redis_store. Every operation either completes or raises StoreError;
callers decide what a failure means for the request.

Key layout (see docs/operations.md), with the configured prefix (default `extauthz:`):

    PREFIX otk:SHA256(iss NUL jti)        one-time token claim, expires with the token
    PREFIX {revocations}:entries          hash: "sub:ISS|SUB", "sid:SID", "jti:JTI" -> JSON entry
    PREFIX {revocations}:version          counter, incremented on every change
    PREFIX {jwks}:index                   sorted set: replica id -> expiry (ms since the epoch)
    PREFIX {jwks}:replica:ID              JSON list of that replica's public JWKs

The `{...}` hash tags keep the keys that one script touches in one Redis Cluster slot.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from extauthz.config import StoreConfig
from extauthz.errors import ExtauthzError

# The in-process store sweeps expired one-time claims once it contains this many, at most once per interval.
MEMORY_SWEEP_SIZE = 100_000
MEMORY_SWEEP_INTERVAL = 10.0

CLAIMED = "claimed"
RETRY = "retry"
REPLAYED = "replayed"


class StoreError(ExtauthzError):
    """The store could not complete an operation in time; the message names it, never a value."""


@dataclass(frozen=True, slots=True)
class KeyNames:
    prefix: str

    def one_time(self, digest: str) -> str:
        return f"{self.prefix}otk:{digest}"

    @property
    def revocation_entries(self) -> str:
        return f"{self.prefix}{{revocations}}:entries"

    @property
    def revocation_version(self) -> str:
        return f"{self.prefix}{{revocations}}:version"

    @property
    def jwks_index(self) -> str:
        return f"{self.prefix}{{jwks}}:index"

    def jwks_replica(self, replica_id: str) -> str:
        return f"{self.prefix}{{jwks}}:replica:{replica_id}"


class Store(Protocol):
    name: str

    def claim_once(self, key: str, fingerprint: str, ttl: float, now: float, retry_window: float) -> str:
        """Claim `key` until `ttl` seconds from now. Return CLAIMED the first time, RETRY when the
        same `fingerprint` claimed it at most `retry_window` seconds ago, and REPLAYED otherwise."""

    def add_revocation(self, field: str, entry: dict[str, Any], now: float) -> None:
        """Store one revocation (its JSON `entry` carries `expires_at`) and drop expired ones."""

    def remove_revocations(self, field: str | None) -> int:
        """Remove one revocation, or all when `field` is None; return how many were removed."""

    def revocation_version(self) -> int:
        """Return a number that changes whenever the revocations change."""

    def revocation_entries(self) -> dict[str, dict[str, Any]]:
        """Return every stored revocation, expired ones included."""

    def publish_keys(self, replica_id: str, keys: list[dict[str, Any]], ttl: float, now: float) -> None:
        """Publish this replica's public JWKs for `ttl` seconds."""

    def published_keys(self, now: float) -> list[dict[str, Any]]:
        """Return the public JWKs that every replica has published and that have not expired."""

    def ping(self) -> None:
        """Raise StoreError unless the store replies."""

    def close(self) -> None: ...


class MemoryStore:
    """The in-process store: correct for one instance, shared with no other process."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[str, tuple[str, float, float]] = {}
        self._next_sweep = 0.0
        self._revocations: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._keys: dict[str, tuple[list[dict[str, Any]], float]] = {}

    def claim_once(self, key: str, fingerprint: str, ttl: float, now: float, retry_window: float) -> str:
        with self._lock:
            existing = self._claims.get(key)
            if existing is not None and existing[2] <= now:
                existing = None
            if existing is None:
                # Drop expired claims now and then; a sweep on every claim would cost O(n) each time.
                if len(self._claims) > MEMORY_SWEEP_SIZE and now >= self._next_sweep:
                    self._claims = {k: v for k, v in self._claims.items() if v[2] > now}
                    self._next_sweep = now + MEMORY_SWEEP_INTERVAL
                self._claims[key] = (fingerprint, now, now + ttl)
                return CLAIMED
            if existing[0] == fingerprint and now - existing[1] <= retry_window:
                return RETRY
            return REPLAYED

    def add_revocation(self, field: str, entry: dict[str, Any], now: float) -> None:
        with self._lock:
            self._revocations = {k: v for k, v in self._revocations.items() if v.get("expires_at", 0) > now}
            self._revocations[field] = dict(entry)
            self._version += 1

    def remove_revocations(self, field: str | None) -> int:
        with self._lock:
            if field is None:
                removed = len(self._revocations)
                self._revocations.clear()
            else:
                removed = 1 if self._revocations.pop(field, None) is not None else 0
            self._version += 1
            return removed

    def revocation_version(self) -> int:
        return self._version

    def revocation_entries(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {field: dict(entry) for field, entry in self._revocations.items()}

    def publish_keys(self, replica_id: str, keys: list[dict[str, Any]], ttl: float, now: float) -> None:
        with self._lock:
            self._keys[replica_id] = (json.loads(json.dumps(keys)), now + ttl)

    def published_keys(self, now: float) -> list[dict[str, Any]]:
        with self._lock:
            return [key for keys, until in self._keys.values() if until > now for key in keys]

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None


def open_store(config: StoreConfig) -> Store:
    """Return the store that `store.url` names; a Redis store connects lazily, on first use."""
    if not config.shared:
        return MemoryStore()
    from extauthz.redis_store import RedisStore

    return RedisStore(config)
