"""String and regex nodes, and PreviewAny."""

import json

import pytest
import torch

from kiln.engine import NodeError
from kiln.nodes import strings as s
from kiln.nodes.preview_any import PreviewAny, preview_text
from tests.nodes import interface_diff

NAMES = [
    "StringConcatenate",
    "StringSubstring",
    "StringLength",
    "StringCompare",
    "StringContains",
    "StringReplace",
    "StringTrim",
    "CaseConverter",
    "RegexMatch",
    "RegexExtract",
    "RegexReplace",
    "PreviewAny",
]


def test_interfaces_match_comfyui(registry):
    assert interface_diff.diff(registry.object_info(), NAMES) == []


def test_plain_string_nodes():
    assert s.StringConcatenate().run("cat", "dog", ", ") == "cat, dog"
    assert s.StringConcatenate().run("a", "b") == "ab"
    assert s.StringSubstring().run("kiln-oven", 5, 9) == "oven"
    assert s.StringSubstring().run("kiln-oven", -4, 100) == "oven"
    assert s.StringLength().run("héllo") == 5
    assert s.StringReplace().run("a.b.c", ".", "/") == "a/b/c"
    assert s.StringTrim().run("  x \n", "Both") == "x"
    assert s.StringTrim().run("  x \n", "Left") == "x \n"
    assert s.StringTrim().run("  x \n", "Right") == "  x"


@pytest.mark.parametrize(
    "mode,expect",
    [
        ("UPPERCASE", "A CAT'S HAT"),
        ("lowercase", "a cat's hat"),
        ("Capitalize", "A cat's hat"),
        ("Title Case", "A Cat'S Hat"),
    ],
)
def test_case_converter(mode, expect):
    assert s.CaseConverter().run("a cAt's hat", mode) == expect


def test_compare_and_contains():
    assert s.StringCompare().run("Portrait of a cat", "portrait", "Starts With", case_sensitive=False)
    assert not s.StringCompare().run("Portrait of a cat", "portrait", "Starts With", case_sensitive=True)
    assert s.StringCompare().run("photo.png", ".PNG", "Ends With", False)
    assert s.StringCompare().run("x", "x", "Equal", True) and not s.StringCompare().run("x", "X", "Equal", True)
    assert s.StringContains().run("a Red fox", "red", case_sensitive=False)
    assert not s.StringContains().run("a Red fox", "red", case_sensitive=True)


def test_regex_match_flags():
    assert s.RegexMatch().run("Hello World", "world", case_insensitive=True)
    assert not s.RegexMatch().run("Hello World", "world", case_insensitive=False)
    assert not s.RegexMatch().run("a\nb", "^b", False, multiline=False)
    assert s.RegexMatch().run("a\nb", "^b", False, multiline=True)
    assert not s.RegexMatch().run("a\nb", "a.b", False, False, dotall=False)
    assert s.RegexMatch().run("a\nb", "a.b", False, False, dotall=True)


def test_regex_extract_modes_and_groups():
    text = "w=512 h=768; w=1024 h=576"
    pat = r"w=(\d+) h=(\d+)"
    ex = s.RegexExtract()
    assert ex.run(text, pat, "First Match") == "w=512 h=768"
    assert ex.run(text, pat, "All Matches") == "512\n1024"  # with groups: the first group, as ComfyUI
    assert ex.run(text, r"\d+", "All Matches") == "512\n768\n1024\n576"
    assert ex.run(text, pat, "First Group", group_index=2) == "768"
    assert ex.run(text, pat, "First Group", group_index=0) == "w=512 h=768"
    assert ex.run(text, pat, "All Groups", group_index=2) == "768\n576"
    assert ex.run(text, pat, "First Group", group_index=3) == ""  # no such group: empty, as ComfyUI
    assert ex.run(text, r"(?P<w>w)=(x)?", "All Groups", group_index=2) == "\n"  # unmatched group: ""
    assert ex.run(text, "zzz", "First Match") == ""


def test_regex_replace_count_groups_and_flags():
    rr = s.RegexReplace()
    assert rr.run("cat Cat CAT", "cat", "dog") == "dog dog dog"  # case-insensitive by default
    assert rr.run("cat Cat CAT", "cat", "dog", case_insensitive=False) == "dog Cat CAT"
    assert rr.run("a1 b2 c3", r"(\w)(\d)", r"\2\1", count=2) == "1a 2b c3"
    assert rr.run("x\ny", "^", "> ", multiline=True) == "> x\n> y"


def test_invalid_patterns_name_the_input():
    with pytest.raises(NodeError) as e:
        s.RegexMatch().run("abc", "(unclosed")
    assert e.value.input_name == "regex_pattern" and "invalid regular expression" in str(e.value)
    with pytest.raises(NodeError) as e:
        s.RegexExtract().run("abc", "[", "First Match")
    assert e.value.input_name == "regex_pattern"
    with pytest.raises(NodeError) as e:
        s.RegexReplace().run("abc", "(b)", r"\5")
    assert e.value.input_name == "replace"


def test_oversized_inputs_are_refused():
    with pytest.raises(NodeError) as e:
        s.RegexMatch().run("abc", "a" * (s.MAX_PATTERN_CHARS + 1))
    assert e.value.input_name == "regex_pattern"
    with pytest.raises(NodeError) as e:
        s.RegexReplace().run("a" * (s.MAX_TEXT_CHARS + 1), "a", "b")
    assert e.value.input_name == "string"


def test_string_nodes_in_a_graph(run_graph):
    g = {
        "1": {"class_type": "StringConcatenate", "inputs": {"string_a": "Seed", "string_b": "42", "delimiter": ": "}},
        "2": {
            "class_type": "RegexExtract",
            "inputs": {
                "string": ["1", 0],
                "regex_pattern": r"(\d+)",
                "mode": "First Group",
                "case_insensitive": True,
                "multiline": False,
                "dotall": False,
                "group_index": 1,
            },
        },
        "3": {"class_type": "StringLength", "inputs": {"string": ["2", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    res = run_graph(g, targets=["2", "4"])
    assert res.values["2"] == ("42",)
    assert res.outputs["4"] == {"text": ["2"]}


def test_regex_error_in_a_graph(run_graph):
    g = {
        "1": {"class_type": "RegexMatch", "inputs": {"string": "x", "regex_pattern": "a{2,1}"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    res = run_graph(g)
    assert res.status == "error" and "regex_pattern" in res.error.message + str(getattr(res.error, "details", ""))


def test_preview_any_formats():
    assert PreviewAny().run("hi").ui == {"text": ["hi"]}
    assert PreviewAny().run(3.5).ui == {"text": ["3.5"]}
    assert PreviewAny().run(True).ui == {"text": ["True"]}
    assert PreviewAny().run(None).ui == {"text": ["None"]}
    data = {"a": [1, 2], "b": "c"}
    assert json.loads(PreviewAny().run(data).ui["text"][0]) == data
    assert PreviewAny().run(data).ui["text"][0] == json.dumps(data, indent=4)
    t = preview_text(torch.arange(2000))
    assert t.startswith("tensor([   0,    1,    2,    3,    4,    5,") and "1994" in t  # six edge items a side
    assert "1993" not in t and "1994" not in str(torch.arange(2000))  # print options restored afterwards
    assert preview_text(object()).startswith("<object object")
