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
    """Replays a recorded list of decisions (``[kind, label, index]``); past its end, FIFO/0."""

    wants_ties = True

    def __init__(self, decisions: list[tuple[str, str, int]]) -> None:
        self.decisions = list(decisions)
        self.pos = 0
        self.log: list[tuple[str, str, int]] = []

    def _next(self, kind: str, n: int) -> int:
        if self.pos < len(self.decisions):
            _k, _label, idx = self.decisions[self.pos]
            self.pos += 1
            return idx if idx < n else 0
        return 0

    def pick(self, labels: list[str]) -> int:
        i = self._next("pick", len(labels))
        self.log.append(("pick", labels[i], i))
        return i

    def choose(self, label: str, n: int, weights: list[float] | None = None) -> int:
        i = self._next("choose", n)
        self.log.append(("choose", label, i))
        return i
