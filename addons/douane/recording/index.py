"""The index of recordings: one row per flow, rebuildable from the `.mitm` files.

Embedded default: a SQLite file beside the recordings, one per writer. With a shared store
(`database:`), one `flows` table in PostgreSQL for the whole fleet (schema in douane.store.schema):
each row also names the replica that holds the recording, and its `file` is relative to the
configured `recording.dir` on that replica's host (a worker's `wN/` folder included), so
`douane sessions` on any host lists every replica's flows and reads the files of its own host.
The same functions serve both: `db` is a sqlite3 or a psycopg connection.
"""

from __future__ import annotations

import json
import re
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
STORE_COLUMNS = (*COLUMNS, "replica")


def _store(db: Any) -> bool:
    return not isinstance(db, sqlite3.Connection)


def _columns(db: Any) -> tuple[str, ...]:
    return STORE_COLUMNS if _store(db) else COLUMNS


def _sql(db: Any, text: str) -> str:
    """`?` placeholders as the connection's driver wants them (psycopg: %s)."""
    return text.replace("?", "%s") if _store(db) else text


def _names(columns: tuple[str, ...]) -> str:
    return ", ".join(f'"{c}"' for c in columns)  # "user" and "offset" are reserved in SQL


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


def row(flow: http.HTTPFlow, file: str, offset: int) -> dict[str, Any]:
    """The index row of a recorded flow, from the metadata douane put on it."""
    return dict(zip(COLUMNS, _row(flow.id, flow.request.timestamp_start, flow.metadata,
                                  flow.response.status_code if flow.response else None, file,
                                  offset), strict=True))


def state_row(state: dict[str, Any], file: str, offset: int,
              replica: str | None = None) -> tuple:
    """`row` of the flow whose state (`flow.get_state()`) the writer wrote, as `insert_rows`
    takes it: its values in COLUMNS' order (then `replica`, in a shared store)."""
    values = _row(state["id"], state["request"]["timestamp_start"], state["metadata"],
                  state["response"]["status_code"] if state["response"] else None, file, offset)
    return values if replica is None else (*values, replica)


def _row(flow_id: str, ts: float, metadata: dict[str, Any], status: int | None, file: str,
         offset: int) -> tuple:
    meta = metadata.get("douane", {})
    identity = meta.get("identity", {})
    interaction = meta.get("interaction", {})
    decision = meta.get("decision", {})
    masked = meta.get("masked", {})
    tool = interaction.get("tool")
    return (flow_id, meta.get("decision_id"), ts, identity.get("user", "anonymous"),
            ",".join(identity.get("groups", [])), meta.get("upstream"), interaction.get("model"),
            interaction.get("operation"),
            tool if isinstance(tool, str) else json.dumps(tool) if tool else None,
            decision.get("action", "allow"), decision.get("risk", 0.0), sum(masked.values()),
            json.dumps(masked) if masked else None, status, meta.get("latency_ms"), file, offset)


def insert(db: Any, rows: list[dict[str, Any]]) -> None:
    """Store rows carry `replica` too."""
    columns = _columns(db)
    insert_rows(db, [tuple(r[c] for c in columns) for r in rows])


def insert_rows(db: Any, rows: list[tuple]) -> None:
    """`insert` of rows as tuples, in `_columns(db)`'s order (no dict a row: the writer's)."""
    columns = _columns(db)
    verb = "INSERT" if _store(db) else "INSERT OR REPLACE"
    conflict = " ON CONFLICT (flow_id) DO UPDATE SET " + ", ".join(
        f'"{c}" = excluded."{c}"' for c in columns[1:]) if _store(db) else ""
    with _transaction(db):
        db.cursor().executemany(
            _sql(db, f"{verb} INTO flows ({_names(columns)}) VALUES "
                     f"({', '.join('?' for _ in columns)}){conflict}"), rows)


def _transaction(db: Any) -> Any:
    return db.transaction() if _store(db) else db  # sqlite3: `with db` commits


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


WORKER_FOLDER = re.compile(r"w\d{1,3}")  # `scripts/run --workers`: recordings/wN/


def replica_of(relative: Path, host: str) -> str:
    """The replica of this host that wrote a recording file (relative to `recording.dir`)."""
    worker = relative.parts[0] if len(relative.parts) > 1 else ""
    return f"{host}/{worker}" if WORKER_FOLDER.fullmatch(worker) else host


def local(replica: str | None, host: str) -> bool:
    """Whether a row's recording is on this host (its own or one of its workers')."""
    return replica is None or replica == host or replica.startswith(host + "/")


def reindex(db: Any, root: Path, host: str = "") -> int:
    """Rebuild the index from every .mitm file under `root`. In a shared store, only this host's
    rows: its own (`host`) and its workers' (`host/wN`, the files under `root/wN/`)."""
    count = 0
    with _transaction(db):
        if _store(db):
            db.execute("DELETE FROM flows WHERE replica = %s OR left(replica, %s) = %s",
                       (host, len(host) + 1, host + "/"))
        else:
            db.execute("DELETE FROM flows")
    for path in sorted(root.rglob("*.mitm")):
        relative = path.relative_to(root)
        rows = [{**row(flow, str(relative), offset), "replica": replica_of(relative, host)}
                for offset, flow in read_flows(path)]
        insert(db, rows)
        count += len(rows)
    return count


def query(db: Any, user: str | None = None, since: float | None = None,
          decision: str | None = None, tool: str | None = None,
          limit: int = 100) -> list[dict[str, Any]]:
    """Newest first; limit < 0: all."""
    where, args = [], []
    for clause, value in (('"user" = ?', user), ("ts >= ?", since), ("decision = ?", decision),
                          ("tool = ?", tool)):
        if value is not None:
            where.append(clause)
            args.append(value)
    columns = _columns(db)
    sql = f"SELECT {_names(columns)} FROM flows"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC LIMIT ?"
    limit_arg = None if limit < 0 and _store(db) else limit  # PostgreSQL: LIMIT NULL is all
    return [dict(zip(columns, r, strict=True))
            for r in db.execute(_sql(db, sql), (*args, limit_arg)).fetchall()]


def find(db: Any, ident: str) -> dict[str, Any] | None:
    """A flow by decision id or flow id."""
    columns = _columns(db)
    r = db.execute(_sql(db, f"SELECT {_names(columns)} FROM flows WHERE decision_id = ? OR "
                            f"flow_id = ?"), (ident, ident)).fetchone()
    return dict(zip(columns, r, strict=True)) if r else None


def delete_file(db: Any, file: str, replica: str | None = None) -> None:
    """The rows of a deleted recording file (of this replica, in a shared store)."""
    if _store(db):
        db.execute('DELETE FROM flows WHERE file = %s AND replica = %s', (file, replica))
    else:
        db.execute("DELETE FROM flows WHERE file = ?", (file,))

