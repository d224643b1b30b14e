"""`PoliceWebSocket`: on an upstream that allows WebSockets (`allow_websocket: true`, e.g. the OpenAI
Realtime API), every message passes the same deny rules and detectors as an HTTP body, one message
at a time, in both directions.

A message that cannot be inspected (binary, or text that is not JSON) or that the policy blocks is
not delivered: the client gets an `error` event in the Realtime API's shape naming the decision id,
the event is audited, and every later message of that connection is dropped (mitmproxy cannot
close a WebSocket from an addon, so the connection is left with nothing passing through it).
A message cannot be held for an approver: at the hold threshold it is blocked.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mitmproxy import ctx, http

from douane.audit import AuditTrail, flow_record
from douane.flowstate import Reason, peek
from douane.interaction import JsonPath, Kind, TextPiece
from douane.policy import engine
from douane.policy.addon import Enforce, explain
from douane.untrusted import loggable

logger = logging.getLogger(__name__)

# Keys whose string values are identifiers or encodings, not text a person or model wrote.
NOT_TEXT = frozenset({"type", "event_id", "id", "item_id", "response_id", "call_id",
                      "previous_item_id", "object", "role", "status", "model", "voice", "audio",
                      "format", "modalities", "output_audio_format", "input_audio_format"})


def text_pieces(doc: Any, kind: Kind, path: JsonPath = ()) -> list[TextPiece]:
    """Every string of a JSON event that carries text, with its path."""
    if isinstance(doc, str):
        return [TextPiece(kind, None, doc, path)] if doc else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) \
        else ()
    if isinstance(doc, dict) and ".audio." in str(doc.get("type", "")):
        return []  # base64 audio deltas carry no text (their transcripts are separate events)
    return [piece for key, value in items if key not in NOT_TEXT
            for piece in text_pieces(value, kind, (*path, key))]


class PoliceWebSocket:
    def __init__(self, enforce: Enforce, audit_trail: AuditTrail):
        self.enforce = enforce
        self.audit_trail = audit_trail
        self.cut: set[str] = set()  # ids of flows whose later messages are all dropped

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if st is None or st.upstream is None or flow.websocket is None:
            return  # not a flow of this gateway (read back, replayed) or not governed
        message = flow.websocket.messages[-1]
        if message.injected:
            return  # douane's own error event
        if flow.id in self.cut:
            message.drop()
            return
        try:
            reason = self._verdict(message.is_text, message.content, message.from_client)
        except Exception as e:  # fail closed: an error in policy stops the connection
            logger.error("douane: WebSocket policy failed (decision %s): %s", st.decision_id, e)
            reason = Reason("gateway.error",
                            f"douane could not evaluate a message ({type(e).__name__})")
        if reason is not None:
            message.drop()
            self._cut(flow, reason)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.cut.discard(flow.id)

    def _verdict(self, is_text: bool, content: bytes, from_client: bool) -> Reason | None:
        """None to deliver the message, else the reason it is stopped."""
        if not is_text:
            return Reason("protocol.websocket_binary", "binary WebSocket messages cannot be "
                          "inspected")
        try:
            doc = json.loads(content)
        except ValueError:
            return Reason("protocol.websocket_not_json", "a WebSocket message was not JSON")
        live = self.enforce.live
        if live is None:
            return None  # no policy configured: nothing to enforce beyond parsing
        pieces = text_pieces(doc, "prompt" if from_client else "completion")
        decision = engine.decide(live.current, engine.risk(live.current, pieces),
                                 hold_allowed=False)
        if decision.action == "block":
            return Reason("policy.websocket", f"blocked by policy: {explain(decision)}",
                          score=decision.risk)
        return None

    def _cut(self, flow: http.HTTPFlow, reason: Reason) -> None:
        st = peek(flow)
        assert st is not None
        self.cut.add(flow.id)
        event = {"type": "error", "event_id": st.decision_id, "error": {
            "type": "invalid_request_error", "code": "policy_denied", "param": None,
            "message": f"{reason.message} (douane decision {st.decision_id})"}}
        ctx.master.commands.call("inject.websocket", flow, True, json.dumps(event).encode(), True)
        record = flow_record(flow, self.enforce.settings.config)
        record.update(event="websocket_message", action="block", reasons=[reason.summary()])
        self.audit_trail.append(record)
        logger.warning("douane: WebSocket to %s stopped (decision %s): %s",
                       st.upstream.name if st.upstream else "?", st.decision_id,
                       loggable(reason.message))
