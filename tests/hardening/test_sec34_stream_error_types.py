"""Security, stop 34: an Anthropic stream douane ends with the API's error event was typed
`permission_error` whatever ended it: an upstream's failure (the stream cut, broken, echoing the
org's key: 502) or douane's own (a filter failing: 500) read to the client as a refusal of its
permissions. The event now carries Anthropic's type for the refusal's status (`api_error` for
5xx, `overloaded_error` for 503), as a refusal's body does (`refusals`); a policy's refusal stays
`permission_error`."""

from __future__ import annotations

import json

import pytest

from douane import protocols
from douane.protocols import streams
from tests.test_protocols import Broken, events, flow_for, run_stream, stream_samples


def _last_error(out: bytes) -> dict:
    return json.loads(events(out)[-1][1])["error"]


@pytest.mark.parametrize(("status", "kind"), [
    (403, "permission_error"), (502, "api_error"), (500, "api_error"),
    (504, "api_error"), (503, "overloaded_error")])
def test_an_anthropic_stream_ended_by_douane_carries_the_status_type(status, kind):
    upstream, path, doc, data = stream_samples()["anthropic"]
    it = protocols.parse_request(upstream, flow_for(upstream, path, doc))
    rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "dcn_test")
    out = b"".join(rewriter(data[:len(data) // 2]))
    rewriter.abort("ended", status)
    out += rewriter(b"")
    assert _last_error(out)["type"] == kind, out


def test_a_broken_upstream_stream_and_a_failing_filter_are_no_permission_error():
    data = stream_samples()["anthropic"][3]
    out, _ = run_stream("anthropic", [b"event: content_block_delta\ndata: {\"type\": [\n\n"])
    assert _last_error(out)["type"] == "api_error", out
    out, _ = run_stream("anthropic", [data], [Broken()])
    assert _last_error(out)["type"] == "api_error", out
