"""The shared store: what every replica of a fleet shares, in PostgreSQL (`database:` in the
config). Without a database, each process keeps its state as before (SQLite files under
state_dir, counters in memory): the embedded default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    from douane.config import Config, Database


class StoreUnavailable(Exception):
    """The shared store cannot answer now: what needs it is refused, never let through."""


def connect_for(config: Config, **kwargs: Any) -> psycopg.Connection[Any]:
    """An operator command's connection: its password must have been resolved."""
    assert config.database
    if "database.password" in config.unresolved:
        raise StoreUnavailable(f"database.password: {config.unresolved['database.password']}")
    return connect(config.database, **kwargs)


def connect(database: Database, **kwargs: Any) -> psycopg.Connection[Any]:
    """A plain (blocking) connection, for what never runs on the event loop: the recording
    writer's process, the audit chain-head thread, operator commands."""
    import psycopg  # the embedded default never loads the driver
    return psycopg.connect(database.url, password=database.password,
                           connect_timeout=max(1, round(database.timeout)),
                           application_name="douane", **kwargs)
