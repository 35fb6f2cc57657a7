"""Design ``none`` — the status quo (digest §6.1).

AVIC is not in L1's CPUID, so L1's KVM runs with APICv DISABLED and emulates L2's local APIC: L2's
APIC MMIO (nested page faults) and x2APIC MSR accesses exit to L0 and are reflected to L1, which
injects interrupts into L2 through vmcb12's EVENTINJ / V_IRQ. vmcb02 never has AVIC enabled.
"""

from __future__ import annotations

from navic.hv.nested.base import Design


class NoneDesign(Design):
    name = "none"
    offers_avic = False
