"""Validate a graph before anything runs, collecting every problem.

Problems are typed (:class:`~kiln.engine.issues.Issue`): a kind from a fixed vocabulary (the kinds
ComfyUI's clients know, so the server can map them one to one), a message, details and a ``hint``: one
sentence naming the node id, its title, the input and what to do. Literal values are coerced in place to
their declared types, and widget inputs left out of the JSON take their declared defaults. Given a memory
limit, it also estimates each node's peak memory from the shapes its upstream nodes declare (``budget``).

One file: every check reads and writes the same per-node state (problems, validity, estimates) in one pass
over the graph, sources first, and the typed issues they build share their wording helpers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import inspect
import json
import math
import traceback
from typing import Any

from .graph import BadLink, Graph, Link, NodeEntry
from .issues import Issue, NodeProblems, ValidationResult
from .node import NodeSpec, TensorEstimate
from .registry import Registry
from .topology import acyclic_part, dependent_outputs, find_cycle, upstream_order
from .types import BOOLEAN, COMBO, FLOAT, INT, STRING, InputSpec, types_compatible

__all__ = [
    "validate",
    "coerce_literal",
    "ValidationResult",
    "Issue",
    "NodeProblems",
    "upstream_order",
    "find_cycle",
    "OBJECT_TYPES",
    "MEMORY_OVER_BUDGET",
    "format_bytes",
]

# Types whose values are objects or tensors: a JSON literal can never be one.
OBJECT_TYPES = frozenset({"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "CONTROL_NET"})
MAX_LIST_SHOWN = 20
MAX_CYCLE_SHOWN = 20
MEMORY_OVER_BUDGET = "prompt_memory_over_budget"  # the issue kind of a node whose estimated peak is over the limit


def _short(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _where(node: NodeEntry, input_name: str | None = None) -> str:
    s = f"Node {node.id}"
    if node.title and node.title != node.class_type:
        s += f' "{node.title}"'
    s += f" ({node.class_type})"
    if input_name is not None:
        s += f", input '{input_name}'"
    return s


def _where_id(node: NodeEntry) -> str:
    """Node id and title, for problems where the class itself is missing or malformed."""
    return f"Node {node.id}" + (f' "{node.title}"' if node.title else "")


def coerce_literal(spec: InputSpec, value: Any) -> Any:
    """Coerce a JSON literal to the declared widget type; raises ValueError/TypeError with a reason."""
    t = spec.type
    if t == INT:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str):
            s = value.strip()
            try:
                return int(s)
            except ValueError:
                f = float(s)
                if not math.isfinite(f):
                    raise ValueError("not a finite number") from None
                return int(f)
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if t == FLOAT:
        if isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, str):
            f = float(value)
            if not math.isfinite(f):
                raise ValueError("not a finite number")
            return f
        if isinstance(value, bool):
            return float(value)
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if t == STRING:
        if isinstance(value, (dict, list)):
            raise TypeError(f"expected text, got {type(value).__name__}")
        s = value if isinstance(value, str) else str(value)
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("text is not valid Unicode (lone surrogate)") from exc
        return s
    if t == BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise TypeError(f"expected true or false, got {_short(value)}")
    return value


def _empty_choices_hint(ispec: InputSpec) -> str:
    """Where an empty choice list comes from: a choices callable may say (``choices.where()``)."""
    where = getattr(ispec.choices, "where", None)
    try:
        place = where() if callable(where) else where
    except Exception:
        place = None
    if place:
        return f"nothing found in {place}; add files there, or point Kiln at the folder holding models/ with --base-dir"
    return "the list is empty; if it lists files, add them, or point Kiln at your folders with --base-dir"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _combo_expected(spec: InputSpec) -> Any:
    if spec.type == COMBO and spec.v1_combo:
        return spec.resolve_choices() or []
    return spec.type


class _Validator:
    def __init__(self, graph: Graph, registry: Registry):
        self.graph = graph
        self.registry = registry
        self.problems: dict[str, list[Issue]] = {}
        self.warnings: dict[str, list[Issue]] = {}
        self.valid: dict[str, bool] = {}
        self._choices: dict[int, list] = {}
        # node id -> estimated output tensors by slot (memory budget, filled sources first; see Node)
        self.estimates: dict[str, list[TensorEstimate | None]] = {}

    def add(self, node: NodeEntry, issue: Issue) -> None:
        self.problems.setdefault(node.id, []).append(issue)

    def choices(self, spec: InputSpec) -> list:
        key = id(spec)
        if key not in self._choices:
            self._choices[key] = spec.resolve_choices() or []
        return self._choices[key]

    def check_node(self, node: NodeEntry) -> None:
        spec = self.registry[node.class_type]
        before = len(self.problems.get(node.id, ()))
        vparams = spec.validate_params if spec.validate else frozenset()
        for name, ispec in spec.inputs.items():
            skip_checks = spec.validate is not None and (vparams is None or name in vparams)
            if name not in node.inputs:
                if ispec.is_widget and ispec.has_default:
                    node.inputs[name] = ispec.default
                    continue
                if not ispec.optional:
                    hint = (
                        f"{_where(node, name)} is required but missing: connect it to a node that outputs {ispec.type}"
                        if not ispec.is_widget
                        else f"{_where(node, name)} is required but missing: give it a value"
                    )
                    self.add(
                        node,
                        Issue.of(
                            "required_input_missing", "Required input is missing", name, input_name=name, hint=hint
                        ),
                    )
                continue
            value = node.inputs[name]
            if isinstance(value, BadLink):
                self.add(
                    node,
                    Issue.of(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        input_name=name,
                        input_config=ispec.config(),
                        received_value=_safe_json(value.value),
                        hint=f"{_where(node, name)}: {_short(value.value)} is not a link; write "
                        f'["<node id>", <output index>], or wrap a list value as '
                        f'{{"__value__": [...]}}',
                    ),
                )
                continue
            if isinstance(value, Link):
                self.check_link(node, name, ispec, value, spec)
                continue
            self.check_literal(node, name, ispec, value, skip_checks)
        for name, value in node.inputs.items():
            # an undeclared link is still resolved and passed to the node (variadic nodes): it must
            # point somewhere real, or the node would fail at run time with no useful message
            if name not in spec.inputs and isinstance(value, Link):
                self.check_link_target(node, name, value)
            elif name not in spec.inputs and name not in spec.hidden and spec.kind == "native":
                self.warn_unknown(node, spec, name)
        if spec.validate is not None and len(self.problems.get(node.id, ())) == before:
            self.custom_validate(node, spec)

    def preflight(self, node: NodeEntry) -> None:
        spec = self.registry[node.class_type]
        if spec.preflight is None:
            return
        args = {n: (None if isinstance(v, (Link, BadLink)) else v) for n, v in node.inputs.items() if n in spec.inputs}
        try:
            r = spec.preflight(**args)
            if inspect.isawaitable(r):
                r = _await(r)
        except Exception as exc:
            r = f"its preflight check raised {type(exc).__name__}: {_clip(exc)}"
        if r is True or r is None:
            return
        items = r.items() if isinstance(r, dict) else [("", r)]
        for name, msg in items:
            self.add(
                node,
                Issue.of(
                    "preflight_failed",
                    "The node cannot run here",
                    f"{name} - {msg}" if name else str(msg),
                    input_name=name,
                    hint=f"{_where(node, name) if name else _where(node)}: {msg}",
                ),
            )

    def budget(self, node: NodeEntry, limit: int) -> None:
        """Estimate the node's outputs and its peak memory (``Node.estimate_memory``); refuse it over ``limit``.

        Called sources first, once the node and everything upstream of it are valid, so a linked input's
        estimate is already known here (or known to be unknown). The peak counted is what the node allocates
        plus its estimated linked inputs, which stay alive while it runs.
        """
        spec = self.registry[node.class_type]
        args: dict[str, Any] = {}
        held: dict[tuple[str, int], int] = {}
        for name, value in node.inputs.items():
            if name not in spec.inputs:
                continue
            if isinstance(value, Link):
                slots = self.estimates.get(value.node_id, ())
                est = slots[value.slot] if value.slot < len(slots) else None
                args[name] = est
                if est is not None:
                    held[(value.node_id, value.slot)] = est.nbytes
            else:
                args[name] = None if isinstance(value, BadLink) else value
        if spec.estimate_outputs is None and spec.estimate_memory is None and not held:
            return
        outs = _estimated_outputs(spec.estimate_outputs, args) if spec.estimate_outputs is not None else []
        if outs:
            self.estimates[node.id] = outs
        own: int | None = None
        if spec.estimate_memory is not None:
            own = _estimated_bytes(spec.estimate_memory, args)
        elif spec.estimate_outputs is not None and any(o is not None for o in outs):
            own = sum(o.nbytes for o in outs if o is not None)  # declares outputs only: allocates them
        inputs_bytes = sum(held.values())
        peak = (own or 0) + inputs_bytes
        if peak <= limit:
            return
        parts = []
        if inputs_bytes:
            parts.append(f"{format_bytes(inputs_bytes)} of inputs it holds")
        parts.append(f"{format_bytes(own)} it allocates" if own is not None else "what it allocates itself, unknown")
        knobs = [
            n
            for n, s in spec.inputs.items()
            if s.type in (INT, FLOAT) and not isinstance(node.inputs.get(n), Link) and n in _SIZE_INPUTS
        ]
        named = f"{', '.join(knobs[:-1])} or {knobs[-1]}" if len(knobs) > 1 else "".join(knobs)
        fix = f"lower its {named}" if knobs else "make the images or latents that reach it smaller"
        self.add(
            node,
            Issue.of(
                MEMORY_OVER_BUDGET,
                "Prompt needs more memory than allowed",
                f"needs about {format_bytes(peak)}, limit {format_bytes(limit)}",
                estimate_bytes=peak,
                limit_bytes=limit,
                hint=f"{_where(node)} needs about {format_bytes(peak)} while it runs ({' + '.join(parts)}), over "
                f"the limit of {format_bytes(limit)} for one prompt; {fix}, or raise --max-prompt-memory",
            ),
        )

    def warn_unknown(self, node: NodeEntry, spec: NodeSpec, name: str) -> None:
        """An input the node does not declare is ignored (ComfyUI's clients may send extras): say so."""
        near = difflib.get_close_matches(str(name), list(spec.inputs), n=1, cutoff=0.6)
        fix = f"did you mean {near[0]!r}?" if near else f"its inputs are {', '.join(spec.inputs) or 'none'}"
        self.warnings.setdefault(node.id, []).append(
            Issue.of(
                "unknown_input",
                "Input is not declared by the node and is ignored",
                str(name),
                input_name=str(name),
                hint=f"{_where(node, str(name))} is not an input of {spec.name} and is ignored; {fix}",
            )
        )

    def check_link(self, node: NodeEntry, name: str, ispec: InputSpec, link: Link, spec: NodeSpec) -> None:
        src_spec = self.check_link_target(node, name, link, ispec)
        if src_spec is None:
            return
        src = self.graph.nodes[link.node_id]
        received = src_spec.outputs[link.slot].type
        expected = _combo_expected(ispec)
        if spec.validate_wants_types:
            return
        if received == COMBO and ispec.type == COMBO:
            return
        if not types_compatible(received, expected):
            self.type_mismatch(node, name, ispec, link, src, received)

    def check_link_target(
        self, node: NodeEntry, name: str, link: Link, ispec: InputSpec | None = None
    ) -> NodeSpec | None:
        """The source's spec if the link points at an existing node and output, else None (reported)."""
        src = self.graph.nodes.get(link.node_id)
        if src is None:
            # ComfyUI reports this as an inner-validation KeyError on the missing id; keep its shape
            self.add(
                node,
                Issue.of(
                    "exception_during_inner_validation",
                    "Exception when validating inner node",
                    repr(link.node_id),
                    input_name=name,
                    input_config=ispec.config() if ispec else None,
                    error=repr(link.node_id),
                    exception_type="KeyError",
                    traceback=[],
                    linked_node=link.to_json(),
                    hint=f"{_where(node, name)} links to node {link.node_id!r}, which is not in the "
                    f"graph; reconnect it to an existing node",
                ),
            )
            return None
        src_spec = self.registry.get(src.class_type)
        if src_spec is None:
            return None  # reported as unknown class already
        if link.slot >= len(src_spec.outputs):
            self.add(
                node,
                Issue.of(
                    "exception_during_validation",
                    "Exception when validating node",
                    f"{name}: node '{src.id}' ({src.class_type}) has no output {link.slot}",
                    input_name=name,
                    exception_type="LinkError",
                    traceback=[],
                    hint=f"{_where(node, name)} uses output {link.slot} of node {src.id} "
                    f"({src.class_type}), which has only {len(src_spec.outputs)} output(s) "
                    f"{src_spec.output_names}; pick an index below {len(src_spec.outputs)}",
                ),
            )
            return None
        return src_spec

    def type_mismatch(
        self, node: NodeEntry, name: str, ispec: InputSpec, link: Link, src: NodeEntry, received: Any
    ) -> None:
        exp_s = ispec.type if ispec.type != COMBO else "COMBO"
        self.add(
            node,
            Issue.of(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({exp_s})",
                input_name=name,
                input_config=ispec.config(),
                received_type=received,
                linked_node=link.to_json(),
                hint=f"{_where(node, name)} expects {exp_s} but is linked to output "
                f"{link.slot} ({received}) of node {src.id} ({src.class_type}); connect an "
                f"output of type {exp_s}",
            ),
        )

    def check_literal(self, node: NodeEntry, name: str, ispec: InputSpec, value: Any, skip_checks: bool) -> None:
        t = ispec.type
        if t in OBJECT_TYPES and value is not None:
            self.add(
                node,
                Issue.of(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {t} value",
                    f"{name}, {_short(value)}, a {t} comes from a link, not a literal",
                    input_name=name,
                    input_config=ispec.config(),
                    received_value=value,
                    error=f"{t} cannot be a literal",
                    hint=f"{_where(node, name)} takes a {t} from another node; replace the value "
                    f'{_short(value)} with a link ["<node id>", <output index>]',
                ),
            )
            return
        if t in (INT, FLOAT, STRING, BOOLEAN):
            try:
                value = coerce_literal(ispec, value)
            except (ValueError, TypeError, OverflowError) as exc:
                self.add(
                    node,
                    Issue.of(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {t} value",
                        f"{name}, {_short(value)}, {_clip(exc)}",
                        input_name=name,
                        input_config=ispec.config(),
                        received_value=_safe_json(value),
                        error=_clip(exc),
                        hint=f"{_where(node, name)}: {_short(value)} is not a valid {t} ({_clip(exc)}); "
                        f"give {_article(t.lower())} {t.lower()} value",
                    ),
                )
                return
            node.inputs[name] = value
        if skip_checks:
            return
        if t in (INT, FLOAT):
            lo, hi = ispec.options.get("min"), ispec.options.get("max")
            if lo is not None and value < lo:
                self.add(
                    node,
                    Issue.of(
                        "value_smaller_than_min",
                        f"Value {value} smaller than min of {lo}",
                        name,
                        input_name=name,
                        input_config=ispec.config(),
                        received_value=value,
                        hint=f"{_where(node, name)} is {value}, below its minimum {lo}; use a "
                        f"value between {lo} and {hi}",
                    ),
                )
            if hi is not None and value > hi:
                self.add(
                    node,
                    Issue.of(
                        "value_bigger_than_max",
                        f"Value {value} bigger than max of {hi}",
                        name,
                        input_name=name,
                        input_config=ispec.config(),
                        received_value=value,
                        hint=f"{_where(node, name)} is {value}, above its maximum {hi}; use a "
                        f"value between {lo} and {hi}",
                    ),
                )
        if t == COMBO:
            choices = self.choices(ispec)
            if not _in_choices(value, choices):
                shown = str(choices) if len(choices) <= MAX_LIST_SHOWN else f"(list of length {len(choices)})"
                near = _near(value, choices)
                self.add(
                    node,
                    Issue.of(
                        "value_not_in_list",
                        "Value not in list",
                        f"{name}: '{_clip(value)}' not in {shown}",
                        input_name=name,
                        input_config=ispec.config() if len(choices) <= MAX_LIST_SHOWN else None,
                        received_value=_safe_json(value),
                        hint=f"{_where(node, name)}: {_short(value)} is not one of the choices"
                        + (
                            f"; did you mean {near!r}?"
                            if near
                            else f"; choose one of {shown}"
                            if choices
                            else f"; there are no choices available ({_empty_choices_hint(ispec)})"
                        ),
                    ),
                )

    def custom_validate(self, node: NodeEntry, spec: NodeSpec) -> None:
        args: dict[str, Any] = {}
        for name in spec.inputs:
            if spec.validate_params is not None and name not in spec.validate_params:
                continue
            v = node.inputs.get(name)
            args[name] = None if isinstance(v, (Link, BadLink)) else v
        if spec.validate_wants_types:
            types = {}
            for name, v in node.inputs.items():
                if isinstance(v, Link):
                    src = self.graph.nodes.get(v.node_id)
                    ss = self.registry.get(src.class_type) if src else None
                    if ss and v.slot < len(ss.outputs):
                        types[name] = ss.outputs[v.slot].type
            args["input_types"] = types
        try:
            assert spec.validate is not None  # checked by the caller
            r = spec.validate(**args)
            if inspect.isawaitable(r):
                r = _await(r)
        except Exception as exc:
            self.add(
                node,
                Issue.of(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    exception_type=type(exc).__name__,
                    traceback=traceback.format_exception(type(exc), exc, exc.__traceback__),
                    hint=f"{_where(node)}: its validation raised {type(exc).__name__}: {exc}",
                ),
            )
            return
        if r is True:
            return
        if isinstance(r, dict) and r:  # {input name: message}: only the inputs that are wrong
            for name, msg in r.items():
                self.add(
                    node,
                    Issue.of(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"{name} - {msg}",
                        input_name=name,
                        hint=f"{_where(node, str(name))}: {msg}",
                    ),
                )
            return
        for name in [n for n in args if n != "input_types"] or [""]:
            details = name if r is False or r is None else f"{name} - {r}"
            self.add(
                node,
                Issue.of(
                    "custom_validation_failed",
                    "Custom validation failed for node",
                    details,
                    input_name=name,
                    hint=f"{_where(node, name)}: {r if isinstance(r, str) else 'rejected by the node'}",
                ),
            )


def _await(awaitable: Any) -> Any:
    """The value of an async validator. ``asyncio.run`` cannot be used on a thread whose loop is running
    (a server validating on its loop thread), so then the coroutine runs on a private loop in a helper
    thread while this one waits."""

    async def _wrapped() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_wrapped())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kiln-validate") as pool:
        return pool.submit(asyncio.run, _wrapped()).result()


def _in_choices(value: Any, choices: list) -> bool:
    try:
        return value in choices
    except TypeError:
        return False


def _near(value: Any, choices: list) -> str | None:
    import difflib

    strs = [c for c in choices if isinstance(c, str)]
    if not isinstance(value, str) or not strs:
        return None
    hits = difflib.get_close_matches(value, strs, n=1, cutoff=0.6)
    return hits[0] if hits else None


def _clip(v: Any, n: int = 200) -> str:
    """str(v), cut to ``n`` characters: error messages stay readable whatever the graph holds."""
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# widget inputs that usually scale a node's allocation: named in the fix of a memory refusal
_SIZE_INPUTS = frozenset({"width", "height", "batch_size", "amount", "length", "scale_by", "megapixels", "resolution"})


def format_bytes(n: int | float) -> str:
    """A byte count for people: ``6.0 GiB``, ``512.0 MiB``, ``900 B`` (binary units)."""
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _estimated_outputs(hook: Any, args: dict) -> list[TensorEstimate | None]:
    """A node's ``estimate_outputs``, normalised to one TensorEstimate or None per slot; [] when unknown."""
    try:
        r = hook(**args)
    except Exception:  # an estimator's bug makes the estimate unknown, never the prompt invalid
        return []
    if isinstance(r, TensorEstimate):
        r = [r]
    if not isinstance(r, (list, tuple)):
        return []
    return [o if isinstance(o, TensorEstimate) else None for o in r]


def _estimated_bytes(hook: Any, args: dict) -> int | None:
    try:
        r = hook(**args)
    except Exception:
        return None
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
        return None
    return int(r)


def _safe_json(v: Any) -> Any:
    """A received value as it can appear in an error: JSON-safe and bounded in size."""
    if isinstance(v, (list, dict)):
        try:
            if len(json.dumps(v)) <= 1000:
                return v
        except (TypeError, ValueError, RecursionError):
            pass
        return _short(v, 200)
    if isinstance(v, (str, int, float, bool)) or v is None:
        if isinstance(v, str):
            return _clip(v.encode("utf-8", "replace").decode("utf-8"), 1000)
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v
    return _short(v, 200)


def validate(
    graph: Graph,
    registry: Registry,
    targets: list[str] | None = None,
    partial_execution_targets: list[str] | None = None,
    memory_limit: int | None = None,
) -> ValidationResult:
    """Check the whole graph. ``targets`` names the nodes to produce (default: every output node).

    Coerces literals in ``graph`` in place; the result remembers which graph it is for, and the executor
    refuses to run another graph with it. Safe to call from any thread, with or without a running event
    loop (async ``VALIDATE_INPUTS`` run on a private loop).

    ``memory_limit`` (bytes; None or 0: no limit): a node whose estimated peak memory is over it is refused
    with a ``prompt_memory_over_budget`` issue naming the node, the estimate and the limit, so a prompt too
    large for the machine never starts. Estimates come from the nodes' ``estimate_outputs`` and
    ``estimate_memory`` hooks, propagated sources first (see :class:`~kiln.engine.Node`).
    """
    return _check(graph, registry, targets, partial_execution_targets, memory_limit).bind(graph)


def _check(
    graph: Graph,
    registry: Registry,
    targets: list[str] | None,
    partial_execution_targets: list[str] | None,
    memory_limit: int | None = None,
) -> ValidationResult:
    v = _Validator(graph, registry)
    # 1. every node's class exists
    first: Issue | None = None
    for node in graph.nodes.values():
        if node.class_type is None or node.class_type == "":
            e = Issue.of(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node.id}'",
                hint=f"{_where_id(node)} has no class_type; set it to a node type name such as 'KSampler'",
            )
        elif not isinstance(node.class_type, str):
            e = Issue.of(
                "invalid_prompt",
                f"Cannot execute because node {_short(node.class_type)} does not exist.",
                f"Node ID '#{node.id}'",
                hint=f"{_where_id(node)}: class_type must be a node type name "
                f"(a string), got {_short(node.class_type)}",
            )
        elif node.class_type not in registry:
            e = Issue.of(
                "invalid_prompt",
                f"Cannot execute because node {_clip(node.class_type)} does not exist.",
                f"Node ID '#{node.id}'",
                hint=f"{_where(node)}: {registry.unknown_message(node.class_type)}"
                f" Install the pack that provides it, or run `kiln nodes` "
                f"to list the available types.",
            )
        else:
            continue
        first = first or e
        v.problems.setdefault(node.id, []).append(e)
    if first is not None:
        return ValidationResult(False, first, _per_node(v.problems, graph, {}))
    # 2. outputs
    if targets:
        missing = [t for t in targets if t not in graph.nodes]
        if missing:
            e = Issue.of(
                "invalid_prompt",
                f"Cannot execute because target node {missing[0]} does not exist.",
                f"Node ID '#{missing[0]}'",
                hint=f"Target node(s) {missing} are not in the graph",
            )
            return ValidationResult(False, e, {})
        outputs = list(targets)
    else:
        outputs = [
            nid
            for nid, n in graph.nodes.items()
            if registry[n.class_type].output_node
            and (partial_execution_targets is None or nid in partial_execution_targets)
        ]
    if not outputs:
        # still check every node, so the other mistakes are reported at once, not one round trip later
        for node in graph.nodes.values():
            try:
                v.check_node(node)
            except Exception:  # reported as the run's error below; no outputs is the graph's first problem
                continue
        return ValidationResult(
            False,
            Issue.of(
                "prompt_no_outputs",
                "Prompt has no outputs",
                "",
                hint="The graph has no output node (such as SaveImage or "
                "PreviewImage); add one so there is something to produce",
            ),
            _per_node(v.problems, graph, {}),
            warnings=v.warnings,
        )
    # 3. cycles
    cycles = find_cycle(graph, outputs)
    in_cycle: set[str] = set()
    for cyc in cycles:
        # every node on the cycle gets an error naming the cycle: bounded, so a cycle of N nodes
        # costs O(N) in the response, not N copies of an N-long list
        shown = cyc if len(cyc) <= MAX_CYCLE_SHOWN else cyc[:MAX_CYCLE_SHOWN]
        desc = " -> ".join(
            shown + [cyc[0]]
            if len(cyc) <= MAX_CYCLE_SHOWN
            else shown + [f"... ({len(cyc) - MAX_CYCLE_SHOWN} more)", cyc[0]]
        )
        for nid in cyc:
            if nid in in_cycle:
                continue
            in_cycle.add(nid)
            node = graph.nodes[nid]
            v.add(
                node,
                Issue.of(
                    "dependency_cycle",
                    "Dependency cycle",
                    f"cycle: {desc}",
                    cycle=shown,
                    cycle_length=len(cyc),
                    hint=f"{_where(node)} is part of a dependency cycle ({desc}); remove one of the "
                    f"links so the graph flows one way",
                ),
            )
    # 4. per-node checks, sources first
    order = upstream_order(graph, outputs) if not cycles else acyclic_part(graph, outputs, in_cycle)
    for nid in order:
        node = graph.nodes[nid]
        try:
            v.check_node(node)
        except Exception as exc:  # e.g. a choice list read from a folder that is gone: this node's error
            v.add(
                node,
                Issue.of(
                    "exception_during_validation",
                    "Exception when validating node",
                    _clip(exc),
                    exception_type=type(exc).__name__,
                    traceback=traceback.format_exception(type(exc), exc, exc.__traceback__),
                    hint=f"{_where(node)}: checking its inputs raised {type(exc).__name__}: {_clip(exc)}",
                ),
            )
        ok = nid not in v.problems
        for _, link in node.links():
            if not v.valid.get(link.node_id, link.node_id in graph.nodes and link.node_id not in in_cycle):
                ok = False
        if ok and memory_limit:
            # the memory budget, sources first: upstream estimates are known by now (see Node)
            v.budget(node, memory_limit)
            ok = nid not in v.problems
        v.valid[nid] = ok
    for nid in in_cycle:
        v.valid[nid] = False
    # 5. preflight checks of the outside world, only for nodes whose own inputs are fine, and only when
    # everything upstream of the outputs is (no point asking a bucket about a graph that cannot run)
    if not v.problems:
        for nid in order:
            v.preflight(graph.nodes[nid])
        if v.problems:
            # the outside world is not ready (no key, no bucket): refuse the whole run, not only the outputs
            # downstream, so nothing is paid for or written before the user fixes it
            for nid in order:
                v.valid[nid] = False
    good = [o for o in outputs if v.valid.get(o, False)]
    dependents = dependent_outputs(graph, outputs, v.problems)
    problems = _per_node(v.problems, graph, dependents)
    if good:
        return ValidationResult(True, None, problems, good, order if good == outputs else [], warnings=v.warnings)
    reasons = [f"{e.message}: {e.details}" for errs in v.problems.values() for e in errs]
    return ValidationResult(
        False,
        Issue.of("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(reasons)),
        problems,
        warnings=v.warnings,
    )


def _per_node(issues: dict[str, list[Issue]], graph: Graph, dependents: dict[str, list[str]]) -> dict:
    return {
        nid: NodeProblems(graph.nodes[nid].class_type if nid in graph.nodes else None, errs, dependents.get(nid, []))
        for nid, errs in issues.items()
    }
