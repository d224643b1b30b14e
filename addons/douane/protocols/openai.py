"""OpenAI: Chat Completions (`/chat/completions`), Responses (`/responses`), and the simpler
text endpoints (`/embeddings`, `/completions`, `/moderations`)."""

from __future__ import annotations

import copy
import json
from typing import Any

from douane.interaction import Interaction, Kind, TextPiece, ToolCall, ToolDef
from douane.protocols.base import (
    ALL,
    Delta,
    ProtocolError,
    StreamFormat,
    optional_number,
    require_object,
)
from douane.protocols.sse import Event

TEXT_PARTS = ("text", "input_text", "output_text")
MEDIA_PARTS = ("image_url", "input_image", "input_audio", "file", "input_file", "image")


def parse_request(doc: Any, endpoint: str) -> Interaction:
    doc = require_object(doc)
    if endpoint == "chat/completions":
        it = Interaction("openai", "chat.completions")
        _chat_messages(doc, it)
        for k, tool in enumerate(doc.get("tools") or []):
            fn = tool.get("function", {}) if isinstance(tool, dict) else {}
            _tool_def(it, fn, ("tools", k), ("tools", k, "function", "description"))
    elif endpoint == "responses":
        it = Interaction("openai", "responses")
        _responses_input(doc, it)
        for k, tool in enumerate(doc.get("tools") or []):
            if isinstance(tool, dict) and tool.get("type") == "function":
                _tool_def(it, tool, ("tools", k), ("tools", k, "description"))
    elif endpoint in ("embeddings", "completions", "moderations"):
        it = Interaction("openai", endpoint)
        key = "prompt" if endpoint == "completions" else "input"
        value = doc.get(key)
        if isinstance(value, str):
            it.texts.append(TextPiece("prompt", "user", value, (key,)))
        elif isinstance(value, list):
            it.texts += [TextPiece("prompt", "user", v, (key, i))
                         for i, v in enumerate(value) if isinstance(v, str)]
    else:
        raise ProtocolError(403, "endpoint_not_governed",
                            f"douane does not inspect POST /{endpoint} and refuses it")
    it.model = doc.get("model") if isinstance(doc.get("model"), str) else None
    it.stream = doc.get("stream") is True
    max_tokens = optional_number(doc, "max_completion_tokens", "max_tokens", "max_output_tokens")
    it.max_tokens = int(max_tokens) if max_tokens is not None else None
    it.temperature = optional_number(doc, "temperature")
    return it


def _tool_def(it: Interaction, fn: dict[str, Any], path: tuple, description_path: tuple) -> None:
    name = fn.get("name")
    if isinstance(name, str):
        description = fn.get("description") if isinstance(fn.get("description"), str) else ""
        it.tools.append(ToolDef(name, description, path))
        if description:
            it.texts.append(TextPiece("tool_description", None, description, description_path))


def _content(it: Interaction, content: Any, kind: Kind, role: Any, path: tuple) -> None:
    """A message content: a string, or a list of typed parts."""
    role = role if role in ("system", "user", "assistant", "tool", "developer") else None
    if isinstance(content, str):
        it.texts.append(TextPiece(kind, role, content, path))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            if part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
                it.texts.append(TextPiece(kind, role, part["text"], (*path, j, "text")))
            elif part.get("type") in MEDIA_PARTS:
                it.has_media = True


def _arguments(raw: Any) -> dict[str, Any] | str:
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw
    return parsed if isinstance(parsed, dict) else raw


def _chat_messages(doc: dict[str, Any], it: Interaction) -> None:
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise ProtocolError(400, "invalid_body", "messages must be a list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ProtocolError(400, "invalid_body", f"messages[{i}] must be an object")
        role = msg.get("role")
        _content(it, msg.get("content"), "tool_result" if role == "tool" else "prompt", role,
                  ("messages", i, "content"))
        for j, call in enumerate(msg.get("tool_calls") or []):
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            path = ("messages", i, "tool_calls", j, "function", "arguments")
            it.tool_calls.append(ToolCall(str(fn.get("name")), _arguments(fn.get("arguments")),
                                          call.get("id"), path))
            if isinstance(fn.get("arguments"), str):
                it.texts.append(TextPiece("tool_arguments", "assistant", fn["arguments"], path))


def _responses_input(doc: dict[str, Any], it: Interaction) -> None:
    if isinstance(doc.get("instructions"), str):
        it.texts.append(TextPiece("prompt", "system", doc["instructions"], ("instructions",)))
    items = doc.get("input")
    if isinstance(items, str):
        it.texts.append(TextPiece("prompt", "user", items, ("input",)))
        return
    if items is None and doc.get("previous_response_id"):
        return
    if not isinstance(items, list):
        raise ProtocolError(400, "invalid_body", "input must be a string or a list of items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProtocolError(400, "invalid_body", f"input[{i}] must be an object")
        kind = item.get("type", "message")
        if kind == "message" or "role" in item:
            _content(it, item.get("content"), "prompt", item.get("role"), ("input", i, "content"))
        elif kind == "function_call":
            path = ("input", i, "arguments")
            it.tool_calls.append(ToolCall(str(item.get("name")), _arguments(item.get("arguments")),
                                          item.get("call_id"), path))
            if isinstance(item.get("arguments"), str):
                it.texts.append(TextPiece("tool_arguments", "assistant", item["arguments"], path))
        elif kind == "function_call_output" and isinstance(item.get("output"), str):
            it.texts.append(TextPiece("tool_result", "tool", item["output"], ("input", i, "output")))


def parse_response(doc: Any, it: Interaction) -> None:
    if not isinstance(doc, dict):
        raise ProtocolError(502, "invalid_upstream_response", "the upstream answer is not JSON")
    if it.operation == "chat.completions":
        for i, choice in enumerate(doc.get("choices") or []):
            msg = choice.get("message") or {}
            if isinstance(msg.get("content"), str):
                it.response_texts.append(TextPiece("completion", "assistant", msg["content"],
                                                   ("choices", i, "message", "content")))
            for j, call in enumerate(msg.get("tool_calls") or []):
                fn = call.get("function") or {}
                path = ("choices", i, "message", "tool_calls", j, "function", "arguments")
                it.response_tool_calls.append(ToolCall(str(fn.get("name")),
                                                       _arguments(fn.get("arguments")),
                                                       call.get("id"), path))
                if isinstance(fn.get("arguments"), str):
                    it.response_texts.append(TextPiece("tool_arguments", "assistant",
                                                       fn["arguments"], path))
    elif it.operation == "responses":
        _responses_output(doc.get("output") or [], ("output",), it)
    elif it.operation == "completions":
        for i, choice in enumerate(doc.get("choices") or []):
            if isinstance(choice.get("text"), str):
                it.response_texts.append(TextPiece("completion", "assistant", choice["text"],
                                                   ("choices", i, "text")))


def _responses_output(output: list[Any], base: tuple, it: Interaction) -> None:
    for i, item in enumerate(output):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            for j, part in enumerate(item.get("content") or []):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    it.response_texts.append(TextPiece("completion", "assistant", part["text"],
                                                       (*base, i, "content", j, "text")))
        elif item.get("type") == "function_call":
            path = (*base, i, "arguments")
            it.response_tool_calls.append(ToolCall(str(item.get("name")),
                                                   _arguments(item.get("arguments")),
                                                   item.get("call_id"), path))
            if isinstance(item.get("arguments"), str):
                it.response_texts.append(TextPiece("tool_arguments", "assistant",
                                                   item["arguments"], path))


class ChatStream(StreamFormat):
    """`data: {chunk}` events with `choices[].delta`, ended by `data: [DONE]`."""

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        out = []
        for n, choice in enumerate(doc.get("choices") or [] if isinstance(doc, dict) else []):
            i, delta = choice.get("index", n), choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                out.append(Delta(f"choice{i}", "completion", ("choices", n, "delta", "content")))
            for m, call in enumerate(delta.get("tool_calls") or []):
                fn = call.get("function") or {}
                if isinstance(fn.get("arguments"), str):
                    out.append(Delta(f"choice{i}.tool{call.get('index', m)}", "tool_arguments",
                                     ("choices", n, "delta", "tool_calls", m, "function",
                                      "arguments")))
        return out

    def closes(self, event: Event, doc: Any) -> list[str]:
        if event.data.strip() == "[DONE]":
            return [ALL]
        return [f"choice{c.get('index', n)}" for n, c in
                enumerate(doc.get("choices") or [] if isinstance(doc, dict) else [])
                if c.get("finish_reason")]

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        index = int(channel.split(".")[0].removeprefix("choice"))
        if kind == "tool_arguments":
            tool = int(channel.split(".tool")[1])
            delta: dict[str, Any] = {"tool_calls": [{"index": tool, "function": {"arguments": text}}]}
        else:
            delta = {"content": text}
        doc = {k: template[k] for k in ("id", "object", "created", "model", "system_fingerprint")
               if isinstance(template, dict) and k in template}
        doc["choices"] = [{"index": index, "delta": delta, "finish_reason": None}]
        return Event(json.dumps(doc))

    def error_event(self, message: str, code: str) -> Event:
        return Event(json.dumps({"error": {"message": message, "type": "douane_refusal",
                                           "code": code, "param": None}}))


class ResponsesStream(StreamFormat):
    """Typed events: `response.output_text.delta`, `...function_call_arguments.delta`, and the
    `*.done` / `response.completed` events that repeat the whole text."""

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "response.output_text.delta":
            return [Delta(f"out{doc.get('output_index')}.{doc.get('content_index')}",
                          "completion", ("delta",))]
        if kind == "response.function_call_arguments.delta":
            return [Delta(f"out{doc.get('output_index')}.args", "tool_arguments", ("delta",))]
        return []

    def closes(self, event: Event, doc: Any) -> list[str]:
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind in ("response.output_text.done", "response.content_part.done"):
            return [f"out{doc.get('output_index')}.{doc.get('content_index')}"]
        if kind == "response.function_call_arguments.done":
            return [f"out{doc.get('output_index')}.args"]
        if kind in ("response.completed", "response.incomplete", "response.failed", "error"):
            return [ALL]
        return []

    def recaps(self, event: Event, doc: Any) -> list[tuple[tuple, str]]:
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "response.output_text.done":
            return [(("text",), f"out{doc.get('output_index')}.{doc.get('content_index')}")]
        if kind == "response.content_part.done":
            return [(("part", "text"), f"out{doc.get('output_index')}.{doc.get('content_index')}")]
        if kind == "response.function_call_arguments.done":
            return [(("arguments",), f"out{doc.get('output_index')}.args")]
        if kind == "response.output_item.done":
            return _item_recaps(doc.get("item") or {}, ("item",), doc.get("output_index"))
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            output = (doc.get("response") or {}).get("output") or []
            return [r for i, item in enumerate(output)
                    for r in _item_recaps(item, ("response", "output", i), i)]
        return []

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        doc = copy.deepcopy(template) if isinstance(template, dict) else {}
        doc["delta"] = text
        return Event(json.dumps(doc), event=doc.get("type"))

    def error_event(self, message: str, code: str) -> Event:
        # The API's own `error` event (type, code, message) plus an `error` object: the openai
        # SDK raises APIError with its message on that, where it ends a bare `error` event
        # silently (and `get_final_response()` then fails without douane's reason).
        error = {"type": "douane_refusal", "code": code, "message": message, "param": None}
        return Event(json.dumps({"type": "error", "code": code, "message": message,
                                 "param": None, "error": error}), event="error")


def _item_recaps(item: dict[str, Any], base: tuple, index: Any) -> list[tuple[tuple, str]]:
    if item.get("type") == "message":
        return [((*base, "content", j, "text"), f"out{index}.{j}")
                for j, part in enumerate(item.get("content") or [])
                if isinstance(part, dict) and isinstance(part.get("text"), str)]
    if item.get("type") == "function_call":
        return [((*base, "arguments"), f"out{index}.args")]
    return []
