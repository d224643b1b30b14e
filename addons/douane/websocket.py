"""`PoliceWebSocket`: on an upstream that allows WebSockets (`allow_websocket: true`, e.g. the OpenAI
Realtime API), every message passes the same grants, deny rules and detectors as an HTTP body, in
both directions.

A message is read as a body is (`fields.cover`: every string and key, files decoded, files and
images by URL are media); audio is media, never text. Each direction keeps the last characters of
its text per kind, matched with the next message's: a phrase split across two messages (two
prompts, two answer deltas) is caught where it completes. A client message is also held to the
caller's grant: the tools, hosted tools and remote MCP servers a `session.update` or
`response.create` offers the model, its model (the upgrade's `?model=` is checked by `Enforce`),
and media.

A message that cannot be inspected (binary, or text that is not JSON) or that the policy blocks is
not delivered: the client gets an `error` event in the Realtime API's shape naming the decision id,
the event is audited, and every later message of that connection is dropped (mitmproxy cannot
close a WebSocket from an addon, so the connection is left with nothing passing through it).
A message cannot be held for an approver: at the hold threshold it is blocked. An upstream that
sends nothing for `answer_silence` seconds after a client's message ends the session the same
way (`upstream.timeout`), both connections closed; so does one silent as long between two events
of a Realtime response it has started (`response.created` until `response.done`: its first event
answered the client, the rest is still owed). A session in which neither side sends anything for
`websocket_idle` seconds is ended alike (`timeout.websocket_idle`), below mitmproxy's own
`tcp_timeout`, which would close it with no answer and no record; a ping is no message (mitmproxy
answers it below the hooks): pings alone do not keep a session open. However busy, a session
lasts at most `websocket_session` seconds (`timeout.websocket_session`) and carries at most
`websocket_messages` messages both ways (`limit.websocket_messages`): another protocol's
upstream than Realtime's is followed by no response clock, and a steady stream would otherwise
hold its connection, its state and an org credential's session for ever.

A Realtime session's items are its own: a client event naming an item by id (`item_id` of
`conversation.item.retrieve` / `.delete` / `.truncate`, `previous_item_id`, an `item_reference` in
`response.input`) must name one this session was given (an `item` the upstream sent, or one the
client created with its id); another id (another session's, a guess) is refused
(`owner.realtime_item`). A session keeps its latest `SESSION_ITEMS` ids.

Why this touches mitmproxy: mitmproxy 12.2 joins a message's frames until its last one, however
many (300 MiB of frames that never finish grew the gateway by as much), before any hook can see
the message. Its WebSocket layer is wrapped (checked against its version and source at start,
like `protocols.streamwait`): past mitmproxy's `body_size_limit` (which douane sets from its own
limits) of one message, or once a hook has set the flow's error (`recording.addon.Record`: the
recording writer cannot keep up), both connections are closed and the flow ends with an error. No
compression is negotiated (`routing.Broker` drops the client's offer): mitmproxy would inflate a
message whole.

mitmproxy also reads a connection without backpressure while a layer waits for a hook: every
message's hook pauses the WebSocket layer, and what both peers send meanwhile is queued in memory
(`Layer._paused_event_queue`) until the hooks catch up. A peer sending faster than its messages are
policed (a test client running ahead of its answers: +20 KB per 64 KiB message, 85 MB after 4,000)
grew the gateway without bound. Past `READ_AHEAD` bytes queued, both connections stop being read
until the queue is down to a quarter of it (TCP then slows the peer down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.flow import Error as FlowError
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.websocket import WebsocketEndHook, WebsocketLayer
from mitmproxy.utils import human

from douane import inspect, protocols
from douane.audit import AuditTrail, flow_record
from douane.flowstate import FlowState, Reason, peek
from douane.interaction import Interaction, JsonPath, Kind, Role, TextPiece
from douane.policy import engine
from douane.policy.addon import Enforce, explain, large
from douane.protocols import fields, mitmpatch, openai, streams
from douane.untrusted import loggable

logger = logging.getLogger(__name__)

TAIL = 2048  # characters of a direction's earlier text, per kind, matched with each message
READ_AHEAD = 1 << 20  # bytes read and queued ahead of the messages being policed, at most
SESSION_ITEMS = 4096  # item ids a Realtime session keeps (its oldest are forgotten)
RESPONSES = 64  # Realtime responses under way a session follows (its oldest are forgotten)
ITEM_ID_CHARS = 200  # a longer id is kept by no session
# an upstream message holding the credential douane sent it (whole, or completing it after the
# text of its earlier messages): dropped, the session ended
_ECHO = Reason("upstream.credential_echo", "the upstream sent the credential douane sent it")
NAMING_ITEMS = ("item_id", "previous_item_id")  # fields of a client event naming an item
EXPECTED = {"relay_messages":
            "2d451252c7287da0d392ab91ede1d881954ad2fa101513e1857db9492b4582ca",
            "handle_event": "fd88b0fb09ceddbb1915fe0d588c206e8310d6883a77048a665675e49e43de2b"}

_relay_messages = WebsocketLayer.relay_messages
_handle_event = layer.Layer.handle_event  # (it queues an event while the layer waits)
_not_read: weakref.WeakSet[WebsocketLayer] = weakref.WeakSet()  # layers whose reading douane paused


def _relay_bounded(self: WebsocketLayer, event: events.Event) -> layer.CommandGenerator[None]:
    yield from _relay_messages(self, event)
    for ws in (self.client_ws, self.server_ws):
        # mitmproxy appends each piece of a frame to its frame so far (`frame_buf[-1] += data`):
        # as bytes, a copy of all of it per piece (a 4 MB message read in 64 KB pieces copied
        # ~130 MB on the loop, its passes' CPU growing with the message); a bytearray grows in
        # place. (`b"".join`, `len` and the Fragmentizer read either.)
        if type(ws.frame_buf[-1]) is bytes:
            ws.frame_buf[-1] = bytearray(ws.frame_buf[-1])
    limit = human.parse_size(self.context.options.body_size_limit)
    too_large = limit is not None and \
        any(sum(map(len, ws.frame_buf)) > limit for ws in (self.client_ws, self.server_ws))
    # a hook that set an error (`Record`: the recording cannot keep up) ends the connection too
    if getattr(self._handle_event, "__func__", None) is not _relay_bounded or \
            not (too_large or self.flow.error):
        return
    assert self.flow.websocket
    if too_large:
        self.flow.error = FlowError(f"douane: a WebSocket message exceeds {limit} bytes")
    for ws in (self.client_ws, self.server_ws):
        ws.frame_buf = [b""]
        yield commands.CloseConnection(ws.conn)
    yield WebsocketEndHook(self.flow)
    self.flow.live = False
    self._handle_event = self.done


def _handle_event_paced(self: WebsocketLayer, event: events.Event
                        ) -> layer.CommandGenerator[None]:
    yield from _handle_event(self, event)
    if self._paused_event_queue or self in _not_read:
        _pace(self)


def _pace(self: WebsocketLayer) -> None:
    """Stop reading both peers while more than `READ_AHEAD` bytes wait for the layer (it waits
    for a message's hook); read again once a quarter of it is left. Called after each event the
    layer is given (each one queued, each hook's end that drains the queue)."""
    queued = sum(len(e.data) for e in self._paused_event_queue
                 if isinstance(e, events.DataReceived))
    if queued > READ_AHEAD:
        _not_read.add(self)
        for reader, transport in _transports(self):
            transport.pause_reading()
            # a reader that paused its transport itself (its buffer full) resumes it on its
            # next read: it now leaves that to douane (and pauses again when it must)
            reader._paused = False
    elif self in _not_read and queued <= READ_AHEAD // 4:
        _not_read.discard(self)
        for _, transport in _transports(self):
            transport.resume_reading()


def _transports(self: WebsocketLayer) -> list[tuple[asyncio.StreamReader, asyncio.Transport]]:
    """The layer's two TCP connections' readers and transports (a connection of mitmproxy's Rust
    modes has neither)."""
    handler = ctx.master.addons.get("proxyserver").connections.get(self.context.client.id)
    ios = [handler.transports.get(conn) for conn in (self.context.client, self.context.server)] \
        if handler else []
    return [(io.reader, io.writer.transport) for io in ios
            if io and isinstance(io.reader, asyncio.StreamReader)
            and isinstance(getattr(io.writer, "transport", None), asyncio.Transport)]


def install() -> None:
    """Wrap mitmproxy's WebSocket relay (once); ValueError when this mitmproxy is not the one the
    wrap was written for."""
    mitmpatch.check("WebSockets need", "it buffers a message, and what peers send while a hook "
                    "runs, without bound",
                    {"relay_messages": _relay_messages, "handle_event": _handle_event}, EXPECTED)
    WebsocketLayer.relay_messages = _relay_bounded  # type: ignore[method-assign]
    WebsocketLayer.handle_event = _handle_event_paced  # type: ignore[method-assign]


def _audio(doc: Any, depth: int = 0) -> bool:
    """Whether the event carries audio (base64 in `audio`, or an audio event's `delta`): media,
    taken out of `doc` so that it is never read as text."""
    if depth > fields.MAX_DEPTH:
        raise protocols.ProtocolError(400, "too_deep", "a WebSocket message nests deeper than "
                                      f"{fields.MAX_DEPTH} levels")
    if isinstance(doc, list):
        return any([_audio(v, depth + 1) for v in doc])
    if not isinstance(doc, dict):
        return False
    kind = doc.get("type")
    found = isinstance(kind, str) and "audio" in kind and "transcript" not in kind and \
        doc.pop("delta", None) is not None
    if isinstance(doc.get("audio"), str):
        found = bool(doc.pop("audio")) or found
    return any([_audio(v, depth + 1) for v in doc.values()]) or found


def _classify(doc: Any, from_client: bool) -> fields.Classify:
    """What a model reads each string as: tool definitions, call arguments, call outputs, or the
    prompt (from the client) and the answer (from the upstream)."""
    event = doc if isinstance(doc, dict) else {}
    item = event.get("item") if isinstance(event.get("item"), dict) else {}
    names = f"{event.get('type')} {item.get('type')}"
    whole: tuple[Kind, Role | None] = (
        ("tool_result", "tool") if "_output" in names else
        ("tool_arguments", "assistant") if "function_call" in names else
        ("prompt", "user") if from_client else ("completion", "assistant"))

    def classify(path: JsonPath) -> tuple[Kind, Role | None]:
        return ("tool_description", None) if path[1:2] == ("tools",) else whole
    return classify


def read_message(content: bytes, from_client: bool) -> tuple[Interaction, Any]:
    """One message read as a request (from the client) or an answer, and its document (audio
    taken out); ProtocolError when douane cannot read it whole."""
    doc = protocols.loads(content, "WebSocket message")
    it = Interaction("openai", "realtime")
    speaks = False
    if from_client and isinstance(doc, dict):
        for holder in ("session", "response"):
            spec = doc.get(holder)
            if isinstance(spec, dict):
                if spec.get("prompt") is not None:  # as in a Responses request's body
                    raise protocols.ProtocolError(403, "stored_prompt", openai.STORED_PROMPT)
                openai.offered_tools(it, spec, chat=False)
                if isinstance(spec.get("model"), str):
                    it.model = spec["model"]
                modalities = spec.get("output_modalities", spec.get("modalities"))
                speaks = speaks or isinstance(modalities, list) and "audio" in modalities
    it.has_media = from_client and (_audio(doc) or speaks)  # answers in speech are media too
    fields.cover(it, doc, _classify(doc, from_client), "request" if from_client else "response")
    return it, doc


def _named_items(event: dict[str, Any]) -> list[tuple[str, Any]]:
    """The items a client event names by id: (where, id)."""
    named = [(f, event[f]) for f in NAMING_ITEMS if event.get(f) is not None]
    response = event.get("response")
    inputs = response.get("input") if isinstance(response, dict) else None
    named += [(f"response.input[{i}].id", item.get("id"))
              for i, item in enumerate(inputs if isinstance(inputs, list) else [])
              if isinstance(item, dict) and item.get("type") == "item_reference"]
    # `root`: the start of the conversation
    return [(where, i) for where, i in named if (where, i) != ("previous_item_id", "root")]


class PoliceWebSocket:
    def __init__(self, enforce: Enforce, audit_trail: AuditTrail):
        self.enforce = enforce
        self.audit_trail = audit_trail
        self.cut: set[str] = set()  # ids of flows whose later messages are all dropped
        # per flow: (from the client, kind) -> the last TAIL characters of that text
        self.earlier: dict[str, dict[tuple[bool, Kind], str]] = {}
        self.items: dict[str, dict[str, None]] = {}  # per flow: its session's item ids, in order
        # per flow: the end of the upstream's text so far that may begin the credential sent
        # (delivered: the message it ended was not a delta douane can hold text of)
        self.echo_tails: dict[str, str] = {}
        # per flow: the end of the upstream's last delta that may begin the credential sent,
        # held back (not delivered), and that delta's event (to deliver it in if no delta follows)
        self.echo_held: dict[str, tuple[str, dict[str, Any]]] = {}
        self._holding: dict[str, str] = {}  # per flow: what `_echoed` found its delta ends with
        # per flow: since when a client message the upstream received waits for any message back
        # (or a Realtime response the upstream started waits for its next event)
        self.waiting: dict[str, tuple[http.HTTPFlow, float]] = {}
        # per flow: the Realtime responses its upstream started and has not ended (by id; out
        # of band ones overlap the conversation's), at most `RESPONSES`
        self.responding: dict[str, dict[str, None]] = {}
        self.last: dict[str, tuple[http.HTTPFlow, float]] = {}  # per flow: its latest message
        self.opened: dict[str, float] = {}  # per flow: when its session started
        self.messages: dict[str, int] = {}  # per flow: the messages it carried, both ways
        self._task: asyncio.Task[None] | None = None

    def configure(self, updated: set[str]) -> None:
        try:
            install()
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    async def _watch(self) -> None:
        """An upstream silent past `answer_silence` seconds after a client's message (mitmproxy's
        own limit is `tcp_timeout`, 630 s of silence on both sides) ends the session: the client
        gets the API's error event, the session's record says `upstream.timeout`."""
        while True:
            await asyncio.sleep(1)
            try:
                self._late(time.monotonic())
            except Exception:  # the watchdog must outlive any one session's oddity
                logger.exception("douane: the WebSocket answer watchdog failed a check")

    def _late(self, now: float) -> None:
        limits = self.enforce.settings.config.limits
        silence, idle = limits.answer_silence_timeout, limits.websocket_idle_timeout
        longest, most = limits.websocket_session_timeout, limits.websocket_messages
        for flow_id, (flow, since) in list(self.last.items()):
            if not flow.live or flow.error or flow_id in self.cut:
                del self.last[flow_id]
                continue
            if self.messages.get(flow_id, 0) > most:
                reason, code = Reason("limit.websocket_messages", f"the session carried {most} "
                                      "messages, douane's most: it is closed"), \
                    "session_message_limit"
            elif now - since > idle:
                reason, code = Reason("timeout.websocket_idle", f"no message either way for "
                                      f"{idle} s: the session is closed"), "session_idle"
            elif now - self.opened.get(flow_id, now) > longest:
                reason, code = Reason("timeout.websocket_session", f"the session lasted "
                                      f"{longest} s, douane's longest: it is closed"), \
                    "session_expired"
            else:
                continue
            del self.last[flow_id]
            flow.error = FlowError(f"douane: {reason.message}")
            self._cut(flow, reason, code, "error")
        for flow_id, (flow, since) in list(self.waiting.items()):
            if not flow.live or flow.error or flow_id in self.cut:
                del self.waiting[flow_id]
            elif now - since > silence:
                del self.waiting[flow_id]
                message = f"the upstream sent nothing within {silence} s of " + (
                    "its last event of a response it started" if flow_id in self.responding
                    else "the client's message")
                # the layer closes both connections once the error event is relayed
                flow.error = FlowError(f"douane: {message}")
                self._cut(flow, Reason("upstream.timeout", message), "upstream_timeout", "error")

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if st is None or st.upstream is None or flow.websocket is None:
            return  # not a flow of this gateway (read back, replayed) or not governed
        message = flow.websocket.messages[-1]
        if message.injected:
            return  # douane's own error event
        if flow.id in self.cut:
            message.drop()
            return
        now = time.monotonic()
        self.last[flow.id] = (flow, now)
        count = self.messages[flow.id] = self.messages.get(flow.id, 0) + 1
        if count > self.enforce.settings.config.limits.websocket_messages:
            message.drop()  # and every later one, until the watchdog ends the session (a flow
            return  # error set in a hook closes it before the error event could be relayed)
        event_type = response_id = None
        try:
            reason, event_type, response_id = await self._verdict(
                flow.id, st, message.is_text, message.content, message.from_client)
        except Exception as e:  # fail closed: an error in policy stops the connection
            logger.error("douane: WebSocket policy failed (decision %s): %s", st.decision_id,
                         loggable(repr(e)))
            reason = Reason("gateway.error",
                            f"douane could not evaluate a message ({type(e).__name__})")
        if reason is _ECHO:
            message.drop()
            self.echo_held.pop(flow.id, None)  # (never delivered)
            self._cut(flow, reason, "upstream_credential_echo", "refuse")
        elif reason is not None:
            message.drop()
            self._holding.pop(flow.id, None)
            self._cut(flow, reason)
        elif not message.from_client:
            self._hold(flow, message)
            self._follow(flow.id, event_type, response_id)
            if flow.id in self.responding:  # the rest of a response is owed: its next event
                self.waiting[flow.id] = (flow, now)
            else:
                self.waiting.pop(flow.id, None)
        elif flow.id not in self.waiting:
            self.waiting[flow.id] = (flow, now)

    def _follow(self, flow_id: str, event_type: str | None, response_id: str) -> None:
        """The Realtime responses under way: started by `response.created`, ended by their
        `response.done` (one without an id, or naming none started, ends the oldest)."""
        started = self.responding.get(flow_id)
        if event_type == "response.created":
            started = self.responding.setdefault(flow_id, {})
            started[response_id] = None
            if len(started) > RESPONSES:
                del started[next(iter(started))]
        elif event_type == "response.done" and started:
            del started[response_id if response_id in started else next(iter(started))]
            if not started:
                del self.responding[flow_id]

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if (st := peek(flow)) is not None and st.upstream is not None:
            self.last[flow.id] = (flow, time.monotonic())  # a session never used is idle too
            self.opened[flow.id] = self.last[flow.id][1]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)
        self.last.pop(flow.id, None)
        self.opened.pop(flow.id, None)
        self.messages.pop(flow.id, None)
        self.responding.pop(flow.id, None)
        self.cut.discard(flow.id)
        self.earlier.pop(flow.id, None)
        self.items.pop(flow.id, None)
        self.echo_tails.pop(flow.id, None)
        self.echo_held.pop(flow.id, None)
        self._holding.pop(flow.id, None)

    async def _verdict(self, flow_id: str, st: FlowState, is_text: bool, content: bytes,
                       from_client: bool) -> tuple[Reason | None, str | None, str]:
        """(None to deliver the message, else the reason it is stopped; its event's type; the
        id of the Realtime response it is part of, "" when it names none)."""
        reason, doc = await self._read(flow_id, st, is_text, content, from_client)
        event = doc if isinstance(doc, dict) else {}
        kind = event.get("type")
        response = event.get("response")
        response_id = response.get("id") if isinstance(response, dict) else None
        return reason, kind if isinstance(kind, str) else None, \
            response_id[:ITEM_ID_CHARS] if isinstance(response_id, str) else ""

    async def _read(self, flow_id: str, st: FlowState, is_text: bool, content: bytes,
                    from_client: bool) -> tuple[Reason | None, Any]:
        if from_client and st.identity and st.identity.expires_at is not None and \
                st.identity.expires_at < time.time():
            # each message is a new prompt: the token of the upgrade does not outlive itself
            return Reason("identity.expired", "the token this session was opened with has "
                          "expired; open a new session"), None
        secret = st.credential.secret if st.credential and not from_client else ""
        if secret and secret.encode("utf-8", "surrogateescape") in content:
            return _ECHO, None
        if not is_text:
            return Reason("protocol.websocket_binary", "binary WebSocket messages cannot be "
                          "inspected"), None
        config = self.enforce.settings.config
        limit = config.body_size_limit if from_client else config.limits.answer_size_limit
        if len(content) > limit:  # parsed and matched on the loop: bounded as a body is
            return Reason("protocol.websocket_too_large", f"a WebSocket message of "
                          f"{len(content)} bytes exceeds douane's limit of {limit} bytes"), None
        try:  # a long message, or one of many values, is parsed and walked in a thread (1 MB
            # of `[{}, {}, ...]` held the loop 1.8 s)
            it, doc = await asyncio.to_thread(read_message, content, from_client) \
                if inspect.many(content) else read_message(content, from_client)
        except protocols.ProtocolError as e:
            return Reason(f"protocol.websocket_{e.code}", e.message), None
        if secret and self._echoed(flow_id, secret, it):
            return _ECHO, doc
        if isinstance(doc, dict) and (reason := self._session_items(flow_id, doc, from_client)):
            return reason, doc
        live = self.enforce.live
        if live is None:
            return None, doc  # no policy configured: nothing to enforce beyond parsing
        policy = live.current
        if from_client and st.identity and st.upstream:
            grant, violations = engine.granting(policy, st.identity, st.upstream.name, it)
            if grant is None:
                return Reason("policy.websocket", f"blocked by policy: "
                              f"{'; '.join(r.message for r in violations)}"), doc
        pieces = it.texts if from_client else it.response_texts
        earlier = self.earlier.setdefault(flow_id, {})
        before = [TextPiece(kind, None, text, ("earlier",), False)
                  for (side, kind), text in earlier.items() if side == from_client]
        read = before + pieces
        # past the policy's size a message's texts are matched in a thread, as a body's are (a
        # 1 MB message held the loop ~0.1 s, one at the 10 MB limit ~1 s)
        reasons = await asyncio.to_thread(engine.risk, policy, read) if large(read) else \
            engine.risk(policy, read)
        decision = engine.decide(policy, reasons, hold_allowed=False)
        if decision.action == "block":
            return Reason("policy.websocket", f"blocked by policy: {explain(decision)}",
                          score=decision.risk), doc
        for piece in pieces:
            if piece.path[:1] != (fields.KEYS,):  # free text only: ids would split a phrase
                key = (from_client, piece.kind)
                earlier[key] = (earlier.get(key, "") + " " + piece.text)[-TAIL:]
        return None, doc

    def _echoed(self, flow_id: str, secret: str, it: Interaction) -> bool:
        """Whether the upstream's text, read on from its earlier messages, now spells the
        credential sent (a model repeating it delta by delta). Of a text delta (an event whose
        one text is its `delta`), the end that may begin the credential is held back from the
        client (`_hold`, as a stream's `EchoGuard` holds it); of another message what came before
        is kept (shorter than the credential) but has been delivered."""
        held, _ = self.echo_held.get(flow_id, ("", None))
        texts = [p for p in it.response_texts if p.path[:1] != (fields.KEYS,)]  # free text
        text = held + self.echo_tails.pop(flow_id, "") + "".join(p.text for p in texts)
        if secret in text:
            return True
        tail = text[-(len(secret) - 1):] if len(secret) > 1 else ""
        tail = tail[streams.start_of(tail, secret):]
        if len(texts) == 1 and texts[0].path == ("delta",):
            self._holding[flow_id] = tail  # (`_hold` edits the message once it is let through)
        elif tail:
            self.echo_tails[flow_id] = tail
        return False

    def _hold(self, flow: http.HTTPFlow, message: Any) -> None:
        """An upstream message let through, its text read by `_echoed`: a delta's end that may
        begin the credential is taken out of it and held; what was held before goes out first,
        at the front of this delta or, when this message is none, as a delta of its own (the
        held one's event with that text) before it."""
        tail = self._holding.pop(flow.id, None)
        held, template = self.echo_held.pop(flow.id, ("", None))
        if tail is None and not held:
            return
        if tail is not None:  # a text delta: what was held leads it, its end that may begin
            doc = json.loads(message.content)  # the credential is held
            text = held + doc["delta"]
            if held or tail:
                doc["delta"] = text[:len(text) - len(tail)]
                message.content = json.dumps(doc).encode()
            if tail:
                self.echo_held[flow.id] = (tail, doc)
            return
        # another message: the held text out first, as a delta of its own, then the message
        # (injected both, in order: an injected message leaves after the one being relayed)
        assert template is not None
        content = message.content
        message.drop()
        inject = ctx.master.commands.call
        inject("inject.websocket", flow, True, json.dumps({**template, "delta": held}).encode(),
               True)
        inject("inject.websocket", flow, True, content, message.is_text)

    def _session_items(self, flow_id: str, event: dict[str, Any], from_client: bool
                       ) -> Reason | None:
        """Refuse a client event naming an item this session was not given; keep the id of an
        item an event carries."""
        items = self.items.setdefault(flow_id, {})
        for where, item_id in _named_items(event) if from_client else []:
            if not isinstance(item_id, str) or item_id not in items:
                return Reason("owner.realtime_item", f"{str(event.get('type'))[:60]} names in "
                              f"{where} an item this session was not given")
        item = event.get("item")
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, str) and len(item_id) <= ITEM_ID_CHARS:
            items[item_id] = None
            if len(items) > SESSION_ITEMS:
                del items[next(iter(items))]
        return None

    def _cut(self, flow: http.HTTPFlow, reason: Reason, code: str = "policy_denied",
             action: str = "block") -> None:
        st = peek(flow)
        assert st is not None
        self.cut.add(flow.id)
        self.earlier.pop(flow.id, None)
        self.items.pop(flow.id, None)
        kind = "server_error" if action == "error" else "invalid_request_error"
        event = {"type": "error", "event_id": st.decision_id, "error": {
            "type": kind, "code": code, "param": None,
            "message": f"{reason.message} (douane decision {st.decision_id})"}}
        ctx.master.commands.call("inject.websocket", flow, True, json.dumps(event).encode(), True)
        record = flow_record(flow, self.enforce.settings.config)
        record.update(event="websocket_message", action=action, reasons=[reason.summary()])
        self.audit_trail.append(record)
        logger.warning("douane: WebSocket to %s stopped (decision %s): %s",
                       st.upstream.name if st.upstream else "?", st.decision_id,
                       loggable(reason.message))
