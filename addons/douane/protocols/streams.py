"""Streams stay streams: SSE responses are rewritten event by event as they pass.

`StreamRewriter` is the callable set as `flow.response.stream`. It parses events across arbitrary
chunk boundaries, hands each text delta to the `filters` of later stages (masking appends one), puts
what they return back into the event, and emits valid SSE. A filter may hold back a bounded tail of a
channel; before the event that closes that channel (and at the end) the held text is emitted as an
extra delta event of that channel in the API's own format, and fields that repeat a channel's whole
text (`*.done` events) are rewritten to what was actually sent.

An answer's blocks in a row are one text to a reader (Anthropic splits an answer into text blocks
around its citations; Responses into output parts): the whole answer is masked reading them as one
(`next_block`), and so is a stream. When an event ends a block whose text the next block may
continue, the filters keep it open: the block's end and every event after it wait (`parked`)
until the next event says whether the next block continues it. If it does, the filters read both
as one text (`follow`: masking, deny rules) and the last lets the earlier block's held tail out as
that block's own delta (`take`), then its end and the events behind it leave, in order; if not,
the block ends as any other. Nothing waits longer than the filter holds text, and every block keeps its events, index
and end.

The callable is synchronous (mitmproxy calls it from the event loop): filters must not block.
Returning `[]` holds data back; `b""` is only returned on the final call (see docs: an empty chunk
ends an HTTP/1.1 chunked body). A filter whose channel end needs an analysis not done yet says so
(`ready`): the events from the one that closes that channel wait in `backlog`, and the stream's
layer pauses while the analysis runs (`waits`, then `resume`: `protocols.streamwait`), so the end
never blocks the event loop. The final call still processes everything, blocking if it must
(a caller with no layer to pause, such as `rewrite_whole` off the loop, gets the same bytes).
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import logging
import re
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mitmproxy import http

from douane import secrets
from douane.interaction import Interaction, JsonPath, Kind, TextPiece
from douane.protocols import fields, jsonpath
from douane.protocols.base import ALL, Delta, ProtocolError, StreamFormat
from douane.protocols.sse import Event, SseError, SseParser
from douane.untrusted import loggable

logger = logging.getLogger(__name__)
_UNPARSED = object()
# What `waits` names for a channel's end that needs no analysis: the layer still pauses on the
# wait hook once, so the end's work runs in a turn of the event loop's share (32 streams ending
# in one pass each ran their end there back to back: a 12-15 ms stall)
TURN: concurrent.futures.Future = concurrent.futures.Future()
TURN.set_result(None)
# An event's `event:` and `id:` reach the client as sent, beside its data: at most this long (a
# provider's event names are short, an MCP server's ids a stream id and a counter), read for
# secrets and by the field hooks (deny rules) as its data is, each distinct value once (up to
# FIELD_VALUES kept a stream)
FIELD_CHARS, FIELD_VALUES = 256, 64
_RETRY = re.compile(r"[0-9]{1,10}")


class TextFilter(Protocol):
    """A later stage's view of a stream's text; it may hold back a bounded tail."""

    def feed(self, channel: str, text: str) -> str:
        """A text delta arrives; returns the text to emit now ("" to hold)."""

    def finish(self, channel: str) -> str:
        """The channel ends; returns everything still held."""

    # optional: `ready(channel) -> Future | None`, what `finish` would wait for (see `waits`)
    # optional: `follow(channel, previous)`, `channel`'s text continues `previous`'s (ended, not
    # finished: the next block of one text); blocks are followed when the chain's last filter
    # can (the others that cannot finish `previous` at its end). The last may hold text of
    # `previous` past its end and give it through `take(previous) -> (text, all out)` (it leaves
    # as is); the others hold none of it.


def next_block(a: JsonPath, b: JsonPath) -> bool:
    """Whether `b` is where the whole answer keeps the text of the block after `a`'s: the paths
    alike but for one index, the next, and the indexes under it starting over (`content/3/text`
    after `content/2/text`; `output/1/content/0/text` after `output/0/content/2/text`, the next
    message's first part). Such blocks in a row are read as one text (masking, whole and
    streamed)."""
    steps = [(x, y) for x, y in zip(a, b, strict=False) if x != y]
    return len(a) == len(b) and bool(steps) and type(steps[0][0]) is int and \
        type(steps[0][1]) is int and steps[0][1] == steps[0][0] + 1 and \
        all(type(x) is int and y == 0 and type(y) is int for x, y in steps[1:])


def read_together(pieces: list[TextPiece]) -> list[list[TextPiece]]:
    """The pieces in runs a reader reads as one text: the text blocks or parts of an answer in a
    row (their paths alike but for the block's index, each the next: `next_block`, as a stream
    reads them), so a value the upstream split across two blocks (`maria.garcia@` |
    `example.com`) is found whole (masking, the recording's secrets). A string inside the last block (a citation's `cited_text`) is
    read apart and does not end the run. Tool arguments are each a JSON document of their own."""
    runs: list[list[TextPiece]] = []
    run: list[TextPiece] = []  # the run the next block may continue
    for piece in pieces:
        last = run[-1] if run else None
        if last is not None and last.kind == piece.kind != "tool_arguments" and \
                next_block(last.path, piece.path):
            run.append(piece)
            continue
        if last is not None and _inside(piece.path, last.path):
            runs.append([piece])  # read apart; the next block may still go on with the run
        else:
            run = [piece]
            runs.append(run)
    return runs


# What a model reads of a request as one sequence (`read_in_order`): the texts users and tools
# write, not douane's own pieces (`<keys and ids>`, a call's argument values joined `<json>`) nor
# what an image or file part points to.
READ_KINDS = ("prompt", "tool_arguments", "tool_result")
_NOT_READ = frozenset({"image_url", "file_data", "file_url", "source"})


def read_in_order(pieces: list[TextPiece]) -> list[list[TextPiece]]:
    """A request's texts the model reads in sequence that `read_together` keeps apart: a text
    part on each side of an image, Responses `instructions` then `input`, Anthropic `system`
    then the first message, a message then its tool call's arguments (each argument value, in
    Anthropic's `input`), one argument value then the next. Runs of the texts on each side of
    such a step, chained (a key cut in three across two steps), not what is already read in a
    row: a plain conversation adds nothing to read."""
    texts = [p for p in pieces if p.kind in READ_KINDS and not any(
        type(step) is str and (step[:1] == "<" or step in _NOT_READ) for step in p.path)]
    in_a_row = {(id(a), id(b)) for run in read_together(texts) for a, b in itertools.pairwise(run)}
    runs: list[list[TextPiece]] = []
    for a, b in itertools.pairwise(texts):
        if (id(a), id(b)) in in_a_row:
            continue
        if runs and runs[-1][-1] is a:
            runs[-1].append(b)
        else:
            runs.append([a, b])
    return runs


def _inside(path: tuple, text: tuple) -> bool:
    """Whether `path` lies in the block that holds the text at `text` (under its last index)."""
    block = text[:max((i for i, step in enumerate(text) if type(step) is int), default=-1) + 1]
    return bool(block) and path[:len(block)] == block and path != text


@dataclass
class _Later:
    """An event that repeats channels' whole texts: encoded when it leaves, after those texts."""
    event: Event
    doc: Any
    recaps: list[tuple[JsonPath, str]]


@dataclass
class _Parked:
    """A channel an event ended while the next block may continue its text: its end and the
    events after it (`items`) wait until all its text has left."""
    channel: str
    kind: Kind
    template: Any
    block: JsonPath
    items: list[bytes | _Later] = field(default_factory=list)  # from its end on, in order
    followed: bool = False  # the next block continues it: its text leaves through `take`
    rest: str | None = None  # it was finished: its last text


class StreamedText(TextPiece):
    """A channel's text as delivered: appended in parts and joined when read, so a stream of n
    bytes costs O(n), not O(n²) (`text += delta` copies everything so far on each event)."""

    def __init__(self, kind: Kind, channel: str):
        self._parts: list[str] = []
        super().__init__(kind, "assistant", "", ("stream", channel))

    @property  # type: ignore[override]
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts = [value] if value else []

    def append(self, text: str) -> None:
        if text:
            self._parts.append(text)


class StreamRewriter:
    def __init__(self, fmt: StreamFormat, interaction: Interaction, decision_id: str, *,
                 max_bytes: int | None = None, on_abort: Callable[[str], None] | None = None):
        self.format = fmt
        self.interaction = interaction
        self.decision_id = decision_id
        self.max_bytes = max_bytes  # the whole stream, as received
        self.received = 0
        self.on_abort = on_abort  # told when the stream is ended with an error event
        self.filters: list[TextFilter] = []
        # Called with each event's parsed JSON before its text is filtered; may edit it in place
        # (list filtering) or call abort() (a blocked tool result).
        self.message_hooks: list[Callable[[Any], bool | None]] = []  # True: edited it
        # Called with each distinct `event:` and `id:` value (`_fields`); may call abort()
        self.field_hooks: list[Callable[[str, str], None]] = []
        # Called with each event as received, before its JSON is read; may call abort()
        self.event_hooks: list[Callable[[Event], None]] = []
        self.fields_read: set[tuple[str, str]] = set()
        self.parser = SseParser()
        self.backlog: deque[Event] = deque()  # received, waiting for a filter's analysis
        self.head: Any = _UNPARSED  # the first backlog event's parsed JSON (`_UNPARSED`: not yet)
        self.waiting: list[concurrent.futures.Future] = []  # what `waits` last found
        self.turned = False  # the next event's end had its turn (`TURN`): it goes on now
        self.open: dict[str, tuple[Kind, Any]] = {}  # channel -> (kind, last delta event doc)
        self.blocks: dict[str, JsonPath] = {}  # open channel -> where the whole answer has it
        self.parked: list[_Parked] = []  # ended channels whose text has not all left, in order
        self.out: list[bytes] = []  # what leaves from this call
        self.closed: set[str] = set()  # channels an event ended: no more text may come on them
        self.sent: dict[str, StreamedText] = {}  # channel -> text emitted so far
        self.cut: dict[str, str] = {}  # channel -> a JSON escape cut at its last delta's end
        self.abort_message: str | None = None
        self.abort_status = 403
        self.ended = False
        self.finished = False  # the final call (b"") was made: the stream went through
        # Every event passes through here from now on, even if the client leaves early.
        interaction.inspected.append("response-stream")

    def abort(self, message: str, status: int = 403) -> None:
        """Fail closed: end the stream with the API's error event at the next opportunity.
        `status`: the refusal's, which types the event (403: douane refused what it read; 502:
        the upstream failed; 500: douane could not inspect it)."""
        if self.abort_message is None:
            self.abort_message, self.abort_status = message, status

    def __call__(self, data: bytes) -> bytes | Iterable[bytes]:
        final = data == b""
        self.finished = self.finished or final
        chunk = self._process(data, final)
        if final:
            return chunk
        return [chunk] if chunk else []

    def waits(self, end: bool) -> list[concurrent.futures.Future]:
        """The filters' analyses the next event (or at `end`, the stream's end) would block on,
        started now; empty when it can be processed at once. Never blocks."""
        self.waiting = []
        if self.ended or self.abort_message is not None:
            return self.waiting
        try:
            if self.backlog:
                self.waiting = self._needs(*self._parsed())
            elif end:
                self.waiting = self._turn(self._fate([ALL], [])[0])
        except Exception as e:  # the event or a filter failed: `resume` ends the stream
            self._failed(e)
            self.waiting = []
        return self.waiting

    def resume(self) -> bytes:
        """After `waits`: the waiting events, processed as far as they go without blocking."""
        self.turned = True
        return self._process(b"", final=False)

    def _process(self, data: bytes, final: bool) -> bytes:
        if self.ended:
            return b""
        self.out = []
        self.received += len(data)
        if self.max_bytes is not None and self.received > self.max_bytes:
            self.abort(f"the answer exceeds douane's limit of {self.max_bytes} bytes", 502)
        try:
            if self.abort_message is None:
                if data or final:  # (b"" tells the parser the stream ended)
                    self.backlog.extend(self.parser.feed(data))
                while self.backlog and self.abort_message is None:
                    event, doc = self._parsed()
                    if self.abort_message is not None:  # an event hook ended the stream
                        break
                    if not final and self._needs(event, doc):
                        break  # its channel's end waits for an analysis: not on the loop
                    self.backlog.popleft()
                    self.head = _UNPARSED
                    self.turned = False
                    self._event(event, doc)
            if final and self.abort_message is None:
                self._close(self._fate([ALL], [])[0])
                if self.parked:  # (never: every block was finished) fail closed all the same
                    raise RuntimeError("a block's end was still held at the stream's end")
        except Exception as e:
            self._failed(e)
        out, self.out = self.out, []
        if self.abort_message is not None:
            message = f"{self.abort_message} (douane decision {self.decision_id})"
            out.append(self.format.error_event(message, "douane_refusal",
                                               self.abort_status).encode())
            self.ended = True
            self.backlog.clear()
            self.parked.clear()  # what waited behind a block's end never leaves
            if self.on_abort:
                self.on_abort(self.abort_message)
        return b"".join(out)

    def _failed(self, e: Exception) -> None:
        if isinstance(e, (SseError, ProtocolError, UnicodeDecodeError)):
            self.abort(e.message if isinstance(e, ProtocolError) else f"broken stream: {e}",
                       e.status if isinstance(e, ProtocolError) else 502)
            return
        # a filter failed: never send what it did not approve
        logger.error("douane: stream processing failed (decision %s): %s", self.decision_id,
                     loggable(repr(e)))
        self.abort("douane could not inspect this stream and ended it", 500)

    def _parsed(self) -> tuple[Event, Any]:
        """The first backlog event and its JSON (None: no JSON), checked, parsed once."""
        event = self.backlog[0]
        if self.head is _UNPARSED:
            self.format.check(event)
            self._fields(event)
            for hook in self.event_hooks:
                hook(event)
            if self.abort_message is not None:
                return event, None
            doc = None
            if event.data.strip() and event.data.strip() != "[DONE]":
                try:
                    doc = json.loads(event.data)
                except ValueError:
                    raise ProtocolError(502, "broken_stream", "the upstream sent an event that "
                                        "is not JSON") from None
                self.format.check_message(doc)
                parts = self.format.split(event, doc)
                if parts:  # the event's text joins its channel before the channel ends
                    self.backlog.popleft()
                    self.backlog.extendleft(reversed(parts))
                    return self._parsed()
            self.head = doc
        return event, self.head

    def _fields(self, event: Event) -> None:
        """The event's `event:` and `id:` read as its data is (`FIELD_CHARS`): a secret in one
        ends the stream (it cannot be masked and keep its meaning to the client), a hook may
        too; a `retry:` that is not a number (a client ignores it) is dropped."""
        if event.retry is not None and not _RETRY.fullmatch(event.retry):
            event.retry = None
        for name, value in (("event", event.event), ("id", event.id)):
            if value is None or (name, value) in self.fields_read:
                continue
            if len(value) > FIELD_CHARS:
                raise ProtocolError(502, "broken_stream", f"the upstream sent an SSE {name} "
                                    f"field of {len(value)} characters (at most {FIELD_CHARS})")
            if not secrets.quiet(value) and (found := secrets.find(value, high_entropy=False)):
                raise ProtocolError(502, "secret_in_stream", f"the upstream sent a secret "
                                    f"({found[0].kind.rule}) in an SSE {name} field")
            for hook in self.field_hooks:
                hook(name, value)
            if len(self.fields_read) < FIELD_VALUES:
                self.fields_read.add((name, value))

    def _needs(self, event: Event, doc: Any) -> list[concurrent.futures.Future]:
        """The analyses the channels this event ends wait for (see `TextFilter`)."""
        closes = self.format.closes(event, doc)
        if not closes and not self._waiting():
            return []
        deltas = self.format.deltas(event, doc) if doc is not None else []
        return self._turn(self._fate(closes, deltas)[0])

    def _turn(self, channels: list[str]) -> list[concurrent.futures.Future]:
        """What the end of `channels` waits for: their analyses, or else, once, its turn on the
        loop (`TURN`) where a filter may hold text back (a masked stream: only then is the
        stream's layer paused on the wait hook, `protocols.streamwait`)."""
        waiting = self._ready(channels)
        if waiting or not channels or self.turned or \
                not any(hasattr(f, "ready") for f in self.filters):
            return waiting
        return [TURN]

    def _waiting(self) -> _Parked | None:
        """The ended channel the next text may continue, not known yet."""
        last = self.parked[-1] if self.parked else None
        return last if last and not last.followed and last.rest is None else None

    def _fate(self, closes: list[str], deltas: list[Delta]) -> tuple[list[str], str | None,
                                                                     Delta | None]:
        """What an event does to the channels: those it ends, in order (the waiting one among
        them); the one it parks (`_Parked`); the delta whose channel continues the parked one."""
        if not closes and not self.parked:
            return [], None, None  # (most events)
        waiting = [p.channel for p in [self._waiting()] if p]
        if ALL in closes:
            return [*waiting, *self.open], None, None
        ends: list[str] = []
        park = None
        for channel in dict.fromkeys(c for c in closes if c in self.open):
            ends += waiting + [park] if park else waiting  # an end decides the waiting one
            waiting, park = [], None
            if self.blocks.get(channel) is not None and self.filters and \
                    hasattr(self.filters[-1], "follow"):
                park = channel
            else:
                ends.append(channel)
        candidate = park or (waiting[0] if waiting else None)
        if candidate is None or not deltas:
            return ends, park, None
        if self._continues(candidate, deltas[0]):
            return ends, park, deltas[0]
        return [*ends, candidate], None, None

    def _continues(self, channel: str, delta: Delta) -> bool:
        kind, _ = self.open.get(channel) or (self.parked[-1].kind, None)
        block = self.blocks.get(channel) or self.parked[-1].block
        return delta.kind == kind and delta.block is not None and \
            next_block(block, delta.block) and delta.channel not in self.open and \
            delta.channel not in self.closed

    def _ready(self, channels: list[str]) -> list[concurrent.futures.Future]:
        return [f for c in channels for flt in self.filters if hasattr(flt, "ready")
                if (f := flt.ready(c)) is not None]

    def _event(self, event: Event, doc: Any) -> None:
        if self.abort_message:  # a field hook ended the stream (`_fields`)
            return
        touched = False  # a hook edited the message in place
        if doc is not None:
            touched = any([hook(doc) for hook in self.message_hooks])
            if self.abort_message:
                return
        deltas = self.format.deltas(event, doc) if doc is not None else []
        ends, park, join = self._fate(self.format.closes(event, doc), deltas)
        self._close(ends)
        if park is not None:
            self._park(park)
        if join is not None:
            for f in self.filters:
                if hasattr(f, "follow"):
                    f.follow(join.channel, self.parked[-1].channel)
            self.parked[-1].followed = True
        for delta in deltas:
            text = jsonpath.get(doc, delta.path)
            if not isinstance(text, str):
                continue
            if text and delta.channel in self.closed:  # it would be filtered with no context
                raise ProtocolError(502, "reopened_channel", "the upstream sent more text for a "
                                    "part of the answer it had ended")
            if delta.kind == "tool_arguments":  # JSON text: filtered as the tool will read it
                text = self.cut.pop(delta.channel, "") + text
                end = fields.escape_tail(text)
                text, self.cut[delta.channel] = fields.readable(text[:end]), text[end:]
            emitted = self._feed(delta.channel, text)
            self._drain()
            if getattr(self.format, "complete_events", False):
                emitted += self._finish(delta.channel)
            else:
                self.open[delta.channel] = (delta.kind, doc)
                if delta.block is not None:
                    self.blocks[delta.channel] = delta.block
            self._sent(delta.channel, delta.kind, emitted)
            jsonpath.set_(doc, delta.path, emitted)
        recaps = [(path, channel) for path, channel in
                  (self.format.recaps(event, doc) if doc is not None else [])
                  if channel in self.sent]
        strays = self._strays(doc, {d.path for d in deltas} | set(self.format.echoes) | {
            path for path, _ in recaps})
        if recaps:
            self._put(_Later(event, doc, recaps))  # set when it leaves, after the texts
        elif deltas or strays or touched:
            self._put(self._encode(event, doc))
        else:
            self._put(event.encode())

    @staticmethod
    def _encode(event: Event, doc: Any) -> bytes:
        return Event(json.dumps(doc, ensure_ascii=False), event.event, event.id, event.retry,
                     event.comments).encode()

    def _put(self, item: bytes | _Later) -> None:
        """An event leaves now, or after a parked block's text: behind the latest block's end."""
        if self.parked:
            self.parked[-1].items.append(item)
        else:
            self.out.append(self._encoded(item))

    def _encoded(self, item: bytes | _Later) -> bytes:
        if isinstance(item, bytes):
            return item
        for path, channel in item.recaps:  # the channels' texts have all left by now
            jsonpath.set_(item.doc, path, self.sent[channel].text)
        return self._encode(item.event, item.doc)

    def _park(self, channel: str) -> None:
        """An event ends `channel`, and the next block may continue its text: the filters that
        can follow keep it open, the others finish it (what they release goes on through the
        later ones), and its end waits (`_Parked`)."""
        kind, template = self.open.pop(channel)
        self.closed.add(channel)
        rest = ""
        for f in self.filters:
            rest = f.feed(channel, rest) if rest else rest
            rest += "" if hasattr(f, "follow") else f.finish(channel)
        self._drain()
        if rest:
            self._sent(channel, kind, rest)
            self._put(self.format.synthesize(channel, kind, rest, template).encode())
        self.parked.append(_Parked(channel, kind, template, self.blocks.pop(channel)))

    def _drain(self) -> None:
        """The parked blocks' text the last filter let out, oldest first, each as a delta of its
        own block; once all of a block's text is out, its end and the events behind it leave."""
        while self.parked:
            p = self.parked[0]
            if p.rest is not None:
                text, done = p.rest, True
            elif p.followed:
                take = getattr(self.filters[-1], "take", None)
                text, done = take(p.channel) if take else ("", True)
            else:
                return
            if text:
                self._sent(p.channel, p.kind, text)
                self.out.append(self.format.synthesize(p.channel, p.kind, text,
                                                       p.template).encode())
            if not done:
                return
            self.parked.pop(0)
            self.out += [self._encoded(item) for item in p.items]

    def _strays(self, doc: Any, claimed: set[tuple]) -> bool:
        """Filter the event's other strings in place, each as a whole text of its own channel
        (all fed before any is finished, so their analyses run together)."""
        if doc is None or not self.format.strays:
            return False
        found = fields.strays(doc, claimed)
        emitted = [self._feed(f"~{n}", text) for n, (_, text) in enumerate(found)]
        for n, (path, _) in enumerate(found):
            jsonpath.set_(doc, path, emitted[n] + self._finish(f"~{n}"))
        return bool(found)

    def _feed(self, channel: str, text: str) -> str:
        for f in self.filters:
            text = f.feed(channel, text)
        return text

    def _finish(self, channel: str, following: bool = False) -> str:
        """The channel's end through the filters (`following`: a parked one, which only those
        that can follow still hold open)."""
        rest = self.cut.pop(channel, "")
        for f in self.filters:
            if following and not hasattr(f, "follow"):
                continue
            rest = f.feed(channel, rest) if rest else rest
            rest += f.finish(channel)
        return rest

    def _close(self, channels: list[str]) -> None:
        """End channels (`_fate`): an open one, or the parked one waiting for the next block."""
        for channel in channels:
            waiting = self._waiting()
            if waiting is not None and waiting.channel == channel:
                waiting.rest = self._finish(channel, following=True)
                self._drain()
                continue
            if channel not in self.open:
                continue
            kind, template = self.open.pop(channel)
            self.blocks.pop(channel, None)
            self.closed.add(channel)
            rest = self._finish(channel)
            self._drain()
            if rest:
                self._sent(channel, kind, rest)
                self._put(self.format.synthesize(channel, kind, rest, template).encode())

    def _sent(self, channel: str, kind: Kind, text: str) -> None:
        """What was delivered, as response text pieces (for policy, audit and recording)."""
        piece = self.sent.get(channel)
        if piece is None:
            piece = self.sent[channel] = StreamedText(kind, channel)
            self.interaction.response_texts.append(piece)
        piece.append(text)


class EchoGuard:
    """The credential douane sent upstream never leaves in a stream (an upstream reflecting its
    request, in an error event or a model's text), as is or in a form a client decodes back
    (`EchoForms`: base64, hex, percent or JSON `\\u` escapes): an event holding it (`event`: its
    data and fields as received, bounded by the parser's limits, and read with its escapes and
    its data lines' breaks undone), or a channel's text holding it across deltas (`feed`), ends
    the stream (`found`) before the rest of it leaves. A text filter, first in the chain: of a
    channel's text it holds back only a tail that may begin one of the forms (at most its length
    less one character; in ordinary text none, or a letter or two), until the next delta or the
    channel's end says. A key written in mixed forms (some characters escaped, others not) is
    found by the decoded reading of the channel's last `EchoForms.reach` characters, once whole:
    what of it left before is not held (no form says it would start one)."""

    def __init__(self, secret: str, found: Callable[[str], None]):
        self.forms = EchoForms.of(secret)
        self.found = found  # told where; ends the stream (`StreamRewriter.abort`)
        self.held: dict[str, str] = {}
        self.recent: dict[str, str] = {}  # channel -> its last `reach` characters let out
        self.marked: set[str] = set()  # channels whose recent text holds an escape

    def event(self, event: Event) -> None:
        if any(self.forms.within(v) for v in (event.data, event.event, event.id) if v):
            self.found("a stream event")

    def feed(self, channel: str, text: str) -> str:
        text = self.held.pop(channel, "") + text if channel in self.held else text
        forms = self.forms
        at = forms.first(text)
        recent = self.recent.get(channel, "")
        # its recent text, or this one, holds an escape: mixed forms are read (`decoded`)
        marked = channel in self.marked or forms.marked(text)
        if at < 0 and marked and forms.decoded(window := recent + text):
            at = max(0, forms.decoded_at(window) - len(recent))  # a mixed form, completed now
        if at >= 0:
            self.found("a stream's text")
            return text[:at]
        start = forms.start(text)
        if start < len(text):
            self.held[channel] = text[start:]
            text = text[:start]
        recent = self.recent[channel] = (recent + text)[-forms.reach:]
        if marked:
            if forms.marked(recent):
                self.marked.add(channel)
            else:
                self.marked.discard(channel)
        return text

    def finish(self, channel: str) -> str:
        self.recent.pop(channel, None)
        self.marked.discard(channel)
        return self.held.pop(channel, "")


def start_of(text: str, secret: str) -> int:
    """Where the longest end of `text` that `secret` starts with (and is shorter than it)
    begins; `len(text)` when there is none."""
    first = secret[0]
    at = text.find(first, max(0, len(text) - len(secret) + 1))
    while at >= 0:
        if secret.startswith(text[at:]):
            return at
        at = text.find(first, at + 1)
    return len(text)


_B64_URL = str.maketrans("+/", "-_")


MIXED_CHARS = 256 * 1024


class EchoForms:
    """A credential as a client may decode it back from an answer: as is; base64 (standard and
    URL-safe, at each of its three offsets in a longer run: the characters that hold only its
    bits); hex, percent-encoded and JSON `\\u`-escaped (each byte or character, lower- and
    upper-case); `decoded` reads a text with its percent and `\\u` escapes undone (mixed forms)."""

    def __init__(self, secret: str, forms: tuple[str, ...]):
        self.secret, self.forms = secret, forms
        self.reach = max(map(len, forms))  # the longest form: what a mixed form may span
        # where a tail of two characters or more may begin a form (its first two, looked for
        # overlapping), and the forms beginning with each pair; a last character alone
        pairs = {f[:2] for f in forms if len(f) > 1}
        self.pairs = re.compile("|".join(map(re.escape, sorted(pairs))))
        self.by_pair = {p: tuple(f for f in forms if f[:2] == p) for p in pairs}
        self.lasts = frozenset(f[0] for f in forms if len(f) > 1)
        self.alphabet = "".join(sorted({c for f in forms for c in f}))  # no space in any form
        self.shortest = min(map(len, forms))

    @classmethod
    def of(cls, secret: str) -> EchoForms:
        raw = secret.encode("utf-8", "surrogateescape")
        forms = [secret]
        for offset in range(3):
            encoded = base64.b64encode(b"\0" * offset + raw).decode()
            core = encoded[-(-8 * offset // 6):8 * (offset + len(raw)) // 6]
            if len(core) >= 8:
                forms += [core, core.translate(_B64_URL)]
        for hexed in (raw.hex(), raw.hex().upper()):
            forms += [hexed, "".join("%" + hexed[i:i + 2] for i in range(0, len(hexed), 2))]
        escaped = "".join(f"\\u{ord(c):04x}" for c in secret)
        forms += [escaped, escaped.upper().replace("\\U", "\\u")]
        return cls(secret, tuple(dict.fromkeys(f for f in forms if f)))

    def first(self, text: str) -> int:
        """Where the first form found in `text` starts (-1: none)."""
        if len(text) < self.shortest:  # (a delta: most)
            return -1
        return min((at for f in self.forms if (at := text.find(f)) >= 0), default=-1)

    def start(self, text: str) -> int:
        """Where the longest end of `text` that may begin a form (and is shorter than it)
        starts; `len(text)` when there is none. Only where a form's first two characters are
        (in ordinary text seldom), or its last character alone."""
        # only the run of the forms' characters that ends the text (a word, in ordinary text)
        end = len(text)
        at = max(len(text.rstrip(self.alphabet)), end - self.reach + 1)
        by_pair, search = self.by_pair, self.pairs.search
        while (m := search(text, at)) is not None:
            at = m.start()
            tail = text[at:]
            for form in by_pair[m[0]]:
                if len(tail) < len(form) and form.startswith(tail):
                    return at
            at += 1  # (pairs overlap: `sks`)
        return len(text) - 1 if text and text[-1] in self.lasts else len(text)

    @staticmethod
    def marked(text: str) -> bool:
        """Whether `text` holds an escape of an ASCII character (each search from a literal:
        the regex engine's fast scan, not a try at every place)."""
        return ("%" in text and _PERCENT.search(text) is not None) or "\\u00" in text or \
            "\\/" in text

    def decoded(self, text: str) -> bool:
        """Whether `text` read with its escapes of ASCII characters undone (JSON's, then
        percent's) holds it."""
        plain = _JSON_ESCAPE.sub(_char, text) if "\\u00" in text or "\\/" in text else text
        if "%" in plain:
            plain = _PERCENT.sub(_char, plain)
        return self.secret in plain

    def decoded_at(self, text: str) -> int:
        """Where the word of `text` that holds it decoded starts (0: none does alone)."""
        return next((m.start() for m in _WORD.finditer(text) if self.decoded(m[0])), 0)

    def within(self, text: str) -> bool:
        """Whether `text` (a whole event's field, a body) holds it, in any form, or across its
        lines (an event's data lines, which the client joins). Mixed forms (`decoded`) are read
        in a text of at most MIXED_CHARS (a body's decoded reading costs ~20 ns a character on
        the loop where it is full of escapes)."""
        if self.first(text) >= 0:
            return True
        if len(text) > MIXED_CHARS:
            return False
        if "\n" in text or "\r" in text or "\\n" in text or "\\r" in text:
            # (as JSON escapes too: base64 wrapped in lines, as `base64` and PEM write it, in a
            # JSON string: every base64 decoder skips the breaks)
            joined = text.replace("\r", "").replace("\n", "").replace("\\r", "").replace(
                "\\n", "")
            if self.first(joined) >= 0:
                return True
            text = joined
        return self.marked(text) and self.decoded(text)


# the escapes of ASCII characters (a key's): text escaped as non-ASCII (`\u4e2d`), or a `%`
# before no such byte, costs no call
_JSON_ESCAPE = re.compile(r"\\(?:u00([0-7][0-9a-fA-F])|(/))")
_PERCENT = re.compile(r"%([0-7][0-9a-fA-F])")
_WORD = re.compile(r"[^\s\"'<>]+")


def _char(m: re.Match[str]) -> str:
    return chr(int(m[1], 16)) if m[1] else m[2]


def guard_echo(rewriter: StreamRewriter, secret: str, found: Callable[[str], None]) -> None:
    """`rewriter`'s events and texts checked for `secret` (`EchoGuard`), its first filter."""
    guard = EchoGuard(secret, found)
    rewriter.event_hooks.append(guard.event)
    rewriter.filters.insert(0, guard)


_rewriters: weakref.WeakKeyDictionary[http.HTTPFlow, StreamRewriter] = weakref.WeakKeyDictionary()


def attach(flow: http.HTTPFlow, rewriter: StreamRewriter) -> None:
    assert flow.response
    flow.response.stream = rewriter
    _rewriters[flow] = rewriter


def rewriter_of(flow: http.HTTPFlow) -> StreamRewriter | None:
    return _rewriters.get(flow)


def rewrite_whole(flow: http.HTTPFlow) -> None:
    """A stream that arrived in one piece (mitmproxy's server replay, a response set by a script)
    is passed through the flow's stream callable as if it had streamed: the whole body, then the
    end. Every stage that hooked the rewriter (policy, masking, originals) sees it exactly as it
    would a live stream, and the client gets the rewritten body. Blocking: run it off the loop."""
    assert flow.response and callable(flow.response.stream)
    stream, body = flow.response.stream, flow.response.raw_content or b""
    chunks = stream(body) if body else []
    out = chunks if isinstance(chunks, bytes) else b"".join(chunks)
    flow.response.content = out + stream(b"")  # re-encoded if the body was (an error event)
    flow.response.stream = False  # delivered whole from here, like any set response
