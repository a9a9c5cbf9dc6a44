"""Caching between runs: hits, misses, partial re-execution, each cache policy, fingerprints and keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import engine_testnodes as tn
import pytest
from engine_testnodes import CALLS, G, calls_of, chain_graph

from kiln import engine
from kiln.engine import Executor
from kiln.engine.cache import KeepCurrentCache, LRUCache, NoCache, RAMBudgetCache, make_cache, parse_size
from kiln.engine.events import ExecutionCached, NodeOutput, NodeStarted
from kiln.server.protocol import event_message

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def ran_ids(res):
    return sorted(res.ran)


def test_identical_rerun_runs_nothing(run):
    g = chain_graph(5)
    first = run(g)
    assert first.ok and len(first.ran) == 7
    CALLS.clear()
    second = run(g)
    assert second.ok
    assert second.ran == [] and CALLS == []
    assert sorted(second.cached) == sorted(first.ran) or set(second.cached) <= set(first.ran)
    assert second.outputs == first.outputs  # cached output node still reports its UI
    started = [e for e in second.events if isinstance(e, NodeStarted)]
    assert started == []
    cached_ev = [e for e in second.events if isinstance(e, ExecutionCached)]
    assert len(cached_ev) == 1 and cached_ev[0].nodes == list(g)  # in the prompt's key order
    out_ev = [e for e in second.events if isinstance(e, NodeOutput)]
    assert [e.node for e in out_ev] == ["7"] and out_ev[0].output == first.outputs["7"]


def test_change_literal_mid_chain_reruns_it_and_downstream(run):
    g = chain_graph(6)  # 1 Const, 2..7 Add, 8 Show
    run(g)
    g["4"]["inputs"]["b"] = 5
    CALLS.clear()
    r = run(g)
    assert ran_ids(r) == sorted(["4", "5", "6", "7", "8"])
    assert [v[0] for c, v in CALLS] == ["4", "5", "6", "7", "8"]
    assert set(r.cached) == {"3"}  # walking upstream stopped at the first hit
    cached_ev = [e for e in r.events if isinstance(e, ExecutionCached)][0]
    assert cached_ev.nodes == ["1", "2", "3"]
    assert r.outputs["8"]["value"] == [repr(0 + 5 * 1 + 5)]  # six Adds: five add 1, one adds 5


def test_change_back_after_keep_current_reruns(run):
    g = chain_graph(2)
    run(g)
    g["1"]["inputs"]["value"] = 10
    run(g)
    g["1"]["inputs"]["value"] = 0
    r = run(g)
    # keep-current dropped the value=0 entries when the value=10 graph ran
    assert ran_ids(r) == ["1", "2", "3", "4"]


def test_renumbered_ids_still_hit(run):
    g = chain_graph(4)
    run(g)
    mapping = {nid: f"n{int(nid) * 7}" for nid in g}
    renum = {}
    for nid, node in g.items():
        inputs = {k: ([mapping[v[0]], v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        renum[mapping[nid]] = {"class_type": node["class_type"], "inputs": inputs}
    CALLS.clear()
    r = run(renum)
    assert r.ran == [] and CALLS == []
    assert set(r.cached) >= {mapping["6"]}
    assert r.outputs[mapping["6"]]["value"] == ["4"]


def test_two_identical_branches_share_one_entry(run):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 3}},
        "2": {"class_type": "Const", "inputs": {"value": 3}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }
    r = run(g)
    assert r.ok
    # the second copy is served from the first one's entry when it comes up (ComfyUI: two identical
    # SaveImage nodes write one file), and still reports its UI
    assert len(calls_of("Const")) == 1 and len(calls_of("Show")) == 1
    assert r.outputs["3"] == r.outputs["4"] == {"value": ["3"], "tag": [""]}
    assert sorted(r.ran + r.cached) == ["1", "2", "3", "4"]
    outs = [e for e in r.events if isinstance(e, NodeOutput)]
    assert sorted(e.node for e in outs) == ["3", "4"]
    served = set(r.cached)
    assert served and not served & {e.node for e in r.events if isinstance(e, NodeStarted)}  # no `executing`
    CALLS.clear()
    assert run(g).ran == []


def test_identical_branches_both_run_without_a_cache(reg, run):
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 3}},
        "2": {"class_type": "Const", "inputs": {"value": 3}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }
    r = run(g, executor=Executor(reg, cache="none"))
    assert len(calls_of("Const")) == 2 and len(calls_of("Show")) == 2 and r.cached == []


def test_cached_output_node_reports_ui_in_events_and_result(run):
    g = {
        "1": {"class_type": "MakeImage", "inputs": {"seed": 1}},
        "2": {"class_type": "ShowImage", "inputs": {"image": ["1", 0]}},
    }
    first = run(g)
    second = run(g)
    assert second.ran == []
    assert (
        second.outputs
        == first.outputs
        == {"2": {"images": [{"filename": "('img', 1).png", "subfolder": "", "type": "temp"}]}}
    )
    ev = [e for e in second.events if isinstance(e, NodeOutput)]
    assert len(ev) == 1 and ev[0].cached and event_message(ev[0])[1]["output"] == first.outputs["2"]


def test_adding_an_output_reuses_shared_upstream(run):
    g = chain_graph(3)
    run(g)
    g["9"] = {"class_type": "Show", "inputs": {"value": ["3", 0], "tag": "extra"}}
    CALLS.clear()
    r = run(g)
    assert r.ran == ["9"]
    assert [c for c, _ in CALLS] == ["Show"]


def test_hidden_inputs_not_in_key(run):
    g = {"1": {"class_type": "Hidden3", "inputs": {"x": 1}}}
    run(g, extra_data={"extra_pnginfo": {"workflow": 1}})
    r = run(g, extra_data={"extra_pnginfo": {"workflow": 2}})
    assert r.ran == []


def test_undeclared_literal_is_ignored_for_keys(run):
    g = chain_graph(1)
    run(g)
    g["2"]["inputs"]["unused_widget"] = 123
    assert run(g).ran == []


# -- policies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,cls",
    [
        ("keep-current", KeepCurrentCache),
        (None, KeepCurrentCache),
        ("classic", KeepCurrentCache),
        ("lru:5", LRUCache),
        ("LRU:7", LRUCache),
        ("ram:1GB", RAMBudgetCache),
        ("ram:512MiB", RAMBudgetCache),
        ("none", NoCache),
    ],
)
def test_policy_strings(reg, policy, cls):
    ex = Executor(reg, cache=policy)
    assert isinstance(ex.cache, cls)
    ex.set_cache("none")
    assert isinstance(ex.cache, NoCache)


def test_policy_parameters():
    assert make_cache("lru:5").max_entries == 5
    assert make_cache("ram:1GB").budget == 10**9
    assert make_cache("ram:512MiB").budget == 512 * 1024**2
    assert parse_size("1.5k") == 1500
    assert make_cache("lru:3").describe() == "lru:3"


@pytest.mark.parametrize(
    "bad", ["lru:0", "lru:x", "ram:lots", "fifo", "lru:-1", "lru", "ram:", "ram", "ram:4XB", "foo"]
)
def test_bad_policy_strings(bad):
    with pytest.raises(ValueError) as ei:
        make_cache(bad)
    assert bad.split(":")[0] in str(ei.value).lower() or "size" in str(ei.value)


def test_keep_current_evicts_what_new_graph_does_not_use(reg, run):
    ex = Executor(reg, cache="keep-current")
    a = chain_graph(2, start=1)
    b = chain_graph(2, start=2)
    run(a, executor=ex)
    n_a = len(ex.cache)
    assert n_a == 4
    run(b, executor=ex)
    assert len(ex.cache) == 4  # a's entries were dropped when b began
    CALLS.clear()
    r = run(a, executor=ex)
    assert len(r.ran) == 4


def test_keep_current_keeps_shared_prefix(reg, run):
    ex = Executor(reg, cache="keep-current")
    a = chain_graph(3)
    run(a, executor=ex)
    b = chain_graph(3)
    b["5"]["inputs"]["tag"] = "other"
    r = run(b, executor=ex)
    assert r.ran == ["5"]


def test_lru_keeps_results_across_runs(reg, run):
    ex = Executor(reg, cache="lru:100")
    a = chain_graph(2, start=1)
    b = chain_graph(2, start=2)
    run(a, executor=ex)
    run(b, executor=ex)
    CALLS.clear()
    assert run(a, executor=ex).ran == []
    assert run(b, executor=ex).ran == []
    assert CALLS == []


def test_lru_bound_evicts_oldest(reg, run):
    ex = Executor(reg, cache="lru:4")
    graphs = [chain_graph(2, start=i) for i in range(3)]  # 4 entries each
    for g in graphs:
        run(g, executor=ex)
    assert len(ex.cache) <= 8
    # the newest graph is fully cached, the oldest is gone
    assert run(graphs[2], executor=ex).ran == []
    assert len(run(graphs[0], executor=ex).ran) == 4


def test_lru_never_evicts_current_run(reg, run):
    ex = Executor(reg, cache="lru:2")
    r = run(chain_graph(6), executor=ex)
    assert r.ok and r.outputs["8"]["value"] == ["6"]


def test_lru_recently_used_survives(reg, run):
    ex = Executor(reg, cache="lru:8")
    a, b, c = (chain_graph(2, start=i) for i in (10, 20, 30))
    run(a, executor=ex)
    run(b, executor=ex)
    run(a, executor=ex)  # a used again: b is now the oldest
    run(c, executor=ex)
    assert run(a, executor=ex).ran == []
    assert len(run(b, executor=ex).ran) == 4


def test_ram_budget_evicts_big_cheap_first(reg):
    cache = RAMBudgetCache(1000)
    ex = Executor(reg, cache=cache)
    g = {
        "big": {"class_type": "Big", "inputs": {"tag": "big", "size": 600, "seconds": 0.0}},
        "slow": {"class_type": "Big", "inputs": {"tag": "slow", "size": 300, "seconds": 0.05}},
        "o1": {"class_type": "Show", "inputs": {"value": ["big", 0]}},
        "o2": {"class_type": "Show", "inputs": {"value": ["slow", 0]}},
    }
    ex.run(G(g))
    assert cache.total_size() <= 1000
    g2 = dict(g)
    g2["new"] = {"class_type": "Big", "inputs": {"tag": "new", "size": 500, "seconds": 0.0}}
    g2["o3"] = {"class_type": "Show", "inputs": {"value": ["new", 0]}}
    CALLS.clear()
    ex.run(G(g2))
    assert cache.total_size() <= 1000
    kept = {e.outputs[0][0].value for e in cache._d.values() if e.outputs and isinstance(e.outputs[0][0], tn.Payload)}
    # the slow (expensive to recompute) entry survived; the big cheap one was evicted
    assert kept == {"slow", "new"}


def test_ram_budget_across_runs_keeps_small_entries(reg, run):
    ex = Executor(reg, cache="ram:1MB")
    a = chain_graph(3, start=1)
    b = chain_graph(3, start=2)
    run(a, executor=ex)
    run(b, executor=ex)
    assert run(a, executor=ex).ran == []


def test_none_reruns_everything(reg, run):
    ex = Executor(reg, cache="none")
    g = chain_graph(3)
    r1 = run(g, executor=ex)
    CALLS.clear()
    r2 = run(g, executor=ex)
    assert len(r2.ran) == len(r1.ran) == 5 and len(CALLS) == 5
    assert r2.cached == []
    assert r2.outputs == r1.outputs


def test_none_still_runs_shared_node_once_per_run(reg, run):
    ex = Executor(reg, cache="none")
    g = {
        "1": {"class_type": "Const", "inputs": {"value": 4}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 2}},
        "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
        "5": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    r = run(g, executor=ex)
    assert r.ok and len(calls_of("Const")) == 1
    assert r.outputs["4"]["value"] == ["5"] and r.outputs["5"]["value"] == ["6"]


# -- fingerprints / IS_CHANGED / keys -----------------------------------------------------------------------


def fp_graph():
    return {
        "1": {"class_type": "Fingerprinted", "inputs": {"value": 1}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }


def test_fingerprint_same_value_hits(run):
    tn.STATE["fp"] = "v1"
    run(fp_graph())
    tn.STATE["fp"] = "v1"
    assert run(fp_graph()).ran == []


def test_fingerprint_changed_value_reruns_node_and_downstream(run):
    tn.STATE["fp"] = "v1"
    run(fp_graph())
    tn.STATE["fp"] = "v2"
    assert ran_ids(run(fp_graph())) == ["1", "2", "3"]


def test_fingerprint_nan_always_reruns(run):
    tn.STATE["fp"] = float("nan")
    run(fp_graph())
    r = run(fp_graph())
    assert ran_ids(r) == ["1", "2", "3"]
    assert ran_ids(run(fp_graph())) == ["1", "2", "3"]


def test_fingerprint_exception_means_rerun(reg, run):
    class BadFp(engine.Node):
        outputs = ("INT",)

        @classmethod
        def fingerprint(cls, value):
            raise OSError("file vanished")

        def run(self, value: engine.Int() = 0):
            return value

    reg.register(BadFp)
    g = {
        "1": {"class_type": "BadFp", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    assert run(g).ok
    assert ran_ids(run(g)) == ["1", "2"]


def test_is_changed_in_prompt_is_reused(run):
    g = fp_graph()
    g["1"]["is_changed"] = "pinned"
    tn.STATE["fp"] = "a"
    run(g)
    tn.STATE["fp"] = "b"
    assert run(g).ran == []  # the value in the prompt wins, as ComfyUI


def test_unfingerprintable_literal_makes_node_uncacheable(run):
    class Opaque:
        pass

    g = {
        "1": {"class_type": "AnyLiteral", "inputs": {"value": Opaque()}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Const", "inputs": {"value": 2}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    graph = G({k: v for k, v in g.items() if k != "1"})
    graph.nodes["1"] = engine.NodeEntry("1", "AnyLiteral", {"value": Opaque()})
    run(graph)
    CALLS.clear()
    r = run(graph)
    assert sorted(r.ran) == ["1", "2"]  # fails closed; the unrelated branch still hits
    assert [c for c, _ in CALLS] == ["AnyLiteral", "Show"]


@pytest.mark.parametrize(
    "value",
    [float("nan"), [1, float("nan")], [[[1]]] * 2 + [json.loads("[" * 80 + "]" * 80)]],
    ids=["nan", "nan-in-list", "too-deep"],
)
def test_nan_or_oversize_literal_is_uncacheable(run, value):
    graph = G({"2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
    graph.nodes["1"] = engine.NodeEntry("1", "AnyLiteral", {"value": value})
    run(graph)
    assert "1" in run(graph).ran


def test_not_idempotent_uses_node_id(run):
    g = {
        "1": {"class_type": "Random", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    run(g)
    assert run(g).ran == []  # same id, same inputs: hit
    renum = {"9": g["1"], "2": {"class_type": "Show", "inputs": {"value": ["9", 0]}}}
    assert ran_ids(run(renum)) == ["2", "9"]


def test_uncacheable_node_always_runs(run):
    g = {
        "1": {"class_type": "Uncacheable", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Const", "inputs": {"value": 1}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    run(g)
    assert ran_ids(run(g)) == ["1", "2"]


def _keys(reg, data):
    from kiln.engine.executor import _Run
    from kiln.engine.validation import upstream_order

    ex = Executor(reg)
    graph = G(data)
    res = engine.validate(graph, reg)
    import threading

    from kiln.engine import context

    rc = context.RunContext("p", lambda e: None, threading.Event())
    r = _Run(ex, graph, rc, res.outputs, None)
    r.compute_keys(upstream_order(graph, res.outputs))
    return r.keys


def test_keys_never_use_node_ids(reg):
    a = _keys(reg, chain_graph(3))
    renum = {
        f"x{k}": {
            "class_type": v["class_type"],
            "inputs": {n: ([f"x{i[0]}", i[1]] if isinstance(i, list) else i) for n, i in v["inputs"].items()},
        }
        for k, v in chain_graph(3).items()
    }
    b = _keys(reg, renum)
    assert all(a[k] == b[f"x{k}"] for k in a)
    assert len(set(a.values())) == len(a)


def test_keys_depend_on_slot_and_input_name(reg):
    g1 = {
        "1": {"class_type": "Pair", "inputs": {"n": 3}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 1]}},
    }
    k = _keys(reg, g1)
    assert k["2"] != k["3"]


def test_keys_distinguish_types_of_literals(reg):
    base = {
        "1": {"class_type": "AnyLiteral", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
    }
    seen = set()
    for v in (1, 1.0, "1", True, {"__value__": [1]}, {"a": 1}, None, {"__value__": [[1]]}, {"__value__": []}):
        d = json.loads(json.dumps(base))
        d["1"]["inputs"]["value"] = v
        seen.add(_keys(reg, d)["1"])
    assert len(seen) == 9


KEY_SCRIPT = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import engine_testnodes as tn
from test_engine_cache import _keys
keys = _keys(tn.make_registry(), tn.chain_graph(5))
print(json.dumps({k: v.hex() for k, v in keys.items()}))
"""


def test_keys_stable_across_processes(reg):
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out1 = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, here, ROOT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out1.returncode == 0, out1.stderr
    env["PYTHONHASHSEED"] = "999"
    out2 = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, here, ROOT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    mine = {k: v.hex() for k, v in _keys(reg, chain_graph(5)).items()}
    assert json.loads(out1.stdout) == json.loads(out2.stdout) == mine


def test_node_version_is_in_the_key(reg):
    k1 = _keys(reg, chain_graph(1))

    class Const(tn.Const):
        version = "2"

    reg.register(Const, "Const", replace=True)
    k2 = _keys(reg, chain_graph(1))
    assert k1["1"] != k2["1"] and k1["2"] != k2["2"]


def test_cache_holds_only_keys_not_ids(reg, run):
    ex = Executor(reg)
    run(chain_graph(2), executor=ex)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in ex.cache._d)


def _blob_chain(reg, n):
    class Blob(engine.Node):
        outputs = ("*",)

        def run(self, x: engine.Socket("*", optional=True) = None, i: engine.Int() = 0):
            return tn.Payload(i, 50_000)

    reg.register(Blob, replace=True)
    g = {"0": {"class_type": "Blob", "inputs": {"i": 0}}}
    for i in range(1, n):
        g[str(i)] = {"class_type": "Blob", "inputs": {"x": [str(i - 1), 0], "i": i}}
    g["o"] = {"class_type": "Show", "inputs": {"value": [str(n - 1), 0]}}
    return g


def test_ram_budget_full_cache_eviction_is_cheap(reg):
    """At its budget the cache must not rank every entry on every put (that is O(nodes x entries)): counted in
    entries ranked, not timed, so a busy machine cannot fail it."""
    g = _blob_chain(reg, 5000)
    cache = RAMBudgetCache(150_000_000)  # full after 3,000 entries of 50 kB
    ranked = 0
    score = cache._score

    def counting(e):
        nonlocal ranked
        ranked += 1
        return score(e)

    cache._score = counting
    r = Executor(reg, cache=cache).run(G(g))
    assert r.ok and cache.total_size() <= cache.budget
    assert len(cache) < 3000  # it did evict
    # each eviction ranks about 3,000 entries and frees a tenth of the budget (about 300 puts' worth), so the
    # 2,000 puts past the budget rank about 21,000 entries (counted: 21,007); ranking at every put: 2,000 x 3,000
    assert 0 < ranked < 20 * 5000, ranked


def test_execution_cached_follows_prompt_key_order(run):
    g = {
        "out": {"class_type": "Show", "inputs": {"value": ["b", 0]}},
        "b": {"class_type": "Add", "inputs": {"a": ["a", 0]}},
        "a": {"class_type": "Const", "inputs": {"value": 1}},
    }
    run(g)
    ev = [e for e in run(g).events if isinstance(e, ExecutionCached)][0]
    assert ev.nodes == ["out", "b", "a"]


def test_fingerprint_of_values():
    from kiln.engine.fingerprint import Unfingerprintable, fingerprint

    big = 10**5000  # past Python's decimal conversion limit
    assert fingerprint(big) != fingerprint(big + 1) and fingerprint(-big) != fingerprint(big)
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert fingerprint([1, 2]) != fingerprint((1, 2)) != fingerprint([2, 1])
    assert fingerprint(1) != fingerprint(True) != fingerprint(1.0) != fingerprint("1")
    assert fingerprint(b"ab") != fingerprint("ab")
    for bad in (float("nan"), object(), {(1, "x"): 1, (1, 2): 2}, json.loads("[" * 70 + "]" * 70)):
        with pytest.raises(Unfingerprintable):
            fingerprint(bad)

    class Custom:
        def __kiln_fingerprint__(self):
            return "v1"

    assert fingerprint(Custom()) == fingerprint(Custom())

    class Broken:
        def __kiln_fingerprint__(self):
            raise OSError("file gone")

    with pytest.raises(Unfingerprintable):
        fingerprint(Broken())
