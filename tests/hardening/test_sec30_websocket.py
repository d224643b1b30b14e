"""A WebSocket's silences after its upstream answered (`douane.websocket`): a Realtime response
the upstream started and then abandoned is ended after `answer_silence` of its silence, a session
where nobody sends anything after `websocket_idle`; each with the API's error event naming the
decision id, both connections closed, audited. A response streaming steadily, and a quiet
session owed nothing, are not cut. Through a real gateway."""

from __future__ import annotations

import contextlib
import time

import pytest

from douane import config
from tests.test_websocket_e2e import connect, item, realtime_gateway

SILENCE, IDLE = 2, 10


@pytest.fixture(scope="module")
def quick(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("sec30_websocket"), gateway={
        "timeouts": {"answer_silence": SILENCE, "websocket_idle": IDLE}})


def ended(gw, client, code: str, rule: str) -> dict:
    """The error event the client got, its connection closed, and the session's record."""
    error = client.receive(timeout=60)
    assert error is not None and error["type"] == "error", error
    assert error["error"]["code"] == code, error
    client.sock.settimeout(20)
    chunk = b"x"
    with contextlib.suppress(OSError):
        while chunk := client.sock.recv(65536):
            pass
    assert not chunk  # closed by the gateway
    records = gw.audit_where(lambda r: r.get("event") == "websocket_message"
                             and r["decision_id"] == error["event_id"])
    assert records[0]["action"] == "error" and records[0]["reasons"][0]["rule"] == rule, records
    return error


def test_a_response_the_upstream_started_then_abandoned_is_ended(quick, issuer):
    gw, upstream = quick
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    upstream.answer = lambda _m: {"type": "response.created", "response": {"id": "resp_1"}}
    try:
        started = time.monotonic()
        client.send('{"type": "response.create"}')
        assert client.receive(timeout=30)["type"] == "response.created"
        error = ended(gw, client, "upstream_timeout", "upstream.timeout")
        assert "a response it started" in error["error"]["message"], error
        assert time.monotonic() - started >= SILENCE
    finally:
        upstream.answer = None
        client.close()


def test_a_steady_response_and_a_quiet_session_owed_nothing_are_not_cut(quick, issuer):
    gw, upstream = quick
    client = connect(gw, issuer.mint("bob@corp.example", ["engineering"]))
    events = iter([{"type": "response.created"}] + [
        {"type": "response.output_text.delta", "delta": "word "}] * 8 + [
        {"type": "response.done", "response": {"status": "completed"}}])
    upstream.answer = lambda _m: next(events)
    try:
        for _ in range(10):  # a response's events ~0.3 s apart, well past SILENCE in all
            client.send(item("go on"))
            assert client.receive(timeout=30)["type"].startswith("response."), "cut"
            time.sleep(0.3)
        time.sleep(2 * SILENCE)  # the response is done: nothing is owed, nothing is cut
        upstream.answer = None
        client.send(item("still there?"))
        assert client.receive(timeout=30)["delta"] == upstream.reply
    finally:
        upstream.answer = None
        client.close()


def test_a_session_where_nobody_speaks_is_ended_at_the_idle_deadline(quick, issuer):
    gw, upstream = quick
    client = connect(gw, issuer.mint("carol@corp.example", ["engineering"]))
    try:
        client.send(item("hello"))
        assert client.receive(timeout=30)["delta"] == upstream.reply
        started = time.monotonic()
        ended(gw, client, "session_idle", "timeout.websocket_idle")
        assert time.monotonic() - started >= IDLE - 1
    finally:
        client.close()


def test_the_idle_deadline_is_configured_in_whole_seconds(tmp_path):
    doc = ("version: 1\nidentity: {dev_issuer: {enabled: true}}\n"
           "gateway: {timeouts: {websocket_idle: 0}}\n")
    (tmp_path / "douane.yaml").write_text(doc)
    with pytest.raises(config.ConfigError, match="at least 1 second"):
        config.load(tmp_path / "douane.yaml", gateway=False)
    (tmp_path / "douane.yaml").write_text(doc.replace("0}", "30}"))
    assert config.load(tmp_path / "douane.yaml", gateway=False
                       ).limits.websocket_idle_timeout == 30
