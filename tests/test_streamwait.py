"""The wrap of mitmproxy's stream layer (protocols.streamwait) starts only on the mitmproxy it was
written for: another version, or a changed function, refuses to start (masking would otherwise
stall the event loop again at every stream's end, or lose its wait)."""

from __future__ import annotations

import pytest
from mitmproxy.proxy.layers.http import HttpStream

from douane.protocols import mitmpatch, streamwait


def test_install_wraps_mitmproxys_stream_state_once():
    streamwait.install()
    streamwait.install()
    assert HttpStream.state_stream_response_body is streamwait._state_stream_response_body


def test_another_mitmproxy_version_refuses_to_start(monkeypatch):
    monkeypatch.setattr(mitmpatch.version, "VERSION", "13.0.0")
    with pytest.raises(ValueError, match="this is mitmproxy 13.0.0"):
        streamwait.install()


def test_a_changed_function_refuses_to_start(monkeypatch):
    monkeypatch.setitem(streamwait.EXPECTED, "check_killed", "0" * 64)
    with pytest.raises(ValueError, match="with a different check_killed"):
        streamwait.install()
