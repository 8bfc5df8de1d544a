"""`extauthz serve` as a process on its own, without Envoy: start-up, health, side listener, drain."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import check_request, write_config
from processes import LOOPBACK, ServeProcess, http_get, loopback_ports

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
DRAIN_THREADS = 8
DRAIN_CALLS_PER_THREAD = 300
# SIGTERM goes out once this many Checks have returned, so that the workers are mid-burst.
DRAIN_SIGNAL_AFTER = 40


def run_serve(config_path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(config_path)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def log_records(stderr: bytes) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, idp):
    process = ServeProcess(tmp_path_factory.mktemp("serve"), idp)
    try:
        process.start()
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"limits": {"max_token_bytes": 10}}, "limits.max_token_bytes"),
        ({"server": {"thread": 4}}, "server.thread"),
        ({"decision_log": {"sink": "syslog"}}, "decision_log.sink"),
    ],
)
def test_bad_config_exits_2(tmp_path, idp, overrides, key):
    result = run_serve(write_config(tmp_path, idp, overrides=overrides))
    assert result.returncode == 2
    assert key in result.stderr.decode()


@pytest.mark.parametrize("busy", ["grpc", "http"])
def test_busy_port_exits_2(tmp_path, idp, busy):
    ports = dict(zip(("grpc", "http"), loopback_ports(2), strict=True))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((LOOPBACK, ports[busy]))
        holder.listen()
        listen = {name: f"{LOOPBACK}:{port}" for name, port in ports.items()}
        result = run_serve(write_config(tmp_path, idp, overrides={"listen": listen}))
    assert result.returncode == 2
    assert f"listen.{busy}" in result.stderr.decode()


def test_health_serving(server):
    with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", AUTHORIZATION_SERVICE):
            # /readyz turns 200 a moment before the readiness thread sets the health status.
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}"


def test_readyz_ok(server):
    status, _, body = http_get(server.http_port, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "store": "ok"}


def test_ready_log_ports(server):
    ready = [record for record in log_records(server.stderr()) if record["message"] == "ready"]
    assert len(ready) == 1
    assert ready[0]["grpc_port"] == server.grpc_port
    assert ready[0]["http_port"] == server.http_port


def test_jwks_served(server):
    status, headers, body = http_get(server.http_port, "/.well-known/jwks.json")
    assert status == 200
    assert headers["content-type"] == "application/jwk-set+json"
    keys = json.loads(body)["keys"]
    # The current signing key and the next one, published a rotation period ahead.
    assert len(keys) == 2
    assert len({key["kid"] for key in keys}) == 2
    for key in keys:
        assert key["alg"] == "ES256"
        assert key["use"] == "sig"
        assert "d" not in key, "private key material in the JWKS"


def test_check_over_grpc(server, idp):
    with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(check_request(path="/admin", token=idp.token()), timeout=10)
    assert response.status.code == code_pb2.OK
    assert response.ok_response.headers[0].header.key == "txn-token"


def test_sigterm_drains(tmp_path, idp):
    server = ServeProcess(tmp_path, idp)
    channel = None
    lock = threading.Lock()
    answered = 0
    in_flight = 0
    errors: list[grpc.StatusCode] = []
    burst_under_way = threading.Event()

    def send_checks(stub: external_auth_pb2_grpc.AuthorizationStub, token: str) -> None:
        nonlocal answered, in_flight
        for _ in range(DRAIN_CALLS_PER_THREAD):
            with lock:
                in_flight += 1
            try:
                stub.Check(check_request(path="/admin", token=token), timeout=10)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(exc.code())
                return
            finally:
                with lock:
                    in_flight -= 1
            with lock:
                answered += 1
                if answered >= DRAIN_SIGNAL_AFTER:
                    burst_under_way.set()

    try:
        server.start()
        server.wait_ready()
        channel = grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}")
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        workers = [threading.Thread(target=send_checks, args=(stub, idp.token()), daemon=True)
                   for _ in range(DRAIN_THREADS)]
        for worker in workers:
            worker.start()

        assert burst_under_way.wait(timeout=30), "the burst of Checks did not get going"
        with lock:
            in_flight_at_signal = in_flight
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=30)
        for worker in workers:
            worker.join(timeout=30)
    finally:
        if channel is not None:
            channel.close()
        server.stop()

    assert in_flight_at_signal > 0
    assert exit_code == 0
    assert not any(worker.is_alive() for worker in workers)
    # Every Check that reached the servicer wrote a decision record, so equal counts mean each one got a response.
    assert len(server.decision_records()) == answered
    # NOTE: grpcio 1.85 cancels the calls it has received but not yet handed to a handler when the
    # server stops, so those fail as CANCELLED without a decision. Calls sent later fail as UNAVAILABLE.
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert "stopped" in [record["message"] for record in log_records(server.stderr())]


def test_shutdown_delay_keeps_serving(tmp_path, idp):
    server = ServeProcess(tmp_path, idp, overrides={"server": {"shutdown_delay": "3s"}})
    channel = None
    try:
        server.start()
        server.wait_ready()
        channel = grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}")
        health_stub = health_pb2_grpc.HealthStub(channel)
        check_stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        server.process.send_signal(signal.SIGTERM)

        status = health_pb2.HealthCheckResponse.SERVING
        for _ in range(50):
            status = health_stub.Check(health_pb2.HealthCheckRequest(service=AUTHORIZATION_SERVICE), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        response = check_stub.Check(check_request(path="/public/x"), timeout=2)
        exit_code = server.process.wait(timeout=30)
    finally:
        if channel is not None:
            channel.close()
        server.stop()

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert response.status.code == code_pb2.OK
    assert exit_code == 0


def test_overload_answers_resource_exhausted(tmp_path, idp, monkeypatch):
    from extauthz.config import load_config
    from extauthz.server import Service

    config_path = write_config(tmp_path, idp, overrides={"server": {"threads": 1, "max_pending": 1}})
    service = Service(load_config(config_path))
    release = threading.Event()
    entered = threading.Event()
    check = service.authorizer.check

    def held_check(request):
        entered.set()
        release.wait(timeout=10)
        return check(request)

    # A slow pipeline: the first Check occupies the only thread, the second waits, the third is over the limit.
    monkeypatch.setattr(service.authorizer, "check", held_check)
    service.start()
    channel = grpc.insecure_channel(f"{LOOPBACK}:{service.grpc_port}")
    try:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        held = [stub.Check.future(check_request(path="/public/x"), timeout=10) for _ in range(2)]
        assert entered.wait(timeout=5)
        # The second call has no thread to signal its arrival; give it time to reach the queue.
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Check(check_request(path="/public/x"), timeout=5)
        release.set()
        codes = [future.result().status.code for future in held]
    finally:
        release.set()
        channel.close()
        service.stop(grace=1)

    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes == [code_pb2.OK, code_pb2.OK]
