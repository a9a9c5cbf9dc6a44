"""API-format JSON: load/save round trip, the envelope, UI-format rejection, and bad input of every kind."""

from __future__ import annotations

import json

import pytest
from engine_testnodes import G

from kiln.engine import BadLink, Graph, GraphFormatError, Link, parse_submission, validate
from kiln.engine.graph import decode_json
from kiln.server.protocol import format_error_data, validation_body

COMFY_STYLE = {
    "3": {
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8.0,
            "sampler_name": "euler",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0.0],
            "latent_image": ["5", 0],
        },
        "class_type": "KSampler",
        "_meta": {"title": "KSampler"},
    },
    "4": {
        "inputs": {"ckpt_name": "v1-5.safetensors"},
        "class_type": "CheckpointLoaderSimple",
        "_meta": {"title": "Load Checkpoint"},
    },
    "12:5": {
        "inputs": {"text": "a cat", "clip": ["4", 1]},
        "class_type": "CLIPTextEncode",
        "_meta": {"title": "Prompt ✨ ünïcode"},
    },
    "my_loader_1": {
        "inputs": {
            "values": {"__value__": [1, 2, 3]},
            "single": {"__value__": "x"},
            "nested": {"__value__": [[1, 2], ["a", 0]]},
            "d": {"k": [1, 2]},
            "empty": {"__value__": []},
            "none": None,
            "b": False,
        },
        "class_type": "Whatever",
    },
    "5.0.0.3": {"inputs": {}, "class_type": "EmptyLatentImage", "is_changed": ["abc"], "custom": 1},
    "odd_meta": {"inputs": {"x": 1}, "class_type": "Whatever", "_meta": "not an object"},
}


def test_round_trip_equal_json():
    g = Graph.from_json(json.loads(json.dumps(COMFY_STYLE)))
    out = json.loads(g.dumps())
    assert out == COMFY_STYLE
    # float slot stays a float
    assert isinstance(out["3"]["inputs"]["positive"][1], float)
    assert isinstance(out["3"]["inputs"]["model"][1], int)


def test_round_trip_through_file(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps(COMFY_STYLE), encoding="utf-8")
    g = Graph.load(p)
    g.save(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == COMFY_STYLE
    assert Graph.load(tmp_path / "out.json").to_json() == COMFY_STYLE


def test_model_is_explicit():
    g = Graph.from_json(json.loads(json.dumps(COMFY_STYLE)))
    ks = g.nodes["3"]
    assert ks.inputs["model"] == Link("4", 0, 0)
    assert isinstance(ks.inputs["positive"], Link) and ks.inputs["positive"].slot == 0
    assert ks.title == "KSampler"
    n = g.nodes["my_loader_1"]
    assert n.inputs["values"] == [1, 2, 3]  # unwrapped literal list, not a link
    assert n.inputs["nested"] == [[1, 2], ["a", 0]]
    assert not any(isinstance(v, Link) for v in n.inputs.values())
    assert g.nodes["12:5"].title == "Prompt ✨ ünïcode"
    assert list(g.nodes) == ["3", "4", "12:5", "my_loader_1", "5.0.0.3", "odd_meta"]
    assert g.nodes["odd_meta"].title is None


def test_bad_link_kept_for_validation():
    g = Graph.from_json({"1": {"class_type": "X", "inputs": {"a": ["1", 0, 2], "b": [3, 0]}}})
    assert isinstance(g.nodes["1"].inputs["a"], BadLink)
    assert g.to_json()["1"]["inputs"] == {"a": ["1", 0, 2], "b": [3, 0]}


def test_envelope_accepted():
    env = {
        "prompt": COMFY_STYLE,
        "client_id": "abc",
        "prompt_id": "p1",
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}},
        "partial_execution_targets": ["3"],
        "front": True,
        "number": 4,
    }
    g, sub = parse_submission(json.loads(json.dumps(env)))
    assert g.to_json() == COMFY_STYLE
    assert sub.client_id == "abc" and sub.prompt_id == "p1" and sub.front and sub.number == 4
    assert sub.extra_data["extra_pnginfo"]["workflow"] == {"nodes": []}
    assert sub.partial_execution_targets == ["3"]
    g2 = Graph.loads(json.dumps(env).encode())
    assert g2.to_json() == COMFY_STYLE


def test_node_named_prompt_is_not_an_envelope():
    data = {"prompt": {"class_type": "Const", "inputs": {"value": 1}}}
    g, sub = parse_submission(data)
    assert list(g.nodes) == ["prompt"] and sub.client_id is None


@pytest.mark.parametrize(
    "env,msg",
    [
        ({"prompt": None}, "No prompt provided"),
        ({"prompt": {}, "extra_data": []}, "extra_data"),
        ({"prompt": {}, "partial_execution_targets": "3"}, "partial_execution_targets"),
        ({"prompt": {}, "partial_execution_targets": [3]}, "partial_execution_targets"),
    ],
)
def test_bad_envelope(env, msg):
    with pytest.raises(GraphFormatError) as ei:
        parse_submission(env)
    assert msg in str(ei.value)


UI_WORKFLOW = {
    "last_node_id": 9,
    "last_link_id": 9,
    "nodes": [
        {
            "id": 3,
            "type": "KSampler",
            "pos": [863, 186],
            "size": [315, 262],
            "flags": {},
            "order": 4,
            "mode": 0,
            "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
            "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7], "slot_index": 0}],
            "properties": {"Node name for S&R": "KSampler"},
            "widgets_values": [1, "randomize", 20],
        }
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"]],
    "groups": [],
    "config": {},
    "extra": {},
    "version": 0.4,
}


@pytest.mark.parametrize(
    "wf",
    [
        UI_WORKFLOW,
        {"nodes": [], "links": [], "version": 0.4},
        {"id": "u", "nodes": [], "state": {"lastNodeId": 1}, "version": 1, "links": []},
    ],
)
def test_ui_format_rejected_with_export_hint(wf):
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(json.dumps(wf))
    err = ei.value
    assert "UI-format" in err.message
    assert "API" in err.details and "Export" in err.details
    shape = format_error_data(err)
    assert shape["type"] == "invalid_prompt" and set(shape) == {"type", "message", "details", "extra_info"}
    with pytest.raises(GraphFormatError):
        parse_submission({"prompt": wf})


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "{'1': {}}",
        '{"1": {"class_type": "Const",}}',
        "[1, 2",
        "nul",
        '{"a": 1} trailing',
        '{"1": {"class_type": "Const", "inputs": {"value": NaN}}}',
        '{"1": {"class_type": "Const", "inputs": {"value": Infinity}}}',
        '{"1": {"class_type": "Const", "inputs": {"value": -Infinity}}}',
    ],
)
def test_malformed_json_is_graph_format_error(text):
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(text)
    assert ei.value.message and isinstance(ei.value.details, str)


def test_nan_message_names_the_constant():
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads('{"1": {"class_type": "Const", "inputs": {"value": NaN}}}')
    assert "NaN" in str(ei.value)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"1": {"class_type": "\xff\xfe"}}',
        b"\xc3\x28",
        '{"1": {"class_type": "Caf\u00e9"}}'.encode("latin-1"),
    ],
)
def test_non_utf8_bytes(raw):
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(raw)
    assert "UTF-8" in str(ei.value)


def test_utf8_bom_accepted():
    g = Graph.loads(b"\xef\xbb\xbf" + json.dumps({"1": {"class_type": "Const", "inputs": {}}}).encode())
    assert "1" in g.nodes


@pytest.mark.parametrize("nest", ["[", '{"a":'])
def test_deeply_nested_json(nest):
    depth = 100_000
    closer = "]" if nest == "[" else "}"
    text = '{"1": {"class_type": "Const", "inputs": {"value": ' + nest * depth + "1" + closer * depth + "}}}"
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(text)
    assert "nested" in str(ei.value)


def test_huge_integer_literal():
    text = '{"1": {"class_type": "Const", "inputs": {"value": ' + "9" * 20_000 + "}}}"
    with pytest.raises(GraphFormatError):
        Graph.loads(text)


def test_too_large_json(monkeypatch):
    import kiln.engine.graph as gm

    monkeypatch.setattr(gm, "MAX_JSON_BYTES", 1000)
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(b'{"1": {"class_type": "' + b"x" * 2000 + b'"}}')
    assert "too large" in str(ei.value)


@pytest.mark.parametrize(
    "data",
    [
        [],
        "x",
        5,
        None,
        [{"class_type": "Const"}],
        {"1": "Const"},
        {"1": ["Const"]},
        {"1": None},
        {"1": 3},
        {"1": {"class_type": "Const", "inputs": []}},
        {"1": {"class_type": "Const", "inputs": "value=1"}},
    ],
)
def test_wrong_shapes(data):
    with pytest.raises(GraphFormatError) as ei:
        Graph.loads(json.dumps(data))
    assert ei.value.message


def test_lone_surrogate_in_string_literal_is_a_validation_error(reg):
    text = (
        '{"1": {"class_type": "TextIn", "inputs": {"text": "a\\ud800b"}}, '
        '"2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}'
    )
    g = Graph.loads(text)
    res = validate(g, reg)
    assert not res.ok
    e = res.problems["1"].issues[0]
    assert e.kind == "invalid_input_type"
    json.dumps(validation_body(res))  # reportable
    json.dumps(validation_body(res), ensure_ascii=False).encode("utf-8", "surrogatepass")


def test_lone_surrogates_elsewhere_never_crash(reg, run):
    text = (
        '{"\\udc80": {"class_type": "Const\\ud800", "inputs": {"v\\udfff": 1}, "_meta": {"title": "\\ud801"}}, '
        '"2": {"class_type": "Pick", "inputs": {"mode": "\\udc00"}}, '
        '"3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}'
    )
    g = Graph.loads(text)
    res = validate(g, reg)
    assert not res.ok
    assert res.error.kind == "invalid_prompt"
    json.dumps(validation_body(res))
    g.dumps()  # the model can still be written (ensure_ascii=False string)


def test_lone_surrogate_graph_can_be_saved(tmp_path):
    g = Graph.loads('{"1": {"class_type": "TextIn", "inputs": {"text": "a\\ud800"}}}')
    g.save(tmp_path / "x.json")
    assert Graph.load(tmp_path / "x.json").to_json() == g.to_json()


@pytest.mark.parametrize(
    "value",
    [
        "x" * 2_000_000,
        {"__value__": list(range(200_000))},
        {"__value__": json.loads("[" * 70 + "1" + "]" * 70)},
        {"deep": {"a": {"b": {"c": [1, {"d": [2] * 50}]}}}},
    ],
    ids=["long-string", "long-list", "nested-list", "nested-dict"],
)
@pytest.mark.parametrize(
    "cls,name", [("TextIn", "text"), ("Const", "value"), ("Pick", "mode"), ("AnyLiteral", "value")]
)
def test_huge_or_nested_values_never_crash(reg, ex, cls, name, value):
    data = {
        "1": {"class_type": cls, "inputs": {name: value}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    g = Graph.loads(json.dumps(data))
    res = validate(g, reg)
    text = json.dumps(validation_body(res))
    assert len(text) < 3_000_000
    if res.ok:
        r = ex.run(g, validation=res)
        assert r.status == "success", r.error
    else:
        assert res.problems["1"].issues[0].kind in ("invalid_input_type", "value_not_in_list")
        assert len(res.error.details) < 10_000
        for line in res.messages():
            assert len(line) < 10_000


def test_deeply_nested_value_within_json_limits(reg, ex):
    depth = 900
    text = (
        '{"1": {"class_type": "AnyLiteral", "inputs": {"value": {"__value__": '
        + "[" * depth
        + "]" * depth
        + '}}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}, '
        '"3": {"class_type": "Pick", "inputs": {"mode": {"__value__": ' + "[" * depth + "]" * depth + "}}},"
        '"4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}'
    )
    try:
        g = Graph.loads(text)
    except GraphFormatError:
        return  # refusing it is fine too
    res = validate(g, reg)
    json.dumps(validation_body(res))
    assert res.problems["3"].issues[0].kind == "value_not_in_list"
    r = ex.run(g, validation=res)
    assert r.status == "success", r.error


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_from_python_are_validation_errors(reg, value):
    for cls, name in (("Const", "value"), ("FloatIn", "x")):
        data = {
            "1": {"class_type": cls, "inputs": {name: value}},
            "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        }
        res = validate(G(data), reg)
        assert not res.ok
        assert res.problems["1"].issues[0].kind == "invalid_input_type"
        assert "finite" in res.problems["1"].issues[0].extra["error"]
        json.dumps(validation_body(res), allow_nan=False)


def test_overflowing_exponent_is_a_validation_error(reg):
    g = Graph.loads(
        '{"1": {"class_type": "FloatIn", "inputs": {"x": 1e400}}, '
        '"2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}'
    )
    res = validate(g, reg)
    assert res.problems["1"].issues[0].kind == "invalid_input_type"


def test_decode_json_edge_values():
    assert decode_json('{"a": "\\ud800"}') == {"a": "\ud800"}  # a lone surrogate: validation rejects it later
    assert decode_json('{"a": 1e999}') == {"a": float("inf")}  # overflow: validation rejects it later
    assert decode_json('"\\u0000"') == "\x00"
    assert decode_json(b'{"\\u0000": 1}') == {"\x00": 1}


def test_load_missing_file(tmp_path):
    with pytest.raises(GraphFormatError) as ei:
        Graph.load(tmp_path / "nope.json")
    assert "Cannot read" in str(ei.value)


def test_find_by_id_or_title():
    g = G(
        {
            "1": {"class_type": "Const", "inputs": {}, "_meta": {"title": "Seed"}},
            "2": {"class_type": "Const", "inputs": {}, "_meta": {"title": "Dup"}},
            "3": {"class_type": "Const", "inputs": {}, "_meta": {"title": "Dup"}},
        }
    )
    assert g.find("1").id == "1" and g.find("Seed").id == "1" and g.find("zz") is None
    with pytest.raises(GraphFormatError):
        g.find("Dup")


def test_list_and_tuple_literals_set_from_python_save_wrapped():
    g = G({"1": {"class_type": "AnyLiteral", "inputs": {}}})
    g.nodes["1"].inputs["value"] = ("n1", 0)  # looks like a link once it is a JSON list
    g.nodes["1"].inputs["other"] = ["n1", 0]
    out = json.loads(g.dumps())
    assert out["1"]["inputs"] == {"value": {"__value__": ["n1", 0]}, "other": {"__value__": ["n1", 0]}}
    back = Graph.from_json(out)
    assert back.nodes["1"].inputs["value"] == ["n1", 0] and not isinstance(back.nodes["1"].inputs["value"], Link)
