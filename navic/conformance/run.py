"""Run cases on an emulator and on navic, compare, shrink divergences (the engine behind the CLI)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navic.conformance import compare as C
from navic.conformance import gen, navic_side, qemu
from navic.conformance.case import Case
from navic.conformance.quirks import Quirk, active_quirks

EMULATORS = ("qemu",)


@dataclass
class CaseResult:
    index: int
    case: Case
    divergences: list[C.Divergence] = field(default_factory=list)
    error: str | None = None
    minimal: Case | None = None
    minimal_divergences: list[C.Divergence] = field(default_factory=list)
    emu_wall: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.divergences and self.error is None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "cpus": self.case.cpus, "ok": self.ok}
        if self.error:
            d["error"] = self.error
        if self.divergences:
            d["divergences"] = [str(x) for x in self.divergences]
            d["case"] = self.case.describe()
        if self.minimal is not None:
            d["minimal"] = self.minimal.describe()
            d["minimal_divergences"] = [str(x) for x in self.minimal_divergences]
        return d


class Checker:
    """Runs one case on both sides. ``navic_runner`` replaces :func:`navic.runner.run_scenario`
    (tests inject broken models through it or by monkeypatching navic's APIC)."""

    def __init__(self, emulator: str = "qemu", *, strict: bool = False,
                 navic_runner: navic_side.Runner | None = None, keep: Path | None = None,
                 timeout: float = 30.0) -> None:
        if emulator not in EMULATORS:
            raise ValueError(f"unknown emulator {emulator!r}")
        self.emulator = emulator
        self.quirks: tuple[Quirk, ...] = () if strict else active_quirks(emulator)
        self.navic_runner = navic_runner
        self.keep = keep
        self.timeout = timeout

    def adjust(self, case: Case) -> Case:
        for q in self.quirks:
            case = q.adjust(case)
        return case

    def ignore(self, case: Case) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for q in self.quirks:
            out |= q.ignore(case)
        return out

    def emulate(self, case: Case, workdir: Path | None = None) -> qemu.Outcome:
        return qemu.run_case(case, workdir=workdir, timeout=self.timeout)

    def diff(self, case: Case, workdir: Path | None = None) -> tuple[list[C.Divergence], float]:
        emu = self.emulate(case, workdir)
        nav = navic_side.run_case(case, self.navic_runner)
        return C.compare(case, emu, nav, ignore=self.ignore(case)), emu.wall

    def diverges(self, case: Case) -> bool:
        case = self.adjust(case)
        try:
            return bool(self.diff(case)[0])
        except qemu.EmulatorError:
            return False

    def check(self, index: int, case: Case, *, shrink: bool = True) -> CaseResult:
        case = self.adjust(case)
        res = CaseResult(index, case)
        try:
            res.divergences, res.emu_wall = self.diff(case)
        except qemu.EmulatorError as exc:
            res.error = f"{self.emulator}: {exc}"
            return res
        except Exception as exc:  # navic crashed on this case: report it as such
            res.error = f"navic: {type(exc).__name__}: {exc}"
            return res
        if res.divergences and shrink:
            from navic.conformance.shrink import shrink as do_shrink

            res.minimal = self.adjust(do_shrink(case, self.diverges))
            try:
                res.minimal_divergences = self.diff(res.minimal)[0]
            except qemu.EmulatorError as exc:  # pragma: no cover - shrink only keeps runnable cases
                res.minimal_divergences = [C.Divergence("error", "minimal", str(exc), None)]
        if res.divergences and self.keep is not None:
            self.save(res)
        return res

    def save(self, res: CaseResult) -> None:
        assert self.keep is not None
        d = self.keep / f"case-{res.index:05d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "case.txt").write_text(res.case.describe() + "\n\n"
                                    + "\n".join(map(str, res.divergences)) + "\n")
        try:
            self.emulate(res.case, d)
        except qemu.EmulatorError:
            pass
        if res.minimal is not None:
            m = d / "minimal"
            m.mkdir(exist_ok=True)
            (m / "case.txt").write_text(res.minimal.describe() + "\n\n"
                                        + "\n".join(map(str, res.minimal_divergences)) + "\n")
            try:
                self.emulate(res.minimal, m)
            except qemu.EmulatorError:
                pass


def check_many(checker: Checker, cases: Iterable[tuple[int, Case]], *, jobs: int | None = None,
               shrink: bool = True, progress: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    jobs = jobs or max(1, os.cpu_count() or 1)
    results: list[CaseResult] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = [pool.submit(checker.check, i, c, shrink=shrink) for i, c in cases]
        for f in futs:
            r = f.result()
            results.append(r)
            if progress is not None:
                progress(r)
    return results


def generated(seed: int | str, count: int, cpus: int | None = None, only: int | None = None,
              quirks: tuple[Quirk, ...] = ()) -> list[tuple[int, Case]]:
    idx = [only] if only is not None else list(range(count))
    return [(i, gen.generate(seed, i, cpus, quirks=quirks)) for i in idx]


def summary(results: list[CaseResult], wall: float) -> dict[str, Any]:
    return {
        "cases": len(results),
        "divergent": sum(1 for r in results if r.divergences),
        "errors": sum(1 for r in results if r.error),
        "wall_s": round(wall, 2),
        "emulator_s": round(sum(r.emu_wall for r in results), 2),
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t
