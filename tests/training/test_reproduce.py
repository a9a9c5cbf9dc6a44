"""training.reproduce's order of stages, on stand-ins for the stages (each is tested on its own; the real
chain takes hours): the shipped UNet is exported, and the shipped LoRA is trained on from the first one."""

from __future__ import annotations

from pathlib import Path

from kiln.training import reproduce


def _record(monkeypatch, tmp_path: Path) -> list[tuple]:
    calls: list[tuple] = []

    def lora_main(argv: list[str]) -> None:
        calls.append(("lora", argv))
        Path(argv[argv.index("--out") + 1]).write_bytes(b"lora")

    monkeypatch.setattr(reproduce, "MODELS", tmp_path / "models")
    monkeypatch.setattr(reproduce.train, "main", lambda argv: calls.append(("train", argv[0])))
    monkeypatch.setattr(reproduce.export, "export_run", lambda run, out, phase=None: calls.append(("export", phase)))
    monkeypatch.setattr(reproduce.lora, "main", lora_main)
    monkeypatch.setattr(reproduce.controlnet, "main", lambda argv: calls.append(("controlnet", argv[0])))
    (tmp_path / "models" / "loras").mkdir(parents=True)
    return calls


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_second_release_trains_its_lora_on_from_the_first_one(tmp_path, monkeypatch):
    calls = _record(monkeypatch, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    reproduce.main(["--run", str(run)])
    stages = [c[1] for c in calls if c[0] == "train"]
    assert stages[-7:] == ["unet-v10", "unet-v11", "unet-v12", "unet-v13", "unet-v14", "unet-v15", "vae-v2"]
    assert stages.index("unet-v9") < stages.index("unet-v10")
    assert ("export", "unet-v15") in calls and calls.index(("export", "unet-v15")) > len(stages) - 1
    first, shipped = (c[1] for c in calls if c[0] == "lora")
    assert _arg(first, "--phase") == "unet-v2" and _arg(first, "--out") == str(run / reproduce.FIRST_LORA)
    assert "--init" not in first
    assert _arg(shipped, "--init") == str(run / reproduce.FIRST_LORA)
    assert _arg(shipped, "--phase") == reproduce.SHIPPED_UNET == "unet-v15"  # the LoRA is suited to the shipped UNet
    assert _arg(shipped, "--alpha-scale") == str(reproduce.LORA_ALPHA_SCALE)
    assert _arg(shipped, "--out") == str(tmp_path / "models" / "loras" / "kiln-outline.safetensors")
    assert calls[-1][0] == "controlnet"
    # run again (the first LoRA is there, as after --from-snapshot): only the shipped one is trained
    calls.clear()
    reproduce.main(["--run", str(run)])
    assert [_arg(c[1], "--out") for c in calls if c[0] == "lora"] == [_arg(shipped, "--out")]


def test_the_first_release_trains_its_lora_once_on_the_v_weights(tmp_path, monkeypatch):
    calls = _record(monkeypatch, tmp_path)
    reproduce.main(["--run", str(tmp_path / "run"), "--v1"])
    assert [c[1] for c in calls if c[0] == "train"] == ["all"] and ("export", None) in calls
    (only,) = (c[1] for c in calls if c[0] == "lora")
    assert "--init" not in only and "--phase" not in only
    assert _arg(only, "--out") == str(tmp_path / "models" / "loras" / "kiln-outline.safetensors")
