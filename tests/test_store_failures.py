"""Store failures with a real Redis: killed and restarted, frozen with SIGSTOP, store.on_error, and
replies cut off by the command deadline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from helpers import RecordingLog, check_request, make_authorizer
from processes import http_get
from redis_servers import redis_server  # noqa: F401
from store_helpers import ONE_TIME_PATH, SENSITIVE_PATH, STANDARD_PATH, store_config, write_store_config

from extauthz.config import load_config
from extauthz.decision import Decision
from extauthz.pipeline import Authorizer
from extauthz.revocation import revoke
from extauthz.server import Service
from extauthz.store import CLAIMED, REPLAYED, StoreError, open_store

MAX_STALENESS = "300ms"
# One store operation gives up after about store.timeout x (retries + 1) = 100 ms with the defaults.
# Checks must return well within this bound. It allows for a loaded test machine, not for a hang.
CHECK_BOUND = 1.0
# Waiting for a state change (stale copy, recovery): at most POLL_TRIES tries, POLL_INTERVAL apart.
POLL_TRIES = 100
POLL_INTERVAL = 0.05
# One-time tokens claimed after a freeze, each of which must be claimed exactly once.
TOKENS_AFTER_FREEZE = 5


@contextmanager
def running_service(config_path: Path) -> Iterator[Service]:
    config = load_config(config_path)
    service = Service(config, decision_log=RecordingLog(config))
    service.start()
    try:
        yield service
    finally:
        service.stop(grace=0)


@contextmanager
def frozen(server) -> Iterator[None]:
    """SIGSTOP the Redis for the block, and always SIGCONT it afterwards."""
    server.freeze()
    try:
        yield
    finally:
        server.resume()


def timed_check(authorizer: Authorizer, request: external_auth_pb2.CheckRequest) -> tuple[Decision, float]:
    started = time.monotonic()
    decision = authorizer.check(request)
    return decision, time.monotonic() - started


def poll_reason(authorizer: Authorizer, make_request: Callable[[], external_auth_pb2.CheckRequest],
                reason: str) -> tuple[Decision | None, float]:
    """Send Checks until one returns `reason`. Return that decision (None if none did) and the
    longest time one Check took."""
    slowest = 0.0
    for _ in range(POLL_TRIES):
        decision, seconds = timed_check(authorizer, make_request())
        slowest = max(slowest, seconds)
        if decision.reason == reason:
            return decision, slowest
        time.sleep(POLL_INTERVAL)
    return None, slowest


def poll_store_state(service: Service, state: str) -> str | None:
    """Poll /readyz until its body names `state`. Return the status and state, or None."""
    for _ in range(POLL_TRIES):
        status, _, body = http_get(service.http_port, "/readyz")
        if json.loads(body)["store"] == state:
            return f"{status} {state}"
        time.sleep(POLL_INTERVAL)
    return None


@pytest.fixture
def config_path(redis_server, tmp_path, idp) -> Path:  # noqa: F811
    return write_store_config(tmp_path, idp, {"url": redis_server.url, "max_staleness": MAX_STALENESS})


def test_redis_killed_then_restarted(redis_server, config_path, idp):  # noqa: F811
    def one_time() -> external_auth_pb2.CheckRequest:
        return check_request(path=ONE_TIME_PATH, token=idp.token())

    def sensitive() -> external_auth_pb2.CheckRequest:
        return check_request(path=SENSITIVE_PATH, token=idp.token())

    with running_service(config_path) as service:
        authorizer = service.authorizer
        before = [authorizer.check(one_time()).reason, authorizer.check(sensitive()).reason]

        redis_server.stop()
        one_time_down, one_time_seconds = timed_check(authorizer, one_time())
        sensitive_down, sensitive_slowest = poll_reason(authorizer, sensitive, "state_unavailable")

        redis_server.start()
        sensitive_back, _ = poll_reason(authorizer, sensitive, "allowed")
        one_time_back, _ = poll_reason(authorizer, one_time, "allowed")

    assert before == ["allowed", "allowed"]
    assert one_time_down.status == 503
    assert one_time_down.reason == "state_unavailable"
    assert one_time_seconds < CHECK_BOUND
    assert sensitive_down is not None, "the sensitive route kept allowing with Redis down"
    assert sensitive_down.status == 503
    assert sensitive_slowest < CHECK_BOUND
    assert sensitive_back is not None, "the sensitive route did not recover after the restart"
    assert one_time_back is not None, "the one-time route did not recover after the restart"


def test_frozen_redis_checks_answer(redis_server, config_path, idp):  # noqa: F811
    def one_time() -> external_auth_pb2.CheckRequest:
        return check_request(path=ONE_TIME_PATH, token=idp.token())

    def sensitive() -> external_auth_pb2.CheckRequest:
        return check_request(path=SENSITIVE_PATH, token=idp.token())

    with running_service(config_path) as service:
        authorizer = service.authorizer
        with frozen(redis_server):
            one_time_frozen = [timed_check(authorizer, one_time()) for _ in range(3)]
            sensitive_frozen, sensitive_slowest = poll_reason(authorizer, sensitive, "state_unavailable")
        one_time_back, _ = poll_reason(authorizer, one_time, "allowed")
        sensitive_back, _ = poll_reason(authorizer, sensitive, "allowed")

    for decision, seconds in one_time_frozen:
        assert decision.reason == "state_unavailable"
        assert seconds < CHECK_BOUND
    assert sensitive_frozen is not None, "the sensitive route kept allowing with Redis frozen"
    assert sensitive_slowest < CHECK_BOUND
    assert one_time_back is not None, "the one-time route did not recover after SIGCONT"
    assert sensitive_back is not None, "the sensitive route did not recover after SIGCONT"


@pytest.mark.parametrize(("on_error", "status", "reason"), [
    ("allow_standard", 200, "allowed"),
    ("deny", 503, "state_unavailable"),
])
def test_on_error_standard_route(redis_server, tmp_path, idp, on_error, status, reason):  # noqa: F811
    config_path = write_store_config(tmp_path, idp, {"url": redis_server.url, "max_staleness": MAX_STALENESS,
                                                     "on_error": on_error})
    authorizer, decision_log, _ = make_authorizer(config_path)
    try:
        authorizer.revocations.sync()
        redis_server.stop()
        for _ in range(POLL_TRIES):
            if not authorizer.revocations.fresh:
                break
            time.sleep(POLL_INTERVAL)
        standard, seconds = timed_check(authorizer, check_request(path=STANDARD_PATH, token=idp.token()))
        standard_record = decision_log.records()[-1]
        sensitive = authorizer.check(check_request(path=SENSITIVE_PATH, token=idp.token()))
        anonymous = authorizer.check(check_request(path=STANDARD_PATH))
        anonymous_record = decision_log.records()[-1]
    finally:
        authorizer.revocations.store.close()

    assert standard.status == status
    assert standard.reason == reason
    assert seconds < CHECK_BOUND
    assert standard_record.get("degraded", False) is (on_error == "allow_standard")
    assert sensitive.status == 503
    assert sensitive.reason == "state_unavailable"
    # A request without an end-user token needs no revocation check, so the store does not matter.
    assert anonymous.reason == "allowed"
    assert "degraded" not in anonymous_record


def test_cut_off_claims_no_leak(redis_server, tmp_path, idp):  # noqa: F811
    # The revocation copy stays fresh throughout, so the Checks during the freeze reach the claim.
    authorizer, _, _ = make_authorizer(write_store_config(tmp_path, idp, {"url": redis_server.url,
                                                                          "max_staleness": "10s"}))
    used = idp.token()
    try:
        authorizer.revocations.sync()
        first_use = authorizer.check(check_request(path=ONE_TIME_PATH, token=used, request_id="req-1"))
        with frozen(redis_server):
            # Each claim below reaches the frozen Redis and is cut off by store.timeout. A late
            # reply to the reused token's claim would be "replayed".
            cut_off = [timed_check(authorizer, check_request(path=ONE_TIME_PATH, token=token, request_id="req-2"))
                       for token in (used, idp.token())]
        results = []
        for index in range(TOKENS_AFTER_FREEZE):
            token = idp.token(jti=f"after-freeze-{index}")
            first = authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id=f"first-{index}"))
            second = authorizer.check(check_request(path=ONE_TIME_PATH, token=token, request_id=f"second-{index}"))
            results.append((first.reason, first.retry, second.reason))
    finally:
        authorizer.revocations.store.close()

    assert first_use.reason == "allowed"
    for decision, seconds in cut_off:
        assert decision.reason == "state_unavailable"
        assert decision.detail == "one-time token claim failed"
        assert seconds < CHECK_BOUND
    assert results == [("allowed", False, "token_replayed")] * TOKENS_AFTER_FREEZE


def test_cut_off_replies_not_reused(redis_server, tmp_path, idp):  # noqa: F811
    store = open_store(store_config(tmp_path, idp, url=redis_server.url))
    now = time.time()
    try:
        store.claim_once("extauthz:otk:used", "fingerprint-a", 60, now, 10)
        version = store.revocation_version()
        with frozen(redis_server):
            # Late replies, if they were ever read, would be "replayed" (0) and the version (a string).
            failures = []
            for call in (lambda: store.claim_once("extauthz:otk:used", "fingerprint-b", 60, now, 10),
                         store.revocation_version, store.revocation_entries):
                try:
                    call()
                except StoreError as exc:
                    failures.append(type(exc).__name__)
        claims = [store.claim_once(f"extauthz:otk:new-{index}", "fingerprint-c", 60, now, 10)
                  for index in range(TOKENS_AFTER_FREEZE)]
        replays = [store.claim_once(f"extauthz:otk:new-{index}", "fingerprint-d", 60, now, 10)
                   for index in range(TOKENS_AFTER_FREEZE)]
        version_after = store.revocation_version()
        entries_after = store.revocation_entries()
    finally:
        store.close()

    assert failures == ["StoreError"] * 3
    assert claims == [CLAIMED] * TOKENS_AFTER_FREEZE
    assert replays == [REPLAYED] * TOKENS_AFTER_FREEZE
    assert version_after == version
    assert entries_after == {}


def test_revocation_after_restart(redis_server, config_path, idp):  # noqa: F811
    authorizer, _, config = make_authorizer(config_path)
    store = authorizer.revocations.store
    token = idp.token(sub="alice", iat=int(time.time()) - 5)
    try:
        revoke(store, config, "sub", "bob")
        authorizer.revocations.sync()
        redis_server.stop()
        # The sync thread fails like this while Redis is down.
        synced_while_down = authorizer.revocations.sync()
        # The restarted Redis has lost every key, so its version counter starts again and the
        # next revocation gets the version that this replica loaded before.
        redis_server.start()
        revoke(store, config, "sub", "alice")
        authorizer.revocations.sync()
        decision = authorizer.check(check_request(path=STANDARD_PATH, token=token))
    finally:
        store.close()
    assert synced_while_down is False
    assert decision.reason == "token_revoked"


def test_readyz_store_state(redis_server, config_path):  # noqa: F811
    with running_service(config_path) as service:
        up = poll_store_state(service, "ok")
        redis_server.stop()
        down = poll_store_state(service, "unavailable")
        jwks_status, _, jwks_body = http_get(service.http_port, "/.well-known/jwks.json")
        redis_server.start()
        back = poll_store_state(service, "ok")

    assert up == "200 ok"
    # The replica can still decide, so it stays ready.
    assert down == "200 unavailable"
    assert jwks_status == 200
    assert len(json.loads(jwks_body)["keys"]) == 2
    assert back == "200 ok"
