"""Hostile or odd inputs that must still get a definite, fail-closed decision.

Each case crosses two modules: a revoked token on a route that only dry-run policies match, a `;`
path parameter next to a step-up policy, claims that cannot be encoded again, a deeply nested token
payload, and a policy file that PyYAML rejects with ValueError instead of YAMLError.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import yaml
from helpers import RecordingLog, check_request, make_authorizer, write_config

from extauthz.config import load_config
from extauthz.revocation import revoke
from extauthz.server import Service


def policy(name: str, paths: list[str], annotations: dict[str, str]) -> dict[str, Any]:
    """Return a CUSTOM policy in namespace `shop` for `paths`, enforced unless `annotations` set dry-run."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"},
                 "rules": [{"to": [{"operation": {"paths": paths}}]}]},
    }


def test_dry_run_only_revoked_denied(tmp_path, idp):
    policies = yaml.safe_dump_all([policy("preview-shadow", ["/preview/*"], {"extauthz.io/mode": "dry-run"})])
    authorizer, decision_log, config = make_authorizer(write_config(tmp_path, idp, policies=policies))
    token = idp.token(sub="mallory")
    revoke(authorizer.revocations.store, config, "sub", "mallory")

    decision = authorizer.check(check_request(path="/preview/report", token=token))

    # docs/policies.md, Dry-run: "An invalid or revoked end-user token is still denied".
    assert decision.reason == "token_revoked"
    assert not decision.allowed
    assert decision.minted is None
    assert decision_log.records()[-1]["decision"] == "deny"


STEP_UP_POLICIES = yaml.safe_dump_all([
    policy("signed-in", ["/*"], {"extauthz.io/require-user": "true"}),
    policy("admin-step-up", ["/admin", "/admin/*"], {"extauthz.io/reauth-max-age": "5m"}),
])


def test_path_parameter_step_up(tmp_path, idp):
    authorizer, _, _ = make_authorizer(write_config(tmp_path, idp, policies=STEP_UP_POLICIES))
    old_login = idp.token(auth_time=int(time.time()) - 7200)

    plain = authorizer.check(check_request(path="/admin/users", token=old_login))
    with_parameter = authorizer.check(check_request(path="/admin;v=1/users", token=old_login))

    assert plain.reason == "insufficient_user_authentication"
    assert not with_parameter.allowed
    assert with_parameter.reason in ("invalid_path", "insufficient_user_authentication")


def test_surrogate_subject_decided(tmp_path, idp):
    authorizer, decision_log, _ = make_authorizer(write_config(tmp_path, idp))
    # pyjwt writes "\ud800" as the JSON escape \ud800, which json.loads reads back as a lone surrogate.
    token = idp.token(sub="\ud800")

    decision = authorizer.check(check_request(path="/public/items", token=token))

    assert decision.reason in ("allowed", "invalid_token")
    assert len(decision_log.records()) == 1


def test_nested_payload_invalid_token(tmp_path, idp):
    authorizer, _, _ = make_authorizer(write_config(tmp_path, idp))
    header = base64.urlsafe_b64encode(b'{"alg":"ES256"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).rstrip(b"=").decode()
    token = f"{header}.{payload}.c2lnbmF0dXJl"

    decision = authorizer.check(check_request(path="/public/items", token=token))

    assert decision.status == 401
    assert decision.reason == "invalid_token"


# A plain YAML date that does not exist: PyYAML raises ValueError, not yaml.YAMLError, when it
# builds the datetime.
INVALID_DATE_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: public
  namespace: shop
  labels:
    reviewed: 2024-02-30
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/public/*"]
"""


def test_invalid_date_reload_rejected(tmp_path, idp):
    config_path = write_config(tmp_path, idp)
    config = load_config(config_path)
    # Not started, so the reload-watch thread does not race this test to the same reload.
    service = Service(config, RecordingLog(config))
    try:
        (tmp_path / "policies" / "policies.yaml").write_text(INVALID_DATE_POLICY, encoding="utf-8")

        reloaded = service.reload()

        assert reloaded is False
        failures = service.metrics.registry.get_sample_value("extauthz_policy_reloads_total",
                                                              {"result": "failure"})
        assert failures == 1
    finally:
        service.stop(grace=1)
