"""Editor (UI-format) workflows converted to API graphs, as the editor's Export (API) writes them.

Fixtures under ``ui_workflows/``: ``NAME.json`` is a workflow as the editor saves it and ``NAME.api.json`` the
prompt the editor's Export (API) writes for it (worked out from the editor's rules: see engine/ui_workflow.py).
"""

from __future__ import annotations

import copy
import io
import json
import random
import sys
import zlib
from pathlib import Path

import pytest

from kiln.engine import Graph, GraphFormatError, parse_submission, validate
from kiln.engine.ui_workflow import (
    expand_dynamic_prompt,
    graph_data_from_png,
    png_text_chunks,
    workflow_to_prompt,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "ui_workflows"
sys.path.insert(0, str(FIXTURES))

from editor_layout import editor_workflow, expected_api  # noqa: E402


@pytest.fixture(scope="module")
def registry():
    from kiln.runtime import default_registry

    return default_registry(custom_nodes=FIXTURES / "no-custom-nodes", entry_points=False)


def convert(wf, registry) -> dict:
    return workflow_to_prompt(json.loads(json.dumps(wf)), registry, rng=random.Random(0))


def as_loaded(api: dict) -> dict:
    """An API dict as Kiln loads and writes it back (the form both sides are compared in)."""
    return Graph.from_json(api).to_json()


# -- equivalence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "graphs").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_graph_survives_the_editor(path, registry):
    """Each graph in graphs/, laid out as the editor saves it, converts back to the same graph."""
    api = json.loads(path.read_text())
    wf = editor_workflow(api, registry)
    assert all("widgets_values" in n for n in wf["nodes"])
    got = convert(wf, registry)
    assert got == expected_api(api, registry)
    assert as_loaded(got) == as_loaded(expected_api(api, registry))


def test_a_hand_saved_txt2img_is_the_shipped_graph(registry):
    """A workflow written the way ComfyUI's editor saves its default graph (seed with "randomize" after it,
    a group box, SaveImage with ComfyUI's single widget) is graphs/txt2img.json."""
    wf = json.loads((FIXTURES / "txt2img_editor.json").read_text())
    got = convert(wf, registry)
    api = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    assert got == expected_api(api, registry)
    assert got["3"]["inputs"]["seed"] == 42 and got["3"]["inputs"]["steps"] == 20  # "randomize" skipped
    assert "control_after_generate" not in got["3"]["inputs"]
    assert got["3"]["inputs"]["model"] == ["4", 0] and got["3"]["inputs"]["negative"] == ["7", 0]
    assert got["3"]["_meta"]["title"] == "KSampler"  # no title saved: the display name


@pytest.mark.parametrize("name", ["reroute_primitive", "bypass_mute", "subgraph", "empty_image_save"])
def test_hand_written_workflows(name, registry):
    wf = json.loads((FIXTURES / f"{name}.json").read_text())
    want = json.loads((FIXTURES / f"{name}.api.json").read_text())
    # widgets a Kiln node declares beyond the saved ones take their defaults, as the editor gives them on load
    assert convert(wf, registry) == expected_api(want, registry)


def test_reroutes_primitives_and_converted_widgets(registry):
    got = convert(json.loads((FIXTURES / "reroute_primitive.json").read_text()), registry)
    assert set(got) == {"1", "4", "6", "7", "10", "12", "13"}  # reroutes, primitive, notes not exported
    scale = got["4"]["inputs"]
    assert scale["image"] == ["1", 0]  # through two reroutes
    assert scale["width"] == 96  # the PrimitiveNode's value, not the widget's stale 512
    assert scale["height"] == ["6", 1]  # a widget converted to an input takes the link
    assert got["10"]["inputs"] == {"value": 7}  # PrimitiveInt's control mode "increment" skipped
    assert got["12"]["inputs"]["y"] == 4 and got["12"]["inputs"]["x"] == ["10", 0]


def test_bypass_and_mute(registry):
    got = convert(json.loads((FIXTURES / "bypass_mute.json").read_text()), registry)
    assert "2" not in got and "5" not in got and "8" not in got and "10" not in got
    assert got["3"]["inputs"]["image"] == ["1", 0]  # bypassed ImageInvert passes its input through
    assert "image2" not in got["6"]["inputs"]  # fed by a muted node: the input is dropped, as the editor does
    assert got["9"]["inputs"] == {}  # bypassed ImageBlend passes image1, which comes from the muted node
    assert got["11"]["inputs"] == {}  # a bypassed node without a LATENT input passes nothing


def test_subgraph_instances_get_path_ids(registry):
    got = convert(json.loads((FIXTURES / "subgraph.json").read_text()), registry)
    assert [k for k in got if ":" in k] == ["10:21", "10:22", "12:21", "12:22"]  # the muted inner node is gone
    assert got["10:21"]["inputs"]["blur_radius"] == 5  # the instance's promoted widget value
    assert got["12:21"]["inputs"]["blur_radius"] == ["13", 0]  # the instance's input is linked
    assert got["11"]["inputs"]["images"] == ["10:22", 0]  # subgraph output wired through


def test_converted_graph_validates_and_runs_headless(registry):
    """The subgraph workflow validates against the real registry (path ids and all)."""
    g = Graph.from_json(json.loads((FIXTURES / "subgraph.json").read_text()), registry)
    res = validate(g, registry)
    assert res.ok, res.messages()
    assert set(res.outputs) == {"11", "14"}


# -- the other shapes the editor saves ----------------------------------------------------------------------


def _tiny(registry, **node2):
    wf = editor_workflow(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 2.0}},
        },
        registry,
    )
    wf["nodes"][1].update(node2)
    return wf


def test_widgets_values_by_name(registry):
    wf = _tiny(registry, widgets_values={"sigma": 0.5, "blur_radius": 4})
    assert convert(wf, registry)["2"]["inputs"] == {"image": ["1", 0], "blur_radius": 4, "sigma": 0.5}
    wf = _tiny(registry, widgets_values=[9, 9.0], widgets_values_named={"blur_radius": 6, "sigma": 1.5})
    assert convert(wf, registry)["2"]["inputs"]["blur_radius"] == 6  # the named copy wins


def test_link_objects_of_schema_version_1(registry):
    wf = _tiny(registry)
    wf["version"] = 1
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    wf["links"] = [dict(zip(keys, lk, strict=True)) for lk in wf["links"]]
    assert convert(wf, registry)["2"]["inputs"]["image"] == ["1", 0]


def test_fewer_saved_widgets_take_defaults(registry):
    wf = _tiny(registry, widgets_values=[5])  # saved by an older node with one widget
    assert convert(wf, registry)["2"]["inputs"] == {"image": ["1", 0], "blur_radius": 5, "sigma": 1.0}


def test_list_values_are_wrapped_and_dynamic_prompts_expand(registry):
    wf = editor_workflow({"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}}}, registry)
    wf["nodes"][0]["widgets_values"] = ["a {red|red} // comment\ncircle /* gone */ \\{kept\\}"]
    got = convert(wf, registry)
    assert got["1"]["inputs"]["text"] == "a red \ncircle  {kept}"
    rng = random.Random(1)
    seen = {expand_dynamic_prompt("{a|b|{c|d}}", rng) for _ in range(200)}
    assert seen == {"a", "b", "c", "d"}


def test_unknown_node_kept_for_validation(registry):
    wf = _tiny(registry, type="FancyBlur9000", widgets_values=[1, 2])
    got = convert(wf, registry)
    assert got["2"]["class_type"] == "FancyBlur9000" and got["2"]["inputs"] == {"image": ["1", 0]}
    res = validate(Graph.from_json(got), registry)
    assert not res.ok and any("FancyBlur9000" in m for m in res.messages())


def test_loading_needs_a_registry_for_ui_format(registry, tmp_path):
    wf = _tiny(registry)
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(json.dumps(wf))
    assert "UI-format" in ei.value.message and "registry" in ei.value.details
    p = tmp_path / "wf.json"
    p.write_text(json.dumps(wf))
    g = Graph.load(p, registry=registry)
    assert g["2"].class_type == "ImageBlur" and g["2"].title == "Image Blur"
    g2, sub = parse_submission({"prompt": wf, "client_id": "c"}, registry)
    assert g2.to_json() == g.to_json() and sub.client_id == "c"
    assert Graph.from_json(wf, lambda: registry).to_json() == g.to_json()  # a registry built on demand


def test_kiln_graph_load_accepts_ui_workflows(registry, tmp_path):
    import kiln

    p = tmp_path / "wf.json"
    p.write_text(json.dumps(_tiny(registry)))
    g = kiln.Graph.load(p, registry)
    assert g.to_json()["2"]["inputs"]["blur_radius"] == 3


# -- PNGs -----------------------------------------------------------------------------------------------------


def _png(texts: dict[str, str], itxt: dict[str, str] | None = None) -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    for k, v in (itxt or {}).items():
        info.add_itxt(k, v, zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_png_text_chunks_all_kinds():
    data = _png({"plain": "é text"}, {"unicode": "ünï ✨"})
    chunks = png_text_chunks(data)
    assert chunks["plain"] == "é text" and chunks["unicode"] == "ünï ✨"
    body = b"ztxt\0\0" + zlib.compress(b"squeezed")
    import struct

    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    assert png_text_chunks(data[:8] + chunk + data[8:])["ztxt"] == "squeezed"


def test_png_prompt_preferred_then_workflow(registry, tmp_path):
    api = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 1}}}
    wf = _tiny(registry)
    both = tmp_path / "both.png"
    both.write_bytes(_png({"prompt": json.dumps(api), "workflow": json.dumps(wf)}))
    assert Graph.load(both).to_json() == api  # the API prompt needs no registry
    only_wf = tmp_path / "wf.png"
    only_wf.write_bytes(_png({"workflow": json.dumps(wf)}))
    assert Graph.load(only_wf, registry=registry)["2"].class_type == "ImageBlur"
    bare = tmp_path / "bare.png"
    bare.write_bytes(_png({"parameters": "a1111 text"}))
    with pytest.raises(GraphFormatError, match="no workflow"):
        Graph.load(bare)
    assert graph_data_from_png(both.read_bytes()) == api


# -- malformed workflows: a GraphFormatError naming the node and the fix, never a traceback -----------------------


def _broken(registry, how):
    wf = _tiny(registry)
    how(wf)
    return wf


BROKEN = {
    "link to nowhere": (lambda wf: wf["nodes"][1]["inputs"][0].update(link=99), "link 99"),
    "origin missing": (lambda wf: wf["links"][0].__setitem__(1, 77), "#77"),
    "too many widget values": (lambda wf: wf["nodes"][1].update(widgets_values=[1, 2, 3]), "ImageBlur"),
    "nodes not a list": (lambda wf: wf.update(nodes={"1": {}}), "'nodes'"),
    "node not an object": (lambda wf: wf["nodes"].append(["x"]), "not a node object"),
    "no type": (lambda wf: wf["nodes"][1].pop("type"), "no 'type'"),
    "bad link row": (lambda wf: wf["links"].append([1, 2]), "not [id"),
    "string link id": (lambda wf: wf["nodes"][1]["inputs"][0].update(link="one"), "integer"),
    "widgets not a list": (lambda wf: wf["nodes"][1].update(widgets_values="3"), "widgets_values"),
    "legacy group node": (lambda wf: wf["nodes"][1].update(type="workflow>My group"), "group node"),
    "subgraph definition missing": (
        lambda wf: wf["nodes"][1].update(type="0b7c54f2-4b1e-4b7e-9a53-3d2c1f0e9a88"),
        "definition is missing",
    ),
    "duplicate id": (lambda wf: wf["nodes"][1].update(id=1), "twice"),
    "empty": (lambda wf: wf.update(nodes=[]), "no nodes"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_workflows_raise_format_errors(case, registry):
    how, needle = BROKEN[case]
    with pytest.raises(GraphFormatError) as ei:
        convert(_broken(registry, how), registry)
    assert needle in ei.value.message and ei.value.details


def test_reroute_cycle_is_reported(registry):
    wf = _tiny(registry)
    wf["nodes"] += [
        {"id": 5, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 11}], "outputs": []},
        {"id": 6, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 10}], "outputs": []},
    ]
    wf["links"] += [[10, 5, 0, 6, 0, "*"], [11, 6, 0, 5, 0, "*"], [12, 6, 0, 2, 0, "IMAGE"]]
    wf["nodes"][1]["inputs"][0]["link"] = 12
    with pytest.raises(GraphFormatError) as ei:
        convert(wf, registry)
    assert "circle" in ei.value.message and "#2" in ei.value.message and "Reroute" in ei.value.message


def test_long_reroute_chain_needs_no_recursion(registry):
    wf = _tiny(registry)
    n = 3000
    for i in range(n):
        wf["nodes"].append(
            {"id": 100 + i, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1000 + i}]}
        )
        wf["links"].append([1000 + i, 1 if i == 0 else 99 + i, 0, 100 + i, 0, "IMAGE"])
    wf["links"].append([5000, 99 + n, 0, 2, 0, "IMAGE"])
    wf["nodes"][1]["inputs"][0]["link"] = 5000
    assert convert(wf, registry)["2"]["inputs"]["image"] == ["1", 0]


def test_subgraph_that_contains_itself(registry):
    wf = json.loads((FIXTURES / "subgraph.json").read_text())
    sg = wf["definitions"]["subgraphs"][0]
    sg["nodes"].append(copy.deepcopy(wf["nodes"][1]) | {"id": 9})
    with pytest.raises(GraphFormatError, match="contains itself"):
        convert(wf, registry)


def test_nested_subgraphs_and_a_primitive_on_a_subgraph_input(registry):
    """An instance inside a subgraph gets a two-level path id; a PrimitiveNode feeding a promoted subgraph
    input sets the widget inside."""
    wf = json.loads((FIXTURES / "subgraph.json").read_text())
    inner = wf["definitions"]["subgraphs"][0]
    outer = copy.deepcopy(inner) | {"id": "7d3e2a10-5c4b-4e8f-8a6d-2b1c0f9e8d7a", "name": "Wrapper"}
    instance = copy.deepcopy(wf["nodes"][3]) | {"id": 5, "type": inner["id"]}  # like root node 12, inside
    instance["inputs"] = [
        {"name": "image", "type": "IMAGE", "link": 201},
        {"name": "blur_radius", "type": "INT", "widget": {"name": "blur_radius"}, "link": 202},
    ]
    instance["outputs"] = [{"name": "IMAGE", "type": "IMAGE", "links": [203]}]

    def lk(i, o, os_, t, ts):
        return {"id": i, "origin_id": o, "origin_slot": os_, "target_id": t, "target_slot": ts, "type": "*"}

    outer["nodes"] = [instance]
    outer["links"] = [lk(201, -10, 0, 5, 0), lk(202, -10, 1, 5, 1), lk(203, 5, 0, -20, 0)]
    wf["definitions"]["subgraphs"].append(outer)
    wf["nodes"][1]["type"] = outer["id"]  # root node 10 now wraps the inner subgraph
    wf["nodes"].append(
        {
            "id": 20,
            "type": "PrimitiveNode",
            "mode": 0,
            "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "blur_radius"}, "links": [30]}],
            "widgets_values": [11, "fixed"],
        }
    )
    wf["nodes"][1]["inputs"].append(
        {"name": "blur_radius", "type": "INT", "widget": {"name": "blur_radius"}, "link": 30}
    )
    wf["links"].append([30, 20, 0, 10, 1, "INT"])
    got = convert(wf, registry)
    assert [k for k in got if k.startswith("10:")] == ["10:5:21", "10:5:22"]
    assert got["10:5:21"]["inputs"] == {"blur_radius": 11, "sigma": 0.5, "image": ["1", 0]}
    assert got["11"]["inputs"]["images"] == ["10:5:22", 0]
    # without the primitive, the wrapper's own promoted value (widgets_values [5]) reaches the inner node
    wf["nodes"].pop()
    wf["nodes"][1]["inputs"].pop()
    wf["links"].pop()
    assert convert(wf, registry)["10:5:21"]["inputs"]["blur_radius"] == 5


def test_primitive_on_a_widget_the_node_lacks_is_ignored(registry):
    """The editor sets only widgets the node has: a primitive wired to an unknown widget name changes
    nothing, and the dangling input is not exported."""
    wf = _tiny(registry)
    wf["nodes"][1]["inputs"].append({"name": "radius", "type": "INT", "widget": {"name": "radius"}, "link": 40})
    wf["nodes"].append(
        {
            "id": 9,
            "type": "PrimitiveNode",
            "mode": 0,
            "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "radius"}, "links": [40]}],
            "widgets_values": [12, "fixed"],
        }
    )
    wf["links"].append([40, 9, 0, 2, 1, "INT"])
    assert convert(wf, registry)["2"]["inputs"] == {"image": ["1", 0], "blur_radius": 3, "sigma": 2.0}
