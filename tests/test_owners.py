"""douane.owners: ids an upstream issued, bound to their user in the store (embedded SQLite here;
the shared PostgreSQL in tests/test_owners_e2e.py)."""

from __future__ import annotations

import asyncio
import sqlite3

from douane import owners


def bindings(path) -> owners.Bindings:
    b = owners.Bindings()
    b.use(owners.SqliteBindings(path / "owners.sqlite3"))
    return b


def test_a_binding_holds_across_a_restart_and_is_stored_as_a_digest(tmp_path):
    async def issue() -> None:
        b = bindings(tmp_path)
        await b.bind("llm", "conversations", "conv_" + "x" * 100_000, "ada")
        await b.bind("llm", "mcp", "session-1", "grace")
        b.close()

    async def after_restart() -> list[str | None]:
        b = bindings(tmp_path)  # nothing in memory
        try:
            return [*await b.owners("llm", "conversations", ["conv_" + "x" * 100_000, "conv_y"]),
                    *await b.owners("llm", "mcp", ["session-1"]),
                    *await b.owners("other", "mcp", ["session-1"])]  # per upstream
        finally:
            b.close()

    asyncio.run(issue())
    assert asyncio.run(after_restart()) == ["ada", None, "grace", None]
    rows = sqlite3.connect(tmp_path / "owners.sqlite3").execute(
        "SELECT key, username FROM owners").fetchall()
    assert sorted(u for _, u in rows) == ["ada", "grace"]
    assert all(len(key) == 32 and "conv_" not in key and "session" not in key for key, _ in rows)


def test_adoption_never_takes_a_live_binding_and_issuance_always_wins(tmp_path, monkeypatch):
    async def run() -> list[str | None]:
        b = bindings(tmp_path)
        await b.bind("llm", "responses", "resp_1", "ada")
        await b.bind("llm", "responses", "resp_1", "grace", adopt=True)  # ada's: kept
        await b.bind("llm", "responses", "resp_2", "grace", adopt=True)  # unseen: grace's
        await b.bind("llm", "responses", "resp_2", "ada", adopt=True)
        got = await b.owners("llm", "responses", ["resp_1", "resp_2"])
        await b.bind("llm", "responses", "resp_2", "ada")  # issued (the upstream's word)
        got += await b.owners("llm", "responses", ["resp_2"])
        b.close()
        return got

    assert asyncio.run(run()) == ["ada", "grace", "ada"]


def test_expired_and_excess_bindings_are_forgotten(tmp_path, monkeypatch):
    monkeypatch.setattr(owners, "PER_USER", 2)
    clock = [1_000_000_000.0]
    monkeypatch.setattr(owners.time, "time", lambda: clock[0])

    async def run() -> list[list[str | None]]:
        b = bindings(tmp_path)
        b._pruned = clock[0]  # no pruning but the test's own
        for n in range(3):  # ada's third binding: her oldest goes
            clock[0] += 1
            await b.bind("llm", "responses", f"resp_{n}", "ada")
        await b.bind("llm", "responses", "resp_g", "grace")
        await b.prune(clock[0])
        fresh = bindings(tmp_path)  # reads the store, not the first one's memory
        kept = await fresh.owners("llm", "responses", ["resp_0", "resp_1", "resp_2", "resp_g"])
        clock[0] += owners.TTL_SECONDS + 1
        b._pruned = 0
        await b.bind("llm", "responses", "resp_new", "ada")  # past PRUNE_SECONDS: prunes
        assert b._pruning is not None
        await b._pruning
        fresh2 = bindings(tmp_path)
        later = await fresh2.owners("llm", "responses", ["resp_2", "resp_g", "resp_new"])
        rows = sqlite3.connect(tmp_path / "owners.sqlite3").execute(
            "SELECT count(*) FROM owners").fetchone()[0]
        for x in (b, fresh, fresh2):
            x.close()
        return [kept, later, [rows]]

    kept, later, rows = asyncio.run(run())
    assert kept == [None, "ada", "ada", "grace"]
    assert later == [None, None, "ada"] and rows == [1]


def test_memory_is_bounded_per_kind(tmp_path, monkeypatch):
    monkeypatch.setattr(owners, "SIZE", 3)

    async def run() -> int:
        b = bindings(tmp_path)
        for n in range(10):
            await b.bind("llm", "responses", f"resp_{n}", "ada")
        await b.owners("llm", "responses", [f"resp_{n}" for n in range(10)])
        size = len(b._cache["responses"])
        b.close()
        return size

    assert asyncio.run(run()) == 3


def test_a_binding_in_use_is_kept_past_the_ttl(tmp_path, monkeypatch):
    """Each use marks it (at most once per TOUCH_SECONDS): only an unused one expires."""
    clock = [1_000_000_000.0]
    monkeypatch.setattr(owners.time, "time", lambda: clock[0])

    async def run() -> list[str | None]:
        b = bindings(tmp_path)
        b._pruned = clock[0]
        await b.bind("llm", "conversations", "conv_used", "ada")
        await b.bind("llm", "conversations", "conv_idle", "ada")
        clock[0] += owners.TTL_SECONDS - 60
        assert await b.owners("llm", "conversations", ["conv_used"]) == ["ada"]  # marked used
        clock[0] += 120  # past the TTL of the idle one
        await b.prune(clock[0])
        fresh = bindings(tmp_path)
        got = await fresh.owners("llm", "conversations", ["conv_used", "conv_idle"])
        b.close()
        fresh.close()
        return got

    assert asyncio.run(run()) == ["ada", None]


def test_a_claimed_binding_holds_in_the_process_at_once_and_in_the_store_once_written(tmp_path):
    """What a stream's event issues is bound before the event leaves (`Bindings.claim`): this
    process refuses another user at once, with no store round trip; the store holds it once
    the write is done (another process then too)."""
    async def run() -> tuple[list, list, list]:
        b = bindings(tmp_path)
        task = b.claim("srv", owners.MCP_STATE, ["\0state-1"], "ada")
        now = await b.owners("srv", owners.MCP_STATE, ["\0state-1"])  # the cache: no await
        assert not task.done()  # (the write has not even started)
        await task
        other = bindings(tmp_path)  # another process: the store's word
        stored = await other.owners("srv", owners.MCP_STATE, ["\0state-1", "\0state-2"])
        other.close()
        b.close()
        return now, stored, [task.exception()]

    assert asyncio.run(run()) == (["ada"], ["ada", None], [None])
