"""A physical CPU: its local APIC, and native execution of guest code (bare metal).

Native execution steps a :class:`~navic.guest.kernel.GuestCpu` instruction by instruction
against this CPU's own local APIC. At every instruction boundary it recognises, in priority
order (SDM vol. 3 §6.9): INIT, NMI (unless blocked), then a maskable interrupt when IF = 1 and
not in the one-instruction STI shadow. A ``compute`` is a run of instructions, so an event that
becomes recognisable during it is taken then (:func:`navic.hw.isa.run_compute`). Virtualised
execution (guest mode under SVM/VMX) lives in :mod:`navic.hw.svm` and :mod:`navic.hw.vmx`.
"""

from __future__ import annotations

from collections.abc import Generator
from functools import partial
from typing import TYPE_CHECKING, Any

from navic.apic.lapic import _IRR_HI, _IRR_LO, _NO_BITS, GPFault, LocalApic
from navic.apic.registers import MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE
from navic.hw import isa
from navic.hw.isa import Fault

if TYPE_CHECKING:
    from navic.guest.kernel import GuestCpu
    from navic.hw.machine import Machine

APIC_MSRS = range(0x800, 0x900)


class PhysCpu:
    def __init__(self, machine: Machine, index: int, apic: LocalApic) -> None:
        self.machine = machine
        self.index = index
        self.apic = apic
        self.wake = machine.engine.signal(f"pcpu{index}.wake")
        self.halted = False
        self.plain_memory: dict[int, int] = {}  # the APIC page when the APIC does not claim it

    def __repr__(self) -> str:
        return f"<PhysCpu {self.index}>"

    # -- what the APIC presents at an instruction boundary ---------------------------------
    def _interruptible(self, g: GuestCpu) -> bool:
        a = self.apic
        if a.init_pending or (a.nmi_pending and not g.nmi_blocked) or a.smi_pending:
            return True
        # An empty IRR is has_interrupt() < 0 without the call (see LocalApic.has_interrupt).
        return g.IF and a.page[_IRR_LO:_IRR_HI] != _NO_BITS and a.has_interrupt() >= 0

    def run_native(self, g: GuestCpu) -> Generator[Any, Any, None]:
        """The process of a bare-metal CPU running ``g``."""
        m = self.machine
        costs = m.costs
        a = self.apic
        page = a.page
        shadow = False
        apic_lo = g.apic_base
        MmioWrite, MmioRead, Wrmsr, Rdmsr, Pause, HLT, Compute = (
            isa.MmioWrite, isa.MmioRead, isa.Wrmsr, isa.Rdmsr, isa.Pause, isa.HLT, isa.Compute)
        execute_plain = isa.execute_plain
        run_compute = isa.run_compute
        # What cuts a compute short: what the next instruction boundary would take.
        recognisable = partial(self._interruptible, g)
        # The cost model is fixed for a run: read the per-instruction costs once.
        INTR_ENTRY, APIC_ACCESS, SPIN_LOOP, HLT_WAKE, INSN = (
            costs.INTR_ENTRY, costs.APIC_ACCESS, costs.SPIN_LOOP, costs.HLT_WAKE, costs.INSN)
        while True:
            # ---- instruction boundary: events -------------------------------------------
            if not shadow:
                if a.init_pending:
                    a.take_init()
                    m.init_cpu(self, g)
                    g.note_event(0, "init")
                    while True:
                        if a.sipi_vector is not None:
                            vec = a.take_sipi()
                            break
                        self.halted = True
                        yield self.wake
                        self.halted = False
                    m.sipi_cpu(self, g)
                    g.note_event(vec if vec is not None else 0, "sipi")
                    yield INTR_ENTRY
                    continue
                if a.sipi_vector is not None:
                    a.take_sipi()  # a SIPI outside wait-for-SIPI is ignored (SDM §8.4.4.1)
                if a.smi_pending:
                    # SMM is invisible to the program: record the SMI, charge an entry/exit.
                    a.take_smi()
                    g.note_event(0, "smi")
                    yield INTR_ENTRY
                    continue
                if a.nmi_pending and not g.nmi_blocked:
                    a.take_nmi()
                    yield INTR_ENTRY
                    g.enter_handler(2, "nmi")
                    continue
                # An empty IRR (no byte of it set) is has_interrupt() < 0, which has no side
                # effect: test it here and skip the call at most instruction boundaries.
                if g.IF and page[_IRR_LO:_IRR_HI] != _NO_BITS and (v := a.has_interrupt()) >= 0:
                    a.ack_vector(v)
                    yield INTR_ENTRY
                    g.enter_handler(v, "irq")
                    continue
            # ---- fetch and execute ------------------------------------------------------
            insn = g.next_insn()
            t = type(insn)
            if shadow and t is Compute and recognisable():
                shadow = False   # the shadow ends after the compute's first instruction
                yield from isa.run_first_insn(insn, g, INSN)
                continue
            shadow = False
            if t is Compute:
                yield from run_compute(insn, g, self.wake, recognisable)
            elif t is MmioWrite or t is MmioRead:
                # (a.apic_base and a.mode == "xapic", read without the property calls)
                apic_lo = a._apic_base & 0xFFFFF000
                off = insn.addr - apic_lo
                claimed = a._hw_enabled and not a._x2apic and 0 <= off < 0x1000
                if t is MmioWrite:
                    if claimed:
                        a.mmio_write(off, insn.value)
                    else:
                        self.plain_memory[insn.addr] = insn.value & 0xFFFFFFFF
                    g.retire(None)
                else:
                    g.retire(a.mmio_read(off) if claimed else self.plain_memory.get(insn.addr, 0))
                yield APIC_ACCESS
            elif t is Wrmsr or t is Rdmsr:
                msr = insn.msr
                if msr in APIC_MSRS:
                    # self._msr(insn) for the x2APIC register MSRs, inlined.
                    try:
                        if t is Wrmsr:
                            a.wrmsr(msr, insn.value)
                            r = None
                        else:
                            r = a.rdmsr(msr)
                    except GPFault as e:
                        r = Fault("#GP", str(e))
                    g.retire(r)
                else:
                    g.retire(self._msr(insn))
                yield APIC_ACCESS
            elif t is Pause:
                while g.epoch == insn.epoch and not self._interruptible(g):
                    yield self.wake
                g.retire(None)
                yield SPIN_LOOP
            elif insn is HLT:
                if not self._interruptible(g):
                    self.halted = True
                    while not self._interruptible(g):
                        yield self.wake
                    self.halted = False
                    g.retire(None)
                    yield HLT_WAKE
                else:
                    g.retire(None)
                    yield INSN
            else:
                done = execute_plain(insn, g, costs)
                if done is None:  # pragma: no cover
                    raise TypeError(f"unknown instruction {insn!r}")
                shadow = done[1]
                yield done[0]

    def _msr(self, insn: isa.Wrmsr | isa.Rdmsr) -> Any:
        msr = insn.msr
        a = self.apic
        try:
            if msr in APIC_MSRS or msr == MSR_IA32_APICBASE or msr == MSR_IA32_TSC_DEADLINE:
                if type(insn) is isa.Wrmsr:
                    a.wrmsr(msr, insn.value)
                    return None
                return a.rdmsr(msr)
        except GPFault as e:
            return Fault("#GP", str(e))
        return Fault("#GP", f"MSR {msr:#x} is not implemented")
