"""``set`` edits (kiln.run(set=...), kiln.apply_settings, ``kiln run --set``): a list is a literal value,
a link is a ``Link`` object; a bool is never a slot index."""

from __future__ import annotations

import pytest

import kiln
from kiln.cli import wire_value
from kiln.engine import Graph
from kiln.engine.graph import Link

GRAPH = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        "_meta": {"title": "Base"},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
}


@pytest.mark.parametrize("value", [["a", True], ["1", 0], ["1", False]], ids=repr)
def test_a_list_is_a_literal_never_a_link(value):
    g = Graph.from_json(GRAPH)
    kiln.apply_settings(g, {"Base.color": value})
    assert g["1"].inputs["color"] == value and not isinstance(g["1"].inputs["color"], Link)
    # and it saves as a literal list, so it loads back as one
    assert g.to_json()["1"]["inputs"]["color"] == {"__value__": value}


def test_a_link_object_connects():
    g = Graph.from_json(GRAPH)
    kiln.apply_settings(g, {"2.image": Link("1", 0)})
    assert g["2"].inputs["image"] == Link("1", 0)
    assert g.to_json()["2"]["inputs"]["image"] == ["1", 0]


def test_cli_reads_json_links_by_the_loaders_rule():
    link = wire_value(["1", 0])
    assert isinstance(link, Link) and (link.node_id, link.slot) == ("1", 0)
    assert wire_value(["a", True]) == ["a", True]  # a bool is not a slot: a literal list
    assert wire_value([1, 2]) == [1, 2]
    assert wire_value({"__value__": ["1", 0]}) == ["1", 0]
    assert wire_value("text") == "text" and wire_value(True) is True
