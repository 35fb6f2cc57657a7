"""ICR encode/decode (SDM §11.6.1, Figures 11-12 / 11-28) and the ICR write path."""

from __future__ import annotations

from _apic_util import enabled_apic
from hypothesis import given, settings
from hypothesis import strategies as st

from navic.apic import registers as R
from navic.apic.icr import Icr


def test_decode_fields_xapic() -> None:
    # vector 0x31, lowest priority, logical, level assert, level trigger, all-excluding-self
    low = 0x31 | (1 << 8) | (1 << 11) | (1 << 14) | (1 << 15) | (3 << 18)
    icr = Icr.decode(low | (1 << 12) | (1 << 13) | 0xFFF00000, 0xAB00_1234, False)
    assert icr == Icr(0x31, 1, 1, 1, 1, 3, 0xAB, False)
    assert icr.encode() == (low, 0xAB000000)


def test_decode_fields_x2apic() -> None:
    icr = Icr.decode(0x4000 | (5 << 8) | 0x00, 0xFFFFFFFF, True)
    assert (icr.delivery_mode, icr.dest, icr.level, icr.x2apic) == (5, 0xFFFFFFFF, 1, True)
    assert icr.is_broadcast
    assert icr.encode64() == (0xFFFFFFFF << 32) | 0x4500


def test_delivery_mode_encodings() -> None:
    assert [Icr.decode(dm << 8, 0, False).delivery_mode for dm in range(8)] == list(range(8))


def test_icr_write_sends_and_clears_busy() -> None:
    hooks, a = enabled_apic(0)
    a.mmio_write(R.APIC_ICR2, 0x07000000)
    a.mmio_write(R.APIC_ICR, 0x000C4FFF | (1 << 12))
    assert a.mmio_read(R.APIC_ICR) & R.ICR_BUSY == 0  # delivery is instantaneous: idle
    (src, icr), = hooks.ipis
    assert icr == Icr(0xFF, 7, 1, 1, 0, 3, 7, False)
    # writing ICR2 alone sends nothing
    a.mmio_write(R.APIC_ICR2, 0x08000000)
    assert len(hooks.ipis) == 1


def test_write_reg_x2apic_icr_trap_replay() -> None:
    """A hypervisor replaying a trapped x2APIC ICR write passes the 64-bit page value back."""
    hooks, a = enabled_apic(0, mode="x2apic")
    a.regs[0x300 >> 2] = 0x4041
    a.regs[0x310 >> 2] = 0x22
    assert a.write_reg(R.APIC_ICR, a.read_reg(R.APIC_ICR))
    assert hooks.ipis[0][1] == Icr(0x41, dest=0x22, x2apic=True)


icrs = st.builds(
    Icr,
    vector=st.integers(0, 255),
    delivery_mode=st.integers(0, 7),
    dest_mode=st.integers(0, 1),
    level=st.integers(0, 1),
    trigger=st.integers(0, 1),
    shorthand=st.integers(0, 3),
    dest=st.integers(0, 255),
    x2apic=st.just(False),
) | st.builds(
    Icr,
    vector=st.integers(0, 255),
    delivery_mode=st.integers(0, 7),
    dest_mode=st.integers(0, 1),
    level=st.integers(0, 1),
    trigger=st.integers(0, 1),
    shorthand=st.integers(0, 3),
    dest=st.integers(0, 0xFFFFFFFF),
    x2apic=st.just(True),
)


@settings(max_examples=500, deadline=None)
@given(icr=icrs)
def test_prop_encode_decode_round_trip(icr: Icr) -> None:
    low, high = icr.encode()
    assert low & ~R.ICR_LOW_MASK == 0
    assert Icr.decode(low, high, icr.x2apic) == icr


@settings(max_examples=500, deadline=None)
@given(low=st.integers(0, 0xFFFFFFFF), high=st.integers(0, 0xFFFFFFFF), x2=st.booleans())
def test_prop_decode_encode_keeps_defined_bits(low: int, high: int, x2: bool) -> None:
    lo, hi = Icr.decode(low, high, x2).encode()
    assert lo == low & R.ICR_LOW_MASK
    assert hi == (high if x2 else high & 0xFF000000)
