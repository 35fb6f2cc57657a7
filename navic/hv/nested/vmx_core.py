"""L0's nested VMX (KVM's arch/x86/kvm/vmx/nested.c), the counterpart of :mod:`.core` for
``cpu = "spr"``, with the VMX designs ``none`` (here) and ``dummy`` (:mod:`.vmx_dummy`).

* ``vmresume`` (``nested_vmx_run``): an L1 vCPU executed VMRESUME (always a VM exit). vmcs12 is
  L1 KVM's :class:`~navic.hw.vmx_guest.VmcsContext` of the L2 vCPU, found by its L1 GPA
  (``vmcs_gpa``; L1 memory holds its PIDs and PID-pointer table). vmcs02 is built from it
  (``prepare_vmcs02``): the APIC-virtualisation controls, TPR threshold, EOI-exit bitmap, interrupt
  window and MSR bitmap are L1's (L0 needs no x2APIC MSR intercept of its own for L2); the guest
  interrupt status (RVI/SVI) and the VM-entry interruption information are taken over (the latter
  consumed from vmcs12); posted interrupts use L1's PID (mapped: L1 GPA -> HPA) with
  POSTED_INTR_NESTED_VECTOR as notification vector, so an L0 notification meant for the L1 vCPU
  itself (POSTED_INTR_VECTOR) is an external-interrupt exit; IPI virtualisation is off (KVM has no
  nested IPIv) unless the design says otherwise. The vCPU's running context becomes vmcs02.
  Unlike SVM, VMX KVM raises no per-vCPU NESTED inhibit: vmcs01 keeps its APICv.
* ``handle_l2_exit``: an external interrupt is L0's (counted ``l0_l2``), and if an L1 interrupt is
  pending (its PID has ON or its vIRR an interrupt) a nested VM exit (EXTERNAL_INTERRUPT) follows;
  APIC exits go to the design; everything else is reflected (L1 intercepts HLT and the MSRs of its
  bitmap). ``nested_vmx_vmexit`` writes the exit reason, qualification and the fault-like
  instruction into vmcs12, copies RVI/SVI back, returns an undelivered injected event to vmcs12's
  entry information, switches back to vmcs01 and retires the L1 vCPU's VMRESUME with the reason.
* ``run_l2``: entering vmcs02 with ON set in L1's PID processes it first (KVM's self-IPI with the
  nested vector on entry), then VM entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from navic.hv.nested.base import HANDLED, REFLECT, Gen
from navic.hw import vmx as X
from navic.hw.isa import Fault
from navic.hw.vmx_guest import INTR_INFO_VALID, VmcsContext

if TYPE_CHECKING:
    from navic.hv.guestmem import GuestMemory
    from navic.hv.host import Host
    from navic.hv.kvm import Kvm, Vcpu
    from navic.hv.l1 import L1Host

VMX_DESIGNS = ("none", "dummy")

# Exits of L2 whose handling the design decides (no "L1 intercepts it" bit to consult).
APIC_EXITS = frozenset((X.EXIT_REASON_APIC_WRITE, X.EXIT_REASON_APIC_ACCESS, X.EXIT_REASON_EOI_INDUCED,
                        X.EXIT_REASON_TPR_BELOW_THRESHOLD))


class VmxDesign:
    """A nested APIC design on VMX: what L1 is offered and how vmcs02 runs L2's APIC."""

    name = "base"
    offers_apicv = False   # APICv (+ posted interrupts, IPIv) in L1's VMX capabilities

    def __init__(self, core: NestedVmx) -> None:
        self.core = core
        self.kvm = core.kvm
        self.host = core.host

    def prepare_vmcs02(self, vcpu: Vcpu, ctx12: VmcsContext, ctx02: VmcsContext) -> None:
        """IPIv fields of vmcs02 (default: no IPI virtualisation for L2, as upstream KVM)."""

    def on_apic_exit(self, vcpu: Vcpu, reason: int, qual: int) -> Gen:
        """An APIC-virtualisation exit from L2. Returns (decision, reason, qualification)."""
        return (REFLECT, reason, qual)
        yield  # pragma: no cover



class VmxNoneDesign(VmxDesign):
    """Design ``none`` on VMX (digest §6.1's status quo): no APICv in L1's VMX capabilities, so L1's
    KVM runs with APICv DISABLED and emulates L2's local APIC — APIC-access / MSR exits reflected to
    L1, which injects through vmcs12's VM-entry interruption information."""

    name = "none"
    offers_apicv = False


def make_vmx_design(name: str, core: NestedVmx) -> VmxDesign:
    if name == "none":
        return VmxNoneDesign(core)
    if name == "dummy":
        from navic.hv.nested.vmx_dummy import VmxDummyDesign

        return VmxDummyDesign(core)
    raise ValueError(f"nested design {name!r} is not implemented on VMX; expected one of "
                     f"{', '.join(VMX_DESIGNS)}")


class NestedVmxState:
    """``vmx->nested`` for one L1 vCPU."""

    __slots__ = ("active", "vmcs12_gpa", "ctx12", "l2", "ctx02", "entries")

    def __init__(self) -> None:
        self.active = False
        self.vmcs12_gpa = 0
        self.ctx12: VmcsContext | None = None
        self.l2: Vcpu | None = None
        self.ctx02: VmcsContext | None = None
        self.entries = 0


class NestedVmx:
    """L0's nested-VMX support for one L1 VM, with its nested APIC design."""

    def __init__(self, kvm: Kvm, host: Host, l1mem: GuestMemory, design: str) -> None:
        self.kvm = kvm
        self.host = host
        self.l1mem = l1mem
        self.l1host: L1Host | None = None
        self.vcpu_by_vmcs12: dict[int, Vcpu] = {}   # vmcs12 GPA -> L1 KVM's vCPU (L2)
        self.design = make_vmx_design(design, self)

    # -- VMRESUME from L1 --------------------------------------------------------------------------
    def vmresume(self, vcpu: Vcpu) -> Gen:
        """nested_vmx_run() + nested_vmx_enter_non_root_mode()."""
        kvm = self.kvm
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        gpa = insn.vmcs
        l2 = self.vcpu_by_vmcs12.get(gpa)
        if l2 is None:
            vcpu.guest.retire(Fault("#GP", f"VMRESUME: {gpa:#x} is not a VMCS of this guest"))
            return "continue"
        kvm.rec.count("nested_vmrun")
        yield kvm.costs.NESTED_VMRUN
        st: NestedVmxState | None = vcpu.nested
        if st is None:
            st = NestedVmxState()
            vcpu.nested = st
        ctx12: VmcsContext = l2.ctx
        ctx02 = st.ctx02
        if ctx02 is None or ctx02.guest is not l2.guest:
            ctx02 = VmcsContext(l2.name, "L2", l2.guest, l2.apic, owner=l2)
            st.ctx02 = ctx02
        self.prepare_vmcs02(vcpu, ctx12, ctx02)
        st.active = True
        st.vmcs12_gpa = gpa
        st.ctx12 = ctx12
        st.l2 = l2
        st.entries += 1
        vcpu.ctx = ctx02
        if kvm.trace.on:
            kvm.trace.emit("kvm_nested_vmenter", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name, vmcb=gpa,
                           l2=l2.name, avic=int(ctx02.ipiv))
        return "continue"

    def prepare_vmcs02(self, vcpu: Vcpu, ctx12: VmcsContext, ctx02: VmcsContext) -> None:
        """prepare_vmcs02_early() / prepare_vmcs02() for the APIC-virtualisation state."""
        for f in ("virt_apic_accesses", "virt_x2apic_mode", "apic_reg_virt", "vid", "posted_intr",
                  "hlt_exiting", "intr_window_exiting", "nmi_window_exiting", "tpr_threshold",
                  "eoi_exit_bitmap", "rvi", "svi", "sti_blocking"):
            setattr(ctx02, f, getattr(ctx12, f))
        ctx02.msr_rd = ctx12.msr_rd   # immutable policy sets: shared, not copied
        ctx02.msr_wr = ctx12.msr_wr
        # EPT02 at 0xFEE00000: what L1's EPT maps for L2 there (its APIC-access page, an L1 GPA)
        # through L0's map of L1 memory; nothing mapped → the EPT violation goes to L1.
        gpa = ctx12.ept_apic_page_hpa
        ctx02.ept_apic_page_hpa = self.l1mem.hpa(gpa) if gpa else 0
        ctx02.entry_intr_info = ctx12.entry_intr_info   # consumed: vmcs12's is cleared at entry
        ctx12.entry_intr_info = 0
        ctx02.pi_nested_pending = False
        pid12 = ctx12.pid
        if ctx12.posted_intr and pid12 is not None:
            hpa = self.l1mem.hpa(pid12.hpa)
            if ctx02.pid is None or ctx02.pid.hpa != hpa:
                ctx02.pid = X.PostedInterruptDesc(self.host.mem, hpa)
            ctx02.pi_nv = X.POSTED_INTR_NESTED_VECTOR
        else:
            ctx02.pid = None
            ctx02.posted_intr = False
        ctx02.ipiv = False
        ctx02.pid_table_hpa = 0
        ctx02.last_pid_index = -1
        self.design.prepare_vmcs02(vcpu, ctx12, ctx02)

    def run_l2(self, vcpu: Vcpu) -> Gen:
        """vmx_vcpu_run() on vmcs02: ON in L1's PID → posted-interrupt processing at entry."""
        ctx02: VmcsContext = vcpu.ctx
        pid = ctx02.pid
        if ctx02.posted_intr and pid is not None and pid.on:
            ctx02.rvi = X.process_posted_interrupts(pid, ctx02.vapic.page, ctx02.rvi)
        vendor = self.kvm.vendor
        return vendor.hw.vmentry(self.host.pcpus[vcpu.cpu], ctx02)

    # -- exits while L2 runs -----------------------------------------------------------------------
    def handle_l2_exit(self, vcpu: Vcpu, reason: int) -> Gen:
        kvm = self.kvm
        st: NestedVmxState = vcpu.nested
        ctx02 = st.ctx02
        qual = ctx02.exit_qualification
        if reason == X.EXIT_REASON_EXTERNAL_INTERRUPT:
            decision = HANDLED
        elif reason in APIC_EXITS:
            decision, reason, qual = yield from self.design.on_apic_exit(vcpu, reason, qual)
        else:
            decision = REFLECT
        name = X.exit_reason_name(reason)
        if decision == HANDLED:
            kvm.rec.exit("l0_l2", name)
            if kvm.trace.on:
                kvm.trace.emit("kvm_exit", pcpu=vcpu.cpu, level="L0", vcpu=ctx02.name, reason=name,
                               info1=qual, info2=0, nested=1)
            yield kvm.costs.EXIT_DISPATCH
            if self.l1_event_pending(vcpu):
                yield from self.nested_vmx_vmexit(vcpu, X.EXIT_REASON_EXTERNAL_INTERRUPT, 0)
            return "continue"
        yield from self.nested_vmx_vmexit(vcpu, reason, qual)
        return "continue"

    def l1_event_pending(self, vcpu: Vcpu) -> bool:
        """An interrupt for L1 itself is pending (L1 always sets external-interrupt exiting)."""
        st = vcpu.nested
        if st is None or not st.active:
            return False
        a = vcpu.apic
        pid = getattr(vcpu, "pid", None)
        return (a.has_interrupt() >= 0 or a.nmi_pending or (pid is not None and pid.on)
                or bool(getattr(vcpu.guest, "frames", None)))

    def check_nested_events(self, vcpu: Vcpu) -> Gen | tuple[()]:
        """vmx_check_nested_events(): an L1 interrupt before re-entering L2 → nested VM exit.
        Returns the steps to run (none, the common case, without building a generator)."""
        if self.l1_event_pending(vcpu):
            return self.nested_vmx_vmexit(vcpu, X.EXIT_REASON_EXTERNAL_INTERRUPT, 0)
        return ()

    def nested_vmx_vmexit(self, vcpu: Vcpu, reason: int, qual: int) -> Gen:
        kvm = self.kvm
        st: NestedVmxState = vcpu.nested
        ctx12 = st.ctx12
        ctx02 = st.ctx02
        l2 = st.l2
        ctx12.exit_reason = reason
        ctx12.exit_qualification = qual
        ctx12.exit_insn = ctx02.exit_insn
        ctx02.exit_insn = None
        ctx12.rvi, ctx12.svi = ctx02.rvi, ctx02.svi   # guest interrupt status is guest state
        ctx12.sti_blocking = ctx02.sti_blocking        # ... and so is the interruptibility state
        if ctx02.entry_intr_info & INTR_INFO_VALID:    # not delivered: back to L1 (IDT-vectoring info)
            ctx12.entry_intr_info = ctx02.entry_intr_info
            ctx02.entry_intr_info = 0
        st.active = False
        vcpu.ctx = vcpu.ctx01
        kvm.rec.count("nested_vmexit")
        if kvm.trace.on:
            kvm.trace.emit("kvm_nested_vmexit", pcpu=vcpu.cpu, level="L0", vcpu=l2.name,
                           reason=X.exit_reason_name(reason), info1=qual, info2=0)
        yield kvm.costs.NESTED_VMEXIT
        vcpu.guest.retire(reason)   # the L1 vCPU's VMRESUME completes
        return "continue"

