"""RSS soak: one `extauthz serve` process at a steady Check rate for a long time, its resident memory
sampled every few seconds.

The script starts extauthz (one worker, the memory store, the benchmark's policies plus a route
without step-up) pinned to --server-cpu, and sends Checks over gRPC at --rate per second from this
process, pinned to --client-cpu. Each Check carries the next token of a pool of --token-pool end-user
tokens, used in turn. A pool larger than extauthz's verified-token cache (limits.token_cache_size,
10,000 by default) keeps that cache full and evicting, so a growing cache would show. Every Check is
allowed and mints a token, and each one writes a decision record.

The send loop is open: the n-th Check goes out n / rate seconds after the start, whatever the
replies. At most --max-in-flight Checks may be outstanding; a Check due beyond that is skipped and
counted. The run stops by itself after --warmup + --duration seconds.

The report gives the RSS at the end of the warm-up (the baseline), at the end, and its maximum, and
whether the maximum stayed within --tolerance percent of the baseline. Run
`python bench/rss_soak.py --help` for the options; docs/benchmarks.md records results.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from envoy.service.auth.v3 import external_auth_pb2
from grpc_load import (
    CHANNEL_OPTIONS,
    CHECK_METHOD,
    FRESH_LOGIN_AGE_S,
    MFA,
    BenchError,
    ServerProcess,
    _bounded,
    _check_future,
    _raise_system_exit,
    check_request_bytes,
    machine_facts,
    percentile,
    validate_allowed,
    verify_minted_sample,
    write_setup,
)

from extauthz.dev_idp import DEV_AUDIENCE, DEV_ISSUER, load_idp_key

SOAK_PATH = "/orders/7"
SOAK_AUDIENCE = "orders-api"
# A route that every valid token passes, so the soak measures the allow path without step-up.
SOAK_POLICY = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: orders
  namespace: bench
  annotations:
    extauthz.io/token-audience: {SOAK_AUDIENCE}
spec:
  action: CUSTOM
  provider:
    name: extauthz
  rules:
    - to:
        - operation:
            paths: ["/orders/*"]
            methods: ["GET"]
"""
# The benchmark's issuer accepts tokens that live at most one hour (max_token_lifetime).
MAX_TOKEN_LIFETIME_S = 3600
# Seconds the pool's tokens stay valid beyond the end of the run.
TOKEN_MARGIN_S = 120


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rss_soak.py",
        description="Send Checks to one extauthz process at a steady rate and sample its resident memory (RSS).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=_bounded(float, 10, 3000, "seconds"), default=600.0,
                        help="measured time after the warm-up, in seconds (10 to 3000)")
    parser.add_argument("--warmup", type=_bounded(float, 0, 300, "seconds"), default=60.0,
                        help="load before the baseline RSS sample, in seconds (0 to 300); it should outlast one "
                             "pass over the token pool, so the cache is full")
    parser.add_argument("--rate", type=_bounded(int, 10, 5000, "Checks/s"), default=500,
                        help="Checks sent per second (10 to 5000)")
    parser.add_argument("--interval", type=_bounded(float, 0.5, 60, "seconds"), default=5.0,
                        help="time between two RSS samples, in seconds (0.5 to 60)")
    parser.add_argument("--token-pool", type=_bounded(int, 1, 200_000, "tokens"), default=20_000,
                        help="distinct end-user tokens, used in turn (1 to 200000)")
    parser.add_argument("--tolerance", type=_bounded(float, 0, 100, "percent"), default=5.0,
                        help="largest RSS growth over the baseline that counts as steady, in percent")
    parser.add_argument("--max-in-flight", type=_bounded(int, 1, 100_000, "calls"), default=1000,
                        help="outstanding Checks beyond which a due Check is skipped (1 to 100000)")
    parser.add_argument("--server-threads", type=_bounded(int, 1, 1024, "threads"), default=16,
                        help="extauthz server.threads (1 to 1024)")
    parser.add_argument("--server-cpu", type=_bounded(int, 0, 4095, ""), default=0,
                        help="CPU number extauthz is pinned to")
    parser.add_argument("--client-cpu", type=_bounded(int, 0, 4095, ""), default=1,
                        help="CPU number the load client (this process) is pinned to")
    parser.add_argument("--decision-log", choices=("file", "devnull"), default="file",
                        help="extauthz decision_log sink: a file in the temporary folder, or /dev/null")
    parser.add_argument("--call-timeout", type=_bounded(float, 0.1, 60, "seconds"), default=5.0,
                        help="deadline of each Check, in seconds; a Check past it counts as an error")
    parser.add_argument("--startup-timeout", type=_bounded(float, 1, 120, "seconds"), default=30.0,
                        help="time allowed for extauthz to report SERVING, in seconds")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the machine, the options, every sample and the summary as JSON to PATH")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the temporary folder (keys, configuration, logs) and print its path")
    return parser


@dataclass
class Sample:
    """One RSS sample: seconds since the start of the load, RSS in MiB, Checks completed so far."""

    elapsed_s: float
    rss_mib: float
    completed: int


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    skipped: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    """Return the resident set size of a process in MiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS line in /proc/{pid}/status")


def sign_pool(idp_key: Path, count: int, lifetime: int) -> list[bytes]:
    """Sign `count` distinct tokens valid for `lifetime` seconds; return one CheckRequest per token."""
    private_key, kid = load_idp_key(idp_key)
    now = int(time.time())
    payloads = []
    for _ in range(count):
        claims = {"iss": DEV_ISSUER, "sub": "bench-user", "aud": DEV_AUDIENCE, "iat": now, "exp": now + lifetime,
                  "auth_time": now - FRESH_LOGIN_AGE_S, "acr": MFA, "jti": str(uuid.uuid4())}
        token = jwt.encode(claims, private_key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})
        payloads.append(check_request_bytes(token, path=SOAK_PATH))
    return payloads


def run_soak(args: argparse.Namespace, server: ServerProcess, call: grpc.UnaryUnaryMultiCallable,
             payloads: list[bytes]) -> Soak:
    """Send Checks at args.rate for warm-up + duration, sampling RSS every args.interval seconds."""
    soak = Soak()
    completions: queue.SimpleQueue[tuple[float, float, grpc.Future]] = queue.SimpleQueue()
    outstanding = 0
    start = time.perf_counter()
    end = start + args.warmup + args.duration
    next_sample = start

    def drain(block_until: float) -> None:
        nonlocal outstanding
        while True:
            try:
                sent, done, future = completions.get_nowait()
            except queue.Empty:
                remaining = block_until - time.perf_counter()
                if remaining <= 0:
                    return
                # NOTE: a blocking get(timeout=...) once hung here for minutes, blocked in a timed lock
                # wait while the VM's wall clock stalled. Polling with sleep() needs no timed lock wait.
                time.sleep(min(remaining, 0.0005))
                continue
            outstanding -= 1
            error = _check_future(future, validate_allowed)
            if error is not None:
                soak.errors[error] += 1
            else:
                soak.completed += 1
                if done - start >= args.warmup:
                    soak.latencies.append(done - sent)

    while True:
        now = time.perf_counter()
        if now >= next_sample:
            soak.samples.append(Sample(now - start, rss_mib(server.pid), soak.completed))
            next_sample += args.interval
        if now >= end:
            break
        due = start + soak.sent / args.rate
        if due > now:
            drain(min(due, next_sample, end))
            continue
        if outstanding >= args.max_in_flight:
            soak.skipped += 1
        else:
            payload = payloads[soak.sent % len(payloads)]
            future = call.future(payload, timeout=args.call_timeout)
            future.add_done_callback(lambda done, sent=now: completions.put((sent, time.perf_counter(), done)))
            outstanding += 1
        soak.sent += 1
    drain(time.perf_counter() + args.call_timeout + 2)
    if outstanding:
        soak.errors[f"{outstanding} Checks never completed"] += 1
    soak.sent -= soak.skipped
    return soak


def summarise(args: argparse.Namespace, soak: Soak) -> dict[str, Any]:
    """Return the baseline, last and maximum RSS after the warm-up, and whether it stayed within the tolerance."""
    measured = [sample for sample in soak.samples if sample.elapsed_s >= args.warmup]
    if not measured:
        raise BenchError("no RSS sample after the warm-up: lower --interval or raise --duration")
    baseline, last = measured[0].rss_mib, measured[-1].rss_mib
    peak = max(sample.rss_mib for sample in measured)
    latencies = sorted(soak.latencies)
    return {
        "baseline_rss_mib": baseline, "last_rss_mib": last, "max_rss_mib": peak,
        "last_growth_pct": 100 * (last - baseline) / baseline, "max_growth_pct": 100 * (peak - baseline) / baseline,
        "within_tolerance": peak <= baseline * (1 + args.tolerance / 100),
        "checks_sent": soak.sent, "checks_completed": soak.completed, "checks_skipped": soak.skipped,
        "achieved_rate": soak.completed / (args.warmup + args.duration),
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "errors": sum(soak.errors.values()), "error_kinds": dict(soak.errors),
    }


def render(args: argparse.Namespace, soak: Soak, summary: dict[str, Any]) -> str:
    verdict = "yes" if summary["within_tolerance"] else "**no**"
    lines = [f"One extauthz process, {args.rate} Checks/s for {args.warmup:g} s of warm-up and {args.duration:g} s "
             f"measured, a pool of {args.token_pool} tokens, RSS every {args.interval:g} s.", "",
             "| RSS after warm-up MiB | last MiB | max MiB | last − baseline % | max − baseline % "
             f"| within {args.tolerance:g} % | Checks/s achieved | p50 ms | p99 ms | skipped | errors |",
             "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
             f"| {summary['baseline_rss_mib']:.1f} | {summary['last_rss_mib']:.1f} | {summary['max_rss_mib']:.1f} "
             f"| {summary['last_growth_pct']:+.1f} | {summary['max_growth_pct']:+.1f} | {verdict} "
             f"| {summary['achieved_rate']:.0f} | {summary['p50_ms']:.2f} | {summary['p99_ms']:.2f} "
             f"| {summary['checks_skipped']} "
             f"| {'none' if not summary['errors'] else summary['error_kinds']} |"]
    minutes = [sample for sample in soak.samples if sample.elapsed_s >= args.warmup]
    step = max(1, round(60 / args.interval))
    lines += ["", "RSS each minute after the warm-up:", "",
              " ".join(f"{sample.rss_mib:.1f}" for sample in minutes[::step])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    lifetime = round(args.warmup + args.duration) + TOKEN_MARGIN_S
    if lifetime > MAX_TOKEN_LIFETIME_S:
        print(f"rss_soak.py: --warmup + --duration must stay below {MAX_TOKEN_LIFETIME_S - TOKEN_MARGIN_S} s, because "
              "the pool's tokens must stay valid and the issuer accepts at most 1 h", file=sys.stderr)
        return 2
    if shutil.which("taskset") is None:
        print("rss_soak.py: taskset not found: install util-linux (apt-get install util-linux)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="extauthz-soak-"))
    server: ServerProcess | None = None
    channel: grpc.Channel | None = None
    try:
        setup = write_setup(folder, args.server_threads, args.decision_log)
        (folder / "policies" / "soak.yaml").write_text(SOAK_POLICY, encoding="utf-8")
        server = ServerProcess("extauthz", [sys.executable, "-m", "extauthz", "serve", "--config", str(setup.config),
                                            "--log-level", "warning"],
                               args.server_cpu, folder / "extauthz.log", setup.grpc_port)
        server.wait_ready(args.startup_timeout)
        os.sched_setaffinity(0, {args.client_cpu})
        channel = grpc.insecure_channel(f"127.0.0.1:{setup.grpc_port}", options=CHANNEL_OPTIONS)
        call = channel.unary_unary(CHECK_METHOD, request_serializer=None,
                                   response_deserializer=external_auth_pb2.CheckResponse.FromString)

        started = time.perf_counter()
        payloads = sign_pool(setup.idp_key, args.token_pool, lifetime)
        print(f"signed {len(payloads)} tokens in {time.perf_counter() - started:.1f} s; load for "
              f"{args.warmup + args.duration:g} s", file=sys.stderr, flush=True)
        verify_minted_sample(call, payloads[0], setup.http_port, args.call_timeout, scenario="soak",
                             audience=SOAK_AUDIENCE, path=SOAK_PATH)
        soak = run_soak(args, server, call, payloads)
        if server.process.poll() is not None:
            raise BenchError(f"extauthz exited during the soak\n{server.log_tail()}")
        summary = summarise(args, soak)

        print(f"Machine: {machine_facts()['nproc']} CPUs. extauthz on CPU {args.server_cpu}, client on CPU "
              f"{args.client_cpu}.\n")
        print(render(args, soak, summary))
        if args.json is not None:
            options = {name: value for name, value in vars(args).items() if name != "json"}
            document = {"machine": machine_facts(), "options": options, "summary": summary,
                        "samples": [asdict(sample) for sample in soak.samples]}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
            print(f"wrote {args.json}", file=sys.stderr)
        return 0 if summary["errors"] == 0 and summary["within_tolerance"] else 1
    except (BenchError, OSError) as exc:
        print(f"rss_soak.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rss_soak.py: interrupted, stopping extauthz", file=sys.stderr)
        return 130
    finally:
        if channel is not None:
            channel.close()
        if server is not None:
            server.stop()
        if args.keep_temp:
            print(f"kept the temporary folder {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C does, so the `finally` in run stops extauthz.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
