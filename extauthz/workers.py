"""Worker processes on one host: `extauthz serve --workers N` (or `server.workers: N`).

One Python process uses about one CPU for Checks, because of the GIL. With N workers, the process
that `serve` starts becomes a supervisor that serves no Check itself:

- It starts each worker as a fresh `python -m extauthz serve ... --worker-index I` process. A fresh
  interpreter inherits no grpcio state, which grpcio does not support across fork. This module never
  imports grpcio, so the supervisor never initialises it.
- Worker I listens on the shared `listen.grpc` port (SO_REUSEPORT: the kernel spreads connections, not
  Checks, over the workers) and on its own port, `listen.worker_grpc` + I. `extauthz envoy-config` lists
  the workers' own ports in a round-robin cluster, which spreads Checks evenly.
- It serves `listen.http` itself: the JWKS is the union of every worker's JWKS, /metrics is every
  worker's metrics with a `worker` label plus the supervisor's own, and /readyz is 200 only while every
  worker is ready. Each worker's own side listener is on an ephemeral loopback port. The JWKS keeps
  the keys of a worker that exited for `token.ttl` + 60 s, so its last tokens still verify. The audit
  JWKS contains the decision log checkpoint key of every worker started since the supervisor started,
  as each worker reported it when it began to listen.
- With `decision_log.sink: stdout`, each worker writes its decision log to a pipe, and the supervisor
  copies whole lines from every pipe to its own stdout (LineRelay).
- It forwards SIGHUP to every worker. SIGTERM and SIGINT go to every worker as SIGTERM, and the
  supervisor waits for them to drain.
- A worker that exits while the service runs is logged and started again after RESTART_DELAY. If
  workers exit more than MAX_EXITS times within EXIT_WINDOW seconds, or a worker exits at start-up,
  the supervisor stops every worker and exits with status 1 (2 for a configuration error), so that the
  orchestrator can restart the whole service.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from extauthz.config import Config
from extauthz.errors import ConfigError
from extauthz.http_listener import JWKS_PATH, SideApp, SideListener
from extauthz.keys import CLOCK_SKEW

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
# Seconds the main loop waits for a worker's status message or a signal before it looks again.
POLL_INTERVAL = 0.2
# Seconds between two readiness polls of every worker.
READINESS_INTERVAL = 0.5
# Seconds one request of the supervisor to a worker's side listener may take.
WORKER_HTTP_TIMEOUT = 2.0
# Seconds between two reads of each worker's public keys, so that a key rotation reaches the supervisor.
KEYS_REFRESH_INTERVAL = 60.0
# Seconds a worker may take from its start to listening, including loading keys and policies.
START_TIMEOUT = 60.0
# Seconds between a worker's exit and its restart.
RESTART_DELAY = 1.0
# More worker exits than MAX_EXITS within EXIT_WINDOW seconds stop the whole service.
MAX_EXITS = 5
EXIT_WINDOW = 60.0
# Seconds a worker may take beyond shutdown_delay + drain_timeout to exit after SIGTERM.
STOP_MARGIN = 5.0
PR_SET_PDEATHSIG = 1
# Bytes the supervisor reads from a worker's stdout pipe at once.
RELAY_CHUNK = 65536


def worker_cpu(worker: int) -> int:
    """Return the CPU for worker `worker`: CPU i mod n among the n CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[worker % len(cpus)]


def prepare_worker(worker: int, cpu_affinity: bool, supervisor_pid: int) -> None:
    """Set up a worker process before it builds its service: exit with the supervisor, and pin its CPU.

    Raises SystemExit when the supervisor is already gone.
    """
    # The kernel sends SIGTERM to this worker when the supervisor dies, even by SIGKILL (Linux only).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot ask the kernel to stop this worker with its supervisor", extra={"worker": worker})
    if os.getppid() != supervisor_pid:
        log.error("the supervisor exited before this worker started; exiting",
                  extra={"worker": worker, "supervisor_pid": supervisor_pid})
        raise SystemExit(1)
    if cpu_affinity:
        cpu = worker_cpu(worker)
        os.sched_setaffinity(0, {cpu})
        log.info("worker pinned to a CPU", extra={"worker": worker, "cpu": cpu})


def report_listening(status_fd: int, http_port: int, audit_jwks: bytes) -> None:
    """Tell the supervisor, through the pipe it passed, that this worker listens and where its side listener is.

    The message also carries the public key that signs this worker's decision log checkpoints, so the
    supervisor keeps it even if this worker dies before anyone fetches the audit JWKS.
    """
    audit_keys = json.loads(audit_jwks)["keys"]
    message = json.dumps({"event": "listening", "http_port": http_port, "audit_keys": audit_keys}).encode() + b"\n"
    try:
        os.write(status_fd, message)
    finally:
        os.close(status_fd)


def check_ports_free(config: Config) -> None:
    """Raise ConfigError when another process listens on the shared gRPC port or a worker's own port.

    The workers bind with SO_REUSEPORT, which would silently share a port with another process that
    also sets it, such as a second supervisor. A plain bind here fails on any held port.
    """
    addresses = [("listen.grpc", config.listen.grpc)]
    addresses += [("listen.worker_grpc", config.listen.worker_address(index))
                  for index in range(config.server.workers)]
    for key, address in addresses:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                raise ConfigError(str(config.source), key, f"cannot listen on {address}: {exc.strerror}",
                                  "stop whatever uses that port or choose another") from exc


def _worker_get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WORKER_HTTP_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class LineRelay:
    """A copier of the lines that workers write to their stdout pipes onto the supervisor's stdout, whole.

    Workers sharing one stdout pipe would mix their lines once the pipe is full, because the kernel
    keeps only writes of at most PIPE_BUF (4096) bytes in one piece. The relay writes whole lines,
    one batch at a time. When the supervisor's stdout fails, the relay closes every worker's pipe, so
    each worker's decision log gets EPIPE and keeps its lines in its spool.
    """

    def __init__(self, output_fd: int):
        self.output_fd = output_fd
        self._lock = threading.Lock()
        self._failed = False

    def open(self, worker: int) -> tuple[int, threading.Thread]:
        """Return the write end of a new pipe for worker `worker`'s stdout, and the thread that copies it."""
        reader, writer = os.pipe()
        thread = threading.Thread(target=self._copy, args=(reader, worker), name=f"stdout-relay-{worker}",
                                  daemon=True)
        thread.start()
        return writer, thread

    def _copy(self, reader: int, worker: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(reader, RELAY_CHUNK)
                if not chunk:
                    break
                pending += chunk
                end = pending.rfind(b"\n") + 1
                if end:
                    if not self._write(pending[:end], worker):
                        return
                    pending = pending[end:]
            if pending:
                # The worker exited within a line: end the fragment, so that it cannot run into the next line.
                self._write(pending + b"\n", worker)
        finally:
            os.close(reader)

    def _write(self, data: bytes, worker: int) -> bool:
        """Write `data` to the output in full; return False once the output has failed."""
        with self._lock:
            if self._failed:
                return False
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.output_fd, view):]
            except OSError as exc:
                self._failed = True
                # NOTE: the lines read from the pipes but not yet written are lost with the output.
                log.error("cannot write the workers' decision log lines to standard output; each worker keeps "
                          "its lines in its spool from now on", extra={"worker": worker, "error": str(exc)})
                return False
        return True


@dataclass
class Worker:
    """The supervisor's record of one worker process."""

    index: int
    process: subprocess.Popen | None = None
    # Read end of the pipe on which the worker reports that it listens; None once it did.
    status_reader: int | None = None
    started_at: float = 0.0
    http_port: int | None = None
    ready: bool = False
    store: str = "ok"
    restart_at: float | None = None
    status_buffer: bytes = field(default=b"", repr=False)
    # The public keys the worker served last, and when they were read (time.monotonic()).
    keys: list[dict] = field(default_factory=list)
    keys_read_at: float = 0.0
    # The thread that copies the worker's stdout to the supervisor's, with the stdout sink.
    relay: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class WorkerMetrics:
    """A Prometheus collector: every worker's metrics, each sample labelled with its worker index."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        up = Metric("extauthz_worker_up", "1 when the worker's metrics could be read, else 0.", "gauge")
        for worker in self.supervisor.workers:
            text = self.supervisor.worker_text(worker, "/metrics")
            up.add_sample("extauthz_worker_up", {"worker": str(worker.index)}, 0.0 if text is None else 1.0)
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": str(worker.index)}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield up
        yield from families.values()


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one `extauthz serve`."""

    def __init__(self, config: Config, worker_argv: list[str]):
        """`worker_argv` is the command line of a worker without its --worker-* options."""
        self.config = config
        self.worker_argv = worker_argv
        self.workers = [Worker(index) for index in range(config.server.workers)]
        self.draining = False
        self._exits: list[float] = []
        self._received: list[int] = []
        self._stopping = threading.Event()
        # Public keys of exited workers, each with the wall-clock time until which it is served.
        self._exited_keys: list[tuple[dict, float]] = []
        self._keys_lock = threading.Lock()
        # Every worker's decision log checkpoint keys since start, by kid, as each worker reported them when
        # it started listening. They are never dropped: an auditor needs them as long as the logs they
        # signed are kept.
        self._audit_keys: dict[str, dict] = {}
        self.relay = LineRelay(sys.stdout.fileno()) if config.decision_log.sink == "stdout" else None

        self.registry = CollectorRegistry(auto_describe=True)
        self.restarts = Counter("extauthz_worker_restarts", "Worker processes started again after they exited.",
                                ("worker",), registry=self.registry)
        self.registry.register(WorkerMetrics(self))

        check_ports_free(config)
        try:
            self.http = SideListener(config.listen.http,
                                     SideApp(self.jwks, self.is_ready, self.store_state, self.metrics,
                                             self.audit_jwks))
        except OSError as exc:
            raise ConfigError(str(config.source), "listen.http", f"cannot listen on {config.listen.http}: "
                              f"{exc.strerror}", "stop whatever uses that port or choose another") from exc
        self._readiness = threading.Thread(target=self._poll_readiness, name="worker-readiness", daemon=True)

    # --- the side listener ----------------------------------------------------------------------

    def worker_text(self, worker: Worker, path: str) -> str | None:
        """GET `path` from one worker's side listener; return the body of a 200, else None."""
        port = worker.http_port
        if port is None or not worker.running:
            return None
        try:
            status, body = _worker_get(port, path)
        except OSError:
            return None
        return body.decode() if status == 200 else None

    def jwks(self) -> bytes:
        """Return the union of every worker's JWKS and the keys of workers that exited recently.

        A worker that does not respond contributes the keys it served last.
        """
        for worker in self.workers:
            self._refresh_keys(worker)
        now = time.time()
        keys: dict[str, dict] = {}
        with self._keys_lock:
            self._exited_keys = [(key, until) for key, until in self._exited_keys if until > now]
            for worker in self.workers:
                for key in worker.keys:
                    keys.setdefault(key.get("kid"), key)
            for key, _ in self._exited_keys:
                keys.setdefault(key.get("kid"), key)
        return json.dumps({"keys": list(keys.values())}, separators=(",", ":")).encode()

    def audit_jwks(self) -> bytes:
        """Return the keys that sign the workers' decision log checkpoints: current workers and exited ones."""
        with self._keys_lock:
            return json.dumps({"keys": list(self._audit_keys.values())}, separators=(",", ":")).encode()

    def _refresh_keys(self, worker: Worker) -> None:
        """Read one worker's JWKS and keep its keys; keep the previous keys when the worker does not respond."""
        text = self.worker_text(worker, JWKS_PATH)
        if text is None:
            return
        try:
            keys = json.loads(text).get("keys", [])
        except (ValueError, AttributeError):
            return
        with self._keys_lock:
            worker.keys = [key for key in keys if isinstance(key, dict)]
            worker.keys_read_at = time.monotonic()

    def _keep_exited_keys(self, worker: Worker) -> None:
        """Keep serving the keys of a worker that exited for as long as the tokens it signed may be valid."""
        until = time.time() + self.config.token.ttl + CLOCK_SKEW
        with self._keys_lock:
            self._exited_keys += [(key, until) for key in worker.keys]
            worker.keys = []

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def is_ready(self) -> bool:
        return not self.draining and all(worker.ready for worker in self.workers)

    def store_state(self) -> str:
        return "ok" if all(worker.store == "ok" for worker in self.workers) else "unavailable"

    def _poll_readiness(self) -> None:
        logged_ready = False
        while not self._stopping.wait(READINESS_INTERVAL):
            for worker in self.workers:
                worker.ready, worker.store = self._worker_readiness(worker)
                # Known keys let the JWKS include a worker that dies before a backend fetches it.
                if worker.ready and time.monotonic() - worker.keys_read_at > KEYS_REFRESH_INTERVAL:
                    self._refresh_keys(worker)
            if self.is_ready() and not logged_ready:
                logged_ready = True
                log.info("ready", extra={"workers": len(self.workers), "http": str(self.config.listen.http)})

    def _worker_readiness(self, worker: Worker) -> tuple[bool, str]:
        if worker.http_port is None or not worker.running:
            return False, worker.store
        try:
            status, body = _worker_get(worker.http_port, "/readyz")
            store = json.loads(body).get("store", "unavailable")
        except (OSError, ValueError, AttributeError):
            return False, worker.store
        return status == 200, store

    # --- worker processes -----------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> None:
        reader, writer = os.pipe()
        argv = [*self.worker_argv, "--worker-index", str(worker.index), "--worker-status-fd", str(writer),
                "--supervisor-pid", str(os.getpid())]
        stdout = None
        if self.relay is not None:
            stdout, worker.relay = self.relay.open(worker.index)
        try:
            # stderr, the operational log, is inherited. So is stdout, unless the decision log goes there.
            worker.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, pass_fds=(writer,))
        finally:
            os.close(writer)
            if stdout is not None:
                os.close(stdout)
        worker.status_reader = reader
        worker.status_buffer = b""
        worker.started_at = time.monotonic()
        worker.http_port = None
        worker.ready = False
        worker.restart_at = None
        log.info("worker started", extra={"worker": worker.index, "pid": worker.process.pid})

    def _read_status(self, worker: Worker) -> None:
        assert worker.status_reader is not None
        chunk = os.read(worker.status_reader, 4096)
        worker.status_buffer += chunk
        if b"\n" not in worker.status_buffer and chunk:
            return
        os.close(worker.status_reader)
        worker.status_reader = None
        try:
            message = json.loads(worker.status_buffer.split(b"\n", 1)[0])
            worker.http_port = int(message["http_port"])
            audit_keys = [key for key in message["audit_keys"]
                          if isinstance(key, dict) and isinstance(key.get("kid"), str)]
        except (ValueError, KeyError, TypeError):
            # The worker closed the pipe without a message: it is exiting, which the main loop handles.
            return
        with self._keys_lock:
            for key in audit_keys:
                self._audit_keys.setdefault(key["kid"], key)
        address = self.config.listen.worker_address(worker.index)
        log.info("worker listening", extra={"worker": worker.index, "worker_grpc": str(address),
                                            "audit_kids": [key["kid"] for key in audit_keys]})

    def _wait_status(self, timeout: float) -> None:
        readers = {worker.status_reader: worker for worker in self.workers if worker.status_reader is not None}
        if not readers:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select(list(readers), [], [], timeout)
        except InterruptedError:
            return
        for reader in ready:
            self._read_status(readers[reader])

    def _start_all(self) -> int | None:
        """Start every worker and wait until each listens; return an exit status if one fails."""
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + START_TIMEOUT
        while any(worker.http_port is None for worker in self.workers):
            if self._received and any(signum != signal.SIGHUP for signum in self._received):
                return 0
            for worker in self.workers:
                code = worker.process.poll() if worker.process else None
                if code is not None:
                    log.error("worker exited during start-up; stopping the service",
                              extra={"worker": worker.index, "exit_code": code})
                    return EXIT_CONFIG if code == EXIT_CONFIG else 1
            if time.monotonic() > deadline:
                log.error("a worker did not start listening in time; stopping the service",
                          extra={"timeout_s": START_TIMEOUT,
                                 "workers": [worker.index for worker in self.workers if worker.http_port is None]})
                return 1
            self._wait_status(POLL_INTERVAL)
        return None

    def _handle_exits(self) -> int | None:
        """Schedule a restart for each worker that exited; return an exit status when the service must stop."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is None or worker.restart_at is not None:
                continue
            code = worker.process.poll()
            if code is None:
                continue
            if worker.status_reader is not None:
                os.close(worker.status_reader)
                worker.status_reader = None
            worker.ready = False
            self._keep_exited_keys(worker)
            self._exits = [moment for moment in self._exits if now - moment < EXIT_WINDOW] + [now]
            cause = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
            if len(self._exits) > MAX_EXITS:
                log.error("workers keep exiting; stopping the service",
                          extra={"worker": worker.index, **cause, "exits": len(self._exits),
                                 "window_s": EXIT_WINDOW})
                return 1
            worker.restart_at = now + RESTART_DELAY
            log.error("worker exited; starting it again", extra={"worker": worker.index, "pid": worker.process.pid,
                                                                 **cause, "restart_in_s": RESTART_DELAY})
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at:
                self.restarts.labels(str(worker.index)).inc()
                self._spawn(worker)
        return None

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.running:
                assert worker.process is not None
                try:
                    worker.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _stop_workers(self) -> None:
        """Send SIGTERM to every worker and wait for them to drain; SIGKILL whichever outlasts its grace."""
        self.draining = True
        self._signal_workers(signal.SIGTERM)
        grace = self.config.server.shutdown_delay + self.config.server.drain_timeout + STOP_MARGIN
        deadline = time.monotonic() + grace
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it",
                          extra={"worker": worker.index, "pid": worker.process.pid, "grace_s": grace})
                worker.process.kill()
                worker.process.wait()
            if worker.status_reader is not None:
                os.close(worker.status_reader)
                worker.status_reader = None
            if worker.relay is not None:
                # The relay ends once it has copied the worker's last line.
                worker.relay.join(timeout=STOP_MARGIN)

    # --- the main loop --------------------------------------------------------------------------

    def _record_signal(self, signum: int, _frame: object) -> None:
        # Only record: the main loop acts on it (see cli._serve for why a handler must not take locks).
        self._received.append(signum)

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, or until workers keep exiting; return the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        self.http.start()
        log.info("supervisor listening", extra={"http": f"{self.http.host}:{self.http.port}",
                                                "grpc": str(self.config.listen.grpc),
                                                "workers": len(self.workers),
                                                "cpu_affinity": self.config.server.cpu_affinity})
        status = self._start_all()
        if status is None:
            self._readiness.start()
            status = self._supervise()
        log.info("stopping workers", extra={"workers": len(self.workers)})
        self._stop_workers()
        self._stopping.set()
        self.http.stop()
        log.info("stopped")
        return status

    def _supervise(self) -> int:
        while True:
            while self._received:
                signum = self._received.pop(0)
                log.info("signal received", extra={"signal": signal.Signals(signum).name})
                if signum == signal.SIGHUP:
                    self._signal_workers(signal.SIGHUP)
                else:
                    return 0
            status = self._handle_exits()
            if status is not None:
                return status
            self._wait_status(POLL_INTERVAL)


def worker_command(config_path: str, log_level: str, options: list[str]) -> list[str]:
    """Return the command line that starts one worker: this Python running `extauthz serve`."""
    return [sys.executable, "-m", "extauthz", "serve", "--config", config_path, "--log-level", log_level, *options]

