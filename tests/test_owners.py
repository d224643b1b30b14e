"""douane.owners: the table of ids an upstream issued, with their user (bounded)."""

from __future__ import annotations

from douane import owners


def test_the_table_is_bounded_and_keeps_the_ids_in_use(monkeypatch):
    """Past `SIZE` the id issued or used longest ago is dropped: an id in use is kept (once
    dropped, it is no longer held to its user)."""
    monkeypatch.setattr(owners, "SIZE", 3)
    table = owners.Owners()
    for key in ("conv_a", "conv_b", "conv_c"):
        table.claim("llm", key, "ada")
    assert not table.foreign("llm", ["conv_a"], "ada")  # used: now the latest
    assert table.foreign("llm", ["conv_a"], "grace")
    table.claim("llm", "conv_d", "grace")
    assert table.foreign("llm", ["conv_a"], "grace") and table.foreign("llm", ["conv_d"], "ada")
    assert not table.foreign("llm", ["conv_b"], "grace")  # dropped: no longer held to ada
    assert not table.foreign("llm", ["conv_unseen"], "grace")  # another replica's may pass
    assert len(table._owner) == 3
