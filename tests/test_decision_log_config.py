"""The `decision_log` configuration keys of the writer: sinks, rotation, spool, on_full and checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import write_config

from extauthz.config import load_config
from extauthz.errors import ConfigError


def load_decision_log(tmp_path, idp, decision_log: dict[str, Any], store: dict[str, Any] | None = None):
    overrides: dict[str, Any] = {"decision_log": decision_log}
    if store is not None:
        overrides["store"] = store
    return load_config(write_config(tmp_path, idp, overrides=overrides))


def decision_log_error(tmp_path, idp, decision_log: dict[str, Any], store: dict[str, Any] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_decision_log(tmp_path, idp, decision_log, store)
    return caught.value


def test_defaults(tmp_path, idp):
    config = load_decision_log(tmp_path, idp, {}).decision_log
    assert config.sink == "stdout"
    assert config.file_max_bytes == 100 * 1024 * 1024
    assert config.file_backups == 10
    assert config.redis_stream == "extauthz:decisions"
    assert config.redis_maxlen == 1_000_000
    assert config.spool_path is None
    assert config.spool_max_records == 100_000
    assert config.on_full == "deny"
    assert config.max_wait_ms == 50
    assert config.checkpoint_interval == 60
    assert config.signing_key_file is None
    assert config.store is None


def test_all_keys_read(tmp_path, idp):
    (tmp_path / "audit.pem").write_text("checked when the decision log starts", encoding="utf-8")
    config = load_decision_log(tmp_path, idp, {
        "sink": "redis",
        "file": {"max_bytes": 8192, "backups": 3},
        "redis": {"stream": "audit:decisions", "maxlen": 5000},
        "spool": {"path": "spool", "max_records": 20},
        "on_full": "drop",
        "max_wait_ms": 5,
        "checkpoint_interval": "5m",
        "signing_key_file": "audit.pem",
    }, store={"url": "redis://127.0.0.1:1/0"})
    decision_log = config.decision_log
    assert decision_log.sink == "redis"
    assert decision_log.file_max_bytes == 8192
    assert decision_log.file_backups == 3
    assert decision_log.redis_stream == "audit:decisions"
    assert decision_log.redis_maxlen == 5000
    assert decision_log.spool_path == tmp_path.resolve() / "spool"
    assert decision_log.spool_max_records == 20
    assert decision_log.on_full == "drop"
    assert decision_log.max_wait_ms == 5
    assert decision_log.checkpoint_interval == 300
    assert decision_log.signing_key_file == tmp_path.resolve() / "audit.pem"
    assert decision_log.store == config.store


def test_redis_sink_needs_redis_store(tmp_path, idp):
    error = decision_log_error(tmp_path, idp, {"sink": "redis"})
    assert error.key == "decision_log.sink"
    assert "memory://" in error.message
    assert error.fix.startswith("set store.url to redis://")


@pytest.mark.parametrize(
    ("decision_log", "key", "message"),
    [
        ({"on_full": "block"}, "decision_log.on_full", "invalid value 'block'"),
        ({"max_wait_ms": "50ms"}, "decision_log.max_wait_ms", "expected an integer from 0 to 1000, got '50ms'"),
        ({"max_wait_ms": 5000}, "decision_log.max_wait_ms", "expected an integer from 0 to 1000, got 5000"),
        ({"checkpoint_interval": 0}, "decision_log.checkpoint_interval", "expected 1 to 86400 seconds, got 0"),
        ({"checkpoint_interval": "soon"}, "decision_log.checkpoint_interval", "invalid duration 'soon'"),
        ({"checkpoint_interval": True}, "decision_log.checkpoint_interval", "expected a number of seconds"),
        ({"file": {"max_bytes": "100MiB"}}, "decision_log.file.max_bytes", "got '100MiB'"),
        ({"file": {"backups": 0}}, "decision_log.file.backups", "expected an integer from 1 to 1000, got 0"),
        ({"redis": {"maxlen": 10}}, "decision_log.redis.maxlen", "got 10"),
        ({"redis": {"stream": ""}}, "decision_log.redis.stream", "expected a non-empty string"),
        ({"spool": {"max_records": 0}}, "decision_log.spool.max_records", "got 0"),
        ({"spool": {"path": "missing/spool"}}, "decision_log.spool.path", "folder not found"),
        ({"spool": {"path": "config.yaml"}}, "decision_log.spool.path", "not a folder"),
        ({"signing_key_file": "absent.pem"}, "decision_log.signing_key_file", "file not found"),
        ({"spool": {"max_record": 5}}, "decision_log.spool.max_record", "unknown key"),
        ({"sink": "kafka"}, "decision_log.sink", "invalid sink 'kafka'"),
    ],
)
def test_invalid_value_rejected(tmp_path, idp, decision_log, key, message):
    error = decision_log_error(tmp_path, idp, decision_log)
    assert error.key == key
    assert message in error.message


def test_max_bytes_error_names_unit(tmp_path, idp):
    error = decision_log_error(tmp_path, idp, {"file": {"max_bytes": "100MiB"}})
    assert error.fix == "write the size in bytes, such as 104857600 for 100 MiB"


def test_misspelt_key_suggested(tmp_path, idp):
    error = decision_log_error(tmp_path, idp, {"spool": {"max_record": 5}})
    assert error.fix == "did you mean 'decision_log.spool.max_records'?"


def test_signing_key_hint(tmp_path, idp):
    error = decision_log_error(tmp_path, idp, {"signing_key_file": "absent.pem"})
    assert "extauthz audit keygen FILE" in error.fix


def test_sink_error_names_redis(tmp_path, idp):
    error = decision_log_error(tmp_path, idp, {"sink": "kafka"})
    assert error.fix == "use stdout, file:PATH or redis"
