"""Review, stop 33: a data URL whose percent-encoded text holds a lone surrogate escape
(`"data:,\\ud83d..."`, valid JSON) made `fields._payload` raise UnicodeEncodeError
(`urllib.parse.unquote_to_bytes` encodes its text to UTF-8): in the gateway an unexpected
error (a 500 of douane's, not the client's 400), and in the recording writer the flow was not
recorded at all (and the recording marked unhealthy until the next flow): a client could keep
its own request out of the recordings. It is now an invalid data URL like an invalid base64 one:
refused 400 invalid_data_url, recorded, its secret redacted."""

from __future__ import annotations

import time

import httpx
import pytest

from douane.protocols import fields
from douane.recording import writer
from tests.hardening.conftest import recording_gateway
from tests.hardening.test_evasion import _recordings

PATH = "/v1/chat/completions"
KEY = "AKIAIOSFODNN7EXAMPLE"
VALUE = "data:text/plain,\\ud83d" + KEY  # as a JSON literal's text


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("review33")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("surrogate@corp.example", ["engineering"])
    secrets.add(token)
    return token


def test_the_writer_redacts_it():
    body = '{"messages": [{"role": "user", "content": "' + VALUE + '"}]}'
    assert KEY not in writer._redacted(body, "application/json")
    assert fields.file_text("data:," + chr(0xD83D) + "x") is None


def test_refused_as_the_client_s_error_and_recorded(gw, llm, token):
    before = len(llm.requests)
    body = ('{"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", '
            '"content": "' + VALUE + '"}]}').encode()
    resp = httpx.post(gw.url + PATH, content=body, timeout=60,
                      headers={"authorization": f"Bearer {token}",
                               "content-type": "application/json"})
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])
    assert "invalid_data_url" in resp.text
    assert len(llm.requests) == before
    decision_id = resp.headers["x-douane-decision-id"]
    deadline = time.monotonic() + 30
    while decision_id.encode() not in (data := b"".join(p.read_bytes() for p in _recordings(gw))):
        assert time.monotonic() < deadline, "the flow was not recorded"
        time.sleep(0.2)
    assert KEY.encode() not in data
