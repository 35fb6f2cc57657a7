"""IA32_APIC_BASE transitions (SDM §11.4.4, §11.12.5; KVM kvm_apic_set_base)."""

from __future__ import annotations

import pytest
from _apic_util import enabled_apic

from navic.apic import registers as R
from navic.apic.lapic import GPFault, LocalApic

BASE = 0xFEE00000
EN = 1 << 11
EXTD = 1 << 10
BSP = 1 << 8


def test_xapic_to_x2apic_ok_and_ids() -> None:
    hooks, a = enabled_apic(0x1A5)  # xAPIC ID is the low 8 bits
    assert a.apic_id == 0xA5 and a.mmio_read(R.APIC_ID) == 0xA5000000
    a.mmio_write(R.APIC_TPR, 0x30)
    a.wrmsr(0x1B, BASE | EN | EXTD)
    assert a.mode == "x2apic" and a.x2apic
    assert a.rdmsr(0x1B) == BASE | EN | EXTD
    assert a.apic_id == 0x1A5 and a.rdmsr(0x802) == 0x1A5
    assert a.rdmsr(0x80D) == (0x1A << 16) | (1 << 5)
    assert a.rdmsr(0x808) == 0x30  # other registers are kept


def test_x2apic_id_of_small_id_matches_xapic_id() -> None:
    _, a = enabled_apic(3)
    xid = a.apic_id
    a.set_apic_base(BASE | EN | EXTD)
    assert a.apic_id == xid == 3


@pytest.mark.parametrize(
    "start,new",
    [
        ("x2apic", BASE | EN),  # x2APIC -> xAPIC
        ("disabled", BASE | EN | EXTD),  # disabled -> x2APIC
        ("xapic", BASE | EXTD),  # EN=0, EXTD=1
        ("x2apic", BASE | EXTD),
        ("xapic", BASE | EN | 0x1),  # reserved bit 0
        ("xapic", BASE | EN | (1 << 9)),  # reserved bit 9
        ("xapic", BASE | EN | (1 << 52)),  # above MAXPHYADDR
    ],
)
def test_illegal_transitions_gp(start: str, new: int) -> None:
    _, a = enabled_apic(2, mode=start)
    before = a.apic_base
    with pytest.raises(GPFault):
        a.wrmsr(0x1B, new)
    assert a.apic_base == before and a.mode == start


def test_x2apic_to_xapic_via_disabled() -> None:
    hooks, a = enabled_apic(9, mode="x2apic")
    a.wrmsr(0x808, 0x20)
    a.accept_irq(0, 0x90)
    a.accept_irq(4, 0)
    a.wrmsr(0x1B, BASE)  # disable: legal
    assert a.mode == "disabled"
    assert a.apic_id == 9
    assert not a.accept_irq(0, 0x91) and not a.accept_irq(4, 0)
    assert a.has_interrupt() == -1
    a.wrmsr(0x1B, BASE | EN)  # disabled -> xAPIC: legal, registers at reset values
    assert a.mode == "xapic"
    assert a.mmio_read(R.APIC_ID) == 9 << 24
    assert a.mmio_read(R.APIC_TPR) == 0 and a.highest_irr() == -1
    assert a.mmio_read(R.APIC_SVR) == 0xFF and a.mmio_read(R.APIC_LVT0) == 1 << 16
    assert not a.nmi_pending


def test_disable_resets_state_and_stops_timer() -> None:
    hooks, a = enabled_apic(1)
    a.mmio_write(R.APIC_LVTT, 0x40)
    a.mmio_write(R.APIC_TMICT, 100)
    assert a.timer_deadline is not None
    a.set_apic_base(BASE)
    assert a.timer_deadline is None and hooks.timers[-1] == (a, None)
    assert a.rdmsr(0x1B) == BASE


def test_bsp_bit_and_base_relocation() -> None:
    a = LocalApic(0, bsp=True)
    assert a.apic_base & BSP
    a.wrmsr(0x1B, 0xFEC00000 | EN | BSP)
    assert a.apic_base == 0xFEC00000 | EN | BSP and a.mode == "xapic"
    a.wrmsr(0x1B, 0xFEC00000 | EN)
    assert not a.apic_base & BSP


def test_same_value_is_noop() -> None:
    hooks, a = enabled_apic(1, mode="x2apic")
    a.wrmsr(0x808, 0x10)
    a.wrmsr(0x1B, a.apic_base)
    assert a.rdmsr(0x808) == 0x10


def test_reset_returns_to_xapic() -> None:
    _, a = enabled_apic(0x300, mode="x2apic")
    a.reset()
    assert a.mode == "xapic" and a.apic_id == 0x00 and a.apic_base == BASE | EN
