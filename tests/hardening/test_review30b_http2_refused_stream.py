"""Review (stop 30, second round) of `protocols/http2.py`: a stream douane refused at its request
headers (mitmproxy could not parse them) is no longer tracked; the client may still send on it
what HTTP/2 allows on a stream it has not ended — body data, trailers, a reset — and the
connection must go on governing its other streams, without mitmproxy crashing on a stream it
does not know."""

from __future__ import annotations

import h2.events
import pytest

from tests.hardening.test_sec30_http2_refusals import (  # noqa: F401 (fixtures)
    CHAT,
    Tunnel,
    chat_headers,
    gw,
)


@pytest.mark.parametrize("then", ["data", "trailers", "reset"])
def test_what_follows_on_a_refused_stream_leaves_the_connection_governed(
        gw, tls_llm, token, then):  # noqa: F811 (the fixtures imported above)
    before = len(tls_llm.requests)
    tunnel = Tunnel(gw, token, tls_llm.port)
    try:
        tunnel.conn.send_headers(1, chat_headers(tls_llm.port, **{":authority": "a!b:443"}))
        tunnel.tls.sendall(tunnel.conn.data_to_send())
        status, headers, _ = tunnel.answer(1)
        assert status == 400 and headers["x-douane-decision-id"]
        if then == "data":
            tunnel.conn.send_data(1, CHAT, end_stream=True)
        elif then == "trailers":
            tunnel.conn.send_data(1, CHAT)
            tunnel.conn.send_headers(1, [("x-trailer", "1")], end_stream=True)
        else:
            tunnel.conn.reset_stream(1)
        tunnel.tls.sendall(tunnel.conn.data_to_send())
        tunnel.conn.send_headers(3, chat_headers(tls_llm.port))
        tunnel.conn.send_data(3, CHAT, end_stream=True)
        tunnel.tls.sendall(tunnel.conn.data_to_send())
        got = tunnel.answer(3)
        assert not isinstance(got, h2.events.ConnectionTerminated), got
        assert got[0] == 200, got
    finally:
        tunnel.close()
    assert len(tls_llm.requests) == before + 1
    assert "has crashed" not in gw.log_text() and "Traceback" not in gw.log_text()
