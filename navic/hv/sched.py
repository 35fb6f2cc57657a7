"""The host scheduler that runs vCPU threads on physical CPUs.

A deliberately small model of what KVM relies on from the Linux scheduler: every vCPU thread
has a home pCPU (``vcpu_index % pcpus``, i.e. pinned round-robin); each pCPU runs one thread at a
time from a FIFO run queue; a thread that has run for ``timeslice`` while others wait is asked
to yield (``need_resched``) and, if it is in guest mode, the pCPU gets a host timer interrupt so
the guest exits (#VMEXIT(INTR)). Blocking releases the pCPU; a woken thread queues again and
pays the schedule-in cost. No wake-up preemption and no migration (see docs/model.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import Any, Protocol

from navic.sim.engine import Engine, Handle, Signal


class Thread(Protocol):
    name: str
    home: int
    cpu: int | None
    granted: Signal
    need_resched: bool


class HostScheduler:
    def __init__(self, engine: Engine, npcpus: int, timeslice: int, switch_cost: int,
                 on_slice_end: Callable[[int], None]) -> None:
        self.engine = engine
        self.timeslice = max(1, timeslice)
        self.switch_cost = switch_cost
        self.on_slice_end = on_slice_end  # raise a host timer interrupt on that pCPU
        self.current: list[Thread | None] = [None] * npcpus
        self.runq: list[deque[Thread]] = [deque() for _ in range(npcpus)]
        self.slice_start = [0] * npcpus
        self._tick: list[Handle | None] = [None] * npcpus
        self.context_switches = 0

    def acquire(self, t: Thread) -> Generator[Any, Any, None]:
        """Become the running thread of ``t.home`` (waiting in its run queue if it is busy)."""
        p = t.home
        if self.current[p] is None and not self.runq[p]:
            self._switch_to(p, t)
        else:
            self.runq[p].append(t)
            self._arm_tick(p)
            yield t.granted
        if self.switch_cost:
            yield self.switch_cost

    def release(self, t: Thread) -> None:
        """``t`` stops running (blocks, or yields after ``need_resched``)."""
        p = t.cpu
        assert p is not None and self.current[p] is t, f"{t.name} does not own pCPU {p}"
        t.cpu = None
        t.need_resched = False
        self.current[p] = None
        if self.runq[p]:
            nxt = self.runq[p].popleft()
            self._switch_to(p, nxt)
            nxt.granted.fire()

    def yield_cpu(self, t: Thread) -> Generator[Any, Any, None]:
        """Preemption: go to the back of the queue, run again when it is our turn."""
        self.release(t)
        yield from self.acquire(t)

    def _switch_to(self, p: int, t: Thread) -> None:
        self.current[p] = t
        t.cpu = p
        t.need_resched = False
        self.slice_start[p] = self.engine.now
        self.context_switches += 1
        self._arm_tick(p)

    def _arm_tick(self, p: int) -> None:
        if self._tick[p] is not None or not self.runq[p] or self.current[p] is None:
            return
        at = max(self.slice_start[p] + self.timeslice, self.engine.now)
        self._tick[p] = self.engine.call_at(at, self._slice_end, p, label=f"sched-tick{p}")

    def _slice_end(self, p: int) -> None:
        self._tick[p] = None
        cur = self.current[p]
        if cur is None or not self.runq[p]:
            return
        if self.engine.now - self.slice_start[p] < self.timeslice:
            self._arm_tick(p)
            return
        cur.need_resched = True
        self.on_slice_end(p)
