"""The compiled guest interpreter (navic.guest.kernel) against the generator-based kernel it
replaced, kept here as the reference: random programs and handlers, random interrupts, results
and faults; both must fetch the same instructions and keep the same bookkeeping, and the
explorer's view of a frame (``_Frame.position``) must tell apart exactly the states that the
reference's generator positions (``navic.check.explore._pc``) told apart."""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

import pytest

from navic.apic.registers import APIC_EOI, APIC_ICR, APIC_ICR2, MSR_IA32_APICBASE, REG_BY_NAME, X2APIC_MSR_BASE
from navic.check.explore import _pc
from navic.guest import ops as O
from navic.guest.kernel import NMI_VECTOR, OP_NAMES, GuestCpu, SharedMemory
from navic.hw import isa
from navic.hw.isa import Fault, Insn

GuestGen = Generator[Insn, Any, None]


# ---- the reference: the generator-based kernel (before the interpreter) -----------------------
class _RefFrame:
    def __init__(self, gen: GuestGen, saved_if: bool, kind: str) -> None:
        self.gen = gen
        self.saved_if = saved_if
        self.kind = kind
        self.result: Any = None


class RefGuestCpu(GuestCpu):
    """GuestCpu with the former generator chain (``_ops_gen`` -> ``_op`` -> ``_ipi`` ...)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pause_in_flight = False   # the last instruction fetched is a PAUSE
        self.iret_in_flight = False    # the last instruction fetched is an IRET
        p = self.program
        self.frames = [_RefFrame(self._ops_gen(p.ops) if p is not None else self._idle_gen(), False,  # type: ignore[list-item]
                                 "program" if p else "idle")]

    def retire(self, result: Any) -> None:
        # IRET's retire reaches no code: the handler that issued it is gone, and the interrupted
        # code keeps the result of the instruction it retired before the interrupt.
        if not self.iret_in_flight:
            self.frames[-1].result = result

    def next_insn(self) -> Insn:
        self.pause_in_flight = False
        self.iret_in_flight = False
        while True:
            f = self.frames[-1]
            res, f.result = f.result, None
            try:
                insn = f.gen.send(res)  # type: ignore[attr-defined]
            except StopIteration:
                if len(self.frames) == 1:
                    self.finished = True
                    self.frames[0] = _RefFrame(self._idle_gen(), False, "idle")  # type: ignore[call-overload]
                    continue
                f = self.frames.pop()
                self.IF = f.saved_if
                if f.kind == "nmi":
                    self.nmi_blocked = False
                self.iret_in_flight = True
                return isa.IRET
            watch = self.send_watch
            if watch is not None and type(insn) in (isa.Wrmsr, isa.MmioWrite):
                watch(insn)
            self.pause_in_flight = type(insn) is isa.Pause
            return insn

    def enter_handler(self, vector: int, kind: str) -> None:
        saved = self.IF
        self.IF = False
        if kind == "nmi":
            self.nmi_blocked = True
            handler = self.program.handlers.get(NMI_VECTOR) if self.program is not None else None
            gen = self._ops_gen(handler) if handler is not None else self._nothing()
        else:
            handler = self.program.handlers.get(vector) if self.program is not None else None
            gen = self._ops_gen(handler) if handler is not None else self._default_handler()
        self.frames.append(_RefFrame(gen, saved, "nmi" if kind == "nmi" else "irq"))  # type: ignore[arg-type]
        self.handled[vector] = self.handled.get(vector, 0) + 1
        self.epoch += 1
        self._on_delivery(self, vector, kind)

    def _idle_gen(self) -> GuestGen:
        while True:
            yield isa.HLT

    def _nothing(self) -> GuestGen:
        return
        yield  # pragma: no cover

    def _default_handler(self) -> GuestGen:
        yield from self._eoi()

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

    def _op(self, op: Any) -> GuestGen:  # noqa: C901
        t = type(op)
        if t is O.Ipi:
            yield from self._ipi(op)
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
            yield from self._wait(op)
        elif t is O.Compute:
            yield isa.Compute(op.cycles)
        elif t is O.TscDeadline:
            now = self.clock.now if self.clock is not None else 0
            res = yield isa.Wrmsr(0x6E0, now + op.delta)
            self._fault(res, op)
        elif t is O.Add:
            yield isa.Compute(self.ATOMIC_CYCLES, atomic=True)
            if self.shared is not None:
                self.shared.add(op.var, op.value)
        elif t is O.Await:
            yield from self._await(op)
        elif t is O.Repeat:
            for _ in range(op.times):
                yield from self._ops_gen(op.ops)
        elif t is O.Write:
            off = REG_BY_NAME[op.reg]
            res = yield from self._reg_write(off, op.value)
            self._fault(res, op)
        elif t is O.Read:
            off = REG_BY_NAME[op.reg]
            res = yield from self._reg_read(off)
            if not self._fault(res, op) and op.into:
                self.reads[op.into] = res
        elif t is O.Wrmsr:
            res = yield isa.Wrmsr(op.msr, op.value)
            if not self._fault(res, op) and op.msr == MSR_IA32_APICBASE:
                self._track_apic_base(op.value)
        elif t is O.Rdmsr:
            res = yield isa.Rdmsr(op.msr)
            if not self._fault(res, op) and op.into:
                self.reads[op.into] = res
        elif t is O.MmioWrite:
            res = yield isa.MmioWrite(self.apic_base + op.offset, op.value)
            self._fault(res, op)
        elif t is O.MmioRead:
            res = yield isa.MmioRead(self.apic_base + op.offset)
            if not self._fault(res, op) and op.into:
                self.reads[op.into] = res

    def _ipi(self, op: O.Ipi) -> GuestGen:
        if op.to is not None:
            dest = self.apic_id_of(op.to)
        else:
            dest = op.dest or 0
        low = ((op.vector & 0xFF) | (O.DELIVERY_MODES[op.mode] << 8) | (O.DEST_MODES[op.dest_mode] << 11)
               | ((op.level & 1) << 14) | (O.TRIGGERS[op.trigger] << 15) | (O.SHORTHANDS[op.shorthand] << 18))
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

    def _await(self, op: O.Await) -> GuestGen:
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
        v = op.vector
        needed = self._consumed.get(v, 0) + op.count
        was_if = self.IF
        if op.how == "hlt":
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


# ---- random programs ---------------------------------------------------------------------------
VECTORS = (0x40, 0x41, 0x42)
REGS = ("TPR", "LDR", "SVR", "ESR")


def _ops(rng: random.Random, n: int, depth: int) -> tuple[O.Op, ...]:
    out: list[O.Op] = []
    for i in range(n):
        k = rng.randrange(17)
        if k == 0:
            out.append(O.Sti(i))
        elif k == 1:
            out.append(O.Cli(i))
        elif k == 2:
            out.append(O.Hlt(i))
        elif k == 3:
            out.append(O.Eoi(i))
        elif k == 4:
            if rng.random() < 0.5:
                out.append(O.Ipi(i, vector=rng.choice(VECTORS), to=rng.randrange(3)))
            else:
                out.append(O.Ipi(i, vector=rng.choice(VECTORS), dest=rng.choice((None, 1, 0x10003)),
                                 shorthand=rng.choice(("none", "self", "others")),
                                 dest_mode=rng.choice(("physical", "logical"))))
        elif k == 5:
            out.append(O.Write(i, reg=rng.choice(REGS), value=rng.randrange(1 << 33)))
        elif k == 6:
            out.append(O.Read(i, reg=rng.choice(REGS), into=rng.choice((None, "a", "b"))))
        elif k == 7:
            base = rng.choice((0xFEE00000, 0xFEC00000))
            mode = rng.choice(((1 << 11) | (1 << 10), 1 << 11, 0))
            out.append(O.Wrmsr(i, msr=rng.choice((MSR_IA32_APICBASE, 0x808)), value=base | mode))
        elif k == 8:
            out.append(O.Rdmsr(i, msr=rng.choice((0x802, 0x808)), into=rng.choice((None, "c"))))
        elif k == 9:
            out.append(O.MmioWrite(i, offset=rng.choice((0x80, 0x300)), value=rng.randrange(1 << 32)))
        elif k == 10:
            out.append(O.MmioRead(i, offset=0x20, into=rng.choice((None, "d"))))
        elif k == 11:
            out.append(O.Wait(i, vector=rng.choice(VECTORS), count=rng.randrange(3), how=rng.choice(("spin", "hlt"))))
        elif k == 12:
            out.append(O.Compute(i, cycles=rng.randrange(1, 100)))
        elif k == 13 and depth < 2:
            out.append(O.Repeat(i, times=rng.randrange(4), ops=_ops(rng, rng.randrange(4), depth + 1)))
        elif k == 14:
            out.append(O.Add(i, var=rng.choice(("x", "y")), value=rng.randrange(1, 3)))
        elif k == 15:
            out.append(O.Await(i, var=rng.choice(("x", "y")), count=rng.randrange(3), how=rng.choice(("spin", "hlt"))))
        else:
            out.append(O.TscDeadline(i, delta=rng.randrange(1000)))
    return tuple(out)


def _program(rng: random.Random) -> O.Program:
    handlers = {v: _ops(rng, rng.randrange(4), 1) for v in VECTORS if rng.random() < 0.6}
    if rng.random() < 0.5:
        handlers[NMI_VECTOR] = _ops(rng, rng.randrange(3), 1)
    return O.Program("l1.0", 1, 0, _ops(rng, rng.randrange(1, 10), 0), handlers)


class _Clock:
    now = 0


def _make(cls: type, program: O.Program | None, x2apic: bool, log: list[Any]) -> GuestCpu:
    g = cls("l1.0", program, x2apic=x2apic, apic_id_of=lambda i: (i * 7) % 5,
            on_delivery=lambda g, v, k: log.append(("delivery", v, k)),
            on_error=lambda g, i, op, err: log.append(("error", i, op, err)))
    g.clock = _Clock()
    SharedMemory().join(g)
    g.send_watch = lambda insn: log.append(("watch", insn, g.apic_base, g.clock.now))
    return g


def _state(g: GuestCpu) -> tuple[Any, ...]:
    return (g.IF, g.nmi_blocked, g.finished, g.x2apic, g.apic_base, g.epoch, g.ipi_sent_at, g._op_index,
            sorted(g.handled.items()), sorted(g._consumed.items()), sorted(g._awaited.items()),
            sorted(g.reads.items()), sorted(g.shared.vars.items()), [(f.kind, f.saved_if) for f in g.frames])


@pytest.mark.parametrize("seed", range(300))
def test_interpreter_matches_generator_kernel(seed: int) -> None:
    rng = random.Random(seed)
    program = _program(rng) if seed % 10 else None
    x2apic = rng.random() < 0.5
    log_new: list[Any] = []
    log_ref: list[Any] = []
    new = _make(GuestCpu, program, x2apic, log_new)
    ref = _make(RefGuestCpu, program, x2apic, log_ref)
    fwd: dict[Any, Any] = {}
    back: dict[Any, Any] = {}

    def positions() -> None:
        # The explorer's frame views must induce the same partition of states.
        for fn, fr in zip(new.frames, ref.frames, strict=True):
            a, b = fn.position(), _pc(fr.gen)  # type: ignore[attr-defined]
            assert fwd.setdefault(b, a) == a
            assert back.setdefault(a, b) == b

    for _ in range(300):
        positions()
        r = rng.random()
        if r < 0.15:
            v, kind = (NMI_VECTOR, "nmi") if rng.random() < 0.2 else (rng.choice((*VECTORS, 0x50)), "irq")
            if kind == "nmi" and new.nmi_blocked:
                continue
            new.enter_handler(v, kind)
            ref.enter_handler(v, kind)
        elif r < 0.18:
            new.note_event(0, "init")
            ref.note_event(0, "init")
        elif r < 0.22:
            var = rng.choice(("x", "y"))
            new.shared.add(var, 1)  # type: ignore[union-attr]
            # The store as SharedMemory specifies it: seen (epoch bump) by a CPU with a PAUSE in flight.
            ref.shared.vars[var] = ref.shared.vars.get(var, 0) + 1  # type: ignore[union-attr]
            if ref.pause_in_flight:  # type: ignore[attr-defined]
                ref.epoch += 1
        else:
            a, b = new.next_insn(), ref.next_insn()
            assert a == b and type(a) is type(b), (a, b)
            if a is isa.STI:
                new.IF = ref.IF = True
            elif a is isa.CLI:
                new.IF = ref.IF = False
            x = rng.random()
            res: Any = None if x < 0.6 else Fault("#GP", "test") if x < 0.8 else rng.randrange(1 << 32)
            if type(a) not in (isa.Wrmsr, isa.Rdmsr, isa.MmioWrite, isa.MmioRead):
                res = None   # as the executors retire STI, CLI, HLT, IRET, PAUSE, compute
            new.retire(res)
            ref.retire(res)
        new.clock.now += 10
        ref.clock.now += 10
        assert _state(new) == _state(ref)
        assert log_new == log_ref
    positions()
