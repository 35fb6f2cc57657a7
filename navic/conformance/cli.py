"""``navic conformance``: differential testing of navic's local APIC against emulators.

``navic conformance qemu --count N --seed S`` generates N seeded random cases, runs each on QEMU
(TCG) and on navic, and prints every divergence with a delta-debugged minimal op sequence.
Exit status 0 when nothing diverged, 1 otherwise (also on emulator failures), 2 when no
emulator or assembler is available.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from navic.conformance import qemu
from navic.conformance.quirks import active_quirks
from navic.conformance.run import CaseResult, Checker, check_many, generated, summary, timed

EXIT_UNAVAILABLE = 2


@click.group("conformance")
def conformance() -> None:
    """Compare navic's architectural local APIC with independent implementations (emulators)."""


@conformance.command("qemu")
@click.option("--count", "-n", default=100, show_default=True, help="Number of random cases.")
@click.option("--seed", "-s", default="1", show_default=True, help="Seed (any string).")
@click.option("--cpus", type=click.IntRange(1, 8), default=None,
              help="CPUs per case (default: random 1..4 per case).")
@click.option("--only", type=int, default=None, help="Run only case number ONLY of the seed.")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel cases (default: CPU count).")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save assembly, image and debug-port output of diverging cases under DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--no-shrink", is_flag=True, help="Do not minimise diverging cases.")
@click.option("--strict", is_flag=True,
              help="Do not adjust cases for known emulator deviations (shows the deviations).")
@click.option("--show-case", is_flag=True, help="Print the full case of every divergence.")
def qemu_cmd(count: int, seed: str, cpus: int | None, only: int | None, jobs: int | None,
             keep: Path | None, as_json: bool, no_shrink: bool, strict: bool, show_case: bool) -> None:
    """Differential test against QEMU TCG (qemu-system-x86_64; never KVM)."""
    missing = qemu.missing_tools()
    if missing:
        click.echo(f"navic conformance: missing {', '.join(missing)} "
                   "(apt-get install qemu-system-x86 binutils)", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    checker = Checker("qemu", strict=strict, keep=keep)
    cases = generated(seed, count, cpus, only)
    console = Console(stderr=True)
    bad: list[CaseResult] = []

    def run() -> list[CaseResult]:
        with Progress(TextColumn("[bold]qemu[/] seed " + seed), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[bad]} divergent"), TimeElapsedColumn(),
                      console=console, disable=as_json or not console.is_terminal) as prog:
            task = prog.add_task("cases", total=len(cases), bad=0)

            def tick(r: CaseResult) -> None:
                if not r.ok:
                    bad.append(r)
                prog.update(task, advance=1, bad=len(bad))

            return check_many(checker, cases, jobs=jobs, shrink=not no_shrink, progress=tick)

    results, wall = timed(run)
    summ = summary(results, wall)
    summ.update({"emulator": "qemu", "seed": seed, "strict": strict,
                 "quirks": [q.name for q in checker.quirks]})
    if as_json:
        summ["failures"] = [r.to_json() for r in results if not r.ok]
        click.echo(json.dumps(summ, indent=2))
    else:
        for r in results:
            if r.ok:
                continue
            click.echo(f"case {r.index} (cpus={r.case.cpus}): "
                       + (r.error or f"{len(r.divergences)} divergence(s)"))
            for d in r.divergences[:12]:
                click.echo(f"    {d}")
            if show_case or r.minimal is None and r.divergences:
                click.echo("  case:\n" + _indent(r.case.describe()))
            if r.minimal is not None:
                click.echo(f"  minimal case ({len(r.minimal.ops)} ops; "
                           f"rerun: --seed {seed} --only {r.index}):")
                click.echo(_indent(r.minimal.describe()))
                for d in r.minimal_divergences[:12]:
                    click.echo(f"    {d}")
        qs = ", ".join(q.name for q in checker.quirks) or "none"
        click.echo(f"qemu: {summ['cases']} cases, seed {seed}: {summ['divergent']} divergent, "
                   f"{summ['errors']} errors, {wall:.1f} s (quirk adjustments: {qs})")
    sys.exit(0 if all(r.ok for r in results) else 1)


@conformance.command("quirks")
def quirks_cmd() -> None:
    """List the known emulator deviations from the SDM and how cases are adjusted for them."""
    for q in active_quirks("qemu"):
        click.echo(f"{q.emulator}/{q.name}: {q.summary}")


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.splitlines())
