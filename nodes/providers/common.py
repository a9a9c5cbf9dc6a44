"""Pieces every provider node shares: the generation record, the UI entry, the re-run switch."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any


def generation_record(
    *,
    provider: str,
    model: str,
    usd: float,
    estimated: bool,
    usage: dict | None = None,
    request_id: str | None = None,
    revised_prompts: list[str] | None = None,
    **extra: Any,
) -> dict:
    """What a provider node's ``usage`` output holds (JSON) and what sinks embed as provenance."""
    rec = {
        "provider": provider,
        "model": model,
        "usd": round(float(usd), 6),
        "estimated": estimated,
        "usage": usage or None,
        "request_id": request_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    if revised_prompts:
        rec["revised_prompt"] = revised_prompts[0]
        if len(revised_prompts) > 1:
            rec["revised_prompts"] = revised_prompts
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def ui_for(rec: dict) -> dict:
    """The UI dict (websocket ``executed`` and history) of a provider node."""
    entry = {k: rec.get(k) for k in ("provider", "model", "usd", "estimated", "request_id")}
    return {"kiln_cost": [entry]}


def dumps(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True, default=str)


def rerun_fingerprint(cache_results: Any = True, **_: Any) -> Any:
    """A node's ``fingerprint`` (as a staticmethod): NaN, i.e. always re-run and never reuse a paid
    result, when caching is switched off."""
    return math.nan if cache_results is False else 0
