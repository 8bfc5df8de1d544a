"""Direct gRPC load benchmark: extauthz's Check against an allow-all grpcio server (the floor).

The script makes everything it needs in a temporary folder: a throwaway IdP key pair, a sensitive
policy, a one-time-token policy and extauthz configurations. It starts `extauthz serve` and an
allow-all grpcio sync server (this same script with --serve-floor), both pinned to one CPU with
taskset, and drives them from a Python gRPC client pinned to another CPU. The Redis scenarios add a
redis-server and a second `extauthz serve` with `store.url` pointing at it, both pinned to the same
server CPU. Every socket is on 127.0.0.1.

Scenarios, measured in this order in every round:

    floor             the allow-all server: the cost of grpcio and of this client alone
    allow-mint        extauthz with one valid end-user token reused for every call, so its verified-token
                      cache hits. Every Check matches the sensitive route and mints a per-request token.
    allow-new-token   allow-mint with a new end-user token on every call, from a pool signed before the
                      round, so every Check verifies an ES256 signature and misses the cache
    allow-mint-redis  allow-mint against the extauthz whose store is Redis: the revocation checks read a
                      local copy that a background thread syncs from Redis
    allow-mint-workers2
                      allow-mint against `extauthz serve --workers 2 --cpu-affinity` with the Redis store,
                      the client's calls going round-robin over both workers' own ports; compared with
                      allow-mint-redis (one worker) of the same round
    step-up-deny      extauthz with a token whose login is older than the route's max age: 401 step-up
    one-time-memory   (only when asked for) the one-time-token route with the memory store. Every call
                      sends a new token from a pool signed before the round, so every Check verifies
                      an ES256 signature and claims the token's jti.
    one-time-redis    (only when asked for) one-time-memory against the extauthz whose store is Redis:
                      every Check runs one claim script on Redis
    floor-aio         (only when asked for) an allow-all grpc.aio server, to compare with the sync floor

Run `python bench/grpc_load.py --help` for the options. docs/benchmarks.md records results.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import jwt
import redis
import yaml
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz.dev_idp import DEV_AUDIENCE, DEV_ISSUER, generate_idp_keys, load_idp_key, sign_user_token
from extauthz.server import worker_path

SCENARIOS = ("floor", "allow-mint", "allow-new-token", "allow-mint-redis", "allow-mint-workers2", "step-up-deny",
             "one-time-memory", "one-time-redis", "floor-aio")
DEFAULT_SCENARIOS = ("floor", "allow-mint", "allow-new-token", "allow-mint-redis", "allow-mint-workers2",
                     "step-up-deny")
REDIS_SCENARIOS = frozenset({"allow-mint-redis", "allow-mint-workers2", "one-time-redis"})
ONE_TIME_SCENARIOS = frozenset({"one-time-memory", "one-time-redis"})
# Scenarios whose every call sends a new end-user token from a pool signed before the round.
NEW_TOKEN_SCENARIOS = ONE_TIME_SCENARIOS | {"allow-new-token"}
# Each Redis scenario and the memory-store scenario that sends the same requests, for the ratio.
MEMORY_COUNTERPARTS = {"allow-mint-redis": "allow-mint", "one-time-redis": "one-time-memory"}
# The several-worker scenario and the one-worker scenario with the same store and requests.
ONE_WORKER_COUNTERPARTS = {"allow-mint-workers2": "allow-mint-redis"}
WORKERS = 2
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
# Ports that a local demo uses, and Redis's default port, which another Redis may use: never bind
# or aim at them.
RESERVED_PORTS = frozenset({6379, 9191, 9192, 9193, 9901, 10000})

TOKEN_ISSUER = "https://extauthz.bench.test"
TOKEN_HEADER = "txn-token"
TOKEN_AUDIENCE = "payments-api"
MFA = "urn:example:acr:mfa"
REAUTH_MAX_AGE_S = 300
FRESH_LOGIN_AGE_S = 30
STALE_LOGIN_AGE_S = 2 * 3600
MAX_PENDING = 256

REQUEST_HOST = "payments.bench.test"
REQUEST_PATH = "/payments/42"
ONE_TIME_PATH = "/transfers/7"
ONE_TIME_AUDIENCE = "transfers-api"
USER_TOKEN_LIFETIME_S = 600
SOURCE_PRINCIPAL = "spiffe://cluster.local/ns/web/sa/frontend"
DESTINATION_PRINCIPAL = "spiffe://cluster.local/ns/bench/sa/payments"

POLICIES = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payments-step-up
  namespace: bench
  annotations:
    extauthz.io/reauth-max-age: {REAUTH_MAX_AGE_S}s
    extauthz.io/acr-values: "{MFA} urn:example:acr:phr"
    extauthz.io/token-audience: {TOKEN_AUDIENCE}
spec:
  action: CUSTOM
  provider:
    name: extauthz
  rules:
    - to:
        - operation:
            paths: ["/payments/*"]
            methods: ["GET", "POST"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: transfers-one-time
  namespace: bench
  annotations:
    extauthz.io/one-time-token: "true"
    extauthz.io/token-audience: {ONE_TIME_AUDIENCE}
spec:
  action: CUSTOM
  provider:
    name: extauthz
  rules:
    - to:
        - operation:
            paths: ["/transfers/*"]
            methods: ["GET", "POST"]
"""

# Channel options for every client channel: no HTTP proxy (all traffic stays on loopback), and one
# TCP connection per channel instead of a subchannel shared by every channel to the same address.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]


class BenchError(Exception):
    """A setup or run failure that ends the benchmark with a message."""


# --- command line ------------------------------------------------------------------------------


def _bounded(kind: Callable[[str], float], low: float, high: float, unit: str) -> Callable[[str], Any]:
    """Return an argparse type that parses with `kind` and rejects values below `low` or above `high`."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}") from exc
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {low:g} to {high:g} {unit}".rstrip())
        return value
    return parse


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        cpus = tuple(int(item) for item in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid CPU list {text!r}: write CPU numbers such as 0,2") from exc
    if len(cpus) != WORKERS or len(set(cpus)) != WORKERS or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"invalid CPU list {text!r}: name {WORKERS} different CPUs, such as 0,2")
    return cpus


def _scenario_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"invalid scenarios {text!r}: use a comma-separated subset of "
                                         f"{','.join(SCENARIOS)}")
    return tuple(name for name in SCENARIOS if name in names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpc_load.py",
        description="Measure Checks per second and latency of `extauthz serve` over gRPC on 127.0.0.1, "
                    "against an allow-all grpcio server (the floor). Servers run pinned to --server-cpu, "
                    "the load client to --client-cpu.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=_bounded(float, 0.5, 60, "seconds"), default=5.0,
                        help="measured time of each scenario in each round, in seconds (0.5 to 60)")
    parser.add_argument("--warmup", type=_bounded(float, 0, 30, "seconds"), default=1.0,
                        help="unmeasured load before each measured window, in seconds (0 to 30)")
    parser.add_argument("--rounds", type=_bounded(int, 1, 20, "rounds"), default=3,
                        help="rounds; each round measures every scenario once (1 to 20)")
    parser.add_argument("--in-flight", type=_bounded(int, 1, 1024, "calls"), default=64,
                        help="Check calls the client keeps in flight at all times (1 to 1024)")
    parser.add_argument("--channels", type=_bounded(int, 1, 16, "channels"), default=1,
                        help="client gRPC channels, each its own TCP connection; calls go round-robin (1 to 16)")

    parser.add_argument("--server-threads", type=_bounded(int, 1, 1024, "threads"), default=16,
                        help="worker threads of both servers: extauthz's server.threads and the floor's pool "
                             "(1 to 1024)")
    parser.add_argument("--server-cpu", type=_bounded(int, 0, 4095, ""), default=0,
                        help="CPU number both servers are pinned to with taskset")
    parser.add_argument("--client-cpu", type=_bounded(int, 0, 4095, ""), default=1,
                        help="CPU number the load client (this process) is pinned to")
    parser.add_argument("--workers-cpus", type=_cpu_list,
                        help="CPUs of the two-worker extauthz (allow-mint-workers2), comma-separated; worker i "
                             "runs on the i-th (default: --server-cpu and another CPU, the client's only when "
                             "there is no third)")

    parser.add_argument("--scenarios", type=_scenario_list, default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated scenarios to measure, from {','.join(SCENARIOS)}; ratios need "
                             "floor, and a Redis scenario's ratio to the memory store needs its memory "
                             "counterpart (allow-mint, one-time-memory)")
    parser.add_argument("--one-time-max-rate", type=_bounded(int, 100, 50_000, "Checks/s"), default=4000,
                        help="Checks/s that the scenarios with a new token per call (allow-new-token, one-time-*) "
                             "may reach: each round signs rate x (warm-up + duration) + in-flight tokens per such "
                             "scenario before its load starts, and a scenario that uses them all up fails "
                             "(100 to 50000)")
    parser.add_argument("--call-timeout", type=_bounded(float, 0.1, 60, "seconds"), default=5.0,
                        help="deadline of each Check call, in seconds; a call past it counts as an error")
    parser.add_argument("--startup-timeout", type=_bounded(float, 1, 120, "seconds"), default=30.0,
                        help="time allowed for each server to report SERVING on grpc.health.v1, in seconds")
    parser.add_argument("--decision-log", choices=("file", "devnull"), default="file",
                        help="extauthz decision_log sink: a file in the temporary folder, or /dev/null")

    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the machine, the options and every measurement as JSON to PATH")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the temporary folder (keys, configuration, server logs) and print its path")
    parser.add_argument("--serve-floor", metavar="PORT", type=_bounded(int, 1, 65535, ""),
                        help="internal: run only the allow-all floor server on 127.0.0.1:PORT until SIGTERM "
                             "or SIGINT; the benchmark starts itself this way")
    parser.add_argument("--floor-api", choices=("sync", "aio"), default="sync",
                        help="internal, with --serve-floor: grpcio's sync server on a thread pool, or grpc.aio")
    return parser


# --- the floor servers -------------------------------------------------------------------------


ALLOWED = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                          ok_response=external_auth_pb2.OkHttpResponse())


def serve_floor(port: int, threads: int) -> int:
    """Serve an allow-all Authorization/Check on 127.0.0.1:port until SIGTERM or SIGINT."""

    class AllowAll(external_auth_pb2_grpc.AuthorizationServicer):
        def Check(self, request: external_auth_pb2.CheckRequest,  # noqa: N802 - gRPC method name
                  context: grpc.ServicerContext) -> external_auth_pb2.CheckResponse:
            return ALLOWED

    # The same shape as extauthz's server: a sync server on a thread pool, the same admission limit.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="check"),
                         maximum_concurrent_rpcs=threads + MAX_PENDING, options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowAll(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    except RuntimeError as exc:
        print(f"floor server: failed to listen on 127.0.0.1:{port}: {exc}; choose another port", file=sys.stderr)
        return 1
    if bound != port:
        print(f"floor server: failed to listen on 127.0.0.1:{port}; choose another port", file=sys.stderr)
        return 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    server.start()
    for service in ("", AUTHORIZATION_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"floor server: listening on 127.0.0.1:{port} with {threads} threads", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(1).wait()
    return 0


async def serve_floor_aio(port: int) -> int:
    """Serve an allow-all Authorization/Check with grpc.aio on 127.0.0.1:port until SIGTERM or SIGINT."""

    class AllowAll(external_auth_pb2_grpc.AuthorizationServicer):
        async def Check(self, request: external_auth_pb2.CheckRequest,  # noqa: N802 - gRPC method name
                        context: grpc.aio.ServicerContext) -> external_auth_pb2.CheckResponse:
            return ALLOWED

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowAll(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    except RuntimeError as exc:
        print(f"floor server: failed to listen on 127.0.0.1:{port}: {exc}; choose another port", file=sys.stderr)
        return 1
    if bound != port:
        print(f"floor server: failed to listen on 127.0.0.1:{port}; choose another port", file=sys.stderr)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await server.start()
    for service in ("", AUTHORIZATION_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"floor server: grpc.aio listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(1)
    return 0


# --- setup: ports, keys, configuration, tokens ---------------------------------------------------


def free_port() -> int:
    """Return a loopback TCP port that is free now, never one of RESERVED_PORTS."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port
    raise BenchError("no free loopback port found in 100 tries")


def consecutive_free_ports(count: int) -> int:
    """Return the first of `count` consecutive loopback TCP ports that are free now, none in RESERVED_PORTS."""
    for _ in range(100):
        first = free_port()
        ports = range(first, first + count)
        if first + count > 65536 or RESERVED_PORTS.intersection(ports):
            continue
        probes: list[socket.socket] = []
        try:
            for port in ports:
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise BenchError(f"no {count} consecutive free loopback ports found in 100 tries")


@dataclass
class Setup:
    folder: Path
    idp_key: Path
    config: Path
    decision_log: Path | None
    grpc_port: int
    http_port: int
    floor_port: int
    floor_aio_port: int
    # The extauthz whose store is the benchmark's own redis-server.
    redis_config: Path
    redis_decision_log: Path | None
    redis_grpc_port: int
    redis_http_port: int
    redis_port: int
    # The two-worker extauthz, with the same Redis: the shared port, the side listener, each worker's port.
    workers_config: Path
    workers_decision_log: Path | None
    workers_grpc_port: int
    workers_http_port: int
    worker_ports: tuple[int, ...]


def _extauthz_config(grpc_port: int, http_port: int, threads: int, decision_log: Path | None) -> dict[str, Any]:
    return {
        "listen": {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}"},
        "issuers": [{"issuer": DEV_ISSUER, "jwks_file": "idp/jwks.json", "audiences": [DEV_AUDIENCE],
                     "algorithms": ["ES256"], "max_token_lifetime": "1h"}],
        "policies": {"provider": "extauthz", "paths": ["policies/"]},
        "token": {"issuer": TOKEN_ISSUER, "header": TOKEN_HEADER, "ttl": "30s",
                  "signing": {"algorithm": "ES256", "rotate_every": "6h"}},
        "decision_log": {"sink": f"file:{decision_log or '/dev/null'}"},
        "server": {"threads": threads, "max_pending": MAX_PENDING, "drain_timeout": "1s"},
    }


def write_setup(folder: Path, threads: int, decision_log_sink: str) -> Setup:
    """Write a throwaway IdP key pair, the policies and both extauthz configurations into `folder`.

    The second configuration differs from the first only in its ports, its decision log and
    `store.url`, which names the benchmark's redis-server with the default store settings.
    """
    idp_key = generate_idp_keys(folder / "idp")
    (folder / "policies").mkdir()
    (folder / "policies" / "bench.yaml").write_text(POLICIES, encoding="utf-8")

    decision_log = folder / "decisions.jsonl" if decision_log_sink == "file" else None
    redis_decision_log = folder / "decisions-redis.jsonl" if decision_log_sink == "file" else None
    # Each worker writes its own file: decisions-workers.worker-0.jsonl and decisions-workers.worker-1.jsonl.
    workers_decision_log = folder / "decisions-workers.jsonl" if decision_log_sink == "file" else None
    first_worker_port = consecutive_free_ports(WORKERS)
    worker_ports = tuple(range(first_worker_port, first_worker_port + WORKERS))
    ports: set[int] = set()
    while len(ports) < 9:
        port = free_port()
        if port not in worker_ports:
            ports.add(port)
    (grpc_port, http_port, floor_port, floor_aio_port, redis_grpc_port, redis_http_port, redis_port,
     workers_grpc_port, workers_http_port) = sorted(ports)

    config = _extauthz_config(grpc_port, http_port, threads, decision_log)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    redis_config = _extauthz_config(redis_grpc_port, redis_http_port, threads, redis_decision_log)
    redis_config["store"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    redis_config_path = folder / "config-redis.yaml"
    redis_config_path.write_text(yaml.safe_dump(redis_config, sort_keys=False), encoding="utf-8")

    workers_config = _extauthz_config(workers_grpc_port, workers_http_port, threads, workers_decision_log)
    workers_config["store"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    workers_config["listen"]["worker_grpc"] = f"127.0.0.1:{first_worker_port}"
    workers_config["server"].update({"workers": WORKERS, "cpu_affinity": True})
    workers_config_path = folder / "config-workers.yaml"
    workers_config_path.write_text(yaml.safe_dump(workers_config, sort_keys=False), encoding="utf-8")
    return Setup(folder, idp_key, config_path, decision_log, grpc_port, http_port, floor_port, floor_aio_port,
                 redis_config_path, redis_decision_log, redis_grpc_port, redis_http_port, redis_port,
                 workers_config_path, workers_decision_log, workers_grpc_port, workers_http_port, worker_ports)


def user_token(idp_key: Path, login_age: float) -> str:
    """Sign a 10-minute end-user token, with MFA, whose login happened `login_age` seconds ago."""
    return sign_user_token(idp_key, subject="bench-user", auth_age=login_age, acr=MFA, amr=["pwd", "otp"],
                           lifetime=USER_TOKEN_LIFETIME_S)


def one_time_token(private_key: Any, kid: str, now: int) -> str:
    """Sign a 10-minute end-user token with a new jti, with the key and kid that load_idp_key returns."""
    claims = {"iss": DEV_ISSUER, "sub": "bench-user", "aud": DEV_AUDIENCE, "iat": now,
              "exp": now + USER_TOKEN_LIFETIME_S, "auth_time": now - FRESH_LOGIN_AGE_S, "acr": MFA,
              "amr": ["pwd", "otp"], "jti": str(uuid.uuid4())}
    return jwt.encode(claims, private_key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})


def one_time_payloads(idp_key: Path, count: int, path: str = ONE_TIME_PATH) -> list[bytes]:
    """Sign `count` tokens, each with its own jti, and return one CheckRequest for GET `path` per token."""
    private_key, kid = load_idp_key(idp_key)
    now = int(time.time())
    return [check_request_bytes(one_time_token(private_key, kid, now), path=path) for _ in range(count)]


def check_request_bytes(token: str, *, path: str = REQUEST_PATH, request_id: str = "bench-request") -> bytes:
    """Serialise the CheckRequest that Envoy's HTTP ext_authz filter sends for GET `path`."""
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.principal = SOURCE_PRINCIPAL
    attributes.source.address.CopyFrom(address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="10.0.0.7", port_value=41234)))
    attributes.destination.principal = DESTINATION_PRINCIPAL
    attributes.destination.address.CopyFrom(address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="10.0.0.9", port_value=8080)))
    http = attributes.request.http
    http.id = "12345"
    http.method = "GET"
    http.host = REQUEST_HOST
    http.path = path
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    headers = {":method": "GET", ":path": path, ":authority": REQUEST_HOST,
               "x-request-id": request_id, "authorization": f"Bearer {token}"}
    for name, value in headers.items():
        http.headers[name] = value
    return external_auth_pb2.CheckRequest(attributes=attributes).SerializeToString()


# --- server processes ----------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None]:
    """Return a preexec_fn that makes the child get SIGTERM when this process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    return preexec


class ServerProcess:
    """A server started under `taskset -c CPUS`, with its output in a log file.

    `cpu` is one CPU number or a tuple of them. `grpc_port` is None for a server that does not speak
    gRPC (RedisProcess). `grpc_ports` are the ports the client spreads its calls over: `grpc_port`
    unless given.
    """

    def __init__(self, name: str, argv: list[str], cpu: int | tuple[int, ...], log_path: Path, grpc_port: int | None,
                 grpc_ports: tuple[int, ...] | None = None):
        self.name = name
        self.cpus = cpu if isinstance(cpu, tuple) else (cpu,)
        self.log_path = log_path
        self.grpc_port = grpc_port
        self.grpc_ports = grpc_ports or (() if grpc_port is None else (grpc_port,))
        cpu_list = ",".join(str(item) for item in self.cpus)
        with open(log_path, "wb") as log_file:
            # A new session keeps a terminal's Ctrl-C away from the servers: this script stops them.
            self.process = subprocess.Popen(["taskset", "-c", cpu_list, *argv], stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent())

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float) -> None:
        """Wait until grpc.health.v1 reports SERVING; raise BenchError on exit or timeout."""
        assert self.grpc_port is not None
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=CHANNEL_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise BenchError(f"{self.name} exited with status {self.process.returncode} before it "
                                     f"was ready\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=AUTHORIZATION_SERVICE), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
            else:
                raise BenchError(f"{self.name} did not report SERVING within {timeout:g} s\n{self.log_tail()}")
        self.check_affinity()

    def check_affinity(self) -> None:
        affinity = os.sched_getaffinity(self.pid)
        if affinity != set(self.cpus):
            raise BenchError(f"{self.name} (pid {self.pid}) runs on CPUs {sorted(affinity)}, expected "
                             f"only CPUs {list(self.cpus)}")

    def cpu_seconds(self) -> float:
        """Return the CPU time of this server and of its child processes (the workers of a supervisor)."""
        return process_cpu_seconds(self.pid) + sum(process_cpu_seconds(child) for child in child_pids(self.pid))

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"({self.name} log unreadable: {exc})"
        return "\n".join(f"  {self.name}: {line}" for line in text.splitlines()[-lines:])

    def stop(self) -> None:
        """Send SIGTERM, wait up to 10 s for the exit, then SIGKILL."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(f"{self.name} (pid {self.pid}) ignored SIGTERM for 10 s: sending SIGKILL", file=sys.stderr)
            self.process.kill()
            self.process.wait()


class RedisProcess(ServerProcess):
    """A redis-server on 127.0.0.1:port under `taskset -c CPU` that keeps nothing on disk."""

    def __init__(self, cpu: int, port: int, folder: Path):
        binary = shutil.which("redis-server") or "redis-server"
        # An empty --logfile sends Redis's log to stdout, so to the log file.
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(folder), "--logfile", ""]
        super().__init__("redis", argv, cpu, folder / "redis.log", None)
        self.port = port

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def wait_ready(self, timeout: float) -> None:
        """Wait until Redis replies to PING; raise BenchError on exit or timeout."""
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise BenchError(f"redis exited with status {self.process.returncode} before it was ready\n"
                                     f"{self.log_tail()}")
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise BenchError(f"redis did not reply to PING within {timeout:g} s\n"
                                         f"{self.log_tail()}") from None
                    time.sleep(0.05)
        finally:
            client.close()
        self.check_affinity()

    def count_keys(self, pattern: str) -> int:
        client = self.client()
        try:
            return sum(1 for _ in client.scan_iter(match=pattern, count=10_000))
        finally:
            client.close()


def cpu_busy_ticks(cpus: tuple[int, ...]) -> list[tuple[int, int]]:
    """Return (busy, total) clock ticks of each CPU in `cpus`, from /proc/stat.

    Busy is every state except idle and iowait: it includes other processes, interrupts, softirq
    (where loopback TCP is processed) and steal.
    """
    counters: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(value) for value in rest.split()]
            idle = values[3] + values[4]
            counters[int(name[3:])] = (sum(values[:8]) - idle, sum(values[:8]))
    return [counters[cpu] for cpu in cpus]


def child_pids(pid: int) -> list[int]:
    """Return the pids of the running children of process `pid`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def process_cpu_seconds(pid: int | str) -> float:
    """Return the user + system CPU time of every thread of a process, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # A worker that exited between listing and reading: its time is lost, which the report shows as less CPU.
        return 0.0
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the load loop -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One scenario in one round.

    `calls` counts the Checks that completed inside the measured window. CPU figures are percent of one
    CPU over that window. `store_cpu_pct` is the redis-server's, for the Redis scenarios only.
    """

    scenario: str
    round: int
    calls: int
    window_s: float
    checks_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_pct: float
    client_cpu_pct: float
    server_core_busy_pct: float
    client_core_busy_pct: float
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    ratio_to_floor: float | None = None
    store_cpu_pct: float | None = None
    # Checks/s divided by the Checks/s of the memory-store counterpart in the same round.
    ratio_to_memory: float | None = None
    # Checks/s divided by the Checks/s of the one-worker counterpart in the same round.
    ratio_to_one_worker: float | None = None


Validator = Callable[[external_auth_pb2.CheckResponse], str | None]


def count_decision_records(path: Path) -> int:
    """Count the decision lines of one writer's log: PATH and its rotated files PATH.1, PATH.2, ..."""
    files = [path]
    while (rotated := path.with_name(f"{path.name}.{len(files)}")).exists():
        files.append(rotated)
    count = 0
    for file in files:
        with open(file, "rb") as log_file:
            count += sum(1 for line in log_file if b'"type":"decision"' in line)
    return count


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def drive(calls: list[grpc.UnaryUnaryMultiCallable], payloads: list[bytes], validate: Validator,
          server: ServerProcess, *, scenario: str, round_number: int, in_flight: int, warmup: float,
          duration: float, call_timeout: float, cpus: tuple[int, int], one_use: bool = False,
          store: ServerProcess | None = None) -> Measurement:
    """Keep `in_flight` calls going for warmup + duration seconds, then wait for the last ones.

    Calls go round-robin over `calls`. Every call sends `payloads[0]`, or with `one_use` the next
    unused payload. A pool of one-use payloads that runs out before the window ends raises BenchError.
    Only calls that complete inside the measured window count towards Checks/s and latency. Every
    response of the round is validated, warm-up and drain included. `store` is a process whose CPU time is measured too.
    """
    completions: queue.SimpleQueue[tuple[float, float, grpc.Future]] = queue.SimpleQueue()
    issued = 0
    outstanding = 0
    pool_ran_out_at: float | None = None

    def issue() -> None:
        nonlocal issued, outstanding
        payload = payloads[issued] if one_use else payloads[0]
        sent = time.perf_counter()
        future = calls[issued % len(calls)].future(payload, timeout=call_timeout)
        future.add_done_callback(lambda done, sent=sent: completions.put((sent, time.perf_counter(), done)))
        issued += 1
        outstanding += 1

    start = time.perf_counter()
    window_start = start + warmup
    window_end = window_start + duration
    # Samples at the window's start and end: wall time, server, client and store process CPU seconds,
    # and the busy and total ticks of the server's and the client's CPU.
    samples: list[tuple[float, float, float, float, list[tuple[int, int]]]] = []
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    def sample(now: float) -> None:
        store_seconds = store.cpu_seconds() if store is not None else 0.0
        samples.append((now, server.cpu_seconds(), process_cpu_seconds("self"), store_seconds,
                        cpu_busy_ticks(cpus)))

    if one_use and len(payloads) < in_flight:
        raise BenchError(f"{scenario}: {len(payloads)} one-use payloads for {in_flight} calls in flight")
    for _ in range(in_flight):
        issue()
    while outstanding:
        now = time.perf_counter()
        if (len(samples) == 0 and now >= window_start) or (len(samples) == 1 and now >= window_end):
            sample(now)
        try:
            sent, done, future = completions.get(timeout=call_timeout + 2)
        except queue.Empty:
            # Every call has a deadline, so grpcio should have completed it by now.
            errors[f"{outstanding} calls never completed"] += 1
            break
        outstanding -= 1
        error = _check_future(future, validate)
        if error is not None:
            errors[error] += 1
        elif window_start <= done < window_end:
            latencies.append(done - sent)
        if now < window_end:
            if one_use and issued >= len(payloads):
                if pool_ran_out_at is None:
                    pool_ran_out_at = now - start
            else:
                issue()
    if pool_ran_out_at is not None:
        raise BenchError(f"{scenario}: all {len(payloads)} pre-signed tokens were used after {pool_ran_out_at:.1f} s "
                         f"of {warmup + duration:g} s; raise --one-time-max-rate")
    if len(samples) < 2:
        raise BenchError(f"{scenario}: the load loop ended before the measured window did; see the errors: "
                         f"{dict(errors)}")

    (wall_0, server_0, client_0, store_0, ticks_0), (wall_1, server_1, client_1, store_1, ticks_1) = samples
    core_busy = [100 * (busy_1 - busy_0) / max(1, total_1 - total_0)
                 for (busy_0, total_0), (busy_1, total_1) in zip(ticks_0, ticks_1, strict=True)]
    latencies.sort()
    return Measurement(
        scenario=scenario, round=round_number, calls=len(latencies), window_s=duration,
        checks_per_s=len(latencies) / duration,
        p50_ms=percentile(latencies, 0.50) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else math.nan,
        server_cpu_pct=100 * (server_1 - server_0) / (wall_1 - wall_0),
        client_cpu_pct=100 * (client_1 - client_0) / (wall_1 - wall_0),
        server_core_busy_pct=core_busy[0], client_core_busy_pct=core_busy[1],
        errors=sum(errors.values()), error_kinds=dict(errors),
        store_cpu_pct=100 * (store_1 - store_0) / (wall_1 - wall_0) if store is not None else None)


def _check_future(future: grpc.Future, validate: Validator) -> str | None:
    try:
        response = future.result()
    except grpc.RpcError as exc:
        return f"gRPC error {exc.code().name}"
    return validate(response)


def _header_value(headers: Any, name: str) -> str | None:
    for option in headers:
        if option.header.key == name:
            return option.header.value
    return None


def validate_floor(response: external_auth_pb2.CheckResponse) -> str | None:
    if response.status.code != code_pb2.OK:
        return f"status {code_pb2.Code.Name(response.status.code)}, expected OK"
    return None


def validate_allowed(response: external_auth_pb2.CheckResponse) -> str | None:
    if response.status.code != code_pb2.OK:
        return f"status {code_pb2.Code.Name(response.status.code)} ({response.status.message}), expected OK"
    token = _header_value(response.ok_response.headers, TOKEN_HEADER)
    if not token or token.count(".") != 2:
        return f"allowed without a compact JWS in {TOKEN_HEADER}"
    return None


def validate_step_up(response: external_auth_pb2.CheckResponse) -> str | None:
    if response.status.code != code_pb2.UNAUTHENTICATED:
        return f"status {code_pb2.Code.Name(response.status.code)}, expected UNAUTHENTICATED"
    if response.denied_response.status.code != 401:
        return f"HTTP status {response.denied_response.status.code}, expected 401"
    challenge = _header_value(response.denied_response.headers, "www-authenticate") or ""
    if 'error="insufficient_user_authentication"' not in challenge or f'max_age="{REAUTH_MAX_AGE_S}"' not in challenge:
        return "401 without the step-up challenge in www-authenticate"
    return None


def verify_minted_sample(call: grpc.UnaryUnaryMultiCallable, payload: bytes, http_port: int,
                         timeout: float, *, scenario: str = "allow-mint", audience: str = TOKEN_AUDIENCE,
                         path: str = REQUEST_PATH) -> None:
    """Send one Check and verify the minted token's signature and claims with extauthz's published JWKS."""
    response = call(payload, timeout=timeout)
    problem = validate_allowed(response)
    if problem is not None:
        raise BenchError(f"{scenario} sample: {problem}")
    token = _header_value(response.ok_response.headers, TOKEN_HEADER)
    assert token is not None
    verify_minted_token(token, http_port, timeout, scenario=scenario, audience=audience, path=path)


def verify_minted_token(token: str, http_port: int, timeout: float, *, scenario: str, audience: str = TOKEN_AUDIENCE,
                        path: str = REQUEST_PATH) -> None:
    """Verify a minted token's signature and claims with the JWKS that extauthz serves on `http_port`."""
    # An empty ProxyHandler keeps urllib off any HTTP proxy: the request goes to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{http_port}/.well-known/jwks.json", timeout=timeout) as reply:
        key_set = jwt.PyJWKSet.from_json(reply.read().decode())
    kid = jwt.get_unverified_header(token).get("kid")
    keys = [key for key in key_set.keys if key.key_id == kid]
    if not keys:
        raise BenchError(f"{scenario} sample: minted token's kid {kid!r} is not in the published JWKS")
    try:
        claims = jwt.decode(token, keys[0].key, algorithms=["ES256"], audience=audience, issuer=TOKEN_ISSUER)
    except jwt.PyJWTError as exc:
        raise BenchError(f"{scenario} sample: minted token failed verification: {exc}") from exc
    if claims.get("sub") != "bench-user" or claims.get("tctx", {}).get("path") != path:
        raise BenchError(f"{scenario} sample: unexpected claims sub={claims.get('sub')!r} "
                         f"tctx={claims.get('tctx')!r}")


def verify_one_time_sample(call: grpc.UnaryUnaryMultiCallable, idp_key: Path, http_port: int, timeout: float,
                           scenario: str) -> None:
    """Use one new token twice, from two requests with different request ids: the first Check must mint a
    valid token, and the second must be denied as a replay, which shows that the store is consulted."""
    private_key, kid = load_idp_key(idp_key)
    token = one_time_token(private_key, kid, int(time.time()))
    verify_minted_sample(call, check_request_bytes(token, path=ONE_TIME_PATH, request_id="bench-sample-1"),
                         http_port, timeout, scenario=scenario, audience=ONE_TIME_AUDIENCE, path=ONE_TIME_PATH)
    response = call(check_request_bytes(token, path=ONE_TIME_PATH, request_id="bench-sample-2"), timeout=timeout)
    # extauthz puts the deny reason in the gRPC status message.
    if (response.status.code != code_pb2.UNAUTHENTICATED or response.denied_response.status.code != 401
            or response.status.message != "token_replayed"):
        raise BenchError(f"{scenario} sample: the second use of a one-time token got status "
                         f"{code_pb2.Code.Name(response.status.code)} ({response.status.message}) and HTTP "
                         f"{response.denied_response.status.code}, expected UNAUTHENTICATED (token_replayed) and 401")


# --- the benchmark -------------------------------------------------------------------------------


def run_rounds(args: argparse.Namespace, setup: Setup, servers: dict[str, ServerProcess],
               clients: dict[str, list[grpc.UnaryUnaryMultiCallable]]) -> list[Measurement]:
    measurements: list[Measurement] = []
    for round_number in range(1, args.rounds + 1):
        # Fresh tokens each round keep the fresh login within the route's max age however long the run.
        allowed_payload = check_request_bytes(user_token(setup.idp_key, FRESH_LOGIN_AGE_S))
        stale_payload = check_request_bytes(user_token(setup.idp_key, STALE_LOGIN_AGE_S))
        # The one-time scenarios get their pool of payloads just before their load starts.
        plan: dict[str, tuple[str, bytes | None, Validator]] = {
            # The floor gets the allow-mint request, so the client sends the same bytes.
            "floor": ("floor", allowed_payload, validate_floor),
            "allow-mint": ("extauthz", allowed_payload, validate_allowed),
            "allow-new-token": ("extauthz", None, validate_allowed),
            "allow-mint-redis": ("extauthz-redis", allowed_payload, validate_allowed),
            "allow-mint-workers2": ("extauthz-workers2", allowed_payload, validate_allowed),
            "step-up-deny": ("extauthz", stale_payload, validate_step_up),
            "one-time-memory": ("extauthz", None, validate_allowed),
            "one-time-redis": ("extauthz-redis", None, validate_allowed),
            "floor-aio": ("floor-aio", allowed_payload, validate_floor),
        }
        round_results: dict[str, Measurement] = {}
        for scenario in args.scenarios:
            server_name, payload, validate = plan[scenario]
            http_port = {"extauthz-redis": setup.redis_http_port,
                         "extauthz-workers2": setup.workers_http_port}.get(server_name, setup.http_port)
            if scenario in ("allow-mint", "allow-mint-redis", "allow-mint-workers2"):
                # One sample per channel, so that with workers every worker's minted token is verified.
                for call in clients[server_name]:
                    verify_minted_sample(call, allowed_payload, http_port, args.call_timeout, scenario=scenario)
            if scenario == "allow-new-token":
                [new_token] = one_time_payloads(setup.idp_key, 1, REQUEST_PATH)
                verify_minted_sample(clients[server_name][0], new_token, http_port, args.call_timeout,
                                     scenario=scenario)
            if scenario in ONE_TIME_SCENARIOS:
                verify_one_time_sample(clients[server_name][0], setup.idp_key, http_port, args.call_timeout,
                                       scenario)
            if payload is None:
                payloads = sign_pool(args, setup, scenario)
            else:
                payloads = [payload]
            result = drive(clients[server_name], payloads, validate, servers[server_name], scenario=scenario,
                           round_number=round_number, in_flight=args.in_flight, warmup=args.warmup,
                           duration=args.duration, call_timeout=args.call_timeout,
                           cpus=(args.server_cpu, args.client_cpu), one_use=payload is None,
                           store=servers.get("redis") if scenario in REDIS_SCENARIOS else None)
            round_results[scenario] = result
            status = f"{result.errors} errors" if result.errors else "no errors"
            store_text = f"  Redis CPU {result.store_cpu_pct:3.0f}%" if result.store_cpu_pct is not None else ""
            print(f"round {round_number} {scenario:>16}: {result.checks_per_s:8.0f} Checks/s  "
                  f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  server CPU "
                  f"{result.server_cpu_pct:3.0f}%{store_text}  client CPU {result.client_cpu_pct:3.0f}%  busy CPU "
                  f"{args.server_cpu}/{args.client_cpu} {result.server_core_busy_pct:3.0f}%/"
                  f"{result.client_core_busy_pct:3.0f}%  {status}",
                  file=sys.stderr, flush=True)

        floor = round_results.get("floor")
        for result in round_results.values():
            if floor is not None and result is not floor and floor.checks_per_s > 0:
                result.ratio_to_floor = result.checks_per_s / floor.checks_per_s
            memory = round_results.get(MEMORY_COUNTERPARTS.get(result.scenario, ""))
            if memory is not None and memory.checks_per_s > 0:
                result.ratio_to_memory = result.checks_per_s / memory.checks_per_s
            one_worker = round_results.get(ONE_WORKER_COUNTERPARTS.get(result.scenario, ""))
            if one_worker is not None and one_worker.checks_per_s > 0:
                result.ratio_to_one_worker = result.checks_per_s / one_worker.checks_per_s
            measurements.append(result)
    return measurements


def sign_pool(args: argparse.Namespace, setup: Setup, scenario: str) -> list[bytes]:
    """Sign the one-use payloads of one scenario and round: enough for --one-time-max-rate Checks/s over
    warm-up and measured time, plus one per call in flight."""
    count = math.ceil(args.one_time_max_rate * (args.warmup + args.duration)) + args.in_flight
    started = time.perf_counter()
    path = REQUEST_PATH if scenario == "allow-new-token" else ONE_TIME_PATH
    payloads = one_time_payloads(setup.idp_key, count, path)
    print(f"{scenario}: signed {count} new tokens in {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)
    return payloads


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def render_markdown(measurements: list[Measurement], scenarios: tuple[str, ...]) -> str:
    """Render the summary and per-round tables.

    With a Redis scenario, both tables get a column for the Redis server's CPU and one for the ratio
    to the memory-store counterpart measured in the same round. With allow-mint-workers2, they get the
    ratio to one worker too.
    """
    with_redis = bool(REDIS_SCENARIOS & set(scenarios))
    with_workers = "allow-mint-workers2" in scenarios
    redis_header = " Redis CPU % | Checks/s ÷ memory store |" if with_redis else ""
    redis_align = " ---: | ---: |" if with_redis else ""
    if with_workers:
        redis_header += " Checks/s ÷ one worker |"
        redis_align += " ---: |"
    lines = ["Per scenario, min / median / max over rounds. CPU is percent of one CPU during the measured window.",
             "",
             f"| scenario | Checks/s | p50 ms | p99 ms | Checks/s ÷ floor | server CPU % |{redis_header} "
             "client CPU % | errors |",
             f"| --- | ---: | ---: | ---: | ---: | ---: |{redis_align} ---: | --- |"]
    for scenario in scenarios:
        rows = [m for m in measurements if m.scenario == scenario]
        ratios = [m.ratio_to_floor for m in rows if m.ratio_to_floor is not None]
        errors = sum(m.errors for m in rows)
        error_text = "none" if not errors else "**ERRORS** " + "; ".join(
            f"{kind}: {count}" for kind, count in sum((Counter(m.error_kinds) for m in rows), Counter()).items())
        redis_cells = ""
        if with_redis:
            store_cpu = [m.store_cpu_pct for m in rows if m.store_cpu_pct is not None]
            memory_ratios = [m.ratio_to_memory for m in rows if m.ratio_to_memory is not None]
            redis_cells = (f" {_spread(store_cpu, 0) if store_cpu else '-'} "
                           f"| {_spread(memory_ratios, 3) if memory_ratios else '-'} |")
        if with_workers:
            worker_ratios = [m.ratio_to_one_worker for m in rows if m.ratio_to_one_worker is not None]
            redis_cells += f" {_spread(worker_ratios, 3) if worker_ratios else '-'} |"
        lines.append(
            f"| {scenario} | {_spread([m.checks_per_s for m in rows], 0)} | {_spread([m.p50_ms for m in rows], 2)} "
            f"| {_spread([m.p99_ms for m in rows], 2)} | {_spread(ratios, 3) if ratios else '-'} "
            f"| {_spread([m.server_cpu_pct for m in rows], 0)} |{redis_cells} "
            f"{_spread([m.client_cpu_pct for m in rows], 0)} | {error_text} |")

    lines += ["", "Per round. Busy is the whole CPU's busy time from /proc/stat: where it exceeds the process's "
              "own CPU, other work (softirq, other processes) ran on that CPU.", "",
              "| round | scenario | Checks/s | p50 ms | p99 ms | Checks/s ÷ floor | server CPU % | server's CPU busy % "
              f"|{redis_header} client CPU % | client's CPU busy % | errors |",
              f"| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |{redis_align} ---: | ---: | ---: |"]
    for m in measurements:
        ratio = f"{m.ratio_to_floor:.3f}" if m.ratio_to_floor is not None else "-"
        redis_cells = ""
        if with_redis:
            store_cpu = f"{m.store_cpu_pct:.0f}" if m.store_cpu_pct is not None else "-"
            memory_ratio = f"{m.ratio_to_memory:.3f}" if m.ratio_to_memory is not None else "-"
            redis_cells = f" {store_cpu} | {memory_ratio} |"
        if with_workers:
            redis_cells += f" {m.ratio_to_one_worker:.3f} |" if m.ratio_to_one_worker is not None else " - |"
        lines.append(f"| {m.round} | {m.scenario} | {m.checks_per_s:.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} "
                     f"| {ratio} | {m.server_cpu_pct:.0f} | {m.server_core_busy_pct:.0f} |{redis_cells} "
                     f"{m.client_cpu_pct:.0f} | {m.client_core_busy_pct:.0f} | {m.errors} |")
    return "\n".join(lines)


def machine_facts() -> dict[str, Any]:
    """Read the machine and package facts that a benchmark record needs."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = {}
    for package in ("grpcio", "protobuf", "PyJWT", "cryptography", "orjson", "xds-protos"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "ram_gib": round(mem_kib / 1024 ** 2, 1),
            "kernel": platform.release(), "python": platform.python_version(), "packages": versions,
            "extauthz_commit": _extauthz_commit()}


def _extauthz_commit() -> str:
    """Return the git commit of the measured extauthz code, marked dirty if extauthz/ has local changes."""
    repository = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repository), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        changes = subprocess.run(["git", "-C", str(repository), "status", "--porcelain", "--", "extauthz"],
                                 check=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit} with local changes in extauthz/" if changes else commit


def check_environment(args: argparse.Namespace) -> None:
    if shutil.which("taskset") is None:
        raise BenchError("taskset not found: install util-linux (apt-get install util-linux)")
    available = os.sched_getaffinity(0)
    for option, cpu in (("--server-cpu", args.server_cpu), ("--client-cpu", args.client_cpu)):
        if cpu not in available:
            raise BenchError(f"{option} {cpu}: CPU not available to this process (available: {sorted(available)})")
    if args.server_cpu == args.client_cpu:
        raise BenchError("--server-cpu and --client-cpu must differ, or the client competes with the servers")
    if args.workers_cpus is None:
        others = sorted(available - {args.server_cpu, args.client_cpu})
        args.workers_cpus = (args.server_cpu, others[0] if others else args.client_cpu)
    for cpu in args.workers_cpus:
        if cpu not in available:
            raise BenchError(f"--workers-cpus {cpu}: CPU not available to this process "
                             f"(available: {sorted(available)})")
    if "allow-mint-workers2" in args.scenarios and args.client_cpu in args.workers_cpus:
        print(f"grpc_load.py: allow-mint-workers2 runs its second worker on CPU {args.client_cpu}, which the client "
              "uses too: fewer than 3 CPUs are available", file=sys.stderr)
    if REDIS_SCENARIOS & set(args.scenarios) and shutil.which("redis-server") is None:
        raise BenchError("redis-server not found: install it (apt-get install redis-server) or leave out the "
                         f"Redis scenarios ({', '.join(sorted(REDIS_SCENARIOS))})")


def _raise_system_exit(signum: int, _frame: object) -> None:
    print(f"grpc_load.py: received {signal.Signals(signum).name}; stopping the servers", file=sys.stderr)
    raise SystemExit(128 + signum)


def start_servers(args: argparse.Namespace, setup: Setup, servers: dict[str, ServerProcess]) -> None:
    """Start the servers that the requested scenarios need, each under taskset on --server-cpu.

    Each process goes into `servers` as soon as it starts, so the caller can stop it even when a later
    start raises. Redis is started first and waited for, so the Redis-backed extauthz finds it at
    start-up. The readiness of the gRPC servers is the caller's to wait for.
    """
    script = str(Path(__file__).resolve())
    if REDIS_SCENARIOS & set(args.scenarios):
        servers["redis"] = RedisProcess(args.server_cpu, setup.redis_port, setup.folder)
        servers["redis"].wait_ready(args.startup_timeout)
        servers["extauthz-redis"] = ServerProcess(
            "extauthz-redis", [sys.executable, "-m", "extauthz", "serve", "--config", str(setup.redis_config),
                               "--log-level", "warning"],
            args.server_cpu, setup.folder / "extauthz-redis.log", setup.redis_grpc_port)
    if "allow-mint-workers2" in args.scenarios:
        # The supervisor and its workers may use the workers' CPUs; --cpu-affinity gives each worker one.
        servers["extauthz-workers2"] = ServerProcess(
            "extauthz-workers2", [sys.executable, "-m", "extauthz", "serve", "--config", str(setup.workers_config),
                                  "--log-level", "warning"],
            args.workers_cpus, setup.folder / "extauthz-workers2.log", setup.workers_grpc_port,
            grpc_ports=setup.worker_ports)
    if {"allow-mint", "allow-new-token", "step-up-deny", "one-time-memory"} & set(args.scenarios):
        servers["extauthz"] = ServerProcess(
            "extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(setup.config),
                         "--log-level", "warning"],
            args.server_cpu, setup.folder / "extauthz.log", setup.grpc_port)
    if "floor" in args.scenarios:
        servers["floor"] = ServerProcess(
            "floor", [sys.executable, script, "--serve-floor", str(setup.floor_port),
                      "--server-threads", str(args.server_threads)],
            args.server_cpu, setup.folder / "floor.log", setup.floor_port)
    if "floor-aio" in args.scenarios:
        servers["floor-aio"] = ServerProcess(
            "floor-aio", [sys.executable, script, "--serve-floor", str(setup.floor_aio_port), "--floor-api", "aio"],
            args.server_cpu, setup.folder / "floor-aio.log", setup.floor_aio_port)


def open_clients(args: argparse.Namespace, servers: dict[str, ServerProcess],
                 channels: list[grpc.Channel]) -> dict[str, list[grpc.UnaryUnaryMultiCallable]]:
    """Open --channels channels to each gRPC server, appending them to `channels` for the caller to close."""
    clients: dict[str, list[grpc.UnaryUnaryMultiCallable]] = {}
    for name, server in servers.items():
        if server.grpc_port is None:
            continue
        clients[name] = []
        # With workers, the channels alternate between the workers' own ports, so calls go round-robin.
        for index in range(args.channels * len(server.grpc_ports)):
            port = server.grpc_ports[index % len(server.grpc_ports)]
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
            channels.append(channel)
            # Requests go pre-serialised (request_serializer=None), so the client does not
            # re-encode the same CheckRequest on every call.
            clients[name].append(channel.unary_unary(
                CHECK_METHOD, request_serializer=None,
                response_deserializer=external_auth_pb2.CheckResponse.FromString))
    return clients


def report(args: argparse.Namespace, setup: Setup, servers: dict[str, ServerProcess],
           measurements: list[Measurement]) -> None:
    """Print the machine, the settings and the Markdown tables, and write the JSON file if requested."""
    facts = machine_facts()
    packages = ", ".join(f"{name} {version}" for name, version in facts["packages"].items())
    print(f"Machine: {facts['nproc']} CPUs ({facts['cpu_model']}), {facts['ram_gib']} GiB RAM, Linux "
          f"{facts['kernel']}, Python {facts['python']}, {packages}. extauthz at {facts['extauthz_commit']}.")
    print(f"Servers on CPU {args.server_cpu} with {args.server_threads} threads, client on CPU "
          f"{args.client_cpu} with {args.in_flight} calls in flight on {args.channels} channel(s), "
          f"{args.duration:g} s measured per scenario and round.\n")
    print(render_markdown(measurements, args.scenarios))

    print()
    worker_logs = ([] if setup.workers_decision_log is None else
                   [worker_path(setup.workers_decision_log, index) for index in range(WORKERS)])
    for name, decision_logs, scenarios in (
            ("extauthz", [setup.decision_log], ("allow-mint", "allow-new-token", "step-up-deny", "one-time-memory")),
            ("extauthz-redis", [setup.redis_decision_log], ("allow-mint-redis", "one-time-redis")),
            ("extauthz-workers2", worker_logs, ("allow-mint-workers2",))):
        if not decision_logs or None in decision_logs or name not in servers:
            continue
        checks = sum(m.calls for m in measurements if m.scenario in scenarios)
        records = [count_decision_records(decision_log) for decision_log in decision_logs]
        print(f"{name} decision log: {' + '.join(str(count) for count in records)} records, for {checks} Checks in "
              "the measured windows. The log also contains the warm-up, drain and sample Checks.")
    redis_server = servers.get("redis")
    if isinstance(redis_server, RedisProcess) and "one-time-redis" in args.scenarios:
        # The benchmark's configuration keeps the default store.key_prefix, `extauthz:`.
        claims = redis_server.count_keys("extauthz:otk:*")
        checks = sum(m.calls for m in measurements if m.scenario == "one-time-redis")
        print(f"Redis held {claims} one-time claims, for {checks} one-time-redis Checks in the measured windows. "
              "The claims also include the warm-up, drain and sample Checks.")

    if args.json is not None:
        options = {name: (list(value) if isinstance(value, tuple) else value) for name, value in vars(args).items()
                   if name not in ("json", "serve_floor", "floor_api")}
        document = {"machine": facts, "options": options, "measurements": [asdict(m) for m in measurements]}
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise BenchError(f"failed to write --json {args.json}: {exc}") from exc
        print(f"wrote {args.json}", file=sys.stderr)


def run_benchmark(args: argparse.Namespace) -> int:
    try:
        check_environment(args)
    except BenchError as exc:
        print(f"grpc_load.py: {exc}", file=sys.stderr)
        return 2
    planned = args.rounds * len(args.scenarios) * (args.warmup + args.duration)
    print(f"planned load time: {planned:.0f} s ({args.rounds} rounds x {len(args.scenarios)} scenarios x "
          f"({args.warmup:g} s warm-up + {args.duration:g} s measured))", file=sys.stderr)
    new_token = len(NEW_TOKEN_SCENARIOS & set(args.scenarios))
    if new_token:
        tokens = math.ceil(args.one_time_max_rate * (args.warmup + args.duration)) + args.in_flight
        print(f"plus signing {tokens} new tokens before each of {args.rounds * new_token} windows that send a new "
              "token per call", file=sys.stderr)

    folder = Path(tempfile.mkdtemp(prefix="extauthz-bench-"))
    servers: dict[str, ServerProcess] = {}
    channels: list[grpc.Channel] = []
    try:
        setup = write_setup(folder, args.server_threads, args.decision_log)
        start_servers(args, setup, servers)
        for server in servers.values():
            server.wait_ready(args.startup_timeout)
        os.sched_setaffinity(0, {args.client_cpu})
        clients = open_clients(args, servers, channels)

        measurements = run_rounds(args, setup, servers, clients)
        for server in servers.values():
            if server.process.poll() is not None:
                raise BenchError(f"{server.name} exited during the run\n{server.log_tail()}")
        report(args, setup, servers, measurements)
        return 1 if any(m.errors for m in measurements) else 0
    except BenchError as exc:
        print(f"grpc_load.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("grpc_load.py: interrupted, stopping the servers", file=sys.stderr)
        return 130
    finally:
        for channel in channels:
            channel.close()
        # Reverse start order: the Redis-backed extauthz stops before its Redis.
        for server in reversed(list(servers.values())):
            server.stop()
        if args.keep_temp:
            print(f"kept the temporary folder {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_floor is not None:
        if args.serve_floor in RESERVED_PORTS:
            print(f"floor server: port {args.serve_floor} is reserved for the local demo or Redis; choose another "
                  "port", file=sys.stderr)
            return 2
        if args.floor_api == "aio":
            return asyncio.run(serve_floor_aio(args.serve_floor))
        return serve_floor(args.serve_floor, args.server_threads)
    # SIGTERM unwinds like Ctrl-C does, so the `finally` in run_benchmark stops the servers.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
