"""One command for every shipped kiln-shapes file, resumable at any point.

    python -m kiln.training.reproduce [--run runs/shapes] [--from-snapshot]

Runs, in order, skipping what is already finished in ``--run``:

1. ``train all``: tokenizer, VAE, latent pool, the epsilon phase (6,000 steps) and the v phase;
2. ``export``: ``models/checkpoints/kiln-shapes.safetensors``;
3. ``lora``: ``models/loras/kiln-outline.safetensors``;
4. ``controlnet``: ``models/controlnet/kiln-shapes-edges.safetensors``.

``--v2`` (issue 16) adds the partial-caption fine-tune (``train unet-v2``, from the v weights) and exports
that instead, with the LoRA and ControlNet trained on it; without it the shipped v1 files are reproduced
unchanged. Replace the shipped files with ``--v2`` only once ``benchmarks/fidelity.py`` shows its bars met.

``--from-snapshot`` starts from the committed ``training/checkpoints/`` instead of from scratch (the
tokenizer, VAE and the latest UNet checkpoint; the latent pool is re-encoded). Interrupt it whenever; run
the same command again to carry on (the UNet stages resume from their last checkpoint, bit-exact).
Times on a 2-core machine are in training/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.training import controlnet, export, lora, snapshot, train

LORA_STEPS = 1200
CONTROLNET_STEPS = 3000
MODELS = Path(__file__).resolve().parents[1] / "models"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/shapes"))
    p.add_argument("--from-snapshot", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--v2", action="store_true", help="the partial-caption fine-tune (unet-v2) on top")
    args = p.parse_args(argv)
    run = args.run
    threads = ["--threads", str(args.threads)]
    if args.from_snapshot and not (run / "vae" / "final.pt").exists():
        snapshot.copy(run, to_snapshot=False)
    train.main(["all", "--out", str(run), "--resume", *threads])
    phase = None
    if args.v2:
        train.main(["unet-v2", "--out", str(run), "--resume", *threads])
        phase = "unet-v2"
    ckpt = MODELS / "checkpoints" / "kiln-shapes.safetensors"
    export.export_run(run, ckpt, phase=phase)
    print(f"wrote {ckpt}")
    lora.main(
        [
            "--run",
            str(run),
            "--steps",
            str(LORA_STEPS),
            "--out",
            str(MODELS / "loras" / "kiln-outline.safetensors"),
            *threads,
            *(["--phase", phase] if phase else []),
        ]
    )
    controlnet.main(
        [
            "--run",
            str(run),
            "--steps",
            str(CONTROLNET_STEPS),
            "--out",
            str(MODELS / "controlnet" / "kiln-shapes-edges.safetensors"),
            *threads,
            *(["--phase", phase] if phase else []),
        ]
    )


if __name__ == "__main__":
    main()
