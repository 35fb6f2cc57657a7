"""Erratum 1235 at L0 (digest §8, §5.7) and the block/ICR-write race (digest §9.3 "Race").

With IPI virtualisation on, a Zen2 may read a freshly cleared IsRunning as 1: it doorbells the
target's old (host-mode) pCPU and takes no AVIC_INCOMPLETE_IPI, so KVM never wakes the blocked
target. KVM's workaround is enable_ipiv = false, forced on by "auto" for family 17h.
"""

from __future__ import annotations

import pytest
from _kvm_util import prog, scenario, snoop_incomplete_ipi, traced

from navic.hw import avic as A

N = 5


def _erratum_scenario(ipiv: str) -> str:
    sender = ['{ op = "sti" }',
              f'{{ op = "repeat", times = {N}, ops = [ {{ op = "compute", cycles = 30000 }}, '
              '{ op = "ipi", to = 1, vector = 0x40 }, { op = "ipi", shorthand = "self", vector = 0x41 } ] }',
              f'{{ op = "wait", vector = 0x41, count = {N} }}']
    receiver = ['{ op = "sti" }', f'{{ op = "wait", vector = 0x40, count = {N}, how = "hlt" }}']
    return scenario([prog(0, sender), prog(1, receiver)], cpu="zen2", apic="xapic",
                    l0=f"ipiv = {ipiv}\nerratum_1235_p = 1.0\nhalt_poll_ns = 0\n")


def _count(t, cpu: str, vec: int) -> int:
    return sum(1 for d in t.result["deliveries"] if (d["cpu"], d["vector"]) == (cpu, vec))


def test_erratum_1235_with_ipiv_forced_on_leaves_blocked_receiver_stuck(monkeypatch):
    t = traced(_erratum_scenario("true"), monkeypatch=monkeypatch)
    kvm = t.kvm
    assert kvm.vendor.enable_ipiv and "1235" in kvm.vendor.errata
    stale = kvm.host.silicon.avic.stats["stale_reads"]
    assert stale >= 1
    # A stale read doorbells the target's old pCPU (host mode: ignored) and takes no exit.
    assert t.counter("doorbells_ignored") >= stale
    assert len(t.incomplete_ipis("l1.0")) < N
    # The end-of-run oracle finds the receiver halted with the IPI pending in its IRR.
    stuck = [v for v in t.result["violations"] if v["kind"] == "stuck"]
    assert stuck and all((v["cpu"], v["vector"], v["sent_by"]) == ("l1.1", 0x40, "l1.0") for v in stuck)
    assert t.result["apic"]["l1.1"]["irr"][2] & 1           # vector 0x40 still in IRR
    assert kvm.vcpus[1].blocked
    assert _count(t, "l1.1", 0x40) < N
    # Self-IPIs never read the table: all delivered, none exited.
    assert _count(t, "l1.0", 0x41) == N
    assert all((lo >> 18) & 3 == 0 for lo, _, _, _ in t.incomplete_ipis())
    assert t.ir_violations == []                            # KVM itself kept the table truthful


def test_erratum_1235_ipiv_auto_is_off_on_zen2_and_everything_arrives(monkeypatch):
    snaps = snoop_incomplete_ipi(monkeypatch)
    t = traced(_erratum_scenario('"auto"'), monkeypatch=monkeypatch)
    assert not t.kvm.vendor.enable_ipiv
    assert t.result["violations"] == [] and t.ir_violations == []
    # The real table never sees IsRunning = 1, so the erratum has nothing stale to read ...
    assert t.real_writes and not any(e & A.PHYS_IS_RUNNING for _, _, e in t.real_writes)
    assert t.kvm.host.silicon.avic.stats["stale_reads"] == 0
    # ... every non-self IPI exits with ID 1 and KVM wakes the receiver.
    assert t.incomplete_ipis("l1.0") == [(0x4040, 1 << 24, A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, 1)] * N
    assert len(snaps) == N
    assert _count(t, "l1.1", 0x40) == N
    assert _count(t, "l1.0", 0x41) == N                     # self-IPIs unaffected


def test_erratum_needs_the_cpu_zen4_ipiv_on_is_fine(monkeypatch):
    text = _erratum_scenario("true").replace('cpu = "zen2"', 'cpu = "zen4"')
    t = traced(text, monkeypatch=monkeypatch)
    assert t.kvm.vendor.enable_ipiv and "1235" not in t.kvm.vendor.errata
    assert t.result["violations"] == [] and t.ir_violations == []
    assert _count(t, "l1.1", 0x40) == N and _count(t, "l1.0", 0x41) == N


# =====================================================================================================
# Race: the target blocks while the sender writes ICR. Sweep the ICR write across the target's
# HLT exit / IsRunning clear / block: KVM's ordering (IR <- 0, barrier, re-read vIRR) plus a correct
# CPU never loses the IPI; the erratum window does.
# =====================================================================================================
def _race(cpu: str, ipiv: str, delay: int) -> str:
    sender = ['{ op = "sti" }', f'{{ op = "compute", cycles = {delay} }}', '{ op = "ipi", to = 1, vector = 0x40 }']
    # The receiver computes a little first so that the earliest sends (delay 0) still find it running
    # (IR = 1): its HLT exit takes the fastpath (handle_fastpath_hlt), which reaches the block sooner.
    receiver = ['{ op = "sti" }', '{ op = "compute", cycles = 1000 }', '{ op = "wait", vector = 0x40, how = "hlt" }']
    return scenario([prog(0, sender), prog(1, receiver)], cpu=cpu, apic="xapic",
                    l0=f"ipiv = {ipiv}\nerratum_1235_p = 1.0\nhalt_poll_ns = 0\n", max_time_us=200)


DELAYS = range(0, 4000, 100)


@pytest.mark.parametrize("cpu, ipiv", [("zen4", "true"), ("zen4", "false"), ("zen2", '"auto"')])
def test_block_vs_icr_write_race_never_loses_the_ipi(monkeypatch, cpu, ipiv):
    paths = set()
    for d in DELAYS:
        t = traced(_race(cpu, ipiv, d), monkeypatch=monkeypatch)
        assert t.result["violations"] == [], d
        assert t.ir_violations == [], d
        assert t.got() == [("l1.1", 0x40, "fixed")], d
        paths.add("exit" if t.incomplete_ipis() else "doorbell")
    # The sweep really straddles the block: some sends saw IR = 1, others IR = 0.
    assert paths == ({"exit"} if ipiv != "true" else {"exit", "doorbell"})


def test_block_vs_icr_write_race_with_erratum_window_loses_it(monkeypatch):
    outcomes = {}
    for d in DELAYS:
        t = traced(_race("zen2", "true", d), monkeypatch=monkeypatch)
        outcomes[d] = [v["kind"] for v in t.result["violations"]]
    assert ["stuck"] in outcomes.values()                   # right after the clear: stale read
    assert [] in outcomes.values()                          # before it: a normal doorbell
