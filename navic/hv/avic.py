"""KVM's AVIC code at L0 (arch/x86/kvm/svm/avic.c), function for function.

Per VM: the physical APIC ID table (sized for the x2AVIC maximum) and the logical table. Per
vCPU: ``avic_physical_id_entry``, the software shadow of its table entry — the source of truth;
the real table gets a copy without IsRunning when ``enable_ipiv`` is off (digest §5.3, §5.7).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from navic.apic import dest as apic_dest
from navic.apic.icr import Icr
from navic.apic.registers import APIC_DFR, APIC_LDR
from navic.hw import avic as A

if TYPE_CHECKING:
    from navic.hv.kvm import Kvm, Vcpu

AVIC_LOGICAL_TABLE_ENTRIES = 1024

# The kernel that last let enable_ipiv = 1 stand on AMD family 17h/18h: avic_hardware_setup() forces it
# off there since 8de4a1c8164e (after d921665e01ba); navic's ``ipiv = true`` on such a part models an
# older kernel.
PRE_IPIV_FORCE_OFF = "pre-8de4a1c8164e kernel"


def avic_want_avic_enabled(avic: str | bool, force_avic: bool, features: Any) -> bool:
    """avic.c avic_want_avic_enabled() (kvm-x86/linux at 1a27afa0511e): ``avic = "auto"`` (the
    default) enables AVIC only where X2AVIC is enumerated on Zen4 (X86_FEATURE_ZEN4) or family >= 0x1A;
    Zen1–3 need ``avic = 1``; without AVIC in CPUID (Zen3) ``force_avic`` must be set as well."""
    if not features.avic:
        return False
    if avic == "auto":
        avic = features.x2avic and (features.name == "zen4" or features.family >= 0x1A)
    if not avic:
        return False
    return bool(features.avic_enumerated or force_avic)


def ipiv_forced_off(features: Any) -> bool:
    """avic_hardware_setup(): "Disable IPI virtualization for AMD Family 17h (Zen1 and Zen2) and Hygon
    Family 18h ... due to erratum 1235" — after the module parameters are read, whatever they say."""
    return features.family in (0x17, 0x18)


class AvicVm:
    """``struct kvm_svm``'s AVIC part: tables in host memory and the module parameters."""

    def __init__(self, kvm: Kvm, features: Any, *, enable_ipiv: bool) -> None:
        self.kvm = kvm
        self.mem = kvm.mem
        self.features = features
        self.enable_ipiv = enable_ipiv
        self.x2avic_max_id = features.x2avic_max_physical_id
        max_id = max(self.x2avic_max_id, features.avic_max_physical_id)
        npages = max(1, ((max_id + 1) * 8 + 4095) // 4096)
        self.physical_table_hpa = self.mem.alloc(npages)
        self.physical_table_pages = npages
        self.logical_table_hpa = self.mem.alloc(1)
        self._max_vcpu_id: tuple[int, int] = (0, 0)   # (len(vcpus) when computed, max vcpu_id)

    def physical_entry_hpa(self, apic_id: int) -> int:
        return self.physical_table_hpa + 8 * apic_id

    def max_physical_id(self, x2apic: bool) -> int:
        """avic_get_max_physical_id(): the arch max for the mode, capped by the vCPU count."""
        arch_max = self.x2avic_max_id if x2apic and self.features.x2avic else self.features.avic_max_physical_id
        return min(self.max_vcpu_id(), arch_max)

    def max_vcpu_id(self) -> int:
        """``kvm->arch.max_vcpu_ids - 1``: a per-VM constant once the vCPUs exist (userspace sizes it
        to the highest APIC ID), so it is computed once per vCPU count, not on every activation."""
        n = len(self.kvm.vcpus)
        if self._max_vcpu_id[0] != n:
            self._max_vcpu_id = (n, max((v.vcpu_id for v in self.kvm.vcpus), default=0))
        return self._max_vcpu_id[1]

    # -- avic_init_backing_page ---------------------------------------------------------------
    def init_backing_page(self, vcpu: Vcpu) -> bool:
        """Write the vCPU's entry (backing page | Valid) into the table; False if its APIC ID is
        too big for AVIC (KVM then raises PHYSICAL_ID_TOO_BIG)."""
        limit = self.x2avic_max_id if self.features.x2avic else self.features.avic_max_physical_id
        if vcpu.vcpu_id > limit:
            return False
        entry = A.phys_entry(vcpu.backing_hpa, host_id=0, running=False, valid=True)
        vcpu.avic_physical_id_entry = entry
        self.mem.write64(self.physical_entry_hpa(vcpu.vcpu_id), entry)
        return True

    # -- load / put (IsRunning maintenance) ---------------------------------------------------
    def vcpu_load(self, vcpu: Vcpu, cpu: int) -> None:
        """avic_vcpu_load(): skipped while blocking; else IR <- 1 with this pCPU's APIC ID."""
        if vcpu.blocking or not vcpu.apicv_active:
            return
        self._load(vcpu, cpu)

    def _load(self, vcpu: Vcpu, cpu: int) -> None:
        host_id = self.kvm.host.pcpus[cpu].apic_id
        entry = A.phys_entry_with(vcpu.avic_physical_id_entry, host_id=host_id, running=True)
        vcpu.avic_physical_id_entry = entry
        self._write_real(vcpu, entry if self.enable_ipiv else entry & ~A.PHYS_IS_RUNNING)
        self.kvm.vendor.update_irtes(vcpu, running=True, host_id=host_id)
        if self.kvm.trace.on:
            self.kvm.trace.emit("navic_avic_vcpu_load", pcpu=cpu, level="L0", vcpu=vcpu.name,
                                entry=entry, ipiv=self.enable_ipiv)

    def vcpu_put(self, vcpu: Vcpu, *, blocking: bool = False) -> None:
        """__avic_vcpu_put(): IR <- 0 (the old host ID stays in the entry)."""
        entry = vcpu.avic_physical_id_entry
        if not entry & A.PHYS_IS_RUNNING:
            return
        entry &= ~A.PHYS_IS_RUNNING
        vcpu.avic_physical_id_entry = entry
        if self.enable_ipiv:
            self._write_real(vcpu, entry)
        self.kvm.vendor.update_irtes(vcpu, running=False, host_id=None, ga_log=blocking)
        if self.kvm.trace.on:
            self.kvm.trace.emit("navic_avic_vcpu_put", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name,
                                entry=entry, blocking=blocking)

    def _write_real(self, vcpu: Vcpu, entry: int) -> None:
        if vcpu.vcpu_id <= self.x2avic_max_id or vcpu.vcpu_id <= self.features.avic_max_physical_id:
            self.mem.write64(self.physical_entry_hpa(vcpu.vcpu_id), entry)

    # -- logical table (xAVIC): avic_handle_ldr_update / avic_handle_dfr_update --------------
    def logical_entry_hpa(self, ldr: int, flat: bool) -> int | None:
        dlid = (ldr >> 24) & 0xFF
        idx = A.logical_index(dlid, flat)
        if idx is None:
            return None
        return self.logical_table_hpa + 4 * idx

    def invalidate_logical(self, vcpu: Vcpu) -> None:
        if vcpu.ldr_reg:
            hpa = self.logical_entry_hpa(vcpu.ldr_reg, vcpu.dfr_reg == 0xFFFFFFFF)
            if hpa is not None:
                self.mem.write32(hpa, self.mem.read32(hpa) & ~A.LOG_VALID)

    def handle_ldr_update(self, vcpu: Vcpu) -> None:
        if vcpu.apic.mode == "x2apic":
            return
        ldr = vcpu.apic.read_reg(APIC_LDR)
        if ldr == vcpu.ldr_reg:
            return
        self.invalidate_logical(vcpu)
        vcpu.ldr_reg = ldr
        if ldr:
            hpa = self.logical_entry_hpa(ldr, vcpu.apic.read_reg(APIC_DFR) == 0xFFFFFFFF)
            if hpa is not None:
                self.mem.write32(hpa, A.log_entry(vcpu.vcpu_id & 0xFF, valid=True))
        self.kvm.vendor.recalc_logical_aliasing()

    def handle_dfr_update(self, vcpu: Vcpu) -> None:
        """avic_handle_dfr_update(): invalidate the entry the old (LDR, DFR) pair selected and note
        the new DFR — nothing more. ``ldr_reg`` keeps the old LDR, so the entry stays invalid until
        the guest writes an LDR that differs from it (avic_handle_ldr_update returns early on an
        unchanged LDR); until then logical IPIs to it exit (ID 2) and are emulated."""
        dfr = vcpu.apic.read_reg(APIC_DFR)
        if dfr == vcpu.dfr_reg:
            return
        self.invalidate_logical(vcpu)
        vcpu.dfr_reg = dfr

    # -- AVIC_INCOMPLETE_IPI, ID 1: avic_kick_target_vcpus ------------------------------------
    def kick_target_vcpus(self, src: Vcpu, icr: Icr, index: int) -> Generator[Any, Any, int]:
        """Hardware already set IRR everywhere; only wake/doorbell the targets (never set IRR
        again — that would duplicate the interrupt). Returns how many vCPUs were kicked."""
        kvm = self.kvm
        n = 0
        if icr.shorthand == 0 and icr.dest_mode == 0 and icr.dest not in (0xFF, 0xFFFFFFFF):
            targets = [v for v in kvm.vcpus if v.vcpu_id == index]   # fast path: the index is the target
        else:
            targets = [v for v in kvm.vcpus if apic_dest.match_dest(v.apic, src.apic, icr)]
            if kvm.trace.on:
                kvm.trace.emit("kvm_avic_kick_vcpu_slowpath", pcpu=src.cpu, level="L0", vcpu=src.name,
                               icrh=icr.dest, index=index)
        for v in targets:
            yield 0
            kvm.vendor.complete_interrupt_delivery(v, from_vcpu=src)
            n += 1
        return n
