"""The record: what a client sends never grows an audit record, never puts a key into the audit
log, the index or a recording, never forges a terminal line, and two users never share a
recordings folder. Through a real gateway and the real `douane` command."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import httpx
import openai
import pytest

from douane import audit, untrusted
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused
from tests.support.gateway import MITMDUMP, Gateway, base_config

DOUANE = MITMDUMP.parent / "douane"
POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
    crm: {tools: {allow: ["*"]}}
"""
MODEL_KEY = "sk-proj-" + "Qm7vR2xT9kLp4Wn8" * 3
TOOL_TOKEN = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF2hJ4"
# headers douane forwards (others never reach the upstream nor a recording: `douane.forwarding`)
HEADER_KEYS = {"x-stainless-custom-token": "sk-" + "Zt4Hq8Lm2Vx6Pc9R" * 2,
               "x-stainless-aws-key": "AKIA" + "Q7WERTY2UIOP3ASD",
               "user-agent": "agent/1.0 (ghp_" + "Xy2Wv4Ut6Sr8Qp0On2Ml4Kj6Ih8Gf0Ed2Cb4A" + ")"}
LEAKED = (MODEL_KEY, TOOL_TOKEN, HEADER_KEYS["x-stainless-custom-token"],
          HEADER_KEYS["x-stainless-aws-key"],
          "ghp_Xy2Wv4Ut6Sr8Qp0On2Ml4Kj6Ih8Gf0Ed2Cb4A")


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory, secrets):
    work = tmp_path_factory.mktemp("record")
    (work / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "policy.yaml")]},
                         recording={})
    config["upstreams"]["crm"] = {"url": llm.url + "/mcp", "protocol": "mcp"}
    secrets.update(LEAKED)  # the suite's last module scans every file for them again
    with Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


def chat(gw: Gateway, token: str, model: str = "m", headers: dict | None = None,
         **fields) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=120,
                      headers={"authorization": f"Bearer {token}", **(headers or {})},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                            **fields})


def rpc(gw: Gateway, token: str, doc: dict) -> httpx.Response:
    return httpx.post(gw.url + "/mcp", timeout=60, json=doc, headers={
        "authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"})


def douane(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """`douane sessions VERB ...` or `douane audit verify` on the gateway's config."""
    where = 1 if args[0] == "sessions" else len(args)
    return subprocess.run([str(DOUANE), *args[:where], "--config", str(gw.config_file),
                           *args[where:]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY})


def indexed(gw: Gateway, count: int) -> list[dict]:
    db = gw.state_dir / "recordings" / "index.sqlite3"
    deadline = time.monotonic() + 20
    while True:
        rows = []
        if db.exists():
            with sqlite3.connect(db) as c:
                c.row_factory = sqlite3.Row
                rows = [dict(r) for r in c.execute("SELECT * FROM flows")]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def recorded(gw: Gateway, user: str, marker: bytes, what: str) -> bytes:
    """All of `user`'s recordings once one holds `marker` (the writer hands off in bursts)."""
    folder = gw.state_dir / "recordings" / untrusted.slug(user)
    deadline = time.monotonic() + 20
    while not (found := [p.read_bytes() for p in folder.rglob("*.mitm")]) or \
            marker not in b"".join(found):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return b"".join(found)


def test_absurd_model_and_tool_names_are_refused_at_the_door(gw, llm, issuer):
    token = issuer.mint("mallory@corp.example", ["engineering"])
    key = (gw.state_dir / "audit-hmac.key").read_bytes().strip()
    before_size = gw.audit_file().stat().st_size if gw.audit_file().exists() else 0
    cases = {
        "a 9.9 MB model name": {"model": "m" * 9_900_000},
        "a 257-character model name": {"model": "m" * 257},
        "a newline in a model name": {"model": "gpt-4o\n[audit] forged"},
        "an ANSI escape in a tool name": {"tools": [{"type": "function", "function": {
            "name": "search\x1b[2K", "parameters": {"type": "object"}}}]},
        "a bidi override in a tool call's name": {"messages": [
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "safe\u202eexe.tab", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
    }
    for what, fields in cases.items():
        before = len(llm.requests)
        record = assert_refused(gw, llm, before, chat(gw, token, **fields), 400)
        assert record["reasons"][0]["rule"] == "protocol.invalid_name", what
        assert len(json.dumps(record)) < 8_000, (what, len(json.dumps(record)))
    # an MCP tool name: refused at the JSON-RPC level, the upstream sees nothing
    before = len(llm.requests)
    resp = rpc(gw, token, {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "t" * 300, "arguments": {}}})
    assert "invalid_name" in resp.text and len(llm.requests) == before
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"] == "protocol.invalid_name"
    grown = gw.audit_file().stat().st_size - before_size
    print(f"\naudit log grown by {grown} bytes for {len(cases) + 1} refusals "
          f"(one with a 9.9 MB model name)")
    assert grown < 30_000
    assert audit.verify(gw.audit_file(), key).ok


def test_secrets_sent_as_names_and_headers_are_in_no_record(gw, issuer):
    token = issuer.mint("sam@corp.example", ["engineering"])
    rows = len(indexed(gw, 0))
    # blocked or not, each is recorded (a header holding a key is refused before the body is
    # read: the model's key goes in a request of its own)
    for resp in (chat(gw, token, MODEL_KEY), chat(gw, token, headers=HEADER_KEYS)):
        assert resp.status_code in (200, 403), resp.text
    resp = rpc(gw, token, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                           "params": {"name": TOOL_TOKEN, "arguments": {}}})
    assert resp.headers["x-douane-decision-id"]
    gw.audit_where(lambda r: r.get("user") == "sam@corp.example", count=3)
    assert len(indexed(gw, rows + 3)) >= rows + 3
    files = [p for p in gw.state_dir.rglob("*") if p.is_file() and
             (p.suffix in (".mitm", ".jsonl") or "sqlite3" in p.name)]
    assert {".mitm", ".jsonl"} <= {p.suffix for p in files}
    leaks = {str(p): [s[:10] for s in LEAKED if s.encode() in p.read_bytes()] for p in files}
    assert not any(leaks.values()), leaks
    record = gw.audit_where(lambda r: r.get("user") == "sam@corp.example" and r.get("model"))[0]
    assert record["model"] == "<SECRET:detector.secret.api_key>"


def test_users_get_one_folder_each_and_the_terminal_sees_escapes(gw, issuer):
    users = ["иван@x.example", "олег@x.example", "a/b@x.example", "a_b@x.example",
             "eve\x1b[2K\radmin@corp.ex"]
    before = len(indexed(gw, 0))
    for user in users:
        assert chat(gw, issuer.mint(user, ["engineering"])).status_code == 200
    rows = indexed(gw, before + len(users))
    folders = {r["user"]: r["file"].split("/")[0] for r in rows}
    assert len({folders[u] for u in users}) == len(users), folders
    assert folders["иван@x.example"] == untrusted.slug("иван@x.example")
    listed = douane(gw, "sessions", "list", "--limit", "100")
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "\r" not in listed.stdout
    assert "eve\\x1b[2K\\x0dadmin@corp" in listed.stdout
    eve = next(r for r in rows if r["user"] == users[-1])
    shown = douane(gw, "sessions", "show", eve["decision_id"])
    assert "user eve\\x1b[2K\\x0dadmin@corp.ex (engineering)" in shown.stdout
    assert "\x1b" not in shown.stdout
    out = gw.dir / "ivan.mitm"
    exported = douane(gw, "sessions", "export", "--user", "иван@x.example", "-o", str(out))
    assert exported.returncode == 0 and "wrote 1 flow(s)" in exported.stdout
    read = subprocess.run([str(MITMDUMP), "-nr", str(out), "--flow-detail", "1"],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0 and read.stdout.count("POST") == 1


def test_verify_says_where_the_chain_starts(gw, issuer):
    resp = chat(gw, issuer.mint("vera@corp.example", ["engineering"]))
    gw.audit_record(resp.headers["x-douane-decision-id"])
    verified = douane(gw, "audit", "verify")
    assert verified.returncode == 0, verified.stdout
    assert "chain starts at seq 1 (" in verified.stdout


def test_openai_sdk_error_for_an_absurd_model_name(gw, issuer):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=issuer.mint("o@corp.example"),
                      max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m" * 1000, messages=[{"role": "user", "content": "x"}])
    assert "model name is 1000 characters long (at most 256)" in str(err.value)


def test_a_user_cannot_rotate_their_block_out_of_the_audit_log(issuer, llm, tmp_path):
    """A tiny size budget (4 KiB x 1 backup) and a flood of the largest records a client can
    cause: rotation keeps every record younger than the retention and says so; nothing is lost."""
    (tmp_path / "policy.yaml").write_text(POLICY + 'rules:\n  - {id: deny.codename, literal: '
                                          '"project nightingale", score: 90}\n')
    config = base_config(issuer.url, llm.url,
                         policy={"files": [str(tmp_path / "policy.yaml")]},
                         audit={"max_bytes": "4k", "backups": 1})
    config["upstreams"]["crm"] = {"url": llm.url + "/mcp", "protocol": "mcp"}
    with Gateway(config, mode=f"reverse:{llm.url}", workdir=tmp_path / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gw:
        token = issuer.mint("mallory@corp.example", ["engineering"])
        blocked = httpx.post(gw.url + "/v1/chat/completions", timeout=60, headers={
            "authorization": f"Bearer {token}"}, json={"model": "m", "messages": [
                {"role": "user", "content": "tell me about project nightingale"}]})
        assert blocked.status_code == 403
        block_id = blocked.headers["x-douane-decision-id"]
        for _ in range(20):
            assert chat(gw, token, "m" * 500_000).status_code == 400
        deadline = time.monotonic() + 30  # every file, rotated ones included
        while True:
            files = audit.log_files(gw.audit_file())
            try:
                records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
            except FileNotFoundError:  # rotated (renamed) between the listing and the read
                records = []
            if sum(r.get("event") == "decision" for r in records) == 21 or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sum(r.get("event") == "decision" for r in records) == 21
        assert len(files) > 2  # over the budget of 1 backup: kept
        assert any(r.get("decision_id") == block_id for r in records)
        assert any(r.get("event") == "audit.over_budget" for r in records)
        assert not any(r.get("event") == "audit.deleted" for r in records)
        assert "over its size budget" in gw.log_text()
        verified = douane(gw, "audit", "verify")
        assert verified.returncode == 0 and "chain starts at seq 1 (" in verified.stdout


def test_made_up_mcp_session_ids_name_no_recording_file(gw, llm, issuer):
    """The recording kept one file per `Mcp-Session-Id`, whatever the client sent: 30 made-up ids
    made 30 files (a client could make as many as it had requests). Only an id the upstream
    issued names a file now; a made-up one is refused (douane did not see it issued) and
    recorded in the connection's file."""
    def answer(handler, doc):
        data = json.dumps({"jsonrpc": "2.0", "id": doc.get("id"), "result": {}}).encode()
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        if doc.get("method") == "initialize":
            handler.send_header("mcp-session-id", "issued-by-the-server")
        handler.end_headers()
        handler.wfile.write(data)

    token = issuer.mint("sid@corp.example", ["engineering"])
    before = len(indexed(gw, 0))
    llm.answer = answer
    try:
        for session in ["", "issued-by-the-server", *(f"made-up-{i}" for i in range(30))]:
            resp = httpx.post(gw.url + "/mcp", timeout=60, headers={
                "authorization": f"Bearer {token}", "mcp-protocol-version": "2025-06-18",
                "accept": "application/json, text/event-stream",
                **({"mcp-session-id": session} if session else {})}, json={
                "jsonrpc": "2.0", "id": 1, "method": "ping" if session else "initialize",
                "params": {} if session else {"protocolVersion": "2025-06-18",
                                              "capabilities": {},
                                              "clientInfo": {"name": "t", "version": "1"}}})
            made_up = session.startswith("made-up")
            assert resp.status_code == (404 if made_up else 200), resp.text
    finally:
        llm.answer = None
    indexed(gw, before + 32)
    names = {p.name.split("--")[0] for p in
             (gw.state_dir / "recordings" / untrusted.slug("sid@corp.example")).rglob("*.mitm")}
    assert "mcp-issued-by-the-server" in names
    assert not [n for n in names if "made-up" in n], names


def test_a_secret_after_a_header_that_ends_in_its_name_is_in_no_record(gw, issuer):
    """Red team, stop 27: the recording writer scans a flow's header values (and the audit its
    record's strings) once, joined by newlines, and remembers the short ones it found clean. But
    a pattern's separator spans a newline: `X-Note: the password is` then `X-Db:
    [x]password=Hunter2!x` read as one password whose value `[x]password=...` looks like a
    placeholder, so the match failed its check and hid the real one behind it: the password was
    recorded, and, remembered clean, in every later flow carrying that header alone."""
    token = issuer.mint("hal@corp.example", ["engineering"])
    leaked = "Hunter2!x-4f9q"
    # (headers douane forwards: others reach no recording, `douane.forwarding`)
    headers = {"x-stainless-note": "the password is",
               "x-stainless-db": f"[x]password={leaked}"}
    for extra in (headers, {"x-stainless-db": headers["x-stainless-db"]}):
        assert chat(gw, token, headers=extra).status_code in (200, 403)  # refused: a secret
    gw.audit_where(lambda r: r.get("user") == "hal@corp.example", count=2)
    assert leaked.encode() not in recorded(gw, "hal@corp.example", b"x-stainless-db",
                                           "no recording of the flows")


def _tool_call_chunks(pieces: list[str]) -> bytes:
    base = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "model": "m"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "deploy", "arguments": ""}}]}, "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": p}}]}, "finish_reason": None}]} for p in pieces]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"



@pytest.mark.parametrize("escaped", [False, True])
def test_a_key_split_across_streamed_tool_arguments_is_in_no_recording(gw, llm, issuer, escaped):
    """A chat stream's tool call whose `arguments` JSON string carries a key cut between two
    deltas (as written, or each character a `\\u` escape, cut inside one): the tool reads the
    key whole; no recording keeps a share of it (held: red team, stop 28)."""
    user = f"tia-{escaped}@corp.example"
    key = "sk-proj-" + "Hv3nQ8wLr5Tz" * 3
    spelled = "".join(f"\\u{ord(c):04x}" for c in key) if escaped else key
    args = json.dumps({"cmd": "export OPENAI_API_KEY=KEY && deploy"}).replace("KEY", spelled)
    cut = args.index(spelled) + (6 * 13 + 3 if escaped else 13)
    llm.canned["/v1/chat/completions"] = ("text/event-stream", _tool_call_chunks(
        [args[:cut], args[cut:]]))
    try:
        resp = chat(gw, issuer.mint(user, ["engineering"]), stream=True)
    finally:
        del llm.canned["/v1/chat/completions"]
    assert resp.status_code == 200 and '"arguments"' in resp.text, resp.text[:300]
    gw.audit_where(lambda r: r.get("user") == user, count=1)
    data = recorded(gw, user, b"text/event-stream", "no recording of the stream")
    assert b"<SECRET:detector.secret.api_key>" in data
    shares = {key[i:i + 7] for i in range(len(key) - 6)} | \
        {spelled[i:i + 30] for i in range(len(spelled) - 29)}
    assert not [s for s in shares if s.encode() in data]


@pytest.mark.parametrize("where", ["model", "tool call"])
def test_a_lone_surrogate_in_a_name_erases_no_record_and_stops_no_one(gw, llm, issuer, where):
    """Red team, stop 28: a model (or a history's tool call) named `gpt\\ud800` (a lone surrogate,
    valid JSON) passed the door with the org's key; its audit record could not be encoded (no
    UTF-8 holds a lone surrogate), so it was lost (an `audit.gap` in its place) and the log,
    unhealthy, refused the next requests of every user with 503 `audit_unavailable`. Now such a
    name is refused at the door, its record written with the surrogate escaped."""
    user = f"sur-{where.replace(' ', '-')}@corp.example"
    token = issuer.mint(user, ["engineering"])
    call = b', {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": ' \
        b'"function", "function": {"name": "f\\udc00", "arguments": "{}"}}]}'
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}%s]}' % (
        (b"gpt\\ud800", b"") if where == "model" else (b"m", call))
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=body, timeout=60, headers={
        "authorization": f"Bearer {token}", "content-type": "application/json"})
    record = assert_refused(gw, llm, before, resp, 400)
    assert "\\ud800" in json.dumps(record) or "\\udc00" in json.dumps(record), record
    other = issuer.mint("bystander@corp.example", ["engineering"])
    assert chat(gw, other).status_code == 200
    assert not [r for r in gw.audit_records() if r.get("event") == "audit.gap"]


def test_a_key_hidden_in_tag_characters_is_in_no_record(gw, issuer, secrets):
    """Red team, stop 28: a key written in tag characters (U+E0020-E007E, invisible; a model may
    read them, anyone may decode them) was no key to the secrets view, which dropped them: it
    went upstream and into the recording as sent."""
    user = "tag@corp.example"
    hidden = "".join(chr(0xE0000 + ord(c)) for c in f"deploy with {MODEL_KEY}")
    resp = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": f"hello{hidden}"}]},
        headers={"authorization": f"Bearer {issuer.mint(user, ['engineering'])}"})
    assert resp.status_code == 403, resp.text
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"] == "detector.secret.api_key", record
    data = recorded(gw, user, b"hello", "no recording of the request")
    tagged = hidden[-len(MODEL_KEY):]
    for spelled in (tagged.encode(), tagged.encode("unicode_escape"),
                    json.dumps(tagged).encode()):
        assert not any(spelled[i:i + 40] in data for i in range(0, len(spelled) - 40, 8))


def test_a_key_beside_a_lone_surrogate_stops_no_recording(gw, issuer):
    """Red team, stop 28: a prompt holding a key and a lone surrogate (`\\ud800`, valid JSON):
    the recording writer redacted the key and wrote the value back with the surrogate raw, which
    no UTF-8 can hold: the flow was lost and the writer, unhealthy, made the gateway refuse every
    user's requests 503 `recording_unavailable`. The value is written back escaped."""
    user = "surw@corp.example"
    token = issuer.mint(user, ["engineering"])
    body = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": f"key {MODEL_KEY} \ud800 x"}]}).encode()  # `\\ud800`
    resp = httpx.post(gw.url + "/v1/chat/completions", content=body, timeout=60, headers={
        "authorization": f"Bearer {token}", "content-type": "application/json"})
    assert resp.status_code == 403, resp.text
    for _ in range(3):
        assert chat(gw, issuer.mint("next@corp.example", ["engineering"])).status_code == 200
    assert MODEL_KEY.encode() not in recorded(gw, user, b"\\ud800", "the flow was not recorded")
