"""``kiln serve`` and ``kiln submit``: subcommands added to the CLI's argparse subparsers.

kiln serve [--host 127.0.0.1] [--port 8188] [--data-dir DIR] [--cache POLICY] ...   (token: $KILN_AUTH_TOKEN)
kiln submit GRAPH.json --server URL [--set NODE.INPUT=VALUE ...] [--download DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def memory_limit_arg(text: str) -> int:
    """``--max-prompt-memory``: bytes, 0 for no limit (``8GiB``, ``8G`` = 8*10**9 as ``--cache ram:SIZE``)."""
    from kiln.server.config import parse_memory_limit

    try:
        return parse_memory_limit(text) or 0
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; 0 turns the limit off") from None


def pixels_arg(text: str) -> int:
    """``--max-image-pixels``: a pixel count (``67108864``) or a size (``8192x8192``); 0 for no cap."""
    w, x, h = text.strip().lower().partition("x")
    try:
        n = int(w) * int(h) if x else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as pixels; write e.g. 8192x8192 or 67108864") from None
    if n < 0:
        raise argparse.ArgumentTypeError("a pixel cap is 0 (none) or more")
    return n


def add_budget_args(p: argparse.ArgumentParser, image_pixels: bool = True) -> None:
    """The budgets refused before running (README, "Budgets"), shared by serve, run and validate. The defaults
    (server/config.py) are read when the command runs, so building the parser imports no server code."""
    p.add_argument(
        "--max-prompt-memory",
        type=memory_limit_arg,
        default=None,
        metavar="SIZE",
        help="refuse at validation a prompt whose estimated memory at some node is over SIZE (8GiB, 512MiB; 0: no "
        "limit; default: half of this machine's memory)",
    )
    if image_pixels:
        p.add_argument(
            "--max-image-pixels",
            type=pixels_arg,
            default=None,
            metavar="N",
            help="refuse uploads and loaded images of more pixels (a count or WxH; 0: no cap; default 8192x8192)",
        )


def prompt_memory(args: argparse.Namespace) -> int | None:
    """The memory limit the flags ask for, in bytes (None: no limit)."""
    from kiln.server.config import default_prompt_memory

    chosen = getattr(args, "max_prompt_memory", None)
    return default_prompt_memory() if chosen is None else (chosen or None)


def image_pixels(args: argparse.Namespace) -> int:
    """The image pixel cap the flags ask for (0: none)."""
    from kiln.server.config import DEFAULT_MAX_IMAGE_PIXELS

    chosen = getattr(args, "max_image_pixels", None)
    return DEFAULT_MAX_IMAGE_PIXELS if chosen is None else chosen


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="run the ComfyUI-compatible HTTP + websocket server",
        description="Serve ComfyUI's API (HTTP + websocket) with a durable queue.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address(es) to listen on, comma-separated (default 127.0.0.1; anything else needs a token)",
    )
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--base-dir", default=None, help="folder with models/, input/, output/, temp/ (default: cwd)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--data-dir", default=None, help="where the queue/history database lives (default BASE/data)")
    p.add_argument(
        "--auth-token",
        default=None,
        help="require this bearer token on every request; prefer $KILN_AUTH_TOKEN, which other users of the "
        "machine cannot read from the process list",
    )
    p.add_argument("--cache", default=None, help="keep-current (default), lru:N, ram:SIZE or none")
    p.add_argument(
        "--on-crash",
        choices=("rerun", "fail"),
        default="rerun",
        help="what to do with the prompt that was running when the server died",
    )
    p.add_argument("--preview-method", default="none", help="default preview method (none, auto, latent2rgb, ...)")
    p.add_argument("--max-upload-size", type=float, default=100, help="upload limit in MB")
    add_budget_args(p)
    p.add_argument("--custom-nodes", default=None, help="folder of custom node packs")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes that run prompts (default 1); a prompt that crashes or exhausts a worker ends only "
        "that worker. 0 runs prompts in a thread of the server process (no isolation)",
    )
    p.add_argument(
        "--worker-memory",
        type=memory_limit_arg,
        default=None,
        metavar="SIZE",
        help="resident memory each worker may use before it is stopped and its prompt failed (8GiB; 0: no limit; "
        "default: 80%% of this machine's memory divided among the workers)",
    )
    p.add_argument(
        "--max-prompt-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="stop and fail a prompt that runs longer than S seconds (default 0: no limit)",
    )
    p.add_argument(
        "--worker-lease",
        type=float,
        default=30.0,
        metavar="S",
        help="a worker running a prompt sends heartbeats that renew the prompt's lease in the store; one "
        "silent for S seconds (frozen, wedged, unreachable) is ended and the prompt re-run once (default 30)",
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run workers as Ray actors on the cluster at ADDRESS (auto: the cluster on this machine, else a new "
        "local instance); needs the ray extra",
    )
    p.add_argument("--ray-workers", type=int, default=2, metavar="N", help="Ray actors to start (default 2)")
    p.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs Ray reserves for each actor (default 1)")
    p.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs Ray reserves for each actor (default 0)")
    p.add_argument(
        "--output-store",
        default=None,
        metavar="s3://BUCKET/PREFIX",
        help="workers also store their outputs here, by prompt id; /view serves them (for workers that do not "
        "share this machine's disk, e.g. on Ray; needs the s3 extra and AWS credentials)",
    )
    p.add_argument("--output-store-endpoint", default=None, metavar="URL", help="an S3-compatible endpoint")
    p.add_argument(
        "--worker-base-dir",
        default=None,
        metavar="DIR",
        help="the base folder workers use for models, input, output and temp, where it differs from the "
        "server's (Ray actors on other machines); default: --base-dir",
    )
    p.add_argument(
        "--output-serve",
        choices=("stream", "redirect"),
        default="stream",
        help="how /view serves a stored output: stream it through the server (default) or redirect to a presigned URL",
    )
    p.add_argument(
        "--worker-threads",
        type=int,
        default=0,
        metavar="N",
        help="torch threads per worker (default: the machine's cores divided among the workers)",
    )
    p.add_argument(
        "--dispatch",
        choices=("affinity", "lru"),
        default="affinity",
        help="affinity (default): give a prompt to an idle worker that already holds its model files; lru: to the "
        "least recently used idle worker",
    )
    p.add_argument(
        "--queue-order",
        choices=("fair", "fifo"),
        default="fair",
        help="fair (default): clients (by clientId) take turns, so one client's hundred queued prompts do not "
        "hold up another's; fifo: strictly in submission order, as ComfyUI. Prompts sent to the front go first",
    )
    p.add_argument(
        "--interrupt-grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds an interrupted prompt has to stop before its worker is ended and replaced (default 10)",
    )
    p.add_argument("--allow-origin", action="append", default=[], help="extra browser origin allowed to call")
    p.add_argument(
        "--history-limit",
        type=int,
        default=10000,
        help="finished prompts kept in history (0: keep all); the oldest go first",
    )
    p.add_argument(
        "--max-string-bytes",
        type=int,
        default=1024 * 1024,
        help="longest string accepted in a submitted graph (an input, a title), in bytes (default 1 MiB)",
    )
    p.add_argument(
        "--late-delivery-window",
        type=float,
        default=300.0,
        help="a websocket that connects gets the final events of its clientId's prompts that finished this many "
        "seconds ago or less while it was away (default 300; 0 turns it off)",
    )
    p.add_argument(
        "--front-end-root",
        default=None,
        metavar="DIR",
        help="serve this ComfyUI frontend build at / (default: the installed ui extra, if any)",
    )
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        default="INFO",
        help="server log level (default INFO: a line per prompt accepted, started, finished or failed)",
    )
    p.add_argument(
        "--otel",
        action="store_true",
        help="send OpenTelemetry traces (a span per prompt and per node) with the OTLP/HTTP exporter, set up by "
        "the standard OTEL_EXPORTER_OTLP_* variables (needs opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)",
    )
    p.set_defaults(func=run_serve, fn=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from kiln.server import InsecureBind, ServerConfig, StoreLocked, serve
    from kiln.server.frontend import installed_front_end

    from .runtime import make_executor

    level = getattr(args, "log_level", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = Path(args.base_dir or os.environ.get("KILN_BASE_DIR") or Path.cwd())
    token = args.auth_token or os.environ.get("KILN_AUTH_TOKEN") or None
    front_end = Path(args.front_end_root) if args.front_end_root else installed_front_end()
    if front_end is not None and not (front_end / "index.html").is_file():
        print(f"kiln serve: --front-end-root {str(front_end)!r} has no index.html", file=sys.stderr)
        return 2
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            data_dir=Path(args.data_dir or base / "data"),
            auth_token=token,
            on_crash=args.on_crash,
            preview_method=args.preview_method,
            max_upload_bytes=int(args.max_upload_size * 1024 * 1024),
            allowed_origins=tuple(args.allow_origin),
            history_limit=args.history_limit or None,
            max_string_bytes=args.max_string_bytes,
            late_delivery_window=args.late_delivery_window,
            front_end_root=front_end,
            max_prompt_memory=prompt_memory(args),
            max_image_pixels=image_pixels(args),
            workers=args.workers,
            interrupt_grace=args.interrupt_grace,
            max_prompt_seconds=args.max_prompt_seconds,
            worker_lease=args.worker_lease,
            fair_share=args.queue_order == "fair",
            affinity=args.dispatch == "affinity",
            ray=args.ray,
            ray_workers=args.ray_workers,
            ray_options={"num_cpus": args.ray_num_cpus, "num_gpus": args.ray_num_gpus},
            output_store=args.output_store,
            output_store_endpoint=args.output_store_endpoint,
            output_serve=args.output_serve,
        )
        config.check_bind()
        if config.output_store:
            from kiln.workers.output_store import StoreConfig

            StoreConfig(config.output_store, config.output_store_endpoint)  # a bad URL fails here, exit 2
        from kiln.engine import make_cache

        make_cache(args.cache)  # a bad --cache policy fails here, before any node pack is imported
    except (InsecureBind, ValueError) as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    try:
        executor = make_executor(
            cache=args.cache, base_dir=base, output_dir=args.output_dir, custom_nodes=args.custom_nodes
        )
    except ValueError as exc:  # a bad --cache policy
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    from kiln.nodes.image import MAX_IMAGE_PIXELS_SERVICE

    executor.services[MAX_IMAGE_PIXELS_SERVICE] = config.max_image_pixels  # LoadImage's cap, as the uploads'
    if config.workers or config.ray:
        config = worker_config(config, args, base, {MAX_IMAGE_PIXELS_SERVICE: config.max_image_pixels})
    for err in getattr(executor.registry, "load_errors", []):
        logging.getLogger("kiln.server").warning("node pack %s was skipped: %s", err.source, err.error)
    provider = None
    if getattr(args, "otel", False):
        from kiln.server.metrics import OtelMissing, configure_otel

        try:
            provider = configure_otel()
        except OtelMissing as exc:
            print(f"kiln serve: {exc}", file=sys.stderr)
            return 2
    try:
        serve(executor, config)
    except StoreLocked as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, say
        print(f"kiln serve: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        if provider is not None:
            provider.shutdown()  # sends the spans still buffered
    return 0


def worker_config(config, args: argparse.Namespace, base: Path, services: dict):
    """``config`` with the spec its worker processes build their executors from: the same folders, cache
    policy and node packs as this server's, torch threads split between workers, each a memory limit."""
    import dataclasses

    from kiln.workers import WorkerSpec
    from kiln.workers.spec import total_memory

    n = max(1, config.ray_workers if config.ray else config.workers)
    memory = args.worker_memory if args.worker_memory is not None else int(total_memory() * 0.8 / n)
    spec = WorkerSpec(
        factory="kiln.runtime:make_executor",
        kwargs={
            "cache": args.cache,
            "base_dir": str(args.worker_base_dir or base),
            "output_dir": None if args.worker_base_dir else args.output_dir,
            "custom_nodes": args.custom_nodes,
        },
        threads=args.worker_threads or max(1, (os.cpu_count() or 1) // n),
        memory_limit=memory,
        services=services,
        env={"KILN_LOG_LEVEL": getattr(args, "log_level", "INFO")},
    )
    return dataclasses.replace(config, worker_spec=spec)


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "submit",
        help="submit a graph to a running server and follow it",
        description="Submit an API-format graph to a Kiln or ComfyUI server.",
    )
    p.add_argument("graph", help="API-format graph JSON file")
    p.add_argument("--server", default=os.environ.get("KILN_SERVER", "http://127.0.0.1:8188"))
    p.add_argument("--token", default=None, help="auth token (default: $KILN_AUTH_TOKEN)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input; NODE is a node id or title; VALUE is JSON or a plain string",
    )
    p.add_argument("--prompt-id", default=None)
    p.add_argument("--download", default=None, metavar="DIR", help="save the output files here")
    p.add_argument("--no-wait", action="store_true", help="print the prompt id and return")
    p.set_defaults(func=run_submit, fn=run_submit)
    return p


def apply_sets(graph: dict, sets: list[str]) -> dict:
    """Apply ``NODE.INPUT=VALUE`` overrides (NODE by id, else by unique title)."""
    for item in sets:
        target, eq, raw = item.partition("=")
        node_ref, dot, input_name = target.rpartition(".")
        if not eq or not dot or not node_ref or not input_name:
            raise ValueError(f"--set {item!r}: write NODE.INPUT=VALUE, e.g. --set 3.seed=42")
        node = graph.get(node_ref)
        if node is None:
            hits = [
                n for n in graph.values() if isinstance(n, dict) and (n.get("_meta") or {}).get("title") == node_ref
            ]
            if len(hits) != 1:
                known = ", ".join(list(graph)[:20])
                raise ValueError(f"--set {item!r}: no node with id or unique title {node_ref!r} (ids: {known})")
            node = hits[0]
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, list):
            value = {"__value__": value}
        node.setdefault("inputs", {})[input_name] = value
    return graph


def run_submit(args: argparse.Namespace) -> int:
    from .client import Client, ServerError, graph_json

    try:
        graph = apply_sets(graph_json(Path(args.graph)), args.set)
    except (OSError, ValueError) as exc:
        print(f"kiln submit: {exc}", file=sys.stderr)
        return 2
    client = Client(args.server, token=args.token or os.environ.get("KILN_AUTH_TOKEN"))
    try:
        pid = client.submit(graph, prompt_id=args.prompt_id)
    except ServerError as exc:
        print(f"kiln submit: the server refused the graph:\n{exc}", file=sys.stderr)
        # a graph the server finds invalid (a 4xx) is the user's input, as `kiln run` says with 2
        return 2 if 400 <= exc.status < 500 else 1
    except OSError as exc:
        print(f"kiln submit: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    print(f"prompt {pid} queued", file=sys.stderr)
    if args.no_wait:
        print(pid)
        return 0
    status, error = _follow(client, pid, graph)
    res = client.status(pid)
    if status != "success":
        info = error or {}
        print(
            f"kiln submit: prompt {status}: node {info.get('node_id')} ({info.get('node_type')}): "
            f"{str(info.get('exception_message', '')).strip()}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(res.get("outputs", {}), indent=2))
    if args.download:
        for p in client.download(pid, args.download):
            print(f"saved {p}", file=sys.stderr)
    return 0


def _follow(client, pid: str, graph: dict) -> tuple[str, dict | None]:
    """Follow the prompt's events to its end, drawing the shared progress bars (on a terminal only)."""
    from .progress import ProgressBars

    status, error = "success", None
    with ProgressBars(enabled=sys.stderr.isatty(), total=len(graph)) as bars:
        for m in client.events(pid):
            bars.wire_message(m, graph)
            t, d = m["type"], m["data"]
            if t in ("execution_error", "execution_interrupted") and d.get("exception_type") != "ExecutionBlocked":
                status, error = ("error" if t == "execution_error" else "interrupted"), d
    return status, error
