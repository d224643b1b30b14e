"""Tool-call names and arguments in a streamed answer, through a real gateway (red team, stop
28): a chat stream's `delta.tool_calls[].function.name` comes in pieces the openai SDK joins per
call, a Responses call item and an Anthropic `tool_use` block carry their name whole; none was
read by the deny rules, so `project_nightingale` reached the client as a tool to run, even
whole. A denied phrase cut between two successive tool calls' arguments got through a chat
stream as well. The whole answer blocks both; now so does the stream, at a model's pace: the
event completing the name never leaves, the stream ends with the API's error event and a
decision id, and the audit record names the rule."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, token_of, with_claude
from tests.support.gateway import Gateway, base_config

DENIED, BENIGN = "project_nightingale", "lookup_weather_now"
PACE = 0.004  # seconds between events: a model's pace, each event its own chunk


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("stream-tool-names")
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    config = with_claude(base_config(issuer.url, llm.url, policy={"files": [str(policy)]}),
                         llm.url)
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    return token_of(issuer, secrets, "eve@corp.example", ["engineering"])


def cuts(text: str, seed: int) -> list[str]:
    """`text` cut at 1-5 random places (seeded)."""
    rng = random.Random(seed)
    at = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(5, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]


def chat_events(calls: list[tuple[list[str], list[str]]]) -> list[tuple[str | None, dict]]:
    """A chat stream calling tools: each call's name pieces, then its argument pieces."""
    base = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def chunk(delta: dict, finish: str | None = None) -> tuple[None, dict]:
        return None, {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    out = [chunk({"role": "assistant", "content": None})]
    for i, (names, args) in enumerate(calls):
        out += [chunk({"tool_calls": [{"index": i, **({"id": f"call_{i}", "type": "function"}
                                                       if n == 0 else {}),
                                       "function": {"name": p, **({"arguments": ""}
                                                                  if n == 0 else {})}}]})
                for n, p in enumerate(names)]
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in args]
    return [*out, chunk({}, "tool_calls")]


def responses_events(calls: list[tuple[str, list[str]]]) -> list[tuple[str | None, dict]]:
    items = [{"id": f"fc_{i}", "type": "function_call", "call_id": f"call_{i}", "name": name,
              "arguments": "".join(args), "status": "completed"}
             for i, (name, args) in enumerate(calls)]
    response = {"id": "resp_t", "object": "response", "created_at": 0, "model": "m",
                "status": "completed", "output": items}
    out: list[tuple[str, dict]] = [("response.created", {"response": {
        **response, "status": "in_progress", "output": []}})]
    for i, (item, (_, args)) in enumerate(zip(items, calls, strict=True)):
        ids = {"item_id": item["id"], "output_index": i}
        out.append(("response.output_item.added", {"output_index": i, "item": {
            **item, "arguments": "", "status": "in_progress"}}))
        out += [("response.function_call_arguments.delta", {**ids, "delta": p}) for p in args]
        out += [("response.function_call_arguments.done", {**ids, "arguments": item["arguments"]}),
                ("response.output_item.done", {"output_index": i, "item": item})]
    out.append(("response.completed", {"response": response}))
    return [(name, {"type": name, "sequence_number": n, **data})
            for n, (name, data) in enumerate(out)]


def anthropic_events(calls: list[tuple[str, list[str]]]) -> list[tuple[str | None, dict]]:
    out: list[tuple[str, dict]] = [("message_start", {"message": {
        "id": "msg_t", "type": "message", "role": "assistant", "model": "c", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5,
                                                              "output_tokens": 1}}})]
    for i, (name, args) in enumerate(calls):
        out.append(("content_block_start", {"index": i, "content_block": {
            "type": "tool_use", "id": f"toolu_{i}", "name": name, "input": {}}}))
        out += [("content_block_delta", {"index": i, "delta": {"type": "input_json_delta",
                                                               "partial_json": p}})
                for p in args]
        out.append(("content_block_stop", {"index": i}))
    out += [("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                               "usage": {"output_tokens": 9}}), ("message_stop", {})]
    return [(name, {"type": name, **data}) for name, data in out]


REQUESTS = {
    "chat": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "weather?"}]}),
    "responses": ("/v1/responses", {"model": "m", "input": "weather?"}),
    "anthropic": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 50, "messages": [
        {"role": "user", "content": "weather?"}]}),
}


def stream(gw, llm, token, api: str, events: list[tuple[str | None, dict]]) -> tuple[str, str]:
    """The client's whole streamed answer and its decision id, the upstream sending `events`
    one chunk each at a model's pace."""
    import time

    def answer(handler, _req) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for name, data in [*events, *([(None, "[DONE]")] if api == "chat" else [])]:
            raw = (f"event: {name}\n" if name else "") + \
                f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(raw.encode()), raw.encode()))
            handler.wfile.flush()
            time.sleep(PACE)
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    path, body = REQUESTS[api]
    llm.answer = answer
    try:
        with httpx.stream("POST", gw.url + path, json={**body, "stream": True},
                          headers={"authorization": f"Bearer {token}"}, timeout=30) as resp:
            assert resp.status_code == 200, resp.read()[:300]
            return resp.read().decode(), resp.headers["x-douane-decision-id"]
    finally:
        llm.answer = None


def client_view(text: str) -> tuple[dict, dict, list[dict]]:
    """What an SDK makes of a streamed answer: tool names and arguments joined per call (chat:
    by index; Responses: by output index; Anthropic: by block), and any error events."""
    names: dict = {}
    args: dict = {}
    errors = []
    for block in text.split("\n\n"):
        data = "".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
        if not data or data == "[DONE]":
            continue
        doc = json.loads(data)
        if "error" in doc or doc.get("type") == "error":
            errors.append(doc)
        for choice in doc.get("choices") or []:
            for call in choice["delta"].get("tool_calls") or []:
                fn = call.get("function") or {}
                names[call["index"]] = names.get(call["index"], "") + (fn.get("name") or "")
                args[call["index"]] = args.get(call["index"], "") + (fn.get("arguments") or "")
        item = doc.get("item") or doc.get("content_block") or {}
        if item.get("name"):
            names[doc.get("output_index", doc.get("index"))] = item["name"]
        delta = doc.get("delta")
        if doc.get("type") == "response.function_call_arguments.delta":
            args[doc["output_index"]] = args.get(doc["output_index"], "") + delta
        if isinstance(delta, dict) and delta.get("type") == "input_json_delta":
            args[doc["index"]] = args.get(doc["index"], "") + delta["partial_json"]
    return names, args, errors


def assert_cut(gw, text: str, decision_id: str) -> None:
    names, args, errors = client_view(text)
    assert DENIED not in names.values(), names
    assert "nightingale" not in "".join(args.values()), args
    assert len(errors) == 1 and "blocked by policy" in json.dumps(errors[0]), text[-400:]
    assert decision_id in json.dumps(errors[0])
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and record["reasons"][0]["rule"] == "deny.codename"


@pytest.mark.parametrize("at", range(1, len(DENIED)))
def test_a_chat_tool_name_cut_anywhere_is_cut(gw, llm, token, at):
    text, decision_id = stream(gw, llm, token, "chat", chat_events(
        [([DENIED[:at], DENIED[at:]], ['{"city": ', '"Paris"}'])]))
    assert_cut(gw, text, decision_id)


@pytest.mark.parametrize("seed", range(8))
def test_a_chat_tool_name_in_random_pieces_is_cut_and_a_benign_one_passes(gw, llm, token, seed):
    """Property-style: the denied name in 2-6 random pieces, as a second call after a benign
    one, is cut; the benign name cut the same way reaches the client whole, with no error."""
    text, decision_id = stream(gw, llm, token, "chat", chat_events(
        [(cuts(BENIGN, seed), ['{}']), (cuts(DENIED, seed), ['{}'])]))
    assert_cut(gw, text, decision_id)
    text, _ = stream(gw, llm, token, "chat", chat_events(
        [(cuts(BENIGN, seed), cuts('{"city": "Paris"}', seed))]))
    names, args, errors = client_view(text)
    assert (names, args, errors) == ({0: BENIGN}, {0: '{"city": "Paris"}'}, [])


@pytest.mark.parametrize("api", ["responses", "anthropic"])
def test_a_whole_tool_name_is_cut_and_a_benign_one_passes(gw, llm, token, api):
    events = responses_events if api == "responses" else anthropic_events
    text, decision_id = stream(gw, llm, token, api, events(
        [(BENIGN, ['{"city": ', '"Paris"}']), (DENIED, ['{}'])]))
    assert_cut(gw, text, decision_id)
    text, _ = stream(gw, llm, token, api, events([(BENIGN, ['{"city": ', '"Paris"}'])]))
    assert client_view(text) == ({0: BENIGN}, {0: '{"city": "Paris"}'}, [])


@pytest.mark.parametrize("api", ["chat", "responses", "anthropic"])
@pytest.mark.parametrize("seed", range(3))
def test_a_phrase_cut_between_two_tool_calls_arguments_is_cut(gw, llm, token, api, seed):
    """`{"q": "the project nigh` | `tingale"}`: two successive calls' arguments, read as one
    text as the whole answer reads them (its tool arguments joined), each call's arguments in
    random pieces. The whole answer blocks it (tool_arguments[0..1])."""
    first, second = '{"q": "the project nigh', 'tingale"}'
    if api == "chat":
        events = chat_events([(["f"], cuts(first, seed)), (["g"], cuts(second, seed))])
    else:
        make = responses_events if api == "responses" else anthropic_events
        events = make([("f", cuts(first, seed)), ("g", cuts(second, seed))])
    text, decision_id = stream(gw, llm, token, api, events)
    assert_cut(gw, text, decision_id)
