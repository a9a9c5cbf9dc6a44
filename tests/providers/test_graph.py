"""graphs/provider_to_s3.json, run end to end against the fake OpenAI server and moto."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from kiln import engine
from kiln.nodes.providers import provenance
from kiln.nodes.providers.ledger import costs_of
from kiln.server.protocol import event_message
from tests.conftest import SAFETY_S
from tests.providers.conftest import API_KEY

GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "provider_to_s3.json"


def load_graph(bucket: str, endpoint: str) -> dict:
    g = json.loads(GRAPH.read_text())
    g["4"]["inputs"].update({"bucket": bucket, "endpoint_url": endpoint, "path_style": True, "region": "us-east-1"})
    return g


def test_provider_to_s3_graph(run_graph, openai_server, s3, moto_url):
    r = run_graph(load_graph(s3.bucket, moto_url), extra_pnginfo={"workflow": {"nodes": []}}, max_cost=1.0)
    assert r.status == "success", r.error
    assert sorted(r.ran) == ["1", "2", "3", "4", "5"]
    # the prompt went through the screen into the provider call
    assert openai_server.requests[0]["json"]["prompt"] == "a lighthouse at dawn, loose watercolor, soft light"
    entry = r.outputs["4"]["s3"][0]
    key = entry["key"]
    assert key.startswith("kiln/") and key.endswith(".png") and r.prompt_id in key
    body = s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    with urllib.request.urlopen(entry["url"], timeout=SAFETY_S) as resp:
        assert resp.read() == body
    rec = provenance.read(body)
    action = rec["assertions"][0]["data"]["actions"][0]
    assert action["parameters"]["provider"] == "openai" and action["parameters"]["model"] == "gpt-image-1"
    assert action["parameters"]["request_id"] == openai_server.requests[0]["request_id"]
    assert action["digitalSourceType"].endswith("trainedAlgorithmicMedia")
    graph = next(a for a in rec["assertions"] if a["label"] == "kiln.graph")["data"]
    assert graph["2"]["class_type"] == "OpenAIImageGenerate"
    head = s3.head_object(Bucket=s3.bucket, Key=key)["Metadata"]
    assert head["kiln-provider"] == "openai" and head["kiln-model"] == "gpt-image-1"
    local = run_graph.ex.folders.output_dir / "provider" / r.outputs["5"]["images"][0]["filename"]
    assert (
        provenance.read(local.read_bytes())["assertions"][1]["data"]["hash"]
        == next(a for a in rec["assertions"] if a["label"] == "kiln.content_hash")["data"]["hash"]
    )
    # cost: in the run ledger, in the provider node's UI (history), and in the usage output
    assert (
        len(costs_of(r.annotations)) == 1
        and costs_of(r.annotations)[0]["usd"] > 0
        and r.outputs["2"]["kiln_cost"][0]["usd"] == costs_of(r.annotations)[0]["usd"]
    )
    # the key is nowhere: file bytes (PNG chunks), S3 metadata, history, events
    everything = body + json.dumps(head).encode() + json.dumps(r.outputs).encode()
    everything += json.dumps([event_message(e)[1] for e in run_graph.events], default=str).encode()
    assert API_KEY.encode() not in everything

    # running it again reuses the paid result and the stored object
    r2 = run_graph(load_graph(s3.bucket, moto_url))
    assert r2.status == "success" and r2.ran == [] and sorted(r2.cached) == ["4", "5"]
    assert len(openai_server.requests) == 1
    assert r2.outputs["4"] == r.outputs["4"]  # the stored URIs are reported again


def test_provider_to_s3_graph_stops_on_a_blocked_term(run_graph, openai_server, s3, moto_url):
    g = load_graph(s3.bucket, moto_url)
    g["1"]["inputs"]["block_list"] = "watercolor, oil"
    r = run_graph(g)
    msg = r.error.message
    assert r.error.node_id == "1" and "blocked term 'watercolor'" in msg and msg.startswith("input 'text'")
    assert openai_server.requests == []


def test_shipped_graph_validates_with_credentials(registry, openai_server, s3, moto_url):
    v = engine.validate(engine.Graph.from_json(load_graph(s3.bucket, moto_url)), registry)
    assert v.ok, v.messages()


def test_without_credentials_the_graph_is_refused_before_any_paid_call(run_graph, openai_server, monkeypatch, tmp_path):
    # the provider profile has a key, but there are no AWS credentials: nothing may be paid for
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    g = load_graph("kiln-outputs", "http://127.0.0.1:9")
    v = run_graph.ex.validate(engine.Graph.from_json(g))
    assert not v.ok
    messages = " | ".join(v.messages())
    assert "SaveImageS3" in messages and "no AWS credentials" in messages and "bucket" in messages
    with pytest.raises(engine.ValidationFailed):
        run_graph(g)
    assert openai_server.requests == []  # refused at validation: the provider was never called


def test_a_rerun_in_a_new_process_does_not_pay_again(openai_server, s3, moto_url, tmp_path):
    from kiln.nodes.providers.result_cache import ProviderResultCache
    from kiln.runtime import make_executor

    g = load_graph(s3.bucket, moto_url)
    first = make_executor(base_dir=tmp_path)
    assert isinstance(first.services["provider_results"], ProviderResultCache)
    r1 = first.run(engine.Graph.from_json(g))
    assert r1.status == "success", r1.error
    assert len(openai_server.requests) == 1
    # a new executor stands for a new process: its memory cache is empty, the disk cache is not
    second = make_executor(base_dir=tmp_path)
    r2 = second.run(engine.Graph.from_json(g))
    assert r2.status == "success", r2.error
    assert len(openai_server.requests) == 1 and "2" in r2.ran
    assert costs_of(r2.annotations) == []  # nothing was paid the second time
    assert r2.outputs.get("2") == r1.outputs.get("2")  # the same result, as the provider gave it
    # opting out calls the provider again
    third = make_executor(base_dir=tmp_path, provider_cache=False)
    assert third.run(engine.Graph.from_json(g)).status == "success"
    assert len(openai_server.requests) == 2
