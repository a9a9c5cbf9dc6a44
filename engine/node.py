"""The node contract: how a node class declares itself, and the one internal description (NodeSpec)
that validation, execution, caching, ``/object_info`` and the Python authoring API all read.

Native nodes subclass :class:`Node`; ComfyUI's classic classes go through :mod:`engine.classic`.
Both produce a :class:`NodeSpec`.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import NodeDefinitionError
from .types import (
    _MISSING,
    ANY,
    BOOLEAN,
    FLOAT,
    HIDDEN_KINDS,
    INT,
    STRING,
    Boolean,
    Float,
    Hidden,
    InputSpec,
    Int,
    OutputSpec,
    String,
)


class ExecutionBlocker:
    """Returned as an output value, it blocks every consumer call that receives it.

    With a message, each blocked consumer reports a non-fatal error; with ``None`` the block is silent.
    """

    __slots__ = ("message",)

    def __init__(self, message: str | None = None):
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


class NodeResult:
    """What a native node returns when it has more to say than its output values.

    ``NodeResult(latent, ui={"images": [...]})``, ``NodeResult(expand=subgraph, result=(link, ...))``.
    """

    __slots__ = ("values", "ui", "expand")

    def __init__(self, *values: Any, ui: dict | None = None, expand: dict | None = None, result: tuple | None = None):
        self.values = tuple(result) if result is not None else values
        self.ui = ui
        self.expand = expand


@dataclass(frozen=True)
class TensorEstimate:
    """What validation expects a tensor output to be, worked out from the graph before anything runs.

    ``shape`` is the tensor's shape as the node will return it: IMAGE ``[B, H, W, C]``, MASK ``[B, H, W]``,
    a LATENT's ``samples`` ``[B, C, H, W]``. ``itemsize`` is bytes per element (4: float32).
    See :class:`Node` (``estimate_outputs``, ``estimate_memory``) for how nodes declare and receive them.
    """

    shape: tuple[int, ...]
    itemsize: int = 4

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def with_shape(self, *shape: int) -> TensorEstimate:
        return TensorEstimate(tuple(int(d) for d in shape), self.itemsize)


@dataclass
class NodeSpec:
    """Everything the engine knows about a node class."""

    name: str
    cls: type
    function: str
    inputs: dict[str, InputSpec]
    hidden: dict[str, str]
    outputs: list[OutputSpec]
    display_name: str
    category: str = "sd"
    description: str = ""
    python_module: str = "nodes"
    output_node: bool = False
    cacheable: bool = True
    not_idempotent: bool = False
    version: str = "1"
    input_is_list: bool = False
    is_async: bool = False
    kind: str = "native"  # or "classic"
    deprecated: bool = False
    experimental: bool = False
    api_node: bool | None = None
    fingerprint: Callable[..., Any] | None = None
    validate: Callable[..., Any] | None = None
    validate_params: frozenset[str] | None = None  # None: takes **kwargs (all inputs)
    validate_wants_types: bool = False
    # checks of the world outside the graph (a key configured, a bucket reachable, an extra installed), run
    # at validation so a run that cannot finish is refused before any paid or slow work starts
    preflight: Callable[..., Any] | None = None
    # memory budget hooks (see Node): the shapes of the outputs and the bytes the node allocates, worked
    # out from its inputs at validation so a prompt too large for the machine is refused before it runs
    estimate_outputs: Callable[..., Any] | None = None
    estimate_memory: Callable[..., Any] | None = None
    has_lazy_check: bool = False
    raw_input_types: dict | None = None  # classic: INPUT_TYPES() as declared, for object_info
    input_types_fn: Callable[[], dict] | None = None  # classic: re-read for object_info (file lists change)
    output_tooltips: list | None = None
    extra: dict = field(default_factory=dict)

    @property
    def output_types(self) -> list[str]:
        return [o.type for o in self.outputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def required_inputs(self) -> list[str]:
        return [n for n, s in self.inputs.items() if not s.optional]

    def object_info(self) -> dict:
        """The ``/object_info/{class}`` entry, in ComfyUI's exact shape."""
        if self.raw_input_types is not None:
            input_types = self.raw_input_types
            if self.input_types_fn is not None:
                try:
                    fresh = self.input_types_fn()
                    if isinstance(fresh, dict):
                        input_types = fresh
                except Exception:
                    pass
        else:
            input_types = {"required": {}}
            for n, s in self.inputs.items():
                input_types.setdefault("optional" if s.optional else "required", {})[n] = s.comfy_entry()
            if self.hidden:
                input_types["hidden"] = dict(self.hidden)
        order = {cat: list(v.keys()) for cat, v in input_types.items() if isinstance(v, dict)}
        info: dict[str, Any] = {
            "input": input_types,
            "input_order": order,
            "output": self.extra.get("raw_return_types", self.output_types),
            "output_is_list": [o.is_list for o in self.outputs],
            "output_name": self.output_names,
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.output_tooltips is not None:
            info["output_tooltips"] = self.output_tooltips
        if self.deprecated:
            info["deprecated"] = True
        if self.experimental:
            info["experimental"] = True
        if self.api_node is not None:
            info["api_node"] = self.api_node
        return info


class Node:
    """Base class of native nodes. Subclasses define ``run`` with a typed signature and set metadata.

    Class attributes (all optional except ``outputs`` when the node returns values):

    - ``outputs``: a tuple of type names, a ``{name: type}`` dict, or a list of :func:`engine.Output`
    - ``name`` (default: the class name), ``display_name``, ``category``, ``description`` (default: the
      docstring), ``output_node``, ``cacheable``, ``not_idempotent``, ``version``, ``input_is_list``
    - classmethods ``fingerprint(**inputs)`` (like ComfyUI's IS_CHANGED) and ``validate(**inputs)``
      (return True, a message, or ``{input name: message}`` naming only the wrong inputs), method
      ``check_lazy_status(**inputs)`` (names of lazy inputs needed).
    - classmethod ``preflight(**inputs)``: checks of the world outside the graph (credentials configured, a
      bucket reachable, an optional package installed), called at validation with the node's literal inputs
      (a linked input is None) once its inputs are valid; returns True or a message like ``validate``.
      A node that pays for a call or writes somewhere remote declares one, so nothing is paid for a run
      that would fail later.
    - classmethods ``estimate_outputs(**inputs)`` and ``estimate_memory(**inputs)``: the memory budget.
      Validation given a ``memory_limit`` visits the nodes sources first. It calls each hook with the node's
      inputs: a literal as its (coerced) value, a link as the :class:`TensorEstimate` of that upstream
      output when the upstream node estimated it, else None; unconnected optional inputs are left out, so
      declare defaults and ``**_`` for inputs you do not read. ``estimate_outputs`` returns one
      TensorEstimate (or None: unknown) per output slot, in order, or None; what it returns is what the
      nodes downstream receive. ``estimate_memory`` returns the bytes the node allocates while it runs
      (its outputs and temporaries, not its inputs), or None when it cannot tell; a node that declares
      only ``estimate_outputs`` is taken to allocate its outputs. The node's peak is that plus the sizes of
      its linked inputs (held while it runs), and a peak over the limit refuses the prompt, naming the
      node. This is a lower bound: what a model holds, or a cache keeps of other nodes, comes on top. An
      estimator that raises counts as "unknown", never as a refusal.
    """

    name: str | None = None
    display_name: str | None = None
    category: str = "kiln"
    description: str | None = None
    outputs: Any = ()
    output_node: bool = False
    cacheable: bool = True
    not_idempotent: bool = False
    version: str = "1"
    input_is_list: bool = False
    deprecated: bool = False
    experimental: bool = False
    api_node: bool | None = None
    python_module: str | None = None

    def run(self, **inputs: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


_PLAIN_WIDGETS: dict[Any, Callable[[], InputSpec]] = {int: Int, float: Float, str: String, bool: Boolean}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .+\-]*$")


def _fail(cls: type, msg: str) -> NodeDefinitionError:
    return NodeDefinitionError(f"Node class {cls.__module__}.{cls.__qualname__}: {msg}")


def _normalise_outputs(cls: type, outputs: Any) -> list[OutputSpec]:
    if outputs is None:
        return []
    if isinstance(outputs, str):
        outputs = (outputs,)
    if isinstance(outputs, dict):
        items = [OutputSpec(name=str(k), type=v) if isinstance(v, str) else v for k, v in outputs.items()]
        for (k, _), o in zip(outputs.items(), items):
            if not isinstance(o, OutputSpec):
                raise _fail(cls, f"output {k!r} must be a type name string or Output(...), got {o!r}")
            o.name = str(k)
        return items
    result = []
    for i, o in enumerate(outputs):
        if isinstance(o, str):
            result.append(OutputSpec(name=o, type=o))
        elif isinstance(o, OutputSpec):
            result.append(o)
        else:
            raise _fail(cls, f"outputs[{i}] must be a type name string or Output(...), got {o!r}")
    for o in result:
        if not o.type or not isinstance(o.type, str):
            raise _fail(cls, f"output {o.name!r} has no type")
    return result


def spec_from_native(cls: type, name: str | None = None) -> NodeSpec:
    """Read a :class:`Node` subclass into a NodeSpec, failing with a precise message if it is malformed."""
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise NodeDefinitionError(f"{cls!r} is not a subclass of engine.Node")
    node_name = name or cls.name or cls.__name__
    if not isinstance(node_name, str) or not _NAME_RE.match(node_name):
        raise _fail(cls, f"invalid node name {node_name!r}")
    run = cls.__dict__.get("run") or cls.run
    if run is Node.run:
        raise _fail(cls, "it must define a run(self, ...) method")
    if not callable(run):
        raise _fail(cls, "run must be a method")
    try:
        hints = typing.get_type_hints(run, include_extras=True)
    except Exception as exc:  # unresolvable forward reference
        raise _fail(cls, f"cannot read the annotations of run(): {exc}") from exc
    sig = inspect.signature(run)
    params = list(sig.parameters.values())
    if not params or params[0].name != "self":
        raise _fail(cls, "run must be an instance method whose first parameter is self")
    inputs: dict[str, InputSpec] = {}
    hidden: dict[str, str] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise _fail(cls, f"run parameter {p.name!r}: inputs must be keyword parameters")
        if p.kind == p.VAR_KEYWORD:
            continue  # extra linked inputs (variadic nodes) arrive here
        ann = hints.get(p.name, _MISSING)
        if ann is _MISSING:
            raise _fail(
                cls,
                f"input {p.name!r} has no annotation; annotate it, e.g. "
                f"Annotated[int, Int(min=0)] or Annotated[Tensor, Socket('IMAGE')]",
            )
        spec: InputSpec | None = None
        hid: Hidden | None = None
        if typing.get_origin(ann) is typing.Annotated:
            base, *meta = typing.get_args(ann)
            for m in meta:
                if isinstance(m, InputSpec):
                    spec = InputSpec(**{**m.__dict__, "options": dict(m.options)})
                elif isinstance(m, Hidden):
                    hid = m
            if spec is None and hid is None and base in _PLAIN_WIDGETS:
                spec = _PLAIN_WIDGETS[base]()
        elif isinstance(ann, InputSpec):
            spec = InputSpec(**{**ann.__dict__, "options": dict(ann.options)})
        elif isinstance(ann, Hidden):
            hid = ann
        elif ann in _PLAIN_WIDGETS:
            spec = _PLAIN_WIDGETS[ann]()
        if hid is not None:
            if hid.kind not in HIDDEN_KINDS:
                raise _fail(cls, f"input {p.name!r}: unknown hidden kind {hid.kind!r}; one of {sorted(HIDDEN_KINDS)}")
            hidden[p.name] = hid.kind
            continue
        if spec is None:
            raise _fail(
                cls,
                f"input {p.name!r}: annotation {ann!r} declares no socket type; use "
                f"Annotated[..., Socket('TYPE')] or a widget such as Int(), Float(), Combo([...])",
            )
        spec.name = p.name
        if p.default is not p.empty:
            if p.default is None and not spec.is_widget:
                spec.optional = True
            else:
                spec.options["default"] = p.default
        elif spec.optional:
            # a missing optional input is not passed at all, so run() must have a default for it
            raise _fail(
                cls,
                f"optional input {p.name!r} needs a default in run() (e.g. = None); "
                f"it is left out of the call when not connected",
            )
        _check_default(cls, spec)
        inputs[p.name] = spec
    outputs = _normalise_outputs(cls, cls.outputs)
    is_async = inspect.iscoroutinefunction(run)
    # bound through the class: a classmethod read from __dict__ is not callable
    fingerprint = getattr(cls, "fingerprint", None)
    validate = getattr(cls, "validate", None)
    preflight = getattr(cls, "preflight", None)
    estimate_outputs = getattr(cls, "estimate_outputs", None)
    estimate_memory = getattr(cls, "estimate_memory", None)
    for hook_name, hook in (
        ("fingerprint", fingerprint),
        ("validate", validate),
        ("preflight", preflight),
        ("estimate_outputs", estimate_outputs),
        ("estimate_memory", estimate_memory),
    ):
        if hook is None:
            continue
        if not callable(hook):
            raise _fail(cls, f"{hook_name} must be a classmethod, got {type(hook).__name__}")
        raw = inspect.getattr_static(cls, hook_name)
        if not isinstance(raw, (classmethod, staticmethod)):
            raise _fail(
                cls,
                f"{hook_name}(...) must be a @classmethod (it is called on the class, "
                f"with the node's inputs, before any instance exists)",
            )
    vparams: frozenset[str] | None = None
    wants_types = False
    if validate is not None:
        vsig = inspect.signature(validate)
        if any(q.kind == q.VAR_KEYWORD for q in vsig.parameters.values()):
            vparams = None
        else:
            vparams = frozenset(n for n in vsig.parameters if n not in ("self", "cls", "input_types"))
        wants_types = "input_types" in vsig.parameters
    doc = cls.description if cls.description is not None else inspect.getdoc(cls) or ""
    if doc == inspect.getdoc(Node):
        doc = ""
    return NodeSpec(
        name=node_name,
        cls=cls,
        function="run",
        inputs=inputs,
        hidden=hidden,
        outputs=outputs,
        display_name=cls.display_name or node_name,
        category=cls.category,
        description=doc,
        python_module=cls.python_module or "nodes",
        output_node=bool(cls.output_node),
        cacheable=bool(cls.cacheable),
        version=str(cls.version),
        # a node that reads its own id may return something different per id: key it by id (as classic)
        not_idempotent=bool(cls.not_idempotent) or "UNIQUE_ID" in hidden.values(),
        input_is_list=bool(cls.input_is_list),
        is_async=is_async,
        kind="native",
        deprecated=bool(cls.deprecated),
        experimental=bool(cls.experimental),
        api_node=cls.api_node,
        fingerprint=fingerprint,
        validate=validate,
        validate_params=vparams,
        validate_wants_types=wants_types,
        preflight=preflight,
        estimate_outputs=estimate_outputs,
        estimate_memory=estimate_memory,
        has_lazy_check=callable(getattr(cls, "check_lazy_status", None)),
        output_tooltips=[o.tooltip for o in outputs] if any(o.tooltip for o in outputs) else None,
    )


def _check_default(cls: type, spec: InputSpec) -> None:
    if not spec.has_default:
        return
    d = spec.default
    t = spec.type
    ok = True
    if t == INT:
        ok = isinstance(d, int) and not isinstance(d, bool)
    elif t == FLOAT:
        ok = isinstance(d, (int, float)) and not isinstance(d, bool)
    elif t == STRING:
        ok = isinstance(d, str)
    elif t == BOOLEAN:
        ok = isinstance(d, bool)
    if not ok:
        raise _fail(cls, f"input {spec.name!r}: default {d!r} is not a valid {t}")
    if t in (INT, FLOAT):
        lo, hi = spec.options.get("min"), spec.options.get("max")
        if lo is not None and d < lo or hi is not None and d > hi:
            raise _fail(cls, f"input {spec.name!r}: default {d!r} is outside [{lo}, {hi}]")
    if spec.choices is not None and not callable(spec.choices):
        if d not in list(spec.choices):
            raise _fail(cls, f"input {spec.name!r}: default {d!r} is not one of the choices")


__all__ = ["Node", "NodeSpec", "NodeResult", "ExecutionBlocker", "TensorEstimate", "spec_from_native", "ANY"]
