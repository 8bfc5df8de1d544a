"""Real redis-server processes for tests, on free loopback ports, with stop, freeze and restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from helpers import free_port

START_TIMEOUT = 10.0


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run does it)")
    return binary


class RedisServer:
    """One redis-server on 127.0.0.1 that keeps nothing on disk, unless `persist` is set.

    With `persist`, every write goes to an append-only file in `folder` before Redis replies
    (appendfsync always), so a killed and restarted server still has every acknowledged write.
    """

    def __init__(self, folder: Path, port: int | None = None, extra: list[str] | None = None,
                 password: str | None = None, persist: bool = False):
        self.folder = folder
        self.password = password
        self.persist = persist
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        append_only = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        command = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   *append_only, "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"),
                   *(["--requirepass", self.password] if self.password else []), *self.extra]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Wait until this server replies to PING. Fail at once if it exited, as when another took the port."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             password=self.password)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited with code {self.process.returncode}; "
                                       f"see {self.folder / 'redis.log'}")
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2,
                           password=self.password)

    def stop(self) -> None:
        """Kill the server; its data is gone unless `persist` is set."""
        if self.process is not None and self.process.poll() is None:
            if self.frozen:
                self.resume()
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    frozen = False

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open but no reply comes."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()
