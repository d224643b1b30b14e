"""The "douane" content view: an LLM or MCP message as a conversation in mitmweb, mitmproxy and
`mitmdump --flow-detail 3`, with douane's decision, reasons and risk at the top.

The request tab shows the turns sent (roles, tool calls with arguments, tool results, tools
offered); the response tab shows the answer, a streamed one reassembled from its events. Its
priority beats the JSON view for flows douane governed or whose API it recognises, so it is chosen
automatically; for anything else it steps aside.
"""

from __future__ import annotations

from mitmproxy import contentviews, http

from douane import transcript


class DouaneContentview(contentviews.Contentview):
    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        flow, message = metadata.flow, metadata.http_message
        if not isinstance(flow, http.HTTPFlow) or message is None:
            raise ValueError("not an HTTP message")
        meta = transcript.douane_summary(flow)
        upstream = transcript.upstream_of(flow)
        masked = meta.get("masked") or {}
        if message is flow.request:
            body = transcript.request_lines(flow, upstream, masked)
        else:
            body = transcript.response_lines(flow, upstream, masked)
        return "\n".join([*transcript.header(meta), "", *body])

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        flow = metadata.flow
        if not isinstance(flow, http.HTTPFlow) or metadata.http_message is None:
            return -1
        if transcript.douane_summary(flow) or transcript.upstream_of(flow):
            return 2  # above the JSON view (1)
        return -1
