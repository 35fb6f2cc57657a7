"""``navic compare``: the main job — the suite over every configuration, tables and a report folder."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from navic import compare as C
from navic.cli import main, to_json


@main.command("compare")
@click.option("--suite", "suite_file", type=click.Path(dir_okay=False),
              help="Suite file ([[case]] tables); default: the built-in suite.")
@click.option("--out", "outdir", type=click.Path(file_okay=False), default="navic-report", show_default=True,
              help="Report folder (results.json, report.md, PNG plots).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of tables.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, help="Worker processes (default: cores).")
@click.option("--config", "configs", multiple=True, type=click.Choice(list(C.CONFIGS)),
              help="Only these configurations (repeatable).")
def compare_cmd(suite_file: str | None, outdir: str, as_json: bool, jobs: int | None,
                configs: tuple[str, ...]) -> None:
    """Run the suite over bare metal, L1 and L2 configurations and compare exits, world switches,
    doorbells, latency and hypervisor cycles per interrupt."""
    command = "navic " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "navic compare"
    cases = C.load_suite(suite_file) if suite_file else C.DEFAULT_SUITE
    if configs:
        cases = tuple(dataclasses.replace(c, configs=tuple(x for x in c.configs if x in configs)) for c in cases)
    total = sum(len(c.configs) for c in cases)
    err = Console(stderr=True)
    t0 = time.monotonic()
    with Progress(TextColumn("[bold]compare[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=as_json) as prog:
        task = prog.add_task("", total=total)

        def tick(r: dict) -> None:
            prog.update(task, advance=1, description=f"{r['workload']} @ {r['config']}")

        rows, skipped = C.run_suite(cases, jobs=jobs, progress=tick)
    paths = C.write_report(rows, skipped, Path(outdir), command)
    traces = C.write_traces(cases, Path(outdir))
    if as_json:
        click.echo(to_json({"rows": C.public_rows(rows), "skipped": skipped}))
        return
    out = Console(width=max(150, shutil.get_terminal_size((150, 40)).columns))
    for wl in dict.fromkeys(r["workload"] for r in rows):
        t = Table(title=f"{wl}: per interrupt", title_justify="left", header_style="bold")
        for name, _ in C.TABLE_COLUMNS:
            t.add_column(name, justify="left" if name == "config" else "right",
                         no_wrap=name == "config", min_width=14 if name == "config" else None)
        for r in rows:
            if r["workload"] == wl:
                t.add_row(*(C._fmt(f(r)) for _, f in C.TABLE_COLUMNS))
        out.print(t)
    summary = C.summary_text(rows)
    if summary:
        out.print("[bold]What this means[/]")
        out.print(summary)
    if skipped:
        configs_skipped = sorted({s["config"] for s in skipped})
        out.print(f"[dim]not runnable in this version: {', '.join(configs_skipped)} "
                  f"(reasons in {paths['report']})[/]")
    out.print(f"report: {paths['report']}  results: {paths['results']}  Perfetto traces: {len(traces)} "
              f"(ui.perfetto.dev)  ({len(rows)} runs in {time.monotonic() - t0:.1f} s)")

