"""APICv inhibit reasons (KVM's ``enum kvm_apicv_inhibit``) and their bookkeeping.

APICv/AVIC is active for a vCPU iff no VM-wide inhibit is set and the vCPU has no per-vCPU
inhibit (``NESTED``: it is running L2). Each raise/clear is recorded as a [start, end) cycle
range per reason, reported in the run result under ``inhibits``.
"""

from __future__ import annotations

from typing import Any

# Names as KVM's enum spells them (without the APICV_INHIBIT_REASON_ prefix).
REASONS = (
    "DISABLED", "HYPERV", "ABSENT", "BLOCKIRQ", "PHYSICAL_ID_ALIASED", "APIC_ID_MODIFIED",
    "APIC_BASE_MODIFIED", "NESTED", "IRQWIN", "PIT_REINJ", "SEV", "LOGICAL_ID_ALIASED",
    "PHYSICAL_ID_TOO_BIG",
)
# APIC_BASE_MODIFIED is never cleared by KVM. APIC_ID_MODIFIED is not sticky: kvm_recalculate_apic_map()
# sets or clears it on every recalculation ("KVM: x86: Allow APICv APIC ID inhibit to be cleared", 2023).
STICKY = frozenset({"APIC_BASE_MODIFIED"})


class Inhibits:
    """VM-wide inhibit set with history. Per-vCPU reasons are kept by the vCPU (``NESTED``)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.active: dict[str, int] = {}          # reason -> start cycle
        self.history: dict[str, list[list[int | None]]] = {}

    def __bool__(self) -> bool:
        return bool(self.active)

    def set(self, reason: str) -> bool:
        """Raise ``reason``; returns True if the VM-wide state changed (nothing was set before)."""
        assert reason in REASONS, reason
        if reason in self.active:
            return False
        was_clear = not self.active
        self.active[reason] = self.clock.now
        self.history.setdefault(reason, []).append([self.clock.now, None])
        return was_clear

    def clear(self, reason: str) -> bool:
        """Clear ``reason`` (sticky reasons stay); returns True if the VM became uninhibited."""
        if reason not in self.active or reason in STICKY:
            return False
        del self.active[reason]
        self.history[reason][-1][1] = self.clock.now
        return not self.active

    def set_vcpu(self, reason: str, vcpu: str) -> None:
        """A per-vCPU inhibit (NESTED: the vCPU runs L2). Reported as "REASON:vcpu"."""
        key = f"{reason}:{vcpu}"
        ranges = self.history.setdefault(key, [])
        if not ranges or ranges[-1][1] is not None:
            ranges.append([self.clock.now, None])

    def clear_vcpu(self, reason: str, vcpu: str) -> None:
        ranges = self.history.get(f"{reason}:{vcpu}")
        if ranges and ranges[-1][1] is None:
            ranges[-1][1] = self.clock.now

    def report(self) -> dict[str, list[list[int | None]]]:
        return {r: [list(x) for x in ranges] for r, ranges in sorted(self.history.items())}
