"""State an upstream keeps for one user, named by an id it issued: an MCP session, a stored
Responses answer (`previous_response_id` continues it, the whole conversation with it), a
conversation (`conversation` in a Responses request, the Conversations API), a stored chat
completion, a Responses answer's output items (named again in `input`: an `item_reference`, any
item's `id`, an `approval_request_id`) and a conversation's items, a code-execution container with
the files uploaded into it (Anthropic's `container`, an OpenAI `code_interpreter` tool's
`container`, `/v1/containers/{id}`), an uploaded file (`/v1/files/{id}`, a `file_id` or
`file_ids` anywhere in a body), a vector store (`vector_store_ids` of a `file_search` tool), a
batch, an upload, a fine-tuning job, an assistant (a run's `assistant_id`), an Assistants thread
(with its messages, runs and run steps), an eval (with its runs), a video, a skill, and an MCP
`requestState` (bound as the event carrying it is read, when streamed).

douane sends every user's requests to an upstream with one credential, so such an id is all the
upstream tells users apart by: another user holding it (from a screen, a log, a recording) would
continue that conversation or act in that session. Each id is bound to the user it was issued to,
in douane's store (`<state_dir>/owners.sqlite3`, shared by the workers of a host; the shared
PostgreSQL with `database:`), so a binding holds on every replica and across restarts; each
process keeps the latest it used in memory. Another user naming a bound id is refused as the
upstream refuses an id it does not know. The store keeps a digest of each id (never the id), a
binding unused for `TTL_SECONDS`, and a user's oldest past `PER_USER` per kind, are forgotten.

An id the store does not hold (unseen):
- an MCP session is refused (404, as the spec has a server answer a session it does not know: the
  client starts a new one). douane writes each session's binding before its id reaches the
  client, so an unseen session was never issued through douane (a forged id, one from before
  douane, one forgotten): nobody is refused their own.
- an output item or a container is refused (404): douane binds every Responses answer's items
  (stored or not, its first `ITEM_IDS`; a stream's in its `response.completed`), a conversation's
  items it lists or adds, the containers an answer names (Anthropic's `container.id`, a
  `code_interpreter_call`'s `container_id`) or a granted `POST /v1/containers` made, so nobody had
  one before douane had the answer. An item below its conversation's path (the conversation is
  the caller's) is adopted. A user's own items from before douane, or forgotten, are resent by
  content (a new container is started).
- any other goes upstream and, when the upstream answers it (so it exists), is bound to that
  user: adopted. Ids issued before douane was deployed live
  for weeks (conversations for good) and are named by no binding; refusing them would take every
  user's earlier conversations away, passing them would leave them to anyone for good. Adopted,
  each is its first user's from then on. An id never answered (a guess) grows no row. Files
  are always adopted: they are uploaded as multipart bodies, which douane refuses, so it sees
  none issued but the files a batch, an upload, a fine-tuning job or an Anthropic code execution
  made (bound).
A store that cannot answer refuses what needs it (503 `store_unavailable`, `store.unavailable`).

A granted listing of the org's stored objects is the caller's own: filtered for the kinds douane
binds, refused for the others (`BOUND_LISTING`, `ORG_LISTING`), unless a grant naming it says
`org_listings: true`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
import urllib.parse
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import http

from douane import headerfields, protocols
from douane.flowstate import Reason, state
from douane.policy.model import Policy
from douane.protocols import fields, mcp, streams
from douane.refusals import refuse
from douane.settings import Settings
from douane.sqlitethread import SqliteThread
from douane.store import StoreUnavailable
from douane.store.addon import SharedStore
from douane.store.postgres import PgStore

logger = logging.getLogger(__name__)

SIZE = 100_000  # bindings each process keeps in memory, per kind
TTL_SECONDS = 90 * 86400  # a binding unused this long is forgotten
TOUCH_SECONDS = 3600  # a binding in use is marked used in the store at most this often
CACHE_SECONDS = 60  # a binding in memory is read again after this (an operator's release holds)
PER_USER = 10_000  # bindings kept per user, upstream and kind (their least recently used go)
PRUNE_SECONDS = 600  # how often a process forgets the expired and the excess
SESSION_IDS = 8  # values of a folded `Mcp-Session-Id` douane reads; more is refused
NAMED_IDS = 16  # stored objects one request may name (its path and body)
# A filtered listing's cursors (OpenAI's, Anthropic's): each names an object of the listing's kind
CURSORS = frozenset({"after", "before", "after_id", "before_id"})
# Anthropic's own skills (`source: anthropic`, `pptx`...) are every user's: bound to this, never
# to the first user naming one (a user's name never holds a space)
BUILT_IN = "anthropic built-in"
# Anthropic's pre-built skills (its docs: PowerPoint, Excel, Word, PDF; the org's own are
# `skill_...`): every user's on read whatever the store says (a first caller adopted them
# before stop 30 bound built-ins to `BUILT_IN`: such a binding is moved there on that read)
ANTHROPIC_SKILLS = frozenset({"pptx", "xlsx", "docx", "pdf"})
ITEM_IDS = 1024  # Responses items by id one request may name, one answer bind
ISSUED_BYTES = 64 * 1024  # where an answer names its id (a stream: its first event)
MCP = "mcp"
# A 2026-07-28 multi round trip's `requestState`: the server's answer issues it to the caller (in
# their MCP session, if any), and only they echo it back. Anything else is the client's text that
# no rule reads: refused.
MCP_STATE = "mcp_state"


@dataclass(frozen=True)
class Kind:
    noun: str
    code: str  # the refusal's, as the API answers an id it does not know
    rule: str
    # an id never seen issued goes upstream and is adopted if answered; else it is refused (ids
    # issued only in answers douane reads, which nobody had before it had the answer)
    adopt: bool = True


# Stored objects by the path segment naming them.
KINDS = {"responses": Kind("stored response", "response_not_found", "owner.response"),
         "conversations": Kind("conversation", "conversation_not_found", "owner.conversation"),
         "chat/completions": Kind("stored chat completion", "not_found", "owner.chat_completion"),
         # a Responses answer's output items (`msg_`, `rs_`, `fc_`, ...: any item named by id in
         # `input` is read from the answer that issued it; a conversation's, from its listing)
         "items": Kind("item", "item_not_found", "owner.item", adopt=False),
         # a code-execution container: Anthropic's, an OpenAI code interpreter's, one made by a
         # granted `POST /v1/containers` (its files are named below it: the container's)
         "containers": Kind("container", "not_found_error", "owner.container", adopt=False),
         # uploaded files (OpenAI's and Anthropic's Files API: uploaded as multipart bodies,
         # which douane refuses, so it never sees one issued but a batch's or an upload's),
         # and the objects granted operations make with them
         "files": Kind("file", "not_found", "owner.file"),
         "vector_stores": Kind("vector store", "not_found", "owner.vector_store"),
         "batches": Kind("batch", "not_found", "owner.batch"),
         "uploads": Kind("upload", "not_found", "owner.upload"),
         "fine_tuning/jobs": Kind("fine-tuning job", "not_found", "owner.fine_tuning_job"),
         # the Assistants API's assistants and threads (a thread's messages, runs and run
         # steps are named below its path: the thread's), evals (their runs below them),
         # videos (their content and remixes below them), skills (their versions below them)
         "assistants": Kind("assistant", "not_found", "owner.assistant"),
         "threads": Kind("thread", "not_found", "owner.thread"),
         "evals": Kind("eval", "not_found", "owner.eval"),
         "videos/characters": Kind("video character", "not_found", "owner.video_character"),
         "videos": Kind("video", "not_found", "owner.video"),
         "skills": Kind("skill", "not_found", "owner.skill")}
_OBJECTS = "responses|conversations|chat/completions|items|containers|files|vector_stores|" \
    "batches|uploads|fine_tuning/jobs|assistants|threads|evals|videos/characters|videos|skills"
# An id in a granted operation's path (`GET /v1/responses/{id}`, `/v1/files/{id}/content`,
# `/v1/conversations/{id}/items/{item}`, `/v1/vector_stores/{id}/files/{file}`); the endpoints
# named there that are not ids.
STORED_PATH = re.compile(rf"/({_OBJECTS})/([^/]+)", re.IGNORECASE)
# What any id of either API is spelt with: another character in a path's id (`asst_x;v=1`,
# `%3B`, `,`, `.mp4`) is a spelling a server may read as the id and a parameter, a new id here
OBJECT_ID = re.compile(r"[A-Za-z0-9_-]+")
NOT_IDS = frozenset({("responses", "input_tokens"), ("responses", "compact"),
                     ("threads", "runs"),  # `POST /v1/threads/runs`: a new thread and its run
                     ("videos", "edits"), ("videos", "extensions"),  # new videos
                     ("videos", "characters")})  # `/v1/videos/characters`: a new character
# Listings of what an upstream stores for the org (a granted `GET`), by the path's end: those of
# the kinds douane binds are filtered to the caller's own; the others douane never sees issued,
# so it cannot tell whose each is: refused. Any other granted answer that reads as a listing is
# refused alike (the org's models excepted; a listing inside a bound object,
# `/conversations/{id}/items`, `/vector_stores/{id}/files`, `/threads/{id}/messages`, is its
# owner's). A grant with `org_listings: true` lists every user's, unfiltered (auditors,
# administrators).
BOUND_LISTING = re.compile(r"/(responses|conversations|chat/completions|containers|files|"
                           r"vector_stores|batches|fine_tuning/jobs|assistants|evals|videos|"
                           r"skills)/?$", re.IGNORECASE)
ANTHROPIC_LISTED = ("files", "batches", "skills")  # its bound objects that are listed
SHARED_LISTING = re.compile(r"/models/?$", re.IGNORECASE)  # the same for every user
LISTING_ITEMS = 1000  # a longer page is refused, not looked up
# Fields of a body naming uploaded files or vector stores, wherever they are (a message's
# `input_file` / `file` part, an Anthropic `document` source, `attachments`, `tool_resources`, a
# `file_search` tool, a batch's `input_file_id`, a fine-tuning job's files): kind, and whether
# the field holds a list of ids.
NAMING = {"file_id": ("files", False), "input_file_id": ("files", False),
          "training_file": ("files", False), "validation_file": ("files", False),
          "file_ids": ("files", True), "vector_store_id": ("vector_stores", False),
          "vector_store_ids": ("vector_stores", True), "assistant_id": ("assistants", False),
          "skill_id": ("skills", False)}
NAMING_KEYS = ("file", "vector_store", "assistant_id", "skill_id")  # (in the keys Inspect read)
_NAMING_KEY = re.compile("|".join(map(re.escape, NAMING_KEYS)))  # any of them, in one search
# Evals that read the org's stored answers or chat completions (a data source of these types)
# would give a user every user's: a listing of the org's, refused as one.
ORG_SOURCES = frozenset({"responses", "stored_completions", "logs"})
EVALS = re.compile(r"/evals(/[^/]+/runs)?/?$", re.IGNORECASE)
KEYS = (fields.KEYS,)  # the path of the pieces holding a body's keys
NOT_NAMING = frozenset({"parameters", "input_schema", "schema", "metadata"})
# Granted operations that create an object, by the path's end; the answer's `id` is issued (a
# video's remix is a new video).
CREATES = re.compile(r"/(conversations|containers|vector_stores|batches|uploads|fine_tuning/jobs|"
                     r"assistants|threads|evals|videos/characters|skills|videos)"
                     r"(?:(?<=videos)(?:/edits|/extensions|/[^/]+/remix))?/?$",
                     re.IGNORECASE)
ANTHROPIC_BELOW_SKILL = re.compile(r"/skills/[^/]+/", re.IGNORECASE)  # its versions
CONVERSATION_ITEMS = re.compile(r"/conversations/[^/]+/items(/[^/]+)?/?$", re.IGNORECASE)
# What an answer says was made for the caller, by its `object`: the files of a batch, an upload
# or a fine-tuning job; a run's thread (`POST /v1/threads/runs` makes one). (An assistant's or a
# thread's vector stores too: `_granted_issued`.)
MADE = {"batch": ("files", ("output_file_id", "error_file_id")), "upload": ("files", ("file",)),
        "fine_tuning.job": ("files", ("result_files",)), "thread.run": ("threads", ("thread_id",))}


def _issued(prefix: str) -> re.Pattern[bytes]:
    # the first `"id"` of an answer's JSON or of its stream (`response.created`, a chunk)
    return re.compile(rb'"id"\s*:\s*"(' + re.escape(prefix.encode()) + rb'[A-Za-z0-9_-]{1,200})"')


ISSUED = {"responses": _issued("resp_"), "chat/completions": _issued("chatcmpl-")}


def digest(upstream: str, kind: str, object_id: str) -> str:
    """What the store keeps of an id: bounded whatever its length, and no id to steal."""
    return hashlib.sha256(f"{upstream}\0{kind}\0{object_id}".encode(errors="replace")
                          ).hexdigest()[:32]


# --- the store: the same statements on SQLite and PostgreSQL ----------------------------------

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, username TEXT NOT NULL, upstream TEXT NOT NULL,
    used_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS owners_user ON owners (username, upstream, kind, used_at);
CREATE INDEX IF NOT EXISTS owners_used ON owners (used_at);
"""


def _bind(n: int) -> str:
    """Bind `n` ids (issued: the upstream's word is the last)."""
    return "INSERT INTO owners (key, kind, username, upstream, used_at) VALUES " + \
        ", ".join(["(%s, %s, %s, %s, %s)"] * n) + \
        " ON CONFLICT (key) DO UPDATE SET username = excluded.username, used_at = excluded.used_at"


def _adopt(n: int) -> str:
    """Bind `n` ids unseen (or forgotten): the first user's; a live binding is kept."""
    return _bind(n) + " WHERE owners.used_at <= %s"


EXPIRE = "DELETE FROM owners WHERE used_at <= %s"
# one user's bindings of a kind past PER_USER, by the index on (username, upstream, kind, used_at)
EXCESS = ("DELETE FROM owners WHERE key IN (SELECT key FROM owners WHERE username = %s AND "
          "upstream = %s AND kind = %s ORDER BY used_at DESC LIMIT %s OFFSET %s)")


def _owners_of(n: int) -> str:
    return f"SELECT key, username, used_at FROM owners WHERE key IN ({', '.join(['%s'] * n)}) " \
           "AND used_at > %s"


def _touch(n: int) -> str:
    """Mark bindings in use (at most once per `TOUCH_SECONDS` each)."""
    return f"UPDATE owners SET used_at = %s WHERE key IN ({', '.join(['%s'] * n)}) " \
           "AND used_at < %s"


def _stale(found: dict[str, Binding], now: float) -> list[str]:
    return [key for key, b in found.items() if b.used_at < now - TOUCH_SECONDS]


@dataclass(frozen=True)
class Binding:
    user: str
    used_at: float


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SQLITE_SCHEMA)
    return db


class SqliteBindings:
    """The embedded default: a SQLite file in WAL mode (the workers of a host share it), every
    call on one thread of its own (the event loop only awaits)."""

    def __init__(self, path: Path):
        self.path = path
        self._db = SqliteThread(path, "douane-owners-db", connect)

    async def _run(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple]:
        def run() -> list[tuple]:
            rows: list[tuple] = []
            for query, params in statements:
                rows += self._db.conn().execute(query.replace("%s", "?"), params).fetchall()
            return rows
        try:
            return await self._db.run(run)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"douane's store of owners is unavailable: {e}") from None

    async def owners(self, keys: list[str], now: float) -> dict[str, Binding]:
        rows = await self._run([(_owners_of(len(keys)), [*keys, now - TTL_SECONDS])])
        found = {key: Binding(user, used) for key, user, used in rows}
        if stale := _stale(found, now):
            await self.execute(_touch(len(stale)), (now, *stale, now - TOUCH_SECONDS))
        return found

    async def execute(self, query: str, params: Sequence[Any]) -> None:
        await self._run([(query, params)])

    def close(self) -> None:
        self._db.close()


class PgBindings:
    """The fleet's: the shared PostgreSQL (`owners`, migration 4), on the event loop's pool."""

    def __init__(self, pg: PgStore):
        self.pg = pg

    async def owners(self, keys: list[str], now: float) -> dict[str, Binding]:
        rows = await self.pg.fetchall(_owners_of(len(keys)), [*keys, now - TTL_SECONDS])
        found = {r["key"]: Binding(r["username"], r["used_at"]) for r in rows}
        if stale := _stale(found, now):
            await self.execute(_touch(len(stale)), (now, *stale, now - TOUCH_SECONDS))
        return found

    async def execute(self, query: str, params: Sequence[Any]) -> None:
        await self.pg.run(lambda conn: conn.execute(query, params))

    def close(self) -> None:
        pass  # the shared store's pool is closed by `SharedStore`


class Bindings:
    """Every kind's bindings: the store, and the latest used in memory (a binding cached and
    marked used within `TOUCH_SECONDS` costs no round trip)."""

    def __init__(self) -> None:
        self.store: SqliteBindings | PgBindings | None = None
        self._cache: dict[str, OrderedDict[str, Binding]] = {}
        self._pruned = 0.0
        self._pruning: asyncio.Task[None] | None = None
        self._binders: set[tuple[str, str, str]] = set()  # who bound since the last pruning

    def use(self, store: SqliteBindings | PgBindings) -> None:
        if self.store is not None:
            self.store.close()
        self.store, self._cache = store, {}

    def close(self) -> None:
        if self._pruning is not None:
            self._pruning.cancel()
        if self.store is not None:
            self.store.close()
            self.store = None

    def _cached(self, kind: str) -> OrderedDict[str, Binding]:
        return self._cache.setdefault(kind, OrderedDict())

    def _remember(self, kind: str, key: str, binding: Binding) -> None:
        cache = self._cached(kind)
        cache[key] = binding
        cache.move_to_end(key)
        if len(cache) > SIZE:
            cache.popitem(last=False)

    async def owners(self, upstream: str, kind: str, ids: Sequence[str]) -> list[str | None]:
        """The user each id was issued to (None: unseen). Raises `StoreUnavailable`."""
        assert self.store is not None
        now = time.time()
        keys = [digest(upstream, kind, i) for i in ids]
        cache = self._cached(kind)
        fresh = {k: b for k in keys if (b := cache.get(k)) and b.used_at > now - CACHE_SECONDS}
        missing = sorted(set(keys) - fresh.keys())
        if missing:
            found = await self.store.owners(missing, now)
            for key, binding in found.items():
                fresh[key] = Binding(binding.user, now)
                self._remember(kind, key, fresh[key])
        return [fresh[k].user if k in fresh else None for k in keys]

    async def bind(self, upstream: str, kind: str, object_ids: str | Sequence[str], user: str,
                   adopt: bool = False) -> None:
        """`object_ids` are `user`'s: issued to them, or (`adopt`) unseen and answered for
        them (in one statement). Raises `StoreUnavailable`."""
        assert self.store is not None
        now = time.time()
        ids = [object_ids] if isinstance(object_ids, str) else list(dict.fromkeys(object_ids))
        keys = [digest(upstream, kind, i) for i in ids]
        rows = [p for key in keys for p in (key, kind, user, upstream, now)]
        if adopt:
            await self.store.execute(_adopt(len(keys)), [*rows, now - TTL_SECONDS])
            for key in keys:  # another's adoption may have won: read again
                self._cached(kind).pop(key, None)
        else:
            await self.store.execute(_bind(len(keys)), rows)
            for key in keys:
                self._remember(kind, key, Binding(user, now))
        if len(self._binders) < SIZE:  # more: their excess waits for a pruning that sees them
            self._binders.add((user, upstream, kind))
        if now - self._pruned > PRUNE_SECONDS and (self._pruning is None or self._pruning.done()):
            self._pruned = now
            self._pruning = asyncio.get_running_loop().create_task(self.prune(now))

    def claim(self, upstream: str, kind: str, object_ids: Sequence[str], user: str
              ) -> asyncio.Task[None]:
        """Bind ids issued to `user` now, from code that cannot wait (a stream's event): this
        process holds them at once, the store once the returned write is done (it raises
        `StoreUnavailable`; until then, another process refuses them to everyone)."""
        now = time.time()
        for object_id in object_ids:
            self._remember(kind, digest(upstream, kind, object_id), Binding(user, now))
        task = asyncio.get_running_loop().create_task(self.bind(upstream, kind, object_ids, user))
        task.add_done_callback(_written)
        return task

    async def prune(self, now: float) -> None:
        """Forget the bindings unused for `TTL_SECONDS`, and the excess past `PER_USER` of each
        user who bound one since the last pruning (a statement each: none holds the store long)."""
        store = self.store
        assert store is not None
        binders, self._binders = self._binders, set()
        try:
            await store.execute(EXPIRE, (now - TTL_SECONDS,))
            for user, upstream, kind in binders:
                await store.execute(EXCESS, (user, upstream, kind, SIZE * 100, PER_USER))
        except Exception as e:  # housekeeping: tried again at the next pruning
            logger.warning("douane: forgetting expired owner bindings failed (%s)",
                           str(e)[:300] or type(e).__name__)


def _written(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:  # (read: never "never retrieved")
        logger.warning("douane: an MCP requestState's owner was not yet stored (%s); bound "
                       "again at the stream's end", task.exception())


def unavailable(flow: http.HTTPFlow, error: StoreUnavailable) -> None:
    refuse(flow, 503, "douane cannot tell whose this id is now (its store of owners is "
           "unavailable); retry shortly", "store_unavailable",
           Reason("store.unavailable", str(error)))


def _container(flow: http.HTTPFlow) -> list[tuple[str, str, str]] | tuple[str, str]:
    """The code-execution container an Anthropic request names (`"container_..."` or `{"id":
    ...}`; a dict without one asks for a new container)."""
    doc = protocols.document(flow, "request")
    container = doc.get("container") if isinstance(doc, dict) else None
    container_id = container.get("id") if isinstance(container, dict) else container
    if isinstance(container_id, str):
        return [("containers", container_id, "container")]
    if container_id is None and isinstance(container, dict | None):
        return []
    return "containers", "container names no id douane can read"


def _built_in_skills(flow: http.HTTPFlow) -> set[str]:
    """The ids of Anthropic's own skills an answer shows (`source: anthropic`): a skill, or a
    listing of them."""
    try:
        doc = protocols.document(flow, "response")
    except protocols.ProtocolError:
        return set()
    items = doc.get("data") if isinstance(doc, dict) and isinstance(doc.get("data"), list) \
        else [doc]
    return {i["id"] for i in items[:LISTING_ITEMS] if isinstance(i, dict) and
            i.get("source") == "anthropic" and isinstance(i.get("id"), str)}


def _below_bound(path: str) -> bool:
    """Whether a path names a bound object by id (a listing below it is its owner's)."""
    return any((m[1].lower(), m[2]) not in NOT_IDS for m in STORED_PATH.finditer(path))


def _files(flow: http.HTTPFlow) -> list[tuple[str, str, str]]:
    """The uploaded files and vector stores a request's body names (`NAMING`), wherever they
    are: only a string can name one (a tool's schema, `metadata`, are not read)."""
    it = state(flow).interaction
    assert it
    # walked only if such a key is in it: Inspect read every key into the interaction (decoded,
    # however the body spelt or encoded it), apart from the text (`fields.KEYS`)
    keys = [p.text for p in it.texts if p.path == KEYS]
    if keys and not any(_NAMING_KEY.search(k) for k in keys):
        return []
    named: list[tuple[str, str, str]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(protocols.document(flow, "request"), ())]
    while stack:
        node, path = stack.pop()
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if key == "id" and isinstance(value, str) and node.get("type") == "file_id":
                named.append(("files", value, _where((*path, key))))  # an eval's data source
            if key in NAMING and isinstance(value, str | list):
                kind, many = NAMING[key]
                if isinstance(value, str):
                    named.append((kind, value, _where((*path, key))))
                elif many:
                    named += [(kind, v, _where((*path, key, i)))
                              for i, v in enumerate(value) if isinstance(v, str)]
            if isinstance(value, dict | list) and key not in NOT_NAMING:
                stack.append((value, (*path, key)))
    return named


def _org_source(doc: Any) -> str | None:
    """Where an eval (`data_source_config`) or an eval run (`data_source.source`) reads the org's
    stored answers or chat completions, if it does."""
    for where, found in (("data_source_config", _dig(doc, "data_source_config")),
                         ("data_source.source", _dig(doc, "data_source", "source"))):
        kind = found.get("type") if isinstance(found, dict) else None
        if kind in ORG_SOURCES:
            return f"{where} ({kind})"
    return None


def _state_id(flow: http.HTTPFlow, state_digest: str) -> str:
    """A state as issued in its MCP session (none: the 2026-07-28 revision is sessionless)."""
    session = headerfields.get(flow.request.headers, b"mcp-session-id") or ""
    return f"{session}\0{state_digest}"


def _where(path: tuple[str | int, ...]) -> str:
    """A JSON path for the audit record, bounded (its keys are the client's)."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text if len(text) <= 120 else text[:60] + "..." + text[-57:]


def _granted_issued(flow: http.HTTPFlow) -> list[tuple[str, list[Any]]]:
    """What a granted operation's answer issued, by kind: the object a `POST` to a collection
    made (`CREATES`), the files a batch, an upload or a fine-tuning job made, the items of a
    conversation listed or added (their conversation is the caller's: checked on the path)."""
    path, method = flow.request.path.split("?")[0], flow.request.method
    try:
        doc = protocols.document(flow, "response")
    except protocols.ProtocolError:
        return []  # not JSON: a file's content
    if not isinstance(doc, dict):
        return []
    issued: list[tuple[str, list[Any]]] = []
    if method == "POST" and (created := CREATES.search(path)):
        issued.append((created[1].lower(), [doc.get("id")]))
    kind, made_in = MADE.get(doc.get("object"), ("", ())) if isinstance(doc.get("object"), str) \
        else ("", ())
    for field in made_in:
        made = doc.get(field)
        issued.append((kind, made if isinstance(made, list) else
                       [made.get("id") if isinstance(made, dict) else made]))
    if method != "DELETE" and doc.get("object") in ("assistant", "thread"):
        # the vector stores `tool_resources.file_search.vector_stores` asked it to make
        stores = _dig(doc, "tool_resources", "file_search", "vector_store_ids")
        issued.append(("vector_stores", stores if isinstance(stores, list) else []))
    if method != "DELETE" and CONVERSATION_ITEMS.search(path):
        data = doc.get("data")
        issued.append(("items", [i.get("id") for i in data if isinstance(i, dict)]
                       if isinstance(data, list) else [doc.get("id")]))
    return issued


def _unbound(flow: http.HTTPFlow, error: StoreUnavailable) -> None:
    """What an answer issued could not be bound: a stream has left (its ids stay unbound:
    adopted later, or refused for items and containers); an answer is withheld."""
    assert flow.response
    if flow.response.stream:
        logger.warning("douane: a stored object's owner was not recorded (%s)", error)
    else:
        unavailable(flow, error)


def _answer(flow: http.HTTPFlow, *events: str) -> Any:
    """A JSON answer, or a stream's last event of these types (parsed alone: a stream's end
    says what it issued); None if douane cannot read it."""
    assert flow.response
    try:
        if not flow.response.stream:
            return protocols.document(flow, "response")
        body = flow.response.content or b""
        # quoted and unescaped, the name is an event's type (in text it would read `\"...\"`)
        at = max(body.rfind(b'"%s"' % e.encode()) for e in events)
        if at < 0:
            return None
        end = body.find(b"\n", at)
        line = body[body.rfind(b"\n", 0, at) + 1:end if end >= 0 else None].strip()
        return protocols.loads(line[5:], "response") if line.startswith(b"data:") else None
    except (ValueError, protocols.ProtocolError):
        return None


def _dig(doc: Any, *keys: str) -> Any:
    for key in keys:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _issued_output(flow: http.HTTPFlow) -> list[dict[str, Any]]:
    """A Responses answer's output items (its first `ITEM_IDS`)."""
    doc = _answer(flow, "response.completed", "response.incomplete", "response.failed")
    output = _dig(doc, "response", "output") if flow.response and flow.response.stream \
        else _dig(doc, "output")
    return [i for i in output[:ITEM_IDS] if isinstance(i, dict)] if isinstance(output, list) \
        else []


def _made_by_code(flow: http.HTTPFlow) -> list[str]:
    """The files an Anthropic answer's code execution made (the `file_id`s of a
    `*code_execution_tool_result` block's outputs; streamed, in its `content_block_start`)."""
    assert flow.response
    if not flow.response.stream:
        doc = _answer(flow)
        blocks = doc.get("content") if isinstance(doc, dict) else None
    else:
        blocks = []
        for line in (flow.response.content or b"").splitlines():
            if line.startswith(b"data:") and b"code_execution_tool_result" in line:
                try:
                    blocks.append(_dig(protocols.loads(line[5:], "response"), "content_block"))
                except protocols.ProtocolError:
                    continue
    made: list[str] = []
    for block in blocks if isinstance(blocks, list) else []:
        outputs = _dig(block, "content", "content")
        if isinstance(block, dict) and isinstance(block.get("type"), str) and \
                block["type"].endswith("code_execution_tool_result") and isinstance(outputs, list):
            made += [o["file_id"] for o in outputs
                     if isinstance(o, dict) and isinstance(o.get("file_id"), str)]
    return made


def _issued_container(flow: http.HTTPFlow) -> str | None:
    """The code-execution container an Anthropic answer ran in (`container.id`; streamed: in
    `message_delta`, or `message_start`)."""
    assert flow.response
    if not flow.response.stream:
        found = _dig(_answer(flow), "container", "id")
    else:
        found = _dig(_answer(flow, "message_delta"), "delta", "container", "id") or \
            _dig(_answer(flow, "message_start"), "message", "container", "id")
    return found if isinstance(found, str) else None


def _kinds_of(named: list[tuple[str, str, str]]) -> list[str]:
    """The kinds of (kind, id, where) named, in `KINDS`' order (most requests name none)."""
    present = {kind for kind, _, _ in named}
    return [kind for kind in KINDS if kind in present] if present else []


class StoredObjects:
    """MCP sessions, and the answers, conversations and chat completions an upstream stores, are
    named by the user they were issued to only."""

    def __init__(self, settings: Settings, shared: SharedStore | None = None,
                 policy: Callable[[], Policy | None] = lambda: None):
        self.settings, self.shared, self.policy = settings, shared, policy
        self.bindings = Bindings()
        self._pg: PgStore | None = None
        self._path: Path | None = None
        # ids a request named that the store did not hold: adopted if the upstream answers
        self._unseen: weakref.WeakKeyDictionary[http.HTTPFlow, list[tuple[str, str, str]]] = \
            weakref.WeakKeyDictionary()
        self._listings: weakref.WeakKeyDictionary[http.HTTPFlow, str] = \
            weakref.WeakKeyDictionary()  # the kind a listing is filtered to the caller's own of
        # a stream's `requestState`s bound as they came, each with its write to the store
        self._state_writes: weakref.WeakKeyDictionary[
            http.HTTPFlow, dict[str, asyncio.Task[None]]] = weakref.WeakKeyDictionary()

    def configure(self, updated: set[str]) -> None:
        pg = self.shared.pg if self.shared else None
        path = self.settings.config.state_dir / "owners.sqlite3"
        if self.bindings.store is not None and pg is self._pg and (pg or path == self._path):
            return
        self._pg, self._path = pg, path
        self.bindings.use(PgBindings(pg) if pg else SqliteBindings(path))

    def done(self) -> None:
        self.bindings.close()

    # --- MCP sessions ---------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """An MCP session the store does not bind to this user is unknown to them (404, as the
        spec has a server answer a session it does not know; the client starts its own)."""
        st = state(flow)
        if flow.response or flow.error or not flow.live or st.upstream is None or \
                st.upstream.protocol != "mcp" or st.identity is None:
            return
        session = headerfields.get(flow.request.headers, b"mcp-session-id")
        if not session:
            return
        # given twice, the header is folded: the server may read either id
        ids = list(dict.fromkeys([session, *(s.strip() for s in session.split(","))]))
        if len(ids) > SESSION_IDS + 1:
            why = "the Mcp-Session-Id header names too many sessions"
        else:
            try:
                owners = await self.bindings.owners(st.upstream.name, MCP, ids)
            except StoreUnavailable as e:
                unavailable(flow, e)
                return
            if all(owner == st.identity.user for owner in owners):
                return
            why = "a session issued to another user" if any(owners) else \
                "a session douane did not see issued"
        refuse(flow, 404, "no such MCP session for this user; start a new one",
               "mcp_session_unknown", Reason("mcp.session_owner", why))

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A session's binding is written before its id reaches the client: its next request,
        through any replica, finds it."""
        st = state(flow)
        if not flow.response or not flow.live or st.upstream is None or \
                st.upstream.protocol != "mcp" or st.identity is None or \
                (st.decision and st.decision.action == "refuse"):
            return
        issued = headerfields.get(flow.response.headers, b"mcp-session-id")
        if not issued:
            return
        try:
            await self.bindings.bind(st.upstream.name, MCP, issued, st.identity.user)
        except StoreUnavailable as e:
            unavailable(flow, e)

    async def _echoed_states(self, flow: http.HTTPFlow) -> None:
        """A `requestState` is accepted back only from the user (and session) it was issued to."""
        st = state(flow)
        assert st.upstream and st.identity and st.interaction
        echoed = mcp.request_states(st.interaction)
        if not echoed:
            return
        try:
            owners = await self.bindings.owners(st.upstream.name, MCP_STATE,
                                                [_state_id(flow, s) for s in echoed])
        except StoreUnavailable as e:
            unavailable(flow, e)
            return
        if all(owner == st.identity.user for owner in owners):
            return
        refuse(flow, 403, "this requestState was not issued to this user by the server; start "
               "the request again without it", "request_state_unknown",
               Reason("mcp.request_state", "a requestState issued to another user or session"
                      if any(owners) else "a requestState douane did not see issued"))

    def streamed_states(self, flow: http.HTTPFlow) -> None:
        """A stream's `requestState`s are bound as the event issuing each is read, before it
        leaves (its retry, or another user's, may come while the stream goes on): in this
        process at once, in the store as soon as it answers."""
        st = state(flow)
        rewriter = streams.rewriter_of(flow)
        if rewriter is None or not flow.response or not self._governed(flow, "mcp") or \
                (st.decision and st.decision.action == "refuse"):
            return
        assert st.upstream and st.identity and st.interaction
        it, upstream, user = st.interaction, st.upstream.name, st.identity.user
        writes = self._state_writes.setdefault(flow, {})

        def bind(doc: Any) -> None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # a stream that arrived whole, rewritten in a thread (server
                return  # replay): nothing races it, its states are bound at its end
            issued = [d for _, msg in mcp.each(doc)
                      if (d := mcp.issued_state(msg, mcp.answered_method(it, msg)))]
            ids = [i for i in dict.fromkeys(_state_id(flow, d) for d in issued)
                   if i not in writes][:mcp.BATCH_MESSAGES - len(writes)]
            if ids:
                task = self.bindings.claim(upstream, MCP_STATE, ids, user)
                writes.update(dict.fromkeys(ids, task))
        rewriter.message_hooks.append(bind)

    async def _bind_states(self, flow: http.HTTPFlow) -> None:
        """What an answer issued, bound (a stream's: those whose early write failed)."""
        st = state(flow)
        assert st.upstream and st.identity and st.interaction
        # (most answers are no stream that bound states: no weak reference made, nothing awaited)
        writes = self._state_writes.pop(flow, {}) if self._state_writes else {}
        if writes:
            await asyncio.gather(*set(writes.values()), return_exceptions=True)  # failed: again
        ids = [i for i in dict.fromkeys(_state_id(flow, s) for s in st.interaction.issued_states)
               if i not in writes or writes[i].cancelled() or writes[i].exception() is not None]
        if ids:
            await self.bindings.bind(st.upstream.name, MCP_STATE, ids, st.identity.user)

    # --- stored objects -------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if flow.response or flow.error or not flow.live or st.interaction is None or \
                st.upstream is None or st.identity is None:
            return
        if st.upstream.protocol == "mcp":
            await self._echoed_states(flow)
            return
        if st.upstream.protocol not in ("openai", "anthropic"):
            return
        if st.interaction.granted and flow.request.method == "GET":
            path = flow.request.path.split("?")[0]
            # (a listing inside a bound object, `/vector_stores/{id}/files`, is its owner's)
            listing = BOUND_LISTING.search(path) if not _below_bound(path) else None
            if listing and not self._org_listings(flow):
                if st.upstream.protocol == "openai" or listing[1].lower() in ANTHROPIC_LISTED:
                    self._listings[flow] = listing[1].lower()
                    if not await self._own_cursors(flow, listing[1].lower()):
                        return
                else:
                    self._refuse_listing(flow)
                    return
        if st.interaction.granted and flow.request.raw_content and \
                EVALS.search(flow.request.path.split("?")[0]) and not self._org_listings(flow):
            where = _org_source(protocols.document(flow, "request"))
            if where:
                self._refuse_listing(flow, f"{where} reads the org's stored answers or chat "
                                     "completions")
                return
        named = self._named(flow)
        if isinstance(named, tuple):
            self._refuse(flow, *named)
            return
        if not named:  # (most requests)
            return
        upstream, user = st.upstream.name, st.identity.user
        many = sum(kind in ("items", "files", "vector_stores") for kind, _, _ in named)
        if len(named) - many > NAMED_IDS or many > ITEM_IDS:  # a `**` path, an endless input
            self._refuse(flow, named[0][0], "the request names too many stored objects")
            return
        unseen: list[tuple[str, str, str]] = []
        adopted_built_ins: list[str] = []
        for kind in _kinds_of(named):  # one round trip per kind named
            ids = [(object_id, where) for k, object_id, where in named if k == kind]
            try:
                owners = await self.bindings.owners(upstream, kind, [i for i, _ in ids])
            except StoreUnavailable as e:
                unavailable(flow, e)
                return
            for (object_id, where), owner in zip(ids, owners, strict=True):
                if kind == "skills" and st.upstream.protocol == "anthropic" and \
                        (owner == BUILT_IN or object_id in ANTHROPIC_SKILLS):
                    if owner not in (None, BUILT_IN):
                        adopted_built_ins.append(object_id)
                    continue
                if owner is None and kind == "skills" and st.upstream.protocol == "anthropic" \
                        and where == "the path" and ANTHROPIC_BELOW_SKILL.search(
                            flow.request.path.split("?")[0]):
                    # only the skill's own answer says whose it is (`source`): adopting it from
                    # its versions' would make one of Anthropic's the first caller's
                    self._refuse(flow, kind, "the path names, below it, a skill douane has not "
                                 "read yet (GET /v1/skills/{id} first)")
                    return
                # an item below a conversation's path is listed by it: the conversation's owner's
                if owner is None and (KINDS[kind].adopt or kind == "items" and
                                      where == "the path"):
                    unseen.append((kind, object_id, where))
                elif owner != user:
                    self._refuse(flow, kind, f"{where} names one issued to another user" if owner
                                 else f"{where} names one douane did not see issued")
                    return
        if unseen:
            self._unseen[flow] = unseen
        if adopted_built_ins:
            try:  # (the read is every user's either way: a store down changes nothing of it)
                await self.bindings.bind(upstream, "skills", adopted_built_ins, BUILT_IN)
            except StoreUnavailable as e:
                logger.warning("douane: Anthropic's skills adopted by a user before stop 30 "
                               "stay so in the store for now (%s)", e)

    def _named(self, flow: http.HTTPFlow) -> list[tuple[str, str, str]] | tuple[str, str]:
        """The stored objects a request names: (kind, id, where); (kind, why) to refuse if it
        names one douane cannot read."""
        st = state(flow)
        assert st.interaction and st.upstream
        named: list[tuple[str, str, str]] = []
        if st.interaction.granted:
            for m in STORED_PATH.finditer(flow.request.path.split("?")[0]):
                kind, object_id = m[1].lower(), m[2]
                if (kind, object_id) not in NOT_IDS:
                    if not OBJECT_ID.fullmatch(object_id):
                        return kind, "the path names an id spelt with characters no id holds"
                    named.append((kind, object_id, "the path"))
                if kind == "containers":
                    break  # its files (`cfile_...`) are the container's
        elif st.upstream.protocol == "anthropic":
            container = _container(flow)
            if isinstance(container, tuple):
                return container
            named += container
        if not flow.request.raw_content:
            return named
        named += _files(flow)
        if st.upstream.protocol == "anthropic" or \
                not st.interaction.granted and st.interaction.operation != "responses":
            return named
        doc = protocols.document(flow, "request")
        if not isinstance(doc, dict):
            return named
        # a granted operation's body may name them too (`POST /v1/responses/input_tokens`)
        previous = doc.get("previous_response_id")
        if isinstance(previous, str):
            named.append(("responses", previous, "previous_response_id"))
        conversation = doc.get("conversation")
        if conversation is not None:
            conversation_id = conversation.get("id") if isinstance(conversation, dict) \
                else conversation
            if not isinstance(conversation_id, str):  # `"conv_..."` or `{"id": "conv_..."}`
                return "conversations", "conversation names no id douane can read"
            named.append(("conversations", conversation_id, "conversation"))
        # a video edited or extended (`POST /v1/videos/edits`, `/extensions`): `{"id": ...}`
        if "video" in doc:
            video = doc["video"]
            video_id = video.get("id") if isinstance(video, dict) else None
            if not isinstance(video_id, str):
                return "videos", "video names no id douane can read"
            named.append(("videos", video_id, "video.id"))
        # a code interpreter run in a container by id (`{"type": "auto"}` starts a new one)
        for k, tool in enumerate(doc.get("tools") if isinstance(doc.get("tools"), list) else []):
            if isinstance(tool, dict) and tool.get("type") == "code_interpreter" and \
                    not isinstance(tool.get("container"), dict):
                if not isinstance(tool.get("container"), str):
                    return "containers", f"tools[{k}].container names no id douane can read"
                named.append(("containers", tool["container"], f"tools[{k}].container"))
        # input items by id: an `item_reference`, or any item carrying the id of one an answer
        # issued (the upstream may read the stored item, not what the request says of it); a
        # conversation's new items alike (`POST /v1/conversations[/{id}/items]`)
        lists = ("input", "items") if "/conversations" in flow.request.path.lower() else ("input",)
        for key in lists:
            for i, item in enumerate(doc.get(key) if isinstance(doc.get(key), list) else []):
                if not isinstance(item, dict):
                    continue
                for field in ("id", "approval_request_id"):
                    item_id = item.get(field)
                    if isinstance(item_id, str):
                        named.append(("items", item_id, f"{key}[{i}].{field}"))
                    elif item_id is not None or field == "id" and \
                            item.get("type") == "item_reference":
                        return "items", f"{key}[{i}] names no id douane can read"
        return named

    async def response(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        # (a weak mapping's `pop` makes a weak reference: most flows are in neither)
        unseen = self._unseen.pop(flow, []) if self._unseen else []
        listing = self._listings.pop(flow, None) if self._listings else None
        if not self._governed(flow, "openai", "anthropic", "mcp") or not flow.response or \
                flow.response.status_code != 200 or \
                (st.decision and st.decision.action == "refuse"):
            return
        if self._governed(flow, "mcp"):
            try:
                await self._bind_states(flow)
            except StoreUnavailable as e:
                _unbound(flow, e)
            return
        assert st.upstream and st.identity and st.interaction
        if listing:
            await self._own_only(flow, listing)
            return
        if st.interaction.granted and flow.request.method == "GET" and self._lists(flow):
            self._refuse_listing(flow)
            return
        upstream, user = st.upstream.name, st.identity.user
        issued: list[tuple[str, list[str]]] = []
        made: list[str] = []
        if st.interaction.granted:
            issued = _granted_issued(flow)
        elif st.upstream.protocol == "anthropic":
            container = _issued_container(flow) if st.interaction.operation == "messages" else None
            issued = [("containers", [container])] if container else []
            made = _made_by_code(flow) if st.interaction.operation == "messages" else []
        else:
            kind = self._issuing(flow)
            found = ISSUED[kind].search(flow.response.raw_content or b"", 0, ISSUED_BYTES) \
                if kind else None
            issued = [(kind, [found[1].decode()])] if kind and found else []
            output = _issued_output(flow) if st.interaction.operation == "responses" else []
            # its items (stored or not), and the containers its code interpreter calls ran in
            issued += [("items", [i.get("id") for i in output]),
                       ("containers", [i.get("container_id") for i in output
                                       if i.get("type") == "code_interpreter_call"])]
        try:
            for kind in _kinds_of(unseen):  # the upstream knows what was named unseen: now theirs
                wheres = [where for k, _, where in unseen if k == kind]
                ids = [i for k, i, _ in unseen if k == kind]
                if kind == "skills" and st.upstream.protocol == "anthropic" and \
                        (built_in := _built_in_skills(flow)) & set(ids):
                    await self.bindings.bind(upstream, kind, sorted(built_in & set(ids)),
                                             BUILT_IN, adopt=True)
                    ids = [i for i in ids if i not in built_in]
                    if not ids:
                        continue
                await self.bindings.bind(upstream, kind, ids, user, adopt=True)
                more = f" (and {len(wheres) - 1} more)" if len(wheres) > 1 else ""
                adopted = Reason("owner.adopted", f"{wheres[0]}{more} named a {KINDS[kind].noun} "
                                 "douane had not seen issued: bound to this user")
                if st.decision is None:
                    st.decide("allow", adopted)
                else:  # (an answer masked, say: the decision stands, the record says it too)
                    st.decision.reasons.append(adopted)
            for kind, ids in issued:
                if ids := [i for i in ids if isinstance(i, str)]:
                    await self.bindings.bind(upstream, kind, ids[:ITEM_IDS], user)
            if made:  # unless already bound (what the sandbox was given may be named there too)
                await self.bindings.bind(upstream, "files", made[:ITEM_IDS], user, adopt=True)
        except StoreUnavailable as e:
            _unbound(flow, e)

    async def _own_only(self, flow: http.HTTPFlow, kind: str) -> None:
        """A listing of a kind douane binds, narrowed to the caller's own objects (its cursors
        too: they name the first and last listed). What douane cannot read is refused."""
        st = state(flow)
        assert st.upstream and st.identity and flow.response
        try:
            doc = protocols.document(flow, "response")
        except protocols.ProtocolError:
            doc = None
        items = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(items, list) or len(items) > LISTING_ITEMS or \
                not all(isinstance(i, dict) and isinstance(i.get("id"), str) for i in items):
            refuse(flow, 502, "douane cannot tell whose each listed object is in this answer",
                   "listing_unreadable", Reason("owner.listing", "the listing is not a page of "
                                                "objects with ids douane reads"))
            return
        try:
            owners = await self.bindings.owners(st.upstream.name, kind,
                                                [i["id"] for i in items]) if items else []
        except StoreUnavailable as e:
            unavailable(flow, e)
            return
        built_in = _built_in_skills(flow) if kind == "skills" and \
            st.upstream.protocol == "anthropic" else set()
        own = [i for i, owner in zip(items, owners, strict=True)
               if owner == st.identity.user or i["id"] in built_in]
        if unbound := sorted(i for i, owner in zip([i["id"] for i in items], owners, strict=True)
                             if i in built_in and owner != BUILT_IN):
            try:  # every user's (the upstream's word, over a first caller's adoption before stop
                # 30): their versions are read by anyone from now
                await self.bindings.bind(st.upstream.name, kind, unbound, BUILT_IN)
            except StoreUnavailable as e:
                _unbound(flow, e)
                return
        # `has_more` says whether the caller's own continue: the upstream's counts everyone's
        # (`after=<my last>&limit=1` would tell whether others made one since). Unknown past
        # this page: true while it lists any (the next, maybe empty, ends it) but the cursor it
        # was asked from (an upstream that did not move on: no end otherwise); a page token
        # (`next_page`, Anthropic's skills) is the upstream's to continue from, kept as is
        asked = {v for k, v in urllib.parse.parse_qsl(flow.request.path.partition("?")[2])
                 if k in CURSORS}
        more = doc.get("has_more") if "next_page" in doc else \
            bool(own) and not any(i["id"] in asked for i in own)
        if len(own) == len(items) and doc.get("has_more", more) == more:
            return
        doc["data"] = own
        if "has_more" in doc:
            doc["has_more"] = more
        for cursor, at in (("first_id", 0), ("last_id", -1)):
            if cursor in doc:
                doc[cursor] = own[at]["id"] if own else None
        protocols.write_json(flow, "response", doc)

    async def _own_cursors(self, flow: http.HTTPFlow, kind: str) -> bool:
        """A filtered listing's cursors name the caller's own objects (the only ones it lists):
        one naming another user's, or one douane never saw, is refused alike, so the answer does
        not tell whether another user's exists. False once refused."""
        st = state(flow)
        assert st.upstream and st.identity
        query = flow.request.path.partition("?")[2]
        cursors = [(name, value) for name, value in
                   urllib.parse.parse_qsl(query, keep_blank_values=True) if name in CURSORS]
        if not cursors:
            return True
        try:
            owners = await self.bindings.owners(st.upstream.name, kind,
                                                [value for _, value in cursors])
        except StoreUnavailable as e:
            unavailable(flow, e)
            return False
        for (name, _), owner in zip(cursors, owners, strict=True):
            if owner != st.identity.user and not (owner == BUILT_IN and kind == "skills"):
                self._refuse(flow, kind, f"the {name} cursor names one "
                             + ("issued to another user" if owner else "douane did not see "
                                "issued"))
                return False
        return True

    def _lists(self, flow: http.HTTPFlow) -> bool:
        """Whether a granted answer lists objects of the org's that douane cannot tell apart."""
        path = flow.request.path.split("?")[0]
        if SHARED_LISTING.search(path) or _below_bound(path):
            return False  # the org's models; a bound object's own listing
        try:
            doc = protocols.document(flow, "response")
        except protocols.ProtocolError:
            return False  # not JSON: a file's content, delivered uninspected
        return isinstance(doc, dict) and isinstance(doc.get("data"), list) and \
            (doc.get("object") == "list" or "has_more" in doc) and not self._org_listings(flow)

    def _org_listings(self, flow: http.HTTPFlow) -> bool:
        """Whether one of the caller's grants naming this operation may list every user's."""
        st, policy = state(flow), self.policy()
        assert st.upstream and st.identity
        if policy is None:
            return False
        method, path = flow.request.method, flow.request.path.split("?")[0]
        return any(grant.org_listings and grant.grants_operation(method, path)
                   for g in policy.grants_for(st.identity.user, st.identity.groups)
                   if (grant := g.upstreams.get(st.upstream.name)))

    @staticmethod
    def _refuse_listing(flow: http.HTTPFlow, why: str = "a listing of the org's stored "
                        "objects") -> None:
        refuse(flow, 403, "this listing would show every user's objects, and douane cannot tell "
               "whose each is; a grant with org_listings: true may list them",
               "listing_not_scoped", Reason("owner.listing", f"{why}, and no grant naming it "
                                            "has org_listings"))

    @staticmethod
    def _issuing(flow: http.HTTPFlow) -> str | None:
        """The kind of stored object this (allowed) request creates, if any."""
        it = state(flow).interaction
        assert it
        if it.operation == "responses":  # stored unless it says `store: false`
            return None if it.store is False else "responses"
        if it.operation == "chat.completions" and it.store is True:
            return "chat/completions"
        return None

    @staticmethod
    def _refuse(flow: http.HTTPFlow, name: str, why: str) -> None:
        kind = KINDS[name]
        refuse(flow, 404, f"no such {kind.noun} for this user", kind.code, Reason(kind.rule, why))

    @staticmethod
    def _governed(flow: http.HTTPFlow, *kinds: str) -> bool:
        st = state(flow)
        return bool(st.interaction and st.upstream and st.upstream.protocol in kinds
                    and st.identity and flow.live)
