"""Plot the benchmark results: throughput and p99 per scenario, and RSS over time, as one PNG.

Reads the JSON files that bench/grpc_load.py, bench/envoy_load.py and bench/rss_soak.py write with
--json. Bars are medians over rounds, and the error bars span min to max. Needs matplotlib (the
`bench` optional dependency: pip install -e '.[bench]', which `make bench` runs).

    python bench/plot.py --grpc bench/results/grpc_load.json --envoy bench/results/envoy_load.json \
        --soak bench/results/rss_soak.json --out docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plot.py", description="Plot benchmark JSON results into one PNG.")
    parser.add_argument("--grpc", type=Path, help="JSON of bench/grpc_load.py --json")
    parser.add_argument("--envoy", type=Path, help="JSON of bench/envoy_load.py --json")
    parser.add_argument("--soak", type=Path, help="JSON of bench/rss_soak.py --json")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.png"), help="PNG file to write")
    return parser


def load(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"plot.py: cannot read {path}: {exc}") from exc


def spread(measurements: list[dict[str, Any]], scenarios: list[str], key: str) -> tuple[list[float], list[list[float]]]:
    """Return the median of `key` per scenario, and the distances to its min and max for error bars."""
    medians, below, above = [], [], []
    for scenario in scenarios:
        values = [row[key] for row in measurements if row["scenario"] == scenario and row[key] is not None]
        median = statistics.median(values)
        medians.append(median)
        below.append(median - min(values))
        above.append(max(values) - median)
    return medians, [below, above]


def bars(axis: Any, scenarios: list[str], measurements: list[dict[str, Any]], key: str, title: str,
         unit: str, color: str) -> None:
    medians, errors = spread(measurements, scenarios, key)
    positions = range(len(scenarios))
    axis.bar(positions, medians, yerr=errors, capsize=4, color=color)
    axis.set_xticks(list(positions), scenarios, rotation=30, ha="right", fontsize=8)
    axis.set_title(title, fontsize=10)
    axis.set_ylabel(unit)
    for position, median in zip(positions, medians, strict=True):
        axis.annotate(f"{median:,.0f}" if median >= 100 else f"{median:.2f}", (position, median),
                      ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")


def scenarios_of(document: dict[str, Any], wanted: set[str] | None = None) -> list[str]:
    names: list[str] = []
    for row in document["measurements"]:
        if row["scenario"] not in names and (wanted is None or row["scenario"] in wanted):
            names.append(row["scenario"])
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grpc, envoy, soak = load(args.grpc), load(args.envoy), load(args.soak)
    if grpc is None and envoy is None and soak is None:
        print("plot.py: give at least one of --grpc, --envoy and --soak", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(3, 2, figsize=(12, 13))
    if grpc is not None:
        names = scenarios_of(grpc)
        bars(axes[0][0], names, grpc["measurements"], "checks_per_s",
             f"Direct gRPC: Checks/s ({grpc['options']['in_flight']} in flight)", "Checks/s", "tab:blue")
        bars(axes[0][1], names, grpc["measurements"], "p99_ms", "Direct gRPC: p99 latency", "ms", "tab:blue")
    if envoy is not None:
        closed = scenarios_of(envoy, {"envoy-direct", "envoy-floor", "envoy-jwt", "envoy-extauthz"})
        rate = scenarios_of(envoy, {"rate-floor", "rate-extauthz"})
        if closed:
            bars(axes[1][0], closed, envoy["measurements"], "requests_per_s",
                 f"Through Envoy (wrk, {envoy['options']['connections']} connections): requests/s", "requests/s",
                 "tab:green")
            bars(axes[1][1], closed, envoy["measurements"], "p99_ms", "Through Envoy (wrk): p99 latency", "ms",
                 "tab:green")
        if rate:
            bars(axes[2][0], rate, envoy["measurements"], "p99_ms",
                 f"Through Envoy at {envoy['options']['rate']} requests/s (h2load --rps): p99 latency", "ms",
                 "tab:orange")
    if soak is not None:
        axis = axes[2][1]
        samples = soak["samples"]
        axis.plot([sample["elapsed_s"] / 60 for sample in samples], [sample["rss_mib"] for sample in samples],
                  color="tab:red")
        warmup = soak["options"]["warmup"] / 60
        axis.axvline(warmup, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"RSS of one extauthz process at {soak['options']['rate']} Checks/s", fontsize=10)
        axis.set_xlabel("minutes (dotted: end of warm-up)")
        axis.set_ylabel("MiB")
        axis.set_ylim(bottom=0)
    for row in axes:
        for axis in row:
            if not axis.has_data():
                axis.set_axis_off()

    commit = next((document["machine"].get("extauthz_commit") for document in (grpc, envoy, soak)
                   if document is not None), "unknown")
    figure.suptitle(f"extauthz benchmarks (median over rounds, bars span min to max), commit {commit}", fontsize=11)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
