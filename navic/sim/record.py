"""Run records: deliveries (with provenance and latency), guest errors, counters.

Provenance: every interrupt source registers its *acceptance* into a target (the moment an IRR
bit, or an NMI/INIT/SIPI latch, is set for it) with :meth:`Recorder.accepted`; when the target's
handler starts, :meth:`Recorder.delivered` consumes all acceptances pending for that (cpu,
vector) — several sends coalesced into one IRR bit are served by one handler run, which is
architectural — and the oldest one gives the delivery's kind, sender and latency.

:attr:`Recorder.history` keeps both kinds of event in order — ``("a", cpu, vector, kind, sent_by,
t_sent)`` per acceptance and ``("d", cpu, vector)`` per handler run — for the per-send provenance
checks of :mod:`navic.check.provenance` (duplicated / misrouted deliveries).
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any


class Recorder:
    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.deliveries: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.counters: dict[str, int] = {}
        self.exits: dict[str, dict[str, int]] = {}
        self.violations: list[dict[str, Any]] = []
        # (cpu, vector) -> acceptances not yet served, oldest first (an absent key reads as an
        # empty queue; readers test the queue, an empty one means nothing pending)
        self._pending: defaultdict[tuple[str, int], deque[tuple[int, str | None, str]]] = defaultdict(deque)
        self.history: list[tuple[Any, ...]] = []

    # count/exit run on every counted event: the try/except form costs no method call when the
    # key exists (the common case) and inserts keys in the same order as .get(name, 0) + n.
    def count(self, name: str, n: int = 1) -> None:
        c = self.counters
        try:
            c[name] += n
        except KeyError:
            c[name] = n

    def exit(self, level: str, reason: str) -> None:
        try:
            d = self.exits[level]
        except KeyError:
            d = self.exits[level] = {}
        try:
            d[reason] += 1
        except KeyError:
            d[reason] = 1

    def accepted(self, cpu: str, vector: int, kind: str, sent_by: str | None, t_sent: int) -> None:
        self._pending[(cpu, vector)].append((t_sent, sent_by, kind))
        self.history.append(("a", cpu, vector, kind, sent_by, t_sent))

    def delivered(self, cpu: str, vector: int, kind: str) -> None:
        now = self.clock.now
        self.history.append(("d", cpu, vector))
        q = self._pending.pop((cpu, vector), None)
        sent_by: str | None = None
        latency: int | None = None
        if q:
            t_sent, sent_by, src_kind = q[0]
            latency = now - t_sent
            if kind in ("fixed", "irq"):
                kind = src_kind
        elif kind == "irq":
            kind = "fixed"
        self.deliveries.append(
            {"cpu": cpu, "vector": vector, "kind": kind, "t": now, "sent_by": sent_by, "latency": latency}
        )

    def error(self, cpu: str, index: int | None, op: str, error: str) -> None:
        self.errors.append({"cpu": cpu, "index": index, "op": op, "error": error, "t": self.clock.now})

    def discard_pending(self, cpu: str, reason: str = "init") -> int:
        """An INIT reset the CPU's APIC: interrupts pending in its IRR are gone (architecturally
        discarded, not lost). Returns how many acceptances were dropped."""
        keys = [k for k in self._pending if k[0] == cpu and k[1] not in (0,)]
        n = 0
        for k in keys:
            if self._pending[k] and self._pending[k][0][2] not in ("init", "sipi"):
                n += len(self._pending.pop(k))
        if n:
            self.count(f"discarded_by_{reason}", n)
        return n

    def pending_count(self) -> int:
        return sum(len(q) for q in self._pending.values())
