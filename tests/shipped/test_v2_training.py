"""The v2 fine-tune (``train unet-v2``, issue 16) on a tiny run: it starts from the v weights, trains on
partial captions, leaves the v1 checkpoint alone and resumes exactly. Its quality is measured by
``benchmarks/fidelity.py``, not here."""

from __future__ import annotations

import pytest
import torch

from kiln.training import captions as cp, data, models, scenes as sc, tokenizer as tk, train

TINY_UNET = {**models.UNET_CONFIG, "block_out_channels": [16, 16, 32], "norm_num_groups": 4}
TINY_VAE = {**models.VAE_CONFIG, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}


def _tiny_v1_run(out, monkeypatch):
    """A tiny run through the v1 stages (tokenizer, VAE, latent pool, epsilon and v phases), one step each."""
    monkeypatch.setattr(models, "VAE_CONFIG", TINY_VAE)
    train.stage_tokenizer(out)
    train.stage_vae(out, seed=0, steps=1, batch=2, lr=1e-3, resume=False, ckpt_every=1e9)
    train.stage_latents(out, 16, batch=16)
    kw = dict(batch=4, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET, warmup=1, resume=False)
    train.stage_unet(out, seed=0, steps=1, **kw)
    train.stage_unet(out, seed=1, steps=1, prediction="v_prediction", init=out / "unet" / "latest.pt", **kw)
    return out


def _tiny_v4_run(out, monkeypatch):
    """The tiny v1 run, a 16-scene many-object pool and one step each of v2, v3 and v4; returns the run and the
    fine-tune keywords the later stages share."""
    out = _tiny_v1_run(out, monkeypatch)
    train.stage_latents(out, 16, batch=16, name=train.MULTI_LATENTS, multi=True)
    kw = dict(batch=8, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET)
    for stage, seed in ((train.stage_unet_v2, 2), (train.stage_unet_v3, 4)):
        stage(out, seed=seed, steps=1, resume=False, **kw)
    train.stage_unet_v4(out, seed=5, steps=1, resume=False, multi=16, **kw)
    return out, kw


def test_mixed_captions_are_partial_and_a_function_of_the_step():
    scenes = data.pool_scenes(64)
    a, b = data.mixed_captions(0, 5, scenes), data.mixed_captions(0, 5, scenes)
    assert a == b and a != data.mixed_captions(0, 6, scenes)
    parsed = [cp.parse(t) for t in a]
    assert all(p is not None and p.count == len(s.objects) for p, s in zip(parsed, scenes))
    full = sum(p.is_full() for p in parsed)
    assert 4 <= full <= 40  # about a quarter full v1 captions, the rest leave something open


def test_v2_starts_from_the_v_weights_and_resumes_exactly(tmp_path, monkeypatch):
    out = _tiny_v1_run(tmp_path / "run", monkeypatch)
    v1 = torch.load(out / "unet-v" / "latest.pt", weights_only=False)
    seen = []
    monkeypatch.setattr(data, "mixed_captions", lambda *a, f=data.mixed_captions: seen.extend(f(*a)) or f(*a))
    v2 = dict(seed=2, steps=4, batch=4, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET)
    full = train.stage_unet_v2(out, resume=False, **v2)
    a = torch.load(out / "unet-v2" / "latest.pt", weights_only=False)
    assert a["step"] == 4 and a["scheduler_config"]["prediction_type"] == "v_prediction"
    assert torch.equal(
        torch.load(out / "unet-v" / "latest.pt", weights_only=False)["ema"]["unet"]["conv_in.weight"],
        v1["ema"]["unet"]["conv_in.weight"],
    )
    k = "conv_in.weight"  # a few steps from the v EMA weights, not a fresh initialisation
    assert (a["model"]["unet"][k] - v1["ema"]["unet"][k]).abs().max() < 0.05
    assert len(seen) == 16 and any(not cp.parse(t).is_full() for t in seen)
    assert tk.MAX_LENGTH >= max(len(t.split()) for t in seen) + 2
    # stop after 2 steps (the schedule still says 4), then resume to 4: the same weights
    train.stage_unet_v2(out, resume=False, max_steps=2, **v2)
    rest = train.stage_unet_v2(out, resume=True, **v2)
    b = torch.load(out / "unet-v2" / "latest.pt", weights_only=False)
    assert rest == full[2:]
    for name, v in a["model"]["unet"].items():
        assert torch.equal(v, b["model"]["unet"][name]), name


def test_v2_decoder_keeps_the_encoder_and_resumes_exactly(tmp_path, monkeypatch):
    """``train vae-v2`` tunes the decoder only, so every UNet's latents stay valid; stopped and resumed, it
    ends on the same weights as one uninterrupted run."""
    out = tmp_path / "run"
    monkeypatch.setattr(models, "VAE_CONFIG", TINY_VAE)
    train.stage_vae(out, seed=0, steps=1, batch=2, lr=1e-3, resume=False, ckpt_every=1e9)
    v1 = train.load_vae(out).state_dict()
    kw = dict(seed=3, batch=2, lr=1e-3, ckpt_every=1e9)
    train.stage_vae_v2(out, steps=4, resume=False, **kw)
    a = train.load_vae(out, "vae-v2").state_dict()
    for name, v in v1.items():
        same = torch.equal(v, a[name])
        assert same == (not name.startswith("decoder.") and not name.startswith("post_quant_conv.")), name
    # stop after 2 steps (the schedule still says 4), then resume to 4
    (out / "vae-v2" / "final.pt").unlink()
    train.stage_vae_v2(out, steps=4, resume=False, max_steps=2, **kw)
    assert not (out / "vae-v2" / "final.pt").exists()
    st = torch.load(out / "vae-v2" / "latest.pt", weights_only=False)
    assert st["step"] == 2
    train.stage_vae_v2(out, steps=4, resume=True, **kw)
    b = train.load_vae(out, "vae-v2").state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_a_slim_snapshot_of_the_finished_v2_resumes_as_done(tmp_path, monkeypatch):
    """The committed v2 snapshot keeps the EMA weights only (snapshot.SLIM): resuming the finished stage from
    it trains nothing and keeps it slim; asking it to train further is refused, not silently restarted."""
    from kiln.training import snapshot

    out = _tiny_v1_run(tmp_path / "run", monkeypatch)
    v2 = dict(seed=2, batch=4, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET)
    train.stage_unet_v2(out, steps=2, resume=False, **v2)
    snap = tmp_path / "snap"
    monkeypatch.setattr(snapshot, "SNAP", snap)
    snapshot.copy(out, to_snapshot=True)
    slim = torch.load(snap / "unet-v2-final.pt", weights_only=False)
    assert "opt" not in slim and "model" not in slim and slim["step"] == 2
    restored = tmp_path / "restored"
    snapshot.copy(restored, to_snapshot=False)
    (restored / "latents.pt").symlink_to(out / "latents.pt")
    assert train.stage_unet_v2(restored, steps=2, resume=True, **v2) == []  # finished: nothing to train
    assert "opt" not in torch.load(restored / "unet-v2" / "latest.pt", weights_only=False)
    with pytest.raises(SystemExit, match="finished weights only"):
        train.stage_unet_v2(restored, steps=3, resume=True, **v2)


def test_many_object_scenes_are_drawn_more_often_and_by_the_step():
    scenes = data.pool_scenes(2000)
    weights = torch.tensor([train.V3_OBJECT_WEIGHTS[len(s.objects) - 1] for s in scenes]).numpy()
    a = data.weighted_pool_indices(4, 7, 256, weights)
    assert (a == data.weighted_pool_indices(4, 7, 256, weights)).all()
    assert not (a == data.weighted_pool_indices(4, 8, 256, weights)).all()
    drawn = [len(scenes[i].objects) for i in data.weighted_pool_indices(4, 0, 4000, weights)]
    pool = [len(s.objects) for s in scenes]
    share = lambda xs: sum(n > 1 for n in xs) / len(xs)  # noqa: E731
    assert share(pool) < 0.35 and share(drawn) > 0.4  # the pool is 30% many-object scenes; v3 draws ~48%


def test_v3_starts_from_the_v2_weights_and_resumes_exactly(tmp_path, monkeypatch):
    out = _tiny_v1_run(tmp_path / "run", monkeypatch)
    kw = dict(batch=4, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET)
    train.stage_unet_v2(out, seed=2, steps=2, resume=False, **kw)
    v2 = torch.load(out / "unet-v2" / "latest.pt", weights_only=False)
    full = train.stage_unet_v3(out, seed=4, steps=4, resume=False, **kw)
    a = torch.load(out / "unet-v3" / "latest.pt", weights_only=False)
    assert a["step"] == 4 and a["scheduler_config"]["prediction_type"] == "v_prediction"
    k = "conv_in.weight"  # a few steps from the v2 EMA weights
    assert (a["model"]["unet"][k] - v2["ema"]["unet"][k]).abs().max() < 0.05
    assert torch.equal(
        torch.load(out / "unet-v2" / "latest.pt", weights_only=False)["ema"]["unet"][k], v2["ema"]["unet"][k]
    )
    train.stage_unet_v3(out, seed=4, steps=4, resume=False, max_steps=2, **kw)
    rest = train.stage_unet_v3(out, seed=4, steps=4, resume=True, **kw)
    b = torch.load(out / "unet-v3" / "latest.pt", weights_only=False)
    assert rest == full[2:]
    assert all(torch.equal(v, b["model"]["unet"][name]) for name, v in a["model"]["unet"].items())


def test_the_decoder_at_a_segment_end_is_kept_and_loads(tmp_path, monkeypatch):
    """The decoder's schedule restarts at each segment's end (train.VAE2_SEGMENTS); the decoder as it was
    there is saved (the LoRA trains with it) and loads by its run-relative file name."""
    out = tmp_path / "run"
    monkeypatch.setattr(models, "VAE_CONFIG", TINY_VAE)
    monkeypatch.setattr(train, "VAE2_SEGMENTS", (2,))
    train.stage_vae(out, seed=0, steps=1, batch=2, lr=1e-3, resume=False, ckpt_every=1e9)
    kw = dict(seed=3, batch=2, lr=1e-3, ckpt_every=1e9)
    train.stage_vae_v2(out, steps=2, resume=False, **kw)  # a run that ends at the segment's end
    at2 = train.load_vae(out, "vae-v2").state_dict()
    (out / "vae-v2" / "final.pt").unlink()
    train.stage_vae_v2(out, steps=4, resume=False, **kw)  # the same first two steps, then a second segment
    assert train.vae2_lr(1, 1e-3, 4) == train.lr_at(1, 1e-3, 50, 2)
    assert train.vae2_lr(2, 1e-3, 4) == train.lr_at(2, 1e-3, 50, 4)
    kept = train.load_vae(out, "vae-v2/step-2.pt").state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in at2.items())
    final = train.load_vae(out, "vae-v2").state_dict()
    assert any(not torch.equal(v, final[k]) for k, v in at2.items())


def test_the_many_object_pool_holds_only_fresh_two_and_three_object_scenes():
    multi = data.multi_pool_scenes(200)
    counts = [len(s.objects) for s in multi]
    assert set(counts) == {2, 3} and counts.count(2) == 120
    assert not set(multi) & set(data.pool_scenes(200))  # its own seeds, not the first pool's


def test_v4_draws_from_both_pools_by_object_share_and_resumes_exactly(tmp_path, monkeypatch):
    out = _tiny_v1_run(tmp_path / "run", monkeypatch)
    train.stage_latents(out, 16, batch=16, name=train.MULTI_LATENTS, multi=True)
    kw = dict(batch=8, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET)
    train.stage_unet_v2(out, seed=2, steps=1, resume=False, **kw)
    train.stage_unet_v3(out, seed=4, steps=1, resume=False, **kw)
    v3 = torch.load(out / "unet-v3" / "latest.pt", weights_only=False)
    seen = []
    monkeypatch.setattr(data, "mixed_captions", lambda *a, f=data.mixed_captions: seen.extend(a[2]) or f(*a))
    full = train.stage_unet_v4(out, seed=5, steps=4, resume=False, multi=16, **kw)
    a = torch.load(out / "unet-v4" / "latest.pt", weights_only=False)
    k = "conv_in.weight"  # a few steps from the v3 EMA weights
    assert a["step"] == 4 and (a["model"]["unet"][k] - v3["ema"]["unet"][k]).abs().max() < 0.05
    multi = set(data.multi_pool_scenes(16))
    assert any(s in multi for s in seen) and any(len(s.objects) == 1 for s in seen)
    train.stage_unet_v4(out, seed=5, steps=4, resume=False, max_steps=2, multi=16, **kw)
    rest = train.stage_unet_v4(out, seed=5, steps=4, resume=True, multi=16, **kw)
    b = torch.load(out / "unet-v4" / "latest.pt", weights_only=False)
    assert rest == full[2:]
    assert all(torch.equal(v, b["model"]["unet"][name]) for name, v in a["model"]["unet"].items())
    with pytest.raises(SystemExit, match="latents-multi"):  # a pool of another size is not silently mixed in
        train.stage_unet_v4(out, seed=5, steps=4, resume=True, multi=32, **kw)


def test_the_object_weight_is_heavier_on_and_next_to_objects_and_averages_one():
    scenes = data.pool_scenes(8)
    w = data.latent_object_weight(scenes, 5.0)
    assert w.shape == (8, 1, 16, 16) and torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(8))
    for s, wi in zip(scenes, w[:, 0]):
        o = s.objects[0]
        cx, cy = int(o.cx) // 4, int(o.cy) // 4
        assert wi[cy, cx] == wi.max() and wi.max() / wi.min() == pytest.approx(5.0)
        corner = min(wi[0, 0], wi[0, -1], wi[-1, 0], wi[-1, -1])
        assert corner == pytest.approx(float(wi.min()))  # no scene has an object at every corner
    assert torch.equal(data.latent_object_weight(scenes, 1.0), torch.ones(8, 1, 16, 16))
    stray = torch.zeros(8, 1, 16, 16, dtype=torch.bool)
    stray[:, 0, 0, 0] = True  # drawn where no scene has anything: weighed as an object, and its neighbours
    ws = data.latent_object_weight(scenes, 5.0, stray=stray)
    assert all(wi[0, 0, 0] == wi.max() and wi[0, 1, 1] == wi.max() for wi in ws)
    assert torch.allclose(ws.mean(dim=(1, 2, 3)), torch.ones(8))


def test_v5_weighs_objects_starts_from_the_v4_weights_and_resumes_exactly(tmp_path, monkeypatch):
    out, kw = _tiny_v4_run(tmp_path / "run", monkeypatch)
    v4 = torch.load(out / "unet-v4" / "latest.pt", weights_only=False)
    weighed = []
    monkeypatch.setattr(
        data, "latent_object_weight", lambda *a, f=data.latent_object_weight: weighed.append(a[0]) or f(*a)
    )
    full = train.stage_unet_v5(out, seed=6, steps=4, resume=False, multi=16, **kw)
    a = torch.load(out / "unet-v5" / "latest.pt", weights_only=False)
    k = "conv_in.weight"
    assert a["step"] == 4 and (a["model"]["unet"][k] - v4["ema"]["unet"][k]).abs().max() < 0.05
    assert len(weighed) == 4 and all(len(batch) == 8 for batch in weighed)
    train.stage_unet_v5(out, seed=6, steps=4, resume=False, max_steps=2, multi=16, **kw)
    rest = train.stage_unet_v5(out, seed=6, steps=4, resume=True, multi=16, **kw)
    b = torch.load(out / "unet-v5" / "latest.pt", weights_only=False)
    assert rest == full[2:]
    assert all(torch.equal(v, b["model"]["unet"][name]) for name, v in a["model"]["unet"].items())


def test_v5_weighs_what_the_unet_draws_where_the_scene_has_nothing_as_an_object(tmp_path, monkeypatch):
    out = _tiny_v1_run(tmp_path / "run", monkeypatch)
    train.stage_latents(out, 16, batch=16, name=train.MULTI_LATENTS, multi=True)
    kw = dict(batch=8, lr=1e-3, ckpt_every=1e9, eval_every=0, unet_config=TINY_UNET, multi=16)
    for stage, seed in ((train.stage_unet_v2, 2), (train.stage_unet_v3, 4)):
        stage(out, seed=seed, steps=1, resume=False, **{k: v for k, v in kw.items() if k != "multi"})
    train.stage_unet_v4(out, seed=5, steps=1, resume=False, **kw)

    def losses(stray_error: float, fg: float) -> list[float]:
        monkeypatch.setattr(train, "STRAY_ERROR", stray_error)
        monkeypatch.setattr(train, "V5_FG_WEIGHT", fg)
        return train.stage_unet_v5(out, seed=6, steps=3, resume=False, **kw)

    plain = losses(0.25, 1.0)
    assert losses(-1.0, 5.0) == plain  # every pixel missed: all weighed alike, as with no weighting
    assert losses(float("inf"), 5.0) != plain


real_mixed_captions = data.mixed_captions


def _record_object_counts(monkeypatch) -> list[int]:
    """Patch the fine-tunes' caption function to record each captioned scene's number of objects."""
    seen: list[int] = []
    monkeypatch.setattr(
        data,
        "mixed_captions",
        lambda seed, step, scenes: (
            seen.extend(len(s.objects) for s in scenes) or real_mixed_captions(seed, step, scenes)
        ),
    )
    return seen


def test_v6_to_v15_train_the_v5_weights_on_with_a_faster_text_encoder_and_resume_exactly(tmp_path, monkeypatch):
    out, kw = _tiny_v4_run(tmp_path / "run", monkeypatch)
    train.stage_unet_v5(out, seed=6, steps=1, resume=False, multi=16, **kw)
    v5 = torch.load(out / "unet-v5" / "latest.pt", weights_only=False)
    full = train.stage_unet_v6(out, seed=7, steps=4, resume=False, multi=16, **kw)
    a = torch.load(out / "unet-v6" / "latest.pt", weights_only=False)
    k = "conv_in.weight"
    assert a["step"] == 4 and (a["model"]["unet"][k] - v5["ema"]["unet"][k]).abs().max() < 0.05
    te_group, unet_group = a["opt"]["param_groups"]
    assert te_group["lr"] == pytest.approx(train.V6_TEXT_LR_SCALE * unet_group["lr"]) and unet_group["lr"] > 0
    assert len(te_group["params"]) == len(a["model"]["text_encoder"])
    train.stage_unet_v6(out, seed=7, steps=4, resume=False, max_steps=2, multi=16, **kw)
    rest = train.stage_unet_v6(out, seed=7, steps=4, resume=True, multi=16, **kw)
    b = torch.load(out / "unet-v6" / "latest.pt", weights_only=False)
    assert rest == full[2:]
    for part in ("text_encoder", "unet"):
        assert all(torch.equal(v, b["model"][part][name]) for name, v in a["model"][part].items())
    train.stage_unet_v7(out, seed=8, steps=1, resume=False, multi=16, **kw)  # a second round, from v6
    c = torch.load(out / "unet-v7" / "latest.pt", weights_only=False)
    assert c["step"] == 1 and (c["model"]["unet"][k] - b["ema"]["unet"][k]).abs().max() < 0.05
    assert len(c["opt"]["param_groups"]) == 2
    train.stage_unet_v8(out, seed=9, steps=1, resume=False, multi=16, **kw)  # a third round, from v7
    d = torch.load(out / "unet-v8" / "latest.pt", weights_only=False)
    assert d["step"] == 1 and (d["model"]["unet"][k] - c["ema"]["unet"][k]).abs().max() < 0.05
    assert len(d["opt"]["param_groups"]) == 2
    train.stage_unet_v9(out, seed=10, steps=1, resume=False, multi=16, **kw)  # a fourth round, from v8
    e = torch.load(out / "unet-v9" / "latest.pt", weights_only=False)
    assert e["step"] == 1 and (e["model"]["unet"][k] - d["ema"]["unet"][k]).abs().max() < 0.05
    train.stage_unet_v10(out, seed=21, steps=1, resume=False, multi=16, **kw)  # a fifth round, from v9
    v10 = torch.load(out / "unet-v10" / "latest.pt", weights_only=False)
    assert v10["step"] == 1 and (v10["model"]["unet"][k] - e["ema"]["unet"][k]).abs().max() < 0.05
    train.stage_unet_v11(out, seed=22, steps=1, resume=False, multi=16, **kw)  # a sixth, from v10
    v11 = torch.load(out / "unet-v11" / "latest.pt", weights_only=False)
    assert v11["step"] == 1 and (v11["model"]["unet"][k] - v10["ema"]["unet"][k]).abs().max() < 0.05
    train.stage_unet_v12(out, seed=23, steps=1, resume=False, multi=16, **kw)  # a seventh, from v11: shipped
    v12 = torch.load(out / "unet-v12" / "latest.pt", weights_only=False)
    assert v12["step"] == 1 and (v12["model"]["unet"][k] - v11["ema"]["unet"][k]).abs().max() < 0.05
    assert len(v12["opt"]["param_groups"]) == 2
    # v13: more two- and three-object scenes, the text encoder at 6x; v14: a low-rate round of v12's recipe from v13
    seen = _record_object_counts(monkeypatch)
    train.stage_unet_v13(out, seed=25, steps=1, resume=False, multi=16, **kw)
    v13 = torch.load(out / "unet-v13" / "latest.pt", weights_only=False)
    assert v13["step"] == 1 and (v13["model"]["unet"][k] - v12["ema"]["unet"][k]).abs().max() < 0.05
    te_group, unet_group = v13["opt"]["param_groups"]
    assert te_group["lr_scale"] == train.V13_TEXT_LR_SCALE == 6.0 and unet_group["lr_scale"] == 1.0
    assert len(seen) == kw["batch"] and 1 in seen and 2 in seen  # both pools, by V13_OBJECT_SHARES
    monkeypatch.setattr(data, "mixed_captions", real_mixed_captions)
    train.stage_unet_v14(out, seed=26, steps=1, resume=False, multi=16, **kw)
    v14 = torch.load(out / "unet-v14" / "latest.pt", weights_only=False)
    assert v14["step"] == 1 and (v14["model"]["unet"][k] - v13["ema"]["unet"][k]).abs().max() < 0.05
    assert v14["opt"]["param_groups"][0]["lr_scale"] == train.V6_TEXT_LR_SCALE
    # v15: v14 grown by layers that start as the identity (training/graft.py), then a round of v12's recipe
    train.stage_unet_v15(out, seed=27, steps=2, resume=False, max_steps=1, multi=16, **kw)
    grown = torch.load(out / train.V15_GROWN / "latest.pt", weights_only=False)
    assert grown["grown_from"] == str(out / "unet-v14" / "latest.pt")
    for part in ("text_encoder", "unet"):
        assert all(torch.equal(v, grown["ema"][part][name]) for name, v in v14["ema"][part].items())
    v15 = torch.load(out / "unet-v15" / "latest.pt", weights_only=False)
    assert list(v15["unet_config"]["transformer_layers_per_block"]) == list(train.V15_TRANSFORMER_LAYERS)
    layers = train.V15_TEXT_LAYERS or models.TEXT_CONFIG["num_hidden_layers"]
    assert v15["text_config"]["num_hidden_layers"] == layers
    assert set(v15["model"]["unet"]) == set(grown["ema"]["unet"]) > set(v14["ema"]["unet"])
    assert v15["step"] == 1 and (v15["model"]["unet"][k] - v14["ema"]["unet"][k]).abs().max() < 0.05
    assert v15["opt"]["param_groups"][0]["lr_scale"] == train.V6_TEXT_LR_SCALE
    resumed = train.stage_unet_v15(out, seed=27, steps=2, resume=True, multi=16, **kw)  # the grown networks resume
    assert len(resumed) == 1 and torch.load(out / "unet-v15" / "latest.pt", weights_only=False)["step"] == 2
    # the grounding loss on the cross-attention (training.grounding): added to the loss, resumed exactly
    g = dict(seed=11, steps=3, multi=16, init_phase="unet-v9", phase="unet-g", **kw)
    plain = train.stage_unet_v6(out, resume=False, **{**g, "phase": "unet-plain"})
    grounded = train.stage_unet_v6(out, resume=False, grounding_weight=0.3, **g)
    assert grounded[0] > plain[0]  # the first step: the same weights and batch, the grounding term on top
    f = torch.load(out / "unet-g" / "latest.pt", weights_only=False)
    train.stage_unet_v6(out, resume=False, grounding_weight=0.3, max_steps=1, **g)
    assert train.stage_unet_v6(out, resume=True, grounding_weight=0.3, **g) == grounded[1:]
    h = torch.load(out / "unet-g" / "latest.pt", weights_only=False)
    assert all(torch.equal(v, h["model"]["unet"][name]) for name, v in f["model"]["unet"].items())
    # object_shares: a round can draw its batches by another share of one-, two- and three-object scenes
    counts = _record_object_counts(monkeypatch)
    train.stage_unet_v6(out, resume=False, object_shares=(0.0, 1.0, 0.0), **{**g, "phase": "unet-two"})
    assert len(counts) == 3 * kw["batch"] and set(counts) == {2}


def test_validate_prints_the_validation_tables_for_a_run_phase(tmp_path, monkeypatch, capsys):
    from kiln.training import validate

    out, _ = _tiny_v4_run(tmp_path / "run", monkeypatch)
    small = [
        "--probe-seeds",
        "1",
        "--partial-n",
        "2",
        "--seeds",
        "2",
        "--full-n",
        "2",
        "--steps",
        "2",
        "--two-among",
        "12",
    ]
    validate.main(["--run", str(out), "--phase", "unet-v4", *small])
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("'a ") and "shape" in line and "/1, count" in line for line in lines) == 8
    assert any(line.startswith("short prompts") for line in lines)
    assert sum(line.startswith(("txt2img.json (CFG 3)", "varied (7 unguided, CFG 4)")) for line in lines) == 2
    assert sum("every open attribute" in line for line in lines) == 2
    assert any(line.startswith("full prompts, CFG 3") for line in lines)
    # the two-object part: the two-object prompts among the first 12 validation prompts, 2 seeds each
    n_two = sum(p.count == 2 for p in cp.eval_prompts(12, stream=sc.TRAIN_STREAM, start=cp.VALIDATION_START))
    assert n_two > 0 and any(line.startswith(f"{n_two} two-object x 2") for line in lines)
    with pytest.raises(SystemExit):
        validate.main(["--run", str(out), "--phase", "unet-v9", *small])
    assert "unet-v9/latest.pt not found" in capsys.readouterr().err
    # the validation prompts are drawn the benchmark's way from other seeds; the defaults stay the benchmark's
    val = cp.eval_wordings(
        cp.eval_prompts(50, stream=sc.TRAIN_STREAM, start=cp.VALIDATION_START), sc.TRAIN_STREAM, cp.VALIDATION_START
    )
    held_out = cp.eval_prompts(50)
    assert val != cp.eval_wordings(held_out) and cp.eval_prompts(50, stream=sc.EVAL_STREAM, start=0) == held_out
