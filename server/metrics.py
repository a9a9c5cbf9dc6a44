"""Prometheus metrics (``GET /metrics``) and the per-prompt log lines.

Each application owns a private ``CollectorRegistry`` (several servers may share one process, as in the
tests); the process-wide default registry is never touched.

Two sources feed it:

- **Events.** ``EventRouter.dispatch`` hands every engine event of a job to ``Metrics.observe`` (one hook,
  guarded there so a metrics bug never breaks dispatch). Outcomes, node durations, cache hits and misses
  and the "started"/"finished"/"failed" log lines come from there. Node durations are measured on the
  server, from a node's ``NodeStarted`` to the next ``NodeStarted`` of the prompt, its own ``NodeOutput`` or
  the prompt's end (whichever comes first), summed over re-stages of a lazy node and observed once when the
  prompt ends; so their resolution is the event hand-over (a few milliseconds), and async nodes running
  side by side are each measured until the next node starts. Prompt durations use the engine's own event
  timestamps.
- **Scrape time.** A custom collector reads the queue (``svc.pending``, ``svc.running`` or
  ``svc.running_jobs()``), the workers (``svc.workers_info`` when the service has it, else one in-process
  worker), the hub's sockets and bytes sent, and the model managers' counters, so none of these cost
  anything between scrapes.

``prompt_accepted(svc, job)`` logs the "accepted" line and counts it; the service calls it when
it enqueues a prompt.

**Tracing** (optional: ``kiln serve --otel``, the OpenTelemetry SDK installed): the same event stream makes a
span per prompt (from the engine's start and end timestamps) and a span per node run, a child of the
prompt's; the trace id is logged with the "started" line and kept on the job as ``trace_id``. Metrics, log
lines and spans are one module because they are one reading of the same events, kept per running prompt.
"""

from __future__ import annotations

import logging
import sys
import time
from bisect import bisect_left
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from kiln.engine import events as ev
from kiln.engine.errors import KilnError

log = logging.getLogger("kiln.server")

# node and prompt durations: from a trivial node to a long sampling run
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OUTCOMES = {ev.ExecutionSuccess: "success", ev.ExecutionError: "error", ev.ExecutionInterrupted: "interrupted"}
INPROC_WORKER = "inproc"


class _Hist:
    """One histogram series as plain numbers: an observation is a bisect and two additions (no lock)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket (not cumulative); the last is +Inf
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, v)] += 1
        self.total += v

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.counts):
            acc += n
            out.append((bound, acc))
        return out


@dataclass
class _Run:
    """What the metrics keep about one running prompt (dropped when it ends)."""

    started_ms: int | None = None  # ExecutionStart's timestamp
    open_node: str | None = None  # the node being timed
    open_since: float = 0.0  # monotonic
    seconds: dict[str, float] = field(default_factory=dict)  # node -> time measured so far
    classes: dict[str, str] = field(default_factory=dict)  # node -> class_type
    display: dict[str, str] = field(default_factory=dict)  # node -> the id a user sees
    cached: int = 0
    span: Any = None  # with tracing: the prompt's span, the context its node spans start in, the open node's
    context: Any = None
    node_span: Any = None


class Metrics:
    """One application's metrics: event-fed numbers and the collector that exports them with the service's
    state. Fed and scraped on the event loop thread; plain numbers, so a 500-node prompt costs microseconds."""

    def __init__(self, svc: Any):
        self.svc = svc
        self.accepted = 0
        self.outcomes = dict.fromkeys(OUTCOMES.values(), 0)  # every outcome is exported from the start (at 0)
        self.prompt_seconds: dict[str, _Hist] = {}  # outcome -> histogram
        self.node_seconds: dict[str, _Hist] = {}  # class_type -> histogram
        self.cache_hits = 0
        self.cache_misses = 0
        self.runs: dict[str, _Run] = {}
        self._failed: set[str] = set()  # event types whose observation raised (logged once each)
        self.tracer: Any = None  # an OpenTelemetry tracer (``set_tracer``): spans per prompt and per node
        self._otel: Any = None  # the opentelemetry.trace module, once tracing is on
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- events -------------------------------------------------------------------------------------
    def observe(self, job: Any, event: ev.Event) -> None:
        """Count one dispatched event of ``job``; never raises (a failure is logged once per event type)."""
        handler = self._handlers.get(type(event))  # progress ticks (the most frequent events) miss here
        if handler is None:
            return
        try:
            handler(self, job, event)
        except Exception:
            name = type(event).__name__
            if name not in self._failed:
                self._failed.add(name)
                log.exception("metrics: observing a %s event failed (further failures are not logged)", name)

    def _node_started(self, job: Any, event: ev.NodeStarted) -> None:
        run = self.runs.get(event.prompt_id)
        if run is None:
            run = self.runs[event.prompt_id] = _Run()
        now = time.monotonic()
        if run.open_node is not None:
            self._close(run, now)
        if run.context is not None:
            run.node_span = self.tracer.start_span(
                f"node {event.class_type}",
                context=run.context,
                attributes={
                    "kiln.node_id": event.node,
                    "kiln.display_node": event.display_node,
                    "kiln.class_type": event.class_type,
                },
            )
        node = event.node
        if node not in run.seconds:
            run.seconds[node] = 0.0
            run.classes[node] = event.class_type
            run.display[node] = event.display_node
            self.cache_misses += 1
        run.open_node, run.open_since = node, now

    def _node_output(self, job: Any, event: ev.NodeOutput) -> None:
        run = self.runs.get(event.prompt_id)
        if run is not None and run.open_node == event.node:
            self._close(run, time.monotonic())

    def _cached(self, job: Any, event: ev.ExecutionCached) -> None:
        n = len(event.nodes)
        self.runs.setdefault(event.prompt_id, _Run()).cached += n
        self.cache_hits += n

    def _started(self, job: Any, event: ev.ExecutionStart) -> None:
        old = self.runs.get(event.prompt_id)
        if old is not None and old.span is not None:  # a re-run (its worker was lost): close the attempt's spans
            for span in (old.node_span, old.span):
                if span is not None:
                    span.set_attribute("kiln.outcome", "rerun")
                    span.end()
        run = self.runs[event.prompt_id] = _Run(started_ms=event.timestamp)
        worker = _worker_of(job)
        if self.tracer is None:
            log.info("prompt %s started on worker %s", event.prompt_id, worker)
            return
        attributes = {"kiln.prompt_id": event.prompt_id, "kiln.worker": worker}
        if getattr(job, "client_id", None) is not None:
            attributes["kiln.client_id"] = job.client_id
        run.span = self.tracer.start_span("prompt", start_time=event.timestamp * 1_000_000, attributes=attributes)
        run.context = self._otel.set_span_in_context(run.span)
        trace_id = f"{run.span.get_span_context().trace_id:032x}"
        with suppress(AttributeError):  # kept on the job for its history entry
            job.trace_id = trace_id
        log.info("prompt %s started on worker %s (trace %s)", event.prompt_id, worker, trace_id)

    @staticmethod
    def _close(run: _Run, now: float) -> None:
        if run.open_node is not None:
            run.seconds[run.open_node] += now - run.open_since
            run.open_node = None
        if run.node_span is not None:
            run.node_span.end()
            run.node_span = None

    def _end(self, job: Any, event: ev.ExecutionSuccess | ev.ExecutionError | ev.ExecutionInterrupted) -> None:
        outcome = OUTCOMES[type(event)]
        run = self.runs.pop(event.prompt_id, None) or _Run()
        stopped = None
        at = getattr(event, "node_id", None)
        if run.open_node is not None and at is not None and at in (run.open_node, run.display.get(run.open_node)):
            stopped = run.open_node  # the node that failed or was stopped did not complete: not a duration
            run.open_node = None
            if run.node_span is not None:
                self._span_failed(run.node_span, event)
        self._close(run, time.monotonic())
        hists = self.node_seconds
        for node, seconds in run.seconds.items():
            if node != stopped:
                ct = run.classes[node]
                h = hists.get(ct)
                if h is None:
                    h = hists[ct] = _Hist()
                h.observe(seconds)
        self.outcomes[outcome] += 1
        pid = event.prompt_id
        if run.started_ms is None:  # interrupted (or failed) before it ever started
            log.info("prompt %s %s before it started", pid, "interrupted" if outcome == "interrupted" else "failed")
            return
        seconds = max(0.0, (event.timestamp - run.started_ms) / 1000)
        h = self.prompt_seconds.get(outcome)
        if h is None:
            h = self.prompt_seconds[outcome] = _Hist()
        h.observe(seconds)
        ran, cached = len(run.seconds), run.cached
        if run.span is not None:
            run.span.set_attributes({"kiln.outcome": outcome, "kiln.nodes_run": ran, "kiln.nodes_cached": cached})
            if outcome != "success":
                self._span_failed(run.span, event, end=False)
            run.span.end(end_time=event.timestamp * 1_000_000)
        if isinstance(event, ev.ExecutionSuccess):
            log.info("prompt %s finished in %.3f s (%d nodes run, %d cached)", pid, seconds, ran, cached)
        elif isinstance(event, ev.ExecutionError):
            log.info(
                "prompt %s failed at node %s (%s) after %.3f s: %s",
                pid,
                event.node_id,
                event.node_type,
                seconds,
                event.message[:200],
            )
        else:
            log.info("prompt %s interrupted at node %s (%s) after %.3f s", pid, event.node_id, event.node_type, seconds)

    def _span_failed(self, span: Any, event: ev.Event, end: bool = True) -> None:
        if isinstance(event, ev.ExecutionError):
            span.set_status(self._otel.Status(self._otel.StatusCode.ERROR, event.message[:200]))
            span.set_attribute("kiln.exception_type", event.exception_type)
        else:
            span.set_attribute("kiln.interrupted", True)
        if end:
            span.end()

    def set_tracer(self, tracer: Any) -> None:
        """Turn tracing on with an OpenTelemetry tracer (None turns it off); prompts that start later get spans."""
        if tracer is not None:
            from opentelemetry import trace

            self._otel = trace
        self.tracer = tracer

    _handlers: dict[type, Any] = {
        ev.NodeStarted: _node_started,
        ev.NodeOutput: _node_output,
        ev.ExecutionCached: _cached,
        ev.ExecutionStart: _started,
        ev.ExecutionSuccess: _end,
        ev.ExecutionError: _end,
        ev.ExecutionInterrupted: _end,
    }

    def accepted_prompt(self, job: Any) -> None:
        self.accepted += 1
        graph = getattr(job, "graph", None)
        nodes = len(graph.nodes) if graph is not None else 0
        log.info("prompt %s accepted: %d nodes, client %s", job.prompt_id, nodes, job.client_id)

    # -- exposition ---------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _worker_of(job: Any) -> str:
    """The name of the worker a job runs on (its slot's ``name``, or the name itself)."""
    worker = getattr(job, "worker", None)
    if worker is None:
        return INPROC_WORKER
    return str(worker if isinstance(worker, str) else getattr(worker, "name", None) or INPROC_WORKER)


class _Collector(Collector):
    """Exports the event-fed numbers, and reads the service's state when scraped: queue depth, workers,
    sockets, bytes sent, model counters."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # collected fresh each scrape; nothing to describe up front

    def collect(self) -> Iterable[Metric]:
        yield from self._events()
        yield from self._state()

    def _events(self) -> Iterable[Metric]:
        m = self.metrics
        yield CounterMetricFamily("kiln_prompts_accepted", "Prompts accepted into the queue", value=m.accepted)
        done = CounterMetricFamily("kiln_prompts_finished", "Prompts finished, by outcome", labels=["outcome"])
        for outcome, n in m.outcomes.items():
            done.add_metric([outcome], n)
        yield done
        yield _histogram(
            "kiln_prompt_duration_seconds",
            "Time from a prompt's start to its end, by outcome",
            "outcome",
            m.prompt_seconds,
        )
        yield _histogram(
            "kiln_node_duration_seconds",
            "Time a node ran (measured from the event stream), by class_type; nodes of failed or interrupted "
            "prompts that completed are included, the node that failed or was stopped is not",
            "class_type",
            m.node_seconds,
        )
        yield CounterMetricFamily(
            "kiln_node_cache_hits", "Nodes served from the node cache (execution_cached)", value=m.cache_hits
        )
        yield CounterMetricFamily(
            "kiln_node_cache_misses", "Nodes executed (not served from the cache)", value=m.cache_misses
        )

    def _state(self) -> Iterable[Metric]:
        svc = self.metrics.svc
        running = _running_jobs(svc)
        queue = GaugeMetricFamily("kiln_queue_depth", "Prompts in the queue, by state", labels=["state"])
        queue.add_metric(["pending"], len(getattr(svc, "pending", {}) or {}))
        queue.add_metric(["running"], len(running))
        yield queue

        workers = GaugeMetricFamily("kiln_workers", "Workers, by state", labels=["state"])
        states: dict[str, int] = {}
        infos = getattr(svc, "workers_info", None)
        if callable(infos):
            infos = infos()
        if infos is None:  # one worker thread in this process
            states = {"busy": 1 if running else 0, "idle": 0 if running else 1}
        else:
            for w in infos:
                st = str(w.get("state", "unknown")) if isinstance(w, dict) else "unknown"
                states[st] = states.get(st, 0) + 1
        for st, n in sorted(states.items()):
            workers.add_metric([st], n)
        yield workers
        yield CounterMetricFamily(
            "kiln_worker_leases_expired",
            "Workers ended because their heartbeats stopped while they held a prompt's lease",
            value=getattr(svc, "leases_expired", 0),
        )

        hub = getattr(svc, "hub", None)
        if hub is not None:
            yield GaugeMetricFamily("kiln_websocket_clients", "Connected websocket clients", value=hub.count())
            sent = getattr(hub, "bytes_sent", None)
            if sent is not None:
                yield CounterMetricFamily("kiln_websocket_sent_bytes", "Bytes written to websocket clients", value=sent)
        yield from _model_metrics(svc, infos)


def _histogram(name: str, doc: str, label: str, series: dict[str, _Hist]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in list(series.items()):
        fam.add_metric([value], h.buckets(), h.total)
    return fam


def _running_jobs(svc: Any) -> list:
    fn = getattr(svc, "running_jobs", None)
    if callable(fn):
        return list(fn())
    runs = getattr(svc, "runs", None)  # prompt id -> running job, when several run at once
    if isinstance(runs, dict):
        return list(runs.values())
    job = getattr(svc, "running", None)
    return [job] if job is not None else []


def _managers(svc: Any) -> list:
    """The model managers this process holds: the executor's service, else the process-wide default."""
    found = []
    services = getattr(getattr(svc, "executor", None), "services", None) or {}
    found.append(services.get("model_manager"))
    mod = sys.modules.get("kiln.nodes.sd.manager")  # read only if node code loaded it: never imported here
    if mod is not None:
        found.append(getattr(mod, "_default", None))
    out: list = []
    for m in found:
        if m is not None and all(m is not o for o in out):
            out.append(m)
    return out


def _model_metrics(svc: Any, infos: list | None) -> Iterable[Metric]:
    """Model loads and evictions: from this process's managers, plus what workers report (``model_loads``,
    ``model_evictions``, ``models_loaded`` or the ``models`` list in each ``workers_info`` entry, when present)."""
    managers = _managers(svc)
    workers = [w for w in infos or [] if isinstance(w, dict)]
    loads = sum(int(getattr(m, "loads", 0)) for m in managers)
    loads += sum(int(w.get("model_loads", 0) or 0) for w in workers)
    yield CounterMetricFamily("kiln_model_loads", "Model files read from disk by the model managers", value=loads)
    resident = sum(len(m) for m in managers)
    resident += sum(int(w.get("models_loaded", len(w.get("models") or ()))) for w in workers)
    yield GaugeMetricFamily("kiln_models_loaded", "Models held in memory by the model managers", value=resident)
    have_evictions = any(hasattr(m, "evictions") for m in managers) or any("model_evictions" in w for w in workers)
    if have_evictions:
        evictions = sum(int(getattr(m, "evictions", 0)) for m in managers)
        evictions += sum(int(w.get("model_evictions", 0) or 0) for w in workers)
        yield CounterMetricFamily(
            "kiln_model_evictions", "Models dropped from memory by the model managers", value=evictions
        )


# -- the application side -------------------------------------------------------------------------------
METRICS = web.AppKey("kiln_metrics", Metrics)
_tracer_provider: Any = None  # set by configure_otel (kiln serve --otel): applications made later trace


class OtelMissing(KilnError, RuntimeError):
    pass


def configure_otel(service_name: str = "kiln") -> Any:
    """Send traces with OpenTelemetry's OTLP/HTTP exporter (``kiln serve --otel``); returns the provider (its
    ``shutdown()`` flushes what is left). The endpoint and headers come from the standard environment
    variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, default http://localhost:4318; ``OTEL_EXPORTER_OTLP_HEADERS``;
    ``OTEL_BSP_SCHEDULE_DELAY``, ...). Raises ``OtelMissing`` when the SDK is not installed."""
    global _tracer_provider
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise OtelMissing(
            "--otel needs the OpenTelemetry SDK: pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer_provider = provider
    return provider


def install(app: web.Application, svc: Any) -> Metrics:
    """Give ``app`` its metrics and connect them to the service's event router."""
    m = Metrics(svc)
    if _tracer_provider is not None:
        m.set_tracer(_tracer_provider.get_tracer("kiln.server"))
    app[METRICS] = m
    router = getattr(svc, "router", None)
    if router is not None:
        router.metrics = m
    return m


def prompt_accepted(svc: Any, job: Any) -> None:
    """Log and count a prompt the service just enqueued (the service calls this); never raises."""
    m = getattr(getattr(svc, "router", None), "metrics", None)
    try:
        if isinstance(m, Metrics):
            m.accepted_prompt(job)
        else:
            log.info("prompt %s accepted", job.prompt_id)
    except Exception:
        log.debug("metrics: counting an accepted prompt failed", exc_info=True)


async def metrics_route(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text exposition format."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})
