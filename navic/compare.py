"""``navic compare``: run a suite of workloads over the standard configurations and compare them.

A *configuration* is a named way to run a workload: bare metal, L1 under KVM with or without APIC
virtualisation, or L2 under one of the nested designs (see :data:`CONFIGS`; the names are part of
the public contract). A *suite* is a list of cases (a workload with its parameters, VM size and APIC
mode) and the configurations to run each on; the default suite is built in, ``--suite FILE``
reads another (TOML, docs/compare.md).

Each (case, configuration) becomes an ordinary scenario, run by :func:`navic.runner.run_scenario`;
the row metrics are computed from its result only, so a row can always be reproduced with
``navic run``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navic.scenario import ScenarioError, parse_scenario


@dataclass(frozen=True)
class ConfigSpec:
    """How a configuration turns a case into a scenario."""

    name: str
    cpu: str
    level: int                 # where the workload runs: 1 (L1 or bare metal) or 2
    virt: str = "kvm"
    design: str | None = None  # nested design for level-2 configs
    l0: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


CONFIGS: dict[str, ConfigSpec] = {c.name: c for c in (
    ConfigSpec("bare", "zen4", 1, virt="none", doc="bare metal: the baseline"),
    ConfigSpec("l1-noapicv", "zen4", 1, l0={"apicv": False}, doc="L1, APIC virtualisation off (emulated APIC)"),
    ConfigSpec("l1-avic-zen4", "zen4", 1, doc="L1 with AVIC/x2AVIC on Zen 4"),
    ConfigSpec("l1-avic-zen2", "zen2", 1, l0={"avic": True},
               doc="L1 with AVIC on Zen 2 (kvm_amd avic=1: the default \"auto\" is off before Zen 4); "
                   "enable_ipiv forced off (erratum 1235)"),
    ConfigSpec("l1-ipiv-spr", "spr", 1, doc="L1 with APICv + IPI virtualisation on Sapphire Rapids"),
    *(ConfigSpec(f"l2-{d}-{cpu}", cpu, 2, design=d, l0={"avic": True} if cpu == "zen2" else {},
                 doc=f"L2, nested design '{d}' on {cpu}")
      for cpu in ("zen4", "zen2") for d in ("none", "shadow", "dummy")),
    *(ConfigSpec(f"l2-{d}-zen5", "zen5", 2, design=d,
                 doc=f"L2, nested design '{d}' on zen5 (its X2AVIC_EXT is an assumption)")
      for d in ("shadow", "dummy")),
    *(ConfigSpec(f"l2-shadow-x2avic-{cpu}", cpu, 2, design="shadow-x2avic",
                 doc=f"L2, shadow tables extended to x2AVIC (512/4096 entries) on {cpu}")
      for cpu in ("zen4", "zen5")),
    ConfigSpec("l2-none-spr", "spr", 2, design="none", doc="L2 on SPR, no nested APICv"),
    ConfigSpec("l2-dummy-spr", "spr", 2, design="dummy", doc="L2 on SPR, dummy PID-pointer table"),
    *(ConfigSpec(f"l2-runcache-{cpu}", cpu, 2, design="runcache",
                 doc=f"L2, nested design 'runcache' (dummy table + L0's IsRunning for running L2 vCPUs) on {cpu}")
      for cpu in ("zen4", "zen5", "zen2")),
)}

DEFAULT_CONFIGS = tuple(CONFIGS)

# Where the CPU models go beyond the sources (docs/model.md "KVM fidelity (issue 13)"), printed in
# every report.
MODEL_ASSUMPTIONS = (
    "zen5 enumerates X2AVIC_EXT (CPUID Fn8000_000A_ECX[6]: x2AVIC physical IDs up to 4095): an "
    "assumption. KVM supports it (\"Add AVIC support for 4k vCPUs in x2AVIC mode\"), but no source "
    "found says which CPUs enumerate it; zen5 rows with more than 512 vCPUs depend on it.",
)


@dataclass(frozen=True)
class Case:
    workload: str
    params: dict[str, Any] = field(default_factory=dict)
    vcpus: int = 2
    apic: str = "x2apic"                  # the workload VM's APIC mode (L1, or L2 for l2-* configs)
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    max_time_us: float = 50_000.0
    seed: int = 1
    name: str = ""                        # table label; default the workload kind
    l1_apic: str = "x2apic"               # L1's own APIC mode in l2-* configs
    l1_vcpus: int = 0                     # L1's vCPUs in l2-* configs (0 = vcpus; fewer = overcommit)

    @property
    def label(self) -> str:
        return self.name or self.workload


DEFAULT_SUITE: tuple[Case, ...] = (
    Case("ipi-pingpong", {"iterations": 200}, vcpus=2, apic="xapic"),
    Case("ipi-pingpong", {"iterations": 200}, vcpus=2, apic="x2apic", name="ipi-pingpong-x2apic"),
    Case("ipi-halt", {"iterations": 40, "gap_cycles": 60_000}, vcpus=2, apic="xapic"),
    Case("tlb-shootdown", {"iterations": 5, "mode": "broadcast"}, vcpus=8, apic="xapic"),
    Case("hackbench", {"iterations": 20}, vcpus=4, apic="xapic"),
    Case("table-churn", {"rounds": 20}, vcpus=4, apic="xapic", l1_vcpus=2),
)


def scenario_dict(case: Case, cfg: ConfigSpec) -> dict[str, Any]:
    """The scenario (as a TOML-shaped dict) that runs ``case`` under ``cfg``."""
    vcpus = case.vcpus
    d: dict[str, Any] = {
        "name": f"{case.label}@{cfg.name}",
        "seed": case.seed,
        "max_time_us": case.max_time_us,
        "host": {"cpu": cfg.cpu, "virt": cfg.virt, "pcpus": max(vcpus, 2)},
        "l1": {"vcpus": vcpus if cfg.level == 1 else case.l1_vcpus or vcpus,
               "apic": case.apic if cfg.level == 1 else case.l1_apic},
        "workload": {"kind": case.workload, **case.params},
    }
    l0 = dict(cfg.l0)
    if cfg.level == 2:
        d["l2"] = {"vcpus": vcpus, "apic": case.apic}
        d["workload"]["level"] = "l2"
        l0["nested_apicv"] = cfg.design
    if l0:
        d["l0"] = l0
    return d


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[k]


def row_metrics(case: Case, cfg: ConfigSpec, result: dict[str, Any]) -> dict[str, Any]:
    """One table row from a run result (all per-IPI figures divide by the IPIs delivered)."""
    prefix = f"l{cfg.level}."   # the workload's own CPUs (not L1's kernel IPIs in nested runs)
    mine = [d for d in result["deliveries"] if d["cpu"].startswith(prefix)]
    ipi = [d for d in mine if d.get("sent_by") is not None]
    basis = ipi or mine
    n = max(1, len(basis))
    exits = result.get("exits", {})
    counters = result.get("counters", {})

    def per(x: float) -> float:
        return round(x / n, 3)

    lat = [d["latency_ns"] for d in basis if d.get("latency_ns") is not None]
    return {
        "workload": case.label,
        "kind": case.workload,
        "config": cfg.name,
        "cpu_model": cfg.cpu,
        "level": cfg.level if cfg.virt == "kvm" else 0,
        "design": cfg.design,
        "ipis": len(basis),
        "exits_per_ipi": {lvl: per(sum(exits.get(lvl, {}).values())) for lvl in ("l0", "l0_l2", "l1")},
        "exit_reasons": {f"{lvl}:{r}": per(c) for lvl, rs in sorted(exits.items()) for r, c in sorted(rs.items())},
        "world_switches_per_ipi": per(counters.get("vmruns", 0) + counters.get("nested_vmrun", 0)),
        "doorbells_per_ipi": per(counters.get("doorbells_sent", 0)),
        "write_tracking_per_ipi": per(counters.get("npf_write_tracking", 0)),
        "latency_ns": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)},
        "latencies_ns": lat,
        "cycles_per_ipi": {"l0": per(counters.get("l0_cycles", 0)), "l1": per(counters.get("l1_cycles", 0))},
        "violations": len(result.get("violations", [])),
        "sim_time_cycles": result.get("sim_time_cycles"),
    }


def _run_one(job: tuple[Case, str]) -> dict[str, Any]:
    from navic.runner import UnsupportedScenario, run_scenario

    case, cfg_name = job
    cfg = CONFIGS[cfg_name]
    try:
        scn = parse_scenario(scenario_dict(case, cfg), f"<compare {case.workload}@{cfg_name}>")
        result = run_scenario(scn)
    except (UnsupportedScenario, ScenarioError) as e:
        return {"workload": case.label, "config": cfg_name, "skipped": str(e).split(": ", 1)[-1]}
    return row_metrics(case, cfg, result)


def run_suite(cases: Iterable[Case], *, jobs: int | None = None,
              progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Run every (case, configuration); returns (rows, skipped) in suite order."""
    work = [(c, cfg) for c in cases for cfg in c.configs]
    jobs = jobs if jobs is not None else min(len(work), os.cpu_count() or 1)
    out: list[dict[str, Any]] = []
    if jobs <= 1:
        for w in work:
            r = _run_one(w)
            out.append(r)
            if progress:
                progress(r)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for r in ex.map(_run_one, work):
                out.append(r)
                if progress:
                    progress(r)
    rows = [r for r in out if "skipped" not in r]
    skipped = [r for r in out if "skipped" in r]
    return rows, skipped


def load_suite(path: str | Path) -> tuple[Case, ...]:
    """A suite file: ``[[case]]`` tables with workload, params (inline table), vcpus, apic, configs,
    max_time_us, seed. Errors name the file and key path like scenario errors."""
    path = Path(path)
    src = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ScenarioError(src, "", f"cannot read file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(src, "", f"invalid TOML: {e}") from None
    cases = []
    raw_cases = data.get("case")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise ScenarioError(src, "case", "expected one or more [[case]] tables, got none")
    for i, raw in enumerate(raw_cases):
        p = f"case[{i}]"
        keys = {"workload", "params", "vcpus", "apic", "configs", "max_time_us", "seed", "name", "l1_apic",
                "l1_vcpus"}
        unknown = set(raw) - keys
        if unknown:
            raise ScenarioError(src, f"{p}.{sorted(unknown)[0]}",
                                f"unknown key; expected one of {', '.join(sorted(keys))}")
        if "workload" not in raw:
            raise ScenarioError(src, f"{p}.workload", "expected a workload name, got nothing")
        configs = tuple(raw.get("configs", DEFAULT_CONFIGS))
        for j, c in enumerate(configs):
            if c not in CONFIGS:
                raise ScenarioError(src, f"{p}.configs[{j}]",
                                    f"expected one of {', '.join(CONFIGS)}, got {c!r}")
        case = Case(raw["workload"], dict(raw.get("params", {})), int(raw.get("vcpus", 2)),
                    raw.get("apic", "x2apic"), configs, float(raw.get("max_time_us", 50_000.0)),
                    int(raw.get("seed", 1)), str(raw.get("name", "")), raw.get("l1_apic", "x2apic"),
                    int(raw.get("l1_vcpus", 0)))
        # Validate through the scenario checker once (names the key path on error).
        try:
            parse_scenario(scenario_dict(case, CONFIGS["bare"]), f"{src}: {p}")
        except ScenarioError as e:
            raise ScenarioError(src, f"{p}.{e.path.replace('workload.', 'params.')}", e.message) from None
        cases.append(case)
    return tuple(cases)


def summary_text(rows: list[dict[str, Any]]) -> str:
    """A short "what this means" paragraph, generated from the numbers."""
    by = {(r["workload"], r["config"]): r for r in rows}
    out = []
    for wl in dict.fromkeys(r["workload"] for r in rows):
        bare = by.get((wl, "bare"))
        emu = by.get((wl, "l1-noapicv"))
        avic = by.get((wl, "l1-avic-zen4"))
        zen2 = by.get((wl, "l1-avic-zen2"))
        ipiv = by.get((wl, "l1-ipiv-spr"))
        parts = []
        if bare and avic and emu and bare["latency_ns"]["p50"] and avic["latency_ns"]["p50"]:
            parts.append(
                f"{wl}: with AVIC (zen4) an interrupt costs {avic['exits_per_ipi']['l0']:g} L0 exits and "
                f"{avic['latency_ns']['p50']:.0f} ns (p50), against {emu['exits_per_ipi']['l0']:g} exits and "
                f"{emu['latency_ns']['p50']:.0f} ns with an emulated APIC; bare metal takes "
                f"{bare['latency_ns']['p50']:.0f} ns.")
        if zen2 and avic:
            parts.append(f"On zen2, KVM's erratum-1235 workaround (IPI virtualisation off) turns that into "
                         f"{zen2['exits_per_ipi']['l0']:g} exits per interrupt.")
        if ipiv and ipiv["latency_ns"]["p50"]:
            parts.append(f"Intel IPIv: {ipiv['exits_per_ipi']['l0']:g} exits, {ipiv['latency_ns']['p50']:.0f} ns.")
        l2 = [r for r in rows if r["workload"] == wl and r["level"] == 2 and r["latency_ns"]["p50"]]
        z4 = {r["design"]: r for r in l2 if r["cpu_model"] == "zen4"}
        if all(d in z4 for d in ("shadow", "dummy", "none")):
            parts.append("In L2 on zen4: " + "; ".join(
                f"{d} {z4[d]['exits_per_ipi']['l0_l2']:g} L0-only + {z4[d]['exits_per_ipi']['l1']:g} L1 exits, "
                f"{z4[d]['latency_ns']['p50']:.0f} ns" for d in z4) + ".")
        if l2:
            best = min(l2, key=lambda r: r["latency_ns"]["p50"])
            worst = max(l2, key=lambda r: r["latency_ns"]["p50"])
            parts.append(f"Nested: {best['config']} is fastest ({best['latency_ns']['p50']:.0f} ns, "
                         f"{best['exits_per_ipi']['l0_l2'] + best['exits_per_ipi']['l1']:g} exits) and "
                         f"{worst['config']} slowest ({worst['latency_ns']['p50']:.0f} ns).")
        bad = [r["config"] for r in rows if r["workload"] == wl and r["violations"]]
        if bad:
            parts.append(f"Violations were found under {', '.join(bad)} — see results.json.")
        if parts:
            out.append(" ".join(parts))
    return "\n\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


TABLE_COLUMNS = (
    ("config", lambda r: r["config"]),
    ("ipis", lambda r: r["ipis"]),
    ("L0 exits/ipi", lambda r: r["exits_per_ipi"]["l0"]),
    ("L0←L2 exits/ipi", lambda r: r["exits_per_ipi"]["l0_l2"]),
    ("L1 exits/ipi", lambda r: r["exits_per_ipi"]["l1"]),
    ("world sw/ipi", lambda r: r["world_switches_per_ipi"]),
    ("doorbells/ipi", lambda r: r["doorbells_per_ipi"]),
    ("p50 ns", lambda r: r["latency_ns"]["p50"]),
    ("p99 ns", lambda r: r["latency_ns"]["p99"]),
    ("L0 cyc/ipi", lambda r: r["cycles_per_ipi"]["l0"]),
    ("L1 cyc/ipi", lambda r: r["cycles_per_ipi"]["l1"]),
    ("violations", lambda r: r["violations"]),
)


def markdown_report(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], command: str) -> str:
    lines = ["# navic compare", "", f"Produced by `{command}`.", "", "## What this means", "",
             summary_text(rows) or "(no comparable rows)", ""]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        lines += [f"## {wl}", "", "| " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |",
                  "|" + "---|" * len(TABLE_COLUMNS)]
        for r in rows:
            if r["workload"] == wl:
                lines.append("| " + " | ".join(_fmt(f(r)) for _, f in TABLE_COLUMNS) + " |")
        lines += ["", f"![latency CDF]({_slug(wl)}-latency-cdf.png)",
                  f"![exits per IPI]({_slug(wl)}-exits.png)", ""]
    from navic.verdict import cost_complexity_section

    lines += cost_complexity_section(rows)
    lines += ["## Model assumptions", "", *(f"* {a}" for a in MODEL_ASSUMPTIONS), ""]
    if skipped:
        lines += ["## Not run", "", "| workload | config | why |", "|---|---|---|"]
        lines += [f"| {s['workload']} | {s['config']} | {s['skipped']} |" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s)


def write_plots(rows: list[dict[str, Any]], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for wl in dict.fromkeys(r["workload"] for r in rows):
        wrows = [r for r in rows if r["workload"] == wl]
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in wrows:
            lat = sorted(r["latencies_ns"])
            if lat:
                ys = [(i + 1) / len(lat) for i in range(len(lat))]
                ax.step(lat, ys, where="post", label=r["config"])
        ax.set_xscale("log")
        ax.set_xlabel("interrupt latency, send to handler (ns, log scale)")
        ax.set_ylabel("fraction of interrupts")
        ax.set_title(f"{wl}: latency CDF per configuration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        p = outdir / f"{_slug(wl)}-latency-cdf.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

        reasons = sorted({k for r in wrows for k in r["exit_reasons"]})
        fig, ax = plt.subplots(figsize=(9, 5))
        bottom = [0.0] * len(wrows)
        for reason in reasons:
            vals = [r["exit_reasons"].get(reason, 0.0) for r in wrows]
            ax.bar([r["config"] for r in wrows], vals, bottom=bottom, label=reason)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("exits per interrupt")
        ax.set_title(f"{wl}: exits per interrupt by level and reason")
        ax.tick_params(axis="x", rotation=45)
        if reasons:
            ax.legend(fontsize=7)
        p = outdir / f"{_slug(wl)}-exits.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as results.json publishes them (without the raw latency lists)."""
    return [{k: v for k, v in r.items() if k != "latencies_ns"} for r in rows]


def write_traces(cases: Iterable[Case], outdir: Path, iterations: int = 20) -> list[Path]:
    """One Perfetto trace per configuration for the (first) ping-pong case, kept short."""
    from navic.runner import UnsupportedScenario, simulate
    from navic.sim.perfetto import chrome_trace

    case = next((c for c in cases if c.workload == "ipi-pingpong"), None)
    if case is None:
        return []
    small = dataclasses.replace(case, params={**case.params, "iterations": iterations})
    out = []
    for cfg_name in small.configs:
        cfg = CONFIGS[cfg_name]
        try:
            run = simulate(parse_scenario(scenario_dict(small, cfg), f"<trace {cfg_name}>"), trace=True)
        except (UnsupportedScenario, ScenarioError):
            continue
        p = outdir / f"trace-{_slug(small.label)}-{cfg_name}.json"
        p.write_text(json.dumps(chrome_trace(run), sort_keys=True) + "\n")
        out.append(p)
    return out


def write_report(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], outdir: Path, command: str
                 ) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    res = outdir / "results.json"
    res.write_text(json.dumps({"rows": public_rows(rows), "skipped": skipped, "command": command},
                              indent=2, sort_keys=True) + "\n")
    md = outdir / "report.md"
    md.write_text(markdown_report(rows, skipped, command))
    plots = write_plots(rows, outdir)
    return {"results": res, "report": md, **{p.stem: p for p in plots}}
