"""/healthz and /metrics of a real gateway: readiness, values that move with traffic, draining."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.issuer import TestIssuer
from tests.support.upstream import FakeUpstream, Gate

ADMIN = re.compile(r"/healthz and /metrics on http://127\.0\.0\.1:(\d+)")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def admin_url(gw: Gateway, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ADMIN.search(gw.log_text())
        if m:
            return f"http://127.0.0.1:{m.group(1)}"
        time.sleep(0.05)
    raise AssertionError(f"no admin listener in the log:\n{gw.log_text()}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                return float(value)
    return 0.0


def start(config: dict, llm: FakeUpstream, tmp_path, name: str) -> Gateway:
    config.setdefault("gateway", {})["metrics_listen"] = "127.0.0.1:0"
    return Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                   workdir=tmp_path / name)


def test_ready_and_metrics_move_with_traffic(issuer: TestIssuer, llm: FakeUpstream, tmp_path):
    with start(base_config(issuer.url, llm.url), llm, tmp_path, "gw") as gw:
        admin = admin_url(gw)
        deadline = time.monotonic() + 30  # ready once the issuer's keys are fetched
        while (health := httpx.get(admin + "/healthz")).status_code != 200 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.status_code == 200 and health.text == "ready\n"
        before = httpx.get(admin + "/metrics").text
        assert metric(before, "douane_ready") == 1
        assert metric(before, "douane_decisions_total", action="allow") == 0

        token = issuer.mint("alice@corp.example")
        for _ in range(3):
            ok = httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                            headers={"authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        refused = httpx.post(gw.url + "/v1/chat/completions", json=CHAT)
        assert refused.status_code == 401
        rule = gw.audit_record(refused.headers["x-douane-decision-id"])["reasons"][0]["rule"]
        gw.audit_where(lambda r: r.get("action") == "allow", count=3)

        after = httpx.get(admin + "/metrics").text
        assert metric(after, "douane_decisions_total", action="allow", rule="none") == 3
        assert metric(after, "douane_decisions_total", action="refuse", rule=rule) == 1
        assert metric(after, "douane_request_duration_seconds_count", upstream="llm") == 4
        assert metric(after, "douane_event_loop_lag_max_seconds") > 0
        for name in ("douane_pending_approvals", "douane_recording_backlog",
                     "douane_audit_backlog", "douane_flows_in_flight"):
            assert re.search(rf"^{name} ", after, re.M), name
        # bounded labels: no user, token or path reaches a series
        assert "alice" not in after and "/v1/" not in after and token not in after
        # the admin listener is not the proxy: the proxy port does not answer /metrics
        assert "douane_decisions_total" not in httpx.get(gw.url + "/metrics").text


def test_not_ready_without_signing_keys_or_store(llm: FakeUpstream, tmp_path):
    with socket.socket() as s:  # an issuer that answers nothing: its keys cannot be fetched
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = base_config(dead, llm.url)
    config["identity"]["issuers"][0]["jwks_uri"] = dead + "/jwks"
    config["database"] = f"postgresql://douane@{dead.removeprefix('http://')}/douane"
    with start(config, llm, tmp_path, "nokeys") as gw:
        health = httpx.get(admin_url(gw) + "/healthz")
        assert health.status_code == 503
        assert f"keys: the signing keys of issuer {dead} are not fetched yet" in health.text
        assert "store: the shared store has not answered since start-up" in health.text
        assert metric(httpx.get(admin_url(gw) + "/metrics").text, "douane_ready") == 0


def test_draining_on_shutdown_finishes_the_flow_in_flight(issuer: TestIssuer, tmp_path):
    slow = FakeUpstream()
    # the stream's first words, then the upstream holds the rest until the gateway is draining
    # (a stream paced for several seconds did it by time)
    slow.gate = gate = Gate(after=2)
    try:
        gw = start(base_config(issuer.url, slow.url), slow, tmp_path, "drain")
        admin = admin_url(gw)
        token = issuer.mint("alice@corp.example")
        result: dict[str, object] = {}

        def stream() -> None:
            with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60,
                              json={**CHAT, "stream": True},
                              headers={"authorization": f"Bearer {token}"}) as resp:
                result["status"] = resp.status_code
                result["body"] = resp.read()

        client = threading.Thread(target=stream)
        client.start()
        assert gate.reached.wait(30), "the stream never reached the upstream"
        assert gw.proc
        gw.proc.send_signal(signal.SIGTERM)
        draining = httpx.get(admin + "/healthz")
        assert draining.status_code == 503 and draining.text.startswith("draining")
        gate.open()  # the rest of the answer, after the shutdown began
        client.join(60)
        assert result.get("status") == 200 and b"[DONE]" in result["body"]  # type: ignore[operator]
        assert not gate.late
        gw.proc.wait(30)
    finally:
        gate.open()
        gw.stop()
        slow.close()


@pytest.mark.parametrize("listen", ["9464", "host:port", ":9464"])
def test_metrics_listen_must_be_host_port(listen, tmp_path):
    from douane import config as configmod
    file = tmp_path / "c.yaml"
    file.write_text("version: 1\nidentity: {dev_issuer: {enabled: true}}\n"
                    f"gateway: {{metrics_listen: '{listen}'}}\n")
    with pytest.raises(configmod.ConfigError, match="metrics_listen"):
        configmod.load(file)


def test_metrics_count_each_flow_once_with_bounded_labels():
    from mitmproxy.test import tflow

    from douane import admin
    from douane.flowstate import Reason, state

    metrics = admin.Metrics()
    flows = []
    for i in range(admin.MAX_SERIES + 5):
        flow = tflow.tflow(resp=True)
        st = state(flow)
        st.decide("refuse", Reason(f"deny.rule{i}", "x"))
        st.masked = {"EMAIL_ADDRESS": 2}
        st.audited = True
        flows.append(flow)
        metrics.response(flow)
        metrics.error(flow)  # a second hook on the same flow counts nothing
    unaudited = tflow.tflow(resp=True)
    metrics.response(unaudited)  # not recorded (yet): not counted
    value = metrics.registry.get_sample_value
    assert value("douane_decisions_total", {"action": "refuse", "rule": "deny.rule0"}) == 1
    assert value("douane_decisions_total", {"action": "refuse", "rule": "other"}) == 5
    assert value("douane_masked_entities_total", {"entity": "EMAIL_ADDRESS"}) == \
        2 * (admin.MAX_SERIES + 5)
    assert value("douane_request_duration_seconds_count", {"upstream": "none"}) == \
        admin.MAX_SERIES + 5
