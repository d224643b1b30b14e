"""douane.owners: the table of ids an upstream issued, with their user (bounded)."""

from __future__ import annotations

from douane import owners


def test_the_table_is_bounded_and_keeps_the_ids_in_use(monkeypatch):
    """Past `SIZE` the id issued or used longest ago is dropped: an id in use is kept (a
    conversation is refused to its own user once dropped)."""
    monkeypatch.setattr(owners, "SIZE", 3)
    table = owners.Owners()
    for key in ("conv_a", "conv_b", "conv_c"):
        table.claim("llm", key, "ada")
    assert table.issued_to("llm", "conv_a", "ada")  # used: now the latest
    assert not table.issued_to("llm", "conv_a", "grace")
    table.claim("llm", "conv_d", "grace")
    assert table.issued_to("llm", "conv_a", "ada") and table.issued_to("llm", "conv_d", "grace")
    assert not table.issued_to("llm", "conv_b", "ada")  # dropped
    assert len(table._owner) == 3
