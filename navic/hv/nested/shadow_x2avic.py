"""Design ``shadow-x2avic`` — the RFC v3 shadow design extended to x2AVIC for L2, as its author said
it would be (Maxim Levitsky, Oct 2022, digest §6.2.2 / §6.3 [M-OCT]: "x2AVIC is a small addition":
physical ID tables, backing pages and doorbell emulation unchanged).

What changes against :mod:`.shadow` (RFC v3, xAVIC only for L2):

* L1 is offered x2AVIC (and x2AVIC_EXT where the CPU has it) besides AVIC;
* vmcb02 gets the x2AVIC enable bit (int_ctl bit 30) when vmcb12 asks for it; the APIC_BAR MMIO
  page and the logical table are then unused by hardware (x2APIC logical IDs are read-only);
* the shadow physical table is sized for the x2AVIC maximum of the CPU: 512 entries (one page,
  ``X2AVIC_MAX_PHYSICAL_ID`` = 0x1FF) or with X2AVIC_EXT 4096 entries (eight consecutive pages,
  0xFFF); L1's table may span several frames, each write-tracked;
* x2APIC MSRs: vmcb02's MSR permission map is L1's for L2 (the core takes L1's policy), so the
  x2APIC MSRs L1 passes through with x2AVIC reach x2AVIC hardware instead of exiting;
* the x2AVIC form of AVIC_INCOMPLETE_IPI: EXITINFO1 carries the 32-bit x2APIC destination, the
  broadcast ID is 0xFFFFFFFF and logical destinations are cluster dest[31:16], members dest[15:0]
  (ID = 16 * cluster + bit), reported by physical ID (APM 15.29.9; :func:`navic.hw.avic.icr_write`).

An xAPIC L2 runs exactly as under ``shadow``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from navic.hv.nested.shadow import ShadowDesign, ShadowTable
from navic.hw import avic as A

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu
    from navic.hv.nested.core import NestedSvm
    from navic.hw.vmcb import Vmcb


class ShadowX2avicDesign(ShadowDesign):
    name = "shadow-x2avic"
    offers_x2avic = True

    def __init__(self, core: NestedSvm) -> None:
        features = core.host.silicon.features
        # avic_physid_shadow_table_alloc() sized for the x2AVIC maximum (as KVM's own table).
        self.table_pages = A.phys_table_pages(max(features.x2avic_max_physical_id, 0xFF))
        super().__init__(core)

    def prepare_vmcb02(self, vcpu: Vcpu, vmcb12: Vmcb, vmcb02: Vmcb) -> None:
        super().prepare_vmcb02(vcpu, vmcb12, vmcb02)
        if vmcb12.avic_enable and vmcb12.x2avic_enable and self.host.silicon.features.x2avic:
            vmcb02.x2avic_enable = 1   # int_ctl bit 30 (X2APIC_MODE_MASK)

    def _destinations(self, vcpu: Vcpu, vmcb12: Vmcb, self_id: int, lo: int, hi: int,
                      t: ShadowTable) -> list[tuple[int, int]]:
        """The x2AVIC destination decode for an x2APIC L2; the xAVIC one otherwise."""
        if not vcpu.nested.vmcb02.x2avic_enable:
            return super()._destinations(vcpu, vmcb12, self_id, lo, hi, t)
        sh = (lo >> 18) & 3
        logical = (lo >> 11) & 1
        if sh == 1:
            return []
        if sh in (2, 3) or hi == 0xFFFFFFFF:
            return [(i, i) for i in range(t.nentries) if not (sh == 3 and i == self_id)]
        if logical:
            return [(pid, pid) for pid in A.x2apic_logical_dest_ids(hi)]
        return [(hi, hi)]
