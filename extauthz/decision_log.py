"""Decision records: one JSON line per Check, on allow, deny and error, in a signed hash chain.

The fields are documented in docs/decision-log.md; extauthz.record builds them, and extauthz.redaction
decides what a record may take from the request and the token (never a credential).

A Check hands its Decision to a bounded queue and returns. One writer thread builds each record, adds
the chain envelope (extauthz.audit_chain), and writes the line to the sink. Lines that the sink cannot
take go to the spool and are delivered in order once it recovers. When the spool is full, a Check's
record cannot be kept: `decision_log.on_full` then denies the Check (`audit_unavailable`) or lets it
through, and the record is counted as dropped either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import IO, Any

from extauthz.audit_chain import AuditKeyError, Chain, CheckpointSigner, generate_signer, load_signer, new_writer_id
from extauthz.config import DecisionLogConfig
from extauthz.decision import Decision
from extauthz.errors import DecisionLogError
from extauthz.metrics import Metrics
from extauthz.record import build_record
from extauthz.sinks import SinkError, StreamSink, open_sink, open_spool

log = logging.getLogger(__name__)

# Decisions that may wait for the writer thread. A Check that finds the queue full waits up to
# decision_log.max_wait_ms for room.
QUEUE_CAPACITY = 10_000
# Lines the writer hands to the sink in one write.
BATCH_LINES = 500
# Backoff between attempts to write to a failed sink, in seconds: doubling from the first to the last.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
# Dropped records are logged at most once per this many seconds. So are sink failures, except the
# first one after the sink worked.
LOG_INTERVAL = 10.0
# At shutdown, the writer keeps retrying a failed sink this long before it leaves the rest in the spool.
SHUTDOWN_TIMEOUT = 5.0


class DecisionLog:
    """Chains, signs and writes decision records on one writer thread.

    `stream` replaces the configured sink (tests and `policy explain` pass an in-memory stream). With
    `start` false, the writer thread starts at `start()`; records written before then wait in the queue.
    """

    def __init__(self, config: DecisionLogConfig, stream: IO[bytes] | None = None, *,
                 metrics: Metrics | None = None, signer: CheckpointSigner | None = None, start: bool = True,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT, queue_capacity: int = QUEUE_CAPACITY):
        self.config = config
        self.metrics = metrics or Metrics()
        self.signer = signer or _checkpoint_signer(config)
        self.writer_id = new_writer_id()
        self.shutdown_timeout = shutdown_timeout
        self.queue_capacity = queue_capacity
        self._sink = StreamSink(stream, "stream") if stream is not None else open_sink(config)
        try:
            self._spool = open_spool(config)
        except DecisionLogError:
            self._sink.close()
            raise
        self._chain = Chain(self.writer_id, self.signer)

        self._lock = threading.Lock()
        self._wake_writer = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._queue: deque[Decision] = deque()
        self._accepted = 0
        self._processed = 0
        self._delivered_through = 0
        self._spool_full = False
        self._closing = False
        self._broken = False

        # Used by the writer thread only.
        self._retry_at = 0.0
        self._failures = 0
        self._last_sink_log = float("-inf")

        self._drop_lock = threading.Lock()
        self.dropped = 0
        self._last_drop_log = float("-inf")

        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._started = False
        if start:
            self.start()

    @property
    def on_full(self) -> str:
        return self.config.on_full

    def jwks(self) -> bytes:
        """Return the public JWKS of the key that signs this writer's checkpoints."""
        return self.signer.jwks()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._thread.start()

    # The Check side.

    def write(self, decision: Decision) -> bool:
        """Hand `decision` to the writer thread; return False when its record cannot be kept.

        Waits up to `decision_log.max_wait_ms` for room in the queue, and not at all while the spool is full.
        """
        deadline = None
        with self._lock:
            while True:
                if self._closing or self._broken:
                    reason = "closed" if self._closing else "error"
                    break
                if self._spool_full:
                    reason = "spool_full"
                    break
                if len(self._queue) < self.queue_capacity:
                    self._queue.append(decision)
                    self._accepted += 1
                    self._wake_writer.notify()
                    return True
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.config.max_wait_ms / 1000
                if now >= deadline:
                    reason = "queue_full"
                    break
                self._room.wait(deadline - now)
        self._count_drop(reason, 1, decision.decision_id)
        return False

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every decision handed over before this call has reached the sink.

        Returns False when `timeout` seconds pass first, as while the sink is down.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._accepted
            self._wake_writer.notify()
            while self._delivered_through < target:
                remaining = deadline - time.monotonic()
                if self._broken or remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True

    def close(self) -> None:
        """Write every queued record and the shutdown checkpoint, deliver the spool, and stop.

        A sink that is still failing after `shutdown_timeout` seconds leaves the rest in the spool: on
        disk with a file spool, else lost. The log states how many records and where.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            start = not self._started and bool(self._queue)
            self._wake_writer.notify_all()
            self._room.notify_all()
        if start:
            self.start()
        if self._started:
            self._thread.join()
        self._sink.close()
        self._spool.close()

    # The writer thread.

    def _run(self) -> None:
        try:
            self._emit([self._chain.checkpoint("start", time.time())])
            self._finish_round(0)
            interval = self.config.checkpoint_interval
            next_checkpoint = time.monotonic() + interval
            while True:
                batch, last = self._take(next_checkpoint)
                self._emit(self._chain_records(batch))
                if time.monotonic() >= next_checkpoint:
                    if self._chain.decisions_since_checkpoint:
                        self._emit([self._chain.checkpoint("interval", time.time())])
                    next_checkpoint = time.monotonic() + interval
                self._finish_round(len(batch))
                if last:
                    break
            self._shut_down()
        except Exception:  # noqa: BLE001 - a bug must stop the records loudly, never the process
            log.exception("the decision log writer failed; no further decision record is written",
                          extra={"writer": self.writer_id})
            with self._lock:
                self._broken = True
                self._progress.notify_all()
                self._room.notify_all()

    def _take(self, next_checkpoint: float) -> tuple[list[Decision], bool]:
        """Wait for work; return the decisions to write now, and whether the log is closing with none left."""
        with self._lock:
            while True:
                now = time.monotonic()
                room = self._room_for_lines(now)
                if (self._queue and room) or self._closing or now >= next_checkpoint:
                    break
                if len(self._spool) and now >= self._retry_at:
                    break
                wake_at = next_checkpoint
                if len(self._spool):
                    wake_at = min(wake_at, self._retry_at)
                self._wake_writer.wait(max(0.0, wake_at - now))
            batch = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            if batch:
                self._room.notify_all()
            return batch, self._closing and not self._queue

    def _room_for_lines(self, now: float) -> int:
        """Return how many decisions the writer may take now (lock held)."""
        if self._closing or (not len(self._spool) and now >= self._retry_at):
            return BATCH_LINES
        # The lines would go to the spool, which takes no more than max_records.
        return max(0, min(BATCH_LINES, self.config.spool_max_records - len(self._spool)))

    def _chain_records(self, batch: list[Decision]) -> list[bytes]:
        lines = []
        for decision in batch:
            try:
                lines.append(self._chain.decision(build_record(decision, self.config)))
            except Exception:  # noqa: BLE001 - one bad record must not stop the others
                log.exception("cannot build a decision record", extra={"decision_id": decision.decision_id})
                self._count_drop("error", 1, decision.decision_id)
        return lines

    def _emit(self, lines: list[bytes]) -> None:
        """Write `lines` to the sink, or to the spool behind older lines; then deliver what the spool holds."""
        if lines and not len(self._spool) and time.monotonic() >= self._retry_at:
            try:
                self._sink.write(lines)
                self._sink_recovered()
                lines = []
            except SinkError as exc:
                lines = lines[exc.delivered:]
                self._sink_failed(exc)
        if lines:
            self._spool.append(lines)
        self._drain_spool()

    def _drain_spool(self) -> None:
        while len(self._spool) and time.monotonic() >= self._retry_at:
            try:
                batch = self._spool.peek(BATCH_LINES)
            except OSError as exc:
                log.error("cannot read the decision log spool", extra={"spool": self._spool.location,
                                                                        "error": str(exc)})
                self._retry_at = time.monotonic() + RETRY_MAX
                return
            if not batch:
                return
            try:
                self._sink.write(batch)
                delivered = len(batch)
            except SinkError as exc:
                delivered = exc.delivered
                self._sink_failed(exc)
            try:
                self._spool.pop(delivered)
            except OSError as exc:
                # The lines are delivered; only the record of that in the spool folder is stale.
                log.error("cannot update the decision log spool; a restart may deliver some lines twice",
                          extra={"spool": self._spool.location, "error": str(exc)})
            if delivered < len(batch):
                return
            self._sink_recovered()

    def _sink_failed(self, error: SinkError) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + min(RETRY_MAX, RETRY_FIRST * 2 ** (self._failures - 1))
        self.metrics.decision_log_sink_errors.inc()
        now = time.monotonic()
        if self._failures == 1 or now - self._last_sink_log >= LOG_INTERVAL:
            self._last_sink_log = now
            log.error("decision log sink failed; records wait in the spool until it recovers",
                      extra={"sink": self._sink.name, "error": str(error), "failures": self._failures,
                             "spool": self._spool.location, "spooled": len(self._spool)})

    def _sink_recovered(self) -> None:
        if self._failures:
            log.info("decision log sink recovered", extra={"sink": self._sink.name, "failures": self._failures,
                                                           "spooled": len(self._spool)})
        self._failures = 0
        self._retry_at = 0.0

    def _finish_round(self, processed: int) -> None:
        with self._lock:
            self._processed += processed
            if not len(self._spool):
                self._delivered_through = self._processed
            self._spool_full = len(self._spool) >= self.config.spool_max_records
            self._progress.notify_all()
        self.metrics.decision_log_spooled.set(len(self._spool))

    def _shut_down(self) -> None:
        self._emit([self._chain.checkpoint("shutdown", time.time())])
        deadline = time.monotonic() + self.shutdown_timeout
        while len(self._spool) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))
            self._drain_spool()
        self._finish_round(0)

        lost = self._spool.in_memory
        kept = len(self._spool) - lost
        if not kept and not lost:
            log.info("decision log closed", extra={"writer": self.writer_id, "lines": self._chain.seq})
        if kept:
            log.warning("the decision log sink is still failing at shutdown; records stay in the spool folder "
                        "and are delivered first at the next start",
                        extra={"records": kept, "spool": self._spool.location, "sink": self._sink.name})
        if lost:
            log.error("the decision log sink is still failing at shutdown; the records in the memory spool "
                      "are lost", extra={"records": lost, "sink": self._sink.name})
            self._count_drop("shutdown", lost)

    # Both sides.

    def _count_drop(self, reason: str, count: int, decision_id: str | None = None) -> None:
        self.metrics.decision_log_dropped.labels(reason).inc(count)
        now = time.monotonic()
        with self._drop_lock:
            self.dropped += count
            if now - self._last_drop_log < LOG_INTERVAL:
                return
            self._last_drop_log = now
            total = self.dropped
        extra: dict[str, Any] = {"reason": reason, "records": count, "dropped_total": total,
                                 "on_full": self.config.on_full}
        if decision_id is not None:
            extra["decision_id"] = decision_id
        log.error("decision records dropped", extra=extra)


def _checkpoint_signer(config: DecisionLogConfig) -> CheckpointSigner:
    if config.signing_key_file is not None:
        try:
            return load_signer(config.signing_key_file)
        except AuditKeyError as exc:
            raise DecisionLogError("decision_log.signing_key_file", str(exc),
                                   "write a key with `extauthz audit keygen FILE`") from exc
    signer = generate_signer()
    log.warning("decision_log.signing_key_file is not set: checkpoints are signed with a key generated at start, "
                "which only this process's /.well-known/audit-jwks.json can verify", extra={"kid": signer.kid})
    return signer


class DiscardedLog:
    """A decision log that keeps nothing, for decisions that reach no client: policy explain and replay."""

    # write() never fails, so the pipeline never reads this. It matches the attribute of DecisionLog.
    on_full = "drop"

    def write(self, decision: Decision) -> bool:
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        pass
