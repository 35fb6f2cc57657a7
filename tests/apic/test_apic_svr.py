"""Spurious-interrupt vector register and software enable/disable (SDM §11.9, §11.4.7.2)."""

from __future__ import annotations

from _apic_util import enabled_apic

from navic.apic import registers as R
from navic.apic.lapic import LocalApic


def test_sw_disabled_at_reset_refuses_fixed_accepts_nmi_init_sipi() -> None:
    a = LocalApic(0)
    assert not a.sw_enabled
    assert not a.accept_irq(0, 0x40)
    assert not a.accept_irq(1, 0x40)
    assert a.highest_irr() == -1
    assert a.accept_irq(4, 0) and a.nmi_pending
    assert a.accept_irq(5, 0) and a.init_pending
    assert a.accept_irq(6, 0x12) and a.sipi_vector == 0x12
    assert a.esr_pending == 0  # refusing is not an error


def test_sw_disable_masks_all_lvts_and_keeps_them_masked() -> None:
    _, a = enabled_apic(0)
    for off in R.LVT_OFFSETS:
        a.mmio_write(off, 0x30)
    assert all(not a.mmio_read(off) & R.LVT_MASKED for off in R.LVT_OFFSETS)
    a.mmio_write(R.APIC_SVR, 0xFF)
    assert all(a.mmio_read(off) == R.LVT_MASKED | 0x30 for off in R.LVT_OFFSETS)
    a.mmio_write(R.APIC_LVT0, 0x31)  # mask bit cannot be cleared while disabled
    assert a.mmio_read(R.APIC_LVT0) == R.LVT_MASKED | 0x31
    a.mmio_write(R.APIC_SVR, 0x1FF)  # re-enabling does not unmask
    assert a.mmio_read(R.APIC_LVT1) == R.LVT_MASKED | 0x30
    a.mmio_write(R.APIC_LVT1, 0x32)
    assert a.mmio_read(R.APIC_LVT1) == 0x32


def test_pending_irr_held_while_sw_disabled() -> None:
    _, a = enabled_apic(0)
    a.accept_irq(0, 0x80)
    a.mmio_write(R.APIC_SVR, 0xFF)
    assert not a.accept_irq(0, 0x90)
    assert a.test_irr(0x80) and not a.test_irr(0x90)
    assert a.has_interrupt() == 0x80  # already-pending IRR is still presented


def test_spurious_vector() -> None:
    _, a = enabled_apic(0)
    a.mmio_write(R.APIC_SVR, 0x1E7)
    assert a.ack_interrupt() == 0xE7
    assert a.highest_isr() == -1  # a spurious interrupt does not set ISR
    a.mmio_write(R.APIC_TPR, 0xF0)
    a.accept_irq(0, 0x55)
    assert a.ack_interrupt() == 0xE7 and a.test_irr(0x55)


def test_lvt_local_delivery_masked_when_sw_disabled() -> None:
    _, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVT0, 0x400)  # LINT0 as NMI
    assert a.deliver_lvt(R.APIC_LVT0) and a.take_nmi()
    a.mmio_write(R.APIC_LVT1, 0x8045)  # LINT1 fixed, level
    assert a.deliver_lvt(R.APIC_LVT1) and a.test_irr(0x45) and a.test_tmr(0x45)
    a.mmio_write(R.APIC_SVR, 0xFF)
    assert not a.deliver_lvt(R.APIC_LVT0) and not a.nmi_pending
