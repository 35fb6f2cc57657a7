"""A conformance case: the CPUs' APIC set-up, the BSP's op list and its custom handlers.

Ops are :mod:`navic.guest.ops` records, so a case runs on navic unchanged; the QEMU side compiles
the same records to x86 code (:mod:`navic.conformance.image`). Only the BSP (``l1.0``) runs a
program; the other CPUs are configured once (:class:`CpuSetup`) and then idle with interrupts
open, recording every delivery and EOIing it (navic's default handler).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from navic.guest import ops as O

# xAPIC MMIO offsets (SDM vol. 3 table 11-1). Kept here, independent of navic.apic, on purpose:
# the harness must not share code with the model it checks.
REG_OFFSETS: dict[str, int] = {
    "ID": 0x20, "VER": 0x30, "TPR": 0x80, "APR": 0x90, "PPR": 0xA0, "EOI": 0xB0, "RRD": 0xC0,
    "LDR": 0xD0, "DFR": 0xE0, "SVR": 0xF0, "ESR": 0x280, "LVT_CMCI": 0x2F0, "ICR": 0x300,
    "ICR2": 0x310, "LVT_TIMER": 0x320, "LVT_THERMAL": 0x330, "LVT_PMC": 0x340, "LVT_LINT0": 0x350,
    "LVT_LINT1": 0x360, "LVT_ERROR": 0x370, "TIMER_ICR": 0x380, "TIMER_CCR": 0x390,
    "TIMER_DCR": 0x3E0,
}
for _i in range(8):
    REG_OFFSETS[f"ISR{_i}"] = 0x100 + 0x10 * _i
    REG_OFFSETS[f"TMR{_i}"] = 0x180 + 0x10 * _i
    REG_OFFSETS[f"IRR{_i}"] = 0x200 + 0x10 * _i

# What the final dump holds for every CPU, in this order (offsets into the APIC page).
DUMP_FIELDS: tuple[tuple[str, int], ...] = (
    ("id", 0x20), ("tpr", 0x80), ("ppr", 0xA0), ("ldr", 0xD0), ("dfr", 0xE0), ("svr", 0xF0),
    ("esr", 0x280),
    *((f"isr{i}", 0x100 + 0x10 * i) for i in range(8)),
    *((f"tmr{i}", 0x180 + 0x10 * i) for i in range(8)),
    *((f"irr{i}", 0x200 + 0x10 * i) for i in range(8)),
)
SPURIOUS_VECTOR = 0xFF  # SVR vector of every case; never used as an IPI vector
NMI_VECTOR = 2


@dataclass(frozen=True, slots=True)
class CpuSetup:
    """A CPU's APIC state before the BSP's program starts (written in this order: DFR, LDR,
    TPR, SVR). The BSP gets the same writes as its first ops."""

    ldr: int = 0
    dfr: int = 0xFFFFFFFF
    tpr: int = 0
    svr: int = 0x100 | SPURIOUS_VECTOR


@dataclass(frozen=True, slots=True)
class Case:
    cpus: int
    ops: tuple[O.Op, ...]
    handlers: tuple[tuple[int, tuple[O.Op, ...]], ...] = ()
    setup: tuple[CpuSetup, ...] = ()
    seed: int | None = None
    tags: tuple[str, ...] = field(default=())

    def cpu_setup(self, i: int) -> CpuSetup:
        return self.setup[i] if i < len(self.setup) else CpuSetup()

    @property
    def handler_map(self) -> dict[int, tuple[O.Op, ...]]:
        return dict(self.handlers)

    def with_ops(self, ops: tuple[O.Op, ...]) -> Case:
        return dataclasses.replace(self, ops=ops)

    def with_handlers(self, handlers: tuple[tuple[int, tuple[O.Op, ...]], ...]) -> Case:
        return dataclasses.replace(self, handlers=handlers)

    def describe(self) -> str:
        lines = [f"cpus={self.cpus}" + (f" seed={self.seed}" if self.seed is not None else "")]
        for i in range(self.cpus):
            s = self.cpu_setup(i)
            lines.append(f"  setup l1.{i}: DFR={s.dfr:#010x} LDR={s.ldr:#010x} TPR={s.tpr:#04x} "
                         f"SVR={s.svr:#05x}")
        for k, op in enumerate(self.ops):
            lines.append(f"  [{k}] {fmt_op(op)}")
        for vec, hops in self.handlers:
            body = "; ".join(fmt_op(o) for o in hops) or "(no EOI)"
            lines.append(f"  handler {vec:#04x}: {body}")
        return "\n".join(lines)


def fmt_op(op: O.Op) -> str:
    t = type(op)
    if t is O.Ipi:
        assert isinstance(op, O.Ipi)
        if op.shorthand != "none":
            dst = op.shorthand
        else:
            dst = f"{op.dest_mode[:4]} {op.dest if op.dest is not None else op.to:#04x}"
        extra = "" if op.mode == "fixed" else f" {op.mode}"
        extra += "" if op.trigger == "edge" else f" level(as={op.level})"
        return f"ipi {dst} vec={op.vector:#04x}{extra}"
    if t is O.Write:
        return f"write {op.reg} = {op.value:#x}"  # type: ignore[attr-defined]
    if t is O.Read:
        return f"read {op.reg}"  # type: ignore[attr-defined]
    if t is O.MmioWrite:
        return f"mmio write [{op.offset:#05x}] = {op.value:#x}"  # type: ignore[attr-defined]
    if t is O.MmioRead:
        return f"mmio read [{op.offset:#05x}]"  # type: ignore[attr-defined]
    if t is O.Compute:
        return f"compute {op.cycles}"  # type: ignore[attr-defined]
    return type(op).__name__.lower()


def reindex(ops: tuple[O.Op, ...] | list[O.Op], start: int = 0) -> tuple[O.Op, ...]:
    """The same ops with ``index`` = position (after shrinking removed some)."""
    return tuple(dataclasses.replace(op, index=start + k) for k, op in enumerate(ops))


def read_var(where: str, index: int) -> str:
    """Variable name of a Read/MmioRead: ``m3`` for main op 3, ``h45_1`` for op 1 of handler 45h."""
    return f"{where}_{index}" if where != "m" else f"m{index}"


def legal_receivers(case: Case, op: O.Ipi) -> frozenset[int]:
    """CPUs an IPI may reach by its destination (SDM §11.6.2), from the case's fixed set-up.

    Used for lowest-priority IPIs, whose single receiver is implementation specific: the
    comparison only requires it to be one of these.
    """
    n = case.cpus
    if op.shorthand == "self":
        return frozenset({0})
    if op.shorthand == "all":
        return frozenset(range(n))
    if op.shorthand == "others":
        return frozenset(range(1, n))
    dest = op.dest if op.dest is not None else (op.to or 0)
    if op.dest_mode == "physical":
        return frozenset(range(n)) if dest == 0xFF else frozenset({dest}) & frozenset(range(n))
    out = set()
    for i in range(n):
        s = case.cpu_setup(i)
        ldr = s.ldr >> 24
        if dest == 0xFF:
            out.add(i)
        elif (s.dfr >> 28) == 0xF:  # flat
            if ldr & dest:
                out.add(i)
        elif (ldr >> 4) == (dest >> 4) and (ldr & dest & 0xF):  # cluster
            out.add(i)
    return frozenset(out)
