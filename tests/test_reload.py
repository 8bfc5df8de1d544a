"""Hot reload: a changed policy file, SIGHUP or a ConfigMap symlink swap changes decisions without a restart."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from helpers import POLICIES, RecordingLog, TestIdP, check_request, make_authorizer, write_config
from processes import LOOPBACK, ServeProcess, http_get
from prometheus_client.parser import text_string_to_metric_families

from extauthz.config import load_config
from extauthz.server import Service, load_policy_set

# The watcher polls every second, so a change shows within about a second plus the reload itself.
RELOAD_TIMEOUT = 10.0
ADMIN_POLICY = POLICIES.split("---\n")[0]
# The default policies with `public` requiring an end-user token, so an anonymous /public request
# turns from 200 into 401.
RESTRICTED_POLICIES = ADMIN_POLICY + """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: public
  namespace: shop
  annotations:
    extauthz.io/require-user: "true"
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/public/*", "/api/*"]
        methods: ["GET", "POST"]
"""
# Checks each load thread sends after the new policy is in place.
CHECKS_AFTER_RELOAD = 50
MAX_CHECKS_PER_THREAD = 5000
LOAD_THREADS = 2
LOAD_TIMEOUT = 30.0


def wait_until(condition: Callable[[], bool], timeout: float = RELOAD_TIMEOUT) -> bool:
    """Poll `condition` every 0.1 s until it returns True or `timeout` seconds pass, and return its last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def replace_file(path: Path, content: str | bytes) -> None:
    """Replace `path` atomically, as editors and config management tools do."""
    temporary = path.parent / f".{path.name}.tmp"
    if isinstance(content, str):
        content = content.encode()
    temporary.write_bytes(content)
    os.replace(temporary, path)


def http_status(stub: external_auth_pb2_grpc.AuthorizationStub, path: str = "/public/items") -> int:
    """Send one anonymous Check and return the HTTP status Envoy would apply."""
    response = stub.Check(check_request(path=path), timeout=10)
    if response.status.code == code_pb2.OK:
        return 200
    return response.denied_response.status.code


def reload_count(http_port: int, result: str) -> float:
    """Return extauthz_policy_reloads_total{result=RESULT} from /metrics, 0 when the series is absent."""
    _, _, body = http_get(http_port, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "extauthz_policy_reloads_total" and sample.labels == {"result": result}:
                return sample.value
    return 0.0


class Running:
    """An in-process Service with a gRPC stub on its port."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.policy_file = config_path.parent / "policies" / "policies.yaml"
        config = load_config(config_path)
        self.service = Service(config, RecordingLog(config))
        self.channel: grpc.Channel | None = None
        self.stub: external_auth_pb2_grpc.AuthorizationStub | None = None

    def start(self) -> Running:
        self.service.start()
        self.channel = grpc.insecure_channel(f"{LOOPBACK}:{self.service.grpc_port}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.service.stop(grace=1)

    def status(self, path: str = "/public/items") -> int:
        assert self.stub is not None
        return http_status(self.stub, path)

    def reloads(self, result: str) -> float:
        return reload_count(self.service.http_port, result)


@pytest.fixture
def running(tmp_path, idp) -> Iterator[Running]:
    service = Running(write_config(tmp_path, idp)).start()
    try:
        yield service
    finally:
        service.stop()


def test_policy_change_applies(running):
    assert running.status() == 200

    replace_file(running.policy_file, RESTRICTED_POLICIES)

    assert wait_until(lambda: running.status() == 401), "the new policy was not applied"
    assert running.reloads("success") == 1
    assert running.reloads("failure") == 0
    assert running.service.authorizer.snapshot.generation == 2


def test_invalid_policy_keeps_serving(running, caplog):
    replace_file(running.policy_file, "kind: [AuthorizationPolicy\n")

    assert wait_until(lambda: running.reloads("failure") == 1), "the failed reload was not counted"
    assert running.status() == 200
    assert running.reloads("success") == 0
    assert running.service.authorizer.snapshot.generation == 1
    rejected = [record for record in caplog.records
                if record.getMessage() == "reload rejected; the previous configuration keeps serving"]
    assert len(rejected) == 1
    assert rejected[0].levelname == "ERROR"
    assert str(running.policy_file) in rejected[0].error
    assert "invalid YAML" in rejected[0].error


def test_invalid_policy_then_fixed(running):
    replace_file(running.policy_file, POLICIES.replace("action: CUSTOM", "acton: CUSTOM"))
    assert wait_until(lambda: running.reloads("failure") == 1), "the failed reload was not counted"

    replace_file(running.policy_file, RESTRICTED_POLICIES)

    assert wait_until(lambda: running.status() == 401), "the corrected policy was not applied"
    assert running.reloads("success") == 1


def test_non_utf8_policy_rejected(running):
    replace_file(running.policy_file, b"\xff\xfe not UTF-8\n")

    assert wait_until(lambda: running.reloads("failure") == 1), "the failed reload was not counted"
    assert running.status() == 200

    # The watcher must survive the failure and apply the next change.
    replace_file(running.policy_file, RESTRICTED_POLICIES)
    assert wait_until(lambda: running.status() == 401), "the watcher stopped after a failed reload"


def test_sighup_reloads(tmp_path, idp):
    server = ServeProcess(tmp_path, idp)
    try:
        server.start()
        server.wait_ready()
        assert reload_count(server.http_port, "success") == 0

        server.process.send_signal(signal.SIGHUP)

        assert wait_until(lambda: reload_count(server.http_port, "success") == 1), "SIGHUP caused no reload"
        assert server.process.poll() is None
    finally:
        server.stop()
    messages = [json.loads(line)["message"] for line in server.stderr().splitlines() if line.startswith(b"{")]
    assert "reloaded" in messages


def make_configmap(folder: Path, policies: str) -> None:
    """Lay out `folder` as a Kubernetes ConfigMap volume with one key, policies.yaml."""
    folder.mkdir()
    version = folder / "..2026_01_01_00_00_00.000000001"
    version.mkdir()
    (version / "policies.yaml").write_text(policies, encoding="utf-8")
    (folder / "..data").symlink_to(version.name)
    (folder / "policies.yaml").symlink_to("..data/policies.yaml")


def swap_configmap(folder: Path, policies: str) -> None:
    """Update the ConfigMap volume as the kubelet does: a new version folder and an atomic `..data` swap."""
    version = folder / "..2026_01_01_00_01_00.000000002"
    version.mkdir()
    (version / "policies.yaml").write_text(policies, encoding="utf-8")
    (folder / "..data_tmp").symlink_to(version.name)
    os.replace(folder / "..data_tmp", folder / "..data")


def test_configmap_swap(tmp_path, idp):
    configmap = tmp_path / "configmap"
    make_configmap(configmap, POLICIES)
    config_path = write_config(tmp_path, idp, overrides={"policies": {"provider": "extauthz",
                                                                      "paths": ["configmap/"]}})
    running = Running(config_path).start()
    try:
        # The hidden version and ..data folders contain the same file. Read from there too, each policy would
        # load twice and fail as a duplicate.
        assert len(running.service.authorizer.policies) == 2
        assert running.status() == 200

        swap_configmap(configmap, RESTRICTED_POLICIES)

        assert wait_until(lambda: running.status() == 401), "the ConfigMap swap was not applied"
        assert len(running.service.authorizer.policies) == 2
        assert running.reloads("success") == 1
        assert running.reloads("failure") == 0
    finally:
        running.stop()


def test_reload_under_load(running):
    reloaded = threading.Event()
    lock = threading.Lock()
    before: list[int] = []
    after: list[int] = []
    errors: list[grpc.StatusCode] = []

    def send_checks() -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT
        sent_after = 0
        for _ in range(MAX_CHECKS_PER_THREAD):
            if sent_after >= CHECKS_AFTER_RELOAD or time.monotonic() > deadline:
                return
            # Read the flag before sending, so a Check counted as "after" started after the swap.
            is_after = reloaded.is_set()
            try:
                status = running.status()
            except grpc.RpcError as exc:
                with lock:
                    errors.append(exc.code())
                return
            with lock:
                (after if is_after else before).append(status)
            sent_after += is_after

    workers = [threading.Thread(target=send_checks, daemon=True) for _ in range(LOAD_THREADS)]
    for worker in workers:
        worker.start()
    assert wait_until(lambda: len(before) >= 20), "the burst of Checks did not get going"

    replace_file(running.policy_file, RESTRICTED_POLICIES)
    swapped = wait_until(lambda: running.service.authorizer.snapshot.generation == 2)
    reloaded.set()
    for worker in workers:
        worker.join(timeout=LOAD_TIMEOUT)

    assert swapped, "the new policy was not applied"
    assert not any(worker.is_alive() for worker in workers)
    assert errors == []
    assert 200 in before
    assert set(before) <= {200, 401}
    assert after == [401] * (CHECKS_AFTER_RELOAD * LOAD_THREADS)
    assert running.reloads("success") == 1


class SwappingVerifier:
    """A TokenVerifier that runs `swap` while it verifies, so a reload lands in the middle of a Check."""

    def __init__(self, inner, swap: Callable[[], None]):
        self.inner = inner
        self.swap = swap

    def verify(self, token: str):
        self.swap()
        return self.inner.verify(token)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_in_flight_keeps_snapshot(tmp_path, idp):
    config_path = write_config(tmp_path, idp)
    authorizer, decision_log, _ = make_authorizer(config_path)
    verifier = authorizer.verifier
    # The next policies have no `public` policy, so /public requests match nothing.
    (tmp_path / "policies" / "policies.yaml").write_text(ADMIN_POLICY, encoding="utf-8")
    admin_only = load_policy_set(load_config(config_path))

    def swap() -> None:
        authorizer.replace_snapshot(admin_only, verifier)

    authorizer.replace_snapshot(authorizer.policies, SwappingVerifier(verifier, swap))
    in_flight = authorizer.check(check_request(path="/public/items", token=idp.token()))
    later = authorizer.check(check_request(path="/public/items", token=idp.token()))

    assert in_flight.allowed
    assert in_flight.policies == ["shop/public"]
    assert authorizer.snapshot.generation == 3
    assert later.reason == "no_matching_policy"
    assert [record["reason"] for record in decision_log.records()] == ["allowed", "no_matching_policy"]


def test_jwks_file_change_applies(running, idp):
    # The IdP rotates its key: the JWKS file is rewritten with only the new key.
    new_idp = TestIdP()
    old_token, new_token = idp.token(), new_idp.token()

    def admin_status(token: str) -> int:
        assert running.stub is not None
        response = running.stub.Check(check_request(path="/admin", token=token), timeout=5)
        return response.denied_response.status.code if response.HasField("denied_response") else 200

    assert admin_status(old_token) == 200
    replace_file(running.config_path.parent / "idp-jwks.json", json.dumps(new_idp.jwks()))

    assert wait_until(lambda: admin_status(new_token) == 200), "the new IdP key was not loaded"
    assert admin_status(old_token) == 401
