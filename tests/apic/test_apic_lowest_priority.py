"""Lowest-priority delivery and the selectable arbitration rules (SDM §11.6.2.4; KVM)."""

from __future__ import annotations

import pytest
from _apic_util import make_system, sw_enable

from navic.apic import registers as R
from navic.apic.dest import arbitrate, lowest_priority_candidates, resolve
from navic.apic.icr import Icr


def _flat_system(n: int, **kw: object):  # type: ignore[no-untyped-def]
    bus, apics = make_system(list(range(n)), **kw)
    for i, a in enumerate(apics):
        sw_enable(a)
        a.mmio_write(R.APIC_LDR, (1 << i) << 24)
    return bus, apics


def test_vector_hashing_is_default_and_kvm_compatible() -> None:
    _, apics = _flat_system(4)
    src = apics[0]
    assert src.lowest_priority == "vector_hashing"
    icr = Icr(0x41, delivery_mode=1, dest_mode=1, dest=0b1110)  # candidates 1, 2, 3
    (got,) = resolve(apics, src, icr)
    assert got is apics[1 + 0x41 % 3]
    (got,) = resolve(apics, src, Icr(0x42, delivery_mode=1, dest_mode=1, dest=0b1110))
    assert got is apics[1 + 0x42 % 3]


def test_sw_disabled_apic_is_not_a_candidate() -> None:
    _, apics = _flat_system(4)
    apics[2].mmio_write(R.APIC_SVR, 0xFF)
    icr = Icr(0x40, delivery_mode=1, dest_mode=1, dest=0x0F)
    cands = lowest_priority_candidates(apics, apics[0], icr)
    assert cands == [apics[0], apics[1], apics[3]]
    assert resolve(apics, apics[0], icr) == [cands[0x40 % 3]]
    for a in apics:
        a.mmio_write(R.APIC_SVR, 0xFF)
    assert resolve(apics, apics[0], icr) == []


def test_lowest_priority_rule_uses_ppr_then_apic_id() -> None:
    _, apics = _flat_system(4, lowest_priority="lowest_priority")
    for a, tpr in zip(apics, (0x50, 0x20, 0x20, 0x30), strict=True):
        a.mmio_write(R.APIC_TPR, tpr)
    icr = Icr(0x60, delivery_mode=1, dest_mode=1, dest=0x0F)
    assert resolve(apics, apics[0], icr) == [apics[1]]  # PPR 0x20, tie with #2 -> lower ID
    apics[1].accept_irq(0, 0x90)
    apics[1].ack_interrupt()  # PPR of #1 becomes 0x90
    assert resolve(apics, apics[0], icr) == [apics[2]]
    # the argument overrides the source's rule
    assert resolve(apics, apics[0], icr, "vector_hashing") == [apics[0x60 % 4]]


def test_round_robin_rotates() -> None:
    bus, apics = _flat_system(3, lowest_priority="round_robin")
    src = apics[0]
    src.mmio_write(R.APIC_ICR2, 0x07 << 24)
    got = []
    for _ in range(6):
        src.mmio_write(R.APIC_ICR, 0x100 | 0x800 | 0x51)
        got.append(next(i for i, a in enumerate(apics) if a.test_irr(0x51)))
        for a in apics:
            a.clear_irr(0x51)
    assert got == [0, 1, 2, 0, 1, 2]
    assert [a.arb_prio for a in apics] == [2, 2, 2]


def test_lowest_priority_delivers_exactly_once_end_to_end() -> None:
    bus, apics = _flat_system(4)
    apics[3].mmio_write(R.APIC_ICR2, 0xFF << 24)
    apics[3].mmio_write(R.APIC_ICR, 0x100 | 0x800 | 0x77)  # logical broadcast, lowest priority
    assert sum(a.test_irr(0x77) for a in apics) == 1
    apics[3].mmio_write(R.APIC_ICR, 0xC0000 | 0x100 | 0x78)  # all-excluding-self
    winners = [a for a in apics if a.test_irr(0x78)]
    assert len(winners) == 1 and winners[0] is not apics[3]


def test_unknown_rule() -> None:
    _, apics = _flat_system(2)
    with pytest.raises(ValueError):
        arbitrate(apics, Icr(0x40, delivery_mode=1), "bogus")
