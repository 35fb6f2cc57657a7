"""Explorer benchmarks (issue 15): states, states/s and wall time of `navic explore` per scenario
and bound, serial and with local worker processes.

    .venv/bin/python bench/explore.py                  # K = 1, 2 (3 for the nested ping-pong), -j 1 and 2
    .venv/bin/python bench/explore.py --quick          # K = 1 only, two cases
    .venv/bin/python bench/explore.py --k 3 --only nested-pingpong-shadow --jobs 2 --time-limit 300

One line per (case, K, reduction, jobs): states, schedules, wall seconds, states/s, CPU seconds
(this process plus its finished workers), verdict; for jobs > 1 the speed-up over jobs = 1 of the
same case, K and reduction measured in this run and the parallel efficiency (serial CPU /
parallel CPU: what the speed-up would be per worker on an idle machine); for a reduction, its
states and wall time against the full search (``none``) of the same case and K in this run. The
machine may be shared: compare ratios measured within one run; `--time-limit` bounds each search
(a cut search prints "partial").
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from navic.check.explore import Explorer, Options  # noqa: E402
from navic.scenario import load_scenario, loads_scenario  # noqa: E402

EX = ROOT / "examples"

# One 3-vCPU L2 scenario: L2 vCPU 0 broadcasts to the other two (HLT receivers), which answer;
# 3 L1 vCPUs on 3 pCPUs, zen4, the scenario's design overridden per case.
NESTED3 = '''name = "bench-nested-3vcpu-broadcast"
seed = 1
max_time_us = 400
[host]
cpu = "zen4"
pcpus = 3
virt = "kvm"
[l0]
halt_poll_ns = 0
nested_apicv = "{design}"
[l1]
vcpus = 3
apic = "x2apic"
[l2]
vcpus = 3
apic = "xapic"
[[program]]
cpu = "l2.0"
ops = [ {{ op = "sti" }}, {{ op = "ipi", shorthand = "others", vector = 0x50 }},
        {{ op = "wait", vector = 0x51, count = 2, how = "hlt" }} ]
[[program]]
cpu = "l2.1"
ops = [ {{ op = "sti" }}, {{ op = "wait", vector = 0x50, how = "hlt" }} ]
[[program]]
cpu = "l2.2"
ops = [ {{ op = "sti" }}, {{ op = "wait", vector = 0x50, how = "hlt" }} ]
[program.handlers]
0x50 = [ {{ op = "ipi", to = 0, vector = 0x51 }}, {{ op = "eoi" }} ]
'''


def _file(name: str, design: str | None = None) -> tuple[Any, str | None]:
    return load_scenario(str(EX / name)), design


def _nested3(design: str) -> tuple[Any, str | None]:
    return loads_scenario(NESTED3.format(design=design), source="<bench-nested-3vcpu>"), None


# name -> (scenario factory, bounds)
CASES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "nested-pingpong-none": (lambda: _file("explore-nested-pingpong.toml", "none"), (1, 2, 3)),
    "nested-pingpong-shadow": (lambda: _file("explore-nested-pingpong.toml", "shadow"), (1, 2, 3)),
    "nested-pingpong-dummy": (lambda: _file("explore-nested-pingpong.toml", "dummy"), (1, 2, 3)),
    "nested-broadcast-dummy": (lambda: _file("explore-nested-broadcast.toml", "dummy"), (1, 2)),
    "erratum1235": (lambda: _file("explore-erratum1235.toml"), (1, 2)),
    "erratum1235-ipiv-auto": (lambda: _file("explore-erratum1235-ipiv-auto.toml"), (1, 2)),
    "erratum1235-shadow": (lambda: _file("explore-erratum1235-shadow.toml"), (1, 2)),
    "erratum1235-shadow-ipiv-auto": (lambda: _file("explore-erratum1235-shadow-ipiv-auto.toml"), (1, 2)),
    "nested-3vcpu-broadcast-dummy": (lambda: _nested3("dummy"), (1, 2)),
}
QUICK = ("nested-pingpong-dummy", "erratum1235")


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, k: int, jobs: int, time_limit: float | None, leaf_hashing: bool = True,
            reduction: str = "none") -> dict[str, Any]:
    scn, design = CASES[name][0]()
    opts = Options(preemptions=k, design=design, jobs=jobs, time_limit=time_limit, leaf_hashing=leaf_hashing,
                   reduction=reduction)
    cpu0, t0 = _cpu(), time.monotonic()
    out = Explorer(scn, opts).run()
    wall, cpu = time.monotonic() - t0, _cpu() - cpu0
    p = out.progress
    if out.violation is not None:
        verdict = f"{out.violation['kind']} {out.violation['cpu']} {out.violation['vector']:#x}"
    else:
        verdict = "clean" if out.complete else f"partial (bounds 0..{p.complete_bound} done)"
    return {"case": name, "k": k, "jobs": jobs, "states": p.states, "schedules": p.schedules,
            "wall": wall, "cpu": cpu, "rate": p.states / wall if wall else 0.0, "verdict": verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K = 1 only, cases " + ", ".join(QUICK))
    ap.add_argument("--only", action="append", choices=sorted(CASES), help="run only these cases")
    ap.add_argument("--k", type=int, action="append", help="only these bounds (default: each case's)")
    ap.add_argument("--jobs", type=int, action="append", help="worker counts (default: 1 and 2)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per search (default 300)")
    ap.add_argument("--no-leaf-hash", action="store_true", help="as navic explore --no-leaf-hash")
    ap.add_argument("--reduction", action="append", choices=["none", "sleep", "dpor", "dpor-untimed"],
                    help="reductions to compare (default: none and dpor)")
    a = ap.parse_args()
    names = a.only or (list(QUICK) if a.quick else list(CASES))
    jobs = a.jobs or [1, 2]
    reductions = a.reduction or ["none", "dpor"]
    print("$ .venv/bin/python bench/explore.py " + " ".join(sys.argv[1:]))
    print(f"# {os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'case':32} {'K':>2} {'reduction':>9} {'-j':>3} {'states':>9} {'schedules':>9} {'wall s':>8} "
          f"{'states/s':>9} {'cpu s':>8}  verdict")
    for name in names:
        bounds = a.k or ((1,) if a.quick else CASES[name][1])
        for k in bounds:
            full: dict[str, Any] | None = None
            for red in reductions:
                serial: dict[str, Any] | None = None
                for j in jobs:
                    if red == "sleep" and j > 1:
                        continue
                    r = measure(name, k, j, a.time_limit, leaf_hashing=not a.no_leaf_hash, reduction=red)
                    extra = ""
                    if j == 1:
                        serial = r
                    elif serial is not None and r["wall"] > 0 and r["cpu"] > 0:
                        extra = (f"  speed-up {serial['wall'] / r['wall']:.2f}x, "
                                 f"efficiency {serial['cpu'] / r['cpu']:.2f}")
                    if red == "none" and full is None:
                        full = r
                    elif full is not None and red != "none" and r["states"]:
                        extra += (f"  {full['states'] / r['states']:.1f}x fewer states, "
                                  f"{full['wall'] / r['wall']:.1f}x faster than none -j {full['jobs']}"
                                  + ("" if r["verdict"] == full["verdict"] else "  VERDICT DIFFERS"))
                    print(f"{name:32} {k:>2} {red:>9} {j:>3} {r['states']:>9} {r['schedules']:>9} "
                          f"{r['wall']:>8.1f} {r['rate']:>9.0f} {r['cpu']:>8.1f}  {r['verdict']}{extra}", flush=True)


if __name__ == "__main__":
    main()
