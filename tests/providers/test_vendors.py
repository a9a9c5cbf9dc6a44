"""ReplicateRun and GoogleImagenGenerate over plain HTTP against the loopback fake server."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from kiln import engine
from kiln.nodes.providers.ledger import costs_of
from tests.conftest import SAFETY_S, wait_for
from tests.providers.conftest import API_KEY
from tests.providers.fake_providers import Fault


def run_target(run_graph, graph, target, **extra):
    run_graph.events = []
    return run_graph.ex.run(
        engine.Graph.from_json(graph), sink=run_graph.events.append, extra_data=extra, targets=[target]
    )


def rep(**inputs):
    base = {
        "model": "black-forest-labs/flux-1.1-pro",
        "prompt": "a kite over dunes",
        "seed": 5,
        "input_json": '{"aspect_ratio": "3:2", "output_format": "png"}',
    }
    base.update(inputs)
    return {"r": {"class_type": "ReplicateRun", "inputs": base}}


def err(r) -> str:
    assert r.status == "error", r.status
    return r.error.message


# -- Replicate ---------------------------------------------------------------------------------------


def test_replicate_runs_polls_and_downloads(run_graph, openai_server):
    r = run_target(run_graph, rep(), "r")
    assert r.status == "success", r.error
    images, mask, pid, usage = r.values["r"]
    assert images.shape == (1, 64, 96, 3) and mask.shape == (1, 64, 96)
    create = openai_server.requests[0]
    assert create["path"] == "/replicate/v1/models/black-forest-labs/flux-1.1-pro/predictions"
    assert create["json"]["input"] == {
        "aspect_ratio": "3:2",
        "output_format": "png",
        "prompt": "a kite over dunes",
        "seed": 5,
    }
    assert create["headers"]["Prefer"].startswith("wait") and create["headers"]["Authorization"] == f"Bearer {API_KEY}"
    polls = [q for q in openai_server.requests if q["path"].endswith(pid)]
    assert len(polls) == 3
    progress = [e.value for e in run_graph.events if type(e).__name__ == "Progress"]
    assert progress[0] == 0 and progress[-1] == 100 and any(0 < v < 100 for v in progress)
    rec = json.loads(usage)
    assert rec["usd"] == pytest.approx(0.04) and rec["prediction_id"] == pid and rec["usage"] == {"predict_time": 0.42}
    assert costs_of(r.annotations)[0]["usd"] == pytest.approx(0.04)


def test_replicate_version_ids_and_multiple_outputs(run_graph, openai_server):
    version = "a" * 64
    r = run_target(run_graph, rep(model=f"someone/model:{version}", input_json='{"num_outputs": 3}'), "r")
    assert r.status == "success", r.error
    assert r.values["r"][0].shape == (3, 64, 96, 3)
    create = openai_server.requests[0]
    assert create["path"] == "/replicate/v1/predictions" and create["json"]["version"] == version


def test_replicate_sends_a_connected_image_as_data_uri(run_graph, openai_server):
    class Img(engine.Node):
        outputs = ("IMAGE",)

        def run(self):
            return torch.rand(1, 16, 16, 3)

    run_graph.ex.registry.register(Img, "TestRepImg")
    g = {"i": {"class_type": "TestRepImg", "inputs": {}}, **rep(image=["i", 0], image_field="input_image")}
    assert run_target(run_graph, g, "r").status == "success"
    assert openai_server.requests[0]["json"]["input"]["input_image"].startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    "inputs,input_name,expect",
    [
        ({"model": "not a model"}, "model", "not a Replicate model id"),
        ({"input_json": "{oops"}, "input_json", "not JSON"),
        ({"input_json": "[1]"}, "input_json", "JSON object"),
    ],
)
def test_replicate_bad_inputs_fail_before_any_request(run_graph, openai_server, inputs, input_name, expect):
    msg = err(run_target(run_graph, rep(**inputs), "r"))
    assert msg.startswith(f"input '{input_name}'") and expect in msg
    assert openai_server.requests == []


def test_replicate_schema_errors_name_input_json(run_graph, openai_server):
    msg = err(run_target(run_graph, rep(prompt=""), "r"))
    assert msg.startswith("input 'input_json'") and "prompt is required" in msg and "HTTP 422" in msg


def test_replicate_safety_failure_points_at_the_prompt(run_graph, openai_server):
    msg = err(run_target(run_graph, rep(prompt="nsfw thing"), "r"))
    assert msg.startswith("input 'prompt'") and "NSFW" in msg and "failed" in msg


def test_replicate_429_on_create_is_retried(run_graph, openai_server):
    openai_server.inject(Fault("status", status=429, headers={"Retry-After": "0"}, path="/predictions"))
    assert run_target(run_graph, rep(), "r").status == "success"


def test_replicate_interrupt_cancels_the_prediction(run_graph, openai_server):
    def interrupt_once_created():  # readiness: the prediction exists at the provider
        wait_for(lambda: openai_server.predictions, "the prediction to be created")
        run_graph.ex.interrupt()

    t = threading.Thread(target=interrupt_once_created, daemon=True)
    t.start()
    r = run_target(run_graph, rep(prompt="hang forever"), "r")
    t.join(SAFETY_S)
    assert r.status == "interrupted"
    pid = next(iter(openai_server.predictions))
    wait_for(lambda: pid in openai_server.cancelled, "the prediction to be cancelled")
    assert openai_server.cancelled == [pid]
    assert openai_server.predictions[pid]["status"] == "canceled"


def test_replicate_max_wait_cancels_and_names_the_input(run_graph, openai_server):
    msg = err(run_target(run_graph, rep(prompt="hang on", max_wait_s=1), "r"))
    assert msg.startswith("input 'max_wait_s'")
    assert len(openai_server.cancelled) == 1


# -- Google Imagen -----------------------------------------------------------------------------------


def imagen(**inputs):
    base = {"prompt": "a tide pool at noon", "model": "imagen-4.0-generate-001", "n": 2, "aspect_ratio": "16:9"}
    base.update(inputs)
    return {"g": {"class_type": "GoogleImagenGenerate", "inputs": base}}


def test_imagen_generates_with_the_key_in_a_header(run_graph, openai_server):
    r = run_target(run_graph, imagen(), "g")
    assert r.status == "success", r.error
    images, mask, usage = r.values["g"]
    assert images.shape == (2, 288, 512, 3)
    q = openai_server.requests[0]
    assert q["path"] == "/google/v1beta/models/imagen-4.0-generate-001:predict"
    assert q["headers"]["x-goog-api-key"] == API_KEY and API_KEY not in q["path"]
    assert q["json"] == {
        "instances": [{"prompt": "a tide pool at noon"}],
        "parameters": {"sampleCount": 2, "aspectRatio": "16:9", "personGeneration": "allow_adult", "imageSize": "1K"},
    }
    assert json.loads(usage)["usd"] == pytest.approx(0.08)


def test_imagen_all_filtered_points_at_the_prompt(run_graph, openai_server):
    msg = err(run_target(run_graph, imagen(prompt="blocked words"), "g"))
    assert msg.startswith("input 'prompt'") and "usage guidelines" in msg


def test_imagen_partly_filtered_returns_the_rest(run_graph, openai_server):
    r = run_target(run_graph, imagen(prompt="half of these"), "g")
    assert r.status == "success" and r.values["g"][0].shape[0] == 1
    rec = json.loads(r.values["g"][2])
    assert len(rec["filtered"]) == 1 and rec["usd"] == pytest.approx(0.04)


def test_imagen_bad_key(run_graph, openai_server, monkeypatch):
    monkeypatch.setenv("KILN_TEST_OPENAI_KEY", "AIza-wrong-key-0000")
    msg = err(run_target(run_graph, imagen(), "g"))
    assert "API key" in msg and "GEMINI_API_KEY" in msg and "AIza-wrong-key-0000" not in msg


def test_imagen_rules_and_server_validation(run_graph, openai_server):
    msg = err(run_target(run_graph, imagen(model="imagen-4.0-fast-generate-001", image_size="2K"), "g"))
    assert msg.startswith("input 'image_size'") and openai_server.requests == []
    openai_server.inject(
        Fault("status", status=400, message="aspectRatio 16:9 is not supported by this model", path="/google/")
    )
    msg = err(run_target(run_graph, imagen(), "g"))
    assert msg.startswith("input 'aspect_ratio'") and "HTTP 400" in msg and "not supported" in msg


def test_imagen_retries_5xx(run_graph, openai_server):
    openai_server.inject(Fault("status", status=503, path="/google/"))
    r = run_target(run_graph, imagen(n=1), "g")
    assert r.status == "success" and len(openai_server.requests) == 2


def test_vendor_budget_is_enforced(run_graph, openai_server):
    msg = err(run_target(run_graph, imagen(n=4), "g", max_cost=0.1))
    assert "max_cost" in msg and openai_server.requests == []
    msg = err(run_target(run_graph, rep(model="someone/unpriced-model"), "r", max_cost=1.0))
    assert "no price is known" in msg and "someone/unpriced-model" in msg
