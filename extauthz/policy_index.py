"""The policy set that Checks match against: rules compiled to predicates, indexed by path, host and method.

`PolicySet.match` returns exactly the list that `PolicySet.match_linear` returns: every policy that
applies to the request's destination (root namespace first, then the destination's namespace, each in
load order) and one of whose rules matches by `extauthz.policy.rule_matches`. Two things make it
cheaper, and tests/test_policy_index.py compares both functions on random policies and requests:

- Each rule is compiled once into predicates that read the request directly. A field's exact values
  become one set lookup, its prefixes one `str.startswith` call with a tuple.
- In a namespace with more than `index_threshold` policies, an index finds the candidates. Each rule
  is keyed on one field of each `to` operation that every request it matches must satisfy: `paths`,
  else `hosts`, else `methods`. Exact values go into a dict, prefixes and path templates (by their
  literal start) and suffixes into dicts looked up once per distinct length. A policy with a rule that
  has no such field, such as a rule without `to` or with only `notPaths`, is a candidate for every
  request. The candidates are then evaluated in full, in load order, so the index only skips
  policies that cannot match.

The cost of a match then grows with the number of policies that share the request's path, host or
method key, not with the size of the namespace. bench/policy_index.py measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from extauthz.identity import EndUser
from extauthz.policy import (
    Condition,
    FieldMatch,
    Policy,
    Requirements,
    Rule,
    StringMatch,
    combine_requirements,
    condition_candidates,
    in_networks,
    request_candidates,
    rule_matches,
)
from extauthz.request import HttpRequest

Predicate = Callable[[HttpRequest, EndUser | None], bool]

# Below this many policies in a namespace, trying each compiled policy costs less than the index lookups.
INDEX_THRESHOLD = 4
# Distinct sets of matching policies whose merged requirements are kept. Past it, they are merged anew.
REQUIREMENTS_CACHE_SIZE = 4096
# The fields an index can key on, most selective first.
_INDEX_FIELDS = ("path", "host", "method")


# --- compiled predicates ----------------------------------------------------------------------


def compile_values(values: Sequence[StringMatch]) -> Callable[[str], bool]:
    """Return a test equal to `any(value.matches(candidate) for value in values)`."""
    exact = frozenset(value.operand for value in values if value.mode == "exact")
    prefixes = tuple(value.operand for value in values if value.mode == "prefix")
    suffixes = tuple(value.operand for value in values if value.mode == "suffix")
    templates = tuple(value.test for value in values if value.mode == "template")
    any_value = any(value.mode == "any" for value in values)
    if not (prefixes or suffixes or templates or any_value):
        return exact.__contains__

    def test(candidate: str) -> bool:
        if candidate in exact or (any_value and candidate != ""):
            return True
        # str.startswith and str.endswith with an empty tuple return False.
        if candidate.startswith(prefixes) or candidate.endswith(suffixes):
            return True
        return any(template(candidate) for template in templates)

    return test


def _compile_field(match: FieldMatch) -> Predicate:
    negated = match.negated
    kind = match.kind
    if kind == "ip":
        networks = match.values
        return lambda request, user: in_networks(request.source_address, networks) != negated
    if kind == "port":
        ports = frozenset(match.values)
        return lambda request, user: (request.port in ports) != negated

    test = compile_values(match.values)
    if kind == "path":
        return lambda request, user: test(request.path) != negated
    if kind == "method":
        return lambda request, user: test(request.method) != negated

    def holds(request: HttpRequest, user: EndUser | None) -> bool:
        hit = False
        for candidate in request_candidates(kind, request, user):
            if test(candidate):
                hit = True
                break
        return hit != negated

    return holds


def _compile_hits(kind: str, values: tuple) -> Callable[[tuple], bool]:
    """Return a test of whether any of a condition's candidates matches any of `values`."""
    if kind == "ip":
        return lambda candidates: any(in_networks(candidate, values) for candidate in candidates)
    if kind == "port":
        ports = frozenset(values)
        return lambda candidates: any(candidate in ports for candidate in candidates)
    test = compile_values(values)
    return lambda candidates: any(test(candidate) for candidate in candidates)


def _compile_condition(condition: Condition) -> Predicate:
    values_hit = _compile_hits(condition.kind, condition.values) if condition.values else None
    not_values_hit = _compile_hits(condition.kind, condition.not_values) if condition.not_values else None

    def holds(request: HttpRequest, user: EndUser | None) -> bool:
        candidates = condition_candidates(condition, request, user)
        if values_hit is not None and not values_hit(candidates):
            return False
        return not (not_values_hit is not None and not_values_hit(candidates))

    return holds


def _any_group_holds(groups: tuple[tuple[Predicate, ...], ...], request: HttpRequest, user: EndUser | None) -> bool:
    """Return whether every predicate of at least one group is true (an empty group always is)."""
    for group in groups:
        for predicate in group:
            if not predicate(request, user):
                break
        else:
            return True
    return False


def compile_rule(rule: Rule) -> Predicate:
    """Return a predicate equal to `rule_matches(rule, request, user)`."""
    sources = tuple(tuple(_compile_field(field) for field in source) for source in rule.sources)
    operations = tuple(tuple(_compile_field(field) for field in operation) for operation in rule.operations)
    conditions = tuple(_compile_condition(condition) for condition in rule.conditions)

    def matches(request: HttpRequest, user: EndUser | None) -> bool:
        if sources and not _any_group_holds(sources, request, user):
            return False
        if operations and not _any_group_holds(operations, request, user):
            return False
        for condition in conditions:
            if not condition(request, user):
                return False
        return True

    return matches


def compile_policy(policy: Policy) -> Predicate:
    """Return a predicate that holds when any of the policy's rules matches (never, without rules)."""
    rules = tuple(compile_rule(rule) for rule in policy.rules)

    def matches(request: HttpRequest, user: EndUser | None) -> bool:
        for rule in rules:
            if rule(request, user):
                return True
        return False

    return matches


# --- the index --------------------------------------------------------------------------------


class _StringKeys:
    """Positions of policies keyed by an exact value, a prefix or a suffix of one request string."""

    def __init__(self) -> None:
        self.exact: dict[str, set[int]] = {}
        self.prefixes: dict[str, set[int]] = {}
        self.suffixes: dict[str, set[int]] = {}
        self.prefix_lengths: tuple[int, ...] = ()
        self.suffix_lengths: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes or self.suffixes)

    def add(self, value: StringMatch, position: int) -> None:
        if value.mode == "exact":
            table = self.exact
        elif value.mode in ("prefix", "template"):
            table = self.prefixes
        elif value.mode == "suffix":
            table = self.suffixes
        else:
            raise AssertionError(f"{value.mode} values are not indexable")
        table.setdefault(value.operand, set()).add(position)

    def freeze(self) -> None:
        """Record the distinct prefix and suffix lengths; call once every value is added."""
        self.prefix_lengths = tuple(sorted({len(prefix) for prefix in self.prefixes}))
        self.suffix_lengths = tuple(sorted({len(suffix) for suffix in self.suffixes}))

    def collect(self, candidate: str, found: set[int]) -> None:
        """Add to `found` the positions whose exact value, prefix or suffix fits `candidate`."""
        positions = self.exact.get(candidate)
        if positions:
            found.update(positions)
        size = len(candidate)
        for length in self.prefix_lengths:
            if length > size:
                break
            positions = self.prefixes.get(candidate[:length])
            if positions:
                found.update(positions)
        for length in self.suffix_lengths:
            if length > size:
                break
            positions = self.suffixes.get(candidate[size - length:])
            if positions:
                found.update(positions)


def _index_field(operation: tuple[FieldMatch, ...]) -> FieldMatch | None:
    """Return the field of an operation that an index can key on, or None when it has none.

    A field qualifies when it is not negated and none of its values is `*`, so that every request the
    operation matches equals, starts with or ends with one of its values' operands.
    """
    for kind in _INDEX_FIELDS:
        for field in operation:
            if field.kind == kind and not field.negated and all(value.mode != "any" for value in field.values):
                return field
    return None


class _NamespaceIndex:
    """The policies of one namespace in load order, their compiled predicates and, above the threshold, an index."""

    def __init__(self, policies: list[Policy], indexed: bool):
        self.policies = policies
        self.predicates = [compile_policy(policy) for policy in policies]
        self.indexed = indexed
        self.keys = {kind: _StringKeys() for kind in _INDEX_FIELDS}
        # Positions of policies that the index cannot narrow: candidates for every request.
        self.unindexed: frozenset[int] = frozenset()
        if indexed:
            self._build()
        self.paths, self.hosts, self.methods = (self.keys[kind] or None for kind in _INDEX_FIELDS)

    def _build(self) -> None:
        unindexed = set()
        for position, policy in enumerate(self.policies):
            fields = []
            for rule in policy.rules:
                operation_fields = [_index_field(operation) for operation in rule.operations]
                if not operation_fields or None in operation_fields:
                    break
                fields.extend(operation_fields)
            else:
                # Every rule is keyed. A policy without rules gets no key and is never a candidate,
                # as it matches nothing.
                for field in fields:
                    for value in field.values:
                        self.keys[field.kind].add(value, position)
                continue
            unindexed.add(position)
        self.unindexed = frozenset(unindexed)
        for keys in self.keys.values():
            keys.freeze()

    def match(self, request: HttpRequest, user: EndUser | None) -> list[Policy]:
        policies = self.policies
        predicates = self.predicates
        if not self.indexed:
            return [policies[position] for position, predicate in enumerate(predicates) if predicate(request, user)]

        found = set(self.unindexed)
        if self.paths is not None:
            self.paths.collect(request.path, found)
        if self.hosts is not None:
            for candidate in request_candidates("host", request, user):
                self.hosts.collect(candidate, found)
        if self.methods is not None:
            self.methods.collect(request.method, found)
        return [policies[position] for position in sorted(found) if predicates[position](request, user)]


class PolicySet:
    """The loaded policies, grouped by namespace, compiled and indexed for matching."""

    def __init__(self, policies: Iterable[Policy], root_namespace: str, index_threshold: int = INDEX_THRESHOLD):
        self.root_namespace = root_namespace
        self.policies = tuple(policies)
        grouped: dict[str, list[Policy]] = {}
        for policy in self.policies:
            grouped.setdefault(policy.namespace, []).append(policy)
        self._by_namespace = grouped
        self._indexes = {namespace: _NamespaceIndex(members, len(members) > index_threshold)
                         for namespace, members in grouped.items()}
        self._root_index = self._indexes.get(root_namespace)
        # (id of each matching policy, in order) -> their merged requirements. The policies live as
        # long as this set, so their ids stay unique.
        self._requirements: dict[tuple[int, ...], Requirements] = {}

    def __len__(self) -> int:
        return len(self.policies)

    def match(self, request: HttpRequest, user: EndUser | None) -> list[Policy]:
        """Return every policy that applies to the request's destination and whose rules match."""
        matched = self._root_index.match(request, user) if self._root_index is not None else []
        namespace = request.destination_namespace
        if namespace and namespace != self.root_namespace:
            index = self._indexes.get(namespace)
            if index is not None:
                matched.extend(index.match(request, user))
        return matched

    def match_linear(self, request: HttpRequest, user: EndUser | None) -> list[Policy]:
        """Return what `match` returns, by evaluating every applicable policy with `rule_matches`."""
        candidates = list(self._by_namespace.get(self.root_namespace, ()))
        namespace = request.destination_namespace
        if namespace and namespace != self.root_namespace:
            candidates.extend(self._by_namespace.get(namespace, ()))
        return [policy for policy in candidates if any(rule_matches(rule, request, user) for rule in policy.rules)]

    def requirements(self, policies: Sequence[Policy]) -> Requirements:
        """Return `combine_requirements(policies)`, kept for each distinct list of matching policies.

        Raises DenyError(policy_conflict) as combine_requirements does; a conflict is not kept.
        """
        key = tuple(map(id, policies))
        requirements = self._requirements.get(key)
        if requirements is None:
            requirements = combine_requirements(policies)
            if len(self._requirements) < REQUIREMENTS_CACHE_SIZE:
                self._requirements[key] = requirements
        return requirements
