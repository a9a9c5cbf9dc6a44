"""Kiln's server: ComfyUI's HTTP + websocket protocol, a durable queue and history, replayable events.

``create_app(executor, ServerConfig(...))`` builds the aiohttp application; ``serve(...)`` runs it.
"""
from .app import ROUTES, create_app, serve
from .config import InsecureBind, ServerConfig, is_loopback

__all__ = ["ROUTES", "create_app", "serve", "ServerConfig", "InsecureBind", "is_loopback"]
