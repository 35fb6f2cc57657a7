"""Issue 17 items 2-4: how KVM decodes guest MMIO to the APIC page (lapic.c apic_mmio_in_range,
apic_mmio_read, apic_mmio_write) and when it turns AVIC off for a vCPU (__kvm_vcpu_update_apicv:
LAPIC_MODE_DISABLED). Bare metal is the SDM's: a disabled or x2APIC-mode APIC does not claim the
page, which then behaves as memory (docs/model.md)."""

from __future__ import annotations

import pytest
from _peer import cpu, errors, reads, run

SVM_LEVELS = ["zen4", "zen2", "noapicv", "l2"]
ONES = 0xFFFFFFFF


def _disable_enable(level: str) -> dict:
    ops = ['{op="mmio_write", offset=0x80, value=0x20}',
           '{op="wrmsr", msr=0x1b, value=0x100}',                  # EN = 0 (BSP kept)
           '{op="mmio_read", offset=0x30, into="ver"}',
           '{op="mmio_write", offset=0x80, value=0x30}',
           '{op="mmio_read", offset=0x80, into="tpr"}',
           '{op="wrmsr", msr=0x1b, value=0xFEE00900}',             # EN = 1 again
           '{op="mmio_read", offset=0x80, into="tpr_after"}',
           '{op="mmio_read", offset=0x30, into="ver_after"}']
    return run(level, [(ops, None)], apic="xapic")


@pytest.mark.parametrize("level", SVM_LEVELS)
def test_disabled_apic_mmio_reads_all_ones(level: str) -> None:
    """kvm-unit-tests x86/apic.c test_apic_disable / verify_disabled_apic_mmio: with
    IA32_APIC_BASE.EN = 0 the APIC page reads ~0 and a TPR write does not stick; re-enabled, the
    APIC is back with its version and the reset TPR (0)."""
    res = _disable_enable(level)
    r = reads(res, cpu(level, 0))
    assert r["ver"] == ONES and r["tpr"] == ONES, r
    assert r["tpr_after"] == 0 and r["ver_after"] & 0xFF == 0x14, r
    assert errors(res) == []


def test_disabled_apic_turns_avic_off_for_that_vcpu() -> None:
    """__kvm_vcpu_update_apicv(): the hardware-disabled vCPU's accesses are emulated (NPF), not
    accelerated from a backing page that would hold live register values."""
    res = _disable_enable("zen4")
    assert res["exits"]["l0"].get("npf", 0) >= 3, res["exits"]


@pytest.mark.parametrize("level", SVM_LEVELS)
def test_x2apic_mode_mmio_reads_all_ones(level: str) -> None:
    """apic_mmio_read() in x2APIC mode with KVM_X86_QUIRK_LAPIC_MMIO_HOLE: all-ones, writes dropped."""
    ops = ['{op="mmio_write", offset=0x80, value=0x30}', '{op="mmio_read", offset=0x80, into="tpr"}',
           '{op="mmio_read", offset=0x30, into="ver"}', '{op="read", reg="TPR", into="msr_tpr"}']
    r = reads(run(level, [(ops, None)], apic="x2apic"), cpu(level, 0))
    assert r == {"tpr": ONES, "ver": ONES, "msr_tpr": 0}, r


@pytest.mark.parametrize("level", ["bare", *SVM_LEVELS])
def test_relocated_apic_base_decodes_there(level: str) -> None:
    """kvm-unit-tests x86/apic.c test_apicbase "relocate apic": after disabling and re-enabling at
    0xFED40000 the version register reads at the new base (apic_mmio_in_range uses
    apic->base_address); the old page is no longer the APIC."""
    ops = ['{op="mmio_read", offset=0x30, into="ver"}',
           '{op="wrmsr", msr=0x1b, value=0x100}',
           '{op="wrmsr", msr=0x1b, value=0xFED40900}',
           '{op="mmio_read", offset=0x30, into="ver_reloc"}',
           '{op="mmio_write", offset=0x80, value=0x50}',
           '{op="read", reg="TPR", into="tpr_reloc"}']
    r = reads(run(level, [(ops, None)], apic="xapic"), cpu(level, 0))
    assert r["ver_reloc"] == r["ver"] and r["ver"] & 0xFF == 0x14, r
    assert r["tpr_reloc"] == 0x50, r
