"""Estimated prices of provider calls, in USD.

The built-in table holds list prices as published at the time of writing; they change, so the config
file's ``prices:`` section overrides or extends it per model::

    prices:
      gpt-image-1: {per_image: {"low/1024x1024": 0.011}, tokens_per_million: {text_in: 5, image_in: 10, image_out: 40}}
      black-forest-labs/FLUX.1-schnell: {per_image: {"*": 0.003}}
      gpt-4.1: {tokens_per_million: {text_in: 2, text_out: 8}}

``per_image`` keys are ``"<quality>/<size>"``, ``"<size>"``, ``"<quality>"`` or ``"*"``, most specific
first. When a response carries token usage, the token prices give the figure; otherwise the per-image one.
"""

from __future__ import annotations

from typing import Any

from . import config

_GPT_IMAGE_1 = {
    "per_image": {
        "low/1024x1024": 0.011,
        "low/1024x1536": 0.016,
        "low/1536x1024": 0.016,
        "medium/1024x1024": 0.042,
        "medium/1024x1536": 0.063,
        "medium/1536x1024": 0.063,
        "high/1024x1024": 0.167,
        "high/1024x1536": 0.25,
        "high/1536x1024": 0.25,
        # auto quality or size: the dearest it can be, so a budget check never under-estimates
        "*": 0.25,
    },
    "tokens_per_million": {"text_in": 5.0, "image_in": 10.0, "image_out": 40.0},
}

BUILTIN: dict[str, dict[str, Any]] = {
    "gpt-image-1": _GPT_IMAGE_1,
    "dall-e-3": {
        "per_image": {
            "standard/1024x1024": 0.04,
            "standard/1024x1792": 0.08,
            "standard/1792x1024": 0.08,
            "hd/1024x1024": 0.08,
            "hd/1024x1792": 0.12,
            "hd/1792x1024": 0.12,
            "*": 0.12,
        }
    },
    "dall-e-2": {"per_image": {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02, "*": 0.02}},
    "gpt-4.1": {"tokens_per_million": {"text_in": 2.0, "text_out": 8.0}},
    "gpt-4.1-mini": {"tokens_per_million": {"text_in": 0.4, "text_out": 1.6}},
    "gpt-4o": {"tokens_per_million": {"text_in": 2.5, "text_out": 10.0}},
    "gpt-5": {"tokens_per_million": {"text_in": 1.25, "text_out": 10.0}},
    "black-forest-labs/flux-1.1-pro": {"per_image": {"*": 0.04}},
    "black-forest-labs/flux-schnell": {"per_image": {"*": 0.003}},
    "black-forest-labs/FLUX.1-schnell": {"per_image": {"*": 0.003}},
    "imagen-3.0-generate-002": {"per_image": {"*": 0.03}},
    "imagen-4.0-generate-001": {"per_image": {"*": 0.04}},
    "imagen-4.0-fast-generate-001": {"per_image": {"*": 0.02}},
    "imagen-4.0-ultra-generate-001": {"per_image": {"*": 0.06}},
}


def table(model: str) -> dict | None:
    over = config.section("prices").get(model)
    if isinstance(over, dict):
        base = dict(BUILTIN.get(model, {}))
        base.update(over)
        return base
    return BUILTIN.get(model)


def per_image(model: str, size: str = "*", quality: str = "*") -> float | None:
    """Price of one image, or None when the table does not know the model."""
    t = table(model)
    if not t or "per_image" not in t:
        return None
    p = t["per_image"]
    for k in (f"{quality}/{size}", size, quality, "*"):
        if k in p:
            return float(p[k])
    return None


def from_usage(model: str, usage: dict | None) -> float | None:
    """Price from token usage as the OpenAI APIs report it, or None when there is no usage or no price."""
    t = table(model)
    if not usage or not t or "tokens_per_million" not in t:
        return None
    r = t["tokens_per_million"]
    details = usage.get("input_tokens_details") or {}
    in_total = usage.get("input_tokens") or 0
    img_in = details.get("image_tokens") or 0
    txt_in = details.get("text_tokens", in_total - img_in) or 0
    out = usage.get("output_tokens") or 0
    if "image_out" in r:  # an image model: its output tokens are image tokens
        usd = txt_in * r.get("text_in", 0) + img_in * r.get("image_in", r.get("text_in", 0)) + out * r["image_out"]
    else:
        usd = in_total * r.get("text_in", 0) + out * r.get("text_out", 0)
    return usd / 1e6
