"""The normalisation table read back from its cache is the one `_table()` builds: a stale or
damaged cache would change what every rule sees."""

from __future__ import annotations

from types import SimpleNamespace

from douane.policy import normalize


def test_the_cached_fold_table_is_the_built_one(tmp_path, monkeypatch):
    bytecode = SimpleNamespace(cache_from_source=lambda _: str(tmp_path / "normalize.pyc"))
    monkeypatch.setattr(normalize, "importlib", SimpleNamespace(util=bytecode))
    monkeypatch.setattr(normalize.sys, "dont_write_bytecode", False)
    built = normalize._table()
    assert normalize._cached_table() == built == normalize.FOLD  # built, and written
    [cache] = tmp_path.glob("normalize.fold-*.json")
    cache.write_text('[[65, "b"]]')  # read back as it is: what the cache holds is what is used
    assert normalize._cached_table() == {65: "b"}
    cache.write_text('[[65, "a"], [66')  # damaged: built again and rewritten
    assert normalize._cached_table() == built
    assert normalize._cached_table() == built  # now from the rewritten cache
    monkeypatch.setattr(normalize.sys, "dont_write_bytecode", True)
    cache.unlink()
    assert normalize._cached_table() == built and not cache.exists()  # PYTHONDONTWRITEBYTECODE
