"""The replica's admin listener (`gateway.metrics_listen`, off by default): `/healthz` for a load
balancer and `/metrics` for Prometheus, never on the proxy port.

`/healthz` answers 200 only when the configuration is loaded, every issuer's signing keys are
fetched (or kept from an earlier fetch), the shared store (if any) has answered since start-up,
the audit writer runs and, when recording is on, the recording writer runs; otherwise 503 with the reasons. At shutdown it answers 503 "draining" while
the flows in flight finish (at most `douane_drain_seconds`), so a balancer stops sending new ones.

`Metrics` counts each flow once, after its audit record is written. Its labels are bounded: an
action, a rule id, an upstream name or an entity type (all from the code or the configuration),
and at most `MAX_SERIES` distinct values per label before "other": never a user, host or path.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
import weakref
from typing import TYPE_CHECKING

import tornado.httpserver
import tornado.netutil
import tornado.web
from mitmproxy import ctx, http
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from douane.approvals.api import SERVER_LIMITS
from douane.flowstate import peek

if TYPE_CHECKING:
    from douane.approvals.addon import Approvals
    from douane.audit import AuditTrail
    from douane.health import LoopMonitor
    from douane.identity import Authenticate
    from douane.recording.addon import Record
    from douane.settings import Settings
    from douane.store.addon import SharedStore

logger = logging.getLogger(__name__)
MAX_SERIES = 200  # distinct values per label; more are counted as "other"
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Bounded:
    """A label's values: the first MAX_SERIES seen are kept, later ones read "other"."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= MAX_SERIES:
            return "other"
        self.seen.add(value)
        return value


class Metrics:
    """Counts each audited flow once; place it after the audit trail.

    The counts are plain numbers updated on the event loop and read by `/metrics` (served on the
    same loop): prometheus_client's own counters and histograms take a lock and check their
    arguments at each update, ~15 µs a request for these three."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._decisions: dict[tuple[str, str], _Count] = {}
        self._latency: dict[str, _Latency] = {}
        self._masked: dict[str, _Count] = {}
        self.registry.register(_Collector(self))
        self._rule, self._upstream, self._entity = _Bounded(), _Bounded(), _Bounded()

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def _count(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if st is None or not st.audited or st.metered:
            return
        st.metered = True
        decision = st.decision
        action = decision.action if decision else "allow"
        rule = decision.reasons[0].rule if decision and decision.reasons else "none"
        key = (action, self._rule(rule))
        if (count := self._decisions.get(key)) is None:
            count = self._decisions[key] = _Count()
        count.value += 1
        upstream = self._upstream(st.upstream.name if st.upstream else "none")
        if (latency := self._latency.get(upstream)) is None:
            latency = self._latency[upstream] = _Latency()
        latency.observe(time.monotonic() - st.started)
        for entity, n in st.masked.items():
            entity = self._entity(entity)
            if (count := self._masked.get(entity)) is None:
                count = self._masked[entity] = _Count()
            count.value += n


class _Count:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()


class _Latency:
    """A histogram's series: the count in each bucket (not cumulative), the sum."""

    __slots__ = ("buckets", "sum", "created")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: bound included
        self.sum += seconds


class _Collector(Collector):
    """`Metrics`' series as prometheus_client would write its Counter and Histogram."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        decisions = CounterMetricFamily("douane_decisions", "Flow decisions by action and first "
                                        "reason rule", labels=("action", "rule"))
        for labels, count in m._decisions.items():
            decisions.add_metric(labels, count.value, created=count.created)
        yield decisions
        latency = HistogramMetricFamily("douane_request_duration_seconds", "Time from the first "
                                        "hook to the audit record, by upstream",
                                        labels=("upstream",))
        bounds = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]
        for upstream, series in m._latency.items():
            cumulative = list(itertools.accumulate(series.buckets))
            latency.add_metric((upstream,), list(zip(bounds, cumulative, strict=True)), series.sum)
            latency.samples.append(Sample("douane_request_duration_seconds_created",
                                          {"upstream": upstream}, series.created))
        yield latency
        masked = CounterMetricFamily("douane_masked_entities", "Entities masked, by type",
                                     labels=("entity",))
        for entity, count in m._masked.items():
            masked.add_metric((entity,), count.value, created=count.created)
        yield masked


class _Health(tornado.web.RequestHandler):
    def initialize(self, admin: Admin) -> None:
        self.admin = admin

    def get(self) -> None:
        problems = self.admin.problems()
        self.set_status(503 if problems else 200)
        self.set_header("content-type", "text/plain; charset=utf-8")
        self.set_header("cache-control", "no-store")
        self.finish("\n".join(problems) + "\n" if problems else "ready\n")


class _Metrics(tornado.web.RequestHandler):
    def initialize(self, admin: Admin) -> None:
        self.admin = admin

    def get(self) -> None:
        self.set_header("content-type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.admin.metrics.registry))


class Admin:
    """Serves /healthz and /metrics; tracks the flows in flight for draining. Place it early:
    its `done` waits for them before the writers close."""

    def __init__(self, settings: Settings, metrics: Metrics, loop: LoopMonitor,
                 authenticate: Authenticate, audit: AuditTrail, record: Record,
                 approvals: Approvals, shared: SharedStore):
        self.settings, self.metrics, self.loop, self.shared = settings, metrics, loop, shared
        self.authenticate, self.audit, self.record = authenticate, audit, record
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port: int | None = None
        self.started = self.draining = False
        self.in_flight: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        registry = metrics.registry
        Gauge("douane_ready", "1 when /healthz answers 200", registry=registry) \
            .set_function(lambda: 0 if self.problems() else 1)
        Gauge("douane_flows_in_flight", "Flows between request and response",
              registry=registry).set_function(lambda: len(self.in_flight))
        Gauge("douane_pending_approvals", "Approval requests waiting for an approver",
              registry=registry).set_function(lambda: len(approvals.open_requests()))
        Gauge("douane_event_loop_lag_seconds", "The last event-loop lag sample",
              registry=registry).set_function(lambda: loop.lag_ms / 1000)
        Gauge("douane_event_loop_lag_max_seconds", "The largest event-loop lag since start",
              registry=registry).set_function(lambda: loop.max_lag_ms / 1000)
        Gauge("douane_event_loop_stalls", "Event-loop lag samples over 10 ms since start",
              registry=registry).set_function(lambda: loop.over_10ms)
        Gauge("douane_audit_backlog", "Audit records queued for the writer",
              registry=registry).set_function(lambda: audit.log.backlog if audit.log else 0)
        Gauge("douane_recording_backlog", "Recordings queued for the recording writer",
              registry=registry).set_function(
                  lambda: record.writer.backlog if record.writer else 0)

    def load(self, loader) -> None:
        loader.add_option("douane_metrics_listen", str, "",
                          "HOST:PORT of /healthz and /metrics (overrides gateway.metrics_listen; "
                          "one per worker).")
        loader.add_option("douane_drain_seconds", int, 10,
                          "At shutdown, how long /healthz answers 503 draining while the flows "
                          "in flight finish.")

    def running(self) -> None:
        self.started = True
        listen = ctx.options.douane_metrics_listen or self.settings.config.metrics_listen
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        app = tornado.web.Application([(r"/healthz", _Health, {"admin": self}),
                                       (r"/metrics", _Metrics, {"admin": self})],
                                      log_function=lambda _: None)  # probed every second
        try:
            sockets = tornado.netutil.bind_sockets(int(port), host)
        except (OSError, ValueError) as e:
            logger.error("douane: cannot serve /healthz and /metrics on %s: %s", listen, e)
            ctx.master.shutdown()
            return
        self.port = sockets[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(app, xheaders=False, **SERVER_LIMITS)
        self.server.add_sockets(sockets)
        logger.info("douane: /healthz and /metrics on http://%s:%d", host, self.port)

    async def done(self) -> None:
        self.draining = True
        deadline = time.monotonic() + ctx.options.douane_drain_seconds
        if self._draining():
            logger.info("douane: draining %d flow(s) in flight", len(self._draining()))
        while self._draining() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.server:
            self.server.stop()
            self.server = None

    def _draining(self) -> list[http.HTTPFlow]:
        # A flow held for an approver is not waited for: Approvals.done, after this, refuses it.
        return [f for f in self.in_flight if not f.intercepted]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self.in_flight.add(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow)

    def problems(self) -> list[str]:
        """Why this replica should get no traffic; empty when it is ready."""
        if self.draining:
            return ["draining: shutting down, finishing the flows in flight"]
        if not self.started or self.settings.config is None:
            return ["starting: the configuration is not loaded"]
        out = []
        verifier = self.authenticate.verifier
        for issuer, keyset in (verifier.keysets.items() if verifier else ()):
            if not keyset.keys:
                out.append(f"keys: the signing keys of issuer {issuer} are not fetched yet")
        # not during a later outage: every replica would leave the balancer, and clients would
        # get closed connections instead of clear refusals
        if self.shared.pg is not None and not self.shared.pg.ready:
            out.append("store: the shared store has not answered since start-up")
        if self.audit.log is None or not self.audit.log.ready:
            out.append("audit: the audit log cannot be written")
        if self.record.recording and (self.record.writer is None or
                                      not self.record.writer.healthy):
            out.append("recording: the recording writer is not running")
        return out
