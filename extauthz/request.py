"""CheckRequest to HttpRequest: every normalisation that happens before policy matching.

Policies match the normalised form. docs/request-normalisation.md lists the rules and
tests/test_request.py has a table test for each. In short, the host is lower-cased without a default
port and the query is split off. Unreserved percent-escapes are decoded exactly once, slashes are
merged and dot segments removed. Anything that parsers could read two ways (encoded `/`, `\\`, NUL
or `%`, backslashes, fragments, control characters, `;` path parameters) is a 400 `invalid_path`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from extauthz.errors import RequestError

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_FORBIDDEN_ESCAPES = frozenset(("2F", "5C", "00", "25"))
_HEX = frozenset("0123456789abcdefABCDEF")
# The patterns end in \Z, not $, because $ also matches before a trailing newline.
_PATH_CHARS = re.compile(r"^[\x21-\x7e]*\Z")
_HOST = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")
_IPV6_HOST = re.compile(r"^\[[0-9a-f:.]+\]\Z")
# ASCII digits only: str.isdigit() also accepts digits such as "²" that int() cannot parse.
_PORT = re.compile(r"^[0-9]{1,5}\Z")
_METHOD = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}\Z")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SPIFFE = "spiffe://"
# The methods of RFC 9110 and PATCH, which _METHOD accepts: a set lookup skips the regex for them.
_STANDARD_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
# Hosts, paths and principals up to this length are read once and then looked up in a bounded cache
# of NORMALISED_CACHE_SIZE entries each, so each cache keeps at most 512 KiB of input text.
_CACHED_INPUT_LENGTH = 256
NORMALISED_CACHE_SIZE = 2048


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """The normalised facts of one request that policies and the decision log read."""

    method: str
    scheme: str
    host: str
    authority_port: int | None
    path: str
    query: str
    # The CheckRequest's own header map when Envoy sends `headers`, else a dict built from `header_map`.
    headers: Mapping[str, str] = field(repr=False)
    request_id: str
    source_address: str
    source_principal: str
    destination_principal: str
    destination_port: int | None
    destination_address: str = ""
    # The CheckRequest's own map when read from one, as `headers` is.
    context_extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def source_namespace(self) -> str:
        return principal_namespace(self.source_principal)

    @property
    def destination_namespace(self) -> str:
        return principal_namespace(self.destination_principal) or self.context_extensions.get("namespace", "")

    @property
    def port(self) -> int | None:
        """The destination port: the workload's port when Envoy reports it, else the authority's."""
        if self.destination_port:
            return self.destination_port
        if self.authority_port:
            return self.authority_port
        return _DEFAULT_PORTS.get(self.scheme)


def strip_spiffe(principal: str) -> str:
    """Return a SPIFFE ID in Istio's principal form: `cluster.local/ns/NS/sa/SA`."""
    return principal[len(_SPIFFE):] if principal.startswith(_SPIFFE) else principal


# Principals name workloads, so a few hundred cover a mesh. Longer ones are not cached.
@functools.lru_cache(maxsize=NORMALISED_CACHE_SIZE)
def _cached_principal_namespace(principal: str) -> str:
    return _principal_namespace(principal)


def principal_namespace(principal: str) -> str:
    if len(principal) <= _CACHED_INPUT_LENGTH:
        return _cached_principal_namespace(principal)
    return _principal_namespace(principal)


def _principal_namespace(principal: str) -> str:
    parts = strip_spiffe(principal).split("/")
    for index in range(len(parts) - 1):
        if parts[index] == "ns":
            return parts[index + 1]
    return ""


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def normalise_host(authority: str, scheme: str) -> tuple[str, int | None]:
    """Return the lower-case host and its port, or None when the port is the scheme's default."""
    if len(authority) <= _CACHED_INPUT_LENGTH:
        return _normalise_host_cached(authority, scheme)
    return _normalise_host(authority, scheme)


def _normalise_host(authority: str, scheme: str) -> tuple[str, int | None]:
    text = authority.strip().lower()
    if not text or "@" in text:
        raise RequestError("invalid_host", "empty host or userinfo in the authority")

    port: int | None = None
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        host += "]"
        if rest:
            if not rest.startswith(":") or not _PORT.match(rest[1:]):
                raise RequestError("invalid_host", "invalid port in the authority")
            port = int(rest[1:])
        if not bracket or not _IPV6_HOST.match(host) or not _is_ipv6(host[1:-1]):
            raise RequestError("invalid_host", "invalid IPv6 literal in the authority")
    else:
        host, sep, port_text = text.partition(":")
        if sep:
            if not _PORT.match(port_text):
                raise RequestError("invalid_host", "invalid port in the authority")
            port = int(port_text)
        host = host[:-1] if host.endswith(".") else host
        if not host or len(host) > 253 or not _HOST.match(host):
            raise RequestError("invalid_host", "invalid host name in the authority")

    if port is not None and not 0 < port <= 65535:
        raise RequestError("invalid_host", "port out of range in the authority")
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return host, port


def normalise_path(raw: str, max_bytes: int) -> tuple[str, str]:
    """Return the normalised path and the raw query; raise RequestError for ambiguous paths."""
    if len(raw) <= _CACHED_INPUT_LENGTH:
        return _normalise_path_cached(raw, max_bytes)
    return _normalise_path(raw, max_bytes)


def _normalise_path(raw: str, max_bytes: int) -> tuple[str, str]:
    if len(raw) > max_bytes:
        raise RequestError("invalid_path", f"path longer than {max_bytes} bytes")
    if not _PATH_CHARS.match(raw):
        raise RequestError("invalid_path", "control, space or non-ASCII character in the path")
    if "#" in raw:
        raise RequestError("invalid_path", "fragment in the path")

    path, _, query = raw.partition("?")
    if not path.startswith("/"):
        raise RequestError("invalid_path", "path does not start with /")
    if "\\" in path:
        raise RequestError("invalid_path", "backslash in the path")

    decoded = _decode_unreserved(path)
    segments: list[str] = []
    for segment in decoded.split("/")[1:]:
        if ";" in segment:
            # Servlet containers and some frameworks drop `;params` from segments, others keep them:
            # `/admin;v=1/users` is /admin/users to one backend and another path to the next.
            raise RequestError("invalid_path", "path parameter (;) in the path")
        if segment == "" or segment == ".":
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)

    normalised = "/" + "/".join(segments)
    # A trailing slash or trailing dot segment names a directory: keep the slash.
    if len(normalised) > 1 and (decoded.endswith("/") or decoded.endswith("/.") or decoded.endswith("/..")):
        normalised += "/"
    return normalised, query


# Both functions are pure and return immutable tuples. A RequestError is raised again on every call,
# never cached.
_normalise_host_cached = functools.lru_cache(maxsize=NORMALISED_CACHE_SIZE)(_normalise_host)
_normalise_path_cached = functools.lru_cache(maxsize=NORMALISED_CACHE_SIZE)(_normalise_path)


def _decode_unreserved(path: str) -> str:
    if "%" not in path:
        return path
    out: list[str] = []
    index = 0
    length = len(path)
    while index < length:
        char = path[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        hex_digits = path[index + 1:index + 3]
        if len(hex_digits) != 2 or not set(hex_digits) <= _HEX:
            raise RequestError("invalid_path", "invalid percent-escape in the path")
        hex_digits = hex_digits.upper()
        if hex_digits in _FORBIDDEN_ESCAPES:
            raise RequestError("invalid_path", f"encoded %{hex_digits} in the path")
        decoded = chr(int(hex_digits, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + hex_digits)
        index += 3
    return "".join(out)


def _address_ip(address: object) -> tuple[str, int | None]:
    socket_address = address.socket_address  # type: ignore[attr-defined]
    return socket_address.address, (socket_address.port_value or None)


@dataclass(frozen=True, slots=True)
class Peer:
    """The request id, both ends' principals and addresses, and the context extensions set in Envoy.

    All of them are readable even from a malformed request.
    """

    request_id: str
    source_address: str
    source_principal: str
    destination_principal: str
    destination_address: str
    destination_port: int | None
    context_extensions: dict[str, str] = field(default_factory=dict)


def _header_value(http: attribute_context_pb2.AttributeContext.HttpRequest, name: str) -> str:
    value = http.headers.get(name)
    if value is not None:
        return value
    for entry in http.header_map.headers:
        if entry.key.lower() == name:
            return entry.raw_value.decode("latin-1") if entry.raw_value else entry.value
    return ""


def read_peer(check: external_auth_pb2.CheckRequest) -> Peer:
    """Read the request id, the principals and addresses of both ends and the context extensions.

    Nothing else of the request is read or validated.
    """
    attributes = check.attributes
    http = attributes.request.http
    request_id = _header_value(http, "x-request-id")
    if not _REQUEST_ID.match(request_id):
        request_id = http.id if _REQUEST_ID.match(http.id) else ""
    source_address, _ = _address_ip(attributes.source.address)
    destination_address, destination_port = _address_ip(attributes.destination.address)
    return Peer(
        request_id=request_id,
        source_address=source_address,
        source_principal=attributes.source.principal,
        destination_principal=attributes.destination.principal,
        destination_address=destination_address,
        destination_port=destination_port,
        context_extensions=dict(attributes.context_extensions),
    )


def from_check_request(check: external_auth_pb2.CheckRequest, max_path_bytes: int,
                       peer: Peer | None = None) -> HttpRequest:
    """Normalise a CheckRequest; raise RequestError (a deny) for anything malformed."""
    attributes = check.attributes
    if not attributes.request.HasField("http"):
        raise RequestError("non_http_request", "CheckRequest without HTTP attributes")
    http = attributes.request.http
    peer = peer or read_peer(check)

    method = http.method
    if method not in _STANDARD_METHODS and not _METHOD.match(method):
        raise RequestError("invalid_request", "invalid HTTP method")
    scheme = http.scheme
    if scheme != "http" and scheme != "https":
        scheme = (scheme or "http").lower()
        if scheme not in _DEFAULT_PORTS:
            raise RequestError("invalid_request", "unsupported scheme")

    # The header map is read in place, not copied: nothing changes the CheckRequest during a Check.
    headers: Mapping[str, str] = http.headers
    if not headers and http.header_map.headers:
        # Envoy sends header_map instead of headers when encode_raw_headers is on.
        merged: dict[str, str] = {}
        for entry in http.header_map.headers:
            value = entry.raw_value.decode("latin-1") if entry.raw_value else entry.value
            name = entry.key.lower()
            merged[name] = f"{merged[name]},{value}" if name in merged else value
        headers = merged

    authority = http.host or headers.get(":authority", "")
    host, authority_port = normalise_host(authority, scheme)
    path, query = normalise_path(http.path or headers.get(":path", ""), max_path_bytes)

    return HttpRequest(
        method=method,
        scheme=scheme,
        host=host,
        authority_port=authority_port,
        path=path,
        query=query,
        headers=headers,
        request_id=peer.request_id,
        source_address=peer.source_address,
        source_principal=peer.source_principal,
        destination_principal=peer.destination_principal,
        destination_address=peer.destination_address,
        destination_port=peer.destination_port,
        context_extensions=peer.context_extensions,
    )
