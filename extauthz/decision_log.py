"""Decision records: one JSON line per Check, on allow, deny and error.

The fields are documented in docs/decision-log.md. A record contains no header value, cookie or token:
only the ids, principals and claims listed there, and the minted token's jti, aud, exp and kid.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import IO

import orjson

from extauthz.config import DecisionLogConfig
from extauthz.decision import Decision
from extauthz.record import build_record

log = logging.getLogger(__name__)


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
        line = orjson.dumps(build_record(decision, self.config)) + b"\n"
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
