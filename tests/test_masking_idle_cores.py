"""The split analysis's gate (`pool.IdleCores`) counts a CPU quota: a container given 1 CPU of
an idle 2-core host has no second core to split on (cgroup v2's `cpu.max`, the tightest of its
cgroup and its ancestors', less what its cgroup uses: `cpu.stat`)."""

from __future__ import annotations

import os

import pytest

from douane.masking.pool import IdleCores, MaskingPool


def _stat(path, busy: int, idle: int) -> None:
    """cpu0 busy, cpu1 idle, for `busy` / `idle` ticks so far."""
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy} 0 0 0 0 0 0 0 0 0\n"
                    f"cpu1 0 0 0 {idle} 0 0 0 0 0 0\nintr 1 2 3\n")


def _cgroups(tmp_path, quotas: dict[str, str], used: float) -> None:
    """cgroup v2 folders from the root down to /a/b (ours), each's cpu.max from `quotas` (none
    written: the root's case), each's cpu.stat saying `used` CPU seconds."""
    (tmp_path / "cgroup").write_text("0::/a/b\n")
    for folder in ("", "a", "a/b"):
        (tmp_path / "fs" / folder).mkdir(parents=True, exist_ok=True)
        if folder in quotas:
            (tmp_path / "fs" / folder / "cpu.max").write_text(quotas[folder] + "\n")
        (tmp_path / "fs" / folder / "cpu.stat").write_text(
            f"usage_usec {int(used * 1e6)}\nuser_usec 0\nsystem_usec 0\n")


def _idle(monkeypatch, tmp_path, quotas: dict[str, str], used_per_second: float) -> float:
    """Idle cores seen over 1 s (100 ticks on each of 2 cores: cpu0 busy, cpu1 idle) while the
    cgroup used `used_per_second` CPU seconds."""
    stat = tmp_path / "stat"
    monkeypatch.setattr(IdleCores, "STAT", str(stat))
    monkeypatch.setattr(IdleCores, "CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(IdleCores, "CGROUPS", str(tmp_path / "fs"))
    monkeypatch.setattr(IdleCores, "EVERY", 0.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sysconf", lambda name: 100 if name == "SC_CLK_TCK" else 0)
    _stat(stat, 100, 100)
    _cgroups(tmp_path, quotas, 10.0)
    cores = IdleCores()
    _stat(stat, 200, 200)
    _cgroups(tmp_path, quotas, 10.0 + used_per_second)
    return cores.idle()


def test_a_one_cpu_quota_leaves_no_core_for_a_split(monkeypatch, tmp_path):
    assert _idle(monkeypatch, tmp_path, {}, 0.6) == 1.0  # no quota: the host's idle core
    assert _idle(monkeypatch, tmp_path, {"a/b": "max 100000"}, 0.6) == 1.0
    quota = _idle(monkeypatch, tmp_path, {"a/b": "100000 100000"}, 0.6)
    assert quota == pytest.approx(0.4) and quota < MaskingPool.SPLIT_IDLE
    assert _idle(monkeypatch, tmp_path, {"a/b": "100000 100000"}, 1.0) == 0.0
    # a quota of 4 CPUs leaves the host's idle core counted as it is
    assert _idle(monkeypatch, tmp_path, {"a/b": "400000 100000"}, 0.6) == 1.0


def test_the_tightest_quota_of_the_ancestors_counts(monkeypatch, tmp_path):
    assert _idle(monkeypatch, tmp_path, {"a": "50000 100000", "a/b": "max 100000"}, 0.0) == 0.5
    assert _idle(monkeypatch, tmp_path, {"a": "300000 100000", "a/b": "120000 100000"},
                 0.6) == pytest.approx(0.6)


def test_a_quota_whose_use_cannot_be_read_counts_no_core(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    monkeypatch.setattr(IdleCores, "STAT", str(stat))
    monkeypatch.setattr(IdleCores, "CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(IdleCores, "CGROUPS", str(tmp_path / "fs"))
    monkeypatch.setattr(IdleCores, "EVERY", 0.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    _cgroups(tmp_path, {"a/b": "100000 100000"}, 1.0)
    (tmp_path / "fs" / "a" / "b" / "cpu.stat").unlink()
    _stat(stat, 100, 100)
    cores = IdleCores()
    _stat(stat, 200, 200)
    assert cores.idle() == 0.0
