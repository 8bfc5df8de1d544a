"""Worker scaling with a light load client: one extauthz worker against `serve --workers 2`.

bench/grpc_load.py's Python client needs about half a CPU for its load. On a 2-CPU machine that CPU
is the second worker's, so its two-worker figure measures the client, not the workers. This script
sends the same Check with h2load (nghttp2, written in C), which needs a small share of a CPU:

- one redis-server and two extauthz configurations from grpc_load.py's set-up, both on that Redis:
  one worker on CPU 0, and `--workers 2 --cpu-affinity` on CPUs 0 and 1;
- two h2load processes on CPU 1, each with `--connections` HTTP/2 connections and `--streams` calls
  in flight per connection, for `--duration` seconds. Against one worker, both aim at its port.
  Against two workers, each aims at one worker's own port, so each worker gets half of the load;
- each request is a gRPC call to envoy.service.auth.v3.Authorization/Check with the allow-mint
  CheckRequest (a cached end-user token, a freshly minted ES256 token per Check).

h2load reads HTTP statuses, not gRPC statuses, so the script checks the decision logs afterwards:
every Check in them must be `allowed`. It reports Checks/s per round and the ratio of two workers
to one worker inside each round.

    .venv/bin/python bench/workers_h2load.py --rounds 3 --json bench/results/workers_h2load.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpc_load import (  # noqa: E402 - the sibling script is imported from this folder
    RedisProcess,
    ServerProcess,
    check_request_bytes,
    user_token,
    write_setup,
)

from extauthz.server import worker_path  # noqa: E402

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
_REQUESTS_PER_SECOND = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both layouts (default 3)")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per layout and round (default 10)")
    parser.add_argument("--warm-up", type=int, default=2, help="seconds of load before each measure (default 2)")
    parser.add_argument("--connections", type=int, default=2, help="connections per h2load process (default 2)")
    parser.add_argument("--streams", type=int, default=32, help="calls in flight per connection (default 32)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def grpc_frame(message: bytes) -> bytes:
    """Frame `message` as gRPC does: a zero compression flag, a 4-byte big-endian length, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def run_h2load(ports: list[int], body: Path, seconds: int, args: argparse.Namespace) -> tuple[float, int]:
    """Run one h2load per port at once on CPU 1, and return the summed requests/s and the non-2xx count."""
    commands = [["taskset", "-c", "1", "h2load", "--duration", str(seconds), "--warm-up-time", "0",
                 "-c", str(args.connections), "-m", str(args.streams), "-d", str(body),
                 "-H", "content-type: application/grpc", "-H", "te: trailers",
                 f"http://127.0.0.1:{port}{CHECK_PATH}"] for port in ports]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in commands]
    rate, failures = 0.0, 0
    for process in processes:
        output, _ = process.communicate(timeout=seconds + 60)
        found = _REQUESTS_PER_SECOND.search(output)
        status = _STATUS.search(output)
        if process.returncode != 0 or found is None or status is None:
            raise RuntimeError(f"h2load failed:\n{output[-2000:]}")
        rate += float(found.group(1))
        failures += sum(int(count) for count in status.groups()[1:])
    return rate, failures


def decision_reasons(paths: list[Path]) -> dict[str, int]:
    """Count the reasons of every decision record in these logs and their rotated files."""
    reasons: dict[str, int] = {}
    for path in paths:
        files = [path]
        while (rotated := path.with_name(f"{path.name}.{len(files)}")).exists():
            files.append(rotated)
        for file in files:
            for line in file.read_bytes().splitlines():
                record = orjson.loads(line)
                if record.get("type") == "decision":
                    reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
    return reasons


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load is missing; on Debian: apt-get install -y nghttp2-client", file=sys.stderr)
        return 2

    folder = Path(tempfile.mkdtemp(prefix="extauthz-workers-bench-"))
    servers: list[ServerProcess] = []
    try:
        setup = write_setup(folder, threads=16, decision_log_sink="file")
        body = folder / "check.bin"
        body.write_bytes(grpc_frame(check_request_bytes(user_token(setup.idp_key, login_age=30))))

        redis = RedisProcess(1, setup.redis_port, folder)
        servers.append(redis)
        redis.wait_ready(30)
        one = ServerProcess("one-worker", [sys.executable, "-m", "extauthz", "serve", "--config",
                                           str(setup.redis_config), "--log-level", "warning"],
                            0, folder / "one-worker.log", setup.redis_grpc_port)
        two = ServerProcess("two-workers", [sys.executable, "-m", "extauthz", "serve", "--config",
                                            str(setup.workers_config), "--log-level", "warning"],
                            (0, 1), folder / "two-workers.log", setup.workers_grpc_port,
                            grpc_ports=setup.worker_ports)
        servers += [one, two]
        one.wait_ready(60)
        two.wait_ready(60)

        layouts = {"one worker": [setup.redis_grpc_port] * 2, "two workers": list(setup.worker_ports)}
        rounds = []
        for number in range(1, args.rounds + 1):
            result = {}
            for name, ports in layouts.items():
                run_h2load(ports, body, args.warm_up, args)
                rate, failures = run_h2load(ports, body, args.duration, args)
                result[name] = rate
                print(f"round {number} {name:>11}: {rate:8.0f} Checks/s  non-2xx {failures}", flush=True)
                if failures:
                    raise RuntimeError(f"{failures} HTTP responses were not 2xx")
            result["ratio"] = result["two workers"] / result["one worker"]
            print(f"round {number}  two ÷ one: {result['ratio']:.3f}", flush=True)
            rounds.append(result)
        time.sleep(1)

        logs = [setup.redis_decision_log, *(worker_path(setup.workers_decision_log, index) for index in range(2))]
        reasons = decision_reasons(logs)
        print(f"decision records by reason: {reasons}")
        if set(reasons) != {"allowed"}:
            raise RuntimeError(f"every Check should be allowed, got {reasons}")

        summary = {key: [min(r[key] for r in rounds), statistics.median(r[key] for r in rounds),
                         max(r[key] for r in rounds)] for key in ("one worker", "two workers", "ratio")}
        print("\n| layout | Checks/s min / median / max |\n| --- | ---: |")
        for key in ("one worker", "two workers"):
            print(f"| {key} | {' / '.join(f'{value:.0f}' for value in summary[key])} |")
        print(f"| two ÷ one | {' / '.join(f'{value:.3f}' for value in summary['ratio'])} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rounds": rounds, "summary": summary, "reasons": reasons}, indent=2))
        return 0
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
