"""Redaction: no credential, token or JWT reaches a decision record or an operational log line."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import subprocess
import sys
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from helpers import TestIdP, b64url, check_request, make_authorizer, write_config
from processes import LOOPBACK, ServeProcess

from extauthz.config import load_config
from extauthz.errors import ConfigError
from extauthz.logs import JsonFormatter
from extauthz.redaction import (
    CREDENTIAL_HEADERS,
    contains_jwt,
    hash_value,
    path_without_jwt,
    recorded_claims,
    recorded_headers,
)

# Written independently of extauthz.redaction: a compact JWS or JWE whose header starts with {".
JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.")
TOKEN_HEADER = "txn-token"
HASHED_HEADERS = ["x-tenant-id", "x-session-ref"]
CLEAR_HEADERS = ["user-agent", "x-forwarded-access-token", "x-trace"]
RECORD_OPTIONS = {"claims": ["email", "id_token_hint"], "headers": HASHED_HEADERS, "clear_headers": CLEAR_HEADERS}


def unsecured_jwt(claims: dict) -> str:
    header = b64url(json.dumps({"alg": "none"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


# contains_jwt and the record helpers.


@pytest.mark.parametrize(
    "text",
    [
        "{jws}",
        "Bearer {jws}",
        "id=1;token={jws};path=/",
        "version.1.{jws}",
        "x{jws}",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
        "eyJhbGciOiJFUzI1NiJ9..c2lnbmF0dXJl",
        b64url(b'{ "alg": "ES256" }') + ".e30.c2ln",
        b64url(b'{\n  "alg": "ES256"\n}') + ".e30.c2ln",
        "{jws}.ZW5jcnlwdGVk.dGFn",
        ".".join(["eyAA"] * 20),
    ],
)
def test_jwt_found(idp, text):
    assert contains_jwt(text.format(jws=idp.token()))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "curl/8.5.0",
        "1.2.3",
        "www.example.com",
        "eyes.are.blue",
        "ey.ey.ey",
        "YWJj.ZGVm.Z2hp",
        b64url(b"[1,2]") + ".e30.c2ln",
        b64url(b'"alg"') + ".e30.c2ln",
        "eyJhbGciOiJFUzI1NiJ9",
        "eyJhbGciOiJFUzI1NiJ9.e30",
    ],
)
def test_jwt_not_found(text):
    assert not contains_jwt(text)


@pytest.mark.parametrize(
    ("path", "recorded"),
    [
        ("/public/items", "/public/items"),
        ("/static/app.v1.2.min.js", "/static/app.v1.2.min.js"),
        ("/verify/{jws}", "/verify/[jwt]"),
        ("/a/{jws}/b/x{jws}/", "/a/[jwt]/b/[jwt]/"),
    ],
)
def test_path_jwt_segments_marked(idp, path, recorded):
    token = idp.token()
    assert path_without_jwt(path.format(jws=token)) == recorded


def test_credential_headers_never_recorded():
    headers = {name: f"value-of-{name}" for name in CREDENTIAL_HEADERS}
    assert recorded_headers(headers, hashed=sorted(CREDENTIAL_HEADERS), clear=sorted(CREDENTIAL_HEADERS)) == {}


def test_hash_format():
    assert hash_value("tenant-4711") == "sha256:" + hashlib.sha256(b"tenant-4711").hexdigest()
    assert hash_value("é") == "sha256:" + hashlib.sha256("é".encode()).hexdigest()


def test_fixed_claims_never_in_user_claims():
    claims = {"sub": "alice", "iss": "https://idp.test", "email": "alice@example.com"}
    assert recorded_claims(claims, ["sub", "iss", "email", "missing"]) == {"email": "alice@example.com"}


def test_claim_name_with_jwt_left_out(idp):
    token = idp.token()
    claims = {"tenant": {token: "x"}, "nested": [{"deep": [f"t={token}"]}], "email": "alice@example.com"}
    assert recorded_claims(claims, ["tenant", "nested", "email"]) == {"email": "alice@example.com"}


# Credential headers in the configuration.


@pytest.mark.parametrize("key", ["headers", "clear_headers"])
@pytest.mark.parametrize("header", sorted(CREDENTIAL_HEADERS))
def test_credential_header_config_error(tmp_path, idp, key, header):
    path = write_config(tmp_path, idp, overrides={"decision_log": {"sink": "stdout", key: ["x-tenant-id",
                                                                                         header.upper()]}})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.key == f"decision_log.{key}"
    assert f"{header} carries credentials" in raised.value.message
    assert raised.value.fix == f"remove {header!r} from decision_log.{key}"


def test_credential_header_stops_serve(tmp_path, idp):
    path = write_config(tmp_path, idp, overrides={"decision_log": {"sink": "stdout", "clear_headers": ["Cookie"]}})
    result = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(path)],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "decision_log.clear_headers: cookie carries credentials and is never recorded" in stderr
    assert "remove 'cookie' from decision_log.clear_headers" in stderr


# Requests full of credentials, through a real serve and in-process.


class Credentials:
    """Distinctive credential values and the requests that carry them."""

    def __init__(self, idp: TestIdP):
        now = int(time.time())
        stranger = TestIdP()
        self.fresh_token = idp.token(auth_time=now - 30, email="alice@example.com",
                                     id_token_hint=stranger.token(sub="hint"))
        self.old_token = idp.token(auth_time=now - 3600)
        self.foreign_token = stranger.token()
        self.unsecured_token = unsecured_jwt({"iss": idp.issuer, "sub": "mallory"})
        self.extension_token = stranger.token(sub="extension")
        self.link_token = stranger.token(sub="magic-link")
        # {"alg":"none"} and {"sub":"r"}: short enough for a request id (128 characters).
        self.request_id_token = unsecured_jwt({"sub": "r"})
        self.random = {name: f"{name}-{secrets.token_urlsafe(24)}" for name in
                       ("bearer", "basic", "cookie", "api-key", "amz", "proxy", "query")}
        self.headers = {
            "cookie": f"session={self.random['cookie']}; theme=dark",
            "x-api-key": self.random["api-key"],
            "x-amz-security-token": self.random["amz"],
            "proxy-authorization": "Basic " + base64.b64encode(self.random["proxy"].encode()).decode(),
            # Allowlisted headers: these two are recorded, the three that carry a JWT are not.
            "x-tenant-id": "tenant-4711",
            "user-agent": "curl/8.5.0",
            "x-forwarded-access-token": self.foreign_token,
            "x-trace": f"id=1;token={self.unsecured_token}",
            "x-session-ref": self.extension_token,
        }

    def requests(self) -> list[external_auth_pb2.CheckRequest]:
        extensions = {"route": "admin", "upstream_token": self.extension_token}
        return [
            check_request(path="/admin", token=self.fresh_token, headers=self.headers, context_extensions=extensions),
            check_request(path="/admin", token=self.old_token, headers=self.headers),
            check_request(path="/admin", token=self.foreign_token, headers=self.headers),
            check_request(path="/admin", token=self.unsecured_token),
            check_request(path="/admin", token=self.random["bearer"], headers=self.headers),
            check_request(path="/admin", headers={"authorization": f"Basic {self.random['basic']}", **self.headers}),
            check_request(path="/admin", headers={"x-api-key": self.fresh_token}),
            check_request(path=f"/public/items?access_token={self.fresh_token}&key={self.random['query']}",
                          token=self.fresh_token, headers=self.headers),
            check_request(path="/a/%2F", token=self.fresh_token, headers=self.headers),
            check_request(path=f"/public/verify/{self.link_token}", request_id=self.request_id_token),
        ]

    def values(self) -> list[str]:
        """Every value that must not appear: tokens, random credentials and header values as sent."""
        values = [self.fresh_token, self.old_token, self.foreign_token, self.unsecured_token, self.extension_token,
                  self.link_token, self.request_id_token, *self.random.values()]
        values += [value for name, value in self.headers.items() if name not in ("x-tenant-id", "user-agent")]
        return values


EXPECTED_REASONS = ["allowed", "insufficient_user_authentication", "invalid_token", "invalid_token",
                    "invalid_token", "invalid_authorization_header", "missing_token", "allowed", "invalid_path",
                    "allowed"]


def assert_nothing_leaked(outputs: dict[str, str], values: list[str]) -> None:
    for name, text in outputs.items():
        for value in values:
            assert value not in text, f"a credential in the {name}"
            assert hashlib.sha256(value.encode()).hexdigest() not in text, f"a credential's hash in the {name}"
        assert JWT_SHAPED.search(text) is None, f"a JWT-shaped string in the {name}"


def assert_allowlist_recorded(records: list[dict]) -> None:
    """The allowlist works, so the checks above are not passing on empty records."""
    first = records[0]
    assert first["headers"] == {"x-tenant-id": hash_value("tenant-4711"), "user-agent": "curl/8.5.0"}
    assert first["user_claims"] == {"email": "alice@example.com"}
    assert first["context_extensions"] == {"route": "admin"}
    last = records[-1]
    assert last["path"] == "/public/verify/[jwt]"
    assert last["request_id"] == "[jwt]"


def test_serve_leaks_no_credential(tmp_path, idp):
    log_path = tmp_path / "decisions.jsonl"
    server = ServeProcess(tmp_path, idp, log_level="debug",
                          overrides={"decision_log": {"sink": f"file:{log_path}", **RECORD_OPTIONS}})
    credentials = Credentials(idp)
    minted: list[str] = []
    try:
        server.start()
        server.wait_ready()
        with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for request in credentials.requests():
                response = stub.Check(request, timeout=10)
                minted += [option.header.value for option in response.ok_response.headers
                           if option.header.key == TOKEN_HEADER]
    finally:
        exit_code = server.stop()

    assert exit_code == 0
    assert len(minted) == 3
    lines = [json.loads(line) for line in log_path.read_bytes().splitlines()]
    records = [line for line in lines if line["type"] == "decision"]
    assert [record["reason"] for record in records] == EXPECTED_REASONS
    assert_allowlist_recorded(records)
    stderr = server.stderr().decode()
    assert '"message":"ready"' in stderr
    outputs = {"decision log": log_path.read_text(), "stdout": server.decision_log().decode(), "stderr": stderr}
    assert_nothing_leaked(outputs, credentials.values() + minted)


def test_in_process_leaks_no_credential(tmp_path, idp, caplog):
    caplog.set_level(logging.DEBUG)
    config_path = write_config(tmp_path, idp, overrides={"decision_log": {"sink": "stdout", **RECORD_OPTIONS}})
    authorizer, decision_log, _ = make_authorizer(config_path)
    credentials = Credentials(idp)

    decisions = [authorizer.check(request) for request in credentials.requests()]

    minted = [decision.minted.token for decision in decisions if decision.minted is not None]
    assert len(minted) == 3
    assert [decision.reason for decision in decisions] == EXPECTED_REASONS
    assert_allowlist_recorded(decision_log.records())
    formatter = JsonFormatter()
    log_lines = "\n".join(formatter.format(record) for record in caplog.records)
    assert "signing key ready" in log_lines
    outputs = {"decision log": decision_log.raw().decode(), "operational log": log_lines}
    assert_nothing_leaked(outputs, credentials.values() + minted)
