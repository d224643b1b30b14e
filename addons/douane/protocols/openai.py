"""OpenAI: Chat Completions (`/chat/completions`), Responses (`/responses`), and the simpler
text endpoints (`/embeddings`, `/completions`, `/moderations`)."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from douane.interaction import Interaction, JsonPath, Kind, Role, TextPiece, ToolCall, ToolDef
from douane.protocols import fields
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
    unknown_tool,
)
from douane.protocols.sse import Event

TEXT_PARTS = ("text", "input_text", "output_text")
LOGPROBS = ("logprobs", "top_logprobs")
CONTAINERS = (dict, list)
LOGPROBS_REFUSED = "douane does not pass log probabilities (they repeat the answer token by " \
    "token, unmasked)"
MEDIA_PARTS = ("image_url", "input_image", "input_audio", "file", "input_file", "image")
STORED_PROMPT = "douane does not pass a stored prompt (`prompt`): its model, instructions and " \
    "tools are unseen here; send them in the request"


def parse_request(doc: Any, endpoint: str) -> Interaction:
    doc = require_object(doc)
    if endpoint == "chat/completions":
        it = Interaction("openai", "chat.completions")
        _chat_messages(doc, it)
        offered_tools(it, doc, chat=True)
        for k, fn in enumerate(object_list(doc, "functions")):  # the legacy form of function tools
            _tool_def(it, fn, ("functions", k), ("functions", k, "description"))
        if doc.get("web_search_options") is not None:
            it.hosted_tools.append("web_search")
        modalities = doc.get("modalities")
        # an answer in speech: media, and no deny rule or masking reads it
        it.spoken = doc.get("audio") is not None or isinstance(modalities, list) and \
            "audio" in modalities
        it.has_media = it.has_media or it.spoken
        fields.cover(it, doc, _chat_kind(doc), reads=3)
    elif endpoint == "responses":
        it = Interaction("openai", "responses")
        if doc.get("prompt") is not None:
            # a prompt stored upstream adds its model, instructions and tools (hosted tools, MCP
            # servers, vector stores) where douane cannot read them
            raise ProtocolError(403, "stored_prompt", STORED_PROMPT, it)
        _responses_input(doc, it)
        offered_tools(it, doc, chat=False)
        fields.cover(it, doc, _responses_kind(doc), reads=3)
    elif endpoint in ("embeddings", "completions", "moderations"):
        it = Interaction("openai", endpoint)
        key = "prompt" if endpoint == "completions" else "input"
        value = doc.get(key)
        if isinstance(value, str):
            it.texts.append(TextPiece("prompt", "user", value, (key,)))
        elif isinstance(value, list):
            it.texts += [TextPiece("prompt", "user", v, (key, i))
                         for i, v in enumerate(value) if isinstance(v, str)]
        fields.cover(it, doc, lambda path: ("prompt", "user"), reads=0)
    else:
        raise ProtocolError(403, "endpoint_not_governed",
                            f"douane does not inspect POST /{endpoint} and refuses it")
    include = doc.get("include") if isinstance(doc.get("include"), list) else []
    logprobs = doc.get("logprobs")  # `0` too: legacy completions then return the sampled tokens
    if logprobs is not None and logprobs is not False or doc.get("top_logprobs") or \
            "message.output_text.logprobs" in include:
        # each token of the answer again, one by one: masking and deny rules cannot see a value
        # split across tokens, so the answer would leave unmasked
        raise ProtocolError(400, "logprobs_refused", LOGPROBS_REFUSED, it)
    it.model = doc.get("model") if isinstance(doc.get("model"), str) else None
    it.stream = doc.get("stream") is True
    it.store = doc.get("store")
    max_tokens = optional_number(doc, "max_completion_tokens", "max_tokens", "max_output_tokens")
    # a fraction counts up: a server rounding it reads more than `int` would say
    it.max_tokens = math.ceil(max_tokens) if max_tokens is not None else None
    it.temperature = optional_number(doc, "temperature")
    choices = optional_number(doc, "n", "best_of")
    it.choices = max(1, math.ceil(choices)) if choices is not None else 1
    return it


def offered_tools(it: Interaction, doc: dict[str, Any], chat: bool) -> None:
    """Function and custom tools are the grant's `tools`; every other kind is a hosted tool or a
    remote MCP server, granted by name or URL; an unknown type is refused."""
    for k, tool in enumerate(object_list(doc, "tools")):
        kind = tool.get("type")
        if kind in ("function", "custom"):
            spec = tool.get(kind) if chat else tool
            spec = spec if isinstance(spec, dict) else {}
            _tool_def(it, spec, ("tools", k), ("tools", k, *((kind,) if chat else ()),
                                                "description"))
        elif kind == "mcp" and not chat:
            it.mcp_servers.append(mcp_server(tool.get("server_url") or (
                f"connector:{tool['connector_id']}" if isinstance(tool.get("connector_id"), str)
                else None)))
        elif chat:
            raise unknown_tool(kind)
        else:
            it.hosted_tools.append(hosted_tool(kind))


def _chat_kind(doc: dict[str, Any]) -> fields.Classify:
    def classify(path: JsonPath) -> tuple[Kind, Role | None]:
        first = path[0] if path else None  # (no slices: called for every object of a body)
        if first == "tools" or first == "functions":
            return "tool_description", None
        if first == "messages" and len(path) > 1:
            msg = doc["messages"][path[1]]
            if len(path) > 2 and path[2] in ("tool_calls", "function_call"):
                return "tool_arguments", "assistant"
            if msg.get("role") in ("tool", "function"):
                return "tool_result", "tool"
            return "prompt", _role(msg.get("role"))
        return "prompt", None
    return classify


def _responses_kind(doc: dict[str, Any]) -> fields.Classify:
    def classify(path: JsonPath) -> tuple[Kind, Role | None]:
        if path[:1] == ("tools",):
            return "tool_description", None
        if path[:1] == ("input",) and len(path) > 1 and isinstance(doc["input"], list):
            item = doc["input"][path[1]]
            return _item_kind(item, path[2:3], "prompt") if item.get("type") not in (
                None, "message") else ("prompt", _role(item.get("role")))
        return "prompt", None
    return classify


def _item_kind(item: dict[str, Any], field: JsonPath, text: Kind) -> tuple[Kind, Role | None]:
    """A Responses item: a call's arguments, a call's output or its result, or text."""
    kind = str(item.get("type"))
    if kind.endswith("_output") or field in (("output",), ("result",), ("results",)):
        return "tool_result", "tool"
    if kind.endswith("_call"):
        return "tool_arguments", "assistant"
    return text, _role(item.get("role")) or "assistant"


def _role(role: Any) -> Role | None:
    return role if role in ("system", "user", "assistant", "tool", "developer") else None


def _tool_def(it: Interaction, fn: dict[str, Any], path: tuple, description_path: tuple) -> None:
    # a name that is not a string is no name a grant allows (as Anthropic's): still a tool
    name = fn.get("name") if isinstance(fn.get("name"), str) else ""
    description = fn.get("description") if isinstance(fn.get("description"), str) else ""
    it.tools.append(ToolDef(name, description, path))
    if description:
        it.texts.append(TextPiece("tool_description", None, description, description_path))


def _content(it: Interaction, content: Any, kind: Kind, role: Any, path: tuple) -> None:
    """A message content: a string, or a list of typed parts."""
    role = _role(role)
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
        for j, call in enumerate(object_list(msg, "tool_calls")):
            fn = call.get("function", {})
            if not isinstance(fn, dict):
                raise ProtocolError(400, "invalid_body", "a tool call's function must be an object")
            path = ("messages", i, "tool_calls", j, "function", "arguments")
            it.tool_calls.append(ToolCall(str(fn.get("name")), _arguments(fn.get("arguments")),
                                          call.get("id"), path))
            if isinstance(fn.get("arguments"), str):
                it.texts.append(TextPiece("tool_arguments", "assistant", fn["arguments"], path))
        legacy = msg.get("function_call")
        if isinstance(legacy, dict):
            it.tool_calls.append(ToolCall(str(legacy.get("name")),
                                          _arguments(legacy.get("arguments")), None,
                                          ("messages", i, "function_call", "arguments")))


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


def carries_logprobs(node: Any) -> bool:
    """Whether an answer (or a stream event) holds log probabilities anywhere, asked or not: a
    `logprobs` / `top_logprobs` with a non-empty list in it (not `null`, `[]`, `{"content":
    null}`, nor the `top_logprobs: 0` setting a Responses object repeats)."""
    # (loops, not any() over generators, and a tuple of types, not a union built per call:
    # every answer pays it)
    if isinstance(node, dict):
        for k, v in node.items():
            if k in LOGPROBS and _has_items(v) or \
                    isinstance(v, CONTAINERS) and carries_logprobs(v):
                return True
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, CONTAINERS) and carries_logprobs(v):
                return True
    return False


def _has_items(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_items(v) for v in value.values())
    return isinstance(value, list) and bool(value)


def parse_response(doc: Any, it: Interaction) -> None:
    if not isinstance(doc, dict):
        raise ProtocolError(502, "invalid_upstream_response", "the upstream answer is not JSON")
    if carries_logprobs(doc.get("choices")) or carries_logprobs(doc.get("output")):
        raise ProtocolError(502, "logprobs_refused", LOGPROBS_REFUSED, it)
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
    fields.cover(it, doc, _answer_kind(doc, it.operation), "response", 4)


def _answer_kind(doc: dict[str, Any], operation: str) -> fields.Classify:
    def classify(path: JsonPath) -> tuple[Kind, Role | None]:
        first = path[0] if path else None
        if first == "output" and operation == "responses" and len(path) > 1 and \
                isinstance(doc["output"], list) and isinstance(doc["output"][path[1]], dict):
            return _item_kind(doc["output"][path[1]], path[2:3], "completion")
        if first == "choices" and len(path) > 3 and path[2] == "message" and \
                path[3] in ("tool_calls", "function_call"):
            return "tool_arguments", "assistant"
        return "completion", "assistant"
    return classify


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

    strays = True

    def check_message(self, doc: Any) -> None:
        if isinstance(doc, dict) and carries_logprobs(doc.get("choices")):
            raise ProtocolError(502, "logprobs_refused", LOGPROBS_REFUSED)

    def split(self, event: Event, doc: Any) -> list[Event] | None:
        """A chunk that ends a choice and carries its last text (servers other than OpenAI's
        send both in one): the text as a chunk of its own, then the end. Taken whole, the
        channel was closed before its last text was fed, which was then masked alone
        (`maria.garcia` | `@example.com` left unmasked)."""
        choices = doc.get("choices") if isinstance(doc, dict) else None
        both = [n for n, c in enumerate(choices if isinstance(choices, list) else [])
                if isinstance(c, dict) and c.get("finish_reason") and
                isinstance(c.get("delta"), dict) and c["delta"].get("content")]
        if not both:
            return None
        text = copy.deepcopy(doc)
        text.pop("usage", None)
        for n in both:
            text["choices"][n]["finish_reason"] = None
        end = {k: v for k, v in doc.items() if k != "choices"}
        end["choices"] = [{**choices[n], "delta": {}} for n in both]
        return [Event(json.dumps(text, ensure_ascii=False), event.event, None, event.retry,
                      event.comments),
                Event(json.dumps(end, ensure_ascii=False), event.event, event.id, event.retry)]

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        out = []
        for n, choice in enumerate(doc.get("choices") or [] if isinstance(doc, dict) else []):
            i, delta = choice.get("index", n), choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                out.append(Delta(f"choice{i}", "completion", ("choices", n, "delta", "content")))
            if isinstance(delta.get("refusal"), str):
                out.append(Delta(f"choice{i}.refusal", "completion",
                                 ("choices", n, "delta", "refusal")))
            legacy = delta.get("function_call") or {}
            if isinstance(legacy.get("arguments"), str):
                out.append(Delta(f"choice{i}.function", "tool_arguments",
                                 ("choices", n, "delta", "function_call", "arguments")))
            for m, call in enumerate(delta.get("tool_calls") or []):
                fn = call.get("function") or {}
                if isinstance(fn.get("arguments"), str):
                    out.append(Delta(f"choice{i}.tool{call.get('index', m)}", "tool_arguments",
                                     ("choices", n, "delta", "tool_calls", m, "function",
                                      "arguments")))
        return out

    def tool_names(self, doc: Any) -> list[tuple[str | None, str]]:
        """`delta.tool_calls[].function.name` (and the legacy `function_call.name`): pieces the
        SDKs join per call index, as they join its arguments."""
        out: list[tuple[str | None, str]] = []
        for n, choice in enumerate(doc.get("choices") or [] if isinstance(doc, dict) else []):
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            i = choice.get("index", n)
            calls = delta.get("tool_calls") if isinstance(delta.get("tool_calls"), list) else []
            for m, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    out.append((f"choice{i}.tool{call.get('index', m)}", fn["name"]))
            legacy = delta.get("function_call")
            if isinstance(legacy, dict) and isinstance(legacy.get("name"), str):
                out.append((f"choice{i}.function", legacy["name"]))
        return out

    def closes(self, event: Event, doc: Any) -> list[str]:
        if event.data.strip() == "[DONE]":
            return [ALL]
        return [f"choice{c.get('index', n)}" for n, c in
                enumerate(doc.get("choices") or [] if isinstance(doc, dict) else [])
                if c.get("finish_reason")]

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        index = int(channel.split(".")[0].removeprefix("choice"))
        sub = channel.partition(".")[2]
        if sub.startswith("tool"):
            delta: dict[str, Any] = {"tool_calls": [{"index": int(sub.removeprefix("tool")),
                                                     "function": {"arguments": text}}]}
        elif sub == "function":
            delta = {"function_call": {"arguments": text}}
        else:
            delta = {sub or "content": text}
        doc = {k: template[k] for k in ("id", "object", "created", "model", "system_fingerprint")
               if isinstance(template, dict) and k in template}
        doc["choices"] = [{"index": index, "delta": delta, "finish_reason": None}]
        return Event(json.dumps(doc))

    def error_event(self, message: str, code: str, status: int = 403) -> Event:
        return Event(json.dumps({"error": {"message": message, "type": "douane_refusal",
                                           "code": code, "param": None}}))


# Responses events that stream a text: the type's stem -> (the field of its `.done`, text kind)
STREAMED: dict[str, tuple[str, Kind]] = {
    "response.output_text": ("text", "completion"),
    "response.refusal": ("refusal", "completion"),
    "response.reasoning_text": ("text", "completion"),
    "response.reasoning_summary_text": ("text", "completion"),
    "response.function_call_arguments": ("arguments", "tool_arguments"),
    "response.custom_tool_call_input": ("input", "tool_arguments"),
    "response.mcp_call_arguments": ("arguments", "tool_arguments"),
    "response.code_interpreter_call_code": ("code", "tool_arguments"),
}
# Output items that call a tool by name
CALL_ITEMS = ("function_call", "custom_tool_call", "mcp_call", "mcp_approval_request")
MCP_ITEMS = ("mcp_call", "mcp_list_tools", "mcp_approval_request")  # a remote MCP server's
ITEM_ARGUMENTS = {"function_call": "arguments", "custom_tool_call": "input",
                  "mcp_call": "arguments", "code_interpreter_call": "code"}


def _streamed(doc: Any, suffix: str) -> tuple[str, str, Kind] | None:
    """(channel, .done field, kind) of a `<stem>.delta` / `<stem>.done` event."""
    kind = doc.get("type") if isinstance(doc, dict) else None
    stem = kind.removesuffix(suffix) if isinstance(kind, str) and kind.endswith(suffix) else None
    if stem not in STREAMED:
        return None
    field, text_kind = STREAMED[stem]
    out = doc.get("output_index")
    if text_kind == "tool_arguments":
        return f"out{out}.args", field, text_kind
    if stem == "response.reasoning_summary_text":
        return f"out{out}.s{doc.get('summary_index')}", field, text_kind
    return f"out{out}.{doc.get('content_index')}", field, text_kind


class ResponsesStream(StreamFormat):
    """Typed events: `response.output_text.delta`, `...function_call_arguments.delta`, reasoning
    summaries, refusals, and the `*.done` / `response.completed` events that repeat the whole
    text."""

    strays = True
    # response.created / in_progress / completed repeat the request's settings: inspected there
    echoes = tuple(("response", key) for key in (
        "instructions", "tools", "text", "reasoning", "metadata", "prompt", "user",
        "prompt_cache_key", "safety_identifier", "tool_choice"))

    def check_message(self, doc: Any) -> None:
        if carries_logprobs(doc):
            raise ProtocolError(502, "logprobs_refused", LOGPROBS_REFUSED)

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        found = _streamed(doc, ".delta")
        if found is None or not isinstance(doc.get("delta"), str):
            return []
        channel, field, kind = found
        # where the whole answer keeps the text (`output/0/content/1/text`), so parts in a row
        # are read as one text; tool arguments never are
        block: tuple | None = ("output", doc.get("output_index"), "content",
                               doc.get("content_index"), field)
        if kind == "tool_arguments":
            block = None
        elif doc["type"] == "response.reasoning_summary_text.delta":
            block = ("output", doc.get("output_index"), "summary", doc.get("summary_index"), "text")
        return [Delta(channel, kind, ("delta",), block)]

    def closes(self, event: Event, doc: Any) -> list[str]:
        kind = doc.get("type") if isinstance(doc, dict) else None
        found = _streamed(doc, ".done")
        if found is not None:
            return [found[0]]
        if kind == "response.content_part.done":
            return [f"out{doc.get('output_index')}.{doc.get('content_index')}"]
        if kind == "response.reasoning_summary_part.done":
            return [f"out{doc.get('output_index')}.s{doc.get('summary_index')}"]
        if kind in ("response.completed", "response.incomplete", "response.failed", "error"):
            return [ALL]
        return []

    def tool_names(self, doc: Any) -> list[tuple[str | None, str]]:
        """A call item's name, whole wherever the item is (added, done, the completed response;
        the echo of the request's `tools` holds definitions, of other types)."""
        return fields.named_calls(doc, CALL_ITEMS)

    def whole_items(self, doc: Any) -> list[TextPiece]:
        """A remote MCP server's items (`mcp_call` with its `server_label`, `mcp_list_tools`
        with its tools' names, an approval request), whole wherever they are: any event's
        `item` (added, done) and any event's response's `output` (completed, and the created,
        queued and in-progress ones, whose output the API may fill as it goes)."""
        if not isinstance(doc, dict):
            return []
        response = doc.get("response")
        output = response.get("output") if isinstance(response, dict) else None
        found = [doc.get("item"), *(output if isinstance(output, list) else ())]
        items = [i for i in found if isinstance(i, dict) and i.get("type") in MCP_ITEMS]
        if not items:
            return []
        it = Interaction("openai", "responses")
        parse_response({"output": items}, it)
        return it.response_texts

    def recaps(self, event: Event, doc: Any) -> list[tuple[tuple, str]]:
        kind = doc.get("type") if isinstance(doc, dict) else None
        found = _streamed(doc, ".done")
        if found is not None:
            return [((found[1],), found[0])]
        if kind == "response.content_part.done":
            part = doc.get("part") or {}
            return [(("part", f), f"out{doc.get('output_index')}.{doc.get('content_index')}")
                    for f in ("text", "refusal") if isinstance(part.get(f), str)]
        if kind == "response.reasoning_summary_part.done":
            return [(("part", "text"), f"out{doc.get('output_index')}.s{doc.get('summary_index')}")]
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

    def error_event(self, message: str, code: str, status: int = 403) -> Event:
        # The API's own `error` event (type, code, message) plus an `error` object: the openai
        # SDK raises APIError with its message on that, where it ends a bare `error` event
        # silently (and `get_final_response()` then fails without douane's reason).
        error = {"type": "douane_refusal", "code": code, "message": message, "param": None}
        return Event(json.dumps({"type": "error", "code": code, "message": message,
                                 "param": None, "error": error}), event="error")


def _item_recaps(item: dict[str, Any], base: tuple, index: Any) -> list[tuple[tuple, str]]:
    kind = item.get("type")
    if kind in ITEM_ARGUMENTS:
        return [((*base, ITEM_ARGUMENTS[kind]), f"out{index}.args")]
    out = [((*base, "content", j, f), f"out{index}.{j}")
           for j, part in enumerate(item.get("content") or [])
           for f in ("text", "refusal") if isinstance(part, dict) and isinstance(part.get(f), str)]
    if kind == "reasoning":
        out += [((*base, "summary", k, "text"), f"out{index}.s{k}")
                for k, part in enumerate(item.get("summary") or [])
                if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return out
