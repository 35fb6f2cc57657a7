"""Known deviations of the reference emulators from the SDM (see docs/model.md, "Conformance").

navic follows the manuals; where an emulator does not, the case is adjusted before it runs (the
construct is taken out or replaced) or the comparison ignores the affected value, and the
deviation is listed here and documented. ``navic conformance qemu --strict`` runs without these
adjustments, to show the deviations themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from navic.conformance.case import Case, reindex
from navic.guest import ops as O

OpMap = Callable[[O.Op], O.Op | None]


def _map_ops(case: Case, f: OpMap) -> Case:
    def m(ops: tuple[O.Op, ...]) -> tuple[O.Op, ...]:
        out = []
        for op in ops:
            r = f(op)
            if r is not None:
                out.append(r)
        return tuple(out)
    return dataclasses.replace(case, ops=m(case.ops),
                               handlers=tuple((v, m(h)) for v, h in case.handlers))


@dataclass(frozen=True)
class Quirk:
    name: str
    emulator: str
    summary: str
    op_map: OpMap | None = field(default=None, compare=False)
    case_map: Callable[[Case], Case] | None = field(default=None, compare=False)
    ignored: frozenset[str] = frozenset()

    def adjust(self, case: Case) -> Case:
        if self.op_map is not None:
            case = _map_ops(case, self.op_map)
        if self.case_map is not None:
            case = self.case_map(case)
        return case

    def ignore(self, case: Case) -> frozenset[str]:
        return self.ignored


def _no_illegal_vector(op: O.Op) -> O.Op | None:
    if isinstance(op, O.Ipi) and op.mode in ("fixed", "lowest") and op.vector < 16:
        return None
    return op


def _no_level_deassert(op: O.Op) -> O.Op | None:
    if isinstance(op, O.Ipi) and op.mode in ("fixed", "lowest") and op.trigger == "level" and not op.level:
        return None
    return op


def _no_focus_bit(op: O.Op) -> O.Op | None:
    if isinstance(op, O.Write) and op.reg == "SVR":
        return dataclasses.replace(op, value=op.value & ~0x200)
    return op


def _no_ipi_to_disabled(case: Case) -> Case:
    """Drop fixed/lowest-priority IPIs from the main program that reach a software-disabled APIC
    (APs: SVR from the set-up; the BSP: SVR as the program's writes left it). Handlers need no
    filtering: no APIC delivers while software-disabled, so a handler always runs enabled."""
    from navic.conformance.case import legal_receivers

    enabled = [bool(case.cpu_setup(i).svr & 0x100) for i in range(case.cpus)]
    out = []
    for op in case.ops:
        if isinstance(op, O.Write) and op.reg == "SVR":
            enabled[0] = bool(op.value & 0x100)
        if isinstance(op, O.MmioWrite) and op.offset == 0xF0:
            enabled[0] = bool(op.value & 0x100)
        if isinstance(op, O.Ipi) and op.mode in ("fixed", "lowest"):
            if not all(enabled[i] for i in legal_receivers(case, op)):
                continue
        out.append(op)
    return dataclasses.replace(case, ops=tuple(out))


def _no_logical_broadcast(case: Case) -> Case:
    """Drop logical-destination FFh IPIs when QEMU would not reach every CPU with them: in the
    cluster model (always), in the flat model when some CPU's logical ID is 0."""
    ids = [case.cpu_setup(i) for i in range(case.cpus)]
    if all(s.dfr >> 28 == 0xF and s.ldr >> 24 for s in ids):
        return case

    def f(op: O.Op) -> O.Op | None:
        if isinstance(op, O.Ipi) and op.shorthand == "none" and op.dest_mode == "logical" \
                and op.dest == 0xFF:
            return None
        return op
    return _map_ops(case, f)


def _closed_while_disabled(case: Case) -> Case:
    """While the BSP's APIC is software-disabled keep IF = 0: insert CLI before each disabling
    SVR write and drop STIs until an enabling one (held IRR bits are then never presented)."""
    enabled = bool(case.cpu_setup(0).svr & 0x100)
    out: list[O.Op] = []
    for op in case.ops:
        svr = None
        if isinstance(op, O.Write) and op.reg == "SVR":
            svr = op.value
        elif isinstance(op, O.MmioWrite) and op.offset == 0xF0:
            svr = op.value
        if svr is not None:
            if enabled and not svr & 0x100:
                out.append(O.Cli(index=op.index))
            enabled = bool(svr & 0x100)
        if isinstance(op, O.Sti) and not enabled:
            continue
        out.append(op)
    return dataclasses.replace(case, ops=reindex(out))


QUIRKS: tuple[Quirk, ...] = (
    Quirk("illegal-vector", "qemu",
          "QEMU 7.2 accepts fixed/lowest-priority IPIs with vectors 0-15 (sets IRR and delivers "
          "them through IDT entries 0-15) and never sets ESR; the SDM (§11.5.3) discards them "
          "and sets ESR bits 5/6. Such IPIs are removed from QEMU cases.",
          op_map=_no_illegal_vector),
    Quirk("level-deassert-ipi", "qemu",
          "QEMU 7.2 ignores the ICR level bit: a level-triggered fixed IPI with level = 0 "
          "(de-assert) is accepted like an assert (IRR and TMR set, delivered). The SDM requires "
          "level = 1 for every mode but INIT de-assert; navic (like KVM) ignores such a message. "
          "These IPIs are removed from QEMU cases.",
          op_map=_no_level_deassert),
    Quirk("logical-broadcast", "qemu",
          "QEMU 7.2 treats logical destination FFh as an ordinary mask: in the cluster model it "
          "reaches only cluster 15, in the flat model only APICs with a non-zero logical ID. "
          "The SDM (§11.6.2.2) makes FFh a broadcast to all local APICs in both models (which "
          "is why the cluster model has only 15 usable clusters); navic and KVM broadcast. "
          "Such IPIs are removed from QEMU cases where the two readings differ.",
          case_map=_no_logical_broadcast),
    Quirk("svr-focus-bit", "qemu",
          "QEMU 7.2 keeps only SVR bits 8:0 (bit 9, focus processor checking, reads 0); navic "
          "models a CPU that implements it (AMD FCC, Intel P6). SVR writes in QEMU cases "
          "leave bit 9 clear.",
          op_map=_no_focus_bit),
    Quirk("svr-disabled-accepts", "qemu",
          "QEMU 7.2 accepts fixed IPIs into IRR while the target APIC is software-disabled "
          "(SVR bit 8 = 0) and delivers them once it is re-enabled; navic (like KVM, SDM "
          "§11.4.7.2 / APM §16.4.7) accepts only NMI, SMI, INIT and SIPI then. Fixed and "
          "lowest-priority IPIs that would reach a software-disabled APIC are removed.",
          case_map=_no_ipi_to_disabled),
    Quirk("svr-disabled-holds", "qemu",
          "QEMU 7.2 presents no interrupt to the CPU while its APIC is software-disabled, even "
          "one already pending in IRR; the SDM (§11.4.7.2) says pending IRR/ISR bits are held "
          "and 'require masking or handling by the CPU', which navic models by still "
          "delivering them when IF = 1. In QEMU cases the BSP keeps IF = 0 while its APIC is "
          "software-disabled (CLI before disabling, STIs dropped until re-enabled).",
          case_map=_closed_while_disabled),
)


def active_quirks(emulator: str) -> tuple[Quirk, ...]:
    return tuple(q for q in QUIRKS if q.emulator == emulator)
