"""ComfyUI custom node packs on Kiln: the loader (engine/registry.py) and ComfyUI's module surface
(kiln/compat), with the small packs of tests/packs loaded as a custom_nodes/ folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from kiln import compat
from kiln.compat import server as compat_server
from kiln.engine import ExecutionBlocker, Executor, Folders, Graph, Registry, ValidationFailed
from kiln.engine.events import Progress
from kiln.runtime import default_registry

PACKS = Path(__file__).resolve().parents[1] / "packs"


def _forget_packs() -> None:
    for name in [m for m in sys.modules if m == "custom_nodes" or m.startswith("custom_nodes.")]:
        del sys.modules[name]


@pytest.fixture
def world(tmp_path, monkeypatch):
    """(registry, executor, base folder) with tests/packs copied in as custom_nodes/."""
    cn = tmp_path / "custom_nodes"
    shutil.copytree(PACKS, cn, ignore=shutil.ignore_patterns("__pycache__", "*.md", "test_*.py"))
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "tiny.safetensors").write_bytes(b"x")
    monkeypatch.delenv("KILN_TEST_PRESTARTUP", raising=False)
    compat_server.set_sender(None)
    reg = default_registry(custom_nodes=cn, entry_points=False)
    ex = Executor(reg, folders=Folders(tmp_path))
    yield reg, ex, tmp_path
    compat_server.set_sender(None)
    _forget_packs()
    compat.uninstall()


def report(reg: Registry, pack: str):
    r = reg.pack_report(pack)
    assert r is not None, [p.pack for p in reg.pack_reports]
    return r


def test_every_import_form_loads(world):
    reg, _, tmp = world
    alpha = report(reg, "alpha_nested")
    assert alpha.ok, alpha.traceback
    assert sorted(alpha.classes) == sorted(
        ["AlphaMaths", "AlphaLoopEnd", "AlphaSave", "AlphaImage", "AlphaCond", "AlphaGate", "SharedName"]
    )
    assert alpha.import_seconds > 0
    assert reg["AlphaMaths"].display_name == "Alpha Maths"
    assert reg["AlphaMaths"].python_module == "custom_nodes.alpha_nested"
    # the pack's folder is served by the server under /extensions/alpha_nested/
    assert reg.web_directories == {"alpha_nested": (tmp / "custom_nodes" / "alpha_nested" / "web").resolve()}
    # prestartup_script.py ran before the packs, with folder_paths already importable
    import os

    assert os.environ["KILN_TEST_PRESTARTUP"].endswith("output")
    # a `.disabled` pack is never imported
    assert reg.pack_report("zeta_off.disabled") is None and reg.pack_report("zeta_off") is None


def test_bad_packs_are_reported_never_fatal(world):
    reg, _, _ = world
    gamma = report(reg, "gamma_broken")
    assert not gamma.ok and "RuntimeError: gamma cannot start" in gamma.error
    assert "impl.py" in gamma.traceback and gamma.classes == []
    assert "custom_nodes.gamma_broken" not in sys.modules
    delta = report(reg, "delta_malformed")
    assert delta.ok and delta.classes == ["DeltaLoadsModel"]
    assert [e.source.rsplit(":", 1)[-1] for e in delta.class_errors] == ["Malformed"]
    assert "input 'x' must be (TYPE,)" in delta.class_errors[0].error and delta.class_errors[0].traceback
    assert "Malformed" not in reg
    # every failure is also in load_errors, with its traceback
    assert any("gamma_broken" in e.source and e.traceback for e in reg.load_errors)


def test_name_clashes_as_comfyui(world):
    reg, ex, _ = world
    beta = report(reg, "beta_dup")
    # between packs the later one (alphabetically) wins, with a warning naming both
    assert reg["SharedName"].python_module == "custom_nodes.beta_dup"
    assert any("custom_nodes.alpha_nested" in w and "custom_nodes.beta_dup" in w for w in beta.warnings)
    r = ex.run(Graph.from_json({"1": {"class_type": "SharedName", "inputs": {}}}), targets=["1"])
    assert r.ok and r.values["1"] == ("beta",)
    # a built-in is never replaced by a pack
    assert reg["SaveImage"].python_module != "custom_nodes.beta_dup"
    assert any("SaveImage" in e.source for e in beta.class_errors)


def test_model_runtime_is_reported_by_class(world):
    reg, ex, _ = world
    eps = report(reg, "epsilon_runtime")
    assert eps.ok and eps.classes == ["EpsilonPatch"]
    assert eps.needs_comfy_runtime == ["EpsilonPatch"]
    assert report(reg, "delta_malformed").needs_comfy_runtime == ["DeltaLoadsModel"]
    assert report(reg, "alpha_nested").needs_comfy_runtime == []
    # the class loads; running it fails with a message that says why, and the run carries on reporting
    r = ex.run(
        Graph.from_json({"1": {"class_type": "DeltaLoadsModel", "inputs": {"path": "m.safetensors"}}}), targets=["1"]
    )
    assert r.status == "error"
    assert "needs ComfyUI's model runtime" in str(r.error)
    with pytest.raises(ImportError, match="model runtime"):
        sys.modules["custom_nodes.epsilon_runtime"].Patcher()


def test_pack_graph_runs(world):
    reg, ex, tmp = world
    sent = []
    compat_server.set_sender(lambda event, data, sid: sent.append((event, data, sid)))
    graph = {
        "1": {"class_type": "AlphaMaths", "inputs": {"value": 3}},
        # a hidden "*" input used as a link target (ComfyUI's loop nodes)
        "2": {"class_type": "AlphaLoopEnd", "inputs": {"flow": ["1", 0], "initial_value0": ["1", 1]}},
        "3": {"class_type": "AlphaImage", "inputs": {"size": 4, "ckpt": "tiny.safetensors"}},
        "4": {"class_type": "AlphaSave", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "AlphaCond", "inputs": {"strength": 0.25}},
        "6": {"class_type": "AlphaGate", "inputs": {"value": ["1", 0], "open": False}},
        "7": {"class_type": "AlphaLoopEnd", "inputs": {"flow": ["6", 0]}},
    }
    events = []
    r = ex.run(Graph.from_json(graph), targets=["1", "2", "3", "4", "5", "7"], sink=events.append)
    assert r.ok, r.error
    assert r.values["1"] == (6, 12, "6|1|None")  # double, quadruple (nested import), unique id filled
    assert r.values["2"] == (18,)  # 6 + 12 through the hidden link
    image, path = r.values["3"]
    assert tuple(image.shape) == (1, 4, 8, 3)  # common_upscale doubled the width
    assert path == str((tmp / "models" / "checkpoints" / "tiny.safetensors").resolve())
    cond = r.values["5"][0]
    assert len(cond) == 2 and all(opts["strength"] == 0.25 for _, opts in cond)  # combined, then set
    assert torch.equal(cond[1][0], torch.ones(1, 2, 4))
    # the pack's ExecutionBlocker (comfy_execution.graph) is the engine's: node 7's call was blocked
    assert isinstance(r.values["7"][0], ExecutionBlocker)
    # SaveImage subclass wrote into the executor's output folder, ComfyUI's naming
    assert r.outputs["4"] == {"images": [{"filename": "pic_alpha_00001_.png", "subfolder": "alpha", "type": "output"}]}
    assert (tmp / "output" / "alpha" / "pic_alpha_00001_.png").is_file()
    # comfy.utils.ProgressBar became Kiln progress events of node 1
    prog = [(e.value, e.max) for e in events if isinstance(e, Progress) and e.node == "1"]
    assert prog == [(1, 2), (2, 2)]
    # send_sync reached the registered sender
    assert ("alpha.done", {"node": "1", "value": 3}, None) in sent


def test_object_info_keeps_comfyui_shape(world):
    reg, _, _ = world
    info = reg.object_info(["AlphaMaths"])["AlphaMaths"]
    assert info["output"] == ["INT", "INT", "STRING"]
    assert info["output_name"][0] == "doubled" and len(info["output_name"]) == 3
    assert set(info["input"]["hidden"]) == {"unique_id", "prompt_id", "count", "label", "anything", "spec"}
    assert reg["AlphaMaths"].hidden == {"unique_id": "UNIQUE_ID"}  # only the kinds the engine fills


def test_routes_and_queued_messages(world):
    from server import PromptServer  # the compat surface, as a pack sees it

    paths = [getattr(r, "path", None) for r in compat_server.routes()]
    assert "/alpha/hello" in paths
    PromptServer.instance.send_sync("early", {"n": 1})
    assert compat_server.pending()[-1] == ("early", {"n": 1}, None)
    got = []
    compat_server.set_sender(lambda *a: got.append(a))
    assert got[-1] == ("early", {"n": 1}, None) and compat_server.pending() == []


def test_comfy_surface_values(world):
    import comfy.model_management as mm
    import comfy.samplers
    import folder_paths
    from comfy_execution.graph import ExecutionBlocker
    from comfy_execution.graph_utils import GraphBuilder

    import nodes
    from kiln import engine
    from kiln.nodes.sd.samplers import SAMPLER_NAMES

    assert comfy.samplers.KSampler.SAMPLERS == SAMPLER_NAMES
    assert ExecutionBlocker is engine.ExecutionBlocker and GraphBuilder is engine.GraphBuilder
    assert nodes.MAX_RESOLUTION == engine.MAX_RESOLUTION
    assert "KSampler" in nodes.NODE_CLASS_MAPPINGS and "AlphaMaths" in nodes.NODE_CLASS_MAPPINGS
    assert nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"].FUNCTION == "encode"
    assert mm.InterruptProcessingException is engine.Interrupted
    assert mm.intermediate_device() == torch.device("cpu")
    assert ".safetensors" in folder_paths.supported_pt_extensions
    assert folder_paths.get_directory_by_type("nope") is None
    name, where = folder_paths.annotated_filepath("cat.png [output]")
    assert name == "cat.png" and where == folder_paths.get_output_directory()
    assert folder_paths.filter_files_content_types(["a.png", "b.txt", "c.mp4"], ["image"]) == ["a.png"]


def test_save_image_path_counts_and_refuses_escape(tmp_path):
    from kiln.compat import folder_paths

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cat_00007_.png").write_bytes(b"")
    folder, base, counter, sub, _ = folder_paths.get_save_image_path("sub/cat", str(tmp_path), 8, 8)
    assert (folder, base, counter, sub) == (str(tmp_path / "sub"), "cat", 8, "sub")
    with pytest.raises(ValueError, match="outside the output folder"):
        folder_paths.get_save_image_path("../../etc/cat", str(tmp_path))


def test_other_projects_keep_their_module_names(tmp_path, monkeypatch):
    compat.uninstall()
    (tmp_path / "latent_preview.py").write_text("OWNER = 'someone else'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        claimed = compat.install()
        assert "latent_preview" not in claimed and "folder_paths" in claimed
        import latent_preview

        assert latent_preview.OWNER == "someone else"
    finally:
        sys.modules.pop("latent_preview", None)
        compat.uninstall()


def test_finder_only_with_packs(tmp_path):
    compat.uninstall()
    empty = tmp_path / "custom_nodes"
    empty.mkdir()
    default_registry(custom_nodes=empty, entry_points=False)
    assert compat.installed_names() == set()


@pytest.mark.parametrize(
    "hidden",
    [{"x": "INT"}, {"x": "PROMPT_ID"}, {"x": ["STRING", {}]}, {"x": {"a": 1}}, {"x": "*"}],
)
def test_hidden_kinds_comfyui_accepts(hidden):
    cls = type(
        "Odd",
        (),
        {
            "INPUT_TYPES": classmethod(lambda c: {"required": {}, "hidden": hidden}),
            "RETURN_TYPES": ("INT",),
            "RETURN_NAMES": ("a", "b"),  # longer than RETURN_TYPES: ComfyUI accepts it too
            "FUNCTION": "f",
            "f": lambda self, **kw: (1,),
        },
    )
    spec = Registry().register(cls)
    assert spec.hidden == {} and spec.output_names == ["a"]


def test_v3_pack_loads_runs_and_shows_v1_shape(world):
    reg, ex, _ = world
    theta = report(reg, "theta_v3")
    assert theta.ok, theta.traceback
    assert sorted(theta.classes) == ["ThetaAsync", "ThetaScale"]
    info = reg.object_info(["ThetaScale"])["ThetaScale"]
    assert info["input"]["required"] == {
        "value": ("INT", {"default": 2, "min": 0, "max": 100, "tooltip": "the number"}),
        "mode": ("COMBO", {"options": ["double", "triple"]}),
    }
    assert info["input"]["optional"] == {"image": ("IMAGE", {})}
    assert info["output"] == ["INT", "STRING"] and info["output_name"] == ["scaled", "STRING"]
    assert (info["display_name"], info["category"], info["description"]) == (
        "Theta Scale",
        "theta",
        "Multiplies a number.",
    )
    graph = {
        "1": {"class_type": "ThetaScale", "inputs": {"value": 5, "mode": "triple"}},
        "2": {"class_type": "ThetaAsync", "inputs": {"value": ["1", 0]}},
    }
    r = ex.run(Graph.from_json(graph), targets=["1", "2"])
    assert r.ok, r.error
    assert r.values["1"] == (15, "1:triple")  # hidden unique_id reached cls.hidden
    assert r.values["2"] == (16,)
    with pytest.raises(ValidationFailed, match="'quadruple' is not one of the choices"):  # choices from the schema
        ex.run(Graph.from_json({"1": {"class_type": "ThetaScale", "inputs": {"value": 5, "mode": "quadruple"}}}))


def test_comfy_attribute_submodules_and_core_lists(world):
    import comfy

    import nodes

    # `comfy.sd1_clip.X` without importing comfy.sd1_clip first works in ComfyUI: a runtime stub here
    with pytest.raises(ImportError, match="model runtime"):
        comfy.sd1_clip.SD1ClipModel()
    assert comfy.utils.PROGRESS_BAR_ENABLED is True  # a module Kiln writes, reached the same way
    assert "lanczos" in nodes.ImageScale.upscale_methods and nodes.ImageScale.crop_methods == ["disabled", "center"]


def test_cli_lists_packs(world, monkeypatch, capsys):
    from kiln import cli

    _, _, tmp = world
    monkeypatch.setenv("KILN_CUSTOM_NODES", str(tmp / "custom_nodes"))
    assert cli.main(["nodes", "--packs"]) == 0
    out = capsys.readouterr().out
    assert "gamma_broken" in out and "FAILED" in out and "RuntimeError: gamma cannot start" in out
    assert 'impl.py", line 1' in out  # the traceback
    assert "/extensions/alpha_nested/" in out
    assert cli.main(["nodes", "--packs", "--json"]) == 0
    import json

    data = {r["pack"]: r for r in json.loads(capsys.readouterr().out)}
    assert data["alpha_nested"]["ok"] and not data["gamma_broken"]["ok"]
    assert data["epsilon_runtime"]["needs_comfy_runtime"] == ["EpsilonPatch"]
