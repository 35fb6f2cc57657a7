"""Delta debugging (Zeller's ddmin) of a diverging case down to a minimal op list.

The predicate re-applies the emulator's quirk adjustments to every candidate (so that removing,
say, a CLI inserted for a quirk cannot turn a real divergence into a known emulator deviation)
and treats an emulator failure as "does not diverge".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

from navic.conformance.case import Case, reindex

T = TypeVar("T")


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool], budget: list[int]) -> list[T]:
    """A 1-minimal sub-list of ``items`` for which ``fails`` holds (``fails(items)`` assumed).
    ``budget`` is a one-element list: the number of predicate calls left (shared, decremented)."""
    cur = list(items)
    n = 2
    while len(cur) >= 2 and budget[0] > 0:
        chunk = -(-len(cur) // n)
        subsets = [cur[i:i + chunk] for i in range(0, len(cur), chunk)]
        reduced = False
        for i in range(len(subsets)):
            if budget[0] <= 0:
                break
            sub = subsets[i]
            if len(subsets) > 2:
                budget[0] -= 1
                if fails(sub):
                    cur, n, reduced = sub, 2, True
                    break
            comp = [x for j, s in enumerate(subsets) if j != i for x in s]
            budget[0] -= 1
            if fails(comp):
                cur, n, reduced = comp, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(cur):
                break
            n = min(len(cur), 2 * n)
    if len(cur) == 1 and budget[0] > 0:
        budget[0] -= 1
        if fails([]):
            return []
    return cur


def shrink(case: Case, diverges: Callable[[Case], bool], max_runs: int = 400) -> Case:
    """The smallest case found (ops, handlers, handler bodies, AP set-up) that still diverges."""
    budget = [max_runs]

    def with_ops(ops: list) -> Case:
        return case_.with_ops(reindex(ops))

    case_ = case
    ops = ddmin(case_.ops, lambda o: diverges(with_ops(o)), budget)
    case_ = with_ops(ops)
    # drop whole custom handlers, then shorten the remaining ones
    for vec, _h in list(case_.handlers):
        if budget[0] <= 0:
            break
        trial = case_.with_handlers(tuple((v, h) for v, h in case_.handlers if v != vec))
        budget[0] -= 1
        if diverges(trial):
            case_ = trial
    for k, (vec, hops) in enumerate(case_.handlers):
        if budget[0] <= 0 or not hops:
            break
        base = case_

        def with_body(body: list, base: Case = base, k: int = k, vec: int = vec) -> Case:
            hs = list(base.handlers)
            hs[k] = (vec, reindex(body))
            return base.with_handlers(tuple(hs))

        body = ddmin(hops, lambda b, f=with_body: diverges(f(b)), budget)
        case_ = with_body(body)
    # simplify the APs' set-up to the defaults where that keeps the divergence
    for i in range(1, case_.cpus):
        if budget[0] <= 0:
            break
        setup = list(case_.setup)
        default = dataclasses.replace(setup[i], tpr=0, svr=0x1FF)
        if default == setup[i]:
            continue
        setup[i] = default
        trial = dataclasses.replace(case_, setup=tuple(setup))
        budget[0] -= 1
        if diverges(trial):
            case_ = trial
    return case_
