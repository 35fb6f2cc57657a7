"""The guest kernel of one CPU: runs a scenario program and its interrupt handlers.

:class:`GuestCpu` holds the guest-visible CPU state that the hardware below needs (RFLAGS.IF,
NMI blocking, the stack of running code: the program at the bottom, one frame per interrupt
handler above it) and turns program ops (:mod:`navic.guest.ops`) into instructions
(:mod:`navic.hw.isa`). It is the same whether the CPU is a physical one (bare metal) or a vCPU
at L1 or L2: only the executor that steps it differs.

Protocol with the executor: call :meth:`next_insn` to get the next instruction, execute it, then
:meth:`retire` its result *before* any interrupt is taken; take interrupts only at instruction
boundaries through :meth:`enter_handler`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from navic.apic.registers import (
    APIC_EOI,
    APIC_ICR,
    APIC_ICR2,
    MSR_IA32_APICBASE,
    REG_BY_NAME,
    X2APIC_MSR_BASE,
)
from navic.guest import ops as O
from navic.hw import isa
from navic.hw.isa import Fault, Insn

APIC_DEFAULT_BASE = 0xFEE00000
NMI_VECTOR = 2

GuestGen = Generator[Insn, Any, None]

# Scenario op names (as written in TOML) of the op records, for error reports.
OP_NAMES: dict[type, str] = {
    O.Sti: "sti", O.Cli: "cli", O.Hlt: "hlt", O.Eoi: "eoi", O.Ipi: "ipi", O.Write: "write",
    O.Read: "read", O.Wrmsr: "wrmsr", O.Rdmsr: "rdmsr", O.MmioWrite: "mmio_write",
    O.MmioRead: "mmio_read", O.Wait: "wait", O.Compute: "compute", O.Repeat: "repeat",
    O.Add: "add", O.Await: "await", O.TscDeadline: "tsc_deadline",
}


class SharedMemory:
    """Variables in memory shared by the CPUs of one VM (for ``add`` / ``await``). A store bumps
    every member CPU's poll epoch and calls its ``poll_wake`` so a CPU spinning on memory
    re-checks (a pause loop sees the cache line change)."""

    def __init__(self) -> None:
        self.vars: dict[str, int] = {}
        self.cpus: list[GuestCpu] = []

    def add(self, var: str, value: int) -> None:
        self.vars[var] = self.vars.get(var, 0) + value
        for g in self.cpus:
            g.epoch += 1
            if g.poll_wake is not None:
                g.poll_wake()



_WRMSR = isa.Wrmsr
_MMIO_WRITE = isa.MmioWrite


class _Frame:
    __slots__ = ("gen", "saved_if", "kind", "result")

    def __init__(self, gen: GuestGen, saved_if: bool, kind: str) -> None:
        self.gen = gen
        self.saved_if = saved_if
        self.kind = kind       # "program", "idle", "irq", "nmi"
        self.result: Any = None


class GuestCpu:
    """Guest-visible state and code of one CPU (named as in scenarios: "l1.0", "l2.3")."""

    def __init__(
        self,
        name: str,
        program: O.Program | None,
        *,
        x2apic: bool,
        apic_id_of: Callable[[int], int],
        on_delivery: Callable[[GuestCpu, int, str], None],
        on_error: Callable[[GuestCpu, int | None, str, str], None],
    ) -> None:
        self.name = name
        self.program = program
        self.x2apic = x2apic
        self.apic_base = APIC_DEFAULT_BASE
        self.apic_id_of = apic_id_of
        self._on_delivery = on_delivery
        self._on_error = on_error
        # Architectural state the hardware reads and writes.
        self.IF = program is None          # a CPU without a program idles with interrupts open
        self.nmi_blocked = False
        self.wait_for_sipi = False
        # Bookkeeping.
        self.reads: dict[str, int] = {}
        self.handled: dict[int, int] = {}
        self._consumed: dict[int, int] = {}
        self.epoch = 0                     # number of handler entries so far
        self.clock: Any = None             # set by the runner (the engine): timestamps sends
        self.ipi_sent_at = 0               # time of this CPU's last ICR write (latency origin)
        self.shared: SharedMemory | None = None  # the VM's shared variables (add / await)
        self.poll_wake: Callable[[], None] | None = None  # set by the executor: wake a pause loop
        self._awaited: dict[str, int] = {}
        self.finished = program is None    # main program done
        self._op_index: int | None = None
        # An observer of the sends this CPU issues (navic.check.provenance): called with every
        # WRMSR / MMIO-write instruction as it is fetched, before the executor runs it.
        self.send_watch: Callable[[Insn], None] | None = None
        main = self._ops_gen(program.ops) if program is not None else self._idle_gen()
        self.frames: list[_Frame] = [_Frame(main, False, "program" if program else "idle")]

    # -- executor protocol -----------------------------------------------------------------
    def next_insn(self) -> Insn:
        """The next instruction of the innermost running code."""
        while True:
            f = self.frames[-1]
            res, f.result = f.result, None
            try:
                insn = f.gen.send(res)
            except StopIteration:
                if len(self.frames) == 1:
                    self.finished = True
                    self.frames[0] = _Frame(self._idle_gen(), False, "idle")
                    continue
                return self._leave_handler()
            watch = self.send_watch
            if watch is not None:
                t = type(insn)
                if t is _WRMSR or t is _MMIO_WRITE:
                    watch(insn)
            return insn

    def retire(self, result: Any) -> None:
        """Hand the result of the instruction just executed back to the code that issued it."""
        self.frames[-1].result = result

    def enter_handler(self, vector: int, kind: str) -> None:
        """Interrupt/NMI entry at an instruction boundary: IF <- 0, push the handler frame."""
        saved = self.IF
        self.IF = False
        if kind == "nmi":
            self.nmi_blocked = True
            handler: tuple[O.Op, ...] | None = None
            if self.program is not None:
                handler = self.program.handlers.get(NMI_VECTOR)
            gen = self._ops_gen(handler) if handler is not None else self._nothing()
        else:
            handler = self.program.handlers.get(vector) if self.program is not None else None
            gen = self._ops_gen(handler) if handler is not None else self._default_handler()
        self.frames.append(_Frame(gen, saved, "nmi" if kind == "nmi" else "irq"))
        self.handled[vector] = self.handled.get(vector, 0) + 1
        self.epoch += 1
        self._on_delivery(self, vector, kind)

    def note_event(self, vector: int, kind: str) -> None:
        """A delivery that runs no guest handler (INIT, SIPI, SMI): recorded, counted."""
        self.handled[vector] = self.handled.get(vector, 0) + 1
        self.epoch += 1
        self._on_delivery(self, vector, kind)

    @property
    def in_handler(self) -> bool:
        return len(self.frames) > 1

    def _leave_handler(self) -> Insn:
        f = self.frames.pop()
        self.IF = f.saved_if
        if f.kind == "nmi":
            self.nmi_blocked = False
        return isa.IRET

    # -- code ------------------------------------------------------------------------------
    def _idle_gen(self) -> GuestGen:
        while True:
            yield isa.HLT

    def _nothing(self) -> GuestGen:
        return
        yield  # pragma: no cover

    def _default_handler(self) -> GuestGen:
        yield from self._eoi()

    def _program_gen(self, ops: tuple[O.Op, ...]) -> GuestGen:
        yield from self._ops_gen(ops)

    def _ops_gen(self, ops: tuple[O.Op, ...]) -> GuestGen:
        for op in ops:
            self._op_index = op.index
            yield from self._op(op)

    def _fault(self, res: Any, op: O.Op) -> bool:
        if isinstance(res, Fault):
            self._on_error(self, op.index, OP_NAMES.get(type(op), type(op).__name__.lower()), str(res))
            return True
        return False

    def _eoi(self) -> GuestGen:
        if self.x2apic:
            yield isa.Wrmsr(X2APIC_MSR_BASE + (APIC_EOI >> 4), 0)
        else:
            yield isa.MmioWrite(self.apic_base + APIC_EOI, 0)

    def _reg_write(self, off: int, value: int) -> GuestGen:
        if self.x2apic:
            return (yield isa.Wrmsr(X2APIC_MSR_BASE + (off >> 4), value))
        return (yield isa.MmioWrite(self.apic_base + off, value & 0xFFFFFFFF))

    def _reg_read(self, off: int) -> GuestGen:
        if self.x2apic:
            return (yield isa.Rdmsr(X2APIC_MSR_BASE + (off >> 4)))
        return (yield isa.MmioRead(self.apic_base + off))

    def _op(self, op: O.Op) -> GuestGen:  # noqa: C901 - one branch per op kind
        t = type(op)
        if t is O.Ipi:
            yield from self._ipi(op)  # type: ignore[arg-type]
        elif t is O.Eoi:
            res = yield from self._eoi()
            self._fault(res, op)
        elif t is O.Sti:
            yield isa.STI
        elif t is O.Cli:
            yield isa.CLI
        elif t is O.Hlt:
            yield isa.HLT
        elif t is O.Wait:
            yield from self._wait(op)  # type: ignore[arg-type]
        elif t is O.Compute:
            yield isa.Compute(op.cycles)  # type: ignore[attr-defined]
        elif t is O.TscDeadline:
            now = self.clock.now if self.clock is not None else 0
            res = yield isa.Wrmsr(0x6E0, now + op.delta)  # type: ignore[attr-defined]
            self._fault(res, op)
        elif t is O.Add:
            yield isa.Compute(self.ATOMIC_CYCLES)
            if self.shared is not None:
                self.shared.add(op.var, op.value)  # type: ignore[attr-defined]
        elif t is O.Await:
            yield from self._await(op)  # type: ignore[arg-type]
        elif t is O.Repeat:
            for _ in range(op.times):  # type: ignore[attr-defined]
                yield from self._ops_gen(op.ops)  # type: ignore[attr-defined]
        elif t is O.Write:
            off = REG_BY_NAME[op.reg]  # type: ignore[attr-defined]
            res = yield from self._reg_write(off, op.value)  # type: ignore[attr-defined]
            self._fault(res, op)
        elif t is O.Read:
            off = REG_BY_NAME[op.reg]  # type: ignore[attr-defined]
            res = yield from self._reg_read(off)
            if not self._fault(res, op) and op.into:  # type: ignore[attr-defined]
                self.reads[op.into] = res  # type: ignore[attr-defined]
        elif t is O.Wrmsr:
            res = yield isa.Wrmsr(op.msr, op.value)  # type: ignore[attr-defined]
            if not self._fault(res, op) and op.msr == MSR_IA32_APICBASE:  # type: ignore[attr-defined]
                self._track_apic_base(op.value)  # type: ignore[attr-defined]
        elif t is O.Rdmsr:
            res = yield isa.Rdmsr(op.msr)  # type: ignore[attr-defined]
            if not self._fault(res, op) and op.into:  # type: ignore[attr-defined]
                self.reads[op.into] = res  # type: ignore[attr-defined]
        elif t is O.MmioWrite:
            res = yield isa.MmioWrite(self.apic_base + op.offset, op.value)  # type: ignore[attr-defined]
            self._fault(res, op)
        elif t is O.MmioRead:
            res = yield isa.MmioRead(self.apic_base + op.offset)  # type: ignore[attr-defined]
            if not self._fault(res, op) and op.into:  # type: ignore[attr-defined]
                self.reads[op.into] = res  # type: ignore[attr-defined]
        else:  # pragma: no cover - the scenario checker rejects unknown ops
            raise TypeError(f"unknown op {op!r}")

    def _track_apic_base(self, value: int) -> None:
        """The guest OS knows which interface it switched its APIC to (SDM §11.12.5)."""
        self.x2apic = bool(value & (1 << 10)) and bool(value & (1 << 11))
        self.apic_base = value & 0xFFFFF000

    def _ipi(self, op: O.Ipi) -> GuestGen:
        if op.to is not None:
            dest = self.apic_id_of(op.to)
        else:
            dest = op.dest or 0
        low = (
            (op.vector & 0xFF)
            | (O.DELIVERY_MODES[op.mode] << 8)
            | (O.DEST_MODES[op.dest_mode] << 11)
            | ((op.level & 1) << 14)
            | (O.TRIGGERS[op.trigger] << 15)
            | (O.SHORTHANDS[op.shorthand] << 18)
        )
        if self.x2apic:
            self._stamp()
            res = yield isa.Wrmsr(X2APIC_MSR_BASE + (APIC_ICR >> 4), ((dest & 0xFFFFFFFF) << 32) | low)
            self._fault(res, op)
        else:
            res = yield isa.MmioWrite(self.apic_base + APIC_ICR2, (dest & 0xFF) << 24)
            if not self._fault(res, op):
                self._stamp()
                res = yield isa.MmioWrite(self.apic_base + APIC_ICR, low)
                self._fault(res, op)

    ATOMIC_CYCLES = 40  # a LOCK-prefixed add on a shared line (assumption, see docs/model.md)

    def _await(self, op: O.Await) -> GuestGen:
        """Poll a shared variable with interrupts open, like ``wait`` (see docs/model.md)."""
        shared = self.shared
        needed = self._awaited.get(op.var, 0) + op.count
        was_if = self.IF
        if not was_if:
            yield isa.STI
        while shared is not None and shared.vars.get(op.var, 0) < needed:
            if op.how == "hlt":
                yield isa.HLT
            else:
                yield isa.Pause(self.epoch)
        if not was_if:
            yield isa.CLI
        self._awaited[op.var] = needed

    def _stamp(self) -> None:
        if self.clock is not None:
            self.ipi_sent_at = self.clock.now

    def _wait(self, op: O.Wait) -> GuestGen:
        """Consume ``count`` handler runs of ``vector`` with interrupts open (see docs/model.md)."""
        v = op.vector
        needed = self._consumed.get(v, 0) + op.count
        was_if = self.IF
        if op.how == "hlt":
            # The safe-halt idiom: check with IF=0, then STI;HLT (STI's shadow makes it atomic).
            if was_if:
                yield isa.CLI
            while self.handled.get(v, 0) < needed:
                yield isa.STI
                yield isa.HLT
                yield isa.CLI
            if was_if:
                yield isa.STI
        else:
            if not was_if:
                yield isa.STI
            while self.handled.get(v, 0) < needed:
                yield isa.Pause(self.epoch)
            if not was_if:
                yield isa.CLI
        self._consumed[v] = needed
