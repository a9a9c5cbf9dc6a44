"""Architectures of the kiln-shapes stack: SD1.5's component classes at a size a CPU trains in hours.

Design notes (why the UNet looks like this; see ``training/README.md`` for the measurements):

* Latents are 16x16x4 (the VAE downsamples 4x, not SD's 8x): a 64x64 image of 12-24 px shapes needs the
  spatial detail to keep triangles, circles and squares apart.
* Where an object goes is decided early in sampling, at coarse scale. Convolutions and attention carry no
  positional encoding; the only place a feature map learns *where* it is comes from zero padding at the
  borders, which a 4x4 map feels everywhere but a 16x16 one hardly at all. So cross-attention (text ->
  image) sits at 8x8 and 4x4 and in the mid block, and most channels are spent there. (This was not
  enough: the shipped model still ignores position words; see training/README.md.)
* The text encoder is CLIP's (causal) transformer; the UNet attends to every token's hidden state, not
  only the pooled one, so position words at the end of a caption reach the image.
* The noise schedule is DDPM's linear 1e-4..0.02 over 1000 steps rather than SD's scaled-linear: at 16x16
  SD's schedule leaves ~7% of the image in the last step, and a model trained on it reads the background
  colour and layout from the starting noise instead of from the prompt.
* With that schedule the last step is almost pure noise (sigma 157), so the model predicts *v*, not epsilon
  (as SD 2 does, and as Lin et al. 2023 prescribe for a zero-terminal-SNR schedule). An epsilon model
  cannot express what it knows there: the sampler's first x0 is ``x - 157 * eps``, so an epsilon error of
  0.01 is an x0 error of 1.6, and the loss never asks it for that precision. v at high noise is -x0 itself,
  which is where an object's place is decided. The epsilon run learned colour, shape, size and background
  but never position; the same weights fine-tuned to v learned position (training/README.md).
"""

from __future__ import annotations

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=1.0,  # replaced by 1/std of the trained latents
)

TEXT_CONFIG = dict(
    vocab_size=164,  # replaced by the tokenizer's size
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=32,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    projection_dim=128,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 96, 160],
    layers_per_block=1,
    attention_head_dim=4,  # diffusers' historical name: the number of heads
    cross_attention_dim=128,
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    # v-prediction (SD 2's parametrisation): see the module docstring
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=0,
    # samplers start at t=999 (pure noise, as in training's last step) rather than SD's t=951
    timestep_spacing="trailing",
)


def build_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or VAE_CONFIG))


def build_text_encoder(config: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**(config or TEXT_CONFIG)))


def build_unet(config: dict | None = None):
    """A UNet from a config, also one saved from a built UNet (``dict(unet.config)``): diffusers' private
    bookkeeping keys (``_class_name``, ``_use_default_values``, ...) are dropped."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{k: v for k, v in (config or UNET_CONFIG).items() if not k.startswith("_")})


def build_scheduler(config: dict | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config or SCHEDULER_CONFIG)  # from_config: DDIM-only keys are ignored


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
