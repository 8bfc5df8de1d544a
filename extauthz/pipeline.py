"""The decision pipeline: one CheckRequest in, one Decision out, logged on every path.

Steps, each of which may end the pipeline with a deny:

1. normalise the request (400 on anything ambiguous);
2. read the bearer token and verify it when present (401 on a bad token, 400 on a bad header);
3. find the policies that match (403 when none does);
4. merge their requirements (403 when they conflict);
5. demand an end-user token where required (401), reject revoked tokens (401), and demand a fresh,
   strong login on sensitive routes (401 with the RFC 9470 challenge);
6. claim a one-time token (401 on a replay);
7. resolve the secrets to inject upstream (503 when one has no value), mint the per-request token
   and allow.

A step that needs the shared store and cannot reach it denies with 503 `state_unavailable`, except
that a route that is neither sensitive nor one-time follows `store.on_error`. When the decision log
cannot keep a Check's record (its spool is full) and `decision_log.on_full` is `deny`, the Check
denies with 503 `audit_unavailable`, whatever it decided.

Policies annotated `extauthz.io/mode: dry-run` do not decide. The enforced policies that match decide
alone (a request that only dry-run policies match is allowed, and its token gets the default
settings). Then every matching policy is evaluated as if enforced, with no store write, and a deny
that this would cause is recorded as `would_deny`.

The policies and the issuers' key sets form one Snapshot, replaced whole on reload. A Check reads
the snapshot once, so it finishes on the snapshot it started with.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envoy.service.auth.v3 import external_auth_pb2

from extauthz.decision import Decision
from extauthz.decision_log import DecisionLog
from extauthz.errors import DenyError, TokenError
from extauthz.identity import EndUser, TokenVerifier, extract_bearer
from extauthz.metrics import Metrics
from extauthz.mint import TokenMinter
from extauthz.policy import Policy, Requirements
from extauthz.policy_index import PolicySet
from extauthz.reauth import check_authentication
from extauthz.replay import ReplayGuard
from extauthz.request import HttpRequest, from_check_request, read_peer
from extauthz.revocation import RevocationList
from extauthz.secrets import Secrets, SecretUnavailable
from extauthz.store import StoreError

log = logging.getLogger(__name__)


# The version (4) and variant (RFC 4122) bits of a random UUID, and the mask that clears them.
_UUID4_BITS = 0x4000 << 64 | 0x8000 << 48
_UUID4_MASK = ~(0xF000 << 64 | 0xC000 << 48)


def new_decision_id() -> str:
    """Return a random UUID (version 4) as text: what str(uuid.uuid4()) returns, at half its cost."""
    text = f"{int.from_bytes(os.urandom(16), 'big') & _UUID4_MASK | _UUID4_BITS:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The policies and the verifier of end-user tokens: the parts that a reload replaces."""

    policies: PolicySet
    verifier: TokenVerifier
    generation: int = 1


class Authorizer:
    def __init__(self, *, verifier: TokenVerifier, policies: PolicySet, minter: TokenMinter,
                 decision_log: DecisionLog, revocations: RevocationList, replay: ReplayGuard,
                 on_store_error: str, max_token_bytes: int, max_path_bytes: int,
                 metrics: Metrics | None = None, secrets: Secrets | None = None,
                 clock: Callable[[], float] = time.time):
        self.snapshot = Snapshot(policies, verifier)
        self.revocations = revocations
        self.replay = replay
        self.on_store_error = on_store_error
        self.minter = minter
        self.decision_log = decision_log
        self.max_token_bytes = max_token_bytes
        self.max_path_bytes = max_path_bytes
        self.metrics = metrics or Metrics()
        self.secrets = secrets or Secrets(())
        self.clock = clock
        self.store_errors = 0
        self._last_store_error_log = 0.0

    @property
    def policies(self) -> PolicySet:
        return self.snapshot.policies

    @property
    def verifier(self) -> TokenVerifier:
        return self.snapshot.verifier

    def replace_snapshot(self, policies: PolicySet, verifier: TokenVerifier) -> Snapshot:
        """Swap in new policies and issuers at once; Checks already running keep the old ones."""
        self.snapshot = Snapshot(policies, verifier, self.snapshot.generation + 1)
        return self.snapshot

    def check(self, check_request: external_auth_pb2.CheckRequest, claims: dict | None = None) -> Decision:
        """Decide one CheckRequest. Never raises: an unexpected error is a logged 500 deny.

        `claims` stands in for a verified end-user token: `extauthz policy explain` uses it to decide
        on claims without a signed token. `serve` never passes it.
        """
        started = time.perf_counter()
        decision = Decision(decision_id=new_decision_id(), started_at=self.clock())
        try:
            self._decide(check_request, decision, self.snapshot, claims)
        except DenyError as exc:
            # The traceback holds this frame, which holds the decision, which holds the error: dropping
            # it spares the garbage collector one reference cycle per deny.
            exc.__traceback__ = None
            decision.deny(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must become a deny, never an allow or a crash
            log.exception("Check failed", extra={"decision_id": decision.decision_id})
            decision.deny(DenyError("internal_error", type(exc).__name__))
        finally:
            decision.duration = time.perf_counter() - started
            try:
                self._record(decision)
                self.metrics.record_check(decision.outcome, decision.reason, decision.duration,
                                          decision.minted is not None, decision.would_deny)
            except Exception:  # noqa: BLE001 - recording must never turn a decision into a gRPC error
                log.exception("recording the decision failed", extra={"decision_id": decision.decision_id})
        return decision

    def _record(self, decision: Decision) -> None:
        """Hand the decision to the decision log; fail closed when it cannot be kept and on_full is deny."""
        if not self.decision_log.write(decision) and self.decision_log.on_full == "deny":
            decision.deny(DenyError("audit_unavailable", "the decision log could not keep the record"))

    def _decide(self, check_request: external_auth_pb2.CheckRequest, decision: Decision, snapshot: Snapshot,
                claims: dict | None = None) -> None:
        decision.peer = read_peer(check_request)
        request = from_check_request(check_request, self.max_path_bytes, decision.peer)
        decision.request = request

        token = extract_bearer(request.headers.get("authorization"), self.max_token_bytes)
        if claims is not None:
            user = snapshot.verifier.verify_claims(claims)
        else:
            user = snapshot.verifier.verify(token) if token is not None else None
        decision.user = user

        policies = snapshot.policies.match(request, user)
        if not policies:
            raise DenyError("no_matching_policy")
        decision.policies = [policy.key for policy in policies]

        enforced = [policy for policy in policies if not policy.dry_run]
        if len(enforced) == len(policies):
            requirements = self._enforce(policies, request, user, decision, snapshot, claim=True)
            self._allow(decision, request, user, requirements)
            return

        # Some matching policies are in dry-run. The enforced ones decide, and mint with their own
        # settings (the defaults when none is enforced). Then all of them are evaluated once more,
        # with no side effect, to record what enforcing the dry-run policies would change.
        requirements = Requirements()
        if enforced:
            requirements = self._enforce(enforced, request, user, decision, snapshot, claim=True)
        elif user is not None:
            # No enforced policy ran the revocation check: a revoked token is denied on every route.
            self._check_revocation(user, requirements, decision)
        try:
            self._enforce(policies, request, user, decision, snapshot, claim=False)
        except DenyError as would:
            decision.would_deny = would
        self._allow(decision, request, user, requirements)

    def _allow(self, decision: Decision, request: HttpRequest, user: EndUser | None,
               requirements: Requirements) -> None:
        """Resolve the injected secrets, mint the per-request token and allow."""
        injected = []
        for injection in requirements.injections:
            try:
                value = injection.render(self.secrets.get(injection.secret))
            except SecretUnavailable as exc:
                raise DenyError("secret_unavailable", f"secret {injection.secret} has no value") from exc
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                # An environment variable with bytes that are not UTF-8 reads as lone surrogates, which
                # no header value in a CheckResponse can carry.
                raise DenyError("secret_unavailable", f"secret {injection.secret} is not valid UTF-8 text") from exc
            injected.append((injection.header, value))
        decision.allow(self.minter.mint(decision.decision_id, request, user, requirements))
        decision.injected_headers = injected
        decision.injected_secrets = [injection.secret for injection in requirements.injections]

    def _enforce(self, policies: Sequence[Policy], request: HttpRequest, user: EndUser | None,
                 decision: Decision, snapshot: Snapshot, *, claim: bool) -> Requirements:
        """Apply the requirements of `policies`; return them, or raise DenyError.

        With `claim`, a one-time token is claimed in the store; without it nothing is written.
        """
        requirements = snapshot.policies.requirements(policies)

        if requirements.require_user and user is None:
            raise TokenError("missing_token")
        now = self.clock()
        if user is not None:
            self._check_revocation(user, requirements, decision)
            check_authentication(user, requirements, now)

        if requirements.one_time_token and claim:
            assert user is not None
            leeway = snapshot.verifier.issuers[user.issuer].config.leeway
            try:
                decision.retry = self.replay.claim(user, request, now, leeway)
            except StoreError as exc:
                self._log_store_error("claim", "one-time token claim failed", exc, decision)
                raise DenyError("state_unavailable", "one-time token claim failed") from exc
        return requirements

    def _log_store_error(self, operation: str, message: str, error: StoreError, decision: Decision) -> None:
        self.store_errors += 1
        self.metrics.store_errors.labels(operation).inc()
        now = time.monotonic()
        if now - self._last_store_error_log > 10:
            self._last_store_error_log = now
            log.error(message, extra={"error": str(error), "failures": self.store_errors,
                                      "decision_id": decision.decision_id})

    def _check_revocation(self, user: EndUser, requirements: Requirements, decision: Decision) -> None:
        try:
            self.revocations.check(user)
        except StoreError as exc:
            if requirements.sensitive or requirements.one_time_token or self.on_store_error == "deny":
                raise DenyError("state_unavailable", "revocation state is stale") from exc
            # store.on_error: allow_standard. Every check that needs no store still applies.
            decision.degraded = True

