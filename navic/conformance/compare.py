"""Compare two :class:`~navic.conformance.qemu.Outcome` s register by register and delivery by
delivery.

Lowest-priority IPIs have an implementation-specific single receiver: their deliveries are
taken out of the per-CPU sequences and checked separately (same count per vector on both sides,
every receiver one of the legal receivers by destination). Known emulator deviations from the
SDM are described by :class:`Quirk` objects (:mod:`navic.conformance.quirks`) that the generator
and the comparison consult, so navic is never asked to reproduce an emulator's bug.
"""

from __future__ import annotations

from dataclasses import dataclass

from navic.conformance.case import DUMP_FIELDS, Case, legal_receivers
from navic.conformance.qemu import Outcome
from navic.guest import ops as O


@dataclass(frozen=True)
class Divergence:
    kind: str       # "register", "read", "deliveries", "lowest", "error"
    where: str      # "l1.1.ppr", "m7", "l1.0"
    emulator: object
    navic: object

    def __str__(self) -> str:
        def f(v: object) -> str:
            if isinstance(v, int):
                return f"{v:#x}"
            if isinstance(v, list):
                return "[" + ", ".join(f(x) for x in v) + "]"
            return str(v)
        return f"{self.kind} {self.where}: emulator={f(self.emulator)} navic={f(self.navic)}"


def lowest_vectors(case: Case) -> dict[int, frozenset[int]]:
    """vector -> legal receivers, for every lowest-priority IPI of the case (main and handlers)."""
    out: dict[int, frozenset[int]] = {}
    every = list(case.ops) + [op for _v, hops in case.handlers for op in hops]
    for op in every:
        if isinstance(op, O.Ipi) and op.mode == "lowest":
            out[op.vector] = out.get(op.vector, frozenset()) | legal_receivers(case, op)
    return out


def _split_lowest(out: Outcome, lp: dict[int, frozenset[int]]
                  ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(per-CPU deliveries without lowest-priority vectors, vector -> receivers)."""
    rest: dict[int, list[int]] = {}
    recv: dict[int, list[int]] = {v: [] for v in lp}
    for cpu, vecs in out.deliveries.items():
        rest[cpu] = []
        for v in vecs:
            if v in lp:
                recv[v].append(cpu)
            else:
                rest[cpu].append(v)
    return rest, recv


def compare(case: Case, emu: Outcome, nav: Outcome, *,
            ignore: frozenset[str] = frozenset()) -> list[Divergence]:
    """Divergences between the emulator's outcome and navic's (empty: they agree).

    ``ignore`` holds field names (``"esr"``) or ``"l1.N.field"`` keys a quirk made meaningless.
    """
    divs: list[Divergence] = []
    for err in nav.errors:
        divs.append(Divergence("error", "navic", None, err))
    for cpu in range(case.cpus):
        e, n = emu.apic.get(cpu, {}), nav.apic.get(cpu, {})
        for name, _off in DUMP_FIELDS:
            key = f"l1.{cpu}.{name}"
            if name in ignore or key in ignore:
                continue
            if e.get(name) != n.get(name):
                divs.append(Divergence("register", key, e.get(name), n.get(name)))
    for var in sorted(set(emu.reads) | set(nav.reads)):
        if var in ignore:
            continue
        if emu.reads.get(var) != nav.reads.get(var):
            divs.append(Divergence("read", var, emu.reads.get(var), nav.reads.get(var)))
    lp = lowest_vectors(case)
    erest, erecv = _split_lowest(emu, lp)
    nrest, nrecv = _split_lowest(nav, lp)
    for cpu in range(case.cpus):
        if erest.get(cpu, []) != nrest.get(cpu, []):
            divs.append(Divergence("deliveries", f"l1.{cpu}", erest.get(cpu, []), nrest.get(cpu, [])))
    for v, legal in sorted(lp.items()):
        if len(erecv[v]) != len(nrecv[v]):
            divs.append(Divergence("lowest", f"vector {v:#04x} count", len(erecv[v]), len(nrecv[v])))
        for side, recv in (("emulator", erecv[v]), ("navic", nrecv[v])):
            bad = sorted(set(recv) - legal)
            if bad:
                divs.append(Divergence("lowest", f"vector {v:#04x} {side} receiver outside {sorted(legal)}",
                                       bad if side == "emulator" else None,
                                       bad if side == "navic" else None))
    return divs
