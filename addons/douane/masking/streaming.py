"""Masking a stream without buffering it: a bounded hold-back window per channel.

Text is released only up to a cut that leaves at least `window` characters of look-ahead behind
it, placed at whitespace, and moved back to the start of any entity that crosses it; so a value
split across deltas ("john.sm" + "ith@example.com") is analysed whole before any of it leaves.
The window (default 32 characters) covers the values douane masks — emails, phone and card
numbers, names, keys — as whole tokens or short runs of tokens; a longer window delays the first
token more (a stream's first characters wait until `window` more have arrived).

The stream callable is synchronous, so analysis is submitted to the worker pool from `feed` and its
result collected by a later `feed`: the event loop never waits for Presidio mid-stream. Each
proposal analyses all the held text, so once no text has arrived since the last one, the spans of
what is held are already known. Only `finish` (a channel's end) may have to wait: when the held
text's analysis is known (the usual case when the end comes a moment after the last delta, as a
model's finish event does), it is applied at once; otherwise the proposal still in flight (queued
behind every other stream's analyses) is dropped and all the held text goes as one analysis to the
pool's urgent worker, so the loop waits for that analysis alone, bounded by the configured
timeout. An analyser failure or timeout raises, and the stream rewriter then ends the stream with
the API's error event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from douane.masking import operators
from douane.masking.config import MaskingSettings
from douane.masking.engine import Span
from douane.masking.pool import Analysis, MaskingPool


@dataclass
class _Channel:
    pending: str = ""  # received, not yet released
    inflight: Analysis | None = None
    snapshot: str = ""  # the text being analysed: all of `pending` when it was proposed
    cut: int = 0  # where the release is proposed to end in `snapshot` (0: nothing yet)
    analysed: list[Span] | None = None  # the spans of `pending`, while no text arrived since


@dataclass
class StreamMasker:
    settings: MaskingSettings
    pool: MaskingPool
    counts: dict[str, int] = field(default_factory=dict)
    channels: dict[str, _Channel] = field(default_factory=dict)

    def feed(self, channel: str, text: str) -> str:
        ch = self.channels.setdefault(channel, _Channel())
        if text:
            ch.pending += text
            ch.analysed = None
        out = ""
        if ch.inflight is not None and ch.inflight.done():
            out = self._release(ch, self.pool.result(ch.inflight)[0])
        if ch.inflight is None and ch.analysed is None and ch.pending:
            self._propose(ch)
        return out

    def finish(self, channel: str) -> str:
        ch = self.channels.pop(channel, None)
        if ch is None:
            return ""
        out = ""
        if ch.inflight is not None and ch.inflight.done():
            out = self._release(ch, self.pool.result(ch.inflight)[0])
        elif ch.inflight is not None:
            ch.inflight.cancel()  # its snapshot is a prefix of `pending`, analysed whole below
        if not ch.pending:
            return out
        spans = ch.analysed
        if spans is None:
            spans = self.pool.result(self.pool.submit([ch.pending], urgent=True))[0]
        return out + operators.apply(self.settings, ch.pending, spans, self.counts)

    def _propose(self, ch: _Channel) -> None:
        limit = len(ch.pending) - self.settings.stream_window
        cut = max(ch.pending.rfind(" ", 0, limit + 1), ch.pending.rfind("\n", 0, limit + 1)) \
            if limit > 0 else 0
        ch.snapshot, ch.cut = ch.pending, max(cut, 0)
        ch.inflight = self.pool.submit([ch.snapshot])

    def _release(self, ch: _Channel, spans: list[Span]) -> str:
        ch.inflight = None
        cut = ch.cut
        while crossing := [s.start for s in spans if s.start < cut < s.end]:
            cut = min(crossing)  # an entity across the cut stays whole, behind it
        released = ch.snapshot[:cut]
        unchanged = len(ch.pending) == len(ch.snapshot)
        ch.pending = ch.pending[cut:]
        if unchanged:
            ch.analysed = [Span(s.start - cut, s.end - cut, s.entity, s.score)
                           for s in spans if s.start >= cut]
        return operators.apply(self.settings, released, [s for s in spans if s.end <= cut],
                               self.counts)
