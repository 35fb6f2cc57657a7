"""AVIC table entry encodings, logical index computation, access classification (APM Table 15-22) and
exit-info encodings — compared with the numbers in the digest (§2–§4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from navic.hw import avic
from navic.hw.avic import (
    KVM_AVIC_TRAP_OFFSETS,
    AvicExit,
    classify_access,
    eoi_is_level,
    incomplete_ipi_decode,
    incomplete_ipi_exit_info,
    kvm_is_trap_offset,
    log_entry,
    log_entry_decode,
    logical_dest_indices,
    logical_index,
    noaccel_decode,
    noaccel_exit_info,
    phys_entry,
    phys_entry_decode,
    phys_entry_with,
    phys_table_pages,
    x2apic_logical_dest_ids,
    x2apic_logical_id,
)


def test_kvm_mask_values():
    assert avic.PHYS_VALID == 0x8000000000000000
    assert avic.PHYS_IS_RUNNING == 0x4000000000000000
    assert avic.PHYS_BACKING_MASK == 0x000FFFFFFFFFF000  # GENMASK(51, 12)
    assert avic.PHYS_HOST_ID_MASK == 0xFFF
    assert avic.LOG_VALID == 0x80000000 and avic.LOG_VALID_BIT == 31
    assert avic.LOG_GUEST_PHYS_ID_MASK == 0xFF
    assert (avic.AVIC_MAX_PHYSICAL_ID, avic.X2AVIC_MAX_PHYSICAL_ID, avic.X2AVIC_4K_MAX_PHYSICAL_ID) == (
        0xFE, 0x1FF, 0xFFF)
    assert avic.MSR_AMD64_SVM_AVIC_DOORBELL == 0xC001011B
    assert (avic.AVIC_UNACCEL_ACCESS_WRITE_MASK, avic.AVIC_UNACCEL_ACCESS_OFFSET_MASK) == (1, 0xFF0)
    assert [avic.IPI_FAILURE_NAMES[i] for i in range(5)] == [
        "AVIC_IPI_FAILURE_INVALID_INT_TYPE", "AVIC_IPI_FAILURE_TARGET_NOT_RUNNING",
        "AVIC_IPI_FAILURE_INVALID_TARGET", "AVIC_IPI_FAILURE_INVALID_BACKING_PAGE",
        "AVIC_IPI_FAILURE_INVALID_IPI_VECTOR"]


def test_phys_entry_bits():
    assert phys_entry(0x12345678000, 0xABC, running=True) == (1 << 63) | (1 << 62) | 0x12345678000 | 0xABC
    assert phys_entry(0x1000, 5, valid=False) == 0x1005
    e = phys_entry(0x5000, 7, running=True)
    assert phys_entry_with(e, running=False) == phys_entry(0x5000, 7)
    assert phys_entry_with(e, host_id=9) == phys_entry(0x5000, 9, running=True)


@given(st.integers(0, (1 << 40) - 1), st.integers(0, 0xFFF), st.booleans(), st.booleans())
def test_phys_entry_round_trip(pfn, host, running, valid):
    e = phys_entry(pfn << 12, host, running=running, valid=valid)
    assert phys_entry_decode(e) == (valid, running, pfn << 12, host)
    assert e & avic.PHYS_RESERVED_MASK == 0 and e < 1 << 64


@given(st.integers(0, 255), st.booleans())
def test_log_entry_round_trip(pid, valid):
    e = log_entry(pid, valid)
    assert log_entry_decode(e) == (valid, pid)
    assert e == pid | (valid << 31)


def test_phys_table_pages():
    assert [phys_table_pages(m) for m in (0, 0xFE, 0x1FF, 0x200, 0xFFF)] == [1, 1, 1, 2, 8]


def test_logical_index_flat_and_cluster():
    assert [logical_index(1 << b, flat=True) for b in range(8)] == list(range(8))
    assert logical_index(0, flat=True) is None and logical_index(0x3, flat=True) is None
    assert logical_index(0x21, flat=False) == 8  # cluster 2, bit 0
    assert logical_index(0x28, flat=False) == 11  # cluster 2, bit 3
    assert logical_index(0xE8, flat=False) == 59  # max
    assert logical_index(0xF1, flat=False) is None  # cluster 0xF reserved
    assert logical_index(0x20, flat=False) is None and logical_index(0x23, flat=False) is None
    assert logical_dest_indices(0b1010_0101, flat=True) == [0, 2, 5, 7]
    assert logical_dest_indices(0x35, flat=False) == [12, 14]


def test_x2apic_logical_derivation():
    assert x2apic_logical_id(0) == 0x00000001
    assert x2apic_logical_id(0x25) == (2 << 16) | (1 << 5)
    assert x2apic_logical_dest_ids((2 << 16) | 0b100001) == [32, 37]


@given(st.integers(0, 0xFFFFF))
def test_x2apic_logical_inverse(x2id):
    assert x2apic_logical_dest_ids(x2apic_logical_id(x2id)) == [x2id]


# --- access classification (digest §3.2) ----------------------------------------------------------------
ROWS = [  # offset, read, write
    (0x20, "allowed", "trap"), (0x30, "allowed", "fault"), (0x80, "allowed", "accelerated"),
    (0x90, "fault", "fault"), (0xA0, "allowed", "fault"), (0xB0, "allowed", "accelerated"),
    (0xC0, "allowed", "trap"), (0xD0, "allowed", "trap"), (0xE0, "allowed", "trap"),
    (0xF0, "allowed", "trap"),
    (0x100, "allowed", "fault"), (0x170, "allowed", "fault"), (0x180, "allowed", "fault"),
    (0x1F0, "allowed", "fault"), (0x200, "allowed", "fault"), (0x270, "allowed", "fault"),
    (0x280, "allowed", "trap"), (0x300, "allowed", "accelerated"), (0x310, "allowed", "allowed"),
    (0x320, "allowed", "trap"), (0x330, "allowed", "trap"), (0x340, "allowed", "trap"),
    (0x350, "allowed", "trap"), (0x360, "allowed", "trap"), (0x370, "allowed", "trap"),
    (0x380, "allowed", "trap"), (0x390, "fault", "fault"), (0x3E0, "allowed", "trap"),
    (0x400, "fault", "fault"), (0x410, "fault", "fault"), (0x420, "fault", "fault"),
    (0x480, "fault", "fault"), (0x4F0, "fault", "fault"),
    (0x500, "fault", "fault"), (0x530, "fault", "fault"),
    (0x540, "fault", "fault"), (0xFF0, "fault", "fault"),
    (0x2F0, "allowed", "allowed"), (0x40, "allowed", "allowed"),  # unlisted: plain page access
]


@pytest.mark.parametrize("off,r,w", ROWS)
def test_xavic_access_table(off, r, w):
    assert classify_access(off, write=False) == r
    assert classify_access(off, write=True) == w
    assert classify_access(off + 4, write=True) == w  # the 16-byte slot decides


def test_ext_lvt_access_change_and_level_eoi():
    for off in (0x500, 0x510, 0x520, 0x530):
        assert classify_access(off, False, ext_lvt_chg=True) == "allowed"
        assert classify_access(off, True, ext_lvt_chg=True) == "trap"
    assert classify_access(0xB0, True, eoi_level=True) == "trap"
    assert classify_access(0xB0, False, eoi_level=True) == "allowed"


X2_ROWS = [  # offset, read, write (x2APIC architectural #GP first, then Table 15-22)
    (0x20, "allowed", "gp"), (0x30, "allowed", "gp"), (0x80, "allowed", "accelerated"),
    (0xB0, "gp", "accelerated"), (0xC0, "gp", "gp"), (0xD0, "allowed", "gp"), (0xE0, "gp", "gp"),
    (0xF0, "allowed", "trap"), (0x200, "allowed", "gp"), (0x280, "allowed", "trap"),
    (0x300, "allowed", "accelerated"), (0x310, "gp", "gp"), (0x320, "allowed", "trap"),
    (0x390, "fault", "gp"), (0x3F0, "gp", "accelerated"), (0x400, "fault", "fault"),
]


@pytest.mark.parametrize("off,r,w", X2_ROWS)
def test_x2avic_access(off, r, w):
    assert classify_access(off, write=False, x2apic=True) == r
    assert classify_access(off, write=True, x2apic=True) == w


def test_kvm_trap_set():
    assert KVM_AVIC_TRAP_OFFSETS == {0x20, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x320, 0x330, 0x340,
                                     0x350, 0x360, 0x370, 0x380, 0x3E0}
    assert not kvm_is_trap_offset(0x80) and not kvm_is_trap_offset(0x500)
    assert kvm_is_trap_offset(0x500, ext_lvt_chg=True)


def test_eoi_is_level_uses_highest_isr_vector_tmr():
    page = bytearray(4096)
    assert not eoi_is_level(page)
    page[0x100 + 0x10 * 1] = 1  # ISR vector 32
    page[0x100 + 0x10 * 2] = 1  # ISR vector 64 (highest)
    page[0x180 + 0x10 * 1] = 1  # TMR vector 32
    assert not eoi_is_level(page)
    page[0x180 + 0x10 * 2] = 1
    assert eoi_is_level(page)


# --- exit info -------------------------------------------------------------------------------------------
def test_noaccel_encoding():
    assert noaccel_exit_info(0x3E0, True) == ((1 << 32) | 0x3E0, 0)
    assert noaccel_exit_info(0xB0, True, 0x51) == ((1 << 32) | 0xB0, 0x51)
    assert noaccel_exit_info(0x90, False) == (0x90, 0)
    assert noaccel_decode((1 << 32) | 0x3E0, 0x51) == (0x3E0, True, 0x51)
    e = AvicExit.noaccel(0x20, True)
    assert e.code == 0x402 and e.name == "avic_unaccelerated_access" and e.info1 == 0x100000020


def test_incomplete_ipi_encoding():
    i1, i2 = incomplete_ipi_exit_info(0x000C4041, 0x05000000, 1, 0x1234)
    assert i1 == 0x05000000_000C4041
    assert i2 == (1 << 32) | 0x234  # index field is 11:0
    assert incomplete_ipi_decode(i1, i2) == (0x000C4041, 0x05000000, 1, 0x234)
    e = AvicExit.incomplete_ipi(0x41, 7, 2, 7)
    assert (e.failure, e.index, e.failure_name) == (2, 7, "AVIC_IPI_FAILURE_INVALID_TARGET")
