"""The "douane" content view: flows read as conversations, in mitmproxy's own rendering path
(`contentviews.prettify_message`, as mitmweb and mitmdump call it) and in `mitmdump -nr FILE
--flow-detail 3` over recordings made by a real gateway."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import openai
import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow, tutils

from douane.contentview import DouaneContentview
from douane.flowstate import Reason, state
from douane.marks import Mark
from douane.recording import index
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import MITMDUMP, REPO, Gateway, base_config
from tests.support.upstream import FakeUpstream, _responses_events

contentviews.add(DouaneContentview)
JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream"}


def flow(path: str, request: Any, response: bytes | Any, resp_headers: dict[str, str] = JSON,
         meta: dict[str, Any] | None = None) -> http.HTTPFlow:
    body = response if isinstance(response, bytes) else json.dumps(response).encode()
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=path.encode(), host="llm.example",
                                    content=json.dumps(request).encode(),
                                    headers=http.Headers(**JSON)),
                    resp=tutils.tresp(content=body, headers=http.Headers(**resp_headers)))
    if meta is not None:
        f.metadata["douane"] = meta
    return f


def show(f: http.HTTPFlow, side: str) -> str:
    with taddons.context():
        result = contentviews.prettify_message(getattr(f, side), f)
    assert result.view_name == "Douane", result.text  # chosen automatically, over JSON
    return result.text


def sse(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
                   for name, data in events).encode()


def test_chat_turns_tool_calls_results_and_the_decision_at_the_top():
    request = {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "user", "content": "And tomorrow?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}
    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                     "tool_calls": [{
                                                         "id": "call_2", "type": "function",
                                                         "function": {"name": "get_forecast",
                                                                      "arguments": '{"day": 2}'}}]}}]}
    meta = {"decision_id": "dcn_0123", "upstream": "openai",
            "identity": {"user": "alice@corp", "groups": ["eng"], "source": "bearer"},
            "interaction": {"protocol": "openai", "operation": "chat.completions",
                            "model": "gpt-4o"},
            "decision": {"action": "allow", "risk": 35, "reasons": [
                {"rule": "risk.injection", "message": "looks like an injection", "score": 35}]}}
    f = flow("/v1/chat/completions", request, response, meta=meta)
    req = show(f, "request")
    lines = req.splitlines()
    assert lines[0] == "douane ALLOW, risk 35, decision dcn_0123"
    assert "user alice@corp (eng) via bearer" in lines[1] and "model gpt-4o" in lines[1]
    assert "reason: risk.injection: looks like an injection [score 35]" in req
    turns = [line for line in lines if line.startswith("[")]
    assert turns == ["[system] You are terse.", "[user] Weather in Paris?",
                     '[tool call] get_weather({"city": "Paris"})', "[tool result] 18C and sunny",
                     "[user] And tomorrow?", "[tools offered] get_weather"]
    assert '[tool call] get_forecast({"day": 2})' in show(f, "response")


def test_streamed_answers_are_reassembled_with_masked_spans_marked():
    meta = {"decision_id": "dcn_1", "interaction": {"protocol": "openai",
                                                    "operation": "responses", "stream": True},
            "decision": {"action": "mask", "reasons": []},
            "masked": {"EMAIL_ADDRESS": 1, "CREDIT_CARD": 1}}
    text = "Write to <EMAIL_ADDRESS>, card ************1234, <PERSON> stays."
    body = "".join(_responses_events("gpt-4o", [text[i:i + 5] for i in range(0, len(text), 5)]))
    f = flow("/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True}, body.encode(),
             SSE, meta)
    out = show(f, "response")
    assert out.splitlines()[0] == "douane MASK, decision dcn_1"
    assert "masked: CREDIT_CARD x1, EMAIL_ADDRESS x1" in out
    # one turn, whole; only what douane masked is marked (PERSON was not masked here)
    assert ("[assistant, streamed] Write to «EMAIL_ADDRESS», card «************1234», "
            "<PERSON> stays.") in out


def test_anthropic_stream_with_a_tool_use_and_an_unknown_capture_guessed_from_its_path():
    body = sse([("message_start", {"message": {"id": "m", "type": "message", "role": "assistant",
                                               "content": [], "model": "claude"}}),
                ("content_block_start", {"index": 0, "content_block": {"type": "text",
                                                                        "text": ""}}),
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                               "text": "Let me "}}),
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                               "text": "check."}}),
                ("content_block_stop", {"index": 0}),
                ("content_block_start", {"index": 1, "content_block": {
                    "type": "tool_use", "id": "tu_1", "name": "search", "input": {}}}),
                ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                               "partial_json": '{"q": "doua'}}),
                ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                               "partial_json": 'ne"}'}}),
                ("content_block_stop", {"index": 1}),
                ("message_stop", {})])
    request = {"model": "claude", "max_tokens": 10, "system": "Be careful.", "stream": True,
               "messages": [{"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "tu_0", "content": "42 rows"},
                   {"type": "text", "text": "go on"}]}]}
    f = flow("/v1/messages", request, body, SSE)  # no douane metadata: a plain capture
    req = show(f, "request")
    assert req.startswith("douane: no decision recorded")
    assert "[system] Be careful.\n[tool result] 42 rows\n[user] go on" in req
    out = show(f, "response")
    assert "[assistant, streamed] Let me check." in out
    assert '[tool call, streamed] search({"q": "douane"})' in out


def test_mcp_tool_call_and_its_streamed_result():
    request = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
               "params": {"name": "lookup_customer", "arguments": {"customer_id": "c-42"}}}
    result = {"jsonrpc": "2.0", "id": 7, "result": {"content": [
        {"type": "text", "text": "Customer c-42: <PERSON>, <EMAIL_ADDRESS>"}], "isError": False}}
    body = f"event: message\ndata: {json.dumps(result)}\n\n".encode()
    meta = {"decision_id": "dcn_2", "upstream": "tools",
            "interaction": {"protocol": "mcp", "operation": "mcp:tools/call",
                            "tool": "lookup_customer"},
            "decision": {"action": "mask", "reasons": []}, "masked": {"PERSON": 1,
                                                                      "EMAIL_ADDRESS": 1}}
    f = flow("/mcp", request, body, SSE, meta)
    assert '[tool call] lookup_customer({"customer_id": "c-42"})' in show(f, "request")
    assert ("[tool result, streamed] Customer c-42: «PERSON», «EMAIL_ADDRESS»"
            in show(f, "response"))


def test_a_refusal_and_flows_the_view_leaves_alone():
    refusal = {"error": {"message": "blocked by policy: codename (douane decision dcn_3)",
                         "type": "permission_error", "code": "policy_denied"}}
    meta = {"decision_id": "dcn_3", "interaction": {"protocol": "openai",
                                                    "operation": "chat.completions"},
            "decision": {"action": "block", "status": 403, "reasons": [
                {"rule": "deny.codename", "message": "codename", "field": "prompt[0]",
                 "score": 90}]}}
    f = flow("/v1/chat/completions", {"model": "m", "messages": []}, refusal, meta=meta)
    f.response.status_code = 403
    out = show(f, "response")
    assert "douane BLOCK (403), decision dcn_3" in out
    assert "reason: deny.codename: codename [prompt[0], score 90]" in out
    assert "[refused 403] blocked by policy: codename (douane decision dcn_3)" in out

    other = flow("/api/orders", {"id": 1}, {"ok": True})
    with taddons.context():
        assert contentviews.prettify_message(other.request, other).view_name == "JSON"


def test_marks_follow_the_final_decision():
    marks = {}
    for action in ("allow", "mask", "hold", "block", "refuse", "error"):
        f = tflow.tflow(resp=True)
        state(f).decide(action, Reason("r", "m"))
        Mark().response(f)
        marks[action] = f.marked
    assert marks == {"allow": "", "mask": ":mask:", "hold": ":hourglass:",
                     "block": ":no_entry:", "refuse": ":no_entry_sign:", "error": ":warning:"}
    untouched = tflow.tflow(resp=True)  # not a flow of this gateway (read back, replayed)
    Mark().response(untouched)
    assert untouched.marked == ""


@pytest.fixture(scope="module")
def recording(issuer, tmp_path_factory):
    """A real gateway (policy, masking, recording) driven by the openai SDK."""
    llm = FakeUpstream()
    llm.reply = "Reach Maria Garcia at maria.garcia@example.com."
    work = tmp_path_factory.mktemp("contentview")
    (work / "grants.yaml").write_text(
        "version: 1\ngroups:\n  eng:\n    upstreams:\n      llm: {models: ['*']}\n"
        "rules:\n  - {id: deny.codename, literal: nightingale, score: 90}\n")
    config = base_config(issuer.url, llm.url, recording={}, masking={"workers": 1},
                         policy={"files": [str(work / "grants.yaml")]})
    gw = Gateway(config, mode=f"reverse:{llm.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=work / "gw")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=issuer.mint("alice@corp", ["eng"]),
                           max_retries=0)
    history = [{"role": "user", "content": "Who handles billing?"},
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "call_1", "type": "function",
                   "function": {"name": "find_owner", "arguments": '{"team": "billing"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "the billing team"}]
    client.chat.completions.create(model="m", messages=history)
    stream = client.chat.completions.create(model="m", stream=True, messages=[
        {"role": "user", "content": "Say hello"}])
    delivered = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "status of nightingale?"}])
    deadline = time.monotonic() + 10
    while len(list((gw.state_dir / "recordings").rglob("*.mitm"))) < 1 or \
            sum(len(list(index.read_flows(p)))
                for p in (gw.state_dir / "recordings").rglob("*.mitm")) < 3:
        assert time.monotonic() < deadline, "recordings were not written"
        time.sleep(0.1)
    yield gw, delivered
    gw.stop()
    llm.close()


def test_recorded_flows_are_marked(recording):
    gw, _ = recording
    flows = [f for p in (gw.state_dir / "recordings").rglob("*.mitm")
             for _, f in index.read_flows(p)]
    marks = sorted(f.marked for f in flows)
    assert marks == [":mask:", ":mask:", ":no_entry:"]


def test_mitmdump_prints_recordings_as_conversations(recording):
    gw, delivered = recording
    sessions = gw.dir / "all.mitm"  # .mitm files concatenate
    sessions.write_bytes(b"".join(p.read_bytes() for p in sorted(
        (gw.state_dir / "recordings").rglob("*.mitm"))))
    out = subprocess.run([str(MITMDUMP), "-n", "-r", str(sessions), "-s",
                          str(REPO / "addons" / "view.py"), "--flow-detail", "3"],
                         capture_output=True, text=True, timeout=120, cwd=gw.dir)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "douane MASK" in text and "user alice@corp (eng) via bearer" in text
    assert "[user] Who handles billing?" in text
    assert '[tool call] find_owner({"team": "billing"})' in text
    assert "[tool result] the billing team" in text
    assert "[assistant] Reach «PERSON» at «EMAIL_ADDRESS»." in text
    # the streamed answer, reassembled from its chunks, as the client received it
    assert delivered == "Reach <PERSON> at <EMAIL_ADDRESS>."
    assert "[assistant, streamed] Reach «PERSON» at «EMAIL_ADDRESS»." in text
    assert "douane BLOCK (403)" in text and "reason: deny.codename" in text
    assert "[user] status of nightingale?" in text
    assert "maria.garcia" not in text


def test_control_characters_are_shown_escaped_and_no_value_starts_a_line():
    request = {"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hi\n[assistant] forged turn\x1b[2K\rhidden\u202etxt.exe"}]}
    meta = {"decision_id": "dcn_1", "decision": {"action": "allow", "reasons": []},
            "identity": {"user": "eve\x1b[31m\nadmin", "groups": [], "source": "bearer"}}
    text = show(flow("/v1/chat/completions", request, {"choices": []}, meta=meta), "request")
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "user eve\\x1b[31m\\x0aadmin" in text
    assert "[user] hi\n    [assistant] forged turn\\x1b[2K\\x0dhidden\\u202etxt.exe" in text
