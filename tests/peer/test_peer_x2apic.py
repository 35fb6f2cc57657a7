"""Issue 17 items 5-8: reserved x2APIC MSRs under x2AVIC, the xAPIC ICR's reserved bits under KVM,
x2AVIC/AVIC self-IPIs, and the oracle's view of ICR / SELF_IPI writes that fault."""

from __future__ import annotations

import pytest
from _peer import ALL_LEVELS, cpu, errors, got, reads, run

# Reserved or write-only x2APIC MSRs (SDM Table 11-6): RDMSR must #GP.
NOT_READABLE = (0x800, 0x801, 0x804, 0x807, 0x809, 0x80B, 0x80C, 0x80E, 0x831, 0x83A, 0x83D, 0x83F)


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_rdmsr_of_reserved_x2apic_msrs_faults(level: str) -> None:
    """kvm-unit-tests x86/apic.c test_x2apic_rd_wr / KVM selftests xapic_state_test
    test_apic_regs: RDMSR of a reserved or write-only x2APIC MSR raises #GP. Under x2AVIC only
    the readable registers pass through (avic_set_x2apic_msr_interception); the rest exit and
    kvm_x2apic_msr_read() fails them."""
    ops = [f'{{op="rdmsr", msr={m:#x}, into="m{m:x}"}}' for m in NOT_READABLE]
    ops.append('{op="rdmsr", msr=0x803, into="ver"}')
    res = run(level, [(ops, None)])
    assert sorted(e["index"] for e in errors(res)) == list(range(len(NOT_READABLE)))
    assert all(e["error"].startswith("#GP") for e in errors(res))
    assert list(reads(res, cpu(level, 0))) == ["ver"]


@pytest.mark.parametrize("level", ["zen4", "zen2", "spr", "noapicv", "l2"])
def test_kvm_xapic_icr_keeps_reserved_bits(level: str) -> None:
    """kvm_lapic_reg_write(APIC_ICR) stores the value with only BUSY cleared, so a read-back shows
    the reserved bits that were written (KVM selftests xapic_state_test test_icr: the ICR reads
    back as written minus BUSY); the IPI itself is the decoded fields."""
    ops = ['{op="mmio_write", offset=0x310, value=0x01000000}',
           '{op="mmio_write", offset=0x300, value=0xFFF33040}',
           '{op="mmio_read", offset=0x300, into="icr"}', '{op="mmio_read", offset=0x310, into="icr2"}']
    res = run(level, [(ops, None), (['{op="sti"}', '{op="wait", vector=0x40}'], None)], apic="xapic")
    assert reads(res, cpu(level, 0)) == {"icr": 0xFFF32040, "icr2": 0x01000000}
    assert [d["vector"] for d in got(res, cpu(level, 1))] == [0x40]


def test_bare_xapic_icr_drops_reserved_bits() -> None:
    """Bare metal keeps navic's SDM-undefined choice: reserved ICR bits read 0 (docs/model.md)."""
    ops = ['{op="mmio_write", offset=0x310, value=0x01000000}',
           '{op="mmio_write", offset=0x300, value=0xFFF33040}', '{op="mmio_read", offset=0x300, into="icr"}']
    res = run("bare", [(ops, None), (['{op="sti"}', '{op="wait", vector=0x40}'], None)], apic="xapic")
    assert reads(res, "l1.0") == {"icr": 0x40}


def _three_self_ipis(level: str, apic: str) -> dict:
    if apic == "x2apic":
        sends = [f'{{op="write", reg="SELF_IPI", value={v:#x}}}' for v in (0x40, 0x41, 0x42)]
    else:
        sends = [f'{{op="ipi", shorthand="self", vector={v:#x}}}' for v in (0x40, 0x41, 0x42)]
    ops = ['{op="sti"}', *sends, '{op="cli"}', '{op="read", reg="IRR2", into="irr2"}']
    return run(level, [(ops, None)], apic=apic)


@pytest.mark.parametrize("level,apic", [("zen4", "x2apic"), ("zen4", "xapic"), ("zen2", "xapic"),
                                        ("zen2", "x2apic"), ("spr", "x2apic"), ("l2", "xapic"),
                                        ("l2", "x2apic")])
def test_self_ipis_are_taken_before_the_next_instruction(level: str, apic: str) -> None:
    """kvm-unit-tests x86/apic.c test_self_ipi (and its x2APIC variant): with IF = 1, three
    self-IPIs are all delivered before a following CLI, none is left in IRR. AVIC's "doorbell to
    self" (APM §15.29.6.1 step 1) re-evaluates the vAPIC at once, like Intel's self-IPI
    virtualization (SDM §30.1.3-like); KVM's emulated path delivers on the re-entry."""
    res = _three_self_ipis(level, apic)
    me = cpu(level, 0)
    assert [d["vector"] for d in got(res, me)] == [0x40, 0x41, 0x42]
    assert reads(res, me) == {"irr2": 0}


@pytest.mark.parametrize("level", ["bare", "zen4", "zen2", "noapicv", "l2", "spr", "l2-spr"])
def test_faulting_icr_write_is_not_a_send(level: str) -> None:
    """A WRMSR to ICR with reserved bits (bit 13) or to SELF_IPI with bits 63:8 set raises #GP and
    sends nothing (SDM §11.12.1.2); the oracle must not report those as lost IPIs. On spr the ICR
    write is virtualised (IPIv: not intercepted) and the CPU itself checks the reserved bits (SDM
    §30.5; KVM selftests xapic_state_test expects #GP; kvm_apic_write_nodecode WARNs if an
    APIC-write exit ever brings such a value)."""
    ops = ['{op="sti"}', f'{{op="wrmsr", msr=0x830, value={(1 << 32) | 0x2040:#x}}}',
           '{op="wrmsr", msr=0x83F, value=0x141}', '{op="ipi", to=1, vector=0x42}']
    res = run(level, [(ops, None), (['{op="sti"}', '{op="wait", vector=0x42}'], None)])
    assert [e["index"] for e in errors(res)] == [1, 2]
    assert res["violations"] == []
    # (the programs' CPUs only: L1 kernel vectors of a nested level are not the test's)
    assert got(res, cpu(level, 0)) == [] and [d["vector"] for d in got(res, cpu(level, 1))] == [0x42]


@pytest.mark.parametrize("level", ["bare", "zen4", "spr"])
def test_faulting_self_ipi_write_is_not_a_send(level: str) -> None:
    """SELF_IPI bits 63:8 set: #GP, no send, no oracle report."""
    res = run(level, [(['{op="sti"}', '{op="wrmsr", msr=0x83F, value=0x141}'], None)])
    assert [e["index"] for e in errors(res)] == [1]
    assert res["violations"] == [] and res["deliveries"] == []


def test_spr_virtualised_icr_write_checks_reserved_bits_itself() -> None:
    """spr (IPIv: WRMSR 830h passes the MSR bitmap): the CPU raises #GP for the reserved bits — no
    APIC-write exit whose replay would drop the write (SDM §30.5; X2APIC_ICR_RESERVED_BITS)."""
    ops = ['{op="sti"}', f'{{op="wrmsr", msr=0x830, value={(1 << 32) | 0x2040:#x}}}']
    res = run("spr", [(ops, None), (['{op="sti"}'], None)])
    assert [e["error"].split(":")[0] for e in errors(res)] == ["#GP"]
    assert "apic_write" not in res["exits"]["l0"]
