"""The running service: builds every part from a validated Config, serves gRPC and HTTP, drains.

The gRPC server is grpcio's synchronous server on a thread pool. On this project's 2-core test machine
an allow-all sync server handled about 1.5 times the Checks per second of an allow-all grpc.aio
server (docs/benchmarks.md, scenario floor-aio). Health (grpc.health.v1) reports SERVING only once the
signing keys, every issuer's key set and the policies are loaded, and NOT_SERVING from the moment
draining starts.

With `server.workers` > 1, extauthz.workers starts this service once per worker process (see
`Service(worker=...)`): each worker listens on the shared `listen.grpc` port with SO_REUSEPORT and on
its own port, and serves its side listener on an ephemeral loopback port that only the supervisor
reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz.config import Address, Config, DecisionLogConfig, load_config, with_server_options
from extauthz.decision_log import DecisionLog
from extauthz.errors import ConfigError, DecisionLogError, JWKSError
from extauthz.http_listener import SideApp, SideListener
from extauthz.identity import TokenVerifier
from extauthz.jwks import IssuerKeys
from extauthz.key_sharing import KeyDirectory
from extauthz.keys import KeyRing
from extauthz.metrics import Metrics
from extauthz.mint import TokenMinter
from extauthz.pipeline import Authorizer
from extauthz.policy import load_policies, policy_files
from extauthz.policy_index import PolicySet
from extauthz.replay import ReplayGuard
from extauthz.revocation import RevocationList
from extauthz.secrets import Secrets
from extauthz.servicer import AUTHORIZATION_SERVICE, AuthorizationServicer, add_authorization_servicer
from extauthz.store import KeyNames, Store, StoreError, open_store

log = logging.getLogger(__name__)

# How often the config and policy files are checked for changes, in seconds.
RELOAD_POLL_INTERVAL = 1.0
# Configuration sections that a reload does not apply.
RESTART_SECTIONS = ("listen", "token", "decision_log", "limits", "server", "store", "secrets")
# Address of a worker's side listener, to which only the supervisor connects.
WORKER_HTTP = Address("127.0.0.1", 0)


def worker_path(path: Path, worker: int) -> Path:
    """Return worker `worker`'s own file for a file that one process would write, such as a decision log.

    `decisions.jsonl` becomes `decisions.worker-1.jsonl`.
    """
    return path.with_name(f"{path.stem}.worker-{worker}{path.suffix}")


def worker_decision_log(config: DecisionLogConfig, worker: int) -> DecisionLogConfig:
    """Return the decision log configuration of one worker: its own file for a file sink, its own spool folder.

    With the stdout sink, every worker writes to a pipe that the supervisor copies to its standard output.
    """
    changes: dict[str, Path] = {}
    if config.path is not None:
        changes["path"] = worker_path(config.path, worker)
    if config.spool_path is not None:
        # A spool folder belongs to one writer: it holds that writer's chain, under a lock.
        changes["spool_path"] = config.spool_path / f"worker-{worker}"
    return dataclasses.replace(config, **changes)


def load_policy_set(config: Config, secret_names: frozenset[str] | None = None) -> PolicySet:
    """Load the configured policies; injected secrets must be among `secret_names` (default: the config's)."""
    if secret_names is None:
        secret_names = frozenset(secret.name for secret in config.secrets)
    loaded = load_policies(config.policies.paths, config.policies.provider, config.token.ttl, secret_names)
    for policy in loaded:
        for injection in policy.requirements.injections:
            if injection.header == config.token.header:
                raise ConfigError(policy.origin, "metadata.annotations[extauthz.io/inject-header]",
                                  f"{injection.header} carries the minted token (token.header)",
                                  "inject the secret into another header")
    policies = PolicySet(loaded, config.policies.root_namespace)
    if not len(policies):
        log.warning("no CUSTOM policy for this provider was found: every request will be denied",
                    extra={"provider": config.policies.provider})
    return policies


def build_authorizer(config: Config, decision_log: DecisionLog,
                     issuer_keys: dict[str, IssuerKeys] | None = None,
                     store: Store | None = None, metrics: Metrics | None = None,
                     secrets: Secrets | None = None) -> tuple[Authorizer, KeyRing]:
    """Load policies, issuers' key sets and signing keys, and open the store.

    Raises ConfigError, JWKSError or StoreError when one of them cannot be set up.
    """
    policies = load_policy_set(config)

    if issuer_keys is None:
        issuer_keys = {issuer.issuer: IssuerKeys(issuer) for issuer in config.issuers}
        for keys in issuer_keys.values():
            keys.load()

    if store is None:
        store = open_store(config.store)
    key_ring = KeyRing(config.token.signing, config.token.ttl)
    authorizer = Authorizer(
        verifier=TokenVerifier(issuer_keys, config.limits.token_cache_size),
        policies=policies,
        minter=TokenMinter(config.token, key_ring, time.time),
        decision_log=decision_log,
        revocations=RevocationList(store, config.store.max_staleness),
        replay=ReplayGuard(store, KeyNames(config.store.key_prefix)),
        on_store_error=config.store.on_error,
        max_token_bytes=config.limits.max_token_bytes,
        max_path_bytes=config.limits.max_path_bytes,
        metrics=metrics,
        secrets=secrets if secrets is not None else Secrets(config.secrets, str(config.source)),
    )
    return authorizer, key_ring


class Service:
    """extauthz serving one configuration: gRPC Check and health, plus the HTTP side listener.

    `worker` is the index of this worker process when `server.workers` > 1, else None.
    `server_options` are the command-line overrides of the `server` section, applied again on reload.
    """

    def __init__(self, config: Config, decision_log: DecisionLog | None = None, worker: int | None = None,
                 server_options: dict[str, object] | None = None):
        self.config = config
        self.worker = worker
        self.server_options = server_options or {}
        self.metrics = Metrics()
        if decision_log is None:
            log_config = config.decision_log if worker is None else worker_decision_log(config.decision_log, worker)
            try:
                decision_log = DecisionLog(log_config, metrics=self.metrics, start=False)
            except DecisionLogError as exc:
                raise ConfigError(str(config.source), exc.key, exc.message, exc.fix) from exc
        self.decision_log = decision_log
        try:
            self._build(config, worker)
        except BaseException:
            self.decision_log.close()
            raise

    def _build(self, config: Config, worker: int | None) -> None:
        self.issuer_keys = self._load_issuers(config, {}, fetch_must_succeed=False)
        try:
            self.store = open_store(config.store)
        except StoreError as exc:
            raise ConfigError(str(config.source), "store", str(exc)) from exc
        self.secrets = Secrets(config.secrets, str(config.source))
        self.authorizer, self.key_ring = build_authorizer(config, self.decision_log, self.issuer_keys, self.store,
                                                          self.metrics, self.secrets)
        self.revocations = self.authorizer.revocations
        self.key_directory = KeyDirectory(self.store, self.key_ring)
        self.draining = False

        self.health = health.HealthServicer()
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.threads, thread_name_prefix="check"),
            maximum_concurrent_rpcs=config.server.threads + config.server.max_pending,
            # Only workers share a port. One process alone must fail on a port that another process holds.
            options=[("grpc.so_reuseport", 0 if worker is None else 1)],
        )
        add_authorization_servicer(AuthorizationServicer(self.authorizer, config.token.header), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

        self.grpc_port = self._add_grpc_port("listen.grpc", config.listen.grpc)
        # The worker's own port, which lets Envoy send Checks to each worker in turn.
        self.worker_grpc_port = None
        if worker is not None:
            self.worker_grpc_port = self._add_grpc_port("listen.worker_grpc", config.listen.worker_address(worker))
        http_address = config.listen.http if worker is None else WORKER_HTTP
        try:
            self.http = SideListener(http_address,
                                     SideApp(self.key_directory.jwks, self.is_ready, self.store_state,
                                             self.metrics.render, self.decision_log.jwks))
        except OSError as exc:
            self.grpc_server.stop(None)
            raise ConfigError(str(config.source), "listen.http", f"cannot listen on {http_address}: "
                              f"{exc.strerror}", "stop whatever uses that port or choose another") from exc
        self.http_port = self.http.port
        self._ready_watch = threading.Thread(target=self._watch_readiness, name="readiness", daemon=True)
        self._reload_requested = threading.Event()
        self._stopping = threading.Event()
        self._files = self._file_fingerprint(config)
        self._reload_lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch_files, name="reload-watch", daemon=True)

    def _add_grpc_port(self, key: str, address: Address) -> int:
        try:
            port = self.grpc_server.add_insecure_port(str(address))
        except RuntimeError as exc:
            raise ConfigError(str(self.config.source), key, f"cannot listen on {address}",
                              "stop whatever uses that port or choose another") from exc
        return port

    def _load_issuers(self, config: Config, current: dict[str, IssuerKeys],
                      fetch_must_succeed: bool) -> dict[str, IssuerKeys]:
        """Return loaded key sets for the configured issuers, reusing those whose settings did not change.

        A jwks_file must parse. A jwks_uri that cannot be fetched is retried in the background at
        start-up, but makes a reload fail.
        """
        issuers: dict[str, IssuerKeys] = {}
        for index, issuer in enumerate(config.issuers):
            existing = current.get(issuer.issuer)
            # A jwks_file is read again on every reload, so a key removed from it stops being trusted.
            if existing is not None and existing.config == issuer and issuer.jwks_file is None:
                issuers[issuer.issuer] = existing
                continue
            keys = IssuerKeys(issuer, on_fetch=lambda result: self.metrics.jwks_fetches.labels(result).inc())
            try:
                keys.load()
            except JWKSError as exc:
                raise ConfigError(str(config.source), f"issuers[{index}].jwks_file", str(exc),
                                  "write the issuer's public keys there as a JWKS JSON document") from exc
            if fetch_must_succeed and not keys.loaded:
                raise ConfigError(str(config.source), f"issuers[{index}].jwks_uri",
                                  f"cannot fetch the JWKS of {issuer.issuer}",
                                  "check jwks_uri and that the issuer is reachable")
            issuers[issuer.issuer] = keys
        return issuers

    @staticmethod
    def _file_fingerprint(config: Config) -> tuple:
        """Return what identifies the current content of the config, JWKS and policy files.

        Files are resolved through symlinks, so the symlink swap that Kubernetes uses to update a
        mounted ConfigMap counts as a change.
        """
        entries = []
        jwks_files = [issuer.jwks_file for issuer in config.issuers if issuer.jwks_file is not None]
        for path in [config.source, *jwks_files, *policy_files(config.policies.paths)]:
            try:
                real = os.path.realpath(path)
                stat = os.stat(real)
                entries.append((str(path), real, stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:
                entries.append((str(path), None, None, None, None))
        return tuple(entries)

    def request_reload(self) -> None:
        """Ask the watcher thread to reload now (SIGHUP does this)."""
        self._reload_requested.set()

    def _watch_files(self) -> None:
        while not self._stopping.is_set():
            requested = self._reload_requested.wait(timeout=RELOAD_POLL_INTERVAL)
            if requested:
                self._reload_requested.clear()
            if self._stopping.is_set():
                return
            try:
                fingerprint = self._file_fingerprint(self.config)
            except (ConfigError, OSError) as exc:
                log.error("cannot read the policy files", extra={"error": str(exc)})
                continue
            if requested or fingerprint != self._files:
                self._files = fingerprint
                try:
                    self.reload()
                except Exception:  # noqa: BLE001 - the watcher must outlive any one bad reload
                    self.metrics.policy_reloads.labels("failure").inc()
                    log.exception("reload failed; the previous configuration keeps serving")

    def reload(self) -> bool:
        """Validate the configuration and policies again and swap them in whole.

        On any error the previous snapshot keeps serving; the error is logged and counted. Only
        `issuers` and `policies` change without a restart: a change to any other section is logged.
        """
        with self._reload_lock:
            try:
                config = with_server_options(load_config(self.config.source), self.server_options)
                # Secrets load only at start-up, so policies may inject only the secrets loaded then.
                policies = load_policy_set(config, self.secrets.names)
                issuer_keys = self._load_issuers(config, self.issuer_keys, fetch_must_succeed=True)
            # A file that is not UTF-8 raises UnicodeDecodeError rather than ConfigError. Uncaught, it would
            # end the watcher thread and with it every later reload.
            except (ConfigError, JWKSError, UnicodeDecodeError) as exc:
                self.metrics.policy_reloads.labels("failure").inc()
                log.error("reload rejected; the previous configuration keeps serving", extra={"error": str(exc)})
                return False

            restart_needed = [name for name in RESTART_SECTIONS if getattr(config, name) != getattr(self.config, name)]
            if restart_needed:
                log.warning("configuration sections changed that apply only after a restart",
                            extra={"sections": restart_needed})
            if issuer_keys == self.issuer_keys:
                verifier = self.authorizer.verifier
            else:
                verifier = TokenVerifier(issuer_keys, self.config.limits.token_cache_size)
            snapshot = self.authorizer.replace_snapshot(policies, verifier)

            for name, keys in self.issuer_keys.items():
                if issuer_keys.get(name) is not keys:
                    keys.stop()
            for keys in issuer_keys.values():
                keys.start()
            self.issuer_keys = issuer_keys
            self.config = dataclasses.replace(self.config, issuers=config.issuers, policies=config.policies)
            self.metrics.policy_reloads.labels("success").inc()
            log.info("reloaded", extra={"generation": snapshot.generation, "policies": len(policies),
                                        "issuers": len(issuer_keys)})
            return True

    def is_ready(self) -> bool:
        return not self.draining and all(keys.loaded for keys in self.issuer_keys.values())

    def store_state(self) -> str:
        """Return `ok` while the revocation copy is fresh, else `unavailable`."""
        return "ok" if self.revocations.fresh else "unavailable"

    def _set_health(self, status: int) -> None:
        for service in ("", AUTHORIZATION_SERVICE):
            self.health.set(service, status)

    def _watch_readiness(self) -> None:
        while not self.is_ready():
            if self.draining:
                return
            time.sleep(0.2)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", extra={"grpc_port": self.grpc_port, "http_port": self.http_port})

    def start(self) -> None:
        self.decision_log.start()
        for keys in self.issuer_keys.values():
            keys.start()
        self.revocations.sync()
        self.revocations.start()
        self.secrets.start()
        self.key_directory.start()
        self.grpc_server.start()
        self._watcher.start()
        self.http.start()
        listeners = {"grpc": f"{self.config.listen.grpc.host}:{self.grpc_port}",
                     "http": f"{self.http.host}:{self.http_port}"}
        if self.worker is not None:
            listeners["worker"] = self.worker
            listeners["worker_grpc"] = f"{self.config.listen.worker_grpc.host}:{self.worker_grpc_port}"
        log.info("listening", extra={**listeners,
                                     "policies": len(self.authorizer.policies), "store": self.store.name,
                                     "replica_id": self.key_directory.replica_id})
        self._ready_watch.start()

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, keep serving for `server.shutdown_delay`, then drain within `grace` seconds.

        The delay gives Kubernetes and Envoy time to stop sending new Checks. grpcio cancels calls that
        are queued but not yet running when the server stops, so without the delay a busy replica's
        last queued Checks end as errors, which Envoy turns into its status_on_error.
        """
        grace = self.config.server.drain_timeout if grace is None else grace
        self.draining = True
        self._stopping.set()
        self._reload_requested.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.server.shutdown_delay:
            log.info("shutting down after a delay", extra={"delay_s": self.config.server.shutdown_delay})
            time.sleep(self.config.server.shutdown_delay)
        log.info("draining", extra={"grace_s": grace})
        self.grpc_server.stop(grace).wait()
        self.http.stop()
        for keys in self.issuer_keys.values():
            keys.stop()
        self.revocations.stop()
        self.secrets.stop()
        self.key_directory.stop()
        self.store.close()
        # Last, once no Check runs: the queue, the spool and the shutdown checkpoint go out now.
        self.decision_log.close()
        log.info("stopped")
