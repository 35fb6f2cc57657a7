"""The one interface behind which every nondeterministic decision of a run sits.

* :meth:`Chooser.pick` — several events are due at the same simulated instant; which goes first?
  (Only asked when :attr:`Chooser.wants_ties` is true; the time-driven default keeps FIFO order.)
* :meth:`Chooser.choose` — a model-level alternative, e.g. "does this IsRunning read see the stale
  value?" (erratum 1235), labelled so a schedule file can name it.

The time-and-seed run uses :class:`SeededChooser`; the interleaving explorer substitutes its own
systematic chooser, and ``navic run --schedule FILE`` a :class:`ReplayChooser`.
"""

from __future__ import annotations

import random


class Chooser:
    wants_ties = False
    # Window mode (see navic.sim.engine): the chooser picks among the next events of distinct
    # agents at every step, not only among ties; used by the explorer and by schedule replay.
    wants_window = False
    horizon = 0       # cycles after the earliest pending event that a window reaches
    width = 0         # most candidates per window (0 = no limit)
    max_steps = 0     # stop the run after this many engine steps (0 = no limit)

    def window(self, candidates: list[tuple[int, str]]) -> int:
        """Window mode: ``candidates`` are (time, label) of the next events of distinct agents,
        earliest first; return the index of the one to run (0 = time order)."""
        return 0

    def attach(self, run: object) -> None:
        """Called by the runner once the system is built, before it runs (explorers hash it)."""

    def pick(self, labels: list[str]) -> int:
        return 0

    def choose(self, label: str, n: int, weights: list[float] | None = None) -> int:
        return 0


class SeededChooser(Chooser):
    """Deterministic for a seed: ties in FIFO order; weighted choices drawn from the run's RNG,
    unweighted ones take alternative 0 (the architecturally usual outcome)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, label: str, n: int, weights: list[float] | None = None) -> int:
        if weights is None:
            return 0
        return self.rng.choices(range(n), weights=weights)[0]


class ReplayChooser(Chooser):
    """Replays a recorded list of decisions.

    *Sequential* form (the original one): ``[kind, label, index]`` triples consumed in order by
    tie ``pick``s and ``choose``s; past the end, FIFO / alternative 0.

    *Sparse* form (written by ``navic explore``; selected by ``window=True`` or by 4-element
    decisions): ``[kind, label, index, at]`` where ``at`` numbers the run's decision points (every
    window with more than one candidate and every ``choose`` with more than one alternative, from
    0). Decision points not listed take the default (time order / alternative 0). A ``window``
    decision runs the candidate whose label is ``label`` (``index`` breaks ties between equal
    labels); if none has that label the default runs. With ``window=True`` the engine runs in window
    mode with the given ``horizon``, ``width`` and ``max_steps`` — the explorer's settings.
    """

    wants_ties = True

    def __init__(self, decisions: list[tuple[str, str, int]] | list[list[object]], *, window: bool = False,
                 horizon: int = 0, width: int = 0, max_steps: int = 0) -> None:
        self.decisions = [tuple(d) for d in decisions]
        self.pos = 0
        self.log: list[tuple[str, str, int]] = []
        self.sparse = window or any(len(d) >= 4 for d in self.decisions)
        self.wants_window = window
        self.horizon = horizon
        self.width = width
        self.max_steps = max_steps
        self.at = 0  # sparse form: decision points so far
        self.by_point: dict[int, tuple[str, str, int]] = {}
        if self.sparse:
            for d in self.decisions:
                if len(d) >= 4:
                    self.by_point[int(d[3])] = (str(d[0]), str(d[1]), int(d[2]))  # type: ignore[arg-type,call-overload]
        self.applied = 0  # sparse form: how many listed decisions were applied as recorded

    def _next(self, kind: str, n: int) -> int:
        if self.pos < len(self.decisions):
            _k, _label, idx = self.decisions[self.pos][:3]
            self.pos += 1
            return idx if idx < n else 0  # type: ignore[operator,return-value]
        return 0

    def _sparse(self, kind: str, labels: list[str]) -> int:
        point = self.at
        self.at += 1
        d = self.by_point.get(point)
        if d is None or d[0] != kind:
            return 0
        _k, label, idx = d
        if 0 <= idx < len(labels) and labels[idx] == label:
            i = idx
        elif label in labels:
            i = labels.index(label)
        else:
            return 0
        if i:
            self.applied += 1
            self.log.append((kind, labels[i], i, point))  # type: ignore[arg-type]
        return i

    def window(self, candidates: list[tuple[int, str]]) -> int:
        return self._sparse("window", [c[1] for c in candidates])

    def pick(self, labels: list[str]) -> int:
        if self.sparse:
            return self._sparse("pick", labels)
        i = self._next("pick", len(labels))
        self.log.append(("pick", labels[i], i))
        return i

    def choose(self, label: str, n: int, weights: list[float] | None = None) -> int:
        if self.sparse:
            point = self.at
            self.at += 1
            d = self.by_point.get(point)
            if d is None or d[0] != "choose" or d[1] != label or not 0 <= d[2] < n:
                return 0
            if d[2]:
                self.applied += 1
                self.log.append(("choose", label, d[2], point))  # type: ignore[arg-type]
            return d[2]
        i = self._next("choose", n)
        self.log.append(("choose", label, i))
        return i
