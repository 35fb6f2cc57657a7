"""Trace recorder: typed events with timestamp, pCPU, level, vCPU and a name.

Names follow KVM's tracepoints where one exists (``kvm_apic_accept_irq``, ``kvm_avic_doorbell``,
``kvm_avic_incomplete_ipi``, ``kvm_nested_vmexit`` ...); navic-only events are prefixed ``navic_``.
Recording is off unless asked for; hot paths test :attr:`Trace.on` before building fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TraceEvent:
    t: int                 # cycles
    pcpu: int | None       # physical CPU index, None for off-CPU agents (bus, IOMMU)
    level: str             # "L0", "L1", "L2" or "hw"
    vcpu: str | None       # program name of the vCPU concerned ("l1.0"), if any
    name: str
    fields: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "pcpu": self.pcpu, "level": self.level, "vcpu": self.vcpu,
                "name": self.name, "fields": self.fields}


class Trace:
    __slots__ = ("on", "events", "clock")

    def __init__(self, on: bool = False, clock: Any = None) -> None:
        self.on = on
        self.events: list[TraceEvent] = []
        self.clock = clock  # object with a ``now`` attribute (the engine)

    def emit(self, name: str, *, pcpu: int | None = None, level: str = "hw", vcpu: str | None = None,
             **fields: Any) -> None:
        if self.on:
            self.events.append(TraceEvent(self.clock.now if self.clock is not None else 0,
                                          pcpu, level, vcpu, name, fields))

    def text_lines(self, ghz: float = 3.0) -> list[str]:
        """trace-cmd-report-like lines: ``task-pid [cpu] ts: event: fields``."""
        out = []
        for e in self.events:
            task = f"{e.vcpu or e.level}-{_pid(e.vcpu or e.level)}"
            cpu = f"{e.pcpu:03d}" if e.pcpu is not None else "---"
            ts = e.t / (ghz * 1e9)
            fields = " ".join(f"{k}={_fmt(v)}" for k, v in e.fields.items())
            out.append(f"{task:>16} [{cpu}] {ts:.9f}: {e.name}: {fields}".rstrip())
        return out


def _pid(task: str) -> int:
    """A stable pseudo thread id per task name (vCPU threads 1000+index per level)."""
    if "." in task and task[1:].split(".")[0].isdigit() and task.split(".")[1].isdigit():
        level, idx = task[1:].split(".")
        return int(level) * 1000 + int(idx)
    return {"L0": 1, "L1": 2, "L2": 3, "hw": 0}.get(task, 9)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int) and v > 9:
        return hex(v)
    return str(v)
