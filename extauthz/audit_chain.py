"""The hash chain of decision log lines: canonical form, hashing, checkpoint signing and verification.

Every line a writer emits carries an envelope: `type` (`decision` or `checkpoint`), `writer`, `seq`,
`prev_hash` and `hash`. `hash` is the SHA-256 of the line's canonical form, which is the JSON object
without `hash` and `signature`, keys sorted. `prev_hash` is the `hash` of the writer's previous line,
so a checkpoint signature over `hash` commits to every earlier line of its writer.

Checkpoints are signed ES256 (raw r||s, 64 bytes) or EdDSA, base64url without padding, over the ASCII
bytes of their `hash`. Their `kid` is the RFC 7638 thumbprint of the public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

if TYPE_CHECKING:
    from extauthz.audit_read import LogEntry

ZERO_HASH = "0" * 64
LINE_TYPES = ("decision", "checkpoint")
TRIGGERS = ("start", "interval", "shutdown")
ALGORITHMS = ("ES256", "EdDSA")
# Fields outside the canonical form: the hash itself, and the signature made over it.
_UNHASHED = ("hash", "signature")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class AuditKeyError(ValueError):
    """A signing key or JWKS that cannot be used; the message names the file or key and the fix."""


def new_writer_id() -> str:
    """Return an id unique to this writer process start: `<hostname>:<pid>:<8 random hex>`."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def rfc3339(timestamp: float) -> str:
    """Format seconds since the epoch as RFC 3339 UTC with milliseconds, like the decision records."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical(line: dict[str, Any]) -> bytes:
    """Return the bytes that `hash` covers: the line without `hash` and `signature`, keys sorted."""
    return orjson.dumps({name: value for name, value in line.items() if name not in _UNHASHED},
                        option=orjson.OPT_SORT_KEYS)


def line_hash(line: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(line)).hexdigest()


def serialise(line: dict[str, Any]) -> bytes:
    """Return the line as written to a sink: JSON with sorted keys, no spaces, ending in a newline."""
    return orjson.dumps(line, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Keys and the JWKS.

def public_jwk(public_key: PublicKey) -> dict[str, Any]:
    """Return the public key as a JWK whose `kid` is its RFC 7638 thumbprint."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        members = {"crv": "P-256", "kty": "EC", "x": _b64url(numbers.x.to_bytes(32, "big")),
                   "y": _b64url(numbers.y.to_bytes(32, "big"))}
        algorithm = "ES256"
    else:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
        algorithm = "EdDSA"
    # RFC 7638: the required members only, in lexicographic order, without whitespace.
    thumbprint = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return {**members, "kid": _b64url(thumbprint), "alg": algorithm, "use": "sig"}


@dataclass(frozen=True, slots=True)
class CheckpointSigner:
    """The private key that signs checkpoints, with its algorithm and public JWK."""

    private_key: PrivateKey
    algorithm: str
    jwk: dict[str, Any]

    @property
    def kid(self) -> str:
        return self.jwk["kid"]

    def sign(self, hash_hex: str) -> str:
        data = hash_hex.encode("ascii")
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self.private_key.sign(data, ec.ECDSA(hashes.SHA256())))
            return _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return _b64url(self.private_key.sign(data))

    def jwks(self) -> bytes:
        return jwks_document([self.jwk])

    def jwks_pretty(self) -> str:
        return json.dumps({"keys": [self.jwk]}, indent=2)


def make_signer(private_key: PrivateKey) -> CheckpointSigner:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if private_key.curve.name != "secp256r1":
            raise AuditKeyError(f"an EC key on curve {private_key.curve.name} cannot sign ES256: use a P-256 key")
        algorithm = "ES256"
    elif isinstance(private_key, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
    else:
        raise AuditKeyError(f"a {type(private_key).__name__} cannot sign checkpoints: use EC P-256 or Ed25519")
    return CheckpointSigner(private_key, algorithm, public_jwk(private_key.public_key()))


def generate_signer(algorithm: str = "ES256") -> CheckpointSigner:
    if algorithm == "ES256":
        return make_signer(ec.generate_private_key(ec.SECP256R1()))
    if algorithm == "EdDSA":
        return make_signer(ed25519.Ed25519PrivateKey.generate())
    raise AuditKeyError(f"unsupported checkpoint algorithm {algorithm!r}: use ES256 or EdDSA")


def load_signer(path: Path) -> CheckpointSigner:
    """Load a PEM private key (EC P-256 or Ed25519); raise AuditKeyError naming the file and the fix."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"{path} is not an unencrypted PEM private key "
                            "(write one with `extauthz audit keygen FILE`)") from exc
    try:
        return make_signer(private_key)  # type: ignore[arg-type]
    except AuditKeyError as exc:
        raise AuditKeyError(f"{path}: {exc}") from exc


def write_key_file(path: Path, signer: CheckpointSigner) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, mode 0600; never overwrite an existing file."""
    pem = signer.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)


def jwks_document(jwks: list[dict[str, Any]]) -> bytes:
    return json.dumps({"keys": jwks}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    algorithm: str
    public_key: PublicKey


def parse_jwks(data: bytes | str, origin: str) -> dict[str, VerificationKey]:
    """Return the usable checkpoint keys of a JWKS document, by RFC 7638 thumbprint.

    Raises AuditKeyError naming `origin` when the document is not a JWKS or contains no usable key.
    """
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise AuditKeyError(f"{origin} is not JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise AuditKeyError(f"{origin} is not a JWKS: expected an object with a `keys` list")
    keys: dict[str, VerificationKey] = {}
    for jwk in document["keys"]:
        key = _jwk_key(jwk)
        if key is not None:
            keys[key.kid] = key
    if not keys:
        raise AuditKeyError(f"{origin} contains no EC P-256 or Ed25519 key: pass the audit JWKS of the writers")
    return keys


def _jwk_key(jwk: object) -> VerificationKey | None:
    if not isinstance(jwk, dict):
        return None
    try:
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
            x = int.from_bytes(_b64url_decode(jwk["x"]), "big")
            y = int.from_bytes(_b64url_decode(jwk["y"]), "big")
            public_key: PublicKey = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        elif jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            public_key = ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk["x"]))
        else:
            return None
    except (KeyError, ValueError, TypeError):
        return None
    described = public_jwk(public_key)
    return VerificationKey(described["kid"], described["alg"], public_key)


def verify_signature(key: VerificationKey, algorithm: str, hash_hex: str, signature: object) -> bool:
    """Return whether `signature` is `key`'s signature of `hash_hex` under `algorithm`."""
    if algorithm != key.algorithm or not isinstance(signature, str):
        return False
    try:
        raw = _b64url_decode(signature)
    except ValueError:
        return False
    data = hash_hex.encode("ascii", errors="replace")
    try:
        if isinstance(key.public_key, ec.EllipticCurvePublicKey):
            if len(raw) != 64:
                return False
            der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            key.public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.public_key.verify(raw, data)
    except InvalidSignature:
        return False
    return True


# Building the chain.

class Chain:
    """One writer's chain state: the next `seq` and the `hash` of the last line. Not thread-safe."""

    def __init__(self, writer: str, signer: CheckpointSigner):
        self.writer = writer
        self.signer = signer
        self.seq = 0
        self.prev_hash = ZERO_HASH
        self.decisions_since_checkpoint = 0

    def decision(self, record: dict[str, Any]) -> bytes:
        """Return the serialised decision line for `record`, with its envelope.

        Raises TypeError when the record cannot be serialised; the chain is then unchanged.
        """
        serialised = self._seal({**record, "type": "decision"})
        self.decisions_since_checkpoint += 1
        return serialised

    def checkpoint(self, trigger: str, now: float) -> bytes:
        """Return the serialised, signed checkpoint line."""
        line: dict[str, Any] = {"type": "checkpoint", "time": rfc3339(now), "trigger": trigger,
                                "decisions": self.decisions_since_checkpoint, "kid": self.signer.kid,
                                "alg": self.signer.algorithm}
        serialised = self._seal(line)
        self.decisions_since_checkpoint = 0
        return serialised

    def _seal(self, line: dict[str, Any]) -> bytes:
        line.update(writer=self.writer, seq=self.seq + 1, prev_hash=self.prev_hash)
        line.pop("signature", None)
        line["hash"] = line_hash(line)
        if line["type"] == "checkpoint":
            line["signature"] = self.signer.sign(line["hash"])
        serialised = serialise(line)
        self.seq += 1
        self.prev_hash = line["hash"]
        return serialised


# Verifying chains.

@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # altered, missing, reordered, broken, bad_signature, unknown_key, no_shutdown, unknown_writer, ...
    message: str
    seq: int | None = None
    where: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "seq": self.seq, "where": self.where}


@dataclass(slots=True)
class WriterReport:
    writer: str
    lines: int = 0
    decisions: int = 0
    checkpoints: int = 0
    signed_checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    duplicates: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {"writer": self.writer, "ok": self.ok, "lines": self.lines, "decisions": self.decisions,
                "checkpoints": self.checkpoints, "signed_checkpoints": self.signed_checkpoints,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "duplicates": self.duplicates,
                "first_finding": self.findings[0].as_dict() if self.findings else None,
                "findings": len(self.findings)}


@dataclass(slots=True)
class VerifyReport:
    writers: list[WriterReport]
    malformed: list[Finding]
    # Locations of decision records without the envelope, written by a version from before the envelope
    # or added by someone else. Query, stats and replay read them, but nothing proves them.
    unchained: list[str]
    signatures_checked: bool

    @property
    def ok(self) -> bool:
        return (bool(self.writers) and not self.malformed and not self.unchained
                and all(writer.ok for writer in self.writers))


@dataclass(frozen=True, slots=True)
class ChainLine:
    """One enveloped line: its record, its bytes as read, where, its place among all lines, and its input."""

    line: dict[str, Any]
    raw: bytes
    where: str
    index: int
    input: str


def _envelope_problem(line: dict[str, Any]) -> str | None:
    """Return what is wrong with a line's envelope, or None when the chain can be checked with it."""
    if line.get("type") not in LINE_TYPES:
        return f"type {line.get('type')!r} is neither decision nor checkpoint"
    if not isinstance(line.get("writer"), str) or not line["writer"]:
        return "missing writer"
    seq = line.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return f"invalid seq {seq!r}"
    for name in ("prev_hash", "hash"):
        value = line.get(name)
        if not isinstance(value, str) or len(value) != 64:
            return f"invalid {name} {value!r}"
    return None


def verify_entries(entries: Iterable[LogEntry], keys: dict[str, VerificationKey] | None,
                   allow_missing_start: bool = False) -> VerifyReport:
    """Verify every writer's chain in the records of an audit_read.LogReader.

    With `keys` None, checkpoint signatures are not checked. With `allow_missing_start`, a writer's
    chain may begin after seq 1, as when rotation deleted its oldest file; it is checked from its
    first line present.
    """
    # NOTE: every line is held in memory at once, about 2-4 KB per line with its parsed form. Logs of
    # millions of lines need a verifier that streams each writer's lines in seq order.
    malformed: list[Finding] = []
    unchained: list[str] = []
    by_writer: dict[str, list[ChainLine]] = {}
    for index, entry in enumerate(entries):
        record = entry.record
        if "type" not in record:
            unchained.append(entry.source)
            continue
        problem = _envelope_problem(record)
        if problem is not None:
            seq = record.get("seq")
            malformed.append(Finding("malformed", f"malformed record: {problem}",
                                     seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                                     entry.source))
            continue
        by_writer.setdefault(record["writer"], []).append(
            ChainLine(record, entry.line, entry.source, index, entry.origin))

    reports = [_verify_writer(writer, lines, keys, allow_missing_start)
               for writer, lines in sorted(by_writer.items())]
    return VerifyReport(reports, malformed, unchained, keys is not None)


def _verify_writer(writer: str, entries: list[ChainLine], keys: dict[str, VerificationKey] | None,
                   allow_missing_start: bool) -> WriterReport:
    report = WriterReport(writer)
    findings: list[Finding] = []

    findings.extend(_order_findings(entries))
    chain = _deduplicate(sorted(entries, key=lambda entry: (entry.line["seq"], entry.index)), report, findings)
    report.lines = len(chain)
    report.first_seq = chain[0].line["seq"]
    report.last_seq = chain[-1].line["seq"]
    by_hash = {entry.line["hash"]: entry for entry in chain}

    previous: ChainLine | None = None
    decisions_since_checkpoint = 0
    contiguous = True
    last_checkpoint: ChainLine | None = None
    for entry in chain:
        line = entry.line
        seq = line["seq"]
        if line_hash(line) != line["hash"]:
            findings.append(Finding("altered", f"altered: seq {seq} at {entry.where}: its hash does not match "
                                    "its content", seq, entry.where))
        elif entry.raw and entry.raw != serialise(line)[:-1]:
            # The hash covers the parsed line. Bytes that parse to the same object but read differently
            # elsewhere (a key given twice, added spaces) are an edit too.
            findings.append(Finding("altered", f"altered: seq {seq} at {entry.where} is not written as extauthz "
                                    "writes a line (keys sorted and each once, no spaces)", seq, entry.where))

        expected_seq = 1 if previous is None else previous.line["seq"] + 1
        if previous is None and seq > 1 and allow_missing_start:
            contiguous = False
        elif seq != expected_seq:
            contiguous = False
            missing = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seq {expected_seq} to {seq - 1}"
            findings.append(Finding("missing", f"missing: {missing} not found before seq {seq} at {entry.where}",
                                    seq, entry.where))
        elif previous is None and line["prev_hash"] != ZERO_HASH:
            findings.append(Finding("broken", f"broken: seq 1 at {entry.where} has a prev_hash other than zeros",
                                    seq, entry.where))
        elif previous is not None and line["prev_hash"] != previous.line["hash"]:
            findings.append(_link_finding(entry, previous, by_hash))

        if line["type"] == "decision":
            report.decisions += 1
            decisions_since_checkpoint += 1
        else:
            report.checkpoints += 1
            findings.extend(_checkpoint_findings(entry, keys, decisions_since_checkpoint if contiguous else None,
                                                 report))
            decisions_since_checkpoint = 0
            contiguous = True
            last_checkpoint = entry
        previous = entry

    findings.extend(_tail_findings(chain, last_checkpoint))
    findings.sort(key=lambda finding: finding.seq or 0)
    if report.signed_checkpoints == 0:
        if report.checkpoints == 0:
            reason = "none of its lines is a checkpoint, so no signature shows who wrote them"
        else:
            reason = f"none of its {report.checkpoints} checkpoints has a valid signature by a key of the JWKS"
        findings.insert(0, Finding("unknown_writer", f"unknown writer: {reason}"))
    report.findings = findings
    return report


def _order_findings(entries: list[ChainLine]) -> list[Finding]:
    """Find lines that come after a higher seq in the same input: one writer appends in seq order."""
    findings = []
    last_in_input: dict[str, ChainLine] = {}
    for entry in entries:
        before = last_in_input.get(entry.input)
        if before is not None and entry.line["seq"] < before.line["seq"]:
            seq = entry.line["seq"]
            findings.append(Finding("reordered", f"reordered: seq {seq} at {entry.where} comes after seq "
                                    f"{before.line['seq']} at {before.where}", seq, entry.where))
        if before is None or entry.line["seq"] > before.line["seq"]:
            last_in_input[entry.input] = entry
    return findings


def _deduplicate(chain: list[ChainLine], report: WriterReport, findings: list[Finding]) -> list[ChainLine]:
    """Drop exact copies of a line (a rotated file given twice); report different lines with one seq."""
    unique: list[ChainLine] = []
    for entry in chain:
        if unique and unique[-1].line["seq"] == entry.line["seq"]:
            kept = unique[-1]
            if kept.line == entry.line and kept.raw == entry.raw:
                report.duplicates += 1
            else:
                seq = entry.line["seq"]
                findings.append(Finding("altered", f"altered: two different lines with seq {seq}, at {kept.where} "
                                        f"and {entry.where}", seq, entry.where))
            continue
        unique.append(entry)
    return unique


def _link_finding(entry: ChainLine, previous: ChainLine, by_hash: dict[str, ChainLine]) -> Finding:
    seq = entry.line["seq"]
    linked = by_hash.get(entry.line["prev_hash"])
    if linked is not None:
        return Finding("reordered", f"reordered: seq {seq} at {entry.where} follows seq {linked.line['seq']} "
                       "in the chain", seq, entry.where)
    return Finding("broken", f"broken: the prev_hash of seq {seq} at {entry.where} does not match the hash of "
                   f"seq {previous.line['seq']} at {previous.where}", seq, entry.where)


def _checkpoint_findings(entry: ChainLine, keys: dict[str, VerificationKey] | None, decisions: int | None,
                         report: WriterReport) -> list[Finding]:
    line = entry.line
    seq = line["seq"]
    where = entry.where
    findings = []
    trigger = line.get("trigger")
    if trigger not in TRIGGERS:
        findings.append(Finding("invalid_checkpoint", f"invalid checkpoint: seq {seq} at {where} has trigger "
                                f"{trigger!r}", seq, where))
    elif (trigger == "start") != (seq == 1):
        expected = "seq 1 must be a start checkpoint" if seq == 1 else "a start checkpoint must be seq 1"
        findings.append(Finding("invalid_checkpoint", f"invalid checkpoint: seq {seq} at {where}: {expected}",
                                seq, where))
    counted = line.get("decisions")
    if decisions is not None and counted != decisions:
        findings.append(Finding("invalid_checkpoint", f"invalid checkpoint: seq {seq} at {where} counts {counted!r} "
                                f"decisions, the chain has {decisions}", seq, where))
    if keys is None:
        report.signed_checkpoints += 1
        return findings

    kid = line.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        findings.append(Finding("unknown_key", f"unknown key: checkpoint seq {seq} at {where} is signed by kid "
                                f"{kid!r}, which the JWKS does not hold", seq, where))
    elif not verify_signature(key, line.get("alg"), line["hash"], line.get("signature")):  # type: ignore[arg-type]
        findings.append(Finding("bad_signature", f"bad signature: checkpoint seq {seq} at {where}", seq, where))
    elif line_hash(line) == line["hash"]:
        report.signed_checkpoints += 1
    return findings


def _tail_findings(chain: list[ChainLine], last_checkpoint: ChainLine | None) -> list[Finding]:
    last = chain[-1]
    seq = last.line["seq"]
    shutdowns = [entry for entry in chain if entry.line["type"] == "checkpoint" and
                 entry.line.get("trigger") == "shutdown"]
    if shutdowns and shutdowns[0] is not last:
        first = shutdowns[0]
        return [Finding("after_shutdown", f"lines after the shutdown checkpoint seq {first.line['seq']} at "
                        f"{first.where}: the chain continues to seq {seq}", first.line["seq"] + 1, last.where)]
    if shutdowns:
        return []
    if last_checkpoint is None:
        return [Finding("no_shutdown", f"no shutdown checkpoint: the chain ends at seq {seq} at {last.where} "
                        "without any checkpoint", seq, last.where)]
    checkpoint_seq = last_checkpoint.line["seq"]
    if last_checkpoint is last:
        return [Finding("no_shutdown", f"no shutdown checkpoint: the chain ends with the {last.line.get('trigger')} "
                        f"checkpoint seq {seq} at {last.where}; later lines may be missing, or the writer is still "
                        "running", seq, last.where)]
    return [Finding("no_shutdown", f"no shutdown checkpoint: the chain ends at seq {seq} at {last.where}, after "
                    f"its last checkpoint seq {checkpoint_seq}; later lines may be missing, or the writer is "
                    "still running", seq, last.where)]


def read_jwks_source(source: str, timeout: float = 10.0) -> dict[str, VerificationKey]:
    """Load checkpoint keys from a JWKS file or an http(s) URL; raise AuditKeyError naming the source."""
    if source.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310 - the operator's URL
                data = response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise AuditKeyError(f"cannot fetch the JWKS at {source}: {exc}") from exc
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise AuditKeyError(f"cannot read the JWKS file {source}: {exc.strerror}") from exc
    return parse_jwks(data, source)

