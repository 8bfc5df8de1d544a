"""Requests through a real Envoy to extauthz and the echo upstream, checked as a caller sees them."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from helpers import TOKEN_ISSUER
from processes import http_get

pytestmark = pytest.mark.e2e

STEP_UP_CHALLENGE = (
    'Bearer error="insufficient_user_authentication", '
    'error_description="A more recent or stronger login is required.", '
    'max_age="300", acr_values="urn:test:hwk urn:test:mfa"'
)
TOKEN_TTL = 30  # token.ttl in helpers.write_config


def verify_minted(stack, token: str, audience: str) -> dict:
    """Verify a minted token against the JWKS that extauthz publishes and return its claims."""
    status, _, body = http_get(stack.server.http_port, "/.well-known/jwks.json")
    assert status == 200
    key = jwt.PyJWKSet.from_dict(json.loads(body))[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key=key, algorithms=["ES256"], audience=audience, issuer=TOKEN_ISSUER)


def test_fresh_login_allowed(stack, idp):
    reply = stack.send("/admin", idp.token())
    assert reply.status == 200
    assert reply.json()["path"] == "/admin"


def test_minted_token_verifies(stack, idp):
    reply = stack.send("/admin", idp.token(sub="alice"))
    assert reply.status == 200
    token = reply.json()["headers"]["txn-token"]

    claims = verify_minted(stack, token, "admin-api")
    assert jwt.get_unverified_header(token)["typ"] == "txntoken+jwt"
    assert claims["aud"] == "admin-api"
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] <= TOKEN_TTL
    assert claims["exp"] > time.time()
    assert claims["tctx"] == {"method": "GET", "host": "shop.example.test", "path": "/admin"}


def test_authorization_not_forwarded(stack, idp):
    reply = stack.send("/admin", idp.token())
    assert reply.status == 200
    assert "authorization" not in reply.json()["headers"]


def test_caller_txn_token_replaced(stack, idp):
    reply = stack.send("/admin", idp.token(), headers={"txn-token": "caller-forged-value"})
    assert reply.status == 200
    received = reply.json()["headers"]["txn-token"]
    assert "caller-forged-value" not in received
    assert "," not in received
    assert verify_minted(stack, received, "admin-api")["tctx"]["path"] == "/admin"


def test_stale_login_challenged(stack, idp):
    reply = stack.send("/admin", idp.token(auth_time=int(time.time()) - 3600))
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == STEP_UP_CHALLENGE
    assert reply.json()["error"] == "insufficient_user_authentication"


def test_missing_token_challenged(stack):
    reply = stack.send("/admin")
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == "Bearer"


def test_public_route_open(stack):
    reply = stack.send("/public/x")
    assert reply.status == 200
    assert reply.json()["path"] == "/public/x"


def test_query_reaches_upstream(stack):
    reply = stack.send("/public/x?page=2&sort=name")
    assert reply.status == 200
    assert reply.json()["path"] == "/public/x?page=2&sort=name"


@pytest.mark.parametrize("path", ["/public/a%3Fb", "/public//x/./y/../z"])
def test_upstream_path_authorized(stack, path):
    reply = stack.send(path)
    assert reply.status == 200
    stack.server.wait_for_record(request_id=reply.request_id)
    records = [record for record in stack.server.decision_records() if record["request_id"] == reply.request_id]
    assert [record["path"] for record in records] == [reply.json()["path"]]


def test_dot_segments_need_token(stack):
    reply = stack.send("/public/../admin")
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    stack.server.wait_for_record(request_id=reply.request_id)
    records = [record for record in stack.server.decision_records() if record["request_id"] == reply.request_id]
    assert [record["path"] for record in records] == ["/admin"]


def test_unmatched_route_forbidden(stack):
    reply = stack.send("/elsewhere")
    assert reply.status == 403
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["error"] == "no_matching_policy"
    assert body["error_description"] == "No policy allows this request."
    stack.server.wait_for_record(request_id=reply.request_id)
    records = [record for record in stack.server.decision_records() if record["request_id"] == reply.request_id]
    assert [record["decision_id"] for record in records] == [body["decision_id"]]


def test_bad_host_record_has_id(stack):
    reply = stack.send("/public/x", headers={"host": "bad!host"})
    assert reply.status == 400
    stack.server.wait_for_record(request_id=reply.request_id)
    records = [record for record in stack.server.decision_records() if record.get("request_id") == reply.request_id]
    assert [record["decision_id"] for record in records] == [reply.json()["decision_id"]]


def test_extauthz_down_denies(own_stack):
    assert own_stack.send("/public/x").status == 200
    assert own_stack.server.stop() == 0

    statuses = [own_stack.send("/public/x").status for _ in range(3)]
    assert statuses == [503, 503, 503]


def test_one_record_per_request(own_stack, idp):
    replies = [
        own_stack.send("/admin", idp.token()),
        own_stack.send("/admin", idp.token(auth_time=int(time.time()) - 3600)),
        own_stack.send("/admin"),
        own_stack.send("/public/x"),
        own_stack.send("/elsewhere"),
    ]
    assert [reply.status for reply in replies] == [200, 401, 401, 200, 403]

    own_stack.server.wait_for_record(request_id=replies[-1].request_id)
    request_ids = [record["request_id"] for record in own_stack.server.decision_records()]
    assert request_ids == [reply.request_id for reply in replies]


def test_logs_hold_no_tokens(own_stack, idp):
    fresh = idp.token()
    stale = idp.token(auth_time=int(time.time()) - 3600)
    allowed = own_stack.send("/admin", fresh, headers={"txn-token": "caller-forged-value"})
    denied = own_stack.send("/admin", stale)
    assert allowed.status == 200
    assert denied.status == 401
    minted = allowed.json()["headers"]["txn-token"]
    _, _, jwks = http_get(own_stack.server.http_port, "/.well-known/jwks.json")
    kids = [key["kid"] for key in json.loads(jwks)["keys"]]

    # Stop extauthz first, so that everything it will ever write is in the files.
    assert own_stack.server.stop() == 0
    for name, output in (("decision log", own_stack.server.decision_log()), ("stderr", own_stack.server.stderr())):
        text = output.decode()
        assert fresh not in text, f"caller's fresh token in the {name}"
        assert stale not in text, f"caller's stale token in the {name}"
        assert minted not in text, f"minted token in the {name}"
        # A kid is a random base64url thumbprint that may contain "eyJ" by chance, so kids are left out.
        for kid in kids:
            text = text.replace(kid, "")
        assert "eyJ" not in text, f"JWT-like text in the {name}"
