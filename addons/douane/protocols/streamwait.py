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

The wrap depends on the exact code it wraps: `install` checks mitmproxy's version and the source
of the functions it relies on, and refuses to start on any other (masking would otherwise block
the loop again, or lose its wait).
"""

from __future__ import annotations

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


_original = HttpStream.state_stream_response_body


def _state_stream_response_body(self: HttpStream, event: events.Event
                                ) -> layer.CommandGenerator[None]:
    stream = self.flow.response.stream if self.flow.response else None
    if not isinstance(stream, StreamRewriter):
        return (yield from _original(self, event))
    if isinstance(event, ResponseEndOfMessage) and (yield from _wait(self, stream, end=True)):
        return  # the client left, or the flow was killed, while it waited
    yield from _original(self, event)
    if isinstance(event, ResponseData) and stream.backlog:  # (else nothing waits: every chunk)
        yield from _wait(self, stream, end=False)


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
            stream.abort("douane could not finish inspecting this stream and ended it")


def install() -> None:
    """Wrap mitmproxy's streaming state (once); ValueError when this mitmproxy is not the one
    the wrap was written for."""
    mitmpatch.check("masked streams need", "its stream layer is paused while an answer's end is "
                    "analysed", {"state_stream_response_body": _original,
                                 "check_killed": HttpStream.check_killed}, EXPECTED)
    HttpStream.state_stream_response_body = _state_stream_response_body  # type: ignore
