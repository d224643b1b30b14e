"""Every flow to a declared upstream is understood or refused: never passed through unseen.

Requests: size limit (413, checked on Content-Length before the body is read, then on the body),
Content-Encoding decoded before parsing (a body that cannot be decoded is refused), JSON only,
duplicate keys refused, WebSocket upgrades refused unless the upstream allows them. Responses: JSON
parsed into the interaction; SSE rewritten event by event (`douane.protocols.streams`), also when
it arrives whole (server replay): then the whole body goes through the same rewriter. The
interaction's `inspected` list says truthfully what was looked at.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http

from douane import protocols, untrusted
from douane.flowstate import Reason, state
from douane.protocols import streams
from douane.refusals import guarded, refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)


def _refuse_protocol(flow: http.HTTPFlow, error: protocols.ProtocolError) -> None:
    if error.interaction is not None and state(flow).interaction is None:
        state(flow).interaction = error.interaction
    refuse(flow, error.status, error.message, error.code,
           Reason(f"protocol.{error.code}", error.message))


class Inspect:
    def __init__(self, settings: Settings):
        self.settings = settings

    def running(self) -> None:
        # Recordings must hold streamed answers as delivered (mitmproxy keeps none by default).
        ctx.options.update(store_streamed_bodies=True)

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        if st.upstream is None:
            return
        headers = flow.request.headers
        if headers.get("upgrade", "").lower() == "websocket" and not st.upstream.allow_websocket:
            refuse(flow, 403, f"WebSocket connections to {st.upstream.name} are not allowed",
                   "websocket_refused", Reason("protocol.websocket", "WebSocket upgrade refused"))
            return
        limit = self.settings.config.body_size_limit
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > limit:
            refuse(flow, 413, f"the request body exceeds douane's limit of {limit} bytes",
                   "request_too_large", Reason("protocol.too_large", f"Content-Length {length}"))
            return
        # SSE answers must arrive uncompressed to be rewritten event by event.
        headers["accept-encoding"] = "identity"

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        if st.upstream is None:
            return
        raw = flow.request.raw_content
        if raw is None:  # streamed past the hooks: nothing was seen, so nothing may pass
            refuse(flow, 413, "the request body could not be inspected", "uninspectable_body",
                   Reason("protocol.uninspectable", "request body was streamed"))
            return
        limit = self.settings.config.body_size_limit
        if len(raw) > limit:
            refuse(flow, 413, f"the request body exceeds douane's limit of {limit} bytes",
                   "request_too_large", Reason("protocol.too_large", f"{len(raw)} bytes"))
            return
        try:
            st.interaction = protocols.parse_request(st.upstream, flow)
        except protocols.ProtocolError as e:
            _refuse_protocol(flow, e)
            return
        problem = untrusted.absurd_name(st.interaction)
        if problem:  # it would grow every record and log line that names it
            refuse(flow, 400, problem, "invalid_name", Reason("protocol.invalid_name", problem))
            return
        st.interaction.inspected.append("request")

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if st.interaction is None or st.upstream is None or not flow.response:
            return
        ctype = flow.response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/event-stream":
            return
        try:
            fmt = protocols.stream_format(st.upstream, st.interaction)
        except protocols.ProtocolError as e:
            _refuse_protocol(flow, e)
            return
        rewriter = streams.StreamRewriter(fmt, st.interaction, st.decision_id)
        encoding = flow.response.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            rewriter.abort(f"the upstream compressed its stream ({encoding}); douane cannot "
                           "inspect it")
        streams.attach(flow, rewriter)

    @guarded
    async def response(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if (st.interaction is None or st.upstream is None or not flow.response
                or (st.decision and st.decision.action in ("refuse", "block", "error"))):
            return
        rewriter = streams.rewriter_of(flow)
        if rewriter is not None:
            if not rewriter.finished:  # an SSE body that arrived whole (server replay)
                await asyncio.to_thread(streams.rewrite_whole, flow)
            return
        try:
            protocols.parse_response(st.upstream, flow, st.interaction)
        except protocols.ProtocolError as e:
            # The upstream answered something douane cannot inspect: it does not reach the client.
            _refuse_protocol(flow, protocols.ProtocolError(502, e.code, f"upstream answer "
                                                           f"refused: {e.message}"))
            return
        st.interaction.inspected.append("response")
