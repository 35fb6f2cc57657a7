"""Design ``shadow-x2avic``: the RFC v3 shadow design extended to x2AVIC for L2 (x2AVIC enable bit
in vmcb02, 512 / 4096-entry shadow tables per CPU model, x2APIC MSR passthrough for L2, the
x2AVIC form of AVIC_INCOMPLETE_IPI). ``shadow`` stays RFC v3: an x2APIC L2 falls back to MSR
exits to L1."""

from __future__ import annotations

import pytest
from _nested_util import INCOMPLETE_IPI, check_shadow, pingpong, prog, scenario, traced

from navic.hv.nested.shadow import ShadowTable
from navic.hw import avic as A

X2APIC_ICR = 0x830
N = 20


def _per_ipi_exits(t, n_ipis: int) -> dict[str, float]:
    return {lvl: sum(c for r, c in t.exits(lvl).items() if r not in ("npf", "vmrun", "hlt")) / n_ipis
            for lvl in ("l0", "l0_l2", "l1")}


def test_x2apic_l2_on_zen4_takes_no_exit_per_ipi():
    """x2APIC L2 ping-pong on zen4: shadow-x2avic delivers every IPI by hardware (0 exits per IPI
    at L0 and L1, like shadow with an xAPIC L2); shadow (RFC v3, no x2AVIC for L2) takes an ICR
    WRMSR exit to L1 for each."""
    x2 = traced(pingpong("shadow-x2avic", n=N, l2_apic="x2apic"), watch=check_shadow)
    rfc = traced(pingpong("shadow", n=N, l2_apic="x2apic"))
    xapic = traced(pingpong("shadow", n=N, l2_apic="xapic"))
    for t in (x2, rfc, xapic):
        assert t.result["violations"] == []
        assert t.got("l2.1", 0x40) == N and t.got("l2.0", 0x41) == N
    assert x2.log["bad"] == [] and x2.log["ir1"]
    assert _per_ipi_exits(x2, 2 * N) == _per_ipi_exits(xapic, 2 * N) == {"l0": 0, "l0_l2": 0, "l1": 0}
    assert x2.exits("l1") == xapic.exits("l1")          # only the setup exits (HLT of idle L1 vCPUs)
    assert rfc.exits("l1").get("msr", 0) >= 2 * N        # RFC v3: every x2APIC ICR write exits to L1
    # vmcb02 runs x2AVIC (int_ctl bit 30) on the shadow table; shadow's stays xAVIC.
    for v in x2.kvm.vcpus:
        assert v.nested.vmcb02.avic_enable and v.nested.vmcb02.x2avic_enable
        assert v.nested.vmcb02.physical_table_hpa == next(iter(x2.design.tables.values())).hpa
    assert all(v.nested.vmcb02.avic_enable and not v.nested.vmcb02.x2avic_enable for v in rfc.kvm.vcpus)


def test_l1_is_offered_x2avic_and_passes_the_x2apic_msrs_through_to_l2():
    """L1 sees x2AVIC (CPUID Fn8000_000A_EDX[18]) only under shadow-x2avic; its KVM then opens
    the x2APIC MSRs (ICR included) for its x2APIC L2, and vmcb02's MSR map follows L1's."""
    x2 = traced(pingpong("shadow-x2avic", n=2, l2_apic="x2apic"))
    rfc = traced(pingpong("shadow", n=2, l2_apic="x2apic"))
    assert x2.kvm2.vendor.features.x2avic and not rfc.kvm2.vendor.features.x2avic
    for t, intercepted in ((x2, False), (rfc, True)):
        for v in t.kvm.vcpus:
            assert (X2APIC_ICR in v.nested.ctx02.msr_wr) is intercepted


@pytest.mark.parametrize(("cpu", "pages", "entries"), [("zen4", 1, 512), ("zen5", 8, 4096)])
def test_shadow_table_is_sized_for_the_x2avic_maximum(cpu, pages, entries):
    """512 entries (one page, X2AVIC_MAX_PHYSICAL_ID 0x1FF) on zen4; 4096 (eight pages, X2AVIC_EXT)
    on zen5. The RFC's own table is one page whatever the CPU."""
    t = traced(pingpong("shadow-x2avic", n=2, cpu=cpu, l2_apic="x2apic"))
    st = next(iter(t.design.tables.values()))
    assert t.design.table_pages == pages and pages * 4096 // 8 == entries
    mem = t.kvm.host.mem
    for p in range(pages):               # all allocated host frames, contiguous
        assert (st.hpa >> 12) + p in mem.frames
    assert traced(pingpong("shadow", n=2, cpu=cpu)).design.table_pages == 1


def test_x2apic_id_beyond_255_through_a_multi_frame_table_on_zen5():
    """An L2 vCPU with x2APIC ID 600 (zen5, X2AVIC_EXT): L1's table spans two frames, both
    write-tracked, the shadow entry 600 lives in the second shadow page, and IPIs to it are
    delivered by hardware with no exit (xAVIC could not address it at all)."""
    t = traced(pingpong("shadow-x2avic", n=N, cpu="zen5", l2_apic="x2apic", l2="apic_ids = [0, 600]"),
               watch=check_shadow)
    assert t.result["violations"] == [] and t.log["bad"] == []
    assert t.got("l2.1", 0x40) == N and t.got("l2.0", 0x41) == N
    (st,) = t.design.tables.values()
    assert st.nentries == 601 and st.frames == 2
    assert {st.gfn, st.gfn + 1} <= set(t.design.tracked)
    e = t.kvm.host.mem.read64(st.hpa + 8 * 600)
    assert e & A.PHYS_VALID and A.phys_entry_backing(e) == t.design.core.l1mem.hpa(t.kvm2.vcpus[1].backing_hpa)
    assert _per_ipi_exits(t, 2 * N) == {"l0": 0, "l0_l2": 0, "l1": 0}
    assert t.counter("npf_write_tracking") > 0 and t.counter("shadow_invalidations") == 0
    # An IsRunning write to entry 600 (second L1 frame) is tracked and updates the shadow in place.
    base = st.gfn << 12
    g = t.design.core.l1mem.read64(base + 8 * 600)
    t.design.core.l1mem.write64(base + 8 * 600, g & ~A.PHYS_IS_RUNNING)
    assert st.gentries[600] == g & ~A.PHYS_IS_RUNNING
    assert not t.kvm.host.mem.read64(st.hpa + 8 * 600) & A.PHYS_IS_RUNNING


def test_x2avic_incomplete_ipi_decode():
    """The x2AVIC form: 32-bit destination in EXITINFO1[63:32], broadcast 0xFFFFFFFF, logical
    cluster dest[31:16] with members dest[15:0] (ID 16 * cluster + bit), physical ID reported."""
    t = traced(pingpong("shadow-x2avic", n=2, l2_apic="x2apic"))
    design = t.design
    v = t.kvm.vcpus[0]
    vmcb12 = v.nested.vmcb12
    st = ShadowTable(0, 0, nentries=40)
    fixed, logical = 0, 1 << 11
    assert design._destinations(v, vmcb12, 0, fixed, 33, st) == [(33, 33)]
    assert design._destinations(v, vmcb12, 0, fixed | logical, (2 << 16) | 0b101, st) == [(32, 32), (34, 34)]
    assert design._destinations(v, vmcb12, 0, fixed, 0xFFFFFFFF, st) == [(i, i) for i in range(40)]
    assert design._destinations(v, vmcb12, 0, fixed | (3 << 18), 0, st) == [(i, i) for i in range(1, 40)]
    assert design._destinations(v, vmcb12, 0, fixed | (1 << 18), 0, st) == []


def test_l0_preemption_hides_id1_and_wakes_in_x2avic_mode():
    """pCPUs < L1 vCPUs: ID 1 exits in x2AVIC mode are decoded with the x2APIC destination and
    hidden from L1 (guest IR = 1: only L0 descheduled the L1 vCPU), as in xAVIC mode."""
    n = 10
    t = traced(pingpong("shadow-x2avic", n=n, lead=400000, pcpus=1, l2_apic="x2apic",
                        l0="timeslice_us = 50\nhalt_poll_ns = 0", max_time_us=30000), watch=check_shadow)
    assert t.result["violations"] == [] and t.log["bad"] == []
    assert t.got("l2.1", 0x40) == n and t.got("l2.0", 0x41) == n
    assert t.counter("shadow_hidden_id1_wakeups") > 0
    assert t.exits("l0_l2").get(INCOMPLETE_IPI, 0) == t.counter("shadow_hidden_id1_wakeups")
    assert INCOMPLETE_IPI not in t.exits("l1")


def test_broadcast_in_x2avic_mode():
    progs = [prog("l2.0", ['{ op = "sti" }', '{ op = "compute", cycles = 200000 }',
                           '{ op = "ipi", shorthand = "others", vector = 0x40 }'])]
    progs += [prog(f"l2.{i}", ['{ op = "sti" }', '{ op = "wait", vector = 0x40, how = "spin" }']) for i in (1, 2, 3)]
    t = traced(scenario(progs, design="shadow-x2avic", l1_vcpus=4, l2_vcpus=4, l2_apic="x2apic"), watch=check_shadow)
    assert t.result["violations"] == [] and t.log["bad"] == []
    assert all(t.got(f"l2.{i}", 0x40) == 1 for i in (1, 2, 3))
    assert INCOMPLETE_IPI not in t.exits("l1")


def test_compare_configs_and_explore_know_the_design():
    """`navic compare` has l2-shadow-x2avic-zen4/-zen5 (and zen5 rows for shadow and dummy);
    `navic explore --design shadow-x2avic` is accepted; a bad variant is a one-line error."""
    from click.testing import CliRunner

    from navic.check.explore import apply_design
    from navic.cli import main
    from navic.compare import CONFIGS, Case, scenario_dict
    from navic.scenario import ScenarioError, loads_scenario, parse_scenario

    case = Case("ipi-pingpong", {"iterations": 2}, apic="x2apic")
    for name, cpu, design in (("l2-shadow-x2avic-zen4", "zen4", "shadow-x2avic"),
                              ("l2-shadow-x2avic-zen5", "zen5", "shadow-x2avic"),
                              ("l2-shadow-zen5", "zen5", "shadow"), ("l2-dummy-zen5", "zen5", "dummy")):
        scn = parse_scenario(scenario_dict(case, CONFIGS[name]), name)
        assert (scn.host.cpu, scn.l0.nested_apicv) == (cpu, design)
    scn = loads_scenario(pingpong("shadow", n=1), "t.toml")
    assert apply_design(scn, "shadow-x2avic").l0.nested_apicv == "shadow-x2avic"
    r = CliRunner().invoke(main, ["explore", "--help"])
    assert "shadow-x2avic" in r.output
    with pytest.raises(ScenarioError, match=r"l0\.shadow_variant: expected one of"):
        loads_scenario(pingpong("shadow", n=1, l0='shadow_variant = "v4"'), "t.toml")
