"""Named third-party credentials that only extauthz reads, injected into the requests that need them.

Sources, from the `secrets:` section of the configuration:

    payments-api-key: {file: /var/run/secrets/payments/key}   # a mounted Kubernetes Secret
    legacy-password: {env: LEGACY_PASSWORD}                   # extauthz's own environment

A file is read at start-up and again whenever it changes. A background thread compares its resolved
path, inode, size and modification time every second, so the symlink swap that Kubernetes makes
when a mounted Secret is rotated counts as a change. One trailing newline is removed. A file that
cannot be read keeps its last value, and the error is logged. An environment variable is read once.

An empty value is rejected, and so is a value with a line break or another control character other
than HTAB, because Envoy would reject every request that carries it with status 503. At start-up
that is a ConfigError, and after a change the last value stays, as for an unreadable file.

Values live only in this process's memory. They are never logged or put into a decision record, an
error message or a metric label: those name the secret, never its value.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from extauthz.config import SecretConfig
from extauthz.errors import ConfigError

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
MAX_SECRET_BYTES = 64 * 1024
# Control characters other than HTAB, invalid in a header value (RFC 9110, section 5.5). Envoy rejects an
# injected header value that contains one, and returns 503 to the caller.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class SecretUnavailable(Exception):
    """A secret that has no value: its file never loaded. The message names it, never a value."""


class InvalidSecretValue(ValueError):
    """A value that cannot go into a header. The message describes the problem, never the value."""


def _check_value(text: str) -> str:
    if not text:
        # An empty credential is never meant; it also shows a file read mid-rewrite.
        raise InvalidSecretValue("is empty")
    if _CONTROL_CHARACTERS.search(text):
        raise InvalidSecretValue("contains a line break or another control character")
    return text


def _file_state(path: Path) -> tuple[str, int, int, int]:
    real = os.path.realpath(path)
    stat = os.stat(real)
    return real, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_file(path: Path) -> str:
    data = path.read_bytes()
    if len(data) > MAX_SECRET_BYTES:
        raise InvalidSecretValue(f"is larger than {MAX_SECRET_BYTES} bytes")
    text = data.decode("utf-8")
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return _check_value(text)


class Secrets:
    def __init__(self, configs: Iterable[SecretConfig], source: str = "config"):
        self.configs = {config.name: config for config in configs}
        self._values: dict[str, str] = {}
        self._states: dict[str, tuple[str, int, int, int] | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload_errors = 0

        for config in self.configs.values():
            if config.env is not None:
                value = os.environ.get(config.env)
                if value is None:
                    raise ConfigError(source, f"secrets.{config.name}.env",
                                      f"environment variable {config.env} is not set",
                                      "set it in extauthz's environment, or use a file source")
                try:
                    self._values[config.name] = _check_value(value)
                except InvalidSecretValue as exc:
                    raise ConfigError(source, f"secrets.{config.name}.env",
                                      f"environment variable {config.env} {exc}",
                                      "remove the character, such as a newline at the end of a value copied "
                                      "from a file") from None
                continue
            assert config.file is not None
            try:
                self._states[config.name] = _file_state(config.file)
                self._values[config.name] = _read_file(config.file)
            except InvalidSecretValue as exc:
                raise ConfigError(source, f"secrets.{config.name}.file", f"{config.file} {exc}",
                                  "write only the value, because extauthz removes just one trailing newline") from exc
            except (OSError, ValueError) as exc:
                raise ConfigError(source, f"secrets.{config.name}.file", f"cannot read {config.file}: "
                                  f"{type(exc).__name__}", "mount the secret there, or fix the path") from exc

    def __repr__(self) -> str:
        return f"Secrets(names={sorted(self.configs)})"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.configs)

    def get(self, name: str) -> str:
        try:
            return self._values[name]
        except KeyError:
            raise SecretUnavailable(f"secret {name!r} has no value") from None

    def start(self) -> None:
        if self._thread is not None or not any(config.file for config in self.configs.values()):
            return
        self._thread = threading.Thread(target=self._watch, name="secret-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            self.refresh()

    def refresh(self) -> None:
        """Re-read every file source whose content may have changed."""
        for config in self.configs.values():
            if config.file is None:
                continue
            try:
                state = _file_state(config.file)
                if state == self._states.get(config.name):
                    continue
                self._values[config.name] = _read_file(config.file)
                self._states[config.name] = state
                log.info("secret reloaded", extra={"secret": config.name})
            except (OSError, ValueError) as exc:
                self.reload_errors += 1
                if self._states.get(config.name) is not None:
                    log.error("secret file unreadable; keeping its last value",
                              extra={"secret": config.name, "error": type(exc).__name__})
                self._states[config.name] = None
