"""navic conformance: harness unit tests (always) and QEMU differential runs (marker: emulator)."""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner

from navic.conformance import compare as C
from navic.conformance import gen, image, qemu
from navic.conformance.case import DUMP_FIELDS, Case, CpuSetup, legal_receivers, reindex
from navic.conformance.cli import conformance
from navic.conformance.quirks import active_quirks
from navic.conformance.run import Checker
from navic.conformance.shrink import ddmin
from navic.guest import ops as O

needs_qemu = pytest.mark.skipif(bool(qemu.missing_tools()),
                                reason="needs qemu-system-x86 and binutils (as, ld, objcopy)")


# ------------------------------------------------------------------ pure harness (no emulator)
def test_generation_is_deterministic_per_seed_and_index() -> None:
    a = gen.generate("s", 3)
    assert a == gen.generate("s", 3)
    assert a != gen.generate("s", 4)
    assert [op.index for op in a.ops] == list(range(len(a.ops)))


def test_generated_cases_cover_the_op_families() -> None:
    kinds: set[str] = set()
    for i in range(200):
        case = gen.generate("cover", i)
        for op in case.ops:
            if isinstance(op, O.Ipi):
                kinds.add(f"ipi-{op.mode}-{op.shorthand}-{op.dest_mode}")
                if op.vector < 16:
                    kinds.add("illegal-vector")
            else:
                kinds.add(type(op).__name__)
        if case.cpu_setup(0).dfr == 0x0FFFFFFF:
            kinds.add("cluster")
        if any(h and isinstance(h[0], O.Sti) for _v, h in case.handlers):
            kinds.add("nested-handler")
    for k in ("ipi-fixed-self-physical", "ipi-fixed-none-logical", "ipi-fixed-all-physical",
              "ipi-fixed-others-physical", "ipi-lowest-none-logical", "ipi-nmi-none-physical",
              "illegal-vector", "Sti", "Cli", "Eoi", "Write", "Read", "cluster", "nested-handler"):
        assert k in kinds, k


def test_legal_receivers_flat_cluster_physical() -> None:
    flat = Case(cpus=3, ops=(), setup=(CpuSetup(ldr=0x01 << 24), CpuSetup(ldr=0x02 << 24),
                                       CpuSetup(ldr=0x06 << 24)))
    assert legal_receivers(flat, O.Ipi(index=0, vector=0x40, dest=0x02, dest_mode="logical")) == {1, 2}
    assert legal_receivers(flat, O.Ipi(index=0, vector=0x40, dest=0xFF, dest_mode="logical")) == {0, 1, 2}
    assert legal_receivers(flat, O.Ipi(index=0, vector=0x40, to=2)) == {2}
    assert legal_receivers(flat, O.Ipi(index=0, vector=0x40, shorthand="others")) == {1, 2}
    cl = Case(cpus=3, ops=(), setup=(CpuSetup(ldr=0x11 << 24, dfr=0x0FFFFFFF),
                                     CpuSetup(ldr=0x12 << 24, dfr=0x0FFFFFFF),
                                     CpuSetup(ldr=0x21 << 24, dfr=0x0FFFFFFF)))
    assert legal_receivers(cl, O.Ipi(index=0, vector=0x40, dest=0x13, dest_mode="logical")) == {0, 1}
    assert legal_receivers(cl, O.Ipi(index=0, vector=0x40, dest=0x21, dest_mode="logical")) == {2}


def _outcome(cpus: int, dels: dict[int, list[int]], **regs: int) -> qemu.Outcome:
    apic = {c: {name: 0 for name, _ in DUMP_FIELDS} for c in range(cpus)}
    for k, v in regs.items():
        apic[0][k] = v
    return qemu.Outcome(apic, dels, {})


def test_compare_registers_deliveries_and_lowest_priority_sets() -> None:
    lp = O.Ipi(index=0, vector=0x70, mode="lowest", dest=0x06, dest_mode="logical")
    case = Case(cpus=3, ops=(lp,), setup=(CpuSetup(ldr=0x01 << 24), CpuSetup(ldr=0x02 << 24),
                                          CpuSetup(ldr=0x04 << 24)))
    a = _outcome(3, {0: [0x40], 1: [0x70], 2: []})
    b = _outcome(3, {0: [0x40], 1: [], 2: [0x70]})
    assert C.compare(case, a, b) == []           # either legal receiver is fine
    c = _outcome(3, {0: [0x40, 0x70], 1: [], 2: []})
    assert [d.kind for d in C.compare(case, a, c)] == ["lowest"]   # BSP is not a legal receiver
    d = _outcome(3, {0: [0x40], 1: [0x70], 2: []}, ppr=0x20)
    divs = C.compare(case, a, d)
    assert [(x.kind, x.where) for x in divs] == [("register", "l1.0.ppr")]
    assert "emulator=0x0 navic=0x20" in str(divs[0])


def test_ddmin_finds_a_minimal_failing_subset() -> None:
    items = list(range(40))
    out = ddmin(items, lambda xs: 7 in xs and 23 in xs, [1000])
    assert out == [7, 23]


def test_quirks_remove_only_what_the_emulator_gets_wrong() -> None:
    ops = reindex([O.Ipi(index=0, vector=3, shorthand="self"), O.Ipi(index=0, vector=0x40, shorthand="self"),
                   O.Write(index=0, reg="SVR", value=0x2FF), O.Sti(index=0),
                   O.Write(index=0, reg="SVR", value=0x1FF), O.Sti(index=0)])
    case = Case(cpus=1, ops=ops)
    adj = case
    for q in active_quirks("qemu"):
        adj = q.adjust(adj)
    names = [type(o).__name__ for o in adj.ops]
    # illegal vector dropped; SVR bit 9 cleared; CLI inserted before disabling; STI dropped while disabled
    assert names == ["Ipi", "Cli", "Write", "Write", "Sti"]
    assert adj.ops[2].value == 0xFF  # type: ignore[attr-defined]


def test_parse_output_roundtrip() -> None:
    nf = len(DUMP_FIELDS)
    blob = b"NVC1" + struct.pack("<II", 1, 1) + struct.pack(f"<{nf}I", *range(nf))
    blob += struct.pack("<I3I", 3, 0x40, 0x41, 2) + struct.pack("<III", 0, 0x20, 0)
    out = qemu.parse_output(blob, ["m0"])
    assert out.deliveries == {0: [0x40, 0x41, 2]}
    assert out.reads == {"m0": 0x20}
    assert out.apic[0]["tpr"] == 1
    with pytest.raises(qemu.EmulatorError):
        qemu.parse_output(b"EXC!" + struct.pack("<III", 13, 0, 0), [])


def test_image_source_has_program_and_handlers() -> None:
    case = Case(cpus=2, ops=(O.Ipi(index=0, vector=0x41, shorthand="self"), O.Read(index=1, reg="PPR")),
                handlers=((0x41, (O.Read(index=0, reg="ISR2"),)),))
    prog = image.generate(case)
    assert "handler_41:" in prog.source and prog.var_names == ["m1", "h41_0"]
    assert "0x000C4609" in prog.source  # SIPI to the APs
    with pytest.raises(image.BuildError):
        image.generate(Case(cpus=1, ops=(O.Wait(index=0, vector=0x40),)))


# ------------------------------------------------------------------ against QEMU
@pytest.mark.emulator
@needs_qemu
def test_handwritten_case_agrees_with_qemu() -> None:
    """ISR stays set until EOI and PPR follows it; IPIs to APs (physical, logical), NMI."""
    ops = reindex([
        O.Ipi(index=0, vector=0x45, shorthand="self"), O.Read(index=0, reg="IRR2"),
        O.Write(index=0, reg="TPR", value=0x50), O.Sti(index=0), O.Read(index=0, reg="PPR"),
        O.Write(index=0, reg="TPR", value=0x00), O.Read(index=0, reg="ISR2"), O.Read(index=0, reg="PPR"),
        O.Eoi(index=0), O.Read(index=0, reg="PPR"), O.Cli(index=0),
        O.Ipi(index=0, vector=0x51, to=1), O.Ipi(index=0, vector=0x52, dest=0x02, dest_mode="logical"),
        O.Ipi(index=0, vector=0, mode="nmi", to=2),
    ])
    case = Case(cpus=3, ops=ops, handlers=((0x45, ()),),
                setup=(CpuSetup(), CpuSetup(ldr=0x02 << 24), CpuSetup(ldr=0x01 << 24, tpr=0x20)))
    res = Checker("qemu").check(0, case, shrink=False)
    assert res.error is None
    assert res.divergences == []
    emu = qemu.run_case(case)
    assert emu.deliveries == {0: [0x45], 1: [0x51, 0x52], 2: [2]}
    assert emu.reads["m4"] == 0x50 and emu.reads["m7"] == 0x40 and emu.reads["m9"] == 0


@pytest.mark.emulator
@needs_qemu
def test_bounded_random_run_has_no_divergence() -> None:
    r = CliRunner().invoke(conformance, ["qemu", "--count", "20", "--seed", "ci", "--json"])
    doc = json.loads(r.output)
    assert doc["cases"] == 20
    assert doc["failures"] == [], doc["failures"]
    assert r.exit_code == 0


@pytest.mark.emulator
@needs_qemu
def test_broken_ppr_rule_is_caught_and_shrunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inject a bug into navic's APIC (PPR ignores TPR): the run must diverge, and the minimal
    case must be tiny and still show the PPR/priority divergence."""
    from navic.apic import lapic

    def ppr_ignoring_tpr(self: lapic.LocalApic) -> int:
        isrv = lapic._highest(self.regs, lapic._W_ISR)
        return 0 if isrv < 0 else isrv & 0xF0

    monkeypatch.setattr(lapic.LocalApic, "_compute_ppr", ppr_ignoring_tpr)
    ops = reindex([O.Write(index=0, reg="TPR", value=0x60), O.Ipi(index=0, vector=0x45, shorthand="self"),
                   O.Sti(index=0), O.Read(index=0, reg="IRR2"), O.Eoi(index=0), O.Read(index=0, reg="ISR2"),
                   O.Cli(index=0)])
    res = Checker("qemu").check(0, Case(cpus=1, ops=ops))
    assert res.divergences, "a PPR that ignores TPR must diverge from QEMU"
    assert any(d.where.endswith(".ppr") or d.kind == "deliveries" for d in res.divergences)
    assert res.minimal is not None and len(res.minimal.ops) <= 2
    assert res.minimal_divergences
    # and the random generator finds it too
    r = CliRunner().invoke(conformance, ["qemu", "--count", "6", "--seed", "ci", "--json", "--no-shrink"])
    assert r.exit_code == 1
    assert json.loads(r.output)["divergent"] >= 1
