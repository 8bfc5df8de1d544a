"""The HTTP side listener: the JWKS of minted tokens, liveness and readiness.

    GET /.well-known/jwks.json   public keys that verify minted tokens
    GET /.well-known/audit-jwks.json   the public key that verifies this process's decision log checkpoints
    GET /metrics                 Prometheus text format (see extauthz.metrics)
    GET /healthz                 200 while the process runs
    GET /readyz                  200 once keys, issuers' key sets and policies are loaded, else 503;
                                 the body also names the shared store's state (`ok` or `unavailable`)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from waitress.server import create_server

from extauthz.config import Address
from extauthz.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
AUDIT_JWKS_PATH = "/.well-known/audit-jwks.json"
# Backends may cache the JWKS this long; the next key is published a whole rotation period ahead.
JWKS_MAX_AGE = 300


class SideApp:
    """A WSGI application serving the side listener's paths."""

    def __init__(self, jwks: Callable[[], bytes], is_ready: Callable[[], bool],
                 store_state: Callable[[], str] = lambda: "ok", metrics: Callable[[], bytes] | None = None,
                 audit_jwks: Callable[[], bytes] | None = None):
        self.jwks = jwks
        self.is_ready = is_ready
        self.store_state = store_state
        self.metrics = metrics
        self.audit_jwks = audit_jwks

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if method not in ("GET", "HEAD"):
            return self._send(start_response, "405 Method Not Allowed", b'{"error":"method_not_allowed"}\n',
                              extra=[("Allow", "GET, HEAD")])
        if path == JWKS_PATH:
            return self._send(start_response, "200 OK", self.jwks(), content_type="application/jwk-set+json",
                              extra=[("Cache-Control", f"public, max-age={JWKS_MAX_AGE}")])
        if path == AUDIT_JWKS_PATH and self.audit_jwks is not None:
            return self._send(start_response, "200 OK", self.audit_jwks(), content_type="application/jwk-set+json",
                              extra=[("Cache-Control", f"public, max-age={JWKS_MAX_AGE}")])
        if path == "/metrics" and self.metrics is not None:
            return self._send(start_response, "200 OK", self.metrics(), content_type=CONTENT_TYPE)
        if path == "/healthz":
            return self._send(start_response, "200 OK", b'{"status":"ok"}\n')
        if path == "/readyz":
            store = self.store_state()
            if self.is_ready():
                return self._send(start_response, "200 OK", f'{{"status":"ready","store":"{store}"}}\n'.encode())
            return self._send(start_response, "503 Service Unavailable",
                              f'{{"status":"not_ready","store":"{store}"}}\n'.encode())
        return self._send(start_response, "404 Not Found", b'{"error":"not_found"}\n')

    @staticmethod
    def _send(start_response: Callable, status: str, body: bytes, content_type: str = "application/json",
              extra: list[tuple[str, str]] | None = None) -> list[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))] + (extra or [])
        start_response(status, headers)
        return [body]


class SideListener:
    def __init__(self, address: Address, app: SideApp):
        self.server = create_server(app, host=address.host, port=address.port, threads=2,
                                    ident="extauthz", clear_untrusted_proxy_headers=True)
        self.host = address.host
        # waitress reports the bound port as a string.
        self.port = int(self.server.effective_port)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except OSError as exc:
            # close() from another thread can pull the socket out from under select(): expected on stop.
            if not self._stopping.is_set():
                log.error("HTTP listener failed", extra={"error": str(exc)})

    def stop(self) -> None:
        self._stopping.set()
        self.server.close()
