"""Review, stop 31: the split analysis's gate (`pool.IdleCores`, c866404) read every core's sum
in /proc/stat times `os.cpu_count()`: a gateway pinned to a busy core (a container's cpuset) of
a host whose other cores idle split its analyses, paying their extra CPU on the core it has.
It reads the cores this process may run on; none when /proc/stat cannot be read."""

from __future__ import annotations

import os

from douane.masking.pool import IdleCores


def _stat(path, busy: int, idle: int) -> None:
    """cpu0 busy, cpu1-3 idle, for `busy` / `idle` ticks so far."""
    cores = [(busy, 0), (0, idle), (0, idle), (0, idle)]
    lines = [f"cpu  {busy} 0 0 {3 * idle} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {u} 0 0 {d} 0 0 0 0 0 0" for i, (u, d) in enumerate(cores)]
    path.write_text("\n".join([*lines, "intr 1 2 3", "ctxt 4", ""]))


def _idle(monkeypatch, tmp_path, mine: set[int]) -> float:
    stat = tmp_path / "stat"
    monkeypatch.setattr(IdleCores, "STAT", str(stat))
    monkeypatch.setattr(IdleCores, "EVERY", 0.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: mine)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    _stat(stat, 100, 100)
    cores = IdleCores()
    _stat(stat, 200, 200)
    return cores.idle()


def test_a_process_pinned_to_a_busy_core_sees_none_idle(monkeypatch, tmp_path):
    assert _idle(monkeypatch, tmp_path, {0}) == 0.0
    assert _idle(monkeypatch, tmp_path, {0, 1}) == 1.0
    assert _idle(monkeypatch, tmp_path, {0, 1, 2, 3}) == 3.0


def test_no_stat_no_split(monkeypatch, tmp_path):
    monkeypatch.setattr(IdleCores, "STAT", str(tmp_path / "missing"))
    monkeypatch.setattr(IdleCores, "EVERY", 0.0)
    assert IdleCores().idle() == 0.0
    (tmp_path / "short").write_text("cpu  1 2 3\ncpu0 1 2 3\n")
    monkeypatch.setattr(IdleCores, "STAT", str(tmp_path / "short"))
    assert IdleCores().idle() == 0.0
