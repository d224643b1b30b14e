"""Masking through a real mitmdump with the official SDKs: answers, streams, MCP tool results,
request-side masking, exemptions, fail-closed, and a responsive event loop."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import random
import time

import anthropic
import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from douane.cli import main
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream, Gate
from tests.test_masking_stream import CORPUS

PII = ("Your account manager is Maria Garcia. Reach her at maria.garcia@example.com or "
       "212-555-0147; the card on file is 4111 1111 1111 1111.")
SECRETS = ("maria.garcia@example.com", "212-555-0147", "4111 1111 1111 1111", "Maria Garcia")


@pytest.fixture(scope="module")
def setup(issuer, mcp_server, tmp_path_factory):
    llm = FakeUpstream()
    llm.reply = PII
    big = FakeUpstream()
    big.reply = (PII + " ") * 1400  # ~190 KB of text with PII all through it: about a second
    config = base_config(issuer.url, llm.url, masking={
        "workers": 2, "requests": True, "exempt_groups": ["privacy-officers"],
        "allow_list": ["S3", "EKS"],
        "timeout_seconds": 120})  # the 190 KB answer takes seconds on a loaded 2-core CI machine
    config["upstreams"]["claude"] = {"url": llm.url + "/anthropic", "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["upstreams"]["crm"] = {"url": mcp_server + "/mcp", "protocol": "mcp"}
    config["upstreams"]["big"] = {"url": big.url + "/v1", "protocol": "openai"}
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("masking")) as gw:
        gw.big = big
        yield gw, llm
    llm.close()
    big.close()


def openai_client(gw, llm, token) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm.url + "/v1", api_key="unused", max_retries=0,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url("u", token)))


def assert_masked(text: str) -> None:
    for value in SECRETS:
        assert value not in text
    assert "<EMAIL_ADDRESS>" in text and "<CREDIT_CARD>" in text and "<PERSON>" in text


def test_openai_answer_is_masked(setup, issuer):
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "?"}])
    assert_masked(raw.parse().choices[0].message.content)
    record = gw.audit_record(raw.headers["x-douane-decision-id"])
    assert record["masked"]["CREDIT_CARD"] == 1 and record["action"] == "mask"
    assert "4111" not in gw.audit_file().read_text()


def test_streamed_answer_is_masked_even_when_values_are_split(setup, issuer):
    gw, llm = setup
    llm.chunk_size, llm.chunk_delay = 3, 0.02  # every value crosses several deltas
    try:
        c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
        stream = c.chat.completions.create(model="gpt-4o", stream=True,
                                           messages=[{"role": "user", "content": "?"}])
        deltas = [ch.choices[0].delta.content for ch in stream
                  if ch.choices and ch.choices[0].delta.content]
    finally:
        llm.chunk_size, llm.chunk_delay = 4, 0.0
    assert_masked("".join(deltas))
    assert len(deltas) > 5  # still a stream, released as analysis completes, not one final chunk


def test_anthropic_answer_and_stream_are_masked(setup, issuer):
    gw, llm = setup
    token = issuer.mint("alice@corp", ["engineering"])
    c = anthropic.Anthropic(base_url=llm.url + "/anthropic", api_key="unused", max_retries=0,
                            http_client=anthropic.DefaultHttpxClient(proxy=gw.proxy_url("u", token)))
    reply = c.messages.create(model="claude-test", max_tokens=100,
                              messages=[{"role": "user", "content": "?"}])
    assert_masked(reply.content[0].text)
    with c.messages.stream(model="claude-test", max_tokens=100,
                           messages=[{"role": "user", "content": "?"}]) as stream:
        assert_masked("".join(stream.text_stream))


def test_mcp_tool_result_is_masked(setup, issuer, mcp_server):
    gw, _ = setup
    proxy = gw.proxy_url("u", issuer.mint("alice@corp", ["engineering"]))

    async def run():
        async with Client(streamable_http_client(
                mcp_server + "/mcp", http_client=httpx2.AsyncClient(proxy=proxy))) as c:
            return await c.call_tool("lookup_customer", {"customer_id": "42"})

    text = asyncio.run(run()).content[0].text
    assert "john.smith@example.com" not in text and "4111 1111 1111 1111" not in text
    assert "<EMAIL_ADDRESS>" in text and "Customer 42" in text


def test_an_answer_in_speech_is_refused_while_masking_applies(setup, issuer):
    """`modalities: ["audio"]`: the model says the answer (names, card numbers) in an audio file
    no analyser hears; only its transcript was masked (red team, stop 27). Refused before the
    upstream; an exempt group may ask for it."""
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    before = len(llm.requests)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        c.chat.completions.create(model="gpt-4o-audio-preview", modalities=["text", "audio"],
                                  audio={"voice": "alloy", "format": "wav"},
                                  messages=[{"role": "user", "content": "?"}])
    assert len(llm.requests) == before
    record = gw.audit_record(caught.value.response.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"] == "mask.spoken", record
    exempt = openai_client(gw, llm, issuer.mint("pat@corp", ["privacy-officers"]))
    exempt.chat.completions.create(model="gpt-4o-audio-preview", modalities=["text", "audio"],
                                   audio={"voice": "alloy", "format": "wav"},
                                   messages=[{"role": "user", "content": "?"}])
    assert len(llm.requests) == before + 1


def test_a_text_file_in_an_answer_holding_a_value_is_refused(setup, issuer):
    """An answer that is a text file (a data URL) holding an address: policy read the decoded
    text, masking skipped it (it edits text in place, and a file's is base64), so the address
    left unmasked (red team, stop 27). Refused now; a file holding no value passes."""
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    file = "data:text/plain;base64," + base64.b64encode(
        b"Reach John Smith at john.smith@example.com").decode()
    llm.reply = file
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "?"}])
        assert caught.value.status_code == 502 and file not in caught.value.response.text
        record = gw.audit_record(caught.value.response.headers["x-douane-decision-id"])
        assert record["reasons"][0]["rule"] == "mask.file", record
        llm.reply = "data:text/plain;base64," + base64.b64encode(b"nothing to see").decode()
        reply = c.chat.completions.create(model="gpt-4o",
                                          messages=[{"role": "user", "content": "?"}])
        assert reply.choices[0].message.content == llm.reply
    finally:
        llm.reply = PII


def test_exempt_group_sees_the_original(setup, issuer):
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("pat@corp", ["privacy-officers"]))
    reply = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "?"}])
    assert reply.choices[0].message.content == PII


def test_request_side_masking_keeps_the_value_from_the_upstream(setup, issuer):
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    before = len(llm.requests)
    c.chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": "Email bob.jones@example.org about our S3 bucket"}])
    (sent,) = llm.requests[before:]
    content = sent.json()["messages"][0]["content"]
    assert "<EMAIL_ADDRESS> about our S3 bucket" in content  # S3 is on the allow-list
    assert b"bob.jones" not in llm.received_bytes()


def test_a_text_file_in_a_prompt_holding_a_value_is_refused(setup, issuer):
    """With `masking.requests`, a prompt's text file (a `file` part's data URL) holding an address
    went to the upstream as sent: masking edits text in place and skipped the decoded file (red
    team, stop 27). Refused before the upstream now."""
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    data = base64.b64encode(b"Email bob.jones@example.org about it").decode()
    before = len(llm.requests)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
            {"type": "text", "text": "summarise"},
            {"type": "file", "file": {"filename": "a.txt",
                                      "file_data": f"data:text/plain;base64,{data}"}}]}])
    assert len(llm.requests) == before
    record = gw.audit_record(caught.value.response.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"] == "mask.file", record


def test_event_loop_stays_responsive_while_a_large_answer_is_masked(setup, issuer):
    gw, llm = setup
    token = issuer.mint("alice@corp", ["engineering"])
    c = openai_client(gw, llm, token)
    asked = len(gw.big.requests)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(lambda: openai_client(gw, gw.big, token).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "?"}]))
        while len(gw.big.requests) == asked:  # answered upstream at once: now being analysed
            time.sleep(0.005)
        started = time.monotonic()
        llm.reply = "Call 212-555-0147"  # needs analysis too, by the other worker
        try:
            quick = c.chat.completions.create(model="gpt-4o",
                                              messages=[{"role": "user", "content": "?"}])
        finally:
            llm.reply = PII
        quick_done = time.monotonic()
        big_still_masked = not slow.done()
        slow_result = slow.result(timeout=120)
        slow_done = time.monotonic()
    assert quick.choices[0].message.content == "Call <PHONE_NUMBER>"
    # the tiny request finished long before the big one: it did not wait behind the masking
    assert big_still_masked
    assert quick_done - started < (slow_done - started) / 3
    assert "maria.garcia@example.com" not in slow_result.choices[0].message.content


def test_refusals_thinking_and_reasoning_summaries_are_masked(setup, issuer):
    """Answer fields no parser named (found by the walk over the body, or streamed as their own
    delta channels) are masked like the answer text."""
    gw, llm = setup
    proxy = gw.proxy_url("u", issuer.mint("alice@corp", ["engineering"]))
    refusal = {"id": "c", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": None, "refusal": PII}}]}
    halves = [PII[:40], PII[40:75], PII[75:]]
    thinking = b"".join(f"event: {d['type']}\ndata: {json.dumps(d)}\n\n".encode() for d in [
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": ""}},
        *({"type": "content_block_delta", "index": 0,
           "delta": {"type": "thinking_delta", "thinking": h}} for h in halves),
        {"type": "content_block_stop", "index": 0}, {"type": "message_stop"}])
    summary = {"id": "r", "output": [{"type": "reasoning", "id": "rs", "summary": [
        {"type": "summary_text", "text": PII}]}]}
    cases = [("/v1/chat/completions", "application/json", json.dumps(refusal).encode()),
             ("/anthropic/v1/messages", "text/event-stream", thinking),
             ("/v1/responses", "application/json", json.dumps(summary).encode())]
    with httpx.Client(proxy=proxy, timeout=60) as client:
        for path, ctype, answer in cases:
            llm.canned[path] = (ctype, answer)
            try:
                resp = client.post(llm.url + path, json={"model": "m", "max_tokens": 9, "input": "?",
                                                         "messages": [{"role": "user",
                                                                       "content": "?"}]})
            finally:
                del llm.canned[path]
            assert resp.status_code == 200, resp.text
            assert_masked(resp.text)


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SECRET_ANSWER = (f"Your keys: aws_access_key_id = AKIAIOSFODNN7EXAMPLE and aws_secret_access_key = "
                 f"{AWS_SECRET} . The Stripe key is sk_live_51HxYzABCdefGHIjklMNOpqr and the "
                 "database postgres://app:Sup3r-S3cret@db.internal:5432/app works.")
SECRET_VALUES = ("AKIAIOSFODNN7EXAMPLE", AWS_SECRET, "sk_live_51HxYzABCdefGHIjklMNOpqr",
                 "Sup3r-S3cret")


def test_a_secret_in_an_answer_is_masked_in_every_api_and_mode(setup, issuer):
    """What the recording redacts (douane.secrets) never reaches the user either."""
    gw, llm = setup
    token = issuer.mint("alice@corp", ["engineering"])
    llm.reply, llm.chunk_size = SECRET_ANSWER, 5
    try:
        c = openai_client(gw, llm, token)
        ask = [{"role": "user", "content": "?"}]
        answers = {
            "chat": c.chat.completions.create(model="m", messages=ask).choices[0].message.content,
            "chat stream": "".join(ch.choices[0].delta.content or "" for ch in
                                   c.chat.completions.create(model="m", messages=ask, stream=True)
                                   if ch.choices),
            "responses": c.responses.create(model="m", input="?").output_text,
            "responses stream": "".join(e.delta for e in c.responses.create(
                model="m", input="?", stream=True) if e.type == "response.output_text.delta"),
        }
        a = anthropic.Anthropic(base_url=llm.url + "/anthropic", api_key="unused", max_retries=0,
                                http_client=anthropic.DefaultHttpxClient(
                                    proxy=gw.proxy_url("u", token)))
        answers["messages"] = a.messages.create(model="c", max_tokens=100,
                                                messages=ask).content[0].text
        with a.messages.stream(model="c", max_tokens=100, messages=ask) as stream:
            answers["messages stream"] = "".join(stream.text_stream)
    finally:
        llm.reply, llm.chunk_size = PII, 4
    for mode, text in answers.items():
        assert not [v for v in SECRET_VALUES if v in text], mode
        assert "<PASSWORD>" in text and "<API_KEY>" in text, (mode, text)
        if "stream" not in mode:  # a stream may see the key without its name (masking/streaming)
            assert "<AWS_SECRET_KEY>" in text, (mode, text)


def test_douane_mask_prints_what_the_gateway_answers(setup, issuer, tmp_path, capsys):
    """`douane mask` with the gateway's config: the same text, the same masked result."""
    gw, llm = setup
    sample = ("Hi Natália,\nname,city,ssn\nPellegrino Tosi,Lyon,536-80-4172\nCall +55 11 98765-4321 "
              f"or write to joao.silva@example.com.br; aws_secret_access_key: {AWS_SECRET}")
    llm.reply = sample
    try:
        c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
        answer = c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "?"}]).choices[0].message.content
    finally:
        llm.reply = PII
    (tmp_path / "sample.txt").write_text(sample)
    capsys.readouterr()
    assert main(["mask", "--config", str(gw.config_file), str(tmp_path / "sample.txt")]) == 0
    assert capsys.readouterr().out == answer
    assert "Pellegrino" not in answer and AWS_SECRET not in answer and "98765" not in answer


def test_a_stream_at_a_models_pace_is_masked_exactly_as_the_whole_answer(setup, issuer):
    """Through the real gateway: each answer unstreamed, then streamed in 1-8 character deltas a
    few milliseconds apart (analyses finish between deltas); the client reads the same text."""
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    rng = random.Random(16)
    texts = [t for t in CORPUS if len(t) < 200]
    compared = streamed_in = 0
    try:
        for text in texts:
            llm.reply = text
            whole = c.chat.completions.create(model="gpt-4o", messages=[
                {"role": "user", "content": "?"}]).choices[0].message.content
            assert whole != text or "Nothing sensitive" in text
            llm.chunk_size = [rng.randint(1, 8) for _ in range(64)]
            llm.chunk_delay = rng.choice([0.002, 0.005, 0.01])
            stream = c.chat.completions.create(model="gpt-4o", stream=True,
                                               messages=[{"role": "user", "content": "?"}])
            deltas = [ch.choices[0].delta.content for ch in stream
                      if ch.choices and ch.choices[0].delta.content]
            assert "".join(deltas) == whole, text
            compared += 1
            streamed_in += len(deltas) > 3  # released as it came, not in one piece at the end
            llm.chunk_size, llm.chunk_delay = 4, 0.0
    finally:
        llm.reply, llm.chunk_size, llm.chunk_delay = PII, 4, 0.0
    # at this pace the analyses finish between deltas, so text leaves before the end (how much
    # depends on the machine's load; test_streamed_answer_is_masked... holds the stream to more)
    assert compared == len(texts) >= 15 and streamed_in > 0


def test_a_full_form_ipv6_in_a_json_answer_is_masked(setup, issuer):
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    llm.reply = '{"client_ip": "2001:0db8:85a3:0000:0000:8a2e:0370:7334"}'
    try:
        reply = c.chat.completions.create(model="gpt-4o",
                                          messages=[{"role": "user", "content": "?"}])
    finally:
        llm.reply = PII
    assert reply.choices[0].message.content == '{"client_ip": "<IP_ADDRESS>"}'


def test_the_first_words_of_a_masked_stream_leave_without_waiting_for_the_window(setup, issuer):
    """A model that has sent `Sure` and `. Th` and then nothing yet: `Sure. ` reaches the client
    as soon as the second token shows the word is complete, not once 32 more characters and 5
    words arrived (the window the rest waits for: 10 tokens here). The answer is still masked
    whole."""
    gw, llm = setup
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    text = "Sure. The account belongs to Maria Garcia, maria.garcia@example.com."
    gate = Gate(after=3)  # the role, "Sure", ". Th": the rest once the client has read a word
    try:
        llm.reply = text
        whole = c.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "?"}]).choices[0].message.content
        llm.chunk_size, llm.gate = 4, gate
        stream = c.chat.completions.create(model="gpt-4o", stream=True,
                                           messages=[{"role": "user", "content": "?"}])
        deltas = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                gate.open()
                deltas.append(chunk.choices[0].delta.content)
    finally:
        llm.reply, llm.chunk_size, llm.gate = PII, 4, None
        gate.open()
    assert gate.reached.is_set() and not gate.late, "the first word waited for more tokens"
    assert deltas[0] == "Sure. ", deltas[:2]
    assert "".join(deltas) == whole and "Maria" not in whole


def test_a_stream_douane_cannot_read_is_refused_without_the_upstreams_body(setup, issuer):
    """An SSE answer to an operation douane has no stream format for (legacy completions) is
    refused on its headers: mitmproxy then still reads the upstream's body into the response, so
    the refusal carried the unmasked answer to the client with the refusal's status."""
    gw, llm = setup
    event = json.dumps({"id": "c", "object": "text_completion", "choices": [
        {"index": 0, "text": PII, "finish_reason": None}]})
    llm.canned["/v1/completions"] = ("text/event-stream",
                                     f"data: {event}\n\ndata: [DONE]\n\n".encode())
    try:
        resp = httpx.post(llm.url + "/v1/completions", timeout=60,
                          json={"model": "gpt-3.5-turbo-instruct", "prompt": "?", "stream": True},
                          proxy=gw.proxy_url("u", issuer.mint("alice@corp", ["engineering"])))
    finally:
        del llm.canned["/v1/completions"]
    assert resp.status_code == 502, resp.text[:300]
    for value in SECRETS:
        assert value not in resp.text
    assert "unsupported_stream" in resp.text
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "refuse"


def test_a_value_behind_json_escapes_in_tool_arguments_is_masked(setup, issuer):
    """Tool arguments are JSON text: `maria.garcia\\u0040example.com` is the address to the tool
    that parses them. Whole answers (chat, Responses), a stream whose escape is cut between two
    deltas, and (masking requests) the arguments of the history sent upstream: the client and
    the upstream parse no address out of them. Before, each passed unmasked."""
    gw, llm = setup
    email, escaped = "maria.garcia@example.com", "maria.garcia\\u0040example.com"
    args = '{"to": "' + escaped + '", "cc": "' + "".join(f"\\u{ord(c):04x}" for c in email) + '"}'
    chat = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": "t", "type": "function", "function": {"name": "send", "arguments": args}}]}}]}
    responses = {"id": "r", "object": "response", "created_at": 0, "status": "completed",
                 "model": "m", "output": [{"type": "function_call", "id": "fc", "call_id": "t",
                                           "name": "send", "arguments": args}]}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    pieces = ['{"to": "maria.garcia\\u00', '40example.com', '"}']  # the escape cut in two
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "t", "type": "function",
         "function": {"name": "send", "arguments": ""}}]}}]}]
    events += [{**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": p}}]}}]} for p in pieces]
    events += [{**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    stream = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
    c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    ask = [{"role": "user", "content": "?"}]
    llm.canned["/v1/chat/completions"] = ("application/json", json.dumps(chat).encode())
    llm.canned["/v1/responses"] = ("application/json", json.dumps(responses).encode())
    try:
        got = [c.chat.completions.create(model="m", messages=ask).choices[0].message
               .tool_calls[0].function.arguments,
               c.responses.create(model="m", input="?").output[0].arguments]
        llm.canned["/v1/chat/completions"] = ("text/event-stream", stream)
        got.append("".join(ch.choices[0].delta.tool_calls[0].function.arguments or ""
                           for ch in c.chat.completions.create(model="m", messages=ask,
                                                               stream=True)
                           if ch.choices and ch.choices[0].delta.tool_calls))
    finally:
        del llm.canned["/v1/chat/completions"], llm.canned["/v1/responses"]
    for text in got:
        assert email not in json.dumps(json.loads(text), ensure_ascii=False), text
        assert "<EMAIL_ADDRESS>" in text, text
    before = len(llm.requests)
    c.chat.completions.create(model="m", messages=[*ask, chat["choices"][0]["message"], {
        "role": "tool", "tool_call_id": "t", "content": "sent"}])
    (sent,) = llm.requests[before:]
    history = sent.json()["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert email not in json.dumps(json.loads(history), ensure_ascii=False), history


def test_sse_comments_carry_no_text_and_a_keep_alive_stays_one(setup, issuer):
    """An SSE comment line (`: text`) is read by no stage: its text reached the client unmasked.
    A comment-only block (a keep-alive) was re-sent with an empty `data:` line, an event the
    openai SDK fails to parse. Now a comment is a bare `:` and no data is added."""
    gw, llm = setup
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def event(text: str) -> str:
        return "data: " + json.dumps({**chunk, "choices": [
            {"index": 0, "delta": {"content": text}, "finish_reason": None}]}) + "\n\n"
    body = event("Hello") + ": maria.garcia@example.com\n\n" + event(" there") + \
        ": keep-alive\n\n" + "data: [DONE]\n\n"
    llm.canned["/v1/chat/completions"] = ("text/event-stream", body.encode())
    token = issuer.mint("alice@corp", ["engineering"])
    ask = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "?"}]}
    try:
        raw = httpx.post(llm.url + "/v1/chat/completions", json=ask, timeout=60,
                         proxy=gw.proxy_url("u", token)).text
        c = openai_client(gw, llm, token)
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(**ask) if ch.choices)
    finally:
        del llm.canned["/v1/chat/completions"]
    assert "maria.garcia" not in raw and "keep-alive" not in raw and "\n:\n" in raw
    assert text == "Hello there"


def test_log_probabilities_never_leave_however_asked_or_sent(setup, issuer):
    """Log probabilities repeat the answer token by token (`Maria`, ` Garcia`): masking reads
    each token alone and finds no name. `logprobs: 0` asks for them on legacy completions (the
    sampled tokens), and was let through as falsy; an upstream may send them unasked. Both are
    refused (the request before the upstream, the answer before the client)."""
    gw, llm = setup
    proxy = gw.proxy_url("u", issuer.mint("alice@corp", ["engineering"]))
    tokens = ["Maria", " Garcia", " at", " maria", ".g", "arcia", "@", "example", ".com"]
    logprobs = {"tokens": tokens, "token_logprobs": [-0.1] * len(tokens),
                "top_logprobs": [{t: -0.1} for t in tokens], "text_offset": list(range(len(tokens)))}
    chat_logprobs = {"content": [{"token": t, "logprob": -0.1, "bytes": list(t.encode()),
                                  "top_logprobs": []} for t in tokens]}
    completion = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "text": "".join(tokens), "finish_reason": "stop", "logprobs": logprobs}]}
    chat = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": chat_logprobs,
         "message": {"role": "assistant", "content": "".join(tokens)}}]}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    stream = "".join("data: " + json.dumps({**chunk, "choices": [{
        "index": 0, "delta": {"content": t}, "finish_reason": None,
        "logprobs": {"content": [{"token": t, "logprob": -0.1, "bytes": list(t.encode()),
                                  "top_logprobs": []}]}}]}) + "\n\n" for t in tokens)
    with httpx.Client(proxy=proxy, timeout=60) as client:
        before = len(llm.requests)
        resp = client.post(llm.url + "/v1/completions",
                           json={"model": "gpt-3.5-turbo-instruct", "prompt": "?", "logprobs": 0})
        assert resp.status_code == 400 and len(llm.requests) == before, resp.text[:300]
        record = gw.audit_record(resp.headers["x-douane-decision-id"])
        assert record["action"] == "refuse" and \
            [r["rule"] for r in record["reasons"]] == ["protocol.logprobs_refused"]
        answers = [("/v1/completions", "application/json", json.dumps(completion),
                    {"model": "gpt-3.5-turbo-instruct", "prompt": "?"}),
                   ("/v1/chat/completions", "application/json", json.dumps(chat),
                    {"model": "m", "messages": [{"role": "user", "content": "?"}]}),
                   ("/v1/chat/completions", "text/event-stream", stream + "data: [DONE]\n\n",
                    {"model": "m", "stream": True,
                     "messages": [{"role": "user", "content": "?"}]})]
        for path, ctype, answer, ask in answers:
            llm.canned[path] = (ctype, answer.encode())
            try:
                resp = client.post(llm.url + path, json=ask)
            finally:
                del llm.canned[path]
            assert "arcia" not in resp.text and "log probabilities" in resp.text, resp.text[:300]
            record = gw.audit_record(resp.headers["x-douane-decision-id"])
            assert record["action"] == "refuse", record


def test_a_value_split_across_an_answers_blocks_is_masked(setup, issuer):
    """An answer's text blocks are read as one text (Anthropic splits an answer into blocks
    around its citations; Responses into parts): `maria.garcia@` | `example.com`, `212-555` |
    `-0147` reached the client unmasked, each block analysed alone."""
    gw, llm = setup
    blocks = ["Write to maria.garcia@", "example.com or call 212-555", "-0147 today."]
    message = {"id": "m", "type": "message", "role": "assistant", "model": "c",
               "stop_reason": "end_turn", "content": [{"type": "text", "text": b}
                                                      for b in blocks]}
    response = {"id": "r", "object": "response", "created_at": 0, "status": "completed",
                "model": "m", "output": [{"type": "message", "id": "o", "role": "assistant",
                                          "status": "completed", "content": [
                                              {"type": "output_text", "text": b, "annotations": []}
                                              for b in blocks]}]}
    token = issuer.mint("alice@corp", ["engineering"])
    cases = [("/anthropic/v1/messages", message, lambda d: [b["text"] for b in d["content"]]),
             ("/v1/responses", response,
              lambda d: [p["text"] for p in d["output"][0]["content"]])]
    with httpx.Client(proxy=gw.proxy_url("u", token), timeout=60) as client:
        for path, answer, texts in cases:
            llm.canned[path] = ("application/json", json.dumps(answer).encode())
            try:
                resp = client.post(llm.url + path, json={
                    "model": "m", "max_tokens": 9, "input": "?",
                    "messages": [{"role": "user", "content": "?"}]})
            finally:
                del llm.canned[path]
            got = texts(resp.json())
            assert len(got) == 3 and got[0].startswith("Write to ") and got[2].endswith(" today.")
            whole = "".join(got)
            assert "garcia" not in whole and "example.com" not in whole and "0147" not in whole
            assert "<EMAIL_ADDRESS>" in whole and "<PHONE_NUMBER>" in whole, whole


BLOCKS = ["Sure. Please email maria.garcia", "@example.com or call 212-555", "-0147 today."]
MASKED_BLOCKS = ["Sure. Please email <EMAIL_ADDRESS>", "<EMAIL_ADDRESS> or call <PHONE_NUMBER>",
                 "<PHONE_NUMBER> today."]
CITATION = {"type": "char_location", "cited_text": "Office hours are 9 to 5.", "document_index": 0,
            "document_title": "Handbook", "start_char_index": 0, "end_char_index": 24}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
           "stop_reason": "tool_use", "stop_sequence": None,
           "usage": {"input_tokens": 5, "output_tokens": 7}, "content": [
               {"type": "thinking", "thinking": "The user asks how to reach us.",
                "signature": "c2lnbmF0dXJl"},
               {"type": "text", "text": BLOCKS[0]},
               {"type": "text", "text": BLOCKS[1], "citations": [CITATION]},
               {"type": "text", "text": BLOCKS[2]},
               {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "hours"}},
               {"type": "text", "text": "Thanks!"}]}
RESPONSE = {"id": "resp_1", "object": "response", "created_at": 0, "status": "completed",
            "model": "m", "output": [
                {"type": "reasoning", "id": "rs_1", "summary": [
                    {"type": "summary_text", "text": "The user asks how to reach us."}]},
                {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": t, "annotations": []}
                             for t in BLOCKS[:2]]},
                {"type": "message", "id": "msg_2", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": BLOCKS[2], "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup",
                 "arguments": '{"q": "hours"}', "status": "completed"}]}


@pytest.mark.parametrize("delay", [0.0, 0.01], ids=["burst", "model pace"])
def test_a_value_split_across_streamed_blocks_is_masked(setup, issuer, delay):
    """An Anthropic stream's text blocks in a row (around a citation) and a Responses stream's
    output parts and messages in a row carry `maria.garcia` | `@example.com`, `212-555` |
    `-0147`: each block was its own channel, its held tail released at its end, so both
    values reached the client. Now the official SDKs read each block masked with its share of
    the value, exactly as the whole answer through the gateway; blocks, indexes, tool calls,
    thinking and citations are the upstream's."""
    gw, llm = setup
    token = issuer.mint("alice@corp", ["engineering"])
    proxy = gw.proxy_url("u", token)
    claude = anthropic.Anthropic(base_url=llm.url + "/anthropic", api_key="unused", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(proxy=proxy))
    gpt = openai_client(gw, llm, token)
    ask = {"model": "m", "max_tokens": 99, "messages": [{"role": "user", "content": "?"}]}
    llm.chunk_size, llm.chunk_delay = 3, delay
    try:
        llm.document = MESSAGE
        whole = claude.messages.create(**ask).model_dump()
        with claude.messages.stream(**ask) as stream:
            deltas = "".join(stream.text_stream)
            streamed = stream.get_final_message().model_dump()
        llm.document = RESPONSE
        whole_r = gpt.responses.create(model="m", input="?").model_dump()
        with gpt.responses.stream(model="m", input="?") as stream:
            deltas_r = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            streamed_r = stream.get_final_response().model_dump()
    finally:
        llm.document, llm.chunk_size, llm.chunk_delay = None, 4, 0.0
    texts = [b["text"] for b in whole["content"] if b["type"] == "text"]
    assert texts == [*MASKED_BLOCKS, "Thanks!"], texts
    assert [b["type"] for b in whole["content"]] == [b["type"] for b in MESSAGE["content"]]
    assert streamed["content"] == whole["content"]  # citations, thinking, tool input too
    assert deltas == "".join(texts)
    parts = [p["text"] for item in whole_r["output"] if item["type"] == "message"
             for p in item["content"]]
    assert parts == MASKED_BLOCKS, parts
    def items(response: dict) -> list:  # (a streamed response's parts have `parsed: None`)
        return [(i["type"], i.get("summary"), i.get("arguments"),
                 [p["text"] for p in i.get("content") or []]) for i in response["output"]]
    assert items(streamed_r) == items(whole_r) and deltas_r == "".join(parts)
    assert [i[0] for i in items(streamed_r)] == [i["type"] for i in RESPONSE["output"]]
    records = [r for r in gw.audit_records() if r.get("masked")][-4:]
    assert all(r["masked"] == {"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 2} for r in records), records


def test_the_last_text_of_a_chunk_that_ends_the_choice_is_masked_with_the_rest(setup, issuer):
    """Servers other than OpenAI's send a choice's last text and its `finish_reason` in one
    chunk. The channel was closed first (its held text released as a whole answer), then that
    text fed alone: `maria.garcia` | `@example.com` reached the client unmasked."""
    gw, llm = setup
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def event(text: str, finish: str | None = None) -> str:
        return "data: " + json.dumps({**chunk, "choices": [
            {"index": 0, "delta": {"content": text}, "finish_reason": finish}]}) + "\n\n"
    body = event("Write to maria.garcia") + event("@example.com or 212-555-0147.", "stop") + \
        "data: [DONE]\n\n"
    llm.canned["/v1/chat/completions"] = ("text/event-stream", body.encode())
    try:
        c = openai_client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
        chunks = [ch for ch in c.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "?"}]) if ch.choices]
    finally:
        del llm.canned["/v1/chat/completions"]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == "Write to <EMAIL_ADDRESS> or <PHONE_NUMBER>.", text
    assert chunks[-1].choices[0].finish_reason == "stop"  # the end still comes last


def test_text_after_a_choice_ended_ends_the_stream(setup, issuer):
    """An upstream that sends more text for a choice after its `finish_reason`: that text was
    masked on a fresh channel with no context (`maria.garcia` | end | `@example.com`), and the
    client, which joins every delta, read the address. Now the stream ends with the API's error
    event before it, audited as a refusal."""
    gw, llm = setup
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def event(text: str, finish: str | None = None) -> str:
        return "data: " + json.dumps({**chunk, "choices": [
            {"index": 0, "delta": {"content": text}, "finish_reason": finish}]}) + "\n\n"
    body = event("Write to maria.garcia") + event("", "stop") + event("@example.com today") + \
        "data: [DONE]\n\n"
    llm.canned["/v1/chat/completions"] = ("text/event-stream", body.encode())
    try:
        resp = httpx.post(llm.url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "?"}]},
            proxy=gw.proxy_url("u", issuer.mint("alice@corp", ["engineering"])))
    finally:
        del llm.canned["/v1/chat/completions"]
    assert "example.com" not in resp.text and "it had ended" in resp.text, resp.text[-300:]
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "refuse", record
