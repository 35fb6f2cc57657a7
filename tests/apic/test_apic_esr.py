"""Error status register (SDM §11.5.3): illegal vectors, write-before-read, error interrupt."""

from __future__ import annotations

from _apic_util import enabled_apic, make_system, sw_enable

from navic.apic import registers as R
from navic.apic.icr import Icr

SIV = R.ESR_SEND_ILLEGAL_VECTOR
RIV = R.ESR_RECV_ILLEGAL_VECTOR


def test_send_illegal_vector_still_sends() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_ICR2, 1 << 24)
    a.mmio_write(R.APIC_ICR, 0x0F)
    assert len(hooks.ipis) == 1 and hooks.ipis[0][1].vector == 0x0F
    assert a.esr_pending == SIV
    assert a.mmio_read(R.APIC_ESR) == 0  # not visible until the ESR is written
    a.mmio_write(R.APIC_ESR, 0xDEAD)
    assert a.mmio_read(R.APIC_ESR) == SIV and a.esr_pending == 0
    a.mmio_write(R.APIC_ESR, 0)
    assert a.mmio_read(R.APIC_ESR) == 0  # cleared by the next write


def test_illegal_vector_only_for_fixed_and_lowest() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_ICR, 0x400 | 0x02)  # NMI with vector 2: fine
    a.mmio_write(R.APIC_ICR, 0x500)  # INIT
    a.mmio_write(R.APIC_ICR, 0x600 | 0x08)  # SIPI vector 8 is a page number, not a vector
    assert a.esr_pending == 0
    a.mmio_write(R.APIC_ICR, 0x100 | 0x05)  # lowest priority, vector 5
    assert a.esr_pending == SIV
    assert len(hooks.ipis) == 4


def test_receive_illegal_vector() -> None:
    _, a = enabled_apic(0)
    assert not a.accept_irq(0, 15)
    assert a.highest_irr() == -1
    a.mmio_write(R.APIC_ESR, 0)
    assert a.mmio_read(R.APIC_ESR) == RIV


def test_illegal_ipi_sets_both_sides() -> None:
    bus, (s, r) = make_system([0, 1])
    for x in (s, r):
        sw_enable(x)
    s.mmio_write(R.APIC_ICR2, 1 << 24)
    s.mmio_write(R.APIC_ICR, 0x03)
    assert s.esr_pending == SIV and r.esr_pending == RIV
    s.mmio_write(R.APIC_ICR, 0x40000 | 0x04)  # self shorthand: sender is also the receiver
    assert s.esr_pending == SIV | RIV


def test_x2apic_esr_and_self_ipi_errors() -> None:
    bus, (a,) = make_system([3], mode="x2apic")
    sw_enable(a)
    a.wrmsr(0x83F, 0x01)
    a.wrmsr(0x828, 0)
    assert a.rdmsr(0x828) == SIV | RIV


def test_error_interrupt_and_rearm() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTERR, 0xFE)
    a.accept_irq(0, 3)
    assert a.test_irr(0xFE)
    a.clear_irr(0xFE)
    a.accept_irq(0, 4)  # not re-armed yet: no second error interrupt
    assert not a.test_irr(0xFE)
    a.mmio_write(R.APIC_ESR, 0)  # rearms
    a.accept_irq(0, 5)
    assert a.test_irr(0xFE)


def test_error_interrupt_with_illegal_vector_terminates() -> None:
    _, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTERR, 0x02)  # illegal error vector -> one more RIV, no loop
    a.accept_irq(0, 3)
    assert a.highest_irr() == -1
    assert a.esr_pending == RIV


def test_masked_error_lvt_no_interrupt() -> None:
    _, a = enabled_apic(0)
    a.accept_irq(0, 3)
    assert a.highest_irr() == -1 and a.esr_pending == RIV


def test_icr_decode_object_for_illegal_vector() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_ICR, 0x0C0000 | 0x01)  # all-excluding-self, vector 1
    assert hooks.ipis[0][1] == Icr(vector=1, level=0, shorthand=3)
