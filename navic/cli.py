"""The `navic` command line.

``navic`` is a click group. Subcommands:

* ``navic run FILE [--json] [--out PATH]`` — run one scenario, print tables or one JSON document;
* ``navic demo [--examples DIR]`` — run every shipped example and print readable results.

Adding a subcommand: write ``@main.command()`` functions here, or in a module of the
``navic.commands`` package (``from navic.cli import main`` then ``@main.command()``): every module
of that package is imported when the CLI starts. A :class:`navic.scenario.ScenarioError` raised by
any subcommand is printed as its one-line message on stderr and the exit status is 2 (no
traceback); use :func:`load_or_exit` / :func:`emit_result` to behave like ``run``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from navic import __version__
from navic.config import Scenario
from navic.scenario import NESTED_APICV, ScenarioError, load_scenario

EXIT_SCENARIO_ERROR = 2
EXIT_FAILURE = 1


class NavicGroup(click.Group):
    """A click group that turns ScenarioError (from any subcommand) into exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ScenarioError as exc:
            click.echo(str(exc), err=True)
            ctx.exit(EXIT_SCENARIO_ERROR)


@click.group(cls=NavicGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="navic")
def main() -> None:
    """navic: an executable lab for APIC virtualization (AVIC/x2AVIC, APICv/IPIv, nested KVM)."""


# ---------------------------------------------------------------------------------------------
# Helpers shared by subcommands
# ---------------------------------------------------------------------------------------------
def load_or_exit(path: str | Path) -> Scenario:
    """Load a scenario; a ScenarioError propagates and NavicGroup reports it (exit status 2)."""
    return load_scenario(path)


def _runner() -> Any:
    """navic.runner, imported lazily so that parse errors are reported even when the simulator is
    broken or absent."""
    try:
        return importlib.import_module("navic.runner")
    except ModuleNotFoundError as exc:
        if exc.name != "navic.runner":
            raise
        click.echo("navic: the simulator (navic.runner) is not available in this build", err=True)
        raise click.exceptions.Exit(EXIT_FAILURE) from None


def _call_runner(scn: Scenario, call: Callable[[Any], Any]) -> Any:
    """Run ``call(runner)``; a valid scenario this version cannot run (``UnsupportedScenario`` or
    NotImplementedError) is reported on stderr as one line naming the file; exit status 2."""
    runner = _runner()
    unsupported: tuple[type[BaseException], ...] = (NotImplementedError,)
    extra = getattr(runner, "UnsupportedScenario", None)
    if isinstance(extra, type) and issubclass(extra, BaseException):
        unsupported += (extra,)
    try:
        return call(runner)
    except unsupported as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not message.startswith(f"{scn.source}:"):
            message = f"{scn.source}: not supported yet: {message}"
        click.echo(message, err=True)
        raise click.exceptions.Exit(EXIT_SCENARIO_ERROR) from None


def simulate_one(scn: Scenario, **kw: Any) -> Any:
    """Like :func:`run_one` but returns the live :class:`navic.runner.Run` (for traces, stats)."""
    return _call_runner(scn, lambda runner: runner.simulate(scn, **kw))


def run_one(scn: Scenario) -> dict[str, Any]:
    """Run a checked scenario with :func:`navic.runner.run_scenario` (the JSON-ready result)."""
    return _call_runner(scn, lambda runner: runner.run_scenario(scn))


def to_json(result: Mapping[str, Any]) -> str:
    """The canonical JSON text of a result: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


def emit_result(result: Mapping[str, Any], *, as_json: bool, out: str | None, max_rows: int = 50) -> None:
    if out is not None:
        Path(out).write_text(to_json(result), encoding="utf-8")
    if as_json:
        click.echo(to_json(result), nl=False)
    else:
        render_result(result, _console(), max_rows=max_rows)


def _console() -> Console:
    # Resolved at call time so click's CliRunner (which swaps sys.stdout) captures the output.
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


# ---------------------------------------------------------------------------------------------
# Readable rendering of a result (docs/scenarios.md, "Result")
# ---------------------------------------------------------------------------------------------
def _hex(value: Any, width: int = 0) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return "-" if value is None else str(value)
    return f"{value:#0{width + 2}x}" if width else f"{value:#x}"


def _bare(value: Any, width: int = 0) -> str:
    """Hex without the 0x prefix (for tables whose title says "hex")."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "-" if value is None else str(value)
    return f"{value:0{width}x}"


def _vectors(words: Any) -> str:
    """A 256-bit register given as 8 32-bit words -> the set vectors, e.g. "0x40 0x41"."""
    if not isinstance(words, list | tuple):
        return "-" if words is None else str(words)
    vecs = [32 * i + b for i, w in enumerate(words) if isinstance(w, int) for b in range(32) if w >> b & 1]
    return " ".join(f"{v:02x}" for v in vecs) if vecs else "-"


def _flat(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k in sorted(value, key=str):
            yield from _flat(value[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def _cell(value: Any) -> str:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True)
    return "-" if value is None else str(value)


def _table(title: str, **kwargs: Any) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                 collapse_padding=True, **kwargs)


def render_result(result: Mapping[str, Any], console: Console, *, max_rows: int = 50) -> None:
    """Print a result as tables: deliveries, final APIC state, reads, errors, exits/counters
    (when non-empty) and violations. Unknown keys are ignored; missing ones are skipped."""
    name = result.get("scenario", "?")
    console.print(
        f"[bold]{name}[/bold]  seed={result.get('seed', '?')}  "
        f"sim_time={result.get('sim_time_cycles', '?')} cycles"
    )

    deliveries = list(result.get("deliveries") or [])
    table = _table(f"deliveries ({len(deliveries)})")
    for col in ("#", "t", "cpu", "vector", "kind", "sent_by", "latency"):
        table.add_column(col, justify="right" if col in ("#", "t", "latency") else "left")
    for i, d in enumerate(deliveries[:max_rows]):
        table.add_row(str(i), _cell(d.get("t")), _cell(d.get("cpu")), _hex(d.get("vector"), 2),
                      _cell(d.get("kind")), _cell(d.get("sent_by")), _cell(d.get("latency")))
    if len(deliveries) > max_rows:
        table.caption = f"... {len(deliveries) - max_rows} more (use --json for all)"
    console.print(table)

    apic = result.get("apic") or {}
    if apic:
        table = _table("APIC registers at the end (hex; isr/irr/tmr: the vectors set)")
        for col in ("cpu", "id", "ldr", "dfr", "tpr", "ppr", "svr", "esr"):
            table.add_column(col, no_wrap=True)
        for col in ("isr", "irr", "tmr"):
            table.add_column(col, overflow="fold", min_width=4)
        for cpu in apic:
            r = apic[cpu] or {}
            table.add_row(str(cpu), _bare(r.get("id")), _bare(r.get("ldr"), 8), _bare(r.get("dfr"), 8),
                          _bare(r.get("tpr"), 2), _bare(r.get("ppr"), 2), _bare(r.get("svr"), 3),
                          _bare(r.get("esr")), _vectors(r.get("isr")), _vectors(r.get("irr")),
                          _vectors(r.get("tmr")))
        console.print(table)

    reads = result.get("reads") or {}
    if any(reads.values()):
        table = _table("reads")
        for col in ("cpu", "var", "value", "hex"):
            table.add_column(col)
        for cpu in reads:
            for var, value in (reads[cpu] or {}).items():
                table.add_row(str(cpu), str(var), _cell(value), _hex(value))
        console.print(table)

    errors = list(result.get("errors") or [])
    if errors:
        table = _table(f"guest-visible errors ({len(errors)})")
        for col in ("cpu", "op", "index", "error"):
            table.add_column(col)
        for e in errors[:max_rows]:
            table.add_row(_cell(e.get("cpu")), _cell(e.get("op")), _cell(e.get("index")),
                          _cell(e.get("error")))
        console.print(table)

    for key in ("exits", "counters"):
        section = result.get(key) or {}
        if section:
            table = _table(key)
            table.add_column("name")
            table.add_column("value", justify="right")
            for k, v in _flat(section):
                table.add_row(k, _cell(v))
            console.print(table)

    violations = list(result.get("violations") or [])
    if violations:
        table = _table(f"VIOLATIONS ({len(violations)})", style="red")
        table.add_column("#", justify="right")
        table.add_column("violation")
        for i, v in enumerate(violations):
            table.add_row(str(i), _cell(v))
        console.print(table)
    else:
        console.print("violations: none")


# ---------------------------------------------------------------------------------------------
# navic run
# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True),
              help="Also write the JSON result to this file.")
@click.option("--max-rows", type=click.IntRange(min=1), default=50, show_default=True,
              help="Rows per table in the readable output.")
@click.option("--trace-text", is_flag=True,
              help="Print the run's events, one per line, in trace-cmd report's shape (KVM tracepoint names).")
@click.option("--schedule", "schedule", type=click.Path(dir_okay=False, exists=True),
              help="Replay a schedule written by `navic explore` (deterministic; same violation).")
@click.option("--max-events", type=click.IntRange(min=1), default=None,
              help="Stop after this many simulator events (partial results, exit status 1).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds of wall time (partial results, exit status 1).")
def run(file: str, as_json: bool, out: str | None, max_rows: int, trace_text: bool,
        schedule: str | None, max_events: int | None, timeout: float | None) -> None:
    """Run the scenario FILE (TOML; see docs/scenarios.md)."""
    scn = load_or_exit(file)
    if max_events is not None or timeout is not None:
        if schedule is not None:
            raise click.UsageError("--max-events / --timeout do not apply to --schedule replays")
        limits = _runner().Limits(max_events=max_events, timeout_s=timeout)
        r = simulate_one(scn, trace=trace_text, limits=limits)
        if trace_text:
            for line in r.trace.text_lines(r.costs.ghz):
                click.echo(line)
            if out is not None:
                Path(out).write_text(to_json(r.result()), encoding="utf-8")
        else:
            emit_result(r.result(), as_json=as_json, out=out, max_rows=max_rows)
        if r.stopped_by is not None:
            click.echo(r.stopped_by["message"], err=True)
            raise click.exceptions.Exit(EXIT_FAILURE)
        return
    if schedule is not None:
        r = _replay_schedule(scn, schedule, trace=trace_text)
        if trace_text:
            for line in r.trace.text_lines(r.costs.ghz):
                click.echo(line)
            if out is not None:
                Path(out).write_text(to_json(r.result()), encoding="utf-8")
            return
        emit_result(r.result(), as_json=as_json, out=out, max_rows=max_rows)
        return
    if trace_text:
        r = simulate_one(scn, trace=True)
        for line in r.trace.text_lines(r.costs.ghz):
            click.echo(line)
        if out is not None:
            Path(out).write_text(to_json(r.result()), encoding="utf-8")
        return
    emit_result(run_one(scn), as_json=as_json, out=out, max_rows=max_rows)


def _replay_schedule(scn: Scenario, path: str, *, trace: bool) -> Any:
    """``navic run --schedule``: load the schedule, check it names this scenario, replay it (with
    the design and mutant it was found under)."""
    import hashlib

    from navic.check import explore

    try:
        doc = explore.load_schedule(path)
    except explore.ScheduleError as exc:
        click.echo(str(exc), err=True)
        raise click.exceptions.Exit(EXIT_SCENARIO_ERROR) from None
    sha = doc.get("scenario_sha256")
    if sha and Path(file_path := scn.source).is_file():
        if hashlib.sha256(Path(file_path).read_bytes()).hexdigest() != sha:
            click.echo(f"navic: warning: {path} was recorded for a different version of {scn.source}; "
                       "the replay may diverge", err=True)
    if doc.get("mutant"):
        click.echo(f"navic: replaying with mutant {doc['mutant']!r} (recorded in {path})", err=True)
    runner = importlib.import_module("navic.runner")
    try:
        return explore.replay(scn, doc, trace=trace)
    except (runner.UnsupportedScenario, NotImplementedError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not message.startswith(f"{scn.source}:"):
            message = f"{scn.source}: not supported yet: {message}"
        click.echo(message, err=True)
        raise click.exceptions.Exit(EXIT_SCENARIO_ERROR) from None


# ---------------------------------------------------------------------------------------------
# navic explore
# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--design", type=click.Choice(list(NESTED_APICV)), default=None,
              help="Nested design (overrides [l0] nested_apicv; passed through into the scenario).")
@click.option("--max-steps", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Engine steps per run (each run is cut there).")
@click.option("--preemptions", "-k", type=click.IntRange(min=0), default=2, show_default=True,
              help="Bound K: deviations from the time-order schedule per run (iteratively 0..K).")
@click.option("--horizon", type=click.IntRange(min=0), default=6_000, show_default=True,
              help="Cycles after the earliest pending event that another agent's event may be run early.")
@click.option("--width", type=click.IntRange(min=2), default=3, show_default=True,
              help="Candidates per decision point (the earliest event and up to WIDTH-1 others).")
@click.option("--no-hash", "no_hash", is_flag=True, help="Do not prune revisited states (purely stateless search).")
@click.option("--no-leaf-hash", "no_leaf_hash", is_flag=True,
              help="Do not hash states where no deviation is left (same schedules and verdict, less CPU: "
                   "-36% at K=2 on the nested ping-pong; `states` then counts only states with budget left).")
@click.option("--mutant", default=None, help="Explore a deliberately broken model (see navic/check/mutants.py).")
@click.option("--time-limit", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds.")
@click.option("--schedule-out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Where to write a violation's schedule (default: SCENARIO-STEM.schedule.json here).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes (the subtrees of each bound are searched in parallel).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Search on a dask.distributed cluster instead of local processes.")
@click.option("--resume", "resume_file", type=click.Path(dir_okay=False), default=None,
              help="Continue an interrupted search from its checkpoint file.")
@click.option("--checkpoint", "checkpoint_out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Where an interrupted or timed-out search writes its checkpoint "
                   "(default: SCENARIO-STEM.checkpoint.json here).")
@click.option("--reduction", type=click.Choice(["none", "sleep", "dpor", "dpor-untimed"]), default="dpor",
              show_default=True,
              help="Partial-order reduction (docs/verification.md): 'dpor' searches a deviation only "
                   "where the step it brings forward races with one it overtakes, or where its delay "
                   "could reverse a later dependent pair (observed writes, declared interactions: "
                   "navic/check/independence.py); 'dpor-untimed' drops the delay rule (more reduction; "
                   "treats delays of independent steps as equivalent); 'sleep': sleep sets (not with "
                   "-j/--scheduler); 'none': every deviation, the cross-check.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def explore(file: str, design: str | None, max_steps: int, preemptions: int, horizon: int, width: int,
            no_hash: bool, no_leaf_hash: bool, mutant: str | None, time_limit: float | None,
            schedule_out: str | None, jobs: int, scheduler: str | None, resume_file: str | None,
            checkpoint_out: str | None, reduction: str, as_json: bool) -> None:
    """Search the schedules of scenario FILE systematically for oracle violations (stuck, lost,
    duplicated, misrouted) within bounds; write the first one found as a replayable schedule."""
    from rich.progress import Progress as Bar
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from navic.check import explore as X

    scn = load_or_exit(file)
    if reduction == "sleep" and (jobs > 1 or scheduler is not None):
        click.echo(f"navic explore: --reduction {reduction}: not supported with --jobs/--scheduler (use -j 1)",
                   err=True)
        raise click.exceptions.Exit(EXIT_SCENARIO_ERROR)
    if mutant is not None:
        from navic.check import mutants

        try:
            mutants.get(mutant)
        except KeyError as exc:
            raise click.BadParameter(str(exc.args[0]), param_hint="--mutant") from None
    opts = X.Options(max_steps=max_steps, preemptions=preemptions, horizon=horizon, width=width,
                     hashing=not no_hash, leaf_hashing=not no_leaf_hash, mutant=mutant, design=design,
                     time_limit=time_limit, jobs=jobs, scheduler=scheduler, reduction=reduction)
    resume = None
    if resume_file is not None:
        try:
            resume = X.load_checkpoint(resume_file, scn, opts)
        except X.ScheduleError as exc:
            click.echo(str(exc), err=True)
            raise click.exceptions.Exit(EXIT_SCENARIO_ERROR) from None
    err = Console(file=sys.stderr, highlight=False)
    bar = Bar(SpinnerColumn(), TextColumn("[bold]exploring[/bold] {task.description}"), TimeElapsedColumn(),
              console=err, transient=True, disable=not err.is_terminal)
    task = bar.add_task("", total=None)

    def tick(p: X.Progress) -> None:
        bar.update(task, description=(f"bound {p.bound}/{preemptions}  schedules {p.schedules}  "
                                      f"states {p.states} ({p.rate:.0f}/s)  frontier {p.frontier}  "
                                      f"pruned {p.pruned}"))

    runner = importlib.import_module("navic.runner")
    explorer = X.Explorer(scn, opts, on_progress=tick, resume=resume)
    try:
        with bar:
            outcome = explorer.run()
    except OSError as exc:
        if scheduler is None:
            raise
        click.echo(f"navic explore: {scheduler}: {' '.join(str(exc).split())}", err=True)
        raise click.exceptions.Exit(EXIT_FAILURE) from None
    except (runner.UnsupportedScenario, NotImplementedError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not message.startswith(f"{scn.source}:"):
            message = f"{scn.source}: not supported yet: {message}"
        click.echo(message, err=True)
        raise click.exceptions.Exit(EXIT_SCENARIO_ERROR) from None
    if outcome.interrupted or outcome.timed_out:
        outcome.checkpoint_file = checkpoint_out or f"{Path(file).stem}.checkpoint.json"
        X.write_schedule(outcome.checkpoint_file, X.checkpoint_doc(explorer, outcome))
    if outcome.violation is not None:
        target = schedule_out or f"{Path(file).stem}.schedule.json"
        X.write_schedule(target, explorer.schedule_doc(target, outcome))
        outcome.schedule_file = target
        outcome.replay_ok = X.check_replay(scn, target, outcome.violation)
    if as_json:
        click.echo(to_json({**outcome.as_json(), "reduction": opts.reduction}), nl=False)
    else:
        _render_explore(outcome, opts, file)
    if outcome.interrupted:
        raise click.exceptions.Exit(130)
    if outcome.violation is not None:
        raise click.exceptions.Exit(EXIT_FAILURE)


def _render_explore(outcome: Any, opts: Any, file: str) -> None:
    p = outcome.progress
    con = _console()
    bounds = (f"K={opts.preemptions} deviations, max-steps={opts.max_steps}, horizon={opts.horizon} cycles, "
              f"width={max(2, opts.width)}{', no state hashing' if not opts.hashing else ''}"
              + (f", mutant {opts.mutant}" if opts.mutant else "")
              + (f", design {opts.design}" if opts.design else "")
              + f", reduction {opts.reduction}")
    con.print(f"explored {p.states} states, {p.schedules} schedules ({p.pruned} cut at a known state, "
              f"{p.truncated} at max-steps) in {p.seconds:.2f} s; bounds: {bounds}")
    if outcome.interrupted or outcome.timed_out:
        why = "interrupted" if outcome.interrupted else "time limit reached"
        done = (f"bounds 0..{p.complete_bound} exhausted" if p.complete_bound >= 0 else "no bound exhausted")
        con.print(f"[yellow]{why}[/yellow]: {done}; bound {p.bound} partly explored")
        if outcome.checkpoint_file:
            con.print(f"  checkpoint: {outcome.checkpoint_file} (continue with --resume {outcome.checkpoint_file})")
        return
    v = outcome.violation
    if v is None:
        con.print("[green]no violation within bounds[/green]")
        return
    vec = v.get("vector")
    con.print(f"[red]VIOLATION[/red] {v.get('kind')} on {v.get('cpu')} vector "
              f"{vec:#x}" if isinstance(vec, int) else f"[red]VIOLATION[/red] {v.get('kind')} on {v.get('cpu')}")
    con.print(f"  {v.get('detail')}")
    n = len(outcome.decisions or [])
    con.print(f"  minimised schedule: {n} decision(s) (from {len(outcome.raw_decisions or [])}) "
              f"-> {outcome.schedule_file}"
              + ("" if outcome.replay_ok else "  [red](replay did NOT reproduce it)[/red]"))
    for d in outcome.decisions or []:
        con.print(f"    at decision {d[3]}: {d[0]} -> {d[1]} (alternative {d[2]})")
    con.print(f"  replay: navic run {file} --schedule {outcome.schedule_file} [--trace-text]")


# ---------------------------------------------------------------------------------------------
# navic demo
# ---------------------------------------------------------------------------------------------
def _repo_examples() -> Path:
    # With the usual editable install (make demo/test) the package lives in the repository.
    return Path(__file__).resolve().parent.parent / "examples"


def examples_dir() -> Path | None:
    """Where the shipped examples are: the repository's examples/ when navic runs from a checkout,
    else the packaged copy navic/data/examples (if the package was built with one)."""
    repo = _repo_examples()
    if repo.is_dir() and any(repo.glob("*.toml")):
        return repo
    try:
        packaged = resources.files("navic") / "data" / "examples"
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    return None


def _description(path: Path) -> str:
    """The comment block at the top of a scenario file, without the '#' marks."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


@main.command()
@click.option("--examples", "examples", type=click.Path(file_okay=False, exists=True),
              help="Directory of *.toml scenarios (default: the shipped examples).")
@click.option("--max-rows", type=click.IntRange(min=1), default=12, show_default=True,
              help="Rows per table.")
def demo(examples: str | None, max_rows: int) -> None:
    """Run every example scenario and print readable results."""
    where = Path(examples) if examples else examples_dir()
    if where is None:
        click.echo("navic demo: no examples found (pass --examples DIR)", err=True)
        raise click.exceptions.Exit(EXIT_FAILURE)
    files = sorted(where.glob("*.toml"))
    if not files:
        click.echo(f"navic demo: no *.toml files in {where}", err=True)
        raise click.exceptions.Exit(EXIT_FAILURE)
    console = _console()
    failed: list[str] = []
    for path in files:
        console.rule(f"[bold]{path.name}")
        about = _description(path)
        if about:
            console.print(about, style="italic", markup=False)
        try:
            scn = load_scenario(path)
        except ScenarioError as exc:
            click.echo(str(exc), err=True)
            failed.append(path.name)
            continue
        render_result(run_one(scn), console, max_rows=max_rows)
    console.rule()
    console.print(f"{len(files) - len(failed)}/{len(files)} examples ran"
                  + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise click.exceptions.Exit(EXIT_SCENARIO_ERROR)


# ---------------------------------------------------------------------------------------------
# Subcommands in navic.commands.* (compare, explore, sweep, trace, stat, conformance, ...)
# ---------------------------------------------------------------------------------------------
def _load_command_modules() -> None:
    try:
        package = importlib.import_module("navic.commands")
    except ModuleNotFoundError as exc:
        if exc.name == "navic.commands":
            return
        raise
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"navic.commands.{info.name}")


_load_command_modules()


if __name__ == "__main__":  # pragma: no cover
    main()
