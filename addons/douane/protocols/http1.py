"""Where mitmproxy 12.2's HTTP/1 reader has no bound, or fails before any hook.

Why this touches mitmproxy:
- A request head is buffered until its blank line, however long (mitmproxy's own "FIXME: protect
  against header size DoS"), and searched again with each read: 300 MiB of a head that never ends,
  sent within douane's header timeout, grew the gateway by 1.5 GB and stalled its loop 12 s,
  before any hook or authentication. A client's head longer than `MAX_HEAD` is answered 431 and
  its connection closed (no flow exists yet: nothing to audit, as for mitmproxy's own 400s).
- A chunked body's trailer section raises `NotImplementedError`, before any hook: the connection
  handler dies, the client waits for douane's idle timeout and nothing is audited. HTTP/2's reader
  sets trailers on the message instead; the HTTP/1 body reader now does the same (the body ends
  as it would without them). A request carrying trailers is then refused by `Inspect.request`,
  and an answer's are dropped before they are sent.
The wraps are checked against mitmproxy's version and source at start, like `streamwait`.
"""

from __future__ import annotations

import hashlib
import inspect

import h11
from mitmproxy import http, version
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http._http1 import (
    Http1Client,
    Http1Connection,
    Http1Server,
    make_error_response,
)

VERSION = "12.2."
MAX_HEAD = 256 * 1024  # bytes of a request's line and headers (a 40 KB token fits)
# sha256 of the source of each function wrapped
EXPECTED = {
    "read_body": "aece271029af36e4b7eaf84aa17ddcf4ee0efb35e7f04c842c2a7333804a71f1",
    "read_headers": "3fe0945216bcf7bc505e296e44dd33908b19aa900d4157e977499bf7164027d6",
}

_read_body = Http1Connection.read_body
_read_headers = Http1Server.read_headers


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


def read_headers(self: Http1Server, event: events.ConnectionEvent
                 ) -> layer.CommandGenerator[None]:
    yield from _read_headers(self, event)
    if getattr(self.state, "__func__", None) is read_headers and len(self.buf) > MAX_HEAD:
        yield commands.SendData(self.conn, make_error_response(
            431, f"the request's headers exceed douane's limit of {MAX_HEAD} bytes"))
        yield commands.CloseConnection(self.conn)
        self.state = self.done


def _digest(name: str) -> str:
    function = _read_body if name == "read_body" else _read_headers
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def install() -> None:
    """Wrap mitmproxy's HTTP/1 reading (once); ValueError when this mitmproxy is not the one the
    wraps were written for."""
    wrong = [name for name, digest in EXPECTED.items() if _digest(name) != digest]
    if not version.VERSION.startswith(VERSION) or wrong:
        raise ValueError(
            f"douane: HTTP/1 needs mitmproxy {VERSION}x as douane knows it (its reader has no "
            f"bound on a request's head and fails on trailers); this is mitmproxy "
            f"{version.VERSION}" + (f", with a different {', '.join(wrong)}" if wrong else ""))
    Http1Connection.read_body = read_body  # type: ignore[method-assign]
    Http1Server.read_headers = read_headers  # type: ignore[method-assign]
