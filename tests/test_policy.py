"""Istio AuthorizationPolicy loading, matching and requirement merging, as extauthz implements them."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import AUDIENCE, ISSUER

from extauthz.errors import ConfigError, DenyError
from extauthz.identity import EndUser
from extauthz.policy import (
    Policy,
    Requirements,
    combine_requirements,
    load_policies,
    parse_policy,
    rule_matches,
)
from extauthz.policy_index import PolicySet
from extauthz.request import HttpRequest

PROVIDER = "extauthz"
TTL_CAP = 30.0
ORIGIN = "policies.yaml#0"
FRONTEND = "spiffe://cluster.local/ns/web/sa/frontend"
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"


def make_request(**overrides: Any) -> HttpRequest:
    """Build a normalised request from `web` to `shop`, as from_check_request would return it."""
    fields: dict[str, Any] = {
        "method": "GET",
        "scheme": "http",
        "host": "shop.example.com",
        "authority_port": None,
        "path": "/api/items",
        "query": "",
        "headers": {"x-tenant": "acme"},
        "request_id": "req-1",
        "source_address": "10.0.0.7",
        "source_principal": FRONTEND,
        "destination_principal": BACKEND,
        "destination_port": 8080,
        "context_extensions": {},
    }
    fields.update(overrides)
    return HttpRequest(**fields)


def make_user(**overrides: Any) -> EndUser:
    """Build a verified end user `alice` with group and nested organisation claims."""
    claims = {"iss": ISSUER, "sub": "alice", "aud": [AUDIENCE, "reports"], "azp": "web-app",
              "groups": ["users", "admins"], "org": {"team": "payments", "level": 3}, "tier": "gold"}
    fields: dict[str, Any] = {
        "issuer": ISSUER,
        "subject": "alice",
        "audiences": (AUDIENCE, "reports"),
        "presenter": "web-app",
        "expires_at": 2_000_000_000.0,
        "not_before": None,
        "issued_at": 1_900_000_000.0,
        "auth_time": 1_900_000_000.0,
        "acr": "urn:test:mfa",
        "amr": ("pwd", "otp"),
        "session_id": None,
        "token_id": "jti-1",
        "kid": "kid-1",
        "claims": claims,
    }
    fields.update(overrides)
    return EndUser(**fields)


def make_document(rules: Any = ..., *, name: str = "p", namespace: str | None = "shop",
                  annotations: dict[str, Any] | None = None, action: str = "CUSTOM",
                  provider: str = PROVIDER, api_version: str = "security.istio.io/v1") -> dict[str, Any]:
    """Build an AuthorizationPolicy document; pass `rules=...` to leave `rules` out."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if annotations is not None:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {"action": action, "provider": {"name": provider}}
    if rules is not ...:
        spec["rules"] = rules
    return {"apiVersion": api_version, "kind": "AuthorizationPolicy", "metadata": metadata, "spec": spec}


def parse(document: dict[str, Any], token_ttl_cap: float = TTL_CAP) -> Policy | None:
    return parse_policy(document, ORIGIN, PROVIDER, token_ttl_cap)


def parse_error(document: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(document)
    return caught.value


def matches(rule: dict[str, Any], request: HttpRequest | None = None, user: EndUser | None = None) -> bool:
    """Return whether one rule, loaded through parse_policy, matches the request.

    The compiled and indexed match of PolicySet must agree with rule_matches on every case.
    """
    policy = parse(make_document([rule]))
    assert policy is not None
    request = request or make_request()
    expected = rule_matches(policy.rules[0], request, user)
    # The policy's own namespace as the root namespace makes it apply to every destination.
    for threshold in (0, 100):
        policies = PolicySet([policy], policy.namespace, index_threshold=threshold)
        assert policies.match(request, user) == ([policy] if expected else [])
    return expected


def operation(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def source(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return {"when": [condition]}


def write_policies(folder: Path, *documents: dict[str, Any], name: str = "policies.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")
    return path


# --- which documents extauthz reads -------------------------------------------------------------


def test_custom_policy_loads():
    policy = parse(make_document([{}]))
    assert policy is not None
    assert policy.key == "shop/p"
    assert policy.origin == ORIGIN
    assert len(policy.rules) == 1


@pytest.mark.parametrize("action", ["ALLOW", "DENY", "AUDIT"])
def test_other_actions_ignored(action):
    assert parse(make_document([{}], action=action)) is None


def test_action_default_ignored():
    document = make_document([{}])
    del document["spec"]["action"]
    assert parse(document) is None


def test_other_provider_ignored():
    assert parse(make_document([{}], provider="opa")) is None


def test_missing_provider_ignored():
    document = make_document([{}])
    del document["spec"]["provider"]
    assert parse(document) is None


@pytest.mark.parametrize("api_version", ["security.istio.io/v1", "security.istio.io/v1beta1"])
def test_api_versions_accepted(api_version):
    assert parse(make_document([{}], api_version=api_version)) is not None


@pytest.mark.parametrize("api_version", ["security.istio.io/v1alpha1", "security.istio.io/v2", "v1", ""])
def test_other_api_version_rejected(api_version):
    error = parse_error(make_document([{}], api_version=api_version))
    assert error.key == "apiVersion"
    assert repr(api_version) in error.message
    assert "security.istio.io/v1beta1" in str(error.fix)


def test_other_kind_ignored():
    document = make_document([{}])
    document["kind"] = "PeerAuthentication"
    assert parse(document) is None


def test_namespace_defaults_to_default():
    policy = parse(make_document([{}], namespace=None))
    assert policy is not None
    assert policy.namespace == "default"


def test_selector_and_target_refs_accepted():
    document = make_document([{}])
    document["spec"]["selector"] = {"matchLabels": {"app": "shop"}}
    document["spec"]["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}]
    policy = parse(document)
    assert policy is not None
    assert policy.key == "shop/p"


def test_missing_name_rejected():
    document = make_document([{}])
    del document["metadata"]["name"]
    error = parse_error(document)
    assert error.key == "metadata.name"


# --- rules, sources, operations and conditions ---------------------------------------------------


@pytest.mark.parametrize("rules", [..., [], None])
def test_no_rules_matches_nothing(rules):
    policy = parse(make_document(rules))
    assert policy is not None
    policies = PolicySet([policy], "istio-system")
    assert policies.match(make_request(), make_user()) == []


@pytest.mark.parametrize(
    "request_overrides",
    [
        {},
        {"method": "DELETE", "path": "/", "host": "other.test"},
        {"source_principal": "", "source_address": "192.0.2.1", "headers": {}},
        {"destination_port": None, "scheme": "https"},
    ],
)
def test_empty_rule_matches_everything(request_overrides):
    policy = parse(make_document([{}]))
    assert policy is not None
    policies = PolicySet([policy], "istio-system")
    assert policies.match(make_request(**request_overrides), None) == [policy]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # Several sources: any one matching is enough.
        ({"from": [{"source": {"namespaces": ["other"]}}, {"source": {"namespaces": ["web"]}}]}, True),
        ({"from": [{"source": {"namespaces": ["other"]}}, {"source": {"namespaces": ["more"]}}]}, False),
        # Several operations: any one matching is enough.
        ({"to": [{"operation": {"paths": ["/x"]}}, {"operation": {"paths": ["/api/*"]}}]}, True),
        ({"to": [{"operation": {"paths": ["/x"]}}, {"operation": {"paths": ["/y"]}}]}, False),
        # Fields inside one operation: every field must match.
        ({"to": [{"operation": {"paths": ["/api/*"], "methods": ["GET"]}}]}, True),
        ({"to": [{"operation": {"paths": ["/api/*"], "methods": ["POST"]}}]}, False),
        # Fields inside one source: every field must match.
        ({"from": [{"source": {"namespaces": ["web"], "ipBlocks": ["10.0.0.0/8"]}}]}, True),
        ({"from": [{"source": {"namespaces": ["web"], "ipBlocks": ["192.168.0.0/16"]}}]}, False),
        # Values of one field: any one matching is enough.
        ({"to": [{"operation": {"methods": ["POST", "GET"]}}]}, True),
        # from, to and when together: each must hold.
        ({"from": [{"source": {"namespaces": ["web"]}}], "to": [{"operation": {"methods": ["GET"]}}],
          "when": [{"key": "request.headers[x-tenant]", "values": ["acme"]}]}, True),
        ({"from": [{"source": {"namespaces": ["other"]}}], "to": [{"operation": {"methods": ["GET"]}}]}, False),
        ({"from": [{"source": {"namespaces": ["web"]}}], "to": [{"operation": {"methods": ["PUT"]}}]}, False),
        ({"from": [{"source": {"namespaces": ["web"]}}],
          "when": [{"key": "request.headers[x-tenant]", "values": ["other"]}]}, False),
        # Conditions: every one must hold.
        ({"when": [{"key": "request.headers[x-tenant]", "values": ["acme"]},
                   {"key": "source.namespace", "values": ["web"]}]}, True),
        ({"when": [{"key": "request.headers[x-tenant]", "values": ["acme"]},
                   {"key": "source.namespace", "values": ["other"]}]}, False),
        # An empty source or operation matches anything.
        ({"from": [{"source": {}}], "to": [{"operation": {}}]}, True),
    ],
)
def test_rule_combination(rule, expected):
    assert matches(rule) is expected


@pytest.mark.parametrize(
    ("paths", "path", "expected"),
    [
        (["/api/items"], "/api/items", True),
        (["/api/items"], "/api/items/", False),
        (["/api/items"], "/api/item", False),
        (["/api/*"], "/api/items", True),
        (["/api/*"], "/api/", True),
        (["/api/*"], "/api", False),
        (["/api*"], "/apis/v1", True),
        (["*.json"], "/data/report.json", True),
        (["*.json"], "/data/report.xml", False),
        (["*"], "/", True),
        (["*"], "/anything/at/all", True),
        (["/API/items"], "/api/items", False),
        (["/other", "/api/items"], "/api/items", True),
    ],
)
def test_paths_match(paths, path, expected):
    assert matches(operation(paths=paths), make_request(path=path)) is expected


@pytest.mark.parametrize(
    ("paths", "path", "expected"),
    [
        (["/api/{*}"], "/api/items", True),
        (["/api/{*}"], "/api/items/1", False),
        (["/api/{*}"], "/api/", False),
        (["/api/{*}/reviews"], "/api/7/reviews", True),
        (["/api/{*}/reviews"], "/api/7/8/reviews", False),
        (["/{*}/{*}"], "/a/b", True),
        (["/api/{**}"], "/api/a", True),
        (["/api/{**}"], "/api/a/b/c", True),
        (["/api/{**}"], "/apis/a", False),
        (["/api/{**}"], "/api", False),
        (["/api/{*}/files/{**}"], "/api/7/files/a/b.txt", True),
        (["/api/{*}/files/{**}"], "/api/7/other/a", False),
        (["/v1.0/{*}"], "/v1x0/a", False),
        (["/api/{**}/x"], "/api/a/b/x", True),
        (["/api/{**}/x"], "/api/a/x", True),
        (["/api/{**}/x"], "/api/x", False),
        (["/api/{**}/x"], "/api/a/x/y", False),
    ],
)
def test_path_templates_match(paths, path, expected):
    assert matches(operation(paths=paths), make_request(path=path)) is expected


@pytest.mark.parametrize("template", ["/api/{**}/{*}", "/api/{**}/x/{**}", "/api/{*}.json", "/api/{id}", "/api/{*"])
def test_invalid_path_template_rejected(template):
    error = parse_error(make_document([operation(paths=[template])]))
    assert error.key == "spec.rules[0].to[0].operation.paths"
    assert "invalid value" in error.message


@pytest.mark.parametrize(
    ("hosts", "request_overrides", "expected"),
    [
        (["shop.example.com"], {}, True),
        (["SHOP.Example.COM"], {}, True),
        (["other.example.com"], {}, False),
        (["*.example.com"], {}, True),
        (["*.example.org"], {}, False),
        (["shop.*"], {}, True),
        (["*"], {}, True),
        # A host without a port matches the host on any port.
        (["shop.example.com"], {"authority_port": 8443}, True),
        # A host with a port matches only that port; the default port counts when the authority has none.
        (["shop.example.com:8443"], {"authority_port": 8443}, True),
        (["shop.example.com:8443"], {}, False),
        (["shop.example.com:80"], {}, True),
        (["shop.example.com:443"], {"scheme": "https"}, True),
        (["shop.example.com:443"], {}, False),
        (["Shop.Example.com:8443"], {"authority_port": 8443}, True),
    ],
)
def test_hosts_match(hosts, request_overrides, expected):
    assert matches(operation(hosts=hosts), make_request(**request_overrides)) is expected


@pytest.mark.parametrize(
    ("methods", "method", "expected"),
    [
        (["GET"], "GET", True),
        (["GET", "HEAD"], "HEAD", True),
        (["POST"], "GET", False),
        (["get"], "GET", False),
        (["P*"], "PATCH", True),
        (["*"], "OPTIONS", True),
    ],
)
def test_methods_match(methods, method, expected):
    assert matches(operation(methods=methods), make_request(method=method)) is expected


@pytest.mark.parametrize(
    ("ports", "request_overrides", "expected"),
    [
        (["8080"], {}, True),
        (["9090", "8080"], {}, True),
        (["9090"], {}, False),
        # Without a destination port, the authority's port or the scheme's default port counts.
        (["8443"], {"destination_port": None, "authority_port": 8443}, True),
        (["80"], {"destination_port": None}, True),
        (["443"], {"destination_port": None, "scheme": "https"}, True),
        (["80"], {"destination_port": None, "scheme": "https"}, False),
    ],
)
def test_ports_match(ports, request_overrides, expected):
    assert matches(operation(ports=ports), make_request(**request_overrides)) is expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"notPaths": ["/admin/*"]}, True),
        ({"notPaths": ["/api/*"]}, False),
        ({"notPaths": ["/admin/*", "/api/*"]}, False),
        ({"notHosts": ["other.example.com"]}, True),
        ({"notHosts": ["SHOP.example.com"]}, False),
        ({"notMethods": ["DELETE"]}, True),
        ({"notMethods": ["GET"]}, False),
        ({"notPorts": ["9090"]}, True),
        ({"notPorts": ["8080"]}, False),
        ({"paths": ["/api/*"], "notPaths": ["/api/items"]}, False),
        ({"paths": ["/api/*"], "notPaths": ["/api/secret"]}, True),
    ],
)
def test_negated_operation_fields(fields, expected):
    assert matches(operation(**fields)) is expected


@pytest.mark.parametrize(
    ("fields", "request_overrides", "expected"),
    [
        ({"principals": ["cluster.local/ns/web/sa/frontend"]}, {}, True),
        ({"principals": ["spiffe://cluster.local/ns/web/sa/frontend"]}, {}, True),
        ({"principals": ["cluster.local/ns/web/sa/frontend"]},
         {"source_principal": "cluster.local/ns/web/sa/frontend"}, True),
        ({"principals": ["cluster.local/ns/web/*"]}, {}, True),
        ({"principals": ["*/sa/frontend"]}, {}, True),
        ({"principals": ["cluster.local/ns/other/sa/frontend"]}, {}, False),
        ({"principals": ["*"]}, {}, True),
        ({"principals": ["*"]}, {"source_principal": ""}, False),
        ({"notPrincipals": ["cluster.local/ns/web/sa/frontend"]}, {}, False),
        ({"notPrincipals": ["spiffe://cluster.local/ns/web/sa/frontend"]}, {}, False),
        ({"notPrincipals": ["cluster.local/ns/other/sa/x"]}, {}, True),
        ({"notPrincipals": ["*"]}, {"source_principal": ""}, True),
        ({"namespaces": ["web"]}, {}, True),
        ({"namespaces": ["shop", "web"]}, {}, True),
        ({"namespaces": ["shop"]}, {}, False),
        ({"namespaces": ["w*"]}, {}, True),
        ({"namespaces": ["*"]}, {"source_principal": ""}, False),
        ({"notNamespaces": ["web"]}, {}, False),
        ({"notNamespaces": ["shop"]}, {}, True),
    ],
)
def test_principals_and_namespaces(fields, request_overrides, expected):
    assert matches(source(**fields), make_request(**request_overrides)) is expected


@pytest.mark.parametrize(
    ("fields", "address", "expected"),
    [
        ({"ipBlocks": ["10.0.0.0/8"]}, "10.0.0.7", True),
        ({"ipBlocks": ["10.0.0.7"]}, "10.0.0.7", True),
        ({"ipBlocks": ["10.0.0.8"]}, "10.0.0.7", False),
        ({"ipBlocks": ["192.168.0.0/16", "10.0.0.0/24"]}, "10.0.0.7", True),
        ({"ipBlocks": ["192.168.0.0/16"]}, "10.0.0.7", False),
        # Host bits set in the CIDR are ignored, as Istio does.
        ({"ipBlocks": ["10.0.0.1/24"]}, "10.0.0.200", True),
        ({"ipBlocks": ["fd00::/8"]}, "fd00::1", True),
        ({"ipBlocks": ["fd00::/8"]}, "10.0.0.7", False),
        ({"ipBlocks": ["10.0.0.0/8"]}, "", False),
        ({"notIpBlocks": ["10.0.0.0/8"]}, "10.0.0.7", False),
        ({"notIpBlocks": ["192.168.0.0/16"]}, "10.0.0.7", True),
        ({"remoteIpBlocks": ["10.0.0.0/8"]}, "10.0.0.7", True),
        ({"notRemoteIpBlocks": ["10.0.0.0/8"]}, "10.0.0.7", False),
        ({"ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.0.0.0/29"]}, "10.0.0.7", False),
        ({"ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.0.0.0/29"]}, "10.0.0.9", True),
    ],
)
def test_ip_blocks(fields, address, expected):
    assert matches(source(**fields), make_request(source_address=address)) is expected


@pytest.mark.parametrize("block", ["10.0.0.0/33", "not-an-ip", "300.1.1.1"])
def test_invalid_ip_block_rejected(block):
    error = parse_error(make_document([source(ipBlocks=[block])]))
    assert error.key == "spec.rules[0].from[0].source.ipBlocks"


@pytest.mark.parametrize(
    ("fields", "has_user", "expected"),
    [
        ({"requestPrincipals": [f"{ISSUER}/alice"]}, True, True),
        ({"requestPrincipals": [f"{ISSUER}/bob"]}, True, False),
        ({"requestPrincipals": [f"{ISSUER}/*"]}, True, True),
        ({"requestPrincipals": ["https://other.test/*"]}, True, False),
        ({"requestPrincipals": ["*/alice"]}, True, True),
        ({"requestPrincipals": ["*"]}, True, True),
        ({"requestPrincipals": ["*"]}, False, False),
        ({"notRequestPrincipals": ["*"]}, False, True),
        ({"notRequestPrincipals": ["*"]}, True, False),
        ({"notRequestPrincipals": [f"{ISSUER}/bob"]}, True, True),
    ],
)
def test_request_principals(fields, has_user, expected):
    user = make_user() if has_user else None
    assert matches(source(**fields), make_request(), user) is expected


@pytest.mark.parametrize(
    ("condition", "request_overrides", "expected"),
    [
        (when("request.headers[x-tenant]", ["acme"]), {}, True),
        (when("request.headers[X-Tenant]", ["acme"]), {}, True),
        (when("request.headers[x-tenant]", ["ACME"]), {}, False),
        (when("request.headers[x-tenant]", ["ac*"]), {}, True),
        (when("request.headers[x-tenant]", ["*me"]), {}, True),
        (when("request.headers[x-tenant]", ["*"]), {}, True),
        (when("request.headers[x-tenant]", ["other", "acme"]), {}, True),
        (when("request.headers[x-tenant]", ["acme"]), {"headers": {}}, False),
        (when("request.headers[x-tenant]", not_values=["evil"]), {}, True),
        (when("request.headers[x-tenant]", not_values=["acme"]), {}, False),
        (when("request.headers[x-tenant]", not_values=["a*"]), {}, False),
        (when("request.headers[x-tenant]", not_values=["acme"]), {"headers": {}}, True),
        (when("request.headers[x-tenant]", ["a*"], ["acme"]), {}, False),
        (when("request.headers[x-tenant]", ["a*"], ["ab*"]), {}, True),
        (when("source.ip", ["10.0.0.0/24"]), {}, True),
        (when("source.ip", ["10.0.0.7"]), {}, True),
        (when("source.ip", ["10.1.0.0/16"]), {}, False),
        (when("source.ip", not_values=["10.0.0.0/24"]), {}, False),
        (when("source.ip", not_values=["10.1.0.0/16"]), {}, True),
        (when("remote.ip", ["10.0.0.0/24"]), {}, True),
        (when("source.namespace", ["web"]), {}, True),
        (when("source.namespace", ["shop"]), {}, False),
        (when("source.namespace", ["web"]), {"source_principal": ""}, False),
        (when("source.namespace", not_values=["web"]), {}, False),
        (when("source.principal", ["cluster.local/ns/web/sa/frontend"]), {}, True),
        (when("source.principal", ["spiffe://cluster.local/ns/web/sa/frontend"]), {}, True),
        (when("source.principal", ["cluster.local/ns/web/*"]), {}, True),
        (when("source.principal", ["cluster.local/ns/other/sa/x"]), {}, False),
        (when("source.principal", not_values=["cluster.local/ns/web/sa/frontend"]), {}, False),
        (when("destination.port", ["8080"]), {}, True),
        (when("destination.port", ["9090"]), {}, False),
        (when("destination.port", ["443"]), {"destination_port": None, "scheme": "https"}, True),
        (when("destination.port", not_values=["8080"]), {}, False),
        (when("destination.port", not_values=["9090"]), {}, True),
    ],
)
def test_request_conditions(condition, request_overrides, expected):
    assert matches(condition, make_request(**request_overrides)) is expected


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (when("request.auth.principal", [f"{ISSUER}/alice"]), True),
        (when("request.auth.principal", [f"{ISSUER}/*"]), True),
        (when("request.auth.principal", [f"{ISSUER}/bob"]), False),
        (when("request.auth.principal", not_values=[f"{ISSUER}/alice"]), False),
        (when("request.auth.audiences", [AUDIENCE]), True),
        (when("request.auth.audiences", ["reports"]), True),
        (when("request.auth.audiences", ["billing"]), False),
        (when("request.auth.audiences", not_values=["reports"]), False),
        (when("request.auth.presenter", ["web-app"]), True),
        (when("request.auth.presenter", ["cli"]), False),
        (when("request.auth.claims[tier]", ["gold"]), True),
        (when("request.auth.claims[tier]", ["silver"]), False),
        (when("request.auth.claims[groups]", ["admins"]), True),
        (when("request.auth.claims[groups]", ["adm*"]), True),
        (when("request.auth.claims[groups]", ["root"]), False),
        (when("request.auth.claims[groups]", not_values=["admins"]), False),
        (when("request.auth.claims[groups]", not_values=["root"]), True),
        (when("request.auth.claims[org][team]", ["payments"]), True),
        (when("request.auth.claims[org][team]", ["shipping"]), False),
        (when("request.auth.claims[org][missing]", ["payments"]), False),
        (when("request.auth.claims[tier][nested]", ["gold"]), False),
        # Claims that are neither strings nor lists of strings never match.
        (when("request.auth.claims[org][level]", ["3"]), False),
        (when("request.auth.claims[org]", ["*"]), False),
        (when("request.auth.claims[missing]", ["*"]), False),
        (when("request.auth.claims[missing]", not_values=["x"]), True),
        (when("request.auth.claims[sub]", ["alice"]), True),
    ],
)
def test_user_conditions(condition, expected):
    assert matches(condition, make_request(), make_user()) is expected


@pytest.mark.parametrize(
    "key",
    ["request.auth.principal", "request.auth.audiences", "request.auth.presenter", "request.auth.claims[sub]"],
)
def test_user_conditions_without_user(key):
    assert matches(when(key, ["*"]), make_request(), None) is False


def test_user_not_values_without_user():
    assert matches(when("request.auth.claims[sub]", not_values=["alice"]), make_request(), None) is True


def test_claims_from_verified_token(authorizer, idp):
    authorizer, _ = authorizer
    token = idp.token(groups=["users", "admins"], org={"team": "payments"}, azp="web-app")
    user = authorizer.verifier.verify(token)

    assert matches(when("request.auth.claims[groups]", ["admins"]), make_request(), user) is True
    assert matches(when("request.auth.claims[org][team]", ["payments"]), make_request(), user) is True
    assert matches(when("request.auth.principal", [f"{ISSUER}/alice"]), make_request(), user) is True
    assert matches(when("request.auth.presenter", ["web-app"]), make_request(), user) is True
    assert matches(source(requestPrincipals=[f"{ISSUER}/*"]), make_request(), user) is True


@pytest.mark.parametrize(
    ("condition", "key", "fix"),
    [
        ({"key": "source.ipp", "values": ["10.0.0.1"]}, "spec.rules[0].when[0].key", "did you mean 'source.ip'?"),
        ({"key": "request.headers", "values": ["x"]}, "spec.rules[0].when[0].key", "write request.headers[NAME]"),
        ({"key": "request.auth.claims", "values": ["x"]}, "spec.rules[0].when[0].key",
         "write request.auth.claims[NAME]"),
        ({"values": ["x"]}, "spec.rules[0].when[0].key", "set key, such as request.headers[x-tenant]"),
        ({"key": "source.ip"}, "spec.rules[0].when[0]", None),
        ({"key": "source.ip", "value": ["10.0.0.1"]}, "spec.rules[0].when[0].value", "did you mean 'values'?"),
    ],
)
def test_invalid_condition_rejected(condition, key, fix):
    error = parse_error(make_document([{"when": [condition]}]))
    assert error.key == key
    assert error.fix == fix


@pytest.mark.parametrize(
    ("condition", "destination_address", "expected"),
    [
        (when("destination.ip", ["10.0.0.9"]), "10.0.0.9", True),
        (when("destination.ip", ["10.0.0.0/8"]), "10.1.2.3", True),
        (when("destination.ip", ["10.0.0.9"]), "10.0.0.8", False),
        (when("destination.ip", not_values=["10.0.0.0/8"]), "10.0.0.9", False),
        (when("destination.ip", not_values=["10.0.0.0/8"]), "192.0.2.1", True),
        (when("destination.ip", ["10.0.0.9"]), "", False),
    ],
)
def test_destination_ip_condition(condition, destination_address, expected):
    assert matches(condition, make_request(destination_address=destination_address)) is expected


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("source.ip[x]", "source.ip takes no [...] selector"),
        ("request.headers[a][b]", "request.headers takes one [name]"),
    ],
)
def test_invalid_condition_selector_rejected(key, message):
    error = parse_error(make_document([when(key, ["x"])]))
    assert error.key == "spec.rules[0].when[0].key"
    assert error.message == message


@pytest.mark.parametrize("ports", [["http"], ["0"], ["65536"], [8080]])
def test_invalid_port_rejected(ports):
    error = parse_error(make_document([operation(ports=ports)]))
    assert error.key == "spec.rules[0].to[0].operation.ports"


@pytest.mark.parametrize("paths", ["/api/*", [""], [None], {"prefix": "/api"}])
def test_non_string_list_rejected(paths):
    error = parse_error(make_document([operation(paths=paths)]))
    assert error.key == "spec.rules[0].to[0].operation.paths"
    assert "expected a list of non-empty strings" in error.message


# --- namespaces ------------------------------------------------------------------------------------


def namespaced(name: str, namespace: str) -> Policy:
    policy = parse(make_document([{}], name=name, namespace=namespace))
    assert policy is not None
    return policy


@pytest.mark.parametrize(
    ("request_overrides", "expected"),
    [
        ({}, ["istio-system/mesh-wide", "shop/in-shop"]),
        ({"destination_principal": "spiffe://cluster.local/ns/other/sa/backend"}, ["istio-system/mesh-wide"]),
        ({"destination_principal": "cluster.local/ns/shop/sa/backend"}, ["istio-system/mesh-wide", "shop/in-shop"]),
        # Without mTLS the route names the namespace in its context extensions.
        ({"destination_principal": "", "context_extensions": {"namespace": "shop"}},
         ["istio-system/mesh-wide", "shop/in-shop"]),
        ({"destination_principal": "", "context_extensions": {"namespace": "other"}}, ["istio-system/mesh-wide"]),
        ({"destination_principal": ""}, ["istio-system/mesh-wide"]),
        # The destination principal wins over the context extension.
        ({"context_extensions": {"namespace": "other"}}, ["istio-system/mesh-wide", "shop/in-shop"]),
        ({"destination_principal": "spiffe://cluster.local/ns/istio-system/sa/gateway"},
         ["istio-system/mesh-wide"]),
    ],
)
def test_namespace_scoping(request_overrides, expected):
    policies = PolicySet([namespaced("mesh-wide", "istio-system"), namespaced("in-shop", "shop"),
                          namespaced("in-web", "web")], "istio-system")
    matched = policies.match(make_request(**request_overrides), None)
    assert sorted(policy.key for policy in matched) == expected


def test_custom_root_namespace():
    policies = PolicySet([namespaced("mesh-wide", "istio-system"), namespaced("in-mesh-root", "mesh-root")],
                         "mesh-root")
    matched = policies.match(make_request(), None)
    assert [policy.key for policy in matched] == ["mesh-root/in-mesh-root"]


# --- annotations -----------------------------------------------------------------------------------


def annotated(annotations: dict[str, Any], token_ttl_cap: float = TTL_CAP) -> Requirements:
    policy = parse(make_document([{}], annotations=annotations), token_ttl_cap)
    assert policy is not None
    return policy.requirements


def annotation_error(annotations: dict[str, Any]) -> ConfigError:
    return parse_error(make_document([{}], annotations=annotations))


def test_no_annotations_no_requirements():
    assert annotated({}) == Requirements()


@pytest.mark.parametrize(
    ("annotations", "field", "expected"),
    [
        ({"extauthz.io/reauth-max-age": "5m"}, "reauth_max_age", 300.0),
        ({"extauthz.io/reauth-max-age": "90s"}, "reauth_max_age", 90.0),
        ({"extauthz.io/acr-values": "urn:a urn:b"}, "acr_values", (frozenset({"urn:a", "urn:b"}),)),
        ({"extauthz.io/acr-values": "  urn:a  "}, "acr_values", (frozenset({"urn:a"}),)),
        ({"extauthz.io/require-user": "true"}, "require_user", True),
        ({"extauthz.io/require-user": "True"}, "require_user", True),
        ({"extauthz.io/require-user": "false"}, "require_user", False),
        ({"extauthz.io/token-audience": "orders-api"}, "token_audience", "orders-api"),
        ({"extauthz.io/token-scope": "orders:read orders:write"}, "token_scope",
         frozenset({"orders:read", "orders:write"})),
        ({"extauthz.io/token-ttl": "15s"}, "token_ttl", 15.0),
        ({"extauthz.io/token-ttl": "1500ms"}, "token_ttl", 1.5),
    ],
)
def test_annotation_parsed(annotations, field, expected):
    assert getattr(annotated(annotations), field) == expected


@pytest.mark.parametrize(
    "annotations",
    [{"extauthz.io/reauth-max-age": "5m"}, {"extauthz.io/acr-values": "urn:a"},
     {"extauthz.io/reauth-max-age": "5m", "extauthz.io/require-user": "false"}],
)
def test_sensitive_route_requires_user(annotations):
    requirements = annotated(annotations)
    assert requirements.sensitive is True
    assert requirements.require_user is True


def test_token_annotations_not_sensitive():
    requirements = annotated({"extauthz.io/token-audience": "orders-api", "extauthz.io/token-ttl": "10s"})
    assert requirements.sensitive is False
    assert requirements.require_user is False


def test_other_annotations_ignored():
    requirements = annotated({"kubectl.kubernetes.io/last-applied-configuration": "{}",
                              "example.com/reauth-max-age": "nonsense", "extauthz.io.other/x": "1"})
    assert requirements == Requirements()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("reauth-max-age", "5 minutes"),
        ("reauth-max-age", "300"),
        ("reauth-max-age", "-1s"),
        ("reauth-max-age", "0s"),
        ("reauth-max-age", ""),
        ("token-ttl", "1d"),
        ("token-ttl", "0ms"),
        ("token-ttl", "500ms"),
        ("reauth-max-age", "999ms"),
    ],
)
def test_invalid_duration_annotation_rejected(name, value):
    error = annotation_error({f"extauthz.io/{name}": value})
    assert error.key == f"metadata.annotations[extauthz.io/{name}]"
    assert error.source == ORIGIN


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_acr_values_rejected(value):
    error = annotation_error({"extauthz.io/acr-values": value})
    assert error.key == "metadata.annotations[extauthz.io/acr-values]"
    assert error.message == "empty"


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_token_scope_rejected(value):
    error = annotation_error({"extauthz.io/token-scope": value})
    assert error.key == "metadata.annotations[extauthz.io/token-scope]"
    assert error.message == "empty"


def test_empty_token_audience_rejected():
    error = annotation_error({"extauthz.io/token-audience": " "})
    assert error.key == "metadata.annotations[extauthz.io/token-audience]"


@pytest.mark.parametrize("value", ["yes", "1", ""])
def test_invalid_require_user_rejected(value):
    error = annotation_error({"extauthz.io/require-user": value})
    assert error.key == "metadata.annotations[extauthz.io/require-user]"
    assert error.fix == 'use "true" or "false"'


@pytest.mark.parametrize("value", [300, True, None, ["urn:a"]])
def test_non_string_annotation_rejected(value):
    error = annotation_error({"extauthz.io/reauth-max-age": value})
    assert error.key == "metadata.annotations[extauthz.io/reauth-max-age]"
    assert error.fix == 'quote the value: "..."'


@pytest.mark.parametrize("name", ["extauthz.io/token-audience", "extauthz.io/token-scope",
                                  "extauthz.io/acr-values"])
def test_lone_surrogate_annotation_rejected(name):
    # yaml.safe_load turns the escape "\ud800" into a lone surrogate, which a token claim cannot carry.
    value = yaml.safe_load('"api-\\ud800"')
    error = annotation_error({name: value})
    assert error.key == f"metadata.annotations[{name}]"
    assert "surrogate" in error.message
    assert error.fix == "write the value as plain UTF-8 text"


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("extauthz.io/reauth-maxage", "extauthz.io/reauth-max-age"),
        ("extauthz.io/acr-value", "extauthz.io/acr-values"),
        ("extauthz.io/token-audiences", "extauthz.io/token-audience"),
        ("extauthz.io/require-users", "extauthz.io/require-user"),
    ],
)
def test_misspelt_annotation_rejected(name, suggestion):
    error = annotation_error({name: "5m"})
    assert error.key == f"metadata.annotations[{name}]"
    assert error.message == "unknown extauthz annotation"
    assert error.fix == f"did you mean {suggestion!r}?"


def test_unrelated_annotation_lists_known():
    error = annotation_error({"extauthz.io/colour": "blue"})
    assert "extauthz.io/token-ttl" in str(error.fix)


def test_token_ttl_capped(caplog):
    with caplog.at_level(logging.WARNING, logger="extauthz.policy"):
        requirements = annotated({"extauthz.io/token-ttl": "5m"}, token_ttl_cap=30.0)
    assert requirements.token_ttl == 30.0
    assert "token-ttl above token.ttl; capping it" in caplog.messages


def test_token_ttl_at_cap_kept():
    assert annotated({"extauthz.io/token-ttl": "30s"}, token_ttl_cap=30.0).token_ttl == 30.0


# --- loading files -----------------------------------------------------------------------------------


def load(*paths: Path) -> list[Policy]:
    return load_policies(paths, PROVIDER, TTL_CAP)


def load_error(*paths: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(*paths)
    return caught.value


def test_load_filters_documents(tmp_path):
    path = write_policies(tmp_path, make_document([{}], name="a"), make_document([{}], name="b", action="ALLOW"),
                          make_document([{}], name="c", provider="opa"), {"apiVersion": "v1", "kind": "ConfigMap"},
                          make_document([{}], name="d", api_version="security.istio.io/v1beta1"))
    assert [policy.key for policy in load(path)] == ["shop/a", "shop/d"]


def test_load_names_document_index(tmp_path):
    path = write_policies(tmp_path, make_document([{}], name="a"), make_document([{}], name="b"))
    assert [policy.origin for policy in load(path)] == [f"{path}#0", f"{path}#1"]


def test_load_skips_empty_documents(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text("---\n---\n" + yaml.safe_dump(make_document([{}])), encoding="utf-8")
    policies = load(path)
    assert [policy.origin for policy in policies] == [f"{path}#1"]


def test_load_folder_recursively(tmp_path):
    (tmp_path / "nested").mkdir()
    write_policies(tmp_path, make_document([{}], name="a"), name="a.yaml")
    write_policies(tmp_path / "nested", make_document([{}], name="b"), name="b.yml")
    write_policies(tmp_path, make_document([{}], name="c"), name="c.txt")
    assert sorted(policy.key for policy in load(tmp_path)) == ["shop/a", "shop/b"]


@pytest.mark.parametrize(
    ("change", "key", "fix"),
    [
        (lambda d: d["spec"].update(rule=[{}]), "spec.rule", "did you mean 'rules'?"),
        (lambda d: d.update(specs={}), "specs", "did you mean 'spec'?"),
        (lambda d: d["spec"]["rules"][0].update(too=[]), "spec.rules[0].too", "did you mean 'to'?"),
        (lambda d: d["spec"]["rules"][0]["to"][0]["operation"].update(path=["/x"]),
         "spec.rules[0].to[0].operation.path", "did you mean 'paths'?"),
        (lambda d: d["spec"]["rules"][0]["to"][0]["operation"].update(notPath=["/x"]),
         "spec.rules[0].to[0].operation.notPath", "did you mean 'notPaths'?"),
        (lambda d: d["spec"]["rules"][0]["to"][0].update(operations={}),
         "spec.rules[0].to[0].operations", "did you mean 'operation'?"),
    ],
)
def test_unknown_field_rejected(tmp_path, change, key, fix):
    good = make_document([{}], name="good")
    bad = make_document([operation(paths=["/api/*"])], name="bad")
    change(bad)
    path = write_policies(tmp_path, good, bad)
    error = load_error(path)
    assert error.source == f"{path}#1"
    assert error.key == key
    assert error.message == "unknown field"
    assert error.fix == fix
    assert f"{path}#1: {key}: unknown field ({fix})" == str(error)


def test_unknown_field_in_other_action_rejected(tmp_path):
    document = make_document([{}], action="ALLOW")
    document["spec"]["rulez"] = []
    error = load_error(write_policies(tmp_path, document))
    assert error.key == "spec.rulez"


def test_invalid_yaml_rejected(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text("apiVersion: security.istio.io/v1\nkind: [unclosed\n", encoding="utf-8")
    error = load_error(path)
    assert error.source == str(path)
    assert error.message.startswith("invalid YAML")


def test_non_mapping_document_rejected(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(make_document([{}])) + "---\n- a list\n", encoding="utf-8")
    error = load_error(path)
    assert error.source == f"{path}#1"
    assert error.message == "expected a Kubernetes object"


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "absent.yaml"
    error = load_error(path)
    assert error.source == str(path)
    assert error.message.startswith("cannot read")


def test_duplicate_policy_rejected(tmp_path):
    first = write_policies(tmp_path, make_document([{}], name="p"), name="a.yaml")
    second = write_policies(tmp_path, make_document([{}], name="other"), make_document([{}], name="p"),
                            name="b.yaml")
    error = load_error(first, second)
    assert error.source == f"{second}#1"
    assert error.key == "metadata.name"
    assert error.message == f"duplicate policy shop/p, also in {first}#0"


def test_same_name_other_namespace_loads(tmp_path):
    path = write_policies(tmp_path, make_document([{}], namespace="shop"), make_document([{}], namespace="web"))
    assert [policy.key for policy in load(path)] == ["shop/p", "web/p"]


def test_annotation_error_names_document(tmp_path):
    good = make_document([{}], name="good")
    bad = make_document([{}], name="bad", annotations={"extauthz.io/reauth-max-age": "soon"})
    path = write_policies(tmp_path, good, bad)
    error = load_error(path)
    assert str(error).startswith(f"{path}#1: metadata.annotations[extauthz.io/reauth-max-age]: ")


def test_demo_policies_load():
    folder = Path(__file__).resolve().parent.parent / "examples" / "policies"
    policies = load(folder)
    assert sorted(policy.key for policy in policies) == ["demo/catalog", "demo/payments-step-up"]


# --- combine_requirements ------------------------------------------------------------------------


def policy_with(name: str, **requirements: Any) -> Policy:
    return Policy(name=name, namespace="shop", origin=f"{name}.yaml#0", rules=(),
                  requirements=Requirements(**requirements))


def test_combine_nothing():
    assert combine_requirements([]) == Requirements()


def test_combine_one_unchanged():
    requirements = Requirements(require_user=True, reauth_max_age=300.0, acr_values=(frozenset({"a"}),),
                                token_audience="api", token_scope=frozenset({"read"}), token_ttl=10.0)
    policy = Policy(name="p", namespace="shop", origin="p.yaml#0", rules=(), requirements=requirements)
    assert combine_requirements([policy]) == requirements


@pytest.mark.parametrize(
    ("first", "second", "field", "expected"),
    [
        ({"reauth_max_age": 300.0}, {"reauth_max_age": 60.0}, "reauth_max_age", 60.0),
        ({"reauth_max_age": 300.0}, {}, "reauth_max_age", 300.0),
        ({}, {"reauth_max_age": 300.0}, "reauth_max_age", 300.0),
        ({"token_ttl": 10.0}, {"token_ttl": 20.0}, "token_ttl", 10.0),
        ({}, {"token_ttl": 20.0}, "token_ttl", 20.0),
        ({"token_scope": frozenset({"read", "write"})}, {"token_scope": frozenset({"read", "admin"})},
         "token_scope", frozenset({"read"})),
        ({"token_scope": frozenset({"read"})}, {"token_scope": frozenset({"write"})}, "token_scope", frozenset()),
        ({"token_scope": frozenset({"read"})}, {}, "token_scope", frozenset({"read"})),
        ({"require_user": True}, {}, "require_user", True),
        ({}, {}, "require_user", False),
        ({"token_audience": "api"}, {"token_audience": "api"}, "token_audience", "api"),
        ({"token_audience": "api"}, {}, "token_audience", "api"),
        ({"acr_values": (frozenset({"a", "b"}),)}, {"acr_values": (frozenset({"b", "c"}),)}, "acr_values",
         (frozenset({"a", "b"}), frozenset({"b", "c"}))),
        ({"acr_values": (frozenset({"a", "b"}),)}, {"acr_values": (frozenset({"b", "a"}),)}, "acr_values",
         (frozenset({"a", "b"}),)),
        ({"acr_values": (frozenset({"a"}),)}, {}, "acr_values", (frozenset({"a"}),)),
    ],
)
def test_combine_two(first, second, field, expected):
    combined = combine_requirements([policy_with("first", **first), policy_with("second", **second)])
    assert getattr(combined, field) == expected


def test_combine_three_strictest():
    combined = combine_requirements([
        policy_with("a", reauth_max_age=600.0, token_ttl=25.0),
        policy_with("b", reauth_max_age=120.0),
        policy_with("c", reauth_max_age=300.0, token_ttl=5.0),
    ])
    assert combined.reauth_max_age == 120.0
    assert combined.token_ttl == 5.0


def test_conflicting_audiences_rejected():
    with pytest.raises(DenyError) as caught:
        combine_requirements([policy_with("a", token_audience="orders"), policy_with("b", token_audience="billing")])
    assert caught.value.code == "policy_conflict"
    assert "billing" in caught.value.detail
    assert "orders" in caught.value.detail


def test_disjoint_acr_sets_rejected():
    with pytest.raises(DenyError) as caught:
        combine_requirements([policy_with("a", acr_values=(frozenset({"urn:a"}),)),
                              policy_with("b", acr_values=(frozenset({"urn:b", "urn:c"}),))])
    assert caught.value.code == "policy_conflict"


def test_combined_from_loaded_policies():
    first = parse(make_document([{}], name="a", annotations={
        "extauthz.io/reauth-max-age": "10m", "extauthz.io/acr-values": "urn:a urn:b",
        "extauthz.io/token-scope": "read write"}))
    second = parse(make_document([{}], name="b", annotations={
        "extauthz.io/reauth-max-age": "5m", "extauthz.io/acr-values": "urn:b urn:c",
        "extauthz.io/token-scope": "read"}))
    combined = combine_requirements([first, second])
    assert combined.reauth_max_age == 300.0
    assert frozenset.intersection(*combined.acr_values) == frozenset({"urn:b"})
    assert combined.token_scope == frozenset({"read"})
    assert combined.require_user is True


def test_parse_leaves_document_unchanged():
    document = make_document([operation(paths=["/api/*"])], annotations={"extauthz.io/token-ttl": "10s"})
    before = copy.deepcopy(document)
    parse(document)
    assert document == before



def test_status_field_accepted():
    document = make_document([{}])
    document["status"] = {"validationMessages": []}
    policy = parse(document)
    assert policy is not None
