"""Security, stop 33: the credential-echo check (stop 32) read an ordinary answer's headers and
body, not a stream: an upstream reflecting the org's key inside a stream's events (a model
repeating its request's key at its pace, an error event quoting it) handed it to the caller. A
stream's events and each channel's text are now checked as they pass (`streams.EchoGuard`): the
event or delta that would complete the key, and all after it, never leave; the stream ends with
the API's error event, audited `upstream.credential_echo`. Through a real gateway onto a real
upstream that writes the key split at random points (text split across events, event bytes split
across network writes, at a model's pace); a property test over splits and paces."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from douane.protocols.streams import EchoGuard
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, token_of, with_claude
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream, _anthropic_events, _openai_chat_events

KEY = "3f9a7c01" * 4  # Azure OpenAI's shape: 32 hex digits, no catalogue pattern
CASES = 6  # random splits per protocol through the gateway (each a request at a model's pace)


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    work = tmp_path_factory.mktemp("sec33_stream_echo")
    (work / "policy.yaml").write_text(POLICY.replace(
        '    claude: {models: ["*"]}\n',
        '    claude: {models: ["*"]}\n    az: {models: ["*"]}\n    azc: {models: ["*"]}\n', 1))
    config = base_config(issuer.url, upstream.url + "/v1",
                         policy={"files": [str(work / "policy.yaml")]}, recording={})
    with_claude(config, upstream.url)
    config["upstreams"]["az"] = {"url": upstream.url + "/az", "protocol": "openai", "credential": {
        "env": "DOUANE_TEST_AZURE_KEY", "header": "api-key", "format": "{secret}"}}
    config["upstreams"]["azc"] = {"url": upstream.url + "/azc", "protocol": "anthropic",
                                  "credential": {"env": "DOUANE_TEST_AZURE_KEY",
                                                 "header": "x-api-key", "format": "{secret}"}}
    with Gateway(config, mode=f"reverse:{upstream.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_AZURE_KEY": KEY,
                      "DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


def splits(rng: random.Random, text: str, most: int) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, most))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def streaming(events: list[str], rng: random.Random):
    """An upstream answer writing `events`' bytes in random network writes at a model's pace."""
    data = "".join(events).encode()

    def answer(handler, _req) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for chunk in splits(rng, data.decode(), len(events) * 2):
            raw = chunk.encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            handler.wfile.flush()
            time.sleep(rng.uniform(0, 0.012))
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    return answer


def ask(gw, upstream, token: str, protocol: str, events: list[str], rng) -> httpx.Response:
    upstream.answer = streaming(events, rng)
    try:
        if protocol == "openai":
            return httpx.post(gw.url + "/az/chat/completions", timeout=60,
                              headers={"authorization": f"Bearer {token}"},
                              json={"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
                                    "messages": [{"role": "user", "content": "hello"}]})
        return httpx.post(gw.url + "/azc/v1/messages", timeout=60,
                          headers={"authorization": f"Bearer {token}"},
                          json={"model": "claude-3-5-haiku", "max_tokens": 50, "stream": True,
                                "messages": [{"role": "user", "content": "hello"}]})
    finally:
        upstream.answer = None


def texts(protocol: str, body: str) -> str:
    """The answer's text as a client joins it from the events it received."""
    out = []
    for line in body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        doc = json.loads(line[6:])
        if protocol == "openai":
            out += [c["delta"].get("content") or "" for c in doc.get("choices", [])]
        elif doc.get("type") == "content_block_delta":
            out.append(doc["delta"].get("text", ""))
    return "".join(out)


def events_of(protocol: str, pieces: list[str]) -> list[str]:
    return (_openai_chat_events if protocol == "openai" else _anthropic_events)("m", pieces)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_stream_echoing_the_key_ends_before_it_leaves(gw, upstream, issuer, secrets, protocol):
    """Before (c856cd1): the whole key in the stream, 200, allowed."""
    token = token_of(issuer, secrets, "streamecho@corp.example", ["engineering"])
    for seed in range(CASES):
        rng = random.Random(seed)
        reply = f"Sure. The key you sent me is {KEY}, keep it safe. Anything else?"
        resp = ask(gw, upstream, token, protocol, events_of(protocol, splits(rng, reply, 30)), rng)
        assert KEY not in resp.text, (seed, resp.text[-500:])
        said = texts(protocol, resp.text)
        assert KEY not in said and "keep it safe" not in said, (seed, said)
        assert "Sure. The key you sent" in said, (seed, said)  # what came before still did
        decision_id = resp.headers["x-douane-decision-id"]
        assert "the rest of the answer is withheld" in resp.text and decision_id in resp.text, \
            resp.text[-300:]
        record = gw.audit_record(decision_id)
        assert record["action"] == "refuse", record
        assert record["reasons"][0]["rule"] == "upstream.credential_echo", record
        assert KEY not in json.dumps(record)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_stream_with_the_key_s_beginnings_passes_whole(gw, upstream, issuer, secrets, protocol):
    """What is held back (a tail that may begin the key) leaves with the next delta or at the
    channel's end: the text as sent, whatever the splits."""
    token = token_of(issuer, secrets, "streamecho@corp.example", ["engineering"])
    for seed in range(CASES):
        rng = random.Random(100 + seed)
        reply = f"{KEY[:5]} then {KEY[:-1]} and {KEY[:12]}"
        resp = ask(gw, upstream, token, protocol, events_of(protocol, splits(rng, reply, 20)), rng)
        assert resp.status_code == 200 and "withheld" not in resp.text, resp.text[-300:]
        assert texts(protocol, resp.text) == reply, seed


def test_a_key_outside_the_text_ends_the_stream(gw, upstream, issuer, secrets):
    """In an event's other fields (an id quoting it): the event never leaves."""
    token = token_of(issuer, secrets, "streamecho@corp.example", ["engineering"])
    rng = random.Random(7)
    events = events_of("openai", ["Hello", " there"])
    events[2] = events[2].replace("chatcmpl-fake", f"chatcmpl-{KEY}")
    resp = ask(gw, upstream, token, "openai", events, rng)
    assert KEY not in resp.text and "there" not in texts("openai", resp.text), resp.text
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"] == "upstream.credential_echo", record


def test_the_guard_over_random_splits():
    """The filter alone, 2,000 random splits: the key never leaves whole, nothing else is kept."""
    for seed in range(2000):
        rng = random.Random(seed)
        key = "".join(rng.choice("ab3") for _ in range(rng.randint(3, 12)))
        text = "".join(rng.choice("ab3 ") for _ in range(rng.randint(0, 60)))
        found: list[str] = []
        guard = EchoGuard(key, found.append)
        out = ""
        for piece in splits(rng, text, 12) if len(text) > 1 else [text]:
            out += guard.feed("c", piece)
            if found:
                break
        else:
            out += guard.finish("c")
        assert key not in out, (seed, key, text, out)
        if key in text:
            assert found and text.startswith(out), (seed, key, text, out)
        else:
            assert not found and out == text, (seed, key, text, out)


@pytest.fixture(scope="module")
def realtime(issuer, tmp_path_factory):
    from tests.test_websocket_e2e import realtime_gateway
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("sec33_ws_echo"))


@pytest.mark.parametrize("seed", range(4))
def test_a_websocket_upstream_spelling_the_key_is_cut_before_it_is_whole(realtime, issuer,
                                                                          seed):
    """The key in one message, or completed over several (a Realtime model's deltas, split at
    random): the message that would complete it is dropped, the session ends with the error
    event, audited. Before (c856cd1): every delta delivered, the key whole in the client's text."""
    from tests.test_websocket_e2e import connect, item
    gw, upstream = realtime
    rng = random.Random(seed)
    pieces = [f"the key is {UPSTREAM_KEY}."] if seed == 0 else \
        splits(rng, f"the key is {UPSTREAM_KEY}.", 6)
    sent = iter(pieces)
    upstream.answer = lambda _m: {"type": "response.output_text.delta",
                                  "delta": next(sent, "more")}
    client = connect(gw, issuer.mint("wsecho@corp.example", ["engineering"]))
    said, error = "", None
    try:
        for _ in range(len(pieces) + 1):
            client.send(item("go on"))
            event = client.receive(timeout=10)
            if event is None or event.get("type") == "error":
                error = event
                break
            said += event["delta"]
    finally:
        upstream.answer = None
        client.close()
    assert UPSTREAM_KEY not in said, (seed, said)
    assert error and error["error"]["code"] == "upstream_credential_echo", (seed, error, said)
    records = gw.audit_where(lambda r: r.get("event") == "websocket_message"
                             and r["decision_id"] == error["event_id"])
    assert records[0]["action"] == "refuse", records
    assert records[0]["reasons"][0]["rule"] == "upstream.credential_echo", records


def test_the_echoed_key_is_in_no_file(gw):
    """Neither the recording nor the audit log holds the key the streams above echoed."""
    gw.audit_records()  # (read after the cases above)
    leaks = [p.name for p in gw.state_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
