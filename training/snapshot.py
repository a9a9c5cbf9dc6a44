"""Copy a run's resumable state into ``training/checkpoints/`` (committed) and back.

    python -m kiln.training.snapshot save --run runs/shapes      # run -> training/checkpoints/
    python -m kiln.training.snapshot restore --run runs/shapes   # training/checkpoints/ -> run, then:
    python -m kiln.training.train latents --out runs/shapes      # re-encode the latent pool (deterministic)
    python -m kiln.training.train all --out runs/shapes --resume   # carries on where the snapshot stopped

The snapshot is the tokenizer, the finished VAE and each UNet phase's ``latest.pt`` (model, EMA, AdamW
state, step): everything ``--resume`` needs except the latent pool, which is recomputed from the VAE. The
finished v2 to v15 fine-tunes are kept as their EMA weights only (:data:`SLIM`), with the v2 decoder and the
first LoRA (which the shipped one is trained on from).
One file per component, overwritten each time, so the repository holds few binary versions.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SNAP = Path(__file__).resolve().parent / "checkpoints"
FILES = {  # run-relative path -> snapshot name
    "tokenizer/vocab.json": "tokenizer/vocab.json",
    "tokenizer/merges.txt": "tokenizer/merges.txt",
    "vae/config.json": "vae-config.json",
    "vae/final.pt": "vae-final.pt",
    "unet/latest.pt": "unet-latest.pt",  # the finished epsilon phase (what the v phase starts from)
    "unet-v/latest.pt": "unet-v-latest.pt",  # the v phase: the shipped weights
    "unet-v2/latest.pt": "unet-v2-final.pt",  # the partial-caption fine-tune: its EMA weights (SLIM)
    "unet-v3/latest.pt": "unet-v3-final.pt",  # the many-object fine-tune of v2 (SLIM)
    "unet-v4/latest.pt": "unet-v4-final.pt",  # v3 on both pools (SLIM)
    "unet-v5/latest.pt": "unet-v5-final.pt",  # v4 weighed on objects (SLIM)
    "unet-v6/latest.pt": "unet-v6-final.pt",  # v5 trained on, the text encoder faster (SLIM)
    "unet-v7/latest.pt": "unet-v7-final.pt",  # a second round of v6 (SLIM)
    "unet-v8/latest.pt": "unet-v8-final.pt",  # a third round of v6 (SLIM)
    "unet-v9/latest.pt": "unet-v9-final.pt",  # a fourth round of v6 (SLIM)
    "unet-v10/latest.pt": "unet-v10-final.pt",  # a fifth round of v6 (SLIM)
    "unet-v11/latest.pt": "unet-v11-final.pt",  # a sixth round of v6 (SLIM)
    "unet-v12/latest.pt": "unet-v12-final.pt",  # a seventh round of v6 (SLIM)
    "unet-v13/latest.pt": "unet-v13-final.pt",  # v12 on more two-object scenes, the text encoder at 6x (SLIM)
    "unet-v14/latest.pt": "unet-v14-final.pt",  # v13 at a low rate (SLIM)
    "unet-v15/latest.pt": "unet-v15-final.pt",  # v14 grown (graft.py) and trained on: the shipped UNet (SLIM)
    "vae-v2/final.pt": "vae-v2-final.pt",  # the v2 decoder (train.stage_vae_v2)
    "vae-v2/step-2000.pt": "vae-v2-step-2000.pt",  # that decoder at 2,000 steps (what the first LoRA is trained with)
    "lora-v2.safetensors": "lora-v2.safetensors",  # the first LoRA, which the shipped one is trained on from
}
# Finished phases whose snapshot keeps the EMA weights and step only (29 MB, not 113 MB with the training
# model and AdamW state): what export, the LoRA and the ControlNet start from; they are not trained further.
SLIM = {f"unet-v{i}/latest.pt" for i in range(2, 16)}


def copy(run: Path, to_snapshot: bool) -> None:
    for rel, name in FILES.items():
        src, dst = (run / rel, SNAP / name) if to_snapshot else (SNAP / name, run / rel)
        if not src.exists() and rel.startswith(("unet-v", "vae-v2/", "lora-")):
            continue  # a run still in its epsilon phase, not yet fine-tuned on partial captions, or without a LoRA
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        if to_snapshot and rel in SLIM:
            st = torch.load(src, map_location="cpu", weights_only=False)
            torch.save({k: v for k, v in st.items() if k not in ("model", "opt")}, tmp)
        else:
            shutil.copyfile(src, tmp)
        tmp.replace(dst)
        print(f"{src} -> {dst}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["save", "restore"])
    p.add_argument("--run", type=Path, default=Path("runs/shapes"))
    args = p.parse_args(argv)
    copy(args.run, args.action == "save")


if __name__ == "__main__":
    main()
