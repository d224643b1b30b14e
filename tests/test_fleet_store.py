"""The fleet's session index and audit chain heads in a real PostgreSQL (no gateway process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
import yaml

from douane import config as configmod
from douane import store
from douane.audit import AuditLog
from douane.chainheads import ChainHeads, heads
from douane.cli import main
from douane.recording import index, writer
from douane.store.postgres import PgStore
from tests.support.gateway import base_config
from tests.support.postgres import PASSWORD
from tests.test_store import database, started

HMAC_KEY = "fleet-test-hmac-key-0123456789abcdef"


@pytest.fixture(scope="module")
def url(postgres) -> str:
    url = postgres.new_database()

    async def migrate() -> None:
        await (await started(PgStore(database(url), "migrator"))).close()

    asyncio.run(migrate())
    return url


def fleet_config(tmp_path: Path, url: str, host: str, monkeypatch) -> configmod.Config:
    monkeypatch.setenv("DOUANE_TEST_DB_PASSWORD", PASSWORD)
    monkeypatch.setenv("DOUANE_TEST_HMAC", HMAC_KEY)
    file = tmp_path / "douane.yaml"
    file.write_text(yaml.safe_dump({
        **base_config(None, "http://127.0.0.1:9"),
        "gateway": {"state_dir": str(tmp_path / "state"), "replica": host},
        "audit": {"hmac_key": {"env": "DOUANE_TEST_HMAC"}},
        "recording": {},
        "database": {"url": database(url).url, "password": {"env": "DOUANE_TEST_DB_PASSWORD"}}}))
    return configmod.load(file, gateway=False)


def flow_row(flow_id: str, replica: str, file: str, ts: float = 1000.0) -> dict:
    return {**dict.fromkeys(index.COLUMNS), "flow_id": flow_id, "decision_id": "dcn_" + flow_id,
            "ts": ts, "user": "alice@corp", "decision": "allow", "file": file, "offset": 0,
            "replica": replica}


def writer_row(flow_id: str, replica: str, file: str) -> tuple:
    """`flow_row` as the recording writer hands it over (`index.state_row`)."""
    return tuple(flow_row(flow_id, replica, file)[c] for c in index.STORE_COLUMNS)


def test_one_index_for_every_replica(url, tmp_path, monkeypatch, capsys):
    config = fleet_config(tmp_path, url, "gw-a", monkeypatch)
    with store.connect(config.database, autocommit=True) as db:
        db.execute("DELETE FROM flows")
        index.insert(db, [flow_row("f1", "gw-a/w1", "w1/alice/s.mitm", 1),
                          flow_row("f2", "gw-a/w2", "w2/alice/s.mitm", 2),
                          flow_row("f3", "gw-b", "alice/s.mitm", 3)])
        index.insert(db, [flow_row("f1", "gw-a/w1", "w1/alice/s.mitm", 1)])  # a retried batch
        rows = index.query(db, user="alice@corp", limit=-1)
        assert [(r["flow_id"], r["replica"]) for r in rows] == \
            [("f3", "gw-b"), ("f2", "gw-a/w2"), ("f1", "gw-a/w1")]
        assert index.find(db, "dcn_f2")["file"] == "w2/alice/s.mitm"
        assert [index.local(r["replica"], "gw-a") for r in rows] == [False, True, True]
        assert not index.local("gw-ab", "gw-a") and not index.local("gw-a/w1", "gw")
        index.delete_file(db, "w1/alice/s.mitm", index.replica_of(Path("w1/alice/s.mitm"),
                                                                   "gw-a"))
        assert {r["flow_id"] for r in index.query(db)} == {"f2", "f3"}
        # reindex rebuilds this host's rows from its files, never another host's
        assert index.reindex(db, tmp_path / "empty", "gw-a") == 0
        assert {r["flow_id"] for r in index.query(db)} == {"f3"}
    # a flow recorded on another host: said where, never read from a file of this host
    with pytest.raises(SystemExit, match="recorded by replica gw-b: its recording is on that"):
        main(["sessions", "--config", config.file, "show", "dcn_f3"])
    out = tmp_path / "alice.mitm"
    assert main(["sessions", "--config", config.file, "export", "--user", "alice@corp",
                 "-o", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "wrote 0 flow(s)" in printed
    assert "not written: 1 flow(s) recorded by replica gw-b, on its host" in printed


def verify(config: configmod.Config, *args: str) -> int:
    return main(["audit", "verify", "--config", config.file, *args])


def test_audit_verify_detects_a_chain_cut_from_the_end(url, tmp_path, monkeypatch, capsys):
    config = fleet_config(tmp_path, url, "gw-c", monkeypatch)
    with store.connect(config.database, autocommit=True) as db:
        db.execute("DELETE FROM audit_heads")
        db.execute("INSERT INTO audit_heads VALUES ('gw-z/w1', 'gw-z', '/srv/a.jsonl', 7, 'ab', 0)")
    logs = {}
    for worker in ("", "w1"):
        path = config.audit.path if not worker else \
            config.audit.path.with_name(f"audit.{worker}.jsonl")
        replica = f"gw-c/{worker}" if worker else "gw-c"
        log = AuditLog(configmod.AuditConfig(path, 10**6, 2), HMAC_KEY.encode(),
                       ChainHeads(config.database, replica, "gw-c", str(path)))
        for n in range(5):
            log.append({"event": "test", "n": n})
        log.close()
        logs[replica] = path
    with store.connect(config.database, autocommit=True) as db:
        assert {h.replica: h.seq for h in heads(db)} == {"gw-c": 5, "gw-c/w1": 5, "gw-z/w1": 7}
    assert verify(config) == 0
    out = capsys.readouterr().out
    assert "ok gw-c: 5 record(s)" in out and "ok gw-c/w1: 5 record(s)" in out
    assert "head (seq 5) is in it" in out
    assert "not checked here: gw-z/w1 (host gw-z" in out

    # the last record of w1's log cut: alone, the file still verifies; the head says otherwise
    lines = logs["gw-c/w1"].read_bytes().splitlines(keepends=True)
    logs["gw-c/w1"].write_bytes(b"".join(lines[:-1]))
    assert verify(config) == 1
    out = capsys.readouterr().out
    assert "ok gw-c: 5 record(s)" in out
    assert "FAIL gw-c/w1: " in out and "ends at seq 4, but the shared store's head of this " \
        "chain is seq 5: records were cut from the end" in out
    assert verify(config, "--log", str(logs["gw-c/w1"])) == 1  # its replica read from the name

    # ... and written again from there by a restarted replica: the head's record differs
    log = AuditLog(configmod.AuditConfig(logs["gw-c/w1"], 10**6, 2), HMAC_KEY.encode(),
                   ChainHeads(config.database, "gw-c/w1", "gw-c", str(logs["gw-c/w1"])))
    log.append({"event": "test", "n": "again"})
    log.close()
    assert verify(config) == 1
    assert "record seq 5 is not the one the shared store's head names" in capsys.readouterr().out

    # a whole log deleted
    for p in logs["gw-c/w1"].parent.glob("audit.w1.jsonl*"):
        p.unlink()
    assert verify(config) == 1
    assert "FAIL gw-c/w1: the shared store's head is seq 5" in capsys.readouterr().out


def test_a_store_down_delays_the_head_never_the_log(postgres, tmp_path):
    url = postgres.new_database()
    down = configmod.Database(f"postgresql://nobody@127.0.0.1:{postgres.port + 1}/none",
                              timeout=1.0)  # nothing listens there
    path = tmp_path / "audit.jsonl"
    log = AuditLog(configmod.AuditConfig(path, 10**6, 2), b"k",
                   ChainHeads(down, "gw-d", "gw-d", str(path)))
    for n in range(3):
        log.append({"event": "test", "n": n})
    log.close()  # the head thread gives up after its deadline; the records are all written
    assert len(path.read_bytes().splitlines()) == 3
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'audit_heads'"
                            ).fetchone() == (0,)


def test_index_rows_wait_for_a_store_that_is_down(url, postgres, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(writer, "PENDING_ROWS", 3)
    down = configmod.Database(f"postgresql://nobody@127.0.0.1:{postgres.port + 1}/none",
                              timeout=1.0)
    indexer = writer._SharedIndexer(writer.SharedIndex(down, "gw-e"))
    indexer.put([writer_row(f"e{i}", "gw-e", "alice/s.mitm") for i in range(5)])
    indexer.close(timeout=3)
    assert [r[0] for r in indexer.rows] == ["e2", "e3", "e4"] and indexer.dropped == 2
    assert "3 flow(s) not indexed in the shared store" in caplog.text
    # the store up: the rows go in, in batches, and close() returns once they are in
    config = fleet_config(tmp_path, url, "gw-e", monkeypatch)
    indexer = writer._SharedIndexer(writer.SharedIndex(config.database, "gw-e"))
    indexer.put([writer_row(f"e{i}", "gw-e", "alice/s.mitm") for i in range(3)])
    indexer.close()
    with store.connect(config.database) as db:
        assert {r["flow_id"] for r in index.query(db) if r["replica"] == "gw-e"} == \
            {"e0", "e1", "e2"}
