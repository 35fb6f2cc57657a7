"""Parallel and distributed exploration: ``navic explore -j N`` and ``--scheduler tcp://HOST:PORT``.

The work is split over *schedule prefixes*. For every bound k >= 1 the default (time-order) run is
made here; its trail has n decision points, and the schedules with at least one deviation fall
into disjoint subtrees, one per *first deviation* (point i, alternative a): prefix ``[0] * i + [a]``,
searched depth-first by :meth:`navic.check.explore.Explorer.search` with backtracking floored at
point i + 1 — exactly the subtree the serial search visits under that prefix. Each subtree is one
task, for a local process pool or a dask.distributed cluster. A worker keeps one visited-state
table per (search, bound) across the tasks it runs (so, as in the serial search, a state explored
in one of its subtrees cuts the others); states are counted as the union of the hashes the workers
report. Tasks go out in the serial search's order (deepest first deviation first): a violation
is then found about as early as serially, and the imbalance at the end is small (the last, biggest
subtree — a first deviation at point 0 — holds about K / n of the n-point search's schedules).

Results equal the serial search's: same verdict, and on a violation the first one in the serial
search's order (deepest first deviation first, alternatives in index order) — tasks after it in
that order are cancelled, those before it are waited for. Pruning differs (no table is shared
between workers), so schedule counts differ somewhat; coverage does not.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

from navic.check.explore import (
    ExploreChooser,
    Explorer,
    Found,
    Outcome,
    Progress,
    _mutant,
    _races_doc,
    _races_load,
    _simulate,
    tracking,
)

# Per worker process: visited-state tables by (search token, bound) (dask workers).
_VISITED: dict[tuple[str, int], dict[bytes, int]] = {}
# Local workers: the table shared by all of them (inherited when the pool forks them).
_SHARED: SharedVisited | None = None


class SharedVisited:
    """The visited-state table of a local parallel search, in shared memory: every forked worker
    reads and writes the same table, so a state explored by one worker cuts the others exactly as
    in the serial search. Open addressing over the 16-byte state digests (linear probing, at most
    ``PROBES`` slots), one byte per slot for the remaining budget, one lock for the whole table
    (an operation holds it for a few microseconds; a run takes milliseconds). A full probe
    sequence is "not visited" and drops the insert: less pruning, never less coverage."""

    PROBES = 64
    SLOT = 17
    EMPTY = bytes(16)

    def __init__(self, slots: int = 1 << 21) -> None:
        import mmap
        import multiprocessing

        self.slots = slots
        self.buf = mmap.mmap(-1, slots * self.SLOT)   # anonymous, MAP_SHARED: seen by forked children
        self.lock = multiprocessing.get_context("fork").Lock()

    def _slot(self, h: bytes) -> tuple[int | None, bool]:
        buf, n, size = self.buf, self.slots, self.SLOT
        i = int.from_bytes(h[:8], "little") % n
        for _ in range(self.PROBES):
            off = i * size
            k = buf[off:off + 16]
            if k == h:
                return off, True
            if k == self.EMPTY:
                return off, False
            i = (i + 1) % n
        return None, False

    def get(self, h: bytes) -> int | None:
        with self.lock:
            off, hit = self._slot(h)
            return self.buf[off + 16] if hit and off is not None else None

    def __setitem__(self, h: bytes, remaining: int) -> None:
        with self.lock:
            off, _hit = self._slot(h)
            if off is not None:
                self.buf[off + 16] = min(remaining, 255)
                self.buf[off:off + 16] = h

    def clear(self) -> None:
        with self.lock:
            self.buf[:] = bytes(len(self.buf))


def run_task(job: dict[str, Any]) -> dict[str, Any]:
    """Search one subtree (a first deviation) in a worker; returns counts, new state hashes and a
    violation if one was found."""
    opts = job["opts"]
    bound, point, alt = job["bound"], job["point"], job["alt"]
    visited: Any = None
    if opts.hashing and job["shared"] and _SHARED is not None:
        visited = _SHARED
    elif opts.hashing:
        for key in [k for k in _VISITED if k[0] != job["token"]]:
            del _VISITED[key]          # tables of earlier searches
        visited = _VISITED.setdefault((job["token"], bound), {})
    ex = Explorer(job["scn"], dataclasses.replace(opts, jobs=1, scheduler=None, design=None))
    prog = Progress()
    start = time.monotonic()
    deadline = start + job["seconds_left"] if job["seconds_left"] is not None else None
    found: Found | None = None
    timed_out = False
    with _mutant(opts.mutant), tracking(opts.reduction) as ex.interactions:
        try:
            found = ex.search(bound, [0] * point + [alt], prog, floor=point + 1, visited=visited,
                              deadline=deadline, start=start, races=_races_load(job.get("races")))
        except TimeoutError:
            timed_out = True
    return {"point": point, "alt": alt, "schedules": prog.schedules, "pruned": prog.pruned,
            "truncated": prog.truncated, "states": list(ex.all_states) if visited is not None else [],
            "new_states": prog.states, "timed_out": timed_out,
            "violation": found.violation if found else None, "decisions": found.decisions if found else None}


def _serial_key(point: int, alt: int) -> tuple[int, int]:
    """The serial DFS visits first deviations deepest first, alternatives in index order."""
    return (-point, alt)


def _worker_init() -> None:
    """Local workers leave Ctrl-C to the parent (which stops the search and terminates them)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _LocalPool:
    shared = True

    def __init__(self, jobs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        global _SHARED
        if _SHARED is None:
            _SHARED = SharedVisited()
        self.table = _SHARED

        self.ex = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init,
                                      mp_context=multiprocessing.get_context("fork"))

    def results(self, jobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from concurrent.futures import as_completed

        self.futures = {self.ex.submit(run_task, j): (j["point"], j["alt"]) for j in jobs}
        for f in as_completed(self.futures):
            if not f.cancelled():
                yield f.result()

    def cancel(self, keep: Any) -> None:
        for f, key in self.futures.items():
            if not keep(key):
                f.cancel()

    def close(self, *, kill: bool = False) -> None:
        if kill:
            for p in list(getattr(self.ex, "_processes", {}).values()):   # the workers we started
                p.terminate()
        self.ex.shutdown(wait=not kill, cancel_futures=True)


class _DaskPool:
    shared = False

    def __init__(self, scheduler: Any) -> None:
        from distributed import Client

        self.own = not isinstance(scheduler, Client)
        self.client = Client(scheduler, set_as_default=False) if self.own else scheduler

    def results(self, jobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from distributed import as_completed

        self.futures = {self.client.submit(run_task, j, pure=False): (j["point"], j["alt"]) for j in jobs}
        for f in as_completed(list(self.futures), loop=self.client.loop):
            if f.cancelled():
                continue
            r = f.result()
            f.release()
            yield r

    def cancel(self, keep: Any) -> None:
        for f, key in self.futures.items():
            if not keep(key):
                f.cancel()

    def close(self, *, kill: bool = False) -> None:
        for f in getattr(self, "futures", {}):
            f.cancel()
        if self.own:
            self.client.close()


def run(explorer: Explorer) -> Outcome:
    """The parallel counterpart of :meth:`Explorer.run` (same bounds, same outcome fields)."""
    o = explorer.opts
    prog = Progress()
    start = time.monotonic()
    token = uuid.uuid4().hex
    states: set[bytes] = set()
    resume = explorer.resume
    position = explorer.position
    found: Found | None = None
    # The mutant is applied around each run, here and in each worker, never while the pool forks.
    pool: _LocalPool | _DaskPool = _DaskPool(o.scheduler) if o.scheduler is not None else _LocalPool(max(1, o.jobs))
    closed = False
    try:
        first = resume.bound if resume is not None else 0
        for bound in range(first, o.preemptions + 1):
            prog.bound = position.bound = bound
            prog.complete_bound = bound - 1
            done = {tuple(t) for t in resume.done_tasks} if resume is not None and bound == first else set()
            position.done_tasks = [list(t) for t in sorted(done)]
            # The default run (the root of every subtree), here; locally its states go into the
            # shared table first, as in the serial search (where they cut the subtrees too).
            table: Any = {}
            if isinstance(pool, _LocalPool):
                pool.table.clear()      # one table per bound, as in the serial search
                table = pool.table
            ch = ExploreChooser([], budget=bound, horizon=o.horizon, width=explorer.width,
                                max_steps=o.max_steps, visited=table if o.hashing else None, all_states=states,
                                leaf_hashing=o.leaf_hashing, reduction=o.reduction,
                                interactions=explorer.interactions)
            with _mutant(o.mutant):
                try:
                    root = _simulate(explorer.scn, ch)
                finally:
                    ch.detach()
            ch.finish()
            prog.schedules += 1
            prog.states = len(states) if o.hashing else prog.states + ch.new_states
            if root.recorder.violations:
                found = Found(root.recorder.violations[0], ch.decisions())
                break
            if bound == 0:
                prog.complete_bound = 0
                continue
            left = None if o.time_limit is None else o.time_limit - (time.monotonic() - start)
            # With dpor only the first deviations that race (ch.races), each with its prefix's races.
            worth = ch.races if ch.dpor else [None] * len(ch.trail)
            jobs = [{"token": token, "scn": explorer.scn, "opts": o, "bound": bound, "point": i, "alt": a,
                     "seconds_left": left, "shared": pool.shared,
                     "races": _races_doc(ch.races[:i + 1]) if ch.dpor else None}
                    for i, (_kind, labels, _c, _cost) in reversed(list(enumerate(ch.trail)))
                    for a in range(1, len(labels))
                    if (i, a) not in done and (worth[i] is None or a in worth[i])]
            prog.frontier = len(jobs)
            hits: list[tuple[tuple[int, int], Found]] = []
            timed_out = False
            for r in pool.results(jobs):
                prog.schedules += r["schedules"]
                prog.pruned += r["pruned"]
                prog.truncated += r["truncated"]
                if o.hashing:
                    states.update(r["states"])
                    prog.states = len(states)
                else:
                    prog.states += r["new_states"]
                prog.frontier -= 1
                prog.seconds = time.monotonic() - start
                if r["timed_out"]:
                    timed_out = True
                else:
                    position.done_tasks.append([r["point"], r["alt"]])
                if r["violation"] is not None:
                    key = _serial_key(r["point"], r["alt"])
                    hits.append((key, Found(r["violation"], r["decisions"])))
                    best = min(k for k, _f in hits)
                    pool.cancel(lambda t, best=best: _serial_key(*t) < best)
                if explorer.on_progress is not None:
                    explorer.on_progress(prog)
            if hits:
                found = min(hits, key=lambda h: h[0])[1]
                break
            if timed_out:
                raise TimeoutError
            prog.complete_bound = bound
        return explorer.finish(prog, found, start)
    except TimeoutError:
        prog.seconds = time.monotonic() - start
        return Outcome(prog, complete=False, timed_out=True, position=position)
    except KeyboardInterrupt:
        pool.close(kill=True)
        closed = True
        prog.seconds = time.monotonic() - start
        return Outcome(prog, complete=False, interrupted=True, position=position)
    finally:
        if not closed:
            pool.close()
