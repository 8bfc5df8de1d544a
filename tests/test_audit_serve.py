"""`extauthz serve` as a process: its decision log verifies against the audit JWKS from its HTTP listener,
and `audit verify` finds each kind of tampering in a rotated log that serve wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from helpers import check_request
from processes import LOOPBACK, ServeProcess, http_get

VERIFY_TIMEOUT = 60
# Seconds a test waits for serve to write an interval checkpoint (checkpoint_interval 1).
CHECKPOINT_TIMEOUT = 20.0


def run_audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", "audit", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=VERIFY_TIMEOUT)


def run_verify(*args: str) -> subprocess.CompletedProcess:
    return run_audit("verify", *args)


def test_serve_log_verifies(tmp_path, idp):
    server = ServeProcess(tmp_path, idp)
    try:
        server.start()
        server.wait_ready()
        with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            allowed = stub.Check(check_request(path="/admin", token=idp.token(), request_id="req-allow"), timeout=10)
            denied = stub.Check(check_request(path="/admin", request_id="req-deny"), timeout=10)
        assert allowed.status.code == code_pb2.OK
        assert denied.status.code != code_pb2.OK
        server.wait_for_record(request_id="req-deny")

        status, headers, body = http_get(server.http_port, "/.well-known/audit-jwks.json")
        assert status == 200
        assert headers["content-type"] == "application/jwk-set+json"
        keys = json.loads(body)["keys"]
        assert len(keys) == 1
        assert "d" not in keys[0], "private key material in the audit JWKS"
        jwks_path = tmp_path / "audit-jwks.json"
        jwks_path.write_bytes(body)

        # While serve runs, its chain has no shutdown checkpoint yet; the signatures already check out.
        running = run_verify(str(server.stdout_path), "--jwks",
                             f"http://{LOOPBACK}:{server.http_port}/.well-known/audit-jwks.json")
        assert running.returncode == 1
        assert b"no shutdown checkpoint" in running.stdout
        assert b"signature" not in running.stdout
    finally:
        assert server.stop() == 0

    lines = server.decision_lines()
    assert [line["type"] for line in lines] == ["checkpoint", "decision", "decision", "checkpoint"]
    assert lines[0]["kid"] == keys[0]["kid"]
    stopped = run_verify(str(server.stdout_path), "--jwks", str(jwks_path))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.startswith(b"OK      ")
    assert b"2 decisions, 2 checkpoints" in stopped.stdout
    warnings = [json.loads(line) for line in server.stderr().splitlines() if b"signing_key_file is not set" in line]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


def rotated_set(folder: Path) -> list[Path]:
    """Return decisions.log.N ... decisions.log.1, decisions.log in `folder`: oldest first."""
    backups = sorted(folder.glob("decisions.log.*"), key=lambda path: int(path.suffix[1:]), reverse=True)
    return [*backups, folder / "decisions.log"]


def logged_lines(folder: Path) -> list[tuple[Path, int, dict]]:
    """Return (file, index in the file, parsed line) of every line of the rotated set, oldest first."""
    return [(path, index, json.loads(line)) for path in rotated_set(folder)
            for index, line in enumerate(path.read_bytes().splitlines())]


def edit_lines(path: Path, edit) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    edit(lines)
    path.write_bytes(b"".join(lines))


def verify_json(log_path: Path, jwks_path: Path) -> tuple[int, dict]:
    result = run_verify(str(log_path), "--jwks", str(jwks_path), "--format", "json")
    return result.returncode, json.loads(result.stdout)


def wait_for_interval_checkpoint(folder: Path) -> None:
    deadline = time.monotonic() + CHECKPOINT_TIMEOUT
    while time.monotonic() < deadline:
        if any(line.get("trigger") == "interval" for _, _, line in logged_lines(folder)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no interval checkpoint within {CHECKPOINT_TIMEOUT:g}s")


def test_serve_log_tampering_found(tmp_path, idp):
    key_path = tmp_path / "audit-key.pem"
    assert run_audit("keygen", str(key_path)).returncode == 0
    folder = tmp_path / "logs"
    folder.mkdir()
    overrides = {"decision_log": {"sink": "file:logs/decisions.log", "file": {"max_bytes": 4096, "backups": 50},
                                  "checkpoint_interval": 1, "signing_key_file": str(key_path)}}
    server = ServeProcess(tmp_path, idp, overrides=overrides)
    try:
        server.start()
        server.wait_ready()
        with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for index in range(12):
                if index == 6:
                    wait_for_interval_checkpoint(folder)
                token = idp.token() if index % 2 else None
                stub.Check(check_request(path="/admin", token=token, request_id=f"req-{index}"), timeout=10)
        _, _, jwks = http_get(server.http_port, "/.well-known/audit-jwks.json")
    finally:
        assert server.stop() == 0
    jwks_path = tmp_path / "audit-jwks.json"
    jwks_path.write_bytes(jwks)
    assert len(rotated_set(folder)) >= 3

    code, report = verify_json(folder / "decisions.log", jwks_path)
    assert code == 0, report
    assert report["writers"][0]["decisions"] == 12
    assert report["writers"][0]["first_seq"] == 1

    lines = logged_lines(folder)
    decisions = [(path, index, line) for path, index, line in lines if line["type"] == "decision"]
    denied_path, denied_index, denied = next(entry for entry in decisions if entry[2]["decision"] == "deny")
    deleted_path, deleted_index, deleted = decisions[5]
    swapped_path, swapped_index, _ = next(entry for position, entry in enumerate(decisions[:-1])
                                          if decisions[position + 1][0] == entry[0])
    interval_path, interval_index, interval = next(entry for entry in lines if entry[2].get("trigger") == "interval")

    def edit_field(copy: Path) -> None:
        def allow(lines: list[bytes]) -> None:
            lines[denied_index] = json.dumps({**denied, "decision": "allow", "status": 200},
                                             separators=(",", ":"), sort_keys=True).encode() + b"\n"
        edit_lines(copy / denied_path.name, allow)

    def delete_line(copy: Path) -> None:
        edit_lines(copy / deleted_path.name, lambda lines: lines.pop(deleted_index))

    def swap_lines(copy: Path) -> None:
        def swap(lines: list[bytes]) -> None:
            lines[swapped_index], lines[swapped_index + 1] = lines[swapped_index + 1], lines[swapped_index]
        edit_lines(copy / swapped_path.name, swap)

    def cut_tail(copy: Path) -> None:
        def cut(lines: list[bytes]) -> None:
            del lines[interval_index + 1:]
        edit_lines(copy / interval_path.name, cut)
        files = rotated_set(copy)
        for newer in files[files.index(copy / interval_path.name) + 1:]:
            newer.write_bytes(b"")

    cases = [
        (edit_field, "altered", f"seq {denied['seq']} at "),
        (delete_line, "missing", f"seq {deleted['seq']} not found"),
        (swap_lines, "reordered", "comes after seq"),
        (cut_tail, "no_shutdown", f"ends with the interval checkpoint seq {interval['seq']}"),
    ]
    for tamper, kind, message in cases:
        copy = tmp_path / tamper.__name__
        shutil.copytree(folder, copy)
        tamper(copy)
        code, report = verify_json(copy / "decisions.log", jwks_path)
        assert code == 1, (tamper.__name__, report)
        finding = report["writers"][0]["first_finding"]
        assert finding["kind"] == kind, (tamper.__name__, finding)
        assert message in finding["message"], (tamper.__name__, finding)
