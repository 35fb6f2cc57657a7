"""Calibration gate: every gated microbenchmark of bench/calibration.py must reproduce its published
figure (../shared/spec/costs.md) within +-25 % (+-30 % for the soft cross-source targets); the goal
is +-15 %. See docs/calibration.md for the table and for the figures navic cannot express."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench() -> Any:
    name = "navic_bench_calibration"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "calibration.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


B = _load_bench()


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return {r.row.key: r for r in B.run()}


def _report(results: dict[str, Any]) -> str:
    return "\n".join(B.table(list(results.values())))


def test_every_gated_ratio_within_its_limit(results: dict[str, Any]) -> None:
    bad = [r for r in results.values() if r.row.gated and not r.ok]
    msg = "\n".join(f"{r.row.key}: published {r.row.published:,.3f}, navic {r.value:,.3f}, ratio {r.ratio:.3f} "
                    f"(limit 1 +- {r.row.limit:.0%}) -- rerun: {r.row.command}" for r in bad)
    assert not bad, f"calibration drifted outside its limit:\n{msg}\n\n{_report(results)}"


@pytest.mark.parametrize("key", [r.key for r in B.ROWS if r.gated])
def test_gated_row(results: dict[str, Any], key: str) -> None:
    r = results[key]
    assert r.ok, (f"{key}: ratio {r.ratio:.3f} outside 1 +- {r.row.limit:.0%} "
                  f"(published {r.row.published:,.3f}, navic {r.value:,.3f}); rerun: {r.row.command}")


def test_limits_are_the_issue_s() -> None:
    """+-25 % hard, +-30 % only for costs.md's soft (cross-source) targets; the goal is +-15 %."""
    assert B.HARD == 0.25 and B.SOFT == 0.30 and B.GOAL == 0.15
    assert {r.key for r in B.ROWS if r.limit == B.SOFT} == {"t8-nested-vs-single"}


def test_calibration_md_lists_every_row() -> None:
    doc = (ROOT / "docs" / "calibration.md").read_text()
    assert B.BEGIN in doc and B.END in doc
    missing = [r.key for r in B.ROWS if f"`{r.key}`" not in doc]
    assert not missing, f"docs/calibration.md lacks {missing}: run python bench/calibration.py"
