"""Review (stop 30, second round) of `protocols/http2.py` and the HTTP/2 body framing
(`forwarding.frame_body`): a legitimate HTTP/2 client — the openai SDK on httpx with http2 — goes
through a real gateway as it did through mitmproxy: chat (whole and streamed), a 300 KB prompt (flow control), 16 requests at once on one connection each answered with
its own request's text (an HTTP/1 upstream behind: no answer shifted onto another request, no
body read as a request of its own), and a refused request that leaves the connection usable with
the upstream receiving nothing of it."""

from __future__ import annotations

import asyncio
import json
import ssl

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.test_evasion import H2Only
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

openai = pytest.importorskip("openai")


def echo(handler, req) -> None:
    """Answers a chat with the last message's text (streamed when asked): which request an
    answer belongs to is in it."""
    text = "echo: " + req["messages"][-1]["content"][:64] if isinstance(req, dict) and \
        req.get("messages") else "echo: -"
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    if isinstance(req, dict) and req.get("stream"):
        events = [{**chunk, "choices": [{"index": 0, "delta": {"content": text[i:i + 5]},
                                         "finish_reason": None}]} for i in range(0, len(text), 5)]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        data = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + \
            b"data: [DONE]\n\n"
        ctype = "text/event-stream"
    else:
        data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop", "message": {
                               "role": "assistant", "content": text}}]}).encode()
        ctype = "application/json"
    handler.send_response(200)
    handler.send_header("content-type", ctype)
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    llm = FakeUpstream(tls=True)
    with Gateway(base_config(issuer.url, llm.url + "/v1"), mode="regular",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true"],
                 workdir=tmp_path_factory.mktemp("review30b-h2")) as gw:
        yield gw, llm
    llm.close()


def h2_only(gw) -> ssl.SSLContext:
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=gw.ca_file)
    return verify


def client(gw, token: str) -> tuple[httpx.Client, openai.OpenAI]:
    http = httpx.Client(http2=True, proxy=gw.proxy_url("u", token), verify=h2_only(gw),
                        timeout=120, limits=httpx.Limits(max_connections=1))
    return http, openai.OpenAI(api_key="unused", http_client=http, max_retries=0)


async def sixteen_at_once(gw, token: str, base_url: str) -> list[tuple[int, str, str]]:
    """16 requests at once on one connection, half streamed. On asyncio, not threads: httpcore's
    sync HTTP/2 hands a stream id out unlocked (`get_next_available_stream_id`), so two threads
    could send their heads on one stream — the protocol error douane then refuses (it did in CI
    under load: "Trailers must have END_STREAM set")."""
    async with httpx.AsyncClient(http2=True, proxy=gw.proxy_url("u", token), verify=h2_only(gw),
                                 timeout=120, limits=httpx.Limits(max_connections=1)) as http:
        sdk = openai.AsyncOpenAI(api_key="unused", http_client=http, max_retries=0,
                                 base_url=base_url)

        async def ask(n: int) -> tuple[int, str, str]:
            messages = [{"role": "user", "content": f"request number {n}"}]
            if n % 2:
                chunks = await sdk.chat.completions.create(model="gpt-4o", stream=True,
                                                           messages=messages)
                return n, "".join([c.choices[0].delta.content or "" async for c in chunks
                                   if c.choices]), ""
            raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o",
                                                                      messages=messages)
            return n, raw.parse().choices[0].message.content, raw.http_response.http_version

        return list(await asyncio.gather(*(ask(n) for n in range(16))))


def test_the_openai_sdk_over_http2_goes_through_as_before(setup, issuer):
    gw, llm = setup
    token = issuer.mint("alice@corp", ["engineering"])
    http, sdk = client(gw, token)
    with http:
        sdk.base_url = llm.url + "/v1"
        llm.answer = None
        whole = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
        assert whole.http_response.http_version == "HTTP/2"
        assert whole.parse().choices[0].message.content
        streamed = sdk.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hello"}])
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)

        llm.answer = echo
        big = "word " * 60_000  # 300 KB: past HTTP/2's initial windows
        before = len(llm.requests)
        answer = sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": big}])
        assert answer.choices[0].message.content == "echo: " + big[:64]
        received = llm.requests[before:]
        assert len(received) == 1 and json.loads(received[0].body)["messages"][0]["content"] \
            == big
        assert received[0].headers["content-length"] == str(len(received[0].body))

        before = len(llm.requests)
        answers = asyncio.run(sixteen_at_once(gw, token, llm.url + "/v1"))
        for n, text, version in answers:
            assert text == f"echo: request number {n}"
            assert version in ("", "HTTP/2")
        bodies = sorted(json.loads(r.body)["messages"][0]["content"]
                        for r in llm.requests[before:])
        assert bodies == sorted(f"request number {n}" for n in range(16))

        # refused (an operation douane does not govern): the upstream receives nothing, the
        # connection goes on
        before = len(llm.requests)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            sdk.models.list()
        decision = refused.value.response.headers["x-douane-decision-id"]
        assert gw.audit_record(decision)["action"] in ("block", "refuse")
        assert refused.value.response.http_version == "HTTP/2"
        assert len(llm.requests) == before
        after = sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "still there"}])
        assert after.choices[0].message.content == "echo: still there"
