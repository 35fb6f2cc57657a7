"""EOI and level-triggered interrupts (SDM §11.8.5)."""

from __future__ import annotations

from _apic_util import enabled_apic
from hypothesis import given, settings
from hypothesis import strategies as st

from navic.apic import registers as R


def test_eoi_clears_highest_isr_only() -> None:
    hooks, a = enabled_apic(0)
    a.set_isr(0x41)
    a.set_isr(0x92)
    a.set_isr(0x93)
    a.update_ppr()
    a.mmio_write(R.APIC_EOI, 0)
    assert not a.test_isr(0x93) and a.test_isr(0x92) and a.test_isr(0x41)
    assert a.mmio_read(R.APIC_PPR) == 0x90
    a.mmio_write(R.APIC_EOI, 0x1234)  # any value in xAPIC mode
    a.mmio_write(R.APIC_EOI, 0)
    assert a.highest_isr() == -1 and a.mmio_read(R.APIC_PPR) == 0
    a.mmio_write(R.APIC_EOI, 0)  # EOI with nothing in service: no effect
    assert hooks.eois == []


def test_level_eoi_broadcast() -> None:
    hooks, a = enabled_apic(0)
    a.accept_irq(0, 0x61, trigger=1)
    a.accept_irq(0, 0x52, trigger=0)
    assert a.ack_interrupt() == 0x61
    a.mmio_write(R.APIC_EOI, 0)
    assert hooks.eois == [(a, 0x61)]
    assert a.ack_interrupt() == 0x52
    a.mmio_write(R.APIC_EOI, 0)
    assert hooks.eois == [(a, 0x61)]  # edge: no broadcast


def test_eoi_x2apic_level() -> None:
    hooks, a = enabled_apic(5, mode="x2apic")
    a.accept_irq(0, 0xA0, trigger=1)
    assert a.ack_interrupt() == 0xA0
    a.wrmsr(0x80B, 0)
    assert hooks.eois == [(a, 0xA0)] and a.highest_isr() == -1


def test_eoi_unblocks_pending_and_notifies() -> None:
    hooks, a = enabled_apic(0)
    a.accept_irq(0, 0x90)
    assert a.ack_interrupt() == 0x90
    a.accept_irq(0, 0x50)
    hooks.pending.clear()
    assert a.has_interrupt() == -1
    a.eoi()
    assert hooks.pending == [a] and a.has_interrupt() == 0x50


@settings(max_examples=300, deadline=None)
@given(isr=st.sets(st.integers(16, 255), min_size=1, max_size=20), tmr=st.sets(st.integers(16, 255)))
def test_prop_eoi_clears_highest_isr(isr: set[int], tmr: set[int]) -> None:
    hooks, a = enabled_apic(0)
    for v in isr:
        a.set_isr(v)
    for v in tmr:
        a.set_tmr(v)
    top = max(isr)
    a.eoi()
    assert {v for v in range(256) if a.test_isr(v)} == isr - {top}
    assert hooks.eois == ([(a, top)] if top in tmr else [])
    rest = max(isr - {top}, default=0)
    assert a.mmio_read(R.APIC_PPR) == rest & 0xF0
