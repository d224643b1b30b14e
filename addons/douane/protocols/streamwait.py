"""A stream's layer pauses, off the event loop, while its filters finish an analysis.

Why this touches mitmproxy: mitmproxy 12.2 calls a `flow.response.stream` callable synchronously,
from the event loop, and sends what it returns; at a channel's end (a model's finish event, the
stream's end) the masking filter may still be analysing the held tail, and waiting for that
analysis there stalled every flow of the process (822 ms with 32 masked streams ending together).
mitmproxy's sans-IO layers already know how to wait: a layer that yields a `StartHook` is paused,
its later events queued, while the proxy server awaits the addons' handler; every other flow (and
every other stream of the same HTTP/2 connection: each has its own layer) goes on. So for a stream
rewritten by douane (`streams.StreamRewriter`), `HttpStream.state_stream_response_body` is wrapped:
after the data it has just processed, and before the final call, while the rewriter `waits` for
analyses it yields `DouaneStreamWaitHook`, whose handler (`Mask.douane_stream_wait`) awaits them
on the pool with the masking timeout, then sends what the rewriter `resume`s with. A hook that
comes back with an analysis still running ends the stream with the API's error event: nothing
waits on the loop and nothing unanalysed leaves. A client gone meanwhile is handled as after any
hook (`check_killed`). Other flows, and streams douane does not rewrite, run mitmproxy's code as
is.

A masked stream's data also takes turns (`Arrivals`): when many masked streams' reads arrive in
one pass of the loop (32 streams ending together: each one's end event parsed, its held text's
analysis proposed or its tail released; or 32 tokens at the same tick), the first ones are
processed as they come, and once `BUDGET` of the loop's CPU has gone to them in that pass, the
next ones pause on the same hook before their data is processed: the hook's turn (`LoopShare`,
after the wait, which has nothing to wait for) spreads them over the next passes, in the order
they came. Their data leaves as it would have, a few passes later; later data of the same stream
waits behind it (the layer is paused). A stream alone never pauses for this.

The wrap depends on the exact code it wraps: `install` checks mitmproxy's version and the source
of the functions it relies on, and refuses to start on any other (masking would otherwise block
the loop again, or lose its wait).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    SendHttp,
)

from douane.protocols import mitmpatch
from douane.protocols.streams import StreamRewriter

# mitmproxy's code this module was written against (sha256 of each function's source)
EXPECTED = {
    "state_stream_response_body":
        "3fb6320300d3ddd5569cfe3c04720b339cd64e400956b7d55b5d31fdcaf22e49",
    "check_killed": "368cad352d1e82b6907688a0d3196d2e586b4af9af2a8465ea00d46e2d3c3672",
}


@dataclass
class DouaneStreamWaitHook(commands.StartHook):
    """A douane-rewritten stream waits for its filters' analyses (`StreamRewriter.waiting`)."""

    flow: http.HTTPFlow


# the loop's CPU a pass gives masked streams' data as it arrives; the rest waits for a turn
BUDGET = 0.002  # CPU seconds


class Arrivals:
    """How much of this pass of the event loop masked streams' data has used (`crowded`). The
    thread's CPU clock (a system call) is read from the pass's first arrival only when other
    callbacks are still to run in the pass (asyncio's ready queue), as `LoopShare` does: alone,
    nothing can follow it in the pass."""

    def __init__(self) -> None:
        self._started = False
        self._cpu: float | None = None  # the CPU clock at the pass's first arrival

    def crowded(self) -> bool:
        """Whether this arrival comes after the pass's share was used (then it waits a turn)."""
        if self._started:
            return self._cpu is not None and time.thread_time() - self._cpu >= BUDGET
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: a layer driven by hand)
            return False
        self._started = True
        self._cpu = time.thread_time() if getattr(loop, "_ready", True) else None
        loop.call_soon(self._next_pass)
        return False

    def _next_pass(self) -> None:
        self._started = False


ARRIVALS = Arrivals()
_original = HttpStream.state_stream_response_body


def _state_stream_response_body(self: HttpStream, event: events.Event
                                ) -> layer.CommandGenerator[None]:
    stream = self.flow.response.stream if self.flow.response else None
    if not isinstance(stream, StreamRewriter):
        return (yield from _original(self, event))
    if isinstance(event, ResponseData) and _masked(stream) and ARRIVALS.crowded():
        stream.waiting = []  # (a turn: nothing to wait for)
        yield DouaneStreamWaitHook(self.flow)
        if (yield from self.check_killed(True)):
            return
    if isinstance(event, ResponseEndOfMessage) and (yield from _wait(self, stream, end=True)):
        return  # the client left, or the flow was killed, while it waited
    yield from _original(self, event)
    if isinstance(event, ResponseData) and stream.backlog:  # (else nothing waits: every chunk)
        yield from _wait(self, stream, end=False)


def _masked(stream: StreamRewriter) -> bool:
    """Whether a filter of the stream may hold text back for an analysis (masking)."""
    return any(hasattr(f, "ready") for f in stream.filters)


def _wait(self: HttpStream, stream: StreamRewriter, end: bool) -> layer.CommandGenerator[bool]:
    """While the rewriter waits for an analysis, pause on the hook, then send what it resumes
    with. True: the flow was killed or the client left meanwhile (mitmproxy ended it). What it
    waits for is asked first: resuming first would let a channel's end through without its turn
    (`streams.TURN`), and 32 ends arriving in one read pass ran back to back in it."""
    resume = False
    while True:
        chunk = stream.resume() if resume else b""
        if chunk:
            if self.context.options.store_streamed_bodies:
                self.response_body_buf += chunk
            yield SendHttp(ResponseData(self.stream_id, chunk), self.context.client)
        waiting = stream.waits(end)
        resume = True
        if not waiting:
            if stream.backlog:  # became ready since `resume` stopped at it
                continue
            return False
        yield DouaneStreamWaitHook(self.flow)
        if (yield from self.check_killed(True)):
            return True
        if not all(f.done() for f in waiting):  # the hook came back early: fail closed
            stream.abort("douane could not finish inspecting this stream and ended it", 500)


def install() -> None:
    """Wrap mitmproxy's streaming state (once); ValueError when this mitmproxy is not the one
    the wrap was written for."""
    mitmpatch.check("masked streams need", "its stream layer is paused while an answer's end is "
                    "analysed", {"state_stream_response_body": _original,
                                 "check_killed": HttpStream.check_killed}, EXPECTED)
    HttpStream.state_stream_response_body = _state_stream_response_body  # type: ignore
