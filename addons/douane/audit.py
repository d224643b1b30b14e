"""The audit trail: one JSON line per decision, hash-chained and HMAC'd so tampering shows.

Each record carries `seq` (consecutive across rotated files), `prev` (the previous record's `mac`)
and, last on its line, `mac` = HMAC-SHA256(key, canonical JSON of the record without `mac`). `douane audit verify`
recomputes the chain and names the first edited, deleted, inserted or reordered record. Records are
written by a thread a burst at a time (the caller only appends to a list; the thread wakes once
per `bursts.WINDOW`, not per record), flushed per burst, rotated by size. A torn last line left by
a crash is cut at start-up and the cut is itself recorded. The gateway runs that writer in a
process of its own (`AuditWriter`): its event loop pickles each window's records into a pipe, and
scrubbing, signing and writing them never take the gateway's GIL.

No token, key or cookie is ever put in a record: identities are claims, paths lose their query.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import secrets
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from mitmproxy import exceptions, http

from douane import bursts, headerfields, spawned, untrusted, upstreamerrors
from douane.bursts import Bursts
from douane.chainheads import ChainHeads
from douane.config import AuditConfig, Config, Database
from douane.flowstate import Reason, peek, publish, state
from douane.preauth import Budget
from douane.protocols.http1 import HeadRefusal
from douane.refusals import DECISION_HEADER, refuse
from douane.settings import Settings
from douane.statefile import create_once

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
DECISION_HEADER_NAME = DECISION_HEADER.encode()
EDGE_BYTES = 1 << 20  # the tail read for a file's last record (records are bounded)
MAX_BACKLOG = 10_000  # records waiting for the writer thread before new requests are refused
STARTING = -1  # `AuditWriter`'s shared health flag before its process runs
STARTUP_SECONDS = 60
BURST_RECORDS = 256  # records pickled in one message at most (the rest in the next, at once)
WRITE_RECORDS = 4096  # records the writer process chains and writes at once at most
PIPE_BYTES = 1024**2  # what the pipe holds: records wait there, where a crash of the gateway
# does not lose them, rather than in its memory


def canonical(record: dict[str, Any]) -> bytes:
    """The record's keys sorted, no spaces, UTF-8: orjson's encoding (~20x json's, a quarter of
    the audit thread's time per record). It writes strings, integers and most floats as
    `json.dumps` does; not a float below 1e-4 (`0.00001` for `1e-05`) nor NaN (`null`), which
    a record signed before it may hold (`signed`)."""
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a key that is not a string, an integer beyond 64 bits
        return json_canonical(record)


def json_canonical(record: dict[str, Any]) -> bytes:
    """The canonical encoding before orjson's (and where orjson cannot encode a record)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(record: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def signed(record: dict[str, Any], key: bytes, mac: str) -> bool:
    """Whether `mac` is the record's, in either canonical encoding (a record written before
    orjson's, with a float that encodes differently, holds json's)."""
    if hmac.compare_digest(sign(record, key), mac):
        return True
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.compare_digest(
        hmac.new(key, json_canonical(body), hashlib.sha256).hexdigest(), mac)


def hmac_key(config: Config, create: bool = True) -> bytes:
    """The configured key, or one generated once into the state dir (mode 0600). Readers pass
    create=False: a missing key file raises FileNotFoundError instead of minting a new key."""
    if config.audit.hmac_key:
        return config.audit.hmac_key.encode()
    key_file = config.state_dir / "audit-hmac.key"
    if not create:
        return key_file.read_bytes().strip()
    return create_once(key_file, lambda: secrets.token_hex(32).encode()).strip()


def log_files(path: Path) -> list[Path]:
    """The log's files, oldest first: audit.jsonl.N ... audit.jsonl.1, audit.jsonl."""
    rotated = sorted((p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    return rotated + ([path] if path.exists() else [])


class AuditLog:
    """Append-only, hash-chained JSON lines written by one thread: a thread of its own, or
    (`thread=False`) the caller's, a burst per `write` (the `AuditWriter`'s process)."""

    def __init__(self, config: AuditConfig, key: bytes, heads: ChainHeads | None = None,
                 thread: bool = True):
        self.config, self.key, self.heads = config, key, heads
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)  # the key's pads, hashed once
        self._ts: tuple[int, str] = (-1, "")  # (epoch ms, its ISO text): `_now`
        self.path = config.path
        self.healthy = True
        self._bursts: Bursts[dict[str, Any]] = Bursts()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev, torn = self._resume()
        if heads and self._seq:
            heads.update(self._seq, self._prev)
        self._open()
        self._lost = 0  # records the disk refused since the last good write
        self._thread = threading.Thread(target=self._run, name="douane-audit", daemon=True) \
            if thread else None
        if self._thread:
            self._thread.start()
        if torn:
            self.append({"event": "audit.recovered", "truncated_bytes": torn,
                         "message": "a torn last record (crash during a write) was cut"})

    def append(self, record: dict[str, Any]) -> None:
        """Hand a record over; time, sequence number and chain are added by the writer."""
        if self._thread:
            self._bursts.put(record)
        else:
            self.write([record])

    @property
    def ready(self) -> bool:
        """Writable, and keeping up: past `MAX_BACKLOG` records waiting (a disk slower than the
        traffic), new requests wait for it rather than the gateway's memory growing without
        bound."""
        return self.healthy and (self._thread is None or self._thread.is_alive()) and \
            len(self._bursts) < MAX_BACKLOG

    @property
    def backlog(self) -> int:
        return len(self._bursts)

    def close(self) -> None:
        if self._thread:
            self._bursts.close()
            self._thread.join(timeout=10)
        else:
            self._end()
        if self.heads:
            self.heads.close()

    def _resume(self) -> tuple[int, str, int]:
        """Continue the chain from the last complete record; cut a torn last line."""
        files = log_files(self.path)
        if not files:
            return 0, GENESIS, 0
        last = files[-1]
        data = last.read_bytes()
        torn = 0
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            torn = len(data) - cut
            with last.open("r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        lines = data.splitlines()
        if not lines and len(files) > 1:
            lines = files[-2].read_bytes().splitlines()
        if not lines:
            return 0, GENESIS, torn
        record = json.loads(lines[-1])
        return record["seq"], record["mac"], torn

    def _run(self) -> None:
        while (burst := self._bursts.take()) is not None:
            self.write(burst)
        self._end()

    def write(self, burst: list[dict[str, Any]]) -> None:
        """Chain and write a burst of records: at once, or, once the disk refuses a write, one
        at a time (only what it refuses is lost, and the chain says how many)."""
        if not self._lost:
            with contextlib.suppress(Exception):  # what failed is left in `burst`
                self._write(burst)
                self.healthy = True
        for record in burst:
            try:
                if self._lost:  # the chain itself says that records are missing, and how many
                    self._write([_gap(self._lost)])
                    self._lost = 0
                self._write([record])
                self.healthy = True
            except Exception:
                self._lost += 1
                self.healthy = False
                logger.exception("douane: cannot write the audit log %s", self.path)

    def _end(self) -> None:
        if self._lost:  # the last records were refused: the chain still says so, if the disk
            with contextlib.suppress(Exception):  # lets it
                self._write([_gap(self._lost)])
        self._file.close()

    def _line(self, record: dict[str, Any]) -> tuple[bytes, str]:
        """The next record's line (seq one past the chain's, prev its mac), and its mac."""
        # every value bounded and scrubbed here, off the event loop: a record never grows with
        # what a client sent, and never keeps a key it put in a model name or a header
        record = {"ts": self._now(), **untrusted.scrub_all(record), "seq": self._seq + 1,
                  "prev": self._prev}
        record.pop("mac", None)
        # one encoding, signed as it is written: the mac goes last, after what it covers
        body = canonical(record)
        signer = self._hmac.copy()
        signer.update(body)
        mac = signer.hexdigest()
        return body[:-1] + b',"mac":"' + mac.encode() + b'"}\n', mac

    def _now(self) -> str:
        """The time, to the millisecond, as `datetime.now(UTC).isoformat(timespec=
        "milliseconds")` writes it: formatted once per millisecond, not per record."""
        ms = time.time_ns() // 1_000_000
        if ms != self._ts[0]:
            self._ts = (ms, datetime.fromtimestamp(ms // 1000, UTC).replace(
                microsecond=ms % 1000 * 1000).isoformat(timespec="milliseconds"))
        return self._ts[1]

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Chain and write `records` in one write and flush (two around a rotation); a record
        leaves the list once flushed. On an error, what was not flushed is cut from the file, the
        chain goes on from the last record flushed, and the error is raised. The file's length is
        counted here, not asked of the kernel: a `tell` (two per record) or `fstat` is a system
        call that lets go of the GIL, and with the event loop waiting for it each was a hand-over
        to the loop and a wait to get it back."""
        chain, lines, size, n = (self._seq, self._prev), [], self._size, 0  # n: not flushed
        try:
            while n < len(records):
                line, mac = self._line(records[n])
                if size and size + len(line) > self.config.max_bytes:
                    self._flush(lines)
                    del records[:n]
                    # flushed: kept whatever rotation does (it renames this file, then may fail)
                    lines, n, chain = [], 0, (self._seq, self._prev)
                    for note in self._rotate():  # what rotation deleted, or kept, starts the file
                        lines.append(self._chained(*self._line(note)))
                    self._flush(lines)
                    lines, size, chain = [], self._size, (self._seq, self._prev)
                    line, mac = self._line(records[0])
                lines.append(self._chained(line, mac))
                size += len(line)
                n += 1
            self._flush(lines)
            records.clear()
        except Exception:
            self._forget_unwritten()
            self._seq, self._prev = chain
            raise

    def _chained(self, line: bytes, mac: str) -> bytes:
        self._seq, self._prev = self._seq + 1, mac
        return line

    def _flush(self, lines: list[bytes]) -> None:
        if lines:
            data = b"".join(lines)
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
        if self.heads:
            self.heads.update(self._seq, self._prev)

    def _open(self) -> None:
        """The log's file opened to append, and where it stands: its inode and length."""
        self._file = self.path.open("ab")
        stat = os.fstat(self._file.fileno())
        self._inode, self._size = stat.st_ino, stat.st_size

    def _forget_unwritten(self) -> None:
        """Drop records the disk refused: left in the buffer, they would be flushed later, after
        records with the same sequence numbers, and break the chain (a partial line too). The
        log's file is cut back to the length last flushed; a file a failed rotation started
        holds nothing kept."""
        with contextlib.suppress(OSError):
            self._file.close()  # closes the file even when flushing the refused bytes fails
        with self.path.open("ab") as f:  # (created if rotation failed between rename and open)
            stat = os.fstat(f.fileno())
            # never past its end: a file cut by someone else meanwhile is not padded with NULs
            f.truncate(min(self._size, stat.st_size) if stat.st_ino == self._inode else 0)
        self._open()

    def _rotate(self) -> list[dict[str, Any]]:
        """Shift the files up (audit.jsonl becomes .1) and delete the oldest beyond `backups`,
        but only files whose every record is past `retention_days`: evidence younger than that
        is kept over the size budget. Returns the records saying what was deleted or kept."""
        self._file.close()
        for older in log_files(self.path)[:-1]:  # highest number first
            older.rename(self.path.with_name(f"{self.path.name}.{int(older.suffix[1:]) + 1}"))
        self.path.rename(self.path.with_name(self.path.name + ".1"))
        self._open()
        rotated = log_files(self.path)[:-1]
        horizon = time.time() - self.config.retention_days * 86400
        notes: list[dict[str, Any]] = []
        for n, oldest in enumerate(rotated[:max(0, len(rotated) - self.config.backups)]):
            first, last = _edge_records(oldest)
            if first is None or last is None or _timestamp(last) > horizon:
                over = len(rotated) - self.config.backups - n
                logger.error("douane: the audit log is over its size budget by %d file(s): its "
                             "oldest records are younger than audit.retention_days (%d) and are "
                             "kept", over, self.config.retention_days)
                notes.append({"event": "audit.over_budget", "files_over_budget": over,
                              "kept_file": oldest.name, "retention_days":
                              self.config.retention_days, "message": "records younger than the "
                              "retention are kept beyond the size budget (audit.max_bytes x "
                              "audit.backups)"})
                break
            oldest.unlink()
            notes.append({"event": "audit.deleted", "file": oldest.name, "first_seq": first["seq"],
                          "last_seq": last["seq"], "last_ts": last["ts"],
                          "retention_days": self.config.retention_days,
                          "message": "rotation deleted records past the retention, beyond the "
                          "size budget"})
        return notes


Heads = tuple[Database, str, str, str]  # `ChainHeads`' arguments: store, replica, host, path


class AuditWriter:
    """The gateway's end of its audit log, which a process of its own writes (an `AuditLog`
    there): `append` from the event loop (never blocks), `ready` read by the request hook,
    `close` drains and joins.

    A record costs the loop a list append; a timer of the loop, the first record of each
    `bursts.WINDOW` arms it, pickles the window's records at once (a few µs each) into a one-way
    pipe, non-blocking (a full pipe is waited for by the loop's selector; records appended
    meanwhile wait their turn, counted in `backlog`). Written by a thread of the gateway, a
    record held its GIL ~25 µs to be scrubbed, signed and written, ~40-50 µs at 32 connections
    where each window's wake-ups convoyed with the loop for the GIL. The process holds only the
    pipe's read end: when the gateway dies (kill -9) it reads EOF, writes what was sent and
    exits; it ignores SIGINT and SIGTERM (sent to the whole group, a gateway still draining
    would lose its last records), and ends at the sentinel `close` sends. Appended outside an
    event loop (a script, a test), records are sent at once."""

    def __init__(self, config: AuditConfig, key: bytes, heads: Heads | None = None):
        self.path = config.path
        # spawn: forking a process that runs an asyncio loop and threads is unsafe
        context = multiprocessing.get_context("spawn")
        # set by the child: whether its last write succeeded; STARTING until it runs
        self._healthy = context.RawValue("b", STARTING)
        receiver, self._sender = context.Pipe(duplex=False)
        self._process = context.Process(target=serve, args=(receiver, config, key, heads,
                                                             self._healthy),
                                        name="douane-audit", daemon=True)
        spawned.start(self._process)
        receiver.close()  # the child's alone: the gateway's death is its EOF
        # No decision before the writer runs: one made then could not be recorded.
        deadline = time.monotonic() + STARTUP_SECONDS
        while self._healthy.value == STARTING:
            if multiprocessing.connection.wait([self._process.sentinel], 0.01) or \
                    time.monotonic() > deadline:
                self._process.kill()
                self._process.join()
                self._sender.close()
                raise RuntimeError(f"the audit writer did not start (exit code "
                                   f"{self._process.exitcode}; its error is logged above)")
        self._fd = self._sender.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):  # (above /proc/sys/fs/pipe-max-size: the default)
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._waiting: list[dict[str, Any]] = []  # appended, not yet pickled
        self._out = memoryview(b"")  # a message pickled, not yet wholly in the pipe
        self._out_records = 0
        self._lock = threading.Lock()  # one sender at a time (a thread without a loop)
        self._timer: asyncio.TimerHandle | None = None
        self._selector: asyncio.AbstractEventLoop | None = None  # waiting for a full pipe
        self._gone = False  # the child died: nothing is written, nothing is ready
        self._watched: asyncio.AbstractEventLoop | None = None  # seeing the child's death
        self._watch()

    def append(self, record: dict[str, Any]) -> None:
        """Hand a record over; time, sequence number and chain are added by the writer."""
        if self._gone:
            return
        self._waiting.append(record)
        if self._timer is None and self._selector is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._send(math.inf)
                return
            self._timer = loop.call_later(bursts.WINDOW, self._send)
            self._watch()

    @property
    def ready(self) -> bool:
        """The writer's last write succeeded, and it keeps up: past `MAX_BACKLOG` records
        waiting on this side of the pipe (the pipe full: a disk slower than the traffic), new
        requests wait for it rather than the gateway's memory growing without bound."""
        if self._watched is None:
            self._watch()
        return self._healthy.value == 1 and not self._gone and self.backlog < MAX_BACKLOG

    @property
    def backlog(self) -> int:
        """Records queued on this side of the pipe."""
        return len(self._waiting) + self._out_records

    def close(self, timeout: float = 15) -> None:
        """What waits, written; then the writer's log closed (its chain head published)."""
        deadline = time.monotonic() + timeout
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unselect()
        self._unwatch()
        if not self._gone and self._send(deadline):  # what waits, then the end
            with self._lock:
                self._out = memoryview(_framed(None))
            self._send(deadline)
        self._gone = True
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.error("douane: the audit writer did not finish within %ss; stopped", timeout)
            self._process.kill()
            self._process.join()
        self._sender.close()

    def _send(self, deadline: float | None = None) -> bool:
        """Pickle what waits and write it to the pipe. Without a `deadline` (the loop's timer):
        until the pipe is full, then the loop's selector says when to go on; with one, blocking
        until then. True once all is in the pipe."""
        with self._lock:
            self._timer = None
            while self._out or self._waiting:
                if not self._out:
                    burst = self._waiting[:BURST_RECORDS]  # a bounded pickle on the loop
                    del self._waiting[:BURST_RECORDS]
                    self._out, self._out_records = memoryview(_burst(burst)), len(burst)
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
                    self._out_records = 0
            return True

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

    def _watch(self) -> None:
        """The child's death seen at once, from the first record or request on a loop (a writer
        that died before either, unwatched, left `ready` true: the first request was served and
        its record lost): no request waits for a write to fail before it is refused."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._gone:
            return
        self._watched = loop
        loop.add_reader(self._process.sentinel, self._died)
        if not self._process.is_alive():  # (died before: its sentinel is read next pass)
            self._died()

    def _unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(Exception):  # (the loop may be closed at shutdown)
                self._watched.remove_reader(self._process.sentinel)
            self._watched = None

    def _died(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._unselect()
        self._unwatch()
        self._waiting, self._out, self._out_records = [], memoryview(b""), 0
        self._process.join(0)
        logger.error("douane: the audit writer exited (code %s); traffic is refused",
                     self._process.exitcode)


def _burst(records: list[dict[str, Any]]) -> bytes:
    """The records pickled at once; one that cannot be is lost alone, and the log says so (an
    `audit.gap` in its place, as for a record the disk refused)."""
    try:
        return _framed(records)
    except Exception:
        kept = []
        for record in records:
            try:
                pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
                kept.append(record)
            except Exception:
                logger.exception("douane: cannot hand an audit record to the writer")
                kept.append(_gap(1))
        return _framed(kept)


def _framed(records: list[dict[str, Any]] | None) -> bytes:
    """A message as `Connection.recv` reads it: its length, then the pickle."""
    data = pickle.dumps(records, pickle.HIGHEST_PROTOCOL)
    return struct.pack("!i", len(data)) + data


def _writable(fd: int, deadline: float) -> bool:
    """Whether the pipe takes bytes, waiting for it until `deadline`."""
    return bool(select.select([], [fd], [], None if deadline == math.inf
                              else max(0.0, deadline - time.monotonic()))[1])


def serve(receiver: multiprocessing.connection.Connection, config: AuditConfig, key: bytes,
          heads: Heads | None, healthy: Any) -> None:
    """The writer process: writes what arrives, on its only thread (what the pipe holds at
    once, in one write), until the gateway's sentinel or its death (EOF); whether its log is
    writable published in `healthy` after each write."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the gateway's to handle: it drains
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, datefmt="%H:%M:%S",
                        format="[%(asctime)s.%(msecs)03d] douane audit writer "
                               f"(pid {os.getpid()}): %(message)s")
    try:
        log = AuditLog(config, key, ChainHeads(*heads) if heads else None, thread=False)
    except Exception:
        logger.exception("douane: cannot open the audit log %s", config.path)
        healthy.value = 0
        raise
    try:
        healthy.value = 1 if log.healthy else 0
        ended = False
        while not ended:
            burst: list[dict[str, Any]] = []
            try:
                while True:  # what the pipe holds now
                    records = receiver.recv()
                    if records is None:
                        ended = True
                        break
                    burst += records
                    if len(burst) >= WRITE_RECORDS or not receiver.poll():
                        break
            except (EOFError, OSError):  # (OSError: EOF inside a message, the gateway killed
                # while writing it: what arrived whole before it is still written)
                logger.error("douane: the gateway is gone; what it sent whole is written")
                ended = True
            log.write(burst)
            healthy.value = 1 if log.healthy else 0
    finally:
        log.close()

def _gap(lost: int) -> dict[str, Any]:
    return {"event": "audit.gap", "lost_records": lost,
            "message": "records could not be written (disk full?)"}


def _edge_records(file: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first and last records of a log file, or None where one cannot be read."""
    with file.open("rb") as f:
        head = f.readline()
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - EDGE_BYTES))
        tail = f.read().rstrip(b"\n").rpartition(b"\n")[2]

    def parse(line: bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(line)
            return record if isinstance(record.get("seq"), int) and "ts" in record else None
        except (ValueError, AttributeError):
            return None
    return parse(head), parse(tail)


def _timestamp(record: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(record["ts"])).timestamp()
    except ValueError:
        return time.time()  # unreadable: taken as young, so kept


@dataclass
class Verification:
    records: int
    files: int
    error: str | None  # "FILE:LINE: what is wrong", the first bad record
    first_seq: int | None = None  # where the surviving chain starts
    first_file: Path | None = None
    deleted_by: int | None = None  # seq of the audit.deleted record accounting for 1..first-1
    last_seq: int | None = None
    mac_at: str | None = None  # the MAC of the record `verify(at=...)` asked for, if present

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """Where the chain starts, and what happened to the records before it."""
        if self.first_seq is None:
            return "no records"
        text = f"chain starts at seq {self.first_seq} ({self.first_file})"
        if self.first_seq > 1 and self.deleted_by is not None:
            text += (f"; records 1-{self.first_seq - 1} were deleted by rotation past retention "
                     f"(audit.deleted record, seq {self.deleted_by})")
        return text


def verify(path: Path, key: bytes, at: int | None = None) -> Verification:
    """Check the chain across rotated files, stopping at the first bad record. A chain whose
    first surviving record is not seq 1 verifies only if a later record in it, `audit.deleted`,
    says rotation deleted the records before it (past retention). `at`: a seq whose MAC to
    report (a chain head kept in the shared store)."""
    files = log_files(path)
    count, seq, prev = 0, None, None
    result = Verification(0, len(files), None)
    for file in files:
        for lineno, line in _lines(file):
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
                rseq, rprev, mac = record["seq"], record["prev"], record["mac"]
            except (ValueError, KeyError, TypeError):
                return _failed(result, count, f"{where}: not an audit record")
            if not signed(record, key, str(mac)):
                return _failed(result, count, f"{where}: record was altered (bad MAC)")
            if seq is None:
                if rseq == 1 and rprev != GENESIS:
                    return _failed(result, count, f"{where}: first record is not the start of "
                                                  f"the chain")
                result.first_seq, result.first_file = rseq, file
            elif rseq != seq + 1:
                what = "deleted" if rseq > seq + 1 else "inserted or reordered"
                return _failed(result, count, f"{where}: records {what} (seq {rseq} follows {seq})")
            elif rprev != prev:
                return _failed(result, count, f"{where}: chain broken (prev mismatch)")
            if record.get("event") == "audit.deleted" and result.first_seq is not None and \
                    record.get("last_seq") == result.first_seq - 1:
                result.deleted_by = rseq
            if rseq == at:
                result.mac_at = mac
            seq, prev, count = rseq, mac, count + 1
    result.records, result.last_seq = count, seq
    if result.first_seq is not None and result.first_seq > 1 and result.deleted_by is None:
        result.error = (f"{result.first_file}:1: the chain starts at seq {result.first_seq}: "
                        f"records 1-{result.first_seq - 1} are gone and no audit.deleted record "
                        f"says rotation deleted them past retention")
    return result


def _failed(result: Verification, count: int, error: str) -> Verification:
    result.records, result.error = count, error
    return result


def _lines(file: Path) -> Iterator[tuple[int, bytes]]:
    with file.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def flow_record(flow: http.HTTPFlow, config: Config,
                published: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit record of one flow's decision: claims and facts, never credentials or content.
    `published`: the summary `publish` just put in the flow's metadata, whose parts are reused
    (built once; nothing edits them in place, and the audit thread copies what it writes)."""
    st = state(flow)
    if published is None:
        published = {"decision": st.decision.summary() if st.decision else None,
                     "interaction": st.interaction.summary() if st.interaction else None}
    decision = published.get("decision") or {"action": "allow", "reasons": []}
    record: dict[str, Any] = {
        "event": "decision",
        "decision_id": st.decision_id,
        "flow_id": flow.id,
        "client": flow.client_conn.peername[0] if flow.client_conn.peername else None,
        "method": flow.request.method,
        "host": flow.request.host,
        "path": flow.request.path.split("?")[0],
        "upstream": st.upstream.name if st.upstream else None,
        # which credential went upstream (cost attribution): its source, never its value
        "credential": st.credential.source if st.credential else None,
        **decision,
        "config_version": config.version,
        "latency_ms": {"total": round((time.monotonic() - st.started) * 1000, 3),
                       **st.timings_ms},
    }
    if st.identity:
        record.update(user=st.identity.user, groups=list(st.identity.groups),
                      issuer=st.identity.issuer)
    if st.interaction:
        record["interaction"] = published["interaction"]
        if st.interaction.model:
            record["model"] = st.interaction.model
    if st.policy_version:
        record["policy_version"] = st.policy_version
    if st.masked:
        record["masked"] = dict(st.masked)
    if st.dropped_headers:
        record["dropped_headers"] = st.dropped_headers
    if flow.response and not ((flow.response.stream or flow.error) and "status" in record):
        # (a stream refused after its 200 left, an answer cut by mitmproxy: the refusal's status)
        record["status"] = flow.response.status_code
    if flow.error:  # no answer, or not all of it: how it ended
        record["error"] = flow.error.msg
        record["ended"] = upstreamerrors.ending(flow)
    return record


def head_record(refusal: HeadRefusal, config: Config) -> dict[str, Any]:
    """The audit record of a request head refused before any flow existed (`protocols.http1`):
    nobody authenticated, the peer, the request line's method and path if it was read."""
    record: dict[str, Any] = {
        "event": "decision", "decision_id": refusal.decision_id, "flow_id": None,
        "client": refusal.client, "action": "refuse",
        "reasons": [Reason(refusal.rule, refusal.message).summary()], "status": refusal.status,
        "config_version": config.version}
    if refusal.method is not None:
        record.update(method=refusal.method, path=refusal.path)
    return record


class AuditTrail:
    """Writes exactly one audit record per flow decision and tags responses with the decision id."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.log: AuditWriter | None = None
        self.budget: Budget | None = None  # refusals before authentication (`douane.preauth`)
        self._window_end: asyncio.TimerHandle | None = None

    def configure(self, updated: set[str]) -> None:
        if "douane_config" in updated or self.log is None:
            config = self.settings.config
            if self.log is None or self.log.path != config.audit.path:
                if self.log:
                    self.log.close()
                heads = (config.database, config.replica, config.host,
                         str(config.audit.path)) if config.database else None
                try:
                    self.log = AuditWriter(config.audit, hmac_key(config), heads)
                except RuntimeError as e:
                    raise exceptions.OptionsError(f"douane: {e}") from None
            if self.budget is None or self.budget.config != config.audit.unauthenticated:
                self._end_window()
                self.budget = Budget(config.audit.unauthenticated)

    def done(self) -> None:
        self._end_window()
        if self.log:
            self.log.close()

    def append(self, record: dict[str, Any]) -> None:
        """An audit record for an event that is not a flow decision (approvals, retention...)."""
        assert self.log
        self.log.append(record)

    def douane_head_refused(self, refusal: HeadRefusal) -> None:
        if self.log and self._admitted(refusal.client, refusal.rule, refusal.decision_id):
            self.log.append(head_record(refusal, self.settings.config))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Fail closed: no request goes upstream while its decision cannot be recorded.
        if self.log and not self.log.ready and not flow.response and flow.live:
            refuse(flow, 503, "the audit log cannot be written now; douane refuses traffic until "
                   "it can", "audit_unavailable", Reason("audit.unavailable",
                                                         "audit log not writable or behind"))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:  # a refused CONNECT is a decision; an accepted one is not yet
            self._record(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._tag(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._tag(flow)
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    @staticmethod
    def _tag(flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if flow.response and st and headerfields.get(flow.response.headers,
                                                     DECISION_HEADER_NAME) != st.decision_id:
            # (`put` keeps the fields' index: the check at `response` reads it, not the fields)
            headerfields.put(flow.response.headers, DECISION_HEADER, st.decision_id)

    def _record(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if st is None or st.audited or self.log is None:
            return  # not a live flow of this gateway (read back with -r, replayed) or done
        st.audited = True
        publish(flow)
        record = flow_record(flow, self.settings.config, flow.metadata["douane"])
        if st.identity is None and record["action"] == "refuse" and not self._admitted(
                record["client"], record["reasons"][0]["rule"] if record["reasons"] else "",
                st.decision_id):
            return
        self.log.append(record)

    def _admitted(self, client: str | None, rule: str, decision_id: str) -> bool:
        """Whether this refusal of a client nobody authenticated is recorded on its own, or
        counted into its peer's summary, written when the window ends."""
        assert self.budget
        now = time.time()
        if self.budget.due(now):
            self._end_window()
        admitted = self.budget.admit(client, rule, decision_id, now)
        if not admitted and self._window_end is None:
            left = (self.budget.start or now) + self.budget.config.window_seconds - now
            self._window_end = asyncio.get_running_loop().call_later(left, self._end_window)
        return admitted

    def _end_window(self) -> None:
        if self._window_end:
            self._window_end.cancel()
            self._window_end = None
        if self.budget and self.log:
            for summary in self.budget.end_window():
                self.log.append(summary)
