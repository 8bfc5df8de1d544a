"""The Envoy configuration that istiod generates for CUSTOM AuthorizationPolicies, rebuilt for tests.

For a workload selected by a CUSTOM policy, istiod puts two HTTP filters on the sidecar's inbound
listener (pilot/pkg/security/authz/builder in istio/istio, files builder.go and extauthz.go, and the
expected outputs in its testdata/http folder):

1. `envoy.filters.http.rbac` with the policies' rules as `shadow_rules` (action DENY) and
   `shadow_rules_stat_prefix: istio_ext_authz_`. It never denies. When a rule matches, Envoy stores the
   rule's name as the dynamic metadata key `istio_ext_authz_shadow_effective_policy_id`.
2. `envoy.filters.http.ext_authz`, translated from the mesh's `envoyExtAuthzGrpc` extension provider,
   with a `filter_enabled_metadata` matcher on that key. So only requests that match a CUSTOM rule
   reach the authorization service, and every other request passes without a Check.

The functions here mirror that translation. They cover the fields that the shipped policies and the
provider use, and raise ValueError on anything else rather than guess at Istio's output. The listener
is shaped like an Istio inbound listener: mTLS with SPIFFE certificates, so Envoy reports both
principals in the CheckRequest, and no `context_extensions`, because Istio sets none.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extauthz.config import Address
from extauthz.envoy_config import cluster_config

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
RBAC_FILTER = "envoy.filters.http.rbac"
# Istio's authzmodel.RBACExtAuthzShadowRulesStatPrefix and RBACShadowEffectivePolicyID.
SHADOW_STAT_PREFIX = "istio_ext_authz_"
SHADOW_POLICY_KEY = SHADOW_STAT_PREFIX + "shadow_effective_policy_id"
INBOUND_CLUSTER = "inbound|8080||"



@dataclass(frozen=True)
class IstioRelease:
    """How a line of Istio releases names the gRPC authority and the CUSTOM rules.

    Older releases derive the `:authority` of Checks from the cluster name, with each `|` replaced by
    `_.`, and name every CUSTOM rule `istio-ext-authz-ns[...]...`. Later ones send the provider's service
    host as the authority and put the provider name into the rule names and the matcher prefix, so
    that one workload can use several providers.
    """

    name: str
    authority_from_cluster: bool
    provider_in_rule_names: bool

    def authority(self, cluster: str, service: str) -> str:
        return cluster.replace("|", "_.") if self.authority_from_cluster else service

    def rule_prefix(self, provider: str) -> str:
        return f"istio-ext-authz-{provider}" if self.provider_in_rule_names else "istio-ext-authz"


RELEASES = (
    IstioRelease("cluster-authority", authority_from_cluster=True, provider_in_rule_names=False),
    IstioRelease("per-provider", authority_from_cluster=False, provider_in_rule_names=True),
)


def outbound_cluster(service: str, port: int) -> str:
    """Return the name of Istio's outbound cluster for a service host and port."""
    return f"outbound|{port}||{service}"


def ext_authz_filter(provider: dict[str, Any], release: IstioRelease) -> dict[str, Any]:
    """Return the ext_authz HTTP filter that istiod builds from one `envoyExtAuthzGrpc` provider entry."""
    grpc = provider["envoyExtAuthzGrpc"]
    known = {"service", "port", "timeout", "failOpen", "statusOnError", "includeRequestBodyInCheck"}
    unknown = set(grpc) - known
    if unknown:
        raise ValueError(f"envoyExtAuthzGrpc fields not translated here: {sorted(unknown)}")

    cluster = outbound_cluster(grpc["service"], int(grpc["port"]))
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": cluster, "authority": release.authority(cluster, grpc["service"])},
            # Istio's default when the provider sets no timeout.
            "timeout": grpc.get("timeout", "600s"),
        },
        "failure_mode_allow": bool(grpc.get("failOpen", False)),
        "filter_enabled_metadata": {
            "filter": RBAC_FILTER,
            "path": [{"key": SHADOW_POLICY_KEY}],
            "value": {"string_match": {"prefix": release.rule_prefix(provider["name"])}},
        },
    }
    # Without statusOnError, istiod leaves the field unset and Envoy returns 403 on errors.
    if "statusOnError" in grpc:
        config["status_on_error"] = {"code": int(grpc["statusOnError"])}
    body = grpc.get("includeRequestBodyInCheck")
    if body is not None:
        config["with_request_body"] = {
            "max_request_bytes": body.get("maxRequestBytes", 0),
            "allow_partial_message": body.get("allowPartialMessage", False),
            "pack_as_bytes": body.get("packAsBytes", False),
        }
    return {"name": EXT_AUTHZ_FILTER, "typed_config": config}


def _string_match(value: str, ignore_case: bool = False) -> dict[str, Any]:
    """Translate an Istio string value (exact, `prefix*` or `*suffix`) into an Envoy StringMatcher."""
    if "{" in value or value == "*":
        raise ValueError(f"value {value!r} is not translated here: only exact, prefix* and *suffix")
    if value.endswith("*"):
        match: dict[str, Any] = {"prefix": value[:-1]}
    elif value.startswith("*"):
        match = {"suffix": value[1:]}
    else:
        match = {"exact": value}
    if ignore_case:
        match["ignore_case"] = True
    return match


def _operation_permission(operation: dict[str, Any]) -> dict[str, Any]:
    """Translate one `to.operation` into an RBAC permission: every field must match, any value of it."""
    fields = []
    for name, values in operation.items():
        if name == "methods":
            rules = [{"header": {"name": ":method", "string_match": {"exact": value}}} for value in values]
        elif name == "paths":
            rules = [{"url_path": {"path": _string_match(value)}} for value in values]
        elif name == "hosts":
            rules = [{"header": {"name": ":authority", "string_match": _string_match(value, ignore_case=True)}}
                     for value in values]
        elif name == "ports":
            rules = [{"destination_port": int(value)} for value in values]
        else:
            raise ValueError(f"operation field {name!r} is not translated here")
        fields.append({"or_rules": {"rules": rules}})
    return {"and_rules": {"rules": fields}}


def shadow_rbac_filter(policies: list[dict[str, Any]], release: IstioRelease) -> dict[str, Any]:
    """Return the RBAC filter that istiod puts before ext_authz for these CUSTOM policies."""
    rbac_policies: dict[str, Any] = {}
    for policy in policies:
        spec = policy["spec"]
        prefix = release.rule_prefix(spec["provider"]["name"])
        for index, rule in enumerate(spec.get("rules") or []):
            if set(rule) - {"to"}:
                raise ValueError(f"rule fields {sorted(set(rule) - {'to'})} are not translated here")
            name = f"{prefix}-ns[{policy['metadata']['namespace']}]-policy[{policy['metadata']['name']}]-rule[{index}]"
            rbac_policies[name] = {
                "permissions": [_operation_permission(entry["operation"]) for entry in rule["to"]],
                # A rule without `from` matches every source.
                "principals": [{"and_ids": {"ids": [{"any": True}]}}],
            }
    return {
        "name": RBAC_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {"action": "DENY", "policies": rbac_policies},
            "shadow_rules_stat_prefix": SHADOW_STAT_PREFIX,
        },
    }


def path_normalisation(normalization: str) -> dict[str, Any]:
    """Return the HttpConnectionManager fields that Istio sets for `meshConfig.pathNormalization`."""
    settings: dict[str, dict[str, Any]] = {
        "NONE": {"normalize_path": False},
        "BASE": {"normalize_path": True},
        "MERGE_SLASHES": {"normalize_path": True, "merge_slashes": True},
        "DECODE_AND_MERGE_SLASHES": {"normalize_path": True, "merge_slashes": True,
                                     "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
    }
    return settings[normalization]


@dataclass(frozen=True)
class Certificates:
    """PEM files of a mesh CA and two workload certificates with SPIFFE URI SANs."""

    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    server_principal: str
    client_principal: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def write_certificates(folder: Path, server_principal: str, client_principal: str) -> Certificates:
    """Write a CA and a server and a client certificate, valid for one day, into `folder`.

    The server certificate also names 127.0.0.1, so that the test client can check the host name.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("test mesh CA"))
        .issuer_name(_name("test mesh CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(principal: str, stem: str, ip: str | None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(principal)]
        if ip is not None:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        certificate = (
            x509.CertificateBuilder()
            # Istio's workload certificates have an empty subject and a critical SAN extension.
            .subject_name(x509.Name([]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        certificate_path = folder / f"{stem}.pem"
        key_path = folder / f"{stem}-key.pem"
        certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return certificate_path, key_path

    folder.mkdir(parents=True, exist_ok=True)
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    server, server_key = issue(server_principal, "server", "127.0.0.1")
    client, client_key = issue(client_principal, "client", None)
    return Certificates(ca_path, server, server_key, client, client_key, server_principal, client_principal)


def inbound_bootstrap(*, listen: Address, admin: Address, extauthz: Address, upstream: Address,
                      certificates: Certificates, authz_filters: list[dict[str, Any]],
                      provider: dict[str, Any], normalization: str) -> dict[str, Any]:
    """Return a static Envoy bootstrap shaped like a sidecar's inbound listener for one HTTP port.

    The extauthz cluster carries Istio's outbound cluster name for the provider's service, with
    HTTP/2 as Istio configures it for a port whose appProtocol is grpc.
    """
    grpc = provider["envoyExtAuthzGrpc"]
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "inbound_0.0.0.0_8080",
        **path_normalisation(normalization),
        "route_config": {
            "name": "inbound|8080||",
            "virtual_hosts": [{"name": "inbound|http|8080", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": INBOUND_CLUSTER, "timeout": "5s"}}]}],
        },
        "http_filters": [
            *authz_filters,
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(certificates.server)},
                                      "private_key": {"filename": str(certificates.server_key)}}],
                "validation_context": {"trusted_ca": {"filename": str(certificates.ca)}},
            },
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": admin.host, "port_value": admin.port}}},
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": {"socket_address": {"address": listen.host, "port_value": listen.port}},
                "filter_chains": [{
                    "transport_socket": downstream_tls,
                    "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": connection_manager}],
                }],
            }],
            "clusters": [
                cluster_config(outbound_cluster(grpc["service"], int(grpc["port"])), extauthz, http2=True),
                cluster_config(INBOUND_CLUSTER, upstream, http2=False),
            ],
        },
    }
