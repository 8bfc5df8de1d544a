"""The gRPC Check service, health and the HTTP side listener, through real sockets on loopback."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import MFA, TOKEN_ISSUER, RecordingLog, check_request, write_config

from extauthz.config import load_config
from extauthz.server import AUTHORIZATION_SERVICE, Service

HWK = "urn:test:hwk"
RPC_TIMEOUT = 10.0
# Health polling: at most 200 tries, 50 ms apart.
HEALTH_TRIES = 200
HEALTH_INTERVAL = 0.05


@pytest.fixture(scope="module")
def service(tmp_path_factory, idp) -> Iterator[Service]:
    """A started Service on 127.0.0.1 with ports chosen by the kernel, stopped after the module."""
    config = load_config(write_config(tmp_path_factory.mktemp("servicer"), idp))
    service = Service(config, decision_log=RecordingLog(config))
    service.start()
    yield service
    service.stop(grace=0)


@pytest.fixture(scope="module")
def channel(service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def check(channel):
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)

    def call(request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        return stub.Check(request, timeout=RPC_TIMEOUT)

    return call


def header_values(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def denied_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return header_values(response.denied_response.headers)


def http_get(service: Service, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", int(service.http_port), timeout=RPC_TIMEOUT)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        connection.close()


def health_status(channel: grpc.Channel, name: str) -> int:
    """Poll grpc.health.v1 Check until it reports SERVING or the tries run out; return the last status."""
    stub = health_pb2_grpc.HealthStub(channel)
    status = health_pb2.HealthCheckResponse.UNKNOWN
    for _ in range(HEALTH_TRIES):
        status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(HEALTH_INTERVAL)
    return status


# --- allow -----------------------------------------------------------------------------------------


def test_allowed_status(check):
    response = check(check_request(path="/public/items"))
    assert response.status.code == code_pb2.OK
    assert response.HasField("ok_response")
    assert not response.HasField("denied_response")


def test_allowed_sets_token_header(check):
    response = check(check_request(path="/public/items"))
    headers = list(response.ok_response.headers)
    assert [option.header.key for option in headers] == ["txn-token"]
    assert headers[0].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def test_allowed_removes_authorization(check, idp):
    response = check(check_request(path="/public/items", token=idp.token()))
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


def test_allowed_metadata(check):
    response = check(check_request(path="/public/items"))
    metadata = response.dynamic_metadata
    assert len(metadata["decision_id"]) == 36
    assert metadata["reason"] == "allowed"
    assert metadata["policies"] == "shop/public"


def test_minted_token_verifies_with_side_jwks(check, service, idp):
    response = check(check_request(path="/public/items", token=idp.token()))
    token = response.ok_response.headers[0].header.value
    status, _, body = http_get(service, "/.well-known/jwks.json")
    assert status == 200

    key = jwt.PyJWKSet.from_json(body.decode())[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience="shop.example.com",
                        issuer=TOKEN_ISSUER)
    assert claims["sub"] == "alice"
    assert claims["txn"] == response.dynamic_metadata["decision_id"]


def test_step_up_allowed_with_fresh_login(check, idp):
    response = check(check_request(path="/admin", token=idp.token()))
    assert response.status.code == code_pb2.OK
    assert response.dynamic_metadata["policies"] == "shop/admin-step-up"


# --- deny ------------------------------------------------------------------------------------------


def test_step_up_denied(check, idp):
    response = check(check_request(path="/admin", token=idp.token(auth_time=1_600_000_000)))
    assert response.status.code == code_pb2.UNAUTHENTICATED
    assert response.denied_response.status.code == 401
    assert not response.HasField("ok_response")


def test_step_up_challenge(check, idp):
    response = check(check_request(path="/admin", token=idp.token(auth_time=1_600_000_000)))
    challenge = denied_headers(response)["www-authenticate"]
    assert challenge == ('Bearer error="insufficient_user_authentication", '
                         'error_description="A more recent or stronger login is required.", '
                         f'max_age="300", acr_values="{HWK} {MFA}"')


def test_step_up_challenge_for_weak_acr(check, idp):
    response = check(check_request(path="/admin", token=idp.token(acr="urn:test:pwd")))
    challenge = denied_headers(response)["www-authenticate"]
    assert challenge.endswith(f'max_age="300", acr_values="{HWK} {MFA}"')


def test_deny_body(check, idp):
    response = check(check_request(path="/admin", token=idp.token(auth_time=1_600_000_000)))
    body = json.loads(response.denied_response.body)
    assert body == {
        "error": "insufficient_user_authentication",
        "error_description": "A more recent or stronger login is required.",
        "decision_id": response.dynamic_metadata["decision_id"],
    }


def test_deny_headers(check, idp):
    response = check(check_request(path="/admin", token=idp.token(auth_time=1_600_000_000)))
    headers = denied_headers(response)
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"


def test_deny_headers_overwrite(check):
    response = check(check_request(path="/elsewhere"))
    actions = {option.append_action for option in response.denied_response.headers}
    assert actions == {base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD}


def test_deny_metadata(check, idp):
    response = check(check_request(path="/admin", token=idp.token(auth_time=1_600_000_000)))
    assert response.dynamic_metadata["reason"] == "insufficient_user_authentication"
    assert response.dynamic_metadata["policies"] == "shop/admin-step-up"


def test_missing_token_challenge(check):
    response = check(check_request(path="/admin"))
    assert response.denied_response.status.code == 401
    assert denied_headers(response)["www-authenticate"] == "Bearer"
    assert json.loads(response.denied_response.body)["error"] == "missing_token"


@pytest.mark.parametrize(
    ("token", "description"),
    [
        ("abc.def.ghi", "The bearer token is invalid."),
        ("not-a-jwt", "The bearer token is invalid."),
    ],
)
def test_invalid_token_challenge(check, token, description):
    response = check(check_request(path="/public/items", token=token))
    assert response.denied_response.status.code == 401
    assert denied_headers(response)["www-authenticate"] == (
        f'Bearer error="invalid_token", error_description="{description}"')


def test_expired_token_challenge(check, idp):
    now = int(time.time())
    response = check(check_request(path="/public/items", token=idp.token(iat=now - 4000, exp=now - 3600)))
    assert response.denied_response.status.code == 401
    assert denied_headers(response)["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="The bearer token has expired."')
    assert json.loads(response.denied_response.body)["error"] == "token_expired"


def test_bad_authorization_header(check):
    response = check(check_request(path="/public/items", headers={"authorization": "Basic dXNlcjpwYXNz"}))
    assert response.denied_response.status.code == 400
    assert denied_headers(response)["www-authenticate"].startswith('Bearer error="invalid_request"')


def test_no_matching_policy(check):
    response = check(check_request(path="/elsewhere"))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    assert "www-authenticate" not in denied_headers(response)
    assert json.loads(response.denied_response.body)["error"] == "no_matching_policy"


@pytest.mark.parametrize("path", ["/admin%2Fx", "/public/%zz", "no-slash"])
def test_malformed_path(check, path):
    response = check(check_request(path=path))
    assert response.denied_response.status.code == 400
    assert json.loads(response.denied_response.body)["error"] == "invalid_path"


def test_request_without_http(check):
    response = check(external_auth_pb2.CheckRequest())
    assert response.status.code != code_pb2.OK
    assert response.denied_response.status.code == 403
    assert json.loads(response.denied_response.body)["error"] == "non_http_request"


def test_every_check_logged(check, service):
    before = len(service.decision_log.records())
    response = check(check_request(path="/elsewhere"))
    records = service.decision_log.records()
    assert len(records) == before + 1
    assert records[-1]["decision_id"] == response.dynamic_metadata["decision_id"]


# --- health ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", AUTHORIZATION_SERVICE])
def test_health_serving(channel, name):
    assert health_status(channel, name) == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- HTTP side listener ----------------------------------------------------------------------------


def test_jwks_served(service):
    status, headers, body = http_get(service, "/.well-known/jwks.json")
    assert status == 200
    assert headers["content-type"] == "application/jwk-set+json"
    assert json.loads(body) == json.loads(service.key_ring.jwks())


def test_jwks_has_current_key(service):
    _, _, body = http_get(service, "/.well-known/jwks.json")
    kids = [key["kid"] for key in json.loads(body)["keys"]]
    assert service.key_ring.current().kid in kids


@pytest.mark.parametrize(("path", "status"), [("/healthz", 200), ("/readyz", 200), ("/nope", 404),
                                              ("/.well-known/jwks", 404)])
def test_side_paths(service, path, status):
    assert http_get(service, path)[0] == status


def test_side_rejects_post(service):
    status, headers, _ = http_get(service, "/healthz", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
