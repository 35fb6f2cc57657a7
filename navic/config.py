"""Typed, validated scenario configuration (what a scenario TOML file becomes after checking).

The TOML contract (keys, defaults, error messages) is implemented in :mod:`navic.scenario` and
documented in docs/scenarios.md; this module only holds the resulting values so that the runner
and the hardware/hypervisor layers never look at raw dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from navic.guest.ops import Program

CPU_MODELS = ("zen2", "zen3", "zen4", "zen5", "spr")
APIC_MODES = ("xapic", "x2apic")
VIRT_MODES = ("none", "kvm")


@dataclass(frozen=True, slots=True)
class HostConfig:
    cpu: str = "zen4"
    pcpus: int = 4
    virt: str = "kvm"


@dataclass(frozen=True, slots=True)
class L0Config:
    """KVM's module parameters and policies at L0 (used once `virt = "kvm"`)."""

    apicv: bool = True
    avic: str | bool = "auto"
    force_avic: bool = False
    ipiv: str | bool = "auto"
    halt_poll_ns: int = 200_000
    halt_poll_ns_shrink: int = 2
    posted_timer: bool = False
    timeslice_us: int = 3_000
    errata: str | tuple[str, ...] = "auto"
    nested_apicv: str = "none"
    doorbell_strict: bool = True
    shadow_variant: str = "navic"
    erratum_1235_p: float = 0.1
    erratum_1235_window: int = 2
    inhibits: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VmConfig:
    """One VM level: `[l1]` (the VM L0 runs) or `[l2]` (the nested guest L1 runs)."""

    vcpus: int = 4
    apic: str = "x2apic"
    apic_ids: tuple[int, ...] | None = None
    apicv_for_l2: bool = True
    timeslice_us: int = 3_000
    apic_bus_cycles_ns: int | None = None   # KVM_CAP_X86_APIC_BUS_CYCLES_NS (None: the TIMER_TICK cost)

    def apic_id(self, index: int) -> int:
        return self.apic_ids[index] if self.apic_ids is not None else index


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A device that raises an interrupt `vector` at vCPU `target` every `period_us` microseconds."""

    vector: int
    target: str
    period_us: float
    count: int | None = None
    start_us: float = 0.0


@dataclass(frozen=True, slots=True)
class SetLapicConfig:
    """A host-side KVM_SET_LAPIC on vCPU `cpu` at `at_us`: the named registers replaced."""

    cpu: str
    regs: tuple[tuple[str, int], ...]
    at_us: float = 0.0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    seed: int = 1
    max_time_us: float = 10_000.0
    host: HostConfig = field(default_factory=HostConfig)
    l0: L0Config = field(default_factory=L0Config)
    l1: VmConfig = field(default_factory=VmConfig)
    l2: VmConfig | None = None
    programs: tuple[Program, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    set_lapic: tuple[SetLapicConfig, ...] = ()
    source: str = "<scenario>"
