"""The PostgreSQL store: a psycopg 3 async pool on the event loop, the schema migrated at start-up,
and LISTEN/NOTIFY on a connection of its own.

Every call is bounded by `database.timeout` and raises `StoreUnavailable` when the database cannot
answer (down, unreachable, timed out, not migrated yet); what needs the store then refuses (fails
closed). The pool reconnects by itself, and the listener reconnects and says so (`on_listen`) so a
replica catches up with the notifications it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row

from douane.config import Database
from douane.store import StoreUnavailable
from douane.store.schema import LOCK_ID, MIGRATIONS, VERSION_TABLE

logger = logging.getLogger(__name__)
RETRY_SECONDS = (0.2, 0.5, 1, 2)  # reconnecting the listener, retrying the migration
T = TypeVar("T")


class Stale(StoreUnavailable):
    """The connection was found broken (the database restarted: the statement did not run; a
    network cut mid-statement may have run it, and a second try then counts twice: a refusal,
    never a pass)."""


class PgStore:
    def __init__(self, database: Database, replica: str):
        self.database, self.replica = database, replica
        self.ready = False  # migrated, so calls may go through
        self.listening = False
        self._channels: dict[str, Callable[[str], None]] = {}
        self.on_listen: list[Callable[[], None]] = []  # after each (re)connection of the listener
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self.pool = psycopg_pool.AsyncConnectionPool(
            database.url, kwargs=self._connect_kwargs(), min_size=1,
            max_size=database.pool_size, open=False, timeout=database.timeout,
            reconnect_timeout=365 * 86400, name="douane-store")

    def _connect_kwargs(self) -> dict[str, Any]:
        ms = int(self.database.timeout * 1000)
        kwargs: dict[str, Any] = {
            "autocommit": True, "row_factory": dict_row, "application_name": "douane",
            "connect_timeout": max(1, round(self.database.timeout)),
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
            # a peer gone without a word (a host down, a cut network) is noticed within ~30 s:
            # the listener then reconnects instead of waiting forever for notifications
            "keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5,
            "keepalives_count": 3, "tcp_user_timeout": 30_000}
        if self.database.password is not None:
            kwargs["password"] = self.database.password
        return kwargs

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the pool and migrate in the background: a replica starts while the database is
        down, refuses what needs it, and is ready as soon as the database answers."""
        if self._started:
            return
        self._started = True
        self._tasks.append(asyncio.get_running_loop().create_task(self._start()))

    async def _start(self) -> None:
        await self.pool.open(wait=False)
        attempt = 0
        while not self.ready:
            try:
                await self._migrate()
                self.ready = True
            except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as e:
                if attempt == 0:
                    logger.warning("douane: the store at %s is unavailable (%s); what needs it "
                                   "is refused until it answers", self.database.url, _short(e))
                await asyncio.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
                attempt += 1
            except StoreUnavailable as e:  # a schema this douane does not know: never used
                logger.error("douane: %s", e)
                return
        logger.info("douane: store %s ready (schema version %d)", self.database.url,
                    MIGRATIONS[-1].version)
        if self._channels:
            self._tasks.append(asyncio.get_running_loop().create_task(self._listen()))

    async def _migrate(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
            try:
                await conn.execute(VERSION_TABLE)
                row = await (await conn.execute(
                    "SELECT coalesce(max(version), 0) AS v FROM douane_schema_version")).fetchone()
                current = row["v"] if row else 0
                if current > MIGRATIONS[-1].version:
                    raise StoreUnavailable(f"the store's schema is version {current}, newer than "
                                           f"this douane's ({MIGRATIONS[-1].version}): upgrade "
                                           "douane")
                for m in MIGRATIONS:
                    if m.version > current:
                        async with conn.transaction():
                            await conn.execute(m.sql)
                            await conn.execute("INSERT INTO douane_schema_version (version, name)"
                                               " VALUES (%s, %s)", (m.version, m.name))
                        logger.info("douane: store migrated to version %d (%s)", m.version,
                                    m.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.ready = self.listening = False
        await self.pool.close(timeout=2)

    # --- calls -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self, transaction: bool = False) -> AsyncIterator[
            psycopg.AsyncConnection[dict[str, Any]]]:
        """A pooled connection (in a transaction if asked), bounded by the store's timeout;
        any failure to reach the database is `StoreUnavailable` (`Stale` when the connection
        was found broken, as after a restart of the database: worth one more try)."""
        if not self.ready:
            raise StoreUnavailable("douane's store is not ready (the database has not answered "
                                   "since start-up)")
        conn = None
        try:
            async with asyncio.timeout(self.database.timeout), \
                    self.pool.connection() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, TimeoutError, OSError) as e:
            if conn is not None and conn.broken:
                self._check_pool()  # the other idle connections are likely broken too
                raise Stale(f"douane's store is unavailable: {_short(e)}") from None
            raise StoreUnavailable(f"douane's store is unavailable: {_short(e)}") from None

    def _check_pool(self) -> None:
        """Drop the pool's broken idle connections (in the background, one check at a time):
        no request pays a round trip to test its connection first."""
        if not any(t.get_name() == "douane-store-check" and not t.done() for t in self._tasks):
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.get_running_loop().create_task(
                self.pool.check(), name="douane-store-check"))

    async def run(self, body: Callable[[psycopg.AsyncConnection[dict[str, Any]]], Awaitable[T]],
                  transaction: bool = False) -> T:
        """`body(conn)` on a pooled connection (in a transaction if asked); run again once on a
        connection found broken (it did not run, or its transaction did not commit)."""
        try:
            async with self.connection(transaction) as conn:
                return await body(conn)
        except Stale:
            async with self.connection(transaction) as conn:
                return await body(conn)

    async def fetchone(self, query: str, params: Any = ()) -> dict[str, Any] | None:
        async def one(conn: psycopg.AsyncConnection[dict[str, Any]]) -> dict[str, Any] | None:
            return await (await conn.execute(query, params)).fetchone()
        return await self.run(one)

    async def fetchall(self, query: str, params: Any = ()) -> list[dict[str, Any]]:
        async def rows(conn: psycopg.AsyncConnection[dict[str, Any]]) -> list[dict[str, Any]]:
            return await (await conn.execute(query, params)).fetchall()
        return await self.run(rows)

    async def secret(self, name: str) -> bytes:
        """A random secret every replica shares, created by the first one that asks."""
        for _ in range(3):
            row = await self.fetchone(
                "WITH ins AS (INSERT INTO douane_secrets VALUES (%(name)s, %(value)s) ON CONFLICT "
                "(name) DO NOTHING RETURNING value) SELECT value FROM ins UNION ALL "
                "SELECT value FROM douane_secrets WHERE name = %(name)s LIMIT 1",
                {"name": name, "value": secrets.token_bytes(32)})
            if row is not None:  # None: another replica's insert committed after this snapshot
                return bytes(row["value"])
        raise StoreUnavailable(f"the shared secret {name} could not be read")

    # --- LISTEN/NOTIFY -----------------------------------------------------------------------

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(payload)` on the loop for each NOTIFY on `channel` (set before start)."""
        self._channels[channel] = callback

    async def _listen(self) -> None:
        attempt = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.database.url,
                                                             **self._connect_kwargs())
                async with conn:
                    for channel in self._channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.listening, attempt = True, 0
                    for callback in self.on_listen:
                        callback()
                    async for note in conn.notifies():
                        handler = self._channels.get(note.channel)
                        if handler:
                            handler(note.payload)
            except (psycopg.Error, OSError) as e:
                if self.listening or attempt == 0:
                    logger.warning("douane: store notifications interrupted (%s); reconnecting",
                                   _short(e))
            self.listening = False
            await asyncio.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
            attempt += 1


def _short(error: BaseException) -> str:
    """An error's first line, bounded (libpq messages name host and port, never the password)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]
