"""The aiohttp application: route table, lifecycle, and a blocking ``serve()`` for the CLI.

The server receives the executor (with its registry and folders) from its caller; it never builds one,
so it imports neither ``kiln`` nor ``nodes``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from aiohttp import web

from kiln.engine import get_folders

from . import catalogue, files, frontend, http_api, job_routes, login, metrics, packs, userdata, ws
from .config import ServerConfig
from .hub import Hub
from .keys import CONFIG, FOLDERS, SERVICE, SETTINGS_LOCK
from .security import make_middlewares
from .service import PromptService
from .store import Store

if TYPE_CHECKING:
    from kiln.engine import Executor, Folders

log = logging.getLogger("kiln.server")

# (method, path, handler); each is served at /path and /api/path
ROUTES = [
    ("GET", "/ws", ws.websocket),
    ("POST", "/prompt", http_api.post_prompt),
    ("GET", "/prompt", http_api.get_prompt),
    ("GET", "/prompt/{prompt_id}", http_api.prompt_status),
    ("GET", "/prompt/{prompt_id}/events", http_api.prompt_events),
    ("GET", "/queue", http_api.get_queue),
    ("POST", "/queue", http_api.post_queue),
    ("GET", "/history", http_api.get_history),
    ("GET", "/history/{prompt_id}", http_api.get_history_item),
    ("POST", "/history", http_api.post_history),
    ("POST", "/interrupt", http_api.post_interrupt),
    ("POST", "/free", http_api.post_free),
    ("GET", "/view", files.view),
    ("POST", "/upload/image", files.upload_image),
    ("POST", "/upload/mask", files.upload_mask),
    ("GET", "/object_info", http_api.object_info),
    ("GET", "/object_info/{node_class}", http_api.object_info_one),
    ("GET", "/system_stats", http_api.system_stats),
    ("GET", "/features", http_api.features),
    ("GET", "/embeddings", http_api.embeddings),
    ("GET", "/models", http_api.models),
    ("GET", "/models/{folder}", http_api.models_in),
    # the graph editor (ComfyUI's frontend): user files, catalogue, the Jobs API
    ("GET", "/users", userdata.get_users),
    ("GET", "/settings", userdata.get_settings),
    ("POST", "/settings", userdata.post_settings),
    ("GET", "/settings/{setting_id}", userdata.get_setting),
    ("POST", "/settings/{setting_id}", userdata.post_setting),
    ("GET", "/userdata", userdata.list_userdata),
    ("GET", "/userdata/{file}", userdata.get_userdata),
    ("POST", "/userdata/{file}", userdata.post_userdata),
    ("DELETE", "/userdata/{file}", userdata.delete_userdata),
    ("POST", "/userdata/{file}/move/{dest}", userdata.move_userdata),
    ("GET", "/extensions", frontend.extensions),
    ("GET", "/i18n", catalogue.i18n),
    ("GET", "/experiment/models", catalogue.experiment_models),
    ("GET", "/experiment/models/{folder}", catalogue.experiment_models_in),
    ("GET", "/view_metadata/{folder}", catalogue.view_metadata),
    ("GET", "/global_subgraphs", catalogue.global_subgraphs),
    ("GET", "/workflow_templates", frontend.workflow_templates),
    ("GET", "/workflow_templates/{pack}/{tail:.+}", frontend.workflow_template_file),
    ("GET", "/node_replacements", catalogue.node_replacements),
    ("GET", "/jobs", job_routes.list_jobs),
    ("POST", "/jobs/cancel", job_routes.cancel_jobs),
    ("GET", "/jobs/{job_id}", job_routes.get_job),
    ("POST", "/jobs/{job_id}/cancel", job_routes.cancel_job),
    ("GET", "/internal/files/{directory_type}", files.internal_files),
    ("GET", "/internal/folder_paths", catalogue.internal_folder_paths),
    ("GET", "/packs", packs.pack_reports),
    ("GET", "/workers", http_api.workers),  # Kiln: where prompts run, each worker's state and models
    ("GET", "/metrics", metrics.metrics_route),  # Prometheus text format; needs the token like any route
]


def create_app(
    executor: Executor, config: ServerConfig | None = None, folders: Folders | None = None
) -> web.Application:
    """Build the application around an engine ``Executor`` (its registry and folders are used)."""
    config = config or ServerConfig()
    config.check_bind()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=make_middlewares(config))
    app[CONFIG] = config
    if folders is None:  # the executor's own, else the default it would fall back to (never None)
        folders = executor.folders if executor.folders is not None else get_folders()
    app[FOLDERS] = folders
    app[SETTINGS_LOCK] = asyncio.Lock()
    store = Store(config.data_dir)  # holds the data dir's lock: nothing else uses its folders now
    files.clear_upload_tmp(config.upload_tmp_dir)
    app[SERVICE] = PromptService(executor, store, Hub(config), config)
    metrics.install(app, app[SERVICE])
    for method, path, handler in ROUTES:
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
    packs.mount_routes(app)  # routes custom node packs declared on PromptServer.instance.routes
    login.install(app)  # /login, /logout: browser sessions when the server has an auth token
    app.router.add_get("/", frontend.index)
    app.router.add_get("/extensions/{pack}/{tail:.+}", frontend.extension_file)
    frontend.install_templates(app)  # /templates/*: the workflow-templates package's files, when installed
    if config.front_end_root is not None:  # last: any other GET is a file of the editor's build
        app.router.add_get("/{tail:.+}", frontend.static)
    app.cleanup_ctx.append(_service_ctx)
    app.on_shutdown.append(_close_sockets)
    return app


async def _service_ctx(app: web.Application):
    svc = app[SERVICE]
    await svc.start()
    packs.attach_sender(app)
    yield
    packs.detach_sender()
    await svc.stop()
    svc.store.close()


async def _close_sockets(app: web.Application) -> None:
    await app[SERVICE].hub.close_all()


def serve(
    executor: Executor, config: ServerConfig, folders: Folders | None = None, print_fn: Callable[..., None] = print
) -> None:
    """Run until SIGINT/SIGTERM.

    The executor thread runs Python code most of the time; a short GIL switch interval lets the event loop
    get the GIL back quickly after each socket or database call, which keeps request and event latency low
    while a graph runs. Freezing the objects alive at start-up keeps garbage collections short. Both are
    measured by benchmarks/server.py.
    """
    import sys

    sys.setswitchinterval(0.001)
    app = create_app(executor, config, folders)
    import gc

    gc.collect()
    gc.freeze()  # the imported libraries and node packs never need scanning again: shorter GC pauses

    async def main() -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        hosts = [x.strip() for x in config.host.split(",") if x.strip()]
        for host in hosts:
            await web.TCPSite(runner, host, config.port, reuse_address=True).start()
        port = config.port
        if port == 0:
            port = runner.addresses[0][1]
        print_fn(
            f"Kiln server listening on http://{hosts[0] if ':' not in hosts[0] else f'[{hosts[0]}]'}:{port}"
            f" (data in {config.data_dir})",
            flush=True,
        )
        if config.front_end_root is not None:
            print_fn(f"Graph editor at / (files from {config.front_end_root})", flush=True)
        else:
            print_fn("No graph editor installed: pip install -e '.[ui]' to edit graphs in the browser", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
