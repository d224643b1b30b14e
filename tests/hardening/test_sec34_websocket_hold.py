"""Security, stop 34: a WebSocket upstream spelling the org's key over several messages (a
Realtime model's text deltas) was cut once the key was whole, but the messages before that one
had been delivered as they came: the key's beginning (`sk-upstream-te...`) reached the client.
Now the end of a text delta that may begin the key is held back (as a stream's `EchoGuard`
holds it) and goes out at the front of the next delta, or as a delta of its own before the next
message that is no delta; the message completing the key is dropped with what was held. Through
a real gateway onto a Realtime upstream answering each client message with the next piece."""

from __future__ import annotations

import random

import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.test_sec33_stream_echo import splits


@pytest.fixture(scope="module")
def realtime(issuer, tmp_path_factory):
    from tests.test_websocket_e2e import realtime_gateway
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("sec34_ws_hold"))


def _talk(gw, issuer, upstream, answers: list[dict]) -> tuple[list[dict], dict | None]:
    """Each answer sent for one client message; what the client got, and the error if any."""
    from tests.test_websocket_e2e import connect, item
    sent = iter(answers)
    upstream.answer = lambda _m: next(sent, None)
    client = connect(gw, issuer.mint("wshold@corp.example", ["engineering"]))
    got: list[dict] = []
    try:
        for answer in answers:
            client.send(item("go on"))
            expect = 2 if answer.get("type") == "response.done" else 1
            for _ in range(expect):
                event = client.receive(timeout=10)
                if event is None or event.get("type") == "error":
                    return got, event
                got.append(event)
                if event.get("type") == answer.get("type") and "delta" not in answer:
                    break
    finally:
        upstream.answer = None
        client.close()
    return got, None


def _delta(text: str) -> dict:
    return {"type": "response.output_text.delta", "response_id": "resp_1", "delta": text}


@pytest.mark.parametrize("seed", range(6))
def test_no_beginning_of_the_key_reaches_the_client(realtime, issuer, seed):
    """Before (f8b31ab): the deltas before the one completing the key were delivered, its
    beginning in the client's text."""
    gw, upstream = realtime
    rng = random.Random(1000 + seed)
    text = f"the key is {UPSTREAM_KEY}."
    pieces = splits(rng, text, 8)
    got, error = _talk(gw, issuer, upstream, [_delta(p) for p in pieces])
    said = "".join(e.get("delta", "") for e in got)
    assert error and error["error"]["code"] == "upstream_credential_echo", (seed, error, said)
    assert "the key is ".startswith(said), (seed, pieces, said)


def test_what_was_held_goes_out_whole_and_in_order(realtime, issuer):
    """Beginnings of the key that go on as other text leave as sent; a held end leaves as a
    delta of its own before the next message that is no delta."""
    gw, upstream = realtime
    rng = random.Random(5)
    text = f"{UPSTREAM_KEY[:5]} then {UPSTREAM_KEY[:-1]} and {UPSTREAM_KEY[:12]}"
    pieces = splits(rng, text, 10)
    answers = [_delta(p) for p in pieces] + [{"type": "response.done",
                                              "response": {"id": "resp_1"}}]
    got, error = _talk(gw, issuer, upstream, answers)
    assert error is None, error
    assert "".join(e.get("delta", "") for e in got) == text, (pieces, got)
    assert got[-1]["type"] == "response.done" and got[-2]["delta"] == UPSTREAM_KEY[:12], got
