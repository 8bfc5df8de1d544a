"""Prometheus metrics, served as text at /metrics on the HTTP side listener.

    extauthz_checks_total{decision, reason}      Checks by decision (allow, deny) and reason
    extauthz_dry_run_denies_total{reason}        Checks that dry-run policies would have denied
    extauthz_check_duration_seconds              time extauthz spent deciding one Check
    extauthz_tokens_minted_total                 per-request tokens minted
    extauthz_jwks_fetches_total{result}          issuer JWKS fetches over HTTPS (success, failure)
    extauthz_store_errors_total{operation}       shared store operations that failed
    extauthz_policy_reloads_total{result}        configuration and policy reloads (success, failure)
    extauthz_decision_log_dropped_total{reason}  decision records not kept (spool_full, queue_full, closed,
                                                 error, shutdown)
    extauthz_decision_log_sink_errors_total      failed writes to the decision log sink
    extauthz_decision_log_spooled_records        decision log lines waiting in the spool for the sink
    extauthz_build_info{version}                 always 1

Label values come from fixed sets (reason codes, operation names), never from requests.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from extauthz import __version__
from extauthz.errors import DenyError

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()
_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.checks = Counter("extauthz_checks", "Checks by decision and reason.", ("decision", "reason"),
                              registry=self.registry)
        self.dry_run_denies = Counter("extauthz_dry_run_denies", "Checks that dry-run policies would have denied.",
                                      ("reason",), registry=self.registry)
        self.check_duration = Histogram("extauthz_check_duration_seconds", "Time spent deciding one Check.",
                                        buckets=_DURATION_BUCKETS, registry=self.registry)
        self.tokens_minted = Counter("extauthz_tokens_minted", "Per-request tokens minted.", registry=self.registry)
        self.jwks_fetches = Counter("extauthz_jwks_fetches", "Issuer JWKS fetches by result.", ("result",),
                                    registry=self.registry)
        self.store_errors = Counter("extauthz_store_errors", "Failed shared-store operations.", ("operation",),
                                    registry=self.registry)
        self.policy_reloads = Counter("extauthz_policy_reloads", "Configuration and policy reloads by result.",
                                      ("result",), registry=self.registry)
        self.decision_log_dropped = Counter("extauthz_decision_log_dropped",
                                            "Decision records that could not be kept, by reason.", ("reason",),
                                            registry=self.registry)
        self.decision_log_sink_errors = Counter("extauthz_decision_log_sink_errors",
                                                "Failed writes to the decision log sink.", registry=self.registry)
        self.decision_log_spooled = Gauge("extauthz_decision_log_spooled_records",
                                          "Decision log lines waiting in the spool for the sink.",
                                          registry=self.registry)
        build_info = Gauge("extauthz_build_info", "Build information; always 1.", ("version",),
                           registry=self.registry)
        build_info.labels(version=__version__).set(1)
        # Label lookups cost more than the increment itself: keep one child per (decision, reason).
        self._check_children: dict[tuple[str, str], object] = {}

    def record_check(self, decision: str, reason: str, duration: float, minted: bool,
                     would_deny: DenyError | None = None) -> None:
        child = self._check_children.get((decision, reason))
        if child is None:
            child = self._check_children.setdefault((decision, reason), self.checks.labels(decision, reason))
        child.inc()  # type: ignore[attr-defined]
        self.check_duration.observe(duration)
        if minted:
            self.tokens_minted.inc()
        if would_deny is not None:
            self.dry_run_denies.labels(would_deny.code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
