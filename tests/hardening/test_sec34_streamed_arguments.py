"""Security, stop 34: a tool call's arguments streamed in deltas (OpenAI `tool_calls[].function.
arguments` pieces, Anthropic `input_json_delta`, Responses `function_call_arguments.delta`) were
recorded one event at a time: a value under a credential's name (`secrets.credential_key`) split
across two deltas (`{"refresh_` | `token": "rt-plo` | `ver"}`) was found only if the catalogue
knew the value's shape. The writer's stream pass (`_split_secrets`, each channel held whole) now
applies the key rule to each channel's text as well (`_keyed_run`), and is run when it fires.
Property test: random splits of the arguments, the recording never holds the value."""

from __future__ import annotations

import json
import random

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from douane import secrets
from douane.recording import writer

VALUE = "rt-plover-quiet-meadow"  # no catalogue shape
PASSWORD = "plover"  # too short and plain for the catalogue's password check
ARGUMENTS = json.dumps({"user": "bob", "refresh_token": VALUE,
                        "options": {"password": PASSWORD, "retries": 2}})


def test_the_values_have_no_catalogue_shape():
    assert not secrets.find(ARGUMENTS)
    assert writer._keyed(ARGUMENTS) != ARGUMENTS


def _cuts(text: str, rng: random.Random) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def _sse(events: list[dict], done: bool = False, named: bool = False) -> str:
    out = "".join((f"event: {e['type']}\n" if named else "") + f"data: {json.dumps(e)}\n\n"
                  for e in events)
    return out + ("data: [DONE]\n\n" if done else "")


def _openai(pieces: list[str]) -> tuple[str, str]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "login",
                                                                          "arguments": ""}}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                          "tool_calls": [call]},
                                    "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": p}}]}, "finish_reason": None}]} for p in pieces]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return "/v1/chat/completions", _sse(events, done=True)


def _anthropic(pieces: list[str]) -> tuple[str, str]:
    events = [{"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1,
                                                              "output_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": {
                  "type": "tool_use", "id": "toolu_1", "name": "login", "input": {}}}]
    events += [{"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": p}} for p in pieces]
    events += [{"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                   "stop_sequence": None},
                "usage": {"output_tokens": 5}},
               {"type": "message_stop"}]
    return "/v1/messages", _sse(events, named=True)


def _responses(pieces: list[str]) -> tuple[str, str]:
    item = {"id": "fc_1", "type": "function_call", "status": "in_progress", "call_id": "call_1",
            "name": "login", "arguments": ""}
    response = {"id": "resp_1", "object": "response", "created_at": 0, "status": "in_progress",
                "model": "m", "output": []}
    events = [{"type": "response.created", "sequence_number": 0, "response": response},
              {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
               "item": item}]
    events += [{"type": "response.function_call_arguments.delta", "sequence_number": 2 + n,
                "item_id": "fc_1", "output_index": 0, "delta": p} for n, p in enumerate(pieces)]
    n = 2 + len(pieces)
    done = {**item, "status": "completed", "arguments": ARGUMENTS}
    events += [{"type": "response.function_call_arguments.done", "sequence_number": n,
                "item_id": "fc_1", "output_index": 0, "arguments": ARGUMENTS},
               {"type": "response.output_item.done", "sequence_number": n + 1,
                "output_index": 0, "item": done},
               {"type": "response.completed", "sequence_number": n + 2,
                "response": {**response, "status": "completed", "output": [done]}}]
    return "/v1/responses", _sse(events, named=True)


FORMATS = {"openai": ("openai", _openai), "anthropic": ("anthropic", _anthropic),
           "responses": ("openai", _responses)}


def _flow(fmt: str, pieces: list[str]) -> http.HTTPFlow:
    protocol, events = FORMATS[fmt]
    path, body = events(pieces)
    f = tflow.tflow(resp=tutils.tresp())
    f.metadata["douane"] = {"interaction": {"protocol": protocol}}
    f.request.method, f.request.path = "POST", path
    f.request.headers["content-type"] = "application/json"
    f.request.text = json.dumps({"model": "m", "max_tokens": 9, "stream": True, **(
        {"input": "log in"} if fmt == "responses" else
        {"messages": [{"role": "user", "content": "log in"}]})})
    f.response.headers["content-type"] = "text/event-stream"
    f.response.text = body
    return f


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_credential_name_s_value_split_across_deltas_is_not_recorded(fmt):
    rng = random.Random(f"sec34-{fmt}")
    for _ in range(60):
        f = _flow(fmt, _cuts(ARGUMENTS, rng))
        written = writer.recording_of(f.get_state(), frozenset(), (ARGUMENTS,))
        data = writer.tnetstring_of(written)
        assert VALUE.encode() not in data and f'"password": "{PASSWORD}"'.encode() not in data, \
            http.HTTPFlow.from_state(written).response.text
        recorded = http.HTTPFlow.from_state(written).response.text
        assert "<SECRET:detector.secret.credential>" in recorded
        assert "<SECRET:detector.secret.password>" in recorded
        assert '"user": "bob"' in recorded or '\\"user\\": \\"bob\\"' in recorded or \
            "bob" in recorded  # the rest of the arguments recorded as sent


def test_keyed_run_keeps_each_text_in_its_place():
    rng = random.Random(7)
    for _ in range(300):
        texts = _cuts(ARGUMENTS, rng)
        clean = writer._keyed_run(texts)
        assert len(clean) == len(texts)
        assert "".join(clean) == writer._keyed(ARGUMENTS)
