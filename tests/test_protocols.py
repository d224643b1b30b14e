"""Wire formats: parse -> edit one text piece -> serialise keeps everything else; streams survive
any chunking and any hold-back by a later stage."""

from __future__ import annotations

import copy
import json
import random

import pytest
from mitmproxy.test import tflow, tutils

from douane import protocols
from douane.config import Upstream
from douane.protocols import jsonpath, openai, streams
from douane.protocols.sse import SseParser
from tests.support import upstream as samples

OPENAI = Upstream("openai", "https", "api.openai.com", 443, "/v1", "openai", None)
ANTHROPIC = Upstream("anthropic", "https", "api.anthropic.com", 443, "/", "anthropic", None)
MCP = Upstream("mcp", "https", "mcp.example.com", 443, "/mcp", "mcp", None)
GENERIC = Upstream("gen", "https", "llm.internal", 443, "/", "generic", None,
                   request_text_paths=("messages[*].content", "prompt"),
                   response_text_paths=("output.text",))

CHAT_REQUEST = {
    "model": "gpt-4o", "stream": False, "max_completion_tokens": 200, "temperature": 0.2,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image_url", "image_url": {"url": "data:,x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, cloudy"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather",
                                                "description": "Weather for a city",
                                                "parameters": {"type": "object"}}}],
}
RESPONSES_REQUEST = {
    "model": "gpt-4.1", "instructions": "Be brief.", "max_output_tokens": 100,
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]},
              {"type": "function_call", "call_id": "c1", "name": "lookup",
               "arguments": "{\"id\": 7}"},
              {"type": "function_call_output", "call_id": "c1", "output": "id 7 is Bob"}],
    "tools": [{"type": "function", "name": "lookup", "description": "Find a record",
               "parameters": {}}],
}
ANTHROPIC_REQUEST = {
    "model": "claude-test", "max_tokens": 512, "system": [{"type": "text", "text": "Be kind."}],
    "messages": [
        {"role": "user", "content": "Find order 12"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking it up."},
            {"type": "tool_use", "id": "tu_1", "name": "find_order", "input": {"id": "12"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "tu_1",
             "content": [{"type": "text", "text": "Order 12: shipped"}]}]},
    ],
    "tools": [{"name": "find_order", "description": "Find an order", "input_schema": {}}],
}
MCP_CALL = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "lookup_customer", "arguments": {"customer_id": "42",
                                                                "note": "urgent"}}}
MCP_BATCH = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
             {"jsonrpc": "2.0", "method": "notifications/initialized"}]

CASES = [
    (OPENAI, "/v1/chat/completions", CHAT_REQUEST,
     ["You are terse.", "What is in this image?", "{\"city\": \"Paris\"}", "18 degrees, cloudy",
      "Weather for a city"]),
    (OPENAI, "/v1/responses", RESPONSES_REQUEST,
     ["Be brief.", "Hello there", "{\"id\": 7}", "id 7 is Bob", "Find a record"]),
    (ANTHROPIC, "/v1/messages", ANTHROPIC_REQUEST,
     ["Be kind.", "Find order 12", "Looking it up.", "12", "Order 12: shipped", "Find an order"]),
    (MCP, "/mcp", MCP_CALL, ["42", "urgent"]),
    (GENERIC, "/generate", {"prompt": "hi", "messages": [{"content": "a"}, {"content": "b"}]},
     ["a", "b", "hi"]),
]


def flow_for(upstream: Upstream, path: str, doc, **headers) -> tflow.HTTPFlow:
    body = json.dumps(doc).encode()
    f = tflow.tflow(req=tutils.treq(host=upstream.host, path=path.encode(), content=body,
                                    method=b"POST"))
    f.request.headers.clear()
    f.request.headers.update({"content-type": "application/json", **headers})
    f.request.content = body
    return f


@pytest.mark.parametrize(("upstream", "path", "doc", "texts"), CASES)
def test_request_text_pieces(upstream, path, doc, texts):
    it = protocols.parse_request(upstream, flow_for(upstream, path, doc))
    assert sorted(p.text for p in it.texts if p.editable) == sorted(texts)
    for piece in it.texts:
        if piece.editable:
            assert jsonpath.get(doc, piece.path) == piece.text


@pytest.mark.parametrize(("upstream", "path", "doc", "texts"), CASES)
@pytest.mark.parametrize("encoding", ["identity", "gzip", "br", "zstd", "deflate"])
def test_round_trip_edits_one_piece_and_keeps_the_rest(upstream, path, doc, texts, encoding):
    f = flow_for(upstream, path, doc)
    if encoding != "identity":
        f.request.encode(encoding)
        assert f.request.raw_content != f.request.content
    it = protocols.parse_request(upstream, f)
    piece = it.texts[0]
    piece.text = "<EDITED>"
    protocols.apply_text_edits(f, "request", [piece])
    expected = copy.deepcopy(doc)
    jsonpath.set_(expected, piece.path, "<EDITED>")
    assert json.loads(f.request.get_content()) == expected
    assert f.request.headers.get("content-encoding", "identity") == encoding
    assert int(f.request.headers["content-length"]) == len(f.request.raw_content)


def test_request_metadata():
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, "/v1/chat/completions", CHAT_REQUEST))
    assert (it.operation, it.model, it.max_tokens, it.temperature, it.has_media) == \
        ("chat.completions", "gpt-4o", 200, 0.2, True)
    assert [t.name for t in it.tools] == ["get_weather"]
    assert it.tool_calls[0].arguments == {"city": "Paris"}
    mcp = protocols.parse_request(MCP, flow_for(MCP, "/mcp", MCP_BATCH))
    assert mcp.operation == "mcp:batch" and [m.method for m in mcp.mcp] == \
        ["tools/list", "notifications/initialized"]


@pytest.mark.parametrize(("upstream", "path", "body", "ctype", "code"), [
    (OPENAI, "/v1/chat/completions", b"{not json", "application/json", "invalid_json"),
    (OPENAI, "/v1/chat/completions", b'{"model": "a", "model": "b", "messages": []}',
     "application/json", "duplicate_json_key"),
    (OPENAI, "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', "application/json",
     "invalid_json"),
    (OPENAI, "/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded",
     "unsupported_content_type"),
    (OPENAI, "/v1/files", b"{}", "application/json", "endpoint_not_governed"),
    (OPENAI, "/v1/chat/completions", b'{"messages": "hi"}', "application/json", "invalid_body"),
    (ANTHROPIC, "/v1/messages", b"[1, 2]", "application/json", "invalid_body"),
    (MCP, "/mcp", b'{"jsonrpc": "2.0", "id": 1, "method": "sampling/evil"}', "application/json",
     "method_not_governed"),
    (MCP, "/mcp", b'{"id": 1, "method": "tools/list"}', "application/json", "invalid_body"),
])
def test_unparseable_bodies_are_refused(upstream, path, body, ctype, code):
    f = flow_for(upstream, path, {})
    f.request.headers["content-type"] = ctype
    f.request.content = body
    with pytest.raises(protocols.ProtocolError) as err:
        protocols.parse_request(upstream, f)
    assert err.value.code == code


def test_undecodable_content_encoding_is_refused():
    f = flow_for(OPENAI, "/v1/chat/completions", CHAT_REQUEST)
    f.request.headers["content-encoding"] = "gzip"  # but the body is not gzip
    with pytest.raises(protocols.ProtocolError) as err:
        protocols.parse_request(OPENAI, f)
    assert err.value.code == "undecodable_body"


def stream_samples() -> dict[str, tuple[Upstream, str, dict, bytes]]:
    pieces = ["Hel", "lo, ", "john.sm", "ith@exa", "mple.com", " bye"]
    return {
        "chat": (OPENAI, "/v1/chat/completions", {"messages": [], "stream": True},
                 "".join(samples._openai_chat_events("m", pieces)).encode()),
        "responses": (OPENAI, "/v1/responses", {"input": "x", "stream": True},
                      "".join(samples._responses_events("m", pieces)).encode()),
        "anthropic": (ANTHROPIC, "/v1/messages", {"messages": [], "stream": True},
                      "".join(samples._anthropic_events("m", pieces)).encode()),
    }


def run_stream(name: str, chunks: list[bytes], filters=()) -> tuple[bytes, object]:
    upstream, path, doc, _ = stream_samples()[name]
    it = protocols.parse_request(upstream, flow_for(upstream, path, doc))
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "dcn_test")
    rewriter.filters.extend(filters)
    out = b""
    for chunk in chunks:
        result = rewriter(chunk)
        assert result != b"", "an empty chunk mid-stream ends an HTTP/1.1 body"
        out += b"".join(result) if isinstance(result, list) else result
    result = rewriter(b"")
    out += result if isinstance(result, bytes) else b"".join(result)
    return out, it


def events(data: bytes) -> list[tuple]:
    parser = SseParser()
    return [(e.event, e.data) for e in parser.feed(data) + parser.feed(b"")]


def streamed_text(name: str, data: bytes) -> str:
    text = ""
    for _, payload in events(data):
        if payload.strip() in ("", "[DONE]"):
            continue
        doc = json.loads(payload)
        if name == "chat":
            text += "".join(c["delta"].get("content") or "" for c in doc["choices"])
        elif name == "responses" and doc["type"] == "response.output_text.delta":
            text += doc["delta"]
        elif name == "anthropic" and doc["type"] == "content_block_delta":
            text += doc["delta"]["text"]
    return text


@pytest.mark.parametrize("name", ["chat", "responses", "anthropic"])
def test_stream_split_at_every_offset_yields_the_same_events(name):
    data = stream_samples()[name][3]
    whole, _ = run_stream(name, [data])
    assert events(whole) == events(data)
    for i in range(1, len(data)):
        out, _ = run_stream(name, [data[:i], data[i:]])
        assert events(out) == events(data), f"split at {i}"


class HoldAll:
    """A filter that holds every delta until its channel ends (the worst case for the seam)."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    def feed(self, channel: str, text: str) -> str:
        self.held[channel] = self.held.get(channel, "") + text
        return ""

    def finish(self, channel: str) -> str:
        return self.held.pop(channel, "").replace("john.smith@example.com", "<EMAIL>")


@pytest.mark.parametrize("name", ["chat", "responses", "anthropic"])
def test_held_text_is_emitted_before_the_channel_closes_in_the_api_format(name):
    data = stream_samples()[name][3]
    out, it = run_stream(name, [data[i:i + 7] for i in range(0, len(data), 7)], [HoldAll()])
    assert streamed_text(name, out) == "Hello, <EMAIL> bye"
    assert b"john.sm" not in out and b"ith@exa" not in out  # neither deltas nor recaps leak
    assert [p.text for p in it.response_texts] == ["Hello, <EMAIL> bye"]
    assert it.inspected == ["response-stream"]


class Broken:
    def feed(self, channel: str, text: str) -> str:
        raise RuntimeError("analyser down")

    def finish(self, channel: str) -> str:
        return ""


@pytest.mark.parametrize("name", ["chat", "responses", "anthropic"])
def test_a_failing_filter_ends_the_stream_with_the_apis_error_event(name):
    data = stream_samples()[name][3]
    out, _ = run_stream(name, [data], [Broken()])
    assert b"john" not in out
    assert b"douane decision dcn_test" in out
    last = json.loads(events(out)[-1][1])
    assert "error" in last or last.get("type") == "error"


def test_broken_sse_is_cut_with_an_error_event():
    out, _ = run_stream("chat", [b"data: {\"choices\": [\n\n"])
    assert b"not JSON" in out and b"douane decision" in out


def test_mcp_stream_events_are_complete_and_filtered_whole():
    it = protocols.parse_request(MCP, flow_for(MCP, "/mcp", MCP_CALL))
    rewriter = streams.StreamRewriter(protocols.stream_format(MCP, it), it, "dcn_x")
    rewriter.filters.append(HoldAll())
    result = {"jsonrpc": "2.0", "id": 3, "result": {"content": [
        {"type": "text", "text": "mail john.smith@example.com"}], "isError": False}}
    data = b"event: message\ndata: \n\n" + f"event: message\ndata: {json.dumps(result)}\n\n".encode()
    out = b"".join(rewriter(data)) + rewriter(b"")
    assert b"mail <EMAIL>" in out and b"john" not in out
    legacy = streams.StreamRewriter(protocols.stream_format(MCP, it), it, "dcn_y")
    out = b"".join(legacy(b"event: endpoint\ndata: /messages?sessionId=1\n\n")) + legacy(b"")
    assert b"legacy MCP HTTP+SSE transport" in out and b"/messages" not in out


JSON_INPUTS = [b'{"a": 1}', b"", "", b"null", '{"a": [1, "x"]}', '{"a": 1, "a": 2}', b"[NaN]",
               "\ufeff{}", b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"),
               '{"a": "\u00e9"}'.encode("utf-16-le"), '["x"]'.encode("utf-32-be"), b"\xff\xfe",
               b'{"a": "\xff"}', b"[1,", '"\\ud800"', b"[" * 3000 + b"]" * 3000, b" 1 ", b"1 2"]


@pytest.mark.parametrize("raw", JSON_INPUTS)
def test_loads_reads_json_as_json_loads_does(raw):
    """One decoder serves every body: what it reads, and what it refuses, is `json.loads`'s."""
    try:
        expected = json.loads(raw or b"null", object_pairs_hook=protocols._no_duplicates,
                              parse_constant=protocols._no_constants)
    except (ValueError, RecursionError, protocols.ProtocolError):
        with pytest.raises(protocols.ProtocolError):
            protocols.loads(raw, "body")
        return
    assert protocols.loads(raw, "body") == expected


@pytest.mark.parametrize("text", ['{"a": 1}', '{"a": 1, "a": 2}', "[NaN]", "\ufeff{}", "[1,", "x"])
def test_tool_arguments_read_as_json_loads_reads_them(text):
    from douane.protocols import fields
    try:
        expected = json.loads(text, object_pairs_hook=fields._pairs, parse_constant=fields._constant)
    except (ValueError, protocols.ProtocolError) as e:
        with pytest.raises(type(e) if isinstance(e, protocols.ProtocolError) else ValueError):
            fields._ARGUMENTS.decode(text)
        return
    assert fields._ARGUMENTS.decode(text) == expected


@pytest.mark.parametrize(("doc", "carries"), [
    ({"choices": [{"index": 0, "logprobs": {"content": [{"token": "a", "logprob": -1}]}}]}, True),
    ({"output": [{"content": [{"type": "output_text", "logprobs": [{"token": "a"}]}]}]}, True),
    ([{"x": [[{"top_logprobs": [1]}]]}], True),
    ({"choices": [{"logprobs": None}, {"logprobs": []}, {"logprobs": {"content": None}}]}, False),
    ({"top_logprobs": 0, "output": [{"logprobs": {"content": [], "refusal": {}}}]}, False),
    ({"choices": ["logprobs", 1, None, {"text": "logprobs"}]}, False),
])
def test_log_probabilities_are_found_anywhere_in_an_answer(doc, carries):
    assert openai.carries_logprobs(doc) is carries


# An answer (and a request) whose fields have other JSON types than their API gives them.
ODD_VALUES = [None, 1, 1.5, -3, True, "x", "", [], {}, [1], ["a"], {"a": 1}, [None], [[]], [{}]]
ANSWERS = {
    "/v1/chat/completions": {"id": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "hi", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}}]},
    "/v1/responses": {"id": "r", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "hi"}]},
        {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"}]},
    "/v1/messages": {"id": "m", "content": [{"type": "text", "text": "hi"},
                                            {"type": "tool_use", "id": "t", "name": "f",
                                             "input": {"a": "b"}}]},
    "/mcp": {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": "ok"}],
                                                   "structuredContent": {"a": 1}}},
    "/generate": {"text": "hi", "choices": [{"text": "a"}]},
}


def _with_odd_values(doc, rng):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths, todo = [], [((), doc)]
        while todo:
            path, node = todo.pop()
            items = node.items() if isinstance(node, dict) else \
                enumerate(node) if isinstance(node, list) else ()
            for k, v in items:
                paths.append((*path, k))
                todo.append(((*path, k), v))
        if not paths:
            break
        *parent_path, last = rng.choice(paths)
        parent = doc
        for k in parent_path:
            parent = parent[k]
        parent[last] = copy.deepcopy(rng.choice(ODD_VALUES))
    return doc


@pytest.mark.parametrize(("upstream", "path", "doc", "texts"), CASES)
def test_fields_of_unexpected_types_are_refused_as_protocol_errors(upstream, path, doc, texts):
    """Whatever type a field of a request or an answer has, reading it raises a ProtocolError
    (the provider-shaped 400 or 502), never another exception (an internal error)."""
    rng = random.Random(path)
    refused = 0
    for _ in range(300):
        f = flow_for(upstream, path, _with_odd_values(doc, rng))
        try:
            it = protocols.parse_request(upstream, f)
        except protocols.ProtocolError:
            continue
        f.response = tutils.tresp(content=json.dumps(_with_odd_values(ANSWERS[path], rng)).encode())
        f.response.headers["content-type"] = "application/json"
        try:
            protocols.parse_response(upstream, f, it)
        except protocols.ProtocolError as e:
            assert e.status == 502
            refused += 1
    assert path == "/generate" or refused > 0  # the odd answers did reach the parsers


def test_numbers_and_object_lists_as_the_parsers_read_them():
    from douane.protocols.base import ProtocolError, object_list, optional_number
    assert optional_number({"n": 2, "best_of": 3.5}, "n", "best_of") == 3.5
    assert optional_number({"n": None}, "n", "best_of") is None
    for bad in (True, "100", float("inf"), [1], {}):
        with pytest.raises(ProtocolError, match="finite number"):  # after a valid one too
            optional_number({"n": 1, "best_of": bad}, "n", "best_of")
    for nothing in ({}, {"tools": None}, {"tools": []}, {"tools": 0}, {"tools": ""}):
        assert object_list(nothing, "tools") == []
    for bad in ({"tools": {"a": 1}}, {"tools": "x"}, {"tools": [{}, "x"]}, {"tools": [None]}):
        with pytest.raises(ProtocolError, match="list of objects"):
            object_list(bad, "tools")


def test_jsonpath_strings_and_keys_in_document_order():
    doc = {"a": ["x", {"b": "y", "c": 1, "d": [None, "z", []]}], "e": {}, "f": "w", "g": True}
    assert jsonpath.strings(doc, ("p",)) == [(("p", "a", 0), "x"), (("p", "a", 1, "b"), "y"),
                                             (("p", "a", 1, "d", 1), "z"), (("p", "f"), "w")]
    assert jsonpath.strings("s") == [((), "s")] and jsonpath.strings(3) == []
    assert jsonpath.keys(doc) == ["a", "b", "c", "d", "e", "f", "g"]


@pytest.mark.parametrize("text", ['{}', ' {"a": [1, {"b": "c"}]}\r\n\t', '[]', '"s"', 'null',
                                  '\n1 ', '{"a": "\\ud800"}'])
def test_bodies_parse_as_json_loads_reads_them(text):
    assert protocols.loads(text, "body") == json.loads(text)
    assert protocols.loads(text.encode(), "body") == json.loads(text)


@pytest.mark.parametrize("text", ['{"a": 1} x', '{}{}', ' ', '{', '[1,]', '{"a": NaN}',
                                  '{"a": 1}\x0b', '\x0c{}', '{}\u00a0', '\ufeff{}',
                                  '{"a": 1, "a": 2}', '{"x": {"a": 1, "a": 1}}'])
def test_bodies_json_loads_refuses_are_refused(text):
    with pytest.raises(protocols.ProtocolError) as e:
        protocols.loads(text, "body")
    assert e.value.code == ("duplicate_json_key" if '"a": 1, "a"' in text else "invalid_json")
