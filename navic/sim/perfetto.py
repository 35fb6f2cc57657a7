"""Chrome/Perfetto trace-event JSON and ``perf kvm stat``-style summaries from a traced run.

Tracks: one per physical CPU (pid 1 "host", tid = pCPU). On each, slices show what ran: the
guest (named by level and vCPU, from ``kvm_entry`` to ``kvm_exit``) and the hypervisor in between
("L0 host", handling the exit). Exits are instant events carrying their EXITINFO; every IPI gets a
flow arrow from its send (on the sender's pCPU) to its handler (on the receiver's). The format is
the Trace Event Format that ui.perfetto.dev and chrome://tracing open.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from typing import Any


def _us(cycles: float, ghz: float) -> float:
    return round(cycles / (ghz * 1000.0), 4)


class _Placement:
    """Which pCPU a vCPU was on at a given time (from entry/exit slices)."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # vcpu -> (start, end, pcpu)
        self._starts: dict[str, list[int]] = {}

    def add(self, vcpu: str, start: int, end: int, pcpu: int) -> None:
        self.spans[vcpu].append((start, end, pcpu))

    def finish(self) -> None:
        for v, spans in self.spans.items():
            spans.sort()
            self._starts[v] = [s[0] for s in spans]

    def pcpu_at(self, vcpu: str, t: int) -> int | None:
        spans = self.spans.get(vcpu)
        if not spans:
            return None
        i = bisect_right(self._starts[vcpu], t) - 1
        if i < 0:
            return spans[0][2]
        return spans[i][2]


def guest_slices(run: Any) -> tuple[list[tuple[int, int, int, str, str]], _Placement]:
    """(pcpu, start, end, vcpu, level) for every stretch of guest execution, and the placement map."""
    ev = run.trace.events
    end_time = run.engine.now
    place = _Placement()
    slices: list[tuple[int, int, int, str, str]] = []
    if run.kvm is None:
        for i, name in enumerate(run.machine.names):
            slices.append((i, 0, end_time, name, "L1"))
            place.add(name, 0, end_time, i)
        place.finish()
        return slices, place
    open_: dict[str, tuple[int, int, str]] = {}
    for e in ev:
        if e.name == "kvm_entry" and e.vcpu is not None and e.pcpu is not None:
            open_[e.vcpu] = (e.t, e.pcpu, e.fields.get("guest_level", "L1"))
        elif e.name in ("kvm_exit", "kvm_nested_vmexit") and e.vcpu in open_:
            t0, p, lvl = open_.pop(e.vcpu)
            slices.append((p, t0, e.t, e.vcpu, lvl))
            place.add(e.vcpu, t0, e.t, p)
    for v, (t0, p, lvl) in open_.items():
        slices.append((p, t0, end_time, v, lvl))
        place.add(v, t0, end_time, p)
    place.finish()
    return slices, place


def chrome_trace(run: Any) -> dict[str, Any]:
    ghz = run.costs.ghz
    npcpus = len(run.kvm.host.pcpus) if run.kvm is not None else len(run.machine.pcpus)
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "tid": 0, "name": "process_name", "args": {"name": "host (physical CPUs)"}},
    ]
    for p in range(npcpus):
        events.append({"ph": "M", "pid": 1, "tid": p, "name": "thread_name", "args": {"name": f"pCPU {p}"}})
        events.append({"ph": "M", "pid": 1, "tid": p, "name": "thread_sort_index", "args": {"sort_index": p}})
    slices, place = guest_slices(run)
    by_pcpu: dict[int, list[tuple[int, int, str, str]]] = defaultdict(list)
    for p, t0, t1, v, lvl in slices:
        by_pcpu[p].append((t0, t1, v, lvl))
        events.append({"ph": "X", "pid": 1, "tid": p, "ts": _us(t0, ghz), "dur": _us(max(t1 - t0, 0), ghz),
                       "name": f"{lvl} {v}", "cat": lvl, "args": {"vcpu": v, "level": lvl}})
    if run.kvm is not None:
        # Host (L0) time between consecutive guest slices on a pCPU.
        for p, ss in by_pcpu.items():
            ss.sort()
            for (_, a1, v, _lvl), (b0, _, _, _) in zip(ss, ss[1:], strict=False):
                if b0 > a1:
                    events.append({"ph": "X", "pid": 1, "tid": p, "ts": _us(a1, ghz), "dur": _us(b0 - a1, ghz),
                                   "name": "L0 host", "cat": "L0", "args": {"after": v}})
    for e in run.trace.events:
        if e.name in ("kvm_exit", "kvm_nested_vmexit", "kvm_avic_incomplete_ipi", "kvm_avic_unaccelerated_access",
                      "kvm_avic_doorbell", "kvm_avic_ga_log") and e.pcpu is not None:
            events.append({"ph": "i", "s": "t", "pid": 1, "tid": e.pcpu, "ts": _us(e.t, ghz), "name": e.name,
                           "cat": e.level, "args": {k: (hex(v) if isinstance(v, int) and v > 9 else v)
                                                    for k, v in e.fields.items()} | {"vcpu": e.vcpu}})
    # Flow arrows: IPI send -> handler.
    fid = 0
    for d in run.recorder.deliveries:
        if d.get("sent_by") is None or d.get("latency") is None:
            continue
        t_sent = d["t"] - d["latency"]
        sp = place.pcpu_at(d["sent_by"], t_sent)
        rp = place.pcpu_at(d["cpu"], d["t"])
        if sp is None or rp is None:
            continue
        fid += 1
        events.append({"ph": "s", "id": fid, "pid": 1, "tid": sp, "ts": _us(t_sent, ghz), "name": "ipi",
                       "cat": "ipi", "args": {"vector": d["vector"], "from": d["sent_by"], "to": d["cpu"]}})
        events.append({"ph": "f", "bp": "e", "id": fid, "pid": 1, "tid": rp, "ts": _us(d["t"], ghz), "name": "ipi",
                       "cat": "ipi"})
        events.append({"ph": "i", "s": "t", "pid": 1, "tid": rp, "ts": _us(d["t"], ghz),
                       "name": f"handler {d['vector']:#x}", "cat": "handler",
                       "args": {"cpu": d["cpu"], "kind": d["kind"], "latency_ns": d.get("latency_ns")}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"scenario": run.scenario.name, "seed": run.scenario.seed, "cpu": run.scenario.host.cpu}}


def kvm_stat(run: Any) -> list[dict[str, Any]]:
    """Per exit reason: samples, share, total and mean handling time (exit to next entry of the
    same vCPU), like ``perf kvm stat report``."""
    ghz = run.costs.ghz
    stats: dict[str, list[int]] = defaultdict(list)
    pending: dict[str, tuple[str, int]] = {}
    for e in run.trace.events:
        if e.name in ("kvm_exit", "kvm_nested_vmexit") and e.vcpu is not None:
            pending[e.vcpu] = (f"{e.fields.get('reason')}" + ("" if e.name == "kvm_exit" else " (L2)"), e.t)
        elif e.name == "kvm_entry" and e.vcpu in pending:
            reason, t0 = pending.pop(e.vcpu)
            stats[reason].append(e.t - t0)
    for reason, t0 in pending.values():
        stats[reason].append(run.engine.now - t0)
    total = sum(len(v) for v in stats.values()) or 1
    rows = []
    for reason, ds in sorted(stats.items(), key=lambda kv: -len(kv[1])):
        tot = sum(ds)
        rows.append({"reason": reason, "samples": len(ds), "pct": round(100.0 * len(ds) / total, 2),
                     "time_us": round(tot / (ghz * 1000), 3), "avg_us": round(tot / len(ds) / (ghz * 1000), 3)})
    return rows
