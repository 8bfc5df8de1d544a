"""protos/extauthz/v1/decision.proto: the generated module is current, and every line `serve` writes conforms."""

from __future__ import annotations

import json
import time
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import descriptor_pb2, json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_tools import protoc
from helpers import AUDIENCE, check_request
from processes import LOOPBACK, ServeProcess

from extauthz.config import DecisionLogConfig
from extauthz.decision import Decision
from extauthz.errors import REASONS, DenyError
from extauthz.identity import EndUser
from extauthz.mint import MintedToken
from extauthz.record import build_record
from extauthz.request import HttpRequest, Peer
from extauthz.v1 import decision_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "extauthz/v1/decision.proto"
ENVELOPE = {"type", "writer", "seq", "prev_hash", "hash"}
INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
               FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
RECORD_OPTIONS = {"claims": ["email", "groups"], "headers": ["x-tenant-id"], "clear_headers": ["user-agent"]}


# The generated module against the .proto.


def compiled_descriptor(proto_root: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile PROTO under `proto_root` with grpcio-tools and return its FileDescriptorProto."""
    output = tmp_path / "decision.binpb"
    well_known = resources.files("grpc_tools") / "_proto"
    result = protoc.main(["grpc_tools.protoc", f"--proto_path={proto_root}", f"--proto_path={well_known}",
                          f"--descriptor_set_out={output}", str(proto_root / PROTO)])
    assert result == 0, "protoc failed: its error is printed above"
    return descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes()).file[0]


def generated_descriptor() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(decision_pb2.DESCRIPTOR.serialized_pb)


def default_json_name(name: str) -> str:
    """Return protoc's JSON name for a field without json_name: underscores dropped, next letter upper case."""
    parts = name.split("_")
    return parts[0] + "".join(part[:1].upper() + part[1:] for part in parts[1:])


def without_default_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Clear every json_name equal to the default: the Python generator leaves those out of the module."""
    file = descriptor_pb2.FileDescriptorProto.FromString(file.SerializeToString())
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
    return file


def test_generated_module_current(tmp_path):
    expected = without_default_json_names(compiled_descriptor(PROTO_ROOT, tmp_path))
    generated = without_default_json_names(generated_descriptor())
    assert text_format.MessageToString(generated) == text_format.MessageToString(expected), (
        f"extauthz/v1/decision_pb2.py is older than protos/{PROTO}: run `make test`, or `pip install -e .`, "
        "which regenerates it")


def test_stale_module_detected(tmp_path):
    changed_root = tmp_path / "protos"
    (changed_root / PROTO).parent.mkdir(parents=True)
    text = (PROTO_ROOT / PROTO).read_text(encoding="utf-8")
    added_field = "\n  optional string added_by_test = 536870911;"
    changed = text.replace("message Checkpoint {", "message Checkpoint {" + added_field, 1)
    assert changed != text
    (changed_root / PROTO).write_text(changed, encoding="utf-8")
    changed_descriptor = without_default_json_names(compiled_descriptor(changed_root, tmp_path))
    assert changed_descriptor != without_default_json_names(generated_descriptor())


def test_json_names_are_field_names():
    for message in (decision_pb2.DecisionRecord, decision_pb2.Checkpoint):
        for field in message.DESCRIPTOR.fields:
            assert field.json_name == field.name, f"{message.DESCRIPTOR.name}.{field.name}"


# Conformance of records.


def assert_conforms(line: bytes) -> Message:
    """Parse one decision log line into its message, check it survives a round trip, and return it."""
    record = json.loads(line)
    assert isinstance(record, dict), line
    if record.get("type") == "checkpoint":
        message: Message = json_format.Parse(line, decision_pb2.Checkpoint(), ignore_unknown_fields=False)
        for field in message.DESCRIPTOR.fields:
            if field.name != "time":
                assert message.HasField(field.name), f"checkpoint without {field.name}: {line!r}"
        assert message.HasField("time")
        assert message.trigger in ("start", "interval", "shutdown")
    else:
        assert record.get("type", "decision") == "decision", line
        message = json_format.Parse(line, decision_pb2.DecisionRecord(), ignore_unknown_fields=False)
        assert message.decision in ("allow", "deny")
        assert message.reason in REASONS
        assert message.status == REASONS[message.reason].status

    printed = json_format.MessageToDict(message)
    assert json_format.Parse(json.dumps(printed), type(message)(), ignore_unknown_fields=False) == message
    # proto3 JSON leaves out empty lists and maps, so a written `policies: []` does not come back.
    expected = {name: value for name, value in record.items() if value != [] and value != {}}
    assert printed.keys() == expected.keys(), line
    for name, value in expected.items():
        assert same_json(message.DESCRIPTOR.fields_by_name[name], printed[name], value), f"{name} in {line!r}"
    return message


def same_json(field: FieldDescriptor, printed: Any, written: Any) -> bool:
    """Compare a value as json_format prints it with the value as the log wrote it."""
    if field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp":
        return datetime.fromisoformat(printed) == datetime.fromisoformat(written)
    if field.type in INT64_TYPES:
        # proto3 JSON prints 64-bit integers as strings.
        return isinstance(written, int) and not isinstance(written, bool) and int(printed) == written
    return printed == written


def full_decision() -> Decision:
    """A Decision with every field that build_record reads set, whether or not one Check can set them all."""
    started_at = time.time()
    headers = {"x-tenant-id": "tenant-4711", "user-agent": "curl/8.5.0"}
    peer = Peer(request_id="req-full", source_address="10.0.0.7", source_principal="spiffe://a/ns/web/sa/web",
                destination_principal="spiffe://a/ns/shop/sa/shop", destination_address="10.0.0.9",
                destination_port=8443, context_extensions={"namespace": "shop"})
    request = HttpRequest(method="GET", scheme="https", host="shop.example.com", authority_port=None,
                          path="/admin", query="", headers=headers, request_id=peer.request_id,
                          source_address=peer.source_address, source_principal=peer.source_principal,
                          destination_principal=peer.destination_principal, destination_port=8443,
                          context_extensions=peer.context_extensions)
    user = EndUser(issuer="https://idp.test", subject="alice", audiences=(AUDIENCE,), presenter="",
                   expires_at=started_at + 600, not_before=None, issued_at=started_at - 60,
                   auth_time=started_at - 30, acr="urn:test:mfa", amr=("pwd",), session_id=None, token_id=None,
                   kid=None, claims={"sub": "alice", "email": "alice@example.com", "groups": ["ops"]})
    decision = Decision(decision_id="09361cfc-efc8-401a-8907-80f28780822c", started_at=started_at,
                        peer=peer, request=request, user=user, policies=["shop/admin-step-up"],
                        degraded=True, retry=True, injected_secrets=["partner-key"],
                        would_deny=DenyError("insufficient_user_authentication"), duration=0.0004)
    decision.allow(MintedToken(token="not-logged", jti=decision.decision_id, audience="admin-api",
                               expires_at=int(started_at) + 30, kid="kid-1"))
    decision.detail = "fixed detail text"
    return decision


def test_proto_covers_every_record_field():
    config = DecisionLogConfig("stdout", None, claims=("email", "groups"), headers=("x-tenant-id",),
                               clear_headers=("user-agent",))
    record = build_record(full_decision(), config)
    fields = {field.name for field in decision_pb2.DecisionRecord.DESCRIPTOR.fields}
    assert set(record) == fields - ENVELOPE
    assert_conforms(json.dumps(record).encode())


def test_envelope_fields_parse():
    record = build_record(full_decision())
    record.update({"type": "decision", "writer": "host:42:0a1b2c3d", "seq": 2, "prev_hash": "0" * 64,
                   "hash": "f" * 64})
    message = assert_conforms(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    assert message.seq == 2


def test_checkpoint_parses():
    line = json.dumps({"type": "checkpoint", "writer": "host:42:0a1b2c3d", "seq": 1, "prev_hash": "0" * 64,
                       "hash": "a" * 64, "time": "2026-12-04T20:11:21.472Z", "trigger": "start", "decisions": 0,
                       "kid": "q2mJ1Cqz3u1Wl0xvE0n5j6bXfZbA3cVQd8P2yk1sX1o", "alg": "ES256",
                       "signature": "c2lnbmF0dXJl"}, sort_keys=True)
    message = assert_conforms(line.encode())
    assert message.decisions == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decisionId": "x"}, "no field named"),
        ({"status": "two hundred"}, "Couldn't parse integer"),
        ({"time": "yesterday"}, "Failed to parse time"),
        ({"token_exp": 1.5}, "Couldn't parse integer"),
    ],
)
def test_nonconforming_record_rejected(change, message):
    record = build_record(full_decision())
    record.update(change)
    with pytest.raises(json_format.ParseError, match=message):
        json_format.Parse(json.dumps(record), decision_pb2.DecisionRecord(), ignore_unknown_fields=False)


def test_written_field_missing_from_proto_rejected():
    record = build_record(full_decision())
    record["user_secret"] = "x"
    with pytest.raises(json_format.ParseError):
        assert_conforms(json.dumps(record).encode())


@pytest.fixture(scope="module")
def served_lines(tmp_path_factory, idp) -> list[bytes]:
    """Drive one Check of each kind through a real `serve` with the file sink; return every line it wrote."""
    folder = tmp_path_factory.mktemp("conformance")
    log_path = folder / "decisions.jsonl"
    server = ServeProcess(folder, idp, overrides={"decision_log": {"sink": f"file:{log_path}", **RECORD_OPTIONS}})
    now = int(time.time())
    fresh = idp.token(auth_time=now - 30, aud=[AUDIENCE, "other-api"], email="alice@example.com",
                      groups=["admins", "ops"])
    requests = [
        check_request(path="/admin", token=fresh, destination_port=8443,
                      headers={"x-tenant-id": "tenant-4711", "user-agent": "curl/8.5.0"},
                      context_extensions={"namespace": "shop", "route": "admin"}),
        check_request(path="/public/items", request_id="req-anonymous"),
        check_request(path="/elsewhere", token=fresh),
        check_request(path="/admin", token=idp.token(auth_time=now - 3600)),
        check_request(path="/admin", token="not.a.jwt"),
        check_request(path="/admin", token=idp.token(iat=now - 900, exp=now - 600)),
        check_request(path="/admin"),
        check_request(path="/admin", headers={"authorization": "Basic YWxpY2U6cGFzc3dvcmQ="}),
        check_request(path="/a/%2F/b", headers={"user-agent": "curl/8.5.0"}),
        check_request(host="bad host", path="/public/items"),
        external_auth_pb2.CheckRequest(),
    ]
    try:
        server.start()
        server.wait_ready()
        with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for request in requests:
                stub.Check(request, timeout=10)
    finally:
        exit_code = server.stop()
    assert exit_code == 0, server.stderr().decode(errors="replace")[-4000:]
    return log_path.read_bytes().splitlines()


SERVED_REASONS = ["allowed", "allowed", "no_matching_policy", "insufficient_user_authentication", "invalid_token",
                  "token_expired", "missing_token", "invalid_authorization_header", "invalid_path", "invalid_host",
                  "non_http_request"]


def test_served_lines_conform(served_lines):
    messages = [assert_conforms(line) for line in served_lines]
    decisions = [message for message in messages if isinstance(message, decision_pb2.DecisionRecord)]
    assert [message.reason for message in decisions] == SERVED_REASONS


def test_served_lines_use_new_fields(served_lines):
    records = [json.loads(line) for line in served_lines]
    decisions = [record for record in records if record.get("type", "decision") == "decision"]
    written = set().union(*decisions)
    for name in ("user_aud", "user_amr", "user_auth_time", "user_claims", "headers", "context_extensions",
                 "destination_port", "token_jti", "detail", "auth_age_s"):
        assert name in written, name
    first = decisions[0]
    assert first["user_claims"] == {"email": "alice@example.com", "groups": ["admins", "ops"]}
    assert first["headers"]["user-agent"] == "curl/8.5.0"
    assert first["headers"]["x-tenant-id"].startswith("sha256:")
    assert first["context_extensions"] == {"namespace": "shop", "route": "admin"}
    assert first["destination_port"] == 8443
