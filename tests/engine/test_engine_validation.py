"""Validation: every error type, ComfyUI's {error, node_errors} shape, hints, partial success."""

from __future__ import annotations

import json

import pytest
from engine_testnodes import G

from kiln import engine
from kiln.engine import ValidationFailed, validate
from kiln.server.protocol import validation_body

ERROR_KEYS = {"type", "message", "details", "extra_info"}


def check_shape(res: engine.ValidationResult) -> None:
    """The result serialises to JSON in ComfyUI's shape."""
    out = json.loads(json.dumps(validation_body(res)))
    assert set(out) == {"error", "node_errors"}
    if out["error"] is not None:
        assert set(out["error"]) == ERROR_KEYS
    for nid, ne in out["node_errors"].items():
        assert isinstance(nid, str)
        assert set(ne) == {"errors", "dependent_outputs", "class_type"}
        for e in ne["errors"]:
            assert set(e) == ERROR_KEYS
            assert isinstance(e["extra_info"], dict)


def errors_of(res, nid):
    return res.problems[nid].issues


def one_error(res, nid, type_):
    errs = [e for e in errors_of(res, nid) if e.kind == type_]
    assert len(errs) == 1, errors_of(res, nid)
    return errs[0]


def hint(e):
    return e.extra["hint"]


def good_base():
    return {
        "1": {"class_type": "Const", "inputs": {"value": 2}, "_meta": {"title": "Source"}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}, "_meta": {"title": "Viewer"}},
    }


def test_valid_graph_has_no_errors(reg):
    res = validate(G(good_base()), reg)
    assert res.ok and res.error is None and res.problems == {}
    assert res.outputs == ["2"]
    check_shape(res)


def test_unknown_class_with_did_you_mean(reg):
    g = good_base()
    g["1"]["class_type"] = "Cosnt"
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    assert res.error.kind == "invalid_prompt"
    assert res.error.message == "Cannot execute because node Cosnt does not exist."
    assert res.error.details == "Node ID '#1'"
    h = hint(one_error(res, "1", "invalid_prompt"))
    assert "'Const'" in h and "Did you mean" in h and "Node 1" in h and "Source" in h


def test_unknown_classes_are_all_collected(reg):
    g = good_base()
    g["1"]["class_type"] = "Nope1"
    g["3"] = {"class_type": "Nope2", "inputs": {}}
    res = validate(G(g), reg)
    assert set(res.problems) == {"1", "3"}
    assert res.error.details == "Node ID '#1'"


@pytest.mark.parametrize("bad", [None, "", 5, ["Const"], {"a": 1}])
def test_missing_or_bad_class_type(reg, bad):
    g = good_base()
    if bad is None:
        del g["1"]["class_type"]
    else:
        g["1"]["class_type"] = bad
    res = validate(G(g), reg)
    check_shape(res)
    assert res.error.kind == "invalid_prompt"
    if bad in (None, ""):
        assert res.error.message == "Cannot execute because a node is missing the class_type property."
    assert res.error.details == "Node ID '#1'"
    e = errors_of(res, "1")[0]
    assert "Node 1" in hint(e) and "Source" in hint(e)


def test_missing_required_input(reg):
    g = good_base()
    g["3"] = {"class_type": "Add", "inputs": {"b": 2}, "_meta": {"title": "Adder"}}
    g["4"] = {"class_type": "Show", "inputs": {"value": ["3", 0]}}
    res = validate(G(g), reg)
    assert res.ok  # output 2 is still good: partial success
    check_shape(res)
    e = one_error(res, "3", "required_input_missing")
    assert e.message == "Required input is missing"
    assert e.details == "a" and e.extra["input_name"] == "a"
    assert "Node 3" in hint(e) and "Adder" in hint(e) and "'a'" in hint(e) and "INT" in hint(e)
    assert res.problems["3"].dependent_outputs == ["4"]
    assert res.problems["3"].class_type == "Add"
    assert "4" not in res.problems  # failed only because of upstream: not listed
    assert res.outputs == ["2"]


def test_widget_default_fills_missing_literal(reg):
    g = {"1": {"class_type": "Const", "inputs": {}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    graph = G(g)
    res = validate(graph, reg)
    assert res.ok
    assert graph.nodes["1"].inputs["value"] == 0


@pytest.mark.parametrize("link", [["1"], ["1", 0, 1], [], [1, 0], ["1", "0"], ["1", -1], ["1", 0.5], [None, 0]])
def test_bad_link_list(reg, link):
    g = good_base()
    g["2"]["inputs"]["value"] = link
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    e = one_error(res, "2", "bad_linked_input")
    assert e.message == "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    assert e.details == "value"
    assert e.extra["received_value"] == link
    assert e.extra["input_config"][0] == "*"
    assert "__value__" in hint(e) and "Viewer" in hint(e)
    assert res.error.kind == "prompt_outputs_failed_validation"
    assert res.error.message == "Prompt outputs failed validation"
    assert "Bad linked input" in res.error.details


def test_link_to_missing_node(reg):
    g = good_base()
    g["2"]["inputs"]["value"] = ["99", 0]
    res = validate(G(g), reg)
    assert not res.ok
    e = errors_of(res, "2")[0]
    # ComfyUI's shape for this case (recorded transcript): an inner-validation KeyError on the id
    assert e.kind == "exception_during_inner_validation" and e.message == "Exception when validating inner node"
    assert e.details == "'99'" and e.extra["exception_type"] == "KeyError"
    assert e.extra["linked_node"] == ["99", 0]
    assert "99" in hint(e) and "Viewer" in hint(e) and "'value'" in hint(e)


def test_out_of_range_slot(reg):
    g = good_base()
    g["2"]["inputs"]["value"] = ["1", 3]
    res = validate(G(g), reg)
    assert not res.ok
    e = errors_of(res, "2")[0]
    assert e.kind == "exception_during_validation"
    assert "has only 1 output" in hint(e) and "['INT']" in hint(e) and "Node 2" in hint(e)


def test_type_mismatch_along_link(reg):
    g = {
        "1": {"class_type": "TextIn", "inputs": {"text": "x"}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}, "_meta": {"title": "Sum"}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    e = one_error(res, "2", "return_type_mismatch")
    assert e.message == "Return type mismatch between linked nodes"
    assert e.details == "a, received_type(STRING) mismatch input_type(INT)"
    assert e.extra["received_type"] == "STRING"
    assert e.extra["linked_node"] == ["1", 0]
    assert e.extra["input_name"] == "a"
    assert "Sum" in hint(e) and "expects INT" in hint(e)


def test_type_union_and_any_are_compatible():
    from kiln.engine.types import types_compatible

    assert types_compatible("INT", "INT,FLOAT")
    assert types_compatible("*", "IMAGE") and types_compatible("IMAGE", "*")
    assert not types_compatible("IMAGE", "MASK")
    assert types_compatible(["a", "b"], "COMBO")


@pytest.mark.parametrize(
    "cls,name,value,exc_part",
    [
        ("Const", "value", "abc", "abc"),
        ("Const", "value", {"x": 1}, "dict"),
        ("Const", "value", {"__value__": [1, 2]}, "list"),
        ("FloatIn", "x", "one", "one"),
        ("TextIn", "text", {"__value__": ["a"]}, "list"),
        ("Flag", "on", "maybe", "maybe"),
        ("Flag", "on", 7, "7"),
    ],
)
def test_literal_of_wrong_type(reg, cls, name, value, exc_part):
    g = {
        "1": {"class_type": cls, "inputs": {name: value}, "_meta": {"title": "T1"}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    e = one_error(res, "1", "invalid_input_type")
    assert e.message.startswith("Failed to convert an input value to a ")
    assert e.details.startswith(f"{name}, ")
    assert e.extra["input_name"] == name
    assert "error" in e.extra
    assert exc_part in e.details + e.extra["error"]
    assert "T1" in hint(e) and f"'{name}'" in hint(e)


def test_object_type_literal_rejected(reg):
    g = {
        "1": {"class_type": "Invert", "inputs": {"image": 5}},
        "2": {"class_type": "ShowImage", "inputs": {"image": ["1", 0]}},
    }
    res = validate(G(g), reg)
    e = one_error(res, "1", "invalid_input_type")
    assert e.message == "Failed to convert an input value to a IMAGE value"
    assert "link" in hint(e)


def test_coercion_in_place_like_comfy(reg):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": "7"}},
        "2": {"class_type": "FloatIn", "inputs": {"x": 1}},
        "3": {"class_type": "TextIn", "inputs": {"text": 12}},
        "4": {"class_type": "Const", "inputs": {"value": 7.9}},
        "5": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "6": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
        "7": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
        "8": {"class_type": "Show", "inputs": {"value": ["4", 0]}},
    }
    graph = G(g)
    res = validate(graph, reg)
    assert res.ok, res.summary()
    assert graph.nodes["1"].inputs["value"] == 7 and type(graph.nodes["1"].inputs["value"]) is int
    assert graph.nodes["2"].inputs["x"] == 1.0 and type(graph.nodes["2"].inputs["x"]) is float
    assert graph.nodes["3"].inputs["text"] == "12"
    assert graph.nodes["4"].inputs["value"] == 7  # int(7.9) truncates, as ComfyUI


@pytest.mark.parametrize(
    "value,type_,bound", [(-1001, "value_smaller_than_min", -1000), (1001, "value_bigger_than_max", 1000)]
)
def test_min_max(reg, value, type_, bound):
    g = good_base()
    g["1"]["inputs"]["value"] = value
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    e = one_error(res, "1", type_)
    word = "smaller than min" if "min" in type_ else "bigger than max"
    assert e.message == f"Value {value} {word} of {bound}"
    assert e.details == "value"
    assert e.extra["received_value"] == value
    assert e.extra["input_config"][0] == "INT"
    assert e.extra["input_config"][1]["min"] == -1000
    assert "Source" in hint(e) and "between -1000 and 1000" in hint(e)


def test_float_range(reg):
    g = {
        "1": {"class_type": "FloatIn", "inputs": {"x": 1.5}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    e = one_error(validate(G(g), reg), "1", "value_bigger_than_max")
    assert e.message == "Value 1.5 bigger than max of 1.0"


def test_not_in_choice_list(reg):
    g = {
        "1": {"class_type": "Pick", "inputs": {"mode": "betta"}, "_meta": {"title": "Mode"}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    e = one_error(res, "1", "value_not_in_list")
    assert e.message == "Value not in list"
    assert e.details == "mode: 'betta' not in ['alpha', 'beta', 'gamma']"
    assert e.extra["input_config"] == [["alpha", "beta", "gamma"], {"default": "alpha"}]
    assert e.extra["received_value"] == "betta"
    assert "did you mean 'beta'" in hint(e) and "Mode" in hint(e)


def test_long_choice_list_is_summarised(reg):
    class ManyChoices(engine.Node):
        outputs = ("STRING",)

        def run(self, c: engine.Combo([f"c{i}" for i in range(30)]) = "c0"):
            return c

    reg.register(ManyChoices)
    g = {
        "1": {"class_type": "ManyChoices", "inputs": {"c": "zz"}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    e = one_error(validate(G(g), reg), "1", "value_not_in_list")
    assert e.details == "c: 'zz' not in (list of length 30)"
    assert e.extra["input_config"] is None


def test_no_output_node(reg):
    res = validate(G({"1": {"class_type": "Const", "inputs": {"value": 1}}}), reg)
    assert not res.ok
    check_shape(res)
    assert res.error.kind == "prompt_no_outputs"
    assert res.error.message == "Prompt has no outputs"
    assert res.error.details == ""
    assert "output node" in res.error.extra["hint"]
    assert res.problems == {}


def test_empty_graph_has_no_outputs(reg):
    assert validate(G({}), reg).error.kind == "prompt_no_outputs"


def test_dependency_cycle_lists_cycle_nodes(reg):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "a": {"class_type": "Add", "inputs": {"a": ["c", 0]}},
        "b": {"class_type": "Add", "inputs": {"a": ["a", 0]}},
        "c": {"class_type": "Add", "inputs": {"a": ["b", 0]}},
        "9": {"class_type": "Show", "inputs": {"value": ["c", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    assert set(res.problems) == {"a", "b", "c"}
    for nid in "abc":
        e = res.problems[nid].issues[0]
        assert set(e.extra["cycle"]) == {"a", "b", "c"}
        assert "cycle" in hint(e) and f"Node {nid}" in hint(e)
        assert res.problems[nid].dependent_outputs == ["9"]


def test_self_loop_is_a_cycle(reg):
    g = {
        "a": {"class_type": "Add", "inputs": {"a": ["a", 0]}},
        "9": {"class_type": "Show", "inputs": {"value": ["a", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    assert res.problems["a"].issues[0].extra["cycle"] == ["a"]


def test_long_cycle_no_recursion_error(reg):
    n = 5000
    g = {str(i): {"class_type": "Add", "inputs": {"a": [str((i + 1) % n), 0]}} for i in range(n)}
    g["out"] = {"class_type": "Show", "inputs": {"value": ["0", 0]}}
    res = validate(G(g), reg)
    assert not res.ok
    assert len(res.problems) == n
    e = res.problems["7"].issues[0]
    assert e.extra["cycle_length"] == n and "more" in e.details
    assert len(json.dumps(validation_body(res))) < 2000 * n  # linear in the cycle length, not quadratic


def test_custom_validation_failure(reg):
    g = {
        "1": {"class_type": "Checked", "inputs": {"value": 3}, "_meta": {"title": "Even"}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    check_shape(res)
    e = one_error(res, "1", "custom_validation_failed")
    assert e.message == "Custom validation failed for node"
    assert e.details == "value - 3 is odd; give an even number"
    assert e.extra["input_name"] == "value"
    assert "Even" in hint(e) and "odd" in hint(e)


def test_custom_validation_switches_off_builtin_range_check(reg):
    # Checked.validate takes `value`, so max=10 is not enforced by the engine (ComfyUI's rule)
    g = {
        "1": {"class_type": "Checked", "inputs": {"value": 12}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    assert validate(G(g), reg).ok


def test_custom_validation_exception(reg):
    class Raises(engine.Node):
        outputs = ("INT",)

        @classmethod
        def validate(cls, v):
            raise RuntimeError("validator broke")

        def run(self, v: engine.Int() = 0):
            return v

    reg.register(Raises)
    g = {"1": {"class_type": "Raises", "inputs": {"v": 1}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    res = validate(G(g), reg)
    e = one_error(res, "1", "exception_during_validation")
    assert e.details == "validator broke"
    assert e.extra["exception_type"] == "RuntimeError"
    assert any("validator broke" in line for line in e.extra["traceback"])


def test_partial_success_one_output_good(reg):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Const", "inputs": {"value": 5000}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    res = validate(G(g), reg)
    assert res.ok
    assert res.outputs == ["2"]
    assert res.error is None
    assert list(res.problems) == ["3"]
    assert res.problems["3"].dependent_outputs == ["4"]


def test_partial_success_runs_only_good_outputs(reg, run):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Const", "inputs": {"value": 5000}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    r = run(g)
    assert r.ok and set(r.outputs) == {"2"}
    assert r.validation.problems["3"].issues[0].kind == "value_bigger_than_max"


def test_all_problems_collected_in_one_pass(reg):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 5000}},
        "2": {"class_type": "Pick", "inputs": {"mode": "zeta"}},
        "3": {"class_type": "Add", "inputs": {"b": 1}},
        "4": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "5": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
        "6": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    res = validate(G(g), reg)
    assert not res.ok
    assert set(res.problems) == {"1", "2", "3"}
    assert len(res.error.details.splitlines()) == 3
    assert len(res.messages()) == 3


def test_unreachable_nodes_are_not_validated(reg):
    g = good_base()
    g["3"] = {"class_type": "Const", "inputs": {"value": 99999}}  # bad but feeds no output
    res = validate(G(g), reg)
    assert res.ok and res.problems == {}


def test_raise_for_errors_gives_typed_exception(reg):
    g = good_base()
    g["1"]["inputs"]["value"] = 99999
    res = validate(G(g), reg)
    with pytest.raises(ValidationFailed) as ei:
        res.raise_for_errors()
    assert ei.value.result.error.kind == "prompt_outputs_failed_validation"
    assert "1" in ei.value.result.problems
    assert "above its maximum" in str(ei.value)


def test_executor_run_raises_validation_failed(ex):
    with pytest.raises(ValidationFailed):
        ex.run(G({"1": {"class_type": "Const", "inputs": {}}}))


def test_partial_execution_targets(reg):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    res = validate(G(g), reg, partial_execution_targets=["3"])
    assert res.outputs == ["3"]


def test_unknown_target(reg):
    res = validate(G(good_base()), reg, targets=["zz"])
    assert not res.ok and res.error.kind == "invalid_prompt"


@pytest.mark.parametrize(
    "link,part,type_",
    [
        (["99", 0], "'99'", "exception_during_inner_validation"),
        (["1", 4], "has no output 4", "exception_during_validation"),
    ],
)
def test_undeclared_link_must_point_somewhere(reg, link, part, type_):
    """Undeclared links are passed to the node (variadic nodes), so a dangling one is reported."""
    g = good_base()
    g["2"]["inputs"]["extra_image"] = link
    res = validate(G(g), reg)
    assert not res.ok
    e = one_error(res, "2", type_)
    assert part in e.details and e.extra["input_name"] == "extra_image"
    assert "Viewer" in hint(e)


def test_undeclared_link_is_passed_to_variadic_node(reg, run):
    class Sum(engine.Node):
        outputs = ("INT",)

        def run(self, base: engine.Int() = 0, **more):
            return base + sum(more.values())

    reg.register(Sum)
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 2}},
        "2": {"class_type": "Const", "inputs": {"value": 3}},
        "s": {"class_type": "Sum", "inputs": {"base": 1, "x1": ["1", 0], "x2": ["2", 0], "junk": 7}},
        "o": {"class_type": "Show", "inputs": {"value": ["s", 0]}},
    }
    r = engine.Executor(reg).run(G(g))
    assert r.ok and r.outputs["o"]["value"] == ["6"]  # the undeclared literal is dropped, links resolved


def _missing_folder_choices():
    raise FileNotFoundError("models/checkpoints is missing")


def test_exception_while_checking_a_node_is_reported_not_raised(reg):
    class FromFolder(engine.Node):
        outputs = ("STRING",)

        def run(self, name: engine.Combo(_missing_folder_choices)):
            return name

    reg.register(FromFolder)
    g = good_base()
    g["3"] = {"class_type": "FromFolder", "inputs": {"name": "x"}, "_meta": {"title": "Loader"}}
    g["4"] = {"class_type": "Show", "inputs": {"value": ["3", 0]}}
    res = validate(G(g), reg)
    assert res.ok and res.outputs == ["2"]  # the other output is still good
    e = one_error(res, "3", "exception_during_validation")
    assert e.extra["exception_type"] == "FileNotFoundError"
    assert "checkpoints is missing" in e.details and "Loader" in hint(e)
    check_shape(res)


def test_one_bad_source_under_many_outputs_walks_the_graph_once(reg, monkeypatch):
    """One bad source under 3,000 outputs: its dependent outputs are found walking down from it once, not up
    from each output (that was O(outputs x nodes), 5.6 s here). Counted in upstream walks, not timed."""
    from engine_testnodes import chain_graph

    from kiln.engine import topology

    walks = []
    monkeypatch.setattr(topology, "reach", lambda graph, root, f=topology.reach: walks.append(root) or f(graph, root))
    n = 3000
    g = chain_graph(n)
    g["1"]["inputs"]["value"] = 99999
    for i in range(2, n + 2):
        g[f"o{i}"] = {"class_type": "Show", "inputs": {"value": [str(i), 0]}}
    res = validate(G(g), reg)
    assert not res.ok
    deps = res.problems["1"].dependent_outputs
    assert len(deps) == n + 1 and deps[:2] == [str(n + 2), "o2"]  # every output, in prompt order
    assert walks == []  # no walk up from each output
