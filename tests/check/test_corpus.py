"""The regression corpus: every corpus mutant (the pre-fix behaviour of a real upstream KVM fix) is
found by the explorer within a small bound on its scenario, with the violation kind it declares,
and the unmutated model passes the same scenario at the same bound. Plus `navic mutants`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from navic.check import explore as X
from navic.check import mutants
from navic.cli import main
from navic.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [m for m in mutants.MUTANTS.values() if m.commit or m.introduced]
MAX_STEPS = 20_000


def _explore(m: mutants.Mutant, mutant: str | None):
    scn = X.apply_design(load_scenario(ROOT / m.scenario), m.design)
    e = X.Explorer(scn, X.Options(preemptions=m.bound, max_steps=MAX_STEPS, mutant=mutant))
    return e.run()


def _ids(m: mutants.Mutant) -> str:
    return f"{m.name}-{m.alias}"


def test_corpus_has_real_bugs_each_with_a_scenario():
    assert len(CORPUS) >= 11    # docs/verification.md "Regression corpus" lists what is missing
    for m in CORPUS:
        assert re.fullmatch(r"[0-9a-f]{12,40}", m.commit or m.introduced), m.name
        assert m.subject and m.source, m.name
        assert (ROOT / m.scenario).is_file(), m.scenario


@pytest.mark.parametrize("m", CORPUS, ids=_ids)
def test_corpus_mutant_is_found(m):
    out = _explore(m, m.name)
    assert out.violation is not None, f"{m.name} not found within K = {m.bound}"
    assert out.violation["kind"] == m.expect


# The unmutated model at the same bound: K = 4 on the zen4 ping-pong (mutant b) takes ~30 s.
@pytest.mark.parametrize("m", [pytest.param(m, marks=pytest.mark.slow) if m.bound > 2 else m
                               for m in CORPUS], ids=_ids)
def test_fixed_model_passes_the_corpus_scenario(m):
    out = _explore(m, None)
    assert out.complete and out.violation is None


def test_navic_mutants_lists_every_mutant_with_its_commit():
    r = CliRunner().invoke(main, ["mutants", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [d["name"] for d in doc] == list(mutants.MUTANTS)
    by = {d["name"]: d for d in doc}
    for m in CORPUS:
        assert by[m.name]["commit"] == (m.commit or None) and by[m.name]["subject"] == m.subject
    table = CliRunner().invoke(main, ["mutants"])
    assert table.exit_code == 0
    for m in CORPUS:
        assert (m.commit or m.introduced)[:12] in table.output
