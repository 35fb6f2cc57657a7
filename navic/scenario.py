"""Scenario files: TOML text -> checked :class:`navic.config.Scenario`.

This module is the whole TOML contract (see docs/scenarios.md). Every key of every section and of
every op is declared once in the tables below (:data:`TOP_KEYS`, :data:`SECTION_KEYS`,
:data:`DEVICE_KEYS`, :data:`PROGRAM_KEYS`, :data:`OP_SPECS`); adding a key is one line in a
table plus, if the key has cross-field rules, a line in the section's post-check.

Every problem is reported as a :class:`ScenarioError` whose ``str()`` is one line::

    bad.toml: program[1].ops[3].vector: expected an integer 0..255, got 300
    bad.toml:4:7: invalid TOML: Invalid value

Key paths name TOML keys with 0-based array indices (``program[0]`` is the first
``[[program]]``; ``ops[2]`` the third op; ``handlers.0x40[1]`` the second op of vector 40h's
handler).
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from navic.config import (
    APIC_MODES,
    CPU_MODELS,
    VIRT_MODES,
    DeviceConfig,
    HostConfig,
    L0Config,
    Scenario,
    SetLapicConfig,
    VmConfig,
)
from navic.guest.ops import (
    DELIVERY_MODES,
    DEST_MODES,
    SHORTHANDS,
    TRIGGERS,
    Add,
    Await,
    Cli,
    Compute,
    Cpuid,
    Cr8Read,
    Cr8Write,
    Eoi,
    Hlt,
    HltCount,
    Hypercall,
    Ipi,
    MmioRead,
    MmioWrite,
    Once,
    Op,
    Poll,
    Program,
    Rdmsr,
    Rdtsc,
    Read,
    Repeat,
    Sti,
    StiShadow,
    TscDeadline,
    Wait,
    Write,
    Wrmsr,
)

__all__ = [
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
    "REGISTER_OFFSETS",
    "REGISTER_ALIASES",
    "REGISTER_NAMES",
    "canonical_register",
    "OP_NAMES",
    "MAX_VCPUS",
]

U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
MAX_VCPUS = 4096
MAX_PCPUS = 4096
WAIT_HOWS = ("spin", "hlt")
NESTED_APICV = ("none", "shadow", "dummy", "shadow-x2avic", "runcache")
SHADOW_VARIANTS = ("navic", "rfc-v3")

# --------------------------------------------------------------------------------------------
# APIC register names accepted by `read` / `write` (offsets in the xAPIC MMIO page, SDM vol. 3
# table 11-1; the x2APIC MSR is 800h + offset/10h).
# --------------------------------------------------------------------------------------------
REGISTER_OFFSETS: dict[str, int] = {
    "ID": 0x020,
    "VER": 0x030,
    "TPR": 0x080,
    "APR": 0x090,
    "PPR": 0x0A0,
    "EOI": 0x0B0,
    "RRD": 0x0C0,
    "LDR": 0x0D0,
    "DFR": 0x0E0,
    "SVR": 0x0F0,
    **{f"ISR{i}": 0x100 + 0x10 * i for i in range(8)},
    **{f"TMR{i}": 0x180 + 0x10 * i for i in range(8)},
    **{f"IRR{i}": 0x200 + 0x10 * i for i in range(8)},
    "ESR": 0x280,
    "ICR": 0x300,
    "ICR2": 0x310,
    "LVT_TIMER": 0x320,
    "LVT_THERMAL": 0x330,
    "LVT_PERF": 0x340,
    "LVT_LINT0": 0x350,
    "LVT_LINT1": 0x360,
    "LVT_ERROR": 0x370,
    "TIMER_INITIAL": 0x380,
    "TIMER_CURRENT": 0x390,
    "TIMER_DIVIDE": 0x3E0,
    "SELF_IPI": 0x3F0,
}
REGISTER_ALIASES: dict[str, str] = {"SPIV": "SVR", "ICR_LO": "ICR", "ICR_HI": "ICR2"}


def _register_table() -> dict[str, str]:
    """Accepted spelling (upper case) -> name stored in the op.

    Our own list is always accepted. When :mod:`navic.apic.registers` provides ``REG_BY_NAME``,
    its names are accepted too, and a name it knows is stored as written (so the APIC model can
    look it up directly); our aliases are stored under their canonical name."""
    table = {name: name for name in REGISTER_OFFSETS}
    table.update(REGISTER_ALIASES)
    try:
        from navic.apic.registers import REG_BY_NAME  # type: ignore[import-not-found]
    except ImportError:
        return table
    for name in REG_BY_NAME:
        if isinstance(name, str):
            table[name.upper()] = name
    return table


_REGISTERS = _register_table()
REGISTER_NAMES: tuple[str, ...] = tuple(_REGISTERS)


def canonical_register(name: str) -> str | None:
    """The stored name for a register spelling (case-insensitive), or None if unknown."""
    return _REGISTERS.get(name.upper())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ScenarioError(Exception):
    """A scenario file problem. ``str()`` is one line: ``FILE: key.path: message``."""

    def __init__(self, source: str, path: str, message: str, *, location: str | None = None):
        self.source = source
        self.path = path
        self.message = " ".join(str(message).split())  # always one line
        self.location = location  # "LINE:COL" for TOML syntax errors
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.location is not None:
            return f"{self.source}:{self.location}: {self.message}"
        if self.path:
            return f"{self.source}: {self.path}: {self.message}"
        return f"{self.source}: {self.message}"


def describe(value: Any) -> str:
    """How a found value is shown in an error message (TOML-ish, one line, bounded length)."""
    if value is _MISSING:
        return "nothing (the key is missing)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return str(value) if -0x10000 < value < 0x10000 else f"{value} ({value:#x})"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


@dataclass
class _Ctx:
    """What a checker may need besides the value: where errors go and the program's VM."""

    source: str
    vm: VmConfig | None = None
    vm_name: str = ""

    def fail(self, path: str, expected: str, value: Any, hint: str = "") -> ScenarioError:
        return ScenarioError(self.source, path, f"expected {expected}, got {describe(value)}{hint}")


def _quoted_key(key: str) -> str:
    """A key as TOML writes it: bare if it can be, else quoted (so "" and "a.b" stay visible)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return '"' + key.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------------------------
# Checkers: value -> converted value, or ScenarioError. Each has an `expected` phrase.
# --------------------------------------------------------------------------------------------
class Check:
    """Base checker: accepts any value unchanged (a later step checks it, e.g. handlers)."""

    expected = "a value"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> Any:
        return value


def _int_hint(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"\s*(0[xX][0-9a-fA-F_]+|-?[0-9_]+)\s*", value):
        return f" (a string; write {value.strip()} without quotes)"
    return ""


class Int(Check):
    def __init__(self, lo: int, hi: int | None = None, what: str = "an integer"):
        self.lo, self.hi = lo, hi
        if hi is None:
            self.expected = f"{what} >= {lo}"
        elif hi >= 0x10000:
            self.expected = f"{what} {lo}..{hi:#x}"
        else:
            self.expected = f"{what} {lo}..{hi}"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(path, self.expected, value, _int_hint(value))
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise ctx.fail(path, self.expected, value)
        return value


class Number(Check):
    """An integer or float (never a boolean), finite, > lo (or >= lo with inclusive=True)."""

    def __init__(self, lo: float, *, inclusive: bool):
        self.lo, self.inclusive = lo, inclusive
        self.expected = f"a number {'>=' if inclusive else '>'} {lo:g}"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.fail(path, self.expected, value, _int_hint(value))
        if not math.isfinite(value) or value < self.lo or (not self.inclusive and value == self.lo):
            raise ctx.fail(path, self.expected, value)
        return float(value)


class Inhibits(Check):
    """An array of APICv inhibit reason names to raise at start (reasons navic raises by itself
    are not accepted here)."""

    FORCEABLE = ("ABSENT", "HYPERV", "BLOCKIRQ", "IRQWIN", "PIT_REINJ", "SEV", "DISABLED")
    expected = "an array of inhibit reason names (" + ", ".join(f'"{r}"' for r in FORCEABLE) + ")"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ctx.fail(path, self.expected, value)
        out = []
        for i, item in enumerate(value):
            if item not in self.FORCEABLE:
                raise ctx.fail(f"{path}[{i}]", "one of " + ", ".join(f'"{r}"' for r in self.FORCEABLE), item)
            if item in out:
                raise ctx.fail(f"{path}[{i}]", "each reason listed once", item, " (a duplicate)")
            out.append(item)
        return tuple(out)


class Probability(Check):
    expected = "a number 0..1"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ctx.fail(path, self.expected, value)
        return float(value)


class Bool(Check):
    expected = "true or false"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> bool:
        if not isinstance(value, bool):
            hint = ""
            if isinstance(value, str) and value.lower() in ("true", "false"):
                hint = f" (a string; write {value.lower()} without quotes)"
            raise ctx.fail(path, self.expected, value, hint)
        return value


def _one_of(values: Sequence[Any]) -> str:
    shown = [('"' + v + '"') if isinstance(v, str) else str(v).lower() for v in values]
    return "one of " + ", ".join(shown)


class Choice(Check):
    """One of fixed values (strings, or `true`/`false`). Strings are matched case-sensitively."""

    def __init__(self, values: Sequence[Any]):
        self.values = tuple(values)
        self.expected = _one_of(self.values)

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> Any:
        for v in self.values:
            if type(v) is type(value) and v == value:
                return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [v for v in self.values if isinstance(v, str)], 1)
            if close:
                hint = f' (did you mean "{close[0]}"?)'
        raise ctx.fail(path, self.expected, value, hint)


class Str(Check):
    def __init__(self, pattern: str | None = None, expected: str = "a non-empty string"):
        self.pattern = re.compile(pattern) if pattern else None
        self.expected = expected

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ctx.fail(path, self.expected, value)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ctx.fail(path, self.expected, value)
        return value


class Errata(Check):
    expected = '"auto" or an array of erratum numbers as strings (e.g. ["1235"])'

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> str | tuple[str, ...]:
        if value == "auto":
            return "auto"
        if not isinstance(value, list):
            raise ctx.fail(path, self.expected, value)
        out: list[str] = []
        for i, item in enumerate(value):
            if isinstance(item, int) and not isinstance(item, bool):
                raise ctx.fail(f"{path}[{i}]", "an erratum number as a string", item,
                               f' (write "{item}")')
            if not isinstance(item, str) or not re.fullmatch(r"[0-9A-Za-z_-]+", item):
                raise ctx.fail(f"{path}[{i}]", 'an erratum number as a string (e.g. "1235")', item)
            if item in out:
                raise ctx.fail(f"{path}[{i}]", "each erratum listed once", item, " (a duplicate)")
            out.append(item)
        return tuple(out)


class ApicIds(Check):
    expected = "an array of distinct integer APIC IDs 0..0xfffffffe"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise ctx.fail(path, self.expected, value)
        ids: list[int] = []
        seen: dict[int, int] = {}   # APIC ID -> index (a list search made 4096 IDs take seconds)
        item_check = Int(0, U32 - 1, "an APIC ID")
        for i, item in enumerate(value):
            apic_id = item_check(item, ctx, f"{path}[{i}]")
            if apic_id in seen:
                raise ctx.fail(f"{path}[{i}]", "a unique APIC ID", item,
                               f" (also apic_ids[{seen[apic_id]}])")
            seen[apic_id] = i
            ids.append(apic_id)
        return tuple(ids)


class Vcpu(Check):
    """`to` of an ipi: a vCPU index of the program's VM."""

    expected = "a vCPU index"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> int:
        vcpus = ctx.vm.vcpus if ctx.vm is not None else MAX_VCPUS
        where = f" ({ctx.vm_name} has {vcpus} vCPU{'s' if vcpus != 1 else ''})" if ctx.vm else ""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vcpus:
            raise ctx.fail(path, f"a vCPU index 0..{vcpus - 1}{where}", value, _int_hint(value))
        return value


class Var(Check):
    expected = "a variable name (letters, digits, _ . -; not starting with a digit)"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", value):
            raise ctx.fail(path, self.expected, value)
        return value


class Reg(Check):
    expected = "an APIC register name (ID, VER, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR, ISR0..ISR7, ...)"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> str:
        name = canonical_register(value) if isinstance(value, str) else None
        if name is None:
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value.upper(), REGISTER_NAMES, 1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
            valid = ", ".join(REGISTER_NAMES)
            raise ctx.fail(path, f"an APIC register name, one of {valid}", value, hint)
        return name


class MmioOffset(Check):
    expected = "a 4-byte-aligned offset 0..0xffc"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFC:
            raise ctx.fail(path, self.expected, value, _int_hint(value))
        if value % 4:
            raise ctx.fail(path, self.expected, value, " (not a multiple of 4)")
        return value


class OpList(Check):
    """An array of op tables (the `ops` of a program, a handler or a `repeat`)."""

    def __init__(self, non_empty: bool = False):
        self.non_empty = non_empty
        self.expected = "a non-empty array of op tables" if non_empty else "an array of op tables"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> tuple[Op, ...]:
        if not isinstance(value, list) or (self.non_empty and not value):
            raise ctx.fail(path, self.expected, value)
        return tuple(_parse_op(item, i, ctx, f"{path}[{i}]") for i, item in enumerate(value))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """One TOML key: its checker, whether it is required, and what it means (docs/tests use it).

    ``field`` is the dataclass attribute it fills (defaults to ``name``). Absent optional keys are
    not passed to the dataclass, so defaults live in one place: navic/config.py and
    navic/guest/ops.py."""

    name: str
    check: Check
    required: bool = False
    doc: str = ""
    field: str | None = None


TOP_KEYS: tuple[Key, ...] = (
    Key("name", Str(), True, "scenario name, echoed in the result"),
    Key("seed", Int(0, U64), doc="seed of the simulator's choices (ties, jitter); default 1"),
    Key("max_time_us", Number(0, inclusive=False),
        doc="stop when all programs end or at this simulated time; default 10000"),
)
# Sub-tables ([host], [l0], ...) and arrays of tables ([[device]], [[program]]) at top level.
TOP_TABLES = ("host", "l0", "l1", "l2", "workload")
TOP_ARRAYS = ("device", "program", "set_lapic")

_VM_KEYS_COMMON: tuple[Key, ...] = (
    Key("vcpus", Int(1, MAX_VCPUS), doc="number of vCPUs; default 4"),
    Key("apic", Choice(APIC_MODES), doc='APIC mode every vCPU starts in; default "x2apic"'),
    Key("apic_ids", ApicIds(), doc="explicit APIC ID per vCPU (length = vcpus); default = vCPU index"),
)

SECTION_KEYS: dict[str, tuple[Key, ...]] = {
    "host": (
        Key("cpu", Choice(CPU_MODELS), doc='CPU model; default "zen4"'),
        Key("pcpus", Int(1, MAX_PCPUS), doc="physical CPUs; default 4"),
        Key("virt", Choice(VIRT_MODES), doc='"none" (bare metal) or "kvm"; default "kvm"'),
    ),
    "l0": (
        Key("apicv", Bool(), doc="kvm_intel enable_apicv (AMD: false turns AVIC off); default true"),
        Key("avic", Choice(("auto", True, False)),
            doc='kvm_amd avic: "auto" (default: on for Zen4+ with x2AVIC only), true, false'),
        Key("force_avic", Bool(), doc="kvm_amd force_avic; default false"),
        Key("ipiv", Choice(("auto", True, False)), doc='kvm_intel enable_ipiv: "auto", true, false'),
        Key("halt_poll_ns", Int(0, 10**10), doc="halt_poll_ns; default 200000"),
        Key("halt_poll_ns_shrink", Int(0, 1000),
            doc="kvm halt_poll_ns_shrink: divisor of a shrinking poll window, 0 resets it; default 2"),
        Key("timeslice_us", Int(1, 10**9), doc="L0 scheduler slice; default 3000"),
        Key("posted_timer", Bool(),
            doc="SVM: post the APIC timer interrupt to a running vCPU (kvm_use_posted_timer_interrupt); default false"),
        Key("errata", Errata(), doc='"auto" or a list of erratum numbers as strings'),
        Key("nested_apicv", Choice(NESTED_APICV),
            doc='"none", "shadow", "dummy", "shadow-x2avic" or "runcache"; default "none"'),
        Key("doorbell_strict", Bool(),
            doc="RFC v3 avic_doorbell_strict: false = only blocking clears IsRunning; default true"),
        Key("shadow_variant", Choice(SHADOW_VARIANTS),
            doc='shadow designs: "navic" (RFC v3, two bugs fixed) or "rfc-v3" (as posted); default "navic"'),
        Key("erratum_1235_p", Probability(),
            doc="probability that a hardware IsRunning read inside the erratum window is stale; default 0.1"),
        Key("inhibits", Inhibits(),
            doc="APICv inhibit reasons to raise at start, for causes navic does not model (no PIC/PIT/Hyper-V)"),
        Key("erratum_1235_window", Int(0, 1_000_000),
            doc="erratum 1235 window, in hardware IPI evaluations after IsRunning was cleared; default 2"),
    ),
    "l1": _VM_KEYS_COMMON + (
        Key("apicv_for_l2", Bool(), doc="L1's wish to give L2 APIC virtualization; default true"),
        Key("timeslice_us", Int(1, 10**9), doc="L1's scheduler slice; default 3000"),
        Key("apic_bus_cycles_ns", Int(1, 10**6, "an integer"),
            doc="KVM_CAP_X86_APIC_BUS_CYCLES_NS: ns per APIC timer bus cycle; default: the TIMER_TICK cost"),
    ),
    "l2": _VM_KEYS_COMMON,
}

_CPU_NAME = r"l[12]\.[0-9]+"
DEVICE_KEYS: tuple[Key, ...] = (
    Key("vector", Int(0, 255, "an integer"), True, "vector raised"),
    Key("target", Str(_CPU_NAME, 'a CPU name "l1.N" or "l2.N"'), True, "receiving vCPU"),
    Key("period_us", Number(0, inclusive=False), True, "interval between interrupts (µs)"),
    Key("count", Int(1), doc="number of interrupts; default unlimited"),
    Key("start_us", Number(0, inclusive=True), doc="time of the first interrupt; default 0"),
)

class LapicRegs(Check):
    """``[[set_lapic]].regs``: a table of register name -> 32-bit value (the settable state)."""

    expected = "a table of register names -> 32-bit values"

    def __call__(self, value: Any, ctx: _Ctx, path: str) -> tuple[tuple[str, int], ...]:
        from navic.hv.lapic_state import SETTABLE

        table = _table(value, ctx, path, self.expected)
        out = []
        for name, v in table.items():
            if name.upper() not in SETTABLE:
                raise ctx.fail(_join(path, name), f"a settable register, one of {', '.join(sorted(SETTABLE))}", name)
            out.append((name.upper(), Int(0, U32, "a 32-bit integer")(v, ctx, _join(path, name))))
        if not out:
            raise ctx.fail(path, "at least one register", {})
        return tuple(out)


SET_LAPIC_KEYS: tuple[Key, ...] = (
    Key("cpu", Str(_CPU_NAME, 'a CPU name "l1.N" or "l2.N"'), True, "the vCPU whose APIC is set"),
    Key("regs", LapicRegs(), True, "registers replaced (name -> value)"),
    Key("at_us", Number(0, inclusive=True), doc="when the host sets them; default 0 (before the vCPUs run)"),
)

PROGRAM_KEYS: tuple[Key, ...] = (
    Key("cpu", Str(_CPU_NAME, 'a CPU name "l1.N" or "l2.N"'), True, "the vCPU this program runs on"),
    Key("ops", OpList(), True, "the ops, run in order"),
    Key("handlers", Check(), doc="per-vector handler ops (table: vector -> array of ops)"),
)

_VECTOR = Int(0, 255, "an integer")
_VALUE64 = Int(0, U64, "an integer")


@dataclass(frozen=True)
class OpSpec:
    cls: type[Op]
    keys: tuple[Key, ...] = ()
    doc: str = ""
    post: Callable[[dict[str, Any], _Ctx, str], None] | None = None


def _ipi_post(args: dict[str, Any], ctx: _Ctx, path: str) -> None:
    shorthand = args.get("shorthand", "none")
    mode = args.get("mode", "fixed")
    has_to, has_dest = "to" in args, "dest" in args
    if shorthand != "none":
        if has_to or has_dest:
            key = "to" if has_to else "dest"
            raise ScenarioError(
                ctx.source, _join(path, key),
                f'expected neither "to" nor "dest" with shorthand = "{shorthand}", got {key} = '
                f"{describe(args[key])}")
    elif has_to and has_dest:
        raise ScenarioError(ctx.source, _join(path, "dest"),
                            'expected exactly one of "to" and "dest", got both')
    elif not has_to and not has_dest:
        raise ScenarioError(ctx.source, path,
                            'expected exactly one of "to" (vCPU index) and "dest" (destination field) '
                            '(or a shorthand other than "none"), got neither')
    if has_to and args.get("dest_mode", "physical") == "logical":
        raise ScenarioError(ctx.source, _join(path, "to"),
                            f'expected "dest" (a logical destination) with dest_mode = "logical", '
                            f"got to = {describe(args['to'])}")
    if "vector" not in args:
        if mode in ("fixed", "lowest", "sipi"):
            raise ScenarioError(ctx.source, _join(path, "vector"),
                                f'expected an integer 0..255 (required for mode = "{mode}"), '
                                f"got {describe(_MISSING)}")
        args["vector"] = 0


OP_SPECS: dict[str, OpSpec] = {
    "sti": OpSpec(Sti, doc="set IF (open interrupts)"),
    "cli": OpSpec(Cli, doc="clear IF"),
    "hlt": OpSpec(Hlt, doc="halt until an interrupt (NMI/INIT also wake with IF=0)"),
    "eoi": OpSpec(Eoi, doc="write the EOI register"),
    "ipi": OpSpec(Ipi, (
        Key("vector", _VECTOR, doc="vector (required for fixed, lowest, sipi; else default 0)"),
        Key("to", Vcpu(), doc="vCPU index of the same VM (resolved to its APIC ID)"),
        Key("dest", Int(0, U32, "an integer"), doc="raw destination field"),
        Key("mode", Choice(tuple(DELIVERY_MODES)), doc='delivery mode; default "fixed"'),
        Key("dest_mode", Choice(tuple(DEST_MODES)), doc='"physical" (default) or "logical"'),
        Key("trigger", Choice(tuple(TRIGGERS)), doc='"edge" (default) or "level"'),
        Key("level", Int(0, 1, "an integer"), doc="ICR level bit; default 1 (0 = INIT de-assert)"),
        Key("shorthand", Choice(tuple(SHORTHANDS)), doc='"none" (default), "self", "all", "others"'),
    ), "write the ICR (send an IPI)", _ipi_post),
    "write": OpSpec(Write, (
        Key("reg", Reg(), True, "register name"),
        Key("value", _VALUE64, True, "value written"),
    ), "write an APIC register (MMIO in xAPIC mode, MSR in x2APIC mode)"),
    "read": OpSpec(Read, (
        Key("reg", Reg(), True, "register name"),
        Key("into", Var(), doc="variable that receives the value (in the result's reads)"),
    ), "read an APIC register"),
    "wrmsr": OpSpec(Wrmsr, (
        Key("msr", Int(0, U32, "an MSR number"), True, "MSR index"),
        Key("value", _VALUE64, True, "64-bit value"),
    ), "WRMSR"),
    "rdmsr": OpSpec(Rdmsr, (
        Key("msr", Int(0, U32, "an MSR number"), True, "MSR index"),
        Key("into", Var(), doc="variable that receives the value"),
    ), "RDMSR"),
    "mmio_write": OpSpec(MmioWrite, (
        Key("offset", MmioOffset(), True, "offset in the APIC page"),
        Key("value", Int(0, U32, "a 32-bit integer"), True, "32-bit value"),
    ), "32-bit store into the APIC MMIO page"),
    "mmio_read": OpSpec(MmioRead, (
        Key("offset", MmioOffset(), True, "offset in the APIC page"),
        Key("into", Var(), doc="variable that receives the value"),
    ), "32-bit load from the APIC MMIO page"),
    "wait": OpSpec(Wait, (
        Key("vector", _VECTOR, True, "vector whose handler runs are consumed"),
        Key("count", Int(1), doc="handler runs to consume; default 1"),
        Key("how", Choice(WAIT_HOWS), doc='"spin" (default) or "hlt"'),
    ), "consume handler runs of a vector (semaphore)"),
    "add": OpSpec(Add, (
        Key("var", Var(), True, "VM-shared memory variable"),
        Key("value", Int(-(2**31), 2**31 - 1, "an integer"), doc="amount added; default 1"),
    ), "atomically add to a variable shared by the VM's CPUs (a memory flag, no interrupt)"),
    "await": OpSpec(Await, (
        Key("var", Var(), True, "VM-shared memory variable"),
        Key("count", Int(1), doc="growth to wait for since this CPU's last await on it; default 1"),
        Key("how", Choice(WAIT_HOWS), doc='"spin" (default) or "hlt" between interrupts'),
    ), "spin until a shared variable has grown by count (memory handshake)"),
    "tsc_deadline": OpSpec(TscDeadline, (
        Key("delta", Int(0, U64, "an integer"), True, "cycles from now"),
    ), "arm the TSC-deadline timer delta cycles from now (WRMSR 0x6E0 with rdtsc + delta)"),
    "compute": OpSpec(Compute, (
        Key("cycles", Int(0, U64, "an integer"), True, "busy cycles"),
    ), "busy work for some cycles"),
    "repeat": OpSpec(Repeat, (
        Key("times", Int(0, 10**9), True, "repetitions"),
        Key("ops", OpList(non_empty=True), True, "ops repeated"),
    ), "run ops several times"),
    "cr8_write": OpSpec(Cr8Write, (
        Key("value", Int(0, 15, "an integer"), True, "CR8 value (TPR[7:4])"),
    ), "MOV CR8: set the task priority class"),
    "cr8_read": OpSpec(Cr8Read, (
        Key("into", Var(), doc="variable that receives CR8"),
    ), "read CR8 (TPR[7:4])"),
    "cpuid": OpSpec(Cpuid, (
        Key("leaf", Choice((1, 0xB)), True, "1 (EBX[31:24]: initial APIC ID) or 0xB (EDX: x2APIC ID)"),
        Key("into", Var(), doc="variable that receives the APIC ID"),
    ), "CPUID's APIC ID"),
    "rdtsc": OpSpec(Rdtsc, (
        Key("into", Var(), doc="variable that receives the time-stamp counter"),
    ), "RDTSC"),
    "poll": OpSpec(Poll, (
        Key("reg", Reg(), True, "register name"),
        Key("value", Int(0, U64, "an integer"), doc="value to wait for (after the mask); default 0"),
        Key("mask", Int(0, U64, "an integer"), doc="bits compared; default 0xFFFFFFFF"),
        Key("into", Var(), doc="variable that receives the last value read"),
    ), "read an APIC register until (value & mask) == value"),
    "once": OpSpec(Once, (
        Key("ops", OpList(non_empty=True), True, "ops run the first time only"),
    ), "run ops the first time this op is reached on this CPU"),
    "sti_shadow": OpSpec(StiShadow, (
        Key("into", Var(), True, "counter: +1 when the interrupted code was right after an sti op"),
    ), "in a handler: was the event taken in STI's interrupt shadow"),
    "hypercall": OpSpec(Hypercall, (
        Key("nr", Int(0, U64, "an integer"), True, "hypercall number (RAX); 10 = KVM_HC_SEND_IPI"),
        Key("a0", _VALUE64, doc="RBX; KVM_HC_SEND_IPI: destination bitmap, APIC IDs a2..a2+63"),
        Key("a1", _VALUE64, doc="RCX; KVM_HC_SEND_IPI: destination bitmap, APIC IDs a2+64..a2+127"),
        Key("a2", _VALUE64, doc="RDX; KVM_HC_SEND_IPI: the APIC ID of bit 0 of a0"),
        Key("a3", _VALUE64, doc="RSI; KVM_HC_SEND_IPI: ICR low (vector, delivery mode, level, trigger)"),
        Key("into", Var(), doc="variable that receives RAX"),
    ), "VMMCALL/VMCALL (KVM hypercall)"),
    "hlt_count": OpSpec(HltCount, (
        Key("into", Var(), True, "variable that receives the count"),
    ), "the number of HLT instructions this CPU's code executed"),
}
OP_NAMES: tuple[str, ...] = tuple(OP_SPECS)


# --------------------------------------------------------------------------------------------
# Generic table checking
# --------------------------------------------------------------------------------------------
def _check_keys(table: Mapping[str, Any], keys: Sequence[Key], ctx: _Ctx, path: str,
                extra: Sequence[str] = ()) -> dict[str, Any]:
    """Reject unknown keys, require required keys, convert present keys. Returns field -> value
    for the keys present (absent optional keys are left out so dataclass defaults apply)."""
    known = [k.name for k in keys] + list(extra)
    for name in table:
        if name not in known:
            close = difflib.get_close_matches(name, known, 1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ScenarioError(ctx.source, _join(path, _quoted_key(name)),
                                f"unknown key{hint}; expected one of {', '.join(known)}")
    out: dict[str, Any] = {}
    for key in keys:
        if key.name not in table:
            if key.required:
                raise ctx.fail(_join(path, key.name), key.check.expected, _MISSING)
            continue
        out[key.field or key.name] = key.check(table[key.name], ctx, _join(path, key.name))
    return out


def _table(value: Any, ctx: _Ctx, path: str, what: str = "a table") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ctx.fail(path, what, value)
    return value


def _parse_op(item: Any, index: int, ctx: _Ctx, path: str) -> Op:
    table = _table(item, ctx, path, 'an op table like { op = "sti" }')
    if "op" not in table:
        raise ctx.fail(_join(path, "op"), f"an op name, one of {', '.join(OP_NAMES)}", _MISSING)
    name = table["op"]
    spec = OP_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name, OP_NAMES, 1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ctx.fail(_join(path, "op"), f"an op name, one of {', '.join(OP_NAMES)}", name, hint)
    args = _check_keys(table, spec.keys, ctx, path, extra=("op",))
    if spec.post is not None:
        spec.post(args, ctx, path)
    return spec.cls(index=index, **args)


# --------------------------------------------------------------------------------------------
# Sections with cross-field rules
# --------------------------------------------------------------------------------------------
def _parse_vm(raw: Any, name: str, ctx: _Ctx) -> VmConfig:
    args = _check_keys(_table(raw, ctx, name), SECTION_KEYS[name], ctx, name)
    vcpus = args.get("vcpus", VmConfig.vcpus)
    ids = args.get("apic_ids")
    if ids is not None and len(ids) != vcpus:
        raise ScenarioError(ctx.source, f"{name}.apic_ids",
                            f"expected {vcpus} APIC IDs (one per vCPU, vcpus = {vcpus}), "
                            f"got {describe(list(ids))}")
    return VmConfig(**args)


def _resolve_cpu(value: str, vms: dict[int, VmConfig], ctx: _Ctx, path: str) -> tuple[int, int]:
    level_s, index_s = value[1], value.split(".", 1)[1]
    level, index = int(level_s), int(index_s)
    vm = vms.get(level)
    if vm is None:
        l1 = vms[1]
        raise ctx.fail(path, f'a CPU of l1, "l1.0".."l1.{l1.vcpus - 1}" (there is no [l2] section)',
                       value)
    if index >= vm.vcpus or (len(index_s) > 1 and index_s.startswith("0")):
        raise ctx.fail(path, f'"l{level}.0".."l{level}.{vm.vcpus - 1}" '
                             f"(l{level} has {vm.vcpus} vCPU{'s' if vm.vcpus != 1 else ''})", value)
    return level, index


def _parse_handlers(raw: Any, ctx: _Ctx, path: str) -> dict[int, tuple[Op, ...]]:
    table = _table(raw, ctx, path, 'a table of vector -> ops (e.g. [program.handlers] "0x40" = [...])')
    handlers: dict[int, tuple[Op, ...]] = {}
    seen: dict[int, str] = {}
    for key, ops in table.items():
        kpath = _join(path, key)
        text = key.strip().lower().replace("_", "")
        vector: int | None = None
        if re.fullmatch(r"0x[0-9a-f]+", text):
            vector = int(text, 16)
        elif re.fullmatch(r"[0-9]+", text):
            vector = int(text, 10)
        if vector is None or not 0 <= vector <= 255:
            raise ScenarioError(ctx.source, kpath,
                                f'expected a vector key 0..255 in decimal or 0x-hex (e.g. "0x40" or '
                                f'"64"), got {describe(key)}')
        if vector in seen:
            raise ScenarioError(ctx.source, kpath,
                                f"expected one handler per vector, got vector {vector:#x} again "
                                f"(also {_join(path, seen[vector])})")
        seen[vector] = key
        handlers[vector] = OpList()(ops, ctx, kpath)
    return handlers


def _array_of_tables(data: Mapping[str, Any], key: str, ctx: _Ctx) -> list[Mapping[str, Any]]:
    raw = data.get(key, [])
    if not isinstance(raw, list):
        raise ctx.fail(key, f"an array of tables ([[{key}]])", raw)
    for i, item in enumerate(raw):
        _table(item, ctx, f"{key}[{i}]", f"a table ([[{key}]])")
    return raw


def parse_scenario(data: Mapping[str, Any], source: str = "<scenario>") -> Scenario:
    """Check a decoded TOML document and build the typed :class:`navic.config.Scenario`.

    Raises :class:`ScenarioError` (one-line message naming the key path) on any problem."""
    ctx = _Ctx(source)
    if not isinstance(data, Mapping):
        raise ctx.fail("", "a TOML document (a table)", data)
    top = _check_keys(data, TOP_KEYS, ctx, "", extra=TOP_TABLES + TOP_ARRAYS)

    host = HostConfig(**_check_keys(_table(data.get("host", {}), ctx, "host"),
                                    SECTION_KEYS["host"], ctx, "host"))
    l0 = L0Config(**_check_keys(_table(data.get("l0", {}), ctx, "l0"), SECTION_KEYS["l0"], ctx, "l0"))
    l1 = _parse_vm(data.get("l1", {}), "l1", ctx)
    l2 = _parse_vm(data["l2"], "l2", ctx) if "l2" in data else None
    vms = {1: l1} if l2 is None else {1: l1, 2: l2}

    devices: list[DeviceConfig] = []
    for i, raw in enumerate(_array_of_tables(data, "device", ctx)):
        path = f"device[{i}]"
        args = _check_keys(raw, DEVICE_KEYS, ctx, path)
        _resolve_cpu(args["target"], vms, ctx, f"{path}.target")
        devices.append(DeviceConfig(**args))

    programs: list[Program] = []
    owner: dict[str, int] = {}
    for i, raw in enumerate(_array_of_tables(data, "program", ctx)):
        path = f"program[{i}]"
        # Resolve the CPU first: the ops' `to` is checked against that VM's vCPU count.
        args = _check_keys({k: v for k, v in raw.items() if k == "cpu"}, PROGRAM_KEYS[:1], ctx, path)
        cpu = args["cpu"]
        level, vcpu = _resolve_cpu(cpu, vms, ctx, f"{path}.cpu")
        if cpu in owner:
            raise ctx.fail(f"{path}.cpu", "a CPU that has no other program", cpu,
                           f" (already used by program[{owner[cpu]}])")
        owner[cpu] = i
        pctx = _Ctx(source, vm=vms[level], vm_name=f"l{level}")
        args = _check_keys(raw, PROGRAM_KEYS, pctx, path)
        handlers = _parse_handlers(args["handlers"], pctx, f"{path}.handlers") if "handlers" in args else {}
        programs.append(Program(cpu=cpu, level=level, vcpu=vcpu, ops=args["ops"], handlers=handlers))

    set_lapic: list[SetLapicConfig] = []
    for i, raw in enumerate(_array_of_tables(data, "set_lapic", ctx)):
        path = f"set_lapic[{i}]"
        args = _check_keys(raw, SET_LAPIC_KEYS, ctx, path)
        _resolve_cpu(args["cpu"], vms, ctx, f"{path}.cpu")
        if host.virt != "kvm":
            raise ScenarioError(ctx.source, path, 'expected host.virt = "kvm" (KVM_SET_LAPIC is a KVM ioctl), '
                                f'got virt = "{host.virt}"')
        set_lapic.append(SetLapicConfig(**args))

    if "workload" in data:
        wl_programs, wl_devices = _parse_workload(data["workload"], vms, owner, top.get("seed", 1), ctx)
        programs.extend(wl_programs)
        devices.extend(wl_devices)

    return Scenario(host=host, l0=l0, l1=l1, l2=l2, programs=tuple(programs), devices=tuple(devices),
                    set_lapic=tuple(set_lapic), source=source, **top)


def _parse_workload(raw: Any, vms: dict[int, VmConfig], owner: dict[str, int], seed: int, ctx: _Ctx
                    ) -> tuple[list[Program], list[DeviceConfig]]:
    """``[workload]``: kind, level ("l1"/"l2"; default the innermost VM) and the kind's parameters."""
    from navic.guest.workloads import WORKLOADS, build

    table = _table(raw, ctx, "workload")
    kind = table.get("kind", _MISSING)
    if not isinstance(kind, str) or kind not in WORKLOADS:
        raise ctx.fail("workload.kind", _one_of(tuple(WORKLOADS)), kind)
    w = WORKLOADS[kind]
    levels = tuple(f"l{n}" for n in vms)
    level_name = table.get("level", levels[-1])
    if level_name not in levels:
        raise ctx.fail("workload.level", _one_of(levels), level_name)
    level = int(level_name[1])
    ncpus = vms[level].vcpus
    params: dict[str, Any] = {}
    specs = {p.name: p for p in w.params}
    for key, value in table.items():
        if key in ("kind", "level"):
            continue
        path = f"workload.{key}"
        spec = specs.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(specs), 1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ScenarioError(ctx.source, path, f'unknown parameter of workload "{kind}"; expected one of '
                                f"{', '.join(sorted(specs)) or '(none)'}{hint}")
        if spec.kind == "choice":
            if value not in spec.choices:
                raise ctx.fail(path, _one_of(spec.choices), value)
        elif spec.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    spec.lo <= value <= spec.hi):  # type: ignore[operator]
                raise ctx.fail(path, f"a number {spec.lo:g}..{spec.hi:g}", value)
            value = float(value)
        else:
            Int(int(spec.lo or 0), int(spec.hi) if spec.hi is not None else None)(value, ctx, path)
        params[key] = value
    if ncpus < w.min_cpus:
        raise ctx.fail("workload.kind", f"a VM with at least {w.min_cpus} vCPUs for {kind}",
                       kind, f" ({level_name} has {ncpus})")
    for cpu_param in ("a", "b", "sender"):
        if cpu_param in specs and params.get(cpu_param, specs[cpu_param].default) >= ncpus:
            raise ctx.fail(f"workload.{cpu_param}", f"a vCPU index 0..{ncpus - 1}",
                           params.get(cpu_param, specs[cpu_param].default))
    programs, devices = build(kind, params, level=level, ncpus=ncpus, seed=seed)
    for p in programs:
        if p.cpu in owner:
            raise ctx.fail("workload", "a workload whose CPUs have no [[program]] of their own", kind,
                           f" ({p.cpu} already has program[{owner[p.cpu]}])")
    return programs, devices


_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _toml_error(exc: tomllib.TOMLDecodeError, source: str, text: str) -> ScenarioError:
    msg = str(exc)
    m = _TOML_POS.search(msg)
    if m:
        return ScenarioError(source, "", f"invalid TOML: {msg[:m.start()]}", location=f"{m[1]}:{m[2]}")
    m = _TOML_END.search(msg)
    if m:
        lines = text.splitlines() or [""]
        return ScenarioError(source, "", f"invalid TOML: {msg[:m.start()]} (at end of document)",
                             location=f"{len(lines)}:{len(lines[-1]) + 1}")
    return ScenarioError(source, "", f"invalid TOML: {msg}", location="1:1")


# Bounds on the TOML text itself (docs/scenarios.md, "Limits"): arrays and inline tables nested
# deeper than MAX_NESTING (a scenario needs about 2 levels per `repeat`), and integer literals
# longer than MAX_DIGITS, are rejected before tomllib sees them (tomllib recurses per level and
# Python refuses to convert integers of more than 4300 digits).
MAX_NESTING = 64
MAX_DIGITS = 100
_TOML_TOKEN = re.compile(r'"""|\'\'\'|\\.|["\'#\[\]{}\n]|[0-9][0-9_a-fA-FxXoObB]{' + str(MAX_DIGITS - 1) + ",}")


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    return f"{line}:{offset - (text.rfind(chr(10), 0, offset) + 1) + 1}"


def _check_text_bounds(text: str, source: str) -> None:
    """Reject nesting deeper than MAX_NESTING and integer literals longer than MAX_DIGITS, with the
    position where the bound is passed. A light scan (strings and comments skipped); tomllib still
    judges everything else."""
    depth = 0
    quote: str | None = None    # the string delimiter we are inside, if any
    comment = False
    for m in _TOML_TOKEN.finditer(text):
        tok = m.group()
        if comment:
            comment = tok != "\n"
            continue
        if quote is not None:
            if tok[0] == "\\" and quote[0] == "'":   # no escapes in literal strings
                tok = tok[1]
            if tok == quote or (tok == "\n" and len(quote) == 1):
                quote = None
            continue
        if tok in ('"', "'", '"""', "'''"):
            quote = tok
        elif tok == "#":
            comment = True
        elif tok in "[{" and len(tok) == 1:
            depth += 1
            if depth > MAX_NESTING:
                raise ScenarioError(source, "", f"invalid TOML: arrays / inline tables nested more than "
                                    f"{MAX_NESTING} deep", location=_position(text, m.start()))
        elif tok in "]}" and len(tok) == 1:
            depth = max(0, depth - 1)
        elif tok == "\n":
            pass
        elif tok[0].isdigit() and len(tok.replace("_", "")) > MAX_DIGITS and not tok.startswith("\\"):
            start = m.start()
            if start == 0 or not (text[start - 1].isalnum() or text[start - 1] in "_."):
                raise ScenarioError(source, "", f"invalid TOML: a number of more than {MAX_DIGITS} digits",
                                    location=_position(text, start))


def loads_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Parse TOML text (see :func:`load_scenario`)."""
    _check_text_bounds(text, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(exc, source, text) from None
    except (RecursionError, ValueError) as exc:   # what the pre-scan did not catch; no position known
        raise ScenarioError(source, "", f"invalid TOML: {type(exc).__name__}: {exc}", location="1:1") from None
    return parse_scenario(data, source)


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file. Errors name the file as it was given (``str(path)``)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ScenarioError(source, "", f"cannot read file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(source, "", f"invalid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})",
                            location="1:1") from None
    return loads_scenario(text, source)
