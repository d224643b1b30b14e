"""`Mask`: PII and secrets masked in answers, tool results and resources (and, when the config
asks, in prompts and tool arguments before they leave). Streams are masked as they pass.

Only text pieces are edited; the JSON or SSE structure stays as it was. The audit record counts
the entity types masked, never the values. Exempt groups see the originals. Any analyser failure
refuses the flow or cuts the stream: nothing unmasked leaves because masking failed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import time

from mitmproxy import exceptions, http

from douane import protocols, secrets
from douane.flowstate import FlowState, Reason, state
from douane.interaction import TextPiece
from douane.masking import engine, operators
from douane.masking.config import NER_ENTITIES, MaskingSettings
from douane.masking.engine import Span
from douane.masking.pool import MaskingPool
from douane.masking.streaming import StreamMasker, plain, shift
from douane.protocols import fields, streams, streamwait
from douane.refusals import refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)

REQUEST_KINDS = ("prompt", "tool_arguments", "tool_result")
RESPONSE_KINDS = ("completion", "tool_result", "resource", "tool_arguments")
WARM_UP_SECONDS = 300
RECENT = 4096  # prompt texts whose analysis is remembered (`Recent`)
# a text is read word by word on the event loop for being plain (`streaming.plain`, ~12 us a
# word) up to this long; a longer one goes to the workers (1 MB of plain words held the loop 2.4 s)
PLAIN_CHARS = 4096


def could_hold_a_value(text: str, entities: tuple[str, ...]) -> bool:
    """Whether the analyser could find anything in `text`; when not, it is not sent. A name or a
    place (NER's or a field's) needs a run of two letters: the engine drops every such span
    without a word of letters (`engine.refine`); each pattern entity needs its pre-filter
    (`engine.PREFILTERS`: an `@`, enough digits, a secret's hint or long run). So numbers, dates,
    amounts and codes with no two letters together are not analysed
    (tests/test_masking_path.py holds the real analyser to it). Tested on each view the engine
    reads (`secrets.readings`: a name spelt with zero-width joiners or in tag characters)."""
    return any(_could_hold(seen, entities) for seen, _ in secrets.readings(text))


def _could_hold(text: str, entities: tuple[str, ...]) -> bool:
    if engine.LETTERS_WORD.search(text) and any(e in NER_ENTITIES for e in entities):
        return True
    digits = len(engine.DIGITS.findall(text))
    return any(engine.PREFILTERS[e](text, digits) for e in entities if e not in NER_ENTITIES)


def worth_analysing(text: str, entities: tuple[str, ...]) -> bool:
    """Whether `text` goes to the workers. Past `PLAIN_CHARS` it goes unasked: the guesses read
    it on the event loop at ~0.1-12 µs a character or word (1 MB of digits held the loop
    ~260 ms, 1 MB of plain words 2.4 s), and the workers read it anyway when it is long."""
    return len(text) > PLAIN_CHARS or (could_hold_a_value(text, entities) and not plain(text))


class Recent:
    """The analyses of the last `RECENT` prompt texts, by keyed digest. A chat re-sends its whole
    history with every turn: with `requests: true`, each earlier message was analysed again at
    every turn. No text is kept: a BLAKE2b-256 digest under a key drawn at start names no value to
    anyone without the key. Each user's texts are their own (the digest holds the user): a hit
    answers sooner, and another user must not learn from that what someone sent lately. Used on
    the event loop only; made anew with the pool (the spans depend on the settings)."""

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._spans: collections.OrderedDict[bytes, list[Span]] = collections.OrderedDict()

    def digest(self, text: str, user: str = "") -> bytes:
        return hashlib.blake2b(f"{len(user)}:{user}{text}".encode("utf-8", "surrogatepass"),
                               key=self._key).digest()

    def get(self, digest: bytes) -> list[Span] | None:
        spans = self._spans.get(digest)
        if spans is not None:
            self._spans.move_to_end(digest)
        return spans

    def put(self, digest: bytes, spans: list[Span]) -> None:
        self._spans[digest] = spans
        if len(self._spans) > RECENT:
            self._spans.popitem(last=False)


class Mask:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.masking: MaskingSettings | None = None
        self.pool: MaskingPool | None = None
        self.recent = Recent()

    def configure(self, updated: set[str]) -> None:
        if "douane_config" not in updated and self.pool is not None:
            return
        masking = self.settings.config.sections.get("masking")
        if masking != self.masking:
            if self.pool:
                self.pool.shutdown()
            if masking:
                try:
                    streamwait.install()
                except ValueError as e:
                    raise exceptions.OptionsError(str(e)) from None
            self.masking = masking
            self.pool = MaskingPool(masking) if masking else None
            self.recent = Recent()
            if self.pool:
                self._warm_up(self.pool)

    @staticmethod
    def _warm_up(pool: MaskingPool) -> None:
        # Serve only once every worker has loaded its model: on a loaded machine that takes
        # longer than an analysis may, and the first answers would be refused as timed out.
        futures = pool.warm_up()
        deadline = time.monotonic() + WARM_UP_SECONDS
        for future in futures:  # (`exception` waits reading the workers' pipes: no loop does)
            with contextlib.suppress(TimeoutError):
                future.exception(timeout=max(0.0, deadline - time.monotonic()))
        pending = [f for f in futures if not f.done()]
        failed = pending or [f for f in futures if f.exception() is not None]
        if failed:
            pool.shutdown()
            raise exceptions.OptionsError(
                "douane: the masking workers did not start within "
                f"{WARM_UP_SECONDS} s" if pending else
                f"douane: a masking worker failed to start: {failed[0].exception()}")

    def done(self) -> None:
        if self.pool:
            self.pool.shutdown()

    def _applies(self, flow: http.HTTPFlow) -> FlowState | None:
        st = state(flow)
        if self.masking is None or st.interaction is None or st.identity is None \
                or st.upstream is None:
            return None
        if set(st.identity.groups) & set(self.masking.exempt_groups):
            return None
        return st

    async def _mask(self, st: FlowState, pieces: list[TextPiece], recent: Recent | None = None,
                    together: bool = False) -> list[TextPiece]:
        """Mask the pieces in place; returns the ones that changed. Texts nothing could be found
        in make no round trip; a text that is in several pieces is analysed once, and, with
        `recent`, a text analysed lately is not analysed again. `together`: an answer's blocks
        are analysed as the runs a reader reads (`streams.read_together`)."""
        assert self.pool and self.masking
        entities = self.masking.entities
        runs = [(text, run) for run in (streams.read_together(pieces) if together else
                                        [[p] for p in pieces])
                if worth_analysing(text := "".join(p.text for p in run), entities)]
        if not runs:
            return []
        texts = list(dict.fromkeys(text for text, _ in runs))
        user = st.identity.user if st.identity else ""
        digests = {t: recent.digest(t, user) for t in texts} if recent else {}
        found = {t: spans for t, d in digests.items() if (spans := recent.get(d)) is not None}
        todo = [t for t in texts if t not in found]
        if todo:
            found.update(zip(todo, await self.pool.analyze(todo), strict=True))
            if recent:
                for t in todo:
                    recent.put(digests[t], found[t])
        changed = []
        for text, run in runs:
            start = 0
            for piece in run:  # each piece masked with the part of each value it holds
                end = start + len(piece.text)
                spans = shift(found[text], start, end)
                start = end
                if spans:
                    piece.text = operators.apply(self.masking, piece.text, spans, st.masked)
                    changed.append(piece)
        return changed

    async def _in_files(self, st: FlowState, pieces: list[TextPiece],
                        kinds: tuple[str, ...]) -> bool:
        """Whether masking finds a value in the text of a file (a data URL, base64 `file_data`,
        an MCP blob): read, never rewritten in place, so what holds one cannot leave."""
        files = [p for p in pieces if p.kind in kinds and not p.editable
                 and fields.DECODED in p.path]
        return bool(files) and bool(await self._mask(st, files))

    def _record(self, st: FlowState, where: str, count: int) -> None:
        if count:
            st.decide("mask", Reason(f"mask.{where}", f"{count} value(s) masked in the {where}"))

    async def request(self, flow: http.HTTPFlow) -> None:
        st = self._applies(flow)
        if st is None or flow.response or not self.masking:
            return
        assert st.interaction
        if st.interaction.spoken and self.masking.responses:
            # speech says the values masking would mask in text, and no analyser hears it
            refuse(flow, 403, "douane masks answers and cannot mask one in speech: ask for "
                   "text", "spoken_answer_refused", Reason("mask.spoken", "an answer in speech "
                                                            "cannot be masked"))
            return
        if not self.masking.requests:
            return
        if await self._in_files(st, st.interaction.texts, REQUEST_KINDS):
            refuse(flow, 403, "the request carries a file holding values douane masks, and it "
                   "cannot mask them inside the file", "unmaskable_file",
                   Reason("mask.file", "values found in a text file of the request"))
            return
        before = sum(st.masked.values())
        changed = await self._mask(st, [p for p in st.interaction.texts
                                        if p.kind in REQUEST_KINDS and p.editable], self.recent)
        if changed:
            protocols.apply_text_edits(flow, "request", changed)
        self._record(st, "request", sum(st.masked.values()) - before)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = self._applies(flow)
        rewriter = streams.rewriter_of(flow)
        if st is None or rewriter is None or not self.masking or not self.masking.responses:
            return
        assert self.pool
        rewriter.filters.append(StreamMasker(self.masking, self.pool, st.masked))

    async def douane_stream_wait(self, flow: http.HTTPFlow) -> None:
        """A masked stream's channel ends before its held text's analysis is done: its layer is
        paused on this hook (`protocols.streamwait`) while the analysis finishes on the pool;
        every other flow goes on. Past the timeout the stream ends with the API's error event,
        as for a failed analysis: the held text never leaves unanalysed."""
        rewriter = streams.rewriter_of(flow)
        if rewriter is None or all(f.done() for f in rewriter.waiting):
            return  # (an end's turn on the loop, `streams.TURN`, waits for nothing here)
        timeout = self.masking.timeout_seconds if self.masking else 0
        waiting = rewriter.waiting  # (an error is raised by the rewriter when it resumes)
        if self.pool is None or not await self.pool.settled(waiting, timeout):
            for f in waiting:
                f.cancel()  # one still queued is not analysed for nothing (a done one: no-op)
            logger.error("douane: a stream's masking analysis took over %s s (decision %s)",
                         timeout, state(flow).decision_id)
            if self.pool:
                self.pool.overran()  # its worker, if hung, is killed and replaced
            rewriter.abort("douane could not inspect this stream and ended it", 500)

    async def response(self, flow: http.HTTPFlow) -> None:
        st = self._applies(flow)
        if st is None or not flow.response or not self.masking or not self.masking.responses:
            return
        assert st.interaction
        if streams.rewriter_of(flow) is not None:
            self._record(st, "response", sum(n for n in st.masked.values()))
            return
        if st.decision and st.decision.action in ("block", "refuse", "error", "hold"):
            return  # douane's own refusal: nothing from the upstream is in it
        if await self._in_files(st, st.interaction.response_texts, RESPONSE_KINDS):
            # a text file (base64, a data URL, an MCP blob) is read, never rewritten in place
            refuse(flow, 502, "the answer carries a file holding values douane masks, and it "
                   "cannot mask them inside the file", "unmaskable_file",
                   Reason("mask.file", "values found in a text file of the answer"))
            return
        before = sum(st.masked.values())
        changed = await self._mask(st, [p for p in st.interaction.response_texts
                                        if p.kind in RESPONSE_KINDS and p.editable],
                                   together=True)
        if changed:
            protocols.apply_text_edits(flow, "response", changed)
        self._record(st, "response", sum(st.masked.values()) - before)
