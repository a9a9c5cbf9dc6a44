"""Image safety classification: block, blur or pass flagged images, with a per-image report.

Classifiers come from ``models/safety/<name>/``: diffusers' StableDiffusionSafetyChecker layout
(``config.json`` naming it, weights, optional ``preprocessor_config.json``) or any transformers
image-classification model whose labels include an unsafe class (nsfw, unsafe, porn, hentai, sexy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
from PIL import ImageFilter

from kiln import engine
from kiln.engine import Combo, NodeError, Output, Socket
from kiln.nodes.common import check_image, pil_to_tensor, tensor_to_pil
from kiln.nodes.sd.manager import file_identity, folders, get_manager

UNSAFE_LABELS = {"nsfw", "unsafe", "porn", "hentai", "sexy", "explicit"}


def _choices() -> list[str]:
    f = folders()
    out = []
    for root in f.model_dirs("safety"):
        if root.is_dir():
            out += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
    return out


class _Classifier:
    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device):
        from transformers import CLIPImageProcessor

        cfg = json.loads((path / "config.json").read_text())
        self.kind = "sd" if "StableDiffusionSafetyChecker" in (cfg.get("architectures") or []) else "hf"
        if self.kind == "sd":
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            self.model = StableDiffusionSafetyChecker.from_pretrained(path, torch_dtype=dtype)
            size = cfg.get("vision_config", {}).get("image_size", 224)
        else:
            from transformers import AutoModelForImageClassification

            self.model = AutoModelForImageClassification.from_pretrained(path, torch_dtype=dtype)
            size = getattr(self.model.config, "image_size", 224)
        self.model = self.model.to(device).eval()
        if (path / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(path)
        else:
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def flags(self, images: torch.Tensor) -> list[dict]:
        pils = tensor_to_pil(images[..., :3])
        p = next(self.model.parameters())
        pixels = self.processor(images=pils, return_tensors="pt")["pixel_values"].to(p.device, p.dtype)
        with torch.inference_mode():
            if self.kind == "sd":
                arr = images[..., :3].float().cpu().numpy()
                _, nsfw = self.model(clip_input=pixels, images=arr.copy())
                return [{"flagged": bool(f), "score": None} for f in nsfw]
            probs = self.model(pixel_values=pixels).logits.float().softmax(-1).cpu()
        labels = {i: str(n).lower() for i, n in self.model.config.id2label.items()}
        unsafe = [i for i, n in labels.items() if n in UNSAFE_LABELS]
        out = []
        for row in probs:
            score = float(sum(row[i] for i in unsafe)) if unsafe else 0.0
            out.append({"flagged": score > 0.5, "score": round(score, 4)})
        return out


class ImageSafetyCheck(engine.Node):
    """Runs a safety classifier on each image; flagged images are blocked (black), blurred, or passed, and
    the report lists every image's verdict."""

    display_name = "Image Safety Check"
    category = "image/safety"
    outputs = [Output("IMAGE", "images"), Output("STRING", "report", tooltip="JSON: one entry per image")]

    def run(
        self,
        images: Annotated[Any, Socket("IMAGE")],
        model_name: Annotated[str, Combo(_choices)],
        action: Annotated[str, Combo(["block", "blur", "pass"])] = "block",
    ):
        images = check_image(images, "ImageSafetyCheck", "images")
        path = folders().find_model("safety", model_name)
        if path is None or not (path / "config.json").is_file():
            raise NodeError(
                f"safety model {model_name!r} not found",
                input_name="model_name",
                hint="put a classifier folder (config.json + weights) in models/safety/",
            )
        try:
            clf = get_manager().get("safety", path, _Classifier)
        except (OSError, ValueError) as exc:
            raise NodeError(
                f"cannot load safety model {model_name!r}: {exc}",
                input_name="model_name",
                hint="use a StableDiffusionSafetyChecker or image-classification model folder",
            ) from exc
        verdicts = clf.flags(images)
        out = images.clone()
        report = []
        for i, v in enumerate(verdicts):
            done = "none"
            if v["flagged"] and action == "block":
                out[i] = 0
                done = "blocked"
            elif v["flagged"] and action == "blur":
                pil = tensor_to_pil(images[i : i + 1, ..., :3])[0]
                radius = max(pil.size) / 8
                out[i, ..., :3] = pil_to_tensor(pil.filter(ImageFilter.GaussianBlur(radius)))[0]
                done = "blurred"
            elif v["flagged"]:
                done = "passed"
            report.append({"index": i, "flagged": v["flagged"], "score": v["score"], "action": done})
        return out, json.dumps(report)

    @classmethod
    def fingerprint(cls, model_name: str = "", **_: Any) -> str:
        p = folders().find_model("safety", model_name) if model_name else None
        return "|".join(map(str, file_identity(p))) if p is not None else f"missing:{model_name}"


NODES = [ImageSafetyCheck]
