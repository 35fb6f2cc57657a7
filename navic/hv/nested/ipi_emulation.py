"""The vendor-neutral core of design ``dummy`` (Sean Christopherson's intermediate step, digest §6.3),
shared by SVM/AVIC (:mod:`.dummy`) and VMX/IPIv (:mod:`.vmx_dummy`) — the sharing the thread
asked for ("any solution should be at least partly shareable with VMX IPI virtualisation").

Both vendors run L2 on a table L0 owns that never accelerates a cross-vCPU IPI (AVIC: a dummy
physical ID table, every entry Valid + IsRunning = 0; IPIv: an empty PID-pointer table), so every
non-self L2 IPI exits to L0. What L0 then does is the same for both, and lives here:

1. count the emulation and charge its cost (``nested_ipi_emulations``, ``NESTED_IPI_EMULATE``);
2. re-run the *hardware's own* IPI algorithm (the silicon's code: :class:`navic.hw.avic.AvicEngine`
   or :func:`navic.hw.vmx.ipiv_icr_write`) in software over **L1's** table, read from L1 guest
   memory at exit time — destination resolution against what L1 wrote, no shadow, no tracking;
3. deliver into the *real* receive structure L1's entry names (AVIC: IRR in the L2 backing page;
   IPIv: PIR + ON in the L2 PID) with the provenance of the L2 sender (:meth:`delivered`);
4. notify the L1 vCPU that L1's entry names (:meth:`notify_l1_vcpu`): it runs that L2 vCPU in
   guest mode → a real notification to its pCPU (AVIC doorbell / posted-interrupt notification:
   the L2 vCPU takes the interrupt without any exit); it is in L2 but out of guest mode → wake it
   (its next entry evaluates); it does not run that L2 vCPU → what the hardware would have done
   to L1 (AVIC: nothing, L1 evaluates IRR at its next VMRUN; IPIv: the notification vector NV
   becomes an interrupt for the L1 vCPU, e.g. L1 KVM's wake-up vector);
5. reflect to L1 exactly what real hardware with L1's table would have shown it (the algorithm's
   failure result: AVIC ID 1/2/3, IPIv's APIC-write exit), else the exit was L0's alone.

Only the algorithm (step 2) and the kind of notification (step 4) are vendor specific.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from navic.hv.kvm import IN_GUEST_MODE
from navic.hv.nested.base import HANDLED, REFLECT, Gen

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu

# algorithm(l2, deliver, notify) -> the steps of the vendor's IPI algorithm (a generator), returning
# None (all delivered) or the vendor's failure, which ``exit_of`` turns into (code, info1, info2) to
# reflect; deliver(receive_gpa, vector, *ignored); notify(*vendor_args).
Algorithm = Callable[[Any, Callable[..., None], Callable[..., None]], Gen]


class L1TableIpiEmulation:
    """Design ``dummy``'s IPI emulation against L1's own table, for one nested core (SVM or VMX)."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.kvm = core.kvm

    def emulate(self, vcpu: Vcpu, exit_: tuple[int, int, int], algorithm: Algorithm,
                notify: Callable[..., None], exit_of: Callable[[Any], tuple[int, int, int]]) -> Gen:
        """Steps 1-5 for the L2 IPI that made L1 vCPU ``vcpu`` (running L2) exit with ``exit_``
        (code, info1, info2). Returns (HANDLED | REFLECT, code, info1, info2)."""
        kvm = self.kvm
        kvm.rec.count("nested_ipi_emulations")
        yield kvm.costs.NESTED_IPI_EMULATE
        l2 = vcpu.nested.l2
        # partial(): the callbacks are the methods themselves (no Python frame around them).
        res = yield from algorithm(l2, partial(self.delivered, l2), partial(notify, vcpu))
        if res is None:
            return (HANDLED, *exit_)
        return (REFLECT, *exit_of(res))

    def delivered(self, sender: Vcpu, receive_gpa: int, vector: int, *_: Any) -> None:
        """Step 3's provenance: the L2 vCPU that owns the backing page / PID at ``receive_gpa`` (an
        L1 GPA) accepted ``vector`` from ``sender``; a halt-polling L1 thread re-checks."""
        self.core.l1host.on_hw_irr_set(receive_gpa, vector, sender.name, sender.guest.ipi_sent_at)

    def notify_l1_vcpu(self, src: Vcpu, l1_apic_id: int, *, runs: Callable[[Any], bool] | None,
                       signal: Callable[[Vcpu], None], otherwise: Callable[[Vcpu], None]) -> None:
        """Step 4: the L1 vCPU with APIC ID ``l1_apic_id``. ``runs(nested_state)`` says whether it
        runs the L2 vCPU the notification is for (None: any L2 vCPU it runs); ``signal(target)``
        sends the real notification to its pCPU; ``otherwise(target)`` is what the hardware does
        when it does not run it."""
        kvm = self.kvm
        target = kvm.vcpu_by_id.get(l1_apic_id)
        if target is None:
            return
        st = getattr(target, "nested", None)
        if st is None or not st.active or (runs is not None and not runs(st)):
            otherwise(target)
            return
        if target.mode == IN_GUEST_MODE and target.cpu is not None:
            signal(target)
        else:
            kvm.kvm_vcpu_wake_up(target)


__all__ = ["HANDLED", "REFLECT", "L1TableIpiEmulation"]
