"""The signed hash chain of decision logs: signing, and `extauthz audit verify` on real files.

Every log here is written by a real DecisionLog to a real file with a key from `extauthz audit keygen`.
The tampering tests edit those files as an attacker with write access to them would.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from helpers import check_request, write_config

from extauthz.audit_chain import (
    ZERO_HASH,
    Chain,
    generate_signer,
    line_hash,
    load_signer,
    parse_jwks,
    serialise,
    verify_signature,
    write_key_file,
)
from extauthz.cli import main
from extauthz.config import load_config
from extauthz.decision_log import DecisionLog
from extauthz.keys import public_jwk
from extauthz.server import build_authorizer

PATHS = ["/public/a", "/admin", "/elsewhere"]
# Seconds a test waits for the writer thread to write an interval checkpoint (checkpoint_interval 1).
CHECKPOINT_TIMEOUT = 20.0


class AuditLog:
    """A decision log file written by real Checks, and the JWKS that verifies its checkpoints."""

    def __init__(self, folder: Path, idp, decision_log: dict[str, Any] | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key_path = folder / "audit-key.pem"
        write_key_file(self.key_path, generate_signer())
        self.jwks_path = folder / "audit-jwks.json"
        self.jwks_path.write_bytes(load_signer(self.key_path).jwks())
        self.path = folder / "decisions.log"
        settings = {"sink": "file:decisions.log", "signing_key_file": "audit-key.pem", **(decision_log or {})}
        self.config = load_config(write_config(folder, idp, overrides={"decision_log": settings}))
        self.decision_log = DecisionLog(self.config.decision_log)
        self.authorizer, _ = build_authorizer(self.config, self.decision_log)
        self.checks = 0

    def check(self, count: int) -> None:
        for _ in range(count):
            self.authorizer.check(check_request(path=PATHS[self.checks % len(PATHS)],
                                                request_id=f"req-{self.checks}"))
            self.checks += 1

    def close(self) -> None:
        self.decision_log.close()

    def lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines(keepends=True)

    def write_lines(self, lines: list[bytes]) -> None:
        self.path.write_bytes(b"".join(lines))


def written_log(folder: Path, idp, checks: int = 6, decision_log: dict[str, Any] | None = None) -> AuditLog:
    log = AuditLog(folder, idp, decision_log)
    try:
        log.check(checks)
    finally:
        log.close()
    return log


def verify(capsys, *args: str) -> tuple[int, dict[str, Any]]:
    """Run `extauthz audit verify --format json ARGS` in this process; return the exit code and the report."""
    code = main(["audit", "verify", "--format", "json", *args])
    return code, json.loads(capsys.readouterr().out)


def verify_text(capsys, *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


def first_finding(report: dict[str, Any], writer: int = 0) -> dict[str, Any]:
    return report["writers"][writer]["first_finding"]


def parsed(line: bytes) -> dict[str, Any]:
    return orjson.loads(line)


def decision_indexes(lines: list[bytes]) -> list[int]:
    return [index for index, line in enumerate(lines) if parsed(line)["type"] == "decision"]


# --- signing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_signature_verifies_with_pyjwt(algorithm):
    signer = generate_signer(algorithm)
    hash_hex = "ab" * 32
    signature = signer.sign(hash_hex)
    raw = jwt.utils.base64url_decode(signature)

    if algorithm == "ES256":
        assert len(raw) == 64
        verifier = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256)
    else:
        verifier = jwt.algorithms.OKPAlgorithm()
    public_key = verifier.from_jwk(json.dumps(signer.jwk))
    assert verifier.verify(hash_hex.encode(), public_key, raw)
    assert not verifier.verify(("cd" * 32).encode(), public_key, raw)
    assert "=" not in signature


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_kid_is_rfc7638_thumbprint(algorithm):
    signer = generate_signer(algorithm)
    assert signer.kid == public_jwk(signer.private_key, algorithm)["kid"]
    assert signer.jwk["alg"] == algorithm


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_jwks_round_trip(algorithm):
    signer = generate_signer(algorithm)
    keys = parse_jwks(signer.jwks(), "test")
    assert list(keys) == [signer.kid]
    key = keys[signer.kid]
    signature = signer.sign("0f" * 32)
    assert verify_signature(key, algorithm, "0f" * 32, signature)
    assert not verify_signature(key, algorithm, "f0" * 32, signature)
    assert not verify_signature(key, "ES256" if algorithm == "EdDSA" else "EdDSA", "0f" * 32, signature)


def test_chain_links_lines():
    chain = Chain("host:1:00000000", generate_signer())
    lines = [parsed(chain.checkpoint("start", time.time())), parsed(chain.decision({"decision": "allow"})),
             parsed(chain.checkpoint("shutdown", time.time()))]

    assert [line["seq"] for line in lines] == [1, 2, 3]
    assert lines[0]["prev_hash"] == ZERO_HASH
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    assert lines[2]["prev_hash"] == lines[1]["hash"]
    assert all(line["hash"] == line_hash(line) for line in lines)
    assert lines[2]["decisions"] == 1
    assert [line["trigger"] for line in lines if line["type"] == "checkpoint"] == ["start", "shutdown"]


def test_unserialisable_record_leaves_chain():
    chain = Chain("host:1:00000000", generate_signer())
    start = parsed(chain.checkpoint("start", time.time()))
    with pytest.raises(TypeError):
        chain.decision({"decision": "allow", "value": object()})
    line = parsed(chain.decision({"decision": "allow"}))
    assert line["seq"] == 2
    assert line["prev_hash"] == start["hash"]
    assert parsed(chain.checkpoint("shutdown", time.time()))["decisions"] == 1


def test_line_keys_sorted():
    chain = Chain("host:1:00000000", generate_signer())
    line = chain.decision({"zeta": 1, "alpha": 2})
    assert line.endswith(b"\n")
    assert b" " not in line
    keys = list(json.loads(line))
    assert keys == sorted(keys)


# --- verify: intact logs -------------------------------------------------------------------------------


def test_intact_log_verifies(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=6)
    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))

    assert code == 0
    assert report["ok"] is True
    assert len(report["writers"]) == 1
    writer = report["writers"][0]
    assert writer["ok"] is True
    assert writer["decisions"] == 6
    assert writer["checkpoints"] == 2
    assert writer["first_seq"] == 1
    assert writer["last_seq"] == 8


def test_intact_log_text_report(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    code, text = verify_text(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 0
    assert text.startswith("OK      ")
    assert "3 decisions, 2 checkpoints" in text
    assert "1 writers: 1 OK, 0 failed" in text


def test_interleaved_writers_verify(tmp_path, idp, capsys):
    first = AuditLog(tmp_path / "first", idp)
    second = AuditLog(tmp_path / "second", idp, {"sink": f"file:{first.path}"})
    try:
        for _ in range(5):
            first.check(1)
            second.check(1)
    finally:
        first.close()
        second.close()

    writers = [parsed(line)["writer"] for line in first.lines()]
    assert len(set(writers)) == 2
    # The lines of the two writers alternate in the one file.
    assert writers != sorted(writers)
    code, report = verify(capsys, str(first.path), "--jwks", str(first.jwks_path), "--jwks", str(second.jwks_path))
    assert code == 0
    assert [writer["ok"] for writer in report["writers"]] == [True, True]
    assert [writer["decisions"] for writer in report["writers"]] == [5, 5]


def test_shuffled_writers_verify(tmp_path, idp, capsys):
    """Lines of two writers merged in a random order across files, each writer's own order kept."""
    first = written_log(tmp_path / "first", idp, checks=8)
    second = written_log(tmp_path / "second", idp, checks=8)
    merged = []
    queues = [first.lines(), second.lines()]
    generator = random.Random(7)
    while any(queues):
        queue = generator.choice([queue for queue in queues if queue])
        merged.append(queue.pop(0))
    (tmp_path / "merged-a.log").write_bytes(b"".join(merged[: len(merged) // 2]))
    (tmp_path / "merged-b.log").write_bytes(b"".join(merged[len(merged) // 2:]))

    code, report = verify(capsys, str(tmp_path / "merged-b.log"), str(tmp_path / "merged-a.log"),
                          "--jwks", str(first.jwks_path), "--jwks", str(second.jwks_path))
    assert code == 0
    assert [writer["decisions"] for writer in report["writers"]] == [8, 8]


def test_rotated_files_any_order(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=40, decision_log={"file": {"max_bytes": 4096, "backups": 30}})
    files = sorted(tmp_path.glob("decisions.log*"))
    assert len(files) >= 4
    for path in files:
        data = path.read_bytes()
        assert len(data) <= 4096
        assert data.endswith(b"\n")
    # PATH.1 is the newest backup: its last line comes right before PATH's first line.
    newest_backup = tmp_path / "decisions.log.1"
    last_of_backup = parsed(newest_backup.read_bytes().splitlines()[-1])["seq"]
    assert parsed(log.lines()[0])["seq"] == last_of_backup + 1

    compressed = tmp_path / "decisions.log.2.gz"
    compressed.write_bytes(gzip.compress((tmp_path / "decisions.log.2").read_bytes()))
    (tmp_path / "decisions.log.2").unlink()
    names = [str(path) for path in sorted(tmp_path.glob("decisions.log*"))]
    random.Random(3).shuffle(names)

    code, report = verify(capsys, *names, "--jwks", str(log.jwks_path))
    assert code == 0
    assert report["writers"][0]["decisions"] == 40
    assert report["writers"][0]["last_seq"] == 42


def test_rotation_deletes_oldest_backup(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=40, decision_log={"file": {"max_bytes": 4096, "backups": 2}})
    assert sorted(path.name for path in tmp_path.glob("decisions.log*")) == [
        "decisions.log", "decisions.log.1", "decisions.log.2"]
    names = [str(log.path), str(tmp_path / "decisions.log.1"), str(tmp_path / "decisions.log.2")]

    code, report = verify(capsys, *names, "--jwks", str(log.jwks_path))
    assert code == 1
    assert first_finding(report)["kind"] == "missing"

    code, report = verify(capsys, *names, "--jwks", str(log.jwks_path), "--allow-missing-start")
    assert code == 0
    assert report["writers"][0]["first_seq"] > 1


def test_file_given_twice_read_once(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    code, report = verify(capsys, str(log.path), str(log.path), "--jwks", str(log.jwks_path))
    assert code == 0
    assert report["writers"][0]["duplicates"] == 0


def test_copied_file_verifies(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    copy = tmp_path / "copy-of-decisions.log"
    copy.write_bytes(log.path.read_bytes())
    code, report = verify(capsys, str(log.path), str(copy), "--jwks", str(log.jwks_path))
    assert code == 0
    assert report["writers"][0]["duplicates"] == 5


def test_rotated_set_from_current_file(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=40, decision_log={"file": {"max_bytes": 4096, "backups": 30}})
    compressed = tmp_path / "decisions.log.2.gz"
    compressed.write_bytes(gzip.compress((tmp_path / "decisions.log.2").read_bytes()))
    (tmp_path / "decisions.log.2").unlink()

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 0
    assert report["writers"][0]["decisions"] == 40
    assert report["writers"][0]["first_seq"] == 1


def test_non_record_lines_skipped(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    lines = log.lines()
    lines.insert(2, b'{"time":"2026-12-04T20:00:00.000Z","level":"info","logger":"extauthz","message":"ready"}\n')
    lines.insert(4, b"not json at all\n")
    lines.insert(5, b"\n")
    lines.append(b"[1, 2, 3]\n")
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 0
    # The empty line is neither a record nor counted.
    assert report["skipped"] == 3
    assert report["skipped_at"] == [f"{log.path}:3", f"{log.path}:5", f"{log.path}:{len(lines)}"]
    code, text = verify_text(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert f"skipped 3 lines that are not records (at {log.path}:3, " in text


def test_unchained_record_fails(tmp_path, idp, capsys):
    """A record without the envelope, which query would list as a decision, makes verify fail."""
    log = written_log(tmp_path, idp, checks=3)
    forged = {"time": "2026-12-04T20:00:00.000Z", "decision_id": "forged-1", "decision": "allow", "status": 200,
              "reason": "allowed", "user_sub": "mallory", "policies": []}
    lines = log.lines()
    lines.insert(2, orjson.dumps(forged) + b"\n")
    log.write_lines(lines)

    assert main(["audit", "query", str(log.path), "--subject", "mallory", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision_id"] == "forged-1"
    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    assert report["ok"] is False
    assert report["writers"][0]["ok"] is True
    assert report["unchained"] == 1
    assert report["unchained_at"] == [f"{log.path}:3"]
    code, text = verify_text(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert f"FAILED  1 decision records without type, writer and hash, which nothing proves (at {log.path}:3)" in text


def test_stdin_input(tmp_path, idp):
    log = written_log(tmp_path, idp, checks=3)
    result = subprocess.run([sys.executable, "-m", "extauthz", "audit", "verify", "-", "--jwks", str(log.jwks_path)],
                            input=log.path.read_bytes(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(b"OK      ")


# --- verify: without keys -------------------------------------------------------------------------------


def test_without_jwks_fails(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=2)
    code, text = verify_text(capsys, str(log.path))
    assert code == 1
    assert "signatures not checked: pass --jwks FILE" in text


def test_skip_signatures_passes(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=2)
    code, report = verify(capsys, str(log.path), "--skip-signatures")
    assert code == 0
    assert report["signatures_checked"] is False


def test_skip_signatures_still_checks_chain(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=4)
    lines = log.lines()
    del lines[decision_indexes(lines)[1]]
    log.write_lines(lines)
    code, report = verify(capsys, str(log.path), "--skip-signatures")
    assert code == 1
    assert first_finding(report)["kind"] == "missing"


# --- verify: tampering ----------------------------------------------------------------------------------


def test_edited_field_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=6)
    lines = log.lines()
    index = next(index for index in decision_indexes(lines) if parsed(lines[index])["decision"] == "deny")
    record = parsed(lines[index])
    record["decision"] = "allow"
    record["status"] = 200
    lines[index] = serialise(record)
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "altered"
    assert finding["seq"] == record["seq"]
    assert finding["where"] == f"{log.path}:{index + 1}"


def test_duplicate_key_detected(tmp_path, idp, capsys):
    """A key written twice parses to the logged value here, but some JSON tools read the first one."""
    log = written_log(tmp_path, idp, checks=6)
    lines = log.lines()
    index = next(index for index in decision_indexes(lines) if parsed(lines[index])["decision"] == "deny")
    lines[index] = b'{"decision":"allow",' + lines[index][1:]
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "altered"
    assert finding["where"] == f"{log.path}:{index + 1}"
    assert "is not written as extauthz writes a line" in finding["message"]


def test_rehashed_chain_detected(tmp_path, idp, capsys):
    """An attacker who edits a record and recomputes every hash after it cannot sign the next checkpoint."""
    log = written_log(tmp_path, idp, checks=6)
    lines = [parsed(line) for line in log.lines()]
    edited = decision_indexes(log.lines())[2]
    lines[edited]["user_sub"] = "mallory"
    for index in range(edited, len(lines)):
        lines[index]["prev_hash"] = lines[index - 1]["hash"]
        lines[index]["hash"] = line_hash(lines[index])
    log.write_lines([serialise(line) for line in lines])

    code, report = verify(capsys, str(log.path), "--skip-signatures")
    assert code == 0, "the hashes alone are consistent again"
    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "bad_signature"
    assert finding["seq"] == lines[-1]["seq"]


def test_deleted_record_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=6)
    lines = log.lines()
    index = decision_indexes(lines)[3]
    deleted_seq = parsed(lines[index])["seq"]
    del lines[index]
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "missing"
    assert f"seq {deleted_seq} not found" in finding["message"]
    assert finding["where"] == f"{log.path}:{index + 1}"


def test_reordered_pair_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=6)
    lines = log.lines()
    first, second = decision_indexes(lines)[1:3]
    lines[first], lines[second] = lines[second], lines[first]
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "reordered"
    assert finding["seq"] == parsed(lines[second])["seq"]
    assert finding["where"] == f"{log.path}:{second + 1}"


def test_renumbered_pair_detected(tmp_path, idp, capsys):
    """Two records swapped, with their seq renumbered and their hashes recomputed."""
    log = written_log(tmp_path, idp, checks=6)
    lines = [parsed(line) for line in log.lines()]
    first, second = decision_indexes(log.lines())[1:3]
    lines[first], lines[second] = lines[second], lines[first]
    lines[first]["seq"], lines[second]["seq"] = lines[second]["seq"], lines[first]["seq"]
    for index in (first, second):
        lines[index]["hash"] = line_hash(lines[index])
    log.write_lines([serialise(line) for line in lines])

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    # The record now at the first position links to the old hash of the other one, which is gone.
    assert finding["kind"] == "broken"
    assert finding["seq"] == lines[first]["seq"]
    assert finding["where"] == f"{log.path}:{first + 1}"


def test_truncated_tail_detected(tmp_path, idp, capsys):
    log = AuditLog(tmp_path, idp, {"checkpoint_interval": 1})
    try:
        log.check(3)
        interval_seq = wait_for_interval_checkpoint(log)
        log.check(3)
    finally:
        log.close()
    lines = log.lines()
    cut = next(index for index, line in enumerate(lines) if parsed(line)["seq"] == interval_seq)
    log.write_lines(lines[: cut + 1])

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "no_shutdown"
    assert f"ends with the interval checkpoint seq {interval_seq}" in finding["message"]

    log.write_lines(lines)
    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 0


def wait_for_interval_checkpoint(log: AuditLog) -> int:
    """Wait until the writer wrote an interval checkpoint; return its seq."""
    deadline = time.monotonic() + CHECKPOINT_TIMEOUT
    while time.monotonic() < deadline:
        for line in log.lines():
            record = parsed(line)
            if record["type"] == "checkpoint" and record["trigger"] == "interval":
                return record["seq"]
        time.sleep(0.1)
    raise AssertionError(f"no interval checkpoint within {CHECKPOINT_TIMEOUT:g}s")


def test_forged_signature_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    lines = log.lines()
    shutdown = parsed(lines[-1])
    assert shutdown["trigger"] == "shutdown"
    shutdown["signature"] = generate_signer().sign(shutdown["hash"])
    lines[-1] = serialise(shutdown)
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "bad_signature"
    assert finding["seq"] == shutdown["seq"]


def test_unknown_signing_key_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    lines = log.lines()
    attacker = generate_signer()
    shutdown = parsed(lines[-1])
    shutdown["kid"] = attacker.kid
    shutdown["hash"] = line_hash(shutdown)
    shutdown["signature"] = attacker.sign(shutdown["hash"])
    lines[-1] = serialise(shutdown)
    log.write_lines(lines)

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    finding = first_finding(report)
    assert finding["kind"] == "unknown_key"
    assert attacker.kid in finding["message"]


def test_unknown_writer_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    forger = Chain("attacker:1:deadbeef", generate_signer())
    forged = [forger.checkpoint("start", time.time()),
              forger.decision({"decision": "allow", "status": 200, "reason": "allowed", "user_sub": "mallory"}),
              forger.checkpoint("shutdown", time.time())]
    lines = log.lines()
    log.write_lines(lines[:2] + forged + lines[2:])

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    by_writer = {writer["writer"]: writer for writer in report["writers"]}
    assert by_writer["attacker:1:deadbeef"]["first_finding"]["kind"] == "unknown_writer"
    genuine = next(writer for name, writer in by_writer.items() if name != "attacker:1:deadbeef")
    assert genuine["ok"] is True


def test_lone_forged_record_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=2)
    record = {"type": "decision", "writer": "attacker:2:cafef00d", "seq": 1, "prev_hash": ZERO_HASH,
              "decision": "allow", "status": 200, "reason": "allowed"}
    record["hash"] = line_hash(record)
    log.write_lines(log.lines() + [serialise(record)])

    code, text = verify_text(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    assert "FAILED  attacker:2:cafef00d: unknown writer" in text


def test_malformed_record_reported(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=2)
    log.write_lines(log.lines() + [b'{"type":"decision","seq":"seven"}\n'])
    code, text = verify_text(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    assert f"FAILED  malformed record: missing writer at {log.path}:" in text


def test_lines_after_shutdown_detected(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=2)
    lines = [parsed(line) for line in log.lines()]
    extra = {**lines[1], "seq": lines[-1]["seq"] + 1, "prev_hash": lines[-1]["hash"]}
    extra["hash"] = line_hash(extra)
    log.write_lines([serialise(line) for line in lines] + [serialise(extra)])

    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    assert first_finding(report)["kind"] == "after_shutdown"


# --- verify: bad input ----------------------------------------------------------------------------------


def test_no_records_fails(tmp_path, capsys):
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"no records here\n")
    code, text = verify_text(capsys, str(empty), "--skip-signatures")
    assert code == 1
    assert "FAILED  no decision log records found" in text


def test_missing_file_exits_2(tmp_path, capsys):
    code = main(["audit", "verify", str(tmp_path / "absent.log"), "--skip-signatures"])
    assert code == 2
    assert f"{tmp_path / 'absent.log'}: file not found" in capsys.readouterr().err


def test_invalid_jwks_exits_2(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=1)
    bad = tmp_path / "bad-jwks.json"
    bad.write_text('{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', encoding="utf-8")
    code = main(["audit", "verify", str(log.path), "--jwks", str(bad)])
    assert code == 2
    assert "contains no EC P-256 or Ed25519 key" in capsys.readouterr().err


def test_truncated_gzip_exits_2(tmp_path, idp, capsys):
    log = written_log(tmp_path, idp, checks=3)
    damaged = tmp_path / "decisions.log.gz"
    damaged.write_bytes(gzip.compress(log.path.read_bytes())[:-20])
    code = main(["audit", "verify", str(damaged), "--jwks", str(log.jwks_path)])
    assert code == 2
    captured = capsys.readouterr()
    assert f"{damaged}: unreadable after line" in captured.err
    assert "a truncated or corrupt file" in captured.err
    # The lines before the damage are still checked and reported.
    assert "no shutdown checkpoint" in captured.out


def test_no_input_exits_2(capsys):
    assert main(["audit", "verify"]) == 2
    assert "no decision log given" in capsys.readouterr().err


# --- keygen and jwks ------------------------------------------------------------------------------------


def test_keygen_writes_private_key(tmp_path, capsys):
    path = tmp_path / "audit.pem"
    assert main(["audit", "keygen", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    signer = load_signer(path)
    assert signer.algorithm == "ES256"
    assert printed == {"keys": [signer.jwk]}


def test_keygen_keeps_existing_file(tmp_path, capsys):
    path = tmp_path / "audit.pem"
    path.write_text("existing", encoding="utf-8")
    assert main(["audit", "keygen", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == "existing"


def test_jwks_command_prints_key(tmp_path, idp, capsys):
    log = AuditLog(tmp_path, idp)
    log.close()
    assert main(["audit", "jwks", "--config", str(log.config.source)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(log.jwks_path.read_bytes())


def test_jwks_command_without_key(tmp_path, idp, capsys):
    config_path = write_config(tmp_path, idp)
    assert main(["audit", "jwks", "--config", str(config_path)]) == 2
    error = capsys.readouterr().err
    assert "decision_log.signing_key_file: not set" in error
    assert "/.well-known/audit-jwks.json" in error


def test_jwks_command_bad_key(tmp_path, idp, capsys):
    (tmp_path / "audit-key.pem").write_text("not a key", encoding="utf-8")
    config_path = write_config(tmp_path, idp, overrides={"decision_log": {"signing_key_file": "audit-key.pem"}})
    assert main(["audit", "jwks", "--config", str(config_path)]) == 2
    assert "is not an unencrypted PEM private key" in capsys.readouterr().err


def test_eddsa_key_file_signs(tmp_path, idp, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key_path = tmp_path / "eddsa.pem"
    key_path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    log = written_log(tmp_path, idp, checks=2, decision_log={"signing_key_file": str(key_path)})
    checkpoints = [parsed(line) for line in log.lines() if parsed(line)["type"] == "checkpoint"]
    assert [checkpoint["alg"] for checkpoint in checkpoints] == ["EdDSA", "EdDSA"]

    assert main(["audit", "jwks", "--config", str(log.config.source)]) == 0
    jwks_path = tmp_path / "eddsa-jwks.json"
    jwks_path.write_text(capsys.readouterr().out, encoding="utf-8")
    code, report = verify(capsys, str(log.path), "--jwks", str(jwks_path))
    assert code == 0
    code, report = verify(capsys, str(log.path), "--jwks", str(log.jwks_path))
    assert code == 1
    assert first_finding(report)["kind"] == "unknown_writer"
