"""The executor: runs a validated graph, demand-driven from its outputs, reusing cached results.

One pass in dependency order gives every node a content-addressed key (class, version, canonical
literals, fingerprint, upstream keys and slots): O(nodes + links). Walking upstream from the outputs
stops at cache hits, so only changed nodes and what depends on them run. Sync nodes run in the calling
thread; ``async def`` nodes run on a private event loop and overlap with each other and with sync work.

How inputs become calls and returns become slots lives in ``calls.py``, subgraph building in
``expansion.py``, graph walks in ``topology.py``. This file stays above the ~400-line guideline because
``_Run`` is one state machine (keys, plan, ready queue, stepping, expansion, release of intermediates)
over shared per-run state; cutting it across modules would spread that state without simplifying it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import inspect
import math
import struct
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import context as _ctx
from .cache import Cache, CacheEntry, estimate_size, make_cache
from .calls import NAN, BlockedCall, async_call, call_filtered, is_lazy, map_calls, normalise
from .errors import ExecutionFailed, GraphFormatError, Interrupted, NodeError
from .events import (
    Event,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    NodeBlocked,
    NodeOutput,
    NodeStarted,
)
from .expansion import DynamicPrompt, GraphBuilder, is_link
from .fingerprint import Unfingerprintable, encode
from .folders import Folders, get_folders
from .graph import Graph, Link, NodeEntry, parse_input
from .node import ExecutionBlocker, NodeSpec
from .registry import Registry
from .topology import upstream_order
from .validation import ValidationResult, validate

_REPR_LIMIT = 200


@dataclass
class RunResult:
    prompt_id: str
    status: str  # success | error | interrupted
    outputs: dict = field(default_factory=dict)  # display node id -> UI dict (what history stores)
    ran: list = field(default_factory=list)  # nodes whose function was called
    cached: list = field(default_factory=list)  # nodes served from the cache
    skipped: list = field(default_factory=list)  # planned nodes that never ran (after an error)
    error: ExecutionError | ExecutionInterrupted | None = None  # why the run did not succeed
    values: dict = field(default_factory=dict)  # node id -> tuple of output values, for targets
    meta: dict = field(default_factory=dict)
    validation: ValidationResult | None = None
    seconds: float = 0.0
    annotations: dict[str, list] = field(default_factory=dict)  # what nodes attached (RunContext.annotate)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def raise_for_status(self) -> RunResult:
        if self.status == "error":
            assert isinstance(self.error, ExecutionError)
            raise ExecutionFailed(self.error)
        if self.status == "interrupted":
            raise Interrupted("Run was interrupted")
        return self


class _AsyncRunner:
    """A private event loop in a daemon thread for async nodes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kiln-async-nodes", daemon=True)
        self.thread.start()

    def submit(self, coros: list, node_ctx: _ctx.NodeContext) -> cf.Future:
        started = threading.Event()
        settled = threading.Event()  # set once the node's coroutines have finished, cleanup included

        async def _all() -> list:
            started.set()
            try:
                _ctx._current.set(node_ctx)
                return list(await asyncio.gather(*coros))  # on cancel, gather waits for its children
            finally:
                settled.set()

        fut = asyncio.run_coroutine_threadsafe(_all(), self.loop)
        fut.kiln_started, fut.kiln_settled = started, settled  # type: ignore[attr-defined]
        return fut


def _short_repr(v: Any) -> str:
    try:
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            return f"<{type(v).__name__} shape={tuple(v.shape)} dtype={v.dtype}>"
        r = repr(v)
    except Exception:
        r = f"<{type(v).__name__}>"
    return r if len(r) <= _REPR_LIMIT else r[: _REPR_LIMIT - 3] + "..."


class _Run:
    """State of one run of one graph."""

    def __init__(
        self, ex: Executor, graph: Graph, run_ctx: _ctx.RunContext, outputs: list[str], targets: list[str] | None
    ):
        self.ex = ex
        self.registry = ex.registry
        self.cache = ex.cache
        self.graph = graph
        self.nodes: dict[str, NodeEntry] = dict(graph.nodes)
        self.ctx = run_ctx
        self.outputs = outputs
        self.targets = set(targets or ())
        self.keys: dict[str, bytes | None] = {}
        self.results: dict[str, tuple[list, dict | None]] = {}
        self.planned: set[str] = set()
        self.done: set[str] = set()
        self.waiting: dict[str, int] = {}
        self.dependents: dict[str, list[str]] = {}
        self.consumers_left: dict[str, int] = {}
        self.holds: dict[str, list[str]] = {}  # consumer -> sources it counted in consumers_left
        self.restaged: set[str] = set()  # nodes waiting on lazy inputs they asked for
        self.ready_sync: deque[str] = deque()
        self.ready_async: deque[str] = deque()
        self.inflight: dict[cf.Future, str] = {}
        self.expansions: dict[str, list] = {}
        self.result = RunResult(run_ctx.prompt_id, "success")
        self.timings: dict[str, float] = {}
        self._prompt_json: dict | None = None
        self.dynprompt = DynamicPrompt(self.nodes)
        # a node that reads the live graph (DYNPROMPT: a while-loop's close node) may expand into copies that
        # link back to any node that ran before; as in ComfyUI, such a run keeps every result to its end
        self.keep_results = any(
            isinstance(n.class_type, str)
            and n.class_type in self.registry
            and "DYNPROMPT" in self.registry[n.class_type].hidden.values()
            for n in self.nodes.values()
        )
        self.current_node: str | None = None
        self.output_set = set(outputs)

    # -- keys -------------------------------------------------------------------------------------
    def spec(self, nid: str) -> NodeSpec:
        return self.registry[self.nodes[nid].class_type]

    def compute_keys(self, order: Iterable[str]) -> None:
        for nid in order:
            self.keys[nid] = self._key(nid)

    def _key(self, nid: str) -> bytes | None:
        node = self.nodes[nid]
        spec = self.registry[node.class_type]
        if not spec.cacheable:
            return None
        buf = bytearray()
        try:
            encode(spec.name, buf)
            encode(spec.version, buf)
            if spec.not_idempotent:
                encode(("id", nid), buf)
            if spec.fingerprint is not None:
                fp = self._fingerprint(node, spec)
                if fp is NAN:
                    return None
                encode(fp, buf)
            for name in sorted(node.inputs):
                v = node.inputs[name]
                if isinstance(v, Link):
                    up = self.keys.get(v.node_id)
                    if up is None:
                        return None  # upstream is uncacheable, so is this
                    buf += b"L" + name.encode("utf-8", "surrogatepass") + b"\0" + up + struct.pack(">I", v.slot)
                elif name in spec.inputs or name in _graph_hidden(spec):
                    encode(name, buf)
                    encode(v, buf)
        except Unfingerprintable:
            return None
        return hashlib.blake2b(bytes(buf), digest_size=16).digest()

    def _fingerprint(self, node: NodeEntry, spec: NodeSpec) -> Any:
        if "is_changed" in node.extra:
            return node.extra["is_changed"]
        kwargs = {n: (None if isinstance(v, Link) else v) for n, v in node.inputs.items() if n in spec.inputs}
        try:
            assert spec.fingerprint is not None
            r = call_filtered(spec.fingerprint, kwargs)
            if inspect.iscoroutine(r):
                r = asyncio.run(r)
        except Exception:
            return NAN
        if isinstance(r, float) and math.isnan(r):
            return NAN
        return r

    # -- planning ---------------------------------------------------------------------------------
    def plan(self, roots: Iterable[str]) -> list[str]:
        """Schedule roots and everything upstream not served by the cache. Returns nodes newly planned."""
        new: list[str] = []
        stack = [r for r in roots]
        while stack:
            nid = stack.pop()
            if nid in self.results:
                continue
            if nid in self.planned:
                if nid not in self.done:
                    continue
                # finished and its result released, but an expansion links to it again: run it again
                # (or serve it from the cache)
                self.planned.discard(nid)
                self.done.discard(nid)
            key = self.keys.get(nid)
            entry = self.cache.get(key) if key is not None else None
            if entry is not None:
                self.results[nid] = (entry.outputs, entry.ui)
                self.result.cached.append(nid)
                self.done.add(nid)
                continue
            self.planned.add(nid)
            new.append(nid)
            spec = self.spec(nid)
            for name, v in self.nodes[nid].inputs.items():
                if isinstance(v, Link) and not is_lazy(spec, name):
                    stack.append(v.node_id)
        for nid in new:
            self._wire(nid)
        return new

    def _wire(self, nid: str) -> None:
        spec = self.spec(nid)
        count = 0
        for name, v in self.nodes[nid].inputs.items():
            if isinstance(v, Link) and not is_lazy(spec, name):
                self.consumers_left[v.node_id] = self.consumers_left.get(v.node_id, 0) + 1
                self.holds.setdefault(nid, []).append(v.node_id)
                if v.node_id not in self.done:
                    self.dependents.setdefault(v.node_id, []).append(nid)
                    count += 1
        self.waiting[nid] = count
        if count == 0:
            self._make_ready(nid)

    def _make_ready(self, nid: str) -> None:
        (self.ready_async if self.spec(nid).is_async else self.ready_sync).append(nid)

    def add_dependency(self, nid: str, src: str) -> bool:
        """Make ``nid`` wait for ``src`` (lazy inputs, expansions). False if src's result is at hand."""
        if src in self.results:
            return False
        if src not in self.planned or src in self.done:  # never scheduled, or finished and released
            self.planned.discard(src)
            self.done.discard(src)
            self.plan([src])
            if src in self.results:
                return False
        self.dependents.setdefault(src, []).append(nid)
        self.consumers_left[src] = self.consumers_left.get(src, 0) + 1
        self.holds.setdefault(nid, []).append(src)
        self.waiting[nid] = self.waiting.get(nid, 0) + 1
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def execute(self) -> None:
        while True:
            self.ctx.check_interrupted()
            if self.inflight:
                for fut in [f for f in self.inflight if f.done()]:
                    self._finish_async(fut)
            if self.ready_async:
                self._step(self.ready_async.popleft())
            elif self.ready_sync:
                self._step(self.ready_sync.popleft())
            elif self.inflight:
                cf.wait(list(self.inflight), timeout=0.05, return_when=cf.FIRST_COMPLETED)
            elif any(n not in self.done for n in self.planned):
                stuck = sorted(n for n in self.planned if n not in self.done)
                self.current_node = stuck[0]
                raise RuntimeError(f"Dependency cycle among nodes {stuck} (created by node expansion)")
            else:
                return

    def _step(self, nid: str) -> None:
        self.current_node = nid
        node = self.nodes[nid]
        spec = self.registry[node.class_type]
        if nid in self.expansions:
            self._resolve_expansion(nid, spec)
            return
        key = self.keys.get(nid)
        if key is not None and nid not in self.restaged:
            # a node identical to one that finished earlier in this run (same class, inputs, upstream)
            # is served from its entry, as ComfyUI checks the cache when a node comes up: two identical
            # SaveImage nodes write one file
            entry = self.cache.get(key) if _has(self.cache, key) else None
            if entry is not None:
                self._serve_cached(nid, node, entry)
                return
        inputs = self._gather(nid, node, spec)
        ids = self._ids(nid)
        disp = ids["display_node"]
        self.ctx.emit(NodeStarted(self.ctx.prompt_id, **ids, class_type=node.class_type))
        if spec.has_lazy_check:
            if self._request_lazy(nid, node, spec, inputs):
                self.restaged.add(nid)
                return
            inputs = self._gather(nid, node, spec)
        obj = self._instance(nid, spec)
        fn = getattr(obj, spec.function)
        nctx = _ctx.NodeContext(
            self.ctx, nid, disp, node.class_type, ids["parent_node"], ids["real_node"], self.keys.get(nid)
        )
        token = _ctx._current.set(nctx)
        started = time.perf_counter()
        try:
            calls = map_calls(spec, inputs)
            reported: set[str] = set()
            for kw in calls:
                if isinstance(kw, BlockedCall) and kw.message is not None and kw.message not in reported:
                    reported.add(kw.message)  # once per message per node: a long list stays one event
                    self.ctx.emit(
                        NodeBlocked(
                            self.ctx.prompt_id,
                            node_id=disp,
                            node_type=node.class_type,
                            message=kw.message,
                            executed=list(self.result.ran + self.result.cached),
                        )
                    )
            if spec.is_async:
                coros = []
                for i, kw in enumerate(calls):
                    self.ctx.check_interrupted()
                    coros.append(async_call(fn, kw, (nid, i)))
                fut = self.ex._async().submit(coros, nctx)
                self.inflight[fut] = nid
                self.timings[nid] = started
                return
            rets = []
            for i, kw in enumerate(calls):
                self.ctx.check_interrupted()
                if isinstance(kw, BlockedCall):
                    rets.append(kw)
                else:
                    GraphBuilder.set_default_prefix(nid, i, 0)  # expanded ids: "<node>.<call>.<builder>.<n>"
                    rets.append(fn(**kw))
        finally:
            _ctx._current.reset(token)
        self.timings[nid] = started
        self._complete(nid, spec, rets, calls)

    def _finish_async(self, fut: cf.Future) -> None:
        nid = self.inflight.pop(fut)
        self.current_node = nid
        spec = self.spec(nid)
        rets = fut.result()  # re-raises the node's exception
        self._complete(nid, spec, rets, None)

    def _gather(self, nid: str, node: NodeEntry, spec: NodeSpec) -> dict[str, list]:
        inputs: dict[str, list] = {}
        for name, v in node.inputs.items():
            if isinstance(v, Link):
                if name in spec.inputs and spec.inputs[name].raw_link:
                    inputs[name] = [v.to_json()]
                    continue
                r = self.results.get(v.node_id)
                if r is None or v.slot >= len(r[0]):
                    inputs[name] = [None]
                else:
                    inputs[name] = r[0][v.slot]
            elif name in spec.inputs or name in _graph_hidden(spec):
                # a hidden input of a kind the engine does not fill takes what the graph gives it
                inputs[name] = [v]
        for name, kind in spec.hidden.items():
            inputs[name] = [self._hidden(kind, nid)]
        return inputs

    def _hidden(self, kind: str, nid: str) -> Any:
        if kind == "PROMPT":
            if self._prompt_json is None:
                self._prompt_json = self.graph.to_json()
            return self._prompt_json
        if kind == "EXTRA_PNGINFO":
            return self.ctx.extra_data.get("extra_pnginfo")
        if kind == "UNIQUE_ID":
            return nid
        if kind == "DYNPROMPT":
            return self.dynprompt
        if kind == "AUTH_TOKEN_COMFY_ORG":
            return self.ctx.extra_data.get("auth_token_comfy_org")
        if kind == "API_KEY_COMFY_ORG":
            return self.ctx.extra_data.get("api_key_comfy_org")
        return None

    def _request_lazy(self, nid: str, node: NodeEntry, spec: NodeSpec, inputs: dict[str, list]) -> bool:
        obj = self._instance(nid, spec)
        needed: list[str] = []
        for kw in map_calls(spec, inputs, for_lazy=True):
            r = obj.check_lazy_status(**kw)
            if inspect.iscoroutine(r):
                r = asyncio.run_coroutine_threadsafe(r, self.ex._async().loop).result()
            for name in r or []:
                if name not in needed:
                    needed.append(name)
        waiting = False
        for name in needed:
            v = node.inputs.get(name)
            if not isinstance(v, Link) or v.node_id in self.results:
                continue
            if self.add_dependency(nid, v.node_id):
                waiting = True
        return waiting

    def _instance(self, nid: str, spec: NodeSpec) -> Any:
        key = (nid, spec.name)
        obj = self.ex.objects.get(key)
        if obj is None or type(obj) is not spec.cls:
            obj = spec.cls()
            self.ex.objects[key] = obj
        return obj

    # -- results ----------------------------------------------------------------------------------
    def _complete(self, nid: str, spec: NodeSpec, rets: list, calls: list | None) -> None:
        n_out = len(spec.outputs)
        slots: list[list] = [[] for _ in range(n_out)]
        ui: dict | None = None
        expand_subgraphs: list = []
        expand_results: list = []
        for ret in rets:
            values, call_ui, expand = normalise(spec, ret, n_out)
            if call_ui:
                if ui is None:
                    ui = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in call_ui.items()}
                else:
                    for k, v in call_ui.items():
                        if k in ui and isinstance(ui[k], list) and isinstance(v, (list, tuple)):
                            ui[k].extend(v)
                        elif k not in ui:
                            ui[k] = v
            if expand is not None:
                expand_subgraphs.append(expand)
            # every call counts, in call order: an expanding call's values are resolved once its
            # subgraph has run, a plain call's values stand as they are
            expand_results.append((expand is not None, values))
            if expand is None:
                _merge(spec, slots, values)
        if expand_subgraphs:
            self._expand(nid, spec, expand_subgraphs, expand_results, ui)
            return
        self._store(nid, spec, slots, ui)

    def _store(self, nid: str, spec: NodeSpec, slots: list[list], ui: dict | None) -> None:
        seconds = time.perf_counter() - self.timings.get(nid, time.perf_counter())
        self.results[nid] = (slots, ui)
        key = self.keys.get(nid)
        if key is not None and not any(isinstance(x, ExecutionBlocker) for s in slots for x in s):
            self.cache.put(key, CacheEntry(slots, ui, seconds, estimate_size(slots)))
        self.result.ran.append(nid)
        if ui is not None:
            ids = self._ids(nid)
            disp = ids["display_node"]
            self.result.outputs[disp] = ui
            self.result.meta[disp] = {
                "node_id": nid,
                "display_node": disp,
                "parent_node": ids["parent_node"],
                "real_node_id": ids["real_node"],
            }
            self.ctx.emit(NodeOutput(self.ctx.prompt_id, **ids, output=ui))
        self._finish(nid)

    def _serve_cached(self, nid: str, node: NodeEntry, entry: CacheEntry) -> None:
        self.results[nid] = (entry.outputs, entry.ui)
        self.result.cached.append(nid)
        if entry.ui is not None and self.spec(nid).output_node:
            ids = self._ids(nid)
            self.result.outputs[ids["display_node"]] = entry.ui
            self.ctx.emit(NodeOutput(self.ctx.prompt_id, **ids, output=entry.ui, cached=True))
        self._finish(nid)

    def _finish(self, nid: str) -> None:
        self.done.add(nid)
        for dep in self.dependents.pop(nid, ()):
            self.waiting[dep] -= 1
            if self.waiting[dep] == 0 and dep not in self.done:
                self._make_ready(dep)
        self._release_inputs(nid)

    def _release_inputs(self, nid: str) -> None:
        # only the sources this node counted: a lazy input it never asked for holds nothing, and
        # decrementing for it would free a result another consumer is still waiting for
        for src in self.holds.pop(nid, ()):
            self.consumers_left[src] -= 1
            if self.keep_results:
                continue
            if self.consumers_left[src] <= 0 and src not in self.targets and src not in self.output_set:
                self.results.pop(src, None)  # intermediates nobody needs are released

    def _ids(self, nid: str) -> dict[str, Any]:
        """The four ids a node event carries (see kiln.engine.events)."""
        node = top = self.nodes[nid]
        while top.parent is not None:
            top = self.nodes[top.parent]
        return {"node": nid, "display_node": node.display_id or nid, "parent_node": node.parent, "real_node": top.id}

    # -- expansion --------------------------------------------------------------------------------
    def _expand(self, nid: str, spec: NodeSpec, subgraphs: list, results: list, ui: dict | None) -> None:
        new_ids: list[str] = []
        for sub in subgraphs:
            if isinstance(sub, Graph):
                sub = sub.to_json()
            parsed = Graph.from_json(sub)
            for sid, entry in parsed.nodes.items():
                if sid in self.nodes:
                    raise GraphFormatError(
                        f"Node {nid} expanded into a node id {sid!r} that already exists; "
                        f"build the subgraph with engine.GraphBuilder for unique ids"
                    )
                if entry.class_type not in self.registry:
                    raise GraphFormatError(f"Node {nid} expanded into unknown node type {entry.class_type!r}")
                entry.parent = nid
                override = sub[sid].get("override_display_id") if isinstance(sub.get(sid), dict) else None
                shown = str(override) if override is not None else nid
                # as ComfyUI resolves display ids: through the node shown, to what that node shows as
                shown_entry = self.nodes.get(shown)
                entry.display_id = (shown_entry.display_id or shown) if shown_entry is not None else shown
                self.nodes[sid] = entry
                new_ids.append(sid)
        # keys for the new nodes, sources first
        sub_graph = Graph({k: self.nodes[k] for k in new_ids})
        self.compute_keys(upstream_order(sub_graph, new_ids))
        resolved = []
        for expanded, values in results:
            if expanded:
                values = tuple(parse_input(v)[0] if is_link(v) else v for v in values)
            resolved.append((expanded, values))
        self.expansions[nid] = [resolved, ui]
        new_outputs = [s for s in new_ids if self.spec(s).output_node]
        self.waiting[nid] = 0
        srcs = [v.node_id for exp, vals in resolved if exp for v in vals if isinstance(v, Link)] + new_outputs
        for src in srcs:
            self.add_dependency(nid, src)
        if self.waiting[nid] == 0:
            self._make_ready(nid)

    def _resolve_expansion(self, nid: str, spec: NodeSpec) -> None:
        resolved, ui = self.expansions.pop(nid)
        slots: list[list] = [[] for _ in spec.outputs]
        for expanded, values in resolved:
            if not expanded:
                _merge(spec, slots, values)
                continue
            for k in range(len(spec.outputs)):
                v = values[k] if k < len(values) else None
                if isinstance(v, Link):
                    r = self.results.get(v.node_id)
                    slots[k].extend(r[0][v.slot] if r and v.slot < len(r[0]) else [None])
                elif spec.outputs[k].is_list and isinstance(v, (list, tuple)):
                    slots[k].extend(v)
                else:
                    slots[k].append(v)
        self._store(nid, spec, slots, ui)


class Executor:
    """Runs graphs against a registry, keeping a cache and node instances between runs.

    Thread-safety: one run at a time per Executor; :meth:`interrupt` may be called from any thread.
    The event sink is called from the executor's thread and from the async-node loop thread.
    """

    def __init__(
        self,
        registry: Registry,
        cache: str | Cache | None = None,
        folders: Folders | None = None,
        services: dict | None = None,
    ):
        self.registry = registry
        self.cache = make_cache(cache)
        self.folders = folders  # None: the folders of the current directory (or KILN_BASE_DIR)
        self.services = services if services is not None else {}
        self.objects: dict[tuple[str, str], Any] = {}
        self._runner: _AsyncRunner | None = None
        self._run_ctx: _ctx.RunContext | None = None
        self._lock = threading.Lock()

    def _async(self) -> _AsyncRunner:
        if self._runner is None:
            self._runner = _AsyncRunner()
        return self._runner

    def set_cache(self, policy: str | Cache) -> None:
        self.cache = make_cache(policy)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel the running prompt (or only if it is ``prompt_id``). True if something was cancelled."""
        rc = self._run_ctx
        if rc is None or (prompt_id is not None and rc.prompt_id != prompt_id):
            return False
        rc.cancel.set()
        return True

    def validate(
        self, graph: Graph, targets: list[str] | None = None, partial_execution_targets: list[str] | None = None
    ) -> ValidationResult:
        """Validate against this executor's registry, with its folders (model choice lists)."""
        with _ctx.use_folders(self.folders):
            return validate(graph, self.registry, targets, partial_execution_targets)

    def run(
        self,
        graph: Graph,
        *,
        prompt_id: str | None = None,
        extra_data: dict | None = None,
        targets: list[str] | None = None,
        partial_execution_targets: list[str] | None = None,
        sink: Callable[[Event], None] | None = None,
        validation: ValidationResult | None = None,
        cancel: threading.Event | None = None,
        options: _ctx.RunOptions | None = None,
    ) -> RunResult:
        """Validate (unless ``validation`` is given) and run. Raises ValidationFailed for an invalid graph;
        node errors and interruptions come back as the result's status."""
        with _ctx.use_folders(self.folders):
            if validation is None:
                validation = self.validate(graph, targets, partial_execution_targets)
                validation.raise_for_errors()
            else:
                validation.check_belongs_to(graph)
            with self._lock:
                return self._run(
                    graph,
                    prompt_id or uuid.uuid4().hex,
                    extra_data or {},
                    validation,
                    targets,
                    sink or (lambda e: None),
                    cancel,
                    options or _ctx.RunOptions(),
                )

    def _run(
        self,
        graph: Graph,
        prompt_id: str,
        extra: dict,
        validation: ValidationResult,
        targets: list[str] | None,
        sink: Callable[[Event], None],
        cancel: threading.Event | None,
        options: _ctx.RunOptions,
    ) -> RunResult:
        t0 = time.perf_counter()
        rc = _ctx.RunContext(
            prompt_id, sink, cancel or threading.Event(), extra, self.folders or get_folders(), self.services, options
        )
        self._run_ctx = rc
        outputs = validation.outputs
        run = _Run(self, graph, rc, outputs, targets)
        run.result.validation = validation
        try:
            sink(ExecutionStart(prompt_id))
            order = validation.order or upstream_order(graph, outputs)
            run.compute_keys(order)
            keys = [k for k in run.keys.values() if k is not None]
            self.cache.begin_run(keys)
            self._forget_objects(graph)
            # in the prompt's key order, as ComfyUI lists them
            cached_nodes = [
                nid for nid in graph.nodes if (key := run.keys.get(nid)) is not None and _has(self.cache, key)
            ]
            run.plan(outputs)
            sink(ExecutionCached(prompt_id, nodes=cached_nodes))
            cached_now = set(run.result.cached)
            for nid in outputs:
                if nid in cached_now:
                    slots, ui = run.results[nid]
                    if ui is not None:
                        run.result.outputs[nid] = ui
                        sink(NodeOutput(prompt_id, node=nid, display_node=nid, output=ui, cached=True))
            run.execute()
            run.result.status = "success"
            sink(ExecutionSuccess(prompt_id))
        except Interrupted:
            self._cancel_inflight(run)
            at = run.current_node
            run.result.status = "interrupted"
            stopped = ExecutionInterrupted(
                prompt_id,
                node_id=at,
                node_type=run.nodes[at].class_type if at else None,
                executed=list(run.result.ran + run.result.cached),
            )
            run.result.error = stopped
            sink(stopped)
        except BaseException as exc:  # a node failed: typed error, nothing finished is lost
            self._cancel_inflight(run)
            ev = self._error_event(run, run.current_node, exc)
            run.result.status = "error"
            run.result.error = ev
            sink(ev)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._run_ctx = None
            failed = run.current_node if run.result.status == "error" else None
            run.result.skipped = sorted(n for n in run.planned if n not in run.done and n != failed)
            for t in run.targets:
                if t in run.results:
                    run.result.values[t] = tuple(s[0] if len(s) == 1 else s for s in run.results[t][0])
            run.result.seconds = time.perf_counter() - t0
            run.result.annotations = {k: list(v) for k, v in rc.annotations.items()}
        return run.result

    CANCEL_GRACE_S = 10.0

    def _cancel_inflight(self, run: _Run) -> None:
        """Cancel running async nodes and wait (bounded) for their cleanup, so a run that returns has no
        node still acting behind it (an S3 upload being rolled back, say)."""
        futs = list(run.inflight)
        run.inflight.clear()
        for fut in futs:
            fut.cancel()
        deadline = time.monotonic() + self.CANCEL_GRACE_S
        for fut in futs:
            started, settled = getattr(fut, "kiln_started", None), getattr(fut, "kiln_settled", None)
            if started is not None and settled is not None and started.is_set():  # never started: no cleanup
                settled.wait(max(0.0, deadline - time.monotonic()))

    def _forget_objects(self, graph: Graph) -> None:
        if len(self.objects) > 4 * max(len(graph.nodes), 64):
            self.objects = {k: v for k, v in self.objects.items() if k[0] in graph.nodes}

    def _error_event(self, run: _Run, nid: str | None, exc: BaseException) -> ExecutionError:
        node = run.nodes.get(nid) if nid else None
        inputs_seen: dict = {}
        if node is not None:
            for name, v in node.inputs.items():
                if isinstance(v, Link):
                    r = run.results.get(v.node_id)
                    vals = r[0][v.slot] if r and v.slot < len(r[0]) else [None]
                else:
                    vals = [v]
                inputs_seen[name] = [_short_repr(x) for x in vals[:4]]
        if isinstance(exc, NodeError):
            msg = str(exc)
            if exc.input_name:
                msg = f"input '{exc.input_name}': {msg}"
            if exc.hint:
                msg += f" ({exc.hint})"
            tb: list = []
        else:
            msg = f"{exc}" or type(exc).__name__
            tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return ExecutionError(
            run.ctx.prompt_id,
            node_id=(node.display_id or nid) if node else nid,
            node_type=node.class_type if node else None,
            executed=list(run.result.ran + run.result.cached),
            message=msg,
            exception_type=f"{type(exc).__module__}.{type(exc).__name__}"
            if type(exc).__module__ not in ("builtins",)
            else type(exc).__name__,
            traceback=tb,
            inputs=inputs_seen,
            outputs=sorted(run.results),
        )


def _merge(spec: NodeSpec, slots: list[list], values: tuple) -> None:
    """Add one call's values to a node's output slots (list outputs concatenate)."""
    for k, slot in enumerate(slots):
        v = values[k] if k < len(values) else None
        if spec.outputs[k].is_list and isinstance(v, (list, tuple)):
            slot.extend(v)
        else:
            slot.append(v)


def _graph_hidden(spec: NodeSpec) -> Any:
    """Hidden inputs of kinds the engine does not fill: the graph's value (literal or link) goes to them."""
    return spec.extra.get("graph_hidden") or ()


def _has(cache: Cache, key: bytes) -> bool:
    return key in cache
