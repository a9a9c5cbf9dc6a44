"""ComfyUI's classic node contract: a custom_nodes/ pack written here, list semantics, object_info shape."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from engine_testnodes import CALLS, G, make_registry

from kiln import engine
from kiln.engine import Executor, Registry

PACK_INIT = '''
import json
from .helpers import double  # relative import inside the pack

LOG = []


class ClassicScale:
    """Multiplies a number."""

    @classmethod
    def INPUT_TYPES(s):
        return {
            "required": {"value": ("INT", {"default": 1, "min": 0, "max": 100}),
                         "mode": (["times", "plus"],)},
            "optional": {"extra": ("INT", {"forceInput": True})},
            "hidden": {"prompt": "PROMPT", "png": "EXTRA_PNGINFO", "uid": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("scaled", "label")
    FUNCTION = "scale"
    CATEGORY = "test/classic"
    DESCRIPTION = "Scales a number."

    def scale(self, value, mode, extra=None, prompt=None, png=None, uid=None):
        LOG.append(("scale", value, mode, extra, uid, sorted(prompt), png))
        out = double(value) if mode == "times" else value + 2
        if extra is not None:
            out += extra
        return (out, f"{mode}:{out}")


class ClassicSave:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"number": ("INT", {"forceInput": True}), "label": ("STRING", {"forceInput": True}),
                             "prefix": ("STRING", {"default": "kiln"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "test/classic"

    @classmethod
    def IS_CHANGED(s, number, label, prefix):
        return CHANGE["token"]

    @classmethod
    def VALIDATE_INPUTS(s, prefix):
        if "/" in prefix:
            return "prefix must not contain '/'"
        return True

    def save(self, number, label, prefix):
        LOG.append(("save", number, label, prefix))
        return {"ui": {"images": [{"filename": f"{prefix}_{number}.png", "subfolder": "", "type": "output"}],
                       "text": [label]}}


CHANGE = {"token": "same"}

NODE_CLASS_MAPPINGS = {"ClassicScale": ClassicScale, "ClassicSave": ClassicSave}
NODE_DISPLAY_NAME_MAPPINGS = {"ClassicScale": "Classic Scale (x2)"}
'''

HELPERS = """
def double(x):
    return x * 2
"""

BROKEN = """
raise ImportError("needs a package that is not installed")
"""

SINGLE_FILE = """
class OneFileNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi", "multiline": True})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "go"
    def go(self, text):
        return (text.upper(),)

class NoFunction:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "missing"

NODE_CLASS_MAPPINGS = {"OneFileNode": OneFileNode, "NoFunction": NoFunction}
"""

EXITS = """
import sys
sys.exit(3)
"""


@pytest.fixture
def pack(tmp_path):
    cn = tmp_path / "custom_nodes"
    (cn / "my_pack").mkdir(parents=True)
    (cn / "my_pack" / "__init__.py").write_text(textwrap.dedent(PACK_INIT))
    (cn / "my_pack" / "helpers.py").write_text(HELPERS)
    (cn / "broken_pack").mkdir()
    (cn / "broken_pack" / "__init__.py").write_text(BROKEN)
    (cn / "single.py").write_text(SINGLE_FILE)
    (cn / "exits.py").write_text(EXITS)
    (cn / "empty_pack").mkdir()
    (cn / "empty_pack" / "__init__.py").write_text("X = 1\n")
    (cn / "off_pack.disabled").mkdir()
    (cn / "off_pack.disabled" / "__init__.py").write_text(BROKEN)
    (cn / "notes.txt").write_text("not a pack")
    reg = make_registry()
    reg.load_custom_nodes(cn)
    yield reg
    for name in [m for m in sys.modules if m.startswith("custom_nodes.")]:
        del sys.modules[name]


def pack_module():
    return sys.modules["custom_nodes.my_pack"]


def classic_graph(value=3, mode="times", token=None, prefix="kiln"):
    return {
        "1": {"class_type": "Const", "inputs": {"value": 5}},
        "2": {"class_type": "ClassicScale", "inputs": {"value": value, "mode": mode, "extra": ["1", 0]}},
        "3": {"class_type": "ClassicSave", "inputs": {"number": ["2", 0], "label": ["2", 1], "prefix": prefix}},
    }


def test_pack_loads_and_failures_are_reported(pack):
    assert "ClassicScale" in pack and "ClassicSave" in pack and "OneFileNode" in pack
    sources = {e.source.split("/")[-1].split(":")[-1]: e for e in pack.load_errors}
    assert any(
        "broken_pack" in e.source and "ImportError" in e.error and "not installed" in e.error for e in pack.load_errors
    )
    assert any("exits.py" in e.source and "SystemExit" in e.error for e in pack.load_errors)
    assert any("empty_pack" in e.source and "NODE_CLASS_MAPPINGS" in e.error for e in pack.load_errors)
    assert any("NoFunction" in e.source and "FUNCTION" in e.error for e in pack.load_errors)
    assert "NoFunction" not in pack
    assert not any("off_pack" in e.source for e in pack.load_errors)
    assert all(e.traceback for e in pack.load_errors)
    assert "custom_nodes.broken_pack" not in sys.modules
    assert "custom_nodes.my_pack" in pack.packs
    assert sources  # reported, not raised


def test_classic_pack_runs(pack):
    ex = Executor(pack)
    events = []
    r = ex.run(G(classic_graph()), sink=events.append, extra_data={"extra_pnginfo": {"workflow": "w"}})
    assert r.ok, r.error
    assert r.outputs["3"] == {
        "images": [{"filename": "kiln_11.png", "subfolder": "", "type": "output"}],
        "text": ["times:11"],
    }
    log = pack_module().LOG
    assert log[0] == ("scale", 3, "times", 5, "2", ["1", "2", "3"], {"workflow": "w"})
    assert log[1] == ("save", 11, "times:11", "kiln")


def test_classic_is_changed_controls_rerun(pack):
    ex = Executor(pack)
    ex.run(G(classic_graph()))
    n = len(pack_module().LOG)
    assert ex.run(G(classic_graph())).ran == []
    pack_module().CHANGE["token"] = "different"
    r = ex.run(G(classic_graph()))
    assert r.ran == ["3"]
    assert len(pack_module().LOG) == n + 1


def test_classic_hidden_unique_id_keys_by_node_id(pack):
    ex = Executor(pack)
    ex.run(G(classic_graph()))
    g = classic_graph()
    g["2b"] = g.pop("2")
    g["3"]["inputs"]["number"] = ["2b", 0]
    g["3"]["inputs"]["label"] = ["2b", 1]
    r = ex.run(G(g))
    assert "2b" in r.ran  # hidden UNIQUE_ID: the id is part of the key
    assert "1" not in r.ran


def test_classic_validate_inputs(pack):
    res = engine.validate(G(classic_graph(prefix="a/b")), pack)
    assert not res.ok
    e = res.problems["3"].issues[0]
    assert e.kind == "custom_validation_failed"
    assert e.details == "prefix - prefix must not contain '/'"


def test_classic_range_and_combo_checks(pack):
    res = engine.validate(G(classic_graph(value=500, mode="divide")), pack)
    types = sorted(e.kind for e in res.problems["2"].issues)
    assert types == ["value_bigger_than_max", "value_not_in_list"]


def test_classic_object_info_exact_shape(pack):
    info = json.loads(json.dumps(pack.object_info(["ClassicScale", "ClassicSave"])))
    assert info["ClassicScale"] == {
        "input": {
            "required": {"value": ["INT", {"default": 1, "min": 0, "max": 100}], "mode": [["times", "plus"]]},
            "optional": {"extra": ["INT", {"forceInput": True}]},
            "hidden": {"prompt": "PROMPT", "png": "EXTRA_PNGINFO", "uid": "UNIQUE_ID"},
        },
        "input_order": {"required": ["value", "mode"], "optional": ["extra"], "hidden": ["prompt", "png", "uid"]},
        "output": ["INT", "STRING"],
        "output_is_list": [False, False],
        "output_name": ["scaled", "label"],
        "name": "ClassicScale",
        "display_name": "Classic Scale (x2)",
        "description": "Scales a number.",
        "python_module": "custom_nodes.my_pack",
        "category": "test/classic",
        "output_node": False,
    }
    save = info["ClassicSave"]
    assert save["display_name"] == "ClassicSave" and save["output_node"] is True
    assert save["output"] == [] and save["output_name"] == [] and save["output_is_list"] == []
    assert save["description"] == ""


def test_classic_defaults_category_sd():
    class Bare:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("FLOAT", {"default": 0.5})}}

        RETURN_TYPES = ("FLOAT",)
        FUNCTION = "f"

        def f(self, x):
            return (x,)

    reg = Registry()
    reg.register(Bare)
    info = reg.object_info()["Bare"]
    assert info["category"] == "sd" and "deprecated" not in info and "api_node" not in info
    assert "output_tooltips" not in info and "experimental" not in info


def test_native_object_info_exact_shape():
    class Blend(engine.Node):
        """Blends two images."""

        display_name = "Blend Images"
        category = "image/test"
        outputs = {"IMAGE": engine.Output("IMAGE", tooltip="the result")}
        output_node = False

        def run(
            self,
            image1: engine.Socket("IMAGE"),
            image2: engine.Socket("IMAGE", optional=True) = None,
            blend_factor: engine.Float(min=0.0, max=1.0, step=0.01) = 0.5,
            blend_mode: engine.Combo(["normal", "multiply"]) = "normal",
            count: engine.Int(min=1, max=10) = 1,
            note: engine.String(multiline=True) = "",
            flag: bool = False,
            uid: engine.Hidden("UNIQUE_ID") = None,
        ):
            return image1

    reg = Registry()
    reg.register(Blend, python_module="nodes")
    info = json.loads(json.dumps(reg.object_info(["Blend"])))["Blend"]
    assert info == {
        "input": {
            "required": {
                "image1": ["IMAGE"],
                "blend_factor": ["FLOAT", {"min": 0.0, "max": 1.0, "step": 0.01, "default": 0.5}],
                "blend_mode": [["normal", "multiply"], {"default": "normal"}],
                "count": ["INT", {"min": 1, "max": 10, "default": 1}],
                "note": ["STRING", {"multiline": True, "default": ""}],
                "flag": ["BOOLEAN", {"default": False}],
            },
            "optional": {"image2": ["IMAGE"]},
            "hidden": {"uid": "UNIQUE_ID"},
        },
        "input_order": {
            "required": ["image1", "blend_factor", "blend_mode", "count", "note", "flag"],
            "optional": ["image2"],
            "hidden": ["uid"],
        },
        "output": ["IMAGE"],
        "output_is_list": [False],
        "output_name": ["IMAGE"],
        "name": "Blend",
        "display_name": "Blend Images",
        "description": "Blends two images.",
        "python_module": "nodes",
        "category": "image/test",
        "output_node": False,
        "output_tooltips": ["the result"],
    }


def test_object_info_unknown_and_broken_class_skipped():
    reg = make_registry()
    assert reg.object_info(["Nope"]) == {}
    assert set(reg.object_info()) == set(reg.names())


def test_classic_combo_reread_on_validation(tmp_path):
    """A classic combo that lists files (like LoadImage) sees a file added after registration."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_text("")

    class LoadFile:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": (sorted(p.name for p in folder.iterdir()),)}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "f"

        def f(self, name):
            return (name,)

    reg = make_registry()
    reg.register(LoadFile)
    (folder / "b.png").write_text("")
    g = {
        "1": {"class_type": "LoadFile", "inputs": {"name": "b.png"}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    res = engine.validate(G(g), reg)
    assert res.ok, res.summary()
    info = json.loads(json.dumps(reg.object_info(["LoadFile"])))
    assert info["LoadFile"]["input"]["required"]["name"] == [["a.png", "b.png"]]


# -- list semantics ----------------------------------------------------------------------------------------------


class MakeList:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 3})}}

    RETURN_TYPES = ("INT", "STRING")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "f"

    def f(self, n):
        CALLS.append(("MakeList", n))
        return (list(range(n)), "tag")


class PerItem:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True}), "y": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "f"

    def f(self, x, y):
        CALLS.append(("PerItem", (x, y)))
        return (x * 10 + y,)


class WholeList:
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xs": ("INT", {"forceInput": True}), "k": ("INT", {"default": 1})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "f"
    OUTPUT_NODE = True

    def f(self, xs, k):
        CALLS.append(("WholeList", (list(xs), k)))
        return {"ui": {"sum": [sum(xs) * k[0]]}, "result": (sum(xs),)}


class UiPerCall:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ()
    FUNCTION = "f"
    OUTPUT_NODE = True

    def f(self, x):
        return {"ui": {"items": [x], "twice": [x, x]}}


class Pair2:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 2})}}

    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "f"

    def f(self, n):
        return ([100 * (i + 1) for i in range(n)],)


@pytest.fixture
def listreg():
    reg = make_registry()
    for c in (MakeList, PerItem, WholeList, UiPerCall, Pair2):
        reg.register(c)
    return reg


def test_list_mapping_shortest_repeats_last(listreg):
    g = {
        "l": {"class_type": "MakeList", "inputs": {"n": 4}},
        "p": {"class_type": "Pair2", "inputs": {"n": 2}},
        "m": {"class_type": "PerItem", "inputs": {"x": ["l", 0], "y": ["p", 0]}},
        "u": {"class_type": "UiPerCall", "inputs": {"x": ["m", 0]}},
    }
    r = Executor(listreg).run(G(g))
    assert r.ok, r.error
    calls = [v for c, v in CALLS if c == "PerItem"]
    assert calls == [(0, 100), (1, 200), (2, 200), (3, 200)]
    # UI of the four calls merged key by key
    assert r.outputs["u"] == {"items": [100, 210, 220, 230], "twice": [100, 100, 210, 210, 220, 220, 230, 230]}


def test_input_is_list_gets_whole_lists(listreg):
    g = {
        "l": {"class_type": "MakeList", "inputs": {"n": 5}},
        "w": {"class_type": "WholeList", "inputs": {"xs": ["l", 0], "k": 2}},
    }
    r = Executor(listreg).run(G(g))
    assert r.ok, r.error
    assert [v for c, v in CALLS if c == "WholeList"] == [([0, 1, 2, 3, 4], [2])]
    assert r.outputs["w"] == {"sum": [20]}


def test_non_list_output_of_list_node_is_one_element(listreg):
    g = {
        "l": {"class_type": "MakeList", "inputs": {"n": 3}},
        "s": {"class_type": "Show", "inputs": {"value": ["l", 1]}},
    }
    r = Executor(listreg).run(G(g))
    assert r.outputs["s"]["value"] == ["'tag'"]


def test_native_node_gets_list_mapping(listreg):
    g = {
        "l": {"class_type": "MakeList", "inputs": {"n": 3}},
        "a": {"class_type": "Add", "inputs": {"a": ["l", 0], "b": 1}},
        "s": {"class_type": "Show", "inputs": {"value": ["a", 0]}},
    }
    r = Executor(listreg).run(G(g))
    assert r.outputs["s"]["value"] == ["1", "2", "3"]
    assert r.outputs["s"]["tag"] == ["", "", ""]


def test_blocker_in_list_blocks_only_that_element(listreg):
    class MaybeBlock:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"forceInput": True})}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "f"

        def f(self, x):
            return (engine.ExecutionBlocker(None) if x == 1 else x,)

    listreg.register(MaybeBlock)
    g = {
        "l": {"class_type": "MakeList", "inputs": {"n": 3}},
        "b": {"class_type": "MaybeBlock", "inputs": {"x": ["l", 0]}},
        "u": {"class_type": "UiPerCall", "inputs": {"x": ["b", 0]}},
    }
    r = Executor(listreg).run(G(g))
    assert r.ok, r.error
    assert r.outputs["u"]["items"] == [0, 2]  # like a preview of [black, BLOCKED, black] showing 2 images


def test_blocker_blocks_input_is_list_node(listreg):
    class BlockAll:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"forceInput": True})}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "f"

        def f(self, x):
            return (engine.ExecutionBlocker(None) if x == 1 else x,)

    listreg.register(BlockAll)
    g = {
        "l": {"class_type": "MakeList", "inputs": {"n": 3}},
        "b": {"class_type": "BlockAll", "inputs": {"x": ["l", 0]}},
        "w": {"class_type": "WholeList", "inputs": {"xs": ["b", 0]}},
    }
    r = Executor(listreg).run(G(g))
    assert r.ok, r.error
    assert not [v for c, v in CALLS if c == "WholeList"]
    assert "w" not in r.outputs


# -- registration errors ---------------------------------------------------------------------------------------


def _bad_classes():
    class NoRun(engine.Node):
        outputs = ("INT",)

    class NoAnnotation(engine.Node):
        def run(self, x):
            return x

    class NotASocket(engine.Node):
        def run(self, x: list):
            return x

    class BadDefault(engine.Node):
        def run(self, x: engine.Int() = "five"):
            return x

    class DefaultOutOfRange(engine.Node):
        def run(self, x: engine.Int(min=0, max=10) = 11):
            return x

    class DefaultNotAChoice(engine.Node):
        def run(self, x: engine.Combo(["a", "b"]) = "c"):
            return x

    class BadOutputs(engine.Node):
        outputs = (1,)

        def run(self):
            return 1

    class BadOutputDict(engine.Node):
        outputs = {"x": 3}

        def run(self):
            return 1

    class VarArgs(engine.Node):
        def run(self, *xs: engine.Int()):
            return 1

    class StaticRun(engine.Node):
        @staticmethod
        def run(x: engine.Int() = 0):
            return 1

    class BadHidden(engine.Node):
        def run(self, x: engine.Hidden("SECRET") = None):
            return 1

    class BadName(engine.Node):
        name = "bad/name"

        def run(self):
            return 1

    class FpInstance(engine.Node):
        def fingerprint(self, x):
            return 1

        def run(self, x: engine.Int() = 0):
            return 1

    class ValidateInstance(engine.Node):
        def validate(self, x):
            return True

        def run(self, x: engine.Int() = 0):
            return 1

    class BadBoolDefault(engine.Node):
        def run(self, x: bool = 1):
            return 1

    class OptionalNoDefault(engine.Node):
        def run(self, x: engine.Socket("IMAGE", optional=True)):
            return 1

    return [
        (OptionalNoDefault, "optional input 'x' needs a default"),
        (NoRun, "must define a run"),
        (NoAnnotation, "input 'x' has no annotation"),
        (NotASocket, "input 'x': annotation"),
        (BadDefault, "default 'five' is not a valid INT"),
        (DefaultOutOfRange, "default 11 is outside [0, 10]"),
        (DefaultNotAChoice, "default 'c' is not one of the choices"),
        (BadOutputs, "outputs[0] must be a type name"),
        (BadOutputDict, "output 'x' must be a type name"),
        (VarArgs, "inputs must be keyword parameters"),
        (StaticRun, "first parameter is self"),
        (BadHidden, "unknown hidden kind 'SECRET'"),
        (BadName, "invalid node name 'bad/name'"),
        (FpInstance, "fingerprint(...) must be a @classmethod"),
        (ValidateInstance, "validate(...) must be a @classmethod"),
        (BadBoolDefault, "default 1 is not a valid BOOLEAN"),
    ]


@pytest.mark.parametrize("cls,msg", _bad_classes(), ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_malformed_native_node_raises_precise_error(cls, msg):
    reg = Registry()
    with pytest.raises(engine.NodeDefinitionError) as ei:
        reg.register(cls)
    assert msg in str(ei.value)
    assert cls.__qualname__ in str(ei.value)
    assert cls.__name__ not in reg


@pytest.mark.parametrize(
    "attrs,msg",
    [
        (
            {"INPUT_TYPES": classmethod(lambda c: {"required": {}}), "RETURN_TYPES": ("INT",), "FUNCTION": "nope"},
            "FUNCTION 'nope' is not a method",
        ),
        (
            {"INPUT_TYPES": classmethod(lambda c: 5), "RETURN_TYPES": (), "FUNCTION": "f", "f": lambda self: ()},
            "INPUT_TYPES() must return a dict",
        ),
        (
            {"INPUT_TYPES": classmethod(lambda c: 1 / 0), "RETURN_TYPES": (), "FUNCTION": "f", "f": lambda self: ()},
            "INPUT_TYPES() raised ZeroDivisionError",
        ),
        (
            {
                "INPUT_TYPES": classmethod(lambda c: {"required": {"x": 5}}),
                "RETURN_TYPES": (),
                "FUNCTION": "f",
                "f": lambda self: (),
            },
            "input 'x' must be (TYPE,)",
        ),
    ],
)
def test_malformed_classic_node(attrs, msg):
    cls = type("BadClassic", (), attrs)
    with pytest.raises(engine.NodeDefinitionError) as ei:
        Registry().register(cls)
    assert msg in str(ei.value)


def test_not_a_node_class():
    with pytest.raises(engine.NodeDefinitionError) as ei:
        Registry().register(type("Plain", (), {}))
    assert "neither an engine.Node subclass nor a ComfyUI class" in str(ei.value)


def test_duplicate_name_rejected_unless_replace():
    reg = make_registry()

    class Const(engine.Node):
        outputs = ("INT",)

        def run(self):
            return 1

    with pytest.raises(engine.NodeDefinitionError) as ei:
        reg.register(Const)
    assert "already registered" in str(ei.value)
    reg.register(Const, replace=True)
    assert reg["Const"].cls is Const


def test_unknown_lookup_suggests():
    reg = make_registry()
    with pytest.raises(KeyError) as ei:
        reg["Cnost"]
    assert "Const" in str(ei.value)
    assert reg.suggest("showimage") == ["ShowImage", "Show"][: len(reg.suggest("showimage"))]


def test_validate_inputs_with_input_types_skips_type_check():
    seen = {}

    class Typed:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("FLOAT", {"forceInput": True}), "scale": ("INT", {"default": 1, "max": 5})}}

        RETURN_TYPES = ("FLOAT",)
        FUNCTION = "f"

        @classmethod
        def VALIDATE_INPUTS(cls, input_types, x, scale):
            seen["types"], seen["x"], seen["scale"] = input_types, x, scale
            return True

        def f(self, x, scale):
            return (x * scale,)

    reg = make_registry()
    reg.register(Typed)
    g = {
        "t": {"class_type": "TextIn", "inputs": {"text": "s"}},
        "y": {"class_type": "Typed", "inputs": {"x": ["t", 0], "scale": 9}},
        "o": {"class_type": "Show", "inputs": {"value": ["y", 0]}},
    }
    res = engine.validate(G(g), reg)
    assert res.ok, res.summary()  # STRING into FLOAT allowed: the node checks types itself; max off too
    assert seen == {"types": {"x": "STRING"}, "x": None, "scale": 9}


def test_classic_lazy_and_metadata():
    class ClassicSwitch:
        @classmethod
        def INPUT_TYPES(cls):
            return {
                "required": {
                    "on": ("BOOLEAN", {"default": True}),
                    "a": ("INT", {"lazy": True, "forceInput": True}),
                    "b": ("INT", {"lazy": True, "forceInput": True}),
                }
            }

        RETURN_TYPES = ("INT",)
        FUNCTION = "f"
        DEPRECATED = True
        EXPERIMENTAL = True
        API_NODE = False
        OUTPUT_TOOLTIPS = ("the chosen value",)

        def check_lazy_status(self, on, a=None, b=None):
            return ["a"] if on else ["b"]

        def f(self, on, a, b):
            return (a if on else b,)

    reg = make_registry()
    reg.register(ClassicSwitch)
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "2": {"class_type": "Const", "inputs": {"value": 2}},
        "s": {"class_type": "ClassicSwitch", "inputs": {"on": False, "a": ["1", 0], "b": ["2", 0]}},
        "o": {"class_type": "Show", "inputs": {"value": ["s", 0]}},
    }
    r = Executor(reg).run(G(g))
    assert r.ok and r.outputs["o"]["value"] == ["2"] and "1" not in r.ran
    info = reg.object_info(["ClassicSwitch"])["ClassicSwitch"]
    assert info["deprecated"] is True and info["experimental"] is True and info["api_node"] is False
    assert info["output_tooltips"] == ["the chosen value"]


def test_pack_cannot_replace_a_builtin_node(tmp_path):
    cn = tmp_path / "custom_nodes"
    cn.mkdir()
    (cn / "hijack.py").write_text(
        textwrap.dedent("""
        class Const:
            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {}}
            RETURN_TYPES = ("INT",)
            FUNCTION = "f"
            def f(self):
                return (666,)

        class Extra(Const):
            pass

        NODE_CLASS_MAPPINGS = {"Const": Const, "ExtraNode": Extra}
    """)
    )
    reg = make_registry()
    before = reg["Const"].cls
    reg.load_custom_nodes(cn)
    assert reg["Const"].cls is before  # the built-in stays
    assert "ExtraNode" in reg  # the rest of the pack loads
    assert any("Const" in e.source and "already provided" in e.error for e in reg.load_errors)
    sys.modules.pop("custom_nodes.hijack", None)


def test_native_pack_with_one_bad_class_keeps_the_others(tmp_path):
    cn = tmp_path / "custom_nodes"
    cn.mkdir()
    (cn / "native_pack.py").write_text(
        textwrap.dedent("""
        from typing import Annotated
        from kiln import engine
        class GoodOne(engine.Node):
            outputs = ("INT",)
            def run(self, x: Annotated[int, engine.Int()] = 1):
                return x

        class BadOne(engine.Node):
            def run(self, x):
                return x

        NODES = [GoodOne, BadOne]
    """)
    )
    reg = make_registry()
    reg.load_custom_nodes(cn)
    assert "GoodOne" in reg and "BadOne" not in reg
    assert any("BadOne" in e.source and "no annotation" in e.error for e in reg.load_errors)
    r = Executor(reg).run(
        G(
            {
                "g": {"class_type": "GoodOne", "inputs": {"x": 4}},
                "o": {"class_type": "Show", "inputs": {"value": ["g", 0]}},
            }
        )
    )
    assert r.outputs["o"]["value"] == ["4"]
    assert reg["GoodOne"].python_module == "custom_nodes.native_pack"
    sys.modules.pop("custom_nodes.native_pack", None)


def test_classic_combo_output_in_object_info_and_links():
    class Sampler:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = (["euler", "ddim"], "INT")
        RETURN_NAMES = ("sampler_name", "steps")
        FUNCTION = "f"

        def f(self):
            return ("ddim", 20)

    class UseSampler:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"sampler_name": (["euler", "ddim"],)}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "f"

        def f(self, sampler_name):
            return (sampler_name,)

    reg = make_registry()
    reg.register(Sampler)
    reg.register(UseSampler)
    info = json.loads(json.dumps(reg.object_info(["Sampler"])))["Sampler"]
    assert info["output"] == [["euler", "ddim"], "INT"]
    assert info["output_name"] == ["sampler_name", "steps"]
    g = {
        "s": {"class_type": "Sampler", "inputs": {}},
        "u": {"class_type": "UseSampler", "inputs": {"sampler_name": ["s", 0]}},
        "o": {"class_type": "Show", "inputs": {"value": ["u", 0]}},
    }
    r = Executor(reg).run(G(g))
    assert r.ok and r.outputs["o"]["value"] == ["'ddim'"]
    bad = dict(g, u={"class_type": "UseSampler", "inputs": {"sampler_name": ["s", 1]}})
    res = engine.validate(G(bad), reg)
    assert res.problems["u"].issues[0].kind == "return_type_mismatch"
