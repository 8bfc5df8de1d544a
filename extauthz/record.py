"""Decision records: the JSON object that the decision log writes for one Check.

docs/decision-log.md documents the fields, and the message DecisionRecord in
protos/extauthz/v1/decision.proto describes the same object. The envelope fields (type, writer, seq,
prev_hash, hash) are added by the decision log writer, not here. What a record may take from the
request and the end-user token is decided by extauthz/redaction.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from extauthz.config import DecisionLogConfig
from extauthz.decision import Decision
from extauthz.errors import REASONS
from extauthz.redaction import (
    path_without_jwt,
    recorded_claims,
    recorded_context_extensions,
    recorded_headers,
    without_jwt,
)


def rfc3339(timestamp: float) -> str:
    """Format seconds since the epoch as RFC 3339 in UTC with milliseconds: 2026-12-04T20:01:02.345Z."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_record(decision: Decision, config: DecisionLogConfig | None = None) -> dict[str, Any]:
    """Return the decision record for one Check.

    `config` names the extra claims and headers to record. Without it, the record has none of them.
    """
    record: dict[str, Any] = {
        "time": rfc3339(decision.started_at),
        "decision_id": decision.decision_id,
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.status,
        "reason": decision.reason,
    }
    if decision.detail:
        record["detail"] = decision.detail

    peer = decision.peer
    if peer is not None:
        record.update({
            "request_id": without_jwt(peer.request_id),
            "source_principal": peer.source_principal,
            "source_address": peer.source_address,
            "destination_principal": peer.destination_principal,
        })
        if peer.destination_port:
            record["destination_port"] = peer.destination_port
        if peer.context_extensions:
            extensions = recorded_context_extensions(peer.context_extensions)
            if extensions:
                record["context_extensions"] = extensions

    # Host, method, path and headers only once they are valid: a malformed one is not repeated into the log.
    request = decision.request
    if request is not None:
        record.update({"host": request.host, "method": without_jwt(request.method),
                       "path": path_without_jwt(request.path)})
        if config is not None and (config.headers or config.clear_headers):
            headers = recorded_headers(request.headers, config.headers, config.clear_headers)
            if headers:
                record["headers"] = headers
    record["policies"] = decision.policies

    user = decision.user
    if user is not None:
        record["user_sub"] = user.subject
        record["user_iss"] = user.issuer
        if user.audiences:
            record["user_aud"] = list(user.audiences)
        if user.acr is not None:
            record["user_acr"] = user.acr
        if user.amr:
            record["user_amr"] = list(user.amr)
        if user.auth_time is not None:
            record["user_auth_time"] = int(user.auth_time)
            record["auth_age_s"] = round(decision.started_at - user.auth_time, 3)
        if config is not None and config.claims:
            claims = recorded_claims(user.claims, config.claims)
            if claims:
                record["user_claims"] = claims

    minted = decision.minted
    if minted is not None:
        record["token_jti"] = minted.jti
        record["token_aud"] = minted.audience
        record["token_exp"] = minted.expires_at
        record["token_kid"] = minted.kid

    if decision.injected_secrets:
        record["injected_secrets"] = list(decision.injected_secrets)
    if decision.would_deny is not None:
        record["would_deny_reason"] = decision.would_deny.code
        record["would_deny_status"] = REASONS[decision.would_deny.code].status
    if decision.degraded:
        record["degraded"] = True
    if decision.retry:
        record["retry"] = True
    record["duration_ms"] = round(decision.duration * 1000, 3)
    return record
