"""`extauthz policy explain`: how `serve` would decide one request, and why.

The request goes through the same Authorizer that `serve` builds from the configuration, so the
decision, status and reason are the ones `serve` would return. Two differences: the store is always
an empty in-process one, so revocations and one-time claims in a shared Redis are not consulted, and
`--claims` replaces a verified token, which skips only the signature check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from extauthz.config import Config
from extauthz.decision import Decision
from extauthz.decision_log import DiscardedLog
from extauthz.errors import DenyError
from extauthz.policy import Policy, combine_requirements, rule_matches
from extauthz.response import www_authenticate
from extauthz.server import build_authorizer
from extauthz.store import MemoryStore


@dataclass(slots=True)
class ExplainRequest:
    method: str = "GET"
    host: str = "localhost"
    path: str = "/"
    scheme: str = "http"
    headers: dict[str, str] = field(default_factory=dict)
    source_principal: str = ""
    source_address: str = "127.0.0.1"
    destination_principal: str = ""
    destination_port: int = 0
    context_extensions: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    claims: dict[str, Any] | None = None


def build_check_request(request: ExplainRequest) -> external_auth_pb2.CheckRequest:
    """Build the CheckRequest that Envoy's HTTP ext_authz filter would send for `request`."""
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.principal = request.source_principal
    attributes.source.address.socket_address.address = request.source_address
    attributes.destination.principal = request.destination_principal
    attributes.destination.address.socket_address.port_value = request.destination_port
    http = attributes.request.http
    http.method = request.method
    http.host = request.host
    http.path = request.path
    http.scheme = request.scheme
    headers = {":method": request.method, ":path": request.path, ":authority": request.host,
               **{name.lower(): value for name, value in request.headers.items()}}
    if request.token is not None:
        headers["authorization"] = f"Bearer {request.token}"
    for name, value in headers.items():
        http.headers[name] = value
    for name, value in request.context_extensions.items():
        attributes.context_extensions[name] = value
    return external_auth_pb2.CheckRequest(attributes=attributes)


def _requirements_text(policy: Policy) -> list[str]:
    demands = policy.requirements
    parts = []
    if demands.require_user:
        parts.append("an end-user token")
    if demands.reauth_max_age is not None:
        parts.append(f"a login at most {demands.reauth_max_age:g}s old")
    for values in demands.acr_values:
        parts.append(f"acr in {{{', '.join(sorted(values))}}}")
    if demands.one_time_token:
        parts.append("a token used only once")
    if demands.token_audience:
        parts.append(f"minted aud {demands.token_audience}")
    if demands.token_scope is not None:
        parts.append(f"minted scope {' '.join(sorted(demands.token_scope))!r}")
    if demands.token_ttl is not None:
        parts.append(f"minted TTL {demands.token_ttl:g}s")
    if policy.dry_run:
        parts.append("dry-run: denies are only recorded")
    return parts


def explain(config: Config, request: ExplainRequest) -> dict[str, Any]:
    """Decide `request` as `serve` would; return the decision with the policies considered."""
    decision_log = DiscardedLog()
    try:
        authorizer, _ = build_authorizer(config, decision_log, store=MemoryStore())
        check_request = build_check_request(request)
        decision: Decision = authorizer.check(check_request, claims=request.claims)
    finally:
        decision_log.close()

    result: dict[str, Any] = {
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.status,
        "reason": decision.reason,
        "detail": decision.detail,
        "policies": [],
    }
    challenge = None if decision.allowed else www_authenticate(decision)
    if challenge:
        result["www_authenticate"] = challenge
    if decision.would_deny is not None:
        result["would_deny"] = decision.would_deny.code
    if decision.user is not None:
        result["user"] = {"sub": decision.user.subject, "iss": decision.user.issuer, "acr": decision.user.acr}
    if decision.minted is not None:
        result["minted"] = {"aud": decision.minted.audience, "exp": decision.minted.expires_at}
    if decision.request is None:
        return result

    normalised = decision.request
    host = normalised.host if normalised.authority_port is None else f"{normalised.host}:{normalised.authority_port}"
    result["request"] = {"method": normalised.method, "host": host, "path": normalised.path,
                         "destination_namespace": normalised.destination_namespace}
    policies = authorizer.policies
    namespace = normalised.destination_namespace
    considered = [policy for policy in policies.policies
                  if policy.namespace in (policies.root_namespace, namespace)]
    result["skipped_policies"] = len(policies.policies) - len(considered)
    for policy in considered:
        matched = [index for index, rule in enumerate(policy.rules)
                   if rule_matches(rule, normalised, decision.user)]
        result["policies"].append({"policy": policy.key, "matched_rules": matched,
                                   "requires": _requirements_text(policy)})
    matching = [policy for policy in considered if policy.key in decision.policies]
    if matching:
        try:
            combined = combine_requirements(matching)
            result["combined"] = {"require_user": combined.require_user, "max_age": combined.reauth_max_age,
                                  "one_time_token": combined.one_time_token}
        except DenyError as exc:
            result["combined"] = {"conflict": exc.detail}
    return result


def render_text(result: dict[str, Any]) -> str:
    lines = []
    request = result.get("request")
    if request:
        lines.append(f"Request: {request['method']} {request['host']}{request['path']} "
                     f"(destination namespace: {request['destination_namespace'] or 'none'})")
    user = result.get("user")
    lines.append(f"End user: {user['sub']} from {user['iss']}, acr {user['acr']}" if user else "End user: none")
    if result["policies"]:
        lines.append("Policies for this destination:")
    if result.get("skipped_policies"):
        lines.append(f"  ({result['skipped_policies']} policies of other namespaces not considered: name the "
                     "destination with --destination-principal, or --context-extension namespace=NS)")
    for entry in result["policies"]:
        state = (f"matched (rule {', '.join(str(i) for i in entry['matched_rules'])})"
                 if entry["matched_rules"] else "not matched")
        requires = "; requires " + ", ".join(entry["requires"]) if entry["requires"] else ""
        lines.append(f"  {entry['policy']}: {state}{requires}")
    lines.append(f"Decision: {result['decision']} {result['status']} {result['reason']}"
                 + (f" ({result['detail']})" if result.get("detail") else ""))
    if result.get("www_authenticate"):
        lines.append(f"  WWW-Authenticate: {result['www_authenticate']}")
    if result.get("would_deny"):
        lines.append(f"  dry-run policies would have denied it: {result['would_deny']}")
    if result.get("minted"):
        lines.append(f"  minted token: aud {result['minted']['aud']}")
    return "\n".join(lines)

