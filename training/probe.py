"""Does the UNet listen to a given kind of word yet? A cheap check, long before samples show it.

For one fixed batch of pure-noise inputs at a few timesteps, compare the model's denoised estimate
(decoded to pixels, CFG 5) between prompts that differ in one attribute only:

* position: where the estimate's deviation from its own median sits ("top left" vs "bottom right");
* colour: the mean RGB in the centre for "red" / "blue" / "green";
* background: the mean brightness of the top rows for "white" vs "black".

    python -m kiln.training.probe --run runs/shapes [--raw]

A model that has not learned position words prints the same centroid for both positions (that is how
the whole epsilon phase of the shipped run looked, while colour and background moved early; the v phase
separates them).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kiln.training import models, sample, train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/shapes")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--n", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = sample.Pipeline.from_run(args.run, ema=not args.raw)
    abar = models.build_scheduler().alphas_cumprod
    noise = torch.randn(args.n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ys, xs = np.mgrid[0:64, 0:64]

    @torch.no_grad()
    def estimate(prompt: str, t: int) -> torch.Tensor:
        a = abar[t]
        tt = torch.full((args.n,), t)
        ec = pipe.unet(noise, tt, pipe.encode_prompts([prompt] * args.n)).sample
        eu = pipe.unet(noise, tt, pipe.encode_prompts([""] * args.n)).sample
        x0 = train.predicted_x0(noise, eu + 5 * (ec - eu), a, pipe.scheduler_config["prediction_type"])
        return pipe.vae.decode(x0.clamp(-4, 4) / pipe.vae.config.scaling_factor).sample

    for t in (999, 800, 600, 450, 300):
        cells = []
        for pos in ("top left", "bottom right"):
            img = estimate(f"a large red circle at the {pos} on a gray background", t)
            d = (img - img.flatten(2).median(2).values[..., None, None]).abs().sum(1).mean(0).numpy()
            w = d / d.sum()
            cells.append(f"{pos} ({(w * xs).sum():.1f}, {(w * ys).sum():.1f})")
        cols = []
        for col in ("red", "blue", "green"):
            img = estimate(f"a large {col} circle in the center on a gray background", t)
            rgb = img[:, :, 24:40, 24:40].mean((0, 2, 3)).tolist()
            cols.append(f"{col} [{', '.join(f'{v:+.2f}' for v in rgb)}]")
        bgs = []
        for bg in ("white", "black"):
            bgs.append(
                f"{bg} {estimate(f'a large red circle in the center on a {bg} background', t)[:, :, :4].mean():+.2f}"
            )
        print(
            f"t={t}: position centroid: {'; '.join(cells)} | colour: {'; '.join(cols)} | background: {'; '.join(bgs)}"
        )


if __name__ == "__main__":
    main()
