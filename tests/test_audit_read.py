"""Reading decision logs: files, rotated sets, gzip, stdin, Redis streams, and lines that are not records."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import orjson
import pytest
from audit_lines import ChainWriter
from envoy.service.auth.v3 import external_auth_pb2_grpc
from helpers import check_request
from processes import LOOPBACK, ServeProcess
from redis_servers import RedisServer, redis_server  # noqa: F401 - pytest fixture

from extauthz.audit_read import (
    MAX_LINE_BYTES,
    LogReader,
    ReadError,
    RedisSource,
    expand_paths,
    parse_line,
    reader_from_arguments,
)
from extauthz.cli import main

FLAT_RECORD = {"time": "2026-03-01T12:00:00.000Z", "decision_id": "flat-1", "decision": "allow", "status": 200,
               "reason": "allowed", "policies": ["shop/public"], "duration_ms": 0.3}
OPERATIONAL_LINE = (b'{"time":"2026-03-01T12:00:00.100Z","level":"error","logger":"extauthz.pipeline",'
                    b'"message":"Check failed","decision_id":"flat-1"}\n')


def decision(decision_id: str, **fields) -> dict:
    return {"time": "2026-03-01T12:00:01.000Z", "decision_id": decision_id, "decision": "deny", "status": 403,
            "reason": "no_matching_policy", "policies": [], "duration_ms": 0.2, **fields}


def write_chain(path: Path, ids: list[str], compress: bool = False) -> ChainWriter:
    writer = ChainWriter()
    for decision_id in ids:
        writer.decision(decision(decision_id))
    data = writer.text()
    path.write_bytes(gzip.compress(data) if compress else data)
    return writer


def ids_of(reader: LogReader) -> list[str]:
    return [entry.record.get("decision_id", "checkpoint") for entry in reader]


def test_parse_line_accepts_records_only():
    assert parse_line(orjson.dumps(FLAT_RECORD)) == FLAT_RECORD
    assert parse_line(b'{"type":"checkpoint","seq":1}')["type"] == "checkpoint"
    assert parse_line(b'{"type":"decision","seq":2}')["seq"] == 2
    assert parse_line(OPERATIONAL_LINE) is None
    assert parse_line(b'{"type":"metrics","seq":3}') is None
    assert parse_line(b'[1, 2]') is None
    assert parse_line(b"Traceback (most recent call last):") is None
    assert parse_line(b'{"decision_id":"x","decision":"maybe","reason":"allowed"}') is None
    assert parse_line(b'\xff\xfe{"type":"decision"}') is None


def test_file_mixes_records_and_other_lines(tmp_path):
    writer = ChainWriter()
    writer.decision(decision("chained-1"))
    path = tmp_path / "stdout.log"
    path.write_bytes(writer.lines[0] + OPERATIONAL_LINE + orjson.dumps(FLAT_RECORD) + b"\n" + b"\n"
                     + b"not json at all\n" + writer.lines[1] + b'{"decision_id": "cut-off')

    reader = LogReader(files=expand_paths([str(path)]))
    entries = list(reader)

    assert [entry.source for entry in entries] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert [entry.kind for entry in entries] == ["checkpoint", "decision", "decision"]
    assert entries[1].record == FLAT_RECORD
    assert entries[2].record["decision_id"] == "chained-1"
    # The operational line, the text line and the truncated last line; the blank line is not counted.
    assert reader.skipped == 3
    assert reader.skipped_sources == [f"{path}:2", f"{path}:5", f"{path}:7"]
    assert reader.records == 3
    assert reader.problems == []


def test_rotated_set_reads_oldest_first(tmp_path):
    path = tmp_path / "decisions.log"
    write_chain(tmp_path / "decisions.log.3", ["d3"])
    write_chain(tmp_path / "decisions.log.2.gz", ["d2"], compress=True)
    write_chain(tmp_path / "decisions.log.1", ["d1"])
    write_chain(path, ["d0"])
    (tmp_path / "decisions.log.bak").write_text("ignored\n")

    files = expand_paths([str(path)])

    assert files == [str(tmp_path / "decisions.log.3"), str(tmp_path / "decisions.log.2.gz"),
                     str(tmp_path / "decisions.log.1"), str(path)]
    decision_ids = [entry.record["decision_id"] for entry in LogReader(files=files) if entry.kind == "decision"]
    assert decision_ids == ["d3", "d2", "d1", "d0"]


def test_rotated_set_listed_explicitly_read_once(tmp_path):
    path = tmp_path / "decisions.log"
    write_chain(tmp_path / "decisions.log.1", ["d1"])
    write_chain(path, ["d0"])

    explicit = expand_paths([str(tmp_path / "decisions.log.1"), str(path)])
    overlapping = expand_paths([str(path), str(tmp_path / "decisions.log.1")])

    assert explicit == [str(tmp_path / "decisions.log.1"), str(path)]
    assert overlapping == explicit


def test_rotated_backups_without_current_file(tmp_path):
    write_chain(tmp_path / "decisions.log.1", ["d1"])

    assert expand_paths([str(tmp_path / "decisions.log")]) == [str(tmp_path / "decisions.log.1")]


def test_gzip_detected_by_content(tmp_path):
    path = tmp_path / "archive-without-suffix"
    write_chain(path, ["g1", "g2"], compress=True)

    assert ids_of(LogReader(files=[str(path)])) == ["checkpoint", "g1", "g2"]


def test_truncated_gzip_is_a_problem(tmp_path):
    whole = tmp_path / "whole.log"
    write_chain(whole, [f"t{index}" for index in range(200)])
    truncated = tmp_path / "truncated.log.gz"
    compressed = gzip.compress(whole.read_bytes())
    truncated.write_bytes(compressed[: len(compressed) // 2])
    after = tmp_path / "after.log"
    write_chain(after, ["after-1"])

    reader = LogReader(files=[str(truncated), str(after)])
    read = ids_of(reader)

    assert len(reader.problems) == 1
    assert reader.problems[0].startswith(f"{truncated}: unreadable after line ")
    assert "truncated or corrupt" in reader.problems[0]
    # Lines before the damage and every later source are still read.
    assert read[0] == "checkpoint"
    assert read[-1] == "after-1"


def test_overlong_line_is_skipped(tmp_path):
    path = tmp_path / "long.log"
    long_record = orjson.dumps(decision("huge", detail="x" * (MAX_LINE_BYTES + 10)))
    path.write_bytes(long_record + b"\n" + orjson.dumps(decision("next")) + b"\n")

    reader = LogReader(files=[str(path)])

    assert ids_of(reader) == ["next"]
    assert reader.skipped == 1
    assert reader.skipped_sources == [f"{path}:1"]


def test_missing_path_and_folder_rejected(tmp_path):
    with pytest.raises(ReadError, match="file not found"):
        expand_paths([str(tmp_path / "nothing.log")])
    with pytest.raises(ReadError, match="is a folder"):
        expand_paths([str(tmp_path)])


def test_stdin_reader_accepts_gzip():
    writer = ChainWriter()
    writer.decision(decision("from-stdin"))
    stdin = io.BufferedReader(io.BytesIO(gzip.compress(writer.text())))

    reader = LogReader(files=["-"], stdin=stdin)

    assert [entry.source for entry in reader] == ["-:1", "-:2"]


def test_cli_reads_stdin(tmp_path):
    writer = ChainWriter()
    writer.decision(decision("piped-1"))
    writer.decision(decision("piped-2", decision="allow", status=200, reason="allowed"))
    result = subprocess.run([sys.executable, "-m", "extauthz", "audit", "query", "-", "--format", "json",
                             "--decision", "allow"],
                            input=gzip.compress(OPERATIONAL_LINE + writer.text()), capture_output=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["decision_id"] for line in result.stdout.splitlines()] == ["piped-2"]
    assert b"1 of 2 decisions matched; 1 checkpoints ignored; 1 lines skipped" in result.stderr


def add_to_stream(server: RedisServer, stream: str, lines: list[bytes]) -> list[str]:
    client = server.client()
    try:
        return [client.xadd(stream, {"r": line.rstrip(b"\n")}).decode() for line in lines]
    finally:
        client.close()


def test_redis_stream_read_in_pages(redis_server):  # noqa: F811 - pytest fixture
    writer = ChainWriter()
    for index in range(7):
        writer.decision(decision(f"r{index}"))
    entry_ids = add_to_stream(redis_server, "extauthz:decisions", writer.lines)
    client = redis_server.client()
    client.xadd("extauthz:decisions", {"other": b"field"})
    client.xadd("extauthz:decisions", {"r": OPERATIONAL_LINE.strip()})
    client.close()

    reader = LogReader(redis=[RedisSource(redis_server.url, "extauthz:decisions", page_size=3)])
    entries = list(reader)

    assert [entry.record.get("seq") for entry in entries] == list(range(1, 9))
    assert [entry.source for entry in entries] == [f"extauthz:decisions#{entry_id}" for entry_id in entry_ids]
    assert reader.skipped == 2
    assert reader.problems == []


def test_redis_stream_with_password(tmp_path, monkeypatch, capsys):
    server = RedisServer(tmp_path / "redis", password="audit-reader-secret").start()
    try:
        writer = ChainWriter()
        writer.decision(decision("secured-1"))
        add_to_stream(server, "audit", writer.lines)
        monkeypatch.setenv("AUDIT_REDIS_PASSWORD", "audit-reader-secret")

        code = main(["audit", "query", "--redis", server.url, "--stream", "audit",
                     "--redis-password-env", "AUDIT_REDIS_PASSWORD", "--format", "json"])
        output = capsys.readouterr()

        assert code == 0, output.err
        assert [json.loads(line)["decision_id"] for line in output.out.splitlines()] == ["secured-1"]
        assert "audit-reader-secret" not in output.err

        code = main(["audit", "query", "--redis", server.url, "--stream", "audit"])
        output = capsys.readouterr()
        assert code == 2
        assert "stream 'audit' at redis://127.0.0.1" in output.err
        assert "Redis requires a password" in output.err
        assert "--redis-password-env" in output.err

        monkeypatch.setenv("AUDIT_REDIS_PASSWORD", "not-the-secret")
        code = main(["audit", "verify", "--redis", server.url, "--stream", "audit",
                     "--redis-password-env", "AUDIT_REDIS_PASSWORD", "--skip-signatures"])
        output = capsys.readouterr()
        assert code == 2
        assert "Redis rejected the password in AUDIT_REDIS_PASSWORD" in output.err
        assert "not-the-secret" not in output.err
    finally:
        server.stop()


def parse_sources(*argv: str):
    import argparse

    from extauthz.audit_read import add_source_arguments

    parser = argparse.ArgumentParser()
    add_source_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "message"), [
    ((), "no decision log given"),
    (("--redis", "redis://127.0.0.1:1/0"), "--redis and --stream go together"),
    (("--stream", "audit", "x.log"), "--redis and --stream go together"),
    (("--redis", "redis://:hunter2@127.0.0.1:1/0", "--stream", "audit"), "a password in the URL"),
    (("--redis", "http://127.0.0.1:1/0", "--stream", "audit"), "unsupported URL scheme"),
    (("--redis", "redis://127.0.0.1:1/0", "--stream", "audit", "--redis-password-env", "AUDIT_UNSET_VARIABLE"),
     "environment variable AUDIT_UNSET_VARIABLE is not set"),
    (("-", "-"), "can be given once"),
])
def test_source_arguments_rejected(argv, message):
    with pytest.raises(ReadError, match=message) as raised:
        reader_from_arguments(parse_sources(*argv))
    assert "hunter2" not in str(raised.value)


def test_redis_missing_stream_and_wrong_type(redis_server):  # noqa: F811 - pytest fixture
    client = redis_server.client()
    client.set("plain-key", "value")
    client.close()

    with pytest.raises(ReadError, match="not found"):
        reader_from_arguments(parse_sources("--redis", redis_server.url, "--stream", "no-such-stream"))
    with pytest.raises(ReadError, match="is a string, not a stream"):
        reader_from_arguments(parse_sources("--redis", redis_server.url, "--stream", "plain-key"))


def test_redis_unreachable_named(tmp_path):
    from helpers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ReadError, match="cannot connect"):
        reader_from_arguments(parse_sources("--redis", url, "--stream", "audit"))


def test_serve_stdout_and_stderr_captured_together(tmp_path, idp):
    """Records that today's `extauthz serve` writes, mixed with its operational logs as a pod log mixes them."""
    server = ServeProcess(tmp_path, idp).start()
    try:
        server.wait_ready()
        with grpc.insecure_channel(f"{LOOPBACK}:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            stub.Check(check_request(path="/public/items", request_id="serve-1"), timeout=10)
            stub.Check(check_request(path="/admin/users", request_id="serve-2"), timeout=10)
            stub.Check(check_request(path="/public/items", token=idp.token(), request_id="serve-3"), timeout=10)
    finally:
        assert server.stop() == 0
    stderr_lines = [line for line in server.stderr().splitlines() if line.strip()]
    stdout_lines = server.decision_log().splitlines()
    captured = tmp_path / "pod.log"
    # Operational lines first and last, decision records in between, as `kubectl logs` interleaves them.
    captured.write_bytes(b"\n".join(stderr_lines[:2] + stdout_lines + stderr_lines[2:]) + b"\n")

    reader = LogReader(files=expand_paths([str(captured)]))
    entries = list(reader)
    decisions = [entry for entry in entries if entry.kind == "decision"]

    # The start checkpoint, three decisions and the shutdown checkpoint.
    assert len(stdout_lines) == 5
    assert len(stderr_lines) >= 2
    assert [entry.record["request_id"] for entry in decisions] == ["serve-1", "serve-2", "serve-3"]
    assert [entry.record["reason"] for entry in decisions] == ["allowed", "missing_token", "allowed"]
    assert [entry.record["trigger"] for entry in entries if entry.kind == "checkpoint"] == ["start", "shutdown"]
    assert reader.skipped == len(stderr_lines)
