"""Read decision log records from files, rotated sets, gzip files, stdin and Redis streams.

Every line of a decision log is one JSON object. A line is a record when it is an object whose
`type` is `decision` or `checkpoint`. An object without `type` is a record too when it has a
`decision_id`, a `decision` of `allow` or `deny` and a `reason`, because extauthz wrote such flat
records before the envelope existed. Every other line is skipped and counted, such as the
operational logs that a captured stdout mixes in, a truncated last line or text that is not UTF-8.

Sources, in the order given:

- a file, plain or gzip (detected from its first bytes, whatever its name);
- a rotated set: for PATH, also PATH.N ... PATH.1 (each may end in `.gz`), oldest first, then PATH.
  A file that an earlier argument already named is read only once, so listing the set explicitly
  works too;
- `-`: standard input, plain or gzip;
- a Redis stream, read with XRANGE in pages. Each entry's field `r` contains one line.

Records come with their source, `FILE:LINE` or `STREAM#ID`, so a finding can point at its line.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

# A decision record is a few KiB. A longer line is not one, and reading it whole could exhaust memory.
MAX_LINE_BYTES = 1 << 20
REDIS_PAGE_SIZE = 1000
# Seconds one Redis command may take before the read fails.
REDIS_TIMEOUT = 10.0
RECORD_TYPES = ("decision", "checkpoint")
STDIN = "-"
# How many skipped lines a reader remembers by source, to show where they are.
SKIPPED_EXAMPLES = 5
_GZIP_MAGIC = b"\x1f\x8b"


class ReadError(Exception):
    """A source that cannot be read at all: the message names it and the fix."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One record and where it was read: `FILE:LINE`, `-:LINE` for stdin, or `STREAM#ID`."""

    record: dict[str, Any]
    source: str
    # The line as written, without its line break; empty for an entry built in code.
    line: bytes = field(default=b"", repr=False)
    # The input it was read from: the file name, `-`, or the stream's key. A writer appends its lines to
    # one input in seq order, which `audit verify` checks.
    origin: str = ""

    @property
    def kind(self) -> str:
        """`decision` or `checkpoint`; a flat record without `type` is a decision."""
        return self.record.get("type", "decision")


@dataclass(frozen=True, slots=True)
class RedisSource:
    """A Redis stream of decision log lines."""

    url: str
    stream: str
    password_env: str | None = None
    page_size: int = REDIS_PAGE_SIZE


def parse_line(line: bytes) -> dict[str, Any] | None:
    """Return the record on one log line, or None when the line is not a record."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind is None:
        return value if _is_flat_decision(value) else None
    return value if kind in RECORD_TYPES else None


def _is_flat_decision(value: dict[str, Any]) -> bool:
    # Operational log lines may carry a decision_id too, but never a decision and a reason.
    return (isinstance(value.get("decision_id"), str) and value.get("decision") in ("allow", "deny")
            and isinstance(value.get("reason"), str))


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Return the files to read for `paths`: each rotated set oldest first, each file once.

    Raises ReadError for a path that names neither a file nor a rotated set.
    """
    files: list[str] = []
    seen: set[str] = set()
    for text in paths:
        if text == STDIN:
            files.append(STDIN)
            continue
        path = Path(text)
        if path.is_dir():
            raise ReadError(f"{text}: is a folder; pass the log files in it, such as {text}/decisions.log")
        members = [*_rotated_backups(path), *([path] if path.is_file() else [])]
        if not members:
            raise ReadError(f"{text}: file not found")
        for member in members:
            key = os.path.realpath(member)
            if key not in seen:
                seen.add(key)
                files.append(str(member))
    return files


def _rotated_backups(path: Path) -> list[Path]:
    """Return PATH.N ... PATH.1 (or PATH.N.gz) that exist, oldest (highest number) first."""
    folder = path.parent
    try:
        names = os.listdir(folder if str(folder) else ".")
    except OSError:
        return []
    pattern = re.compile(re.escape(path.name) + r"\.([0-9]{1,6})(\.gz)?\Z")
    numbered: dict[int, Path] = {}
    for name in names:
        match = pattern.match(name)
        if not match or not (folder / name).is_file():
            continue
        number = int(match.group(1))
        # PATH.3 and PATH.3.gz both exist while a rotation compresses: read the plain one.
        if number not in numbered or not match.group(2):
            numbered[number] = folder / name
    return [numbered[number] for number in sorted(numbered, reverse=True)]


@dataclass
class LogReader:
    """Iterate the records of files and Redis streams, counting every line that is not a record.

    A source that fails in the middle (a truncated gzip file, a lost Redis connection) ends with a
    message in `problems`, and reading goes on with the next source.
    """

    files: Sequence[str] = ()
    redis: Sequence[RedisSource] = ()
    stdin: IO[bytes] | None = None
    skipped: int = 0
    skipped_sources: list[str] = field(default_factory=list)
    records: int = 0
    problems: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[LogEntry]:
        for name in self.files:
            if name == STDIN:
                yield from self._read_stream(self.stdin or sys.stdin.buffer, STDIN)
                continue
            try:
                stream = open(name, "rb")  # noqa: SIM115 - the with block below closes it
            except OSError as exc:
                self.problems.append(f"{name}: cannot read: {exc.strerror}")
                continue
            with stream:
                yield from self._read_stream(stream, name)
        for source in self.redis:
            yield from self._read_redis(source)

    def _skip(self, source: str) -> None:
        self.skipped += 1
        if len(self.skipped_sources) < SKIPPED_EXAMPLES:
            self.skipped_sources.append(source)

    def _read_stream(self, raw: IO[bytes], name: str) -> Iterator[LogEntry]:
        number = 0
        try:
            stream = _decompressed(raw)
            while True:
                line = stream.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                number += 1
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    _discard_rest_of_line(stream)
                    self._skip(f"{name}:{number}")
                    continue
                if not line.strip():
                    continue
                record = parse_line(line)
                if record is None:
                    self._skip(f"{name}:{number}")
                    continue
                self.records += 1
                yield LogEntry(record, f"{name}:{number}", line.rstrip(b"\r\n"), name)
        except (OSError, EOFError, zlib.error) as exc:
            # gzip raises EOFError for a truncated file and BadGzipFile (an OSError) for a corrupt one.
            self.problems.append(f"{name}: unreadable after line {number}: {exc or type(exc).__name__} "
                                 "(a truncated or corrupt file; the lines before it were read)")

    def _read_redis(self, source: RedisSource) -> Iterator[LogEntry]:
        import redis

        client = open_redis(source)
        start = "-"
        try:
            while True:
                page = client.xrange(source.stream, min=start, max="+", count=source.page_size)
                for entry_id, fields in page:
                    entry_name = f"{source.stream}#{entry_id.decode()}"
                    line = fields.get(b"r")
                    record = parse_line(line) if line is not None else None
                    if record is None:
                        self._skip(entry_name)
                        continue
                    self.records += 1
                    yield LogEntry(record, entry_name, line, source.stream)
                if len(page) < source.page_size:
                    return
                start = "(" + page[-1][0].decode()
        except redis.RedisError as exc:
            position = "before the first entry" if start == "-" else f"after entry {start.lstrip('(')}"
            self.problems.append(f"stream {source.stream!r} at {_redacted(source.url)}: read failed {position}: "
                                 f"{_redis_hint(exc)}")
        finally:
            client.close()


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    peek = getattr(raw, "peek", None)
    head = peek(2)[:2] if peek is not None else b""
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def _discard_rest_of_line(stream: IO[bytes]) -> None:
    while True:
        chunk = stream.readline(MAX_LINE_BYTES)
        if not chunk or chunk.endswith(b"\n"):
            return


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _redis_hint(error: Exception) -> str:
    import redis

    if isinstance(error, redis.exceptions.MovedError):
        host, port = error.node_addr
        return f"the stream is on another Redis Cluster node; point --redis at redis://{host}:{port}"
    return str(error) or type(error).__name__


def open_redis(source: RedisSource):
    """Return a redis.Redis client for `source`; raise ReadError for an unusable URL or password."""
    import redis

    if not source.url.startswith(("redis://", "rediss://", "unix://")):
        raise ReadError(f"--redis {_redacted(source.url)!r}: unsupported URL scheme "
                        "(use redis://HOST:PORT/DB, rediss://HOST:PORT/DB for TLS, or unix://PATH)")
    try:
        password_in_url = urlsplit(source.url).password is not None
    except ValueError as exc:
        raise ReadError(f"--redis: invalid URL: {exc}") from exc
    if password_in_url:
        raise ReadError("--redis: a password in the URL ends up in shell history and process lists; "
                        "put it in an environment variable and name it with --redis-password-env")
    options: dict[str, Any] = {"socket_timeout": REDIS_TIMEOUT, "socket_connect_timeout": REDIS_TIMEOUT}
    if source.password_env:
        password = os.environ.get(source.password_env)
        if password is None:
            raise ReadError(f"--redis-password-env: environment variable {source.password_env} is not set")
        options["password"] = password
    try:
        return redis.Redis.from_url(source.url, **options)
    except ValueError as exc:
        raise ReadError(f"--redis {_redacted(source.url)}: invalid URL: {exc}") from exc


def check_redis_stream(source: RedisSource) -> None:
    """Raise ReadError unless the stream exists and can be read, before any record is read."""
    import redis

    where = f"stream {source.stream!r} at {_redacted(source.url)}"
    client = open_redis(source)
    try:
        kind = client.type(source.stream)
    except redis.AuthenticationError as exc:
        if source.password_env is None:
            raise ReadError(f"{where}: Redis requires a password ({exc}): put it in an environment variable and "
                            "name it with --redis-password-env") from exc
        raise ReadError(f"{where}: Redis rejected the password in {source.password_env}: {exc}") from exc
    except redis.ResponseError as exc:
        raise ReadError(f"{where}: {_redis_hint(exc)}") from exc
    except redis.RedisError as exc:
        raise ReadError(f"{where}: cannot connect: {_redis_hint(exc)}") from exc
    finally:
        client.close()
    if kind == b"none":
        raise ReadError(f"{where}: not found (check --stream and the database number in the --redis URL)")
    if kind != b"stream":
        raise ReadError(f"{where}: the key is a {kind.decode()}, not a stream")


# --- command line -----------------------------------------------------------------------------


def add_source_arguments(parser: argparse.ArgumentParser, *, files_option: str | None = None) -> None:
    """Add the log source arguments: FILE... (or `files_option` FILE...), --redis, --stream, --redis-password-env."""
    files_help = ("decision log files: plain, gzip, or a rotated set given by its current file "
                  "(PATH.N ... PATH.1 are read first); - reads standard input")
    if files_option is None:
        parser.add_argument("files", nargs="*", metavar="FILE", help=files_help)
    else:
        parser.add_argument(files_option, dest="files", nargs="+", action="extend", default=[], metavar="FILE",
                            help=files_help + "; repeatable")
    parser.add_argument("--redis", metavar="URL",
                        help="read the Redis stream at this URL too, such as redis://127.0.0.1:6379/0 "
                             "(rediss:// for TLS; no password in the URL)")
    parser.add_argument("--stream", metavar="KEY", help="with --redis: the stream's key, such as extauthz:decisions")
    parser.add_argument("--redis-password-env", metavar="NAME",
                        help="with --redis: the environment variable that contains the Redis password")


def reader_from_arguments(args: argparse.Namespace) -> LogReader:
    """Build the LogReader for parsed source arguments; raise ReadError when they name nothing readable."""
    if bool(args.redis) != bool(args.stream):
        raise ReadError("--redis and --stream go together: name the Redis URL and the stream's key")
    if args.redis_password_env and not args.redis:
        raise ReadError("--redis-password-env needs --redis URL --stream KEY")
    if not args.files and not args.redis:
        raise ReadError("no decision log given: pass FILE..., - for standard input, or --redis URL --stream KEY")
    if list(args.files).count(STDIN) > 1:
        raise ReadError("- (standard input) can be given once")
    redis_sources = [RedisSource(args.redis, args.stream, args.redis_password_env)] if args.redis else []
    for source in redis_sources:
        # Fail on a bad URL, password or stream key before any output.
        check_redis_stream(source)
    return LogReader(files=expand_paths(args.files), redis=redis_sources)
