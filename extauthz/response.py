"""Decision to CheckResponse: exactly what Envoy does with the request.

Allowed: Envoy forwards the request with the minted token in the configured header (overwriting any
value the caller sent) and without `authorization`. Denied: Envoy replies to the caller with the status,
the headers and the JSON body built here, and never forwards the request. Both carry the decision id,
policies and reason in `dynamic_metadata` for Envoy's access log.

`ResponseEncoder` writes the CheckResponse directly in the protobuf wire format, so that a Check
builds no message objects. The parts that are the same for every Check (status, fixed headers, field
tags, metadata keys) are encoded once. tests/test_response.py parses its output and compares it with
the message that the protobuf classes build for the same decision.
"""

from __future__ import annotations

import functools

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from extauthz.decision import Decision
from extauthz.errors import REASONS
from extauthz.reauth import StepUpRequired

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def www_authenticate(decision: Decision) -> str | None:
    """Return the Bearer challenge for a deny, or None when the reason needs no challenge."""
    error = decision.error
    if isinstance(error, StepUpRequired):
        return _challenge(decision.reason, decision.description, error.max_age, tuple(error.acr_values))
    return _challenge(decision.reason, decision.description, None, ())


# The arguments come from the fixed reasons and the policies' max ages and acr values, so few
# distinct challenges exist. The bound only guards against an unexpected variety.
@functools.lru_cache(maxsize=256)
def _challenge(code: str, description: str, max_age: int | None, acr_values: tuple[str, ...]) -> str | None:
    reason = REASONS[code]
    if code == "missing_token":
        return "Bearer"
    if reason.oauth_error is None:
        return None
    params = [f"error={_quote(reason.oauth_error)}", f"error_description={_quote(description)}"]
    if max_age is not None:
        params.append(f"max_age={_quote(str(max_age))}")
    if acr_values:
        params.append(f"acr_values={_quote(' '.join(acr_values))}")
    return "Bearer " + ", ".join(params)


# --- protobuf wire format ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SHORT_LENGTHS = tuple(bytes((length,)) for length in range(0x80))


def _field(tag: bytes, payload: bytes) -> bytes:
    """Encode a length-delimited field (string, bytes or message) whose encoded tag is `tag`."""
    size = len(payload)
    if size < 0x80:
        return tag + _SHORT_LENGTHS[size] + payload
    if size < 0x4000:
        return tag + bytes((size & 0x7F | 0x80, size >> 7)) + payload
    return tag + _varint(size) + payload


def _tag(number: int) -> bytes:
    """Return the tag of length-delimited field `number` (wire type 2)."""
    return _varint(number << 3 | 2)


def _varint_field(number: int, value: int) -> bytes:
    """Encode an int32 or enum field; proto3 leaves out a zero."""
    return _varint(number << 3) + _varint(value) if value else b""


# Field numbers from envoy/service/auth/v3/external_auth.proto, envoy/config/core/v3/base.proto,
# google/rpc/status.proto, envoy/type/v3/http_status.proto and google/protobuf/struct.proto.
_RESPONSE_STATUS = _tag(1)
_RESPONSE_DENIED = _tag(2)
_RESPONSE_OK = _tag(3)
_RESPONSE_METADATA = _tag(4)
_STATUS_MESSAGE = _tag(2)
_OK_HEADERS = _tag(2)
_OK_HEADERS_TO_REMOVE = _tag(5)
_DENIED_STATUS = _tag(1)
_DENIED_HEADERS = _tag(2)
_DENIED_BODY = _tag(3)
_OPTION_HEADER = _tag(1)
_OPTION_APPEND_ACTION = _varint_field(3, _OVERWRITE)
_HEADER_KEY = _tag(1)
_HEADER_VALUE = _tag(2)
_STRUCT_FIELDS = _tag(1)
_ENTRY_KEY = _tag(1)
_ENTRY_VALUE = _tag(2)
_VALUE_STRING = _tag(3)


def _header_option(key: bytes, value: bytes) -> bytes:
    """Encode a HeaderValueOption that overwrites header `key` with `value`."""
    header = _field(_HEADER_KEY, key) + _field(_HEADER_VALUE, value)
    return _field(_OPTION_HEADER, header) + _OPTION_APPEND_ACTION


_DECISION_ID_KEY = _field(_ENTRY_KEY, b"decision_id")
_REASON_KEY = _field(_ENTRY_KEY, b"reason")
_POLICIES_KEY = _field(_ENTRY_KEY, b"policies")


def _string_entry(key: bytes, value: bytes) -> bytes:
    # Struct.fields is a map<string, Value>: each entry is a message of key = 1 and value = 2. The
    # Value's string_value is a oneof member, so it is written even when empty.
    return _field(_STRUCT_FIELDS, key + _field(_ENTRY_VALUE, _field(_VALUE_STRING, value)))


_OK_STATUS = _field(_RESPONSE_STATUS, b"")
_REMOVE_AUTHORIZATION = _field(_OK_HEADERS_TO_REMOVE, b"authorization")
_DENY_FIXED_HEADERS = (_field(_DENIED_HEADERS, _header_option(b"content-type", b"application/json"))
                       + _field(_DENIED_HEADERS, _header_option(b"cache-control", b"no-store")))
_ALLOWED_REASON = _string_entry(_REASON_KEY, b"allowed")


def _deny_parts(code: str) -> tuple[bytes, bytes, bytes]:
    """Return the encoded gRPC status, HTTP status and reason metadata entry of deny reason `code`."""
    status = REASONS[code].status
    grpc_code = code_pb2.UNAUTHENTICATED if status == 401 else code_pb2.PERMISSION_DENIED
    grpc_status = _field(_RESPONSE_STATUS, _varint_field(1, grpc_code) + _field(_STATUS_MESSAGE, code.encode()))
    http_status = _field(_DENIED_STATUS, _varint_field(1, status))
    return grpc_status, http_status, _string_entry(_REASON_KEY, code.encode())


_DENY_PARTS = {code: _deny_parts(code) for code in REASONS if code != "allowed"}


class ResponseEncoder:
    """Encodes the CheckResponse for a Decision, for a given minted-token header."""

    def __init__(self, token_header: str):
        self.token_header = token_header
        self._token_header_key = _field(_HEADER_KEY, token_header.encode())

    def encode(self, decision: Decision) -> bytes:
        """Return the serialised CheckResponse for `decision`."""
        if decision.allowed:
            return self._encode_allowed(decision)
        return self._encode_denied(decision)

    def _metadata(self, decision: Decision, reason: bytes) -> bytes:
        struct = (_string_entry(_DECISION_ID_KEY, decision.decision_id.encode()) + reason
                  + _string_entry(_POLICIES_KEY, ",".join(decision.policies).encode()))
        return _field(_RESPONSE_METADATA, struct)

    def _encode_allowed(self, decision: Decision) -> bytes:
        assert decision.minted is not None
        header = self._token_header_key + _field(_HEADER_VALUE, decision.minted.token.encode("ascii"))
        ok = _field(_OK_HEADERS, _field(_OPTION_HEADER, header) + _OPTION_APPEND_ACTION)
        injected = decision.injected_headers
        for name, value in injected:
            ok += _field(_OK_HEADERS, _header_option(name.encode(), value.encode()))
        # The caller's credential never passes, unless a secret replaces it in the same header
        # (Envoy applies headers_to_remove after the headers it sets).
        if not any(name == "authorization" for name, _ in injected):
            ok += _REMOVE_AUTHORIZATION
        return _OK_STATUS + _field(_RESPONSE_OK, ok) + self._metadata(decision, _ALLOWED_REASON)

    def _encode_denied(self, decision: Decision) -> bytes:
        grpc_status, http_status, reason = _DENY_PARTS[decision.reason]
        headers = _DENY_FIXED_HEADERS
        challenge = www_authenticate(decision)
        if challenge is not None:
            headers += _field(_DENIED_HEADERS, _header_option(b"www-authenticate", challenge.encode()))
        body = orjson.dumps({
            "error": decision.reason,
            "error_description": decision.description,
            "decision_id": decision.decision_id,
        })
        denied = http_status + headers + _field(_DENIED_BODY, body)
        return grpc_status + _field(_RESPONSE_DENIED, denied) + self._metadata(decision, reason)


def build_check_response(decision: Decision, token_header: str) -> external_auth_pb2.CheckResponse:
    """Return the CheckResponse for `decision` as a message (the gRPC service sends the encoded bytes)."""
    return external_auth_pb2.CheckResponse.FromString(ResponseEncoder(token_header).encode(decision))
