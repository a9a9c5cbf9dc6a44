"""LoRA files to weight deltas, for kohya/A1111 and diffusers/PEFT key formats.

Every module that holds a weight gets several candidate names: kohya's ``lora_unet_<diffusers path with
underscores>`` and ``lora_unet_<LDM path with underscores>``, ``lora_te_``/``lora_te1_``/``lora_te2_``
for text encoders, and the dotted diffusers/PEFT names (``unet.<path>``, ``text_encoder.<path>``, old
``...processor.to_q_lora.down``). A key that matches none is reported, so a LoRA for another architecture
is an error that says which keys did not fit, instead of a silent no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kiln.engine import NodeError

from . import ldm_keys

_SUFFIXES = (
    ("lora_down.weight", "down"),
    ("lora_up.weight", "up"),
    ("lora_A.weight", "down"),
    ("lora_B.weight", "up"),
    ("lora.down.weight", "down"),
    ("lora.up.weight", "up"),
    ("down.weight", "down"),
    ("up.weight", "up"),
    ("alpha", "alpha"),
)


class LoraError(NodeError, ValueError):
    """A LoRA file does not fit the model; it names the LoRA loaders' ``lora_name`` input by default."""

    def __init__(self, message: str, hint: str | None = None, *, input_name: str | None = "lora_name"):
        super().__init__(message, input_name=input_name, hint=hint)


@dataclass
class ParsedLora:
    unet: dict = field(default_factory=dict)  # param name -> (up, down, scale)
    clip: dict = field(default_factory=dict)  # "<encoder index>.<param name>" -> (up, down, scale)
    unmatched: list = field(default_factory=list)


def _split(key: str) -> tuple[str, str] | None:
    k = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
    m = re.match(r"(.*)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", k)
    if m:
        mod = m[2] + (".0" if m[2] == "to_out" else "")
        return f"{m[1]}.{mod}", m[3]
    for suffix, part in _SUFFIXES:
        if k.endswith("." + suffix):
            return k[: -len(suffix) - 1], part
    return None


def _module_names(model: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if n
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]


def _unet_aliases(unet: torch.nn.Module) -> dict[str, str]:
    layout = ldm_keys.UnetLayout(dict(unet.config))
    out = {}
    for name in _module_names(unet):
        for alias in (f"lora_unet_{name.replace('.', '_')}", f"unet.{name}", name):
            out[alias] = name
        try:
            ldm = ldm_keys.unet_key_to_ldm(name + ".weight", layout)[: -len(".weight")]
            out[f"lora_unet_{ldm.replace('.', '_')}"] = name
        except KeyError:
            pass
    return out


def _clip_aliases(encoders: list, family: str) -> dict[str, str]:
    out = {}
    for i, te in enumerate(encoders):
        kohya = ["lora_te_", f"lora_te{i + 1}_"] if i == 0 else [f"lora_te{i + 1}_"]
        dotted = ["text_encoder.", "lora_te."] if i == 0 else [f"text_encoder_{i + 1}."]
        for name in _module_names(te):
            # LoRA files use transformers-4 names (text_model.encoder...); transformers 5 drops the prefix
            for alias in {name, name if name.startswith("text_model.") else "text_model." + name}:
                for p in kohya:
                    out[p + alias.replace(".", "_")] = f"{i}.{name}"
                for p in dotted:
                    out[p + alias] = f"{i}.{name}"
    return out


def parse_lora(sd: dict[str, torch.Tensor], unet: torch.nn.Module | None, encoders: list, family: str) -> ParsedLora:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    result = ParsedLora()
    for key, t in sd.items():
        s = _split(key)
        if s is None:
            result.unmatched.append(key)
            continue
        groups.setdefault(s[0], {})[s[1]] = t
    unet_alias = _unet_aliases(unet) if unet is not None else {}
    clip_alias = _clip_aliases(encoders, family)
    unet_mods = dict(unet.named_modules()) if unet is not None else {}
    for base, parts in groups.items():
        if "up" not in parts or "down" not in parts:
            result.unmatched.append(base)
            continue
        up, down = parts["up"].float(), parts["down"].float()
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        if base in unet_alias:
            target, mod = unet_alias[base], unet_mods[unet_alias[base]]
            _check(base, mod.weight, up, down)
            result.unet[target + ".weight"] = (up, down, scale)
        elif base in clip_alias:
            idx, name = clip_alias[base].split(".", 1)
            mod = dict(encoders[int(idx)].named_modules())[name]
            _check(base, mod.weight, up, down)
            result.clip[f"{idx}.{name}.weight"] = (up, down, scale)
        elif (unet is None and base.startswith(("lora_unet", "unet."))) or (
            not encoders and base.startswith(("lora_te", "text_encoder"))
        ):
            continue  # a UNet key when only the CLIP is being patched, or the reverse
        else:
            result.unmatched.append(base)
    return result


def _check(base: str, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    if up.shape[0] != weight.shape[0] or down.flatten(1).shape[1] != weight[0].numel():
        raise LoraError(
            f"LoRA module {base} has shape {tuple(up.shape[:1]) + tuple(down.shape[1:])}, the model's "
            f"weight is {tuple(weight.shape)}",
            hint="this LoRA was trained for another model architecture; pick one made for this checkpoint",
        )
