"""`extauthz policy replay`: decide logged requests again under candidate policies, and list the changes.

Each logged decision becomes a CheckRequest again, built from the logged facts: method, host, path,
principals, source address, destination port, context extensions and the headers logged in clear.
The logged end-user claims stand in for the token. The request then goes through the Authorizer that
`serve` builds, with four differences:

- the clock reads the logged `time`, so a login's age is its age at the original Check;
- the store is an empty in-process store. Revocations are not consulted, and a one-time token is
  treated as used for the first time, with no claim recorded;
- injected secrets get a placeholder value, so no secret is read;
- minted tokens are signed with a throwaway key, even when the configuration names a key file.

Some logged outcomes depend on what a log does not keep: the token itself, revocation and one-time
state, the store's or a secret's availability, a malformed request. Those decisions are counted as
not replayable, with the cause, and never as changes. So is a decision for which a candidate policy
reads a fact the record lacks, such as a header logged only as a hash, when that fact could change
which policies match.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from extauthz.audit_query import record_time, render_table, request_summary
from extauthz.audit_read import LogEntry
from extauthz.config import Config, IssuerConfig, load_config
from extauthz.decision import Decision
from extauthz.decision_log import DiscardedLog
from extauthz.errors import ConfigError
from extauthz.identity import EndUser
from extauthz.jwks import IssuerKeys
from extauthz.policy import Condition, FieldMatch, Policy, Rule, rule_matches
from extauthz.replay import ReplayGuard
from extauthz.request import HttpRequest
from extauthz.secrets import Secrets, SecretUnavailable
from extauthz.server import build_authorizer
from extauthz.store import KeyNames, MemoryStore

# Logged reasons whose outcome a replay cannot reproduce, and why.
_TOKEN_CAUSE = "the token's own signature, audience and lifetime decided it, and the log does not keep the token"
_MALFORMED_CAUSE = "the request was malformed, and the log keeps no malformed value"
NOT_REPLAYABLE_REASONS = {
    "invalid_token": _TOKEN_CAUSE,
    "token_expired": _TOKEN_CAUSE,
    "token_revoked": "revocation state is not part of a replay",
    "token_replayed": "one-time token use is store state, not part of a replay",
    "state_unavailable": "the shared store was unreachable",
    "secret_unavailable": "a secret had no value",
    "audit_unavailable": "the decision log could not keep the record",
    "internal_error": "a failure inside extauthz decided it",
    "invalid_request": _MALFORMED_CAUSE,
    "invalid_path": _MALFORMED_CAUSE,
    "invalid_host": _MALFORMED_CAUSE,
    "invalid_authorization_header": _MALFORMED_CAUSE,
    "non_http_request": _MALFORMED_CAUSE,
}
REPLAYABLE_REASONS = frozenset(("allowed", "missing_token", "insufficient_user_authentication",
                                "no_matching_policy", "policy_conflict"))
# Each change counts once, as the first kind in this order that applies.
CHANGE_KINDS = ("allow_to_deny", "deny_to_allow", "reason_changed", "dry_run_changed", "token_audience_changed",
                "policies_changed")
# token.issuer of the configuration that a replay without --config builds.
REPLAY_TOKEN_ISSUER = "https://extauthz-replay.invalid"
PLACEHOLDER_SECRET = "replay-placeholder"
_HASHED_VALUE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
# Claims that every record of a verified token carries in its own fields.
_LOGGED_CLAIM_FIELDS = {"iss": "user_iss", "sub": "user_sub", "acr": "user_acr"}


class ReplayClock:
    """The time of the decision being replayed, as the Authorizer's clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FirstUseGuard(ReplayGuard):
    """One-time tokens in a replay: every use counts as the first, and nothing is written to a store."""

    def __init__(self) -> None:
        super().__init__(MemoryStore(), KeyNames("replay:"))

    def claim(self, user: EndUser, request: HttpRequest, now: float, leeway: float) -> bool:
        return False


class PlaceholderSecrets(Secrets):
    """The configured secret names, each with a placeholder value: a replay never reads a secret."""

    def __init__(self, names: Iterable[str]):
        super().__init__(())
        self._names = frozenset(names)

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def get(self, name: str) -> str:
        if name not in self._names:
            raise SecretUnavailable(f"secret {name!r} has no value")
        return PLACEHOLDER_SECRET


@dataclass(frozen=True, slots=True)
class LoggedFacts:
    """The names that the decision log records whenever a request has them, from --config.

    None means unknown: a missing header or claim in a record may then be one that was not logged.
    """

    headers: frozenset[str] | None = None
    claims: frozenset[str] | None = None


def read_logged_facts(config_path: Path | None) -> LoggedFacts:
    """Read `decision_log.headers`, `clear_headers` and `claims` from the configuration file, if any."""
    if config_path is None:
        return LoggedFacts()
    try:
        data = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
        # load_config reads the same file first and reports any error in it.
        return LoggedFacts()
    section = data.get("decision_log") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return LoggedFacts(frozenset(), frozenset())

    def names(key: str) -> frozenset[str]:
        value = section.get(key) or []
        return frozenset(item for item in value if isinstance(item, str)) if isinstance(value, list) else frozenset()

    headers = frozenset(name.lower() for name in names("headers") | names("clear_headers"))
    return LoggedFacts(headers=headers, claims=names("claims"))


# --- the change report --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: str
    reason: str
    policies: tuple[str, ...]
    detail: str = ""
    token_audience: str | None = None
    would_deny: str | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"decision": self.decision, "reason": self.reason, "policies": list(self.policies)}
        if self.detail:
            result["detail"] = self.detail
        if self.token_audience is not None:
            result["token_aud"] = self.token_audience
        if self.would_deny is not None:
            result["would_deny_reason"] = self.would_deny
        return result

    def render(self) -> str:
        text = f"{self.decision} {self.reason}"
        if self.detail:
            text += f" ({self.detail})"
        text += f" [{', '.join(self.policies)}]"
        if self.token_audience is not None:
            text += f" aud {self.token_audience}"
        if self.would_deny is not None:
            text += f", dry-run would deny: {self.would_deny}"
        return text


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    decision_id: str
    time: str
    source: str
    record: dict[str, Any] = field(repr=False)
    before: Outcome
    after: Outcome

    def as_dict(self) -> dict[str, Any]:
        return {"change": self.kind, "decision_id": self.decision_id, "time": self.time, "source": self.source,
                "request": request_facts(self.record), "before": self.before.as_dict(),
                "after": self.after.as_dict()}


def request_facts(record: dict[str, Any]) -> dict[str, Any]:
    facts = {"method": record.get("method"), "host": record.get("host"), "path": record.get("path"),
             "subject": record.get("user_sub"), "workload": record.get("source_principal") or None}
    return {name: value for name, value in facts.items() if value is not None}


@dataclass
class ReplayReport:
    decisions: int = 0
    checkpoints: int = 0
    replayed: int = 0
    changes: list[Change] = field(default_factory=list)
    not_replayable: Counter = field(default_factory=Counter)

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(change.kind for change in self.changes)
        return {kind: counts[kind] for kind in CHANGE_KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [change.as_dict() for change in self.changes],
            "totals": {
                "decisions": self.decisions,
                "replayed": self.replayed,
                "unchanged": self.replayed - len(self.changes),
                "changed": len(self.changes),
                **self.counts,
                "not_replayable": sum(self.not_replayable.values()),
            },
            "not_replayable": [{"cause": cause, "decisions": count}
                               for cause, count in self.not_replayable.most_common()],
            "checkpoints_ignored": self.checkpoints,
        }

    def render(self) -> str:
        lines = []
        for change in self.changes:
            record = change.record
            caller = f"subject {record.get('user_sub') or '-'}, workload {record.get('source_principal') or '-'}"
            lines.append(f"{change.time}  {change.decision_id}  {request_summary(record)}  ({caller})")
            lines.append(f"  before: {change.before.render()}")
            lines.append(f"  after:  {change.after.render()}")
        if self.changes:
            lines.append("")
        counts = self.counts
        lines.append(f"{self.decisions} decisions: {self.replayed} replayed, {len(self.changes)} changed, "
                     f"{self.replayed - len(self.changes)} unchanged, "
                     f"{sum(self.not_replayable.values())} not replayable")
        lines.append(render_table(("change", "decisions"),
                                  [(kind.replace("_to_", "->").replace("_", " "), counts[kind])
                                   for kind in CHANGE_KINDS]))
        if self.not_replayable:
            lines.append("")
            lines.append("Not replayable")
            lines.append(render_table(("decisions", "cause"),
                                      [(count, cause) for cause, count in self.not_replayable.most_common()]))
        return "\n".join(lines)


# --- replaying one record -----------------------------------------------------------------------


def build_check_request(record: dict[str, Any]) -> external_auth_pb2.CheckRequest:
    """Build the CheckRequest that the logged request facts describe."""
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.principal = str(record.get("source_principal") or "")
    attributes.source.address.socket_address.address = str(record.get("source_address") or "")
    attributes.destination.principal = str(record.get("destination_principal") or "")
    port = record.get("destination_port")
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port <= 65535:
        attributes.destination.address.socket_address.port_value = port
    http = attributes.request.http
    http.method = str(record.get("method") or "")
    http.host = str(record.get("host") or "")
    http.path = str(record.get("path") or "")
    # NOTE: the scheme is not logged. http only matters to hosts values with a port and to ports
    # conditions on a request without a destination port, and both count as not replayable.
    http.scheme = "http"

    headers = {":method": http.method, ":path": http.path, ":authority": http.host}
    if record.get("request_id"):
        headers["x-request-id"] = str(record["request_id"])
    for name, value in _clear_headers(record).items():
        headers[name] = value
    for name, value in headers.items():
        http.headers[name] = value
    extensions = record.get("context_extensions")
    if isinstance(extensions, dict):
        for name, value in extensions.items():
            attributes.context_extensions[str(name)] = str(value)
    return external_auth_pb2.CheckRequest(attributes=attributes)


def _clear_headers(record: dict[str, Any]) -> dict[str, str]:
    headers = record.get("headers")
    if not isinstance(headers, dict):
        return {}
    return {str(name).lower(): value for name, value in headers.items()
            if isinstance(value, str) and not _HASHED_VALUE.match(value)}


def build_claims(record: dict[str, Any], now: float, default_audience: str | None) -> dict[str, Any] | None:
    """Return the end-user claims that the record logs, or None when the Check had no end user.

    `exp` and `iat` are rarely logged. The token was valid at the Check, so they are set around it.
    """
    if not record.get("user_sub"):
        return None
    user_claims = record.get("user_claims")
    claims: dict[str, Any] = dict(user_claims) if isinstance(user_claims, dict) else {}
    claims["iss"] = record.get("user_iss")
    claims["sub"] = record["user_sub"]
    if "user_aud" in record:
        claims["aud"] = record["user_aud"]
    elif default_audience is not None:
        claims["aud"] = default_audience
    if "user_acr" in record:
        claims["acr"] = record["user_acr"]
    if "user_amr" in record:
        claims["amr"] = record["user_amr"]
    if "user_auth_time" in record:
        claims["auth_time"] = record["user_auth_time"]
    elif isinstance(record.get("auth_age_s"), int | float):
        claims["auth_time"] = now - record["auth_age_s"]
    claims.setdefault("iat", math.floor(now))
    claims.setdefault("exp", math.floor(now) + 1)
    return claims


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_string_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(item, str) for item in value.values())


# Field checks of the facts a replay reads, so that a damaged record is not mistaken for a changed decision.
_FIELD_TYPES = {
    "user_sub": lambda value: isinstance(value, str),
    "user_iss": lambda value: isinstance(value, str),
    "user_acr": lambda value: isinstance(value, str),
    "user_aud": _is_strings,
    "user_amr": _is_strings,
    "user_auth_time": _is_number,
    "auth_age_s": _is_number,
    "user_claims": lambda value: isinstance(value, dict),
    "headers": _is_string_map,
    "context_extensions": _is_string_map,
    "destination_port": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "policies": _is_strings,
    "source_principal": lambda value: isinstance(value, str),
    "source_address": lambda value: isinstance(value, str),
    "destination_principal": lambda value: isinstance(value, str),
}


def _malformed_field(record: dict[str, Any]) -> str | None:
    """Return the name of the first field whose value has the wrong type, or None."""
    for name, valid in _FIELD_TYPES.items():
        if name in record and not valid(record[name]):
            return name
    if record.get("user_sub") and not isinstance(record.get("user_iss"), str):
        return "user_iss"
    return None


def _unknown_field(match: FieldMatch, record: dict[str, Any]) -> str | None:
    """Return why the record cannot tell whether `match` holds, or None when it can."""
    if match.kind == "port" and not isinstance(record.get("destination_port"), int):
        return f"{match.name}, and the record has no destination_port"
    if match.kind == "host" and any(":" in value.text for value in match.values):
        return f"{match.name} with a port, and the log keeps neither the authority's port nor the scheme"
    return None


def _unknown_condition(condition: Condition, record: dict[str, Any], enveloped: bool,
                       facts: LoggedFacts) -> str | None:
    """Return why the record cannot tell whether `condition` holds, or None when it can."""
    key = condition.key
    if key == "request.headers":
        name = condition.selector[0]
        label = f"request.headers[{name}]"
        if name == ":method":
            return None
        if name.startswith(":"):
            return f"{label}, a pseudo-header the log keeps only normalised"
        headers = record.get("headers") if isinstance(record.get("headers"), dict) else {}
        if name in headers:
            value = headers[name]
            return f"{label}, which the log contains only as a sha256 hash" if _HASHED_VALUE.match(str(value)) else None
        if enveloped and facts.headers is not None and name in facts.headers:
            return None
        return f"{label}, which the log does not contain"
    if key == "context_extensions":
        return None if enveloped or "context_extensions" in record else (
            f"context_extensions[{condition.selector[0]}], and the record has no context_extensions")
    if key == "destination.port":
        return None if isinstance(record.get("destination_port"), int) else (
            "destination.port, and the record has no destination_port")
    if key == "destination.ip":
        return "destination.ip, which the log does not contain"
    if not record.get("user_sub") or key == "request.auth.principal":
        return None
    if key == "request.auth.audiences":
        return None if "user_aud" in record else "request.auth.audiences, and the record has no user_aud"
    if key == "request.auth.presenter":
        return _unknown_claim("azp", "request.auth.presenter", record, enveloped, facts)
    if key == "request.auth.claims":
        return _unknown_claim(condition.selector[0], f"request.auth.claims[{']['.join(condition.selector)}]",
                              record, enveloped, facts)
    return None


def _unknown_claim(claim: str, label: str, record: dict[str, Any], enveloped: bool, facts: LoggedFacts) -> str | None:
    if claim in _LOGGED_CLAIM_FIELDS:
        return None
    user_claims = record.get("user_claims") if isinstance(record.get("user_claims"), dict) else {}
    if claim in user_claims:
        return None
    if claim == "aud" and "user_aud" in record:
        return None
    if claim == "amr" and ("user_amr" in record or enveloped):
        return None
    if claim == "auth_time" and ("user_auth_time" in record or "auth_age_s" in record or enveloped):
        return None
    if enveloped and facts.claims is not None and claim in facts.claims:
        return None
    return f"{label}, a claim that the log does not contain"


def _rule_outcome(rule: Rule, request: HttpRequest, user: EndUser | None,
                  unknown: dict[int, str]) -> bool | None:
    """Return whether the rule matches, or None when it depends on the parts in `unknown` (by id)."""
    # With every unknown part taken as true, the rule matches at least as often as it really does.
    optimistic = Rule(
        sources=tuple(tuple(part for part in source if id(part) not in unknown) for source in rule.sources),
        operations=tuple(tuple(part for part in operation if id(part) not in unknown)
                         for operation in rule.operations),
        conditions=tuple(condition for condition in rule.conditions if id(condition) not in unknown))
    if not rule_matches(optimistic, request, user):
        return False
    if not unknown:
        return True

    # With every unknown part taken as false, it matches at most as often as it really does.
    sources = tuple(source for source in rule.sources if not any(id(part) in unknown for part in source))
    operations = tuple(operation for operation in rule.operations
                       if not any(id(part) in unknown for part in operation))
    if ((rule.sources and not sources) or (rule.operations and not operations)
            or any(id(condition) in unknown for condition in rule.conditions)):
        return None
    return True if rule_matches(Rule(sources, operations, rule.conditions), request, user) else None


class Replayer:
    """The real Authorizer, set up to decide logged requests again under the candidate policies."""

    def __init__(self, config: Config, facts: LoggedFacts, learn_issuers: bool):
        self.config = config
        self.facts = facts
        # Without --config the issuers come from the log itself, each accepting the audiences logged for it.
        self.learn_issuers = learn_issuers
        self.clock = ReplayClock()
        self.decision_log = DiscardedLog()
        issuer_keys = {issuer.issuer: IssuerKeys(issuer) for issuer in config.issuers}
        self.authorizer, _ = build_authorizer(config, self.decision_log, issuer_keys, store=MemoryStore(),
                                              secrets=PlaceholderSecrets(secret.name for secret in config.secrets))
        # build_authorizer wires serve's clock and one-time guard. A replay needs the logged time and no writes.
        self.authorizer.clock = self.clock
        self.authorizer.verifier.clock = self.clock
        self.authorizer.minter.clock = self.clock
        self.authorizer.revocations.clock = self.clock
        self.authorizer.replay = FirstUseGuard()

    def close(self) -> None:
        self.decision_log.close()

    @property
    def policies(self) -> Sequence[Policy]:
        return self.authorizer.policies.policies

    def replay(self, entries: Iterable[LogEntry]) -> ReplayReport:
        report = ReplayReport()
        for entry in entries:
            if entry.kind != "decision":
                report.checkpoints += 1
                continue
            report.decisions += 1
            outcome = self.replay_record(entry)
            if isinstance(outcome, str):
                report.not_replayable[outcome] += 1
                continue
            report.replayed += 1
            if outcome is not None:
                report.changes.append(outcome)
        return report

    def replay_record(self, entry: LogEntry) -> Change | str | None:
        """Return the change for one decision, None when it is unchanged, or why it is not replayable."""
        record = entry.record
        reason = record.get("reason")
        if reason in NOT_REPLAYABLE_REASONS:
            return f"logged {reason}: {NOT_REPLAYABLE_REASONS[reason]}"
        if reason not in REPLAYABLE_REASONS or record.get("decision") not in ("allow", "deny"):
            return f"logged reason {reason!r} is not one this version of extauthz knows"
        moment = record_time(record)
        if moment is None:
            return "the record has no valid time"
        if not all(isinstance(record.get(name), str) and record.get(name) for name in ("method", "host", "path")):
            return "the record has no method, host or path"
        malformed = _malformed_field(record)
        if malformed is not None:
            return f"the record's {malformed} has the wrong type"
        enveloped = "type" in record
        if not enveloped and not record.get("destination_principal") and "context_extensions" not in record:
            return ("the record names no destination namespace: no destination principal, and records "
                    "older than the context_extensions field do not contain the namespace extension")

        self.clock.now = moment.timestamp()
        default_audience = self._prepare_issuer(record)
        decision = self.authorizer.check(build_check_request(record),
                                         claims=build_claims(record, self.clock.now, default_audience))
        if decision.request is None:
            return f"the logged request facts do not form a valid request ({decision.reason})"
        if record.get("user_sub") and decision.user is None:
            # The logged claims fail the configured issuer's checks: no policy was evaluated.
            return _compare(entry, decision)
        cause = self._unknown_inputs(record, decision, enveloped)
        if cause is not None:
            return cause
        return _compare(entry, decision)

    def _prepare_issuer(self, record: dict[str, Any]) -> str | None:
        """Return the audience to claim when the record has no user_aud; learn the issuer without --config."""
        issuer_name = record.get("user_iss")
        if not record.get("user_sub") or not isinstance(issuer_name, str):
            return None
        verifier = self.authorizer.verifier
        logged = record.get("user_aud")
        audiences = tuple(logged) if isinstance(logged, list) else ()
        known = verifier.issuers.get(issuer_name)
        if self.learn_issuers:
            accepted = known.config.audiences if known else ()
            merged = tuple(dict.fromkeys((*accepted, *audiences))) or ("replay",)
            if known is None or merged != accepted:
                verifier.issuers[issuer_name] = IssuerKeys(_learned_issuer(issuer_name, merged))
            return merged[0]
        return known.config.audiences[0] if known else None

    def _unknown_inputs(self, record: dict[str, Any], decision: Decision, enveloped: bool) -> str | None:
        """Return which unlogged fact could change the matching policies, or None when none could."""
        request = decision.request
        assert request is not None
        policies = self.authorizer.policies
        namespaces = (policies.root_namespace, request.destination_namespace)
        for policy in self.policies:
            if policy.namespace not in namespaces:
                continue
            causes: list[str] = []
            matched: bool | None = False
            for rule in policy.rules:
                unknown = {}
                for part in (*(part for source in rule.sources for part in source),
                             *(part for operation in rule.operations for part in operation)):
                    cause = _unknown_field(part, record)
                    if cause:
                        unknown[id(part)] = cause
                for condition in rule.conditions:
                    cause = _unknown_condition(condition, record, enveloped, self.facts)
                    if cause:
                        unknown[id(condition)] = cause
                outcome = _rule_outcome(rule, request, decision.user, unknown)
                if outcome:
                    matched = True
                    break
                if outcome is None:
                    matched = None
                    causes.extend(unknown.values())
            if matched is None:
                return f"policy {policy.key} reads {causes[0]}"
        return None


def _learned_issuer(issuer: str, audiences: tuple[str, ...]) -> IssuerConfig:
    return IssuerConfig(issuer=issuer, audiences=audiences, algorithms=("ES256",), jwks_file=None,
                        jwks_uri="https://replay.invalid/jwks.json", jwks_ca_file=None, max_token_lifetime=None,
                        leeway=0.0, jwks_refresh_interval=300.0, jwks_min_refresh_interval=30.0, jwks_timeout=2.0)


def _compare(entry: LogEntry, decision: Decision) -> Change | None:
    record = entry.record
    policies = record.get("policies")
    before = Outcome(
        decision=str(record["decision"]),
        reason=str(record["reason"]),
        policies=tuple(str(item) for item in policies) if isinstance(policies, list) else (),
        detail=str(record.get("detail") or ""),
        token_audience=record.get("token_aud") if record["decision"] == "allow" else None,
        would_deny=record.get("would_deny_reason"),
    )
    after = Outcome(
        decision=decision.outcome,
        reason=decision.reason,
        policies=tuple(decision.policies),
        detail=decision.detail,
        token_audience=decision.minted.audience if decision.minted is not None else None,
        would_deny=decision.would_deny.code if decision.would_deny is not None else None,
    )
    if before.decision == "allow" and after.decision == "deny":
        kind = "allow_to_deny"
    elif before.decision == "deny" and after.decision == "allow":
        kind = "deny_to_allow"
    elif before.reason != after.reason:
        kind = "reason_changed"
    elif before.would_deny != after.would_deny:
        kind = "dry_run_changed"
    elif before.token_audience != after.token_audience:
        kind = "token_audience_changed"
    elif sorted(before.policies) != sorted(after.policies):
        kind = "policies_changed"
    else:
        return None
    return Change(kind, str(record.get("decision_id", "?")), str(record.get("time", "?")), entry.source,
                  record, before, after)


# --- configuration ------------------------------------------------------------------------------


def replay_config(config_path: Path | None, policy_paths: Sequence[Path], *, provider: str = "extauthz",
                  root_namespace: str = "istio-system") -> Config:
    """Load the configuration for a replay, with the candidate policies in place of its own.

    Without a configuration file the defaults apply, with `provider` and `root_namespace`. Raises
    ConfigError for an unusable file or a missing policy path.
    """
    for path in policy_paths:
        if not path.exists():
            raise ConfigError(str(path), "", "not found", "pass existing policy files or folders to --policies")
    if config_path is not None:
        config = load_config(config_path)
    else:
        with tempfile.TemporaryDirectory(prefix="extauthz-replay-") as folder:
            defaults = {"policies": {"provider": provider, "root_namespace": root_namespace,
                                     "paths": [str(path.resolve()) for path in policy_paths]},
                        "token": {"issuer": REPLAY_TOKEN_ISSUER}}
            generated = Path(folder) / "replay-config.yaml"
            generated.write_text(yaml.safe_dump(defaults), encoding="utf-8")
            config = load_config(generated)
    signing = dataclasses.replace(config.token.signing, key_file=None)
    return dataclasses.replace(
        config,
        policies=dataclasses.replace(config.policies, paths=tuple(policy_paths)),
        token=dataclasses.replace(config.token, signing=signing),
    )
