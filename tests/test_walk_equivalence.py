"""The body walk (`fields.cover`) made faster reads what the stop-29 walk read: on random bodies of
each protocol (nested tool inputs, unknown fields, Unicode, files, JSON arguments strings, long
lists, bodies past a bound), the pieces (kind, role, text, path, editable, order), the media flag
and the refusal are those of the frozen walk (tests/support/walk_reference.py), parsers alike."""

from __future__ import annotations

import base64
import json
import random

import pytest

from douane import protocols
from douane.protocols import fields
from tests.support import walk_reference
from tests.test_fields import CHAT, MESSAGES, RESPONSES, answer
from tests.test_protocols import ANTHROPIC, GENERIC, OPENAI

BODIES = 150  # random bodies of each protocol (seeded: the same ones on every run)
WORDS = ["hi", "Maria Garcia", "dévélopper", "data", "données", "数据", "🙂 ok", "", " ", "d",
         "Done", "project nightingale", "a\nb", 'quo"te', "back\\slash", "\u200bzero", "x" * 40]
KEYS = ["text", "content", "type", "name", "id", "role", "data", "file_data", "arguments",
        "input", "output", "result", "description", "media_type", "mime_type", "format",
        "signature", "encrypted_content", "url", "headers", "authorization", "image_url",
        "citations", "cited_text", "metadata", "summary", "tools", "messages", "délai", "ключ"]
TYPES = ["text", "input_text", "output_text", "image", "image_url", "input_image", "file",
         "document", "thinking", "redacted_thinking", "reasoning", "tool_use", "tool_result",
         "server_tool_use", "web_search_tool_result", "function_call", "function_call_output",
         "message", "mcp", "url", "custom", None]
TEXT_FILE = "data:text/plain;base64," + base64.b64encode("secret note 🙂".encode()).decode()
IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20)).decode()
LONG_B64 = base64.b64encode(("a long text file, " * 80).encode()).decode()


def _string(r: random.Random) -> str:
    pick = r.random()
    if pick < 0.04:
        return TEXT_FILE
    if pick < 0.06:
        return IMAGE
    if pick < 0.08:
        return LONG_B64
    if pick < 0.10:
        return "x" * r.choice((1023, 1024, 1500))
    if pick < 0.14:
        return "data:," + r.choice(WORDS)
    if pick < 0.20:
        return json.dumps(_value(r, 2))  # a JSON string (tool arguments when under `arguments`)
    return r.choice(WORDS) + (str(r.randrange(100)) if r.random() < 0.3 else "")


def _value(r: random.Random, depth: int):
    pick = r.random()
    if depth <= 0 or pick < 0.45:
        return r.choice([_string(r), _string(r), r.randrange(-5, 5), 1.5, True, None])
    if pick < 0.75:
        obj = {k: _value(r, depth - 1) for k in r.sample(KEYS, r.randrange(0, 5))}
        if r.random() < 0.5:
            obj["type"] = r.choice(TYPES)
        return obj
    return [_value(r, depth - 1) for _ in range(r.choice((0, 1, 2, 3, 30)))]


def _content(r: random.Random):
    if r.random() < 0.3:
        return _string(r)
    return [{"type": r.choice(TYPES), "text": _string(r), **_extra(r)} for _ in range(r.randrange(3))]


def _extra(r: random.Random) -> dict:
    """Fields no parser names, anywhere."""
    return {k: _value(r, 3) for k in r.sample(KEYS, r.randrange(0, 3))}


def _chat(r: random.Random) -> tuple:
    messages = []
    for _ in range(r.randrange(1, 5)):
        msg = {"role": r.choice(["system", "user", "assistant", "tool", "developer", "x"]),
               "content": _content(r), **_extra(r)}
        if r.random() < 0.3:
            msg["tool_calls"] = [{"id": "c1", "type": "function", "function": {
                "name": r.choice(WORDS), "arguments": json.dumps(_value(r, 4))}}]
        messages.append(msg)
    body = {"model": "m", "messages": messages, **_extra(r)}
    if r.random() < 0.3:
        body["tools"] = [{"type": "function", "function": {"name": "f", "description":
                                                           _string(r), "parameters": _value(r, 4)}}]
    choice = {"index": 0, "message": {"role": "assistant", "content": _string(r), **_extra(r)}}
    if r.random() < 0.4:
        choice["message"]["tool_calls"] = [{"id": "c2", "type": "function", "function": {
            "name": "g", "arguments": r.choice([json.dumps(_value(r, 4)), "not json {"])}}]
    return OPENAI, CHAT, body, {"id": "c", "object": "chat.completion", "choices": [choice],
                                **_extra(r)}


def _responses(r: random.Random) -> tuple:
    items: list = []
    for _ in range(r.randrange(0, 5)):
        kind = r.choice(["message", "function_call", "function_call_output", "reasoning",
                         "web_search_call", "custom_tool_call_output"])
        if kind == "message":
            items.append({"role": r.choice(["user", "assistant"]), "content": _content(r),
                          **_extra(r)})
        elif kind == "function_call":
            items.append({"type": kind, "call_id": "c", "name": "f",
                          "arguments": json.dumps(_value(r, 4)), **_extra(r)})
        else:
            items.append({"type": kind, "output": _content(r), **_extra(r)})
    body = {"model": "m", "input": items or _string(r), "instructions": _string(r), **_extra(r)}
    output = [{"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": _string(r), "annotations": [_value(r, 2)]}]},
              {"type": "function_call", "call_id": "c9", "name": "g",
               "arguments": json.dumps(_value(r, 4))},
              {"type": r.choice(TYPES), **_extra(r)}]
    return OPENAI, RESPONSES, body, {"id": "r", "object": "response",
                                     "output": r.sample(output, r.randrange(0, 4)), **_extra(r)}


def _anthropic(r: random.Random) -> tuple:
    def blocks():
        out = []
        for _ in range(r.randrange(0, 4)):
            kind = r.choice(["text", "tool_use", "tool_result", "image", "thinking", "other"])
            if kind == "tool_use":
                out.append({"type": kind, "id": "t", "name": "f", "input": _value(r, 5)})
            elif kind == "tool_result":
                out.append({"type": kind, "tool_use_id": "t", "content": _content(r)})
            elif kind == "thinking":
                out.append({"type": kind, "thinking": _string(r), "signature": _string(r)})
            else:
                out.append({"type": kind, "text": _string(r), **_extra(r)})
        return out
    messages = [{"role": r.choice(["user", "assistant", "x"]),
                 "content": r.choice([_string(r), blocks()]), **_extra(r)}
                for _ in range(r.randrange(1, 4))]
    body = {"model": "c", "max_tokens": 5, "messages": messages, **_extra(r)}
    if r.random() < 0.5:
        body["system"] = r.choice([_string(r), [{"type": "text", "text": _string(r)}]])
    if r.random() < 0.3:
        body["tools"] = [{"name": "f", "description": _string(r), "input_schema": _value(r, 4)}]
    return ANTHROPIC, MESSAGES, body, {"id": "m", "type": "message", "role": "assistant",
                                       "content": blocks(), **_extra(r)}


def _generic(r: random.Random) -> tuple:
    return GENERIC, "/generate", {"prompt": _string(r), "messages": [{"content": _string(r)}],
                                  **_extra(r)}, {"output": {"text": _string(r)}, **_extra(r)}


PROTOCOLS = {"chat": _chat, "responses": _responses, "anthropic": _anthropic, "generic": _generic}


def _read(case: tuple):
    """(request pieces, answer pieces, media) or the refusal's (status, code); a parser's own
    error on a malformed answer (the pipeline fails closed on it) as its type and message."""
    upstream, path, request, answer_doc = case
    try:
        _, it = answer(upstream, path, request, answer_doc)
    except protocols.ProtocolError as e:
        return e.status, e.code
    except (TypeError, AttributeError) as e:
        return 0, f"{type(e).__name__}: {e}"
    return it.texts, it.response_texts, it.has_media


def _compare(case: tuple, monkeypatch) -> None:
    fast = _read(case)
    with monkeypatch.context() as m:
        m.setattr(fields, "cover", walk_reference.cover)
        frozen = _read(case)
    assert fast == frozen, case


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_the_walk_reads_random_bodies_as_the_frozen_walk(protocol, monkeypatch):
    r = random.Random(f"walk-{protocol}")
    refused = 0
    for _ in range(BODIES):
        case = PROTOCOLS[protocol](r)
        _compare(case, monkeypatch)
        refused += isinstance(_read(case)[0], int)
    assert refused < BODIES / 2  # most bodies are read, not refused: the pieces are compared


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_the_walk_refuses_as_the_frozen_walk_past_its_bounds(protocol, monkeypatch):
    upstream, path, request, answer_doc = PROTOCOLS[protocol](random.Random(protocol))
    deep: object = "bottom"
    for _ in range(fields.MAX_DEPTH + 2):
        deep = {"k": [deep]} if isinstance(deep, str) else {"k": deep}
    many = ["w"] * (fields.MAX_STRINGS + 1)
    for extra in ({"deep": deep}, {"many": many}, {"list": list(range(5000)) + ["tail"]}):
        _compare((upstream, path, {**request, **extra}, answer_doc), monkeypatch)
        _compare((upstream, path, request, {**answer_doc, **extra}), monkeypatch)


@pytest.mark.parametrize("root", [dict, list])
def test_nesting_is_measured_to_the_bound_and_refused_past_it(root):
    """`too_deep` (the MCP parser's bound): MAX_DEPTH arrays and objects pass (the root is one),
    one more is refused, wherever the deepest branch is among shallow ones."""
    def nested(levels: int, as_dict: bool):
        if levels == 1:
            return {"leaf": "x"} if as_dict else ["x"]
        inner = nested(levels - 1, not as_dict)
        return {"a": 1, "wide": [], "k": inner} if as_dict else [{}, inner, 0]
    for levels, refused in ((fields.MAX_DEPTH, False), (fields.MAX_DEPTH + 1, True)):
        doc = nested(levels, root is dict)
        if refused:
            with pytest.raises(protocols.ProtocolError, match="nests deeper"):
                fields.too_deep(doc, 400, "body")
        else:
            fields.too_deep(doc, 400, "body")
