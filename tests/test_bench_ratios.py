"""scripts/bench's request rows: ratios to bare mitmdump are taken round by round, with their
spread, and a target is read on the median of those ratios."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_gateway as bench  # noqa: E402


def row(variant: str, rps: tuple[float, ...], cpu: tuple[float, ...]) -> bench.Row:
    return bench.Row(variant, "openai", 32, 1000, sorted(rps)[len(rps) // 2], 1.0, 2.0,
                     sorted(cpu)[len(cpu) // 2], 100.0, rps, cpu)


def run_of(*rows: bench.Row) -> bench.Run:
    return bench.Run(False, 3, 3, list(rows), [], [], [], [], [])


def test_a_ratio_pairs_each_round_with_the_same_round_of_bare():
    # the machine slowed down in round 2 for both: round by round douane is at 90-100% of bare,
    # while the ratio of the medians (400 / 500) says 80%
    bare = row("bare mitmdump", (500, 250, 520), (2.0, 4.0, 2.0))
    douane = row("douane", (500, 225, 400), (2.2, 4.8, 2.4))
    rps = bench.rps_ratio(douane, bare)
    assert (rps.median, rps.low, rps.high) == (0.9, 400 / 520, 1.0)
    cpu = bench.cpu_ratio(douane, bare)
    assert round(cpu.median, 6) == 1.2 and round(cpu.low, 6) == 1.1 and round(cpu.high, 6) == 1.2
    assert rps.share() == "90.0% (77%-100%)"
    assert cpu.times() == "1.20x (1.10-1.20)"


def test_the_targets_are_read_on_the_median_of_the_rounds_ratios_with_their_spread():
    bare = row("bare mitmdump", (500, 250, 520), (2.0, 4.0, 2.0))
    douane = row("douane", (500, 225, 400), (2.2, 4.8, 2.4))
    lines = {line[1]: line[2:] for line in bench.targets(run_of(bare, douane))}
    assert lines["douane >= 90% of bare req/s, openai c=32"] == ["90.0% (77%-100%)", "yes"]
    assert lines["CPU/request <= 1.3x bare, openai c=32"] == ["1.20x (1.10-1.20)", "yes"]
    ratios = bench.ratio_lines([bare, douane], lambda r: bare)
    assert ratios == [["douane", "openai", "32", "90.0% (77%-100%)", "+0.00",
                       "1.20x (1.10-1.20)"]]


def test_rows_without_matching_rounds_fall_back_to_the_rows_own_ratio():
    assert bench.paired((1.0, 2.0), (1.0,)) is None
    assert bench.paired((), ()) is None
    bare = row("bare mitmdump", (500,), (2.0,))
    douane = bench.Row("douane", "openai", 32, 1000, 450, 1.0, 2.0, 2.5, 100.0)  # no rounds
    assert bench.rps_ratio(douane, bare).share() == "90.0% (90%-90%)"
    assert bench.cpu_ratio(douane, bare).times() == "1.25x (1.25-1.25)"


def test_a_row_prints_the_least_and_greatest_of_its_rounds():
    assert bench.spread((500.0, 250.0, 520.0), ".0f") == " (250-520)"
    assert bench.spread((500.0,), ".0f") == ""
