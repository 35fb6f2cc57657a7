"""Window mode of the engine, sparse schedule replay, and the provenance checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from navic import runner
from navic.check import provenance
from navic.scenario import load_scenario
from navic.sim.chooser import Chooser, ReplayChooser
from navic.sim.engine import Engine

ROOT = Path(__file__).resolve().parents[2]


class _Window(Chooser):
    wants_window = True

    def __init__(self, picks, horizon=100, width=0, max_steps=0):
        self.picks = list(picks)
        self.horizon = horizon
        self.width = width
        self.max_steps = max_steps
        self.seen = []

    def window(self, candidates):
        self.seen.append([label for _, label in candidates])
        return self.picks.pop(0) if self.picks else 0


def _two_procs(eng, log):
    def proc(name, delays):
        for d in delays:
            yield d
            log.append((eng.now, name))

    eng.spawn(proc("a", [10, 10]), "a")
    eng.spawn(proc("b", [15, 15]), "b")


def test_window_default_is_time_order():
    ref, log = Engine(), []
    _two_procs(ref, log)
    ref.run()
    eng, log2 = Engine(chooser=_Window([])), []
    _two_procs(eng, log2)
    eng.run()
    assert log2 == log


def test_window_delay_runs_later_agent_first_and_time_never_goes_back():
    ch = _Window([0, 0, 1])   # at the third decision (a@10 vs b@15) run b first
    eng, log = Engine(chooser=ch), []
    _two_procs(eng, log)
    eng.run()
    assert log == [(15, "b"), (15, "a"), (25, "a"), (30, "b")]   # a ran late, then 10 more
    assert all(t1 <= t2 for (t1, _), (t2, _) in zip(log, log[1:], strict=False))


def test_window_horizon_width_and_max_steps():
    ch = _Window([], horizon=3)
    eng, log = Engine(chooser=ch), []
    _two_procs(eng, log)
    eng.run()
    assert all(len(c) == 1 for c in ch.seen[2:])    # 10 vs 15 is beyond a 3-cycle horizon
    ch = _Window([], max_steps=3)
    eng, log = Engine(chooser=ch), []
    _two_procs(eng, log)
    eng.run()
    assert eng.steps == 3 and eng.truncated


def test_window_cancelled_events_are_not_candidates():
    ch = _Window([])
    eng = Engine(chooser=ch)
    ran = []
    h = eng.call_at(5, ran.append, "x", label="x")
    eng.call_at(6, ran.append, "y", label="y")
    h.cancel()
    eng.run()
    assert ran == ["y"] and ch.seen == []


def test_replay_sparse_by_label_and_point():
    rc = ReplayChooser([["window", "b", 1, 2]], window=True, horizon=100)
    eng, log = Engine(chooser=rc), []
    _two_procs(eng, log)
    eng.run()
    assert log[0] == (15, "b") and rc.applied == 1 and rc.log == [("window", "b", 1, 2)]
    # sequential (old) form still works
    eng = Engine(chooser=ReplayChooser([("choose", "coin", 1)]))
    assert eng.choose("coin", 2) == 1 and eng.choose("coin", 2) == 0


# --- provenance -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ipi-pingpong", "broadcast", "lowest-priority", "logical-cluster",
                                  "nmi-init", "illegal-vector", "self-ipi", "timer"])
@pytest.mark.parametrize("virt", ["none", "kvm"])
def test_no_provenance_violations_on_examples(name, virt, tmp_path):
    text = (ROOT / "examples" / f"{name}.toml").read_text().replace('virt = "none"', f'virt = "{virt}"')
    p = tmp_path / "s.toml"
    p.write_text(text)
    r = runner.simulate(load_scenario(p))
    assert [v for v in r.recorder.violations if v["kind"] in ("duplicated", "misrouted")] == []


def _fake(history, sends, *, now=10**6, quiescent=True):
    t = provenance.Tracker.__new__(provenance.Tracker)
    t.run = SimpleNamespace(recorder=SimpleNamespace(history=history),
                            engine=SimpleNamespace(now=now, _q=[] if quiescent else [object()]),
                            costs=SimpleNamespace(ghz=3.0))
    t.times = {s: [x[0] for x in v] for s, v in sends.items()}
    t.sends = {s: [(x[1], x[2], x[3] if len(x) > 3 else ()) for x in v] for s, v in sends.items()}
    return t


def test_never_accepted_is_a_selected_enabled_target_no_acceptance_reached():
    sends = {"l2.0": [(100, 0x50, ("l2.1", "l2.2"), ("l2.1", "l2.2"))]}
    one = [("a", "l2.1", 0x50, "fixed", "l2.0", 100), ("d", "l2.1", 0x50)]
    out = _fake(one, sends).check()
    assert [(v["kind"], v["cpu"], v["vector"]) for v in out] == [("lost", "l2.2", 0x50)]
    both = one + [("a", "l2.2", 0x50, "fixed", "l2.0", 130)]
    assert _fake(both, sends).check() == []
    # Not quiescent: only sends older than the bound (100 µs = 300 000 cycles) are judged.
    assert _fake(one, sends, now=1000, quiescent=False).check() == []
    assert len(_fake(one, sends, now=400_000, quiescent=False).check()) == 1
    # Lowest priority: one candidate is enough.
    lp = {"l1.0": [(100, 0x41, ("l1.1", "l1.2"), (("l1.1", "l1.2"),))]}
    assert _fake([("a", "l1.2", 0x41, "lowest", "l1.0", 100)], lp).check() == []
    assert [v["cpu"] for v in _fake([], lp).check()] == ["l1.1"]


def test_duplicated_is_a_second_handler_run_for_one_send():
    sends = {"l1.0": [(100, 0x40, ("l1.1",))]}
    ok = [("a", "l1.1", 0x40, "fixed", "l1.0", 100), ("a", "l1.1", 0x40, "fixed", "l1.0", 100),
          ("d", "l1.1", 0x40)]
    assert _fake(ok, sends).check() == []          # the same send accepted twice, coalesced: fine
    dup = [("a", "l1.1", 0x40, "fixed", "l1.0", 120), ("d", "l1.1", 0x40),
           ("a", "l1.1", 0x40, "fixed", "l1.0", 100), ("d", "l1.1", 0x40)]
    out = _fake(dup, sends).check()
    assert [v["kind"] for v in out] == ["duplicated"]
    two = [("a", "l1.1", 0x40, "fixed", "l1.0", 100), ("d", "l1.1", 0x40),
           ("a", "l1.1", 0x40, "timer", None, 300), ("d", "l1.1", 0x40)]
    assert _fake(two, sends).check() == []          # a different source is a distinct acceptance
    local = [("d", "l1.1", 0xFE)]
    assert _fake(local, sends).check() == []        # LVT error etc.: not judged


def test_misrouted_is_a_handler_on_a_cpu_the_send_did_not_select():
    sends = {"l1.0": [(100, 0x40, ("l1.1",))]}
    bad = [("a", "l1.2", 0x40, "fixed", "l1.0", 100), ("d", "l1.2", 0x40)]
    out = _fake(bad, sends).check()
    assert [v["kind"] for v in out] == ["misrouted"] and out[0]["cpu"] == "l1.2"
    pending_only = [("a", "l1.2", 0x40, "fixed", "l1.0", 100)]
    assert _fake(pending_only, sends).check() == []   # never handled: the oracle's business
