"""The interleaving explorer: acceptance runs (erratum 1235, ipiv auto, zen4 ping-pong, mutants),
schedule files and their replay through `navic run --schedule`, the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from navic.check import explore as X
from navic.check import mutants
from navic.cli import main
from navic.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
ERRATUM = EX / "explore-erratum1235.toml"
AUTO = EX / "explore-erratum1235-ipiv-auto.toml"
PINGPONG = EX / "explore-pingpong-zen4.toml"


def explore(path: Path, **kw) -> tuple[X.Explorer, X.Outcome]:
    e = X.Explorer(load_scenario(path), X.Options(**kw))
    return e, e.run()


def test_erratum_1235_is_found_without_forcing_p_and_replays(tmp_path):
    scn = load_scenario(ERRATUM)
    assert scn.l0.erratum_1235_p < 1.0          # the explorer forces the choice, not the weight
    e, out = explore(ERRATUM, preemptions=1)
    assert out.violation is not None and out.violation["kind"] == "stuck"
    assert out.decisions == [["choose", "erratum1235", 1, out.decisions[0][3]]]
    path = tmp_path / "s.json"
    X.write_schedule(path, e.schedule_doc(path, out))
    assert X.check_replay(scn, path, out.violation)
    # Replaying is deterministic: twice the same result.
    doc = X.load_schedule(path)
    r1, r2 = X.replay(scn, doc).result(), X.replay(scn, doc).result()
    assert r1 == r2 and r1["violations"][0]["kind"] == "stuck"
    # Without the decision the same scenario runs clean (alternative 0 everywhere).
    clean = X.replay(scn, dict(doc, decisions=[]))
    assert clean.recorder.violations == []


def test_ipiv_auto_on_zen2_has_no_violation_within_bound_1():
    _, out = explore(AUTO, preemptions=1)
    assert out.complete and out.violation is None
    assert out.progress.complete_bound == 1 and out.progress.schedules > 1


@pytest.mark.slow
def test_ipiv_auto_on_zen2_has_no_violation_within_bound_2():
    _, out = explore(AUTO, preemptions=2)
    assert out.complete and out.violation is None


def test_zen4_blocking_pingpong_clean_within_bound_2():
    _, out = explore(PINGPONG, preemptions=2)
    assert out.complete and out.violation is None
    assert out.progress.pruned > 0 and out.progress.states > out.progress.schedules


@pytest.mark.slow
def test_zen4_blocking_pingpong_clean_within_bound_4():
    _, out = explore(PINGPONG, preemptions=4)
    assert out.complete and out.violation is None
    assert out.progress.seconds < 120


def test_mutant_a_block_reads_virr_first_is_caught(tmp_path):
    e, out = explore(PINGPONG, preemptions=3, mutant="a")
    assert out.violation is not None and out.violation["kind"] == "stuck"
    path = tmp_path / "a.json"
    X.write_schedule(path, e.schedule_doc(path, out))
    assert X.check_replay(load_scenario(PINGPONG), path, out.violation)
    # The same schedule on the correct model shows nothing: the bug is the mutant's.
    doc = dict(X.load_schedule(path), mutant=None)
    assert X.replay(load_scenario(PINGPONG), doc).recorder.violations == []


def test_mutant_b_id1_sets_irr_again_is_caught_as_duplicated():
    _, out = explore(PINGPONG, preemptions=4, mutant="id1-sets-irr-again")
    assert out.violation is not None and out.violation["kind"] == "duplicated"
    assert out.violation["cpu"] == "l1.1" and out.violation["vector"] == 0x40


def test_mutants_are_restored_and_named():
    from navic.hv.kvm import Kvm

    orig = Kvm.__dict__["kvm_vcpu_block"]
    with mutants.active("block-reads-virr-first") as m:
        assert m.name == "a" and Kvm.__dict__["kvm_vcpu_block"] is not orig
    assert Kvm.__dict__["kvm_vcpu_block"] is orig
    assert mutants.get("b").expect == "duplicated"
    with pytest.raises(KeyError):
        mutants.get("nope")


def test_keyboard_interrupt_reports_coverage():
    calls = []

    def stop(p: X.Progress) -> None:
        calls.append(p.schedules)
        if len(calls) == 3:
            raise KeyboardInterrupt

    e = X.Explorer(load_scenario(PINGPONG), X.Options(preemptions=2), on_progress=stop)
    out = e.run()
    assert out.interrupted and not out.complete and out.progress.schedules == 3
    assert out.as_json()["complete"] is False


def test_next_prefix_is_depth_first_within_the_budget():
    trail = [("window", ["a", "b"], 0, 0), ("choose", ["e", "e"], 0, 0), ("window", ["a", "b", "c"], 0, 0)]
    assert X.next_prefix(trail, 1) == [0, 0, 1]
    assert X.next_prefix(trail, 0) is None
    trail = [("window", ["a", "b"], 0, 0), ("window", ["a", "b", "c"], 2, 0)]
    assert X.next_prefix(trail, 1) == [1]
    trail = [("window", ["a", "b"], 1, 0), ("window", ["a", "b", "c"], 0, 1)]
    assert X.next_prefix(trail, 1) is None
    assert X.next_prefix(trail, 2) == [1, 1]


def test_design_is_passed_through():
    scn = X.apply_design(load_scenario(PINGPONG), "shadow")
    assert scn.l0.nested_apicv == "shadow"
    with pytest.raises(ValueError):
        X.apply_design(scn, "bogus")


# --- CLI --------------------------------------------------------------------------------------
def test_cli_explore_json_and_run_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["explore", str(ERRATUM), "--json", "-k", "1"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"states", "schedules", "seconds", "complete", "violation", "reduction"}
    assert doc["reduction"] == "dpor"          # the default
    v = doc["violation"]
    assert set(v) == {"kind", "cpu", "vector", "detail", "schedule_file"} and v["kind"] == "stuck"
    sched = tmp_path / v["schedule_file"]
    assert sched.is_file() and json.loads(sched.read_text())["engine"]["mode"] == "window"
    r = CliRunner().invoke(main, ["run", str(ERRATUM), "--schedule", str(sched), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [(x["kind"], x["cpu"], x["vector"]) for x in res["violations"]] == [(v["kind"], v["cpu"], v["vector"])]
    r = CliRunner().invoke(main, ["run", str(ERRATUM), "--schedule", str(sched), "--trace-text"])
    assert r.exit_code == 0 and "kvm_avic_doorbell" in r.stdout


def test_cli_explore_clean_and_readable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "-k", "1", "--design", "none"])
    assert r.exit_code == 0, r.output
    assert "no violation within bounds" in r.stdout and "schedules" in r.stdout
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "--json", "-k", "1"])
    doc = json.loads(r.stdout)
    assert doc["complete"] is True and doc["violation"] is None and doc["states"] > 0
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "--mutant", "zz"])
    assert r.exit_code == 2 and "unknown mutant" in r.output


def test_cli_run_rejects_a_bad_schedule(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = CliRunner().invoke(main, ["run", str(PINGPONG), "--schedule", str(bad)])
    assert r.exit_code == 2 and "not a navic schedule" in r.output
