"""The shared store: `database:` in the config, the schema douane migrates, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from douane import config as configmod
from douane.interaction import Interaction, McpMessage, TextPiece
from douane.policy.limits import SharedRateLimiter
from douane.policy.model import Limits
from douane.store import StoreUnavailable
from douane.store.postgres import PgStore
from douane.store.schema import MIGRATIONS, Migration
from tests.support.postgres import PASSWORD, USER

BASE = """\
version: 1
identity:
  dev_issuer: {enabled: true}
upstreams:
  openai: {url: https://api.openai.com/v1, protocol: openai}
"""


def load(tmp_path, text: str) -> configmod.Config:
    path = tmp_path / "douane.yaml"
    path.write_text(BASE + text)
    return configmod.load(path)


def test_no_database_is_the_sqlite_default(tmp_path):
    assert load(tmp_path, "").database is None


def test_database_url_and_password(tmp_path, monkeypatch):
    monkeypatch.setenv("DOUANE_DB_PASSWORD", "s3cret-pw")
    db = load(tmp_path, "database: postgresql://douane@db.internal:5433/douane\n").database
    assert db and db.url == "postgresql://douane@db.internal:5433/douane" and db.password is None
    db = load(tmp_path, "database:\n  url: postgres://douane@db/douane\n"
              "  password: {env: DOUANE_DB_PASSWORD}\n  pool_size: 4\n  timeout: 2\n").database
    assert db and db.password == "s3cret-pw" and (db.pool_size, db.timeout) == (4, 2.0)
    assert "s3cret-pw" not in repr(db)


@pytest.mark.parametrize("text, expected", [
    ("database: mysql://douane@db/douane\n",
     "douane.yaml:6 database: expected postgresql://USER@HOST[:PORT]/DBNAME (the shared "
     "PostgreSQL store; leave database out for the local SQLite default), got "
     "mysql://douane@db/douane"),
    ("database: postgresql://douane@db\n", "expected postgresql://USER@HOST[:PORT]/DBNAME"),
    ("database: postgresql://douane@db:notaport/douane\n", "expected postgresql://"),
    ("database: postgresql:///douane\n", "the URL names no host"),
    ("database: {url: 'postgresql://douane:hunter2-pw@db/douane'}\n",
     "douane.yaml:6 database.url: the password does not belong in the URL"),
    ("database: {url: 'postgresql://douane:hunter2-pw@db:x/douane'}\n", "got the URL given"),
    ("database: 'postgresql://douane@db/douane?sslmode=require&password=hunter2-pw'\n",
     "database: the password does not belong in the URL"),
    ("database: 'mysql://douane@db/douane?PassWord=hunter2-pw'\n", "got the URL given"),
    ("database: {url: postgresql://d@db/d, pool_size: 0}\n", "database.pool_size: expected 1"),
    ("database: {url: postgresql://d@db/d, timeout: 0}\n", "database.timeout: expected seconds"),
    ("database: {url: postgresql://d@db/d, password: hunter2-pw}\n",
     "database.password: expected a mapping"),
    ("database: {url: postgresql://d@db/d, pasword: {env: X}}\n", "database.pasword: unknown"),
])
def test_invalid_database_says_how_to_fix_it(tmp_path, text, expected):
    with pytest.raises(configmod.ConfigError) as e:
        load(tmp_path, text)
    assert expected in str(e.value)
    assert "hunter2-pw" not in str(e.value)


def database(url: str, **kwargs) -> configmod.Database:
    """The config of a test cluster's database: the URL without its password, given apart."""
    return configmod.Database(url.replace(f":{PASSWORD}@", "@"), password=PASSWORD, **kwargs)


async def started(store: PgStore, timeout: float = 30) -> PgStore:
    store.start()
    async with asyncio.timeout(timeout):
        while not store.ready:
            await asyncio.sleep(0.02)
    return store


def test_schema_is_created_once_and_versioned(postgres):
    url = postgres.new_database()

    async def run() -> None:
        stores = [PgStore(database(url), f"r{i}") for i in range(3)]
        await asyncio.gather(*(started(s) for s in stores))  # replicas starting together
        for s in stores:
            await s.close()

    asyncio.run(run())
    with psycopg.connect(url) as conn:
        versions = conn.execute("SELECT version, name FROM douane_schema_version ORDER BY 1")
        assert [tuple(r) for r in versions] == [(m.version, m.name) for m in MIGRATIONS]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE "
                                             "schemaname = 'public'")}
        assert {"approvals", "grants", "limit_usage", "douane_schema_version"} <= tables


def test_a_newer_schema_is_refused(postgres, monkeypatch, caplog):
    url = postgres.new_database()
    future = (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "from the future",
                                     "CREATE TABLE future (x int)"))

    async def run() -> None:
        monkeypatch.setattr("douane.store.postgres.MIGRATIONS", future)
        await (await started(PgStore(database(url), "new"))).close()
        monkeypatch.setattr("douane.store.postgres.MIGRATIONS", MIGRATIONS)
        old = PgStore(database(url), "old")
        old.start()
        await asyncio.sleep(1)
        assert not old.ready
        with pytest.raises(StoreUnavailable, match="not ready"):
            await old.fetchone("SELECT 1")
        await old.close()

    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    assert "newer than this douane's" in caplog.text


def test_outage_is_unavailable_then_recovers_by_itself(postgres, caplog):
    """Calls fail fast and clearly while the database is down, and succeed again once it is back,
    without a restart; neither the password nor the URL's secret reach the log."""
    url = postgres.new_database()

    async def run() -> None:
        store = await started(PgStore(database(url, timeout=2), "r1"))
        assert await store.fetchone("SELECT 1 AS one") == {"one": 1}
        postgres.stop()
        try:
            for _ in range(3):
                with pytest.raises(StoreUnavailable, match="unavailable") as e:
                    await asyncio.wait_for(store.fetchone("SELECT 1 AS one"), 10)
                assert PASSWORD not in str(e.value)
        finally:
            postgres.start()
        async with asyncio.timeout(30):
            while True:
                try:
                    assert await store.fetchone("SELECT 1 AS one") == {"one": 1}
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
        await store.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())
    assert PASSWORD not in caplog.text


def test_a_store_started_while_the_database_is_down_becomes_ready(postgres):
    url = postgres.new_database()

    async def run() -> None:
        with postgres.outage():
            store = PgStore(database(url, timeout=1), "r1")
            store.start()
            await asyncio.sleep(1.5)
            assert not store.ready
        await started(store)
        assert await store.fetchone("SELECT current_user AS u") == {"u": USER}
        await store.close()

    asyncio.run(run())


def test_listen_notify_reaches_another_store(postgres):
    url = postgres.new_database()

    async def run() -> None:
        got: asyncio.Queue[str] = asyncio.Queue()
        a, b = PgStore(database(url), "a"), PgStore(database(url), "b")
        a.subscribe("douane_test", got.put_nowait)
        await started(a)
        await started(b)
        async with asyncio.timeout(10):
            while not a.listening:
                await asyncio.sleep(0.02)
        await b.fetchone("SELECT pg_notify('douane_test', 'hello') AS n")
        assert await asyncio.wait_for(got.get(), 10) == "hello"
        await a.close()
        await b.close()

    asyncio.run(run())


def test_limits_are_counted_once_across_replicas(postgres):
    """Two replicas' limiters on one database: 40 concurrent requests under a limit of 15 a
    minute pass 15 times; the daily token budget and an oversized batch refuse as in memory."""
    url = postgres.new_database()
    chat = Interaction("openai", "chat.completions", model="m", max_tokens=100,
                       texts=[TextPiece("prompt", "user", "x" * 400, ("messages", 0))])

    async def run() -> None:
        stores = [await started(PgStore(database(url), f"r{i}")) for i in range(2)]
        limiters = [SharedRateLimiter(s) for s in stores]
        per_minute = Limits(requests_per_minute=15)
        results = await asyncio.gather(*(limiters[i % 2].check("g|alice", per_minute, chat)
                                         for i in range(40)))
        assert results.count(None) == 15
        assert {r.rule for r in results if r} == {"limit.requests_per_minute"}
        assert await limiters[0].check("g|bob", per_minute, chat) is None  # a key of its own
        # 200 tokens a request (400 characters / 4 + max_tokens 100): a budget of 500 is 2
        budget = Limits(tokens_per_day=500)
        assert [getattr(await lim.check("g|carol", budget, chat), "rule", None)
                for lim in limiters * 2] == [None, None, "limit.tokens_per_day",
                                             "limit.tokens_per_day"]
        assert (await limiters[0].check("g|dan", Limits(tokens_per_day=199), chat)).rule == \
            "limit.tokens_per_day"
        batch = Interaction("mcp", "tools/call", mcp=[McpMessage("tools/call", i, {})
                                                      for i in range(3)])
        assert (await limiters[0].check("g|erin", Limits(batch_size=2), batch)).rule == \
            "limit.batch_size"
        # a batch of 3 calls counts 3 against the minute
        assert await limiters[0].check("g|erin", Limits(requests_per_minute=4), batch) is None
        assert (await limiters[1].check("g|erin", Limits(requests_per_minute=4), batch)).rule \
            == "limit.requests_per_minute"
        for s in stores:
            await s.close()

    asyncio.run(run())
    with psycopg.connect(url) as conn:  # the window is kept per second, not per call
        (seconds,) = conn.execute("SELECT cardinality(seconds) FROM limit_usage WHERE key = "
                                  "'g|alice'").fetchone()
        assert 1 <= seconds <= 2


def test_the_minute_slides(postgres):
    """A call leaves the window 60 s after its second (the stored seconds are moved back: the
    database's clock is the one that counts)."""
    url = postgres.new_database()
    chat = Interaction("openai", "chat.completions", model="m")

    async def run() -> None:
        store = await started(PgStore(database(url), "r"))
        limiter, limits = SharedRateLimiter(store), Limits(requests_per_minute=2)
        assert await limiter.check("k", limits, chat) is None
        assert await limiter.check("k", limits, chat) is None
        assert await limiter.check("k", limits, chat) is not None
        now = "floor(extract(epoch FROM statement_timestamp()))::bigint"
        await store.fetchone(f"UPDATE limit_usage SET seconds = ARRAY[{now} - 58], "
                             "counts = ARRAY[2] RETURNING 1")
        assert await limiter.check("k", limits, chat) is not None  # 58 s ago: still counted
        await store.fetchone(f"UPDATE limit_usage SET seconds = ARRAY[{now} - 60], "
                             "counts = ARRAY[2] RETURNING 1")
        assert await limiter.check("k", limits, chat) is None  # 60 s ago: out of the window
        await store.close()

    asyncio.run(run())


def test_a_secret_is_created_once_for_every_replica(postgres):
    """The approval status links' key: the replicas asking together all get the first one's."""
    url = postgres.new_database()

    async def run() -> None:
        stores = [await started(PgStore(database(url), f"r{i}")) for i in range(3)]
        keys = await asyncio.gather(*(s.secret("approval_status") for s in stores * 2))
        assert len(set(keys)) == 1 and len(keys[0]) == 32
        assert await stores[0].secret("other") != keys[0]
        for s in stores:
            await s.close()

    asyncio.run(run())
