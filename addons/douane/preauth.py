"""Refusals before authentication, bounded in the audit log by number as well as by size.

A client nobody authenticated (a 401, a head douane cannot read) can be refused as fast as it can
send, and each refusal was one audit record: the log grew until the disk filled, and then douane
refused everyone (`audit_unavailable`). Per window (`audit.unauthenticated`), each peer address
has its first `per_peer` refusals recorded one by one (`total` across all peers); the rest are
counted, each still answered with its own decision id, and at the window's end one summary record
per peer says how many, under which rules, when, and names the first, the last and a sample of
their decision ids. An authenticated user's records are never summarised (the caller checks).
The table of peers is bounded: past `peers` addresses in a window, the others share one summary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from douane.config import Unauthenticated

SAMPLE = 10  # decision ids kept per summary besides the first and the last
RULES = 32  # rules counted apart per summary (douane's own names, a few in practice)
OTHER = "other"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass
class _Tally:
    """One peer's refusals in the current window."""

    recorded: int = 0
    counted: int = 0
    rules: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    last: float = 0.0
    ids: list[str] = field(default_factory=list)  # first, then a uniform sample of the rest
    last_id: str = ""

    def count(self, rule: str, decision_id: str, now: float) -> None:
        self.counted += 1
        rule = rule if rule in self.rules or len(self.rules) < RULES else OTHER
        self.rules[rule] = self.rules.get(rule, 0) + 1
        if self.counted == 1:
            self.first = now
        self.last, self.last_id = now, decision_id
        if len(self.ids) <= SAMPLE:  # reservoir sampling: each id equally likely to be kept
            self.ids.append(decision_id)
        elif (k := random.randrange(self.counted - 1)) < SAMPLE:
            self.ids[1 + k] = decision_id


class Budget:
    """Which unauthenticated refusals are recorded, and the summaries of those counted."""

    def __init__(self, config: Unauthenticated):
        self.config = config
        self.start: float | None = None  # the current window's
        self.peers: dict[str | None, _Tally] = {}
        self.untracked = _Tally()  # peers past the table's bound, together
        self.recorded = 0

    def admit(self, client: str | None, rule: str, decision_id: str, now: float) -> bool:
        """True: record this refusal; False: it was counted into its peer's summary."""
        if self.start is None:
            self.start = now
        tally = self.peers.get(client)
        if tally is None:
            tally = self.untracked if len(self.peers) >= self.config.peers else \
                self.peers.setdefault(client, _Tally())
        if tally.recorded < self.config.per_peer and self.recorded < self.config.total:
            tally.recorded += 1
            self.recorded += 1
            return True
        tally.count(rule, decision_id, now)
        return False

    def due(self, now: float) -> bool:
        return self.start is not None and now - self.start >= self.config.window_seconds

    def end_window(self) -> list[dict[str, Any]]:
        """The summary records of the window (one per peer with refusals counted), and a new
        window."""
        start, self.start = self.start, None
        tallies = [(client, t) for client, t in self.peers.items() if t.counted]
        if self.untracked.counted:
            tallies.append((None, self.untracked))
        records = [{
            "event": "refusals.summarised", "client": client, "untracked_peers": t is self.untracked,
            "window": {"start": _iso(start or t.first), "seconds": self.config.window_seconds},
            "recorded": t.recorded, "counted": t.counted, "rules": t.rules,
            "first": _iso(t.first), "last": _iso(t.last),
            "decision_ids": {"first": t.ids[0], "last": t.last_id, "sample": t.ids[1:]},
        } for client, t in tallies]
        self.peers, self.untracked, self.recorded = {}, _Tally(), 0
        return records
