"""Design ``shadow`` (Maxim Levitsky's RFC v3; digest §6.2): L0 shadows L1's physical APIC ID table,
tracking L1's writes to it through its NPT, and maps L2 running state onto L0's pCPUs."""

from __future__ import annotations

import pytest
from _nested_util import INCOMPLETE_IPI, check_shadow, failure, pingpong, prog, scenario, traced

from navic.hv.nested import shadow as SH
from navic.hw import avic as A


def _l1_table(t):
    """(L1 table GPA, its ShadowTable) — one table: every L2 vCPU's vmcb12 names the same one."""
    (st,) = t.design.tables.values()
    gpas = {v.vmcb.physical_table_hpa for v in t.kvm2.vcpus}
    assert gpas == {st.gfn << 12}
    return st.gfn << 12, st


def _l1_vcpu_hosting(t, l2_index: int):
    return t.kvm.vcpus[t.kvm2.vcpus[l2_index].home]


def test_tracked_isrunning_write_updates_the_shadow_entry(monkeypatch):
    """L1's KVM sets/clears IsRunning of an L2 vCPU in its table as it loads / blocks it: the
    store hits a write-protected frame → NPF exit at L0 (EXITINFO1 = write|present, EXITINFO2 =
    the entry's GPA) → emulated → the shadow entry follows: IR = 1 with the host APIC ID of the pCPU
    of the L1 vCPU named in the guest entry, IR = 0 after L1 cleared it. The backing page is L1's
    (GPA → HPA through L0's NPT)."""
    seen = []
    orig = SH.ShadowDesign.emulate_store

    def emulate_store(self, vcpu, gpa, size, value):
        orig(self, vcpu, gpa, size, value)
        st = self.tables.get(gpa >> 12)
        if st is not None:
            i = (gpa & 0xFFF) // 8
            pcpu = self.host.pcpus[vcpu.cpu].apic_id if vcpu is not None and vcpu.cpu is not None else None
            seen.append((vcpu.name if vcpu else None, gpa, value, self.host.mem.read64(st.hpa + 8 * i), pcpu))

    monkeypatch.setattr(SH.ShadowDesign, "emulate_store", emulate_store)
    t = traced(pingpong("shadow", n=5, how="hlt", l0="halt_poll_ns = 0"), watch=check_shadow)
    assert t.result["violations"] == [] and t.log["bad"] == []
    base, st = _l1_table(t)
    npf = [e for e in t.ev("kvm_exit") if e.level == "L0" and e.fields["reason"] == "npf"]
    assert len(npf) == t.counter("npf_write_tracking") == t.exits("l0")["npf"] == len(seen) > 4
    for e, (who, gpa, value, shadow, pcpu) in zip(npf, seen, strict=True):
        assert e.vcpu == who and e.fields["info1"] == 0b11 and e.fields["info2"] == gpa
        assert base <= gpa < base + 8 * st.nentries and gpa % 8 == 0
        i = (gpa - base) // 8
        l2 = t.kvm2.vcpus[i]
        assert A.phys_entry_backing(value) == l2.backing_hpa            # L1 GPA in the guest entry
        assert A.phys_entry_backing(shadow) == t.design.core.l1mem.hpa(l2.backing_hpa)   # HPA
        x = _l1_vcpu_hosting(t, i)
        assert who == x.name          # L1's KVM thread of l2.i runs on the L1 vCPU hosting it
        if value & A.PHYS_IS_RUNNING:
            assert A.phys_entry_host_id(value) == x.vcpu_id                 # L1 APIC ID ...
            assert shadow & A.PHYS_IS_RUNNING                                # ... becomes the pCPU's
            assert pcpu is not None and A.phys_entry_host_id(shadow) == pcpu
        else:
            assert not shadow & A.PHYS_IS_RUNNING
    values = [v for _, _, v, _, _ in seen]
    assert any(v & A.PHYS_IS_RUNNING for v in values) and any(not v & A.PHYS_IS_RUNNING for v in values)
    assert t.counter("shadow_invalidations") == 0     # IR-only writes never invalidate
    assert t.log["ir1"]                               # the sampler saw shadow IR = 1 (and checked it)


def _table_after_run():
    t = traced(pingpong("shadow", n=3))
    assert t.result["violations"] == []
    return t


@pytest.mark.parametrize("via", ["emulate_store", "guest_memory"])
def test_backing_pointer_change_invalidates_and_reloads(via):
    """L1 repoints entry 1 at another page: the whole table is invalidated (erase + re-sync from
    L1's table) and the shadow entry now holds the new page's HPA."""
    t = _table_after_run()
    design = t.design
    l1mem = design.core.l1mem
    base, st = _l1_table(t)
    before = [t.kvm.host.mem.read64(st.hpa + 8 * i) for i in range(st.nentries)]
    old = l1mem.read64(base + 8)
    new_page = l1mem.alloc(1)
    new = (old & ~A.PHYS_BACKING_MASK) | new_page
    counters = t.run.recorder.counters
    n0, w0 = counters.get("shadow_invalidations", 0), counters.get("npf_write_tracking", 0)
    if via == "emulate_store":
        design.emulate_store(None, base + 8, 8, new)
    else:
        l1mem.write64(base + 8, new)      # a write-protected frame: handed to the tracking hook
    rec = t.run.recorder.counters
    assert rec["shadow_invalidations"] == n0 + 1
    assert rec.get("npf_write_tracking", 0) == w0        # emulated outside L1 code: no NPF exit
    assert l1mem.read64(base + 8) == new                 # the store itself was performed
    after = [t.kvm.host.mem.read64(st.hpa + 8 * i) for i in range(st.nentries)]
    assert A.phys_entry_backing(after[1]) == l1mem.hpa(new_page) != A.phys_entry_backing(before[1])
    assert after[1] & A.PHYS_VALID
    assert after[0] == before[0]                         # re-synced from L1's unchanged entry 0
    assert st.gentries[1] == new and st.nentries == len(before)


def test_isrunning_only_change_updates_in_place():
    """The contrast: flipping only IsRunning / host ID is an in-place update, no invalidation."""
    t = _table_after_run()
    design = t.design
    l1mem = design.core.l1mem
    base, st = _l1_table(t)
    x = t.kvm.vcpus[1]
    old = l1mem.read64(base + 8)
    n0 = t.run.recorder.counters.get("shadow_invalidations", 0)
    design.emulate_store(None, base + 8, 8, old & ~A.PHYS_IS_RUNNING)
    assert not t.kvm.host.mem.read64(st.hpa + 8) & A.PHYS_IS_RUNNING
    # Pretend L1 vCPU 1 is loaded on pCPU 3 and L1 says the L2 vCPU runs there.
    x.cpu, x.blocking, x.preempted = 3, False, False
    design.emulate_store(None, base + 8, 8, A.phys_entry_with(old, running=True, host_id=x.vcpu_id))
    s = t.kvm.host.mem.read64(st.hpa + 8)
    assert s & A.PHYS_IS_RUNNING and A.phys_entry_host_id(s) == t.kvm.host.pcpus[3].apic_id
    assert t.run.recorder.counters.get("shadow_invalidations", 0) == n0


def test_load_put_hooks_map_l1_vcpu_state_onto_shadow_isrunning():
    """__nested_avic_load / __nested_avic_put (patches 12, 18) and invariant (6): with L1's entry
    saying "runs on L1 vCPU 1", shadow IR = 1 exactly while L0 has that L1 vCPU loaded and not
    blocking; strict doorbells clear it on preemption too, non-strict only on blocking."""
    t = _table_after_run()
    design = t.design
    l1mem = design.core.l1mem
    base, st = _l1_table(t)
    mem = t.kvm.host.mem
    x = t.kvm.vcpus[1]
    ir = lambda: bool(mem.read64(st.hpa + 8) & A.PHYS_IS_RUNNING)   # noqa: E731
    x.cpu, x.blocking, x.preempted = 2, False, False
    design.emulate_store(None, base + 8, 8, A.phys_entry_with(l1mem.read64(base + 8), running=True,
                                                              host_id=x.vcpu_id))
    assert ir() and A.phys_entry_host_id(mem.read64(st.hpa + 8)) == t.kvm.host.pcpus[2].apic_id
    x.blocking = True
    design.vcpu_put(x, blocking=True)
    assert not ir()
    design.emulate_store(None, base + 8, 8, l1mem.read64(base + 8))   # a re-write while blocking
    assert not ir()
    x.blocking = False
    design.vcpu_load(x, 2)
    assert ir()
    x.preempted = True
    design.vcpu_put(x, blocking=False)                                 # strict: preemption clears
    assert design.strict and not ir()
    x.preempted = False
    design.vcpu_load(x, 2)
    design.strict = False                                              # doorbell_strict = false
    design.vcpu_put(x, blocking=False)
    assert ir()
    design.vcpu_put(x, blocking=True)
    assert not ir()
    # Another L1 vCPU's load/put never touches an entry that does not name it.
    design.vcpu_load(x, 2)
    design.vcpu_put(t.kvm.vcpus[0], blocking=True)
    assert ir()


def test_l0_preempting_l1_vcpu_hides_id1_and_wakes_it():
    """pCPUs < L1 vCPUs: L0 time-slices l1.0 and l1.1 on one pCPU. Putting l1.1 (which hosts l2.1)
    clears the shadow IR of l2.1 although L1's own entry still says it runs; an L2 IPI to it then
    exits ID 1 at L0, which sees guest IR = 1, wakes l1.1 and hides the exit from L1. The sender
    first computes past one L0 time slice so that both L1 vCPUs have started their L2 vCPUs (before
    that, L1's entry for l2.1 legitimately says "not running" and L1 must see the exit)."""
    n = 10
    t = traced(pingpong("shadow", n=n, lead=400000, pcpus=1, l0="timeslice_us = 50", max_time_us=20000),
               watch=check_shadow)
    assert t.result["violations"] == [] and t.log["bad"] == []
    assert t.got("l2.1", 0x40) == n and t.got("l2.0", 0x41) == n
    assert t.counter("preemptions") > 0
    hidden = t.counter("shadow_hidden_id1_wakeups")
    assert hidden >= 2 * n - 1
    exits = t.l0_l2_exits(INCOMPLETE_IPI)
    assert len(exits) == t.exits("l0_l2")[INCOMPLETE_IPI] == hidden
    assert all(failure(e)[0] == 1 for e in exits)
    # L1 never saw one: no reflected AVIC_INCOMPLETE_IPI, L1's KVM handled none.
    assert INCOMPLETE_IPI not in t.exits("l1")
    assert t.nested_vmexits(INCOMPLETE_IPI) == [] and t.ev("kvm_avic_incomplete_ipi") == []


def test_id1_reflected_when_l1_says_not_running():
    """The other half of the ID-1 rule: guest IR = 0 (L1 has not loaded l2.1 yet) → L1 must see
    the exit, with the same ID and index."""
    sender = prog("l2.0", ['{ op = "sti" }', '{ op = "ipi", to = 1, vector = 0x40 }'])
    t = traced(scenario([sender], design="shadow", pcpus=1, l0="timeslice_us = 50"))
    assert t.result["violations"] == []
    (e,) = t.nested_vmexits(INCOMPLETE_IPI)
    assert failure(e) == (1, 1)
    (k,) = t.ev("kvm_avic_incomplete_ipi")
    assert (k.vcpu, k.fields["id"], k.fields["index"]) == ("l2.0", 1, 1)
    assert t.counter("shadow_hidden_id1_wakeups") == 0
    assert t.got("l2.1", 0x40) == 1
