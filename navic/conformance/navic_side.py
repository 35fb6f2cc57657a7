"""Run a conformance case on navic (bare metal) and bring the result into the QEMU shape.

The case becomes a :class:`navic.config.Scenario`: ``l1.0`` runs the case's ops, each followed
by a settle ``Compute`` (navic's IPI reaches the target IRR ~600 cycles after the ICR write
while the sender keeps executing; QEMU delivers at once), and the other CPUs run their set-up
writes and ``STI`` and then idle. The BSP starts with a long ``Compute`` so that every AP is
configured before the first op, as the QEMU image waits for its APs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from navic.config import HostConfig, Scenario, VmConfig
from navic.conformance.case import DUMP_FIELDS, Case, CpuSetup, read_var
from navic.conformance.qemu import Outcome
from navic.guest import ops as O

SETTLE_CYCLES = 5000
START_CYCLES = 20000
FINAL_CYCLES = 20000


def _setup_ops(s: CpuSetup) -> list[O.Op]:
    return [O.Write(index=-1, reg="DFR", value=s.dfr), O.Write(index=-1, reg="LDR", value=s.ldr),
            O.Write(index=-1, reg="TPR", value=s.tpr), O.Write(index=-1, reg="SVR", value=s.svr),
            O.Write(index=-1, reg="ESR", value=0), O.Write(index=-1, reg="ESR", value=0)]


def _settled(ops: tuple[O.Op, ...], where: str) -> tuple[O.Op, ...]:
    """The ops with a settle step after each, and every read given its variable name."""
    out: list[O.Op] = []
    for op in ops:
        if isinstance(op, O.Repeat):
            for _ in range(op.times):
                out.extend(_settled(op.ops, where))
            continue
        if isinstance(op, O.Read | O.MmioRead | O.Rdmsr) and op.into is None:
            op = type(op)(**{**_fields(op), "into": read_var(where, op.index)})
        out.append(op)
        out.append(O.Compute(index=op.index, cycles=SETTLE_CYCLES))
    return tuple(out)


def _fields(op: O.Op) -> dict[str, Any]:
    return {name: getattr(op, name) for name in op.__dataclass_fields__}  # type: ignore[attr-defined]


def scenario(case: Case, cpu_model: str = "zen4") -> Scenario:
    progs = []
    bsp_ops = [O.Compute(index=-1, cycles=START_CYCLES), *_setup_ops(case.cpu_setup(0)),
               *_settled(case.ops, "m"), O.Compute(index=-1, cycles=FINAL_CYCLES), O.Cli(index=-1)]
    handlers = {vec: _settled(hops, f"h{vec:02x}") for vec, hops in case.handlers}
    progs.append(O.Program(cpu="l1.0", level=1, vcpu=0, ops=tuple(bsp_ops), handlers=handlers))
    for i in range(1, case.cpus):
        progs.append(O.Program(cpu=f"l1.{i}", level=1, vcpu=i,
                               ops=(*_setup_ops(case.cpu_setup(i)), O.Sti(index=-1))))
    return Scenario(name="conformance", seed=case.seed or 1, max_time_us=2_000.0 + 50.0 * len(case.ops),
                    host=HostConfig(cpu=cpu_model, pcpus=case.cpus, virt="none"),
                    l1=VmConfig(vcpus=case.cpus, apic="xapic"), programs=tuple(progs))


def _dump_fields(d: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, _off in DUMP_FIELDS:
        if name[:3] in ("isr", "tmr", "irr") and name[3:].isdigit():
            out[name] = int(d[name[:3]][int(name[3:])])
        elif name == "id":
            out[name] = (int(d["id"]) & 0xFF) << 24   # the xAPIC ID register holds the ID in 31:24
        else:
            out[name] = int(d[name])
    return out


def outcome_from_result(case: Case, res: dict[str, Any]) -> Outcome:
    apic = {i: _dump_fields(res["apic"][f"l1.{i}"]) for i in range(case.cpus)}
    dels: dict[int, list[int]] = {i: [] for i in range(case.cpus)}
    for d in sorted(res["deliveries"], key=lambda d: d["t"]):
        if d.get("kind") in ("init", "sipi", "smi"):
            continue
        cpu = d["cpu"]
        if cpu.startswith("l1."):
            dels[int(cpu[3:])].append(2 if d.get("kind") == "nmi" else int(d["vector"]))
    reads = {k: int(v) for k, v in res.get("reads", {}).get("l1.0", {}).items()}
    errors = [str(e) for e in res.get("errors", [])]
    return Outcome(apic, dels, reads, errors=errors)


Runner = Callable[[Scenario], dict[str, Any]]


def run_case(case: Case, runner: Runner | None = None) -> Outcome:
    if runner is None:
        from navic.runner import run_scenario
        runner = run_scenario
    return outcome_from_result(case, runner(scenario(case)))
