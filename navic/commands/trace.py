"""``navic trace`` (Perfetto/Chrome trace-event JSON) and ``navic stat`` (perf kvm stat-like table)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from navic.cli import load_or_exit, main, simulate_one
from navic.sim import perfetto


@main.command("trace")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="run.json", show_default=True,
              help="Where to write the trace (open it in ui.perfetto.dev).")
def trace_cmd(file: str, output: str) -> None:
    """Run FILE and write a Perfetto-compatible trace: one track per pCPU with host / L1 / L2 slices,
    exits as instant events with their EXITINFO, flow arrows from each IPI send to its handler."""
    scn = load_or_exit(file)
    run = simulate_one(scn, trace=True)
    doc = perfetto.chrome_trace(run)
    Path(output).write_text(json.dumps(doc, sort_keys=True) + "\n", encoding="utf-8")
    click.echo(f"{output}: {len(doc['traceEvents'])} trace events ({scn.name}); open it in ui.perfetto.dev")


@main.command("stat")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def stat_cmd(file: str, as_json: bool) -> None:
    """Run FILE and summarise VM exits like `perf kvm stat report`: reason, samples, %, time, average."""
    scn = load_or_exit(file)
    run = simulate_one(scn, trace=True)
    rows = perfetto.kvm_stat(run)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    t = Table(title=f"VM-exit statistics: {scn.name}", title_justify="left", header_style="bold")
    for col in ("VM-EXIT", "Samples", "Samples%", "Time (us)", "Avg time (us)"):
        t.add_column(col, justify="left" if col == "VM-EXIT" else "right")
    for r in rows:
        t.add_row(r["reason"], str(r["samples"]), f"{r['pct']:.2f}%", f"{r['time_us']:.3f}", f"{r['avg_us']:.3f}")
    total = sum(r["samples"] for r in rows)
    Console().print(t)
    click.echo(f"Total samples: {total}")
