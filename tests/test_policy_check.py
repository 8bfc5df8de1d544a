"""`extauthz policy check`: one problem per kind of mistake, and the command's exit status and output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import POLICIES, write_config

from extauthz.cli import main
from extauthz.policy_check import ERROR, INFO, WARNING, check_policies, read_check_settings

PROVIDER = "extauthz"
TOKEN_TTL_CAP = 30.0
ANNOTATIONS = "metadata.annotations"


def policy(name: str = "orders", annotations: dict[str, str] | None = None, rules: Any = ({},),
           provider: str = PROVIDER, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    """Return a CUSTOM AuthorizationPolicy as a dict."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": {"action": "CUSTOM", "provider": {"name": provider}, "rules": list(rules), **spec},
    }


def documents(*policies: dict[str, Any]) -> str:
    return yaml.safe_dump_all(policies, sort_keys=False)


def paths_rule(*paths: str) -> dict[str, Any]:
    return {"to": [{"operation": {"paths": list(paths)}}]}


@dataclass(frozen=True)
class Expected:
    severity: str
    document: int | None
    field: str
    fix: str


CASES = [
    pytest.param("kind: [AuthorizationPolicy\n",
                 Expected(ERROR, None, "", "fix the YAML syntax"), id="invalid-yaml"),
    pytest.param("- apiVersion\n- kind\n",
                 Expected(ERROR, 0, "", "write a mapping with apiVersion and kind"), id="not-a-mapping"),
    pytest.param(documents(policy(rule=[{}])),
                 Expected(ERROR, 0, "spec.rule", "did you mean 'rules'?"), id="unknown-field"),
    pytest.param(documents(policy(annotations={"extauthz.io/reauth-maxage": "5m"})),
                 Expected(ERROR, 0, f"{ANNOTATIONS}[extauthz.io/reauth-maxage]",
                          "did you mean 'extauthz.io/reauth-max-age'?"), id="misspelt-annotation"),
    pytest.param(documents(policy(annotations={"extauthz.io/reauth-max-age": "5 minutes"})),
                 Expected(ERROR, 0, f"{ANNOTATIONS}[extauthz.io/reauth-max-age]", "such as"),
                 id="invalid-duration"),
    pytest.param(documents(policy(annotations={"extauthz.io/acr-values": "  "})),
                 Expected(ERROR, 0, f"{ANNOTATIONS}[extauthz.io/acr-values]", "space-separated acr values"),
                 id="empty-acr-values"),
    pytest.param(documents(policy(annotations={"extauthz.io/token-ttl": "5m"})),
                 Expected(WARNING, 0, f"{ANNOTATIONS}[extauthz.io/token-ttl]", "raise token.ttl"),
                 id="token-ttl-above-cap"),
    pytest.param(documents(policy(provider="opa")),
                 Expected(INFO, 0, "spec.provider.name", "spec.provider.name"), id="other-provider"),
    pytest.param(documents(policy(rules=[])),
                 Expected(WARNING, 0, "spec.rules", "add a rule"), id="no-rules"),
    pytest.param(documents(policy(rules=[{"to": [{"operation": {"paths": ["/a", "/b"],
                                                                 "notPaths": ["/b", "/a"]}}]}])),
                 Expected(WARNING, 0, "spec.rules[0].to[0].operation.notPaths", "remove them from notPaths"),
                 id="not-paths-exclude-all"),
    pytest.param(documents(policy(rules=[{"when": [{"key": "request.headers[x-tenant]", "values": ["acme"],
                                                    "notValues": ["acme", "globex"]}]}])),
                 Expected(WARNING, 0, "spec.rules[0].when[0].notValues", "remove them from notValues"),
                 id="not-values-exclude-all"),
    pytest.param(documents(policy(annotations={"extauthz.io/require-user": "false",
                                               "extauthz.io/reauth-max-age": "5m"})),
                 Expected(WARNING, 0, f"{ANNOTATIONS}[extauthz.io/require-user]", "drop extauthz.io/require-user"),
                 id="require-user-false-with-reauth"),
    pytest.param(documents(policy("admin", {"extauthz.io/token-audience": "admin-api"}, [paths_rule("/admin/*")]),
                           policy("reports", {"extauthz.io/token-audience": "reports-api"},
                                  [paths_rule("/admin/reports")])),
                 Expected(WARNING, 1, f"{ANNOTATIONS}[extauthz.io/token-audience]", "use one audience"),
                 id="audiences-conflict"),
    pytest.param(documents(policy("admin", {"extauthz.io/acr-values": "urn:test:mfa"}, [paths_rule("/admin/*")]),
                           policy("keys", {"extauthz.io/acr-values": "urn:test:hwk"}, [paths_rule("/admin/keys")])),
                 Expected(WARNING, 1, f"{ANNOTATIONS}[extauthz.io/acr-values]", "common acr value"),
                 id="acr-values-disjoint"),
    pytest.param(documents(policy("orders"), policy("orders")),
                 Expected(ERROR, 1, "metadata.name", "rename one of them"), id="duplicate-name"),
]


def write_policies(folder: Path, text: str) -> Path:
    path = folder / "policies.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_problem_reported(tmp_path, text, expected):
    path = write_policies(tmp_path, text)

    problems = check_policies([path], PROVIDER, TOKEN_TTL_CAP)

    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.severity == expected.severity
    assert problem.file == str(path)
    assert problem.document == expected.document
    assert problem.field == expected.field
    assert problem.fix is not None
    assert expected.fix in problem.fix


def test_invalid_duration_message(tmp_path):
    path = write_policies(tmp_path, documents(policy(annotations={"extauthz.io/reauth-max-age": "5 minutes"})))

    problems = check_policies([path], PROVIDER, TOKEN_TTL_CAP)

    assert [problem.severity for problem in problems] == [ERROR]
    assert problems[0].field == f"{ANNOTATIONS}[extauthz.io/reauth-max-age]"
    assert "'5 minutes'" in problems[0].message


def test_clean_file_no_problems(tmp_path):
    path = write_policies(tmp_path, POLICIES)
    assert check_policies([path], PROVIDER, TOKEN_TTL_CAP) == []


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param({"to": [{"operation": {"paths": ["/a", "/b/*"], "notPaths": ["/a"]}}]}, id="paths-wildcard"),
        pytest.param({"to": [{"operation": {"paths": ["/a", "/b"], "notPaths": ["/a"]}}]}, id="paths-partial"),
        pytest.param({"when": [{"key": "request.headers[x-tenant]", "values": ["acme", "globex*"],
                                "notValues": ["acme"]}]}, id="values-wildcard"),
    ],
)
def test_partial_exclusion_accepted(tmp_path, rule):
    path = write_policies(tmp_path, documents(policy(rules=[rule])))
    assert check_policies([path], PROVIDER, TOKEN_TTL_CAP) == []


def test_disjoint_paths_no_conflict(tmp_path):
    text = documents(policy("admin", {"extauthz.io/token-audience": "admin-api"}, [paths_rule("/admin/*")]),
                     policy("reports", {"extauthz.io/token-audience": "reports-api"}, [paths_rule("/reports/*")]))
    path = write_policies(tmp_path, text)
    assert check_policies([path], PROVIDER, TOKEN_TTL_CAP) == []


@pytest.mark.parametrize(("namespace", "conflicts"), [("billing", False), ("istio-system", True)])
def test_audience_conflict_namespaces(tmp_path, namespace, conflicts):
    # A policy applies only to its own namespace, except one in the root namespace, which applies to all.
    text = documents(policy("admin", {"extauthz.io/token-audience": "admin-api"}, [paths_rule("/admin/*")]),
                     policy("audit", {"extauthz.io/token-audience": "audit-api"}, [paths_rule("/admin/*")],
                            namespace=namespace))
    path = write_policies(tmp_path, text)

    problems = check_policies([path], PROVIDER, TOKEN_TTL_CAP)

    assert len(problems) == int(conflicts)


def test_duplicate_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(documents(policy("orders")), encoding="utf-8")
    (tmp_path / "b.yaml").write_text(documents(policy("orders")), encoding="utf-8")

    problems = check_policies([tmp_path], PROVIDER, TOKEN_TTL_CAP)

    assert len(problems) == 1
    assert problems[0].severity == ERROR
    assert problems[0].field == "metadata.name"
    assert problems[0].file == str(tmp_path / "b.yaml")
    assert f"{tmp_path / 'a.yaml'}#0" in problems[0].message


# --- the command line -------------------------------------------------------------------------


def run_check(capsys, *args: str) -> tuple[int, str, str]:
    """Run `extauthz policy check ARGS` and return the exit status, stdout and stderr."""
    code = main(["policy", "check", *args])
    output = capsys.readouterr()
    return code, output.out, output.err


def test_cli_clean_exits_0(tmp_path, capsys):
    path = write_policies(tmp_path, POLICIES)

    code, output, _ = run_check(capsys, str(path))

    assert code == 0
    assert output.strip() == "1 files, 2 extauthz policies: 0 errors, 0 warnings, 0 notes"


def test_cli_problem_exits_1(tmp_path, capsys):
    path = write_policies(tmp_path, documents(policy(rules=[])))
    code, _, _ = run_check(capsys, str(path))
    assert code == 1


def test_cli_info_exits_0(tmp_path, capsys):
    path = write_policies(tmp_path, documents(policy(provider="opa")))

    code, output, _ = run_check(capsys, str(path))

    assert code == 0
    assert "info: CUSTOM policy for provider 'opa'" in output
    assert "0 errors, 0 warnings, 1 notes" in output


def test_cli_missing_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"

    code, output, error = run_check(capsys, str(missing))

    assert code == 2
    assert output == ""
    assert f"{missing}: not found" in error


def test_cli_text_names_location(tmp_path, capsys):
    path = write_policies(tmp_path, documents(policy("public"), policy(annotations={"extauthz.io/token-ttl": "5m"})))

    code, output, _ = run_check(capsys, str(path))

    assert code == 1
    line = output.splitlines()[0]
    assert line.startswith(f"{path}#1: {ANNOTATIONS}[extauthz.io/token-ttl]: warning: ")
    assert "5m is above token.ttl (30s)" in line
    assert line.endswith("(lower the annotation or raise token.ttl)")
    assert output.splitlines()[-1] == "1 files, 2 extauthz policies: 0 errors, 1 warnings, 0 notes"


def test_cli_json_counts(tmp_path, capsys):
    text = documents(policy("orders", rules=[]), policy("orders"), policy("billing", provider="opa"))
    path = write_policies(tmp_path, text)

    code, output, _ = run_check(capsys, "--format", "json", str(path))

    assert code == 1
    report = json.loads(output)
    assert report["errors"] == 1
    assert report["warnings"] == 1
    severities = sorted(problem["severity"] for problem in report["problems"])
    assert severities == [ERROR, INFO, WARNING]
    duplicate = next(problem for problem in report["problems"] if problem["severity"] == ERROR)
    assert duplicate == {"severity": ERROR, "file": str(path), "document": 1, "field": "metadata.name",
                         "message": f"duplicate policy shop/orders, also in {path}#0", "fix": "rename one of them"}


@pytest.mark.parametrize(("annotation", "expected_code"), [("45s", 0), ("2m", 1)])
def test_cli_ttl_cap_from_config(tmp_path, idp, capsys, annotation, expected_code):
    config_path = write_config(tmp_path, idp, overrides={
        "token": {"issuer": "https://extauthz.test", "ttl": "1m", "signing": {"algorithm": "ES256"}}})
    path = write_policies(tmp_path, documents(policy(annotations={"extauthz.io/token-ttl": annotation})))

    code, output, _ = run_check(capsys, "--config", str(config_path), str(path))

    assert code == expected_code
    if expected_code:
        assert "is above token.ttl (60s)" in output


def test_cli_provider_from_config(tmp_path, idp, capsys):
    config_path = write_config(tmp_path, idp, overrides={"policies": {"provider": "opa", "paths": ["policies/"]}})
    path = write_policies(tmp_path, documents(policy(provider="opa", rules=[])))

    code, output, _ = run_check(capsys, "--config", str(config_path), str(path))

    assert code == 1
    assert "spec.rules: warning:" in output


def test_cli_config_from_cluster(tmp_path):
    # A configuration written for a cluster names paths that do not exist on a workstation.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "policies": {"provider": "extauthz", "paths": ["/etc/extauthz/policies"]},
        "token": {"issuer": "https://extauthz.test", "ttl": "20s"},
        "secrets": {"partner": {"file": "/var/run/secrets/partner/key"}},
    }), encoding="utf-8")
    settings = read_check_settings(config)
    assert settings.token_ttl_cap == 20.0
    assert settings.secret_names == frozenset({"partner"})
    assert settings.provider == "extauthz"


def test_selector_with_injection_warned(tmp_path):
    document = {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "egress", "namespace": "shop",
                     "annotations": {"extauthz.io/inject-secret": "partner", "extauthz.io/inject-header": "x-api-key"}},
        "spec": {"action": "CUSTOM", "provider": {"name": "extauthz"},
                 "selector": {"matchLabels": {"app": "checkout"}}, "rules": [{}]},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    problems = check_policies([path], PROVIDER, TOKEN_TTL_CAP, secret_names=frozenset({"partner"}))
    assert [problem.severity for problem in problems] == [WARNING]
    assert problems[0].field == "metadata.annotations[extauthz.io/inject-secret]"
