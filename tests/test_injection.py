"""Secret injection: the policy annotations, merging, the decision and the CheckResponse, and redaction."""

from __future__ import annotations

import base64
import io
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from helpers import check_request, make_authorizer, write_config

from extauthz.cli import main
from extauthz.config import SecretConfig, load_config
from extauthz.decision_log import DecisionLog
from extauthz.errors import ConfigError, DenyError
from extauthz.logs import JsonFormatter
from extauthz.policy import Injection, Policy, combine_requirements, parse_policy
from extauthz.response import build_check_response
from extauthz.secrets import Secrets
from extauthz.server import build_authorizer

PROVIDER = "extauthz"
TTL_CAP = 30.0
ORIGIN = "policies.yaml#0"
TOKEN_HEADER = "txn-token"  # token.header in helpers.write_config
SECRET_NAMES = frozenset({"partner-key", "bearer-key", "basic-credentials"})
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
INJECT = "extauthz.io/inject-"


def fake_value(label: str = "key") -> str:
    """Return an obviously fake credential, unique to this call."""
    return f"fake-{label}-{uuid.uuid4().hex}"


def annotations(secret: str | None = "partner-key", header: str | None = "x-api-key",
                template: str | None = None, **others: str) -> dict[str, str]:
    """Return the inject-* annotations (None leaves one out) and any other extauthz.io/ annotations."""
    result = {f"extauthz.io/{name.replace('_', '-')}": value for name, value in others.items()}
    for short, value in (("secret", secret), ("header", header), ("format", template)):
        if value is not None:
            result[INJECT + short] = value
    return result


def document(name: str = "partner", paths: tuple[str, ...] = ("/partner/*",), namespace: str = "shop",
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """Return a CUSTOM AuthorizationPolicy for `paths` as a dict."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": {"action": "CUSTOM", "provider": {"name": PROVIDER},
                 "rules": [{"to": [{"operation": {"paths": list(paths)}}]}]},
    }


def parse(annotation_map: dict[str, str], secret_names: frozenset[str] | None = SECRET_NAMES,
          name: str = "partner") -> Policy:
    policy = parse_policy(document(name, annotations=annotation_map), ORIGIN, PROVIDER, TTL_CAP, secret_names)
    assert policy is not None
    return policy


def parse_error(annotation_map: dict[str, str], secret_names: frozenset[str] | None = SECRET_NAMES) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(annotation_map, secret_names)
    return caught.value


# --- parsing the annotations --------------------------------------------------------------------


def test_injection_parsed():
    assert parse(annotations()).requirements.injections == (Injection("partner-key", "x-api-key", "{secret}"),)


def test_no_injection_by_default():
    assert parse({}).requirements.injections == ()


def test_injection_alone_needs_no_user():
    assert parse(annotations()).requirements.require_user is False


def test_header_name_lowercased():
    injection = parse(annotations(header="X-Api-Key")).requirements.injections[0]
    assert injection.header == "x-api-key"


def test_format_parsed():
    injection = parse(annotations(header="authorization", template="Bearer {secret}")).requirements.injections[0]
    assert injection.format == "Bearer {secret}"


def test_secret_without_header():
    error = parse_error(annotations(header=None))
    assert error.key == f"metadata.annotations[{INJECT}header]"
    assert error.message == "missing"


@pytest.mark.parametrize("present", [{"header": "x-api-key"}, {"template": "Bearer {secret}"}])
def test_header_without_secret(present):
    error = parse_error(annotations(secret=None, **{"header": None, **present}))
    assert error.key == f"metadata.annotations[{INJECT}secret]"
    assert error.message == "missing"


def test_empty_secret_name():
    error = parse_error(annotations(secret=""))
    assert error.key == f"metadata.annotations[{INJECT}secret]"


def test_unknown_secret_suggested():
    error = parse_error(annotations(secret="partner-kee"))
    assert error.key == f"metadata.annotations[{INJECT}secret]"
    assert error.message == "unknown secret 'partner-kee'"
    assert error.fix == "did you mean 'partner-key'?"


def test_unknown_secret_no_names():
    error = parse_error(annotations(secret="partner-key"), secret_names=frozenset())
    assert error.message == "unknown secret 'partner-key'"
    assert error.fix == "define it under secrets: in the configuration"


def test_unknown_secret_unchecked_without_names():
    policy = parse(annotations(secret="defined-elsewhere"), secret_names=None)
    assert policy.requirements.injections[0].secret == "defined-elsewhere"


@pytest.mark.parametrize("header", ["host", "Host", ":authority", ":path", ":method", "content-length",
                                    "transfer-encoding", "connection", "te", "upgrade", "x-request-id",
                                    "x-forwarded-for", "x-forwarded-proto", "x-envoy-original-path"])
def test_protected_header_rejected(header):
    error = parse_error(annotations(header=header))
    assert error.key == f"metadata.annotations[{INJECT}header]"
    assert error.message == f"a secret cannot be injected into {header.lower()!r}"


@pytest.mark.parametrize("header", ["x api key", "x-api-key:", "x-api\nkey", "ключ", "x@key"])
def test_invalid_header_rejected(header):
    error = parse_error(annotations(header=header))
    assert error.key == f"metadata.annotations[{INJECT}header]"


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "x-partner-token", "proxy-authorization"])
def test_ordinary_header_accepted(header):
    assert parse(annotations(header=header)).requirements.injections[0].header == header


@pytest.mark.parametrize("template", ["Bearer", "Bearer {token}", "", "{secret}:{secret}", "Bearer {SECRET}"])
def test_format_secret_count(template):
    error = parse_error(annotations(template=template))
    assert error.key == f"metadata.annotations[{INJECT}format]"
    assert error.message == f"invalid format {template!r}"


@pytest.mark.parametrize("template", ["Bearer\n{secret}", "Bearer {secret}\r\nX-Other: 1", "{secret}\0"])
def test_format_line_break(template):
    error = parse_error(annotations(template=template))
    assert error.key == f"metadata.annotations[{INJECT}format]"
    assert error.message == "line breaks and NUL are not allowed"


def test_format_non_string():
    error = parse_error({**annotations(), INJECT + "format": 7})
    assert error.key == f"metadata.annotations[{INJECT}format]"


def test_basic_renders():
    injection = parse(annotations(secret="basic-credentials", header="authorization", template="basic"))
    rendered = injection.requirements.injections[0].render("fake-user:fake-password")
    assert rendered == "Basic " + base64.b64encode(b"fake-user:fake-password").decode()


def test_basic_renders_utf8():
    rendered = Injection("basic-credentials", "authorization", "basic").render("fake-usér:fake-pässword")
    assert rendered == "Basic " + base64.b64encode("fake-usér:fake-pässword".encode()).decode()


def test_bearer_renders():
    value = fake_value()
    assert Injection("bearer-key", "authorization", "Bearer {secret}").render(value) == f"Bearer {value}"


def test_plain_renders():
    value = fake_value()
    assert Injection("partner-key", "x-api-key").render(value) == value


def test_render_keeps_braces_in_value():
    assert Injection("partner-key", "x-api-key", "Key {secret}").render("fake-{secret}") == "Key fake-{secret}"


# --- merging the requirements of matching policies ----------------------------------------------


def test_same_injection_merged():
    first = parse(annotations(), name="first")
    second = parse(annotations(), name="second")
    assert combine_requirements([first, second]).injections == (Injection("partner-key", "x-api-key"),)


def test_two_headers_both_injected():
    first = parse(annotations(), name="first")
    second = parse(annotations(secret="bearer-key", header="authorization", template="Bearer {secret}"),
                   name="second")
    injections = combine_requirements([first, second]).injections
    assert sorted(injection.header for injection in injections) == ["authorization", "x-api-key"]


@pytest.mark.parametrize("other", [
    {"secret": "bearer-key"},
    {"template": "Key {secret}"},
])
def test_different_values_conflict(other):
    first = parse(annotations(), name="first")
    second = parse(annotations(**other), name="second")
    with pytest.raises(DenyError) as caught:
        combine_requirements([first, second])
    assert caught.value.code == "policy_conflict"
    assert caught.value.detail == "matching policies inject different values into x-api-key"


def test_injection_kept_with_others():
    first = parse(annotations(), name="first")
    second = parse({"extauthz.io/require-user": "true"}, name="second")
    merged = combine_requirements([first, second])
    assert merged.injections == (Injection("partner-key", "x-api-key"),)
    assert merged.require_user is True


# --- decisions through the Authorizer -----------------------------------------------------------


class Values:
    """The fake secret values that one test's configuration names, by secret name."""

    def __init__(self) -> None:
        self.by_name = {
            "partner-key": fake_value("partner"),
            "bearer-key": fake_value("bearer"),
            "basic-credentials": f"fake-user:{fake_value('password')}",
        }

    def __getitem__(self, name: str) -> str:
        return self.by_name[name]

    def all_forms(self) -> list[str]:
        """Return every value as stored and as it goes into a header, including the Basic encoding."""
        forms = list(self.by_name.values())
        forms.append(base64.b64encode(self["basic-credentials"].encode()).decode())
        return forms


INJECTION_POLICIES = [
    document("partner", ("/partner/*",), annotations=annotations()),
    document("bearer", ("/bearer/*",),
             annotations=annotations("bearer-key", "authorization", "Bearer {secret}")),
    document("basic", ("/basic/*",), annotations=annotations("basic-credentials", "authorization", "basic")),
    document("fresh", ("/fresh/*",), annotations=annotations(
        reauth_max_age="5m", acr_values="urn:test:mfa")),
    document("user-only", ("/user-only/*",), annotations=annotations(require_user="true")),
    document("partner-other", ("/conflict/*",), annotations=annotations(template="Key {secret}")),
    document("partner-also", ("/conflict/*", "/partner/*"), annotations=annotations()),
    document("public", ("/public/*",)),
    document("trial", ("/trial/*",), annotations=annotations(mode="dry-run")),
]


def write_secret_files(folder: Path, values: Values) -> dict[str, Any]:
    """Write each value to a file in `folder` and return the `secrets:` section that names them."""
    secret_folder = folder / "secrets"
    secret_folder.mkdir(exist_ok=True)
    section = {}
    for name, value in values.by_name.items():
        (secret_folder / name).write_text(value + "\n", encoding="utf-8")
        section[name] = {"file": f"secrets/{name}"}
    return section


def write_injection_config(folder: Path, idp, values: Values, **overrides: Any) -> Path:
    return write_config(folder, idp, policies=yaml.safe_dump_all(INJECTION_POLICIES),
                        overrides={"secrets": write_secret_files(folder, values), **overrides})


@pytest.fixture
def values() -> Values:
    return Values()


@pytest.fixture
def injecting(tmp_path, idp, values):
    """An Authorizer over INJECTION_POLICIES with file secrets, and the RecordingLog it writes to."""
    authorizer, decision_log, _ = make_authorizer(write_injection_config(tmp_path, idp, values))
    return authorizer, decision_log


def test_allowed_carries_header(injecting, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/partner/charges"))
    assert decision.allowed is True
    assert decision.injected_headers == [("x-api-key", values["partner-key"])]
    assert decision.injected_secrets == ["partner-key"]


def test_bearer_format_applied(injecting, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/bearer/charges"))
    assert decision.injected_headers == [("authorization", f"Bearer {values['bearer-key']}")]


def test_basic_format_applied(injecting, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/basic/charges"))
    encoded = base64.b64encode(values["basic-credentials"].encode()).decode()
    assert decision.injected_headers == [("authorization", f"Basic {encoded}")]


def test_caller_value_ignored(injecting, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/partner/charges", headers={"x-api-key": "fake-caller-own"}))
    assert decision.injected_headers == [("x-api-key", values["partner-key"])]


def test_record_names_secret(injecting, values):
    authorizer, decision_log = injecting
    authorizer.check(check_request(path="/partner/charges"))
    record = decision_log.records()[-1]
    assert record["decision"] == "allow"
    assert record["injected_secrets"] == ["partner-key"]
    assert values["partner-key"] not in decision_log.raw().decode()


def test_no_injection_no_field(injecting):
    authorizer, decision_log = injecting
    authorizer.check(check_request(path="/public/items"))
    assert "injected_secrets" not in decision_log.records()[-1]


def test_user_policy_without_token(injecting):
    authorizer, decision_log = injecting
    decision = authorizer.check(check_request(path="/user-only/charges"))
    assert decision.allowed is False
    assert decision.reason == "missing_token"
    assert decision.injected_headers == []
    assert "injected_secrets" not in decision_log.records()[-1]


def test_user_policy_with_token(injecting, idp, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/user-only/charges", token=idp.token()))
    assert decision.allowed is True
    assert decision.injected_headers == [("x-api-key", values["partner-key"])]


@pytest.mark.parametrize(("claims", "reason"), [
    ({"auth_time": int(time.time()) - 3600}, "insufficient_user_authentication"),
    ({"acr": "urn:test:pwd"}, "insufficient_user_authentication"),
    ({"iat": int(time.time()) - 700, "exp": int(time.time()) - 100, "auth_time": int(time.time()) - 730},
     "token_expired"),
])
def test_stale_login_no_secret(injecting, idp, claims, reason):
    authorizer, decision_log = injecting
    decision = authorizer.check(check_request(path="/fresh/charges", token=idp.token(**claims)))
    assert decision.reason == reason
    assert decision.injected_headers == []
    assert "injected_secrets" not in decision_log.records()[-1]


def test_fresh_login_gets_secret(injecting, idp, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/fresh/charges", token=idp.token()))
    assert decision.allowed is True
    assert decision.injected_headers == [("x-api-key", values["partner-key"])]


def test_conflicting_policies_denied(injecting):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/conflict/charges"))
    assert decision.reason == "policy_conflict"
    assert decision.injected_headers == []


def test_same_injection_twice_allowed(injecting, values):
    # /partner/* matches both `partner` and `partner-also`, which inject the same value.
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/partner/charges"))
    assert decision.policies == ["shop/partner", "shop/partner-also"]
    assert decision.injected_headers == [("x-api-key", values["partner-key"])]


def test_dry_run_injects_nothing(injecting):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/trial/charges"))
    assert decision.allowed is True
    assert decision.injected_headers == []


def test_other_namespace_no_secret(injecting):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(
        path="/partner/charges", destination_principal="spiffe://cluster.local/ns/billing/sa/backend"))
    assert decision.reason == "no_matching_policy"
    assert decision.injected_headers == []


def test_rotated_file_used(tmp_path, idp, values):
    authorizer, _, _ = make_authorizer(write_injection_config(tmp_path, idp, values))
    rotated = fake_value("rotated-partner-value")
    (tmp_path / "secrets" / "partner-key").write_text(rotated + "\n", encoding="utf-8")
    authorizer.secrets.refresh()

    decision = authorizer.check(check_request(path="/partner/charges"))

    assert decision.injected_headers == [("x-api-key", rotated)]


def test_env_secret_injected(tmp_path, idp, values, monkeypatch):
    monkeypatch.setenv("EXTAUTHZ_TEST_PARTNER_KEY", values["partner-key"])
    section = write_secret_files(tmp_path, values)
    section["partner-key"] = {"env": "EXTAUTHZ_TEST_PARTNER_KEY"}
    path = write_config(tmp_path, idp, policies=yaml.safe_dump_all(INJECTION_POLICIES),
                        overrides={"secrets": section})
    authorizer, _, _ = make_authorizer(path)

    decision = authorizer.check(check_request(path="/partner/charges"))

    assert decision.injected_headers == [("x-api-key", values["partner-key"])]


def test_unknown_secret_refused_at_start(tmp_path, idp, values):
    path = write_injection_config(tmp_path, idp, values)
    config = load_config(path)
    (tmp_path / "policies" / "policies.yaml").write_text(
        yaml.safe_dump(document(annotations=annotations(secret="partner-kee"))), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        build_authorizer(config, DecisionLog(config.decision_log))
    assert caught.value.message == "unknown secret 'partner-kee'"


def test_missing_value_denied(tmp_path, idp, values):
    config = load_config(write_injection_config(tmp_path, idp, values))
    authorizer, _ = build_authorizer(config, DecisionLog(config.decision_log, stream=io.BytesIO()), secrets=Secrets(()))
    decision = authorizer.check(check_request(path="/partner/charges"))
    assert decision.reason == "secret_unavailable"
    assert decision.status == 503
    assert decision.injected_headers == []


def test_secret_not_utf8_denied(tmp_path, idp, values, monkeypatch):
    # os.environ decodes bytes that are not UTF-8 as lone surrogates.
    monkeypatch.setenv("EXTAUTHZ_TEST_PARTNER_KEY", "fake-key-\udcff")
    config = load_config(write_injection_config(tmp_path, idp, values))
    secrets = Secrets([SecretConfig(name=name, file=None, env="EXTAUTHZ_TEST_PARTNER_KEY")
                       for name in SECRET_NAMES])
    authorizer, _ = build_authorizer(config, DecisionLog(config.decision_log, stream=io.BytesIO()), secrets=secrets)
    decision = authorizer.check(check_request(path="/partner/charges"))
    assert decision.reason == "secret_unavailable"
    assert decision.detail == "secret partner-key is not valid UTF-8 text"
    assert decision.injected_headers == []
    response = build_check_response(decision, TOKEN_HEADER)
    assert response.denied_response.status.code == 503


def test_file_deleted_before_load(tmp_path, idp, values):
    path = write_injection_config(tmp_path, idp, values)
    (tmp_path / "secrets" / "partner-key").unlink()
    with pytest.raises(ConfigError) as caught:
        make_authorizer(path)
    assert caught.value.key == "secrets.partner-key.file"


def test_file_deleted_before_start(tmp_path, idp, values):
    config = load_config(write_injection_config(tmp_path, idp, values))
    (tmp_path / "secrets" / "partner-key").unlink()
    with pytest.raises(ConfigError) as caught:
        build_authorizer(config, DecisionLog(config.decision_log))
    assert caught.value.key == "secrets.partner-key.file"


# --- the CheckResponse --------------------------------------------------------------------------


def ok_headers(response) -> dict[str, tuple[str, int]]:
    """Return the headers an OK CheckResponse sets, as name -> (value, append_action)."""
    return {option.header.key: (option.header.value, option.append_action)
            for option in response.ok_response.headers}


def test_response_sets_header(injecting, values):
    authorizer, _ = injecting
    response = build_check_response(authorizer.check(check_request(path="/partner/charges")), TOKEN_HEADER)
    assert ok_headers(response)["x-api-key"] == (values["partner-key"], OVERWRITE)


def test_response_keeps_token(injecting):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/partner/charges"))
    response = build_check_response(decision, TOKEN_HEADER)
    assert ok_headers(response)[TOKEN_HEADER] == (decision.minted.token, OVERWRITE)


def test_response_removes_authorization(injecting, idp):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/partner/charges", token=idp.token()))
    response = build_check_response(decision, TOKEN_HEADER)
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


def test_response_authorization_injected(injecting, idp, values):
    authorizer, _ = injecting
    decision = authorizer.check(check_request(path="/bearer/charges", token=idp.token()))
    response = build_check_response(decision, TOKEN_HEADER)
    assert ok_headers(response)["authorization"] == (f"Bearer {values['bearer-key']}", OVERWRITE)
    assert list(response.ok_response.headers_to_remove) == []


def test_response_one_header_each(injecting):
    authorizer, _ = injecting
    response = build_check_response(authorizer.check(check_request(path="/partner/charges")), TOKEN_HEADER)
    names = [option.header.key for option in response.ok_response.headers]
    assert sorted(names) == sorted([TOKEN_HEADER, "x-api-key"])


def test_denied_response_no_value(injecting, values):
    authorizer, _ = injecting
    response = build_check_response(authorizer.check(check_request(path="/user-only/charges")), TOKEN_HEADER)
    assert response.HasField("denied_response")
    assert values["partner-key"] not in response.SerializeToString().decode(errors="replace")


# --- extauthz policy check --config -------------------------------------------------------------


def run_check(capsys, *args: str) -> tuple[int, str]:
    code = main(["policy", "check", *args])
    return code, capsys.readouterr().out


def test_check_reports_unknown_secret(tmp_path, idp, values, capsys):
    config_path = write_injection_config(tmp_path, idp, values)
    policy_path = tmp_path / "candidate.yaml"
    policy_path.write_text(yaml.safe_dump(document(annotations=annotations(secret="partner-kee"))),
                           encoding="utf-8")

    code, output = run_check(capsys, "--config", str(config_path), str(policy_path))

    assert code == 1
    line = output.splitlines()[0]
    assert line.startswith(f"{policy_path}#0: metadata.annotations[{INJECT}secret]: error: ")
    assert "unknown secret 'partner-kee'" in line
    assert line.endswith("(did you mean 'partner-key'?)")


def test_check_known_secret_clean(tmp_path, idp, values, capsys):
    config_path = write_injection_config(tmp_path, idp, values)
    policy_path = tmp_path / "candidate.yaml"
    policy_path.write_text(yaml.safe_dump(document(annotations=annotations())), encoding="utf-8")

    code, output = run_check(capsys, "--config", str(config_path), str(policy_path))

    assert output.strip() == "1 files, 1 extauthz policies: 0 errors, 0 warnings, 0 notes"
    assert code == 0


def test_check_without_config_skips(tmp_path, capsys):
    policy_path = tmp_path / "candidate.yaml"
    policy_path.write_text(yaml.safe_dump(document(annotations=annotations(secret="defined-elsewhere"))),
                           encoding="utf-8")
    code, _ = run_check(capsys, str(policy_path))
    assert code == 0


# --- no value anywhere --------------------------------------------------------------------------


def test_values_never_leak(tmp_path, idp, values, caplog):
    """Run allowed, denied and conflicting decisions with every logger at DEBUG and a file decision log."""
    log_path = tmp_path / "decisions.log"
    config = load_config(write_injection_config(tmp_path, idp, values,
                                                decision_log={"sink": f"file:{log_path}"}))
    requests = [
        check_request(path="/partner/charges", headers={"x-api-key": "fake-caller-own"}),
        check_request(path="/bearer/charges", token=idp.token()),
        check_request(path="/basic/charges"),
        check_request(path="/fresh/charges", token=idp.token(auth_time=int(time.time()) - 3600)),
        check_request(path="/fresh/charges", token=idp.token()),
        check_request(path="/user-only/charges"),
        check_request(path="/conflict/charges"),
        check_request(path="/elsewhere"),
        check_request(path="/trial/charges"),
    ]
    with caplog.at_level(logging.DEBUG):
        decision_log = DecisionLog(config.decision_log)
        authorizer, _ = build_authorizer(config, decision_log)
        try:
            decisions = [authorizer.check(request) for request in requests]
        finally:
            decision_log.close()
    responses = [build_check_response(decision, TOKEN_HEADER) for decision in decisions]

    records = log_path.read_text(encoding="utf-8")
    lines = [JsonFormatter().format(record) for record in caplog.records]
    deny_bodies = [response.denied_response.body for response in responses if response.HasField("denied_response")]
    deny_headers = [option.header.value for response in responses if response.HasField("denied_response")
                    for option in response.denied_response.headers]
    metadata = [orjson.dumps(dict(response.dynamic_metadata)).decode() for response in responses]
    assert [decision.allowed for decision in decisions] == [True, True, True, False, True, False, False, False, True]
    assert len(deny_bodies) == 4
    for value in values.all_forms():
        assert value not in records, "a secret value in the decision log"
        assert all(value not in line for line in lines), "a secret value in a log record"
        assert all(value not in body for body in deny_bodies), "a secret value in a deny body"
        assert all(value not in header for header in deny_headers), "a secret value in a deny header"
        assert all(value not in text for text in metadata), "a secret value in dynamic metadata"
        assert value not in authorizer.metrics.render().decode(), "a secret value in the metrics"


def test_token_header_injection_rejected(tmp_path, idp):
    from extauthz.server import load_policy_set

    secret = tmp_path / "key"
    secret.write_text("not-a-real-key\n", encoding="utf-8")
    policy = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: overwrite-token
  namespace: shop
  annotations:
    extauthz.io/inject-secret: partner
    extauthz.io/inject-header: txn-token
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules: [{}]
"""
    config = load_config(write_config(tmp_path, idp, policies=policy,
                                      overrides={"secrets": {"partner": {"file": str(secret)}}}))
    with pytest.raises(ConfigError) as excinfo:
        load_policy_set(config)
    assert excinfo.value.key == "metadata.annotations[extauthz.io/inject-header]"
