"""`Record`: every flow through douane, whatever was decided, written to
`recordings/<user>/<yyyy-mm-dd>/<session>.mitm` with mitmproxy's own FlowWriter, and indexed.

What is written is what crossed the wire after masking, scrubbed of credentials (a copy is
scrubbed; the live flow is untouched): credential headers replaced, and every secret the policy's
detectors find in the bodies replaced by a `<SECRET:rule id>` marker (in the writer thread).
Streamed answers are recorded as delivered (the Inspect addon turns on `store_streamed_bodies`). A writer thread does the I/O and flushes per flow, so a crash
loses at most the flow in flight. Flows read back (`-r`) or replayed are not recorded again.
When configured, the unmasked originals are sealed for auditors beside it (`originals`).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from mitmproxy import http, io

from douane import protocols, transcript
from douane.flowstate import Reason, peek, publish, state
from douane.policy import detectors
from douane.protocols import streams
from douane.recording import index, originals
from douane.recording.config import RecordingSettings
from douane.refusals import guarded, refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)

SCRUBBED = "<scrubbed by douane>"
SCRUB_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "cookie", "set-cookie",
                 "x-goog-api-key", "api-key")
UNSAFE = re.compile(r"[^A-Za-z0-9@._+-]")
# One JSON string literal (no raw newline), unrolled: runs of plain characters match in C at
# full speed (the regex holds the GIL, so a multi-megabyte value must not take long).
JSON_STRING = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')


def credential_headers(flow: http.HTTPFlow, extra: tuple[str, ...]) -> frozenset[str]:
    """The header names to scrub from this flow: the usual ones, the configured ones, and the
    header carrying its upstream's injected credential."""
    st = peek(flow)
    names = set(SCRUB_HEADERS + extra)
    if st and st.upstream and st.upstream.credential:
        names.add(st.upstream.credential.header)
    return frozenset(names)


def scrubbed(snapshot: dict, names: frozenset[str]) -> http.HTTPFlow:
    """A flow rebuilt from `flow.get_state()` with every credential header replaced. The event
    loop takes only the snapshot (a quarter of the cost of `flow.copy()`); the writer thread
    rebuilds and scrubs it. The live flow is untouched."""
    copy = http.HTTPFlow.from_state(snapshot)
    for message in (copy.request, copy.response):
        if message is None:
            continue
        for name in names:
            if name in message.headers:
                message.headers[name] = SCRUBBED
    copy.metadata = {k: v for k, v in copy.metadata.items() if k in ("douane", "user")}
    return copy


def _json_string(m: re.Match[str]) -> str:
    literal = m.group(0)
    if len(literal) < detectors.SHORTEST_SECRET + 2:  # most values of a stream's events: fast
        return literal
    try:
        value = json.loads(literal) if "\\" in literal else literal[1:-1]
    except ValueError:
        return literal
    clean = detectors.redact_secrets(value)
    return literal if clean == value else json.dumps(clean, ensure_ascii=False)


def without_secrets(flow: http.HTTPFlow, streamed: tuple[str, ...] = ()) -> None:
    """Every credential the secret detectors find in the bodies (and a request path's query)
    replaced by `<SECRET:rule id>`, in place: a prompt blocked for carrying a key must not keep it.
    JSON and SSE bodies are edited one decoded string value at a time, so they stay valid and
    byte-identical elsewhere (a recorded request without secrets still matches in server replay).
    `streamed`: a streamed answer's text as delivered, per channel, where a secret split across
    deltas shows. Regexes over whole bodies: the writer thread calls this, never the event loop."""
    flow.request.path = detectors.redact_secrets(flow.request.path, high_entropy=False)
    for message in (flow.request, flow.response):
        if message is None or not message.raw_content:
            continue
        text = message.get_text(strict=False) or ""
        ctype = message.headers.get("content-type", "").lower()
        if "json" in ctype or "event-stream" in ctype or text.lstrip()[:1] in ("{", "["):
            clean = JSON_STRING.sub(_json_string, text)
        else:
            clean = detectors.redact_secrets(text)
        if clean != text:
            message.text = clean
    if any(detectors.redact_secrets(text) != text for text in streamed):
        _split_secrets(flow)


class _HoldAndRedact:
    """A stream filter that keeps each channel whole and releases it, redacted, at its end."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    def feed(self, channel: str, text: str) -> str:
        self.held[channel] = self.held.get(channel, "") + text
        return ""

    def finish(self, channel: str) -> str:
        return detectors.redact_secrets(self.held.pop(channel, ""))


def _split_secrets(flow: http.HTTPFlow) -> None:
    """A secret split across a stream's deltas (no single JSON value shows it): the stream goes
    through the same rewriter the gateway uses, each channel released whole and redacted."""
    upstream = transcript.upstream_of(flow)
    if upstream is None or flow.response is None or not flow.response.raw_content:
        return
    try:
        it = protocols.parse_request(upstream, flow)
        rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "recording")
    except protocols.ProtocolError:
        return  # not a stream douane can read: each JSON value was redacted on its own
    rewriter.filters.append(_HoldAndRedact())
    body = b"".join(rewriter(flow.response.get_content(strict=False))) + rewriter(b"")
    if rewriter.abort_message is None:
        flow.response.content = body


def session_path(flow: http.HTTPFlow, settings: RecordingSettings) -> Path:
    st = state(flow)
    # a user id is a path component: no separators, no leading dots (no "..")
    user = UNSAFE.sub("_", st.identity.user if st.identity else "anonymous")[:128].lstrip(".")
    started = datetime.fromtimestamp(flow.request.timestamp_start, UTC)
    mcp_session = flow.request.headers.get("mcp-session-id")
    if mcp_session:
        session = "mcp-" + UNSAFE.sub("_", mcp_session)[:64]
    elif settings.session == "window":
        minute = started.hour * 60 + started.minute
        session = f"window-{minute // settings.window_minutes * settings.window_minutes:04d}"
    else:
        session = f"conn-{flow.client_conn.id[:8]}"
    return Path(user or "_") / started.strftime("%Y-%m-%d") / f"{session}.mitm"


class RecordingWriter:
    """Appends flows to their session files and index rows to SQLite, from one thread."""

    def __init__(self, settings: RecordingSettings):
        self.settings = settings
        self.healthy = True
        self._queue: queue.SimpleQueue[tuple[Path, dict, frozenset[str], originals.Original | None,
                                             tuple[str, ...]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="douane-recording", daemon=True)
        self._thread.start()

    def put(self, relative: Path, snapshot: dict, scrub: frozenset[str],
            original: originals.Original | None = None, streamed: tuple[str, ...] = ()) -> None:
        """`snapshot` is `flow.get_state()`; `scrub` the credential headers to replace."""
        self._queue.put((relative, snapshot, scrub, original, streamed))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        key = originals.public_key(self.settings.originals_key) \
            if self.settings.originals_key else None
        while (item := self._queue.get()) is not None:
            relative, snapshot, scrub, original, streamed = item
            try:
                flow = scrubbed(snapshot, scrub)
                db = db or index.connect(self.settings.index_path)
                without_secrets(flow, streamed)
                path = self.settings.dir / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("ab") as f:
                    offset = f.tell()
                    io.FlowWriter(f).add(flow)
                    f.flush()
                if original is not None and key is not None:
                    with path.with_suffix(originals.SUFFIX).open("ab") as f:
                        f.write(originals.seal(
                            key, flow.id, flow.metadata["douane"].get("decision_id"), original))
                index.insert(db, [index.row(flow, str(relative), offset)])
                self.healthy = True
            except Exception:
                self.healthy = False
                logger.exception("douane: cannot record flow %s to %s", snapshot.get("id"),
                                 relative)
        if db:
            db.close()


class Record:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.recording: RecordingSettings | None = None
        self.writer: RecordingWriter | None = None

    def configure(self, updated: set[str]) -> None:
        if "douane_config" not in updated and self.writer is not None:
            return
        recording = self.settings.config.sections.get("recording")
        if recording != self.recording:
            if self.writer:
                self.writer.close()
            self.recording = recording
            self.writer = RecordingWriter(recording) if recording else None

    def done(self) -> None:
        if self.writer:
            self.writer.close()

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Fail closed by default: while recordings cannot be written, traffic is refused.
        if self.writer and not self.writer.healthy and self.recording and \
                self.recording.on_error == "refuse" and not flow.response and flow.live:
            refuse(flow, 503, "douane cannot write its recordings and refuses traffic until it "
                   "can", "recording_unavailable",
                   Reason("recording.unavailable", "recordings not writable"))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            self._record(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if self.writer is None or self.recording is None or st is None or \
                flow.metadata.get("douane_recorded"):
            return  # not a live flow of this gateway, or already written
        publish(flow)
        flow.metadata["douane"]["latency_ms"] = round((time.monotonic() - st.started) * 1000, 3)
        decision = flow.metadata["douane"].get("decision", {}).get("action", "allow")
        flow.comment = f"douane {decision}: " + "; ".join(
            r["message"] for r in flow.metadata["douane"].get("decision", {}).get("reasons", []))
        flow.metadata["douane_recorded"] = True
        original = originals.take(flow)
        # a streamed answer's text, per channel, as delivered (checked in the writer thread)
        streamed = tuple(p.text for p in st.interaction.response_texts) \
            if st.interaction and streams.rewriter_of(flow) else ()
        self.writer.put(session_path(flow, self.recording), flow.get_state(),
                        credential_headers(flow, self.recording.scrub_headers),
                        original if st.masked else None, streamed)
