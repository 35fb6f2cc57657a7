"""Scenario inputs for fuzzing navic: valid scenarios with random values, and mutations of them
and of the shipped examples (malformed TOML, wrong types, deep nesting, huge numbers, unknown keys).

One generator, two sources of choices: a :class:`Picker` over ``random.Random`` (bench/fuzz.py:
fast, seeded, input N of seed S is always the same text) or over hypothesis' ``data.draw``
(tests/fuzz: shrinking). Valid scenarios are generated from the scenario contract's own tables
(:data:`navic.scenario.SECTION_KEYS`, :data:`navic.scenario.OP_SPECS`, the workloads' params), so a
key or op added there is fuzzed without touching this file; only the keys whose value sets the
*run time* (repeat counts, compute cycles, simulated time) are kept small here.

:func:`classify` runs one input in-process the way ``navic run`` does and names the outcome
(docs/verification.md, "Fuzzing").
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navic import scenario as S
from navic.config import CPU_MODELS, VIRT_MODES
from navic.guest.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


# ---------------------------------------------------------------------------------------------
# Sources of choices
# ---------------------------------------------------------------------------------------------
class Picker:
    """What the generator asks for. Subclasses decide how (random or hypothesis)."""

    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def coin(self, p: float = 0.5) -> bool:
        return self.int(0, 999) < int(p * 1000)

    def float(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.int(0, 10_000) / 10_000


class RandomPicker(Picker):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class DataPicker(Picker):
    """Choices drawn from hypothesis' ``st.data()`` (so failures shrink)."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


# ---------------------------------------------------------------------------------------------
# Valid scenarios
# ---------------------------------------------------------------------------------------------
# Keys whose value decides how long a run takes: small on purpose (the bounds of big values are
# exercised by the mutations and documented in docs/scenarios.md, "Limits").
_SMALL: dict[str, tuple[int, int]] = {
    "repeat.times": (0, 6), "compute.cycles": (0, 40_000), "wait.count": (1, 3),
    "await.count": (1, 3), "tsc_deadline.delta": (0, 60_000), "add.value": (-3, 3),
    "l0.halt_poll_ns": (0, 400_000), "l0.timeslice_us": (1, 5_000), "l1.timeslice_us": (1, 5_000),
    "l0.erratum_1235_window": (0, 8), "device.count": (1, 6),
}
_VARS = ("flag", "ack", "x", "tlb_ack")
_MSRS = (0x1B, 0x6E0, 0x802, 0x803, 0x808, 0x80A, 0x80B, 0x80D, 0x80F, 0x828, 0x830, 0x832, 0x835,
         0x838, 0x839, 0x83E, 0x83F, 0x10, 0x3A, 0x8FF, 0x800)
_VECTORS = (0, 1, 2, 15, 16, 31, 32, 0x40, 0x41, 0x80, 0xEF, 0xF0, 0xFE, 0xFF)


def _apic_base(p: Picker) -> int:
    """IA32_APIC_BASE values: legal and illegal transitions, reserved bits (SDM §11.4.4)."""
    base = p.choice((0xFEE00000, 0xFEE00000, 0xFED00000, 0x1000, 0xFFFFF000, 1 << 40, 1 << 52, 1 << 63))
    flags = p.choice((0, 1 << 11, (1 << 11) | (1 << 10), 1 << 10, (1 << 11) | (1 << 8)))
    extra = p.choice((0, 0, 0, 1, 1 << 9, 1 << 12 >> 1, 0xFFF))
    return (base | flags | extra) & S.U64


def _int_value(check: S.Int, p: Picker, name: str) -> int:
    if name in _SMALL and not p.coin(0.004):   # now and then the key's real bound (limits)
        lo, hi = _SMALL[name]
        return p.int(max(lo, check.lo), hi if check.hi is None else min(hi, check.hi))
    hi = check.hi if check.hi is not None else check.lo + 1_000
    edges = [check.lo, hi, min(hi, check.lo + 1)]
    if p.coin(0.3):
        return p.choice(edges)
    return p.int(check.lo, min(hi, check.lo + 0x1_0000) if p.coin(0.7) else hi)


def _value(check: S.Check, p: Picker, name: str, vcpus: int) -> Any:
    """A valid value for one key, from its checker."""
    if name.endswith(".vector") or name == "device.vector":
        return p.choice(_VECTORS) if p.coin(0.7) else p.int(0, 255)
    if name == "wrmsr.msr" or name == "rdmsr.msr":
        return p.choice(_MSRS) if p.coin(0.9) else p.int(0, S.U32)
    if name == "wrmsr.value":
        return _apic_base(p) if p.coin(0.5) else p.choice((0, 1, 0x40, 0x100, 0xFF, S.U32, S.U64, 1 << 32))
    if isinstance(check, S.Vcpu):
        return p.int(0, vcpus - 1)
    if isinstance(check, S.MmioOffset):
        return 4 * p.int(0, 0xFFC // 4) if p.coin(0.3) else p.choice(tuple(S.REGISTER_OFFSETS.values()))
    if isinstance(check, S.Int):
        return _int_value(check, p, name)
    if isinstance(check, S.Number):
        return p.choice((0.5, 1.0, 3.0, 20.0, 100.0)) if not check.inclusive else p.choice((0, 0.0, 1.5, 10))
    if isinstance(check, S.Probability):
        return p.choice((0, 0.0, 0.1, 0.5, 1, 1.0))
    if isinstance(check, S.Bool):
        return p.coin()
    if isinstance(check, S.Choice):
        return p.choice(check.values)
    if isinstance(check, S.Var):
        return p.choice(_VARS)
    if isinstance(check, S.Reg):
        return p.choice(S.REGISTER_NAMES)
    if isinstance(check, S.Errata):
        return "auto" if p.coin() else p.choice(([], ["1235"], ["1235", "0"]))[:]
    if isinstance(check, S.Inhibits):
        return [r for r in S.Inhibits.FORCEABLE if p.coin(0.1)]
    if isinstance(check, S.ApicIds):
        step = p.choice((1, 2, 17))
        start = p.choice((0, 1, 16, 255, 0xFFFFFFFE - step * (vcpus - 1)))
        return [start + step * i for i in range(vcpus)]
    if isinstance(check, S.Str):
        return "x"
    raise LookupError(name)


def _keys(keys: Sequence[S.Key], p: Picker, prefix: str, vcpus: int, skip: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        if k.name in skip or isinstance(k.check, S.OpList):
            continue
        if k.required or p.coin(0.4):
            try:
                out[k.name] = _value(k.check, p, f"{prefix}.{k.name}", vcpus)
            except LookupError:
                continue   # a checker this generator does not know (a new kind of key): left out
    return out


def _ops(p: Picker, vcpus: int, depth: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    n = p.int(0, 6) if n is None else n
    out = []
    for _ in range(n):
        name = p.choice(S.OP_NAMES)
        if name == "repeat" and depth >= 2:
            name = "sti"
        spec = S.OP_SPECS[name]
        op: dict[str, Any] = {"op": name}
        if name == "ipi":
            op.update(_keys(spec.keys, p, "ipi", vcpus, skip=("to", "dest", "vector", "shorthand", "dest_mode")))
            op["vector"] = _value(S._VECTOR, p, "ipi.vector", vcpus)
            how = p.int(0, 3)
            if how == 0:
                op["to"] = p.int(0, vcpus - 1)
            elif how == 1:
                op["dest"] = p.choice((0, 1, 3, 0xFF, 0xFFFFFFFF, 0x10001, 0x3))
                op["dest_mode"] = p.choice(("physical", "logical"))
            else:
                op["shorthand"] = p.choice(("self", "all", "others"))
        else:
            op.update(_keys(spec.keys, p, name, vcpus))
        for k in spec.keys:
            if isinstance(k.check, S.OpList):
                op[k.name] = _ops(p, vcpus, depth + 1, p.int(1, 3))
        out.append(op)
    return out


def valid_scenario(p: Picker) -> dict[str, Any]:
    """A scenario that passes the checker (by construction), as a TOML-ready dict."""
    doc: dict[str, Any] = {"name": "fuzz", "seed": p.int(0, 1000) if p.coin(0.9) else S.U64,
                           "max_time_us": p.choice((20, 50, 100, 200.5, 400, 1000))
                           if not p.coin(0.01) else p.choice((1e5, 1e7, 1e300))}
    host = _keys(S.SECTION_KEYS["host"], p, "host", 1, skip=("pcpus", "cpu", "virt"))
    host["cpu"] = p.choice(CPU_MODELS)
    host["virt"] = p.choice(VIRT_MODES)
    host["pcpus"] = p.int(1, 6) if not p.coin(0.01) else p.choice((64, 4096))
    doc["host"] = host
    if p.coin(0.7):
        doc["l0"] = _keys(S.SECTION_KEYS["l0"], p, "l0", 1)
    l1n = p.int(1, 5) if not p.coin(0.02) else p.choice((16, 64, 255, 300, 4096))
    doc["l1"] = _keys(S.SECTION_KEYS["l1"], p, "l1", l1n, skip=("vcpus",))
    doc["l1"]["vcpus"] = l1n
    vms = {"l1": l1n}
    if host["virt"] == "kvm" and p.coin(0.3):
        l2n = p.int(1, 4) if not p.coin(0.02) else p.choice((16, 64, 4096))
        doc["l2"] = _keys(S.SECTION_KEYS["l2"], p, "l2", l2n, skip=("vcpus",))
        doc["l2"]["vcpus"] = l2n
        vms["l2"] = l2n
        doc.setdefault("l0", {})["nested_apicv"] = p.choice(S.NESTED_APICV)
    # With [l2], L1's vCPUs run L1's KVM: programs, the workload and devices are L2's (the runner
    # refuses the others, see _refuse_unrun_nested_parts; the mutations still try them).
    level = p.choice(tuple(vms)) if "l2" not in vms else "l2"
    used: set[int] = set()
    if p.coin(0.3):
        w = p.choice(tuple(WORKLOADS))
        if vms[level] >= WORKLOADS[w].min_cpus:
            doc["workload"] = _workload(p, w, level, vms[level])
            used = set(range(vms[level]))
    programs = []
    for vm, n in vms.items():
        if vm != level and "l2" in vms:
            continue
        for i in range(n):
            if (vm == level and i in used) or not p.coin(0.8):
                continue
            if i >= 8 and not p.coin(0.01):
                continue   # big VMs: programs on a few CPUs
            prog: dict[str, Any] = {"cpu": f"{vm}.{i}", "ops": _ops(p, n)}
            if p.coin(0.5):
                prog["handlers"] = {hex(v): _ops(p, n, 1, p.int(0, 3))
                                    for v in {p.choice(_VECTORS) for _ in range(p.int(1, 3))}}
            programs.append(prog)
    if programs:
        doc["program"] = programs
    if p.coin(0.15) and "l2" not in vms:
        vm = p.choice(tuple(vms))
        devs = [_keys(S.DEVICE_KEYS, p, "device", 1, skip=("target",)) for _ in range(p.int(1, 2))]
        for d in devs:
            d["target"] = f"{vm}.{p.int(0, vms[vm] - 1)}"
        doc["device"] = devs
    return doc


def _workload(p: Picker, kind: str, level: str, ncpus: int) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": kind, "level": level}
    for prm in WORKLOADS[kind].params:
        if not p.coin(0.5):
            continue
        if prm.name in ("a", "b", "sender"):
            out[prm.name] = p.int(0, ncpus - 1)
        elif prm.kind == "choice":
            out[prm.name] = p.choice(prm.choices)
        elif prm.kind == "float":
            out[prm.name] = p.choice((prm.lo, prm.hi if prm.hi <= 50 else 50.0, 1.0, 0.5))
        elif prm.name in ("iterations", "ticks", "count"):
            out[prm.name] = p.int(1, 4)
        elif prm.name == "targets":
            out[prm.name] = p.int(0, ncpus - 1)
        elif prm.name.endswith("cycles") or prm.name == "period_ticks":
            out[prm.name] = p.int(int(prm.lo or 0), 30_000)
        else:
            out[prm.name] = p.int(int(prm.lo or 0), int(prm.hi))
    if "a" in out and "b" not in out and out["a"] == 1:
        out["b"] = 0
    if out.get("a") is not None and out.get("a") == out.get("b"):
        del out["b"]
        out.pop("a")
    return out


# ---------------------------------------------------------------------------------------------
# TOML text
# ---------------------------------------------------------------------------------------------
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else json.dumps(k)


def to_toml(value: Any) -> str:
    """Inline TOML for a value (a whole document when given a table at top level)."""
    if isinstance(value, dict):
        return "\n".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + "\n"
    return _inline(value)


def _inline(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_inline(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_inline(x)}" for k, x in v.items()) + "}"
    if isinstance(v, _Raw):
        return v.text
    raise TypeError(type(v))


@dataclass(frozen=True)
class _Raw:
    """A piece of TOML written as is (datetimes, big literals)."""

    text: str


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------
_ODD_VALUES: tuple[Any, ...] = (
    "", "x", "0x40", "true", "l1.99", "zen9", 1.5, -1, 0, -(2**63), 2**63 - 1, 2**64, 10**30, True, False,
    [], [1, 2], {}, {"a": 1}, [[[]]], math.inf, -math.inf, math.nan, 1e308, -0.0,
    _Raw("1979-05-27T07:32:00Z"), _Raw("07:32:00"), _Raw("1979-05-27"), "\u00e9\u4e2d", "a" * 500,
)
_UNKNOWN = ("foo", "vcpu", "Name", "op2", "ops ", "handler", "0x40", "x.y", "", "seed2")


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location (dict key or list index path) in a decoded document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _nest(depth: int, leaf: Any, p: Picker) -> Any:
    for _ in range(depth):
        leaf = [leaf] if p.coin() else {"a": leaf}
    return leaf


def mutate_doc(doc: dict[str, Any], p: Picker) -> dict[str, Any]:
    """One to three structural mutations of a decoded document (wrong types, unknown keys, huge
    numbers, nesting, removed keys, duplicated entries)."""
    doc = json.loads(json.dumps(doc, default=str))   # a private deep copy
    for _ in range(p.int(1, 3)):
        paths = _paths(doc)
        path = p.choice(paths)
        kind = p.int(0, 6)
        parent = _get(doc, path[:-1]) if path else None
        if kind == 0 and path:                     # wrong type / odd value
            parent[path[-1]] = p.choice(_ODD_VALUES)
        elif kind == 1:                            # unknown key
            target = _get(doc, path)
            if isinstance(target, dict):
                target[p.choice(_UNKNOWN)] = p.choice(_ODD_VALUES[:12])
        elif kind == 2 and path and isinstance(parent, dict):   # removed key
            del parent[path[-1]]
        elif kind == 3 and path:                   # deep nesting
            parent[path[-1]] = _nest(p.choice((2, 10, 40, 90)), _get(doc, path), p)
        elif kind == 4 and path:                   # huge / edge numbers
            parent[path[-1]] = p.choice((2**64, 2**63 - 1, -(2**63), 10**18, 4097, 4096, 65536, -1,
                                         10**9, 10**10, 1e300, 0))
        elif kind == 5 and path and isinstance(parent, list):   # duplicate an entry
            parent.append(copy.deepcopy(parent[path[-1]]))
        elif kind == 6:                            # odd top-level sections
            doc[p.choice(("l2", "workload", "device", "program", "host", "l3"))] = p.choice(_ODD_VALUES)
    return doc


_TOML_BITS = ("[", "]", "{", "}", "=", '"', "'", ",", ".", "#", "\n", " ", "0x", "1e", "_", "-", "+",
              '"""', "'''", "\\", "\x00", "\t", "\r")


def mutate_text(text: str, p: Picker) -> str | bytes:
    """A textual mutation (malformed TOML; deep nesting and huge literals tomllib itself chokes on;
    bytes that are not UTF-8)."""
    kind = p.int(0, 8)
    n = len(text)
    at = p.int(0, max(0, n - 1))
    if kind == 0:
        return text[:at]
    if kind == 1:
        return text[:at] + p.choice(_TOML_BITS) + text[at + p.int(0, 2):]
    if kind == 2:
        lines = text.splitlines(keepends=True)
        i = p.int(0, max(0, len(lines) - 1))
        return "".join(lines[:i + 1] + lines[i:])
    if kind == 3:
        depth = p.choice((50, 500, 5_000, 100_000))
        open_, close = p.choice((("[", "]"), ("{a=", "}")))
        return text + f"\nzzz = {open_ * depth}1{close * depth}\n"
    if kind == 4:
        digits = p.choice((20, 400, 5_000, 50_000))
        lit = p.choice(("9" * digits, "0x" + "f" * digits, "1e" + "9" * min(digits, 30), "1" + "0" * digits + ".5"))
        m = list(re.finditer(r"(?<![\w.])\d+(?![\w.])", text))
        if m:
            hit = p.choice(m)
            return text[:hit.start()] + lit + text[hit.end():]
        return text + f"\nseed = {lit}\n"
    if kind == 5:
        return text.encode("utf-8")[:at] + p.choice((b"\xff", b"\xc3", b"\xed\xa0\x80")) + text.encode()[at:]
    if kind == 6:
        return text + "\n[" + p.choice(("host", "l1", "program", "x")) + "]\n"
    if kind == 7:
        return text.replace("=", p.choice(("==", ":", "= =")), 1)
    return text + "\n" + p.choice(("[[program]]\ncpu = \"l1.0\"\n", "name = \"again\"\n", "[program.handlers]\n",
                                   "[[l1]]\n", "x.y.z = 1\n", "seed = 1979-05-27\n"))


def fuzz_input(p: Picker) -> tuple[str, str | bytes]:
    """One input: (family, scenario text or bytes). Families: valid, mutated (structural, on a
    generated or example scenario), text (textual mutation of an example or a generated one)."""
    import tomllib

    r = p.int(0, 99)
    if r < 55:
        return "valid", to_toml(valid_scenario(p))
    if r < 85:
        if p.coin(0.4) and EXAMPLES:
            doc = tomllib.loads(p.choice(EXAMPLES).read_text(encoding="utf-8"))
            doc.pop("name", None)
            doc = {"name": "fuzz", **doc}
        else:
            doc = valid_scenario(p)
        return "mutated", to_toml(mutate_doc(doc, p))
    base = p.choice(EXAMPLES).read_text(encoding="utf-8") if p.coin(0.6) and EXAMPLES else to_toml(valid_scenario(p))
    return "text", mutate_text(base, p)


# ---------------------------------------------------------------------------------------------
# Running one input and naming the outcome
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one input. ``kind``: ran, rejected, unsupported, limit (a --max-events /
    --timeout cut, one line), or a failure: traceback, unnamed (a rejection naming no key), bad-line
    (a message that is not one line naming the file)."""

    kind: str
    message: str = ""
    family: str = ""
    virt: str = ""
    nested: bool = False
    violations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    site: str = ""       # failures: innermost navic frame, for grouping

    @property
    def failed(self) -> bool:
        return self.kind in ("traceback", "unnamed", "bad-line")


def _site(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/navic/" in f.filename or "tomllib" in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    where = f.filename.split("/navic/")[-1] if "/navic/" in f.filename else Path(f.filename).name
    return f"{type(exc).__name__} at {where}:{f.lineno} ({f.name})"


def _one_line(message: str, source: str) -> bool:
    return "\n" not in message and message.startswith(f"{source}:")


def classify(data: str | bytes, path: Path, *, timeout_s: float = 5.0, max_events: int | None = 2_000_000,
             on_result: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """Load ``data`` (written to ``path``) and run it as ``navic run --json`` would, in-process,
    with a wall-time limit and an event budget."""
    import time

    from navic import runner
    from navic.cli import to_json

    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    source = str(path)
    t0 = time.perf_counter()
    try:
        scn = S.load_scenario(path)
    except S.ScenarioError as exc:
        msg = str(exc)
        kind = "rejected"
        if not _one_line(msg, source):
            kind = "bad-line"
        elif not exc.path and exc.location is None:
            kind = "unnamed"
        return Outcome(kind, msg, seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - the point: any other exception is a finding
        return Outcome("traceback", f"{type(exc).__name__}: {exc}"[:300], site=_site(exc),
                       seconds=time.perf_counter() - t0)
    virt, nested = scn.host.virt, scn.l2 is not None
    try:
        run = runner.simulate(scn, limits=runner.Limits(max_events=max_events, timeout_s=timeout_s))
        result = run.result()
        to_json(result)
    except (runner.UnsupportedScenario, NotImplementedError) as exc:
        msg = " ".join(str(exc).split())
        kind = "unsupported" if msg.startswith(f"{source}:") else "bad-line"
        return Outcome(kind, msg, virt=virt, nested=nested, seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        return Outcome("traceback", f"{type(exc).__name__}: {exc}"[:300], virt=virt, nested=nested,
                       site=_site(exc), seconds=time.perf_counter() - t0)
    if on_result is not None:
        on_result(result)
    stopped = result.get("stopped_by")
    kind = "limit" if stopped else "ran"
    violations = [] if stopped else [dict(v, explained=explain(v, scn, result["errors"]))
                                    for v in result["violations"]]
    return Outcome(kind, stopped["message"] if stopped else "", virt=virt, nested=nested,
                   violations=violations, seconds=time.perf_counter() - t0)


# x2APIC reserved bits of an ICR low word (31:20, 17:16, 13; SDM §11.12.9) and of SELF_IPI (31:8).
_ICR_RESERVED = 0xFFF32000
_X2_ICR, _X2_SELF_IPI = 0x830, 0x83F


def _sends_with_reserved_bits(ops: Sequence[Any]) -> bool:
    from navic.guest import ops as O

    for op in ops:
        if isinstance(op, O.Repeat) and _sends_with_reserved_bits(op.ops):
            return True
        reg = {"ICR": _X2_ICR, "ICR_LO": _X2_ICR, "SELF_IPI": _X2_SELF_IPI}.get(getattr(op, "reg", ""))
        msr = op.msr if isinstance(op, O.Wrmsr) else (reg if isinstance(op, O.Write) else None)
        if msr == _X2_ICR and (op.value & _ICR_RESERVED or op.value >> 32 and isinstance(op, O.Write)):
            return True
        if msr == _X2_SELF_IPI and op.value >> 8:
            return True
    return False


def explain(v: dict[str, Any], scn: Any, errors: Sequence[dict[str, Any]] = ()) -> str:
    """The known cause of a violation on a valid scenario, or "" (docs/verification.md, "Fuzzing"):

    * ``erratum-1235``: stuck on a host with AMD erratum 1235 in force (zen2 with ``errata =
      "auto"``, or listed): the modelled hardware bug (a stale IsRunning read drops the doorbell),
      what examples/explore-erratum1235*.toml demonstrate;
    * ``gp-send``: a "never accepted" loss whose sender's ICR / SELF_IPI write raised #GP (e.g.
      WRMSR 83Fh in xAPIC mode): the provenance tracker counts the faulting write as a send (the
      false alarm helper "peer" owns, check/provenance.py ``watch``);
    * ``xapic-id-over-254``: a virtualised xAPIC VM with an APIC ID above 0xFE: the 8-bit xAPIC ID
      aliases (272 -> 0x10, 255 = the broadcast ID) and the hardware paths (AVIC's physical table,
      IPIv's PID table, indexed by the vCPU ID) disagree with the architectural destination; KVM
      covers part of this with inhibits (APIC_ID_MODIFIED, PHYSICAL_ID_TOO_BIG) that navic models
      only partly. A known, open modelling gap (docs/verification.md, "Fuzzing");
    * ``l1-apic-id-over-0xfff``: a nested AVIC design (shadow, dummy) whose L1 vCPUs have x2APIC
      IDs above 0xFFF: L1's KVM writes them as *host* APIC IDs into 12-bit physical-table fields
      and doorbells, which cannot name them (real KVM WARNs in avic_vcpu_load and never sees such
      hosts); an unmodelled configuration;
    * ``reserved-bit-send``: a "never accepted" loss whose sender wrote an x2APIC ICR / SELF_IPI
      value with reserved bits — a write that #GPs (or, under IPIv, that KVM's
      kvm_apic_write_nodecode drops), which the provenance tracker still counts as a send (the
      false alarm helper "peer" owns, check/provenance.py ``watch``)."""
    errata = scn.l0.errata
    if v.get("kind") == "stuck" and scn.host.virt == "kvm" and (
            "1235" in errata if errata != "auto" else scn.host.cpu == "zen2"):
        return "erratum-1235"
    if scn.host.virt == "kvm" and any(
            vm is not None and vm.apic == "xapic" and any(vm.apic_id(i) > 0xFE for i in range(vm.vcpus))
            for vm in (scn.l1, scn.l2)):
        return "xapic-id-over-254"
    if scn.l2 is not None and scn.l0.nested_apicv != "none" and scn.host.cpu != "spr" and any(
            scn.l1.apic_id(i) > 0xFFF for i in range(scn.l1.vcpus)):
        return "l1-apic-id-over-0xfff"
    if v.get("kind") == "lost" and "never accepted" in v.get("detail", ""):
        for e in errors:
            if e.get("cpu") == v.get("sent_by") and "#GP" in e.get("error", "") and re.search(
                    r"0x83[0f]\b|ICR|SELF_IPI", e["error"]):
                return "gp-send"
        for p in scn.programs:
            if p.cpu == v.get("sent_by") and (_sends_with_reserved_bits(p.ops) or any(
                    _sends_with_reserved_bits(h) for h in p.handlers.values())):
                return "reserved-bit-send"
    return ""


__all__ = ["Picker", "RandomPicker", "DataPicker", "valid_scenario", "mutate_doc", "mutate_text", "fuzz_input",
           "to_toml", "classify", "Outcome"]
