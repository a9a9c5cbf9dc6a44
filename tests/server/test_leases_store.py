"""Leases of prompts handed to workers, as rows of the server's SQLite file (a real file in a temp dir)."""

from __future__ import annotations

import sqlite3

import pytest

from kiln.server.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _rows(path) -> dict:
    db = sqlite3.connect(path)
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT prompt_id, worker, attempt, heartbeat, expires FROM leases")}
    finally:
        db.close()


def test_a_lease_is_granted_renewed_and_released_in_the_file(store, tmp_path):
    store.grant_lease("p1", "1", 1, ttl=30)
    store.grant_lease("p2", "2", 2, ttl=30)
    before = _rows(tmp_path / "kiln.sqlite3")  # committed: another connection sees them
    assert before["p1"][:2] == ("1", 1) and before["p2"][:2] == ("2", 2)
    assert before["p1"][3] == pytest.approx(before["p1"][2] + 30)
    store.renew_leases(["p1"], ttl=5)
    after = _rows(tmp_path / "kiln.sqlite3")
    assert after["p1"][2] >= before["p1"][2] and after["p1"][3] == pytest.approx(after["p1"][2] + 5)
    assert after["p2"] == before["p2"]  # only the renewed one moved
    store.release_lease("p1")
    assert set(_rows(tmp_path / "kiln.sqlite3")) == {"p2"}


def test_a_restarted_server_clears_the_leases_it_finds_and_reports_them(tmp_path):
    s = Store(tmp_path)
    s.grant_lease("p9", "ray-1", 1, ttl=30)
    s.close()  # the server stopped with a prompt on a worker
    s = Store(tmp_path)
    try:
        old = s.clear_leases()
        assert [(x["prompt_id"], x["worker"], x["attempt"]) for x in old] == [("p9", "ray-1", 1)]
        assert s.leases() == []
    finally:
        s.close()
