"""What douane knows about a flow while it is live: identity, upstream, interaction, decision.

The typed state is an attribute of the live flow object, not in `flow.metadata`, because metadata
must stay serialisable for `.mitm` files: mitmproxy saves, copies and replays a flow by its
declared state, so a flow read back or copied has none of its own. (A weak-keyed mapping beside
the flow would do the same at 15x the cost of each of its ~40 reads per request.)
`publish()` mirrors a serialisable summary into `flow.metadata["douane"]` (plus a flat `user`
key so `~meta 'user: alice'` filters work).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mitmproxy import http

    from douane.config import Credential, Upstream
    from douane.interaction import Interaction

Action = Literal["allow", "mask", "hold", "block", "refuse", "error"]


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    groups: tuple[str, ...]
    issuer: str  # the token issuer, or "trusted-header" for an auth proxy in front
    subject: str
    source: str  # where the identity came from: bearer, x-api-key, proxy-authorization, header
    expires_at: int | None = None
    audiences: tuple[str, ...] = ()  # the token's aud (an MCP resource checks its own URI is there)
    scopes: tuple[str, ...] = ()  # the token's scope / scp

    def summary(self) -> dict[str, Any]:
        return {"user": self.user, "groups": list(self.groups), "issuer": self.issuer,
                "source": self.source}


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a decision was taken; never carries the sensitive match itself."""

    rule: str  # rule id, e.g. "identity.expired", "deny.secrets.aws_key"
    message: str
    field: str | None = None  # where it matched, e.g. "prompt[2]", "tool_arguments.path"
    score: float = 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field:
            out["field"] = self.field
        if self.score:
            out["score"] = self.score
        return out


@dataclass(slots=True)
class Decision:
    action: Action
    reasons: list[Reason] = field(default_factory=list)
    risk: float = 0.0
    status: int | None = None  # HTTP status of a refusal

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "reasons": [r.summary() for r in self.reasons]}
        if self.risk:
            out["risk"] = self.risk
        if self.status:
            out["status"] = self.status
        return out


@dataclass(slots=True)
class FlowState:
    decision_id: str
    started: float  # time.monotonic() at the first hook
    identity: Identity | None = None
    upstream: Upstream | None = None
    credential: Credential | None = None  # the one InjectCredential adds (Broker chose it)
    interaction: Interaction | None = None
    decision: Decision | None = None
    masked: dict[str, int] = field(default_factory=dict)  # entity type -> count, never values
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds spent
    policy_version: str | None = None
    granted_operation: bool = False  # an operation no parser reads, named by a grant (Broker)
    # a generic upstream's client headers dropped (`forwarding.dropped_names`), for the record
    dropped_headers: dict[str, Any] | None = None
    # side -> (the body's bytes, their JSON): parsed once for the steps of one event
    # (`protocols.document`), let go when the event's steps are done (`Checkpoint`)
    documents: dict[str, tuple[bytes | None, Any]] = field(default_factory=dict)
    audited: bool = False
    metered: bool = False  # counted by `admin.Metrics` (once per flow)

    def decide(self, action: Action, *reasons: Reason, status: int | None = None) -> Decision:
        """Record a decision; a stricter one already taken is kept (block beats mask beats allow)."""
        new = Decision(action, list(reasons), status=status)
        if self.decision is None or _SEVERITY[action] >= _SEVERITY[self.decision.action]:
            if self.decision is not None and self.decision.action == action:
                new.reasons = self.decision.reasons + new.reasons
                new.risk = self.decision.risk
            self.decision = new
        return self.decision

    def time(self, stage: str, since: float) -> None:
        self.timings_ms[stage] = round(self.timings_ms.get(stage, 0.0)
                                       + (time.perf_counter() - since) * 1000, 3)


_SEVERITY = {"allow": 0, "mask": 1, "hold": 2, "block": 3, "refuse": 3, "error": 4}

_ATTRIBUTE = "_douane_state"


def new_decision_id() -> str:
    return "dcn_" + os.urandom(10).hex()  # 80 random bits (a uuid4 object costs 7x more)


def state(flow: http.HTTPFlow) -> FlowState:
    """The flow's state, created on first use (so every flow has a decision id)."""
    st = flow.__dict__.get(_ATTRIBUTE)
    if st is None:
        st = flow.__dict__[_ATTRIBUTE] = FlowState(decision_id=new_decision_id(),
                                                   started=time.monotonic())
    return st


def peek(flow: http.HTTPFlow) -> FlowState | None:
    return flow.__dict__.get(_ATTRIBUTE)


def summary(st: FlowState) -> dict[str, Any]:
    """The serialisable summary of a flow's state (what `publish` mirrors into metadata)."""
    meta: dict[str, Any] = {"decision_id": st.decision_id}
    if st.identity:
        meta["identity"] = st.identity.summary()
    if st.upstream:
        meta["upstream"] = st.upstream.name
    if st.interaction:
        meta["interaction"] = st.interaction.summary()
    if st.decision:
        meta["decision"] = st.decision.summary()
    if st.masked:
        meta["masked"] = dict(st.masked)
    return meta


def publish(flow: http.HTTPFlow) -> None:
    """Mirror a serialisable summary into flow.metadata, for mitmweb and recordings."""
    st = state(flow)
    if st.identity:
        flow.metadata["user"] = st.identity.user
    flow.metadata["douane"] = summary(st)
