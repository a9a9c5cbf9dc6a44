"""The per-run cost ledger and budget, kept in the run's ``costs`` annotation channel.

Before a paid call a node *reserves* its estimate: an entry goes into the run's cost list at once, so
concurrent nodes see each other's spending and the budget (``extra_data.max_cost``, else the config
file's ``budget.max_cost``) cannot be overrun by calls that start together. When the call ends the entry
is settled to the actual figure (token usage where the API returned it) or to zero if nothing was billed.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from kiln import engine
from kiln.engine import NodeError

from . import config

COSTS = "costs"  # the annotation channel this module owns: one dict per paid call


def costs_of(annotations: dict) -> list[dict]:
    """The cost entries of a finished run, from ``RunResult.annotations``."""
    return list(annotations.get(COSTS, ()))


def total_usd(entries: list[dict]) -> float:
    return float(sum(e.get("usd", 0.0) or 0.0 for e in entries))


def max_cost() -> float | None:
    ctx = engine.current()
    v = ctx.extra_data.get("max_cost") if ctx is not None else None
    if v is None:
        v = config.section("budget").get("max_cost")
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise NodeError(f"max_cost {v!r} is not a number", hint="set extra_data.max_cost to a USD amount") from None


class Reservation:
    def __init__(self, entry: dict | None):
        self.entry = entry

    def settle(self, usd: float, **fields: Any) -> dict:
        if self.entry is not None:
            self.entry["usd"] = round(float(usd), 6)
            self.entry["status"] = "billed"
            self.entry.update(fields)
        return dict(self.entry or {"usd": usd, **fields})

    def abandon(self, exc: BaseException) -> None:
        """The call did not complete. A refused or failed request costs nothing; one cancelled in flight
        (the run was interrupted or another node failed) keeps its estimate, as the provider may bill it."""
        if self.entry is None:
            return
        if isinstance(exc, asyncio.CancelledError):
            self.entry["status"] = "cancelled"
        else:
            self.entry["usd"] = 0.0
            self.entry["status"] = "failed"


def reserve(provider: str, model: str, estimate: float | None, what: str) -> Reservation:
    """Check the budget and hold ``estimate`` in the run ledger; NodeError if the call would exceed it.

    Runs on the async-node loop without awaiting, so check-and-reserve is atomic among async nodes.
    """
    ctx = engine.current()
    budget = max_cost()
    if budget is not None:
        if estimate is None:
            raise NodeError(
                f"no price is known for {provider} model '{model}', so Kiln cannot keep this run "
                f"within max_cost={budget:g}",
                hint=f"add prices.{model} to {config.config_path()} or run without max_cost",
            )
        spent = total_usd(ctx.run.annotations_of(COSTS)) if ctx is not None else 0.0
        if spent + estimate > budget + 1e-9:
            raise NodeError(
                f"{what} would cost about ${estimate:.4f}, and this run has spent ${spent:.4f} of "
                f"its max_cost ${budget:.4f}; the call was not made",
                hint="raise extra_data.max_cost (or budget.max_cost in the config), or lower n, size or quality",
            )
    if ctx is None:
        return Reservation(None)
    entry = {
        "node": ctx.node_id,
        "provider": provider,
        "model": model,
        "usd": float(estimate or 0.0),
        "estimated": True,
        "status": "reserved",
        "call_id": uuid.uuid4().hex,
    }
    ctx.run.annotate(COSTS, entry)  # the ledger keeps this dict and settles it in place
    return Reservation(entry)
