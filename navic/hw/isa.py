"""The instructions guest code issues to the CPU it runs on.

Guest code (a program's ops, a handler, later a guest hypervisor) is a generator that yields
these records and receives each one's result: the value read, ``None`` for a completed write,
or a :class:`Fault` when the instruction raised a guest-visible exception (#GP). The CPU that
executes them is either the silicon directly (bare metal) or the silicon in guest mode, where
an instruction may be intercepted and cause a #VMEXIT to the hypervisor below.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from navic.sim.engine import Cuttable, Signal


class Insn:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class MmioRead(Insn):
    addr: int


@dataclass(frozen=True, slots=True)
class MmioWrite(Insn):
    addr: int
    value: int


@dataclass(frozen=True, slots=True)
class Rdmsr(Insn):
    msr: int


@dataclass(frozen=True, slots=True)
class Wrmsr(Insn):
    msr: int
    value: int


@dataclass(frozen=True, slots=True)
class Compute(Insn):
    """Straight-line work of ``cycles`` cycles: a run of ordinary instructions, with an instruction
    boundary (where interrupts are recognised) at every cycle (:func:`run_compute`). ``atomic``
    marks one instruction that takes that long (a LOCK-prefixed read-modify-write): no boundary
    inside it."""

    cycles: int
    atomic: bool = field(default=False, repr=False)


@dataclass(frozen=True, slots=True)
class Pause(Insn):
    """One pass of a pause loop polling memory. The CPU stays busy (no exit, no halt) until an
    interrupt can be taken; ``epoch`` is the guest's delivery count when it last looked, so a
    delivery that happened since returns at once instead of sleeping (no lost wake-up)."""

    epoch: int


class _Simple(Insn):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name.upper()


STI = _Simple("sti")   # IF <- 1; interrupts are recognised only after the next instruction
CLI = _Simple("cli")   # IF <- 0
HLT = _Simple("hlt")   # halt until an interrupt (maskable only if IF = 1), NMI or INIT
IRET = _Simple("iret")  # return from an interrupt handler (restores IF, ends NMI blocking)


@dataclass(frozen=True, slots=True)
class Fault:
    """A guest-visible exception raised by an instruction, e.g. ``Fault("#GP", "reserved bits")``."""

    vector: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.vector}: {self.reason}" if self.reason else self.vector


@dataclass(frozen=True, slots=True)
class Vmrun(Insn):
    """VMRUN with rAX = the guest-physical address of a VMCB (a guest hypervisor running its guest).
    L0 intercepts it; the result is the exit code of the nested #VMEXIT that ends it."""

    vmcb: int


@dataclass(frozen=True, slots=True)
class Vmresume(Insn):
    """VMRESUME (VMLAUNCH, VMPTRLD folded in) of the VMCS at guest-physical ``vmcs``: a guest
    hypervisor on VMX running its guest. Every VMX instruction in non-root mode exits to L0
    (EXIT_REASON_VMRESUME), which emulates it; the result is the basic exit reason of the nested
    VM exit that ends it (docs/model.md "Nested VMX")."""

    vmcs: int


@dataclass(frozen=True, slots=True)
class MemWrite(Insn):
    """A store of ``size`` bytes to guest-physical ``gpa`` that L0 must see (its nested page table
    write-protects the frame): it takes a nested page fault and L0 emulates it."""

    gpa: int
    size: int
    value: int


def run_compute(insn: Compute, g: Any, wake: Signal, cut: Callable[[], bool]) -> Generator[Any, Any, None]:
    """Execute ``Compute`` on guest state ``g``: ``insn.cycles`` cycles of ordinary instructions.

    A CPU recognises interrupts and other events at every instruction boundary (SDM vol. 3 §6.6
    "Program or task restart", §6.9 priorities; APM vol. 2 ch. 8, and §15.21 / §15.29 in guest
    mode): so when ``wake`` fires and ``cut()`` says an event is now recognisable
    (an interrupt with IF = 1, an NMI, INIT, a doorbell with a deliverable vector, a host
    interrupt that forces an exit, ...), the computation stops there. The instructions not yet
    run become ``Compute(rest)``, which the interrupted code fetches again when it resumes (after
    IRET, or after VMRUN when the cut was a #VMEXIT): :meth:`GuestCpu.suspend`. The executor's
    next instruction boundary then takes the event. An ``atomic`` compute (one long instruction),
    or a zero-length one, runs whole as before."""
    if insn.atomic or insn.cycles <= 0:
        g.retire(None)
        yield insn.cycles
        return
    w = Cuttable(insn.cycles, wake, cut)
    yield w
    if w.rest > 0:
        g.suspend(Compute(w.rest))
    else:
        g.retire(None)


def run_first_insn(insn: Compute, g: Any, insn_cycles: int) -> Generator[Any, Any, None]:
    """A ``Compute`` fetched in the STI shadow while an event is pending: interrupts are
    recognised after the instruction that follows STI (SDM vol. 2B "STI"; vol. 3 §6.8.1), so only
    the compute's first instruction (``insn_cycles``) runs before the boundary that takes the
    event; the rest is suspended as by :func:`run_compute`."""
    if insn.atomic or insn.cycles <= insn_cycles:
        g.retire(None)
        yield insn.cycles
        return
    g.suspend(Compute(insn.cycles - insn_cycles))
    yield insn_cycles


@dataclass(frozen=True, slots=True)
class Hypercall(Insn):
    """VMMCALL (AMD) / VMCALL (Intel) with RAX = ``nr`` and RBX, RCX, RDX, RSI = ``a0``..``a3``
    (KVM's hypercall ABI, Documentation/virt/kvm/x86/hypercalls.rst). In guest mode it exits to the
    hypervisor, whose return value (RAX) is the result; natively it raises #UD."""

    nr: int
    a0: int = 0
    a1: int = 0
    a2: int = 0
    a3: int = 0


def execute_plain(insn: Insn, g: Any, costs: Any) -> tuple[int, bool] | None:
    """Execute an instruction that behaves the same natively and in guest mode (STI, CLI, IRET,
    an uninterruptible compute) on guest state ``g``. Returns (cycles, sti_shadow), or None when
    ``insn`` is not one of them. (The executors run ``Compute`` with :func:`run_compute`.)"""
    if type(insn) is Compute:
        g.retire(None)
        return insn.cycles, False
    if insn is STI:
        g.IF = True
        g.retire(None)
        return costs.INSN, True          # interrupts are recognised only after the next instruction
    if insn is CLI:
        g.IF = False
        g.retire(None)
        return costs.INSN, False
    if insn is IRET:
        g.retire(None)
        return costs.IRET, False
    if type(insn) is Hypercall:   # no hypervisor (or not intercepted): VMMCALL/VMCALL is #UD
        g.retire(Fault("#UD", "VMMCALL/VMCALL without a hypervisor"))
        return costs.INSN, False
    return None
