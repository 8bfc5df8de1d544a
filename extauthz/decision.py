"""The outcome of one Check, filled in step by step by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from extauthz.errors import REASONS, DenyError
from extauthz.identity import EndUser
from extauthz.mint import MintedToken
from extauthz.request import HttpRequest, Peer


@dataclass(slots=True)
class Decision:
    decision_id: str
    started_at: float
    allowed: bool = False
    reason: str = "internal_error"
    detail: str = ""
    description: str = REASONS["internal_error"].description
    peer: Peer | None = None
    request: HttpRequest | None = None
    user: EndUser | None = None
    policies: list[str] = field(default_factory=list)
    minted: MintedToken | None = None
    error: DenyError | None = None
    # The shared store was unreachable and store.on_error let the request through on standard checks.
    degraded: bool = False
    # The Check repeated an earlier one whose one-time token claim it shares (an Envoy retry).
    retry: bool = False
    # Upstream headers that carry injected secrets, as (header, value). Never logged: the decision
    # record names the secrets from `injected_secrets` instead.
    injected_headers: list[tuple[str, str]] = field(default_factory=list, repr=False)
    injected_secrets: list[str] = field(default_factory=list)
    # The deny that dry-run policies would have caused; the request was decided without it.
    would_deny: DenyError | None = None
    duration: float = 0.0

    @property
    def outcome(self) -> str:
        return "allow" if self.allowed else "deny"

    @property
    def status(self) -> int:
        return REASONS[self.reason].status

    def allow(self, minted: MintedToken) -> None:
        self.allowed = True
        self.reason = "allowed"
        self.description = REASONS["allowed"].description
        self.minted = minted

    def deny(self, error: DenyError) -> None:
        self.allowed = False
        self.reason = error.code
        self.detail = error.detail
        self.description = error.description
        self.error = error
        self.minted = None
        self.injected_headers = []
        self.injected_secrets = []
