"""Rate and budget limits per user and grant: requests per minute, tokens per day.

In memory, per gateway process (several processes behind a balancer each count their own share).
Tokens are estimated at request time as prompt characters / 4 plus the requested max_tokens.
"""

from __future__ import annotations

import time
from collections import deque

from douane.flowstate import Reason
from douane.interaction import Interaction
from douane.policy.model import Limits


def estimated_tokens(it: Interaction) -> int:
    return sum(len(p.text) for p in it.texts) // 4 + (it.max_tokens or 0)


class RateLimiter:
    def __init__(self) -> None:
        self.requests: dict[str, deque[float]] = {}
        self.tokens: dict[str, tuple[int, int]] = {}  # key -> (day number, tokens used)

    def check(self, key: str, limits: Limits, it: Interaction,
              now: float | None = None) -> Reason | None:
        """Count this request against `key`; a Reason when it is over a limit (not counted)."""
        now = time.time() if now is None else now
        window = self.requests.setdefault(key, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if limits.requests_per_minute is not None and len(window) >= limits.requests_per_minute:
            return Reason("limit.requests_per_minute",
                          f"more than {limits.requests_per_minute} requests per minute")
        day, used = self.tokens.get(key, (int(now // 86400), 0))
        if day != int(now // 86400):
            day, used = int(now // 86400), 0
        cost = estimated_tokens(it)
        if limits.tokens_per_day is not None and used + cost > limits.tokens_per_day:
            return Reason("limit.tokens_per_day", f"the daily budget of {limits.tokens_per_day} "
                          "tokens is spent")
        window.append(now)
        self.tokens[key] = (day, used + cost)
        return None
