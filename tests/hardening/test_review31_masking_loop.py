"""Review, stop 31: before a text goes to the masking workers, `_mask` asks on the event loop
whether it is only words no value starts in (`streaming.plain`: a regex and `secrets.maybe` a
word, ~12 µs each): 1 MB of such words in a prompt or an answer held the loop 2.4 s (load ~10),
every other flow waiting. Past `PLAIN_CHARS` a text goes to the workers unasked."""

from __future__ import annotations

import asyncio

from douane.flowstate import FlowState
from douane.interaction import TextPiece
from douane.masking import addon, streaming
from douane.settings import Settings
from tests.test_masking import SETTINGS


class Pool:
    def __init__(self) -> None:
        self.sent: list[list[str]] = []

    async def analyze(self, texts: list[str]) -> list:
        self.sent.append(list(texts))
        return [[] for _ in texts]


def test_a_long_text_of_plain_words_is_not_read_word_by_word_on_the_loop(monkeypatch):
    words = []
    real = streaming._plain
    monkeypatch.setattr(streaming, "_plain", lambda w, b: words.append(w) or real(w, b))
    m = addon.Mask(Settings())
    m.masking, m.pool = SETTINGS, Pool()
    long = "we are here and they are there " * 32_000  # ~1 MB
    asyncio.run(m._mask(FlowState("dcn_t", 0.0), [TextPiece("prompt", "user", long, ("x",))]))
    assert m.pool.sent == [[long]]  # (analysed by the workers)
    assert len(words) <= addon.PLAIN_CHARS
    short = "we are here and they are there"
    asyncio.run(m._mask(FlowState("dcn_t", 0.0), [TextPiece("prompt", "user", short, ("x",))]))
    assert m.pool.sent == [[long]]  # (a short plain text still makes no round trip)


def test_a_long_text_of_digits_goes_to_the_workers_unasked(monkeypatch):
    asked = []
    real = addon.could_hold_a_value
    monkeypatch.setattr(addon, "could_hold_a_value", lambda t, e: asked.append(t) or real(t, e))
    m = addon.Mask(Settings())
    m.masking, m.pool = SETTINGS, Pool()
    long = "0123 4567 " * 100_000  # ~1 MB: ~260 ms of guessing on the loop at load ~10
    asyncio.run(m._mask(FlowState("dcn_t", 0.0), [TextPiece("prompt", "user", long, ("x",))]))
    assert m.pool.sent == [[long]] and asked == []
    short = "42"  # (a short text with no value still makes no round trip)
    asyncio.run(m._mask(FlowState("dcn_t", 0.0), [TextPiece("prompt", "user", short, ("x",))]))
    assert m.pool.sent == [[long]] and asked == [short]


def test_a_long_analysis_is_not_guessed_for_a_split():
    from douane.masking import split
    parts = (("PERSON", "LOCATION"), ("EMAIL_ADDRESS", "PHONE_NUMBER"))
    text = "Call Maria Garcia at 212-555-0147 or maria@example.com. "
    assert split.worth([text], parts)
    assert not split.worth([text * (split.MOST_CHARS // len(text) + 1)], parts)
