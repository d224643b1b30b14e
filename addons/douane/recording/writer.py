"""The recording writer: a process of its own, so that scrubbing, redacting, serialising and
indexing a flow takes neither the gateway's GIL nor its core.

The gateway's event loop hands `RecordingWriter.put` a `flow.get_state()` snapshot; a timer of
the loop sends the flows of each `bursts.WINDOW` into a one-way pipe as one message, pickled at
once (a keep-alive connection's state crosses once, then by serial number); the child reads
the pipe at most every `GATHER_SECONDS` (what was sent meanwhile waits in the pipe, which
outlives the gateway), scrubs the credential
headers and redacts the secrets on the state itself (a message is rebuilt only when its body must
change), serialises the flow for its session file (kept open; what a pass read is written and
flushed at its end, one write a file, so a crash of the gateway loses at most the flows in flight
and those of the last window), seals the originals and indexes it (one commit per burst of
flows). One child, one pipe: flows are written
in the order they were put. The child holds only the pipe's read end, so when the gateway dies
(kill -9) it reads EOF, writes what was sent and exits; Ctrl-C (sent to the whole process group)
is the gateway's to handle: the child drains until `close()` says stop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import select
import signal
import struct
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mitmproxy import connection, http
from mitmproxy.net import encoding
from mitmproxy.net.http.headers import infer_content_encoding
from wsproto.frame_protocol import Opcode

from douane import bursts, protocols, secrets, spawned, store, transcript, untrusted
from douane.interaction import Interaction, TextPiece
from douane.protocols import decoding, fields, streams
from douane.recording import index, originals
from douane.recording.config import RecordingSettings

if TYPE_CHECKING:
    from douane.config import Database

logger = logging.getLogger(__name__)

SCRUBBED = "<scrubbed by douane>"
_SCRUBBED = SCRUBBED.encode()
# One JSON string literal (no raw newline), unrolled: runs of plain characters match in C at
# full speed (the regex holds the GIL, so a multi-megabyte value must not take long).
JSON_STRING = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')
COMMENT_CHARS = 4096  # the flow's comment: douane's decision and its reasons' messages
# A body's string values up to this long, once found clean, are not scanned again: its keys and
# the like (a model's, a role's, a tool's name), the same in every flow; not a text's content.
KNOWN_CHARS = 64
# A body still compressed here is one the gateway did not read (it drops the encoding of what it
# decodes; a request it refused unread): inflated this far at most, else not kept. 200 KB of gzip
# inflated to the offline limit (64 MB) cost this process 222 ms each, five times the gateway's
# refusal.
UNREAD_LIMIT = 1024**2
OPEN_FILES = 32  # session files kept open: one per active connection or MCP session
BATCH_ROWS = 500  # index rows per commit at most, under a load that never lets the queue drain
BATCH_SECONDS = 1.0  # ... and the oldest uncommitted row waits no longer than this
# A pause this long between flows ends a burst: one client's requests in a row share a commit
# (a commit per flow at concurrency 1 was a sixth of the writer's CPU).
BATCH_GAP = 0.05
PENDING_ROWS = 100_000  # rows kept for a shared store that is down; older ones are dropped
# flows (and their bytes) waiting for the pipe before the writer counts as not keeping up
MAX_BACKLOG = 10_000
MAX_BACKLOG_BYTES = 256 * 1024**2
BURST_FLOWS = 256  # flows in one message to the writer at most
BURST_BYTES = 1024**2  # ... and bytes of their bodies (a message holds one flow at least)
PENDING_BYTES = 1024**2  # flows serialised and held for their files, written at once past this
STARTING = -1  # the shared health flag before the child runs
STARTUP_SECONDS = 60
# A keep-alive connection's state is the same for each of its flows: it crosses the pipe once
# (then a serial number) and is serialised once. Both ends count the states sent alike and keep
# the last CONNECTION_STATES of them.
CONNECTION_STATES = 1024
CONNECTIONS = ("client_conn", "server_conn")
WRITER_NICENESS = 10
# The writer reads the pipe at most this often: what the gateway sent meanwhile (a burst every
# `bursts.WINDOW`) waits in the pipe, which outlives the gateway, and is written in one pass.
# Woken per burst, the writer ran cold each time (a fifth more CPU per flow at concurrency 1).
GATHER_SECONDS = 0.2
# The pipe holds what a pause gathers at a few thousand flows a second, so that the gateway's
# flows wait in it, where a crash of the gateway does not lose them, rather than in its memory.
PIPE_BYTES = 1024**2

_CLIENT = connection.Client(peername=("", 0), sockname=("", 0))  # see `scrubbed`
_SERVER = connection.Server(address=None)
Item = tuple[str, dict, frozenset[str], originals.Original | None, tuple[str, ...],
             tuple[str, ...], frozenset[str]]


@dataclass(frozen=True)
class SharedIndex:
    """The fleet's index in the shared store instead of the SQLite file: this replica's name, and
    its folder under `recording.dir` (a worker's `wN`, else empty)."""

    database: Database
    replica: str
    folder: str = ""


def recording_of(snapshot: dict, names: frozenset[str], streamed: tuple[str, ...] = (),
                 prompted: tuple[str, ...] = (), clean: Container[str] = frozenset()) -> dict:
    """What `FlowWriter` would write for the flow of a `flow.get_state()` snapshot once scrubbed:
    every credential header replaced (`names`), the secrets in any other header, the request's
    query, the bodies and WebSocket text redacted, douane's metadata bounded, no backup (an
    unscrubbed earlier request). Worked on the state itself: a message is rebuilt only when its
    body must change (a compressed or secret-carrying one), the connections never are.
    `streamed`: the answer's texts as a reader reads them (`texts_read`), where a secret split
    across a stream's deltas, or across blocks in a row, shows; `prompted`: the request's parts
    in a row, joined (`parts_read`); `clean`: texts the policy's secrets detector found nothing
    in (`secret_free`), by the same definition: a value equal to one is not scanned again (its
    redaction is itself), any other is, whatever the policy read."""
    # douane's summary quotes what the client sent (model, tool names, claims): bounded, scrubbed
    metadata = untrusted.scrub_all(
        {k: v for k, v in snapshot["metadata"].items() if k in ("douane", "user")})
    request, response = snapshot["request"], snapshot["response"]
    # Before each value is redacted alone: a share of a split secret that is one alone would be
    # replaced, and the rest of it, in the next value, left.
    in_request, in_response = _split(prompted, clean), bool(response) and _split(streamed, clean)
    if in_request or in_response:
        flow = http.HTTPFlow(_CLIENT, _SERVER)
        flow.id, flow.metadata = snapshot["id"], metadata
        flow.request = http.Request.from_state(request)
        flow.response = http.Response.from_state(response) if response else None
        _split_secrets(flow, in_request, in_response)
        request = flow.request.get_state()
        response = flow.response.get_state() if flow.response else None
    request = _message(request, names, http.Request, clean)
    sent = request["path"].decode("utf-8", "surrogateescape")  # as `Request.path` reads it
    path = sent
    if "?" in path:  # a query's fields named as credentials, as a form's
        target, _, query = path.partition("?")
        path = f"{target}?{_form_keyed(query)}"
    # (the same few paths in every flow: known clean, not scanned again)
    if not untrusted.clean([path]) and \
            (redacted := secrets.redact(path, high_entropy=False)) != path:
        path = redacted
    if path != sent:
        request["path"] = path.encode("utf-8", "surrogateescape")
    if response:
        response = _message(response, names, http.Response, clean)
    return {**snapshot, "request": request, "response": response, "metadata": metadata,
            "backup": None, "comment": _comment(snapshot["comment"]),
            "websocket": _websocket(snapshot["websocket"])}


def _comment(text: str) -> str:
    """`untrusted.scrub`: the same few decisions' comments in every flow, not redacted again."""
    return text if len(text) <= COMMENT_CHARS and untrusted.clean([text], False) else \
        untrusted.scrub(text, COMMENT_CHARS)


def texts_read(it: Interaction, stream: bool) -> tuple[str, ...]:
    """What the writer checks for a secret no single JSON value shows (`recording_of`): a
    stream's texts, each channel as delivered (their join is checked too); a whole answer's
    blocks in a row (`streams.read_together`), each run joined (a lone block is each value)."""
    if stream:
        return tuple(p.text for p in it.response_texts)
    if len(it.response_texts) < 2:  # no run of two
        return ()
    texts = [p.text for p in it.response_texts]
    return tuple("".join([texts[i] for i in run]) for run in _runs(it.response_texts, False)[0])


def parts_read(it: Interaction) -> tuple[str, ...]:
    """What the writer checks for a secret split across a request's parts (`recording_of`): its
    parts in a row (`streams.read_together`: a message's content parts, messages or Responses
    input items in a row, as the model reads them), each run joined; and the texts it reads in
    sequence apart from those (`streams.read_in_order`), joined only when a key spans two."""
    if len(it.texts) < 2:  # nothing read together or in order
        return ()
    together, in_order = _runs(it.texts, True)
    texts = [p.text for p in it.texts]
    return (*("".join([texts[i] for i in run]) for run in together),
            *("".join(read) for run in in_order
              if secrets.find_across(read := [texts[i] for i in run], high_entropy=False)))


# The runs of a message's pieces (`streams.read_together`, `read_in_order`) follow from their
# kinds and paths alone: the same few shapes in every flow (a prompt and douane's keys and ids),
# each found once, as the pieces' indexes. At most RUN_SHAPES of them, of RUN_PIECES pieces each.
RUN_SHAPES = 1024
RUN_PIECES = 64
Runs = tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]
_shapes: dict[tuple, Runs] = {}


def _runs(pieces: list[TextPiece], in_order: bool) -> Runs:
    """The runs of two pieces or more read together, and (`in_order`) those read in order."""
    shape = (in_order, *[(p.kind, p.path) for p in pieces]) if len(pieces) <= RUN_PIECES else None
    runs = _shapes.get(shape) if shape else None
    if runs is None:
        at = {id(p): i for i, p in enumerate(pieces)}
        runs = (tuple(tuple(at[id(p)] for p in run) for run in streams.read_together(pieces)
                      if len(run) > 1),
                tuple(tuple(at[id(p)] for p in run) for run in streams.read_in_order(pieces))
                if in_order else ())
        if shape:
            if len(_shapes) >= RUN_SHAPES:
                _shapes.clear()
            _shapes[shape] = runs
    return runs


def _split(texts: tuple[str, ...], clean: Container[str]) -> bool:
    """Whether a secret shows in one of `texts` (but those known `clean`), or in their join (a
    stream's channels are in the order they started: blocks in a row are next to each other),
    or a value under a credential's name does (`_keyed`: a tool call's arguments, streamed)."""
    return any(text not in clean and secrets.find(text) or _key_edits(text) for text in texts) or \
        len(texts) > 1 and bool(secrets.find("".join(texts)))


def _message(state: dict, names: frozenset[str], cls: type[http.Message],
             clean: Container[str] = frozenset()) -> dict:
    """A message's state (a copy) with its headers and trailers scrubbed and its body redacted."""
    state = {**state, "headers": _headers(state["headers"], names)}
    if state["trailers"]:
        state["trailers"] = _headers(state["trailers"], names)
    if not state["content"]:
        return state
    ctype = _field(state["headers"], b"content-type", "")
    if _field(state["headers"], b"content-encoding", "identity").strip().lower() not in \
            ("", "identity"):
        message = cls.from_state(state)
        _decoded_and_redacted(message, clean, _unread(cls, clean), UNREAD_LIMIT)
        return message.get_state()
    text = _text(state["content"], ctype)
    redacted = _redacted(text, ctype.lower(), clean, _unread(cls, clean))
    if redacted == text:
        return state
    message = cls.from_state(state)
    _write_back(message, redacted, ctype)
    return message.get_state()


def _text(raw: bytes, ctype: str) -> str:
    """What `message.get_text(strict=False)` reads from a body with no encoding, but JSON in
    UTF-16 or UTF-32 read as the gateway reads it (`protocols.loads`, by its first bytes): read
    as UTF-8 (NUL bytes are UTF-8), a key in it is NUL-interleaved and no pattern sees it."""
    if wide := _wide(raw, ctype):  # (a lone surrogate passes, as there: `\ud800` is JSON)
        with contextlib.suppress(UnicodeDecodeError):
            return raw.decode(wide, "surrogatepass")
    try:  # a JSON body's UTF-8 read without mitmproxy's inference (what it infers for one with
        # no charset and no byte order mark)
        return raw.decode() if "json" in ctype and ";" not in ctype and raw[:1] not in _BOMS \
            else encoding.decode(raw, infer_content_encoding(ctype, raw))
    except ValueError:
        return raw.decode("utf8", "surrogateescape")


def _wide(raw: bytes, ctype: str) -> str | None:
    """The UTF-16 or UTF-32 codec a JSON body is in, or a text body declaring no charset, by its
    first bytes (None: another). A body the gateway refuses unread (not JSON) is recorded too."""
    ctype = ctype.lower()
    if ("json" in ctype or "charset" not in ctype) and \
            (wide := json.detect_encoding(raw)) in _WIDE:
        return wide
    return None


def _write_back(message: http.Message, text: str, ctype: str) -> None:
    """A redacted body's text as its body: JSON in UTF-16 or UTF-32 in its own codec (a lone
    surrogate it held kept: UTF-8 cannot hold one, and the record would be lost)."""
    if wide := _wide(message.raw_content or b"", ctype):
        message.content = text.encode(wide, "surrogatepass")
    else:
        message.text = text


# the first bytes of the byte order marks `infer_content_encoding` reads
_BOMS = frozenset((b"\x00", b"\xfe", b"\xff", b"\xef"))
_WIDE = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")


def _unread(cls: type[http.Message], clean: Container[str]) -> bool:
    """Whether a request body may not be JSON though typed so: the policy read none of its texts
    (a body the gateway parses is JSON: outside its strings lies punctuation only)."""
    return cls is http.Request and not clean


def _field(fields: tuple[tuple[bytes, bytes], ...], name: bytes, default: str) -> str:
    """`http.Headers(fields).get(name, default)` without building the headers (`name` in lower
    case, ASCII)."""
    values = [v.decode("utf-8", "surrogateescape") for k, v in fields if k.lower() == name]
    return ", ".join(values) if values else default


# Per set of credential header names, the header fields known to be kept as they are (neither
# scrubbed nor holding a secret): the same host, content type, server in every flow, neither
# decoded nor looked up again. At most PASSING_FIELDS of them (then forgotten, and learnt again).
PASSING_FIELDS = 4096
_passing: dict[frozenset[str], set[tuple[bytes, bytes]]] = {}


def _headers(fields: tuple[tuple[bytes, bytes], ...],
             names: frozenset[str]) -> tuple[tuple[bytes, bytes], ...]:
    """Credential headers replaced; in any other value, the secrets redacted (a key in
    `X-Custom-Token` or `User-Agent` is no less a key). The usual case, where there is none, is
    found among the fields not known to pass (`_passing`), by one scan of their values not known
    clean (`untrusted.clean`)."""
    if type(fields) is not tuple:  # (a state's are a tuple of pairs)
        return _scrubbed(fields, names)
    passing = _passing.get(names)
    if passing is None:
        if len(_passing) >= 64:  # (a set a credential header's name: a few)
            _passing.clear()
        passing = _passing[names] = set()
    fresh = [f for f in fields if f not in passing]
    if not fresh:
        return fields
    kept = [(k, v) for k, v in fresh if k.decode("latin-1").lower() not in names]
    values = [v.decode("utf-8", "surrogateescape") for _, v in kept]
    if not untrusted.clean(values):
        return _scrubbed(fields, names)
    if len(passing) > PASSING_FIELDS:
        passing.clear()
    # (not a decision id: a new one each flow)
    passing.update(f for f, text in zip(kept, values, strict=True)
                   if len(text) <= KNOWN_CHARS and not untrusted.IDS.fullmatch(text))
    if len(kept) == len(fresh):
        return fields
    return tuple((k, _SCRUBBED) if (k, v) not in passing and k.decode("latin-1").lower() in names
                 else (k, v) for k, v in fields)


def _scrubbed(fields: tuple[tuple[bytes, bytes], ...],
              names: frozenset[str]) -> tuple[tuple[bytes, bytes], ...]:
    """`_headers`, each field read."""
    fields = tuple((k, _SCRUBBED if k.decode("latin-1").lower() in names else v)
                   for k, v in fields)
    values = [v.decode("utf-8", "surrogateescape") for _, v in fields]
    if untrusted.clean(values):
        return fields
    return tuple((k, secrets.redact(text).encode("utf-8", "surrogateescape"))
                 for (k, _), text in zip(fields, values, strict=True))


# Encoded once: the same few dozen keys (mitmproxy's state, douane's metadata) in every flow.
_KEYS: dict[str, bytes] = {}
KEYS_CACHED = 4096
PREFIXES = 1024  # a short value's length prefix (`12:`), made once
_PREFIX = [b"%d:" % n for n in range(PREFIXES)]


def tnetstring_of(value: Any, raw: dict[str, bytes] | None = None) -> bytes:
    """mitmproxy's `tnetstring.dumps`, byte for byte (a dict's items last first, as it writes
    them), in a fifth of the time: each value's bytes built at once, not pushed fragment by
    fragment onto a deque; keys encoded once; a container's usual items (bytes, strings, None,
    numbers, a header's pair of bytes) written in its own loop, without a call each. Exact types
    first, then its checks. `raw`: a dict's values already serialised, by key (connections)."""
    kind = type(value)
    if kind is dict:
        return _dict(value, raw)
    if kind is list or kind is tuple:
        return _list(value)
    if kind is str:
        data = value.encode("utf8")
        return b"%d:%s;" % (len(data), data)
    if kind is bytes:
        return b"%d:%s," % (len(value), value)
    if value is None:
        return b"0:~"
    if value is True:
        return b"4:true!"
    if value is False:
        return b"5:false!"
    if isinstance(value, int):
        data = str(value).encode()
        return b"%d:%s#" % (len(data), data)
    if isinstance(value, float):
        data = repr(value).encode()
        return b"%d:%s^" % (len(data), data)
    for base in (bytes, str, list, tuple, dict):  # subclasses, as mitmproxy writes them
        if isinstance(value, base):
            return tnetstring_of(base(value) if base is not str else value.encode("utf8")
                                 .decode("utf8"))
    raise ValueError(f"unserializable object: {value} ({type(value)})")


def _dict(value: dict, raw: dict[str, bytes] | None) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    for k, v in reversed(value.items()):
        key = _KEYS.get(k) if type(k) is str else None
        if key is None:
            key = tnetstring_of(k)
            if type(k) is str and len(_KEYS) < KEYS_CACHED:
                _KEYS[k] = key
        append(key)
        kind = type(v)
        if raw is not None and k in raw:
            append(raw[k])
        elif kind is bytes:  # (three items joined once: cheaper than a format each)
            n = len(v)
            append(_PREFIX[n] if n < PREFIXES else b"%d:" % n)
            append(v)
            append(b",")
        elif kind is str:
            data = v.encode("utf8")
            n = len(data)
            append(_PREFIX[n] if n < PREFIXES else b"%d:" % n)
            append(data)
            append(b";")
        elif v is None:
            append(b"0:~")
        elif kind is dict:
            append(_dict(v, None))
        elif kind is tuple or kind is list:
            append(_list(v))
        elif kind is int:
            data = b"%d" % v
            append(b"%d:%s#" % (len(data), data))
        elif kind is float:
            data = repr(v).encode()
            append(b"%d:%s^" % (len(data), data))
        else:
            append(tnetstring_of(v))
    body = b"".join(parts)
    return b"%d:%s}" % (len(body), body)


def _list(value: list | tuple) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    for v in value:
        kind = type(v)
        if kind is bytes:
            append(b"%d:%s," % (len(v), v))
        elif kind is tuple and len(v) == 2 and type(v[0]) is bytes and type(v[1]) is bytes:
            name, text = v  # a header
            pair = b"%d:%s,%d:%s," % (len(name), name, len(text), text)
            append(b"%d:%s]" % (len(pair), pair))
        elif kind is str:
            data = v.encode("utf8")
            append(b"%d:%s;" % (len(data), data))
        elif v is None:
            append(b"0:~")
        else:
            append(tnetstring_of(v))
    body = b"".join(parts)
    return b"%d:%s]" % (len(body), body)


def _websocket(state: dict | None) -> dict | None:
    """A WebSocket's messages with their secrets redacted, like bodies: binary ones too (the
    gateway refuses them unread, and keeps them in the flow: a key sent so is recorded)."""
    if not state:
        return state
    messages = []
    for kind, from_client, content, *rest in state["messages"]:
        if kind in (Opcode.TEXT, Opcode.BINARY):
            text = content.decode("utf-8", "surrogateescape")
            clean = secrets.redact(_keyed(text))
            if clean != text:
                content = clean.encode("utf-8", "surrogateescape")
        messages.append((kind, from_client, content, *rest))
    return {**state, "messages": messages}


def _json_string(m: re.Match[str]) -> str:
    literal = m.group(0)
    if len(literal) < secrets.SHORTEST_SECRET + 2:  # most values of a stream's events: fast
        return literal
    try:
        value = json.loads(literal) if "\\" in literal else literal[1:-1]
    except ValueError:
        return literal
    # a key inside a text file: redacted inside it, the file kept (not the whole run replaced)
    inside = fields.file_text(value)
    if inside is not None and (clean_inside := secrets.redact(inside)) != inside:
        clean = "data:text/plain;base64," + base64.b64encode(clean_inside.encode()).decode()
    else:
        clean = secrets.redact(value)
    if clean == value:
        return literal
    dumped = json.dumps(clean, ensure_ascii=False)
    # a lone surrogate (a `\ud800` escape) stays escaped: no UTF-8 text holds one
    return dumped if dumped.isascii() or not untrusted.SURROGATE.search(dumped) else \
        json.dumps(clean)


# A JSON string literal and, if it is a key, its string value: read from the text's start, every
# literal in turn, a value is never taken for a key (`_keyed`).
_KEYED = re.compile(f"({JSON_STRING.pattern})(?:(\\s*:\\s*)({JSON_STRING.pattern}|[-0-9\\[{{]))?")
# A value of another type under a credential's name: a number, an array or an object is one
# too (`{"password": 12345678}`, `{"api_key": ["..."]}`, `{"token": {"value": "..."}}`); JSON's
# true, false and null hold none.
_DECODER = json.JSONDecoder()
# A key whose name ends as a credential's (`secrets.KEY_ENDS`), its quote escaped or not (JSON in
# a string, in a string), read in the lower-cased text backwards: one search that starts at each
# colon (a few us a KB; a search a word was ten times that), before the literals are read.
_KEY_END = re.compile(r':\s*"\\*(?:' + "|".join(sorted(
    (e[::-1] for e in secrets.KEY_ENDS), key=len, reverse=True)) + ")")
_FORM_END = re.compile(r"=(?:" + "|".join(sorted(
    (e[::-1] for e in secrets.KEY_ENDS), key=len, reverse=True)) + ")")
_FORM_FIELD = re.compile(r"(?:^|(?<=[&;]))([^=&;]{1,64})=([^&;]*)")
KEYED_DEPTH = 2  # JSON documents inside string values (a tool call's arguments) read this deep


def _keyed(text: str, depth: int = 0) -> str:
    """`text` (JSON, SSE) with each value under a credential's name replaced by
    `<SECRET:rule id>` (`secrets.credential_key`: a refresh token or a password has no shape the
    catalogue knows alone), in JSON texts inside string values too, `KEYED_DEPTH` deep."""
    edits = _key_edits(text, depth)
    if not edits:
        return text
    out, last = [], 0
    for start, end, clean in edits:
        out += [text[last:start], clean]
        last = end
    return "".join([*out, text[last:]])


def _key_edits(text: str, depth: int = 0) -> list[tuple[int, int, str]]:
    """`_keyed`'s replacements of `text`, in order: (start, end, what replaces it)."""
    if depth > KEYED_DEPTH or not _named(text):
        return []
    edits, at = [], 0
    while (m := _KEYED.search(text, at)) is not None:
        literal, between, value = m.group(1, 2, 3)
        if value is None or value[0] != '"':  # a value, or a key to a value of another type
            clean = _keyed_inside(literal, depth)
            if value is not None and (kind := _credential(literal)) is not None:
                at = _value_end(text, m.start(3))  # the value whole, whatever it holds
                edits.append((m.start(), at, f'{clean}{between}"<SECRET:{kind.rule}>"'))
                continue
            end = m.end(1)
        else:
            kind = _credential(literal)
            if kind is not None and (plain := _plain(value)) is not None and \
                    secrets.key_value(plain):
                clean = f'{literal}{between}"<SECRET:{kind.rule}>"'
            else:
                clean = literal + between + _keyed_inside(value, depth)
            end = m.end()
        if clean != text[m.start():end]:
            edits.append((m.start(), end, clean))
        at = end
    return edits


def _named(text: str) -> bool:
    """Whether a key in `text` may end as a credential's name (`_KEY_END`), read with its
    escapes of ASCII characters undone too (`"pass\\u0077ord"` is the name `_credential`
    reads; the raw text alone let its value through)."""
    lowered = text.lower()
    if _KEY_END.search(lowered[::-1]):
        return True
    if "\\u00" not in lowered or not _LETTER_ESCAPE.search(lowered):
        return False  # (no escaped letter: a name's last word is letters)
    # (its backslashes dropped: an escape escaped again, in a string in a string, read too)
    undone = _ASCII_ESCAPE.sub(_ascii, lowered.replace("\\", ""))
    return bool(_KEY_END.search(undone.lower()[::-1]))


_LETTER_ESCAPE = re.compile(r"\\u00[4-7]")
_ASCII_ESCAPE = re.compile(r"u00([2-7][0-9a-f])")


def _ascii(m: re.Match[str]) -> str:
    return chr(int(m[1], 16))


def _credential(literal: str) -> secrets.Kind | None:
    return secrets.credential_key(name) if (name := _plain(literal)) is not None else None


def _value_end(text: str, start: int) -> int:
    """Where the JSON value at `start` (a number, an array, an object) ends; one that does not
    parse (an SSE event cut short, a truncated body) runs to its line's end (failing closed)."""
    try:
        return _DECODER.raw_decode(text, start)[1]
    except (ValueError, RecursionError):
        end = text.find("\n", start)
        return len(text) if end < 0 else end


def _keyed_inside(literal: str, depth: int) -> str:
    """A string value holding a JSON document, its credential-named values replaced."""
    if '\\"' not in literal or (plain := _plain(literal)) is None or \
            plain.lstrip()[:1] not in ("{", "[") or (clean := _keyed(plain, depth + 1)) == plain:
        return literal
    dumped = json.dumps(clean, ensure_ascii=False)
    return dumped if dumped.isascii() or not untrusted.SURROGATE.search(dumped) else \
        json.dumps(clean)


def _plain(literal: str) -> str | None:
    """A JSON string literal's value (None: not a valid one)."""
    if "\\" not in literal:
        return literal[1:-1]
    try:
        return json.loads(literal)
    except ValueError:
        return None


def _form_keyed(text: str) -> str:
    """A form's or a query's fields named as credentials (`_keyed`) with their values replaced."""
    if not _FORM_END.search(text.lower()[::-1]):
        return text
    return _FORM_FIELD.sub(_form_field, text)


def _form_field(m: re.Match[str]) -> str:
    name, value = m.group(1, 2)
    kind = secrets.credential_key(urllib.parse.unquote_plus(name))
    if kind is None or not secrets.key_value(urllib.parse.unquote_plus(value)):
        return m.group(0)
    return f"{name}=<SECRET:{kind.rule}>"


_DATA_URL = re.compile('"data:', re.IGNORECASE)  # a value that is one (not an SSE `data:` line)


def _redacted(text: str, ctype: str, clean: Container[str] = frozenset(),
              unread: bool = False) -> str:
    """A body's text with its secrets replaced by `<SECRET:rule id>`. JSON and SSE bodies are
    edited one decoded string value at a time, so they stay valid and byte-identical elsewhere (a
    recorded request without secrets still matches in server replay). `clean`: see
    `recording_of`. `unread`: a body that may not be JSON (`_unread`), whose text outside the
    string literals is read too (refused unread, it is recorded as sent: a key may sit there)."""
    if not ("json" in ctype or "event-stream" in ctype or text.lstrip()[:1] in ("{", "[")):
        if "x-www-form-urlencoded" in ctype:
            text = _form_keyed(text)
        return secrets.redact(text) if text not in clean and secrets.matches(text) else text
    keyed = _keyed(text)
    # The usual, clean body in one scan: its string values (what `_json_string` would redact,
    # decoded), joined as no pattern reads across (`untrusted.clean`): where no pattern matches
    # the join, none matches a value. Neither the keys' `": "` (an assignment to every pattern that
    # needs one) nor numbers and punctuation are scanned, nor the values the policy found clean
    # (their redaction is themselves), nor the short ones seen clean before (`untrusted.clean`:
    # keys, models, roles, finish reasons; `max_tokens` runs the token patterns). A data URL is
    # looked inside.
    stray = unread and "event-stream" not in ctype and \
        secrets.any_matches(JSON_STRING.split(text))
    if not stray and not _DATA_URL.search(text) and \
            untrusted.clean([v for v in _values(text) if v not in clean], False, KNOWN_CHARS):
        return keyed
    redacted = JSON_STRING.sub(_json_string, keyed)
    return secrets.redact(redacted) if stray else redacted


def _values(text: str) -> list[str]:
    """The string values of a JSON or SSE text that `_json_string` would redact, decoded."""
    if "\\" not in text:  # each literal from a quote to the next, but one across a line
        inside = text.split('"')[1:-1:2]
        if "\n" not in "".join(inside):  # (a third of `findall`'s cost)
            return [v for v in inside if len(v) >= secrets.SHORTEST_SECRET]
    values = []
    for literal in JSON_STRING.findall(text):
        if len(literal) < secrets.SHORTEST_SECRET + 2:
            continue
        if "\\" not in literal:
            values.append(literal[1:-1])
            continue
        try:
            values.append(json.loads(literal))
        except ValueError:
            continue  # (left as it is by `_json_string` too)
    return values


def _decoded_and_redacted(message: http.Message, clean: Container[str] = frozenset(),
                          unread: bool = False, limit: int = decoding.OFFLINE_LIMIT) -> None:
    """A compressed body decoded and its secrets replaced by `<SECRET:rule id>`, in place (bounded
    by `limit`: a compressed body the gateway refused unread may be a bomb; one that cannot be
    read cannot be scrubbed, so it is not kept). Regexes over whole bodies: the writer process
    calls this, never the gateway."""
    if not message.raw_content:
        return
    try:
        decoding.decode_body(message, limit)
    except (decoding.TooLarge, ValueError):
        del message.headers["content-encoding"]
        message.content = b""
        return
    ctype = message.headers.get("content-type", "")
    text = _text(message.raw_content or b"", ctype)
    redacted = _redacted(text, ctype.lower(), clean, unread)
    if redacted != text:
        _write_back(message, redacted, ctype)


class _HoldAndRedact:
    """A stream filter that keeps each channel whole and releases it, redacted, at its end. Blocks
    in a row (`follow`: the rewriter's `streams.next_block`) are one text: each keeps its share,
    redacted with its share of each secret (`secrets.redact_run`), and an earlier block's leaves
    through `take` once the last block of the run ends."""

    def __init__(self) -> None:
        self.held: dict[str, list[tuple[str, str]]] = {}  # channel -> its run: (block, text)
        self.shares: dict[str, str] = {}  # an earlier block of a finished run -> its text
        self.changed = False

    def feed(self, channel: str, text: str) -> str:
        run = self.held.setdefault(channel, [(channel, "")])
        run[-1] = (channel, run[-1][1] + text)
        return ""

    def follow(self, channel: str, previous: str) -> None:
        self.held[channel] = [*self.held.pop(previous, [(previous, "")]), (channel, "")]

    def take(self, previous: str) -> tuple[str, bool]:
        if previous not in self.shares:
            return "", False
        return self.shares.pop(previous), True

    def finish(self, channel: str) -> str:
        run = self.held.pop(channel, [(channel, "")])
        texts = [text for _, text in run]
        clean = secrets.redact_run(_keyed_run(texts))
        self.changed = self.changed or clean != texts
        self.shares.update(zip([block for block, _ in run[:-1]], clean, strict=False))
        return clean[-1]


def _keyed_run(texts: list[str]) -> list[str]:
    """Texts read as one (a stream's channel: a tool call's arguments, JSON text, in as many
    deltas as the upstream sent) with the key rule's replacements of their join (`_keyed`), each
    text keeping its place: a replacement goes to the text it starts in, the others lose their
    share of the value (a key named in one delta, its value in the next, is found)."""
    joined = "".join(texts)
    edits = _key_edits(joined)
    if not edits:
        return texts
    out, start = [], 0
    for text in texts:
        end = start + len(text)
        parts, last = [], start
        for first, stop, clean in edits:
            if stop <= start or first >= end:
                continue
            parts += [joined[last:max(first, start)], clean if first >= start else ""]
            last = min(stop, end)
        out.append("".join([*parts, joined[last:end]]))
        start = end
    return out


def _split_secrets(flow: http.HTTPFlow, request: bool, response: bool) -> None:
    """A secret no single JSON value shows (split across a request's parts in a row, a stream's
    deltas or an answer's blocks in a row): parts and a whole answer's blocks in a row are
    redacted as one text (`streams.read_together`); a stream goes through the same rewriter the
    gateway uses, each channel (each run of blocks) released whole and redacted. Unchanged when
    there is no such secret."""
    upstream = transcript.upstream_of(flow)
    if upstream is None:
        return
    try:
        it = protocols.parse_request(upstream, flow)
        if request:
            _redact_runs(flow, "request", it.texts, in_order=True)
        if not response or flow.response is None or not flow.response.raw_content:
            return
        if "event-stream" not in flow.response.headers.get("content-type", "").lower():
            protocols.parse_response(upstream, flow, it)
            _redact_runs(flow, "response", it.response_texts)
            return
        rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "recording")
    except protocols.ProtocolError:
        return  # not a flow douane can read: each JSON value is redacted on its own
    redact = _HoldAndRedact()
    rewriter.filters.append(redact)
    body = b"".join(rewriter(flow.response.get_content(strict=False))) + rewriter(b"")
    if rewriter.abort_message is None and redact.changed:
        flow.response.content = body


def _redact_runs(flow: http.HTTPFlow, side: str, pieces: list[TextPiece],
                 in_order: bool = False) -> None:
    """Each run of `pieces` read as one text, each piece redacted with its share of every secret
    of the run (`secrets.redact_run`), where that differs from redacting each alone (a secret
    within one piece is left to that); then, for a request, its texts in the order the model
    reads them (`in_order`: `streams.read_in_order`), a key's shape only, as the policy reads
    them."""
    edited: dict[int, TextPiece] = {}
    runs = [(run, True) for run in streams.read_together(pieces)]
    if in_order:
        runs += [(run, False) for run in streams.read_in_order(pieces)]
    for run, high_entropy in runs:
        texts = [p.text for p in run]
        clean = secrets.redact_run(texts, high_entropy)
        if len(run) > 1 and clean != [secrets.redact(t, high_entropy) for t in texts]:
            for piece, text in zip(run, clean, strict=True):
                if text != piece.text:
                    piece.text = text
                    edited[id(piece)] = piece
    if edited:
        protocols.apply_text_edits(flow, side, list(edited.values()))


class _Sent:
    """The gateway's end of CONNECTION_STATES: a connection state sent before, and kept by the
    writer still, is replaced by its serial."""

    def __init__(self) -> None:
        self.states: dict[int, tuple[dict, int]] = {}  # id -> (the state, kept alive; serial)
        self.serial = 0  # the next one's

    def refer(self, snapshot: dict) -> None:
        for name in CONNECTIONS:
            state = snapshot[name]
            known = self.states.pop(id(state), None)
            if known is not None and known[0] is state and \
                    self.serial - known[1] <= CONNECTION_STATES:
                snapshot[name] = known[1]
            else:
                known = state, self.serial
                self.serial += 1
            self.states[id(state)] = known
            if len(self.states) > CONNECTION_STATES:
                del self.states[next(iter(self.states))]


class RecordingWriter:
    """The gateway's end: `put` from the event loop (never blocks), `healthy` read by the
    request hook, `close` drains and joins.

    No thread of its own: the first flow put in a window arms a timer of the event loop, which
    `bursts.WINDOW` later pickles the flows put meanwhile (at most BURST_FLOWS or BURST_BYTES of
    bodies a message; the rest in the next, at once) and writes them to the pipe, non-blocking;
    a full pipe (the niced writer behind) is waited for by the loop's selector, and flows put
    meanwhile wait their turn. A feeder thread woken each window cost the gateway a wake-up and
    a switch of the GIL per burst: more CPU than the pickling it took off the loop (a few µs
    a flow). Put outside an event loop (a script, a test), flows are sent at once."""

    def __init__(self, settings: RecordingSettings, shared: SharedIndex | None = None):
        # spawn: forking a process that runs an asyncio loop and threads is unsafe
        context = multiprocessing.get_context("spawn")
        # set by the child: 1 once it runs, 0 after a failed write, 1 after one that succeeds
        self._healthy = context.RawValue("b", STARTING)
        receiver, self._sender = context.Pipe(duplex=False)
        self._process = context.Process(target=serve, args=(receiver, settings, self._healthy, shared),
                                        name="douane-recording", daemon=True)
        spawned.start(self._process)
        receiver.close()  # the child's alone: the gateway's death is its EOF
        # Serve no flow before the writer runs: one answered then would be lost in a crash.
        deadline = time.monotonic() + STARTUP_SECONDS
        while self._healthy.value == STARTING:
            if wait([self._process.sentinel], 0.01) or time.monotonic() > deadline:
                self._process.kill()
                self._process.join()
                self._sender.close()
                raise RuntimeError("the recording writer did not start (exit code "
                                   f"{self._process.exitcode}; its error is logged above)")
        self._fd = self._sender.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):  # (above /proc/sys/fs/pipe-max-size: the default)
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._waiting: list[Item] = []  # put, not yet pickled
        self._waiting_bytes = 0
        self._out = memoryview(b"")  # a message pickled, not yet wholly in the pipe
        self._out_flows = self._out_bytes = 0  # ... the flows it holds, their bodies' bytes
        self._timer: asyncio.TimerHandle | None = None
        self._selector: asyncio.AbstractEventLoop | None = None  # waiting for a full pipe
        self._connections = _Sent()
        self._gone = False  # the child died: flows are dropped until close()

    @property
    def healthy(self) -> bool:
        """Writing, and keeping up (not `congested`)."""
        return bool(self._healthy.value) and not self.congested

    @property
    def congested(self) -> bool:
        """Past `MAX_BACKLOG` flows or `MAX_BACKLOG_BYTES` waiting on this side of the pipe (a
        disk, or a niced process, slower than the traffic): not healthy until the writer catches
        up, rather than the gateway's memory growing without bound."""
        return self.backlog >= MAX_BACKLOG or \
            self._waiting_bytes + self._out_bytes >= MAX_BACKLOG_BYTES

    @property
    def backlog(self) -> int:
        """Recordings queued on this side of the pipe."""
        return len(self._waiting) + self._out_flows

    def put(self, relative: str, snapshot: dict, scrub: frozenset[str],
            original: originals.Original | None = None, streamed: tuple[str, ...] = (),
            prompted: tuple[str, ...] = (), clean: frozenset[str] = frozenset()) -> None:
        """`relative`: the session file under `recording.dir`; `snapshot` is `flow.get_state()`,
        the writer's from now on; `scrub` the credential headers to replace."""
        if self._gone:
            return
        self._waiting.append((relative, snapshot, scrub, original, streamed, prompted, clean))
        self._waiting_bytes += _size(snapshot)
        if self._timer is None and self._selector is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._send(math.inf)
                return
            self._timer = loop.call_later(bursts.WINDOW, self._send)

    def close(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unselect()
        if not self._gone and self._send(deadline):  # what waits, then the end
            self._out = memoryview(_framed(None))
            self._send(deadline)
        self._gone = True
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.error("douane: the recording writer did not finish within %ss; stopped",
                         timeout)
            self._process.kill()
            self._process.join()
        self._sender.close()

    def _send(self, deadline: float | None = None) -> bool:
        """Pickle what waits, a burst per message, and write it to the pipe. Without a
        `deadline` (the loop's timer): until the pipe is full, then the loop's selector says
        when to go on; with one, blocking until then. True once all is in the pipe."""
        self._timer = None
        while self._out or self._waiting:
            if not self._out:
                self._out = memoryview(self._burst())
                continue
            try:
                if deadline is not None and not _writable(self._fd, deadline):
                    return False
                self._out = self._out[os.write(self._fd, self._out):]
            except BlockingIOError:
                if deadline is None:
                    self._select()
                    return False
                continue
            except OSError:  # the child died
                self._died()
                return False
            if not self._out:
                self._out_flows = self._out_bytes = 0
        return True

    def _burst(self) -> bytes:
        """The next message: the flows waiting, within the bounds, pickled at once (a burst
        that cannot be is logged and dropped)."""
        n, size = 0, 0
        while n < len(self._waiting) and n < BURST_FLOWS and (n == 0 or size < BURST_BYTES):
            size += _size(self._waiting[n][1])
            n += 1
        burst, self._waiting = self._waiting[:n], self._waiting[n:]
        self._waiting_bytes -= size
        for item in burst:
            self._connections.refer(item[1])
        try:
            message = _framed(burst)
        except Exception:
            logger.exception("douane: cannot hand %d flow(s) to the recording writer", n)
            return b""
        self._out_flows, self._out_bytes = n, size
        return message

    def _select(self) -> None:
        if self._selector is None:
            self._selector = asyncio.get_running_loop()
            self._selector.add_writer(self._fd, self._drained)

    def _unselect(self) -> None:
        if self._selector is not None:
            with contextlib.suppress(Exception):  # (the loop may be closed at shutdown)
                self._selector.remove_writer(self._fd)
            self._selector = None

    def _drained(self) -> None:
        self._unselect()
        self._send()

    def _died(self) -> None:
        self._gone = True
        self._unselect()
        self._healthy.value = 0
        self._waiting, self._waiting_bytes = [], 0
        self._out, self._out_flows, self._out_bytes = memoryview(b""), 0, 0
        self._process.join(0)
        logger.error("douane: the recording writer exited (code %s); flows are no longer "
                     "recorded", self._process.exitcode)


def _framed(burst: list[Item] | None) -> bytes:
    """A message as `Connection.recv` reads it: its length, then the pickle."""
    data = pickle.dumps(burst, pickle.HIGHEST_PROTOCOL)
    if len(data) > 0x7FFFFFFF:
        return struct.pack("!i", -1) + struct.pack("!Q", len(data)) + data
    return struct.pack("!i", len(data)) + data


def _writable(fd: int, deadline: float) -> bool:
    """Whether the pipe takes bytes, waiting for it until `deadline`."""
    return bool(select.select([], [fd], [], None if deadline == math.inf
                              else max(0.0, deadline - time.monotonic()))[1])


def _size(snapshot: dict) -> int:
    """A flow's bodies and messages: what makes its share of a pipe message large."""
    size = len(snapshot["request"]["content"] or b"")
    if snapshot["response"]:
        size += len(snapshot["response"]["content"] or b"")
    if snapshot["websocket"]:
        size += sum(len(m[2]) for m in snapshot["websocket"]["messages"])
    return size


def serve(receiver: Connection, settings: RecordingSettings, healthy: Any,
          shared: SharedIndex | None = None) -> None:
    """The child process: writes what arrives until the gateway's sentinel or its death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Behind the gateway for the CPU: a request never waits for an earlier flow's recording
    # (p50 -0.4 ms at concurrency 1 on 2 shared cores); flows stay queued, in order, meanwhile.
    os.nice(WRITER_NICENESS)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, datefmt="%H:%M:%S",
                        format="[%(asctime)s.%(msecs)03d] douane recording writer "
                               f"(pid {os.getpid()}): %(message)s")
    writer = _Writer(settings, healthy, shared)
    try:
        while True:
            if writer.rows and (writer.overdue() or not receiver.poll(BATCH_GAP)):
                writer.commit()  # before blocking: the index is never behind for long
            try:
                burst = receiver.recv()
                while burst is not None:  # what the pipe holds now, then a pause
                    for item in burst:
                        writer.write(item)
                    if not receiver.poll():
                        break
                    burst = receiver.recv()
            except EOFError:
                logger.error("douane: the gateway is gone; what it sent is written")
                break
            finally:
                writer.flush()
            if burst is None:
                break
            time.sleep(GATHER_SECONDS)
    finally:
        writer.close()


class _Writer:
    def __init__(self, settings: RecordingSettings, healthy: Any,
                 shared: SharedIndex | None = None):
        self.settings, self.healthy, self.shared = settings, healthy, shared
        self.key = originals.public_key(settings.originals_key) \
            if settings.originals_key else None
        self.files: OrderedDict[str, IO[bytes]] = OrderedDict()  # by relative path, least
        # recently used first
        self.db: Any = None  # sqlite3, or psycopg with a shared store
        self.rows: list[tuple] = []  # index rows (`index.state_row`) not yet committed
        # per session file, its flows written since the last flush: (state, record, sealed)
        self.pending: dict[str, list[tuple[dict, bytes, bytes | None]]] = {}
        self.pending_bytes = 0
        self.connections: dict[int, bytes] = {}  # serial -> serialised state (see CONNECTIONS)
        self.serial = 0
        self.since = 0.0  # when the oldest uncommitted row was written
        self.last_ok = True
        self.indexer = _SharedIndexer(shared) if shared else None
        if self.indexer:  # the files are the record; rows wait (bounded) while the store is down
            healthy.value = 1
            return
        try:
            self.db = index.connect(settings.index_path)
            healthy.value = 1
        except Exception:
            healthy.value = 0
            logger.exception("douane: cannot open the recordings index %s", settings.index_path)

    def write(self, item: Item) -> None:
        """The flow serialised and held for its session file: written with the others of this
        pass (`flush`), one write a file, not one a flow."""
        relative, snapshot, scrub, original, streamed, prompted, clean = item
        try:
            connections = {name: self.connection(snapshot[name]) for name in CONNECTIONS}
            state = recording_of(snapshot, scrub, streamed, prompted, clean)
            data = tnetstring_of(state, connections)
            sealed = originals.seal(self.key, state["id"],
                                    state["metadata"]["douane"].get("decision_id"), original) \
                if original is not None and self.key is not None else None
        except Exception:
            self.healthy.value = 0
            self.last_ok = False
            logger.exception("douane: cannot record flow %s to %s", snapshot.get("id"), relative)
            return
        self.pending.setdefault(relative, []).append((state, data, sealed))
        self.pending_bytes += len(data)
        if self.pending_bytes >= PENDING_BYTES:
            self.flush()

    def flush(self) -> None:
        """What `write` holds, to its files (flushed: a crash of the writer loses at most one
        pass), each flow's row to the index's next commit. A failed write (a full disk) cuts the
        file back to its last whole flow, so the flows written after it stay readable."""
        pending, self.pending, self.pending_bytes = self.pending, {}, 0
        for relative, flows in pending.items():
            offset = None
            try:
                f = self.file(relative)
                offset = f.tell()
                f.write(b"".join(data for _, data, _ in flows))
                f.flush()
                sealed = [s for _, _, s in flows if s is not None]
                if sealed:
                    with (self.settings.dir / relative).with_suffix(originals.SUFFIX) \
                            .open("ab") as out:
                        out.write(b"".join(sealed))
            except Exception:
                self.failed(relative, offset)
                logger.exception("douane: cannot record %d flow(s) (the first %s) to %s",
                                 len(flows), flows[0][0]["id"], relative)
                continue
            if not self.rows:
                self.since = time.monotonic()
            for state, data, _ in flows:
                if self.shared:
                    self.rows.append(index.state_row(
                        state, str(Path(self.shared.folder) / relative), offset,
                        self.shared.replica))
                else:
                    self.rows.append(index.state_row(state, relative, offset))
                offset += len(data)
            self.last_ok = True

    def connection(self, state: dict | int) -> bytes:
        """A connection's serialised state: sent now, or by the serial of an earlier flow's."""
        if isinstance(state, int):
            return self.connections[state]
        data = self.connections[self.serial] = tnetstring_of(state)
        self.connections.pop(self.serial - CONNECTION_STATES, None)
        self.serial += 1
        return data

    def file(self, relative: str) -> IO[bytes]:
        """The session file, kept open; reopened if `douane sessions prune` deleted it."""
        f = self.files.pop(relative, None)
        if f is not None and os.fstat(f.fileno()).st_nlink == 0:
            f.close()
            f = None
        if f is None:
            path = self.settings.dir / relative
            try:
                f = path.open("ab")
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = path.open("ab")
            if len(self.files) >= OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files[relative] = f
        return f

    def failed(self, relative: str, offset: int | None) -> None:
        """A failed write: the file is closed and cut back to `offset`."""
        self.healthy.value = 0
        self.last_ok = False
        f = self.files.pop(relative, None)
        try:
            if f is not None:
                f.close()
        except OSError:
            pass  # the rest of its buffer could not be written either: cut below
        if offset is not None:
            try:
                os.truncate(self.settings.dir / relative, offset)
            except OSError:
                logger.exception("douane: cannot cut %s back to its last whole flow", relative)

    def overdue(self) -> bool:
        return len(self.rows) >= BATCH_ROWS or \
            bool(self.rows) and time.monotonic() - self.since >= BATCH_SECONDS

    def commit(self) -> None:
        self.flush()
        if self.indexer:
            self.indexer.put(self.rows)
            self.rows = []
            return
        rows, self.rows = self.rows, []
        try:
            self.db = self.db or index.connect(self.settings.index_path)
            index.insert_rows(self.db, rows)
        except Exception:
            self.healthy.value = 0
            logger.exception("douane: cannot record flow %s to the index (`douane sessions "
                             "reindex` restores it from the files)",
                             ", ".join(r[0] for r in rows))
            if self.db is not None:
                self.db.close()
                self.db = None
            return
        if self.last_ok:
            self.healthy.value = 1

    def close(self) -> None:
        self.flush()
        if self.rows:
            self.commit()
        if self.indexer:
            self.indexer.close()
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                logger.exception("douane: cannot close %s", f.name)
        if self.db is not None:
            self.db.close()


class _SharedIndexer:
    """Index rows to the shared store from a thread of the writer's process: a store that is
    down, slow or unreachable never holds up the recordings. Rows wait while it is down (at most
    PENDING_ROWS, then the oldest are dropped: `douane sessions reindex` restores them from the
    files) and are retried every BATCH_SECONDS."""

    def __init__(self, shared: SharedIndex):
        self.shared = shared
        self.rows: list[tuple] = []
        self.dropped = 0
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="douane-index", daemon=True)
        self._thread.start()

    def put(self, rows: list[tuple], front: bool = False) -> None:
        with self._wake:
            self.rows = rows + self.rows if front else self.rows + rows
            if len(self.rows) > PENDING_ROWS:
                self.dropped += len(self.rows) - PENDING_ROWS
                del self.rows[:len(self.rows) - PENDING_ROWS]
            self._wake.notify()

    def close(self, timeout: float = 5) -> None:
        """The rows left are written if the store takes them within `timeout`."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._wake:
            if self.rows:
                logger.error("douane: %d flow(s) not indexed in the shared store (`douane "
                             "sessions reindex` restores them from the files)", len(self.rows))

    def _run(self) -> None:
        db, failing = None, False
        while True:
            with self._wake:
                while not self.rows and not self._closing:
                    self._wake.wait()
                rows, self.rows = self.rows[:BATCH_ROWS], self.rows[BATCH_ROWS:]
                closing = self._closing
            if not rows:
                break
            try:
                db = db or store.connect(self.shared.database, autocommit=True)
                index.insert_rows(db, rows)
            except Exception as e:
                self.put(rows, front=True)
                if db is not None:
                    db.close()
                    db = None
                if not failing:
                    logger.error("douane: cannot index flows in the shared store (%s); kept and "
                                 "retried every %ss", type(e).__name__, BATCH_SECONDS)
                failing = True
                if closing:
                    break
                time.sleep(BATCH_SECONDS)
                continue
            if failing:
                logger.info("douane: the shared store indexes flows again (%d dropped meanwhile)",
                            self.dropped)
            failing = False
        if db is not None:
            db.close()
