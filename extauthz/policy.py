"""Istio AuthorizationPolicy documents: loading, validation and matching with Istio's semantics.

extauthz reads the policies whose `action` is CUSTOM and whose `provider.name` is the configured
provider, and evaluates their `rules` itself:

- a policy without `rules` matches nothing; a rule `{}` matches every request;
- a rule matches when any `from` source matches, any `to` operation matches and every `when`
  condition holds (a missing `from` or `to` matches anything);
- inside a source or operation every field present must match. A field matches when any of its
  values does, and a `not*` field matches when none of its values does;
- string values match exactly, as a prefix (`abc*`), as a suffix (`*abc`) or, for `*`, any
  non-empty value. Hosts compare case-insensitively. Paths also accept `{*}` (one segment) and
  `{**}` (one or more segments, with no operator after it);
- a policy applies to requests for destinations in its own namespace, and a policy in the root
  namespace applies to every destination. The destination namespace comes from the destination
  principal (`.../ns/NAME/...`) or, for a plain Envoy without mTLS, from the route's
  `context_extensions` key `namespace`.

`selector` and `targetRefs` choose which workloads Istio sends to extauthz at all. extauthz never sees
workload labels, so it accepts and ignores them.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extauthz.config import parse_duration
from extauthz.errors import ConfigError, DenyError
from extauthz.identity import EndUser
from extauthz.request import HttpRequest, strip_spiffe

log = logging.getLogger(__name__)

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
ANNOTATION_PREFIX = "extauthz.io/"
ANNOTATIONS = ("reauth-max-age", "acr-values", "require-user", "token-audience", "token-scope", "token-ttl",
               "one-time-token", "mode", "inject-secret", "inject-header", "inject-format")
# Headers a secret may not be injected into: the request's routing, and what Envoy or extauthz own.
_PROTECTED_HEADERS = frozenset(("host", "content-length", "transfer-encoding", "connection", "te", "upgrade",
                                "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-envoy-original-path"))
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+\Z")

_SOURCE_FIELDS = {
    "principals": "principal", "notPrincipals": "principal",
    "requestPrincipals": "request_principal", "notRequestPrincipals": "request_principal",
    "namespaces": "namespace", "notNamespaces": "namespace",
    "ipBlocks": "ip", "notIpBlocks": "ip",
    "remoteIpBlocks": "ip", "notRemoteIpBlocks": "ip",
}
_OPERATION_FIELDS = {
    "hosts": "host", "notHosts": "host",
    "ports": "port", "notPorts": "port",
    "methods": "method", "notMethods": "method",
    "paths": "path", "notPaths": "path",
}
_CONDITION_KEYS = (
    "request.headers", "source.ip", "remote.ip", "source.namespace", "source.principal",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter", "request.auth.claims",
    "destination.ip", "destination.port", "context_extensions",
)
_BRACKETED = re.compile(r"^([a-z._]+)((?:\[[^\[\]]+\])+)\Z")
# Condition keys that take [NAME] selectors. context_extensions is extauthz's own: the route's
# ext_authz context_extensions, set in the Envoy configuration and so trusted.
_SELECTOR_KEYS = ("request.headers", "request.auth.claims", "context_extensions")


# --- values -----------------------------------------------------------------------------------


class StringMatch:
    """One Istio string value: exact, `prefix*`, `*suffix` or `*` (any non-empty value).

    `mode` is `exact`, `prefix`, `suffix`, `any` or `template`, and `operand` the text that mode
    compares: the whole value, the prefix, the suffix, "" for `any`, and for a path template the
    literal text before its first `{*}` or `{**}`, which every path it matches starts with.
    """

    __slots__ = ("text", "test", "mode", "operand")

    def __init__(self, text: str, fold_case: bool = False, path: bool = False):
        self.text = text
        value = text.lower() if fold_case else text
        if path and "{" in value:
            self.mode, self.operand = "template", _template_prefix(value)
            self.test = _path_template(value)
        elif value == "*":
            self.mode, self.operand = "any", ""
            self.test = bool
        elif value.endswith("*"):
            prefix = value[:-1]
            self.mode, self.operand = "prefix", prefix
            self.test = lambda candidate: candidate.startswith(prefix)
        elif value.startswith("*"):
            suffix = value[1:]
            self.mode, self.operand = "suffix", suffix
            self.test = lambda candidate: candidate.endswith(suffix)
        else:
            self.mode, self.operand = "exact", value
            self.test = value.__eq__

    def matches(self, candidate: str) -> bool:
        return bool(self.test(candidate))


def _template_prefix(value: str) -> str:
    literal = []
    for segment in value.split("/"):
        if segment in ("{*}", "{**}"):
            break
        literal.append(segment)
    else:
        return value
    return "/".join(literal) + "/" if literal else ""


def _path_template(value: str) -> Callable[[str], bool]:
    """Compile a path with `{*}` (exactly one segment) and `{**}` (one or more segments, the last operator)."""
    segments = value.split("/")
    parts = []
    seen_double = False
    for segment in segments:
        if segment in ("{*}", "{**}") and seen_double:
            raise ValueError("{**} must be the last operator in a path template")
        if segment == "{**}":
            seen_double = True
            parts.append("[^/]+(?:/[^/]+)*")
        elif segment == "{*}":
            parts.append("[^/]+")
        elif "{" in segment or "}" in segment:
            raise ValueError(f"invalid path template segment {segment!r}")
        else:
            parts.append(re.escape(segment))
    pattern = re.compile("/".join(parts) + r"\Z")
    return lambda candidate: pattern.match(candidate) is not None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def in_networks(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Injection:
    """A secret to put into an upstream request header on allow: `format` with `{secret}` replaced,
    or `basic` for HTTP Basic credentials from a secret holding `user:password`."""

    secret: str
    header: str
    format: str = "{secret}"

    def render(self, value: str) -> str:
        if self.format == "basic":
            return "Basic " + base64.b64encode(value.encode()).decode()
        return self.format.replace("{secret}", value)


@dataclass(frozen=True, slots=True)
class Requirements:
    """The demands of the matching policies on a request, and the settings of its minted token."""

    require_user: bool = False
    reauth_max_age: float | None = None
    # One set per policy that names acr values: the token's acr must be in every set.
    acr_values: tuple[frozenset[str], ...] = ()
    token_audience: str | None = None
    token_scope: frozenset[str] | None = None
    token_ttl: float | None = None
    one_time_token: bool = False
    injections: tuple[Injection, ...] = ()

    @property
    def sensitive(self) -> bool:
        return self.reauth_max_age is not None or bool(self.acr_values)


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """One source or operation field such as `paths` or `notIpBlocks`."""

    name: str
    kind: str
    negated: bool
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    kind: str
    # Header name or claim path for request.headers[...] and request.auth.claims[...].
    selector: tuple[str, ...]
    values: tuple[Any, ...]
    not_values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    sources: tuple[tuple[FieldMatch, ...], ...]
    operations: tuple[tuple[FieldMatch, ...], ...]
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    namespace: str
    origin: str
    rules: tuple[Rule, ...]
    requirements: Requirements
    # extauthz.io/mode: dry-run. The policy's denies are recorded as would_deny and not enforced.
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- loading ----------------------------------------------------------------------------------


class _Reader:
    """Reads one policy document, naming the file, document index and field in every error."""

    def __init__(self, origin: str):
        self.origin = origin

    def error(self, field: str, message: str, fix: str | None = None) -> ConfigError:
        return ConfigError(self.origin, field, message, fix)

    def mapping(self, value: object, field: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(field, f"expected a mapping, got {type(value).__name__}")
        return value

    def strings(self, value: object, field: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self.error(field, f"expected a list of non-empty strings, got {value!r}")
        return tuple(value)

    def check_keys(self, data: dict[str, Any], known: Iterable[str], field: str) -> None:
        known = list(known)
        for name in data:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
                raise self.error(f"{field}.{name}" if field else str(name), "unknown field", fix)


def _values(reader: _Reader, kind: str, texts: tuple[str, ...], field: str) -> tuple[Any, ...]:
    try:
        if kind == "ip":
            return tuple(_network(text) for text in texts)
        if kind == "port":
            ports = tuple(int(text) for text in texts)
            if not all(0 < port <= 65535 for port in ports):
                raise ValueError("port out of range")
            return ports
        if kind == "principal":
            return tuple(StringMatch(strip_spiffe(text)) for text in texts)
        return tuple(StringMatch(text, fold_case=kind == "host", path=kind == "path") for text in texts)
    except ValueError as exc:
        raise reader.error(field, f"invalid value: {exc}") from exc


def _field_matches(reader: _Reader, data: dict[str, Any], table: dict[str, str],
                   field: str) -> tuple[FieldMatch, ...]:
    reader.check_keys(data, table, field)
    fields = []
    for name, value in data.items():
        texts = reader.strings(value, f"{field}.{name}")
        kind = table[name]
        # ipBlocks checks the peer address; remoteIpBlocks the client address. Envoy reports one
        # address (the client's after its X-Forwarded-For handling), so both read it.
        fields.append(FieldMatch(name, kind, name.startswith("not"), _values(reader, kind, texts, f"{field}.{name}")))
    return tuple(fields)


def _condition(reader: _Reader, data: object, field: str) -> Condition:
    condition = reader.mapping(data, field)
    reader.check_keys(condition, ("key", "values", "notValues"), field)
    key = condition.get("key")
    if not isinstance(key, str):
        raise reader.error(f"{field}.key", "missing", "set key, such as request.headers[x-tenant]")

    selector: tuple[str, ...] = ()
    bracketed = _BRACKETED.match(key)
    base = key
    if bracketed:
        base = bracketed.group(1)
        selector = tuple(re.findall(r"\[([^\[\]]+)\]", bracketed.group(2)))
        if base not in _SELECTOR_KEYS:
            close = difflib.get_close_matches(base, _SELECTOR_KEYS, n=1)
            raise reader.error(f"{field}.key", f"{base} takes no [...] selector",
                               f"did you mean {close[0]!r}?" if close else None)
        if base in ("request.headers", "context_extensions") and len(selector) != 1:
            raise reader.error(f"{field}.key", f"{base} takes one [name]")
        if base == "request.headers":
            selector = (selector[0].lower(),)
    elif key in _SELECTOR_KEYS:
        raise reader.error(f"{field}.key", f"{key} needs a [name]", f"write {key}[NAME]")
    if base not in _CONDITION_KEYS:
        close = difflib.get_close_matches(base, _CONDITION_KEYS, n=1)
        raise reader.error(f"{field}.key", f"unsupported condition key {key!r}",
                           f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(_CONDITION_KEYS)}")

    kind = {"source.ip": "ip", "remote.ip": "ip", "destination.ip": "ip", "destination.port": "port",
            "source.principal": "principal"}.get(base, "string")
    values = _values(reader, kind, reader.strings(condition.get("values", []), f"{field}.values"),
                     f"{field}.values") if "values" in condition else ()
    not_values = _values(reader, kind, reader.strings(condition.get("notValues", []), f"{field}.notValues"),
                         f"{field}.notValues") if "notValues" in condition else ()
    if not values and not not_values:
        raise reader.error(field, "a condition needs values or notValues")
    return Condition(base, kind, selector, values, not_values)


def _rule(reader: _Reader, data: object, field: str) -> Rule:
    rule = reader.mapping(data, field)
    reader.check_keys(rule, ("from", "to", "when"), field)

    sources = []
    for index, item in enumerate(_list(reader, rule.get("from"), f"{field}.from")):
        entry = reader.mapping(item, f"{field}.from[{index}]")
        reader.check_keys(entry, ("source",), f"{field}.from[{index}]")
        sources.append(_field_matches(reader, reader.mapping(entry.get("source"), f"{field}.from[{index}].source"),
                                      _SOURCE_FIELDS, f"{field}.from[{index}].source"))

    operations = []
    for index, item in enumerate(_list(reader, rule.get("to"), f"{field}.to")):
        entry = reader.mapping(item, f"{field}.to[{index}]")
        reader.check_keys(entry, ("operation",), f"{field}.to[{index}]")
        operations.append(_field_matches(
            reader, reader.mapping(entry.get("operation"), f"{field}.to[{index}].operation"),
            _OPERATION_FIELDS, f"{field}.to[{index}].operation"))

    conditions = tuple(_condition(reader, item, f"{field}.when[{index}]")
                       for index, item in enumerate(_list(reader, rule.get("when"), f"{field}.when")))
    return Rule(tuple(sources), tuple(operations), conditions)


def _list(reader: _Reader, value: object, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise reader.error(field, f"expected a list, got {type(value).__name__}")
    return value


def _injection(reader: _Reader, settings: dict[str, str], secret_names: frozenset[str] | None) -> Injection | None:
    keys = [key for key in ("inject-secret", "inject-header", "inject-format") if key in settings]
    if not keys:
        return None

    def field(short: str) -> str:
        return f"metadata.annotations[{ANNOTATION_PREFIX}{short}]"

    secret = settings.get("inject-secret")
    header = settings.get("inject-header", "").lower()
    if not secret:
        raise reader.error(field("inject-secret"), "missing", "name the secret to inject, from `secrets:`")
    if not header:
        raise reader.error(field("inject-header"), "missing", "name the upstream header, such as x-api-key")
    if secret_names is not None and secret not in secret_names:
        close = difflib.get_close_matches(secret, sorted(secret_names), n=1)
        raise reader.error(field("inject-secret"), f"unknown secret {secret!r}",
                           f"did you mean {close[0]!r}?" if close else "define it under secrets: in the configuration")
    if not _HEADER_NAME.match(header) or header in _PROTECTED_HEADERS or header.startswith(":"):
        raise reader.error(field("inject-header"), f"a secret cannot be injected into {header!r}",
                           "use an ordinary request header, such as authorization or x-api-key")
    template = settings.get("inject-format", "{secret}")
    if template != "basic" and template.count("{secret}") != 1:
        raise reader.error(field("inject-format"), f"invalid format {template!r}",
                           'use a text with {secret} once, such as "Bearer {secret}", or "basic"')
    if any(char in template for char in "\r\n\0"):
        raise reader.error(field("inject-format"), "line breaks and NUL are not allowed")
    return Injection(secret=secret, header=header, format=template)


def _requirements(reader: _Reader, annotations: dict[str, Any], token_ttl_cap: float,
                  secret_names: frozenset[str] | None = None) -> Requirements:
    settings: dict[str, str] = {}
    for name, value in annotations.items():
        if not isinstance(name, str) or not name.startswith(ANNOTATION_PREFIX):
            continue
        short = name[len(ANNOTATION_PREFIX):]
        field = f"metadata.annotations[{name}]"
        if short not in ANNOTATIONS:
            close = difflib.get_close_matches(short, ANNOTATIONS, n=1)
            fix = f"did you mean {ANNOTATION_PREFIX + close[0]!r}?" if close else (
                f"known annotations: {', '.join(ANNOTATION_PREFIX + a for a in ANNOTATIONS)}")
            raise reader.error(field, "unknown extauthz annotation", fix)
        if not isinstance(value, str):
            raise reader.error(field, f"annotation values are strings, got {value!r}", 'quote the value: "..."')
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            # YAML's "\ud800" escape yields a lone surrogate, which no token claim or header can carry.
            raise reader.error(field, f"invalid text: {exc.reason} at character {exc.start}",
                               "write the value as plain UTF-8 text") from exc
        settings[short] = value.strip()

    def duration(short: str) -> float | None:
        if short not in settings:
            return None
        try:
            seconds = parse_duration(settings[short])
        except ValueError as exc:
            raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}{short}]", str(exc),
                               'quote a duration with a unit, such as "5m" or "30s"') from exc
        if seconds < 1:
            raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}{short}]", "must be at least 1s",
                               "JWT dates count whole seconds")
        return seconds

    acr_values: tuple[frozenset[str], ...] = ()
    if "acr-values" in settings:
        values = frozenset(settings["acr-values"].split())
        if not values:
            raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}acr-values]", "empty",
                               "list one or more space-separated acr values")
        acr_values = (values,)

    def boolean(short: str) -> bool:
        value = settings.get(short, "false").lower()
        if value not in ("true", "false"):
            raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}{short}]",
                               f"invalid value {value!r}", 'use "true" or "false"')
        return value == "true"

    require_user = boolean("require-user")
    one_time_token = boolean("one-time-token")

    token_ttl = duration("token-ttl")
    if token_ttl is not None and token_ttl > token_ttl_cap:
        log.warning("token-ttl above token.ttl; capping it",
                    extra={"policy": reader.origin, "token_ttl": token_ttl, "cap": token_ttl_cap})
        token_ttl = token_ttl_cap

    scope = settings.get("token-scope")
    audience = settings.get("token-audience")
    if audience == "":
        raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}token-audience]", "empty",
                           "name the backend, or drop the annotation to use the request's host")
    if scope is not None and not scope.split():
        raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}token-scope]", "empty",
                           "list space-separated scopes, or drop the annotation")
    injection = _injection(reader, settings, secret_names)
    requirements = Requirements(
        reauth_max_age=duration("reauth-max-age"),
        acr_values=acr_values,
        token_audience=audience,
        token_scope=frozenset(scope.split()) if scope is not None else None,
        token_ttl=token_ttl,
        one_time_token=one_time_token,
        injections=(injection,) if injection else (),
    )
    # A sensitive or one-time-token route implies an end-user token.
    return dataclasses.replace(requirements,
                               require_user=require_user or one_time_token or requirements.sensitive)


def parse_policy(document: dict[str, Any], origin: str, provider: str, token_ttl_cap: float,
                 secret_names: frozenset[str] | None = None) -> Policy | None:
    """Return the policy in one YAML document, or None when it is not a CUSTOM policy for `provider`.

    With `secret_names`, an injected secret must be one of them; None skips that check.
    """
    reader = _Reader(origin)
    if document.get("kind") != "AuthorizationPolicy":
        return None
    if document.get("apiVersion") not in API_VERSIONS:
        raise reader.error("apiVersion", f"unsupported apiVersion {document.get('apiVersion')!r}",
                           f"use {' or '.join(API_VERSIONS)}")
    # `status` appears in `kubectl get -o yaml` output and carries nothing about the policy itself.
    reader.check_keys(document, ("apiVersion", "kind", "metadata", "spec", "status"), "")
    metadata = reader.mapping(document.get("metadata"), "metadata")
    spec = reader.mapping(document.get("spec"), "spec")
    reader.check_keys(spec, ("selector", "targetRef", "targetRefs", "action", "provider", "rules"), "spec")

    if spec.get("action") != "CUSTOM":
        return None
    provider_name = reader.mapping(spec.get("provider"), "spec.provider").get("name")
    if provider_name != provider:
        log.info("skipping CUSTOM policy for another provider", extra={"policy": origin, "provider": provider_name})
        return None

    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise reader.error("metadata.name", "missing", "name the policy")
    namespace = metadata.get("namespace", "default")
    if not isinstance(namespace, str) or not namespace:
        raise reader.error("metadata.namespace", f"invalid namespace {namespace!r}")

    rules = tuple(_rule(reader, item, f"spec.rules[{index}]")
                  for index, item in enumerate(_list(reader, spec.get("rules"), "spec.rules")))
    annotations = reader.mapping(metadata.get("annotations"), "metadata.annotations")
    requirements = _requirements(reader, annotations, token_ttl_cap, secret_names)
    mode = annotations.get(ANNOTATION_PREFIX + "mode", "enforce")
    if mode not in ("enforce", "dry-run"):
        raise reader.error(f"metadata.annotations[{ANNOTATION_PREFIX}mode]", f"invalid value {mode!r}",
                           'use "enforce" or "dry-run"')
    return Policy(name=name, namespace=namespace, origin=origin, rules=rules, requirements=requirements,
                  dry_run=mode == "dry-run")


def policy_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield the policy files named by `paths`: files as given, and the YAML files inside folders.

    Hidden entries are skipped: a Kubernetes ConfigMap volume keeps every file twice, once visible and
    once under hidden `..data` and `..TIMESTAMP` folders.
    """
    for path in paths:
        if path.is_dir():
            yield from sorted(
                candidate for candidate in path.rglob("*")
                if candidate.suffix in (".yaml", ".yml") and candidate.is_file()
                and not any(part.startswith(".") for part in candidate.relative_to(path).parts))
        else:
            yield path


def load_policies(paths: Iterable[Path], provider: str, token_ttl_cap: float,
                  secret_names: frozenset[str] | None = None) -> list[Policy]:
    """Load every CUSTOM policy for `provider` from files and folders; raise ConfigError on any error."""
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    for path in policy_files(paths):
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(str(path), "", f"not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from exc
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            # PyYAML raises ValueError for values such as the date 2024-02-30.
            raise ConfigError(str(path), "", f"invalid YAML: {exc}") from exc
        for index, document in enumerate(documents):
            if document is None:
                continue
            origin = f"{path}#{index}"
            if not isinstance(document, dict):
                raise ConfigError(origin, "", "expected a Kubernetes object")
            policy = parse_policy(document, origin, provider, token_ttl_cap, secret_names)
            if policy is None:
                continue
            if policy.key in seen:
                raise ConfigError(origin, "metadata.name", f"duplicate policy {policy.key}, also in {seen[policy.key]}")
            seen[policy.key] = origin
            policies.append(policy)
    return policies


# --- matching ---------------------------------------------------------------------------------
# The reference evaluation of a rule. Checks run extauthz.policy_index's compiled form of it, which
# tests compare with these functions.


def _field_holds(match: FieldMatch, request: HttpRequest, user: EndUser | None) -> bool:
    kind = match.kind
    if kind == "ip":
        hit = in_networks(request.source_address, match.values)
    elif kind == "port":
        hit = request.port in match.values
    else:
        candidates = request_candidates(kind, request, user)
        hit = any(value.matches(candidate) for value in match.values for candidate in candidates)
    return hit != match.negated


def request_candidates(kind: str, request: HttpRequest, user: EndUser | None) -> tuple[str, ...]:
    if kind == "path":
        return (request.path,)
    if kind == "method":
        return (request.method,)
    if kind == "host":
        port = request.authority_port or (443 if request.scheme == "https" else 80)
        return (request.host, f"{request.host}:{port}")
    if kind == "principal":
        principal = strip_spiffe(request.source_principal)
        return (principal,) if principal else ()
    if kind == "namespace":
        namespace = request.source_namespace
        return (namespace,) if namespace else ()
    if kind == "request_principal":
        return (user.principal,) if user else ()
    raise AssertionError(kind)


def condition_candidates(condition: Condition, request: HttpRequest, user: EndUser | None) -> tuple[Any, ...]:
    key = condition.key
    if key == "request.headers":
        value = request.headers.get(condition.selector[0])
        return (value,) if value is not None else ()
    if key == "context_extensions":
        value = request.context_extensions.get(condition.selector[0])
        return (value,) if value is not None else ()
    if key in ("source.ip", "remote.ip"):
        return (request.source_address,)
    if key == "destination.port":
        return (request.port,)
    if key == "destination.ip":
        return (request.destination_address,) if request.destination_address else ()
    if key == "source.namespace":
        return (request.source_namespace,) if request.source_namespace else ()
    if key == "source.principal":
        principal = strip_spiffe(request.source_principal)
        return (principal,) if principal else ()
    if user is None:
        return ()
    if key == "request.auth.principal":
        return (user.principal,)
    if key == "request.auth.audiences":
        return user.audiences
    if key == "request.auth.presenter":
        return (user.presenter,) if user.presenter else ()
    if key == "request.auth.claims":
        value: Any = user.claims
        for name in condition.selector:
            if not isinstance(value, dict) or name not in value:
                return ()
            value = value[name]
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(item for item in value if isinstance(item, str))
        return ()
    raise AssertionError(key)


def _value_hits(condition: Condition, values: tuple[Any, ...], candidates: tuple[Any, ...]) -> bool:
    if condition.kind == "ip":
        return any(in_networks(candidate, values) for candidate in candidates)
    if condition.kind == "port":
        return any(candidate in values for candidate in candidates)
    return any(value.matches(candidate) for value in values for candidate in candidates)


def _condition_holds(condition: Condition, request: HttpRequest, user: EndUser | None) -> bool:
    candidates = condition_candidates(condition, request, user)
    if condition.values and not _value_hits(condition, condition.values, candidates):
        return False
    return not (condition.not_values and _value_hits(condition, condition.not_values, candidates))


def rule_matches(rule: Rule, request: HttpRequest, user: EndUser | None) -> bool:
    if rule.sources and not any(all(_field_holds(f, request, user) for f in source) for source in rule.sources):
        return False
    if rule.operations and not any(all(_field_holds(f, request, user) for f in operation)
                                   for operation in rule.operations):
        return False
    return all(_condition_holds(condition, request, user) for condition in rule.conditions)


def combine_requirements(policies: Iterable[Policy]) -> Requirements:
    """Merge the requirements of every matching policy: the strictest of each kind wins.

    The shortest max age and TTL, every acr set, the intersection of scopes and every injection win.
    Policies that name different token audiences, or inject different values into one header, cannot
    all be honoured, so they raise DenyError(policy_conflict).
    """
    require_user = False
    max_age: float | None = None
    acr_values: list[frozenset[str]] = []
    audiences: set[str] = set()
    scope: frozenset[str] | None = None
    ttl: float | None = None
    one_time_token = False
    injections: dict[str, Injection] = {}
    for policy in policies:
        demands = policy.requirements
        require_user = require_user or demands.require_user
        one_time_token = one_time_token or demands.one_time_token
        for injection in demands.injections:
            if injections.setdefault(injection.header, injection) != injection:
                raise DenyError("policy_conflict", f"matching policies inject different values into "
                                                   f"{injection.header}")
        if demands.reauth_max_age is not None:
            max_age = demands.reauth_max_age if max_age is None else min(max_age, demands.reauth_max_age)
        acr_values.extend(values for values in demands.acr_values if values not in acr_values)
        if demands.token_audience is not None:
            audiences.add(demands.token_audience)
        if demands.token_scope is not None:
            scope = demands.token_scope if scope is None else scope & demands.token_scope
        if demands.token_ttl is not None:
            ttl = demands.token_ttl if ttl is None else min(ttl, demands.token_ttl)

    if len(audiences) > 1:
        raise DenyError("policy_conflict", f"matching policies name token audiences {sorted(audiences)}")
    if acr_values and not frozenset.intersection(*acr_values):
        raise DenyError("policy_conflict", "matching policies accept no acr value in common")
    return Requirements(
        require_user=require_user,
        reauth_max_age=max_age,
        acr_values=tuple(acr_values),
        token_audience=next(iter(audiences), None),
        token_scope=scope,
        token_ttl=ttl,
        one_time_token=one_time_token,
        injections=tuple(injections.values()),
    )
