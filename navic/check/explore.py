"""The interleaving explorer: systematic search over a scenario's schedules (``navic explore``).

Method (docs/verification.md has the full description and the bounds):

* **Schedules.** The engine runs in *window mode* (:mod:`navic.sim.engine`): before every atomic
  step it offers the next events of up to ``width`` distinct agents (vCPU threads, doorbell/IPI
  arrivals, timers, scheduler ticks ...) whose time is within ``horizon`` cycles of the earliest.
  Alternative 0 is the time-order schedule; running another candidate *delays* the earlier agents
  (they run late). Model-level alternatives (``engine.choose``, e.g. erratum 1235's stale
  IsRunning read) are decision points too.
* **Bounding.** Iterative preemption bounding in the style of CHESS: bound k = 0, 1, ..., K; a
  schedule's cost is its number of deviations from the default (every non-default window pick or
  model alternative costs 1). Each bound is searched depth-first and statelessly: a run is
  re-executed from the start with a prefix of decisions, and the next prefix is found by
  backtracking to the deepest decision point with an untried alternative that fits the bound.
  Runs stop after ``max_steps`` engine steps.
* **State hashing** (:mod:`navic.check.state`). At every decision point past the forced prefix the
  explorer hashes the system state (APIC/backing pages, VMCBs, the physical APIC ID table,
  vCPU/pCPU/scheduler state, the erratum window, pending acceptances, guest state, every process's
  position, and the queue of pending events relative to now; in nested runs also L1's KVM — its
  vCPUs, scheduler and AVIC tables —, the L1 kernel's threads and handler frames, vmcb02s and the
  design's tables). A state already reached in this bound with at least as much remaining budget
  is not explored again (the run is cut there).
* **Sleep sets** (``reduction="sleep"``, serial only): the time-order candidate overtaken by an
  independent same-instant step (:mod:`navic.check.independence`) sleeps until a dependent or
  event-scheduling step runs; a run whose default is asleep is cut; visited states keep their
  sleep sets (docs/verification.md, "Partial-order reduction: sleep sets").
* **DPOR** (``reduction="dpor"``, serial and parallel): a deviation is searched only where the
  step it brings forward races with a step it overtakes; footprints are the locations a step
  wrote (:mod:`navic.check.state`, observed between decision points) with their owners, plus the
  declared interaction code (:data:`navic.check.independence.INTERACTIONS`); see
  :meth:`ExploreChooser.finish` and docs/verification.md ("Partial-order reduction: DPOR").
* **Checks.** Every complete run goes through the oracle (stuck, lost) and the provenance checks
  (duplicated, misrouted, never accepted) exactly as ``navic run`` does.
* **Counterexamples.** The first violating schedule is minimised (delta debugging over its
  non-default decisions, keeping those needed for the same violation kind, CPU and vector) and
  written as a schedule file that ``navic run SCENARIO --schedule FILE`` replays.
* **Parallel, checkpoints.** :meth:`Explorer.search` searches one subtree of prefixes; with
  ``jobs > 1`` or a dask ``scheduler`` :mod:`navic.check.parallel` hands the subtrees of each bound
  (one per first deviation) to workers. An interrupted search returns its :class:`Position`,
  which :func:`checkpoint_doc` writes and :func:`load_checkpoint` reads back for ``resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from navic.check import independence, state
from navic.config import Scenario
from navic.sim.chooser import Chooser, ReplayChooser
from navic.sim.engine import Handle, _label

SCHEDULE_FORMAT = 1
DESIGNS = ("none", "shadow", "dummy", "shadow-x2avic", "runcache")

DEFAULT_MAX_STEPS = 20_000
DEFAULT_PREEMPTIONS = 2
DEFAULT_HORIZON = 6_000   # cycles (2 µs at 3 GHz)
DEFAULT_WIDTH = 3


class Pruned(Exception):
    """Raised inside a run when it reaches a state already explored with at least this budget."""


class SleepCut(Pruned):
    """Raised inside a run (``reduction="sleep"``) when its default continuation is asleep: the
    time-order candidate commutes with the step just taken and its subtree was explored from the
    earlier decision point. The decision point is on the trail, so its other alternatives are
    still searched."""

REDUCTIONS = ("none", "sleep", "dpor", "dpor-untimed")
DPOR = ("dpor", "dpor-untimed")


# ---------------------------------------------------------------------------------------------
# State hashing: navic.check.state (the state as owned locations)
# ---------------------------------------------------------------------------------------------
_pc = state._pc
TIME_LOCALS = state.TIME_LOCALS
state_hash = state.state_hash


# ---------------------------------------------------------------------------------------------
# The exploring chooser
# ---------------------------------------------------------------------------------------------
class ExploreChooser(Chooser):
    """Drives one run: forced decisions for the first ``len(prefix)`` decision points, the default
    (0) after that; records every decision point in :attr:`trail` as (kind, labels, chosen, cost
    before). With ``visited`` it hashes the state at each new decision point and raises
    :class:`Pruned` when that state was already explored with at least the remaining budget."""

    wants_window = True

    def __init__(self, prefix: list[int], *, budget: int, horizon: int, width: int, max_steps: int,
                 visited: dict[bytes, Any] | None = None, all_states: set[bytes] | None = None,
                 leaf_hashing: bool = True, reduction: str = "none",
                 prefix_races: list[frozenset[int] | None] | None = None,
                 interactions: independence.Interactions | None = None) -> None:
        self.prefix = prefix
        # "dpor": deviations only where the overtaking step races (docs/verification.md,
        # "Partial-order reduction: DPOR"). races[i]: the alternatives worth trying at decision
        # point i (None: all); for the forced prefix they come from the run that first reached
        # each point, for the rest they are computed by finish() from this run's footprints.
        self.dpor = reduction in DPOR
        # "dpor" also searches a deviation whose delay could reverse a later dependent pair;
        # "dpor-untimed" treats every delay of independent steps as equivalent (more reduction).
        self.timed = reduction == "dpor"
        self.races: list[frozenset[int] | None] = list(prefix_races or [])[:len(prefix)]
        self.races += [None] * (len(prefix) - len(self.races))   # unknown: every alternative
        self.interactions = interactions
        # Per new decision point, the owners of the locations (one dict shared while they do not
        # change); only the last point's footprint values are kept, to diff the next one against.
        self._owners: list[dict[str, str | None]] = []
        self._last: state.Locations | None = None
        self._feet: list[independence.Footprint] = []   # per interval between them
        self._agents: set[str] = set()         # who stepped since the last decision point
        self._current: str | None = None       # who is stepping now (a "choose" point is mid-step)
        self._times: list[tuple[int, list[int] | None]] = []   # per new point: now, candidates' times
        self._window_times: list[int] | None = None
        if self.dpor:
            self.stepped = self._stepped
        # "sleep": sleep sets (docs/verification.md, "Partial-order reduction: sleep sets").
        self.sleep_sets = reduction == "sleep"
        self.sleep: dict[tuple[int, str], frozenset[str]] = {}   # (time, label) -> footprint
        self.asleep: list[frozenset[int]] = []    # per trail entry: the candidates asleep there
        self._steps_seen = -1                     # engine.steps at the last window
        self._seq_seen = -1                       # engine._seq (events ever scheduled) then
        # False: no hashing where no deviation is left (the rest of the run is the default
        # continuation, cheaper to simulate than to hash; same schedules, same verdicts).
        self.leaf_hashing = leaf_hashing
        self.budget = budget
        self.horizon = horizon
        self.width = width
        self.max_steps = max_steps
        self.visited = visited
        self.all_states = all_states if all_states is not None else set()
        self.trail: list[tuple[str, list[str], int, int]] = []
        self.cost = 0
        self.run: Any = None
        self.new_states = 0

    def attach(self, run: Any) -> None:
        self.run = run
        if self.dpor and self.interactions is not None:
            self.interactions.install()
            self.interactions.called = False

    def detach(self) -> None:
        """The end of a run (whatever ended it): the interaction wrappers come off."""
        if self.interactions is not None:
            self.interactions.uninstall()

    stepped: Callable[[str], None] | None = None   # the engine's per-step hook (dpor only)

    def _stepped(self, label: str) -> None:
        self._agents.add(label)
        self._current = label

    def _footprint_point(self, kind: str, snap: state.Locations) -> None:
        """dpor: at a decision point past the prefix, close the interval since the previous one
        (what was written, by whom) and keep the footprint view of the locations."""
        if self._last is not None:
            self._close_interval(snap)
        self._last = snap
        owners = snap.owners
        if self._owners and self._owners[-1] == owners:
            owners = self._owners[-1]
        self._owners.append(owners)
        self._times.append((self.run.engine.now, self._window_times if kind == "window" else None))
        self._agents = {self._current} if kind == "choose" and self._current is not None else set()

    def _close_interval(self, snap: Any) -> None:
        inter = self.interactions
        called = inter is not None and inter.called
        if inter is not None:
            inter.called = False
        prev = self._last
        assert prev is not None
        foot = independence.step_footprint(prev, snap, frozenset(self._agents), called)
        if inter is not None and not foot.interaction and any(
                inter.in_stack(s.values[k]) for s in (prev, snap) for k in s.frame_keys()
                if k in foot.writes or s.owners[k] in foot.agents):
            foot = dataclasses.replace(foot, interaction=True)
        self._feet.append(foot)

    def finish(self) -> None:
        """dpor: at the end of the run (or where it was cut), the race sets of the decision points
        past the prefix. Alternative j at point i is searched when

        * the first steps of its agent after i depend on a step they would overtake
          (:func:`independence.steps_independent`), or
        * the delay it imposes on the overtaken agents (its time minus the default's) exceeds the
          time between two dependent steps of different agents later in the run, which the
          delay could then reverse (:meth:`_reversible_gaps`; a cut run's unseen rest counts as
          a gap of 0)."""
        if not self.dpor or not self._owners or self.run is None:
            return
        base = len(self.prefix)
        points = len(self.trail) - base
        cut = len(self._owners) > points     # cut at a visited state: the rest of the run is unseen
        if not cut:                          # the last interval runs to the end
            self._close_interval(state.locations(self.run, footprint=True).footprint())
        feet, owners = self._feet, self._owners
        gaps = self._reversible_gaps(cut) if self.timed else []
        # For each interval m and agent B stepping in it: the latest interval k < m since B's
        # previous step that m depends on (-1: none). B's step at m, brought forward to a point n
        # after B's previous step, overtakes exactly the intervals n..m-1.
        last_dep: dict[tuple[int, str], int] = {}
        for m, fm in enumerate(feet):
            for agent in fm.agents:
                k = m - 1
                while k >= 0 and agent not in feet[k].agents:
                    if not independence.steps_independent(feet[k], fm, owners[m], owners[k]):
                        break
                    k -= 1
                last_dep[(m, agent)] = k if k >= 0 and agent not in feet[k].agents else -1
        nxt: dict[str, int] = {}                 # agent -> its first interval at or after n
        out: list[frozenset[int] | None] = [None] * points
        for n in range(points - 1, -1, -1):
            if n < len(feet):
                for agent in feet[n].agents:
                    nxt[agent] = n
            kind, labels, _c, _cost = self.trail[base + n]
            now, times = self._times[n]
            if kind != "window" or times is None:
                continue
            racing = set()
            t0 = max(times[0], now)
            for j in range(1, len(labels)):
                if self.timed and max(times[j], now) - t0 > gaps[n]:
                    racing.add(j)
                    continue
                m = nxt.get(labels[j])
                if m is None or m == n or last_dep[(m, labels[j])] >= n:
                    racing.add(j)
            out[n] = frozenset(racing)
        self.races.extend(out)

    def _reversible_gaps(self, cut: bool) -> list[float]:
        """Per interval n: the smallest time between two dependent intervals x < y of disjoint
        agents with x >= n (looked for within ``horizon`` of x: a delay is less than that)."""
        feet, owners, times = self._feet, self._owners, self._times
        start = [max(ts[self.trail[len(self.prefix) + k][2]], now) if ts is not None else now
                 for k, (now, ts) in enumerate(times[:len(feet)])]
        inf = float("inf")
        g = [inf] * len(feet)
        for x in range(len(feet)):
            for y in range(x + 1, len(feet)):
                gap = start[y] - start[x]
                if gap >= self.horizon:
                    break
                if not (feet[x].agents & feet[y].agents) and not independence.steps_independent(
                        feet[x], feet[y], owners[y], owners[x]):
                    g[x] = gap
                    break
            else:
                if cut:
                    g[x] = 0
        out = [inf] * (len(feet) + 1)
        for x in range(len(feet) - 1, -1, -1):
            out[x] = min(g[x], out[x + 1])
        return out

    def _decide(self, kind: str, labels: list[str], asleep: frozenset[int] = frozenset()) -> int:
        i = len(self.trail)
        if i < len(self.prefix):
            c = self.prefix[i]
        else:
            c = 0
            locs = None
            if self.dpor and self.run is not None:
                locs = state.locations(self.run, footprint=True)   # one pass: hash and footprint
                self._footprint_point(kind, locs.footprint())
            if self.visited is not None and self.run is not None and (self.leaf_hashing or self.cost < self.budget):
                h = state_hash(self.run, locs)
                remaining = self.budget - self.cost
                if self.sleep_sets:
                    self._visit_with_sleep(h, remaining)
                else:
                    seen = self.visited.get(h)
                    if seen is not None and seen >= remaining:
                        raise Pruned
                    if seen is None:
                        self.new_states += 1
                        self.all_states.add(h)
                    self.visited[h] = remaining
            elif self.visited is None or self.run is None:
                self.new_states += 1
        self.trail.append((kind, labels, c, self.cost))
        self.asleep.append(asleep)
        if c in asleep:
            raise SleepCut
        if c:
            self.cost += 1
        return c

    def _visit_with_sleep(self, h: bytes, remaining: int) -> None:
        """The visited table under sleep sets: a state is cut only if it was explored with at least
        this budget *and* a sleep set that is a subset of the current one (what that visit left
        out, this one leaves out too). Sleep sets are keyed relative to now, like the hash."""
        now = self.run.engine.now
        mine = frozenset((t - now, label) for t, label in self.sleep)
        visited = self.visited
        assert visited is not None
        entries = visited.get(h)
        if entries is None:
            self.new_states += 1
            self.all_states.add(h)
            visited[h] = entries = []
        elif any(r >= remaining and z <= mine for r, z in entries):
            raise Pruned
        entries.append((remaining, mine))

    def window(self, candidates: list[tuple[int, str]]) -> int:
        labels = [c[1] for c in candidates]
        if self.dpor:
            self._window_times = [c[0] for c in candidates]
        if not self.sleep_sets or self.run is None:
            return self._decide("window", labels)
        eng = self.run.engine
        if eng.steps != self._steps_seen + 1 or eng._seq != self._seq_seen:
            # Steps ran that no window showed us, or the step just taken scheduled an event (its
            # order among simultaneous events would differ in the swapped run): forget.
            self.sleep = {}
        self._steps_seen = eng.steps
        self._seq_seen = eng._seq
        now = eng.now
        asleep = frozenset(j for j, (t, label) in enumerate(candidates) if (t, label) in self.sleep)
        c = self._decide("window", labels, asleep)
        feet = [_footprint(eng, t, label) for t, label in candidates]
        self.sleep = _child_sleep(self.sleep, candidates, feet, c, now)
        return c

    def choose(self, label: str, n: int, weights: list[float] | None = None) -> int:
        return self._decide("choose", [label] * n)

    def decisions(self) -> list[list[Any]]:
        """The non-default decisions of this run in schedule-file form [kind, label, index, at]."""
        out: list[list[Any]] = []
        for at, (kind, labels, c, _cost) in enumerate(self.trail):
            if c:
                out.append([kind, labels[c], c, at])
        return out


def _footprint(eng: Any, t: int, label: str) -> frozenset[str]:
    """The declared footprint (:mod:`navic.check.independence`) of the pending event the window
    showed as (time, label): the earliest live queue entry with that time and label, as the
    window takes the earliest event of each agent."""
    for e in sorted(eng._q):
        if e[0] == t and _label(e[2]) == label and not (type(e[2]) is Handle and e[2].cancelled):
            return independence.footprint(e[2])
    return independence.EVERYTHING


def _child_sleep(sleep: dict[tuple[int, str], frozenset[str]], candidates: list[tuple[int, str]],
                 feet: list[frozenset[str]], c: int, now: int) -> dict[tuple[int, str], frozenset[str]]:
    """Godefroid's sleep-set rule for running candidate ``c``, restricted for the preemption
    bound: the events asleep here and — of the candidates tried before ``c`` at this decision
    point — only the time-order one (index 0, whose subtree costs no deviation to enter) stay
    asleep after it, iff they are independent of it *and* run at the same instant (``max(time,
    now)`` equal), so that swapping the two changes no event's time. A sibling ``j > 0`` is not
    put to sleep: its representative would cost one deviation more (docs/verification.md)."""
    t_c, _ = candidates[c]
    eff = max(t_c, now)
    fc = feet[c]
    out: dict[tuple[int, str], frozenset[str]] = {}
    if c > 0:
        sleep.setdefault(candidates[0], feet[0])
    for (t, label), f in sleep.items():
        if (t, label) != candidates[c] and max(t, now) == eff and independence.independent(f, fc):
            out[(t, label)] = f
    return out


def next_prefix(trail: list[tuple[str, list[str], int, int]], budget: int, floor: int = 0,
                asleep: list[frozenset[int]] | None = None,
                races: list[frozenset[int] | None] | None = None) -> list[int] | None:
    """Depth-first backtracking: the deepest decision point (at or after ``floor``: the points
    before it are a subtree's fixed root) with an untried alternative that keeps the schedule
    within ``budget`` deviations (and, with sleep sets, is not asleep there; with dpor, races)."""
    for i in range(len(trail) - 1, floor - 1, -1):
        _kind, labels, c, cost_before = trail[i]
        if cost_before + 1 > budget:
            continue
        skip = asleep[i] if asleep is not None else frozenset()
        worth = races[i] if races is not None and i < len(races) else None
        for n in range(c + 1, len(labels)):
            if n not in skip and (worth is None or n in worth):
                return [t[2] for t in trail[:i]] + [n]
    return None


def frontier(trail: list[tuple[str, list[str], int, int]], budget: int, floor: int = 0,
             races: list[frozenset[int] | None] | None = None) -> int:
    """How many untried alternatives within ``budget`` the current DFS path still has (the
    progress line's "frontier"; each is the root of a subtree still to search; with dpor, only
    the alternatives that race)."""
    n = 0
    for i in range(floor, len(trail)):
        _k, labels, c, cost = trail[i]
        if cost + 1 > budget:
            continue
        worth = races[i] if races is not None and i < len(races) else None
        n += sum(1 for a in range(c + 1, len(labels)) if worth is None or a in worth)
    return n


# ---------------------------------------------------------------------------------------------
# Scenario handling: designs, mutants, running
# ---------------------------------------------------------------------------------------------
def apply_design(scn: Scenario, design: str | None) -> Scenario:
    """``--design`` overrides ``[l0] nested_apicv`` (the nested APIC design L0 uses for L2)."""
    if design is None:
        return scn
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; expected one of {', '.join(DESIGNS)}")
    return dataclasses.replace(scn, l0=dataclasses.replace(scn.l0, nested_apicv=design))


@contextlib.contextmanager
def _mutant(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    from navic.check.mutants import active

    with active(name):
        yield


_INTERACTIONS: independence.Interactions | None = None


@contextlib.contextmanager
def tracking(reduction: str) -> Iterator[independence.Interactions | None]:
    """With a dpor reduction: the declared interaction code (:data:`independence.INTERACTIONS`),
    which each run's chooser installs once the system is built (:meth:`ExploreChooser.attach`)
    and removes at its end (:meth:`ExploreChooser.detach`); otherwise nothing."""
    global _INTERACTIONS
    if reduction not in DPOR:
        yield None
        return
    if _INTERACTIONS is None:
        _INTERACTIONS = independence.Interactions()
    try:
        yield _INTERACTIONS
    finally:
        _INTERACTIONS.uninstall()


def violation_key(v: dict[str, Any]) -> tuple[Any, Any, Any]:
    return (v.get("kind"), v.get("cpu"), v.get("vector"))


def _simulate(scn: Scenario, chooser: Chooser) -> Any:
    from navic import runner

    return runner.simulate(scn, chooser=chooser)


@dataclasses.dataclass
class Options:
    max_steps: int = DEFAULT_MAX_STEPS
    preemptions: int = DEFAULT_PREEMPTIONS
    horizon: int = DEFAULT_HORIZON
    width: int = DEFAULT_WIDTH
    hashing: bool = True
    leaf_hashing: bool = True         # False: do not hash where the budget is spent (see ExploreChooser)
    mutant: str | None = None
    design: str | None = None
    time_limit: float | None = None
    jobs: int = 1                     # local worker processes (navic.check.parallel when > 1)
    reduction: str = "dpor"           # "sleep": sleep sets; "dpor": race-directed (navic.check.independence)
    scheduler: Any = None             # a dask.distributed scheduler address or Client


@dataclasses.dataclass
class Progress:
    bound: int = 0
    states: int = 0
    schedules: int = 0
    pruned: int = 0
    truncated: int = 0
    seconds: float = 0.0
    complete_bound: int = -1   # highest bound whose space was exhausted
    frontier: int = 0          # subtrees still to search in this bound (DFS alternatives or tasks)

    @property
    def rate(self) -> float:
        """States per second so far."""
        return self.states / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class Position:
    """Where a search stands, for a resumable checkpoint: the bound being searched and either the
    DFS prefix about to run (serial) or the finished subtree tasks (parallel)."""
    bound: int = 0
    prefix: list[int] | None = None
    done_tasks: list[list[int]] = dataclasses.field(default_factory=list)
    races: list[list[int] | None] | None = None   # dpor: the prefix's race sets


def _races_doc(races: list[frozenset[int] | None] | None) -> list[list[int] | None] | None:
    return None if races is None else [None if r is None else sorted(r) for r in races]


def _races_load(doc: Any) -> list[frozenset[int] | None] | None:
    return None if doc is None else [None if r is None else frozenset(int(x) for x in r) for r in doc]


@dataclasses.dataclass
class Outcome:
    progress: Progress
    complete: bool
    interrupted: bool = False
    timed_out: bool = False
    violation: dict[str, Any] | None = None
    decisions: list[list[Any]] | None = None      # minimised
    raw_decisions: list[list[Any]] | None = None  # as found
    schedule_file: str | None = None
    replay_ok: bool | None = None
    position: Position | None = None              # where an interrupted search stopped
    checkpoint_file: str | None = None

    def as_json(self) -> dict[str, Any]:
        p = self.progress
        doc: dict[str, Any] = {
            "states": p.states,
            "schedules": p.schedules,
            "seconds": round(p.seconds, 3),
            "complete": self.complete,
            "violation": None,
        }
        if self.violation is not None:
            v = self.violation
            doc["violation"] = {"kind": v.get("kind"), "cpu": v.get("cpu"), "vector": v.get("vector"),
                                "detail": v.get("detail"), "schedule_file": self.schedule_file}
        if self.checkpoint_file is not None:
            doc["checkpoint_file"] = self.checkpoint_file
        return doc


@dataclasses.dataclass
class Found:
    """A violating run found by :meth:`Explorer.search`."""
    violation: dict[str, Any]
    decisions: list[list[Any]]


class Explorer:
    def __init__(self, scn: Scenario, opts: Options, *,
                 on_progress: Callable[[Progress], None] | None = None,
                 resume: Position | None = None) -> None:
        self.scn = apply_design(scn, opts.design)
        self.opts = opts
        self.on_progress = on_progress
        self.resume = resume
        # Width >= 2 keeps the numbering of decision points the same for every bound (and replay).
        self.width = max(2, opts.width)
        self.all_states: set[bytes] = set()
        self.position = Position()
        self.interactions: independence.Interactions | None = None   # dpor, while searching

    def _chooser(self, prefix: list[int], budget: int, visited: dict[bytes, int] | None,
                 races: list[frozenset[int] | None] | None = None) -> ExploreChooser:
        o = self.opts
        return ExploreChooser(prefix, budget=budget, horizon=o.horizon, width=self.width,
                              max_steps=o.max_steps, visited=visited, all_states=self.all_states,
                              leaf_hashing=o.leaf_hashing, reduction=o.reduction,
                              prefix_races=races, interactions=self.interactions)

    def replay_chooser(self, decisions: list[list[Any]]) -> ReplayChooser:
        o = self.opts
        return ReplayChooser(decisions, window=True, horizon=o.horizon, width=self.width, max_steps=o.max_steps)

    def search(self, bound: int, prefix: list[int], prog: Progress, *, floor: int = 0,
               visited: dict[bytes, int] | None = None, deadline: float | None = None,
               start: float = 0.0, races: list[frozenset[int] | None] | None = None) -> Found | None:
        """Depth-first search of the schedules within ``bound`` deviations that begin with
        ``prefix`` and then backtrack no higher than decision point ``floor`` (``floor = 0``: the
        whole bound; a parallel worker searches one subtree). Counts go to ``prog``; raises
        :class:`TimeoutError` past ``deadline`` (``self.position`` then says where it stood).
        ``races``: with dpor, the race sets of the prefix's decision points."""
        cur: list[int] | None = prefix
        while cur is not None:
            self.position.prefix = cur
            self.position.races = _races_doc(races)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
            ch = self._chooser(cur, bound, visited, races)
            try:
                run = _simulate(self.scn, ch)
            except Pruned:
                run = None
                prog.pruned += 1
            finally:
                ch.detach()
            ch.finish()
            prog.schedules += 1
            prog.states = len(self.all_states) if visited is not None else prog.states + ch.new_states
            if run is not None:
                if run.engine.truncated:
                    prog.truncated += 1
                if run.recorder.violations:
                    return Found(run.recorder.violations[0], ch.decisions())
            cur = next_prefix(ch.trail, bound, floor, ch.asleep if ch.sleep_sets else None,
                              ch.races if ch.dpor else None)
            races = ch.races[:len(cur)] if cur is not None and ch.dpor else None
            prog.seconds = time.monotonic() - start
            if self.on_progress is not None:
                prog.frontier = frontier(ch.trail, bound, floor, ch.races if ch.dpor else None)
                self.on_progress(prog)
        return None

    def run(self) -> Outcome:
        o = self.opts
        if o.jobs > 1 or o.scheduler is not None:
            from navic.check import parallel

            if o.reduction == "sleep":
                raise ValueError("--reduction sleep is not supported with --jobs/--scheduler (the parallel "
                                 "search splits subtrees without their sleep sets); use -j 1")
            with tracking(o.reduction) as self.interactions:
                return parallel.run(self)
        with tracking(o.reduction) as self.interactions:
            return self._run_serial()

    def _run_serial(self) -> Outcome:
        o = self.opts
        prog = Progress()
        start = time.monotonic()
        deadline = start + o.time_limit if o.time_limit is not None else None
        first = self.resume.bound if self.resume is not None else 0
        found: Found | None = None
        try:
            with _mutant(o.mutant):
                for bound in range(first, o.preemptions + 1):
                    prog.bound = self.position.bound = bound
                    prog.complete_bound = bound - 1
                    visited: dict[bytes, int] | None = {} if o.hashing else None
                    resumed = self.resume is not None and bound == first
                    prefix = list(self.resume.prefix or []) if resumed else []
                    races = _races_load(self.resume.races) if resumed else None
                    found = self.search(bound, prefix, prog, visited=visited, deadline=deadline, start=start,
                                        races=races)
                    if found is not None:
                        break
                    prog.complete_bound = bound
                return self.finish(prog, found, start)
        except TimeoutError:
            prog.seconds = time.monotonic() - start
            return Outcome(prog, complete=False, timed_out=True, position=self.position)
        except KeyboardInterrupt:
            prog.seconds = time.monotonic() - start
            return Outcome(prog, complete=False, interrupted=True, position=self.position)

    def finish(self, prog: Progress, found: Found | None, start: float) -> Outcome:
        """The outcome of a search that ran to its end: complete, or the violation found with its
        schedule minimised (serial and parallel searches alike)."""
        prog.seconds = time.monotonic() - start
        if found is None:
            return Outcome(prog, complete=True)
        outcome = Outcome(prog, complete=False, violation=found.violation, raw_decisions=found.decisions)
        outcome.decisions = self.minimize(found.decisions, found.violation)
        prog.seconds = time.monotonic() - start
        return outcome

    # -- counterexamples ----------------------------------------------------------------------
    def reproduces(self, decisions: list[list[Any]], want: tuple[Any, Any, Any]) -> list[list[Any]] | None:
        """Replay ``decisions``; the decisions actually applied if the run shows violation ``want``."""
        ch = self.replay_chooser(decisions)
        run = _simulate(self.scn, ch)
        if any(violation_key(v) == want for v in run.recorder.violations):
            return [list(d) for d in ch.log]
        return None

    def minimize(self, decisions: list[list[Any]], violation: dict[str, Any]) -> list[list[Any]]:
        """ddmin (Zeller & Hildebrandt) over the non-default decisions."""
        want = violation_key(violation)
        with _mutant(self.opts.mutant):
            cur = self.reproduces(decisions, want)
            if cur is None:   # should not happen: the run is deterministic
                return decisions
            n = 2
            while len(cur) >= 2:
                chunk = max(1, len(cur) // n)
                subsets = [cur[i:i + chunk] for i in range(0, len(cur), chunk)]
                reduced = False
                for i in range(len(subsets)):
                    complement = [d for j, s in enumerate(subsets) if j != i for d in s]
                    got = self.reproduces(complement, want)
                    if got is not None and len(got) < len(cur):
                        cur, n, reduced = got, max(n - 1, 2), True
                        break
                if not reduced:
                    if n >= len(cur):
                        break
                    n = min(len(cur), 2 * n)
            if len(cur) == 1:
                got = self.reproduces([], want)
                if got is not None:
                    cur = got
            return cur

    def schedule_doc(self, path: str | Path, outcome: Outcome) -> dict[str, Any]:
        src = Path(self.scn.source) if self.scn.source else None
        sha = hashlib.sha256(src.read_bytes()).hexdigest() if src is not None and src.is_file() else None
        return {
            "navic_schedule": SCHEDULE_FORMAT,
            "scenario": str(src) if src is not None else None,
            "scenario_sha256": sha,
            "design": self.scn.l0.nested_apicv,
            "mutant": self.opts.mutant,
            "engine": {"mode": "window", "horizon": self.opts.horizon, "width": self.width,
                       "max_steps": self.opts.max_steps},
            "violation": {k: outcome.violation.get(k) for k in ("kind", "cpu", "vector", "detail")}
            if outcome.violation else None,
            "decisions": outcome.decisions or [],
        }


# ---------------------------------------------------------------------------------------------
# Schedule files
# ---------------------------------------------------------------------------------------------
class ScheduleError(ValueError):
    pass


def write_schedule(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def load_schedule(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ScheduleError(f"{path}: cannot read schedule: {exc}") from None
    if isinstance(doc, list):   # a bare decision list (sequential ReplayChooser form)
        return {"decisions": doc, "engine": {"mode": "ties"}}
    if not isinstance(doc, dict) or not isinstance(doc.get("decisions"), list):
        raise ScheduleError(f"{path}: not a navic schedule (expected an object with 'decisions')")
    return doc


def schedule_chooser(doc: dict[str, Any]) -> ReplayChooser:
    eng = doc.get("engine") or {}
    if eng.get("mode") == "window":
        return ReplayChooser(doc["decisions"], window=True, horizon=int(eng.get("horizon", 0)),
                             width=int(eng.get("width", 0)), max_steps=int(eng.get("max_steps", 0)))
    return ReplayChooser([tuple(d) for d in doc["decisions"]])


def scenario_for_schedule(scn: Scenario, doc: dict[str, Any]) -> Scenario:
    design = doc.get("design")
    if design and design != scn.l0.nested_apicv:
        scn = apply_design(scn, design)
    return scn


def replay(scn: Scenario, doc: dict[str, Any], *, trace: bool = False) -> Any:
    """Run ``scn`` under a schedule document (with its design and mutant), as ``navic run
    --schedule`` does; returns the :class:`navic.runner.Run`."""
    from navic import runner

    scn = scenario_for_schedule(scn, doc)
    with _mutant(doc.get("mutant")):
        return runner.simulate(scn, chooser=schedule_chooser(doc), trace=trace)


def check_replay(scn: Scenario, path: str | Path, violation: dict[str, Any]) -> bool:
    """Does replaying the schedule file reproduce ``violation`` (kind, CPU, vector)?"""
    doc = load_schedule(path)
    run = replay(scn, doc)
    want = violation_key(violation)
    return any(violation_key(v) == want for v in run.recorder.violations)


# ---------------------------------------------------------------------------------------------
# Checkpoints (an interrupted search resumes where it stopped: `navic explore --resume FILE`)
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = 1
_RESUME_KEYS = ("max_steps", "preemptions", "horizon", "width", "hashing", "mutant", "design", "reduction")


def checkpoint_doc(explorer: Explorer, outcome: Outcome) -> dict[str, Any]:
    """A resumable checkpoint of an interrupted or timed-out search: the scenario (and its sha256),
    the bounds that define the search, the position (bound + DFS prefix, or finished tasks) and
    the counts so far. Visited states are not saved: a resumed search re-explores some states,
    which costs time but never coverage."""
    src = Path(explorer.scn.source) if explorer.scn.source else None
    sha = hashlib.sha256(src.read_bytes()).hexdigest() if src is not None and src.is_file() else None
    pos = outcome.position or Position()
    return {"navic_explore_checkpoint": CHECKPOINT_FORMAT, "scenario": str(src) if src else None,
            "scenario_sha256": sha,
            "options": {k: getattr(explorer.opts, k) for k in _RESUME_KEYS},
            "position": {"bound": pos.bound, "prefix": pos.prefix, "done_tasks": pos.done_tasks,
                         "races": pos.races},
            "progress": dataclasses.asdict(outcome.progress)}


def load_checkpoint(path: str | Path, scn: Scenario, opts: Options) -> Position:
    """The position to resume from; :class:`ScheduleError` if the file is not a checkpoint of
    this scenario under these bounds."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ScheduleError(f"{path}: cannot read checkpoint: {exc}") from None
    if not isinstance(doc, dict) or doc.get("navic_explore_checkpoint") != CHECKPOINT_FORMAT:
        raise ScheduleError(f"{path}: not a navic explore checkpoint")
    src = Path(scn.source) if scn.source else None
    sha = hashlib.sha256(src.read_bytes()).hexdigest() if src is not None and src.is_file() else None
    if doc.get("scenario_sha256") != sha:
        raise ScheduleError(f"{path}: scenario_sha256: the checkpoint is of another scenario file")
    want = {k: getattr(opts, k) for k in _RESUME_KEYS}
    got = doc.get("options") or {}
    for k in _RESUME_KEYS:
        have = got.get(k, "none") if k == "reduction" else got.get(k)   # (checkpoints before --reduction)
        if have != want[k]:
            raise ScheduleError(f"{path}: options.{k}: checkpoint has {have!r}, this search {want[k]!r}")
    pos = doc.get("position") or {}
    races = pos.get("races")
    if races is not None and not (isinstance(races, list) and all(
            r is None or (isinstance(r, list) and all(type(x) is int for x in r)) for r in races)):
        raise ScheduleError(f"{path}: position.races: expected a list of null or lists of integers")
    return Position(bound=int(pos.get("bound", 0)), prefix=[int(x) for x in pos.get("prefix") or []],
                    races=races if isinstance(races, list) else None,
                    done_tasks=[[int(a), int(b)] for a, b in pos.get("done_tasks") or []])
