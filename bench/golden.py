"""Equivalence guard for performance work: capture every observable output of a fixed set of
runs, then check that a changed tree reproduces them byte for byte.

    .venv/bin/python bench/golden.py capture /tmp/golden     # on the reference tree
    .venv/bin/python bench/golden.py check /tmp/golden       # after a change: exit 1 on any diff

Covers: `navic run --json` and `--trace-text` on every example, the ipi workloads on bare metal,
L1 (zen4, zen2, spr) and L2 (none/shadow/dummy), `navic compare --json` with its Perfetto traces,
and `navic explore --json` on the quick explore examples and mutants (state and schedule
counts, the schedule files). Speed-ups must keep all of these identical (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAVIC = [str(Path(sys.executable).parent / "navic")]

WL = '''name = "golden-{name}"
max_time_us = 1e9
[host]
virt = "{virt}"
cpu = "{cpu}"
pcpus = {pcpus}
{l0}
[l1]
vcpus = {l1v}
apic = "{l1apic}"
{l2}
[workload]
kind = "{kind}"
{extra}
'''

WORKLOADS = {
    "ipi-pingpong": "iterations = 300",
    "ipi-halt": "iterations = 200",
    "tlb-shootdown": "iterations = 30",
    "hackbench": "iterations = 30",
}

LEVELS = {
    "bare": dict(virt="none", cpu="zen4", pcpus=4, l0="", l2="", l1v=4),
    "l1-zen4": dict(virt="kvm", cpu="zen4", pcpus=4, l0="", l2="", l1v=4),
    "l1-zen2": dict(virt="kvm", cpu="zen2", pcpus=4, l0="[l0]\navic = true", l2="", l1v=4),
    "l1-spr": dict(virt="kvm", cpu="spr", pcpus=4, l0="", l2="", l1v=4),
    "l1-over": dict(virt="kvm", cpu="zen4", pcpus=2, l0="", l2="", l1v=4),
    "l2-none": dict(virt="kvm", cpu="zen4", pcpus=4, l0='[l0]\nnested_apicv = "none"',
                    l2='[l2]\nvcpus = 2\napic = "xapic"', l1v=2),
    "l2-shadow": dict(virt="kvm", cpu="zen4", pcpus=4, l0='[l0]\nnested_apicv = "shadow"',
                      l2='[l2]\nvcpus = 2\napic = "xapic"', l1v=2),
    "l2-dummy": dict(virt="kvm", cpu="zen4", pcpus=4, l0='[l0]\nnested_apicv = "dummy"',
                     l2='[l2]\nvcpus = 2\napic = "xapic"', l1v=2),
    "l2-dummy-x2": dict(virt="kvm", cpu="zen4", pcpus=4, l0='[l0]\nnested_apicv = "dummy"',
                        l2='[l2]\nvcpus = 3\napic = "x2apic"', l1v=2),
    "l2-dummy-spr": dict(virt="kvm", cpu="spr", pcpus=4, l0='[l0]\nnested_apicv = "dummy"',
                         l2='[l2]\nvcpus = 2\napic = "xapic"', l1v=2),
    "l2-none-spr": dict(virt="kvm", cpu="spr", pcpus=4, l0='[l0]\nnested_apicv = "none"',
                        l2='[l2]\nvcpus = 2\napic = "xapic"', l1v=2),
}

EXPLORES = [
    ["examples/explore-erratum1235.toml"],
    ["examples/explore-erratum1235-shadow.toml"],
    ["examples/explore-pingpong-zen4.toml", "-k", "1"],
    ["examples/explore-nested-pingpong.toml", "-k", "1", "--design", "dummy"],
    ["examples/explore-nested-pingpong.toml", "-k", "0", "--design", "shadow"],
    ["examples/explore-pingpong-zen4.toml", "--mutant", "a", "-k", "3"],
    ["examples/explore-nested-pingpong.toml", "--mutant", "c", "-k", "0", "--design", "dummy"],
    ["examples/explore-nested-pingpong.toml", "--mutant", "e", "-k", "0", "--design", "dummy"],
]


def _jobs(tmp: Path) -> list[tuple[str, list[str]]]:
    jobs: list[tuple[str, list[str]]] = []
    for ex in sorted((ROOT / "examples").glob("*.toml")):
        if ex.name.startswith("explore-"):
            continue
        jobs.append((f"run-{ex.stem}.json", ["run", str(ex), "--json"]))
        jobs.append((f"trace-{ex.stem}.txt", ["run", str(ex), "--trace-text"]))
    for lname, lv in LEVELS.items():
        for kind, extra in WORKLOADS.items():
            l1apic = "x2apic" if lname != "l2-dummy-x2" else "x2apic"
            text = WL.format(name=f"{lname}-{kind}", kind=kind, extra=extra, l1apic=l1apic, **lv)
            f = tmp / f"wl-{lname}-{kind}.toml"
            f.write_text(text)
            jobs.append((f"wl-{lname}-{kind}.json", ["run", str(f), "--json"]))
    for i, args in enumerate(EXPLORES):
        sched = tmp / f"explore-{i}.schedule.json"
        jobs.append((f"explore-{i}.json", ["explore", *args, "--json", "--schedule-out", str(sched)]))
    return jobs


def _run(args: list[str]) -> str:
    p = subprocess.run([*NAVIC, *args], cwd=ROOT, capture_output=True, text=True)
    out = "\n".join(line for line in p.stdout.splitlines() if '"seconds":' not in line)  # wall time
    return f"exit {p.returncode}\n{out}\n--- stderr\n{p.stderr}"


def collect(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        jobs = _jobs(tmp)
        with ThreadPoolExecutor(max_workers=2) as ex:
            results = list(ex.map(lambda j: _run(j[1]), jobs))
        for (name, _), text in zip(jobs, results, strict=True):
            (out / name).write_text(text.replace(str(tmp), "TMP"))
        for sched in sorted(tmp.glob("*.schedule.json")):
            (out / sched.name).write_text(sched.read_text().replace(str(tmp), "TMP"))
        rep = tmp / "report"
        (out / "compare.json").write_text(_run(["compare", "--json", "--out", str(rep), "-j", "2"]))
        for tr in sorted(rep.glob("**/*.json")):
            name = f"compare-{tr.relative_to(rep).as_posix().replace('/', '_')}"
            (out / name).write_text(tr.read_text().replace(str(tmp), "TMP"))


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("capture", "check"):
        sys.exit("usage: bench/golden.py capture|check DIR")
    where = Path(sys.argv[2])
    if sys.argv[1] == "capture":
        collect(where)
        print(f"captured {len(list(where.iterdir()))} files in {where}")
        return
    with tempfile.TemporaryDirectory() as t:
        now = Path(t)
        collect(now)
        ref = {p.name: p for p in where.iterdir()}
        got = {p.name: p for p in now.iterdir()}
        bad = sorted(n for n in ref.keys() | got.keys()
                     if n not in ref or n not in got or ref[n].read_bytes() != got[n].read_bytes())
        for n in bad:
            print(f"DIFFERS: {n}")
        digest = hashlib.sha256(b"".join(got[n].read_bytes() for n in sorted(got))).hexdigest()[:16]
        print(json.dumps({"files": len(got), "differ": len(bad), "digest": digest}))
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
