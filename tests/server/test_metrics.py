"""GET /metrics (Prometheus text format) and the per-prompt log lines, on a real in-process server.

Every value is read back through ``prometheus_client.parser``, after real prompts ran: outcomes, node
durations per class, cache hits on an identical re-run, queue depth while a gate holds a run, sockets.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import SAFETY_S, Gate, chain, wait_for

from kiln.cli_server import add_serve_parser


def scrape(server, **kw) -> dict:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    r = server.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def run(server, graph: dict, **extra) -> dict:
    body = server.post("/prompt?wait=true", {"prompt": graph, **extra}).json()
    assert body.get("status") in ("success", "error", "interrupted"), body
    return body


def test_outcomes_node_histograms_and_cache_hits(live):
    s = live()
    m0 = scrape(s)
    assert val(m0, "kiln_prompts_finished_total", outcome="success") == 0
    assert val(m0, "kiln_queue_depth", state="pending") == 0

    assert run(s, chain(4))["status"] == "success"  # TConst, 3 x TAdd, TShow: five nodes executed
    m = scrape(s)
    assert val(m, "kiln_prompts_finished_total", outcome="success") == 1
    assert val(m, "kiln_node_duration_seconds_count", class_type="TConst") == 1
    assert val(m, "kiln_node_duration_seconds_count", class_type="TAdd") == 3
    assert val(m, "kiln_node_duration_seconds_count", class_type="TShow") == 1
    assert val(m, "kiln_node_duration_seconds_bucket", class_type="TAdd", le="+Inf") == 3
    assert val(m, "kiln_node_cache_misses_total") == 5
    assert val(m, "kiln_node_cache_hits_total") == 0
    assert val(m, "kiln_prompt_duration_seconds_count", outcome="success") == 1

    # the same graph again: every node comes from the cache, nothing is timed
    assert run(s, chain(4))["status"] == "success"
    m = scrape(s)
    assert val(m, "kiln_prompts_finished_total", outcome="success") == 2
    assert val(m, "kiln_node_cache_hits_total") == 5
    assert val(m, "kiln_node_cache_misses_total") == 5
    assert val(m, "kiln_node_duration_seconds_count", class_type="TAdd") == 3

    # one more TAdd on the end: four nodes cached, two run
    assert run(s, chain(5))["status"] == "success"
    m = scrape(s)
    assert val(m, "kiln_node_cache_hits_total") == 9
    assert val(m, "kiln_node_cache_misses_total") == 7
    assert val(m, "kiln_node_duration_seconds_count", class_type="TAdd") == 4

    # a node that raises: counted as an error; the failed node is not a duration, the node before it is
    bad = {
        "1": {"class_type": "TConst", "inputs": {"value": 123}},
        "2": {"class_type": "TFail", "inputs": {"value": ["1", 0]}},
        "out": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
    }
    assert run(s, bad)["status"] == "error"
    m = scrape(s)
    assert val(m, "kiln_prompts_finished_total", outcome="error") == 1
    assert val(m, "kiln_prompt_duration_seconds_count", outcome="error") == 1
    assert val(m, "kiln_node_duration_seconds_count", class_type="TFail") == 0
    assert val(m, "kiln_node_duration_seconds_count", class_type="TConst") == 2
    assert val(m, "kiln_prompts_finished_total", outcome="success") == 2 + 1


def test_queue_depth_workers_and_interrupts_while_a_gate_holds_a_run(live):
    s = live()
    gate = Gate()
    held = s.post("/prompt", {"prompt": gate.graph()}).json()["prompt_id"]
    assert gate.entered.wait(SAFETY_S)
    waiting = [s.post("/prompt", {"prompt": chain(2, value=v)}).json()["prompt_id"] for v in (10, 11)]
    m = scrape(s)
    assert val(m, "kiln_queue_depth", state="running") == 1
    assert val(m, "kiln_queue_depth", state="pending") == 2
    assert val(m, "kiln_workers", state="busy") == 1
    assert val(m, "kiln_workers", state="idle") == 0

    # a pending prompt interrupted before it ran: an interrupted outcome, and one fewer pending
    assert s.post("/interrupt", {"prompt_id": waiting[1]}).status_code == 200
    m = scrape(s)
    assert val(m, "kiln_queue_depth", state="pending") == 1
    assert val(m, "kiln_prompts_finished_total", outcome="interrupted") == 1

    # the held run, interrupted inside its node: the gate node is not a duration, TConst before it is
    assert s.post("/interrupt", {"prompt_id": held}).status_code == 200
    assert s.get(f"/prompt/{waiting[0]}?wait=true").json()["status"] == "success"
    assert s.get(f"/prompt/{held}").json()["status"] == "interrupted"
    m = scrape(s)
    assert val(m, "kiln_prompts_finished_total", outcome="interrupted") == 2
    assert val(m, "kiln_prompts_finished_total", outcome="success") == 1
    assert val(m, "kiln_node_duration_seconds_count", class_type="TGate") == 0
    assert val(m, "kiln_queue_depth", state="running") == 0
    assert val(m, "kiln_queue_depth", state="pending") == 0
    assert val(m, "kiln_workers", state="idle") == 1


def test_websocket_clients_and_bytes_sent(live):
    s = live()
    assert val(scrape(s), "kiln_websocket_clients") == 0
    with s.ws("metrics-client") as ws:
        ws.recv(timeout=SAFETY_S)  # the greeting status: the socket is registered
        m = scrape(s)
        assert val(m, "kiln_websocket_clients") == 1
        before = val(m, "kiln_websocket_sent_bytes_total")
        assert before > 0  # the greeting itself was written
        pid = run(s, chain(3), client_id="metrics-client")["prompt_id"]
        sent = 0  # payload bytes of every message of the prompt, up to its final executing
        while True:
            text = ws.recv(timeout=SAFETY_S)
            sent += len(text.encode() if isinstance(text, str) else text)
            msg = json.loads(text)
            if msg["type"] == "executing" and msg["data"]["node"] is None and msg["data"]["prompt_id"] == pid:
                break
        assert sent > 200
        assert val(scrape(s), "kiln_websocket_sent_bytes_total") >= before + sent
    wait_for(lambda: val(scrape(s), "kiln_websocket_clients") == 0, "the socket to be gone")


def test_each_server_has_its_own_registry(live):
    a, b = live(), live()
    run(a, chain(2))
    run(a, chain(3))
    assert val(scrape(a), "kiln_prompts_finished_total", outcome="success") == 2
    assert val(scrape(b), "kiln_prompts_finished_total", outcome="success") == 0


def test_metrics_need_the_token_like_every_route(live):
    s = live(auth_token="s3cret")
    assert s.get("/metrics").status_code == 401
    assert s.get("/api/metrics").status_code == 401
    assert s.get("/system_stats").status_code == 401  # the same rule as /system_stats
    m = scrape(s, headers={"Authorization": "Bearer s3cret"})
    assert val(m, "kiln_queue_depth", state="pending") == 0


class FakeManager:
    """What the metrics read of a model manager: its counters and its size."""

    def __init__(self, loads: int, resident: int, evictions: int | None = None):
        self.loads = loads
        self.resident = resident
        if evictions is not None:
            self.evictions = evictions

    def __len__(self) -> int:
        return self.resident


def test_model_counters_and_reported_workers_are_read_at_scrape(live, monkeypatch):
    from kiln.nodes.sd import manager

    monkeypatch.setattr(manager, "_default", None)  # other tests of this process may have loaded models
    s = live()
    m = scrape(s)
    assert val(m, "kiln_model_loads_total") == 0
    assert ("kiln_model_evictions_total", ()) not in m  # no manager counts evictions: not exported

    s.executor.services["model_manager"] = FakeManager(loads=3, resident=2)
    m = scrape(s)
    assert val(m, "kiln_model_loads_total") == 3
    assert val(m, "kiln_models_loaded") == 2

    s.executor.services["model_manager"] = FakeManager(loads=4, resident=1, evictions=2)
    assert val(scrape(s), "kiln_model_evictions_total") == 2

    # a service with worker processes reports them (and what they loaded); several running jobs
    svc = s.service
    svc.workers_info = [
        {"state": "idle", "model_loads": 5, "model_evictions": 1},
        {"state": "busy", "model_loads": 2},
        {"state": "busy"},
    ]
    svc.running_jobs = lambda: ["job-a", "job-b"]
    try:
        m = scrape(s)
    finally:
        del svc.workers_info, svc.running_jobs
    assert val(m, "kiln_workers", state="idle") == 1
    assert val(m, "kiln_workers", state="busy") == 2
    assert val(m, "kiln_queue_depth", state="running") == 2
    assert val(m, "kiln_model_loads_total") == 4 + 5 + 2
    assert val(m, "kiln_model_evictions_total") == 2 + 1


def prompt_lines(caplog, pid: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kiln.server" and f"prompt {pid} " in r.getMessage()]


def test_a_log_line_per_prompt_start_and_end(live, caplog):
    caplog.set_level(logging.INFO, logger="kiln.server")
    s = live()
    ok = run(s, chain(3))["prompt_id"]
    lines = prompt_lines(caplog, ok)
    assert f"prompt {ok} started on worker inproc" in lines
    done = [x for x in lines if " finished in " in x]
    assert len(done) == 1 and done[0].endswith("s (4 nodes run, 0 cached)"), lines

    again = run(s, chain(3))["prompt_id"]
    assert any(x.endswith("(0 nodes run, 4 cached)") for x in prompt_lines(caplog, again))

    bad = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "7": {"class_type": "TFail", "inputs": {"value": ["1", 0], "message": "no luck"}},
        "out": {"class_type": "TShow", "inputs": {"value": ["7", 0]}},
    }
    failed = run(s, bad)["prompt_id"]
    lines = prompt_lines(caplog, failed)
    assert any(x.startswith(f"prompt {failed} failed at node 7 (TFail) after ") and "no luck" in x for x in lines)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage() in lines)


def test_a_log_line_when_a_prompt_is_accepted(live, caplog):
    caplog.set_level(logging.INFO, logger="kiln.server")
    s = live()
    pid = run(s, chain(3), client_id="cli-7")["prompt_id"]
    assert f"prompt {pid} accepted: 4 nodes, client cli-7" in prompt_lines(caplog, pid)
    assert val(scrape(s), "kiln_prompts_accepted_total") == 1


def test_serve_log_level_flag():
    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    assert p.parse_args(["serve"]).log_level == "INFO"
    assert p.parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--log-level", "chatty"])


# -- OpenTelemetry (an optional extra: these tests need opentelemetry-sdk) ---------------------------------
def memory_tracer():
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("kiln.server"), exporter


def test_otel_a_span_per_prompt_and_per_node(live, caplog):
    from opentelemetry.trace import StatusCode

    from kiln.server.metrics import METRICS

    caplog.set_level(logging.INFO, logger="kiln.server")
    tracer, exporter = memory_tracer()
    s = live()
    s.app[METRICS].set_tracer(tracer)
    pid = run(s, chain(3))["prompt_id"]
    spans = exporter.get_finished_spans()
    prompt = [x for x in spans if x.name == "prompt"]
    assert len(prompt) == 1
    root = prompt[0]
    assert root.attributes["kiln.prompt_id"] == pid
    assert root.attributes["kiln.outcome"] == "success" and root.attributes["kiln.nodes_run"] == 4
    nodes = [x for x in spans if x is not root]
    assert sorted(x.attributes["kiln.class_type"] for x in nodes) == ["TAdd", "TAdd", "TConst", "TShow"]
    assert sorted(x.attributes["kiln.node_id"] for x in nodes) == ["1", "2", "3", "out"]
    for x in nodes:  # children of the prompt's span, inside it
        assert x.parent.span_id == root.context.span_id and x.context.trace_id == root.context.trace_id
        assert root.start_time <= x.start_time <= x.end_time
    trace_id = f"{root.context.trace_id:032x}"
    assert f"prompt {pid} started on worker inproc (trace {trace_id})" in prompt_lines(caplog, pid)

    exporter.clear()
    bad = {
        "1": {"class_type": "TConst", "inputs": {"value": 1}},
        "2": {"class_type": "TFail", "inputs": {"value": ["1", 0], "message": "no luck"}},
        "out": {"class_type": "TShow", "inputs": {"value": ["2", 0]}},
    }
    run(s, bad)
    by_name = {x.name: x for x in exporter.get_finished_spans()}
    assert set(by_name) == {"prompt", "node TFail"}  # TConst came from the cache this time
    assert by_name["prompt"].status.status_code == StatusCode.ERROR
    assert by_name["node TFail"].status.status_code == StatusCode.ERROR
    assert "no luck" in by_name["node TFail"].status.description
    assert by_name["prompt"].attributes["kiln.outcome"] == "error"


class OtlpReceiver:
    """A loopback OTLP/HTTP trace endpoint: keeps every exported span (decoded with the OTLP protobufs)."""

    def __init__(self) -> None:
        import http.server

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def names(self) -> list[str]:
        return [x.name for x in list(self.spans)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_otel_flag_exports_spans_over_otlp(serve_proc, monkeypatch):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    receiver = OtlpReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export every 50 ms, not every 5 s
        proc = serve_proc("--otel")
        body = requests.post(proc.url + "/prompt?wait=true", json={"prompt": chain(3)}, timeout=SAFETY_S).json()
        assert body["status"] == "success", body
        wait_for(lambda: len(receiver.spans) >= 5, "the spans to be exported")
        assert sorted(receiver.names()) == ["node TAdd", "node TAdd", "node TConst", "node TShow", "prompt"]
        root = next(x for x in receiver.spans if x.name == "prompt")
        assert {x.trace_id for x in receiver.spans} == {root.trace_id}
        attrs = {a.key: a.value.string_value for a in root.attributes}
        assert attrs["kiln.prompt_id"] == body["prompt_id"]
        trace_id = root.trace_id.hex()
        pid = body["prompt_id"]
        log = proc.log()  # the per-prompt lines at the default level, the trace named in the first
        assert re.search(rf"INFO kiln.server: prompt {pid} started on worker \S+ \(trace {trace_id}\)", log), log
        assert re.search(rf"INFO kiln.server: prompt {pid} finished in [0-9.]+ s \(4 nodes run, 0 cached\)", log)
    finally:
        receiver.close()
