"""Audit chain heads in the shared store: what makes a cut from the end of a log show.

Each replica writes its own linear hash chain (douane.audit); a log whose last records were cut
still verifies on its own. With a shared store (`database:`), the audit writer hands every record's
(seq, mac) to `ChainHeads`, whose thread keeps the replica's row of `audit_heads` at the newest one
(only ever forward). `douane audit verify` then checks each chain against its head: the head's
record must be in the log, with that MAC. The head trails the log by the records of the last
moment (one update per burst, off the writer's path), so a cut of records written before that is
caught; a store that is down delays the head, never the audit log.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from douane import store

if TYPE_CHECKING:
    from douane.config import Database

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
UPSERT = """
INSERT INTO audit_heads (replica, host, path, seq, mac, updated_at) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (replica) DO UPDATE SET host = excluded.host, path = excluded.path, seq = excluded.seq,
    mac = excluded.mac, updated_at = excluded.updated_at
WHERE audit_heads.seq < excluded.seq
"""


@dataclass(frozen=True)
class Head:
    replica: str
    host: str  # gateway.replica of the host it runs on (a worker's replica is HOST-wN)
    path: str  # its log, on that host
    seq: int
    mac: str
    updated_at: float


def heads(db: Any) -> list[Head]:
    return [Head(*r) for r in db.execute(
        "SELECT replica, host, path, seq, mac, updated_at FROM audit_heads ORDER BY replica")]


class ChainHeads:
    """One replica's head, published from a thread: `update` never waits for the store."""

    def __init__(self, database: Database, replica: str, host: str, path: str):
        self.database, self.replica, self.host, self.path = database, replica, host, path
        self._latest: tuple[int, str] | None = None
        self._published: tuple[int, str] | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="douane-chain-head", daemon=True)
        self._thread.start()

    def update(self, seq: int, mac: str) -> None:
        with self._wake:
            self._latest = (seq, mac)
            self._wake.notify()

    def close(self, timeout: float = 5) -> None:
        """The last head published, if the store takes it within `timeout`."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        db, failing = None, False
        while True:
            with self._wake:
                while self._latest == self._published and not self._closing:
                    self._wake.wait()
                if self._latest == self._published:
                    break
                latest, closing = self._latest, self._closing
            assert latest is not None
            try:
                db = db or store.connect(self.database, autocommit=True)
                db.execute(UPSERT, (self.replica, self.host, self.path, *latest, time.time()))
            except Exception as e:
                if db is not None:
                    db.close()
                    db = None
                if not failing:
                    logger.warning("douane: cannot keep the audit chain's head in the shared "
                                 "store (%s); retrying every %ss", type(e).__name__,
                                 RETRY_SECONDS)
                failing = True
                if closing:
                    break
                time.sleep(RETRY_SECONDS)
                continue
            if failing:
                logger.info("douane: the audit chain's head is in the shared store again")
            failing, self._published = False, latest
        if db is not None:
            db.close()
