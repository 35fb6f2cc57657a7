"""Fuzz navic: N generated inputs (valid scenarios with random values, structural and textual
mutations of them and of examples/), each run as ``navic run --json`` would, and a count of the
outcomes (docs/verification.md, "Fuzzing").

    .venv/bin/python bench/fuzz.py --count 20000 --seed 1 -j 2
    .venv/bin/python bench/fuzz.py --count 1 --seed 1 --first 811 --write /tmp/in811.toml   # one input

Input i of seed S is the same text on every machine (``--write`` saves it). Each input runs
in-process in a worker with a wall-time limit (``--limit``, the runner's ``--timeout``) and an event
budget; a worker that does not answer within the limit plus a grace period is killed and the input
counted as a *hang*. Outcomes: ran, rejected (exit 2, one line naming file + key), unsupported
(exit 2, one line), limit (stopped by --timeout / --max-events, one line) — and the failures:
traceback, unnamed (a rejection that names no key), bad-line, hang. Violations of runs that
completed are counted by bare / virtualised / nested and kind; ``--show K`` prints up to K input
numbers per failure site and violation class. Exit status 1 if any failure or a bare-metal
violation was seen.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
sys.path.insert(0, str(ROOT))

import fuzzgen  # noqa: E402

GRACE_S = 30.0   # beyond --limit: building a 4096+4096-vCPU nested VM takes ~10 s


def make_input(seed: int, i: int) -> tuple[str, str | bytes]:
    return fuzzgen.fuzz_input(fuzzgen.RandomPicker(random.Random(seed * 1_000_003 + i)))


def _worker(conn: Any, seed: int, limit: float, max_events: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="navic-fuzz-"))
    while True:
        i = conn.recv()
        if i is None:
            return
        try:
            family, data = make_input(seed, i)
        except Exception as exc:  # noqa: BLE001 - a bug of the generator, not of navic: say so
            conn.send((i, fuzzgen.Outcome("generator-error", f"{type(exc).__name__}: {exc}"[:200], family="?")))
            continue
        o = fuzzgen.classify(data, tmp / f"input{i}.toml", timeout_s=limit, max_events=max_events)
        o.family = family
        conn.send((i, o))


class Pool:
    """j worker processes fed one input at a time; a worker past its deadline is killed."""

    def __init__(self, j: int, seed: int, limit: float, max_events: int) -> None:
        self.args = (seed, limit, max_events)
        self.deadline_s = limit + GRACE_S
        self.slots: list[dict[str, Any]] = [self._spawn() for _ in range(j)]

    def _spawn(self) -> dict[str, Any]:
        parent, child = mp.Pipe()
        proc = mp.get_context("fork").Process(target=_worker, args=(child, *self.args), daemon=True)
        proc.start()
        return {"proc": proc, "conn": parent, "task": None, "since": 0.0}

    def run(self, todo: list[int]):  # -> Iterator[tuple[int, Outcome]]
        from multiprocessing.connection import wait

        pending = list(reversed(todo))
        while pending or any(s["task"] is not None for s in self.slots):
            for s in self.slots:
                if s["task"] is None and pending:
                    s["task"] = pending.pop()
                    s["since"] = time.monotonic()
                    s["conn"].send(s["task"])
            busy = [s for s in self.slots if s["task"] is not None]
            ready = wait([s["conn"] for s in busy], timeout=1.0)
            for s in busy:
                if s["conn"] in ready:
                    try:
                        i, o = s["conn"].recv()
                    except EOFError:   # the worker died (a crash of the interpreter itself)
                        i, o = s["task"], fuzzgen.Outcome("traceback", "worker process died", site="worker died")
                        self._replace(s)
                    s["task"] = None
                    yield i, o
                elif time.monotonic() - s["since"] > self.deadline_s:
                    i = s["task"]
                    self._replace(s)
                    yield i, fuzzgen.Outcome("hang", f"no answer within {self.deadline_s:g} s", site="hang")

    def _replace(self, s: dict[str, Any]) -> None:
        s["proc"].kill()
        s["proc"].join()
        s.update(self._spawn())

    def close(self) -> None:
        for s in self.slots:
            s["conn"].send(None)
            s["proc"].join(timeout=5)


def _alone(args: Any, i: int) -> str:
    import subprocess

    _family, data = make_input(args.seed, i)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"input{i}.toml"
        f.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(Path(sys.executable).parent / "navic"), "run", str(f), "--json",
                                "--timeout", str(args.limit), "--max-events", str(args.max_events)],
                               capture_output=True, timeout=args.limit + GRACE_S)
        except subprocess.TimeoutExpired:
            return f"still no answer after {args.limit + GRACE_S:g} s (a real hang)"
        err = p.stderr.decode(errors="replace").strip().splitlines()
        return f"exit {p.returncode} in {time.monotonic() - t0:.1f} s{': ' + err[-1][:120] if err else ''}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="first input number")
    ap.add_argument("-j", "--jobs", type=int, default=max(1, mp.cpu_count()))
    ap.add_argument("--limit", type=float, default=5.0, help="wall-time limit per input (s)")
    ap.add_argument("--max-events", type=int, default=5_000_000, help="event budget per input")
    ap.add_argument("--show", type=int, default=3, help="input numbers shown per class")
    ap.add_argument("--json", dest="json_out", help="also write the counts as JSON here")
    ap.add_argument("--write", help="write input --first to this file and exit")
    args = ap.parse_args(argv)
    if args.write:
        _family, data = make_input(args.seed, args.first)
        Path(args.write).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return 0

    t0 = time.monotonic()
    kinds: collections.Counter[tuple[str, str]] = collections.Counter()
    sites: dict[str, list[int]] = collections.defaultdict(list)
    viol: collections.Counter[str] = collections.Counter()
    viol_inputs: dict[str, list[int]] = collections.defaultdict(list)
    examples: dict[str, str] = {}
    rejected_valid: dict[str, list[int]] = {}
    slowest = (0.0, -1)
    pool = Pool(args.jobs, args.seed, args.limit, args.max_events)
    done = 0
    try:
        for i, o in pool.run(list(range(args.first, args.first + args.count))):
            done += 1
            kinds[(o.family or "?", o.kind)] += 1
            slowest = max(slowest, (o.seconds, i))
            if o.failed or o.kind == "hang":
                sites[o.site or o.message[:120]].append(i)
                examples.setdefault(o.site or o.message[:120], o.message[:300])
            if o.family == "valid" and o.kind in ("rejected", "unsupported"):
                odd = o.message.split(": ", 1)[-1][:100]
                sites.setdefault("", [])   # keeps the table's shape
                rejected_valid.setdefault(odd, []).append(i)
            where = "bare" if o.virt == "none" else ("nested" if o.nested else "l1")
            for v in {v["kind"] + (f"({v['explained']})" if v.get("explained") else "") for v in o.violations}:
                key = f"{where}:{v}"
                viol[key] += 1
                viol_inputs[key].append(i)
            if done % 1000 == 0:
                print(f"... {done}/{args.count} in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        pool.close()
    seconds = time.monotonic() - t0

    # A hang is re-run alone, in a fresh `navic run` process: is it the input, or the machine's load?
    rechecked: list[str] = []
    for i in list(sites.get("hang", [])):
        verdict = _alone(args, i)
        rechecked.append(f"input {i}: {verdict}")
        if not verdict.startswith("still no answer"):   # not the input: the machine's load
            sites["hang"].remove(i)
            sites.setdefault("(slow under load: answered alone)", []).append(i)
            kinds[("?", "hang")] -= 1
            kinds[("?", "slow-under-load")] += 1
    if not sites.get("hang"):
        sites.pop("hang", None)
    slow_under_load = sites.pop("(slow under load: answered alone)", [])

    kinds = collections.Counter({k: n for k, n in kinds.items() if n > 0})
    total = collections.Counter()
    for (_fam, kind), n in kinds.items():
        total[kind] += n
    print(f"bench/fuzz.py --count {args.count} --seed {args.seed} --first {args.first} -j {args.jobs} "
          f"--limit {args.limit:g}: {done} inputs in {seconds:.0f} s (slowest: input {slowest[1]}, {slowest[0]:.2f} s)")
    print("outcomes:", ", ".join(f"{k} {n}" for k, n in sorted(total.items())))
    for fam in sorted({f for f, _ in kinds}):
        print(f"  {fam:8}", ", ".join(f"{k} {n}" for (f, k), n in sorted(kinds.items()) if f == fam))
    sites.pop("", None)
    if rejected_valid:
        print("generated-valid inputs refused (the generator's mistakes, or a refusal to look at):")
        for msg, inputs in sorted(rejected_valid.items(), key=lambda kv: -len(kv[1]))[:20]:
            print(f"  {len(inputs):5}  {msg}  inputs {inputs[:args.show]}")
    failures = sum(len(v) for v in sites.values())
    print(f"failures: {failures}")
    for site, inputs in sorted(sites.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(inputs):5}  {site}  inputs {inputs[:args.show]}  e.g. {examples[site][:160]}")
    for line in rechecked:
        print(f"  hang re-run alone: {line}")
    if slow_under_load:
        print(f"  (not counted as failures: {len(slow_under_load)} input(s) slow only under load: {slow_under_load})")
    print("inputs with violations (runs that completed), by where:kind:",
          ", ".join(f"{k} {n}" for k, n in sorted(viol.items())) or "none")
    for key, inputs in sorted(viol_inputs.items()):
        print(f"  {key}: inputs {inputs[:args.show]}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "count": args.count, "seed": args.seed, "first": args.first, "done": done, "seconds": round(seconds, 1),
            "outcomes": dict(total), "by_family": {f"{f}:{k}": n for (f, k), n in kinds.items()},
            "failures": {s: v for s, v in sites.items()}, "violations": dict(viol),
            "violation_inputs": {k: v[:50] for k, v in viol_inputs.items()}}, indent=2, sort_keys=True) + "\n")
    bare = sum(n for k, n in viol.items() if k.startswith("bare:") and "(" not in k)
    return 1 if failures or bare else 0


if __name__ == "__main__":
    sys.exit(main())
