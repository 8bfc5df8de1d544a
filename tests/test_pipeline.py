from __future__ import annotations

import uuid

import pytest
from helpers import check_request

from extauthz.pipeline import new_decision_id


def test_pipeline_allows_public_route(authorizer):
    authorizer, decision_log = authorizer
    decision = authorizer.check(check_request(path="/public/items"))
    assert decision.allowed
    assert decision.reason == "allowed"
    assert decision.policies == ["shop/public"]
    assert decision_log.records()[0]["decision"] == "allow"


@pytest.mark.parametrize(
    ("path", "token_kind", "status", "reason"),
    [
        ("/admin", "fresh", 200, "allowed"),
        ("/admin", "stale", 401, "insufficient_user_authentication"),
        ("/admin", None, 401, "missing_token"),
        ("/public/../admin", None, 401, "missing_token"),
        ("//admin", None, 401, "missing_token"),
        ("/admin%2Fx", None, 400, "invalid_path"),
        ("/api?x=/../admin", None, 403, "no_matching_policy"),
        ("/elsewhere", None, 403, "no_matching_policy"),
    ],
)
def test_pipeline_decision_table(authorizer, idp, path, token_kind, status, reason):
    authorizer, _ = authorizer
    tokens = {"fresh": idp.token(), "stale": idp.token(auth_time=1_600_000_000), None: None}
    decision = authorizer.check(check_request(path=path, token=tokens[token_kind]))
    assert decision.status == status
    assert decision.reason == reason


def test_malformed_request_record_keeps_ids(authorizer):
    authorizer, decision_log = authorizer
    decision = authorizer.check(check_request(host="bad!host", request_id="req-bad-host"))
    record = decision_log.records()[0]
    assert decision.reason == "invalid_host"
    assert record["request_id"] == "req-bad-host"
    assert record["source_principal"] == "spiffe://cluster.local/ns/web/sa/frontend"
    assert "host" not in record


def test_pipeline_bug_becomes_internal_error(authorizer, monkeypatch):
    authorizer, decision_log = authorizer

    def broken_match(request, user):
        raise KeyError("simulated bug")

    monkeypatch.setattr(authorizer.policies, "match", broken_match)
    decision = authorizer.check(check_request())
    assert not decision.allowed
    assert decision.reason == "internal_error"
    assert decision.status == 500
    assert decision_log.records()[0]["decision"] == "deny"


def test_decision_id_is_uuid4():
    identifiers = {new_decision_id() for _ in range(200)}
    assert len(identifiers) == 200
    for identifier in identifiers:
        parsed = uuid.UUID(identifier)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == identifier


def test_deny_keeps_no_traceback(authorizer, idp):
    # A traceback would tie the error to the Check's frames and the decision in a reference cycle.
    authorizer, _ = authorizer
    decision = authorizer.check(check_request(path="/admin", token=idp.token(auth_time=1_600_000_000)))
    assert decision.reason == "insufficient_user_authentication"
    assert decision.error is not None
    assert decision.error.__traceback__ is None
