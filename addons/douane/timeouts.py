"""`ClientTimeouts`: a client connection that holds the gateway without making progress is closed,
and an answer its upstream does not give in time is ended in the API's shape.

mitmproxy's only timeout is `tcp_timeout` (600 s of silence): a client sending a byte now and
then, or none at all, holds its connection for ever. douane's limits (`gateway.timeouts`):
- idle: a connection with no request in progress receives nothing for this long (from its opening
  or the end of its last answer);
- headers: a request's headers are complete within this long of its first byte;
- body: a request's body is complete within this long of its headers.
A WebSocket is left to its own policing (its upstream's silence after a client's message:
`douane.websocket`).

An upstream that accepts a request and then never answers, or stops in the middle of its answer,
held the client until mitmproxy's `tcp_timeout` (600 s of silence on the client's connection, any
flow of it) closed the connection, with no answer (its record said only that the client left).
Each answer has its own
deadlines (`gateway.timeouts`):
- answer_head: from the moment the request leaves douane's checkpoint (after any hold for an
  approver, which does not count) to its answer's head, connecting and TLS to the upstream
  included;
- answer_silence: once the head came, the longest the upstream may send nothing (a chunk of a
  stream or of a whole answer); a model streaming slowly but steadily is never cut;
- mcp_silence: the same for an MCP upstream, larger: a long tool call, or a GET stream listening
  for the server's messages, may idle (any byte, an SSE comment as a keep-alive, counts).
Time spent in douane's own hooks (an answer masked, a stream's end analysed) does not count.
`HttpStream.make_server_connection` is wrapped to start the clock (one dict entry per request);
progress is read at each look from what the layer already keeps (the answer's head, the bytes of a
whole answer gathered, the bytes a rewritten stream received): nothing is counted per chunk.
Past a deadline the flow is ended inside its own layer (`_Cut`, below): the upstream's connection
is closed (HTTP/1) or its stream reset (HTTP/2), and `upstreamerrors` answers a 504 in the API's
shape, or ends a stream already started with the API's error event; the audit record says
`upstream.timeout`. douane raises mitmproxy's `tcp_timeout` above its longest deadline so its own
answer comes first. The wrap, and the mitmproxy code the wake-up relies on, are checked against
mitmproxy's version and source at start, like `protocols.http1`.

A watchdog task checks every second; its work is one pass over the open client connections and
the answers awaited.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    GetHttpConnection,
    HttpLayer,
    HttpStream,
    RequestProtocolError,
    ResponseProtocolError,
    SendHttp,
)

from douane import upstreamerrors
from douane.config import Limits
from douane.flowstate import Reason, peek, state
from douane.protocols import mitmpatch, streams
from douane.settings import Settings

logger = logging.getLogger(__name__)
TICK = 1.0
TCP_MARGIN = 30  # seconds mitmproxy's tcp_timeout is kept above douane's longest deadline
# sha256 of the source of mitmproxy's functions the answer deadlines rely on
EXPECTED = {
    "make_server_connection": "ddc7bc72f4d2fbc7d7be17c31ab321035c8e50672160a6fd3b84aec24e7350fb",
    "_handle_event": "e3cbfef7310ae81ffa7ed7ecba57f932afabada8cd48921308db363c47dd6c89",
    "event_to_child": "1095f6e1581d1780afd5e87446b11eee0b12fb196c9be559f0fe15055436c8d7",
    "handle_event": "fd88b0fb09ceddbb1915fe0d588c206e8310d6883a77048a665675e49e43de2b",
}


@dataclass(slots=True)
class _Answer:
    """An answer awaited from upstream: the layer that waits for it, and until when."""

    flow: http.HTTPFlow
    stream: HttpStream
    deadline: float  # time.monotonic()
    silence: int  # seconds allowed between two pieces of it, once its head came
    seen: tuple[bool, int, int] = (False, 0, 0)  # what had come at the last look (`_progress`)


class _Cut(commands.RequestWakeup):
    """douane's own wake-up of a stream whose answer's deadline passed (`message`: why)."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message


# flow id -> its awaited answer: made when the request leaves (`make_server_connection`), dropped
# at the flow's `response` or `error`, read by the watchdog
_answers: dict[str, _Answer] = {}
_limits = Limits()
_make_server_connection = HttpStream.make_server_connection


@dataclass
class _Client:
    conn: connection.Client
    ready_since: float  # time.time() the connection was last without a request in progress
    settled: bool = True  # ready_since moved past the end of the last answer's own activity
    first_byte: float | None = None  # first activity seen since ready_since (to the tick)
    busy: dict[str, tuple[http.HTTPFlow, float | None]] = field(default_factory=dict)
    # flow id -> (flow, deadline of its body; None once the body is complete)
    exempt: bool = False  # a WebSocket


class ClientTimeouts:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.clients: dict[str, _Client] = {}
        self._task: asyncio.Task[None] | None = None

    def configure(self, updated: set[str]) -> None:
        global _limits
        try:
            install()
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        _limits = self.settings.config.limits
        # mitmproxy's own timeout closes a silent client connection without an answer: kept above
        # douane's deadlines, so that douane's answer (and its audit record) comes first
        longest = max(_limits.answer_head_timeout, _limits.answer_silence_timeout,
                      _limits.mcp_silence_timeout, _limits.websocket_idle_timeout) + TCP_MARGIN
        if ctx.options.tcp_timeout < longest:
            ctx.options.update(tcp_timeout=longest)

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    def client_connected(self, client: connection.Client) -> None:
        # (mitmproxy's own start-up events on the connection count as activity: settle first)
        self.clients[client.id] = _Client(client, time.time(), settled=False)

    def client_disconnected(self, client: connection.Client) -> None:
        self.clients.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None:
            c.busy[flow.id] = (flow, time.time() + self.settings.config.limits.body_timeout)

    def request(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None and flow.id in c.busy:
            c.busy[flow.id] = (flow, None)

    def response(self, flow: http.HTTPFlow) -> None:
        _answers.pop(flow.id, None)  # the upstream has answered in time

    def answered(self, flow: http.HTTPFlow) -> None:
        """The last response step: the answer leaves now. Until then (the policy matching a
        large answer in a thread, masking it) the connection is not idle."""
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)  # the tunnel's first request comes next

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None:
            c.exempt = True

    def _finished(self, flow: http.HTTPFlow) -> None:
        _answers.pop(flow.id, None)
        c = self.clients.get(flow.client_conn.id)
        if c is not None:
            c.busy.pop(flow.id, None)
            if not c.busy:
                c.ready_since, c.first_byte, c.settled = time.time(), None, False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                late = self._check(time.time())
            except Exception:  # the watchdog must outlive any one connection's oddity
                logger.exception("douane: the client timeout watchdog failed a check")
                continue
            for handler in late:
                # One at a time, the loop free between them: a thousand connections opened
                # together time out together, and their teardowns would be one long stall.
                await handler.on_timeout()
                await asyncio.sleep(0)
            for answer in _late_answers(time.monotonic()):
                try:
                    await _cut(answer)
                except Exception:
                    logger.exception("douane: an answer past its deadline could not be ended")
                await asyncio.sleep(0)

    def _check(self, now: float) -> list[Any]:
        """The connection handlers to close."""
        limits = self.settings.config.limits
        handlers = ctx.master.addons.get("proxyserver").connections
        late_handlers = []
        for c in list(self.clients.values()):
            handler = handlers.get(c.conn.id)
            if handler is None or c.exempt:
                continue
            why = None
            if c.busy:
                late = [f for f, deadline in c.busy.values() if deadline and deadline < now]
                for f in late:
                    state(f).decide("refuse", Reason("protocol.timeout", "request body too slow"),
                                    status=408)
                    upstreamerrors.ended_as(f, "client_timeout")  # (not a client that left)
                why = "request body not complete in time" if late else None
            elif not c.settled:  # sending the last answer counts as activity too: not a new byte
                c.ready_since = max(c.ready_since, handler.timeout_watchdog.last_activity)
                c.settled = True
            elif c.first_byte is None:
                if handler.timeout_watchdog.last_activity > c.ready_since:
                    c.first_byte = now
                elif now - c.ready_since > limits.idle_timeout:
                    why = "idle"
            if c.first_byte is not None and not c.busy and now - c.first_byte > limits.header_timeout:
                why = "request headers not complete in time"
            if why:
                self.clients.pop(c.conn.id, None)
                logger.info("douane: closing client connection %s: %s",
                            c.conn.peername[0] if c.conn.peername else "?", why)
                late_handlers.append(handler)
        return late_handlers



def _progress(answer: _Answer) -> tuple[bool, int, int]:
    """What of the answer has come: its head, the bytes of a whole answer gathered, the bytes of
    a stream douane rewrites (every stream: SSE) received. Read at each look, not counted per
    chunk: the layer's own buffers and the rewriter's count say it."""
    response = answer.flow.response
    rewriter = streams.rewriter_of(answer.flow) if response is not None else None
    return (response is not None, len(answer.stream.response_body_buf),
            rewriter.received if rewriter is not None else 0)


def _late_answers(now: float) -> list[_Answer]:
    """The answers past their deadline, let go of. An answer that moved since the last look has
    until `silence` from now; a deadline does not run while the answer's layer waits for
    douane's own hooks."""
    late = []
    for flow_id, answer in list(_answers.items()):
        if not answer.flow.live or answer.flow.error:
            del _answers[flow_id]
            continue
        seen = _progress(answer)
        paused = answer.stream._paused  # (mitmproxy's: the layer waits for a command's end)
        if seen != answer.seen or (paused is not None and
                                   isinstance(paused.command, commands.StartHook)):
            answer.seen, answer.deadline = seen, now + answer.silence
        elif answer.deadline < now:
            del _answers[flow_id]
            late.append(answer)
    return late


async def _cut(answer: _Answer) -> None:
    """End a late answer inside its own layer: a wake-up only its stream handles (`_woken`),
    routed to it as mitmproxy routes any stream's own (each HTTP layer above it knows its way)."""
    flow, stream = answer.flow, answer.stream
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None or "_handle_event" in stream.__dict__:  # (gone, or no longer HTTP)
        return
    if answer.seen[0]:
        seconds, what = answer.silence, "sent nothing more of its answer"
    else:
        seconds, what = _limits.answer_head_timeout, "did not answer"
    message = f"douane: the upstream {what} within {seconds} s"
    logger.info("douane: %s (decision %s)", message, state(flow).decision_id)
    paused = stream._paused
    if paused is not None and isinstance(paused.command, GetHttpConnection):
        # still connecting (or in its TLS handshake): the stream waits for that, not for events
        for conn, waiting in _http_layer(stream).waiting_for_establishment.items():
            if paused.command in waiting and conn in handler.transports:
                upstreamerrors.timed_out(flow, message)
                handler.close_connection(conn)
    wakeup = _Cut(message)
    layers = stream.context.layers
    for i, above in enumerate(layers[:-1]):
        if isinstance(above, HttpLayer):
            above.command_sources[wakeup] = layers[i + 1]
    # this stream alone handles its events through `_woken` until the wake-up comes (mitmproxy
    # switches a stream's handler the same way for a WebSocket); no other stream pays for it
    stream._handle_event = types.MethodType(_woken, stream)  # type: ignore[method-assign]
    await handler.server_event(events.Wakeup(wakeup))


def _woken(self: HttpStream, event: events.Event) -> layer.CommandGenerator[None]:
    if isinstance(event, events.Wakeup) and isinstance(event.command, _Cut):
        del self._handle_event  # back to mitmproxy's
        yield from _ended(self, event.command.message)
    else:
        yield from HttpStream._handle_event(self, event)


def _http_layer(stream: HttpStream) -> HttpLayer:
    layers = stream.context.layers
    return layers[layers.index(stream) - 1]


def _ended(stream: HttpStream, message: str) -> layer.CommandGenerator[None]:
    """In the stream's layer: the upstream is told (HTTP/1: its connection closed; HTTP/2: this
    stream reset) and the failure answered as the upstream's own (`upstreamerrors`)."""
    done = (HttpStream.state_done, HttpStream.state_errored)
    if not stream.flow.live or getattr(stream.server_state, "__func__", None) in done:
        return
    upstreamerrors.timed_out(stream.flow, message)
    if stream.context.server in _http_layer(stream).connections:
        yield SendHttp(RequestProtocolError(stream.stream_id, message, ErrorCode.CANCEL),
                       stream.context.server)
    yield from stream.handle_protocol_error(
        ResponseProtocolError(stream.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR))


def make_server_connection(self: HttpStream) -> layer.CommandGenerator[bool]:
    # The request leaves, its `request` hook done (a hold for an approver does not count): its
    # answer's clock starts, connecting and TLS to the upstream included.
    st = peek(self.flow)
    mcp = st is not None and st.upstream is not None and st.upstream.protocol == "mcp"
    _answers[self.flow.id] = _Answer(
        self.flow, self, time.monotonic() + _limits.answer_head_timeout,
        _limits.mcp_silence_timeout if mcp else _limits.answer_silence_timeout)
    return (yield from _make_server_connection(self))


def install() -> None:
    """Wrap mitmproxy's stream layer (once); ValueError when this mitmproxy is not the one the
    wrap was written for."""
    mitmpatch.check("answer deadlines need", "a stream's layer is woken and ended in place",
                    {"make_server_connection": _make_server_connection,
                     "_handle_event": HttpStream._handle_event,
                     "event_to_child": HttpLayer.event_to_child,
                     "handle_event": layer.Layer.handle_event}, EXPECTED)
    HttpStream.make_server_connection = make_server_connection  # type: ignore[method-assign]
