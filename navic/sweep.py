"""``navic sweep``: run a scenario over a grid of parameter values and seeds, into an SQLite database.

A *sweep spec* (TOML, docs/sweep.md) names a base scenario, a ``[grid]`` mapping dotted scenario
key paths to value lists, and the seeds. :func:`load_spec` checks it and expands it into
:class:`Point`\\ s — every one validated by :func:`navic.scenario.parse_scenario` before anything
runs. Each point has a stable identity, :func:`point_hash`: SHA-256 of the canonical JSON of the
fully expanded scenario dict, the seed and the navic version.

:func:`execute` runs the points that are not finished yet — in local worker processes
(:class:`concurrent.futures.ProcessPoolExecutor`) or on a Dask cluster — with the same pure
function, :func:`run_point`; the calling process is the only writer of the database
(:class:`SweepDB`). Every row is written by one atomic statement, so a sweep killed at any moment
(even with SIGKILL) leaves finished rows complete and the others ``pending``; running it again
does only what is missing.

:func:`load_report` / :func:`aggregate` / :func:`write_report` turn a database into tables and
plots (metric against a swept parameter, one line per combination of the other parameters, mean
over seeds with a min/max band). Point metrics come from :func:`navic.compare.row_metrics`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import socket
import sqlite3
import statistics
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navic import __version__
from navic.scenario import _MISSING, ScenarioError, describe, parse_scenario

HASH_TAG = "navic-sweep-point/1"
SCHEMA_VERSION = "1"
SPEC_KEYS = ("name", "base", "grid", "seeds", "metrics")
FINAL = ("done", "unsupported")    # statuses a re-run does not redo ("pending" and "error" are redone)
DEFAULT_METRICS = ("latency_ns.p50", "latency_ns.p99", "exits_per_ipi.l0", "exits_per_ipi.l0_l2",
                   "exits_per_ipi.l1")
METRIC_LABELS = {
    "ipis": "interrupts delivered (IPIs when the workload sends any)",
    "latency_ns.p50": "latency p50, send to handler (ns)",
    "latency_ns.p99": "latency p99, send to handler (ns)",
    "latency_ns.mean": "mean latency, send to handler (ns)",
    "exits_per_ipi.l0": "L0 exits per interrupt (while L1 runs)",
    "exits_per_ipi.l0_l2": "L0-only exits per interrupt (while L2 runs)",
    "exits_per_ipi.l1": "L1 exits per interrupt (for L2)",
    "world_switches_per_ipi": "world switches (VMRUNs) per interrupt",
    "doorbells_per_ipi": "doorbells per interrupt",
    "cycles_per_ipi.l0": "L0 hypervisor cycles per interrupt",
    "cycles_per_ipi.l1": "L1 hypervisor cycles per interrupt",
    "violations": "oracle violations",
    "sim_time_cycles": "simulated time (cycles)",
}


# ---------------------------------------------------------------------------------------------
# Canonical JSON and point identity
# ---------------------------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def point_hash(scenario: Mapping[str, Any], seed: int, version: str = __version__) -> str:
    """The identity of a sweep point (hex SHA-256; docs/sweep.md, "Point identity")."""
    doc = {"navic": version, "scenario": scenario, "seed": seed}
    return hashlib.sha256(f"{HASH_TAG}\n{canonical_json(doc)}".encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Spec files
# ---------------------------------------------------------------------------------------------
_SEGMENT = re.compile(r"^([A-Za-z0-9_-]+)((?:\[\d+\])*)$")


def _split_path(path: str) -> list[str | int] | None:
    """``"program[0].ops[1].vector"`` -> ["program", 0, "ops", 1, "vector"]; None if malformed."""
    out: list[str | int] = []
    for seg in path.split("."):
        m = _SEGMENT.match(seg)
        if not m:
            return None
        out.append(m[1])
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m[2]))
    return out


def set_path(doc: dict[str, Any], path: str, value: Any) -> str | None:
    """Set ``doc[path] = value`` (dotted, with [N] indices; missing tables are created).
    Returns an error message, or None."""
    parts = _split_path(path)
    if not parts:
        return "expected a dotted key path such as \"l0.nested_apicv\" or \"program[0].ops[1].vector\""
    cur: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(str(p) for p in parts[:i]) or "the top level"
        if isinstance(part, int):
            if not isinstance(cur, list) or part >= len(cur):
                n = len(cur) if isinstance(cur, list) else 0
                return f"index [{part}] does not exist in the base scenario ({where} has {n} item(s))"
            if last:
                cur[part] = value
            else:
                cur = cur[part]
            continue
        if not isinstance(cur, dict):
            return f"{where} is {describe(cur)} in the base scenario, not a table"
        if last:
            cur[part] = value
        else:
            if part not in cur:
                if isinstance(parts[i + 1], int):
                    return f"{part} is not in the base scenario (cannot index it)"
                cur[part] = {}
            cur = cur[part]
    return None


def _flatten_grid(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``[grid]`` entries: quoted dotted keys, or TOML's own dotted keys (nested tables)."""
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            yield from _flatten_grid(v, key)
        else:
            yield key, v


@dataclass(frozen=True)
class Point:
    """One scenario to run: the grid coordinates, the seed and the fully expanded scenario."""

    hash: str
    params: dict[str, Any]            # grid key path -> value
    seed: int
    scenario: dict[str, Any]          # the TOML-shaped scenario dict, seed included

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in self.params.items()) + f", seed={self.seed}"


@dataclass
class SweepSpec:
    source: str
    name: str
    base: dict[str, Any]
    grid: list[tuple[str, list[Any]]]
    seeds: tuple[int, ...]
    metrics: tuple[str, ...] | None = None
    base_file: str | None = None      # the base scenario's file, when `base` names one
    points: list[Point] = field(default_factory=list)

    @property
    def identity(self) -> dict[str, Any]:
        """What a database made by this spec records: the base scenario and the grid's keys.
        Another spec with the same identity (more values, more seeds) may extend the database."""
        return {"base": self.base, "grid_keys": [k for k, _ in self.grid]}

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "base": self.base,
                "grid": [[k, v] for k, v in self.grid], "seeds": list(self.seeds),
                "metrics": list(self.metrics) if self.metrics is not None else None}


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    from navic.scenario import _toml_error

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ScenarioError(source, "", f"cannot read file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(source, "", f"invalid TOML: not UTF-8 text ({e.reason} at byte {e.start})",
                            location="1:1") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(e, source, text) from None


def _static_metric_names() -> set[str]:
    return set(point_metrics({"workload": {"kind": "x"}}, {"deliveries": []}))


def load_spec(path: str | Path) -> SweepSpec:
    """Read, check and expand a sweep spec. Every problem is a one-line :class:`ScenarioError`
    naming the spec file and the key path; every point is validated by ``parse_scenario``."""
    path = Path(path)
    src = str(path)
    data = _read_toml(path, src)
    return parse_spec(data, src, base_dir=path.parent)


def parse_spec(data: Mapping[str, Any], src: str = "<sweep>", base_dir: Path | None = None) -> SweepSpec:
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ScenarioError(src, unknown[0], f"unknown key; expected one of {', '.join(SPEC_KEYS)}")
    # --- base
    raw_base = data.get("base")
    base_file: str | None = None
    if isinstance(raw_base, str):
        bpath = Path(raw_base)
        if not bpath.is_absolute() and base_dir is not None:
            bpath = base_dir / bpath
        try:
            base = _read_toml(bpath, str(bpath))
            base_file = str(bpath)
        except ScenarioError as e:
            raise ScenarioError(src, "base", str(e)) from None
    elif isinstance(raw_base, Mapping):
        base = copy.deepcopy(dict(raw_base))
    else:
        raise ScenarioError(src, "base", "expected a scenario file name or a [base] table, got "
                            + describe(raw_base if raw_base is not None else _MISSING))
    name = data.get("name", base.get("name", Path(src).stem))
    if not isinstance(name, str) or not name:
        raise ScenarioError(src, "name", f"expected a non-empty string, got {describe(name)}")
    # The base alone need not be a valid scenario (a grid value may complete it): the points are checked.
    # --- grid
    raw_grid = data.get("grid", {})
    if not isinstance(raw_grid, Mapping):
        raise ScenarioError(src, "grid", f"expected a table of key path = [values], got {describe(raw_grid)}")
    grid: list[tuple[str, list[Any]]] = []
    for key, values in _flatten_grid(raw_grid):
        kp = f'grid."{key}"'
        if key == "seed":
            raise ScenarioError(src, kp, "expected a scenario key other than seed; use seeds = [...] at the top")
        if not isinstance(values, list) or not values:
            raise ScenarioError(src, kp, f"expected a non-empty array of values, got {describe(values)}")
        seen: set[str] = set()
        for i, v in enumerate(values):
            c = canonical_json(v) if not hasattr(v, "isoformat") else None
            if c is None:
                raise ScenarioError(src, f"{kp}[{i}]", f"expected a scenario value, got {describe(v)}")
            if c in seen:
                raise ScenarioError(src, f"{kp}[{i}]", f"expected distinct values, got {describe(v)} twice")
            seen.add(c)
        for other, _ in grid:
            if key.startswith(other + ".") or key.startswith(other + "[") or other.startswith(key + ".") \
                    or other.startswith(key + "["):
                raise ScenarioError(src, kp, f'expected a key path that does not overlap grid."{other}"')
        probe = copy.deepcopy(base)
        err = set_path(probe, key, values[0])
        if err:
            raise ScenarioError(src, kp, err)
        grid.append((key, list(values)))
    # --- seeds
    raw_seeds = data.get("seeds", [base.get("seed", 1)])
    if isinstance(raw_seeds, int) and not isinstance(raw_seeds, bool):
        if not 1 <= raw_seeds <= 100_000:
            raise ScenarioError(src, "seeds", f"expected a count 1..100000 or an array of seeds, got {raw_seeds}")
        seeds = tuple(range(1, raw_seeds + 1))
    elif isinstance(raw_seeds, list) and raw_seeds:
        for i, s in enumerate(raw_seeds):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
                raise ScenarioError(src, f"seeds[{i}]", f"expected an integer 0..2^64-1, got {describe(s)}")
            if s in raw_seeds[:i]:
                raise ScenarioError(src, f"seeds[{i}]", f"expected distinct seeds, got {s} twice")
        seeds = tuple(raw_seeds)
    else:
        raise ScenarioError(src, "seeds", f"expected a count or a non-empty array of seeds, got {describe(raw_seeds)}")
    # --- metrics
    metrics = None
    if "metrics" in data:
        raw_m = data["metrics"]
        if not isinstance(raw_m, list) or not raw_m:
            raise ScenarioError(src, "metrics", f"expected a non-empty array of metric names, got {describe(raw_m)}")
        known = _static_metric_names()
        for i, m in enumerate(raw_m):
            if not isinstance(m, str) or not (m in known or m.startswith("exit_reasons.")):
                raise ScenarioError(src, f"metrics[{i}]", f"expected one of {', '.join(sorted(known))} or "
                                    f"exit_reasons.LEVEL:REASON, got {describe(m)}")
        metrics = tuple(raw_m)
    spec = SweepSpec(src, name, base, grid, seeds, metrics, base_file=base_file)
    spec.points = expand(spec)
    return spec


def expand(spec: SweepSpec) -> list[Point]:
    """Every grid combination × seed, in grid order (the first key varies slowest), validated."""
    keys = [k for k, _ in spec.grid]
    points: list[Point] = []
    seen: dict[str, Point] = {}
    for combo in itertools.product(*(range(len(v)) for _, v in spec.grid)):
        params = {k: spec.grid[j][1][i] for j, (k, i) in enumerate(zip(keys, combo, strict=True))}
        doc = copy.deepcopy(spec.base)
        for k, v in params.items():
            set_path(doc, k, copy.deepcopy(v))
        for seed in spec.seeds:
            scn = copy.deepcopy(doc)
            scn["seed"] = seed
            try:
                parse_scenario(scn, spec.source)
            except ScenarioError as e:
                raise _point_error(spec, e, params, combo, seed) from None
            p = Point(point_hash(scn, seed), params, seed, scn)
            if p.hash in seen:
                raise ScenarioError(spec.source, "grid", f"expected distinct points, got the same scenario at "
                                    f"{seen[p.hash].label} and {p.label}")
            seen[p.hash] = p
            points.append(p)
    return points


def _point_error(spec: SweepSpec, e: ScenarioError, params: dict[str, Any], combo: tuple[int, ...],
                 seed: int) -> ScenarioError:
    """Name the grid value that made a point invalid when the error is at (or under) its key."""
    for j, (k, _) in enumerate(spec.grid):
        if e.path == k and e.message.startswith("unknown"):
            return ScenarioError(spec.source, f'grid."{k}"', e.message)
        if e.path == k or e.path.startswith(k + ".") or e.path.startswith(k + "["):
            return ScenarioError(spec.source, f'grid."{k}"[{combo[j]}]', e.message)
    where = ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
    at = f"(at grid point {where}, seed={seed})" if where else f"(at seed={seed})"
    if spec.base_file is not None:
        where_in_file = f"{e.path}: " if e.path else ""
        return ScenarioError(spec.source, "base", f"{spec.base_file}: {where_in_file}{e.message} {at}")
    return ScenarioError(spec.source, f"base.{e.path}" if e.path else "base", f"{e.message} {at}")


# ---------------------------------------------------------------------------------------------
# Running one point (the pure function shipped to workers)
# ---------------------------------------------------------------------------------------------
def _level(scn: Mapping[str, Any]) -> int:
    wl = scn.get("workload") or {}
    lvl = wl.get("level") if isinstance(wl, Mapping) else None
    if lvl in ("l1", "l2"):
        return int(lvl[1])
    return 2 if "l2" in scn else 1


def point_metrics(scn: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat numeric metrics of a run, from :func:`navic.compare.row_metrics` (nested keys joined
    with dots: ``latency_ns.p50``, ``exits_per_ipi.l0``, ``exit_reasons.l0:hlt`` ...), plus
    ``latency_ns.mean``."""
    from navic.compare import Case, ConfigSpec, row_metrics

    host = scn.get("host") or {}
    level = _level(scn)
    virt = host.get("virt", "kvm")
    design = (scn.get("l0") or {}).get("nested_apicv", "none") if level == 2 else None
    wl = scn.get("workload") or {}
    cfg = ConfigSpec("sweep", host.get("cpu", "zen4"), level, virt=virt, design=design)
    row = row_metrics(Case(wl.get("kind", "programs")), cfg, dict(result))
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif v is None or (isinstance(v, int | float) and not isinstance(v, bool)):
            out[prefix] = v

    for k, v in row.items():
        if k not in ("level", "latencies_ns"):
            walk(k, v)
    lat = row.get("latencies_ns") or []
    out["latency_ns.mean"] = round(statistics.fmean(lat), 3) if lat else None
    return out


def _worker_init() -> None:
    """Local worker initializer: Ctrl-C is the parent's business (it stops the sweep); and, on
    Linux, ask to be killed when the sweep process dies (SIGKILL included), so that a killed sweep
    leaves no idle workers behind."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


_FINGERPRINT: str | None = None


def model_fingerprint() -> str:
    """A digest of the model's sources as installed here: navic/**/*.py (but the command line) and
    navic/data/**/*.toml. It is not part of a point's identity (that is scenario + seed + version);
    it is recorded with every row so that rows computed by other sources — an edited costs table,
    a Dask worker running another checkout — are noticed. Computed once per process."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        files = [p for p in (*root.rglob("*.py"), *(root / "data").rglob("*.toml"))
                 if p.parts[len(root.parts)] not in ("commands", "cli.py")]
        for p in sorted(files):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        _FINGERPRINT = h.hexdigest()[:16]
    return _FINGERPRINT


def run_point(task: Mapping[str, Any]) -> dict[str, Any]:
    """Run one point: ``task`` = {"hash", "scenario"}. Pure (the result depends on the scenario
    only) and never raises for a scenario problem; returns status, result/metrics as canonical
    JSON text, the worker's start/end times and its name."""
    started = time.time()
    out: dict[str, Any] = {"hash": task["hash"], "status": "done", "result": None, "metrics": None,
                           "model": model_fingerprint(),
                           "error": None, "started": started, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        from navic.runner import UnsupportedScenario, run_scenario

        scn = task["scenario"]
        result = run_scenario(parse_scenario(scn, f"<sweep point {task['hash'][:12]}>"))
        out["result"] = canonical_json(result)
        out["metrics"] = canonical_json(point_metrics(scn, result))
    except (UnsupportedScenario, NotImplementedError, ScenarioError) as e:
        out["status"] = "unsupported"
        out["error"] = " ".join(str(e).split()) or type(e).__name__
    except Exception as e:  # a model bug: recorded, retried by the next run
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000]
    out["finished"] = time.time()
    return out


# ---------------------------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS points (
    hash          TEXT PRIMARY KEY,       -- point_hash(scenario, seed, navic_version)
    params        TEXT NOT NULL,          -- JSON {grid key path: value}
    seed          INTEGER NOT NULL,
    scenario      TEXT NOT NULL,          -- JSON: the fully expanded scenario (navic run can replay it)
    navic_version TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'done', 'unsupported', 'error')),
    started       REAL,                   -- Unix time the worker started / finished the run
    finished      REAL,
    worker        TEXT,                   -- host:pid
    model         TEXT,                   -- model_fingerprint() of the worker
    result        TEXT,                   -- JSON: run_scenario's result (status 'done')
    metrics       TEXT,                   -- JSON {metric: number or null} (status 'done')
    error         TEXT                    -- one line (status 'unsupported' or 'error')
);
CREATE INDEX IF NOT EXISTS points_status ON points(status);
"""


class SweepDB:
    """The sweep database (SQLite, WAL). One process writes; readers may look at any time.

    Each change is a single statement or an explicit transaction, so a crash leaves every row
    either as it was or complete."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ScenarioError(str(path), "", "no such sweep database")
        self.con = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        try:
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: durable against process crashes
            if create:
                self.con.executescript(SCHEMA)
                self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            else:
                self.con.execute("SELECT hash FROM points LIMIT 1")
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise ScenarioError(str(path), "", f"not a sweep database ({e})") from None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> SweepDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self, key: str) -> Any:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def check_identity(self, spec: SweepSpec) -> None:
        """A database holds one sweep: the same base scenario and grid keys (values and seeds may grow)."""
        have = self.meta("identity")
        if have is not None and canonical_json(have) != canonical_json(spec.identity):
            what = "grid keys" if have.get("base") == spec.base else "base scenario"
            raise ScenarioError(spec.source, "", f"{self.path} holds a sweep with another {what} "
                                f"({self.meta('name')!r}); use another --db")

    def plan(self, spec: SweepSpec) -> None:
        """Record the spec and insert every point not yet present as 'pending' (one transaction)."""
        self.check_identity(spec)
        with self._tx():
            for k, v in (("identity", spec.identity), ("spec", spec.as_json()), ("name", spec.name)):
                self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, canonical_json(v)))
            self.con.executemany(
                "INSERT OR IGNORE INTO points (hash, params, seed, scenario, navic_version) VALUES (?, ?, ?, ?, ?)",
                ((p.hash, canonical_json(p.params), p.seed, canonical_json(p.scenario), __version__)
                 for p in spec.points))

    def stale(self, spec: SweepSpec, model: str) -> list[str]:
        """Finished points of ``spec`` computed by other model sources than ``model``."""
        mine = {p.hash for p in spec.points}
        return [h for h, m in self.con.execute("SELECT hash, model FROM points WHERE status IN ('done', "
                                               "'unsupported')") if h in mine and m != model]

    def reset(self, hashes: Iterable[str]) -> None:
        with self._tx():
            self.con.executemany("UPDATE points SET status = 'pending', started = NULL, finished = NULL, "
                                 "worker = NULL, model = NULL, result = NULL, metrics = NULL, error = NULL "
                                 "WHERE hash = ?", ((h,) for h in hashes))

    def statuses(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT hash, status FROM points"))

    def record(self, r: Mapping[str, Any]) -> bool:
        """Store a worker's outcome (one atomic UPDATE). A row already done is never overwritten."""
        cur = self.con.execute(
            "UPDATE points SET status = ?, started = ?, finished = ?, worker = ?, model = ?, result = ?, "
            "metrics = ?, error = ? WHERE hash = ? AND status NOT IN ('done', 'unsupported')",
            (r["status"], r["started"], r["finished"], r["worker"], r.get("model"), r["result"], r["metrics"],
             r["error"], r["hash"]))
        return cur.rowcount == 1

    def rows(self, hashes: Iterable[str] | None = None, status: str | None = "done") -> list[dict[str, Any]]:
        q = "SELECT hash, params, seed, status, started, finished, metrics, error, navic_version FROM points"
        args: tuple[Any, ...] = ()
        if status is not None:
            q += " WHERE status = ?"
            args = (status,)
        out = []
        wanted = set(hashes) if hashes is not None else None
        for h, params, seed, st, t0, t1, metrics, error, ver in self.con.execute(q + " ORDER BY rowid", args):
            if wanted is not None and h not in wanted:
                continue
            out.append({"hash": h, "params": json.loads(params), "seed": seed, "status": st, "started": t0,
                        "finished": t1, "metrics": json.loads(metrics) if metrics else {}, "error": error,
                        "navic_version": ver})
        return out

    def _tx(self) -> _Tx:
        return _Tx(self.con)


class _Tx:
    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: object) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")


# ---------------------------------------------------------------------------------------------
# Execution: local processes or Dask, the caller writes
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    planned: int = 0          # points in the spec
    already: int = 0          # finished before this run
    ran: int = 0              # run now
    done: int = 0
    unsupported: int = 0
    errors: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    backend: str = "local"
    stale: int = 0            # finished points from other model sources (kept; see redo_stale)

    @property
    def rate(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else 0.0


def pending_points(spec: SweepSpec, db: SweepDB) -> list[Point]:
    status = db.statuses()
    return [p for p in spec.points if status.get(p.hash) not in FINAL]


def _local_results(tasks: list[dict[str, Any]], jobs: int) -> Iterator[dict[str, Any]]:
    if jobs <= 1:
        for t in tasks:
            yield run_point(t)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    window = jobs * 4
    it = iter(tasks)
    ex = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init)
    try:
        inflight = {ex.submit(run_point, t) for t in itertools.islice(it, window)}
        while inflight:
            done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for f in done:
                nxt = next(it, None)
                if nxt is not None:
                    inflight.add(ex.submit(run_point, nxt))
                yield f.result()
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def _dask_results(tasks: list[dict[str, Any]], scheduler: Any) -> Iterator[dict[str, Any]]:
    from distributed import Client, as_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler, set_as_default=False)
    try:
        nworkers = max(1, sum(client.nthreads().values()))
        window = nworkers * 16
        it = iter(tasks)
        ac = as_completed([client.submit(run_point, t, pure=False) for t in itertools.islice(it, window)],
                          loop=client.loop)
        for fut in ac:
            r = fut.result()
            fut.release()
            nxt = next(it, None)
            if nxt is not None:
                ac.add(client.submit(run_point, nxt, pure=False))
            yield r
    finally:
        if client is not scheduler:
            client.close()


def execute(spec: SweepSpec, db: SweepDB, *, jobs: int | None = None, scheduler: Any = None,
            on_start: Callable[[int], None] | None = None,
            on_result: Callable[[dict[str, Any], Point], None] | None = None, redo_stale: bool = False) -> Outcome:
    """Plan the spec into ``db`` and run what is not finished. ``scheduler``: a Dask scheduler
    address (or a ``distributed.Client``); otherwise ``jobs`` local processes (default: cores).
    ``redo_stale``: also run again the finished points computed from other model sources
    (:func:`model_fingerprint`). A result from a worker whose sources differ from this process's is
    not stored (status 'error')."""
    db.plan(spec)
    model = model_fingerprint()
    stale = db.stale(spec, model)
    if redo_stale and stale:
        db.reset(stale)
        stale = []
    todo = pending_points(spec, db)
    out = Outcome(planned=len(spec.points), already=len(spec.points) - len(todo),
                  backend="dask" if scheduler is not None else "local", stale=len(stale))
    if on_start:
        on_start(len(todo))
    by_hash = {p.hash: p for p in todo}
    tasks = [{"hash": p.hash, "scenario": p.scenario} for p in todo]
    t0 = time.monotonic()
    if scheduler is not None:
        results = _dask_results(tasks, scheduler)
    else:
        jobs = jobs if jobs is not None else (os.cpu_count() or 1)
        results = _local_results(tasks, min(jobs, max(1, len(tasks))))
    try:
        for r in results:
            if r.get("model") != model and r["status"] != "error":
                r = {**r, "status": "error", "result": None, "metrics": None,
                     "error": f"worker {r['worker']} runs other navic sources (model {r.get('model')}, "
                              f"here {model}); result not stored"}
            db.record(r)
            out.ran += 1
            if r["status"] == "done":
                out.done += 1
            elif r["status"] == "unsupported":
                out.unsupported += 1
            else:
                out.errors += 1
            if on_result:
                on_result(r, by_hash[r["hash"]])
    except KeyboardInterrupt:
        out.interrupted = True
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        out.seconds = time.monotonic() - t0
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def _fmt_value(v: Any) -> str:
    return v if isinstance(v, str) else canonical_json(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class Report:
    name: str
    keys: list[str]                     # grid keys, spec order
    values: dict[str, list[Any]]        # key -> distinct values, spec order
    rows: list[dict[str, Any]]          # done rows (one per params+seed)
    metrics: tuple[str, ...]            # default metrics
    counts: dict[str, int]
    superseded: int = 0

    @property
    def swept(self) -> list[str]:
        return [k for k in self.keys if len(self.values[k]) > 1]

    def available_metrics(self) -> list[str]:
        return sorted({m for r in self.rows for m in r["metrics"]})


def load_report(db: SweepDB) -> Report:
    """The finished points of a database. When a (params, seed) pair was run by several navic
    versions, the most recently finished row counts (the others are ``superseded``)."""
    spec = db.meta("spec") or {}
    grid: list[tuple[str, list[Any]]] = [(k, vs) for k, vs in spec.get("grid", [])]
    latest: dict[str, dict[str, Any]] = {}
    rows = db.rows(status="done")
    for r in rows:
        ident = canonical_json([r["params"], r["seed"]])
        if ident not in latest or (r["finished"] or 0) >= (latest[ident]["finished"] or 0):
            latest[ident] = r
    kept = list(latest.values())
    keys = [k for k, _ in grid]
    keys += sorted({k for r in kept for k in r["params"]} - set(keys))
    # Each key's values: in spec order, then any others found in the database (an earlier, larger grid).
    values: dict[str, list[Any]] = {}
    for k in keys:
        present = {canonical_json(r["params"].get(k)): r["params"].get(k) for r in kept}
        ordered = [v for v in dict(grid).get(k, []) if canonical_json(v) in present]
        done = {canonical_json(v) for v in ordered}
        values[k] = ordered + [v for c, v in present.items() if c not in done]
    counts = dict(db.con.execute("SELECT status, count(*) FROM points GROUP BY status"))
    metrics = tuple(spec.get("metrics") or DEFAULT_METRICS)
    return Report(db.meta("name") or db.path.stem, keys, values, kept, metrics, counts, len(rows) - len(kept))


@dataclass
class Cell:
    params: dict[str, Any]
    runs: int                 # finished points (seeds) of this combination
    n: int                    # of which the metric has a value
    mean: float | None
    lo: float | None
    hi: float | None


def aggregate(rep: Report, metric: str) -> list[Cell]:
    """One cell per grid combination (spec order): mean, min and max over seeds (None values skipped)."""
    groups: dict[str, tuple[dict[str, Any], list[float], list[int]]] = {}
    for r in rep.rows:
        key = canonical_json([r["params"].get(k) for k in rep.keys])
        g = groups.setdefault(key, ({k: r["params"].get(k) for k in rep.keys}, [], [0]))
        g[2][0] += 1
        v = r["metrics"].get(metric)
        if _is_number(v) and not math.isnan(v):
            g[1].append(float(v))

    def order(item: tuple[str, tuple[dict[str, Any], list[float], list[int]]]) -> list[int]:
        p = item[1][0]
        return [_index(rep.values[k], p.get(k)) for k in rep.keys]

    cells = []
    for _, (params, vals, runs) in sorted(groups.items(), key=order):
        cells.append(Cell(params, runs[0], len(vals), statistics.fmean(vals) if vals else None,
                          min(vals) if vals else None, max(vals) if vals else None))
    return cells


def _index(values: list[Any], v: Any) -> int:
    c = canonical_json(v)
    for i, x in enumerate(values):
        if canonical_json(x) == c:
            return i
    return len(values)


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def fmt_cell(c: Cell) -> str:
    if c.mean is None:
        return "-"
    if c.lo is None or c.hi is None or c.lo == c.hi:
        return fmt_num(c.mean)
    return f"{fmt_num(c.mean)} [{fmt_num(c.lo)}–{fmt_num(c.hi)}]"


def summary_table(rep: Report, metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per grid combination, swept keys then "seeds" then each metric."""
    keys = rep.swept or rep.keys
    per_metric = [aggregate(rep, m) for m in metrics]
    header = [*keys, "seeds", *metrics]
    body = []
    if not per_metric:
        return header, body
    for i, c in enumerate(per_metric[0]):
        body.append([*(_fmt_value(c.params.get(k)) for k in keys), str(c.runs),
                     *(fmt_cell(cells[i]) for cells in per_metric)])
    return header, body


def default_x(rep: Report) -> str | None:
    swept = rep.swept
    for k in swept:
        if all(_is_number(v) for v in rep.values[k]):
            return k
    return swept[0] if swept else (rep.keys[0] if rep.keys else None)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")


def write_plots(rep: Report, metrics: Sequence[str], x: str, outdir: Path) -> list[Path]:
    """One PNG per metric: the metric against ``x``, one line per combination of the other swept
    keys, mean over seeds with a min/max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in rep.swept if k != x]
    xs = rep.values[x]
    numeric = all(_is_number(v) for v in xs)
    made = []
    for metric in metrics:
        cells = aggregate(rep, metric)
        lines: dict[str, list[Cell]] = {}
        for c in cells:
            label = ", ".join(f"{k}={_fmt_value(c.params.get(k))}" for k in others) or rep.name
            lines.setdefault(label, []).append(c)
        fig, ax = plt.subplots(figsize=(8, 5))
        plotted = False
        for label, cs in lines.items():
            cs = [c for c in cs if c.mean is not None]
            if not cs:
                continue
            cs.sort(key=lambda c: _index(xs, c.params.get(x)))
            px = [c.params.get(x) if numeric else _index(xs, c.params.get(x)) for c in cs]
            (ln,) = ax.plot(px, [c.mean for c in cs], marker="o", label=label)
            if any(c.lo != c.hi for c in cs):
                ax.fill_between(px, [c.lo for c in cs], [c.hi for c in cs], color=ln.get_color(), alpha=0.12)
            plotted = True
        if not numeric:
            ax.set_xticks(range(len(xs)), [_fmt_value(v) for v in xs])
        nseeds = len({r["seed"] for r in rep.rows})
        ax.set_xlabel(x)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{rep.name}: {metric} vs {x}\n(mean over {nseeds} seed{'s' if nseeds != 1 else ''}"
                     f"{', band = min..max' if nseeds > 1 else ''})", fontsize=10)
        ax.grid(True, alpha=0.3)
        if plotted and len(lines) > 1:
            ax.legend(fontsize=8)
        p = outdir / f"{_slug(metric)}-vs-{_slug(x)}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def write_report(rep: Report, metrics: Sequence[str], x: str | None, outdir: Path, command: str) -> dict[str, Path]:
    """report.md (tables + plots), summary.csv (one row per grid combination and metric), points.csv."""
    import csv

    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with open(outdir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*rep.keys, "metric", "seeds", "n", "mean", "min", "max"])
        for m in metrics:
            for c in aggregate(rep, m):
                w.writerow([*(_fmt_value(c.params.get(k)) for k in rep.keys), m, c.runs, c.n,
                            c.mean if c.mean is not None else "", c.lo if c.lo is not None else "",
                            c.hi if c.hi is not None else ""])
    paths["summary"] = outdir / "summary.csv"
    all_metrics = rep.available_metrics()
    with open(outdir / "points.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["hash", *rep.keys, "seed", *all_metrics])
        for r in rep.rows:
            w.writerow([r["hash"], *(_fmt_value(r["params"].get(k)) for k in rep.keys), r["seed"],
                        *("" if r["metrics"].get(m) is None else r["metrics"][m] for m in all_metrics)])
    paths["points"] = outdir / "points.csv"
    plots = write_plots(rep, metrics, x, outdir) if x is not None and rep.rows else []
    header, body = summary_table(rep, metrics)
    md = [f"# navic sweep: {rep.name}", "", f"Produced by `{command}`.", "",
          f"Points: {', '.join(f'{n} {s}' for s, n in sorted(rep.counts.items()))}. "
          "Cells: mean over seeds [min–max].", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    md.append("")
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (outdir / "report.md").write_text("\n".join(md) + "\n")
    paths["report"] = outdir / "report.md"
    paths.update({p.stem: p for p in plots})
    return paths
