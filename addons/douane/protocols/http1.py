"""Where mitmproxy 12.2's HTTP/1 reader has no bound, or fails before any hook.

Why this touches mitmproxy:
- What a client sends is buffered until it is read, however long: a request head until its blank
  line (mitmproxy's own "FIXME: protect against header size DoS"), searched again with each read
  (300 MiB of a head that never ends, sent within douane's header timeout, grew the gateway by
  1.5 GB and stalled its loop 12 s, before any hook or authentication); a chunk-size line or a
  trailer section until its end; and everything sent after a request until its answer is done
  (pipelining: 300 MiB sent while a stream was answered were all held). Past `MAX_BUFFERED`
  bytes: a head is answered 431 and its connection closed; otherwise the connection is closed and
  the request in progress fails as if the client had left.
- A head refused before any flow exists (431 above; mitmproxy's own 400 for a head it cannot
  read) reached no hook, so it had no decision id and no audit record. It is answered in the API
  error shape with a decision id, and `DouaneHeadRefusedHook` hands the audit trail its record
  (nobody authenticated: the peer's address, the method and path if the request line was read).
  So is mitmproxy's 400 for a request it read but will not pass (a CONNECT inside a tunnel,
  Content-Length beside Transfer-Encoding, no Host): its HTML in place of any hook's answer.
- What an upstream sends is buffered the same way: an answer's head until its blank line, a
  chunk-size line or trailer section until its end. Past `MAX_BUFFERED` bytes the upstream's
  connection is closed; a head that never ended becomes an empty answer marked `cut_short`, which
  `Inspect` replaces with its 502 in the API's shape (a flow exists: it is audited); otherwise the
  answer fails as if the upstream had left.
- A chunked body's trailer section raises `NotImplementedError`, before any hook: the connection
  handler dies, the client waits for douane's idle timeout and nothing is audited. HTTP/2's reader
  sets trailers on the message instead; the HTTP/1 body reader now does the same (the body ends
  as it would without them). A request carrying trailers is then refused by `Inspect.request`,
  and an answer's are dropped before they are sent.
The wraps are checked against mitmproxy's version and source at start, like `streamwait`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import h11
from mitmproxy import http
from mitmproxy.connection import Client, ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    ReceiveHttp,
    RequestProtocolError,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import (
    Http1Client,
    Http1Connection,
    Http1Server,
)

from douane.flowstate import new_decision_id
from douane.protocols import mitmpatch
from douane.refusals import make_response
from douane.untrusted import loggable

MAX_BUFFERED = 256 * 1024  # bytes of a connection buffered (a 40 KB token fits a head)
REQUEST_LINE = 8192  # bytes of a refused head read for its method and path (mitmproxy's limit)
UPSTREAM_OVERFLOW = "douane: the upstream sent more than"  # its answer's error, audited
# mitmproxy's refusals of a request it read (its own HTML 400): douane's in their place
INVALID = (ErrorCode.REQUEST_VALIDATION_FAILED, ErrorCode.DESTINATION_UNKNOWN)
# sha256 of the source of each function wrapped
EXPECTED = {
    "read_body": "aece271029af36e4b7eaf84aa17ddcf4ee0efb35e7f04c842c2a7333804a71f1",
    "_handle_event": "2ac8db3e43ae743fd21f78709327091ff712e8c0addf4466f1f1f972c24750d2",
}

_read_body = Http1Connection.read_body
_handle_event = Http1Connection._handle_event
# the answers standing for an upstream head cut at MAX_BUFFERED (an upstream cannot forge one)
_cut_short: weakref.WeakSet[http.Response] = weakref.WeakSet()
# a client connection's current head: its first bytes (to `REQUEST_LINE` or the first line's end)
_starts: weakref.WeakKeyDictionary[Http1Connection, bytes] = weakref.WeakKeyDictionary()
# the decision id of each request mitmproxy read but refused at its own checks whose flow douane
# decided (`upstreamerrors.check_invalid`), by client connection and stream: the refusal names it,
# and that flow's record is the refusal's (no second record)
_invalid: weakref.WeakKeyDictionary[Client, dict[int, str]] = weakref.WeakKeyDictionary()


def invalid_reason(request: http.Request, message: str) -> tuple[str, str, str]:
    """(rule, code, message) of the refusal of a request mitmproxy would not pass (`message`
    its reason)."""
    if request.method == "CONNECT":
        return ("protocol.nested_connect", "nested_connect", f"a CONNECT to "
                f"{loggable(request.authority or '?', 200)} inside a tunnel is refused: douane "
                "governs the tunnel's own requests")
    return "protocol.invalid_request", "invalid_request", f"refused: {loggable(message, 200)}"


def decided_invalid(client: Client, stream_id: int, decision_id: str) -> None:
    """The request on `stream_id` of `client`, refused by mitmproxy's checks, is decided as
    `decision_id` (its flow's)."""
    _invalid.setdefault(client, {})[stream_id] = decision_id


def invalid_decision(client: Client, stream_id: int) -> str | None:
    """The decision id `decided_invalid` gave that request, once (None: no flow decided it)."""
    return _invalid.get(client, {}).pop(stream_id, None)


@dataclass(frozen=True)
class HeadRefusal:
    """A request head refused before any flow existed: what its audit record says."""

    decision_id: str
    client: str | None  # the peer's address
    status: int
    rule: str
    message: str
    method: str | None  # from the request line, when it was read (bounded by the audit writer)
    path: str | None


@dataclass
class DouaneHeadRefusedHook(commands.StartHook):
    """A head refused by the reader (`HeadRefusal`), for the audit trail. The refusal has left
    already: the layer does not wait for it."""

    refusal: HeadRefusal
    blocking = False


def cut_short(response: http.Response | None) -> bool:
    """Whether `response` stands for an upstream's answer head that exceeded `MAX_BUFFERED`."""
    return response is not None and response in _cut_short


class _KeepTrailers:
    """h11's body reader, giving a trailer section to the message instead of to mitmproxy."""

    def __init__(self, reader, message: http.Message):
        self.reader = reader
        self.message = message

    def __call__(self, buf):
        event = self.reader(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self.message.trailers = http.Headers(list(event.headers.raw_items()))
            return h11.EndOfMessage()
        return event

    def read_eof(self):
        return self.reader.read_eof()


def read_body(self: Http1Connection, event: events.Event) -> layer.CommandGenerator[None]:
    if not isinstance(self.body_reader, _KeepTrailers):
        message = self.response if isinstance(self, Http1Client) else self.request
        assert message is not None
        self.body_reader = _KeepTrailers(self.body_reader, message)
    return (yield from _read_body(self, event))


def handle_event(self: Http1Connection, event: events.Event) -> layer.CommandGenerator[None]:
    if isinstance(event, ResponseProtocolError) and event.code in INVALID and \
            isinstance(self, Http1Server) and not self.response and self.request and \
            self.conn.state & ConnectionState.CAN_WRITE:
        yield from _refuse_invalid(self, event)
        return
    if getattr(self.state, "__func__", None) is Http1Server.read_headers and \
            isinstance(event, events.DataReceived):
        # a head's first bytes, for a refusal's record (kept once per head, not copied per read)
        start = _starts.get(self, b"") if self.buf else b""
        if len(start) < REQUEST_LINE and b"\r\n" not in start:
            start = _starts[self] = (start + event.data)[:REQUEST_LINE]
        yield from _read_head(self, event, start)
    else:
        yield from _handle_event(self, event)
    state = getattr(self.state, "__func__", None)
    if len(self.buf) <= MAX_BUFFERED or state in (Http1Connection.passthrough,
                                                  Http1Connection.done):
        return
    if isinstance(self, Http1Client):
        yield from _upstream_overflow(self, state is Http1Client.read_headers)
    elif state is Http1Server.read_headers:
        yield from _refuse_head(self, _starts.get(self, b""), 431,
                                "protocol.head_too_large", "request_head_too_large",
                                f"the request's head exceeds douane's limit of {MAX_BUFFERED} "
                                "bytes")
    else:  # a chunk line or trailers without end, or bytes sent ahead of the answer
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(RequestProtocolError(
            self.stream_id, f"douane: the client sent more than {MAX_BUFFERED} bytes it could "
            "not be read yet", code=ErrorCode.CLIENT_DISCONNECTED))
    self.buf.maybe_extract_at_most(len(self.buf))  # (h11's buffer has no `clear`)
    self.state = self.done


def _read_head(self: Http1Connection, event: events.DataReceived, start: bytes
               ) -> layer.CommandGenerator[None]:
    """mitmproxy's reading of a head, with its 400 for a head it cannot read replaced by douane's
    refusal, and the flow it then makes of the head's request line (or of the connection's
    previous request) dropped: the refusal is the decision. (That 400 is the only data sent while
    a head is read; none of the commands there waits for an answer, so they are relayed as they
    come.)"""
    refused = False
    for command in _handle_event(self, event):
        if isinstance(command, commands.SendData) and command.connection is self.conn:
            refused = True
            yield from _refuse_head(self, start, 400, "protocol.bad_head", "bad_request_head",
                                    "douane could not read this request's head as HTTP/1.1",
                                    close=False)
        elif not (refused and isinstance(command, ReceiveHttp)):
            yield command


def _refuse_head(self: Http1Connection, start: bytes, status: int, rule: str, code: str,
                 message: str, close: bool = True) -> layer.CommandGenerator[None]:
    """Answer a head no flow exists for with a refusal naming its decision id, close (unless the
    caller's code does), and hand its audit record over."""
    decision_id = new_decision_id()
    response = make_response("generic", status, message, code=code, decision_id=decision_id,
                             headers={"connection": "close"})
    yield commands.SendData(self.conn, http1.assemble_response(response))
    if close:
        yield commands.CloseConnection(self.conn)
    method = path = None
    line, ended, _ = start.partition(b"\r\n")
    parts = line.split(b" ")
    if ended and len(parts) == 3 and parts[2].startswith(b"HTTP/"):
        method, path = parts[0].decode("latin-1"), parts[1].decode("latin-1").split("?")[0]
    peer = self.conn.peername
    yield DouaneHeadRefusedHook(HeadRefusal(decision_id, peer[0] if peer else None, status, rule,
                                            message, method, path))


def _refuse_invalid(self: Http1Server, event: ResponseProtocolError
                    ) -> layer.CommandGenerator[None]:
    """mitmproxy's own HTML 400 for a request it would not pass (a CONNECT inside a tunnel, a
    smuggling check, no Host), before any douane hook could see it: douane's refusal instead,
    with its record."""
    assert self.request
    request = self.request
    rule, code, message = invalid_reason(request, event.message)
    path = (request.authority or None) if request.method == "CONNECT" \
        else request.path.split("?")[0]
    decided = invalid_decision(self.conn, event.stream_id)
    decision_id = decided or new_decision_id()
    response = make_response("generic", 400, message, code=code, decision_id=decision_id,
                             headers={"connection": "close"})
    yield commands.SendData(self.conn, http1.assemble_response(response))
    yield commands.CloseConnection(self.conn)
    if decided:
        return  # its flow's record is the refusal's
    peer = self.conn.peername
    yield DouaneHeadRefusedHook(HeadRefusal(decision_id, peer[0] if peer else None, 400, rule,
                                            message, request.method[:20], path))


def _upstream_overflow(self: Http1Client, in_head: bool) -> layer.CommandGenerator[None]:
    yield commands.CloseConnection(self.conn)
    if self.stream_id is None:
        return  # nothing asked (mitmproxy closes such a connection on its first byte)
    if in_head:  # an empty answer whose body is still to come: `Inspect` puts its refusal there
        self.response = http.Response.make(502, b"")
        self.response.data.content = None
        _cut_short.add(self.response)
        yield ReceiveHttp(ResponseHeaders(self.stream_id, self.response, False))
        yield ReceiveHttp(ResponseEndOfMessage(self.stream_id))
    else:
        yield ReceiveHttp(ResponseProtocolError(
            self.stream_id, f"{UPSTREAM_OVERFLOW} {MAX_BUFFERED} bytes it could not be read yet",
            code=ErrorCode.GENERIC_SERVER_ERROR))


def install() -> None:
    """Wrap mitmproxy's HTTP/1 reading (once); ValueError when this mitmproxy is not the one the
    wraps were written for."""
    mitmpatch.check("HTTP/1 needs", "its reader has no bound on what it buffers and fails on "
                    "trailers", {"read_body": _read_body, "_handle_event": _handle_event}, EXPECTED)
    Http1Connection.read_body = read_body  # type: ignore[method-assign]
    Http1Connection._handle_event = handle_event  # type: ignore[method-assign]
