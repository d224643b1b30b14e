"""A remote MCP server's items in a streamed answer meet the policy the whole answer meets,
through a real gateway: an OpenAI Responses `mcp_call`'s `server_label`, an `mcp_list_tools`
item's tools, an Anthropic `mcp_tool_use`'s `server_name` and an `mcp_tool_result` were read by
the whole answer (labels and names as a call's or a listing's, a result as a tool result) and
not by the stream (names are no filter's text; a result's text was read as a completion's).

Property-style: each answer's SSE bytes cut at random places (seeded) and sent at a model's
pace, the denied one among benign items at a random place: the stream is cut (the event
carrying it never leaves, the API's error event with a decision id ends it, the audit record
names the rule) exactly when the same answer whole is blocked; a benign answer passes whole."""

from __future__ import annotations

import copy
import json
import random
import time

import httpx
import pytest

from tests.hardening.conftest import reverse_gateway

POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
    claude: {models: ["*"]}
rules:
  - id: deny.codename
    literal: "project nightingale"
    in: [tool_arguments, completion]
    score: 90
  - id: deny.results
    literal: "falcon ledger"
    in: [tool_result]
    score: 90
thresholds: {hold: 50, block: 80}
"""
PACE = 0.004  # seconds between the pieces of the stream
DENIED = "project_nightingale"
RESULT = "the falcon ledger says 42"  # denied in a tool result only


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("stream-mcp-items"), POLICY, "") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer):
    return issuer.mint("eve@corp.example", ["engineering"])


def listing(label: str, tool: str) -> dict:
    return {"id": "mcpl_1", "type": "mcp_list_tools", "server_label": label, "tools": [
        {"name": tool, "description": "looks things up", "input_schema": {"type": "object"}}]}


def mcp_call(label: str, output: str) -> dict:
    return {"id": "mcp_1", "type": "mcp_call", "server_label": label, "name": "lookup",
            "arguments": '{"q": "weather"}', "output": output, "status": "completed"}


def responses(items: list[dict]) -> tuple[dict, list[tuple[str, dict]]]:
    """A Responses answer with `items` (after a message), whole and as its stream's events."""
    items = [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "let me look", "annotations": []}]},
             *items]
    whole = {"id": "resp_t", "object": "response", "created_at": 0, "model": "m",
             "status": "completed", "output": items,
             "usage": {"input_tokens": 1, "output_tokens": 1}}
    out: list[tuple[str, dict]] = [("response.created", {"response": {
        **whole, "status": "in_progress", "output": []}})]
    for i, item in enumerate(items):
        added = copy.deepcopy(item)
        if item["type"] == "mcp_call":
            added |= {"arguments": "", "status": "in_progress"}
            added.pop("output")
        out.append(("response.output_item.added", {"output_index": i, "item": added}))
        if item["type"] == "mcp_call":
            out += [("response.mcp_call_arguments.delta", {"output_index": i,
                                                           "item_id": item["id"], "delta": d})
                    for d in ('{"q": ', '"weather"}')]
        out.append(("response.output_item.done", {"output_index": i, "item": item}))
    out.append(("response.completed", {"response": whole}))
    return whole, [(n, {"type": n, "sequence_number": k, **d}) for k, (n, d) in enumerate(out)]


def anthropic(server: str, result: str) -> tuple[dict, list[tuple[str, dict]]]:
    use = {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "lookup", "server_name": server,
           "input": {"q": "weather"}}
    res = {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "is_error": False,
           "content": [{"type": "text", "text": result}]}
    message = {"id": "msg_t", "type": "message", "role": "assistant", "model": "c",
               "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 1, "output_tokens": 1}}
    whole = {**message, "content": [{"type": "text", "text": "let me look"}, use, res]}
    out: list[tuple[str, dict]] = [
        ("message_start", {"message": {**message, "content": [], "stop_reason": None}}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                       "text": "let me look"}}),
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": {**use, "input": {}}}),
        ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                       "partial_json": '{"q": "weather"}'}}),
        ("content_block_stop", {"index": 1}),
        ("content_block_start", {"index": 2, "content_block": res}),
        ("content_block_stop", {"index": 2}),
        ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 9}}),
        ("message_stop", {})]
    return whole, [(n, {"type": n, **d}) for n, d in out]


REQUESTS = {"responses": ("/v1/responses", {"model": "m", "input": "weather?"}),
            "anthropic": ("/anthropic/v1/messages", {"model": "c", "max_tokens": 50, "messages": [
                {"role": "user", "content": "weather?"}]})}


def ask(gw, llm, token, api: str, whole: dict, events: list[tuple[str, dict]], seed: int | None
        ) -> tuple[int, str, str]:
    """(status, body, decision id) of the answer: whole (seed None), or streamed, its bytes cut
    at random places (seeded), each piece sent at a model's pace."""
    def answer(handler, _req) -> None:
        if seed is None:
            handler._json(200, whole)
            return
        raw = b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)
        rng = random.Random(seed)
        at = sorted(rng.sample(range(1, len(raw)), rng.randint(len(events), 3 * len(events))))
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for a, b in zip([0, *at], [*at, len(raw)], strict=True):
            handler.wfile.write(b"%x\r\n%s\r\n" % (b - a, raw[a:b]))
            handler.wfile.flush()
            time.sleep(PACE)
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    path, body = REQUESTS[api]
    llm.answer = answer
    try:
        with httpx.stream("POST", gw.url + path, json={**body, "stream": seed is not None},
                          headers={"authorization": f"Bearer {token}"}, timeout=30) as resp:
            return resp.status_code, resp.read().decode(), resp.headers["x-douane-decision-id"]
    finally:
        llm.answer = None


def errors_of(text: str) -> tuple[list[dict], list[dict]]:
    """A stream's events, and its error events (either API's)."""
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    return events, [e for e in events if e.get("type") == "error" or "error" in e and
                    e.get("type") is None]


def cut(gw, text: str, decision_id: str, rule: str, withheld: str) -> None:
    """The stream ended with one error event naming the decision; `withheld` never left."""
    events, errors = errors_of(text)
    assert len(errors) == 1 and decision_id in json.dumps(errors[0]), text[-400:]
    assert events[-1] is errors[-1] and withheld not in text, text[-600:]
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and rule in [r["rule"] for r in record["reasons"]], record


CASES = {  # api, the answer's parts, the rule that blocks it (None: benign), what is withheld
    "mcp_call.server_label": ("responses", lambda: [mcp_call(DENIED, "sunny")], "deny.codename",
                              DENIED),
    "mcp_list_tools tool name": ("responses", lambda: [listing("weather", DENIED)],
                                 "deny.codename", DENIED),
    "mcp_list_tools server_label": ("responses", lambda: [listing(DENIED, "lookup")],
                                    "deny.codename", DENIED),
    "mcp_call output": ("responses", lambda: [listing("weather", "lookup"),
                                              mcp_call("weather", RESULT)], "deny.results",
                        "falcon"),
    "benign responses": ("responses", lambda: [listing("weather", "lookup"),
                                               mcp_call("weather", "sunny")], None, ""),
    "mcp_tool_use.server_name": ("anthropic", lambda: (DENIED, "sunny"), "deny.codename",
                                 DENIED),
    "mcp_tool_result": ("anthropic", lambda: ("weather", RESULT), "deny.results", "falcon"),
    "benign anthropic": ("anthropic", lambda: ("weather", "sunny"), None, ""),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(3))
def test_a_streamed_mcp_item_meets_the_whole_answers_policy(gw, llm, token, case, seed):
    api, parts, rule, withheld = CASES[case]
    if api == "responses":
        items = parts()
        benign = [listing("other", "search"), mcp_call("other", "cloudy")]
        at = random.Random(seed).randint(0, len(benign))
        whole, events = responses([*benign[:at], *items, *benign[at:]])
    else:
        whole, events = anthropic(*parts())
    status, text, decision_id = ask(gw, llm, token, api, whole, events, None)
    assert (status == 403) == (rule is not None), (status, text[:300])  # the whole answer
    if rule:
        assert rule in [r["rule"] for r in gw.audit_record(decision_id)["reasons"]]
    status, text, decision_id = ask(gw, llm, token, api, whole, events, seed)
    assert status == 200
    if rule is None:
        got, errors = errors_of(text)
        assert not errors and "sunny" in text and len(got) == len(events), text[-400:]
    else:
        cut(gw, text, decision_id, rule, withheld)
