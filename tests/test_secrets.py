"""Named secrets: file and environment sources, validation, rotation on disk, and values kept out of logs."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import write_config

from extauthz.config import SecretConfig, load_config
from extauthz.errors import ConfigError
from extauthz.logs import JsonFormatter
from extauthz.secrets import MAX_SECRET_BYTES, Secrets, SecretUnavailable

# The watcher polls every second (extauthz.secrets.POLL_INTERVAL), so a change shows within about a second.
WATCH_TIMEOUT = 10.0


def fake_value(label: str = "key") -> str:
    """Return an obviously fake credential, unique to this call."""
    return f"fake-{label}-{uuid.uuid4().hex}"


def file_secret(name: str, path: Path) -> SecretConfig:
    return SecretConfig(name=name, file=path, env=None)


def env_secret(name: str, variable: str) -> SecretConfig:
    return SecretConfig(name=name, file=None, env=variable)


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n", encoding="utf-8")
    return path


def wait_until(condition: Callable[[], bool], timeout: float = WATCH_TIMEOUT) -> bool:
    """Poll `condition` every 0.1 s until it returns True or `timeout` seconds pass, and return its last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def kubernetes_volume(folder: Path, key: str, value: str) -> Path:
    """Lay out a mounted Secret as the kubelet does: `key -> ..data/key` and `..data -> ..v1`.

    Returns the path of the visible `key` entry.
    """
    folder.mkdir()
    version = folder / "..v1"
    version.mkdir()
    write_secret(version / key, value)
    (folder / "..data").symlink_to(version.name)
    (folder / key).symlink_to(Path("..data") / key)
    return folder / key


def rotate_volume(folder: Path, key: str, value: str, version: str) -> None:
    """Write a new version folder and swap `..data` to it in one rename, as the kubelet does on rotation."""
    target = folder / version
    target.mkdir()
    write_secret(target / key, value)
    staged = folder / "..data_tmp"
    staged.symlink_to(target.name)
    os.replace(staged, folder / "..data")


def formatted_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return every captured record as extauthz writes it to stderr, with the `extra=` fields."""
    formatter = JsonFormatter()
    return [formatter.format(record) for record in caplog.records]


@pytest.fixture
def watched() -> Iterator[list[Secrets]]:
    """A list for the Secrets whose watcher a test starts. Every watcher is stopped and joined afterwards."""
    started: list[Secrets] = []
    yield started
    for secrets in started:
        secrets.stop()
    for thread in threading.enumerate():
        if thread.name == "secret-watch":
            thread.join(timeout=5)


# --- sources ------------------------------------------------------------------------------------


def test_file_source_read(tmp_path):
    value = fake_value()
    secrets = Secrets([file_secret("partner", write_secret(tmp_path / "partner", value))])
    assert secrets.get("partner") == value


def test_env_source_read(monkeypatch):
    value = fake_value()
    monkeypatch.setenv("EXTAUTHZ_TEST_PARTNER_KEY", value)
    secrets = Secrets([env_secret("partner", "EXTAUTHZ_TEST_PARTNER_KEY")])
    assert secrets.get("partner") == value


@pytest.mark.parametrize(
    ("content", "expected"),
    [("abc", "abc"), ("abc\n", "abc"), ("abc\r\n", "abc"), (" abc \n", " abc "), ("a\tb\n", "a\tb")],
)
def test_one_newline_stripped(tmp_path, content, expected):
    path = tmp_path / "partner"
    path.write_bytes(content.encode())
    assert Secrets([file_secret("partner", path)]).get("partner") == expected


def test_names_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", fake_value())
    secrets = Secrets([file_secret("partner", write_secret(tmp_path / "partner", fake_value())),
                       env_secret("legacy", "EXTAUTHZ_TEST_LEGACY")])
    assert secrets.names == frozenset({"partner", "legacy"})


def test_unknown_name_unavailable(tmp_path):
    secrets = Secrets([file_secret("partner", write_secret(tmp_path / "partner", fake_value()))])
    with pytest.raises(SecretUnavailable, match="secret 'other' has no value"):
        secrets.get("other")


def test_missing_env_var(monkeypatch):
    monkeypatch.delenv("EXTAUTHZ_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as caught:
        Secrets([env_secret("legacy", "EXTAUTHZ_TEST_UNSET")], "config.yaml")
    assert caught.value.key == "secrets.legacy.env"
    assert caught.value.message == "environment variable EXTAUTHZ_TEST_UNSET is not set"
    assert caught.value.source == "config.yaml"


def test_missing_file(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as caught:
        Secrets([file_secret("partner", missing)], "config.yaml")
    assert caught.value.key == "secrets.partner.file"
    assert str(missing) in caught.value.message
    assert caught.value.fix == "mount the secret there, or fix the path"


@pytest.mark.parametrize("content", ["abc\n\n", "abc\r\n\r\n", "ab\ncd", "ab\rcd", "ab\0cd", "ab\x1bcd", "ab\x7fcd"])
def test_control_character_rejected(tmp_path, content):
    path = tmp_path / "partner"
    path.write_bytes(f"fake-{content}".encode())
    with pytest.raises(ConfigError) as caught:
        Secrets([file_secret("partner", path)])
    assert caught.value.key == "secrets.partner.file"
    assert caught.value.message == f"{path} contains a line break or another control character"


def test_env_control_character_rejected(monkeypatch):
    value = fake_value() + "\n"
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", value)
    with pytest.raises(ConfigError) as caught:
        Secrets([env_secret("legacy", "EXTAUTHZ_TEST_LEGACY")])
    assert caught.value.key == "secrets.legacy.env"
    assert caught.value.message == ("environment variable EXTAUTHZ_TEST_LEGACY contains a line break or another "
                                    "control character")
    assert value.strip() not in str(caught.value)


def test_oversized_file_rejected(tmp_path):
    path = tmp_path / "partner"
    path.write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(ConfigError) as caught:
        Secrets([file_secret("partner", path)])
    assert caught.value.key == "secrets.partner.file"
    assert caught.value.message == f"{path} is larger than {MAX_SECRET_BYTES} bytes"


def test_non_utf8_file_rejected(tmp_path):
    path = tmp_path / "partner"
    path.write_bytes(b"fake-\xff\xfe")
    with pytest.raises(ConfigError) as caught:
        Secrets([file_secret("partner", path)])
    assert caught.value.key == "secrets.partner.file"
    assert caught.value.message == f"cannot read {path}: UnicodeDecodeError"


# --- the `secrets:` section of the configuration -------------------------------------------------


def load_secrets(folder: Path, idp, section: Any):
    return load_config(write_config(folder, idp, overrides={"secrets": section})).secrets


def secrets_error(folder: Path, idp, section: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_secrets(folder, idp, section)
    return caught.value


def test_config_file_and_env(tmp_path, idp):
    write_secret(tmp_path / "partner.key", fake_value())
    loaded = load_secrets(tmp_path, idp, {"partner": {"file": "partner.key"}, "legacy": {"env": "LEGACY_KEY"}})
    assert {secret.name: secret for secret in loaded} == {
        "partner": SecretConfig("partner", tmp_path / "partner.key", None),
        "legacy": SecretConfig("legacy", None, "LEGACY_KEY"),
    }


def test_config_no_secrets(tmp_path, idp):
    assert load_config(write_config(tmp_path, idp)).secrets == ()


@pytest.mark.parametrize("name", ["-partner", ".partner", "has space", "a/b", "p" * 64, "key:1", "schlüssel"])
def test_invalid_name_rejected(tmp_path, idp, name):
    error = secrets_error(tmp_path, idp, {name: {"env": "PARTNER_KEY"}})
    assert error.key == f"secrets.{name}"
    assert error.message == "invalid secret name"


@pytest.mark.parametrize("name", ["p", "partner-api.key_2", "P" * 63])
def test_valid_name_accepted(tmp_path, idp, name):
    assert [secret.name for secret in load_secrets(tmp_path, idp, {name: {"env": "PARTNER_KEY"}})] == [name]


def test_both_sources_rejected(tmp_path, idp):
    write_secret(tmp_path / "partner.key", fake_value())
    error = secrets_error(tmp_path, idp, {"partner": {"file": "partner.key", "env": "PARTNER_KEY"}})
    assert error.key == "secrets.partner.file"
    assert error.message == "set exactly one of file and env"


@pytest.mark.parametrize("entry", [{}, None])
def test_neither_source_rejected(tmp_path, idp, entry):
    error = secrets_error(tmp_path, idp, {"partner": entry})
    assert error.key == "secrets.partner.file"
    assert error.message == "set exactly one of file and env"


def test_config_missing_file(tmp_path, idp):
    error = secrets_error(tmp_path, idp, {"partner": {"file": "missing.key"}})
    assert error.key == "secrets.partner.file"
    assert error.message == f"file not found: {tmp_path / 'missing.key'}"


@pytest.mark.parametrize("variable", ["1KEY", "PARTNER-KEY", "", 7])
def test_invalid_env_name(tmp_path, idp, variable):
    error = secrets_error(tmp_path, idp, {"partner": {"env": variable}})
    assert error.key == "secrets.partner.env"


def test_unknown_secret_key(tmp_path, idp):
    error = secrets_error(tmp_path, idp, {"partner": {"env": "PARTNER_KEY", "fiel": "partner.key"}})
    assert error.key == "secrets.partner.fiel"
    assert error.fix == "did you mean 'secrets.partner.file'?"


def test_section_not_mapping(tmp_path, idp):
    error = secrets_error(tmp_path, idp, ["partner"])
    assert error.key == "secrets"


# --- rotation -----------------------------------------------------------------------------------


def test_refresh_rewritten_file(tmp_path):
    path = write_secret(tmp_path / "partner", fake_value("old"))
    secrets = Secrets([file_secret("partner", path)])
    # A longer value, so that the change shows even where a file's mtime has a coarse resolution.
    rotated = fake_value("rotated-value")
    write_secret(path, rotated)

    secrets.refresh()

    assert secrets.get("partner") == rotated


def test_refresh_unchanged_file(tmp_path, caplog):
    value = fake_value()
    secrets = Secrets([file_secret("partner", write_secret(tmp_path / "partner", value))])
    with caplog.at_level(logging.DEBUG, logger="extauthz.secrets"):
        secrets.refresh()
    assert secrets.get("partner") == value
    assert caplog.records == []


def test_refresh_symlink_swap(tmp_path):
    key = kubernetes_volume(tmp_path / "mount", "api-key", fake_value("v1"))
    secrets = Secrets([file_secret("partner", key)])
    rotated = fake_value("v2")
    rotate_volume(tmp_path / "mount", "api-key", rotated, "..v2")

    secrets.refresh()

    assert secrets.get("partner") == rotated


def test_refresh_logs_reload(tmp_path, caplog):
    path = write_secret(tmp_path / "partner", fake_value("old"))
    secrets = Secrets([file_secret("partner", path)])
    write_secret(path, fake_value("rotated-value"))

    with caplog.at_level(logging.INFO, logger="extauthz.secrets"):
        secrets.refresh()

    reloads = [record for record in caplog.records if record.getMessage() == "secret reloaded"]
    assert [record.secret for record in reloads] == ["partner"]


def test_watcher_picks_up_rewrite(tmp_path, watched):
    path = write_secret(tmp_path / "partner", fake_value("old"))
    secrets = Secrets([file_secret("partner", path)])
    watched.append(secrets)
    secrets.start()
    rotated = fake_value("rotated-value")
    write_secret(path, rotated)

    assert wait_until(lambda: secrets.get("partner") == rotated)


def test_watcher_picks_up_swap(tmp_path, watched):
    key = kubernetes_volume(tmp_path / "mount", "api-key", fake_value("v1"))
    secrets = Secrets([file_secret("partner", key)])
    watched.append(secrets)
    secrets.start()
    rotated = fake_value("v2")
    rotate_volume(tmp_path / "mount", "api-key", rotated, "..v2")

    assert wait_until(lambda: secrets.get("partner") == rotated)


def watcher_count() -> int:
    return sum(thread.name == "secret-watch" for thread in threading.enumerate())


def test_watcher_started_for_file(tmp_path, watched):
    secrets = Secrets([file_secret("partner", write_secret(tmp_path / "partner", fake_value()))])
    watched.append(secrets)
    before = watcher_count()
    secrets.start()
    assert watcher_count() == before + 1


def test_watcher_not_started_for_env(monkeypatch, watched):
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", fake_value())
    secrets = Secrets([env_secret("legacy", "EXTAUTHZ_TEST_LEGACY")])
    watched.append(secrets)
    before = watcher_count()
    secrets.start()
    assert watcher_count() == before


def test_env_read_once(monkeypatch):
    original = fake_value("original")
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", original)
    secrets = Secrets([env_secret("legacy", "EXTAUTHZ_TEST_LEGACY")])
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", fake_value("changed"))

    secrets.refresh()

    assert secrets.get("legacy") == original


# --- a file that cannot be read -----------------------------------------------------------------


def delete_file(path: Path) -> None:
    path.unlink()


def write_invalid_utf8(path: Path) -> None:
    path.write_bytes(b"fake-\xff\xfe-value")


def write_oversized(path: Path) -> None:
    path.write_bytes(b"x" * (MAX_SECRET_BYTES + 1))


def write_line_break(path: Path) -> None:
    path.write_text(fake_value("first-line") + "\n" + fake_value("second-line") + "\n", encoding="utf-8")


def break_symlink(path: Path) -> None:
    """Point `..data` at a version folder that does not exist, as a half-finished rotation might."""
    staged = path.parent / "..data_tmp"
    staged.symlink_to("..missing")
    os.replace(staged, path.parent / "..data")


BREAKAGES = [delete_file, write_invalid_utf8, write_oversized, write_line_break]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda breakage: breakage.__name__)
def test_unreadable_keeps_value(tmp_path, breakage):
    value = fake_value()
    path = write_secret(tmp_path / "partner", value)
    secrets = Secrets([file_secret("partner", path)])
    breakage(path)

    secrets.refresh()

    assert secrets.get("partner") == value
    assert secrets.reload_errors == 1


def test_broken_symlink_keeps_value(tmp_path):
    value = fake_value()
    key = kubernetes_volume(tmp_path / "mount", "api-key", value)
    secrets = Secrets([file_secret("partner", key)])
    break_symlink(key)

    secrets.refresh()

    assert secrets.get("partner") == value
    assert secrets.reload_errors == 1


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda breakage: breakage.__name__)
def test_unreadable_logged_once(tmp_path, caplog, breakage):
    path = write_secret(tmp_path / "partner", fake_value())
    secrets = Secrets([file_secret("partner", path)])
    breakage(path)

    with caplog.at_level(logging.DEBUG, logger="extauthz.secrets"):
        for _ in range(3):
            secrets.refresh()

    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == "secret file unreadable; keeping its last value"
    assert errors[0].secret == "partner"
    assert secrets.reload_errors == 3


def test_recovers_after_unreadable(tmp_path):
    path = write_secret(tmp_path / "partner", fake_value("old"))
    secrets = Secrets([file_secret("partner", path)])
    path.unlink()
    secrets.refresh()
    restored = fake_value("restored")
    write_secret(path, restored)

    secrets.refresh()

    assert secrets.get("partner") == restored


# --- values never shown -------------------------------------------------------------------------


def test_repr_names_only(tmp_path, monkeypatch):
    file_value, env_value = fake_value("file"), fake_value("env")
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", env_value)
    secrets = Secrets([file_secret("partner", write_secret(tmp_path / "partner", file_value)),
                       env_secret("legacy", "EXTAUTHZ_TEST_LEGACY")])

    text = repr(secrets)

    assert text == "Secrets(names=['legacy', 'partner'])"
    assert file_value not in text
    assert env_value not in text
    assert str(secrets) == text


def test_logs_hold_no_value(tmp_path, monkeypatch, caplog, watched):
    """Load, rotate (rewrite and symlink swap), break and restore files with every logger at DEBUG."""
    values = [fake_value(f"value-{index}") for index in range(6)]
    monkeypatch.setenv("EXTAUTHZ_TEST_LEGACY", values[0])
    plain = write_secret(tmp_path / "partner", values[1])
    mounted = kubernetes_volume(tmp_path / "mount", "api-key", values[2])

    with caplog.at_level(logging.DEBUG):
        secrets = Secrets([env_secret("legacy", "EXTAUTHZ_TEST_LEGACY"), file_secret("partner", plain),
                           file_secret("mounted", mounted)])
        watched.append(secrets)
        secrets.start()
        write_secret(plain, values[3])
        rotate_volume(tmp_path / "mount", "api-key", values[4], "..v2")
        assert wait_until(lambda: secrets.get("partner") == values[3])
        assert wait_until(lambda: secrets.get("mounted") == values[4])
        write_invalid_utf8(plain)
        break_symlink(mounted)
        secrets.refresh()
        write_secret(plain, values[5])
        secrets.refresh()
        with pytest.raises(SecretUnavailable) as caught:
            secrets.get("other")

    lines = formatted_logs(caplog)
    assert any('"secret":"partner"' in line for line in lines), "the rotation was not logged"
    for value in values:
        assert all(value not in line for line in lines), "a secret value in a log record"
        assert value not in str(caught.value)


@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_empty_secret_rejected(tmp_path, content):
    path = tmp_path / "key"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        Secrets([SecretConfig(name="partner", file=path, env=None)])
    assert excinfo.value.key == "secrets.partner.file"
