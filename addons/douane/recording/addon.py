"""`Record`: every flow through douane, whatever was decided, written to
`recordings/<user>/<yyyy-mm-dd>/<session>.mitm` with mitmproxy's own FlowWriter, and indexed.

What is written is what crossed the wire after masking, scrubbed of credentials (a copy is
scrubbed; the live flow is untouched): credential headers replaced, and every secret the policy's
detectors find in the bodies replaced by a `<SECRET:rule id>` marker. The event loop takes only a
snapshot of the flow; a writer process (`writer`), handed the flows a burst at a time
(`bursts.WINDOW`), does the rest and flushes per flow, so a crash loses at most the flows in flight
and those of the last window. Streamed answers are recorded as delivered (the Inspect addon
turns on `store_streamed_bodies`). Flows read back (`-r`) or replayed are not recorded again.
When configured, the unmasked originals are sealed for auditors beside it (`originals`).

A WebSocket is recorded as its upgrade (at the 101), then its messages in parts: mitmproxy keeps
every message of a connection in the flow until it ends, so past `WS_MESSAGES` messages or
`WS_BYTES` bytes the messages held are handed to the writer as a flow of their own (the
upgrade's metadata, an id derived from its own, `websocket_part` numbering them) and let go; the
rest at the end. While the writer is congested under `on_error: refuse`, the part is still
written and the session is closed (`flow.error`: `douane.websocket` closes both connections);
under `on_error: continue`, or without a recording, the messages are let go unrecorded.
"""

from __future__ import annotations

import asyncio
import collections.abc
import copy
import dataclasses
import enum
import functools
import logging
import time
import types
import typing
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Container
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy import connection, exceptions, http, version
from mitmproxy.flow import Error as FlowError

from douane import headerfields, untrusted
from douane.flowstate import Reason, peek, publish, state
from douane.interaction import Interaction
from douane.policy.addon import large
from douane.protocols import streams
from douane.recording import originals
from douane.recording.config import RecordingSettings
from douane.recording.writer import RecordingWriter, SharedIndex, parts_read, texts_read
from douane.refusals import refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)

WS_MESSAGES = 1000  # WebSocket messages held in a flow before they are written as a part
WS_BYTES = 8 * 1024**2  # ... or bytes of their content
ISSUED_SESSIONS = 100_000  # MCP session ids issued by upstreams, remembered (the latest)
MCP_SESSION = b"mcp-session-id"
SCRUB_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "cookie", "set-cookie",
                 "x-goog-api-key", "api-key")


def credential_headers(flow: http.HTTPFlow, extra: tuple[str, ...]) -> frozenset[str]:
    """The header names to scrub from this flow: the usual ones, the configured ones, and the
    headers carrying its upstream's credential and the one injected."""
    st = peek(flow)
    upstream = st.upstream.credential.header if st and st.upstream and st.upstream.credential \
        else None
    injected = st.credential.header if st and st.credential else None  # a group's or a user's
    return _scrubbed_names(extra, upstream, injected)


@functools.lru_cache(maxsize=256)
def _scrubbed_names(extra: tuple[str, ...], *headers: str | None) -> frozenset[str]:
    """The same few sets for every flow: built once, and one object, which the burst's pickle
    writes once (its memo) for all the flows that share it."""
    return frozenset(SCRUB_HEADERS + extra + tuple(h for h in headers if h))


# A connection's state is half the cost of `flow.get_state()`, and on a keep-alive connection it
# is the same for every flow: it is computed again only when one of the connection's fields has
# been replaced (mitmproxy assigns them; it does not mutate them in place).
_connection_states: weakref.WeakKeyDictionary[connection.Connection, tuple[tuple, dict]] = \
    weakref.WeakKeyDictionary()


def connection_state(conn: connection.Connection) -> dict:
    fields = tuple(vars(conn).values())
    cached = _connection_states.get(conn)
    if cached is None or cached[0] != fields:
        cached = _connection_states[conn] = fields, state_of(conn)
    return cached[1]


class _Unplanned(Exception):
    """A value its field's plan does not take as it is: mitmproxy's `get_state` converts it."""


def state_of(conn: connection.Connection) -> dict:
    """`conn.get_state()` in a tenth of the time (a new connection's, 40 µs each): mitmproxy
    reads each field's type hints anew for every value; here each field's conversion is planned
    once from the same hints (`_plan`). A value of another type than the plan's, or a class
    it cannot plan, takes mitmproxy's own path."""
    plan = _plan(type(conn))
    if plan is None:
        return conn.get_state()
    try:
        return {name: convert(getattr(conn, name)) for name, convert in plan}
    except _Unplanned:
        return conn.get_state()


def _plain(kind: type) -> Callable[[Any], Any]:
    accepted = (int, float) if kind in (int, float) else kind  # as mitmproxy checks them

    def plain(value: Any) -> Any:
        if isinstance(value, accepted):
            return kind(value)
        raise _Unplanned  # (mitmproxy's ValueError)
    return plain


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, Callable[[Any], Any]], ...] | None:
    """Each serialised field of a mitmproxy dataclass and how its value becomes its state, in
    `SerializableDataclass._process`'s order of cases."""
    try:
        hints = typing.get_type_hints(cls)
        return tuple((f.name, _convert(hints[f.name], f.name)) for f in dataclasses.fields(cls)
                     if f.metadata.get("serialize", True) is not False)
    except (TypeError, NameError, KeyError, _Unplanned):
        return None


def _convert(kind: Any, name: str) -> Callable[[Any], Any]:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        allowed = frozenset(args)

        def literal(value: Any) -> Any:
            if type(value) is str and value in allowed:
                return value
            raise _Unplanned
        return literal
    if origin in (types.UnionType, typing.Union):
        if len(args) != 2 or args[1] is not types.NoneType:
            raise _Unplanned
        inner = _convert(args[0], name)
        return lambda value: None if value is None else inner(value)
    if hasattr(kind, "get_state"):
        return lambda value: value.get_state()
    if origin in (list, collections.abc.Sequence):
        item = _convert(args[0], name)
        return lambda value: [item(v) for v in value]
    if origin is tuple:
        # mitmproxy's own reading of an address (2 or 4 items)
        parts = tuple(_convert(k, name) for k in
                      ((str, int, int, int) if name in ("peername", "sockname") else args))

        def pair(value: Any) -> Any:
            if type(value) is not tuple or len(value) > len(parts) or \
                    len(value) != len(parts) and name not in ("peername", "sockname"):
                raise _Unplanned
            return tuple(p(v) for p, v in zip(parts, value, strict=False))
        return pair
    if kind in (str, bytes, bool, int, float):
        return _plain(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return lambda value: value.value
    raise _Unplanned


def snapshot(flow: http.HTTPFlow) -> dict:
    """`flow.get_state()` with cached connection states and no backup (an earlier, unscrubbed
    request); a test holds it equal to mitmproxy's. The event loop's whole share of recording."""
    return {
        "version": version.FLOW_FORMAT_VERSION, "type": flow.type, "id": flow.id,
        "error": flow.error.get_state() if flow.error else None,
        "client_conn": connection_state(flow.client_conn),
        "server_conn": connection_state(flow.server_conn),
        "intercepted": flow.intercepted, "is_replay": flow.is_replay, "marked": flow.marked,
        "metadata": _metadata(flow.metadata), "comment": flow.comment,
        "timestamp_created": flow.timestamp_created, "backup": None,
        "request": flow.request.get_state(),
        "response": flow.response.get_state() if flow.response else None,
        "websocket": flow.websocket.get_state() if flow.websocket else None,
    }


def _metadata(metadata: dict) -> dict:
    """The flow's metadata as it is now. douane's summary is copied at its top level only (the
    latency and a WebSocket part's number are set on it): `publish` builds its parts afresh for
    each flow and a later one replaces them whole, never edits them. The rest is deep-copied."""
    return {k: dict(v) if k == "douane" and type(v) is dict else _copied(v)
            for k, v in metadata.items()}


def _copied(value: Any) -> Any:
    """A deep copy of JSON-like metadata (what recordings can hold), a third of `deepcopy`'s
    cost; anything else another addon put there is deep-copied as before."""
    kind = type(value)
    if kind is dict:
        return {k: _copied(v) for k, v in value.items()}
    if kind is list:
        return [_copied(v) for v in value]
    if kind in (str, int, float, bool, bytes) or value is None:
        return value
    return copy.deepcopy(value)


@functools.lru_cache(maxsize=1024)
def _user_folder(user: str) -> str:
    return untrusted.slug(user)


def session_path(flow: http.HTTPFlow, settings: RecordingSettings,
                 issued: Container[str] = ()) -> Path:
    """`issued`: the MCP session ids upstreams issued; a made-up one names no file (a client
    could otherwise make one file per request)."""
    return Path(session_file(flow, settings, issued))


def session_file(flow: http.HTTPFlow, settings: RecordingSettings,
                 issued: Container[str] = ()) -> str:
    """`session_path` as the writer takes it (a string)."""
    st = state(flow)
    # one folder per exact user name (a slug and a hash: no two users share one), no separators
    user = _user_folder(st.identity.user) if st.identity else "anonymous"
    day, second = divmod(int(flow.request.timestamp_start), 86400)  # UTC
    mcp_session = headerfields.get(flow.request.headers, MCP_SESSION)
    if mcp_session and mcp_session in issued:
        session = "mcp-" + untrusted.slug(mcp_session, 32)
    elif settings.session == "window":
        minute = second // 60
        session = f"window-{minute // settings.window_minutes * settings.window_minutes:04d}"
    else:
        session = f"conn-{flow.client_conn.id[:8]}"
    return _session_file(user, day, session)


@functools.lru_cache(maxsize=1024)
def _session_file(user: str, day: int, session: str) -> str:
    """The same few files for every flow: built once, and one string, which the burst's pickle
    writes once for all its flows. (`user` and `session` are single names: a slug and douane's
    own prefixes.)"""
    return f"{user}/{_date(day)}/{session}.mitm"


@functools.lru_cache(maxsize=64)
def _date(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


def _read(it: Interaction, rewritten: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the writer checks for secrets split across an answer's and a request's texts."""
    return texts_read(it, rewritten), parts_read(it)


class Record:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.recording: RecordingSettings | None = None
        self.writer: RecordingWriter | None = None
        self.shared: SharedIndex | None = None
        self.issued: OrderedDict[str, None] = OrderedDict()
        # per WebSocket flow id: (parts written, bytes of the messages held)
        self.ws_held: dict[str, tuple[int, int]] = {}

    def configure(self, updated: set[str]) -> None:
        if "douane_config" not in updated and self.writer is not None:
            return
        config = self.settings.config
        recording = config.sections.get("recording")
        shared = SharedIndex(config.database, config.replica, config.worker) \
            if config.database else None
        if (recording, shared) == (self.recording, self.shared) and (self.writer or not recording):
            return
        if self.writer:
            self.writer.close()
            self.writer = None
        self.recording, self.shared = recording, shared  # without a writer: on_error
        if recording:
            try:
                self.writer = RecordingWriter(recording, shared)
            except RuntimeError as e:
                raise exceptions.OptionsError(f"douane: {e}") from None

    def done(self) -> None:
        if self.writer:
            self.writer.close()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Fail closed by default: while recordings cannot be written, traffic is refused.
        if self.recording and self.recording.on_error == "refuse" and \
                (self.writer is None or not self.writer.healthy) and \
                not flow.response and flow.live:
            refuse(flow, 503, "douane cannot write its recordings and refuses traffic until it "
                   "can", "recording_unavailable",
                   Reason("recording.unavailable", "recordings not writable"))

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            await self._record(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket
        messages = flow.websocket.messages
        parts, held = self.ws_held.get(flow.id, (0, 0))
        held += len(messages[-1].content)
        self.ws_held[flow.id] = parts, held
        # the earlier messages are settled (the one at hand may still be dropped)
        if (len(messages) > WS_MESSAGES or held > WS_BYTES) and \
                not self._write_messages(flow, len(messages) - 1):
            messages[-1].drop()  # not recorded, not delivered
            flow.error = FlowError("douane: the recording writer cannot keep up; the WebSocket "
                                   "is closed")
            logger.warning("douane: WebSocket closed (decision %s): the recording writer cannot "
                           "keep up", flow.metadata.get("douane", {}).get("decision_id"))

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket
        if flow.websocket.messages:
            self._write_messages(flow, len(flow.websocket.messages))
        self.ws_held.pop(flow.id, None)

    def _write_messages(self, flow: http.HTTPFlow, count: int) -> bool:
        """Hand a WebSocket's first `count` messages to the writer and let them go; False when
        the writer is congested under `on_error: refuse` (they are written all the same)."""
        assert flow.websocket
        held, rest = flow.websocket.messages[:count], flow.websocket.messages[count:]
        parts, _ = self.ws_held.get(flow.id, (0, 0))
        self.ws_held[flow.id] = parts + 1, sum(len(m.content) for m in rest)
        st = peek(flow)
        if self.writer is None or self.recording is None or st is None or \
                not flow.metadata.get("douane_recorded") or \
                (self.writer.congested and self.recording.on_error == "continue"):
            flow.websocket.messages = rest  # nothing records them (the upgrade was not)
            return True
        flow.websocket.messages = held
        part = snapshot(flow)
        flow.websocket.messages = rest
        part["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"douane:{flow.id}/{parts + 1}"))
        part["metadata"].setdefault("douane", {})["websocket_part"] = parts + 1
        self.writer.put(session_file(flow, self.recording, self.issued), part,
                        credential_headers(flow, self.recording.scrub_headers))
        return not self.writer.congested

    async def _record(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if self.writer is None or self.recording is None or st is None or \
                flow.metadata.get("douane_recorded"):
            return  # not a live flow of this gateway, or already written
        if self.writer.congested and (self.recording.on_error == "continue" or (
                st.decision and any(r.rule == "recording.unavailable"
                                    for r in st.decision.reasons))):
            # unrecorded as configured, or refused for it (audited): nothing piles up meanwhile
            return
        if not st.audited:  # else the audit trail published it, just before in this event
            publish(flow)
        flow.metadata["douane"]["latency_ms"] = round((time.monotonic() - st.started) * 1000, 3)
        decision = flow.metadata["douane"].get("decision", {}).get("action", "allow")
        flow.comment = f"douane {decision}: " + "; ".join(
            r["message"] for r in flow.metadata["douane"].get("decision", {}).get("reasons", []))
        flow.metadata["douane_recorded"] = True
        original = originals.take(flow)
        # the answer's texts as read (a stream's as delivered) and the request's parts read
        # together, checked by the writer; joined and scanned in a thread when they are as large
        # as the policy's own matching in a thread (4,000 messages held the loop ~19 ms)
        it, streamed, prompted = st.interaction, (), ()
        if it is not None:
            rewritten = streams.rewriter_of(flow) is not None
            if large(it.texts) or large(it.response_texts):
                streamed, prompted = await asyncio.to_thread(_read, it, rewritten)
            else:
                streamed, prompted = _read(it, rewritten)
        # the texts the policy found no secret in, as it read them: not scanned again
        clean = frozenset(p.secret_free for p in (*it.texts, *it.response_texts)
                          if p.secret_free is not None) if it else frozenset()
        issued = headerfields.get(flow.response.headers, MCP_SESSION) if flow.response else None
        if issued:
            self.issued[issued] = None
            self.issued.move_to_end(issued)
            if len(self.issued) > ISSUED_SESSIONS:
                self.issued.popitem(last=False)
        self.writer.put(session_file(flow, self.recording, self.issued), snapshot(flow),
                        credential_headers(flow, self.recording.scrub_headers),
                        original if st.masked else None, streamed, prompted, clean)
