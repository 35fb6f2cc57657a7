"""The AVIC ICR-write algorithm (APM 15.29.6.1, digest §4.1) on hand-built tables: every hardware
row of the digest's §9.3 scenario checklist."""

from __future__ import annotations

import pytest
from _hw_util import Vm, icr, irr_bit
from hypothesis import given, settings
from hypothesis import strategies as st

from navic.apic.registers import APIC_ICR, APIC_ICR2
from navic.hw.avic import (
    AVIC_IPI_FAILURE_INVALID_BACKING_PAGE,
    AVIC_IPI_FAILURE_INVALID_INT_TYPE,
    AVIC_IPI_FAILURE_INVALID_IPI_VECTOR,
    AVIC_IPI_FAILURE_INVALID_TARGET,
    AVIC_IPI_FAILURE_TARGET_NOT_RUNNING,
    AvicExit,
    phys_entry,
    run_to_completion,
)
from navic.hw.errata import Erratum1235
from navic.hw.vmcb import SVM_EXIT_AVIC_INCOMPLETE_IPI
from navic.sim.chooser import Chooser
from navic.sim.engine import Engine

V = 0x40
SH_SELF, SH_ALL, SH_OTHERS = 1, 2, 3


def expect_exit(r: AvicExit | None, failure: int, index: int | None = None) -> None:
    assert isinstance(r, AvicExit), r
    assert r.code == SVM_EXIT_AVIC_INCOMPLETE_IPI == 0x401
    assert r.failure == failure
    if index is not None:
        assert r.index == index


# --- unicast -------------------------------------------------------------------------------------------
def test_unicast_to_running_target_sets_irr_and_doorbells_without_exit():
    vm = Vm(4)
    assert vm.send(0, icr(V), 2) is None
    assert vm.irr_targets(V) == [2]
    assert vm.doorbells == [vm.host[2]]
    assert vm.irr_log == [(vm.pages[2], V, 2)]


def test_unicast_to_not_running_target_sets_irr_then_exits_id1_with_index():
    vm = Vm(4)
    vm.set_entry(3, running=False)
    r = vm.send(1, icr(V), 3)
    expect_exit(r, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 3)
    assert r.info1 == (3 << 24) << 32 | icr(V)  # ICR high (xAPIC dest in 63:56) | ICR low
    assert r.info2 == 1 << 32 | 3
    assert vm.irr_targets(V) == [3]  # delivered before the exit
    assert vm.doorbells == []


def test_icr_value_lands_in_senders_backing_page_trap_semantics():
    vm = Vm(4, x2=True)
    vm.set_entry(2, running=False)
    vm.send(0, icr(V) | 1 << 12, 2)  # BUSY set by the guest is not kept
    p = vm.mem.page(vm.pages[0])
    assert int.from_bytes(p[APIC_ICR : APIC_ICR + 4], "little") == icr(V)
    assert int.from_bytes(p[APIC_ICR2 : APIC_ICR2 + 4], "little") == 2


def test_xavic_icr_high_defaults_to_backing_page_310h():
    vm = Vm(4)
    vm.mem.write32(vm.pages[0] + APIC_ICR2, 2 << 24)
    from navic.hw.avic import run_to_completion as run

    assert run(vm.avic.icr_write(vm.vmcbs[0], 0, vm.host[0], icr(V))) is None
    assert vm.irr_targets(V) == [2]


def test_directed_to_invalid_entry_exits_id2_nothing_delivered():
    vm = Vm(4)
    vm.set_entry(2, valid=False)
    r = vm.send(0, icr(V), 2)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_TARGET, 2)
    assert vm.irr_targets(V) == [] and vm.doorbells == []


def test_directed_beyond_max_index_exits_id2():
    vm = Vm(8, max_index=3)
    r = vm.send(0, icr(V), 5)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_TARGET, 5)
    assert vm.irr_targets(V) == []


def test_directed_to_entry_with_unbacked_page_exits_id3():
    vm = Vm(4)
    vm.mem.free(vm.pages[2])
    r = vm.send(0, icr(V), 2)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_BACKING_PAGE, 2)


# --- broadcast -----------------------------------------------------------------------------------------
def test_broadcast_skips_invalid_entries_silently():
    vm = Vm(6)
    vm.set_entry(1, valid=False)
    vm.set_entry(4, valid=False)
    assert vm.send(0, icr(V), 0xFF) is None
    assert vm.irr_targets(V) == [0, 2, 3, 5]
    assert vm.doorbells == [vm.host[i] for i in (0, 2, 3, 5)]


def test_broadcast_with_not_running_entries_sets_all_irr_then_exits_id1_first_index():
    vm = Vm(6)
    vm.set_entry(4, running=False)
    vm.set_entry(2, running=False)
    vm.set_entry(5, valid=False)
    r = vm.send(0, icr(V, sh=SH_ALL))
    expect_exit(r, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 2)
    assert vm.irr_targets(V) == [0, 1, 2, 3, 4]  # every valid entry, running or not
    assert vm.doorbells == [vm.host[i] for i in (0, 1, 3)]  # only to IR=1 targets


def test_broadcast_all_excluding_self_skips_sender():
    vm = Vm(4)
    assert vm.send(2, icr(V, sh=SH_OTHERS)) is None
    assert vm.irr_targets(V) == [0, 1, 3]


def test_broadcast_respects_max_index():
    vm = Vm(6, max_index=3)
    vm.send(0, icr(V, sh=SH_ALL))
    assert vm.irr_targets(V) == [0, 1, 2, 3]


def test_xavic_dest_ff_is_broadcast_but_x2avic_ff_is_unicast():
    vm = Vm(4)
    vm.send(0, icr(V), 0xFF)
    assert vm.irr_targets(V) == [0, 1, 2, 3]
    vm2 = Vm(300, x2=True)
    assert vm2.send(0, icr(V), 0xFF) is None
    assert vm2.irr_targets(V) == [0xFF]
    vm2.send(1, icr(V + 1), 0xFFFFFFFF)
    assert vm2.irr_targets(V + 1) == list(range(300))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=24), st.data())
def test_broadcast_delivers_exactly_to_valid_entries(flags, data):
    n = len(flags)
    vm = Vm(n)
    for i, (valid, running) in enumerate(flags):
        vm.set_entry(i, valid=valid, running=running)
    src = data.draw(st.integers(0, n - 1))
    sh = data.draw(st.sampled_from([SH_ALL, SH_OTHERS]))
    r = vm.send(src, icr(V, sh=sh))
    expected = [i for i, (valid, _) in enumerate(flags) if valid and not (sh == SH_OTHERS and i == src)]
    assert vm.irr_targets(V) == expected
    assert vm.doorbells == [vm.host[i] for i in expected if flags[i][1]]
    not_running = [i for i in expected if not flags[i][1]]
    if not_running:
        expect_exit(r, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, not_running[0])
    else:
        assert r is None


# --- logical (xAVIC) ---------------------------------------------------------------------------------
def test_logical_flat_multicast_delivers_via_logical_table():
    vm = Vm(4)
    for li, pid in ((0, 3), (1, 2), (2, 1)):
        vm.set_logical(li, pid)
    assert vm.send(0, icr(V, logical=1), 0b011) is None
    assert vm.irr_targets(V) == [2, 3]


def test_logical_flat_multicast_with_invalid_logical_entry_exits_id2_nothing_delivered():
    vm = Vm(4)
    vm.set_logical(0, 1)
    vm.set_logical(1, 2)
    vm.set_logical(2, 3, valid=False)
    r = vm.send(0, icr(V, logical=1), 0b111)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_TARGET, 2)
    assert vm.irr_targets(V) == [] and vm.doorbells == []


def test_logical_cluster_multicast_and_invalid_entry():
    vm = Vm(8, flat=False)
    vm.set_logical(4 * 2 + 0, 5)  # cluster 2, member bit 0
    vm.set_logical(4 * 2 + 3, 6)  # cluster 2, member bit 3
    assert vm.send(0, icr(V, logical=1), 0x29) is None
    assert vm.irr_targets(V) == [5, 6]
    r = vm.send(0, icr(V + 1, logical=1), 0x2B)  # bit 1 of cluster 2 -> index 9: invalid
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_TARGET, 9)
    assert vm.irr_targets(V + 1) == []


def test_logical_cluster_reserved_cluster_f_is_invalid_target():
    vm = Vm(4, flat=False)
    r = vm.send(0, icr(V, logical=1), 0xF1)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_TARGET, 60)


def test_logical_entry_pointing_at_invalid_physical_entry_exits_id2():
    vm = Vm(4)
    vm.set_logical(0, 2)
    vm.set_entry(2, valid=False)
    expect_exit(vm.send(0, icr(V, logical=1), 0b1), AVIC_IPI_FAILURE_INVALID_TARGET, 0)


def test_logical_not_running_reports_logical_index():
    vm = Vm(4)
    vm.set_logical(5, 1)
    vm.set_entry(1, running=False)
    r = vm.send(0, icr(V, logical=1), 1 << 5)
    expect_exit(r, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 5)
    assert vm.irr_targets(V) == [1]


# --- x2AVIC logical ------------------------------------------------------------------------------------
def test_x2avic_logical_derives_targets_without_table():
    vm = Vm(40, x2=True)
    vm.mem.write32(vm.ltable, 0xDEAD)  # the logical table is not used in x2AVIC
    assert vm.send(0, icr(V, logical=1), (1 << 16) | 0b101) is None
    assert vm.irr_targets(V) == [16, 18]
    vm.set_entry(33, valid=False)
    r = vm.send(0, icr(V + 1, logical=1), (2 << 16) | 0b11)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_TARGET, 33)
    assert vm.irr_targets(V + 1) == []


def test_x2avic_4k_table_spans_pages():
    vm = Vm(3001, x2=True, cpu="zen5")
    vm.set_entry(3000, running=False)
    r = vm.send(0, icr(V), 3000)
    expect_exit(r, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 3000)
    assert vm.irr(3000, V)


# --- message types, vectors -----------------------------------------------------------------------------
@pytest.mark.parametrize("dm,trig", [(0, 1), (1, 0), (2, 0), (4, 0), (5, 0), (6, 0), (7, 0)])
def test_non_fixed_or_level_exits_id0_nothing_delivered(dm, trig):
    vm = Vm(4)
    r = vm.send(0, icr(V, dm=dm, trig=trig), 1)
    expect_exit(r, AVIC_IPI_FAILURE_INVALID_INT_TYPE)
    assert vm.irr_targets(V) == [] and vm.doorbells == []


def test_vector_below_16_exits_id4_on_zen4_and_is_dropped_on_zen2():
    vm = Vm(4, cpu="zen4")
    expect_exit(vm.send(0, icr(15), 1), AVIC_IPI_FAILURE_INVALID_IPI_VECTOR)
    assert vm.irr_targets(15) == []
    vm2 = Vm(4, cpu="zen2")
    assert vm2.send(0, icr(15), 1) is None
    assert vm2.irr_targets(15) == [] and vm2.doorbells == []
    assert vm2.avic.stats["dropped_low_vector"] == 1


# --- self ---------------------------------------------------------------------------------------------
def test_self_ipi_sets_own_irr_and_doorbells_self_without_reading_table():
    vm = Vm(2)
    vm.vmcbs[1].physical_table_hpa = 0x7FFF_0000_0000  # unbacked: any table read would raise
    assert vm.send(1, icr(V, sh=SH_SELF)) is None
    assert vm.irr_targets(V) == [1]
    assert vm.doorbells == [vm.host[1]]


# --- atomic steps ----------------------------------------------------------------------------------------
def test_isrunning_is_read_in_a_separate_step_after_the_irr_set():
    vm = Vm(4)
    g = vm.gen(0, icr(V), 2)
    next(g)  # step 1: IRR set
    assert vm.irr(2, V) and vm.doorbells == []
    vm.set_entry(2, running=False)  # software clears IsRunning between the two steps
    r = run_to_completion(g)
    expect_exit(r, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 2)
    assert vm.doorbells == []


def test_broadcast_rereads_isrunning_after_each_irr_step():
    vm = Vm(3)
    g = vm.gen(0, icr(V, sh=SH_ALL))
    next(g)  # IRR set in entry 0
    vm.set_entry(0, running=False)  # cleared before the hardware reads IsRunning of entry 0
    expect_exit(run_to_completion(g), AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 0)
    assert vm.doorbells == [vm.host[1], vm.host[2]]


def test_coarse_mode_has_no_step_boundaries():
    vm = Vm(4, fine_grained=False)
    g = vm.gen(0, icr(V, sh=SH_ALL))
    with pytest.raises(StopIteration):
        next(g)
    assert vm.irr_targets(V) == [0, 1, 2, 3]


# --- erratum 1235 ----------------------------------------------------------------------------------------
class _Force(Chooser):
    def __init__(self, alt: int) -> None:
        self.alt = alt
        self.asked: list[tuple[str, int, list[float] | None]] = []

    def choose(self, label, n, weights=None):
        self.asked.append((label, n, weights))
        return self.alt


def _erratum_vm(alt: int, window: int = 2, p: float = 0.25) -> tuple[Vm, _Force, Engine]:
    ch = _Force(alt)
    eng = Engine(chooser=ch)
    vm = Vm(4, cpu="zen2")
    err = Erratum1235(eng, vm.mem, window=window, p=p)
    vm.avic.erratum = err
    err.track_table(vm.table)
    return vm, ch, eng


def test_erratum_forced_stale_read_doorbells_old_host_and_takes_no_exit():
    vm, ch, eng = _erratum_vm(1)
    vm.set_entry(2, running=False, host_id=vm.host[2])  # KVM keeps the old host ID on put
    vm.mem.write64(vm.table + 16, phys_entry(vm.pages[2], 0, running=False))  # even if it changed
    results = []

    def proc():
        results.append((yield from vm.gen(0, icr(V), 2)))

    eng.spawn(proc(), "sender")
    eng.run()
    assert results == [None]  # no AVIC_INCOMPLETE_IPI
    assert vm.irr(2, V)
    assert vm.doorbells == [vm.host[2]]  # stale doorbell to the former host core
    assert ch.asked == [("erratum1235", 2, [0.75, 0.25])]
    assert vm.avic.stats["stale_reads"] == 1


def test_erratum_not_chosen_gives_correct_exit():
    vm, ch, _ = _erratum_vm(0)
    vm.set_entry(2, running=False)
    expect_exit(vm.send(0, icr(V), 2), AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 2)
    assert vm.doorbells == [] and len(ch.asked) == 1


def test_erratum_window_expires_after_w_evaluations():
    # window W=2: the two hardware IPI evaluations that start after the clear may read stale IR.
    vm, ch, _ = _erratum_vm(1, window=2)
    vm.set_entry(2, running=False)
    vm.send(0, icr(V), 1)  # evaluation 1 after the clear (another target)
    assert vm.send(0, icr(V), 2) is None  # evaluation 2: inside the window, forced stale
    assert len(ch.asked) == 1
    vm2, ch2, _ = _erratum_vm(1, window=2)
    vm2.set_entry(2, running=False)
    for _ in range(2):
        vm2.send(0, icr(V), 1)
    expect_exit(vm2.send(0, icr(V), 2), AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 2)  # evaluation 3
    assert ch2.asked == []


def test_erratum_never_applies_to_entries_that_were_not_cleared_or_were_set_again():
    vm, ch, _ = _erratum_vm(1)
    vm.set_entry(2, running=False, valid=True)
    vm.set_entry(2, running=True)
    vm.set_entry(2, running=False)
    vm.set_entry(2, running=True)
    assert vm.send(0, icr(V), 2) is None and ch.asked == []
    vm.mem.write64(vm.table + 24, phys_entry(vm.pages[3], vm.host[3], running=False))  # IR=1 -> 0
    vm.set_entry(3, running=True)  # re-set closes the window
    vm.mem.write32(vm.table + 24 + 4, (1 << 31))  # 32-bit write of the high half: V=1, IR=0
    vm.send(0, icr(V), 3)
    assert ch.asked == [("erratum1235", 2, [0.75, 0.25])]  # the dword write was seen as a clear


def test_self_ipi_is_immune_to_erratum():
    vm, ch, _ = _erratum_vm(1)
    vm.set_entry(0, running=False)
    assert vm.send(0, icr(V, sh=SH_SELF)) is None
    assert ch.asked == [] and vm.doorbells == [vm.host[0]]


def test_broadcast_stale_entry_not_counted_as_not_running():
    vm, ch, _ = _erratum_vm(1)
    vm.set_entry(3, running=False)
    assert vm.send(0, icr(V, sh=SH_ALL)) is None
    assert vm.doorbells == [vm.host[i] for i in range(4)]


def test_page_irr_helper():
    page = bytearray(4096)
    page[0x200 + 0x10 * 2] = 1
    assert irr_bit(page, 64) and not irr_bit(page, 65)
