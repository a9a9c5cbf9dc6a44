"""``comfy_api.latest.io``: V3 schemas (typed inputs and outputs) and ``ComfyNode``.

A ``ComfyNode`` subclass declares ``define_schema()`` and a classmethod ``execute(**inputs)`` returning
:class:`NodeOutput`. Its metaclass answers the classic attributes (``INPUT_TYPES``, ``RETURN_TYPES``,
``RETURN_NAMES``, ``OUTPUT_IS_LIST``, ``FUNCTION``, ``CATEGORY``, ...) from the schema, so Kiln's engine
registers and runs it as a classic node and ``/object_info`` shows the V1 shape.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

# -- inputs and outputs -------------------------------------------------------------------------------------


class Hidden(str, enum.Enum):
    """Hidden values a V3 node reads from ``cls.hidden``."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    def __init__(self, values: dict[str, Any]):
        for h in Hidden:
            setattr(self, h.name, values.get(h.name))


_OPTION_KEYS = {
    "tooltip": "tooltip",
    "lazy": "lazy",
    "default": "default",
    "min": "min",
    "max": "max",
    "step": "step",
    "round": "round",
    "multiline": "multiline",
    "placeholder": "placeholder",
    "dynamic_prompts": "dynamicPrompts",
    "label_on": "label_on",
    "label_off": "label_off",
    "force_input": "forceInput",
    "control_after_generate": "control_after_generate",
    "display_mode": "display",
    "advanced": "advanced",
    "image_upload": "image_upload",
    "socketless": "socketless",
    "raw_link": "rawLink",
}


class Input:
    """One declared input: ``io.Int.Input("steps", default=20, min=1)``."""

    def __init__(self, id: str, io_type: str, display_name: str | None = None, optional: bool = False, **opts: Any):
        self.id = id
        self.io_type = io_type
        self.display_name = display_name
        self.optional = optional
        self.opts = opts

    def entry(self) -> tuple:
        d: dict[str, Any] = {}
        if self.display_name:
            d["display_name"] = self.display_name
        for k, v in self.opts.items():
            if v is None:
                continue
            if k == "options":
                d["options"] = [m.value for m in v] if isinstance(v, type) and issubclass(v, enum.Enum) else list(v)
            elif k == "display_mode" and isinstance(v, enum.Enum):
                d["display"] = v.value
            else:
                d[_OPTION_KEYS.get(k, k)] = v
        return (self.io_type, d)


class Output:
    def __init__(
        self,
        io_type: str,
        id: str | None = None,
        display_name: str | None = None,
        tooltip: str | None = None,
        is_output_list: bool = False,
    ):
        self.io_type = io_type
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


class _IOType:
    """A socket or widget type: ``Input``/``Output`` factories carrying its type name."""

    io_type: ClassVar[str] = "*"

    @classmethod
    def Input(cls, id: str, display_name: str | None = None, optional: bool = False, **opts: Any) -> Input:  # noqa: N802
        return Input(id, cls.io_type, display_name, optional, **opts)

    @classmethod
    def Output(
        cls,
        id: str | None = None,
        display_name: str | None = None,
        tooltip: str | None = None,
        is_output_list: bool = False,
    ) -> Output:  # noqa: N802
        return Output(cls.io_type, id, display_name, tooltip, is_output_list)


def _type(name: str) -> type[_IOType]:
    return type(name.title().replace("_", ""), (_IOType,), {"io_type": name})


Int = _type("INT")
Float = _type("FLOAT")
String = _type("STRING")
Boolean = _type("BOOLEAN")
Image = _type("IMAGE")
Mask = _type("MASK")
Latent = _type("LATENT")
Conditioning = _type("CONDITIONING")
Model = _type("MODEL")
Clip = _type("CLIP")
Vae = _type("VAE")
ClipVision = _type("CLIP_VISION")
ClipVisionOutput = _type("CLIP_VISION_OUTPUT")
ControlNet = _type("CONTROL_NET")
Sigmas = _type("SIGMAS")
Noise = _type("NOISE")
Sampler = _type("SAMPLER")
Guider = _type("GUIDER")
UpscaleModel = _type("UPSCALE_MODEL")
StyleModel = _type("STYLE_MODEL")
Audio = _type("AUDIO")
Video = _type("VIDEO")
AnyType = _type("*")


class Combo(_IOType):
    io_type = "COMBO"

    @classmethod
    def Input(  # type: ignore[override]  # noqa: N802 - ComfyUI's signature: options come second
        cls, id: str, options: Any = None, display_name: str | None = None, optional: bool = False, **opts: Any
    ) -> Input:
        return Input(id, "COMBO", display_name, optional, options=options or [], **opts)


def Custom(io_type: str) -> type[_IOType]:  # noqa: N802 - ComfyUI's name
    """A pack's own socket type: ``io.Custom("MY_THING").Input("thing")``."""
    return type(io_type, (_IOType,), {"io_type": io_type})


class NumberDisplay(str, enum.Enum):
    number = "number"
    slider = "slider"


# -- schema and node ---------------------------------------------------------------------------------------


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    is_input_list: bool = False
    not_idempotent: bool = False
    search_aliases: list[str] = field(default_factory=list)


class NodeOutput:
    """What ``execute`` returns: the output values, and optionally ``ui`` (a dict or ``ui.*`` object)."""

    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: str | None = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self) -> tuple | None:
        return self.args or None


_HIDDEN_PREFIX = "__v3_hidden_"


def _schema_of(cls: Any) -> Schema:
    return cls.GET_SCHEMA()


def _schema_fn(cls: Any) -> Any:
    return cls.execute


class _ComfyNodeMeta(type):
    """Classic attributes of a V3 class, read from its schema."""

    @property
    def RETURN_TYPES(cls) -> tuple:  # noqa: N802
        return tuple(o.io_type for o in _schema_of(cls).outputs)

    @property
    def RETURN_NAMES(cls) -> tuple:  # noqa: N802
        return tuple(o.display_name or o.id or o.io_type for o in _schema_of(cls).outputs)

    @property
    def OUTPUT_IS_LIST(cls) -> tuple:  # noqa: N802
        return tuple(o.is_output_list for o in _schema_of(cls).outputs)

    @property
    def OUTPUT_TOOLTIPS(cls) -> list | None:  # noqa: N802
        tips = [o.tooltip for o in _schema_of(cls).outputs]
        return tips if any(tips) else None

    @property
    def CATEGORY(cls) -> str:  # noqa: N802
        return _schema_of(cls).category

    @property
    def DESCRIPTION(cls) -> str:  # noqa: N802
        return _schema_of(cls).description

    @property
    def OUTPUT_NODE(cls) -> bool:  # noqa: N802
        return _schema_of(cls).is_output_node

    @property
    def INPUT_IS_LIST(cls) -> bool:  # noqa: N802
        return _schema_of(cls).is_input_list

    @property
    def NOT_IDEMPOTENT(cls) -> bool:  # noqa: N802
        return _schema_of(cls).not_idempotent

    @property
    def DEPRECATED(cls) -> bool:  # noqa: N802
        return _schema_of(cls).is_deprecated

    @property
    def EXPERIMENTAL(cls) -> bool:  # noqa: N802
        return _schema_of(cls).is_experimental

    @property
    def FUNCTION(cls) -> str:  # noqa: N802
        return "_kiln_execute_async" if inspect.iscoroutinefunction(_schema_fn(cls)) else "_kiln_execute"


class ComfyNode(metaclass=_ComfyNodeMeta):
    """Base class of V3 nodes."""

    hidden: HiddenHolder | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} must define define_schema()")

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} must define execute()")

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - ComfyUI's name
        cached = cls.__dict__.get("_kiln_schema")
        if cached is None:
            cached = cls.define_schema()
            cls._kiln_schema = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - the classic contract
        schema = cls.GET_SCHEMA()
        out: dict[str, dict] = {"required": {}}
        for i in schema.inputs:
            out.setdefault("optional" if i.optional else "required", {})[i.id] = i.entry()
        if schema.hidden:
            out["hidden"] = {f"{_HIDDEN_PREFIX}{h.name}": h.value for h in schema.hidden}
        return out

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        v = cls.__dict__.get("validate_inputs")
        if v is not None:
            cls.VALIDATE_INPUTS = v  # type: ignore[attr-defined]
        f = cls.__dict__.get("fingerprint_inputs")
        if f is not None:
            cls.IS_CHANGED = f  # type: ignore[attr-defined]

    @classmethod
    def _kiln_call(cls, kwargs: dict) -> tuple[Any, dict]:
        hidden = {k[len(_HIDDEN_PREFIX) :]: kwargs.pop(k) for k in list(kwargs) if k.startswith(_HIDDEN_PREFIX)}
        # a per-call subclass carries this call's hidden values, so concurrent calls never share them
        bound = type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden), "_kiln_schema": cls.GET_SCHEMA()})
        return bound, kwargs

    @classmethod
    def _kiln_result(cls, r: Any) -> Any:
        if not isinstance(r, NodeOutput):
            return r
        if r.block_execution is not None:
            from kiln.engine import ExecutionBlocker

            return (ExecutionBlocker(r.block_execution),) * len(cls.GET_SCHEMA().outputs)
        ui = r.ui.as_dict() if hasattr(r.ui, "as_dict") else r.ui
        if ui is None and r.expand is None:
            return tuple(r.args)
        out: dict[str, Any] = {"result": tuple(r.args)}
        if ui is not None:
            out["ui"] = ui
        if r.expand is not None:
            out["expand"] = r.expand
        return out

    def _kiln_execute(self, **kwargs: Any) -> Any:
        bound, kw = type(self)._kiln_call(kwargs)
        return type(self)._kiln_result(bound.execute(**kw))

    async def _kiln_execute_async(self, **kwargs: Any) -> Any:
        bound, kw = type(self)._kiln_call(kwargs)
        return type(self)._kiln_result(await bound.execute(**kw))


__all__ = [
    "ComfyNode",
    "Schema",
    "NodeOutput",
    "Hidden",
    "Input",
    "Output",
    "Int",
    "Float",
    "String",
    "Boolean",
    "Combo",
    "Image",
    "Mask",
    "Latent",
    "Conditioning",
    "Model",
    "Clip",
    "Vae",
    "AnyType",
    "Custom",
    "NumberDisplay",
]
