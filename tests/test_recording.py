"""Recordings: per-user .mitm files that mitmproxy reads, scrubbed, indexed, crash-safe."""

from __future__ import annotations

import functools
import json
import random
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from douane import audit, bursts, protocols, secrets, transcript, untrusted
from douane.cli import main
from douane.config import Credential, Upstream
from douane.flowstate import Identity, state
from douane.policy import engine, model
from douane.protocols import streams
from douane.recording import index, writer
from douane.recording.addon import credential_headers, session_path
from douane.recording.config import RecordingSettings
from douane.recording.writer import SCRUBBED, recording_of
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import MITMDUMP, Gateway, base_config
from tests.support.upstream import (
    FakeUpstream,
    _anthropic,
    _openai_chat_events,
    _pieces,
    _responses,
    anthropic_stream,
    responses_stream,
)
from tests.support.waiting import until

SETTINGS = RecordingSettings(Path("/tmp/rec"), "connection", 60, ("x-trace",), "refuse", 30, 10**9)


def test_scrubbing_works_on_a_copy():
    f = tflow.tflow(resp=tutils.tresp())
    f.request.headers.update({"authorization": "Bearer t", "cookie": "s=1", "x-trace": "abc",
                              "x-upstream-key": "secret"})
    f.response.headers["set-cookie"] = "s=2"
    f.metadata["proxyauth"] = ("user", "token")
    state(f).upstream = Upstream("u", "https", "h", 443, "/", "generic", Credential(
        "x-upstream-key", "secret"), request_text_paths=("p",))
    copy = http.HTTPFlow.from_state(recording_of(f.get_state(),
                                             credential_headers(f, SETTINGS.scrub_headers)))
    for name in ("authorization", "cookie", "x-trace", "x-upstream-key"):
        assert copy.request.headers[name] == SCRUBBED
    assert copy.response.headers["set-cookie"] == SCRUBBED
    assert "proxyauth" not in copy.metadata
    assert f.request.headers["authorization"] == "Bearer t"  # the live flow is untouched


def test_secrets_in_any_header_trailer_websocket_message_or_metadata_are_redacted():
    key, aws = "sk-proj-" + "Qm7vR2xT9kLp4Wn8" * 3, "AKIA" + "Q7WERTY2UIOP3ASD"
    f = tflow.twebsocketflow()
    f.request.headers.update({"x-custom-token": key, "user-agent": f"agent ({aws})"})
    f.response.trailers = http.Headers(x_checksum=f"k={key}")
    f.websocket.messages[1].content = f"my key is {key}".encode()
    f.metadata["douane"] = {"interaction": {"model": key}, "identity": {"user": "u"}}
    snapshot = f.get_state()
    written = recording_of(snapshot, frozenset())
    data = repr(written).encode()
    assert key.encode() not in data and aws.encode() not in data
    assert written["websocket"]["messages"][1][2] == b"my key is <SECRET:detector.secret.api_key>"
    assert written["websocket"]["messages"][0] == snapshot["websocket"]["messages"][0]


def test_session_paths():
    f = tflow.tflow()

    def folder(user: str) -> str:
        state(f).identity = Identity(user, (), "t", "a", "bearer")
        return session_path(f, SETTINGS).parts[0]

    assert folder("alice@corp/../x").startswith("alice@corp-..-x--")
    assert folder("../..").startswith("x--") and session_path(f, SETTINGS).suffix == ".mitm"
    assert session_path(f, SETTINGS).name.startswith("conn-")
    # one folder per exact name: no two users share one, whatever their names
    names = ["иван@x.example", "олег@x.example", "a/b", "a_b", "a\\b", "Alice", "alice",
             "x" * 300, "x" * 301, "../..", "..", "anonymous", "é", "e\u0301"]
    folders = [folder(n) for n in names]
    assert len(set(folders)) == len(names), folders
    assert all(len(p) <= 62 and "/" not in p and not p.startswith(".") for p in folders)
    assert folders[0] == "ivan@x.example--" + untrusted.digest("иван@x.example")
    f.request.headers["mcp-session-id"] = "abc/123"
    assert session_path(f, SETTINGS, {"abc/123"}).name.startswith("mcp-abc-123--")
    assert session_path(f, SETTINGS).name.startswith("conn-")  # not one an upstream issued


@pytest.fixture(scope="module")
def recorded(issuer, tmp_path_factory):
    llm = FakeUpstream()
    llm.reply = "Reach Maria Garcia at maria.garcia@example.com."
    work = tmp_path_factory.mktemp("recording")
    (work / "grants.yaml").write_text(
        "version: 1\ngroups:\n  eng:\n    upstreams:\n      llm: {models: ['*']}\n"
        "rules:\n  - {id: deny.codename, literal: nightingale, score: 90}\n")
    config = base_config(issuer.url, llm.url, recording={},
                         policy={"files": [str(work / "grants.yaml")]},
                         masking={"workers": 1})
    gw = Gateway(config, mode=f"reverse:{llm.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=work / "gw")
    alice, bob = issuer.mint("alice@corp", ["eng"]), issuer.mint("bob@corp", ["eng"])
    for token in (alice, bob):
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        stream = c.chat.completions.create(model="m", stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
        "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key=alice, max_retries=0).chat.completions \
            .create(model="m", messages=[{"role": "user", "content": "about nightingale"}])
    httpx.post(gw.url + "/v1/chat/completions", json={},
               headers={"authorization": "Bearer not.a.valid-token-at-all-xxxxxxxx",
                        "cookie": "session=chocolate-chip-secret"})
    written(gw, 6)
    yield gw, work, [alice, bob]
    gw.stop()
    llm.close()


def recordings(gw: Gateway) -> Path:
    return gw.state_dir / "recordings"


def written(gw: Gateway, flows: int, timeout: float = 30) -> None:
    """Until `flows` flows are in the session files and the index (the writer takes them a
    burst at a time, after the answers have left)."""
    db_path = recordings(gw) / "index.sqlite3"

    def rows() -> int:
        if not db_path.exists():
            return 0
        db = index.connect(db_path)
        try:
            return len(index.query(db, limit=-1))
        finally:
            db.close()

    deadline = time.monotonic() + timeout
    while sum(1 for p in recordings(gw).rglob("*.mitm") for _ in index.read_flows(p)) < flows or \
            rows() < flows:
        assert time.monotonic() < deadline, f"fewer than {flows} flows recorded"
        time.sleep(0.1)


def test_recordings_per_user_open_with_mitmproxy(recorded):
    gw, _, _ = recorded
    files = sorted(recordings(gw).rglob("*.mitm"))
    users = {p.relative_to(recordings(gw)).parts[0] for p in files}
    assert users == {untrusted.slug("alice@corp"), untrusted.slug("bob@corp"), "anonymous"}
    flows = [f for p in files for _, f in index.read_flows(p)]
    assert len(flows) == 6
    out = subprocess.run([str(MITMDUMP), "-n", "-r", str(files[0]), "--flow-detail", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "POST" in out.stdout


def test_streamed_bodies_are_recorded_as_delivered(recorded):
    gw, _, _ = recorded
    flows = [f for p in recordings(gw).rglob("*.mitm") for _, f in index.read_flows(p)]
    streamed = [f for f in flows if f.response and
                f.response.headers.get("content-type") == "text/event-stream"]
    assert len(streamed) == 2
    for f in streamed:
        body = f.response.content
        assert b"[DONE]" in body and b"<EMAIL_ADDRESS>" in body and b"maria.garcia" not in body
        assert f.metadata["douane"]["decision"]["action"] == "mask"
        assert f.comment.startswith("douane mask")


def test_no_secret_in_any_file_written(recorded):
    gw, _, tokens = recorded
    secrets = [*tokens, UPSTREAM_KEY, "chocolate-chip-secret", "maria.garcia@example.com",
               "not.a.valid-token-at-all"]
    written = [p for p in gw.dir.rglob("*") if p.is_file() and not p.name.endswith(".pem")]
    assert len(written) > 5
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret[:12]}... leaked into {path}"


AWS_KEY = "AKIA" + "Q3VJ7XK2MZP4WT6B"  # fake, assembled so this file holds no key-shaped literal
JWT = ".".join(("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0", "eyJzdWIiOiJhbGljZUBjb3JwIiwiZXhwIjo5fQ",
                "c2lnbmF0dXJlLW5vdC1yZWFsLWF0LWFsbC14eXo"))


def test_no_credential_from_a_body_in_any_file_written(issuer, tmp_path, capsys):
    llm = FakeUpstream()
    llm.reply = f"Use {AWS_KEY} for that bucket."  # an answer is recorded, secret included
    (tmp_path / "grants.yaml").write_text(
        "version: 1\ngroups:\n  eng:\n    upstreams:\n      llm: {models: ['*']}\n")
    gw = Gateway(base_config(issuer.url, llm.url, recording={},
                             policy={"files": [str(tmp_path / "grants.yaml")]}),
                 mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path / "gw")
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=issuer.mint("dan@corp", ["eng"]),
                               max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="a secret is in the text"):
            client.chat.completions.create(model="m", messages=[
                {"role": "user", "content": f"why is\n{AWS_KEY} refused? and {JWT}?"}])
        answer = client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "which key?"}])
        assert AWS_KEY in answer.choices[0].message.content  # the client got it; no file keeps it
        stream = client.chat.completions.create(model="m", stream=True, messages=[
            {"role": "user", "content": "which key, streamed?"}])  # split across 4-char deltas
        assert AWS_KEY in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        db_path = recordings(gw) / "index.sqlite3"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                db_path.exists() and len(index.query(index.connect(db_path))) >= 3):
            time.sleep(0.1)
        blocked = index.query(index.connect(db_path), decision="block")[0]["decision_id"]
        assert main(["sessions", "--config", str(gw.config_file), "show", blocked]) == 0
    finally:
        gw.stop()
        llm.close()
    out = capsys.readouterr().out
    assert ("[user] why is\n    <SECRET:detector.secret.aws_access_key> refused? and "
            "<SECRET:detector.secret.jwt>?") in out
    flows = [f for p in recordings(gw).rglob("*.mitm") for _, f in index.read_flows(p)]
    refused, plain, streamed = sorted(flows, key=lambda f: f.request.timestamp_start)
    for f in (refused, plain):  # the bodies stay valid JSON, the secrets replaced in place
        assert json.loads(f.request.content)["messages"]
        assert json.loads(f.response.content)
    marked = "Use <SECRET:detector.secret.aws_access_key> for that bucket."
    assert marked in plain.response.text
    # the streamed answer, reassembled as the content view and `sessions show` do
    assert f"[assistant, streamed] {marked}" in transcript.render(streamed)
    assert streamed.response.text.endswith("data: [DONE]\n\n")
    written = [p for p in gw.dir.rglob("*") if p.is_file() and not p.name.endswith(".pem")]
    for path in written:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # SQLite's -shm, gone with the last connection (GC'd here)
            continue
        for secret in (AWS_KEY, JWT, JWT.split(".")[2]):
            assert secret.encode() not in data, f"{secret[:12]}... leaked into {path}"


def test_secrets_are_replaced_in_json_string_values_only():
    f = tflow.tflow(resp=tutils.tresp())
    f.request.headers["content-type"] = "application/json"
    f.request.text = json.dumps({"model": "m", "id": "chatcmpl-" + "a1" * 20, "messages": [
        {"role": "user", "content": f"\u0000{AWS_KEY}\t{JWT}", "image": "iVBORw0K" * 200}]},
        ensure_ascii=True)
    f.request.path = f"/v1/chat?key={AWS_KEY}"
    f.response.headers["content-type"] = "text/event-stream"
    f.response.text = f'data: {{"delta": "key {AWS_KEY}"}}\n\nevent: x\ndata: [DONE]\n\n'
    f = http.HTTPFlow.from_state(recording_of(f.get_state(), frozenset()))
    doc = json.loads(f.request.content)
    assert doc["messages"][0]["content"] == (
        "\u0000<SECRET:detector.secret.aws_access_key>\t<SECRET:detector.secret.jwt>")
    assert doc["id"] == "chatcmpl-" + "a1" * 20  # no secret: untouched
    assert doc["messages"][0]["image"] == "iVBORw0K" * 200  # encoded content, not a credential
    assert f.request.path == "/v1/chat?key=<SECRET:detector.secret.aws_access_key>"
    assert f.response.text == ('data: {"delta": "key <SECRET:detector.secret.aws_access_key>"}'
                               '\n\nevent: x\ndata: [DONE]\n\n')


@pytest.mark.parametrize("body", [
    {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
    {"choices": [{"message": {"content": "Line one.\nLine two: a \"quote\" and \u00e9."}}],
     "usage": {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}},
    {"content": f"Line one.\nthe key is {AWS_KEY}"}, {"note": "password: hunter2hunter2"},
    {"api_key": "x", "value": f"{JWT}"}, {f"token {AWS_KEY}": 1},
    {"text": "a\u200bb", "k": "sk-proj-" + "Qm7vR2xT9kLp4Wn8" * 3},
    ["token=", "abcdefghijklmnopqrstuvwxyz0123456789ABCD"], {"a": "token", "b": ": v4lue-secret"},
    {"prompt": "\\" * 10 + "x" * 40}, {"s": "data:text/plain;base64,aGVsbG8gd29ybGQ="}])
@pytest.mark.parametrize("sse", [False, True])
def test_a_clean_json_body_is_cleared_in_one_scan_as_each_value_is(body, sse):
    """`_redacted`'s one scan of a JSON or SSE body's values joined gives what redacting each
    string value alone gives (`_json_string`, the reference), escapes, keys and splits across
    values included: unchanged where no value holds a secret, each value redacted where one does."""
    text = json.dumps(body, ensure_ascii=False)
    if sse:
        text = f"data: {text}\n\nevent: x\ndata: {json.dumps(body)}\n\ndata: [DONE]\n\n"
    reference = writer.JSON_STRING.sub(writer._json_string, text)
    ctype = "text/event-stream" if sse else "application/json"
    assert writer._redacted(text, ctype) == reference


def test_a_bodys_short_values_seen_clean_are_not_scanned_again_its_texts_are(monkeypatch):
    """The keys, model and role names of every flow (`max_tokens` runs the token patterns) are
    remembered clean once scanned; a value past `KNOWN_CHARS` (a text's content) is scanned in
    every body, and a secret is never remembered."""
    monkeypatch.setattr(untrusted, "_clean", set())
    scanned: list[str] = []
    matches = untrusted.any_matches
    monkeypatch.setattr(untrusted, "any_matches",
                        lambda texts: scanned.extend(texts) or matches(texts))
    answer = "The quarterly report shows revenue grew in every region except the north one."
    assert len(answer) > writer.KNOWN_CHARS
    clean, leaky = (json.dumps({"model": "gpt-4o-mini", "max_tokens": 9, "messages": [
        {"role": "assistant", "content": answer}, {"role": "user", "content": last}]})
        for last in ("thanks a lot", f"k {AWS_KEY}"))
    assert writer._redacted(clean, "application/json") == clean
    assert "gpt-4o-mini" in "".join(scanned) and "thanks a lot" in untrusted._clean
    for body in (clean, leaky):
        scanned.clear()
        redacted = writer._redacted(body, "application/json")
        assert any(answer in text for text in scanned)
        assert not any("gpt-4o-mini" in text or "max_tokens" in text for text in scanned)
    assert AWS_KEY not in redacted and redacted.count("<SECRET:") == 1
    assert f"k {AWS_KEY}" not in untrusted._clean and answer not in untrusted._clean


PROJECT_KEY = "sk-proj-" + "Qm7vR2xT9kLp4Wn8" * 3
# The key split across two blocks in a row, around a citation: neither share is a secret alone.
SHARES = ("the key is " + PROJECT_KEY[:19], PROJECT_KEY[19:] + " for that.")
CITATION = {"type": "char_location", "cited_text": "keys rotate", "document_index": 0,
            "document_title": "ops", "start_char_index": 0, "end_char_index": 11}


def _blocks_in_a_row(f: http.HTTPFlow, case: str, texts: tuple[str, ...] = SHARES) -> None:
    """An Anthropic answer's text blocks in a row (`texts`), or a Responses answer's output
    parts, whole or streamed (3 characters an event) as the APIs stream them."""
    if case.startswith("anthropic"):
        f.metadata["douane"] = {"interaction": {"protocol": "anthropic"}}
        f.request.path = "/v1/messages"
        f.request.text = json.dumps({"model": "m", "max_tokens": 9, "messages": [
            {"role": "user", "content": "which key?"}]})
        answer = _anthropic("m", "")
        answer["content"] = [{"type": "text", "text": texts[0], "citations": [CITATION]},
                             *({"type": "text", "text": text} for text in texts[1:])]
        events = anthropic_stream
    else:
        f.metadata["douane"] = {"interaction": {"protocol": "openai"}}
        f.request.path = "/v1/responses"
        f.request.text = json.dumps({"model": "m", "input": "which key?"})
        answer = _responses("m", "")
        answer["output"][0]["content"] = [
            {"type": "output_text", "text": text, "annotations": []} for text in texts]
        events = responses_stream
    if case.endswith("streamed"):
        f.response.headers["content-type"] = "text/event-stream"
        f.response.text = "".join(events(answer, lambda text: _pieces(text, 3)))
    else:
        f.response.text = json.dumps(answer)


def _texts_read(f: http.HTTPFlow) -> tuple[str, ...]:
    """What the gateway hands the writer (`writer.texts_read`): the flow parsed as it parses it,
    a stream through its rewriter."""
    upstream = transcript.upstream_of(f)
    assert upstream is not None
    it = protocols.parse_request(upstream, f)
    stream = f.response.headers["content-type"] == "text/event-stream"
    if stream:
        rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "d")
        rewriter(f.response.content)
        rewriter(b"")
    else:
        protocols.parse_response(upstream, f, it)
    return writer.texts_read(it, stream)


def _leaky_flow(case: str) -> http.HTTPFlow:
    """A flow with a secret where the gateway's inspection of the request body does not look."""
    key = PROJECT_KEY
    f = tflow.tflow(resp=tutils.tresp())
    f.metadata["douane"] = {"interaction": {"protocol": "openai"}}
    f.request.method, f.request.path = "POST", "/v1/chat/completions"
    f.request.headers["content-type"] = f.response.headers["content-type"] = "application/json"
    f.request.text = json.dumps({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}]})
    f.response.text = json.dumps({"choices": [{"message": {"content": "fine"}}],
                                  "usage": {"prompt_tokens": 5}})
    if case == "response body":
        f.response.text = json.dumps({"choices": [{"message": {"content": f"use {key}"}}]})
    elif case == "escaped":  # the key's letters as JSON escapes: not in the raw text
        f.response.text = '{"content": "' + "".join(f"\\u{ord(c):04x}" for c in key) + '"}'
    elif case == "slash escaped":  # `\/` joins what the raw text splits
        f.request.text = '{"url": "postgres:\\/\\/admin:Hunter2pass@db.corp\\/x"}'
    elif case == "non-ascii":
        f.request.text = json.dumps({"content": f"clé générée : {key} ✓"}, ensure_ascii=False)
    elif case == "utf-16":
        f.response.headers["content-type"] = "text/plain; charset=utf-16"
        f.response.content = f"la clé {AWS_KEY}".encode("utf-16")
    elif case == "gzip":
        f.response.headers["content-encoding"] = "gzip"
        f.response.text = json.dumps({"content": f"key {AWS_KEY}"})
    elif case == "percent data url":  # `file_text` reads it: the raw text shows no key
        f.request.text = json.dumps({"file": "data:text/plain,%41KIA" + AWS_KEY[4:]})
    elif case == "header":
        f.response.headers["x-debug"] = f"token={JWT}"
    elif case == "query":
        f.request.path = f"/v1/chat/completions?api_key={AWS_KEY}"
    elif case == "cookie":
        f.request.headers["cookie"] = f"session={JWT}"
    elif case == "data url in a stream":  # SSE lines start `data:` too: the URL still shows
        f.response.headers["content-type"] = "text/event-stream"
        f.response.text = "".join(_openai_chat_events("m", [
            "a file: ", "DATA:text/plain,%41KIA" + AWS_KEY[4:]]))
    elif case == "split across deltas":
        text = "the key is " + key
        f.response.headers["content-type"] = "text/event-stream"
        f.response.text = "".join(_openai_chat_events("m", _pieces(text, 4)))
    elif case in BLOCKS_IN_A_ROW:
        _blocks_in_a_row(f, case)
    return f


BLOCKS_IN_A_ROW = ("anthropic blocks in a row", "anthropic blocks in a row, streamed",
                   "responses parts in a row", "responses parts in a row, streamed")


LEAKS = ("response body", "escaped", "slash escaped", "non-ascii", "utf-16", "gzip",
         "percent data url", "data url in a stream", "header", "query", "cookie",
         "split across deltas", *BLOCKS_IN_A_ROW)


@pytest.mark.parametrize("case", LEAKS)
def test_no_secret_survives_the_writer_wherever_it_is(case, monkeypatch):
    f = _leaky_flow(case)
    streamed = ("the key is " + PROJECT_KEY,) if case == "split across deltas" else \
        _texts_read(f) if case in BLOCKS_IN_A_ROW else ()
    written = recording_of(f.get_state(), frozenset({"cookie"}), streamed)
    data = writer.tnetstring_of(written)
    for secret in ("Qm7vR2xT9kLp4Wn8", "Qm7vR2x", AWS_KEY[4:], JWT.split(".")[2], "Hunter2pass"):
        assert secret.encode() not in data and secret.encode("utf-16-le") not in data
    recorded = http.HTTPFlow.from_state(written)  # mitmproxy reads it
    # as read: a stream's deltas joined
    assert not any(secret in transcript.render(recorded) for secret in ("Qm7vR2x", "Hunter2"))
    if case in BLOCKS_IN_A_ROW:  # each block keeps its place, redacted with its share
        marker = "<SECRET:detector.secret.api_key>"
        assert transcript.render(recorded).count(marker) == 2
        if not case.endswith("streamed"):
            assert marker + " for that." in recorded.response.text
    # A verdict (the texts the policy found no secret in) for every text of the flow it could
    # have read clean changes nothing: the secret, wherever it is, is redacted all the same.
    verdict = _every_clean_text(f) | _verdict(f)
    assert verdict
    assert writer.tnetstring_of(recording_of(f.get_state(), frozenset({"cookie"}), streamed,
                                             (), verdict)) == data
    # the one-scan shortcut for clean bodies changes nothing: the same as every value scanned
    monkeypatch.setattr(writer.secrets, "matches", lambda text: True)
    assert writer.tnetstring_of(recording_of(f.get_state(), frozenset({"cookie"}), streamed)) \
        == data


POLICY_TEXT = "version: 1\n"  # the secrets detector on, as by default


def _verdict(f: http.HTTPFlow) -> frozenset[str]:
    """What the gateway hands the writer (`Record`): the texts its policy read, as Inspect
    parses them, and found no secret in (`TextPiece.secret_free`)."""
    upstream = transcript.upstream_of(f)
    assert upstream is not None
    policy = _policy()
    try:
        it = protocols.parse_request(upstream, f)
        engine.risk(policy, it.texts)
        if f.response and "event-stream" not in f.response.headers.get("content-type", ""):
            protocols.parse_response(upstream, f, it)
            engine.risk(policy, it.response_texts)
    except protocols.ProtocolError:
        return frozenset()  # read by no parser: no verdict
    return frozenset(p.secret_free for p in (*it.texts, *it.response_texts)
                     if p.secret_free is not None)


def _every_clean_text(f: http.HTTPFlow) -> frozenset[str]:
    """The widest honest verdict: every string value of the flow's bodies (decoded) in which
    `secrets.find` finds nothing."""
    texts = [m.get_text(strict=False) or "" for m in (f.request, f.response) if m]
    return frozenset(v for text in texts for v in (text, *writer._values(text))
                     if not secrets.find(v))


@functools.cache
def _policy() -> model.Policy:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "grants.yaml").write_text(POLICY_TEXT)
        return model.load([Path(tmp) / "grants.yaml"])


def test_the_policys_verdict_is_the_very_text_it_read_and_found_clean():
    """A text edited after the policy read it (masking, an addon) is scanned again by the
    writer: the verdict is the exact string found clean, not a flag on the body or the piece.
    A text the policy found a secret in has none; what the writer skips is only a value equal
    to a text found clean."""
    prompt = "Summarise the notes of Tuesday's meeting for the Lyon office, please."
    f = tflow.tflow(resp=tutils.tresp())
    f.metadata["douane"] = {"interaction": {"protocol": "openai"}}
    f.request.method, f.request.path = "POST", "/v1/chat/completions"
    f.request.headers["content-type"] = f.response.headers["content-type"] = "application/json"
    f.request.text = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": prompt}, {"role": "user", "content": f"key {AWS_KEY}"}]})
    it = protocols.parse_request(transcript.upstream_of(f), f)
    assert {r.rule for r in engine.risk(_policy(), it.texts)} == \
        {"detector.secret.aws_access_key"}
    [clean_piece] = [p for p in it.texts if p.text == prompt]
    [leaky_piece] = [p for p in it.texts if AWS_KEY in p.text]
    assert clean_piece.secret_free == prompt and leaky_piece.secret_free is None
    verdict = frozenset({clean_piece.secret_free})
    clean_piece.text = prompt + " " + AWS_KEY  # edited since: the verdict names the old text
    assert clean_piece.secret_free == prompt
    f.request.text = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": clean_piece.text}, {"role": "user", "content": "hi"}]})
    written = recording_of(f.get_state(), frozenset(), (), (), verdict)
    assert AWS_KEY[4:].encode() not in writer.tnetstring_of(written)
    assert written["request"]["content"].count(b"<SECRET:detector.secret.aws_access_key>") == 1
    # the body as read: its clean text is not scanned again, the rest is
    f.request.text = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": prompt}]})
    scanned: list[str] = []
    matches = writer.secrets.matches

    def spied(text: str) -> bool:
        scanned.append(text)
        return matches(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer.secrets, "matches", spied)
        mp.setattr(untrusted, "_clean", set())  # no value seen clean before
        spared = writer.tnetstring_of(recording_of(f.get_state(), frozenset(), (), (), verdict))
        assert scanned and not any(prompt in text for text in scanned)
        assert spared == writer.tnetstring_of(recording_of(f.get_state(), frozenset()))
        assert any(prompt in text for text in scanned)


@pytest.mark.parametrize("case", BLOCKS_IN_A_ROW)
def test_a_secret_cut_anywhere_across_blocks_is_redacted_and_a_clean_answer_kept(case):
    """Random cuts (seeded): the key in 2 or 3 blocks in a row, one cut inside it and any other
    anywhere, is in no recording, as stored or as read; each block keeps its place, its share
    redacted, the blocks read as the whole text redacted. The same blocks without a key are
    recorded byte for byte."""
    rng = random.Random(26)
    text = "the key is " + PROJECT_KEY + " for that."
    plain = ("the sky is " + "blue and " * 9)[:len(text) - 1] + "."  # cut where `text` is
    marker = "<SECRET:detector.secret.api_key>"
    for _ in range(12):
        inside = rng.randrange(len("the key is ") + 1, len("the key is ") + len(PROJECT_KEY))
        cuts = sorted({inside, *rng.sample(range(1, len(text)), rng.choice((0, 1)))})
        for source in (text, plain):
            blocks = tuple(source[a:b] for a, b in zip([0, *cuts], [*cuts, len(source)],
                                                        strict=True))
            f = _leaky_flow("response body")
            _blocks_in_a_row(f, case, blocks)
            written = recording_of(f.get_state(), frozenset(), _texts_read(f))
            if source == plain:
                assert written["response"] == f.get_state()["response"], cuts
                continue
            data = writer.tnetstring_of(written)
            recorded = http.HTTPFlow.from_state(written)
            read = transcript.render(recorded)
            for i in range(len(PROJECT_KEY) - 4):
                share = PROJECT_KEY[i:i + 5]
                assert share.encode() not in data and share not in read, (cuts, share)
            if not case.endswith("streamed"):
                doc = json.loads(recorded.response.content)
                parts = doc["content"] if "content" in doc else doc["output"][0]["content"]
                assert len(parts) == len(blocks), cuts
                joined = "".join(p["text"] for p in parts)
                assert re.sub(f"(?:{re.escape(marker)})+", marker, joined) == \
                    f"the key is {marker} for that.", (cuts, joined)


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_a_key_split_across_blocks_is_in_no_recording_through_a_gateway(issuer, tmp_path,
                                                                         protocol):
    """Through a real gateway, no masking: the key split across an Anthropic answer's text blocks
    (around a citation) or a Responses answer's output parts, whole and streamed. The client gets
    it; no recording keeps a share of it, as stored or as read."""
    llm = FakeUpstream()
    f = tflow.tflow(resp=tutils.tresp())
    _blocks_in_a_row(f, f"{'anthropic' if protocol == 'anthropic' else 'responses'} whole")
    llm.document = json.loads(f.response.content)
    gw = Gateway(base_config(issuer.url, llm.url, recording={}, protocol=protocol),
                 mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path / "gw")
    token = issuer.mint("dan@corp")
    path, ask = ("/v1/messages", {"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "which key?"}]}) if protocol == "anthropic" else \
        ("/v1/responses", {"model": "m", "input": "which key?"})
    try:
        for stream in (False, True):
            answer = httpx.post(gw.url + path, json={**ask, "stream": stream}, timeout=30,
                                headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
            assert stream or all(share in answer.text for share in SHARES)  # the client's
        written(gw, 2)
    finally:
        gw.stop()
        llm.close()
    flows = [f for p in recordings(gw).rglob("*.mitm") for _, f in index.read_flows(p)]
    assert len(flows) == 2
    for flow in flows:
        read = transcript.render(flow)
        assert "<SECRET:detector.secret.api_key>" in read
        for i in range(len(PROJECT_KEY) - 4):
            assert PROJECT_KEY[i:i + 5] not in read, read
    for path_ in recordings(gw).rglob("*"):
        if path_.is_file():
            data = path_.read_bytes()
            assert not any(PROJECT_KEY[i:i + 7].encode() in data
                           for i in range(len(PROJECT_KEY) - 6)), path_


def test_sessions_commands(recorded, capsys):
    gw, _, _ = recorded
    config = str(gw.config_file)
    assert main(["sessions", "--config", config, "list", "--user", "alice@corp"]) == 0
    out = capsys.readouterr().out
    assert "(3 flow(s))" in out and "block" in out and "mask" in out
    assert main(["sessions", "--config", config, "list", "--decision", "refuse"]) == 0
    assert "anonymous" in capsys.readouterr().out
    db = index.connect(gw.state_dir / "recordings" / "index.sqlite3")
    blocked = index.query(db, decision="block")[0]["decision_id"]
    assert main(["sessions", "--config", config, "show", blocked]) == 0
    out = capsys.readouterr().out
    assert "reason: deny.codename" in out and "[user] about nightingale" in out
    masked = index.query(db, user="bob@corp", decision="mask")[0]["decision_id"]
    assert main(["sessions", "--config", config, "show", masked]) == 0
    assert "Reach «PERSON» at «EMAIL_ADDRESS»." in capsys.readouterr().out


def test_kill_9_leaves_readable_files_and_a_rebuildable_index(issuer, tmp_path):
    llm = FakeUpstream()
    gw = Gateway(base_config(issuer.url, llm.url, recording={}), mode=f"reverse:{llm.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=tmp_path / "gw")
    token = issuer.mint("carol@corp")
    stop = threading.Event()
    sent: list[float] = []  # when each answer came

    def traffic() -> None:
        with httpx.Client(timeout=60) as client:  # a slow answer on a loaded host: still traffic
            while not stop.is_set() and len(sent) < 2000:
                try:
                    client.post(gw.url + "/v1/chat/completions",
                                headers={"authorization": f"Bearer {token}"},
                                json={"model": "m", "messages": [{"role": "user",
                                                                  "content": "hi"}]})
                    sent.append(time.monotonic())
                except httpx.HTTPError:
                    return

    def settled_by(moment: float) -> int:
        return sum(1 for t in list(sent) if t < moment - bursts.WINDOW - 0.5)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for w in workers:
        w.start()
    # killed in the middle of traffic, once 40 answers are past the writers' last burst window
    # (those must be readable after the kill): a fixed 2 s made the count a race at load ~12
    assert until(lambda: settled_by(time.monotonic()) >= 40, timeout=120), len(sent)
    killed = time.monotonic()
    gw.kill()
    stop.set()
    for w in workers:
        w.join()
    llm.close()
    root = gw.state_dir / "recordings"
    readable = sum(1 for p in root.rglob("*.mitm") for _ in index.read_flows(p))
    live = index.connect(root / "index.sqlite3")
    live_rows = {r[0] for r in live.execute("SELECT flow_id FROM flows")}
    live.close()
    # lost at most: the flows in flight and those answered in the writers' last burst window
    # (with scheduling slack on a loaded machine)
    settled = settled_by(killed)
    assert readable >= settled and readable > 20, (readable, settled, len(sent))
    config = str(gw.config_file)
    assert main(["sessions", "--config", config, "reindex"]) == 0
    db = index.connect(root / "index.sqlite3")
    rebuilt = {r[0] for r in db.execute("SELECT flow_id FROM flows")}
    assert len(rebuilt) == readable and live_rows <= rebuilt
    gw.start()  # the next start cuts a torn audit line and records the cut
    gw.stop()
    verified = audit.verify(gw.audit_file(), (gw.state_dir / "audit-hmac.key").read_bytes().strip())
    assert verified.ok, verified.error
    # the audit log and the recordings have writers of their own: at a kill either may be behind
    # by the flows in flight and its last burst
    assert verified.records >= settled


def test_prune_deletes_old_recordings_and_audits_each_deletion(tmp_path, capsys):
    state_dir = tmp_path / "state"
    config = tmp_path / "douane.yaml"
    config.write_text(f"version: 1\ngateway: {{state_dir: {state_dir}}}\n"
                      "identity: {dev_issuer: {enabled: true}}\nrecording: {retention_days: 7}\n")
    old = state_dir / "recordings" / "alice" / "2020-01-01" / "conn-1.mitm"
    new = state_dir / "recordings" / "alice" / "2099-01-01" / "conn-2.mitm"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    import os

    os.utime(old, (time.time() - 30 * 86400,) * 2)
    assert main(["sessions", "--config", str(config), "prune"]) == 0
    assert "deleted 1 recording file(s)" in capsys.readouterr().out
    assert not old.exists() and new.exists()
    log = state_dir / "audit" / "operator-audit.jsonl"
    assert "recording.deleted" in log.read_text() and "conn-1.mitm" in log.read_text()
    assert audit.verify(log, (state_dir / "audit-hmac.key").read_bytes().strip()).ok


def _request_parts(f: http.HTTPFlow, case: str, texts: tuple[str, ...]) -> None:
    """A request whose parts in a row are `texts`: a chat message's content parts, chat messages
    in a row, a Responses input message's parts, Responses input items, Anthropic blocks."""
    f.metadata["douane"] = {"interaction": {"protocol": "openai"}}
    parts = [{"type": "text", "text": text} for text in texts]
    if case == "chat parts":
        doc: dict = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    elif case == "chat messages":
        doc = {"model": "m", "messages": [{"role": "user", "content": t} for t in texts]}
    elif case == "responses parts":
        f.request.path = "/v1/responses"
        doc = {"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": text} for text in texts]}]}
    elif case == "responses items":
        f.request.path = "/v1/responses"
        doc = {"model": "m", "input": [{"role": "user", "content": t} for t in texts]}
    else:
        f.metadata["douane"] = {"interaction": {"protocol": "anthropic"}}
        f.request.path = "/v1/messages"
        doc = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": parts}]}
    f.request.text = json.dumps(doc)


def _parts_read(f: http.HTTPFlow) -> tuple[str, ...]:
    """What the gateway hands the writer for the request (`writer.parts_read`)."""
    upstream = transcript.upstream_of(f)
    assert upstream is not None
    return writer.parts_read(protocols.parse_request(upstream, f))


REQUEST_CASES = ["chat parts", "chat messages", "responses parts", "responses items",
                 "anthropic blocks"]


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_a_secret_cut_anywhere_across_a_requests_parts_is_redacted(case):
    """Each part of a request was redacted alone: a key split across two parts in a row (which
    the model reads as one text) was recorded in clear. Seeded random cuts through the key; an
    unsplit key's redaction, and a clean request, are as before byte for byte."""
    rng = random.Random(27)
    marker = "<SECRET:detector.secret.api_key>"
    text = f"the key is {PROJECT_KEY} for that."
    for _ in range(12):
        inside = rng.randrange(len("the key is ") + 1, len("the key is ") + len(PROJECT_KEY))
        cuts = sorted({inside, *rng.sample(range(1, len(text)), rng.choice((0, 1)))})
        parts = tuple(text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True))
        f = _leaky_flow("clean")
        _request_parts(f, case, parts)
        written = recording_of(f.get_state(), frozenset(), (), _parts_read(f))
        data = writer.tnetstring_of(written)
        for i in range(len(PROJECT_KEY) - 4):
            assert PROJECT_KEY[i:i + 5].encode() not in data, (cuts, PROJECT_KEY[i:i + 5])
        recorded = http.HTTPFlow.from_state(written)
        assert "<SECRET:" in transcript.render(recorded)
        doc = json.loads(recorded.request.content)
        texts = [text for item in doc.get("messages") or doc["input"] for text in (
            [item["content"]] if isinstance(item["content"], str) else
            [p["text"] for p in item["content"]])]
        assert len(texts) == len(parts), cuts  # every part in its place
        assert re.sub(f"(?:{re.escape(marker)})+", marker, "".join(texts)) == \
            f"the key is {marker} for that.", (cuts, texts)
    for parts in ((f"the key is {PROJECT_KEY}", " for that."), ("the sky is", " blue.")):
        f = _leaky_flow("clean")  # unsplit: each part's own redaction, as before
        _request_parts(f, case, parts)
        assert writer.tnetstring_of(recording_of(f.get_state(), frozenset(), (), _parts_read(f))) \
            == writer.tnetstring_of(recording_of(f.get_state(), frozenset()))


@pytest.mark.parametrize("case", ["chat parts", "responses items"])
def test_a_key_split_across_a_requests_parts_is_in_no_recording_through_a_gateway(
        issuer, tmp_path, case):
    """Through a real gateway, no policy (nothing refuses the key): the request reaches the
    upstream whole; no recording keeps a share of the key, as stored or as read."""
    llm = FakeUpstream()
    gw = Gateway(base_config(issuer.url, llm.url, recording={}), mode=f"reverse:{llm.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=tmp_path / "gw")
    f = _leaky_flow("clean")
    _request_parts(f, case, SHARES)
    try:
        answer = httpx.post(gw.url + f.request.path, content=f.request.content, timeout=30,
                            headers={"authorization": f"Bearer {issuer.mint('dan@corp')}",
                                     "content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert all(share.encode() in llm.requests[-1].body for share in SHARES)
        written(gw, 1)
    finally:
        gw.stop()
        llm.close()
    flows = [f for p in recordings(gw).rglob("*.mitm") for _, f in index.read_flows(p)]
    assert len(flows) == 1
    assert "<SECRET:detector.secret.api_key>" in transcript.render(flows[0])
    for path_ in recordings(gw).rglob("*"):
        if path_.is_file():
            data = path_.read_bytes()
            assert not any(PROJECT_KEY[i:i + 7].encode() in data
                           for i in range(len(PROJECT_KEY) - 6)), path_


def _request_in_order(f: http.HTTPFlow, case: str, first: str, second: str) -> None:
    """A request whose texts `first`, `second` the model reads in sequence, not in a row."""
    f.metadata["douane"] = {"interaction": {"protocol": "anthropic"}}
    f.request.path = "/v1/messages"
    call = {"type": "tool_use", "id": "toolu_1", "name": "deploy"}
    if case == "around an image":
        f.metadata["douane"] = {"interaction": {"protocol": "openai"}}
        f.request.path = "/v1/chat/completions"
        doc: dict = {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": first},
            {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}},
            {"type": "text", "text": second}]}]}
    elif case == "instructions then input":
        f.metadata["douane"] = {"interaction": {"protocol": "openai"}}
        f.request.path = "/v1/responses"
        doc = {"model": "m", "instructions": first, "input": second}
    elif case == "system then message":
        doc = {"model": "m", "max_tokens": 9, "system": first,
               "messages": [{"role": "user", "content": second}]}
    else:
        turn = [{"type": "text", "text": first}, {**call, "input": {"note": second}}] \
            if case == "message then tool call" else [{**call, "input": {"a": first, "b": second}}]
        doc = {"model": "m", "max_tokens": 9, "messages": [
            {"role": "user", "content": "go"}, {"role": "assistant", "content": turn}]}
    f.request.text = json.dumps(doc)


@pytest.mark.parametrize("case", ["around an image", "instructions then input",
                                  "system then message", "message then tool call",
                                  "two argument values"])
def test_a_secret_cut_across_texts_read_in_sequence_is_redacted(case):
    """A key cut between texts the model reads in sequence but not in a row (around an image,
    instructions and input, system and the first message, a message and its tool call, two
    argument values) was recorded in clear, a share in each. Seeded cuts through the key; an
    unsplit key's redaction, and a clean request, are as before byte for byte."""
    rng = random.Random(27)
    text = f"the key is {PROJECT_KEY} for that."
    for _ in range(8):
        cut = rng.randrange(len("the key is ") + 1, len("the key is ") + len(PROJECT_KEY))
        f = _leaky_flow("clean")
        _request_in_order(f, case, text[:cut], text[cut:])
        prompted = _parts_read(f)
        assert prompted, cut  # the gateway hands the writer the texts in order
        written = recording_of(f.get_state(), frozenset(), (), prompted)
        data = writer.tnetstring_of(written)
        for i in range(len(PROJECT_KEY) - 4):
            assert PROJECT_KEY[i:i + 5].encode() not in data, (cut, PROJECT_KEY[i:i + 5])
        assert "<SECRET:detector.secret.api_key>" in transcript.render(
            http.HTTPFlow.from_state(written))
    for parts in ((f"the key is {PROJECT_KEY}", " for that."), ("the sky is", " blue.")):
        f = _leaky_flow("clean")  # unsplit: each text's own redaction, as before
        _request_in_order(f, case, *parts)
        assert _parts_read(f) == ()  # nothing across texts: not copied to the writer
        assert writer.tnetstring_of(recording_of(f.get_state(), frozenset(), (), _parts_read(f))) \
            == writer.tnetstring_of(recording_of(f.get_state(), frozenset()))


class _Writer:
    """What `Record` hands the writer, kept (the writer's process is not this test's)."""

    congested, healthy = False, True

    def __init__(self):
        self.put_with: list[tuple] = []

    def put(self, relative, snapshot, scrub, original=None, streamed=(), prompted=(), clean=()):
        self.put_with.append((streamed, prompted))


@pytest.mark.parametrize(("messages", "text"), [(3, "part {} of the key sk-"),
                                               (4000, "part {} of the key sk-"), (4000, "x")])
def test_the_parts_read_together_are_joined_off_the_loop_when_many(monkeypatch, messages, text):
    """A request of 4,000 messages had its parts joined and scanned for split secrets on the loop
    (~19 ms, red team stop 30): past the policy's size or number of texts for matching in a
    thread, in a thread (one-character messages too); an ordinary request on the loop. The writer
    gets the same runs either way."""
    import asyncio

    from douane.recording import addon

    openai_upstream = Upstream("openai", "https", "api.openai.com", 443, "/v1", "openai", None)
    doc = {"model": "m", "messages": [{"role": "user", "content": text.format(i)}
                                      for i in range(messages)]}
    f = tflow.tflow(resp=True, req=tutils.treq(host="api.openai.com", path=b"/v1/chat/completions",
                                                content=json.dumps(doc).encode(), method=b"POST"))
    f.request.headers["content-type"] = "application/json"
    st = state(f)
    st.identity = Identity("alice@corp.example", (), "t", "a", "bearer")
    st.interaction = protocols.parse_request(openai_upstream, f)
    threads = []
    monkeypatch.setattr(addon, "parts_read", lambda it: (
        threads.append(threading.current_thread()), writer.parts_read(it))[1])
    record = addon.Record.__new__(addon.Record)
    record.writer, record.recording, record.issued = _Writer(), SETTINGS, {}
    asyncio.run(record.response(f))
    [(_, prompted)] = record.writer.put_with
    assert prompted == writer.parts_read(st.interaction)
    assert (threads == [threading.main_thread()]) == (messages == 3), threads
