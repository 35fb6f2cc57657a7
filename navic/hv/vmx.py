"""KVM's VMX vendor code at L0 (arch/x86/kvm/vmx/vmx.c + posted_intr.c), function for function.

APICv on Intel = APIC-register virtualisation + virtual-interrupt delivery + posted interrupts,
optionally IPI virtualisation (Sapphire Rapids). Per VM: the PID-pointer table (IPIv). Per vCPU:
the posted-interrupt descriptor (PID), the VMCS (:class:`navic.hw.vmx_guest.VmcsContext`) and
KVM's ``vcpu->cpu`` as PI bookkeeping sees it.

Delivery (``vmx_deliver_interrupt``): with APICv the vector goes into the PIR (never straight into
vIRR) and ON is set; a notification (POSTED_INTR_VECTOR) goes to the target's pCPU only if it is in
guest mode, else the target is woken; ``vmx_sync_pir_to_irr`` moves PIR to vIRR and sets RVI at every
VM entry and whenever KVM looks for events. Scheduling (posted_intr.c): a vCPU put while blocking with
interrupts enabled switches NV to the wake-up vector and joins its pCPU's wake-up list; any other put
suppresses notifications (SN = 1); load restores NV and NDST and clears SN. Exits are counted at
level ``l0`` under KVM's lowercase VMX exit-reason names.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from navic.apic.registers import (
    APIC_DFR,
    APIC_EOI,
    APIC_ICR,
    APIC_ICR2,
    APIC_ID,
    APIC_IRR,
    APIC_LDR,
    APIC_SELF_IPI,
    APIC_TMCCT,
    APIC_TPR,
    MSR_IA32_APICBASE,
    MSR_IA32_TSC_DEADLINE,
    X2APIC_MSR_BASE,
    X2APIC_READABLE,
)
from navic.hv.hypercall import kvm_emulate_hypercall
from navic.hv.kvm import IN_GUEST_MODE, REQ_APICV_UPDATE, REQ_EVENT, Kvm, Vcpu
from navic.hw import vmx as X
from navic.hw.isa import Fault
from navic.hw.vmx_guest import INTR_INFO_VALID, INTR_TYPE_NMI, VmcsContext, Vmx

if TYPE_CHECKING:
    from navic.hv.host import Host

Gen = Generator[Any, Any, Any]

X2APIC_MSRS = frozenset(range(X2APIC_MSR_BASE, X2APIC_MSR_BASE + 0x100))
# vmx_update_msr_bitmap_x2apic(): x2APIC + APICv passes reads of readable registers except TMCCT ...
X2APIC_APICV_READS = frozenset(X2APIC_MSR_BASE + (off >> 4) for off in X2APIC_READABLE if off != APIC_TMCCT)
# ... and writes of TPR, EOI, SELF_IPI (+ ICR with enable_ipiv); without APICv only TPR (TPR shadow).
X2APIC_APICV_WRITES = frozenset(X2APIC_MSR_BASE + (off >> 4) for off in (APIC_TPR, APIC_EOI, APIC_SELF_IPI))
MSR_X2APIC_TPR = X2APIC_MSR_BASE + (APIC_TPR >> 4)
MSR_X2APIC_ICR = X2APIC_MSR_BASE + (APIC_ICR >> 4)
# VMX_REQUIRED_APICV_INHIBITS (vmx/main.c): Intel needs neither 1:1 logical IDs nor small IDs.
VMX_REQUIRED_APICV_INHIBITS = frozenset({"DISABLED", "ABSENT", "HYPERV", "BLOCKIRQ", "PHYSICAL_ID_ALIASED",
                                         "APIC_ID_MODIFIED", "APIC_BASE_MODIFIED"})
KVM_MAX_VCPU_IDS = 4096 * 4   # KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO (x86)


_MSR_BITMAPS: dict[tuple[bool, bool, bool], tuple[frozenset[int], frozenset[int]]] = {}


def _msr_bitmap(*, x2: bool, active: bool, ipiv: bool) -> tuple[frozenset[int], frozenset[int]]:
    """(read, write) intercepts of one MSR-bitmap policy, built once and shared by every vCPU with
    that policy (immutable: a change assigns another pair). APIC_BASE and TSC_DEADLINE always exit;
    an xAPIC guest: every x2APIC MSR; x2APIC with APICv: all but the virtualised reads and writes
    (+ ICR with IPIv); x2APIC without APICv: all but TPR (TPR shadow)."""
    key = (x2, active, ipiv)
    pol = _MSR_BITMAPS.get(key)
    if pol is None:
        rd = {MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE}
        wr = {MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE}
        if not x2:
            rd |= X2APIC_MSRS
            wr |= X2APIC_MSRS
        elif active:
            rd |= X2APIC_MSRS - X2APIC_APICV_READS
            wr |= X2APIC_MSRS - X2APIC_APICV_WRITES - ({MSR_X2APIC_ICR} if ipiv else set())
        else:
            rd |= X2APIC_MSRS - {MSR_X2APIC_TPR}
            wr |= X2APIC_MSRS - {MSR_X2APIC_TPR}
        pol = _MSR_BITMAPS[key] = (frozenset(rd), frozenset(wr))
    return pol


class VmxVendor:
    """``kvm_x86_ops`` for VMX with APICv / IPIv, for one VM."""

    def __init__(self, kvm: Kvm, host: Host, silicon: Vmx, features: Any, vm: Any = None) -> None:
        self.kvm = kvm
        self.host = host
        self.hw = silicon
        self.features = features
        l0 = host.l0
        # hardware_setup(): enable_apicv needs APICv in hardware; enable_ipiv needs APICv and IPIv.
        self.enable_apicv = bool(l0.apicv and features.apicv and features.posted_interrupts)
        want_ipiv = features.ipiv if l0.ipiv == "auto" else bool(l0.ipiv)
        self.enable_ipiv = bool(self.enable_apicv and want_ipiv and features.ipiv)
        # PID-pointer table (vmx_alloc_ipiv_pid_table), sized from KVM_CAP_MAX_VCPU_ID, which userspace
        # sets to the highest APIC ID + 1 before creating vCPUs.
        vm = vm if vm is not None else host.scn.l1   # L1's KVM (nested) is given its VM (L2)
        self.max_vcpu_ids = min(KVM_MAX_VCPU_IDS, max(vm.apic_id(i) for i in range(vm.vcpus)) + 1)
        self.pid_table_hpa = 0
        if self.enable_ipiv:
            pages = (self.max_vcpu_ids * 8 + 4095) // 4096
            self.pid_table_hpa = kvm.mem.alloc(pages)
            self.pid_table_pages = pages
        self.apic_access_page = 0   # kvm_alloc_apic_access_page(), at post_create
        # Per-pCPU wake-up lists (wakeup_vcpus_on_cpu) and the wake-up vector's handler.
        self.wakeup_list: dict[int, list[Vcpu]] = {p.index: [] for p in host.pcpus}
        host.pi_wakeup_handler = self.pi_wakeup_handler
        self.nested: Any = None   # navic.hv.nested.vmx_core.NestedVmx when L1 may run L2 (nested VMX)

    # -- vCPU creation -------------------------------------------------------------------------
    def vcpu_create(self, vcpu: Vcpu) -> None:
        """vmx_vcpu_create() + __vmx_vcpu_reset(): PID with NV = POSTED_INTR_VECTOR and SN = 1;
        the PID-pointer table entry when IPIv is usable."""
        mem = self.kvm.mem
        pid = X.PostedInterruptDesc(mem, mem.alloc(1))
        pid.nv = X.POSTED_INTR_VECTOR
        pid.sn = True
        vcpu.pid = pid
        vcpu.pi_cpu = None            # KVM's vcpu->cpu (the pCPU the PID's NDST names)
        vcpu.pi_wakeup_cpu = None     # whose wake-up list the vCPU is on
        self.hw.pid_owner[pid.hpa] = vcpu
        vcpu.ctx = VmcsContext(vcpu.name, "L1", vcpu.guest, vcpu.apic, owner=vcpu, pid=pid)
        vcpu.ctx.pid_table_hpa = self.pid_table_hpa
        vcpu.ctx01 = vcpu.ctx          # vmcs01; a vmcs02 context replaces vcpu.ctx while it runs L2
        vcpu.nested = None
        vcpu.ctx.last_pid_index = self.max_vcpu_ids - 1
        if self.enable_ipiv and vcpu.vcpu_id < self.max_vcpu_ids:
            mem.write64(self.pid_table_hpa + 8 * vcpu.vcpu_id, X.pid_table_entry(pid.hpa))

    def post_create(self) -> None:
        # kvm_alloc_apic_access_page(): the VM's APIC-access page, a private memslot at 0xFEE00000
        # (flexpriority, on every APICv CPU): zero-filled memory the CPU never reads while
        # "virtualize APIC accesses" is 1. (KVM allocates it with the first vCPU; allocated after
        # the vCPUs' pages here, it leaves their addresses as they were.)
        if not self.apic_access_page:
            self.apic_access_page = self.kvm.mem.alloc(1)
        if not self.enable_apicv:
            self.kvm.set_apicv_inhibit("DISABLED")
        for v in self.kvm.vcpus:
            v.apicv_active = self.apicv_allowed(v)
            self.program_controls(v)

    # -- activation ----------------------------------------------------------------------------
    def apicv_activated(self) -> bool:
        """kvm_apicv_activated(): APICv for the VM (no inhibit VMX requires)."""
        return self.enable_apicv and not (set(self.kvm.inhibits.active) & VMX_REQUIRED_APICV_INHIBITS)

    def apicv_allowed(self, vcpu: Vcpu) -> bool:
        """__kvm_vcpu_update_apicv(): the VM's APICv, and off while the vCPU's APIC is
        hardware-disabled (LAPIC_MODE_DISABLED)."""
        return self.apicv_activated() and vcpu.apic.hw_enabled

    def program_controls(self, vcpu: Vcpu) -> None:
        """vmx_refresh_apicv_exec_ctrl() + vmx_set_virtual_apic_mode() + the x2APIC MSR bitmap.
        "Virtualize APIC accesses" only in LAPIC_MODE_XAPIC (flexpriority), "virtualize x2APIC
        mode" only in LAPIC_MODE_X2APIC, neither while the APIC is disabled. The EPT maps the
        APIC-access page only while APICv is activated for the VM (kvm_mmu_faultin_pfn: the
        APIC_ACCESS_PAGE_PRIVATE_MEMSLOT with !kvm_apicv_activated() is RET_PF_EMULATE, and the
        SPTE is zapped when that changes): a vCPU whose control is 0 then reads and writes it as
        memory, otherwise its accesses there are emulated MMIO."""
        ctx: VmcsContext = getattr(vcpu, "ctx01", vcpu.ctx)   # vmcs01 (vcpu.ctx is vmcs02 while in L2)
        active = vcpu.apicv_active
        mode = vcpu.apic.mode
        x2 = mode == "x2apic"
        ctx.virt_apic_accesses = mode == "xapic"
        ctx.virt_x2apic_mode = x2
        ctx.ept_apic_page_hpa = self.apic_access_page if self.apicv_activated() else 0
        ctx.apic_reg_virt = ctx.vid = ctx.posted_intr = active
        ctx.ipiv = active and self.enable_ipiv
        ctx.msr_rd, ctx.msr_wr = _msr_bitmap(x2=x2, active=active, ipiv=bool(self.enable_ipiv))

    def refresh_apicv_exec_ctrl(self, vcpu: Vcpu) -> None:
        """kvm_vcpu_update_apicv() / vmx_refresh_apicv_exec_ctrl() on KVM_REQ_APICV_UPDATE."""
        active = self.apicv_allowed(vcpu)
        if active != vcpu.apicv_active:
            vcpu.apicv_active = active
            self.kvm.rec.count("apicv_toggles")
            if not active:
                vcpu.requests.add(REQ_EVENT)
        self.program_controls(vcpu)

    # -- scheduling hooks: posted_intr.c ----------------------------------------------------------
    def vcpu_load(self, vcpu: Vcpu, cpu: int | None) -> None:
        vcpu.last_cpu = cpu
        if cpu is not None:
            self.pi_load(vcpu, cpu)

    def vcpu_put(self, vcpu: Vcpu) -> None:
        """vmx_vcpu_put() at preemption (sched out while runnable)."""
        self.pi_put(vcpu, blocking=False)

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        """The sched-out of a blocking vCPU (kvm_vcpu_block -> schedule -> vmx_vcpu_pi_put with
        kvm_vcpu_is_blocking()), done before the last event check like avic_vcpu_blocking."""
        self.pi_put(vcpu, blocking=True)

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        """The sched-in after blocking (vmx_vcpu_load -> vmx_vcpu_pi_load)."""
        if vcpu.cpu is not None:
            self.pi_load(vcpu, vcpu.cpu)

    def needs_pi_wakeup(self, vcpu: Vcpu) -> bool:
        """vmx_needs_pi_wakeup(): IPIv (or VT-d posting, not modelled) can post while the vCPU is
        out of the guest, so the wake-up vector is needed."""
        return self.enable_ipiv

    def pi_load(self, vcpu: Vcpu, cpu: int) -> None:
        """vmx_vcpu_pi_load(): NDST <- this pCPU, SN <- 0, NV <- POSTED_INTR_VECTOR, off the wake-up
        list; then ON <- 1 if the PIR is not empty (posts that were suppressed meanwhile)."""
        if not self.enable_apicv:
            return
        pid: X.PostedInterruptDesc = vcpu.pid
        if pid.nv != X.POSTED_INTR_WAKEUP_VECTOR and vcpu.pi_cpu == cpu:
            if not pid.sn:
                return
            pid.sn = False
        else:
            if pid.nv == X.POSTED_INTR_WAKEUP_VECTOR:
                self.wakeup_list[vcpu.pi_wakeup_cpu].remove(vcpu)
                vcpu.pi_wakeup_cpu = None
            c = pid.control & ~(X.PID_NDST_MASK | X.PID_NV_MASK | X.PID_SN)
            ndst = X.ndst_for(self.host.pcpus[cpu].apic_id, x2apic=True)   # the host runs in x2APIC mode
            pid.control = c | (ndst << X.PID_NDST_SHIFT) | (X.POSTED_INTR_VECTOR << X.PID_NV_SHIFT)
        vcpu.pi_cpu = cpu
        if pid.pir_pending():
            pid.on = True
        if self.kvm.trace.on:
            self.kvm.trace.emit("navic_vmx_pi_load", pcpu=cpu, level="L0", vcpu=vcpu.name, control=pid.control)

    def pi_put(self, vcpu: Vcpu, *, blocking: bool) -> None:
        """vmx_vcpu_pi_put(): blocking with IRQs enabled and not preempted -> wake-up handler;
        otherwise suppress notifications."""
        if not self.enable_apicv or not self.needs_pi_wakeup(vcpu):
            return
        pid: X.PostedInterruptDesc = vcpu.pid
        if blocking and not vcpu.preempted and vcpu.guest.IF:
            self.pi_enable_wakeup_handler(vcpu)
        else:
            pid.sn = True
        if self.kvm.trace.on:
            self.kvm.trace.emit("navic_vmx_pi_put", pcpu=vcpu.pi_cpu, level="L0", vcpu=vcpu.name,
                                control=pid.control, blocking=blocking)

    def pi_enable_wakeup_handler(self, vcpu: Vcpu) -> None:
        pid: X.PostedInterruptDesc = vcpu.pid
        cpu = vcpu.pi_cpu
        self.wakeup_list[cpu].append(vcpu)
        vcpu.pi_wakeup_cpu = cpu
        pid.nv = X.POSTED_INTR_WAKEUP_VECTOR
        # A post that raced with the NV switch notified the old vector: kick ourselves.
        if pid.on:
            self.host.send_host_ipi(cpu, "pi_wakeup", src=cpu)

    def pi_wakeup_handler(self, cpu: int) -> None:
        """pi_wakeup_handler(): wake every vCPU on this pCPU's list whose PID has ON set."""
        self.kvm.rec.count("pi_wakeup_irqs")
        for v in list(self.wakeup_list.get(cpu, ())):
            if v.pid.on:
                self.kvm.rec.count("pi_wakeups")
                self.kvm.kvm_vcpu_wake_up(v)

    def update_irtes(self, vcpu: Vcpu, *, running: bool, host_id: int | None, ga_log: bool = False) -> None:
        """VT-d posted interrupts are not modelled: device interrupts take the remapped path."""

    def recalc_logical_aliasing(self) -> None:
        """LOGICAL_ID_ALIASED is not in VMX_REQUIRED_APICV_INHIBITS: nothing to do."""

    # -- delivery: vmx_deliver_interrupt / __vmx_deliver_posted_interrupt ------------------------
    def deliver_interrupt(self, vcpu: Vcpu, mode: int, trigger: int, vector: int, *,
                          from_vcpu: Vcpu | None) -> Gen:
        kvm = self.kvm
        if not vcpu.apicv_active:
            # APICv inactive: kvm_lapic_set_irr + KVM_REQ_EVENT + kick (injected at entry).
            vcpu.apic.set_irr(vector)
            vcpu.poll.fire()
            yield 0
            vcpu.requests.add(REQ_EVENT)
            kvm.kvm_vcpu_kick(vcpu, from_vcpu=from_vcpu)
            return
        if trigger:
            # navic has no IOAPIC: a vector accepted level-triggered counts as IOAPIC-routed, so its
            # EOI-exit bit is set (KVM's ioapic_handled_vectors; docs/model.md "VMX at L0").
            getattr(vcpu, "ctx01", vcpu.ctx).eoi_exit_bitmap |= 1 << vector
        if kvm.trace.on:
            kvm.trace.emit("kvm_apicv_accept_irq", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name, vec=vector,
                           tm="level" if trigger else "edge")
        pid: X.PostedInterruptDesc = vcpu.pid
        already = pid.pir_set(vector)       # pi_test_and_set_pir
        vcpu.poll.fire()                    # a halt-polling thread re-checks its events
        if already or pid.test_and_set_on():
            return                          # a notification is already on its way
        yield 0  # pi_test_and_set_on()'s barrier pairs with vcpu->mode = IN_GUEST_MODE
        self.trigger_posted_interrupt(vcpu, from_vcpu)

    def trigger_posted_interrupt(self, vcpu: Vcpu, from_vcpu: Vcpu | None) -> None:
        """kvm_vcpu_trigger_posted_interrupt(): notify a vCPU in guest mode (unless it is the
        sender itself: it syncs the PIR before re-entering); otherwise wake it."""
        if vcpu.mode == IN_GUEST_MODE:
            if vcpu is not from_vcpu and vcpu.cpu is not None:
                self.kvm.rec.count("posted_intr_notifications")
                self.host.send_host_ipi(vcpu.cpu, "posted_intr",
                                        src=from_vcpu.cpu if from_vcpu is not None else None)
            return
        self.kvm.kvm_vcpu_wake_up(vcpu)

    def complete_interrupt_delivery(self, vcpu: Vcpu, *, from_vcpu: Vcpu | None) -> None:
        """An IRR bit KVM set directly (the APIC timer): KVM_REQ_EVENT + kick; the next entry's
        sync_pir_to_irr puts it into RVI (APICv) or injects it (no APICv)."""
        vcpu.requests.add(REQ_EVENT)
        self.kvm.kvm_vcpu_kick(vcpu, from_vcpu=from_vcpu)

    def sync_pir_to_irr(self, vcpu: Vcpu) -> int:
        """vmx_sync_pir_to_irr(): if ON, clear it and move the PIR into vIRR; RVI <- highest vIRR
        (APICv active) or KVM_REQ_EVENT (APICv inhibited but something was posted). Always vmcs01's RVI:
        a vCPU running L2 (nested) has vmcs02 as ``vcpu.ctx``."""
        if not self.enable_apicv:
            return vcpu.apic.highest_irr()
        pid: X.PostedInterruptDesc = vcpu.pid
        a = vcpu.apic
        got = False
        if pid.on:
            pid.on = False
            pir = pid.pir_take()
            if pir:
                got = True
                regs = a.regs
                for i in range(8):
                    w = (pir >> (32 * i)) & 0xFFFFFFFF
                    if w:
                        regs[(APIC_IRR >> 2) + 4 * i] |= w
        max_irr = a.highest_irr()
        if vcpu.apicv_active:
            getattr(vcpu, "ctx01", vcpu.ctx).rvi = max(max_irr, 0)
        elif got:
            vcpu.requests.add(REQ_EVENT)
        return max_irr

    def inject_pending_events(self, vcpu: Vcpu) -> None:
        """kvm_check_and_inject_events(): NMIs through the VM-entry interruption information;
        maskable interrupts only without APICv (inject if IF = 1, else interrupt-window exiting)."""
        a = vcpu.apic
        ctx: VmcsContext = vcpu.ctx
        g = vcpu.guest
        if ctx.entry_intr_info & INTR_INFO_VALID:
            return
        if self.nested is not None and vcpu.nested is not None and vcpu.nested.active:
            return   # L1 events while L2 runs: a nested VM exit first (check_nested_events)
        nmi = False
        if self.kvm.process_nmi(vcpu, masked=g.nmi_blocked):
            # vmx_nmi_blocked(): NMI blocking, or blocking by STI / MOV SS in the interruptibility state.
            if not g.nmi_blocked and not ctx.sti_blocking:
                self.kvm.take_pending_nmi(vcpu)
                ctx.entry_intr_info = INTR_INFO_VALID | (INTR_TYPE_NMI << 8) | 2
                ctx.nmi_window_exiting = vcpu.nmis_pending > 0   # the second: an NMI window
                nmi = True
            else:
                # vmx_enable_nmi_window(): virtual NMIs; exit when the guest's IRET unblocks NMIs.
                ctx.nmi_window_exiting = True
        if vcpu.apicv_active:
            ctx.intr_window_exiting = False
            return
        # kvm_cpu_has_injectable_intr -> apic_has_interrupt_for_ppr -> vmx_sync_pir_to_irr: interrupts
        # posted while APICv was still active (before an inhibit took effect) reach IRR first.
        self.sync_pir_to_irr(vcpu)
        v = a.has_interrupt()
        if v < 0:
            return
        # vmx_interrupt_blocked(): IF and the STI shadow; an NMI just injected: the window (as
        # kvm_check_and_inject_events() ends with enable_irq_window()).
        if g.IF and not ctx.sti_blocking and not nmi:
            a.ack_interrupt()
            ctx.entry_intr_info = INTR_INFO_VALID | v
            ctx.intr_window_exiting = False
        else:
            ctx.intr_window_exiting = True

    # -- running -----------------------------------------------------------------------------
    def run(self, vcpu: Vcpu) -> Gen:
        """vmx_vcpu_run() preceded by what vcpu_enter_guest() does after IN_GUEST_MODE: sync the PIR
        (RVI), SVI from vISR (hwapic_isr_update), or the TPR threshold without APICv. A vCPU in
        guest mode (nested) enters vmcs02 instead (NestedVmx.run_l2). (A generator of its own: its
        entry-time locals are part of the explorer's state hash.)"""
        if self.nested is not None and vcpu.nested is not None and vcpu.nested.active:
            return (yield from self.nested.run_l2(vcpu))
        ctx: VmcsContext = vcpu.ctx
        a = vcpu.apic
        if a.hw_enabled:
            self.sync_pir_to_irr(vcpu)
        if vcpu.apicv_active:
            ctx.svi = max(a.highest_isr(), 0)
        else:
            # update_cr8_intercept(): TPR_THRESHOLD = class of the highest IRR if TPR masks it.
            irr = a.highest_irr()
            tpr = (a.regs[APIC_TPR >> 2] >> 4) & 0xF
            ctx.tpr_threshold = 0 if irr < 0 or tpr < (irr >> 4) else irr >> 4
        return (yield from self.hw.vmentry(self.host.pcpus[vcpu.cpu], ctx))

    def handle_exit(self, vcpu: Vcpu, reason: int) -> Gen:
        """vmx_handle_exit(): the steps that handle the exit (exits from L2: nested.c first)."""
        if self.nested is not None and vcpu.nested is not None and vcpu.nested.active:
            return self.nested.handle_l2_exit(vcpu, reason)
        return self._handle_exit(vcpu, reason)

    def _handle_exit(self, vcpu: Vcpu, reason: int) -> Gen:
        """vmx_exit_handlers_fastpath() (Kvm.exit_fastpath), then dispatch on the basic exit reason."""
        kvm = self.kvm
        ctx: VmcsContext = vcpu.ctx
        name = X.exit_reason_name(reason)
        kvm.rec.exit(kvm.exit_level, name)
        if kvm.trace.on:
            kvm.trace.emit("kvm_exit", pcpu=vcpu.cpu, level=kvm.exit_level.upper(), vcpu=vcpu.name,
                           reason=name, info1=ctx.exit_qualification, info2=0)
        fast = kvm.exit_fastpath(vcpu, ctx.exit_insn, hlt=reason == X.EXIT_REASON_HLT)
        yield kvm.costs.EXIT_FASTPATH if fast else kvm.costs.EXIT_DISPATCH
        handler = self._handlers.get(reason)
        if handler is None:
            raise RuntimeError(f"{vcpu.name}: unhandled VM exit {name} ({reason})")
        r = yield from handler(self, vcpu)
        if vcpu.pending_ipis:
            yield from kvm.flush_ipis(vcpu)
        return r

    def _exit_vmresume(self, vcpu: Vcpu) -> Gen:
        """handle_vmresume(): nested.c's nested_vmx_run(); #UD when VMX is not offered."""
        if self.nested is None:
            vcpu.guest.retire(Fault("#UD", "VMRESUME: VMX is not exposed to this guest"))
            vcpu.ctx.exit_insn = None
            return "continue"
        return (yield from self.nested.vmresume(vcpu))

    def _exit_external_interrupt(self, vcpu: Vcpu) -> Gen:
        """handle_external_interrupt_irqoff(): the host ran its handler; nothing for the guest."""
        return "continue"
        yield  # pragma: no cover

    def _exit_interrupt_window(self, vcpu: Vcpu) -> Gen:
        """handle_interrupt_window(): the guest can take the interrupt now."""
        vcpu.ctx.intr_window_exiting = False
        vcpu.requests.add(REQ_EVENT)
        return "continue"
        yield  # pragma: no cover

    def _exit_vmcall(self, vcpu: Vcpu) -> Gen:
        """handle_vmcall() -> kvm_emulate_hypercall() (navic.hv.hypercall); RAX is the result."""
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        vcpu.guest.retire((yield from kvm_emulate_hypercall(self.kvm, vcpu, insn)))
        return "continue"

    def _exit_nmi_window(self, vcpu: Vcpu) -> Gen:
        """handle_nmi_window(): NMIs are unblocked; stop NMI-window exiting and inject."""
        vcpu.ctx.nmi_window_exiting = False
        vcpu.requests.add(REQ_EVENT)
        return "continue"
        yield  # pragma: no cover

    def _exit_hlt(self, vcpu: Vcpu) -> Gen:
        """The HLT intercept: kvm_emulate_halt()."""
        return self.kvm.kvm_emulate_halt(vcpu)
        yield  # pragma: no cover

    def _exit_msr(self, vcpu: Vcpu) -> Gen:
        """handle_rdmsr / handle_wrmsr for the MSRs the bitmap intercepts (x2APIC, APIC_BASE,
        TSC_DEADLINE)."""
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        yield self.kvm.costs.MSR_EMULATE
        vcpu.guest.retire(self.kvm.kvm_apic_msr(vcpu, insn))
        return "continue"

    def _apic_base_changed(self, vcpu: Vcpu, old: int) -> None:
        a = vcpu.apic
        if a.hw_enabled and a.apic_base & 0xFFFFF000 != 0xFEE00000:
            # __kvm_apic_set_base(): only an enabled APIC away from APIC_DEFAULT_PHYS_BASE (sticky).
            self.kvm.set_apicv_inhibit("APIC_BASE_MODIFIED")
        if (old ^ a.apic_base) & (1 << 11):
            # EN toggled: kvm_lapic_set_base() -> kvm_vcpu_update_apicv() (LAPIC_MODE_DISABLED
            # deactivates APICv for this vCPU) and vmx_set_virtual_apic_mode().
            vcpu.requests.add(REQ_APICV_UPDATE)
        if (old ^ a.apic_base) & (1 << 10):
            # xAPIC <-> x2APIC: vmx_set_virtual_apic_mode() and a new MSR bitmap.
            vcpu.requests.add(REQ_APICV_UPDATE)
            self.kvm.recalc_apic_map()

    def _after_apic_write(self, vcpu: Vcpu, off: int, old_id: int) -> None:
        if off == APIC_ID and vcpu.apic.read_reg(APIC_ID) != old_id:
            self.kvm.recalc_apic_map()   # raises or clears APIC_ID_MODIFIED
        elif off in (APIC_LDR, APIC_DFR):
            self.kvm.recalc_apic_map()

    def _exit_apic_write(self, vcpu: Vcpu) -> Gen:
        """handle_apic_write(): trap-like, the value is already in the virtual-APIC page; replay it
        through the APIC model (kvm_apic_write_nodecode), e.g. send a non-virtualised IPI."""
        kvm = self.kvm
        off = vcpu.ctx.exit_qualification & 0xFF0
        a = vcpu.apic
        yield kvm.costs.APIC_WRITE_TRAP
        old_id = vcpu.vcpu_id << 24 if off == APIC_ID else 0
        if off == APIC_ICR and a.mode == "x2apic":
            a.write_reg(APIC_ICR, a.regs[APIC_ICR >> 2] | (a.regs[APIC_ICR2 >> 2] << 32))
        else:
            a.write_reg(off, a.regs[off >> 2])
        self._after_apic_write(vcpu, off, old_id)
        return "continue"

    def _exit_apic_access(self, vcpu: Vcpu) -> Gen:
        """handle_apic_access(): fault-like; the EOI fast path, else instruction emulation."""
        kvm = self.kvm
        ctx: VmcsContext = vcpu.ctx
        insn = ctx.exit_insn
        ctx.exit_insn = None
        off = ctx.exit_qualification & 0xFFF
        write = bool((ctx.exit_qualification >> 12) & 0xF)
        a = vcpu.apic
        if write and off == APIC_EOI:
            yield kvm.costs.MSR_EMULATE   # kvm_lapic_set_eoi + skip: no decode
            a.eoi()
            vcpu.guest.retire(None)
            return "continue"
        # kvm_emulate_instruction(): an MMIO access at the APIC-access address, which the APIC
        # decodes against its own base (a relocated APIC does not claim this page).
        yield from kvm.emulate_apic_mmio(vcpu, insn)
        return "continue"

    def _exit_ept_violation(self, vcpu: Vcpu) -> Gen:
        """handle_ept_violation() -> kvm_mmu_page_fault(): an APIC page access with nothing mapped
        (no memslot, or the APIC-access page while APICv is not activated: RET_PF_EMULATE) is
        emulated MMIO. (KVM's MMIO SPTEs make later accesses to a no-memslot GPA EPT
        misconfigurations; navic takes the violation each time, same handler cost.)"""
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        yield from self.kvm.emulate_apic_mmio(vcpu, insn)
        return "continue"

    def _exit_eoi_induced(self, vcpu: Vcpu) -> Gen:
        """handle_apic_eoi_induced(): the EOI was virtualised (vISR already cleared); tell the
        (IOAPIC) side of a level-triggered vector (kvm_apic_set_eoi_accelerated)."""
        kvm = self.kvm
        vector = vcpu.ctx.exit_qualification & 0xFF
        a = vcpu.apic
        yield kvm.costs.EOI_INDUCED_EXIT
        if a.test_tmr(vector):
            a.hooks.eoi_level(a, vector)
        vcpu.requests.add(REQ_EVENT)
        return "continue"

    def _exit_tpr_below_threshold(self, vcpu: Vcpu) -> Gen:
        """handle_tpr_below_threshold(): PPR dropped, a pending IRR may be injectable."""
        vcpu.apic.update_ppr()
        vcpu.requests.add(REQ_EVENT)
        return "continue"
        yield  # pragma: no cover

    _handlers: dict[int, Any] = {
        X.EXIT_REASON_EXTERNAL_INTERRUPT: _exit_external_interrupt,
        X.EXIT_REASON_VMRESUME: _exit_vmresume,
        X.EXIT_REASON_INTERRUPT_WINDOW: _exit_interrupt_window,
        X.EXIT_REASON_NMI_WINDOW: _exit_nmi_window,
        X.EXIT_REASON_VMCALL: _exit_vmcall,
        X.EXIT_REASON_HLT: _exit_hlt,
        X.EXIT_REASON_MSR_READ: _exit_msr,
        X.EXIT_REASON_MSR_WRITE: _exit_msr,
        X.EXIT_REASON_APIC_WRITE: _exit_apic_write,
        X.EXIT_REASON_APIC_ACCESS: _exit_apic_access,
        X.EXIT_REASON_EPT_VIOLATION: _exit_ept_violation,
        X.EXIT_REASON_EOI_INDUCED: _exit_eoi_induced,
        X.EXIT_REASON_TPR_BELOW_THRESHOLD: _exit_tpr_below_threshold,
    }


def build_kvm_vmx(scn: Any, engine: Any, costs: Any, rec: Any, tr: Any, guest: Any) -> Kvm:
    """L0 = KVM on Intel VMX: host, VMX silicon, one VM with its vCPU threads (the intel branch of
    :func:`navic.runner.build_kvm`)."""
    from navic.hv.host import Host
    from navic.hw.features import features_for

    features = features_for(scn.host.cpu)
    host = Host(scn, engine, costs, rec, tr)
    host.silicon = Vmx(host, features)
    kvm = Kvm(host)
    kvm.vendor = VmxVendor(kvm, host, host.silicon, features)
    kvm.create_vcpus(scn.l1, guest)   # each backing page = the virtual-APIC page = KVM's apic->regs
    for v in kvm.vcpus:
        engine.spawn(kvm.vcpu_thread(v), v.name)
    return kvm
