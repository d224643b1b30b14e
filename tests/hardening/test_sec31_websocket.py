"""A WebSocket session is bounded however busy it is (`douane.websocket`): at most
`websocket_session` seconds and `websocket_messages` messages both ways, for any upstream (a
Realtime one is also followed by its response clock; another protocol's is not). Each end is the
API's error event naming the decision id, both connections closed, audited. A ping is no
message: pings alone do not keep a session open (`websocket_idle` ends it). Through a real
gateway; the limits are validated where the config is loaded."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from wsproto.connection import ConnectionState
from wsproto.events import Ping

from douane import config
from tests.test_websocket_e2e import connect, item, realtime_gateway

SILENCE, IDLE, SESSION, MESSAGES = 2, 5, 8, 40


@pytest.fixture(scope="module")
def bounded(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("sec31_websocket"), gateway={
        "timeouts": {"answer_silence": SILENCE, "websocket_idle": IDLE,
                     "websocket_session": SESSION},
        "websocket_messages": MESSAGES})


def until_error(gw, client, code: str, rule: str, send=None) -> tuple[dict, float]:
    """The error event the client gets (calling `send` between reads), when it came, its
    connection closed by the gateway, and the session's record."""
    deadline = time.monotonic() + 60
    event: dict = {}
    client.sock.settimeout(0.5)
    while event.get("type") != "error":
        assert time.monotonic() < deadline, "the session was not ended"
        if send:
            send()
        with contextlib.suppress(TimeoutError):
            while not client.pending:
                client._events()
                assert client.ws.state is ConnectionState.OPEN, "closed with no error event"
        event = json.loads(client.pending.pop(0)) if client.pending else {}
    at = time.monotonic()
    assert event["error"]["code"] == code, event
    client.sock.settimeout(20)
    chunk = b"x"
    with contextlib.suppress(OSError):
        while chunk := client.sock.recv(65536):
            pass
    assert not chunk  # closed by the gateway
    records = gw.audit_where(lambda r: r.get("event") == "websocket_message"
                             and r["decision_id"] == event["event_id"])
    assert records[0]["action"] == "error" and records[0]["reasons"][0]["rule"] == rule, records
    return event, at


def test_a_busy_session_ends_at_its_longest(bounded, issuer):
    """A message each way every half second, never idle: closed past `websocket_session`."""
    gw, upstream = bounded
    started = time.monotonic()
    client = connect(gw, issuer.mint("dave@corp.example", ["engineering"]))
    try:
        _, at = until_error(gw, client, "session_expired", "timeout.websocket_session",
                            lambda: client.send(item("still busy")) or time.sleep(0.5))
    finally:
        client.close()
    assert at - started >= SESSION - 1, at - started


def test_a_session_carries_at_most_its_messages(bounded, issuer):
    gw, upstream = bounded
    client = connect(gw, issuer.mint("erin@corp.example", ["engineering"]))
    before = len(upstream.received)
    try:
        for n in range(MESSAGES // 2):  # each answered: two messages
            client.send(item(f"message {n}"))
            assert client.receive(timeout=30)["delta"] == upstream.reply
        client.send(item("one too many"))
        until_error(gw, client, "session_message_limit", "limit.websocket_messages")
    finally:
        client.close()
    assert len(upstream.received) - before == MESSAGES // 2  # the last one never left


def test_pings_alone_do_not_keep_a_session_open(bounded, issuer):
    """(already so at stop 30: a ping never reached douane's hooks; kept as the decision)"""
    gw, upstream = bounded
    client = connect(gw, issuer.mint("frank@corp.example", ["engineering"]))
    started = time.monotonic()
    try:
        _, at = until_error(gw, client, "session_idle", "timeout.websocket_idle",
                            lambda: client.sock.sendall(client.ws.send(Ping(b"alive?")))
                            or time.sleep(0.5))
    finally:
        client.close()
    assert IDLE - 1 <= at - started < SESSION, at - started


def test_overlapping_responses_are_each_followed_to_their_end(bounded, issuer):
    """Two Realtime responses under way (an out-of-band one beside the conversation's): the end
    of the first leaves the second owed, its silence ends the session as any response's."""
    gw, upstream = bounded
    events = iter([{"type": "response.created", "response": {"id": "resp_1"}},
                   {"type": "response.created", "response": {"id": "resp_2"}},
                   {"type": "response.done", "response": {"id": "resp_1"}}])
    upstream.answer = lambda _m: next(events, None)
    client = connect(gw, issuer.mint("grace@corp.example", ["engineering"]))
    try:
        for expected in ("response.created", "response.created", "response.done"):
            client.send(item("go"))
            assert client.receive(timeout=30)["type"] == expected
        started = time.monotonic()
        event, at = until_error(gw, client, "upstream_timeout", "upstream.timeout")
        assert "a response it started" in event["error"]["message"], event
        assert at - started >= SILENCE - 1, at - started
    finally:
        upstream.answer = None
        client.close()


@pytest.mark.parametrize("gateway, message", [
    ({"timeouts": {"websocket_session": 0}}, "at least 1 second"),
    ({"websocket_messages": 0}, "must be positive"),
    ({"websocket_messages": "many"}, "websocket_messages"),
])
def test_the_bounds_are_validated_at_load(tmp_path, gateway, message):
    doc = {"version": 1, "identity": {"dev_issuer": {"enabled": True}}, "gateway": gateway}
    (tmp_path / "douane.yaml").write_text(json.dumps(doc))
    with pytest.raises(config.ConfigError, match=message):
        config.load(tmp_path / "douane.yaml", gateway=False)


def test_the_bounds_are_read(tmp_path):
    (tmp_path / "douane.yaml").write_text(
        "version: 1\nidentity: {dev_issuer: {enabled: true}}\n"
        "gateway: {timeouts: {websocket_session: 60}, websocket_messages: 7}\n")
    limits = config.load(tmp_path / "douane.yaml", gateway=False).limits
    assert (limits.websocket_session_timeout, limits.websocket_messages) == (60, 7)
