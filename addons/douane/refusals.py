"""Refusals shaped like the target API's own errors, so SDKs raise their usual typed exceptions.

Every refusal names its decision id (in the message and the `x-douane-decision-id` header), which
finds the audit record.
"""

from __future__ import annotations

import json
import logging
import traceback
import weakref
from typing import Any

from mitmproxy import http

from douane.flowstate import Action, Reason, state
from douane.protocols import mcp
from douane.untrusted import escape, loggable

logger = logging.getLogger(__name__)

DECISION_HEADER = "x-douane-decision-id"

# HTTP status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    407: ("invalid_request_error", "authentication_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    502: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
    504: ("server_error", "api_error"),
}

# JSON-RPC error codes douane uses for MCP refusals (implementation-defined server error range).
MCP_UNAUTHORIZED = -32001
MCP_FORBIDDEN = -32003
MCP_INVALID = -32600
MCP_UPSTREAM = -32000  # the upstream failed or answered what douane refuses to pass
# Refusals the MCP specification gives an HTTP status and a JSON-RPC code of their own.
# 2026-07-28: HeaderMismatch; an unknown session (the code MCP's SDKs answer it with)
MCP_ERRORS = {"header_mismatch": (400, -32020), "mcp_session_unknown": (404, -32001)}
MESSAGE_CHARS = 2048  # of a refusal's message (`bounded`)
ID_BODY_BYTES = 64 * 1024  # a refusal given before the body arrived reads at most this for the id

# Every refusal douane gave, so `KeepRefusals` can put one back when another addon replaced it.
_refusals: weakref.WeakKeyDictionary[http.HTTPFlow, http.Response] = weakref.WeakKeyDictionary()


def bounded(message: str) -> str:
    """A refusal's message as sent: at most `MESSAGE_CHARS`, no control character. Every value a
    message quotes from a client is cut where it is quoted (`untrusted.quoted`); this holds for
    one that was not."""
    if len(message) > MESSAGE_CHARS:
        message = f"{message[:MESSAGE_CHARS]}… ({len(message)} characters)"
    return escape(message)


def error_body(protocol: str, status: int, message: str, code: str, decision_id: str,
               rpc_id: Any = None) -> dict[str, Any]:
    """The JSON error document for `protocol` ("openai", "anthropic", "mcp", "generic")."""
    text = f"{bounded(message)} (douane decision {decision_id})"
    openai_type, anthropic_type = _TYPES.get(status, ("invalid_request_error", "api_error"))
    if protocol == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": text},
                "request_id": decision_id}
    if protocol == "mcp":
        rpc_code = MCP_ERRORS[code][1] if code in MCP_ERRORS else {
            401: MCP_UNAUTHORIZED, 407: MCP_UNAUTHORIZED, 400: MCP_INVALID, 502: MCP_UPSTREAM,
            504: MCP_UPSTREAM}.get(status, MCP_FORBIDDEN)
        return {"jsonrpc": "2.0", "id": rpc_id,
                "error": {"code": rpc_code, "message": text,
                          "data": {"decision_id": decision_id, "reason": code}}}
    return {"error": {"message": text, "type": openai_type, "code": code, "param": None,
                      "decision_id": decision_id}}


def make_response(protocol: str, status: int, message: str, *, code: str, decision_id: str,
                  rpc_id: Any = None, headers: dict[str, str] | None = None) -> http.Response:
    body = json.dumps(error_body(protocol, status, message, code, decision_id, rpc_id))
    resp = http.Response.make(status, body, {"content-type": "application/json",
                                             DECISION_HEADER: decision_id})
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def refuse(flow: http.HTTPFlow, status: int, message: str, code: str, *reasons: Reason,
           action: Action = "refuse", headers: dict[str, str] | None = None) -> None:
    """Answer the flow with a refusal in its upstream's shape and record the decision.

    The request never reaches the upstream once `flow.response` is set in a request hook.
    MCP: a refused JSON-RPC request is answered at the JSON-RPC level (HTTP 200) so MCP clients
    raise their usual error; a refused `tools/call` becomes a tool result with `isError: true`, which
    agents show to the model instead of aborting. Authentication failures stay HTTP 401, and the
    errors the MCP specification gives a status of their own (`MCP_ERRORS`) keep it. A refusal
    given before the body arrived (authentication, Origin) names the request's id once it has
    (`KeepRefusals.request`).
    """
    st = state(flow)
    protocol = st.upstream.protocol if st.upstream else "generic"
    # the upstream's headers arrived, its body not yet (a stream filter attached or not):
    # mitmproxy would read that body into whatever response the flow has by then, this refusal
    body_to_come = flow.response is not None and flow.response.raw_content is None
    st.decide(action, *(reasons or (Reason(code, message),)), status=status)
    first = st.interaction.mcp[0] if st.interaction and st.interaction.mcp else None
    if protocol == "mcp" and first and first.request_id is not None and status not in (401, 407):
        text = f"{bounded(message)} (douane decision {st.decision_id})"
        if first.method == "tools/call" and code not in MCP_ERRORS:
            doc: dict[str, Any] = {"jsonrpc": "2.0", "id": first.request_id, "result": {
                "content": [{"type": "text", "text": text}], "isError": True}}
            if flow.request.headers.get("mcp-protocol-version", "") >= mcp.MODERN:
                doc["result"]["resultType"] = "complete"  # 2026-07-28: results say their kind
        else:
            doc = error_body("mcp", status, message, code, st.decision_id, first.request_id)
        flow.response = http.Response.make(MCP_ERRORS.get(code, (200,))[0], json.dumps(doc), {
            "content-type": "application/json", DECISION_HEADER: st.decision_id})
    else:
        flow.response = make_response(protocol, status, message, code=code,
                                      decision_id=st.decision_id, rpc_id=None, headers=headers)
    if body_to_come:
        flow.response.stream = _InsteadOfBody(flow.response.content or b"")
    _refusals[flow] = flow.response


class _InsteadOfBody:
    """A refusal's stream while the upstream's body is still to come: that body is read and
    dropped, the refusal's body is sent at its end."""

    def __init__(self, body: bytes):
        self.body: bytes | None = body

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        if data or self.body is None:
            return [] if data else b""
        body, self.body = self.body, None
        return body


def input_required(flow: http.HTTPFlow, url: str, message: str, *reasons: Reason) -> None:
    """A held MCP request answered the 2026-07-28 way: an `InputRequiredResult` asking the client
    to open `url` (a URL elicitation) and retry. It carries no `requestState`: douane keeps
    nothing in the client; its retry is decided afresh, and its answer to douane's input request
    (`mcp.APPROVAL_INPUT`) is one checked word, taken out before the request goes upstream."""
    st = state(flow)
    assert st.interaction and st.interaction.mcp
    st.decide("hold", *reasons, status=200)
    doc = {"jsonrpc": "2.0", "id": st.interaction.mcp[0].request_id, "result": {
        "resultType": "input_required", "inputRequests": {mcp.APPROVAL_INPUT: {
            "method": "elicitation/create", "params": {"mode": "url", "message": message,
                                                       "url": url}}}}}
    flow.response = http.Response.make(200, json.dumps(doc), {
        "content-type": "application/json", DECISION_HEADER: st.decision_id})
    _refusals[flow] = flow.response


class KeepRefusals:
    """A refusal is final. mitmproxy's server replay (`--server-replay`, used to run tests on
    recordings) answers in its own `request` hook, which runs after douane's and would replace a
    refusal with the recorded answer; the refusal is put back before any response hook reads it.

    An MCP refusal given on the request's headers (authentication, Origin, size) answers once the
    body has arrived (mitmproxy reads it anyway, within its limit): the body is then read for the
    JSON-RPC id alone, so the client can pair the error with its request. Nothing else of it is
    looked at, and it goes nowhere."""

    def request(self, flow: http.HTTPFlow) -> None:
        refusal = _refusals.get(flow) if _refusals else None  # (a weak reference per get)
        st = state(flow)
        if refusal is None or flow.response is not refusal or st.interaction is not None \
                or st.upstream is None or st.upstream.protocol != "mcp":
            return
        rid = _request_id(flow.request)
        if rid is not None:
            doc = json.loads(refusal.content or b"null")
            if isinstance(doc, dict) and "id" in doc and doc["id"] is None:
                doc["id"] = rid
                refusal.content = json.dumps(doc).encode()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        refusal = _refusals.get(flow) if _refusals else None
        if refusal is not None and flow.response is not refusal:
            logger.info("douane: %s answered a refused flow (decision %s); the refusal stands",
                        "server replay" if flow.is_replay == "response" else "another addon",
                        state(flow).decision_id)
            flow.response = refusal


def _request_id(request: http.Request) -> Any:
    """The id of a single JSON-RPC request in a small, unencoded body, or None."""
    raw = request.raw_content
    if not raw or len(raw) > ID_BODY_BYTES or \
            request.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    rid = doc.get("id") if isinstance(doc, dict) and doc.get("jsonrpc") == "2.0" else None
    return rid if mcp.id_key(rid) is not None else None


def fail_closed(flow: http.HTTPFlow, where: str, error: Exception) -> None:
    """An exception in a flow step refuses the flow instead of letting it through (the
    `douane.pipeline.Checkpoint` calls this for every step).

    mitmproxy logs a raising hook as "Addon error" and carries on delivering the flow; this turns
    that into a 500 in the API's shape (or cuts a stream already on its way), logged with the
    decision id. A refusal douane already gave stands (the audit keeps its reasons and names the
    failure too): a later step's bug does not turn a policy's 403 into a 500.
    """
    st = state(flow)
    logger.error("douane: %s failed on %s (decision %s): %s",
                 where, loggable(flow.request.pretty_url) if flow.request else "?",
                 st.decision_id, loggable("".join(traceback.format_exception_only(error)).strip(),
                                          1024))
    logger.debug("traceback", exc_info=error)
    reason = Reason("gateway.error", type(error).__name__)
    if flow.response is not None and _refusals.get(flow) is flow.response and st.decision:
        st.decision.reasons.append(reason)  # a refusal already given stands, with its reasons
    elif flow.live and not (flow.response and flow.response.stream):
        refuse(flow, 500, "douane could not evaluate this request and refused it",
               "gateway_error", reason, action="error")
    elif flow.live:
        flow.kill()
