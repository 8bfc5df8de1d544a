"""`extauthz serve` as a process: its decision log verifies against the audit JWKS from its HTTP listener."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from helpers import check_request
from processes import LOOPBACK, ServeProcess, http_get

VERIFY_TIMEOUT = 60


def run_verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", "audit", "verify", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=VERIFY_TIMEOUT)


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
