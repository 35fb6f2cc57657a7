"""Interrupt Command Register decode/encode (Intel SDM vol. 3 §11.6.1, Figures 11-12 and 11-28).

xAPIC: ICR low at 300h, destination in ICR2 (310h) bits 31:24.  x2APIC: one 64-bit MSR 830h,
destination in bits 63:32 (the model stores it split, low half at 300h and high half at 310h, which is
the AMD x2AVIC backing-page layout).  Bit 12 (delivery status) is read-only in xAPIC and reserved in
x2APIC; the model delivers instantly, so it always reads 0 and decode() ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from navic.apic.registers import ICR_BUSY, ICR_LOW_MASK

DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_REMRD = 3  # reserved encoding (remote read on the 82489DX)
DM_NMI = 4
DM_INIT = 5
DM_SIPI = 6
DM_EXTINT = 7

DEST_PHYSICAL = 0
DEST_LOGICAL = 1

TRIGGER_EDGE = 0
TRIGGER_LEVEL = 1

SH_NONE = 0
SH_SELF = 1
SH_ALL = 2
SH_OTHERS = 3

__all__ = [
    "DM_FIXED", "DM_LOWEST", "DM_SMI", "DM_REMRD", "DM_NMI", "DM_INIT", "DM_SIPI", "DM_EXTINT",
    "DEST_PHYSICAL", "DEST_LOGICAL", "TRIGGER_EDGE", "TRIGGER_LEVEL",
    "SH_NONE", "SH_SELF", "SH_ALL", "SH_OTHERS", "ICR_BUSY", "Icr",
]

_DECODE_CACHE: dict[tuple[int, int, bool], Icr] = {}
_CACHE_MAX = 8192


@dataclass(frozen=True, slots=True)
class Icr:
    """A decoded ICR value.  ``dest`` is the 8-bit xAPIC destination (ICR2[31:24]) when
    ``x2apic`` is False and the 32-bit x2APIC destination otherwise.  ``x2apic`` records which
    format the value came from (an addition to the field list: encode() needs it)."""

    vector: int
    delivery_mode: int = DM_FIXED
    dest_mode: int = DEST_PHYSICAL
    level: int = 1
    trigger: int = TRIGGER_EDGE
    shorthand: int = SH_NONE
    dest: int = 0
    x2apic: bool = False

    @staticmethod
    def decode(low: int, high: int, x2apic: bool) -> Icr:
        """Decode ICR low/high words.  Reserved bits and the delivery-status bit are ignored."""
        key = (low & ICR_LOW_MASK, high & 0xFFFFFFFF, x2apic)
        icr = _DECODE_CACHE.get(key)
        if icr is None:
            lo = key[0]
            icr = Icr(
                lo & 0xFF,
                (lo >> 8) & 7,
                (lo >> 11) & 1,
                (lo >> 14) & 1,
                (lo >> 15) & 1,
                (lo >> 18) & 3,
                key[1] if x2apic else (key[1] >> 24) & 0xFF,
                x2apic,
            )
            if len(_DECODE_CACHE) >= _CACHE_MAX:
                _DECODE_CACHE.clear()
            _DECODE_CACHE[key] = icr
        return icr

    def encode(self) -> tuple[int, int]:
        """(low, high) words; high is ICR2 (dest << 24) in xAPIC format, the 32-bit dest in x2APIC."""
        low = (
            (self.vector & 0xFF)
            | (self.delivery_mode & 7) << 8
            | (self.dest_mode & 1) << 11
            | (self.level & 1) << 14
            | (self.trigger & 1) << 15
            | (self.shorthand & 3) << 18
        )
        high = self.dest & 0xFFFFFFFF if self.x2apic else (self.dest & 0xFF) << 24
        return low, high

    def encode64(self) -> int:
        """The 64-bit x2APIC MSR 830h value (high word in bits 63:32)."""
        low, high = self.encode()
        return high << 32 | low

    @property
    def is_broadcast(self) -> bool:
        return self.shorthand == SH_NONE and self.dest == (0xFFFFFFFF if self.x2apic else 0xFF)
