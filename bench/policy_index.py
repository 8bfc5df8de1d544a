"""CPU time of one policy match with 1, 100 and 10,000 policies, indexed and linear.

Every table is in one namespace, `shop`, and the request is always `GET shop.example.com/svc-0/items`
from `web` to `shop`, which exactly one policy matches. The other policies name other services, in
three shapes: a path prefix (`/svc-N/*`), an exact path (`/svc-N/items`), and a host
(`svc-N.example.com`) with `paths: ["*"]`, which the index keys on the host instead. Each also
requires `methods: [GET, POST]` and a caller in namespace `web`.

Three ways to match are timed, each returning the same policies:

    indexed   PolicySet.match: the index finds the candidates, compiled predicates decide
    compiled  PolicySet.match with the index turned off: every compiled policy is tried
    linear    PolicySet.match_linear: every policy is tried with rule_matches, as before the index

The time is process CPU time (time.process_time) divided by the matches, repeated until each figure
took at least --min-seconds. The script prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from extauthz.policy import Policy, parse_policy
from extauthz.policy_index import PolicySet
from extauthz.request import HttpRequest

SIZES = (1, 100, 10_000)
NAMESPACE = "shop"
ROOT_NAMESPACE = "istio-system"


def policy_document(index: int) -> dict[str, Any]:
    """Return policy number `index` of the table, in one of three shapes; policy 0 matches the request."""
    operation: dict[str, Any] = {"methods": ["GET", "POST"]}
    shape = index % 3
    if shape == 0:
        operation["paths"] = [f"/svc-{index}/*"]
    elif shape == 1:
        operation["paths"] = [f"/svc-{index}/items"]
    else:
        operation["hosts"] = [f"svc-{index}.example.com"]
        operation["paths"] = ["*"]
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"svc-{index}", "namespace": NAMESPACE},
        "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"},
                 "rules": [{"from": [{"source": {"namespaces": ["web"]}}], "to": [{"operation": operation}]}]},
    }


def make_policies(count: int) -> list[Policy]:
    policies = []
    for index in range(count):
        policy = parse_policy(policy_document(index), f"bench#{index}", "extauthz", 30.0)
        assert policy is not None
        policies.append(policy)
    return policies


REQUEST = HttpRequest(
    method="GET", scheme="http", host="shop.example.com", authority_port=None, path="/svc-0/items", query="",
    headers={}, request_id="bench", source_address="10.0.0.7",
    source_principal="spiffe://cluster.local/ns/web/sa/frontend",
    destination_principal="spiffe://cluster.local/ns/shop/sa/api", destination_port=8080)


def time_per_call(match: Callable[[HttpRequest, None], list[Policy]], min_seconds: float) -> float:
    """Return the CPU seconds of one call of `match`, repeating until the calls took `min_seconds`."""
    calls = 1
    while True:
        started = time.process_time()
        for _ in range(calls):
            match(REQUEST, None)
        elapsed = time.process_time() - started
        if elapsed >= min_seconds:
            return elapsed / calls
        calls *= 2 if elapsed > min_seconds / 10 else 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy_index.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-seconds", type=float, default=0.3,
                        help="CPU seconds each figure is measured for, at least (0.01 to 10)")
    args = parser.parse_args(argv)
    if not 0.01 <= args.min_seconds <= 10:
        print(f"policy_index.py: --min-seconds {args.min_seconds} is out of range: use 0.01 to 10", file=sys.stderr)
        return 2

    print("| policies in the namespace | indexed µs | compiled, no index µs | linear µs |")
    print("| ---: | ---: | ---: | ---: |")
    for size in SIZES:
        policies = make_policies(size)
        indexed = PolicySet(policies, ROOT_NAMESPACE, index_threshold=0)
        compiled = PolicySet(policies, ROOT_NAMESPACE, index_threshold=size)
        expected = [policies[0]]
        for name, match in (("indexed", indexed.match), ("compiled", compiled.match),
                            ("linear", indexed.match_linear)):
            if match(REQUEST, None) != expected:
                print(f"policy_index.py: {name} match with {size} policies did not return only svc-0",
                      file=sys.stderr)
                return 1
        figures = [time_per_call(match, args.min_seconds) * 1e6
                   for match in (indexed.match, compiled.match, indexed.match_linear)]
        print(f"| {size:,} | " + " | ".join(f"{figure:,.2f}" for figure in figures) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
