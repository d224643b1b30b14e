"""The shared store: what every replica of a fleet shares, in PostgreSQL (`database:` in the
config). Without a database, each process keeps its state as before (SQLite files under
state_dir, counters in memory): the embedded default.
"""


class StoreUnavailable(Exception):
    """The shared store cannot answer now: what needs it is refused, never let through."""
