"""`extauthz audit query` and `extauthz audit stats`: find and count decisions in decision logs.

Both read decision records with extauthz.audit_read and ignore checkpoint lines. Filters combine
with AND; a filter given several times matches any of its values. Times are RFC 3339 (a date alone
means midnight UTC) or a duration before now, such as `24h` or `90d`. `--since` is inclusive and
`--until` exclusive, so consecutive periods never count a decision twice.

The step-up challenge rate of a policy that requires re-authentication (`extauthz.io/reauth-max-age`
or `extauthz.io/acr-values`) is the share of the Checks that matched it and were denied with
`insufficient_user_authentication`. docs/audit.md defines every statistic.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from extauthz.audit_read import LogEntry, LogReader
from extauthz.errors import REASONS

# Reason codes that --reason accepts. audit_unavailable is among them, though no record carries it: it
# denies a Check whose record could not be kept.
KNOWN_REASONS = frozenset(REASONS)
STEP_UP_REASON = "insufficient_user_authentication"
_RELATIVE = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w))+\Z")
_RELATIVE_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Table cells longer than this are cut, with "..." at the end; --format json keeps every value whole.
MAX_CELL = 64
NO_USER = "(no end user)"
NO_WORKLOAD = "(no workload identity)"
NO_POLICY = "(none)"


# --- times ------------------------------------------------------------------------------------


def parse_time_bound(text: str, now: datetime, option: str) -> datetime:
    """Parse `--since`/`--until`: RFC 3339 with a zone, a date (midnight UTC) or a duration before now."""
    compact = text.strip()
    if _RELATIVE.match(compact):
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _RELATIVE_PART.findall(compact))
        return now - timedelta(seconds=seconds)
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", compact):
            day = date.fromisoformat(compact)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(compact)
    except ValueError as exc:
        raise ValueError(f"{option} {text!r}: invalid time ({exc}); use RFC 3339 such as 2026-07-01T00:00:00Z, "
                         "a date such as 2026-07-01, or a duration such as 24h or 90d") from exc
    if moment.tzinfo is None:
        raise ValueError(f"{option} {text!r}: the time has no zone; add Z for UTC or an offset such as +02:00")
    return moment


def record_time(record: dict[str, Any]) -> datetime | None:
    """Return the record's `time` as an aware datetime, or None when it is missing or invalid."""
    text = record.get("time")
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# --- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filters:
    """Conditions that a decision must meet to be listed or counted. An empty field matches everything."""

    subjects: frozenset[str] = frozenset()
    decision: str | None = None
    reasons: frozenset[str] = frozenset()
    policies: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    source_principals: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.subjects and record.get("user_sub") not in self.subjects:
            return False
        if self.reasons and record.get("reason") not in self.reasons:
            return False
        if self.policies and not self.policies.intersection(_policies(record)):
            return False
        if self.hosts and str(record.get("host", "")).lower() not in self.hosts:
            return False
        if self.source_principals and _workload(record) not in self.source_principals:
            return False
        if self.since is not None or self.until is not None:
            moment = record_time(record)
            if moment is None:
                return False
            if self.since is not None and moment < self.since:
                return False
            if self.until is not None and moment >= self.until:
                return False
        return True


def build_filters(*, subjects: Sequence[str] | None = None, decision: str | None = None,
                  reasons: Sequence[str] | None = None, policies: Sequence[str] | None = None,
                  hosts: Sequence[str] | None = None, source_principals: Sequence[str] | None = None,
                  since: str | None = None, until: str | None = None, now: datetime | None = None) -> Filters:
    """Validate the filter options; raise ValueError naming the option, the value and the fix."""
    now = now or datetime.now(UTC)
    for reason in reasons or ():
        if reason not in KNOWN_REASONS:
            close = difflib.get_close_matches(reason, sorted(KNOWN_REASONS), n=1)
            raise ValueError(f"--reason {reason!r}: unknown reason code"
                             + (f" (did you mean {close[0]!r}?)" if close else " (docs/decision-log.md lists them)"))
    for policy in policies or ():
        namespace, slash, name = policy.partition("/")
        if not slash or not namespace or not name or "/" in name:
            raise ValueError(f"--policy {policy!r}: expected NAMESPACE/NAME, such as payments/transfers-step-up")
    since_time = parse_time_bound(since, now, "--since") if since else None
    until_time = parse_time_bound(until, now, "--until") if until else None
    if since_time and until_time and since_time >= until_time:
        raise ValueError(f"--since {since} is not before --until {until}")
    return Filters(
        subjects=frozenset(subjects or ()),
        decision=decision,
        reasons=frozenset(reasons or ()),
        policies=frozenset(policies or ()),
        hosts=frozenset(host.lower() for host in hosts or ()),
        source_principals=frozenset(_strip_spiffe(principal) for principal in source_principals or ()),
        since=since_time,
        until=until_time,
    )


def _policies(record: dict[str, Any]) -> list[str]:
    value = record.get("policies")
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _strip_spiffe(principal: str) -> str:
    return principal.removeprefix("spiffe://")


def _workload(record: dict[str, Any]) -> str:
    return _strip_spiffe(str(record.get("source_principal") or ""))


# --- query ------------------------------------------------------------------------------------


@dataclass
class QueryResult:
    matches: list[LogEntry] = field(default_factory=list)
    decisions: int = 0
    checkpoints: int = 0


def run_query(reader: LogReader, filters: Filters) -> QueryResult:
    """Return the matching decisions, ordered by `time` (entries without a valid time last)."""
    result = QueryResult()
    for entry in reader:
        if entry.kind != "decision":
            result.checkpoints += 1
            continue
        result.decisions += 1
        if filters.matches(entry.record):
            result.matches.append(entry)
    far_future = datetime.max.replace(tzinfo=UTC)
    result.matches.sort(key=lambda entry: record_time(entry.record) or far_future)
    return result


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."


def format_age(seconds: float) -> str:
    """Format a login age such as 42s, 5m12s, 3h04m or 2d05h."""
    whole = int(seconds)
    if whole < 60:
        return f"{max(seconds, 0):.0f}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def login_summary(record: dict[str, Any]) -> str:
    """Describe the end user's login: acr, amr and its age at the Check, such as `mfa [pwd otp] 2m10s ago`."""
    if not record.get("user_sub"):
        return "-"
    parts = [str(record.get("user_acr") or "no acr")]
    amr = record.get("user_amr")
    if isinstance(amr, list) and amr:
        parts.append("[" + " ".join(str(method) for method in amr) + "]")
    age = record.get("auth_age_s")
    if isinstance(age, int | float) and not isinstance(age, bool):
        parts.append(f"{format_age(age)} ago")
    return " ".join(parts)


def request_summary(record: dict[str, Any]) -> str:
    """Describe the request as `METHOD host/path`, or `-` when it was rejected before it could be read."""
    if not record.get("host") and not record.get("path"):
        return "-"
    return f"{record.get('method', '?')} {record.get('host', '')}{record.get('path', '')}"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render rows as columns aligned with spaces, under upper-case headers."""
    text_rows = [[str(header).upper() for header in headers]] + [[_cut(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in text_rows) for index in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in text_rows)


def query_rows(matches: Iterable[LogEntry]) -> list[list[str]]:
    rows = []
    for entry in matches:
        record = entry.record
        rows.append([
            str(record.get("time", "?")),
            f"{record.get('decision', '?')} {record.get('status', '')}".strip(),
            str(record.get("reason", "?")),
            str(record.get("user_sub") or "-"),
            login_summary(record),
            _workload(record) or "-",
            request_summary(record),
            ",".join(_policies(record)) or "-",
            str(record.get("decision_id", "?")),
        ])
    return rows


QUERY_HEADERS = ("time", "decision", "reason", "subject", "login", "workload", "request", "policies", "decision_id")


# --- stats ------------------------------------------------------------------------------------


def reauth_policies_from_files(paths: Sequence[Path], provider: str) -> frozenset[str]:
    """Return the keys (NS/NAME) of the policies in `paths` that require re-authentication.

    Raises ConfigError for a policy file that does not load.
    """
    from extauthz.policy import load_policies

    # The token TTL cap only shapes minted tokens, which statistics never mint.
    policies = load_policies(paths, provider, token_ttl_cap=3600.0)
    return frozenset(policy.key for policy in policies if policy.requirements.sensitive)


@dataclass
class Statistics:
    """Counts over the matching decisions. `to_dict` is the JSON form, `render` the table form."""

    top: int = 10
    # Keys of the policies that require re-authentication, from policy files; None: inferred from the log.
    reauth_policies: frozenset[str] | None = None
    decisions: int = 0
    allowed: int = 0
    denied: int = 0
    checkpoints: int = 0
    first_time: str | None = None
    last_time: str | None = None
    _first: datetime | None = None
    _last: datetime | None = None
    by_policy_reason: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)
    checks_by_policy: Counter = field(default_factory=Counter)
    challenges_by_policy: Counter = field(default_factory=Counter)
    # Checks that matched at least one given re-authentication policy, and how many of them were challenged.
    reauth_checks: int = 0
    reauth_challenges: int = 0
    # With inference, the policy sets of challenged Checks, to count the Checks on them afterwards.
    checks_by_policy_set: Counter = field(default_factory=Counter)
    denied_subjects: Counter = field(default_factory=Counter)
    denied_workloads: Counter = field(default_factory=Counter)
    minted_by_audience: Counter = field(default_factory=Counter)
    would_deny: Counter = field(default_factory=Counter)

    def add(self, record: dict[str, Any]) -> None:
        self.decisions += 1
        reason = str(record.get("reason", "?"))
        allowed = record.get("decision") == "allow"
        if allowed:
            self.allowed += 1
        else:
            self.denied += 1
        moment = record_time(record)
        if moment is not None:
            if self._first is None or moment < self._first:
                self._first, self.first_time = moment, record["time"]
            if self._last is None or moment > self._last:
                self._last, self.last_time = moment, record["time"]

        policies = _policies(record)
        self.by_reason[reason] += 1
        for policy in policies or [NO_POLICY]:
            self.by_policy_reason[(policy, reason)] += 1
        for policy in policies:
            self.checks_by_policy[policy] += 1
            if reason == STEP_UP_REASON:
                self.challenges_by_policy[policy] += 1
        self.checks_by_policy_set[frozenset(policies)] += 1
        if self.reauth_policies is not None and self.reauth_policies.intersection(policies):
            self.reauth_checks += 1
            self.reauth_challenges += reason == STEP_UP_REASON

        if not allowed:
            self.denied_subjects[record.get("user_sub") or NO_USER] += 1
            self.denied_workloads[_workload(record) or NO_WORKLOAD] += 1
        elif record.get("token_aud"):
            self.minted_by_audience[str(record["token_aud"])] += 1
        if record.get("would_deny_reason"):
            self.would_deny[str(record["would_deny_reason"])] += 1

    def step_up(self) -> dict[str, Any]:
        """Return the step-up challenge rate per re-authentication policy and over all of them."""
        if self.reauth_policies is not None:
            policies = sorted(self.reauth_policies)
            checks, challenges = self.reauth_checks, self.reauth_challenges
            source = "policy files"
        else:
            # A policy that issued a challenge requires re-authentication, and so may the others that
            # matched the same request: all of them count.
            policies = sorted(policy for policy, count in self.challenges_by_policy.items() if count)
            inferred = frozenset(policies)
            checks = sum(count for policies_set, count in self.checks_by_policy_set.items()
                         if inferred.intersection(policies_set))
            challenges = self.by_reason[STEP_UP_REASON]
            source = "inferred from challenges in the log"
        rows = [{"policy": policy, "checks": self.checks_by_policy[policy],
                 "challenges": self.challenges_by_policy[policy],
                 "rate": _rate(self.challenges_by_policy[policy], self.checks_by_policy[policy])}
                for policy in policies]
        return {"source": source, "policies": rows,
                "total": {"checks": checks, "challenges": challenges, "rate": _rate(challenges, checks)}}

    def to_dict(self) -> dict[str, Any]:
        return {
            "decisions": self.decisions,
            "allow": self.allowed,
            "deny": self.denied,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "checkpoints_ignored": self.checkpoints,
            "by_reason": dict(_ranked(self.by_reason)),
            "by_policy_reason": [{"policy": policy, "reason": reason, "count": count}
                                 for (policy, reason), count in sorted(self.by_policy_reason.items())],
            "step_up": self.step_up(),
            "top_denied_subjects": [{"subject": name, "denies": count}
                                    for name, count in _ranked(self.denied_subjects)[:self.top]],
            "top_denied_workloads": [{"workload": name, "denies": count}
                                     for name, count in _ranked(self.denied_workloads)[:self.top]],
            "minted_tokens_by_audience": [{"audience": name, "tokens": count}
                                          for name, count in _ranked(self.minted_by_audience)],
            "dry_run_would_deny": dict(_ranked(self.would_deny)),
        }

    def render(self) -> str:
        data = self.to_dict()
        period = (f" from {self.first_time} to {self.last_time}" if self.first_time else "")
        sections = [f"Decisions: {self.decisions} ({self.allowed} allow, {self.denied} deny){period}"]

        sections.append("Decisions per policy and reason\n" + render_table(
            ("policy", "reason", "count"),
            [(row["policy"], row["reason"], row["count"]) for row in data["by_policy_reason"]]))

        step_up = data["step_up"]
        rows = [(row["policy"], row["checks"], row["challenges"], _percent(row["rate"]))
                for row in step_up["policies"]]
        total = step_up["total"]
        rows.append(("all of them", total["checks"], total["challenges"], _percent(total["rate"])))
        sections.append(f"Step-up challenge rate (re-authentication policies {step_up['source']})\n"
                        + render_table(("policy", "checks", "challenges", "rate"), rows))

        sections.append(f"Top {self.top} denied subjects\n" + render_table(
            ("subject", "denies"), [(row["subject"], row["denies"]) for row in data["top_denied_subjects"]]))
        sections.append(f"Top {self.top} denied workloads\n" + render_table(
            ("workload", "denies"), [(row["workload"], row["denies"]) for row in data["top_denied_workloads"]]))
        sections.append("Minted tokens per audience\n" + render_table(
            ("audience", "tokens"), [(row["audience"], row["tokens"]) for row in data["minted_tokens_by_audience"]]))
        if data["dry_run_would_deny"]:
            sections.append("Dry-run policies would have denied\n" + render_table(
                ("reason", "count"), list(data["dry_run_would_deny"].items())))
        return "\n\n".join(sections)


def _ranked(counter: Counter) -> list[tuple[str, int]]:
    """Return the counts, largest first and equal counts by name."""
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def run_stats(reader: LogReader, filters: Filters, *, top: int = 10,
              reauth_policies: frozenset[str] | None = None) -> Statistics:
    """Count the decisions that match `filters`."""
    statistics = Statistics(top=top, reauth_policies=reauth_policies)
    for entry in reader:
        if entry.kind != "decision":
            statistics.checkpoints += 1
            continue
        if filters.matches(entry.record):
            statistics.add(entry.record)
    return statistics
