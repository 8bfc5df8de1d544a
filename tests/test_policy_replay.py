"""`extauthz policy replay`: a log made by the real Authorizer under policy set A, replayed under set B.

Set B changes known things. It tightens a max age and removes a rule. It adds a deny condition on
the calling workload and removes a value from a header condition. It sets a new token audience,
renames a policy, and adds a dry-run policy and a new policy. The replay must report exactly the
decisions those changes affect, and count the decisions whose outcome a log cannot reproduce as not
replayable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from audit_lines import ChainWriter, DecisionCapture, rfc3339, spec_record
from cryptography.hazmat.primitives import serialization
from helpers import MFA, TOKEN_ISSUER, TestIdP, check_request, write_config
from redis_servers import redis_server  # noqa: F401 - pytest fixture

from extauthz.audit_read import LogEntry, LogReader
from extauthz.cli import main
from extauthz.config import load_config
from extauthz.keys import generate_private_key
from extauthz.policy_replay import LoggedFacts, Replayer, build_claims, replay_config
from extauthz.revocation import revoke
from extauthz.server import build_authorizer

# 2026-03-01T12:00:00Z: the Checks of the log happen then, long before the test runs.
T0 = 1_772_366_400.0
LEGACY = "spiffe://cluster.local/ns/web/sa/legacy"
POLICY_HEAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: shop
  annotations: {annotations}
spec:
  action: CUSTOM
  provider: {{name: extauthz}}
  rules:
"""


def policy(name: str, rules: str, **annotations: str) -> str:
    text = json.dumps({f"extauthz.io/{key.replace('_', '-')}": value for key, value in annotations.items()})
    return POLICY_HEAD.format(name=name, annotations=text) + rules


SHARED = [
    policy("vault", """\
  - to:
    - operation: {paths: ["/vault/*"]}
    when:
    - key: request.headers[x-account]
      values: ["acct-*"]
"""),
    policy("otp", """\
  - to:
    - operation: {paths: ["/otp/*"]}
""", one_time_token="true"),
]
POLICIES_A = "---\n".join([
    policy("admin-step-up", """\
  - to:
    - operation: {paths: ["/admin", "/admin/*"]}
""", reauth_max_age="5m", acr_values="urn:test:mfa urn:test:hwk", token_audience="admin-api"),
    policy("public", """\
  - to:
    - operation: {paths: ["/public/*"]}
  - to:
    - operation: {paths: ["/api/*"]}
"""),
    policy("reports", """\
  - to:
    - operation: {paths: ["/reports/*"], methods: ["GET"]}
"""),
    policy("tenants", """\
  - to:
    - operation: {paths: ["/tenants/*"]}
    when:
    - key: request.headers[x-tenant]
      values: ["acme", "globex", "initech"]
"""),
    policy("catalog", """\
  - to:
    - operation: {paths: ["/catalog/*"]}
"""),
    *SHARED,
])
POLICIES_B = "---\n".join([
    policy("admin-step-up", """\
  - to:
    - operation: {paths: ["/admin", "/admin/*"]}
""", reauth_max_age="1m", acr_values="urn:test:mfa urn:test:hwk", token_audience="admin-api"),
    policy("public", """\
  - to:
    - operation: {paths: ["/public/*"]}
"""),
    policy("public-shadow", """\
  - to:
    - operation: {paths: ["/public/*"]}
""", mode="dry-run", require_user="true"),
    policy("reports", """\
  - from:
    - source: {notPrincipals: ["cluster.local/ns/web/sa/legacy"]}
    to:
    - operation: {paths: ["/reports/*"], methods: ["GET"]}
"""),
    policy("tenants", """\
  - to:
    - operation: {paths: ["/tenants/*"]}
    when:
    - key: request.headers[x-tenant]
      values: ["acme", "globex"]
""", token_audience="tenants-api"),
    policy("catalog-v2", """\
  - to:
    - operation: {paths: ["/catalog/*"]}
"""),
    policy("beta", """\
  - to:
    - operation: {paths: ["/beta/*"]}
""", require_user="true"),
    *SHARED,
])

# What replaying the log of `logged_checks` under set B changes, by request id.
EXPECTED_CHANGES = {
    "r02": "allow_to_deny",           # login 3 minutes old; max age 5m -> 1m
    "r04": "dry_run_changed",         # anonymous; the new dry-run policy requires a user
    "r05": "policies_changed",        # the dry-run policy now matches too
    "r06": "allow_to_deny",           # the /api/* rule is gone
    "r08": "allow_to_deny",           # the legacy workload is excluded
    "r09": "allow_to_deny",           # x-tenant: initech is no longer accepted
    "r10": "token_audience_changed",  # tenants now mint for tenants-api
    "r11": "deny_to_allow",           # the new beta policy
    "r12": "reason_changed",          # beta requires a user: no_matching_policy -> missing_token
    "r13": "policies_changed",        # catalog renamed catalog-v2
}
NOT_REPLAYABLE = {
    "r14": "policy shop/vault reads request.headers[x-account], which the log contains only as a sha256 hash",
    "r15": "logged invalid_token",
    "r16": "logged token_expired",
    "r17": "logged invalid_path",
    "r18": "logged token_revoked",
    "r20": "logged token_replayed",
    "crafted-state": "logged state_unavailable",
    "crafted-internal": "logged internal_error",
}
UNCHANGED = ("r01", "r03", "r07", "r19", "r21", "r22")


@dataclass
class LoggedRun:
    folder: Path
    config_path: Path
    capture: DecisionCapture
    chained_log: Path
    flat_log: Path
    policies_a: Path
    policies_b: Path


def token_at(idp: TestIdP, now: float, *, age: float = 30, **claims) -> str:
    return idp.token(iat=int(now) - 60, exp=int(now) + 600, auth_time=int(now - age), **claims)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, idp) -> LoggedRun:
    """Run the real Authorizer on every request of the scenario under set A, at times around T0."""
    folder = tmp_path_factory.mktemp("replay")
    config_path = write_config(folder, idp, policies=POLICIES_A)
    config = load_config(config_path)
    capture = DecisionCapture(config)
    authorizer, _ = build_authorizer(config, capture)
    now = [T0]

    def clock() -> float:
        return now[0]

    authorizer.clock = clock
    authorizer.verifier.clock = clock
    authorizer.minter.clock = clock
    authorizer.revocations.clock = clock
    # Revoked after every token of the scenario was issued.
    revoke(authorizer.revocations.store, config, "sub", "mallory", now=T0 + 1000)

    def check(request_id: str, path: str, *, token: str | None = None, **request) -> None:
        now[0] += 7.5
        authorizer.check(check_request(path=path, token=token, request_id=request_id, **request))

    def token(**claims) -> str:
        return token_at(idp, now[0] + 7.5, **claims)

    check("r01", "/admin/users", token=token(age=30))
    check("r02", "/admin/users", token=token(age=180))
    check("r03", "/admin/users", token=token(age=600))
    check("r04", "/public/items")
    check("r05", "/public/items", token=token())
    check("r06", "/api/items", token=token())
    check("r07", "/reports/daily")
    check("r08", "/reports/daily", source_principal=LEGACY)
    check("r09", "/tenants/x", headers={"x-tenant": "initech"})
    check("r10", "/tenants/x", headers={"x-tenant": "acme"})
    check("r11", "/beta/x", token=token())
    check("r12", "/beta/x")
    check("r13", "/catalog/x")
    check("r14", "/vault/x", headers={"x-account": "acct-1"})
    forged = TestIdP(idp.issuer)
    check("r15", "/public/items", token=token_at(forged, now[0] + 7.5))
    check("r16", "/public/items", token=idp.token(iat=int(now[0]) - 900, exp=int(now[0]) - 100))
    check("r17", "/a/%2F/b")
    check("r18", "/public/items", token=token(sub="mallory"))
    one_time = token(jti="one-time-1")
    check("r19", "/otp/x", token=one_time)
    check("r20", "/otp/y", token=one_time)
    check("r21", "/nothing")
    check("r22", "/admin/users")

    writer = ChainWriter(start_time=T0)
    other = ChainWriter("extauthz-1", start_time=T0)
    for index, decision in enumerate(capture.decisions):
        record = spec_record(decision, clear_headers=("x-tenant",), hashed_headers=("x-account",), claims=("jti",))
        (writer if index % 3 else other).decision(record)
        if index == 10:
            writer.checkpoint("interval", decision.started_at)
    for decision_id, reason, status in (("crafted-state", "state_unavailable", 503),
                                        ("crafted-internal", "internal_error", 500)):
        writer.decision({"time": rfc3339(T0 + 500), "decision_id": decision_id, "decision": "deny",
                         "status": status, "reason": reason, "request_id": decision_id,
                         "source_principal": "", "source_address": "10.0.0.7", "destination_principal": "",
                         "host": "shop.example.com", "method": "GET", "path": "/otp/x", "policies": ["shop/otp"],
                         "duration_ms": 1.0})
    writer.checkpoint("shutdown", T0 + 600)
    chained_log = folder / "decisions.log"
    chained_log.write_bytes(other.text() + b'{"level":"info","message":"signal received"}\n' + writer.text())
    flat_log = folder / "flat.log"
    flat_log.write_bytes(capture.flat_lines())

    policies_a = folder / "policies-a.yaml"
    policies_a.write_text(POLICIES_A, encoding="utf-8")
    policies_b = folder / "policies-b.yaml"
    policies_b.write_text(POLICIES_B, encoding="utf-8")
    return LoggedRun(folder, config_path, capture, chained_log, flat_log, policies_a, policies_b)


def decision_ids(run: LoggedRun) -> dict[str, str]:
    """Map each Check's request id to its decision id (crafted records use the request id as both)."""
    ids = {decision.peer.request_id: decision.decision_id for decision in run.capture.decisions}
    return {**ids, "crafted-state": "crafted-state", "crafted-internal": "crafted-internal"}


def replay_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["policy", "replay", *argv, "--format", "json"])
    output = capsys.readouterr()
    assert code in (0, 1), output.err
    return code, json.loads(output.out)


def test_log_has_the_expected_outcomes(logged_run):
    reasons = {decision.peer.request_id: decision.reason for decision in logged_run.capture.decisions}

    assert reasons == {
        "r01": "allowed", "r02": "allowed", "r03": "insufficient_user_authentication", "r04": "allowed",
        "r05": "allowed", "r06": "allowed", "r07": "allowed", "r08": "allowed", "r09": "allowed",
        "r10": "allowed", "r11": "no_matching_policy", "r12": "no_matching_policy", "r13": "allowed",
        "r14": "allowed", "r15": "invalid_token", "r16": "token_expired", "r17": "invalid_path",
        "r18": "token_revoked", "r19": "allowed", "r20": "token_replayed", "r21": "no_matching_policy",
        "r22": "missing_token",
    }


def test_replay_under_same_policies_changes_nothing(logged_run, capsys):
    """The clock reads the logged time: at today's time every login of the log would be months old."""
    code, report = replay_json(capsys, "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_a),
                               "--config", str(logged_run.config_path))

    assert code == 0
    assert report["changes"] == []
    assert report["totals"]["decisions"] == 24
    assert report["totals"]["replayed"] == 16
    assert report["totals"]["not_replayable"] == 8
    assert report["checkpoints_ignored"] == 4
    assert report["skipped_lines"] == 1


def test_replay_finds_exactly_the_changed_decisions(logged_run, capsys):
    code, report = replay_json(capsys, "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_b),
                               "--config", str(logged_run.config_path))
    ids = decision_ids(logged_run)
    by_request = {request_id: ids[request_id] for request_id in ids}

    assert code == 1
    assert {change["decision_id"]: change["change"] for change in report["changes"]} == {
        by_request[request_id]: kind for request_id, kind in EXPECTED_CHANGES.items()}
    totals = report["totals"]
    assert totals == {"decisions": 24, "replayed": 16, "unchanged": 6, "changed": 10, "allow_to_deny": 4,
                      "deny_to_allow": 1, "reason_changed": 1, "policies_changed": 2, "token_audience_changed": 1,
                      "dry_run_changed": 1, "not_replayable": 8}
    causes = {row["cause"]: row["decisions"] for row in report["not_replayable"]}
    assert sum(causes.values()) == len(NOT_REPLAYABLE)
    for expected in set(NOT_REPLAYABLE.values()):
        matching = [cause for cause in causes if cause.startswith(expected)]
        assert matching, f"no not-replayable cause starts with {expected!r}: {sorted(causes)}"


def test_replay_reports_before_and_after(logged_run, capsys):
    _, report = replay_json(capsys, "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_b),
                            "--config", str(logged_run.config_path))
    changes = {change["decision_id"]: change for change in report["changes"]}
    ids = decision_ids(logged_run)

    step_up = changes[ids["r02"]]
    assert step_up["before"] == {"decision": "allow", "reason": "allowed", "policies": ["shop/admin-step-up"],
                                 "token_aud": "admin-api"}
    assert step_up["after"] == {"decision": "deny", "reason": "insufficient_user_authentication",
                                "policies": ["shop/admin-step-up"], "detail": "login older than max_age"}
    assert step_up["request"] == {"method": "GET", "host": "shop.example.com", "path": "/admin/users",
                                  "subject": "alice", "workload": "spiffe://cluster.local/ns/web/sa/frontend"}
    assert step_up["time"] == rfc3339(T0 + 2 * 7.5)
    assert step_up["source"].startswith(f"{logged_run.chained_log}:")

    beta = changes[ids["r12"]]
    assert (beta["before"]["reason"], beta["after"]["reason"]) == ("no_matching_policy", "missing_token")
    assert beta["after"]["policies"] == ["shop/beta"]
    shadow = changes[ids["r04"]]
    assert shadow["after"]["would_deny_reason"] == "missing_token"
    assert "would_deny_reason" not in shadow["before"]
    tenants = changes[ids["r10"]]
    assert (tenants["before"]["token_aud"], tenants["after"]["token_aud"]) == ("shop.example.com", "tenants-api")


def test_replay_table_output(logged_run, capsys):
    code = main(["policy", "replay", "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_b),
                 "--config", str(logged_run.config_path)])
    out = capsys.readouterr().out
    ids = decision_ids(logged_run)

    assert code == 1
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if ids["r02"] in line))
    assert "GET shop.example.com/admin/users" in lines[first]
    assert lines[first + 1] == "  before: allow allowed [shop/admin-step-up] aud admin-api"
    assert lines[first + 2] == ("  after:  deny insufficient_user_authentication (login older than max_age) "
                                "[shop/admin-step-up]")
    assert "24 decisions: 16 replayed, 10 changed, 6 unchanged, 8 not replayable" in out
    assert "allow->deny" in out
    assert "Not replayable" in out


def test_replay_without_config_learns_issuers(logged_run, capsys):
    code, report = replay_json(capsys, "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_b))
    ids = decision_ids(logged_run)

    assert code == 1
    assert {change["decision_id"]: change["change"] for change in report["changes"]} == {
        ids[request_id]: kind for request_id, kind in EXPECTED_CHANGES.items()}


def test_replay_flat_records_of_today(logged_run, capsys):
    """Records without envelope, headers or context extensions: header conditions cannot be evaluated."""
    code, unchanged = replay_json(capsys, "--log", str(logged_run.flat_log), "--policies",
                                  str(logged_run.policies_a), "--config", str(logged_run.config_path))
    assert code == 0
    assert unchanged["changes"] == []

    code, report = replay_json(capsys, "--log", str(logged_run.flat_log), "--policies", str(logged_run.policies_b),
                               "--config", str(logged_run.config_path))
    ids = decision_ids(logged_run)

    assert code == 1
    expected = {ids[request_id]: kind for request_id, kind in EXPECTED_CHANGES.items()
                if request_id not in ("r09", "r10")}
    assert {change["decision_id"]: change["change"] for change in report["changes"]} == expected
    causes = {row["cause"]: row["decisions"] for row in report["not_replayable"]}
    assert causes["policy shop/tenants reads request.headers[x-tenant], which the log does not contain"] == 2
    assert causes["policy shop/vault reads request.headers[x-account], which the log does not contain"] == 1


def test_replay_records_no_one_time_claim(logged_run):
    config = replay_config(logged_run.config_path, [logged_run.policies_a])
    replayer = Replayer(config, LoggedFacts(), learn_issuers=False)
    try:
        logged = next(entry for entry in LogReader(files=[str(logged_run.chained_log)])
                      if entry.record.get("request_id") == "r19")
        assert logged.record["user_claims"] == {"jti": "one-time-1"}
        # The same token on another request, a minute later: a recorded claim would make it token_replayed.
        again = LogEntry({**logged.record, "request_id": "r19-again", "decision_id": "again",
                          "time": rfc3339(T0 + 1000)}, "copy:1")

        report = replayer.replay([logged, again, logged])
    finally:
        replayer.close()

    assert report.replayed == 3
    assert report.changes == []


def test_replay_uses_no_configured_signing_key(logged_run, tmp_path, idp):
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(generate_private_key("ES256").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    config_path = write_config(tmp_path, idp, policies=POLICIES_A, overrides={"token": {
        "issuer": TOKEN_ISSUER, "signing": {"algorithm": "ES256", "key_file": str(key_file)}}})

    config = replay_config(config_path, [logged_run.policies_b])

    assert load_config(config_path).token.signing.key_file == key_file
    assert config.token.signing.key_file is None
    assert config.policies.paths == (logged_run.policies_b,)


def test_build_claims_from_logged_fields():
    record = {"user_sub": "alice", "user_iss": "https://idp.test", "user_aud": ["mesh"], "user_acr": MFA,
              "user_amr": ["pwd"], "user_auth_time": 1000, "user_claims": {"groups": ["ops"], "sub": "ignored"}}

    claims = build_claims(record, 1030.4, None)

    assert claims == {"groups": ["ops"], "sub": "alice", "iss": "https://idp.test", "aud": ["mesh"], "acr": MFA,
                      "amr": ["pwd"], "auth_time": 1000, "iat": 1030, "exp": 1031}
    flat = build_claims({"user_sub": "bob", "user_iss": "https://idp.test", "auth_age_s": 30.4}, 1030.4, "mesh")
    assert flat["auth_time"] == pytest.approx(1000.0)
    assert flat["aud"] == "mesh"
    assert build_claims({"decision_id": "x"}, 1030.4, "mesh") is None


def test_replay_rejects_missing_policies_and_conflicting_options(logged_run, tmp_path, capsys):
    code = main(["policy", "replay", "--log", str(logged_run.chained_log), "--policies", str(tmp_path / "none")])
    assert code == 2
    assert "not found" in capsys.readouterr().err

    code = main(["policy", "replay", "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_b),
                 "--config", str(logged_run.config_path), "--root-namespace", "mesh-root"])
    assert code == 2
    assert "come from --config" in capsys.readouterr().err


def test_replay_from_redis_stream(logged_run, redis_server, capsys):  # noqa: F811 - pytest fixture
    client = redis_server.client()
    for line in logged_run.chained_log.read_bytes().splitlines():
        client.xadd("extauthz:decisions", {"r": line})
    client.close()

    code, report = replay_json(capsys, "--redis", redis_server.url, "--stream", "extauthz:decisions",
                               "--policies", str(logged_run.policies_b), "--config", str(logged_run.config_path))

    assert code == 1
    assert report["totals"]["changed"] == len(EXPECTED_CHANGES)
    assert report["skipped_lines"] == 1
    assert all(change["source"].startswith("extauthz:decisions#") for change in report["changes"])


def test_changes_json_lines_are_parseable(logged_run, capsys):
    _, report = replay_json(capsys, "--log", str(logged_run.chained_log), "--policies", str(logged_run.policies_b),
                            "--config", str(logged_run.config_path))

    assert orjson.loads(orjson.dumps(report)) == report


def test_replay_counts_damaged_records(logged_run):
    config = replay_config(logged_run.config_path, [logged_run.policies_a])
    replayer = Replayer(config, LoggedFacts(), learn_issuers=False)
    logged = next(entry for entry in LogReader(files=[str(logged_run.chained_log)])
                  if entry.record.get("request_id") == "r01")
    damaged = [
        LogEntry({**logged.record, "user_aud": "mesh"}, "damaged:1"),
        LogEntry({**logged.record, "headers": {"x-tenant": 7}}, "damaged:2"),
        LogEntry({**logged.record, "time": "yesterday"}, "damaged:3"),
        LogEntry({key: value for key, value in logged.record.items() if key != "path"}, "damaged:4"),
        LogEntry({**logged.record, "reason": "future_reason"}, "damaged:5"),
    ]
    try:
        report = replayer.replay(damaged)
    finally:
        replayer.close()

    assert report.replayed == 0
    assert report.changes == []
    assert dict(report.not_replayable) == {
        "the record's user_aud has the wrong type": 1,
        "the record's headers has the wrong type": 1,
        "the record has no valid time": 1,
        "the record has no method, host or path": 1,
        "logged reason 'future_reason' is not one this version of extauthz knows": 1,
    }


def test_logged_facts_from_config(tmp_path):
    from extauthz.policy_replay import read_logged_facts

    path = tmp_path / "config.yaml"
    path.write_text("decision_log:\n  headers: [X-Account]\n  clear_headers: [x-tenant]\n  claims: groups\n",
                    encoding="utf-8")

    facts = read_logged_facts(path)

    assert facts.headers == frozenset({"x-account", "x-tenant"})
    # A string where a list belongs names nothing, rather than one claim per character.
    assert facts.claims == frozenset()
    assert read_logged_facts(None) == LoggedFacts()


def test_listed_header_absent_from_record(logged_run):
    """A header that decision_log lists but a record lacks was absent from the request."""
    config = replay_config(logged_run.config_path, [logged_run.policies_a])
    logged = next(entry for entry in LogReader(files=[str(logged_run.chained_log)])
                  if entry.record.get("request_id") == "r09")
    without_header = LogEntry({key: value for key, value in logged.record.items() if key != "headers"}, "edited:1")
    unknown = Replayer(config, LoggedFacts(headers=frozenset(), claims=frozenset()), learn_issuers=False)
    listed = Replayer(config, LoggedFacts(headers=frozenset({"x-tenant"}), claims=frozenset()), learn_issuers=False)
    try:
        not_replayable = unknown.replay([without_header])
        replayed = listed.replay([without_header])
    finally:
        unknown.close()
        listed.close()

    assert dict(not_replayable.not_replayable) == {
        "policy shop/tenants reads request.headers[x-tenant], which the log does not contain": 1}
    assert [(change.kind, change.after.reason) for change in replayed.changes] == [
        ("allow_to_deny", "no_matching_policy")]
