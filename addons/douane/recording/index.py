"""The SQLite index of recordings: one row per flow, rebuildable from the `.mitm` files."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, http, io

SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    flow_id TEXT PRIMARY KEY, decision_id TEXT, ts REAL, user TEXT, groups TEXT,
    upstream TEXT, model TEXT, operation TEXT, tool TEXT, decision TEXT, risk REAL,
    masked INTEGER, masked_types TEXT, status INTEGER, latency_ms REAL, file TEXT, offset INTEGER
);
CREATE INDEX IF NOT EXISTS flows_user_ts ON flows (user, ts);
CREATE INDEX IF NOT EXISTS flows_ts ON flows (ts);
CREATE INDEX IF NOT EXISTS flows_decision_id ON flows (decision_id);
"""
COLUMNS = ("flow_id", "decision_id", "ts", "user", "groups", "upstream", "model", "operation",
           "tool", "decision", "risk", "masked", "masked_types", "status", "latency_ms", "file",
           "offset")


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


def row(flow: http.HTTPFlow, file: str, offset: int) -> dict[str, Any]:
    """The index row of a recorded flow, from the metadata douane put on it."""
    meta = flow.metadata.get("douane", {})
    identity = meta.get("identity", {})
    interaction = meta.get("interaction", {})
    decision = meta.get("decision", {})
    masked = meta.get("masked", {})
    tool = interaction.get("tool")
    return {
        "flow_id": flow.id, "decision_id": meta.get("decision_id"),
        "ts": flow.request.timestamp_start, "user": identity.get("user", "anonymous"),
        "groups": ",".join(identity.get("groups", [])), "upstream": meta.get("upstream"),
        "model": interaction.get("model"), "operation": interaction.get("operation"),
        "tool": tool if isinstance(tool, str) else json.dumps(tool) if tool else None,
        "decision": decision.get("action", "allow"), "risk": decision.get("risk", 0.0),
        "masked": sum(masked.values()), "masked_types": json.dumps(masked) if masked else None,
        "status": flow.response.status_code if flow.response else None,
        "latency_ms": meta.get("latency_ms"), "file": file, "offset": offset,
    }


def insert(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    db.executemany(f"INSERT OR REPLACE INTO flows ({', '.join(COLUMNS)}) VALUES "
                   f"({', '.join('?' for _ in COLUMNS)})",
                   [tuple(r[c] for c in COLUMNS) for r in rows])
    db.commit()


def read_flows(path: Path) -> Iterator[tuple[int, http.HTTPFlow]]:
    """(offset, flow) for each complete flow; a truncated last record (a crash mid-write) ends
    the file quietly."""
    with path.open("rb") as f:
        reader = io.FlowReader(f)
        while True:
            offset = f.tell()
            try:
                flow = next(iter(reader.stream()), None)
            except exceptions.FlowReadException:
                return
            if flow is None:
                return
            if isinstance(flow, http.HTTPFlow):
                yield offset, flow


def reindex(db: sqlite3.Connection, root: Path) -> int:
    """Rebuild the index from every .mitm file under `root`."""
    db.execute("DELETE FROM flows")
    count = 0
    for path in sorted(root.rglob("*.mitm")):
        rows = [row(flow, str(path.relative_to(root)), offset)
                for offset, flow in read_flows(path)]
        insert(db, rows)
        count += len(rows)
    return count


def query(db: sqlite3.Connection, user: str | None = None, since: float | None = None,
          decision: str | None = None, tool: str | None = None,
          limit: int = 100) -> list[dict[str, Any]]:
    where, args = [], []
    for clause, value in (("user = ?", user), ("ts >= ?", since), ("decision = ?", decision),
                          ("tool = ?", tool)):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = f"SELECT {', '.join(COLUMNS)} FROM flows"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC LIMIT ?"
    return [dict(zip(COLUMNS, r, strict=True)) for r in db.execute(sql, (*args, limit))]


def find(db: sqlite3.Connection, ident: str) -> dict[str, Any] | None:
    """A flow by decision id or flow id."""
    r = db.execute(f"SELECT {', '.join(COLUMNS)} FROM flows WHERE decision_id = ? OR "
                   f"flow_id = ?", (ident, ident)).fetchone()
    return dict(zip(COLUMNS, r, strict=True)) if r else None

