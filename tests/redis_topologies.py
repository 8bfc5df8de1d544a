"""Real Redis Sentinel and Redis Cluster deployments for tests, on free loopback ports.

Every process is a redis-server started here (a sentinel is `redis-server sentinel.conf --sentinel`)
and stopped with SIGKILL by `stop()`. Nothing is kept on disk beyond the test's folder.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis_servers import RedisServer, redis_binary

READY_TIMEOUT = 10.0
# Ports that tests never listen on: the local demo's and the Redis that may run on this machine.
RESERVED_PORTS = frozenset({6379, 9191, 9192, 9193, 9901, 10000})
# Redis Cluster's node-to-node bus listens on the client port + 10000 (Redis 7.0 `cluster-port` default).
CLUSTER_BUS_OFFSET = 10000


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, with_cluster_bus: bool = False) -> list[int]:
    """Return `count` distinct free loopback ports, none reserved.

    With `with_cluster_bus`, each port's cluster bus port (port + 10000) is free and unreserved too.
    """
    ports: list[int] = []
    for _ in range(count * 20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port in RESERVED_PORTS or port in ports:
            continue
        if with_cluster_bus:
            bus_port = port + CLUSTER_BUS_OFFSET
            if bus_port > 65535 or bus_port in RESERVED_PORTS or not _port_is_free(bus_port):
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"found only {len(ports)} of {count} free loopback ports after {count * 20} attempts")


def wait_until(condition: Callable[[], object], timeout: float, message: str, *,
               errors: tuple[type[Exception], ...] = (redis.RedisError,), interval: float = 0.05) -> None:
    """Call `condition` until it returns true; raise TimeoutError with `message` after `timeout` seconds.

    An exception of a type in `errors` counts as false, because servers refuse connections while
    they start or fail over.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except errors:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} (waited {timeout:g}s)")
        time.sleep(interval)


def replication_info(server: RedisServer) -> dict:
    client = server.client()
    try:
        return client.info("replication")
    finally:
        client.close()


def start_replica(folder: Path, master: RedisServer) -> RedisServer:
    """Start a replica of `master` and wait until its initial sync has finished."""
    replica = RedisServer(folder, extra=["--replicaof", "127.0.0.1", str(master.port)]).start()
    try:
        wait_until(lambda: replication_info(replica).get("master_link_status") == "up", READY_TIMEOUT,
                   f"replica on port {replica.port} did not sync with the master on port {master.port}")
    except BaseException:
        replica.stop()
        raise
    return replica


class SentinelProcess:
    """One Redis Sentinel on 127.0.0.1 that monitors one master with quorum 1.

    `down_after_ms` is how long the master must fail to reply before the sentinel considers it down,
    and `failover_timeout_ms` is Sentinel's `failover-timeout` for that master.
    """

    def __init__(self, folder: Path, master: RedisServer, *, service: str = "mymaster",
                 down_after_ms: int = 500, failover_timeout_ms: int = 3000):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.service = service
        self.port = free_ports(1)[0]
        self.config_path = folder / "sentinel.conf"
        # Sentinel rewrites this file at run time (discovered replicas, the current epoch).
        self.config_path.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {folder}\n"
            f"logfile {folder / 'sentinel.log'}\n"
            f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n",
            encoding="utf-8")
        self.process: subprocess.Popen | None = None

    def url(self, database: int = 0) -> str:
        """Return the store URL that reaches the monitored master through this sentinel."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/{database}"

    def start(self) -> SentinelProcess:
        self.process = subprocess.Popen([redis_binary(), str(self.config_path), "--sentinel"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.client().ping(), READY_TIMEOUT,
                       f"sentinel on port {self.port} did not answer PING; see {self.folder / 'sentinel.log'}")
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1,
                           decode_responses=True)

    def master_port(self) -> int:
        """Return the port of the master that this sentinel currently reports for its service."""
        client = self.client()
        try:
            _host, port = client.sentinel_get_master_addr_by_name(self.service)
        finally:
            client.close()
        return int(port)

    def replica_count(self) -> int:
        """Return how many replicas of the service this sentinel has discovered and does not consider down."""
        client = self.client()
        try:
            replicas = client.sentinel_slaves(self.service)
        finally:
            client.close()
        return sum(1 for replica in replicas if replica.get("is_sdown") is False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class RedisClusterNodes:
    """A Redis Cluster of `size` masters without replicas, created with `redis-cli --cluster create`."""

    def __init__(self, folder: Path, size: int = 3):
        self.folder = folder
        self.nodes = [
            RedisServer(folder / f"node-{index}", port=port,
                        extra=["--cluster-enabled", "yes",
                               "--cluster-config-file", str(folder / f"node-{index}" / "nodes.conf")])
            for index, port in enumerate(free_ports(size, with_cluster_bus=True))
        ]

    @property
    def url(self) -> str:
        """Return a store URL naming the first node; the client discovers the others from it."""
        return self.nodes[0].url

    def start(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            self._create()
            for node in self.nodes:
                wait_until(lambda node=node: self._state(node) == "ok", READY_TIMEOUT,
                           f"cluster node on port {node.port} did not reach cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        redis_cli = Path(redis_binary()).with_name("redis-cli")
        command = [str(redis_cli), "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                   "--cluster-replicas", "0", "--cluster-yes"]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed with exit code {result.returncode}:\n"
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")

    @staticmethod
    def _state(node: RedisServer) -> str | None:
        client = node.client()
        try:
            return client.cluster("info").get("cluster_state")
        finally:
            client.close()

    def keys_per_node(self, pattern: str) -> list[int]:
        """Return how many keys matching `pattern` each node stores, in node order."""
        counts = []
        for node in self.nodes:
            client = node.client()
            try:
                counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
            finally:
                client.close()
        return counts

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
