"""Design ``dummy`` — Sean Christopherson's intermediate step (Nov 2022; digest §6.3).

Every L2 runs on ONE dummy physical APIC ID table: entries Valid, IsRunning = 0, backing pointer =
a sink page. (All-invalid would not do: broadcasts skip invalid entries without an exit, §3.3.)
So every non-self IPI from L2 ends in AVIC_INCOMPLETE_IPI ID 1 at L0 (hardware scribbles IRR bits
into the sink page, never read). L0 then re-runs the APM IPI algorithm *in software* against L1's
own tables, read from L1 memory — the same code as the silicon (:class:`navic.hw.avic.AvicEngine`)
over L1 guest-physical memory — setting IRR in the real L2 backing pages and emulating the doorbell
toward the L1 vCPU that L1's entry names, and reflects to L1 only what real hardware would have made
it see: ID 1 (some target not running per L1), ID 2 (no such target), ID 3 (bad backing page).

Receive-side acceleration (IRR evaluation, EOI, TPR, self-IPIs) is native: vmcb02 carries L2's
real backing page. IsRunning is never 1 in the dummy table, so erratum 1235 cannot touch L2 IPIs.
The logical table is L1's, passed through (an L1-invalid logical entry gives ID 2 directly).

The emulation itself (count + cost, algorithm over L1's table, delivery provenance, notification of
the L1 vCPU named in L1's entry, what to reflect) is the vendor-neutral
:class:`~navic.hv.nested.ipi_emulation.L1TableIpiEmulation`, shared with the VMX design
(:mod:`.vmx_dummy`); only the AVIC algorithm and the doorbell are given here.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from navic.hv.nested.base import REFLECT, Design, Gen, done
from navic.hv.nested.ipi_emulation import L1TableIpiEmulation
from navic.hw import avic as A
from navic.hw import vmcb as V
from navic.hw.avic import AvicEngine

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu
    from navic.hv.nested.core import NestedSvm
    from navic.hw.vmcb import Vmcb

DUMMY_ENTRIES = 4096


class DummyDesign(Design):
    name = "dummy"
    offers_avic = True
    offers_x2avic = True    # the dummy table works for x2AVIC L2s as for xAVIC ones

    def __init__(self, core: NestedSvm) -> None:
        super().__init__(core)
        mem = self.host.mem
        self.sink_hpa = mem.alloc(1)
        npages = DUMMY_ENTRIES * 8 // 4096
        self.table_hpa = mem.alloc(npages)
        entry = A.phys_entry(self.sink_hpa, host_id=0, running=False, valid=True)
        for i in range(DUMMY_ENTRIES):
            mem.write64(self.table_hpa + 8 * i, entry)
        # L0's software copy of the IPI algorithm, run over L1's guest-physical memory.
        self.emulator = AvicEngine(core.l1mem, self.host.silicon.features, doorbell=self._no_doorbell,
                                   fine_grained=True)
        self.ipis = L1TableIpiEmulation(core)

    @staticmethod
    def _no_doorbell(host_id: int) -> None:  # pragma: no cover - always overridden per call
        raise AssertionError("doorbell without a target")

    def prepare_vmcb02(self, vcpu: Vcpu, vmcb12: Vmcb, vmcb02: Vmcb) -> None:
        if not vmcb12.avic_enable:
            super().prepare_vmcb02(vcpu, vmcb12, vmcb02)
            return
        l1mem = self.core.l1mem
        vmcb02.avic_enable = 1
        vmcb02.x2avic_enable = 1 if (vmcb12.x2avic_enable and self.host.silicon.features.x2avic) else 0
        vmcb02.avic_vapic_bar = vmcb12.avic_vapic_bar & V.VMCB_AVIC_APIC_BAR_MASK
        vmcb02.backing_page_hpa = l1mem.hpa(vmcb12.backing_page_hpa)
        vmcb02.logical_table_hpa = l1mem.hpa(vmcb12.logical_table_hpa) if vmcb12.logical_table_hpa else self.sink_hpa
        vmcb02.physical_table_hpa = self.table_hpa
        vmcb02.max_index = vmcb12.max_index

    def on_avic_exit(self, vcpu: Vcpu, code: int, info1: int, info2: int) -> Gen:
        """Returns the steps: L0's emulation for ID 1, else reflect exactly what L1 would see."""
        if code != V.SVM_EXIT_AVIC_INCOMPLETE_IPI or (info2 >> 32) != A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING:
            return done((REFLECT, code, info1, info2))   # ID 0/2/3/4 and NOACCEL
        vmcb12 = vcpu.nested.vmcb12

        def apm_algorithm(l2: Vcpu, deliver: Any, notify: Any) -> Gen:
            """APM 15.29.6.1 on L1's tables: IRR in the real backing pages, doorbells to L1 vCPUs
            (the engine's steps themselves; its AvicExit, if any, is what L1 must see)."""
            return self.emulator.icr_write(vmcb12, l2.vcpu_id, 0, info1 & 0xFFFFFFFF, info1 >> 32,
                                           doorbell=notify, irr_set=deliver)

        return self.ipis.emulate(vcpu, (code, info1, info2), apm_algorithm, self.emulate_doorbell,
                                 _avic_exit_info)

    def emulate_doorbell(self, src: Vcpu | None, l1_apic_id: int) -> None:
        """avic_emulate_doorbell_write(): the shared notification with AVIC's signal — a real
        doorbell to the pCPU of an L1 vCPU running L2 (its AVIC evaluates vmcb02's backing page);
        an L1 vCPU not in L2 needs nothing (its next VMRUN evaluates IRR)."""
        self.kvm.rec.count("emulated_doorbells")
        self.ipis.notify_l1_vcpu(src, l1_apic_id, runs=None, signal=partial(self._doorbell, src),
                                 otherwise=_nothing)

    def _doorbell(self, src: Vcpu | None, target: Vcpu) -> None:
        if src is None or src.cpu != target.cpu:
            self.host.doorbell(self.host.pcpus[target.cpu].apic_id, src=src.cpu if src else None)
        else:
            target.pcpu.doorbell_pending = True

    def on_doorbell_write(self, vcpu: Vcpu, value: int) -> Gen:
        """avic_emulate_doorbell_write(): L1 rang the doorbell of one of its vCPUs."""
        if value >> 12:
            from navic.hw.isa import Fault

            return Fault("#GP", "AVIC doorbell: reserved bits set")
        yield 0
        self.emulate_doorbell(vcpu, value & 0xFFF)
        return None


def _avic_exit_info(res: A.AvicExit) -> tuple[int, int, int]:
    return res.code, res.info1, res.info2


def _nothing(target: Vcpu) -> None:
    """An L1 vCPU not running L2: its next VMRUN evaluates IRR."""
