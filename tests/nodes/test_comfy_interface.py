"""Kiln's /object_info for ComfyUI's core classes matches ComfyUI's declared interface, so drift fails CI."""

from __future__ import annotations

from tests.nodes import interface_diff


def test_every_core_class_matches_comfyui_interface(registry):
    names = interface_diff.scope()
    assert len(names) == 182
    problems = interface_diff.diff(registry.object_info(), names)
    assert problems == [], "\n".join(problems)


def test_the_comparison_catches_drift(registry):
    info = registry.object_info(["KSampler"])
    info["KSampler"]["input"]["required"]["steps"][1]["default"] = 21
    problems = interface_diff.diff(info, ["KSampler"])
    assert any("KSampler.steps.default" in p for p in problems)
