"""Race-directed reduction (`navic explore --reduction dpor`): step footprints from observed writes
and declared interactions (navic/check/state.py, navic/check/independence.py).

* the relation: symmetric, conservative for interactions, shared state and a common agent;
* every declared interaction resolves to real code (a renamed function would silently drop out);
* the reduced and the full search agree — same violation (kind, CPU, vector) or the same clean
  verdict — on every example and every mutant, serially and with workers, and the reduction is
  real (fewer states on the nested ping-pong);
* without the declared interactions the reduced search misses a violation the full search finds:
  the declarations matter, and the agreement tests can fail;
* the state hash is unchanged by cutting the state into locations (the full search's counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from navic.check import explore as X
from navic.check import independence as I
from navic.check import mutants, state
from navic.cli import main
from navic.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
PINGPONG = EX / "explore-pingpong-zen4.toml"
NESTED = EX / "explore-nested-pingpong.toml"


# ---------------------------------------------------------------------------------------------
# The relation
# ---------------------------------------------------------------------------------------------
AGENTS = ["a", "b", "c"]
LOCS = ["x", "y", "z", "w"]


@st.composite
def footprints(draw):
    agents = frozenset(draw(st.sets(st.sampled_from(AGENTS), min_size=1, max_size=2)))
    writes = draw(st.sets(st.sampled_from(LOCS), max_size=3))
    owner = st.one_of(st.none(), st.sampled_from(AGENTS))
    owners = tuple((k, draw(owner), draw(owner)) for k in sorted(writes))
    return I.Footprint(agents, frozenset(writes), owners, draw(st.booleans()))


owner_maps = st.dictionaries(st.sampled_from(LOCS), st.one_of(st.none(), st.sampled_from(AGENTS)))


@given(footprints(), footprints(), owner_maps, owner_maps)
def test_independence_is_symmetric_and_conservative(x, y, ox, oy):
    ind = I.steps_independent(x, y, oy, ox)
    assert ind == I.steps_independent(y, x, ox, oy)
    if ind:
        assert x.local and y.local and not x.interaction and not y.interaction
        assert not (x.agents & y.agents)
        # nothing one wrote is the other's or shared at the other's time
        assert all(oy.get(k, "?") is not None and oy.get(k) not in y.agents for k in x.writes)
        assert all(ox.get(k, "?") is not None and ox.get(k) not in x.agents for k in y.writes)


def test_footprint_of_observed_writes_and_owners():
    before, after = state.Locations(), state.Locations()
    before.put("proc:a", 1, "a")
    before.put("vcpu0:b", 7, "b")
    before.put("sched0", 0, None)
    after.put("proc:a", 2, "a")
    after.put("vcpu0:b", 7, "b")
    after.put("sched0", 0, None)
    after.put("ev:a", (5,), "a")
    f = I.step_footprint(before, after, frozenset({"a"}), False)
    assert f.writes == {"proc:a", "ev:a"} and f.local
    after.values["vcpu0:b"] = 8       # a's step wrote b's vCPU: an interaction with b
    assert not I.step_footprint(before, after, frozenset({"a"}), False).local
    after.values["vcpu0:b"] = 7
    after.values["sched0"] = 1        # shared state written
    assert not I.step_footprint(before, after, frozenset({"a"}), False).local
    after.values["sched0"] = 0
    assert not I.step_footprint(before, after, frozenset({"a"}), True).local      # declared reads


def test_every_declared_interaction_resolves_to_code(monkeypatch):
    inter = I.Interactions()
    assert len(inter.targets) >= len(I.INTERACTIONS) and all(why for _spec, why in I.INTERACTIONS)
    from navic.hv.kvm import Kvm

    def replaced(self, vcpu, **kw):   # a test's (or a mutant's) replacement of a listed method
        return None

    monkeypatch.setattr(Kvm, "kvm_vcpu_kick", replaced)
    originals = [(o, n, getattr(o, n)) for o, n in inter.targets]
    inter.install()
    try:
        for o, n, f in originals:          # wrapped as they are now, while a run goes on ...
            assert getattr(o, n).__wrapped__ is f
        assert Kvm.kvm_vcpu_kick.__wrapped__ is replaced and replaced.__code__ in inter.codes
        inter.called = False
        Kvm.kvm_vcpu_kick(None, None)
        assert inter.called
    finally:
        inter.uninstall()
    for o, n, f in originals:              # ... and restored after
        assert getattr(o, n) is f


def test_location_owners_follow_the_pinned_threads():
    """Nested ping-pong: each L0 vCPU thread owns its vCPU, its pCPU, its L1 kernel CPU and the L2
    vCPU homed on it; schedulers and the logical table are shared."""
    scn = X.apply_design(load_scenario(NESTED), "dummy")
    seen = {}

    class Peek(X.ExploreChooser):
        def window(self, cands):
            if not seen:
                seen.update(state.locations(self.run, footprint=True).owners)
            return super().window(cands)

    X._simulate(scn, Peek([], budget=0, horizon=X.DEFAULT_HORIZON, width=3, max_steps=500))
    assert seen["vcpu0:l1.0"] == "l1.0" and seen["vcpu0:l1.1"] == "l1.1"
    assert seen["pcpu0:0"] == "l1.0" and seen["l1cpu:l1.1"] == "l1.1"
    assert seen["vcpu1:l2.0"] == "l1.0" and seen["vcpu1:l2.1"] == "l1.1"
    assert seen["lid0"] is None and all(v is None for k, v in seen.items() if k.startswith("inhibits"))


# ---------------------------------------------------------------------------------------------
# Agreement with the full search
# ---------------------------------------------------------------------------------------------
def _key(o: X.Outcome):
    v = o.violation
    return None if v is None else X.violation_key(v)


def _both(path: Path, *, k: int, design: str | None = None, mutant: str | None = None, jobs: int = 1):
    scn = load_scenario(path)
    return tuple(X.Explorer(scn, X.Options(preemptions=k, design=design, mutant=mutant, reduction=r,
                                           jobs=jobs)).run() for r in ("none", "dpor"))


def _assert_agree(none: X.Outcome, dpor: X.Outcome) -> None:
    assert (_key(dpor), dpor.complete) == (_key(none), none.complete)
    assert dpor.progress.states <= none.progress.states
    assert dpor.progress.schedules <= none.progress.schedules


EXAMPLES = sorted(EX.glob("explore-*.toml")) + sorted((EX / "corpus").glob("*.toml"))
FAST = {"explore-erratum1235.toml", "explore-erratum1235-shadow.toml", "explore-pingpong-zen4.toml",
        "explore-nested-spin.toml", "avic-invalid-target.toml", "explore-nested-pingpong.toml"}


def _design(path: Path) -> str | None:
    return "dummy" if path.name.startswith("explore-nested") else None


@pytest.mark.parametrize("path", [p if p.name in FAST else pytest.param(p, marks=pytest.mark.slow)
                                  for p in EXAMPLES], ids=lambda p: p.stem)
def test_dpor_agrees_with_none_on_every_example(path):
    _assert_agree(*_both(path, k=1, design=_design(path)))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_dpor_agrees_with_none_on_every_example_at_k2(path):
    _assert_agree(*_both(path, k=2, design=_design(path)))


def _mutant_cases():
    """Every mutant where tests/check/test_reduction.py runs it, at least one deviation deep."""
    cases = {"a": (PINGPONG, None, 3), "c": (EX / "explore-nested-spin.toml", "dummy", 1),
             "d": (NESTED, "shadow", 1), "e": (NESTED, "shadow", 1),
             "f": (EX / "explore-nested-broadcast.toml", "dummy", 1)}
    for m in mutants.MUTANTS.values():
        path, design, k = cases.get(m.name, (ROOT / m.scenario if m.scenario else None, m.design, max(1, m.bound)))
        marks = [pytest.mark.slow] if k > 3 else []
        yield pytest.param(m.name, path, design, k, marks=marks, id=f"{m.name}-{m.alias}")


@pytest.mark.parametrize(("name", "path", "design", "k"), list(_mutant_cases()))
def test_dpor_finds_every_mutant_as_none_does(name, path, design, k):
    none, dpor = _both(path, k=k, design=design, mutant=name)
    assert none.violation is not None
    _assert_agree(none, dpor)


def test_dpor_with_workers_gives_the_serial_result():
    serial = X.Explorer(load_scenario(PINGPONG), X.Options(preemptions=3, mutant="a", reduction="dpor")).run()
    par = X.Explorer(load_scenario(PINGPONG), X.Options(preemptions=3, mutant="a", reduction="dpor", jobs=2)).run()
    assert _key(par) == _key(serial) == ("stuck", "l1.1", 64)
    assert par.decisions == serial.decisions
    clean = _both(NESTED, k=1, design="dummy", jobs=2)
    assert clean[0].complete and clean[1].complete and clean[1].progress.states == _both(
        NESTED, k=1, design="dummy")[1].progress.states


def test_dpor_reduces_the_nested_pingpong():
    none, dpor = _both(NESTED, k=1, design="dummy")
    assert none.complete and dpor.complete
    assert dpor.progress.states < none.progress.states
    assert dpor.progress.schedules * 2 < none.progress.schedules


def test_without_the_declared_interactions_dpor_misses_a_violation(monkeypatch):
    """The canary: erase the declared reads and the race of mutant a (a lost AVIC kick) is taken
    for a commuting delay — the agreement tests above would then fail."""
    monkeypatch.setattr(I, "INTERACTIONS", ())
    monkeypatch.setattr(X, "_INTERACTIONS", None)
    none, dpor = _both(PINGPONG, k=3, mutant="a")
    assert _key(none) == ("stuck", "l1.1", 64)
    assert dpor.violation is None and dpor.complete


def test_full_search_counts_are_those_of_the_state_hash_before_locations():
    """Cutting the state into locations keeps the hash's partition: the full search's counts on
    the nested ping-pong at K = 1 are the ones recorded in docs/performance.md (2 693 states, 113
    schedules, dummy)."""
    o = X.Explorer(load_scenario(NESTED), X.Options(preemptions=1, design="dummy", reduction="none")).run()
    assert (o.progress.states, o.progress.schedules) == (2693, 113)


# ---------------------------------------------------------------------------------------------
# Front door and checkpoints
# ---------------------------------------------------------------------------------------------
def test_cli_dpor_json_and_jobs():
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "-k", "1", "--reduction", "dpor", "-j", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["complete"] is True and doc["violation"] is None


def test_dpor_checkpoint_keeps_the_race_sets_and_resumes(tmp_path):
    scn = load_scenario(PINGPONG)
    calls = []

    def stop(p: X.Progress) -> None:
        calls.append(p.schedules)
        if len(calls) == 15:
            raise KeyboardInterrupt

    ex = X.Explorer(scn, X.Options(preemptions=2, reduction="dpor"), on_progress=stop)
    first = ex.run()
    assert first.interrupted and first.position.races is not None
    assert len(first.position.races) == len(first.position.prefix)
    path = tmp_path / "ck.json"
    path.write_text(json.dumps(X.checkpoint_doc(ex, first)))
    pos = X.load_checkpoint(path, scn, X.Options(preemptions=2, reduction="dpor"))
    assert pos.races == first.position.races
    rest = X.Explorer(scn, X.Options(preemptions=2, reduction="dpor"), resume=pos).run()
    assert rest.complete and rest.violation is None
    doc = json.loads(path.read_text())
    doc["position"]["races"] = [["x"]]
    path.write_text(json.dumps(doc))
    with pytest.raises(X.ScheduleError, match="position.races"):
        X.load_checkpoint(path, scn, X.Options(preemptions=2, reduction="dpor"))


def test_delays_matter_dpor_keeps_them_and_the_untimed_variant_does_not():
    """Mutant e on the nested spin (dummy): one deviation that overtakes only independent steps
    delays l1.1 enough to reverse a later dependent pair (the IPI against the nested VMRUN that
    ignores it), and the IPI is lost. The full search and dpor (which searches a deviation whose
    delay exceeds a later dependent gap) find it at K = 1; dpor-untimed, which treats every delay
    of independent steps as equivalent, does not — the price of its larger reduction."""
    spin = EX / "explore-nested-spin.toml"
    none, dpor = _both(spin, k=1, design="dummy", mutant="e")
    assert _key(none) == _key(dpor) == ("lost", "l2.1", 240)
    untimed = X.Explorer(load_scenario(spin), X.Options(preemptions=1, design="dummy", mutant="e",
                                                        reduction="dpor-untimed")).run()
    assert untimed.violation is None and untimed.complete
    timed, untimed_clean = (X.Explorer(load_scenario(NESTED), X.Options(preemptions=1, design="dummy",
                                                                        reduction=r)).run()
                            for r in ("dpor", "dpor-untimed"))
    assert timed.complete and untimed_clean.complete
    assert untimed_clean.progress.schedules < timed.progress.schedules


def test_frontier_counts_only_the_alternatives_that_race():
    trail = [("window", ["a", "b"], 0, 0), ("window", ["a", "b", "c"], 0, 0), ("window", ["a", "b"], 0, 0)]
    assert X.frontier(trail, 1) == 4
    assert X.frontier(trail, 1, races=[frozenset(), frozenset({2}), None]) == 2
    assert X.next_prefix(trail, 1, races=[frozenset(), frozenset({2}), frozenset()]) == [0, 2]
    assert X.next_prefix(trail, 1, races=[frozenset(), frozenset(), frozenset()]) is None


def test_bench_agreement_script_reports_every_pair():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "bench/explore_agreement.py", "--mutant", "p", "--k", "0", "-j", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("pairs ") and "differ 0" in last and "time-outs 0" in last
    n = int(last.split()[1].rstrip(","))
    assert n == len(EXAMPLES) + 2 * sum(1 for x in EXAMPLES if x.name.startswith("explore-nested"))
