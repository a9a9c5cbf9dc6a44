"""The memory budget at validation: nodes declare ``estimate_outputs``/``estimate_memory``, validation
propagates the estimated shapes sources first and refuses a node whose peak is over ``memory_limit``.

Pure engine: tiny test nodes, no torch; nothing here allocates what it estimates.
"""

from __future__ import annotations

from typing import Annotated, Any

import pytest

from kiln import engine
from kiln.engine import Graph, Int, Node, NodeDefinitionError, Registry, Socket, TensorEstimate, validate
from kiln.engine.validation import MEMORY_OVER_BUDGET, format_bytes

GiB = 1 << 30
MiB = 1 << 20


class TBlank(Node):
    """A float32 'image' batch [B, H, W, 3] of the given size (declares its output's shape only)."""

    outputs = ("IMAGE",)

    def run(
        self,
        width: Annotated[int, Int(min=1, max=1 << 20)] = 8,
        height: Annotated[int, Int(min=1, max=1 << 20)] = 8,
        batch_size: Annotated[int, Int(min=1, max=1 << 20)] = 1,
    ):
        raise AssertionError("validation only: never run")

    @classmethod
    def estimate_outputs(cls, width: int = 8, height: int = 8, batch_size: int = 1, **_: Any) -> tuple:
        return (TensorEstimate((batch_size, height, width, 3)),)


class TScale(Node):
    """Scales an image by ``factor``: output from the upstream shape, and a temporary as large as it."""

    outputs = ("IMAGE",)

    def run(self, image: Annotated[Any, Socket("IMAGE")], factor: Annotated[int, Int(min=1, max=64)] = 2):
        raise AssertionError("validation only: never run")

    @classmethod
    def estimate_outputs(cls, image: TensorEstimate | None = None, factor: int = 2, **_: Any) -> tuple | None:
        if image is None:
            return None
        b, h, w, c = image.shape
        return (image.with_shape(b, h * factor, w * factor, c),)

    @classmethod
    def estimate_memory(cls, image: TensorEstimate | None = None, factor: int = 2, **_: Any) -> int | None:
        outs = cls.estimate_outputs(image=image, factor=factor)
        return None if outs is None else 2 * outs[0].nbytes


class TSink(Node):
    """An output node that allocates nothing of its own (declares no estimate)."""

    output_node = True

    def run(self, image: Annotated[Any, Socket("IMAGE")]):
        return None


class TSink2(Node):
    """An output node with two image inputs, so both are held while it runs."""

    output_node = True

    def run(self, a: Annotated[Any, Socket("IMAGE")], b: Annotated[Any, Socket("IMAGE")]):
        return None


class TOpaque(Node):
    """Passes an image through without saying anything: estimates stop here."""

    outputs = ("IMAGE",)

    def run(self, image: Annotated[Any, Socket("IMAGE")]):
        return image


class TBroken(Node):
    """An estimator with a bug: the estimate is unknown, the prompt is not refused for it."""

    outputs = ("IMAGE",)

    def run(self, width: Annotated[int, Int(min=1, max=1 << 20)] = 8):
        raise AssertionError("validation only: never run")

    @classmethod
    def estimate_outputs(cls, **_: Any) -> tuple:
        raise ZeroDivisionError("bug in the estimator")

    @classmethod
    def estimate_memory(cls, **_: Any) -> int:
        return 1 // 0


def _reg() -> Registry:
    reg = Registry()
    for cls in (TBlank, TScale, TSink, TSink2, TOpaque, TBroken):
        reg.register(cls)
    return reg


def _check(graph: dict, limit: int | None):
    return validate(Graph.from_json(graph), _reg(), memory_limit=limit)


def _budget_issues(res) -> dict[str, list]:
    return {
        nid: [i for i in p.issues if i.kind == MEMORY_OVER_BUDGET]
        for nid, p in res.problems.items()
        if any(i.kind == MEMORY_OVER_BUDGET for i in p.issues)
    }


def blank(w: int, h: int, b: int = 1) -> dict:
    return {"class_type": "TBlank", "inputs": {"width": w, "height": h, "batch_size": b}}


def test_a_source_over_the_limit_is_refused_naming_node_estimate_and_limit():
    # 16384 x 16384 x 3 floats = 3 GiB, against a 2 GiB limit
    res = _check({"1": blank(16384, 16384), "2": {"class_type": "TSink", "inputs": {"image": ["1", 0]}}}, 2 * GiB)
    assert not res.ok
    issues = _budget_issues(res)
    assert list(issues) == ["1"]
    issue = issues["1"][0]
    assert issue.extra["estimate_bytes"] == 16384 * 16384 * 3 * 4
    assert issue.extra["limit_bytes"] == 2 * GiB
    assert "Node 1 (TBlank)" in issue.hint and "3.0 GiB" in issue.hint and "2.0 GiB" in issue.hint
    assert "lower its width, height or batch_size" in issue.hint and "--max-prompt-memory" in issue.hint
    assert "3.0 GiB" in issue.details and "2.0 GiB" in issue.details
    # the sink depends on it, so no output can run: the whole prompt is refused
    assert res.error is not None and res.error.kind == "prompt_outputs_failed_validation"
    assert res.problems["1"].dependent_outputs == ["2"]


def test_under_the_limit_and_without_a_limit_nothing_is_refused():
    graph = {"1": blank(16384, 16384), "2": {"class_type": "TSink", "inputs": {"image": ["1", 0]}}}
    assert _check(graph, 4 * GiB).ok
    assert _check(graph, None).ok
    assert _check(graph, 0).ok  # 0: no limit


def test_shapes_propagate_through_links_and_inputs_held_count_towards_the_peak():
    # 1024x1024x3 floats = 12 MiB; scaled x4: 192 MiB out, 384 MiB it allocates, + 12 MiB input held = 396 MiB
    graph = {
        "1": blank(1024, 1024),
        "2": {"class_type": "TScale", "inputs": {"image": ["1", 0], "factor": 4}},
        "3": {"class_type": "TSink", "inputs": {"image": ["2", 0]}},
    }
    assert _check(graph, 400 * MiB).ok
    res = _check(graph, 390 * MiB)
    issues = _budget_issues(res)
    assert list(issues) == ["2"], "only the scaler is over: the source (12 MiB) is not"
    assert issues["2"][0].extra["estimate_bytes"] == 396 * MiB
    assert "12.0 MiB of inputs it holds + 384.0 MiB it allocates" in issues["2"][0].hint
    assert res.problems["2"].dependent_outputs == ["3"]


def test_two_inputs_held_at_once_are_summed():
    graph = {
        "1": blank(1024, 1024),  # 12 MiB
        "2": blank(2048, 1024),  # 24 MiB
        "3": {"class_type": "TSink2", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
    }
    assert _check(graph, 36 * MiB).ok
    issues = _budget_issues(_check(graph, 30 * MiB))
    assert list(issues) == ["3"]  # each source alone fits; holding both does not
    assert issues["3"][0].extra["estimate_bytes"] == 36 * MiB
    assert "what it allocates itself, unknown" in issues["3"][0].hint
    # the same source linked twice is held once
    same = {"1": blank(1024, 1024), "3": {"class_type": "TSink2", "inputs": {"a": ["1", 0], "b": ["1", 0]}}}
    assert _check(same, 13 * MiB).ok


def test_an_undeclared_node_stops_the_estimate_and_is_never_guessed():
    graph = {
        "1": blank(1024, 1024),
        "2": {"class_type": "TOpaque", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "TScale", "inputs": {"image": ["2", 0], "factor": 64}},
        "4": {"class_type": "TSink", "inputs": {"image": ["3", 0]}},
    }
    # TScale's input is unknown, so its estimate is unknown: x64 of 12 MiB is never counted. The opaque node
    # still holds its 12 MiB input, which fits 13 MiB
    res = _check(graph, 13 * MiB)
    assert res.ok and not _budget_issues(res)
    assert list(_budget_issues(_check(graph, 10 * MiB))) == ["1"]


def test_a_broken_estimator_counts_as_unknown():
    graph = {
        "1": {"class_type": "TBroken", "inputs": {"width": 8}},
        "2": {"class_type": "TSink", "inputs": {"image": ["1", 0]}},
    }
    res = _check(graph, 1)
    assert res.ok and not _budget_issues(res)


def test_a_node_with_invalid_inputs_is_not_estimated_twice():
    # a value out of range is reported as such; the budget only looks at nodes whose inputs are valid
    res = _check({"1": blank(0, 16384), "2": {"class_type": "TSink", "inputs": {"image": ["1", 0]}}}, 1)
    kinds = [i.kind for i in res.problems["1"].issues]
    assert kinds == ["value_smaller_than_min"]


def test_partial_refusal_keeps_the_other_outputs():
    graph = {
        "1": blank(16384, 16384),
        "2": {"class_type": "TSink", "inputs": {"image": ["1", 0]}},
        "3": blank(64, 64),
        "4": {"class_type": "TSink", "inputs": {"image": ["3", 0]}},
    }
    res = _check(graph, 1 * GiB)
    assert res.ok and res.outputs == ["4"]
    assert list(_budget_issues(res)) == ["1"]


def test_estimate_hooks_must_be_classmethods():
    class Bad(Node):
        outputs = ("IMAGE",)

        def run(self, width: Annotated[int, Int()] = 1):
            return None

        def estimate_outputs(self, **_: Any) -> tuple:  # an instance method: nothing to call it on
            return ()

    with pytest.raises(NodeDefinitionError, match="estimate_outputs"):
        engine.node.spec_from_native(Bad)


def test_tensor_estimate_and_bytes_for_people():
    t = TensorEstimate((2, 512, 512, 3))
    assert t.nbytes == 2 * 512 * 512 * 3 * 4
    assert t.with_shape(1, 8, 8, 3) == TensorEstimate((1, 8, 8, 3))
    assert TensorEstimate((4,), itemsize=1).nbytes == 4
    assert format_bytes(6 * GiB) == "6.0 GiB"
    assert format_bytes(512 * MiB) == "512.0 MiB"
    assert format_bytes(900) == "900 B"
