"""Growing a trained text encoder or UNet (training/graft.py) keeps what it computes, and a round trains,
resumes, samples and exports the grown networks."""

import pytest
import torch
from test_shapes_train import TINY_UNET, _prepare

from kiln.training import export, graft, models, sample, train

TINY_TEXT = {**models.TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}


def _text_and_unet():
    torch.manual_seed(0)
    te = models.build_text_encoder(TINY_TEXT)
    unet = models.build_unet(TINY_UNET)
    # trained-looking weights: a fresh diffusers UNet zeroes its output projections already
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return te, unet


def test_grown_networks_compute_what_the_old_ones_did():
    te, unet = _text_and_unet()
    te2 = graft.grow_text_encoder(te, 4)
    unet2 = graft.grow_unet(unet, (1, 2, 2))
    assert te2.config.num_hidden_layers == 4 and len(te2.encoder.layers) == 4
    assert list(unet2.config.transformer_layers_per_block) == [1, 2, 2]
    assert len(unet2.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(unet2.mid_block.attentions[0].transformer_blocks) == 2  # the mid block takes the last level's
    assert models.n_params(te2) > models.n_params(te) and models.n_params(unet2) > models.n_params(unet)
    ids = torch.randint(2, TINY_TEXT["vocab_size"], (2, 16))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        h, h2 = te(ids).last_hidden_state, te2(ids).last_hidden_state
        assert torch.allclose(h, h2, atol=1e-6)
        ctx = torch.randn(2, 16, TINY_UNET["cross_attention_dim"])
        assert torch.allclose(unet(x, t, ctx).sample, unet2(x, t, ctx).sample, atol=1e-6)
    with pytest.raises(ValueError, match="drop"):
        graft.grow_text_encoder(te2, 3)
    with pytest.raises(ValueError, match="drop"):
        graft.grow_unet(unet2, (1, 1, 2))


def test_a_round_from_a_grown_checkpoint_trains_resumes_samples_and_exports_the_grown_networks(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _prepare(out, monkeypatch, pool=16)
    kw = dict(batch=8, lr=1e-3, ckpt_every=1e9, eval_every=0, warmup=2, prediction="v_prediction")
    train.stage_unet(out, seed=0, steps=2, resume=False, unet_config=TINY_UNET, phase="small", **kw)
    small = torch.load(out / "small" / "latest.pt", weights_only=False)
    grown = graft.grow_checkpoint(out / "small" / "latest.pt", out / "grown" / "latest.pt", 4, (1, 2, 1))
    assert grown["text_config"]["num_hidden_layers"] == 4
    assert grown["grown_from"].endswith("latest.pt") and grown["step"] == 0
    torch.manual_seed(5)  # the new layers' random weights do not depend on the caller's random state
    again = graft.grow_checkpoint(out / "small" / "latest.pt", out / "again" / "latest.pt", 4, (1, 2, 1))
    for part in ("text_encoder", "unet"):
        assert all(torch.equal(v, again["ema"][part][k]) for k, v in grown["ema"][part].items())

    # the grown checkpoint samples as the one it grew from
    a = sample.Pipeline.from_run(out, phase="small").generate(["a red circle"], seed=0, steps=3, cfg=3.0)
    b = sample.Pipeline.from_run(out, phase="grown").generate(["a red circle"], seed=0, steps=3, cfg=3.0)
    assert all((x == y).all() for x, y in zip(a, b))

    # a round from it (no unet_config given) trains the grown networks, the new blocks included
    full = train.stage_unet(out, seed=1, steps=4, resume=False, init=out / "grown" / "latest.pt", phase="big", **kw)
    big = torch.load(out / "big" / "latest.pt", weights_only=False)
    assert big["text_config"]["num_hidden_layers"] == 4
    assert list(big["unet_config"]["transformer_layers_per_block"]) == [1, 2, 1]
    new = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0.weight"
    assert new not in small["ema"]["unet"] and big["model"]["unet"][new].abs().max() > 0
    assert big["model"]["text_encoder"]["encoder.layers.3.mlp.fc2.weight"].abs().max() > 0

    # resuming rebuilds the grown networks from the checkpoint and carries on exactly
    train.stage_unet(
        out, seed=1, steps=4, resume=False, max_steps=2, init=out / "grown" / "latest.pt", phase="big", **kw
    )
    rest = train.stage_unet(out, seed=1, steps=4, resume=True, init=out / "grown" / "latest.pt", phase="big", **kw)
    assert rest == full[2:]

    # the single-file export carries both configs, and reads back as the grown networks
    path = tmp_path / "grown.safetensors"
    export.export_run(out, path, dtype=torch.float32, phase="big")
    pipe = export.load_pipeline(path)
    assert pipe.text_encoder.config.num_hidden_layers == 4
    assert list(pipe.unet.config.transformer_layers_per_block) == [1, 2, 1]
    ref = sample.Pipeline.from_run(out, phase="big")
    x = ref.generate(["a blue square"], seed=2, steps=3, cfg=3.0)
    y = pipe.generate(["a blue square"], seed=2, steps=3, cfg=3.0)
    assert all((i == j).all() for i, j in zip(x, y))

    # and the nodes' checkpoint loader builds the same networks from the file, weight for weight
    from kiln.nodes.sd import checkpoint

    comps = checkpoint.load_single_file(path, torch.float32, torch.device("cpu"))
    assert comps.family == "kiln-shapes"
    for name, w in pipe.unet.state_dict().items():
        assert torch.equal(comps.unet.state_dict()[name], w), name
    node_te = comps.text_encoders[0].state_dict()
    assert len([k for k in node_te if k.endswith("mlp.fc2.weight")]) == 4
    for name, w in pipe.text_encoder.state_dict().items():
        assert torch.equal(node_te[name], w), name
