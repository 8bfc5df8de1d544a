"""RedisStore through Redis Sentinel and Redis Cluster, against real redis-server processes.

Each store comes from a configuration file's `store:` section, as `extauthz serve` builds it:
`redis+sentinel://127.0.0.1:PORT/mymaster/0` for Sentinel, and `cluster: true` with the URL of one
node for Cluster. The Sentinel and Cluster deployments are shared by the tests of this module, and
each test writes under its own key prefix.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from helpers import write_config
from redis_servers import RedisServer
from redis_topologies import RedisClusterNodes, SentinelProcess, replication_info, start_replica, wait_until

from extauthz.config import load_config
from extauthz.keys import generate_private_key, public_jwk
from extauthz.redis_store import RedisStore
from extauthz.store import CLAIMED, REPLAYED, RETRY, StoreError

RETRY_WINDOW = 10.0
FAILOVER_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    """A master and one sentinel that monitors it, with no replica."""
    folder = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(folder / "master").start()
    watcher = SentinelProcess(folder / "sentinel", master)
    try:
        watcher.start()
        yield watcher
    finally:
        watcher.stop()
        master.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def open_redis_store(folder, idp, url: str, *, cluster: bool = False, key_prefix: str | None = None) -> RedisStore:
    """Build the store that a configuration file with this `store:` section selects."""
    section = {"url": url, "cluster": cluster, "key_prefix": key_prefix or f"test-{uuid.uuid4().hex[:12]}:",
               "timeout": "100ms", "retries": 1}
    config = load_config(write_config(folder, idp, overrides={"store": section}))
    return RedisStore(config.store)


@pytest.fixture(params=["sentinel", "cluster"])
def store(request, tmp_path, idp):
    if request.param == "sentinel":
        url = request.getfixturevalue("sentinel").url()
        opened = open_redis_store(tmp_path, idp, url)
    else:
        url = request.getfixturevalue("cluster").url
        opened = open_redis_store(tmp_path, idp, url, cluster=True)
    try:
        yield opened
    finally:
        opened.close()


def revocation_entry(value: str, now: float, lifetime: float) -> dict:
    return {"kind": "jti", "value": value, "issuer": "*", "revoked_at": now, "expires_at": now + lifetime,
            "reason": "test"}


def test_claim_once(store):
    now = time.time()
    key = store.keys.one_time(hashlib.sha256(b"claim").hexdigest())

    assert store.claim_once(key, "request-1", 60, now, RETRY_WINDOW) == CLAIMED
    assert store.claim_once(key, "request-1", 60, now + 1, RETRY_WINDOW) == RETRY
    assert store.claim_once(key, "request-2", 60, now + 1, RETRY_WINDOW) == REPLAYED
    assert store.claim_once(key, "request-1", 60, now + RETRY_WINDOW + 1, RETRY_WINDOW) == REPLAYED


def test_claim_expires(store):
    now = time.time()
    key = store.keys.one_time(hashlib.sha256(b"expiry").hexdigest())

    assert store.claim_once(key, "request-1", 0.2, now, RETRY_WINDOW) == CLAIMED
    time.sleep(0.3)
    assert store.claim_once(key, "request-2", 0.2, time.time(), RETRY_WINDOW) == CLAIMED


def test_revocations(store):
    now = time.time()
    old = revocation_entry("old", now, 1)
    new = revocation_entry("new", now, 3600)
    # The store promises only that the version changes with every change, not how it counts.
    versions = [store.revocation_version()]

    store.add_revocation("jti:old", old, now)
    versions.append(store.revocation_version())
    # The revocation script deletes expired entries while it adds one, so adding "new" at now + 2 also
    # drops "old", which expired at now + 1. The script writes both keys that share the {revocations} hash tag.
    store.add_revocation("jti:new", new, now + 2)
    versions.append(store.revocation_version())

    assert store.revocation_entries() == {"jti:new": new}
    assert store.remove_revocations("jti:new") == 1
    assert store.revocation_entries() == {}
    versions.append(store.revocation_version())
    assert len(set(versions)) == 4


def test_published_keys(store):
    now = time.time()
    lasting = public_jwk(generate_private_key("ES256"), "ES256")
    brief = public_jwk(generate_private_key("ES256"), "ES256")

    store.publish_keys("replica-a", [lasting], 60, now)
    store.publish_keys("replica-b", [brief], 1, now)

    assert sorted(key["kid"] for key in store.published_keys(now)) == sorted([lasting["kid"], brief["kid"]])
    assert store.published_keys(now + 2) == [lasting]


def test_cluster_routes_claims(cluster, tmp_path, idp):
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    store = open_redis_store(tmp_path, idp, cluster.url, cluster=True, key_prefix=prefix)
    now = time.time()
    try:
        # One-time claim keys carry no hash tag, so these 30 spread over every node's slots.
        results = [store.claim_once(store.keys.one_time(hashlib.sha256(str(index).encode()).hexdigest()),
                                    "request-1", 60, now, RETRY_WINDOW) for index in range(30)]
    finally:
        store.close()

    assert results == [CLAIMED] * 30
    assert all(count > 0 for count in cluster.keys_per_node(f"{prefix}otk:*"))


def test_sentinel_failover(tmp_path, idp):
    """A claim and a revocation written before the master dies are still there after Sentinel promotes
    the replica, and the same store object writes to the new master."""
    master = RedisServer(tmp_path / "master").start()
    replica = None
    watcher = None
    store = None
    try:
        replica = start_replica(tmp_path / "replica", master)
        watcher = SentinelProcess(tmp_path / "sentinel", master).start()
        wait_until(lambda: watcher.replica_count() == 1, 10, "the sentinel did not discover the replica")
        store = open_redis_store(tmp_path, idp, watcher.url())
        now = time.time()
        claimed_key = store.keys.one_time(hashlib.sha256(b"before").hexdigest())
        entry = revocation_entry("before", now, 3600)

        assert store.claim_once(claimed_key, "request-1", 60, now, RETRY_WINDOW) == CLAIMED
        store.add_revocation("jti:before", entry, now)
        # Replication is asynchronous, so wait until the replica has acknowledged every write before the master dies.
        master_client = master.client()
        try:
            assert master_client.wait(1, 5000) == 1
        finally:
            master_client.close()

        master.stop()
        wait_until(lambda: watcher.master_port() == replica.port, FAILOVER_TIMEOUT,
                   "the sentinel did not promote the replica")
        wait_until(lambda: store.ping() is None, 5, "the store did not reach the promoted master",
                   errors=(StoreError,))

        assert store.claim_once(claimed_key, "request-2", 60, time.time(), RETRY_WINDOW) == REPLAYED
        assert store.revocation_entries() == {"jti:before": entry}
        after_key = store.keys.one_time(hashlib.sha256(b"after").hexdigest())
        assert store.claim_once(after_key, "request-3", 60, time.time(), RETRY_WINDOW) == CLAIMED
        assert replication_info(replica)["role"] == "master"
    finally:
        if store is not None:
            store.close()
        if watcher is not None:
            watcher.stop()
        if replica is not None:
            replica.stop()
        master.stop()

