"""Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`)."""

from __future__ import annotations

import json
import math
from typing import Any

from douane.interaction import Interaction, JsonPath, Kind, Role, TextPiece, ToolCall, ToolDef
from douane.protocols import fields, jsonpath
from douane.protocols.base import (
    ALL,
    Delta,
    ProtocolError,
    StreamFormat,
    hosted_tool,
    mcp_server,
    object_list,
    optional_number,
    require_object,
)
from douane.protocols.sse import Event

# Anthropic's error type by HTTP status, where it is not `api_error` (5xx) or
# `invalid_request_error` (4xx)
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}

MEDIA_BLOCKS = ("image", "document", "file", "container_upload")
STORED_SKILL = "douane does not pass skills (`container.skills`): a skill's instructions and " \
    "code are stored upstream, unseen here"


def parse_request(doc: Any, endpoint: str) -> Interaction:
    doc = require_object(doc)
    if endpoint not in ("messages", "messages/count_tokens"):
        raise ProtocolError(403, "endpoint_not_governed",
                            f"douane does not inspect POST /v1/{endpoint} and refuses it")
    it = Interaction("anthropic", "messages" if endpoint == "messages" else "count_tokens")
    container = doc.get("container")
    if isinstance(container, dict) and container.get("skills") not in (None, []):
        # as a stored prompt: instructions and code no grant or deny rule reads
        raise ProtocolError(403, "stored_skill", STORED_SKILL, it)
    it.model = doc.get("model") if isinstance(doc.get("model"), str) else None
    it.stream = doc.get("stream") is True
    max_tokens = optional_number(doc, "max_tokens")
    it.max_tokens = math.ceil(max_tokens) if max_tokens is not None else None  # (as OpenAI's)
    it.temperature = optional_number(doc, "temperature")
    system = doc.get("system")
    if isinstance(system, str):
        it.texts.append(TextPiece("prompt", "system", system, ("system",)))
    elif isinstance(system, list):
        _blocks(it, system, "system", ("system",))
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise ProtocolError(400, "invalid_body", "messages must be a list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ProtocolError(400, "invalid_body", f"messages[{i}] must be an object")
        role = msg.get("role") if msg.get("role") in ("user", "assistant") else None
        content = msg.get("content")
        if isinstance(content, str):
            it.texts.append(TextPiece("prompt", role, content, ("messages", i, "content")))
        elif isinstance(content, list):
            _blocks(it, content, role, ("messages", i, "content"))
    for k, tool in enumerate(object_list(doc, "tools")):
        if tool.get("type") in (None, "custom"):
            name = tool.get("name") if isinstance(tool.get("name"), str) else ""
            description = tool.get("description") if isinstance(tool.get("description"), str) \
                else ""
            it.tools.append(ToolDef(name, description, ("tools", k)))
            if description:
                it.texts.append(TextPiece("tool_description", None, description,
                                          ("tools", k, "description")))
        elif tool.get("type") != "mcp_toolset":  # an mcp_servers entry's tools, granted by URL
            it.hosted_tools.append(hosted_tool(tool.get("type")))
    it.mcp_servers += [mcp_server(server.get("url")) for server in object_list(doc, "mcp_servers")]
    fields.cover(it, doc, _kind(doc, "prompt"), reads=4)
    return it


def _kind(doc: dict[str, Any], text: Kind) -> fields.Classify:
    """Tool definitions, tool inputs, tool results (server tools' too), or text."""
    def classify(path: JsonPath) -> tuple[Kind, Role | None]:
        first = path[0] if path else None  # (no slices: called for every object of a body)
        if first == "tools":
            return "tool_description", None
        role: Role | None = "assistant" if text == "completion" else None
        block = None
        if first == "messages" and len(path) > 1:
            msg = doc["messages"][path[1]]
            role = msg.get("role") if msg.get("role") in ("user", "assistant") else None
            if len(path) > 3 and path[2] == "content" and isinstance(msg["content"], list):
                block = msg["content"][path[3]]
        elif first == "content" and len(path) > 1 and isinstance(doc["content"], list):
            block = doc["content"][path[1]]
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(kind, str) and kind.endswith("tool_use"):
            return "tool_arguments", "assistant"
        if isinstance(kind, str) and kind.endswith("tool_result"):
            return "tool_result", "tool"
        return text, role
    return classify


def _blocks(it: Interaction, blocks: list[Any], role: Any, base: tuple) -> None:
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            it.texts.append(TextPiece("prompt", role, block["text"], (*base, j, "text")))
        elif kind == "tool_use":
            it.tool_calls.append(ToolCall(str(block.get("name")), block.get("input") or {},
                                          block.get("id"), (*base, j, "input")))
            it.texts += [TextPiece("tool_arguments", "assistant", text, path) for path, text in
                         jsonpath.strings(block.get("input"), (*base, j, "input"))]
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, str):
                it.texts.append(TextPiece("tool_result", "tool", content, (*base, j, "content")))
            elif isinstance(content, list):
                for m, part in enumerate(content):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        it.texts.append(TextPiece("tool_result", "tool", part["text"],
                                                  (*base, j, "content", m, "text")))
                    elif isinstance(part, dict) and part.get("type") in MEDIA_BLOCKS:
                        it.has_media = True
        elif kind in MEDIA_BLOCKS:
            it.has_media = True


def parse_response(doc: Any, it: Interaction) -> None:
    if not isinstance(doc, dict):
        raise ProtocolError(502, "invalid_upstream_response", "the upstream answer is not JSON")
    for j, block in enumerate(doc.get("content") or []):
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            it.response_texts.append(TextPiece("completion", "assistant", block["text"],
                                               ("content", j, "text")))
        elif block.get("type") == "tool_use":
            it.response_tool_calls.append(ToolCall(str(block.get("name")), block.get("input") or {},
                                                   block.get("id"), ("content", j, "input")))
            it.response_texts += [TextPiece("tool_arguments", "assistant", text, path)
                                  for path, text in jsonpath.strings(block.get("input"),
                                                                     ("content", j, "input"))]
    fields.cover(it, doc, _kind(doc, "completion"), "response", 4)


# content_block_delta types that stream a block's text: type -> (field, kind)
DELTAS: dict[str, tuple[str, Kind]] = {"text_delta": ("text", "completion"),
                                       "thinking_delta": ("thinking", "completion"),
                                       "input_json_delta": ("partial_json", "tool_arguments")}


MCP_BLOCKS = ("mcp_tool_use", "mcp_tool_result")  # a remote MCP server's


class MessagesStream(StreamFormat):
    """`content_block_delta` events (`text_delta`, `thinking_delta`, `input_json_delta`) per
    block index."""

    strays = True

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        if not isinstance(doc, dict) or doc.get("type") != "content_block_delta":
            return []
        delta = doc.get("delta") or {}
        if delta.get("type") in DELTAS:
            field, kind = DELTAS[delta["type"]]
            index = doc.get("index")
            block = None if kind == "tool_arguments" else ("content", index, field)
            return [Delta(f"block{index}", kind, ("delta", field), block)]
        return []

    def tool_names(self, doc: Any) -> list[tuple[str | None, str]]:
        """A tool-use block's name, whole (its `content_block_start`, or `message_start`)."""
        return fields.named_calls(doc, ("tool_use", "server_tool_use", "mcp_tool_use"))

    def whole_items(self, doc: Any) -> list[TextPiece]:
        """A remote MCP server's blocks (`mcp_tool_use` with its `server_name`, an
        `mcp_tool_result`), whole wherever they are: any event's `content_block` (a block's
        start) and any event's message's `content` (`message_start`)."""
        if not isinstance(doc, dict):
            return []
        message = doc.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        found = [doc.get("content_block"), *(content if isinstance(content, list) else ())]
        blocks = [b for b in found if isinstance(b, dict) and b.get("type") in MCP_BLOCKS]
        if not blocks:
            return []
        it = Interaction("anthropic", "messages")
        parse_response({"content": blocks}, it)
        return it.response_texts

    def closes(self, event: Event, doc: Any) -> list[str]:
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "content_block_stop":
            return [f"block{doc.get('index')}"]
        if kind in ("message_delta", "message_stop", "error"):
            return [ALL]
        return []

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        index = int(channel.removeprefix("block"))
        kind_of = (template.get("delta") or {}).get("type") if isinstance(template, dict) else None
        kind_of = kind_of if kind_of in DELTAS else "text_delta"
        delta = {"type": kind_of, DELTAS[kind_of][0]: text}
        return Event(json.dumps({"type": "content_block_delta", "index": index, "delta": delta}),
                     event="content_block_delta")

    def error_event(self, message: str, code: str, status: int = 403) -> Event:
        # Anthropic's type for the status (as `refusals` types a refusal): an upstream's
        # failure is no permission error
        kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return Event(json.dumps({"type": "error", "error": {"type": kind, "message": message}}),
                     event="error")
