"""Red team, stop 30: one request that held the event loop (every other user waiting) for the
cost of walking its strings. Inspect parsed and walked a body on the loop below 256 KB whatever
it held; the walk costs each string ~1-4 us whatever its length, so 4,000 one-character
messages (136 KB) stalled a gateway's loop 104 ms, 9,000 one-character content parts 140 ms,
9,000 schema properties 113 ms (douane_loop_stats, loaded host). A body of many strings is now
read in a thread, as a large one is: 12, 24 and 11 ms.

A WebSocket (Realtime) message's texts were matched on the loop whatever their size, up to the
body limit (10 MB by default): `engine.risk` on a 1 MB message costs ~107 ms of CPU (in-process,
load average 11), ~1 s at the limit. Past the policy's size they are matched in a thread, as a
body's are."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tutils

from douane import inspect
from tests.test_websocket_e2e import connect, item, realtime_gateway

MANY = {  # each under 256 KB, each ~100 ms of the loop before
    "4,000 one-character messages": {"model": "m", "messages": [
        {"role": "user", "content": "x"}] * 4000},
    "9,000 one-character content parts": {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}] * 9000}]},
    "9,000 schema properties": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                "response_format": {"type": "json_schema", "json_schema": {
                                    "name": "s", "schema": {"type": "object", "properties": {
                                        f"k{i}": {"type": "string"} for i in range(9000)}}}}},
}


def _request(doc: dict) -> object:
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) < inspect.OFF_LOOP_BYTES
    return tutils.treq(content=body)


@pytest.mark.parametrize("case", list(MANY))
def test_a_body_of_many_strings_is_read_off_the_loop(case):
    assert inspect.heavy(_request(MANY[case]))


def test_an_ordinary_body_is_read_on_the_loop():
    """The control: 60 turns of a conversation with tools (the bench's large body) stay on the
    loop, where a thread's hand-off would cost more than the read."""
    turns = [{"role": "user", "content": "Could you look at the quarterly numbers? " * 3},
             {"role": "assistant", "content": None, "tool_calls": [{
                 "id": "call_1", "type": "function", "function": {
                     "name": "lookup", "arguments": json.dumps({"id": "42", "notes": ["a"] * 3})}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "The account is fine."}] * 60
    assert not inspect.heavy(_request({"model": "m", "messages": turns}))


@pytest.fixture(scope="module")
def realtime(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("redteam30-realtime"))


KEY = "sk-proj-" + "Rz2Wq9Lm4Xv7" * 3
PROSE = "The quarterly review covered shipping timelines, hiring plans and the budget. " * 13_000


def test_a_large_websocket_message_is_matched_whole_off_the_loop(realtime, issuer, secrets):
    """A 1 MB message is matched in a thread: a key at its end still ends the session with the
    API's error event (nothing upstream), a clean one of the same size is delivered."""
    gw, upstream = realtime
    token = issuer.mint("wes@corp.example", ["engineering"])
    secrets.update({token, KEY})
    client = connect(gw, token)
    assert client.status == 101
    client.send(item(PROSE))
    assert client.receive()["delta"] == upstream.reply
    before = len(upstream.received)
    client.send(item(PROSE + " deploy with " + KEY))
    error = client.receive()
    assert error is not None and error["type"] == "error", error
    assert len(upstream.received) == before
    client.close()
