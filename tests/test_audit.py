"""The audit log's hash chain: intact logs verify, every kind of tampering is named."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from douane import audit, untrusted
from douane.config import AuditConfig
from tests.support.gateway import base_config
from tests.support.waiting import until

KEY = b"k" * 32


def write_log(path: Path, n: int, max_bytes: int = 10**9) -> None:
    log = audit.AuditLog(AuditConfig(path, max_bytes, 5), KEY)
    for i in range(n):
        log.append({"event": "decision", "decision_id": f"dcn_{i}", "user": "alice"})
    log.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_clean_log_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    result = audit.verify(path, KEY)
    assert result.ok and result.records == 5
    assert not audit.verify(path, b"wrong key").ok


def test_a_record_is_timed_to_the_millisecond_it_is_written(tmp_path):
    """The time is formatted once per millisecond (`AuditLog._now`), as datetime writes it."""
    path = tmp_path / "audit.jsonl"
    before = datetime.now(UTC).isoformat(timespec="milliseconds")
    write_log(path, 300)
    after = datetime.now(UTC).isoformat(timespec="milliseconds")
    stamps = [json.loads(line)["ts"] for line in lines(path)]
    assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= after
    assert all(datetime.fromisoformat(ts).isoformat(timespec="milliseconds") == ts and
               ts.endswith("+00:00") for ts in stamps)


def test_chain_survives_restart_and_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 10, max_bytes=1000)
    write_log(path, 10, max_bytes=1000)
    result = audit.verify(path, KEY)
    assert result.ok and result.records == 20 and result.files > 2


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert", "reorder"])
def test_tampering_is_detected_at_the_first_bad_line(tmp_path, tamper):
    path = tmp_path / "audit.jsonl"
    write_log(path, 6)
    rows = lines(path)
    if tamper == "edit":
        rows[2] = rows[2].replace('"alice"', '"mallory"')
    elif tamper == "delete":
        del rows[2]
    elif tamper == "insert":
        rows.insert(2, rows[1])
    else:
        rows[2], rows[3] = rows[3], rows[2]
    path.write_text("".join(rows))
    result = audit.verify(path, KEY)
    assert not result.ok
    assert result.error.startswith(f"{path}:3: ")


def test_torn_last_line_is_cut_and_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    with path.open("a") as f:
        f.write('{"event": "decision", "seq": 4, "pr')  # a crash mid-write
    write_log(path, 1)
    records = [json.loads(line) for line in lines(path)]
    assert records[3]["event"] == "audit.recovered" and records[3]["truncated_bytes"] > 0
    assert audit.verify(path, KEY).ok


def test_verify_command(tmp_path, capsys, monkeypatch):
    from douane.cli import main

    state = tmp_path / "state"
    config = tmp_path / "douane.yaml"
    config.write_text(f"version: 1\ngateway: {{state_dir: {state}}}\n"
                      "identity: {dev_issuer: {enabled: true}}\n")
    from douane import config as configmod

    loaded = configmod.load(config)
    log = audit.AuditLog(loaded.audit, audit.hmac_key(loaded))
    log.append({"event": "decision"})
    log.close()
    assert main(["audit", "verify", "--config", str(config)]) == 0
    assert "chain intact" in capsys.readouterr().out
    loaded.audit.path.write_text(loaded.audit.path.read_text().replace("decision", "decisioN"))
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "bad MAC" in capsys.readouterr().out


@pytest.mark.parametrize("tamper", ["delete a rotated file", "swap rotated files",
                                    "edit a rotated file"])
def test_tampering_across_rotated_files_is_detected(tmp_path, tamper):
    path = tmp_path / "audit.jsonl"
    write_log(path, 20, max_bytes=1000)
    files = audit.log_files(path)
    assert len(files) >= 4 and audit.verify(path, KEY).ok
    oldest, middle, newer = files[0], files[1], files[2]
    if tamper == "delete a rotated file":
        middle.unlink()
        bad = newer
    elif tamper == "swap rotated files":
        middle.rename(tmp_path / "tmp")
        newer.rename(middle)
        (tmp_path / "tmp").rename(newer)
        bad = middle
    else:
        middle.write_text(middle.read_text().replace('"alice"', '"mallory"', 1))
        bad = middle
    result = audit.verify(path, KEY)
    assert not result.ok and result.error.startswith(f"{bad}:1: "), result.error
    assert result.records == len(lines(oldest))


def write_records(path: Path, n: int, *, backups: int, retention_days: int) -> audit.AuditLog:
    log = audit.AuditLog(AuditConfig(path, 1000, backups, retention_days=retention_days), KEY)
    for i in range(n):
        log.append({"event": "decision", "decision_id": f"dcn_{i}", "user": "alice"})
    log.close()
    return log


def test_rotation_keeps_records_younger_than_the_retention(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    write_records(path, 40, backups=2, retention_days=30)
    files = audit.log_files(path)
    assert len(files) > 3  # over the budget of 2 backups: nothing young was deleted
    result = audit.verify(path, KEY)
    assert result.ok and result.first_seq == 1 and result.first_file == files[0], result
    records = [json.loads(line) for f in files for line in lines(f)]
    assert not [r for r in records if r["event"] == "audit.deleted"]
    over = [r for r in records if r["event"] == "audit.over_budget"]
    assert over and over[-1]["files_over_budget"] == len(files) - 1 - 2
    assert "over its size budget" in caplog.text


def test_rotation_past_retention_deletes_and_says_so(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    write_records(path, 40, backups=2, retention_days=0)
    files = audit.log_files(path)
    assert len(files) == 3
    result = audit.verify(path, KEY)
    assert result.ok and result.first_seq > 1 and result.deleted_by is not None, result
    assert f"records 1-{result.first_seq - 1} were deleted by rotation" in result.describe()
    deleted = [json.loads(line) for f in files for line in lines(f)
               if '"audit.deleted"' in line]
    assert deleted[-1]["last_seq"] == result.first_seq - 1


@pytest.mark.parametrize("retention_days", [0, 30])
def test_a_chain_cut_at_its_start_does_not_verify(tmp_path, retention_days):
    # someone deleted the oldest file(s): the surviving chain is intact, but its start is gone
    path = tmp_path / "audit.jsonl"
    write_records(path, 40, backups=3, retention_days=retention_days)
    audit.log_files(path)[0].unlink()
    result = audit.verify(path, KEY)
    assert not result.ok and "are gone and no audit.deleted record" in result.error, result
    assert result.first_seq > 1 and result.records > 0


def test_client_values_in_a_record_are_bounded_and_scrubbed(tmp_path):
    path = tmp_path / "audit.jsonl"
    key = "sk-proj-" + "Zq3x" * 10
    log = audit.AuditLog(AuditConfig(path, 10**9, 5), KEY)
    log.append({"event": "decision", "model": "m" * 10_000_000, "user": key,
                "groups": [f"g{i}" for i in range(10_000)],
                "reasons": [{"rule": "x", "message": "tool " + "t" * 100_000}]})
    log.close()
    data = path.read_bytes()
    assert len(data) < 12_000 and key.encode() not in data
    record = json.loads(data)
    assert record["user"] == "<SECRET:detector.secret.api_key>"
    assert record["model"].endswith(f"…[cut: 10000000 characters, sha256 "
                                    f"{untrusted.digest('m' * 10_000_000)}]")
    assert len(record["groups"]) == untrusted.LIST_ITEMS + 1
    assert audit.verify(path, KEY).ok


def test_verify_command_says_where_the_chain_starts(tmp_path, capsys):
    from douane import config as configmod
    from douane.cli import main

    config = tmp_path / "douane.yaml"
    config.write_text(f"version: 1\ngateway: {{state_dir: {tmp_path / 'state'}}}\n"
                      "identity: {dev_issuer: {enabled: true}}\n"
                      "audit: {max_bytes: 1000, backups: 2, retention_days: 0}\n")
    loaded = configmod.load(config)
    log = audit.AuditLog(loaded.audit, audit.hmac_key(loaded))
    for i in range(40):
        log.append({"event": "decision", "decision_id": f"dcn_{i}"})
    log.close()
    assert main(["audit", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    first = audit.verify(loaded.audit.path, audit.hmac_key(loaded)).first_seq
    assert f"chain starts at seq {first} " in out and "deleted by rotation past retention" in out
    audit.log_files(loaded.audit.path)[0].unlink()  # the evidence someone wants gone
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "are gone and no audit.deleted record" in capsys.readouterr().out


def test_a_record_that_cannot_be_written_is_lost_alone_and_the_gap_is_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(AuditConfig(path, 10**9, 5), KEY)
    for i in range(6):  # one burst, most likely: its other records are written all the same
        log.append({"event": "decision", "decision_id": f"dcn_{i}",
                    **({"unencodable": object()} if i == 2 else {})})
    log.close()
    records = [json.loads(line) for line in lines(path)]
    assert [r.get("decision_id") for r in records] == ["dcn_0", "dcn_1", None, "dcn_3", "dcn_4",
                                                       "dcn_5"]
    assert records[2]["event"] == "audit.gap" and records[2]["lost_records"] == 1
    assert audit.verify(path, KEY).ok


def test_a_rotation_failing_mid_burst_keeps_the_chain(tmp_path, monkeypatch):
    """A burst's records were flushed to the file, then rotation failed after the rename (here
    the oldest file cannot be deleted): the error path cut the *new* file at the old file's
    length (filling it with NUL bytes) and rewound the chain over the records already flushed,
    so later records reused their sequence numbers. Now only what failed is lost, and said."""
    path = tmp_path / "audit.jsonl"
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name.startswith("audit.jsonl."):
            raise PermissionError(13, "Operation not permitted", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    log = audit.AuditLog(AuditConfig(path, 1000, 1, retention_days=0), KEY)
    log._bursts.window = 0.5  # every record below in one burst: rotations happen inside it
    for i in range(30):
        log.append({"event": "decision", "decision_id": f"dcn_{i}", "user": "alice"})
    log.close()
    files = audit.log_files(path)
    assert not [f for f in files if b"\x00" in f.read_bytes()]
    assert audit.verify(path, KEY).ok, audit.verify(path, KEY).error
    written = {json.loads(line).get("decision_id") for f in files for line in lines(f)}
    gaps = sum(json.loads(line).get("lost_records", 0) for f in files for line in lines(f))
    assert len(written & {f"dcn_{i}" for i in range(30)}) + gaps == 30


def test_a_writer_that_falls_behind_stops_new_traffic_until_it_catches_up(tmp_path, monkeypatch):
    """Records wait in memory for the writer thread: with a disk slower than the traffic they
    piled up without bound while requests went on. Past the bound the log is not ready (the
    gateway refuses new requests 503, /healthz says so) until the writer catches up."""
    monkeypatch.setattr(audit, "MAX_BACKLOG", 50)
    entered, slow = threading.Event(), threading.Event()
    log = audit.AuditLog(AuditConfig(tmp_path / "audit.jsonl", 10**9, 5), KEY)
    write = log._write
    monkeypatch.setattr(log, "_write",
                        lambda records: (entered.set(), slow.wait(), write(records)))
    log.append({"event": "decision", "decision_id": "dcn_first"})
    assert entered.wait(10)  # the writer is busy with the first record: the rest waits
    assert log.ready
    for i in range(59):
        log.append({"event": "decision", "decision_id": f"dcn_{i}"})
    assert log.backlog == 59 and not log.ready
    slow.set()
    assert until(lambda: log.ready)
    log.close()
    assert audit.verify(tmp_path / "audit.jsonl", KEY).records == 60


def test_unauthenticated_refusals_past_the_bounds_are_counted_not_recorded():
    """`douane.preauth`: per peer, across peers, and the table of peers, each bounded."""
    from douane.config import Unauthenticated
    from douane.preauth import SAMPLE, Budget

    budget = Budget(Unauthenticated(per_peer=2, total=5, window_seconds=60, peers=3))
    admitted = [budget.admit("10.0.0.1", "identity.missing", f"dcn_a{i}", 100.0 + i)
                for i in range(50)]
    assert admitted == [True, True] + [False] * 48
    assert [budget.admit(f"10.0.1.{i}", "protocol.bad_head", f"dcn_b{i}", 200.0)
            for i in range(5)] == [True, True, True, False, False]  # 5 across peers; table full
    assert not budget.due(159.9) and budget.due(160.0)
    summaries = {s["client"]: s for s in budget.end_window()}
    one = summaries["10.0.0.1"]
    assert (one["recorded"], one["counted"], one["rules"]) == (2, 48, {"identity.missing": 48})
    ids = one["decision_ids"]
    assert ids["first"] == "dcn_a2" and ids["last"] == "dcn_a49" and len(ids["sample"]) == SAMPLE
    assert set(ids["sample"]) <= {f"dcn_a{i}" for i in range(3, 50)}
    assert one["first"] < one["last"] and not one["untracked_peers"]
    # two more addresses filled the table (recorded: no summary); past it, three share one
    assert set(summaries) == {"10.0.0.1", None} and summaries[None]["untracked_peers"]
    assert summaries[None]["counted"] == 2 and summaries[None]["recorded"] == 1
    assert budget.peers == {} and budget.end_window() == []  # a new window
    assert budget.admit("10.0.0.1", "identity.missing", "dcn_c", 300.0)


def test_a_log_signed_with_json_encoding_still_verifies(tmp_path):
    """Records written before orjson's encoding (json.dumps: `1e-05`, `NaN`, where orjson writes
    `0.00001`, `null`) verify in a chain with records written after it; an edit still shows."""
    path = tmp_path / "audit.jsonl"
    prev, out = audit.GENESIS, []
    for seq, value in enumerate((1e-05, float("nan"), 0.5), 1):
        record = {"event": "decision", "latency_ms": {"total": value}, "seq": seq, "prev": prev}
        body = audit.json_canonical(record)
        prev = hmac.new(KEY, body, hashlib.sha256).hexdigest()
        out.append(body[:-1] + b',"mac":"' + prev.encode() + b'"}\n')
    path.write_bytes(b"".join(out))
    assert audit.canonical({"x": 1e-05}) != audit.json_canonical({"x": 1e-05})
    write_log(path, 3)  # appended with today's encoding, chained on
    result = audit.verify(path, KEY)
    assert result.ok and result.records == 6, result.error
    path.write_bytes(path.read_bytes().replace(b"1e-05", b"2e-05"))
    assert audit.verify(path, KEY).error.endswith(":1: record was altered (bad MAC)")


def test_canonical_matches_json_for_what_records_hold():
    """Strings of every code point, integers, nested values, non-ASCII keys: byte for byte as
    `json.dumps` encoded them, so a verifier re-encoding a parsed record gets the signed bytes."""
    text = "".join(chr(i) for i in range(0x3000) if not 0xD800 <= i < 0xE000) + "😀\u2028"
    record = {"é": [1, -2, 2**63 - 1, None, True, 1.5, 0.001], "a": {"z": text, "b": ""},
              "big": 2**70}
    assert audit.canonical(record) == audit.json_canonical(record)
    del record["big"]
    assert audit.canonical(record) == audit.json_canonical(record)


def test_a_refused_record_after_the_file_was_cut_elsewhere_pads_nothing(tmp_path):
    """The writer cuts what the disk refused back to the length it last flushed; when something
    else cut the file meanwhile (a `copytruncate` rotation), that cut made the file longer again,
    padded with NUL bytes up to the old length."""
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(AuditConfig(path, 10**9, 5), KEY)
    log.append({"event": "decision", "decision_id": "dcn_0"})
    assert until(lambda: path.exists() and path.read_bytes().endswith(b"\n"))
    path.write_bytes(b"")  # cut in place: the same file, empty
    log.append({"event": "decision", "decision_id": "dcn_1", "unencodable": object()})
    log.close()
    data = path.read_bytes()
    assert b"\x00" not in data
    assert [json.loads(line)["event"] for line in data.splitlines()] == ["audit.gap"]


def _open_by(pid: int, path: Path) -> bool:
    """Whether process `pid` holds `path` open."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone meanwhile, or a descriptor closed while read
        return False


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _dead(pid: int) -> bool:
    """Gone, or a zombie (exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_gateway_never_writes_its_audit_log_and_a_crash_loses_nothing_it_handed_over(
        issuer, llm, make_gateway):
    """Scrubbing, signing and writing a record took the gateway's GIL (~25-50 µs a record, its
    writer thread convoying with the event loop): the log is written by a process of its own,
    which holds the file; the gateway only pickles each window's records into a pipe. Killed
    alone (kill -9 of the gateway, not of its group), what it handed over is still written,
    the chain intact, and the writer exits (EOF)."""
    gw = make_gateway(base_config(issuer.url, llm.url), mode=f"reverse:{llm.url}")
    token = issuer.mint("alice@corp.example", ["engineering"])
    ids = [httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                  "content": f"hi {i}"}]})
           .headers["x-douane-decision-id"] for i in range(5)]
    path = gw.audit_file().resolve()
    assert until(lambda: path.exists())
    writers = [pid for pid in _children(gw.proc.pid) if _open_by(pid, path)]
    assert not _open_by(gw.proc.pid, path) and len(writers) == 1
    time.sleep(0.2)  # past a window: the records are in the pipe, if not written yet
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait()
    assert until(lambda: _dead(writers[0]))
    written = {r.get("decision_id") for r in gw.audit_records()}
    assert set(ids) <= written
    key = (gw.state_dir / "audit-hmac.key").read_bytes().strip()
    assert audit.verify(path, key).ok


def test_a_dead_audit_writer_refuses_the_next_request(issuer, llm, make_gateway):
    """The writer process killed: the gateway sees it go at once (its sentinel, on the event
    loop) and refuses the next request 503 before it goes upstream; it did not know until a
    write to the pipe failed, after the request it was to record had been served."""
    gw = make_gateway(base_config(issuer.url, llm.url), mode=f"reverse:{llm.url}")
    token = issuer.mint("alice@corp.example", ["engineering"])

    def post() -> httpx.Response:
        return httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {token}"},
                          json={"model": "gpt-4o-mini",
                                "messages": [{"role": "user", "content": "hi"}]})

    assert post().status_code == 200
    path = gw.audit_file().resolve()
    assert until(lambda: path.exists())
    [writer] = [pid for pid in _children(gw.proc.pid) if _open_by(pid, path)]
    os.kill(writer, signal.SIGKILL)
    assert until(lambda: _dead(writer))
    time.sleep(0.2)  # the event loop's next pass
    before = len(llm.requests)
    resp = post()
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "audit_unavailable"
    assert len(llm.requests) == before
    assert "the audit writer exited" in gw.log_text()


@pytest.mark.parametrize("started", ["spawned", "multiprocessing"])
def test_a_writer_process_does_not_run_the_gateways_main_script(tmp_path, monkeypatch, started):
    """Spawn runs the parent's main script again in the child: the gateway's is mitmdump's,
    whose import cost each writer process (audit, recording) ~20 MB of memory and most of its
    start-up. `spawned.start` leaves it out; `Process.start` alone (the control) runs it."""
    import multiprocessing

    from douane import spawned

    marker = tmp_path / "ran"
    script = tmp_path / "main_script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", str(script), raising=False)
    process = multiprocessing.get_context("spawn").Process(target=os.getpid)
    if started == "spawned":
        spawned.start(process)
    else:
        process.start()
    process.join(60)
    assert process.exitcode == 0 and main.__file__ == str(script)
    assert marker.exists() == (started == "multiprocessing")
