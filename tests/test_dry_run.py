"""Policies annotated `extauthz.io/mode: dry-run`: their denies are recorded and counted, never enforced."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
import yaml
from helpers import check_request, make_authorizer, write_config

DRY_RUN_DENIES = "extauthz_dry_run_denies_total"


def policy(name: str, path: str, annotations: dict[str, str]) -> dict[str, Any]:
    """Return one CUSTOM policy in namespace `shop` for `path`, enforced unless `annotations` set another mode."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop",
                     "annotations": {"extauthz.io/mode": "enforce", **annotations}},
        "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"},
                 "rules": [{"to": [{"operation": {"paths": [path]}}]}]},
    }


DRY_RUN = {"extauthz.io/mode": "dry-run"}
NEEDS_USER = {"extauthz.io/require-user": "true"}

POLICIES = yaml.safe_dump_all([
    # /beta: only a dry-run policy that would demand a token.
    policy("beta-shadow", "/beta/*", {**DRY_RUN, **NEEDS_USER}),
    # /open: an enforced open policy, and a dry-run policy that would demand a token.
    policy("open", "/open/*", {}),
    policy("open-shadow", "/open/*", {**DRY_RUN, **NEEDS_USER}),
    # /private: an enforced policy that demands a token, and an open dry-run policy.
    policy("private", "/private/*", NEEDS_USER),
    policy("private-shadow", "/private/*", DRY_RUN),
    # /preview: only an open dry-run policy.
    policy("preview-shadow", "/preview/*", DRY_RUN),
], sort_keys=False)


@pytest.fixture
def dry_run_authorizer(tmp_path, idp):
    authorizer, decision_log, _ = make_authorizer(write_config(tmp_path, idp, policies=POLICIES))
    return authorizer, decision_log


def dry_run_denies(authorizer, reason: str) -> float:
    value = authorizer.metrics.registry.get_sample_value(DRY_RUN_DENIES, {"reason": reason})
    return value or 0.0


def test_policy_yaml_modes(dry_run_authorizer):
    authorizer, _ = dry_run_authorizer
    modes = {policy.name: policy.dry_run for policy in authorizer.policies.policies}
    assert modes == {"beta-shadow": True, "open": False, "open-shadow": True, "private": False,
                     "private-shadow": True, "preview-shadow": True}


def test_would_deny_allowed(dry_run_authorizer):
    authorizer, decision_log = dry_run_authorizer

    decision = authorizer.check(check_request(path="/beta/x"))

    assert decision.allowed
    assert decision.minted is not None
    record = decision_log.records()[-1]
    assert record["decision"] == "allow"
    assert record["status"] == 200
    assert record["policies"] == ["shop/beta-shadow"]
    assert record["would_deny_reason"] == "missing_token"
    assert record["would_deny_status"] == 401


def test_would_deny_counted(dry_run_authorizer):
    authorizer, _ = dry_run_authorizer

    authorizer.check(check_request(path="/beta/x"))
    authorizer.check(check_request(path="/beta/y"))

    assert dry_run_denies(authorizer, "missing_token") == 2
    checks = authorizer.metrics.registry.get_sample_value("extauthz_checks_total",
                                                          {"decision": "allow", "reason": "allowed"})
    assert checks == 2


def test_enforced_allow_decides(dry_run_authorizer):
    authorizer, decision_log = dry_run_authorizer

    decision = authorizer.check(check_request(path="/open/x"))

    assert decision.allowed
    record = decision_log.records()[-1]
    assert record["policies"] == ["shop/open", "shop/open-shadow"]
    assert record["would_deny_reason"] == "missing_token"
    assert dry_run_denies(authorizer, "missing_token") == 1


def test_enforced_deny_decides(dry_run_authorizer):
    authorizer, decision_log = dry_run_authorizer

    decision = authorizer.check(check_request(path="/private/x"))

    assert not decision.allowed
    assert decision.status == 401
    assert decision.reason == "missing_token"
    record = decision_log.records()[-1]
    assert record["decision"] == "deny"
    assert record["policies"] == ["shop/private", "shop/private-shadow"]


def test_enforced_deny_not_blamed(dry_run_authorizer):
    authorizer, decision_log = dry_run_authorizer

    authorizer.check(check_request(path="/private/x"))

    assert "would_deny_reason" not in decision_log.records()[-1]
    assert dry_run_denies(authorizer, "missing_token") == 0


def test_enforced_deny_with_token_allowed(dry_run_authorizer, idp):
    authorizer, decision_log = dry_run_authorizer

    decision = authorizer.check(check_request(path="/private/x", token=idp.token()))

    assert decision.allowed
    assert "would_deny_reason" not in decision_log.records()[-1]


def test_would_allow_allows(dry_run_authorizer):
    authorizer, decision_log = dry_run_authorizer

    decision = authorizer.check(check_request(path="/preview/x"))

    assert decision.allowed
    record = decision_log.records()[-1]
    assert record["policies"] == ["shop/preview-shadow"]
    assert "would_deny_reason" not in record
    assert "would_deny_status" not in record
    assert authorizer.metrics.registry.get_sample_value(DRY_RUN_DENIES, {"reason": "missing_token"}) is None


SETTINGS_POLICIES = yaml.safe_dump_all([
    # /vault: an enforced policy with its own audience, and a dry-run one-time policy with a short TTL.
    policy("vault", "/vault/*", {"extauthz.io/token-audience": "vault-api"}),
    policy("vault-shadow", "/vault/*", {**DRY_RUN, "extauthz.io/one-time-token": "true",
                                       "extauthz.io/token-ttl": "5s"}),
], sort_keys=False)


@pytest.fixture
def settings_authorizer(tmp_path, idp):
    authorizer, decision_log, _ = make_authorizer(write_config(tmp_path, idp, policies=SETTINGS_POLICIES))
    return authorizer, decision_log


def test_dry_run_settings_not_applied(settings_authorizer, idp):
    authorizer, decision_log = settings_authorizer
    decision = authorizer.check(check_request(path="/vault/x", token=idp.token()))
    claims = jwt.decode(decision.minted.token, options={"verify_signature": False})
    record = decision_log.records()[0]
    assert decision.allowed
    assert record["token_aud"] == "vault-api"
    assert claims["exp"] - claims["iat"] == 30
    assert "would_deny_reason" not in record


def test_dry_run_one_time_claims_nothing(settings_authorizer, idp):
    authorizer, _ = settings_authorizer
    token = idp.token()
    first = authorizer.check(check_request(path="/vault/x", token=token, request_id="req-a"))
    second = authorizer.check(check_request(path="/vault/x", token=token, request_id="req-b"))
    assert first.allowed
    assert second.allowed
    assert second.would_deny is None
