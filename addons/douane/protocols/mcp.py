"""MCP Streamable HTTP: JSON-RPC 2.0 over POST (single or batch), answered with JSON or an SSE
stream of JSON-RPC messages; GET opens a server-to-client SSE stream; DELETE ends a session.

Both eras of the transport are governed: the handshake era (`initialize`, `Mcp-Session-Id`, GET
streams; revisions 2025-03-26 to 2025-11-25) and the 2026-07-28 revision (`server/discover`, every
request stateless, its metadata mirrored in `Mcp-Method` / `Mcp-Name` / `Mcp-Param-*` headers, which
must match the body: `check_headers`). The legacy HTTP+SSE transport (a GET stream whose first
event is `endpoint`) is recognised and refused. Methods douane does not know are refused with a
JSON-RPC error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

from douane.interaction import Interaction, Kind, McpMessage, Role, TextPiece, ToolCall, ToolDef
from douane.protocols import fields, jsonpath
from douane.protocols.base import Delta, ProtocolError, StreamFormat
from douane.protocols.fields import KEYS
from douane.protocols.sse import Event

KNOWN_METHODS = {
    "initialize", "server/discover", "ping", "tools/list", "tools/call", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
    "subscriptions/listen",
}


# JSON-RPC ids as answers are paired by. Strings and integers only (MCP's RequestId): a float, a
# boolean or null could equal another id on one side and not on the other (Python's 1 == True,
# JavaScript's 2**53 == 2**53 + 1), so an answer could be policed as the wrong request.
ID_CHARS = 128
SAFE_INTEGER = 2**53 - 1
NAME_CHARS = 128  # MCP: tool names are 1 to 128 characters
BATCH_MESSAGES = 1000
URI_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:")
URI_CHARS = 2048
# Methods that name a resource by its URI, which resource grants must cover.
RESOURCE_METHODS = ("resources/read", "resources/subscribe", "resources/unsubscribe")
# Answers whose text is read field by field; the text of any other message is read whole.
SPECIFIC = ("tools/call", "tools/list", "resources/read", "prompts/get")
# What else those answers carry is read as this kind, but for the strings that name rather than
# say (a tool's name, a URI, a type), which masking must not rewrite.
REST_KIND: dict[str, Kind] = {"tools/call": "tool_result", "tools/list": "tool_description",
                              "resources/read": "resource", "prompts/get": "prompt"}
IDENTIFIER_KEYS = ("name", "uri", "uriTemplate", "mimeType", "type", "role", "nextCursor",
                   "resultType", "cacheScope", "requestState")
# Of those, the values a model never reads (opaque to all but the server): not inspected.
OPAQUE_KEYS = ("nextCursor", "requestState", "cacheScope", "resultType")
# Multi round-trip requests (2026-07-28): the client's answers to the server's input requests
# (elicitation, sampling, roots) ride on the retried request, with the server's opaque state.
INPUT_RESPONSES = "inputResponses"
# douane's own input request: a pending approval's status page, as a URL elicitation. The client's
# answer to it is one word (accept, decline, cancel), read by douane and never inspected as text.
APPROVAL_INPUT = "douane_approval"
APPROVAL_ACTIONS = ("accept", "decline", "cancel")
CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
STATE_CHARS = 64 * 1024
# The request metadata headers of the 2026-07-28 revision (the body is what douane polices).
MODERN = "2026-07-28"  # the first revision whose requests carry them
VERSION_META = "io.modelcontextprotocol/protocolVersion"
NAMED = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
PARAM_HEADER = "mcp-param-"
HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
SENTINEL = re.compile(r"=\?base64\?([A-Za-z0-9+/=]*)\?=")
# Keys of binary payloads (base64 images, audio, blobs, next to their mimeType), not text.
BINARY_KEYS = ("data", "blob")


def id_key(rid: Any) -> str | None:
    """An id's pairing key (type and value: `1` and `"1"` differ), or None if unusable."""
    if isinstance(rid, bool) or not isinstance(rid, int | str):
        return None
    if isinstance(rid, int) and abs(rid) > SAFE_INTEGER or isinstance(rid, str) and \
            (len(rid) > ID_CHARS or not rid.isprintable()):
        return None
    return repr(rid)


def _checked_id(msg: dict[str, Any], seen: set[str], what: str) -> int | str:
    rid = msg.get("id")
    if id_key(rid) is None:
        raise ProtocolError(400, "invalid_id", f"{what} needs an id that is a string (at most "
                            f"{ID_CHARS} printable characters) or an integer within +-2**53")
    # 1 and "1" are distinct ids, but a server may not keep them apart: refuse them together.
    if str(rid) in seen:
        raise ProtocolError(400, "duplicate_id", "a JSON-RPC id appears twice in one batch")
    seen.add(str(rid))
    return rid


def _params(msg: dict[str, Any], method: str) -> dict[str, Any]:
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError(400, "invalid_body", f"the params of {method} must be an object")
    return params


def _name(params: dict[str, Any], method: str) -> str:
    name = params.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= NAME_CHARS or not name.isprintable():
        raise ProtocolError(400, "invalid_name", f"the name in {method} must be a string of 1 "
                            f"to {NAME_CHARS} printable characters")
    return name


def _uri(params: dict[str, Any]) -> str:
    uri = params.get("uri")
    problem = "is not a string" if not isinstance(uri, str) else uri_problem(uri)
    if problem:
        raise ProtocolError(400, "invalid_uri", f"the resource URI {problem}")
    return uri


def uri_problem(uri: str) -> str | None:
    """Why a resource URI is not in the one form grants are matched on, or None if it is.

    Only URIs that every server reads the same way pass: no dot or empty path segments, no
    percent-encoded character that could be read as something else once decoded (`/`, `\\`, `%`,
    or an unreserved character such as `.`), no backslash, fragment, space, control or
    compatibility character (full-width `．`). What passes is matched as sent."""
    if not URI_SCHEME.match(uri) or len(uri) > URI_CHARS:
        return f"is not an absolute URI with a lower-case scheme (at most {URI_CHARS} characters)"
    if any(c in uri for c in "\\#") or not uri.isprintable() or any(c.isspace() for c in uri):
        return "holds a backslash, a fragment, a space or a control character"
    for escape in re.findall(r"%(.{0,2})", uri):
        if not re.fullmatch(r"[0-9A-Fa-f]{2}", escape):
            return "has a broken percent-escape"
        char = chr(int(escape, 16))
        if char in "/\\%" or re.fullmatch(r"[A-Za-z0-9._~-]", char):
            return f"percent-encodes {char!r}, which a server may decode"
    if unicodedata.normalize("NFKC", uri) != uri:
        return "holds compatibility characters (full-width or styled letters)"
    rest = uri.split(":", 1)[1].split("?", 1)[0]
    path = rest[2:].partition("/")[2] if rest.startswith("//") else rest
    segments = path.split("/")
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        return "has dot or empty path segments"
    return None


def _names(kind: Kind, role: Role | None, node: Any, base: tuple,
           identifiers: Iterable[tuple[tuple, str]] = ()) -> list[TextPiece]:
    """The object keys under `node` (a tool reads `{"Project Nightingale": 1}` too), and of
    `identifiers` (its string leaves, when given) the names, URIs and types a model reads in an
    answer: one piece for policy, never edited by masking (an edited key or URI would not be the
    same one)."""
    found = jsonpath.keys(node)
    found += [text for path, text in identifiers
              if path and path[-1] in IDENTIFIER_KEYS and path[-1] not in OPAQUE_KEYS]
    return [TextPiece(kind, role, "\n".join(found), (*base, KEYS), False)] if found else []


def free_text_first(pieces: list[TextPiece]) -> list[TextPiece]:
    """Free text in document order, then the keys and names (as `fields.cover` orders them): a
    phrase split across two messages stays adjacent when a kind's texts are joined."""
    return [p for p in pieces if p.editable] + [p for p in pieces if not p.editable]


def _input_responses(params: dict[str, Any], method: str, base: tuple) -> list[TextPiece]:
    """What the client answers to a server's input requests (an elicited answer, a sampled
    completion) is read like the client's other answers to the server; the server's
    `requestState` is opaque (echoed, not read by a model): bounded, not inspected."""
    state = params.get("requestState")
    if state is not None and (not isinstance(state, str) or len(state) > STATE_CHARS):
        raise ProtocolError(400, "invalid_request_state", f"requestState must be a string of at "
                            f"most {STATE_CHARS} characters")
    if method not in NAMED:  # the other methods' params are read whole
        return []
    responses = params.get(INPUT_RESPONSES)
    if isinstance(responses, dict) and APPROVAL_INPUT in responses:
        answer = responses[APPROVAL_INPUT]
        if not isinstance(answer, dict) or set(answer) != {"action"} or \
                answer["action"] not in APPROVAL_ACTIONS:
            raise ProtocolError(400, "invalid_input_response", f"the answer to douane's "
                                f"{APPROVAL_INPUT} is an action ({', '.join(APPROVAL_ACTIONS)})")
    return [TextPiece("prompt", "user", text, path) for path, text in
            jsonpath.strings(responses, (*base, "params", INPUT_RESPONSES))
            if path[len(base) + 2:len(base) + 3] != (APPROVAL_INPUT,)] + \
        _names("prompt", "user", {k: v for k, v in responses.items() if k != APPROVAL_INPUT}
               if isinstance(responses, dict) else responses, base)


def _other_params(params: dict[str, Any], method: str, base: tuple) -> list[TextPiece]:
    """The params of a request read field by field above but for those fields and the opaque
    `requestState` (`_input_responses`): `_meta` (SDKs hand it to the tool), a task, extensions.
    The server reads them: inspected like the request's text, never edited."""
    read = ("arguments", NAMED.get(method, "uri"), "requestState",
            *((INPUT_RESPONSES,) if method in NAMED else ()))
    rest = {k: v for k, v in params.items() if k not in read}
    if not rest:
        return []
    kind: Kind = "tool_arguments" if method == "tools/call" else "prompt"
    return [TextPiece(kind, "user", text, path, False)
            for path, text in jsonpath.strings(rest, (*base, "params"))] + \
        _names(kind, "user", rest, base)


def state_digest(request_state: str) -> str:
    """What is kept of a `requestState` (up to 64 KiB each, a thousand to an answer)."""
    return hashlib.sha256(request_state.encode(errors="replace")).hexdigest()


def issued_state(msg: Any, method: str | None) -> str | None:
    """The digest of the `requestState` a server's answer (to `method`) issues, if any."""
    if not isinstance(msg, dict) or "method" in msg or "error" in msg or method not in SPECIFIC:
        return None
    result = msg.get("result")
    state = result.get("requestState") if isinstance(result, dict) else None
    return state_digest(state) if isinstance(state, str) else None


def request_states(it: Interaction) -> list[str]:
    """The digests of the `requestState`s a request echoes (`_input_responses` checked them)."""
    return [state_digest(m.params["requestState"]) for m in it.mcp if m.method and
            isinstance(m.params.get("requestState"), str)]


def approval_answer(msg: McpMessage) -> str | None:
    """The client's answer to douane's approval input request, on a retry (None: none)."""
    responses = msg.params.get(INPUT_RESPONSES)
    answer = responses.get(APPROVAL_INPUT) if isinstance(responses, dict) else None
    return answer["action"] if isinstance(answer, dict) else None


def asks_by_url(msg: McpMessage, version: str) -> bool:
    """Whether douane may answer this request with a URL elicitation in an
    `InputRequiredResult`: a 2026-07-28 multi round-trip carrier from a client that declared
    URL elicitation."""
    meta = msg.params.get("_meta")
    caps = meta.get(CAPABILITIES_META) if isinstance(meta, dict) else None
    elicitation = caps.get("elicitation") if isinstance(caps, dict) else None
    return version >= MODERN and msg.method in NAMED and isinstance(elicitation, dict) and \
        isinstance(elicitation.get("url"), dict)


LIST_CHANGES = ("toolsListChanged", "promptsListChanged", "resourcesListChanged")


def _listen(params: dict[str, Any]) -> None:
    """A 2026-07-28 change-notification stream (what the GET stream was): list changes only.
    Resource subscriptions name URIs one at a time no resource grant is checked against here."""
    wanted = params.get("notifications")
    if not isinstance(wanted, dict):
        raise ProtocolError(400, "invalid_body", "subscriptions/listen needs a notifications "
                            "filter object")
    if any(value for key, value in wanted.items() if key not in LIST_CHANGES):
        raise ProtocolError(403, "method_not_governed", "douane governs list-change "
                            "notifications on subscriptions/listen, not resource subscriptions "
                            "or extensions")


def check_headers(doc: Any, headers: list[tuple[str, str]], it: Interaction) -> None:
    """The 2026-07-28 request metadata headers (`headers`: lower-case names) say what the body
    says, or the request is refused (400, JSON-RPC `HeaderMismatch`) before policy reads it: a
    component that routes or counts on a header cannot be told one thing while the server is
    told another. A request naming a revision from 2026-07-28 on must carry them.

    douane does not know which argument a tool mirrors into which `Mcp-Param-*` header (the tool's
    schema says, `x-mcp-header`): each such header must carry the value of one of the call's
    primitive arguments reached through objects only, so no header says what the body does not;
    the server, which knows the schema, checks the rest."""
    def mismatch(why: str) -> ProtocolError:
        return ProtocolError(400, "header_mismatch", f"header mismatch: {why}", it)

    def one(name: str) -> str | None:
        values = [v for k, v in headers if k == name]
        if len(values) > 1:
            raise mismatch(f"{name} appears more than once")
        return values[0] if values else None

    def decoded(name: str, value: str) -> str:
        if not HEADER_VALUE.fullmatch(value):
            raise mismatch(f"{name} holds characters a header may not carry")
        encoded = SENTINEL.fullmatch(value)
        if not encoded:
            return value
        try:
            return base64.b64decode(encoded.group(1), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise mismatch(f"{name} is not valid base64-encoded UTF-8") from None

    version, method_h, name_h = one("mcp-protocol-version"), one("mcp-method"), one("mcp-name")
    mirrored = [(k, v) for k, v in headers if k.startswith(PARAM_HEADER)]
    msg = doc if isinstance(doc, dict) else {}
    params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    modern = any(isinstance(v, str) and v >= MODERN for v in (version, meta.get(VERSION_META)))
    if not (modern or method_h or name_h or mirrored):
        return  # the handshake era: no request metadata
    if not isinstance(doc, dict):
        raise mismatch("only a request of one JSON-RPC message carries request metadata "
                       "headers (not a batch, a GET or a DELETE)")
    method = doc.get("method")
    if VERSION_META in meta and meta[VERSION_META] != version:
        raise mismatch("MCP-Protocol-Version does not match the body's protocol version")
    request = "id" in doc and method is not None  # notification headers are not defined
    if method_h is None and modern and request:
        raise mismatch("Mcp-Method is missing")
    if method_h is not None and method_h != method:
        raise mismatch("Mcp-Method does not match the body's method")
    field = NAMED.get(method or "")
    if name_h is None and modern and request and field:
        raise mismatch("Mcp-Name is missing")
    if name_h is not None:
        expected = params.get(field) if field else params.get("name", params.get("uri"))
        if not isinstance(expected, str) or decoded("Mcp-Name", name_h) != expected:
            raise mismatch("Mcp-Name does not match the body's name or URI")
    if not mirrored:
        return
    if method != "tools/call":
        raise mismatch("Mcp-Param headers on a request that calls no tool")
    values = list(_primitives(params.get("arguments")))
    for name, value in mirrored:
        text = decoded("an Mcp-Param header", value)
        if name == PARAM_HEADER or not any(_same(text, v) for v in values):
            raise mismatch("an Mcp-Param header matches no argument of the call")


def _primitives(value: Any) -> Any:
    """The string, integer and boolean values reached from a tool's arguments through objects."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _primitives(item)
    elif isinstance(value, str | int) and not isinstance(value, float):
        yield value


def _same(header: str, value: str | int) -> bool:
    if isinstance(value, bool):
        return header == ("true" if value else "false")
    if isinstance(value, int):  # compared as numbers: "42.0" is 42
        try:
            return abs(value) <= SAFE_INTEGER and float(header) == value
        except ValueError:
            return False
    return header == value


def mark_private(msg: Any) -> bool:
    """Mark an answer's result as meant for its caller alone (2026-07-28 `cacheScope`): a listing
    douane filtered for one caller must not be served to another from a shared cache."""
    result = msg.get("result") if isinstance(msg, dict) else None
    if not isinstance(result, dict) or result.get("cacheScope") == "private":
        return False
    result["cacheScope"] = "private"
    return True


def parse_request(doc: Any, session_id: str | None) -> Interaction:
    messages = doc if isinstance(doc, list) else [doc]
    if not messages:
        raise ProtocolError(400, "invalid_body", "an empty JSON-RPC batch")
    if len(messages) > BATCH_MESSAGES:
        raise ProtocolError(413, "batch_too_large", f"a JSON-RPC batch holds at most "
                            f"{BATCH_MESSAGES} messages")
    it = Interaction("mcp", "")
    try:
        fields.too_deep(doc, 400, "JSON-RPC body")
    except ProtocolError as e:  # a JSON-RPC error naming the first request's id
        first = messages[0] if isinstance(messages[0], dict) else {}
        if id_key(first.get("id")):
            it.mcp.append(McpMessage(None, first["id"], {}, session_id))
        e.interaction = it
        raise
    requests: set[str] = set()
    answers: set[str] = set()
    for n, msg in enumerate(messages):
        base: tuple = (n,) if isinstance(doc, list) else ()
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            raise ProtocolError(400, "invalid_body", "not a JSON-RPC 2.0 message")
        method = msg.get("method")
        if method is None:  # the client answers a server request (sampling, elicitation, roots)
            if ("result" in msg) == ("error" in msg):
                raise ProtocolError(400, "invalid_body", "a JSON-RPC answer needs a result or "
                                    "an error")
            rid = _checked_id(msg, answers, "an answer")
            it.mcp.append(McpMessage(None, rid, {}, session_id))
            it.texts += [TextPiece("prompt", "user", text, path) for key in ("result", "error")
                         for path, text in jsonpath.strings(msg.get(key), (*base, key))]
            it.texts += _names("prompt", "user", msg.get("result", msg.get("error")), base)
            continue
        if not isinstance(method, str):
            raise ProtocolError(400, "invalid_body", "a JSON-RPC method must be a string")
        if "result" in msg or "error" in msg:
            raise ProtocolError(400, "invalid_body", "a JSON-RPC message is a request or an "
                                "answer, not both")
        if method not in KNOWN_METHODS and not method.startswith("notifications/"):
            rid = msg.get("id") if id_key(msg.get("id")) else None
            it.mcp.insert(0, McpMessage(method[:NAME_CHARS], rid, {}, session_id))
            it.operation = f"mcp:{method[:NAME_CHARS]}"
            raise ProtocolError(403, "method_not_governed",
                                f"douane does not govern the MCP method {method[:NAME_CHARS]!r}",
                                it)
        params = _params(msg, method)
        it.texts += _input_responses(params, method, base)
        if method.startswith("notifications/"):
            if "id" in msg:
                raise ProtocolError(400, "invalid_id", "a notification has no id")
            rid = None
        else:  # without an id the server acts but never answers: nothing would be policed
            rid = _checked_id(msg, requests, f"the request {method}")
        message = McpMessage(method, rid, params, session_id)
        if method == "tools/call":
            message.tool = _name(params, method)
            arguments = {} if params.get("arguments") is None else params["arguments"]
            if not isinstance(arguments, dict):
                raise ProtocolError(400, "invalid_body", "tool arguments must be an object")
            it.tool_calls.append(ToolCall(message.tool, arguments, rid,
                                          (*base, "params", "arguments")))
            it.texts += [TextPiece("tool_arguments", "user", text, path) for path, text in
                         jsonpath.strings(arguments, (*base, "params", "arguments"))]
            it.texts += _names("tool_arguments", "user", arguments, base)
        elif method in RESOURCE_METHODS:
            message.uri = _uri(params)
        elif method == "prompts/get":
            message.prompt = _name(params, method)
            it.texts += [TextPiece("prompt", "user", text, path) for path, text in
                         jsonpath.strings(params.get("arguments"), (*base, "params", "arguments"))]
            it.texts += _names("prompt", "user", params.get("arguments"), base)
        if method in NAMED or method in RESOURCE_METHODS:
            it.texts += _other_params(params, method, base)
        else:  # notifications, completions, ...: every string the client sends is inspected
            if method == "subscriptions/listen":
                _listen(params)
            if method == "completion/complete":  # completes what a grant names: check it too
                ref = params.get("ref") if isinstance(params.get("ref"), dict) else {}
                if ref.get("type") == "ref/prompt":
                    message.prompt = _name(ref, method)
                elif ref.get("type") == "ref/resource":
                    message.uri = _uri(ref)
                else:
                    raise ProtocolError(400, "invalid_body", "a completion refers to a prompt "
                                        "or a resource")
            it.texts += [TextPiece("prompt", "user", text, path) for path, text in
                         jsonpath.strings(params, (*base, "params"))]
            it.texts += _names("prompt", "user", params, base)
        it.mcp.append(message)
    it.texts[:] = free_text_first(it.texts)
    methods = [m.method or "response" for m in it.mcp]
    it.operation = "mcp:" + (methods[0] if len(methods) == 1 else "batch")
    return it


def message_pieces(msg: Any, method: str | None, base: tuple, it: Interaction,
                   texts: list[TextPiece]) -> None:
    """The text of one JSON-RPC message from the server: an answer, by the method it answers
    (None: an answer no request of this flow asked for, as on a resumed stream), or a server
    request or notification. The answers of SPECIFIC methods are read field by field, then the
    rest of their strings as REST_KIND; every string of any other message, but binary payloads,
    is read as a tool result."""
    if not isinstance(msg, dict):
        return
    if "method" in msg or "error" in msg or method not in SPECIFIC:
        key = "params" if "method" in msg else "error" if "error" in msg else "result"
        texts += _pieces("tool_result", "tool", msg, base, jsonpath.strings(msg.get(key), (key,)))
        texts += _names("tool_result", "tool", msg.get(key), base)
        return
    result = msg.get("result")
    if not isinstance(result, dict):
        return
    issued = issued_state(msg, method)
    if issued and len(it.issued_states) < BATCH_MESSAGES:
        it.issued_states.append(issued)  # bound: `douane.owners`
    start = len(texts)  # `texts` may hold a batch's earlier messages
    if method == "tools/call":
        for k, block in enumerate(result.get("content") or []):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                texts.append(TextPiece("tool_result", "tool", block["text"],
                                       (*base, "result", "content", k, "text")))
            elif isinstance(block, dict) and block.get("type") == "resource":
                res = block.get("resource") or {}
                if isinstance(res.get("text"), str):
                    texts.append(TextPiece("tool_result", "tool", res["text"],
                                           (*base, "result", "content", k, "resource", "text")))
        texts += [TextPiece("tool_result", "tool", text, path) for path, text in
                  jsonpath.strings(result.get("structuredContent"),
                                   (*base, "result", "structuredContent"))]
    elif method == "tools/list":
        for k, tool in enumerate(result.get("tools") or []):
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                description = tool.get("description") if isinstance(tool.get("description"),
                                                                    str) else ""
                it.response_tools.append(ToolDef(tool["name"], description,
                                                 (*base, "result", "tools", k)))
                if description:
                    texts.append(TextPiece("tool_description", None, description,
                                           (*base, "result", "tools", k, "description")))
    elif method == "resources/read":
        for k, content in enumerate(result.get("contents") or []):
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                texts.append(TextPiece("resource", None, content["text"],
                                       (*base, "result", "contents", k, "text")))
    elif method == "prompts/get":
        for k, message in enumerate(result.get("messages") or []):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                texts.append(TextPiece("prompt", message.get("role"), content["text"],
                                       (*base, "result", "messages", k, "content", "text")))
    # whatever else the answer carries (schema descriptions, `_meta`, resource links, ...)
    taken = {p.path for p in texts[start:]}
    leaves = jsonpath.strings(result, ("result",))  # walked once for the rest and the names
    texts += _pieces(REST_KIND[method], None, msg, base, [
        (path, text) for path, text in leaves
        if (*base, *path) not in taken and path[-1] not in IDENTIFIER_KEYS])
    texts += _names(REST_KIND[method], None, result, base, identifiers=leaves)


def _pieces(kind: Kind, role: Role | None, msg: dict[str, Any], base: tuple,
            strings: Iterable[tuple[tuple, str]]) -> list[TextPiece]:
    """Pieces of a message's strings; a binary payload is read as the text it decodes to (a
    text resource sent as base64), never edited; media is not text."""
    out = []
    for path, text in strings:
        holder = jsonpath.get(msg, path[:-1]) if path[-1] in BINARY_KEYS else None
        if holder is not None and "mimeType" in holder:
            decoded = fields.blob_text(text, holder["mimeType"])
            if decoded is not None:
                out.append(TextPiece(kind, role, decoded, (*base, *path, fields.DECODED), False))
        else:
            out.append(TextPiece(kind, role, text, (*base, *path)))
    return out


def each(doc: Any) -> list[tuple[tuple, Any]]:
    """The messages of a JSON-RPC body or event (one, or a batch) with their base paths."""
    return [((n,), m) for n, m in enumerate(doc)] if isinstance(doc, list) else [((), doc)]


def requests_by_id(it: Interaction) -> dict[str, McpMessage]:
    """The flow's requests by their ids' pairing keys (the first, should one repeat), built once
    per interaction, again if its messages changed: each answer of a batch is paired by a lookup,
    not a scan of the requests (a batch of 1,000 answers took 1,000 scans, seconds of CPU)."""
    if it.mcp_requests is None or it.mcp_requests[0] != len(it.mcp):
        it.mcp_requests = (len(it.mcp), {id_key(m.request_id): m for m in reversed(it.mcp)
                                         if m.method and m.request_id is not None})
    return it.mcp_requests[1]


def answered_method(it: Interaction, msg: Any) -> str | None:
    """The method of the request this message answers (None: not an answer to one of ours)."""
    if not isinstance(msg, dict) or "method" in msg:
        return None
    key = id_key(msg.get("id"))
    request = requests_by_id(it).get(key) if key else None
    return request.method if request else None


class Pairing:
    """Answers paired to the requests of one flow: each request is answered at most once, and
    an answer to no request of the flow ends it (it would be policed as nothing). A GET stream
    asked nothing: what comes down it is policed whole, whatever it claims to answer."""

    def __init__(self, it: Interaction):
        self.open = set(requests_by_id(it))
        self.paired = bool(it.mcp)  # a POST; a GET carries no message

    def check(self, doc: Any) -> None:
        for _, msg in each(doc):
            if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
                raise ProtocolError(502, "invalid_answer", "the MCP server sent something that "
                                    "is not a JSON-RPC 2.0 message")
            if "method" in msg:  # a server request or notification
                if "result" in msg or "error" in msg:
                    raise ProtocolError(502, "invalid_answer", "the MCP server sent a message "
                                        "that is both a request and an answer")
                continue
            if ("result" in msg) == ("error" in msg):
                raise ProtocolError(502, "invalid_answer", "a JSON-RPC answer needs a result or "
                                    "an error")
            if not self.paired:
                continue
            key = id_key(msg.get("id"))
            if key in self.open:
                self.open.discard(key)
            elif msg.get("id") is not None or "error" not in msg:
                raise ProtocolError(502, "unpaired_answer", "the MCP server answered a request "
                                    "that was not asked, or answered one twice")


def parse_response(doc: Any, it: Interaction) -> None:
    fields.too_deep(doc, 502, "MCP answer")
    Pairing(it).check(doc)
    for base, msg in each(doc):
        message_pieces(msg, answered_method(it, msg), base, it, it.response_texts)
    it.response_texts[:] = free_text_first(it.response_texts)


class McpStream(StreamFormat):
    """Each SSE event is one whole JSON-RPC message (or batch): its text pieces are complete
    channels. Answers are paired to the flow's requests before any stage reads them."""

    complete_events = True

    def __init__(self, interaction: Interaction):
        self.interaction = interaction
        self.pairing = Pairing(interaction)
        self.count = 0
        self._read: tuple[Any, list[TextPiece]] | None = None  # the last event's JSON, its pieces

    def check(self, event: Event) -> None:
        if event.event == "endpoint":
            raise ProtocolError(403, "legacy_transport",
                                "the legacy MCP HTTP+SSE transport is not governed by douane; "
                                "use Streamable HTTP")

    def check_message(self, doc: Any) -> None:
        fields.too_deep(doc, 502, "MCP message")
        self.pairing.check(doc)

    def pieces(self, doc: Any) -> list[TextPiece]:
        """The text of one event's messages, read once: its policy (`_police_message`, once the
        listings are filtered) and its channels read the same pieces (and a listing's tools are
        noted once)."""
        if self._read is None or self._read[0] is not doc:  # held: no other doc takes its id
            pieces: list[TextPiece] = []
            for base, msg in each(doc):
                message_pieces(msg, answered_method(self.interaction, msg), base,
                               self.interaction, pieces)
            self._read = (doc, pieces)
        return self._read[1]

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        self.count += 1
        pieces = self.pieces(doc)
        if any(fields.DECODED in p.path for p in pieces):
            # as in a model's stream: masking edits text in place, and a file's is not in place
            raise ProtocolError(502, "file_in_stream", "the stream carries a text file douane "
                                "cannot inspect in place")
        # keys and names are policed (`_police_message`), never masked: no channel of their own
        return [Delta(f"msg{self.count}.{k}", p.kind, p.path) for k, p in enumerate(pieces)
                if p.editable]

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        raise AssertionError("MCP events are complete: nothing is held across events")

    def error_event(self, message: str, code: str, status: int = 403) -> Event:
        rid = next((m.request_id for m in self.interaction.mcp if m.request_id is not None), None)
        return Event(json.dumps({"jsonrpc": "2.0", "id": rid,
                                 "error": {"code": -32003, "message": message,
                                           "data": {"reason": code}}}), event="message")
