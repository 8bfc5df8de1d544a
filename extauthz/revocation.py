"""Revocation of subjects, sessions and single tokens, enforced by every replica within a second.

A revocation is one entry in the store:

    sub:ISSUER|SUBJECT   tokens of that subject issued (`iat`) before `revoked_at`; ISSUER may be `*`
    sid:SID              every token with that `sid` claim
    jti:JTI              the token with that `jti` claim

Each entry expires when no token it covers can still be valid: `revoked_at` + the longest
`max_token_lifetime` of the configured issuers (24 h for an issuer without one) + the longest leeway.

Each replica keeps a local copy. A background thread reads the store's version counter every
quarter of `store.max_staleness` and reloads the entries when it changed or when a loaded entry has
expired, so a Check costs a dict lookup. When the copy is older than `store.max_staleness` because
the store is unreachable, a check that needs it raises StoreError: sensitive routes then deny with
503 `state_unavailable`, and other routes follow `store.on_error`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extauthz.config import Config
from extauthz.errors import TokenError
from extauthz.identity import EndUser
from extauthz.store import Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_REVOCATION_LIFETIME = 24 * 3600.0
KINDS = ("sub", "sid", "jti")


def revocation_field(kind: str, value: str, issuer: str | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown revocation kind {kind!r}")
    if not value:
        raise ValueError("the revoked value must not be empty")
    return f"sub:{issuer or '*'}|{value}" if kind == "sub" else f"{kind}:{value}"


def revocation_lifetime(config: Config) -> float:
    """Return how long a revocation must last to outlive every token it can cover."""
    lifetimes = [issuer.max_token_lifetime or DEFAULT_REVOCATION_LIFETIME for issuer in config.issuers]
    leeways = [issuer.leeway for issuer in config.issuers]
    return max(lifetimes, default=DEFAULT_REVOCATION_LIFETIME) + max(leeways, default=0.0)


def revoke(store: Store, config: Config, kind: str, value: str, *, issuer: str | None = None,
           reason: str = "", now: float | None = None) -> dict[str, Any]:
    """Store a revocation; return the entry written."""
    now = time.time() if now is None else now
    field = revocation_field(kind, value, issuer)
    entry = {"kind": kind, "value": value, "issuer": issuer or "*", "revoked_at": now,
             "expires_at": now + revocation_lifetime(config), "reason": reason[:200]}
    store.add_revocation(field, entry, now)
    return entry


@dataclass(frozen=True, slots=True)
class _Snapshot:
    subjects: dict[tuple[str, str], float]
    sessions: frozenset[str]
    token_ids: frozenset[str]
    # The earliest `expires_at` among the loaded entries. The copy is rebuilt once it has passed.
    expires_next: float = float("inf")


def _snapshot(entries: dict[str, dict[str, Any]], now: float) -> _Snapshot:
    subjects: dict[tuple[str, str], float] = {}
    sessions: set[str] = set()
    token_ids: set[str] = set()
    expires_next = float("inf")
    for entry in entries.values():
        try:
            expires_at = float(entry["expires_at"])
            if expires_at <= now:
                continue
            expires_next = min(expires_next, expires_at)
            kind, value = entry["kind"], str(entry["value"])
            if kind == "sub":
                key = (str(entry.get("issuer") or "*"), value)
                subjects[key] = max(subjects.get(key, 0.0), float(entry["revoked_at"]))
            elif kind == "sid":
                sessions.add(value)
            elif kind == "jti":
                token_ids.add(value)
        except (KeyError, TypeError, ValueError):
            log.warning("skipping a malformed revocation entry")
    return _Snapshot(subjects, frozenset(sessions), frozenset(token_ids), expires_next)


class RevocationList:
    """The local copy of the store's revocations, checked on every Check."""

    def __init__(self, store: Store, max_staleness: float, clock: Callable[[], float] = time.time):
        self.store = store
        self.max_staleness = max_staleness
        self.clock = clock
        self._snapshot = _Snapshot({}, frozenset(), frozenset())
        self._version: int | None = None
        self._synced_at = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sync_errors = 0
        self._last_error_log = 0.0
        self._live = store.name == "memory"

    def sync(self) -> bool:
        """Reload the entries if the store's version changed or a loaded entry expired. Return True
        when the copy is current."""
        try:
            version = self.store.revocation_version()
            if version != self._version or self.clock() >= self._snapshot.expires_next:
                entries = self.store.revocation_entries()
                self._snapshot = _snapshot(entries, self.clock())
                self._version = version
                log.info("revocations loaded", extra={"version": version, "entries": len(entries)})
        except StoreError as exc:
            # Reload on the next successful sync even if the version is the same. A Redis that lost
            # its data (a restart, a failover to a lagging replica) counts versions from 0 again, so
            # a new entry can come with a version this copy has already loaded. NOTE: a loss that no
            # sync saw fail is still missed if the counter is back at the loaded version by the next sync.
            self._version = None
            self.sync_errors += 1
            now = time.monotonic()
            if now - self._last_error_log > 10:
                self._last_error_log = now
                log.error("revocation sync failed", extra={"error": str(exc), "failures": self.sync_errors})
            return False
        self._synced_at = time.monotonic()
        return True

    def start(self) -> None:
        if self._live or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._sync_loop, name="revocation-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _sync_loop(self) -> None:
        interval = self.max_staleness / 4
        while not self._stop.wait(interval):
            self.sync()

    @property
    def fresh(self) -> bool:
        return self._live or time.monotonic() - self._synced_at <= self.max_staleness

    def check(self, user: EndUser) -> None:
        """Raise TokenError(token_revoked) for a revoked token, StoreError when the copy is stale."""
        if self._live:
            self.sync()
        elif not self.fresh:
            raise StoreError("revocations are older than store.max_staleness")
        snapshot = self._snapshot

        issued_at = user.issued_at if user.issued_at is not None else user.auth_time
        for issuer in (user.issuer, "*"):
            revoked_at = snapshot.subjects.get((issuer, user.subject))
            if revoked_at is not None and (issued_at is None or issued_at < revoked_at):
                raise TokenError("token_revoked", "subject revoked")
        if user.session_id is not None and user.session_id in snapshot.sessions:
            raise TokenError("token_revoked", "session revoked")
        if user.token_id is not None and user.token_id in snapshot.token_ids:
            raise TokenError("token_revoked", "token revoked")
