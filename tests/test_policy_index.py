"""PolicySet's compiled and indexed match against the linear evaluation with rule_matches."""

from __future__ import annotations

from typing import Any

from helpers import AUDIENCE, ISSUER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.identity import EndUser
from extauthz.policy import Policy, StringMatch, parse_policy
from extauthz.policy_index import PolicySet, _StringKeys, compile_values
from extauthz.request import HttpRequest

ROOT = "istio-system"
NAMESPACES = (ROOT, "shop", "web")

# Small value pools, so that random rules and requests often meet: exact values, prefixes, suffixes,
# `*`, path templates, mixed-case hosts and hosts with ports.
PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/", "/a/*", "/a/b*", "*/b", "*b", "*", "/a/{*}", "/a/{**}", "/{*}/b",
         "{**}", "/b*", "/bb/c"]
HOSTS = ["shop.example.com", "SHOP.Example.com", "*.example.com", "shop.*", "*", "shop.example.com:8080",
         "shop.example.com:80", "other.test", "*:8080"]
METHODS = ["GET", "POST", "*", "G*", "*T", "get"]
PORTS = ["80", "443", "8080"]
PRINCIPALS = ["cluster.local/ns/web/sa/frontend", "spiffe://cluster.local/ns/web/sa/frontend", "*/sa/frontend",
              "cluster.local/*", "*"]
SOURCE_NAMESPACES = ["web", "shop", "w*", "*"]
REQUEST_PRINCIPALS = [f"{ISSUER}/alice", f"{ISSUER}/*", "*", "*/bob"]
IP_BLOCKS = ["10.0.0.0/8", "10.0.0.7", "192.168.0.0/16", "::1/128"]
CONDITIONS = [
    ("request.headers[x-tenant]", ["acme", "a*", "*"]),
    ("request.auth.claims[groups]", ["admins", "users", "*"]),
    ("request.auth.audiences", [AUDIENCE, "reports"]),
    ("source.ip", IP_BLOCKS),
    ("destination.port", PORTS),
    ("context_extensions[namespace]", ["shop", "web"]),
    ("source.namespace", ["web", "shop"]),
]

REQUEST_PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/", "/a/b/c", "/b", "/bb/c", "/x/b", "/ab"]
REQUEST_HOSTS = ["shop.example.com", "a.example.com", "other.test", "shop.test"]


def _values(pool: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(pool), min_size=0, max_size=3)


def _fields(table: dict[str, list[str]]) -> st.SearchStrategy[dict[str, list[str]]]:
    return st.fixed_dictionaries({}, optional={name: _values(pool) for name, pool in table.items()})


OPERATION_FIELDS = {"paths": PATHS, "notPaths": PATHS, "hosts": HOSTS, "notHosts": HOSTS, "methods": METHODS,
                    "notMethods": METHODS, "ports": PORTS, "notPorts": PORTS}
SOURCE_FIELDS = {"principals": PRINCIPALS, "notPrincipals": PRINCIPALS, "namespaces": SOURCE_NAMESPACES,
                 "notNamespaces": SOURCE_NAMESPACES, "requestPrincipals": REQUEST_PRINCIPALS,
                 "notRequestPrincipals": REQUEST_PRINCIPALS, "ipBlocks": IP_BLOCKS, "notIpBlocks": IP_BLOCKS}


@st.composite
def conditions(draw: st.DrawFn) -> dict[str, Any]:
    key, pool = draw(st.sampled_from(CONDITIONS))
    condition: dict[str, Any] = {"key": key}
    values = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    kind = draw(st.sampled_from(["values", "notValues", "both"]))
    if kind in ("values", "both"):
        condition["values"] = values
    if kind in ("notValues", "both"):
        condition["notValues"] = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    return condition


@st.composite
def operations(draw: st.DrawFn) -> dict[str, Any]:
    """Draw an operation; three in four carry a field that the index can key on."""
    operation = draw(_fields(OPERATION_FIELDS))
    if draw(st.integers(0, 3)):
        name = draw(st.sampled_from(["paths", "hosts", "methods"]))
        pool = {"paths": PATHS, "hosts": HOSTS, "methods": METHODS}[name]
        operation[name] = draw(st.lists(st.sampled_from([value for value in pool if value != "*"]),
                                        min_size=1, max_size=3))
    return operation


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["from"] = [{"source": source} for source in draw(st.lists(_fields(SOURCE_FIELDS), max_size=2))]
    if draw(st.integers(0, 3)):
        rule["to"] = [{"operation": operation} for operation in draw(st.lists(operations(), min_size=0, max_size=2))]
    if draw(st.integers(0, 3)) == 0:
        rule["when"] = draw(st.lists(conditions(), min_size=1, max_size=2))
    return rule


@st.composite
def policy_tables(draw: st.DrawFn) -> list[Policy]:
    count = draw(st.integers(0, 12))
    policies = []
    for index in range(count):
        document: dict[str, Any] = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"p{index}", "namespace": draw(st.sampled_from(NAMESPACES))},
            "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"}},
        }
        if draw(st.integers(0, 9)):
            document["spec"]["rules"] = draw(st.lists(rules(), min_size=0, max_size=2))
        policy = parse_policy(document, f"random.yaml#{index}", "extauthz", 30.0)
        assert policy is not None
        policies.append(policy)
    return policies


@st.composite
def requests(draw: st.DrawFn) -> HttpRequest:
    destination = draw(st.sampled_from(["", "spiffe://cluster.local/ns/shop/sa/api",
                                        "spiffe://cluster.local/ns/web/sa/ui", "spiffe://cluster.local/ns/other/sa/x"]))
    extensions = draw(st.sampled_from([{}, {"namespace": "shop"}, {"namespace": "web"}]))
    return HttpRequest(
        method=draw(st.sampled_from(["GET", "POST", "PUT"])),
        scheme=draw(st.sampled_from(["http", "https"])),
        host=draw(st.sampled_from(REQUEST_HOSTS)),
        authority_port=draw(st.sampled_from([None, 8080])),
        path=draw(st.sampled_from(REQUEST_PATHS)),
        query="",
        headers=draw(st.sampled_from([{}, {"x-tenant": "acme"}, {"x-tenant": "beta"}])),
        request_id="req-1",
        source_address=draw(st.sampled_from(["10.0.0.7", "192.168.1.1", "::1", ""])),
        source_principal=draw(st.sampled_from(["", "spiffe://cluster.local/ns/web/sa/frontend",
                                               "spiffe://cluster.local/ns/shop/sa/backend"])),
        destination_principal=destination,
        destination_port=draw(st.sampled_from([None, 8080, 443])),
        destination_address="10.0.0.9",
        context_extensions=extensions,
    )


@st.composite
def users(draw: st.DrawFn) -> EndUser | None:
    if draw(st.booleans()):
        return None
    subject = draw(st.sampled_from(["alice", "bob"]))
    groups = draw(st.sampled_from([["users"], ["users", "admins"], "admins", []]))
    return EndUser(issuer=ISSUER, subject=subject, audiences=(AUDIENCE,), presenter="web-app",
                   expires_at=2_000_000_000.0, not_before=None, issued_at=None, auth_time=None, acr=None, amr=(),
                   session_id=None, token_id=None, kid=None,
                   claims={"iss": ISSUER, "sub": subject, "groups": groups})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_tables(), st.lists(st.tuples(requests(), users()), min_size=1, max_size=8))
def test_index_equals_linear(policies, cases):
    indexed = PolicySet(policies, ROOT, index_threshold=0)
    compiled = PolicySet(policies, ROOT, index_threshold=len(policies) + 1)
    for request, user in cases:
        expected = indexed.match_linear(request, user)
        assert indexed.match(request, user) == expected
        assert compiled.match(request, user) == expected


@given(st.lists(st.sampled_from(PATHS + HOSTS + METHODS), min_size=0, max_size=4),
       st.sampled_from(REQUEST_PATHS + REQUEST_HOSTS + ["", "GET", "shop.example.com:8080"]),
       st.booleans())
def test_compiled_values_equal_string_match(texts, candidate, fold_case):
    values = [StringMatch(text, fold_case=fold_case, path=not fold_case) for text in texts]
    expected = any(value.matches(candidate) for value in values)
    assert compile_values(values)(candidate) == expected


def test_index_narrows_candidates():
    documents = [
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": f"p{index}", "namespace": "shop"},
         "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"},
                  "rules": [{"to": [{"operation": {"paths": [f"/service-{index}/*"]}}]}]}}
        for index in range(50)
    ]
    policies = [parse_policy(document, "p.yaml", "extauthz", 30.0) for document in documents]
    policy_set = PolicySet(policies, ROOT)
    request = HttpRequest(method="GET", scheme="http", host="shop.test", authority_port=None, path="/service-7/x",
                          query="", headers={}, request_id="r", source_address="10.0.0.7", source_principal="",
                          destination_principal="spiffe://cluster.local/ns/shop/sa/api", destination_port=None)
    index = policy_set._indexes["shop"]
    found: set[int] = set()
    index.paths.collect(request.path, found)
    assert found == {7}
    assert policy_set.match(request, None) == [policies[7]]


def string_keys(*texts: str, fold_case: bool = False) -> _StringKeys:
    keys = _StringKeys()
    for position, text in enumerate(texts):
        keys.add(StringMatch(text, fold_case=fold_case, path=not fold_case), position)
    keys.freeze()
    return keys


def collected(keys: _StringKeys, candidate: str) -> set[int]:
    found: set[int] = set()
    keys.collect(candidate, found)
    return found


def test_keys_exact_prefix_suffix():
    keys = string_keys("/a", "/a*", "/a/*", "*b", "*/b", "/a/b")
    assert collected(keys, "/a") == {0, 1}
    assert collected(keys, "/a/b") == {1, 2, 3, 4, 5}
    assert collected(keys, "/ab") == {1, 3}
    assert collected(keys, "/b") == {3, 4}
    assert collected(keys, "/c") == set()
    assert collected(keys, "") == set()


def test_keys_prefix_as_long_as_candidate():
    keys = string_keys("/abc*", "*/abc")
    assert collected(keys, "/abc") == {0, 1}
    assert collected(keys, "/ab") == set()


def test_keys_path_templates_by_literal_start():
    keys = string_keys("/a/{*}", "/{**}", "{*}/x", "/a/{*}/c")
    assert collected(keys, "/a/b") == {0, 1, 2, 3}
    assert collected(keys, "/b") == {1, 2}
    assert collected(keys, "b") == {2}


def test_keys_hosts_folded():
    keys = string_keys("Shop.Example.com", "*.EXAMPLE.com", "shop.*", fold_case=True)
    assert collected(keys, "shop.example.com") == {0, 1, 2}
    assert collected(keys, "a.example.com") == {1}
