"""`navic sweep`: spec checking, point identity, the database, resume after SIGKILL, Dask = local."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from navic import sweep as S
from navic.cli import main
from navic.scenario import ScenarioError

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "examples" / "sweep-specs").glob("*.toml"))

# Fast points (hackbench in L1: ~20 ms each): 2 × 2 × 2 seeds = 8 points.
SMALL = """
name = "small"
seeds = [1, 2]
[base]
name = "hb"
max_time_us = 20000
[base.host]
cpu = "zen4"
virt = "kvm"
pcpus = 4
[base.l1]
vcpus = 4
[base.workload]
kind = "hackbench"
iterations = 10
[grid]
"l0.ipiv" = ["auto", false]
"host.cpu" = ["zen4", "zen2"]
"""

# Slower points (nested ping-pong: ~0.05-0.2 s each): 16 points, a few seconds on 2 workers.
SLOW = """
name = "slow"
seeds = 2
[base]
name = "nested"
max_time_us = 50000
[base.host]
virt = "kvm"
pcpus = 2
[base.l1]
vcpus = 2
[base.l2]
vcpus = 2
[base.workload]
kind = "ipi-pingpong"
level = "l2"
[grid]
"l0.nested_apicv" = ["none", "shadow"]
"host.cpu" = ["zen4", "zen2"]
"workload.iterations" = [60, 120]
"""


def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _db_rows(db: Path) -> dict[str, tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return {h: rest for h, *rest in con.execute(
            "SELECT hash, status, params, seed, result, metrics FROM points")}
    finally:
        con.close()


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["sweep", *args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_expand(path: Path) -> None:
    spec = S.load_spec(path)
    n = len(spec.seeds)
    for _, values in spec.grid:
        n *= len(values)
    assert len(spec.points) == n > 1
    assert len({p.hash for p in spec.points}) == n


def test_expansion_sets_dotted_keys_and_seeds(tmp_path: Path) -> None:
    spec = S.load_spec(_write(tmp_path, SMALL))
    assert [k for k, _ in spec.grid] == ["l0.ipiv", "host.cpu"]
    assert len(spec.points) == 8
    p = spec.points[-1]
    assert p.params == {"l0.ipiv": False, "host.cpu": "zen2"} and p.seed == 2
    assert p.scenario["l0"] == {"ipiv": False} and p.scenario["host"]["cpu"] == "zen2"
    assert p.scenario["seed"] == 2 and p.scenario["workload"]["iterations"] == 10


def test_grid_accepts_toml_dotted_keys_base_file_and_seed_count(tmp_path: Path) -> None:
    (tmp_path / "scn").mkdir()
    (tmp_path / "scn" / "pp.toml").write_text(
        'name = "pp"\n[host]\nvirt = "none"\n[l1]\nvcpus = 2\n[workload]\nkind = "ipi-pingpong"\n')
    spec = S.load_spec(_write(tmp_path, 'base = "scn/pp.toml"\nseeds = 3\n[grid]\nworkload.iterations = [5, 6]\n'))
    assert spec.grid == [("workload.iterations", [5, 6])] and spec.seeds == (1, 2, 3)
    assert spec.name == "pp" and len(spec.points) == 6


def test_point_hash_is_canonical_and_versioned() -> None:
    a = {"name": "x", "host": {"cpu": "zen4", "virt": "none"}, "seed": 1}
    b = {"seed": 1, "host": {"virt": "none", "cpu": "zen4"}, "name": "x"}
    assert S.point_hash(a, 1) == S.point_hash(b, 1)
    assert S.point_hash(a, 1) != S.point_hash(a, 2)
    assert S.point_hash(a, 1, "0.1.0") != S.point_hash(a, 1, "0.2.0")
    # The documented recipe (docs/sweep.md, "Point identity"), spelled out.
    doc = '{"navic":"0.1.0","scenario":{"host":{"cpu":"zen4","virt":"none"},"name":"x","seed":1},"seed":1}'
    import hashlib

    assert S.point_hash(a, 1, "0.1.0") == hashlib.sha256(f"navic-sweep-point/1\n{doc}".encode()).hexdigest()


BAD_SPECS = {
    "unknown-top": ('base = {name = "x"}\nbogus = 1\n', r"spec.toml: bogus: unknown key; expected one of"),
    "no-base": ("seeds = [1]\n", r"spec.toml: base: expected a scenario file name or a \[base\] table"),
    "base-file-missing": ('base = "nope.toml"\n', r"spec.toml: base: .*nope.toml: cannot read file"),
    "bad-base": ('[base]\nname = "x"\n[base.host]\nturbo = 1\n',
                 r"spec.toml: base.host.turbo: unknown key.* \(at seed=1\)$"),
    "bad-base-file": ('base = "b.toml"\n[grid]\n"l1.vcpus" = [2]\n',
                      r"spec.toml: base: .*b.toml: host.turbo: unknown key.* \(at grid point l1.vcpus=2, seed=1\)$"),
    "grid-overlap": ('[base]\nname = "x"\n[grid]\n"l0" = [{apicv = true}]\n"l0.apicv" = [false]\n',
                     r'spec.toml: grid."l0.apicv": expected a key path that does not overlap grid."l0"'),
    "grid-bad-param": ('[base]\nname = "x"\n[base.workload]\nkind = "ipi-pingpong"\n[grid]\n"workload.iters" = [1]\n',
                       r'spec.toml: grid."workload.iters": unknown parameter of workload "ipi-pingpong"'),
    "grid-not-list": ('[base]\nname = "x"\n[grid]\n"host.cpu" = "zen4"\n',
                      r'spec.toml: grid."host.cpu": expected a non-empty array of values, got "zen4"'),
    "grid-empty": ('[base]\nname = "x"\n[grid]\n"host.cpu" = []\n',
                   r'spec.toml: grid."host.cpu": expected a non-empty array'),
    "grid-dup": ('[base]\nname = "x"\n[grid]\n"host.cpu" = ["zen4", "zen4"]\n',
                 r'spec.toml: grid."host.cpu"\[1\]: expected distinct values, got "zen4" twice'),
    "grid-bad-value": ('[base]\nname = "x"\n[grid]\n"host.cpu" = ["zen4", "zen9"]\n',
                       r'spec.toml: grid."host.cpu"\[1\]: expected one of .*got "zen9"'),
    "grid-bad-key": ('[base]\nname = "x"\n[grid]\n"host.cpus" = [1]\n',
                     r'spec.toml: grid."host.cpus": unknown key'),
    "grid-seed": ('[base]\nname = "x"\n[grid]\nseed = [1, 2]\n', r'spec.toml: grid."seed": .*use seeds'),
    "grid-through-scalar": ('[base]\nname = "x"\n[grid]\n"name.x" = [1]\n',
                            r'spec.toml: grid."name.x": name is "x" in the base scenario, not a table'),
    "grid-bad-index": ('[base]\nname = "x"\n[grid]\n"program[0].cpu" = ["l1.0"]\n',
                       r'spec.toml: grid."program\[0\].cpu": program is not in the base scenario'),
    "cross-field": ('[base]\nname = "x"\n[base.host]\nvirt = "none"\n[base.workload]\nkind = "ipi-pingpong"\n'
                    '[grid]\n"l1.vcpus" = [2, 1]\n',
                    r"spec.toml: base.workload.kind: expected a VM with at least 2 vCPUs .*"
                    r"\(at grid point l1.vcpus=1, seed=1\)$"),
    "seeds-bad": ('[base]\nname = "x"\nseeds = 0\n', r"spec.toml: base.seeds: unknown key"),
    "seeds-zero": ('seeds = 0\n[base]\nname = "x"\n', r"spec.toml: seeds: expected a count 1..100000"),
    "seeds-dup": ('seeds = [1, 1]\n[base]\nname = "x"\n', r"spec.toml: seeds\[1\]: expected distinct seeds"),
    "metric-unknown": ('metrics = ["latency"]\n[base]\nname = "x"\n',
                       r'spec.toml: metrics\[0\]: expected one of .*got "latency"'),
    "bad-toml": ("[base\n", r"spec.toml:1:\d+: invalid TOML"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_specs_give_one_line_errors_and_exit_2(tmp_path: Path, name: str) -> None:
    import re

    text, pattern = BAD_SPECS[name]
    (tmp_path / "b.toml").write_text('name = "b"\n[host]\nturbo = 1\n')
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as exc:
        S.load_spec(path)
    assert re.match(pattern.replace("spec.toml", re.escape(str(path))), str(exc.value)), str(exc.value)
    result = CliRunner().invoke(main, ["sweep", str(path), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2
    assert result.stderr.strip() == str(exc.value) and "\n" not in result.stderr.strip()
    assert not (tmp_path / "x.db").exists(), "nothing is recorded for a bad spec"


# ---------------------------------------------------------------------------------------------
# Running, resuming, reporting
# ---------------------------------------------------------------------------------------------
def test_run_then_rerun_skips_finished_points(tmp_path: Path) -> None:
    spec = _write(tmp_path, SMALL)
    db = tmp_path / "s.db"
    r1 = _invoke(str(spec), "--db", str(db), "-j", "1", "--json")
    assert r1.exit_code == 0, r1.output
    doc = json.loads(r1.stdout)
    assert doc["ran"] == doc["done"] == doc["points"] == 8 and doc["already_done"] == 0
    rows = _db_rows(db)
    assert len(rows) == 8 and all(r[0] == "done" for r in rows.values())
    m = json.loads(next(iter(rows.values()))[4])
    assert {"latency_ns.p50", "exits_per_ipi.l0", "ipis"} <= set(m)
    r2 = _invoke(str(spec), "--db", str(db), "--json")
    assert json.loads(r2.stdout)["ran"] == 0 and json.loads(r2.stdout)["already_done"] == 8
    assert _db_rows(db) == rows
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_growing_the_grid_runs_only_new_points_and_other_bases_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _invoke(str(_write(tmp_path, SMALL)), "--db", str(db), "-j", "1")
    grown = SMALL.replace('["zen4", "zen2"]', '["zen4", "zen2", "zen3"]')
    r = _invoke(str(_write(tmp_path, grown, "grown.toml")), "--db", str(db), "-j", "1", "--json")
    assert json.loads(r.stdout)["ran"] == 4 and len(_db_rows(db)) == 12
    other = CliRunner().invoke(main, ["sweep", str(_write(tmp_path, SMALL.replace("iterations = 10", "iterations = 11"),
                                                              "other.toml")), "--db", str(db)])
    assert other.exit_code == 2 and "holds a sweep with another base scenario" in other.stderr


def test_failed_points_are_recorded_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import navic.runner

    real = navic.runner.run_scenario
    calls = {"n": 0}

    def flaky(scn: Any) -> Any:
        calls["n"] += 1
        if scn.host.cpu == "zen2":
            raise RuntimeError("model bug")
        return real(scn)

    monkeypatch.setattr(navic.runner, "run_scenario", flaky)
    spec = _write(tmp_path, SMALL)
    db = tmp_path / "s.db"
    r = CliRunner().invoke(main, ["sweep", str(spec), "--db", str(db), "-j", "1", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["errors"] == 4
    errs = [v for v in _db_rows(db).values() if v[0] == "error"]
    assert len(errs) == 4 and all(v[3] is None for v in errs)
    monkeypatch.setattr(navic.runner, "run_scenario", real)
    r = CliRunner().invoke(main, ["sweep", str(spec), "--db", str(db), "-j", "1", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ran"] == 4
    assert all(v[0] == "done" for v in _db_rows(db).values())


def test_report_writes_tables_and_plots(tmp_path: Path) -> None:
    spec = _write(tmp_path, SMALL)
    db = tmp_path / "s.db"
    _invoke(str(spec), "--db", str(db), "-j", "2")
    out = tmp_path / "rep"
    r = _invoke("report", str(db), "--out", str(out), "--metric", "latency_ns.p50", "--metric", "exits_per_ipi.l0")
    assert r.exit_code == 0, r.output
    assert "l0.ipiv" in r.stdout and "latency_ns.p50" in r.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["exits-per-ipi-l0-vs-l0-ipiv.png", "latency-ns-p50-vs-l0-ipiv.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0] == "l0.ipiv,host.cpu,metric,seeds,n,mean,min,max" and len(summary) == 1 + 2 * 4
    assert len((out / "points.csv").read_text().splitlines()) == 1 + 8
    r = _invoke("report", str(db), "--out", str(out), "--x", "host.cpu")
    assert (out / "latency-ns-p50-vs-host-cpu.png").is_file()
    bad = CliRunner().invoke(main, ["sweep", "report", str(db), "--x", "nope"])
    assert bad.exit_code == 2 and "grid keys: l0.ipiv, host.cpu" in bad.output


def test_sigkill_mid_sweep_then_rerun_gives_the_complete_table(tmp_path: Path) -> None:
    spec = _write(tmp_path, SLOW)
    total = len(S.load_spec(spec).points)
    db = tmp_path / "killed.db"
    cmd = [sys.executable, "-c", "from navic.cli import main; main()", "sweep", str(spec), "--db", str(db), "-j", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
            if db.exists():
                try:
                    con = sqlite3.connect(db, timeout=5)
                    done = con.execute("SELECT count(*) FROM points WHERE status = 'done'").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:   # schema not created yet
                    continue
                if done >= 3:
                    break
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # its workers, if any survived
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    before = dict(con.execute("SELECT hash, finished FROM points WHERE status = 'done'"))
    con.close()
    assert 3 <= len(before) < total

    r = _invoke(str(spec), "--db", str(db), "-j", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ran"] == total - len(before)
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*), count(DISTINCT hash) FROM points").fetchone() == (total, total)
    assert con.execute("SELECT count(*) FROM points WHERE status = 'done'").fetchone()[0] == total
    after = dict(con.execute("SELECT hash, finished FROM points"))
    con.close()
    assert {h: after[h] for h in before} == before, "finished points were not run again"

    clean = tmp_path / "clean.db"
    assert _invoke(str(spec), "--db", str(clean), "-j", "2").exit_code == 0
    assert _db_rows(db) == _db_rows(clean)


def test_dask_cluster_gives_the_same_rows_as_local_processes(tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import logging

    from distributed import LocalCluster

    spec = _write(tmp_path, SMALL)
    local = tmp_path / "local.db"
    assert _invoke(str(spec), "--db", str(local), "-j", "2").exit_code == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:
        r = _invoke(str(spec), "--db", str(tmp_path / "dask.db"), "--scheduler", cluster.scheduler_address,
                    "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["backend"] == "dask" and doc["done"] == 8
    rows_local, rows_dask = _db_rows(local), _db_rows(tmp_path / "dask.db")
    assert len(rows_local) == 8 and rows_local == rows_dask


def test_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import dask

    spec = _write(tmp_path, SMALL)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        r = CliRunner().invoke(main, ["sweep", str(spec), "--db", str(tmp_path / "s.db"),
                                      "--scheduler", "tcp://127.0.0.1:9"])
    assert r.exit_code == 1 and r.stderr.startswith("navic sweep: tcp://127.0.0.1:9:")


def test_rows_from_other_model_sources_are_flagged_and_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    spec = _write(tmp_path, SMALL)
    db = tmp_path / "s.db"
    monkeypatch.setattr(S, "_FINGERPRINT", "old-sources")
    assert _invoke(str(spec), "--db", str(db), "-j", "1").exit_code == 0
    monkeypatch.setattr(S, "_FINGERPRINT", "new-sources")
    r = _invoke(str(spec), "--db", str(db), "-j", "1", "--json")
    assert json.loads(r.stdout)["ran"] == 0 and json.loads(r.stdout)["stale"] == 8
    r = _invoke(str(spec), "--db", str(db), "-j", "1", "--json", "--redo-stale")
    assert json.loads(r.stdout)["ran"] == 8 and json.loads(r.stdout)["stale"] == 0
    # A worker running other sources: its results are not stored.
    real = S.run_point
    monkeypatch.setattr(S, "_FINGERPRINT", "newest")
    monkeypatch.setattr(S, "run_point", lambda t: {**real(t), "model": "elsewhere"})
    r = CliRunner().invoke(main, ["sweep", str(spec), "--db", str(db), "-j", "1", "--json", "--redo-stale"])
    assert r.exit_code == 1 and json.loads(r.stdout)["errors"] == 8
    rows = _db_rows(db)
    assert all(v[0] == "error" and v[3] is None for v in rows.values())
