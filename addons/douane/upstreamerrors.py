"""An upstream that failed before its answer's head reached the client, answered in the API's shape.

mitmproxy 12.2 answers a connection refused, a name not resolved, a TLS handshake failed, or an
upstream that closed (or sent something unreadable) before its answer's head, with its own HTML
`502 Bad Gateway` (`server: mitmproxy`, the error's raw text), sent by the client connection's
layer after the `error` hook: no hook can replace it. `HttpStream.handle_protocol_error` is
wrapped: such a failure is decided (`upstream.unreachable`, or `upstream.timeout` with a 504) and
answered with a refusal in the upstream's shape naming its decision id, before the `error` hook
runs, so the audit trail records it. A stream douane rewrites whose upstream failed after its head
reached the client (it closed, reset, or missed an answer deadline: `douane.timeouts`) ends with
the API's own error event naming the decision id (`upstream.cut`, `upstream.timeout`), its end
sent properly; any other answer cut after its head is left to mitmproxy (the client's connection
closed mid-body).
mitmproxy answers a body past its own `body_size_limit` (which douane sets from its limits) with
its own HTML 413 (a request) or 502 (an answer), after the `error` hook: `HttpStream.
check_body_size` is wrapped the same way, the page replaced by the refusal in the API's shape
under the decision `Inspect.error` took (`protocol.too_large`).
Both wraps see how every failed flow failed before its `error` hook runs: `ending` names it for the
audit record (the client left or reset its stream, the upstream failed, timed out or reset its
stream, a body too large, the flow killed), where mitmproxy's error text alone is free prose.
The wraps are checked against mitmproxy's version and source at start, like `protocols.http1`.
"""

from __future__ import annotations

import logging
import weakref

from mitmproxy import exceptions, http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpErrorHook,
    HttpStream,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)

from douane import headerfields
from douane.flowstate import Reason, peek, state
from douane.protocols import http1, mitmpatch, streams
from douane.refusals import make_response
from douane.untrusted import loggable

logger = logging.getLogger(__name__)

ERROR_CHARS = 200  # of the upstream's error kept in the audit record
# sha256 of the source of the function wrapped
EXPECTED = {
    "handle_protocol_error": "59fc3b2eeeabf63a64d4cce98b4fe4cab5193ebefbd9c32ae186e65c7d25bfe2",
    "check_body_size": "236ca0a7b9fd4f69a1f75cf6026a5f9c827270f79a90335673e4721afd731a4a",
    "check_invalid": "ef0a126eef45d90335636512729510fffcf67f01e1f0121523f1659ea818824c",
}
# (what the error's text says, in lower case) -> what the client is told
_KINDS = (("timed out", "timed out"), ("timeout", "timed out"),
          ("name or service not known", "its name could not be resolved"),
          ("nodename nor servname", "its name could not be resolved"),
          ("name resolution", "its name could not be resolved"),
          ("refused", "the connection was refused"), ("errno 111", "the connection was refused"),
          ("connect call failed", "the connection could not be made"),
          ("tls", "the TLS handshake failed"),
          ("ssl", "the TLS handshake failed"), ("certificate", "the TLS handshake failed"),
          ("closed", "it closed the connection before answering"),
          ("reset", "it closed the connection before answering"),
          ("unexpected server response", "its answer could not be read"),
          ("cannot parse http response", "its answer could not be read"))

_handle_protocol_error = HttpStream.handle_protocol_error
_check_body_size = HttpStream.check_body_size
_check_invalid = HttpStream.check_invalid
# flows whose answer's deadline passed (`douane.timeouts`) -> what the client is told
_timed_out: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
# failed flows -> how they ended (`ending`)
_endings: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
_SERVER_ENDINGS = {ErrorCode.CONNECT_FAILED: "upstream_unreachable",
                   ErrorCode.CANCEL: "upstream_reset", ErrorCode.RESPONSE_TOO_LARGE: "too_large",
                   ErrorCode.KILL: "killed"}
_CLIENT_ENDINGS = {ErrorCode.CLIENT_DISCONNECTED: "client_left", ErrorCode.CANCEL: "client_reset",
                   ErrorCode.REQUEST_TOO_LARGE: "too_large", ErrorCode.KILL: "killed"}


def unframed(flow: http.HTTPFlow) -> str | None:
    """Why an HTTP/1 answer framed by its connection's close (no length, no chunks) is refused,
    unless douane reads its end: a close cutting it reads as its end, so a download cut mid-body
    would be delivered whole-looking. JSON is parsed whole (a cut one is unreadable) and an event
    stream's API ends it with its own event: those pass. The APIs douane knows frame every answer."""
    resp = flow.response
    if resp is None or not resp.http_version.startswith("HTTP/1") or resp.status_code < 200 or \
            resp.status_code in (204, 304) or flow.request.method == "HEAD" or \
            headerfields.present(resp.headers, (b"content-length", b"transfer-encoding")):
        return None
    ctype = (headerfields.get(resp.headers, b"content-type", "") or "").split(";")[0].strip().lower()
    if ctype in ("application/json", "text/event-stream") or ctype.endswith("+json"):
        return None
    return "the upstream's answer has no length (framed by its connection's close): a cut " \
        "could not be told from its end"


def ended_as(flow: http.HTTPFlow, how: str) -> None:
    """How the flow is about to end, known before mitmproxy says it (douane closes it)."""
    _endings[flow] = how


def ending(flow: http.HTTPFlow) -> str:
    """How a failed flow ended: client_left, client_reset, client_error, client_timeout,
    upstream_unreachable, upstream_failed, upstream_timeout, upstream_reset, too_large, killed,
    or error."""
    if flow in _timed_out:
        return "upstream_timeout"
    if flow in _endings:
        return _endings[flow]
    return "killed" if flow.error and flow.error.msg == flow.error.KILLED_MESSAGE else "error"


def _ended(flow: http.HTTPFlow, event: RequestProtocolError | ResponseProtocolError) -> None:
    if isinstance(event, ResponseProtocolError):
        _endings[flow] = _SERVER_ENDINGS.get(event.code, "upstream_failed")
    elif event.code in _CLIENT_ENDINGS:
        _endings[flow] = _CLIENT_ENDINGS[event.code]
    else:  # (HTTP/2 calls a reset with another code, or a connection closed under its streams,
        # a client error: its text says which)
        said = event.message.lower()
        _endings[flow] = "client_reset" if "reset" in said else \
            "client_left" if "closed" in said else "client_error"


def timed_out(flow: http.HTTPFlow, message: str) -> None:
    """The flow's answer missed its deadline: its failure, whatever mitmproxy calls it (a closed
    connection, a cancelled connect), is a timeout."""
    _timed_out[flow] = message


def failure(message: str) -> tuple[int, str, str]:
    """(status, rule, what the client is told) for an upstream's error text `message`."""
    low = message.lower()
    kind = next((told for said, told in _KINDS if said in low), "it failed")
    if kind == "timed out":
        return 504, "upstream.timeout", kind
    return 502, "upstream.unreachable", kind


def _before_head(stream: HttpStream) -> bool:
    """Whether the client has no answer's head yet (none came, or it is held until its end)."""
    return getattr(stream.server_state, "__func__", None) in (
        HttpStream.state_uninitialized, HttpStream.state_wait_for_response_headers,
        HttpStream.state_consume_response_body)


def _decided(flow: http.HTTPFlow, message: str, rule: str | None = None
             ) -> tuple[int, str, str]:
    """Decide the upstream's failure: (status, rule, what the client is told)."""
    status, found, kind = failure(message)
    if flow in _timed_out:
        message = kind = _timed_out[flow]
        status, found = 504, "upstream.timeout"
    rule = found if rule is None or found == "upstream.timeout" else rule
    state(flow).decide("error", Reason(rule, loggable(message, ERROR_CHARS)), status=status)
    return status, rule, kind


def _answer(flow: http.HTTPFlow, message: str) -> http.Response:
    """Decide the failure and put its refusal in `flow.response`."""
    st = state(flow)
    status, _, kind = _decided(flow, message)
    name = st.upstream.name if st.upstream else "the upstream"
    flow.response = _refusal(
        flow, status, f"douane could not get an answer from {loggable(name, 64)}: {kind}",
        "upstream_timeout" if status == 504 else "upstream_unreachable")
    return flow.response


def _refusal(flow: http.HTTPFlow, status: int, message: str, code: str) -> http.Response:
    """A refusal in the flow's upstream's shape, naming its decision id (and JSON-RPC id)."""
    st = state(flow)
    first = st.interaction.mcp[0] if st.interaction and st.interaction.mcp else None
    return make_response(st.upstream.protocol if st.upstream else "generic", status, message,
                         code=code, decision_id=st.decision_id,
                         rpc_id=first.request_id if first else None)


def _stream_cut(stream: HttpStream, message: str) -> bytes | None:
    """A rewritten stream whose upstream failed after its head left: the API's error event that
    ends it (None: not a stream douane rewrites)."""
    rewriter = streams.rewriter_of(stream.flow)  # (under the originals' tee, if any)
    if rewriter is None or getattr(
            stream.server_state, "__func__", None) is not HttpStream.state_stream_response_body:
        return None
    if rewriter.ended:  # douane ended it already (a block, a limit): that decision stands
        return b""
    status, _, kind = _decided(stream.flow, message, "upstream.cut")
    rewriter.abort(f"the upstream's answer was cut: {kind}", status)
    return rewriter.resume()


def handle_protocol_error(self: HttpStream, event) -> layer.CommandGenerator[None]:
    answer: http.Response | None = None
    ending: bytes | None = None
    if self.flow not in _endings:  # the first failure is how it ended
        _ended(self.flow, event)
    if isinstance(event, ResponseProtocolError) and self.flow.live and \
            event.code in (ErrorCode.CONNECT_FAILED, ErrorCode.GENERIC_SERVER_ERROR) and \
            not event.message.startswith(http1.UPSTREAM_OVERFLOW):
        # the error's text is the upstream's (its bytes, for an unreadable answer): bounded
        event = ResponseProtocolError(event.stream_id, loggable(event.message, ERROR_CHARS),
                                      event.code)
        try:
            if _before_head(self):
                answer = _answer(self.flow, event.message)
            else:
                ending = _stream_cut(self, event.message)
                if ending is None and self.flow in _timed_out:  # its connection cut mid-body
                    _decided(self.flow, event.message)
        except Exception:  # mitmproxy's own 502 still refuses: better than a dead connection
            logger.exception("douane: an upstream's failure could not be answered in its shape")
    yield from _replacing(_handle_protocol_error(self, event), self, event, answer, ending)


def check_body_size(self: HttpStream, request: bool) -> layer.CommandGenerator[bool]:
    steps = _check_body_size(self, request)
    reply = None
    while True:
        try:
            command = steps.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(command, HttpErrorHook):
            _endings[self.flow] = "too_large"
        if isinstance(command, SendHttp) and isinstance(command.event, ResponseProtocolError) \
                and command.event.code in (ErrorCode.REQUEST_TOO_LARGE,
                                           ErrorCode.RESPONSE_TOO_LARGE):
            # after the `error` hook: `Inspect.error` decided it; answered in the API's shape
            answer = _too_large(self.flow, request)
            if answer is not None:
                yield from _sent(self, command, answer)
                if not request:  # (a request's: mitmproxy closes the connection after it)
                    reply = None
                    continue
        reply = yield command


def check_invalid(self: HttpStream, request: bool) -> layer.CommandGenerator[bool]:
    """A request mitmproxy read but refuses at its own checks (Content-Length beside
    Transfer-Encoding, an unknown scheme, a CONNECT in a tunnel) is decided as refused before
    its `error` hook, so its flow's record says so; the client connection's layer answers it in
    the API's shape naming that decision (`protocols.http1`, `protocols.http2`)."""
    steps = _check_invalid(self, request)
    reply = None
    while True:
        try:
            command = steps.send(reply)
        except StopIteration as stop:
            return stop.value
        if request and isinstance(command, HttpErrorHook) and self.flow.error:
            st = state(self.flow)
            rule, _, message = http1.invalid_reason(self.flow.request, self.flow.error.msg)
            st.decide("refuse", Reason(rule, message), status=400)
            http1.decided_invalid(self.context.client, self.stream_id, st.decision_id)
        reply = yield command


def _too_large(flow: http.HTTPFlow, request: bool) -> http.Response | None:
    st = peek(flow)
    if st is None or st.decision is None or st.decision.status is None:
        return None  # not a flow douane decided: mitmproxy's page
    limit = "request" if request else "answer"
    response = _refusal(flow, st.decision.status, f"the {limit} exceeds douane's size limit",
                        f"{limit}_too_large")
    if request:  # the rest of its body is not read
        response.headers["connection"] = "close"
    return response


def _replacing(steps, stream: HttpStream, event, answer: http.Response | None,
               ending: bytes | None) -> layer.CommandGenerator[None]:
    """mitmproxy's handling of `event`, with what it sends the client about it replaced: by
    `answer` (its HTML error page), or by the stream's `ending` and end (a cut connection)."""
    reply = None
    while True:
        try:
            command = steps.send(reply)
        except StopIteration:
            return
        if isinstance(command, SendHttp) and command.event is event and answer is not None:
            yield from _sent(stream, command, answer)
            reply = None
        elif isinstance(command, SendHttp) and command.event is event and ending is not None:
            if ending:
                yield SendHttp(ResponseData(stream.stream_id, ending), command.connection)
            yield SendHttp(ResponseEndOfMessage(stream.stream_id), command.connection)
            reply = None
        else:
            reply = yield command


def _sent(stream: HttpStream, command: SendHttp, answer: http.Response
          ) -> layer.CommandGenerator[None]:
    """The refusal instead of mitmproxy's HTML error page: its head, body and end."""
    yield SendHttp(ResponseHeaders(stream.stream_id, answer, False), command.connection)
    yield SendHttp(ResponseData(stream.stream_id, answer.content or b""), command.connection)
    yield SendHttp(ResponseEndOfMessage(stream.stream_id), command.connection)


class UpstreamErrors:
    """Installs the wrap (once); refuses to start on a mitmproxy it was not written for."""

    def configure(self, updated: set[str]) -> None:
        try:
            install()
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None


def install() -> None:
    mitmpatch.check("an upstream's failure needs", "it answers it with its own HTML page",
                    {"handle_protocol_error": _handle_protocol_error,
                     "check_body_size": _check_body_size, "check_invalid": _check_invalid},
                    EXPECTED)
    HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]
    HttpStream.check_body_size = check_body_size  # type: ignore[method-assign]
    HttpStream.check_invalid = check_invalid  # type: ignore[method-assign]
