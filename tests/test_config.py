"""load_config and parse_duration: every error names the file, the dotted key and the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import AUDIENCE, ISSUER, TOKEN_ISSUER, write_config

from extauthz.config import Address, load_config, parse_duration
from extauthz.dev_idp import generate_idp_keys
from extauthz.errors import ConfigError

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"
EXTAUTHZ = Path(sys.executable).with_name("extauthz")


def config_data(folder: Path, idp) -> dict[str, Any]:
    """Write a valid configuration with its JWKS and policies into `folder`; return it as a dict."""
    path = write_config(folder, idp)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_data(folder: Path, data: Any, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def load_changed(folder: Path, idp, change: Callable[[dict[str, Any]], Any]):
    data = config_data(folder, idp)
    change(data)
    return load_config(write_data(folder, data))


def config_error(folder: Path, idp, change: Callable[[dict[str, Any]], Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_changed(folder, idp, change)
    return caught.value


# --- parse_duration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("6h", 21_600.0), ("1.5m", 90.0), ("0s", 0.0), (" 2s ", 2.0),
     ("1h30m", 5400.0), ("2m30s", 150.0)],
)
def test_duration_parsed(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "5 minutes", "-1s", "1d", "s", "", "1h 30m", "1e3s", "5M", "30s5"])
def test_invalid_duration_rejected(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [30, 1.5, None, ["30s"]])
def test_non_string_duration_rejected(value):
    with pytest.raises(ValueError, match="expected a duration with a unit"):
        parse_duration(value)


# --- valid configurations ----------------------------------------------------------------------------


def test_example_config_loads(tmp_path):
    # A copy, with the development IdP keys that `make run` would generate: a fresh clone has none.
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLE_CONFIG.parent, folder, ignore=shutil.ignore_patterns("dev-idp"))
    generate_idp_keys(folder / "dev-idp")
    config = load_config(folder / EXAMPLE_CONFIG.name)
    assert config.issuers[0].issuer == "https://idp.example.test"
    assert config.issuers[0].jwks_file == folder / "dev-idp" / "jwks.json"
    assert config.issuers[0].max_token_lifetime == 3600.0
    assert config.policies.paths == (folder / "policies",)
    assert config.token.ttl == 30.0
    assert config.token.signing.rotate_every == 21_600.0
    assert config.decision_log.sink == "stdout"


def test_test_config_loads(tmp_path, idp):
    config = load_config(write_config(tmp_path, idp))
    assert config.listen.grpc == Address("127.0.0.1", 0)
    assert config.issuers[0].issuer == ISSUER
    assert config.issuers[0].audiences == (AUDIENCE,)
    assert config.issuers[0].algorithms == ("ES256",)
    assert config.token.issuer == TOKEN_ISSUER
    assert config.token.header == "txn-token"


def test_defaults(tmp_path, idp):
    data = config_data(tmp_path, idp)
    del data["listen"], data["decision_log"]
    data["token"] = {"issuer": TOKEN_ISSUER}
    data["issuers"][0] = {"issuer": ISSUER, "jwks_file": "idp-jwks.json", "audiences": [AUDIENCE],
                          "algorithms": ["ES256"]}
    config = load_config(write_data(tmp_path, data))

    assert config.listen.grpc == Address("127.0.0.1", 9191)
    assert config.listen.http == Address("127.0.0.1", 9192)
    assert config.issuers[0].max_token_lifetime is None
    assert config.issuers[0].leeway == 30.0
    assert config.issuers[0].jwks_refresh_interval == 300.0
    assert config.policies.provider == "extauthz"
    assert config.policies.root_namespace == "istio-system"
    assert config.token.header == "txn-token"
    assert config.token.ttl == 30.0
    assert config.token.signing.algorithm == "ES256"
    assert config.token.signing.rotate_every == 21_600.0
    assert config.token.signing.key_file is None
    assert config.decision_log.sink == "stdout"
    assert config.limits.max_token_bytes == 8192
    assert config.server.threads == 16
    assert config.server.drain_timeout == 10.0


@pytest.mark.parametrize(
    ("change", "read", "expected"),
    [
        (lambda d: d["server"].update(drain_timeout="500ms"), lambda c: c.server.drain_timeout, 0.5),
        (lambda d: d["issuers"][0].update(leeway="30s"), lambda c: c.issuers[0].leeway, 30.0),
        (lambda d: d["issuers"][0].update(jwks_refresh_interval="5m"),
         lambda c: c.issuers[0].jwks_refresh_interval, 300.0),
        (lambda d: d["token"]["signing"].update(rotate_every="6h"), lambda c: c.token.signing.rotate_every,
         21_600.0),
        (lambda d: d["token"].update(ttl="1m"), lambda c: c.token.ttl, 60.0),
        (lambda d: d["issuers"][0].update(max_token_lifetime="1.5h"), lambda c: c.issuers[0].max_token_lifetime,
         5400.0),
    ],
)
def test_durations_read(tmp_path, idp, change, read, expected):
    def change_all(data: dict[str, Any]) -> None:
        data.setdefault("server", {})
        change(data)

    assert read(load_changed(tmp_path, idp, change_all)) == expected


@pytest.mark.parametrize("value", ["30", "5 minutes", "-1s", 30])
def test_invalid_duration_key_rejected(tmp_path, idp, value):
    error = config_error(tmp_path, idp, lambda d: d["token"].update(ttl=value))
    assert error.key == "token.ttl"
    assert error.source == str(tmp_path / "config.yaml")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["token"].update(ttl="500ms"), "token.ttl"),
        (lambda d: d["token"].update(ttl="2h"), "token.ttl"),
        (lambda d: d["token"]["signing"].update(rotate_every="30s"), "token.signing.rotate_every"),
        (lambda d: d["issuers"][0].update(max_token_lifetime="0s"), "issuers[0].max_token_lifetime"),
        (lambda d: d["issuers"][0].update(jwks_timeout="1ms"), "issuers[0].jwks_timeout"),
    ],
)
def test_duration_out_of_range_rejected(tmp_path, idp, change, key):
    assert config_error(tmp_path, idp, change).key == key


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
        ("localhost:0", Address("localhost", 0)),
        ("[::1]:0", Address("::1", 0)),
        ("0.0.0.0:7000", Address("0.0.0.0", 7000)),
    ],
)
def test_listen_address_parsed(tmp_path, idp, address, expected):
    config = load_changed(tmp_path, idp, lambda d: d["listen"].update(grpc=address))
    assert config.listen.grpc == expected


def test_ipv6_address_text():
    assert str(Address("::1", 7000)) == "[::1]:7000"


@pytest.mark.parametrize("address", ["7000", "127.0.0.1", "127.0.0.1:", "127.0.0.1:70000", "127.0.0.1:http",
                                     ":7000", 7000, ["127.0.0.1", 7000]])
def test_bad_listen_address_rejected(tmp_path, idp, address):
    error = config_error(tmp_path, idp, lambda d: d["listen"].update(http=address))
    assert error.key == "listen.http"
    assert "127.0.0.1:9191" in str(error.fix)


@pytest.mark.parametrize("address", ["example.com:7000", "10.0.0:7000"])
def test_listen_host_name_rejected(tmp_path, idp, address):
    error = config_error(tmp_path, idp, lambda d: d["listen"].update(grpc=address))
    assert error.key == "listen.grpc"
    assert error.fix == "use an IP address or localhost"


def test_relative_paths_use_config_folder(tmp_path, idp, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "logs").mkdir()
    data = config_data(folder, idp)
    data["decision_log"] = {"sink": "file:logs/decisions.log"}
    path = write_data(folder, data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("..") / "etc" / "config.yaml")
    assert config.issuers[0].jwks_file == path.parent.resolve() / "idp-jwks.json"
    assert config.policies.paths == (path.parent.resolve() / "policies",)
    assert config.decision_log.path == path.parent.resolve() / "logs" / "decisions.log"


def test_key_file_relative(tmp_path, idp):
    (tmp_path / "signing.pem").write_text("not checked until the key ring loads it", encoding="utf-8")
    config = load_changed(tmp_path, idp, lambda d: d["token"]["signing"].update(key_file="signing.pem"))
    assert config.token.signing.key_file == tmp_path / "signing.pem"


def test_absolute_paths_kept(tmp_path, idp):
    jwks = tmp_path / "idp-jwks.json"
    config = load_changed(tmp_path, idp, lambda d: d["issuers"][0].update(jwks_file=str(jwks)))
    assert config.issuers[0].jwks_file == jwks


@pytest.mark.parametrize(
    ("sink", "kind", "relative_path"),
    [("stdout", "stdout", None), ("file:decisions.log", "file", "decisions.log"),
     ("file:logs/decisions.log", "file", "logs/decisions.log")],
)
def test_decision_log_sink(tmp_path, idp, sink, kind, relative_path):
    (tmp_path / "logs").mkdir()
    config = load_changed(tmp_path, idp, lambda d: d.update(decision_log={"sink": sink}))
    assert config.decision_log.sink == kind
    expected = None if relative_path is None else tmp_path / relative_path
    assert config.decision_log.path == expected


def test_decision_log_absolute_path(tmp_path, idp):
    target = tmp_path / "decisions.log"
    config = load_changed(tmp_path, idp, lambda d: d.update(decision_log={"sink": f"file:{target}"}))
    assert config.decision_log.path == target


@pytest.mark.parametrize(
    ("sink", "message"),
    [("syslog", "invalid sink 'syslog'"), ("file:", "invalid sink 'file:'"),
     ("file:missing/decisions.log", "folder not found"), ("", "expected a non-empty string")],
)
def test_invalid_decision_log_sink_rejected(tmp_path, idp, sink, message):
    error = config_error(tmp_path, idp, lambda d: d.update(decision_log={"sink": sink}))
    assert error.key == "decision_log.sink"
    assert message in error.message


@pytest.mark.parametrize(("header", "expected"), [("X-Txn-Token", "x-txn-token"), ("txn-token", "txn-token")])
def test_token_header_lower_cased(tmp_path, idp, header, expected):
    config = load_changed(tmp_path, idp, lambda d: d["token"].update(header=header))
    assert config.token.header == expected


@pytest.mark.parametrize("header", ["authorization", "Authorization", "host", ":authority", "txn token", "tök"])
def test_invalid_token_header_rejected(tmp_path, idp, header):
    error = config_error(tmp_path, idp, lambda d: d["token"].update(header=header))
    assert error.key == "token.header"
    assert error.fix == "use a name such as txn-token"


# --- unknown and missing keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "suggestion"),
    [
        (lambda d: d.update(listn=d.pop("listen")), "listn", "listen"),
        (lambda d: d.update(limit={"max_token_bytes": 4096}), "limit", "limits"),
        (lambda d: d.update(decisionlog=d.pop("decision_log")), "decisionlog", "decision_log"),
        (lambda d: d["token"].update(tll="30s"), "token.tll", "token.ttl"),
        (lambda d: d["token"]["signing"].update(algoritm="ES256"), "token.signing.algoritm",
         "token.signing.algorithm"),
        (lambda d: d["issuers"][0].update(leway="10s"), "issuers[0].leway",
         "issuers[0].leeway"),
        (lambda d: d["policies"].update(root_namspace="mesh-root"), "policies.root_namspace",
         "policies.root_namespace"),
        (lambda d: d["listen"].update(grcp="127.0.0.1:0"), "listen.grcp", "listen.grpc"),
        (lambda d: d.update(server={"thread": 4}), "server.thread", "server.threads"),
    ],
)
def test_unknown_key_rejected(tmp_path, idp, change, key, suggestion):
    error = config_error(tmp_path, idp, change)
    text = str(error)
    assert error.key == key
    assert error.message == "unknown key"
    assert error.fix == f"did you mean {suggestion!r}?"
    assert text.startswith(f"{tmp_path / 'config.yaml'}: {key}: unknown key")


@pytest.mark.parametrize(
    ("change", "key", "suggestion"),
    [
        (lambda d: d.update(polices=d.pop("policies")), "polices", "policies"),
        (lambda d: d.update(tokens=d.pop("token")), "tokens", "token"),
        (lambda d: d.update(issuer=d.pop("issuers")), "issuer", "issuers"),
    ],
)
def test_misspelt_section_rejected(tmp_path, idp, change, key, suggestion):
    error = config_error(tmp_path, idp, change)
    assert error.key == key
    assert error.fix == f"did you mean {suggestion!r}?"


@pytest.mark.parametrize(
    ("change", "key", "fix"),
    [
        (lambda d: d["issuers"][0].update(audience=d["issuers"][0].pop("audiences")), "issuers[0].audiences",
         "did you mean 'issuers[0].audiences' instead of 'issuers[0].audience'?"),
        (lambda d: d["token"].update(isuer=d["token"].pop("issuer")), "token.issuer",
         "did you mean 'token.issuer' instead of 'token.isuer'?"),
    ],
)
def test_misspelt_required_key_rejected(tmp_path, idp, change, key, fix):
    error = config_error(tmp_path, idp, change)
    assert error.key == key
    assert error.message == "missing"
    assert error.fix == fix


def test_unrelated_unknown_key_lists_known(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d.update(limits={"colour": "blue"}))
    assert error.key == "limits.colour"
    assert error.fix == "known keys: max_path_bytes, max_token_bytes, token_cache_size"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["token"].pop("issuer"), "token.issuer"),
        (lambda d: d.pop("token"), "token.issuer"),
        (lambda d: d["policies"].pop("paths"), "policies.paths"),
        (lambda d: d.pop("policies"), "policies.paths"),
        (lambda d: d["issuers"][0].pop("issuer"), "issuers[0].issuer"),
        (lambda d: d["issuers"][0].pop("audiences"), "issuers[0].audiences"),
        (lambda d: d["issuers"][0].pop("algorithms"), "issuers[0].algorithms"),
    ],
)
def test_missing_required_key_rejected(tmp_path, idp, change, key):
    error = config_error(tmp_path, idp, change)
    assert error.key == key
    assert error.message == "missing"
    assert error.fix == f"set {key}"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["policies"].update(paths=[]), "policies.paths"),
        (lambda d: d["issuers"][0].update(audiences=[]), "issuers[0].audiences"),
        (lambda d: d["issuers"][0].update(algorithms=[]), "issuers[0].algorithms"),
    ],
)
def test_empty_required_list_rejected(tmp_path, idp, change, key):
    error = config_error(tmp_path, idp, change)
    assert error.key == key
    assert error.message == "must not be empty"


def test_missing_policy_path_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d["policies"].update(paths=["absent/"]))
    assert error.key == "policies.paths"
    assert str(tmp_path / "absent") in error.message


# --- issuers -----------------------------------------------------------------------------------------


def test_jwks_file_missing_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d["issuers"][0].update(jwks_file="absent.json"))
    assert error.key == "issuers[0].jwks_file"
    assert error.message == f"file not found: {tmp_path / 'absent.json'}"


def test_jwks_file_and_uri_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d["issuers"][0].update(jwks_uri="https://idp.test/jwks"))
    assert error.key == "issuers[0].jwks_file"
    assert error.message == "set exactly one of jwks_file and jwks_uri"


def test_no_jwks_source_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d["issuers"][0].pop("jwks_file"))
    assert error.key == "issuers[0].jwks_file"
    assert error.message == "set exactly one of jwks_file and jwks_uri"


def test_jwks_uri_accepted(tmp_path, idp):
    def use_uri(data: dict[str, Any]) -> None:
        del data["issuers"][0]["jwks_file"]
        data["issuers"][0]["jwks_uri"] = "https://idp.test/jwks.json"

    config = load_changed(tmp_path, idp, use_uri)
    assert config.issuers[0].jwks_uri == "https://idp.test/jwks.json"
    assert config.issuers[0].jwks_file is None


@pytest.mark.parametrize("uri", ["http://idp.test/jwks.json", "idp.test/jwks.json", "file:///etc/jwks.json", 5])
def test_jwks_uri_not_https_rejected(tmp_path, idp, uri):
    def use_uri(data: dict[str, Any]) -> None:
        del data["issuers"][0]["jwks_file"]
        data["issuers"][0]["jwks_uri"] = uri

    error = config_error(tmp_path, idp, use_uri)
    assert error.key == "issuers[0].jwks_uri"
    assert error.fix == "use an https:// URI"


@pytest.mark.parametrize("algorithms", [["HS256"], ["ES256", "HS512"], ["none"], ["es256"]])
def test_unsupported_algorithm_rejected(tmp_path, idp, algorithms):
    error = config_error(tmp_path, idp, lambda d: d["issuers"][0].update(algorithms=algorithms))
    assert error.key == "issuers[0].algorithms"
    assert error.message.startswith("unsupported algorithm")


def test_asymmetric_algorithms_accepted(tmp_path, idp):
    algorithms = ["ES256", "RS256", "PS256", "EdDSA"]
    config = load_changed(tmp_path, idp, lambda d: d["issuers"][0].update(algorithms=algorithms))
    assert config.issuers[0].algorithms == tuple(algorithms)


def test_duplicate_issuer_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d["issuers"].append(dict(d["issuers"][0])))
    assert error.key == "issuers[1].issuer"


def test_issuer_equal_to_token_issuer_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d["token"].update(issuer=ISSUER))
    assert error.key == "issuers[0].issuer"


def test_issuer_not_mapping_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d.update(issuers=["https://idp.test"]))
    assert error.key == "issuers[0]"
    assert error.message == "expected a mapping, got str"


def test_issuers_not_list_rejected(tmp_path, idp):
    error = config_error(tmp_path, idp, lambda d: d.update(issuers=d["issuers"][0]))
    assert error.key == "issuers"


# --- other sections ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["token"]["signing"].update(algorithm="RS256"), "token.signing.algorithm"),
        (lambda d: d["token"]["signing"].update(key_file="absent.pem"), "token.signing.key_file"),
        (lambda d: d.update(limits={"max_token_bytes": 100}), "limits.max_token_bytes"),
        (lambda d: d.update(limits={"max_path_bytes": "8k"}), "limits.max_path_bytes"),
        (lambda d: d.update(server={"threads": 0}), "server.threads"),
        (lambda d: d.update(server={"max_pending": True}), "server.max_pending"),
        (lambda d: d.update(listen="127.0.0.1:0"), "listen"),
    ],
)
def test_invalid_value_rejected(tmp_path, idp, change, key):
    assert config_error(tmp_path, idp, change).key == key


# --- the file itself -------------------------------------------------------------------------------------


def test_invalid_yaml_rejected(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("listen: {grpc: 127.0.0.1:0\ntoken: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.message.startswith("invalid YAML")


@pytest.mark.parametrize(("text", "kind"), [("- listen\n- token\n", "list"), ("just text\n", "str"), ("7\n", "int")])
def test_non_mapping_top_level_rejected(tmp_path, text, kind):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "(top level)"
    assert caught.value.message == f"expected a mapping, got {kind}"


def test_empty_file_needs_required_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message == "missing"


def test_missing_config_file_rejected(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.fix == "pass --config FILE"


# --- the command line --------------------------------------------------------------------------------------


def run_serve(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXTAUTHZ), "serve", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_serve_bad_config_exits_2(tmp_path, idp):
    data = config_data(tmp_path, idp)
    data["token"]["signing"]["algoritm"] = "ES256"
    path = write_data(tmp_path, data)

    result = run_serve(path)
    assert result.returncode == 2
    assert "token.signing.algoritm" in result.stderr
    assert "did you mean 'token.signing.algorithm'?" in result.stderr


def test_serve_missing_config_exits_2(tmp_path):
    result = run_serve(tmp_path / "absent.yaml")
    assert result.returncode == 2
    assert str(tmp_path / "absent.yaml") in result.stderr
