"""`extauthz audit query` and `extauthz audit stats` on a crafted log: filters, times, output, statistics."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from audit_lines import ChainWriter

from extauthz.audit_query import build_filters, format_age, parse_time_bound
from extauthz.cli import main

PAYMENTS = "payments/transfers-step-up"
READ_ALL = "payments/read-all"
PUBLIC = "shop/public"
WEB = "spiffe://cluster.local/ns/web/sa/payments-web"
FRONTEND = "spiffe://cluster.local/ns/web/sa/frontend"
LEGACY = "spiffe://cluster.local/ns/legacy/sa/batch"

STEP_UP_POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: transfers-step-up
  namespace: payments
  annotations:
    extauthz.io/reauth-max-age: 5m
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - to:
    - operation: {paths: ["/transfers/*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: read-all
  namespace: payments
spec:
  action: CUSTOM
  provider: {name: extauthz}
  rules:
  - {}
"""


def record(time: str, decision_id: str, decision: str, reason: str, policies: list[str], *,
           subject: str | None = None, workload: str = "", audience: str | None = None, **extra) -> dict:
    status = {"allowed": 200, "insufficient_user_authentication": 401, "no_matching_policy": 403,
              "invalid_token": 401}[reason]
    line = {"time": time, "decision_id": decision_id, "decision": decision, "status": status, "reason": reason,
            "request_id": f"req-{decision_id}", "source_principal": workload, "source_address": "10.0.0.7",
            "destination_principal": "", "host": "payments.example.com" if "payments" in str(policies)
            else "shop.example.com", "method": "POST", "path": "/transfers/42", "policies": policies,
            "duration_ms": 0.5, **extra}
    if subject is not None:
        line.update({"user_sub": subject, "user_iss": "https://idp.example.test", "user_acr": "urn:example:acr:mfa",
                     "user_amr": ["pwd", "otp"], "auth_age_s": 42.5})
    if audience is not None:
        line.update({"token_aud": audience, "token_jti": decision_id, "token_exp": 1_800_000_000, "token_kid": "k1"})
    return line


# Two writers, as two replicas write them, plus flat records from before the envelope.
QUARTER = [
    record("2026-07-10T09:00:00.000Z", "d01", "allow", "allowed", [PAYMENTS], subject="alice", workload=WEB,
           audience="payments-api"),
    record("2026-08-01T10:00:00.000Z", "d02", "deny", "insufficient_user_authentication", [PAYMENTS],
           subject="alice", workload=WEB, detail="login older than max_age"),
    record("2026-08-02T10:00:00.000Z", "d03", "deny", "insufficient_user_authentication", [PAYMENTS, READ_ALL],
           subject="bob", workload=WEB),
    record("2026-08-02T10:01:00.000Z", "d04", "allow", "allowed", [PAYMENTS, READ_ALL], subject="bob",
           workload=WEB, audience="payments-api"),
    record("2026-08-03T00:00:00.000Z", "d05", "allow", "allowed", [READ_ALL], subject="bob", workload=WEB,
           audience="payments-api"),
    record("2026-09-01T08:00:00.000Z", "d06", "allow", "allowed", [PUBLIC], workload=FRONTEND,
           audience="shop.example.com"),
    record("2026-09-01T08:00:01.000Z", "d07", "allow", "allowed", [PUBLIC], workload=FRONTEND,
           audience="shop.example.com", would_deny_reason="missing_token", would_deny_status=401),
    record("2026-09-02T08:00:00.000Z", "d08", "deny", "no_matching_policy", [], workload=LEGACY),
    record("2026-09-30T23:59:59.999Z", "d09", "deny", "no_matching_policy", [], workload=LEGACY),
]
OUTSIDE = [
    record("2026-06-30T23:59:59.999Z", "d00", "deny", "insufficient_user_authentication", [PAYMENTS],
           subject="carol", workload=WEB),
    record("2026-10-01T00:00:00.000Z", "d10", "deny", "invalid_token", [], workload=WEB),
]


@pytest.fixture
def quarter_log(tmp_path) -> Path:
    """A log of one quarter and its edges: records of two writers, flat records, checkpoints, other lines."""
    first, second = ChainWriter("extauthz-0"), ChainWriter("extauthz-1")
    for index, line in enumerate(QUARTER[:6]):
        (first if index % 2 else second).decision(line)
    first.checkpoint("interval", 1_790_000_000)
    lines = first.lines + second.lines
    lines += [orjson.dumps(line) + b"\n" for line in QUARTER[6:] + OUTSIDE]
    lines.insert(3, b'{"time":"2026-08-01T10:00:00.001Z","level":"info","message":"signal received"}\n')
    path = tmp_path / "decisions.log"
    path.write_bytes(b"".join(lines))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    output = capsys.readouterr()
    return code, output.out, output.err


def query_ids(capsys, path: Path, *filters: str) -> list[str]:
    code, out, err = run(capsys, "audit", "query", str(path), "--format", "json", *filters)
    assert code == 0, err
    return [json.loads(line)["decision_id"] for line in out.splitlines()]


def test_query_without_filters_lists_every_decision_by_time(quarter_log, capsys):
    assert query_ids(capsys, quarter_log) == ["d00", *(f"d{index:02d}" for index in range(1, 11))]


def test_query_filters(quarter_log, capsys):
    assert query_ids(capsys, quarter_log, "--subject", "alice") == ["d01", "d02"]
    assert query_ids(capsys, quarter_log, "--subject", "alice", "--subject", "carol") == ["d00", "d01", "d02"]
    assert query_ids(capsys, quarter_log, "--decision", "deny", "--policy", PAYMENTS) == ["d00", "d02", "d03"]
    assert query_ids(capsys, quarter_log, "--policy", READ_ALL, "--decision", "allow") == ["d04", "d05"]
    assert query_ids(capsys, quarter_log, "--reason", "no_matching_policy") == ["d08", "d09"]
    assert query_ids(capsys, quarter_log, "--host", "SHOP.example.com", "--decision", "allow") == ["d06", "d07"]
    assert query_ids(capsys, quarter_log, "--source-principal", "cluster.local/ns/legacy/sa/batch") == ["d08", "d09"]
    assert query_ids(capsys, quarter_log, "--source-principal", LEGACY) == ["d08", "d09"]


def test_query_period_bounds(quarter_log, capsys):
    quarter = [f"d{index:02d}" for index in range(1, 10)]
    assert query_ids(capsys, quarter_log, "--since", "2026-07-01", "--until", "2026-10-01") == quarter
    assert query_ids(capsys, quarter_log, "--since", "2026-07-01T00:00:00Z",
                     "--until", "2026-10-01T00:00:00+00:00") == quarter
    # The same instant in another zone.
    assert query_ids(capsys, quarter_log, "--since", "2026-07-01T02:00:00+02:00",
                     "--until", "2026-10-01T02:00:00+02:00") == quarter


def test_query_relative_since(tmp_path, capsys):
    now = datetime.now(UTC)
    writer = ChainWriter()
    for decision_id, age in (("old", timedelta(days=100)), ("recent", timedelta(days=10)),
                             ("today", timedelta(minutes=5))):
        moment = (now - age).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        writer.decision(record(moment, decision_id, "allow", "allowed", [PUBLIC], audience="shop.example.com"))
    path = tmp_path / "recent.log"
    path.write_bytes(writer.text())

    assert query_ids(capsys, path, "--since", "90d") == ["recent", "today"]
    assert query_ids(capsys, path, "--since", "24h") == ["today"]
    assert query_ids(capsys, path, "--until", "1w") == ["old", "recent"]


def test_query_table_output(quarter_log, capsys):
    code, out, err = run(capsys, "audit", "query", str(quarter_log), "--subject", "alice")

    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "DECISION", "REASON", "SUBJECT", "LOGIN", "WORKLOAD", "REQUEST",
                                "POLICIES", "DECISION_ID"]
    assert len(lines) == 3
    assert "2026-07-10T09:00:00.000Z" in lines[1]
    assert "allow 200" in lines[1]
    assert "urn:example:acr:mfa [pwd otp] 42s ago" in lines[1]
    assert "cluster.local/ns/web/sa/payments-web" in lines[1]
    assert "POST payments.example.com/transfers/42" in lines[1]
    assert "insufficient_user_authentication" in lines[2]
    # Columns line up: every row puts the reason where the header has it.
    column = lines[0].index("REASON")
    assert lines[2][column:].startswith("insufficient_user_authentication")
    assert "2 of 11 decisions matched; 3 checkpoints ignored; 1 lines skipped" in err


def test_query_ignores_checkpoints(quarter_log, capsys):
    code, out, _ = run(capsys, "audit", "query", str(quarter_log), "--format", "json")

    assert code == 0
    assert all(json.loads(line).get("type") != "checkpoint" for line in out.splitlines())


@pytest.mark.parametrize(("argv", "message"), [
    (("--reason", "insuficient_user_authentication"), "did you mean 'insufficient_user_authentication'"),
    (("--policy", "transfers-step-up"), "expected NAMESPACE/NAME"),
    (("--since", "2026-07-01T00:00:00"), "has no zone"),
    (("--since", "last quarter"), "invalid time"),
    (("--since", "2026-10-01", "--until", "2026-07-01"), "is not before --until"),
])
def test_query_rejects_invalid_filters(quarter_log, capsys, argv, message):
    code, out, err = run(capsys, "audit", "query", str(quarter_log), *argv)

    assert code == 2
    assert out == ""
    assert message in err


def test_parse_time_bound_forms():
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

    assert parse_time_bound("90d", now, "--since") == now - timedelta(days=90)
    assert parse_time_bound("1d12h", now, "--since") == now - timedelta(hours=36)
    assert parse_time_bound("2w", now, "--since") == now - timedelta(days=14)
    assert parse_time_bound("2026-07-01", now, "--since") == datetime(2026, 7, 1, tzinfo=UTC)
    assert parse_time_bound("2026-07-01T10:00:00.250Z", now, "--since") == datetime(2026, 7, 1, 10, 0, 0, 250000,
                                                                                     tzinfo=UTC)


def test_filters_reject_record_without_time():
    filters = build_filters(since="2026-07-01")

    assert not filters.matches({"decision_id": "x", "decision": "allow", "reason": "allowed"})
    assert build_filters().matches({"decision_id": "x", "decision": "allow", "reason": "allowed"})


def test_format_age():
    assert format_age(42.5) == "42s"
    assert format_age(312) == "5m12s"
    assert format_age(3 * 3600 + 4 * 60) == "3h04m"
    assert format_age(2 * 86400 + 5 * 3600) == "2d05h"


def stats_json(capsys, path: Path, *argv: str) -> dict:
    code, out, err = run(capsys, "audit", "stats", str(path), "--format", "json", *argv)
    assert code == 0, err
    return json.loads(out)


def test_stats_over_quarter(quarter_log, capsys):
    stats = stats_json(capsys, quarter_log, "--since", "2026-07-01", "--until", "2026-10-01")

    assert stats["decisions"] == 9
    assert stats["allow"] == 5
    assert stats["deny"] == 4
    assert stats["first_time"] == "2026-07-10T09:00:00.000Z"
    assert stats["last_time"] == "2026-09-30T23:59:59.999Z"
    assert stats["checkpoints_ignored"] == 3
    assert stats["skipped_lines"] == 1
    assert {(row["policy"], row["reason"]): row["count"] for row in stats["by_policy_reason"]} == {
        (PAYMENTS, "allowed"): 2,
        (PAYMENTS, "insufficient_user_authentication"): 2,
        (READ_ALL, "allowed"): 2,
        (READ_ALL, "insufficient_user_authentication"): 1,
        (PUBLIC, "allowed"): 2,
        ("(none)", "no_matching_policy"): 2,
    }
    assert stats["top_denied_subjects"] == [{"subject": "(no end user)", "denies": 2},
                                            {"subject": "alice", "denies": 1}, {"subject": "bob", "denies": 1}]
    assert stats["top_denied_workloads"] == [
        {"workload": "cluster.local/ns/legacy/sa/batch", "denies": 2},
        {"workload": "cluster.local/ns/web/sa/payments-web", "denies": 2}]
    assert stats["minted_tokens_by_audience"] == [{"audience": "payments-api", "tokens": 3},
                                                  {"audience": "shop.example.com", "tokens": 2}]
    assert stats["dry_run_would_deny"] == {"missing_token": 1}


def test_stats_step_up_rate_inferred(quarter_log, capsys):
    step_up = stats_json(capsys, quarter_log, "--since", "2026-07-01", "--until", "2026-10-01")["step_up"]

    # read-all issued a challenge together with transfers-step-up, so inference counts it too.
    assert step_up["source"] == "inferred from challenges in the log"
    assert step_up["policies"] == [
        {"policy": READ_ALL, "checks": 3, "challenges": 1, "rate": 0.3333},
        {"policy": PAYMENTS, "checks": 4, "challenges": 2, "rate": 0.5},
    ]
    # Checks that matched either policy: d01 to d05.
    assert step_up["total"] == {"checks": 5, "challenges": 2, "rate": 0.4}


def test_stats_step_up_rate_from_policy_files(quarter_log, tmp_path, capsys):
    policies = tmp_path / "policies.yaml"
    policies.write_text(STEP_UP_POLICIES, encoding="utf-8")

    step_up = stats_json(capsys, quarter_log, "--since", "2026-07-01", "--until", "2026-10-01",
                         "--policies", str(policies))["step_up"]

    assert step_up["source"] == "policy files"
    assert step_up["policies"] == [{"policy": PAYMENTS, "checks": 4, "challenges": 2, "rate": 0.5}]
    assert step_up["total"] == {"checks": 4, "challenges": 2, "rate": 0.5}


def test_stats_table_output(quarter_log, capsys):
    code, out, err = run(capsys, "audit", "stats", str(quarter_log), "--subject", "alice", "--top", "3")

    assert code == 0
    assert out.startswith("Decisions: 2 (1 allow, 1 deny) from 2026-07-10T09:00:00.000Z to 2026-08-01T10:00:00.000Z")
    assert "Step-up challenge rate" in out
    step_up_row = next(line for line in out.splitlines() if line.startswith(PAYMENTS) and "%" in line)
    assert step_up_row.split() == [PAYMENTS, "2", "1", "50.0%"]
    assert "Top 3 denied subjects" in out
    assert "payments-api" in out
    assert "2 decisions counted" in err


def test_stats_rejects_bad_policy_file(quarter_log, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nspec: [\n", encoding="utf-8")

    code, _, err = run(capsys, "audit", "stats", str(quarter_log), "--policies", str(broken))

    assert code == 2
    assert "invalid YAML" in err


def test_stats_on_flat_records_from_authorizer(authorizer, tmp_path, capsys, idp):
    from helpers import check_request

    checks, decision_log = authorizer
    checks.check(check_request(path="/public/items"))
    checks.check(check_request(path="/admin/users", token=idp.token(auth_time=1)))
    checks.check(check_request(path="/admin/users", token=idp.token()))
    path = tmp_path / "flat.log"
    path.write_bytes(decision_log.raw())

    stats = stats_json(capsys, path)

    assert stats["decisions"] == 3
    assert stats["by_reason"] == {"allowed": 2, "insufficient_user_authentication": 1}
    assert stats["step_up"]["policies"] == [{"policy": "shop/admin-step-up", "checks": 2, "challenges": 1,
                                             "rate": 0.5}]
    # Equal counts are listed by name.
    assert stats["minted_tokens_by_audience"] == [{"audience": "admin-api", "tokens": 1},
                                                  {"audience": "shop.example.com", "tokens": 1}]


def test_query_json_prints_lines_as_logged(tmp_path, capsys):
    # Today's writer does not sort keys, and a CRLF file adds a carriage return to every line.
    flat = b'{"time":"2026-07-10T09:00:00.000Z","decision_id":"flat","decision":"allow","status":200,' \
           b'"reason":"allowed","policies":[],"duration_ms":1.25}'
    writer = ChainWriter()
    writer.decision(QUARTER[0])
    path = tmp_path / "mixed.log"
    path.write_bytes(flat + b"\r\n" + writer.text())

    code, out, _ = run(capsys, "audit", "query", str(path), "--format", "json")

    assert code == 0
    assert out.encode().splitlines() == [flat, writer.lines[1].rstrip(b"\n")]


def test_stats_rejects_top_zero(quarter_log, capsys):
    code, out, err = run(capsys, "audit", "stats", str(quarter_log), "--top", "0")

    assert code == 2
    assert out == ""
    assert "--top 0: expected a count of 1 or more" in err
