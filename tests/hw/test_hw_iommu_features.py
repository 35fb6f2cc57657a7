"""AMD IOMMU guest-mode posting (doorbell vs GA log), GATag layout, CPU feature models and errata."""

from __future__ import annotations

import pytest
from _hw_util import irr_bit
from hypothesis import given
from hypothesis import strategies as st

from navic.hw.errata import ERRATA, errata_for
from navic.hw.features import features_for
from navic.hw.iommu import AmdIommu, GuestIrte, ga_tag, ga_tag_vcpu_idx, ga_tag_vm_id
from navic.hw.memory import HostMemory


def _iommu():
    mem = HostMemory()
    log = {"db": [], "gaint": 0, "irr": []}

    def gaint():
        log["gaint"] += 1

    io = AmdIommu(mem, log["db"].append, gaint, lambda b, v, t: log["irr"].append((b, v, t)))
    return mem, io, log


def test_running_vcpu_gets_doorbell():
    mem, io, log = _iommu()
    bp = mem.alloc()
    irte = GuestIrte(bp, 0x55, ga_tag=ga_tag(3, 7), is_run=True, dest=12, ga_log_intr=True)
    assert io.post_device_interrupt(irte) == "doorbell"
    assert irr_bit(mem.page(bp), 0x55)
    assert log["db"] == [12] and io.ga_log == [] and log["gaint"] == 0
    assert log["irr"] == [(bp, 0x55, (3 << 12) | 7)]


def test_blocking_vcpu_gets_ga_log_entry_and_interrupt():
    mem, io, log = _iommu()
    bp = mem.alloc()
    irte = GuestIrte(bp, 0x56, ga_tag=ga_tag(3, 7), is_run=False, dest=12, ga_log_intr=True)
    assert io.post_device_interrupt(irte) == "ga_log"
    assert irr_bit(mem.page(bp), 0x56)
    assert log["db"] == [] and io.ga_log == [(3 << 12) | 7] and log["gaint"] == 1
    assert io.drain_ga_log() == [(3 << 12) | 7] and io.ga_log == []


def test_not_running_without_ga_log_intr_just_waits_in_irr():
    mem, io, log = _iommu()
    bp = mem.alloc()
    assert io.post_device_interrupt(GuestIrte(bp, 0x57)) == "pending"
    assert irr_bit(mem.page(bp), 0x57) and log["db"] == [] and io.ga_log == [] and log["gaint"] == 0


def test_legacy_mode_irte_is_remapped_not_posted():
    mem = HostMemory()
    got = []
    io = AmdIommu(mem, lambda h: None, remapped=got.append)
    bp = mem.alloc()
    irte = GuestIrte(bp, 0x58, guest_mode=False)
    assert io.post_device_interrupt(irte) == "remapped"
    assert got == [irte] and not irr_bit(mem.page(bp), 0x58)


def test_irte_is_read_after_the_irr_step():
    mem, io, log = _iommu()
    bp = mem.alloc()
    irte = GuestIrte(bp, 0x60, is_run=True, dest=4, ga_log_intr=False)
    g = io.post_steps(irte)
    next(g)
    irte.is_run = False  # KVM updates the IRTE between the IRR set and the IsRun read
    irte.ga_log_intr = True
    with pytest.raises(StopIteration) as stop:
        next(g)
    assert stop.value.value == "ga_log" and log["db"] == []


@given(st.integers(0, (1 << 20) - 1), st.integers(0, 0xFFF))
def test_ga_tag_layout(vm_id, idx):
    t = ga_tag(vm_id, idx)
    assert t == (vm_id << 12) | idx and t < 1 << 32
    assert (ga_tag_vm_id(t), ga_tag_vcpu_idx(t)) == (vm_id, idx)
    old = ga_tag(vm_id & 0xFFFFFF, idx & 0xFF, idx_bits=8)  # pre-4K trees
    assert ga_tag_vcpu_idx(old, 8) == idx & 0xFF and ga_tag_vm_id(old, 8) == vm_id & 0xFFFFFF


def test_cpu_models():
    z2, z3, z4, z5, spr = (features_for(n) for n in ("zen2", "milan", "Genoa", "zen5", "spr"))
    assert (z2.family, z2.avic, z2.x2avic, z2.avic_drops_low_vector_ipi) == (0x17, True, False, True)
    assert z2.has_erratum("1235") and z2.errata == {"1235"}
    assert (z3.family, z3.avic, z3.avic_enumerated) == (0x19, True, False)
    assert not z3.has_erratum("1235")
    assert (z4.x2avic, z4.x2avic_ext, z4.x2avic_max_physical_id) == (True, False, 0x1FF)
    assert (z5.family, z5.x2avic_ext, z5.x2avic_max_physical_id) == (0x1A, True, 0xFFF)
    assert z2.x2avic_max_physical_id == 0 and z2.avic_max_physical_id == 0xFE
    assert (spr.vendor, spr.vmx, spr.apicv, spr.posted_interrupts, spr.ipiv, spr.svm) == (
        "intel", True, True, True, True, False)
    assert features_for("rome") is z2
    with pytest.raises(ValueError):
        features_for("pentium")


def test_cpuid_bits():
    assert features_for("zen5").cpuid_8000000a() == (1 << 6, (1 << 13) | (1 << 18))
    assert features_for("zen3").cpuid_8000000a() == (0, 0)
    assert features_for("zen2").cpuid_8000000a() == (0, 1 << 13)


def test_errata_registry():
    assert "1235" in ERRATA and ERRATA["1235"].number == "1235"
    assert errata_for("zen1") == errata_for("zen2") == frozenset({"1235"})
    assert errata_for("zen4") == frozenset() and errata_for("spr") == frozenset()
