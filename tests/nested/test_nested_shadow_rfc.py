"""Design ``shadow`` against Maxim Levitsky's "[RFC PATCH v3 nn/19] RFC: nested AVIC" as posted
(2022-04-27): usecount and flood_count (patches 11, 13), ID 3 from L2 (patch 16), non-strict
doorbells (patch 18), and ``[l0] shadow_variant = "rfc-v3"`` — the posted table size and
logical decode, and what they break with a modern L1 (docs/model.md, "Shadow design vs the posted
RFC v3")."""

from __future__ import annotations

from _nested_util import INCOMPLETE_IPI, check_shadow, failure, pingpong, prog, scenario, traced

from navic.hv.nested import shadow as SH
from navic.hv.nested.base import HANDLED
from navic.hw import avic as A
from navic.hw import vmcb as V


def _only_table(t):
    (st,) = t.design.tables.values()
    return st


# -- patch 13: usecount = L1 vCPUs currently in L2 on the table ---------------------------------
def test_usecount_is_incremented_per_nested_vmrun_and_decremented_at_vmexit():
    """nested_vmcb02_prepare_avic() does atomic_inc(&t->usecount) on every nested VMRUN and
    nested_svm_vmexit() atomic_dec: at every instant the count equals the L1 vCPUs in guest mode
    on that table (HLT-waiting L2 vCPUs make L1 leave and re-enter L2 many times)."""
    def watch(kvm0, log):
        design = kvm0.vendor.nested.design
        for st in design.tables.values():
            inside = sum(1 for v in kvm0.vcpus
                         if getattr(v, "nested", None) is not None and v.nested.active
                         and v.nested.vmcb02.physical_table_hpa == st.hpa)
            log.setdefault("pairs", []).append((st.usecount, inside))

    t = traced(pingpong("shadow", n=8, how="hlt"), watch=watch)
    assert t.result["violations"] == []
    assert t.counter("nested_vmexit") > 4          # L1 vCPUs left L2 (HLT exits) and came back
    pairs = t.log["pairs"]
    assert pairs and all(use == inside for use, inside in pairs), [p for p in pairs if p[0] != p[1]][:5]
    assert {inside for _, inside in pairs} >= {0, 1}   # it rose and fell


# -- patch 11: flood_count counts only while nobody uses the table -----------------------------
def _ir_only_write(t, st):
    base = st.gfn << 12
    g = t.design.core.l1mem.read64(base + 8)
    t.design.emulate_store(None, base + 8, 8, g ^ A.PHYS_IS_RUNNING)


def test_flood_count_resets_on_a_write_while_the_table_is_in_use():
    t = traced(pingpong("shadow", n=3))
    st = _only_table(t)
    st.usecount, st.flood_count = 1, 57
    _ir_only_write(t, st)
    assert st.flood_count == 0                       # "else t->flood_count = 0"
    st.usecount = 0
    _ir_only_write(t, st)
    _ir_only_write(t, st)
    assert st.flood_count == 2


def test_flood_of_writes_to_an_unused_table_invalidates_it_once_past_1000_x_nentries():
    t = traced(pingpong("shadow", n=3))
    st = _only_table(t)
    st.usecount, st.flood_count = 0, 0
    limit = SH.FLOOD_FACTOR * st.nentries
    n0 = t.run.recorder.counters.get("shadow_invalidations", 0)
    for _ in range(limit):
        _ir_only_write(t, st)
    assert t.run.recorder.counters.get("shadow_invalidations", 0) == n0 and st.flood_count == limit
    _ir_only_write(t, st)                            # ++flood_count > nentries * 1000
    assert t.run.recorder.counters["shadow_invalidations"] == n0 + 1
    assert st.flood_count == 0 and st.nentries == 2  # erased (flood_count = 0) and re-synced


# -- patch 16: ID 3 from L2 is a WARN in L0, not reflected ---------------------------------------
def test_id3_from_l2_is_handled_in_l0_with_a_warn():
    t = traced(pingpong("shadow", n=3))
    l1v = t.kvm.vcpus[0]
    info2 = (A.AVIC_IPI_FAILURE_INVALID_BACKING_PAGE << 32) | 1
    gen = t.design.on_avic_exit(l1v, V.SVM_EXIT_AVIC_INCOMPLETE_IPI, 0x40, info2)
    try:
        next(gen)
        raise AssertionError("ID 3 takes no emulation steps")
    except StopIteration as stop:
        decision = stop.value[0]
    assert decision == HANDLED
    assert t.run.recorder.counters["shadow_id3_warn"] == 1


# -- patch 18: non-strict doorbells skip __avic_vcpu_put AND __nested_avic_put on preemption ----
def _preempt_put(strict: bool) -> tuple[bool, bool]:
    """Run (pCPUs < L1 vCPUs, so L0 preempts), then put a loaded, running L1 vCPU the way
    kvm_sched_out() does: (its own entry IR, the shadow IR of the L2 vCPU it hosts) afterwards."""
    t = traced(pingpong("shadow", n=6, lead=400000, pcpus=1, max_time_us=20000,
                        l0=f"timeslice_us = 50\ndoorbell_strict = {str(strict).lower()}"))
    assert t.result["violations"] == [] and t.got("l2.1", 0x40) == 6 and t.counter("preemptions") > 0
    x = t.kvm.vcpus[1]
    st = _only_table(t)
    x.cpu, x.blocking, x.preempted = 0, False, False
    t.kvm.vendor.avic._load(x, 0)                 # __avic_vcpu_load(): own entry IR = 1
    g = t.design.core.l1mem.read64((st.gfn << 12) + 8)
    t.design.emulate_store(None, (st.gfn << 12) + 8, 8, A.phys_entry_with(g, running=True, host_id=x.vcpu_id))
    assert x.avic_physical_id_entry & A.PHYS_IS_RUNNING
    assert t.kvm.host.mem.read64(st.hpa + 8) & A.PHYS_IS_RUNNING
    x.preempted = True
    t.kvm.vendor.vcpu_put(x)                      # svm_vcpu_put() on preemption
    return (bool(x.avic_physical_id_entry & A.PHYS_IS_RUNNING),
            bool(t.kvm.host.mem.read64(st.hpa + 8) & A.PHYS_IS_RUNNING))


def test_non_strict_preemption_keeps_both_isrunning_bits():
    """svm_vcpu_put() as posted: ``if (avic_doorbell_strict) { __avic_vcpu_put(); __nested_avic_put(); }``
    — with doorbell_strict = false a preempted L1 vCPU keeps IsRunning = 1 in its own entry as
    well as in the shadow entries naming it; strict clears both."""
    assert _preempt_put(True) == (False, False)
    assert _preempt_put(False) == (True, True)


# -- shadow_variant = "rfc-v3": the posted patches exactly ---------------------------------------
def _variant(v: str) -> str:
    return f'shadow_variant = "{v}"'


def test_rfc_v3_never_syncs_the_entry_at_max_index():
    """A modern L1 programs MAX_INDEX = its highest APIC ID (avic_get_max_physical_id); patch 13
    shadows ``avic_physical_id & 0xFF`` = MAX_INDEX entries, so the highest L2 vCPU's shadow entry
    stays invalid: each IPI to it exits AVIC_INCOMPLETE_IPI ID 2 (invalid target), L0 reflects it
    and L1's KVM emulates the IPI. navic shadows MAX_INDEX + 1 entries: no exit at all."""
    n = 10
    fixed = traced(pingpong("shadow", n=n, l0=_variant("navic")), watch=check_shadow)
    posted = traced(pingpong("shadow", n=n, l0=_variant("rfc-v3")), watch=check_shadow)
    for t in (fixed, posted):
        assert t.result["violations"] == [] and t.log["bad"] == []
        assert t.got("l2.1", 0x40) == n and t.got("l2.0", 0x41) == n
        assert {v.vmcb.max_index for v in t.kvm2.vcpus} == {1}     # L1: MAX_INDEX = highest ID
    assert _only_table(fixed).nentries == 2 and _only_table(posted).nentries == 1
    st = _only_table(posted)
    assert posted.kvm.host.mem.read64(st.hpa + 8) == 0             # entry 1: never filled
    assert INCOMPLETE_IPI not in fixed.exits("l1") and INCOMPLETE_IPI not in fixed.exits("l0_l2")
    reflected = posted.nested_vmexits(INCOMPLETE_IPI)
    assert len(reflected) == posted.exits("l1")[INCOMPLETE_IPI] == n
    assert {failure(e) for e in reflected} == {(A.AVIC_IPI_FAILURE_INVALID_TARGET, 1)}


def test_rfc_v3_broadcast_silently_skips_the_last_vcpu():
    """Worse for a broadcast: hardware skips invalid entries without an exit (APM 15.29.6.1), so
    the L2 vCPU at MAX_INDEX never gets the interrupt — the oracle reports it lost."""
    progs = [prog("l2.0", ['{ op = "sti" }', '{ op = "compute", cycles = 200000 }',
                           '{ op = "ipi", shorthand = "others", vector = 0x40 }'])]
    progs += [prog(f"l2.{i}", ['{ op = "sti" }', '{ op = "wait", vector = 0x40, how = "spin" }']) for i in (1, 2)]
    runs = {v: traced(scenario(progs, design="shadow", l1_vcpus=3, l2_vcpus=3, l0=_variant(v)))
            for v in ("navic", "rfc-v3")}
    fixed, posted = runs["navic"], runs["rfc-v3"]
    assert fixed.result["violations"] == []
    assert fixed.got("l2.1", 0x40) == fixed.got("l2.2", 0x40) == 1
    assert posted.got("l2.1", 0x40) == 1 and posted.got("l2.2", 0x40) == 0
    (lost,) = posted.result["violations"]
    assert (lost["kind"], lost["cpu"], lost["vector"]) == ("lost", "l2.2", 0x40)
    assert INCOMPLETE_IPI not in posted.exits("l1") and INCOMPLETE_IPI not in posted.exits("l0_l2")


def _logical_setup(dfr: int, entries: dict[int, int]):
    t = traced(pingpong("shadow", n=2))
    design = t.design
    l1mem = design.core.l1mem
    vmcb12 = t.kvm2.vcpus[0].vmcb
    l1mem.write32(vmcb12.backing_page_hpa + 0xE0, dfr)
    for i in range(64):
        l1mem.write32(vmcb12.logical_table_hpa + 4 * i, 0)
    for li, pid in entries.items():
        l1mem.write32(vmcb12.logical_table_hpa + 4 * li, A.log_entry(pid))
    return design, vmcb12


def test_rfc_v3_cluster_decode_dest_and_0x3c():
    """Cluster 1, member bit 1 (dest 0x12) is logical index 4 * 1 + 1 = 5 (APM 15.29.3.2); the
    posted decode computes 0x10 | 1 = 17 (and reads it as a u64 entry): L0 finds no target, so an
    ID 1 that L1 must see is dropped."""
    design, vmcb12 = _logical_setup(SH.APIC_DFR_CLUSTER, {5: 1})
    assert design._logical_destinations(vmcb12, 0x12) == [(5, 1)]
    design.rfc_v3 = True
    assert design._logical_destinations(vmcb12, 0x12) == []
    assert design._logical_destinations(vmcb12, 0x41) == []          # "if (dest >= 0x40) return"


def test_rfc_v3_reads_the_logical_table_as_u64_entries():
    """Flat, dest bit 1: entry 1. The posted code reads ``((u64 *)table)[1]`` = 32-bit entry 2."""
    design, vmcb12 = _logical_setup(0xFFFFFFFF, {1: 1, 2: 0})
    assert design._logical_destinations(vmcb12, 0x02) == [(1, 1)]
    design.rfc_v3 = True
    assert design._logical_destinations(vmcb12, 0x02) == [(1, 0)]   # entry 2's guest physical ID


def _finish(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_rfc_v3_reports_the_last_logical_index_after_the_first_not_running_one():
    """Patch 16's logical loop sets ``*index = logical_index`` on every iteration once a
    not-running target was found, so the index L1 sees is the last logical entry addressed; navic
    (and hardware, APM 15.29.6.1) reports the first not-running one."""
    design, vmcb12 = _logical_setup(0xFFFFFFFF, {0: 1, 1: 0, 2: 0})
    t_vcpu = next(v for v in design.kvm.vcpus if getattr(v, "shadow_table", None) is not None)
    st = t_vcpu.shadow_table
    st.gentries[1] = A.phys_entry(0x1000, running=False)                        # L1: not running
    st.gentries[0] = A.phys_entry(0x2000, host_id=t_vcpu.vcpu_id, running=True)  # runs here
    lo, hi = (1 << 11) | 0x40, 0b11 << 24
    info2 = A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING << 32
    args = (t_vcpu, V.SVM_EXIT_AVIC_INCOMPLETE_IPI, (hi << 32) | lo, info2)
    assert _finish(design.on_avic_exit(*args))[3] == info2 | 0          # logical entry 0 -> L2 ID 1
    design.rfc_v3 = True                    # u64 reads: index 0 -> entry 0 (ID 1), index 1 -> entry 2 (ID 0)
    assert _finish(design.on_avic_exit(*args))[3] == info2 | 1
