"""Where mitmproxy 12.2's HTTP/2 server side refuses a client before any hook, unaudited.

Why this touches mitmproxy: a request it reads but will not pass got its own answer, never a
douane decision: a request whose pseudo-headers it cannot parse (a CONNECT, an `:authority` that
is no host) ended the whole connection with a GOAWAY naming the raw error; one failing its
request checks (`:scheme` neither http nor https, no authority) got its HTML 400 (`server:
mitmproxy`); a connection breaking the protocol itself (an upper-case header name, a frame out
of order: h2's own errors) got a GOAWAY. None had a decision id or an audit record. Now:
- a request mitmproxy read but will not pass is answered on its stream with douane's 400 in
  the API error shape naming a decision id (the connection stays usable, as HTTP/1's closes);
- a connection broken at the protocol level is still ended (no stream to answer), its GOAWAY's
  debug data names the decision id instead of the error, its record the method and path of the
  request head that broke it, when one did (h2 decoded it before refusing it);
and each is handed to the audit trail as HTTP/1's refused heads are (`http1.DouaneHeadRefusedHook`:
nobody authenticated, the peer's address, the method and path when read).
The wraps are checked against mitmproxy's version and source at start, like `http1`'s.
"""

from __future__ import annotations

import weakref
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.stream
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import ResponseProtocolError
from mitmproxy.proxy.layers.http._http2 import (
    Http2Connection,
    Http2Server,
    parse_h2_request_headers,
)

from douane.flowstate import new_decision_id
from douane.protocols import http1, mitmpatch
from douane.protocols.http1 import INVALID, DouaneHeadRefusedHook, HeadRefusal
from douane.refusals import make_response
from douane.untrusted import loggable

EXPECTED = {
    "handle_h2_event": "d24a023c678de6ced81275c0ebf2aba54d976e5326965d8c0e952b4cd4f5fb76",
    "protocol_error": "461f5e7de9c9b687b68e74b49413d0043ad138184324f2e7631a8b6cfba1c887",
    "_handle_event": "7282fa18e70a3eaac6f66a4b06dccafa34576a5bfe79feae6b2b212b42165b3c",
    "receive_headers": "de94d278ff7deef95101a865d76ef7b8eb020f0e6f122dbb823ea80138723ca6",
}

_handle_h2_event = Http2Server.handle_h2_event
_protocol_error = Http2Connection.protocol_error
_handle_event = Http2Server._handle_event
_receive_headers = h2.stream.H2Stream.receive_headers


def receive_headers(self: h2.stream.H2Stream, headers, end_stream, header_encoding):  # type: ignore[no-untyped-def]
    """h2's, the decoded head it refuses kept on its error (`_head`, for the record)."""
    try:
        return _receive_headers(self, headers, end_stream, header_encoding)
    except h2.exceptions.ProtocolError as e:
        e.douane_head = headers  # type: ignore[attr-defined]
        raise


def handle_h2_event(self: Http2Server, event: h2.events.Event) -> layer.CommandGenerator[bool]:
    head = None
    if isinstance(event, h2.events.RequestReceived):
        try:
            parse_h2_request_headers(event.headers)
        except ValueError as e:
            yield from _refuse_stream(self, event.stream_id, *_head(event.headers),
                                      "invalid HTTP/2 request headers" + (f": {e}" if str(e)
                                                                          else ""))
            return False  # its stream is not tracked: any body still coming is let go
        head = event.headers
    elif isinstance(event, h2.exceptions.ProtocolError):
        head = getattr(event, "douane_head", None)
    if head is None:
        return (yield from _handle_h2_event(self, event))
    _heads[self] = head  # what a protocol error ending the connection now was reading
    try:
        return (yield from _handle_h2_event(self, event))
    finally:
        _heads.pop(self, None)


_heads: weakref.WeakKeyDictionary[Http2Server, Any] = weakref.WeakKeyDictionary()


def _head(headers: Any) -> tuple[bytes | None, bytes | None]:
    """A request head's method and path (its authority without one), as sent first."""
    pseudo: dict[bytes, bytes] = {}
    for name, value in headers:
        if name.startswith(b":"):
            pseudo.setdefault(name, value)
    return pseudo.get(b":method"), pseudo.get(b":path") or pseudo.get(b":authority")


def handle_event(self: Http2Server, event: events.Event) -> layer.CommandGenerator[None]:
    """mitmproxy's HTML 400 for a request it read but would not pass (its request checks):
    douane's refusal on that stream instead."""
    if isinstance(event, ResponseProtocolError) and event.code in INVALID and \
            self.is_open_for_us(event.stream_id) and \
            not self.h2_conn.streams[event.stream_id].state_machine.headers_sent:
        yield from _refuse_stream(self, event.stream_id, None, None, event.message,
                                  http1.invalid_decision(self.conn, event.stream_id))
        return
    yield from _handle_event(self, event)


def protocol_error(self: Http2Connection, message: str,
                   error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR
                   ) -> layer.CommandGenerator[None]:
    if not isinstance(self, Http2Server):  # an upstream's: its flows' errors are audited
        yield from _protocol_error(self, message, error_code)
        return
    decision_id = new_decision_id()
    # h2 queued a GOAWAY of its own on an error it found (no debug data): the client reads the
    # first one, so only douane's, naming the decision, is sent
    self.h2_conn.clear_outbound_data_buffer()
    yield from _protocol_error(self, f"douane ended this HTTP/2 connection: a protocol error "
                               f"(douane decision {decision_id})", error_code)
    peer = self.conn.peername
    head = _heads.get(self)
    yield DouaneHeadRefusedHook(HeadRefusal(
        decision_id, peer[0] if peer else None, 400, "protocol.h2_error",
        f"HTTP/2 connection ended (GOAWAY): {loggable(message, 200)}",
        *_shown(*_head(head)) if head is not None else (None, None)))


def _refuse_stream(self: Http2Server, stream_id: int, method: bytes | None, path: bytes | None,
                   why: str, decided: str | None = None) -> layer.CommandGenerator[None]:
    """Answer the stream with douane's 400 naming the decision id; its record unless its flow's
    (`decided`) is."""
    decision_id = decided or new_decision_id()
    message = f"refused: {loggable(why, 200)}"
    response = make_response("generic", 400, message, code="invalid_request",
                             decision_id=decision_id)
    self.h2_conn.send_headers(stream_id, [(b":status", b"400"), *(
        (name.lower(), value) for name, value in response.headers.fields)])
    self.h2_conn.send_data(stream_id, response.raw_content or b"", end_stream=True)
    yield commands.SendData(self.conn, self.h2_conn.data_to_send())
    if decided:
        return
    peer = self.conn.peername
    yield DouaneHeadRefusedHook(HeadRefusal(
        decision_id, peer[0] if peer else None, 400, "protocol.invalid_request", message,
        *_shown(method, path)))


def _shown(method: bytes | None, path: bytes | None) -> tuple[str | None, str | None]:
    """A refused head's method and path for its record (bounded there by the audit writer)."""
    return (method.decode("latin-1")[:20] if method else None,
            path.decode("latin-1").split("?")[0] if path else None)


def install() -> None:
    """Wrap mitmproxy's HTTP/2 server side (once); ValueError when this mitmproxy is not the one
    the wraps were written for."""
    mitmpatch.check("HTTP/2 needs", "its refusals of a client are not audited",
                    {"handle_h2_event": _handle_h2_event, "protocol_error": _protocol_error,
                     "_handle_event": _handle_event, "receive_headers": _receive_headers},
                    EXPECTED)
    Http2Server.handle_h2_event = handle_h2_event  # type: ignore[method-assign]
    Http2Server._handle_event = handle_event  # type: ignore[method-assign]
    Http2Connection.protocol_error = protocol_error  # type: ignore[method-assign]
    h2.stream.H2Stream.receive_headers = receive_headers  # type: ignore[method-assign]
