"""A flow read as a conversation: douane's decision first, then roles and turns, tool calls with
their arguments, tool results, the answer (streams reassembled) and masked spans marked.

One renderer for every reader: the mitmproxy content view (mitmweb, mitmproxy, `mitmdump
--flow-detail 3`), `douane sessions show` and `douane sessions reveal`. It reads what the flow carries: douane's summary in
`flow.metadata["douane"]` (recordings, or live once published), the live state while a flow is still
in flight, or, for a capture douane never saw, the API guessed from the path or a JSON-RPC body.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from mitmproxy import http

from douane import protocols
from douane.config import Upstream
from douane.flowstate import peek, summary
from douane.interaction import Interaction, TextPiece, ToolCall
from douane.protocols import decoding, streams
from douane.protocols.sse import SseError, SseParser
from douane.untrusted import escape

OPENAI_PATHS = tuple("/" + e for e in protocols.OPENAI_ENDPOINTS)
ANTHROPIC_PATHS = ("/messages", "/messages/count_tokens")
LABELS = {"tool_result": "tool result", "resource": "resource", "tool_description": "tool listed"}
TextOrCall = TextPiece | ToolCall


def douane_summary(flow: http.HTTPFlow) -> dict[str, Any]:
    """What douane decided: the published summary, or the live state of a flow still in flight."""
    st = peek(flow)
    return flow.metadata.get("douane") or (summary(st) if st else {})


def upstream_of(flow: http.HTTPFlow) -> Upstream | None:
    """The upstream to parse the flow as; None when its API is unknown (or generic: its text
    paths live in the config, which a recording does not carry)."""
    st = peek(flow)
    if st and st.upstream:
        return st.upstream
    meta = flow.metadata.get("douane") or {}
    protocol = (meta.get("interaction") or {}).get("protocol") or _guess(flow)
    if protocol not in ("openai", "anthropic", "mcp"):
        return None
    req = flow.request
    upstream = Upstream(meta.get("upstream") or protocol, req.scheme, req.host, req.port, "/",
                        protocol, None)
    # A recording does not carry the upstream's path prefix: the shortest under which the path is
    # an operation the protocol's parser reads.
    path = req.path.split("?")[0]
    segments = path.split("/")
    prefixes = ("/".join(segments[:n]) or "/" for n in range(1, len(segments) + 1))
    return next((u for u in (dataclasses.replace(upstream, path_prefix=p) for p in prefixes)
                 if protocols.declared(u, req.method, path)), upstream)


def _guess(flow: http.HTTPFlow) -> str | None:
    path = flow.request.path.split("?")[0].rstrip("/")
    if path.endswith(ANTHROPIC_PATHS):
        return "anthropic"
    if path.endswith(OPENAI_PATHS):
        return "openai"
    if flow.request.method == "POST":
        try:
            doc = json.loads(decoding.content(flow.request) or b"null")
        except ValueError:
            return None
        first = doc[0] if isinstance(doc, list) and doc else doc
        if isinstance(first, dict) and first.get("jsonrpc") == "2.0":
            return "mcp"
    return None


def header(meta: dict[str, Any]) -> list[str]:
    """Decision, identity, what was asked, reasons and masked counts: the lines an operator reads
    first."""
    if not meta:
        return ["douane: no decision recorded for this flow"]
    decision = meta.get("decision") or {"action": "allow"}
    first = f"douane {decision['action'].upper()}"
    if decision.get("status"):
        first += f" ({decision['status']})"
    if decision.get("risk"):
        first += f", risk {decision['risk']:g}"
    lines = [f"{first}, decision {meta.get('decision_id', '?')}"]
    facts = []
    identity = meta.get("identity")
    if identity:
        groups = ", ".join(identity.get("groups") or []) or "no groups"
        facts.append(f"user {identity['user']} ({groups}) via {identity.get('source', '?')}")
    if meta.get("upstream"):
        facts.append(f"upstream {meta['upstream']}")
    it = meta.get("interaction") or {}
    if it:
        facts.append(" ".join(str(x) for x in (it.get("protocol"), it.get("operation")) if x))
        if it.get("model"):
            facts.append(f"model {it['model']}")
        if it.get("stream"):
            facts.append("streamed")
    if facts:
        lines.append("  " + " · ".join(facts))
    for reason in decision.get("reasons") or []:
        where = ", ".join(x for x in (reason.get("field"), f"score {reason['score']:g}"
                                      if reason.get("score") else None) if x)
        lines.append(f"  reason: {reason['rule']}: {reason['message']}"
                     + (f" [{where}]" if where else ""))
    if meta.get("masked"):
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(meta["masked"].items()))
        lines.append(f"  masked: {counts}")
    return [escape(line) for line in lines]  # one value, one line: none starts a line of its own


def _shown(lines: list[str]) -> list[str]:
    """Conversation lines for a terminal: control characters escaped but newlines and tabs, and
    a value's continuation lines indented, so no text the client or model sent starts a line."""
    return [escape(line, keep="\n\t").replace("\n", "\n    ") for line in lines]


def mark_masked(text: str, masked: dict[str, int]) -> str:
    """Masked spans made visible: `<EMAIL_ADDRESS>` / `<PERSON:1a2b3c4d>` (replace, hash) and runs
    of `*` (partial masks) become «EMAIL_ADDRESS», «PERSON:1a2b3c4d», «************1234». Only the
    entity types douane reports having masked in this flow are marked; redacted values leave
    nothing to mark (the header counts them)."""
    if not masked:
        return text
    names = "|".join(re.escape(t) for t in sorted(masked, key=len, reverse=True))
    return re.sub(rf"<((?:{names})(?::[0-9a-f]{{8}})?)>|(\*{{4,}}\w{{0,4}})",
                  lambda m: f"«{m.group(1) or m.group(2)}»", text)


def _after(path: tuple, call: tuple) -> bool:
    """Whether `path` comes after the tool call at `call` in the document (a later message or
    content block), or is inside it."""
    for a, b in zip(path, call, strict=False):
        if a != b:
            return isinstance(a, int) and isinstance(b, int) and a > b
    return len(path) >= len(call)


def _in_order(texts: list[TextPiece], calls: list[ToolCall]) -> list[TextOrCall]:
    """Text pieces and tool calls in conversation order (parsers list them in document order,
    each kind separately); a call's argument strings are shown as the call."""
    pending, out = list(calls), []
    for piece in texts:
        for call in [c for c in pending if _after(piece.path, c.path)]:
            out.append(call)
            pending.remove(call)
        if piece.kind not in ("tool_arguments", "tool_description") and piece.editable:
            out.append(piece)  # keys, ids and decoded copies (douane.protocols.fields) are not
    return out + pending


def _line(item: TextOrCall, masked: dict[str, int], streamed: bool = False) -> str:
    if isinstance(item, ToolCall):
        args = item.arguments if isinstance(item.arguments, str) else json.dumps(
            item.arguments, ensure_ascii=False)
        label, text = "tool call", f"{item.name}({args})"
    else:
        label, text = LABELS.get(item.kind) or item.role or item.kind, item.text
    label += ", streamed" if streamed else ""
    return f"[{label}] " + mark_masked(text, masked)


def request_lines(flow: http.HTTPFlow, upstream: Upstream | None,
                  masked: dict[str, int]) -> list[str]:
    return _shown(_request_lines(flow, upstream, masked))


def response_lines(flow: http.HTTPFlow, upstream: Upstream | None,
                   masked: dict[str, int]) -> list[str]:
    return _shown(_response_lines(flow, upstream, masked))


def _request_lines(flow: http.HTTPFlow, upstream: Upstream | None,
                   masked: dict[str, int]) -> list[str]:
    if upstream is None:
        return ["(douane cannot read this API's conversation)"]
    try:
        it = protocols.parse_request(upstream, flow, granted=True)  # a viewer, not a gate
    except protocols.ProtocolError as e:
        return [f"(request not readable as {upstream.protocol}: {e.message})"]
    lines = [_line(item, masked) for item in _in_order(it.texts, it.tool_calls)]
    if it.tools:
        lines.append("[tools offered] " + ", ".join(t.name for t in it.tools))
    if it.has_media:
        lines.append("[media] images, audio or files are attached")
    return lines


def _response_lines(flow: http.HTTPFlow, upstream: Upstream | None,
                    masked: dict[str, int]) -> list[str]:
    resp = flow.response
    if resp is None:
        return ["(no response)"]
    if upstream is None:
        return ["(douane cannot read this API's conversation)"]
    try:
        it = protocols.parse_request(upstream, flow, granted=True)  # a viewer, not a gate
    except protocols.ProtocolError:
        it = Interaction(upstream.protocol, "")  # e.g. a refused unknown MCP method
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        return _streamed(upstream, it, decoding.content(resp), masked)
    error = _error_message(resp)
    if error:
        return [f"[{'refused' if 'douane decision' in error else 'error'} {resp.status_code}] "
                + error]
    try:
        protocols.parse_response(upstream, flow, it)
    except protocols.ProtocolError as e:
        return [f"(response not readable as {upstream.protocol}: {e.message})"]
    lines = [_line(item, masked)
             for item in _in_order(it.response_texts, it.response_tool_calls)]
    if it.response_tools:
        lines.append("[tools listed] " + ", ".join(t.name for t in it.response_tools))
    return lines or [f"[response {resp.status_code}] (no text)"]


def _error_message(resp: http.Response) -> str | None:
    """The message of an error document (OpenAI, Anthropic, JSON-RPC), if the body is one."""
    try:
        doc = json.loads(decoding.content(resp) or b"null")
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return None


def _streamed(upstream: Upstream, it: Interaction, body: bytes,
              masked: dict[str, int]) -> list[str]:
    """An SSE answer as one turn per channel, reassembled from its deltas by the same stream
    parser the gateway used."""
    try:
        rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "view")
    except protocols.ProtocolError as e:
        return [f"(stream not readable: {e.message})"]
    rewriter(body)
    rewriter(b"")
    names = _stream_tool_names(body)
    lines = []
    for piece in it.response_texts:
        channel = str(piece.path[-1])
        if piece.kind == "tool_arguments" and channel in names:
            call = ToolCall(names[channel], piece.text, None, piece.path)
            lines.append(_line(call, masked, streamed=True))
        else:
            lines.append(_line(piece, masked, streamed=True))
    if rewriter.abort_message:
        lines.append(f"[stream ended] {rewriter.abort_message}")
    return lines or ["[stream] (no text)"]


def _stream_tool_names(body: bytes) -> dict[str, str]:
    """Tool names announced in a stream, by the channel their argument deltas use."""
    parser = SseParser()
    try:
        events = parser.feed(body) + parser.feed(b"")
    except SseError:
        return {}
    names = {}
    for event in events:
        try:
            doc = json.loads(event.data)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        for n, choice in enumerate(doc.get("choices") or []):  # OpenAI chat
            for m, call in enumerate((choice.get("delta") or {}).get("tool_calls") or []):
                name = (call.get("function") or {}).get("name")
                if name:
                    names[f"choice{choice.get('index', n)}.tool{call.get('index', m)}"] = name
        block, item = doc.get("content_block") or {}, doc.get("item") or {}
        if doc.get("type") == "content_block_start" and block.get("type") == "tool_use":
            names[f"block{doc.get('index')}"] = block.get("name")  # Anthropic
        if doc.get("type") == "response.output_item.added" and item.get("type") == "function_call":
            names[f"out{doc.get('output_index')}.args"] = item.get("name")  # OpenAI responses
    return names


def render(flow: http.HTTPFlow, upstream: Upstream | None = None, marked: bool = True) -> str:
    """The whole flow: decision, request turns, then the answer. `marked=False` for bodies that
    were never masked (an auditor's revealed original): nothing in them is a mask."""
    meta = douane_summary(flow)
    upstream = upstream or upstream_of(flow)
    masked = (meta.get("masked") or {}) if marked else {}
    return "\n".join([*header(meta), "", *request_lines(flow, upstream, masked),
                      *response_lines(flow, upstream, masked)])
