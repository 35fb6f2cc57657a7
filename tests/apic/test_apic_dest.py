"""Destination matching (SDM §11.6.2, §11.12.9-10): physical, logical flat/cluster, x2APIC cluster,
shorthands and broadcasts."""

from __future__ import annotations

from _apic_util import make_system, sw_enable
from hypothesis import given, settings
from hypothesis import strategies as st

from navic.apic import registers as R
from navic.apic.dest import lowest_priority_candidates, match_dest, resolve
from navic.apic.icr import Icr
from navic.apic.lapic import LocalApic


def ids(apics: list[LocalApic]) -> list[int]:
    return [a.apic_id for a in apics]


def test_physical_xapic() -> None:
    _, apics = make_system([0, 1, 2, 0x1F])
    src = apics[0]
    assert ids(resolve(apics, src, Icr(0x40, dest=2))) == [2]
    assert ids(resolve(apics, src, Icr(0x40, dest=0x1F))) == [0x1F]
    assert resolve(apics, src, Icr(0x40, dest=5)) == []
    assert ids(resolve(apics, src, Icr(0x40, dest=0xFF))) == [0, 1, 2, 0x1F]  # broadcast incl. self
    apics[1].mmio_write(R.APIC_ID, 0x09000000)  # xAPIC ID is writable
    assert ids(resolve(apics, src, Icr(0x40, dest=9))) == [9]


def test_physical_x2apic_and_broadcast() -> None:
    _, apics = make_system([0, 0x100, 0x1FF, 0xFF], mode="x2apic")
    src = apics[0]
    assert ids(resolve(apics, src, Icr(0x40, dest=0x100, x2apic=True))) == [0x100]
    assert ids(resolve(apics, src, Icr(0x40, dest=0xFF, x2apic=True))) == [0xFF]  # not a broadcast
    assert len(resolve(apics, src, Icr(0x40, dest=0xFFFFFFFF, x2apic=True))) == 4


def test_logical_flat() -> None:
    _, apics = make_system([0, 1, 2, 3])
    for i, a in enumerate(apics):
        a.mmio_write(R.APIC_LDR, (1 << i) << 24)
    src = apics[0]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0b0110))) == [1, 2]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0xFF))) == [0, 1, 2, 3]
    assert resolve(apics, src, Icr(0x40, dest_mode=1, dest=0)) == []
    apics[3].mmio_write(R.APIC_LDR, 0x03 << 24)  # LDR bits may overlap: both match
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x01))) == [0, 3]


def test_logical_cluster() -> None:
    _, apics = make_system([0, 1, 2, 3])
    ldrs = [0x11, 0x12, 0x21, 0x24]
    for a, ldr in zip(apics, ldrs, strict=True):
        a.mmio_write(R.APIC_DFR, 0x0FFFFFFF)
        a.mmio_write(R.APIC_LDR, ldr << 24)
    src = apics[0]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x13))) == [0, 1]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x25))) == [2, 3]
    assert resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x31)) == []
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0xFF))) == [0, 1, 2, 3]  # broadcast
    # a flat-model APIC interprets the same destination as a bitmap
    apics[3].mmio_write(R.APIC_DFR, 0xFFFFFFFF)
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x25))) == [2, 3]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x13))) == [0, 1]
    # unknown model: never matches (except broadcast)
    apics[2].mmio_write(R.APIC_DFR, 0x5FFFFFFF)
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0x21))) == [3]  # #3 is flat now
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0xFF))) == [0, 1, 2, 3]


def test_logical_x2apic_cluster() -> None:
    _, apics = make_system([0x00, 0x01, 0x0F, 0x10, 0x21], mode="x2apic")
    src = apics[0]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=(0 << 16) | 0x8003, x2apic=True))) == [
        0x00, 0x01, 0x0F]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=(1 << 16) | 0x1, x2apic=True))) == [0x10]
    assert ids(resolve(apics, src, Icr(0x40, dest_mode=1, dest=(2 << 16) | 0x2, x2apic=True))) == [0x21]
    assert resolve(apics, src, Icr(0x40, dest_mode=1, dest=(2 << 16) | 0x1, x2apic=True)) == []
    assert len(resolve(apics, src, Icr(0x40, dest_mode=1, dest=0xFFFFFFFF, x2apic=True))) == 5


def test_shorthands() -> None:
    _, apics = make_system([0, 1, 2])
    src = apics[1]
    assert resolve(apics, src, Icr(0x40, shorthand=1, dest=0)) == [src]
    assert resolve(apics, src, Icr(0x40, shorthand=2)) == apics
    assert resolve(apics, src, Icr(0x40, shorthand=3)) == [apics[0], apics[2]]
    # the destination field is ignored with a shorthand
    assert resolve(apics, src, Icr(0x40, shorthand=3, dest=1)) == [apics[0], apics[2]]
    # no source APIC (IOAPIC/MSI): self matches nothing
    assert not any(match_dest(a, None, Icr(0x40, shorthand=1)) for a in apics)


def test_disabled_apic_never_matches() -> None:
    _, apics = make_system([0, 1, 2])
    apics[2].set_apic_base(0xFEE00000)
    src = apics[0]
    assert ids(resolve(apics, src, Icr(0x40, dest=0xFF))) == [0, 1]
    assert ids(resolve(apics, src, Icr(0x40, shorthand=2))) == [0, 1]
    assert resolve(apics, src, Icr(0x40, dest=2)) == []


def test_end_to_end_ipi_delivery() -> None:
    bus, apics = make_system([0, 1, 2, 3])
    for a in apics:
        sw_enable(a)
    apics[0].mmio_write(R.APIC_ICR2, 0xFF << 24)
    apics[0].mmio_write(R.APIC_ICR, 0x4000 | 0x80000 | 0x33)  # all-including-self
    assert all(a.has_interrupt() == 0x33 for a in apics)
    apics[2].mmio_write(R.APIC_ICR, 0xC0000 | 0x4000 | 0x400)  # NMI to all-excluding-self
    assert [a.nmi_pending for a in apics] == [True, True, False, True]


# --- property: resolve() agrees with a brute-force match_dest filter --------------------------
xapic_setup = st.lists(
    st.tuples(st.integers(0, 0xFE), st.integers(0, 255), st.sampled_from([0xFFFFFFFF, 0x0FFFFFFF]),
              st.booleans()),
    min_size=1, max_size=8, unique_by=lambda t: t[0],
)


@settings(max_examples=200, deadline=None)
@given(setup=xapic_setup, vector=st.integers(16, 255), dm=st.sampled_from([0, 1, 4]),
       dest_mode=st.integers(0, 1), shorthand=st.integers(0, 3), dest=st.integers(0, 255),
       src_index=st.integers(0, 7), rule=st.sampled_from(["vector_hashing", "lowest_priority",
                                                           "round_robin"]))
def test_prop_resolve_matches_brute_force_xapic(
    setup: list[tuple[int, int, int, bool]], vector: int, dm: int, dest_mode: int, shorthand: int,
    dest: int, src_index: int, rule: str,
) -> None:
    apics = [LocalApic(i) for i, *_ in setup]
    for a, (_, ldr, dfr, enabled) in zip(apics, setup, strict=True):
        a.mmio_write(R.APIC_LDR, ldr << 24)
        a.mmio_write(R.APIC_DFR, dfr)
        if enabled:
            sw_enable(a)
    src = apics[src_index % len(apics)]
    icr = Icr(vector, dm, dest_mode, 1, 0, shorthand, dest)
    _check_resolve(apics, src, icr, rule)


@settings(max_examples=200, deadline=None)
@given(ids_=st.sets(st.integers(0, 0x3F), min_size=1, max_size=8), vector=st.integers(16, 255),
       dm=st.sampled_from([0, 1]), dest_mode=st.integers(0, 1), shorthand=st.integers(0, 3),
       dest=st.one_of(st.integers(0, 0x3FFFF), st.just(0xFFFFFFFF)), src_index=st.integers(0, 7))
def test_prop_resolve_matches_brute_force_x2apic(
    ids_: set[int], vector: int, dm: int, dest_mode: int, shorthand: int, dest: int, src_index: int
) -> None:
    apics = [LocalApic(i, mode="x2apic") for i in sorted(ids_)]
    for a in apics:
        sw_enable(a)
    src = apics[src_index % len(apics)]
    icr = Icr(vector, dm, dest_mode, 1, 0, shorthand, dest, True)
    _check_resolve(apics, src, icr, "vector_hashing")


def _check_resolve(apics: list[LocalApic], src: LocalApic, icr: Icr, rule: str) -> None:
    brute = [a for a in apics if match_dest(a, src, icr)]
    got = resolve(apics, src, icr, rule)
    if icr.shorthand == 1:
        assert got == [src] == brute
    elif icr.delivery_mode != 1:
        assert got == brute
    else:
        legal = lowest_priority_candidates(apics, src, icr)
        assert legal == [a for a in brute if a.sw_enabled]
        assert len(got) == min(1, len(legal))
        assert all(a in legal for a in got)
