"""Leaks: after the hardening suite (this module is named to run last), a byte scan of every
recording, log, audit file and index the suite's gateways wrote, for every token, upstream key and
cookie used; and for any JWT or provider-style key at all, also inside base64 (Basic proxy
credentials). The module drives a gateway of its own through every path a secret travels (bearer,
x-api-key, proxy Basic, cookies; allowed, streamed, blocked, refused, upstream errors), so it
scans something real even when run alone.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import COOKIE, DENIED, with_claude, write_policy
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

# the folders the hardening modules' gateways write into (under pytest's session basetemp)
HARDENING_DIRS = ("tokens", "evasion", "bypass", "operations", "failclosed", "record", "test_full_recordings_disk",
                  "test_load_then_kill", "leaks", "differentials", "websocket-sessions")
WRITTEN = re.compile(r"\.(mitm|log|jsonl(\.\d+)?|sqlite3(-wal|-shm)?)$")
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
PROVIDER_KEY = re.compile(rb"sk-[A-Za-z0-9_-]{20,}")
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{40,}={0,2}")


@pytest.fixture(scope="module")
def traffic(issuer, secrets, tmp_path_factory):
    """Every way a secret reaches the gateway, through a reverse and a regular gateway."""
    work = tmp_path_factory.mktemp("leaks")
    llm = FakeUpstream()
    config = base_config(issuer.url, llm.url, policy={"files": [write_policy(work)]},
                         recording={})
    with_claude(config, llm.url)
    env = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    token = issuer.mint("lea@corp.example", ["engineering"])
    forged = token[:-6] + "AAAAAA"
    secrets.update((token, forged))
    cookies = {"cookie": COOKIE}
    with Gateway(config, mode=f"reverse:{llm.url}", env=env, workdir=work / "reverse") as gw:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0,
                          default_headers=cookies)
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        stream = c.chat.completions.create(model="m", stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": DENIED}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.url + "/v1", api_key=forged, max_retries=0,
                          default_headers=cookies).models.list()
        with pytest.raises(openai.NotFoundError):  # the upstream's own error
            c.embeddings.create(model="m", input="x")
        a = anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0,
                                default_headers=cookies)
        a.messages.create(model="claude", max_tokens=10,
                          messages=[{"role": "user", "content": "hi"}])
        gw.audit_records(wait_for=6)
    with Gateway(config, mode="regular", env=env, workdir=work / "regular") as gw:
        with httpx.Client(proxy=gw.proxy_url("lea", token)) as client:
            assert client.post(llm.url + "/v1/chat/completions", headers=cookies,
                               json={"model": "m", "messages": []}).status_code == 200
        with httpx.Client(proxy=gw.proxy_url("lea", forged)) as client:
            assert client.post(llm.url + "/v1/chat/completions",
                               json={"model": "m", "messages": []}).status_code == 407
        gw.audit_records(wait_for=2)
    # the upstream saw the injected key and never a client token or the test's cookie value
    assert token.encode() not in llm.received_bytes() and UPSTREAM_KEY.encode() in \
        llm.received_bytes()
    llm.close()
    return tmp_path_factory.getbasetemp()


def written_files(root: Path) -> list[Path]:
    return [p for d in root.iterdir() if d.is_dir() and d.name.startswith(HARDENING_DIRS)
            for p in d.rglob("*") if p.is_file() and WRITTEN.search(p.name)]


def findings(data: bytes, secrets: set[str]) -> list[str]:
    found = [f"{s[:12]}..." for s in secrets if s.encode() in data]
    found += [f"JWT {m[:16]!r}..." for m in JWT.findall(data)]
    found += [f"key {m[:10]!r}..." for m in PROVIDER_KEY.findall(data)]
    for run in BASE64_RUN.findall(data):
        try:
            decoded = base64.b64decode(run + b"=" * (-len(run) % 4))
        except (binascii.Error, ValueError):
            continue
        if JWT.search(decoded) or any(s.encode() in decoded for s in secrets):
            found.append(f"base64 {run[:16]!r}...")
    return found


def test_no_token_key_or_cookie_in_anything_written(traffic, secrets):
    files = written_files(traffic)
    kinds = {p.suffix for p in files}
    assert {".mitm", ".log", ".jsonl", ".sqlite3"} <= kinds, kinds
    leaks = {str(p): f for p in files if (f := findings(p.read_bytes(), secrets))}
    scanned = sum(p.stat().st_size for p in files)
    print(f"leak scan: {len(files)} files, {scanned} bytes, {len(secrets)} secrets + patterns")
    assert not leaks, leaks


def test_the_scan_would_see_a_leak(traffic, secrets):
    # the detector itself: each kind of leak is found
    token = next(s for s in secrets if s.startswith("eyJ"))
    for leak in (token.encode(), UPSTREAM_KEY.encode(), COOKIE.encode(),
                 base64.b64encode(f"lea:{token}".encode())):
        assert findings(b"x " + leak + b" y", secrets), leak
