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
