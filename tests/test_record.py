"""build_record's newer fields, and the decision_log keys that choose the recorded claims and headers."""

from __future__ import annotations

import hashlib
import time

import pytest
import yaml
from helpers import AUDIENCE, check_request, make_authorizer, write_config

from extauthz.config import DecisionLogConfig, load_config
from extauthz.errors import ConfigError
from extauthz.record import build_record, rfc3339

# {"alg":"none"} and {}: short enough for a request id (128 characters) and a method (32).
UNSECURED_JWT = "eyJhbGciOiJub25lIn0.e30."
RECORD_OPTIONS = {"sink": "stdout", "claims": ["email", "groups", "tenant"],
                  "headers": ["x-tenant-id"], "clear_headers": ["user-agent", "x-client-version"]}


@pytest.fixture
def recording(tmp_path, idp):
    """An Authorizer whose configuration records claims and headers, and its RecordingLog."""
    authorizer, decision_log, config = make_authorizer(
        write_config(tmp_path, idp, overrides={"decision_log": RECORD_OPTIONS}))
    return authorizer, decision_log, config


def test_user_fields_recorded(recording, idp):
    authorizer, decision_log, _ = recording
    auth_time = int(time.time()) - 30
    token = idp.token(auth_time=auth_time, aud=[AUDIENCE, "other-api"], amr=["pwd", "otp"],
                      email="alice@example.com", groups=["admins", "ops"], tenant={"id": 7, "name": "acme"},
                      phone_number="+15550100")
    decision = authorizer.check(check_request(path="/admin", token=token))
    assert decision.allowed
    record = decision_log.records()[-1]

    assert record["user_aud"] == [AUDIENCE, "other-api"]
    assert record["user_amr"] == ["pwd", "otp"]
    assert record["user_auth_time"] == auth_time
    assert record["user_claims"] == {"email": "alice@example.com", "groups": ["admins", "ops"],
                                     "tenant": {"id": 7, "name": "acme"}}


def test_single_audience_becomes_list(recording, idp):
    authorizer, decision_log, _ = recording
    authorizer.check(check_request(path="/admin", token=idp.token(aud=AUDIENCE)))
    assert decision_log.records()[-1]["user_aud"] == [AUDIENCE]


def test_absent_user_fields_left_out(recording, idp):
    authorizer, decision_log, _ = recording
    authorizer.check(check_request(path="/public/a", token=idp.token(amr=..., auth_time=..., acr=...)))
    record = decision_log.records()[-1]
    assert record["reason"] == "allowed"
    for name in ("user_amr", "user_auth_time", "auth_age_s", "user_acr", "user_claims"):
        assert name not in record, name


def test_fractional_auth_time_truncated(recording, idp):
    authorizer, decision_log, _ = recording
    auth_time = int(time.time()) - 30
    authorizer.check(check_request(path="/admin", token=idp.token(auth_time=auth_time + 0.75)))
    assert decision_log.records()[-1]["user_auth_time"] == auth_time


def test_claim_with_jwt_left_out(recording, idp):
    authorizer, decision_log, _ = recording
    nested = idp.token()
    token = idp.token(email="alice@example.com", groups=["admins", f"hint={nested}"])
    authorizer.check(check_request(path="/admin", token=token))
    record = decision_log.records()[-1]
    assert record["user_claims"] == {"email": "alice@example.com"}
    assert nested not in decision_log.raw().decode()


def test_headers_hashed_and_clear(recording, idp):
    authorizer, decision_log, _ = recording
    headers = {"x-tenant-id": "tenant-4711", "user-agent": "curl/8.5.0", "x-other": "not-listed"}
    authorizer.check(check_request(path="/public/a", headers=headers))
    record = decision_log.records()[-1]
    assert record["headers"] == {
        "x-tenant-id": "sha256:" + hashlib.sha256(b"tenant-4711").hexdigest(),
        "user-agent": "curl/8.5.0",
    }
    assert "tenant-4711" not in decision_log.raw().decode()


def test_headers_absent_when_none_present(recording):
    authorizer, decision_log, _ = recording
    authorizer.check(check_request(path="/public/a"))
    assert "headers" not in decision_log.records()[-1]


def test_header_with_jwt_left_out(recording, idp):
    authorizer, decision_log, _ = recording
    token = idp.token()
    authorizer.check(check_request(path="/public/a", headers={"user-agent": f"agent token={token}",
                                                              "x-tenant-id": token,
                                                              "x-client-version": "2.1.0"}))
    record = decision_log.records()[-1]
    assert record["headers"] == {"x-client-version": "2.1.0"}
    assert token not in decision_log.raw().decode()


def test_jwt_in_path_and_ids_marked(recording, idp):
    authorizer, decision_log, _ = recording
    token = idp.token()
    authorizer.check(check_request(path=f"/public/verify/{token}/done", request_id=UNSECURED_JWT))
    record = decision_log.records()[-1]
    assert record["reason"] == "allowed"
    assert record["path"] == "/public/verify/[jwt]/done"
    assert record["request_id"] == "[jwt]"
    assert token not in decision_log.raw().decode()


def test_jwt_method_marked(recording):
    authorizer, decision_log, _ = recording
    authorizer.check(check_request(method=UNSECURED_JWT, path="/public/a"))
    record = decision_log.records()[-1]
    assert record["reason"] == "no_matching_policy"
    assert record["method"] == "[jwt]"


def test_context_extensions_and_port(recording):
    authorizer, decision_log, _ = recording
    authorizer.check(check_request(path="/public/a", destination_port=8443,
                                   context_extensions={"namespace": "shop", "route": "items"}))
    record = decision_log.records()[-1]
    assert record["context_extensions"] == {"namespace": "shop", "route": "items"}
    assert record["destination_port"] == 8443


def test_malformed_request_peer_facts_only(recording):
    authorizer, decision_log, _ = recording
    authorizer.check(check_request(path="/a/%2F", headers={"user-agent": "curl/8.5.0"},
                                   context_extensions={"route": "items"}))
    record = decision_log.records()[-1]
    assert record["reason"] == "invalid_path"
    assert record["context_extensions"] == {"route": "items"}
    assert record["destination_port"] == 8080
    assert "headers" not in record
    assert "path" not in record


def test_no_config_no_claims_or_headers(recording, idp):
    authorizer, _, _ = recording
    decision = authorizer.check(check_request(path="/admin", token=idp.token(email="alice@example.com"),
                                              headers={"user-agent": "curl/8.5.0"}))
    record = build_record(decision)
    assert "user_claims" not in record
    assert "headers" not in record
    assert record["user_sub"] == "alice"


def test_rfc3339_milliseconds():
    assert rfc3339(1796415081.4729) == "2026-12-04T20:11:21.472Z"
    assert rfc3339(1796415081) == "2026-12-04T20:11:21.000Z"


# Configuration of the recorded claims and headers.


def load_decision_log(tmp_path, idp, decision_log: dict) -> DecisionLogConfig:
    return load_config(write_config(tmp_path, idp, overrides={"decision_log": decision_log})).decision_log


def decision_log_error(tmp_path, idp, decision_log: dict) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_decision_log(tmp_path, idp, decision_log)
    return raised.value


def test_defaults_record_nothing_extra(tmp_path, idp):
    config = load_decision_log(tmp_path, idp, {"sink": "stdout"})
    assert config.claims == ()
    assert config.headers == ()
    assert config.clear_headers == ()


def test_header_names_lower_cased(tmp_path, idp):
    config = load_decision_log(tmp_path, idp, {"headers": ["X-Tenant-ID"], "clear_headers": ["User-Agent"]})
    assert config.headers == ("x-tenant-id",)
    assert config.clear_headers == ("user-agent",)


def test_claim_names_keep_case(tmp_path, idp):
    config = load_decision_log(tmp_path, idp, {"claims": ["preferred_username", "tenantId"]})
    assert config.claims == ("preferred_username", "tenantId")


def test_file_sink_keeps_options(tmp_path, idp):
    config = load_decision_log(tmp_path, idp, {**RECORD_OPTIONS, "sink": "file:decisions.log"})
    assert config.sink == "file"
    assert config.claims == ("email", "groups", "tenant")
    assert config.headers == ("x-tenant-id",)


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "acr", "amr", "auth_time"])
def test_fixed_claim_rejected(tmp_path, idp, claim):
    error = decision_log_error(tmp_path, idp, {"claims": ["email", claim]})
    assert error.key == "decision_log.claims"
    assert repr(claim) in error.message
    assert "always recorded" in error.message
    assert f"remove {claim!r}" in error.fix


@pytest.mark.parametrize(
    ("decision_log", "key", "message"),
    [
        ({"claims": ["email", "email"]}, "decision_log.claims", "listed twice"),
        ({"claims": [""]}, "decision_log.claims", "non-empty strings"),
        ({"claims": {"email": True}}, "decision_log.claims", "list of non-empty strings"),
        ({"headers": ["X-Tenant", "x-tenant"]}, "decision_log.headers", "listed twice"),
        ({"headers": ["x tenant"]}, "decision_log.headers", "invalid header name"),
        ({"clear_headers": [":path"]}, "decision_log.clear_headers", "pseudo-header"),
        ({"headers": ["x-tenant"], "clear_headers": ["X-Tenant"]}, "decision_log.clear_headers", "also listed"),
        ({"header": ["x-tenant"]}, "decision_log.header", "unknown key"),
    ],
)
def test_invalid_record_options(tmp_path, idp, decision_log, key, message):
    error = decision_log_error(tmp_path, idp, decision_log)
    assert error.key == key
    assert message in error.message


@pytest.mark.parametrize("key", ["headers", "clear_headers"])
def test_minted_token_header_rejected(tmp_path, idp, key):
    path = write_config(tmp_path, idp, overrides={"decision_log": {key: ["Txn-Token"]}})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.key == f"decision_log.{key}"
    assert "txn-token carries the minted token" in raised.value.message
    assert f"remove 'txn-token' from decision_log.{key}" in raised.value.fix


def test_single_string_accepted(tmp_path, idp):
    path = write_config(tmp_path, idp)
    data = yaml.safe_load(path.read_text())
    data["decision_log"] = {"sink": "stdout", "claims": "email", "clear_headers": "user-agent"}
    path.write_text(yaml.safe_dump(data))
    config = load_config(path).decision_log
    assert config.claims == ("email",)
    assert config.clear_headers == ("user-agent",)
