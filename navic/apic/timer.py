"""APIC timer helpers (Intel SDM vol. 3 §11.5.4).

The timer state machine itself lives in :class:`navic.apic.lapic.LocalApic` (``_start_count_timer``,
``_current_count``, ``timer_expired``, ``_write_tsc_deadline``) because it reads and writes the
register page directly.  Time base: one timer count lasts ``cycles_per_timer_tick`` x divide-value
core cycles (TSC cycles as returned by ``hooks.now()``).
"""

from __future__ import annotations

# TDCR bits 3,1,0 -> divide value (bit 2 reserved): 000 -> 2, 001 -> 4, ..., 110 -> 128, 111 -> 1.
_DIVIDE = tuple(1 << ((((i & 3) | ((i & 8) >> 1)) + 1) & 7) for i in range(16))


def divide_value(tdcr: int) -> int:
    """Divide value selected by the Divide Configuration Register (Figure 11-10)."""
    return _DIVIDE[tdcr & 0xF]


def tdcr_for_divide(divide: int) -> int:
    """Inverse of :func:`divide_value` (the canonical TDCR encoding for ``divide``)."""
    for i in (0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB):
        if _DIVIDE[i] == divide:
            return i
    raise ValueError(f"{divide} is not an APIC timer divide value")
