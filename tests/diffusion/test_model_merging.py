"""Model and CLIP merges on two tiny SD1.5-layout checkpoints (same architecture, different weights).

Merges at ratio 1 / 0 give the first / second model bit for bit (weights and samples), in-between ratios
blend, add and subtract undo each other, per-block merges touch only their blocks, the other model's own
patches (a LoRA) are part of what is merged, fingerprints follow every setting, and models of different
architectures are refused with an error that names the input.
"""

from __future__ import annotations

import os

import pytest
import tiny_models
import torch
from patch_helpers import conds, load_handles, sample

from kiln import engine, nodes
from kiln.engine import NodeError
from kiln.nodes.conditioning import encode_prompt
from kiln.nodes.model_merging import (
    CLIPMergeAdd,
    CLIPMergeSimple,
    CLIPMergeSubtract,
    ModelMergeAdd,
    ModelMergeBlocks,
    ModelMergeSD1,
    ModelMergeSimple,
    ModelMergeSubtract,
    UNetCrossAttentionMultiply,
)


@pytest.fixture(scope="module")
def ex(world, tmp_path_factory):
    """An executor over a folder with the shared tiny checkpoint, a second one and another architecture."""
    base = tmp_path_factory.mktemp("merging")
    ck = base / "models" / "checkpoints"
    ck.mkdir(parents=True)
    os.symlink(world.ckpt, ck / "tiny.safetensors")
    tiny_models.write_ldm(ck / "tiny_b.safetensors", tiny_models.build_components(seed=7))
    tiny_models.write_shapes_like(ck / "other_arch.safetensors", seed=3)
    lo = base / "models" / "loras"
    lo.mkdir(parents=True)
    os.symlink(world.models / "loras" / "a_kohya.safetensors", lo / "a_kohya.safetensors")
    reg = engine.Registry()
    nodes.register_builtin(reg)
    return engine.Executor(reg, cache=None, folders=engine.Folders(base), services={"model_manager": world.manager})


@pytest.fixture(scope="module")
def a(world, ex):
    return load_handles(world, "tiny.safetensors", ex)


@pytest.fixture(scope="module")
def b(world, ex):
    return load_handles(world, "tiny_b.safetensors", ex)


@pytest.fixture(scope="module")
def prompts(a):
    return conds(a[1])


def _weights(model) -> dict[str, torch.Tensor]:
    with model.patched() as unet:
        return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _bitwise_equal(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_merge_simple_at_one_and_zero_gives_each_model_bit_for_bit(a, b, prompts):
    m1, m2 = a[0], b[0]
    wa, wb = _weights(m1), _weights(m2)
    assert not _bitwise_equal(wa, wb)
    at_one = ModelMergeSimple().run(model1=m1, model2=m2, ratio=1.0)
    at_zero = ModelMergeSimple().run(model1=m1, model2=m2, ratio=0.0)
    assert _bitwise_equal(_weights(at_one), wa)
    assert _bitwise_equal(_weights(at_zero), wb)
    sa, sb = sample(m1, *prompts), sample(m2, *prompts)
    assert torch.equal(sample(at_one, *prompts), sa)
    assert torch.equal(sample(at_zero, *prompts), sb)
    half = ModelMergeSimple().run(model1=m1, model2=m2, ratio=0.25)
    wh = _weights(half)
    assert all(torch.allclose(wh[k], 0.25 * wa[k] + 0.75 * wb[k], atol=1e-6) for k in wa)
    sh = sample(half, *prompts)
    assert not torch.allclose(sh, sa, atol=1e-3) and not torch.allclose(sh, sb, atol=1e-3)
    assert _bitwise_equal(_weights(m1), wa) and _bitwise_equal(_weights(m2), wb)  # inputs never changed
    assert torch.equal(sample(m1, *prompts), sa)


def test_merge_reads_the_other_models_own_patches(world, ex, a, b, prompts):
    lora = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "a_kohya.safetensors", "strength_model": 1.0},
        },
    }
    res = ex.run(engine.Graph.from_json(lora), targets=["2"])
    assert res.status == "success", res.error
    with_lora = res.values["2"][0]
    # model2 shares model1's module (the same checkpoint) and adds a LoRA: ratio 0 is model2 with its LoRA
    merged = ModelMergeSimple().run(model1=a[0], model2=with_lora, ratio=0.0)
    assert _bitwise_equal(_weights(merged), _weights(with_lora))
    assert torch.equal(sample(merged, *prompts), sample(with_lora, *prompts))
    # and the other way round, while the LoRA model is itself patched in: the merge reads loaded weights
    back = ModelMergeSimple().run(model1=with_lora, model2=a[0], ratio=0.0)
    assert _bitwise_equal(_weights(back), _weights(a[0]))
    # a merge of a merge
    nested = ModelMergeSimple().run(model1=b[0], model2=merged, ratio=0.0)
    assert _bitwise_equal(_weights(nested), _weights(with_lora))


def test_add_and_subtract_round_trip(a, b):
    m1, m2 = a[0], b[0]
    diff = ModelMergeSubtract().run(model1=m1, model2=m2, multiplier=1.0)
    back = ModelMergeAdd().run(model1=diff, model2=m2)
    wa, wd, wback = _weights(m1), _weights(diff), _weights(back)
    wb = _weights(m2)
    assert all(torch.allclose(wd[k], wa[k] - wb[k], atol=1e-6) for k in wa)
    assert all(torch.allclose(wback[k], wa[k], atol=1e-5) for k in wa)
    half = _weights(ModelMergeSubtract().run(model1=m1, model2=m2, multiplier=0.5))
    assert all(torch.allclose(half[k], wa[k] - 0.5 * wb[k], atol=1e-6) for k in wa)
    assert _bitwise_equal(_weights(ModelMergeSubtract().run(model1=m1, model2=m2, multiplier=0.0)), wa)


def test_merge_blocks_touch_only_their_blocks(a, b):
    m1, m2 = a[0], b[0]
    wa, wb = _weights(m1), _weights(m2)
    merged = _weights(ModelMergeBlocks().run(model1=m1, model2=m2, input=0.0, middle=1.0, out=1.0))
    for k in wa:
        # ComfyUI's rule: "input" also covers what no name matches (time_embed), "out" covers output_blocks
        want = wb if k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) else wa
        assert torch.equal(merged[k], want[k]), k
    mid = _weights(ModelMergeBlocks().run(model1=m1, model2=m2, input=1.0, middle=0.0, out=1.0))
    assert all(torch.equal(mid[k], (wb if k.startswith("mid_block.") else wa)[k]) for k in wa)
    ratios = {name: 1.0 for name in ModelMergeSD1.BLOCKS}
    ratios["output_blocks.1."] = 0.0  # up_blocks.0's second resnet and its upsampler (no attention here)
    (sd1,) = ModelMergeSD1().merge(m1, m2, **ratios)
    w = _weights(sd1)
    changed = {k for k in wa if not torch.equal(w[k], wa[k])}
    assert changed and all(k.startswith(("up_blocks.0.resnets.1.", "up_blocks.0.upsamplers.")) for k in changed)
    assert any(k.startswith("up_blocks.0.upsamplers.") for k in changed)
    assert all(torch.equal(w[k], wb[k]) for k in changed)


def test_fingerprints_follow_every_setting(a, b):
    m1, m2 = a[0], b[0]
    fp = lambda h: h.__kiln_fingerprint__()  # noqa: E731
    prints = [
        fp(ModelMergeSimple().run(model1=m1, model2=m2, ratio=0.5)),
        fp(ModelMergeSimple().run(model1=m1, model2=m2, ratio=0.6)),
        fp(ModelMergeSimple().run(model1=m2, model2=m1, ratio=0.5)),
        fp(ModelMergeBlocks().run(model1=m1, model2=m2, input=0.5)),
        fp(ModelMergeBlocks().run(model1=m1, model2=m2, middle=0.5)),
        fp(ModelMergeSubtract().run(model1=m1, model2=m2, multiplier=0.5)),
        fp(ModelMergeAdd().run(model1=m1, model2=m2)),
        fp(m1),
    ]
    assert len(set(prints)) == len(prints)
    assert fp(ModelMergeSimple().run(model1=m1, model2=m2, ratio=0.5)) == prints[0]
    # a change to the other model changes the merge
    other = ModelMergeSimple().run(model1=m2, model2=m1, ratio=0.9)
    assert fp(ModelMergeSimple().run(model1=m1, model2=other, ratio=0.5)) != prints[0]


def test_different_architectures_are_refused(world, ex, a):
    other = load_handles(world, "other_arch.safetensors", ex)
    with pytest.raises(NodeError) as err:
        ModelMergeSimple().run(model1=a[0], model2=other[0], ratio=0.5)
    assert err.value.input_name == "model2"
    assert "different architecture" in str(err.value) and "same model family" in (err.value.hint or "")
    with pytest.raises(NodeError) as err:
        CLIPMergeSimple().run(clip1=a[1], clip2=other[1], ratio=0.5)
    assert err.value.input_name == "clip2"
    with pytest.raises(NodeError) as err:
        ModelMergeAdd().run(model1=a[1], model2=a[0])
    assert err.value.input_name == "model1"


def test_clip_merges(a, b):
    c1, c2 = a[1], b[1]
    text = "a red circle"
    e1, e2 = encode_prompt(c1, text)[0][0], encode_prompt(c2, text)[0][0]
    assert not torch.allclose(e1, e2)
    assert torch.equal(encode_prompt(CLIPMergeSimple().run(clip1=c1, clip2=c2, ratio=1.0), text)[0][0], e1)
    assert torch.equal(encode_prompt(CLIPMergeSimple().run(clip1=c1, clip2=c2, ratio=0.0), text)[0][0], e2)
    half = encode_prompt(CLIPMergeSimple().run(clip1=c1, clip2=c2, ratio=0.5), text)[0][0]
    assert not torch.allclose(half, e1, atol=1e-3) and not torch.allclose(half, e2, atol=1e-3)
    diff = CLIPMergeSubtract().run(clip1=c1, clip2=c2, multiplier=1.0)
    back = CLIPMergeAdd().run(clip1=diff, clip2=c2)
    assert torch.allclose(encode_prompt(back, text)[0][0], e1, atol=1e-4)
    assert torch.equal(encode_prompt(c1, text)[0][0], e1)  # the loaded encoder is unchanged


def test_merge_in_a_graph(world, ex, a):
    """ModelMergeSimple at ratio 1 in front of KSampler samples exactly as model1 alone."""

    def graph(model):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "b": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_b.safetensors"}},
            "m": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["b", 0], "ratio": 1.0}},
            "s": {"class_type": "ModelMergeSDXL", "inputs": {"model1": ["1", 0], "model2": ["b", 0]}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": 3,
                    "steps": 2,
                    "cfg": 4.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                    "model": model,
                    "positive": ["2", 0],
                    "negative": ["3", 0],
                    "latent_image": ["4", 0],
                },
            },
        }

    out = {}
    for key, model in (("plain", ["1", 0]), ("merged", ["m", 0]), ("sdxl_all_ones", ["s", 0])):
        res = ex.run(engine.Graph.from_json(graph(model)), targets=["5"])
        assert res.status == "success", res.error
        out[key] = res.values["5"][0]["samples"]
    assert torch.equal(out["merged"], out["plain"])
    assert torch.equal(out["sdxl_all_ones"], out["plain"])


def test_concurrent_runs_on_shared_modules_match_sequential_ones(ex, a, b, prompts):
    """Runs of a base model, the base merged with the other model, and the other merged with the base, in
    parallel threads: each run sees the loaded weights of the module it merges with, never another run's
    patched ones."""
    from concurrent.futures import ThreadPoolExecutor

    m1, m2 = a[0], b[0]
    models = [
        m1,
        ModelMergeSimple().run(model1=m1, model2=m2, ratio=0.3),
        ModelMergeSimple().run(model1=m2, model2=m1, ratio=0.6),
        UNetCrossAttentionMultiply().run(model=ModelMergeAdd().run(model1=m2, model2=m1), v=0.5),
    ]
    want = [sample(m, *prompts) for m in models]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda m: sample(m, *prompts), models * 3))
    assert all(torch.equal(g, want[i % len(models)]) for i, g in enumerate(got))
