"""WSGI and ASGI middleware that verify extauthz's transaction token before the application runs.

Each middleware reads the token from one request header (`txn-token` by default) and verifies it
with a TokenVerifier against the method, host and path of the request. A verified request reaches
the application with the claims in `environ["extauthz.claims"]` (WSGI) or `scope["extauthz.claims"]`
(ASGI). Any other request gets one of these responses, and the application is not called:

    401  {"error": CODE, "error_description": TEXT} and `WWW-Authenticate: Bearer error="invalid_token", ...`;
         a request without the header gets `WWW-Authenticate: Bearer` and the code `missing_token`,
         as RFC 6750 section 3.1 requires for a request without credentials
    503  {"error": CODE, "error_description": TEXT} when the JWKS or the replay store is unavailable

The response never contains the token, and the log records only the error code and detail.

The path that is verified is the raw request target when the server provides it (REQUEST_URI or
RAW_URI in WSGI, raw_path in ASGI), else the decoded path percent-encoded again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from extauthz.verify import MalformedToken, MissingToken, TokenVerifier, VerificationError

__all__ = ["ASGIMiddleware", "WSGIMiddleware"]

log = logging.getLogger(__name__)

DEFAULT_HEADER = "txn-token"
CLAIMS_KEY = "extauthz.claims"
# Characters that RFC 3986 allows unencoded in a path, besides letters, digits and "-._~".
_PATH_SAFE = "/:@!$&'()*+,;="
_STATUS_LINES = {401: "401 Unauthorized", 503: "503 Service Unavailable"}

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _rejection(error: VerificationError) -> tuple[int, list[tuple[str, str]], bytes]:
    """Log a rejected request and return the status, headers and body of the response to it."""
    body = json.dumps({"error": error.code, "error_description": error.description}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store")]
    if error.status == 401:
        if isinstance(error, MissingToken):
            challenge = "Bearer"
        else:
            challenge = f'Bearer error="invalid_token", error_description="{error.description}"'
        headers.append(("WWW-Authenticate", challenge))
    level = logging.INFO if error.status == 401 else logging.WARNING
    log.log(level, "transaction token rejected", extra={"code": error.code, "detail": error.detail})
    return error.status, headers, body


def _encode_path(path: bytes) -> str:
    return urllib.parse.quote(path, safe=_PATH_SAFE)


class WSGIMiddleware:
    """Verify the transaction token of every request before calling `app`."""

    def __init__(self, app: WSGIApp, verifier: TokenVerifier, header: str = DEFAULT_HEADER):
        self.app = app
        self.verifier = verifier
        self.environ_key = "HTTP_" + header.upper().replace("-", "_")

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            claims = self._verify(environ)
        except VerificationError as error:
            status, headers, body = _rejection(error)
            start_response(_STATUS_LINES[status], headers)
            return [body]
        environ[CLAIMS_KEY] = claims
        return self.app(environ, start_response)

    def _verify(self, environ: Environ) -> dict[str, Any]:
        token = environ.get(self.environ_key)
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        return self.verifier.verify(token, method=environ.get("REQUEST_METHOD", ""), host=host,
                                    path=wsgi_request_path(environ))


def wsgi_request_path(environ: Environ) -> str:
    """Return the request target as received: REQUEST_URI or RAW_URI, else SCRIPT_NAME + PATH_INFO encoded.

    PEP 3333 servers decode PATH_INFO and pass its bytes as latin-1 characters. Encoding them again
    gives back the received path, except for the case of percent-escapes and for escapes of
    unreserved characters, and extauthz's normalisation removes both differences.
    """
    for name in ("REQUEST_URI", "RAW_URI"):
        target = environ.get(name)
        if not target:
            continue
        if target.startswith("/"):
            return target
        # An absolute-form target (`http://host/path`), as a client may send to a proxy.
        parts = urllib.parse.urlsplit(target)
        if parts.scheme and parts.netloc:
            return parts.path or "/"
    decoded = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return _encode_path(decoded.encode("latin-1"))


class ASGIMiddleware:
    """Verify the transaction token of every HTTP request and WebSocket handshake before calling `app`.

    Verification runs in asyncio's default thread pool, because a JWKS refresh and the replay store's
    claim block. Lifespan and other scopes pass through unchanged.
    """

    def __init__(self, app: ASGIApp, verifier: TokenVerifier, header: str = DEFAULT_HEADER):
        self.app = app
        self.verifier = verifier
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # The spec allows any iterable of headers: read it once, and give the application the list.
        scope = {**scope, "headers": list(scope.get("headers", ()))}
        try:
            claims = await self._verify(scope)
        except VerificationError as error:
            await self._reject(scope, receive, send, error)
            return
        scope[CLAIMS_KEY] = claims
        await self.app(scope, receive, send)

    async def _verify(self, scope: Scope) -> dict[str, Any]:
        headers = scope["headers"]
        tokens = [value for name, value in headers if name == self.header]
        if len(tokens) > 1:
            raise MalformedToken(f"{len(tokens)} transaction token headers")
        token = tokens[0].decode("latin-1") if tokens else None

        hosts = [value for name, value in headers if name == b"host"]
        if hosts:
            host = hosts[0].decode("latin-1")
        elif scope.get("server"):
            server_host, server_port = scope["server"][0], scope["server"][1]
            host = f"[{server_host}]:{server_port}" if ":" in server_host else f"{server_host}:{server_port}"
        else:
            host = ""
        # A WebSocket handshake is always a GET.
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        return await asyncio.to_thread(self.verifier.verify, token, method=method, host=host,
                                       path=asgi_request_path(scope))

    async def _reject(self, scope: Scope, receive: Receive, send: Send, error: VerificationError) -> None:
        status, headers, body = _rejection(error)
        if scope["type"] == "websocket":
            # Closing before the accept makes the server reject the handshake with HTTP 403.
            message = await receive()
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]})
        await send({"type": "http.response.body", "body": body})


def asgi_request_path(scope: Scope) -> str:
    """Return the request path as received: raw_path when the server provides it, else path encoded again.

    The ASGI spec defines `path` as the request target without the query, percent-decoded and
    UTF-8 decoded, so it includes `root_path`.
    """
    raw_path = scope.get("raw_path")
    if raw_path:
        return raw_path.decode("latin-1")
    return _encode_path(scope.get("path", "").encode("utf-8"))
