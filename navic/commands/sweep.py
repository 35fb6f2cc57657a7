"""``navic sweep``: a scenario over a grid of parameters × seeds, resumable, locally or on Dask.

    navic sweep SPEC.toml [--db FILE] [-j N | --scheduler tcp://HOST:PORT] [--dry-run] [--json]
    navic sweep report DB [--out DIR] [--metric NAME]... [--x KEY]

(``navic sweep SPEC.toml`` is short for ``navic sweep run SPEC.toml``.) See docs/sweep.md.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from navic import sweep as S
from navic.cli import EXIT_FAILURE, EXIT_SCENARIO_ERROR, main, to_json
from navic.scenario import ScenarioError

MAX_TABLE_ROWS = 60


class _DefaultRun(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@main.group("sweep", cls=_DefaultRun)
def sweep_group() -> None:
    """Run a scenario over a grid of parameter values × seeds into an SQLite database
    (`navic sweep SPEC.toml`), and report on it (`navic sweep report DB`). Re-running a sweep
    does only the points not finished yet. See docs/sweep.md."""


def _command() -> str:
    return "navic " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "navic sweep"


def _out_console() -> Console:
    return Console(file=sys.stdout, width=max(120, shutil.get_terminal_size((150, 40)).columns), highlight=False)


@sweep_group.command("run")
@click.argument("spec_file", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="SQLite database (default: SPEC-STEM.sweep.db in the current directory).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Local worker processes (default: cores; 1 = run in this process).")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Run on this Dask scheduler (tcp://HOST:PORT) instead of local processes.")
@click.option("--dry-run", is_flag=True, help="Check and expand the spec, record nothing, run nothing.")
@click.option("--redo-stale", is_flag=True,
              help="Also run again finished points computed from other navic sources (edited model or costs).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON document.")
def run_cmd(spec_file: str, db_path: str | None, jobs: int | None, scheduler: str | None, dry_run: bool,
            redo_stale: bool, as_json: bool) -> None:
    """Run the sweep SPEC.toml: every grid point × seed not already finished in the database."""
    if jobs is not None and scheduler is not None:
        raise click.UsageError("--jobs and --scheduler are exclusive")
    spec = S.load_spec(spec_file)
    db_file = Path(db_path) if db_path else Path(f"{Path(spec_file).stem}.sweep.db")
    err = Console(stderr=True, highlight=False)
    if dry_run:
        pending, stale = len(spec.points), 0
        if db_file.is_file():
            with S.SweepDB(db_file, create=False) as db:
                db.check_identity(spec)
                status = db.statuses()
                stale = len(db.stale(spec, S.model_fingerprint()))
            pending = sum(1 for p in spec.points if status.get(p.hash) not in S.FINAL)
        doc = {"spec": spec_file, "db": str(db_file), "points": len(spec.points), "pending": pending,
               "stale": stale, "grid": {k: v for k, v in spec.grid}, "seeds": list(spec.seeds)}
        if as_json:
            click.echo(to_json(doc), nl=False)
        else:
            click.echo(f"{spec_file}: {len(spec.points)} points ({_grid_size(spec)} grid × {len(spec.seeds)} "
                       f"seeds), {pending} to run" + (f", {stale} stale" if stale else "") + f"; database {db_file}")
        return
    if scheduler is not None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            click.echo("navic sweep: --scheduler needs dask.distributed (pip install 'dask[distributed]')", err=True)
            raise click.exceptions.Exit(EXIT_SCENARIO_ERROR) from None

    with S.SweepDB(db_file) as db:
        db.check_identity(spec)
        prog = Progress(TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), TextColumn("{task.description}"), console=err,
                        transient=as_json, disable=not err.is_terminal)
        task = prog.add_task("", total=None, rate="")
        t0 = [0.0]

        def on_start(n: int) -> None:
            import time

            t0[0] = time.monotonic()
            prog.update(task, total=n)
            prog.start()

        def on_result(r: dict[str, Any], p: S.Point) -> None:
            import time

            done = prog.tasks[0].completed + 1
            rate = done / max(1e-9, time.monotonic() - t0[0])
            mark = "" if r["status"] == "done" else f" [{'yellow' if r['status'] == 'unsupported' else 'red'}]" \
                                                     f"{r['status']}[/]"
            prog.update(task, advance=1, rate=f"{rate:.1f} pt/s", description=p.label + mark)

        try:
            out = S.execute(spec, db, jobs=jobs, scheduler=scheduler, on_start=on_start, on_result=on_result,
                            redo_stale=redo_stale)
        except ScenarioError:
            raise
        except KeyboardInterrupt:   # before the first point ran (execute() handles it afterwards)
            prog.stop()
            click.echo("navic sweep: interrupted; run the same command again to resume", err=True)
            raise click.exceptions.Exit(130) from None
        except OSError as e:   # e.g. the Dask scheduler cannot be reached
            prog.stop()
            click.echo(f"navic sweep: {scheduler or 'local workers'}: {' '.join(str(e).split())}", err=True)
            raise click.exceptions.Exit(EXIT_FAILURE) from None
        except Exception as e:  # a worker process died (BrokenProcessPool, KilledWorker, ...)
            prog.stop()
            click.echo(f"navic sweep: the run stopped: {type(e).__name__}: {' '.join(str(e).split())}; "
                       f"finished points are saved in {db_file}, run again to resume", err=True)
            raise click.exceptions.Exit(EXIT_FAILURE) from None
        finally:
            prog.stop()
        rep = S.load_report(db)
        errors = db.rows(status="error")

    doc = {"db": str(db_file), "points": out.planned, "already_done": out.already, "ran": out.ran,
           "done": out.done, "unsupported": out.unsupported, "errors": out.errors, "seconds": round(out.seconds, 3),
           "points_per_second": round(out.rate, 3), "backend": out.backend, "interrupted": out.interrupted,
           "stale": out.stale}
    if as_json:
        click.echo(to_json(doc), nl=False)
    else:
        con = _out_console()
        header, body = S.summary_table(rep, [m for m in rep.metrics if m in set(rep.available_metrics())])
        if body and len(body) <= MAX_TABLE_ROWS:
            con.print(_rich_table(f"{rep.name}: mean over seeds [min–max]", header, body))
        elif body:
            con.print(f"({len(body)} grid points: see `navic sweep report {db_file}`)")
        for e in errors[:5]:
            con.print(f"[red]error[/] {e['hash'][:12]} {e['params']} seed={e['seed']}: {e['error']}",
                      markup=True, highlight=False)
        con.print(f"{out.ran} points run in {out.seconds:.1f} s ({out.rate:.2f} points/s, {out.backend}); "
                  f"{out.already} were already done; {out.unsupported} unsupported, {out.errors} errors; "
                  f"database {db_file}")
        if out.stale:
            con.print(f"[yellow]warning[/]: {out.stale} finished points were computed from other navic sources "
                      "(model or costs edited since); --redo-stale runs them again")
        if out.interrupted:
            con.print("[yellow]interrupted[/]: run the same command again to resume")
    if out.interrupted:
        raise click.exceptions.Exit(130)
    if out.errors:
        raise click.exceptions.Exit(EXIT_FAILURE)


def _grid_size(spec: S.SweepSpec) -> int:
    n = 1
    for _, v in spec.grid:
        n *= len(v)
    return n


def _rich_table(title: str, header: list[str], body: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, h in enumerate(header):
        t.add_column(h, justify="right" if _numeric_col(body, i) else "left")
    for row in body:
        t.add_row(*row)
    return t


def _numeric_col(body: list[list[str]], i: int) -> bool:
    return all(r[i][:1].isdigit() or r[i][:1] in "-." for r in body)


@sweep_group.command("report")
@click.argument("db_path", metavar="DB", type=click.Path(dir_okay=False))
@click.option("--out", "outdir", type=click.Path(file_okay=False), default=None,
              help="Report folder: report.md, summary.csv, points.csv, PNG plots (default: DB-STEM-report).")
@click.option("--metric", "metrics", multiple=True,
              help="Metric to tabulate and plot (repeatable; default: the spec's metrics, or latency and exits).")
@click.option("--x", "x", default=None, help="Grid key on the x axis (default: the first numeric swept key).")
def report_cmd(db_path: str, outdir: str | None, metrics: tuple[str, ...], x: str | None) -> None:
    """Tables and plots from a sweep database: each metric against a swept parameter, one line per
    combination of the other parameters (mean over seeds, min/max band)."""
    with S.SweepDB(db_path, create=False) as db:
        rep = S.load_report(db)
    available = rep.available_metrics()
    if metrics:
        for m in metrics:
            if m not in available:
                raise click.BadParameter(f"{m!r} is not in {db_path}; available: {', '.join(available) or '(none)'}",
                                         param_hint="--metric")
        chosen = list(metrics)
    else:
        chosen = [m for m in rep.metrics if m in available]
    if x is not None and x not in rep.keys:
        raise click.BadParameter(f"{x!r} is not a grid key of {db_path}; grid keys: {', '.join(rep.keys) or '(none)'}",
                                 param_hint="--x")
    x = x or S.default_x(rep)
    out = Path(outdir) if outdir else Path(db_path).with_name(Path(db_path).stem.removesuffix(".sweep") + "-report")
    paths = S.write_report(rep, chosen, x, out, _command())
    con = _out_console()
    header, body = S.summary_table(rep, chosen)
    if body:
        con.print(_rich_table(f"{rep.name}: mean over seeds [min–max]", header, body))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(rep.counts.items()))
    con.print(f"points: {counts or 'none'}" + (f" ({rep.superseded} superseded rows ignored)" if rep.superseded
                                                else ""))
    if not rep.rows:
        con.print("[yellow]no finished points yet[/]")
    plots = [p for k, p in paths.items() if p.suffix == ".png"]
    con.print(f"report: {paths['report']}  tables: {paths['summary']}, {paths['points']}  plots: {len(plots)}"
              + (f" (x = {x})" if x else ""))
