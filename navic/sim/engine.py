"""Discrete-event engine: time in CPU cycles, processes as generators, one choice interface.

A *process* is a generator (in the style of SimPy). What it yields says how it waits:

* ``yield n`` (an ``int`` >= 0) — consume ``n`` cycles; ``yield 0`` is a pure scheduling point
  (an atomic-step boundary the explorer may preempt at);
* ``yield signal`` (a :class:`Signal`) — block until someone calls ``signal.fire(value)``; the
  value is sent back into the generator;
* ``yield Cuttable(n, signal, cut)`` — consume ``n`` cycles like ``yield n``, but end early at
  the first ``signal.fire()`` at which ``cut()`` is true (a long computation that an interrupt
  cuts short at an instruction boundary); its ``rest`` then says how many cycles were not run.
  Until it is cut, it is the same event as ``yield n``: one event of the process at ``now + n``.

Plain callbacks can be scheduled too (:meth:`Engine.call_at`), e.g. timer expiry or the arrival
of an interrupt message; they return a :class:`Handle` that can be cancelled.

Every nondeterministic decision goes through :attr:`Engine.chooser` (:mod:`navic.sim.chooser`):
which of several events due at the same instant runs first, and any explicit choice a model
makes with :meth:`Engine.choose` (e.g. erratum 1235's stale IsRunning read). The default
chooser is deterministic for a given seed, so same scenario + seed ⇒ same run.

**Window mode** (``chooser.wants_window``; used by the interleaving explorer and by schedule
replay, never by time-and-seed runs): before every step the engine collects the *candidates* —
the earliest pending event of each distinct agent (a process, or a callback label), in time order,
no later than ``chooser.horizon`` cycles after the earliest one, at most ``chooser.width`` of them —
and runs the one ``chooser.window(candidates)`` returns. Index 0 is the time-order schedule. Running
a later candidate is a *delay* of the earlier agents: logical time advances to that event's time
and the events left behind run late, at the current time (time never goes backwards). The run
stops after ``chooser.max_steps`` steps when that is non-zero. A chooser with a ``stepped``
callable is told the label of every step's agent (the explorer's footprints use it). The
time-driven loop is untouched.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Generator
from typing import Any

from navic.sim.chooser import Chooser, SeededChooser

ProcessGen = Generator[Any, Any, Any]


class Signal:
    """Something processes can block on. ``fire`` wakes every current waiter (edge semantics)."""

    __slots__ = ("engine", "waiters", "name")

    def __init__(self, engine: Engine, name: str = "") -> None:
        self.engine = engine
        self.waiters: list[Any] = []   # Processes, or objects with wake(value) (an L1 thread, a Cuttable)
        self.name = name

    def fire(self, value: Any = None) -> int:
        """Wake all waiters at the current time; returns how many were woken."""
        waiters = self.waiters
        if not waiters:
            return 0
        self.waiters = []
        eng = self.engine
        q = eng._q
        now = eng.now
        push = heapq.heappush
        for p in waiters:
            if type(p) is Process:
                p.waiting_on = None
                eng._seq = seq = eng._seq + 1
                push(q, (now, seq, p, value))
            else:
                p.wake(value)  # a non-process waiter (e.g. an L1 thread stepped by an L1 vCPU)
        return len(waiters)


class Handle:
    """A scheduled callback; ``cancel()`` makes it a no-op."""

    __slots__ = ("fn", "args", "cancelled", "time", "label")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], time: int, label: str) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False
        self.time = time
        self.label = label

    def cancel(self) -> None:
        self.cancelled = True


class Cuttable:
    """A timed wait that an event may cut short (see the module docstring).

    ``cut`` is asked at every ``signal.fire()`` during the wait, at the time of the fire (it must
    only read state); while it answers False the wait goes on unchanged. The end of the wait is a
    callback labelled with the process's name, so the explorer and the tie chooser see the same
    candidate as for ``yield n`` (see :func:`_agent`)."""

    __slots__ = ("cycles", "signal", "cut", "rest", "process", "handle", "deadline")

    def __init__(self, cycles: int, signal: Signal, cut: Callable[[], bool]) -> None:
        self.cycles = cycles
        self.signal = signal
        self.cut = cut
        self.rest = 0            # cycles not run when the wait was cut short (0: ran to the end)
        self.process: Process | None = None
        self.handle: Handle | None = None
        self.deadline = 0

    def _begin(self, eng: Engine, p: Process) -> None:
        self.process = p
        self.deadline = eng.now + self.cycles
        self.handle = eng.call_at(self.deadline, _cuttable_done, eng, self, label=p.name)
        self.signal.waiters.append(self)

    def wake(self, value: Any) -> None:
        """Signal-waiter protocol: cut the wait short now if ``cut()`` says so, else keep waiting."""
        if not self.cut():
            self.signal.waiters.append(self)
            return
        self.handle.cancel()  # type: ignore[union-attr]
        eng = self.signal.engine
        self.rest = self.deadline - eng.now
        eng._push(eng.now, self.process, None)


def _cuttable_done(eng: Engine, w: Cuttable) -> None:
    """The end of a :class:`Cuttable` wait that nothing cut short: resume its process."""
    w.signal.waiters.remove(w)
    eng._step(w.process, None)  # type: ignore[arg-type]


class Process:
    __slots__ = ("gen", "name", "alive", "waiting_on", "result", "done")

    def __init__(self, gen: ProcessGen, name: str, engine: Engine) -> None:
        self.gen = gen
        self.name = name
        self.alive = True
        self.waiting_on: Signal | None = None
        self.result: Any = None
        self.done = Signal(engine, f"{name}.done")

    def __repr__(self) -> str:
        return f"<Process {self.name}>"


class SimulationError(RuntimeError):
    """A model bug surfaced during a run (never a guest-visible fault)."""


class Engine:
    """The event loop. ``now`` is the current time in cycles."""

    def __init__(self, seed: int = 1, chooser: Chooser | None = None) -> None:
        self.now = 0
        self.seed = seed
        self.rng = random.Random(seed)
        self.chooser: Chooser = chooser if chooser is not None else SeededChooser(self.rng)
        self._q: list[tuple[int, int, Any, Any]] = []
        self._seq = 0
        self.steps = 0
        self.stopped = False
        self.processes: list[Process] = []
        self.truncated = False  # window mode: the run hit chooser.max_steps
        self.budget_hit = False  # run(max_steps=...): the run hit its event budget

    # -- scheduling ------------------------------------------------------------------------
    def _push(self, time: int, target: Any, value: Any) -> None:
        self._seq += 1
        heapq.heappush(self._q, (time, self._seq, target, value))

    def spawn(self, gen: ProcessGen, name: str, delay: int = 0) -> Process:
        p = Process(gen, name, self)
        self.processes.append(p)
        self._push(self.now + delay, p, None)
        return p

    def call_at(self, time: int, fn: Callable[..., Any], *args: Any, label: str = "") -> Handle:
        if time < self.now:
            time = self.now
        h = Handle(fn, args, time, label)
        self._seq = seq = self._seq + 1
        heapq.heappush(self._q, (time, seq, h, None))
        return h

    def call_later(self, delay: int, fn: Callable[..., Any], *args: Any, label: str = "") -> Handle:
        # call_at(self.now + delay, ...), inlined (one per IPI message).
        now = self.now
        time = now + delay
        if time < now:
            time = now
        h = Handle(fn, args, time, label)
        self._seq = seq = self._seq + 1
        heapq.heappush(self._q, (time, seq, h, None))
        return h

    def signal(self, name: str = "") -> Signal:
        return Signal(self, name)

    def choose(self, label: str, n: int, weights: list[float] | None = None) -> int:
        """An explicit nondeterministic choice among ``n`` alternatives (0 = the usual one)."""
        if n <= 1:
            return 0
        return self.chooser.choose(label, n, weights)

    def stop(self) -> None:
        self.stopped = True

    # -- running ---------------------------------------------------------------------------
    def _pop(self) -> tuple[int, int, Any, Any]:
        q = self._q
        first = heapq.heappop(q)
        if not self.chooser.wants_ties or not q or q[0][0] != first[0]:
            return first
        # Several events are due at the same instant: let the chooser order them.
        same = [first]
        while q and q[0][0] == first[0]:
            same.append(heapq.heappop(q))
        live = [e for e in same if not (isinstance(e[2], Handle) and e[2].cancelled)]
        if not live:
            return same[0]
        idx = self.chooser.pick([_label(e[2]) for e in live]) if len(live) > 1 else 0
        chosen = live.pop(idx)
        for e in live:
            heapq.heappush(q, e)
        return chosen

    def run(self, until: int | None = None, max_steps: int | None = None) -> None:
        """Run until the queue is empty, :meth:`stop` is called, or time would pass ``until``.
        ``max_steps``: also stop (with :attr:`budget_hit` set) once :attr:`steps` reaches it
        (``navic run --max-events``)."""
        if self.chooser.wants_window:
            self._run_window(until)
            return
        q = self._q
        budget = max_steps if max_steps is not None else 1 << 62
        if self.chooser.wants_ties:
            while q and not self.stopped:
                if until is not None and q[0][0] > until:
                    self.now = until
                    return
                if self.steps >= budget:
                    self.budget_hit = True
                    return
                time, _seq, target, value = self._pop()
                self.now = time
                self.steps += 1
                if type(target) is Handle:
                    if not target.cancelled:
                        target.fn(*target.args)
                    continue
                self._step(target, value)
            return
        # The time-driven fast path (FIFO ties): ``_pop`` and ``_step`` inlined, same order.
        heappop = heapq.heappop
        heappush = heapq.heappush
        limit = until
        while q and not self.stopped:
            if limit is not None and q[0][0] > limit:
                self.now = limit
                return
            if self.steps >= budget:
                self.budget_hit = True
                return
            time, _seq, target, value = heappop(q)
            self.now = time
            self.steps += 1
            if type(target) is Handle:
                if not target.cancelled:
                    target.fn(*target.args)
                continue
            gen = target.gen
            while True:
                try:
                    y = gen.send(value)
                except StopIteration as stop:
                    target.alive = False
                    target.result = stop.value
                    target.done.fire(stop.value)
                    break
                ty = type(y)
                if ty is int or y is None:
                    t = self.now + y if ty is int else self.now
                    if (q and q[0][0] <= t) or self.stopped or (limit is not None and t > limit) \
                            or self.steps >= budget:
                        self._seq = seq = self._seq + 1
                        heappush(q, (t, seq, target, None))
                        break
                    # Run-ahead: nothing else is due at or before t, so pushing this process and
                    # popping it again would select it next anyway; resume it directly.
                    self.now = t
                    self.steps += 1
                    value = None
                    continue
                if ty is Signal:
                    target.waiting_on = y
                    y.waiters.append(target)
                    break
                if ty is Cuttable:
                    t = self.now + y.cycles
                    if (q and q[0][0] <= t) or self.stopped or (limit is not None and t > limit) \
                            or self.steps >= budget:
                        y._begin(self, target)
                        break
                    # Run-ahead as for an int: no event can fire the signal before t.
                    y.deadline = t
                    self.now = t
                    self.steps += 1
                    value = None
                    continue
                raise SimulationError(f"process {target.name} yielded {y!r}; "
                                      "expected cycles (int), a Signal or a Cuttable")

    def candidates(self, until: int | None = None) -> list[tuple[int, int, Any, Any]]:
        """The window of events one of which may run next (see the module docstring), earliest
        first. Cancelled callbacks are dropped from the queue on the way."""
        q = self._q
        while q and type(q[0][2]) is Handle and q[0][2].cancelled:
            heapq.heappop(q)
        if not q:
            return []
        ch = self.chooser
        head = q[0]
        limit = max(head[0], self.now) + ch.horizon
        if until is not None and limit > until:
            limit = until
        width = ch.width or len(q)
        out = [head]
        seen = {_agent(head[2])}
        if len(q) == 1 or width == 1:
            return out
        for e in sorted(q):
            if e[0] > limit:
                break
            if e is head:
                continue
            tgt = e[2]
            if type(tgt) is Handle and tgt.cancelled:
                continue
            key = _agent(tgt)
            if key in seen:
                continue
            seen.add(key)
            out.append(e)
            if len(out) >= width:
                break
        return out

    def _run_window(self, until: int | None) -> None:
        q = self._q
        ch = self.chooser
        max_steps = ch.max_steps
        stepped = getattr(ch, "stepped", None)   # the explorer's footprints: who takes each step
        while q and not self.stopped:
            cands = self.candidates(until)
            if not cands:
                break
            first = cands[0]
            if until is not None and first[0] > until:
                self.now = max(self.now, until)
                return
            if len(cands) > 1:
                idx = ch.window([(e[0], _label(e[2])) for e in cands])
                chosen = cands[idx]
            else:
                chosen = first
            if chosen is q[0]:
                heapq.heappop(q)
            else:
                q.remove(chosen)
                heapq.heapify(q)
            time, _seq, target, value = chosen
            if time > self.now:
                self.now = time
            self.steps += 1
            if stepped is not None:
                stepped(_label(target))
            if type(target) is Handle:
                target.fn(*target.args)
            else:
                self._step(target, value)
            if max_steps and self.steps >= max_steps:
                self.truncated = True
                return

    def _step(self, p: Process, value: Any) -> None:
        try:
            y = p.gen.send(value)
        except StopIteration as stop:
            p.alive = False
            p.result = stop.value
            p.done.fire(stop.value)
            return
        if type(y) is int:
            self._push(self.now + y, p, None)
        elif type(y) is Signal:
            p.waiting_on = y
            y.waiters.append(p)
        elif y is None:
            self._push(self.now, p, None)
        elif type(y) is Cuttable:
            y._begin(self, p)
        else:
            raise SimulationError(f"process {p.name} yielded {y!r}; expected cycles (int), a Signal or a Cuttable")


def _agent(target: Any) -> Any:
    """Who an event belongs to: events of one agent keep their order in window mode."""
    if type(target) is Handle:
        if target.fn is _cuttable_done:   # the end of a process's Cuttable wait: that process
            return target.args[1].process
        return target.label or getattr(target.fn, "__qualname__", "callback")
    return target


def _label(target: Any) -> str:
    if isinstance(target, Process):
        return target.name
    return target.label or getattr(target.fn, "__qualname__", "callback")
