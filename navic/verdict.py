"""``navic verdict``: answer the nested-AVIC thread for chosen CPU models and workloads.

The question (Levitsky's RFC v3 vs Christopherson's dummy-table suggestion, docs/nested-design.md):
is full nested (x2)AVIC — shadowing L1's physical APIC ID tables with write tracking, ~1500 lines of
kernel code — worth it, or does one dummy table with L0-emulated IPIs get most of the benefit, and
can it be shared with VMX IPI virtualisation?

A verdict puts three kinds of evidence side by side, per nested design:

* **safety** — :class:`navic.check.explore.Explorer` on the nested explore scenarios at a stated
  preemption bound: "no violation within bound K" or the counterexample (kind, CPU, vector and the
  replayable schedule file);
* **cost** — the same rows ``navic compare`` computes (:func:`navic.compare.run_suite`): exits per
  IPI at each level, world switches, p50/p99 latency, L0 and L1 hypervisor cycles per IPI;
* **complexity** — logical lines of navic model code per design (a proxy), and an estimate of kernel
  lines: the shadow design's published diffstat (RFC v3: 1,507 insertions) scaled by each design's
  navic lines relative to shadow's. That scaling is an assumption and is reported as one.

It ends with a recommendation generated from those numbers, and lists every assumption the numbers
rest on that no published figure backs (the cost model's "assumption:" entries among them).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import math
import tokenize
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navic import compare as C

NAVIC = Path(__file__).resolve().parent

#: The shadow design's kernel size: "[RFC PATCH v3 00/19] RFC: nested AVIC" (2022-04-27) diffstat,
#: 1507 insertions / 125 deletions (spec digest §6.2.1). The only published kernel size of any design.
RFC_V3_INSERTIONS = 1507

#: Model modules (relative to navic/) that implement each design beyond what every design shares
#: (L0's nested SVM core, navic/hv/nested/core.py). A design missing here is looked up as
#: hv/nested/<name with - as _>.py.
DESIGN_MODULES: dict[str, tuple[str, ...]] = {
    "none": (),
    "shadow": ("hv/nested/shadow.py",),
    "dummy": ("hv/nested/dummy.py", "hv/nested/ipi_emulation.py"),
    "shadow-x2avic": ("hv/nested/shadow.py", "hv/nested/shadow_x2avic.py"),   # RFC v3 + its x2AVIC extension
    "runcache": ("hv/nested/dummy.py", "hv/nested/ipi_emulation.py", "hv/nested/runcache.py"),  # dummy + cache
}

#: Modules a design shares with nested VMX (IPIv): the part of the design the thread wanted shared.
VMX_SHARED_MODULES: dict[str, tuple[str, ...]] = {
    "dummy": ("hv/nested/ipi_emulation.py",),
    "runcache": ("hv/nested/ipi_emulation.py",),   # its dummy part; the IsRunning cache is AMD-only
}

#: What each workload of the default suite stands for in the verdict's "where each wins".
CATEGORIES: dict[str, str] = {
    "ipi-pingpong": "xAPIC L2, running target",
    "ipi-pingpong-x2apic": "x2APIC L2, running target",
    "ipi-halt": "halted target",
    "tlb-shootdown": "broadcast (TLB shootdown)",
    "hackbench": "reschedule IPIs (hackbench)",
    "table-churn": "table churn (L1 overcommit)",
}

#: The recommendation's rule (see :func:`recommendation`).
NEAR = 0.10      # "within 10 % of the fastest design's geometric-mean p50"
SMALLER = 0.75   # "with at most 75 % of its model lines"

#: Explore scenarios (examples/) every design is checked on, and the erratum-1235 one (zen2).
SAFETY_SCENARIOS = ("explore-nested-pingpong.toml", "explore-nested-pingpong-x2apic.toml",
                    "explore-nested-broadcast.toml", "explore-nested-churn.toml")
ERRATUM_SCENARIO = "explore-erratum1235-shadow.toml"


@dataclass(frozen=True)
class VerdictOptions:
    cpus: tuple[str, ...] = ("zen4", "zen2")
    workloads: tuple[str, ...] = ()          # workload labels; () = the whole default suite
    bound: int = 1                           # explorer preemption bound K
    max_steps: int = 20_000
    explore_time_limit: float = 60.0         # seconds per explore run
    jobs: int | None = None
    designs: tuple[str, ...] = ()            # () = every nested design navic compare has


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------
def nested_designs() -> tuple[str, ...]:
    """Every nested design some ``navic compare`` configuration runs, in configuration order."""
    return tuple(dict.fromkeys(c.design for c in C.CONFIGS.values() if c.level == 2 and c.design))


def design_configs(opts: VerdictOptions) -> list[C.ConfigSpec]:
    """The l2-<design>-<cpu> configurations for the chosen CPUs and designs, plus the L1 baseline
    of each CPU (l1-avic-<cpu> where it exists) and bare metal, for reference."""
    designs = opts.designs or nested_designs()
    out = [C.CONFIGS["bare"]]
    for cpu in opts.cpus:
        if f"l1-avic-{cpu}" in C.CONFIGS:
            out.append(C.CONFIGS[f"l1-avic-{cpu}"])
        out += [C.CONFIGS[n] for d in designs if (n := f"l2-{d}-{cpu}") in C.CONFIGS]
    return out


def cases(opts: VerdictOptions) -> tuple[C.Case, ...]:
    names = tuple(c.name for c in design_configs(opts))
    picked = [c for c in C.DEFAULT_SUITE if not opts.workloads or c.label in opts.workloads]
    return tuple(dataclasses.replace(c, configs=tuple(n for n in c.configs if n in names)) for c in picked)


# ---------------------------------------------------------------------------------------------
# Complexity
# ---------------------------------------------------------------------------------------------
def logical_lines(path: Path) -> int:
    """Lines of a Python module that hold code: not blank, not only a comment, not a docstring."""
    src = path.read_text(encoding="utf-8")
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            doc_lines.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            code.update(line for line in range(tok.start[0], tok.end[0] + 1) if line not in doc_lines)
    return len(code)


def design_modules(design: str) -> tuple[str, ...]:
    if design in DESIGN_MODULES:
        return DESIGN_MODULES[design]
    guess = f"hv/nested/{design.replace('-', '_')}.py"
    return (guess,) if (NAVIC / guess).is_file() else ()


def complexity(designs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per design: its modules, navic logical lines, the part shared with nested VMX, and the kernel
    estimate (shadow's published diffstat scaled by navic lines; ``None`` for the status quo)."""
    lines = {d: {m: logical_lines(NAVIC / m) for m in design_modules(d) if (NAVIC / m).is_file()}
             for d in designs}
    shadow_lines = sum(lines.get("shadow", {}).values()) or sum(logical_lines(NAVIC / m)
                                                                 for m in DESIGN_MODULES["shadow"])
    out = {}
    for d, mods in lines.items():
        n = sum(mods.values())
        out[d] = {
            "modules": mods,
            "navic_lines": n,
            "vmx_shared_lines": sum(logical_lines(NAVIC / m) for m in VMX_SHARED_MODULES.get(d, ())),
            "kernel_lines_estimate": round(n * RFC_V3_INSERTIONS / shadow_lines) if n else 0,
            "kernel_lines_method": ("published: RFC v3 diffstat" if d == "shadow" else
                                    "none: the status quo adds no code" if not n else
                                    f"assumption: {RFC_V3_INSERTIONS} x navic lines / shadow's navic lines"),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------
def _explore_one(job: tuple[str, str, int, int, float, str]) -> dict[str, Any]:
    from navic.check import explore as X
    from navic.runner import UnsupportedScenario
    from navic.scenario import ScenarioError, load_scenario

    path, design, bound, max_steps, limit, outdir = job
    doc: dict[str, Any] = {"scenario": Path(path).name, "design": design, "bound": bound,
                           "reduction": X.Options().reduction}
    try:
        scn = load_scenario(path)
        ex = X.Explorer(scn, X.Options(preemptions=bound, design=design, max_steps=max_steps, time_limit=limit))
        out = ex.run()
    except (UnsupportedScenario, ScenarioError, ValueError) as e:
        return {**doc, "result": "n/a", "why": str(e).split(": ", 1)[-1]}
    doc.update(states=out.progress.states, seconds=round(out.progress.seconds, 1),
               complete_bound=out.progress.complete_bound)
    if out.violation is not None:
        v = out.violation
        sched = Path(outdir) / f"{Path(path).stem}-{design}.schedule.json"
        try:
            X.write_schedule(sched, ex.schedule_doc(sched, out))
        except OSError:
            sched = None  # type: ignore[assignment]
        doc.update(result="violation", violation={"kind": v.get("kind"), "cpu": v.get("cpu"),
                                                  "vector": v.get("vector"), "detail": v.get("detail")},
                   schedule_file=str(sched) if sched else None)
    elif out.complete:
        doc["result"] = "proven within bound"
    else:
        doc["result"] = "incomplete (time limit)"
    return doc


def safety(opts: VerdictOptions, examples: Path, designs: Iterable[str], outdir: Path,
           progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Explore every design on the nested explore scenarios (and, with zen2 chosen, the erratum-1235
    one); counterexample schedules go to ``outdir`` for ``navic run FILE --schedule``."""
    outdir.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in SAFETY_SCENARIOS if (examples / s).is_file()]
    if "zen2" in opts.cpus and (examples / ERRATUM_SCENARIO).is_file():
        scenarios.append(ERRATUM_SCENARIO)
    jobs = [(str(examples / s), d, opts.bound, opts.max_steps, opts.explore_time_limit, str(outdir))
            for s in scenarios for d in designs]
    out: list[dict[str, Any]] = []
    workers = opts.jobs or 2
    if workers <= 1:
        results: Iterable[dict[str, Any]] = map(_explore_one, jobs)
        for r in results:
            out.append(r)
            if progress:
                progress(r)
        return out
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for r in ex.map(_explore_one, jobs):
            out.append(r)
            if progress:
                progress(r)
    return out


# ---------------------------------------------------------------------------------------------
# Judgement
# ---------------------------------------------------------------------------------------------
def _p50(r: dict[str, Any]) -> float | None:
    return r["latency_ns"]["p50"]


def _exits(r: dict[str, Any]) -> float:
    return round(sum(r["exits_per_ipi"].values()), 3)


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def wins(rows: list[dict[str, Any]], unsafe: set[str], lines: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per (workload, CPU): the safe design with the lowest p50, the one with fewest exits per IPI
    (ties go to the design with fewer model ``lines``), and each design's share of the best latency
    gain over the status quo (``none``)."""
    size = lines or {}
    out = []
    keys = dict.fromkeys((r["workload"], r["cpu_model"]) for r in rows if r["level"] == 2)
    for wl, cpu in keys:
        l2 = {r["design"]: r for r in rows if r["workload"] == wl and r["cpu_model"] == cpu and r["level"] == 2
              and _p50(r) is not None}
        safe = {d: r for d, r in l2.items() if d not in unsafe}
        if not safe:
            continue
        fastest = min(safe, key=lambda d: (_p50(safe[d]), _exits(safe[d]), size.get(d, 0)))
        fewest = min(safe, key=lambda d: (_exits(safe[d]), _p50(safe[d]), size.get(d, 0)))
        share = {}
        none = l2.get("none")
        best = _p50(safe[fastest])
        if none is not None and _p50(none) and best is not None and _p50(none) > best:
            share = {d: round((_p50(none) - _p50(r)) / (_p50(none) - best), 3) for d, r in l2.items() if d != "none"}
        out.append({"workload": wl, "category": CATEGORIES.get(wl, wl), "cpu": cpu, "fastest": fastest,
                    "fewest_exits": fewest, "benefit_share": share,
                    "p50_ns": {d: _p50(r) for d, r in l2.items()},
                    "exits_per_ipi": {d: _exits(r) for d, r in l2.items()}})
    return out


def unsafe_designs(safety_rows: list[dict[str, Any]]) -> set[str]:
    """Designs with a counterexample on a nested explore scenario (the erratum scenario's
    counterexamples are reported apart: they show a hardware bug's reach, not a design flaw)."""
    return {s["design"] for s in safety_rows if s.get("result") == "violation" and s["scenario"] != ERRATUM_SCENARIO}


def recommendation(rows: list[dict[str, Any]], safety_rows: list[dict[str, Any]], cx: dict[str, dict[str, Any]],
                   opts: VerdictOptions) -> list[str]:
    """Plain-words conclusions, each computed from the numbers above it."""
    unsafe = unsafe_designs(safety_rows)
    erratum_hit = {s["design"] for s in safety_rows if s.get("result") == "violation"
                   and s["scenario"] == ERRATUM_SCENARIO}
    cpu = opts.cpus[0]
    said: list[str] = []
    l2 = [r for r in rows if r["level"] == 2 and r["cpu_model"] == cpu]
    designs = [d for d in dict.fromkeys(r["design"] for r in l2)]
    score = {d: _geomean([_p50(r) for r in l2 if r["design"] == d]) for d in designs}
    if unsafe:
        said.append(f"Unsafe within bound {opts.bound}: {', '.join(sorted(unsafe))} (counterexamples above); "
                    "they are not recommended whatever they cost.")
    ranked = sorted((d for d in designs if d not in unsafe and score[d]),
                    key=lambda d: (score[d], cx.get(d, {}).get("navic_lines", 0)))
    if not ranked:
        return said + ["No design is safe within the bound: no recommendation."]
    wl_rows = wins(rows, unsafe, {d: c["navic_lines"] for d, c in cx.items()})
    # The thread's question: how much of shadow's gain does dummy get, for how much code?
    pairs = [w for w in wl_rows if w["cpu"] == cpu and w["benefit_share"]]
    if "shadow" in score and "dummy" in score and pairs:
        sh = [w["benefit_share"].get("dummy") for w in pairs if w["benefit_share"].get("dummy") is not None]
        avg = sum(sh) / len(sh) if sh else 0.0
        ratio = cx.get("dummy", {}).get("navic_lines", 0) / max(1, cx.get("shadow", {}).get("navic_lines", 1))
        said.append(f"The thread's question on {cpu}: the dummy table gets {avg:.0%} of the best design's latency "
                    f"gain over the status quo on average over {len(sh)} workloads "
                    f"(min {min(sh):.0%}, max {max(sh):.0%}), with {ratio:.0%} of the shadow design's model code.")
    fastest = ranked[0]
    size = {d: cx.get(d, {}).get("navic_lines", 0) for d in designs}
    # The rule, stated in the output: the fastest safe design, unless one with at most SMALLER of
    # its code is within NEAR of its latency — then that one (same benefit, less to maintain).
    lean = [d for d in ranked[1:] if score[d] <= score[fastest] * (1 + NEAR)
            and size[d] <= size[fastest] * SMALLER]
    best = lean[0] if lean else fastest
    kl = cx.get(best, {}).get("kernel_lines_estimate", 0)
    won = [w["category"] for w in wl_rows if w["cpu"] == cpu and w["fastest"] == best]
    why = ("lowest geometric-mean p50 latency over the workloads" if best == fastest else
           f"within {NEAR:.0%} of the fastest ({fastest}) with at most {SMALLER:.0%} of its model code")
    said.append(f"Recommended on {cpu}: **{best}** — {why} ({score[best]:.0f} ns), safe within bound "
                f"{opts.bound} on every nested explore scenario, {size[best]} navic lines (≈{kl} kernel lines, "
                f"estimated); fastest on: {', '.join(won) or 'no single workload (it ties the fastest on several)'}. "
                f"Rule: the fastest safe design unless another is within {NEAR:.0%} of it with at most "
                f"{SMALLER:.0%} of its lines.")
    churn = {r["design"]: r for r in l2 if r["workload"] == "table-churn"}
    for d in ranked:
        if d == best:
            continue
        wd = [w["category"] for w in wl_rows if w["cpu"] == cpu and w["fastest"] == d]
        wt = churn.get(d, {}).get("write_tracking_per_ipi")
        said.append(f"{d}: geometric-mean p50 {score[d]:.0f} ns ({score[d] / score[best]:.2f}x the recommended), "
                    f"{size[d]} navic lines" + (f"; fastest on: {', '.join(wd)}" if wd else "")
                    + (f"; {wt:g} write-tracking faults per IPI on table churn" if wt else "") + ".")
    if churn.get(best, {}).get("write_tracking_per_ipi"):
        said.append(f"{best} takes {churn[best]['write_tracking_per_ipi']:g} write-tracking faults per IPI "
                    "on table churn.")
    shared = {d: c["vmx_shared_lines"] for d, c in cx.items() if c["vmx_shared_lines"]}
    if shared:
        said.append("Shared with VMX IPI virtualisation: " + ", ".join(
            f"{d} ({n} of {cx[d]['navic_lines']} lines run unchanged for nested VMX)" for d, n in shared.items())
            + "; the shadow designs have no VMX counterpart in navic.")
    if "zen2" in opts.cpus:
        er = [s for s in safety_rows if s["scenario"] == ERRATUM_SCENARIO]
        if er:
            said.append("Erratum 1235 (zen2 with IPI virtualisation forced on, i.e. a pre-8de4a1c8164e kernel; "
                        "KVM's default forces it off and then every design is immune): "
                        + (f"{', '.join(sorted(erratum_hit))} leave an L2 IPI stuck (their L2 table carries "
                           "IsRunning = 1 for the hardware to read stale)" if erratum_hit else "no design is hit")
                        + "; " + (", ".join(sorted({s['design'] for s in er} - erratum_hit)) or "none")
                        + " are immune at the same bound.")
    return said


def assumptions(opts: VerdictOptions) -> list[str]:
    """Everything the verdict rests on that no published figure backs."""
    costs = tomllib.loads((NAVIC / "data" / "costs.toml").read_text())
    assumed = sorted(k for k, v in costs.get("cost", {}).items()
                     if str(v.get("source", "")).startswith("assumption"))
    out = [
        f"Safety is proven only within preemption bound K = {opts.bound}, max {opts.max_steps} steps, on the "
        "explore scenarios listed (small VMs); larger K or VMs are not covered. The search uses the "
        "race-directed reduction (navic explore --reduction dpor): deviations only where steps race, "
        "which treats delays of independent steps as equivalent (docs/verification.md); tests check it "
        "against the full search (--reduction none) on every example and mutant.",
        f"Kernel lines for designs other than shadow are estimates: {RFC_V3_INSERTIONS} (RFC v3 insertions) "
        "x the design's navic lines / shadow's navic lines. navic lines are logical lines of the design's "
        "own modules; code every design shares (L0's nested SVM) is not counted.",
        "Workloads are synthetic (navic/guest/workloads) with the default suite's parameters.",
        f"Cost-model entries without a published figure ({len(assumed)}): {', '.join(assumed)} "
        "(navic/data/costs.toml; docs/calibration.md bounds the calibrated ones).",
    ]
    if "zen5" in opts.cpus:
        out.append("zen5 enumerating X2AVIC_EXT (4096-entry x2AVIC tables) is an assumption: no source found "
                   "says which CPUs do (docs/model.md).")
    return out


# ---------------------------------------------------------------------------------------------
# The whole verdict
# ---------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    opts: VerdictOptions
    rows: list[dict[str, Any]]
    safety: list[dict[str, Any]]
    complexity: dict[str, dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def designs(self) -> tuple[str, ...]:
        return tuple(self.complexity)

    def as_json(self) -> dict[str, Any]:
        unsafe = unsafe_designs(self.safety)
        return {
            "options": {"cpus": list(self.opts.cpus), "workloads": list(self.opts.workloads),
                        "bound": self.opts.bound, "max_steps": self.opts.max_steps},
            "rows": C.public_rows(self.rows),
            "safety": self.safety,
            "complexity": self.complexity,
            "wins": wins(self.rows, unsafe, {d: c["navic_lines"] for d, c in self.complexity.items()}),
            "recommendation": recommendation(self.rows, self.safety, self.complexity, self.opts),
            "assumptions": assumptions(self.opts),
            "skipped": self.skipped,
        }


def run_verdict(opts: VerdictOptions, examples: Path | None, outdir: Path, *,
                progress: Callable[[str], None] | None = None) -> Verdict:
    designs = opts.designs or nested_designs()
    rows, skipped = C.run_suite(cases(opts), jobs=opts.jobs,
                                progress=(lambda r: progress(f"{r['workload']} @ {r['config']}")) if progress else None)
    saf = safety(opts, examples, designs, outdir,
                 progress=(lambda s: progress(f"explore {s['scenario']} --design {s['design']}")) if progress
                 else None) if examples is not None else []
    return Verdict(opts, rows, saf, complexity(designs), skipped)


def cost_complexity_section(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown for ``navic compare``'s report: the cost side of the verdict (no explorer runs)."""
    designs = tuple(dict.fromkeys(r["design"] for r in rows if r["level"] == 2))
    if not designs:
        return []
    cx = complexity(designs)
    out = ["## Verdict: cost against complexity", "",
           "Safety needs the explorer: `navic verdict` adds it and a recommendation.", "",
           "| design | navic lines | kernel lines (est.) | geomean p50 ns (" +
           ", ".join(sorted({r['cpu_model'] for r in rows if r['level'] == 2})) + ") | mean exits/IPI |",
           "|---|---|---|---|---|"]
    for d in designs:
        mine = [r for r in rows if r["level"] == 2 and r["design"] == d]
        g = _geomean([_p50(r) for r in mine])
        ex = sum(_exits(r) for r in mine) / len(mine)
        out.append(f"| {d} | {cx[d]['navic_lines']} | {cx[d]['kernel_lines_estimate']} | "
                   f"{g:.0f} | {ex:.2f} |" if g else f"| {d} | {cx[d]['navic_lines']} | - | - | - |")
    return out + [""]


def markdown(v: Verdict, command: str) -> str:
    doc = v.as_json()
    L = ["# navic verdict", "", f"Produced by `{command}`.", "",
         "Question: is full nested (x2)AVIC (shadowing L1's physical ID tables with write tracking) worth its "
         "code, or does one dummy table with L0-emulated IPIs get most of the benefit — and what beats both?", "",
         "## Recommendation", ""]
    L += [f"- {s}" for s in doc["recommendation"]] + [""]
    L += ["## Safety", "", "| scenario | design | bound | result | states | seconds |", "|---|---|---|---|---|---|"]
    for s in v.safety:
        res = s["result"]
        if res == "violation":
            vi = s["violation"]
            res = f"**{vi['kind']}** {vi['cpu']} {vi['vector']:#x}" if isinstance(vi.get("vector"), int) \
                else f"**{vi['kind']}** {vi['cpu']}"
            if s.get("schedule_file"):
                res += f" (`{Path(s['schedule_file']).name}`)"
        elif res == "n/a":
            res = f"n/a: {s.get('why', '')}"
        L.append(f"| {s['scenario']} | {s['design']} | {s['bound']} | {res} | {s.get('states', '-')} | "
                 f"{s.get('seconds', '-')} |")
    L += ["", "## Cost", "", "| workload | config | exits/IPI L0 / L0←L2 / L1 | world sw/IPI | p50 ns | p99 ns | "
          "L0 cyc/IPI | L1 cyc/IPI | violations |", "|---|---|---|---|---|---|---|---|---|"]
    for r in v.rows:
        e = r["exits_per_ipi"]
        L.append(f"| {r['workload']} | {r['config']} | {e['l0']:g} / {e['l0_l2']:g} / {e['l1']:g} | "
                 f"{r['world_switches_per_ipi']:g} | {C._fmt(r['latency_ns']['p50'])} | "
                 f"{C._fmt(r['latency_ns']['p99'])} | "
                 f"{C._fmt(r['cycles_per_ipi']['l0'])} | {C._fmt(r['cycles_per_ipi']['l1'])} | {r['violations']} |")
    L += ["", "## Complexity", "", "| design | navic lines | modules | shared with VMX | kernel lines | method |",
          "|---|---|---|---|---|---|"]
    for d, c in v.complexity.items():
        mods = ", ".join(f"{Path(m).name} ({n})" for m, n in c["modules"].items()) or "-"
        L.append(f"| {d} | {c['navic_lines']} | {mods} | {c['vmx_shared_lines'] or '-'} | "
                 f"{c['kernel_lines_estimate']} | {c['kernel_lines_method']} |")
    L += ["", "## Where each wins", "", "| category | cpu | fastest | fewest exits | share of best gain over none |",
          "|---|---|---|---|---|"]
    for w in doc["wins"]:
        share = ", ".join(f"{d} {s:.0%}" for d, s in w["benefit_share"].items()) or "-"
        L.append(f"| {w['category']} | {w['cpu']} | {w['fastest']} | {w['fewest_exits']} | {share} |")
    L += ["", "![p50 latency, design x workload](verdict-heatmap.png)", "",
          "![cost against complexity](verdict-cost-complexity.png)", "", "## Assumptions", ""]
    L += [f"- {a}" for a in doc["assumptions"]] + [""]
    return "\n".join(L)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(v: Verdict, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    l2 = [r for r in v.rows if r["level"] == 2]
    cols = list(dict.fromkeys(f"{r['workload']}\n{r['cpu_model']}" for r in l2))
    designs = list(dict.fromkeys(r["design"] for r in l2))
    if l2:
        grid = [[math.nan] * len(cols) for _ in designs]
        for r in l2:
            if _p50(r):
                grid[designs.index(r["design"])][cols.index(f"{r['workload']}\n{r['cpu_model']}")] = _p50(r)
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cols)), 1 + 0.6 * len(designs)))
        im = ax.imshow([[math.log10(x) if x == x else math.nan for x in row] for row in grid], cmap="viridis_r",
                       aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=45, ha="right")
        ax.set_yticks(range(len(designs)), designs)
        for i, row in enumerate(grid):
            for j, x in enumerate(row):
                if x == x:
                    light = im.norm(math.log10(x)) < 0.5   # viridis_r is light at the low end
                    ax.text(j, i, f"{x:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
        fig.colorbar(im, ax=ax, label="log10 p50 latency (ns)")
        ax.set_title("L2 IPI p50 latency (ns) per design and workload")
        made.append(_save(plt, fig, outdir / "verdict-heatmap.png"))
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for d in designs:
            g = _geomean([_p50(r) for r in l2 if r["design"] == d])
            n = v.complexity.get(d, {}).get("navic_lines", 0)
            if g:
                ax.scatter([n], [g], s=60)
                ax.annotate(d, (n, g), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("navic model lines of the design (proxy for kernel code)")
        ax.set_ylabel("geometric-mean p50 L2 IPI latency (ns)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title("cost against complexity")
        made.append(_save(plt, fig, outdir / "verdict-cost-complexity.png"))
    return made


def write_verdict(v: Verdict, outdir: Path, command: str) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    js = outdir / "verdict.json"
    js.write_text(json.dumps(v.as_json(), indent=2, sort_keys=True) + "\n")
    md = outdir / "verdict.md"
    md.write_text(markdown(v, command))
    return {"json": js, "markdown": md, **{p.stem: p for p in write_plots(v, outdir)}}
