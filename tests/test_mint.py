"""TokenMinter: the per-request transaction token, verified as a backend would verify it."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from extauthz.config import SigningConfig, TokenConfig
from extauthz.identity import EndUser
from extauthz.keys import KeyRing
from extauthz.mint import TokenMinter
from extauthz.policy import Requirements
from extauthz.request import HttpRequest

TOKEN_ISSUER = "https://extauthz.test"
FRONTEND = "spiffe://cluster.local/ns/web/sa/frontend"
TXN = "3f2a9c1e-0000-4000-8000-000000000001"
# The minter's fixed clock. verify() skips pyjwt's check of exp against the real clock, and tests
# compare exp with iat instead.
NOW = float(int(time.time()))


def make_minter(algorithm: str = "ES256", ttl: float = 30.0) -> TokenMinter:
    signing = SigningConfig(algorithm=algorithm, rotate_every=21_600.0, key_file=None)
    config = TokenConfig(issuer=TOKEN_ISSUER, header="txn-token", ttl=ttl, signing=signing)
    return TokenMinter(config, KeyRing(signing, ttl, clock=lambda: NOW), clock=lambda: NOW)


def make_request(**overrides: Any) -> HttpRequest:
    fields: dict[str, Any] = {
        "method": "POST",
        "scheme": "http",
        "host": "orders.example.com",
        "authority_port": None,
        "path": "/orders/7",
        "query": "debug=1",
        "headers": {},
        "request_id": "req-1",
        "source_address": "10.0.0.7",
        "source_principal": FRONTEND,
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/orders",
        "destination_port": 8080,
    }
    fields.update(overrides)
    return HttpRequest(**fields)


def make_user(**overrides: Any) -> EndUser:
    fields: dict[str, Any] = {
        "issuer": "https://idp.test",
        "subject": "alice",
        "audiences": ("mesh",),
        "presenter": "web-app",
        "expires_at": NOW + 600,
        "not_before": None,
        "issued_at": NOW - 60,
        "auth_time": NOW - 45.7,
        "acr": "urn:test:mfa",
        "amr": ("pwd", "otp"),
        "session_id": None,
        "token_id": None,
        "kid": None,
        "claims": {},
    }
    fields.update(overrides)
    return EndUser(**fields)


def verify(minter: TokenMinter, token: str, audience: str) -> dict[str, Any]:
    """Verify a minted token against the key ring's published JWKS, as a backend does."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_json(minter.keys.jwks().decode())[kid]
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience=audience, issuer=TOKEN_ISSUER,
                      options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"], "verify_exp": False})


def mint_claims(minter: TokenMinter | None = None, request: HttpRequest | None = None,
                user: EndUser | None = None, requirements: Requirements | None = None,
                audience: str = "orders.example.com") -> dict[str, Any]:
    minter = minter or make_minter()
    minted = minter.mint(TXN, request or make_request(), user, requirements or Requirements())
    return verify(minter, minted.token, audience)


# --- header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_header(algorithm):
    minter = make_minter(algorithm)
    minted = minter.mint(TXN, make_request(), make_user(), Requirements())
    header = jwt.get_unverified_header(minted.token)
    assert header["typ"] == "txntoken+jwt"
    assert header["alg"] == algorithm
    assert header["kid"] == minter.keys.current().kid
    assert minted.kid == header["kid"]


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_verifies_with_jwks(algorithm):
    claims = mint_claims(make_minter(algorithm), user=make_user())
    assert claims["iss"] == TOKEN_ISSUER


def test_other_key_rejects_token():
    minted = make_minter().mint(TXN, make_request(), None, Requirements())
    with pytest.raises(KeyError):
        verify(make_minter(), minted.token, "orders.example.com")


# --- claims ---------------------------------------------------------------------------------------


def test_claims_with_user():
    requirements = Requirements(require_user=True, token_audience="orders-api",
                                token_scope=frozenset({"orders:write", "orders:read"}))
    claims = mint_claims(user=make_user(), requirements=requirements, audience="orders-api")

    assert claims["iss"] == TOKEN_ISSUER
    assert claims["aud"] == "orders-api"
    assert claims["sub"] == "alice"
    assert claims["txn"] == TXN
    assert claims["jti"] == TXN
    assert claims["scope"] == "orders:read orders:write"
    assert claims["req_wl"] == FRONTEND
    assert claims["tctx"] == {"method": "POST", "host": "orders.example.com", "path": "/orders/7"}
    assert claims["rctx"] == {"req_ip": "10.0.0.7", "acr": "urn:test:mfa", "amr": ["pwd", "otp"],
                              "auth_time": int(NOW - 45.7)}


def test_minted_token_fields():
    minter = make_minter()
    minted = minter.mint(TXN, make_request(), None, Requirements(token_audience="orders-api"))
    assert minted.jti == TXN
    assert minted.audience == "orders-api"
    assert minted.expires_at == int(NOW) + 30
    assert minted.kid == minter.keys.current().kid


def test_query_not_in_context():
    claims = mint_claims()
    assert "debug" not in str(claims["tctx"])


def test_audience_defaults_to_host():
    claims = mint_claims(request=make_request(host="orders.example.com", authority_port=8443))
    assert claims["aud"] == "orders.example.com"


def test_no_scope_without_annotation():
    assert "scope" not in mint_claims()


def test_empty_scope_kept():
    claims = mint_claims(requirements=Requirements(token_scope=frozenset()))
    assert claims["scope"] == ""


@pytest.mark.parametrize(
    ("source_principal", "has_user", "subject"),
    [
        (FRONTEND, True, "alice"),
        (FRONTEND, False, FRONTEND),
        ("", False, "anonymous"),
        ("", True, "alice"),
    ],
)
def test_subject(source_principal, has_user, subject):
    user = make_user() if has_user else None
    claims = mint_claims(request=make_request(source_principal=source_principal), user=user)
    assert claims["sub"] == subject


def test_no_workload_without_principal():
    assert "req_wl" not in mint_claims(request=make_request(source_principal=""))


def test_requester_context_without_user():
    assert mint_claims()["rctx"] == {"req_ip": "10.0.0.7"}


def test_requester_context_partial_user():
    claims = mint_claims(user=make_user(acr=None, amr=(), auth_time=None))
    assert claims["rctx"] == {"req_ip": "10.0.0.7"}


# --- lifetime -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_ttl", "route_ttl", "lifetime"),
    [
        (30.0, None, 30),
        (30.0, 15.0, 15),
        (30.0, 30.0, 30),
        (30.0, 120.0, 30),
        (30.0, 2.5, 2),
        (30.0, 0.5, 1),
        (300.0, None, 300),
        (10.5, None, 10),
    ],
)
def test_lifetime(config_ttl, route_ttl, lifetime):
    minter = make_minter(ttl=config_ttl)
    claims = mint_claims(minter, requirements=Requirements(token_ttl=route_ttl))
    assert claims["iat"] == int(NOW)
    assert claims["exp"] - claims["iat"] == lifetime


@pytest.mark.parametrize(("route_ttl", "bound"), [(None, 30), (1.0, 1), (15.0, 15), (29.9, 29.9), (3600.0, 30)])
def test_lifetime_within_ttl(route_ttl, bound):
    claims = mint_claims(make_minter(ttl=30.0), requirements=Requirements(token_ttl=route_ttl))
    assert claims["exp"] - claims["iat"] <= bound


def test_unique_txn_per_mint():
    minter = make_minter()
    first = minter.mint("txn-1", make_request(), None, Requirements())
    second = minter.mint("txn-2", make_request(), None, Requirements())
    assert verify(minter, first.token, "orders.example.com")["jti"] == "txn-1"
    assert verify(minter, second.token, "orders.example.com")["jti"] == "txn-2"


def test_rotation_changes_header_kid():
    # Both times lie in the past, because verify() checks iat against the real clock.
    clock = [NOW - 100]
    signing = SigningConfig(algorithm="ES256", rotate_every=60.0, key_file=None)
    config = TokenConfig(issuer=TOKEN_ISSUER, header="txn-token", ttl=30.0, signing=signing)
    minter = TokenMinter(config, KeyRing(signing, 30.0, clock=lambda: clock[0]), clock=lambda: clock[0])
    first = minter.mint(TXN, make_request(), None, Requirements())

    clock[0] = NOW - 100 + 61
    second = minter.mint(TXN, make_request(), None, Requirements())

    assert jwt.get_unverified_header(first.token)["kid"] == first.kid
    assert jwt.get_unverified_header(second.token)["kid"] == second.kid
    assert second.kid != first.kid
    assert second.kid == minter.keys.current().kid
    # Both verify against the JWKS published after the rotation: the retired key stays in it.
    assert verify(minter, first.token, "orders.example.com")["jti"] == TXN
    assert verify(minter, second.token, "orders.example.com")["jti"] == TXN


def test_non_ascii_claims_verify():
    user = make_user(subject="b\u00f8rge", acr="urn:test:\u2603")
    claims = mint_claims(user=user, request=make_request(source_principal="spiffe://cluster.local/ns/w\u00e9b/sa/x"))
    assert claims["sub"] == "b\u00f8rge"
    assert claims["rctx"]["acr"] == "urn:test:\u2603"
    assert claims["req_wl"] == "spiffe://cluster.local/ns/w\u00e9b/sa/x"
