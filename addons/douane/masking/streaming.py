"""Masking a stream without buffering it: it leaves masked exactly as the whole answer would.

The release rule. For any split of an answer into deltas, at any pace, the client receives the
text `operators.apply(text, analyze(text))` of the whole answer. The analyser is local, but for
tables: a detection depends on a bounded neighbourhood of the text — spaCy's NER reads each token
through a CNN that sees 4 tokens either side, its entity decisions look at the current token, the
previous one and the entity's first; the pattern recognisers see their match, one character
around it and, for context words, the 5 tokens before it; the field recognisers
(`masking.fields`) see a `key: value` line or a greeting; a table's rows are read against its
header, however far above. So each analysis covers a *window*:

- left context, from text already released: the last `LEFT_WORDS` words (at most `LEFT_CHARS`
  characters, from the start of their line when it is among them); or, while a table is open (the
  table state, `fields.Tables`, is fed every released line), the table's header and rule lines,
  its last rows and the current row so far. So what needs the text before it is decided as the
  whole answer decides it: the token after `Bearer `, a CSV or psql row far below its header,
  `"display_name": "…"`, `Hi …,`, `Author: … <email>`, lower-case names in chat. Released text is
  never changed; detections that end inside it are ignored.
- the held text: every character received and not yet released.

A proposal analyses the window; its result releases the held text up to a cut `c` that
1. starts a word (it follows whitespace), so the tokens on both sides are the whole answer's;
2. leaves at least `stream_window` characters and `RIGHT_WORDS` complete words behind it, so the
   decisions about the text before the cut have the right context the whole answer gives them
   (4 tokens for spaCy; a value's last group for a recogniser that validates a checksum);
3. does not split a run of value-shaped words ("4111 1111", "+1 (212) 555", "GB82 WEST 1234":
   digits and capitals in groups of a phone, card or IBAN that may still grow and become valid
   only when complete), up to `RUN_CHARS` characters of run;
4. does not fall inside the last, incomplete line while a table is open: a row's cells are
   counted against the header's, so a row leaves only whole;
5. crosses no detection: a detection across the cut moves it back to the detection's start, so a
   value still arriving (a private key block, a name followed by its surname) stays whole.
The text before the cut leaves masked with the detections that lie in it. At the channel's end
the rest is decided by one analysis of the same window (left context + held text).

Words no value can start in leave at once, before any analysis (`plain_prefix`), so the first
token of an answer is not held for the window: a whole word of letters that no name or place
starts with (`engine.not_a_name`: function words and answer openers; NER and field spans are
trimmed of them at their start, in every analysis), followed by whitespace, with none of the
characters the pattern recognisers' values start with or need (digits, `@`, `:`, `+`, `(`),
shorter than any secret but a password, and not after what a password's or a token's value
follows (a word ending in `:`/`=`/a quote, `is`/`was`, a secret hint such as `bearer`). The text
released so far ends where no value of the whole answer does (by induction: a cut of
`release_point`, or the end of such a word), so no value can cross into the word either. The property
test (tests/test_masking_stream.py) holds stream == whole over 10,000+ random splits at three
paces with the real analyser, plus fixed cases at every split offset.

What is not exact by construction: spaCy's entity state carried from text before the left
context (its decisions read the first token of the entity in progress, of any label, ORG or DATE
too, which douane does not mask and the stream never sees), so an entity open across the window's
start in the whole answer may leave the window's next decisions different; none was seen in the
figures below. A table row longer than `LINE_CHARS` ends the table for a stream. And the
analyser must stay local: a pre-filter that skipped spaCy for a text without a capital letter
made a window (`region = eu-west-1` after a private key) and the whole answer differ, so NER has
none (engine.py).

The cost of the rule: each analysis reads the left context again (~60-130
characters, a few ms of spaCy per proposal; a table's header and rows), the hold is at least
`RIGHT_WORDS` words as well as `stream_window` characters (in prose the two are about the same; a
run of long tokens holds more), and a table row waits until it is complete.

An answer's blocks in a row (Anthropic text blocks, Responses output parts: `streams.next_block`)
are one text, as the whole answer reads them: when the stream says a block's text goes on in the
next (`follow`), the next block's channel takes over the held text and its state, and the
earlier block's share of each release leaves masked with its share of each value, through `take`,
before that block's end (the stream's rewriter holds the end until then).

The stream callable is synchronous, so analysis is submitted to the worker pool from `feed` and its
result collected by a later `feed`: the event loop never waits for Presidio mid-stream. A proposal
still queued when more text arrives is replaced by one of all the held text; none is made while the
held text is only the start of a word that may yet leave without analysis (`growing_plain`), nor
while it is too short for any cut (`could_release`: under `stream_window` characters or
`RIGHT_WORDS` + 1 complete words, as at a stream's start or inside a long token), whose analysis
could release nothing: with each analysis finished before the next delta, the benchmark's answer
made 25 analyses instead of 47, and 40 texts of the labelled corpus 806 instead of 2,297 (2.3
instead of 5.3 s of the engine's CPU), every output the same. An event carrying no text (the
finish chunk, a block's stop) proposes the held text whatever its length, so the end that follows
finds its analysis done, or under way, and does not start one (`ready`). Each
proposal analyses all the held text, so once no text has arrived since the last one, the spans of
what is held are already known.

A channel's end needs the held text's analysis. When it is known (the usual case when the end
comes a moment after the last delta, as a model's finish event does), it is applied at once.
Otherwise the stream's layer waits for it off the loop: the rewriter asks `ready` before the
event that ends the channel, which proposes the end's analysis to the pool's urgent worker (a
proposal still queued behind every other stream's is dropped for it; one already on a worker is
waited for; ends arriving together are batched, first on any free worker: `pool`), and
mitmproxy's layer for that stream pauses on a hook while it runs
(`protocols.streamwait`); every other flow goes on. `finish` then applies it without waiting.
Called without that pause (a whole body rewritten off the loop), `finish` waits for the urgent
analysis itself, bounded by the configured timeout. An analyser failure or timeout ends the
stream with the API's error event: nothing unanalysed leaves.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
from dataclasses import dataclass, field

from douane import secrets
from douane.masking import fields, operators
from douane.masking.config import MaskingSettings
from douane.masking.engine import Span, not_a_name, not_a_name_words
from douane.masking.pool import Analysis, MaskingPool

LEFT_WORDS = 8  # words of released text analysed again as left context
LEFT_CHARS = 128  # ... at most this many characters of it (outside a table)
LINE_CHARS = 4096  # the longest line kept whole for a table's row
RIGHT_WORDS = 5  # complete words held behind a cut (spaCy's window is 4 tokens)
RUN_CHARS = 48  # the longest value written in groups (an IBAN is at most 42 with spaces)
WORD = re.compile(r"\S+")
SPACES = re.compile(r"\s*")
# a group of a number or code written in groups: digits and capitals, with a phone's punctuation
VALUE_GROUP = re.compile(r"[+(]?[0-9A-Z][0-9A-Z().\-/]*[,;.]?")
DIGIT = re.compile(r"\d")
# a word released without analysis: letters (`engine.not_a_name`), then punctuation
PLAIN_WORD = re.compile(r"([A-Za-z]{1,16})[.,!?;]{0,3}")
PARTIAL_WORD = re.compile(r"[A-Za-z]{1,16}")
SECRET_SEPARATORS = tuple(":=>\"'`|/\\")  # what the word before a secret's value ends with


@dataclass
class _Share:
    """An earlier block of a channel's text (`StreamMasker.follow`): how much of it is still held
    (at the front of the held text), and what of it was released and not yet taken."""
    channel: str
    held: int
    out: str = ""


@dataclass
class _Channel:
    released: str = ""  # the tail of the released text (left context for the next analysis)
    tables: fields.Tables = field(default_factory=fields.Tables)  # fed the released lines
    rows: list[str] = field(default_factory=list)  # the last complete released lines (2 at most)
    line: str = ""  # the released part of the current line (`LINE_CHARS` at most)
    pending: str = ""  # received, not yet released
    inflight: Analysis | None = None
    urgent: bool = False  # `inflight` is the end's own analysis (`ready`): never replaced
    window: str = ""  # the text being analysed: left context + all of `pending` when proposed
    context: int = 0  # the length of the left context in `window`
    skipped: int = 0  # characters of the window's held text released since, without analysis
    analysed: list[Span] | None = None  # the spans of `pending`, while no text arrived since
    early: str = ""  # released by `ready`, emitted with the next output
    earlier: list[_Share] = field(default_factory=list)  # earlier blocks still held, in order
    behind: int = 0  # the characters of `pending` that are theirs


@dataclass
class StreamMasker:
    settings: MaskingSettings
    pool: MaskingPool
    counts: dict[str, int] = field(default_factory=dict)
    channels: dict[str, _Channel] = field(default_factory=dict)
    shares: dict[str, _Share] = field(default_factory=dict)  # earlier blocks not all taken

    def feed(self, channel: str, text: str) -> str:
        ch = self.channels.setdefault(channel, _Channel())
        if text:
            ch.pending += text
            ch.analysed = None
            if ch.inflight is not None and ch.inflight.cancel():
                ch.inflight = None  # still queued: a proposal of all the held text replaces it
        out, ch.early = ch.early, ""
        if ch.inflight is not None and ch.inflight.done():
            out += self._release(ch, self.pool.result(ch.inflight)[0])
        out += self._release_plain(ch, end=False)
        if ch.inflight is None and ch.analysed is None and ch.pending \
                and not growing_plain(ch.released, ch.pending) \
                and (not text or could_release(ch.pending, self.settings.stream_window)):
            self._propose(ch)  # an event without text: the text may have ended, analyse it all
        return out

    def ready(self, channel: str) -> Analysis | None:
        """Before the channel's end, without blocking: the analysis `finish` would wait for,
        proposed now if it is not under way (None: `finish` can answer at once). Whoever ends the
        channel awaits it (the stream's layer pauses, `protocols.streamwait`) and asks again; what
        this releases meanwhile leaves with the next output. The end is then decided as when it
        comes a moment after the last analysis: the held text's spans are known."""
        ch = self.channels.get(channel)
        if ch is None:
            return None
        if ch.inflight is not None and not ch.inflight.done():
            if ch.urgent or not ch.inflight.cancel():
                return ch.inflight  # the end's own, or one on a worker now
            ch.inflight = None  # queued behind other streams': the urgent worker takes the end
        if ch.inflight is not None:
            ch.early += self._at_end(ch)
        if ch.analysed is not None:
            return None
        ch.early += self._release_plain(ch, end=True)
        if not ch.pending:
            return None
        self._propose(ch, urgent=True)
        return ch.inflight

    def finish(self, channel: str) -> str:
        ch = self.channels.pop(channel, None)
        if ch is None:
            return ""
        out = ch.early
        if ch.inflight is not None and ch.inflight.done():
            out += self._at_end(ch)
        elif ch.inflight is not None:
            ch.inflight.cancel()  # its window is a prefix of the one analysed below
        if ch.analysed is not None:  # (its words no value starts in have no span either)
            return out + self._out(ch, ch.pending, ch.analysed)
        out += self._release_plain(ch, end=True)
        if not ch.pending:
            return out
        context = left_context(ch)
        window = context + ch.pending
        spans = shift(self.pool.result(self.pool.submit([window], urgent=True))[0],
                      len(context), len(window))
        return out + self._out(ch, ch.pending, spans)

    def _at_end(self, ch: _Channel) -> str:
        """The finished analysis under way, at the channel's end. When no text arrived since it
        was proposed, its spans are all the held text's (`analysed`), which `finish` lets out
        whole: no cut is needed, no text follows (a release at a cut, then the rest, gives the
        same text: no span crosses a cut). Otherwise, what it releases, as mid-stream."""
        spans = self.pool.result(ch.inflight)[0]
        if not _current(ch):
            return self._release(ch, spans)
        done = ch.context + ch.skipped
        ch.inflight, ch.analysed = None, shift(spans, done, len(ch.window))
        return ""

    def follow(self, channel: str, previous: str) -> None:
        """`channel`'s text continues `previous`'s, which an event ended: the next block of one
        text (`streams.next_block`). They are analysed as one text, as the whole answer reads
        them; what `previous` still holds leaves later, masked with its share of each value (a
        value across the two is masked in both), through `take`."""
        ch = self.channels.pop(previous, None) or _Channel()
        share = _Share(previous, len(ch.pending) - ch.behind, ch.early)
        ch.early = ""
        if share.held:
            ch.earlier.append(share)
            ch.behind += share.held
        self.shares[previous] = share
        self.channels[channel] = ch

    def take(self, previous: str) -> tuple[str, bool]:
        """What was released of an earlier block (`follow`) since last asked, and whether all of
        it has left."""
        share = self.shares.get(previous)
        if share is None:
            return "", True
        out, share.out = share.out, ""
        if not share.held:
            del self.shares[previous]
        return out, not share.held

    def _out(self, ch: _Channel, text: str, spans: list[Span]) -> str:
        """Released text (the front of the held text), masked block by block with each block's
        share of each value, as the whole answer masks its blocks: earlier blocks' parts are
        kept for `take`, the channel's own is returned."""
        start = 0
        while ch.earlier and start < len(text):
            share = ch.earlier[0]
            end = start + min(share.held, len(text) - start)
            share.out += operators.apply(self.settings, text[start:end], shift(spans, start, end),
                                         self.counts)
            share.held -= end - start
            ch.behind -= end - start
            start = end
            if not share.held:
                ch.earlier.pop(0)
        if start:
            text, spans = text[start:], shift(spans, start, len(text))
        return operators.apply(self.settings, text, spans, self.counts) if spans else text

    def _propose(self, ch: _Channel, urgent: bool = False) -> None:
        ch.context = len(context := left_context(ch))
        ch.window = context + ch.pending
        ch.skipped = 0
        ch.urgent = urgent
        ch.inflight = self.pool.submit([ch.window], urgent=urgent)

    def _release(self, ch: _Channel, spans: list[Span]) -> str:
        ch.inflight = None
        window, start = ch.window, ch.context
        done = start + ch.skipped  # released without analysis since the proposal
        cut = max(done, release_point(window, start, spans, self.settings.stream_window,
                                      ch.tables if len(ch.line) < LINE_CHARS else None, ch.line))
        if len(ch.pending) == len(window) - done:  # nothing arrived since the proposal
            ch.analysed = shift(spans, cut, len(window))
        released = window[done:cut]
        ch.pending = ch.pending[cut - done:]
        self._released(ch, released)
        return self._out(ch, released, shift(spans, done, cut))

    def _release_plain(self, ch: _Channel, end: bool) -> str:
        """Release at once the held words no value can start in (`plain_prefix`)."""
        n = plain_prefix(ch.released, ch.pending, end)
        if ch.analysed is not None:  # (no known span starts there either: keep them in step)
            n = min([n, *(s.start for s in ch.analysed)])
            ch.analysed = shift(ch.analysed, n, len(ch.pending))
        if not n:
            return ""
        released, ch.pending = ch.pending[:n], ch.pending[n:]
        if ch.inflight is not None:
            ch.skipped += n
        self._released(ch, released)
        return self._out(ch, released, [])

    def _released(self, ch: _Channel, released: str) -> None:
        """Keep what the next analyses read of the text now released."""
        ch.released = (ch.released + released)[-2 * LEFT_CHARS:]
        *lines, rest = (ch.line + released).split("\n")
        for line in lines:
            ch.tables.line(line)
        ch.rows = [*ch.rows, *(line[-LINE_CHARS:] for line in lines[-2:])][-2:]
        # a line too long to keep whole is no table row (so `release_point` sees no table in it)
        ch.line = rest if len(rest) < LINE_CHARS else rest[-LINE_CHARS:]


def _current(ch: _Channel) -> bool:
    """Whether no text arrived since the analysis under way was proposed: its window holds all
    the held text."""
    return len(ch.pending) == len(ch.window) - ch.context - ch.skipped


def plain_prefix(before: str, held: str, end: bool) -> int:
    """How much of `held` (received after the released `before`) may leave without analysis: the
    whole words, with the whitespace after them, in which no value of the whole answer can start,
    whatever follows. Such a word is a `PLAIN_WORD` of letters no name or place starts with
    (engine.trim_name: NER and field recognisers), with no `@`, digit, colon, `+` or `(` (emails,
    phones, cards, SSNs, IBANs, IP addresses), shorter than any secret but a password, and not
    after what a password's value follows (`password:`, `is`, `bearer`: the word before it holds
    no secret hint and ends with no separator). Whitespace leaves but after a `"` (a JSON field's
    value may start with spaces). Text released before `before` is never crossed by a value:
    the text released so far ends where no value does (a cut of `release_point`, or this)."""
    word = ""  # the word before
    if before:
        tail = before[-LEFT_CHARS:]
        words = tail.split()  # (str.split's whitespace is WORD's)
        if not tail[-1].isspace() or not words or (
                len(words[-1]) == len(tail.rstrip()) and tail != before):
            return 0  # the word before is unknown, cut, or the held text starts inside it
        word = words[-1]
    pos = 0
    while True:
        after = SPACES.match(held, pos).end()
        if after > pos and (held[pos - 1] if pos else before[-1:]) == '"':
            return pos
        pos = after
        m = WORD.match(held, pos)
        if m is None or (m.end() == len(held) and not end):
            return pos  # all released, or the last word may still grow
        if not _plain(m.group(), word):
            return pos
        pos, word = m.end(), m.group()


def could_release(held: str, hold: int) -> bool:
    """Whether an analysis of `held` could release any of it mid-stream: `release_point` cuts
    at a word after the first that leaves `hold` characters and `RIGHT_WORDS` complete words
    behind it, so held text shorter than that, or of fewer words, stays held whatever the
    analysis finds (at a stream's start, the first ~`hold` characters after the words that left
    at once). Such a proposal would only spare the channel's end its own analysis: the end
    makes it (`ready`), and the workers' time goes to proposals that release text."""
    if len(held) <= hold:
        return False
    words = sum(1 for _ in itertools.islice(WORD.finditer(held), RIGHT_WORDS + 2))
    return words == RIGHT_WORDS + 2 or (words == RIGHT_WORDS + 1 and held[-1].isspace())


def growing_plain(before: str, held: str) -> bool:
    """Whether `held` is one word still arriving that may yet leave without analysis (the start
    of a word no value starts in, where such a word may leave): no analysis is proposed for it
    until it is complete or cannot be one any more."""
    return (PARTIAL_WORD.fullmatch(held) is not None and (len(held) == 1 or held[1:].islower())
            and held.lower() in _prefixes() and plain_prefix(before, "a ", False) == 2)


@functools.cache
def _prefixes() -> frozenset[str]:
    return frozenset(w[:i] for w in not_a_name_words() for i in range(1, len(w) + 1))


def plain(text: str) -> bool:
    """Whether a whole text is only words no value can start in (nothing to analyse)."""
    return plain_prefix("", text, end=True) == len(text)


def _plain(word: str, before: str) -> bool:
    m = PLAIN_WORD.fullmatch(word)
    return (m is not None and not_a_name(m.group(1)) and not secrets.maybe(word)
            and not (before and (secrets.maybe(before) or before.endswith(SECRET_SEPARATORS)
                                 or before.lower() in ("is", "was"))))


def left_context(ch: _Channel) -> str:
    """The released text an analysis reads again: inside an open table, its header and the last
    rows; otherwise the last `LEFT_WORDS` words within `LEFT_CHARS`, from the line's start when it
    is among them (a greeting or a `key: value` pair is read from there)."""
    if ch.tables.header and len(ch.line) < LINE_CHARS:
        rows = ch.rows[len(ch.rows) - min(ch.tables.rows, len(ch.rows)):]
        return "\n".join([ch.tables.header, *rows, ch.line])
    tail = ch.released[-LEFT_CHARS:]
    starts = [m.start() for m in WORD.finditer(tail)]
    if len(tail) < len(ch.released):  # the first word may be cut: start at the next one
        starts = [s for s in starts if s > 0] or [0]
    if not starts:  # only spaces so far: the whole answer's analysis reads them too (spaCy
        return tail  # tokenises ` Ana Lívia` and `Ana Lívia` apart, and tags them apart)
    first = starts[max(0, len(starts) - LEFT_WORDS)]
    line = tail.rfind("\n", 0, first) + 1
    return tail[line if line or len(tail) == len(ch.released) else first:]


def release_point(window: str, start: int, spans: list[Span], hold: int,
                  tables: fields.Tables | None = None, line: str = "") -> int:
    """Where the release may end in `window`, whose held text begins at `start`: the rule of
    this module's docstring. `spans` are the window's detections; `tables` the table state at
    the start of the current line, of which `line` was released."""
    words = list(WORD.finditer(window, start))
    complete = len(words) - (0 if window[-1:].isspace() else 1)
    cut = start
    for i in range(min(complete - RIGHT_WORDS, len(words) - 1), 0, -1):
        if words[i].start() <= len(window) - hold:
            cut = words[i].start()
            while i > 0 and _joined(window, words[i - 1], words[i]) \
                    and cut - words[i - 1].start() <= RUN_CHARS:
                i -= 1  # a value in groups may still be growing: its run stays whole
            cut = words[i].start()
            break
    # a row of an open table leaves whole: its cells count together (no table is open, and
    # none can open, without a header so far or a line ending in the window)
    if tables is not None and (tables.header or window.find("\n", start) != -1):
        state, pos = copy.copy(tables), start
        while (end := window.find("\n", pos)) != -1:
            state.line(line + window[pos:end])
            line, pos = "", end + 1
        if state.header:
            cut = min(cut, pos)
    held = shift(spans, start, len(window))  # a detection reaching back starts at `start`
    while crossing := [s.start for s in held if s.start < cut - start < s.end]:
        cut = start + min(crossing)  # an entity across the cut stays whole, behind it
    return cut


def _joined(window: str, before: re.Match[str], after: re.Match[str]) -> bool:
    """Two words that may be groups of one value: one space apart, value-shaped, a digit."""
    return (after.start() - before.end() == 1 and window[before.end()] == " "
            and VALUE_GROUP.fullmatch(before.group()) is not None
            and VALUE_GROUP.fullmatch(after.group()) is not None
            and DIGIT.search(before.group() + after.group()) is not None)


def shift(spans: list[Span], start: int, end: int) -> list[Span]:
    """The spans within [start, end) of a window, relative to `start`: clipped to it (a detection
    reaching back into released text masks what is still held of it)."""
    return [Span(max(s.start, start) - start, min(s.end, end) - start, s.entity, s.score)
            for s in spans if s.end > start and s.start < end]
