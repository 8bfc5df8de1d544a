"""The Redis store: standalone (`redis://`, `rediss://`), Sentinel (`redis+sentinel://`) or Cluster.

Every command has a deadline (`store.timeout`, used as the socket timeout) and at most
`store.retries` retries with exponential backoff, so one operation takes at most about
timeout x (retries + 1) plus a few milliseconds of backoff. redis-py drops a connection whose command
timed out, so a late reply can never be read as the reply to a later command. Each state change is
one command or one Lua script, documented where it is defined.

Sentinel URLs name the sentinels, the master's service name and the database:
`redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster/0`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from extauthz.config import StoreConfig
from extauthz.store import CLAIMED, REPLAYED, RETRY, KeyNames, StoreError

log = logging.getLogger(__name__)

# KEYS[1]: the claim key. ARGV[1]: request fingerprint, ARGV[2]: TTL in ms, ARGV[3]: now in ms,
# ARGV[4]: retry window in ms. Stores "FINGERPRINT|CLAIMED_AT_MS" with the TTL when the key is free.
# Returns 1 when this call claimed the key, 2 when the same fingerprint claimed it within the retry
# window, 0 otherwise.
CLAIM_SCRIPT = """
local existing = redis.call('GET', KEYS[1])
if not existing then
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[2])
  return 1
end
local separator = string.find(existing, '|', 1, true)
if separator then
  local fingerprint = string.sub(existing, 1, separator - 1)
  local claimed_at = tonumber(string.sub(existing, separator + 1))
  if fingerprint == ARGV[1] and claimed_at and tonumber(ARGV[3]) - claimed_at <= tonumber(ARGV[4]) then
    return 2
  end
end
return 0
"""

# KEYS[1]: revocation entries hash, KEYS[2]: version counter. ARGV[1]: field, ARGV[2]: JSON entry,
# ARGV[3]: now in seconds. Deletes entries whose expires_at has passed, sets the field and
# increments the version. A missing counter starts from the current time in milliseconds, so after a
# Redis lost its data the versions never repeat one that a replica has loaded. Returns the new version.
REVOKE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], math.floor(tonumber(ARGV[3]) * 1000))
end
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ok, entry = pcall(cjson.decode, entries[i + 1])
  if (not ok) or (tonumber(entry['expires_at']) or 0) <= tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCR', KEYS[2])
"""

# KEYS[1]: revocation entries hash, KEYS[2]: version counter. ARGV[1]: field, or empty for all,
# ARGV[2]: now in seconds. Returns how many entries were removed; increments the version, starting a
# missing counter from the current time in milliseconds as REVOKE_SCRIPT does.
UNREVOKE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], math.floor(tonumber(ARGV[2]) * 1000))
end
local removed
if ARGV[1] == '' then
  removed = redis.call('HLEN', KEYS[1])
  redis.call('DEL', KEYS[1])
else
  removed = redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('INCR', KEYS[2])
return removed
"""

# KEYS[1]: JWKS index (sorted set), KEYS[2]: this replica's key list. ARGV[1]: replica id,
# ARGV[2]: JSON list of public JWKs, ARGV[3]: TTL in ms, ARGV[4]: now in ms.
# Stores the list with the TTL, records its expiry in the index and drops expired index entries.
PUBLISH_SCRIPT = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
return 1
"""

# KEYS[1]: JWKS index. ARGV[1]: now in ms, ARGV[2]: replica key prefix. Returns the key lists of
# every replica whose entry has not expired.
READ_KEYS_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local lists = {}
for _, id in ipairs(ids) do
  local value = redis.call('GET', ARGV[2] .. id)
  if value then table.insert(lists, value) end
end
return lists
"""


def _sentinel_client(url: str, options: dict[str, Any]) -> redis.Redis:
    parts = urlsplit(url)
    sentinels = []
    for node in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = node.rpartition(":")
        sentinels.append((host.strip("[]") or "localhost", int(port or 26379)))
    path = [unquote(part) for part in parts.path.split("/") if part]
    if not path:
        raise ValueError("a sentinel URL needs the master's service name: redis+sentinel://HOST:PORT/SERVICE/DB")
    service = path[0]
    database = int(path[1]) if len(path) > 1 else 0
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_timeout": options["socket_timeout"],
                                                    "socket_connect_timeout": options["socket_connect_timeout"]},
                        **options)
    return sentinel.master_for(service, db=database)


def redis_client(config: StoreConfig, timeout: float | None = None,
                 retries: int | None = None) -> redis.Redis | RedisCluster:
    """Return a client for the Redis that store.url names, with the store's password and TLS settings.

    `timeout` and `retries` replace store.timeout and store.retries. Raises StoreError when the
    settings cannot make a client.
    """
    timeout = config.timeout if timeout is None else timeout
    retries = config.retries if retries is None else retries
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=timeout, base=0.002), retries),
        "health_check_interval": 5,
    }
    if config.password_env:
        password = os.environ.get(config.password_env)
        if password is None:
            raise StoreError(f"environment variable {config.password_env} (store.password_env) is not set")
        options["password"] = password
    if config.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(config.tls_ca_file)

    try:
        if config.url.startswith(("redis+sentinel://", "rediss+sentinel://")):
            return _sentinel_client(config.url, options)
        if config.cluster:
            options.pop("health_check_interval")
            return RedisCluster.from_url(config.url, **options)
        return redis.Redis.from_url(config.url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise StoreError(f"cannot set up the Redis client for store.url: {type(exc).__name__}: {exc}") from exc


class RedisStore:
    name = "redis"

    def __init__(self, config: StoreConfig):
        self.config = config
        self.keys = KeyNames(config.key_prefix)
        self.client = redis_client(config)

        self._claim = self.client.register_script(CLAIM_SCRIPT)
        self._revoke = self.client.register_script(REVOKE_SCRIPT)
        self._unrevoke = self.client.register_script(UNREVOKE_SCRIPT)
        self._publish = self.client.register_script(PUBLISH_SCRIPT)
        self._read_keys = self.client.register_script(READ_KEYS_SCRIPT)

    def _run(self, operation: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis {operation} failed: {type(exc).__name__}: {exc}") from exc

    def claim_once(self, key: str, fingerprint: str, ttl: float, now: float, retry_window: float) -> str:
        result = self._run("claim", self._claim, keys=[key],
                           args=[fingerprint, max(1, int(ttl * 1000)), int(now * 1000), int(retry_window * 1000)])
        return {1: CLAIMED, 2: RETRY}.get(int(result), REPLAYED)

    def add_revocation(self, field: str, entry: dict[str, Any], now: float) -> None:
        self._run("revoke", self._revoke, keys=[self.keys.revocation_entries, self.keys.revocation_version],
                  args=[field, json.dumps(entry, separators=(",", ":")), now])

    def remove_revocations(self, field: str | None) -> int:
        return int(self._run("unrevoke", self._unrevoke,
                             keys=[self.keys.revocation_entries, self.keys.revocation_version],
                             args=[field or "", time.time()]))

    def revocation_version(self) -> int:
        value = self._run("revocation version read", self.client.get, self.keys.revocation_version)
        return int(value or 0)

    def revocation_entries(self) -> dict[str, dict[str, Any]]:
        raw = self._run("revocation read", self.client.hgetall, self.keys.revocation_entries)
        entries: dict[str, dict[str, Any]] = {}
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            try:
                entry = json.loads(value)
            except ValueError:
                log.warning("skipping a malformed revocation entry", extra={"field": name})
                continue
            if isinstance(entry, dict):
                entries[name] = entry
        return entries

    def publish_keys(self, replica_id: str, keys: list[dict[str, Any]], ttl: float, now: float) -> None:
        self._run("key publish", self._publish,
                  keys=[self.keys.jwks_index, self.keys.jwks_replica(replica_id)],
                  args=[replica_id, json.dumps(keys, separators=(",", ":")), int(ttl * 1000), int(now * 1000)])

    def published_keys(self, now: float) -> list[dict[str, Any]]:
        lists = self._run("key read", self._read_keys, keys=[self.keys.jwks_index],
                          args=[int(now * 1000), self.keys.jwks_replica("")])
        keys: list[dict[str, Any]] = []
        for value in lists:
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            keys.extend(key for key in parsed if isinstance(key, dict))
        return keys

    def ping(self) -> None:
        self._run("ping", self.client.ping)

    def close(self) -> None:
        try:
            self.client.close()
        except redis.RedisError:
            pass
