"""ResponseEncoder: the wire bytes parse to the CheckResponse that the protobuf classes build."""

from __future__ import annotations

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2
from helpers import check_request

from extauthz.decision import Decision
from extauthz.errors import REASONS, DenyError
from extauthz.mint import MintedToken
from extauthz.reauth import StepUpRequired
from extauthz.response import ResponseEncoder, build_check_response, www_authenticate

TOKEN_HEADER = "txn-token"
DECISION_ID = "0b6f3c1e-8d2a-4f5b-9c7e-1a2b3c4d5e6f"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def expected_response(decision: Decision, token_header: str) -> external_auth_pb2.CheckResponse:
    """Build the CheckResponse with the protobuf classes, field by field, as Envoy must receive it."""
    def header(key: str, value: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=OVERWRITE)

    metadata = struct_pb2.Struct()
    metadata.update({"decision_id": decision.decision_id, "reason": decision.reason,
                     "policies": ",".join(decision.policies)})
    if decision.allowed:
        assert decision.minted is not None
        headers = [header(token_header, decision.minted.token)]
        headers.extend(header(name, value) for name, value in decision.injected_headers)
        injected = {name for name, _ in decision.injected_headers}
        removed = [name for name in ("authorization",) if name not in injected]
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(headers=headers, headers_to_remove=removed),
            dynamic_metadata=metadata)

    headers = [header("content-type", "application/json"), header("cache-control", "no-store")]
    challenge = www_authenticate(decision)
    if challenge is not None:
        headers.append(header("www-authenticate", challenge))
    body = orjson.dumps({"error": decision.reason, "error_description": decision.description,
                         "decision_id": decision.decision_id}).decode()
    code = code_pb2.UNAUTHENTICATED if decision.status == 401 else code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.reason),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status), headers=headers, body=body),
        dynamic_metadata=metadata)


def allowed(token: str = "a.b.c", injected: list[tuple[str, str]] | None = None,
            policies: list[str] | None = None) -> Decision:
    decision = Decision(decision_id=DECISION_ID, started_at=0.0)
    decision.policies = ["shop/public"] if policies is None else policies
    decision.allow(MintedToken(token=token, jti=DECISION_ID, audience="api", expires_at=30, kid="kid-1"))
    decision.injected_headers = injected or []
    return decision


def denied(error: DenyError, policies: list[str] | None = None) -> Decision:
    decision = Decision(decision_id=DECISION_ID, started_at=0.0)
    decision.policies = policies or []
    decision.deny(error)
    return decision


def assert_encodes_as_expected(decision: Decision, token_header: str = TOKEN_HEADER) -> None:
    encoded = ResponseEncoder(token_header).encode(decision)
    parsed = external_auth_pb2.CheckResponse.FromString(encoded)
    expected = expected_response(decision, token_header)
    assert parsed == expected
    # Presence, not only values: a message field or oneof member that is set must stay set.
    assert parsed.HasField("status")
    assert parsed.HasField("ok_response") == decision.allowed
    assert parsed.HasField("denied_response") == (not decision.allowed)
    for name in ("decision_id", "reason", "policies"):
        assert parsed.dynamic_metadata.fields[name].WhichOneof("kind") == "string_value"


@pytest.mark.parametrize("token", ["a.b.c", "t" * 127, "t" * 128, "t" * 20_000])
def test_allowed_token_lengths(token):
    assert_encodes_as_expected(allowed(token))


@pytest.mark.parametrize("token_header", ["txn-token", "x-" + "h" * 200])
def test_allowed_token_header(token_header):
    assert_encodes_as_expected(allowed(), token_header)


@pytest.mark.parametrize("injected", [
    [("x-api-key", "fake-key")],
    [("authorization", "Bearer fake-upstream")],
    [("x-api-key", "fake-key"), ("x-tenant", "caf\u00e9 \u2603")],
    [("x-empty", "")],
])
def test_allowed_injected_headers(injected):
    assert_encodes_as_expected(allowed(injected=injected))


def test_allowed_removes_authorization_unless_injected():
    plain = build_check_response(allowed(), TOKEN_HEADER)
    assert list(plain.ok_response.headers_to_remove) == ["authorization"]
    replaced = build_check_response(allowed(injected=[("authorization", "Basic ZmFrZQ==")]), TOKEN_HEADER)
    assert list(replaced.ok_response.headers_to_remove) == []


@pytest.mark.parametrize("policies", [[], ["shop/a"], ["istio-system/all", "shop/a", "shop/b"]])
def test_metadata_policies(policies):
    assert_encodes_as_expected(allowed(policies=policies))
    assert_encodes_as_expected(denied(DenyError("no_matching_policy"), policies=policies))


@pytest.mark.parametrize("code", sorted(code for code in REASONS if code != "allowed"))
def test_every_deny_reason(code):
    assert_encodes_as_expected(denied(DenyError(code, "detail")))


@pytest.mark.parametrize(("max_age", "acr_values"), [
    (300, ("urn:test:mfa",)),
    (None, ("urn:test:hwk", "urn:test:mfa")),
    (60, ()),
])
def test_step_up_challenge(max_age, acr_values):
    error = StepUpRequired("login older than max_age", max_age, acr_values)
    decision = denied(error, policies=["shop/admin"])
    assert_encodes_as_expected(decision)
    response = build_check_response(decision, TOKEN_HEADER)
    challenge = {option.header.key: option.header.value for option in response.denied_response.headers}
    assert challenge["www-authenticate"].startswith('Bearer error="insufficient_user_authentication"')


@pytest.mark.parametrize("description", ['with "quotes" and \\ backslash', "caf\u00e9", "d" * 20_000])
def test_deny_description_escaped(description):
    assert_encodes_as_expected(denied(DenyError("invalid_token", description=description)))


def test_pipeline_decisions(authorizer, idp):
    authorizer, _ = authorizer
    requests = [
        check_request(path="/public/items"),
        check_request(path="/public/items", token=idp.token()),
        check_request(path="/admin", token=idp.token()),
        check_request(path="/admin", token=idp.token(auth_time=1)),
        check_request(path="/admin"),
        check_request(path="/nowhere"),
        check_request(path="/public/%2F"),
        check_request(path="/public/items", token="not-a-token"),
    ]
    reasons = set()
    for request in requests:
        decision = authorizer.check(request)
        reasons.add(decision.reason)
        assert_encodes_as_expected(decision)
    assert reasons == {"allowed", "insufficient_user_authentication", "missing_token", "no_matching_policy",
                       "invalid_path", "invalid_token"}
