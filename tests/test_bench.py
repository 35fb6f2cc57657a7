"""The benchmark scripts keep working as the model changes (their figures are not checked here:
figures come from running them, docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_speed_pingpong_part_runs_every_configuration():
    out = _run("bench/speed.py", "--quick", "--only", "pingpong")
    assert out.startswith("$ .venv/bin/python bench/speed.py --quick --only pingpong")
    for name in ("bare metal", "L1 AVIC (zen4)", "L2 dummy (zen4)", "L2 shadow (zen4)"):
        line = next(x for x in out.splitlines() if x.strip().startswith(name))
        assert "IPIs/s" in line and "(2000 IPIs in" in line   # 1000 round trips = 2000 IPIs


def test_callprofile_counts_calls_per_ipi():
    out = _run("bench/callprofile.py", "bare metal", "--iterations", "200", "--top", "3")
    head = out.splitlines()[1]
    assert head.startswith("bare metal: 400 IPIs in") and "Python calls per IPI" in head
    calls = float(head.split(";")[1].split()[0])
    assert 10 < calls < 1000
