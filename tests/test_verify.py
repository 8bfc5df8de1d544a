"""extauthz.verify: a backend verifying the tokens that the real TokenMinter and KeyRing mint.

Key sets come from the key ring's JWKS, as a dict or from a real local HTTPS server (the throwaway
CA and server of tests/test_jwks.py). The replay store is a real redis-server on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from helpers import b64url, check_request
from hypothesis import given, settings
from hypothesis import strategies as st
from processes import loopback_ports
from redis_servers import RedisServer
from test_jwks import JWKS_PATH, JwksServer, TestCA

import extauthz.verify
from extauthz.config import SigningConfig, TokenConfig
from extauthz.errors import JWKSError, RequestError
from extauthz.keys import KeyRing, generate_private_key, make_signing_key
from extauthz.mint import TokenMinter
from extauthz.policy import Requirements
from extauthz.request import from_check_request
from extauthz.request import normalise_path as server_normalise_path
from extauthz.verify import (
    AlgorithmNotAllowed,
    BadSignature,
    ContextMismatch,
    KeySetUnavailable,
    MalformedToken,
    MissingToken,
    ReplayStoreUnavailable,
    TokenExpired,
    TokenIssuedInFuture,
    TokenNotYetValid,
    TokenReplayed,
    TokenVerifier,
    UnknownKey,
    VerificationError,
    WrongAudience,
    WrongIssuer,
    WrongTokenType,
    normalise_host,
    normalise_path,
)

TOKEN_ISSUER = "https://extauthz.test"
AUDIENCE = "orders-api"
HOST = "orders.example.com"
PATH = "/orders/7"


# --- minting ---------------------------------------------------------------------------------------


def make_minter(algorithm: str = "ES256", clock: Callable[[], float] = time.time) -> TokenMinter:
    signing = SigningConfig(algorithm=algorithm, rotate_every=21_600.0, key_file=None)
    config = TokenConfig(issuer=TOKEN_ISSUER, header="txn-token", ttl=30.0, signing=signing)
    return TokenMinter(config, KeyRing(signing, 30.0, clock=clock), clock=clock)


def mint(minter: TokenMinter, *, method: str = "GET", host: str = HOST, path: str = PATH,
         audience: str | None = AUDIENCE, txn: str | None = None) -> str:
    """Mint a token for a request that extauthz normalised from a CheckRequest, as the server does."""
    request = from_check_request(check_request(method=method, host=host, path=path), 8192)
    requirements = Requirements(token_audience=audience)
    return minter.mint(txn or f"txn-{time.monotonic_ns()}", request, None, requirements).token


def jwks_of(minter: TokenMinter) -> dict[str, Any]:
    return json.loads(minter.keys.jwks())


def resign(minter: TokenMinter, token: str, *, header: dict[str, Any] | None = None,
           claims: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
    """Change a minted token's header fields and claims, and sign it again with the minter's key."""
    old_header = jwt.get_unverified_header(token)
    payload = jwt.decode(token, options={"verify_signature": False})
    payload.update(claims or {})
    for name in drop:
        payload.pop(name, None)
    new_header = {"kid": minter.keys.current().kid, "typ": old_header["typ"], **(header or {})}
    new_header = {name: value for name, value in new_header.items() if value is not ...}
    key = minter.keys.current()
    return jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers=new_header)


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}.{b64url(signature)}"


@pytest.fixture(scope="module")
def minter() -> TokenMinter:
    return make_minter()


@pytest.fixture(scope="module")
def verifier(minter) -> TokenVerifier:
    return TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=jwks_of(minter))


def verify(verifier: TokenVerifier, token: str | None, *, method: str = "GET", host: str = HOST,
           path: str = PATH) -> dict[str, Any]:
    return verifier.verify(token, method=method, host=host, path=path)


# --- accepted --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_fresh_token_accepted(algorithm):
    minter = make_minter(algorithm)
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=jwks_of(minter))
    claims = verify(verifier, mint(minter, method="POST", txn="txn-1"), method="POST")
    assert claims["iss"] == TOKEN_ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["txn"] == "txn-1"
    assert claims["tctx"] == {"method": "POST", "host": HOST, "path": PATH}


def test_audience_list_accepted(minter):
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=["billing-api", AUDIENCE], jwks=jwks_of(minter))
    assert verify(verifier, mint(minter))["aud"] == AUDIENCE


def test_aud_claim_list_accepted(minter, verifier):
    token = resign(minter, mint(minter), claims={"aud": ["billing-api", AUDIENCE]})
    assert verify(verifier, token)["aud"] == ["billing-api", AUDIENCE]


def test_host_audience_accepted(minter):
    # Without extauthz.io/token-audience, extauthz sets aud to the request's host.
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=HOST, jwks=jwks_of(minter))
    assert verify(verifier, mint(minter, audience=None))["aud"] == HOST


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        pytest.param("/orders//7/./items/%7e?page=2", "/orders//7/./items/%7e?page=2", id="same-raw-path"),
        pytest.param("/orders//7/./items/%7e", "/orders/7/items/~", id="envoy-normalised"),
        pytest.param("/orders/7", "/orders/7?page=2", id="query-ignored"),
        pytest.param("/orders/x/../7", "/orders/7", id="dot-segments"),
        pytest.param("/caf%c3%a9", "/caf%C3%A9", id="escape-case"),
        pytest.param("/a%3fb", "/a%3Fb?q=1", id="escaped-question-mark"),
        pytest.param("/dir/", "/dir//", id="trailing-slash"),
    ],
)
def test_path_normalised_match(minter, verifier, sent, received):
    token = mint(minter, path=sent)
    assert verify(verifier, token, path=received)["txn"]


@pytest.mark.parametrize(
    "received",
    ["orders.example.com", "Orders.Example.COM", "orders.example.com.", "orders.example.com:80",
     "orders.example.com:443", "orders.example.com:8080"],
)
def test_host_variants_accepted(minter, verifier, received):
    # extauthz mints tctx.host without a port, so the received port is not compared.
    assert verify(verifier, mint(minter), host=received)["tctx"]["host"] == HOST


def test_tctx_host_port_compared(minter, verifier):
    token = resign(minter, mint(minter), claims={"tctx": {"method": "GET", "host": f"{HOST}:8443", "path": PATH}})
    assert verify(verifier, token, host=f"{HOST}:8443")["tctx"]["host"] == f"{HOST}:8443"
    with pytest.raises(ContextMismatch):
        verify(verifier, token, host=HOST)
    with pytest.raises(ContextMismatch):
        verify(verifier, token, host=f"{HOST}:9443")


@pytest.mark.parametrize("typ", ["txntoken+jwt", "TxnToken+JWT", "application/txntoken+jwt"])
def test_typ_spellings_accepted(minter, verifier, typ):
    assert verify(verifier, resign(minter, mint(minter), header={"typ": typ}))["txn"]


def test_leeway_accepts_recent_expiry(verifier, minter):
    # exp is 15 s in the past, within the default 30 s leeway.
    past = make_minter(clock=lambda: time.time() - 45)
    token = resign(minter, mint(past))
    assert verify(verifier, token)["exp"] < time.time()


# --- rejected --------------------------------------------------------------------------------------


def test_other_audience_rejected(minter, verifier):
    with pytest.raises(WrongAudience) as caught:
        verify(verifier, mint(minter, audience="billing-api"))
    assert caught.value.code == "wrong_audience"


def test_empty_aud_list_rejected(minter, verifier):
    with pytest.raises(WrongAudience):
        verify(verifier, resign(minter, mint(minter), claims={"aud": []}))


@pytest.mark.parametrize(
    ("method", "host", "path"),
    [
        pytest.param("GET", HOST, "/orders/8", id="other-path"),
        pytest.param("GET", HOST, "/orders/7/", id="trailing-slash"),
        pytest.param("GET", HOST, "/Orders/7", id="path-case"),
        pytest.param("GET", HOST, "/orders/%37x", id="escape-decoded"),
        pytest.param("POST", HOST, PATH, id="other-method"),
        pytest.param("get", HOST, PATH, id="method-case"),
        pytest.param("GET", "billing.example.com", PATH, id="other-host"),
        pytest.param("GET", "orders.example.com.evil", PATH, id="host-suffix"),
        pytest.param("GET", "", PATH, id="no-host"),
        pytest.param("GET", "orders.example.com:x", PATH, id="bad-port"),
    ],
)
def test_other_request_rejected(minter, verifier, method, host, path):
    token = mint(minter)
    with pytest.raises(ContextMismatch) as caught:
        verify(verifier, token, method=method, host=host, path=path)
    assert caught.value.code == "context_mismatch"


@pytest.mark.parametrize("path", ["/orders%2F7", "/orders/..;/7", "/orders\\7", "/orders/7#x", "orders/7", ""])
def test_ambiguous_path_rejected(minter, verifier, path):
    with pytest.raises(ContextMismatch, match="ambiguous"):
        verify(verifier, mint(minter), path=path)


def test_unknown_key_rejected(verifier):
    with pytest.raises(UnknownKey) as caught:
        verify(verifier, mint(make_minter()))
    assert caught.value.code == "unknown_key"


def test_other_key_same_kid_rejected(minter, verifier):
    other = make_minter()
    token = resign(other, mint(other), header={"kid": minter.keys.current().kid})
    with pytest.raises(BadSignature) as caught:
        verify(verifier, token)
    assert caught.value.code == "bad_signature"


def test_tampered_payload_rejected(minter, verifier):
    token = mint(minter)
    header, _, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["tctx"]["path"] = "/orders/8"
    forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(BadSignature):
        verify(verifier, forged, path="/orders/8")


def test_expired_rejected(minter, verifier):
    past = make_minter(clock=lambda: time.time() - 120)
    with pytest.raises(TokenExpired) as caught:
        verify(verifier, resign(minter, mint(past)))
    assert caught.value.code == "token_expired"


def test_expired_without_leeway_rejected(minter):
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=jwks_of(minter), leeway=0)
    past = make_minter(clock=lambda: time.time() - 45)
    with pytest.raises(TokenExpired):
        verify(verifier, resign(minter, mint(past)))


def test_issued_in_future_rejected(minter, verifier):
    future = make_minter(clock=lambda: time.time() + 120)
    with pytest.raises(TokenIssuedInFuture) as caught:
        verify(verifier, resign(minter, mint(future)))
    assert caught.value.code == "token_issued_in_future"


def test_not_yet_valid_rejected(minter, verifier):
    token = resign(minter, mint(minter), claims={"nbf": int(time.time()) + 120})
    with pytest.raises(TokenNotYetValid) as caught:
        verify(verifier, token)
    assert caught.value.code == "token_not_yet_valid"


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "txntoken", "", 7, ...])
def test_wrong_typ_rejected(minter, verifier, typ):
    token = resign(minter, mint(minter), header={"typ": typ})
    with pytest.raises(WrongTokenType) as caught:
        verify(verifier, token)
    assert caught.value.code == "wrong_token_type"


def test_wrong_issuer_rejected(minter, verifier):
    token = resign(minter, mint(minter), claims={"iss": "https://other.test"})
    with pytest.raises(WrongIssuer) as caught:
        verify(verifier, token)
    assert caught.value.code == "wrong_issuer"


def test_alg_none_rejected(minter, verifier):
    claims = jwt.decode(mint(minter), options={"verify_signature": False})
    token = unsigned({"alg": "none", "typ": "txntoken+jwt", "kid": minter.keys.current().kid}, claims)
    with pytest.raises(AlgorithmNotAllowed) as caught:
        verify(verifier, token)
    assert caught.value.code == "algorithm_not_allowed"


def test_hs256_public_key_rejected(minter, verifier):
    # The classic confusion: an HMAC keyed with the published public key.
    public_pem = minter.keys.current().private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = jwt.decode(mint(minter), options={"verify_signature": False})
    header = {"alg": "HS256", "typ": "txntoken+jwt", "kid": minter.keys.current().kid}
    signing_input = unsigned(header, claims).rsplit(".", 1)[0]
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(AlgorithmNotAllowed):
        verify(verifier, f"{signing_input}.{b64url(mac)}")


def test_alg_differs_from_key_rejected(minter, verifier):
    # An Ed25519 signature under the kid of the ES256 key: the key's algorithm decides, not the token.
    ed_key = make_signing_key(generate_private_key("EdDSA"), "EdDSA")
    claims = jwt.decode(mint(minter), options={"verify_signature": False})
    token = jwt.encode(claims, ed_key.private_key, algorithm="EdDSA",
                       headers={"kid": minter.keys.current().kid, "typ": "txntoken+jwt"})
    with pytest.raises(AlgorithmNotAllowed, match="does not match the key"):
        verify(verifier, token)


def test_algorithms_restricted(minter):
    both = {"keys": jwks_of(minter)["keys"] + jwks_of(make_minter("EdDSA"))["keys"]}
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=both, algorithms=["EdDSA"])
    with pytest.raises(AlgorithmNotAllowed):
        verify(verifier, mint(minter))


def test_algorithms_restricted_key_dropped(minter):
    # A key set with only an ES256 key has no key that an EdDSA-only verifier can use.
    with pytest.raises(JWKSError):
        TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=jwks_of(minter), algorithms=["EdDSA"])


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("abc", id="one-part"),
        pytest.param("a.b", id="two-parts"),
        pytest.param("a.b.c.d", id="four-parts"),
        pytest.param("..", id="empty-parts"),
        pytest.param("!!!.???.***", id="not-base64url"),
        pytest.param("e30.e30.e30 ", id="trailing-space"),
        pytest.param("Bearer e30.e30.e30", id="bearer-prefix"),
        pytest.param("bm90IGpzb24.e30.e30", id="header-not-json"),
        pytest.param("WzFd.e30.e30", id="header-not-object"),
        pytest.param("e30.e30.e30,e30.e30.e30", id="two-tokens"),
        pytest.param("\u00e9.e30.e30", id="non-ascii"),
    ],
)
def test_malformed_string_rejected(verifier, token):
    with pytest.raises(MalformedToken) as caught:
        verify(verifier, token)
    assert caught.value.code == "malformed_token"
    assert caught.value.status == 401


@pytest.mark.parametrize("token", ["e30.e30.e30", "eyJhbGciOiJFUzI1NiJ9.e30."])
def test_header_without_typ_rejected(verifier, token):
    with pytest.raises(WrongTokenType):
        verify(verifier, token)


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_rejected(verifier, token):
    with pytest.raises(MissingToken) as caught:
        verify(verifier, token)
    assert caught.value.code == "missing_token"


def test_payload_not_json_rejected(minter, verifier):
    header = {"alg": "ES256", "typ": "txntoken+jwt", "kid": minter.keys.current().kid}
    key = minter.keys.current().private_key
    token = jwt.api_jws.encode(b"not json", key, algorithm="ES256", headers=header)
    with pytest.raises(MalformedToken):
        verify(verifier, token)


@pytest.mark.parametrize("claim", ["iss", "sub", "txn", "exp", "iat", "aud", "tctx"])
def test_missing_claim_rejected(minter, verifier, claim):
    with pytest.raises(MalformedToken, match=claim):
        verify(verifier, resign(minter, mint(minter), drop=(claim,)))


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param({"exp": "soon"}, "exp", id="exp-string"),
        pytest.param({"exp": True}, "exp", id="exp-bool"),
        pytest.param({"iat": None}, "iat", id="iat-null"),
        pytest.param({"nbf": "now"}, "nbf", id="nbf-string"),
        pytest.param({"txn": ""}, "txn", id="txn-empty"),
        pytest.param({"txn": 7}, "txn", id="txn-number"),
        pytest.param({"aud": 7}, "aud", id="aud-number"),
        pytest.param({"aud": [AUDIENCE, 7]}, "aud", id="aud-list-number"),
        pytest.param({"tctx": "GET /orders/7"}, "tctx", id="tctx-string"),
        pytest.param({"tctx": {"method": "GET", "host": HOST}}, "tctx", id="tctx-no-path"),
        pytest.param({"tctx": {"method": "GET", "host": HOST, "path": 7}}, "tctx", id="tctx-path-number"),
    ],
)
def test_mistyped_claim_rejected(minter, verifier, claims, expected):
    with pytest.raises(MalformedToken, match=expected):
        verify(verifier, resign(minter, mint(minter), claims=claims))


def test_missing_kid_rejected(minter, verifier):
    with pytest.raises(MalformedToken, match="kid"):
        verify(verifier, resign(minter, mint(minter), header={"kid": ...}))


def test_crit_header_rejected(minter, verifier):
    with pytest.raises(MalformedToken, match="crit"):
        verify(verifier, resign(minter, mint(minter), header={"crit": ["exp"]}))


def test_error_never_contains_token(minter, verifier):
    token = mint(minter)
    with pytest.raises(ContextMismatch) as caught:
        verify(verifier, token, path="/orders/8")
    assert token not in str(caught.value)
    assert token.split(".")[2] not in caught.value.detail


def test_error_codes_distinct():
    classes = [cls for cls in vars(extauthz.verify).values()
               if isinstance(cls, type) and issubclass(cls, VerificationError) and cls is not VerificationError]
    codes = [cls.code for cls in classes]
    assert len(classes) == 15
    assert len(set(codes)) == len(codes)
    for code in codes:
        assert code.isidentifier(), code
        assert code.islower(), code
        assert f"    {code} " in extauthz.verify.__doc__, f"{code} is not documented in the module docstring"


# --- replay store ----------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis", port=loopback_ports(1)[0])
    try:
        yield server.start()
    finally:
        server.stop()


def replay_verifier(minter: TokenMinter, client: Any, **options: Any) -> TokenVerifier:
    return TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=jwks_of(minter), replay_store=client,
                         **options)


def test_replayed_token_rejected(minter, redis_server):
    client = redis_server.client()
    verifier = replay_verifier(minter, client)
    token = mint(minter)
    assert verify(verifier, token)["txn"]

    with pytest.raises(TokenReplayed) as caught:
        verify(verifier, token)
    assert caught.value.code == "token_replayed"


def test_replay_shared_by_verifiers(minter, redis_server):
    token = mint(minter)
    verify(replay_verifier(minter, redis_server.client()), token)
    with pytest.raises(TokenReplayed):
        verify(replay_verifier(minter, redis_server.client()), token)


def test_replay_key_expires(minter, redis_server):
    client = redis_server.client()
    token = mint(minter, txn="txn-expiry")
    claims = verify(replay_verifier(minter, client, key_prefix="shop:"), token)

    ttl_ms = client.pttl("shop:txn:txn-expiry")
    assert ttl_ms > 0
    assert ttl_ms <= (claims["exp"] + 30 - time.time()) * 1000 + 1000
    assert client.keys("*") == [b"shop:txn:txn-expiry"]


def test_failed_check_keeps_txn(minter, redis_server):
    # A token presented for another path is rejected before its txn is claimed.
    verifier = replay_verifier(minter, redis_server.client())
    token = mint(minter)
    with pytest.raises(ContextMismatch):
        verify(verifier, token, path="/orders/8")
    assert verify(verifier, token)["txn"]


def test_concurrent_replay_one_wins(minter, redis_server):
    verifier = replay_verifier(minter, redis_server.client())
    token = mint(minter)
    barrier = threading.Barrier(8, timeout=10)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            verify(verifier, token)
            outcome = "accepted"
        except TokenReplayed:
            outcome = "replayed"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert sorted(outcomes) == ["accepted"] + ["replayed"] * 7


def test_replay_store_down(minter, redis_server):
    client = redis_server.client()
    verifier = replay_verifier(minter, client)
    redis_server.stop()
    with pytest.raises(ReplayStoreUnavailable) as caught:
        verify(verifier, mint(minter))
    assert caught.value.code == "replay_store_unavailable"
    assert caught.value.status == 503


# --- JWKS from a URI -------------------------------------------------------------------------------


class FakeTime:
    """A stand-in for the `time` module inside extauthz.verify: a monotonic clock that tests move."""

    def __init__(self, start: float = 10_000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def jwks_server(local_ca, minter):
    server = JwksServer(local_ca)
    server.serve(jwks_of(minter))
    yield server
    server.stop()


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(extauthz.verify, "time", fake)
    return fake


def uri_verifier(server: JwksServer, ca: TestCA | None, **options: Any) -> TokenVerifier:
    return TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks_uri=server.uri,
                         jwks_ca_file=ca.ca_file if ca else None, **options)


def test_uri_token_accepted(jwks_server, local_ca, minter):
    verifier = uri_verifier(jwks_server, local_ca)
    assert jwks_server.hits == 0

    assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER
    assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER
    assert jwks_server.requests == [(JWKS_PATH, "application/json")]


def test_uri_ca_file_as_string(jwks_server, local_ca, minter):
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks_uri=jwks_server.uri,
                             jwks_ca_file=str(local_ca.ca_file))
    assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER


def test_uri_untrusted_certificate(jwks_server, minter):
    verifier = uri_verifier(jwks_server, None)
    with pytest.raises(KeySetUnavailable) as caught:
        verify(verifier, mint(minter))
    assert caught.value.status == 503
    assert jwks_server.hits == 0


def test_unknown_kid_refresh_rate_limited(jwks_server, local_ca, minter, clock):
    verifier = uri_verifier(jwks_server, local_ca, min_refresh_interval=30.0)
    verify(verifier, mint(minter))
    assert jwks_server.hits == 1
    stranger = mint(make_minter())

    # Within the interval since the last fetch: no request at all.
    clock.now += 10
    for _ in range(5):
        with pytest.raises(UnknownKey):
            verify(verifier, stranger)
    assert jwks_server.hits == 1

    # Past the interval: one refresh, then rate-limited again.
    clock.now += 25
    for _ in range(5):
        with pytest.raises(UnknownKey):
            verify(verifier, stranger)
    assert jwks_server.hits == 2

    clock.now += 31
    with pytest.raises(UnknownKey):
        verify(verifier, stranger)
    assert jwks_server.hits == 3


def test_rotated_key_picked_up(jwks_server, local_ca, minter, clock):
    verifier = uri_verifier(jwks_server, local_ca, min_refresh_interval=30.0)
    verify(verifier, mint(minter))
    rotated = make_minter()
    jwks_server.serve(jwks_of(rotated))

    clock.now += 31
    assert verify(verifier, mint(rotated))["iss"] == TOKEN_ISSUER
    assert jwks_server.hits == 2
    with pytest.raises(UnknownKey):
        verify(verifier, mint(minter))
    assert jwks_server.hits == 2


def test_periodic_refresh(jwks_server, local_ca, minter, clock):
    verifier = uri_verifier(jwks_server, local_ca, refresh_interval=300.0)
    verify(verifier, mint(minter))
    clock.now += 299
    verify(verifier, mint(minter))
    assert jwks_server.hits == 1

    clock.now += 2
    verify(verifier, mint(minter))
    assert jwks_server.hits == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"unavailable", 500, id="status-500"),
        pytest.param(b"<html>maintenance</html>", 200, id="not-json"),
        pytest.param(b'{"keys": []}', 200, id="no-keys"),
    ],
)
def test_failed_refresh_keeps_last_good(jwks_server, local_ca, minter, clock, body, status):
    verifier = uri_verifier(jwks_server, local_ca, refresh_interval=300.0, min_refresh_interval=30.0)
    verify(verifier, mint(minter))
    jwks_server.serve(body, status=status)

    clock.now += 301
    assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER
    assert jwks_server.hits == 2
    with pytest.raises(UnknownKey):
        verify(verifier, mint(make_minter()))
    assert jwks_server.hits == 2

    # Each failed periodic refresh is retried at most once per min_refresh_interval.
    clock.now += 31
    assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER
    assert jwks_server.hits == 3


def test_server_stopped_keeps_last_good(jwks_server, local_ca, minter, clock):
    verifier = uri_verifier(jwks_server, local_ca)
    verify(verifier, mint(minter))
    jwks_server.stop()

    assert verifier.refresh_keys() is False
    clock.now += 3600
    with pytest.raises(UnknownKey):
        verify(verifier, mint(make_minter()))
    assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER


def test_failing_at_start_recovers(jwks_server, local_ca, minter, clock):
    jwks_server.serve(b"unavailable", status=503)
    verifier = uri_verifier(jwks_server, local_ca, min_refresh_interval=30.0)
    token = mint(minter)
    with pytest.raises(KeySetUnavailable):
        verify(verifier, token)
    with pytest.raises(KeySetUnavailable):
        verify(verifier, token)
    assert jwks_server.hits == 1

    jwks_server.serve(jwks_of(minter))
    clock.now += 31
    assert verify(verifier, token)["iss"] == TOKEN_ISSUER
    assert jwks_server.hits == 2


def test_refresh_keys_at_start(jwks_server, local_ca, minter):
    verifier = uri_verifier(jwks_server, local_ca)
    assert verifier.refresh_keys() is True
    verify(verifier, mint(minter))
    assert jwks_server.hits == 1


def test_refresh_keys_static_jwks(verifier):
    assert verifier.refresh_keys() is False


def test_concurrent_unknown_kid_one_fetch(jwks_server, local_ca, minter, clock):
    verifier = uri_verifier(jwks_server, local_ca, min_refresh_interval=30.0)
    verify(verifier, mint(minter))
    rotated = make_minter()
    jwks_server.serve(jwks_of(rotated))
    clock.now += 31

    barrier = threading.Barrier(8, timeout=10)
    accepted: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        token = mint(rotated)
        barrier.wait()
        claims = verify(verifier, token)
        with lock:
            accepted.append(claims["txn"])

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert len(accepted) == 8
    assert jwks_server.hits == 2


# --- jwks_uri over plain HTTP ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["https://extauthz.example.com/.well-known/jwks.json", "http://127.0.0.1:9000/.well-known/jwks.json",
     "http://[::1]:9000/.well-known/jwks.json", "http://localhost/.well-known/jwks.json",
     "HTTP://LOCALHOST:9000/jwks.json"],
)
def test_jwks_uri_accepted(uri):
    # Constructing the verifier fetches nothing, so these hosts are never contacted.
    assert TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks_uri=uri).jwks_uri == uri


@pytest.mark.parametrize(
    "uri",
    ["http://extauthz.example.com/.well-known/jwks.json", "http://10.0.0.9/jwks.json",
     "http://127.0.0.2/jwks.json", "http://localhost.example.com/jwks.json", "http://0.0.0.0/jwks.json",
     "ftp://127.0.0.1/jwks.json", "file:///etc/jwks.json", "/.well-known/jwks.json", "https://"],
)
def test_jwks_uri_rejected(uri):
    with pytest.raises(ValueError, match="jwks_uri"):
        TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks_uri=uri)


def test_http_loopback_fetch(minter):
    body = json.dumps(jwks_of(minter)).encode()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}{JWKS_PATH}"
        verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks_uri=uri)
        assert verify(verifier, mint(minter))["iss"] == TOKEN_ISSUER
        assert hits == [JWKS_PATH]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="no-keys"),
        pytest.param({"jwks": {"keys": []}, "jwks_uri": "https://extauthz.test/jwks"}, id="both-keys"),
        pytest.param({"jwks_uri": "https://x.test/j", "audience": ""}, id="empty-audience"),
        pytest.param({"jwks_uri": "https://x.test/j", "audience": []}, id="no-audiences"),
        pytest.param({"jwks_uri": "https://x.test/j", "issuer": ""}, id="empty-issuer"),
        pytest.param({"jwks_uri": "https://x.test/j", "algorithms": ["RS256"]}, id="rs256"),
        pytest.param({"jwks_uri": "https://x.test/j", "algorithms": ["ES256", "HS256"]}, id="hs256"),
        pytest.param({"jwks_uri": "https://x.test/j", "algorithms": []}, id="no-algorithms"),
        pytest.param({"jwks_uri": "https://x.test/j", "leeway": -1}, id="negative-leeway"),
        pytest.param({"jwks_uri": "https://x.test/j", "timeout": 0}, id="zero-timeout"),
        pytest.param({"jwks_uri": "https://x.test/j", "min_refresh_interval": float("nan")}, id="nan-interval"),
    ],
)
def test_invalid_arguments(options):
    arguments = {"issuer": TOKEN_ISSUER, "audience": AUDIENCE, **options}
    with pytest.raises(ValueError):
        TokenVerifier(**arguments)


def test_jwks_without_usable_key():
    with pytest.raises(JWKSError):
        TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks={"keys": []})


# --- imports ---------------------------------------------------------------------------------------


def test_import_loads_no_server_packages():
    code = (
        "import json, sys\n"
        "import extauthz.verify, extauthz.verify_middleware\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    modules = json.loads(result.stdout)
    roots = {name.split(".")[0] for name in modules}
    assert "extauthz.verify" in modules
    assert "grpc" not in roots
    assert "envoy" not in roots
    assert "yaml" not in roots
    assert "google" not in roots
    assert "redis" not in roots
    assert "extauthz.config" not in modules
    assert "extauthz.request" not in modules


# --- normalisation matches extauthz ----------------------------------------------------------------


def server_path(raw: str) -> str | None:
    try:
        return server_normalise_path(raw, 1 << 20)[0]
    except RequestError:
        return None


def local_path(raw: str) -> str | None:
    try:
        return normalise_path(raw)
    except ValueError:
        return None


@pytest.mark.parametrize(
    "raw",
    ["/", "/a?b", "/public/../admin", "/..", "/a/.", "//admin", "/%41dmin", "/%7e", "/a/%2e%2e", "/a%3fb?q",
     "/caf%c3%a9", "/a;b/c", "/a/...", "/x..;", "/admin%2Fx", "/admin%25", "/admin%zz", "/admin\\x",
     "/admin#top", "/ad min", "/admin\u00e9", "", "admin", "*", "/..;/admin", "/public/%2e%2e;/admin"],
)
def test_path_table_matches_server(raw):
    assert local_path(raw) == server_path(raw)


_PATH_ALPHABET = st.sampled_from(
    ["/", ".", "..", "%", "%2e", "%2E", "%2f", "%5c", "%25", "%41", "%7e", "%3a", "%3B", "%zz", "%4",
     ";", "?", "#", "\\", " ", "\x00", "\n", "a", "b", "~", "-", "\u00e9"]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_PATH_ALPHABET, max_size=20).map("".join)))
def test_path_property_matches_server(raw):
    assert local_path(raw) == server_path(raw)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("Shop.Example.COM.", ("shop.example.com", None)),
        ("shop.example.com:80", ("shop.example.com", None)),
        ("shop.example.com:443", ("shop.example.com", None)),
        ("shop.example.com:8080", ("shop.example.com", 8080)),
        ("[::1]:8443", ("[::1]", 8443)),
        ("[::1]", ("[::1]", None)),
    ],
)
def test_host_normalised(authority, expected):
    assert normalise_host(authority) == expected


@pytest.mark.parametrize("authority", ["", "user@shop", "shop:", "shop:0", "shop:70000", "shop:x", "[::1", "[zz]",
                                       "[::1]x", ":80"])
def test_host_invalid(authority):
    with pytest.raises(ValueError):
        normalise_host(authority)


def test_b64url_helper_matches_pyjwt():
    # unsigned() builds tokens by hand: its encoding must be what pyjwt reads.
    token = unsigned({"alg": "none"}, {"a": 1})
    assert jwt.decode(token, options={"verify_signature": False}) == {"a": 1}
    assert base64.urlsafe_b64decode(token.split(".")[0] + "==") == b'{"alg": "none"}'


@pytest.mark.parametrize("allow_http", [False, True])
def test_mesh_http_jwks_uri(allow_http):
    uri = "http://extauthz.extauthz.svc.cluster.local:9192/.well-known/jwks.json"
    if allow_http:
        verifier = TokenVerifier(issuer="https://extauthz.test", audience="orders", jwks_uri=uri, allow_http=True)
        assert verifier.jwks_uri == uri
    else:
        with pytest.raises(ValueError, match="allow_http=True"):
            TokenVerifier(issuer="https://extauthz.test", audience="orders", jwks_uri=uri)
