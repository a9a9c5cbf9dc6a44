"""Grow a trained text encoder or UNet by layers that start as the identity, so a round can train on from the
weights it had instead of from scratch (the binding rounds in training/README.md).

A new CLIP encoder layer is appended after the last one with its attention output and MLP output projections
zeroed: both of its residual branches then add nothing. A new transformer block in a cross-attention layer of
the UNet gets its self-attention, cross-attention and feed-forward output projections zeroed, for the same
reason. The grown network computes exactly what the old one did until training moves those projections.
"""

from __future__ import annotations

from pathlib import Path

import torch

# the seed of the new layers' random weights. The shipped v15 was grown before this seed was fixed, from an
# unseeded draw: `train unet-v15` from scratch runs its recipe, not its exact weights (training/README.md)
GROW_SEED = 0


def _zero(*modules: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.zero_()


def grow_text_encoder(text_encoder, n_layers: int):
    """A copy of ``text_encoder`` (transformers ``CLIPTextModel``) with ``n_layers`` encoder layers, the old
    ones first; the added ones start as the identity."""
    from kiln.training import models, train

    old = text_encoder.config.num_hidden_layers
    if n_layers < old:
        raise ValueError(f"the text encoder has {old} layers; growing it to {n_layers} would drop some")
    cfg = {**train.text_config(text_encoder), "num_hidden_layers": n_layers}
    grown = models.build_text_encoder(cfg)
    missing, unexpected = grown.load_state_dict(text_encoder.state_dict(), strict=False)
    assert not unexpected, unexpected
    for layer in grown.encoder.layers[old:]:
        _zero(layer.self_attn.out_proj, layer.mlp.fc2)
    return grown


def grow_unet(unet, transformer_layers: tuple[int, ...]):
    """A copy of ``unet`` (diffusers ``UNet2DConditionModel``) whose cross-attention layers hold
    ``transformer_layers[i]`` transformer blocks at down level ``i`` (the up levels mirror it, the mid block
    takes the last); the added blocks start as the identity."""
    from kiln.training import models

    cfg = dict(unet.config)
    old = cfg.get("transformer_layers_per_block", 1)
    old = (old,) * len(transformer_layers) if isinstance(old, int) else tuple(old)
    if any(n < o for n, o in zip(transformer_layers, old)):
        raise ValueError(f"the UNet has {old} transformer blocks per level; {transformer_layers} would drop some")
    cfg["transformer_layers_per_block"] = list(transformer_layers)
    grown = models.build_unet(cfg)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected, unexpected
    new_blocks = set()
    for key in missing:
        parts = key.split(".")
        new_blocks.add(".".join(parts[: parts.index("transformer_blocks") + 2]))
    for name in new_blocks:
        block = grown.get_submodule(name)
        _zero(block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2])
    return grown


def grow_checkpoint(src: Path, dst: Path, text_layers: int | None = None, transformer_layers=None) -> dict:
    """Write ``dst``: the EMA weights of the training checkpoint ``src`` grown by :func:`grow_text_encoder`
    (``text_layers``) and :func:`grow_unet` (``transformer_layers``), as a checkpoint a round starts from
    (``train.stage_unet(init=dst)``; it carries both configs, which the round then trains with)."""
    from kiln.training import models, train

    st = torch.load(src, map_location="cpu", weights_only=False)
    # the new layers' weights other than the zeroed projections are drawn at random: from GROW_SEED, whatever the
    # caller's random state, so that a round from the grown checkpoint reproduces
    with torch.random.fork_rng():
        torch.manual_seed(GROW_SEED)
        te = models.build_text_encoder(train.text_config_of(st))
        te.load_state_dict(st["ema"]["text_encoder"])
        unet = models.build_unet(st["unet_config"])
        unet.load_state_dict(st["ema"]["unet"])
        if text_layers is not None:
            te = grow_text_encoder(te, text_layers)
        if transformer_layers is not None:
            unet = grow_unet(unet, tuple(transformer_layers))
    grown = {
        "ema": {"text_encoder": te.state_dict(), "unet": unet.state_dict()},
        "step": 0,
        "seed": st.get("seed"),
        "unet_config": dict(unet.config),
        "text_config": train.text_config(te),
        "scheduler_config": st.get("scheduler_config"),
        "grown_from": str(src),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    train.save_atomic(grown, dst)
    return grown
