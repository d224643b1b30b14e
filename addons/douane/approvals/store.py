"""Approval requests (in memory: they live as long as the flow or the retry window) and the grants
approvers give (SQLite, so a time-boxed grant survives a restart).

A grant lets `user` send `subject` (the MCP tool, else the model) to `upstream` until `expires_at`.
A one-shot grant (answer mode, approved for "this request only") also pins the request's
fingerprint, so the approved retry passes once and an edited retry does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from douane.flowstate import Identity
from douane.interaction import Interaction
from douane.sqlitethread import SqliteThread

SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, upstream TEXT NOT NULL, subject TEXT NOT NULL,
    fingerprint TEXT, uses_left INTEGER, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    approval_id TEXT NOT NULL, approver TEXT NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS grants_lookup ON grants (user, upstream, subject);
"""


def subject_of(it: Interaction) -> str:
    """What a grant names: the MCP tool called, else the model, else the operation."""
    tools = [m.tool for m in it.mcp if m.tool]
    return ",".join(tools) if tools else it.model or it.operation


def fingerprint(upstream: str, it: Interaction) -> str:
    """Identifies "the same request" across retries (JSON-RPC ids, headers and an MCP message's
    `_meta` values may differ: a client sets a progress token or trace context anew each time;
    they are inspected all the same)."""
    doc = [upstream, it.operation, it.model, subject_of(it),
           [m.params.get("arguments") for m in it.mcp if m.tool],
           [(p.kind, p.text) for p in it.texts if not _meta(p.path)]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _meta(path: tuple) -> bool:
    at = 1 if path and isinstance(path[0], int) else 0  # a batch's message
    return path[at:at + 2] == ("params", "_meta")


@dataclass
class Pending:
    """One approval request, from "requested" to its outcome."""

    id: str
    requester: Identity
    upstream: str
    protocol: str
    operation: str
    subject: str
    model: str | None
    fingerprint: str
    decision_id: str
    mode: str  # hold | answer
    reasons: list[dict[str, Any]]
    risk: float
    preview: list[dict[str, str]]  # prompt or tool arguments, masked where masking applies
    created_at: float
    expires_at: float
    status: str = "pending"  # approved, denied, timed_out, abandoned
    approver: str | None = None
    reason: str | None = None
    grant_seconds: int | None = None  # approved for a time box
    decided_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def decide(self, status: str, approver: str | None, reason: str | None,
               grant_seconds: int | None = None) -> None:
        self.status, self.approver, self.reason = status, approver, reason
        self.grant_seconds, self.decided_at = grant_seconds, time.time()
        self.done.set()

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "mode": self.mode,
                "user": self.requester.user, "groups": list(self.requester.groups),
                "upstream": self.upstream, "protocol": self.protocol,
                "operation": self.operation, "subject": self.subject, "model": self.model,
                "decision_id": self.decision_id, "reasons": self.reasons, "risk": self.risk,
                "preview": self.preview, "created_at": self.created_at,
                "expires_at": self.expires_at, "approver": self.approver, "reason": self.reason,
                "grant_seconds": self.grant_seconds, "decided_at": self.decided_at}


def new_approval_id() -> str:
    return "apr_" + secrets.token_hex(8)


@dataclass(frozen=True)
class Grant:
    id: str
    user: str
    upstream: str
    subject: str
    fingerprint: str | None
    uses_left: int | None  # None: any number of uses until it expires
    created_at: float
    expires_at: float
    approval_id: str
    approver: str
    reason: str


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.executescript(SCHEMA)
    return db


class GrantStore:
    """SQLite grants, every call run on one dedicated thread (the event loop only awaits)."""

    def __init__(self, path: Path):
        self.path = path
        self._db = SqliteThread(path, "douane-approvals-db", _connect)

    def add_sync(self, grant: Grant) -> None:
        self._db.conn().execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?,?,?)", (
            grant.id, grant.user, grant.upstream, grant.subject, grant.fingerprint,
            grant.uses_left, grant.created_at, grant.expires_at, grant.approval_id,
            grant.approver, grant.reason))

    def use_sync(self, user: str, upstream: str, subject: str, fp: str,
                 now: float) -> Grant | None:
        """The matching unexpired grant, one use of a one-shot grant consumed."""
        db = self._db.conn()
        db.execute("DELETE FROM grants WHERE expires_at <= ? OR uses_left = 0", (now,))
        row = db.execute(
            "SELECT * FROM grants WHERE user = ? AND upstream = ? AND subject = ? AND "
            "(fingerprint IS NULL OR fingerprint = ?) AND expires_at > ? "
            "ORDER BY fingerprint IS NULL, expires_at DESC LIMIT 1",
            (user, upstream, subject, fp, now)).fetchone()
        if row is None:
            return None
        if row["uses_left"] is not None:
            db.execute("UPDATE grants SET uses_left = uses_left - 1 WHERE id = ?", (row["id"],))
        return Grant(**dict(row))

    def active_sync(self, now: float) -> list[Grant]:
        rows = self._db.conn().execute("SELECT * FROM grants WHERE expires_at > ? AND "
                                       "(uses_left IS NULL OR uses_left > 0) ORDER BY expires_at",
                                       (now,)).fetchall()
        return [Grant(**dict(r)) for r in rows]

    async def add(self, grant: Grant) -> None:
        await self._db.run(self.add_sync, grant)

    async def use(self, user: str, upstream: str, subject: str, fp: str) -> Grant | None:
        return await self._db.run(self.use_sync, user, upstream, subject, fp, time.time())

    async def active(self) -> list[Grant]:
        return await self._db.run(self.active_sync, time.time())

    def close(self) -> None:
        self._db.close()
