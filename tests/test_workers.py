"""`extauthz serve --workers N` without Envoy: the configurations it rejects, the per-worker files,
and a supervisor that stops every worker on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from helpers import check_request, write_config
from processes import (
    LOOPBACK,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    ServeProcess,
    consecutive_ports,
    http_get,
    loopback_ports,
)
from redis_servers import redis_server  # noqa: F401

from extauthz.config import DecisionLogConfig
from extauthz.dev_idp import generate_idp_keys
from extauthz.server import worker_decision_log, worker_path

RPC_TIMEOUT = 5.0


def run_serve(config_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(config_path), *arguments],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def worker_listen(first_worker_port: int | None = None) -> dict[str, str]:
    grpc_port, http_port = loopback_ports(2)
    listen = {"grpc": f"{LOOPBACK}:{grpc_port}", "http": f"{LOOPBACK}:{http_port}"}
    if first_worker_port is not None:
        listen["worker_grpc"] = f"{LOOPBACK}:{first_worker_port}"
    return listen


def log_records(stderr: bytes) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]


def test_worker_path_keeps_suffix():
    assert worker_path(Path("/var/log/decisions.jsonl"), 1) == Path("/var/log/decisions.worker-1.jsonl")
    assert worker_path(Path("/var/log/decisions"), 0) == Path("/var/log/decisions.worker-0")


def test_worker_decision_log_stdout_shared():
    stdout = DecisionLogConfig("stdout", None)
    file = DecisionLogConfig("file", Path("/logs/d.jsonl"))
    assert worker_decision_log(stdout, 3) == stdout
    assert worker_decision_log(file, 3) == DecisionLogConfig("file", Path("/logs/d.worker-3.jsonl"))


def test_memory_store_rejected(tmp_path, idp):
    config_path = write_config(tmp_path, idp, overrides={"listen": worker_listen(consecutive_ports(2))})
    result = run_serve(config_path, "--workers", "2")
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "store.url" in stderr
    assert "memory:// is private to each process" in stderr
    assert "redis://" in stderr


def test_memory_store_rejected_from_file(tmp_path, idp):
    overrides = {"listen": worker_listen(consecutive_ports(2)), "server": {"workers": 2}}
    result = run_serve(write_config(tmp_path, idp, overrides=overrides))
    assert result.returncode == 2
    assert "store.url" in result.stderr.decode()


def test_missing_worker_grpc_rejected(tmp_path, idp):
    overrides = {"listen": worker_listen(), "store": {"url": "redis://127.0.0.1:1/0"}}
    result = run_serve(write_config(tmp_path, idp, overrides=overrides), "--workers", "2")
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "listen.worker_grpc" in stderr
    assert "worker i listens on that port + i" in stderr


def test_worker_ports_overlap_rejected(tmp_path, idp):
    listen = worker_listen()
    listen["worker_grpc"] = listen["grpc"]
    overrides = {"listen": listen, "store": {"url": "redis://127.0.0.1:1/0"}}
    result = run_serve(write_config(tmp_path, idp, overrides=overrides), "--workers", "2")
    assert result.returncode == 2
    assert "include listen.grpc port" in result.stderr.decode()


@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_bad_worker_count_rejected(tmp_path, idp, count):
    result = run_serve(write_config(tmp_path, idp), "--workers", count)
    assert result.returncode == 2
    assert f"invalid worker count '{count}'" in result.stderr.decode()


def test_busy_worker_port_exits_2(tmp_path, idp):
    first = consecutive_ports(2)
    overrides = {"listen": worker_listen(first), "store": {"url": "redis://127.0.0.1:1/0"}}
    config_path = write_config(tmp_path, idp, overrides=overrides)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((LOOPBACK, first + 1))
        holder.listen()
        result = run_serve(config_path, "--workers", "2")
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "listen.worker_grpc" in stderr
    assert f"{first + 1}" in stderr


def test_sigterm_stops_every_worker(tmp_path, idp, redis_server):  # noqa: F811
    server = ServeProcess(tmp_path, idp, workers=2, overrides={"store": {"url": redis_server.url}})
    try:
        server.start()
        server.wait_ready()
        worker_pids = [record["pid"] for record in log_records(server.stderr())
                       if record.get("message") == "worker started"]
        answers = []
        for port in server.worker_ports:
            with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                answers.append(stub.Check(check_request(), timeout=RPC_TIMEOUT).dynamic_metadata["reason"])
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=STOP_TIMEOUT)
    finally:
        server.stop()

    assert answers == ["allowed", "allowed"]
    assert len(worker_pids) == 2
    assert exit_code == 0
    for pid in worker_pids:
        # The supervisor waited for each worker, so the pid no longer exists.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    messages = [record["message"] for record in log_records(server.stderr())]
    assert messages.count("stopped") == 3


def test_sighup_reaches_every_worker(tmp_path, idp, redis_server):  # noqa: F811
    server = ServeProcess(tmp_path, idp, workers=2, overrides={"store": {"url": redis_server.url}})
    try:
        server.start()
        server.wait_ready()
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        # Each worker logs "reloaded" once it applied the reload; poll the log, bounded by the stop timeout.
        for _ in range(int(STOP_TIMEOUT / 0.1)):
            reloaded = {record.get("worker") for record in log_records(server.stderr())
                        if record.get("message") == "reloaded"}
            if reloaded == {0, 1}:
                break
            time.sleep(0.1)
    finally:
        server.stop()
    assert reloaded == {0, 1}


def test_supervisor_readyz_and_jwks(tmp_path, idp, redis_server):  # noqa: F811
    server = ServeProcess(tmp_path, idp, workers=2, overrides={"store": {"url": redis_server.url}})
    try:
        server.start()
        server.wait_ready()
        status, _, body = http_get(server.http_port, "/readyz")
        _, _, jwks = http_get(server.http_port, "/.well-known/jwks.json")
    finally:
        server.stop()
    assert status == 200
    assert json.loads(body) == {"status": "ready", "store": "ok"}
    # Each worker has a current and a next key.
    assert len(json.loads(jwks)["keys"]) == 4


def test_example_envoy_config_current(tmp_path):
    examples = Path(__file__).resolve().parent.parent / "examples"
    shutil.copy(examples / "workers.yaml", tmp_path / "workers.yaml")
    shutil.copytree(examples / "policies", tmp_path / "policies")
    generate_idp_keys(tmp_path / "dev-idp")
    command = [sys.executable, "-m", "extauthz", "envoy-config", "--config", str(tmp_path / "workers.yaml")]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    shipped = (examples / "envoy-workers.yaml").read_text(encoding="utf-8")

    assert result.returncode == 0, result.stderr.decode()
    # The shipped file is the command's output after a comment header.
    assert shipped.endswith(result.stdout.decode())
    assert yaml.safe_load(shipped) == yaml.safe_load(result.stdout)


def started_workers(stderr: bytes) -> list[tuple[int, int]]:
    """Return (worker index, pid) of every worker start in the supervisor's log, in order."""
    return [(record["worker"], record["pid"]) for record in log_records(stderr)
            if record.get("message") == "worker started"]


def test_supervisor_never_loads_grpcio(tmp_path, idp, redis_server):  # noqa: F811
    server = ServeProcess(tmp_path, idp, workers=2, overrides={"store": {"url": redis_server.url}})
    try:
        server.start()
        server.wait_ready()
        assert server.process is not None
        supervisor_maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        worker_maps = [Path(f"/proc/{pid}/maps").read_text() for _, pid in started_workers(server.stderr())]
    finally:
        server.stop()
    # grpcio's core is the extension module cygrpc: mapped into every worker, never into the supervisor.
    assert "cygrpc" not in supervisor_maps
    assert len(worker_maps) == 2
    assert all("cygrpc" in maps for maps in worker_maps)


def test_cpu_affinity_pins_workers(tmp_path, idp, redis_server):  # noqa: F811
    overrides = {"store": {"url": redis_server.url}, "server": {"cpu_affinity": True}}
    server = ServeProcess(tmp_path, idp, workers=2, overrides=overrides)
    cpus = sorted(os.sched_getaffinity(0))
    try:
        server.start()
        server.wait_ready()
        affinity = {index: os.sched_getaffinity(pid) for index, pid in started_workers(server.stderr())}
    finally:
        server.stop()
    assert affinity == {0: {cpus[0]}, 1: {cpus[1 % len(cpus)]}}


def test_crash_loop_stops_service(tmp_path, idp, redis_server):  # noqa: F811
    server = ServeProcess(tmp_path, idp, workers=2, overrides={"store": {"url": redis_server.url}})
    killed: list[int] = []
    try:
        server.start()
        server.wait_ready()
        assert server.process is not None
        # Kill worker 0 each time it starts again, until the supervisor gives up: at most 10 kills, each
        # waiting at most STOP_TIMEOUT seconds for the next start.
        for _ in range(10):
            pid = [pid for index, pid in started_workers(server.stderr()) if index == 0][-1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and server.process.poll() is None:
                if [pid for index, pid in started_workers(server.stderr()) if index == 0][-1] != killed[-1]:
                    break
                time.sleep(0.05)
            if server.process.poll() is not None:
                break
        exit_code = server.process.wait(timeout=STOP_TIMEOUT)
    finally:
        server.stop()
    messages = [record["message"] for record in log_records(server.stderr())]
    assert exit_code == 1
    assert len(killed) == 6
    assert messages.count("worker exited; starting it again") == 5
    assert "workers keep exiting; stopping the service" in messages


def verify_report(log_path: Path, jwks_path: Path) -> tuple[int, dict]:
    """Run `extauthz audit verify --format json` on a log; return the exit code and the report."""
    return verify_report_options(log_path, "--jwks", str(jwks_path))


def verify_report_options(log_path: Path, *options: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "extauthz", "audit", "verify", str(log_path), *options,
                             "--format", "json"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


def check_worker(port: int, count: int) -> list[str]:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return [stub.Check(check_request(request_id=f"w{port}-{index}"), timeout=RPC_TIMEOUT)
                .dynamic_metadata["reason"] for index in range(count)]


def listening_count(stderr: bytes, worker: int) -> int:
    return sum(1 for record in log_records(stderr)
               if record.get("message") == "worker listening" and record.get("worker") == worker)


def test_worker_logs_verify_with_supervisor_jwks(tmp_path, idp, redis_server):  # noqa: F811
    overrides = {"store": {"url": redis_server.url}, "decision_log": {"sink": "file:decisions.log"}}
    server = ServeProcess(tmp_path, idp, workers=2, overrides=overrides)
    try:
        server.start()
        server.wait_ready()
        answers = [check_worker(port, 2) for port in server.worker_ports]
        status, headers, jwks = http_get(server.http_port, "/.well-known/audit-jwks.json")
    finally:
        assert server.stop() == 0

    assert answers == [["allowed", "allowed"], ["allowed", "allowed"]]
    assert status == 200
    assert headers["content-type"] == "application/jwk-set+json"
    keys = json.loads(jwks)["keys"]
    # No signing_key_file: each worker signs with a key of its own.
    assert len({key["kid"] for key in keys}) == 2
    jwks_path = tmp_path / "audit-jwks.json"
    jwks_path.write_bytes(jwks)
    for index in range(2):
        code, report = verify_report(tmp_path / f"decisions.worker-{index}.log", jwks_path)
        assert code == 0, report
        assert len(report["writers"]) == 1
        assert report["writers"][0]["decisions"] == 2


def test_killed_worker_key_in_audit_jwks(tmp_path, idp, redis_server):  # noqa: F811
    """A worker killed before anyone fetched the audit JWKS: the supervisor still serves its key."""
    overrides = {"store": {"url": redis_server.url}, "decision_log": {"sink": "file:decisions.log"}}
    server = ServeProcess(tmp_path, idp, workers=2, overrides=overrides)
    try:
        server.start()
        server.wait_ready()
        first_answers = check_worker(server.worker_ports[0], 2)
        killed = [pid for index, pid in started_workers(server.stderr()) if index == 0][-1]
        os.kill(killed, signal.SIGKILL)
        # The supervisor starts worker 0 again after a second; wait until the new one listens.
        deadline = time.monotonic() + READY_TIMEOUT
        while listening_count(server.stderr(), 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listening_count(server.stderr(), 0) == 2, "worker 0 did not listen again"
        second_answers = check_worker(server.worker_ports[0], 1)
        _, _, jwks = http_get(server.http_port, "/.well-known/audit-jwks.json")
    finally:
        assert server.stop() == 0

    assert first_answers == ["allowed", "allowed"]
    assert second_answers == ["allowed"]
    assert len(json.loads(jwks)["keys"]) == 3
    jwks_path = tmp_path / "audit-jwks.json"
    jwks_path.write_bytes(jwks)
    code, report = verify_report(tmp_path / "decisions.worker-0.log", jwks_path)
    writers = {writer["writer"].split(":")[1]: writer for writer in report["writers"]}
    assert code == 1
    killed_writer = writers[str(killed)]
    # Its signed start checkpoint verifies; only the tail after it has no signature.
    assert killed_writer["first_finding"]["kind"] == "no_shutdown"
    assert killed_writer["findings"] == 1
    assert killed_writer["decisions"] == 2
    restarted = [writer for pid, writer in writers.items() if pid != str(killed)]
    assert len(restarted) == 1
    assert restarted[0]["ok"] is True
    assert restarted[0]["decisions"] == 1


def copy_slowly(stream: IO[bytes], path: Path) -> None:
    """Copy `stream` to `path` in small reads with pauses, so that the writers find the pipe full."""
    with open(path, "wb") as output:
        while chunk := stream.read1(1000):
            output.write(chunk)
            time.sleep(0.0005)


def send_checks(port: int, tag: str, count: int) -> None:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for index in range(count):
            stub.Check(check_request(request_id=f"{tag}-{index}", headers={"user-agent": "u" * 600}),
                       timeout=RPC_TIMEOUT)


def test_stdout_lines_stay_whole(tmp_path, idp, redis_server):  # noqa: F811
    """Two workers' decision logs on one slowly read stdout pipe: every line arrives whole."""
    overrides = {"store": {"url": redis_server.url},
                 "decision_log": {"sink": "stdout", "clear_headers": ["user-agent"]}}
    server = ServeProcess(tmp_path, idp, workers=2, overrides=overrides)
    with open(server.stderr_path, "wb") as stderr:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(server.config_path), "--workers", "2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    captured = tmp_path / "stdout.log"
    copier = threading.Thread(target=copy_slowly, args=(server.process.stdout, captured))
    copier.start()
    senders = [threading.Thread(target=send_checks, args=(port, f"{port}-{thread}", 200))
               for port in server.worker_ports for thread in range(4)]
    try:
        server.wait_ready()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
    finally:
        exit_code = server.stop()
        copier.join(timeout=STOP_TIMEOUT)
    assert exit_code == 0
    assert not copier.is_alive()

    lines = captured.read_bytes().splitlines()
    assert len(lines) == 2 * (4 * 200 + 2)
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"a decision log line was split or mixed with another: {line[:200]!r}")
        assert record["type"] in ("decision", "checkpoint")
    code, report = verify_report_options(captured, "--skip-signatures")
    assert code == 0, report
    assert [writer["decisions"] for writer in report["writers"]] == [800, 800]
