"""Guest program operations: the instruction-level vocabulary of a scenario's `[[program]]`.

A scenario op (``{ op = "ipi", to = 1, vector = 0x40 }``) is parsed once into one of these small
frozen records; the guest kernel (:mod:`navic.guest.kernel`) turns each into CPU instructions
(MMIO/MSR accesses, STI/CLI/HLT, compute time). Validation lives in :mod:`navic.scenario`; these
classes only hold already-checked values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ICR delivery-mode field values (SDM vol. 3 §11.6.1, "Delivery Mode").
DELIVERY_MODES: dict[str, int] = {
    "fixed": 0b000,
    "lowest": 0b001,
    "smi": 0b010,
    "nmi": 0b100,
    "init": 0b101,
    "sipi": 0b110,
    "extint": 0b111,
}
# ICR destination-shorthand field values (SDM §11.6.1, "Destination Shorthand").
SHORTHANDS: dict[str, int] = {"none": 0b00, "self": 0b01, "all": 0b10, "others": 0b11}
DEST_MODES: dict[str, int] = {"physical": 0, "logical": 1}
TRIGGERS: dict[str, int] = {"edge": 0, "level": 1}


@dataclass(frozen=True, slots=True)
class Op:
    """Base class. ``index`` is the op's position in its list (for error reports)."""

    index: int


@dataclass(frozen=True, slots=True)
class Sti(Op):
    pass


@dataclass(frozen=True, slots=True)
class Cli(Op):
    pass


@dataclass(frozen=True, slots=True)
class Hlt(Op):
    """HLT: the CPU halts until an interrupt (or NMI/INIT) arrives; with IF=0 only NMI/INIT wake it."""


@dataclass(frozen=True, slots=True)
class Eoi(Op):
    """Write 0 to the EOI register (MMIO B0h or MSR 80Bh by APIC mode)."""


@dataclass(frozen=True, slots=True)
class Ipi(Op):
    """Write the ICR. ``to`` is a vCPU index of the same VM (resolved to its APIC ID at run time);
    otherwise ``dest`` is the raw destination field. A shorthand IPI has neither."""

    vector: int
    to: int | None = None
    dest: int | None = None
    mode: str = "fixed"
    dest_mode: str = "physical"
    trigger: str = "edge"
    level: int = 1
    shorthand: str = "none"


@dataclass(frozen=True, slots=True)
class Write(Op):
    """Write an APIC register by name (MMIO in xAPIC mode, MSR 800h+off/16 in x2APIC mode)."""

    reg: str
    value: int


@dataclass(frozen=True, slots=True)
class Read(Op):
    reg: str
    into: str | None = None


@dataclass(frozen=True, slots=True)
class Wrmsr(Op):
    msr: int
    value: int


@dataclass(frozen=True, slots=True)
class Rdmsr(Op):
    msr: int
    into: str | None = None


@dataclass(frozen=True, slots=True)
class MmioWrite(Op):
    """32-bit write at ``offset`` inside the APIC MMIO page (APIC base + offset)."""

    offset: int
    value: int


@dataclass(frozen=True, slots=True)
class MmioRead(Op):
    offset: int
    into: str | None = None


@dataclass(frozen=True, slots=True)
class Wait(Op):
    """Consume ``count`` runs of ``vector``'s handler on this CPU (a semaphore: runs that happened
    before the wait count). ``how`` is "spin" (busy, interrupts open) or "hlt" (halt in between)."""

    vector: int
    count: int = 1
    how: str = "spin"


@dataclass(frozen=True, slots=True)
class Add(Op):
    """Atomically add ``value`` to the VM-shared memory variable ``var`` (a LOCK ADD)."""

    var: str
    value: int = 1


@dataclass(frozen=True, slots=True)
class Await(Op):
    """Spin (or halt between interrupts) until VM-shared ``var`` has grown by ``count`` since this
    CPU last consumed it — the memory-flag handshake real kernels use for acknowledgements
    (e.g. TLB shootdown), which IPIs cannot do at scale because they coalesce in IRR."""

    var: str
    count: int = 1
    how: str = "spin"


@dataclass(frozen=True, slots=True)
class TscDeadline(Op):
    """Arm the TSC-deadline timer ``delta`` cycles from now: WRMSR(IA32_TSC_DEADLINE, rdtsc() + delta),
    as Linux's lapic_next_deadline() does."""

    delta: int


@dataclass(frozen=True, slots=True)
class Compute(Op):
    cycles: int


@dataclass(frozen=True, slots=True)
class Repeat(Op):
    times: int
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True, slots=True)
class Cr8Write(Op):
    """MOV CR8, value: TPR[7:4] <- value, TPR[3:0] <- 0 (SDM §11.8.6.5); compiled to the TPR access
    of the current APIC interface (docs/model.md "Peer suites")."""

    value: int


@dataclass(frozen=True, slots=True)
class Cr8Read(Op):
    """MOV reg, CR8: TPR[7:4]."""

    into: str | None = None


@dataclass(frozen=True, slots=True)
class Cpuid(Op):
    """CPUID's APIC ID: leaf 1 EBX[31:24] (the initial xAPIC ID) or leaf 0Bh EDX (the x2APIC ID)."""

    leaf: int
    into: str | None = None


@dataclass(frozen=True, slots=True)
class Rdtsc(Op):
    """RDTSC (also RDMSR 10h, IA32_TIME_STAMP_COUNTER): the cycle count, into a variable."""

    into: str | None = None


@dataclass(frozen=True, slots=True)
class Poll(Op):
    """Read APIC register ``reg`` until (value & mask) == ``value`` (a polling loop; one read per
    iteration, interrupts taken between them if IF = 1). ``into`` gets the last value read."""

    reg: str
    value: int = 0
    mask: int = 0xFFFFFFFF
    into: str | None = None


@dataclass(frozen=True, slots=True)
class Once(Op):
    """Run ``ops`` only the first time this op is reached on this CPU (e.g. in a handler)."""

    ops: tuple[Op, ...] = ()


@dataclass(frozen=True, slots=True)
class StiShadow(Op):
    """In a handler: add 1 to ``into`` (a counter, from 0) if the interrupted code was stopped right
    after an ``sti`` op, i.e. the event was taken in STI's interrupt shadow; else add 0."""

    into: str


@dataclass(frozen=True, slots=True)
class HltCount(Op):
    """``into`` <- the number of HLT instructions this CPU's code has executed so far (hlt ops and
    the halts of wait / await with how = "hlt"; not the idle loop after the program)."""

    into: str


@dataclass(frozen=True, slots=True)
class Hypercall(Op):
    """VMMCALL / VMCALL with RAX = ``nr``, RBX/RCX/RDX/RSI = ``a0``..``a3``; ``into`` gets RAX.
    KVM_HC_SEND_IPI (10): a0/a1 = destination bitmaps, a2 = the APIC ID of bit 0, a3 = ICR low."""

    nr: int
    a0: int = 0
    a1: int = 0
    a2: int = 0
    a3: int = 0
    into: str | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """One CPU's program. ``cpu`` is the scenario name ("l1.0", "l2.3"); ``level`` 1 or 2 and
    ``vcpu`` the index inside that VM. ``handlers`` maps vector -> ops; vectors absent there get
    the default handler (record + EOI)."""

    cpu: str
    level: int
    vcpu: int
    ops: tuple[Op, ...]
    handlers: dict[int, tuple[Op, ...]] = field(default_factory=dict)
