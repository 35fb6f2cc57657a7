"""Parallel and distributed exploration (navic/check/parallel.py), checkpoints and resume.

The parallel search must give the serial search's result: the same verdict, and on a violation the
same kind, CPU and vector. Quick bounds here; the mutant that needs K = 3 is ``slow``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from navic.check import explore as X
from navic.check.parallel import SharedVisited
from navic.cli import main
from navic.scenario import load_scenario

EX = Path(__file__).resolve().parents[2] / "examples"
PINGPONG = EX / "explore-pingpong-zen4.toml"
ERRATUM = EX / "explore-erratum1235.toml"
NESTED = EX / "explore-nested-pingpong.toml"


def result(path: Path, **kw) -> tuple[X.Outcome, tuple]:
    out = X.Explorer(load_scenario(str(path)), X.Options(**kw)).run()
    key = X.violation_key(out.violation) if out.violation else None
    return out, (out.complete, key)


@pytest.mark.parametrize(("path", "kw"), [
    (PINGPONG, {"preemptions": 2}),
    (ERRATUM, {"preemptions": 1}),
    (NESTED, {"preemptions": 1, "design": "dummy"}),
    (NESTED, {"preemptions": 1, "design": "shadow", "mutant": "d"}),
], ids=["pingpong-k2", "erratum-k1", "nested-dummy-k1", "nested-shadow-mutant-d"])
def test_two_workers_give_the_serial_result(path, kw):
    serial, want = result(path, **kw)
    par, got = result(path, jobs=2, **kw)
    assert got == want
    if serial.violation is None:
        assert par.progress.complete_bound == serial.progress.complete_bound == kw["preemptions"]
        # The shared table keeps the pruning close to the serial search's.
        assert par.progress.schedules <= 1.5 * serial.progress.schedules
    else:
        assert par.decisions is not None and par.decisions == serial.decisions


def test_dask_local_cluster_gives_the_serial_result():
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    from distributed import LocalCluster

    _serial, want = result(PINGPONG, preemptions=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:
        out, got = result(PINGPONG, preemptions=1, scheduler=cluster.scheduler_address)
        _o, got_m = result(ERRATUM, preemptions=1, scheduler=cluster.scheduler_address)
    assert got == want and out.complete
    assert got_m == result(ERRATUM, preemptions=1)[1]


def test_shared_visited_table():
    t = SharedVisited(slots=8)
    a, b = b"a" * 16, b"b" * 16
    assert t.get(a) is None
    t[a] = 2
    t[b] = 1
    assert (t.get(a), t.get(b)) == (2, 1)
    t[a] = 3
    assert t.get(a) == 3
    for i in range(20):          # more keys than slots: inserts are dropped, lookups say "not visited"
        t[bytes([i + 1]) * 16] = 1
    assert t.get(bytes([200]) * 16) is None
    t.clear()
    assert t.get(a) is None


def test_frontier_counts_untried_alternatives_within_budget():
    trail = [("window", ["a", "b"], 0, 0), ("window", ["a", "b", "c"], 0, 0), ("window", ["a", "b"], 1, 0)]
    assert X.frontier(trail, 1) == 1 + 2 + 0
    assert X.frontier(trail, 1, floor=1) == 2
    assert X.frontier(trail, 0) == 0


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_interrupted_search_resumes_to_the_same_result(jobs):
    scn = load_scenario(str(PINGPONG))
    calls = []

    def stop(p: X.Progress) -> None:
        calls.append(p.schedules)
        if len(calls) == 40:
            raise KeyboardInterrupt

    first = X.Explorer(scn, X.Options(preemptions=2, jobs=jobs), on_progress=stop).run()
    assert first.interrupted and first.position is not None and first.position.bound >= 1
    rest = X.Explorer(scn, X.Options(preemptions=2, jobs=jobs), resume=first.position).run()
    assert rest.complete and rest.violation is None
    assert rest.progress.complete_bound == 2


def test_cli_time_limit_writes_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "-k", "2", "--time-limit", "0", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["complete"] is False and doc["checkpoint_file"] == "explore-pingpong-zen4.checkpoint.json"
    ck = json.loads((tmp_path / doc["checkpoint_file"]).read_text())
    assert ck["navic_explore_checkpoint"] == 1 and ck["options"]["preemptions"] == 2
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "-k", "1", "--resume", doc["checkpoint_file"]])
    assert r.exit_code == 2 and "options.preemptions" in r.stderr     # another search: refused
    r = CliRunner().invoke(main, ["explore", str(PINGPONG), "-k", "2", "--resume", doc["checkpoint_file"],
                                  "--time-limit", "600", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["complete"] is True


def test_unreachable_scheduler_is_one_line():
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        r = CliRunner().invoke(main, ["explore", str(PINGPONG), "-k", "1", "--scheduler", "tcp://127.0.0.1:9"])
    assert r.exit_code == 1 and r.stderr.startswith("navic explore: tcp://127.0.0.1:9:"), r.output


class Kvm:   # a stand-in: its method's code qualname is one listed in explore.TIME_LOCALS
    def __init__(self, clock: list[int]) -> None:
        self.clock = clock

    def kvm_vcpu_halt(self):
        start = self.clock[0]
        yield 0
        yield start


def test_timestamps_in_suspended_frames_are_hashed_relative_to_now():
    early, late = Kvm([1000]), Kvm([5000])
    g1, g2 = early.kvm_vcpu_halt(), late.kvm_vcpu_halt()
    next(g1), next(g2)
    assert X._pc(g1, 1200) == X._pc(g2, 5200)      # halted 200 cycles ago, both
    assert X._pc(g1, 1200) != X._pc(g2, 5300)


# ---- every explore example and every mutant: -j 2 gives the serial result (long: slow) -----------
EXAMPLES = sorted(EX.glob("explore-*.toml"))
MUTANT_BOUNDS = [("a", PINGPONG, None, 3), ("b", PINGPONG, None, 4), ("c", EX / "explore-nested-spin.toml", "dummy", 1),
                 ("d", NESTED, "shadow", 1), ("e", NESTED, "dummy", 1),
                 ("f", EX / "explore-nested-broadcast.toml", "dummy", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_explore_example_two_workers_match_serial_at_bound_1(path):
    assert result(path, preemptions=1, jobs=2)[1] == result(path, preemptions=1)[1]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "path", "design", "k"), MUTANT_BOUNDS, ids=[m[0] for m in MUTANT_BOUNDS])
def test_every_mutant_two_workers_match_serial(name, path, design, k):
    want = result(path, preemptions=k, design=design, mutant=name)[1]
    assert want[1] is not None
    assert result(path, preemptions=k, design=design, mutant=name, jobs=2)[1] == want


def test_bench_explore_prints_a_line_per_case_bound_and_jobs():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "bench/explore.py", "--only", "erratum1235", "--k", "1"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stdout.splitlines() if x.startswith("erratum1235")]
    assert len(lines) == 4 and all("stuck l1.0 0x41" in x for x in lines)       # none, dpor x -j 1, 2
    assert [x.split()[2] for x in lines] == ["none", "none", "dpor", "dpor"]
    assert "speed-up" in lines[1] and "efficiency" in lines[1]
    assert "fewer states" in lines[2] and "VERDICT DIFFERS" not in lines[2]


@pytest.mark.parametrize(("path", "kw"), [(PINGPONG, {"preemptions": 2}), (ERRATUM, {"preemptions": 1}),
                                          (PINGPONG, {"preemptions": 3, "mutant": "a"})],
                         ids=["pingpong-k2", "erratum-k1", "mutant-a-k3"])
def test_without_leaf_hashing_the_same_schedules_run(path, kw):
    full, want = result(path, **kw)
    lean, got = result(path, leaf_hashing=False, **kw)
    assert got == want and lean.decisions == full.decisions
    assert lean.progress.schedules == full.progress.schedules
    assert lean.progress.states < full.progress.states
