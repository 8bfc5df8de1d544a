"""`extauthz policy explain` decides a request as `serve` does, and reports which policies and rules matched."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from helpers import POLICIES, TestIdP, check_request, make_authorizer, write_config

from extauthz.cli import main
from extauthz.explain import ExplainRequest, explain
from extauthz.response import build_check_response

HOST = "shop.example.com"
FRONTEND = "spiffe://cluster.local/ns/web/sa/frontend"
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"
SOURCE_ADDRESS = "10.0.0.7"
DESTINATION_PORT = 8080

# The default test policies, a dry-run policy that would demand a token on /beta, and a policy whose
# second rule is the only one that matches /reports/weekly.
EXPLAIN_POLICIES = POLICIES + """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: beta-shadow
  namespace: shop
  annotations:
    extauthz.io/mode: dry-run
    extauthz.io/require-user: "true"
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/beta/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reports
  namespace: shop
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/reports/daily"]
  - to:
    - operation:
        paths: ["/reports/*"]
        methods: ["GET"]
"""


@pytest.fixture(scope="module")
def explain_setup(tmp_path_factory, idp):
    """Write the configuration once and return its path, the loaded Config and serve's Authorizer."""
    config_path = write_config(tmp_path_factory.mktemp("explain"), idp, policies=EXPLAIN_POLICIES)
    authorizer, _, config = make_authorizer(config_path)
    return config_path, config, authorizer


def make_token(kind: str | None, idp: TestIdP) -> str | None:
    if kind is None:
        return None
    if kind == "fresh":
        return idp.token()
    if kind == "stale":
        return idp.token(auth_time=int(time.time()) - 3600)
    if kind == "forged":
        # Same issuer and claims, signed with a key that the issuer's JWKS does not contain.
        return TestIdP(idp.issuer).token()
    raise AssertionError(kind)


def explain_request(path: str, token: str | None = None, claims: dict[str, Any] | None = None) -> ExplainRequest:
    """Build the ExplainRequest that matches helpers.check_request(path=..., token=...)."""
    return ExplainRequest(method="GET", host=HOST, path=path, source_principal=FRONTEND,
                          source_address=SOURCE_ADDRESS, destination_principal=BACKEND,
                          destination_port=DESTINATION_PORT, token=token, claims=claims)


CASES = [
    pytest.param("/admin", "fresh", ("allow", 200, "allowed"), None, id="allowed"),
    pytest.param("/admin", "stale", ("deny", 401, "insufficient_user_authentication"), None, id="step-up"),
    pytest.param("/admin", None, ("deny", 401, "missing_token"), None, id="missing-token"),
    pytest.param("/admin", "forged", ("deny", 401, "invalid_token"), None, id="invalid-token"),
    pytest.param("/elsewhere", "fresh", ("deny", 403, "no_matching_policy"), None, id="no-matching-policy"),
    pytest.param("/public/a\\b", None, ("deny", 400, "invalid_path"), None, id="bad-path"),
    pytest.param("/beta/x", None, ("allow", 200, "allowed"), "missing_token", id="dry-run"),
]


@pytest.mark.parametrize(("path", "token_kind", "expected", "would_deny"), CASES)
def test_explain_matches_serve(explain_setup, idp, path, token_kind, expected, would_deny):
    _, config, authorizer = explain_setup
    token = make_token(token_kind, idp)

    result = explain(config, explain_request(path, token))
    decision = authorizer.check(check_request(path=path, token=token))

    outcome, status, reason = expected
    assert decision.outcome == outcome
    assert decision.status == status
    assert decision.reason == reason
    assert result["decision"] == decision.outcome
    assert result["status"] == decision.status
    assert result["reason"] == decision.reason
    assert result["detail"] == decision.detail
    assert result.get("would_deny") == would_deny
    served_would_deny = decision.would_deny.code if decision.would_deny else None
    assert served_would_deny == would_deny


@pytest.mark.parametrize(("path", "token_kind", "challenged"),
                         [("/admin", None, True), ("/admin", "stale", True), ("/elsewhere", None, False)])
def test_explain_challenge_matches(explain_setup, idp, path, token_kind, challenged):
    _, config, authorizer = explain_setup
    token = make_token(token_kind, idp)

    result = explain(config, explain_request(path, token))
    response = build_check_response(authorizer.check(check_request(path=path, token=token)), "txn-token")

    served = [option.header.value for option in response.denied_response.headers
              if option.header.key == "www-authenticate"]
    explained = [result["www_authenticate"]] if "www_authenticate" in result else []
    assert explained == served
    assert bool(served) == challenged


@pytest.mark.parametrize(("auth_age", "expected_reason"), [(30, "allowed"), (3600, "insufficient_user_authentication")])
def test_claims_match_signed_token(explain_setup, idp, auth_age, expected_reason):
    _, config, authorizer = explain_setup
    claims = idp.claims(auth_time=int(time.time()) - auth_age)
    token = jwt.encode(claims, idp.private_key, algorithm="ES256", headers={"kid": idp.kid})

    from_claims = explain(config, explain_request("/admin", claims=claims))
    from_token = explain(config, explain_request("/admin", token=token))
    served = authorizer.check(check_request(path="/admin", token=token))

    assert served.reason == expected_reason
    assert from_claims["reason"] == served.reason
    assert from_claims["status"] == served.status
    assert from_claims["decision"] == from_token["decision"]
    assert from_claims["user"] == from_token["user"]


def test_claims_unknown_issuer(explain_setup, idp):
    _, config, _ = explain_setup
    result = explain(config, explain_request("/admin", claims=idp.claims(iss="https://elsewhere.test")))
    assert result["reason"] == "invalid_token"


def test_explain_lists_matched_rules(explain_setup):
    _, config, _ = explain_setup

    result = explain(config, explain_request("/reports/weekly"))

    matched = {entry["policy"]: entry["matched_rules"] for entry in result["policies"]}
    assert matched == {"shop/admin-step-up": [], "shop/public": [], "shop/beta-shadow": [], "shop/reports": [1]}
    assert result["request"]["destination_namespace"] == "shop"


# --- the command line -------------------------------------------------------------------------


def run_explain(capsys, config_path, *args: str) -> tuple[int, str, str]:
    """Run `extauthz policy explain --config CONFIG --host HOST ARGS` and return the exit status, stdout and stderr."""
    code = main(["policy", "explain", "--config", str(config_path), "--host", HOST, *args])
    output = capsys.readouterr()
    return code, output.out, output.err


def test_cli_text_names_rule(explain_setup, capsys):
    config_path, _, _ = explain_setup

    code, output, _ = run_explain(capsys, config_path, "--path", "/reports/weekly",
                                  "--destination-principal", BACKEND)

    assert code == 0
    lines = output.splitlines()
    assert "  shop/reports: matched (rule 1)" in lines
    assert "  shop/public: not matched" in lines
    assert "Decision: allow 200 allowed" in lines


def test_cli_text_dry_run(explain_setup, capsys):
    config_path, _, _ = explain_setup

    code, output, _ = run_explain(capsys, config_path, "--path", "/beta/x", "--context-extension", "namespace=shop")

    assert code == 0
    lines = output.splitlines()
    assert "Request: GET shop.example.com/beta/x (destination namespace: shop)" in lines
    assert "  dry-run policies would have denied it: missing_token" in lines
    assert "Decision: allow 200 allowed" in lines


def test_cli_json_parses(explain_setup, idp, capsys):
    config_path, _, authorizer = explain_setup
    claims = idp.claims(auth_time=int(time.time()) - 3600)
    token = jwt.encode(claims, idp.private_key, algorithm="ES256", headers={"kid": idp.kid})

    code, output, _ = run_explain(capsys, config_path, "--path", "/admin", "--destination-principal", BACKEND,
                                  "--claims", json.dumps(claims), "--format", "json")
    served = authorizer.check(check_request(path="/admin", token=token))

    assert code == 0
    result = json.loads(output)
    assert result["decision"] == served.outcome
    assert result["status"] == served.status
    assert result["reason"] == served.reason
    assert result["www_authenticate"].startswith('Bearer error="insufficient_user_authentication"')
    assert result["user"]["sub"] == "alice"


@pytest.mark.parametrize("arguments", [["--claims", "[1, 2]"], ["--header", "no-separator"]])
def test_cli_bad_input_exits_2(explain_setup, capsys, arguments):
    config_path, _, _ = explain_setup

    code, output, error = run_explain(capsys, config_path, "--path", "/admin", *arguments)

    assert code == 2
    assert output == ""
    assert error.startswith("extauthz policy explain: ")
