"""Issue 17 item 1: the NMI window. An NMI that arrives while the CPU is still in its NMI handler is
held (one pending) and taken right after the handler's IRET (SDM §6.7.1 "NMI blocking"). Under KVM:
process_nmi() keeps it pending and enable_nmi_window() asks to be told when NMIs unblock — SVM
intercepts IRET (svm_enable_nmi_window / iret_interception), VMX uses NMI-window exiting
(vmx_enable_nmi_window / handle_nmi_window)."""

from __future__ import annotations

import pytest
from _peer import ALL_LEVELS, LEVELS, cpu, got, reads, run

HANDLER = 20_000   # cycles the first NMI's handler runs


def _two_nmis(level: str) -> dict:
    receiver = (['{op="sti"}', '{op="wait", vector=2, count=2}', '{op="read", reg="TPR", into="done"}'],
                {2: [f'{{op="compute", cycles={HANDLER}}}']})
    sender = (['{op="compute", cycles=3000}', '{op="ipi", to=0, mode="nmi"}',
               '{op="compute", cycles=3000}', '{op="ipi", to=0, mode="nmi"}'], None)
    return run(level, [receiver, sender])


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_nmi_during_nmi_handler_is_taken_after_iret(level: str) -> None:
    """Two NMIs, the second sent while the first is in service, are both received; the second
    right after the IRET (not at an unrelated exit)."""
    res = _two_nmis(level)
    me = cpu(level, 0)
    nmis = got(res, me, 2)
    assert len(nmis) == 2, res["deliveries"]
    gap = nmis[1]["t"] - nmis[0]["t"]
    slack = 60_000 if LEVELS[level][2] == 2 else 15_000   # L2: the IRET exit goes to L1 through L0
    assert HANDLER <= gap < HANDLER + slack, gap
    assert reads(res, me) == {"done": 0}


@pytest.mark.parametrize("level", ["zen2", "noapicv", "l2"])
def test_svm_nmi_window_is_an_iret_intercept(level: str) -> None:
    """svm_inject_nmi() without vNMI intercepts IRET for every NMI it injects (iret_interception
    then unmasks): two NMIs, two IRET exits (handled by L1 for L2)."""
    res = _two_nmis(level)
    where = "l1" if level == "l2" else "l0"
    assert res["exits"][where].get("iret") == 2, res["exits"]


def test_vmx_nmi_window_exit() -> None:
    """vmx_enable_nmi_window(): NMI-window exiting, one nmi_window exit."""
    res = _two_nmis("spr")
    assert res["exits"]["l0"].get("nmi_window") == 1, res["exits"]


@pytest.mark.parametrize("level", [lv for lv in ALL_LEVELS if lv != "bare"])
def test_multiple_nmi(level: str) -> None:
    """kvm-unit-tests x86/apic.c test_multiple_nmi "multiple nmi": CPU 0 sends itself an NMI while
    CPU 1 sends it one at the same time, then a fixed IPI 0x44 that flushes; CPU 0 receives two
    NMIs. Under KVM, process_nmi() lets two NMIs be pending when they arrive together (one is
    injected, the other after an NMI window). (Bare metal may coalesce two NMIs that land in the
    same instant: one latch, SDM §6.7.1.)"""
    cpu0 = (['{op="sti"}', '{op="compute", cycles=3000}', '{op="ipi", shorthand="self", mode="nmi"}',
             '{op="wait", vector=0x44}', '{op="compute", cycles=20000}'], None)
    cpu1 = (['{op="compute", cycles=3000}', '{op="ipi", to=0, mode="nmi"}', '{op="ipi", to=0, vector=0x44}'], None)
    res = run(level, [cpu0, cpu1])
    assert len(got(res, cpu(level, 0), 2)) == 2
    assert len(got(res, cpu(level, 0), 0x44)) == 1 and res["violations"] == []
