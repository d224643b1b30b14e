"""The wrap of mitmproxy's stream layer (protocols.streamwait) starts only on the mitmproxy it was
written for: another version, or a changed function, refuses to start (masking would otherwise
stall the event loop again at every stream's end, or lose its wait); a masked end pauses on the
wait hook."""

from __future__ import annotations

import asyncio
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


def test_masked_arrivals_past_the_pass_share_wait_for_a_turn(monkeypatch, analyse):
    """Many masked streams' reads arriving in one pass of the loop (32 streams ending together):
    once the pass's share (`streamwait.BUDGET` of the loop's CPU) has gone to them, the next
    masked stream's data is not processed in that pass: its layer pauses on the wait hook first
    (a `LoopShare` turn), then processes it and sends what it would have. An unmasked stream, and
    the first masked arrival of the next pass, go on at once; without a loop, nothing pauses."""
    monkeypatch.setattr(streamwait, "_original", _mitmproxys)
    monkeypatch.setattr(streamwait, "BUDGET", 0.0)  # the pass's first arrival uses its share
    upstream_, path, request, events_of = API_STREAMS["chat"]
    text = "Write to maria.garcia@example.com today please."

    def layer(masked: bool) -> _Layer:
        it = protocols.parse_request(upstream_, flow_for(upstream_, path, request))
        rewriter = streams.StreamRewriter(protocols.stream_format(upstream_, it), it, "dcn_t")
        rewriter.filters.append(StreamMasker(SETTINGS, ScheduledPool(
            analyse, "model", random.Random(0))) if masked else Passing())
        flow = tflow.tflow(resp=True)
        flow.response.stream = rewriter
        return _Layer(flow)

    def arrive(layer: _Layer, data: str) -> tuple[bool, bytes]:
        """(whether it paused before its data was processed, what it sent)"""
        paused, sent, before = False, [], layer.flow.response.stream.received
        for command in streamwait._state_stream_response_body(layer, ResponseData(1, data.encode())):
            if isinstance(command, streamwait.DouaneStreamWaitHook):
                paused = paused or layer.flow.response.stream.received == before
            elif isinstance(command, SendHttp):
                sent.append(command.event.data)
        return paused, b"".join(sent)

    first = events_of("m", [text])[0]
    assert arrive(layer(True), first) == arrive(layer(True), first)  # no loop: none pauses

    async def scenario() -> None:
        asyncio.get_running_loop().call_soon(lambda: None)  # other callbacks share the pass
        layers = [layer(True), layer(False), layer(True), layer(True)]
        arrived = [arrive(each, first) for each in layers]
        assert [paused for paused, _ in arrived] == [False, False, True, True]
        assert arrived[2][1] == arrived[3][1] == arrived[0][1]  # the same, after its turn
        await asyncio.sleep(0)  # the next pass
        asyncio.get_running_loop().call_soon(lambda: None)
        assert [arrive(each, first)[0] for each in layers] == [False, False, True, True]

    asyncio.run(scenario())
