"""The host machine: physical CPUs with their local APICs on one interrupt bus.

With ``virt = "none"`` this is the whole system: each scenario CPU runs natively on its own
physical CPU and IPIs travel over the APIC bus (destination resolution at send time by the
architectural APIC model, arrival after ``IPI_WIRE`` cycles). It is the baseline every
virtualised latency is compared with.
"""

from __future__ import annotations

import functools

from navic.apic import dest as apic_dest
from navic.apic.icr import Icr
from navic.apic.lapic import ApicHooks, LocalApic
from navic.apic.registers import APIC_DFR, APIC_LDR, APIC_LVTT, APIC_SVR, APIC_TPR
from navic.guest.kernel import GuestCpu
from navic.hw.pcpu import PhysCpu
from navic.sim.cost import CostModel
from navic.sim.engine import Engine, Handle
from navic.sim.record import Recorder
from navic.sim.trace import Trace

DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
KIND_BY_MODE = {DM_FIXED: "fixed", DM_LOWEST: "lowest", DM_SMI: "smi", DM_NMI: "nmi",
                DM_INIT: "init", DM_SIPI: "sipi", DM_EXTINT: "extint"}


class _CpuHooks(ApicHooks):
    """What a bare-metal local APIC is wired to: the bus, its CPU's wake line, the clock."""

    def __init__(self, machine: Machine, cpu_index: int) -> None:
        self.m = machine
        self.i = cpu_index
        self.timer: Handle | None = None
        # The two per-IPI hooks are bound once, so that the APIC reaches the bus and the wake
        # line without a forwarding frame:
        # * send_ipi(apic, icr) is machine.send_ipi(cpu_index, apic, icr);
        # * interrupt_pending(apic) is the CPU's wake.fire(apic), set by Machine.add_cpu (the
        #   woken run_native ignores the value a Signal hands it).
        self.send_ipi = functools.partial(machine.send_ipi, cpu_index)  # type: ignore[method-assign]

    def eoi_level(self, apic: LocalApic, vector: int) -> None:
        self.m.rec.count("level_eois")

    def arm_timer(self, apic: LocalApic, deadline: int | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadline is not None:
            self.timer = self.m.engine.call_at(deadline, self.m.timer_fired, self.i, label="apic-timer")

    def now(self) -> int:
        return self.m.engine.now


class Machine:
    def __init__(self, engine: Engine, costs: CostModel, rec: Recorder, trace: Trace,
                 lowest_priority: str = "vector_hashing") -> None:
        self.engine = engine
        self.costs = costs
        self.rec = rec
        self.trace = trace
        self.lowest_priority = lowest_priority
        self.pcpus: list[PhysCpu] = []
        self.apics: list[LocalApic] = []
        self.guests: list[GuestCpu | None] = []
        self.names: list[str] = []
        self._index: dict[LocalApic, int] = {}   # apic -> its CPU index (apics.index, no scan)

    def add_cpu(self, name: str, apic_id: int, mode: str, bsp: bool) -> PhysCpu:
        i = len(self.pcpus)
        hooks = _CpuHooks(self, i)
        apic = LocalApic(apic_id, hooks=hooks, mode=mode, bsp=bsp,
                         lowest_priority=self.lowest_priority,
                         cycles_per_timer_tick=self.costs.TIMER_TICK)
        os_apic_defaults(apic)
        cpu = PhysCpu(self, i, apic)
        hooks.interrupt_pending = cpu.wake.fire  # type: ignore[method-assign]
        self._index[apic] = i
        self.pcpus.append(cpu)
        self.apics.append(apic)
        self.guests.append(None)
        self.names.append(name)
        return cpu

    def attach(self, cpu: PhysCpu, g: GuestCpu) -> None:
        self.guests[cpu.index] = g
        self.engine.spawn(cpu.run_native(g), g.name)

    # -- the APIC bus ----------------------------------------------------------------------
    def send_ipi(self, src: int, src_apic: LocalApic, icr: Icr) -> None:
        """CPU ``src`` (whose APIC is ``src_apic``) sends ``icr``: resolve the destinations now,
        each one accepts it ``IPI_WIRE`` cycles later."""
        t = self.engine.now
        targets = apic_dest.resolve(self.apics, src_apic, icr)
        self.rec.count("ipis_sent")
        tr = self.trace
        if tr.on:
            tr.emit("navic_ipi_send", pcpu=src, level="L0", vcpu=self.names[src], vector=icr.vector,
                    mode=KIND_BY_MODE.get(icr.delivery_mode, "?"), dest=icr.dest,
                    targets=[self.names[self.apics.index(a)] for a in targets])
        wire = self.costs.IPI_WIRE
        index = self._index
        sender = self.names[src]
        call_later = self.engine.call_later
        for a in targets:
            call_later(wire, self._arrive, index[a], icr, sender, t, label="ipi-arrive")

    def _arrive(self, i: int, icr: Icr, sender: str, t_sent: int) -> None:
        apic = self.apics[i]
        mode = icr.delivery_mode
        ok = apic.accept_irq(mode, icr.vector, icr.trigger, icr.level)
        if self.trace.on:
            self.trace.emit("kvm_apic_accept_irq", pcpu=i, level="L0", vcpu=self.names[i],
                            vec=icr.vector, dm=KIND_BY_MODE.get(mode, "?"), accepted=ok)
        if not ok:
            return
        if mode == DM_NMI:
            self.rec.accepted(self.names[i], 2, "nmi", sender, t_sent)
        elif mode == DM_INIT or mode == DM_SMI:
            self.rec.accepted(self.names[i], 0, KIND_BY_MODE[mode], sender, t_sent)
        elif mode in (DM_FIXED, DM_LOWEST, DM_SIPI):
            self.rec.accepted(self.names[i], icr.vector, KIND_BY_MODE[mode], sender, t_sent)

    def device_interrupt(self, target: str, vector: int) -> None:
        """An MSI from a device: a fixed, edge message to one CPU over the bus."""
        i = self.names.index(target)
        self.rec.count("device_interrupts")
        t = self.engine.now
        self.engine.call_later(self.costs.IPI_WIRE, self._device_arrive, i, vector, t, label="msi")

    def _device_arrive(self, i: int, vector: int, t_sent: int) -> None:
        if self.apics[i].accept_irq(DM_FIXED, vector, 0, 1):
            self.rec.accepted(self.names[i], vector, "device", None, t_sent)

    def timer_fired(self, i: int) -> None:
        apic = self.apics[i]
        lvtt = apic.read_reg(APIC_LVTT)
        apic.timer_expired()
        if not lvtt & (1 << 16) and apic.test_irr(lvtt & 0xFF):
            self.rec.accepted(self.names[i], lvtt & 0xFF, "timer", None, self.engine.now)

    # -- INIT / SIPI (see docs/model.md "INIT and SIPI") ------------------------------------
    def init_cpu(self, cpu: PhysCpu, g: GuestCpu) -> None:
        g.saved_ldr = cpu.apic.read_reg(APIC_LDR)  # type: ignore[attr-defined]
        cpu.apic.init_reset()
        self.rec.discard_pending(g.name)

    def sipi_cpu(self, cpu: PhysCpu, g: GuestCpu) -> None:
        os_apic_defaults(cpu.apic, ldr=getattr(g, "saved_ldr", None))


def os_apic_defaults(apic: LocalApic, ldr: int | None = None) -> None:
    """The APIC as an OS leaves it after boot: enabled (SVR = 0x1FF), TPR = 0, flat DFR."""
    apic.write_reg(APIC_SVR, 0x1FF)
    apic.write_reg(APIC_TPR, 0)
    if apic.mode == "xapic":
        apic.write_reg(APIC_DFR, 0xFFFFFFFF)
        if ldr is not None:
            apic.write_reg(APIC_LDR, ldr)
