"""Rate and budget limits per user and grant: requests per minute, tokens per day.

In memory, per gateway process (several processes behind a balancer each count their own share).
Tokens are estimated at request time as prompt characters / 4 plus the requested max_tokens.
An MCP request counts once per JSON-RPC call in it (a batch of 200 tool calls is 200 requests);
MCP session housekeeping (initialize, server/discover, ping, notifications, answers to the
server, GET and DELETE) is not counted; `batch_size` bounds the JSON-RPC messages of one MCP
request, housekeeping included.
"""

from __future__ import annotations

import time
from collections import deque

from douane.flowstate import Reason
from douane.interaction import Interaction
from douane.policy.model import Limits

HOUSEKEEPING = ("initialize", "server/discover", "ping")


def calls(it: Interaction) -> int:
    """What the request counts against requests_per_minute."""
    if it.protocol != "mcp":
        return 1
    return sum(1 for m in it.mcp if m.method and m.method not in HOUSEKEEPING
               and not m.method.startswith("notifications/"))


def estimated_tokens(it: Interaction) -> int:
    return sum(len(p.text) for p in it.texts) // 4 + (it.max_tokens or 0)


class RateLimiter:
    def __init__(self) -> None:
        self.requests: dict[str, deque[tuple[float, int]]] = {}  # key -> (time, calls)
        self.counted: dict[str, int] = {}  # key -> calls in its window
        self.tokens: dict[str, tuple[int, int]] = {}  # key -> (day number, tokens used)

    def check(self, key: str, limits: Limits, it: Interaction,
              now: float | None = None) -> Reason | None:
        """Count this request against `key`; a Reason when it is over a limit (not counted)."""
        now = time.time() if now is None else now
        if limits.batch_size is not None and len(it.mcp) > limits.batch_size:
            return Reason("limit.batch_size", f"more than {limits.batch_size} JSON-RPC messages "
                          "in one request")
        count = calls(it)
        if count == 0:
            return None
        window = self.requests.setdefault(key, deque())
        while window and window[0][0] <= now - 60:
            self.counted[key] -= window.popleft()[1]
        used_calls = self.counted.setdefault(key, 0)
        if limits.requests_per_minute is not None and \
                used_calls + count > limits.requests_per_minute:
            return Reason("limit.requests_per_minute",
                          f"more than {limits.requests_per_minute} requests per minute (each "
                          "MCP call counts)" if it.protocol == "mcp" else
                          f"more than {limits.requests_per_minute} requests per minute")
        day, used = self.tokens.get(key, (int(now // 86400), 0))
        if day != int(now // 86400):
            day, used = int(now // 86400), 0
        cost = estimated_tokens(it)
        if limits.tokens_per_day is not None and used + cost > limits.tokens_per_day:
            return Reason("limit.tokens_per_day", f"the daily budget of {limits.tokens_per_day} "
                          "tokens is spent")
        window.append((now, count))
        self.counted[key] = used_calls + count
        self.tokens[key] = (day, used + cost)
        return None
