"""A stream masks exactly what the whole answer masks: the release rule of masking/streaming.py
against the real analyser, over random splits at three paces, and fixed cases at every offset.

The analyser's results are memoised per text (a window analysed once is not analysed again), so
the 10,000+ splits cost a few thousand real analyses. The pace is a schedule of when each
analysis finishes relative to the deltas, driven by a seeded random generator: no clock, so a
loaded machine changes nothing.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import random
import sys
from pathlib import Path

import pytest

from douane import protocols
from douane.masking import operators
from douane.masking.addon import RESPONSE_KINDS
from douane.masking.engine import Analyzer, Span, trim_name
from douane.masking.streaming import (
    StreamMasker,
    could_release,
    plain_prefix,
    release_point,
    shift,
)
from douane.protocols import anthropic, openai, streams
from tests.support import upstream
from tests.support.upstream import anthropic_stream, responses_stream
from tests.test_masking import SETTINGS
from tests.test_protocols import ANTHROPIC, OPENAI, events, flow_for, streamed_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from masking_corpus import corpus  # noqa: E402

CORPUS = [
    # the token right after "Bearer " (a cut there used to lose the prefix)
    "Use this header: Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345 and retry the call.",
    "curl -H 'Authorization: Bearer eyZ0eXAiOiJKV1QiLCJhbGciOi.x9k2mL7pQrStUvWxYz01' https://api",
    # rows after their header
    "name,email,phone\nJohn Smith,john.smith@example.com,212-555-0147\nMaria Garcia,"
    "maria.garcia@example.org,+44 20 7946 0958\nwei zhang,wei@example.net,415-555-0199\n",
    " id | full_name      | city\n----+----------------+--------\n  1 | Anna Kowalski  | Warsaw\n"
    "  2 | Pierre Dubois  | Lyon\n  3 | Ravi Patel     | Leeds\n(3 rows)\n",
    # a table longer than the left context: its last rows are read with the header carried
    "Here are the accounts:\nfull_name,email,city,ssn\nAnna Berg,anna.berg@example.com,Oslo,"
    "219-09-9999\nJohn Roe,jroe@example.org,Paris,123-45-6789\nLi Wei,li.wei@example.cn,Beijing,"
    "212-09-9998\nTom Ford,tom@example.com,Austin,219-09-9997\nMia Khan,mia@example.pk,Lahore,"
    "219-09-9996\nOla Nordmann,ola@example.no,Bergen,219-09-9995\n\nTotal: 6 accounts.",
    '{"user": {"id": 42, "display_name": "Olivia Martin", "email": "olivia.martin@example.com",'
    ' "client_ip": "2001:0db8:85a3:0000:0000:8a2e:0370:7334"}}',
    "Hi Thomas,\n\nthanks for the update. Could you send the contract to Sarah Johnson before "
    "Friday? Her number is (212) 555-0183.\n\nBest,\nEmma",
    "commit 9f2c1e7\nAuthor: Daniel Weber <daniel.weber@example.de>\nDate:   Mon Nov 30\n\n"
    "    Fix the retry loop\n",
    "sure! i talked to james yesterday and he said that emily can take the shift, her email is "
    "emily.r@example.com if you need it",
    # an SSN inside a PERSON span, cards, IBANs and phones written in groups
    "Patient John Smith 078-05-1120 was admitted on Tuesday with a fever.",
    "Employee Jane Roe, SSN 219-09-9999, started on Monday in the Boston office.",
    "Pay with card 4111 1111 1111 1111 or transfer to GB82 WEST 1234 5698 7654 32 today.",
    "Wire to LC55 HEMM 0001 0001 0012 0012 0002 3015 and call +1 (212) 555-0147 ext. 12 after.",
    # network addresses
    "The gateway is 192.168.10.24, the upstream 2001:db8:85a3:0:0:8a2e:370:7334 and fe80::1.",
    "Here is the key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    "BKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END RSA PRIVATE KEY-----\nKeep it safe.",
    "Set AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE and OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstu"
    "vwxyz0123 in the environment, then run the job as Michael Brown.",
    # prose and hard negatives
    "The report by Dr. Aisha Rahman and Carlos Mendoza covers Q3; version 3.12.1 shipped with "
    "order 550e8400-e29b-41d4-a716-446655440000 on time.",
    "Meeting notes: Li Wei presented, Sophie Laurent asked about the S3 costs, and Ahmed Khan "
    "will follow up with the EKS team at 10:30 tomorrow.",
    "2026-11-30T09:12:44Z INFO login user=kevin.obrien@example.com ip=10.0.4.17 "
    "agent=Mozilla/5.0 session=7f3a9c1d\n2026-11-30T09:12:45Z WARN retry user=kevin.obrien"
    "@example.com ip=10.0.4.17\n",
    "Nothing sensitive here: just a list of steps to restart the service and check its logs.",
    "Contact: Fatima Al-Sayed, fatima@example.ae, +971 4 123 4567; backup: Jonas Berg.",
]


@pytest.fixture(scope="module")
def analyse():
    analyzer = Analyzer(SETTINGS)
    memo: dict[str, list[Span]] = {}

    def run(text: str) -> list[Span]:
        if text not in memo:
            memo[text] = analyzer.analyze(text)
        return memo[text]

    run.memo = memo  # type: ignore[attr-defined]
    return run


class ScheduledPool:
    """The pool's interface; each analysis finishes when the pace says so, relative to the
    deltas (a real one finishes on a worker while the stream callable is not running). An
    analysis waits in the queue (it may be cancelled) until a tick sends it to a worker, now or
    later; waiting for one on a worker (`result`) finishes it."""

    def __init__(self, analyse, pace: str, rng: random.Random):
        self.analyse, self.pace, self.rng = analyse, pace, rng
        self.out: list[tuple[str, concurrent.futures.Future, int]] = []

    def submit(self, texts, urgent=False):
        future: concurrent.futures.Future = concurrent.futures.Future()
        if urgent:
            future.set_result([self.analyse(t) for t in texts])
        else:
            # burst: nothing finishes before the end; model: before the next delta; slow: after
            # 0 to 4 more deltas (sometimes just before the end, sometimes not)
            wait = {"burst": 10**9, "model": 0, "slow": self.rng.randint(0, 4),
                    "mixed": self.rng.choice([0, 0, 1, 2, 3, 6, 10**9])}[self.pace]
            self.out.append((texts[0], future, wait))
        return future

    def tick(self) -> None:
        """Between two deltas: analyses whose time has come finish, queued ones may start."""
        still = []
        for text, future, wait in self.out:
            if future.done():  # cancelled, or waited for
                continue
            if not future.running() and (wait <= 0 or self.rng.random() < 0.5):
                future.set_running_or_notify_cancel()
            if wait <= 0:
                future.set_result([self.analyse(text)])
            else:
                still.append((text, future, wait - 1))
        self.out = still

    def result(self, future):
        if future.running():
            text = next(t for t, f, _ in self.out if f is future)
            future.set_result([self.analyse(text)])
        return future.result(timeout=0)


def whole(analyse, text: str) -> str:
    return operators.apply(SETTINGS, text, analyse(text), {})


def stream(analyse, deltas: list[str], pace: str, rng: random.Random) -> tuple[str, list[str]]:
    pool = ScheduledPool(analyse, pace, rng)
    masker = StreamMasker(SETTINGS, pool)
    out = []
    for delta in deltas:
        pool.tick()
        out.append(masker.feed("c", delta))
        if rng.random() < 0.1:
            out.append(masker.feed("c", ""))  # an event without text (another channel's)
    if pace != "burst" and rng.random() < 0.5:
        pool.tick()  # the end comes a moment after the last analysis finished
        out.append(masker.feed("c", ""))
    if rng.random() < 0.5:  # the end's layer waits for what `ready` names (protocols.streamwait)
        while (waited := masker.ready("c")) is not None:
            pool.result(waited)
    out.append(masker.finish("c"))
    return "".join(out), out


def random_split(text: str, rng: random.Random, most: int) -> list[str]:
    deltas, i = [], 0
    while i < len(text):
        n = rng.randint(1, most)
        deltas.append(text[i:i + n])
        i += n
    return deltas


SPLITS_PER_TEXT = 160  # x 21 texts x 3 paces = 10,080 random splits


@pytest.mark.parametrize("pace", ["burst", "model", "slow"])
def test_random_splits_stream_exactly_what_the_whole_answer_masks(analyse, pace):
    rng = random.Random(f"douane-{pace}")
    mismatches, released_early = [], 0
    for text in CORPUS:
        expected = whole(analyse, text)
        for _ in range(SPLITS_PER_TEXT):
            # a model's pace (1-8 characters per delta), or larger pieces now and then
            deltas = random_split(text, rng, rng.choice([8, 8, 8, 40]))
            got, pieces = stream(analyse, deltas, pace, rng)
            if got != expected:
                mismatches.append((text[:40], deltas))
            released_early += any(pieces[:-1])
    assert len(CORPUS) * SPLITS_PER_TEXT == 3360
    assert not mismatches, mismatches[:3]
    # still a stream: text leaves before the end (when the analyses finish before it)
    share = {"burst": 0, "model": 0.9, "slow": 0.7}[pace]
    assert released_early >= share * len(CORPUS) * SPLITS_PER_TEXT


CASES = [
    (CORPUS[0], "abcdefghij"),
    (CORPUS[2], "wei zhang"),
    (CORPUS[3], "Leeds"),
    (CORPUS[4], "Ola Nordmann"),
    (CORPUS[4], "Bergen"),
    (CORPUS[5], "Olivia"),
    (CORPUS[5], "2001:0db8"),
    (CORPUS[6], "Thomas"),
    (CORPUS[7], "Daniel Weber"),
    (CORPUS[9], "078-05"),
    (CORPUS[9], "1120"),
    (CORPUS[12], "LC55"),
]


@pytest.mark.parametrize(("text", "value"), CASES)
def test_a_value_split_at_every_offset_streams_as_whole(analyse, text, value):
    expected = whole(analyse, text)
    assert value not in expected, "the case must be one the whole answer masks"
    rng = random.Random(0)
    for pace in ("burst", "model", "slow"):
        for offset in range(1, len(text)):
            got, _ = stream(analyse, [text[:offset], text[offset:]], pace, rng)
            assert got == expected, (pace, offset)
            # one character at a time from the split on, each analysis finishing in between
            if offset % 7 == 0:
                deltas = [text[:offset], *text[offset:]]
                assert stream(analyse, deltas, pace, rng)[0] == expected, (pace, offset)


def test_a_text_that_starts_with_spaces_streams_as_whole(analyse):
    """The spaces that start a text leave at once; the analyses read them again (a block of an
    answer often starts with one): spaCy tags `Lívia` a place in `Ana Lívia for the fix in
    1691196117.`, not in ` Ana Lívia ...`, and the stream masked what the whole answer did not."""
    text = (" Ana Lívia for the fix in 1691196117. Ramos will send the signed copy to "
            "ramos@outlook.com.br by Friday.")
    expected = whole(analyse, text)
    assert "Lívia" in expected
    rng = random.Random(0)
    for pace in ("burst", "model", "slow"):
        for _ in range(20):
            assert stream(analyse, random_split(text, rng, 8), pace, rng)[0] == expected, pace


def test_what_a_stream_keeps_of_released_text_is_bounded():
    from douane.masking import streaming

    class NoSpans(ScheduledPool):
        def __init__(self):
            super().__init__(lambda text: [], "model", random.Random(0))

    pool = NoSpans()
    masker = StreamMasker(SETTINGS, pool)
    text = "word " * 4000 + "\n" + "name,city\n" + "Anna Berg,Oslo\n" * 2000
    out = []
    for i in range(0, len(text), 7):
        pool.tick()
        out.append(masker.feed("c", text[i:i + 7]))
        ch = masker.channels["c"]
        assert len(ch.released) <= 2 * streaming.LEFT_CHARS and len(ch.line) <= streaming.LINE_CHARS
        assert len(ch.rows) <= 2 and len(ch.window) < 2 * streaming.LINE_CHARS
    assert "".join(out) + masker.finish("c") == text
    assert ch.tables.header == "name,city" and ch.tables.rows > 1900


# -- the same property through the stream rewriter, in each API's own events --------------------

API_STREAMS = {
    "chat": (OPENAI, "/v1/chat/completions", {"messages": [], "stream": True},
             upstream._openai_chat_events),
    "responses": (OPENAI, "/v1/responses", {"input": "x", "stream": True},
                  upstream._responses_events),
    "anthropic": (ANTHROPIC, "/v1/messages", {"messages": [], "stream": True},
                  upstream._anthropic_events),
}


def api_texts() -> list[tuple[str, list[str]]]:
    """(text, its labelled values): the fixed corpus and the labelled corpus's kinds (names,
    places, emails, phones, cards, SSNs, IBANs, IPs, keys of the secret catalogue, CSV and psql
    rows, JSON tool results, logs, code) in several locales."""
    items = [(text, []) for text in CORPUS]
    return items + [(item.text, [item.text[s:e] for s, e, _ in item.spans])
                    for item in corpus(36, seed=17)]


def strings(doc) -> list[str]:
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return [doc] if isinstance(doc, str) else []


@pytest.mark.parametrize("api", list(API_STREAMS))
def test_each_api_streams_exactly_what_the_whole_answer_masks(analyse, api):
    """Each text streamed as the API's events in 1-8 character deltas, the SSE bytes cut at
    random places (an event split, several in one read), each analysis finishing 0-6 reads after
    it started or only at the end, a channel's end waiting in the rewriter's backlog for its
    analysis (the layer pausing) or not: what the client reads is the whole answer masked, and
    no value the whole answer masks is in any string of any event (the recaps of Responses too).
    """
    rng = random.Random(f"douane-api-{api}")
    _, _, _, events_of = API_STREAMS[api]
    mismatches = []
    for text, labelled in api_texts():
        expected = whole(analyse, text)
        masked_values = [v for v in {*labelled, *(text[s.start:s.end] for s in analyse(text))}
                         if v.strip() and v not in expected]
        for _ in range(2):
            data = "".join(events_of("m", random_split(text, rng, 8))).encode()
            body, rewriter, _ = rewritten(analyse, api, data, rng, "mixed")
            leaked = [v for e in sse_events(body) for s in strings(e) for v in masked_values
                      if v in s]
            if streamed_text(api, body) != expected or leaked or rewriter.abort_message:
                mismatches.append((api, text[:40], leaked[:2], rewriter.abort_message))
    assert not mismatches, mismatches[:3]


def rewritten(analyse, api: str, data: bytes, rng: random.Random,
              pace: str) -> tuple[bytes, streams.StreamRewriter, bytes]:
    """The SSE bytes through the API's rewriter and a masker, cut at random places (an event
    split, several in one read), each analysis finishing at `pace`, a channel's end waiting in
    the rewriter's backlog for its analysis (the layer pausing) or not: (what the client gets,
    the rewriter, what it got before the upstream's last byte)."""
    upstream_, path, request, _ = API_STREAMS[api]
    pool = ScheduledPool(analyse, pace, rng)
    it = protocols.parse_request(upstream_, flow_for(upstream_, path, request))
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream_, it), it, "dcn_t")
    if rng.random() < 0.5:
        rewriter.filters.append(Passing())  # the policy's filter comes before the masker
    rewriter.filters.append(StreamMasker(SETTINGS, pool))
    out, i, pausing = [], 0, rng.random() < 0.5
    while i < len(data):
        n = rng.randint(1, 160)
        pool.tick()
        out += rewriter(data[i:i + n])
        if pausing:
            out += paused(rewriter, pool, end=False)
        i += n
    early = b"".join(out)
    if rng.random() < 0.5:
        pool.tick()  # the end comes a moment after the last analysis finished
    if pausing:
        out += paused(rewriter, pool, end=True)
    out.append(rewriter(b""))
    return b"".join(out), rewriter, early


class Passing:
    """A filter that holds nothing and cannot follow a block into the next (the policy's could
    not): the masker after it still reads blocks in a row as one text."""

    def feed(self, channel: str, text: str) -> str:
        return text

    def finish(self, channel: str) -> str:
        return ""


def paused(rewriter: streams.StreamRewriter, pool: ScheduledPool, end: bool) -> list[bytes]:
    """What the stream's layer does (protocols.streamwait): while the rewriter waits for
    analyses, they finish (the layer is paused on its hook), then it resumes."""
    out = []
    while (waiting := rewriter.waits(end)) or rewriter.backlog:
        for future in waiting:
            pool.result(future)
        out.append(rewriter.resume())
    return out


def sse_events(body: bytes) -> list:
    return [json.loads(payload) for _, payload in events(body)
            if payload.strip() not in ("", "[DONE]")]


# -- an answer in several blocks: read as one text where the whole answer reads them so -------------

# what providers send between two text blocks (Anthropic), or between two message parts
# (Responses): the whole answer reads the texts on either side apart, and so must a stream; the
# address in them is masked wherever it is (tool input, thinking, a search result's title)
ADDRESS = "ana.souza@example.org"
BETWEEN = {
    "anthropic": [
        {"type": "tool_use", "id": "toolu_1", "name": "mail", "input": {"to": ADDRESS}},
        {"type": "thinking", "thinking": f"The user wants to write to {ADDRESS}.",
         "signature": "c2lnbmF0"},
        {"type": "redacted_thinking", "data": "ZW5jcnlwdGVkIHRoaW5raW5n"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
         "input": {"query": f"who is {ADDRESS}"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
            {"type": "web_search_result", "url": "https://example.org/team",
             "title": f"Team: {ADDRESS}", "encrypted_content": "ZW5jcnlwdGVk", "page_age": None}]},
    ],
    "responses": [
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "mail",
         "arguments": json.dumps({"to": ADDRESS}), "status": "completed"},
        {"type": "reasoning", "id": "rs_1", "summary": [
            {"type": "summary_text", "text": f"The user wants to write to {ADDRESS}."}]},
    ],
}
CITATION = {"type": "char_location", "cited_text": "Office hours are 9 to 5.", "document_index": 0,
            "document_title": "Handbook", "start_char_index": 0, "end_char_index": 24}


def answer_in_blocks(api: str, texts: list[str], between: dict[int, dict],
                     rng: random.Random) -> dict:
    """The whole answer with `texts` in blocks in a row (Anthropic text blocks, some with a
    citation; Responses output parts of one message, or messages of one part each), and before
    text `n` the block `between[n]` (a tool call, thinking, ...)."""
    if api == "anthropic":
        content: list[dict] = []
        for n, text in enumerate(texts):
            content += [between[n]] if n in between else []
            cited = {"citations": [CITATION]} if rng.random() < 0.3 else {}
            content.append({"type": "text", "text": text, **cited})
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": content, "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 7}}
    items: list[dict] = []
    one_message = rng.random() < 0.5
    for n, text in enumerate(texts):
        part = {"type": "output_text", "text": text, "annotations": []}
        if n in between or not one_message or not items or items[-1]["type"] != "message":
            items += [between[n]] if n in between else []
            items.append({"type": "message", "id": f"msg_{n}", "role": "assistant",
                          "status": "completed", "content": [part]})
        else:
            items[-1]["content"].append(part)
    return {"id": "resp_1", "object": "response", "created_at": 0, "status": "completed",
            "model": "m", "output": items}


def whole_blocks(analyse, api: str, answer: dict) -> list[str]:
    """The answer's text blocks as the gateway masks the whole answer (`Mask._mask`): read in
    the runs `streams.read_together` makes, each block masked with its share of each value."""
    upstream_, path, request, _ = API_STREAMS[api]
    it = protocols.parse_request(upstream_, flow_for(upstream_, path, request))
    (anthropic if api == "anthropic" else openai).parse_response(answer, it)
    masked = {}
    for run in streams.read_together([p for p in it.response_texts
                                      if p.kind in RESPONSE_KINDS and p.editable]):
        spans, start = analyse("".join(p.text for p in run)), 0
        for piece in run:
            end = start + len(piece.text)
            masked[piece.path] = operators.apply(SETTINGS, piece.text, shift(spans, start, end),
                                                 {})
            start = end
    if api == "anthropic":
        return [masked[("content", i, "text")] for i, b in enumerate(answer["content"])
                if b["type"] == "text"]
    return [masked[("output", o, "content", c, "text")] for o, item in enumerate(answer["output"])
            if item["type"] == "message" for c in range(len(item["content"]))]


def streamed_blocks(api: str, body: bytes) -> list[str]:
    """The text of each text block as the client reads it, checking the stream's structure on
    the way: a block's text only between its start and its end, each end repeating exactly what
    was streamed (Responses' `.done` events, `response.completed`)."""
    texts: dict[tuple, str] = {}
    opened: set[tuple] = set()
    for e in sse_events(body):
        if api == "anthropic":
            key: tuple = (e.get("index"),)
            if e["type"] == "content_block_start":
                opened.add(key)
            elif e["type"] == "content_block_stop":
                opened.discard(key)
            elif e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta":
                assert key in opened, e
                texts[key] = texts.get(key, "") + e["delta"]["text"]
            continue
        key = (e.get("output_index"), e.get("content_index"))
        if e["type"] == "response.content_part.added":
            opened.add(key)
        elif e["type"] == "response.output_text.delta":
            assert key in opened, e
            texts[key] = texts.get(key, "") + e["delta"]
        elif e["type"] == "response.output_text.done":
            opened.discard(key)
            assert e["text"] == texts.get(key, ""), (e, texts)
        elif e["type"] == "response.content_part.done" and e["part"]["type"] == "output_text":
            assert e["part"]["text"] == texts.get(key, ""), (e, texts)
        elif e["type"] in ("response.output_item.done", "response.completed"):
            items = [(e["output_index"], e["item"])] if "item" in e else \
                enumerate(e["response"]["output"])
            for o, item in items:
                for c, part in enumerate(item.get("content") or []):
                    if item["type"] == "message":
                        assert part["text"] == texts.get((o, c), ""), (e, texts)
    assert not opened
    return list(texts.values())


def skeleton(api: str, body: bytes) -> list[tuple]:
    """The events but text deltas, with their indexes: what must stay as the upstream sent it."""
    return [(e["type"], e.get("index"), e.get("output_index"), e.get("content_index"))
            for e in sse_events(body) if not e["type"].endswith(".delta") and not (
                e["type"] == "content_block_delta" and e["delta"]["type"] in anthropic.DELTAS)]


def blocks_case(analyse, api: str, text: str, cuts: list[int], between: dict[int, dict],
                rng: random.Random, pace: str = "mixed") -> tuple[str, list, list, bytes]:
    """`text` cut into text blocks at `cuts`, streamed in 1-8 character deltas and rewritten
    at `pace`: (the labels of what went wrong, if anything; streamed blocks; whole blocks; what
    the client got before the upstream's last byte)."""
    bounds = [0, *cuts, len(text)]
    texts = [text[a:b] for a, b in itertools.pairwise(bounds)]
    answer = answer_in_blocks(api, texts, between, rng)
    events_of = anthropic_stream if api == "anthropic" else responses_stream
    data = "".join(events_of(answer, lambda t: random_split(t, rng, 8) or [""])).encode()
    body, rewriter, early = rewritten(analyse, api, data, rng, pace)
    expected = whole_blocks(analyse, api, answer)
    got = streamed_blocks(api, body)
    wrong = [what for what, bad in [
        ("aborted", rewriter.abort_message), ("blocks differ", got != expected),
        ("structure changed", skeleton(api, body) != skeleton(api, data)),
        ("address left", any(ADDRESS in s for e in sse_events(body) for s in strings(e)))] if bad]
    return ", ".join(wrong), got, expected, early


@pytest.mark.parametrize("api", ["anthropic", "responses"])
def test_blocks_in_a_row_stream_exactly_what_the_whole_answer_masks(analyse, api):
    """The texts of the API property test above, each cut into 2-3 blocks (mostly inside a
    value), sometimes with a tool call, thinking, redacted thinking or server tool result
    between: each block the client reads is the whole answer's block masked (a value across
    two blocks in a row masked in both, as the whole answer masks it; across a tool call
    neither reads them together), the events and indexes are the upstream's, and no value the
    whole answer masks is in any string of any event."""
    rng = random.Random(f"douane-blocks-{api}")
    mismatches, across = [], 0
    for text, labelled in api_texts():
        inside = [i for s in analyse(text) for i in range(s.start + 1, s.end)]
        for _ in range(3):
            cuts = sorted({rng.choice(inside) if inside and rng.random() < 0.7 else
                           rng.randint(1, len(text) - 1) for _ in range(rng.choice([1, 1, 2]))})
            between = {n: rng.choice(BETWEEN[api]) for n in range(1, len(cuts) + 1)
                       if rng.random() < 0.25}
            wrong, got, expected, _ = blocks_case(analyse, api, text, cuts, between, rng)
            across += not between and any(i in inside for i in cuts)
            leaked = [v for v in {*labelled, *(text[s.start:s.end] for s in analyse(text))}
                      if v.strip() and v not in "".join(expected) and
                      any(v in "".join(got[i:i + 2]) for i in range(len(got)))]
            if wrong or leaked:
                mismatches.append((wrong, leaked[:2], cuts, text[:60]))
    assert not mismatches, mismatches[:3]
    assert across >= 60  # cuts through a value between two text blocks in a row


@pytest.mark.parametrize("api", ["anthropic", "responses"])
def test_a_value_split_across_two_blocks_streams_as_whole_at_every_offset(analyse, api):
    """The red team's case: `...email maria.garcia` | `@example.com...` (and a phone number)
    in two blocks in a row, cut at every offset through the values, at every pace. At a model's
    pace the first block's end leaves with the second block's first words, not at the end."""
    text = ("Sure, please email maria.garcia@example.com or call 212-555-0147 today. We will get "
            "back to you within two business days with the signed contract and the invoice.")
    start, end = text.index("maria"), text.index(" today")
    end_of_first = {"anthropic": b'"content_block_stop", "index": 0',
                    "responses": b'"response.output_text.done"'}[api]
    rng = random.Random(api)
    for pace in ("burst", "model", "slow"):
        for cut in range(start, end + 1):
            wrong, got, expected, early = blocks_case(analyse, api, text, [cut], {}, rng, pace)
            assert not wrong, (wrong, pace, cut, got, expected)
            assert not any(v in "".join(got) for v in ("garcia", "example.com", "0147")), got
            assert pace != "model" or end_of_first in early, cut  # still a stream


def test_what_waits_behind_a_blocks_end_is_bounded_by_the_text_held(analyse):
    """An answer in 150 blocks of 1-6 characters in a row, at a model's pace: what waits behind
    the blocks' ends (the parked ends and the events after them) is never more than the text the
    masker holds, which stays within its usual window; and every block is the whole answer's."""
    rng = random.Random(5)
    text = "Thanks for asking, we will write to maria.garcia@example.com today. " * 10
    bounds = [0]
    while bounds[-1] < len(text):
        bounds.append(min(len(text), bounds[-1] + rng.randint(1, 6)))
    answer = answer_in_blocks("anthropic", [text[a:b] for a, b in itertools.pairwise(bounds)],
                              {}, rng)
    upstream_, path, request, _ = API_STREAMS["anthropic"]
    pool = ScheduledPool(analyse, "model", rng)
    it = protocols.parse_request(upstream_, flow_for(upstream_, path, request))
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream_, it), it, "dcn_t")
    masker = StreamMasker(SETTINGS, pool)
    rewriter.filters.append(masker)
    out, most = [], 0
    for event in anthropic_stream(answer, lambda t: random_split(t, rng, 3)):
        pool.tick()
        out += rewriter(event.encode())
        held = sum(len(ch.pending) for ch in masker.channels.values())
        waiting = sum(len(p.items) for p in rewriter.parked)
        assert len(rewriter.parked) <= held + 1 and waiting <= 3 * held + 3, (held, waiting)
        most = max(most, held)
    out.append(rewriter(b""))
    assert most < 100 and len(answer["content"]) > 100
    assert streamed_blocks("anthropic", b"".join(out)) == whole_blocks(analyse, "anthropic", answer)


# -- what leaves without analysis ------------------------------------------------------------------

@pytest.mark.parametrize(("before", "held", "end", "released"), [
    ("", "Sure", False, ""),  # the word may still grow ("Suresh")
    ("", "Sure. Th", False, "Sure. "),
    ("", "\n\nCertainly! Here is the", False, "\n\nCertainly! Here is "),
    ("", "I can help you", False, "I can "),  # "help" may be a name as far as this rule knows
    ("", "I can do it", True, "I can do it"),  # at the channel's end the last word is whole
    ("", "The Smiths are", False, "The "),
    ("Dear ", "the team", False, "the "),  # a greeting's name never starts with "the"
    ("", "IN a", False, ""),  # all capitals: a place (Indiana), not the word "in"
    ("", "May I", False, ""),  # a name too
    # what a secret's value follows: the value may be any word of two character classes
    ("password is ", "Certainly so", False, ""),
    ("password: ", "Certainly so", False, ""),
    ("PASSWORD=", "Certainly so", False, ""),
    ("Authorization: Bearer ", "the rest", False, ""),
    ("basic ", "the rest", False, ""),
    ('"name": "', "  The x", False, ""),  # a JSON value may start with spaces
    ("her email ", "is john@x.com", False, "is "),
    ("call ", "on +1 212", False, "on "),
    ("Maria", " the", False, ""),  # the held text starts inside a word
    ("word " * 60, "the end", False, "the "),
    ("y" * 300 + " ", "the end", False, ""),  # the word before is cut: unknown
])
def test_only_words_no_value_can_start_in_leave_without_analysis(before, held, end, released):
    assert held[:plain_prefix(before, held, end)] == released


def test_names_and_places_never_start_with_a_word_that_leaves_unanalysed():
    text = "Sure. The Hague, Theodore, IN, Will Smith and May Chen. the james"
    spans = [Span(text.index(v), text.index(v) + len(v), "LOCATION", 0.85)
             for v in ("Sure", "The Hague", "Theodore", "eodore", "IN", "Will Smith", "May Chen",
                       "the james")]
    assert [text[s.start:s.end] if s else None for s in (trim_name(text, s) for s in spans)] == [
        None, "Hague", "Theodore", "eodore", "IN", "Will Smith", "May Chen", "james"]


@pytest.mark.parametrize("text, first", [
    ("Else Lasker wrote the poem.", "Else"),
    ("She moved to Great Britain in 2019.", "Great"),
])
def test_a_name_that_starts_with_a_function_word_is_masked_whole(analyse, text, first):
    """Per, Else, Ever are given names, Great and Front start places: a name is not trimmed of
    them (the whole answer and a stream would leave the first name in clear)."""
    masked = whole(analyse, text)
    assert first not in masked, masked
    rng = random.Random(text)
    for pace in ("burst", "model", "slow"):
        assert stream(analyse, random_split(text, rng, 4), pace, rng)[0] == masked


def test_a_masked_channels_end_takes_a_turn_even_when_its_analysis_is_known(analyse):
    """A masked stream's channel end pauses the stream's layer once (`streams.TURN`: the end's
    work then runs in a turn of the loop's share), even when nothing is left to analyse; the
    end is let through on resume, with the text masked as the whole answer; a rewriter with no
    filter that holds text never pauses (its layer is not wrapped without masking)."""
    upstream_, path, request, events_of = API_STREAMS["chat"]
    text = "Write to maria.garcia@example.com today please."
    *deltas, finish, done = events_of("m", [text[:20], text[20:]])
    for masked in (True, False):
        pool = ScheduledPool(analyse, "model", random.Random(0))
        it = protocols.parse_request(upstream_, flow_for(upstream_, path, request))
        rewriter = streams.StreamRewriter(protocols.stream_format(upstream_, it), it, "dcn_t")
        rewriter.filters.append(StreamMasker(SETTINGS, pool) if masked else Passing())
        out = []
        for event in deltas:
            pool.tick()
            out += rewriter(event.encode())
        pool.tick()  # the held text's analysis is known before the end comes
        out += rewriter((finish + done).encode())
        if masked:
            assert rewriter.backlog and rewriter.waits(False) == [streams.TURN]
            out.append(rewriter.resume())
            assert not rewriter.backlog and rewriter.waits(False) == []
        else:
            assert not rewriter.backlog and rewriter.waits(False) == []
        assert rewriter.waits(True) == []
        out.append(rewriter(b""))
        body = b"".join(out)
        assert streamed_text("chat", body) == (whole(analyse, text) if masked else text)
        assert body.endswith(b"data: [DONE]\n\n")


def test_no_proposal_is_made_for_held_text_no_analysis_could_release():
    """`could_release` is what `release_point` needs for any cut (found or not, a detection
    only moves a cut back): held text it refuses stays held whatever an analysis finds, so no
    analysis is proposed for it (the end makes its own). Random held texts of words, value
    groups, long tokens and spaces, after random left context, at several holds."""
    rng = random.Random("douane-could-release")
    words = ["a", "Maria", "4111", "1111", "+1", "(212)", "555-0147", "x" * 40, "e@x.io", "the",
             "Garcia;", "\n", "  "]
    released = refused = 0
    for _ in range(20_000):
        held = "".join(rng.choice(words) + rng.choice(["", " ", " ", "\n", "  "])
                       for _ in range(rng.randint(1, 12)))
        context = "".join(rng.choice(words) + " " for _ in range(rng.randint(0, 4)))
        hold = rng.choice([0, 8, 32, 64])
        cut = release_point(context + held, len(context), [], hold)
        if not could_release(held, hold):
            assert cut == len(context), (context, held, hold)
            refused += 1
        released += cut > len(context)
    assert released > 1000 and refused > 1000  # neither side is vacuous
