"""The interface every nested APIC design implements, with the status-quo defaults."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu
    from navic.hv.nested.core import NestedSvm
    from navic.hw.vmcb import Vmcb

Gen = Generator[Any, Any, Any]

HANDLED = "handled"   # L0 dealt with the L2 exit alone
REFLECT = "reflect"   # nested #VMEXIT to L1 with (code, info1, info2)


def done(value: Any) -> Gen:
    """Steps that take no time and return ``value`` (for a method that returns steps)."""
    return value
    yield  # pragma: no cover


class Design:
    """A nested APIC design: what L1 is offered and how L0 runs L2's APIC."""

    name = "base"
    offers_avic = False     # whether AVIC is in L1's CPUID
    offers_x2avic = False   # whether x2AVIC (and X2AVIC_EXT where the CPU has it) is too

    def __init__(self, core: NestedSvm) -> None:
        self.core = core
        self.kvm = core.kvm
        self.host = core.host

    def prepare_vmcb02(self, vcpu: Vcpu, vmcb12: Vmcb, vmcb02: Vmcb) -> None:
        """AVIC fields of vmcb02 (default: AVIC off for L2)."""
        vmcb02.avic_enable = 0
        vmcb02.x2avic_enable = 0

    def on_avic_exit(self, vcpu: Vcpu, code: int, info1: int, info2: int) -> Gen:
        """An AVIC exit from L2 (no intercept bit exists: L0 decides). Returns (decision, code,
        info1, info2)."""
        return (REFLECT, code, info1, info2)
        yield  # pragma: no cover

    def on_doorbell_write(self, vcpu: Vcpu, value: int) -> Gen:
        """L1 wrote the AVIC doorbell MSR. Returns a Fault or None."""
        from navic.hw.isa import Fault

        return Fault("#GP", "AVIC doorbell MSR: AVIC is not offered to this guest")
        yield  # pragma: no cover

    def on_tracked_write(self, vcpu: Vcpu, gpa: int, size: int, value: int) -> Gen:
        """An L1 store to a frame this design write-protects (shadow only)."""
        return None
        yield  # pragma: no cover

    def vcpu_load(self, vcpu: Vcpu, cpu: int) -> None:
        """L0 loads an L1 vCPU on a pCPU (shadow rewrites entries naming it)."""

    def vcpu_put(self, vcpu: Vcpu, *, blocking: bool) -> None:
        """L0 puts an L1 vCPU."""

    def nested_vmexit(self, vcpu: Vcpu) -> None:
        """Nested #VMEXIT of ``vcpu``, before anything is synced back or L1 runs again (shadow: the
        table's usecount drops; runcache: the L2 vCPU's entry is unpublished)."""
