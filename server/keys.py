"""Typed application state (aiohttp ``AppKey``s): no globals, no string keys."""

from __future__ import annotations

import asyncio

from aiohttp import web

from kiln.engine import Folders

from .config import ServerConfig
from .service import PromptService

CONFIG = web.AppKey("kiln_config", ServerConfig)
SERVICE = web.AppKey("kiln_service", PromptService)
FOLDERS = web.AppKey("kiln_folders", Folders)
SETTINGS_LOCK = web.AppKey("kiln_settings_lock", asyncio.Lock)  # one settings update at a time
