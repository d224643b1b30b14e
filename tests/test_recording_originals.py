"""Recordings, continued: sealed unmasked originals for auditors, `sessions reveal`, `sessions
replay` through a live gateway, masked spans marked in `sessions show`."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from douane import audit
from douane import config as configmod
from douane.cli import main
from douane.flowstate import state
from douane.protocols import streams
from douane.recording import index, originals
from douane.recording.config import RecordingSettings
from douane.transcript import mark_masked as mark
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

PII = ("maria.garcia@example.com", "jane.doe@example.org", "Maria Garcia")


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def sealed(issuer, tmp_path_factory):
    llm = FakeUpstream()
    llm.reply = "Reach Maria Garcia at maria.garcia@example.com."
    work = tmp_path_factory.mktemp("originals")
    auditors = work / "auditors"  # a different machine in real life
    auditors.mkdir()
    private, public = key_pair(auditors, "auditors")
    (work / "grants.yaml").write_text(
        "version: 1\ngroups:\n  eng:\n    upstreams:\n      llm: {models: ['*']}\n")
    config = base_config(issuer.url, llm.url, recording={"originals": {"public_key": str(public)}},
                         policy={"files": [str(work / "grants.yaml")]},
                         masking={"workers": 1, "requests": True})
    gw = Gateway(config, mode=f"reverse:{llm.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=work / "gw")
    alice = issuer.mint("alice@corp", ["eng"])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=alice, max_retries=0)
    prompt = [{"role": "user", "content": "Please write to jane.doe@example.org about it."}]
    client.chat.completions.create(model="m", messages=prompt)
    stream = client.chat.completions.create(model="m", stream=True, messages=prompt)
    "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    db_path = gw.state_dir / "recordings" / "index.sqlite3"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            db_path.exists() and len(index.query(index.connect(db_path))) >= 2):
        time.sleep(0.1)
    yield gw, llm, auditors, private, alice
    gw.stop()
    llm.close()


def flows_of(gw: Gateway) -> list[dict]:
    return index.query(index.connect(gw.state_dir / "recordings" / "index.sqlite3"))


def test_no_pii_in_recordings_nor_in_sealed_originals(sealed):
    gw, _, _, _, _ = sealed
    sealed_files = list((gw.state_dir / "recordings").rglob("*" + originals.SUFFIX))
    assert len(sealed_files) == 1 and sealed_files[0].with_suffix(".mitm").exists()
    records = [json.loads(line) for line in sealed_files[0].read_text().splitlines()]
    assert {r["flow_id"] for r in records} == {r["flow_id"] for r in flows_of(gw)}
    written = [p for p in gw.dir.rglob("*") if p.is_file() and not p.name.endswith(".pem")]
    for path in written:
        data = path.read_bytes()
        for value in PII:
            assert value.encode() not in data, f"{value} in {path}"


@pytest.fixture
def operator_env(monkeypatch):
    """Operator commands that write the audit log load the config with its secrets resolved."""
    monkeypatch.setenv("DOUANE_TEST_UPSTREAM_KEY", UPSTREAM_KEY)


def test_reveal_gets_the_originals_back_and_is_audited(sealed, capsys, operator_env):
    gw, _, _, private, _ = sealed
    config = str(gw.config_file)
    plain, streamed = sorted(flows_of(gw), key=lambda r: r["ts"])
    assert main(["sessions", "--config", config, "reveal", plain["decision_id"],
                 "--private-key", str(private)]) == 0
    out = capsys.readouterr().out
    assert "[user] Please write to jane.doe@example.org about it." in out  # before request masking
    assert "Reach Maria Garcia at maria.garcia@example.com." in out  # before response masking
    assert main(["sessions", "--config", config, "reveal", streamed["decision_id"],
                 "--private-key", str(private)]) == 0
    out = capsys.readouterr().out
    # the stream as the upstream sent it, reassembled, with no mask marks
    assert "[assistant, streamed] Reach Maria Garcia at maria.garcia@example.com." in out
    log = gw.state_dir / "audit" / "operator-audit.jsonl"
    revealed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["event"], r["decision_id"], r["outcome"]) for r in revealed[-2:]] == [
        ("recording.revealed", plain["decision_id"], "revealed"),
        ("recording.revealed", streamed["decision_id"], "revealed")]
    assert audit.verify(log, (gw.state_dir / "audit-hmac.key").read_bytes().strip()).ok


def test_reveal_with_a_wrong_key_fails_cleanly(sealed, capsys, tmp_path, operator_env):
    gw, _, _, _, _ = sealed
    wrong, _ = key_pair(tmp_path, "mallory")
    decision_id = flows_of(gw)[0]["decision_id"]
    assert main(["sessions", "--config", str(gw.config_file), "reveal", decision_id,
                 "--private-key", str(wrong)]) == 1
    out = capsys.readouterr().out
    assert "cannot open this original" in out
    assert not any(value in out for value in PII)
    log = gw.state_dir / "audit" / "operator-audit.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["decision_id"], last["outcome"]) == (decision_id, "wrong key")


def test_show_marks_masked_spans(sealed, capsys):
    gw, _, _, _, _ = sealed
    plain = min(flows_of(gw), key=lambda r: r["ts"])
    assert main(["sessions", "--config", str(gw.config_file), "show", plain["decision_id"]]) == 0
    out = capsys.readouterr().out
    assert "[user] Please write to «EMAIL_ADDRESS» about it." in out
    assert "Reach «PERSON» at «EMAIL_ADDRESS»." in out
    assert "masked: " in out and "EMAIL_ADDRESS x" in out


def test_mark_covers_every_operator_and_nothing_else():
    types = {"EMAIL_ADDRESS": 1, "CREDIT_CARD": 1, "PERSON": 1}
    assert mark("to <EMAIL_ADDRESS:1a2b3c4d>, card ************1234, <PERSON>, "
                "<LOCATION>, **bold**", types) == (
        "to «EMAIL_ADDRESS:1a2b3c4d», card «************1234», «PERSON», <LOCATION>, **bold**")
    assert mark("<PERSON>", {}) == "<PERSON>"


def test_replay_resends_through_the_live_gateway(sealed, capsys):
    gw, llm, _, _, alice = sealed
    plain = min(flows_of(gw), key=lambda r: r["ts"])
    received = len(llm.requests)
    assert main(["sessions", "--config", str(gw.config_file), "replay", plain["decision_id"],
                 "--gateway", gw.url, "--token", alice]) == 0
    out = capsys.readouterr().out
    assert " -> 200 dcn_" in out and alice not in out
    new_id = out.split()[-1]
    assert len(llm.requests) == received + 1
    again = llm.requests[-1]
    assert again.json()["messages"] == llm.requests[0].json()["messages"]
    assert again.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # brokered as usual
    replayed = gw.audit_record(new_id)
    assert replayed["user"] == "alice@corp" and replayed["status"] == 200


def test_replay_needs_a_token(sealed, monkeypatch):
    gw, llm, _, _, _ = sealed
    monkeypatch.delenv("DOUANE_TOKEN", raising=False)
    received = len(llm.requests)
    with pytest.raises(SystemExit, match="token"):
        main(["sessions", "--config", str(gw.config_file), "replay",
              flows_of(gw)[0]["decision_id"], "--gateway", gw.url])
    assert len(llm.requests) == received


@pytest.mark.parametrize("content, message", [
    ("PRIVATE", "this is a private key"),
    ("garbage", "expected an RSA public key"),
    (None, "cannot read"),
])
def test_originals_key_is_checked_at_load(tmp_path, content, message):
    private, _ = key_pair(tmp_path, "k")
    key = tmp_path / "key.pem"
    if content == "PRIVATE":
        key.write_bytes(private.read_bytes())
    elif content:
        key.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    file = tmp_path / "douane.yaml"
    file.write_text("version: 1\nidentity: {dev_issuer: {enabled: true}}\nrecording:\n"
                    f"  originals:\n    public_key: {key}\n")
    with pytest.raises(configmod.ConfigError, match=message) as e:
        configmod.load(file, gateway=False)
    assert e.value.line == 5 and e.value.path == "recording.originals.public_key"


def test_replay_of_a_proxy_mode_session_goes_through_the_gateway_as_proxy(
        issuer, upstream, make_gateway, capsys, operator_env, tmp_path):
    gw = make_gateway(base_config(issuer.url, upstream.url, recording={}))
    bob = issuer.mint("bob@corp")
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(proxy=gw.proxy_url("bob", bob)))
    for text in ("first", "second"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
    db_path = gw.state_dir / "recordings" / "index.sqlite3"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            db_path.exists() and len(index.query(index.connect(db_path))) >= 2):
        time.sleep(0.1)
    first = min(index.query(index.connect(db_path)), key=lambda r: r["ts"])
    assert len(upstream.requests) == 2
    assert main(["sessions", "--config", str(gw.config_file), "replay", first["decision_id"],
                 "--session", "--gateway", gw.url, "--token", bob]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(" -> 200 dcn_" in line for line in out)
    assert [r.json()["messages"][0]["content"] for r in upstream.requests] == [
        "first", "second", "first", "second"]
    new_ids = {line.split()[-1] for line in out}
    records = gw.audit_records(wait_for=4)
    assert {r["decision_id"] for r in records if r.get("user") == "bob@corp"} >= new_ids
    private, _ = key_pair(tmp_path, "auditors")  # this gateway keeps no originals
    assert main(["sessions", "--config", str(gw.config_file), "reveal", first["decision_id"],
                 "--private-key", str(private)]) == 1
    assert "no original kept" in capsys.readouterr().out


def keeper(tmp_path: Path, on: bool) -> originals.KeepOriginals:
    _, public = key_pair(tmp_path, "unit")
    recording = RecordingSettings(tmp_path, "connection", 60, (), "refuse", 30, 10**9,
                                  public.read_bytes() if on else None)
    keep = originals.KeepOriginals(SimpleNamespace(config=SimpleNamespace(
        sections={"recording": recording})))
    keep.configure({"douane_config"})
    return keep


def governed_flow() -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(content=b'{"prompt": "jane.doe@example.org"}'))
    f.live = True
    state(f).interaction = SimpleNamespace()  # only its presence matters here
    return f


def answer(f: http.HTTPFlow) -> None:
    f.response = tutils.tresp(content=b'{"answer": "maria.garcia@example.com"}')


def test_keep_originals_does_nothing_when_off(tmp_path):
    keep, f = keeper(tmp_path, on=False), governed_flow()
    keep.request(f)
    answer(f)
    streams.attach(f, lambda data: [data])
    stream = f.response.stream
    keep.responseheaders(f)
    keep.response(f)
    assert originals.take(f) is None and f.response.stream is stream


def test_keep_originals_captures_bodies_and_tees_streams(tmp_path):
    keep, f = keeper(tmp_path, on=True), governed_flow()
    keep.request(f)
    answer(f)
    keep.response(f)
    original = originals.take(f)
    assert original.request == f.request.raw_content and original.response == f.response.raw_content
    streamed = governed_flow()
    keep.request(streamed)
    answer(streamed)
    streams.attach(streamed, lambda data: [data.upper()])
    keep.responseheaders(streamed)
    assert streamed.response.stream(b"data: maria") == [b"DATA: MARIA"]  # still the rewriter
    streamed.response.stream(b"")
    keep.response(streamed)
    assert originals.take(streamed).payload()["response"] == base64.b64encode(
        b"data: maria").decode()


def test_sealed_records_open_only_with_the_auditors_key(tmp_path):
    private, public = key_pair(tmp_path, "auditors")
    other, _ = key_pair(tmp_path, "other")
    line = originals.seal(originals.public_key(public.read_bytes()), "f1", "dcn_1",
                          originals.Original(b"jane.doe@example.org", None))
    assert b"jane.doe" not in line
    record = json.loads(line)
    load = serialization.load_pem_private_key
    assert originals.unseal(load(private.read_bytes(), None), record).request == \
        b"jane.doe@example.org"
    with pytest.raises(ValueError):
        originals.unseal(load(other.read_bytes(), None), record)
