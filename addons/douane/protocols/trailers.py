"""An HTTP/1.1 trailer section reaches douane's hooks, as HTTP/2's does.

Why this touches mitmproxy: mitmproxy 12.2's HTTP/1 reader raises `NotImplementedError` on a
chunked body's trailer section, before any hook: the connection handler dies, the client waits
for douane's idle timeout and nothing is audited. Its HTTP/2 reader sets the trailers on the
message instead. So the HTTP/1 body reader is wrapped to do the same: the fields go on the
request (or answer) being read, and the body ends as it would without them. A request carrying
trailers is then refused by `Inspect.request`, and an answer's are dropped before they are sent.
The wrap is checked against mitmproxy's version and source at start, like `streamwait`.
"""

from __future__ import annotations

import hashlib
import inspect

import h11
from mitmproxy import http, version
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers.http._http1 import Http1Client, Http1Connection

VERSION = "12.2."
# sha256 of the function wrapped (its trailer branch raises; the reader is read nowhere else)
EXPECTED = "aece271029af36e4b7eaf84aa17ddcf4ee0efb35e7f04c842c2a7333804a71f1"

_original = Http1Connection.read_body


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


def _read_body(self: Http1Connection, event: events.Event) -> layer.CommandGenerator[None]:
    if not isinstance(self.body_reader, _KeepTrailers):
        message = self.response if isinstance(self, Http1Client) else self.request
        assert message is not None
        self.body_reader = _KeepTrailers(self.body_reader, message)
    return (yield from _original(self, event))


def install() -> None:
    """Wrap mitmproxy's HTTP/1 body reading (once); ValueError when this mitmproxy is not the one
    the wrap was written for."""
    digest = hashlib.sha256(inspect.getsource(_original).encode()).hexdigest()
    if not version.VERSION.startswith(VERSION) or digest != EXPECTED:
        raise ValueError(
            f"douane: HTTP/1.1 trailers need mitmproxy {VERSION}x as douane knows it (its reader "
            f"fails on them before any hook); this is mitmproxy {version.VERSION}"
            + ("" if digest == EXPECTED else ", with a different read_body"))
    Http1Connection.read_body = _read_body  # type: ignore[method-assign]
