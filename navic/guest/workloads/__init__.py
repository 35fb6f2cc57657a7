"""Parametrised guest workloads: programs (and devices) generated from a few parameters.

Usable from a scenario's ``[workload]`` table (``kind = "ipi-pingpong"``, parameters as keys) and
from the API (:func:`build`). Each workload runs at any level: its programs are placed on
``l1.N`` or ``l2.N`` CPUs. Randomness (hackbench) comes from the scenario seed, so a workload is
deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from navic.config import DeviceConfig
from navic.guest import ops as O


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    kind: str = "int"          # "int" | "choice" | "float"
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Any, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class Workload:
    name: str
    doc: str
    params: tuple[Param, ...]
    build: Callable[[dict[str, Any], int, int, random.Random], tuple[list[O.Program], list[DeviceConfig]]]
    min_cpus: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class _B:
    """Builds op tuples with running indices."""

    def __init__(self) -> None:
        self.i = 0

    def __call__(self, cls: type, **kw: Any) -> Any:
        self.i += 1
        return cls(self.i - 1, **kw)


def _prog(level: int, vcpu: int, ops: list[O.Op], handlers: dict[int, tuple[O.Op, ...]] | None = None
          ) -> O.Program:
    return O.Program(cpu=f"l{level}.{vcpu}", level=level, vcpu=vcpu, ops=tuple(ops), handlers=handlers or {})


def _pingpong(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    b = _B()
    a_cpu, b_cpu, n = p["a"], p["b"], p["iterations"]
    ping, pong = p["vector"], p["reply_vector"]
    how = p["how"]
    a_ops = [b(O.Sti), b(O.Repeat, times=n, ops=(
        b(O.Ipi, vector=ping, to=b_cpu), b(O.Wait, vector=pong, how=how)))]
    b_ops = [b(O.Sti), b(O.Wait, vector=ping, count=n, how=how)]
    handlers = {ping: (b(O.Ipi, vector=pong, to=a_cpu), b(O.Eoi))}
    return [_prog(level, a_cpu, a_ops), _prog(level, b_cpu, b_ops, handlers)], []


def _ipi_halt(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    b = _B()
    a_cpu, b_cpu, n = p["a"], p["b"], p["iterations"]
    ping, pong = p["vector"], p["reply_vector"]
    a_ops = [b(O.Sti), b(O.Repeat, times=n, ops=(
        b(O.Compute, cycles=p["gap_cycles"]), b(O.Ipi, vector=ping, to=b_cpu),
        b(O.Wait, vector=pong, how="spin")))]
    b_ops = [b(O.Sti), b(O.Wait, vector=ping, count=n, how="hlt")]
    handlers = {ping: (b(O.Ipi, vector=pong, to=a_cpu), b(O.Eoi))}
    return [_prog(level, a_cpu, a_ops), _prog(level, b_cpu, b_ops, handlers)], []


def _tlb_shootdown(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    b = _B()
    sender = p["sender"]
    n_targets = p["targets"] or ncpus - 1
    targets = [c for c in range(ncpus) if c != sender][:n_targets]
    vector = p["vector"]
    mode = p["mode"]
    flush = p["flush_cycles"]
    sends: list[O.Op] = []
    if mode == "broadcast":
        sends.append(b(O.Ipi, vector=vector, shorthand="others"))
    elif mode == "logical":
        # x2APIC cluster mode: one IPI per cluster of 16 (APIC ID = vCPU index here).
        clusters: dict[int, int] = {}
        for c in targets:
            clusters[c >> 4] = clusters.get(c >> 4, 0) | (1 << (c & 0xF))
        for cl, bits in sorted(clusters.items()):
            sends.append(b(O.Ipi, vector=vector, dest=(cl << 16) | bits, dest_mode="logical"))
    else:
        sends.extend(b(O.Ipi, vector=vector, to=c) for c in targets)
    s_ops = [b(O.Sti), b(O.Repeat, times=p["iterations"], ops=(
        *sends, b(O.Await, var="tlb_ack", count=len(targets), how="spin"),
        b(O.Compute, cycles=p["gap_cycles"])))]
    programs = [_prog(level, sender, s_ops)]
    handler = (b(O.Compute, cycles=flush), b(O.Add, var="tlb_ack", value=1), b(O.Eoi))
    for c in targets:
        programs.append(_prog(level, c, [b(O.Sti), b(O.Wait, vector=vector, count=p["iterations"],
                                                      how=p["idle"])], {vector: handler}))
    return programs, []


def _hackbench(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    b = _B()
    vector = p["vector"]
    programs = []
    for c in range(ncpus):
        ops: list[O.Op] = [b(O.Sti)]
        for _ in range(p["iterations"]):
            ops.append(b(O.Compute, cycles=rng.randint(p["work_cycles"] // 2, p["work_cycles"] * 3 // 2)))
            peer = rng.randrange(ncpus - 1)
            peer = peer + 1 if peer >= c else peer
            ops.append(b(O.Ipi, vector=vector, to=peer))
            if rng.random() < p["idle_fraction"]:
                ops.append(b(O.Hlt))
        programs.append(_prog(level, c, ops, {vector: (b(O.Compute, cycles=200), b(O.Eoi))}))
    return programs, []


def _timer(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    b = _B()
    vector = p["vector"]
    programs = []
    for c in range(ncpus):
        if p["mode"] == "periodic":
            ops = [b(O.Sti), b(O.Write, reg="TIMER_DIVIDE", value=0xB),
                   b(O.Write, reg="LVT_TIMER", value=(1 << 17) | vector),
                   b(O.Write, reg="TIMER_INITIAL", value=p["period_ticks"]),
                   b(O.Wait, vector=vector, count=p["ticks"], how="hlt"),
                   b(O.Write, reg="LVT_TIMER", value=(1 << 16) | vector)]
            handlers: dict[int, tuple[O.Op, ...]] = {}
        else:  # tsc-deadline: the handler re-arms the deadline (as Linux's lapic_next_deadline)
            delta = p["period_ticks"] * 30
            ops = [b(O.Sti), b(O.Write, reg="LVT_TIMER", value=(2 << 17) | vector),
                   b(O.TscDeadline, delta=delta), b(O.Wait, vector=vector, count=p["ticks"], how="hlt")]
            handlers = {vector: (b(O.TscDeadline, delta=delta), b(O.Eoi))}
        programs.append(_prog(level, c, ops, handlers))
    return programs, []


def _device(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    b = _B()
    vector = p["vector"]
    programs, devices = [], []
    for c in range(ncpus):
        how = "hlt" if c % 2 else "spin"   # half the receivers halt, half keep running
        programs.append(_prog(level, c, [b(O.Sti), b(O.Wait, vector=vector, count=p["count"], how=how)]))
        devices.append(DeviceConfig(vector=vector, target=f"l{level}.{c}", period_us=p["period_us"],
                                    count=p["count"], start_us=p["period_us"] * c / max(1, ncpus)))
    return programs, devices


def _table_churn(p: dict[str, Any], level: int, ncpus: int, rng: random.Random):
    """A token ring over every CPU: CPU c waits for the token (halting), computes, passes it to
    c + 1. Run as L2 with more L2 vCPUs than L1 vCPUs, each hop blocks one L2 vCPU and unblocks
    another in L1, and L1's KVM rewrites their physical APIC ID table entries (IsRunning off/on,
    ``avic_vcpu_blocking`` / ``avic_vcpu_unblocking``) — the writes a shadowing L0 must track."""
    b = _B()
    vector, work, rounds, how = p["vector"], p["work_cycles"], p["rounds"], p["how"]
    programs = []
    for c in range(ncpus):
        nxt = (c + 1) % ncpus
        hop = (b(O.Compute, cycles=work), b(O.Ipi, vector=vector, to=nxt))
        wait = b(O.Wait, vector=vector, how=how)
        body = (*hop, wait) if c == 0 else (wait, *hop)
        programs.append(_prog(level, c, [b(O.Sti), b(O.Repeat, times=rounds, ops=body)]))
    return programs, []


_VEC = dict(kind="int", lo=16, hi=255)

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("ipi-pingpong", "two CPUs bounce a fixed IPI (KVM selftest xapic_ipi_test)", (
        Param("iterations", 100, lo=1, hi=10**7, doc="round trips"),
        Param("a", 0, lo=0, hi=4095, doc="first CPU"), Param("b", 1, lo=0, hi=4095, doc="second CPU"),
        Param("vector", 0xF0, **_VEC), Param("reply_vector", 0xF1, **_VEC),
        Param("how", "spin", kind="choice", choices=("spin", "hlt"), doc="how both sides wait")),
        _pingpong, min_cpus=2),
    Workload("ipi-halt", "the receiver is halted when the IPI arrives (kvm-unit-tests ipi_halt)", (
        Param("iterations", 50, lo=1, hi=10**7), Param("a", 0, lo=0, hi=4095), Param("b", 1, lo=0, hi=4095),
        Param("vector", 0xF0, **_VEC), Param("reply_vector", 0xF1, **_VEC),
        Param("gap_cycles", 60_000, lo=0, hi=10**10, doc="sender think time before each IPI")),
        _ipi_halt, min_cpus=2),
    Workload("tlb-shootdown", "one sender multicasts and spins until every target acknowledges", (
        Param("iterations", 10, lo=1, hi=10**6), Param("sender", 0, lo=0, hi=4095),
        Param("targets", 0, lo=0, hi=4095, doc="number of targets (0 = every other CPU)"),
        Param("mode", "physical", kind="choice", choices=("physical", "logical", "broadcast"),
              doc="one IPI per target, x2APIC cluster multicast, or all-but-self shorthand"),
        Param("vector", 0xF2, **_VEC), Param("flush_cycles", 500, lo=0, hi=10**9),
        Param("gap_cycles", 20_000, lo=0, hi=10**10),
        Param("idle", "hlt", kind="choice", choices=("spin", "hlt"), doc="how targets wait")),
        _tlb_shootdown, min_cpus=2),
    Workload("hackbench", "many tasks send reschedule IPIs to random peers; idle CPUs halt", (
        Param("iterations", 50, lo=1, hi=10**6, doc="sends per CPU"), Param("vector", 0xFD, **_VEC),
        Param("work_cycles", 20_000, lo=1, hi=10**9),
        Param("idle_fraction", 0.3, kind="float", lo=0.0, hi=1.0, doc="chance to halt after a send")),
        _hackbench, min_cpus=2),
    Workload("table-churn", "a token ring with halting waiters: as L2 on fewer L1 vCPUs, every hop "
             "rewrites L1's physical APIC ID table", (
        Param("rounds", 20, lo=1, hi=10**6, doc="times the token goes round the ring"),
        Param("vector", 0xF4, **_VEC), Param("work_cycles", 3_000, lo=0, hi=10**9, doc="work per hop"),
        Param("how", "hlt", kind="choice", choices=("spin", "hlt"), doc="how a CPU waits for the token")),
        _table_churn, min_cpus=2),
    Workload("timer", "per-CPU periodic or TSC-deadline timer interrupts", (
        Param("mode", "periodic", kind="choice", choices=("periodic", "tsc-deadline")),
        Param("ticks", 20, lo=1, hi=10**6), Param("period_ticks", 1000, lo=1, hi=2**32 - 1,
                                                   doc="timer counts (30 cycles each) per period"),
        Param("vector", 0xEC, **_VEC)), _timer),
    Workload("device", "an IOMMU-posted device interrupt stream to running and halted vCPUs", (
        Param("count", 50, lo=1, hi=10**6), Param("period_us", 20.0, kind="float", lo=0.01, hi=1e9),
        Param("vector", 0x61, **_VEC)), _device),
)}


def build(kind: str, params: dict[str, Any], *, level: int, ncpus: int, seed: int
          ) -> tuple[list[O.Program], list[DeviceConfig]]:
    w = WORKLOADS[kind]
    full = {p.name: params.get(p.name, p.default) for p in w.params}
    return w.build(full, level, ncpus, random.Random(seed))
