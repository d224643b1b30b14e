"""Every string of a body is a text piece (douane.protocols.fields): the fields the parsers do not
name, keys, decoded tool arguments and text files; masking edits free text only; streams filter
every text-bearing event."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from douane import protocols
from douane.config import ConfigError
from douane.interaction import Interaction
from douane.policy import engine, model
from douane.protocols import fields, jsonpath, streams
from douane.protocols.sse import SseParser
from douane.recording.writer import recording_of
from tests.test_protocols import (
    ANTHROPIC,
    ANTHROPIC_REQUEST,
    CHAT_REQUEST,
    GENERIC,
    OPENAI,
    RESPONSES_REQUEST,
    flow_for,
)

PHRASE = "project nightingale"
B64 = base64.b64encode(PHRASE.encode()).decode()
CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
USER = {"role": "user", "content": "hi"}


def chat(**extra) -> dict:
    return {"model": "m", "messages": [USER], **extra}


def messages(*blocks, **extra) -> dict:
    return {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": list(blocks)}],
            **extra}


# (upstream, path, body, text kind the phrase must be seen as)
REQUEST_FIELDS = {
    "chat_legacy_function_call": (OPENAI, CHAT, {"model": "m", "messages": [
        {"role": "assistant", "content": None,
         "function_call": {"name": "f", "arguments": json.dumps({"q": PHRASE})}}, USER]},
        "tool_arguments"),
    "chat_assistant_refusal_part": (OPENAI, CHAT, {"model": "m", "messages": [
        {"role": "assistant", "content": [{"type": "refusal", "refusal": PHRASE}]}, USER]},
        "prompt"),
    "chat_tool_parameter_description": (OPENAI, CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "q": {"type": "string", "description": PHRASE}}}}}]), "tool_description"),
    "chat_legacy_functions": (OPENAI, CHAT, chat(functions=[{"name": "f", "description": PHRASE}]),
                              "tool_description"),
    "chat_response_format_schema": (OPENAI, CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "description": PHRASE}}}}}),
        "prompt"),
    "chat_prediction": (OPENAI, CHAT, chat(prediction={"type": "content", "content": PHRASE}),
                        "prompt"),
    "chat_key": (OPENAI, CHAT, chat(metadata={PHRASE: "x"}), "prompt"),
    "responses_reasoning_summary": (OPENAI, RESPONSES, {"model": "m", "input": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": PHRASE}]},
        {"role": "user", "content": "hi"}]}, "prompt"),
    "responses_custom_tool_call_output": (OPENAI, RESPONSES, {"model": "m", "input": [
        {"type": "custom_tool_call_output", "call_id": "c1", "output": PHRASE}]}, "tool_result"),
    "responses_function_call_output_list": (OPENAI, RESPONSES, {"model": "m", "input": [
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": PHRASE}]}]}, "tool_result"),
    "responses_custom_tool_description": (OPENAI, RESPONSES, {"model": "m", "input": "hi", "tools": [
        {"type": "custom", "name": "f", "description": PHRASE}]}, "tool_description"),
    "responses_text_format_description": (OPENAI, RESPONSES, {"model": "m", "input": "hi", "text": {
        "format": {"type": "json_schema", "name": "s", "description": PHRASE, "schema": {}}}},
        "prompt"),
    "anthropic_document_text_source": (ANTHROPIC, MESSAGES, messages(
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                        "data": PHRASE}}), "prompt"),
    "anthropic_search_result": (ANTHROPIC, MESSAGES, messages(
        {"type": "search_result", "source": "https://x.example", "title": "t",
         "content": [{"type": "text", "text": PHRASE}]}), "prompt"),
    "anthropic_thinking": (ANTHROPIC, MESSAGES, {"model": "c", "max_tokens": 5, "messages": [
        USER, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": PHRASE, "signature": "c2lnbmF0dXJl"}]}, USER]},
        "prompt"),
    "anthropic_input_schema_description": (ANTHROPIC, MESSAGES, {
        "model": "c", "max_tokens": 5, "messages": [USER], "tools": [
            {"name": "f", "input_schema": {"type": "object", "properties": {
                "q": {"type": "string", "description": PHRASE}}}}]}, "tool_description"),
    "data_url_text_file": (OPENAI, CHAT, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.txt",
                                  "file_data": f"data:text/plain;base64,{B64}"}}]}]}, "prompt"),
    "data_url_mislabelled_as_pdf": (OPENAI, RESPONSES, {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_file", "filename": "a.pdf",
                                      "file_data": f"data:application/pdf;base64,{B64}"}]}]},
        "prompt"),
    "data_url_percent_encoded": (OPENAI, CHAT, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain,project%20nightingale"}}]}]},
        "prompt"),
    "data_url_binary_looking_text": (OPENAI, CHAT, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:application/octet-stream;base64,"
                                  + base64.b64encode(b"\x01" + PHRASE.encode()).decode()}}]}]},
        "prompt"),
    "anthropic_base64_text_document": (ANTHROPIC, MESSAGES, messages(
        {"type": "document", "source": {"type": "base64", "media_type": "text/csv",
                                        "data": B64}}), "prompt"),
    "tool_arguments_json_escape": (OPENAI, CHAT, {"model": "m", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": '{"q": "project \\u006eightingale"}'}}]}]}, "tool_arguments"),
    "tool_arguments_key": (OPENAI, RESPONSES, {"model": "m", "input": [
        {"type": "function_call", "call_id": "c", "name": "f",
         "arguments": json.dumps({PHRASE: 1})}]}, "tool_arguments"),
    "generic_unlisted_field": (GENERIC, "/generate", {"prompt": "hi", "extra": {"x": [PHRASE]}},
                               "prompt"),
    # a `type` that is not a string names no opaque blob (it broke the walk: a 500, not a read)
    "generic_object_type": (GENERIC, "/generate", {"prompt": "hi", "extra": {
        "type": {"x": 1}, "signature": PHRASE}}, "prompt"),
}


@pytest.mark.parametrize("case", list(REQUEST_FIELDS))
def test_every_request_field_is_a_text_piece(case):
    upstream, path, doc, kind = REQUEST_FIELDS[case]
    it = protocols.parse_request(upstream, flow_for(upstream, path, doc))
    assert {p.kind for p in it.texts if PHRASE in p.text} == {kind}


def test_split_tool_argument_values_stay_adjacent():
    doc = {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({"a": "project", "b": "nightingale"})}}]}]}
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, doc))
    args = [p.text for p in it.texts if p.kind == "tool_arguments"]
    assert "project nightingale" in " ".join(args)
    assert not [p for p in it.texts if p.kind == "tool_arguments" and p.editable][1:]


def test_keys_ids_and_decoded_text_are_never_edited():
    _, _, doc, _ = REQUEST_FIELDS["data_url_text_file"]
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, doc))
    editable = {p.path for p in it.texts if p.editable}
    assert ("model",) not in editable and ("messages", 0, "role") not in editable
    assert not [p for p in it.texts if p.text == PHRASE and p.editable]
    for piece in it.texts:
        if piece.editable:
            assert jsonpath.get(doc, piece.path) == piece.text


def test_images_are_media_not_text():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8).decode()
    doc = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}]}
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, doc))
    assert it.has_media and not [p for p in it.texts if png in p.text]
    pcm = base64.b64encode(bytes(range(128, 256)) * 4).decode()  # headerless audio
    doc = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": pcm, "format": "mp3"}}]}]}
    assert protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, doc)).has_media
    raw = messages({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                "data": png}})
    it = protocols.parse_request(ANTHROPIC, flow_for(ANTHROPIC, MESSAGES, raw))
    assert it.has_media and not [p for p in it.texts if png in p.text]


def test_media_without_a_declared_type_is_recognised_and_opaque_blobs_skipped():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8).decode()
    doc = {"model": "m", "input": [
        {"type": "image_generation_call", "id": "ig", "result": png},
        {"type": "reasoning", "id": "rs", "summary": [], "encrypted_content": PHRASE},
        {"role": "user", "content": "hi", "encrypted_content": PHRASE}]}
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, RESPONSES, doc))
    assert it.has_media and not [p for p in it.texts if png in p.text]
    # skipped only where the provider verifies it (a reasoning item), read anywhere else
    assert [p.path for p in it.texts if p.text == PHRASE] == [("input", 2, "encrypted_content")]


def file_part(data_url: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": data_url}}]}]}


@pytest.mark.parametrize(("doc", "code"), [
    (file_part("data:text/plain;base64,not base64!"), "invalid_data_url"),
    (file_part("data:text/plain;base64," + base64.b64encode(b"\xff\xfe\x00\xd8").decode()),
     "undecodable_file"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f",
                                                   "arguments": '{"q": "a", "q": "b"}'}}]}]},
     "duplicate_json_key"),
    (chat(x=json.loads("[" * 70 + "]" * 70)), "too_deep"),
    (chat(x=["a"] * 100_001), "too_many_fields"),
    (chat(logprobs=True), "logprobs_refused"),
])
def test_what_cannot_be_inspected_whole_is_refused(doc, code):
    with pytest.raises(protocols.ProtocolError) as err:
        protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, doc))
    assert err.value.code == code


@pytest.mark.parametrize("data", [b"\xfe\xff" + PHRASE.encode("utf-16-be"),
                                  PHRASE.encode("utf-16"), PHRASE.encode("utf-16-le")])
def test_a_utf16_file_is_read_as_its_text(data):
    """Text in UTF-16 (security, stop 32: it was refused as undecodable in a request, and passed
    unread in an MCP blob) is read as the text it decodes to."""
    doc = file_part("data:application/octet-stream;base64," + base64.b64encode(data).decode())
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, doc))
    assert PHRASE in [p.text for p in it.texts]


def answer(upstream, path, request, doc):
    f = flow_for(upstream, path, request)
    it = protocols.parse_request(upstream, f)
    f.response = tutils.tresp(content=json.dumps(doc).encode())
    f.response.headers["content-type"] = "application/json"
    protocols.parse_response(upstream, f, it)
    return f, it


ANSWERS = {
    "chat_message_refusal": (OPENAI, CHAT, chat(), {"choices": [{"index": 0, "message": {
        "role": "assistant", "content": None, "refusal": PHRASE}}]}, ("choices", 0, "message",
                                                                      "refusal")),
    "anthropic_thinking": (ANTHROPIC, MESSAGES, messages({"type": "text", "text": "hi"}), {
        "type": "message", "content": [{"type": "thinking", "thinking": PHRASE,
                                        "signature": "abc"}, {"type": "text", "text": "ok"}]},
        ("content", 0, "thinking")),
    "responses_reasoning_summary": (OPENAI, RESPONSES, {"model": "m", "input": "hi"}, {
        "output": [{"type": "reasoning", "id": "rs", "summary": [
            {"type": "summary_text", "text": PHRASE}]}]}, ("output", 0, "summary", 0, "text")),
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_answer_fields_are_inspected_and_editable(case):
    upstream, path, request, doc, where = ANSWERS[case]
    f, it = answer(upstream, path, request, doc)
    piece = next(p for p in it.response_texts if p.text == PHRASE)
    assert piece.kind == "completion" and piece.editable and piece.path == where
    piece.text = "<MASKED>"
    protocols.apply_text_edits(f, "response", [piece])
    expected = copy.deepcopy(doc)
    jsonpath.set_(expected, where, "<MASKED>")
    assert json.loads(f.response.get_content()) == expected


class Upper:
    """A filter that changes every text it sees (stands for masking)."""

    def feed(self, channel: str, text: str) -> str:
        return text.upper()

    def finish(self, channel: str) -> str:
        return ""


def sse(*docs) -> bytes:
    return b"".join(f"event: {d.get('type', 'x')}\ndata: {json.dumps(d)}\n\n".encode()
                    for d in docs)


STREAMS = {
    "chat_delta_refusal": (OPENAI, CHAT, b"".join(
        f"data: {json.dumps(d)}\n\n".encode() for d in [
            {"id": "x", "choices": [{"index": 0, "delta": {"refusal": "project "}}]},
            {"id": "x", "choices": [{"index": 0, "delta": {"refusal": "nightingale"}}]}])
        + b"data: [DONE]\n\n"),
    "anthropic_thinking_delta": (ANTHROPIC, MESSAGES, sse(
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "project "}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "nightingale"}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": "abc"}},
        {"type": "content_block_stop", "index": 0})),
    "responses_reasoning_summary": (OPENAI, RESPONSES, sse(
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "summary_index": 0,
         "delta": "project "},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "summary_index": 0,
         "delta": "nightingale"},
        {"type": "response.reasoning_summary_text.done", "output_index": 0, "summary_index": 0,
         "text": "project nightingale"},
        {"type": "response.completed", "response": {"output": [{"type": "reasoning", "summary": [
            {"type": "summary_text", "text": "project nightingale"}]}]}})),
    "media_in_a_stream_is_skipped": (OPENAI, CHAT, b"".join(
        f"data: {json.dumps(d)}\n\n".encode() for d in [
            {"id": "x", "choices": [{"index": 0, "delta": {"audio": {
                "data": base64.b64encode(b"RIFF\x00\x01\xff\xfe").decode()}}}]},
            {"id": "x", "choices": [{"index": 0, "delta": {"content": "project nightingale"}}]},
            {"id": "x", "images": ["data:image/png;base64," + base64.b64encode(
                b"\x89PNG\r\n\x1a\n\xff").decode()]}]) + b"data: [DONE]\n\n"),
    "unknown_event_type": (OPENAI, RESPONSES, sse(
        {"type": "response.future_thing.delta", "output_index": 0, "delta": "project nightingale"})),
}


@pytest.mark.parametrize("case", list(STREAMS))
def test_every_streamed_text_passes_the_filters(case):
    upstream, path, data = STREAMS[case]
    body = {"model": "m", "stream": True, **({"input": "x"} if path == RESPONSES else
                                            {"messages": [USER], "max_tokens": 5})}
    it = protocols.parse_request(upstream, flow_for(upstream, path, body))
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "dcn_t")
    rewriter.filters.append(Upper())
    out = b"".join(rewriter(data)) + rewriter(b"")
    assert b"nightingale" not in out and b"NIGHTINGALE" in out
    parser = SseParser()
    assert len(parser.feed(out) + parser.feed(b"")) >= len(SseParser().feed(data + b"\n"))
    assert b'"signature": "abc"' in out or b"signature" not in data  # opaque blobs untouched


# Hosted tools and remote MCP servers: parsed from every API, granted by kind and URL.
HOSTED = {
    "responses_mcp": (OPENAI, RESPONSES, {"model": "m", "input": "hi", "tools": [
        {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp"}]},
        [], ["https://evil.example/mcp"]),
    "responses_builtins": (OPENAI, RESPONSES, {"model": "m", "input": "hi", "tools": [
        {"type": "web_search_preview_2025_03_11"}, {"type": "code_interpreter", "container": {}},
        {"type": "file_search", "vector_store_ids": ["v"]}, {"type": "computer_use_preview"},
        {"type": "image_generation"}]},
        ["web_search", "code_interpreter", "file_search", "computer_use", "image_generation"], []),
    "chat_web_search_options": (OPENAI, CHAT, chat(web_search_options={}), ["web_search"], []),
    "anthropic_server_tools": (ANTHROPIC, MESSAGES, {
        "model": "c", "max_tokens": 5, "messages": [USER],
        "tools": [{"type": "web_search_20250305", "name": "web_search"},
                  {"type": "bash_20250124", "name": "bash"}]}, ["web_search", "bash"], []),
    "anthropic_mcp_servers": (ANTHROPIC, MESSAGES, {
        "model": "c", "max_tokens": 5, "messages": [USER],
        "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}]},
        [], ["https://mcp.example.com/sse"]),
}


@pytest.mark.parametrize("case", list(HOSTED))
def test_hosted_tools_and_mcp_servers_are_parsed(case):
    upstream, path, doc, kinds, servers = HOSTED[case]
    it = protocols.parse_request(upstream, flow_for(upstream, path, doc))
    assert (it.hosted_tools, it.mcp_servers, it.tools) == (kinds, servers, [])


def test_mcp_server_credentials_are_not_text():
    token = "sk-" + "Zq8" * 12
    doc = {"model": "m", "input": "hi", "tools": [
        {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com/a",
         "headers": {"Authorization": f"Bearer {token}"}, "authorization": token}]}
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, RESPONSES, doc))
    anthropic = {"model": "c", "max_tokens": 5, "messages": [USER], "mcp_servers": [
        {"type": "url", "url": "https://mcp.example.com/a", "name": "x",
         "authorization_token": token}]}
    it2 = protocols.parse_request(ANTHROPIC, flow_for(ANTHROPIC, MESSAGES, anthropic))
    assert not [p for p in it.texts + it2.texts if token in p.text]


@pytest.mark.parametrize(("upstream", "path", "doc"), [
    (OPENAI, RESPONSES, {"model": "m", "input": "hi", "tools": [{"type": "teleport"}]}),
    (OPENAI, CHAT, chat(tools=[{"type": "web_search"}])),
    (ANTHROPIC, MESSAGES, {"model": "c", "max_tokens": 5, "messages": [USER],
                           "tools": [{"type": "teleport_20260101", "name": "t"}]}),
    (OPENAI, RESPONSES, {"model": "m", "input": "hi", "tools": [{"type": "mcp"}]}),
])
def test_unknown_tool_types_are_refused(upstream, path, doc):
    with pytest.raises(protocols.ProtocolError) as err:
        protocols.parse_request(upstream, flow_for(upstream, path, doc))
    assert err.value.code in ("unknown_tool_type", "invalid_body")


GRANTS = """\
version: 1
groups:
  plain: {upstreams: {openai: {tools: true}}}
  search:
    upstreams:
      openai:
        tools: false
        hosted_tools: [web_search]
        mcp_servers: ["https://mcp.example.com/*", "https://*.corp.example/mcp"]
"""


def test_hosted_tools_are_granted_by_kind_and_mcp_servers_by_url(tmp_path):

    path = tmp_path / "grants.yaml"
    path.write_text(GRANTS)
    policy = model.load([path])
    plain, search = policy.groups["plain"].upstreams["openai"], \
        policy.groups["search"].upstreams["openai"]

    def rules(ug, hosted=(), servers=()):
        it = Interaction("openai", "responses", hosted_tools=list(hosted),
                         mcp_servers=list(servers))
        return [r.rule for r in engine.grant_violations(ug, it)]

    assert rules(plain, ["web_search"]) == ["grant.hosted_tool"]  # tools: true is not enough
    assert rules(plain, [], ["https://mcp.example.com/x"]) == ["grant.mcp_server"]
    assert rules(search, ["web_search"], ["https://mcp.example.com/x",
                                          "https://a.corp.example/mcp",
                                          "HTTPS://MCP.EXAMPLE.COM:443/x?q=1"]) == []
    assert rules(search, ["code_interpreter"]) == ["grant.hosted_tool"]
    for url in ["https://mcp.example.com/a/b", "https://mcp.example.com/../admin",
                "https://mcp.example.com/%2e%2e/admin", "https://mcp.example.com@evil.example/x",
                "https://evil.example?.corp.example/mcp", "http://mcp.example.com/x",
                "https://mcp.example.com.evil.example/x"]:
        assert rules(search, [], [url]) == ["grant.mcp_server"], url


@pytest.mark.parametrize(("grant", "message"), [
    ("hosted_tools: [web_serch]", "unknown hosted tool 'web_serch'"),
    ("hosted_tools: [mcp]", "unknown hosted tool 'mcp'"),
    ("mcp_servers: [mcp.example.com]", "expected an http(s) URL glob"),
])
def test_hosted_tool_grants_are_validated_with_file_and_line(tmp_path, grant, message):

    path = tmp_path / "grants.yaml"
    path.write_text(f"version: 1\ndefault:\n  upstreams:\n    openai:\n      {grant}\n")
    with pytest.raises(ConfigError) as err:
        model.load([path])
    assert message in str(err.value) and "grants.yaml:5" in str(err.value)


def test_the_recording_redacts_a_key_inside_a_text_file():
    key = "AKIA" + "Q" * 16
    f = tflow.tflow(resp=tutils.tresp())
    f.request.headers["content-type"] = "application/json"
    inside = base64.b64encode(f"creds: {key}\n".encode()).decode()
    f.request.text = json.dumps(file_part(f"data:text/plain;base64,{inside}"))
    f = http.HTTPFlow.from_state(recording_of(f.get_state(), frozenset()))
    url = json.loads(f.request.content)["messages"][0]["content"][0]["file"]["file_data"]
    assert inside not in f.request.text and key not in f.request.text
    assert base64.b64decode(url.split(",")[1]) == b"creds: <SECRET:detector.secret.aws_access_key>\n"


def test_a_text_file_in_a_streamed_answer_ends_the_stream():
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, CHAT, chat(stream=True)))
    rewriter = streams.StreamRewriter(protocols.stream_format(OPENAI, it), it, "dcn_f")
    event = {"id": "x", "choices": [{"index": 0, "delta": {"file": f"data:text/plain;base64,{B64}"}}]}
    out = b"".join(rewriter(f"data: {json.dumps(event)}\n\n".encode())) + rewriter(b"")
    assert B64.encode() not in out and b"douane decision dcn_f" in out


def test_responses_lifecycle_events_echoing_the_request_are_not_filtered_again():
    it = protocols.parse_request(OPENAI, flow_for(OPENAI, RESPONSES, {"input": "x", "stream": True}))
    rewriter = streams.StreamRewriter(protocols.stream_format(OPENAI, it), it, "dcn_e")
    rewriter.filters.append(Upper())
    data = sse({"type": "response.created", "response": {
        "id": "r", "instructions": "be brief", "tools": [{"type": "function", "name": "f",
                                                          "description": "finds things"}],
        "output": [], "error": {"message": "odd upstream text"}}})
    out = b"".join(rewriter(data)) + rewriter(b"")
    assert b"be brief" in out and b"finds things" in out and b"ODD UPSTREAM TEXT" in out


# -- one walk of each body: every field read, each branch classified once -----------------------

# Bodies with a field of every sort (named by the parsers or not, keys, nested, decoded tool
# arguments, lists of lists), requests and answers of each protocol the walk serves.
WALKED = {
    "chat": (OPENAI, CHAT, {**CHAT_REQUEST, "metadata": {"ticket": "T-1", "tags": [["a", "b"]]},
                            "response_format": {"type": "json_schema", "json_schema": {
                                "name": "s", "schema": {"properties": {"q": {
                                    "description": "what to ask"}}}}}}, {
        "id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "sunny", "tool_calls": [{
                "id": "call_2", "type": "function", "function": {
                    "name": "f", "arguments": json.dumps({"city": "Lyon", "days": ["mon"]})}}]},
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}}),
    "responses": (OPENAI, RESPONSES, {**RESPONSES_REQUEST, "input": [
        *RESPONSES_REQUEST["input"], {"type": "reasoning", "id": "rs", "summary": [
            {"type": "summary_text", "text": "thought about it"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "earlier answer",
                                           "annotations": [{"title": "a source"}]}]}]}, {
        "id": "r", "object": "response", "output": [
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "here", "annotations": []}]},
            {"type": "function_call", "call_id": "c9", "name": "g",
             "arguments": json.dumps({"deep": {"er": ["value in a list"]}})},
            {"type": "web_search_call", "id": "ws", "action": {"query": "the search"}}]}),
    "anthropic": (ANTHROPIC, MESSAGES, {**ANTHROPIC_REQUEST, "metadata": {"user_id": "u-7"}}, {
        "id": "m", "type": "message", "role": "assistant", "content": [
            {"type": "text", "text": "done", "citations": [{"cited_text": "quoted words"}]},
            {"type": "tool_use", "id": "tu_2", "name": "find", "input": {"q": ["nested query"]}},
            {"type": "server_tool_use", "id": "st", "name": "web_search",
             "input": {"query": "server search"}}],
        "stop_reason": "end_turn"}),
    "generic": (GENERIC, "/generate", {"prompt": "hi", "messages": [{"content": "a"}],
                                       "options": {"style": ["terse", {"tone": "dry"}]}},
                {"output": {"text": "out", "extra": [{"note": "more"}]}}),
}


def _leaves(node, key=None):
    """Every string of a document and every key, as a reader would list them (written apart
    from the walk: a test of it, not a copy); a tool's JSON arguments string also as its keys
    and its values joined (as the tool reads them, a phrase split across two values kept)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if (k, node.get("type")) in fields.OPAQUE:
                continue
            yield k
            yield from _leaves(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v, key)
    elif isinstance(node, str) and node.startswith("data:"):  # a file: read is what it holds
        yield node.partition(",")[2]
    elif isinstance(node, str) and key == "arguments":
        yield node
        inside = list(_leaves(json.loads(node)))
        keys = set(jsonpath.keys(json.loads(node)))
        yield from keys
        yield " ".join(s for s in inside if s not in keys)
    elif isinstance(node, str):
        yield node


def _read(upstream, path, request, answer_doc):
    f, it = answer(upstream, path, request, answer_doc)
    return it


@pytest.mark.parametrize("case", list(WALKED))
def test_the_walk_reads_every_string_and_key_of_both_bodies(case):
    """Fails if the walk skips a field: every string and key of the request and of the answer is
    a text piece of its side, or a line of its piece of keys and ids."""
    upstream, path, request, answer_doc = WALKED[case]
    it = _read(upstream, path, request, answer_doc)
    for doc, pieces in ((request, it.texts), (answer_doc, it.response_texts)):
        read = {p.text for p in pieces} | {line for p in pieces if p.path == (fields.KEYS,)
                                           for line in p.text.split("\n")}
        missed = [s for s in _leaves(doc) if s and s not in read]
        assert not missed, missed


@pytest.mark.parametrize("case", [*WALKED, *REQUEST_FIELDS])
def test_a_branch_classified_once_reads_as_each_string_classified(case, monkeypatch):
    """`cover(reads=...)` classifies what lies under a path once: the pieces (kind, role, text,
    path, editable, order) are those of classifying every string and key where it sits."""
    if case in WALKED:
        upstream, path, request, answer_doc = WALKED[case]
    else:
        upstream, path, request, _ = REQUEST_FIELDS[case]
        answer_doc = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                           "content": "x"}}]}
    fast = _read(upstream, path, request, answer_doc)
    cover = fields.cover
    monkeypatch.setattr(fields, "cover", lambda it, doc, classify, side="request", reads=None:
                        cover(it, doc, classify, side))
    slow = _read(upstream, path, request, answer_doc)
    assert fast.texts == slow.texts
    assert fast.response_texts == slow.response_texts
