"""Design ``dummy`` on VMX — the IPIv analogue of Sean Christopherson's intermediate step (digest §6.3
step 8; a derived design, no such patches exist).

L1 is offered APICv with posted interrupts and IPI virtualisation. vmcs02 keeps L1's APICv for L2
(virtual-APIC page = L2's real page, posted interrupts through L1's PID for that L2 vCPU) and turns
IPIv on with ONE EMPTY PID-pointer table owned by L0 (every entry invalid): every L2 unicast ICR
write that IPIv would accelerate ends in the trap-like APIC-write exit (qualification 300h) at L0,
as do all the others (logical, broadcast, shorthands, NMI/INIT...). L0 then re-runs the SDM's IPIv
algorithm — the silicon's own :func:`navic.hw.vmx.ipiv_icr_write` — in software over **L1's**
PID-pointer table in L1 memory: a valid entry → PIR bit and ON in the PID L1 named (the real one
vmcs02 uses when that L2 vCPU runs) and the notification NV → NDST emulated toward the L1 vCPU
(:meth:`VmxDummyDesign.notify`); anything IPIv would not have accelerated with L1's table (invalid
entry, index beyond L1's LAST_PID_POINTER_INDEX, non-unicast) is reflected to L1 as the same
APIC-write exit, which L1's KVM emulates as usual.

The emulation flow is the vendor-neutral :class:`~navic.hv.nested.ipi_emulation.L1TableIpiEmulation`
shared with the AVIC design (:mod:`.dummy`); only the algorithm and the notification are VMX's.
Receive side: no exit — posted-interrupt processing with POSTED_INTR_NESTED_VECTOR in L2, or at the
next vmcs02 entry. Nothing L0 shares with L1 is ever written by L1 for L2 to see, so there is no
write tracking and no shadow state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from navic.apic.registers import APIC_ICR, APIC_ICR2
from navic.hv.nested.base import REFLECT, Gen
from navic.hv.nested.ipi_emulation import L1TableIpiEmulation
from navic.hv.nested.vmx_core import VmxDesign
from navic.hw import vmx as X

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu
    from navic.hv.nested.vmx_core import NestedVmx
    from navic.hw.vmx_guest import VmcsContext

DUMMY_PID_ENTRIES = 4096   # the empty table's size; LAST_PID_POINTER_INDEX is clamped to it


class VmxDummyDesign(VmxDesign):
    name = "dummy"
    offers_apicv = True

    def __init__(self, core: NestedVmx) -> None:
        super().__init__(core)
        mem = self.host.mem
        self.table_hpa = mem.alloc(DUMMY_PID_ENTRIES * 8 // 4096)   # all zero: every entry invalid
        self.ipis = L1TableIpiEmulation(core)
        self.notify_host_ipis = 0

    def prepare_vmcs02(self, vcpu: Vcpu, ctx12: VmcsContext, ctx02: VmcsContext) -> None:
        if not ctx12.ipiv:
            return
        ctx02.ipiv = True
        ctx02.pid_table_hpa = self.table_hpa
        ctx02.last_pid_index = min(ctx12.last_pid_index, DUMMY_PID_ENTRIES - 1)

    def on_apic_exit(self, vcpu: Vcpu, reason: int, qual: int) -> Gen:
        st = vcpu.nested
        ctx12 = st.ctx12
        if reason != X.EXIT_REASON_APIC_WRITE or (qual & 0xFF0) != APIC_ICR or not ctx12.ipiv:
            return (REFLECT, reason, qual)   # exactly what L1 would see
        regs = st.ctx02.vapic.regs
        lo, hi = regs[APIC_ICR >> 2], regs[APIC_ICR2 >> 2]
        x2 = st.ctx02.virt_x2apic_mode
        l1mem = self.core.l1mem
        pid_gpa = [0]   # the PID IPIv posted into (for the notification that follows)

        def ipiv_algorithm(l2: Vcpu, deliver: Any, notify: Any) -> Gen:
            """SDM IPI virtualisation on L1's PID-pointer table (L1 memory)."""
            return X.ipiv_icr_write(
                l1mem, ctx12.pid_table_hpa, ctx12.last_pid_index, lo, hi, x2,
                lambda nv, ndst: notify(nv, ndst, pid_gpa[0]),
                pir_set=lambda gpa, vec, _dest: (pid_gpa.__setitem__(0, gpa), deliver(gpa, vec)),
                fine_grained=True)

        decision, reason, qual, _ = yield from self.ipis.emulate(
            vcpu, (reason, qual, 0), ipiv_algorithm, self.notify, lambda ex: (ex.reason, ex.qualification, 0))
        return (decision, reason, qual)

    def notify(self, src: Vcpu, nv: int, ndst: int, pid_gpa: int) -> None:
        """The notification NV → NDST that IPIv would have sent for L1's PID at ``pid_gpa``. NDST is
        an L1 APIC ID (L1's KVM is the "host" that wrote it). If that L1 vCPU runs the L2 vCPU of
        this PID in guest mode: POSTED_INTR_NESTED_VECTOR to its pCPU (L2 processes it without an
        exit); in L2 but out of guest mode: wake it (the next vmcs02 entry processes ON); else the
        vector NV is an interrupt for that L1 vCPU (L1 KVM's POSTED_INTR_VECTOR or wake-up vector)."""
        hpa = self.core.l1mem.hpa(pid_gpa)
        l1host = self.core.l1host

        def runs(st: Any) -> bool:
            pid = st.ctx02.pid if st.ctx02 is not None else None
            return pid is not None and pid.hpa == hpa and nv == X.POSTED_INTR_VECTOR

        def otherwise(target: Vcpu) -> None:
            l1host.interrupt_l1_vcpu(l1host.l1_vcpus.index(target), nv)

        self.kvm.rec.count("emulated_pi_notifications")
        self.ipis.notify_l1_vcpu(src, X.ndst_to_apic_id(ndst, x2apic=True), runs=runs,
                                 signal=lambda target: self._notify_nested(src, target),
                                 otherwise=otherwise)

    def _notify_nested(self, src: Vcpu, target: Vcpu) -> None:
        """POSTED_INTR_NESTED_VECTOR to the pCPU running the target's vmcs02 (a host IPI on the
        wire): processed there if that vmcs02 still runs, else its next entry sees ON."""
        host = self.host
        ctx02 = target.nested.ctx02
        cpu = target.cpu
        host.rec.count("host_ipis")
        self.kvm.rec.count("posted_intr_notifications")

        def arrive() -> None:
            p = host.pcpus[cpu]
            if p.guest_mode and p.running is ctx02:
                ctx02.pi_nested_pending = True
                p.wake.fire()

        if src.cpu == cpu:
            arrive()
        else:
            host.engine.call_later(host.costs.HOST_IPI_WIRE, arrive, label="host-ipi")

