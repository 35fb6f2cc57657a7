"""Shared helpers for the local APIC tests (imported as a plain module: pytest puts this directory on
sys.path; the leading underscore keeps pytest from collecting it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from navic.apic.dest import resolve
from navic.apic.icr import Icr
from navic.apic.lapic import ApicHooks, LocalApic


@dataclass
class RecordingHooks(ApicHooks):
    """Records every callback; ``clock`` is the time returned by now()."""

    clock: int = 0
    ipis: list[tuple[LocalApic, Icr]] = field(default_factory=list)
    pending: list[LocalApic] = field(default_factory=list)
    eois: list[tuple[LocalApic, int]] = field(default_factory=list)
    timers: list[tuple[LocalApic, int | None]] = field(default_factory=list)

    def send_ipi(self, apic: LocalApic, icr: Icr) -> None:
        self.ipis.append((apic, icr))

    def interrupt_pending(self, apic: LocalApic) -> None:
        self.pending.append(apic)

    def eoi_level(self, apic: LocalApic, vector: int) -> None:
        self.eois.append((apic, vector))

    def arm_timer(self, apic: LocalApic, deadline: int | None) -> None:
        self.timers.append((apic, deadline))

    def now(self) -> int:
        return self.clock


class Bus(RecordingHooks):
    """Hooks that also route IPIs between a set of APICs with navic.apic.dest.resolve."""

    def __init__(self) -> None:
        super().__init__()
        self.apics: list[LocalApic] = []

    def send_ipi(self, apic: LocalApic, icr: Icr) -> None:
        super().send_ipi(apic, icr)
        for target in resolve(self.apics, apic, icr):
            target.accept_irq(icr.delivery_mode, icr.vector, icr.trigger, icr.level)


def make_system(ids: list[int], mode: str = "xapic", **kw: object) -> tuple[Bus, list[LocalApic]]:
    bus = Bus()
    for i, apic_id in enumerate(ids):
        bus.apics.append(LocalApic(apic_id, hooks=bus, mode=mode, bsp=(i == 0), **kw))  # type: ignore[arg-type]
    return bus, bus.apics


def sw_enable(apic: LocalApic, spurious: int = 0xFF) -> None:
    from navic.apic.registers import APIC_SVR

    apic.write_reg(APIC_SVR, 0x100 | spurious)


def enabled_apic(apic_id: int = 0, mode: str = "xapic", **kw: object) -> tuple[RecordingHooks, LocalApic]:
    hooks = RecordingHooks()
    apic = LocalApic(apic_id, hooks=hooks, mode=mode, **kw)  # type: ignore[arg-type]
    sw_enable(apic)
    hooks.pending.clear()
    return hooks, apic
