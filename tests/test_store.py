"""The Store contract, for MemoryStore and for RedisStore on a real redis-server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from redis_servers import RedisServer, redis_server  # noqa: F401
from store_helpers import PasswordRedisServer, load_store_config, store_config

from extauthz.key_sharing import KeyDirectory
from extauthz.keys import KeyRing
from extauthz.redis_store import RedisStore
from extauthz.store import CLAIMED, REPLAYED, RETRY, KeyNames, MemoryStore, Store, StoreError, open_store

PREFIX = "extauthz:"
FINGERPRINT = "fingerprint-a"
OTHER_FINGERPRINT = "fingerprint-b"
TTL = 60.0
RETRY_WINDOW = 10.0
# A claim short enough to wait out in a test, and how long the test waits for it to expire.
SHORT_TTL = 0.2
SHORT_TTL_WAIT = 0.35
# An unreachable Redis must fail fast: 50 ms x 2 attempts, plus slack for a loaded test machine.
UNREACHABLE_BOUND = 2.0
PASSWORD = "s3cret-test-password-7f1d"
PASSWORD_ENV = "EXTAUTHZ_TEST_REDIS_PASSWORD"


def revocation_entry(value: str, now: float, lifetime: float = 3600.0) -> dict:
    return {"kind": "sub", "value": value, "issuer": "*", "revoked_at": now, "expires_at": now + lifetime,
            "reason": ""}


def jwk(kid: str) -> dict:
    return {"kid": kid, "kty": "EC", "crv": "P-256", "x": f"x-{kid}", "y": f"y-{kid}", "alg": "ES256", "use": "sig"}


@pytest.fixture
def redis_store(redis_server, tmp_path, idp) -> Iterator[RedisStore]:  # noqa: F811
    store = RedisStore(store_config(tmp_path, idp, url=redis_server.url))
    try:
        yield store
    finally:
        store.close()


def test_open_store_memory(tmp_path, idp):
    assert isinstance(open_store(store_config(tmp_path, idp)), MemoryStore)


def test_open_store_redis(tmp_path, idp):
    # Connecting is lazy, so this needs no server on the port.
    store = open_store(store_config(tmp_path, idp, url="redis://127.0.0.1:1/0"))
    assert isinstance(store, RedisStore)


def test_claim_first_use(store):
    now = time.time()
    assert store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW) == CLAIMED


def test_claim_retry_same_fingerprint(store):
    now = time.time()
    store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW)
    assert store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now + 5, RETRY_WINDOW) == RETRY


def test_claim_retry_at_window_edge(store):
    now = time.time()
    store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW)
    assert store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now + RETRY_WINDOW, RETRY_WINDOW) == RETRY


def test_claim_other_fingerprint_replayed(store):
    now = time.time()
    store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW)
    assert store.claim_once("extauthz:otk:a", OTHER_FINGERPRINT, TTL, now + 1, RETRY_WINDOW) == REPLAYED


def test_claim_after_window_replayed(store):
    now = time.time()
    store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW)
    late = now + RETRY_WINDOW + 1
    assert store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, late, RETRY_WINDOW) == REPLAYED


def test_claim_keys_independent(store):
    now = time.time()
    store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW)
    assert store.claim_once("extauthz:otk:b", OTHER_FINGERPRINT, TTL, now, RETRY_WINDOW) == CLAIMED


def test_claim_expires_after_ttl(store):
    store.claim_once("extauthz:otk:a", FINGERPRINT, SHORT_TTL, time.time(), RETRY_WINDOW)
    # Redis expires the key on its own clock, so the test waits in real time for both stores.
    time.sleep(SHORT_TTL_WAIT)
    assert store.claim_once("extauthz:otk:a", OTHER_FINGERPRINT, TTL, time.time(), RETRY_WINDOW) == CLAIMED


def test_claim_alive_before_ttl(store):
    now = time.time()
    store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW)
    assert store.claim_once("extauthz:otk:a", OTHER_FINGERPRINT, TTL, now + 1, RETRY_WINDOW) == REPLAYED


def test_claim_redis_key(redis_store, redis_server):  # noqa: F811
    key = KeyNames(PREFIX).one_time("d1gest")
    now = time.time()
    redis_store.claim_once(key, FINGERPRINT, TTL, now, RETRY_WINDOW)
    client = redis_server.client()
    try:
        value = client.get("extauthz:otk:d1gest")
        ttl_ms = client.pttl("extauthz:otk:d1gest")
    finally:
        client.close()
    assert value == f"{FINGERPRINT}|{int(now * 1000)}".encode()
    assert 0 < ttl_ms <= TTL * 1000


def test_revocation_version_changes(store):
    now = time.time()
    versions = [store.revocation_version()]
    store.add_revocation("sub:*|alice", revocation_entry("alice", now), now)
    versions.append(store.revocation_version())
    store.add_revocation("sub:*|bob", revocation_entry("bob", now), now)
    versions.append(store.revocation_version())
    store.remove_revocations("sub:*|bob")
    versions.append(store.revocation_version())
    store.remove_revocations(None)
    versions.append(store.revocation_version())
    assert len(set(versions)) == len(versions), f"repeated version in {versions}"


def test_revocation_version_stable(store):
    now = time.time()
    store.add_revocation("sub:*|alice", revocation_entry("alice", now), now)
    assert store.revocation_version() == store.revocation_version()


def test_revocation_entries(store):
    now = time.time()
    alice = revocation_entry("alice", now)
    session = {"kind": "sid", "value": "s-1", "issuer": "*", "revoked_at": now, "expires_at": now + 60,
               "reason": "laptop stolen"}
    store.add_revocation("sub:*|alice", alice, now)
    store.add_revocation("sid:s-1", session, now)
    assert store.revocation_entries() == {"sub:*|alice": alice, "sid:s-1": session}


def test_revocation_overwrites_field(store):
    now = time.time()
    store.add_revocation("sub:*|alice", revocation_entry("alice", now), now)
    newer = revocation_entry("alice", now + 5)
    store.add_revocation("sub:*|alice", newer, now + 5)
    assert store.revocation_entries() == {"sub:*|alice": newer}


def test_expired_entries_kept_until_add(store):
    now = time.time()
    store.add_revocation("sub:*|alice", revocation_entry("alice", now, lifetime=10), now)
    # The contract returns expired entries too, and readers filter them by expires_at.
    assert "sub:*|alice" in store.revocation_entries()


def test_expired_entries_dropped_on_add(store):
    now = time.time()
    store.add_revocation("sub:*|alice", revocation_entry("alice", now, lifetime=10), now)
    store.add_revocation("sub:*|carol", revocation_entry("carol", now, lifetime=100), now)
    later = now + 20
    bob = revocation_entry("bob", later)
    store.add_revocation("sub:*|bob", bob, later)
    assert set(store.revocation_entries()) == {"sub:*|carol", "sub:*|bob"}


def test_remove_one_revocation(store):
    now = time.time()
    store.add_revocation("sub:*|alice", revocation_entry("alice", now), now)
    store.add_revocation("sub:*|bob", revocation_entry("bob", now), now)
    assert store.remove_revocations("sub:*|alice") == 1
    assert set(store.revocation_entries()) == {"sub:*|bob"}


def test_remove_missing_revocation(store):
    assert store.remove_revocations("sub:*|nobody") == 0


def test_remove_all_revocations(store):
    now = time.time()
    for name in ("alice", "bob", "carol"):
        store.add_revocation(f"sub:*|{name}", revocation_entry(name, now), now)
    assert store.remove_revocations(None) == 3
    assert store.revocation_entries() == {}


def test_revocation_redis_keys(redis_store, redis_server):  # noqa: F811
    now = time.time()
    alice = revocation_entry("alice", now)
    redis_store.add_revocation("sub:*|alice", alice, now)
    client = redis_server.client()
    try:
        stored = client.hget("extauthz:{revocations}:entries", "sub:*|alice")
        version = client.get("extauthz:{revocations}:version")
    finally:
        client.close()
    assert json.loads(stored) == alice
    assert int(version) == redis_store.revocation_version()


def test_publish_two_replicas(store):
    now = time.time()
    store.publish_keys("replica-a", [jwk("a1"), jwk("a2")], TTL, now)
    store.publish_keys("replica-b", [jwk("b1")], TTL, now)
    kids = sorted(key["kid"] for key in store.published_keys(now + 1))
    assert kids == ["a1", "a2", "b1"]


def test_published_keys_expire(store):
    now = time.time()
    store.publish_keys("replica-a", [jwk("a1")], 20.0, now)
    store.publish_keys("replica-b", [jwk("b1")], TTL, now)
    kids = [key["kid"] for key in store.published_keys(now + 30)]
    assert kids == ["b1"]


def test_publish_replaces_keys(store):
    now = time.time()
    store.publish_keys("replica-a", [jwk("a1")], TTL, now)
    store.publish_keys("replica-a", [jwk("a2")], TTL, now + 1)
    kids = [key["kid"] for key in store.published_keys(now + 2)]
    assert kids == ["a2"]


def test_published_keys_are_copies(store):
    now = time.time()
    keys = [jwk("a1")]
    store.publish_keys("replica-a", keys, TTL, now)
    keys[0]["kid"] = "changed"
    assert store.published_keys(now)[0]["kid"] == "a1"


def test_publish_redis_keys(redis_store, redis_server):  # noqa: F811
    now = time.time()
    redis_store.publish_keys("replica-a", [jwk("a1")], TTL, now)
    client = redis_server.client()
    try:
        expiry_ms = client.zscore("extauthz:{jwks}:index", "replica-a")
        listed = client.get("extauthz:{jwks}:replica:replica-a")
    finally:
        client.close()
    assert expiry_ms == int(now * 1000) + int(TTL * 1000)
    assert json.loads(listed) == [jwk("a1")]


def test_key_prefix_applied(redis_server, tmp_path, idp):  # noqa: F811
    store = RedisStore(store_config(tmp_path, idp, url=redis_server.url, key_prefix="team-a:"))
    try:
        now = time.time()
        store.add_revocation("sub:*|alice", revocation_entry("alice", now), now)
        store.publish_keys("replica-a", [jwk("a1")], TTL, now)
    finally:
        store.close()
    client = redis_server.client()
    try:
        names = sorted(name.decode() for name in client.keys("*"))
    finally:
        client.close()
    assert names == ["team-a:{jwks}:index", "team-a:{jwks}:replica:replica-a",
                     "team-a:{revocations}:entries", "team-a:{revocations}:version"]


def test_ping(store):
    store.ping()


def unreachable_calls(store: RedisStore) -> dict:
    now = time.time()
    return {
        "ping": store.ping,
        "claim_once": lambda: store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, now, RETRY_WINDOW),
        "add_revocation": lambda: store.add_revocation("sub:*|alice", revocation_entry("alice", now), now),
        "remove_revocations": lambda: store.remove_revocations(None),
        "revocation_version": store.revocation_version,
        "revocation_entries": store.revocation_entries,
        "publish_keys": lambda: store.publish_keys("replica-a", [jwk("a1")], TTL, now),
        "published_keys": lambda: store.published_keys(now),
    }


@pytest.mark.parametrize("operation", ["ping", "claim_once", "add_revocation", "remove_revocations",
                                       "revocation_version", "revocation_entries", "publish_keys",
                                       "published_keys"])
def test_redis_down_raises_fast(tmp_path, idp, monkeypatch, operation):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    # A free port with no listener, so the connection is refused.
    url = RedisServer(tmp_path / "absent").url
    store = RedisStore(store_config(tmp_path, idp, url=url, password_env=PASSWORD_ENV))
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            unreachable_calls(store)[operation]()
        elapsed = time.monotonic() - started
    finally:
        store.close()
    assert elapsed < UNREACHABLE_BOUND
    assert PASSWORD not in str(caught.value)


def test_wrong_password_hidden(tmp_path, idp, monkeypatch):
    server = PasswordRedisServer(tmp_path / "redis-auth", "the-right-password")
    try:
        server.start()
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
        store = RedisStore(store_config(tmp_path, idp, url=server.url, password_env=PASSWORD_ENV))
        try:
            with pytest.raises(StoreError) as caught:
                store.ping()
        finally:
            store.close()
    finally:
        server.stop()
    assert PASSWORD not in str(caught.value)
    assert "ping failed" in str(caught.value)


def test_right_password_works(tmp_path, idp, monkeypatch):
    server = PasswordRedisServer(tmp_path / "redis-auth", PASSWORD)
    try:
        server.start()
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
        store = RedisStore(store_config(tmp_path, idp, url=server.url, password_env=PASSWORD_ENV))
        try:
            result = store.claim_once("extauthz:otk:a", FINGERPRINT, TTL, time.time(), RETRY_WINDOW)
        finally:
            store.close()
    finally:
        server.stop()
    assert result == CLAIMED


def test_password_env_unset(tmp_path, idp, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    config = store_config(tmp_path, idp, url="redis://127.0.0.1:1/0", password_env=PASSWORD_ENV)
    with pytest.raises(StoreError, match=PASSWORD_ENV):
        RedisStore(config)


def key_directory(store: Store, tmp_path, idp) -> KeyDirectory:
    config = load_store_config(tmp_path, idp)
    return KeyDirectory(store, KeyRing(config.token.signing, config.token.ttl))


def served_kids(directory: KeyDirectory) -> set[str]:
    return {key["kid"] for key in json.loads(directory.jwks())["keys"]}


def test_key_directory_union(redis_store, tmp_path, idp):
    first = key_directory(redis_store, tmp_path, idp)
    second = key_directory(redis_store, tmp_path, idp)
    first.sync()
    second.sync()
    first.sync()
    own = {key["kid"] for key in first.key_ring.public_keys()}
    other = {key["kid"] for key in second.key_ring.public_keys()}
    assert served_kids(first) == own | other
    assert served_kids(second) == own | other


def test_key_directory_skips_private_keys(redis_store, tmp_path, idp):
    directory = key_directory(redis_store, tmp_path, idp)
    private = {**jwk("forged"), "d": "private-part"}
    redis_store.publish_keys("intruder", [private, {**jwk("encryption"), "use": "enc"}, {"kty": "EC"}], TTL,
                             time.time())
    directory.sync()
    assert served_kids(directory) == {key["kid"] for key in directory.key_ring.public_keys()}


def test_key_directory_keeps_union(redis_store, redis_server, tmp_path, idp):  # noqa: F811
    first = key_directory(redis_store, tmp_path, idp)
    second = key_directory(redis_store, tmp_path, idp)
    second.sync()
    first.sync()
    union = served_kids(first)
    redis_server.stop()
    synced = first.sync()
    assert synced is False
    # The union read last is still served while the store is down.
    assert served_kids(first) == union


def test_key_directory_memory_own_keys(tmp_path, idp):
    directory = key_directory(MemoryStore(), tmp_path, idp)
    assert directory.enabled is False
    assert served_kids(directory) == {key["kid"] for key in directory.key_ring.public_keys()}
