"""Helpers for the shared-store tests: a one-time-token policy, store configurations and end users."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import redis
from helpers import AUDIENCE, ISSUER, POLICIES, TestIdP, check_request, write_config
from redis_servers import START_TIMEOUT, RedisServer

from extauthz.config import Config, StoreConfig, load_config
from extauthz.identity import EndUser
from extauthz.request import HttpRequest, from_check_request

# The test policies plus a route that accepts each end-user token once.
ONE_TIME_POLICIES = POLICIES + """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: pay-once
  namespace: shop
  annotations:
    extauthz.io/one-time-token: "true"
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation:
        paths: ["/pay/*"]
"""
ONE_TIME_PATH = "/pay/orders"
SENSITIVE_PATH = "/admin"
STANDARD_PATH = "/public/items"


def write_store_config(folder: Path, idp: TestIdP, store: dict[str, Any] | None = None,
                       overrides: dict[str, Any] | None = None) -> Path:
    """Write a configuration with the one-time route and the given `store:` section, and return its path."""
    all_overrides = {"store": store or {}, **(overrides or {})}
    return write_config(folder, idp, policies=ONE_TIME_POLICIES, overrides=all_overrides)


def load_store_config(folder: Path, idp: TestIdP, **store: Any) -> Config:
    return load_config(write_store_config(folder, idp, store))


def store_config(folder: Path, idp: TestIdP, **store: Any) -> StoreConfig:
    """Return the StoreConfig that a config file with this `store:` section loads to."""
    return load_store_config(folder, idp, **store).store


def end_user(**overrides: Any) -> EndUser:
    """Build the verified claims of a token issued now by the test IdP to alice."""
    now = time.time()
    user = EndUser(issuer=ISSUER, subject="alice", audiences=(AUDIENCE,), presenter="", expires_at=now + 600,
                   not_before=None, issued_at=now, auth_time=now - 30, acr=None, amr=(), session_id=None,
                   token_id=f"jti-{time.monotonic_ns()}", kid=None, claims={})
    return dataclasses.replace(user, **overrides)


def http_request(**overrides: Any) -> HttpRequest:
    """Normalise a CheckRequest built by helpers.check_request with these keyword arguments."""
    return from_check_request(check_request(**overrides), 4096)


class PasswordRedisServer(RedisServer):
    """A RedisServer that demands `password`.

    RedisServer.wait_ready connects without a password, which such a server rejects until the deadline.
    """

    def __init__(self, folder: Path, password: str):
        super().__init__(folder, extra=["--requirepass", password])
        self.password = password

    def wait_ready(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

