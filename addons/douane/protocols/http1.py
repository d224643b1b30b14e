"""Where mitmproxy 12.2's HTTP/1 reader has no bound, or fails before any hook.

Why this touches mitmproxy:
- What a client sends is buffered until it is read, however long: a request head until its blank
  line (mitmproxy's own "FIXME: protect against header size DoS"), searched again with each read
  (300 MiB of a head that never ends, sent within douane's header timeout, grew the gateway by
  1.5 GB and stalled its loop 12 s, before any hook or authentication); a chunk-size line or a
  trailer section until its end; and everything sent after a request until its answer is done
  (pipelining: 300 MiB sent while a stream was answered were all held). Past `MAX_BUFFERED`
  bytes: a head is answered 431 and its connection closed (no flow exists yet: nothing to audit,
  as for mitmproxy's own 400s); otherwise the connection is closed and the request in progress
  fails as if the client had left.
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

import h11
from mitmproxy import http
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
    make_error_response,
)

from douane.protocols import mitmpatch

MAX_BUFFERED = 256 * 1024  # bytes of a connection buffered (a 40 KB token fits a head)
UPSTREAM_OVERFLOW = "douane: the upstream sent more than"  # its answer's error, audited
# sha256 of the source of each function wrapped
EXPECTED = {
    "read_body": "aece271029af36e4b7eaf84aa17ddcf4ee0efb35e7f04c842c2a7333804a71f1",
    "_handle_event": "2ac8db3e43ae743fd21f78709327091ff712e8c0addf4466f1f1f972c24750d2",
}

_read_body = Http1Connection.read_body
_handle_event = Http1Connection._handle_event
# the answers standing for an upstream head cut at MAX_BUFFERED (an upstream cannot forge one)
_cut_short: weakref.WeakSet[http.Response] = weakref.WeakSet()


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
    yield from _handle_event(self, event)
    state = getattr(self.state, "__func__", None)
    if len(self.buf) <= MAX_BUFFERED or state in (Http1Connection.passthrough,
                                                  Http1Connection.done):
        return
    if isinstance(self, Http1Client):
        yield from _upstream_overflow(self, state is Http1Client.read_headers)
    elif state is Http1Server.read_headers:
        yield commands.SendData(self.conn, make_error_response(
            431, f"the request's headers exceed douane's limit of {MAX_BUFFERED} bytes"))
        yield commands.CloseConnection(self.conn)
    else:  # a chunk line or trailers without end, or bytes sent ahead of the answer
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(RequestProtocolError(
            self.stream_id, f"douane: the client sent more than {MAX_BUFFERED} bytes it could "
            "not be read yet", code=ErrorCode.CLIENT_DISCONNECTED))
    self.buf.clear()
    self.state = self.done


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
