"""Host-side APIC state setting: KVM_SET_LAPIC (``kvm_apic_set_state``), as a scenario's
``[[set_lapic]]`` does it at a given time (the VMM writes a vCPU's APIC page; KVM then fixes up
what depends on it). Only the registers that are plain state are settable (:data:`SETTABLE`); the
timer (its count is restarted by KVM from the saved TMCCT) is not modelled."""

from __future__ import annotations

from typing import Any

from navic.apic.registers import (
    APIC_DFR,
    APIC_ID,
    APIC_LDR,
    REG_BY_NAME,
    x2apic_ldr,
)
from navic.hv.kvm import REQ_EVENT

# Register names (as in `read`) KVM_SET_LAPIC may set here.
SETTABLE: frozenset[str] = frozenset(
    ("ID", "TPR", "LDR", "DFR", "SVR", "SPIV", "ESR", "ICR", "ICR_LO", "ICR2", "ICR_HI", "LVT_THERMAL",
     "LVT_PERF", "LVT_LINT0", "LVT_LINT1", "LVT_ERROR",
     *(f"{a}{i}" for a in ("ISR", "TMR", "IRR") for i in range(8)))
)


def kvm_apic_set_state(kvm: Any, vcpu: Any, regs: tuple[tuple[str, int], ...]) -> None:
    """KVM_SET_LAPIC on ``vcpu`` with the registers ``regs`` (name, 32-bit value) replaced in the
    state KVM_GET_LAPIC would return. In x2APIC mode the ID is not settable (ignored)."""
    a = vcpu.apic
    x2 = a.mode == "x2apic"
    offs = [(REG_BY_NAME[name.upper()], value & 0xFFFFFFFF) for name, value in regs]
    if x2 and any(off == APIC_ID for off, _ in offs):
        # kvm_apic_state_fixup() without KVM_X2APIC_API_USE_32BIT_IDS: the x2APIC ID is read-only,
        # userspace's value is ignored (with the cap a mismatch would be -EINVAL).
        kvm.rec.count("set_lapic_x2apic_id_ignored")
        offs = [(off, value) for off, value in offs if off != APIC_ID]
    old_ldr, old_dfr = a.regs[APIC_LDR >> 2], a.regs[APIC_DFR >> 2]
    for off, value in offs:   # memcpy(apic->regs, s->regs): no side effects (an ICR is not sent)
        a.regs[off >> 2] = value
    if x2:   # kvm_apic_state_fixup(): the x2APIC LDR is derived from the ID
        a.regs[APIC_LDR >> 2] = x2apic_ldr(a.regs[APIC_ID >> 2])
    a.update_ppr()                       # apic_update_ppr()
    vendor = kvm.vendor
    avic = getattr(vendor, "avic", None)
    if avic is not None and a.regs[APIC_LDR >> 2] != old_ldr:
        avic.handle_ldr_update(vcpu)
    if avic is not None and a.regs[APIC_DFR >> 2] != old_dfr:
        avic.handle_dfr_update(vcpu)
    kvm.recalc_apic_map()                # kvm_recalculate_apic_map(): also the APIC_ID_MODIFIED inhibit
    kvm.rec.count("set_lapic")
    vcpu.requests.add(REQ_EVENT)         # kvm_make_request(KVM_REQ_EVENT)
    kvm.kvm_vcpu_kick(vcpu)
