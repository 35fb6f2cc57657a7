"""Register file layout, reset/INIT values, xAPIC write masks (SDM §11.4.1, §11.4.7, §11.12.5.1)."""

from __future__ import annotations

import struct

import pytest
from _apic_util import enabled_apic

from navic.apic import registers as R
from navic.apic.lapic import LocalApic


def u32(page: bytearray, off: int) -> int:
    return struct.unpack_from("<I", page, off)[0]


def test_offsets_and_names() -> None:
    assert (R.APIC_ID, R.APIC_LVR, R.APIC_TPR, R.APIC_APR, R.APIC_PPR, R.APIC_EOI) == (
        0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0)
    assert (R.APIC_ICR, R.APIC_ICR2, R.APIC_LVTT, R.APIC_TMICT, R.APIC_TDCR, R.APIC_SELF_IPI) == (
        0x300, 0x310, 0x320, 0x380, 0x3E0, 0x3F0)
    assert R.REG_BY_NAME["ISR7"] == 0x170 and R.REG_BY_NAME["TMR0"] == 0x180
    assert R.REG_BY_NAME["IRR3"] == 0x230
    assert R.REG_BY_NAME["ICR_LO"] == R.REG_BY_NAME["ICR"] == 0x300
    assert R.REG_BY_NAME["ICR_HI"] == R.REG_BY_NAME["ICR2"] == 0x310
    assert R.REG_BY_NAME["SPIV"] == R.REG_BY_NAME["SVR"] == 0xF0
    assert R.REG_BY_NAME["RRD"] == 0xC0 and R.REG_BY_NAME["VER"] == 0x30
    assert R.REG_BY_NAME["LVT_ERROR"] == 0x370 and R.REG_BY_NAME["TIMER_CURRENT"] == 0x390
    assert R.msr_to_offset(0x830) == 0x300 and R.offset_to_msr(0x3F0) == 0x83F
    assert R.offset_to_msr(R.APIC_TPR) == 0x808
    with pytest.raises(ValueError):
        R.msr_to_offset(0x900)
    with pytest.raises(ValueError):
        R.offset_to_msr(0x24)
    assert R.x2apic_ldr(0x35) == (3 << 16) | (1 << 5)


def test_power_up_values() -> None:
    a = LocalApic(5, bsp=True)
    assert a.apic_base == 0xFEE00000 | (1 << 11) | (1 << 8)
    assert a.mode == "xapic"
    p = a.page
    assert u32(p, R.APIC_ID) == 5 << 24
    assert u32(p, R.APIC_LVR) == 0x00050014
    assert u32(p, R.APIC_SVR) == 0xFF
    assert u32(p, R.APIC_DFR) == 0xFFFFFFFF
    for off in R.LVT_OFFSETS:
        assert u32(p, off) == 1 << 16, hex(off)
    for off in (R.APIC_TPR, R.APIC_PPR, R.APIC_LDR, R.APIC_ESR, R.APIC_ICR, R.APIC_ICR2,
                R.APIC_TMICT, R.APIC_TDCR):
        assert u32(p, off) == 0
    assert all(u32(p, R.APIC_ISR + 16 * i) == 0 for i in range(24))  # ISR, TMR, IRR
    assert LocalApic(5).apic_base & (1 << 8) == 0


def test_registers_live_in_the_page() -> None:
    page = bytearray(4096)
    hooks, a = enabled_apic(1, page=page)
    assert a.page is page and len(a.regs) == 1024
    # a register write lands little-endian in the page ...
    a.mmio_write(R.APIC_TPR, 0x45)
    assert page[0x80:0x84] == b"\x45\x00\x00\x00"
    # ... and "hardware" writing the page behind the APIC's back is seen immediately.
    struct.pack_into("<I", page, R.APIC_IRR + 0x10 * 2, 1 << 3)  # vector 0x43
    assert a.highest_irr() == 0x43
    assert a.test_irr(0x43)
    assert a.has_interrupt() == -1  # class 4 is not above PPR class 4
    struct.pack_into("<I", page, R.APIC_TPR, 0x30)
    assert a.has_interrupt() == 0x43
    assert u32(page, R.APIC_PPR) == 0x30
    struct.pack_into("<I", page, R.APIC_SVR, 0x1EE)
    assert a.ack_interrupt() == 0x43
    assert u32(page, R.APIC_ISR + 0x20) == 1 << 3 and u32(page, R.APIC_IRR + 0x20) == 0
    assert a.ack_interrupt() == 0xEE  # spurious vector from SVR


def test_xapic_write_masks() -> None:
    _, a = enabled_apic(0)
    a.mmio_write(R.APIC_ID, 0x12345678)
    assert a.mmio_read(R.APIC_ID) == 0x12000000 and a.apic_id == 0x12
    a.mmio_write(R.APIC_LDR, 0xABCDEF01)
    assert a.mmio_read(R.APIC_LDR) == 0xAB000000
    a.mmio_write(R.APIC_DFR, 0)
    assert a.mmio_read(R.APIC_DFR) == 0x0FFFFFFF
    a.mmio_write(R.APIC_ICR2, 0x12345678)
    assert a.mmio_read(R.APIC_ICR2) == 0x12000000
    a.mmio_write(R.APIC_TPR, 0xFFFFFFFF)
    assert a.mmio_read(R.APIC_TPR) == 0xFF
    a.mmio_write(R.APIC_SVR, 0xFFFFFFFF)
    assert a.mmio_read(R.APIC_SVR) == 0x3FF
    a.mmio_write(R.APIC_TDCR, 0xF)
    assert a.mmio_read(R.APIC_TDCR) == 0xB
    a.mmio_write(R.APIC_LVTT, 0xFFFFFFFF)
    assert a.mmio_read(R.APIC_LVTT) == 0x000710FF & ~0x1000 | (3 << 17)
    a.mmio_write(R.APIC_LVT0, 0xFFFFFFFF)
    assert a.mmio_read(R.APIC_LVT0) == 0x0001A7FF  # no delivery status (12), no remote IRR (14)
    a.mmio_write(R.APIC_LVTERR, 0xFFFFFFFF)
    assert a.mmio_read(R.APIC_LVTERR) == 0x000100FF
    a.mmio_write(R.APIC_LVTPC, 0xFFFFFFFF)
    assert a.mmio_read(R.APIC_LVTPC) == 0x000107FF


def test_xapic_read_only_writes_ignored() -> None:
    _, a = enabled_apic(0)
    a.set_irr(0x80)
    for off in (R.APIC_LVR, R.APIC_PPR, R.APIC_IRR + 0x40, R.APIC_ISR, R.APIC_TMR, R.APIC_TMCCT,
                R.APIC_APR, R.APIC_RRR):
        before = a.mmio_read(off)
        a.mmio_write(off, 0xFFFFFFFF)
        assert a.mmio_read(off) == before, hex(off)
    assert a.test_irr(0x80)
    assert a.mmio_read(R.APIC_EOI) == 0


def test_init_keeps_id_and_base_resets_the_rest() -> None:
    hooks, a = enabled_apic(7)
    a.mmio_write(R.APIC_ID, 0x09000000)
    a.mmio_write(R.APIC_TPR, 0x20)
    a.mmio_write(R.APIC_LDR, 0x01000000)
    a.mmio_write(R.APIC_DFR, 0x0FFFFFFF)
    a.mmio_write(R.APIC_LVTT, 0x30)
    a.mmio_write(R.APIC_TMICT, 1000)
    a.accept_irq(0, 0x55, trigger=1)
    a.ack_interrupt()
    a.accept_irq(0, 0x66)
    a.accept_irq(4, 0)
    base = a.apic_base
    a.init_reset()
    assert a.apic_base == base
    assert a.mmio_read(R.APIC_ID) == 0x09000000
    assert a.mmio_read(R.APIC_SVR) == 0xFF and a.mmio_read(R.APIC_TPR) == 0
    assert a.mmio_read(R.APIC_LDR) == 0 and a.mmio_read(R.APIC_DFR) == 0xFFFFFFFF
    assert a.mmio_read(R.APIC_LVTT) == 1 << 16 and a.mmio_read(R.APIC_TMICT) == 0
    assert a.highest_irr() == -1 and a.highest_isr() == -1 and not a.test_tmr(0x55)
    assert not a.nmi_pending
    assert a.timer_deadline is None and hooks.timers[-1] == (a, None)


def test_init_in_x2apic_mode_keeps_x2apic_id_and_ldr() -> None:
    _, a = enabled_apic(0x1234, mode="x2apic")
    a.wrmsr(0x808, 0x40)
    a.init_reset()
    assert a.mode == "x2apic"
    assert a.rdmsr(0x802) == 0x1234
    assert a.rdmsr(0x80D) == (0x123 << 16) | (1 << 4)
    assert a.rdmsr(0x808) == 0 and a.rdmsr(0x80F) == 0xFF


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        LocalApic(0, page=bytearray(100))
    with pytest.raises(ValueError):
        LocalApic(0, mode="bogus")
    with pytest.raises(ValueError):
        LocalApic(0, lowest_priority="bogus")
    assert LocalApic(3, mode="disabled").mode == "disabled"
