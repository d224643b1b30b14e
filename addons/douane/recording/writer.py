"""The recording writer: a process of its own, so that scrubbing, redacting, serialising and
indexing a flow (about 0.5 ms of CPU each) takes neither the gateway's GIL nor its core.

The gateway's event loop hands `RecordingWriter.put` a `flow.get_state()` snapshot; a feeder
thread pickles it into a one-way pipe; the child rebuilds the flow's messages, scrubs their
credential headers, redacts the secrets in their bodies, appends the flow to its session file
(kept open, flushed per flow, so a crash loses at most the flows in flight), seals the originals
and indexes it (one commit per burst of flows). One child, one pipe: flows are written in the
order they were put. The child holds only the pipe's read end, so when the gateway dies (kill -9)
it reads EOF, writes what was sent and exits; Ctrl-C (sent to the whole process group) is the
gateway's to handle: the child drains until `close()` says stop.
"""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mitmproxy import connection, http
from wsproto.frame_protocol import Opcode

from douane import protocols, secrets, store, transcript, untrusted
from douane.protocols import decoding, fields, streams
from douane.recording import index, originals
from douane.recording.config import RecordingSettings

if TYPE_CHECKING:
    from douane.config import Database

logger = logging.getLogger(__name__)

SCRUBBED = "<scrubbed by douane>"
# One JSON string literal (no raw newline), unrolled: runs of plain characters match in C at
# full speed (the regex holds the GIL, so a multi-megabyte value must not take long).
JSON_STRING = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')
COMMENT_CHARS = 4096  # the flow's comment: douane's decision and its reasons' messages
OPEN_FILES = 32  # session files kept open: one per active connection or MCP session
BATCH_ROWS = 500  # index rows per commit at most, under a load that never lets the queue drain
BATCH_SECONDS = 1.0  # ... and the oldest uncommitted row waits no longer than this
PENDING_ROWS = 100_000  # rows kept for a shared store that is down; older ones are dropped
STARTING = -1  # the shared health flag before the child runs
STARTUP_SECONDS = 60
WRITER_NICENESS = 10

_CLIENT = connection.Client(peername=("", 0), sockname=("", 0))  # see `scrubbed`
_SERVER = connection.Server(address=None)
Item = tuple[Path, dict, frozenset[str], originals.Original | None, tuple[str, ...]]


@dataclass(frozen=True)
class SharedIndex:
    """The fleet's index in the shared store instead of the SQLite file: this replica's name, and
    its folder under `recording.dir` (a worker's `wN`, else empty)."""

    database: Database
    replica: str
    folder: str = ""


def scrubbed(snapshot: dict, names: frozenset[str]) -> http.HTTPFlow:
    """The flow of a `flow.get_state()` snapshot with every credential header replaced. Only its
    messages and douane's metadata are rebuilt: the connections, half the cost of rebuilding a
    flow and read by nothing here, are placeholders, and `snapshot_of` writes them back as they
    were. The live flow is untouched."""
    copy = http.HTTPFlow(_CLIENT, _SERVER)
    copy.id = snapshot["id"]
    copy.request = http.Request.from_state(snapshot["request"])
    copy.response = http.Response.from_state(snapshot["response"]) \
        if snapshot["response"] else None
    for message in (copy.request, copy.response):
        if message is not None:
            message.headers.fields = _headers(message.headers.fields, names)
            if message.trailers:
                message.trailers.fields = _headers(message.trailers.fields, names)
    # douane's summary quotes what the client sent (model, tool names, claims): bounded, scrubbed
    copy.metadata = untrusted.scrub_all(
        {k: v for k, v in snapshot["metadata"].items() if k in ("douane", "user")})
    return copy


def _headers(fields: tuple[tuple[bytes, bytes], ...],
             names: frozenset[str]) -> tuple[tuple[bytes, bytes], ...]:
    """Credential headers replaced; in any other value, the secrets redacted (a key in
    `X-Custom-Token` or `User-Agent` is no less a key). One scan of all values (joined by NUL,
    which no secret pattern crosses) finds the usual case, where there is none."""
    fields = tuple((k, SCRUBBED.encode() if k.decode("latin-1").lower() in names else v)
                   for k, v in fields)
    values = [v.decode("utf-8", "surrogateescape") for _, v in fields]
    if secrets.redact("\0".join(values)) == "\0".join(values):
        return fields
    return tuple((k, secrets.redact(text).encode("utf-8", "surrogateescape"))
                 for (k, _), text in zip(fields, values, strict=True))


def tnetstring_of(value: Any) -> bytes:
    """mitmproxy's `tnetstring.dumps`, byte for byte (a dict's items last first, as it writes
    them), in half the time: each value's bytes built at once, not pushed fragment by fragment
    onto a deque (a third of the writer's CPU was there). Exact types first, then its checks."""
    kind = type(value)
    if kind is str:
        data = value.encode("utf8")
        return b"%d:%s;" % (len(data), data)
    if kind is bytes:
        return b"%d:%s," % (len(value), value)
    if kind is dict:
        body = b"".join([tnetstring_of(k) + tnetstring_of(v) for k, v in reversed(value.items())])
        return b"%d:%s}" % (len(body), body)
    if kind is list or kind is tuple:
        body = b"".join([tnetstring_of(v) for v in value])
        return b"%d:%s]" % (len(body), body)
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


def snapshot_of(flow: http.HTTPFlow, snapshot: dict) -> dict:
    """What `FlowWriter` would write for the flow with its real connections: the snapshot with
    the flow's scrubbed messages and metadata. No backup (an unscrubbed earlier request)."""
    return {**snapshot, "request": flow.request.get_state(),
            "response": flow.response.get_state() if flow.response else None,
            "metadata": flow.metadata, "backup": None,
            "comment": untrusted.scrub(snapshot["comment"], COMMENT_CHARS),
            "websocket": _websocket(snapshot["websocket"])}


def _websocket(state: dict | None) -> dict | None:
    """A WebSocket's text messages with their secrets redacted, like bodies."""
    if not state:
        return state
    messages = []
    for kind, from_client, content, *rest in state["messages"]:
        if kind == Opcode.TEXT:
            text = content.decode("utf-8", "surrogateescape")
            clean = secrets.redact(text)
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
    clean = secrets.redact(value)
    inside = fields.file_text(value) if clean == value else None
    if inside is not None and secrets.redact(inside) != inside:  # a key inside a text file
        clean = "data:text/plain;base64," + base64.b64encode(
            secrets.redact(inside).encode()).decode()
    return literal if clean == value else json.dumps(clean, ensure_ascii=False)


def without_secrets(flow: http.HTTPFlow, streamed: tuple[str, ...] = ()) -> None:
    """Every credential the secret detectors find in the bodies (and a request path's query)
    replaced by `<SECRET:rule id>`, in place: a prompt blocked for carrying a key must not keep it.
    JSON and SSE bodies are edited one decoded string value at a time, so they stay valid and
    byte-identical elsewhere (a recorded request without secrets still matches in server replay).
    `streamed`: a streamed answer's text as delivered, per channel, where a secret split across
    deltas shows. Regexes over whole bodies: the writer process calls this, never the gateway."""
    flow.request.path = secrets.redact(flow.request.path, high_entropy=False)
    for message in (flow.request, flow.response):
        if message is None or not message.raw_content:
            continue
        try:  # bounded: a compressed body the gateway refused unread may be a bomb
            decoding.decode_body(message, decoding.OFFLINE_LIMIT)
        except (decoding.TooLarge, ValueError):
            del message.headers["content-encoding"]
            message.content = b""  # it cannot be read, so it cannot be scrubbed: not kept
            continue
        text = message.get_text(strict=False) or ""
        ctype = message.headers.get("content-type", "").lower()
        if "json" in ctype or "event-stream" in ctype or text.lstrip()[:1] in ("{", "["):
            clean = JSON_STRING.sub(_json_string, text)
        else:
            clean = secrets.redact(text)
        if clean != text:
            message.text = clean
    if any(secrets.redact(text) != text for text in streamed):
        _split_secrets(flow)


class _HoldAndRedact:
    """A stream filter that keeps each channel whole and releases it, redacted, at its end."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    def feed(self, channel: str, text: str) -> str:
        self.held[channel] = self.held.get(channel, "") + text
        return ""

    def finish(self, channel: str) -> str:
        return secrets.redact(self.held.pop(channel, ""))


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


class RecordingWriter:
    """The gateway's end: `put` from the event loop (never blocks), `healthy` read by the
    request hook, `close` drains and joins."""

    def __init__(self, settings: RecordingSettings, shared: SharedIndex | None = None):
        # spawn: forking a process that runs an asyncio loop and threads is unsafe
        context = multiprocessing.get_context("spawn")
        # set by the child: 1 once it runs, 0 after a failed write, 1 after one that succeeds
        self._healthy = context.RawValue("b", STARTING)
        receiver, self._sender = context.Pipe(duplex=False)
        self._process = context.Process(target=serve, args=(receiver, settings, self._healthy, shared),
                                        name="douane-recording", daemon=True)
        self._process.start()
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
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed, name="douane-recording-feeder",
                                        daemon=True)
        self._feeder.start()

    @property
    def healthy(self) -> bool:
        return bool(self._healthy.value)

    @property
    def backlog(self) -> int:
        """Recordings queued on this side of the pipe."""
        return self._queue.qsize()

    def put(self, relative: Path, snapshot: dict, scrub: frozenset[str],
            original: originals.Original | None = None, streamed: tuple[str, ...] = ()) -> None:
        """`snapshot` is `flow.get_state()`; `scrub` the credential headers to replace."""
        self._queue.put((relative, snapshot, scrub, original, streamed))

    def close(self, timeout: float = 10) -> None:
        self._queue.put(None)
        deadline = time.monotonic() + timeout
        self._feeder.join(timeout)
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.error("douane: the recording writer did not finish within %ss; stopped",
                         timeout)
            self._process.kill()
            self._process.join()
        self._sender.close()

    def _feed(self) -> None:
        """Pickles and sends in this thread: the event loop only appends to a queue."""
        item = self._queue.get()
        while True:
            try:
                self._sender.send(item)
            except OSError:  # the child died
                break
            if item is None:
                return
            item = self._queue.get()
        self._healthy.value = 0
        self._process.join(5)
        logger.error("douane: the recording writer exited (code %s); flows are no longer "
                     "recorded", self._process.exitcode)
        while item is not None:  # dropped until close()
            item = self._queue.get()


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
            if writer.rows and (not receiver.poll() or writer.overdue()):
                writer.commit()  # before blocking: the index is never behind for long
            try:
                item = receiver.recv()
            except EOFError:
                logger.error("douane: the gateway is gone; what it sent is written")
                break
            if item is None:
                break
            writer.write(item)
    finally:
        writer.close()


class _Writer:
    def __init__(self, settings: RecordingSettings, healthy: Any,
                 shared: SharedIndex | None = None):
        self.settings, self.healthy, self.shared = settings, healthy, shared
        self.key = originals.public_key(settings.originals_key) \
            if settings.originals_key else None
        self.files: OrderedDict[Path, IO[bytes]] = OrderedDict()  # least recently used first
        self.db: Any = None  # sqlite3, or psycopg with a shared store
        self.rows: list[dict[str, Any]] = []
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
        relative, snapshot, scrub, original, streamed = item
        path, offset, flow_id = self.settings.dir / relative, None, snapshot.get("id")
        try:
            flow = scrubbed(snapshot, scrub)
            without_secrets(flow, streamed)
            f = self.file(path)
            offset = f.tell()
            f.write(tnetstring_of(snapshot_of(flow, snapshot)))
            f.flush()
            if original is not None and self.key is not None:
                with path.with_suffix(originals.SUFFIX).open("ab") as sealed:
                    sealed.write(originals.seal(
                        self.key, flow.id, flow.metadata["douane"].get("decision_id"), original))
            row = index.row(flow, str(relative), offset)
            if self.shared:
                row.update(replica=self.shared.replica,
                           file=str(Path(self.shared.folder) / relative))
        except Exception:
            self.failed(path, offset)
            logger.exception("douane: cannot record flow %s to %s", flow_id, relative)
            return
        if not self.rows:
            self.since = time.monotonic()
        self.rows.append(row)
        self.last_ok = True

    def file(self, path: Path) -> IO[bytes]:
        """The session file, kept open; reopened if `douane sessions prune` deleted it."""
        f = self.files.pop(path, None)
        if f is not None and os.fstat(f.fileno()).st_nlink == 0:
            f.close()
            f = None
        if f is None:
            try:
                f = path.open("ab")
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = path.open("ab")
            if len(self.files) >= OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files[path] = f
        return f

    def failed(self, path: Path, offset: int | None) -> None:
        """A failed write (a full disk): the file is closed and cut back to its last whole flow,
        so the flows written after it stay readable."""
        self.healthy.value = 0
        self.last_ok = False
        f = self.files.pop(path, None)
        try:
            if f is not None:
                f.close()
        except OSError:
            pass  # the rest of its buffer could not be written either: cut below
        if offset is not None:
            try:
                os.truncate(path, offset)
            except OSError:
                logger.exception("douane: cannot cut %s back to its last whole flow", path)

    def overdue(self) -> bool:
        return len(self.rows) >= BATCH_ROWS or time.monotonic() - self.since >= BATCH_SECONDS

    def commit(self) -> None:
        if self.indexer:
            self.indexer.put(self.rows)
            self.rows = []
            return
        rows, self.rows = self.rows, []
        try:
            self.db = self.db or index.connect(self.settings.index_path)
            index.insert(self.db, rows)
        except Exception:
            self.healthy.value = 0
            logger.exception("douane: cannot record flow %s to the index (`douane sessions "
                             "reindex` restores it from the files)",
                             ", ".join(r["flow_id"] for r in rows))
            if self.db is not None:
                self.db.close()
                self.db = None
            return
        if self.last_ok:
            self.healthy.value = 1

    def close(self) -> None:
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
        self.rows: list[dict[str, Any]] = []
        self.dropped = 0
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="douane-index", daemon=True)
        self._thread.start()

    def put(self, rows: list[dict[str, Any]], front: bool = False) -> None:
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
                index.insert(db, rows)
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
