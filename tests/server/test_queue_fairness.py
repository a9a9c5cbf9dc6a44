"""Queue order across clients: with fair share (the default) clients take turns, so a client with many
queued prompts does not hold up another's; ``fair_share=False`` keeps ComfyUI's strict submission order.
Prompts sent to the front go first either way. A gate holds the only worker while the queue fills, so the
order is decided by the queue alone (no clock is involved)."""

from __future__ import annotations

import pytest
from srv_helpers import SAFETY_S, Gate, chain


def _order(s, fair: bool, front_for: str | None = None) -> list[str]:
    gate = Gate()
    first = s.post("/prompt", {"prompt": gate.graph(), "client_id": "A"}).json()["prompt_id"]
    assert gate.entered.wait(SAFETY_S)
    names = {}
    for i in range(4):
        pid = s.post("/prompt", {"prompt": chain(2, value=10 + i), "client_id": "A"}).json()["prompt_id"]
        names[pid] = f"A{i}"
    for i in range(2):
        body = {"prompt": chain(2, value=20 + i), "client_id": "B"}
        if front_for == f"B{i}":
            body["front"] = True
        pid = s.post("/prompt", body).json()["prompt_id"]
        names[pid] = f"B{i}"
    gate.open()
    started = {}
    for pid in [first, *names]:
        st = s.get(f"/api/prompt/{pid}", params={"wait": "1", "timeout": str(SAFETY_S)}).json()
        assert st["status"] == "success", st
        started[pid] = st["started"]
    return [names[p] for p in sorted(names, key=lambda p: started[p])]


def test_fair_share_lets_another_client_in_between(live):
    order = _order(live(), fair=True)
    # A already holds the worker (the gate prompt), so B goes next; then they alternate, instead of B
    # waiting behind all four of A's
    assert order == ["B0", "A0", "B1", "A1", "A2", "A3"], order


def test_fifo_keeps_submission_order(live):
    order = _order(live(fair_share=False), fair=False)
    assert order == ["A0", "A1", "A2", "A3", "B0", "B1"], order


@pytest.mark.parametrize("fair", [True, False])
def test_front_goes_first_in_either_order(live, fair):
    order = _order(live(fair_share=fair), fair=fair, front_for="B1")
    assert order[0] == "B1", order
