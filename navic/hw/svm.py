"""SVM guest mode: VMRUN runs a guest on a physical CPU until #VMEXIT (APM vol. 2 §15, §15.29).

:meth:`Svm.vmrun` steps the guest's instructions under the VMCB's controls:

* intercepts: HLT, MSR (the MSR permission map is modelled as
  two sets of intercepted MSRs, reads and writes), INTR
  (a host interrupt pending at the pCPU), VINTR (KVM's interrupt window);
* event injection (EVENTINJ) at entry and V_IRQ when AVIC is off;
* AVIC (int_ctl bit 31) / x2AVIC (bit 30): APIC accesses follow the register access table
  (:func:`navic.hw.avic.classify_access`): allowed reads come from the backing page, TPR / edge EOI
  / ICR / SELF_IPI writes are accelerated, the rest trap or fault with AVIC_NOACCEL (0x402); an ICR
  write runs the hardware IPI algorithm (:class:`navic.hw.avic.AvicEngine`), which may end in
  AVIC_INCOMPLETE_IPI (0x401);
* interrupt evaluation of the backing page only at the APM's evaluation points: VMRUN, doorbell
  receipt, guest EOI and TPR writes — a software IRR write without a doorbell is *not* seen until
  the next one (digest §4.5).

A ``compute`` is a run of instructions with a boundary at every cycle: a host interrupt (INTR
intercept) or a doorbell with a deliverable vector arriving during it is taken then, the rest of
the compute running after the handler's IRET or after the next VMRUN
(:func:`navic.hw.isa.run_compute`).

Trap-style exits complete the instruction before exiting; fault-style exits leave it in
``ctx.exit_insn`` for the hypervisor to emulate and retire.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from navic.apic.lapic import LocalApic
from navic.apic.registers import (
    APIC_EOI,
    APIC_ICR,
    APIC_ICR2,
    APIC_SELF_IPI,
    APIC_TPR,
)
from navic.hw import avic as A
from navic.hw import isa
from navic.hw import vmcb as V
from navic.hw.isa import Fault

if TYPE_CHECKING:
    from navic.guest.kernel import GuestCpu
    from navic.hv.host import Host, HostCpu

APIC_PAGE_SIZE = 0x1000


@dataclass
class GuestContext:
    """What the silicon needs about the guest it runs besides the VMCB: the guest's CPU state
    (``guest``), the MSR permission map (as a set of intercepted MSRs) and a name for records."""

    name: str
    level: str
    vmcb: V.Vmcb
    guest: GuestCpu
    # MSRPM read / write intercept bits set: immutable sets shared by every vCPU with the same policy
    # (the hypervisor assigns another set to change them).
    msr_rd: frozenset[int] = frozenset()
    msr_wr: frozenset[int] = frozenset()
    exit_insn: Any = None
    exit_insn_offset: int = 0
    single_step: bool = False   # RFLAGS.TF set by the hypervisor (+ the #DB intercept): one instruction, then #DB
    _eval: bool = False
    npt: Any = None   # the nested page table L0 keeps for this guest (for MemWrite / tracking)

    @property
    def vapic(self) -> LocalApic:
        return self._vapic

    def bind_vapic(self, apic: LocalApic) -> None:
        """The register-file view the silicon uses for the backing page named in the VMCB."""
        self._vapic = apic


class Svm:
    """The SVM silicon of a host (shared by all its pCPUs)."""

    def __init__(self, host: Host, features: Any, avic_engine: A.AvicEngine) -> None:
        self.host = host
        self.features = features
        self.avic = avic_engine
        self.costs = host.costs
        # classify_access is a pure function of its arguments: memoised per
        # (offset, write, msr, ext_lvt_chg, eoi_level).
        self._kinds: dict[tuple[int, bool, bool, bool, bool], str] = {}

    # -- VMRUN ... #VMEXIT -------------------------------------------------------------------
    def vmrun(self, pcpu: HostCpu, ctx: GuestContext) -> Generator[Any, Any, int]:
        costs = self.costs
        vmcb = ctx.vmcb
        g = ctx.guest
        bad = V.vmrun_checks(vmcb, self.features)
        if bad is not None:
            vmcb.set_exit(V.VMEXIT_INVALID)
            return V.VMEXIT_INVALID
        self.host.rec.count("vmruns")
        yield costs.VMRUN
        # Fixed for the run: read the per-instruction costs and instruction classes once.
        INTR_ENTRY, INSN, HLT_WAKE, SPIN_LOOP = costs.INTR_ENTRY, costs.INSN, costs.HLT_WAKE, costs.SPIN_LOOP
        MmioWrite, MmioRead, Wrmsr, Rdmsr, Pause, HLT, Vmrun, MemWrite, Compute = (
            isa.MmioWrite, isa.MmioRead, isa.Wrmsr, isa.Rdmsr, isa.Pause, isa.HLT, isa.Vmrun, isa.MemWrite,
            isa.Compute)
        int_ctl = vmcb.int_ctl   # one read for both enable bits (31: AVIC, 30: x2AVIC)
        avic = bool(int_ctl & V.AVIC_ENABLE_MASK)
        x2avic = avic and bool(int_ctl & V.X2APIC_MODE_MASK)
        del int_ctl   # not part of the suspended run's state
        vapic = ctx._vapic if avic else None   # the property's value, without the call
        bar = vmcb.avic_vapic_bar & V.VMCB_AVIC_APIC_BAR_MASK
        pcpu.guest_mode = True
        pcpu.running = ctx
        pcpu.doorbell_pending = False   # VMRUN's own evaluation covers any earlier doorbell
        eval_pending = avic
        # The interrupt shadow (STI) the guest was in when it last exited (VMCB INT_STATE bit 0).
        shadow = bool(vmcb.int_state & 1)
        single_step = ctx.single_step
        stepped = False
        exit_code = -1
        info1 = info2 = 0

        # (a partial, not a closure: a closure would turn this frame's locals into cells, whose
        # order in f_locals — and so the explorer's state hash — would depend on history)
        recognisable = partial(_cuts_compute, pcpu, g, vapic)

        ei = vmcb.event_inj
        if ei & (1 << 31):
            vmcb.event_inj = 0
            typ = (ei >> 8) & 7
            shadow = False
            yield INTR_ENTRY
            g.enter_handler(ei & 0xFF, "nmi" if typ == 2 else "irq")

        while True:
            # ---- instruction boundary --------------------------------------------------
            if single_step and stepped:
                exit_code = V.SVM_EXIT_EXCP_BASE + 1   # the single-step #DB (KVM intercepts #DB then)
                break
            if pcpu.intr_pending:
                pcpu.intr_pending = False
                exit_code = V.SVM_EXIT_INTR
                break
            if pcpu.doorbell_pending:
                pcpu.doorbell_pending = False
                eval_pending = avic
            if not shadow:
                if eval_pending:
                    v = vapic.has_interrupt()  # type: ignore[union-attr]
                    if v < 0:
                        eval_pending = False
                    elif g.IF:
                        vapic.ack_vector(v)  # type: ignore[union-attr]
                        yield INTR_ENTRY
                        g.enter_handler(v, "irq")
                        continue
                elif not avic and vmcb.v_irq and g.IF:
                    if vmcb.intercept(V.INTERCEPT_VINTR):
                        exit_code = V.SVM_EXIT_VINTR
                        break
                    vmcb.v_irq = 0
                    yield INTR_ENTRY
                    g.enter_handler(vmcb.v_intr_vector, "irq")
                    continue
            if single_step:
                stepped = True

            # ---- fetch and execute -----------------------------------------------------
            insn = g.next_insn()
            t = type(insn)
            if shadow and t is Compute and g.IF and (
                    (eval_pending and vapic.has_interrupt() >= 0)  # type: ignore[union-attr]
                    or (not avic and vmcb.v_irq)):
                shadow = False   # the shadow ends after the compute's first instruction
                yield from isa.run_first_insn(insn, g, INSN)
                continue
            shadow = False
            if t is Compute:
                yield from isa.run_compute(insn, g, pcpu.wake, recognisable)
            elif t is MmioWrite or t is MmioRead:
                off = insn.addr - bar
                write = t is MmioWrite
                if avic and not x2avic and 0 <= off < APIC_PAGE_SIZE and not g.x2apic:
                    r = yield from self._avic_access(pcpu, ctx, off, write, insn.value if write else 0,
                                                     msr=False)
                    if r is None:  # completed in hardware
                        eval_pending = eval_pending or ctx._eval
                        continue
                    exit_code, info1, info2 = r
                    break
                # Not accelerated (AVIC off, x2APIC mode, or outside the BAR): the access is MMIO
                # the hypervisor emulates (a nested page fault; KVM decodes it at the APIC's own
                # base, apic_mmio_in_range()). Guest MMIO ops only ever address an APIC page.
                ctx.exit_insn = insn
                exit_code, info1, info2 = V.SVM_EXIT_NPF, (1 << 1) if write else 0, insn.addr
                break
            elif t is Wrmsr or t is Rdmsr:
                msr = insn.msr
                write = t is Wrmsr
                if msr in (ctx.msr_wr if write else ctx.msr_rd):
                    ctx.exit_insn = insn
                    exit_code, info1, info2 = V.SVM_EXIT_MSR, 1 if write else 0, 0
                    break
                if x2avic and 0x800 <= msr <= 0x8FF:
                    r = yield from self._avic_access(pcpu, ctx, (msr - 0x800) << 4, write,
                                                     insn.value if write else 0, msr=True)
                    if r is None:
                        eval_pending = eval_pending or ctx._eval
                        continue
                    exit_code, info1, info2 = r
                    break
                g.retire(Fault("#GP", f"MSR {msr:#x} not implemented"))
                yield INSN
            elif t is Vmrun:
                # A guest hypervisor's VMRUN: L0 always intercepts it (nested.c emulates it).
                if vmcb.intercept(V.INTERCEPT_VMRUN):
                    ctx.exit_insn = insn
                    exit_code, info1, info2 = V.SVM_EXIT_VMRUN, 0, 0
                    break
                g.retire(Fault("#UD", "VMRUN not intercepted"))
                yield INSN
            elif t is isa.Hypercall and vmcb.intercept(V.INTERCEPT_VMMCALL):
                ctx.exit_insn = insn   # the VMMCALL intercept: the hypervisor emulates the call
                exit_code, info1, info2 = V.SVM_EXIT_VMMCALL, 0, 0
                break
            elif t is MemWrite:
                npt = ctx.npt
                if npt is not None and npt.is_write_protected(insn.gpa >> 12):
                    ctx.exit_insn = insn
                    exit_code, info1, info2 = V.SVM_EXIT_NPF, (1 << 1) | 1, insn.gpa  # write, present
                    break
                hpa = npt.translate(insn.gpa, write=True) if npt is not None else insn.gpa
                self.host.mem.write(hpa, insn.size, insn.value)
                g.retire(None)
                yield INSN
            elif insn is HLT:
                if vmcb.intercept(V.INTERCEPT_HLT):
                    ctx.exit_insn = insn
                    exit_code = V.SVM_EXIT_HLT
                    break
                while not (pcpu.intr_pending or pcpu.doorbell_pending or (eval_pending and g.IF)):
                    yield pcpu.wake
                g.retire(None)
                yield HLT_WAKE
            elif t is Pause:
                if g.epoch == insn.epoch and not (eval_pending and g.IF):
                    while not (pcpu.intr_pending or pcpu.doorbell_pending or g.epoch != insn.epoch
                               or (not avic and vmcb.v_irq and g.IF)):
                        yield pcpu.wake
                g.retire(None)
                yield SPIN_LOOP
            else:
                done = isa.execute_plain(insn, g, costs)
                if done is None:  # pragma: no cover
                    raise TypeError(f"unknown instruction {insn!r}")
                shadow = done[1]
                yield done[0]
                if insn is isa.IRET and vmcb.intercept(V.INTERCEPT_IRET):
                    # The IRET intercept (APM §15.9; KVM's NMI window): the exit is taken once the
                    # IRET has unblocked NMIs (see docs/model.md "Peer suites").
                    exit_code = V.SVM_EXIT_IRET
                    break

        # ---- #VMEXIT ----------------------------------------------------------------------
        vmcb.set_exit(exit_code, info1, info2)
        vmcb.int_state = 1 if shadow else 0   # SVM_INTERRUPT_SHADOW_MASK: an exit inside STI's shadow
        if avic:
            vmcb.v_tpr = (vapic.regs[APIC_TPR >> 2] >> 4) & 0xF  # type: ignore[union-attr]
        pcpu.guest_mode = False
        pcpu.running = None
        yield costs.VMEXIT
        return exit_code

    # -- AVIC register access (APM Table 15-22) -------------------------------------------
    def _avic_access(self, pcpu: HostCpu, ctx: GuestContext, off: int, write: bool, value: int,
                     *, msr: bool) -> Generator[Any, Any, tuple[int, int, int] | None]:
        """Perform one guest APIC access under AVIC. Returns None if it completed in hardware
        (and sets ``ctx._eval`` when it is an evaluation point), else (exit, info1, info2)."""
        costs = self.costs
        g = ctx.guest
        vapic = ctx._vapic   # ctx.vapic without the property call
        regs = vapic.regs
        ctx._eval = False
        eoi_level = write and off == APIC_EOI and A.eoi_is_level(vapic.page)
        key = (off, write, msr, self.features.ext_lvt_avic_access_chg, eoi_level)
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = A.classify_access(*key)
        # The reserved-bit checks only where a reserved bit is set (_x2apic_reserved would return "").
        if kind == A.GP or (msr and write and value & _X2APIC_RESERVED.get(off, 0)
                            and (why := _x2apic_reserved(off, value))):
            g.retire(Fault("#GP", "x2APIC access check" if kind == A.GP else why))
            yield costs.APIC_ACCESS
            return None
        if kind == A.FAULT:
            ctx.exit_insn_offset = off
            if msr:
                m = 0x800 + (off >> 4)
                ctx.exit_insn = isa.Wrmsr(m, value) if write else isa.Rdmsr(m)
            else:
                ctx.exit_insn = isa.MmioWrite(off, value) if write else isa.MmioRead(off)
            return (V.SVM_EXIT_AVIC_UNACCELERATED_ACCESS, *A.noaccel_exit_info(off, write))
        if not write:
            if msr and off == APIC_ICR:
                val = regs[APIC_ICR >> 2] | (regs[APIC_ICR2 >> 2] << 32)
            else:
                val = regs[off >> 2]
            g.retire(val)
            yield costs.APIC_ACCESS
            return None
        if kind == A.ACCELERATED:
            if off == APIC_TPR:
                regs[APIC_TPR >> 2] = value & 0xFF
                vapic.update_ppr()
                ctx._eval = True
            elif off == APIC_EOI:
                isr = vapic.highest_isr()
                if isr >= 0:
                    vapic.clear_isr(isr)
                    vapic.update_ppr()
                ctx._eval = True
            else:  # ICR (MMIO 300h / MSR 830h) or SELF_IPI (MSR 83Fh)
                g.retire(None)  # the write itself completes: AVIC IPI exits are traps
                yield costs.APIC_ACCESS
                if off == APIC_SELF_IPI:
                    saved = regs[APIC_ICR >> 2], regs[APIC_ICR2 >> 2]
                    lo, hi = (value & 0xFF) | (1 << 18), 0   # fixed, edge, self shorthand
                else:
                    saved = None
                    lo = value & 0xFFFFFFFF
                    hi = (value >> 32) if msr else None
                host = self.host
                name = ctx.name
                own_id = pcpu.apic_id

                def ring(host_id: int) -> None:
                    # The "doorbell to self" of a self-IPI (APM §15.29.6.1 step 1) is this core
                    # re-evaluating its own vAPIC: at once, like Intel's self-IPI virtualization
                    # (SDM §30.1.x), not a message over the wire (docs/model.md "Peer suites").
                    if host_id == own_id:
                        ctx._eval = True
                    else:
                        host.doorbell(host_id, src=pcpu.index)

                res = yield from self.avic.icr_write(
                    ctx.vmcb, vapic.apic_id, own_id, lo, hi,
                    irr_set=lambda hpa, vec, _i: host.on_hw_irr_set(hpa, vec, name), doorbell=ring)
                if saved is not None:
                    regs[APIC_ICR >> 2], regs[APIC_ICR2 >> 2] = saved
                if res is None:
                    return None
                return res.code, res.info1, res.info2
            g.retire(None)
            yield costs.APIC_ACCESS
            return None
        regs[off >> 2] = value & 0xFFFFFFFF
        if msr and off == APIC_ICR:
            regs[APIC_ICR2 >> 2] = value >> 32
        g.retire(None)
        yield costs.APIC_ACCESS
        if kind == A.TRAP:
            vec = vapic.highest_isr() if eoi_level else 0
            return (V.SVM_EXIT_AVIC_UNACCELERATED_ACCESS, *A.noaccel_exit_info(off, True, max(vec, 0)))
        return None  # allowed: a plain backing-page write



def _cuts_compute(pcpu: HostCpu, g: GuestCpu, vapic: LocalApic | None) -> bool:
    """What cuts a guest's compute short: a host interrupt (#VMEXIT(INTR) at the next instruction
    boundary, APM vol. 2 §15.21), or with AVIC (``vapic``) a doorbell whose IRR evaluation finds a
    vector the guest takes now (§15.29; digest §4.4/§4.5: a doorbell received in guest mode is an
    evaluation point). V_IRQ does not change while the guest runs."""
    return pcpu.intr_pending or (pcpu.doorbell_pending and vapic is not None and g.IF
                                 and vapic.has_interrupt() >= 0)


# Reserved bits of the x2APIC writes AVIC accelerates (the bits _x2apic_reserved checks).
_X2APIC_RESERVED = {APIC_EOI: -1, APIC_TPR: ~0xFF, APIC_SELF_IPI: ~0xFF, APIC_ICR: 0xFFF33000}


def _x2apic_reserved(off: int, value: int) -> str:
    """x2APIC #GP checks for the writes AVIC accelerates (SDM §11.12.1.2): non-zero reserved bits."""
    if off == APIC_EOI and value:
        return "EOI write must be 0"
    if off == APIC_TPR and value >> 8:
        return "TPR bits 63:8 are reserved"
    if off == APIC_SELF_IPI and value >> 8:
        return "SELF_IPI bits 63:8 are reserved"
    if off == APIC_ICR and value & 0xFFF33000:  # bits 12, 13, 17:16, 31:20
        return "ICR reserved bits set"
    return ""
