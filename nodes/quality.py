"""Checks that fail a run early and say why: output validation and prompt screening.

- ``ValidateImage`` passes an IMAGE batch through, or fails on a blank, single-colour, corrupt (NaN or
  out of range) or too small image, naming the image and what was wrong. The same check
  (``nodes.providers.checks``) backs the ``validate`` option of SaveImage and SaveImageS3.
- ``PromptScreen`` passes a prompt through, or fails on a blocked term or an over-long prompt before a
  paid call is made. Terms come from the node and from ``prompt_screen.block`` in Kiln's config; a term
  written ``/like this/`` is a regular expression, any other term matches whole words, ignoring case.
"""

from __future__ import annotations

import re
from typing import Annotated

import torch

from kiln import engine
from kiln.engine import Boolean, Float, Int, NodeError, Socket, String
from kiln.nodes.providers import config
from kiln.nodes.providers.checks import check_images

DEFAULT_MAX_PROMPT = 4000


class ValidateImage(engine.Node):
    """Fail the run on blank, single-colour, corrupt or tiny images; pass good ones through."""

    display_name = "Validate Image"
    category = "image/quality"
    outputs = [engine.Output("IMAGE", "images")]

    def run(
        self,
        images: Annotated[torch.Tensor, Socket("IMAGE")],
        min_std: Annotated[
            float, Float(min=0.0, max=1.0, step=0.001, tooltip="smallest pixel spread that counts as content")
        ] = 0.004,
        min_size: Annotated[int, Int(min=1, max=16384, tooltip="smallest width and height")] = 1,
    ) -> torch.Tensor:
        return check_images(images, "ValidateImage", "images", min_std, min_size)


def _terms(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[\n,]", text or "") if t.strip()]


def _pattern(term: str) -> re.Pattern:
    if len(term) > 2 and term.startswith("/") and term.endswith("/"):
        try:
            return re.compile(term[1:-1], re.IGNORECASE)
        except re.error as exc:
            raise NodeError(
                f"block-list entry {term!r} is not a valid regular expression: {exc}",
                input_name="block_list",
                hint="fix the expression or drop the slashes",
            ) from exc
    return re.compile(r"(?<!\w)" + re.escape(term) + r"(?!\w)", re.IGNORECASE)


def screen(text: str, terms: list[str], max_length: int) -> None:
    if len(text) > max_length:
        raise NodeError(
            f"the prompt is {len(text)} characters, over the limit of {max_length}",
            input_name="text",
            hint="shorten the prompt or raise max_length",
        )
    for term in terms:
        m = _pattern(term).search(text)
        if m:
            raise NodeError(
                f"the prompt contains the blocked term {m.group(0)!r} (entry {term!r}) at character {m.start()}",
                input_name="text",
                hint="rephrase the prompt, or edit the block list if the term is acceptable here",
            )


class PromptScreen(engine.Node):
    """Stop before a paid call when the prompt has a blocked term or is too long; passes the prompt through."""

    display_name = "Prompt Screen"
    category = "text/quality"
    outputs = [engine.Output("STRING", "text")]

    def run(
        self,
        text: Annotated[str, String(multiline=True)],
        block_list: Annotated[
            str, String(multiline=True, tooltip="terms separated by commas or new lines; /regex/ for patterns")
        ] = "",
        max_length: Annotated[int, Int(min=0, max=1_000_000, tooltip="0: the config's limit (default 4000)")] = 0,
        use_config_list: Annotated[bool, Boolean(tooltip="also apply prompt_screen.block from the config")] = True,
    ) -> str:
        cfg = config.section("prompt_screen")
        terms = _terms(block_list)
        if use_config_list:
            extra = cfg.get("block") or []
            terms += _terms(extra) if isinstance(extra, str) else [str(t) for t in extra]
        limit = max_length or int(cfg.get("max_length", DEFAULT_MAX_PROMPT))
        screen(text or "", terms, limit)
        return text


NODES = [ValidateImage, PromptScreen]
