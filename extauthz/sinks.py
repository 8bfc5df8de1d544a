"""Decision log sinks (stdout, a rotated file, a Redis stream) and the spool.

A sink takes a batch of serialised lines, each ending in a newline, in order. `write` either delivers
the whole batch or raises SinkError whose `delivered` counts the lines at the start of the batch that
were delivered, so the writer can spool exactly the rest.

A spool keeps the lines that a failed sink could not take, oldest first, until the sink returns: in
memory, or in files in a folder, where they outlive the process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import sys
from collections import deque
from pathlib import Path
from typing import IO, Protocol

from extauthz.config import DecisionLogConfig
from extauthz.errors import DecisionLogError

log = logging.getLogger(__name__)

# A Redis sink command may take this long, or store.timeout when that is longer. The writer thread
# waits for it, never a Check.
REDIS_SINK_TIMEOUT = 2.0
# An unclear failure is one where the connection dropped after XADD was sent. The sink then reads the
# entries after its last confirmed one, or the newest when none is confirmed yet, to find the lines
# that Redis did store. It reads this many entries more than it is about to resend.
REDIS_LOOKBACK = 1000
# A file spool starts a new segment file once the current one reaches this size.
SPOOL_SEGMENT_BYTES = 4 * 1024 * 1024


class SinkError(Exception):
    """A sink write that failed after delivering the first `delivered` lines of the batch."""

    def __init__(self, message: str, delivered: int = 0):
        super().__init__(message)
        self.delivered = delivered


class Sink(Protocol):
    name: str

    def write(self, lines: list[bytes]) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """Lines to a binary stream: stdout, or the stream a test passes in."""

    def __init__(self, stream: IO[bytes], name: str = "stdout"):
        self.stream = stream
        self.name = name

    def write(self, lines: list[bytes]) -> None:
        try:
            self.stream.write(b"".join(lines))
            self.stream.flush()
        except (OSError, ValueError) as exc:
            # NOTE: a buffered stream does not report how much of a failed write went out, so a line
            # may be written in part and then again in full from the spool.
            raise SinkError(f"cannot write to {self.name}: {exc}") from exc

    def close(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


class FileSink:
    """Lines appended to PATH, rotated by size: PATH.1 is the newest backup, PATH.N the oldest.

    A rotation happens only between lines, before a line that would take PATH beyond `max_bytes`. A
    line longer than `max_bytes` gets a file of its own. The oldest backup is deleted when a rotation
    needs its name. A PATH that is not a regular file, such as /dev/null or a named pipe, is never rotated.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.name = f"file {path}"
        self._fd: int | None = None
        self._size = 0
        try:
            self._open()
        except OSError as exc:
            raise DecisionLogError("decision_log.sink", f"cannot open {path}: {exc.strerror}",
                                   "check that the folder is writable") from exc

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        status = os.fstat(self._fd)
        self._size = status.st_size
        self._regular = stat.S_ISREG(status.st_mode)

    def write(self, lines: list[bytes]) -> None:
        delivered = 0
        try:
            if self._fd is None:
                self._open()
            for rotate, group in self._groups(lines):
                if rotate:
                    self._rotate()
                self._append(b"".join(group))
                delivered += len(group)
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}", delivered) from exc

    def _groups(self, lines: list[bytes]) -> list[tuple[bool, list[bytes]]]:
        """Split `lines` into runs that each go into one file, each with whether a rotation comes first."""
        groups: list[tuple[bool, list[bytes]]] = []
        size = self._size
        for line in lines:
            rotate = self._regular and size > 0 and size + len(line) > self.max_bytes
            if rotate or not groups:
                groups.append((rotate, []))
                if rotate:
                    size = 0
            groups[-1][1].append(line)
            size += len(line)
        return groups

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            # Cut a partly written run back to the last whole line, so that no line is left half written.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.error("cannot cut a partly written decision log line", extra={"path": str(self.path)})
            raise
        self._size += written

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # Shift PATH.1 ... up to the first free number, or up to PATH.N, which the shift overwrites.
        free = 1
        while free < self.backups and self._backup(free).exists():
            free += 1
        for number in range(free - 1, 0, -1):
            os.replace(self._backup(number), self._backup(number + 1))
        os.replace(self.path, self._backup(1))
        self._open()
        log.info("decision log rotated", extra={"path": str(self.path), "backups": self.backups})

    def _backup(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RedisStreamSink:
    """Lines added to a Redis stream with `XADD key MAXLEN ~ maxlen * r LINE`, one entry per line."""

    def __init__(self, config: DecisionLogConfig):
        from extauthz.redis_store import redis_client
        from extauthz.store import StoreError

        assert config.store is not None
        self.stream = config.redis_stream
        self.maxlen = config.redis_maxlen
        self.name = f"redis stream {config.redis_stream}"
        try:
            self.client = redis_client(config.store, timeout=max(config.store.timeout, REDIS_SINK_TIMEOUT),
                                       retries=0)
        except StoreError as exc:
            raise DecisionLogError("decision_log.sink", str(exc),
                                   "fix store.url, store.password_env or store.tls_ca_file") from exc
        self._last_id: bytes | None = None
        self._unclear = False

    def write(self, lines: list[bytes]) -> None:
        import redis

        delivered = 0
        try:
            if self._unclear:
                delivered = self._stored_prefix(lines)
                self._unclear = False
            pending = lines[delivered:]
            if not pending:
                return
            pipeline = self.client.pipeline(transaction=False)
            for line in pending:
                pipeline.xadd(self.stream, {"r": line.rstrip(b"\n")}, maxlen=self.maxlen, approximate=True)
            self._unclear = True
            ids = pipeline.execute()
            self._unclear = False
            self._last_id = ids[-1]
        except redis.RedisError as exc:
            raise SinkError(f"cannot add to the Redis stream {self.stream}: {type(exc).__name__}: {exc}",
                            delivered) from exc

    def _stored_prefix(self, lines: list[bytes]) -> int:
        """Return how many of `lines`, from the start, the stream contains after the last confirmed entry."""
        limit = len(lines) + REDIS_LOOKBACK
        if self._last_id is None:
            # Nothing confirmed yet: the lines, if stored, are among the newest entries.
            entries = self.client.xrevrange(self.stream, max="+", min="-", count=limit)[::-1]
        else:
            entries = self.client.xrange(self.stream, min=b"(" + self._last_id, max="+", count=limit)
        stored = {fields.get(b"r") for _, fields in entries}
        count = 0
        for line in lines:
            if line.rstrip(b"\n") not in stored:
                break
            count += 1
        if count:
            self._last_id = entries[-1][0]
            log.info("the Redis stream already contains lines of a write that failed without a reply",
                     extra={"stream": self.stream, "lines": count})
        return count

    def close(self) -> None:
        import redis

        try:
            self.client.close()
        except redis.RedisError:
            pass


def open_sink(config: DecisionLogConfig) -> Sink:
    """Return the sink that `decision_log.sink` names; raise DecisionLogError when it cannot be set up."""
    if config.sink == "file":
        assert config.path is not None
        return FileSink(config.path, config.file_max_bytes, config.file_backups)
    if config.sink == "redis":
        return RedisStreamSink(config)
    return StreamSink(sys.stdout.buffer)


class Spool(Protocol):
    location: str

    def __len__(self) -> int: ...

    @property
    def in_memory(self) -> int:
        """The number of lines that only memory keeps, which are lost when the process ends."""
        ...

    def append(self, lines: list[bytes]) -> None: ...

    def peek(self, count: int) -> list[bytes]: ...

    def pop(self, count: int) -> None: ...

    def close(self) -> None: ...


class MemorySpool:
    """Lines kept in memory; they are lost when the process ends."""

    location = "memory"

    def __init__(self) -> None:
        self._lines: deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def in_memory(self) -> int:
        return len(self._lines)

    def append(self, lines: list[bytes]) -> None:
        self._lines.extend(lines)

    def peek(self, count: int) -> list[bytes]:
        return [self._lines[index] for index in range(min(count, len(self._lines)))]

    def pop(self, count: int) -> None:
        for _ in range(count):
            self._lines.popleft()

    def close(self) -> None:
        pass


class FileSpool:
    """Lines kept in segment files in a folder: `NNNNNNNNNNNN.spool`, oldest first.

    The file `head` records the first undelivered line as `SEGMENT OFFSET` and is replaced atomically
    after each delivered batch. A crash between a delivery and that update makes the next start deliver
    that batch again. One process at a time may use a folder, because it holds the file `lock` with flock.

    Lines that cannot be written to the folder (a full disk) wait in memory behind the files, and go to
    the folder with the next append that succeeds.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.location = str(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock = open(folder / "lock", "a+b")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise DecisionLogError("decision_log.spool.path", f"cannot use {folder}: {exc.strerror}",
                                   "make the folder writable by extauthz") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise DecisionLogError("decision_log.spool.path", f"{folder} is in use by another extauthz process",
                                   "give each process its own spool folder") from exc
        self._segments: deque[Path] = deque(sorted(folder.glob("*.spool")))
        self._head_offset = self._read_head()
        self._count = 0
        for segment in self._segments:
            self._repair(segment)
            self._count += self._read_lines(segment).count(b"\n")
        if self._segments:
            self._count -= self._read_lines(self._segments[0], 0, self._head_offset).count(b"\n")
        self._tail: IO[bytes] | None = None
        self._overflow: deque[bytes] = deque()

    def _read_head(self) -> int:
        try:
            name, offset = (self.folder / "head").read_text(encoding="ascii").split()
        except (OSError, ValueError):
            return 0
        # Segments before the recorded one were delivered in full: a crash came before their removal.
        while self._segments and self._segments[0].name < name:
            self._segments.popleft().unlink()
        if self._segments and self._segments[0].name == name and offset.isdigit():
            return int(offset)
        return 0

    def _repair(self, segment: Path) -> None:
        """Cut a half-written last line, left by a crash in the middle of an append."""
        data = segment.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.truncate(segment, keep)
            log.warning("cut a partly written line from a spool file",
                        extra={"path": str(segment), "bytes": len(data) - keep})

    @staticmethod
    def _read_lines(segment: Path, start: int = 0, end: int | None = None) -> bytes:
        with open(segment, "rb") as file:
            file.seek(start)
            return file.read() if end is None else file.read(max(0, end - start))

    def __len__(self) -> int:
        return self._count + len(self._overflow)

    @property
    def in_memory(self) -> int:
        return len(self._overflow)

    def append(self, lines: list[bytes]) -> None:
        """Write `lines`, after any that wait in memory, to the newest segment and fsync it."""
        pending = [*self._overflow, *lines]
        try:
            self._write_segment(pending)
        except OSError as exc:
            if not self._overflow:
                log.error("cannot write the decision log spool folder; spooled lines wait in memory",
                          extra={"spool": self.location, "error": str(exc)})
            self._overflow.extend(lines)
            return
        if self._overflow:
            log.info("the decision log spool folder is writable again", extra={"spool": self.location,
                                                                                "lines": len(self._overflow)})
        self._overflow.clear()
        self._count += len(pending)

    def _write_segment(self, lines: list[bytes]) -> None:
        if self._tail is None or self._tail.tell() >= SPOOL_SEGMENT_BYTES:
            self._start_segment()
        assert self._tail is not None
        size = self._tail.tell()
        try:
            self._tail.write(b"".join(lines))
            self._tail.flush()
            os.fsync(self._tail.fileno())
        except OSError:
            # Cut what went out in part, so the segment never ends in half a line.
            self._tail.close()
            self._tail = None
            os.truncate(self._segments[-1], size)
            raise

    def _start_segment(self) -> None:
        if self._tail is not None:
            self._tail.close()
        number = int(self._segments[-1].stem) + 1 if self._segments else 1
        path = self.folder / f"{number:012d}.spool"
        self._tail = open(path, "ab")  # noqa: SIM115 - closed by close() or the next segment
        self._segments.append(path)

    def peek(self, count: int) -> list[bytes]:
        if self._tail is not None:
            self._tail.flush()
        while self._segments:
            data = self._read_lines(self._segments[0], self._head_offset)
            lines = [line for line in data.splitlines(keepends=True)[:count] if line.endswith(b"\n")]
            if lines:
                return lines
            # A segment read to its end, as after a crash between delivery and its removal.
            self._drop_head()
            self._write_head()
        self._count = 0
        return [self._overflow[index] for index in range(min(count, len(self._overflow)))]

    def pop(self, count: int) -> None:
        while count > 0 and self._segments:
            lines = self.peek(count)
            if not lines or not self._segments:
                # Every segment is delivered: the lines came from memory.
                break
            self._head_offset += sum(len(line) for line in lines)
            self._count -= len(lines)
            count -= len(lines)
            head = self._segments[0]
            if self._head_offset >= head.stat().st_size:
                self._drop_head()
        if not self._segments:
            for _ in range(min(count, len(self._overflow))):
                self._overflow.popleft()
        self._write_head()

    def _drop_head(self) -> None:
        head = self._segments.popleft()
        if self._tail is not None and self._tail.name == str(head):
            self._tail.close()
            self._tail = None
        head.unlink()
        self._head_offset = 0

    def _write_head(self) -> None:
        if not self._segments:
            (self.folder / "head").unlink(missing_ok=True)
            return
        temporary = self.folder / "head.tmp"
        temporary.write_text(f"{self._segments[0].name} {self._head_offset}\n", encoding="ascii")
        os.replace(temporary, self.folder / "head")

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None
        self._lock.close()


def open_spool(config: DecisionLogConfig) -> Spool:
    if config.spool_path is None:
        return MemorySpool()
    return FileSpool(config.spool_path)
