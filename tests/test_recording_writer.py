"""The recording writer process: session files kept open and still written in order, a torn write
cut back, a batched index; no process left behind when the gateway stops or is killed."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import random
import signal
import time
from pathlib import Path

import httpx
import pytest
from mitmproxy import certs, connection, http
from mitmproxy import io as mitmio
from mitmproxy.io import tnetstring
from mitmproxy.proxy import mode_specs
from mitmproxy.test import tflow, tutils

from douane import bursts, secrets
from douane.interaction import Interaction, TextPiece
from douane.protocols import streams
from douane.recording import index, writer
from douane.recording.addon import snapshot, state_of
from douane.recording.config import RecordingSettings
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream
from tests.support.waiting import until

GRANTS = "version: 1\ngroups:\n  eng:\n    upstreams:\n      llm: {models: ['*']}\n"


def settings(tmp_path: Path) -> RecordingSettings:
    return RecordingSettings(tmp_path / "rec", "connection", 60, (), "refuse", 30, 10**9)


def item(session: str) -> writer.Item:
    return f"alice/2026-01-01/{session}.mitm", tflow.tflow(resp=True).get_state(), \
        frozenset({"authorization"}), None, (), (), frozenset()


def flow_ids(path: Path) -> list[str]:
    return [f.id for _, f in index.read_flows(path)]


@pytest.mark.parametrize("make", [
    lambda: tflow.tflow(), lambda: tflow.tflow(resp=True, err=True),
    lambda: tflow.tflow(client_conn=tflow.tclient_conn(), resp=True),
    lambda: tflow.twebsocketflow()])
def test_the_snapshot_is_mitmproxys_state_with_connections_cached(make):
    f = make()
    f.metadata["douane"] = {"decision": {"reasons": [{"rule": "r"}]}}
    assert snapshot(f) == {**f.get_state(), "backup": None}
    f.client_conn.timestamp_end = 1234.5  # a field replaced: computed again
    f.server_conn.sni = "other.example"
    assert snapshot(f) == {**f.get_state(), "backup": None}
    assert snapshot(f)["client_conn"]["timestamp_end"] == 1234.5
    f.metadata["other"] = {"items": [1]}
    before = snapshot(f)
    f.metadata["other"]["items"].append(2)  # another addon's metadata: deep-copied
    f.metadata["douane"]["latency_ms"] = 1.0  # set on douane's summary after it
    f.metadata["douane"] = {"decision": {"reasons": []}}  # a later summary (`publish`)
    assert before["metadata"] == {"douane": {"decision": {"reasons": [{"rule": "r"}]}},
                                  "other": {"items": [1]}}


def _tls_client(tmp_path: Path) -> connection.Client:
    cert = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048).get_cert("a.example", []).cert
    return connection.Client(
        peername=("::1", 5000, 0, 0), sockname=("::1", 8080, 0, 0), timestamp_start=1.5,
        error="gone", tls=True, certificate_list=[cert, cert], alpn=b"h2",
        alpn_offers=[b"h2", b"http/1.1"], cipher="TLS_AES_128_GCM_SHA256",
        cipher_list=["a", "b"], tls_version="TLSv1.3", sni="a.example", timestamp_end=2,
        timestamp_tls_setup=1.75, mitmcert=cert, transport_protocol="udp",
        proxy_mode=mode_specs.ProxyMode.parse("reverse:https://up.example:8443"))


@pytest.mark.parametrize("make", [
    lambda _: tflow.tclient_conn(), lambda _: tflow.tserver_conn(), _tls_client,
    lambda _: connection.Server(address=None),
    lambda _: connection.Server(address=("up.example", 443), via=("https", ("proxy", 3128)),
                                peername=("10.0.0.1", 443), timestamp_start=3,
                                tls_version="TLSv1.2", certificate_list=[])])
def test_a_connection_state_is_mitmproxys(make, tmp_path):
    conn = make(tmp_path)
    assert list(state_of(conn).items()) == list(conn.get_state().items())  # in its order
    conn.timestamp_end = 7  # an int where mitmproxy writes a float
    assert list(state_of(conn).items()) == list(conn.get_state().items())
    assert type(state_of(conn)["timestamp_end"]) is float


def test_a_flow_is_written_as_flowwriter_writes_it_scrubbed(tmp_path):
    f = tflow.tflow(client_conn=tflow.tclient_conn(), server_conn=tflow.tserver_conn(),
                    resp=tutils.tresp(), err=True)
    f.request.headers["authorization"] = "Bearer t"
    f.response.headers["set-cookie"] = "s=1"
    f.metadata.update({"douane": {"decision_id": "dcn_1"}, "user": "alice", "other": [1]})
    # what the writer did before it skipped rebuilding connections
    full = http.HTTPFlow.from_state(f.get_state())
    full.request.headers["authorization"] = full.response.headers["set-cookie"] = \
        writer.SCRUBBED
    full.metadata = {"douane": {"decision_id": "dcn_1"}, "user": "alice"}
    expected = tmp_path / "expected.mitm"
    with expected.open("wb") as out:
        mitmio.FlowWriter(out).add(full)
    w = writer._Writer(settings(tmp_path), ctypes.c_byte(writer.STARTING))
    relative = "alice/conn-1.mitm"
    w.write((relative, f.get_state(), frozenset({"authorization", "set-cookie"}), None, (), (),
             frozenset()))
    w.close()
    assert (tmp_path / "rec" / relative).read_bytes() == expected.read_bytes()


def test_connection_states_cross_once_and_are_written_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "CONNECTION_STATES", 2)  # both ends keep the last two
    sent, w = writer._Sent(), writer._Writer(settings(tmp_path), ctypes.c_byte(writer.STARTING))
    relative, referred = "alice/conn-1.mitm", []
    client, server = tflow.tclient_conn(), tflow.tserver_conn()
    first = client, server
    expected = tmp_path / "expected.mitm"
    with expected.open("wb") as out:
        for i in range(12):
            if i == 4:  # mitmproxy replaced a field: the state is computed again, sent again
                client.timestamp_end = 1234.5
            if i >= 6:  # a connection per flow: the first ones leave both ends' memory
                client, server = tflow.tclient_conn(), tflow.tserver_conn()
            if i >= 9:  # ... and back to one whose serial the writer no longer keeps
                client, server = first
            f = tflow.tflow(client_conn=client, server_conn=server, resp=True)
            f.metadata = {"douane": {"decision_id": f"dcn_{i}"}, "user": "alice"}
            item = (relative, snapshot(f), frozenset(), None, (), (), frozenset())
            sent.refer(item[1])
            if isinstance(item[1]["client_conn"], int):
                referred.append(i)
            w.write(item)
            mitmio.FlowWriter(out).add(f)
    w.close()
    assert referred == [1, 2, 3, 5, 10, 11]
    assert (tmp_path / "rec" / relative).read_bytes() == expected.read_bytes()


class _Text(str):
    pass


class _Int(int):
    pass


@pytest.mark.parametrize("value", [
    tflow.tflow(resp=True, err=True).get_state(), tflow.twebsocketflow().get_state(),
    {"b": [1, -2, 2.5, 1e-05, None, True, False, "é\n", b"\x00", (1, "x")], "a": {}, "": []},
    _Text("sub"), 10**30, float("inf"),
    # each kind of item inside a dict and a list (written in the container's own loop)
    {"h": ((b"k", b"v"), (b"", b""), [b"a", b"b"], (b"a", "s"), (b"a", b"b", b"c"), (b"a",)),
     "i": 3, "n": -7, "f": 0.1, "t": True, "u": None, "s": _Text("x"), "big": 10**30,
     "e": _Int(5), "l": [3, 2.5, _Int(1), _Text("y"), {"x": b"y"}, False, b"z", "é"]}])
def test_tnetstring_of_writes_what_mitmproxy_writes(value):
    assert writer.tnetstring_of(value) == tnetstring.dumps(value)
    with pytest.raises(ValueError):
        writer.tnetstring_of({"x": object()})


def test_open_session_files_stay_in_order_past_the_lru_and_a_prune(tmp_path):
    healthy = ctypes.c_byte(writer.STARTING)
    w = writer._Writer(settings(tmp_path), healthy)
    assert healthy.value == 1
    sessions = [f"conn-{i}" for i in range(writer.OPEN_FILES + 8)]  # more than stay open
    sent: dict[str, list[str]] = {s: [] for s in sessions}
    for round_ in range(3):
        if round_ == 2:  # `douane sessions prune` deleted a file the writer holds open
            (tmp_path / "rec" / item("conn-0")[0]).unlink()
            sent["conn-0"] = []
        for s in sessions:
            it = item(s)
            sent[s].append(it[1]["id"])  # the writer consumes the snapshot
            w.write(it)
        w.flush()  # the end of a pass
    assert len(w.files) == writer.OPEN_FILES
    w.close()
    for s in sessions:
        assert flow_ids(tmp_path / "rec" / item(s)[0]) == sent[s]
    db = index.connect(settings(tmp_path).index_path)
    rows = db.execute("SELECT count(*) FROM flows").fetchone()[0]
    assert rows == len(sessions) * 3


def test_a_torn_write_is_cut_back_and_health_returns_after_the_next_write(tmp_path, monkeypatch):
    healthy = ctypes.c_byte(writer.STARTING)
    w = writer._Writer(settings(tmp_path), healthy)
    first, torn, also_torn, last = (item("conn-1") for _ in range(4))
    expected = [first[1]["id"], last[1]["id"]]
    w.write(first)
    w.flush()
    session_file = w.file

    def disk_full(relative: str):
        f = session_file(relative)

        class Half:  # half of what a pass wrote reaches the file, then the disk is full
            tell = f.tell

            def write(self, data: bytes) -> None:
                f.write(data[:len(data) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
        return Half()

    monkeypatch.setattr(w, "file", disk_full)
    size = (tmp_path / "rec" / first[0]).stat().st_size
    w.write(torn)
    w.write(also_torn)
    assert (tmp_path / "rec" / first[0]).stat().st_size == size  # held until the pass ends
    w.flush()
    assert healthy.value == 0
    monkeypatch.setattr(w, "file", session_file)
    w.write(last)
    w.flush()
    assert healthy.value == 0  # healthy again once the flow is indexed too
    w.commit()
    assert healthy.value == 1
    w.close()
    assert flow_ids(tmp_path / "rec" / first[0]) == expected
    offsets = {r["flow_id"]: r["offset"]
               for r in index.query(index.connect(settings(tmp_path).index_path))}
    assert set(offsets) == set(expected)  # the torn flows are not indexed
    assert [offset for offset, _ in index.read_flows(tmp_path / "rec" / first[0])] == \
        [offsets[i] for i in expected]


def test_index_rows_are_committed_per_burst_not_per_flow(tmp_path):
    healthy = ctypes.c_byte(writer.STARTING)
    w = writer._Writer(settings(tmp_path), healthy)
    for _ in range(5):
        w.write(item("conn-1"))
    reader = index.connect(settings(tmp_path).index_path)
    assert reader.execute("SELECT count(*) FROM flows").fetchone()[0] == 0
    assert not w.overdue()  # the serving loop commits when the pipe is empty or this says so
    w.commit()
    assert reader.execute("SELECT count(*) FROM flows").fetchone()[0] == 5
    w.close()


def test_a_writer_that_falls_behind_is_not_healthy_until_it_catches_up(tmp_path, monkeypatch):
    """Flows (bodies and all) waited in memory for the pipe to the niced writer process: with a
    disk slower than the traffic they piled up without bound. Past the bound the writer is not
    healthy (new requests refused 503 under `on_error: refuse`, /healthz says so). Here the
    writer process is stopped: the pipe fills, the event loop waits for it without blocking,
    the flows put meanwhile wait; once it runs again, all are written, in order."""
    monkeypatch.setattr(writer, "MAX_BACKLOG", 5)
    w = writer.RecordingWriter(settings(tmp_path), None)
    relative = item("slow")[0]

    def big(n: int) -> writer.Item:
        f = tflow.tflow(resp=True)
        f.response.content = os.urandom(8192).hex().encode()  # 16 KiB: a few fill a pipe
        return relative, snapshot(f), frozenset(), None, (), (), frozenset()

    async def scenario() -> list[str]:
        put: list[str] = []
        os.kill(w._process.pid, signal.SIGSTOP)
        try:
            while w.backlog < 5:
                assert len(put) < 500, "the pipe never filled"
                flow = big(len(put))
                put.append(flow[1]["id"])
                w.put(*flow)
                assert w.healthy == (w.backlog < 5)
                await asyncio.sleep(0.005)  # the loop's timer sends what the pipe takes
            assert not w.healthy and w._selector is not None  # waiting for the pipe, not blocked
        finally:
            os.kill(w._process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while not (w.healthy and w.backlog == 0):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        return put

    try:
        put = asyncio.run(scenario())
    finally:
        os.kill(w._process.pid, signal.SIGCONT)
        w.close()
    assert flow_ids(tmp_path / "rec" / relative) == put


def test_flows_in_the_pipe_are_written_when_the_gateway_dies(tmp_path):
    """The writer reads the pipe a pause at a time (`GATHER_SECONDS`): what the gateway sent
    meanwhile waits in the pipe, enlarged so that it holds a pause's flows, and outlives the
    gateway. Here the writer is stopped while flows are sent, then the gateway's end closes
    without its sentinel (as in a kill -9): every flow sent is written, in order."""
    w = writer.RecordingWriter(settings(tmp_path), None)
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= writer.PIPE_BYTES:
        assert fcntl.fcntl(w._fd, fcntl.F_GETPIPE_SZ) >= writer.PIPE_BYTES
    relative = item("gathered")[0]

    async def scenario() -> list[str]:
        put = []
        for _ in range(200):  # ~1 KiB each, more than the 64 KiB of a default pipe
            f = tflow.tflow(resp=True)
            put.append(f.id)
            w.put(relative, snapshot(f), frozenset())
        deadline = time.monotonic() + 10
        while w.backlog:
            assert time.monotonic() < deadline, "the flows do not fit in the pipe"
            await asyncio.sleep(0.01)
        return put

    os.kill(w._process.pid, signal.SIGSTOP)
    try:
        put = asyncio.run(scenario())
        w._sender.close()  # the gateway's end gone, without a sentinel
    finally:
        os.kill(w._process.pid, signal.SIGCONT)
    w._process.join(30)
    assert w._process.exitcode == 0
    assert flow_ids(tmp_path / "rec" / relative) == put


def test_flows_handed_over_by_the_loop_read_back_as_mitmproxy_writes_them(tmp_path):
    """The event loop's timer pickles each window's flows at once and the writer process writes
    them: the session file is byte for byte what mitmproxy's FlowWriter writes for the same
    flows (nothing to scrub in them), mitmproxy's FlowReader reads them back, and one put
    outside an event loop is sent at once."""
    client, server = tflow.tclient_conn(), tflow.tserver_conn()
    flows = [tflow.tflow(client_conn=client, server_conn=server, resp=True),
             tflow.tflow(client_conn=client, server_conn=server, resp=True, err=True),
             tflow.tflow(client_conn=client, server_conn=server),
             tflow.twebsocketflow(), tflow.tflow(resp=True)]
    for i, f in enumerate(flows):
        f.metadata = {"douane": {"decision_id": f"dcn_{i}"}, "user": "alice"}
    w = writer.RecordingWriter(settings(tmp_path), None)
    relative = "alice/2026-01-01/conn-1.mitm"

    async def scenario() -> None:
        for n, f in enumerate(flows[:-1]):
            w.put(relative, snapshot(f), frozenset())
            if n % 2:  # two windows' bursts, each of two flows
                await asyncio.sleep(bursts.WINDOW * 2)
        assert w.backlog == 0

    asyncio.run(scenario())
    w.put(relative, snapshot(flows[-1]), frozenset())
    assert w.backlog == 0  # no loop: sent at once
    w.close()
    expected = tmp_path / "expected.mitm"
    with expected.open("wb") as out:
        for f in flows:
            mitmio.FlowWriter(out).add(f)
    written = tmp_path / "rec" / relative
    assert written.read_bytes() == expected.read_bytes()
    with written.open("rb") as f:
        assert [x.get_state() for x in mitmio.FlowReader(f).stream()] == \
            [f.get_state() for f in flows]


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def gone(pids: list[int], timeout: float) -> bool:
    return until(lambda: not any(Path(f"/proc/{p}").exists() and
                                 Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"
                                 for p in pids), timeout, step=0.05)


@pytest.fixture
def gateway(issuer, tmp_path):
    llm = FakeUpstream()
    (tmp_path / "grants.yaml").write_text(GRANTS)
    gw = Gateway(base_config(issuer.url, llm.url, recording={},
                             policy={"files": [str(tmp_path / "grants.yaml")]}),
                 mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path / "gw")
    token = issuer.mint("erin@corp", ["eng"])
    yield gw, lambda: httpx.post(gw.url + "/v1/chat/completions",
                                 headers={"authorization": f"Bearer {token}"},
                                 json={"model": "m", "messages": [{"role": "user",
                                                                   "content": "hi"}]})
    gw.stop()
    llm.close()


def recorded(gw: Gateway) -> tuple[int, int]:
    """(flows in the session files, rows in the index)."""
    root = gw.state_dir / "recordings"
    files = sum(1 for p in root.rglob("*.mitm") for _ in index.read_flows(p))
    db = index.connect(root / "index.sqlite3")
    rows = db.execute("SELECT count(*) FROM flows").fetchone()[0]
    db.close()
    return files, rows


def test_ctrl_c_on_the_process_group_drains_the_writer(gateway):
    gw, post = gateway
    assert all(post().status_code == 200 for _ in range(20))
    helpers = children(gw.proc.pid)  # the writer (and multiprocessing's resource tracker)
    assert helpers
    os.killpg(gw.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert gw.proc.wait(15) == 0
    assert gone(helpers, 10)
    assert recorded(gw) == (20, 20)
    assert "KeyboardInterrupt" not in gw.log_text()


def test_the_writer_exits_when_the_gateway_is_killed(gateway):
    gw, post = gateway
    assert all(post().status_code == 200 for _ in range(20))
    helpers = children(gw.proc.pid)
    assert helpers
    time.sleep(0.5)  # the last answer's flow has left the gateway for the writer
    try:
        os.kill(gw.proc.pid, signal.SIGKILL)  # the gateway alone: its children see it go
        gw.proc.wait()
        assert gone(helpers, 10), "a child of the killed gateway is still running"
    finally:
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    files, rows = recorded(gw)
    assert files == 20 and rows == files  # what was handed to the writer is written
    assert "the gateway is gone" in gw.log_text()


KEY = "AKIA" + "Q3VJ7XK2MZP4WT6B"  # fake, assembled so this file holds no key-shaped literal


def test_header_fields_known_to_pass_are_scrubbed_under_other_names_and_redacted_when_new():
    """`_headers` keeps as they are the fields it found kept before (`_passing`), per set of
    credential names: each result is the one of reading every field (`_scrubbed`), whatever came
    before. (Fails with one set for all names: a field learnt under one is not scrubbed under
    another.)"""
    rnd = random.Random(5)
    pool = [(b"host", b"example.com"), (b"X-Api-Key", b"k1"), (b"user-agent", b"sdk/1.0"),
            (b"x-trace", f"trace {KEY}".encode()), (b"cookie", b"s=1"),
            (b"date", b"Wed, 02 Dec 2026 00:37:09 GMT"),
            (b"x-douane-decision-id", b"dcn_0123456789abcdef0123"), (b"x-tag", KEY[:10].encode())]
    names = [frozenset({"x-api-key", "cookie"}), frozenset({"user-agent"}), frozenset()]
    writer._passing.clear()
    for _ in range(400):
        fields = tuple(rnd.sample(pool, rnd.randint(0, len(pool))))
        scrub = rnd.choice(names)
        assert writer._headers(fields, scrub) == writer._scrubbed(fields, scrub)
    fields = ((b"user-agent", b"sdk/1.0"), (b"x-trace", f"trace {KEY}".encode()))
    assert writer._headers(fields, names[1]) == (
        (b"user-agent", writer.SCRUBBED.encode()),
        (b"x-trace", b"trace <SECRET:detector.secret.aws_access_key>"))
    assert writer._headers(fields[:1], names[2]) == fields[:1]


def _runs_read(it: Interaction) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`texts_read` (not a stream) and `parts_read` as written before their runs were kept by
    shape: from the pieces' own runs."""
    answer = () if len(it.response_texts) < 2 else tuple(
        "".join(p.text for p in run) for run in streams.read_together(it.response_texts)
        if len(run) > 1)
    if len(it.texts) < 2:
        return answer, ()
    runs = tuple("".join(p.text for p in run) for run in streams.read_together(it.texts)
                 if len(run) > 1)
    return answer, (*runs, *("".join(texts) for run in streams.read_in_order(it.texts)
                             if secrets.find_across(texts := [p.text for p in run],
                                                    high_entropy=False)))


def test_the_runs_read_are_the_pieces_own_whatever_shapes_came_before():
    """`texts_read` and `parts_read` take the runs of a shape of pieces seen before (`_runs`):
    the texts they join are those the pieces' own runs join (`streams.read_together`,
    `read_in_order`), shapes repeating with other texts, a key cut across two texts found.
    (Fails with a shape of kinds alone.)"""
    rnd = random.Random(7)
    paths = [("messages", 0, "content"), ("messages", 1, "content"), ("messages", 2, "content"),
             ("messages", 0, "content", 0, "text"), ("messages", 0, "content", 1, "text"),
             ("messages", 0, "content", 1, "image_url"), ("system",), ("<keys and ids>",),
             ("params", "arguments", "q"), ("input", 0, "content", 0, "text")]
    kinds = ["prompt", "system", "tool_arguments", "tool_result", "completion"]
    words = ["hello ", "there", KEY[:9], KEY[9:], "bucket", ""]
    writer._shapes.clear()
    # the same kinds in other places too (a shape is its kinds and paths): in a row or not
    shapes = [[(rnd.choice(kinds), rnd.choice(paths)) for _ in range(rnd.randint(0, 6))]
              for _ in range(8)] + [
        [("prompt", paths[0]), ("prompt", paths[1]), ("prompt", paths[2])],
        [("prompt", paths[0]), ("prompt", paths[6]), ("prompt", paths[2])],
        [("prompt", paths[3]), ("prompt", paths[4]), ("prompt", paths[7])],
        [("prompt", paths[3]), ("prompt", paths[5]), ("prompt", paths[8])]]
    for _ in range(300):
        request, answer = rnd.choice(shapes), rnd.choice(shapes)
        it = Interaction("openai", "chat.completions",
                         texts=[TextPiece(k, None, rnd.choice(words), p) for k, p in request],
                         response_texts=[TextPiece(k, None, rnd.choice(words), p)
                                         for k, p in answer])
        assert (writer.texts_read(it, False), writer.parts_read(it)) == _runs_read(it)
    assert len(writer._shapes) <= 24


def test_a_bodys_values_are_its_json_literals_however_quotes_escapes_and_lines_fall():
    """`_values` reads a text without a backslash by splitting it at its quotes: the values of
    `JSON_STRING`'s literals all the same (a line inside a literal, an unclosed quote, escapes).
    (Fails when a literal across a line is read so.)"""
    rnd = random.Random(3)

    def literals(text: str) -> list[str]:
        return [json.loads(lit) if "\\" in lit else lit[1:-1]
                for lit in writer.JSON_STRING.findall(text)
                if len(lit) >= secrets.SHORTEST_SECRET + 2 and _decodes(lit)]
    for _ in range(20_000):
        text = "".join(rnd.choice(['"', "\\", "\n", "a", "bcdefgh", ":", "\\n", "é"])
                       for _ in range(rnd.randint(0, 16)))
        assert writer._values(text) == literals(text), text
    body = json.dumps({"a": "x" * 20, "b": ["y" * secrets.SHORTEST_SECRET, "z"]})
    assert writer._values(body) == ["x" * 20, "y" * secrets.SHORTEST_SECRET]


def _decodes(literal: str) -> bool:
    try:
        json.loads(literal)
    except ValueError:
        return False
    return True
