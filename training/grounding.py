"""A grounding loss on the UNet's cross-attention: each word that describes an object should attend to where
that object is.

Two- and three-object prompts were where the model failed ("a small red square and a circle" drew two red
squares): the UNet mixed up which attributes belong to which object. Training data knows exactly where each
object is and which caption words name it, so during training the cross-attention of those words can be
pulled onto the object's region, as TokenCompose (Wang et al., CVPR 2024) does with segmentation masks.

Tried for a v10 round at weight 0.3 and not shipped: the attention moved onto the objects, but the binding
did not improve and the shipped LoRA stopped working on that UNet (training/README.md has the figures).

Training-time only: :class:`AttentionRecorder` swaps in an attention processor that computes the same
output and keeps each cross-attention layer's probabilities. Nothing here changes the exported weights'
format or how they are sampled.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from kiln.training import captions, scenes as sc

# words of an object phrase that say something about that object ("a", "at", "the", "in" do not)
_OBJECT_WORDS = set(sc.SHAPES) | set(sc.COLORS) | set(sc.SIZES) | {w for p in sc.POSITIONS for w in p.split()}


class _RecordingProcessor:
    """Cross-attention as diffusers' default processor computes it, keeping the probabilities
    ``[batch, heads, queries, tokens]`` in ``store``."""

    def __init__(self, store: list[torch.Tensor]):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, attention_mask)
        self.store.append(probs.view(batch, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


class AttentionRecorder:
    """Installs :class:`_RecordingProcessor` on every cross-attention layer (``attn2``) of ``unet``;
    :attr:`maps` holds the probabilities of the last forward pass once :meth:`clear` was called before it."""

    def __init__(self, unet):
        self.maps: list[torch.Tensor] = []
        self.layers = [m for n, m in unet.named_modules() if n.endswith("attn2")]
        for m in self.layers:
            if m.residual_connection or m.rescale_output_factor != 1.0 or m.norm_cross is not None:
                raise ValueError("the recording processor supports plain cross-attention only")
            m.set_processor(_RecordingProcessor(self.maps))

    def clear(self) -> None:
        self.maps.clear()


def word_objects(text: str, scene: sc.Scene) -> list[int] | None:
    """For each word of ``text`` (a training caption of ``scene``): the index of the scene object it
    describes, ``-1`` for the background's colour word, ``-2`` for words about nothing in particular.
    ``None`` when the caption's phrases fit the scene's objects more than one way (or none)."""
    words = text.split()
    prompt = captions.parse(text)
    if prompt is None or len(prompt.objects) != len(scene.objects):
        return None
    fits = [
        perm
        for perm in itertools.permutations(range(len(scene.objects)))
        if all(
            getattr(spec, a) in (None, getattr(scene.objects[j], a))
            for spec, j in zip(prompt.objects, perm)
            for a in ("shape", "color", "size", "position")
        )
    ]
    if len(fits) != 1:
        return None
    out = [-2] * len(words)
    phrase = 0
    for i, w in enumerate(words):
        if w == "and":
            phrase += 1
        elif w == "on" and i > 0:  # the background phrase: "on white", "on a white (background)"
            j = i + 2 if words[i + 1 : i + 2] in (["a"], ["an"]) else i + 1
            if j < len(words) and words[j] in sc.BACKGROUNDS:
                out[j] = -1
            break
        elif w in _OBJECT_WORDS:
            out[i] = fits[0][phrase]
    return out


def _cells(mask: np.ndarray, res: int) -> np.ndarray:
    """A 64x64 boolean mask as ``res x res`` cells: True where the mask touches the cell."""
    cell = mask.shape[0] // res
    return mask.reshape(res, cell, res, cell).any(axis=(1, 3))


def targets(texts: list[str], scenes: list[sc.Scene], keep: torch.Tensor, length: int) -> tuple[np.ndarray, dict]:
    """(owner ``[B, length]``: per token the object index, -1 background, -2 none; the per-scene masks at
    full resolution ``{b: [n_objects + 1, 64, 64]}``, the last the background). Tokens are words shifted by
    one (the start token); captions whose words cannot be placed, and dropped ones (``keep`` False), ground
    nothing."""
    owner = np.full((len(texts), length), -2, np.int64)
    masks = {}
    for b, (text, scene) in enumerate(zip(texts, scenes)):
        if not bool(keep[b]):
            continue
        objs = word_objects(text, scene)
        if objs is None:
            continue
        n = min(len(objs), length - 2)
        owner[b, 1 : 1 + n] = objs[:n]
        obj_masks = [sc.object_mask(o) for o in scene.objects]
        masks[b] = np.stack([*obj_masks, ~np.any(obj_masks, axis=0)])
    return owner, masks


def loss(maps: list[torch.Tensor], owner: np.ndarray, masks: dict) -> torch.Tensor:
    """Mean over grounded tokens and layers of 1 - (the token's attention inside its region) / (its attention
    everywhere), heads averaged; zero when no token is grounded."""
    rows = [b for b in masks if (owner[b] != -2).any()]
    if not rows or not maps:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    tokens = {b: np.nonzero(owner[b] != -2)[0] for b in rows}
    regions: dict[int, torch.Tensor] = {}  # per resolution: [n grounded tokens in all rows, HW]

    def region(res: int) -> torch.Tensor:
        if res not in regions:  # each region once per row, then one row per token
            per_row = {b: np.stack([_cells(m, res).reshape(-1) for m in masks[b]]) for b in rows}
            cells = [per_row[b][owner[b, tokens[b]]] for b in rows]
            regions[res] = torch.from_numpy(np.concatenate(cells)).float()
        return regions[res]

    b_idx = torch.tensor([b for b in rows for _ in tokens[b]])
    t_idx = torch.tensor([int(t) for b in rows for t in tokens[b]])
    terms = []
    for probs in maps:
        res = int(round(probs.shape[2] ** 0.5))
        at = probs.mean(dim=1)[b_idx, :, t_idx]  # [n, HW]
        inside = (at * region(res).to(at.dtype)).sum(dim=1)
        terms.append(1 - inside / at.sum(dim=1).clamp_min(1e-8))
    return torch.cat(terms).mean()
