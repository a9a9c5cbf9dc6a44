import json

import pytest

import kiln
from kiln import AuthoringError, Graph
from kiln.runtime import default_registry


@pytest.fixture(autouse=True)
def _chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def build():
    g = Graph()
    img = g.EmptyImage(width=16, height=8, color=0x0000FF)
    inv = g.ImageInvert(image=img.out.IMAGE)
    g.SaveImage(images=inv.out.IMAGE, filename_prefix="authored")
    return g


def test_graph_runs_and_returns_images(tmp_path):
    res = kiln.run(build(), base_dir=tmp_path)
    assert res.status == "success"
    assert [p.name for p in res.files] == ["authored_00001_.png"]
    assert res.images[0].size == (16, 8) and res.images[0].getpixel((0, 0)) == (255, 255, 0)


def test_round_trip_with_api_format(tmp_path):
    g = build()
    g.save(tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["2"] == {"inputs": {"image": ["1", 0]}, "class_type": "ImageInvert", "_meta": {"title": "Invert Image"}}
    again = Graph.load(tmp_path / "g.json")
    assert again.to_json() == g.to_json()


def test_shipped_graph_loads_edits_and_resaves(tmp_path):
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "graphs" / "demo.json"
    g = Graph.load(src)
    g["Orange"]["color"] = 0x00FF00  # by title
    g.replace("6", "ImageScaleBy", scale_by=0.5)  # swap the blur for a scale, keeping its input link
    assert g["6"].class_type == "ImageScaleBy" and g["6"]["image"].node_id == "5"
    g.save(tmp_path / "edited.json")
    res = kiln.run(tmp_path / "edited.json", base_dir=tmp_path)
    assert res.images[0].size == (192, 128)


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda g, i: g.node("ImageInvert", imag=i.out.IMAGE), "did you mean 'image'"),
        (lambda g, i: g.ImageInvert(image=g.SolidMask().out.MASK), "expects IMAGE but got output MASK"),
        (lambda g, i: g.EmptyImage(width=0), "outside [1, 16384]"),
        (lambda g, i: g.ImageScale(image=i, upscale_method="cubic"), "not one of the choices"),
        (lambda g, i: g.ImageInvert(image=5), "takes a IMAGE from another node's output"),
        (lambda g, i: g.node("KSamplr"), "Unknown node type"),
        (lambda g, i: i.out.LATENT, "has no output 'LATENT'"),
    ],
)
def test_wrong_wiring_fails_at_the_line(make, msg):
    g = Graph()
    img = g.EmptyImage()
    with pytest.raises((AuthoringError, AttributeError)) as exc:
        make(g, img)
    assert msg in str(exc.value)


def test_generated_builders_are_current():
    from kiln import codegen

    reg = default_registry(entry_points=False, custom_nodes="/nonexistent")
    assert codegen.generate(reg) == codegen.TARGET.read_text(), "run `kiln stubs` to regenerate kiln/builders.py"


def test_targets_return_values(tmp_path):
    g = Graph()
    m = g.SolidMask(value=0.25, width=3, height=2)
    res = kiln.run(g, targets=[m.id], base_dir=tmp_path)
    assert res.values[m.id][0].shape == (1, 2, 3)
