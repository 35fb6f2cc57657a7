"""L0's nested SVM (KVM's arch/x86/kvm/svm/nested.c): VMRUN emulation, L2 exits, nested #VMEXIT.

* ``nested_svm_vmrun``: an L1 vCPU executed VMRUN (intercepted). Read vmcb12 from L1 memory,
  build vmcb02 (``nested_vmcb02_prepare_control``) — the design fills the AVIC fields — switch the
  vCPU to guest mode (its running context becomes ctx02: the L2 vCPU's CPU state and backing page)
  and raise its per-vCPU NESTED inhibit (its own, L1-level AVIC goes off: IsRunning = 0).
* ``handle_l2_exit``: every exit taken while L2 runs comes here first. L0 handles it alone
  (counted under ``l0_l2``) or reflects it (``nested_svm_vmexit``: EXITCODE/EXITINFO into vmcb12,
  back to ctx01, the VMRUN instruction retires with the exit code; L1 counts it under ``l1``).
* ``check_nested_events``: an L1-bound interrupt pending while the vCPU is in guest mode, and L1
  intercepts INTR → nested #VMEXIT(INTR) before entering L2 again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from navic.hv.kvm import IN_GUEST_MODE, REQ_APICV_UPDATE, drain
from navic.hv.nested import make_design
from navic.hv.nested.base import HANDLED, Gen
from navic.hw import vmcb as V
from navic.hw.isa import Fault
from navic.hw.svm import GuestContext

if TYPE_CHECKING:
    from navic.hv.guestmem import GuestMemory
    from navic.hv.host import Host
    from navic.hv.kvm import Kvm, Vcpu
    from navic.hv.l1 import L1Host

# vmcb12 int_ctl bits L0 takes from L1 (V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR).
V_INT_FROM_L1 = 0xFF | (1 << 8) | (0xF << 16) | (1 << 20)


class NestedState:
    """``svm->nested`` for one L1 vCPU."""

    __slots__ = ("active", "vmcb12_gpa", "vmcb12", "l2", "vmcb02", "ctx02", "entries")

    def __init__(self, vmcb02: V.Vmcb) -> None:
        self.active = False
        self.vmcb12_gpa = 0
        self.vmcb12: V.Vmcb | None = None
        self.l2: Vcpu | None = None
        self.vmcb02 = vmcb02
        self.ctx02: GuestContext | None = None
        self.entries = 0


class NestedSvm:
    """L0's nested-SVM support for one L1 VM, with its nested APIC design."""

    def __init__(self, kvm: Kvm, host: Host, l1mem: GuestMemory, design: str) -> None:
        self.kvm = kvm
        self.host = host
        self.l1mem = l1mem
        self.l1host: L1Host | None = None      # set once L1's KVM exists
        self.vcpu_by_vmcb12: dict[int, Vcpu] = {}  # vmcb12 GPA -> L1 KVM's vCPU (L2)
        self.design = make_design(design, self)

    # -- VMRUN from L1 ---------------------------------------------------------------------------
    def vmrun(self, vcpu: Vcpu) -> Gen:
        """nested_svm_vmrun() + enter_svm_guest_mode()."""
        kvm = self.kvm
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        gpa = insn.vmcb
        l2 = self.vcpu_by_vmcb12.get(gpa)
        if l2 is None:
            vcpu.guest.retire(Fault("#GP", f"VMRUN: {gpa:#x} is not a VMCB of this guest"))
            return "continue"
        kvm.rec.count("nested_vmrun")
        yield kvm.costs.NESTED_VMRUN
        st: NestedState | None = getattr(vcpu, "nested", None)
        if st is None:
            st = NestedState(V.Vmcb(kvm.mem, kvm.mem.alloc(1)))
            vcpu.nested = st
        vmcb12 = l2.vmcb
        vmcb01 = vcpu.vmcb
        vmcb02 = st.vmcb02
        # nested_vmcb02_prepare_control()
        for w in range(6):
            vmcb02.mem.write32(vmcb02.hpa + 4 * w, vmcb12.intercept_word(w) | vmcb01.intercept_word(w))
        vmcb02.set_intercept(V.INTERCEPT_VMRUN)
        vmcb02.asid = 2
        vmcb02.np_enable = True
        vmcb02.int_ctl = (vmcb12.int_ctl & V_INT_FROM_L1) | (vmcb01.int_ctl & (1 << 24))
        vmcb02.int_vector = vmcb12.int_vector
        vmcb02.event_inj = vmcb12.event_inj
        vmcb12.event_inj = 0
        vmcb02.int_state = vmcb12.int_state   # guest state: L2's interrupt shadow
        self.design.prepare_vmcb02(vcpu, vmcb12, vmcb02)
        if vmcb02.avic_enable:
            vmcb02.int_ctl = vmcb02.int_ctl & ~(1 << 8)   # V_IRQ is ignored under AVIC (RFC patch 13)
        ctx02 = st.ctx02
        if ctx02 is None or ctx02.guest is not l2.guest:
            ctx02 = GuestContext(l2.name, "L2", vmcb02, l2.guest)
            st.ctx02 = ctx02
        ctx02.bind_vapic(l2.apic)
        ctx02.single_step = l2.ctx.single_step   # RFLAGS.TF L1 set (its NMI single-step)
        ctx02.msr_rd = l2.ctx.msr_rd   # immutable policy sets: shared, not copied
        ctx02.msr_wr = l2.ctx.msr_wr
        st.active = True
        st.vmcb12_gpa = gpa
        st.vmcb12 = vmcb12
        st.l2 = l2
        st.entries += 1
        vcpu.ctx = ctx02
        # The vCPU's own (L1) AVIC is inhibited while it runs L2 (APICV_INHIBIT_REASON_NESTED).
        vcpu.nested_inhibit = True
        kvm.inhibits.set_vcpu("NESTED", vcpu.name)
        vcpu.requests.add(REQ_APICV_UPDATE)
        if kvm.trace.on:
            kvm.trace.emit("kvm_nested_vmenter", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name, vmcb=gpa,
                           l2=l2.name, avic=int(vmcb02.avic_enable))
        return "continue"

    # -- exits while L2 runs -----------------------------------------------------------------------
    def handle_l2_exit(self, vcpu: Vcpu, code: int) -> Gen:
        kvm = self.kvm
        st: NestedState = vcpu.nested
        vmcb02 = st.vmcb02
        vmcb12 = st.vmcb12
        info1, info2 = vmcb02.exit_info_1, vmcb02.exit_info_2
        ctx02 = st.ctx02
        if code in (V.SVM_EXIT_AVIC_INCOMPLETE_IPI, V.SVM_EXIT_AVIC_UNACCELERATED_ACCESS):
            decision, code, info1, info2 = yield from self.design.on_avic_exit(vcpu, code, info1, info2)
        elif code == V.SVM_EXIT_INTR:
            decision = HANDLED
        elif code == V.SVM_EXIT_HLT and not vmcb12.intercept(V.INTERCEPT_HLT):
            decision = HANDLED
        else:
            decision = "reflect"
        name = V.exit_name(code)
        if decision == HANDLED:
            kvm.rec.exit("l0_l2", name)
            if kvm.trace.on:
                kvm.trace.emit("kvm_exit", pcpu=vcpu.cpu, level="L0", vcpu=ctx02.name, reason=name,
                               info1=info1, info2=info2, nested=1)
            yield kvm.costs.EXIT_DISPATCH
            if code == V.SVM_EXIT_HLT:
                ctx02.exit_insn = None
                l2 = st.l2
                l2.guest.retire(None)
                return "halt"
            if self.l1_event_pending(vcpu):
                yield from self.nested_svm_vmexit(vcpu, V.SVM_EXIT_INTR, 0, 0)
            return "continue"
        yield from self.nested_svm_vmexit(vcpu, code, info1, info2)
        return "continue"

    def l1_event_pending(self, vcpu: Vcpu) -> bool:
        """An interrupt for L1 itself is pending and L1 intercepts INTR (KVM always does)."""
        st = vcpu.nested
        if st is None or not st.active:
            return False
        a = vcpu.apic
        if not st.vmcb12.intercept(V.INTERCEPT_INTR):
            return False
        return a.has_interrupt() >= 0 or a.nmi_pending or bool(getattr(vcpu.guest, "frames", None))

    def check_nested_events(self, vcpu: Vcpu) -> Gen | tuple[()]:
        """svm_check_nested_events(): an L1 interrupt before re-entering L2 → nested #VMEXIT(INTR).
        Returns the steps to run (none, the common case, without building a generator)."""
        if self.l1_event_pending(vcpu):
            return self.nested_svm_vmexit(vcpu, V.SVM_EXIT_INTR, 0, 0)
        return ()

    def nested_svm_vmexit(self, vcpu: Vcpu, code: int, info1: int, info2: int) -> Gen:
        kvm = self.kvm
        st: NestedState = vcpu.nested
        vmcb12 = st.vmcb12
        vmcb02 = st.vmcb02
        l2 = st.l2
        self.design.nested_vmexit(vcpu)
        vmcb12.set_exit(code, info1, info2)
        vmcb12.v_tpr = vmcb02.v_tpr
        if vmcb02.event_inj & (1 << 31):      # not delivered: give it back to L1 (exit_int_info)
            vmcb12.exit_int_info = vmcb02.event_inj
            vmcb02.event_inj = 0
        vmcb12.int_state = vmcb02.int_state   # nested_svm_vmexit(): L2's interrupt shadow
        # V_IRQ state (the interrupt window L1 asked for) goes back too.
        vmcb12.v_irq = vmcb02.v_irq if not vmcb02.avic_enable else vmcb12.v_irq
        l2.ctx.exit_insn = st.ctx02.exit_insn
        st.ctx02.exit_insn = None
        st.active = False
        vcpu.ctx = vcpu.ctx01
        vcpu.nested_inhibit = False
        kvm.inhibits.clear_vcpu("NESTED", vcpu.name)
        # nested_svm_vmexit(): "Un-inhibit the AVIC right away" — __kvm_vcpu_update_apicv() now
        # (when kvm_apicv_activated(), i.e. no VM-wide inhibit), not KVM_REQ_APICV_UPDATE at the next
        # entry: IsRunning is 1 again before the rest of the #VMEXIT emulation runs.
        if not kvm.inhibits:
            kvm.vendor.refresh_apicv_exec_ctrl(vcpu)
        kvm.rec.count("nested_vmexit")
        if kvm.trace.on:
            kvm.trace.emit("kvm_nested_vmexit", pcpu=vcpu.cpu, level="L0", vcpu=l2.name,
                           reason=V.exit_name(code), info1=info1, info2=info2)
        yield kvm.costs.NESTED_VMEXIT
        vcpu.guest.retire(code)   # the L1 vCPU's VMRUN instruction completes
        return "continue"

    # -- doorbells toward an L1 vCPU ---------------------------------------------------------------
    def doorbell_write_outside_l1(self, value: int) -> None:
        """L1 wrote the doorbell MSR on an L1 CPU navic does not step (an L1 timer callback,
        :meth:`navic.hv.l1.L1Host.doorbell`): the design's emulation of that WRMSR, with no source
        vCPU (its exit's cost falls on that CPU, not on a modelled one)."""
        drain(self.design.on_doorbell_write(None, value))

    def emulate_doorbell(self, src: Vcpu | None, l1_apic_id: int) -> None:
        """avic_emulate_doorbell_write(): the target L1 vCPU is running L2 → a real doorbell to its
        pCPU (the silicon evaluates vmcb02's backing page); it is in L2 but not in guest mode right
        now → wake it up; not running L2 → nothing (its next VMRUN evaluates IRR)."""
        kvm = self.kvm
        kvm.rec.count("emulated_doorbells")
        target = kvm.vcpu_by_id.get(l1_apic_id)
        if target is None:
            return
        st = getattr(target, "nested", None)
        if st is None or not st.active:
            return
        if target.mode == IN_GUEST_MODE and target.cpu is not None:
            if src is None or src.cpu != target.cpu:
                self.host.doorbell(self.host.pcpus[target.cpu].apic_id, src=src.cpu if src else None)
            else:
                target.pcpu.doorbell_pending = True
        else:
            kvm.kvm_vcpu_wake_up(target)

