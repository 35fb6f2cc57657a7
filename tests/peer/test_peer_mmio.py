"""Issue 17 items 2-4: how KVM decodes guest MMIO to the APIC page (lapic.c apic_mmio_in_range,
apic_mmio_read, apic_mmio_write) and when it turns AVIC off for a vCPU (__kvm_vcpu_update_apicv:
LAPIC_MODE_DISABLED). Bare metal is the SDM's: a disabled or x2APIC-mode APIC does not claim the
page, which then behaves as memory (docs/model.md)."""

from __future__ import annotations

import pytest
from _peer import LEVELS, cpu, errors, reads, run

SVM_LEVELS = ["zen4", "zen2", "noapicv", "l2"]
# VMX where KVM emulates the APIC page of a disabled / x2APIC-mode APIC: APICv not activated for
# the VM (kvm_mmu_faultin_pfn: RET_PF_EMULATE for the APIC-access page), at L0 or in L1's KVM.
VMX_EMULATED = ["spr-noapicv", "l2-spr"]
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


@pytest.mark.parametrize("level", [*SVM_LEVELS, *VMX_EMULATED])
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


@pytest.mark.parametrize("level", [*SVM_LEVELS, *VMX_EMULATED])
def test_x2apic_mode_mmio_reads_all_ones(level: str) -> None:
    """apic_mmio_read() in x2APIC mode with KVM_X86_QUIRK_LAPIC_MMIO_HOLE: all-ones, writes dropped."""
    ops = ['{op="mmio_write", offset=0x80, value=0x30}', '{op="mmio_read", offset=0x80, into="tpr"}',
           '{op="mmio_read", offset=0x30, into="ver"}', '{op="read", reg="TPR", into="msr_tpr"}']
    r = reads(run(level, [(ops, None)], apic="x2apic"), cpu(level, 0))
    assert r == {"tpr": ONES, "ver": ONES, "msr_tpr": 0}, r


@pytest.mark.parametrize("level", ["bare", *SVM_LEVELS, "spr", *VMX_EMULATED])
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


def _disable_keeping_base(level: str, ops: list[str]) -> dict:
    """IA32_APIC_BASE.EN = 0 with the base kept at 0xFEE00000 (kvm-unit-tests disable_apic()), then ``ops``."""
    return run(level, [(['{op="wrmsr", msr=0x1b, value=0xFEE00100}', *ops], None)], apic="xapic")


@pytest.mark.parametrize("level", ["bare", *SVM_LEVELS, "spr", *VMX_EMULATED])
def test_verify_disabled_apic_mmio(level: str) -> None:
    """kvm-unit-tests x86/apic.c verify_disabled_apic_mmio as upstream writes it: memset the page to
    0xff, then LVR and TPR read ~0 — whether the page is then memory (bare metal; VMX with APICv
    activated: KVM's APIC-access page) or KVM's emulated MMIO hole."""
    fill = ['{op="mmio_write", offset=0x30, value=0xFFFFFFFF}', '{op="mmio_write", offset=0x80, value=0xFFFFFFFF}']
    res = _disable_keeping_base(level, [*fill, '{op="mmio_read", offset=0x30, into="lvr"}',
                                        '{op="mmio_read", offset=0x80, into="tpr"}'])
    assert reads(res, cpu(level, 0)) == {"lvr": ONES, "tpr": ONES}
    assert errors(res) == []


def test_vmx_disabled_apic_page_is_the_apic_access_page() -> None:
    """spr, APICv activated for the VM: a hardware-disabled APIC has neither "virtualize APIC
    accesses" (vmx_set_virtual_apic_mode: LAPIC_MODE_DISABLED) nor APICv (__kvm_vcpu_update_apicv),
    but the EPT still maps KVM's APIC-access page at 0xFEE00000 (kvm_mmu_faultin_pfn emulates only
    while !kvm_apicv_activated()): the vCPU reads and writes zero-filled memory, without exits.
    Re-enabled, the APIC is back (reset TPR, version) and APICv with it."""
    res = _disable_keeping_base("spr", ['{op="mmio_read", offset=0x30, into="ver"}',
                                        '{op="mmio_write", offset=0x80, value=0x30}',
                                        '{op="mmio_read", offset=0x80, into="tpr"}',
                                        '{op="wrmsr", msr=0x1b, value=0xFEE00900}',
                                        '{op="mmio_read", offset=0x80, into="tpr_after"}',
                                        '{op="mmio_read", offset=0x30, into="ver_after"}'])
    r = reads(res, "l1.0")
    assert (r["ver"], r["tpr"], r["tpr_after"], r["ver_after"] & 0xFF) == (0, 0x30, 0, 0x14), r
    assert set(res["exits"]["l0"]) == {"msr_write", "hlt"}, res["exits"]
    assert res["counters"]["apicv_toggles"] == 2 and res["inhibits"] == {}


def test_vmx_x2apic_mode_apic_page_is_the_apic_access_page() -> None:
    """spr in x2APIC mode with APICv: "virtualize x2APIC mode" replaces "virtualize APIC accesses",
    and the APIC page is KVM's APIC-access page as memory (the register itself is unchanged)."""
    ops = ['{op="mmio_write", offset=0x80, value=0x30}', '{op="mmio_read", offset=0x80, into="tpr"}',
           '{op="mmio_read", offset=0x30, into="ver"}', '{op="read", reg="TPR", into="msr_tpr"}']
    res = run("spr", [(ops, None)], apic="x2apic")
    assert reads(res, "l1.0") == {"tpr": 0x30, "ver": 0, "msr_tpr": 0}
    assert set(res["exits"]["l0"]) == {"hlt"}, res["exits"]


def test_vmx_nested_l2_x2apic_page_is_l1s_apic_access_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested VMX, design dummy (L1's KVM has APICv): vmcs02 maps what L1's EPT maps at 0xFEE00000,
    L1's APIC-access page, so an x2APIC-mode L2 reads and writes it as memory with no exit at all;
    under design none (L1 without APICv) the same accesses are L1's EPT violations, emulated
    (test_x2apic_mode_mmio_reads_all_ones[l2-spr])."""
    monkeypatch.setitem(LEVELS, "l2-spr-dummy", ("spr", "kvm", 2, 'nested_apicv = "dummy"\n'))
    ops = ['{op="mmio_write", offset=0x80, value=0x30}', '{op="mmio_read", offset=0x80, into="tpr"}',
           '{op="mmio_read", offset=0x30, into="ver"}', '{op="read", reg="TPR", into="msr_tpr"}']
    res = run("l2-spr-dummy", [(ops, None)], apic="x2apic")
    assert reads(res, "l2.0") == {"tpr": 0x30, "ver": 0, "msr_tpr": 0}
    assert "ept_violation" not in res["exits"].get("l1", {}) and "l0_l2" not in res["exits"]
