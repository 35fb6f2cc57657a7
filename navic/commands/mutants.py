"""``navic mutants``: the deliberately broken variants of the model the explorer must catch — the
hand-made ones (a–f) and the regression corpus of real upstream KVM bugs (g onwards), with the
upstream fix each corpus mutant undoes."""

from __future__ import annotations

import json

import click
from rich import box
from rich.console import Console
from rich.table import Table

from navic.cli import main


def rows() -> list[dict[str, object]]:
    """One row per mutant, in registry order."""
    from navic.check.mutants import MUTANTS

    return [{"name": m.name, "alias": m.alias, "expect": m.expect, "target": m.target,
             "description": m.description, "commit": m.commit or None, "subject": m.subject or None,
             "source": m.source or None, "scenario": m.scenario or None, "design": m.design,
             "introduced": m.introduced or None, "bound": m.bound}
            for m in MUTANTS.values()]


@main.command("mutants")
@click.option("--json", "as_json", is_flag=True, help="Print the list as one JSON document.")
def mutants_cmd(as_json: bool) -> None:
    """List the mutants (`navic explore --mutant NAME`): name, alias, the violation it should
    produce, the upstream commit it reverts (corpus mutants) and what it breaks."""
    data = rows()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    table = Table(box=box.SIMPLE_HEAD, title="navic mutants")
    for col in ("name", "alias", "expect", "upstream fix", "bug", "scenario"):
        table.add_column(col, overflow="fold")
    for r in data:
        if r["commit"]:
            fix = f"{str(r['commit'])[:12]} {r['subject']}"
        elif r["introduced"]:
            fix = f"bug introduced by {str(r['introduced'])[:12]} {r['subject']} (fixed by its revert)"
        else:
            fix = "-"
        table.add_row(str(r["name"]), str(r["alias"]), str(r["expect"]), fix, str(r["description"]),
                      str(r["scenario"] or "-"))
    Console(width=200).print(table)
