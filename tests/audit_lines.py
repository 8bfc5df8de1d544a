"""Decision log lines in the tamper-evident format, for tests of the log readers.

ChainWriter writes the lines of one extauthz writer process: a `start` checkpoint at seq 1, then
decision and checkpoint lines. Each line has the envelope (`type`, `writer`, `seq`, `prev_hash`,
`hash`), and the hashes chain over the canonical form: the object without `hash` and `signature`,
keys sorted. Checkpoints are signed ES256 over the ASCII bytes of their `hash`.

spec_record adds the request and login facts of the tamper-evident record to today's flat record.
DecisionCapture keeps the Decision objects that an Authorizer logs, so tests can build both forms.
"""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from extauthz.config import Config
from extauthz.decision import Decision
from extauthz.keys import generate_private_key, public_jwk
from extauthz.record import build_record

ZERO_HASH = "0" * 64


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical(line: dict[str, Any]) -> bytes:
    return orjson.dumps({name: value for name, value in line.items() if name not in ("hash", "signature")},
                        option=orjson.OPT_SORT_KEYS)


class ChainWriter:
    """One writer's lines: envelope, hash chain, signed checkpoints."""

    def __init__(self, host: str = "extauthz-0", pid: int = 7, start_time: float = 1_772_366_400.0):
        self.writer = f"{host}:{pid}:{secrets.token_hex(4)}"
        self.key = generate_private_key("ES256")
        self.kid = public_jwk(self.key, "ES256")["kid"]
        self.seq = 0
        self.prev_hash = ZERO_HASH
        self.decisions_since_checkpoint = 0
        self.lines: list[bytes] = []
        self.checkpoint("start", start_time)

    def _append(self, line: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        line = {**line, "writer": self.writer, "seq": self.seq, "prev_hash": self.prev_hash}
        line["hash"] = hashlib.sha256(canonical(line)).hexdigest()
        if line["type"] == "checkpoint":
            line["signature"] = self._sign(line["hash"].encode("ascii"))
        self.prev_hash = line["hash"]
        self.lines.append(orjson.dumps(line, option=orjson.OPT_SORT_KEYS) + b"\n")
        return line

    def _sign(self, data: bytes) -> str:
        der = self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()

    def decision(self, record: dict[str, Any]) -> dict[str, Any]:
        self.decisions_since_checkpoint += 1
        return self._append({**record, "type": "decision"})

    def checkpoint(self, trigger: str, timestamp: float) -> dict[str, Any]:
        line = self._append({"type": "checkpoint", "time": rfc3339(timestamp), "trigger": trigger,
                             "decisions": self.decisions_since_checkpoint, "kid": self.kid, "alg": "ES256"})
        self.decisions_since_checkpoint = 0
        return line

    def text(self) -> bytes:
        return b"".join(self.lines)


def spec_record(decision: Decision, *, clear_headers: Iterable[str] = (), hashed_headers: Iterable[str] = (),
                claims: Iterable[str] = ()) -> dict[str, Any]:
    """Return the decision record with the fields that the tamper-evident format adds."""
    record = build_record(decision)
    user = decision.user
    if user is not None:
        record["user_aud"] = list(user.audiences)
        if user.amr:
            record["user_amr"] = list(user.amr)
        if user.auth_time is not None:
            record["user_auth_time"] = int(user.auth_time)
        extra = {name: user.claims[name] for name in claims if name in user.claims}
        if extra:
            record["user_claims"] = extra
    request = decision.request
    if request is not None:
        headers = {}
        for name in clear_headers:
            if name in request.headers:
                headers[name] = request.headers[name]
        for name in hashed_headers:
            if name in request.headers:
                headers[name] = "sha256:" + hashlib.sha256(request.headers[name].encode()).hexdigest()
        if headers:
            record["headers"] = headers
        if request.context_extensions:
            record["context_extensions"] = dict(request.context_extensions)
        if request.destination_port:
            record["destination_port"] = request.destination_port
    return record


class DecisionCapture:
    """A decision log that keeps every Decision and writes its record, without a chain envelope, to memory."""

    def __init__(self, config: Config):
        self.config = config.decision_log
        self.buffer = io.BytesIO()
        self.decisions: list[Decision] = []

    def write(self, decision: Decision) -> bool:
        self.buffer.write(orjson.dumps(build_record(decision, self.config), option=orjson.OPT_SORT_KEYS) + b"\n")
        self.decisions.append(decision)
        return True

    def close(self) -> None:
        pass

    def flat_lines(self) -> bytes:
        return self.buffer.getvalue()
