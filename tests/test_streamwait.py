"""The wrap of mitmproxy's stream layer (protocols.streamwait) starts only on the mitmproxy it was
written for: another version, or a changed function, refuses to start (masking would otherwise
stall the event loop again at every stream's end, or lose its wait); a masked end pauses on the
wait hook."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from mitmproxy.proxy.layers.http import HttpStream, ResponseData, ResponseEndOfMessage, SendHttp
from mitmproxy.test import tflow

from douane import protocols
from douane.masking.streaming import StreamMasker
from douane.protocols import mitmpatch, streams, streamwait
from tests.test_masking import SETTINGS
from tests.test_masking_stream import API_STREAMS, Passing, ScheduledPool, analyse, whole
from tests.test_protocols import flow_for, streamed_text

__all__ = ["analyse"]  # the real analyser, once per module (a fixture)


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


class _Layer:
    """What the wrapped state reads of mitmproxy's `HttpStream`: the flow, its stream id and
    client, the streamed-bodies option, and `check_killed` (the client stays)."""

    def __init__(self, flow):
        self.flow, self.stream_id = flow, 1
        self.context = SimpleNamespace(client=object(),
                                       options=SimpleNamespace(store_streamed_bodies=False))

    def check_killed(self, emit_error_hook: bool):
        return False
        yield  # (a generator, as mitmproxy's)


def _mitmproxys(self, event):
    """mitmproxy's own state, as far as a rewritten stream goes: data through the callable."""
    chunks = self.flow.response.stream(event.data if isinstance(event, ResponseData) else b"")
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        if chunk:
            yield SendHttp(ResponseData(self.stream_id, chunk), self.context.client)


@pytest.mark.parametrize("masked", [True, False])
def test_a_masked_end_pauses_on_the_hook_even_when_its_analysis_is_known(monkeypatch, analyse,
                                                                         masked):
    """The layer's side of `streams.TURN`: the read that brings a masked channel's end (the
    finish event and `[DONE]`) yields the wait hook before the end's event leaves, even with the
    held text's analysis done, so the end's work runs in the hook's turn on the loop (not back to
    back with every other stream's end arriving in the same pass); after the hook the end
    leaves, masked as the whole answer. An unmasked stream never pauses."""
    monkeypatch.setattr(streamwait, "_original", _mitmproxys)
    upstream_, path, request, events_of = API_STREAMS["chat"]
    text = "Write to maria.garcia@example.com today please."
    *deltas, finish, done = events_of("m", [text[:20], text[20:]])
    pool = ScheduledPool(analyse, "model", random.Random(0))
    it = protocols.parse_request(upstream_, flow_for(upstream_, path, request))
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream_, it), it, "dcn_t")
    rewriter.filters.append(StreamMasker(SETTINGS, pool) if masked else Passing())
    flow = tflow.tflow(resp=True)
    flow.response.stream = rewriter
    layer = _Layer(flow)
    sent, hooks = [], 0
    for event in [*(ResponseData(1, e.encode()) for e in deltas),
                  ResponseData(1, (finish + done).encode()), ResponseEndOfMessage(1)]:
        pool.tick()  # every analysis done before the next read: the end's is known
        steps = streamwait._state_stream_response_body(layer, event)
        for command in steps:
            if isinstance(command, streamwait.DouaneStreamWaitHook):
                hooks += 1
                assert b"[DONE]" not in b"".join(sent)  # the end waits for the hook
            elif isinstance(command, SendHttp):
                sent.append(command.event.data)
    body = b"".join(sent)
    assert hooks == (1 if masked else 0)
    assert streamed_text("chat", body) == (whole(analyse, text) if masked else text)
    assert body.endswith(b"data: [DONE]\n\n")
