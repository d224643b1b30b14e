"""`SharedStore`: the PostgreSQL store's lifecycle in the gateway (opened at start-up, closed last).

The concerns that share state across replicas (approvals, grants, limits) read `shared.pg`: None
with the embedded default. `closer` goes last in the addon chain, so the concerns' own `done`
(refusing held flows, marking their approvals) still reach the database.
"""

from __future__ import annotations

import asyncio
import contextlib

from douane.config import Database
from douane.settings import Settings
from douane.store.postgres import PgStore


class SharedStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.pg: PgStore | None = None
        self._database: Database | None = None
        self._closing: asyncio.Task[None] | None = None
        self.closer = _Closer(self)

    def configure(self, updated: set[str]) -> None:
        database = self.settings.config.database
        if self.pg is not None and database == self._database:
            return
        old, self._database = self.pg, database
        self.pg = PgStore(database, self.settings.config.replica) if database else None
        with contextlib.suppress(RuntimeError):  # no loop yet: started by running()
            loop = asyncio.get_running_loop()
            if old is not None:
                self._closing = loop.create_task(old.close())
            self.running()

    def running(self) -> None:
        if self.pg is not None:
            self.pg.start()


class _Closer:
    def __init__(self, shared: SharedStore):
        self.shared = shared

    async def done(self) -> None:
        if self.shared.pg is not None:
            await self.shared.pg.close()
            self.shared.pg = None

