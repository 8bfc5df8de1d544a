"""Shared test helpers: a test IdP, configuration files, CheckRequest builders and free ports."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import yaml
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from extauthz.audit_chain import generate_signer
from extauthz.config import Config, load_config
from extauthz.decision_log import DecisionLog
from extauthz.keys import generate_private_key, public_jwk
from extauthz.pipeline import Authorizer
from extauthz.server import build_authorizer

ISSUER = "https://idp.test"
AUDIENCE = "mesh"
TOKEN_ISSUER = "https://extauthz.test"
MFA = "urn:test:mfa"
# Signs the checkpoints of every RecordingLog: one key for the session saves a key generation per test.
AUDIT_SIGNER = generate_signer()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TestIdP:
    """An ES256 identity provider whose key set the tests write to a JWKS file."""

    __test__ = False

    def __init__(self, issuer: str = ISSUER):
        self.issuer = issuer
        self.private_key = generate_private_key("ES256")
        self.jwk = public_jwk(self.private_key, "ES256")
        self.kid = self.jwk["kid"]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 600,
                  "auth_time": now - 30, "acr": MFA, "amr": ["pwd", "otp"], "jti": f"jti-{time.monotonic_ns()}"}
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not ...}

    def token(self, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        """Sign a token; pass a claim as `...` to leave it out."""
        return jwt.encode(self.claims(**overrides), self.private_key, algorithm="ES256",
                          headers={"kid": self.kid, **(headers or {})})

    def raw_token(self, header: dict[str, Any], payload: bytes | str) -> str:
        """Sign arbitrary payload bytes, for claims that pyjwt would refuse to encode."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        if isinstance(payload, str):
            payload = payload.encode()
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(payload)}"
        der = self.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: admin-step-up
  namespace: shop
  annotations:
    extauthz.io/reauth-max-age: 5m
    extauthz.io/acr-values: "urn:test:mfa urn:test:hwk"
    extauthz.io/token-audience: admin-api
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: public
  namespace: shop
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/public/*", "/api/*"]
        methods: ["GET", "POST"]
"""


def write_config(folder: Path, idp: TestIdP, *, policies: str = POLICIES,
                 overrides: dict[str, Any] | None = None) -> Path:
    """Write a configuration, the IdP's JWKS and the policies into `folder`; return the config path."""
    (folder / "idp-jwks.json").write_text(json.dumps(idp.jwks()), encoding="utf-8")
    policy_folder = folder / "policies"
    policy_folder.mkdir(exist_ok=True)
    (policy_folder / "policies.yaml").write_text(policies, encoding="utf-8")
    data: dict[str, Any] = {
        "listen": {"grpc": "127.0.0.1:0", "http": "127.0.0.1:0"},
        "issuers": [{"issuer": idp.issuer, "jwks_file": "idp-jwks.json", "audiences": [AUDIENCE],
                     "algorithms": ["ES256"], "max_token_lifetime": "1h"}],
        "policies": {"provider": "extauthz", "paths": ["policies/"]},
        "token": {"issuer": TOKEN_ISSUER, "header": "txn-token", "ttl": "30s",
                  "signing": {"algorithm": "ES256", "rotate_every": "6h"}},
        "decision_log": {"sink": "stdout"},
    }
    for key, value in (overrides or {}).items():
        data[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# RecordingLogs not yet closed; conftest closes them after each test, so no writer thread outlives it.
OPEN_LOGS: list[DecisionLog] = []


class RecordingLog(DecisionLog):
    """A DecisionLog writing to memory, with the records parsed back once the writer delivered them."""

    def __init__(self, config: Config):
        self.buffer = io.BytesIO()
        super().__init__(config.decision_log, stream=self.buffer, signer=AUDIT_SIGNER)
        OPEN_LOGS.append(self)

    def lines(self) -> list[dict[str, Any]]:
        """Return every line written so far: decisions and checkpoints."""
        assert self.flush(), "the decision log writer did not deliver the records within 10s"
        return [orjson.loads(line) for line in self.buffer.getvalue().splitlines()]

    def records(self) -> list[dict[str, Any]]:
        """Return the decision records written so far."""
        return [line for line in self.lines() if line["type"] == "decision"]

    def raw(self) -> bytes:
        assert self.flush(), "the decision log writer did not deliver the records within 10s"
        return self.buffer.getvalue()


def make_authorizer(config_path: Path) -> tuple[Authorizer, RecordingLog, Config]:
    config = load_config(config_path)
    decision_log = RecordingLog(config)
    authorizer, _ = build_authorizer(config, decision_log)
    return authorizer, decision_log, config


def check_request(*, method: str = "GET", host: str = "shop.example.com", path: str = "/public/items",
                  headers: dict[str, str] | None = None, token: str | None = None,
                  source_principal: str = "spiffe://cluster.local/ns/web/sa/frontend",
                  source_address: str = "10.0.0.7",
                  destination_principal: str = "spiffe://cluster.local/ns/shop/sa/backend",
                  destination_port: int = 8080, context_extensions: dict[str, str] | None = None,
                  scheme: str = "http", request_id: str = "req-1") -> external_auth_pb2.CheckRequest:
    """Build a CheckRequest as Envoy's HTTP ext_authz filter sends it."""
    all_headers = {":method": method, ":path": path, ":authority": host, "x-request-id": request_id}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.principal = source_principal
    attributes.source.address.socket_address.address = source_address
    attributes.source.address.socket_address.port_value = 41234
    attributes.destination.principal = destination_principal
    attributes.destination.address.socket_address.address = "10.0.0.9"
    attributes.destination.address.socket_address.port_value = destination_port
    http = attributes.request.http
    http.id = "12345"
    http.method = method
    http.host = host
    http.path = path
    http.scheme = scheme
    http.protocol = "HTTP/1.1"
    for name, value in all_headers.items():
        http.headers[name] = value
    for name, value in (context_extensions or {}).items():
        attributes.context_extensions[name] = value
    return external_auth_pb2.CheckRequest(attributes=attributes)
