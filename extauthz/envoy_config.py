"""Envoy bootstrap for a standalone Envoy in front of one upstream, with extauthz as ext_authz.

The HTTP connection manager normalises paths as extauthz does (RFC 3986 dot segments, merged
slashes) and rejects escaped slashes, so the path extauthz authorizes is the path the upstream gets.
The ext_authz filter fails closed (`failure_mode_allow: false`) and returns 503 when extauthz cannot
be reached. The route passes `context_extensions: {namespace: ...}`, which tells extauthz the
destination namespace when there is no mTLS destination principal.

With `server.workers` > 1, the extauthz cluster lists every worker's own port (`listen.worker_grpc` + i)
with round-robin load balancing, so Envoy sends each worker an equal share of the Checks. The shared
`listen.grpc` port would spread only connections, and Envoy opens one HTTP/2 connection per worker
thread: with `--concurrency 1`, every Check would go to one worker (docs/operations.md shows the
counts). Outlier detection takes a worker out of the rotation at its first connection failure or
reset, and active gRPC health checks keep it out until it serves again, and also take out a worker
that drains.
"""

from __future__ import annotations

from typing import Any

from extauthz.config import Address, Config

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
# Active health checks of worker endpoints. A worker that stopped responding leaves the rotation after
# `unhealthy_threshold` failed checks, so within about two seconds.
HEALTH_CHECK = {
    "timeout": "1s",
    "interval": "1s",
    "no_traffic_interval": "5s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
    "grpc_health_check": {"service_name": AUTHORIZATION_SERVICE},
}
# Ejects a worker at its first local-origin failure (connection refused or reset), such as a worker
# that exited; a passing health check brings it back. At most half the workers are ejected at once.
OUTLIER_DETECTION = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 1,
    "interval": "1s",
    "base_ejection_time": "5s",
    "max_ejection_percent": 50,
}


def extauthz_addresses(config: Config) -> list[Address]:
    """Return the addresses through which an Envoy on this host reaches extauthz.

    That is `listen.grpc` for one process, else every worker's own port. A wildcard host becomes
    127.0.0.1.
    """
    if config.server.workers == 1:
        addresses = [config.listen.grpc]
    else:
        addresses = [config.listen.worker_address(index) for index in range(config.server.workers)]
    return [Address("127.0.0.1", address.port) if address.host in ("0.0.0.0", "::") else address
            for address in addresses]


def cluster_config(name: str, address: Address | list[Address], http2: bool = False) -> dict[str, Any]:
    """Return a static cluster of one address, or of several with round-robin and gRPC health checks."""
    addresses = address if isinstance(address, list) else [address]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": item.host, "port_value": item.port}}}} for item in addresses]}],
        },
    }
    if len(addresses) > 1:
        cluster["lb_policy"] = "ROUND_ROBIN"
        cluster["health_checks"] = [HEALTH_CHECK]
        cluster["outlier_detection"] = OUTLIER_DETECTION
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def ext_authz_filter(cluster: str = "extauthz", timeout: str = "0.25s") -> dict[str, Any]:
    """Return the ext_authz HTTP filter entry for an HttpConnectionManager."""
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": timeout},
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "include_peer_certificate": True,
        },
    }


def bootstrap(*, listen: Address, admin: Address, extauthz: Address | list[Address], upstream: Address,
              namespace: str = "demo", timeout: str = "0.25s") -> dict[str, Any]:
    """Return a complete static Envoy bootstrap as a dict (serialise it as YAML or JSON).

    `extauthz` is one address, or every worker's own address.
    """
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "upstream", "timeout": "5s"},
        "typed_per_filter_config": {
            EXT_AUTHZ_FILTER: {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"namespace": namespace}},
            }
        },
    }
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            ext_authz_filter("extauthz", timeout),
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": admin.host, "port_value": admin.port}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": listen.host, "port_value": listen.port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": connection_manager,
                }]}],
            }],
            "clusters": [cluster_config("extauthz", extauthz, http2=True), cluster_config("upstream", upstream)],
        },
    }


def envoy_command(envoy: str, config_path: str) -> list[str]:
    """Return the command line that runs Envoy on a bootstrap file without shared-memory clashes."""
    return [envoy, "-c", config_path, "--disable-hot-restart", "--log-level", "warning",
            "--concurrency", "1"]
