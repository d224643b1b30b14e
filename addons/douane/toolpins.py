"""MCP tools that cannot change behind the operator's back ("rug pull"), nor hide instructions.

Each tool an MCP upstream lists is pinned by a digest of its definition (name, description,
inputSchema, outputSchema, annotations), kept in `<state_dir>/tools.sqlite3`. The first listing
of an upstream is trusted and pinned (`tools.pinned`); afterwards a tool whose definition differs
from its pin (`tools.changed`), a tool that was not in it (`tools.added`) and a tool gone from a
complete listing (`tools.removed`) are audited, and the changed or added tool is withheld until an
operator accepts it (`douane tools accept`): hidden from listings (`tool_changes: hide`, the
default) or the whole listing refused (`refuse`), and calls to it refused either way.

Every listed tool (and prompt) is also scanned for instructions aimed at the model: the injection
detectors the policy runs on tool results, read through the deny rules' normalisation, invisible
characters in the raw text, and a URL next to a word that sends data. A hit withholds the tool like
a change (`tools.poisoned`), even at first sight; an operator may accept it all the same.

Annotations (`readOnlyHint`, `destructiveHint`, ...) are the server's claims: they are pinned, so
changing them is a change, but no decision of douane reads them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import mmap
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import http

from douane import protocols
from douane.audit import AuditTrail
from douane.flowstate import FlowState, Reason, state
from douane.policy import detectors
from douane.policy.normalize import BLANKS, TAGS, normalize, unseen
from douane.protocols import jsonpath, mcp, streams
from douane.refusals import refuse
from douane.settings import Settings
from douane.untrusted import escape

NAME_CHARS = mcp.NAME_CHARS
PINNED_FIELDS = ("name", "description", "inputSchema", "outputSchema", "annotations")
DEFINITION_CHARS = 64 * 1024  # a larger definition is withheld, never stored
REASON_CHARS = 200
REFUSALS_KEPT = 4096  # tools' refusals `PinStore` keeps between two changes of the file
WAL_HEADER = 96  # the WAL-index header's two copies
URL = re.compile(r"\b(?:https?|ftp|wss?)://|\bwww\.")
SENDING = re.compile(r"\b(?:send|sends|sent|collect|post|upload|forward|exfiltrate|transmit|"
                     r"email|report)\b")
SCHEMA = """
CREATE TABLE IF NOT EXISTS tools (
    upstream TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    digest TEXT, definition TEXT, candidate_digest TEXT, candidate TEXT, reason TEXT,
    first_seen REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (upstream, name));
CREATE TABLE IF NOT EXISTS baselines (upstream TEXT PRIMARY KEY, complete_at REAL);
"""
# state: pinned (listed as accepted), changed, added, poisoned (withheld), removed
# A tool's pin (NULLs: none) and whether its upstream was ever listed, in one row.
REFUSAL = """
SELECT t.state, t.reason, b.upstream IS NOT NULL AS listed
FROM (SELECT ? AS upstream, ? AS name) AS q
LEFT JOIN tools AS t USING (upstream, name) LEFT JOIN baselines AS b ON b.upstream = q.upstream
"""


def canonical(tool: dict[str, Any]) -> str:
    """The pinned part of a tool definition as canonical JSON (key order, no spaces)."""
    pinned = {k: tool[k] for k in PINNED_FIELDS if k in tool}
    return json.dumps(pinned, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(definition: str) -> str:
    return hashlib.sha256(definition.encode()).hexdigest()


def _lists(doc: Any) -> bool:
    """Whether a JSON-RPC body holds a result listing tools or prompts (what `_police` reads)."""
    return any(isinstance(result := msg.get("result"), dict) and (
        isinstance(result.get("tools"), list) or isinstance(result.get("prompts"), list))
        for _, msg in mcp.each(doc) if isinstance(msg, dict))


def invisible(text: str) -> bool:
    """Characters a reader does not see: format characters (zero-width, bidi controls), tag
    characters, and blanks that are neither."""
    return not text.isascii() and any(
        unicodedata.category(c) == "Cf" or ord(c) in TAGS or c in BLANKS for c in text)


def read_texts(item: dict[str, Any]) -> list[str]:
    """What a model reads of a listed tool or prompt: every string but its name (descriptions
    and titles, in its schemas too, but also enum values, defaults, examples, annotations)."""
    return [text for path, text in jsonpath.strings(item, ()) if path != ("name",)]


def scan(item: dict[str, Any]) -> str | None:
    """Why a listed tool or prompt looks like it carries instructions for the model, or None."""
    for text in read_texts(item):
        if invisible(text):
            return "invisible characters in its description"
        for plain in filter(None, (normalize(text), unseen(text))):
            hits = detectors.injections(plain)
            if hits:
                return f"prompt-injection phrasing in its description ({hits[0][0]})"
            if URL.search(plain) and SENDING.search(plain):
                return "a URL next to a word that sends data in its description"
    return None


@dataclass
class Outcome:
    """What a listing did to the pins: audit events, and the tools withheld from the caller."""

    events: list[dict[str, Any]]
    withheld: dict[str, str]  # tool name -> why


def _wal_index(path: Path) -> mmap.mmap | None:
    """The database's WAL-index (`-shm`, SQLite's shared memory in WAL mode) mapped read-only,
    for its header (https://www.sqlite.org/walformat.html: two copies of 48 bytes, each commit
    writes both); None if it cannot be (every check is then the statement)."""
    try:
        with open(f"{path}-shm", "rb") as f:
            shm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    if len(shm) < WAL_HEADER:
        shm.close()
        return None
    return shm


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
    db.row_factory = sqlite3.Row
    # WAL: a commit is an append (no fsync of the database, readers never wait on a writer)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


class PinStore:
    """The pins of every MCP upstream: one small transaction per listing or call on a local
    SQLite file in WAL mode, done where the hook runs (a thread for a JSON answer, the event loop
    for a streamed one: hence the lock); `douane tools accept` writes to the same file."""

    def __init__(self, path: Path):
        self.path = path
        self._db: sqlite3.Connection | None = None
        self.lock = threading.Lock()
        # each tool's refusal as last read, while the file holds no other connection's commit
        # (`PRAGMA data_version`: ~3x cheaper than the query) nor one of ours (`listed`)
        self._refusals: dict[tuple[str, str], str | None] = {}
        self._version: int | None = None
        # ... and, before that statement, the WAL-index header as last read (`_changed`)
        self._shm: mmap.mmap | None = None
        self._header: bytes | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect(self.path)
            self._shm = _wal_index(self.path)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._shm is not None:
            self._shm.close()
            self._shm = self._header = None

    def listed(self, upstream: str, tools: list[Any], complete: bool) -> Outcome:
        """Record one listing (a page of it unless `complete`) and say what it withholds."""
        with self.lock:
            self._refusals.clear()
            return self._listed(upstream, tools, complete)

    def _listed(self, upstream: str, tools: list[Any], complete: bool) -> Outcome:
        now = time.time()
        out = Outcome([], {})
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            base = db.execute("SELECT complete_at FROM baselines WHERE upstream = ?",
                              (upstream,)).fetchone()
            if base is None:
                db.execute("INSERT INTO baselines VALUES (?, NULL)", (upstream,))
            first = base is None or base["complete_at"] is None  # trust on first listing
            named = [t for t in tools if isinstance(t, dict) and valid_name(t.get("name"))]
            seen: set[str] = set()
            twice = {t["name"] for t in named if t["name"] in seen or seen.add(t["name"])}
            for name in twice:  # which definition would the server run? Neither until accepted.
                out.withheld[name] = "it is listed twice"
                db.execute("UPDATE tools SET state = 'changed', candidate_digest = NULL, "
                           "candidate = NULL, reason = ?, updated_at = ? WHERE upstream = ? AND "
                           "name = ?", (out.withheld[name], now, upstream, name))
                out.events.append(event("tools.changed", upstream, name,
                                        reason=out.withheld[name]))
            rows = {r["name"]: r for r in db.execute("SELECT * FROM tools WHERE upstream = ?",
                                                     (upstream,))}
            for tool in named:
                name = tool["name"]
                if name in twice:
                    continue
                why = self._one(db, upstream, rows.get(name), tool, first, now, out.events)
                if why:
                    out.withheld[name] = why
            if complete:
                db.execute("UPDATE baselines SET complete_at = ? WHERE upstream = ? AND "
                           "complete_at IS NULL", (now, upstream))
                for row in db.execute("SELECT name FROM tools WHERE upstream = ? AND state != "
                                      "'removed'", (upstream,)).fetchall():
                    if row["name"] not in seen:
                        db.execute("UPDATE tools SET state = 'removed', updated_at = ? WHERE "
                                   "upstream = ? AND name = ?", (now, upstream, row["name"]))
                        out.events.append(event("tools.removed", upstream, row["name"]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    @staticmethod
    def _one(db: sqlite3.Connection, upstream: str, row: sqlite3.Row | None,
             tool: dict[str, Any], first: bool, now: float,
             events: list[dict[str, Any]]) -> str | None:
        name = tool["name"]
        definition = canonical(tool)
        d = digest(definition)
        stored = definition if len(definition) <= DEFINITION_CHARS else None
        if row is not None and row["digest"] == d:  # the accepted definition: listed
            if row["state"] != "pinned":
                db.execute("UPDATE tools SET state = 'pinned', candidate_digest = NULL, "
                           "candidate = NULL, reason = NULL, updated_at = ? WHERE upstream = ? "
                           "AND name = ?", (now, upstream, name))
            return None
        if row is not None and row["candidate_digest"] == d and row["state"] != "removed":
            return row["reason"]  # already reported
        why = "its definition is larger than douane stores" if stored is None else scan(tool)
        if row is None and first and why is None:
            db.execute("INSERT INTO tools VALUES (?, ?, 'pinned', ?, ?, NULL, NULL, NULL, ?, ?)",
                       (upstream, name, d, stored, now, now))
            events.append(event("tools.pinned", upstream, name, digest=d))
            return None
        accepted = row["digest"] if row is not None else None
        state = "poisoned" if why else "changed" if accepted else "added"
        why = why or ("its definition changed since it was accepted" if accepted else
                      "it was not in the first listing")
        if row is None:
            db.execute("INSERT INTO tools VALUES (?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?)",
                       (upstream, name, state, d, stored, why, now, now))
        else:
            db.execute("UPDATE tools SET state = ?, candidate_digest = ?, candidate = ?, "
                       "reason = ?, updated_at = ? WHERE upstream = ? AND name = ?",
                       (state, d, stored, why, now, upstream, name))
        events.append(event(f"tools.{state}", upstream, name, digest=d, pinned_digest=accepted,
                            reason=why))
        return why

    def refusal(self, upstream: str, name: str) -> str | None:
        """Why a call to this tool is refused (None: it may be called). An upstream never listed
        through douane has no pins: its calls are left to the policy."""
        with self.lock:
            return self._refusal(upstream, name)

    def _changed(self) -> bool:
        """Whether another connection may have committed since the last call. It runs on the
        event loop for every tools/call: a statement cost ~25-35 us there (SQLite's code and
        locks, cold), a read of the WAL-index header (`_wal_index`) ~1: every commit of every
        connection rewrites it (its frame count and change counter), so while it reads as
        before, nothing was committed since the statement that followed that read."""
        db = self.db
        if self._shm is not None:
            header = self._shm[:WAL_HEADER]
            if header == self._header:
                return False
            self._header = header
        version = db.execute("PRAGMA data_version").fetchone()[0]
        changed, self._version = version != self._version, version
        return changed

    def _refusal(self, upstream: str, name: str) -> str | None:
        if self._changed() or len(self._refusals) >= REFUSALS_KEPT:
            self._refusals.clear()
        key = (upstream, name)
        if key not in self._refusals:
            self._refusals[key] = self._read_refusal(upstream, name)
        return self._refusals[key]

    def _read_refusal(self, upstream: str, name: str) -> str | None:
        row = self.db.execute(REFUSAL, (upstream, name)).fetchone()
        if row["state"] is not None:  # the tool's row (state is never NULL in it)
            return None if row["state"] == "pinned" else \
                "it was removed from the upstream's listing" if row["state"] == "removed" else \
                row["reason"]
        return "it was never in the upstream's listing" if row["listed"] else None


def event(name: str, upstream: str, tool: str, **fields: Any) -> dict[str, Any]:
    record = {"event": name, "upstream": upstream, "tool": tool}
    record.update({k: v[:REASON_CHARS] if isinstance(v, str) else v for k, v in fields.items()
                   if v is not None})
    return record


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= NAME_CHARS and name.isprintable()


class PinTools:
    """Pins and scans what MCP upstreams list; withholds what changed or looks poisoned. Runs
    before `Enforce`, which narrows a listing to the caller's grants: pins see it whole."""

    def __init__(self, settings: Settings, audit_trail: AuditTrail):
        self.settings, self.audit_trail = settings, audit_trail
        self.store: PinStore | None = None
        self.calls = PinnedCalls(self)
        self.prompts_reported: set[tuple[str, str, str]] = set()  # audited once per process

    def configure(self, updated: set[str]) -> None:
        path = self.settings.config.state_dir / "tools.sqlite3"
        if self.store is None or self.store.path != path:
            if self.store:
                self.store.close()
            self.store = PinStore(path)

    def done(self) -> None:
        if self.store:
            self.store.close()

    @staticmethod
    def _mcp(flow: http.HTTPFlow) -> FlowState | None:
        st = state(flow)
        ok = st.upstream is not None and st.upstream.protocol == "mcp" and \
            st.interaction is not None and flow.live
        return st if ok else None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rewriter = streams.rewriter_of(flow)
        if rewriter is not None and self._mcp(flow):
            rewriter.message_hooks.append(lambda doc: self._police(flow, doc, lambda why: (
                state(flow).decide("block", Reason("tools.withheld", why)), rewriter.abort(why))))

    async def response(self, flow: http.HTTPFlow) -> None:
        st = self._mcp(flow)
        if st is None or streams.rewriter_of(flow) or not flow.response or \
                not flow.response.raw_content or \
                (st.decision and st.decision.action in ("block", "refuse", "error", "hold")):
            return
        doc = protocols.document(flow, "response")
        if not _lists(doc):
            return  # nothing to pin or scan (a tool's result): no thread hop for it
        refused: list[str] = []
        # off the loop: a first listing scans and writes every tool (the flow waits here)
        if await asyncio.to_thread(self._police, flow, doc, refused.append):
            protocols.write_json(flow, "response", doc)
        if refused:
            refuse(flow, 403, refused[0], "tools_withheld",
                   Reason("tools.withheld", refused[0]), action="block")

    def _police(self, flow: http.HTTPFlow, doc: Any, abort: Callable[[str], None]) -> bool:
        """Pin and scan the listings in one JSON-RPC body or event; True if it was edited."""
        st = state(flow)
        assert self.store and st.upstream and st.interaction
        removals: list[tuple] = []
        for base, msg in mcp.each(doc):
            result = msg.get("result") if isinstance(msg, dict) else None
            if not isinstance(result, dict):
                continue
            method = mcp.answered_method(st.interaction, msg)
            if method in ("tools/list", None) and isinstance(result.get("tools"), list):
                tools = result["tools"]
                asked = mcp.requests_by_id(st.interaction).get(mcp.id_key(msg.get("id")) or "")
                complete = method is not None and asked is not None and \
                    not asked.params.get("cursor") and not result.get("nextCursor")
                outcome = self.store.listed(st.upstream.name, tools, complete)
                for record in outcome.events:
                    self._audit(st, record)
                hidden = [i for i, t in enumerate(tools) if not isinstance(t, dict) or
                          not valid_name(t.get("name")) or t["name"] in outcome.withheld]
                if hidden and st.upstream.tool_changes == "refuse":
                    abort(f"the MCP server lists {len(hidden)} tool(s) an operator has not "
                          f"accepted (douane tools list): {withheld(outcome)}")
                    return False
                if hidden:
                    st.decide("allow", Reason("tools.withheld", f"{len(hidden)} tool(s) withheld "
                                              f"from tools/list: {withheld(outcome)}"))
                removals += [(*base, "result", "tools", i) for i in hidden]
            if method in ("prompts/list", None) and isinstance(result.get("prompts"), list):
                hidden = [i for i, p in enumerate(result["prompts"]) if self._poisoned(st, p)]
                if hidden:
                    st.decide("allow", Reason("prompts.withheld", f"{len(hidden)} prompt(s) "
                                              "withheld from prompts/list"))
                removals += [(*base, "result", "prompts", i) for i in hidden]
        jsonpath.delete(doc, removals)
        return bool(removals)

    def _poisoned(self, st: FlowState, prompt: Any) -> bool:
        if not isinstance(prompt, dict):
            return True
        why = scan(prompt)
        if why:
            key = (st.upstream.name if st.upstream else "", str(prompt.get("name"))[:NAME_CHARS],
                   digest(canonical(prompt)))
            if key not in self.prompts_reported and len(self.prompts_reported) < 10_000:
                self.prompts_reported.add(key)
                self._audit(st, event("prompts.poisoned", key[0], key[1], reason=why))
        return why is not None

    def _audit(self, st: FlowState, record: dict[str, Any]) -> None:
        record.update(flow_decision_id=st.decision_id, user=st.identity.user if st.identity else None)
        self.audit_trail.append(record)


def withheld(outcome: Outcome) -> str:
    names = sorted(outcome.withheld.items())
    return ", ".join(f"{escape(n[:64])} ({why})" for n, why in names[:5]) + \
        (f" and {len(names) - 5} more" if len(names) > 5 else "")


class PinnedCalls:
    """Refuses calls to a tool its upstream's pins withhold. Runs after `Enforce` (its grant and
    risk reasons come first) and before `Approvals` (a withheld tool is not worth an approver)."""

    def __init__(self, pins: PinTools):
        self.pins = pins

    def request(self, flow: http.HTTPFlow) -> None:
        st = PinTools._mcp(flow)
        if st is None or flow.response or flow.error or self.pins.store is None:
            return
        assert st.upstream and st.interaction
        for msg in st.interaction.mcp:
            why = self.pins.store.refusal(st.upstream.name, msg.tool) if msg.tool else None
            if why:
                message = (f"tool {escape(msg.tool[:64])} is withheld until an operator accepts "
                           f"it (douane tools accept): {why}")
                refuse(flow, 403, message, "tool_withheld", Reason("tools.withheld", message,
                                                                   "params.name"), action="block")
                return
