"""The decision log writer: checkpoints, sinks, the spool, on_full and shutdown, with real files and Redis."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from helpers import check_request, write_config
from redis_servers import RedisServer

from extauthz.audit_chain import generate_signer, load_signer, write_key_file
from extauthz.cli import main
from extauthz.config import Config, load_config
from extauthz.decision_log import DecisionLog
from extauthz.errors import ConfigError
from extauthz.response import build_check_response
from extauthz.server import Service, build_authorizer
from extauthz.sinks import FileSink, FileSpool, RedisStreamSink, SinkError

STREAM = "test:decisions"
# Seconds a test waits for the writer thread, for Redis, or for a recovery after a restart.
WAIT_TIMEOUT = 60.0
# At most this many Checks in the loops that run until a condition holds.
MAX_CHECKS = 2000


def audit_config(folder: Path, idp, decision_log: dict[str, Any], store: dict[str, Any] | None = None) -> Config:
    """Write a configuration whose decision log uses a fresh key file, and load it."""
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "audit-key.pem"
    if not key_path.exists():
        write_key_file(key_path, generate_signer())
    (folder / "audit-jwks.json").write_bytes(load_signer(key_path).jwks())
    overrides: dict[str, Any] = {"decision_log": {"signing_key_file": "audit-key.pem", **decision_log}}
    if store is not None:
        overrides["store"] = store
    return load_config(write_config(folder, idp, overrides=overrides))


def redis_config(folder: Path, idp, server: RedisServer, **decision_log: Any) -> Config:
    return audit_config(folder, idp, {"sink": "redis", "redis": {"stream": STREAM}, **decision_log},
                        store={"url": server.url})


def wait_until(condition, what: str, timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def stream_lines(server: RedisServer) -> list[dict[str, Any]]:
    client = server.client()
    try:
        return [orjson.loads(fields[b"r"]) for _, fields in client.xrange(STREAM)]
    finally:
        client.close()


def stream_length(server: RedisServer) -> int:
    client = server.client()
    try:
        return client.xlen(STREAM)
    except redis.RedisError:
        return 0
    finally:
        client.close()


def sample(decision_log: DecisionLog, name: str, **labels: str) -> float:
    return decision_log.metrics.registry.get_sample_value(name, labels) or 0.0


def verify_redis(capsys, server: RedisServer, jwks: Path) -> tuple[int, dict[str, Any]]:
    code = main(["audit", "verify", "--redis", server.url, "--stream", STREAM, "--jwks", str(jwks),
                 "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def file_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def persistent_redis(tmp_path):
    """A redis-server that keeps every acknowledged write across a kill and restart."""
    server = RedisServer(tmp_path / "redis", persist=True)
    try:
        yield server.start()
    finally:
        server.stop()


# --- checkpoints and the file sink ----------------------------------------------------------------------


def test_start_and_shutdown_checkpoints(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"sink": "file:decisions.log"})
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    authorizer.check(check_request(path="/public/a"))
    authorizer.check(check_request(path="/elsewhere"))
    decision_log.close()

    lines = file_lines(tmp_path / "decisions.log")
    assert [line["type"] for line in lines] == ["checkpoint", "decision", "decision", "checkpoint"]
    assert lines[0]["trigger"] == "start"
    assert lines[0]["decisions"] == 0
    assert lines[-1]["trigger"] == "shutdown"
    assert lines[-1]["decisions"] == 2
    assert {line["writer"] for line in lines} == {decision_log.writer_id}
    assert lines[-1]["kid"] == decision_log.signer.kid
    assert lines[-1]["alg"] == "ES256"


def test_interval_checkpoint_needs_decisions(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"sink": "file:decisions.log", "checkpoint_interval": 1})
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    try:
        authorizer.check(check_request(path="/public/a"))
        wait_until(lambda: any(line.get("trigger") == "interval" for line in file_lines(tmp_path / "decisions.log")),
                   "an interval checkpoint")
        # Two more intervals without a decision: no interval checkpoint may follow.
        time.sleep(2.5)
    finally:
        decision_log.close()

    checkpoints = [line for line in file_lines(tmp_path / "decisions.log") if line["type"] == "checkpoint"]
    assert [checkpoint["trigger"] for checkpoint in checkpoints] == ["start", "interval", "shutdown"]
    assert [checkpoint["decisions"] for checkpoint in checkpoints] == [0, 1, 0]


def test_shutdown_writes_queued_records(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"sink": "file:decisions.log"})
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    decisions = [authorizer.check(check_request(path="/public/a", request_id=f"req-{index}"))
                 for index in range(1500)]
    decision_log.close()

    lines = file_lines(tmp_path / "decisions.log")
    assert [line["decision_id"] for line in lines if line["type"] == "decision"] == [
        decision.decision_id for decision in decisions]
    assert [line["seq"] for line in lines] == list(range(1, 1503))
    assert lines[-1]["trigger"] == "shutdown"
    assert lines[-1]["decisions"] == 1500


def test_rotation_keeps_whole_lines(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"sink": "file:decisions.log",
                                          "file": {"max_bytes": 4096, "backups": 100}})
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    for index in range(200):
        authorizer.check(check_request(path="/public/a", request_id=f"req-{index}"))
    decision_log.close()

    files = sorted(tmp_path.glob("decisions.log.*"), key=lambda path: -int(path.suffix[1:]))
    files.append(tmp_path / "decisions.log")
    assert len(files) > 10
    seqs = []
    for path in files:
        data = path.read_bytes()
        assert len(data) <= 4096, path
        assert data.endswith(b"\n"), path
        seqs.extend(json.loads(line)["seq"] for line in data.splitlines())
    # Oldest backup first, then PATH: every line once, in order.
    assert seqs == list(range(1, 203))


@pytest.mark.parametrize("seed", range(20))
def test_file_sink_rotates_batches(tmp_path, seed):
    """Batches of lines of random lengths: every file within max_bytes, every line once and in order."""
    generator = random.Random(seed)
    sink = FileSink(tmp_path / "decisions.log", max_bytes=1000, backups=1000)
    written: list[bytes] = []
    for _ in range(40):
        batch = [b"%d:" % len(written) + b"x" * generator.randint(10, 600) + b"\n"
                 for _ in range(generator.randint(1, 8))]
        written.extend(batch)
        sink.write(batch)
    sink.close()

    files = sorted(tmp_path.glob("decisions.log.*"), key=lambda path: -int(path.suffix[1:]))
    read: list[bytes] = []
    for path in [*files, tmp_path / "decisions.log"]:
        data = path.read_bytes()
        assert len(data) <= 1000, path
        read.extend(data.splitlines(keepends=True))
    assert read == written


def test_named_pipe_never_rotated(tmp_path):
    pipe = tmp_path / "decisions.pipe"
    os.mkfifo(pipe)
    received = bytearray()

    def read_pipe() -> None:
        with open(pipe, "rb") as reader:
            while chunk := reader.read(65536):
                received.extend(chunk)

    reader = threading.Thread(target=read_pipe, daemon=True)
    reader.start()
    sink = FileSink(pipe, max_bytes=4096, backups=3)
    lines = [b"x" * 1000 + b"\n" for _ in range(20)]
    sink.write(lines)
    sink.close()
    reader.join(timeout=WAIT_TIMEOUT)

    assert bytes(received) == b"".join(lines)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["decisions.pipe"]


def test_line_longer_than_max_bytes(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"sink": "file:decisions.log", "file": {"max_bytes": 4096, "backups": 5}})
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    authorizer.check(check_request(path="/public/" + "a" * 5000))
    authorizer.check(check_request(path="/public/b"))
    decision_log.close()

    long_file = [path for path in tmp_path.glob("decisions.log*") if path.stat().st_size > 4096]
    assert len(long_file) == 1
    assert len(long_file[0].read_bytes().splitlines()) == 1


# --- hand-over -----------------------------------------------------------------------------------------


def test_full_queue_drops_after_wait(tmp_path, idp, caplog):
    config = audit_config(tmp_path, idp, {"max_wait_ms": 20})
    buffer = io.BytesIO()
    decision_log = DecisionLog(config.decision_log, stream=buffer, start=False, queue_capacity=2)
    authorizer, _ = build_authorizer(config, decision_log)
    try:
        kept = [authorizer.check(check_request(path="/public/a", request_id=f"req-{index}")) for index in range(2)]
        denied = authorizer.check(check_request(path="/public/a", request_id="req-late"))
    finally:
        decision_log.close()

    assert [decision.reason for decision in kept] == ["allowed", "allowed"]
    assert denied.reason == "audit_unavailable"
    assert denied.status == 503
    assert denied.minted is None
    response = build_check_response(denied, "txn-token")
    assert response.denied_response.status.code == 503
    assert json.loads(response.denied_response.body)["error"] == "audit_unavailable"
    assert sample(decision_log, "extauthz_decision_log_dropped_total", reason="queue_full") == 1
    records = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    assert [record["request_id"] for record in records if record["type"] == "decision"] == ["req-0", "req-1"]
    drops = [record for record in caplog.records if record.getMessage() == "decision records dropped"]
    assert [record.reason for record in drops] == ["queue_full"]


def test_write_after_close_dropped(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"on_full": "drop"})
    decision_log = DecisionLog(config.decision_log, stream=io.BytesIO())
    authorizer, _ = build_authorizer(config, decision_log)
    decision_log.close()
    decision = authorizer.check(check_request(path="/public/a"))
    assert decision.reason == "allowed"
    assert sample(decision_log, "extauthz_decision_log_dropped_total", reason="closed") == 1


# --- the Redis stream sink ------------------------------------------------------------------------------


def test_redis_sink_verifies(tmp_path, idp, persistent_redis, capsys):
    config = redis_config(tmp_path, idp, persistent_redis)
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    for index in range(5):
        authorizer.check(check_request(path="/public/a", request_id=f"req-{index}"))
    decision_log.close()

    lines = stream_lines(persistent_redis)
    assert [line["seq"] for line in lines] == list(range(1, 8))
    code, report = verify_redis(capsys, persistent_redis, tmp_path / "audit-jwks.json")
    assert code == 0
    assert report["writers"][0]["decisions"] == 5


def test_redis_restart_mid_stream(tmp_path, idp, persistent_redis, capsys):
    config = redis_config(tmp_path, idp, persistent_redis)
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    decision_ids: list[str] = []
    reasons: set[str] = set()
    restarted = threading.Event()
    after_restart = []

    def send_checks() -> None:
        for index in range(MAX_CHECKS * 5):
            decision = authorizer.check(check_request(path="/public/a", request_id=f"req-{index}"))
            decision_ids.append(decision.decision_id)
            reasons.add(decision.reason)
            if restarted.is_set():
                after_restart.append(decision)
                if len(after_restart) >= 50:
                    return
            time.sleep(0.002)

    sender = threading.Thread(target=send_checks, daemon=True)
    sender.start()
    try:
        wait_until(lambda: stream_length(persistent_redis) >= 30, "records in the stream")
        persistent_redis.stop()
        wait_until(lambda: sample(decision_log, "extauthz_decision_log_spooled_records") >= 30, "records in the spool")
        persistent_redis.start()
        restarted.set()
        sender.join(timeout=WAIT_TIMEOUT)
        assert not sender.is_alive()
        assert decision_log.flush(timeout=WAIT_TIMEOUT)
    finally:
        restarted.set()
        decision_log.close()

    assert reasons == {"allowed"}
    assert sample(decision_log, "extauthz_decision_log_sink_errors_total") > 0
    lines = stream_lines(persistent_redis)
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    assert [line["decision_id"] for line in lines if line["type"] == "decision"] == decision_ids
    code, report = verify_redis(capsys, persistent_redis, tmp_path / "audit-jwks.json")
    assert code == 0
    assert report["writers"][0]["decisions"] == len(decision_ids)


def test_redis_frozen_mid_write(tmp_path, idp, persistent_redis, capsys, caplog):
    """A write that times out while Redis is frozen is still applied later: it must not be added twice."""
    config = redis_config(tmp_path, idp, persistent_redis)
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    try:
        decision_ids = [authorizer.check(check_request(path="/public/a", request_id=f"req-{index}")).decision_id
                        for index in range(3)]
        assert decision_log.flush(timeout=WAIT_TIMEOUT)
        persistent_redis.freeze()
        decision_ids += [authorizer.check(check_request(path="/public/a", request_id=f"req-frozen-{index}"))
                         .decision_id for index in range(5)]
        wait_until(lambda: sample(decision_log, "extauthz_decision_log_sink_errors_total") >= 1, "a sink timeout")
        persistent_redis.resume()
        with caplog.at_level(logging.INFO, logger="extauthz.sinks"):
            assert decision_log.flush(timeout=WAIT_TIMEOUT)
    finally:
        if persistent_redis.frozen:
            persistent_redis.resume()
        decision_log.close()

    lines = stream_lines(persistent_redis)
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    assert [line["decision_id"] for line in lines if line["type"] == "decision"] == decision_ids
    found = [record for record in caplog.records if record.getMessage().startswith(
        "the Redis stream already contains lines of a write that failed without a reply")]
    assert len(found) == 1
    assert found[0].lines >= 1
    code, _ = verify_redis(capsys, persistent_redis, tmp_path / "audit-jwks.json")
    assert code == 0


def test_redis_sink_unclear_first_write(tmp_path, idp, persistent_redis):
    """The very first write gets no reply, in a stream that already has many entries of other writers."""
    client = persistent_redis.client()
    for number in range(3000):
        client.xadd(STREAM, {"r": json.dumps({"other": number})})
    config = redis_config(tmp_path, idp, persistent_redis)
    sink = RedisStreamSink(config.decision_log)
    line = b'{"type":"checkpoint","seq":1}\n'
    try:
        sink.client.ping()
        persistent_redis.freeze()
        with pytest.raises(SinkError):
            sink.write([line])
        persistent_redis.resume()
        # Redis reads the XADD that was waiting in its socket once it runs again.
        wait_until(lambda: client.xlen(STREAM) == 3001, "the unanswered XADD to be applied")
        sink.write([line, b'{"type":"decision","seq":2}\n'])
    finally:
        if persistent_redis.frozen:
            persistent_redis.resume()
        sink.close()

    entries = [fields[b"r"] for _, fields in client.xrange(STREAM)]
    client.close()
    assert entries[3000:] == [b'{"type":"checkpoint","seq":1}', b'{"type":"decision","seq":2}']


@pytest.mark.parametrize("on_full", ["deny", "drop"])
def test_spool_full(tmp_path, idp, persistent_redis, capsys, caplog, on_full):
    config = redis_config(tmp_path, idp, persistent_redis, spool={"max_records": 5}, on_full=on_full)
    decision_log = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, decision_log)
    try:
        decision_log.flush()
        wait_until(lambda: stream_length(persistent_redis) == 1, "the start checkpoint in the stream")
        persistent_redis.stop()

        kept: list[str] = []
        refused = []
        for index in range(MAX_CHECKS):
            decision = authorizer.check(check_request(path="/public/a", request_id=f"req-{index}"))
            if sample(decision_log, "extauthz_decision_log_dropped_total", reason="spool_full") > len(refused):
                refused.append(decision)
                if len(refused) == 3:
                    break
            else:
                kept.append(decision.decision_id)
            time.sleep(0.005)

        assert len(refused) == 3
        expected = "audit_unavailable" if on_full == "deny" else "allowed"
        assert [decision.reason for decision in refused] == [expected] * 3
        assert sample(decision_log, "extauthz_decision_log_spooled_records") >= 5

        persistent_redis.start()
        assert decision_log.flush(timeout=WAIT_TIMEOUT)
        assert authorizer.check(check_request(path="/public/a", request_id="req-after")).reason == "allowed"
    finally:
        decision_log.close()

    decision_ids = [line["decision_id"] for line in stream_lines(persistent_redis) if line["type"] == "decision"]
    assert decision_ids[:-1] == kept
    assert not set(decision_ids) & {decision.decision_id for decision in refused}
    drops = [record for record in caplog.records if record.getMessage() == "decision records dropped"]
    assert drops
    assert drops[0].reason == "spool_full"
    assert drops[0].on_full == on_full
    code, _ = verify_redis(capsys, persistent_redis, tmp_path / "audit-jwks.json")
    assert code == 0


def test_file_spool_kept_at_shutdown(tmp_path, idp, persistent_redis, capsys, caplog):
    spool = tmp_path / "spool"
    config = redis_config(tmp_path, idp, persistent_redis, spool={"path": str(spool)})
    persistent_redis.stop()
    decision_log = DecisionLog(config.decision_log, shutdown_timeout=0.5)
    authorizer, _ = build_authorizer(config, decision_log)
    first_ids = [authorizer.check(check_request(path="/public/a", request_id=f"req-{index}")).decision_id
                 for index in range(10)]
    with caplog.at_level(logging.WARNING, logger="extauthz.decision_log"):
        decision_log.close()

    kept = [record for record in caplog.records if record.getMessage().startswith(
        "the decision log sink is still failing at shutdown; records stay in the spool folder")]
    assert len(kept) == 1
    assert kept[0].records == 12
    assert kept[0].spool == str(spool)
    spooled = [orjson.loads(line) for path in sorted(spool.glob("*.spool")) for line in path.read_bytes().splitlines()]
    assert len(spooled) == 12

    # The next process delivers the spool first, then writes its own chain.
    persistent_redis.start()
    restarted = DecisionLog(config.decision_log)
    authorizer, _ = build_authorizer(config, restarted)
    second_id = authorizer.check(check_request(path="/public/a", request_id="req-next")).decision_id
    restarted.close()

    lines = stream_lines(persistent_redis)
    assert lines[:12] == spooled
    assert [line["decision_id"] for line in lines if line["type"] == "decision"] == [*first_ids, second_id]
    assert {line["writer"] for line in lines[12:]} == {restarted.writer_id}
    assert list(spool.glob("*.spool")) == []
    code, report = verify_redis(capsys, persistent_redis, tmp_path / "audit-jwks.json")
    assert code == 0
    assert len(report["writers"]) == 2


def test_memory_spool_lost_at_shutdown(tmp_path, idp, redis_server_stopped, caplog):
    config = redis_config(tmp_path, idp, redis_server_stopped)
    decision_log = DecisionLog(config.decision_log, shutdown_timeout=0.2)
    authorizer, _ = build_authorizer(config, decision_log)
    for index in range(4):
        authorizer.check(check_request(path="/public/a", request_id=f"req-{index}"))
    decision_log.close()

    lost = [record for record in caplog.records if record.getMessage().startswith(
        "the decision log sink is still failing at shutdown; the records in the memory spool are lost")]
    assert len(lost) == 1
    assert lost[0].records == 6
    assert sample(decision_log, "extauthz_decision_log_dropped_total", reason="shutdown") == 6


@pytest.fixture
def redis_server_stopped(tmp_path):
    """A Redis address with nothing listening: a server started once on a free port, then killed."""
    server = RedisServer(tmp_path / "redis-stopped").start()
    server.stop()
    return server


def test_spool_folder_in_use(tmp_path, idp):
    config = audit_config(tmp_path, idp, {"spool": {"path": "spool"}})
    first = DecisionLog(config.decision_log, stream=io.BytesIO())
    try:
        with pytest.raises(ConfigError) as error:
            Service(config)
    finally:
        first.close()
    assert error.value.key == "decision_log.spool.path"
    assert "in use by another extauthz process" in error.value.message


def test_invalid_key_file_config_error(tmp_path, idp):
    config = audit_config(tmp_path, idp, {})
    (tmp_path / "audit-key.pem").write_text("not a key", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        Service(config)
    assert error.value.key == "decision_log.signing_key_file"
    assert error.value.fix == "write a key with `extauthz audit keygen FILE`"


def test_generated_key_warns(tmp_path, idp, caplog):
    config = load_config(write_config(tmp_path, idp))
    with caplog.at_level(logging.WARNING, logger="extauthz.decision_log"):
        decision_log = DecisionLog(config.decision_log, stream=io.BytesIO())
        decision_log.close()
    warnings = [record for record in caplog.records if "signing_key_file is not set" in record.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].kid == decision_log.signer.kid


# --- the file spool and real write failures -------------------------------------------------------------


def spool_lines(count: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"type": "decision", "n": number}).encode() + b"\n" for number in range(start, start + count)]


def test_file_spool_survives_reopen(tmp_path):
    spool = FileSpool(tmp_path / "spool")
    spool.append(spool_lines(10))
    assert spool.peek(3) == spool_lines(3)
    spool.pop(3)
    spool.close()

    reopened = FileSpool(tmp_path / "spool")
    try:
        assert len(reopened) == 7
        assert reopened.peek(100) == spool_lines(7, start=3)
        reopened.pop(7)
        assert len(reopened) == 0
        assert list((tmp_path / "spool").glob("*.spool")) == []
    finally:
        reopened.close()


def test_file_spool_cuts_partial_line(tmp_path, caplog):
    spool = FileSpool(tmp_path / "spool")
    spool.append(spool_lines(2))
    spool.close()
    segment = next((tmp_path / "spool").glob("*.spool"))
    with open(segment, "ab") as file:
        file.write(b'{"type":"decision","n":')

    reopened = FileSpool(tmp_path / "spool")
    try:
        assert len(reopened) == 2
        assert reopened.peek(10) == spool_lines(2)
    finally:
        reopened.close()
    cut = [record for record in caplog.records if record.getMessage() == "cut a partly written line from a spool file"]
    assert len(cut) == 1


# Run in a child process, because RLIMIT_FSIZE limits every file that the process writes.
FILE_LIMIT_SCRIPT = """
import json, resource, signal, sys, time, uuid
from pathlib import Path
from extauthz.audit_chain import generate_signer
from extauthz.config import DecisionLogConfig
from extauthz.decision import Decision
from extauthz.decision_log import DecisionLog
from extauthz.sinks import FileSink, FileSpool, RedisStreamSink, SinkError

folder = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))

config = DecisionLogConfig("file", path=folder / "decisions.log", spool_path=folder / "spool")
log = DecisionLog(config, signer=generate_signer())
ids = []
for _ in range(200):
    decision = Decision(decision_id=str(uuid.uuid4()), started_at=time.time())
    assert log.write(decision)
    ids.append(decision.decision_id)
flushed_at_limit = log.flush(timeout=2)
spooled_at_limit = log.metrics.registry.get_sample_value("extauthz_decision_log_spooled_records")
errors_at_limit = log.metrics.registry.get_sample_value("extauthz_decision_log_sink_errors_total")

resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
flushed = log.flush(timeout=30)
log.close()
print(json.dumps({"ids": ids, "flushed_at_limit": flushed_at_limit, "spooled_at_limit": spooled_at_limit,
                  "errors_at_limit": errors_at_limit, "flushed": flushed}))
"""


def test_file_sink_full_then_recovers(tmp_path):
    result = subprocess.run([sys.executable, "-c", FILE_LIMIT_SCRIPT, str(tmp_path)], capture_output=True,
                            timeout=WAIT_TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)

    assert summary["flushed_at_limit"] is False
    assert summary["spooled_at_limit"] > 0
    assert summary["errors_at_limit"] >= 1
    assert summary["flushed"] is True
    lines = file_lines(tmp_path / "decisions.log")
    assert [line["decision_id"] for line in lines if line["type"] == "decision"] == summary["ids"]
    assert [line["seq"] for line in lines] == list(range(1, 203))
    # The spool folder hit the same limit: what did not fit waited in memory, and all of it was delivered.
    assert b"cannot write the decision log spool folder; spooled lines wait in memory" in result.stderr
    assert list((tmp_path / "spool").glob("*.spool")) == []
