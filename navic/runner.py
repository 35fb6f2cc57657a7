"""Build the system a scenario describes, run it, and produce the JSON-ready result.

``run_scenario(scn)`` is the one entry point behind ``navic run``; the result's keys are the
public contract documented in docs/scenarios.md.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from navic.apic.lapic import LocalApic
from navic.apic.registers import (
    APIC_DFR,
    APIC_ESR,
    APIC_IRR,
    APIC_ISR,
    APIC_LDR,
    APIC_PPR,
    APIC_SVR,
    APIC_TMR,
    APIC_TPR,
)
from navic.check import oracle, provenance
from navic.config import Scenario
from navic.guest.kernel import GuestCpu, SharedMemory
from navic.hw.device import Device
from navic.hw.machine import Machine
from navic.sim.chooser import Chooser, ReplayChooser
from navic.sim.cost import CostModel, load_costs
from navic.sim.engine import Engine
from navic.sim.record import Recorder
from navic.sim.trace import Trace


class UnsupportedScenario(Exception):
    """The scenario is valid but asks for something this version cannot run yet."""


@dataclass(frozen=True)
class Limits:
    """Bounds of one run besides the scenario's ``max_time_us`` (docs/scenarios.md, "Limits"):
    ``max_events`` engine events (``navic run --max-events``) and ``timeout_s`` seconds of wall
    time (``--timeout``). A run that hits one stops there; its result is partial and says so in
    ``stopped_by``."""

    max_events: int | None = None
    timeout_s: float | None = None


class _WallClock:
    """``--timeout``: a timer thread that stops the engine (``Engine.stop``) when the wall time is
    up; the event loop checks the flag before every event."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.fired = False
        self.engine: Engine | None = None
        self._timer: threading.Timer | None = None
        if seconds is not None:
            self._timer = threading.Timer(seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        if self.engine is not None:
            self.engine.stop()

    def watch(self, engine: Engine) -> None:
        self.engine = engine
        if self.fired:
            engine.stop()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def build_kvm(scn: Scenario, engine: Engine, costs: CostModel, rec: Recorder, tr: Trace,
              guest: Any) -> Any:
    """L0 = KVM on the silicon: host, SVM/AVIC (or VMX) hardware, one VM with its vCPU threads."""
    from navic.hv.host import Host
    from navic.hv.kvm import Kvm
    from navic.hv.svm import SvmVendor
    from navic.hw.avic import AvicEngine
    from navic.hw.errata import Erratum1235
    from navic.hw.features import features_for
    from navic.hw.svm import Svm

    features = features_for(scn.host.cpu)
    if features.vendor != "amd":
        from navic.hv.vmx import build_kvm_vmx

        return build_kvm_vmx(scn, engine, costs, rec, tr, guest)
    host = Host(scn, engine, costs, rec, tr)
    errata = SvmVendor._errata(scn.l0, features)
    erratum = None
    if "1235" in errata:
        erratum = Erratum1235(engine, host.mem, window=scn.l0.erratum_1235_window, p=scn.l0.erratum_1235_p)
    avic_hw = AvicEngine(host.mem, features, doorbell=host.doorbell, erratum=erratum)
    host.silicon = Svm(host, features, avic_hw)
    kvm = Kvm(host)
    kvm.vendor = SvmVendor(kvm, host, host.silicon, features)
    if erratum is not None:
        erratum.track_table(kvm.vendor.avic.physical_table_hpa, kvm.vendor.avic.physical_table_pages)
    kvm.create_vcpus(scn.l1, guest)
    for v in kvm.vcpus:
        engine.spawn(kvm.vcpu_thread(v), v.name)
    return kvm


@dataclass
class Run:
    """Everything a finished run produced (the JSON result plus live objects for tools)."""

    scenario: Scenario
    engine: Engine
    costs: CostModel
    recorder: Recorder
    trace: Trace
    machine: Machine
    guests: list[GuestCpu] = field(default_factory=list)
    kvm: Any = None
    kvm2: Any = None     # L1's KVM (nested scenarios)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: dict[str, Any] | None = None   # a limit cut the run (Limits): what and where

    def result(self) -> dict[str, Any]:
        return build_result(self)


@contextlib.contextmanager
def _collector_paused() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector, out of the way of a run: paused while the model is built
    (a 4096-vCPU VM is millions of long-lived objects, each allocation burst would trigger full
    scans of them), then on again with everything built so far frozen (not re-scanned by later
    collections) until the run is over. Results do not depend on it; wall time does (a
    4096-vCPU shootdown: about a quarter less)."""
    was_on = gc.isenabled()
    thresholds = gc.get_threshold()
    gc.disable()
    frozen = False
    try:
        def start_run() -> None:
            nonlocal frozen
            gc.freeze()
            frozen = True
            gc.set_threshold(50_000, 20, 100)
            if was_on:
                gc.enable()
        yield start_run
    finally:
        gc.set_threshold(*thresholds)
        if frozen:
            gc.unfreeze()
        if was_on:
            gc.enable()


def _refuse_unrun_nested_parts(scn: Scenario) -> None:
    """With [l2], L1's vCPUs run L1's KVM, and devices are attached only to non-nested VMs: an
    l1 program (or an l1 workload) or a [[device]] would silently not run, so refuse it."""
    for p in scn.programs:
        if p.level == 1:
            raise UnsupportedScenario(f"{scn.source}: {p.cpu}: a program on an L1 vCPU in a nested scenario "
                                      "(with [l2], L1's vCPUs run L1's KVM; give programs to l2.N CPUs)")
    if scn.devices:
        raise UnsupportedScenario(f"{scn.source}: device: devices in a nested scenario (only a VM without "
                                  "[l2] has device interrupts)")


def simulate(scn: Scenario, *, chooser: Chooser | None = None, trace: bool = False,
             schedule: list[tuple[str, str, int]] | None = None, limits: Limits | None = None) -> Run:
    limits = limits or Limits()
    clock = _WallClock(limits.timeout_s)
    try:
        with _collector_paused() as start_run:
            return _simulate(scn, chooser, trace, schedule, start_run, limits, clock)
    finally:
        clock.cancel()


def _simulate(scn: Scenario, chooser: Chooser | None, trace: bool,
              schedule: list[tuple[str, str, int]] | None, start_run: Callable[[], None],
              limits: Limits = Limits(), clock: _WallClock | None = None) -> Run:
    if scn.l2 is not None and scn.host.virt != "kvm":
        raise UnsupportedScenario(f'{scn.source}: l2: a nested guest needs host.virt = "kvm"')
    if scn.l2 is not None:
        _refuse_unrun_nested_parts(scn)
    if schedule is not None:
        chooser = ReplayChooser(schedule)
    engine = Engine(seed=scn.seed, chooser=chooser)
    if clock is not None:
        clock.watch(engine)
    costs = load_costs(scn.host.cpu)
    rec = Recorder(engine)
    tr = Trace(on=trace, clock=engine)
    machine = Machine(engine, costs, rec, tr)
    run = Run(scn, engine, costs, rec, tr, machine)

    programs = {p.cpu: p for p in scn.programs}
    vm = scn.l1

    def on_delivery(g: GuestCpu, vector: int, kind: str) -> None:
        rec.delivered(g.name, vector, kind)
        if tr.on:
            tr.emit("navic_handler_entry", pcpu=None, level="L1", vcpu=g.name, vec=vector, kind=kind)

    def on_error(g: GuestCpu, index: int | None, op: str, err: str) -> None:
        rec.error(g.name, index, op, err)

    shared = SharedMemory()

    def guest(i: int, level: int = 1) -> GuestCpu:
        name = f"l{level}.{i}"
        cfg = vm if level == 1 else scn.l2
        g = GuestCpu(name, programs.get(name), x2apic=(cfg.apic == "x2apic"),
                     apic_id_of=cfg.apic_id, on_delivery=on_delivery, on_error=on_error)
        g.clock = engine
        shared.join(g)
        run.guests.append(g)
        return g

    if scn.l2 is not None:
        from navic.hv.nested.build import build_nested

        run.kvm, run.kvm2 = build_nested(scn, engine, costs, rec, tr, lambda i: guest(i, 2), UnsupportedScenario)
    elif scn.host.virt == "kvm":
        run.kvm = build_kvm(scn, engine, costs, rec, tr, guest)
        if scn.devices:
            from navic.hv.iommu import attach_devices

            attach_devices(run.kvm.host, run.kvm, scn.devices, costs.ghz)
    else:
        cpus = [machine.add_cpu(f"l1.{i}", vm.apic_id(i), vm.apic, bsp=(i == 0)) for i in range(vm.vcpus)]
        for i, cpu in enumerate(cpus):
            g = guest(i)
            g.poll_wake = cpu.wake.fire
            machine.attach(cpu, g)
        for i, dcfg in enumerate(scn.devices):
            Device(engine, dcfg, costs.ghz, i, lambda d: machine.device_interrupt(d.cfg.target, d.cfg.vector))

    if run.kvm is not None:
        for reason in scn.l0.inhibits:   # forced by the scenario (causes navic does not model)
            run.kvm.set_apicv_inhibit(reason)
    if scn.set_lapic:
        _schedule_set_lapic(run, scn, costs.ghz)
    # (max_time_us may be any finite number; beyond 2^62 cycles, about 48 years, is "no limit")
    until = int(min(scn.max_time_us * costs.ghz * 1000, 2.0**62))
    sends = provenance.track(run)   # send-time destinations for the provenance checks
    getattr(engine.chooser, "attach", lambda _run: None)(run)   # explorer: state hashing
    start_run()
    engine.run(until=until, max_steps=limits.max_events)
    if engine.budget_hit or (clock is not None and clock.fired and engine.stopped):
        run.stopped_by = _stopped_by(scn, engine, limits, costs.ghz)
    quiescent = not engine._q and engine.now < until and run.stopped_by is None
    rec.violations.extend(oracle.end_of_run(run, quiescent=quiescent))
    notes = getattr(getattr(run.kvm, "vendor", None), "notes", ())   # e.g. a pre-8de4a1c8164e kernel
    run.warnings = [{"kind": "config", "detail": n} for n in notes] + oracle.stalls(run, quiescent=quiescent)
    rec.violations.extend(sends.check())
    if isinstance(engine.chooser, ReplayChooser):
        run.replayed = engine.chooser.log  # type: ignore[attr-defined]
    return run


def _schedule_set_lapic(run: Run, scn: Scenario, ghz: float) -> None:
    """``[[set_lapic]]``: the host's KVM_SET_LAPIC calls, at their times (navic.hv.lapic_state)."""
    from navic.hv.lapic_state import kvm_apic_set_state

    for cfg in scn.set_lapic:
        kvm = run.kvm if cfg.cpu.startswith("l1.") else getattr(run, "kvm2", None)
        vcpu = next(v for v in kvm.vcpus if v.name == cfg.cpu)
        if cfg.at_us == 0:   # before the vCPUs first run
            kvm_apic_set_state(kvm, vcpu, cfg.regs)
        else:
            run.engine.call_at(int(cfg.at_us * ghz * 1000), kvm_apic_set_state, kvm, vcpu, cfg.regs,
                               label="set_lapic")


def _stopped_by(scn: Scenario, engine: Engine, limits: Limits, ghz: float) -> dict[str, Any]:
    at = f"at {engine.now / (ghz * 1000):.3f} us of simulated time after {engine.steps} events"
    if engine.budget_hit:
        limit, what = "max_events", f"the event budget (--max-events {limits.max_events})"
    else:
        limit, what = "timeout", f"the wall-time limit (--timeout {limits.timeout_s:g} s)"
    return {"limit": limit, "sim_time_cycles": engine.now, "events": engine.steps,
            "message": f"{scn.source}: stopped by {what} {at}; the results are partial"}


def run_scenario(scn: Scenario, *, schedule: list[tuple[str, str, int]] | None = None,
                 trace: bool = False) -> dict[str, Any]:
    return simulate(scn, schedule=schedule, trace=trace).result()


def _words(apic: LocalApic, base: int) -> list[int]:
    r = apic.regs
    return [r[(base + 0x10 * i) >> 2] for i in range(8)]


def apic_dump(apic: LocalApic) -> dict[str, Any]:
    r = apic.regs
    return {
        "id": apic.apic_id,
        "ldr": r[APIC_LDR >> 2],
        "dfr": r[APIC_DFR >> 2],
        "tpr": r[APIC_TPR >> 2],
        "ppr": r[APIC_PPR >> 2],
        "svr": r[APIC_SVR >> 2],
        "esr": r[APIC_ESR >> 2],
        "isr": _words(apic, APIC_ISR),
        "irr": _words(apic, APIC_IRR),
        "tmr": _words(apic, APIC_TMR),
        "mode": apic.mode,
    }


def build_result(run: Run) -> dict[str, Any]:
    rec = run.recorder
    ghz = run.costs.ghz
    deliveries = []
    for d in rec.deliveries:
        d = dict(d)
        d["latency_ns"] = None if d["latency"] is None else round(d["latency"] / ghz, 3)
        deliveries.append(d)
    counters = dict(sorted(rec.counters.items()))
    counters["deliveries"] = len(rec.deliveries)
    lat = [d["latency"] for d in rec.deliveries if d["latency"] is not None]
    if lat:
        lat.sort()
        counters["latency_p50_cycles"] = lat[len(lat) // 2]
        counters["latency_max_cycles"] = lat[-1]
    return {
        "scenario": run.scenario.name,
        "seed": run.scenario.seed,
        "sim_time_cycles": run.engine.now,
        "cpu_model": run.scenario.host.cpu,
        "virt": run.scenario.host.virt,
        "deliveries": deliveries,
        "apic": _apics(run),
        "reads": {g.name: dict(sorted(g.reads.items())) for g in run.guests if g.reads},
        "errors": rec.errors,
        "exits": {k: dict(sorted(v.items())) for k, v in sorted(rec.exits.items())},
        "counters": counters,
        "violations": rec.violations,
        "warnings": run.warnings,
        "inhibits": run.kvm.inhibits.report() if run.kvm is not None else {},
        # Only when a limit (Limits) cut the run, so that complete runs' JSON is unchanged.
        **({"stopped_by": run.stopped_by} if run.stopped_by is not None else {}),
    }


def _apics(run: Run) -> dict[str, Any]:
    if run.kvm is not None:
        out = {v.name: apic_dump(v.apic) for v in run.kvm.vcpus}
        if run.kvm2 is not None:
            out.update({v.name: apic_dump(v.apic) for v in run.kvm2.vcpus})
        return out
    return {name: apic_dump(a) for name, a in zip(run.machine.names, run.machine.apics, strict=True)}
