"""One-time tokens: ReplayGuard over MemoryStore and a real Redis, and full Check decisions."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import pytest
from helpers import ISSUER, check_request, make_authorizer
from redis_servers import redis_server  # noqa: F401
from store_helpers import ONE_TIME_PATH, STANDARD_PATH, end_user, http_request, store_config, write_store_config

from extauthz.errors import TokenError
from extauthz.replay import RETRY_WINDOW, ReplayGuard, request_fingerprint
from extauthz.store import KeyNames, open_store

LEEWAY = 30.0
# A Check must still return quickly while the store is down: 50 ms x 2 attempts, plus slack.
UNAVAILABLE_BOUND = 1.0


@pytest.fixture
def guard(store) -> ReplayGuard:
    return ReplayGuard(store, KeyNames("extauthz:"))


def replay_code(guard: ReplayGuard, user, request, now: float) -> str | None:
    """Claim and return the TokenError code, or None when the claim succeeds."""
    try:
        guard.claim(user, request, now, LEEWAY)
    except TokenError as exc:
        return exc.code
    return None


def test_first_use_claims(guard):
    assert guard.claim(end_user(), http_request(), time.time(), LEEWAY) is False


def test_second_use_replayed(guard):
    user = end_user()
    now = time.time()
    guard.claim(user, http_request(request_id="req-1"), now, LEEWAY)
    assert replay_code(guard, user, http_request(request_id="req-2"), now + 1) == "token_replayed"


def test_retry_allowed(guard):
    user = end_user()
    now = time.time()
    guard.claim(user, http_request(), now, LEEWAY)
    assert guard.claim(user, http_request(), now + 1, LEEWAY) is True


@pytest.mark.parametrize("changed", [
    {"source_principal": "spiffe://cluster.local/ns/web/sa/other"},
    {"source_address": "10.0.0.8"},
    {"method": "POST"},
    {"host": "other.example.com"},
    {"path": "/pay/other"},
])
def test_retry_must_repeat_request(guard, changed):
    user = end_user()
    now = time.time()
    guard.claim(user, http_request(path=ONE_TIME_PATH), now, LEEWAY)
    second = http_request(**{"path": ONE_TIME_PATH, **changed})
    assert replay_code(guard, user, second, now + 1) == "token_replayed"


def test_retry_after_window_replayed(guard):
    user = end_user()
    now = time.time()
    guard.claim(user, http_request(), now, LEEWAY)
    assert replay_code(guard, user, http_request(), now + RETRY_WINDOW + 1) == "token_replayed"


def test_no_request_id_never_retry(guard):
    user = end_user()
    now = time.time()
    anonymous = dataclasses.replace(http_request(), request_id="")
    guard.claim(user, anonymous, now, LEEWAY)
    assert replay_code(guard, user, anonymous, now + 0.5) == "token_replayed"


@pytest.mark.parametrize("token_id", [None, ""])
def test_no_jti_invalid(guard, token_id):
    assert replay_code(guard, end_user(token_id=token_id), http_request(), time.time()) == "invalid_token"


def test_jti_scoped_by_issuer(guard):
    now = time.time()
    guard.claim(end_user(token_id="j-1"), http_request(request_id="req-1"), now, LEEWAY)
    other = end_user(issuer="https://other-idp.test", token_id="j-1")
    assert replay_code(guard, other, http_request(request_id="req-2"), now) is None


def test_fingerprint_covers_request_id():
    first = request_fingerprint(http_request(request_id="req-1"))
    assert first != request_fingerprint(http_request(request_id="req-2"))


def test_claim_lasts_token_lifetime(redis_server, tmp_path, idp):  # noqa: F811
    store = open_store(store_config(tmp_path, idp, url=redis_server.url))
    now = time.time()
    user = end_user(token_id="j-ttl", expires_at=now + 120)
    try:
        ReplayGuard(store, KeyNames("extauthz:")).claim(user, http_request(), now, LEEWAY)
    finally:
        store.close()
    digest = hashlib.sha256(f"{ISSUER}\0j-ttl".encode()).hexdigest()
    client = redis_server.client()
    try:
        ttl_ms = client.pttl(f"extauthz:otk:{digest}")
    finally:
        client.close()
    # The claim lasts until the token expires plus the leeway: 150 s, less the time since `now`.
    assert 145_000 < ttl_ms <= 150_000


@pytest.fixture(params=["memory", "redis"])
def authorizer(request, tmp_path, idp):
    store = {}
    if request.param == "redis":
        store = {"url": request.getfixturevalue("redis_server").url}
    authorizer, decision_log, _ = make_authorizer(write_store_config(tmp_path, idp, store))
    authorizer.revocations.sync()
    try:
        yield authorizer, decision_log
    finally:
        authorizer.revocations.store.close()


def test_one_time_first_use_allowed(authorizer, idp):
    authorizer, decision_log = authorizer
    decision = authorizer.check(check_request(path=ONE_TIME_PATH, token=idp.token()))
    assert decision.reason == "allowed"
    assert decision.retry is False
    assert "retry" not in decision_log.records()[-1]


def test_one_time_second_use_denied(authorizer, idp):
    authorizer, decision_log = authorizer
    token = idp.token()
    authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id="req-1"))
    decision = authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id="req-2"))
    assert decision.status == 401
    assert decision.reason == "token_replayed"
    assert decision_log.records()[-1]["reason"] == "token_replayed"


def test_one_time_retry_allowed(authorizer, idp):
    authorizer, decision_log = authorizer
    token = idp.token()
    authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id="req-1"))
    decision = authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id="req-1"))
    assert decision.reason == "allowed"
    assert decision.retry is True
    assert decision_log.records()[-1]["retry"] is True


def test_one_time_without_jti(authorizer, idp):
    authorizer, _ = authorizer
    decision = authorizer.check(check_request(path=ONE_TIME_PATH, token=idp.token(jti=...)))
    assert decision.status == 401
    assert decision.reason == "invalid_token"


def test_one_time_without_token(authorizer):
    authorizer, _ = authorizer
    decision = authorizer.check(check_request(path=ONE_TIME_PATH))
    assert decision.reason == "missing_token"


def test_standard_route_reusable(authorizer, idp):
    authorizer, _ = authorizer
    token = idp.token()
    authorizer.check(check_request(path=STANDARD_PATH, token=token, request_id="req-1"))
    decision = authorizer.check(check_request(path=STANDARD_PATH, token=token, request_id="req-2"))
    assert decision.reason == "allowed"


def test_revoked_token_not_claimed(authorizer, idp):
    authorizer, _ = authorizer
    token = idp.token(jti="j-revoked")
    authorizer.revocations.store.add_revocation(
        "jti:j-revoked", {"kind": "jti", "value": "j-revoked", "issuer": "*", "revoked_at": time.time(),
                          "expires_at": time.time() + 60, "reason": ""}, time.time())
    authorizer.revocations.sync()
    first = authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id="req-1"))
    authorizer.revocations.store.remove_revocations(None)
    authorizer.revocations.sync()
    second = authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id="req-2"))
    assert first.reason == "token_revoked"
    # The denied Check did not use up the token.
    assert second.reason == "allowed"


def test_one_time_store_down(redis_server, tmp_path, idp):  # noqa: F811
    authorizer, decision_log, _ = make_authorizer(write_store_config(tmp_path, idp, {"url": redis_server.url}))
    try:
        authorizer.revocations.sync()
        redis_server.stop()
        started = time.monotonic()
        decision = authorizer.check(check_request(path=ONE_TIME_PATH, token=idp.token()))
        elapsed = time.monotonic() - started
    finally:
        authorizer.revocations.store.close()
    assert decision.status == 503
    assert decision.reason == "state_unavailable"
    assert elapsed < UNAVAILABLE_BOUND
    assert decision_log.records()[-1]["reason"] == "state_unavailable"
