"""VMCB layout bit-exactness (digest §2 / svm.h), exit names and VMRUN consistency checks."""

from __future__ import annotations

import pytest

from navic.hw.features import features_for
from navic.hw.memory import HostMemory
from navic.hw.vmcb import (
    AVIC_ENABLE_MASK,
    EXIT_NAMES,
    INTERCEPT_HLT,
    INTERCEPT_INTR,
    INTERCEPT_MSR_PROT,
    INTERCEPT_VINTR,
    INTERCEPT_VMRUN,
    SVM_EXIT_AVIC_INCOMPLETE_IPI,
    SVM_EXIT_AVIC_UNACCELERATED_ACCESS,
    SVM_EXIT_HLT,
    SVM_EXIT_INTR,
    SVM_EXIT_MSR,
    SVM_EXIT_NPF,
    SVM_EXIT_VINTR,
    SVM_EXIT_VMRUN,
    VMCB_AVIC,
    VMCB_INTR,
    VMEXIT_INVALID,
    X2APIC_MODE_MASK,
    Vmcb,
    vmrun_checks,
)


@pytest.fixture
def vmcb():
    mem = HostMemory()
    return Vmcb(mem, mem.alloc())


def raw(v: Vmcb, off: int, size: int) -> int:
    return int.from_bytes(v.page[off : off + size], "little")


@pytest.mark.parametrize("name,off,size", [
    ("msrpm_base_pa", 0x48, 8), ("asid", 0x58, 4), ("tlb_ctl", 0x5C, 1), ("int_ctl", 0x60, 4),
    ("int_vector", 0x64, 4), ("exit_code", 0x70, 8), ("exit_info_1", 0x78, 8), ("exit_info_2", 0x80, 8),
    ("exit_int_info", 0x88, 4), ("nested_ctl", 0x90, 8), ("avic_vapic_bar", 0x98, 8), ("event_inj", 0xA8, 4),
    ("nested_cr3", 0xB0, 8), ("clean", 0xC0, 4), ("next_rip", 0xC8, 8), ("avic_backing_page", 0xE0, 8),
    ("avic_logical_id", 0xF0, 8), ("avic_physical_id", 0xF8, 8), ("rip", 0x578, 8), ("rflags", 0x570, 8),
])
def test_field_offsets(vmcb, name, off, size):
    val = (0x0123456789ABCDEF >> (64 - 8 * size)) | 1
    setattr(vmcb, name, val)
    assert raw(vmcb, off, size) == val
    assert getattr(vmcb, name) == val
    # neighbours untouched
    assert raw(vmcb, off - 1, 1) == 0 and raw(vmcb, off + size, 1) == 0


@pytest.mark.parametrize("name,bit,width", [
    ("v_tpr", 0, 8), ("v_irq", 8, 1), ("v_intr_prio", 16, 4), ("v_ign_tpr", 20, 1),
    ("v_intr_masking", 24, 1), ("x2avic_enable", 30, 1), ("avic_enable", 31, 1),
])
def test_int_ctl_bits(vmcb, name, bit, width):
    setattr(vmcb, name, (1 << width) - 1)
    assert vmcb.int_ctl == ((1 << width) - 1) << bit
    setattr(vmcb, name, 0)
    assert vmcb.int_ctl == 0
    assert AVIC_ENABLE_MASK == 1 << 31 and X2APIC_MODE_MASK == 1 << 30


@pytest.mark.parametrize("bit,off,pos", [
    (INTERCEPT_INTR, 0x0C, 0), (INTERCEPT_VINTR, 0x0C, 4), (INTERCEPT_HLT, 0x0C, 24),
    (INTERCEPT_MSR_PROT, 0x0C, 28), (INTERCEPT_VMRUN, 0x10, 0),
])
def test_intercept_bits(vmcb, bit, off, pos):
    vmcb.set_intercept(bit)
    assert raw(vmcb, off, 4) == 1 << pos and vmcb.intercept(bit)
    vmcb.clr_intercept(bit)
    assert raw(vmcb, off, 4) == 0 and not vmcb.intercept(bit)


def test_avic_pointers_max_index_np_and_clean_bits(vmcb):
    vmcb.physical_table_hpa = 0x12345000
    vmcb.max_index = 0x1FF
    assert raw(vmcb, 0xF8, 8) == 0x123451FF
    vmcb.max_index = 0x1FFF  # 12-bit field
    assert vmcb.max_index == 0xFFF and vmcb.physical_table_hpa == 0x12345000
    vmcb.backing_page_hpa = 0xABC000
    assert raw(vmcb, 0xE0, 8) == 0xABC000
    vmcb.np_enable = True
    assert raw(vmcb, 0x90, 8) == 1
    vmcb.mark_all_clean()
    vmcb.mark_dirty(VMCB_AVIC)
    vmcb.mark_dirty(VMCB_INTR)
    assert raw(vmcb, 0xC0, 4) == 0xFFF & ~(1 << 11) & ~(1 << 3)
    assert not vmcb.is_clean(11) and vmcb.is_clean(4)


def test_exit_codes_and_kvm_names():
    assert (SVM_EXIT_INTR, SVM_EXIT_VINTR, SVM_EXIT_HLT, SVM_EXIT_MSR, SVM_EXIT_VMRUN) == (
        0x60, 0x64, 0x78, 0x7C, 0x80)
    assert (SVM_EXIT_NPF, SVM_EXIT_AVIC_INCOMPLETE_IPI, SVM_EXIT_AVIC_UNACCELERATED_ACCESS) == (
        0x400, 0x401, 0x402)
    assert VMEXIT_INVALID == 0xFFFFFFFFFFFFFFFF
    want = {0x60: "interrupt", 0x64: "vintr", 0x78: "hlt", 0x7C: "msr", 0x80: "vmrun", 0x400: "npf",
            0x401: "avic_incomplete_ipi", 0x402: "avic_unaccelerated_access",
            VMEXIT_INVALID: "invalid_guest_state", 0x81: "hypercall", 0x7B: "io"}
    for code, name in want.items():
        assert EXIT_NAMES[code] == name


def test_set_exit_and_reason(vmcb):
    vmcb.set_exit(SVM_EXIT_AVIC_INCOMPLETE_IPI, 1 << 40, 1 << 32 | 3)
    assert vmcb.exit_reason == "avic_incomplete_ipi"
    assert raw(vmcb, 0x78, 8) == 1 << 40 and raw(vmcb, 0x80, 8) == 1 << 32 | 3


def _good(vmcb, x2=False):
    vmcb.set_intercept(INTERCEPT_VMRUN)
    vmcb.asid = 1
    vmcb.int_ctl = AVIC_ENABLE_MASK | (X2APIC_MODE_MASK if x2 else 0)
    vmcb.backing_page_hpa = 0x100000
    vmcb.avic_physical_id = 0x200000  # max index 0
    vmcb.logical_table_hpa = 0x300000
    vmcb.avic_vapic_bar = 0xFEE00000
    return vmcb


def test_vmrun_checks_accept_valid_configs(vmcb):
    _good(vmcb)
    vmcb.max_index = 255
    assert vmrun_checks(vmcb, features_for("zen2")) is None
    _good(vmcb, x2=True)
    vmcb.max_index = 511
    assert vmrun_checks(vmcb, features_for("zen4")) is None
    vmcb.max_index = 4095
    assert vmrun_checks(vmcb, features_for("zen5")) is None
    vmcb.int_ctl = 0
    vmcb.max_index = 4095
    assert vmrun_checks(vmcb, features_for("zen2")) is None  # AVIC off: fields ignored


def test_vmrun_checks_reject(vmcb):
    z4, z2 = features_for("zen4"), features_for("zen2")
    _good(vmcb)
    vmcb.int_ctl = X2APIC_MODE_MASK
    assert "without AVIC" in vmrun_checks(vmcb, z4)
    _good(vmcb)
    vmcb.max_index = 256
    assert "255" in vmrun_checks(vmcb, z4)
    _good(vmcb, x2=True)
    vmcb.max_index = 512
    assert "511" in vmrun_checks(vmcb, z4)
    assert "x2AVIC" in vmrun_checks(vmcb, z2)
    _good(vmcb)
    vmcb.avic_backing_page = 0x100008
    assert "aligned" in vmrun_checks(vmcb, z4)
    _good(vmcb)
    vmcb.avic_logical_id = 0x300010
    assert "logical" in vmrun_checks(vmcb, z4)
    _good(vmcb, x2=True)
    vmcb.avic_logical_id = 0x300010  # unused in x2AVIC: not checked
    assert vmrun_checks(vmcb, z4) is None
    _good(vmcb)
    vmcb.avic_physical_id = 1 << 52
    assert "limit" in vmrun_checks(vmcb, z4)
    _good(vmcb)
    vmcb.clr_intercept(INTERCEPT_VMRUN)
    assert "VMRUN intercept" in vmrun_checks(vmcb, z4)
    _good(vmcb)
    vmcb.asid = 0
    assert "ASID" in vmrun_checks(vmcb, z4)
