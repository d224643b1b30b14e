"""The audit trail: one JSON line per decision, hash-chained and HMAC'd so tampering shows.

Each record carries `seq` (consecutive across rotated files), `prev` (the previous record's `mac`)
and `mac` = HMAC-SHA256(key, canonical JSON of the record without `mac`). `douane audit verify`
recomputes the chain and names the first edited, deleted, inserted or reordered record. Records are
written by a thread (the event loop only enqueues), flushed per record, rotated by size. A torn last
line left by a crash is cut at start-up and the cut is itself recorded.

No token, key or cookie is ever put in a record: identities are claims, paths lose their query.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy import http

from douane.config import AuditConfig, Config
from douane.flowstate import Reason, peek, publish, state
from douane.refusals import DECISION_HEADER, guarded, refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)

GENESIS = "0" * 64


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(record: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def hmac_key(config: Config, create: bool = True) -> bytes:
    """The configured key, or one generated once into the state dir (mode 0600). Readers pass
    create=False: a missing key file raises FileNotFoundError instead of minting a new key."""
    if config.audit.hmac_key:
        return config.audit.hmac_key.encode()
    key_file = config.state_dir / "audit-hmac.key"
    if create and not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return key_file.read_text().strip().encode()


def log_files(path: Path) -> list[Path]:
    """The log's files, oldest first: audit.jsonl.N ... audit.jsonl.1, audit.jsonl."""
    rotated = sorted((p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    return rotated + ([path] if path.exists() else [])


class AuditLog:
    """Append-only, hash-chained JSON lines written by one thread."""

    def __init__(self, config: AuditConfig, key: bytes):
        self.config, self.key = config, key
        self.path = config.path
        self.healthy = True
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev, torn = self._resume()
        self._file = self.path.open("ab")
        self._thread = threading.Thread(target=self._run, name="douane-audit", daemon=True)
        self._thread.start()
        if torn:
            self.append({"event": "audit.recovered", "truncated_bytes": torn,
                         "message": "a torn last record (crash during a write) was cut"})

    def append(self, record: dict[str, Any]) -> None:
        """Queue a record; time, sequence number and chain are added by the writer."""
        self._queue.put(record)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

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
        lost = 0  # records the disk refused since the last good write
        while (record := self._queue.get()) is not None:
            try:
                if lost:  # the chain itself says that records are missing, and how many
                    self._write({"event": "audit.gap", "lost_records": lost,
                                 "message": "records could not be written (disk full?)"})
                    lost = 0
                self._write(record)
                self.healthy = True
            except Exception:
                lost += 1
                self.healthy = False
                logger.exception("douane: cannot write the audit log %s", self.path)
        self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **record,
                  "seq": self._seq + 1, "prev": self._prev}
        record["mac"] = sign(record, self.key)
        line = canonical(record) + b"\n"
        if self._file.tell() and self._file.tell() + len(line) > self.config.max_bytes:
            self._rotate()
        good = self._file.tell()
        try:
            self._file.write(line)
            self._file.flush()
        except OSError:
            self._forget_unwritten(good)
            raise
        self._seq, self._prev = record["seq"], record["mac"]

    def _forget_unwritten(self, good: int) -> None:
        """Drop a record the disk refused: left in the buffer, it would be flushed later, after a
        record with the same sequence number, and break the chain (a partial line too)."""
        with contextlib.suppress(OSError):
            self._file.close()  # closes the file even when flushing the refused bytes fails
        with self.path.open("r+b") as f:
            f.truncate(good)
        self._file = self.path.open("ab")

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.config.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                if n == self.config.backups:
                    older.unlink()
                else:
                    older.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.rename(self.path.with_name(self.path.name + ".1"))
        self._file = self.path.open("ab")


@dataclass
class Verification:
    records: int
    files: int
    error: str | None  # "FILE:LINE: what is wrong", the first bad record

    @property
    def ok(self) -> bool:
        return self.error is None


def verify(path: Path, key: bytes) -> Verification:
    """Check the chain across rotated files, stopping at the first bad record."""
    files = log_files(path)
    count, seq, prev = 0, None, None
    for file in files:
        for lineno, line in _lines(file):
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
                rseq, rprev, mac = record["seq"], record["prev"], record["mac"]
            except (ValueError, KeyError, TypeError):
                return Verification(count, len(files), f"{where}: not an audit record")
            if not hmac.compare_digest(sign(record, key), str(mac)):
                return Verification(count, len(files), f"{where}: record was altered (bad MAC)")
            if seq is None:
                if rseq == 1 and rprev != GENESIS:
                    return Verification(count, len(files), f"{where}: first record is not the "
                                                           f"start of the chain")
            elif rseq != seq + 1:
                what = "deleted" if rseq > seq + 1 else "inserted or reordered"
                return Verification(count, len(files),
                                    f"{where}: records {what} (seq {rseq} follows {seq})")
            elif rprev != prev:
                return Verification(count, len(files), f"{where}: chain broken (prev mismatch)")
            seq, prev, count = rseq, mac, count + 1
    return Verification(count, len(files), None)


def _lines(file: Path) -> Iterator[tuple[int, bytes]]:
    with file.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def flow_record(flow: http.HTTPFlow, config: Config) -> dict[str, Any]:
    """The audit record of one flow's decision: claims and facts, never credentials or content."""
    st = state(flow)
    decision = st.decision.summary() if st.decision else {"action": "allow", "reasons": []}
    record: dict[str, Any] = {
        "event": "decision",
        "decision_id": st.decision_id,
        "flow_id": flow.id,
        "client": flow.client_conn.peername[0] if flow.client_conn.peername else None,
        "method": flow.request.method,
        "host": flow.request.host,
        "path": flow.request.path.split("?")[0],
        "upstream": st.upstream.name if st.upstream else None,
        **decision,
        "config_version": config.version,
        "latency_ms": {"total": round((time.monotonic() - st.started) * 1000, 3),
                       **st.timings_ms},
    }
    if st.identity:
        record.update(user=st.identity.user, groups=list(st.identity.groups),
                      issuer=st.identity.issuer)
    if st.interaction:
        record["interaction"] = st.interaction.summary()
        if st.interaction.model:
            record["model"] = st.interaction.model
    if st.policy_version:
        record["policy_version"] = st.policy_version
    if st.masked:
        record["masked"] = dict(st.masked)
    if flow.response:
        record["status"] = flow.response.status_code
    if flow.error:
        record["error"] = flow.error.msg
    return record


class AuditTrail:
    """Writes exactly one audit record per flow decision and tags responses with the decision id."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.log: AuditLog | None = None

    def configure(self, updated: set[str]) -> None:
        if "douane_config" in updated or self.log is None:
            config = self.settings.config
            if self.log is None or self.log.path != config.audit.path:
                if self.log:
                    self.log.close()
                self.log = AuditLog(config.audit, hmac_key(config))

    def done(self) -> None:
        if self.log:
            self.log.close()

    def append(self, record: dict[str, Any]) -> None:
        """An audit record for an event that is not a flow decision (approvals, retention...)."""
        assert self.log
        self.log.append(record)

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Fail closed: no request goes upstream while its decision cannot be recorded.
        if self.log and not self.log.healthy and not flow.response and flow.live:
            refuse(flow, 503, "the audit log cannot be written; douane refuses traffic until it "
                   "can", "audit_unavailable", Reason("audit.unavailable", "audit log not writable"))

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
        if flow.response and peek(flow):
            flow.response.headers[DECISION_HEADER] = state(flow).decision_id

    def _record(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if st is None or st.audited or self.log is None:
            return  # not a live flow of this gateway (read back with -r, replayed) or done
        st.audited = True
        publish(flow)
        self.log.append(flow_record(flow, self.settings.config))
