"""xAPIC MMIO and x2APIC MSR interfaces, access rules and #GP (SDM §11.4.1, §11.12.1, Table 11-6)."""

from __future__ import annotations

import pytest
from _apic_util import enabled_apic

from navic.apic import registers as R
from navic.apic.lapic import GPFault

X2_READ_ONLY = [0x802, 0x803, 0x80A, 0x80D, 0x839] + list(range(0x810, 0x828))
X2_ABSENT = [0x800, 0x801, 0x804, 0x807, 0x809, 0x80C, 0x80E, 0x82F, 0x831, 0x83A, 0x83D, 0x840, 0x8FF]


def test_x2apic_msrs_gp_in_xapic_mode() -> None:
    _, a = enabled_apic(1)
    for msr in (0x802, 0x808, 0x830, 0x80B, 0x83F):
        with pytest.raises(GPFault):
            a.rdmsr(msr)
        with pytest.raises(GPFault):
            a.wrmsr(msr, 0)
    _, d = enabled_apic(1, mode="disabled")
    with pytest.raises(GPFault):
        d.rdmsr(0x802)


@pytest.mark.parametrize("msr", X2_READ_ONLY)
def test_x2apic_write_to_read_only_gp(msr: int) -> None:
    _, a = enabled_apic(1, mode="x2apic")
    before = a.rdmsr(msr)
    with pytest.raises(GPFault) as e:
        a.wrmsr(msr, before)
    assert "read-only" in e.value.reason
    assert a.rdmsr(msr) == before


@pytest.mark.parametrize("msr", [0x80B, 0x83F])
def test_x2apic_read_of_write_only_gp(msr: int) -> None:
    _, a = enabled_apic(1, mode="x2apic")
    with pytest.raises(GPFault) as e:
        a.rdmsr(msr)
    assert "write-only" in e.value.reason


@pytest.mark.parametrize("msr", X2_ABSENT)
def test_x2apic_absent_registers_gp(msr: int) -> None:
    _, a = enabled_apic(1, mode="x2apic")
    with pytest.raises(GPFault):
        a.rdmsr(msr)
    with pytest.raises(GPFault):
        a.wrmsr(msr, 0)


def test_x2apic_readable_values() -> None:
    hooks, a = enabled_apic(0x42, mode="x2apic")
    assert a.rdmsr(0x802) == 0x42
    assert a.rdmsr(0x803) == 0x00050014
    assert a.rdmsr(0x80D) == (0x4 << 16) | (1 << 2)
    assert a.rdmsr(0x80F) == 0x1FF
    a.accept_irq(0, 0x61, trigger=1)
    assert a.rdmsr(0x820 + 3) == 1 << 1 and a.rdmsr(0x818 + 3) == 1 << 1
    assert a.rdmsr(0x80A) == 0


@pytest.mark.parametrize(
    "msr,value",
    [
        (0x808, 0x100),  # TPR bits 31:8
        (0x808, 1 << 32),  # bits 63:32 of any 32-bit register
        (0x80B, 1),  # EOI must be written with 0
        (0x828, 1),  # ESR must be written with 0
        (0x80F, 1 << 10),  # SVR reserved bit (no directed-EOI support)
        (0x832, 1 << 19),  # LVT timer bit 19
        (0x833, 1 << 13),  # LVT thermal has no polarity bit
        (0x837, 0x700),  # LVT error has no delivery mode
        (0x835, 1 << 17),  # LINT0 bit 17
        (0x83E, 0x4),  # TDCR bit 2
        (0x83F, 0x100),  # SELF_IPI bits 31:8
        (0x830, 1 << 13),  # ICR reserved bit 13
        (0x830, 1 << 12),  # ICR delivery status is reserved in x2APIC
        (0x830, 1 << 20),  # ICR bits 31:20
    ],
)
def test_x2apic_reserved_bits_gp(msr: int, value: int) -> None:
    hooks, a = enabled_apic(3, mode="x2apic")
    a.set_isr(0x50)
    before = {m: a.rdmsr(m) for m in (0x808, 0x80F, 0x832, 0x833, 0x835, 0x837, 0x83E, 0x830)}
    with pytest.raises(GPFault):
        a.wrmsr(msr, value)
    assert {m: a.rdmsr(m) for m in before} == before
    assert a.test_isr(0x50)  # a faulting EOI write did not EOI
    assert hooks.ipis == []


def test_x2apic_id_and_ldr_read_only_but_derived() -> None:
    _, a = enabled_apic(0x10005, mode="x2apic")
    assert a.apic_id == 0x10005
    assert a.rdmsr(0x80D) == (0x1000 << 16) | (1 << 5)
    with pytest.raises(GPFault):
        a.wrmsr(0x802, 7)
    with pytest.raises(GPFault):
        a.wrmsr(0x80D, 0)
    assert not a.write_reg(R.APIC_ID, 7)  # register level: refused, never raises
    assert a.apic_id == 0x10005


def test_x2apic_icr_is_one_64bit_msr() -> None:
    hooks, a = enabled_apic(2, mode="x2apic")
    a.wrmsr(0x830, (0x1234 << 32) | 0x4031)
    assert a.rdmsr(0x830) == (0x1234 << 32) | 0x4031
    # split storage: low half at 300h, high half at 310h (x2AVIC backing page layout)
    assert a.regs[0x300 >> 2] == 0x4031 and a.regs[0x310 >> 2] == 0x1234
    (src, icr), = hooks.ipis
    assert src is a and icr.dest == 0x1234 and icr.vector == 0x31 and icr.level == 1


def test_x2apic_self_ipi_msr() -> None:
    hooks, a = enabled_apic(2, mode="x2apic")
    a.wrmsr(0x83F, 0x77)
    (src, icr), = hooks.ipis
    assert (icr.shorthand, icr.vector, icr.delivery_mode) == (1, 0x77, 0)
    assert not a.write_reg(R.APIC_SELF_IPI, 0x177)


def test_x2apic_eoi_zero_and_esr_zero_ok() -> None:
    _, a = enabled_apic(2, mode="x2apic")
    a.set_isr(0x40)
    a.wrmsr(0x80B, 0)
    assert a.highest_isr() == -1
    a.wrmsr(0x828, 0)


def test_xapic_mmio_illegal_register_and_alignment() -> None:
    _, a = enabled_apic(1)
    assert a.mmio_read(0x40) == 0
    assert a.esr_pending == R.ESR_ILLEGAL_REGISTER
    a.mmio_write(R.APIC_ESR, 0)
    assert a.mmio_read(R.APIC_ESR) == R.ESR_ILLEGAL_REGISTER
    a.mmio_write(R.APIC_ESR, 0)
    a.mmio_write(R.APIC_SELF_IPI, 0x40)  # SELF_IPI does not exist in xAPIC mode
    a.mmio_write(R.APIC_ESR, 0)
    assert a.mmio_read(R.APIC_ESR) == R.ESR_ILLEGAL_REGISTER
    a.mmio_write(R.APIC_TPR + 4, 0x50)  # not 16-byte aligned: dropped, no error
    assert a.mmio_read(R.APIC_TPR) == 0 and a.mmio_read(R.APIC_TPR + 4) == 0
    assert a.esr_pending == 0
    with pytest.raises(ValueError):
        a.mmio_read(0x1000)


def test_mmio_not_decoded_in_x2apic_or_disabled() -> None:
    _, a = enabled_apic(1, mode="x2apic")
    assert a.mmio_read(R.APIC_ID) == 0xFFFFFFFF
    a.mmio_write(R.APIC_TPR, 0x80)
    assert a.rdmsr(0x808) == 0
    _, d = enabled_apic(1, mode="disabled")
    assert d.mmio_read(R.APIC_LVR) == 0xFFFFFFFF


def test_xapic_mode_offset_semantics() -> None:
    hooks, a = enabled_apic(1)
    a.mmio_write(R.APIC_ICR2, 0x05000000)
    a.mmio_write(R.APIC_ICR, 0x1000 | 0x4000 | 0x45)  # delivery-status bit is read-only
    assert a.mmio_read(R.APIC_ICR) == 0x4045
    (src, icr), = hooks.ipis
    assert icr.dest == 5 and icr.vector == 0x45 and not icr.x2apic


def test_non_apic_msr() -> None:
    _, a = enabled_apic(1)
    with pytest.raises(GPFault):
        a.rdmsr(0x10)
    with pytest.raises(GPFault):
        a.wrmsr(0x10, 0)
    assert a.rdmsr(0x1B) == a.apic_base
