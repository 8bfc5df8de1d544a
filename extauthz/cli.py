"""Command line: `extauthz serve`, policy and audit tools, and the development helpers under `extauthz dev`."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

from extauthz.config import parse_duration
from extauthz.errors import ConfigError, JWKSError

log = logging.getLogger("extauthz")

EXIT_CONFIG = 2
# Seconds between checks of the signals that `serve` received.
SIGNAL_POLL_INTERVAL = 0.2
# Seconds one store command of `revoke` and `revocations` may take.
ADMIN_STORE_TIMEOUT = 2.0
# How many locations of records without the chain envelope `audit verify` lists.
SHOWN_LOCATIONS = 5


def _serve(args: argparse.Namespace) -> int:
    from extauthz.config import check_workers, load_config, with_server_options
    from extauthz.logs import configure_logging

    worker = args.worker_index
    configure_logging(args.log_level, fields=None if worker is None else {"worker": worker})
    options: dict[str, object] = {}
    if args.workers is not None:
        options["workers"] = args.workers
    if args.cpu_affinity:
        options["cpu_affinity"] = True
    try:
        config = with_server_options(load_config(args.config), options)
        check_workers(config)
        if worker is None and config.server.workers > 1:
            return _supervise(args, config)
    except (ConfigError, JWKSError) as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    # Only a worker or a single process gets here, so only they import grpcio.
    from extauthz.server import Service
    from extauthz.workers import prepare_worker, report_listening

    if worker is not None:
        if not 0 <= worker < config.server.workers or args.worker_status_fd is None or args.supervisor_pid is None:
            print(f"extauthz: --worker-index {worker} needs --worker-status-fd and --supervisor-pid and must be "
                  f"below --workers {config.server.workers}; only the supervisor starts workers", file=sys.stderr)
            return EXIT_CONFIG
        prepare_worker(worker, config.server.cpu_affinity, args.supervisor_pid)
    try:
        service = Service(config, worker=worker, server_options=options)
    except (ConfigError, JWKSError) as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    # Signal handlers only record the signal. Taking any lock in a handler (logging, Event.set) can
    # deadlock: the handler runs on the main thread, which may hold that lock at that moment.
    received: list[int] = []

    def record_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, record_signal)
    service.start()
    # Everything loaded so far lives as long as the process: keep it out of the garbage collector's
    # scans, which otherwise walk it on every full collection during Checks.
    gc.freeze()
    if worker is not None:
        report_listening(args.worker_status_fd, service.http_port, service.decision_log.jwks())
    stopping = False
    while not stopping:
        time.sleep(SIGNAL_POLL_INTERVAL)
        while received:
            signum = received.pop(0)
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
            if signum == signal.SIGHUP:
                service.request_reload()
            else:
                stopping = True
    service.stop()
    return 0


def _supervise(args: argparse.Namespace, config) -> int:
    """Run `server.workers` worker processes under a supervisor (extauthz.workers), without grpcio."""
    from extauthz.workers import Supervisor, worker_command

    options = ["--workers", str(config.server.workers)] + (["--cpu-affinity"] if config.server.cpu_affinity else [])
    supervisor = Supervisor(config, worker_command(args.config, args.log_level, options))
    return supervisor.run()


def _worker_count(text: str) -> int:
    from extauthz.config import MAX_WORKERS

    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"invalid worker count {text!r}: use an integer from 1 to {MAX_WORKERS}")
    return int(text)


def _open_shared_store(config_path: str):
    from extauthz.config import load_config
    from extauthz.store import open_store

    config = load_config(config_path)
    if not config.store.shared:
        raise ConfigError(config_path, "store.url", "memory:// is private to one serve process",
                          "set store.url to the Redis that the replicas share, such as redis://HOST:6379/0")
    # An admin command need not fit inside a Check deadline: allow a slow network its time.
    admin_store = dataclasses.replace(config.store, timeout=max(config.store.timeout, ADMIN_STORE_TIMEOUT),
                                      retries=max(config.store.retries, 2))
    return config, open_store(admin_store)


def _revoke(args: argparse.Namespace) -> int:
    from extauthz.revocation import revoke
    from extauthz.store import StoreError

    kind, value = next((kind, value) for kind, value in
                       (("sub", args.subject), ("sid", args.session), ("jti", args.jti)) if value)
    try:
        config, store = _open_shared_store(args.config)
        entry = revoke(store, config, kind, value, issuer=args.issuer, reason=args.reason or "")
    except (ConfigError, StoreError, ValueError) as exc:
        print(f"extauthz revoke: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else 1
    print(f"revoked {kind} {value!r} until {_utc(entry['expires_at'])}")
    return 0


def _utc(timestamp: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _revocations(args: argparse.Namespace) -> int:
    import json
    import time

    from extauthz.store import StoreError

    try:
        _, store = _open_shared_store(args.config)
        if args.action == "clear":
            removed = store.remove_revocations(None)
            print(f"removed {removed} revocations")
            return 0
        entries = store.revocation_entries()
    except (ConfigError, StoreError) as exc:
        print(f"extauthz revocations: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else 1

    now = time.time()
    active = sorted((entry for entry in entries.values() if float(entry.get("expires_at", 0)) > now),
                    key=lambda entry: float(entry.get("revoked_at", 0)))
    if args.format == "json":
        print(json.dumps(active, indent=2))
        return 0
    if not active:
        print("no active revocations")
    for entry in active:
        issuer = f" (issuer {entry['issuer']})" if entry.get("kind") == "sub" and entry.get("issuer") != "*" else ""
        print(f"{entry.get('kind')} {entry.get('value')!r}{issuer} revoked {_utc(float(entry['revoked_at']))}, "
              f"expires {_utc(float(entry['expires_at']))}" + (f": {entry['reason']}" if entry.get("reason") else ""))
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    import json

    from extauthz.policy_check import (
        ERROR,
        INFO,
        WARNING,
        CheckSettings,
        UnusableInput,
        check_policy_files,
        read_check_settings,
    )

    try:
        settings = read_check_settings(Path(args.config)) if args.config else CheckSettings(provider=args.provider)
        problems, files, policies = check_policy_files([Path(path) for path in args.paths], settings.provider,
                                                       settings.token_ttl_cap, settings.root_namespace,
                                                       settings.secret_names)
    except UnusableInput as exc:
        print(f"extauthz policy check: {exc}", file=sys.stderr)
        return 2

    counts = {severity: sum(problem.severity == severity for problem in problems)
              for severity in (ERROR, WARNING, INFO)}
    if args.format == "json":
        print(json.dumps({"problems": [problem.as_dict() for problem in problems], "files": files,
                          "policies": policies, "errors": counts[ERROR], "warnings": counts[WARNING],
                          "notes": counts[INFO]}, indent=2))
    else:
        for problem in problems:
            print(problem.render())
        print(f"{files} files, {policies} extauthz policies: {counts[ERROR]} errors, "
              f"{counts[WARNING]} warnings, {counts[INFO]} notes")
    return 1 if counts[ERROR] or counts[WARNING] else 0


def _key_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    result = {}
    for pair in pairs or []:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"{option} expects NAME=VALUE, got {pair!r}")
        result[name] = value
    return result


def _policy_explain(args: argparse.Namespace) -> int:
    import json

    from extauthz.config import load_config
    from extauthz.explain import ExplainRequest, explain, render_text

    try:
        config = load_config(args.config)
        claims = json.loads(args.claims) if args.claims else None
        if claims is not None and not isinstance(claims, dict):
            raise ValueError("--claims expects a JSON object")
        request = ExplainRequest(
            method=args.method, host=args.host, path=args.path, scheme=args.scheme,
            headers=_key_values(args.header, "--header"),
            source_principal=args.source_principal, source_address=args.source_address,
            destination_principal=args.destination_principal, destination_port=args.destination_port,
            context_extensions=_key_values(args.context_extension, "--context-extension"),
            token=args.token, claims=claims)
        result = explain(config, request)
    except (ConfigError, JWKSError, ValueError) as exc:
        print(f"extauthz policy explain: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.format == "json" else render_text(result))
    return 0


# audit query|stats and policy replay: reading decision logs.

def _audit_filters(args: argparse.Namespace):
    from extauthz.audit_query import build_filters

    return build_filters(subjects=args.subject, decision=args.decision, reasons=args.reason,
                         policies=args.policy, hosts=args.host, source_principals=args.source_principal,
                         since=args.since, until=args.until)


def _report_read_problems(command: str, reader) -> int:
    """Print the sources that failed part-way; return the exit code for them (0 when there were none)."""
    for problem in reader.problems:
        print(f"extauthz {command}: {problem}", file=sys.stderr)
    return 2 if reader.problems else 0


def _skipped_text(reader) -> str:
    if not reader.skipped:
        return "no lines skipped"
    where = ", ".join(reader.skipped_sources) + (", ..." if reader.skipped > len(reader.skipped_sources) else "")
    return f"{reader.skipped} lines skipped as not decision records (at {where})"


def _audit_query(args: argparse.Namespace) -> int:
    import orjson

    from extauthz.audit_query import QUERY_HEADERS, query_rows, render_table, run_query
    from extauthz.audit_read import ReadError, reader_from_arguments

    try:
        filters = _audit_filters(args)
        reader = reader_from_arguments(args)
        result = run_query(reader, filters)
    except (ReadError, ValueError) as exc:
        print(f"extauthz audit query: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        for entry in result.matches:
            sys.stdout.buffer.write((entry.line or orjson.dumps(entry.record, option=orjson.OPT_SORT_KEYS)) + b"\n")
        sys.stdout.flush()
    elif result.matches:
        print(render_table(QUERY_HEADERS, query_rows(result.matches)))
    print(f"{len(result.matches)} of {result.decisions} decisions matched; {result.checkpoints} checkpoints "
          f"ignored; {_skipped_text(reader)}", file=sys.stderr)
    return _report_read_problems("audit query", reader)


def _audit_stats(args: argparse.Namespace) -> int:
    import json

    from extauthz.audit_query import reauth_policies_from_files, run_stats
    from extauthz.audit_read import ReadError, reader_from_arguments

    if args.top < 1:
        print(f"extauthz audit stats: --top {args.top}: expected a count of 1 or more", file=sys.stderr)
        return 2
    try:
        filters = _audit_filters(args)
        reauth_policies = (reauth_policies_from_files([Path(path) for path in args.policies], args.provider)
                           if args.policies else None)
        reader = reader_from_arguments(args)
        statistics = run_stats(reader, filters, top=args.top, reauth_policies=reauth_policies)
    except (ReadError, ValueError, ConfigError) as exc:
        print(f"extauthz audit stats: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({**statistics.to_dict(), "skipped_lines": reader.skipped}, indent=2))
    else:
        print(statistics.render())
    print(f"{statistics.decisions} decisions counted; {statistics.checkpoints} checkpoints ignored; "
          f"{_skipped_text(reader)}", file=sys.stderr)
    return _report_read_problems("audit stats", reader)


def _policy_replay(args: argparse.Namespace) -> int:
    import json

    from extauthz.audit_read import ReadError, reader_from_arguments
    from extauthz.policy_replay import Replayer, read_logged_facts, replay_config

    config_path = Path(args.config) if args.config else None
    if config_path is not None and (args.provider or args.root_namespace):
        print("extauthz policy replay: --provider and --root-namespace come from --config; drop them",
              file=sys.stderr)
        return 2
    try:
        reader = reader_from_arguments(args)
        config = replay_config(config_path, [Path(path) for path in args.policies],
                               provider=args.provider or "extauthz",
                               root_namespace=args.root_namespace or "istio-system")
        replayer = Replayer(config, read_logged_facts(config_path), learn_issuers=config_path is None)
    except (ReadError, ConfigError, JWKSError) as exc:
        print(f"extauthz policy replay: {exc}", file=sys.stderr)
        return 2
    try:
        report = replayer.replay(reader)
    finally:
        replayer.close()
    if args.format == "json":
        print(json.dumps({**report.to_dict(), "skipped_lines": reader.skipped}, indent=2))
    else:
        print(report.render())
        print(_skipped_text(reader))
    if _report_read_problems("policy replay", reader):
        return 2
    return 1 if report.changes else 0


def _add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject", action="append", metavar="SUB", help="end user's sub; repeat for any of several")
    parser.add_argument("--decision", choices=("allow", "deny"), help="only allowed or only denied requests")
    parser.add_argument("--reason", action="append", metavar="CODE",
                        help="reason code, such as insufficient_user_authentication; repeatable")
    parser.add_argument("--policy", action="append", metavar="NS/NAME",
                        help="a matched policy, such as payments/transfers-step-up; repeatable")
    parser.add_argument("--host", action="append", help="the request's host, such as payments.example.com; repeatable")
    parser.add_argument("--source-principal", action="append", metavar="PRINCIPAL",
                        help="calling workload, with or without spiffe://; repeatable")
    parser.add_argument("--since", metavar="T",
                        help="from this time on: RFC 3339 such as 2026-07-01T00:00:00Z, a date (midnight UTC), "
                             "or a duration before now such as 24h or 90d")
    parser.add_argument("--until", metavar="T", help="before this time (exclusive), in the same forms as --since")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")


def _add_audit_read_commands(audit_commands) -> None:
    from extauthz.audit_read import add_source_arguments

    query = audit_commands.add_parser("query", help="list the decisions that match filters")
    add_source_arguments(query)
    _add_filter_arguments(query)
    query.set_defaults(run=_audit_query)

    stats = audit_commands.add_parser("stats", help="count decisions per policy, reason, subject, workload "
                                                    "and token audience")
    add_source_arguments(stats)
    _add_filter_arguments(stats)
    stats.add_argument("--policies", nargs="+", action="extend", metavar="PATH",
                       help="policy files or folders: take the policies that require re-authentication from "
                            "them for the step-up challenge rate, instead of inferring them from the log")
    stats.add_argument("--provider", default="extauthz", help="with --policies: the CUSTOM provider name")
    stats.add_argument("--top", type=int, default=10, help="how many denied subjects and workloads to list")
    stats.set_defaults(run=_audit_stats)


def _add_policy_replay_command(policy_commands) -> None:
    from extauthz.audit_read import add_source_arguments

    replay = policy_commands.add_parser(
        "replay", help="decide logged requests again under candidate policies and list what would change")
    add_source_arguments(replay, files_option="--log")
    replay.add_argument("--policies", nargs="+", action="extend", required=True, metavar="PATH",
                        help="the candidate policy files or folders")
    replay.add_argument("--config", help="extauthz configuration: issuers, provider, root namespace, secret names "
                                         "and the decision_log header and claim lists")
    replay.add_argument("--provider", help="without --config: the CUSTOM provider name (default: extauthz)")
    replay.add_argument("--root-namespace", help="without --config: the root namespace (default: istio-system)")
    replay.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    replay.set_defaults(run=_policy_replay)


def _audit_verify(args: argparse.Namespace) -> int:
    import json

    from extauthz.audit_chain import AuditKeyError, read_jwks_source, verify_entries
    from extauthz.audit_read import ReadError, reader_from_arguments

    try:
        keys = None
        for source in args.jwks or []:
            keys = {**(keys or {}), **read_jwks_source(source)}
        reader = reader_from_arguments(args)
    except (AuditKeyError, ReadError) as exc:
        print(f"extauthz audit verify: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    report = verify_entries(reader, keys, args.allow_missing_start)
    unchecked = keys is None and not args.skip_signatures
    if args.format == "json":
        print(json.dumps({"ok": report.ok and not unchecked and not reader.problems,
                          "signatures_checked": report.signatures_checked,
                          "writers": [writer.as_dict() for writer in report.writers],
                          "malformed": [finding.as_dict() for finding in report.malformed],
                          "unchained": len(report.unchained), "unchained_at": report.unchained[:SHOWN_LOCATIONS],
                          "skipped": reader.skipped, "skipped_at": reader.skipped_sources,
                          "unreadable": reader.problems}, indent=2))
    else:
        _print_verify_report(report, unchecked, reader)
    if _report_read_problems("audit verify", reader):
        return EXIT_CONFIG
    return 0 if report.ok and not unchecked else 1


def _print_verify_report(report, unchecked: bool, reader) -> None:
    for writer in report.writers:
        if writer.ok:
            start = f" (lines before seq {writer.first_seq} not checked)" if writer.first_seq != 1 else ""
            print(f"OK      {writer.writer}: seq {writer.first_seq}-{writer.last_seq}, {writer.decisions} decisions, "
                  f"{writer.checkpoints} checkpoints{start}")
            continue
        more = len(writer.findings) - 1
        print(f"FAILED  {writer.writer}: {writer.findings[0].message}"
              + (f" (and {more} more findings)" if more else ""))
    for finding in report.malformed:
        print(f"FAILED  {finding.message} at {finding.where}")
    if report.unchained:
        shown = ", ".join(report.unchained[:SHOWN_LOCATIONS]) + (
            ", ..." if len(report.unchained) > SHOWN_LOCATIONS else "")
        print(f"FAILED  {len(report.unchained)} decision records without type, writer and hash, which nothing "
              f"proves (at {shown}): records of a version from before the chain, or added by someone else")
    if not report.writers and not report.malformed and not report.unchained:
        print("FAILED  no decision log records found")
    if reader.skipped:
        shown = ", ".join(reader.skipped_sources) + (", ..." if reader.skipped > len(reader.skipped_sources) else "")
        print(f"skipped {reader.skipped} lines that are not records (at {shown})")
    duplicates = sum(writer.duplicates for writer in report.writers)
    if duplicates:
        print(f"ignored {duplicates} exact copies of lines (a copy of a file, or a line delivered twice)")
    if unchecked:
        print("signatures not checked: pass --jwks FILE with the writers' audit JWKS, or --skip-signatures")
    elif not report.signatures_checked:
        print("signatures not checked (--skip-signatures)")
    failed = sum(not writer.ok for writer in report.writers)
    print(f"{len(report.writers)} writers: {len(report.writers) - failed} OK, {failed} failed")


def _audit_keygen(args: argparse.Namespace) -> int:
    from extauthz.audit_chain import generate_signer, write_key_file

    signer = generate_signer("ES256")
    try:
        write_key_file(Path(args.file), signer)
    except FileExistsError:
        print(f"extauthz audit keygen: {args.file} already exists (remove it or choose another path)", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"extauthz audit keygen: cannot write {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    print(signer.jwks_pretty())
    return 0


def _audit_jwks(args: argparse.Namespace) -> int:
    from extauthz.audit_chain import AuditKeyError, load_signer
    from extauthz.config import load_config

    try:
        config = load_config(args.config)
        key_file = config.decision_log.signing_key_file
        if key_file is None:
            raise ConfigError(args.config, "decision_log.signing_key_file",
                              "not set, so each serve process signs with a key generated at start",
                              f"fetch http://{config.listen.http}/.well-known/audit-jwks.json from the running "
                              "process, or set signing_key_file to a key from `extauthz audit keygen FILE`")
        signer = load_signer(key_file)
    except (ConfigError, AuditKeyError) as exc:
        print(f"extauthz audit jwks: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(signer.jwks_pretty())
    return 0


def _envoy_config(args: argparse.Namespace) -> int:
    import yaml

    from extauthz.config import check_workers, load_config, with_server_options
    from extauthz.envoy_config import bootstrap, cluster_config, ext_authz_filter, extauthz_addresses

    try:
        options = {} if args.workers is None else {"workers": args.workers}
        config = with_server_options(load_config(args.config), options)
        check_workers(config)
        upstream = _address(args.upstream, "--upstream")
        listen = _address(args.listen, "--listen")
        admin = _address(args.admin, "--admin")
    except (ConfigError, ValueError) as exc:
        print(f"extauthz envoy-config: {exc}", file=sys.stderr)
        return 2
    addresses = extauthz_addresses(config)
    if args.filter_only:
        document = {"http_filters": [ext_authz_filter(timeout=args.timeout)],
                    "clusters": [cluster_config("extauthz", addresses, http2=True)]}
    else:
        document = bootstrap(listen=listen, admin=admin, extauthz=addresses, upstream=upstream,
                             namespace=args.namespace, timeout=args.timeout)
    print(yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def _address(text: str, option: str):
    from extauthz.config import Address

    host, separator, port = text.rpartition(":")
    if not separator or not port.isdigit() or not host:
        raise ValueError(f"{option} expects HOST:PORT, got {text!r}")
    return Address(host.strip("[]"), int(port))


def _dev_token(args: argparse.Namespace) -> int:
    from extauthz.dev_idp import sign_user_token

    try:
        auth_age = parse_duration(args.auth_age)
        lifetime = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"extauthz dev token: {exc}", file=sys.stderr)
        return 2
    key = Path(args.key)
    if not key.exists():
        print(f"extauthz dev token: development IdP key not found: {key} (run it from the repository root, "
              "where make run creates examples/dev-idp/, or pass --key)", file=sys.stderr)
        return 1
    try:
        token = sign_user_token(key, subject=args.sub, issuer=args.issuer, audience=args.aud, auth_age=auth_age,
                                acr=args.acr, amr=args.amr or None, lifetime=lifetime)
    except (OSError, ValueError) as exc:
        print(f"extauthz dev token: cannot sign with {key}: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _dev_keygen(args: argparse.Namespace) -> int:
    from extauthz.dev_idp import generate_idp_keys

    path = generate_idp_keys(Path(args.out))
    print(f"wrote a development-only IdP key pair: {path} and {path.parent / 'jwks.json'}")
    return 0


def _dev_demo(args: argparse.Namespace) -> int:
    from extauthz.demo import run_demo

    return run_demo(Path(args.config), keep_running=not args.once)


def build_parser() -> argparse.ArgumentParser:
    from extauthz import __version__

    parser = argparse.ArgumentParser(prog="extauthz", description="External authorization for Envoy and Istio.")
    parser.add_argument("--version", action="version", version=f"extauthz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ext_authz gRPC server and the HTTP side listener")
    serve.add_argument("--config", required=True, help="path of the YAML configuration file")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                       help="level of the operational log on stderr (default: info)")
    serve.add_argument("--workers", type=_worker_count,
                       help="worker processes, each serving Checks on its own gRPC port "
                            "(default: server.workers, else 1); more than 1 needs a Redis store.url "
                            "and listen.worker_grpc")
    serve.add_argument("--cpu-affinity", action="store_true",
                       help="pin worker i to CPU i mod the number of CPUs this process may use "
                            "(default: server.cpu_affinity)")
    # Set by the supervisor on the workers it starts; never by hand.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-status-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    revoke = commands.add_parser("revoke", help="revoke a subject, a session or one token on every replica")
    revoke.add_argument("--config", required=True, help="configuration whose store.url names the shared store")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--subject", help="revoke the tokens of this `sub` issued before now")
    target.add_argument("--session", help="revoke every token with this `sid`")
    target.add_argument("--jti", help="revoke the token with this `jti`")
    revoke.add_argument("--issuer", help="with --subject: only tokens of this issuer (default: any issuer)")
    revoke.add_argument("--reason", help="free text kept with the revocation (at most 200 characters)")
    revoke.set_defaults(run=_revoke)

    revocations = commands.add_parser("revocations", help="list or clear the active revocations")
    revocations.add_argument("action", choices=("list", "clear"))
    revocations.add_argument("--config", required=True, help="configuration whose store.url names the shared store")
    revocations.add_argument("--format", choices=("text", "json"), default="text", help="output format of list")
    revocations.set_defaults(run=_revocations)

    policy = commands.add_parser("policy", help="check AuthorizationPolicy files, or explain a decision")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)

    check = policy_commands.add_parser("check", help="report every problem in AuthorizationPolicy files")
    check.add_argument("paths", nargs="+", help="policy files or folders")
    check.add_argument("--config",
                       help="read provider, root namespace, the token.ttl cap and secret names from this config")
    check.add_argument("--provider", default="extauthz", help="provider name when --config is not given")
    check.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    check.set_defaults(run=_policy_check)

    explain = policy_commands.add_parser("explain", help="show how serve would decide one request, and why")
    explain.add_argument("--config", required=True, help="extauthz configuration (policies and issuers)")
    explain.add_argument("--method", default="GET", help="HTTP method (default GET)")
    explain.add_argument("--host", required=True, help="the request's :authority, such as shop.example.com")
    explain.add_argument("--path", required=True, help="the request's :path, query included")
    explain.add_argument("--scheme", default="http", choices=("http", "https"))
    explain.add_argument("--header", action="append", metavar="NAME=VALUE", help="a request header; repeatable")
    explain.add_argument("--source-principal", default="", help="calling workload, such as spiffe://cluster.local/ns/web/sa/web")
    explain.add_argument("--source-address", default="127.0.0.1", help="caller IP address")
    explain.add_argument("--destination-principal", default="", help="destination workload principal")
    explain.add_argument("--destination-port", type=int, default=0, help="destination port")
    explain.add_argument("--context-extension", action="append", metavar="NAME=VALUE",
                         help="an ext_authz context extension, such as namespace=shop; repeatable")
    identity = explain.add_mutually_exclusive_group()
    identity.add_argument("--token", help="an end-user JWT, verified as serve verifies it")
    identity.add_argument("--claims", help="end-user claims as a JSON object; skips only the signature check")
    explain.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    explain.set_defaults(run=_policy_explain)

    _add_policy_replay_command(policy_commands)

    from extauthz.audit_read import add_source_arguments

    audit = commands.add_parser("audit", help="verify, query and count decision logs, and manage their signing key")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    _add_audit_read_commands(audit_commands)

    verify = audit_commands.add_parser(
        "verify", help="verify the hash chain and the signed checkpoints of every writer in decision logs")
    add_source_arguments(verify)
    verify.add_argument("--jwks", action="append", metavar="FILE_OR_URL",
                        help="audit JWKS of the writers, a file or an http(s) URL such as "
                             "http://HOST:9192/.well-known/audit-jwks.json; repeatable")
    verify.add_argument("--skip-signatures", action="store_true",
                        help="without --jwks: check the hash chains only, and exit 0 when they hold")
    verify.add_argument("--allow-missing-start", action="store_true",
                        help="accept a writer whose first lines are gone, as when rotation deleted the oldest "
                             "file; its chain is checked from the first line present")
    verify.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    verify.set_defaults(run=_audit_verify)

    audit_keygen = audit_commands.add_parser(
        "keygen", help="write a new EC P-256 key for decision_log.signing_key_file and print its public JWKS")
    audit_keygen.add_argument("file", metavar="FILE", help="where to write the PEM private key (mode 0600); must "
                              "not exist")
    audit_keygen.set_defaults(run=_audit_keygen)

    audit_jwks = audit_commands.add_parser("jwks", help="print the public JWKS of decision_log.signing_key_file")
    audit_jwks.add_argument("--config", required=True, help="extauthz configuration")
    audit_jwks.set_defaults(run=_audit_jwks)

    envoy = commands.add_parser("envoy-config", help="print an Envoy configuration that calls extauthz")
    envoy.add_argument("--config", required=True, help="extauthz configuration (its listen.grpc address)")
    envoy.add_argument("--upstream", default="127.0.0.1:8080", help="the protected backend, HOST:PORT")
    envoy.add_argument("--listen", default="0.0.0.0:10000", help="Envoy's listener, HOST:PORT")
    envoy.add_argument("--admin", default="127.0.0.1:9901", help="Envoy's admin listener, HOST:PORT")
    envoy.add_argument("--namespace", default="default",
                       help="destination namespace sent as context extension `namespace` (default: default)")
    envoy.add_argument("--timeout", default="0.25s", help="Check timeout, such as 0.25s")
    envoy.add_argument("--workers", type=_worker_count,
                       help="worker processes that `serve` runs (default: server.workers); with more than 1, "
                            "the cluster lists every worker's own port with round-robin")
    envoy.add_argument("--filter-only", action="store_true",
                       help="print only the ext_authz HTTP filter and the extauthz cluster")
    envoy.set_defaults(run=_envoy_config)

    dev = commands.add_parser("dev", help="development helpers; never use their keys in production")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)

    token = dev_commands.add_parser("token", help="print an end-user token signed with the development IdP key")
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--auth-age", default="0s",
                       help="how long ago the user logged in, such as 30s or 2h (default: 0s, just now)")
    token.add_argument("--acr", help="authentication context class, such as urn:example:acr:mfa")
    token.add_argument("--amr", action="append", help="authentication method; repeat for several")
    token.add_argument("--aud", default="mesh", help="audience (default: mesh)")
    token.add_argument("--issuer", default="https://idp.example.test", help="issuer (default: %(default)s)")
    token.add_argument("--ttl", default="10m", help="token lifetime (default: 10m)")
    token.add_argument("--key", default="examples/dev-idp/private-key.pem",
                       help="development IdP private key (default: %(default)s)")
    token.set_defaults(run=_dev_token)

    keygen = dev_commands.add_parser("idp-keygen", help="write a development IdP key pair")
    keygen.add_argument("--out", default="examples/dev-idp", help="folder to write to (default: %(default)s)")
    keygen.set_defaults(run=_dev_keygen)

    demo = dev_commands.add_parser("demo", help="run extauthz, Envoy and an echo upstream, and send examples")
    demo.add_argument("--config", default="examples/config.yaml", help="extauthz configuration")
    demo.add_argument("--once", action="store_true", help="exit after the example requests")
    demo.set_defaults(run=_dev_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`extauthz policy explain | head`). Point stdout at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
