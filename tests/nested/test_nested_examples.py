"""The nested examples run, deliver every L2 IPI, and are deterministic: `navic run` twice gives
byte-identical JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _navic_run(path: Path, hashseed: str) -> bytes:
    """`navic run FILE --json` in a fresh interpreter (a different PYTHONHASHSEED each time, so
    that set/dict iteration order cannot leak into the result)."""
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    code = "import sys; from navic.cli import main; sys.exit(main())"
    res = subprocess.run([sys.executable, "-c", code, "run", str(path), "--json"], env=env,
                         capture_output=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout


@pytest.mark.parametrize("design", ["none", "shadow", "dummy", "runcache"])
def test_nested_example_runs_twice_identically(design):
    path = EXAMPLES / f"nested-{design}.toml"
    outs = [_navic_run(path, seed) for seed in ("1", "2")]
    assert outs[0] == outs[1]
    r = json.loads(outs[0])
    assert r["scenario"] == f"nested-{design}" and r["violations"] == [] and r["errors"] == []
    l2 = [d for d in r["deliveries"] if d["cpu"].startswith("l2.")]
    assert len(l2) == 100                                  # 50 rounds, both directions
    assert r["exits"].get("l0_l2", {}).get("avic_incomplete_ipi", 0) == (100 if design == "dummy" else 0)
