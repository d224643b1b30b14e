"""Review (stop 30, second round) of the masking pool's urgent batching and the stream-wait turn:
masked streams through a real mitmdump (HTTP/1.1, and HTTP/2: several
streams of a connection) (masking on, two main workers and the urgent one), each
answer split at random (cuts inside the values forced), each event sent after a random pause, and
every stream's last event held until all the others have sent theirs, so that the ends arrive
together and their analyses go out in batches over the workers. Property: every stream reads
exactly the text the whole (unstreamed) answer masks, in order, nothing lost, no value nor a
prefix of one in any event, and every stream ends (the client's timeout is the hang detector).

Seeded: the splits and pauses do not depend on the clock; a loaded machine only changes which
analysis finishes first, which is what the property must hold against.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.test_evasion import H2Only
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream, _openai_chat_events
from tests.test_masking_stream import CORPUS

# texts with values (names, phones, mails, SSNs, cards, IBANs, keys, addresses)
TEXTS = [CORPUS[i] for i in (2, 5, 6, 8, 9, 10, 11, 12, 16, 17, 18, 20)]
VALUES = ("Sarah Johnson", "(212) 555-0183", "emily.r@example.com", "078-05-1120", "219-09-9999",
          "4111 1111 1111 1111", "fatima@example.ae", "john.smith@example.com", "212-555-0147",
          "olivia.martin@example.com", "kevin.obrien@example.com", "Aisha Rahman", "Li Wei",
          "AKIAIOSFODNN7EXAMPLE", "GB82 WEST 1234 5698 7654 32")
STREAMS = 24
ROUNDS = 2


def cuts(text: str, rng: random.Random) -> list[str]:
    """Random pieces of 1-12 characters, with a cut inside each value found in the text."""
    points = set()
    i = 0
    while i < len(text):
        i += rng.randint(1, 12)
        points.add(i)
    for value in VALUES:
        at = text.find(value)
        if at >= 0:
            points.add(at + rng.randint(1, len(value) - 1))
    points = sorted(p for p in points if 0 < p < len(text))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


class PacedUpstream:
    """Answers `case N/seed S` with TEXTS[N] streamed in random pieces at random pauses; the last
    piece of each stream of a round waits (bounded) until every stream of the round sent the rest."""

    def __init__(self, upstream: FakeUpstream):
        self.lock = threading.Lock()
        self.waiting = 0
        self.together = threading.Event()
        self.expected = STREAMS
        upstream.answer = self.answer

    def reset(self) -> None:
        with self.lock:
            self.waiting, self.together = 0, threading.Event()

    def answer(self, handler, req) -> None:
        prompt = req["messages"][0]["content"]
        case, seed = (int(x) for x in prompt.removeprefix("case ").split("/"))
        text = TEXTS[case]
        if not req.get("stream"):
            data = json.dumps({"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                               "model": req["model"], "choices": [{
                                   "index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": text}}]}).encode()
            handler.send_response(200)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        rng = random.Random(seed)
        events = _openai_chat_events(req["model"], cuts(text, rng))
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        together = self.together
        for n, event in enumerate(events):
            if n == len(events) - 3:  # the last text piece: the ends come together
                with self.lock:
                    self.waiting += 1
                    if self.waiting >= self.expected:
                        together.set()
                together.wait(60)
            data = event.encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()
            time.sleep(rng.choice([0, 0, 0.001, 0.005, 0.02, 0.04]))
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    llm = FakeUpstream(tls=True)
    paced = PacedUpstream(llm)
    config = base_config(issuer.url, llm.url, masking={
        "workers": 2, "requests": False, "timeout_seconds": 120})
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true"], workdir=tmp_path_factory.mktemp("review30b-pace")) as gw:
        yield gw, llm, paced
    llm.close()


def chat(case: int, seed: int, stream: bool) -> dict:
    return {"model": "gpt-4o", "stream": stream,
            "messages": [{"role": "user", "content": f"case {case}/{seed}"}]}


def strings(doc) -> list[str]:
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return [doc] if isinstance(doc, str) else []


async def run_round(gw, llm, token: str, seed: int, h2: bool) -> tuple[dict, list]:
    """The whole answers, then STREAMS streams at once (over HTTP/2, 3 on each of 8 connections:
    httpx keeps about 5 streams of a connection open at once, and every stream must be open for
    the ends to come together)."""
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT) if h2 else ssl.create_default_context()
    verify.load_verify_locations(cafile=gw.ca_file)
    clients = [httpx.AsyncClient(proxy=gw.proxy_url("u", token), timeout=180, http2=h2,
                                 verify=verify, limits=httpx.Limits(max_connections=64))
               for _ in range(8 if h2 else 1)]
    try:
        wholes = {}
        for case in range(len(TEXTS)):
            resp = await clients[0].post(llm.url + "/v1/chat/completions",
                                         json=chat(case, 0, False))
            assert resp.status_code == 200, resp.text
            wholes[case] = resp.json()["choices"][0]["message"]["content"]

        async def one(n: int) -> tuple[int, list]:
            case = (seed + n) % len(TEXTS)
            events = []
            async with clients[n % len(clients)].stream(
                    "POST", llm.url + "/v1/chat/completions",
                    json=chat(case, seed * 1000 + n, True)) as resp:
                assert resp.status_code == 200
                assert resp.http_version == ("HTTP/2" if h2 else "HTTP/1.1")
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line.removeprefix("data: ")))
            return case, events

        return wholes, await asyncio.gather(*(one(n) for n in range(STREAMS)))
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_masked_streams_at_random_paces_ending_together_stream_the_whole_answer(setup, issuer,
                                                                                 h2):
    gw, llm, paced = setup
    token = issuer.mint("alice@corp", ["engineering"])
    compared = 0
    for seed in range(1, ROUNDS + 1):
        paced.reset()
        wholes, streams = asyncio.run(run_round(gw, llm, token, seed + 10 * h2, h2))
        assert paced.together.is_set(), "the streams' ends did not come together"
        for case, whole in wholes.items():
            assert not [v for v in VALUES if v in whole], whole  # the values are masked
            assert whole != TEXTS[case]
        for case, events in streams:
            text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
            assert text == wholes[case]
            assert events[-1]["choices"][0]["finish_reason"] == "stop"
            released = [s for e in events for s in strings(e)]
            for value in VALUES:  # no value, nor its first half or more, in any event
                if value in TEXTS[case] and value[:max(4, len(value) // 2)] not in wholes[case]:
                    head = value[:max(4, len(value) // 2)]
                    assert not [s for s in released if head in s], (value, released)
            compared += 1
    assert compared == STREAMS * ROUNDS
