"""The Redis store over TLS (`rediss://`), against a real redis-server with a TLS port."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis
from helpers import free_port
from redis_servers import redis_binary
from test_jwks import TestCA

from extauthz.config import StoreConfig
from extauthz.redis_store import RedisStore
from extauthz.store import CLAIMED, REPLAYED, StoreError

START_TIMEOUT = 10.0


def store_config(port: int, ca_file) -> StoreConfig:
    return StoreConfig(url=f"rediss://127.0.0.1:{port}/0", cluster=False, key_prefix="tls-test:", timeout=0.2,
                       retries=1, on_error="deny", max_staleness=1.0, password_env=None, tls_ca_file=ca_file)


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that listens only on a TLS port, with a certificate for 127.0.0.1."""
    ca = TestCA(tmp_path)
    port = free_port()
    command = [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
               "--tls-cert-file", str(ca.cert_file), "--tls-key-file", str(ca.key_file),
               "--tls-ca-cert-file", str(ca.ca_file), "--tls-auth-clients", "no",
               "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca.ca_file),
                             socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"redis-server exited; see {tmp_path / 'redis.log'}"
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not answer over TLS in time"
                time.sleep(0.05)
        client.close()
        yield port, ca
    finally:
        process.kill()
        process.wait(timeout=10)


def test_tls_store_claims(tls_redis):
    port, ca = tls_redis
    store = RedisStore(store_config(port, ca.ca_file))
    try:
        first = store.claim_once("tls-test:otk:a", "request-1", 30.0, time.time(), 10.0)
        second = store.claim_once("tls-test:otk:a", "request-2", 30.0, time.time(), 10.0)
    finally:
        store.close()
    assert first == CLAIMED
    assert second == REPLAYED


def test_tls_store_rejects_unknown_ca(tls_redis, tmp_path):
    port, _ = tls_redis
    (tmp_path / "other").mkdir()
    other_ca = TestCA(tmp_path / "other")
    store = RedisStore(store_config(port, other_ca.ca_file))
    try:
        with pytest.raises(StoreError):
            store.ping()
    finally:
        store.close()
