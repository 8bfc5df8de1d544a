"""Command line: `extauthz serve`, and the development helpers under `extauthz dev`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from extauthz.config import parse_duration
from extauthz.errors import ConfigError, JWKSError

log = logging.getLogger("extauthz")

EXIT_CONFIG = 2


def _serve(args: argparse.Namespace) -> int:
    from extauthz.config import load_config
    from extauthz.logs import configure_logging
    from extauthz.server import Service

    configure_logging(args.log_level)
    try:
        service = Service(load_config(args.config))
    except (ConfigError, JWKSError) as exc:
        log.error("invalid configuration", extra={"error": str(exc)})
        print(f"extauthz: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    def request_reload(signum: int, _frame: object) -> None:
        log.info("signal received; reloading", extra={"signal": signal.Signals(signum).name})
        service.request_reload()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    service.start()
    stop.wait()
    service.stop()
    return 0


def _open_shared_store(config_path: str):
    from extauthz.config import load_config
    from extauthz.store import open_store

    config = load_config(config_path)
    if not config.store.shared:
        raise ConfigError(config_path, "store.url", "memory:// is private to one serve process",
                          "set store.url to the Redis that the replicas share, such as redis://HOST:6379/0")
    return config, open_store(config.store)


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


def _dev_token(args: argparse.Namespace) -> int:
    from extauthz.dev_idp import sign_user_token

    try:
        token = sign_user_token(
            Path(args.key), subject=args.sub, issuer=args.issuer, audience=args.aud,
            auth_age=parse_duration(args.auth_age), acr=args.acr, amr=args.amr or None,
            lifetime=parse_duration(args.ttl))
    except (OSError, ValueError) as exc:
        print(f"extauthz dev token: {exc} (run `extauthz dev idp-keygen` to create the key)", file=sys.stderr)
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
    parser = argparse.ArgumentParser(prog="extauthz", description="External authorization for Envoy and Istio.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ext_authz gRPC server and the HTTP side listener")
    serve.add_argument("--config", required=True, help="path of the YAML configuration file")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                       help="level of the operational log on stderr (default: info)")
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

    dev = commands.add_parser("dev", help="development helpers; never use their keys in production")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)

    token = dev_commands.add_parser("token", help="print an end-user token signed with the development IdP key")
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--auth-age", default="0s", help="how long ago the user logged in, such as 30s or 2h")
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
