"""Revocations: RevocationList.check over MemoryStore and a real Redis, and full Check decisions."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from helpers import ISSUER, check_request, make_authorizer
from redis_servers import redis_server  # noqa: F401
from store_helpers import SENSITIVE_PATH, STANDARD_PATH, end_user, load_store_config, write_store_config

from extauthz.errors import TokenError
from extauthz.revocation import RevocationList, revocation_field, revocation_lifetime, revoke
from extauthz.store import Store, StoreError, open_store

OTHER_ISSUER = "https://other-idp.test"
# The test configuration's only issuer has max_token_lifetime 1h and the default leeway of 30 s.
LIFETIME = 3600.0 + 30.0
MAX_STALENESS = 0.2
# How long a test waits for a copy to go stale, polling every STALE_POLL seconds.
STALE_WAIT = 3.0
STALE_POLL = 0.05


@pytest.fixture(params=["memory", "redis"])
def store_and_config(request, tmp_path, idp) -> Iterator[tuple[Store, object]]:
    if request.param == "memory":
        config = load_store_config(tmp_path, idp)
    else:
        server = request.getfixturevalue("redis_server")
        config = load_store_config(tmp_path, idp, url=server.url)
    store = open_store(config.store)
    try:
        yield store, config
    finally:
        store.close()


@pytest.fixture
def revocations(store_and_config) -> RevocationList:
    store, _ = store_and_config
    return RevocationList(store, max_staleness=1.0)


def add(store_and_config, kind: str, value: str, **options) -> dict:
    store, config = store_and_config
    return revoke(store, config, kind, value, **options)


def reason_of(revocations: RevocationList, user) -> str | None:
    """Sync the copy, check `user` and return the TokenError code, or None when the user passes."""
    revocations.sync()
    try:
        revocations.check(user)
    except TokenError as exc:
        return exc.code
    return None


def test_field_names():
    assert revocation_field("sub", "alice") == "sub:*|alice"
    assert revocation_field("sub", "alice", ISSUER) == f"sub:{ISSUER}|alice"
    assert revocation_field("sid", "s-1") == "sid:s-1"
    assert revocation_field("jti", "j-1") == "jti:j-1"


@pytest.mark.parametrize(("kind", "value"), [("uid", "alice"), ("sub", "")])
def test_field_invalid(kind, value):
    with pytest.raises(ValueError):
        revocation_field(kind, value)


def test_lifetime_covers_tokens(tmp_path, idp):
    assert revocation_lifetime(load_store_config(tmp_path, idp)) == LIFETIME


def test_revoke_entry(store_and_config):
    store, _ = store_and_config
    entry = add(store_and_config, "sub", "alice", reason="laptop stolen", now=1000.0)
    assert entry == {"kind": "sub", "value": "alice", "issuer": "*", "revoked_at": 1000.0,
                     "expires_at": 1000.0 + LIFETIME, "reason": "laptop stolen"}
    assert store.revocation_entries() == {"sub:*|alice": entry}


def test_subject_old_token_revoked(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", now=now)
    assert reason_of(revocations, end_user(issued_at=now - 10)) == "token_revoked"


def test_subject_new_token_accepted(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", now=now)
    assert reason_of(revocations, end_user(issued_at=now + 1)) is None


def test_subject_auth_time_used(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", now=now)
    assert reason_of(revocations, end_user(issued_at=None, auth_time=now - 10)) == "token_revoked"
    assert reason_of(revocations, end_user(issued_at=None, auth_time=now + 1)) is None


def test_subject_undated_token_revoked(store_and_config, revocations):
    add(store_and_config, "sub", "alice")
    assert reason_of(revocations, end_user(issued_at=None, auth_time=None)) == "token_revoked"


def test_other_subject_accepted(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", now=now)
    assert reason_of(revocations, end_user(subject="bob", issued_at=now - 10)) is None


def test_issuer_revocation_scoped(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", issuer=ISSUER, now=now)
    assert reason_of(revocations, end_user(issued_at=now - 10)) == "token_revoked"
    assert reason_of(revocations, end_user(issuer=OTHER_ISSUER, issued_at=now - 10)) is None


def test_any_issuer_revocation(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", now=now)
    assert reason_of(revocations, end_user(issued_at=now - 10)) == "token_revoked"
    assert reason_of(revocations, end_user(issuer=OTHER_ISSUER, issued_at=now - 10)) == "token_revoked"


def test_later_subject_revocation_wins(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sub", "alice", issuer=ISSUER, now=now - 100)
    add(store_and_config, "sub", "alice", now=now)
    assert reason_of(revocations, end_user(issued_at=now - 50)) == "token_revoked"


def test_session_revoked(store_and_config, revocations):
    now = time.time()
    add(store_and_config, "sid", "s-1", now=now)
    # A sid revocation covers tokens issued after it too.
    assert reason_of(revocations, end_user(session_id="s-1", issued_at=now + 5)) == "token_revoked"
    assert reason_of(revocations, end_user(session_id="s-2")) is None


def test_token_id_revoked(store_and_config, revocations):
    add(store_and_config, "jti", "j-1")
    assert reason_of(revocations, end_user(token_id="j-1")) == "token_revoked"
    assert reason_of(revocations, end_user(token_id="j-2")) is None


def test_expired_entry_ignored(store_and_config, revocations):
    long_ago = time.time() - LIFETIME - 10
    add(store_and_config, "sid", "s-1", now=long_ago)
    assert reason_of(revocations, end_user(session_id="s-1")) is None


def test_entry_expires_in_copy(store_and_config):
    store, _ = store_and_config
    clock = [time.time()]
    revocations = RevocationList(store, max_staleness=1.0, clock=lambda: clock[0])
    add(store_and_config, "sid", "s-1", now=clock[0])
    assert reason_of(revocations, end_user(session_id="s-1")) == "token_revoked"
    # Nothing changes in the store, but the entry loaded earlier has now expired.
    clock[0] += LIFETIME + 1
    assert reason_of(revocations, end_user(session_id="s-1")) is None


def test_cleared_revocation_lifted(store_and_config, revocations):
    store, _ = store_and_config
    add(store_and_config, "jti", "j-1")
    assert reason_of(revocations, end_user(token_id="j-1")) == "token_revoked"
    store.remove_revocations(None)
    assert reason_of(revocations, end_user(token_id="j-1")) is None


def test_memory_copy_always_fresh(tmp_path, idp):
    revocations = RevocationList(open_store(load_store_config(tmp_path, idp).store), max_staleness=0.1)
    # A memory store is read directly on every check, so it never needs a sync.
    revocations.check(end_user())
    assert revocations.fresh


def redis_revocations(redis_server, tmp_path, idp) -> tuple[RevocationList, Store]:  # noqa: F811
    store = open_store(load_store_config(tmp_path, idp, url=redis_server.url).store)
    return RevocationList(store, max_staleness=MAX_STALENESS), store


def test_unsynced_copy_raises(redis_server, tmp_path, idp):  # noqa: F811
    revocations, store = redis_revocations(redis_server, tmp_path, idp)
    try:
        with pytest.raises(StoreError):
            revocations.check(end_user())
    finally:
        store.close()


def test_copy_needs_sync(redis_server, tmp_path, idp):  # noqa: F811
    revocations, store = redis_revocations(redis_server, tmp_path, idp)
    config = load_store_config(tmp_path, idp, url=redis_server.url)
    try:
        revocations.sync()
        revoke(store, config, "jti", "j-1")
        unsynced_passes = revocations.check(end_user(token_id="j-1")) is None
        revocations.sync()
        with pytest.raises(TokenError, match="token_revoked"):
            revocations.check(end_user(token_id="j-1"))
    finally:
        store.close()
    assert unsynced_passes


def test_stale_copy_raises(redis_server, tmp_path, idp):  # noqa: F811
    revocations, store = redis_revocations(redis_server, tmp_path, idp)
    try:
        assert revocations.sync()
        redis_server.stop()
        # Within max_staleness the copy is still used.
        revocations.check(end_user())
        time.sleep(MAX_STALENESS + 0.05)
        assert not revocations.sync()
        with pytest.raises(StoreError, match="max_staleness"):
            revocations.check(end_user())
    finally:
        store.close()


def test_copy_fresh_again_after_restart(redis_server, tmp_path, idp):  # noqa: F811
    revocations, store = redis_revocations(redis_server, tmp_path, idp)
    try:
        revocations.sync()
        redis_server.stop()
        time.sleep(MAX_STALENESS + 0.05)
        stale = not revocations.fresh
        redis_server.start()
        assert revocations.sync()
        revocations.check(end_user())
    finally:
        store.close()
    assert stale


@pytest.fixture
def redis_authorizer(redis_server, tmp_path, idp):  # noqa: F811
    config_path = write_store_config(tmp_path, idp, {"url": redis_server.url, "max_staleness": "200ms"})
    authorizer, decision_log, config = make_authorizer(config_path)
    authorizer.revocations.sync()
    try:
        yield authorizer, decision_log, config
    finally:
        authorizer.revocations.store.close()


def test_revoked_decision(redis_authorizer, idp):
    authorizer, decision_log, config = redis_authorizer
    now = time.time()
    token = idp.token(iat=int(now) - 10)
    revoke(authorizer.revocations.store, config, "sub", "alice", now=now)
    authorizer.revocations.sync()
    decision = authorizer.check(check_request(path=STANDARD_PATH, token=token))
    assert decision.status == 401
    assert decision.reason == "token_revoked"
    assert decision_log.records()[-1]["reason"] == "token_revoked"


def test_cached_token_revoked(redis_authorizer, idp):
    authorizer, _, config = redis_authorizer
    now = time.time()
    token = idp.token(iat=int(now) - 10, sid="s-7")
    first = authorizer.check(check_request(path=SENSITIVE_PATH, token=token))
    revoke(authorizer.revocations.store, config, "sid", "s-7", now=now)
    authorizer.revocations.sync()
    second = authorizer.check(check_request(path=SENSITIVE_PATH, token=token))
    assert first.reason == "allowed"
    assert second.reason == "token_revoked"


def test_new_login_allowed(redis_authorizer, idp):
    authorizer, _, config = redis_authorizer
    now = time.time()
    revoke(authorizer.revocations.store, config, "sub", "alice", now=now)
    authorizer.revocations.sync()
    token = idp.token(iat=int(now) + 1)
    decision = authorizer.check(check_request(path=SENSITIVE_PATH, token=token))
    assert decision.reason == "allowed"


def test_stale_decision_unavailable(redis_authorizer, redis_server, idp):  # noqa: F811
    authorizer, _, _ = redis_authorizer
    token = idp.token()
    redis_server.stop()
    decision = None
    deadline = time.monotonic() + STALE_WAIT
    while time.monotonic() < deadline:
        decision = authorizer.check(check_request(path=SENSITIVE_PATH, token=token))
        if decision.reason != "allowed":
            break
        time.sleep(STALE_POLL)
    assert decision is not None
    assert decision.status == 503
    assert decision.reason == "state_unavailable"
