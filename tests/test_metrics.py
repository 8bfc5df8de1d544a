"""/metrics on a running Service: Prometheus text that counts the Checks it decided over gRPC."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from helpers import RecordingLog, check_request, write_config
from processes import LOOPBACK, http_get
from prometheus_client.parser import text_string_to_metric_families

from extauthz import __version__
from extauthz.config import load_config
from extauthz.server import Service


@dataclass(frozen=True)
class Scrape:
    status: int
    headers: dict[str, str]
    text: str
    # Expected count of each (decision, reason) pair, from the Checks sent before the scrape.
    sent: dict[tuple[str, str], int]


def send_checks(port: int, requests: list) -> list:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return [stub.Check(request, timeout=10) for request in requests]


@pytest.fixture(scope="module")
def scrape(tmp_path_factory, idp) -> Scrape:
    """Send a few Checks to a real Service, then read its /metrics once."""
    config = load_config(write_config(tmp_path_factory.mktemp("metrics"), idp))
    service = Service(config, RecordingLog(config))
    service.start()
    try:
        responses = send_checks(service.grpc_port, [
            check_request(path="/admin", token=idp.token()),
            check_request(path="/admin", token=idp.token()),
            check_request(path="/public/items"),
            check_request(path="/admin"),
            check_request(path="/elsewhere"),
        ])
        status, headers, body = http_get(service.http_port, "/metrics")
    finally:
        service.stop(grace=1)

    codes = [response.status.code for response in responses]
    assert codes == [code_pb2.OK, code_pb2.OK, code_pb2.OK, code_pb2.UNAUTHENTICATED, code_pb2.PERMISSION_DENIED]
    sent = {("allow", "allowed"): 3, ("deny", "missing_token"): 1, ("deny", "no_matching_policy"): 1}
    return Scrape(status, headers, body.decode(), sent)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Return the values of sample `name`, keyed by its sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_content_type(scrape):
    assert scrape.status == 200
    assert scrape.headers["content-type"].startswith("text/plain")


def test_metrics_text_parses(scrape):
    families = {family.name: family.type for family in text_string_to_metric_families(scrape.text)}
    assert families["extauthz_checks"] == "counter"
    assert families["extauthz_check_duration_seconds"] == "histogram"
    assert families["extauthz_tokens_minted"] == "counter"
    assert families["extauthz_build_info"] == "gauge"


def test_checks_by_reason(scrape):
    counted = samples(scrape.text, "extauthz_checks_total")
    expected = {(("decision", decision), ("reason", reason)): float(count)
                for (decision, reason), count in scrape.sent.items()}
    assert counted == expected


def test_duration_histogram(scrape):
    total = float(sum(scrape.sent.values()))
    assert samples(scrape.text, "extauthz_check_duration_seconds_count") == {(): total}
    buckets = samples(scrape.text, "extauthz_check_duration_seconds_bucket")
    assert buckets[(("le", "+Inf"),)] == total
    assert samples(scrape.text, "extauthz_check_duration_seconds_sum")[()] > 0


def test_tokens_minted(scrape):
    assert samples(scrape.text, "extauthz_tokens_minted_total") == {(): 3.0}


def test_build_info(scrape):
    assert samples(scrape.text, "extauthz_build_info") == {(("version", __version__),): 1.0}


def test_no_created_series(scrape):
    assert "_created" not in scrape.text
