"""ValidateImage, PromptScreen, LoadImageURL and SaveImage's validate/provenance options."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kiln import engine
from kiln.nodes.providers import provenance
from tests.providers.fake_providers import render


class Make(engine.Node):
    outputs = ("IMAGE",)

    def run(self, kind: str = "gradient", h: int = 32, w: int = 32):
        if kind == "black":
            return torch.zeros(1, h, w, 3)
        if kind == "white":
            return torch.ones(1, h, w, 3)
        if kind == "flat":
            return torch.full((1, h, w, 3), 0.3)
        if kind == "nan":
            x = torch.rand(1, h, w, 3)
            x[0, 1, 1, 0] = float("nan")
            return x
        if kind == "range":
            return torch.rand(1, h, w, 3) * 2
        x = torch.rand(2, h, w, 3)
        return x


@pytest.fixture()
def reg(registry):
    registry.register(Make, "TestMake")
    return registry


def validate_graph(kind, **inputs):
    return {
        "m": {"class_type": "TestMake", "inputs": {"kind": kind}},
        "v": {"class_type": "ValidateImage", "inputs": {"images": ["m", 0], **inputs}},
    }


def run(ex, graph, target):
    return ex.run(engine.Graph.from_json(graph), targets=[target])


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("black", "blank (black)"),
        ("white", "blank (white)"),
        ("flat", "a single colour"),
        ("nan", "NaN"),
        ("range", "outside 0..1"),
    ],
)
def test_validate_image_rejects_unusable_images(reg, executor, kind, expect):
    r = run(executor, validate_graph(kind), "v")
    msg = r.error.message
    assert r.error.node_type == "ValidateImage" and msg.startswith("input 'images': image 0 of 1")
    assert expect in msg and "(" in msg


def test_validate_image_passes_good_images_and_checks_size(reg, executor):
    r = run(executor, validate_graph("gradient"), "v")
    assert r.status == "success" and r.values["v"][0].shape == (2, 32, 32, 3)
    msg = run(executor, validate_graph("gradient", min_size=64), "v").error.message
    assert "smaller than 64x64" in msg


def screen_graph(text, **inputs):
    return {"p": {"class_type": "PromptScreen", "inputs": {"text": text, **inputs}}}


def test_prompt_screen_blocks_terms_words_and_patterns(reg, executor):
    r = run(executor, screen_graph("A Gory scene", block_list="gore, gory"), "p")
    msg = r.error.message
    assert msg.startswith("input 'text'") and "blocked term 'Gory'" in msg and "at character 2" in msg
    assert run(executor, screen_graph("gorgeous sunset", block_list="gore"), "p").status == "success"  # words
    msg = run(executor, screen_graph("buy now 50% off", block_list="/\\d+% off/"), "p").error.message
    assert "'50% off'" in msg
    msg = run(executor, screen_graph("x", block_list="/(unclosed/"), "p").error.message
    assert msg.startswith("input 'block_list'") and "regular expression" in msg
    assert run(executor, screen_graph("a calm lake"), "p").values["p"] == ("a calm lake",)


def test_prompt_screen_length_and_config_list(reg, executor, kiln_config):
    msg = run(executor, screen_graph("x" * 50, max_length=10), "p").error.message
    assert "50 characters, over the limit of 10" in msg
    kiln_config.write_text(kiln_config.read_text() + "prompt_screen:\n  block: [forbidden]\n  max_length: 30\n")
    assert "forbidden" in run(executor, screen_graph("a forbidden thing"), "p").error.message
    assert run(executor, screen_graph("a forbidden thing", use_config_list=False), "p").status == "success"
    assert "over the limit of 30" in run(executor, screen_graph("y" * 31), "p").error.message


# -- LoadImageURL -------------------------------------------------------------------------------------


def url_graph(url, **inputs):
    return {"u": {"class_type": "LoadImageURL", "inputs": {"url": url, **inputs}}}


def test_load_image_url(reg, executor, openai_server):
    openai_server.files["pic.png"] = render("40x30", "url", "png", True)
    r = run(executor, url_graph(f"http://127.0.0.1:{openai_server.port}/files/pic.png"), "u")
    assert r.status == "success", r.error
    img, mask = r.values["u"]
    assert img.shape == (1, 30, 40, 3) and float(mask[0, :5].mean()) == 1.0  # transparent top rows
    assert run(executor, url_graph(f"http://127.0.0.1:{openai_server.port}/files/pic.png"), "u").cached == ["u"]


@pytest.mark.parametrize(
    "name,body,inputs,expect",
    [
        ("big.png", None, {"max_bytes": 100}, "over the limit of 100"),
        ("page.html", (b"<html></html>", "text/html"), {}, "content type 'text/html'"),
        ("broken.png", (b"\x89PNG nope", "image/png"), {}, "not an image Kiln can decode"),
        ("missing.png", "absent", {}, "HTTP 404"),
        ("slow.png", None, {"timeout_s": 0.3}, "longer than 0.3s"),
    ],
)
def test_load_image_url_errors(reg, executor, openai_server, name, body, inputs, expect):
    if body is None:
        openai_server.files[name] = render("64x64", name, "png")
    elif body != "absent":
        openai_server.files[name] = body
    r = run(executor, url_graph(f"http://127.0.0.1:{openai_server.port}/files/{name}", **inputs), "u")
    msg = r.error.message
    assert expect in msg and msg.startswith("input '"), msg


def test_load_image_url_follows_redirects_and_checks_each_hop(reg, executor, openai_server, monkeypatch):
    openai_server.files["pic2.png"] = render("20x10", "redirect", "png")
    base = f"http://127.0.0.1:{openai_server.port}/files"
    r = run(executor, url_graph(f"{base}/redirect-pic2.png"), "u")
    assert r.status == "success" and r.values["u"][0].shape == (1, 10, 20, 3)
    # a redirect into a link-local address is refused at that hop
    from kiln.nodes.providers import imageio

    monkeypatch.setattr(imageio.os, "environ", {**imageio.os.environ, "KILN_ALLOW_PRIVATE_URLS": "0"})
    checked = []
    real = imageio.check_url

    def check_first_hop_only_public(url, input_name="url"):
        checked.append(url)
        if len(checked) > 1:  # the first hop is our loopback test server, standing in for a public host
            real(url, input_name)

    monkeypatch.setattr(imageio, "check_url", check_first_hop_only_public)
    msg = run(
        executor, url_graph(f"{base}/redirect-x?to=http://169.254.169.254/latest/meta-data", reload=True), "u"
    ).error.message
    assert "private address (169.254.169.254)" in msg and checked[-1].startswith("http://169.254.169.254")


def test_load_image_url_refuses_private_hosts_unless_allowed(reg, executor, openai_server, monkeypatch):
    monkeypatch.delenv("KILN_ALLOW_PRIVATE_URLS")
    for url in (
        f"http://127.0.0.1:{openai_server.port}/files/x.png",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ):
        msg = run(executor, url_graph(url), "u").error.message
        assert msg.startswith("input 'url'") and ("private address" in msg or "not an http(s) URL" in msg)
    assert openai_server.requests == []


# -- SaveImage options ----------------------------------------------------------------------------------


def test_save_image_embeds_provenance_and_validates(reg, executor, openai_server, tmp_path):
    g = {
        "m": {
            "class_type": "OpenAIImageGenerate",
            "inputs": {"prompt": "a pear", "model": "dall-e-3", "size": "1024x1024"},
        },
        "s": {
            "class_type": "SaveImage",
            "inputs": {
                "images": ["m", 0],
                "filename_prefix": "prov",
                "embed_provenance": True,
                "validate": True,
                "generation_info": ["m", 3],
            },
        },
    }
    r = executor.run(engine.Graph.from_json(g))
    assert r.status == "success", r.error
    f = tmp_path / "output" / r.outputs["s"]["images"][0]["filename"]
    data = f.read_bytes()
    rec = provenance.read(data)
    params = rec["assertions"][0]["data"]["actions"][0]["parameters"]
    assert params["model"] == "dall-e-3" and params["revised_prompt"] == "A detailed rendering of a pear"
    assert json.loads(Image.open(io.BytesIO(data)).text["prompt"])["s"]["class_type"] == "SaveImage"
    assert rec["assertions"][1]["data"]["hash"] == provenance.pixel_hash(np.asarray(Image.open(f).convert("RGB")))

    flat = {
        "m": {"class_type": "TestMake", "inputs": {"kind": "flat"}},
        "s": {"class_type": "SaveImage", "inputs": {"images": ["m", 0], "validate": True}},
    }
    msg = executor.run(engine.Graph.from_json(flat)).error.message
    assert "single colour" in msg
    plain = {
        "m": {"class_type": "TestMake", "inputs": {"kind": "flat"}},
        "s": {"class_type": "SaveImage", "inputs": {"images": ["m", 0]}},
    }
    r = executor.run(engine.Graph.from_json(plain))
    assert r.status == "success"
    saved = Image.open(tmp_path / "output" / r.outputs["s"]["images"][0]["filename"])
    assert provenance.CHUNK not in saved.text  # off by default: SaveImage is unchanged
