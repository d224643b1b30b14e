"""Rate and budget limits per user and grant: requests per minute, tokens per day.

In memory, per gateway process, by default (`RateLimiter`). With a shared store (`database:`),
`SharedRateLimiter` counts in PostgreSQL, one atomic statement per request, so N replicas enforce a
limit once, not N times (its minute slides by whole seconds of the database's clock); while the
store is down the request is refused (`StoreUnavailable`).
Tokens are estimated at request time as prompt characters / 4 plus the requested max_tokens
(times the answers asked for at once: `n`, `best_of`).
An MCP request counts once per JSON-RPC call in it (a batch of 200 tool calls is 200 requests);
MCP session housekeeping (initialize, server/discover, ping, notifications, answers to the
server, GET and DELETE) is not counted; `batch_size` bounds the JSON-RPC messages of one MCP
request, housekeeping included.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from douane.flowstate import Reason
from douane.interaction import Interaction
from douane.policy.model import Limits

if TYPE_CHECKING:
    from douane.store.postgres import PgStore

HOUSEKEEPING = ("initialize", "server/discover", "ping")
UNLIMITED = 2**62


def calls(it: Interaction) -> int:
    """What the request counts against requests_per_minute."""
    if it.protocol != "mcp":
        return 1
    return sum(1 for m in it.mcp if m.method and m.method not in HOUSEKEEPING
               and not m.method.startswith("notifications/"))


def estimated_tokens(it: Interaction) -> int:
    return sum(len(p.text) for p in it.texts) // 4 + (it.max_tokens or 0) * it.choices


def over_batch(limits: Limits, it: Interaction) -> Reason | None:
    if limits.batch_size is not None and len(it.mcp) > limits.batch_size:
        return Reason("limit.batch_size", f"more than {limits.batch_size} JSON-RPC messages "
                      "in one request")
    return None


def over_requests(limits: Limits, it: Interaction) -> Reason:
    return Reason("limit.requests_per_minute",
                  f"more than {limits.requests_per_minute} requests per minute (each MCP call "
                  "counts)" if it.protocol == "mcp" else
                  f"more than {limits.requests_per_minute} requests per minute")


def over_tokens(limits: Limits) -> Reason:
    return Reason("limit.tokens_per_day", f"the daily budget of {limits.tokens_per_day} tokens "
                  "is spent")


class RateLimiter:
    def __init__(self) -> None:
        self.requests: dict[str, deque[tuple[float, int]]] = {}  # key -> (time, calls)
        self.counted: dict[str, int] = {}  # key -> calls in its window
        self.tokens: dict[str, tuple[int, int]] = {}  # key -> (day number, tokens used)

    def check(self, key: str, limits: Limits, it: Interaction,
              now: float | None = None) -> Reason | None:
        """Count this request against `key`; a Reason when it is over a limit (not counted)."""
        now = time.time() if now is None else now
        if batch := over_batch(limits, it):
            return batch
        count = calls(it)
        if count == 0 or limits.requests_per_minute is None and limits.tokens_per_day is None:
            return None  # nothing to count (as `SharedRateLimiter`): a limit counts from its load
        window = self.requests.setdefault(key, deque())
        while window and window[0][0] <= now - 60:
            self.counted[key] -= window.popleft()[1]
        used_calls = self.counted.setdefault(key, 0)
        if limits.requests_per_minute is not None and \
                used_calls + count > limits.requests_per_minute:
            return over_requests(limits, it)
        day, used = self.tokens.get(key, (int(now // 86400), 0))
        if day != int(now // 86400):
            day, used = int(now // 86400), 0
        cost = estimated_tokens(it)
        if limits.tokens_per_day is not None and used + cost > limits.tokens_per_day:
            return over_tokens(limits)
        window.append((now, count))
        self.counted[key] = used_calls + count
        self.tokens[key] = (day, used + cost)
        return None


# The database's clock, the same for every replica, in whole seconds.
SECOND = "floor(extract(epoch FROM statement_timestamp()))::bigint"
# The calls of the sliding minute: this second and the 59 before it.
RECENT = f"SELECT s, c FROM unnest(u.seconds, u.counts) AS w(s, c) WHERE s > {SECOND} - 60"
# Count this request if both limits allow it, in one statement: the upsert locks the row of `key`,
# so concurrent requests of every replica are counted one after the other. The row keeps the
# calls per second of the last minute (at most 60 pairs, whatever the limit).
COUNT = f"""
INSERT INTO limit_usage AS u (key, seconds, counts, day, tokens)
VALUES (%(key)s, ARRAY[{SECOND}], ARRAY[%(calls)s::int], {SECOND} / 86400, %(cost)s)
ON CONFLICT (key) DO UPDATE SET
    (seconds, counts) = (SELECT coalesce(array_agg(s ORDER BY s), '{{}}'),
                                coalesce(array_agg(c ORDER BY s), '{{}}')
                         FROM (SELECT s, sum(c)::int AS c FROM ({RECENT} UNION ALL
                               SELECT {SECOND}, %(calls)s::int) x GROUP BY s) y),
    tokens = CASE WHEN u.day = EXCLUDED.day THEN u.tokens ELSE 0 END + EXCLUDED.tokens,
    day = EXCLUDED.day
WHERE (SELECT coalesce(sum(c), 0) FROM ({RECENT}) r) + %(calls)s <= %(rpm)s
  AND CASE WHEN u.day = EXCLUDED.day THEN u.tokens ELSE 0 END + EXCLUDED.tokens <= %(tpd)s
RETURNING 1 AS counted
"""
# Which limit refused (on a refusal only).
USAGE = f"""
SELECT (SELECT coalesce(sum(c), 0) FROM ({RECENT}) r) AS calls,
       CASE WHEN day = {SECOND} / 86400 THEN tokens ELSE 0 END AS tokens
FROM limit_usage AS u WHERE key = %s
"""


class SharedRateLimiter:
    """The same limits as `RateLimiter`, counted in the shared store across replicas."""

    def __init__(self, pg: PgStore):
        self.pg = pg

    async def check(self, key: str, limits: Limits, it: Interaction) -> Reason | None:
        """Count this request against `key`; a Reason when it is over a limit (not counted).
        Raises `StoreUnavailable` when the store cannot count it."""
        if batch := over_batch(limits, it):
            return batch
        count = calls(it)
        if count == 0:
            return None
        rpm, tpd = limits.requests_per_minute, limits.tokens_per_day
        if rpm is None and tpd is None:
            return None  # nothing to count: no round trip
        cost = estimated_tokens(it)
        if rpm is not None and count > rpm:
            return over_requests(limits, it)
        if tpd is not None and cost > tpd:
            return over_tokens(limits)
        counted = await self.pg.fetchone(COUNT, {
            "key": key, "calls": count if rpm is not None else 0, "cost": cost,
            "rpm": UNLIMITED if rpm is None else rpm, "tpd": UNLIMITED if tpd is None else tpd})
        if counted:
            return None
        usage = await self.pg.fetchone(USAGE, (key,))
        if rpm is not None and (usage is None or usage["calls"] + count > rpm):
            return over_requests(limits, it)
        return over_tokens(limits)
