"""Two `extauthz serve` processes sharing one real Redis: revocations, one-time tokens, the JWKS union
and the revocation commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import jwt
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from helpers import TOKEN_ISSUER, check_request, write_config
from processes import LOOPBACK, ServeProcess, http_get
from redis_servers import RedisServer
from store_helpers import ONE_TIME_PATH, ONE_TIME_POLICIES, SENSITIVE_PATH, STANDARD_PATH

from extauthz.config import load_config
from extauthz.store import open_store

RPC_TIMEOUT = 5.0
CLI_TIMEOUT = 30.0
# The product states that a revocation reaches every replica within one second.
REVOCATION_BOUND = 1.0
# Polling for the revocation: at most POLL_TRIES rounds, POLL_INTERVAL seconds apart (about 3 s).
POLL_TRIES = 150
POLL_INTERVAL = 0.02


class Replica:
    """One started ServeProcess and a gRPC channel to it."""

    def __init__(self, process: ServeProcess):
        self.process = process
        self.channel = grpc.insecure_channel(f"{LOOPBACK}:{process.grpc_port}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def check(self, **request) -> external_auth_pb2.CheckResponse:
        return self.stub.Check(check_request(**request), timeout=RPC_TIMEOUT)

    def reason(self, **request) -> str:
        """Send a Check and return the decision's reason code."""
        return self.check(**request).dynamic_metadata["reason"]

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, idp, shared_redis) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B with the one-time route. B starts once A is ready, so that B's first read of
    the published keys already finds A's."""
    policy_folder = tmp_path_factory.mktemp("one-time-policies")
    (policy_folder / "policies.yaml").write_text(ONE_TIME_POLICIES, encoding="utf-8")
    # The largest deadline that the configuration accepts (100 ms x 2 attempts), because the
    # revocation commands use it too and these tests check their output, not the deadline.
    overrides = {"store": {"url": shared_redis.url, "timeout": "100ms"},
                 "policies": {"provider": "extauthz", "paths": [str(policy_folder)]}}
    processes = [ServeProcess(tmp_path_factory.mktemp(f"replica-{name}"), idp, overrides=overrides)
                 for name in ("a", "b")]
    started: list[Replica] = []
    try:
        for process in processes:
            process.start()
            started.append(Replica(process))
            process.wait_ready()
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.close()
        for process in processes:
            process.stop()


@pytest.fixture(autouse=True)
def clear_revocations(replicas) -> Iterator[None]:
    yield
    store = open_store(load_config(replicas[0].process.config_path).store)
    try:
        store.remove_revocations(None)
    finally:
        store.close()


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extauthz", *arguments], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT)


def seconds_until_reason(replicas: tuple[Replica, ...], reason: str, since: float, **request) -> list[float | None]:
    """Poll every replica until its Check returns `reason`, and return each one's seconds after `since`."""
    reached: list[float | None] = [None] * len(replicas)
    for _ in range(POLL_TRIES):
        for index, replica in enumerate(replicas):
            if reached[index] is None and replica.reason(**request) == reason:
                reached[index] = time.monotonic() - since
        if None not in reached:
            break
        time.sleep(POLL_INTERVAL)
    return reached


def test_revoke_reaches_both(replicas, idp):
    token = idp.token(sub="alice", iat=int(time.time()) - 5)
    # Each replica verifies and caches the token before the revocation.
    before = [replica.reason(path=SENSITIVE_PATH, token=token) for replica in replicas]

    result = run_cli("revoke", "--config", str(replicas[0].process.config_path), "--subject", "alice")
    exited = time.monotonic()
    reached = seconds_until_reason(replicas, "token_revoked", exited, path=SENSITIVE_PATH, token=token)

    assert before == ["allowed", "allowed"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("revoked sub 'alice' until ")
    for name, seconds in zip("AB", reached, strict=True):
        assert seconds is not None, f"replica {name} never denied the revoked token"
        assert seconds < REVOCATION_BOUND, f"replica {name} took {seconds:.3f}s"


def test_new_login_after_revoke(replicas, idp):
    result = run_cli("revoke", "--config", str(replicas[0].process.config_path), "--subject", "dave")
    old = idp.token(sub="dave", iat=int(time.time()) - 5)
    reached = seconds_until_reason(replicas, "token_revoked", time.monotonic(), path=STANDARD_PATH, token=old)
    # iat counts whole seconds: one second ahead is surely after revoked_at, and within the leeway.
    new = idp.token(sub="dave", iat=int(time.time()) + 1)
    reasons = [replica.reason(path=STANDARD_PATH, token=new) for replica in replicas]
    assert result.returncode == 0, result.stderr
    assert None not in reached
    assert reasons == ["allowed", "allowed"]


def test_one_time_replayed_across(replicas, idp):
    first, second = replicas
    token = idp.token()
    on_first = first.reason(path=ONE_TIME_PATH, token=token, request_id="req-1")
    on_second = second.reason(path=ONE_TIME_PATH, token=token, request_id="req-2")
    assert on_first == "allowed"
    assert on_second == "token_replayed"


def test_one_time_retry_across(replicas, idp):
    first, second = replicas
    token = idp.token()
    first.reason(path=ONE_TIME_PATH, token=token, request_id="req-1")
    retry = second.check(path=ONE_TIME_PATH, token=token, request_id="req-1")
    assert retry.dynamic_metadata["reason"] == "allowed"
    second.process.wait_for_record(request_id="req-1", retry=True)
    records = [record for record in second.process.decision_records() if record.get("request_id") == "req-1"]
    assert records[-1]["retry"] is True


def test_jwks_union(replicas):
    first, second = replicas
    response = first.check(path=STANDARD_PATH)
    minted = response.ok_response.headers[0].header
    status, _, body = http_get(second.process.http_port, "/.well-known/jwks.json")
    key_set = jwt.PyJWKSet.from_dict(json.loads(body))
    kid = jwt.get_unverified_header(minted.value)["kid"]
    _, _, own_body = http_get(first.process.http_port, "/.well-known/jwks.json")
    own_kids = {key["kid"] for key in json.loads(own_body)["keys"]}

    assert minted.key == "txn-token"
    assert status == 200
    assert kid in own_kids
    # B serves its own two keys (current and next) and A's two.
    assert len(key_set.keys) == 4
    claims = jwt.decode(minted.value, key_set[kid].key, algorithms=["ES256"], audience="shop.example.com",
                        issuer=TOKEN_ISSUER)
    assert claims["sub"] == "spiffe://cluster.local/ns/web/sa/frontend"


def test_revocations_list_and_clear(replicas):
    config = str(replicas[0].process.config_path)
    revoked = run_cli("revoke", "--config", config, "--subject", "bob", "--reason", "laptop stolen")
    listed = run_cli("revocations", "list", "--config", config)
    listed_json = run_cli("revocations", "list", "--config", config, "--format", "json")
    cleared = run_cli("revocations", "clear", "--config", config)
    listed_after = run_cli("revocations", "list", "--config", config)

    assert revoked.returncode == 0, revoked.stderr
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("sub 'bob' revoked "), listed.stdout
    assert listed.stdout.rstrip().endswith(": laptop stolen"), listed.stdout
    assert listed_json.returncode == 0, listed_json.stderr
    entries = json.loads(listed_json.stdout)
    assert [(entry["kind"], entry["value"], entry["issuer"]) for entry in entries] == [("sub", "bob", "*")]
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.strip() == "removed 1 revocations"
    assert listed_after.returncode == 0, listed_after.stderr
    assert listed_after.stdout.strip() == "no active revocations"


def test_clear_lifts_revocation(replicas, idp):
    config = str(replicas[0].process.config_path)
    token = idp.token(sub="erin", iat=int(time.time()) - 5)
    run_cli("revoke", "--config", config, "--subject", "erin")
    revoked = seconds_until_reason(replicas, "token_revoked", time.monotonic(), path=STANDARD_PATH, token=token)
    cleared = run_cli("revocations", "clear", "--config", config)
    lifted = seconds_until_reason(replicas, "allowed", time.monotonic(), path=STANDARD_PATH, token=token)
    assert None not in revoked
    assert cleared.returncode == 0, cleared.stderr
    assert None not in lifted


def test_revoke_memory_store_exits_2(tmp_path, idp):
    config_path = write_config(tmp_path, idp)
    result = run_cli("revoke", "--config", str(config_path), "--subject", "alice")
    assert result.returncode == 2
    assert "store.url" in result.stderr
    assert "memory://" in result.stderr


def test_revoke_store_down_exits_1(tmp_path, idp):
    absent = RedisServer(tmp_path / "absent")
    config_path = write_config(tmp_path, idp, overrides={"store": {"url": absent.url}})
    result = run_cli("revoke", "--config", str(config_path), "--subject", "alice")
    assert result.returncode == 1
    assert result.stderr.startswith("extauthz revoke: Redis revoke failed: ConnectionError")
