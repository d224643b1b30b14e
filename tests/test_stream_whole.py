"""SSE answers that arrive whole (mitmproxy's server replay, a response set by a script) go through
the same stream rewriter as a live stream: the same body out, the same filters applied."""

from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy.test import tutils

from douane import protocols
from douane.protocols import streams
from tests.test_protocols import HoldAll, events, flow_for, run_stream, stream_samples


def whole(name: str, body: bytes, **headers: str):
    upstream, path, doc, _ = stream_samples()[name]
    flow = flow_for(upstream, path, doc)
    it = protocols.parse_request(upstream, flow)
    flow.response = tutils.tresp(content=b"")
    flow.response.headers.clear()
    flow.response.headers.update({"content-type": "text/event-stream", **headers})
    flow.response.raw_content = body
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "dcn_test")
    streams.attach(flow, rewriter)
    return flow, rewriter, it


@pytest.mark.parametrize("name", ["chat", "responses", "anthropic"])
def test_a_whole_body_is_rewritten_exactly_as_the_live_stream(name):
    data = stream_samples()[name][3]
    live, _ = run_stream(name, [data[i:i + 7] for i in range(0, len(data), 7)], [HoldAll()])
    flow, rewriter, it = whole(name, data)
    rewriter.filters.append(HoldAll())
    streams.rewrite_whole(flow)
    assert flow.response.content == live  # the filter applied, the client gets valid SSE
    assert b"john.sm" not in flow.response.content
    assert [p.text for p in it.response_texts] == ["Hello, <EMAIL> bye"]
    assert rewriter.finished and flow.response.stream is False


def test_a_compressed_whole_body_becomes_a_valid_compressed_error_event():
    data = stream_samples()["chat"][3]
    flow, rewriter, _ = whole("chat", gzip.compress(data), **{"content-encoding": "gzip"})
    rewriter.abort("the upstream compressed its stream (gzip); douane cannot inspect it")
    streams.rewrite_whole(flow)
    assert b"john" not in flow.response.content
    assert flow.response.headers["content-encoding"] == "gzip"  # and the body really is
    (_, payload), = events(gzip.decompress(flow.response.raw_content))
    assert "douane decision dcn_test" in json.loads(payload)["error"]["message"]


def test_an_empty_whole_body_still_ends_the_stream():
    flow, rewriter, it = whole("chat", b"")
    streams.rewrite_whole(flow)
    assert rewriter.finished and flow.response.content == b""
    assert it.response_texts == []
