"""Unit tests for request normalisation: host, path and the CheckRequest to HttpRequest mapping."""

from __future__ import annotations

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from helpers import check_request
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.errors import REASONS, DenyError, RequestError
from extauthz.request import from_check_request, normalise_host, normalise_path

MAX_PATH = 8192


# --- normalise_host ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "scheme", "host", "port"),
    [
        ("shop.example.com", "http", "shop.example.com", None),
        ("Shop.Example.COM", "http", "shop.example.com", None),
        ("shop.example.com.", "http", "shop.example.com", None),
        ("SHOP.example.com.:8080", "http", "shop.example.com", 8080),
        ("  shop.example.com  ", "http", "shop.example.com", None),
        ("shop.example.com:80", "http", "shop.example.com", None),
        ("shop.example.com:443", "https", "shop.example.com", None),
        ("shop.example.com:443", "http", "shop.example.com", 443),
        ("shop.example.com:80", "https", "shop.example.com", 80),
        ("shop.example.com:8080", "http", "shop.example.com", 8080),
        ("shop.example.com:00080", "http", "shop.example.com", None),
        ("shop.example.com:1", "http", "shop.example.com", 1),
        ("shop.example.com:65535", "https", "shop.example.com", 65535),
        ("localhost", "http", "localhost", None),
        ("backend_v2.shop.svc", "http", "backend_v2.shop.svc", None),
        ("10.0.0.9:8080", "http", "10.0.0.9", 8080),
        ("[::1]", "http", "[::1]", None),
        ("[::1]:8443", "https", "[::1]", 8443),
        ("[::1]:443", "https", "[::1]", None),
        ("[::1]:80", "http", "[::1]", None),
        ("[2001:DB8::1]", "https", "[2001:db8::1]", None),
        ("[::ffff:10.0.0.9]:8080", "http", "[::ffff:10.0.0.9]", 8080),
    ],
)
def test_host_normalised(authority, scheme, host, port):
    assert normalise_host(authority, scheme) == (host, port)


@pytest.mark.parametrize(
    "authority",
    [
        "",
        "   ",
        "user@shop.example.com",
        "user:secret@shop.example.com",
        "@shop.example.com",
        "shop.example.com@evil.example",
        ".",
        ":8080",
        "shop..example.com",
        ".shop.example.com",
        "-shop.example.com",
        "shop-.example.com",
        "shop example.com",
        "shop.example.com/admin",
        "shop.example.com\\admin",
        "shop\u00e9.example.com",
        "a" * 64 + ".example.com",
        ("a" * 60 + ".") * 5,
        "shop.example.com\n:8080",
        "shop.example.com\n.",
        "[::1",
        "[::1]x",
        "[zz::1]",
        "[:::]",
        "[1::2::3]",
        "[10.0.0.9]",
        "[]",
        "[fe80::1%25eth0]",
    ],
)
def test_host_invalid(authority):
    with pytest.raises(RequestError) as caught:
        normalise_host(authority, "http")
    assert caught.value.code == "invalid_host"


@pytest.mark.parametrize(
    "authority",
    [
        "shop.example.com:",
        "shop.example.com:http",
        "shop.example.com:-1",
        "shop.example.com:+80",
        "shop.example.com: 80",
        "shop.example.com:0",
        "shop.example.com:65536",
        "shop.example.com:99999",
        "shop.example.com:123456",
        "shop.example.com:80:80",
        "shop.example.com:\u00b2",
        "shop.example.com:\u0668\u0660",
        "[::1]:",
        "[::1]:0",
        "[::1]:65536",
        "[::1]:\u00b2",
        "[::1]:" + "9" * 5000,
        "[::1]8080",
    ],
)
def test_host_invalid_port(authority):
    with pytest.raises(RequestError) as caught:
        normalise_host(authority, "http")
    assert caught.value.code == "invalid_host"


def test_host_longest_name_accepted():
    labels = ["a" * 63, "b" * 63, "c" * 63, "d" * 61]
    name = ".".join(labels)
    assert len(name) == 253
    assert normalise_host(name, "http") == (name, None)


# --- normalise_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/", "/", ""),
        ("/public/items", "/public/items", ""),
        ("/public/items?id=7&x=/../admin", "/public/items", "id=7&x=/../admin"),
        ("/public?", "/public", ""),
        ("/public?a?b", "/public", "a?b"),
        ("/public/../admin", "/admin", ""),
        ("/public/./../admin", "/admin", ""),
        ("/a/./b", "/a/b", ""),
        ("/a/b/../c", "/a/c", ""),
        ("/a/b/../../c", "/c", ""),
        ("/..", "/", ""),
        ("/../admin", "/admin", ""),
        ("/../../../admin", "/admin", ""),
        ("/.", "/", ""),
        ("/a/.", "/a/", ""),
        ("/a/b/..", "/a/", ""),
        ("/a/..", "/", ""),
        ("/a/", "/a/", ""),
        ("//admin", "/admin", ""),
        ("///admin//users///", "/admin/users/", ""),
        ("/public//..//admin", "/admin", ""),
        ("/%41dmin", "/Admin", ""),
        ("/%61dmin", "/admin", ""),
        ("/%7e/%7E", "/~/~", ""),
        ("/a%2Db%5Fc%2E", "/a-b_c.", ""),
        ("/%30%39", "/09", ""),
        ("/public/%2e%2e/admin", "/admin", ""),
        ("/public/%2E%2E/admin", "/admin", ""),
        ("/public/.%2e/admin", "/admin", ""),
        ("/public/%2e/admin", "/public/admin", ""),
        ("/a/%2e%2e", "/", ""),
        ("/a/%3a", "/a/%3A", ""),
        ("/a%3Bb", "/a%3Bb", ""),
        ("/a%3fb?q", "/a%3Fb", "q"),
        ("/a%20b", "/a%20b", ""),
        ("/a%23b", "/a%23b", ""),
        ("/caf%c3%a9", "/caf%C3%A9", ""),
        ("/a/..b/c", "/a/..b/c", ""),
        ("/a/.b", "/a/.b", ""),
        ("/a/...", "/a/...", ""),
    ],
)
def test_path_normalised(raw, path, query):
    assert normalise_path(raw, MAX_PATH) == (path, query)


@pytest.mark.parametrize(
    "raw",
    [
        "/admin%2Fx",
        "/admin%2fx",
        "/admin%5Cx",
        "/admin%5cx",
        "/admin%00",
        "/admin%2541",
        "/admin%252e%252e",
        "/admin%25",
        "/admin%zz",
        "/admin%",
        "/admin%4",
        "/admin%4g",
        "/admin%%41",
        "/admin\\x",
        "\\admin",
        "/admin#top",
        "/admin?x#top",
        "/admin\x00",
        "/admin\x01",
        "/admin\x1f",
        "/admin\x7f",
        "/admin\t",
        "/admin\r\n",
        "/admin\n",
        "/ad min",
        "/admin ",
        "/admin\u00e9",
        "/admin\u2215x",
        "",
        "admin",
        "*",
        "?x=1",
        "http://shop.example.com/admin",
        "/..;/admin",
        "/public/..;/admin",
        "/public/..;jsessionid=1/admin",
        "/.;/admin",
        "/public/.;x/admin",
        "/public/%2e%2e;/admin",
        "/public/%2e;/admin",
        "/a;b/c",
        "/admin;v=1/users",
        "/a;/x..;",
        "/public;jsessionid=1",
    ],
)
def test_path_invalid(raw):
    with pytest.raises(RequestError) as caught:
        normalise_path(raw, MAX_PATH)
    assert caught.value.code == "invalid_path"


def test_path_length_limit():
    limit = 256
    at_limit = "/" + "a" * (limit - 1)
    assert normalise_path(at_limit, limit) == (at_limit, "")

    with pytest.raises(RequestError) as caught:
        normalise_path(at_limit + "a", limit)
    assert caught.value.code == "invalid_path"


def test_path_length_counts_query():
    with pytest.raises(RequestError) as caught:
        normalise_path("/a?" + "q" * 300, 256)
    assert caught.value.code == "invalid_path"


def test_path_decoded_once():
    # %2541 would decode to %41 and then to A: rejected outright rather than decoded twice.
    with pytest.raises(RequestError):
        normalise_path("/%2541", MAX_PATH)
    assert normalise_path("/%41", MAX_PATH) == ("/A", "")


_PATH_ALPHABET = st.sampled_from(
    ["/", ".", "..", "%", "%2e", "%2E", "%2f", "%5c", "%25", "%41", "%7e", "%3a", "%3B", "%zz", "%4",
     ";", "?", "#", "\\", " ", "\x00", "\n", "a", "b", "~", "-", "\u00e9"]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_PATH_ALPHABET, max_size=20).map("".join)))
def test_path_property_canonical(raw):
    try:
        path, _ = normalise_path(raw, MAX_PATH)
    except RequestError as exc:
        assert exc.code == "invalid_path"
        return

    assert path.startswith("/")
    assert "//" not in path
    assert "/./" not in path
    assert "/../" not in path
    assert not path.endswith("/.")
    assert not path.endswith("/..")
    assert normalise_path(path, MAX_PATH) == (path, "")


# --- from_check_request -----------------------------------------------------------------------


def _tcp_check_request() -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy's network (TCP) ext_authz filter sends it: no request.http."""
    attributes = attribute_context_pb2.AttributeContext()
    attributes.source.principal = "spiffe://cluster.local/ns/web/sa/frontend"
    attributes.source.address.socket_address.address = "10.0.0.7"
    attributes.source.address.socket_address.port_value = 41234
    attributes.destination.principal = "spiffe://cluster.local/ns/shop/sa/backend"
    attributes.destination.address.socket_address.address = "10.0.0.9"
    attributes.destination.address.socket_address.port_value = 5432
    attributes.request.time.GetCurrentTime()
    return external_auth_pb2.CheckRequest(attributes=attributes)


def test_check_request_fields():
    request = from_check_request(check_request(method="POST", host="Shop.Example.com:8443", path="/api/../admin?x=1",
                                               scheme="https"), MAX_PATH)
    assert request.method == "POST"
    assert request.scheme == "https"
    assert request.host == "shop.example.com"
    assert request.authority_port == 8443
    assert request.path == "/admin"
    assert request.query == "x=1"
    assert request.headers[":method"] == "POST"
    assert request.source_address == "10.0.0.7"
    assert request.source_principal == "spiffe://cluster.local/ns/web/sa/frontend"
    assert request.destination_principal == "spiffe://cluster.local/ns/shop/sa/backend"
    assert request.destination_port == 8080
    assert request.port == 8080


def test_check_request_tcp_rejected():
    with pytest.raises(DenyError) as caught:
        from_check_request(_tcp_check_request(), MAX_PATH)
    assert caught.value.code == "non_http_request"
    assert REASONS[caught.value.code].status == 403


def test_check_request_empty_rejected():
    with pytest.raises(DenyError) as caught:
        from_check_request(external_auth_pb2.CheckRequest(), MAX_PATH)
    assert caught.value.code == "non_http_request"


@pytest.mark.parametrize(
    "method",
    ["", "GE T", "GET\n", "GET\r\nX-Injected: 1", "G\u00c9T", "GET/", "GET:", "M" * 33],
)
def test_check_request_bad_method(method):
    with pytest.raises(RequestError) as caught:
        from_check_request(check_request(method=method), MAX_PATH)
    assert caught.value.code == "invalid_request"


@pytest.mark.parametrize("method", ["GET", "get", "PROPFIND", "M-SEARCH", "M" * 32])
def test_check_request_method_kept(method):
    assert from_check_request(check_request(method=method), MAX_PATH).method == method


@pytest.mark.parametrize(("scheme", "expected"), [("http", "http"), ("HTTPS", "https"), ("", "http")])
def test_check_request_scheme(scheme, expected):
    assert from_check_request(check_request(scheme=scheme), MAX_PATH).scheme == expected


@pytest.mark.parametrize("scheme", ["ftp", "ws", "h2c"])
def test_check_request_bad_scheme(scheme):
    with pytest.raises(RequestError) as caught:
        from_check_request(check_request(scheme=scheme), MAX_PATH)
    assert caught.value.code == "invalid_request"


def test_check_request_bad_host():
    with pytest.raises(RequestError) as caught:
        from_check_request(check_request(host="user@shop.example.com"), MAX_PATH)
    assert caught.value.code == "invalid_host"


def test_check_request_bad_path():
    with pytest.raises(RequestError) as caught:
        from_check_request(check_request(path="/admin%2F"), MAX_PATH)
    assert caught.value.code == "invalid_path"


def test_check_request_path_limit():
    with pytest.raises(RequestError) as caught:
        from_check_request(check_request(path="/" + "a" * 300), 256)
    assert caught.value.code == "invalid_path"


def test_check_request_header_map():
    check = check_request(path="/ignored", headers={})
    http = check.attributes.request.http
    http.ClearField("headers")
    http.ClearField("host")
    http.ClearField("path")
    entries = [(":authority", b"Shop.Example.com"), (":path", b"/public/./items?id=1"), (":method", b"GET"),
               ("X-Request-Id", b"map-id-1"), ("Accept", b"text/html"), ("accept", b"application/json"),
               ("x-latin", "caf\u00e9".encode("latin-1"))]
    for name, raw_value in entries:
        entry = http.header_map.headers.add()
        entry.key = name
        entry.raw_value = raw_value
    entry = http.header_map.headers.add()
    entry.key = "x-plain"
    entry.value = "plain-value"

    request = from_check_request(check, MAX_PATH)
    assert request.host == "shop.example.com"
    assert request.path == "/public/items"
    assert request.query == "id=1"
    assert request.request_id == "map-id-1"
    assert request.headers["accept"] == "text/html,application/json"
    assert request.headers["x-latin"] == "caf\u00e9"
    assert request.headers["x-plain"] == "plain-value"
    assert "X-Request-Id" not in request.headers


def test_check_request_headers_win_over_map():
    check = check_request(headers={"x-source": "headers"})
    entry = check.attributes.request.http.header_map.headers.add()
    entry.key = "x-source"
    entry.raw_value = b"header_map"
    request = from_check_request(check, MAX_PATH)
    assert request.headers["x-source"] == "headers"


def test_check_request_host_from_header():
    check = check_request(host="shop.example.com")
    check.attributes.request.http.ClearField("host")
    check.attributes.request.http.headers[":authority"] = "Other.Example.com"
    check.attributes.request.http.ClearField("path")
    check.attributes.request.http.headers[":path"] = "//x"
    request = from_check_request(check, MAX_PATH)
    assert request.host == "other.example.com"
    assert request.path == "/x"


def test_check_request_missing_host():
    check = check_request()
    check.attributes.request.http.ClearField("host")
    del check.attributes.request.http.headers[":authority"]
    with pytest.raises(RequestError) as caught:
        from_check_request(check, MAX_PATH)
    assert caught.value.code == "invalid_host"


@pytest.mark.parametrize(
    ("header_id", "http_id", "expected"),
    [
        ("req-1", "12345", "req-1"),
        ("6f0c7a1e-3b2d-4c1e-9d7a-0e5b8c2f4a19", "12345", "6f0c7a1e-3b2d-4c1e-9d7a-0e5b8c2f4a19"),
        ("", "12345", "12345"),
        (None, "12345", "12345"),
        ("bad id", "12345", "12345"),
        ("bad\nid", "12345", "12345"),
        ("req-1\n", "12345", "12345"),
        ("x" * 129, "12345", "12345"),
        ("x" * 128, "12345", "x" * 128),
        ("caf\u00e9", "12345", "12345"),
        ("bad id", "", ""),
        ("bad id", "also bad", ""),
        ("bad id", "12345\n", ""),
    ],
)
def test_check_request_request_id(header_id, http_id, expected):
    check = check_request()
    http = check.attributes.request.http
    if header_id is None:
        del http.headers["x-request-id"]
    else:
        http.headers["x-request-id"] = header_id
    http.id = http_id
    assert from_check_request(check, MAX_PATH).request_id == expected


@pytest.mark.parametrize(
    ("principal", "extensions", "expected"),
    [
        ("spiffe://cluster.local/ns/shop/sa/backend", {}, "shop"),
        ("cluster.local/ns/shop/sa/backend", {}, "shop"),
        ("spiffe://cluster.local/ns/shop/sa/backend", {"namespace": "billing"}, "shop"),
        ("", {"namespace": "billing"}, "billing"),
        ("spiffe://cluster.local/sa/backend", {"namespace": "billing"}, "billing"),
        ("", {}, ""),
        ("spiffe://cluster.local/ns", {}, ""),
    ],
)
def test_check_request_destination_namespace(principal, extensions, expected):
    request = from_check_request(check_request(destination_principal=principal, context_extensions=extensions),
                                 MAX_PATH)
    assert request.destination_namespace == expected


def test_check_request_context_extensions():
    request = from_check_request(check_request(context_extensions={"namespace": "billing", "tier": "gold"}),
                                 MAX_PATH)
    assert request.context_extensions == {"namespace": "billing", "tier": "gold"}


@pytest.mark.parametrize(
    ("principal", "expected"),
    [("spiffe://cluster.local/ns/web/sa/frontend", "web"), ("", ""), ("spiffe://other/sa/x", "")],
)
def test_check_request_source_namespace(principal, expected):
    request = from_check_request(check_request(source_principal=principal), MAX_PATH)
    assert request.source_namespace == expected


@pytest.mark.parametrize(
    ("destination_port", "host", "scheme", "expected"),
    [
        (8080, "shop.example.com:9000", "http", 8080),
        (0, "shop.example.com:9000", "http", 9000),
        (0, "shop.example.com", "http", 80),
        (0, "shop.example.com", "https", 443),
        (0, "shop.example.com:443", "https", 443),
    ],
)
def test_check_request_port(destination_port, host, scheme, expected):
    request = from_check_request(check_request(destination_port=destination_port, host=host, scheme=scheme),
                                 MAX_PATH)
    assert request.port == expected
