"""Devices: periodic interrupt sources (a NIC queue, a storage completion ring) per ``[[device]]``.

A device only knows its message (vector, target CPU) and its period; *how* the message reaches
the target depends on the platform and is the ``deliver`` callback: bare metal writes it into
the target's local APIC, under KVM the IOMMU posts it (AVIC guest mode: IRR + doorbell or GA
log) or remaps it to the host, which injects it through KVM.
"""

from __future__ import annotations

from collections.abc import Callable

from navic.config import DeviceConfig
from navic.sim.engine import Engine


class Device:
    def __init__(self, engine: Engine, cfg: DeviceConfig, ghz: float, index: int,
                 deliver: Callable[[Device], None]) -> None:
        self.engine = engine
        self.cfg = cfg
        self.index = index
        self.name = f"dev{index}"
        self.period = max(1, int(cfg.period_us * ghz * 1000))
        self.deliver = deliver
        self.sent = 0
        start = int(cfg.start_us * ghz * 1000)
        engine.call_at(start, self._fire, label=f"{self.name}.irq")

    def _fire(self) -> None:
        cfg = self.cfg
        if cfg.count is not None and self.sent >= cfg.count:
            return
        self.sent += 1
        self.deliver(self)
        if cfg.count is None or self.sent < cfg.count:
            self.engine.call_later(self.period, self._fire, label=f"{self.name}.irq")
