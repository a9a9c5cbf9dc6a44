"""Socket types and input declarations.

A native node declares each input once, in the signature of its ``run`` method::

    def run(self,
            image: Annotated[Tensor, Socket("IMAGE")],
            amount: Annotated[float, Float(min=0, max=1, step=0.01)] = 0.5,
            mode: Annotated[str, Combo(["add", "multiply"])] = "add"):

The Python default is the widget default. Types and names follow ComfyUI's conventions so its graphs,
clients and node packs fit unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Socket type names shared with ComfyUI.
MODEL, CLIP, VAE, CONDITIONING, LATENT = "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT"
IMAGE, MASK, CONTROL_NET = "IMAGE", "MASK", "CONTROL_NET"
INT, FLOAT, STRING, BOOLEAN, COMBO, ANY = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "*"

WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})
MAX_RESOLUTION = 16384
SEED_MAX = 0xFFFFFFFFFFFFFFFF

# Hidden inputs: filled by the engine, never by the graph.
HIDDEN_KINDS = frozenset(
    {"PROMPT", "DYNPROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG"}
)

_MISSING: Any = object()


@dataclass
class InputSpec:
    """One declared input, whichever way the node was written.

    ``type`` is a socket type name ("IMAGE", "INT", "INT,FLOAT", "*") or "COMBO" with ``choices``.
    ``options`` holds the ComfyUI widget options (default, min, max, step, tooltip, ...), exactly as they
    appear in ``/object_info``.
    """

    name: str = ""
    type: str = ANY
    options: dict = field(default_factory=dict)
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    optional: bool = False
    lazy: bool = False
    raw_link: bool = False
    # classic V1 combos are declared as a bare list; keep the shape for object_info
    v1_combo: bool = True

    @property
    def default(self) -> Any:
        return self.options.get("default", _MISSING)

    @property
    def has_default(self) -> bool:
        return "default" in self.options

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")

    def resolve_choices(self) -> list | None:
        if self.choices is None:
            return None
        c = self.choices() if callable(self.choices) else self.choices
        return list(c)

    def comfy_entry(self) -> list:
        """The ``[TYPE, {options}]`` pair ComfyUI's /object_info uses for this input."""
        opts = dict(self.options)
        if self.lazy:
            opts["lazy"] = True
        if self.raw_link:
            opts["rawLink"] = True
        if self.type == COMBO:
            choices = self.resolve_choices() or []
            if self.v1_combo:
                return [choices, opts] if opts else [choices]
            opts = {"options": choices, **opts}
            return ["COMBO", opts]
        return [self.type, opts] if opts else [self.type]

    def config(self) -> list:
        """``input_config`` as ComfyUI reports it in validation errors."""
        if self.type == COMBO:
            return [self.resolve_choices() or [], dict(self.options)]
        return [self.type, dict(self.options)]


def _opts(**kw: Any) -> dict:
    return {k: v for k, v in kw.items() if v is not None and v is not False}


def Socket(
    type: str, *, optional: bool = False, lazy: bool = False, tooltip: str | None = None, raw_link: bool = False
) -> InputSpec:
    """A link-only input of the given socket type ("IMAGE", "LATENT", "*", ...).

    For a widget type (INT, FLOAT, STRING, BOOLEAN) this sets ``forceInput``, as ComfyUI does, so the input
    is a socket: validation asks for a link when it is missing and /object_info shows no widget.
    """
    forced = type in WIDGET_TYPES and type != COMBO
    return InputSpec(
        type=type,
        options=_opts(tooltip=tooltip, forceInput=forced or None),
        optional=optional,
        lazy=lazy,
        raw_link=raw_link,
    )


def Int(
    *,
    min: int | None = None,
    max: int | None = None,
    step: int | None = None,
    tooltip: str | None = None,
    optional: bool = False,
    lazy: bool = False,
    control_after_generate: bool = False,
    display: str | None = None,
    force_input: bool = False,
    extra: dict | None = None,
) -> InputSpec:
    return InputSpec(
        type=INT,
        options=_opts(
            min=min,
            max=max,
            step=step,
            tooltip=tooltip,
            control_after_generate=control_after_generate,
            display=display,
            forceInput=force_input,
        )
        | dict(extra or {}),
        optional=optional,
        lazy=lazy,
    )


def Float(
    *,
    min: float | None = None,
    max: float | None = None,
    step: float | None = None,
    round: float | None = None,
    tooltip: str | None = None,
    optional: bool = False,
    lazy: bool = False,
    display: str | None = None,
    force_input: bool = False,
    extra: dict | None = None,
) -> InputSpec:
    return InputSpec(
        type=FLOAT,
        options=_opts(
            min=min, max=max, step=step, round=round, tooltip=tooltip, display=display, forceInput=force_input
        )
        | dict(extra or {}),
        optional=optional,
        lazy=lazy,
    )


def String(
    *,
    multiline: bool = False,
    placeholder: str | None = None,
    dynamic_prompts: bool | None = None,
    tooltip: str | None = None,
    optional: bool = False,
    lazy: bool = False,
    force_input: bool = False,
    extra: dict | None = None,
) -> InputSpec:
    opts = _opts(multiline=multiline, placeholder=placeholder, tooltip=tooltip, forceInput=force_input)
    if dynamic_prompts is not None:
        opts["dynamicPrompts"] = dynamic_prompts
    opts.update(extra or {})
    return InputSpec(type=STRING, options=opts, optional=optional, lazy=lazy)


def Boolean(
    *,
    label_on: str | None = None,
    label_off: str | None = None,
    tooltip: str | None = None,
    optional: bool = False,
    lazy: bool = False,
    force_input: bool = False,
    extra: dict | None = None,
) -> InputSpec:
    return InputSpec(
        type=BOOLEAN,
        options=_opts(label_on=label_on, label_off=label_off, tooltip=tooltip, forceInput=force_input)
        | dict(extra or {}),
        optional=optional,
        lazy=lazy,
    )


def Combo(
    choices: Sequence[Any] | Callable[[], Sequence[Any]],
    *,
    tooltip: str | None = None,
    optional: bool = False,
    lazy: bool = False,
    image_upload: bool = False,
    v3: bool = False,
    extra: dict | None = None,
) -> InputSpec:
    """A choice among values; ``choices`` may be a callable, read afresh at validation (e.g. files).

    ``v3=True`` declares it the way ComfyUI's newer nodes do in ``/object_info``:
    ``["COMBO", {"multiselect": false, "options": [...]}]`` instead of a bare list.
    """
    opts = _opts(tooltip=tooltip, image_upload=image_upload)
    if v3:
        opts["multiselect"] = False
    opts.update(extra or {})
    return InputSpec(type=COMBO, choices=choices, options=opts, optional=optional, lazy=lazy, v1_combo=not v3)


@dataclass(frozen=True)
class Hidden:
    """A value the engine fills in: ``Hidden("PROMPT")``, ``Hidden("UNIQUE_ID")``, ..."""

    kind: str


@dataclass
class OutputSpec:
    name: str
    type: str
    is_list: bool = False
    tooltip: str | None = None


def Output(type: str, name: str | None = None, *, is_list: bool = False, tooltip: str | None = None) -> OutputSpec:
    return OutputSpec(name=name or type, type=type, is_list=is_list, tooltip=tooltip)


def types_compatible(received: Any, expected: Any) -> bool:
    """ComfyUI's link type check: ``*`` matches anything; comma-separated sets must intersect."""
    if isinstance(received, (list, tuple)) or isinstance(expected, (list, tuple)):
        if isinstance(received, (list, tuple)) and expected == COMBO:
            return True
        if received == ANY or expected == ANY:
            return True
        return (
            list(received) == list(expected)
            if isinstance(received, (list, tuple)) and isinstance(expected, (list, tuple))
            else False
        )
    if received == ANY or expected == ANY or "MATCHTYPE" in (received, expected):
        return True
    if received == expected:
        return True
    return bool(set(str(received).split(",")) & set(str(expected).split(",")))


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))
