"""The host as L0 sees it: physical CPUs, host memory, the host scheduler, host IPIs, doorbells.

Host IPIs (KVM's reschedule IPI used by ``kvm_vcpu_kick``, VMX posted-interrupt notification and
wake-up vectors) and AVIC doorbells travel for ``HOST_IPI_WIRE`` / ``DOORBELL_WIRE`` cycles. On
arrival, a pCPU in guest mode either handles the signal in hardware (doorbell: re-evaluate the
running vCPU's backing-page IRR; posted-interrupt vector: PIR → vIRR) or takes #VMEXIT(INTR);
a pCPU in host mode handles host interrupts in software and ignores doorbells (digest §4.4: the
APM does not say; KVM treats them as harmless — docs/model.md).
"""

from __future__ import annotations

from typing import Any

from navic.apic.lapic import LocalApic
from navic.config import L0Config, Scenario
from navic.hv.sched import HostScheduler
from navic.hw.memory import HostMemory
from navic.sim.cost import CostModel
from navic.sim.engine import Engine
from navic.sim.record import Recorder
from navic.sim.trace import Trace


class HostCpu:
    """A physical CPU under a hypervisor: host or guest mode, and what is pending at it."""

    def __init__(self, host: Host, index: int) -> None:
        self.host = host
        self.index = index
        self.apic = LocalApic(index, mode="x2apic")   # host APIC ID = index
        self.apic_id = index
        self.wake = host.engine.signal(f"pcpu{index}.wake")
        self.guest_mode = False
        self.running: Any = None          # the VMCB context running in guest mode
        self.doorbell_pending = False
        self.intr_pending = False         # a host interrupt that forces #VMEXIT(INTR)
        self.pi_pending = False           # VMX posted-interrupt notification to process

    def __repr__(self) -> str:
        return f"<HostCpu {self.index}{' guest' if self.guest_mode else ''}>"


class Host:
    def __init__(self, scn: Scenario, engine: Engine, costs: CostModel, rec: Recorder,
                 trace: Trace) -> None:
        self.scn = scn
        self.engine = engine
        self.costs = costs
        self.rec = rec
        self.trace = trace
        self.l0: L0Config = scn.l0
        self.mem = HostMemory()
        self.pcpus = [HostCpu(self, i) for i in range(scn.host.pcpus)]
        self.by_apic_id = {c.apic_id: c for c in self.pcpus}
        slice_cycles = int(scn.l0.timeslice_us * costs.ghz * 1000)
        self.sched = HostScheduler(engine, len(self.pcpus), slice_cycles, costs.CONTEXT_SWITCH,
                                   on_slice_end=self._slice_end)
        self.pi_wakeup_handler: Any = None   # set by VMX code: pCPU -> wake blocked vCPUs
        self.backing_owner: dict[int, Any] = {}   # backing-page HPA -> the vCPU it belongs to
        self.silicon: Any = None

    def on_hw_irr_set(self, backing_hpa: int, vector: int, sender: str, t_sent: int | None = None) -> None:
        """The silicon (AVIC IPI path, IOMMU) set an IRR bit in a backing page: provenance for the
        run record, and a wake for a halt-polling thread spinning on that vCPU's events."""
        owner = self.backing_owner.get(backing_hpa)
        if owner is None:
            return
        self.rec.accepted(owner.name, vector, "fixed", sender, self.engine.now if t_sent is None else t_sent)
        owner.poll.fire()

    # -- host IPIs --------------------------------------------------------------------------
    def send_host_ipi(self, cpu: int, kind: str, src: int | None = None) -> None:
        self.rec.count("host_ipis")
        if self.trace.on:
            self.trace.emit("navic_host_ipi", pcpu=src, level="L0", kind=kind, dest=cpu)
        self.engine.call_later(self.costs.HOST_IPI_WIRE, self._host_ipi_arrive, cpu, kind, label="host-ipi")

    def _host_ipi_arrive(self, cpu: int, kind: str) -> None:
        p = self.pcpus[cpu]
        if kind == "posted_intr":
            if p.guest_mode:
                p.pi_pending = True
                p.wake.fire()
            return
        if kind == "pi_wakeup" and self.pi_wakeup_handler is not None:
            # Handled by the host's IRQ handler (pi_wakeup_handler) wherever the pCPU is: if it is
            # in guest mode it exits first (external interrupt), then the handler runs.
            self.pi_wakeup_handler(cpu)
        self.host_interrupt(p)

    def _slice_end(self, cpu: int) -> None:
        self.host_interrupt(self.pcpus[cpu])   # the host timer tick

    @staticmethod
    def host_interrupt(p: HostCpu) -> None:
        """A host interrupt reaches pCPU ``p``. It is latched: in guest mode it forces
        #VMEXIT(INTR) at the next instruction boundary; between vcpu_enter_guest()'s
        local_irq_disable() and VMRUN it stays pending, so VMRUN exits at once (the INTR intercept);
        in host mode with IRQs enabled it is simply handled — vcpu_enter_guest() drops the latch
        when it disables IRQs."""
        p.intr_pending = True
        p.wake.fire()

    # -- doorbells (MSR C001_011Bh or the AVIC IPI path) ------------------------------------
    def doorbell(self, host_apic_id: int, src: int | None = None) -> None:
        self.rec.count("doorbells_sent")
        if self.trace.on:
            self.trace.emit("kvm_avic_doorbell", pcpu=src, level="hw", apicid=host_apic_id)
        self.engine.call_later(self.costs.DOORBELL_WIRE, self._doorbell_arrive, host_apic_id,
                               label="doorbell")

    def _doorbell_arrive(self, host_apic_id: int) -> None:
        p = self.by_apic_id.get(host_apic_id & 0xFFF)
        if p is None or not p.guest_mode:
            self.rec.count("doorbells_ignored")
            return
        self.rec.count("doorbells_received")
        p.doorbell_pending = True
        p.wake.fire()
