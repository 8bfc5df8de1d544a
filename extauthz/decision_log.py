"""Decision records: one JSON line per Check, on allow, deny and error.

The fields are documented in docs/decision-log.md. A record contains no header value, cookie or token:
only the ids, principals and claims listed there, and the minted token's jti, aud, exp and kid.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from extauthz.config import DecisionLogConfig
from extauthz.decision import Decision
from extauthz.errors import REASONS

log = logging.getLogger(__name__)


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_record(decision: Decision) -> dict[str, Any]:
    """Return the decision record for one Check."""
    record: dict[str, Any] = {
        "time": _rfc3339(decision.started_at),
        "decision_id": decision.decision_id,
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.status,
        "reason": decision.reason,
    }
    if decision.detail:
        record["detail"] = decision.detail

    peer = decision.peer
    if peer is not None:
        record.update({
            "request_id": peer.request_id,
            "source_principal": peer.source_principal,
            "source_address": peer.source_address,
            "destination_principal": peer.destination_principal,
        })
    # Host, method and path only once they are valid: a malformed one is not repeated into the log.
    request = decision.request
    if request is not None:
        record.update({"host": request.host, "method": request.method, "path": request.path})
    record["policies"] = decision.policies

    user = decision.user
    if user is not None:
        record["user_sub"] = user.subject
        record["user_iss"] = user.issuer
        if user.acr is not None:
            record["user_acr"] = user.acr
        if user.auth_time is not None:
            record["auth_age_s"] = round(decision.started_at - user.auth_time, 3)

    minted = decision.minted
    if minted is not None:
        record["token_jti"] = minted.jti
        record["token_aud"] = minted.audience
        record["token_exp"] = minted.expires_at
        record["token_kid"] = minted.kid

    if decision.injected_secrets:
        record["injected_secrets"] = list(decision.injected_secrets)
    if decision.would_deny is not None:
        record["would_deny_reason"] = decision.would_deny.code
        record["would_deny_status"] = REASONS[decision.would_deny.code].status
    if decision.degraded:
        record["degraded"] = True
    if decision.retry:
        record["retry"] = True
    record["duration_ms"] = round(decision.duration * 1000, 3)
    return record


class DecisionLog:
    """Writes decision records to stdout or an append-only file."""

    def __init__(self, config: DecisionLogConfig, stream: IO[bytes] | None = None):
        self.config = config
        self._lock = threading.Lock()
        self._owned = False
        if stream is not None:
            self._stream = stream
        elif config.sink == "file":
            assert config.path is not None
            self._stream = _open_append(config.path)
            self._owned = True
        else:
            self._stream = sys.stdout.buffer
        self.write_errors = 0
        self._last_error_log = 0.0

    def write(self, decision: Decision) -> None:
        line = orjson.dumps(build_record(decision)) + b"\n"
        try:
            with self._lock:
                self._stream.write(line)
                self._stream.flush()
        except (OSError, ValueError) as exc:
            # NOTE: a failed write loses this record; a spool that keeps it belongs with the sinks.
            self.write_errors += 1
            now = time.monotonic()
            if now - self._last_error_log > 10:
                self._last_error_log = now
                log.error("decision log write failed",
                          extra={"error": str(exc), "failures": self.write_errors,
                                 "decision_id": decision.decision_id})

    def close(self) -> None:
        with self._lock:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                pass
            if self._owned:
                self._stream.close()


def _open_append(path: Path) -> IO[bytes]:
    return open(path, "ab")  # noqa: SIM115 - closed by DecisionLog.close
