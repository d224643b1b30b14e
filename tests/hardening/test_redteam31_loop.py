"""Red team, stop 31: one request under 256 KB that held the event loop (every other user waiting)
for the cost of parsing and walking its values, though it held few strings: stop 30 sent a body
of many strings to a thread by its quotes, and values that are no strings have none. Through a
real gateway (`douane_loop_stats`, load average ~10 on 2 cores), 250 KB of `"x": [{}, {}, ...]`
stalled the loop 400-430 ms, `[[], [], ...]` 180-340 ms, `[0, 0, ...]` 60-220 ms, zeros as a
message's content 90-110 ms (the parse's duplicate-key hook runs once per object, ~1.4 µs; the
walk once per value). Such a body is now read in a thread, as a large one is: 0-31 ms."""

from __future__ import annotations

import json

import pytest

from douane import inspect
from tests.hardening.test_redteam30_loop import _request
from tests.test_websocket_e2e import connect, item, realtime_gateway

VALUES = 60_000  # each body ~120-180 KB


def _with(values: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "x": json.loads(f"[{','.join([values] * VALUES)}]")}


MANY = {
    "empty objects": _with("{}"),
    "empty lists": _with("[]"),
    "zeros": _with("0"),
    "nulls as a message's content": {"model": "m", "messages": [
        {"role": "user", "content": [None] * (VALUES // 2)}]},
}


@pytest.mark.parametrize("case", list(MANY))
def test_a_body_of_many_values_is_read_off_the_loop(case):
    """Before: read on the loop (few quotes, under 256 KB)."""
    assert inspect.heavy(_request(MANY[case]))


def test_prose_and_a_conversation_stay_on_the_loop():
    """The controls: 60 turns with tools (test_redteam30_loop's), and 8 KB of prose with commas."""
    turns = [{"role": "user", "content": "Could you look at the quarterly numbers? " * 3},
             {"role": "assistant", "content": None, "tool_calls": [{
                 "id": "call_1", "type": "function", "function": {
                     "name": "lookup", "arguments": json.dumps({"id": "42", "notes": ["a"] * 3})}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "The account is fine."}] * 60
    assert not inspect.heavy(_request({"model": "m", "messages": turns}))
    prose = "Yes, the build passed, the tests ran, and the deploy, at last, went out. " * 110
    assert not inspect.heavy(_request({"model": "m", "messages": [
        {"role": "user", "content": prose}]}))


def _message(values: object, n: int) -> bytes:
    return json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}],
        "x": [values] * n}}, separators=(",", ":")).encode()


@pytest.mark.parametrize("values", [{}, 0, "a"], ids=["empty objects", "zeros", "strings"])
def test_a_websocket_message_of_many_values_is_read_off_the_loop(values):
    """A WebSocket message was parsed and walked on the loop whatever it held, up to the body
    limit (10 MB): 1 MB of `[{}, {}, ...]` in a `conversation.item.create` held it 1.8 s, zeros
    550 ms, one-character strings 700 ms (`douane_loop_stats`, load ~10; one-off probe). Now read
    in a thread past the body's bounds (`inspect.many`): 58-120 ms."""
    assert inspect.many(_message(values, 6000))
    assert not inspect.many(_message(values, 100))


@pytest.fixture(scope="module")
def realtime(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("redteam31-realtime"))


def test_a_key_after_many_values_in_a_websocket_message_is_still_caught(realtime, issuer, secrets):
    """Read in a thread, the message is policed as before: a key after 300,000 empty objects ends
    the session's message with the API's error event, nothing upstream."""
    gw, upstream = realtime
    token = issuer.mint("wyn@corp.example", ["engineering"])
    key = "sk-proj-" + "Hc5tRw8Zp2Lk" * 3
    secrets.update({token, key})
    client = connect(gw, token)
    assert client.status == 101
    client.send(item("hello"))
    assert client.receive()["delta"] == upstream.reply
    before = len(upstream.received)
    message = json.loads(_message({}, 300_000))
    message["item"]["content"].append({"type": "input_text", "text": f"deploy with {key}"})
    client.send(json.dumps(message, separators=(",", ":")))
    error = client.receive(timeout=60)
    assert error is not None and error["type"] == "error", error
    assert len(upstream.received) == before
