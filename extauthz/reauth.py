"""Re-authentication on sensitive routes: the step-up challenge of RFC 9470.

A route is sensitive when a matching policy sets `extauthz.io/reauth-max-age` or
`extauthz.io/acr-values`. The end-user token must then carry an `auth_time` no older than the
max age and an `acr` that every matching policy accepts. Otherwise the caller gets HTTP 401 with

    WWW-Authenticate: Bearer error="insufficient_user_authentication",
        error_description="...", max_age="300", acr_values="urn:example:mfa"

naming every requirement of the route, so that one new login satisfies all of them.
"""

from __future__ import annotations

from extauthz.errors import DenyError
from extauthz.identity import EndUser
from extauthz.policy import Requirements


class StepUpRequired(DenyError):
    """The login is too old or too weak for this route."""

    def __init__(self, detail: str, max_age: int | None, acr_values: tuple[str, ...]):
        super().__init__("insufficient_user_authentication", detail)
        self.max_age = max_age
        self.acr_values = acr_values


def accepted_acr_values(requirements: Requirements) -> tuple[str, ...]:
    """Return the acr values that satisfy every matching policy, sorted for a stable challenge."""
    if not requirements.acr_values:
        return ()
    return tuple(sorted(frozenset.intersection(*requirements.acr_values)))


def check_authentication(user: EndUser, requirements: Requirements, now: float) -> None:
    """Raise StepUpRequired unless the login meets the route's max age and acr requirements."""
    if not requirements.sensitive:
        return

    problems = []
    max_age = requirements.reauth_max_age
    if max_age is not None:
        if user.auth_time is None:
            problems.append("token has no auth_time")
        elif now - user.auth_time > max_age:
            problems.append("login older than max_age")

    acr_values = accepted_acr_values(requirements)
    if requirements.acr_values and user.acr not in acr_values:
        problems.append("acr not accepted" if user.acr else "token has no acr")

    if problems:
        raise StepUpRequired("; ".join(problems), int(max_age) if max_age is not None else None, acr_values)
