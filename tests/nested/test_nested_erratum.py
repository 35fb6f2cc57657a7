"""Erratum 1235 and nested AVIC (digest §6.2.10, §6.4 "Erratum 1235 exposure").

Zen2 with IPI virtualisation forced on (L1 copies [l0], so L1's KVM also keeps IsRunning = 1 for
its loaded L2 vCPUs). Under ``shadow`` the hardware reads L1's IsRunning through the shadow
table: when L1 blocks an L2 vCPU it clears the bit (tracked store → shadow IR = 0), and an IPI
right after may still see IR = 1 — a doorbell to a pCPU no longer running that L2 vCPU and no
AVIC_INCOMPLETE_IPI, so neither L0 nor L1 ever wakes it: the L2 IPI is stuck. ``dummy`` never
has IsRunning = 1 in the table the hardware reads, so the same scenario cannot get stuck.
"""

from __future__ import annotations

import pytest
from _nested_util import check_dummy, check_shadow, pingpong, traced, watch_dummy

N = 5
L0 = 'ipiv = true\nerrata = ["1235"]\nerratum_1235_p = {p}\nhalt_poll_ns = 0'


def _run(design: str, p: float, compute: int):
    return traced(pingpong(design, n=N, how="hlt", compute=compute, cpu="zen2", l0=L0.format(p=p),
                           max_time_us=3000),
                  on_build=watch_dummy if design == "dummy" else None,
                  watch=check_shadow if design == "shadow" else check_dummy, sample_us=5)


@pytest.mark.parametrize("compute", [0, 3000, 30000])
def test_shadow_can_leave_an_l2_ipi_stuck_dummy_cannot(compute):
    """Sweep the sender's delay before each IPI: shadow gets stuck for every one of them."""
    t = _run("shadow", 1.0, compute)
    assert t.kvm.vendor.enable_ipiv and "1235" in t.kvm.vendor.errata
    assert t.kvm2.vendor.enable_ipiv                     # L1's KVM: IPI virtualisation on too
    assert t.log["bad"] == []                            # the shadow table itself stayed truthful
    stale = t.kvm.host.silicon.avic.stats["stale_reads"]
    assert stale >= 1
    stuck = [v for v in t.result["violations"] if v["kind"] == "stuck"]
    assert stuck and all(v["cpu"].startswith("l2.") for v in stuck)
    (v,) = stuck
    blocked = v["cpu"]
    l2 = next(x for x in t.kvm2.vcpus if x.name == blocked)
    assert l2.blocked                                    # L1's KVM thread for it sleeps ...
    assert l2.apic.test_irr(v["vector"])                 # ... with the IPI in its backing page
    assert t.got("l2.1", 0x40) + t.got("l2.0", 0x41) < 2 * N

    d = _run("dummy", 1.0, compute)
    assert d.result["violations"] == [] and d.log["bad"] == []
    assert d.kvm.host.silicon.avic.stats["stale_reads"] == 0
    assert d.got("l2.1", 0x40) == N and d.got("l2.0", 0x41) == N


def test_shadow_without_the_stale_read_delivers_everything():
    """Same scenario, erratum listed but never striking (p = 0): nothing stuck — the stuck IPI
    above is the erratum's, not the design's."""
    t = _run("shadow", 0.0, 0)
    assert t.result["violations"] == [] and t.log["bad"] == []
    assert t.got("l2.1", 0x40) == N and t.got("l2.0", 0x41) == N
