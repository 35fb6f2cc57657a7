"""VMX non-root operation: VM entry runs a guest on a physical CPU until a VM exit, with Intel's
APIC virtualisation (SDM vol. 3C ch. 30 "APIC Virtualization and Virtual Interrupts"; digest §7).

:meth:`Vmx.vmentry` steps the guest's instructions under the controls in a :class:`VmcsContext`:

* **virtual-APIC page** = the vCPU's :class:`~navic.apic.lapic.LocalApic` page (KVM points
  VIRTUAL_APIC_PAGE_ADDR at ``apic->regs``); the guest-interrupt status RVI/SVI lives in the context;
* **xAPIC** ("virtualize APIC accesses", APIC-access page at 0xFEE00000; with the control 0 an
  access there goes to whatever the EPT maps — ``ept_apic_page_hpa``, plain memory — or is an EPT
  violation when nothing is mapped, as every access elsewhere): reads of the registers of
  SDM §30.4.2 come from the page when "APIC-register virtualization" is on (TPR always, with the TPR
  shadow); writes follow §30.4.3: TPR virtualisation, EOI virtualisation, self-IPI / IPI
  virtualisation of ICR low, ICR high written silently, every other virtualised write lands in the
  page and takes a trap-like APIC-write exit (``apic_write``); anything not virtualised takes a
  fault-like APIC-access exit (``apic_access``);
* **x2APIC** ("virtualize x2APIC mode"): the MSR bitmap (two sets of intercepted MSRs) decides
  ``msr_read`` / ``msr_write`` exits; passed-through reads come from the page, passed-through writes
  of TPR / EOI / SELF_IPI / ICR are virtualised as above (§30.5);
* **virtual-interrupt delivery**: a virtual interrupt is pending iff RVI[7:4] > VPPR[7:4]; it is
  delivered at an instruction boundary with IF = 1 outside the STI shadow (§30.2.2). RVI changes only
  at VM entry (KVM's ``vmx_set_rvi``), posted-interrupt processing, self-IPI / delivery; VPPR at TPR
  writes, EOI and delivery; so checking at every boundary equals evaluating at the SDM's points;
* **EOI virtualisation** (§30.1.4): clear VISR[SVI], SVI <- next, PPR virtualisation; EOI-exit bitmap
  bit set -> trap-like EOI-induced exit (``eoi_induced``, qualification = vector);
* **posted-interrupt processing** (§30.6): a host interrupt with the notification vector
  (``HostCpu.pi_pending``) while "process posted interrupts" is on merges PIR into VIRR without an
  exit; any other host interrupt (``HostCpu.intr_pending``), or the notification vector with posted
  interrupts off, is an ``external_interrupt`` exit;
* **IPI virtualisation** (tertiary control): :func:`navic.hw.vmx.ipiv_icr_write`; the notification it
  sends travels as a host IPI (``Host.send_host_ipi``, kind by vector);
* event injection (VM-entry interruption information) and interrupt-window exiting when APICv is off;
  TPR-below-threshold with the TPR shadow only; HLT exiting.

A ``compute`` is a run of instructions with a boundary at every cycle: a host interrupt or a
posted-interrupt notification arriving during it is recognised then (an external-interrupt exit,
or posted-interrupt processing and, if it makes a virtual interrupt deliverable, its delivery),
the rest running after IRET or the next VM entry (:func:`navic.hw.isa.run_compute`).

Trap-like exits complete the instruction before exiting; fault-like exits leave it in
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
    APIC_PPR,
    APIC_SELF_IPI,
    APIC_TPR,
    X2APIC_MSR_BASE,
)
from navic.hw import isa
from navic.hw import vmx as X
from navic.hw.isa import Fault

if TYPE_CHECKING:
    from navic.guest.kernel import GuestCpu
    from navic.hv.host import Host, HostCpu

APIC_ACCESS_PAGE = 0xFEE00000   # KVM maps its APIC-access page at the default APIC base
APIC_PAGE_SIZE = 0x1000
INTR_INFO_VALID = 1 << 31
INTR_TYPE_EXT_INTR = 0
INTR_TYPE_NMI = 2

# SDM §30.4.2: reads virtualised when "APIC-register virtualization" is 1.
VIRT_READS = frozenset((0x20, 0x30, APIC_TPR, APIC_EOI, 0xD0, 0xE0, 0xF0, *range(0x100, 0x280, 0x10), 0x280,
                        APIC_ICR, APIC_ICR2, *range(0x320, 0x380, 0x10), 0x380, 0x3E0))
# SDM §30.4.3.1: writes virtualised when "APIC-register virtualization" is 1 ...
VIRT_WRITES = frozenset((0x20, APIC_TPR, APIC_EOI, 0xD0, 0xE0, 0xF0, 0x280, APIC_ICR, APIC_ICR2,
                         *range(0x320, 0x380, 0x10), 0x380, 0x3E0))
# ... and when only "virtual-interrupt delivery" is 1.
VID_WRITES = frozenset((APIC_TPR, APIC_EOI, APIC_ICR))

# x2APIC ICR bits that must be 0 (SDM §11.12.9; KVM's X2APIC_ICR_RESERVED_BITS). BUSY (bit 12) is
# not among them: Intel ignores it in x2APIC mode.
X2APIC_ICR_RESERVED = (0xFFF << 20) | (3 << 16) | (1 << 13)

# Host-IPI kinds (navic.hv.host) by physical vector.
HOST_IPI_KIND = {X.POSTED_INTR_VECTOR: "posted_intr", X.POSTED_INTR_WAKEUP_VECTOR: "pi_wakeup"}


def _cuts_compute(pcpu: HostCpu, ctx: VmcsContext) -> bool:
    """What cuts a guest's compute short: any host interrupt, the notification vector included —
    with external-interrupt exiting they are recognised whatever the guest's IF (SDM vol. 3C
    §26.2; §30.6 for the notification vector's posted-interrupt processing)."""
    return pcpu.intr_pending or pcpu.pi_pending or ctx.pi_nested_pending


@dataclass
class VmcsContext:
    """The parts of a VMCS the APIC-virtualisation model uses, plus the guest it runs.

    ``owner`` is whoever the virtual APIC belongs to (KVM's vCPU: it has ``name`` and ``poll``); the
    silicon uses it only for provenance records and to wake a halt-polling thread."""

    name: str
    level: str
    guest: GuestCpu
    vapic: LocalApic
    owner: Any = None
    pid: X.PostedInterruptDesc | None = None
    # Controls (secondary / tertiary / pin-based / primary).
    virt_apic_accesses: bool = True    # xAPIC: the APIC-access page
    virt_x2apic_mode: bool = False     # x2APIC: MSR-based virtualisation
    apic_reg_virt: bool = False        # APIC-register virtualization
    vid: bool = False                  # virtual-interrupt delivery
    posted_intr: bool = False          # process posted interrupts (notification vector = pi_nv)
    pi_nv: int = X.POSTED_INTR_VECTOR  # POSTED_INTR_NV (vmcs02 of a nested guest: POSTED_INTR_NESTED_VECTOR)
    ipiv: bool = False                 # tertiary: IPI virtualization
    hlt_exiting: bool = True
    intr_window_exiting: bool = False
    nmi_window_exiting: bool = False   # "NMI-window exiting" (SDM §25.6.2, §26.7.6)
    sti_blocking: bool = False         # GUEST_INTERRUPTIBILITY_INFO bit 0: blocking by STI (saved at exit)
    tpr_threshold: int = 0             # TPR_THRESHOLD[3:0] (TPR shadow without VID)
    pid_table_hpa: int = 0             # PID_POINTER_TABLE
    last_pid_index: int = -1           # LAST_PID_POINTER_INDEX
    eoi_exit_bitmap: int = 0           # EOI_EXIT_BITMAP0..3 as one 256-bit int
    msr_rd: frozenset[int] = frozenset()   # MSR-bitmap read intercepts (immutable, shared per policy)
    msr_wr: frozenset[int] = frozenset()   # MSR-bitmap write intercepts
    # Guest state.
    rvi: int = 0                       # GUEST_INTR_STATUS[7:0]
    svi: int = 0                       # GUEST_INTR_STATUS[15:8]
    entry_intr_info: int = 0           # VM_ENTRY_INTR_INFO_FIELD
    # Exit information.
    exit_reason: int = 0
    exit_qualification: int = 0
    exit_insn: Any = None
    # A POSTED_INTR_NESTED_VECTOR notification latched for this (vmcs02) context while it runs.
    pi_nested_pending: bool = False
    vmcs_gpa: int = 0                  # a guest hypervisor's VMCS: its guest-physical address (vmcs12)
    # EPT: the page mapped at the APIC-access address 0xFEE00000 (KVM's APIC-access page; vmcs12:
    # an L1 GPA), 0 when nothing is (KVM emulates accesses there: an EPT violation).
    ept_apic_page_hpa: int = 0


class Vmx:
    """The VMX silicon of a host (shared by all its pCPUs)."""

    def __init__(self, host: Host, features: Any) -> None:
        self.host = host
        self.features = features
        self.costs = host.costs
        self.mem = host.mem
        # PID address -> the vCPU it belongs to (provenance of hardware posts; set by the hypervisor).
        self.pid_owner: dict[int, Any] = {}
        self.fine_grained = True

    # -- VM entry ... VM exit ----------------------------------------------------------------
    def vmentry(self, pcpu: HostCpu, ctx: VmcsContext) -> Generator[Any, Any, int]:  # noqa: C901
        costs = self.costs
        g = ctx.guest
        vapic = ctx.vapic
        self.host.rec.count("vmentries")
        pcpu.guest_mode = True   # from here a notification is a posted interrupt, not a host IRQ
        pcpu.running = ctx
        yield costs.VMENTRY
        shadow = ctx.sti_blocking   # the guest interruptibility state it exited with
        reason = -1
        qual = 0

        recognisable = partial(_cuts_compute, pcpu, ctx)   # (not a closure: see navic.hw.svm)

        info = ctx.entry_intr_info
        if info & INTR_INFO_VALID:
            ctx.entry_intr_info = 0
            shadow = False
            yield costs.INTR_ENTRY
            g.enter_handler(info & 0xFF, "nmi" if (info >> 8) & 7 == INTR_TYPE_NMI else "irq")

        while True:
            # ---- instruction boundary: host interrupts ---------------------------------
            if pcpu.pi_pending:
                pcpu.pi_pending = False
                if ctx.posted_intr and ctx.pid is not None and ctx.pi_nv == X.POSTED_INTR_VECTOR:
                    yield from self._process_posted(ctx)
                else:
                    reason = X.EXIT_REASON_EXTERNAL_INTERRUPT
                    break
            if ctx.pi_nested_pending:
                # POSTED_INTR_NESTED_VECTOR while a nested guest's vmcs02 runs (L0 posted into the PID
                # its hypervisor set up): processed like any notification matching POSTED_INTR_NV.
                ctx.pi_nested_pending = False
                if ctx.posted_intr and ctx.pid is not None:
                    yield from self._process_posted(ctx)
            if pcpu.intr_pending:
                pcpu.intr_pending = False
                reason = X.EXIT_REASON_EXTERNAL_INTERRUPT
                break
            if ctx.nmi_window_exiting and not g.nmi_blocked and not shadow:
                # No virtual-NMI blocking (nor, as this processor does, blocking by STI): §26.7.6.
                reason = X.EXIT_REASON_NMI_WINDOW
                break
            # ---- virtual interrupts / interrupt window ---------------------------------
            if not shadow and g.IF:
                if ctx.intr_window_exiting:
                    reason = X.EXIT_REASON_INTERRUPT_WINDOW
                    break
                if ctx.vid:
                    v = self.pending_virtual(ctx)
                    if v >= 0:
                        self._deliver_virtual(ctx, v)
                        yield costs.INTR_ENTRY
                        g.enter_handler(v, "irq")
                        continue
            # ---- fetch and execute -----------------------------------------------------
            insn = g.next_insn()
            t = type(insn)
            if shadow and t is isa.Compute and g.IF and (
                    ctx.intr_window_exiting or (ctx.vid and self.pending_virtual(ctx) >= 0)):
                shadow = False   # the shadow ends after the compute's first instruction
                yield from isa.run_first_insn(insn, g, costs.INSN)
                continue
            shadow = False
            if t is isa.Compute:
                yield from isa.run_compute(insn, g, pcpu.wake, recognisable)
            elif t is isa.MmioWrite or t is isa.MmioRead:
                off = insn.addr - APIC_ACCESS_PAGE
                in_page = 0 <= off < APIC_PAGE_SIZE
                if ctx.virt_apic_accesses and in_page:
                    r = yield from self._apic_page_access(pcpu, ctx, insn, off)
                    if r is None:
                        continue
                    reason, qual = r
                    break
                if in_page and ctx.ept_apic_page_hpa:
                    # "Virtualize APIC accesses" is 0: the address means nothing special (SDM
                    # §30.4) and the access goes to what the EPT maps there — plain memory.
                    self._plain_access(ctx, insn, off)
                    yield costs.INSN
                    continue
                # Nothing mapped there: an EPT violation (qualification bit 0 read, bit 1 write);
                # the hypervisor emulates the access. Guest MMIO ops only address an APIC page.
                ctx.exit_insn = insn
                reason, qual = X.EXIT_REASON_EPT_VIOLATION, 2 if t is isa.MmioWrite else 1
                break
            elif t is isa.Wrmsr or t is isa.Rdmsr:
                write = t is isa.Wrmsr
                msr = insn.msr
                if msr in (ctx.msr_wr if write else ctx.msr_rd):
                    ctx.exit_insn = insn
                    reason = X.EXIT_REASON_MSR_WRITE if write else X.EXIT_REASON_MSR_READ
                    break
                if ctx.virt_x2apic_mode and X2APIC_MSR_BASE <= msr <= X2APIC_MSR_BASE + 0xFF:
                    r = yield from self._x2apic_msr(pcpu, ctx, insn, (msr - X2APIC_MSR_BASE) << 4, write)
                    if r is None:
                        continue
                    reason, qual = r
                    break
                g.retire(Fault("#GP", f"MSR {msr:#x} not implemented"))
                yield costs.INSN
            elif insn is isa.HLT:
                if ctx.hlt_exiting:
                    ctx.exit_insn = insn
                    reason = X.EXIT_REASON_HLT
                    break
                while not (pcpu.intr_pending or pcpu.pi_pending or ctx.pi_nested_pending
                           or (g.IF and ctx.vid and self.pending_virtual(ctx) >= 0)):
                    yield pcpu.wake
                g.retire(None)
                yield costs.HLT_WAKE
            elif t is isa.Pause:
                if g.epoch == insn.epoch and not (g.IF and ctx.vid and self.pending_virtual(ctx) >= 0):
                    while not (pcpu.intr_pending or pcpu.pi_pending or ctx.pi_nested_pending
                               or g.epoch != insn.epoch or (g.IF and ctx.intr_window_exiting)):
                        yield pcpu.wake
                g.retire(None)
                yield costs.SPIN_LOOP
            elif t is isa.Hypercall:
                # VMCALL exits unconditionally in VMX non-root operation (SDM §26.1.2).
                ctx.exit_insn = insn
                reason = X.EXIT_REASON_VMCALL
                break
            elif t is isa.Vmresume:
                # A guest hypervisor's VMRESUME: VMX instructions always exit in non-root mode.
                ctx.exit_insn = insn
                reason = X.EXIT_REASON_VMRESUME
                break
            else:
                done = isa.execute_plain(insn, g, costs)
                if done is None:  # pragma: no cover
                    raise TypeError(f"unknown instruction {insn!r}")
                shadow = done[1]
                yield done[0]

        # ---- VM exit ---------------------------------------------------------------------
        ctx.sti_blocking = shadow
        ctx.exit_reason = reason
        ctx.exit_qualification = qual
        if ctx.vid:
            vapic.regs[APIC_PPR >> 2] = self.vppr(ctx)
        pcpu.guest_mode = False
        pcpu.running = None
        yield costs.VMEXIT
        return reason

    # -- virtual-interrupt delivery (SDM §30.1, §30.2) ---------------------------------------
    @staticmethod
    def vppr(ctx: VmcsContext) -> int:
        """PPR virtualisation: VTPR if its class is >= SVI's class, else SVI's class."""
        vtpr = ctx.vapic.regs[APIC_TPR >> 2] & 0xFF
        return vtpr if (vtpr & 0xF0) >= (ctx.svi & 0xF0) else ctx.svi & 0xF0

    def pending_virtual(self, ctx: VmcsContext) -> int:
        """The vector recognised as a pending virtual interrupt (RVI[7:4] > VPPR[7:4]), else -1."""
        rvi = ctx.rvi
        if rvi and (rvi & 0xF0) > (self.vppr(ctx) & 0xF0):
            return rvi
        return -1

    @staticmethod
    def _deliver_virtual(ctx: VmcsContext, v: int) -> None:
        """Virtual-interrupt delivery: VISR[v] <- 1, SVI <- v, VPPR <- v & F0, VIRR[v] <- 0, RVI <- next."""
        a = ctx.vapic
        a.set_isr(v)
        a.clear_irr(v)
        ctx.svi = v
        a.regs[APIC_PPR >> 2] = v & 0xF0
        ctx.rvi = max(a.highest_irr(), 0)

    def _eoi_virtualisation(self, ctx: VmcsContext) -> tuple[int, int] | None:
        """EOI virtualisation; returns an EOI-induced exit if the vector is in the EOI-exit bitmap."""
        a = ctx.vapic
        v = ctx.svi
        a.clear_isr(v)
        ctx.svi = max(a.highest_isr(), 0)
        a.regs[APIC_PPR >> 2] = self.vppr(ctx)
        if v and (ctx.eoi_exit_bitmap >> v) & 1:
            return X.EXIT_REASON_EOI_INDUCED, v
        return None

    def _tpr_virtualisation(self, ctx: VmcsContext) -> tuple[int, int] | None:
        a = ctx.vapic
        if ctx.vid:
            a.regs[APIC_PPR >> 2] = self.vppr(ctx)
            return None
        if ((a.regs[APIC_TPR >> 2] >> 4) & 0xF) < (ctx.tpr_threshold & 0xF):
            return X.EXIT_REASON_TPR_BELOW_THRESHOLD, 0
        return None

    def _self_ipi(self, ctx: VmcsContext, vector: int) -> None:
        """Self-IPI virtualisation: VIRR[v] <- 1, RVI <- max(RVI, v)."""
        ctx.vapic.set_irr(vector)
        ctx.rvi = max(ctx.rvi, vector)
        self._accepted(ctx.owner, vector, ctx)

    def _process_posted(self, ctx: VmcsContext) -> Generator[Any, Any, None]:
        """Posted-interrupt processing: ON <- 0, VIRR |= PIR, PIR <- 0, RVI <- max(RVI, PIR max)."""
        self.host.rec.count("posted_intr_processed")
        ctx.rvi = X.process_posted_interrupts(ctx.pid, ctx.vapic.page, ctx.rvi)  # type: ignore[arg-type]
        yield self.costs.POSTED_INTR_PROCESS

    def _accepted(self, owner: Any, vector: int, sender: VmcsContext) -> None:
        if owner is None:
            return
        self.host.rec.accepted(owner.name, vector, "fixed", sender.name, sender.guest.ipi_sent_at)
        owner.poll.fire()

    # -- ICR writes: self-IPI virtualisation, IPI virtualisation, or an APIC-write exit ------
    def _icr_write(self, pcpu: HostCpu, ctx: VmcsContext, lo: int, hi: int, x2: bool
                   ) -> Generator[Any, Any, tuple[int, int] | None]:
        host = self.host

        def notify(nv: int, ndst: int) -> None:
            target = host.by_apic_id.get(X.ndst_to_apic_id(ndst, x2apic=True))
            host.rec.count("ipiv_notifications")
            if target is not None:
                host.send_host_ipi(target.index, HOST_IPI_KIND.get(nv, "other"), src=pcpu.index)

        def pir_set(pid_hpa: int, vector: int, dest: int) -> None:
            host.rec.count("ipiv_ipis")
            self._accepted(self.pid_owner.get(pid_hpa), vector, ctx)

        ex = yield from X.ipiv_icr_write(
            self.mem, ctx.pid_table_hpa, ctx.last_pid_index if ctx.ipiv else -1, lo, hi, x2, notify,
            self_ipi=lambda v: self._self_ipi(ctx, v), vapic_page=ctx.vapic.page, pir_set=pir_set,
            fine_grained=self.fine_grained)
        if ex is not None:
            return ex.reason, ex.qualification
        yield self.costs.IPIV_SEND
        return None

    def _plain_access(self, ctx: VmcsContext, insn: Any, off: int) -> None:
        """A 32-bit access to the page the EPT maps at the APIC-access address (KVM's APIC-access
        page, ``ept_apic_page_hpa``), as memory."""
        hpa = ctx.ept_apic_page_hpa + (off & ~3)
        if type(insn) is isa.MmioWrite:
            self.mem.write32(hpa, insn.value & 0xFFFFFFFF)
            ctx.guest.retire(None)
        else:
            ctx.guest.retire(self.mem.read32(hpa))

    # -- xAPIC: the APIC-access page (SDM §30.4) -----------------------------------------------
    def _apic_page_access(self, pcpu: HostCpu, ctx: VmcsContext, insn: Any, off: int
                          ) -> Generator[Any, Any, tuple[int, int] | None]:
        costs = self.costs
        g = ctx.guest
        regs = ctx.vapic.regs
        write = type(insn) is isa.MmioWrite
        aligned = off & ~0xF
        if not write:
            if off & 0xF == 0 and (aligned == APIC_TPR or (ctx.apic_reg_virt and aligned in VIRT_READS)):
                g.retire(regs[aligned >> 2])
                yield costs.APIC_ACCESS
                return None
            ctx.exit_insn = insn
            return X.EXIT_REASON_APIC_ACCESS, off          # access type 0: linear read
        virtualised = VIRT_WRITES if ctx.apic_reg_virt else VID_WRITES if ctx.vid else frozenset((APIC_TPR,))
        if off & 0xF or aligned not in virtualised:
            ctx.exit_insn = insn
            return X.EXIT_REASON_APIC_ACCESS, off | (1 << 12)   # access type 1: linear write
        value = insn.value & 0xFFFFFFFF
        regs[aligned >> 2] = value
        g.retire(None)
        yield costs.APIC_ACCESS
        # APIC-write emulation (SDM §30.4.3.2), after the write completed.
        if aligned == APIC_TPR:
            regs[APIC_TPR >> 2] = value & 0xFF
            return self._tpr_virtualisation(ctx)
        if aligned == APIC_EOI:
            if ctx.vid:
                return self._eoi_virtualisation(ctx)
            return X.EXIT_REASON_APIC_WRITE, APIC_EOI
        if aligned == APIC_ICR:
            if ctx.vid:
                return (yield from self._icr_write(pcpu, ctx, value, regs[APIC_ICR2 >> 2], False))
            return X.EXIT_REASON_APIC_WRITE, APIC_ICR
        if aligned == APIC_ICR2:
            regs[APIC_ICR2 >> 2] = value & 0xFF000000   # bytes 2:0 cleared, no exit
            return None
        return X.EXIT_REASON_APIC_WRITE, aligned

    # -- x2APIC MSRs passed through by the MSR bitmap (SDM §30.5) ------------------------------
    def _x2apic_msr(self, pcpu: HostCpu, ctx: VmcsContext, insn: Any, off: int, write: bool
                    ) -> Generator[Any, Any, tuple[int, int] | None]:
        costs = self.costs
        g = ctx.guest
        regs = ctx.vapic.regs
        if not write:
            if ctx.apic_reg_virt or off == APIC_TPR:
                # navic keeps the x2APIC ICR split at 300h/310h (docs/model.md "Local APIC").
                val = regs[off >> 2] | (regs[APIC_ICR2 >> 2] << 32 if off == APIC_ICR else 0)
                g.retire(val)
            else:  # not virtualised and not intercepted: KVM never leaves such a hole
                g.retire(Fault("#GP", f"RDMSR {insn.msr:#x} not virtualised"))
            yield costs.APIC_ACCESS
            return None
        value = insn.value
        if off == APIC_TPR:
            if value >> 8:
                g.retire(Fault("#GP", "TPR bits 63:8 are reserved"))
                yield costs.APIC_ACCESS
                return None
            regs[APIC_TPR >> 2] = value
            g.retire(None)
            yield costs.APIC_ACCESS
            return self._tpr_virtualisation(ctx)
        if off == APIC_EOI and ctx.vid:
            if value:
                g.retire(Fault("#GP", "EOI write must be 0"))
                yield costs.APIC_ACCESS
                return None
            g.retire(None)
            yield costs.APIC_ACCESS
            return self._eoi_virtualisation(ctx)
        if off == APIC_SELF_IPI and ctx.vid:
            if value >> 8:
                g.retire(Fault("#GP", "SELF_IPI bits 63:8 are reserved"))
                yield costs.APIC_ACCESS
                return None
            g.retire(None)
            yield costs.APIC_ACCESS
            self._self_ipi(ctx, value & 0xFF)
            return None
        if off == APIC_ICR and ctx.vid:
            if value & X2APIC_ICR_RESERVED:
                # SDM §30.5: the virtualised WRMSR to ICR checks the reserved bits itself (#GP, no
                # APIC-write exit; KVM's kvm_apic_write_nodecode WARNs should one bring them).
                g.retire(Fault("#GP", "x2APIC ICR reserved bits (31:20, 17:16, 13) set"))
                yield costs.APIC_ACCESS
                return None
            g.retire(None)
            yield costs.APIC_ACCESS
            return (yield from self._icr_write(pcpu, ctx, value & 0xFFFFFFFF, value >> 32, True))
        # A write the MSR bitmap lets through but VMX does not virtualise would reach the physical
        # x2APIC; KVM's policy never allows it.
        g.retire(Fault("#GP", f"WRMSR {insn.msr:#x} not virtualised"))
        yield costs.APIC_ACCESS
        return None

