"""The ``kiln`` command: run, validate and inspect graphs headless; serve and submit (server package).

kiln run graphs/txt2img.json --set "Positive.text=a red circle" --set 3.seed=1 --set 3.seed=2
kiln run graph.json --batch rows.csv --cache lru:200
kiln validate graph.json
kiln nodes [NAME]
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from .progress import ProgressBars

EXIT_OK, EXIT_NODE_ERROR, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, lists), else the text itself."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def wire_value(value: Any) -> Any:
    """A ``--set``/batch value read from JSON, as the graph model holds it: a list written as a ComfyUI link
    (``["4", 0]``) becomes a :class:`~kiln.engine.graph.Link`, by the loader's own rule (a bool is never a
    slot); ``{"__value__": x}`` is unwrapped; anything else is a literal."""
    if not isinstance(value, (list, dict)):
        return value
    from kiln.engine.graph import BadLink, parse_input

    parsed, _ = parse_input(value)
    return value if isinstance(parsed, BadLink) else parsed


def parse_sets(items: list[str]) -> dict[str, list[Any]]:
    """``NODE.INPUT=VALUE`` items; a key given several times collects several values."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise SystemExit(f"kiln: --set {item!r}: write NODE.INPUT=VALUE (NODE is a node id or title)")
        out.setdefault(key.strip(), []).append(_parse_value(value))
    return out


def read_batch(path: str) -> list[dict[str, Any]]:
    """Parameter rows from a CSV (header = NODE.INPUT keys) or JSONL file (one object per line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"kiln: cannot read batch file {path!r}: {exc.strerror}") from None
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise SystemExit(f"kiln: {path}:{i}: not a JSON object ({exc})") from None
                if not isinstance(row, dict):
                    raise SystemExit(f"kiln: {path}:{i}: each line must be a JSON object of NODE.INPUT keys")
                rows.append(row)
    else:
        for row in csv.DictReader(text.splitlines()):
            rows.append({k: _parse_value(v) for k, v in row.items() if k})
    return rows


def combinations(sets: dict[str, list[Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = list(sets)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(sets[k] for k in keys))] or [{}]
    if not rows:
        return combos
    return [{**row, **c} for row in rows for c in combos]


def _print_format_error(exc, source: str | None = None) -> None:
    where = f"{source}: " if source else ""
    print(f"kiln: {where}{exc.message}" + (f" ({exc.details})" if exc.details else ""), file=sys.stderr)


def _print_validation(res, stream=sys.stderr) -> None:
    print("Graph is not valid:", file=stream)
    for line in res.messages():
        print(f"  - {line}", file=stream)


def _print_warnings(res, stream=None) -> None:
    stream = stream or sys.stderr
    for line in res.warning_messages():
        print(f"warning: {line}", file=stream)


def _print_node_error(err: Any, stream=sys.stderr) -> None:
    """Render the engine's ExecutionError for a terminal."""
    print(f"Node {err.node_id} ({err.node_type}) failed: {err.message}", file=stream)
    if err.inputs:
        print("  inputs: " + ", ".join(f"{k}={v[0] if len(v) == 1 else v}" for k, v in err.inputs.items()), file=stream)
    tb = err.traceback or []
    if tb and os.environ.get("KILN_TRACEBACK"):
        print("".join(tb), file=stream)
    elif tb:
        print("  (set KILN_TRACEBACK=1 to see the traceback)", file=stream)


def cmd_run(args: argparse.Namespace) -> int:
    from kiln.engine import Graph, GraphFormatError, use_folders, validate
    from kiln.nodes.image import MAX_IMAGE_PIXELS_SERVICE
    from kiln.nodes.providers.ledger import total_usd

    from . import api
    from .cli_server import image_pixels, prompt_memory

    ex = api.executor(cache=args.cache, base_dir=args.base_dir, output_dir=args.output_dir)
    ex.services[MAX_IMAGE_PIXELS_SERVICE] = image_pixels(args)
    memory_limit = prompt_memory(args)
    try:  # an API graph, an editor (UI-format) workflow or a PNG that carries either
        base = Graph.load(args.graph, registry=ex.registry)
    except GraphFormatError as exc:
        _print_format_error(exc, args.graph)
        return EXIT_INVALID
    combos = combinations(parse_sets(args.set or []), read_batch(args.batch) if args.batch else [])
    if args.no_provider_cache:
        from kiln.nodes.providers.result_cache import SERVICE

        ex.services.pop(SERVICE, None)
    warned = False
    worst = EXIT_OK
    total_cost = 0.0
    for i, settings in enumerate(combos, 1):
        g = base.copy()
        label = f"[{i}/{len(combos)}] " if len(combos) > 1 else ""
        try:
            api.apply_settings(g, {k: wire_value(v) for k, v in settings.items()}, ex.registry)
        except GraphFormatError as exc:
            _print_format_error(exc)
            return EXIT_INVALID
        with use_folders(ex.folders):  # as Executor.validate, with the memory budget
            v = validate(g, ex.registry, memory_limit=memory_limit)
        if not warned:
            _print_warnings(v)
            warned = True
        if not v.ok:
            if label:
                print(f"{label}{settings}", file=sys.stderr)
            _print_validation(v)
            worst = max(worst, EXIT_INVALID)
            continue
        t0 = time.perf_counter()
        with ProgressBars(enabled=not args.quiet, label=label) as bars:
            try:
                extra = {"max_cost": args.max_cost} if args.max_cost is not None else None
                res = ex.run(g, validation=v, sink=functools.partial(bars.engine_event, graph=g), extra_data=extra)
            except KeyboardInterrupt:
                return EXIT_INTERRUPTED
        result = api.Result(res, ex.folders)
        dt = time.perf_counter() - t0
        if res.status == "error":
            _print_node_error(res.error)
            worst = max(worst, EXIT_NODE_ERROR)
            continue
        if res.status == "interrupted":
            return EXIT_INTERRUPTED
        costs = result.costs
        cost = total_usd(costs)
        total_cost += cost
        head = f"{label}{' '.join(f'{k}={v!r}' for k, v in settings.items())}".strip()
        print(
            f"{head + ': ' if head else ''}ran {len(res.ran)} node(s), {len(res.cached)} from cache, {dt:.2f}s"
            + (f", estimated cost ${cost:.4f}" if costs else "")
        )
        for p in result.files:
            print(f"  wrote {p}")
        for nid, ui in res.outputs.items():
            for k, v in (ui or {}).items():
                if k != "images":
                    print(f"  #{nid} {k}: {json.dumps(v)[:300]}")
    if total_cost and len(combos) > 1:
        print(f"total estimated cost ${total_cost:.4f}")
    return worst


def cmd_validate(args: argparse.Namespace) -> int:
    from kiln.engine import Graph, GraphFormatError, validate

    from .runtime import default_registry

    reg = default_registry()
    try:  # an API graph, an editor (UI-format) workflow or a PNG that carries either
        g = Graph.load(args.graph, registry=reg)
    except GraphFormatError as exc:
        _print_format_error(exc, args.graph)
        return EXIT_INVALID
    from .cli_server import prompt_memory

    res = validate(g, reg, memory_limit=prompt_memory(args))
    from .cli_provenance import unsigned_warnings

    unsigned_warnings(g, reg, res)  # savers with embed_provenance on and no C2PA signing key
    if args.json:
        from kiln.server.protocol import validation_body

        body = {"warnings": res.warning_messages()} if res.warnings else {}
        print(json.dumps(validation_body(res) | {"outputs": res.outputs} | body, indent=2))
    else:
        _print_warnings(res)
    if not res.ok:
        if not args.json:
            _print_validation(res)
        return EXIT_INVALID
    if not args.json:
        print(f"OK: {len(g)} nodes; outputs {', '.join(res.outputs)}")
        if res.problems:
            _print_validation(res)
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    from .runtime import default_registry

    reg = default_registry()
    if getattr(args, "packs", False):
        return _print_packs(reg, args.json)
    if args.name:
        spec = reg.get(args.name)
        if spec is None:
            print(f"kiln: {reg.unknown_message(args.name)}", file=sys.stderr)
            return EXIT_INVALID
        if args.json:
            print(json.dumps({spec.name: spec.object_info()}, indent=2, default=str))
            return EXIT_OK
        print(f"{spec.name}  ({spec.display_name}, category {spec.category})")
        if spec.description:
            print(f"  {spec.description}")
        print("inputs:")
        for n, i in spec.inputs.items():
            extra = {k: v for k, v in i.options.items() if k in ("default", "min", "max", "step")}
            choices = i.resolve_choices() if i.type == "COMBO" else None
            t = "one of:" if choices is not None else i.type
            print(f"  {n:24} {t}{' (optional)' if i.optional else ''}{' ' + json.dumps(extra) if extra else ''}")
            if choices is not None:
                for line in textwrap.wrap(", ".join(map(str, choices)) or "(none available)", 90):
                    print(f"  {'':24}   {line}")
        print("outputs:")
        for o in spec.outputs:
            print(f"  {o.name:24} {o.type}{' (list)' if o.is_list else ''}")
        if spec.output_node:
            print("  (output node)")
        return EXIT_OK
    if args.json:
        print(json.dumps(reg.object_info(), indent=2, default=str))
        return EXIT_OK
    by_cat: dict[str, list] = {}
    for spec in reg:
        by_cat.setdefault(spec.category, []).append(spec)
    for cat in sorted(by_cat):
        print(f"{cat}:")
        for spec in sorted(by_cat[cat], key=lambda s: s.name):
            print(f"  {spec.name:32} {spec.display_name if spec.display_name != spec.name else ''}")
    for err in reg.load_errors:
        print(f"skipped pack {err.source}: {err.error}", file=sys.stderr)
    return EXIT_OK


def _print_packs(reg, as_json: bool) -> int:
    """``kiln nodes --packs``: one line per custom_nodes/ pack, then what went wrong, with tracebacks."""
    if as_json:
        print(json.dumps([r.to_json() for r in reg.pack_reports], indent=2, default=str))
        return EXIT_OK
    if not reg.pack_reports:
        print("no custom node packs (folder: ./custom_nodes or KILN_CUSTOM_NODES)")
    for r in reg.pack_reports:
        state = "ok" if r.ok else "FAILED"
        print(f"{r.pack:32} {state:6} {len(r.classes):3} classes  {r.import_seconds * 1000:7.1f} ms  {r.path}")
        if r.error:
            print(f"  error: {r.error}")
            print(textwrap.indent(r.traceback.rstrip(), "    "))
        for e in r.class_errors:
            print(f"  skipped {e.source}: {e.error}")
        for w in r.warnings:
            print(f"  warning: {w}")
        if r.web_directory:
            print(f"  web: /extensions/{r.pack}/ -> {r.web_directory}")
    return EXIT_OK


def cmd_stubs(args: argparse.Namespace) -> int:
    from . import codegen
    from .runtime import default_registry

    # the same nodes `kiln run` sees: built-in, installed packs and the custom_nodes/ folder
    path = codegen.write(default_registry(custom_nodes=args.custom_nodes))
    print(f"wrote {path}")
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        return "(not installed)"


def cache_policy(text: str) -> str:
    """argparse type: a cache policy string that the engine accepts (a clean usage error otherwise)."""
    from kiln.engine.cache import make_cache

    try:
        make_cache(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kiln", description="Run image-generation node graphs (ComfyUI API format).")
    ap.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a graph in this process")
    r.add_argument("graph", help="graph JSON (API or editor format), or a PNG with an embedded workflow")
    r.add_argument(
        "--set",
        action="append",
        metavar="NODE.INPUT=VALUE",
        help="change an input (NODE: id or title); repeat a key to run every value",
    )
    r.add_argument("--batch", metavar="ROWS", help="CSV or JSONL of NODE.INPUT parameter rows, one run each")
    r.add_argument("--output-dir", help="where SaveImage writes (default ./output)")
    r.add_argument("--base-dir", help="folder holding models/, input/, output/ (default: current directory)")
    r.add_argument("--cache", default=None, type=cache_policy, help="keep-current (default), lru:N, ram:SIZE or none")
    r.add_argument(
        "--max-cost",
        type=float,
        default=None,
        metavar="USD",
        help="per-run budget for hosted-provider calls; a call that would exceed it fails first",
    )
    r.add_argument(
        "--no-provider-cache",
        action="store_true",
        help="call paid providers again even when this graph's result is kept on disk (cache/provider-results)",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    from .cli_server import add_budget_args

    add_budget_args(r)
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a graph without running it")
    v.add_argument("graph", help="graph JSON (API or editor format), or a PNG with an embedded workflow")
    v.add_argument("--json", action="store_true", help="print ComfyUI's {error, node_errors} JSON")
    add_budget_args(v, image_pixels=False)
    v.set_defaults(fn=cmd_validate)

    n = sub.add_parser("nodes", help="list node types, or show one node's inputs and outputs")
    n.add_argument("name", nargs="?")
    n.add_argument("--json", action="store_true", help="object_info JSON")
    n.add_argument(
        "--packs", action="store_true", help="custom_nodes/ packs: classes loaded, import time, errors with tracebacks"
    )
    n.set_defaults(fn=cmd_nodes)

    s = sub.add_parser("stubs", help="regenerate kiln/builders.py (typed node builders) from the registry")
    s.add_argument(
        "--custom-nodes",
        default=None,
        metavar="DIR",
        help="custom node folder to include (default: ./custom_nodes or KILN_CUSTOM_NODES)",
    )
    s.set_defaults(fn=cmd_stubs)

    try:
        from . import cli_server
    except ImportError:
        cli_server = None
    if cli_server is not None:
        cli_server.add_serve_parser(sub)
        cli_server.add_submit_parser(sub)
    from . import cli_provenance

    cli_provenance.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
