"""Typed application state (aiohttp ``AppKey``s): no globals, no string keys."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from .config import ServerConfig
from .service import PromptService

CONFIG = web.AppKey("kiln_config", ServerConfig)
SERVICE = web.AppKey("kiln_service", PromptService)
FOLDERS = web.AppKey("kiln_folders", Any)
