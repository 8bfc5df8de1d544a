from __future__ import annotations

import pytest
from helpers import TestIdP, make_authorizer, write_config


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
