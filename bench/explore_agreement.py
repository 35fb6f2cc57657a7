"""Cross-check a reduction against the full search (issue 15): for every mutant (and none) on
every explore example and corpus scenario — the nested ones under each of dummy, shadow and none —
run `navic explore` with `--reduction none` and with the reduction, and compare the verdicts.

    .venv/bin/python bench/explore_agreement.py                       # dpor, K = 1, every pair, -j 2
    .venv/bin/python bench/explore_agreement.py --reduction dpor-untimed --mutant e
    .venv/bin/python bench/explore_agreement.py --k 2 --no-mutants     # the scenarios alone at K = 2

One line per pair whose verdicts differ or where either search found a violation: OK or DIFFERS,
the mutant, scenario and design, then (violation kind, CPU, vector) or None, complete, timed out,
schedules for each search. A pair agrees when both give the same violation key and both
completed, or when either hit ``--time-limit`` (reported as TIME, not as agreement). The last
line counts pairs, agreements, disagreements and time-outs; the exit status is 1 if any pair
disagreed.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from navic.check import explore as X  # noqa: E402
from navic.check import mutants  # noqa: E402
from navic.scenario import load_scenario  # noqa: E402

EX = ROOT / "examples"


def _key(o: X.Outcome) -> Any:
    v = o.violation
    return None if v is None else list(X.violation_key(v))


def pair(job: tuple[str | None, str, str | None, int, str, float]) -> dict[str, Any]:
    mutant, path, design, k, reduction, limit = job
    scn = load_scenario(path)
    res = {}
    for r in ("none", reduction):
        o = X.Explorer(scn, X.Options(preemptions=k, design=design, mutant=mutant, reduction=r,
                                      time_limit=limit)).run()
        res[r] = (_key(o), o.complete, o.timed_out, o.progress.schedules)
    full, red = res["none"], res[reduction]
    if full[2] or red[2]:
        status = "TIME"
    elif full[:2] == red[:2]:
        status = "OK"
    else:
        status = "DIFFERS"
    return {"status": status, "mutant": mutant, "scenario": Path(path).name, "design": design,
            "none": full, reduction: red}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduction", default="dpor", choices=["dpor", "dpor-untimed", "sleep"])
    ap.add_argument("--k", type=int, default=1, help="preemption bound (default 1)")
    ap.add_argument("--mutant", action="append", help="only these mutants (default: all, and none)")
    ap.add_argument("--no-mutants", action="store_true", help="the scenarios without a mutant only")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="pairs checked in parallel (default 2)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per search (default 300)")
    a = ap.parse_args()
    names: list[str | None] = (list(a.mutant) if a.mutant else [None] if a.no_mutants
                               else [None, *sorted(mutants.MUTANTS)])
    paths = sorted(EX.glob("explore-*.toml")) + sorted((EX / "corpus").glob("*.toml"))
    jobs = [(m, str(p), d, a.k, a.reduction, a.time_limit)
            for m in names for p in paths
            for d in (["dummy", "shadow", "none"] if p.name.startswith("explore-nested") else [None])]
    print("$ .venv/bin/python bench/explore_agreement.py " + " ".join(sys.argv[1:]))
    print(f"# {len(jobs)} pairs, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    counts = {"OK": 0, "DIFFERS": 0, "TIME": 0}
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for r in pool.map(pair, jobs):
            counts[r["status"]] += 1
            if r["status"] != "OK" or r["none"][0] is not None:
                print(f"{r['status']:7} {r['mutant'] or '-'} {r['scenario']} {r['design'] or '-'} "
                      f"none={tuple(r['none'])} {a.reduction}={tuple(r[a.reduction])}", flush=True)
    print(f"pairs {len(jobs)}, agree {counts['OK']}, differ {counts['DIFFERS']}, time-outs {counts['TIME']}")
    sys.exit(1 if counts["DIFFERS"] else 0)


if __name__ == "__main__":
    main()
