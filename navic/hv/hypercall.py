"""KVM's hypercalls (arch/x86/kvm/x86.c ``kvm_emulate_hypercall``): the guest executed VMMCALL /
VMCALL with RAX = the hypercall number. Only KVM_HC_SEND_IPI is modelled (the PV send-IPI that
Linux's ``kvm_send_ipi_mask`` uses when KVM_FEATURE_PV_SEND_IPI is offered); other numbers return
-KVM_ENOSYS, as KVM does for calls it does not know."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from navic.apic.icr import Icr
from navic.hw import isa

KVM_HC_SEND_IPI = 10
KVM_ENOSYS = 1000
KVM_EINVAL = 22
_U64 = (1 << 64) - 1
APIC_DEST_MASK = 1 << 11          # ICR destination mode (logical)
APIC_SHORT_MASK = 3 << 18         # ICR destination shorthand


def _ret(code: int) -> int:
    """A hypercall's RAX: negative error codes as unsigned 64-bit values."""
    return code & _U64


def kvm_emulate_hypercall(kvm: Any, vcpu: Any, insn: isa.Hypercall) -> Generator[Any, Any, int]:
    """The steps of one hypercall; returns the value for RAX."""
    yield kvm.costs.MSR_EMULATE    # the exit's decode and dispatch (assumption: an MSR-emulation's cost)
    kvm.rec.count("hypercalls")
    if insn.nr != KVM_HC_SEND_IPI:
        return _ret(-KVM_ENOSYS)
    return (yield from kvm_pv_send_ipi(kvm, vcpu, insn.a0, insn.a1, insn.a2, insn.a3))


def pv_ipi_ids(bitmap_low: int, bitmap_high: int, min_id: int) -> set[int]:
    """The APIC IDs a KVM_HC_SEND_IPI bitmap pair names (64-bit op: 64 IDs per bitmap)."""
    ids = set()
    for base, bitmap in ((min_id, bitmap_low & _U64), (min_id + 64, bitmap_high & _U64)):
        i = 0
        while bitmap:
            if bitmap & 1:
                ids.add(base + i)
            bitmap >>= 1
            i += 1
    return ids


def kvm_pv_send_ipi(kvm: Any, src: Any, bitmap_low: int, bitmap_high: int, min_id: int,
                    icr: int) -> Generator[Any, Any, int]:
    """kvm_pv_send_ipi(): bit i of the 64-bit ``bitmap_low`` is APIC ID ``min_id + i``, bit i of
    ``bitmap_high`` APIC ID ``min_id + 64 + i``; ``icr`` gives vector, delivery mode, level and
    trigger (destination mode and shorthand must be 0, else -KVM_EINVAL). Each APIC ID that maps
    to a vCPU gets the interrupt (``__pv_send_ipi`` through the APIC map); returns how many did."""
    if icr & (APIC_DEST_MASK | APIC_SHORT_MASK):
        return _ret(-KVM_EINVAL)
    lo = icr & 0xFFFFFFFF
    count = 0
    present = {v.apic.apic_id for v in kvm.vcpus}
    x2 = src.apic.mode == "x2apic"
    for dest in sorted(pv_ipi_ids(bitmap_low, bitmap_high, min_id) & present):
        yield from kvm.kvm_apic_send_ipi(src, Icr.decode(lo, dest if x2 else dest << 24, x2))
        count += 1
    return count
