"""Device interrupts under KVM: IOMMU IRTEs in guest mode (AVIC) and the GA log (avic.c).

KVM keeps every IRTE that posts to a vCPU on that vCPU's ``ir_list`` and rewrites it when the
vCPU is loaded or put (``avic_update_iommu_vcpu_affinity``): guest mode iff the vCPU's APICv is
active; IsRun and Destination follow the vCPU's pCPU; GALogIntr is set only while the vCPU is
blocking (the 2025 "GA log only when blocking" rework, digest §5.8). A GA-log interrupt runs
``avic_ga_log_notifier``, which wakes the vCPU named by the GATag.

When the IRTE is not in guest mode (APICv off, or a VMX host) the interrupt is *remapped* to the
host: it arrives at the target vCPU's home pCPU as a host interrupt (a guest running there takes
#VMEXIT(INTR)) and KVM injects it through the emulated APIC (``kvm_set_irq`` → irqfd).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from navic.hv.kvm import DM_FIXED, drain
from navic.hw.device import Device
from navic.hw.iommu import AmdIommu, GuestIrte, ga_tag

if TYPE_CHECKING:
    from navic.hv.host import Host
    from navic.hv.kvm import Kvm, Vcpu

AVIC_VM_ID = 1


class KvmIommu:
    """The IOMMU as KVM drives it for one VM, plus the host side of remapped interrupts."""

    def __init__(self, host: Host, kvm: Kvm) -> None:
        self.host = host
        self.kvm = kvm
        self.amd = host.silicon is not None and getattr(kvm.vendor, "avic", None) is not None
        self.hw = AmdIommu(host.mem, doorbell=lambda hid: host.doorbell(hid), ga_log_interrupt=self._ga_log_irq,
                           irr_set=self._irr_set, remapped=self._remapped) if self.amd else None
        self.irtes: dict[str, list[GuestIrte]] = {}
        self.owner: dict[int, Vcpu] = {}   # id(irte) -> the vCPU it posts to (KVM's ir_list)

    # -- configuration --------------------------------------------------------------------
    def attach(self, dev: Device, vcpu: Vcpu) -> GuestIrte:
        irte = GuestIrte(backing_hpa=vcpu.backing_hpa, vector=dev.cfg.vector,
                         ga_tag=ga_tag(AVIC_VM_ID, vcpu.idx), guest_mode=False)
        self.owner[id(irte)] = vcpu
        self.irtes.setdefault(vcpu.name, []).append(irte)
        self._sync(vcpu, irte)
        return irte

    def update_vcpu(self, vcpu: Vcpu, *, running: bool, host_id: int | None, ga_log: bool = False) -> None:
        """avic_update_iommu_vcpu_affinity() from __avic_vcpu_load / __avic_vcpu_put."""
        for irte in self.irtes.get(vcpu.name, ()):
            irte.is_run = running
            if host_id is not None:
                irte.dest = host_id
            irte.ga_log_intr = ga_log
            irte.guest_mode = self.amd and vcpu.apicv_active

    def _sync(self, vcpu: Vcpu, irte: GuestIrte) -> None:
        irte.guest_mode = self.amd and vcpu.apicv_active
        running = bool(vcpu.avic_physical_id_entry & (1 << 62)) if self.amd else False
        irte.is_run = running
        irte.ga_log_intr = vcpu.blocking
        if vcpu.cpu is not None:
            irte.dest = self.host.pcpus[vcpu.cpu].apic_id

    # -- a device fires -------------------------------------------------------------------
    def device_interrupt(self, irte: GuestIrte) -> None:
        vcpu = self.owner[id(irte)]
        self.kvm.rec.count("device_interrupts")
        if self.hw is None:
            self._remapped(irte)
            return
        irte.guest_mode = vcpu.apicv_active
        self.hw.post_device_interrupt(irte)

    def _irr_set(self, backing_hpa: int, vector: int, tag: int) -> None:
        owner = self.host.backing_owner.get(backing_hpa)
        if owner is None:
            return
        self.kvm.rec.accepted(owner.name, vector, "device", None, self.host.engine.now)
        owner.poll.fire()

    def _ga_log_irq(self) -> None:
        """The GA-log interrupt arrives at the host (pCPU 0) and runs avic_ga_log_notifier()."""
        host = self.host
        host.engine.call_later(host.costs.HOST_IPI_WIRE, self._ga_log_handler, label="ga-log-irq")

    def _ga_log_handler(self) -> None:
        host = self.host
        p = host.pcpus[0]
        if p.guest_mode:
            p.intr_pending = True
            p.wake.fire()
        for tag in self.hw.drain_ga_log():  # type: ignore[union-attr]
            self.kvm.rec.count("ga_log_entries")
            idx = tag & 0xFFF
            if idx < len(self.kvm.vcpus):
                v = self.kvm.vcpus[idx]
                if self.kvm.trace.on:
                    self.kvm.trace.emit("kvm_avic_ga_log", level="L0", vcpu=v.name, vm_id=tag >> 12,
                                        vcpu_idx=idx)
                self.kvm.kvm_vcpu_wake_up(v)

    def _remapped(self, irte: GuestIrte) -> None:
        """Legacy remapping: a host interrupt on the vCPU's home pCPU, then KVM injects it."""
        host = self.host
        vcpu = self.owner[id(irte)]
        t = host.engine.now
        host.engine.call_later(host.costs.HOST_IPI_WIRE, self._remapped_arrive, vcpu, irte.vector, t,
                               label="remapped-irq")

    def _remapped_arrive(self, vcpu: Vcpu, vector: int, t: int) -> None:
        p = self.host.pcpus[vcpu.home]
        if p.guest_mode:
            p.intr_pending = True
            p.wake.fire()
        self.kvm.rec.count("remapped_interrupts")
        drain(self.kvm.kvm_apic_accept_irq(vcpu, DM_FIXED, vector, 0, 1, None, t, kind="device"))


def attach_devices(host: Host, kvm: Kvm, devices: Any, ghz: float) -> KvmIommu:
    iommu = KvmIommu(host, kvm)
    host.iommu = iommu  # type: ignore[attr-defined]
    by_name = {v.name: v for v in kvm.vcpus}
    for i, cfg in enumerate(devices):
        vcpu = by_name[cfg.target]
        holder: dict[str, GuestIrte] = {}

        def fire(dev: Device, holder: dict[str, GuestIrte] = holder) -> None:
            iommu.device_interrupt(holder["irte"])

        dev = Device(host.engine, cfg, ghz, i, fire)
        holder["irte"] = iommu.attach(dev, vcpu)
    return iommu
