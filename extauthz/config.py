"""The YAML configuration file, validated once at start-up into immutable objects.

Every error names the file, the key (as a dotted path) and the fix. Unknown keys are errors with a
"did you mean" suggestion. Relative paths resolve against the folder of the configuration file.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extauthz.errors import ConfigError
from extauthz.redaction import RECORDED_CLAIMS, header_refusal

# Asymmetric algorithms only: HMAC would let anyone holding the issuer's public key forge tokens.
VERIFY_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA")
SIGNING_ALGORITHMS = ("ES256", "EdDSA")

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# An upper bound on server.workers that catches a typo such as 40 for 4.
MAX_WORKERS = 64
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


def parse_duration(text: object) -> float:
    """Parse `500ms`, `30s`, `5m`, `6h` or a sum such as `1h30m` into seconds; raise ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration with a unit (ms, s, m or h), such as 30s, got {text!r}")
    compact = text.strip()
    if not _DURATION.match(compact):
        raise ValueError(f"invalid duration {text!r}: write a number with ms, s, m or h, such as 30s or 1h30m")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(compact))


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    grpc: Address
    http: Address
    # With server.workers > 1, worker i also listens on this host at port worker_grpc.port + i.
    worker_grpc: Address | None = None

    def worker_address(self, worker: int) -> Address:
        """Return the gRPC address that only worker `worker` listens on."""
        assert self.worker_grpc is not None
        return Address(self.worker_grpc.host, self.worker_grpc.port + worker)


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_file: Path | None
    jwks_uri: str | None
    jwks_ca_file: Path | None
    max_token_lifetime: float | None
    leeway: float
    jwks_refresh_interval: float
    jwks_min_refresh_interval: float
    jwks_timeout: float


@dataclass(frozen=True, slots=True)
class PoliciesConfig:
    provider: str
    paths: tuple[Path, ...]
    root_namespace: str


@dataclass(frozen=True, slots=True)
class SigningConfig:
    algorithm: str
    rotate_every: float
    key_file: Path | None


@dataclass(frozen=True, slots=True)
class TokenConfig:
    issuer: str
    header: str
    ttl: float
    signing: SigningConfig


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_token_bytes: int
    max_path_bytes: int
    token_cache_size: int


@dataclass(frozen=True, slots=True)
class ServerConfig:
    threads: int
    max_pending: int
    drain_timeout: float
    shutdown_delay: float
    workers: int = 1
    cpu_affinity: bool = False


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    cluster: bool
    key_prefix: str
    timeout: float
    retries: int
    on_error: str
    max_staleness: float
    password_env: str | None
    tls_ca_file: Path | None

    @property
    def shared(self) -> bool:
        return not self.url.startswith("memory://")


@dataclass(frozen=True, slots=True)
class DecisionLogConfig:
    sink: str  # stdout, file or redis
    path: Path | None = None  # the file of `file:PATH`
    file_max_bytes: int = 100 * 1024 * 1024
    file_backups: int = 10
    redis_stream: str = "extauthz:decisions"
    redis_maxlen: int = 1_000_000
    spool_path: Path | None = None  # a folder for a file spool; None keeps the spool in memory
    spool_max_records: int = 100_000
    on_full: str = "deny"
    max_wait_ms: int = 50
    checkpoint_interval: float = 60.0
    signing_key_file: Path | None = None
    # End-user claims to record in user_claims, beyond the ones with a field of their own.
    claims: tuple[str, ...] = ()
    # Request headers (lower-case names) to record as "sha256:<hex>", and to record in clear.
    headers: tuple[str, ...] = ()
    clear_headers: tuple[str, ...] = ()
    # The store's Redis connection settings, which the redis sink uses; set only for that sink.
    store: StoreConfig | None = None


@dataclass(frozen=True, slots=True)
class SecretConfig:
    """The source of one named secret: a file (re-read when it changes) or an environment variable."""

    name: str
    file: Path | None
    env: str | None


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    listen: ListenConfig
    issuers: tuple[IssuerConfig, ...]
    policies: PoliciesConfig
    token: TokenConfig
    decision_log: DecisionLogConfig
    limits: LimitsConfig
    server: ServerConfig
    store: StoreConfig
    secrets: tuple[SecretConfig, ...] = ()


class _Section:
    """A mapping being read: tracks the dotted key path and rejects every key that no reader requested."""

    def __init__(self, source: str, base: Path, key: str, data: object):
        self.source = source
        self.base = base
        self.key = key
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, key or "(top level)", f"expected a mapping, got {_kind(data)}")
        self.data = data
        self.known: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def error(self, name: str, message: str, fix: str | None = None) -> ConfigError:
        return ConfigError(self.source, self.path(name), message, fix)

    def raw(self, name: str, default: object = ..., required: bool = False) -> object:
        self.known.add(name)
        if name in self.data and self.data[name] is not None:
            return self.data[name]
        if required:
            # A present key with a similar name is probably this key misspelt, so the fix names it.
            close = difflib.get_close_matches(name, [str(key) for key in self.data if key != name], n=1)
            fix = (f"did you mean {self.path(name)!r} instead of {self.path(close[0])!r}?" if close
                   else f"set {self.path(name)}")
            raise self.error(name, "missing", fix)
        return default

    def section(self, name: str) -> _Section:
        return _Section(self.source, self.base, self.path(name), self.raw(name, {}))

    def string(self, name: str, default: str | None = None, required: bool = False) -> str:
        value = self.raw(name, default, required)
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def integer(self, name: str, default: int, minimum: int, maximum: int, fix: str | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.error(name, f"expected an integer from {minimum} to {maximum}, got {value!r}", fix)
        return value

    def duration(self, name: str, default: str | None = None, required: bool = False,
                 minimum: float = 0.0) -> float:
        value = self.raw(name, default, required)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from exc
        if seconds < minimum:
            raise self.error(name, f"must be at least {minimum:g}s, got {value!r}")
        return seconds

    def strings(self, name: str, required: bool = False) -> tuple[str, ...]:
        value = self.raw(name, [], required)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self.error(name, f"expected a list of non-empty strings, got {value!r}")
        if required and not value:
            raise self.error(name, "must not be empty")
        return tuple(value)

    def file_path(self, name: str, must_exist: bool = True, hint: str | None = None) -> Path | None:
        value = self.raw(name, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(name, f"expected a file path, got {value!r}")
        path = Path(value)
        if not path.is_absolute():
            path = self.base / path
        if must_exist and not path.exists():
            raise self.error(name, f"file not found: {path}", hint)
        return path

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if value not in choices:
            raise self.error(name, f"invalid value {value!r}", f"use one of {', '.join(choices)}")
        return value

    def finish(self) -> None:
        for name in self.data:
            if name in self.known:
                continue
            suggestion = difflib.get_close_matches(str(name), sorted(self.known), n=1)
            fix = f"did you mean {self.path(suggestion[0])!r}?" if suggestion else (
                f"known keys: {', '.join(sorted(self.known))}")
            raise self.error(str(name), "unknown key", fix)


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _address(section: _Section, name: str, default: str) -> Address:
    text = section.raw(name, default)
    if isinstance(text, int) or not isinstance(text, str):
        raise section.error(name, f"expected HOST:PORT, got {text!r}", "write it as 127.0.0.1:9191")
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise section.error(name, f"invalid address {text!r}", "write it as HOST:PORT, such as 127.0.0.1:9191")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise section.error(name, f"invalid IP address {host!r}", "use an IP address or localhost") from exc
    return Address(host, int(port_text))


def _listen(top: _Section) -> ListenConfig:
    section = top.section("listen")
    worker_grpc = None if section.raw("worker_grpc", None) is None else _address(section, "worker_grpc", "")
    listen = ListenConfig(
        grpc=_address(section, "grpc", "127.0.0.1:9191"),
        http=_address(section, "http", "127.0.0.1:9192"),
        worker_grpc=worker_grpc,
    )
    if worker_grpc is not None and worker_grpc.port == 0:
        raise section.error("worker_grpc", "port 0 is not allowed: Envoy must know every worker's port",
                            "name the first worker's port, such as 127.0.0.1:9291")
    section.finish()
    return listen


def _issuer(top: _Section, index: int, data: object) -> IssuerConfig:
    section = _Section(top.source, top.base, f"issuers[{index}]", data)
    issuer = section.string("issuer", required=True)
    audiences = section.strings("audiences", required=True)
    algorithms = section.strings("algorithms", required=True)
    for algorithm in algorithms:
        if algorithm not in VERIFY_ALGORITHMS:
            raise section.error("algorithms", f"unsupported algorithm {algorithm!r}",
                                f"use asymmetric algorithms: {', '.join(VERIFY_ALGORITHMS)}")

    jwks_file = section.file_path("jwks_file", hint="write the issuer's public JWKS to that file")
    jwks_uri = section.raw("jwks_uri", None)
    if jwks_uri is not None and (not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://")):
        raise section.error("jwks_uri", f"invalid URI {jwks_uri!r}", "use an https:// URI")
    if (jwks_file is None) == (jwks_uri is None):
        raise section.error("jwks_file", "set exactly one of jwks_file and jwks_uri")
    jwks_ca_file = section.file_path("jwks_ca_file")

    lifetime_text = section.raw("max_token_lifetime", None)
    max_token_lifetime = None if lifetime_text is None else section.duration("max_token_lifetime", minimum=1)
    result = IssuerConfig(
        issuer=issuer,
        audiences=audiences,
        algorithms=algorithms,
        jwks_file=jwks_file,
        jwks_uri=jwks_uri,
        jwks_ca_file=jwks_ca_file,
        max_token_lifetime=max_token_lifetime,
        leeway=section.duration("leeway", "30s"),
        jwks_refresh_interval=section.duration("jwks_refresh_interval", "5m", minimum=1),
        jwks_min_refresh_interval=section.duration("jwks_min_refresh_interval", "30s"),
        jwks_timeout=section.duration("jwks_timeout", "2s", minimum=0.01),
    )
    section.finish()
    return result


def _issuers(top: _Section) -> tuple[IssuerConfig, ...]:
    data = top.raw("issuers", [])
    if not isinstance(data, list):
        raise top.error("issuers", f"expected a list, got {_kind(data)}")
    issuers = tuple(_issuer(top, index, item) for index, item in enumerate(data))
    seen: set[str] = set()
    for index, issuer in enumerate(issuers):
        if issuer.issuer in seen:
            raise top.error(f"issuers[{index}].issuer", f"duplicate issuer {issuer.issuer!r}")
        seen.add(issuer.issuer)
    return issuers


def _policies(top: _Section) -> PoliciesConfig:
    section = top.section("policies")
    paths = []
    for text in section.strings("paths", required=True):
        path = Path(text) if Path(text).is_absolute() else section.base / text
        if not path.exists():
            raise section.error("paths", f"not found: {path}", "list existing policy files or folders")
        paths.append(path)
    policies = PoliciesConfig(
        provider=section.string("provider", "extauthz"),
        paths=tuple(paths),
        root_namespace=section.string("root_namespace", "istio-system"),
    )
    section.finish()
    return policies


def _token(top: _Section) -> TokenConfig:
    section = top.section("token")
    header = section.string("header", "txn-token").lower()
    if not _HEADER_NAME.match(header) or header in ("authorization", "host", ":authority"):
        raise section.error("header", f"invalid header name {header!r}", "use a name such as txn-token")
    signing_section = section.section("signing")
    signing = SigningConfig(
        algorithm=signing_section.choice("algorithm", "ES256", SIGNING_ALGORITHMS),
        rotate_every=signing_section.duration("rotate_every", "6h", minimum=60),
        key_file=signing_section.file_path("key_file", hint="write a PEM private key there, or drop key_file"),
    )
    signing_section.finish()
    token = TokenConfig(
        issuer=section.string("issuer", required=True),
        header=header,
        ttl=section.duration("ttl", "30s", minimum=1),
        signing=signing,
    )
    if token.ttl > 3600:
        raise section.error("ttl", "must be at most 1h", "per-request tokens should live seconds, such as 30s")
    section.finish()
    return token


def _decision_log(top: _Section) -> DecisionLogConfig:
    section = top.section("decision_log")
    sink, path = _decision_log_sink(section)
    recorded = _recorded_fields(section)

    file_section = section.section("file")
    file_max_bytes = file_section.integer("max_bytes", 100 * 1024 * 1024, 4096, 2**40,
                                          "write the size in bytes, such as 104857600 for 100 MiB")
    file_backups = file_section.integer("backups", 10, 1, 1000)
    file_section.finish()

    redis_section = section.section("redis")
    redis_stream = redis_section.string("stream", "extauthz:decisions")
    redis_maxlen = redis_section.integer("maxlen", 1_000_000, 1000, 1_000_000_000,
                                         "write the number of entries the stream keeps, such as 1000000")
    redis_section.finish()

    spool_section = section.section("spool")
    spool_path = _spool_folder(spool_section)
    spool_max_records = spool_section.integer("max_records", 100_000, 1, 100_000_000)
    spool_section.finish()

    config = DecisionLogConfig(
        sink=sink,
        path=path,
        file_max_bytes=file_max_bytes,
        file_backups=file_backups,
        redis_stream=redis_stream,
        redis_maxlen=redis_maxlen,
        spool_path=spool_path,
        spool_max_records=spool_max_records,
        on_full=section.choice("on_full", "deny", ("deny", "drop")),
        max_wait_ms=section.integer("max_wait_ms", 50, 0, 1000,
                                    "a Check must hand its record over well within Envoy's Check timeout"),
        checkpoint_interval=_seconds(section, "checkpoint_interval", 60, 1, 86_400),
        signing_key_file=section.file_path("signing_key_file",
                                           hint="write a key there with `extauthz audit keygen FILE`, or drop "
                                                "signing_key_file to generate one at start"),
        **recorded,
    )
    section.finish()
    return config


def _decision_log_sink(section: _Section) -> tuple[str, Path | None]:
    sink = section.string("sink", "stdout")
    if sink in ("stdout", "redis"):
        return sink, None
    if sink.startswith("file:") and len(sink) > len("file:"):
        path = Path(sink[len("file:"):])
        if not path.is_absolute():
            path = section.base / path
        if not path.parent.is_dir():
            raise section.error("sink", f"folder not found: {path.parent}", "create it or change the path")
        return "file", path
    raise section.error("sink", f"invalid sink {sink!r}", "use stdout, file:PATH or redis")


def _spool_folder(section: _Section) -> Path | None:
    path = section.file_path("path", must_exist=False)
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise section.error("path", f"not a folder: {path}", "name a folder for the spool files, or drop path "
                            "to spool in memory")
    if not path.exists() and not path.parent.is_dir():
        raise section.error("path", f"folder not found: {path.parent}", "create it or change the path")
    return path


def _seconds(section: _Section, name: str, default: int, minimum: int, maximum: int) -> float:
    """Read a number of seconds: an integer such as 60, or a duration such as 60s or 5m."""
    value = section.raw(name, default)
    if isinstance(value, str):
        seconds = section.duration(name)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise section.error(name, f"expected a number of seconds, such as 60, got {value!r}")
    if not minimum <= seconds <= maximum:
        raise section.error(name, f"expected {minimum} to {maximum} seconds, got {value!r}")
    return seconds


def _recorded_fields(section: _Section) -> dict[str, tuple[str, ...]]:
    """Read decision_log.claims, .headers and .clear_headers: what a record takes from the token and request."""
    claims = section.strings("claims")
    for index, name in enumerate(claims):
        if name in RECORDED_CLAIMS:
            raise section.error("claims", f"claim {name!r} is always recorded, as {RECORDED_CLAIMS[name]}",
                                f"remove {name!r} from decision_log.claims")
        if name in claims[:index]:
            raise section.error("claims", f"claim {name!r} is listed twice", "list each claim once")

    lists = {"headers": _recorded_header_names(section, "headers"),
             "clear_headers": _recorded_header_names(section, "clear_headers")}
    for name in lists["clear_headers"]:
        if name in lists["headers"]:
            raise section.error("clear_headers", f"header {name!r} is also listed in decision_log.headers",
                                "list it in headers to record its hash, or in clear_headers to record its value")
    return {"claims": claims, **lists}


def _recorded_header_names(section: _Section, key: str) -> tuple[str, ...]:
    names: list[str] = []
    for text in section.strings(key):
        name = text.strip().lower()
        if name.startswith(":"):
            raise section.error(key, f"pseudo-header {name!r} cannot be recorded",
                                "the record has host, method and path already; remove it")
        if not _HEADER_NAME.match(name):
            raise section.error(key, f"invalid header name {text!r}", "use a header name such as x-tenant-id")
        refusal = header_refusal(name)
        if refusal is not None:
            raise section.error(key, refusal, f"remove {name!r} from decision_log.{key}")
        if name in names:
            raise section.error(key, f"header {name!r} is listed twice", "list each header once")
        names.append(name)
    return tuple(names)


def _limits(top: _Section) -> LimitsConfig:
    section = top.section("limits")
    limits = LimitsConfig(
        max_token_bytes=section.integer("max_token_bytes", 8192, 256, 65536),
        max_path_bytes=section.integer("max_path_bytes", 8192, 256, 65536),
        token_cache_size=section.integer("token_cache_size", 10000, 0, 10_000_000),
    )
    section.finish()
    return limits


def _server(top: _Section) -> ServerConfig:
    section = top.section("server")
    server = ServerConfig(
        threads=section.integer("threads", 16, 1, 1024),
        max_pending=section.integer("max_pending", 256, 1, 100_000),
        drain_timeout=section.duration("drain_timeout", "10s"),
        shutdown_delay=section.duration("shutdown_delay", "0s"),
        workers=section.integer("workers", 1, 1, MAX_WORKERS),
        cpu_affinity=_boolean(section, "cpu_affinity", False),
    )
    section.finish()
    return server


def _boolean(section: _Section, name: str, default: bool) -> bool:
    value = section.raw(name, default)
    if not isinstance(value, bool):
        raise section.error(name, f"expected true or false, got {value!r}")
    return value


_STORE_SCHEMES = ("memory://", "redis://", "rediss://", "redis+sentinel://", "rediss+sentinel://")


def _store(top: _Section) -> StoreConfig:
    section = top.section("store")
    url = section.string("url", "memory://")
    if not url.startswith(_STORE_SCHEMES):
        raise section.error("url", "unsupported store URL scheme",
                            f"use one of {', '.join(_STORE_SCHEMES)}")
    if "@" in url and ":" in url.split("@", 1)[0].split("//", 1)[-1]:
        raise section.error("url", "a password in store.url would end up in logs and ConfigMaps",
                            "put it in an environment variable and name it in store.password_env")
    cluster = section.raw("cluster", False)
    if not isinstance(cluster, bool):
        raise section.error("cluster", f"expected true or false, got {cluster!r}")
    if cluster and not url.startswith(("redis://", "rediss://")):
        raise section.error("cluster", "Redis Cluster needs a redis:// or rediss:// URL of one cluster node")
    store = StoreConfig(
        url=url,
        cluster=cluster,
        key_prefix=section.string("key_prefix", "extauthz:"),
        timeout=section.duration("timeout", "50ms", minimum=0.001),
        retries=section.integer("retries", 1, 0, 5),
        on_error=section.choice("on_error", "deny", ("deny", "allow_standard")),
        max_staleness=section.duration("max_staleness", "1s", minimum=0.1),
        password_env=section.raw("password_env", None),  # type: ignore[arg-type]
        tls_ca_file=section.file_path("tls_ca_file"),
    )
    if store.password_env is not None and not isinstance(store.password_env, str):
        raise section.error("password_env", "expected the name of an environment variable")
    if store.timeout * (store.retries + 1) > 0.2:
        raise section.error("timeout", "timeout x (retries + 1) exceeds 200ms, Envoy's usual Check deadline",
                            "lower store.timeout or store.retries")
    section.finish()
    return store


_SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _secrets(top: _Section) -> tuple[SecretConfig, ...]:
    section = top.section("secrets")
    secrets = []
    for name in section.data:
        section.known.add(name)
        if not isinstance(name, str) or not _SECRET_NAME.match(name):
            raise section.error(str(name), "invalid secret name",
                                "use letters, digits, '.', '_' and '-', starting with a letter or digit")
        entry = _Section(section.source, section.base, section.path(name), section.data[name])
        file = entry.file_path("file", hint="mount the secret there, or fix the path")
        env = entry.raw("env", None)
        if env is not None and (not isinstance(env, str) or not _ENV_NAME.match(env)):
            raise entry.error("env", f"invalid environment variable name {env!r}")
        if (file is None) == (env is None):
            raise entry.error("file", "set exactly one of file and env")
        entry.finish()
        secrets.append(SecretConfig(name=name, file=file, env=env))
    return tuple(secrets)


_SECTIONS: dict[str, Callable[[_Section], Any]] = {
    "listen": _listen,
    "issuers": _issuers,
    "policies": _policies,
    "token": _token,
    "decision_log": _decision_log,
    "limits": _limits,
    "server": _server,
    "store": _store,
    "secrets": _secrets,
}


def load_config(path: str | Path) -> Config:
    """Read and validate the configuration file; raise ConfigError naming the key and the fix."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(source), "", f"cannot read the file: {exc.strerror}", "pass --config FILE") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(source), "", f"not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # PyYAML raises ValueError for values such as the date 2024-02-30.
        raise ConfigError(str(source), "", f"invalid YAML: {exc}") from exc

    top = _Section(str(source), source.resolve().parent, "", data)
    # Check the top-level keys first, because a misspelt section would otherwise be reported as a missing key
    # inside the section.
    top.known.update(_SECTIONS)
    top.finish()
    values = {name: read(top) for name, read in _SECTIONS.items()}

    config = Config(source=source, **values)
    if config.decision_log.sink == "redis":
        if not config.store.shared:
            raise ConfigError(str(source), "decision_log.sink", "the redis sink writes to the Redis of store.url, "
                              f"which is {config.store.url}",
                              "set store.url to redis://HOST:PORT/DB (or Sentinel or Cluster), or use stdout or "
                              "file:PATH")
        config = dataclasses.replace(config, decision_log=dataclasses.replace(config.decision_log,
                                                                               store=config.store))
    for index, issuer in enumerate(config.issuers):
        if issuer.issuer == config.token.issuer:
            raise ConfigError(str(source), f"issuers[{index}].issuer",
                              "an end-user issuer must differ from token.issuer",
                              "give the minted tokens their own issuer")
    for key in ("headers", "clear_headers"):
        if config.token.header in getattr(config.decision_log, key):
            raise ConfigError(str(source), f"decision_log.{key}",
                              f"{config.token.header} carries the minted token (token.header) and is never recorded",
                              f"remove {config.token.header!r} from decision_log.{key}")
    return config


def with_server_options(config: Config, options: dict[str, Any]) -> Config:
    """Return `config` with command-line values of the `server` section (`workers`, `cpu_affinity`) applied."""
    if not options:
        return config
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **options))


def check_workers(config: Config) -> None:
    """Raise ConfigError unless the configuration can run `server.workers` worker processes.

    Only `extauthz serve` and `extauthz envoy-config` need this, after `--workers` and `--cpu-affinity`
    have been applied, so load_config does not call it.
    """
    workers = config.server.workers
    if workers == 1:
        return
    source = str(config.source)
    if not config.store.shared:
        raise ConfigError(source, "store.url",
                          f"memory:// is private to each process, so {workers} workers would each keep their own "
                          "revocations and one-time-token claims",
                          "set store.url to a Redis that the workers share, such as redis://127.0.0.1:6379/0, "
                          "or run one worker")
    listen = config.listen
    if listen.worker_grpc is None:
        raise ConfigError(source, "listen.worker_grpc",
                          f"missing: each of the {workers} workers needs its own gRPC port, so that Envoy can "
                          "spread Checks over them",
                          "set listen.worker_grpc to the first worker's address, such as 127.0.0.1:9291 "
                          "(worker i listens on that port + i)")
    if listen.grpc.port == 0:
        raise ConfigError(source, "listen.grpc", f"port 0 picks a different port in each of the {workers} workers",
                          "name a port, such as 127.0.0.1:9191")
    first = listen.worker_grpc.port
    last = first + workers - 1
    if last > 65535:
        raise ConfigError(source, "listen.worker_grpc", f"{workers} workers from port {first} would need port {last}",
                          "choose a lower first port")
    for key, address in (("listen.grpc", listen.grpc), ("listen.http", listen.http)):
        if first <= address.port <= last:
            raise ConfigError(source, "listen.worker_grpc",
                              f"the workers' ports {first}-{last} include {key} port {address.port}",
                              "choose a first port whose range leaves the other listeners out")
