"""Seeded random conformance cases.

Case ``i`` of seed ``S`` is a pure function of ``(S, i, cpus)`` (``random.Random(f"{S}:{i}")``),
so any case of a run can be regenerated alone (``navic conformance qemu --seed S --only i``).

Each case draws a small pool of vectors from different priority classes and mixes:

* self-IPIs (shorthand and physical) with interrupts closed, STI/CLI windows;
* TPR writes and PPR/ISR/IRR reads; custom handlers that do not EOI (nested priorities,
  EOIs from the main program in any order) or that open interrupts and raise a higher vector;
* SVR software disable/enable (pending IRR/ISR bits are held);
* flat or cluster logical destinations (set up on every CPU) with logical, broadcast and
  shorthand (all / all-but-self) IPIs; lowest-priority IPIs to APs (receiver checked against the
  legal set); NMIs to APs;
* illegal vectors (0..15) and ESR write/read.

Emulator deviations (:mod:`navic.conformance.quirks`) are not avoided here: the checker adjusts
each case for the emulator it runs on.
"""

from __future__ import annotations

import dataclasses
import random

from navic.conformance.case import SPURIOUS_VECTOR, Case, CpuSetup, reindex
from navic.conformance.quirks import Quirk
from navic.guest import ops as O

SVR_ON = 0x100 | SPURIOUS_VECTOR
SVR_OFF = SPURIOUS_VECTOR

_REGS_READ = ("PPR", "PPR", "TPR", "ISR", "ISR", "IRR", "IRR", "TMR", "ESR", "LDR", "DFR", "SVR",
              "APR", "ID", "VER")


def _vector_pool(rng: random.Random) -> list[int]:
    classes = rng.sample(range(1, 16), rng.randint(3, 6))
    pool = []
    for c in classes:
        v = c * 16 + rng.randrange(16)
        if v == SPURIOUS_VECTOR:
            v -= 1
        pool.append(v)
    if rng.random() < 0.4:  # two vectors in one class: same-class ordering
        v = pool[0]
        w = (v & 0xF0) | ((v + 1 + rng.randrange(14)) & 0xF)
        if w not in pool and w != SPURIOUS_VECTOR:
            pool.append(w)
    return pool


def _setup(rng: random.Random, cpus: int, cluster: bool) -> tuple[CpuSetup, ...]:
    out = []
    for i in range(cpus):
        if cluster:
            ldr = ((rng.randrange(3) << 4) | (1 << rng.randrange(4))) << 24
            dfr = 0x0FFFFFFF
        else:
            ldr = (1 << rng.randrange(8)) if rng.random() < 0.8 else rng.randrange(256)
            ldr <<= 24
            dfr = 0xFFFFFFFF
        tpr = 0
        svr = SVR_ON
        if i > 0:
            if rng.random() < 0.15:
                tpr = rng.randrange(16) << 4 | rng.randrange(16) * (rng.random() < 0.3)
            if rng.random() < 0.08:
                svr = SVR_OFF
        out.append(CpuSetup(ldr=ldr, dfr=dfr, tpr=tpr, svr=svr))
    return tuple(out)


class _Gen:
    def __init__(self, rng: random.Random, cpus: int) -> None:
        self.rng = rng
        self.cpus = cpus
        self.cluster = rng.random() < 0.35
        self.setup = _setup(rng, cpus, self.cluster)
        self.pool = _vector_pool(rng)
        self.custom: dict[int, tuple[O.Op, ...]] = {}
        aps = self.setup[1:]
        self.lp_ok = cpus > 1 and all(s.tpr == 0 and s.svr & 0x100 for s in aps)
        self.lp_vectors: set[int] = set()

    def vec(self) -> int:
        return self.rng.choice(self.pool)

    def fixed_default_vec(self) -> int | None:
        c = [v for v in self.pool if v not in self.custom and v not in self.lp_vectors]
        return self.rng.choice(c) if c else None

    def handlers(self) -> None:
        rng = self.rng
        for v in self.pool:
            r = rng.random()
            if r < 0.25:
                self.custom[v] = ()                                    # no EOI: stays in ISR
            elif r < 0.40:
                self.custom[v] = (O.Read(index=0, reg="ISR" + str(v >> 5)), O.Read(index=1, reg="PPR"),
                                  O.Eoi(index=2))
        # nested: open interrupts inside a handler and raise a higher (default-handled) vector
        if rng.random() < 0.4:
            lows = sorted(self.pool)[: max(1, len(self.pool) // 2)]
            v = rng.choice(lows)
            higher = [w for w in self.pool if w > v and w not in self.custom]
            if higher:
                w = rng.choice(higher)
                tail: tuple[O.Op, ...] = (O.Eoi(index=4),) if rng.random() < 0.7 else ()
                self.custom[v] = (O.Sti(index=0), O.Ipi(index=1, vector=w, shorthand="self"),
                                  O.Read(index=2, reg="ISR" + str(w >> 5)), O.Cli(index=3), *tail)

    def ipi_other(self) -> O.Ipi:
        rng = self.rng
        v = self.vec()
        r = rng.random()
        if r < 0.35:
            return O.Ipi(index=0, vector=v, to=rng.randrange(self.cpus))
        if r < 0.7:
            dest = rng.choice([rng.randrange(256), 0xFF]) if rng.random() < 0.3 else \
                (self.setup[rng.randrange(self.cpus)].ldr >> 24) | (rng.randrange(256) & rng.randrange(256))
            if self.cluster and rng.random() < 0.7:
                dest = (self.setup[rng.randrange(self.cpus)].ldr >> 24 & 0xF0) | rng.randrange(1, 16)
            return O.Ipi(index=0, vector=v, dest=dest & 0xFF, dest_mode="logical")
        if r < 0.85:
            return O.Ipi(index=0, vector=v, shorthand=rng.choice(("all", "others")))
        return O.Ipi(index=0, vector=v, dest=0xFF)

    def op(self) -> list[O.Op]:  # noqa: C901 - one branch per op family
        rng = self.rng
        r = rng.random()
        if r < 0.22:
            v = self.vec()
            if rng.random() < 0.7:
                return [self.trigger(O.Ipi(index=0, vector=v, shorthand="self"))]
            return [self.trigger(O.Ipi(index=0, vector=v, to=0))]
        if r < 0.32 and self.cpus > 1:
            return [self.trigger(self.ipi_other())]
        if r < 0.40:
            return [O.Sti(index=0)] if rng.random() < 0.6 else [O.Cli(index=0)]
        if r < 0.50:
            return [O.Eoi(index=0)]
        if r < 0.60:
            val = rng.randrange(16) << 4 if rng.random() < 0.7 else rng.randrange(256)
            if rng.random() < 0.05:
                val |= rng.randrange(1, 1 << 24) << 8   # reserved bits
            return [O.Write(index=0, reg="TPR", value=val)]
        if r < 0.78:
            name = rng.choice(_REGS_READ)
            if name in ("ISR", "IRR", "TMR"):
                name += str(rng.choice(self.pool) >> 5 if rng.random() < 0.8 else rng.randrange(8))
            return [O.Read(index=0, reg=name)]
        if r < 0.83:
            val = rng.choice((SVR_OFF, SVR_ON, SVR_ON | 0x200, SVR_OFF | 0x200))
            return [O.Write(index=0, reg="SVR", value=val)]
        if r < 0.88:
            v = rng.randrange(16)
            ipi = O.Ipi(index=0, vector=v, shorthand="self") if rng.random() < 0.5 or self.cpus == 1 else \
                O.Ipi(index=0, vector=v, to=rng.randrange(self.cpus))
            return [ipi, O.Write(index=0, reg="ESR", value=0), O.Read(index=0, reg="ESR")]
        if r < 0.91:
            return [O.Write(index=0, reg="ESR", value=0), O.Read(index=0, reg="ESR")]
        if r < 0.95 and self.cpus > 1:
            return [O.Ipi(index=0, vector=0, mode="nmi", to=rng.randrange(1, self.cpus))]
        if r < 1.0 and self.lp_ok:
            return [self.lowest()]
        return [O.Read(index=0, reg="PPR")]

    def trigger(self, op: O.Ipi) -> O.Ipi:
        """Now and then a level-triggered fixed IPI (TMR set on acceptance), rarely a de-assert."""
        if self.rng.random() < 0.1:
            return dataclasses.replace(op, trigger="level", level=0 if self.rng.random() < 0.25 else 1)
        return op

    def lowest(self) -> O.Ipi:
        rng = self.rng
        v = rng.randrange(0x20, 0xFF)
        while v in self.pool or v == SPURIOUS_VECTOR:
            v = rng.randrange(0x20, 0xFF)
        self.lp_vectors.add(v)
        # destinations that never include the BSP: an AP's logical ID (flat) / cluster bit
        ap = rng.randrange(1, self.cpus)
        ldr = self.setup[ap].ldr >> 24
        bsp_ldr = self.setup[0].ldr >> 24
        if self.cluster:
            dest = ldr
            for s in self.setup[1:]:
                if (s.ldr >> 28) == (ldr >> 4) and rng.random() < 0.5:
                    dest |= (s.ldr >> 24) & 0xF
            if (bsp_ldr >> 4) == (dest >> 4):
                dest &= ~bsp_ldr | 0xF0
        else:
            dest = ldr | (rng.randrange(256) & rng.randrange(256))
            dest &= ~bsp_ldr
        if dest & (0xF if self.cluster else 0xFF) == 0:
            return O.Ipi(index=0, vector=v, mode="lowest", to=ap)
        return O.Ipi(index=0, vector=v, mode="lowest", dest=dest & 0xFF, dest_mode="logical")


def generate(seed: int | str, index: int, cpus: int | None = None, *, nops: tuple[int, int] = (6, 28),
             quirks: tuple[Quirk, ...] = ()) -> Case:
    """Case ``index`` of ``seed``. ``quirks`` (default none) are applied to the result; the
    :class:`~navic.conformance.run.Checker` applies its emulator's quirks itself."""
    rng = random.Random(f"{seed}:{index}")
    n = cpus if cpus is not None else rng.choice((1, 2, 2, 3, 4))
    g = _Gen(rng, n)
    g.handlers()
    ops: list[O.Op] = []
    for _ in range(rng.randint(*nops)):
        ops.extend(g.op())
    if rng.random() < 0.7:
        ops.append(O.Sti(index=0))   # let everything deliverable arrive before the dump
    case = Case(cpus=n, ops=reindex(ops), handlers=tuple(sorted(g.custom.items())), setup=g.setup,
                seed=None, tags=())
    for fix in quirks:
        case = fix.adjust(case)
    return case
