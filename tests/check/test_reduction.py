"""Partial-order reduction (`navic explore --reduction sleep`): sleep sets over the declared
independence relation (navic/check/independence.py) find the same violations as the unreduced
search on every example and every mutant, and the same verdict on correct scenarios; on a toy
system of independent and dependent callbacks they reach every final state the full search
reaches while running fewer schedules; the visited table keeps sleep sets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from navic.check import explore as X
from navic.check import independence, mutants
from navic.cli import main
from navic.scenario import load_scenario
from navic.sim.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"


# ---------------------------------------------------------------------------------------------
# A toy system: callbacks that append their name to the logs of the locations they touch. The
# final logs are the run's Mazurkiewicz trace: two runs end in the same logs iff they order
# every pair of dependent steps alike.
# ---------------------------------------------------------------------------------------------
class Toy:
    def __init__(self, engine: Engine, steps: list[tuple[str, int, frozenset[str], int]]) -> None:
        self.engine = engine
        self.logs: dict[str, list[str]] = {}
        for name, t, feet, follow in steps:
            engine.call_at(t, self.act, name, feet, follow, label=name)

    def act(self, name: str, feet: frozenset[str], follow: int) -> None:
        for f in sorted(feet):
            self.logs.setdefault(f, []).append(name)
        if follow is not None:   # a follow-up step of the same agent (same footprint) `follow` cycles later
            self.engine.call_later(follow, self.act, name + "'", feet, None, label=name)

    def final(self) -> tuple:
        return tuple(sorted((k, tuple(v)) for k, v in self.logs.items()))


@pytest.fixture
def toy_footprints(monkeypatch):
    monkeypatch.setitem(independence.FOOTPRINTS, "Toy.act", lambda h: h.args[1])


def _toy_search(steps, budget: int, reduction: str, width: int = 4, horizon: int = 10):
    """The explorer's DFS (Explorer.search without the simulator and without hashing) on a toy:
    the final states reached and how many runs got to the end (were not cut asleep)."""
    finals, complete, prefix = set(), 0, []
    while prefix is not None:
        ch = X.ExploreChooser(prefix, budget=budget, horizon=horizon, width=width, max_steps=1000,
                              reduction=reduction)
        eng = Engine(chooser=ch)
        toy = Toy(eng, steps)
        ch.attach(SimpleNamespace(engine=eng))
        try:
            eng.run()
            finals.add(toy.final())
            complete += 1
        except X.SleepCut:
            pass
        prefix = X.next_prefix(ch.trail, budget, 0, ch.asleep if ch.sleep_sets else None)
    return finals, complete


def test_sleep_sets_prune_commuting_steps_and_keep_every_trace(toy_footprints):
    # a, b, c at the same instant on disjoint locations; d at the same instant touches a's and b's.
    steps = [("a", 5, frozenset({"x"}), None), ("b", 5, frozenset({"y"}), None),
             ("c", 5, frozenset({"z"}), None), ("d", 5, frozenset({"x", "y"}), None)]
    for k in range(4):
        full, n_full = _toy_search(steps, k, "none")
        slept, n_sleep = _toy_search(steps, k, "sleep")
        assert slept == full, k
        if k >= 1:
            assert n_sleep < n_full, (k, n_sleep, n_full)


def test_steps_at_different_instants_are_not_independent(toy_footprints):
    # Running b (t=7) before a (t=5) delays a to t=7: not a reordering of the same steps, so it is
    # explored even though the footprints are disjoint.
    steps = [("a", 5, frozenset({"x"}), 3), ("b", 7, frozenset({"y"}), None)]
    _, n_full = _toy_search(steps, 2, "none")
    _, n_sleep = _toy_search(steps, 2, "sleep")
    assert n_sleep == n_full


def test_unaudited_events_are_dependent_on_everything():
    assert independence.footprint(SimpleNamespace(fn=lambda: None, args=())) is independence.EVERYTHING
    assert independence.footprint(object()) is independence.EVERYTHING     # a process step
    assert not independence.independent(independence.EVERYTHING, frozenset({"l0.pcpu:0"}))
    assert independence.independent(frozenset({"l0.pcpu:0"}), frozenset({"l0.pcpu:1"}))
    assert not independence.independent(frozenset({"l0.sched", "l0.pcpu:0"}), frozenset({"l0.sched"}))


_STEP = st.tuples(st.sampled_from([0, 0, 1, 2]), st.frozensets(st.sampled_from("xyz"), min_size=1, max_size=2),
                  st.sampled_from([None, None, 0, 1, 2]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_STEP, min_size=2, max_size=4), st.integers(0, 2))
def test_sleep_sets_reach_every_final_state_of_the_full_search(toy_footprints, raw, k):
    """Property: on random toys (steps at a few instants, random footprints, follow-up steps, also at the same instant),
    the sleep-set search reaches exactly the final states the full search reaches within K."""
    steps = [(chr(ord("a") + i), t, feet, follow) for i, (t, feet, follow) in enumerate(raw)]
    full, n_full = _toy_search(steps, k, "none")
    slept, n_sleep = _toy_search(steps, k, "sleep")
    assert slept == full and n_sleep <= n_full


def test_visited_table_keeps_sleep_sets():
    """A state explored with sleep set Z is cut later only with a superset of Z."""
    ch = X.ExploreChooser([], budget=2, horizon=0, width=2, max_steps=10, visited={}, reduction="sleep")
    ch.run = SimpleNamespace(engine=SimpleNamespace(now=100))
    ch.sleep = {(100, "doorbell"): frozenset({"l0.pcpu:0"})}
    ch._visit_with_sleep(b"s", 1)                 # first visit, Z = {doorbell}
    ch.sleep = {}
    ch._visit_with_sleep(b"s", 1)                 # Z = {} is not a superset: explored again
    with pytest.raises(X.Pruned):
        ch._visit_with_sleep(b"s", 1)             # now seen with {} and budget 1: cut
    ch.sleep = {(100, "doorbell"): frozenset({"l0.pcpu:0"})}
    with pytest.raises(X.Pruned):
        ch._visit_with_sleep(b"s", 0)             # superset, less budget: cut
    ch2 = X.ExploreChooser([], budget=2, horizon=0, width=2, max_steps=10, visited={}, reduction="sleep")
    ch2.run = ch.run
    ch2.sleep = {(100, "doorbell"): frozenset({"l0.pcpu:0"})}
    ch2._visit_with_sleep(b"t", 1)
    ch2.sleep = {(100, "host-ipi"): frozenset({"l0.pcpu:1"})}
    ch2._visit_with_sleep(b"t", 1)                # {doorbell} is not a subset of {host-ipi}: explored


# ---------------------------------------------------------------------------------------------
# Agreement on the model: every example and every mutant
# ---------------------------------------------------------------------------------------------
def _key(o: X.Outcome):
    v = o.violation
    return None if v is None else X.violation_key(v)


def _both(path: Path, *, k: int, design: str | None = None, mutant: str | None = None):
    scn = load_scenario(path)
    out = {}
    for r in ("none", "sleep"):
        out[r] = X.Explorer(scn, X.Options(preemptions=k, design=design, mutant=mutant, reduction=r)).run()
    return out["none"], out["sleep"]


def _assert_agree(none: X.Outcome, sleep: X.Outcome) -> None:
    assert _key(sleep) == _key(none)
    assert sleep.complete == none.complete
    assert sleep.progress.states <= none.progress.states
    assert sleep.progress.schedules <= none.progress.schedules


EXAMPLES = sorted(EX.glob("explore-*.toml")) + sorted((EX / "corpus").glob("*.toml"))
DEFAULT_EXAMPLES = {"explore-erratum1235.toml", "explore-erratum1235-shadow.toml", "explore-pingpong-zen4.toml",
                    "explore-nested-spin.toml", "avic-invalid-target.toml"}


def _design(path: Path) -> str | None:
    return "dummy" if path.name.startswith("explore-nested") else None


@pytest.mark.parametrize("path", [p if p.name in DEFAULT_EXAMPLES else pytest.param(p, marks=pytest.mark.slow)
                                  for p in EXAMPLES], ids=lambda p: p.stem)
def test_sleep_agrees_with_none_on_every_example(path):
    _assert_agree(*_both(path, k=1, design=_design(path)))


def _mutant_cases():
    """Every mutant on its declared scenario, design and bound (mutants without a scenario: the
    cases tests/check/test_explore.py and test_nested_explore.py run them on)."""
    pingpong = EX / "explore-pingpong-zen4.toml"
    # mutant -> (scenario, design, bound, kind) as test_explore.py / test_nested_explore.py run them
    cases = {"a": (pingpong, None, 3, "stuck"),
             "c": (EX / "explore-nested-spin.toml", "dummy", 0, "lost"),
             "d": (EX / "explore-nested-pingpong.toml", "shadow", 0, "stuck"),
             "e": (EX / "explore-nested-pingpong.toml", "shadow", 0, "lost"),
             "f": (EX / "explore-nested-broadcast.toml", "dummy", 0, "lost")}
    for m in mutants.MUTANTS.values():
        path, design, k, kind = cases.get(m.name, (ROOT / m.scenario if m.scenario else None, m.design, m.bound,
                                                   m.expect))
        assert path is not None, m.name
        marks = [pytest.mark.slow] if k > 1 else []
        yield pytest.param(m.name, path, design, k, kind, marks=marks, id=f"{m.name}-{m.alias}")


@pytest.mark.parametrize(("name", "path", "design", "k", "kind"), list(_mutant_cases()))
def test_sleep_finds_every_mutant_as_none_does(name, path, design, k, kind):
    none, sleep = _both(path, k=k, design=design, mutant=name)
    assert none.violation is not None and none.violation["kind"] == kind
    _assert_agree(none, sleep)


def test_cli_reduction_option_and_refusal_with_jobs(tmp_path):
    path = str(EX / "explore-erratum1235.toml")
    r = CliRunner().invoke(main, ["explore", path, "-k", "1", "--reduction", "sleep", "--json",
                                  "--schedule-out", str(tmp_path / "s.json")])
    assert r.exit_code == 1 and '"kind": "stuck"' in r.output
    r = CliRunner().invoke(main, ["explore", path, "--reduction", "sleep", "-j", "2"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--reduction sleep" in r.output
