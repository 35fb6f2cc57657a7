"""The explorer's independence relation: a conservative *footprint* per kind of pending event.

Two candidate events of a window (:mod:`navic.sim.engine`) are **independent** when their declared
footprints are disjoint and neither is :data:`EVERYTHING`. A footprint names the shared state a
step of that kind may read or write — a physical CPU's latches and wake signal, a scheduler, a
vCPU's halt-poll signal. Footprints are declared below as data (:data:`FOOTPRINTS`), keyed by the
callback's function, next to the reason; anything not listed — every process step (a vCPU thread
is a whole pCPU stack: L0 KVM, L1 KVM, the guest; its next step may send an IPI, i.e. write
another vCPU's IRR and read the AVIC tables) and every callback nobody has audited — is
:data:`EVERYTHING`, dependent on all. Conservative means sound: a missing entry costs reductions,
never schedules. Recorder counters (``rec.count``) are increments, which commute, and are not part
of any footprint. What a step schedules (a woken process, a re-armed timer) goes on the event
queue; the order of simultaneous events two independent steps schedule is the caveat discussed in
docs/verification.md ("Partial-order reduction: sleep sets").

Used by :class:`navic.check.explore.ExploreChooser` with ``reduction="sleep"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EVERYTHING: frozenset[str] = frozenset({"*"})


def _doorbell(h: Any) -> frozenset[str]:
    # Host._doorbell_arrive(host_apic_id): the target pCPU's doorbell_pending and wake signal
    # (APM 15.29.9.1, the AVIC doorbell); by_apic_id is fixed at build time. An ignored
    # doorbell (target not in guest mode) touches the same pCPU's guest_mode only.
    p = h.fn.__self__.by_apic_id.get(h.args[0] & 0xFFF)
    return frozenset({f"l0.pcpu:{p.index}" if p is not None else "l0.pcpu:none"})


def _host_ipi(h: Any) -> frozenset[str]:
    # Host._host_ipi_arrive(cpu, kind): a posted-interrupt notification or a reschedule/kick IPI
    # latches pi_pending / intr_pending on pCPU ``cpu`` and fires its wake signal. The
    # pi_wakeup kind runs KVM's pi_wakeup_handler (walks the wakeup list, wakes vCPUs): audited
    # as EVERYTHING.
    cpu, kind = h.args[0], h.args[1]
    return EVERYTHING if kind == "pi_wakeup" else frozenset({f"l0.pcpu:{cpu}"})


def _sched_tick(h: Any) -> frozenset[str]:
    # HostScheduler._slice_end(p): reads/writes the scheduler's per-pCPU slice state and run
    # queue, sets the current thread's need_resched and raises a host timer interrupt on pCPU p
    # (Host._slice_end -> host_interrupt). The whole scheduler is one location (conservative).
    # An L1 scheduler's tick (L1Host._slice_end) injects LOCAL_TIMER_VECTOR through L0's
    # kvm_apic_accept_irq: EVERYTHING.
    owner = getattr(h.fn.__self__.on_slice_end, "__self__", None)
    if type(owner).__name__ != "Host":
        return EVERYTHING
    p = h.args[0]
    return frozenset({"l0.sched", f"l0.pcpu:{p}"})


def _poll_end(h: Any) -> frozenset[str]:
    # Signal.fire of a vCPU's halt-poll signal (Kvm.kvm_vcpu_halt's poll window ends): the signal
    # and the threads waiting on it.
    return frozenset({f"signal:{h.fn.__self__.name or id(h.fn.__self__)}"})


# Callback function (its __qualname__) -> footprint of that event. Everything else: EVERYTHING.
FOOTPRINTS: dict[str, Callable[[Any], frozenset[str]]] = {
    "Host._doorbell_arrive": _doorbell,
    "Host._host_ipi_arrive": _host_ipi,
    "HostScheduler._slice_end": _sched_tick,
    "Signal.fire": _poll_end,
}


def footprint(target: Any) -> frozenset[str]:
    """The declared footprint of a pending event's target (a :class:`navic.sim.engine.Handle` or a
    process): :data:`FOOTPRINTS` for an audited callback, :data:`EVERYTHING` otherwise."""
    fn = getattr(target, "fn", None)
    if fn is None:                      # a process step (vCPU thread, native CPU)
        return EVERYTHING
    f = FOOTPRINTS.get(getattr(fn, "__qualname__", ""))
    if f is None:
        return EVERYTHING
    try:
        return f(target)
    except (AttributeError, IndexError, TypeError):   # not the shape audited: be conservative
        return EVERYTHING


def independent(a: frozenset[str], b: frozenset[str]) -> bool:
    """Disjoint footprints, neither of them EVERYTHING."""
    return a is not EVERYTHING and b is not EVERYTHING and "*" not in a and "*" not in b and not (a & b)
