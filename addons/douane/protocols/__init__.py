"""Wire formats: every flow to a declared upstream becomes one `Interaction`, or is refused.

Public API for the other stages:
- `declared(upstream, method, path, websocket)`: the endpoint douane parses `method path` as,
  None when no parser understands it (then only a grant naming the operation lets it pass).
- `parse_request(upstream, flow)` / `parse_response(upstream, flow, interaction)`: raise
  `ProtocolError` (status, code, message) when the body cannot be understood.
- `stream_format(upstream, interaction)`: the `StreamFormat` of an SSE response.
- `document(flow, side)`: the body's JSON, parsed once and shared by every step that reads it.
- `apply_text_edits(flow, side, pieces)`: write edited `TextPiece.text` back at their paths and
  re-serialise the body (Content-Encoding and Content-Length stay consistent).
- `write_json(flow, side, doc)`: replace a body by an edited document (e.g. a tools/list without the
  tools a caller may not see).
- `streams.rewriter_of(flow)`: the live SSE rewriter, to append a `streams.TextFilter` or abort.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from mitmproxy import http

from douane import forwarding, headerfields, operations
from douane.config import Upstream
from douane.flowstate import peek
from douane.interaction import Interaction, TextPiece
from douane.protocols import anthropic, decoding, fields, generic, jsonpath, mcp, openai
from douane.protocols.base import ProtocolError, StreamFormat
from douane.untrusted import quoted

logger = logging.getLogger(__name__)

__all__ = ["ProtocolError", "apply_text_edits", "declared", "document", "parse_request",
           "parse_response", "stream_format", "write_json"]

Side = Literal["request", "response"]
OPENAI_ENDPOINTS = ("chat/completions", "responses", "embeddings", "completions", "moderations")
ANTHROPIC_ENDPOINTS = ("messages/count_tokens", "messages")
WEBSOCKET = "websocket"
# The operations each protocol's parser reads, as patterns relative to the upstream's path prefix,
# with the endpoint the parser reads them as ("" for generic: the path itself). Everything else is
# refused before the credential is injected, unless a grant names it (douane.routing.Broker).
DECLARED: dict[str, tuple[tuple[operations.Operation, str], ...]] = {
    "openai": tuple((operations.parse(f"POST {base}/{e}"), e) for e in OPENAI_ENDPOINTS
                    for base in ("", "/v1", "/deployments/*")),  # Azure: url .../openai
    "anthropic": tuple((operations.parse(f"POST {base}/{e}"), e) for e in ANTHROPIC_ENDPOINTS
                       for base in ("", "/v1")),
    # Streamable HTTP: the upstream's URL is the MCP endpoint itself
    "mcp": tuple((operations.parse(f"{method} /"), "mcp") for method in ("POST", "GET", "DELETE")),
    "generic": ((operations.parse("POST /**"), ""),),
}
# The operations without a wildcard, by (method, path): the usual request is one lookup. (The
# first declared wins, as in the scan; no wildcard operation matches a literal one's path.)
_LITERAL: dict[str, dict[tuple[str, str], str]] = {
    protocol: {(op.method, op.path): endpoint for op, endpoint in reversed(ops)
               if "*" not in op.path}
    for protocol, ops in DECLARED.items()}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key given twice may be read differently upstream than here: refuse the ambiguity.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ProtocolError(400, "duplicate_json_key", f"the JSON key "
                            f"{quoted(fields.repeated(pairs))} appears twice")
    return doc


def _no_constants(name: str) -> Any:
    raise ProtocolError(400, "invalid_json", f"{name} is not valid JSON")


# One decoder for every body: `json.loads` with hooks builds a decoder and its scanner per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_SCAN = _DECODER.scan_once
_SPACE = " \t\n\r"  # JSON's whitespace


def _decode(text: str) -> Any:
    """`_DECODER.decode(text)` without its Python frames and regular expressions: the scanner
    (C) from the first non-space, and nothing but JSON's whitespace after the value."""
    try:
        doc, end = _SCAN(text, len(text) - len(text.lstrip(_SPACE)))
    except StopIteration:
        raise ValueError("no JSON value") from None
    if end != len(text) and text[end:].strip(_SPACE):
        raise ValueError("extra data after the JSON value")
    return doc


def loads(raw: bytes | str, what: str) -> Any:
    """JSON as douane reads it: a key given twice or a NaN is refused (400). (As `json.loads`
    reads it: bytes decoded by their detected encoding, a text starting with a BOM refused.)"""
    try:
        if not raw:
            return None
        if isinstance(raw, str):
            if raw.startswith("\ufeff"):
                raise ValueError("BOM")
            return _decode(raw)
        # (an object's opening brace then a non-zero byte: what `detect_encoding` reads as UTF-8)
        utf8 = raw[:1] == b"{" and raw[1:2] != b"\0"
        return _decode(raw.decode("utf-8" if utf8 else json.detect_encoding(raw),
                                  "surrogatepass"))
    except (ValueError, RecursionError):
        raise ProtocolError(400, "invalid_json", f"the {what} is not valid JSON") from None


def load_json(message: http.Message, what: str) -> Any:
    """The decoded body as JSON; a body that cannot be decoded or parsed is refused.

    The gateway decodes bodies before (`decoding.decode_body`, with the configured limits); a body
    still encoded here (a recording read back) is decoded with `decoding.OFFLINE_LIMIT`."""
    encoding = headerfields.get(message.headers, b"content-encoding", "identity")
    try:
        raw = decoding.decode(message.raw_content or b"", encoding, decoding.OFFLINE_LIMIT)
    except decoding.TooLarge:
        raise ProtocolError(413, "body_too_large", f"the decoded {what} body exceeds "
                            f"{decoding.OFFLINE_LIMIT} bytes") from None
    except ValueError:
        raise ProtocolError(415, "undecodable_body", f"the {what} body cannot be decoded "
                            f"(Content-Encoding {quoted(encoding)})") from None
    ctype, *params = headerfields.get(message.headers, b"content-type", "").split(";")
    ctype = ctype.strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ProtocolError(415, "unsupported_content_type",
                            f"douane inspects JSON {what}s only, not "
                            f"{quoted(ctype) if ctype else 'an untyped body'}")
    for param in params:
        # A server decoding by the declared charset reads other text than douane: UTF-7 spells
        # `n` as `+AG4-`, a Shift_JIS lead byte swallows the quote after it. UTF-8 only.
        name, _, value = param.partition("=")
        value = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and value not in ("utf-8", "utf8"):
            raise ProtocolError(415, "unsupported_charset", f"douane reads JSON {what}s in "
                                f"UTF-8 only, not charset {quoted(value)}")
    return loads(raw, f"{what} body")


def document(flow: http.HTTPFlow, side: Side) -> Any:
    """The body of one side as JSON (`load_json`), parsed once per body: on a live flow every step
    reads the same document while the body is unchanged (`FlowState.documents`). A step that
    edits the document writes it back (`write_json`, `apply_text_edits`), which keeps the edited
    document for the next."""
    message = _message(flow, side)
    st = peek(flow)
    if st is None or st.audited:  # a flow read back, or shown once decided: parsed, not kept
        return load_json(message, side)
    raw = message.raw_content
    cached = st.documents.get(side)
    if cached is not None and cached[0] is raw:
        return cached[1]
    doc = load_json(message, side)
    st.documents[side] = (raw, doc)
    return doc


def declared(upstream: Upstream, method: str, path: str, websocket: bool = False) -> str | None:
    """The endpoint douane's parser reads `method path` (a normalised path, no query) as, or None.
    A WebSocket upgrade is declared on an upstream that allows WebSockets (every message is then
    policed by `douane.websocket`)."""
    if websocket:
        return WEBSOCKET if upstream.allow_websocket and method == "GET" else None
    rest = upstream.relative(path)
    if rest is None:
        return None
    literal = _LITERAL[upstream.protocol].get((method, rest))
    if literal is not None:
        return literal or path
    return next(((endpoint or path) for op, endpoint in DECLARED[upstream.protocol]
                 if op.matches(method, rest)), None)


def is_websocket(req: http.Request) -> bool:
    return headerfields.get(req.headers, b"upgrade", "").lower() == "websocket"


def parse_request(upstream: Upstream, flow: http.HTTPFlow, granted: bool = False) -> Interaction:
    """`granted`: a grant names this operation, so one douane does not parse may pass (its JSON
    body, if any, is inspected string by string)."""
    it = _parse_request(upstream, flow, granted)
    header = forwarding.BETA_HEADER.get(upstream.protocol)
    if header:  # the beta features asked for, granted or not by policy
        it.betas = forwarding.betas(flow.request.headers, header) or ()
    return it


def _parse_request(upstream: Upstream, flow: http.HTTPFlow, granted: bool) -> Interaction:
    req = flow.request
    path = req.path.split("?")[0]
    endpoint = declared(upstream, req.method, path, is_websocket(req))
    if endpoint is None:
        if not granted:
            raise ProtocolError(403, "endpoint_not_governed", f"douane does not govern "
                                f"{req.method} {path[:200]} and no grant names it")
        it = Interaction(upstream.protocol, f"{req.method} {path}", granted=True)
        if req.raw_content:
            fields.cover(it, document(flow, "request"), lambda p: ("prompt", "user"), reads=0)
        return it
    if endpoint == WEBSOCKET or (upstream.protocol == "mcp" and req.method != "POST"):
        if req.raw_content:
            raise ProtocolError(400, "unexpected_body", f"a {req.method} request has no body")
        if endpoint == WEBSOCKET:  # the Realtime API names its model in the query
            model = req.query.get("model")
            return Interaction(upstream.protocol, f"GET {path}", model=model or None)
        it = Interaction("mcp", f"mcp:{req.method.lower()}")
        mcp.check_headers(None, [(k, v) for k, v in _header_list(req)
                                 if k != "mcp-protocol-version"], it)
        return it
    if upstream.protocol == "mcp":
        doc = document(flow, "request")
        it = mcp.parse_request(doc, headerfields.get(req.headers, b"mcp-session-id"))
        mcp.check_headers(doc, _header_list(req), it)
        return it
    doc = document(flow, "request")
    if upstream.protocol == "openai":
        it = openai.parse_request(doc, endpoint)
        rest = upstream.relative(path) or ""
        if rest.startswith("/deployments/"):
            # Azure serves the deployment the path names and ignores the body's model
            it.model = rest.split("/")[2]
        return it
    if upstream.protocol == "anthropic":
        return anthropic.parse_request(doc, endpoint)
    return generic.parse_request(doc, upstream, endpoint)


def _header_list(req: http.Request) -> list[tuple[str, str]]:
    """Every header field, its name in lower case: `req.headers.items(multi=True)`, decoded as
    mitmproxy decodes it, without its per-field calls."""
    return [(k.decode("utf-8", "surrogateescape").lower(), v.decode("utf-8", "surrogateescape"))
            for k, v in req.headers.fields]


def parse_response(upstream: Upstream, flow: http.HTTPFlow, it: Interaction) -> bool:
    """Read the answer into the interaction; False when it was not inspected: the non-JSON answer
    of a granted operation (a file download) is delivered as is."""
    assert flow.response
    if not flow.response.raw_content:
        return True
    if it.granted:
        ctype = flow.response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return False
        fields.cover(it, document(flow, "response"),
                     lambda p: ("completion", "assistant"), "response", 0)
        return True
    doc = document(flow, "response")
    if flow.response.status_code >= 400:
        return True  # an upstream error document carries no model text
    try:
        if upstream.protocol == "openai":
            openai.parse_response(doc, it)
        elif upstream.protocol == "anthropic":
            anthropic.parse_response(doc, it)
        elif upstream.protocol == "mcp":
            mcp.parse_response(doc, it)
        else:
            generic.parse_response(doc, upstream, it)
    except (TypeError, AttributeError) as e:
        # the parsers read an answer's documented shape: a field of another JSON type (a number
        # where a list of choices belongs) is the upstream's error, answered as one, not douane's
        logger.debug("douane: an answer of an unexpected shape", exc_info=e)
        raise ProtocolError(502, "invalid_upstream_response", "a field of the upstream answer "
                            "has a type its API does not give it", it) from None
    return True


def stream_format(upstream: Upstream, it: Interaction) -> StreamFormat:
    if upstream.protocol == "mcp":
        return mcp.McpStream(it)
    if upstream.protocol == "anthropic":
        return anthropic.MessagesStream()
    if upstream.protocol == "openai" and it.operation == "chat.completions":
        return openai.ChatStream()
    if upstream.protocol == "openai" and it.operation == "responses":
        return openai.ResponsesStream()
    raise ProtocolError(502, "unsupported_stream",
                        f"douane cannot inspect a stream from {upstream.name} {it.operation}")


def _message(flow: http.HTTPFlow, side: Side) -> http.Message:
    message = flow.request if side == "request" else flow.response
    assert message is not None
    return message


def apply_text_edits(flow: http.HTTPFlow, side: Side, pieces: list[TextPiece]) -> None:
    doc = document(flow, side)
    for piece in pieces:
        jsonpath.set_(doc, piece.path, piece.text)
    write_json(flow, side, doc)


def write_json(flow: http.HTTPFlow, side: Side, doc: Any) -> None:
    message = _message(flow, side)
    message.content = json.dumps(doc, ensure_ascii=False).encode()
    st = peek(flow)
    if st is not None:
        st.documents[side] = (message.raw_content, doc)
