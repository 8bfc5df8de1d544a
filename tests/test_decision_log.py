"""Decision records: their fields on allow and deny, redaction of credentials, and the file sink."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime

import jwt
import pytest
from helpers import ISSUER, MFA, check_request, make_authorizer, write_config

from extauthz.config import load_config
from extauthz.decision_log import DecisionLog, build_record
from extauthz.server import build_authorizer

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SOURCE = "spiffe://cluster.local/ns/web/sa/frontend"
DESTINATION = "spiffe://cluster.local/ns/shop/sa/backend"
TOKEN_TTL = 30  # token.ttl in helpers.write_config
ENVELOPE = ("type", "writer", "seq", "prev_hash", "hash")


def test_allow_record_fields(authorizer, idp):
    authorizer, _ = authorizer
    auth_time = int(time.time()) - 30
    decision = authorizer.check(check_request(path="/admin?page=2", token=idp.token(auth_time=auth_time),
                                              request_id="req-allow"))
    assert decision.allowed
    record = build_record(decision)

    assert RFC3339_UTC.match(record["time"])
    assert datetime.fromisoformat(record["time"]).timestamp() == pytest.approx(decision.started_at, abs=0.001)
    assert str(uuid.UUID(record["decision_id"])) == record["decision_id"]
    assert record["decision"] == "allow"
    assert record["status"] == 200
    assert record["reason"] == "allowed"
    assert "detail" not in record
    assert record["request_id"] == "req-allow"
    assert record["source_principal"] == SOURCE
    assert record["source_address"] == "10.0.0.7"
    assert record["destination_principal"] == DESTINATION
    assert record["host"] == "shop.example.com"
    assert record["method"] == "GET"
    assert record["path"] == "/admin"
    assert record["policies"] == ["shop/admin-step-up"]
    assert record["user_sub"] == "alice"
    assert record["user_iss"] == ISSUER
    assert record["user_acr"] == MFA
    assert record["auth_age_s"] == pytest.approx(decision.started_at - auth_time, abs=0.001)
    assert record["token_jti"] == record["decision_id"]
    assert record["token_aud"] == "admin-api"
    assert 0 < record["token_exp"] - decision.started_at <= TOKEN_TTL
    assert record["token_kid"] == jwt.get_unverified_header(decision.minted.token)["kid"]
    assert record["duration_ms"] >= 0


def test_deny_record_fields(authorizer, idp):
    authorizer, _ = authorizer
    auth_time = int(time.time()) - 3600
    decision = authorizer.check(check_request(path="/admin", token=idp.token(auth_time=auth_time),
                                              request_id="req-deny"))
    assert not decision.allowed
    record = build_record(decision)

    assert RFC3339_UTC.match(record["time"])
    assert record["decision"] == "deny"
    assert record["status"] == 401
    assert record["reason"] == "insufficient_user_authentication"
    assert record["detail"] == "login older than max_age"
    assert record["request_id"] == "req-deny"
    assert record["path"] == "/admin"
    assert record["policies"] == ["shop/admin-step-up"]
    assert record["user_sub"] == "alice"
    assert record["auth_age_s"] == pytest.approx(decision.started_at - auth_time, abs=0.001)
    assert [name for name in record if name.startswith("token_")] == []
    assert record["duration_ms"] >= 0


def test_deny_without_user(authorizer):
    authorizer, _ = authorizer
    record = build_record(authorizer.check(check_request(path="/admin", request_id="req-anonymous")))
    assert record["reason"] == "missing_token"
    assert record["request_id"] == "req-anonymous"
    assert [name for name in record if name.startswith(("user_", "auth_", "token_"))] == []


def test_log_line_matches_record(authorizer, idp):
    authorizer, decision_log = authorizer
    decision = authorizer.check(check_request(path="/admin", token=idp.token()))
    records = decision_log.records()
    assert len(records) == 1
    assert {name: value for name, value in records[0].items() if name not in ENVELOPE} == build_record(decision)


@pytest.mark.parametrize(("auth_age", "allowed"), [(30, True), (3600, False)])
def test_credentials_redacted(config_path, idp, auth_age, allowed):
    authorizer, decision_log, _ = make_authorizer(config_path)
    token = idp.token(auth_time=int(time.time()) - auth_age)
    secrets = {
        "cookie": "session=cookie-secret-4711",
        "x-api-key": "api-key-secret-4712",
        "proxy-authorization": "Basic cHJveHktdXNlcjpwcm94eS1zZWNyZXQ=",
    }
    decision = authorizer.check(check_request(path="/admin", token=token, headers=secrets))
    assert decision.allowed is allowed
    raw = decision_log.raw().decode()

    assert token not in raw
    for name, value in secrets.items():
        assert value not in raw, f"{name} value in the decision log"
    if decision.minted is not None:
        assert decision.minted.token not in raw
        # A kid is a random base64url thumbprint that may contain "eyJ" by chance.
        raw = raw.replace(decision.minted.kid, "")
    assert "eyJ" not in raw


def test_file_sink_appends(tmp_path, idp):
    log_path = tmp_path / "decisions.log"
    log_path.write_bytes(b'{"earlier":"line"}\n')
    config = load_config(write_config(tmp_path, idp, overrides={"decision_log": {"sink": f"file:{log_path}"}}))
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    try:
        decisions = [authorizer.check(check_request(path=path, request_id=f"req-{index}"))
                     for index, path in enumerate(["/public/a", "/admin", "/elsewhere"])]
    finally:
        decision_log.close()

    lines = log_path.read_bytes().splitlines()
    assert lines[0] == b'{"earlier":"line"}'
    records = [record for record in map(json.loads, lines[1:]) if record["type"] == "decision"]
    assert [record["decision_id"] for record in records] == [decision.decision_id for decision in decisions]
    assert [record["request_id"] for record in records] == ["req-0", "req-1", "req-2"]


def test_file_sink_relative_path(tmp_path, idp):
    config = load_config(write_config(tmp_path, idp, overrides={"decision_log": {"sink": "file:decisions.log"}}))
    assert config.decision_log.path == tmp_path.resolve() / "decisions.log"

    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    try:
        authorizer.check(check_request(path="/public/a"))
    finally:
        decision_log.close()
    lines = [json.loads(line) for line in (tmp_path / "decisions.log").read_bytes().splitlines()]
    assert [line["type"] for line in lines] == ["checkpoint", "decision", "checkpoint"]
