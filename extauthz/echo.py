"""A tiny upstream for demos and tests: returns the request it received, as JSON, for every request."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable

from waitress.server import create_server


def echo_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items() if key.startswith("HTTP_")
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    body = json.dumps({
        "method": environ.get("REQUEST_METHOD"),
        # REQUEST_URI is the request target as sent; PATH_INFO is percent-decoded and has no query.
        "path": environ.get("REQUEST_URI") or environ.get("PATH_INFO"),
        "headers": headers,
    }, indent=2).encode() + b"\n"
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class EchoServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.server = create_server(echo_app, host=host, port=port, threads=4, ident="echo")
        # waitress reports the bound port as a string.
        self.port = int(self.server.effective_port)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo", daemon=True)

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.server.run()
        except OSError:
            # close() from another thread can pull the socket out from under select(): expected on stop.
            if not self._stopping.is_set():
                raise

    def stop(self) -> None:
        self._stopping.set()
        self.server.close()
