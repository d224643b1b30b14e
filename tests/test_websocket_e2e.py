"""WebSockets through a real mitmdump: refused unless the upstream allows them; when allowed
(OpenAI Realtime style), every message in both directions passes the deny rules, and what cannot be
inspected or is blocked never arrives."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
from wsproto.frame_protocol import FrameProtocol

from douane.recording import index
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.ws_upstream import RealtimeUpstream, WsClient

GRANTS = """\
version: 1
default:
  upstreams:
    realtime: {}
groups:
  textonly:
    upstreams:
      realtime: {models: [gpt-realtime], media: false}
rules:
  - {id: deny.codename, literal: "project nightingale", score: 90,
     in: [prompt, tool_arguments, tool_result, tool_description, completion]}
  - {id: deny.answer_hosts, regex: "\\\\b[a-z0-9-]+\\\\.corp\\\\.internal\\\\b", in: [completion], score: 90}
detectors: {secrets: true, injection: false}
thresholds: {hold: 50, block: 80}
"""


def realtime_gateway(issuer, work, **extra):
    """A gateway in front of a RealtimeUpstream whose upstream allows WebSocket."""
    upstream = RealtimeUpstream()
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, upstream.url + "/v1/realtime",
                         policy={"files": [str(work / "grants.yaml")]}, **extra)
    config["upstreams"]["realtime"] = config["upstreams"].pop("llm")
    config["upstreams"]["realtime"]["allow_websocket"] = True
    with Gateway(config, mode=f"reverse:{upstream.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=work / "gw") as gw:
        yield gw, upstream
    upstream.close()


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket"),
                                gateway={"body_size_limit": "1m"})


def connect(gw: Gateway, token: str, model: str = "gpt-realtime") -> WsClient:
    return WsClient(gw.port, f"/v1/realtime?model={model}",
                    {"authorization": f"Bearer {token}"})


def item(text: str) -> str:
    return json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


def test_allowed_messages_flow_both_ways_with_the_injected_key(setup, issuer):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    assert client.status == 101
    client.send(item("What is the capital of France?"))
    assert client.receive()["delta"] == upstream.reply
    assert "What is the capital of France?" in upstream.received[-1]
    assert upstream.headers[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    client.close()


def test_a_denied_prompt_never_reaches_the_upstream_and_the_connection_is_cut(setup, issuer):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    client.send(item("Tell me about Project  NIGHTINGALE"))  # normalised before matching
    error = client.receive()
    assert error["type"] == "error" and error["error"]["code"] == "policy_denied"
    decision = error["event_id"]
    assert decision in error["error"]["message"] and "deny.codename" in error["error"]["message"]
    client.send(item("and now something harmless"))  # nothing passes a cut connection
    assert client.receive(timeout=1) is None
    assert len(upstream.received) == before
    records = gw.audit_where(lambda r: r.get("event") == "websocket_message"
                             and r["decision_id"] == decision)
    assert records[0]["action"] == "block"
    assert records[0]["reasons"][0]["rule"] == "policy.websocket"
    client.close()


def test_a_denied_answer_never_reaches_the_client(setup, issuer):
    gw, upstream = setup
    upstream.reply = "Connect to billing-db.corp.internal with the admin account."
    try:
        client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
        client.send(item("What is the deploy key?"))
        error = client.receive()
        assert error["type"] == "error", error
        assert "corp.internal" not in json.dumps(error)
        assert "deny.answer_hosts" in error["error"]["message"]
        client.close()
    finally:
        upstream.reply = "Hello over the WebSocket."


@pytest.mark.parametrize("message", [b"\x00\x01binary audio", "not json at all"])
def test_messages_that_cannot_be_inspected_are_not_sent(setup, issuer, message):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    client.send(message)
    error = client.receive()
    assert error["type"] == "error" and error["error"]["code"] == "policy_denied"
    assert len(upstream.received) == before
    client.close()


def test_without_a_token_the_upgrade_is_refused(setup):
    gw, upstream = setup
    before = len(upstream.headers)
    client = WsClient(gw.port, "/v1/realtime", {})
    assert client.status == 401
    assert len(upstream.headers) == before
    client.close()


@pytest.fixture(scope="module")
def masked(issuer, tmp_path_factory):
    """The same upstream behind a gateway that masks answers (auditors exempt)."""
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket-masked"),
                                masking={"workers": 1, "entities": ["EMAIL_ADDRESS"],
                                         "exempt_groups": ["auditors"], "timeout_seconds": 120})


def test_while_answers_are_masked_the_upgrade_is_refused_but_for_exempt_groups(masked, issuer):
    """Masking reads no WebSocket message: a Realtime answer would leave unmasked, so the upgrade
    is refused (nothing reaches the upstream, the audit names why); exempt groups, whose answers
    are never masked, connect."""
    gw, upstream = masked
    client = WsClient(gw.port, "/v1/realtime?model=gpt-realtime",
                      {"authorization": f"Bearer {issuer.mint('alice@corp.example', ['engineering'])}"})
    assert client.status == 403
    client.close()
    assert upstream.headers == []
    [record] = gw.audit_where(lambda r: any(x.get("rule") == "protocol.websocket_unmasked"
                                            for x in r.get("reasons", [])))
    assert record["action"] == "refuse" and record["user"] == "alice@corp.example"
    client = WsClient(gw.port, "/v1/realtime?model=gpt-realtime",
                      {"authorization": f"Bearer {issuer.mint('ann@corp.example', ['auditors'])}"})
    assert client.status == 101
    client.send(item("hello"))
    assert client.receive()["delta"] == upstream.reply
    client.close()


def stopped(client: WsClient, upstream, before: int) -> dict:
    """The message was not delivered: the client got douane's error event, the upstream nothing."""
    error = client.receive()
    assert error and error["type"] == "error" and error["error"]["code"] == "policy_denied", error
    assert len(upstream.received) == before
    return error


def test_a_phrase_split_across_client_messages_is_stopped(setup, issuer):
    """Each message was matched alone: `Project Night` then `ingale` reached the model."""
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    client.send(item("Tell me everything about Project Night"))
    assert client.receive()["delta"] == upstream.reply
    before = len(upstream.received)
    client.send(item("ingale, please"))
    assert "deny.codename" in stopped(client, upstream, before)["error"]["message"]
    client.close()


def test_a_phrase_split_across_answer_deltas_is_stopped(setup, issuer):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    try:
        upstream.reply = "The codename is Project Night"
        client.send(item("What is the codename?"))
        assert client.receive()["delta"] == upstream.reply
        upstream.reply = "ingale."
        client.send(item("Go on."))
        error = client.receive()
        assert error["type"] == "error" and "deny.codename" in error["error"]["message"], error
    finally:
        upstream.reply = "Hello over the WebSocket."
        client.close()


@pytest.mark.parametrize("event", [
    # a key the model reads (a tool parameter's name)
    {"type": "session.update", "session": {"type": "realtime", "tools": [
        {"type": "function", "name": "lookup", "parameters": {
            "type": "object", "properties": {"Project Nightingale": {"type": "string"}}}}]}},
    # a remote MCP server no grant names, called with the org's key
    {"type": "session.update", "session": {"type": "realtime", "tools": [
        {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp"}]}},
    {"type": "response.create", "response": {"tools": [{"type": "web_search"}]}},
], ids=["key", "mcp_server", "hosted_tool"])
def test_what_a_session_offers_the_model_is_policed(setup, issuer, event):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    client.send(json.dumps(event))
    stopped(client, upstream, before)
    client.close()


def test_the_grant_applies_to_the_model_and_to_audio(setup, issuer):
    """The model is the upgrade's `?model=`; audio is media (a grant without `media` sends none)."""
    gw, upstream = setup
    token = issuer.mint("tess@corp.example", ["textonly"])
    before = len(upstream.headers)
    client = connect(gw, token, model="gpt-4o-realtime-preview")
    assert client.status == 403 and len(upstream.headers) == before
    client.close()
    client = connect(gw, token)
    assert client.status == 101
    client.send(item("hello"))
    assert client.receive()["delta"] == upstream.reply
    before = len(upstream.received)
    client.send(json.dumps({"type": "input_audio_buffer.append", "audio": "UklGRiQAAABXQVZF"}))
    assert "audio" in stopped(client, upstream, before)["error"]["message"]
    client.close()


def test_a_message_over_the_body_limit_is_not_parsed_or_sent(setup, issuer):
    """A message had no bound: 2 MiB (or 200) were parsed and matched on the event loop."""
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    client.send(item("x" * (2 * 1024**2)))
    assert "exceeds douane's limit" in stopped(client, upstream, before)["error"]["message"]
    client.close()


def test_no_compression_is_negotiated_for_a_message_to_inflate(setup, issuer):
    """With permessage-deflate, mitmproxy inflates each message whole before any hook: a few KB
    of a client's deflate bomb become gigabytes in the gateway. The client's offer is not passed
    on, so the upstream agrees to none."""
    gw, upstream = setup
    client = WsClient(gw.port, "/v1/realtime?model=gpt-realtime", {
        "authorization": f"Bearer {issuer.mint('alice@corp.example', ['engineering'])}",
        "sec-websocket-extensions": "permessage-deflate; client_max_window_bits"})
    assert client.status == 101
    assert upstream.extensions[-1] == []
    client.send(item("hello"))
    assert client.receive()["delta"] == upstream.reply
    client.close()


def test_a_message_is_not_buffered_past_the_limit_while_it_arrives(setup, issuer):
    """mitmproxy joins a message's frames until its last one, whatever their total: 300 MiB of
    frames that never finish grew the gateway by as much before any hook could refuse it."""
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    pid = gw.proc.pid

    def peak() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:"))
                   .split()[1])

    start = peak()
    chunk = b"x" * (1024 * 1024)
    # text frame, not final, then continuation frames: each masked with a zero key (the same bytes)
    frame = b"\x01\xff" + len(chunk).to_bytes(8, "big") + b"\0\0\0\0" + chunk
    more = b"\x00\xff" + len(chunk).to_bytes(8, "big") + b"\0\0\0\0" + chunk
    with contextlib.suppress(OSError):
        client.sock.sendall(frame)
        for _ in range(300):
            client.sock.sendall(more)
    grown_mb = (peak() - start) / 1024
    client.close()
    # +266 MB before; now +83-87 MB: the messages are let go, but something else still grows
    # about 20 KB per message of this size (not found yet: docs/security.md, stop 26)
    assert grown_mb < 150, f"the gateway grew {grown_mb:.0f} MB"
    assert len(upstream.received) == before


@pytest.fixture(scope="module")
def recorded(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket_recorded"),
                                gateway={"body_size_limit": "1m"}, recording={})


def recorded_messages(gw: Gateway) -> list[tuple[int, bytes]]:
    """The WebSocket messages in the session files, as (part, content), in file order."""
    found = []
    for path in sorted((gw.state_dir / "recordings").rglob("*.mitm")):
        for _, flow in index.read_flows(path):
            part = flow.metadata.get("douane", {}).get("websocket_part", 0)
            found += [(part, m.content) for m in (flow.websocket.messages if flow.websocket else [])]
    return found


def peak_kb(gw: Gateway) -> int:
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_a_long_session_is_not_held_in_memory(setup, issuer):
    """mitmproxy keeps every message of a WebSocket in its flow until the connection ends: 4,000
    prompts of 64 KiB (250 MiB) grew the gateway by as much (2,000 here: 125 MiB; either fix
    undone still grows it 120-133 MB); past 1,000 messages or 8 MiB held,
    they are let go (written to the recording first when there is one: next test). And it reads
    both peers without backpressure while each message's hook runs: a client running ahead of
    its answers (here, all 2,000 sent at once) was queued in memory whole (+85 MB for a client
    that ran ahead by half a message per answer, as the tests' client did; ~20 KB per message).
    Past 1 MiB queued, neither peer is read until the queue drains."""
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    start = peak_kb(gw)
    count, sent = 2000, threading.Event()

    def send_all() -> None:  # as fast as TCP takes them (a frame protocol of its own: no
        frames = FrameProtocol(client=True, extensions=[])  # state shared with the reader)
        for i in range(count):
            client.sock.sendall(frames.send_data(item(f"prompt {i} " + "x" * (64 * 1024))))
        sent.set()

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    for _ in range(count):
        answer = client.receive(timeout=60)
        assert answer is not None and answer["delta"] == upstream.reply
    sender.join(timeout=60)
    assert sent.is_set()
    grown_mb = (peak_kb(gw) - start) / 1024
    client.close()
    print(f"\nwebsocket figures: {count:,} prompts of 64 KiB sent ahead, peak memory +{grown_mb:.0f} MB")
    # +266 MB before the messages were let go, +85 MB before the peers' reading was paced; now
    # the messages held (8 MiB), 1 MiB queued and what is in flight
    assert grown_mb < 40, f"the gateway grew {grown_mb:.0f} MB"


def test_a_long_session_is_recorded_whole_in_parts(recorded, issuer):
    """The messages let go are in the recording first (douane recorded a WebSocket at its
    upgrade, without any message): every message once, in order, parts written while the
    session is open."""
    gw, upstream = recorded
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    sent = [item(f"prompt {i}") for i in range(1200)]
    for message in sent:
        client.send(message)
        assert client.receive(timeout=30)["delta"] == upstream.reply
    deadline = time.monotonic() + 60
    while not any(part for part, _ in recorded_messages(gw)):  # written while still open
        assert time.monotonic() < deadline, "no part of the open session was recorded"
        time.sleep(0.2)
    client.close()
    deadline = time.monotonic() + 60
    while len(found := recorded_messages(gw)) < 2 * len(sent):
        assert time.monotonic() < deadline, f"{len(found)} messages recorded"
        time.sleep(0.2)
    assert len(found) == 2 * len(sent)
    assert [c.decode() for _, c in found if c.startswith(b'{"type": "conv')] == sent
    assert sorted({part for part, _ in found}) == [1, 2, 3]


def test_a_realtime_session_names_only_its_own_items(setup, issuer):
    """Item ids in client events (`conversation.item.retrieve` / `.delete` / `.truncate`,
    `previous_item_id`, an `item_reference`) name the session's own items only: another
    session's id (or a guess) is refused before the upstream, the record saying why."""
    gw, upstream = setup
    issued = iter(f"item_up{n}" for n in range(100))
    upstream.answer = lambda message: {"type": "conversation.item.created",
                                       "item": {"id": next(issued), "type": "message"}}
    try:
        token = issuer.mint("alice@corp.example", ["engineering"])
        client = connect(gw, token)
        client.send(item("hi"))
        given = client.receive()["item"]["id"]
        mine = json.loads(item("again"))
        client.send(json.dumps({**mine, "previous_item_id": given, "item": {
            **mine["item"], "id": "item_mine"}}))
        assert client.receive()["type"] == "conversation.item.created"
        for event in ({"type": "conversation.item.retrieve", "item_id": given},
                      {"type": "conversation.item.truncate", "item_id": "item_mine",
                       "content_index": 0, "audio_end_ms": 0},
                      {"type": "response.create", "response": {"input": [
                          {"type": "item_reference", "id": given}]}},
                      {**mine, "previous_item_id": "root"}):
            client.send(json.dumps(event))
            assert client.receive()["type"] == "conversation.item.created", event
        client.close()
        for event, where in [({"type": "conversation.item.delete", "item_id": given}, "item_id"),
                             ({**mine, "previous_item_id": "item_mine"}, "previous_item_id"),
                             ({"type": "response.create", "response": {"input": [
                                 {"type": "item_reference", "id": "item_up0"}]}},
                              "response.input[0].id"),
                             ({"type": "conversation.item.retrieve", "item_id": 7}, "item_id")]:
            other = connect(gw, issuer.mint("bob@corp.example", ["engineering"]))
            before = len(upstream.received)
            other.send(json.dumps(event))
            error = other.receive()
            assert error["type"] == "error" and error["error"]["code"] == "policy_denied", event
            assert len(upstream.received) == before
            decision = error["event_id"]
            record = gw.audit_where(lambda r, d=decision: r.get("event") == "websocket_message"
                                    and r["decision_id"] == d)[0]
            assert record["reasons"][0]["rule"] == "owner.realtime_item", record
            assert f"names in {where} an item" in record["reasons"][0]["message"], record
            other.close()
    finally:
        upstream.answer = None


@pytest.fixture(scope="module")
def quick(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket_deadline"),
                                gateway={"timeouts": {"answer_silence": 2}})


def test_an_upstream_silent_after_a_message_ends_the_session(quick, issuer):
    """A WebSocket had no answer deadline: an upstream that received a message and then said
    nothing held the session until mitmproxy's `tcp_timeout` (630 s). Now `answer_silence`
    after the client's message the client gets the API's error event and both connections
    close; the record says `upstream.timeout`. A client that is silent itself is not cut."""
    gw, upstream = quick
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    time.sleep(4)  # both sides silent past answer_silence: a session waiting for its user
    client.send(item("still there?"))
    assert client.receive()["delta"] == upstream.reply
    upstream.answer = lambda _message: None
    try:
        started = time.monotonic()
        client.send(item("hello?"))
        error = client.receive(timeout=30)
        assert error is not None and error["type"] == "error", error
        assert error["error"]["code"] == "upstream_timeout"
        assert 2 <= time.monotonic() - started < 30
        client.sock.settimeout(10)
        closed = b""
        with contextlib.suppress(OSError):
            while chunk := client.sock.recv(65536):
                closed += chunk
        assert not chunk  # the proxy closed the connection (a close frame at most before)
    finally:
        upstream.answer = None
    records = gw.audit_where(lambda r: r.get("event") == "websocket_message"
                             and r["decision_id"] == error["event_id"])
    assert records[0]["action"] == "error"
    assert records[0]["reasons"][0]["rule"] == "upstream.timeout"
    client.close()


def test_a_subprotocol_naming_an_organization_is_refused(setup, issuer):
    """A Realtime browser client names the organization (project, its key) as a subprotocol:
    refused before the upstream, as the header is."""
    gw, upstream = setup
    before = len(upstream.headers)
    client = WsClient(gw.port, "/v1/realtime?model=gpt-realtime", {
        "authorization": f"Bearer {issuer.mint('alice@corp.example', ['engineering'])}",
        "sec-websocket-protocol": "realtime, openai-organization.org-other"})
    assert client.status == 403
    assert len(upstream.headers) == before
    record = gw.audit_where(lambda r: r.get("reasons") and
                            r["reasons"][0].get("field") == "headers.sec-websocket-protocol")[0]
    assert record["action"] == "refuse" and record["reasons"][0]["rule"] == "route.header"
    client.close()
