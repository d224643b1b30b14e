"""Review (stop 30, second round) of `admin.Metrics`' own collector (45e04dd): for the same
traffic its /metrics exposition is the one prometheus_client's Counter and Histogram wrote before
(names, HELP/TYPE, labels, bucket bounds, counts, sums; only `_created` timestamps differ), and
no label takes more than MAX_SERIES client-chosen values."""

from __future__ import annotations

import random
import re
import time
import types

from mitmproxy.test import tflow
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from douane import admin
from douane.flowstate import Reason, state

NOW = 0.0  # NOW - started is exactly the latency chosen (bucket bounds included)


def reference() -> tuple[CollectorRegistry, callable]:
    """The stop-29 Metrics' series (prometheus_client's own), fed the same way."""
    registry = CollectorRegistry(auto_describe=True)
    decisions = Counter("douane_decisions", "Flow decisions by action and first reason rule",
                        ("action", "rule"), registry=registry)
    latency = Histogram("douane_request_duration_seconds", "Time from the first hook to the "
                        "audit record, by upstream", ("upstream",),
                        buckets=admin.LATENCY_BUCKETS, registry=registry)
    masked = Counter("douane_masked_entities", "Entities masked, by type", ("entity",),
                     registry=registry)
    rule, upstream, entity = admin._Bounded(), admin._Bounded(), admin._Bounded()

    def count(st) -> None:
        d = st.decision
        decisions.labels(d.action if d else "allow",
                         rule(d.reasons[0].rule if d and d.reasons else "none")).inc()
        latency.labels(upstream(st.upstream.name if st.upstream else "none")).observe(
            NOW - st.started)
        for name, n in st.masked.items():
            masked.labels(entity(name)).inc(n)

    return registry, count


def exposition(registry) -> str:
    text = generate_latest(registry).decode()
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)


def upstream(name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(name=name)  # Metrics reads only its name


def test_metrics_exposition_is_prometheus_clients_for_the_same_traffic(monkeypatch):
    monkeypatch.setattr(admin, "time", types.SimpleNamespace(monotonic=lambda: NOW,
                                                            time=time.time))
    rng = random.Random(30)
    metrics = admin.Metrics()
    registry, count = reference()
    assert exposition(metrics.registry) == exposition(registry)  # nothing counted yet
    bounds = [*admin.LATENCY_BUCKETS, 0.0, 1e-9, 301.0, 10_000.0]
    for i in range(3_000):
        flow = tflow.tflow(resp=True)
        st = state(flow)
        kind = rng.random()
        if kind < 0.3:
            st.decide(rng.choice(["refuse", "block", "hold", "error"]),
                      Reason(f"deny.r{rng.randrange(260)}", "x"))  # past MAX_SERIES
        elif kind < 0.5:
            st.decide("mask")  # no reason
        elif kind < 0.6:
            st.decide("allow", Reason("allow.x", "y"), Reason("second", "z"))
        if rng.random() < 0.8:
            st.upstream = upstream(f"u{rng.randrange(230)}")
        if rng.random() < 0.3:
            st.masked = {f"E{rng.randrange(210)}": rng.randint(1, 5),
                         "PERSON": rng.randint(1, 3)}
        st.started = NOW - (rng.choice(bounds) if rng.random() < 0.3 else rng.expovariate(5))
        st.audited = rng.random() < 0.95
        hook = rng.choice([metrics.response, metrics.error, metrics.http_connect])
        hook(flow)
        if st.audited:
            count(st)
        metrics.response(flow)  # counted once
        if i % 500 == 0:
            assert exposition(metrics.registry) == exposition(registry)
    mine, theirs = exposition(metrics.registry), exposition(registry)
    assert mine == theirs
    assert 'rule="other"' in mine and 'upstream="other"' in mine and 'entity="other"' in mine
    for label in ("rule", "upstream", "entity"):
        values = set(re.findall(label + r'="([^"]*)"', mine))
        assert len(values) <= admin.MAX_SERIES + 2  # "other", "none"
