"""KVM at L0 on SVM/AVIC: the single-level rows of digest §9.3, end to end.

Every test runs a scenario through the whole stack (guest program → silicon → KVM) and asserts the
exact #VMEXIT codes and EXITINFO fields KVM saw (decoded from the ``kvm_exit`` trace the way
``avic_incomplete_ipi_interception`` / ``avic_unaccelerated_access_interception`` decode them), what
the hardware had already done when KVM got control, and the deliveries that resulted. Each traced run
also checks invariants 1 and 2 of digest §9.2 on the real physical APIC ID table (see _kvm_util).
"""

from __future__ import annotations

import pytest
from _kvm_util import prog, scenario, snoop_incomplete_ipi, traced

from navic.hw import avic as A
from navic.hw import vmcb as V

STI = '{ op = "sti" }'
VEC = 0x40
LEVEL_BIT = 1 << 14  # the ICR level bit the guest kernel always sets for fixed IPIs


def spin(vec: int = VEC, count: int = 1) -> list[str]:
    return [STI, f'{{ op = "wait", vector = {vec:#x}, count = {count}, how = "spin" }}']


def hlt(vec: int = VEC, count: int = 1) -> list[str]:
    return [STI, f'{{ op = "wait", vector = {vec:#x}, count = {count}, how = "hlt" }}']


def after(cycles: int, *ops: str) -> list[str]:
    return [STI, f'{{ op = "compute", cycles = {cycles} }}', *ops]


def icr_hi(dest: int, apic: str) -> int:
    """EXITINFO1[63:32]: ICR high as written — xAPIC: destination in bits 31:24; x2APIC: 32 bits."""
    return dest << 24 if apic == "xapic" else dest


def clean(t) -> None:
    """Nothing went wrong in the run: no oracle violations, no §9.2 table-invariant breaks, no guest
    faults."""
    assert t.result["violations"] == []
    assert t.ir_violations == []
    assert t.result["errors"] == []


# =====================================================================================================
# Fixed physical unicast to a running / preempted / blocked target, enable_ipiv on and off
# =====================================================================================================
def _unicast(state: str, ipiv: str, apic: str) -> tuple[str, int]:
    """(scenario, target vCPU). The target is l1.1 (running: spin-waits on its own pCPU; blocked:
    halts with halt polling off), or l1.2 sharing pCPU 0 with a busy l1.0 under a 5 µs time slice
    (preempted: runnable but descheduled by L0)."""
    l0 = f"ipiv = {ipiv}\nhalt_poll_ns = 0\n"
    if state == "preempted":
        progs = [prog(0, [STI, '{ op = "repeat", times = 200, ops = [ { op = "compute", cycles = 1000 } ] }']),
                 prog(1, after(40000, '{ op = "ipi", to = 2, vector = 0x40 }')),
                 prog(2, spin())]
        return scenario(progs, apic=apic, vcpus=3, pcpus=2, l0=l0 + "timeslice_us = 5\n"), 2
    progs = [prog(0, after(20000, '{ op = "ipi", to = 1, vector = 0x40 }')),
             prog(1, spin() if state == "running" else hlt())]
    return scenario(progs, apic=apic, l0=l0), 1


@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
@pytest.mark.parametrize("ipiv", ["true", "false"])
def test_unicast_to_running_target(monkeypatch, ipiv, apic):
    snaps = snoop_incomplete_ipi(monkeypatch)
    text, tgt = _unicast("running", ipiv, apic)
    t = traced(text, monkeypatch=monkeypatch)
    clean(t)
    assert t.got() == [("l1.1", VEC, "fixed")]
    assert t.result["deliveries"][0]["sent_by"] == "l1.0"
    if ipiv == "true":
        # Fully accelerated: IRR set + doorbell by the silicon, no exit at all on the sender.
        assert t.busy_exits("l1.0") == []
        assert t.kvm.vendor.avic.enable_ipiv
        assert t.counter("doorbells_received") == 1
        assert [e.fields["apicid"] for e in t.ev("kvm_avic_doorbell")] == [1]   # l1.1's pCPU
    else:
        # IsRunning is never exposed: ID 1 with the target's index, IRR already set, then KVM's
        # avic_kick_target_vcpus rings the doorbell itself (the target is IN_GUEST_MODE).
        assert t.incomplete_ipis("l1.0") == [(VEC | LEVEL_BIT, icr_hi(1, apic),
                                              A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 1)]
        (_, snap), = snaps
        assert VEC in snap["l1.1"].irr and snap["l1.1"].in_guest
        assert len(t.ev("kvm_avic_doorbell")) == 1
        assert t.ev("kvm_vcpu_wakeup") == []
    assert t.counter("emulated_ipis") == 0          # never re-sent by software
    assert t.ev("kvm_apic_accept_irq") == []        # ID 1 handling never sets IRR again (§9.2 #4)


@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
@pytest.mark.parametrize("ipiv", ["true", "false"])
def test_unicast_to_blocked_target_exits_id1_and_wakes_it(monkeypatch, ipiv, apic):
    snaps = snoop_incomplete_ipi(monkeypatch)
    text, _ = _unicast("blocked", ipiv, apic)
    t = traced(text, monkeypatch=monkeypatch)
    clean(t)
    assert t.incomplete_ipis("l1.0") == [(VEC | LEVEL_BIT, icr_hi(1, apic),
                                          A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 1)]
    (sender, snap), = snaps
    assert sender == "l1.0"
    assert snap["l1.1"].blocking and not snap["l1.1"].loaded
    assert snap["l1.1"].irr == {VEC}                   # hardware set IRR before the exit
    exit_t = t.exits("avic_incomplete_ipi")[0].t
    wake = t.ev("kvm_vcpu_wakeup", "l1.1")
    assert len(wake) == 1 and wake[0].t > exit_t        # KVM woke it after the exit
    assert t.got() == [("l1.1", VEC, "fixed")]
    assert t.counter("emulated_ipis") == 0 and t.ev("kvm_apic_accept_irq") == []


@pytest.mark.parametrize("ipiv", ["true", "false"])
def test_unicast_to_preempted_target_exits_id1_and_waits_for_schedule_in(monkeypatch, ipiv):
    snaps = snoop_incomplete_ipi(monkeypatch)
    text, tgt = _unicast("preempted", ipiv, "x2apic")
    t = traced(text, monkeypatch=monkeypatch)
    clean(t)
    assert t.incomplete_ipis("l1.1") == [(VEC | LEVEL_BIT, 2, A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 2)]
    (_, snap), = snaps
    tg = snap["l1.2"]
    assert tg.preempted and not tg.loaded and not tg.blocking and tg.irr == {VEC}
    assert t.ev("kvm_vcpu_wakeup") == []                # not blocked: nothing to wake
    exit_t = t.exits("avic_incomplete_ipi")[0].t
    loads = [e.t for e in t.ev("navic_avic_vcpu_load", "l1.2") if e.t > exit_t]
    (d,) = t.result["deliveries"]
    assert (d["cpu"], d["vector"], d["sent_by"]) == ("l1.2", VEC, "l1.1")
    assert loads and d["t"] > loads[0]                  # taken at the VMRUN after schedule-in
    assert t.counter("preemptions") >= 1


# =====================================================================================================
# Broadcast: invalid entries skipped silently, not-running entries -> ID 1 (IRR already set)
# =====================================================================================================
@pytest.mark.parametrize("apic, bcast", [("xapic", 0xFF), ("x2apic", 0xFFFFFFFF)])
def test_broadcast_skips_invalid_entry_without_exit(monkeypatch, apic, bcast):
    # apic_ids [0, 2, 3]: physical-table entry 1 is invalid; every existing vCPU is running.
    progs = [prog(0, after(20000, f'{{ op = "ipi", dest = {bcast:#x}, vector = 0x50 }}')),
             prog(1, spin(0x50)), prog(2, spin(0x50))]
    t = traced(scenario(progs, apic=apic, vcpus=3, l1="apic_ids = [0, 2, 3]"), monkeypatch=monkeypatch)
    clean(t)
    av = t.kvm.vendor.avic
    assert not t.kvm.mem.read64(av.physical_entry_hpa(1)) & A.PHYS_VALID
    assert t.busy_exits("l1.0") == []                   # no ID 2 for the invalid entry
    assert t.got() == [("l1.0", 0x50, "fixed"), ("l1.1", 0x50, "fixed"), ("l1.2", 0x50, "fixed")]


@pytest.mark.parametrize("apic, bcast", [("xapic", 0xFF), ("x2apic", 0xFFFFFFFF)])
def test_broadcast_with_not_running_target_exits_id1_after_setting_all_irrs(monkeypatch, apic, bcast):
    snaps = snoop_incomplete_ipi(monkeypatch)
    progs = [prog(0, after(20000, f'{{ op = "ipi", dest = {bcast:#x}, vector = 0x50 }}')),
             prog(1, hlt(0x50)), prog(2, spin(0x50))]
    t = traced(scenario(progs, apic=apic, vcpus=3, l1="apic_ids = [0, 2, 3]", l0="halt_poll_ns = 0"),
               monkeypatch=monkeypatch)
    clean(t)
    # ID 1 names the blocked vCPU's physical index (2), never the invalid entry 1.
    assert t.incomplete_ipis("l1.0") == [(0x50 | LEVEL_BIT, icr_hi(bcast if apic == "x2apic" else 0xFF, apic),
                                          A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 2)]
    (_, snap), = snaps
    # Hardware delivered to every valid entry before the exit (running or not).
    assert snap["l1.1"].blocking and snap["l1.1"].irr == {0x50}
    assert 0x50 in snap["l1.0"].irr                     # the sender itself (it is in KVM now)
    # l1.2 was running: its doorbell was already taken in guest mode before KVM even looked.
    (ipi_ev,) = t.ev("kvm_avic_incomplete_ipi")
    (d2,) = [d for d in t.result["deliveries"] if d["cpu"] == "l1.2"]
    assert 0x50 in snap["l1.2"].irr or d2["t"] < ipi_ev.t
    assert [e.vcpu for e in t.ev("kvm_vcpu_wakeup")] == ["l1.1"]
    assert t.got() == [("l1.0", 0x50, "fixed"), ("l1.1", 0x50, "fixed"), ("l1.2", 0x50, "fixed")]
    assert t.counter("emulated_ipis") == 0


@pytest.mark.parametrize("sh, cpus", [("all", [0, 1, 2]), ("others", [1, 2])])
def test_shorthand_broadcast_with_blocked_target(monkeypatch, sh, cpus):
    progs = [prog(0, after(20000, f'{{ op = "ipi", shorthand = "{sh}", vector = 0x50 }}')),
             prog(1, hlt(0x50)), prog(2, spin(0x50))]
    t = traced(scenario(progs, vcpus=3, l0="halt_poll_ns = 0"), monkeypatch=monkeypatch)
    clean(t)
    sh_bits = {"all": 2, "others": 3}[sh] << 18
    assert t.incomplete_ipis("l1.0") == [(0x50 | LEVEL_BIT | sh_bits, 0, A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 1)]
    assert t.got() == [(f"l1.{i}", 0x50, "fixed") for i in cpus]


# =====================================================================================================
# Logical multicast (xAVIC): an invalid logical entry fails the whole IPI with ID 2, KVM emulates it
# =====================================================================================================
def _logical(dest: int, cluster: bool) -> str:
    dfr = [f'{{ op = "write", reg = "DFR", value = {0x0FFFFFFF:#x} }}'] if cluster else []
    ldr = (lambda i: (0x10 | 1 << (i - 1)) << 24) if cluster else (lambda i: 1 << (i + 24))
    progs = [prog(0, [STI, *dfr, '{ op = "compute", cycles = 20000 }',
                      f'{{ op = "ipi", dest = {dest:#x}, dest_mode = "logical", vector = 0x60 }}'])]
    for i in (1, 2):
        progs.append(prog(i, [STI, *dfr, f'{{ op = "write", reg = "LDR", value = {ldr(i):#x} }}',
                              '{ op = "wait", vector = 0x60, how = "spin" }']))
    return scenario(progs, apic="xapic", vcpus=3)


@pytest.mark.parametrize("cluster, dest, bad_index", [
    (False, 0b0110, None), (False, 0b1110, 3),      # flat: bit 3 has no vCPU -> logical index 3
    (True, 0x13, None), (True, 0x17, 6),            # cluster 1, member bit 2 unowned -> 4*1 + 2
])
def test_logical_multicast(monkeypatch, cluster, dest, bad_index):
    snaps = snoop_incomplete_ipi(monkeypatch)
    t = traced(_logical(dest, cluster), monkeypatch=monkeypatch)
    clean(t)
    if bad_index is None:
        assert t.exits("avic_incomplete_ipi") == []     # accelerated through the logical table
        assert t.counter("emulated_ipis") == 0
    else:
        assert t.incomplete_ipis("l1.0") == [(0x60 | LEVEL_BIT | 1 << 11, dest << 24,
                                              A.AVIC_IPI_FAILURE_INVALID_TARGET, bad_index)]
        (_, snap), = snaps
        assert all(not s.irr for s in snap.values())    # ID 2: hardware delivered nothing
        assert t.counter("emulated_ipis") == 1          # KVM emulates the whole IPI
    # Either way exactly the two vCPUs whose logical IDs match get it, once.
    assert t.got() == [("l1.1", 0x60, "fixed"), ("l1.2", 0x60, "fixed")]


# =====================================================================================================
# ID 0 (level / NMI / INIT: emulated) and vector < 16 (ID 4 on zen4, dropped silently on zen2)
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
@pytest.mark.parametrize("ipi, icrl, want", [
    ('{ op = "ipi", to = 1, vector = 0x70, trigger = "level" }', 0x70 | LEVEL_BIT | 1 << 15, ("l1.1", 0x70, "fixed")),
    ('{ op = "ipi", to = 1, mode = "nmi" }', 4 << 8 | LEVEL_BIT, ("l1.1", 2, "nmi")),
    ('{ op = "ipi", to = 1, mode = "init", trigger = "level" }', 5 << 8 | LEVEL_BIT | 1 << 15, ("l1.1", 0, "init")),
])
def test_non_fixed_edge_ipis_exit_id0_and_are_emulated(monkeypatch, apic, ipi, icrl, want):
    snaps = snoop_incomplete_ipi(monkeypatch)
    tgt = spin(want[1]) if want[2] != "init" else [STI, '{ op = "compute", cycles = 100000 }']
    t = traced(scenario([prog(0, after(20000, ipi)), prog(1, tgt)], apic=apic), monkeypatch=monkeypatch)
    clean(t)
    assert t.incomplete_ipis("l1.0") == [(icrl, icr_hi(1, apic), A.AVIC_IPI_FAILURE_INVALID_INT_TYPE, 0)]
    (_, snap), = snaps
    assert not snap["l1.1"].irr                         # nothing delivered by hardware
    assert t.counter("emulated_ipis") == 1
    assert t.got() == [want]


@pytest.mark.parametrize("cpu, l0, exits", [
    ("zen4", "", [(0x4005, 1 << 24, A.AVIC_IPI_FAILURE_INVALID_IPI_VECTOR, 0)]),
    ("zen3", "force_avic = true", [(0x4005, 1 << 24, A.AVIC_IPI_FAILURE_INVALID_IPI_VECTOR, 0)]),
    ("zen2", "", []),                                   # Zen2: dropped, no exit
])
def test_vector_below_16(monkeypatch, cpu, l0, exits):
    progs = [prog(0, after(20000, '{ op = "ipi", to = 1, vector = 5 }', '{ op = "ipi", to = 1, vector = 0x41 }')),
             prog(1, spin(0x41))]
    t = traced(scenario(progs, cpu=cpu, apic="xapic", l0=l0), monkeypatch=monkeypatch)
    clean(t)
    assert t.incomplete_ipis("l1.0")[: len(exits)] == exits
    assert all(e[2] != A.AVIC_IPI_FAILURE_INVALID_IPI_VECTOR for e in t.incomplete_ipis()[len(exits):])
    # KVM ignores ID 4; on Zen2 the silicon dropped it: either way vector 5 is never delivered or
    # left pending, and the IPI that follows is unaffected.
    assert t.got() == [("l1.1", 0x41, "fixed")]
    assert t.result["apic"]["l1.1"]["irr"] == [0] * 8
    assert t.counter("emulated_ipis") == 0


# =====================================================================================================
# EOI: level -> AVIC_NOACCEL trap carrying the vector; edge -> silent
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_level_eoi_traps_with_vector_edge_eoi_is_silent(monkeypatch, apic):
    progs = [prog(0, after(20000, '{ op = "ipi", to = 1, vector = 0x71 }',
                           '{ op = "compute", cycles = 20000 }',
                           '{ op = "ipi", to = 1, vector = 0x72, trigger = "level" }')),
             prog(1, spin(0x71) + ['{ op = "wait", vector = 0x72, how = "spin" }'])]
    t = traced(scenario(progs, apic=apic), monkeypatch=monkeypatch)
    clean(t)
    assert t.got() == [("l1.1", 0x71, "fixed"), ("l1.1", 0x72, "fixed")]
    # Exactly one EOI exit (the level one): trap, write, offset B0h, EXITINFO2 = the vector.
    assert t.noaccels("l1.1") == [(0xB0, True, 0x72)]
    (e,) = t.exits("avic_unaccelerated_access", "l1.1")
    assert e.fields["info1"] == 1 << 32 | 0xB0 and e.fields["info2"] == 0x72
    (acc,) = t.ev("kvm_avic_unaccelerated_access")
    assert acc.fields["trap"] and acc.fields["write"] and acc.fields["vec"] == 0x72
    assert t.exits(vcpu="l1.1", reason="msr") == []     # no MSR exit either (x2AVIC passes EOI)
    a = t.result["apic"]["l1.1"]
    assert a["isr"] == [0] * 8                          # KVM completed the EOI
    assert t.counter("level_eois") == 1


# =====================================================================================================
# LDR / DFR: the logical table follows the guest
# =====================================================================================================
def test_ldr_change_rewrites_logical_table(monkeypatch):
    snaps = snoop_incomplete_ipi(monkeypatch)
    progs = [prog(0, after(20000, '{ op = "ipi", dest = 2, dest_mode = "logical", vector = 0x61 }',
                           '{ op = "compute", cycles = 20000 }',
                           '{ op = "ipi", dest = 2, dest_mode = "logical", vector = 0x62 }',
                           '{ op = "ipi", dest = 0x20, dest_mode = "logical", vector = 0x63 }')),
             prog(1, [STI, '{ op = "write", reg = "LDR", value = 0x02000000 }',
                      '{ op = "wait", vector = 0x61, how = "spin" }',
                      '{ op = "write", reg = "LDR", value = 0x20000000 }',
                      '{ op = "wait", vector = 0x63, how = "spin" }'])]
    t = traced(scenario(progs, apic="xapic"), monkeypatch=monkeypatch)
    clean(t)
    mem, lt = t.kvm.mem, t.kvm.vendor.avic.logical_table_hpa
    # Two LDR writes, each an AVIC_NOACCEL trap at D0h.
    assert t.noaccels("l1.1") == [(0xD0, True, 0), (0xD0, True, 0)]
    # Final table: old flat index 1 invalid, new index 5 = Valid | guest physical ID 1.
    assert mem.read32(lt + 4 * 1) & A.LOG_VALID == 0
    assert mem.read32(lt + 4 * 5) == A.LOG_VALID | 1
    # 0x61 to the old ID: accelerated. 0x62 after the move: ID 2 at logical index 1, emulated to
    # nobody. 0x63 to the new ID: accelerated.
    assert t.incomplete_ipis("l1.0") == [(0x62 | LEVEL_BIT | 1 << 11, 2 << 24, A.AVIC_IPI_FAILURE_INVALID_TARGET, 1)]
    assert len(snaps) == 1
    assert t.got() == [("l1.1", 0x61, "fixed"), ("l1.1", 0x63, "fixed")]


def test_dfr_change_does_not_write_the_logical_entry(monkeypatch):
    progs = [prog(1, [STI, '{ op = "write", reg = "LDR", value = 0x12000000 }',
                      '{ op = "write", reg = "DFR", value = 0x0FFFFFFF }'])]
    t = traced(scenario(progs, apic="xapic"), monkeypatch=monkeypatch)
    clean(t)
    mem, lt = t.kvm.mem, t.kvm.vendor.avic.logical_table_hpa
    # Flat 0x12 has two bits set: no entry. The DFR write only invalidates (avic_handle_dfr_update):
    # cluster 1 member bit 1 (index 5) stays empty until the LDR changes (test_l0_fidelity).
    assert [mem.read32(lt + 4 * i) for i in range(8)] == [0] * 8


# =====================================================================================================
# APIC ID change (xAPIC): APIC_ID_MODIFIED while the ID differs, AVIC off VM-wide, delivery emulated
# =====================================================================================================
def test_apic_id_change_inhibits_avic_and_delivery_switches_to_emulation(monkeypatch):
    progs = [prog(0, after(20000, '{ op = "ipi", dest = 1, vector = 0x40 }',
                           '{ op = "compute", cycles = 30000 }',
                           '{ op = "ipi", dest = 5, vector = 0x41 }',
                           '{ op = "compute", cycles = 30000 }',
                           '{ op = "ipi", dest = 5, vector = 0x42 }')),
             prog(1, [STI, '{ op = "wait", vector = 0x40 }', '{ op = "write", reg = "ID", value = 0x05000000 }',
                      '{ op = "wait", vector = 0x41 }', '{ op = "wait", vector = 0x42, how = "hlt" }'])]
    t = traced(scenario(progs, apic="xapic", l0="halt_poll_ns = 0"), monkeypatch=monkeypatch)
    clean(t)
    # The ID write is an AVIC_NOACCEL trap at 20h; KVM raises the inhibit right then (it stays: ID 5).
    (idw,) = t.exits("avic_unaccelerated_access", "l1.1")
    assert A.noaccel_decode(idw.fields["info1"], idw.fields["info2"]) == (0x20, True, 0)
    (inh,) = t.result["inhibits"]["APIC_ID_MODIFIED"]
    assert inh[1] is None and inh[0] >= idw.t
    # AVIC is off for every vCPU afterwards: no AVIC enable bit, entries never IsRunning again.
    for v in t.kvm.vcpus:
        assert not v.apicv_active and not v.vmcb.int_ctl & V.AVIC_ENABLE_MASK
    # 0x40 went through AVIC; the later IPIs (to the new ID 5) through the emulated APIC page
    # (NPF on the ICR write) — and still arrive.
    first, *rest = t.result["deliveries"]
    assert (first["vector"], first["t"] < inh[0]) == (0x40, True)
    assert t.got() == [("l1.1", 0x40, "fixed"), ("l1.1", 0x41, "fixed"), ("l1.1", 0x42, "fixed")]
    npf_icr = [e for e in t.exits("npf", "l1.0") if e.fields["info2"] == 0xFEE00300]
    assert len(npf_icr) == 2 and t.counter("emulated_ipis") == 2
    assert t.exits("avic_incomplete_ipi") == []


# =====================================================================================================
# x2APIC guests: x2AVIC (zen4) vs hybrid AVIC (zen2, no x2AVIC)
# =====================================================================================================
def _x2_pingpong(cpu: str, n: int = 10) -> str:
    progs = [prog(0, [STI, f'{{ op = "repeat", times = {n}, ops = [ {{ op = "write", reg = "TPR", value = 0x10 }}, '
                           '{ op = "ipi", to = 1, vector = 0x40 }, { op = "wait", vector = 0x41, how = "spin" } ] }']),
             prog(1, spin(0x40, n), {0x40: '{ op = "ipi", to = 0, vector = 0x41 }, { op = "eoi" }'})]
    return scenario(progs, cpu=cpu, apic="x2apic")


def test_x2apic_guest_on_zen4_has_no_icr_eoi_tpr_exits(monkeypatch):
    t = traced(_x2_pingpong("zen4"), monkeypatch=monkeypatch)
    clean(t)
    assert len(t.result["deliveries"]) == 20
    for v in t.kvm.vcpus:
        assert v.vmcb.int_ctl & (V.AVIC_ENABLE_MASK | V.X2APIC_MODE_MASK) == V.AVIC_ENABLE_MASK | V.X2APIC_MODE_MASK
    # Only HLT exits (when a vCPU finishes): ICR, EOI and TPR are all handled by x2AVIC.
    assert set(t.l0_exits()) <= {"hlt"}
    assert t.counter("doorbells_received") >= 20 and t.counter("emulated_ipis") == 0


def test_x2apic_guest_on_zen2_is_hybrid_msr_exits_but_doorbell_delivery(monkeypatch):
    n = 10
    t = traced(_x2_pingpong("zen2", n), monkeypatch=monkeypatch)
    clean(t)
    assert len(t.result["deliveries"]) == 2 * n
    for v in t.kvm.vcpus:
        assert v.apicv_active
        assert v.vmcb.int_ctl & (V.AVIC_ENABLE_MASK | V.X2APIC_MODE_MASK) == V.AVIC_ENABLE_MASK
    # Every x2APIC MSR write exits (TPR + ICR + EOI on l1.0, ICR + EOI on l1.1 per round) ...
    assert t.l0_exits()["msr"] == 5 * n
    assert t.exits("avic_incomplete_ipi") == [] and t.exits("avic_unaccelerated_access") == []
    # ... KVM emulates the ICR and delivers through the backing page: IRR + doorbell (no EVENTINJ).
    assert t.counter("emulated_ipis") == 2 * n
    assert len(t.ev("kvm_apic_accept_irq")) == 2 * n
    assert t.counter("doorbells_sent") >= 1


# =====================================================================================================
# Big VMs: PHYSICAL_ID_TOO_BIG (xAPIC, 300 vCPUs) and 4096 vCPUs on x2AVIC_EXT
# =====================================================================================================
def test_300_vcpus_xapic_without_x2avic_is_physical_id_too_big(monkeypatch):
    progs = [prog(0, after(20000, '{ op = "ipi", to = 1, vector = 0x40 }', '{ op = "ipi", to = 254, vector = 0x41 }')),
             prog(1, spin(0x40)), prog(254, spin(0x41))]
    t = traced(scenario(progs, cpu="zen2", apic="xapic", vcpus=300, pcpus=8), monkeypatch=monkeypatch)
    clean(t)
    assert t.result["inhibits"]["PHYSICAL_ID_TOO_BIG"] == [[0, None]]
    # APICv is off VM-wide, from creation: no vCPU ever had AVIC enabled or an IsRunning entry.
    for v in t.kvm.vcpus:
        assert not v.apicv_active and not v.vmcb.int_ctl & V.AVIC_ENABLE_MASK
    assert t.kvm.vendor.avic.max_physical_id(False) == A.AVIC_MAX_PHYSICAL_ID   # 254 programmable
    assert not any(e & A.PHYS_IS_RUNNING for _, _, e in t.real_writes)
    assert t.exits("avic_incomplete_ipi") == [] and t.exits("avic_unaccelerated_access") == []
    # IPIs are emulated (ICR writes through the MMIO path) and still delivered.
    assert t.counter("emulated_ipis") == 2
    assert ("l1.1", 0x40, "fixed") in t.got() and ("l1.254", 0x41, "fixed") in t.got()


def test_300_vcpus_xapic_on_x2avic_is_not_too_big():
    """KVM only raises PHYSICAL_ID_TOO_BIG above the x2AVIC limit when x2AVIC is enabled (avic.c
    avic_init_backing_page); 300 xAPIC vCPUs on zen4 alias instead (xAPIC IDs are 8 bits)."""
    from navic.runner import run_scenario
    from navic.scenario import loads_scenario

    r = run_scenario(loads_scenario(scenario([], cpu="zen4", apic="xapic", vcpus=300, pcpus=2,
                                             max_time_us=5), "t.toml"))
    assert "PHYSICAL_ID_TOO_BIG" not in r["inhibits"]
    assert "PHYSICAL_ID_ALIASED" in r["inhibits"]


def test_4096_vcpus_x2avic_ext_ipi_to_last_vcpu_is_accelerated(monkeypatch):
    progs = [prog(0, after(20000, '{ op = "ipi", to = 4095, vector = 0x40 }')), prog(4095, spin())]
    t = traced(scenario(progs, cpu="zen5", vcpus=4096, pcpus=4096, max_time_us=30),
               monkeypatch=monkeypatch, check_ir=False)
    assert t.result["violations"] == [] and t.result["errors"] == []
    assert t.result["inhibits"] == {}
    v0, vl = t.kvm.vcpus[0], t.kvm.vcpus[4095]
    for v in (v0, vl):
        assert v.apicv_active
        assert v.vmcb.int_ctl & V.X2APIC_MODE_MASK
        assert v.vmcb.max_index == 4095                 # 12-bit MAX_INDEX, 8 table pages
        assert V.vmrun_checks(v.vmcb, t.kvm.vendor.features) is None
    assert A.phys_table_pages(v0.vmcb.max_index) == 8
    # VMRUN accepted it: no VMEXIT_INVALID, every vCPU entered the guest.
    assert "invalid" not in t.l0_exits() and t.counter("vmruns") >= 4096
    # The IPI from vCPU 0 to APIC ID 4095 (entry in the 8th page) was fully accelerated.
    assert t.busy_exits("l1.0") == []
    assert t.got() == [("l1.4095", 0x40, "fixed")]
    e = t.kvm.mem.read64(t.kvm.vendor.avic.physical_entry_hpa(4095))
    assert e & A.PHYS_VALID and A.phys_entry_backing(e) == vl.backing_hpa
    assert t.kvm.host.pcpus[vl.home].apic_id == 4095
    assert [ev.fields["apicid"] for ev in t.ev("kvm_avic_doorbell")] == [4095]


# =====================================================================================================
# Device interrupts via the IOMMU: running target -> doorbell, blocked target -> GA log + wake-up
# =====================================================================================================
@pytest.mark.parametrize("how", ["spin", "hlt"])
def test_device_interrupt_doorbell_vs_ga_log(monkeypatch, how):
    text = scenario([prog(1, [STI, f'{{ op = "wait", vector = 0x40, count = 3, how = "{how}" }}'])],
                    l0="halt_poll_ns = 0")
    text += '[[device]]\nvector = 0x40\ntarget = "l1.1"\nperiod_us = 10\ncount = 3\nstart_us = 5\n'
    t = traced(text, monkeypatch=monkeypatch)
    clean(t)
    assert t.got() == [("l1.1", 0x40, "device")] * 3
    assert t.exits(vcpu="l1.1", reason="interrupt") == []   # never via a host interrupt
    if how == "spin":
        assert [e.fields["apicid"] for e in t.ev("kvm_avic_doorbell")] == [1] * 3
        assert t.ev("kvm_avic_ga_log") == []
    else:
        assert [e.fields["vcpu_idx"] for e in t.ev("kvm_avic_ga_log")] == [1] * 3
        assert len(t.ev("kvm_vcpu_wakeup", "l1.1")) == 3
        assert t.ev("kvm_avic_doorbell") == []


# =====================================================================================================
# INIT / SIPI / SMI: emulated (ID 0), with the same guest-visible outcome as bare metal
# =====================================================================================================
INIT_SIPI_SENDER = after(20000, '{ op = "ipi", to = 1, mode = "init", trigger = "level" }',
                         '{ op = "ipi", to = 1, vector = 0x71 }',          # to a vCPU waiting for SIPI
                         '{ op = "compute", cycles = 20000 }',
                         '{ op = "ipi", to = 1, mode = "sipi", vector = 0x10 }',
                         '{ op = "compute", cycles = 20000 }',
                         '{ op = "ipi", to = 1, vector = 0x70 }')
INIT_SIPI_TARGET = [STI, '{ op = "repeat", times = 100, ops = [ { op = "compute", cycles = 1000 } ] }',
                    '{ op = "wait", vector = 0x70, how = "spin" }']


@pytest.mark.parametrize("l0", ["", "apicv = false"])
def test_init_makes_the_vcpu_wait_for_sipi(monkeypatch, l0):
    text = scenario([prog(0, INIT_SIPI_SENDER), prog(1, INIT_SIPI_TARGET)], apic="xapic", l0=l0, max_time_us=300)
    bare = traced(text.replace('virt = "kvm"', 'virt = "none"'))
    t = traced(text, monkeypatch=monkeypatch)
    clean(t)
    seq = [(d["cpu"], d["vector"], d["kind"]) for d in t.result["deliveries"]]
    # INIT resets the APIC (0x71 is refused: software-disabled), SIPI restarts the program.
    assert seq == [("l1.1", 0, "init"), ("l1.1", 0x10, "sipi"), ("l1.1", 0x70, "fixed")]
    assert seq == [(d["cpu"], d["vector"], d["kind"]) for d in bare.result["deliveries"]]
    init_t, sipi_t = t.result["deliveries"][0]["t"], t.result["deliveries"][1]["t"]
    # Between INIT and SIPI the vCPU never entered the guest (KVM_MP_STATE_INIT_RECEIVED).
    assert not [e for e in t.ev("kvm_entry", "l1.1") if init_t < e.t < sipi_t]
    assert [e for e in t.ev("kvm_vcpu_block", "l1.1") if init_t <= e.t < sipi_t]
    if not l0:
        ids = [(lo >> 8 & 7, fid) for lo, _, fid, _ in t.incomplete_ipis("l1.0") if lo >> 8 & 7]
        assert ids == [(5, 0), (6, 0)]                   # INIT and SIPI: ID 0, emulated


def test_smi_ipi_is_recorded_like_bare_metal(monkeypatch):
    text = scenario([prog(0, after(20000, '{ op = "ipi", to = 1, mode = "smi" }')), prog(1, spin(0x70))],
                    apic="xapic", max_time_us=100)
    t = traced(text, monkeypatch=monkeypatch)
    clean(t)
    assert t.incomplete_ipis("l1.0") == [(2 << 8 | LEVEL_BIT, 1 << 24, A.AVIC_IPI_FAILURE_INVALID_INT_TYPE, 0)]
    assert t.got() == [("l1.1", 0, "smi")] == traced(text.replace('virt = "kvm"', 'virt = "none"')).got()


def test_logical_multicast_to_blocked_target_reports_logical_index(monkeypatch):
    """ID 1 on an xAVIC logical IPI names the *logical* table index of the not-running target
    (APM: "physical or logical table index"); KVM wakes it and the running one gets its doorbell."""
    snaps = snoop_incomplete_ipi(monkeypatch)
    progs = [prog(0, after(20000, '{ op = "ipi", dest = 0x22, dest_mode = "logical", vector = 0x60 }')),
             prog(1, [STI, '{ op = "write", reg = "LDR", value = 0x02000000 }', *spin(0x60)[1:]]),
             prog(2, [STI, '{ op = "write", reg = "LDR", value = 0x20000000 }', *hlt(0x60)[1:]])]
    t = traced(scenario(progs, apic="xapic", vcpus=3, l0="halt_poll_ns = 0"), monkeypatch=monkeypatch)
    clean(t)
    # l1.2: guest physical ID 2, logical ID bit 5 -> flat logical index 5.
    assert t.incomplete_ipis("l1.0") == [(0x60 | LEVEL_BIT | 1 << 11, 0x22 << 24,
                                          A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 5)]
    (_, snap), = snaps
    assert snap["l1.2"].blocking and snap["l1.2"].irr == {0x60}
    assert [e.vcpu for e in t.ev("kvm_vcpu_wakeup")] == ["l1.2"]
    assert t.got() == [("l1.1", 0x60, "fixed"), ("l1.2", 0x60, "fixed")]
    assert t.counter("emulated_ipis") == 0
