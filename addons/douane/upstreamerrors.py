"""An upstream that failed before its answer's head reached the client, answered in the API's shape.

mitmproxy 12.2 answers a connection refused, a name not resolved, a TLS handshake failed, or an
upstream that closed (or sent something unreadable) before its answer's head, with its own HTML
`502 Bad Gateway` (`server: mitmproxy`, the error's raw text), sent by the client connection's
layer after the `error` hook: no hook can replace it. `HttpStream.handle_protocol_error` is
wrapped: such a failure is decided (`upstream.unreachable`, or `upstream.timeout` with a 504) and
answered with a refusal in the upstream's shape naming its decision id, before the `error` hook
runs, so the audit trail records it. An answer whose head the client already has (a stream cut by
its upstream) is left to mitmproxy: the client's connection is closed mid-body, as before.
The wrap is checked against mitmproxy's version and source at start, like `protocols.http1`.
"""

from __future__ import annotations

import logging

from mitmproxy import exceptions, http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)

from douane.flowstate import Reason, state
from douane.protocols import http1, mitmpatch
from douane.refusals import make_response
from douane.untrusted import loggable

logger = logging.getLogger(__name__)

ERROR_CHARS = 200  # of the upstream's error kept in the audit record
# sha256 of the source of the function wrapped
EXPECTED = {
    "handle_protocol_error": "59fc3b2eeeabf63a64d4cce98b4fe4cab5193ebefbd9c32ae186e65c7d25bfe2",
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


def _answer(flow: http.HTTPFlow, message: str) -> http.Response:
    """Decide the failure and put its refusal in `flow.response`."""
    st = state(flow)
    status, rule, kind = failure(message)
    name = st.upstream.name if st.upstream else "the upstream"
    st.decide("error", Reason(rule, loggable(message, ERROR_CHARS)), status=status)
    first = st.interaction.mcp[0] if st.interaction and st.interaction.mcp else None
    flow.response = make_response(
        st.upstream.protocol if st.upstream else "generic", status,
        f"douane could not get an answer from {loggable(name, 64)}: {kind}",
        code="upstream_timeout" if status == 504 else "upstream_unreachable",
        decision_id=st.decision_id, rpc_id=first.request_id if first else None)
    return flow.response


def handle_protocol_error(self: HttpStream, event) -> layer.CommandGenerator[None]:
    answer = None
    if isinstance(event, ResponseProtocolError) and self.flow.live and _before_head(self) and \
            event.code in (ErrorCode.CONNECT_FAILED, ErrorCode.GENERIC_SERVER_ERROR) and \
            not event.message.startswith(http1.UPSTREAM_OVERFLOW):
        # the error's text is the upstream's (its bytes, for an unreadable answer): bounded
        event = ResponseProtocolError(event.stream_id, loggable(event.message, ERROR_CHARS),
                                      event.code)
        try:
            answer = _answer(self.flow, event.message)
        except Exception:  # mitmproxy's own 502 still refuses: better than a dead connection
            logger.exception("douane: an upstream's failure could not be answered in its shape")
    steps = _handle_protocol_error(self, event)
    reply = None
    while True:
        try:
            command = steps.send(reply)
        except StopIteration:
            return
        if answer is not None and isinstance(command, SendHttp) and command.event is event:
            # mitmproxy's HTML error page, replaced by the refusal (its head, body and end)
            yield SendHttp(ResponseHeaders(self.stream_id, answer, False), command.connection)
            yield SendHttp(ResponseData(self.stream_id, answer.content or b""),
                           command.connection)
            yield SendHttp(ResponseEndOfMessage(self.stream_id), command.connection)
            reply = None
        else:
            reply = yield command


class UpstreamErrors:
    """Installs the wrap (once); refuses to start on a mitmproxy it was not written for."""

    def configure(self, updated: set[str]) -> None:
        try:
            install()
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None


def install() -> None:
    mitmpatch.check("an upstream's failure needs", "it answers it with its own HTML page",
                    {"handle_protocol_error": _handle_protocol_error}, EXPECTED)
    HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]
