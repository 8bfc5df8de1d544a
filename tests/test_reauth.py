"""check_authentication: the RFC 9470 step-up check on sensitive routes."""

from __future__ import annotations

from typing import Any

import pytest

from extauthz.errors import REASONS
from extauthz.identity import EndUser
from extauthz.policy import Requirements
from extauthz.reauth import StepUpRequired, accepted_acr_values, check_authentication

NOW = 1_900_000_000.0
MFA = "urn:test:mfa"
HWK = "urn:test:hwk"
PWD = "urn:test:pwd"

STEP_UP = Requirements(require_user=True, reauth_max_age=300.0, acr_values=(frozenset({MFA, HWK}),))


def make_user(**overrides: Any) -> EndUser:
    """Build an end user who logged in 30 seconds before NOW with MFA."""
    fields: dict[str, Any] = {
        "issuer": "https://idp.test",
        "subject": "alice",
        "audiences": ("mesh",),
        "presenter": "",
        "expires_at": NOW + 600,
        "not_before": None,
        "issued_at": NOW - 30,
        "auth_time": NOW - 30,
        "acr": MFA,
        "amr": ("pwd", "otp"),
        "session_id": None,
        "token_id": None,
        "kid": None,
        "claims": {},
    }
    fields.update(overrides)
    return EndUser(**fields)


def step_up_error(user: EndUser, requirements: Requirements = STEP_UP) -> StepUpRequired:
    with pytest.raises(StepUpRequired) as caught:
        check_authentication(user, requirements, NOW)
    return caught.value


@pytest.mark.parametrize("auth_age", [0, 30, 299, 300])
def test_fresh_login_passes(auth_age):
    check_authentication(make_user(auth_time=NOW - auth_age), STEP_UP, NOW)


@pytest.mark.parametrize("acr", [MFA, HWK])
def test_accepted_acr_passes(acr):
    check_authentication(make_user(acr=acr), STEP_UP, NOW)


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"auth_time": NOW - 301}, "login older than max_age"),
        ({"auth_time": NOW - 86_400}, "login older than max_age"),
        ({"auth_time": None}, "token has no auth_time"),
        ({"acr": None}, "token has no acr"),
        ({"acr": PWD}, "acr not accepted"),
        ({"acr": ""}, "token has no acr"),
        ({"auth_time": None, "acr": PWD}, "token has no auth_time; acr not accepted"),
        ({"auth_time": NOW - 301, "acr": None}, "login older than max_age; token has no acr"),
    ],
)
def test_step_up_required(overrides, detail):
    error = step_up_error(make_user(**overrides))
    assert error.detail == detail
    assert error.max_age == 300
    assert error.acr_values == (HWK, MFA)


def test_step_up_reason():
    error = step_up_error(make_user(auth_time=None))
    assert error.code == "insufficient_user_authentication"
    assert REASONS[error.code].status == 401
    assert error.description == REASONS["insufficient_user_authentication"].description


def test_max_age_only_challenge():
    requirements = Requirements(require_user=True, reauth_max_age=600.0)
    error = step_up_error(make_user(auth_time=NOW - 601, acr=None), requirements)
    assert error.max_age == 600
    assert error.acr_values == ()


def test_max_age_only_ignores_acr():
    requirements = Requirements(require_user=True, reauth_max_age=600.0)
    check_authentication(make_user(acr=None), requirements, NOW)


def test_acr_only_challenge():
    requirements = Requirements(require_user=True, acr_values=(frozenset({HWK}),))
    error = step_up_error(make_user(auth_time=None, acr=MFA), requirements)
    assert error.max_age is None
    assert error.acr_values == (HWK,)
    assert error.detail == "acr not accepted"


def test_acr_only_ignores_auth_time():
    requirements = Requirements(require_user=True, acr_values=(frozenset({MFA}),))
    check_authentication(make_user(auth_time=None), requirements, NOW)


def test_acr_must_fit_every_policy():
    requirements = Requirements(require_user=True, acr_values=(frozenset({MFA, HWK}), frozenset({HWK, PWD})))
    error = step_up_error(make_user(acr=MFA), requirements)
    assert error.acr_values == (HWK,)


def test_acr_in_every_policy_passes():
    requirements = Requirements(require_user=True, acr_values=(frozenset({MFA, HWK}), frozenset({HWK, PWD})))
    check_authentication(make_user(acr=HWK), requirements, NOW)


def test_fractional_max_age_truncated():
    requirements = Requirements(require_user=True, reauth_max_age=90.5)
    error = step_up_error(make_user(auth_time=NOW - 91), requirements)
    assert error.max_age == 90


@pytest.mark.parametrize(
    "requirements",
    [
        Requirements(),
        Requirements(require_user=True),
        Requirements(require_user=True, token_audience="api", token_scope=frozenset({"read"}), token_ttl=5.0),
    ],
)
def test_non_sensitive_passes_anything(requirements):
    user = make_user(auth_time=None, acr=None, amr=())
    check_authentication(user, requirements, NOW)


def test_non_sensitive_passes_old_login():
    check_authentication(make_user(auth_time=0.0, acr=PWD), Requirements(require_user=True), NOW)


@pytest.mark.parametrize(
    ("acr_values", "expected"),
    [
        ((), ()),
        ((frozenset({MFA, HWK}),), (HWK, MFA)),
        ((frozenset({MFA, HWK}), frozenset({MFA})), (MFA,)),
        ((frozenset({MFA}), frozenset({HWK})), ()),
    ],
)
def test_accepted_acr_values(acr_values, expected):
    assert accepted_acr_values(Requirements(acr_values=acr_values)) == expected
