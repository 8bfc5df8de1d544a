from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import OPEN_LOGS, TestIdP, make_authorizer, write_config
from store_helpers import store_config

from extauthz.store import Store, open_store


@pytest.fixture(scope="session", autouse=True)
def close_remaining_logs() -> Iterator[None]:
    """Close the RecordingLogs of module-scoped fixtures at the end of the session."""
    yield
    while OPEN_LOGS:
        OPEN_LOGS.pop().close()


@pytest.fixture(autouse=True)
def close_recording_logs() -> Iterator[None]:
    """Close the RecordingLogs that a test's own function-scoped fixtures opened, stopping their threads.

    pytest sets up wider-scoped fixtures first, so logs already open here belong to those and stay open.
    """
    before = len(OPEN_LOGS)
    yield
    while len(OPEN_LOGS) > before:
        OPEN_LOGS.pop().close()


@pytest.fixture(scope="session")
def idp() -> TestIdP:
    return TestIdP()


@pytest.fixture
def config_path(tmp_path, idp):
    return write_config(tmp_path, idp)


@pytest.fixture
def authorizer(config_path):
    """An Authorizer over the default test policies, and the RecordingLog it writes to."""
    authorizer, decision_log, _ = make_authorizer(config_path)
    return authorizer, decision_log


@pytest.fixture(params=["memory", "redis"])
def store(request, tmp_path, idp) -> Iterator[Store]:
    """The in-process store, then a RedisStore on a real redis-server.

    The Redis case uses the `redis_server` fixture, which the test module must import.
    """
    if request.param == "memory":
        store = open_store(store_config(tmp_path, idp))
    else:
        server = request.getfixturevalue("redis_server")
        store = open_store(store_config(tmp_path, idp, url=server.url))
    try:
        yield store
    finally:
        store.close()
