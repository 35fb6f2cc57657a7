"""The guest kernel of one CPU: runs a scenario program and its interrupt handlers.

:class:`GuestCpu` holds the guest-visible CPU state that the hardware below needs (RFLAGS.IF,
NMI blocking, the stack of running code: the program at the bottom, one frame per interrupt
handler above it) and turns program ops (:mod:`navic.guest.ops`) into instructions
(:mod:`navic.hw.isa`). It is the same whether the CPU is a physical one (bare metal) or a vCPU
at L1 or L2: only the executor that steps it differs.

Protocol with the executor: call :meth:`next_insn` to get the next instruction, execute it, then
:meth:`retire` its result *before* any interrupt is taken; take interrupts only at instruction
boundaries through :meth:`enter_handler`. A ``Compute`` cut short by an event is not retired but
:meth:`suspend`-ed with the part not yet run, which is fetched again when its code resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from navic.apic.registers import (
    APIC_EOI,
    APIC_ICR,
    APIC_ICR2,
    APIC_TPR,
    MSR_IA32_APICBASE,
    REG_BY_NAME,
    X2APIC_MSR_BASE,
)
from navic.guest import ops as O
from navic.hw import isa
from navic.hw.isa import Fault, Insn

APIC_DEFAULT_BASE = 0xFEE00000
NMI_VECTOR = 2
MSR_IA32_TSC = 0x10

# Scenario op names (as written in TOML) of the op records, for error reports.
OP_NAMES: dict[type, str] = {
    O.Sti: "sti", O.Cli: "cli", O.Hlt: "hlt", O.Eoi: "eoi", O.Ipi: "ipi", O.Write: "write",
    O.Read: "read", O.Wrmsr: "wrmsr", O.Rdmsr: "rdmsr", O.MmioWrite: "mmio_write",
    O.MmioRead: "mmio_read", O.Wait: "wait", O.Compute: "compute", O.Repeat: "repeat",
    O.Add: "add", O.Await: "await", O.TscDeadline: "tsc_deadline",
    O.Cr8Write: "cr8_write", O.Cr8Read: "cr8_read", O.Cpuid: "cpuid", O.Rdtsc: "rdtsc", O.Poll: "poll",
    O.Once: "once", O.StiShadow: "sti_shadow", O.HltCount: "hlt_count", O.Hypercall: "hypercall",
}


class SharedMemory:
    """Variables in memory shared by the CPUs of one VM (for ``add`` / ``await``). A store is seen
    by every CPU spinning on memory: each CPU with a PAUSE in flight (fetched by a poll loop and
    not yet followed by its next fetch, see :meth:`GuestCpu.next_insn`) gets its poll epoch bumped
    and its ``poll_wake`` called, so its pause loop re-checks (it sees the cache line change).

    Only spinners are told: a CPU not executing a PAUSE has no pending epoch comparison (the next
    PAUSE it fetches captures the epoch afresh), and a halted CPU is not woken by a store. This
    keeps a store O(spinners), not O(CPUs): a shootdown's acks on a 4096-vCPU VM would otherwise
    cost 4096 x 4095 wake calls. Spinners are told in join order, as they were when every member
    was."""

    def __init__(self) -> None:
        self.vars: dict[str, int] = {}
        self.cpus: list[GuestCpu] = []
        self.spinners: dict[int, GuestCpu] = {}   # join index -> CPU with a PAUSE in flight

    def join(self, g: GuestCpu) -> None:
        g.shared = self
        g._member = len(self.cpus)
        self.cpus.append(g)

    def add(self, var: str, value: int) -> None:
        self.vars[var] = self.vars.get(var, 0) + value
        spinners = self.spinners
        if not spinners:
            return
        for i in (sorted(spinners) if len(spinners) > 1 else list(spinners)):
            g = spinners[i]
            g.epoch += 1
            if g.poll_wake is not None:
                g.poll_wake()


# ---------------------------------------------------------------------------------------------
# Compiled guest code
# ---------------------------------------------------------------------------------------------
# An op tuple (a program body, a handler; repeat bodies inline) is compiled once into a flat list
# of steps that GuestCpu.next_insn interprets. This replaces a chain of generators (ops -> op ->
# ipi/wait/eoi, one resume per level per instruction) and is equivalent to it: the same
# instructions in the same order, the clock, IF and the counters read at the same moments, the
# result of an instruction (fault check, value read) handled when the code is next resumed.
#
# A step is a tuple whose first item is its kind. A step that fetches an instruction stores the
# frame's *continuation* pc (the step that consumes the instruction's result) and returns. Every
# place where the former generators could be suspended has its own continuation pc, and
# ``_Code.keys`` names it as those generators did (op type and index per nesting level, the
# yield point, the plain locals that are fixed by the op); with the repeat counters and the op's
# run-time locals (``_Frame.loc``) this distinguishes exactly the states the explorer told apart
# by generator positions (``_Frame.position``).
#
# Kinds and layouts (pc = the step's own index):
_CHECK = 0      # (k, op, next): fault check of op's instruction
_WS_TEST = 1    # (k, vector, pause_pc, end_pc): spin wait: PAUSE while handled < needed, then CLI if IF was 0
_IPI = 2        # (k, op, icr_low, x2_cache, xa_cache): x2APIC -> pc+1, xAPIC ICR2 -> pc+2
_EOI = 3        # (k, op | None, xa_cache): x2APIC -> pc+1, xAPIC -> pc+2
_END = 4        # (k,): the code is done: IRET from a handler, or the program finished
_OPFETCH = 5    # (k, insn, next, op): an op that is one fixed instruction (STI, CLI, HLT, Compute, RDMSR)
_FETCH = 6      # (k, insn, next): a fixed instruction inside an op
_WS_BEGIN = 7   # (k, op): spin wait begins: STI if IF = 0 -> pc+1
_WAIT_END = 8   # (k, vector, next): the wait consumed its handler runs
_R_NEXT = 9     # (k, times, slot, body_pc, end_pc): end of one repeat iteration
_R_BEGIN = 10   # (k, op, slot, body_pc, end_pc)
_WH_BEGIN = 11  # (k, op): safe-halt wait begins: CLI if IF = 1 -> pc+1
_WH_TEST = 12   # (k, vector, loop_pc, end_pc): STI;HLT;CLI while handled < needed, then STI if IF was 1
_IPI_XA2 = 13   # (k, op, icr_low, xa_cache, end_pc): xAPIC: after ICR2, write ICR -> pc+1
_JUMP = 14      # (k, next)
_IDLE = 15      # (k,): HLT forever -> pc 1
_AW_BEGIN = 16  # (k, op): await begins: STI if IF = 0 -> pc+1
_AW_TEST = 17   # (k, op, poll_pc, end_pc): HLT / PAUSE while the variable is short, then CLI if IF was 0
_AW_END = 18    # (k, op, next)
_TSC = 19       # (k, op): WRMSR(TSC_DEADLINE, now + delta) -> pc+1
_ADD = 20       # (k, op): the LOCK ADD's compute time -> pc+1
_ADD_POST = 21  # (k, op, next): the store becomes visible
_WRITE = 22     # (k, op, off, value): APIC register write: x2APIC -> pc+1, xAPIC -> pc+2
_READ = 23      # (k, op, off): APIC register read: x2APIC -> pc+1, xAPIC -> pc+2
_READ_POST = 24  # (k, op, next): fault check, then store the value read
_WRMSR_OP = 25  # (k, op, insn): WRMSR op -> pc+1
_WRMSR_POST = 26  # (k, op, next): fault check, then track IA32_APIC_BASE
_MMIOW = 27     # (k, op): MMIO write op -> pc+1
_MMIOR = 28     # (k, op): MMIO read op -> pc+1
_HLT_OP = 29    # (k, op): the hlt op: count it, HLT -> pc+1
_VALUE = 30     # (k, op): cpuid / rdtsc: store the value, the instruction's time -> pc+1
_POLL = 31      # (k, op, off): poll: read the register: x2APIC -> pc+1, xAPIC -> pc+2
_POLL_TEST = 32  # (k, op, poll_pc, end_pc): fault check; again unless (value & mask) == value
_ONCE = 33      # (k, op, body_pc, end_pc): the body the first time only
_NOTE = 34      # (k, op): sti_shadow / hlt_count: store what the CPU knows -> pc+1
_HCALL = 35     # (k, op): VMMCALL / VMCALL -> pc+1

_X2APIC_ICR = X2APIC_MSR_BASE + (APIC_ICR >> 4)
_X2APIC_EOI = X2APIC_MSR_BASE + (APIC_EOI >> 4)
_EOI_X2 = isa.Wrmsr(_X2APIC_EOI, 0)     # shared: instructions are immutable
_PLAIN = (int, bool, str, float, type(None))  # values the explorer's state hash looks at
_OTHER = object()                              # ... and a stand-in for any other value
_PAUSE0 = isa.Pause(0)


class _Code:
    """Compiled guest code: ``steps`` (see above), ``keys`` (pc of each place the code can be
    suspended -> (name of that place, the repeat counters live there, whether the op's run-time
    locals matter there)) and ``nctr`` (repeat counters per frame)."""

    __slots__ = ("steps", "keys", "nctr")

    def __init__(self, family: str) -> None:
        self.steps: list[tuple[Any, ...]] = []
        self.keys: dict[int, tuple[tuple[Any, ...], tuple[int, ...], bool]] = {0: ((family, "start"), (), False)}
        self.nctr = 0

    def _at(self, pc: int, key: tuple[Any, ...], slots: tuple[int, ...], has_loc: bool = False) -> None:
        assert pc not in self.keys, "two suspension points share a continuation"
        self.keys[pc] = (key, slots, has_loc)


def _low(op: O.Ipi) -> int:
    """The ICR low word of an ``ipi`` op (vector, delivery/destination mode, level, trigger, shorthand)."""
    return ((op.vector & 0xFF)
            | (O.DELIVERY_MODES[op.mode] << 8)
            | (O.DEST_MODES[op.dest_mode] << 11)
            | ((op.level & 1) << 14)
            | (O.TRIGGERS[op.trigger] << 15)
            | (O.SHORTHANDS[op.shorthand] << 18))


def _emit(c: _Code, ops: tuple[O.Op, ...], chain: tuple[Any, ...], slots: tuple[int, ...]) -> None:  # noqa: C901
    """Append the steps of ``ops`` (nested in the ops ``chain``, inside repeats with counters ``slots``)."""
    steps = c.steps
    for op in ops:
        t = type(op)
        ch = (*chain, (t.__name__, op.index))
        i = len(steps)
        if t is O.Ipi:
            low = _low(op)  # type: ignore[arg-type]
            steps += [(_IPI, op, low, {}, {}), (_CHECK, op, i + 4), (_IPI_XA2, op, low, {}, i + 4), (_CHECK, op, i + 4)]
            c._at(i + 1, ("ops", ch, "ipi.x2", low), slots, True)
            c._at(i + 2, ("ops", ch, "ipi.icr2", low), slots, True)
            c._at(i + 3, ("ops", ch, "ipi.icr", low), slots, True)
        elif t is O.Eoi:
            # The former kernel discarded the EOI write's result (no fault report): kept so.
            steps += [(_EOI, op, {}), (_JUMP, i + 3), (_JUMP, i + 3)]
            c._at(i + 1, ("ops", ch, "eoi.x2"), slots)
            c._at(i + 2, ("ops", ch, "eoi.xa"), slots)
        elif t is O.Hlt:
            steps.append((_HLT_OP, op))
            c._at(i + 1, ("ops", ch, t.__name__), slots)
        elif t in (O.Sti, O.Cli, O.Compute):
            insn = {O.Sti: isa.STI, O.Cli: isa.CLI}.get(t) or isa.Compute(op.cycles)  # type: ignore[attr-defined]
            steps.append((_OPFETCH, insn, i + 1, op))
            c._at(i + 1, ("ops", ch, t.__name__), slots)
        elif t is O.Wait:
            v = op.vector  # type: ignore[attr-defined]
            if op.how == "hlt":  # type: ignore[attr-defined]
                # The safe-halt idiom: check with IF=0, then STI;HLT (STI's shadow makes it atomic).
                steps += [(_WH_BEGIN, op), (_WH_TEST, v, i + 2, i + 5), (_FETCH, isa.HLT, i + 3),
                          (_FETCH, isa.CLI, i + 4), (_WH_TEST, v, i + 2, i + 5), (_WAIT_END, v, i + 6)]
                for j, where in enumerate(("cli0", "sti", "hlt", "cli", "sti1"), 1):
                    c._at(i + j, ("ops", ch, "wait.hlt." + where, v), slots, True)
            else:
                steps += [(_WS_BEGIN, op), (_WS_TEST, v, i + 2, i + 3), (_WS_TEST, v, i + 2, i + 3),
                          (_WAIT_END, v, i + 4)]
                for j, where in enumerate(("sti", "pause", "cli"), 1):
                    c._at(i + j, ("ops", ch, "wait.spin." + where, v), slots, True)
        elif t is O.Repeat:
            slot = c.nctr
            c.nctr += 1
            steps.append(None)  # type: ignore[arg-type]  # R_BEGIN, once the end is known
            _emit(c, op.ops, ch, (*slots, slot))  # type: ignore[attr-defined]
            end = len(steps) + 1
            steps.append((_R_NEXT, op.times, slot, i + 1, end))  # type: ignore[attr-defined]
            steps[i] = (_R_BEGIN, op, slot, i + 1, end)
        elif t is O.Await:
            steps += [(_AW_BEGIN, op), (_AW_TEST, op, i + 2, i + 3), (_AW_TEST, op, i + 2, i + 3), (_AW_END, op, i + 4)]
            poll = "hlt" if op.how == "hlt" else "pause"  # type: ignore[attr-defined]
            for j, where in enumerate(("sti", poll, "cli"), 1):
                c._at(i + j, ("ops", ch, "await." + where), slots, True)
        elif t is O.TscDeadline:
            steps += [(_TSC, op), (_CHECK, op, i + 2)]
            c._at(i + 1, ("ops", ch, "tsc"), slots, True)
        elif t is O.Add:
            steps += [(_ADD, op), (_ADD_POST, op, i + 2)]
            c._at(i + 1, ("ops", ch, "add"), slots)
        elif t is O.Write:
            off = REG_BY_NAME[op.reg]  # type: ignore[attr-defined]
            steps += [(_WRITE, op, off, op.value), (_CHECK, op, i + 3), (_CHECK, op, i + 3)]  # type: ignore[attr-defined]
            c._at(i + 1, ("ops", ch, "write.x2", off, op.value), slots)  # type: ignore[attr-defined]
            c._at(i + 2, ("ops", ch, "write.xa", off, op.value), slots)  # type: ignore[attr-defined]
        elif t is O.Read:
            off = REG_BY_NAME[op.reg]  # type: ignore[attr-defined]
            steps += [(_READ, op, off), (_READ_POST, op, i + 3), (_READ_POST, op, i + 3)]
            c._at(i + 1, ("ops", ch, "read.x2", off), slots)
            c._at(i + 2, ("ops", ch, "read.xa", off), slots)
        elif t is O.Wrmsr:
            steps += [(_WRMSR_OP, op, isa.Wrmsr(op.msr, op.value)), (_WRMSR_POST, op, i + 2)]  # type: ignore[attr-defined]
            c._at(i + 1, ("ops", ch, "wrmsr"), slots)
        elif t is O.Rdmsr and op.msr == MSR_IA32_TSC:  # type: ignore[attr-defined]
            steps += [(_VALUE, op), (_JUMP, i + 2)]
            c._at(i + 1, ("ops", ch, "rdmsr.tsc"), slots)
        elif t is O.Rdmsr:
            steps += [(_OPFETCH, isa.Rdmsr(op.msr), i + 1, op), (_READ_POST, op, i + 2)]  # type: ignore[attr-defined]
            c._at(i + 1, ("ops", ch, "rdmsr"), slots)
        elif t is O.Cr8Write:
            value = op.value << 4  # type: ignore[attr-defined]
            steps += [(_WRITE, op, APIC_TPR, value), (_CHECK, op, i + 3), (_CHECK, op, i + 3)]
            c._at(i + 1, ("ops", ch, "cr8.x2", value), slots)
            c._at(i + 2, ("ops", ch, "cr8.xa", value), slots)
        elif t is O.Cr8Read:
            steps += [(_READ, op, APIC_TPR), (_READ_POST, op, i + 3), (_READ_POST, op, i + 3)]
            c._at(i + 1, ("ops", ch, "cr8r.x2"), slots)
            c._at(i + 2, ("ops", ch, "cr8r.xa"), slots)
        elif t is O.Cpuid or t is O.Rdtsc:
            steps += [(_VALUE, op), (_JUMP, i + 2)]
            c._at(i + 1, ("ops", ch, t.__name__), slots)
        elif t is O.Poll:
            off = REG_BY_NAME[op.reg]  # type: ignore[attr-defined]
            steps += [(_POLL, op, off), (_POLL_TEST, op, i, i + 3), (_POLL_TEST, op, i, i + 3)]
            c._at(i + 1, ("ops", ch, "poll.x2", off), slots)
            c._at(i + 2, ("ops", ch, "poll.xa", off), slots)
        elif t is O.Once:
            steps.append(None)  # type: ignore[arg-type]  # _ONCE, once the end is known
            _emit(c, op.ops, ch, slots)  # type: ignore[attr-defined]
            steps[i] = (_ONCE, op, i + 1, len(steps))
        elif t is O.StiShadow or t is O.HltCount:
            steps.append((_NOTE, op))
        elif t is O.Hypercall:
            steps += [(_HCALL, op), (_READ_POST, op, i + 2)]
            c._at(i + 1, ("ops", ch, "hypercall"), slots)
        elif t is O.MmioWrite:
            steps += [(_MMIOW, op), (_CHECK, op, i + 2)]
            c._at(i + 1, ("ops", ch, "mmio_write"), slots)
        elif t is O.MmioRead:
            steps += [(_MMIOR, op), (_READ_POST, op, i + 2)]
            c._at(i + 1, ("ops", ch, "mmio_read"), slots)
        else:  # pragma: no cover - the scenario checker rejects unknown ops
            raise TypeError(f"unknown op {op!r}")


def _compile(ops: tuple[O.Op, ...]) -> _Code:
    c = _Code("ops")
    _emit(c, ops, (), ())
    c.steps.append((_END,))
    return c


def _special(family: str, steps: list[tuple[Any, ...]], keys: dict[int, str]) -> _Code:
    c = _Code(family)
    c.steps = steps
    for pc, where in keys.items():
        c._at(pc, (family, where), ())
    return c


# Code without ops: the idle loop (HLT forever), a handler-less NMI, the default handler (EOI).
_IDLE_CODE = _special("idle", [(_IDLE,), (_IDLE,)], {1: "hlt"})
_NOTHING_CODE = _special("nothing", [(_END,)], {})
_DEFAULT_CODE = _special("default", [(_EOI, None, {}), (_END,), (_END,)], {1: "eoi.x2", 2: "eoi.xa"})

# Compiled op tuples, shared by the CPUs that run the same code (keyed by identity; the entry
# holds the tuple so that its id is not reused). Bounded: cleared when it grows large.
_COMPILED: dict[int, tuple[tuple[O.Op, ...], _Code]] = {}


def compiled(ops: tuple[O.Op, ...]) -> _Code:
    """The compiled form of an op tuple."""
    e = _COMPILED.get(id(ops))
    if e is not None and e[0] is ops:
        return e[1]
    if len(_COMPILED) > 4096:
        _COMPILED.clear()
    code = _compile(ops)
    _COMPILED[id(ops)] = (ops, code)
    return code


class _Frame:
    """One running piece of code on a CPU: the program (or idle loop) at the bottom, one handler
    per interrupt above it. ``pc`` is the next step, ``ctr`` the repeat counters, ``loc`` the
    current op's run-time locals, ``result`` the result of the last instruction retired,
    ``resume`` the rest of a ``Compute`` an interrupt cut short (fetched first when it resumes)."""

    __slots__ = ("code", "steps", "pc", "ctr", "loc", "saved_if", "kind", "result", "resume")

    def __init__(self, code: _Code, saved_if: bool, kind: str) -> None:
        self.code = code
        self.steps = code.steps
        self.pc = 0
        self.ctr: list[int] | None = [0] * code.nctr if code.nctr else None
        self.loc: Any = None
        self.saved_if = saved_if
        self.kind = kind       # "program", "idle", "irq", "nmi"
        self.result: Any = None
        self.resume: isa.Compute | None = None

    def position(self) -> tuple[Any, ...]:
        """Where this code is suspended, as plain data (for the explorer's state hash); a frame in
        the middle of a ``compute`` adds the cycles it has left."""
        key, slots, has_loc = self.code.keys[self.pc]
        ctr = self.ctr
        pos = (key, tuple(ctr[s] for s in slots) if ctr is not None else (), self.loc if has_loc else None)
        return pos if self.resume is None else (*pos, ("compute.rest", self.resume.cycles))


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
        self.hlt_count = 0                 # HLTs of the program and its handlers (hlt_count op)
        self._once_done: set[int] = set()  # ids of the once ops whose body has run
        self.finished = program is None    # main program done
        self._op_index: int | None = None
        self._pause = _PAUSE0              # the last PAUSE fetched (one per epoch: immutable)
        self._member = -1                  # index in shared.cpus (SharedMemory.join)
        self._spinning = False             # a PAUSE of a poll loop is in flight (SharedMemory.spinners)
        # What the next fetch must first undo: a PAUSE in flight, or the result an IRET's retire
        # wrote over (the interrupted code's own pending result, saved here).
        self._after: tuple[_Frame | None, Any] | None = None
        self._handler_code: dict[int, tuple[tuple[O.Op, ...], _Code]] | None = None  # vector -> (handler, code)
        self._spare: _Frame | None = None  # a returned handler's frame, reused by the next entry
        # An observer of the sends this CPU issues (navic.check.provenance): called with every
        # WRMSR / MMIO-write instruction as it is fetched, before the executor runs it.
        self.send_watch: Callable[[Insn], None] | None = None
        # ... and of the faults: called with this CPU when an instruction's fault is reported (its
        # frame and fetch point, :meth:`fetch_point`, still name that instruction then).
        self.fault_watch: Callable[[GuestCpu], None] | None = None
        if program is not None:
            self.frames: list[_Frame] = [_Frame(compiled(program.ops), False, "program")]
        else:
            self.frames = [_Frame(_IDLE_CODE, False, "idle")]

    # -- executor protocol -----------------------------------------------------------------
    def next_insn(self) -> Insn:  # noqa: C901 - the interpreter: one branch per step kind
        """The next instruction of the innermost running code: run its compiled steps from where
        it stopped (first handling the result of its last instruction) up to the next fetch."""
        after = self._after
        if after is not None:   # undo what the previous fetch left in force (see ``_after``)
            self._after = None
            if after[0] is not None:
                after[0].result = after[1]
            if self._spinning:   # the PAUSE fetched last has been executed: no longer spinning
                self._spinning = False
                del self.shared.spinners[self._member]  # type: ignore[union-attr]
        frames = self.frames
        f = frames[-1]
        rest = f.resume
        if rest is not None:   # the code was interrupted inside a compute: run the rest of it first
            f.resume = None
            return rest
        res = f.result
        f.result = None
        steps = f.steps
        pc = f.pc
        while True:
            s = steps[pc]
            k = s[0]
            if k == _CHECK:
                if res is not None and type(res) is Fault:
                    self._report(s[1], res)
                pc = s[2]
            elif k == _WS_TEST:
                needed, was_if = f.loc
                if self.handled.get(s[1], 0) < needed:
                    f.pc = s[2]
                    p = self._pause
                    if p.epoch != self.epoch:
                        p = self._pause = isa.Pause(self.epoch)
                    self._spin()
                    return p
                pc = s[3]
                if not was_if:
                    f.pc = pc
                    return isa.CLI
            elif k == _IPI:
                op = s[1]
                self._op_index = op.index
                to = op.to
                dest = self.apic_id_of(to) if to is not None else (op.dest or 0)
                f.loc = dest
                if self.x2apic:
                    clock = self.clock
                    if clock is not None:
                        self.ipi_sent_at = clock.now
                    cache = s[3]
                    insn = cache.get(dest)
                    if insn is None:
                        insn = cache[dest] = isa.Wrmsr(_X2APIC_ICR, ((dest & 0xFFFFFFFF) << 32) | s[2])
                    f.pc = pc + 1
                else:
                    base = self.apic_base
                    cache = s[4]
                    key = (base << 8) | (dest & 0xFF)
                    insn = cache.get(key)
                    if insn is None:
                        insn = cache[key] = isa.MmioWrite(base + APIC_ICR2, (dest & 0xFF) << 24)
                    f.pc = pc + 2
                watch = self.send_watch
                if watch is not None:
                    watch(insn)
                return insn
            elif k == _EOI:
                op = s[1]
                if op is not None:
                    self._op_index = op.index
                if self.x2apic:
                    insn = _EOI_X2
                    f.pc = pc + 1
                else:
                    base = self.apic_base
                    insn = s[2].get(base)
                    if insn is None:
                        insn = s[2][base] = isa.MmioWrite(base + APIC_EOI, 0)
                    f.pc = pc + 2
                watch = self.send_watch
                if watch is not None:
                    watch(insn)
                return insn
            elif k == _END:
                if len(frames) == 1:
                    self.finished = True
                    f = frames[0] = _Frame(_IDLE_CODE, False, "idle")
                    steps = f.steps
                    pc = 0
                    res = None
                    continue
                # A handler returns: IRET restores IF (and ends NMI blocking). The executor retires
                # the IRET like any instruction; the interrupted code's pending result (an
                # instruction retired just before the interrupt) is kept aside from that retire.
                frames.pop()
                self._spare = f
                self.IF = f.saved_if
                if f.kind == "nmi":
                    self.nmi_blocked = False
                under = frames[-1]
                self._after = (under, under.result)
                return isa.IRET
            elif k == _OPFETCH:
                self._op_index = s[3].index
                f.pc = s[2]
                return s[1]
            elif k == _FETCH:
                f.pc = s[2]
                return s[1]
            elif k == _WS_BEGIN:
                op = s[1]
                self._op_index = op.index
                was_if = self.IF
                f.loc = (self._consumed.get(op.vector, 0) + op.count, was_if)
                pc += 1
                if not was_if:
                    f.pc = pc
                    return isa.STI
            elif k == _WAIT_END:
                self._consumed[s[1]] = f.loc[0]
                pc = s[2]
            elif k == _R_NEXT:
                ctr = f.ctr
                n = ctr[s[2]] + 1  # type: ignore[index]
                if n < s[1]:
                    ctr[s[2]] = n  # type: ignore[index]
                    pc = s[3]
                else:
                    pc = s[4]
            elif k == _R_BEGIN:
                op = s[1]
                self._op_index = op.index
                if op.times > 0:
                    f.ctr[s[2]] = 0  # type: ignore[index]
                    pc = s[3]
                else:
                    pc = s[4]
            elif k == _WH_BEGIN:
                op = s[1]
                self._op_index = op.index
                was_if = self.IF
                f.loc = (self._consumed.get(op.vector, 0) + op.count, was_if)
                pc += 1
                if was_if:
                    f.pc = pc
                    return isa.CLI
            elif k == _WH_TEST:
                needed, was_if = f.loc
                if self.handled.get(s[1], 0) < needed:
                    f.pc = s[2]
                    self.hlt_count += 1   # STI; HLT: the HLT in STI's shadow comes next
                    return isa.STI
                pc = s[3]
                if was_if:
                    f.pc = pc
                    return isa.STI
            elif k == _IPI_XA2:
                if res is not None and type(res) is Fault:
                    self._report(s[1], res)
                    pc = s[4]
                    continue
                # The ICR2 write's result is one of the op's locals here (the explorer saw it).
                f.loc = (f.loc, res if type(res) in _PLAIN else _OTHER)
                clock = self.clock
                if clock is not None:
                    self.ipi_sent_at = clock.now
                base = self.apic_base
                insn = s[3].get(base)
                if insn is None:
                    insn = s[3][base] = isa.MmioWrite(base + APIC_ICR, s[2])
                f.pc = pc + 1
                watch = self.send_watch
                if watch is not None:
                    watch(insn)
                return insn
            elif k == _JUMP:
                pc = s[1]
            elif k == _IDLE:
                f.pc = 1
                return isa.HLT
            else:
                insn = self._rare_step(f, s, k, pc, res)
                if insn is None:
                    pc = f.pc
                    continue
                return insn

    def _rare_step(self, f: _Frame, s: tuple[Any, ...], k: int, pc: int, res: Any) -> Insn | None:  # noqa: C901
        """The steps of the less frequent ops: returns the instruction fetched (having set
        ``f.pc`` to its continuation), or None with ``f.pc`` set to the step to run next."""
        op = s[1]
        if k == _AW_BEGIN:
            self._op_index = op.index
            was_if = self.IF
            f.loc = (self._awaited.get(op.var, 0) + op.count, was_if)
            f.pc = pc + 1
            return None if was_if else isa.STI
        if k == _AW_TEST:
            needed, was_if = f.loc
            shared = self.shared
            if shared is not None and shared.vars.get(op.var, 0) < needed:
                f.pc = s[2]
                if op.how == "hlt":
                    self.hlt_count += 1
                    return isa.HLT
                self._spin()
                return isa.Pause(self.epoch)
            f.pc = s[3]
            return None if was_if else isa.CLI
        if k == _AW_END:
            self._awaited[op.var] = f.loc[0]
            f.pc = s[2]
            return None
        if k == _ADD:
            self._op_index = op.index
            f.pc = pc + 1
            return isa.Compute(self.ATOMIC_CYCLES, atomic=True)   # one instruction: no boundary inside
        if k == _ADD_POST:
            if self.shared is not None:
                self.shared.add(op.var, op.value)
            f.pc = s[2]
            return None
        if k == _READ_POST or k == _WRMSR_POST:
            if res is not None and type(res) is Fault:
                self._report(op, res)
            elif k == _READ_POST:
                if op.into:
                    self.reads[op.into] = (res >> 4) & 0xF if type(op) is O.Cr8Read else res
            elif op.msr == MSR_IA32_APICBASE:
                self._track_apic_base(op.value)
            f.pc = s[2]
            return None
        if k == _POLL_TEST:
            if res is not None and type(res) is Fault:
                self._report(op, res)
                f.pc = s[3]
                return None
            if op.into:
                self.reads[op.into] = res
            f.pc = s[3] if (res & op.mask) == op.value else s[2]
            return None
        if k == _ONCE:
            self._op_index = op.index
            done = self._once_done
            if id(op) in done:
                f.pc = s[3]
            else:
                done.add(id(op))
                f.pc = s[2]
            return None
        if k == _NOTE:
            self._op_index = op.index
            if type(op) is O.StiShadow:   # a counter of the handler runs that hit the shadow
                self.reads[op.into] = self.reads.get(op.into, 0) + self._after_sti()
            else:
                self.reads[op.into] = self.hlt_count
            f.pc = pc + 1
            return None
        self._op_index = op.index
        insn: Insn
        if k == _HLT_OP:
            self.hlt_count += 1
            f.pc = pc + 1
            return isa.HLT
        if k == _VALUE:
            f.pc = pc + 1
            if type(op) is O.Cpuid:
                apic_id = self.apic_id_of(self.program.vcpu) if self.program is not None else 0
                value = apic_id if op.leaf == 0xB else apic_id & 0xFF
                cycles = self.CPUID_CYCLES
            else:   # rdtsc, rdmsr 10h
                value = self.clock.now if self.clock is not None else 0
                cycles = self.RDTSC_CYCLES
            if op.into:
                self.reads[op.into] = value
            return isa.Compute(cycles)
        if k == _POLL:
            f.pc = pc + 1 if self.x2apic else pc + 2
            return isa.Rdmsr(X2APIC_MSR_BASE + (s[2] >> 4)) if self.x2apic else isa.MmioRead(self.apic_base + s[2])
        if k == _TSC:
            now = self.clock.now if self.clock is not None else 0
            f.loc = now
            insn = isa.Wrmsr(0x6E0, (now + op.delta) & 0xFFFF_FFFF_FFFF_FFFF)   # u64 arithmetic wraps
            f.pc = pc + 1
        elif k == _WRITE:
            if self.x2apic:
                insn = isa.Wrmsr(X2APIC_MSR_BASE + (s[2] >> 4), s[3])
                f.pc = pc + 1
            else:
                insn = isa.MmioWrite(self.apic_base + s[2], s[3] & 0xFFFFFFFF)
                f.pc = pc + 2
        elif k == _READ:
            f.pc = pc + 1 if self.x2apic else pc + 2
            return isa.Rdmsr(X2APIC_MSR_BASE + (s[2] >> 4)) if self.x2apic else isa.MmioRead(self.apic_base + s[2])
        elif k == _WRMSR_OP:
            insn = s[2]
            f.pc = pc + 1
        elif k == _MMIOW:
            insn = isa.MmioWrite(self.apic_base + op.offset, op.value)
            f.pc = pc + 1
        elif k == _HCALL:
            if self.clock is not None:
                self.ipi_sent_at = self.clock.now   # a PV send-IPI's latency counts from here
            insn = isa.Hypercall(op.nr, op.a0, op.a1, op.a2, op.a3)
            f.pc = pc + 1
        elif k == _MMIOR:
            f.pc = pc + 1
            return isa.MmioRead(self.apic_base + op.offset)
        else:  # pragma: no cover
            raise AssertionError(f"unknown step {s!r}")
        watch = self.send_watch
        if watch is not None:
            watch(insn)
        return insn

    def _spin(self) -> None:
        """A poll loop fetches a PAUSE: stores to shared memory must reach this CPU until its next
        fetch (SharedMemory.add)."""
        shared = self.shared
        if shared is not None and self._member >= 0:
            self._spinning = True
            self._after = (None, None)
            shared.spinners[self._member] = self


    def fetch_point(self) -> tuple[Any, int]:
        """Where the innermost code stands: (its frame, its continuation pc). From an instruction's
        fetch until its result is handled this names that instruction (an observer's key)."""
        f = self.frames[-1]
        return (f, f.pc)

    def _after_sti(self) -> int:
        """1 if the code this handler interrupted stopped right after an ``sti`` op (the event was
        taken at the boundary that STI's interrupt shadow covers), else 0."""
        if len(self.frames) < 2:
            return 0
        f = self.frames[-2]
        pc = f.pc
        prev = f.steps[pc - 1] if pc > 0 else None
        return int(prev is not None and prev[0] == _OPFETCH and prev[1] is isa.STI and prev[2] == pc)

    def _report(self, op: O.Op, res: Fault) -> None:
        """A guest-visible exception raised by op's instruction: reported with the op."""
        if self.fault_watch is not None:
            self.fault_watch(self)
        self._on_error(self, op.index, OP_NAMES.get(type(op), type(op).__name__.lower()), str(res))

    def retire(self, result: Any) -> None:
        """Hand the result of the instruction just executed back to the code that issued it."""
        self.frames[-1].result = result

    def suspend(self, rest: isa.Compute) -> None:
        """The ``Compute`` just fetched stopped at an instruction boundary with ``rest`` still to
        run (an interrupt or exit is about to be taken there, :func:`navic.hw.isa.run_compute`):
        the saved instruction pointer points into it (SDM vol. 3 §6.6), so the code fetches
        ``rest`` first when it resumes."""
        self.frames[-1].resume = rest

    def enter_handler(self, vector: int, kind: str) -> None:
        """Interrupt/NMI entry at an instruction boundary: IF <- 0, push the handler frame."""
        saved = self.IF
        self.IF = False
        program = self.program
        if kind == "nmi":
            self.nmi_blocked = True
            vector_code = NMI_VECTOR
            fkind = "nmi"
        else:
            vector_code = vector
            fkind = "irq"
        handler = program.handlers.get(vector_code) if program is not None else None
        if handler is None:
            code = _NOTHING_CODE if fkind == "nmi" else _DEFAULT_CODE
        else:
            cache = self._handler_code
            if cache is None:
                cache = self._handler_code = {}
            e = cache.get(vector_code)
            if e is None or e[0] is not handler:
                e = cache[vector_code] = (handler, compiled(handler))
            code = e[1]
        # The frame of the last handler that returned is reused (same as a new _Frame).
        f = self._spare
        if f is None:
            f = _Frame(code, saved, fkind)
        else:
            self._spare = None
            f.code = code
            f.steps = code.steps
            f.pc = 0
            f.ctr = [0] * code.nctr if code.nctr else None
            f.loc = None
            f.saved_if = saved
            f.kind = fkind
            f.result = None
            f.resume = None
        self.frames.append(f)
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

    def _track_apic_base(self, value: int) -> None:
        """The guest OS knows which interface it switched its APIC to (SDM §11.12.5)."""
        self.x2apic = bool(value & (1 << 10)) and bool(value & (1 << 11))
        self.apic_base = value & 0xFFFFF000

    ATOMIC_CYCLES = 40  # a LOCK-prefixed add on a shared line (assumption, see docs/model.md)
    CPUID_CYCLES = 100  # CPUID natively (assumption; its exit under KVM is not modelled, docs/model.md)
    RDTSC_CYCLES = 25   # RDTSC (assumption, docs/model.md)
