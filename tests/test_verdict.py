"""`navic verdict`: its cost numbers are `navic compare`'s, its complexity counts code only, and its
recommendation follows from the numbers (an unsafe or slower design is not recommended)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from navic import compare as C
from navic import verdict as V

NAVIC = Path(sys.executable).parent / "navic"


def _cli(*args: str, cwd: Path) -> dict:
    proc = subprocess.run([str(NAVIC), *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_verdict_cost_rows_match_compare_json(tmp_path: Path) -> None:
    """The same configurations give the same row figures through both commands."""
    verdict = _cli("verdict", "--no-explore", "--cpu", "zen4", "--workload", "ipi-pingpong",
                   "--out", str(tmp_path / "v"), "-j", "1", "--json", cwd=tmp_path)
    configs = sorted({r["config"] for r in verdict["rows"]})
    assert {"bare", "l1-avic-zen4", "l2-shadow-zen4", "l2-dummy-zen4", "l2-none-zen4"} <= set(configs)
    args = ["compare", "--json", "-j", "1", "--out", str(tmp_path / "c")]
    for c in configs:
        args += ["--config", c]
    compared = _cli(*args, cwd=tmp_path)
    want = {(r["workload"], r["config"]): r for r in compared["rows"] if r["workload"] == "ipi-pingpong"}
    got = {(r["workload"], r["config"]): r for r in verdict["rows"]}
    assert got.keys() == want.keys()
    for k, r in got.items():
        for field in ("exits_per_ipi", "world_switches_per_ipi", "latency_ns", "cycles_per_ipi", "ipis", "violations"):
            assert r[field] == want[k][field], (k, field)


def test_logical_lines_skip_docstrings_comments_and_blanks(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text('"""Module\ndocstring."""\n\n# comment\nx = (1,\n     2)\n\n\ndef f():\n'
                   '    """Doc."""\n    return x  # trailing\n')
    assert V.logical_lines(src) == 4   # x = (1, / 2) / def f(): / return x


def test_complexity_scales_shadow_diffstat() -> None:
    cx = V.complexity(("none", "shadow", "dummy"))
    assert cx["none"]["navic_lines"] == 0 and cx["none"]["kernel_lines_estimate"] == 0
    assert cx["shadow"]["kernel_lines_estimate"] == V.RFC_V3_INSERTIONS
    d = cx["dummy"]
    assert d["kernel_lines_estimate"] == round(d["navic_lines"] * V.RFC_V3_INSERTIONS / cx["shadow"]["navic_lines"])
    assert 0 < d["vmx_shared_lines"] < d["navic_lines"]


def _row(design: str, p50: float, exits: float, workload: str = "ipi-pingpong") -> dict:
    return {"workload": workload, "config": f"l2-{design}-zen4", "cpu_model": "zen4", "level": 2,
            "design": design, "latency_ns": {"p50": p50, "p99": p50},
            "exits_per_ipi": {"l0": 0.0, "l0_l2": exits, "l1": 0.0}}


def test_recommendation_follows_the_numbers() -> None:
    rows = [_row("none", 10_000, 9), _row("shadow", 1_000, 0), _row("dummy", 2_000, 1)]
    cx = V.complexity(("none", "shadow", "dummy"))
    opts = V.VerdictOptions(cpus=("zen4",))
    safe = [{"scenario": "explore-nested-pingpong.toml", "design": d, "result": "proven within bound"}
            for d in ("none", "shadow", "dummy")]
    text = " ".join(V.recommendation(rows, safe, cx, opts))
    assert "Recommended on zen4: **shadow**" in text
    assert "the dummy table gets 89% of the best design's latency gain" in text   # (10000-2000)/(10000-1000)
    unsafe = [dict(s, result="violation") if s["design"] == "shadow" else s for s in safe]
    text = " ".join(V.recommendation(rows, unsafe, cx, opts))
    assert "Recommended on zen4: **dummy**" in text and "Unsafe within bound 1: shadow" in text


def test_recommendation_prefers_a_much_smaller_design_within_ten_percent() -> None:
    rows = [_row("none", 10_000, 9), _row("shadow", 1_000, 0), _row("dummy", 1_080, 1)]
    cx = {"none": {"navic_lines": 0}, "shadow": {"navic_lines": 200, "kernel_lines_estimate": 1507},
          "dummy": {"navic_lines": 100, "kernel_lines_estimate": 750}}
    safe = [{"scenario": "explore-nested-pingpong.toml", "design": d, "result": "proven within bound"}
            for d in cx]
    opts = V.VerdictOptions(cpus=("zen4",))
    text = " ".join(V.recommendation(rows, safe, {d: {"vmx_shared_lines": 0, **c} for d, c in cx.items()}, opts))
    assert "Recommended on zen4: **dummy** — within 10% of the fastest (shadow)" in text
    rows[2] = _row("dummy", 1_200, 1)     # 20 % slower: the fastest stays recommended
    text = " ".join(V.recommendation(rows, safe, {d: {"vmx_shared_lines": 0, **c} for d, c in cx.items()}, opts))
    assert "Recommended on zen4: **shadow**" in text


def test_wins_per_category() -> None:
    rows = [_row("none", 9_000, 9, "ipi-halt"), _row("shadow", 3_000, 2, "ipi-halt"),
            _row("dummy", 4_000, 1, "ipi-halt")]
    (w,) = V.wins(rows, unsafe=set())
    assert w["category"] == "halted target" and w["fastest"] == "shadow" and w["fewest_exits"] == "dummy"
    assert w["benefit_share"] == {"shadow": 1.0, "dummy": round(5 / 6, 3)}


def test_verdict_safety_finds_erratum_counterexample(tmp_path: Path) -> None:
    """At bound 1 the explorer finds the erratum-1235 stuck IPI under shadow on zen2 and none under
    dummy; the counterexample schedule is written to the verdict folder and replays."""
    from navic.check import explore as X
    from navic.scenario import load_scenario

    examples = Path(__file__).resolve().parent.parent / "examples"
    opts = V.VerdictOptions(cpus=("zen2",), bound=1, jobs=1)
    out = V.safety(opts, examples, ("shadow", "dummy"), tmp_path)
    er = {s["design"]: s for s in out if s["scenario"] == V.ERRATUM_SCENARIO}
    assert er["shadow"]["result"] == "violation" and er["shadow"]["violation"]["kind"] == "stuck"
    scn = X.apply_design(load_scenario(examples / V.ERRATUM_SCENARIO), "shadow")
    assert X.check_replay(scn, er["shadow"]["schedule_file"], er["shadow"]["violation"])
    assert er["dummy"]["result"] == "proven within bound"
    assert all(s["result"] == "proven within bound" for s in out if s["scenario"] != V.ERRATUM_SCENARIO)


def test_verdict_configs_cover_every_compare_design() -> None:
    names = {c.name for c in V.design_configs(V.VerdictOptions(cpus=("zen4",)))}
    for d in V.nested_designs():
        if f"l2-{d}-zen4" in C.CONFIGS:
            assert f"l2-{d}-zen4" in names
