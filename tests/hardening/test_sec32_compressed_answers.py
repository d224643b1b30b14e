"""Security, stop 32: the recording writer inflated an answer still compressed when it reached
it (the gateway drops the encoding of what it decodes: one it did not read) up to the offline
limit (64 MB), as it did requests until stop 31 (200 KB of gzip: ~222 ms of writer CPU each).
Such an answer is now inflated to UNREAD_LIMIT (1 MiB) at most, else its body is not kept (it
cannot be scrubbed unread); within the bound it is decoded and redacted as before."""

from __future__ import annotations

import gzip
import time

import httpx
import pytest
import yaml
from mitmproxy.test import tflow

from douane.protocols import decoding
from douane.recording import writer
from douane.recording.writer import UNREAD_LIMIT
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, with_claude
from tests.hardening.test_evasion import _recordings
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

PATH = "/v1/files/file_x/content"
KEY = "AKIAQX7RZ2LMN4TB5KWF"


def gzipped(body: bytes):
    data = gzip.compress(body)

    def answer(handler, _req) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "application/octet-stream")
        handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return answer


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    work = tmp_path_factory.mktemp("sec32_gzip")
    policy = yaml.safe_load(POLICY)
    policy["default"]["upstreams"]["llm"]["operations"] = ["GET /v1/files/*/content"]
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    config = base_config(issuer.url, upstream.url + "/v1",
                         policy={"files": [str(work / "policy.yaml")]}, recording={})
    with_claude(config, upstream.url)
    with Gateway(config, mode=f"reverse:{upstream.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("gz@corp.example", ["engineering"])
    secrets.add(token)
    return token


def download(gw, upstream, token: str, body: bytes) -> httpx.Response:
    upstream.answer = gzipped(body)
    try:
        return httpx.get(gw.url + PATH, timeout=60, headers={"authorization": f"Bearer {token}",
                                                               "accept-encoding": "gzip"})
    finally:
        upstream.answer = None


def recorded(gw, decision_id: str) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        data = b"".join(p.read_bytes() for p in _recordings(gw))
        if decision_id.encode() in data:
            return data
        assert time.monotonic() < deadline, "not recorded"
        time.sleep(0.2)


def test_a_compressed_answer_in_the_writer_is_inflated_within_a_bound(monkeypatch):
    """In-process (the gateway decodes the answers it reads, downloads too, and replaces one it
    refuses with its refusal: no path through a gateway here keeps an answer compressed to the
    writer; the writer must not rely on that). Before (7686443): inflated to 64 MiB."""
    limits: list[int] = []
    decode = decoding.decode_body
    monkeypatch.setattr(decoding, "decode_body",
                        lambda message, limit: limits.append(limit) or decode(message, limit))
    f = tflow.tflow(resp=True)
    f.response.headers.update({"content-type": "application/octet-stream",
                               "content-encoding": "gzip"})
    f.response.raw_content = gzip.compress(b"\x00" * (8 * 1024**2))
    recorded_flow = writer.recording_of(f.get_state(), frozenset())
    assert limits and max(limits) <= UNREAD_LIMIT, limits
    assert recorded_flow["response"]["content"] == b""
    f.response.headers["content-encoding"] = "gzip"
    f.response.raw_content = gzip.compress(b"the key " + KEY.encode())
    recorded_flow = writer.recording_of(f.get_state(), frozenset())
    assert recorded_flow["response"]["content"] == b"the key <SECRET:detector.secret.aws_access_key>"


def test_a_compressed_download_is_decoded_and_redacted(gw, upstream, token, secrets):
    """The guard through a gateway: a gzip download is delivered as sent, recorded redacted."""
    secrets.add(KEY)
    body = b"binary \x00\x01 then the key " + KEY.encode() + b" end"
    resp = download(gw, upstream, token, body)
    assert resp.status_code == 200 and resp.content == body
    data = recorded(gw, resp.headers["x-douane-decision-id"])
    assert KEY.encode() not in data and b"<SECRET:detector.secret.aws_access_key>" in data
