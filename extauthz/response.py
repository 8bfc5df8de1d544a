"""Decision to CheckResponse: exactly what Envoy does with the request.

Allowed: Envoy forwards the request with the minted token in the configured header (overwriting any
value the caller sent) and without `authorization`. Denied: Envoy replies to the caller with the status,
the headers and the JSON body built here, and never forwards the request. Both carry the decision id,
policies and reason in `dynamic_metadata` for Envoy's access log.
"""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.decision import Decision
from extauthz.errors import REASONS
from extauthz.reauth import StepUpRequired

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def www_authenticate(decision: Decision) -> str | None:
    """Return the Bearer challenge for a deny, or None when the reason needs no challenge."""
    reason = REASONS[decision.reason]
    if decision.reason == "missing_token":
        return "Bearer"
    if reason.oauth_error is None:
        return None
    params = [f"error={_quote(reason.oauth_error)}", f"error_description={_quote(decision.description)}"]
    error = decision.error
    if isinstance(error, StepUpRequired):
        if error.max_age is not None:
            params.append(f"max_age={_quote(str(error.max_age))}")
        if error.acr_values:
            params.append(f"acr_values={_quote(' '.join(error.acr_values))}")
    return "Bearer " + ", ".join(params)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def _metadata(decision: Decision) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({
        "decision_id": decision.decision_id,
        "reason": decision.reason,
        "policies": ",".join(decision.policies),
    })
    return metadata


def build_check_response(decision: Decision, token_header: str) -> external_auth_pb2.CheckResponse:
    if decision.allowed:
        assert decision.minted is not None
        headers = [_header(token_header, decision.minted.token)]
        headers.extend(_header(name, value) for name, value in decision.injected_headers)
        # The caller's credential never passes, unless a secret replaces it in the same header
        # (Envoy applies headers_to_remove after the headers it sets).
        injected = {name for name, _ in decision.injected_headers}
        removed = [name for name in ("authorization",) if name not in injected]
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(headers=headers, headers_to_remove=removed),
            dynamic_metadata=_metadata(decision),
        )

    headers = [
        _header("content-type", "application/json"),
        _header("cache-control", "no-store"),
    ]
    challenge = www_authenticate(decision)
    if challenge is not None:
        headers.append(_header("www-authenticate", challenge))
    body = orjson.dumps({
        "error": decision.reason,
        "error_description": decision.description,
        "decision_id": decision.decision_id,
    }).decode()
    code = code_pb2.UNAUTHENTICATED if decision.status == 401 else code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.reason),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=headers,
            body=body,
        ),
        dynamic_metadata=_metadata(decision),
    )
