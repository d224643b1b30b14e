"""Masked streams ending together do not stall the gateway: 32 streams through a real mitmdump at a
model's pace (50 events a second), over HTTP/1.1 and HTTP/2, end while the masking analysis of
their held tails is slow (the gateway's masking workers are stopped for `HOLD` seconds from the
moment the first upstream has sent all of its answer). Meanwhile the gateway keeps answering
other flows: requests it refuses itself, from another process, none waiting `REFUSAL_SECONDS`
of the hold, and over HTTP/2 requests on a connection whose streams are waiting. Every stream still reads
exactly the whole answer masked, and no masked value is in any event.

Before the stream's layer paused on the wait (`protocols.streamwait`), the first end in the hold
blocked the event loop until the workers came back: every flow of the process waited with it.
Slowness comes from stopped processes, not from CPU, so a loaded machine does not make the
difference: it can only make the refusals slower, never the old stall shorter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.test_evasion import H2Only
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream
from tests.test_admin_e2e import admin_url, metric
from tests.test_masking_stream import CORPUS, strings

ANSWER = "\n\n".join(CORPUS[i] for i in (6, 8, 9, 10, 11, 16, 17, 20))  # 900 characters
VALUES = ("Sarah Johnson", "(212) 555-0183", "emily.r@example.com", "078-05-1120", "219-09-9999",
          "4111 1111 1111 1111", "fatima@example.ae")
STREAMS = 32
HOLD = 6.0  # seconds the masking workers are stopped
REFUSAL_SECONDS = 3.0  # the longest a refusal waits for its answer while they are


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    llm, probe = FakeUpstream(tls=True), FakeUpstream(tls=True)
    llm.reply, llm.chunk_size, llm.chunk_delay = ANSWER, 16, 0.02  # 50 events a second
    probe.reply = "Yes."  # nothing to analyse: the probe waits for no worker
    config = base_config(issuer.url, llm.url, masking={
        "workers": 1, "requests": False, "timeout_seconds": 120},
        gateway={"metrics_listen": "127.0.0.1:0"})  # flows in flight
    config["upstreams"]["probe"] = {"url": probe.url + "/v1", "protocol": "openai",
                                    "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true"],
                 workdir=tmp_path_factory.mktemp("stream-ends")) as gw:
        yield gw, llm, probe
    llm.close()
    probe.close()


def chat(stream: bool) -> dict:
    return {"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "?"}]}


def masking_workers(gateway_pid: int) -> list[int]:
    """The gateway's descendants that loaded spaCy: the workers and the process they are forked
    from (`masking/pool.py`'s zygote; the workers are its children, not the gateway's)."""
    found, todo = [], [gateway_pid]
    while todo:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{todo.pop()}/task").iterdir():
                for child in map(int, (task / "children").read_text().split()):
                    todo.append(child)
                    with contextlib.suppress(OSError):
                        if "spacy" in Path(f"/proc/{child}/maps").read_text():
                            found.append(child)
    return found


def holding(workers: list[int], llm: FakeUpstream, held: list[float]) -> None:
    """Stop the workers once the first upstream has sent all of its answer, for `HOLD` s."""
    deadline = time.monotonic() + 120
    while not llm.stream_ends and time.monotonic() < deadline:
        time.sleep(0.005)
    held.append(time.monotonic())
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(HOLD)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        held.append(time.monotonic())


def refusing(gw, token: str, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """A flow the gateway answers itself (an undeclared host is refused), from another process
    (curl): how long it takes is the gateway's, not this test's."""
    while not stop.is_set():
        start = time.monotonic()
        done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                               gw.proxy_url("u", token), "http://undeclared.invalid/v1/models"],
                              capture_output=True, timeout=120)
        out.append((start, time.monotonic()))
        assert done.stdout == b"403", done.stdout
        stop.wait(0.05)


async def ends_together(gw, llm, probe, token: str, h2: bool) -> dict:
    """32 streams at once (over HTTP/1.1 a connection each; over HTTP/2 4 on each of 8
    connections: httpx keeps about 5 streams of a connection open at once), the workers stopped
    as they end; until they have ended, a refusal every 50 ms and (on the first connection) a
    probe every 50 ms."""
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT) if h2 else ssl.create_default_context()
    verify.load_verify_locations(cafile=gw.ca_file)
    clients = [httpx.AsyncClient(http2=h2, proxy=gw.proxy_url("u", token), verify=verify,
                                 timeout=180, limits=httpx.Limits(max_connections=64))
               for _ in range(8 if h2 else 1)]
    version = "HTTP/2" if h2 else "HTTP/1.1"
    out: dict = {"probes": [], "refusals": [], "held": []}
    streaming = True

    async def probing(client: httpx.AsyncClient) -> None:
        while streaming:
            start = time.monotonic()
            resp = await client.post(probe.url + "/v1/chat/completions", json=chat(False))
            out["probes"].append((start, time.monotonic()))
            assert resp.status_code == 200 and resp.http_version == version, resp.text
            await asyncio.sleep(0.05)

    async def one(client: httpx.AsyncClient) -> tuple[list, float]:
        events = []
        async with client.stream("POST", llm.url + "/v1/chat/completions",
                                 json=chat(True)) as resp:
            assert resp.http_version == version
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line.removeprefix("data: ")))
        return events, time.monotonic()

    try:
        answers = await asyncio.gather(*(c.post(llm.url + "/v1/chat/completions",
                                                json=chat(False)) for c in clients))
        out["whole"] = answers[0].json()["choices"][0]["message"]["content"]
        out["workers"] = masking_workers(gw.proc.pid)
        llm.stream_ends.clear()
        stop = threading.Event()
        threads = [threading.Thread(target=holding, args=(out["workers"], llm, out["held"])),
                   threading.Thread(target=refusing, args=(gw, token, stop, out["refusals"]))]
        for thread in threads:
            thread.start()
        prober = asyncio.create_task(probing(clients[0]))
        try:
            out["streams"] = await asyncio.gather(*(one(clients[n % len(clients)])
                                                    for n in range(STREAMS)))
        finally:
            streaming = False
            stop.set()
            await prober
            for thread in threads:
                await asyncio.to_thread(thread.join)
    finally:
        for client in clients:
            await client.aclose()
    return out


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_masked_streams_ending_together_leave_the_gateway_serving(setup, issuer, h2):
    gw, llm, probe = setup
    token = issuer.mint("alice@corp", ["engineering"])
    out = asyncio.run(ends_together(gw, llm, probe, token, h2))
    whole, streams, (held, resumed) = out["whole"], out["streams"], out["held"]
    assert not [v for v in VALUES if v in whole] and "<PERSON>" in whole
    for events, _ in streams:
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        assert text == whole
        assert not [v for e in events for s in strings(e) for v in VALUES if v in s]
    # main + urgent (+ the zygote they are forked from)
    assert len(out["workers"]) >= 2 and len(llm.stream_ends) == STREAMS

    def ending(t: float) -> int:  # streams the upstream had ended whose client had not read it
        return sum(e <= t for e in llm.stream_ends) - sum(end <= t for _, end in streams)

    def meanwhile(calls: list[tuple[float, float]]) -> list[float]:
        """How long each call waited while the workers were stopped."""
        return [end - max(start, held) for start, end in calls if start < resumed and end > held]

    most = max(ending(t) for t in [held, *llm.stream_ends] if held <= t <= resumed)
    refusals = meanwhile(out["refusals"])
    print(f"{most} streams ending at once while the workers were stopped; "
          f"{len(refusals)} refusals meanwhile, the slowest {max(refusals, default=0):.2f} s, "
          f"{len(meanwhile(out['probes']))} probes")
    assert refusals and max(refusals) < REFUSAL_SECONDS
    assert most >= 8, "the streams did not end together"
    # on the connection of streams that wait, a request is answered too
    assert meanwhile(out["probes"])


async def left_while_ending(gw, llm, token: str, h2: bool) -> list[str]:
    """Streams on one connection (4 over HTTP/2), the workers stopped once the upstream has
    every request; once it has sent all of every answer (each stream's end waits for its
    analysis), the client goes (its connection closed), then the workers come back. What the
    client had read by then."""
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT) if h2 else ssl.create_default_context()
    verify.load_verify_locations(cafile=gw.ca_file)
    read: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", llm.url + "/v1/chat/completions",
                                 json=chat(True)) as resp:
            async for line in resp.aiter_lines():
                read.append(line)

    workers = masking_workers(gw.proc.pid)
    client = httpx.AsyncClient(http2=h2, proxy=gw.proxy_url("u", token), verify=verify,
                               timeout=180, limits=httpx.Limits(max_connections=1))
    llm.stream_ends.clear()
    asked, deadline = len(llm.requests), time.monotonic() + 60
    tasks = [asyncio.create_task(one(client)) for _ in range(4 if h2 else 1)]
    # (httpx opens one stream of a new HTTP/2 connection, the others once it has ended)
    while len(llm.requests) - asked < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        while len(llm.stream_ends) < len(tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(llm.stream_ends) == len(tasks), "not every answer was sent by the upstream"
        await asyncio.sleep(0.2)  # the last events reached the gateway
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await asyncio.sleep(0.5)  # the gateway saw the connection close
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    return read


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_a_client_gone_while_its_streams_wait_leaves_nothing_behind(setup, issuer, h2):
    """The client closes its connection while its streams' ends wait for their analyses: once
    those are done, the flows end (none left in flight), the held tails go nowhere, nothing
    fails, and the next stream is masked as before."""
    gw, llm, probe = setup
    token = issuer.mint("alice@corp", ["engineering"])
    whole = httpx.post(llm.url + "/v1/chat/completions", json=chat(False), verify=False,
                       proxy=gw.proxy_url("u", token), timeout=120).json()[
        "choices"][0]["message"]["content"]
    log_before = len(gw.log_text())
    read = asyncio.run(left_while_ending(gw, llm, token, h2))
    assert "4111" not in "".join(read) and "Sarah Johnson" not in "".join(read)
    admin, deadline = admin_url(gw), time.monotonic() + 60
    while metric(httpx.get(admin + "/metrics").text, "douane_flows_in_flight") and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(httpx.get(admin + "/metrics").text, "douane_flows_in_flight") == 0
    log = gw.log_text()[log_before:]
    assert not [w for w in ("Traceback", "crashed", "Addon error", "Task was destroyed")
                if w in log], log[-3000:]
    with httpx.Client(proxy=gw.proxy_url("u", token), verify=False, timeout=120) as client, \
            client.stream("POST", llm.url + "/v1/chat/completions", json=chat(True)) as resp:
        events = [json.loads(line.removeprefix("data: ")) for line in resp.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["delta"].get("content") or "" for e in events
                   for c in e["choices"]) == whole
