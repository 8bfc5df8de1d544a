"""`extauthz policy check`: every problem in AuthorizationPolicy files, before they ship.

The files are read exactly as `serve` reads them (extauthz.policy). Each problem names the file, the
document index, the field and a fix, with a severity:

- error: `serve` would refuse to start or reload with this file;
- warning: `serve` accepts it, but it cannot work as written (a rule that can never match, a TTL
  above the global cap, settings that conflict with another policy's);
- info: worth knowing, such as a CUSTOM policy for another provider, which extauthz ignores.

Exit status: 0 with no error or warning, 1 with any, 2 when an input cannot be read at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from extauthz.config import parse_duration
from extauthz.errors import ConfigError
from extauthz.policy import ANNOTATION_PREFIX, Policy, parse_policy, policy_files

ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclass(frozen=True, slots=True)
class Problem:
    severity: str
    file: str
    document: int | None
    field: str
    message: str
    fix: str | None = None

    def render(self) -> str:
        where = self.file if self.document is None else f"{self.file}#{self.document}"
        field = f" {self.field}:" if self.field else ""
        fix = f" ({self.fix})" if self.fix else ""
        return f"{where}:{field} {self.severity}: {self.message}{fix}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnusableInput(Exception):
    """A path that cannot be read at all: exit status 2."""


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """The settings that `policy check` takes from a configuration file."""

    provider: str = "extauthz"
    token_ttl_cap: float = 30.0
    root_namespace: str = "istio-system"
    secret_names: frozenset[str] | None = None


def read_check_settings(path: Path) -> CheckSettings:
    """Read the provider, token.ttl, root namespace and secret names from a configuration file.

    Only these keys are read and checked, so a configuration written for a cluster (with paths that
    exist only there) can check policies on a workstation. Raise UnusableInput when they are invalid.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
        raise UnusableInput(f"{path}: cannot read the configuration: {exc}") from exc
    if not isinstance(data, dict):
        raise UnusableInput(f"{path}: expected a mapping at the top level")
    policies = data.get("policies") or {}
    token = data.get("token") or {}
    secrets = data.get("secrets") or {}
    if not isinstance(policies, dict) or not isinstance(token, dict) or not isinstance(secrets, dict):
        raise UnusableInput(f"{path}: policies, token and secrets must be mappings")
    try:
        ttl = parse_duration(token.get("ttl", "30s"))
    except ValueError as exc:
        raise UnusableInput(f"{path}: token.ttl: {exc}") from exc
    return CheckSettings(
        provider=str(policies.get("provider", "extauthz")),
        token_ttl_cap=ttl,
        root_namespace=str(policies.get("root_namespace", "istio-system")),
        secret_names=frozenset(str(name) for name in secrets),
    )


@dataclass(frozen=True, slots=True)
class _Checked:
    policy: Policy
    file: str
    document: int


def check_policies(paths: Iterable[Path], provider: str, token_ttl_cap: float,
                   root_namespace: str = "istio-system", secret_names: frozenset[str] | None = None) -> list[Problem]:
    """Return every problem found in the policy files under `paths`; raise UnusableInput."""
    return check_policy_files(paths, provider, token_ttl_cap, root_namespace, secret_names)[0]


def check_policy_files(paths: Iterable[Path], provider: str, token_ttl_cap: float,
                       root_namespace: str = "istio-system",
                       secret_names: frozenset[str] | None = None) -> tuple[list[Problem], int, int]:
    """Return the problems, the number of files read and the number of extauthz policies found."""
    paths = list(paths)
    problems: list[Problem] = []
    checked: list[_Checked] = []
    files = 0
    for path in paths:
        if not path.exists():
            raise UnusableInput(f"{path}: not found")
    for path in policy_files(paths):
        files += 1
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UnusableInput(f"{path}: cannot read: {exc}") from exc
        try:
            documents = list(yaml.safe_load_all(text))
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            problems.append(Problem(ERROR, str(path), None, "", f"invalid YAML: {exc}".replace("\n", " "),
                                    "fix the YAML syntax"))
            continue
        for index, document in enumerate(documents):
            problems.extend(_check_document(path, index, document, provider, token_ttl_cap, checked, secret_names))

    problems.extend(_check_across(checked, root_namespace))
    return problems, files, len(checked)


def _check_document(path: Path, index: int, document: object, provider: str, token_ttl_cap: float,
                    checked: list[_Checked], secret_names: frozenset[str] | None = None) -> list[Problem]:
    file = str(path)
    if document is None:
        return []
    if not isinstance(document, dict):
        return [Problem(ERROR, file, index, "", "expected a Kubernetes object",
                        "write a mapping with apiVersion and kind")]
    if document.get("kind") != "AuthorizationPolicy":
        return []

    spec = document.get("spec") if isinstance(document.get("spec"), dict) else {}
    provider_name = (spec.get("provider") or {}).get("name") if isinstance(spec.get("provider"), dict) else None
    if spec.get("action") == "CUSTOM" and provider_name != provider:
        return [Problem(INFO, file, index, "spec.provider.name",
                        f"CUSTOM policy for provider {provider_name!r}, not {provider!r}: extauthz ignores it",
                        f"set spec.provider.name to {provider!r} if extauthz should enforce it")]

    # A cap below the requested TTL is a warning here; parse it with no cap so it is not reported twice.
    try:
        policy = parse_policy(document, f"{file}#{index}", provider, float("inf"), secret_names)
    except ConfigError as exc:
        return [Problem(ERROR, file, index, exc.key, exc.message, exc.fix)]
    if policy is None:
        return []

    problems = []
    checked.append(_Checked(policy, file, index))
    annotations = (document.get("metadata") or {}).get("annotations") or {}
    problems.extend(_check_annotations(file, index, annotations, policy, token_ttl_cap))
    if (policy.requirements.injections and (spec.get("selector") or spec.get("targetRefs") or spec.get("targetRef"))
            and not _limits_callers(policy)):
        problems.append(Problem(
            WARNING, file, index, f"metadata.annotations[{ANNOTATION_PREFIX}inject-secret]",
            "extauthz does not see workload labels, so selector and targetRefs do not limit who gets the "
            "secret: any request to this namespace that matches the rules does",
            "limit the rules with from.source.principals (or notPrincipals) as well"))
    problems.extend(_check_rules(file, index, spec))
    return problems


def _limits_callers(policy: Policy) -> bool:
    """Return whether every rule names the calling workloads (principals or namespaces)."""
    caller_fields = {"principals", "notPrincipals", "namespaces", "notNamespaces"}
    return bool(policy.rules) and all(
        rule.sources and all(any(field.name in caller_fields for field in source) for source in rule.sources)
        for rule in policy.rules)


def _check_annotations(file: str, index: int, annotations: dict[str, Any], policy: Policy,
                       token_ttl_cap: float) -> list[Problem]:
    problems = []
    ttl_text = annotations.get(ANNOTATION_PREFIX + "token-ttl")
    if isinstance(ttl_text, str) and parse_duration(ttl_text) > token_ttl_cap:
        problems.append(Problem(WARNING, file, index, f"metadata.annotations[{ANNOTATION_PREFIX}token-ttl]",
                                f"{ttl_text} is above token.ttl ({token_ttl_cap:g}s): tokens get {token_ttl_cap:g}s",
                                "lower the annotation or raise token.ttl"))
    require_user = annotations.get(ANNOTATION_PREFIX + "require-user")
    needs_user = policy.requirements.sensitive or policy.requirements.one_time_token
    if isinstance(require_user, str) and require_user.lower() == "false" and needs_user:
        problems.append(Problem(WARNING, file, index, f"metadata.annotations[{ANNOTATION_PREFIX}require-user]",
                                '"false" conflicts with the re-authentication or one-time-token settings, '
                                "which require an end user",
                                f"drop {ANNOTATION_PREFIX}require-user"))
    return problems


def _exact_values(values: object) -> set[str]:
    if not isinstance(values, list):
        return set()
    return {value for value in values if isinstance(value, str) and "*" not in value and "{" not in value}


def _all_excluded(values: object, excluded: object) -> bool:
    """Return True when every entry of `values` is an exact value that `excluded` also lists."""
    if not isinstance(values, list) or not values:
        return False
    allowed = _exact_values(values)
    # A wildcard or template value still allows requests that no exact excluded value names.
    return allowed == set(values) and allowed <= _exact_values(excluded)


def _check_rules(file: str, index: int, spec: dict[str, Any]) -> list[Problem]:
    rules = spec.get("rules")
    if not rules:
        return [Problem(WARNING, file, index, "spec.rules", "the policy has no rules, so it matches no request",
                        "add a rule; an empty rule {} matches every request")]
    problems = []
    for rule_index, rule in enumerate(rules):
        prefix = f"spec.rules[{rule_index}]"
        sections = [("from", "source"), ("to", "operation")]
        for section, inner in sections:
            for entry_index, entry in enumerate(rule.get(section) or []):
                fields = (entry or {}).get(inner) or {}
                for name, values in fields.items():
                    if name.startswith("not"):
                        continue
                    negated = "not" + name[0].upper() + name[1:]
                    if _all_excluded(values, fields.get(negated)):
                        problems.append(Problem(
                            WARNING, file, index, f"{prefix}.{section}[{entry_index}].{inner}.{negated}",
                            f"excludes every value that {name} allows ({', '.join(sorted(set(values)))}), "
                            "so the rule can never match", f"remove them from {negated}"))
        for condition_index, condition in enumerate(rule.get("when") or []):
            if _all_excluded((condition or {}).get("values"), (condition or {}).get("notValues")):
                problems.append(Problem(WARNING, file, index, f"{prefix}.when[{condition_index}].notValues",
                                        "excludes every value that values allows, so the rule can never match",
                                        "remove them from notValues"))
    return problems


def _paths(policy: Policy) -> list[str] | None:
    """Return the path patterns a policy's rules allow, or None when some rule allows any path."""
    patterns: list[str] = []
    for rule in policy.rules:
        if not rule.operations:
            return None
        for operation in rule.operations:
            path_fields = [field for field in operation if field.name == "paths"]
            if not path_fields:
                return None
            patterns.extend(value.text for field in path_fields for value in field.values)
    return patterns


def _patterns_overlap(first: str, second: str) -> bool:
    def covers(pattern: str, other: str) -> bool:
        if pattern == "*" or pattern == other:
            return True
        if "{" in pattern:
            pattern = pattern.split("{", 1)[0] + "*"
        if pattern.endswith("*"):
            return other.startswith(pattern[:-1]) or other.rstrip("*").startswith(pattern[:-1])
        if pattern.startswith("*"):
            return other.endswith(pattern[1:])
        return False

    return covers(first, second) or covers(second, first)


def _may_overlap(first: Policy, second: Policy) -> bool:
    first_paths, second_paths = _paths(first), _paths(second)
    if first_paths is None or second_paths is None:
        return bool(first.rules) and bool(second.rules)
    return any(_patterns_overlap(a, b) for a in first_paths for b in second_paths)


def _check_across(checked: list[_Checked], root_namespace: str) -> list[Problem]:
    problems = []
    for first, second in itertools.combinations(checked, 2):
        a, b = first.policy, second.policy
        if a.namespace != b.namespace and root_namespace not in (a.namespace, b.namespace):
            continue
        if a.dry_run or b.dry_run or not _may_overlap(a, b):
            continue
        audiences = {a.requirements.token_audience, b.requirements.token_audience} - {None}
        if len(audiences) > 1:
            problems.append(Problem(
                WARNING, second.file, second.document, f"metadata.annotations[{ANNOTATION_PREFIX}token-audience]",
                f"conflicts with {a.key} ({first.file}#{first.document}) on overlapping paths: a request matching "
                f"both is denied with policy_conflict", "use one audience, or make the paths disjoint"))
        acr_sets = a.requirements.acr_values + b.requirements.acr_values
        if len(acr_sets) > 1 and not frozenset.intersection(*acr_sets):
            problems.append(Problem(
                WARNING, second.file, second.document, f"metadata.annotations[{ANNOTATION_PREFIX}acr-values]",
                f"shares no acr value with {a.key} ({first.file}#{first.document}) on overlapping paths: "
                "a request matching both is denied with policy_conflict", "accept at least one common acr value"))
    for first, second in itertools.combinations(checked, 2):
        if first.policy.key == second.policy.key:
            problems.append(Problem(ERROR, second.file, second.document, "metadata.name",
                                    f"duplicate policy {second.policy.key}, also in {first.file}#{first.document}",
                                    "rename one of them"))
    return problems
