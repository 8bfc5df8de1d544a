"""Unit tests for JWKS parsing and for IssuerKeys fetching a key set from a real local HTTPS server.

The server listens on 127.0.0.1 with a certificate from a throwaway CA that this module generates,
and the issuer trusts that CA through `jwks_ca_file`.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import AUDIENCE, ISSUER, TestIdP, write_config
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

import extauthz.jwks
from extauthz.config import IssuerConfig, load_config
from extauthz.errors import JWKSError, TokenError
from extauthz.identity import TokenVerifier
from extauthz.jwks import MAX_JWKS_BYTES, IssuerKeys, parse_jwks

JWKS_PATH = "/.well-known/jwks.json"


# --- JWK builders -----------------------------------------------------------------------------


def ec_jwk(curve: ec.EllipticCurve | None = None, **fields: Any) -> dict[str, Any]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), **fields}


def ec_private_jwk(**fields: Any) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    return {**ECAlgorithm.to_jwk(key, as_dict=True), **fields}


def rsa_jwk(**fields: Any) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), **fields}


def ed25519_jwk(**fields: Any) -> dict[str, Any]:
    key = ed25519.Ed25519PrivateKey.generate()
    return {**OKPAlgorithm.to_jwk(key.public_key(), as_dict=True), **fields}


def jwks_document(*keys: Any) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


# --- parse_jwks -------------------------------------------------------------------------------


def test_parse_key_with_kid():
    key_set = parse_jwks(jwks_document(ec_jwk(kid="k1", alg="ES256", use="sig")), "test", ("ES256",), generation=7)
    assert list(key_set.keys) == ["k1"]
    assert key_set.keys["k1"].algorithm_name == "ES256"
    assert key_set.anonymous == ()
    assert key_set.generation == 7


def test_parse_key_without_kid():
    key_set = parse_jwks(jwks_document(ec_jwk()), "test", ("ES256",))
    assert key_set.keys == {}
    assert len(key_set.anonymous) == 1
    assert key_set.anonymous[0].algorithm_name == "ES256"


@pytest.mark.parametrize("kid", ["", 7, None])
def test_parse_kid_not_string(kid):
    key_set = parse_jwks(jwks_document(ec_jwk(kid=kid)), "test", ("ES256",))
    assert key_set.keys == {}
    assert len(key_set.anonymous) == 1


@pytest.mark.parametrize(
    ("jwk_factory", "algorithms", "expected"),
    [
        pytest.param(lambda: ec_jwk(kid="k"), ("ES256",), "ES256", id="ec-p256"),
        pytest.param(lambda: ec_jwk(ec.SECP384R1(), kid="k"), ("ES384",), "ES384", id="ec-p384"),
        pytest.param(lambda: ec_jwk(ec.SECP521R1(), kid="k"), ("ES512",), "ES512", id="ec-p521"),
        pytest.param(lambda: ed25519_jwk(kid="k"), ("EdDSA",), "EdDSA", id="ed25519"),
        pytest.param(lambda: rsa_jwk(kid="k"), ("ES256", "RS256"), "RS256", id="rsa-rs256"),
        pytest.param(lambda: rsa_jwk(kid="k"), ("PS256",), "PS256", id="rsa-ps256"),
        pytest.param(lambda: rsa_jwk(kid="k", alg="RS384"), ("RS384",), "RS384", id="rsa-alg-rs384"),
    ],
)
def test_parse_default_algorithm(jwk_factory, algorithms, expected):
    key_set = parse_jwks(jwks_document(jwk_factory()), "test", algorithms)
    assert key_set.keys["k"].algorithm_name == expected


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(ec_private_jwk(kid="bad"), id="private-ec"),
        pytest.param(ec_jwk(kid="bad", use="enc"), id="use-enc"),
        pytest.param(ec_jwk(kid="bad", use=""), id="use-empty"),
        pytest.param({"kty": "oct", "kid": "bad", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}, id="kty-oct"),
        pytest.param({**ec_jwk(kid="bad"), "kty": "XYZ"}, id="kty-unknown"),
        pytest.param({k: v for k, v in ec_jwk(kid="bad").items() if k != "kty"}, id="kty-missing"),
        pytest.param(ec_jwk(kid="bad", alg="ES384"), id="alg-not-allowed"),
        pytest.param(ec_jwk(kid="bad", alg="none"), id="alg-none"),
        pytest.param(ec_jwk(ec.SECP384R1(), kid="bad"), id="curve-not-allowed"),
        pytest.param(rsa_jwk(kid="bad"), id="rsa-not-allowed"),
        pytest.param({**ec_jwk(kid="bad"), "crv": "P-999"}, id="curve-unknown"),
        pytest.param({**ec_jwk(kid="bad"), "x": "AAAA"}, id="point-truncated"),
        pytest.param({**ec_jwk(kid="bad"), "x": 7}, id="point-not-string"),
        pytest.param("not a key", id="string"),
        pytest.param(["kty", "EC"], id="list"),
        pytest.param(None, id="null"),
    ],
)
def test_parse_skips_entry(entry):
    good = ec_jwk(kid="good", alg="ES256")
    key_set = parse_jwks(jwks_document(entry, good), "test", ("ES256",))
    assert list(key_set.keys) == ["good"]
    assert key_set.anonymous == ()


def test_parse_private_key_alone_rejected():
    with pytest.raises(JWKSError, match="no usable signature key"):
        parse_jwks(jwks_document(ec_private_jwk(kid="private")), "test", ("ES256",))


def test_parse_nothing_usable():
    entries = [ec_jwk(kid="a", use="enc"), rsa_jwk(kid="b"), {"kty": "oct", "k": "c2VjcmV0"}]
    with pytest.raises(JWKSError) as caught:
        parse_jwks(jwks_document(*entries), "https://idp.test/jwks", ("ES256",))
    assert "https://idp.test/jwks" in str(caught.value)
    assert "ES256" in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"\xff\xfe\x00\x00", id="not-utf8"),
        pytest.param(b'{"keys": [{"kty": "EC"},]}', id="trailing-comma"),
    ],
)
def test_parse_invalid_json(data):
    with pytest.raises(JWKSError, match="invalid JSON"):
        parse_jwks(data, "test", ("ES256",))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[]", id="list"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no-keys"),
        pytest.param(b'{"keys": {}}', id="keys-object"),
        pytest.param(b'{"keys": "k1"}', id="keys-string"),
        pytest.param(b'{"keys": []}', id="keys-empty"),
    ],
)
def test_parse_wrong_shape(data):
    with pytest.raises(JWKSError):
        parse_jwks(data, "test", ("ES256",))


# --- IssuerKeys with a jwks_file --------------------------------------------------------------


def issuer_config(**overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER, "audiences": (AUDIENCE,), "algorithms": ("ES256",), "jwks_file": None,
        "jwks_uri": None, "jwks_ca_file": None, "max_token_lifetime": 3600.0, "leeway": 30.0,
        "jwks_refresh_interval": 300.0, "jwks_min_refresh_interval": 30.0, "jwks_timeout": 2.0,
    }
    values.update(overrides)
    return IssuerConfig(**values)


def test_file_load_from_config(tmp_path, idp):
    config = load_config(write_config(tmp_path, idp))
    keys = IssuerKeys(config.issuers[0])
    assert not keys.loaded

    keys.load()
    assert keys.loaded
    key, generation = keys.find(idp.kid)
    assert key.algorithm_name == "ES256"
    assert generation == 1


def test_file_missing(tmp_path):
    keys = IssuerKeys(issuer_config(jwks_file=tmp_path / "missing.json"))
    with pytest.raises(JWKSError, match="cannot read"):
        keys.load()
    assert not keys.loaded


def test_file_without_usable_key(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_document(rsa_jwk(kid="rsa")))
    with pytest.raises(JWKSError):
        IssuerKeys(issuer_config(jwks_file=path)).load()


def test_file_unknown_kid_not_refreshed(tmp_path, idp):
    path = tmp_path / "jwks.json"
    path.write_bytes(json.dumps(idp.jwks()).encode())
    keys = IssuerKeys(issuer_config(jwks_file=path, jwks_min_refresh_interval=0.0))
    keys.load()
    assert keys.find("unknown") is None
    assert keys.refresh() is False


def test_file_anonymous_lookup(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_document(ec_jwk(kid="named"), ec_jwk()))
    keys = IssuerKeys(issuer_config(jwks_file=path))
    keys.load()
    found = keys.find(None)
    assert found is not None
    assert found[0] is keys.key_set().anonymous[0]


def test_file_two_anonymous_keys(tmp_path):
    # A token without kid cannot choose between two keys without kid.
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_document(ec_jwk(), ec_jwk()))
    keys = IssuerKeys(issuer_config(jwks_file=path))
    keys.load()
    assert keys.find(None) is None


def test_file_named_key_not_anonymous(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_document(ec_jwk(kid="named")))
    keys = IssuerKeys(issuer_config(jwks_file=path))
    keys.load()
    assert keys.find(None) is None


# --- a local HTTPS JWKS server ----------------------------------------------------------------


class TestCA:
    """A self-signed CA and a server certificate it issued for the IP address 127.0.0.1."""

    __test__ = False

    def __init__(self, folder: Path):
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "extauthz test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file = folder / "server.pem"
        self.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = folder / "server-key.pem"
        self.key_file.write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))


class JwksServer:
    """An HTTPS server on 127.0.0.1 that serves `body` with `status` and counts the requests."""

    def __init__(self, ca: TestCA):
        self.status = 200
        self.body = b'{"keys": []}'
        self.location: str | None = None
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ca.cert_file, ca.key_file)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.uri = f"https://127.0.0.1:{self.port}{JWKS_PATH}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="jwks-test-server", daemon=True)
        self._thread.start()
        self._stopped = False

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
                with server._lock:
                    server.requests.append((self.path, self.headers.get("Accept")))
                    status, body, location = server.status, server.body, server.location
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        return Handler

    @property
    def hits(self) -> int:
        with self._lock:
            return len(self.requests)

    def serve(self, jwks: dict[str, Any] | bytes, status: int = 200) -> None:
        with self._lock:
            self.body = jwks if isinstance(jwks, bytes) else json.dumps(jwks).encode()
            self.status = status

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


class FakeMonotonic:
    """A stand-in for the `time` module inside extauthz.jwks, with a monotonic clock that tests move."""

    def __init__(self, start: float = 10_000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def jwks_server(local_ca, idp):
    server = JwksServer(local_ca)
    server.serve(idp.jwks())
    yield server
    server.stop()


@pytest.fixture
def monotonic(monkeypatch) -> FakeMonotonic:
    clock = FakeMonotonic()
    monkeypatch.setattr(extauthz.jwks, "time", clock)
    return clock


def uri_keys(server: JwksServer, ca: TestCA | None, **overrides: Any) -> IssuerKeys:
    return IssuerKeys(issuer_config(jwks_uri=server.uri, jwks_ca_file=ca.ca_file if ca else None, **overrides))


# --- IssuerKeys with a jwks_uri ---------------------------------------------------------------


def test_uri_initial_fetch(jwks_server, local_ca, idp):
    keys = uri_keys(jwks_server, local_ca)
    assert not keys.loaded

    keys.load()
    assert keys.loaded
    assert jwks_server.hits == 1
    assert jwks_server.requests[0] == (JWKS_PATH, "application/json")
    key, generation = keys.find(idp.kid)
    assert key.algorithm_name == "ES256"
    assert generation == 1


def test_uri_config_loaded(tmp_path, jwks_server, local_ca, idp):
    issuer = {"issuer": ISSUER, "jwks_uri": jwks_server.uri, "jwks_ca_file": str(local_ca.ca_file),
              "audiences": [AUDIENCE], "algorithms": ["ES256"], "jwks_min_refresh_interval": "10s"}
    config = load_config(write_config(tmp_path, idp, overrides={"issuers": [issuer]}))
    keys = IssuerKeys(config.issuers[0])
    keys.load()
    assert keys.find(idp.kid) is not None
    assert jwks_server.hits == 1


def test_uri_untrusted_certificate(jwks_server):
    keys = uri_keys(jwks_server, None)
    keys.load()
    assert not keys.loaded
    assert keys.refresh() is False
    assert jwks_server.hits == 0


def test_uri_failing_at_start(jwks_server, local_ca, idp):
    jwks_server.serve(b"unavailable", status=500)
    keys = uri_keys(jwks_server, local_ca)
    keys.load()
    assert not keys.loaded
    assert keys.find(idp.kid) is None

    jwks_server.serve(idp.jwks())
    assert keys.refresh() is True
    assert keys.loaded
    assert keys.find(idp.kid) is not None


def test_uri_unknown_kid_refresh_rate_limited(jwks_server, local_ca, idp, monotonic):
    keys = uri_keys(jwks_server, local_ca, jwks_min_refresh_interval=30.0)
    keys.load()
    assert jwks_server.hits == 1

    # Within the interval since the last fetch: no request at all.
    monotonic.now += 10
    for _ in range(5):
        assert keys.find("unknown") is None
    assert jwks_server.hits == 1

    # Past the interval: exactly one refresh, then rate-limited again.
    monotonic.now += 25
    for _ in range(5):
        assert keys.find("unknown") is None
    assert jwks_server.hits == 2

    monotonic.now += 31
    assert keys.find("unknown") is None
    assert jwks_server.hits == 3


def test_uri_known_kid_no_refresh(jwks_server, local_ca, idp, monotonic):
    keys = uri_keys(jwks_server, local_ca, jwks_min_refresh_interval=0.0)
    keys.load()
    monotonic.now += 3600
    for _ in range(5):
        assert keys.find(idp.kid) is not None
    assert jwks_server.hits == 1


def test_uri_rotated_key_picked_up(jwks_server, local_ca, idp, monotonic):
    keys = uri_keys(jwks_server, local_ca, jwks_min_refresh_interval=30.0)
    keys.load()
    rotated = TestIdP()
    jwks_server.serve(rotated.jwks())

    monotonic.now += 5
    assert keys.find(rotated.kid) is None
    assert jwks_server.hits == 1

    monotonic.now += 30
    found = keys.find(rotated.kid)
    assert found is not None
    assert found[1] == 2
    assert jwks_server.hits == 2
    assert keys.find(idp.kid) is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"unavailable", 500, id="status-500"),
        pytest.param(b"", 503, id="status-503"),
        pytest.param(b'{"error": "not found"}', 404, id="status-404"),
        pytest.param(b"<html>maintenance</html>", 200, id="not-json"),
        pytest.param(b'{"keys": []}', 200, id="no-keys"),
        pytest.param(b" " * (MAX_JWKS_BYTES + 1), 200, id="oversized"),
    ],
)
def test_uri_failure_keeps_last_good(jwks_server, local_ca, idp, body, status):
    keys = uri_keys(jwks_server, local_ca)
    keys.load()
    before = keys.key_set()

    jwks_server.serve(body, status=status)
    assert keys.refresh() is False
    assert jwks_server.hits == 2
    assert keys.key_set() is before
    assert keys.find(idp.kid) == (before.keys[idp.kid], 1)


def test_uri_server_stopped_keeps_last_good(jwks_server, local_ca, idp, monotonic):
    keys = uri_keys(jwks_server, local_ca, jwks_min_refresh_interval=0.0)
    keys.load()
    jwks_server.stop()

    assert keys.refresh() is False
    monotonic.now += 60
    assert keys.find("unknown") is None
    assert keys.find(idp.kid) is not None
    assert keys.loaded


def test_uri_redirect_to_http_rejected(jwks_server, local_ca, idp):
    # The plain HTTP server would serve a valid key set: only the scheme makes the fetch fail.
    body = json.dumps(idp.jwks()).encode()
    plain_requests: list[str] = []

    class PlainHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            plain_requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PlainHandler)
    plain_thread = threading.Thread(target=plain.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    plain_thread.start()
    try:
        keys = uri_keys(jwks_server, local_ca)
        jwks_server.location = f"http://127.0.0.1:{plain.server_address[1]}{JWKS_PATH}"
        jwks_server.serve(b"", status=302)
        assert keys.refresh() is False
        assert not keys.loaded
        assert plain_requests == []
    finally:
        plain.shutdown()
        plain.server_close()
        plain_thread.join(timeout=10)


def test_uri_redirect_to_https_followed(jwks_server, local_ca, idp):
    target = JwksServer(local_ca)
    target.serve(idp.jwks())
    try:
        keys = uri_keys(jwks_server, local_ca)
        jwks_server.location = target.uri
        jwks_server.serve(b"", status=302)
        assert keys.refresh() is True
        assert target.hits == 1
        assert keys.find(idp.kid) is not None
    finally:
        target.stop()


def test_uri_background_refresh(jwks_server, local_ca, idp):
    # jwks_refresh_interval is clamped to at least one second, so this test waits about that long.
    keys = uri_keys(jwks_server, local_ca, jwks_refresh_interval=1.0)
    keys.load()
    rotated = TestIdP()
    jwks_server.serve(rotated.jwks())
    pause = threading.Event()
    keys.start()
    try:
        for _ in range(150):
            if keys.key_set().generation >= 2:
                break
            pause.wait(0.1)
    finally:
        keys.stop()
    assert keys.key_set().generation >= 2
    assert jwks_server.hits >= 2
    assert keys.find(rotated.kid) is not None


def test_uri_rotation_invalidates_cache(jwks_server, local_ca, idp, monotonic):
    keys = uri_keys(jwks_server, local_ca, jwks_min_refresh_interval=30.0)
    keys.load()
    verifier = TokenVerifier({ISSUER: keys}, 100)
    old_token = idp.token()
    old_user = verifier.verify(old_token)
    assert verifier.verify(old_token) is old_user

    rotated = TestIdP()
    jwks_server.serve(rotated.jwks())
    monotonic.now += 31
    new_user = verifier.verify(rotated.token())
    assert new_user.kid == rotated.kid
    assert jwks_server.hits == 2

    with pytest.raises(TokenError) as caught:
        verifier.verify(old_token)
    assert caught.value.code == "invalid_token"


def test_uri_other_key_same_kid_after_rotation(jwks_server, local_ca, idp, monotonic):
    # The IdP reuses a kid for a new key: the old token must fail against the new key.
    keys = uri_keys(jwks_server, local_ca, jwks_min_refresh_interval=30.0)
    keys.load()
    verifier = TokenVerifier({ISSUER: keys}, 100)
    old_token = idp.token()
    verifier.verify(old_token)

    replacement = TestIdP()
    jwks_server.serve({"keys": [{**replacement.jwk, "kid": idp.kid}]})
    monotonic.now += 31
    assert keys.refresh() is True

    with pytest.raises(TokenError) as caught:
        verifier.verify(old_token)
    assert caught.value.code == "invalid_token"
    token = jwt.encode(replacement.claims(), replacement.private_key, algorithm="ES256", headers={"kid": idp.kid})
    assert verifier.verify(token).kid == idp.kid
