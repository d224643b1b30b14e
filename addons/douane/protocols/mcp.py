"""MCP Streamable HTTP: JSON-RPC 2.0 over POST (single or batch), answered with JSON or an SSE
stream of JSON-RPC messages; GET opens a server-to-client SSE stream; DELETE ends a session.

The legacy HTTP+SSE transport (a GET stream whose first event is `endpoint`) is recognised and
refused. Methods douane does not know are refused with a JSON-RPC error, which keeps the `mcp`
SDK's `server/discover` -> `initialize` fallback working.
"""

from __future__ import annotations

import json
from typing import Any

from douane.interaction import Interaction, Kind, McpMessage, TextPiece, ToolCall, ToolDef
from douane.protocols import jsonpath
from douane.protocols.base import Delta, ProtocolError, StreamFormat
from douane.protocols.sse import Event

KNOWN_METHODS = {
    "initialize", "ping", "tools/list", "tools/call", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
}


def parse_request(doc: Any, session_id: str | None) -> Interaction:
    messages = doc if isinstance(doc, list) else [doc]
    if not messages:
        raise ProtocolError(400, "invalid_body", "an empty JSON-RPC batch")
    it = Interaction("mcp", "")
    for n, msg in enumerate(messages):
        base: tuple = (n,) if isinstance(doc, list) else ()
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            raise ProtocolError(400, "invalid_body", "not a JSON-RPC 2.0 message")
        method = msg.get("method")
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        if method is None:  # the client answers a server request (sampling, elicitation, roots)
            it.mcp.append(McpMessage(None, msg.get("id"), {}, session_id))
            it.texts += [TextPiece("prompt", "user", text, path) for path, text in
                         jsonpath.strings(msg.get("result"), (*base, "result"))]
            continue
        if not isinstance(method, str):
            raise ProtocolError(400, "invalid_body", "a JSON-RPC method must be a string")
        if method not in KNOWN_METHODS and not method.startswith("notifications/"):
            it.mcp.insert(0, McpMessage(method, msg.get("id"), params, session_id))
            it.operation = f"mcp:{method}"
            raise ProtocolError(403, "method_not_governed",
                                f"douane does not govern the MCP method {method!r}", it)
        message = McpMessage(method, msg.get("id"), params, session_id)
        if method == "tools/call":
            message.tool = str(params.get("name"))
            arguments = params.get("arguments") or {}
            it.tool_calls.append(ToolCall(message.tool, arguments, msg.get("id"),
                                          (*base, "params", "arguments")))
            it.texts += [TextPiece("tool_arguments", "user", text, path) for path, text in
                         jsonpath.strings(arguments, (*base, "params", "arguments"))]
        elif method == "resources/read":
            message.uri = str(params.get("uri"))
        elif method == "prompts/get":
            message.prompt = str(params.get("name"))
            it.texts += [TextPiece("prompt", "user", text, path) for path, text in
                         jsonpath.strings(params.get("arguments"), (*base, "params", "arguments"))]
        it.mcp.append(message)
    methods = [m.method or "response" for m in it.mcp]
    it.operation = "mcp:" + (methods[0] if len(methods) == 1 else "batch")
    return it


def message_pieces(msg: Any, method: str | None, base: tuple, it: Interaction,
                   texts: list[TextPiece]) -> None:
    """The text of one JSON-RPC response, by the method it answers."""
    result = msg.get("result") if isinstance(msg, dict) else None
    if not isinstance(result, dict):
        return
    if method == "tools/call":
        for k, block in enumerate(result.get("content") or []):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                texts.append(TextPiece("tool_result", "tool", block["text"],
                                       (*base, "result", "content", k, "text")))
            elif isinstance(block, dict) and block.get("type") == "resource":
                res = block.get("resource") or {}
                if isinstance(res.get("text"), str):
                    texts.append(TextPiece("tool_result", "tool", res["text"],
                                           (*base, "result", "content", k, "resource", "text")))
        texts += [TextPiece("tool_result", "tool", text, path) for path, text in
                  jsonpath.strings(result.get("structuredContent"),
                                   (*base, "result", "structuredContent"))]
    elif method == "tools/list":
        for k, tool in enumerate(result.get("tools") or []):
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                description = tool.get("description") if isinstance(tool.get("description"),
                                                                    str) else ""
                it.response_tools.append(ToolDef(tool["name"], description,
                                                 (*base, "result", "tools", k)))
                if description:
                    texts.append(TextPiece("tool_description", None, description,
                                           (*base, "result", "tools", k, "description")))
    elif method == "resources/read":
        for k, content in enumerate(result.get("contents") or []):
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                texts.append(TextPiece("resource", None, content["text"],
                                       (*base, "result", "contents", k, "text")))
    elif method == "prompts/get":
        for k, message in enumerate(result.get("messages") or []):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                texts.append(TextPiece("prompt", message.get("role"), content["text"],
                                       (*base, "result", "messages", k, "content", "text")))


def _method_of(it: Interaction, msg: Any) -> str | None:
    rid = msg.get("id") if isinstance(msg, dict) else None
    return next((m.method for m in it.mcp if m.request_id == rid and m.method), None)


def parse_response(doc: Any, it: Interaction) -> None:
    messages = doc if isinstance(doc, list) else [doc]
    for n, msg in enumerate(messages):
        base = (n,) if isinstance(doc, list) else ()
        message_pieces(msg, _method_of(it, msg), base, it, it.response_texts)


class McpStream(StreamFormat):
    """Each SSE event is one whole JSON-RPC message: its text pieces are complete channels."""

    complete_events = True

    def __init__(self, interaction: Interaction):
        self.interaction = interaction
        self.count = 0

    def check(self, event: Event) -> None:
        if event.event == "endpoint":
            raise ProtocolError(403, "legacy_transport",
                                "the legacy MCP HTTP+SSE transport is not governed by douane; "
                                "use Streamable HTTP")

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        if not isinstance(doc, dict):
            return []
        self.count += 1
        pieces: list[TextPiece] = []
        message_pieces(doc, _method_of(self.interaction, doc), (), self.interaction, pieces)
        return [Delta(f"msg{self.count}.{k}", p.kind, p.path) for k, p in enumerate(pieces)]

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        raise AssertionError("MCP events are complete: nothing is held across events")

    def error_event(self, message: str, code: str) -> Event:
        rid = next((m.request_id for m in self.interaction.mcp if m.request_id is not None), None)
        return Event(json.dumps({"jsonrpc": "2.0", "id": rid,
                                 "error": {"code": -32003, "message": message,
                                           "data": {"reason": code}}}), event="message")
