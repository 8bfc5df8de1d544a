"""In-process CPU cost of one Check: parse the CheckRequest, decide, build and serialise the response.

No gRPC server and no network: the script calls extauthz's AuthorizationServicer.Check in one thread
on the serialised CheckRequests that bench/grpc_load.py sends, and divides the process CPU time
(time.process_time) by the number of Checks. That leaves out grpcio's own cost per call, which
bench/grpc_load.py's floor scenario measures, so the figures here are what extauthz adds on top.

Scenarios (the configuration and policies are bench/grpc_load.py's):

    allow-mint            one valid end-user token reused for every Check (the verified-token cache hits)
    allow-mint-new-token  a new end-user token on every Check: every Check verifies an ES256 signature
    step-up-deny          a token whose login is older than the route's max age: 401 step-up
    one-time-memory       a new token on every Check to the one-time-token route, memory store

`--profile SCENARIO` runs one more pass of that scenario under cProfile and prints the functions with
the most cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from google.rpc import code_pb2  # noqa: E402
from grpc_load import (  # noqa: E402
    FRESH_LOGIN_AGE_S,
    ONE_TIME_PATH,
    STALE_LOGIN_AGE_S,
    check_request_bytes,
    one_time_token,
    user_token,
    write_setup,
)

from extauthz.config import load_config  # noqa: E402
from extauthz.decision_log import DecisionLog  # noqa: E402
from extauthz.dev_idp import load_idp_key  # noqa: E402
from extauthz.server import build_authorizer  # noqa: E402
from extauthz.servicer import AuthorizationServicer  # noqa: E402

SCENARIOS = ("allow-mint", "allow-mint-new-token", "step-up-deny", "one-time-memory")
EXPECTED_CODES = {"allow-mint": code_pb2.OK, "allow-mint-new-token": code_pb2.OK,
                  "step-up-deny": code_pb2.UNAUTHENTICATED, "one-time-memory": code_pb2.OK}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="check_cpu.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checks", type=int, default=2000, help="Checks per scenario and round (1 to 100000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each measures every scenario once (1 to 50)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--profile", choices=SCENARIOS, help="also profile this scenario with cProfile")
    parser.add_argument("--profile-lines", type=int, default=30, help="functions to print from the profile")
    return parser


def payload_factory(scenario: str, idp_key: Path, count: int) -> Callable[[], list[bytes]]:
    """Return a function that makes `count` serialised CheckRequests for `scenario`.

    Tokens are signed before the measured loop, so signing them costs the measurement nothing.
    """
    def make() -> list[bytes]:
        if scenario == "allow-mint":
            return [check_request_bytes(user_token(idp_key, FRESH_LOGIN_AGE_S))] * count
        if scenario == "step-up-deny":
            return [check_request_bytes(user_token(idp_key, STALE_LOGIN_AGE_S))] * count
        private_key, kid = load_idp_key(idp_key)
        now = int(time.time())
        path = ONE_TIME_PATH if scenario == "one-time-memory" else "/payments/42"
        return [check_request_bytes(one_time_token(private_key, kid, now), path=path) for _ in range(count)]
    return make


def run_checks(servicer: AuthorizationServicer, payloads: list[bytes]) -> float:
    """Serve every payload as grpcio would (parse, Check); return the CPU seconds spent.

    Check returns the CheckResponse already serialised.
    """
    parse = external_auth_pb2.CheckRequest.FromString
    started = time.process_time()
    for payload in payloads:
        servicer.Check(parse(payload), None)  # type: ignore[arg-type]
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown or not scenarios:
        print(f"check_cpu.py: invalid --scenarios {args.scenarios!r}: use a subset of {','.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    if not 1 <= args.checks <= 100_000 or not 1 <= args.rounds <= 50:
        print("check_cpu.py: --checks must be 1 to 100000 and --rounds 1 to 50", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="extauthz-check-cpu-") as folder:
        setup = write_setup(Path(folder), threads=1, decision_log_sink="devnull")
        config = load_config(setup.config)
        decision_log = DecisionLog(config.decision_log)
        authorizer, _ = build_authorizer(config, decision_log)
        servicer = AuthorizationServicer(authorizer, config.token.header)
        factories = {name: payload_factory(name, setup.idp_key, args.checks) for name in scenarios}

        for name in scenarios:
            sample = factories[name]()[0]
            encoded = servicer.Check(external_auth_pb2.CheckRequest.FromString(sample), None)  # type: ignore[arg-type]
            response = external_auth_pb2.CheckResponse.FromString(encoded)
            if response.status.code != EXPECTED_CODES[name]:
                print(f"check_cpu.py: {name}: expected gRPC code {EXPECTED_CODES[name]}, got "
                      f"{response.status.code} ({response.status.message})", file=sys.stderr)
                return 1

        results: dict[str, list[float]] = {name: [] for name in scenarios}
        for round_number in range(1, args.rounds + 1):
            for name in scenarios:
                payloads = factories[name]()
                seconds = run_checks(servicer, payloads)
                results[name].append(seconds / len(payloads) * 1e6)
                print(f"round {round_number} {name:>21}: {results[name][-1]:7.1f} µs CPU per Check",
                      file=sys.stderr, flush=True)

        print(f"{args.checks} Checks per scenario and round, {args.rounds} rounds. "
              "CPU µs per Check, min / median / max:\n")
        print("| scenario | CPU µs per Check |")
        print("| --- | ---: |")
        for name in scenarios:
            values = results[name]
            print(f"| {name} | {min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f} |")

        if args.profile:
            payloads = factories[args.profile]()
            profiler = cProfile.Profile()
            profiler.enable()
            run_checks(servicer, payloads)
            profiler.disable()
            print(f"\ncProfile of {args.profile}, {len(payloads)} Checks:\n")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile_lines)
        decision_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
