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
from dataclasses import dataclass
from typing import Any

from navic.check.state import DERIVED

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


# ---------------------------------------------------------------------------------------------
# Step footprints for ``--reduction dpor`` (docs/verification.md, "Partial-order reduction: DPOR")
# ---------------------------------------------------------------------------------------------
# What a process step writes is observed: the locations (navic.check.state) whose values differ
# before and after it. What it *reads* of other agents cannot be observed that way, so it is
# declared: the code below reads state of agents other than the one running it (the destination
# vCPUs of an IPI, the physical ID table entries of other vCPUs, every vCPU's APIC registers), and
# a step that calls or resumes any of it is an *interaction*: dependent on every other step.
# Each entry is "module:qualname" of a function, a method, or a class (all of its methods), with
# why. A missing entry would make the reduction unsound, so the list errs wide.
INTERACTIONS: tuple[tuple[str, str], ...] = (
    ("navic.apic.dest:match_dest", "reads the target APIC's ID/LDR/DFR/SVR"),
    ("navic.apic.dest:resolve", "reads every APIC's destination registers"),
    ("navic.apic.dest:lowest_priority_candidates", "reads every APIC's TPR/PPR"),
    ("navic.hw.machine:Machine.send_ipi", "bare metal: resolves and delivers to other CPUs"),
    ("navic.hw.avic:AvicEngine.icr_write", "APM 15.29.4: reads other vCPUs' table entries (IsRunning, host ID)"),
    ("navic.hw.vmx:ipiv_icr_write", "SDM 30.1.6: reads the PID table and other vCPUs' PIDs"),
    ("navic.hv.kvm:Kvm.kvm_apic_send_ipi", "kvm_irq_delivery_to_apic over every vCPU"),
    ("navic.hv.kvm:Kvm.kvm_apic_accept_irq", "__apic_accept_irq on another vCPU"),
    ("navic.hv.kvm:Kvm.kvm_vcpu_kick", "reads the target's mode and CPU"),
    ("navic.hv.kvm:Kvm.kvm_vcpu_kick_no_wakeup", "reads the target's mode and CPU"),
    ("navic.hv.kvm:Kvm.kvm_vcpu_wake_up", "reads the target's wait state"),
    ("navic.hv.kvm:Kvm.recalc_apic_map", "reads every vCPU's APIC ID and LDR"),
    ("navic.hv.avic:AvicVm.kick_target_vcpus", "avic_kick_target_vcpus: every vCPU's destination"),
    ("navic.hv.svm:SvmVendor._exit_incomplete_ipi", "avic_incomplete_ipi_interception: targets"),
    ("navic.hv.svm:SvmVendor.complete_interrupt_delivery", "svm_complete_interrupt_delivery: target's mode"),
    ("navic.hv.svm:SvmVendor.recalc_logical_aliasing", "reads every vCPU's LDR/DFR"),
    ("navic.hv.vmx:VmxVendor.pi_wakeup_handler", "walks the wakeup list of other vCPUs"),
    ("navic.hv.hypercall:kvm_pv_send_ipi", "PV IPI: every destination vCPU"),
    ("navic.hv.nested.ipi_emulation:L1TableIpiEmulation", "L0 reads L1's tables and L2 targets"),
    # shadow: syncing reads L1's table and the named L1 vCPUs' run state; the tracked-store
    # emulation reads the usecount (every vCPU's nested state) and writes the shared cache. The
    # nested VMRUN/#VMEXIT (usecount ++/--, derived; the table lookup reads shared state that only
    # listed code writes) and load/put (own entries) are not listed.
    ("navic.hv.nested.shadow:ShadowDesign._sync_entry", "reads L1's entry and the named L1 vCPU"),
    ("navic.hv.nested.shadow:ShadowDesign.invalidate", "rebuilds a shared table"),
    ("navic.hv.nested.shadow:ShadowDesign._l1_store", "an L1 store to a tracked (shared) table"),
    ("navic.hv.nested.shadow:ShadowDesign.on_tracked_write", "avic_physid_shadow_table_track_write"),
    ("navic.hv.nested.shadow:ShadowDesign.emulate_store", "reads the usecount, writes the shared cache"),
    ("navic.hv.nested.shadow:ShadowDesign.on_avic_exit", "L0 emulates an L2 IPI: targets' entries"),
    ("navic.hv.nested.shadow:ShadowDesign._destinations", "L1's tables: other L2 vCPUs"),
    ("navic.hv.nested.shadow:ShadowDesign._logical_destinations", "L1's logical table"),
    ("navic.hv.nested.shadow:ShadowDesign.on_doorbell_write", "a doorbell to another L1 vCPU"),
    ("navic.hv.nested.shadow_x2avic:ShadowX2avicDesign._destinations", "L1's tables: other L2 vCPUs"),
    ("navic.hv.nested.runcache:RunCacheDesign", "run cache: other L2 vCPUs' run state"),
    ("navic.hv.nested.dummy:DummyDesign.on_avic_exit", "dummy: L0 emulates an L2 IPI over L1's table"),
    ("navic.hv.nested.dummy:DummyDesign.emulate_doorbell", "dummy: the target L1 vCPU's run state"),
    ("navic.hv.nested.dummy:DummyDesign._doorbell", "dummy: the target L1 vCPU's pCPU"),
    ("navic.hv.nested.vmx_dummy:VmxDummyDesign", "VMX dummy: emulates L2 IPIv over L1's table"),
)


class Interactions:
    """The :data:`INTERACTIONS` code, resolved: its code objects (a suspended frame running one
    means the step resumed inside it) and, while installed for a run (:meth:`install`), wrappers that note
    each call (a call that runs to its end within one step leaves no frame). A run installs them
    after the system is built, so that they wrap whatever the attributes are then — a mutant's or
    a test's replacement included — and its code counts as interaction code too."""

    def __init__(self) -> None:
        import importlib

        self.targets: list[tuple[Any, str]] = []   # (owner object, attribute)
        codes: set[Any] = set()
        for spec, _why in INTERACTIONS:
            mod_name, qual = spec.split(":")
            obj: Any = importlib.import_module(mod_name)
            parts = qual.split(".")
            for p in parts[:-1]:
                obj = getattr(obj, p)
            x = getattr(obj, parts[-1])
            if isinstance(x, type):
                for name, f in vars(x).items():
                    if callable(f) and hasattr(f, "__code__") and not name.startswith("__"):
                        self.targets.append((x, name))
            else:
                self.targets.append((obj, parts[-1]))
        for o, n in self.targets:
            _add_code(codes, getattr(o, n))
        self.codes: set[Any] = codes
        self.called = False
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, f: Any) -> Any:
        import functools

        @functools.wraps(f)
        def noted(*args: Any, **kw: Any) -> Any:
            self.called = True
            return f(*args, **kw)
        noted._navic_noted = True   # type: ignore[attr-defined]
        return noted

    def install(self) -> None:
        """Wrap the targets as they are now (idempotent while installed)."""
        if self._saved:
            return
        for o, name in self.targets:
            cur = getattr(o, name)
            if getattr(cur, "_navic_noted", False):
                continue
            if name not in vars(o) and isinstance(o, type):
                continue      # inherited, not defined here: wrapped where it is defined
            _add_code(self.codes, cur)
            self._saved.append((o, name, cur))
            setattr(o, name, self._wrap(cur))

    def uninstall(self) -> None:
        for o, name, cur in reversed(self._saved):
            setattr(o, name, cur)
        self._saved = []

    def in_stack(self, pc: Any) -> bool:
        """Does a location value hold a suspended frame of interaction code?"""
        if type(pc) is tuple:
            return any(self.in_stack(x) for x in pc)
        return pc in self.codes if hasattr(pc, "co_code") else False


@dataclass(frozen=True)
class Footprint:
    """What the steps between two decision points did: which agents stepped, which locations they
    wrote, who owned those locations before and after, and whether they interacted."""
    agents: frozenset[str]
    writes: frozenset[str]
    owners: tuple[tuple[str, str | None, str | None], ...]   # (location, owner before, owner after)
    interaction: bool

    @property
    def local(self) -> bool:
        """Wrote only its own agents' locations and ran no interaction code."""
        if self.interaction or not self.agents:
            return False
        return all(a in self.agents and b in self.agents for _loc, a, b in self.owners)


def step_footprint(before: Any, after: Any, agents: frozenset[str], interaction: bool) -> Footprint:
    """The footprint of the steps between two :func:`navic.check.state.locations` snapshots
    (absolute times) by ``agents``."""
    bv, av = before.values, after.values
    writes = frozenset(k for k in bv.keys() | av.keys()
                       if bv.get(k, _GONE) != av.get(k, _GONE)
                       and before.owners.get(k, after.owners.get(k)) != DERIVED)
    owners = tuple((k, before.owners.get(k, after.owners.get(k)), after.owners.get(k, before.owners.get(k)))
                   for k in sorted(writes))
    return Footprint(agents, writes, owners, interaction)


_GONE = object()


def _add_code(codes: set[Any], f: Any) -> None:
    code = getattr(f, "__code__", None)
    if code is not None:
        codes.add(code)
        codes.update(c for c in code.co_consts if hasattr(c, "co_code"))   # closures


def steps_independent(x: Footprint, y: Footprint, owners_at_y: dict[str, str | None],
                      owners_at_x: dict[str, str | None]) -> bool:
    """Two step sequences of different agents commute (up to timing) when both are local and
    neither wrote what the other's agents own at the other's time (an L2 vCPU moved between
    them is then a write the other reads)."""
    if x.agents & y.agents or not x.local or not y.local:
        return False
    for k in x.writes:
        if owners_at_y.get(k) in y.agents or owners_at_y.get(k, "?") is None:
            return False
    for k in y.writes:
        if owners_at_x.get(k) in x.agents or owners_at_x.get(k, "?") is None:
            return False
    return True
