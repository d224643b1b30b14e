"""A local SQLite file that the event loop never touches: opened on first use, every call run on
one thread of its own (the loop only awaits). Used by the embedded stores of grants and owners."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any


class SqliteThread:
    def __init__(self, path: Path, thread_name: str,
                 connect: Callable[[Path], sqlite3.Connection]):
        self.path = path
        self._connect = connect
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name)
        self._db: sqlite3.Connection | None = None

    def conn(self) -> sqlite3.Connection:
        """The connection; call it only on the store's thread (from a function given to `run`)."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect(self.path)
        return self._db

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def close(self) -> None:
        def close_db() -> None:
            if self._db:
                self._db.close()
        self._executor.submit(close_db)
        self._executor.shutdown(wait=True)
