"""ComfyUI's classic ("V1") node contract, read into a NodeSpec.

A classic node class has ``INPUT_TYPES()``, ``RETURN_TYPES``, ``FUNCTION`` and optionally
``RETURN_NAMES``, ``OUTPUT_IS_LIST``, ``INPUT_IS_LIST``, ``OUTPUT_NODE``, ``CATEGORY``, ``DESCRIPTION``,
``IS_CHANGED``, ``NOT_IDEMPOTENT``, ``VALIDATE_INPUTS``, ``check_lazy_status``. Packs export them in
``NODE_CLASS_MAPPINGS`` (and ``NODE_DISPLAY_NAME_MAPPINGS``).
"""

from __future__ import annotations

import inspect
from typing import Any

from .errors import NodeDefinitionError
from .node import NodeSpec
from .types import COMBO, HIDDEN_KINDS, InputSpec, OutputSpec


def is_classic(cls: Any) -> bool:
    return isinstance(cls, type) and hasattr(cls, "INPUT_TYPES") and hasattr(cls, "RETURN_TYPES")


def _input_from_entry(cls: Any, section: str, name: str, entry: Any) -> InputSpec:
    if isinstance(entry, str):
        entry = (entry,)
    if not isinstance(entry, (list, tuple)) or not entry:
        raise NodeDefinitionError(
            f"{cls.__name__}: input {name!r} must be (TYPE,) or (TYPE, {{options}}), got {entry!r}"
        )
    typ = entry[0]
    opts = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else {}
    spec = InputSpec(
        name=name,
        options=opts,
        optional=section == "optional",
        lazy=bool(opts.get("lazy")),
        raw_link=bool(opts.get("rawLink")),
    )
    if isinstance(typ, (list, tuple)):
        spec.type = COMBO
        spec.choices = list(typ)
        spec.v1_combo = True
    elif typ == COMBO:
        spec.type = COMBO
        spec.choices = list(opts.get("options", []))
        spec.v1_combo = False
    elif isinstance(typ, str):
        spec.type = str(typ)  # an "any type" str subclass (custom __ne__) becomes the plain name
    else:
        raise NodeDefinitionError(
            f"{cls.__name__}: input {name!r} has type {typ!r}; expected a string or a list of choices"
        )
    return spec


def _fresh_choices(cls: Any, section: str, name: str, fallback: list) -> Any:
    """Choices read from INPUT_TYPES() each time they are needed, as ComfyUI does at every validation:
    packs list files there (like LoadImage), and a file added after start-up must be accepted.
    Falls back to the list seen at registration if INPUT_TYPES() fails or no longer has the input."""

    def read() -> list:
        try:
            entry = (cls.INPUT_TYPES().get(section) or {}).get(name)
            if isinstance(entry, (list, tuple)) and entry:
                if isinstance(entry[0], (list, tuple)):
                    return list(entry[0])
                if entry[0] == COMBO and len(entry) > 1 and isinstance(entry[1], dict):
                    return list(entry[1].get("options", []))
        except Exception:
            pass
        return fallback

    return read


def spec_from_classic(
    name: str, cls: Any, display_name: str | None = None, python_module: str = "custom_nodes"
) -> NodeSpec:
    if not is_classic(cls):
        raise NodeDefinitionError(f"{name}: {cls!r} has no INPUT_TYPES/RETURN_TYPES")
    try:
        raw = cls.INPUT_TYPES()
    except Exception as exc:
        raise NodeDefinitionError(f"{name}: INPUT_TYPES() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, dict):
        raise NodeDefinitionError(f"{name}: INPUT_TYPES() must return a dict, got {type(raw).__name__}")
    inputs: dict[str, InputSpec] = {}
    hidden: dict[str, str] = {}
    for section in ("required", "optional"):
        for n, entry in (raw.get(section) or {}).items():
            inputs[n] = _input_from_entry(cls, section, n, entry)
            if inputs[n].type == COMBO:
                seen = inputs[n].choices
                inputs[n].choices = _fresh_choices(cls, section, n, [] if callable(seen) else list(seen or []))
    graph_hidden: dict[str, Any] = {}
    hidden_raw = raw.get("hidden") or {}
    if not isinstance(hidden_raw, dict):
        raise NodeDefinitionError(f"{name}: INPUT_TYPES()['hidden'] must be a dict, got {type(hidden_raw).__name__}")
    for n, kind in hidden_raw.items():
        k = kind[0] if isinstance(kind, (list, tuple)) and kind else kind
        if isinstance(k, str) and str(k) in HIDDEN_KINDS:
            hidden[n] = str(k)
        else:
            # ComfyUI fills only the kinds it knows; any other hidden input (INT, STRING, PROMPT_ID, "*",
            # an "any type" str subclass, a list or dict) takes what the graph gives it, link or nothing
            graph_hidden[n] = kind
    rtypes = list(cls.RETURN_TYPES or ())
    # ComfyUI never checks RETURN_NAMES against RETURN_TYPES: the outputs are RETURN_TYPES; a missing name
    # falls back to the type, an extra name is unused
    rnames = list(getattr(cls, "RETURN_NAMES", None) or ())
    rnames = [rnames[i] if i < len(rnames) else t for i, t in enumerate(rtypes)]
    is_list = list(getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(rtypes))
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    outputs = [
        OutputSpec(
            name=str(n if isinstance(n, str) else t if isinstance(t, str) else COMBO),
            type=str(t) if isinstance(t, str) else COMBO,
            is_list=bool(il),
            tooltip=(tips[i] if tips and i < len(tips) else None),
        )
        for i, (n, t, il) in enumerate(zip(rnames, rtypes, is_list + [False] * len(rtypes)))
    ]
    fn_name = getattr(cls, "FUNCTION", None)
    if not fn_name or not callable(getattr(cls, fn_name, None)):
        raise NodeDefinitionError(f"{name}: FUNCTION {fn_name!r} is not a method of the class")
    fn = getattr(cls, fn_name)
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    vparams = None
    wants_types = False
    if validate is not None:
        vsig = inspect.signature(validate)
        if not any(p.kind == p.VAR_KEYWORD for p in vsig.parameters.values()):
            vparams = frozenset(n for n in vsig.parameters if n not in ("self", "cls", "s", "input_types"))
        wants_types = "input_types" in vsig.parameters
    return NodeSpec(
        name=name,
        cls=cls,
        function=fn_name,
        inputs=inputs,
        hidden=hidden,
        outputs=outputs,
        display_name=display_name or name,
        category=getattr(cls, "CATEGORY", "sd"),
        description=getattr(cls, "DESCRIPTION", "") or "",
        python_module=python_module,
        output_node=bool(getattr(cls, "OUTPUT_NODE", False)),
        cacheable=True,
        not_idempotent=bool(getattr(cls, "NOT_IDEMPOTENT", False)) or "UNIQUE_ID" in hidden.values(),
        version=str(getattr(cls, "VERSION", "1")),
        input_is_list=bool(getattr(cls, "INPUT_IS_LIST", False)),
        is_async=inspect.iscoroutinefunction(fn),
        kind="classic",
        deprecated=bool(getattr(cls, "DEPRECATED", False)),
        experimental=bool(getattr(cls, "EXPERIMENTAL", False)),
        api_node=getattr(cls, "API_NODE", None),
        fingerprint=getattr(cls, "IS_CHANGED", None),
        validate=validate,
        validate_params=vparams,
        validate_wants_types=wants_types,
        has_lazy_check=callable(getattr(cls, "check_lazy_status", None)),
        raw_input_types=raw,
        input_types_fn=cls.INPUT_TYPES,
        output_tooltips=list(tips) if tips else None,
        extra=_extra(rtypes, graph_hidden),
    )


def _extra(rtypes: list, graph_hidden: dict[str, Any]) -> dict:
    extra: dict[str, Any] = {}
    if any(not isinstance(t, str) for t in rtypes):
        # object_info's "output" is RETURN_TYPES as declared: a combo output stays its list of choices
        extra["raw_return_types"] = [t if isinstance(t, str) else list(t) for t in rtypes]
    if graph_hidden:
        extra["graph_hidden"] = graph_hidden  # hidden inputs the graph fills (see spec_from_classic)
    return extra
