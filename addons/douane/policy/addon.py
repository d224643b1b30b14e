"""`Enforce`: the policy decides each request (grants, limits, risk) and polices responses
(tool results, resources, MCP listings filtered to what the caller may use).

Without a `policy:` section in the config, nothing is enforced here (identity, routing and
inspection still are); the audit record then carries no policy version.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import http

from douane import protocols
from douane.flowstate import Decision, FlowState, Reason, state
from douane.interaction import TextPiece
from douane.policy import engine
from douane.policy.limits import RateLimiter, SharedRateLimiter
from douane.policy.model import Policy
from douane.policy.store import LivePolicy
from douane.protocols import fields, jsonpath, mcp, streams
from douane.refusals import refuse
from douane.settings import Settings
from douane.store import StoreUnavailable
from douane.store.addon import SharedStore

logger = logging.getLogger(__name__)
# Set by the costliest texts per character (decoded runs, escapes): ~5 ms of CPU at this size.
OFF_LOOP_CHARS = 8 * 1024
# ... and by their number: each text costs a few µs whatever its length (~5 ms per 1,000)
OFF_LOOP_PIECES = 1024


def large(pieces: list[TextPiece]) -> bool:
    """Whether texts are matched in a thread. A character outside ASCII costs the views and folds
    ~4x one inside it (240k characters with a zero-width space between letters held the loop
    ~0.26 s, as many ASCII ones ~0.07)."""
    return len(pieces) > OFF_LOOP_PIECES or sum(
        len(p.text) if p.text.isascii() else 4 * len(p.text) for p in pieces) > OFF_LOOP_CHARS


def explain(decision: Decision) -> str:
    return "; ".join(r.message for r in decision.reasons) or decision.action


def hold(flow: http.HTTPFlow, decision: Decision, approvals: bool) -> None:
    """A request that needs a human approver: left for `Approvals` (a later step)
    when an `approvals:` section is configured, else refused (fail closed)."""
    if approvals:
        state(flow).decide("hold", *decision.reasons)
        return
    refuse(flow, 403, f"this request needs an approver: {explain(decision)}",
           "approval_required", *decision.reasons, action="hold")


class StreamPolicy:
    """Deny rules on a streamed answer, as a stream filter: each channel's text so far is matched
    as it grows, so a phrase split across SSE events is caught and the event completing it is
    never sent (the stream ends with the API's error event instead). A channel starts with the
    tail of the one that ended last: an answer's blocks in a row (Anthropic text blocks,
    Responses output parts) are one text to a reader, and a whole answer is matched as one."""

    TAIL = 2048  # characters of a channel's text matched again with each delta

    def __init__(self, policy: Policy, st: FlowState, rewriter: streams.StreamRewriter):
        self.policy, self.st, self.rewriter = policy, st, rewriter
        self.seen: dict[str, str] = {}
        self.last = ""  # the tail of the channel that ended last
        self.fed = ""  # the channel that got text last

    def feed(self, channel: str, text: str) -> str:
        if self.rewriter.abort_message:
            return ""
        if channel not in self.seen:  # it goes on from the text before it, ended or not (a
            # chat stream's next tool call while the last is open: the whole answer's join)
            self.seen[channel] = self.seen.get(self.fed, self.last)
        self.fed = channel
        seen = (self.seen[channel] + text)[-self.TAIL:]
        self.seen[channel] = seen
        pieces = [TextPiece("completion", "assistant", seen, ("stream", channel))]
        if "\\" in seen:  # streamed tool arguments are JSON text: read escapes as the tool will
            pieces.append(TextPiece("completion", "assistant", fields.unescaped(seen),
                                    ("stream", channel)))
        decision = engine.evaluate_response(self.policy, pieces)
        if decision.action != "block":
            return text
        self.st.decide("block", *decision.reasons)
        self.st.decision.risk = decision.risk  # type: ignore[union-attr]
        self.rewriter.abort(f"the answer was blocked by policy: {explain(decision)}")
        return ""

    def finish(self, channel: str) -> str:
        self.last = self.seen.pop(channel, self.last)
        return ""

    def follow(self, channel: str, previous: str) -> None:
        """The next block of one text (`streams.next_block`): matched with the one before, as
        the whole answer's blocks are."""
        self.seen[channel] = self.seen.pop(previous, "")


class StreamToolNames:
    """Deny rules on a streamed answer's tool-call names, as a message hook (a name is never
    edited, so it is no filter's text). The whole answer reads every name (kind
    `tool_arguments`); streamed, a chat stream's `function.name` comes in pieces the SDKs join
    per call: matched joined as it grows, so the event completing a denied name is never sent
    (the stream ends with the API's error event). Names sent whole (Responses call items,
    Anthropic `tool_use` blocks) are matched alone."""

    def __init__(self, policy: Policy, st: FlowState, rewriter: streams.StreamRewriter):
        self.policy, self.st, self.rewriter = policy, st, rewriter
        self.names: dict[str, str] = {}  # call -> its name so far (its last TAIL characters)

    def __call__(self, doc: Any) -> None:
        for call, piece in self.rewriter.format.tool_names(doc):
            name = piece if call is None else \
                (self.names.get(call, "") + piece)[-StreamPolicy.TAIL:]
            if call is not None:
                self.names[call] = name
            decision = engine.evaluate_response(self.policy, [
                TextPiece("tool_arguments", "assistant", name, ("stream", "name"))])
            if decision.action == "block":
                _blocked(self.st, self.rewriter, decision)
                return


class StreamFields:
    """Deny rules on a stream's `event:` and `id:` values (`StreamRewriter.field_hooks`): they
    reach the client beside the data, read as its text is (a completion, an MCP tool result)."""

    def __init__(self, policy: Policy, st: FlowState, rewriter: streams.StreamRewriter,
                 kind: str):
        self.policy, self.st, self.rewriter, self.kind = policy, st, rewriter, kind

    def __call__(self, name: str, value: str) -> None:
        decision = engine.evaluate_response(self.policy, [
            TextPiece(self.kind, "assistant", value, ("stream", name))])  # type: ignore[arg-type]
        if decision.action == "block":
            _blocked(self.st, self.rewriter, decision)


class StreamMcpItems:
    """The policy on the remote MCP items a streamed answer carries whole (an `mcp_call`'s
    `server_label`, an `mcp_list_tools` item, an Anthropic `mcp_tool_use`'s `server_name`, an
    `mcp_tool_result`), as a message hook: read as the whole answer reads them (their names and
    labels are no filter's text; a result is a tool result, not a completion), so the event
    carrying a denied one is never sent."""

    def __init__(self, policy: Policy, st: FlowState, rewriter: streams.StreamRewriter):
        self.policy, self.st, self.rewriter = policy, st, rewriter

    def __call__(self, doc: Any) -> None:
        pieces = self.rewriter.format.whole_items(doc)
        decision = engine.evaluate_response(self.policy, pieces) if pieces else None
        if decision and decision.action == "block":
            _blocked(self.st, self.rewriter, decision)


def _blocked(st: FlowState, rewriter: streams.StreamRewriter, decision: Decision) -> None:
    st.decide("block", *decision.reasons)
    st.decision.risk = decision.risk  # type: ignore[union-attr]
    rewriter.abort(f"the answer was blocked by policy: {explain(decision)}")


class Enforce:
    def __init__(self, settings: Settings, shared: SharedStore | None = None):
        self.settings, self.shared = settings, shared
        self.live: LivePolicy | None = None
        self.limiter = RateLimiter()
        self.shared_limiter: SharedRateLimiter | None = None

    def configure(self, updated: set[str]) -> None:
        pg = self.shared.pg if self.shared else None
        if pg is None or self.shared_limiter is None or self.shared_limiter.pg is not pg:
            self.shared_limiter = SharedRateLimiter(pg) if pg else None
        if "douane_config" in updated or self.live is None:
            section = self.settings.config.sections.get("policy")
            if self.live:
                self.live.stop()
            self.live = LivePolicy(section) if section else None

    def policy(self) -> Policy | None:
        """The policy in force; None without a `policy:` section."""
        return self.live.current if self.live else None

    def running(self) -> None:
        if self.live:
            self.live.start()

    def done(self) -> None:
        if self.live:
            self.live.stop()

    def _ready(self, flow: http.HTTPFlow) -> FlowState | None:
        st = state(flow)
        if self.live is None or st.interaction is None or st.identity is None \
                or st.upstream is None or not flow.live:
            return None
        st.policy_version = self.live.current.version
        return st

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        st = self._ready(flow)
        if st is None:
            return
        assert self.live and st.identity and st.upstream and st.interaction
        policy = self.live.current
        grant, violations = engine.granting(policy, st.identity, st.upstream.name, st.interaction)
        if grant is None:
            decision = Decision("block", violations)
            refuse(flow, 403, f"blocked by policy: {explain(decision)}", "policy_denied",
                   *violations, action="block")
            return
        key = f"{grant.source}|{st.identity.user}"
        if self.shared_limiter is None:
            over = self.limiter.check(key, grant.limits, st.interaction)
        else:
            try:
                over = await self.shared_limiter.check(key, grant.limits, st.interaction)
            except StoreUnavailable as e:  # fail closed: a limit not counted is not enforced
                refuse(flow, 503, "douane cannot count this request against its limits now (its "
                       "shared store is unavailable); retry shortly", "store_unavailable",
                       Reason("store.unavailable", str(e)))
                return
        if over:
            refuse(flow, 429, over.message, "rate_limited", over, action="block")
            return
        # The texts of a large request are matched in a thread: the loop serves the others.
        if large(st.interaction.texts):
            reasons = await asyncio.to_thread(engine.request_risk, policy, st.interaction)
        else:
            reasons = engine.request_risk(policy, st.interaction)
        decision = engine.decide(policy, reasons)
        if decision.action == "block":
            refuse(flow, 403, f"blocked by policy: {explain(decision)}", "policy_denied",
                   *decision.reasons, action="block")
        elif decision.action == "hold":
            hold(flow, decision, "approvals" in self.settings.config.sections)
        elif decision.reasons:
            st.decide("allow", *decision.reasons)
        if st.decision:
            st.decision.risk = decision.risk

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = self._ready(flow)
        rewriter = streams.rewriter_of(flow)
        if st is None or rewriter is None:
            return
        assert st.interaction
        kind = "tool_result" if st.interaction.protocol == "mcp" else "completion"
        if self.live.current.rules_by_kind[kind]:
            rewriter.field_hooks.append(StreamFields(self.live.current, st, rewriter, kind))
        if st.interaction.protocol == "mcp":
            rewriter.message_hooks.append(lambda doc: self._police_message(flow, doc, rewriter))
        else:
            if self.live.current.rules_by_kind["tool_arguments"]:
                rewriter.message_hooks.append(StreamToolNames(self.live.current, st, rewriter))
            rewriter.message_hooks.append(StreamMcpItems(self.live.current, st, rewriter))
            if self.live.current.rules_by_kind["completion"]:
                rewriter.filters.append(StreamPolicy(self.live.current, st, rewriter))

    async def response(self, flow: http.HTTPFlow) -> None:
        st = self._ready(flow)
        if st is None or streams.rewriter_of(flow) or not flow.response or \
                (st.decision and st.decision.action in ("block", "refuse", "error", "hold")):
            return
        assert st.interaction
        if st.interaction.protocol == "mcp" and flow.response.raw_content:
            doc = protocols.document(flow, "response")
            removals, private = [], False
            for base, msg in mcp.each(doc):
                listings = self._listings(st, msg)
                if listings:  # (a tool's result, the common answer, is none)
                    removals += [base + path for path in self._hidden(st, msg, listings)]
                    private |= mcp.mark_private(msg)
            if removals or private:
                jsonpath.delete(doc, removals)
                protocols.write_json(flow, "response", doc)
        pieces = st.interaction.response_texts
        if large(pieces):  # as a request's (a 4 MB answer held the loop ~0.6 s)
            decision = await asyncio.to_thread(engine.evaluate_response, self.live.current, pieces)
        else:
            decision = engine.evaluate_response(self.live.current, pieces)
        if decision.action == "block":
            refuse(flow, 403, f"the answer was blocked by policy: {explain(decision)}",
                   "policy_denied_response", *decision.reasons, action="block")
            if st.decision:
                st.decision.risk = decision.risk

    @staticmethod
    def _listings(st: FlowState, msg: Any) -> list[str]:
        """The listings (`engine.LISTINGS`) a JSON-RPC message answers, which douane filters per
        caller: an answer to no request of this flow (a resumed stream) is each listing it looks
        like."""
        assert st.interaction
        result = msg.get("result") if isinstance(msg, dict) else None
        if not isinstance(result, dict):
            return []
        method = mcp.answered_method(st.interaction, msg)
        if method:
            return [method] if method in engine.LISTINGS else []
        return [m for m, (key, _) in engine.LISTINGS.items() if key in result]

    def _hidden(self, st: FlowState, msg: Any, listings: list[str]) -> list[tuple]:
        """Paths of listed items the caller may not use, in one JSON-RPC message answering
        `listings`."""
        assert self.live and st.identity and st.upstream
        result = msg["result"]
        paths = []
        for listing in listings:
            key = engine.LISTINGS[listing][0]
            hidden = engine.hidden_items(self.live.current, st.identity, st.upstream.name,
                                         listing, result)
            if hidden:
                st.decide("allow", Reason("policy.list_filtered",
                                          f"{len(hidden)} {key} hidden from {listing}"))
            paths += [("result", key, i) for i in hidden]
        return paths

    def _police_message(self, flow: http.HTTPFlow, doc: Any,
                        rewriter: streams.StreamRewriter) -> bool:
        """One SSE event of an MCP stream (a message or a batch): filter listings, police its
        text (answers as the method they answer, server requests and notifications whole)."""
        st = state(flow)
        assert self.live and st.interaction and isinstance(rewriter.format, mcp.McpStream)
        edited = False
        for base, msg in mcp.each(doc):
            listings = self._listings(st, msg)
            if not listings:
                continue
            hidden = self._hidden(st, msg, listings)
            if hidden:
                jsonpath.delete(doc, [base + path for path in hidden])
            edited |= bool(hidden) | mcp.mark_private(msg)
        # read once the listings are filtered; the stream's channels read the same pieces
        pieces = rewriter.format.pieces(doc)
        decision = engine.evaluate_response(self.live.current, mcp.free_text_first(pieces))
        if decision.action == "block":
            st.decide("block", *decision.reasons)
            st.decision.risk = decision.risk  # type: ignore[union-attr]
            rewriter.abort(f"the answer was blocked by policy: {explain(decision)}")
        return edited
