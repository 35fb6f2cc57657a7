"""``navic verdict``: the nested-AVIC thread's question answered with safety, cost and complexity."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from navic import compare as C
from navic import verdict as V
from navic.cli import examples_dir, main, to_json

_CPUS = sorted({c.cpu for c in C.CONFIGS.values() if c.level == 2})


@main.command("verdict")
@click.option("--cpu", "cpus", multiple=True, type=click.Choice(_CPUS),
              help="CPU models to judge on (repeatable; default zen4 and zen2). The first is the primary one.")
@click.option("--workload", "workloads", multiple=True,
              type=click.Choice([c.label for c in C.DEFAULT_SUITE]),
              help="Workloads of the default suite (repeatable; default all).")
@click.option("--design", "designs", multiple=True, type=click.Choice(list(V.nested_designs())),
              help="Designs to judge (repeatable; default every nested design).")
@click.option("--bound", "-k", type=click.IntRange(min=0), default=1, show_default=True,
              help="Explorer preemption bound for the safety column.")
@click.option("--explore-time", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds at most per explore run (a run cut short says so).")
@click.option("--no-explore", is_flag=True, help="Cost and complexity only (no safety column).")
@click.option("--out", "outdir", type=click.Path(file_okay=False), default="navic-verdict", show_default=True,
              help="Folder for verdict.md, verdict.json, the plots and counterexample schedules.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, help="Worker processes (default: cores).")
@click.option("--json", "as_json", is_flag=True, help="Print verdict.json instead of the report.")
def verdict_cmd(cpus: tuple[str, ...], workloads: tuple[str, ...], designs: tuple[str, ...], bound: int,
                explore_time: float, no_explore: bool, outdir: str, jobs: int | None, as_json: bool) -> None:
    """Per nested design: safety (explorer at bound K), cost (exits, world switches, latency, hypervisor
    cycles per IPI, as `navic compare`), complexity (model lines, kernel estimate), where each wins, and
    a recommendation that follows from the numbers."""
    command = "navic " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "navic verdict"
    opts = V.VerdictOptions(cpus=cpus or ("zen4", "zen2"), workloads=workloads, bound=bound,
                            explore_time_limit=explore_time, jobs=jobs, designs=designs)
    examples = None if no_explore else examples_dir()
    err = Console(stderr=True)
    t0 = time.monotonic()
    with Progress(TextColumn("[bold]verdict[/]"), BarColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=err, transient=True) as prog:
        task = prog.add_task("", total=None)
        v = V.run_verdict(opts, examples, Path(outdir), progress=lambda s: prog.update(task, description=s))
    paths = V.write_verdict(v, Path(outdir), command)
    if as_json:
        click.echo(to_json(v.as_json()))
        return
    out = Console()
    out.print(Markdown(paths["markdown"].read_text()))
    out.print(f"verdict: {paths['markdown']}  json: {paths['json']}  ({time.monotonic() - t0:.1f} s)")
