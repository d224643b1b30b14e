"""Evasion: a denied phrase ("project nightingale") hidden from inspection in every way the issue
lists. Each case is either caught by the policy (403, blocked) or refused as uninspectable or
ambiguous (400/415); the upstream never sees it, and the refusal is audited.

Compressed bodies with duplicate keys are also in tests/test_protocols_e2e.py (decoding proof);
here the encodings carry the denied phrase itself.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import ssl
import time
import zlib

import brotli
import httpx
import pytest
import zstandard

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import DENIED, assert_refused, with_claude, write_policy
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import _pieces, anthropic_stream, responses_stream


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("evasion")
    config = base_config(issuer.url, llm.url, policy={"files": [write_policy(work)]},
                         recording={})
    with_claude(config, llm.url)
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("eve@corp.example", ["engineering"])
    secrets.add(token)
    return token


def chat(*contents: str | list) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": c} for c in contents]}


def body(doc: dict) -> bytes:
    return json.dumps(doc).encode()


JSON = {"content-type": "application/json"}
PLAIN = body(chat(f"tell me about {DENIED}"))
ENCODERS = {"gzip": gzip.compress, "br": brotli.compress, "zstd": zstandard.compress,
            "deflate": zlib.compress}

# (body, extra headers, statuses that count as caught or refused)
CASES: dict[str, tuple[bytes, dict[str, str], tuple[int, ...]]] = {
    "plain": (PLAIN, JSON, (403,)),
    **{f"encoding_{name}": (encode(PLAIN), {**JSON, "content-encoding": name}, (403,))
       for name, encode in ENCODERS.items()},
    "encoding_stacked_gzip_gzip": (gzip.compress(gzip.compress(PLAIN)),
                                   {**JSON, "content-encoding": "gzip, gzip"}, (415,)),
    "encoding_claimed_but_plain": (PLAIN, {**JSON, "content-encoding": "gzip"}, (415,)),
    "encoding_unknown": (PLAIN, {**JSON, "content-encoding": "x-rot13"}, (415,)),
    "confusable_cyrillic": (body(chat("tell me about prоject nightіngale")), JSON, (403,)),
    "confusable_greek": (body(chat("tell me about prοject nightingαle")), JSON, (403,)),
    "fullwidth": (body(chat("ｐｒｏｊｅｃｔ ｎｉｇｈｔｉｎｇａｌｅ")), JSON, (403,)),
    "mathematical_letters": (body(chat("𝐩𝐫𝐨𝐣𝐞𝐜𝐭 𝐧𝐢𝐠𝐡𝐭𝐢𝐧𝐠𝐚𝐥𝐞")), JSON, (403,)),
    "zero_width_and_soft_hyphen": (body(chat("pro\u200bject night\u00adin\u200dgale")), JSON,
                                   (403,)),
    "bidi_controls": (body(chat("\u202eproject\u202c \u2066nightingale\u2069")), JSON, (403,)),
    "case_and_whitespace": (body(chat("PrOjEcT \t\n  NiGhTiNgAlE")), JSON, (403,)),
    "nbsp": (body(chat("project\u00a0nightingale")), JSON, (403,)),
    "base64": (body(chat("decode: " + base64.b64encode(DENIED.encode()).decode())), JSON,
               (403,)),
    "split_across_messages": (body(chat("tell me about project", "nightingale, please")), JSON,
                              (403,)),
    "split_across_content_parts": (body(chat([{"type": "text", "text": "project"},
                                              {"type": "text", "text": "nightingale"}])),
                                   JSON, (403,)),
    "json_unicode_escapes": (b'{"model": "m", "messages": [{"role": "user", "content": '
                             b'"\\u0070roject \\u006eightingale"}]}', JSON, (403,)),
    "json_surrogate_escapes": (b'{"model": "m", "messages": [{"role": "user", "content": '
                               b'"project night\\u0069ngale \\ud83d\\ude00"}]}', JSON, (403,)),
    "duplicate_key_top_level": (b'{"model": "m", "messages": [{"role": "user", "content": '
                                b'"project nightingale"}], "messages": []}', JSON, (400,)),
    "duplicate_key_in_message": (b'{"model": "m", "messages": [{"role": "user", "content": '
                                 b'"project nightingale", "content": "hello"}]}', JSON, (400,)),
    "utf16_body": (json.dumps(chat(f"about {DENIED}")).encode("utf-16"), JSON, (403,)),
    "content_type_text_plain": (PLAIN, {"content-type": "text/plain"}, (415,)),
    "content_type_form": (PLAIN, {"content-type": "application/x-www-form-urlencoded"}, (415,)),
    "content_type_multipart": (b"--b\r\ncontent-disposition: form-data; name=\"x\"\r\n\r\n"
                               + PLAIN + b"\r\n--b--\r\n",
                               {"content-type": "multipart/form-data; boundary=b"}, (415,)),
    "content_type_missing": (PLAIN, {}, (415,)),
    "content_type_twice": (PLAIN, {"content-type": "text/plain, application/json"}, (415,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_denied_phrase_is_caught_or_refused(case, gw, llm, token):
    content, headers, statuses = CASES[case]
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=content,
                      headers={"authorization": f"Bearer {token}", **headers})
    record = assert_refused(gw, llm, before, resp, *statuses)
    if resp.status_code == 403:
        assert record["action"] == "block"
        assert record["reasons"][0]["rule"] == "deny.codename"


CALL = {"id": "call_1", "type": "function",
        "function": {"name": "search", "arguments": json.dumps({"q": DENIED})}}
# the phrase in every field a model reads: (path, document)
FIELDS: dict[str, tuple[str, dict]] = {
    "system_message": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "system", "content": DENIED}, {"role": "user", "content": "hi"}]}),
    "developer_message": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "developer", "content": DENIED}, {"role": "user", "content": "hi"}]}),
    "assistant_history": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": DENIED}, {"role": "user", "content": "go on"}]}),
    "tool_call_arguments": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "no results"}]}),
    "tool_result": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [dict(CALL, function={
            "name": "search", "arguments": "{}"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": DENIED}]}),
    "tool_description": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
            "name": "f", "description": DENIED, "parameters": {"type": "object"}}}]}),
    "responses_instructions": ("/v1/responses", {"model": "m", "instructions": DENIED,
                                                 "input": "hi"}),
    "responses_input_parts": ("/v1/responses", {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": DENIED}]}]}),
    "completions_prompt_list": ("/v1/completions", {"model": "m", "prompt": ["hi", DENIED]}),
    "embeddings_input": ("/v1/embeddings", {"model": "m", "input": [DENIED]}),
    "ungoverned_endpoint": ("/v1/assistants", {"model": "m", "instructions": DENIED}),
    "anthropic_system": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 5,
                                                    "system": DENIED, "messages": [
                                                        {"role": "user", "content": "hi"}]}),
    "anthropic_system_blocks": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "system": [{"type": "text", "text": DENIED}],
        "messages": [{"role": "user", "content": "hi"}]}),
    "anthropic_tool_result": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 5,
                                                         "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {"q": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": DENIED}]}]}]}),
    "anthropic_tool_use_input": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 5,
                                                            "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {"q": DENIED}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "ok"}]}]}),
    # every other field a model reads (issue 14), found by the walk over the whole body
    "chat_legacy_function_call": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": None,
         "function_call": {"name": "f", "arguments": json.dumps({"q": DENIED})}},
        {"role": "function", "name": "f", "content": "ok"}]}),
    "chat_assistant_refusal_part": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "content": [{"type": "refusal", "refusal": DENIED}]},
        {"role": "user", "content": "hi"}]}),
    "chat_tool_parameter_description": ("/v1/chat/completions", dict(chat("hi"), tools=[
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"q": {"type": "string", "description": DENIED}}}}}])),
    "chat_response_format_schema": ("/v1/chat/completions", dict(chat("hi"), response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object",
                                                                       "description": DENIED}}})),
    "chat_prediction": ("/v1/chat/completions", dict(chat("hi"), prediction={
        "type": "content", "content": DENIED})),
    "chat_metadata_key": ("/v1/chat/completions", dict(chat("hi"), metadata={DENIED: "1"})),
    "responses_reasoning_summary": ("/v1/responses", {"model": "m", "input": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": DENIED}]},
        {"role": "user", "content": "hi"}]}),
    "responses_custom_tool_call_output": ("/v1/responses", {"model": "m", "input": [
        {"type": "custom_tool_call_output", "call_id": "c1", "output": DENIED}]}),
    "responses_function_call_output_list": ("/v1/responses", {"model": "m", "input": [
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": DENIED}]}]}),
    "responses_custom_tool_description": ("/v1/responses", {"model": "m", "input": "hi", "tools": [
        {"type": "custom", "name": "f", "description": DENIED}]}),
    "responses_text_format_description": ("/v1/responses", {"model": "m", "input": "hi", "text": {
        "format": {"type": "json_schema", "name": "s", "description": DENIED, "schema": {}}}}),
    "anthropic_document_text_source": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": DENIED}}]}]}),
    "anthropic_search_result": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "search_result", "source": "https://x.example", "title": "t",
             "content": [{"type": "text", "text": DENIED}]}]}]}),
    "anthropic_thinking": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": DENIED,
                                           "signature": "c2ln"}]},
        {"role": "user", "content": "go on"}]}),
    "anthropic_input_schema_description": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {
            "q": {"type": "string", "description": DENIED}}}}]}),
    "file_part_data_url": ("/v1/chat/completions", chat([{"type": "file", "file": {
        "filename": "notes.txt",
        "file_data": "data:text/plain;base64," + base64.b64encode(DENIED.encode()).decode()}}])),
    "responses_input_file_mislabelled": ("/v1/responses", {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_file", "filename": "a.pdf",
                                      "file_data": "data:application/pdf;base64,"
                                      + base64.b64encode(DENIED.encode()).decode()}]}]}),
    "anthropic_base64_csv_document": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "text/csv",
                                            "data": base64.b64encode(
                                                f"a,b\n1,{DENIED}\n".encode()).decode()}}]}]}),
    "tool_arguments_json_escape": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "tool_calls": [dict(CALL, function={
            "name": "search", "arguments": '{"q": "project \\u006eightingale"}'})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]}),
    "tool_arguments_split_values": ("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "assistant", "tool_calls": [dict(CALL, function={
            "name": "search", "arguments": json.dumps({"a": "project", "b": "nightingale"})})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]}),
    "tool_arguments_key": ("/v1/responses", {"model": "m", "input": [
        {"type": "function_call", "call_id": "c", "name": "f",
         "arguments": json.dumps({DENIED: True})},
        {"type": "function_call_output", "call_id": "c", "output": "ok"}]}),
}


@pytest.mark.parametrize("case", list(FIELDS))
def test_denied_phrase_in_any_field_the_model_reads(case, gw, llm, token):
    path, doc = FIELDS[case]
    before = len(llm.requests)
    resp = httpx.post(gw.url + path, json=doc, headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    if case != "ungoverned_endpoint":
        assert record["reasons"][0]["rule"] == "deny.codename", record


def test_two_content_type_headers_are_refused(gw, llm, token):
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=PLAIN,
                      headers=[("authorization", f"Bearer {token}"),
                               ("content-type", "application/json"),
                               ("content-type", "text/plain")])
    assert_refused(gw, llm, before, resp, 415)


def test_chunked_transfer_encoding_is_read_whole(gw, llm, token):
    def pieces():
        for i in range(0, len(PLAIN), 7):
            yield PLAIN[i:i + 7]

    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=pieces(),
                      headers={"authorization": f"Bearer {token}", **JSON})
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert_refused(gw, llm, before, resp, 403)


def test_clean_request_still_passes(gw, llm, token):
    # the control: the same gateway lets an innocent prompt through, so the refusals above are
    # the policy's and not a broken setup
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=gzip.compress(body(chat("hello"))),
                      headers={"authorization": f"Bearer {token}", **JSON,
                               "content-encoding": "gzip"})
    assert resp.status_code == 200, resp.text
    assert len(llm.requests) == before + 1


def read_stream(gw: Gateway, token: str, path: str, doc: dict) -> tuple[str, str]:
    with httpx.stream("POST", gw.url + path, json=doc, headers={"authorization": f"Bearer {token}"},
                      timeout=30) as resp:
        assert resp.status_code == 200
        return resp.read().decode(), resp.headers["x-douane-decision-id"]


def delivered(sse: str) -> str:
    """The answer text the client received, from chat or responses delta events."""
    out = ""
    for line in sse.splitlines():
        if not line.startswith("data: {"):
            continue
        doc = json.loads(line[6:])
        if doc.get("type") == "response.output_text.delta":
            out += doc["delta"]
        elif doc.get("choices"):
            out += doc["choices"][0]["delta"].get("content") or ""
    return out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_denied_answer_split_across_sse_events_is_cut(gw, llm, token, path):
    llm.reply, llm.chunk_size = "The codename is Project Nightingale, keep it quiet.", 3
    try:
        doc = {"model": "gpt-4o-mini", "stream": True, **(
            {"input": "codename?"} if path.endswith("responses") else chat("codename?"))}
        text, decision_id = read_stream(gw, token, path, doc)
    finally:
        llm.reply, llm.chunk_size = "Hello from the fake upstream.", 4
    answer = delivered(text)
    assert answer.startswith("The codename is")  # the stream did flow until the phrase
    assert "nightingale" not in answer.lower() and "quiet" not in answer
    assert "blocked by policy" in text and decision_id in text
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and record["reasons"][0]["rule"] == "deny.codename"


TWO_BLOCKS = ("The codename is Project Night", "ingale, keep it quiet.")


def sse_answer(events: list[str]):
    def answer(handler, _doc) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for event in events:
            data = event.encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")
    return answer


@pytest.mark.parametrize("api", ["anthropic", "responses"])
def test_denied_answer_split_across_two_streamed_blocks_is_cut(gw, llm, token, api):
    """Deny rules matched each streamed block (an Anthropic content block, a Responses output
    part) alone: `Project Night` ending one and `ingale` starting the next reached the client,
    which shows them as one text (a whole answer joins them and is blocked)."""
    split = functools.partial(_pieces, size=3)
    if api == "anthropic":
        message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "c",
                   "content": [{"type": "text", "text": t} for t in TWO_BLOCKS],
                   "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 5, "output_tokens": 7}}
        path, doc = "/anthropic/v1/messages", {"model": "c", "max_tokens": 50, "stream": True,
                                               "messages": [{"role": "user", "content": "?"}]}
        events = anthropic_stream(message, split)
    else:
        response = {"id": "resp_x", "object": "response", "status": "completed", "model": "m",
                    "output": [{"id": "msg_x", "type": "message", "role": "assistant",
                                "status": "completed", "content": [
                                    {"type": "output_text", "text": t, "annotations": []}
                                    for t in TWO_BLOCKS]}]}
        path, doc = "/v1/responses", {"model": "m", "input": "?", "stream": True}
        events = responses_stream(response, split)
    llm.answer = sse_answer(events)
    try:
        text, decision_id = read_stream(gw, token, path, doc)
    finally:
        llm.answer = None
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    shown = "".join(e["delta"]["text"] if e["type"] == "content_block_delta" else e["delta"]
                    for e in events if e["type"] in ("content_block_delta",
                                                     "response.output_text.delta"))
    assert shown.startswith("The codename is") and "ingale" not in shown, shown
    assert "blocked by policy" in text and decision_id in text
    assert gw.audit_record(decision_id)["reasons"][0]["rule"] == "deny.codename"


def test_denied_answer_is_caught_in_a_plain_response(gw, llm, token):
    llm.reply = "Sure: PROJECT\u200b NIGHTINGALE is the codename."
    try:
        resp = httpx.post(gw.url + "/v1/chat/completions", json=chat("codename?"),
                          headers={"authorization": f"Bearer {token}"})
    finally:
        llm.reply = "Hello from the fake upstream."
    assert resp.status_code == 403 and "NIGHTINGALE" not in resp.text
    assert gw.audit_record(resp.headers["x-douane-decision-id"])["action"] == "block"


@pytest.fixture(scope="module")
def proxy_gw(issuer, tls_llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("evasion-h2")
    config = base_config(issuer.url, tls_llm.url, policy={"files": [write_policy(work)]})
    with_claude(config, tls_llm.url)
    # lazy: the client's ALPN (h2) is chosen before the HTTP/1.1-only fake upstream is reached
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true", "--set", "connection_strategy=lazy"],
                 workdir=work / "gw") as gateway:
        yield gateway


class H2Only(ssl.SSLContext):
    """httpx offers http/1.1 before h2 and mitmproxy honours the client's order: offer h2 alone."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(["h2"])


def test_http2_through_the_proxy_is_inspected(proxy_gw, tls_llm, token):
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=proxy_gw.ca_file)
    with httpx.Client(http2=True, proxy=proxy_gw.proxy_url("eve", token), verify=verify) as client:
        ok = client.post(tls_llm.url + "/v1/chat/completions", json=chat("hello"))
        assert ok.http_version == "HTTP/2" and ok.status_code == 200, ok.text
        before = len(tls_llm.requests)
        for content, headers in [(PLAIN, JSON),
                                 (zstandard.compress(PLAIN), {**JSON, "content-encoding": "zstd"}),
                                 (PLAIN, {"content-type": "text/plain"})]:
            resp = client.post(tls_llm.url + "/v1/chat/completions", content=content,
                               headers=headers)
            assert resp.http_version == "HTTP/2"
            assert_refused(proxy_gw, tls_llm, before, resp, 403, 415)


def sse(*docs: dict, done: bool = False) -> bytes:
    out = b"".join(f"event: {d['type']}\ndata: {json.dumps(d)}\n\n".encode() if "type" in d
                   else f"data: {json.dumps(d)}\n\n".encode() for d in docs)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(**delta) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def thinking(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0,
            "delta": {"type": "thinking_delta", "thinking": text}}


def summary(text: str) -> dict:
    return {"type": "response.reasoning_summary_text.delta", "output_index": 0,
            "summary_index": 0, "item_id": "rs", "delta": text}


# the phrase in answer fields the parsers did not read: (path, request, content type, answer)
ANSWERS: dict[str, tuple[str, dict, str, bytes]] = {
    "chat_message_refusal": ("/v1/chat/completions", chat("hi"), "application/json", body({
        "id": "c", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                             "message": {"role": "assistant",
                                                                         "content": None,
                                                                         "refusal": DENIED}}]})),
    "anthropic_thinking": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}]}, "application/json", body({
            "id": "m", "type": "message", "role": "assistant", "content": [
                {"type": "thinking", "thinking": DENIED, "signature": "c2ln"},
                {"type": "text", "text": "ok"}]})),
    "responses_reasoning_summary": ("/v1/responses", {"model": "m", "input": "hi"},
                                    "application/json", body({"id": "r", "output": [
                                        {"type": "reasoning", "id": "rs", "summary": [
                                            {"type": "summary_text", "text": DENIED}]}]})),
    "chat_stream_delta_refusal": ("/v1/chat/completions", dict(chat("hi"), stream=True),
                                  "text/event-stream", sse(chunk(refusal="I cannot discuss proj"),
                                                           chunk(refusal="ect nightin"),
                                                           chunk(refusal="gale, sorry."),
                                                           done=True)),
    "chat_stream_tool_arguments_escape": ("/v1/chat/completions", dict(chat("hi"), stream=True),
                                          "text/event-stream", sse(*(chunk(tool_calls=[{
                                              "index": 0, "function": {"arguments": part}}])
                                              for part in ['{"q": "proj', 'ect \\u00',
                                                           '6eightingale"}']), done=True)),
    "anthropic_stream_thinking_delta": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        "text/event-stream", sse(
            {"type": "message_start", "message": {"id": "m", "type": "message", "content": []}},
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "thinking", "thinking": ""}},
            thinking("Thinking about proj"), thinking("ect nightin"), thinking("gale now."),
            {"type": "content_block_stop", "index": 0}, {"type": "message_stop"})),
    "responses_stream_reasoning_summary": ("/v1/responses", {"model": "m", "input": "hi",
                                                             "stream": True},
                                           "text/event-stream", sse(
        summary("Summary: proj"), summary("ect nightin"), summary("gale it is."),
        {"type": "response.reasoning_summary_text.done", "output_index": 0, "summary_index": 0,
         "text": f"Summary: {DENIED} it is."},
        {"type": "response.completed", "response": {"id": "r", "output": [
            {"type": "reasoning", "id": "rs", "summary": [
                {"type": "summary_text", "text": f"Summary: {DENIED} it is."}]}]}})),
    "responses_stream_unknown_event": ("/v1/responses", {"model": "m", "input": "hi",
                                                         "stream": True}, "text/event-stream",
                                       sse({"type": "response.future_thing.done",
                                            "output_index": 0, "note": f"about {DENIED}"})),
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_denied_phrase_in_any_answer_field_is_withheld(case, gw, llm, token):
    path, request, ctype, answer = ANSWERS[case]
    llm.canned[path] = (ctype, answer)
    try:
        resp = httpx.post(gw.url + path, json=request, headers={"authorization": f"Bearer {token}"},
                          timeout=30)
    finally:
        del llm.canned[path]
    assert "nightingale" not in resp.text.lower()
    if ctype == "text/event-stream":  # the stream is cut with the API's error event
        assert resp.status_code == 200 and "blocked by policy" in resp.text
    else:
        assert resp.status_code == 403
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "block" and record["reasons"][0]["rule"] == "deny.codename"


# hosted tools: none unless a grant names the kind (the default grant has tools: true) or the URL
HOSTED: dict[str, tuple[str, dict, str]] = {
    "responses_mcp_server": ("/v1/responses", {"model": "m", "input": "hi", "tools": [
        {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp",
         "require_approval": "never"}]}, "grant.mcp_server"),
    "responses_web_search": ("/v1/responses", {"model": "m", "input": "hi", "tools": [
        {"type": "web_search"}]}, "grant.hosted_tool"),
    "responses_code_interpreter": ("/v1/responses", {"model": "m", "input": "hi", "tools": [
        {"type": "code_interpreter", "container": {"type": "auto"}}]}, "grant.hosted_tool"),
    "chat_web_search_options": ("/v1/chat/completions", dict(chat("hi"), web_search_options={}),
                                "grant.hosted_tool"),
    "anthropic_mcp_servers": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "mcp_servers": [{"type": "url", "url": "https://evil.example/mcp", "name": "x"}]},
        "grant.mcp_server"),
    "anthropic_web_search": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "grant.hosted_tool"),
}


@pytest.mark.parametrize("case", list(HOSTED))
def test_hosted_tools_need_a_grant(case, gw, llm, token):
    path, doc, rule = HOSTED[case]
    before = len(llm.requests)
    resp = httpx.post(gw.url + path, json=doc, headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == rule


@pytest.mark.parametrize("calls", ["x", 1, [None], ["x"], {"id": "c"}, [{"function": 1}]])
def test_a_malformed_tool_call_in_a_chat_history_is_a_bad_request(gw, llm, token, calls):
    """Red team, stop 28 (a fuzz of every field with other JSON types): `tool_calls` that were not
    a list of objects made the parser raise, so the request was refused 500 `gateway_error` (an
    error record) instead of 400 in the API's shape."""
    doc = chat("hi")
    doc["messages"].append({"role": "assistant", "content": None, "tool_calls": calls})
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=doc,
                      headers={"authorization": f"Bearer {token}"})
    assert_refused(gw, llm, before, resp, 400)


def test_unknown_tool_type_is_refused(gw, llm, token):
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/responses", json={"model": "m", "input": "hi", "tools": [
        {"type": "teleport"}]}, headers={"authorization": f"Bearer {token}"})
    assert_refused(gw, llm, before, resp, 400)


def test_a_granted_hosted_tool_and_mcp_server_pass(gw, llm, issuer):
    token = issuer.mint("sam@corp.example", ["search"])
    doc = {"model": "m", "input": "hi", "tools": [
        {"type": "web_search"},
        {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com/sse"}]}
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/responses", json=doc,
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    assert len(llm.requests) == before + 1
    doc["tools"][1]["server_url"] = "https://mcp.example.com/../admin/sse"
    resp = httpx.post(gw.url + "/v1/responses", json=doc,
                      headers={"authorization": f"Bearer {token}"})
    assert assert_refused(gw, llm, before + 1, resp, 403)["reasons"][0]["rule"] == \
        "grant.mcp_server"


FILE_URL = "https://evil.example/notes.txt"  # fetched by the provider, never read by douane
# files and images given by URL (or by file id) where no parser looks for them
BY_REFERENCE: dict[str, tuple[str, dict]] = {
    "responses_tool_output_file_url": ("/v1/responses", {"model": "m", "input": [
        {"type": "function_call_output", "call_id": "c",
         "output": [{"type": "input_file", "file_url": FILE_URL}]}]}),
    "responses_tool_output_image_url": ("/v1/responses", {"model": "m", "input": [
        {"type": "function_call_output", "call_id": "c",
         "output": [{"type": "input_image", "image_url": FILE_URL}]}]}),
    "anthropic_document_url_in_a_search_result": ("/anthropic/v1/messages", {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "search_result", "source": FILE_URL, "title": "t", "content": [
                    {"type": "document", "source": {"type": "url", "url": FILE_URL}}]}]}]}]}),
}


@pytest.mark.parametrize("case", list(BY_REFERENCE))
def test_files_by_reference_are_media_wherever_they_sit(case, gw, llm, issuer):
    """A group without `media` sends no file: by URL or id inside a tool's output or a prompt
    variable it went out (only message parts were counted), and the provider fetched it. (A
    stored prompt's variables are refused with the stored prompt since: test_differentials.py.)"""
    token = issuer.mint("nina@corp.example", ["nomedia"])
    path, doc = BY_REFERENCE[case]
    before = len(llm.requests)
    resp = httpx.post(gw.url + path, json=doc, headers={"authorization": f"Bearer {token}"})
    assert assert_refused(gw, llm, before, resp, 403)["reasons"][0]["rule"] == "grant.media"
    resp = httpx.post(gw.url + "/v1/responses", json={"model": "m", "input": "hi"},
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text  # the control: text alone passes


# (path, body, status): a bound read from one field while the upstream reads another, or a number
# no JSON parser holds
CAPPED: dict[str, tuple[str, dict, int]] = {
    "responses_max_tokens_beside_max_output_tokens": ("/v1/responses", {
        "model": "m", "input": "hi", "max_tokens": 10, "max_output_tokens": 100000}, 403),
    "chat_max_completion_tokens_beside_max_tokens": ("/v1/chat/completions", dict(
        chat("hi"), max_completion_tokens=10, max_tokens=100000), 403),
    "chat_infinite_max_tokens": ("/v1/chat/completions", dict(chat("hi"), max_tokens=1e999),
                                 400),
    "chat_infinite_temperature": ("/v1/chat/completions", dict(
        chat("hi"), max_tokens=10, temperature=-1e999), 400),
}


@pytest.mark.parametrize("case", list(CAPPED))
def test_a_token_cap_reads_every_field_the_upstream_may(case, gw, llm, issuer):
    """`max_tokens: 100`: Responses read `max_output_tokens` while douane read `max_tokens` first
    (100,000 tokens went out under a 100 cap); `1e999` (infinity to Python) ended in a 500."""
    token = issuer.mint("cap@corp.example", ["capped"])
    path, doc, status = CAPPED[case]
    before = len(llm.requests)
    resp = httpx.post(gw.url + path, content=body(doc).replace(b"Infinity", b"1e999"),
                      headers={"authorization": f"Bearer {token}", **JSON})
    assert_refused(gw, llm, before, resp, status)


def test_a_key_in_a_text_file_is_refused_and_not_recorded(gw, llm, token, secrets):
    """The key is found in the decoded file; test_z_leaks then finds no `sk-` key in any
    recording, raw or inside base64."""
    key = "sk-proj-" + "Zq8x" * 8
    inside = base64.b64encode(f"OPENAI_API_KEY={key}\n".encode()).decode()
    secrets.update({key, inside})
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat([{"type": "file", "file": {
        "filename": "env.txt", "file_data": f"data:text/plain;base64,{inside}"}}]),
        headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"].startswith("detector.secret."), record


SPLIT_KEY = "sk-proj-" + "Hv3nQ8wLr5Tz" * 3
# the key cut inside its value: neither share is a secret alone, their join is
KEY_SHARES = ("the key is " + SPLIT_KEY[:18], SPLIT_KEY[18:] + " for the deploy.")
SPLIT_PARTS: dict[str, tuple[str, dict]] = {
    "chat content parts": ("/v1/chat/completions", chat(
        [{"type": "text", "text": text} for text in KEY_SHARES])),
    "chat messages in a row": ("/v1/chat/completions", chat(*KEY_SHARES)),
    "responses input parts": ("/v1/responses", {"model": "m", "input": [{
        "role": "user", "content": [{"type": "input_text", "text": t} for t in KEY_SHARES]}]}),
    "responses input items": ("/v1/responses", {"model": "m", "input": [
        {"role": "user", "content": text} for text in KEY_SHARES]}),
    "anthropic content blocks": ("/anthropic/v1/messages", {
        "model": "claude-sonnet-4-5", "max_tokens": 9, "messages": [{"role": "user", "content": [
            {"type": "text", "text": text} for text in KEY_SHARES]}]}),
}


@pytest.mark.parametrize("case", list(SPLIT_PARTS))
def test_a_key_split_across_a_requests_parts_is_refused(case, gw, llm, token, secrets):
    """The secrets detector read each part alone: a key split across two parts in a row (which
    the model reads as one text) reached the upstream. Parts in a row are read together, as an
    answer's blocks are (`streams.read_together`)."""
    secrets.add(SPLIT_KEY)
    _assert_split_key_refused(gw, llm, token, *SPLIT_PARTS[case])


def _assert_split_key_refused(gw, llm, token: str, path: str, doc: dict) -> None:
    """`doc`, with SPLIT_KEY cut across its texts, is refused for the key; the control (the same
    texts, no key across them) passes."""
    before = len(llm.requests)
    resp = httpx.post(gw.url + path, json=doc, headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    reason = record["reasons"][0]
    assert reason["rule"] == "detector.secret.api_key" and ".." in reason["field"], record
    harmless = json.loads(json.dumps(doc).replace(SPLIT_KEY[:18], "sk-proj").replace(
        SPLIT_KEY[18:], " and more"))
    resp = httpx.post(gw.url + path, json=harmless, headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


DISGUISES = {  # a text as the model reads it, in characters the patterns did not read
    "zero-width space": lambda t: t[:10] + "\u200b" + t[10:],
    "soft hyphen": lambda t: t[:3] + "\u00ad" + t[3:],
    "word joiners": "\u2060".join,
    "full-width": _full_width,
    "full-width, a zero-width joiner": lambda t: _full_width(t[:9]) + "\u200d" + t[9:],
    # printable yet shown as nothing (default-ignorable): the view kept them
    "combining grapheme joiner": lambda t: t[:12] + "\u034f" + t[12:],
    "Hangul fillers": lambda t: t[:8] + "\u3164" + t[8:16] + "\u115f" + t[16:] + "\uffa0",
    "variation selectors": lambda t: t[:5] + "\ufe0f" + t[5:11] + "\U000e0101" + t[11:],
    "Mongolian free variation selector": lambda t: t[:14] + "\u180b" + t[14:],
    # invisible: the key written in tag characters (a model may read them, anyone may decode)
    "tag characters": lambda t: "".join(chr(0xE0000 + ord(c)) for c in t),
    "a tag character inside": lambda t: t[:12] + "\U000e0021" + t[12:],
    # visible, yet no key holds one: a model told to drop accents reads the key
    "a combining accent inside": lambda t: t[:12] + "\u0301" + t[12:],
    "every character underlined": lambda t: "".join(c + "\u0332" for c in t),
}


@pytest.mark.parametrize("case", list(DISGUISES))
def test_a_disguised_key_is_refused(case, gw, llm, token, secrets):
    """The secrets detector matched the raw text: a key with invisible format characters inside,
    or in full-width letters, passed. It matches the text's view (NFKC, format characters
    dropped), as deny rules do. The control: an ordinary phrase disguised alike passes."""
    secrets.add(SPLIT_KEY)
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(
        f"deploy with {DISGUISES[case](SPLIT_KEY)} please"),
        headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "detector.secret.api_key", record
    control = DISGUISES[case]("sk-prolog, the 2024 Hv3 notes and more")
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(f"say {control}"),
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


def _tool_turn(assistant: list, answer: str = "done") -> dict:
    """An Anthropic conversation whose assistant turn is `assistant` (ending in a tool call)."""
    return {"model": "claude-sonnet-4-5", "max_tokens": 9, "messages": [
        {"role": "user", "content": "deploy it"}, {"role": "assistant", "content": assistant},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": answer}]}]}


def _call(args: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_1", "name": "deploy", "input": args}


IMAGE = {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}}
SPLIT_IN_ORDER: dict[str, tuple[str, dict]] = {  # what the model reads in sequence, not in a row
    "around an image part": ("/v1/chat/completions", chat(
        [{"type": "text", "text": KEY_SHARES[0]}, IMAGE, {"type": "text", "text": KEY_SHARES[1]}])),
    "responses instructions then input": ("/v1/responses", {
        "model": "m", "instructions": KEY_SHARES[0], "input": KEY_SHARES[1]}),
    "anthropic system then the first message": ("/anthropic/v1/messages", {
        "model": "claude-sonnet-4-5", "max_tokens": 9, "system": KEY_SHARES[0],
        "messages": [{"role": "user", "content": KEY_SHARES[1]}]}),
    "a message then its tool call's arguments": ("/anthropic/v1/messages", _tool_turn(
        [{"type": "text", "text": KEY_SHARES[0]}, _call({"note": KEY_SHARES[1]})])),
    "two argument values": ("/anthropic/v1/messages", _tool_turn(
        [_call({"a": KEY_SHARES[0], "b": KEY_SHARES[1]})])),
}


@pytest.mark.parametrize("case", list(SPLIT_IN_ORDER))
def test_a_key_split_across_what_the_model_reads_in_sequence_is_refused(case, gw, llm, token,
                                                                          secrets):
    """Parts in a row were read together, not texts the model reads in sequence with something
    between or in other fields: a key cut around an image, across instructions and input,
    system and the first message, a message and its tool call, two argument values passed.
    The control: the same documents with no key across the texts."""
    secrets.add(SPLIT_KEY)
    _assert_split_key_refused(gw, llm, token, *SPLIT_IN_ORDER[case])


ORDINARY_NEIGHBOURS: dict[str, tuple[str, dict]] = {  # controls read in sequence: must pass
    "ids in two argument values": ("/anthropic/v1/messages", _tool_turn([_call({
        "owner": "AcmeCorp2024Xy", "repo": "WidgetServiceV2Beta9Q", "ref": "Rel3aseQ7mZ"})])),
    "a base64-ish tail then an id": ("/v1/chat/completions", chat([
        {"type": "text", "text": "the build id is Xq7Lm2Pz9Kd4Wf8"}, IMAGE,
        {"type": "text", "text": "Rt5Nw8Hy3Jb6Vc1Gs failed"}])),
}


@pytest.mark.parametrize("case", list(ORDINARY_NEIGHBOURS))
def test_ordinary_texts_read_in_sequence_are_no_secret(case, gw, llm, token):
    """Across texts read in sequence but not in a row only a key's shape counts: joined, these
    make one high-entropy run (`secrets.find_across` finds it), and pass."""
    path, doc = ORDINARY_NEIGHBOURS[case]
    resp = httpx.post(gw.url + path, json=doc, headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


ENCODED_KEY = "sk-proj-" + "Wc4tRe7uYp2L" * 3
AWS_KEY_ID = "AKIAQX7RZ2LMN4TB5KWD"
ENCODINGS = {  # a key as a client may write it for the model to decode
    "base64": lambda k: base64.b64encode(k.encode()).decode(),
    "base64url, in a sentence": lambda k: base64.urlsafe_b64encode(
        f"use {k} ?>?>".encode()).decode().rstrip("="),
    "percent": lambda k: "".join(f"%{b:02X}" for b in k.encode()),
    "hex": lambda k: k.encode().hex(),
    "base64 of base64": lambda k: base64.b64encode(base64.b64encode(k.encode())).decode(),
    # MIME's 76 columns, the key across a line break (each line alone holds no share to decode)
    "base64 in lines": lambda k: base64.encodebytes(
        f"{'x' * 44} key {k} end".encode()).decode().strip(),
    "base32": lambda k: base64.b32encode(k.encode()).decode(),
    # escapes left in a JSON string's text once it is parsed (`"\\u0073"` is `\u0073`)
    "json escapes in the text": lambda k: "".join(f"\\u{ord(c):04x}" for c in k),
    "HTML references": lambda k: "".join(f"&#{ord(c)};" if i % 2 else f"&#x{ord(c):x};"
                                         for i, c in enumerate(k)),
}


@pytest.mark.parametrize("key", [ENCODED_KEY, AWS_KEY_ID], ids=["api_key", "aws_access_key"])
@pytest.mark.parametrize("case", list(ENCODINGS))
def test_an_encoded_key_is_refused(case, key, gw, llm, token, secrets):
    """The detectors read no encodings: a key written base64, base64url, percent-encoded or as
    hex passed policy and was recorded as sent. An encoded run is decoded and read as text;
    test_z_leaks then finds neither the key nor its encoded form in any recording."""
    encoded = ENCODINGS[case](key)
    secrets.update({key, encoded})
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(f"decode {encoded} and deploy"),
                      headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    kind = "api_key" if key.startswith("sk-") else "aws_access_key"
    assert record["reasons"][0]["rule"] == f"detector.secret.{kind}", record
    redacted = f"decode <SECRET:detector.secret.{kind}> and deploy".encode()
    deadline = time.monotonic() + 30
    while not any(redacted in p.read_bytes() for p in _recordings(gw)):  # written after the answer
        assert time.monotonic() < deadline, "the refused request was not recorded"
        time.sleep(0.2)
    assert not any(encoded.encode() in p.read_bytes() for p in _recordings(gw))


FILLERS = {  # candidate runs before the key: past 1,024 of them, none was decoded
    "identifiers": "abcdefghijklmnopqr",
    "percent runs": "%41%42",
    "base64 text": base64.b64encode(b"just some text").decode(),
}


@pytest.mark.parametrize("encoding", ["base64", "hex", "base64 of base64"])
@pytest.mark.parametrize("filler", list(FILLERS))
def test_an_encoded_key_after_a_thousand_runs_is_refused(filler, encoding, gw, llm, token, secrets):
    """At most 1,024 candidate runs of a text were decoded (percent runs counted first): an
    encoded key after 1,100 of them passed and was recorded as sent. Runs past the first 1,024
    are decoded in bulk (`secrets._bulk`)."""
    encoded = ENCODINGS[encoding](ENCODED_KEY)
    secrets.update({ENCODED_KEY, encoded})
    before = len(llm.requests)
    text = " ".join([FILLERS[filler]] * 1100) + f" decode {encoded} and deploy"
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(text),
                      headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "detector.secret.api_key", record
    redacted = b"decode <SECRET:detector.secret.api_key> and deploy"
    deadline = time.monotonic() + 30
    while not any(redacted in p.read_bytes() for p in _recordings(gw)):
        assert time.monotonic() < deadline, "the refused request was not recorded"
        time.sleep(0.2)
    assert not any(encoded.encode() in p.read_bytes() for p in _recordings(gw))


def _recordings(gw: Gateway) -> list:
    return list((gw.state_dir / "recordings").rglob("*.mitm"))


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8).decode()
ORDINARY_BASE64 = {  # encoded content that holds no secret: passes
    "a PNG data URL": chat([{"type": "text", "text": "what is this?"}, {
        "type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]),
    "a PNG data URL in the text": chat(f"what is data:image/png;base64,{PNG} ?"),
    "a text file": chat([{"type": "file", "file": {"filename": "notes.txt", "file_data": (
        "data:text/plain;base64," + base64.b64encode(b"meeting notes: ship v2 on friday\n" * 40)
        .decode())}}]),
    "base64 and hex in the text": chat(
        "decode " + base64.b64encode(b"the deploy is at noon, token count 4096").decode()
        + " and sha256 " + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
}


@pytest.mark.parametrize("case", list(ORDINARY_BASE64))
def test_ordinary_base64_is_no_secret(case, gw, llm, token):
    """Only a secret in the decoded text refuses: an image, a file, an ordinary encoded text
    pass."""
    resp = httpx.post(gw.url + "/v1/chat/completions", json=ORDINARY_BASE64[case],
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
