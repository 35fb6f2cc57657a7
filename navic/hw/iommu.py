"""AMD IOMMU guest-virtual-APIC interrupt posting — only what AVIC relies on (digest §4.7, §5.8).

A guest-mode IRTE names a vAPIC backing page, a vector, an opaque 32-bit GATag, IsRun, the host
APIC ID of the core running the vCPU (Destination) and GALogIntr.  On a device interrupt the IOMMU
atomically sets the IRR bit in the backing page, then: IsRun = 1 → doorbell to Destination;
IsRun = 0 and GALogIntr = 1 → append a GA-log entry (the GATag) and raise the GA-log interrupt;
otherwise nothing (the interrupt waits in IRR for the next VMRUN).  The IOMMU does not cache
IsRun/Destination (AMD, 2023), so every post reads the IRTE afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from navic.apic.registers import APIC_IRR
from navic.hw.memory import HostMemory

__all__ = [
    "GuestIrte", "AmdIommu", "ga_tag", "ga_tag_vm_id", "ga_tag_vcpu_idx", "AVIC_VCPU_IDX_BITS",
    "AVIC_VM_ID_SHIFT", "AVIC_VM_ID_MASK", "AVIC_VCPU_IDX_MASK",
]

# KVM: AVIC_VCPU_IDX_MASK = AVIC_PHYSICAL_MAX_INDEX_MASK (12 bits), AVIC_VM_ID_SHIFT = its popcount,
# AVIC_VM_ID_MASK = GENMASK(31 - AVIC_VM_ID_SHIFT, 0).  (Older trees: 8-bit index, 24-bit VM ID.)
AVIC_VCPU_IDX_BITS = 12
AVIC_VCPU_IDX_MASK = (1 << AVIC_VCPU_IDX_BITS) - 1
AVIC_VM_ID_SHIFT = AVIC_VCPU_IDX_BITS
AVIC_VM_ID_MASK = (1 << (32 - AVIC_VM_ID_SHIFT)) - 1


def ga_tag(vm_id: int, vcpu_idx: int, idx_bits: int = AVIC_VCPU_IDX_BITS) -> int:
    """GATag = (vm_id << idx_bits) | vcpu_idx (32 bits)."""
    return (((vm_id & ((1 << (32 - idx_bits)) - 1)) << idx_bits) | (vcpu_idx & ((1 << idx_bits) - 1)))


def ga_tag_vm_id(tag: int, idx_bits: int = AVIC_VCPU_IDX_BITS) -> int:
    return (tag >> idx_bits) & ((1 << (32 - idx_bits)) - 1)


def ga_tag_vcpu_idx(tag: int, idx_bits: int = AVIC_VCPU_IDX_BITS) -> int:
    return tag & ((1 << idx_bits) - 1)


@dataclass(slots=True)
class GuestIrte:
    """An interrupt-remapping table entry (the fields AVIC uses).  ``guest_mode=False`` is legacy
    remapped mode: the IOMMU delivers to the host (``remapped`` callback), not to a vAPIC."""

    backing_hpa: int
    vector: int
    ga_tag: int = 0
    is_run: bool = False
    dest: int = 0  # host physical APIC ID of the core running the vCPU
    ga_log_intr: bool = False
    guest_mode: bool = True


DOORBELL = "doorbell"
GA_LOG = "ga_log"
PENDING = "pending"
REMAPPED = "remapped"


class AmdIommu:
    """The guest-virtual-APIC part of an AMD IOMMU.

    ``doorbell(host_apic_id)``; ``ga_log_interrupt()`` raised after each GA-log append (the host's
    handler reads :attr:`ga_log`); ``irr_set(backing_hpa, vector, ga_tag)`` told after the IRR bit is
    set; ``remapped(irte)`` for a legacy-mode IRTE."""

    def __init__(self, mem: HostMemory, doorbell: Callable[[int], None],
                 ga_log_interrupt: Callable[[], None] | None = None,
                 irr_set: Callable[[int, int, int], None] | None = None,
                 remapped: Callable[[GuestIrte], None] | None = None) -> None:
        self.mem = mem
        self.doorbell = doorbell
        self.ga_log_interrupt = ga_log_interrupt
        self.irr_set = irr_set
        self.remapped = remapped
        self.ga_log: list[int] = []

    def post_steps(self, irte: GuestIrte) -> Generator[int, Any, str]:
        """Posting as a process: IRR set (atomic step, ``yield 0``), then the IRTE read and its action.
        Returns ``"doorbell"``, ``"ga_log"``, ``"pending"`` or ``"remapped"``."""
        if not irte.guest_mode:
            if self.remapped is not None:
                self.remapped(irte)
            return REMAPPED
        v = irte.vector & 0xFF
        self.mem.set_bit(irte.backing_hpa + APIC_IRR + ((v >> 5) << 4), v & 31)
        if self.irr_set is not None:
            self.irr_set(irte.backing_hpa, v, irte.ga_tag)
        yield 0
        if irte.is_run:
            self.doorbell(irte.dest)
            return DOORBELL
        if irte.ga_log_intr:
            self.ga_log.append(irte.ga_tag & 0xFFFFFFFF)
            if self.ga_log_interrupt is not None:
                self.ga_log_interrupt()
            return GA_LOG
        return PENDING

    def post_device_interrupt(self, irte: GuestIrte) -> str:
        """Posting as one atomic action (see :meth:`post_steps`)."""
        gen = self.post_steps(irte)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def drain_ga_log(self) -> list[int]:
        """The host's GA-log handler: take all entries (GATags)."""
        out, self.ga_log = self.ga_log, []
        return out
