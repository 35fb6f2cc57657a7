"""Calibration of navic's cost model against the published figures of ../shared/spec/costs.md.

Every published figure navic can express is reproduced here as a small microbenchmark: a scenario
built in code, run with :func:`navic.runner.run_scenario`, and one number computed from the result.
The table (published, navic, ratio = navic / published, the command) is printed and written into the
generated section of docs/calibration.md.

    python bench/calibration.py                 # run everything, print, refresh docs/calibration.md
    python bench/calibration.py --only KEY ...  # run some rows, print them (docs untouched)
    python bench/calibration.py --check         # print; exit 1 if a gated row is outside its limit
    python bench/calibration.py --no-write      # print only

A *gated* row fails tests/test_calibration.py when its ratio leaves 1 ± ``limit`` (±25 %, ±30 % for
the soft cross-source targets of costs.md §7); the goal is 1 ± 0.15. Informational rows are shown
with the reason they are not gated (a structural difference, or an analogue with no published
number of its own).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from navic.runner import run_scenario  # noqa: E402
from navic.scenario import loads_scenario  # noqa: E402

DOC = ROOT / "docs" / "calibration.md"
BEGIN = "<!-- BEGIN GENERATED: python bench/calibration.py -->"
END = "<!-- END GENERATED -->"
HARD = 0.25   # a gated ratio outside 1 +- HARD fails the test
SOFT = 0.30   # costs.md §7: cross-source / cross-hardware targets
GOAL = 0.15

N = 24        # iterations per microbenchmark (steady state is reached after one or two)
WARMUP = 4    # iterations ignored at the start of a run


# ---- scenario builders ------------------------------------------------------------------------
def _run(text: str, name: str) -> dict[str, Any]:
    r = run_scenario(loads_scenario(text, f"<calibration:{name}>"))
    if r["violations"] or r["errors"]:
        raise RuntimeError(f"{name}: violations={r['violations'][:2]} errors={r['errors'][:2]}")
    return r


def _header(cpu: str, *, virt: str = "kvm", l0: str = "", l1: str = "", vcpus: int = 2,
            apic: str = "x2apic", max_time_us: float = 20000) -> str:
    return (f'name = "calibration"\nseed = 1\nmax_time_us = {max_time_us}\n'
            f'[host]\ncpu = "{cpu}"\npcpus = 4\nvirt = "{virt}"\n'
            f'[l0]\n{l0}\n[l1]\nvcpus = {vcpus}\napic = "{apic}"\n{l1}\n')


def _bool(b: bool) -> str:
    return "true" if b else "false"


@cache
def ipi_roundtrip(cpu: str, apic: str, accel: bool, *, logical: bool = False, virt: str = "kvm") -> float:
    """kvm-unit-tests ``vmexit`` test ``ipi`` (``on_cpu(1, nop, 0)``), as run for the IPIv cover
    letter: vCPU 0 writes the ICR (fixed, physical destination vCPU 1) and spins until vCPU 1's
    handler has set a flag (then vCPU 1 writes EOI, as lib/x86/smp.c does with ``wait`` = 1);
    vCPU 1 spins with interrupts open (no HLT, so the receiver never exits).

    navic value = steady-state cycles per iteration = (t_last - t_first) / (n - 1) over the target's
    handler starts, i.e. ICR write -> posted/accelerated delivery -> handler sets the flag -> the
    sender sees it -> next ICR write (what the test's rdtsc loop divides by its iterations).

    ``accel`` = IPI virtualization: ``[l0] ipiv`` on Intel (APICv stays on either way); on AMD
    ``ipiv = false`` keeps IsRunning 0, so every IPI is an AVIC_INCOMPLETE_IPI exit that KVM
    completes (the AVIC analogue of "APICv without IPIv"). ``logical`` sends to vCPU 1's x2APIC
    logical ID instead (not eligible for KVM's x2APIC ICR fastpath)."""
    dest = '{ op = "ipi", dest = 2, dest_mode = "logical", vector = 0x40 }' if logical else \
        '{ op = "ipi", to = 1, vector = 0x40 }'
    l0 = f"apicv = true\navic = true\nipiv = {_bool(accel)}" if virt == "kvm" else ""   # avic: kvm_amd avic=1
    text = _header(cpu, virt=virt, l0=l0, apic=apic) + (
        '[[program]]\ncpu = "l1.0"\n'
        f'ops = [ {{ op = "sti" }}, {{ op = "repeat", times = {N}, ops = [ {dest}, '
        '{ op = "await", var = "done" } ] } ]\n'
        '[[program]]\ncpu = "l1.1"\n'
        f'ops = [ {{ op = "sti" }}, {{ op = "wait", vector = 0x40, count = {N}, how = "spin" }} ]\n'
        '[program.handlers]\n0x40 = [ { op = "add", var = "done" }, { op = "eoi" } ]\n')
    r = _run(text, f"ipi-{cpu}-{apic}-{accel}")
    ts = [d["t"] for d in r["deliveries"] if d["vector"] == 0x40 and d["cpu"] == "l1.1"]
    if len(ts) != N:
        raise RuntimeError(f"ipi {cpu}/{apic}: {len(ts)} deliveries, expected {N}")
    ts = ts[WARMUP:]
    return (ts[-1] - ts[0]) / (len(ts) - 1)


def _per_iteration(make: Callable[[int], str], name: str) -> tuple[float, dict[str, Any]]:
    """Steady-state cycles per iteration: the difference between a run of 2N and one of N."""
    r1 = _run(make(N), name)
    r2 = _run(make(2 * N), name)
    return (r2["sim_time_cycles"] - r1["sim_time_cycles"]) / N, r2


@cache
def simple_exit(cpu: str) -> float:
    """kvm-unit-tests ``outl_to_kernel`` analogue: a loop of RDMSR(IA32_APIC_BASE) in an x2APIC
    guest; KVM intercepts the MSR and emulates it in the kernel (VM exit, trivial handler, VM
    entry). navic value = cycles per iteration (one exit round trip each)."""
    def make(n: int) -> str:
        return _header(cpu, vcpus=1) + (
            '[[program]]\ncpu = "l1.0"\n'
            f'ops = [ {{ op = "repeat", times = {n}, ops = [ {{ op = "rdmsr", msr = 0x1B }} ] }} ]\n')
    per, r = _per_iteration(make, f"exit-{cpu}")
    if r["exits"]["l0"].get("msr", r["exits"]["l0"].get("msr_read", 0)) != 2 * N:
        raise RuntimeError(f"simple exit {cpu}: expected one MSR exit per iteration, got {r['exits']}")
    return per


def _nested(design: str, l2_apic: str, ops: str, n: int, l1_vcpus: int = 1) -> str:
    return (f'name = "calibration-nested"\nseed = 1\nmax_time_us = 40000\n'
            f'[host]\ncpu = "zen4"\npcpus = 4\nvirt = "kvm"\n'
            f'[l0]\nnested_apicv = "{design}"\n'
            f'[l1]\nvcpus = {l1_vcpus}\napic = "x2apic"\n'
            f'[l2]\nvcpus = 1\napic = "{l2_apic}"\n'
            f'[[program]]\ncpu = "l2.0"\nops = [ {{ op = "repeat", times = {n}, ops = [ {ops} ] }} ]\n')


@cache
def nested_exit() -> float:
    """Bonzini's nested ``vmexit`` table (L2 ``cpuid``/``vmcall`` handled by L1) analogue: L2
    (x2APIC, ``nested_apicv = "none"``) loops on RDMSR(IA32_APIC_BASE), which L1 intercepts: L2 exit
    -> L0 -> nested #VMEXIT to L1 -> L1 KVM emulates -> L1 VMRUN (intercepted by L0) -> L2.
    navic value = cycles per iteration (zen4; nested guests run on AMD models only)."""
    per, r = _per_iteration(lambda n: _nested("none", "x2apic", '{ op = "rdmsr", msr = 0x1B }', n),
                            "nested-exit")
    if r["exits"].get("l1", {}).get("msr") != 2 * N:
        raise RuntimeError(f"nested exit: expected one reflected MSR exit per iteration, got {r['exits']}")
    return per


SELF_IPI = '{ op = "ipi", shorthand = "self", vector = 0x40 }'


@cache
def nested_self_ipi(design: str, l2_apic: str, hlt: bool) -> float:
    """kvm-unit-tests ``self_ipi_sti_nop`` / ``self_ipi_sti_hlt`` in L2: with IF = 0 send a self-IPI,
    then open interrupts and either let it in (``wait`` spinning) or STI;HLT (``wait`` with
    ``how = "hlt"``, the safe-halt idiom). navic value = cycles per iteration."""
    how = "hlt" if hlt else "spin"
    ops = f'{SELF_IPI}, {{ op = "wait", vector = 0x40, how = "{how}" }}, {{ op = "cli" }}'
    per, _ = _per_iteration(lambda n: _nested(design, l2_apic, ops, n), f"nested-selfipi-{design}-{hlt}")
    return per


# ---- the calibration set ----------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    key: str
    figure: str
    published: float
    measure: Callable[[], float]
    source: str
    unit: str = "cycles"
    gated: bool = True
    limit: float = HARD
    note: str = ""

    @property
    def command(self) -> str:
        return f"python bench/calibration.py --only {self.key}"


def _ratio(a: Callable[[], float], b: Callable[[], float]) -> Callable[[], float]:
    return lambda: a() / b()


def _diff(a: Callable[[], float], b: Callable[[], float]) -> Callable[[], float]:
    return lambda: a() - b()


def _ipi(cpu: str, apic: str, accel: bool, **kw: Any) -> Callable[[], float]:
    return lambda: ipi_roundtrip(cpu, apic, accel, **kw)


IPIV = "costs.md §3, Zeng Guang, IPIv v7 cover letter (kvm-unit-tests vmexit `ipi`), 2022"
AVIC_ANALOG = ("no published AVIC figure (costs.md §3 'not found'); costs.md §7 IPI_VM_AVIC: "
               "assumption, use the IPIv analogue")

ROWS: list[Row] = [
    # -- single level, Intel (spr) -------------------------------------------------------------
    Row("exit-simple-spr", "simple exit round trip handled in the kernel (outl_to_kernel)", 2008,
        lambda: simple_exit("spr"), "costs.md §2, outl_to_kernel 2,008 cycles (Intel, 2022)",
        note="navic: RDMSR(APIC_BASE) exit round trip, spr"),
    Row("ipi-spr-xapic", "VM IPI, xAPIC, APICv, no IPIv", 6059, _ipi("spr", "xapic", False), IPIV),
    Row("ipi-spr-xapic-ipiv", "VM IPI, xAPIC, APICv + IPIv", 4713.1, _ipi("spr", "xapic", True), IPIV),
    Row("ipi-spr-x2apic", "VM IPI, x2APIC, APICv, no IPIv (ICR fastpath)", 4337.85,
        _ipi("spr", "x2apic", False), IPIV),
    Row("ipi-spr-x2apic-ipiv", "VM IPI, x2APIC, APICv + IPIv", 3644.8, _ipi("spr", "x2apic", True), IPIV),
    Row("t1-ipiv-xapic", "§7 target 1: IPIv / no IPIv, xAPIC", 4713.1 / 6059,
        _ratio(_ipi("spr", "xapic", True), _ipi("spr", "xapic", False)), IPIV, unit="ratio"),
    Row("t2-ipiv-x2apic", "§7 target 2: IPIv / no IPIv, x2APIC", 3644.8 / 4337.85,
        _ratio(_ipi("spr", "x2apic", True), _ipi("spr", "x2apic", False)), IPIV, unit="ratio"),
    Row("t3-x2apic-vs-xapic", "§7 target 3: x2APIC / xAPIC, no IPIv", 4337.85 / 6059,
        _ratio(_ipi("spr", "x2apic", False), _ipi("spr", "xapic", False)), IPIV, unit="ratio"),
    Row("x2apic-vs-xapic-ipiv", "x2APIC / xAPIC, with IPIv", 3644.8 / 4713.1,
        _ratio(_ipi("spr", "x2apic", True), _ipi("spr", "xapic", True)), IPIV, unit="ratio"),
    Row("ipiv-saving-xapic", "sender exit removed by IPIv, xAPIC (6,059 - 4,713)", 6059 - 4713.1,
        _diff(_ipi("spr", "xapic", False), _ipi("spr", "xapic", True)), IPIV + " (derived)",
        note="a difference of two rows: informational (its ratio amplifies their errors)", gated=False),
    Row("ipiv-saving-x2apic", "sender exit removed by IPIv, x2APIC (4,338 - 3,645)", 4337.85 - 3644.8,
        _diff(_ipi("spr", "x2apic", False), _ipi("spr", "x2apic", True)), IPIV + " (derived)",
        note="a difference of two rows: informational (its ratio amplifies their errors)", gated=False),
    Row("xapic-extra", "xAPIC ICR path extra over x2APIC, no IPIv (6,059 - 4,338)", 6059 - 4337.85,
        _diff(_ipi("spr", "xapic", False), _ipi("spr", "x2apic", False)),
        "costs.md §2 (derived from the IPIv letter)",
        note="a difference of two rows: informational (its ratio amplifies their errors)", gated=False),
    Row("fastpath-saving", "x2APIC ICR fastpath saving on the IPI (\"200+ cycles\")", 200,
        _diff(_ipi("spr", "x2apic", False, logical=True), _ipi("spr", "x2apic", False)),
        "costs.md §2, Wanpeng Li, IPI fastpath (commit 1e9e2622a149), Skylake",
        note="navic: IPI to vCPU 1's x2APIC logical ID (full exit path) minus physical (fastpath); "
             "published as a lower bound"),
    # -- single level, AMD analogue (zen4) -----------------------------------------------------
    Row("exit-simple-zen4", "simple exit round trip (outl_to_kernel; Intel figure)", 2008,
        lambda: simple_exit("zen4"), "costs.md §2 outl_to_kernel 2,008 (Intel); §1 AMD VMRUN->#VMEXIT "
        "1,344-1,376 + handler", note="navic: RDMSR(APIC_BASE) exit round trip, zen4"),
    Row("avic-zen4-x2apic", "VM IPI, x2AVIC, target running (IPIv analogue 3,645)", 3644.8,
        _ipi("zen4", "x2apic", True), AVIC_ANALOG),
    Row("avic-zen4-xapic", "VM IPI, AVIC xAPIC, target running (IPIv analogue 4,713)", 4713.1,
        _ipi("zen4", "xapic", True), AVIC_ANALOG),
    Row("avic-zen4-x2apic-noaccel", "VM IPI, x2APIC, AVIC on, IPI not accelerated (no-IPIv analogue 4,338)",
        4337.85, _ipi("zen4", "x2apic", False), AVIC_ANALOG,
        note="ipiv = false: every IPI is an AVIC_INCOMPLETE_IPI exit"),
    Row("avic-zen4-t2", "§7 target 2 analogue: accelerated / not, x2APIC", 3644.8 / 4337.85,
        _ratio(_ipi("zen4", "x2apic", True), _ipi("zen4", "x2apic", False)), AVIC_ANALOG, unit="ratio"),
    Row("avic-zen4-t1", "§7 target 1 analogue: accelerated / not, xAPIC", 4713.1 / 6059,
        _ratio(_ipi("zen4", "xapic", True), _ipi("zen4", "xapic", False)), AVIC_ANALOG, unit="ratio"),
    Row("avic-zen4-t3", "§7 target 3 analogue: x2APIC / xAPIC, not accelerated", 4337.85 / 6059,
        _ratio(_ipi("zen4", "x2apic", False), _ipi("zen4", "xapic", False)), AVIC_ANALOG, unit="ratio",
        gated=False, note="not an analogue: an xAPIC ICR write under AVIC lands in the backing page and "
        "fails into the same AVIC_INCOMPLETE_IPI exit as x2AVIC; Intel's xAPIC penalty (APIC-write "
        "exit off the x2APIC fastpath) has no AVIC counterpart"),
    # -- nested (zen4; nested guests run on AMD models only) ------------------------------------
    Row("nested-exit", "L2 exit handled by L1 (nested cpuid, after Sean's nVMX work)", 13142, nested_exit,
        "costs.md §5, Bonzini, \"VMX optimizations\" table, 2019 (Intel)",
        note="navic: L2 RDMSR(APIC_BASE) reflected to L1, zen4, nested_apicv = none"),
    Row("t8-nested-vs-single", "§7 target 8: nested exit / single-level simple exit (~6.5x)", 13142 / 2008,
        _ratio(nested_exit, lambda: simple_exit("zen4")), "costs.md §5/§7 (derived, cross-source)",
        unit="ratio", limit=SOFT, note="soft target (+-30%); both navic values on zen4"),
    Row("nested-hlt-extra", "L2 HLT wake extra: self_ipi_sti_hlt - self_ipi_sti_nop (28,348 - 14,858)",
        28348 - 14858,
        _diff(lambda: nested_self_ipi("shadow", "xapic", True), lambda: nested_self_ipi("shadow", "xapic", False)),
        "costs.md §5/§6 (derived), Bonzini 2019",
        note="navic: L2 xAPIC self-IPI under nested AVIC (shadow): STI;HLT adds one HLT exit reflected "
             "to L1, which finds the interrupt pending and re-enters L2"),
    Row("t7-nested-hlt-ratio", "§7 target 7: nested self-IPI + HLT / without HLT", 28348 / 14858,
        _ratio(lambda: nested_self_ipi("none", "x2apic", True), lambda: nested_self_ipi("none", "x2apic", False)),
        "costs.md §5 (Bonzini 2019, Intel nested APICv)", unit="ratio", gated=False,
        note="structure differs: on Intel with nested APICv the L2 self-IPI is one reflected exit and "
             "EOI is virtualised, so HLT doubles it; navic's AMD designs either accelerate the self-IPI "
             "and EOI (shadow/dummy: no exit without HLT) or exit on ICR, interrupt window/HLT and EOI "
             "(none, shown: 3 exits either way). The HLT increment is gated instead (nested-hlt-extra)"),
]

BY_KEY = {r.key: r for r in ROWS}


# ---- running and reporting --------------------------------------------------------------------
@dataclass
class Result:
    row: Row
    value: float

    @property
    def ratio(self) -> float:
        return self.value / self.row.published

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1) <= self.row.limit

    @property
    def status(self) -> str:
        if not self.row.gated:
            return "info"
        if abs(self.ratio - 1) <= GOAL:
            return "ok"
        return "hard" if self.ok else "FAIL"


def run(keys: list[str] | None = None) -> list[Result]:
    rows = ROWS if not keys else [BY_KEY[k] for k in keys]
    return [Result(r, float(r.measure())) for r in rows]


def _fmt(v: float, unit: str) -> str:
    return f"{v:.3f}" if unit == "ratio" else f"{v:,.0f}"


def table(results: list[Result]) -> list[str]:
    lines = ["| key | figure | published | navic | ratio | status | command |",
             "|---|---|---:|---:|---:|---|---|"]
    for res in results:
        r = res.row
        lines.append(f"| `{r.key}` | {r.figure} | {_fmt(r.published, r.unit)} | {_fmt(res.value, r.unit)} "
                     f"| {res.ratio:.3f} | {res.status} | `{r.command}` |")
    return lines


def notes(results: list[Result]) -> list[str]:
    out = []
    for res in results:
        r = res.row
        gate = f"gated +-{r.limit:.0%}" if r.gated else "not gated"
        extra = f"; {r.note}" if r.note else ""
        out.append(f"* `{r.key}` ({gate}): source {r.source}{extra}.")
    return out


def per_cpu() -> list[str]:
    """The same IPI microbenchmark on every CPU profile (informational)."""
    lines = ["| cpu | xAPIC | xAPIC accel | x2APIC | x2APIC accel | simple exit |", "|---|---:|---:|---:|---:|---:|"]
    for cpu in ("zen2", "zen3", "zen4", "zen5", "spr"):
        vals = [ipi_roundtrip(cpu, a, acc) for a in ("xapic", "x2apic") for acc in (False, True)]
        lines.append(f"| {cpu} | " + " | ".join(f"{v:,.0f}" for v in vals) + f" | {simple_exit(cpu):,.0f} |")
    return lines


def render(results: list[Result]) -> str:
    return "\n".join([
        BEGIN,
        "",
        "Generated by `python bench/calibration.py`; ratio = navic / published. Status: `ok` within "
        f"+-{GOAL:.0%} (the goal), `hard` within the gate but outside the goal, `FAIL` outside the gate, "
        "`info` not gated (see the note).",
        "",
        *table(results),
        "",
        *notes(results),
        "",
        "Per CPU profile (informational; the same `ipi` microbenchmark, cycles per iteration; *accel* = "
        "`ipiv = true`: IPIv on spr, AVIC IPI acceleration on AMD (kvm_amd `avic = 1`), forced on zen2 "
        "despite erratum 1235 (a pre-8de4a1c8164e kernel: current KVM always turns it off there). zen3 "
        "does not enumerate AVIC, so its IPIs are emulated; zen2 "
        "has no x2AVIC, so an x2APIC guest runs AVIC in hybrid mode (ICR and EOI writes exit). The "
        "simple exit is RDMSR(APIC_BASE).):",
        "",
        *per_cpu(),
        "",
        END,
    ])


def write_doc(results: list[Result]) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Calibration\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + render(results) + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="KEY", choices=sorted(BY_KEY))
    p.add_argument("--no-write", action="store_true", help="do not refresh docs/calibration.md")
    p.add_argument("--check", action="store_true", help="exit 1 if a gated row is outside its limit")
    a = p.parse_args(argv)
    results = run(a.only)
    print("\n".join(table(results)))
    bad = [r for r in results if r.row.gated and not r.ok]
    for r in bad:
        print(f"OUTSIDE LIMIT: {r.row.key}: ratio {r.ratio:.3f} (limit +-{r.row.limit:.0%})", file=sys.stderr)
    if not a.only and not a.no_write:
        write_doc(results)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
