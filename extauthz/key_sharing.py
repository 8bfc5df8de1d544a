"""Signing keys across replicas: each replica publishes its public keys to the shared store, and
every replica's JWKS endpoint serves the union, so a backend that fetched the JWKS from any replica
verifies a token minted by any other.

Only public keys leave the replica. A published list expires `token.ttl` + one minute of clock skew
+ two publish intervals after its last refresh, so the keys of a replica that stopped stay published
for as long as the tokens they signed can be valid.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from extauthz.config import SIGNING_ALGORITHMS
from extauthz.keys import CLOCK_SKEW, KeyRing
from extauthz.store import Store, StoreError

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 10.0


def _is_public_signing_key(key: dict) -> bool:
    # Anyone with write access to the store could add keys here: serve only well-formed public signing keys.
    return (isinstance(key.get("kid"), str) and key.get("kty") in ("EC", "OKP") and "d" not in key
            and key.get("alg") in SIGNING_ALGORITHMS and key.get("use") == "sig")


def new_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class KeyDirectory:
    def __init__(self, store: Store, key_ring: KeyRing, replica_id: str | None = None,
                 interval: float = PUBLISH_INTERVAL, clock: Callable[[], float] = time.time):
        self.store = store
        self.key_ring = key_ring
        self.replica_id = replica_id or new_replica_id()
        self.interval = interval
        self.clock = clock
        self._shared: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self._last_error_log = 0.0

    @property
    def enabled(self) -> bool:
        return self.store.name != "memory"

    def sync(self) -> bool:
        """Publish this replica's keys and read every replica's; keep the last union on failure."""
        now = self.clock()
        ttl = self.key_ring.max_token_ttl + CLOCK_SKEW + 2 * self.interval
        try:
            self.store.publish_keys(self.replica_id, self.key_ring.public_keys(), ttl, now)
            self._shared = self.store.published_keys(now)
        except StoreError as exc:
            self.errors += 1
            if time.monotonic() - self._last_error_log > 10:
                self._last_error_log = time.monotonic()
                log.error("key publication failed", extra={"error": str(exc), "failures": self.errors})
            return False
        return True

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self.sync()
        self._thread = threading.Thread(target=self._sync_loop, name="key-sharing", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync()

    def jwks(self) -> bytes:
        """Return this replica's keys plus every other replica's published keys, one entry per kid."""
        if not self.enabled:
            return self.key_ring.jwks()
        keys = {key["kid"]: key for key in self._shared if _is_public_signing_key(key)}
        for key in self.key_ring.public_keys():
            keys[key["kid"]] = key
        return json.dumps({"keys": list(keys.values())}, separators=(",", ":")).encode()
