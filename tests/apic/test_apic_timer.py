"""APIC timer (SDM §11.5.4): one-shot, periodic, TSC-deadline, divide configuration.

One timer count = cycles_per_timer_tick core cycles x divide value."""

from __future__ import annotations

import pytest
from _apic_util import enabled_apic

from navic.apic import registers as R
from navic.apic.timer import divide_value, tdcr_for_divide

ONESHOT = 0
PERIODIC = 1 << 17
TSCDL = 2 << 17


def test_divide_values() -> None:
    assert [divide_value(t) for t in (0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB)] == [
        2, 4, 8, 16, 32, 64, 128, 1]
    assert divide_value(0x4) == 2  # bit 2 is not part of the encoding
    assert tdcr_for_divide(1) == 0xB and tdcr_for_divide(16) == 0x3
    with pytest.raises(ValueError):
        tdcr_for_divide(3)


def test_one_shot() -> None:
    hooks, a = enabled_apic(0, cycles_per_timer_tick=10)
    hooks.clock = 1000
    a.mmio_write(R.APIC_TDCR, 0x1)  # divide by 4 -> 40 cycles per count
    a.mmio_write(R.APIC_LVTT, ONESHOT | 0x40)
    a.mmio_write(R.APIC_TMICT, 100)
    assert hooks.timers[-1] == (a, 1000 + 100 * 40)
    assert a.mmio_read(R.APIC_TMCCT) == 100
    assert a.regs[R.APIC_TMCCT >> 2] == 0  # the count is derived, not stored
    hooks.clock = 1001
    assert a.mmio_read(R.APIC_TMCCT) == 100  # a count lasts 40 cycles
    hooks.clock = 1040
    assert a.mmio_read(R.APIC_TMCCT) == 99
    hooks.clock = 1000 + 50 * 40 + 1
    assert a.mmio_read(R.APIC_TMCCT) == 50
    a.timer_expired()  # early (stale) call: ignored
    assert not a.test_irr(0x40)
    hooks.clock = 5000
    a.timer_expired()
    assert a.test_irr(0x40) and a.has_interrupt() == 0x40
    assert a.mmio_read(R.APIC_TMCCT) == 0 and a.mmio_read(R.APIC_TMICT) == 100
    assert a.timer_deadline is None
    n = len(hooks.timers)
    hooks.clock = 9000
    a.timer_expired()  # does not fire again
    assert len(hooks.timers) == n


def test_periodic_rearms() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_TDCR, 0xB)  # divide by 1
    a.mmio_write(R.APIC_LVTT, PERIODIC | 0x41)
    a.mmio_write(R.APIC_TMICT, 50)
    assert hooks.timers[-1] == (a, 50)
    hooks.clock = 50
    a.timer_expired()
    assert a.test_irr(0x41) and hooks.timers[-1] == (a, 100)
    assert a.mmio_read(R.APIC_TMCCT) == 50  # reloaded
    hooks.clock = 130
    assert a.mmio_read(R.APIC_TMCCT) == 20
    hooks.clock = 260  # late by more than a period: missed periods coalesce
    a.timer_expired()
    assert hooks.timers[-1] == (a, 300)
    hooks.clock = 275
    assert a.mmio_read(R.APIC_TMCCT) == 25


def test_masked_timer_counts_but_does_not_interrupt() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTT, R.LVT_MASKED | PERIODIC | 0x42)
    a.mmio_write(R.APIC_TMICT, 10)  # 10 counts x 2 (reset divide) = 20 cycles
    hooks.clock = 20
    a.timer_expired()
    assert not a.test_irr(0x42)
    assert hooks.timers[-1] == (a, 40)


def test_tmict_zero_stops_and_rewrite_restarts() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTT, 0x43)
    a.mmio_write(R.APIC_TMICT, 10)
    hooks.clock = 5
    a.mmio_write(R.APIC_TMICT, 10)
    assert hooks.timers[-1] == (a, 25)
    a.mmio_write(R.APIC_TMICT, 0)
    assert hooks.timers[-1] == (a, None) and a.mmio_read(R.APIC_TMCCT) == 0


def test_divide_change_while_running_keeps_count() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_TDCR, 0xB)
    a.mmio_write(R.APIC_LVTT, 0x44)
    a.mmio_write(R.APIC_TMICT, 100)
    hooks.clock = 40
    a.mmio_write(R.APIC_TDCR, 0x0)  # divide by 2 from now on
    assert a.mmio_read(R.APIC_TMCCT) == 60
    assert hooks.timers[-1] == (a, 40 + 60 * 2)


def test_tsc_deadline_mode() -> None:
    hooks, a = enabled_apic(0)
    a.wrmsr(0x6E0, 500)  # ignored outside TSC-deadline mode
    assert a.rdmsr(0x6E0) == 0
    a.mmio_write(R.APIC_LVTT, TSCDL | 0x45)
    hooks.clock = 100
    a.wrmsr(0x6E0, 500)
    assert a.rdmsr(0x6E0) == 500 and hooks.timers[-1] == (a, 500)
    a.mmio_write(R.APIC_TMICT, 7)  # ignored in TSC-deadline mode
    assert a.mmio_read(R.APIC_TMICT) == 0 and a.mmio_read(R.APIC_TMCCT) == 0
    hooks.clock = 500
    a.timer_expired()
    assert a.test_irr(0x45) and a.rdmsr(0x6E0) == 0  # fired: disarmed and cleared
    a.clear_irr(0x45)
    a.wrmsr(0x6E0, 400)  # already in the past: fires immediately
    assert a.test_irr(0x45) and a.rdmsr(0x6E0) == 0
    a.clear_irr(0x45)
    a.wrmsr(0x6E0, 900)
    a.wrmsr(0x6E0, 0)  # 0 disarms
    assert hooks.timers[-1] == (a, None)
    hooks.clock = 1000
    a.timer_expired()
    assert not a.test_irr(0x45)


def test_mode_switch_to_tsc_deadline_disarms() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTT, 0x46)
    a.mmio_write(R.APIC_TMICT, 100)
    a.mmio_write(R.APIC_LVTT, TSCDL | 0x46)
    assert hooks.timers[-1] == (a, None) and a.mmio_read(R.APIC_TMICT) == 0
    a.wrmsr(0x6E0, 50)
    a.mmio_write(R.APIC_LVTT, ONESHOT | 0x46)
    assert hooks.timers[-1] == (a, None) and a.rdmsr(0x6E0) == 0


def test_oneshot_periodic_switch_keeps_running() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTT, 0x47)
    a.mmio_write(R.APIC_TMICT, 10)
    a.mmio_write(R.APIC_LVTT, PERIODIC | 0x47)
    hooks.clock = 20
    a.timer_expired()
    assert a.test_irr(0x47) and hooks.timers[-1] == (a, 40)


def test_x2apic_timer_msrs() -> None:
    hooks, a = enabled_apic(0, mode="x2apic")
    a.wrmsr(0x83E, 0xB)
    a.wrmsr(0x832, 0x48)
    a.wrmsr(0x838, 30)
    hooks.clock = 10
    assert a.rdmsr(0x839) == 20
    assert a.rdmsr(0x838) == 30


def test_sw_disable_masks_timer_delivery() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_LVTT, 0x49)
    a.mmio_write(R.APIC_TMICT, 5)
    a.mmio_write(R.APIC_SVR, 0xFF)
    hooks.clock = 10
    a.timer_expired()
    assert a.highest_irr() == -1
