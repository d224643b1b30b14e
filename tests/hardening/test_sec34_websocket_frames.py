"""Security, stop 34: a large WebSocket message cost the event loop time growing with its square.
mitmproxy appends each piece of a frame it reads to the frame so far (`frame_buf[-1] += data`):
as bytes, every piece copied all the frame before it (a 4 MB message read in 64 KB pieces:
~130 MB copied on the loop, each pass's CPU growing with the message; 23 stalls over 10 ms and
215 ms of CPU in them for three 4 MB messages through a real gateway, 7 and 110 ms after). The
relay's wrap (`websocket._relay_bounded`) keeps the frame being read a bytearray, grown in place.
Here mitmproxy's own relay, fed a message in pieces: the frame grows in place (one object)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from douane import websocket


class _Relay:
    """mitmproxy's `relay_messages` append, exactly (`websocket.EXPECTED` pins its source)."""

    def __call__(self, layer, event):
        ws = layer.client_ws
        ws.frame_buf[-1] += event.data
        yield from ()


@pytest.fixture
def layer(monkeypatch):
    monkeypatch.setattr(websocket, "_relay_messages", _Relay())
    ws = SimpleNamespace(frame_buf=[b""], conn=None)
    other = SimpleNamespace(frame_buf=[b""], conn=None)
    options = SimpleNamespace(body_size_limit="100m")
    fake = SimpleNamespace(client_ws=ws, server_ws=other, context=SimpleNamespace(options=options),
                           flow=SimpleNamespace(error=None))
    fake._handle_event = None  # (not the paced wrap: nothing is closed)
    return fake


def test_a_frame_read_in_pieces_grows_in_place(layer):
    piece = SimpleNamespace(data=b"x" * 65536)
    list(websocket._relay_bounded(layer, piece))
    first = layer.client_ws.frame_buf[-1]
    for _ in range(63):
        list(websocket._relay_bounded(layer, piece))
        assert layer.client_ws.frame_buf[-1] is first  # the same buffer: no copy of it all
    assert len(b"".join(layer.client_ws.frame_buf)) == 64 * 65536


def test_the_pinned_relay_still_appends_so():
    """The wrap assumes mitmproxy's relay appends a piece with `+=` (its source is pinned at
    start: `websocket.install`)."""
    import inspect

    from mitmproxy.proxy.layers.websocket import WebsocketLayer
    assert "src_ws.frame_buf[-1] += ws_event.data" in inspect.getsource(
        WebsocketLayer.relay_messages)
