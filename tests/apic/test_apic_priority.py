"""TPR/PPR, highest-priority selection by class, acceptance and INTA (SDM §11.8.3, §11.8.4)."""

from __future__ import annotations

from _apic_util import enabled_apic
from hypothesis import given, settings
from hypothesis import strategies as st

from navic.apic import registers as R


def test_ppr_rule_concrete() -> None:
    _, a = enabled_apic(0)
    a.mmio_write(R.APIC_TPR, 0x35)
    assert a.mmio_read(R.APIC_PPR) == 0x35  # no ISR: PPR = TPR
    a.set_isr(0x3F)
    a.update_ppr()
    assert a.mmio_read(R.APIC_PPR) == 0x35  # TPR class 3 >= ISR class 3 -> TPR (with subclass)
    a.set_isr(0x52)
    assert a.mmio_read(R.APIC_PPR) == 0x50  # ISRV class 5 > TPR class 3 -> ISRV & F0
    a.mmio_write(R.APIC_TPR, 0x5F)
    assert a.mmio_read(R.APIC_PPR) == 0x5F


def test_delivery_needs_class_above_ppr() -> None:
    _, a = enabled_apic(0)
    a.mmio_write(R.APIC_TPR, 0x40)
    a.accept_irq(0, 0x4F)
    assert a.has_interrupt() == -1  # same class as TPR: blocked
    a.accept_irq(0, 0x50)
    assert a.has_interrupt() == 0x50
    assert a.ack_interrupt() == 0x50
    assert a.mmio_read(R.APIC_PPR) == 0x50
    assert a.has_interrupt() == -1
    a.eoi()
    assert a.mmio_read(R.APIC_PPR) == 0x40
    assert a.has_interrupt() == -1
    a.mmio_write(R.APIC_TPR, 0x3F)
    assert a.has_interrupt() == 0x4F


def test_highest_vector_wins_and_nesting() -> None:
    _, a = enabled_apic(0)
    for v in (0x31, 0xE0, 0x7F, 0x20):
        a.accept_irq(0, v)
    assert a.highest_irr() == 0xE0
    assert a.ack_interrupt() == 0xE0
    assert a.has_interrupt() == -1  # everything else is lower class than E0 in service
    a.eoi()
    assert a.ack_interrupt() == 0x7F
    assert a.ack_interrupt() == 0xFF  # 0x31 / 0x20 are below the in-service class 7
    a.accept_irq(0, 0x81)
    assert a.ack_interrupt() == 0x81  # higher class preempts (nests)
    assert a.highest_isr() == 0x81 and a.test_isr(0x7F)
    a.eoi()
    assert a.highest_isr() == 0x7F
    a.eoi()
    assert [a.ack_interrupt(), a.ack_interrupt()] == [0x31, 0xFF]  # 0x20 is below class 3
    a.eoi()
    assert a.ack_interrupt() == 0x20


def test_same_class_does_not_preempt() -> None:
    _, a = enabled_apic(0)
    a.accept_irq(0, 0x60)
    assert a.ack_interrupt() == 0x60
    a.accept_irq(0, 0x6F)
    assert a.has_interrupt() == -1


def test_irr_coalesces() -> None:
    _, a = enabled_apic(0)
    assert a.accept_irq(0, 0x44) and a.accept_irq(0, 0x44)
    assert a.ack_interrupt() == 0x44
    assert a.ack_interrupt() == 0xFF  # spurious


def test_accept_sets_tmr_per_trigger_and_notifies() -> None:
    hooks, a = enabled_apic(0)
    assert a.accept_irq(0, 0x70, trigger=1, level=1)
    assert a.test_tmr(0x70) and a.test_irr(0x70)
    assert hooks.pending == [a]
    a.clear_irr(0x70)
    assert a.accept_irq(0, 0x70, trigger=0)
    assert not a.test_tmr(0x70)
    assert not a.accept_irq(0, 0x71, trigger=1, level=0)  # level de-assert: ignored
    assert not a.test_irr(0x71)


def test_events_latched_not_in_irr() -> None:
    hooks, a = enabled_apic(0)
    assert a.accept_irq(4, 0x99)
    assert a.accept_irq(6, 0x9A)
    assert a.accept_irq(2, 0)
    assert a.accept_irq(7, 0)
    assert a.highest_irr() == -1
    assert len(hooks.pending) == 4
    assert a.take_nmi() and not a.take_nmi()
    assert a.take_sipi() == 0x9A and a.take_sipi() is None
    assert a.take_smi() and a.take_extint()
    assert a.accept_irq(6, 0x10)
    assert a.accept_irq(5, 0)  # INIT supersedes the unconsumed SIPI
    assert a.take_init() and a.take_sipi() is None
    assert not a.accept_irq(5, 0, trigger=1, level=0)  # INIT level de-assert
    assert not a.take_init()
    assert not a.accept_irq(3, 0x40)  # reserved delivery mode


def test_tpr_lowering_notifies_when_interrupt_becomes_deliverable() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_TPR, 0xF0)
    a.accept_irq(0, 0x80)
    hooks.pending.clear()
    a.mmio_write(R.APIC_TPR, 0x90)
    assert hooks.pending == []
    a.mmio_write(R.APIC_TPR, 0x70)
    assert hooks.pending == [a]


def test_disabled_apic_presents_nothing() -> None:
    _, a = enabled_apic(0)
    a.accept_irq(0, 0x80)
    a.set_apic_base(0xFEE00000)
    assert a.has_interrupt() == -1


vectors = st.integers(16, 255)


@settings(max_examples=300, deadline=None)
@given(tpr=st.integers(0, 255), isr=st.sets(vectors, max_size=6))
def test_prop_ppr_rule(tpr: int, isr: set[int]) -> None:
    _, a = enabled_apic(0)
    for v in isr:
        a.set_isr(v)
    a.mmio_write(R.APIC_TPR, tpr)
    isrv = max(isr, default=0)
    expected = tpr if (tpr >> 4) >= (isrv >> 4) else isrv & 0xF0
    assert a.mmio_read(R.APIC_PPR) == expected
    assert a.ppr == expected


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("irq"), vectors),
            st.tuples(st.just("ack"), st.just(0)),
            st.tuples(st.just("eoi"), st.just(0)),
            st.tuples(st.just("tpr"), st.integers(0, 255)),
        ),
        max_size=60,
    )
)
def test_prop_ack_never_delivers_twice(ops: list[tuple[str, int]]) -> None:
    """Each accepted IRR bit is delivered (acked) at most once, and only when it is above PPR."""
    _, a = enabled_apic(0)
    outstanding: set[int] = set()  # vectors whose IRR bit was set and not yet acked
    for op, arg in ops:
        if op == "irq":
            a.accept_irq(0, arg)
            outstanding.add(arg)
        elif op == "ack":
            ppr = a.ppr
            deliverable = a.has_interrupt()
            irr_before = [a.regs[(0x200 >> 2) + 4 * i] for i in range(8)]
            v = a.ack_interrupt()
            if deliverable < 0:
                assert v == 0xFF  # spurious, nothing moves
                assert [a.regs[(0x200 >> 2) + 4 * i] for i in range(8)] == irr_before
                continue
            assert v == deliverable == max(outstanding)
            assert (v & 0xF0) > (ppr & 0xF0)
            outstanding.discard(v)
            assert not a.test_irr(v) and a.test_isr(v)
        elif op == "eoi":
            a.eoi()
        else:
            a.mmio_write(R.APIC_TPR, arg)
    assert {v for v in range(256) if a.test_irr(v)} == outstanding


def test_cr8_is_tpr_high_nibble() -> None:
    _, a = enabled_apic(0)
    a.set_cr8(0x15)
    assert a.mmio_read(R.APIC_TPR) == 0x50 and a.get_cr8() == 5
    a.mmio_write(R.APIC_TPR, 0x7A)
    assert a.get_cr8() == 7
