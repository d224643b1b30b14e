"""Every string of a body is inspected: a field no parser names cannot be a hole.

The per-API parsers name the fields they understand (roles, tool calls, ids); `cover` then walks
the whole JSON document and turns every other string into a `TextPiece` too, with the text kind of
where it sits (a classifier per API), so deny rules, detectors and masking see it:
- object keys, and string values under ids and enums (`STRUCTURAL`): inspected (as their
  object's text kind), never edited;
- tool `arguments` given as a JSON string: parsed and walked too, keys and decoded values (a
  `\\u006e` escape or a phrase split across two values is read as the tool will read it);
- data URLs and base64 payloads (`data:text/plain;base64,...`, `file_data`, base64 `source`s):
  decoded; text (whatever the declared type) is inspected, anything else is media (the grant's
  `media` decides);
- `OPAQUE` provider blobs (thinking signatures, encrypted reasoning) are not text and are skipped:
  the provider verifies them;
- a file that is neither UTF-8 text nor recognisable media (image, audio, video, PDF) is refused.
Free text goes first, in document order (a phrase split across messages stays adjacent when a
kind's texts are joined), keys and structural values after it. Walks are bounded in depth, in the
number of strings and in decoded size: past a bound the body is refused, never partly inspected.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from douane.interaction import Interaction, JsonPath, Kind, Role, TextPiece
from douane.protocols.base import ProtocolError

# String values that are ids, names or enums: inspected by policy, never rewritten by masking.
STRUCTURAL = frozenset({
    "id", "type", "role", "model", "object", "status", "name", "call_id", "tool_call_id",
    "tool_use_id", "item_id", "response_id", "previous_response_id", "finish_reason",
    "stop_reason", "system_fingerprint", "service_tier", "media_type", "mime_type", "detail",
    "format", "file_id", "container_id", "server_label", "server_name", "mcp_server_name",
    "effort", "truncation", "verbosity", "tool_choice", "stop_sequence",
})
# Provider-verified blobs, by (key, the `type` of the object holding it), and Responses' random
# per-event padding: not text, never pieces. Anywhere else these keys are inspected as usual.
OPAQUE = frozenset({("signature", "thinking"), ("signature", "signature_delta"),
                    ("encrypted_content", "reasoning"), ("encrypted_content", "compaction"),
                    ("data", "redacted_thinking"), ("encrypted_content", "web_search_result"),
                    ("encrypted_index", "web_search_result_location"),
                    # a remote MCP server's credentials, for a server a grant names by URL (the
                    # model never reads them; the secret detectors would refuse every such call)
                    ("authorization_token", "url"), ("headers", "mcp"), ("authorization", "mcp")})
OPAQUE_KEYS = frozenset(k for k, _ in OPAQUE)
SCALARS = frozenset({str, int, float, bool, type(None)})  # JSON leaves (a str is walked)
# Keys whose strings may hold a file or JSON tool arguments (`_string`); any other string shorter
# than ENCODED that cannot start a data URL is plain text, read inline by `_node`
_LONG_WAY = frozenset({"data", "file_data", "arguments"})
PADDING = "obfuscation"  # top level of a stream event only
MEDIA_TYPES = ("image/", "audio/", "video/", "application/pdf")
# Parts that carry media or a file, inline or by URL or file id (the provider fetches what douane
# never reads): media wherever they sit (a tool output, a prompt variable), as in a message.
MEDIA_PARTS = frozenset({"image_url", "input_image", "input_audio", "file", "input_file", "image",
                         "document", "container_upload"})
AUDIO_FORMATS = ("wav", "mp3", "flac", "opus", "aac", "pcm16", "ogg", "webm")  # input_audio
# What media starts with, for payloads that do not say their type: PNG, JPEG, GIF, WebP/WAV/AVI
# (RIFF), PDF, MP3 (ID3 or frame sync), Ogg, FLAC, MP4/MOV/HEIC (ftyp at offset 4)
SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"%PDF", b"ID3", b"\xff\xfb",
              b"\xff\xf3", b"OggS", b"fLaC")
MAX_DEPTH = 64  # JSON nesting douane walks (tool schemas nest, but not this deep)
MAX_STRINGS = 100_000  # strings and keys of one body, decoded tool arguments included
MAX_DECODED = 4 * 1024**2  # characters of text decoded from one data URL or base64 payload
ENCODED = 1024  # a base64 run this long with no other character is a payload, not prose
BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/csv",
              "application/x-ndjson", "application/yaml", "application/x-yaml")
# path steps of text that is not at a JSON path
DECODED, JSON_STRING, KEYS = "<decoded>", "<json>", "<keys and ids>"

Classified = tuple[Kind, Role | None]
Classify = Callable[[JsonPath], Classified]
ESCAPE = re.compile(r'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def unescaped(text: str) -> str:
    """JSON string escapes read as what they stand for, in JSON text that may be cut anywhere
    (streamed tool arguments): `\\u006e` is an `n` to a deny rule, as it is to the tool."""
    def char(m: re.Match[str]) -> str:
        if m[2]:
            return ESCAPED[m[2]]
        code = int(m[1], 16)
        return "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)
    return ESCAPE.sub(char, text)


# JSON escapes that stand for a character a string may hold as is (`\u0040` is `@`, `\/` is
# `/`); a `\\` pair is matched first, so the backslash it escapes is never read as an escape.
_PLAIN_ESCAPE = re.compile(r'(\\\\)|\\u([0-9a-fA-F]{4})|\\/')
_ESCAPE_TAIL = re.compile(r'\\(?:u[0-9a-fA-F]{0,3})?$')


def readable(json_text: str) -> str:
    """JSON text written with its plain characters unescaped: the same JSON to whoever parses
    it, but a value spelled `maria\u0040example.com` is an email address to masking too (which
    edits the text, not the value). Quotes, backslashes, controls and surrogates stay escaped."""
    if "\\" not in json_text:
        return json_text

    def char(m: re.Match[str]) -> str:
        if m[1] or m[2] is None:
            return m[1] or "/"
        c = chr(int(m[2], 16))
        return m[0] if c < " " or c in '"\\' or 0xD800 <= ord(c) <= 0xDFFF else c
    return _PLAIN_ESCAPE.sub(char, json_text)


def escape_tail(json_text: str) -> int:
    """Where an escape cut off at the end of streamed JSON text starts (len: none), so it is
    held until the next delta completes it."""
    m = _ESCAPE_TAIL.search(json_text)
    if m is None:
        return len(json_text)
    before = json_text[:m.start()]
    return m.start() if (len(before) - len(before.rstrip("\\"))) % 2 == 0 else len(json_text)


class _Walk:
    """One body's walk: free text in document order; keys and structural values by kind."""

    __slots__ = ("classify", "count", "media", "named", "reads", "tail", "text")

    def __init__(self, classify: Classify, named: dict[JsonPath, TextPiece],
                 reads: int | None) -> None:
        self.classify = classify
        self.named = named
        self.reads = reads  # `classify` reads at most this many steps of a path (None: unknown)
        self.text: list[TextPiece] = []
        # keys and structural values, by kind: one piece per kind (many short strings would make
        # as many pieces, each paying the detectors' fixed cost; they are never edited anyway)
        self.tail: dict[Kind, list[str]] = {}
        self.media = False
        self.count = 0

    def counted(self, n: int = 1) -> None:
        self.count += n
        if self.count > MAX_STRINGS:
            raise ProtocolError(413, "too_many_fields",
                                f"the body holds more than {MAX_STRINGS} strings; douane refuses "
                                "what it cannot inspect whole")

    def keys(self, kind: Kind, keys: Any) -> None:
        before = len(tail := self.tail.setdefault(kind, []))
        tail.extend(keys)
        self.counted(len(tail) - before)

    def add(self, path: JsonPath, text: str, editable: bool, tail: bool,
            fixed: Classified | None, classify_at: JsonPath | None = None) -> TextPiece | None:
        self.count += 1
        if self.count > MAX_STRINGS:
            self.counted(0)
        named = self.named.pop(path, None) if self.named else None
        if named is not None:
            self.text.append(named)
            return named
        if not text:
            return None
        kind, role = fixed if fixed is not None else \
            self.classify(classify_at if classify_at is not None else path)
        if tail:
            self.tail.setdefault(kind, []).append(text)
            return None
        piece = TextPiece(kind, role, text, path, editable)
        self.text.append(piece)
        return piece


def cover(it: Interaction, doc: Any, classify: Classify, side: str = "request",
          reads: int | None = None) -> None:
    """Every string of `doc` as a text piece of `it` (the parsers' named pieces kept, in place).
    `reads`: `classify` reads at most the first `reads` steps of a path, so what lies deeper is
    classified once, where its branch reaches that depth (not once per string and object)."""
    pieces = it.texts if side == "request" else it.response_texts
    walk = _Walk(classify, {p.path: p for p in pieces}, reads)
    _node(walk, doc, (), None, {}, 0, None)
    out = walk.text
    if walk.named:
        out.extend(walk.named.values())
    for kind, texts in walk.tail.items():
        out.append(TextPiece(kind, None, "\n".join(texts), (KEYS,), False))
    pieces[:] = out
    it.has_media = it.has_media or (walk.media and side == "request")


def named_calls(node: Any, types: tuple[str, ...], depth: int = 0) -> list[tuple[None, str]]:
    """The names of the tool calls (objects of one of `types`) anywhere in a stream event, each
    whole (`StreamFormat.tool_names`)."""
    if depth > MAX_DEPTH:  # (the event's strays walk refuses deeper ones)
        return []
    if isinstance(node, list):
        return [n for v in node for n in named_calls(v, types, depth + 1)]
    if not isinstance(node, dict):
        return []
    own = [(None, node["name"])] if node.get("type") in types and \
        isinstance(node.get("name"), str) else []
    return own + [n for v in node.values() for n in named_calls(v, types, depth + 1)]


def strays(doc: Any, claimed: set[JsonPath]) -> list[tuple[JsonPath, str]]:
    """The free-text strings of one stream event that no delta or recap claims (a claimed path
    claims what is under it): a stream format names the fields it knows, and everything else
    carrying text is still filtered (whole).
    A text file inside a streamed answer cannot be inspected in place and ends the stream."""
    out: list[tuple[JsonPath, str]] = []

    def visit(node: Any, path: JsonPath, key: str | None, parent: dict[str, Any],
              depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ProtocolError(502, "too_deep", f"a stream event nests deeper than {MAX_DEPTH}")
        if path in claimed:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in STRUCTURAL and (k, _type(node)) not in OPAQUE and \
                        (path or k != PADDING):
                    visit(v, (*path, k), k, node, depth + 1)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, (*path, i), key, parent, depth + 1)
        elif isinstance(node, str) and node:
            payload = _payload(node, key, parent)
            if payload is None:
                out.append((path, node))
            elif _text_of(payload[0], payload[1], False) is not None:
                raise ProtocolError(502, "file_in_stream", "the streamed answer carries a text "
                                    "file douane cannot inspect in place")

    visit(doc, (), None, {}, 0)
    return out


def too_deep(doc: Any, status: int, what: str) -> None:
    """Refuse a document nesting more than MAX_DEPTH arrays and objects, measured without
    recursion: for walks that are not depth-bounded themselves (`jsonpath`'s, MCP's), which would
    otherwise reach Python's recursion limit (an internal error) on a body nested ~1,000 deep."""
    level, depth = [doc] if type(doc) in (dict, list) else [], 1
    while level:  # the arrays and objects `depth` deep
        if depth > MAX_DEPTH:
            raise ProtocolError(status, "too_deep", f"the {what} nests deeper than {MAX_DEPTH} "
                                "levels")
        deeper = []
        for node in level:
            for v in node.values() if type(node) is dict else node:
                if type(v) is dict or type(v) is list:
                    deeper.append(v)
        level, depth = deeper, depth + 1


def file_text(text: str) -> str | None:
    """The text a data URL or a bare base64 run carries; None when it is not a file, or not one
    douane can read as text (for the recording's secret redaction, which must look inside)."""
    try:
        payload = _payload(text, None, {})
        return None if payload is None else _text_of(*payload)
    except ProtocolError:
        return None


def blob_text(data: str, media_type: Any) -> str | None:
    """The text an MCP base64 `blob` / `data` payload carries (by its `mimeType` or its bytes),
    None for media or other binary; refused when it is declared text and is not."""
    raw = _b64(data)
    if raw is None:
        raise ProtocolError(502, "invalid_blob", "a base64 payload of the answer is invalid")
    return _text_of(media_type.lower() if isinstance(media_type, str) else "", raw, False)


def _type(node: dict[str, Any]) -> str | None:
    """An object's `type`, when it is a string (`{"type": {}}` must not break the walk)."""
    kind = node.get("type")
    return kind if isinstance(kind, str) else None


def _node(walk: _Walk, node: Any, path: JsonPath, key: str | None, parent: dict[str, Any],
          depth: int, fixed: Classified | None) -> None:
    """`fixed`: what everything under `path` is classified as, once known (`cover`'s `reads`)."""
    if depth > MAX_DEPTH:
        raise ProtocolError(400, "too_deep", f"the body nests deeper than {MAX_DEPTH} levels; "
                            "douane refuses what it cannot inspect whole")
    if fixed is None and walk.reads is not None and depth >= walk.reads:
        fixed = walk.classify(path)
    if isinstance(node, dict):
        # keys are read where their object sits, and so are its ids, names and enums
        here = fixed if fixed is not None else walk.classify(path)
        if (lines := walk.tail.get(here[0])) is None:
            lines = walk.tail[here[0]] = []
        lines.extend(node)
        walk.count += len(node)
        if walk.count > MAX_STRINGS:
            walk.counted(0)
        kind = node.get("type")
        if type(kind) is not str:  # (`{"type": {}}` must not break the walk)
            kind = None
        elif kind in MEDIA_PARTS:
            walk.media = True
        items: Any = node.items()
        members, parent = True, node
    elif isinstance(node, list):
        items, members, lines, here = enumerate(node), False, None, None
    else:
        if isinstance(node, str):
            _string(walk, node, path, key, parent, depth, fixed)
        return
    named, deeper, leaf = walk.named, depth + 1, depth < MAX_DEPTH
    for k, v in items:
        if members:  # an object's (a list's items keep the list's key)
            if k in OPAQUE_KEYS and (k, kind) in OPAQUE:
                continue
            key = k
        if type(v) is not str or not leaf:
            # past the depth bound even a scalar is refused (by _node)
            if not leaf or type(v) not in SCALARS:
                _node(walk, v, (*path, k), key, parent, deeper, fixed)
            continue
        structural = key in STRUCTURAL
        if key in _LONG_WAY or len(v) >= ENCODED or v[:1] in ("d", "D"):
            _string(walk, v, (*path, k), key, parent, deeper,
                    here if lines is not None and structural else fixed)
            continue
        # the usual string, `walk.add`'s work inline: one piece, or a line of the keys' piece
        walk.count += 1
        if walk.count > MAX_STRINGS:
            walk.counted(0)
        if named and (piece := named.pop((*path, k), None)) is not None:
            walk.text.append(piece)
            continue
        if not v:
            continue
        if structural and lines is not None:
            lines.append(v)  # with its object's keys
            continue
        at = (*path, k)
        if structural:
            walk.tail.setdefault((fixed if fixed is not None else walk.classify(at))[0],
                                 []).append(v)
        else:
            what, role = fixed if fixed is not None else walk.classify(at)
            walk.text.append(TextPiece(what, role, v, at, True))


def _string(walk: _Walk, text: str, path: JsonPath, key: str | None, parent: dict[str, Any],
            depth: int, fixed: Classified | None) -> None:
    if fixed is None and walk.reads is not None and depth >= walk.reads:
        fixed = walk.classify(path)
    # (the test `_payload` starts with, to spare most strings a call)
    payload = _payload(text, key, parent) if key in ("data", "file_data") or \
        len(text) >= ENCODED or text[:1] in ("d", "D") else None
    if payload is not None:
        media_type, raw, explicit = payload
        decoded = _text_of(media_type, raw, explicit)
        if decoded is None:
            walk.media = True
        else:
            walk.add((*path, DECODED), decoded, False, False, fixed, path)
        if path in walk.named or decoded is None and len(text) < ENCODED:
            walk.add(path, text, False, False, fixed)  # named as text, or too short to be a file
        return
    piece = walk.add(path, text, key not in STRUCTURAL, key in STRUCTURAL, fixed)
    if key == "arguments":
        try:
            decoded_args = _ARGUMENTS.decode(text)
        except (ValueError, RecursionError):
            return  # not JSON: the raw string above is what the tool reads
        if piece is not None and piece.editable:
            piece.text = readable(piece.text)  # masked as the tool will read it
        if isinstance(decoded_args, (dict, list)):
            values: list[str] = []
            kind = (fixed if fixed is not None else walk.classify(path))[0]
            _arguments(walk, decoded_args, values, kind, depth + 1)
            walk.add((*path, JSON_STRING), " ".join(values), False, False, fixed, path)


def _arguments(walk: _Walk, node: Any, values: list[str], kind: Kind, depth: int) -> None:
    """Decoded tool arguments: the values in order, joined into one text (a phrase split across
    two stays adjacent), keys with the other keys (of `kind`: where the arguments string sits),
    never edited in place."""
    if depth > MAX_DEPTH:
        raise ProtocolError(400, "too_deep", f"tool arguments nest deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        walk.keys(kind, node)
        for v in node.values():
            _arguments(walk, v, values, kind, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _arguments(walk, v, values, kind, depth + 1)
    elif isinstance(node, str):
        walk.counted()
        values.append(node)


def repeated(pairs: list[tuple[str, Any]]) -> str:
    """The first key an object's `pairs` give twice (looked for once their dict, built in C,
    came out shorter than they are)."""
    seen: set[str] = set()
    return next(k for k, _ in pairs if k in seen or seen.add(k))


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):  # the tool may read either value: refuse the ambiguity
        raise ProtocolError(400, "duplicate_json_key", f"the tool arguments give the key "
                            f"{repeated(pairs)[:40]!r} twice")
    return doc


def _constant(name: str) -> Any:
    raise ValueError(name)


# One decoder for every arguments string (`json.loads` with hooks builds one per call); a leading
# BOM fails to parse here as it does there.
_ARGUMENTS = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def _payload(text: str, key: str | None,
             parent: dict[str, Any]) -> tuple[str, bytes, bool] | None:
    """(media type, bytes, given as a file) when the string carries a file rather than text: a
    data URL or a base64 `data` / `file_data` field (explicit), or a long bare base64 run."""
    explicit = key in ("data", "file_data") and parent.get("type") != "text"
    if not explicit and len(text) < ENCODED and text[:1] not in ("d", "D"):
        return None  # the common case, decided cheaply
    if text[:5].lower() == "data:" and "," in text:
        header, _, data = text[5:].partition(",")
        params = header.split(";")
        media_type = params[0].strip().lower()
        if "base64" in (p.strip().lower() for p in params[1:]):
            raw = _b64(data)
            if raw is None:
                raise ProtocolError(400, "invalid_data_url", "a data URL's base64 is invalid")
            return media_type, raw, True
        try:
            return media_type, urllib.parse.unquote_to_bytes(data), True
        except UnicodeEncodeError:  # a lone surrogate (a JSON `\ud83d` escape): no text's
            raise ProtocolError(400, "invalid_data_url", "a data URL's text is invalid") from None
    if explicit or len(text) >= ENCODED and BASE64.fullmatch(text):
        raw = _b64(text)
        declared = parent.get("media_type") or parent.get("mime_type") or parent.get("format")
        if raw is not None:
            return declared.lower() if isinstance(declared, str) else "", raw, explicit
    return None


def _b64(data: str) -> bytes | None:
    try:
        return base64.b64decode(data.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return None


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _wide(raw: bytes) -> str | None:
    """Text in UTF-16 or UTF-32 (by its byte-order mark; UTF-16 without one in the byte order
    its zero bytes say: ASCII's high bytes), when every character of it is printable or white
    space (random bytes rarely decode so): a key written in UTF-16 in a blob typed
    `application/octet-stream` was no text to read, and passed unread."""
    bom = next((c for bom, c in _BOMS if raw.startswith(bom)), None)
    if bom is not None:
        tried = [bom]
    else:
        tried = ["utf-32-le", "utf-32-be"] if len(raw) % 4 == 0 else []
        if len(raw) % 2 == 0:
            le = raw[1::2].count(0) >= raw[0::2].count(0)
            tried += ["utf-16-le" if le else "utf-16-be"]
    for codec in tried:
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            continue
        if text and "".join(text.split()).isprintable():
            return text
    return None


def _text_of(media_type: str, raw: bytes, explicit: bool) -> str | None:
    """The text a file carries, or None for media. Text is recognised by its bytes too (a
    mislabelled text file is still read as text); a file that is neither readable text nor
    recognisable media is refused, never passed unread."""
    texty = media_type.startswith(TEXT_TYPES) or media_type.endswith(("+json", "+xml"))
    media = media_type.startswith(MEDIA_TYPES) or media_type in AUDIO_FORMATS or \
        raw.startswith(SIGNATURES) or raw[4:8] == b"ftyp"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None if media and not texty else _wide(raw)
        if text is None:
            if texty or explicit and not media:
                raise ProtocolError(415, "undecodable_file", f"douane cannot read a "
                                    f"{media_type[:60] or 'untyped'} file that is neither "
                                    "UTF-8, UTF-16 or UTF-32 text nor an image, audio, video or "
                                    "PDF") from None
            return None
    else:  # ASCII in UTF-16 is valid UTF-8, a zero byte between its letters
        if "\x00" in text and not media and (wide := _wide(raw)) is not None:
            text = wide
    if media and not texty and any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None  # media that happens to be valid UTF-8
    if len(text) > MAX_DECODED:
        raise ProtocolError(413, "file_too_large", f"a text file in the body is longer than "
                            f"{MAX_DECODED} characters, more than douane inspects")
    return text
