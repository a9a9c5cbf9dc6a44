"""OpenAI image nodes through the official SDK against the loopback fake server."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.nodes.providers.ledger import costs_of
from kiln.server.protocol import event_message
from tests.conftest import SAFETY_S, wait_for
from tests.providers.conftest import API_KEY, write_config
from tests.providers.fake_providers import Fault


def gen(node_id="1", **inputs):
    base = {"prompt": "a red fox in snow", "model": "dall-e-2", "size": "256x256"}
    base.update(inputs)
    return {node_id: {"class_type": "OpenAIImageGenerate", "inputs": base}}


def run_node(run_graph, graph, target="1", **extra):
    r = run_graph.ex.run(
        __import__("kiln.engine", fromlist=["Graph"]).Graph.from_json(graph),
        sink=run_graph.events.append,
        extra_data=extra,
        targets=[target],
    )
    return r


def error_message(r) -> str:
    assert r.status == "error", r.status
    return r.error.message


# -- requests and outputs --------------------------------------------------------------------------


def test_gpt_image_1_generate_sends_its_parameters_and_prices_from_tokens(run_graph, openai_server):
    r = run_node(
        run_graph,
        gen(
            model="gpt-image-1",
            size="1024x1024",
            quality="low",
            background="transparent",
            output_format="webp",
            output_compression=80,
            moderation="low",
            n=2,
        ),
    )
    assert r.status == "success", r.error
    images, mask, revised, usage = r.values["1"]
    assert images.shape == (2, 1024, 1024, 3) and images.dtype == torch.float32
    assert float(mask[:, :256].mean()) > 0.99 and float(mask[:, 512:].mean()) < 0.01  # alpha came through
    sent = openai_server.requests[0]
    assert sent["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert {
        k: sent["json"][k]
        for k in ("model", "quality", "background", "output_format", "output_compression", "moderation", "n", "size")
    } == {
        "model": "gpt-image-1",
        "quality": "low",
        "background": "transparent",
        "output_format": "webp",
        "output_compression": 80,
        "moderation": "low",
        "n": 2,
        "size": "1024x1024",
    }
    assert "response_format" not in sent["json"]  # gpt-image-1 rejects it
    rec = json.loads(usage)
    # 10 text + 40 image input tokens, 8320 output tokens at 5/10/40 USD per million
    assert rec["usd"] == pytest.approx((10 * 5 + 40 * 10 + 8320 * 40) / 1e6)
    assert rec["estimated"] is False and rec["request_id"] == sent["request_id"]
    assert (
        costs_of(r.annotations)[0]["usd"] == pytest.approx(rec["usd"])
        and costs_of(r.annotations)[0]["status"] == "billed"
    )
    assert r.outputs["1"]["kiln_cost"][0]["usd"] == pytest.approx(rec["usd"])
    assert revised == "a red fox in snow"


def test_dalle3_returns_revised_prompt_and_uses_the_price_table(run_graph, openai_server):
    r = run_node(run_graph, gen(model="dall-e-3", size="1792x1024", quality="hd", style="natural"))
    assert r.status == "success", r.error
    images, _, revised, usage = r.values["1"]
    assert images.shape == (1, 1024, 1792, 3)
    assert revised == "A detailed rendering of a red fox in snow"
    sent = openai_server.requests[0]["json"]
    assert sent["quality"] == "hd" and sent["style"] == "natural" and sent["response_format"] == "b64_json"
    assert json.loads(usage)["usd"] == pytest.approx(0.12)


def test_url_responses_are_downloaded(run_graph, openai_server):
    openai_server.url_mode = True
    r = run_node(run_graph, gen(n=3))
    assert r.status == "success", r.error
    assert r.values["1"][0].shape == (3, 256, 256, 3)
    assert len(openai_server.files) >= 3


def test_pixels_match_what_the_server_sent(run_graph, openai_server):
    from tests.providers.fake_providers import render

    r = run_node(run_graph, gen(prompt="exact pixels"))
    expected = np.asarray(Image.open(io.BytesIO(render("256x256", "exact pixels", "png", False, 0))).convert("RGB"))
    got = (r.values["1"][0][0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    "inputs,input_name",
    [
        ({"model": "dall-e-3", "n": 2, "size": "1024x1024"}, "n"),
        ({"model": "dall-e-3", "size": "256x256"}, "size"),
        ({"model": "gpt-image-1", "style": "vivid", "size": "1024x1024"}, "style"),
        ({"model": "gpt-image-1", "size": "1792x1024"}, "size"),
        (
            {"model": "gpt-image-1", "size": "1024x1024", "background": "transparent", "output_format": "jpeg"},
            "output_format",
        ),
        ({"model": "gpt-image-1", "size": "1024x1024", "output_compression": 50}, "output_compression"),
        ({"model": "dall-e-2", "quality": "hd"}, "quality"),
        ({"model": "dall-e-2", "background": "opaque"}, "background"),
        ({"prompt": "   "}, "prompt"),
    ],
)
def test_model_rules_are_enforced_before_any_request(run_graph, openai_server, inputs, input_name):
    r = run_node(run_graph, gen(**inputs))
    msg = error_message(r)
    assert msg.startswith(f"input '{input_name}'"), msg
    assert "(" in msg and ")" in msg  # carries a hint
    assert r.error.node_type == "OpenAIImageGenerate"
    assert openai_server.requests == []


# -- retries and failures --------------------------------------------------------------------------


def test_429_with_retry_after_is_retried(run_graph, openai_server):
    openai_server.inject(Fault("status", status=429, headers={"Retry-After": "0.05"}, message="slow down"))
    r = run_node(run_graph, gen())
    assert r.status == "success", r.error
    assert [q["fault"] for q in openai_server.requests] == ["status", None]


def test_retry_after_is_respected(run_graph, openai_server):
    # the config's own backoff is at most 0.01 s for the first retry, so a longer gap is the header's doing
    openai_server.inject(Fault("status", status=503, headers={"Retry-After": "0.25"}))
    r = run_node(run_graph, gen())
    assert r.status == "success"
    first, second = openai_server.requests
    assert second["t"] - first["t"] >= 0.25


def test_a_retry_after_beyond_the_budget_gives_up_at_once(run_graph, openai_server):
    openai_server.inject(Fault("status", status=429, headers={"Retry-After": "60"}, message="quota"))
    msg = error_message(run_node(run_graph, gen()))
    assert "HTTP 429" in msg and "gave up rather than wait 60s" in msg
    assert len(openai_server.requests) == 1


def test_persistent_500_names_provider_status_request_id_and_attempts(run_graph, openai_server):
    openai_server.inject(*[Fault("status", status=500, message="upstream exploded")] * 3)
    r = run_node(run_graph, gen())
    msg = error_message(r)
    last_id = openai_server.requests[-1]["request_id"]
    assert len(openai_server.requests) == 3
    assert "endpoint 'openai'" in msg and "HTTP 500" in msg and last_id in msg and "after 3 attempts" in msg
    assert "upstream exploded" in msg
    assert costs_of(r.annotations)[0]["usd"] == 0.0 and costs_of(r.annotations)[0]["status"] == "failed"


def test_timeouts_are_retried_then_reported(run_graph, openai_server, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "slow.yaml", openai_server.base_url, timeout_s=0.3, attempts=2)
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    # the answers never come (until the client gives up): no race between the stall and the timeout
    openai_server.inject(Fault("stall", seconds=SAFETY_S), Fault("stall", seconds=SAFETY_S))
    r = run_node(run_graph, gen())
    msg = error_message(r)
    assert "timed out after 2 attempts" in msg and "timeout_s" in msg
    assert len(openai_server.requests) == 2


def test_a_timeout_then_success_recovers(run_graph, openai_server, tmp_path, monkeypatch):
    # the first answer never comes; the second, a healthy one, has 5 s (the fake answers in milliseconds)
    cfg = write_config(tmp_path / "slow.yaml", openai_server.base_url, timeout_s=5, attempts=2)
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    openai_server.inject(Fault("stall", seconds=SAFETY_S))
    r = run_node(run_graph, gen())
    assert r.status == "success", r.error


def test_content_policy_refusal_points_at_the_prompt_and_is_not_retried(run_graph, openai_server):
    openai_server.inject(Fault("policy"))
    msg = error_message(run_node(run_graph, gen()))
    assert msg.startswith("input 'prompt'") and "safety system" in msg and "rephrase" in msg
    assert len(openai_server.requests) == 1


def test_invalid_size_from_the_server_names_the_input(run_graph, openai_server):
    openai_server.inject(Fault("bad_size"))
    msg = error_message(run_node(run_graph, gen(model="gpt-image-1", size="1024x1024")))
    assert msg.startswith("input 'size'") and "HTTP 400" in msg


def test_auth_failure_says_what_to_set_and_never_echoes_the_key(run_graph, openai_server, monkeypatch):
    wrong = "sk-wrong-key-123456789"
    monkeypatch.setenv("KILN_TEST_OPENAI_KEY", wrong)
    r = run_node(run_graph, gen())
    msg = error_message(r)
    assert "HTTP 401" in msg and "API key was rejected" in msg
    assert wrong not in str(r.error) and "***" in msg
    assert len(openai_server.requests) == 1  # 401 is not retried


def test_missing_key_fails_at_validation_before_any_request(run_graph, openai_server, monkeypatch):
    from kiln.engine import ValidationFailed

    monkeypatch.delenv("KILN_TEST_OPENAI_KEY")
    with pytest.raises(ValidationFailed) as ei:
        run_node(run_graph, gen())
    msg = str(ei.value)
    assert "no API key for provider profile 'openai'" in msg and "KILN_TEST_OPENAI_KEY" in msg
    assert "input 'endpoint'" in msg
    assert openai_server.requests == []


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("not_json", "cannot read"),
        ("no_data", "held no images"),
        ("bad_b64", "not valid base64"),
        ("not_image", "not an image Kiln can decode"),
    ],
)
def test_malformed_responses_give_clear_errors(run_graph, openai_server, kind, expect):
    openai_server.inject(Fault(kind))
    msg = error_message(run_node(run_graph, gen()))
    assert expect in msg, msg


# -- caching, budget, concurrency ------------------------------------------------------------------


def test_rerunning_never_repeats_a_paid_call_unless_inputs_change(run_graph, openai_server):
    g = gen()
    assert run_node(run_graph, g).status == "success"
    r2 = run_node(run_graph, g)
    assert r2.cached == ["1"] and costs_of(r2.annotations) == []
    assert len(openai_server.requests) == 1
    g["1"]["inputs"]["seed"] = 7  # a new seed asks for a fresh image
    assert run_node(run_graph, g).ran == ["1"]
    g["1"]["inputs"]["quality"] = "standard"
    assert run_node(run_graph, g).ran == ["1"]
    assert len(openai_server.requests) == 3


def test_cache_results_off_calls_every_time(run_graph, openai_server):
    g = gen(cache_results=False)
    for _ in range(2):
        assert run_node(run_graph, g).ran == ["1"]
    assert len(openai_server.requests) == 2


def test_budget_stops_a_call_that_would_exceed_max_cost(run_graph, openai_server):
    r = run_node(run_graph, gen(model="dall-e-3", quality="hd", size="1024x1024"), max_cost=0.05)
    msg = error_message(r)
    assert "max_cost" in msg and "was not made" in msg
    assert openai_server.requests == []


def test_budget_holds_across_concurrent_nodes(run_graph, openai_server):
    openai_server.latency = 0.1
    graph = {}
    for i in range(4):
        graph.update(gen(str(i), prompt=f"fox {i}", size="1024x1024"))  # 0.02 USD each
    graph["sink"] = {"class_type": "ValidateImage", "inputs": {"images": ["0", 0]}}
    from kiln import engine

    r = run_graph.ex.run(
        engine.Graph.from_json(graph),
        sink=run_graph.events.append,
        extra_data={"max_cost": 0.05},
        targets=["0", "1", "2", "3"],
    )
    # nodes start together; the ones that would pass the budget are refused before sending anything
    assert r.status == "error" and "max_cost" in r.error.message
    assert len(openai_server.requests) <= 2
    held = [c for c in costs_of(r.annotations) if c["status"] in ("billed", "cancelled", "reserved")]
    assert 1 <= len(held) <= 2 and sum(c["usd"] for c in costs_of(r.annotations)) <= 0.05 + 1e-9


def test_async_provider_nodes_overlap(run_graph, openai_server):
    openai_server.latency = 0.3
    from kiln import engine

    graph = {}
    for i in range(3):
        graph.update(gen(str(i), prompt=f"overlap {i}"))
    events = []
    t = {}
    lock = threading.Lock()

    def sink(e):
        with lock:
            if type(e).__name__ == "NodeStarted":
                t.setdefault("started", []).append(e.node)
            if type(e).__name__ == "Progress" and e.value == 0:
                t.setdefault("in_flight", []).append((e.node, len(t.get("done", []))))
            if type(e).__name__ == "Progress" and e.value == 1:
                t.setdefault("done", []).append(e.node)
        events.append(e)

    r = run_graph.ex.run(engine.Graph.from_json(graph), sink=sink, targets=["0", "1", "2"])
    assert r.status == "success"
    # every request was sent before any answer came back
    assert [done_before for _, done_before in t["in_flight"]] == [0, 0, 0]


def test_interrupt_cancels_the_in_flight_request(run_graph, openai_server, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "slow.yaml", openai_server.base_url, timeout_s=30)
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    # the answer stalls far longer than the request timeout (30 s): an interrupted run that came back at all
    # did not wait for it; a run that waited would end in a timeout error, not "interrupted"
    openai_server.inject(Fault("stall", seconds=SAFETY_S))

    def interrupt_once_stalled():  # readiness: the request is at the server and stalling
        wait_for(lambda: any(r.get("fault") == "stall" for r in list(openai_server.requests)), "the stalled call")
        run_graph.ex.interrupt()

    t = threading.Thread(target=interrupt_once_stalled, daemon=True)
    t.start()
    r = run_node(run_graph, gen())
    t.join(SAFETY_S)
    assert r.status == "interrupted"
    wait_for(lambda: openai_server.disconnects, "the server to see the client go away")
    assert openai_server.disconnects == 1


# -- edit, variation -------------------------------------------------------------------------------


def _img(b, h, w, value=0.5):
    x = torch.linspace(0, 1, w).view(1, 1, w, 1).expand(b, h, w, 3).clone()
    return x * value


def test_edit_sends_every_reference_and_the_mask_as_alpha(run_graph, openai_server):
    from kiln.engine import Node, Output

    class Inputs(Node):
        outputs = [Output("IMAGE", "a"), Output("IMAGE", "b"), Output("MASK", "m")]

        def run(self):
            m = torch.zeros(1, 64, 64)
            m[:, :, 32:] = 1.0
            return _img(2, 64, 64), _img(1, 32, 48), m

    run_graph.ex.registry.register(Inputs, "TestEditInputs")
    g = {
        "i": {"class_type": "TestEditInputs", "inputs": {}},
        "1": {
            "class_type": "OpenAIImageEdit",
            "inputs": {
                "image": ["i", 0],
                "image_2": ["i", 1],
                "mask": ["i", 2],
                "prompt": "make it blue",
                "size": "1024x1024",
                "quality": "low",
            },
        },
    }
    r = run_node(run_graph, g)
    assert r.status == "success", r.error
    sent = openai_server.requests[0]
    assert len(sent["files"]["image"]) == 3 and sent["json"]["prompt"] == "make it blue"
    alpha = np.asarray(Image.open(io.BytesIO(sent["files"]["mask"][0]["data"])).getchannel("A"))
    assert alpha.shape == (64, 64) and (alpha[:, :32] == 255).all() and (alpha[:, 32:] == 0).all()
    assert r.values["1"][0].shape == (1, 1024, 1024, 3)


def test_edit_rejects_a_mask_of_another_size(run_graph, openai_server):
    from kiln.engine import Node, Output

    class Inputs(Node):
        outputs = [Output("IMAGE", "a"), Output("MASK", "m")]

        def run(self):
            return _img(1, 64, 64), torch.zeros(1, 32, 32)

    run_graph.ex.registry.register(Inputs, "TestEditInputs2")
    g = {
        "i": {"class_type": "TestEditInputs2", "inputs": {}},
        "1": {"class_type": "OpenAIImageEdit", "inputs": {"image": ["i", 0], "mask": ["i", 1], "prompt": "x"}},
    }
    msg = error_message(run_node(run_graph, g))
    assert msg.startswith("input 'mask'") and "32x32" in msg and "64x64" in msg and "resize" in msg
    assert openai_server.requests == []


def test_dalle2_edit_needs_a_square_image(run_graph, openai_server):
    from kiln.engine import Node

    class Inputs(Node):
        outputs = ("IMAGE",)

        def run(self):
            return _img(1, 64, 96)

    run_graph.ex.registry.register(Inputs, "TestEditInputs3")
    g = {
        "i": {"class_type": "TestEditInputs3", "inputs": {}},
        "1": {
            "class_type": "OpenAIImageEdit",
            "inputs": {"image": ["i", 0], "prompt": "x", "model": "dall-e-2", "size": "256x256"},
        },
    }
    msg = error_message(run_node(run_graph, g))
    assert msg.startswith("input 'image'") and "square" in msg


def test_variation_makes_n_images(run_graph, openai_server):
    from kiln.engine import Node

    class Inputs(Node):
        outputs = ("IMAGE",)

        def run(self):
            return _img(1, 64, 64)

    run_graph.ex.registry.register(Inputs, "TestVarInputs")
    g = {
        "i": {"class_type": "TestVarInputs", "inputs": {}},
        "1": {"class_type": "OpenAIImageVariation", "inputs": {"image": ["i", 0], "size": "256x256", "n": 2}},
    }
    r = run_node(run_graph, g)
    assert r.status == "success", r.error
    assert r.values["1"][0].shape == (2, 256, 256, 3)
    assert openai_server.requests[0]["path"] == "/v1/images/variations"
    assert json.loads(r.values["1"][3])["usd"] == pytest.approx(0.032)


@pytest.mark.parametrize("op", ["generate", "edit"])
def test_gpt_image_1_streams_partial_images_as_previews(run_graph, openai_server, op):
    if op == "generate":
        g = gen(model="gpt-image-1", size="1024x1024", quality="low", partial_images=2, n=2)
    else:
        from kiln.engine import Node

        class Inputs(Node):
            outputs = ("IMAGE",)

            def run(self):
                return _img(1, 32, 32)

        run_graph.ex.registry.register(Inputs, "TestStreamEditInputs")
        g = {
            "i": {"class_type": "TestStreamEditInputs", "inputs": {}},
            "1": {
                "class_type": "OpenAIImageEdit",
                "inputs": {"image": ["i", 0], "prompt": "bluer", "n": 2, "size": "1024x1024", "partial_images": 2},
            },
        }
    r = run_node(run_graph, g)
    assert r.status == "success", r.error
    previews = [e for e in run_graph.events if type(e).__name__ == "Progress" and e.preview is not None]
    assert len(previews) == 4 and all(Image.open(io.BytesIO(p.preview.data)).size == (64, 64) for p in previews)
    assert r.values["1"][0].shape == (2, 1024, 1024, 3)
    usage = json.loads(r.values["1"][3])
    assert usage["usage"]["output_tokens"] == 2 * 4160 and usage["estimated"] is False
    sent = openai_server.requests[0]["json"]
    assert sent["stream"] in (True, "true") and int(sent["partial_images"]) == 2


def test_partial_images_need_gpt_image_1(run_graph, openai_server):
    msg = error_message(run_node(run_graph, gen(model="dall-e-3", size="1024x1024", partial_images=1)))
    assert msg.startswith("input 'partial_images'") and openai_server.requests == []


# -- Responses API ----------------------------------------------------------------------------------


def resp_node(node_id="r1", **inputs):
    base = {"prompt": "a lighthouse", "size": "1024x1024", "quality": "low", "partial_images": 3}
    base.update(inputs)
    return {node_id: {"class_type": "OpenAIResponsesImage", "inputs": base}}


def test_responses_streams_partial_images_as_previews(run_graph, openai_server):
    r = run_node(run_graph, resp_node(), target="r1")
    assert r.status == "success", r.error
    previews = [e for e in run_graph.events if type(e).__name__ == "Progress" and e.preview is not None]
    assert len(previews) == 3
    for p in previews:
        assert Image.open(io.BytesIO(p.preview.data)).size == (64, 64)
    assert [p.value for p in previews] == [1, 2, 3] and previews[0].max == 4
    images, mask, revised, response_id, usage = r.values["r1"]
    assert images.shape == (1, 1024, 1024, 3) and revised == "Revised: a lighthouse"
    assert response_id.startswith("resp_")
    sent = openai_server.requests[0]["json"]
    assert sent["tools"][0]["partial_images"] == 3 and sent["stream"] is True
    assert sent["tool_choice"] == {"type": "image_generation"}


def test_responses_chain_multi_turn_edits(run_graph, openai_server):
    g = {
        **resp_node("a", prompt="a lighthouse"),
        **resp_node("b", prompt="now at night", previous_response_id=["a", 3], partial_images=0),
    }
    r = run_node(run_graph, g, target="b")
    assert r.status == "success", r.error
    first, second = openai_server.requests
    assert second["json"]["previous_response_id"] == r.values["a"][3] if "a" in r.values else True
    assert second["json"]["previous_response_id"].startswith("resp_")
    assert r.values["b"][2] == "Revised: a lighthouse / now at night"


def test_responses_sends_input_images(run_graph, openai_server):
    from kiln.engine import Node

    class Inputs(Node):
        outputs = ("IMAGE",)

        def run(self):
            return _img(2, 32, 32)

    run_graph.ex.registry.register(Inputs, "TestRespInputs")
    g = {"i": {"class_type": "TestRespInputs", "inputs": {}}, **resp_node(image=["i", 0], partial_images=0)}
    assert run_node(run_graph, g, target="r1").status == "success"
    content = openai_server.requests[0]["json"]["input"][0]["content"]
    imgs = [c for c in content if c["type"] == "input_image"]
    assert len(imgs) == 2
    png = base64.b64decode(imgs[0]["image_url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (32, 32)


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("stream_fail", "rephrase the prompt"),
        ("stream_cut", "ended before response.completed"),
        ("text_only", "answered without an image. It said: I cannot draw that."),
    ],
)
def test_responses_stream_failures(run_graph, openai_server, kind, expect):
    openai_server.inject(Fault(kind, path="/responses"))
    msg = error_message(run_node(run_graph, resp_node(), target="r1"))
    assert expect in msg, msg


def test_responses_unknown_previous_id_names_the_input(run_graph, openai_server):
    msg = error_message(run_node(run_graph, resp_node(previous_response_id="resp_missing"), target="r1"))
    assert msg.startswith("input 'previous_response_id'") and "resp_missing" in msg


# -- compatible endpoints and key safety -----------------------------------------------------------


def test_compatible_endpoint_profile_and_model_override(run_graph, openai_server, tmp_path, monkeypatch):
    extra = (
        f"  together:\n    base_url: {openai_server.base_url}\n    api_key_env: KILN_TEST_TOGETHER_KEY\n"
        f"prices:\n  black-forest-labs/FLUX.1-schnell: {{per_image: {{'*': 0.003}}}}\n"
    )
    monkeypatch.setenv("KILN_CONFIG", str(write_config(tmp_path / "c.yaml", openai_server.base_url, extra)))
    monkeypatch.setenv("KILN_TEST_TOGETHER_KEY", API_KEY)
    r = run_node(
        run_graph, gen(endpoint="together", model_override="black-forest-labs/FLUX.1-schnell", size="512x512", n=2)
    )
    assert r.status == "success", r.error
    assert openai_server.requests[0]["json"] == {
        "prompt": "a red fox in snow",
        "model": "black-forest-labs/FLUX.1-schnell",
        "n": 2,
        "size": "512x512",
        "response_format": "b64_json",
    }
    assert costs_of(r.annotations)[0]["provider"] == "together" and costs_of(r.annotations)[0]["usd"] == pytest.approx(
        0.006
    )
    # options the user set are passed on for the endpoint to judge, not dropped
    r = run_node(
        run_graph,
        gen(
            endpoint="together",
            model_override="black-forest-labs/FLUX.1-schnell",
            size="512x512",
            quality="high",
            output_format="jpeg",
        ),
    )
    assert r.status == "success", r.error
    sent = openai_server.requests[-1]["json"]
    assert sent["quality"] == "high" and sent["output_format"] == "jpeg" and "style" not in sent


def test_base_url_override_to_an_unconfigured_host_is_refused(run_graph, openai_server):
    from kiln.engine import ValidationFailed

    with pytest.raises(ValidationFailed) as ei:
        run_node(run_graph, gen(base_url="https://collector.example.net/v1"))
    msg = str(ei.value)
    assert "input 'base_url'" in msg and "only sends a key" in msg
    assert openai_server.requests == []


def test_loopback_override_gets_no_key(run_graph, openai_server):
    other = openai_server.base_url.replace("127.0.0.1", "localhost")
    r = run_node(run_graph, gen(base_url=other))
    assert "HTTP 401" in error_message(r)
    assert API_KEY not in openai_server.requests[0]["headers"]["Authorization"]


def test_keys_never_reach_graph_history_events_or_logs(run_graph, openai_server, caplog):
    caplog.set_level(logging.DEBUG)
    openai_server.inject(Fault("status", status=500))
    r = run_node(run_graph, gen(model="gpt-image-1", size="1024x1024", quality="low"))
    assert r.status == "success"
    r2 = run_node(run_graph, resp_node(), target="r1")
    assert r2.status == "success"
    blob = json.dumps([event_message(e)[1] for e in run_graph.events], default=str)
    blob += (
        json.dumps(r.outputs)
        + json.dumps(r2.outputs)
        + json.dumps(costs_of(r.annotations) + costs_of(r2.annotations), default=str)
    )
    blob += json.dumps([v for v in r.values["1"] if isinstance(v, str)])
    blob += caplog.text
    assert caplog.text  # the SDK and the retry loop did log
    assert API_KEY not in blob
    assert "prompt" in blob
