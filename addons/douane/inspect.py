"""Every flow to a declared upstream is understood or refused: never passed through unseen.

Requests: size limit (413, checked on Content-Length before the body is read, then on the body;
mitmproxy's own `body_size_limit` stops a chunked body at the limit while it arrives),
Content-Encoding decoded before parsing with the limit on the *decoded* size (a body that cannot
be decoded is refused), JSON only, duplicate keys refused, at most `max_text_pieces` texts
(WebSocket upgrades and operations no parser reads were refused before, by
`douane.routing.Broker`). Responses: the same for answers
(`answer_size_limit`, refused with 502); SSE rewritten event by event (`douane.protocols.streams`)
up to `stream_size_limit` bytes, also when it arrives whole (server replay): then the whole body
goes through the same rewriter. A rewritten stream loses the upstream's Content-Length and
Content-Encoding (its bytes change). Large bodies are decoded and parsed off the event loop. The
interaction's `inspected` list says truthfully what was looked at.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, exceptions, http

from douane import headerfields, protocols, untrusted
from douane.config import Config
from douane.flowstate import FlowState, Reason, state
from douane.interaction import Interaction
from douane.protocols import decoding, http1, http2, streams
from douane.refusals import refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)
# Bodies over this size (or encoded) are decoded and parsed in a thread: the loop serves others.
OFF_LOOP_BYTES = 256 * 1024
# ... and bodies of more quotes than this (a count at C speed): the parse and walk cost ~1 us a
# quote whatever the strings' lengths (4,000 one-character messages, 136 KB, 32,000 quotes:
# ~30 ms on the loop), so at most ~8 ms here, as the policy's bound (`OFF_LOOP_CHARS`).
OFF_LOOP_QUOTES = 8192
# ... and of more commas than this: values that are no strings (`[{}, {}, ...]`, numbers) have
# no quotes, yet cost the parse and walk as much each (an empty object's duplicate-key check
# ~1.4 us): 250 KB of them held the loop 60-430 ms.
OFF_LOOP_COMMAS = 4096


def _refuse_protocol(flow: http.HTTPFlow, error: protocols.ProtocolError) -> None:
    if error.interaction is not None and state(flow).interaction is None:
        state(flow).interaction = error.interaction
    refuse(flow, error.status, error.message, error.code,
           Reason(f"protocol.{error.code}", error.message))


def _decoded(message: http.Message, limit: int, what: str, status: int) -> None:
    try:
        decoding.decode_body(message, limit)
    except decoding.TooLarge:
        raise protocols.ProtocolError(status, f"{what}_too_large", f"the decoded {what} body "
                                      f"exceeds douane's limit of {limit} bytes") from None
    except ValueError:
        encoding = message.headers.get("content-encoding", "")[:40]
        raise protocols.ProtocolError(415, "undecodable_body", f"the {what} body cannot be "
                                      f"decoded (Content-Encoding {encoding!r})") from None


def read_request(config: Config, st: FlowState, flow: http.HTTPFlow) -> Interaction:
    """The request decoded (bounded) and parsed; blocking for large bodies."""
    assert flow.request.raw_content is not None and st.upstream
    _decoded(flow.request, config.body_size_limit, "request", 413)
    it = protocols.parse_request(st.upstream, flow, st.granted_operation)
    if len(it.texts) > config.limits.max_text_pieces:
        raise protocols.ProtocolError(
            413, "too_many_texts", f"the request holds {len(it.texts)} texts; douane inspects at "
            f"most {config.limits.max_text_pieces} per request", it)
    return it


def read_response(config: Config, st: FlowState, flow: http.HTTPFlow) -> bool:
    """The answer decoded (bounded) and parsed into the interaction; blocking for large bodies.
    False when it was not inspected (`protocols.parse_response`)."""
    assert flow.response and st.upstream and st.interaction
    _decoded(flow.response, config.limits.answer_size_limit, "answer", 502)
    return protocols.parse_response(st.upstream, flow, st.interaction)


def heavy(message: http.Message) -> bool:
    encoding = headerfields.get(message.headers, b"content-encoding", "identity").strip().lower()
    return encoding not in ("", "identity") or many(message.raw_content or b"")


def many(raw: bytes) -> bool:
    """Whether JSON text is long, or holds many values, enough to be parsed off the loop."""
    return len(raw) > OFF_LOOP_BYTES or raw.count(b'"') > OFF_LOOP_QUOTES or \
        raw.count(b",") > OFF_LOOP_COMMAS


def _stream_refused(st: FlowState, message: str) -> None:
    """A stream ended with douane's error event is audited as a refusal, whatever the 200 said."""
    if st.decision and st.decision.action in ("block", "refuse", "error"):
        st.decision.status = st.decision.status or (403 if st.decision.action == "block" else 502)
    else:
        st.decide("refuse", Reason("protocol.stream_ended", message[:200]), status=502)


class Inspect:
    def __init__(self, settings: Settings):
        self.settings = settings

    def configure(self, updated: set[str]) -> None:
        try:
            http1.install()
            http2.install()
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        # mitmproxy counts a chunked body as it arrives and cuts it at its own limit (else it
        # buffers it whole): set from douane's limits, and put back if changed.
        config = self.settings.config
        wire = str(max(config.body_size_limit, config.limits.answer_size_limit))
        if ctx.options.body_size_limit != wire:
            ctx.options.update(body_size_limit=wire)

    def running(self) -> None:
        # Recordings must hold streamed answers as delivered (mitmproxy keeps none by default).
        ctx.options.update(store_streamed_bodies=True)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        if st.upstream is None:
            return
        headers = flow.request.headers
        limit = self.settings.config.body_size_limit
        length = headerfields.get(headers, b"content-length", "0")
        if not length.isdigit() or int(length) > limit:
            refuse(flow, 413, f"the request body exceeds douane's limit of {limit} bytes",
                   "request_too_large", Reason("protocol.too_large", f"Content-Length {length}"))
            return
        # SSE answers must arrive uncompressed to be rewritten event by event.
        if headerfields.get(headers, b"accept-encoding") != "identity":
            headerfields.put(headers, "accept-encoding", "identity")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        if st.upstream is None:
            return
        if flow.request.trailers:  # header fields after the body: no parser reads them
            refuse(flow, 400, "douane refuses requests with trailer fields", "request_trailers",
                   Reason("protocol.trailers", f"{len(flow.request.trailers)} trailer fields"))
            return
        raw = flow.request.raw_content
        if raw is None:  # streamed past the hooks: nothing was seen, so nothing may pass
            refuse(flow, 413, "the request body could not be inspected", "uninspectable_body",
                   Reason("protocol.uninspectable", "request body was streamed"))
            return
        config = self.settings.config
        if len(raw) > config.body_size_limit:
            refuse(flow, 413, f"the request body exceeds douane's limit of "
                   f"{config.body_size_limit} bytes", "request_too_large",
                   Reason("protocol.too_large", f"{len(raw)} bytes"))
            return
        try:
            if heavy(flow.request):
                st.interaction = await asyncio.to_thread(read_request, config, st, flow)
            else:
                st.interaction = read_request(config, st, flow)
        except protocols.ProtocolError as e:
            _refuse_protocol(flow, e)
            return
        problem = untrusted.absurd_name(st.interaction)
        if problem:  # it would grow every record and log line that names it
            refuse(flow, 400, problem, "invalid_name", Reason("protocol.invalid_name", problem))
            return
        st.interaction.inspected.append("request")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if http1.cut_short(flow.response):  # the upstream's head never ended (`protocols.http1`)
            _refuse_protocol(flow, protocols.ProtocolError(
                502, "answer_head_too_large", f"upstream answer refused: its head exceeds "
                f"douane's limit of {http1.MAX_BUFFERED} bytes"))
            return
        st = state(flow)
        if st.interaction is None or st.upstream is None or not flow.response:
            return
        ctype = headerfields.get(flow.response.headers, b"content-type", "")
        if ctype.split(";")[0].strip().lower() != "text/event-stream":
            return
        try:
            fmt = protocols.stream_format(st.upstream, st.interaction)
        except protocols.ProtocolError as e:
            _refuse_protocol(flow, e)
            return
        rewriter = streams.StreamRewriter(
            fmt, st.interaction, st.decision_id,
            max_bytes=self.settings.config.limits.stream_size_limit,
            on_abort=lambda message: _stream_refused(st, message))
        headers = flow.response.headers
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            rewriter.abort(f"the upstream compressed its stream ({encoding[:40]}); douane cannot "
                           "inspect it", 502)
        # Re-framed: the rewritten events are not the upstream's bytes (and an error event for a
        # compressed stream is sent plain).
        headers.pop("content-length", None)
        headers.pop("content-encoding", None)
        if flow.request.http_version == "HTTP/1.1":  # the client's connection
            headers["transfer-encoding"] = "chunked"
        streams.attach(flow, rewriter)

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow.response and flow.response.trailers:  # fields after the answer nobody reads
            flow.response.trailers = None
        st = state(flow)
        if (st.interaction is None or st.upstream is None or not flow.response
                or (st.decision and st.decision.action in ("refuse", "block", "error"))):
            return
        rewriter = streams.rewriter_of(flow)
        if rewriter is not None:
            if not rewriter.finished:  # an SSE body that arrived whole (server replay)
                await asyncio.to_thread(streams.rewrite_whole, flow)
            return
        config = self.settings.config
        size = len(flow.response.raw_content or b"")
        if size > config.limits.answer_size_limit:
            _refuse_protocol(flow, protocols.ProtocolError(
                502, "answer_too_large", f"upstream answer refused: {size} bytes exceed douane's "
                f"limit of {config.limits.answer_size_limit} bytes"))
            return
        try:
            if heavy(flow.response):
                inspected = await asyncio.to_thread(read_response, config, st, flow)
            else:
                inspected = read_response(config, st, flow)
        except protocols.ProtocolError as e:
            # The upstream answered something douane cannot inspect: it does not reach the client.
            _refuse_protocol(flow, protocols.ProtocolError(502, e.code, f"upstream answer "
                                                           f"refused: {e.message}"))
            return
        if inspected:
            st.interaction.inspected.append("response")

    def error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy cut a body at its `body_size_limit` (set from douane's limits), or douane's
        # reader an upstream's line that never ended, and answered the client itself: the audit
        # record says it was refused, and why.
        msg = flow.error.msg if flow.error else ""
        if ("body_size_limit" in msg or msg.startswith(http1.UPSTREAM_OVERFLOW)) and flow.live:
            status = 413 if msg.startswith("Request") else 502
            state(flow).decide("refuse", Reason("protocol.too_large", msg), status=status)
