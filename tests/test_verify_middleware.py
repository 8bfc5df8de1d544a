"""extauthz.verify_middleware: a real WSGI app behind waitress, and a real ASGI app.

The WSGI app runs in waitress on 127.0.0.1 with a port the kernel picks, and the tests send real
HTTP requests to it. No ASGI server is installed, because uvicorn and hypercorn are not dependencies.
So the ASGI tests drive the app through the ASGI protocol itself. They build the connection scope and
pass `receive` and `send` coroutines, as the ASGI HTTP and WebSocket specification describes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from helpers import check_request
from processes import loopback_ports
from waitress.server import create_server

from extauthz.config import SigningConfig, TokenConfig
from extauthz.keys import KeyRing
from extauthz.mint import TokenMinter
from extauthz.policy import Requirements
from extauthz.request import from_check_request
from extauthz.verify import TokenVerifier
from extauthz.verify_middleware import ASGIMiddleware, WSGIMiddleware, wsgi_request_path

TOKEN_ISSUER = "https://extauthz.test"
AUDIENCE = "orders-api"
HOST = "orders.example.com"
PATH = "/orders/7"
INVALID_TOKEN_CHALLENGE = 'Bearer error="invalid_token", error_description="{description}"'


def make_minter() -> TokenMinter:
    signing = SigningConfig(algorithm="ES256", rotate_every=21_600.0, key_file=None)
    config = TokenConfig(issuer=TOKEN_ISSUER, header="txn-token", ttl=30.0, signing=signing)
    return TokenMinter(config, KeyRing(signing, 30.0), clock=time.time)


@pytest.fixture(scope="module")
def minter() -> TokenMinter:
    return make_minter()


@pytest.fixture(scope="module")
def verifier(minter) -> TokenVerifier:
    return TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE, jwks=json.loads(minter.keys.jwks()))


def mint(minter: TokenMinter, *, method: str = "GET", path: str = PATH) -> str:
    request = from_check_request(check_request(method=method, host=HOST, path=path), 8192)
    return minter.mint(f"txn-{time.monotonic_ns()}", request, None, Requirements(token_audience=AUDIENCE)).token


# --- WSGI ------------------------------------------------------------------------------------------


class ClaimsApp:
    """A WSGI app that responds with the claims the middleware put in the environ, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls += 1
        body = json.dumps({"claims": environ["extauthz.claims"], "path": environ["PATH_INFO"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


class WaitressServer:
    """waitress on 127.0.0.1 in a thread. stop() closes it and waits for the thread."""

    def __init__(self, app: Any):
        self.server = create_server(app, host="127.0.0.1", port=0, threads=2, ident="verify-test")
        self.port = int(self.server.effective_port)
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="waitress-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except OSError:
            # close() from the test's thread can pull the socket out from under select(): expected on stop.
            if not self._stopping.is_set():
                raise

    def stop(self) -> None:
        self._stopping.set()
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)
        self.thread.join(timeout=10)

    def get(self, path: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, headers={"Host": HOST, **(headers or {})})
            response = connection.getresponse()
            received = {name.lower(): value for name, value in response.getheaders()}
            return response.status, received, response.read()
        finally:
            connection.close()


@pytest.fixture
def wsgi_app() -> ClaimsApp:
    return ClaimsApp()


@pytest.fixture
def wsgi_server(wsgi_app, verifier) -> Iterator[WaitressServer]:
    server = WaitressServer(WSGIMiddleware(wsgi_app, verifier))
    try:
        yield server
    finally:
        server.stop()


def test_wsgi_no_token(wsgi_server, wsgi_app):
    status, headers, body = wsgi_server.get(PATH)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "missing_token", "error_description": "A transaction token is required."}
    assert wsgi_app.calls == 0


def test_wsgi_bad_token(wsgi_server, wsgi_app):
    status, headers, body = wsgi_server.get(PATH, {"txn-token": "not-a-token"})
    assert status == 401
    description = "The transaction token is not a well-formed JWT."
    assert headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE.format(description=description)
    assert json.loads(body) == {"error": "malformed_token", "error_description": description}
    assert b"not-a-token" not in body
    assert wsgi_app.calls == 0


def test_wsgi_valid_token(wsgi_server, wsgi_app, minter):
    status, _, body = wsgi_server.get(PATH, {"txn-token": mint(minter)})
    assert status == 200
    claims = json.loads(body)["claims"]
    assert claims["aud"] == AUDIENCE
    assert claims["tctx"] == {"method": "GET", "host": HOST, "path": PATH}
    assert wsgi_app.calls == 1


def test_wsgi_other_path(wsgi_server, wsgi_app, minter):
    token = mint(minter, path="/orders/8")
    status, headers, body = wsgi_server.get(PATH, {"txn-token": token})
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert json.loads(body)["error"] == "context_mismatch"
    assert token.encode() not in body
    assert wsgi_app.calls == 0


def test_wsgi_other_method(wsgi_server, minter):
    status, _, body = wsgi_server.get(PATH, {"txn-token": mint(minter, method="GET")}, method="DELETE")
    assert status == 401
    assert json.loads(body)["error"] == "context_mismatch"


@pytest.mark.parametrize(
    ("sent", "minted"),
    [
        pytest.param("/orders/x/../7?page=2", PATH, id="dot-segments-and-query"),
        pytest.param("/orders/%7euser", "/orders/~user", id="unreserved-escape"),
        pytest.param("/orders/a%3Fb", "/orders/a%3Fb", id="escaped-question-mark"),
        pytest.param("/caf%C3%A9", "/caf%C3%A9", id="utf8-escape"),
    ],
)
def test_wsgi_raw_path_verified(wsgi_server, minter, sent, minted):
    # waitress decodes PATH_INFO, so the middleware verifies REQUEST_URI, the path as received.
    status, _, body = wsgi_server.get(sent, {"txn-token": mint(minter, path=minted)})
    assert status == 200
    assert json.loads(body)["claims"]["tctx"]["path"] == minted


def test_wsgi_custom_header(verifier, minter):
    app = ClaimsApp()
    server = WaitressServer(WSGIMiddleware(app, verifier, header="x-backend-token"))
    try:
        status, _, _ = server.get(PATH, {"txn-token": mint(minter)})
        assert status == 401
        status, _, _ = server.get(PATH, {"x-backend-token": mint(minter)})
        assert status == 200
    finally:
        server.stop()


def test_wsgi_jwks_unavailable(minter):
    # Nothing listens on this loopback port, so the key set cannot load.
    port = loopback_ports(1)[0]
    verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=AUDIENCE,
                             jwks_uri=f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=1)
    server = WaitressServer(WSGIMiddleware(ClaimsApp(), verifier))
    try:
        status, headers, body = server.get(PATH, {"txn-token": mint(minter)})
    finally:
        server.stop()
    assert status == 503
    assert "www-authenticate" not in headers
    assert json.loads(body)["error"] == "jwks_unavailable"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"REQUEST_URI": "/a//b?x=1", "PATH_INFO": "/a/b"}, "/a//b?x=1", id="request-uri"),
        pytest.param({"RAW_URI": "/a/%7e", "PATH_INFO": "/a/~"}, "/a/%7e", id="raw-uri"),
        pytest.param({"REQUEST_URI": "http://shop.test/a/b?x", "PATH_INFO": "/a/b"}, "/a/b", id="absolute-form"),
        pytest.param({"SCRIPT_NAME": "/app", "PATH_INFO": "/a?b"}, "/app/a%3Fb", id="decoded-question-mark"),
        pytest.param({"PATH_INFO": "/caf\u00c3\u00a9"}, "/caf%C3%A9", id="latin1-bytes"),
        pytest.param({"PATH_INFO": "/a b/:@!$&'()*+,;="}, "/a%20b/:@!$&'()*+,;=", id="sub-delims-kept"),
    ],
)
def test_wsgi_request_path(environ, expected):
    assert wsgi_request_path(environ) == expected


# --- ASGI ------------------------------------------------------------------------------------------


class ClaimsASGIApp:
    """An ASGI app that responds to HTTP with the claims in its scope, and accepts WebSockets."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            return
        if scope["type"] == "lifespan":
            return
        body = json.dumps({"claims": scope["extauthz.claims"]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def http_scope(path: str = PATH, *, headers: dict[str, str] | None = None, method: str = "GET",
               raw_path: bool = True) -> dict[str, Any]:
    """Build an HTTP connection scope as an ASGI server does for `path` (which may carry a query)."""
    target, _, query = path.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(target),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode())
                    for name, value in {"host": HOST, **(headers or {})}.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    if raw_path:
        scope["raw_path"] = target.encode()
    return scope


def call_asgi(app: Any, scope: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """Run one HTTP request through an ASGI app and return the status, headers and body it sent."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    start = next(message for message in messages if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    headers = {name.decode(): value.decode() for name, value in start.get("headers", [])}
    return start["status"], headers, body


@pytest.fixture
def asgi_app() -> ClaimsASGIApp:
    return ClaimsASGIApp()


@pytest.fixture
def asgi(asgi_app, verifier) -> ASGIMiddleware:
    return ASGIMiddleware(asgi_app, verifier)


def test_asgi_no_token(asgi, asgi_app):
    status, headers, body = call_asgi(asgi, http_scope())
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"] == "missing_token"
    assert asgi_app.scopes == []


def test_asgi_bad_token(asgi, asgi_app):
    status, headers, body = call_asgi(asgi, http_scope(headers={"txn-token": "not-a-token"}))
    assert status == 401
    description = "The transaction token is not a well-formed JWT."
    assert headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE.format(description=description)
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "malformed_token", "error_description": description}
    assert asgi_app.scopes == []


def test_asgi_valid_token(asgi, asgi_app, minter):
    status, _, body = call_asgi(asgi, http_scope(headers={"txn-token": mint(minter)}))
    assert status == 200
    assert json.loads(body)["claims"]["tctx"] == {"method": "GET", "host": HOST, "path": PATH}
    assert asgi_app.scopes[0]["extauthz.claims"]["aud"] == AUDIENCE


def test_asgi_other_path(asgi, asgi_app, minter):
    token = mint(minter, path="/orders/8")
    status, headers, body = call_asgi(asgi, http_scope(headers={"txn-token": token}))
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert json.loads(body)["error"] == "context_mismatch"
    assert token.encode() not in body
    assert asgi_app.scopes == []


def test_asgi_path_without_raw_path(asgi, minter):
    # Without raw_path, the middleware encodes the decoded path again.
    scope = http_scope("/orders/a%3Fb", headers={"txn-token": mint(minter, path="/orders/a%3Fb")}, raw_path=False)
    assert scope["path"] == "/orders/a?b"
    status, _, _ = call_asgi(asgi, scope)
    assert status == 200


def test_asgi_raw_path_normalised(asgi, minter):
    scope = http_scope("/orders//x/../7?page=2", headers={"txn-token": mint(minter)})
    status, _, _ = call_asgi(asgi, scope)
    assert status == 200


def test_asgi_host_from_server(asgi, minter):
    # Without a Host header, the host comes from `server`, whose address is not the token's host.
    scope = http_scope(headers={"txn-token": mint(minter)})
    scope["headers"] = [(name, value) for name, value in scope["headers"] if name != b"host"]
    status, _, body = call_asgi(asgi, scope)
    assert status == 401
    assert json.loads(body)["error"] == "context_mismatch"


def test_asgi_two_token_headers(asgi, minter):
    scope = http_scope(headers={"txn-token": mint(minter)})
    scope["headers"].append((b"txn-token", mint(minter).encode()))
    status, _, body = call_asgi(asgi, scope)
    assert status == 401
    assert json.loads(body)["error"] == "malformed_token"


def test_asgi_headers_iterator(asgi, asgi_app, minter):
    # The spec allows any iterable of headers: the app still receives them all.
    scope = http_scope(headers={"txn-token": mint(minter)})
    scope["headers"] = iter(scope["headers"])
    status, _, _ = call_asgi(asgi, scope)
    assert status == 200
    assert [name for name, _ in asgi_app.scopes[0]["headers"]] == [b"host", b"txn-token"]


def test_asgi_does_not_change_scope(asgi, minter):
    scope = http_scope(headers={"txn-token": mint(minter)})
    call_asgi(asgi, scope)
    assert "extauthz.claims" not in scope


def run_websocket(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Open a WebSocket through an ASGI app: send websocket.connect and return what the app sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    return sent


def websocket_scope(headers: dict[str, str]) -> dict[str, Any]:
    scope = http_scope(headers=headers)
    scope["type"] = "websocket"
    scope["scheme"] = "ws"
    del scope["method"]
    return scope


def test_asgi_websocket_rejected(asgi, asgi_app):
    sent = run_websocket(asgi, websocket_scope({"txn-token": "not-a-token"}))
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert asgi_app.scopes == []


def test_asgi_websocket_accepted(asgi, asgi_app, minter):
    sent = run_websocket(asgi, websocket_scope({"txn-token": mint(minter)}))
    assert sent == [{"type": "websocket.accept"}]
    assert asgi_app.scopes[0]["extauthz.claims"]["tctx"]["method"] == "GET"


def test_asgi_lifespan_passes(asgi, asgi_app):
    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        pass

    asyncio.run(asgi({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [scope["type"] for scope in asgi_app.scopes] == ["lifespan"]
